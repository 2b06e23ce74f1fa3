//! With the `cuda` feature, link libtorch_cuda explicitly: tch's own link line only
//! names libtorch, and `--as-needed` drops libtorch_cuda because no symbol of it is
//! referenced directly, which leaves `tch::Cuda::is_available()` false at run time.
//!
//! With the `runtime` feature and libtorch taken from the Python torch
//! (`LIBTORCH_USE_PYTORCH=1`) or from `LIBTORCH`, also record that libtorch's `lib/` as a
//! run path, so the binary and the tests find libtorch without `LD_LIBRARY_PATH` on the
//! machine that built them (`LD_LIBRARY_PATH` still takes precedence elsewhere).

use std::path::PathBuf;
use std::process::Command;

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
    }
    if std::env::var_os("CARGO_FEATURE_RUNTIME").is_some() {
        if let Some(lib) = libtorch_lib().filter(|l| l.is_dir()) {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        }
    }
}
