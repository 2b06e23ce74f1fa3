//! Every target's patch against a real Megatron-LM checkout, when `FMOEC_MEGATRON_<VERSION>`
//! names one (`FMOEC_MEGATRON_V22` for v2.2 at tree 8aa4619f2b2a57b5725026a50ebd2b15e8121482,
//! `FMOEC_MEGATRON_V25`, `FMOEC_MEGATRON_V302`: the version upper-cased without dots).
//! Megatron's source never enters this repository or CI; without the variables these tests
//! only say what they skipped.
//!
//! With `FMOEC_HARNESS_PYTHON` too (a python with torch 2.x, numpy, six and regex), the
//! emitted integration trains inside the patched tree (`tests/megatron/harness.py` on CPU
//! ranks with gloo).

use std::path::{Path, PathBuf};
use std::process::Command;

use fmoec::emit::{gitdiff, megatron, registry, Target};

/// Every declared target with a checkout named by its variable.
fn checkouts() -> Vec<(Target, PathBuf)> {
    let mut out = Vec::new();
    for target in registry::targets().expect("the targets are consistent") {
        let var = format!(
            "FMOEC_MEGATRON_{}",
            target.decl.version.to_uppercase().replace('.', "")
        );
        match std::env::var_os(&var) {
            Some(p) => out.push((target, PathBuf::from(p))),
            None => eprintln!(
                "skipped {}: set {var} to a Megatron-LM checkout of {}",
                target.decl.version, target.decl.tree
            ),
        }
    }
    out
}

/// The v2.2 checkout, for the tests of v2.2's own defects.
fn checkout_v22() -> Option<PathBuf> {
    checkouts()
        .into_iter()
        .find(|(t, _)| t.decl.version == "v2.2")
        .map(|(_, p)| p)
}

#[test]
fn recorded_patch_equals_patch_computed_from_checkout() {
    for (target, root) in checkouts() {
        let Some(patch) = &target.patch else { continue };
        let computed = megatron::diff_from_checkout(&root, patch).expect("patch the checkout");
        let recorded = megatron::diff_recorded(patch);
        assert_eq!(
            computed, recorded,
            "{}: recorded line numbers or blob ids are stale",
            target.decl.version
        );
        // the recorded original blob ids are those of the checkout's files
        for f in &patch.files {
            let bytes = std::fs::read(root.join(&f.path)).unwrap();
            assert_eq!(gitdiff::blob_id(&bytes), f.original_blob, "{}", f.path);
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed:\n{}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    run(Command::new("git")
        .args(["-C"])
        .arg(from)
        .args(["worktree", "list"]));
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}

#[test]
fn git_apply_accepts_the_patch_and_patched_files_compile() {
    for (target, root) in checkouts() {
        let Some(release) = &target.patch else {
            continue;
        };
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("megatron");
        copy_tree(&root, &tree);
        let patch = tmp.path().join(target.patch_name());
        std::fs::write(&patch, megatron::diff_recorded(release)).unwrap();
        run(Command::new("git")
            .current_dir(&tree)
            .args(["apply", "--check"])
            .arg(&patch));
        run(Command::new("git")
            .current_dir(&tree)
            .arg("apply")
            .arg(&patch));
        // index lines: the patched files hash to the recorded ids
        for f in &release.files {
            let bytes = std::fs::read(tree.join(&f.path)).unwrap();
            assert_eq!(gitdiff::blob_id(&bytes), f.patched_blob, "{}", f.path);
        }
        let python = std::env::var("FMOEC_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(python);
        cmd.current_dir(&tree).args(["-m", "py_compile"]);
        for f in &release.files {
            cmd.arg(&f.path);
        }
        run(&mut cmd);
        // and it reverses cleanly
        run(Command::new("git")
            .current_dir(&tree)
            .args(["apply", "-R", "--check"])
            .arg(&patch));
    }
}

/// A Python for `tests/megatron/harness.py`: torch 2.x, numpy, six and regex
/// (`FMOEC_HARNESS_PYTHON`); the harness also needs the shared `cpu_shim.py` and `stubs/`.
fn harness_python() -> Option<PathBuf> {
    match std::env::var_os("FMOEC_HARNESS_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "skipped: set FMOEC_HARNESS_PYTHON to a python with torch, numpy, six, regex"
            );
            None
        }
    }
}

/// Emits `tests/megatron/harness.fmoe` for `release` with the fmoec binary, as a user does.
fn emit_harness_model(release: &str, out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(["emit", "--megatron", release])
        .arg(root.join("tests/megatron/harness.fmoe"))
        .arg("-o")
        .arg(out));
}

/// Runs the harness on `ranks` CPU processes from the patched tree; returns its output.
fn run_harness(python: &Path, tree: &Path, module: &Path, ranks: u32, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .current_dir(tree)
        .env("PYTHONPATH", module)
        .env("HANG_DUMP_S", "120")
        .env("OMP_NUM_THREADS", "1")
        .args(["-m", "torch.distributed.run", "--nproc_per_node"])
        .arg(ranks.to_string())
        .args(["--master_port", "29531"])
        .arg(root.join("tests/megatron/harness.py"))
        .args(args)
        .output()
        .expect("spawn the harness");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("HARNESS_OK"),
        "harness {args:?} failed:\n{text}"
    );
    text
}

/// fp16 with an inf in the expert gradients of one data rank only: every rank skips that
/// step (before the fix, the rank with the overflow skipped and the other waited in clipping
/// for a collective it never entered), and the replicas stay bit-identical.
#[test]
fn fp16_overflow_on_one_data_rank_is_skipped_by_every_rank() {
    let Some(root) = checkout_v22() else { return };
    let Some(python) = harness_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    emit_harness_model("v2.2", &out);
    let tree = tmp.path().join("megatron");
    copy_tree(&root, &tree);
    run(Command::new("git")
        .current_dir(&tree)
        .arg("apply")
        .arg(out.join("megatron-v2.2.patch")));
    for overflow in ["1:0", "1:1"] {
        let text = run_harness(
            &python,
            &tree,
            &out,
            2,
            &[
                "--steps",
                "3",
                "--fp16",
                "--initial-loss-scale",
                "1024",
                "--clip-grad",
                "0.05",
                "--overflow",
                overflow,
            ],
        );
        assert_eq!(text.matches("skipped [1]").count(), 2, "{text}");
    }
}
