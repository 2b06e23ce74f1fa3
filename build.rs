//! With the `cuda` feature, link libtorch_cuda explicitly: tch's own link line only
//! names libtorch, and `--as-needed` drops libtorch_cuda because no symbol of it is
//! referenced directly, which leaves `tch::Cuda::is_available()` false at run time.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
