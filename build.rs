//! With the `cuda` feature, link libtorch_cuda explicitly: tch's own link line only
//! names libtorch, and `--as-needed` drops libtorch_cuda because no symbol of it is
//! referenced directly, which leaves `tch::Cuda::is_available()` false at run time.
//!
//! With the `cuda` feature, also compile the C++ shim (`src/runtime/shim`: torch's current
//! CUDA stream, caching-allocator statistics, an autograd Function calling back into Rust)
//! against torch's headers and the CUDA headers beside the Python torch; no nvcc needed.
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

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
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
