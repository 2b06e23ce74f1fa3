//! With the `cuda` feature, link libtorch_cuda explicitly: tch's own link line only
//! names libtorch, and `--as-needed` drops libtorch_cuda because no symbol of it is
//! referenced directly, which leaves `tch::Cuda::is_available()` false at run time.
//!
//! With the `cuda` feature, also compile the C++ shim (`src/runtime/shim`: torch's current
//! CUDA stream, caching-allocator statistics, an autograd Function calling back into Rust)
//! against torch's headers and the CUDA headers beside the Python torch; no nvcc needed.
//!
//! Always, generate `$OUT_DIR/emit_targets.rs`: one entry per Megatron-LM template folder
//! under `src/emit/templates/` (every folder but `shared/`), with an askama template for each
//! file the emitter writes (the folder's own, else `shared/`'s) and its recorded patch, so that
//! adding a target is a declaration in `stdlib/megatron.fmoe` plus a folder, and no Rust.
//!
//! With the `runtime` feature and libtorch taken from the Python torch
//! (`LIBTORCH_USE_PYTORCH=1`) or from `LIBTORCH`, also record that libtorch's `lib/` as a
//! run path, so the binary and the tests find libtorch without `LD_LIBRARY_PATH` on the
//! machine that built them (`LD_LIBRARY_PATH` still takes precedence elsewhere).

use std::path::PathBuf;
use std::process::Command;

/// The directory of the Python torch package (`.../site-packages/torch`), if a python has it.
fn python_torch_dir() -> Option<PathBuf> {
    let script = "import os, torch; print(os.path.dirname(torch.__file__))";
    for python in ["python3", "python"] {
        if let Ok(out) = Command::new(python).args(["-c", script]).output() {
            if out.status.success() {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Some(PathBuf::from(dir));
            }
        }
    }
    None
}

/// Compiles `src/runtime/shim/fmoec_shim.cpp` (current CUDA stream, caching-allocator
/// statistics) against libtorch's headers and the CUDA headers beside the Python torch
/// (`site-packages/nvidia/cu*/include`), or `FMOEC_CUDA_INCLUDE`. No nvcc is needed.
fn build_shim() {
    println!("cargo:rerun-if-changed=src/runtime/shim");
    println!("cargo:rerun-if-env-changed=FMOEC_CUDA_INCLUDE");
    let torch = match std::env::var_os("LIBTORCH") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => python_torch_dir(),
    };
    let Some(torch) = torch.filter(|t| t.join("include").is_dir()) else {
        panic!(
            "feature `cuda`: libtorch's headers were not found (set LIBTORCH, or \
             LIBTORCH_USE_PYTORCH=1 with a python that has torch)"
        );
    };
    let mut cuda_include = std::env::var_os("FMOEC_CUDA_INCLUDE").map(PathBuf::from);
    if cuda_include.is_none() {
        if let Some(site) = torch.parent() {
            if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
                let mut found: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path().join("include"))
                    .filter(|p| p.join("cuda_runtime_api.h").is_file())
                    .collect();
                found.sort();
                cuda_include = found.pop();
            }
        }
    }
    if cuda_include.is_none() {
        let system = PathBuf::from("/usr/local/cuda/include");
        if system.join("cuda_runtime_api.h").is_file() {
            cuda_include = Some(system);
        }
    }
    let Some(cuda_include) = cuda_include else {
        panic!(
            "feature `cuda`: cuda_runtime_api.h was not found beside torch \
             (site-packages/nvidia/cu*/include) or in /usr/local/cuda; set FMOEC_CUDA_INCLUDE"
        );
    };
    cc::Build::new()
        .cpp(true)
        .file("src/runtime/shim/fmoec_shim.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(&cuda_include)
        // stand-ins for CUDA's crt/ headers, found only when the real ones are absent
        .include("src/runtime/shim")
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("fmoec_shim");
    println!(
        "cargo:rustc-link-search=native={}",
        torch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

fn libtorch_lib() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    std::env::var_os("LIBTORCH_USE_PYTORCH")?;
    let script = "import os, torch; print(os.path.dirname(torch.__file__))";
    for python in ["python3", "python"] {
        if let Ok(out) = Command::new(python).args(["-c", script]).output() {
            if out.status.success() {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Some(PathBuf::from(dir).join("lib"));
            }
        }
    }
    None
}

/// The files every target writes: template file name, render function, template struct.
const TARGET_FILES: [(&str, &str, &str); 3] = [
    ("fmoec_moe.py", "module", "Module"),
    ("train.sh", "train", "Train"),
    ("README.md", "readme", "Readme"),
];

/// Writes `$OUT_DIR/emit_targets.rs` for the folders of `src/emit/templates/` (see the top).
fn generate_emit_targets() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let templates = root.join("src/emit/templates");
    println!("cargo:rerun-if-changed=src/emit/templates");
    let mut folders: Vec<String> = std::fs::read_dir(&templates)
        .expect("src/emit/templates exists")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "shared")
        .collect();
    folders.sort();
    let mut out =
        String::from("// Generated by build.rs from src/emit/templates/: do not edit.\n\n");
    let mut entries = String::new();
    for (i, folder) in folders.iter().enumerate() {
        let mut renders = Vec::new();
        for (file, kind, ty) in TARGET_FILES {
            let own = templates.join(folder).join(file).is_file();
            let path = if own {
                format!("{folder}/{file}")
            } else {
                format!("shared/{file}")
            };
            out.push_str(&format!(
                "#[derive(askama::Template)]\n#[template(path = {path:?}, escape = \"none\")]\n\
                 struct Folder{i}{ty}<'a> {{\n    v: &'a TargetView,\n}}\n\n\
                 fn folder{i}_{kind}(v: &TargetView) -> askama::Result<String> {{\n    \
                 askama::Template::render(&Folder{i}{ty} {{ v }})\n}}\n\n"
            ));
            renders.push(format!("{kind}: folder{i}_{kind},"));
        }
        let patch = templates.join(folder).join("megatron.patch");
        let patch = if patch.is_file() {
            format!("Some(include_str!({:?}))", patch.display().to_string())
        } else {
            "None".to_string()
        };
        entries.push_str(&format!(
            "    Folder {{\n        name: {folder:?},\n        patch: {patch},\n        {}\n    }},\n",
            renders.join("\n        ")
        ));
    }
    out.push_str(&format!(
        "pub(super) static FOLDERS: &[Folder] = &[\n{entries}];\n"
    ));
    let dest =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("emit_targets.rs");
    std::fs::write(dest, out).expect("OUT_DIR is writable");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    generate_emit_targets();
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        build_shim();
    }
    if std::env::var_os("CARGO_FEATURE_RUNTIME").is_some() {
        if let Some(lib) = libtorch_lib().filter(|l| l.is_dir()) {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        }
    }
}
