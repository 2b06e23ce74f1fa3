//! The patch against a real Megatron-LM v2.2 checkout, when `FMOEC_MEGATRON_V22` names one
//! (tree 8aa4619f2b2a57b5725026a50ebd2b15e8121482). Megatron's source never enters this
//! repository or CI; without the variable these tests only say they were skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use fmoec::emit::{gitdiff, megatron, v2_2};

fn checkout() -> Option<PathBuf> {
    match std::env::var_os("FMOEC_MEGATRON_V22") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: set FMOEC_MEGATRON_V22 to a Megatron-LM v2.2 checkout");
            None
        }
    }
}

#[test]
fn recorded_patch_equals_patch_computed_from_checkout() {
    let Some(root) = checkout() else { return };
    let computed = megatron::diff_from_checkout(&root, &v2_2::RELEASE).expect("patch the checkout");
    let recorded = megatron::diff_recorded(&v2_2::RELEASE);
    assert_eq!(
        computed, recorded,
        "recorded line numbers or blob ids are stale"
    );
    // the recorded original blob ids are those of the checkout's files
    for f in v2_2::RELEASE.files {
        let bytes = std::fs::read(root.join(f.path)).unwrap();
        assert_eq!(gitdiff::blob_id(&bytes), f.original_blob, "{}", f.path);
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
    let Some(root) = checkout() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("megatron");
    copy_tree(&root, &tree);
    let patch = tmp.path().join("megatron-v2.2.patch");
    std::fs::write(&patch, megatron::diff_recorded(&v2_2::RELEASE)).unwrap();
    run(Command::new("git")
        .current_dir(&tree)
        .args(["apply", "--check"])
        .arg(&patch));
    run(Command::new("git")
        .current_dir(&tree)
        .arg("apply")
        .arg(&patch));
    // index lines: the patched files hash to the recorded ids
    for f in v2_2::RELEASE.files {
        let bytes = std::fs::read(tree.join(f.path)).unwrap();
        assert_eq!(gitdiff::blob_id(&bytes), f.patched_blob, "{}", f.path);
    }
    let python = std::env::var("FMOEC_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.current_dir(&tree).args(["-m", "py_compile"]);
    for f in v2_2::RELEASE.files {
        cmd.arg(f.path);
    }
    run(&mut cmd);
    // and it reverses cleanly
    run(Command::new("git")
        .current_dir(&tree)
        .args(["apply", "-R", "--check"])
        .arg(&patch));
}
