//! Runs the generated Python module: byte-compiles both runtimes' modules and runs the pytest
//! suite in tests/python against the fmoec one (torch CPU, gloo, 1, 2 and 4 processes).
//!
//! The interpreter is `FMOEC_PYTHON`, else `~/.cache/fmoec/venv/bin/python` (the venv with
//! torch, numpy and pytest that CI uses); without either the test says it was skipped.
//! `FMOEC_EMIT_KEEP=DIR` also writes the emitted files to DIR, to try them by hand.

mod emit_fixture;

use std::path::PathBuf;
use std::process::Command;

use fmoec::check::GateKind;
use fmoec::emit::{EmitOptions, Runtime};

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FMOEC_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(std::env::var_os("HOME")?).join(".cache/fmoec/venv/bin/python");
    venv.exists().then_some(venv)
}

fn write(runtime: Runtime, dir: &std::path::Path) {
    let c = emit_fixture::checked(4, 1, 1, 8, GateKind::Gshard);
    let opts = EmitOptions {
        runtime,
        megatron_src: None,
        source_name: "tiny.fmoe".into(),
    };
    for (name, text) in emit_fixture::emit(&c, "v2.2", &opts).unwrap().files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn keep_emitted_files_when_asked() {
    if let Some(keep) = std::env::var_os("FMOEC_EMIT_KEEP") {
        std::fs::create_dir_all(&keep).unwrap();
        write(Runtime::Fmoec, std::path::Path::new(&keep));
        assert!(std::path::Path::new(&keep).join("fmoec_moe.py").exists());
    }
}

#[test]
fn generated_module_passes_its_python_tests() {
    let Some(python) = python() else {
        eprintln!("skipped: no python with torch (set FMOEC_PYTHON)");
        return;
    };
    let fmoec_dir = tempfile::tempdir().unwrap();
    let fastmoe_dir = tempfile::tempdir().unwrap();
    write(Runtime::Fmoec, fmoec_dir.path());
    write(Runtime::Fastmoe, fastmoe_dir.path());
    for dir in [fmoec_dir.path(), fastmoe_dir.path()] {
        let status = Command::new(&python)
            .args(["-m", "py_compile"])
            .arg(dir.join("fmoec_moe.py"))
            .status()
            .unwrap();
        assert!(status.success(), "py_compile {}", dir.display());
    }
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let status = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&tests)
        .env("FMOEC_MODULE_DIR", fmoec_dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "pytest failed");
}
