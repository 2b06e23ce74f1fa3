//! `fmoec check` as a user runs it: exit codes, the human and JSON formats; and `fmoec emit`'s
//! output folder.

use std::process::Command;

fn fmoec(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("fmoec runs")
}

#[test]
fn examples_check_with_exit_code_zero() {
    let mut args = vec!["check"];
    let files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| format!("examples/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".fmoe"))
        .collect();
    args.extend(files.iter().map(String::as_str));
    let out = fmoec(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("ok: ").count(), files.len(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn errors_exit_one_in_both_formats() {
    let human = fmoec(&["check", "tests/ui/name-typo.fmoe"]);
    assert_eq!(human.status.code(), Some(1));
    let text = String::from_utf8_lossy(&human.stderr);
    assert!(
        text.contains("error[E0201]: unknown name `widht`"),
        "{text}"
    );
    assert!(text.contains("tests/ui/name-typo.fmoe:7:70"), "{text}");
    assert!(text.contains("did you mean `width`?"), "{text}");

    let json = fmoec(&["check", "--format", "json", "tests/ui/name-typo.fmoe"]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stderr).expect("JSON on stderr");
    let d = &v[0];
    assert_eq!(d["code"], "E0201");
    assert_eq!(d["severity"], "error");
    assert_eq!(d["primary"]["line"], 7);
    assert_eq!(d["primary"]["column"], 70);
    assert_eq!(d["help"], "did you mean `width`?");
}

#[test]
fn warnings_alone_do_not_fail() {
    let out = fmoec(&["check", "tests/ui/warn-unused.fmoe"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning[W0001]: unused import `switch`"),
        "{text}"
    );
}

#[test]
fn unreadable_file_fails_with_a_message() {
    let out = fmoec(&["check", "tests/ui/no-such-file.fmoe"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("cannot read `tests/ui/no-such-file.fmoe`"),
        "{text}"
    );
}

#[test]
fn unreadable_file_exits_two_even_beside_a_file_with_errors() {
    let out = fmoec(&["check", "tests/ui/name-typo.fmoe", "no/such/model.fmoe"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("error: cannot read `no/such/model.fmoe`"),
        "{text}"
    );
    // the readable file is still checked and reported
    assert!(text.contains("error[E0201]"), "{text}");
}

/// `fmoec emit` replaces the files it wrote before, but never a file it did not write or one
/// edited since: those stop it before anything is written, unless `--force`.
#[test]
fn emit_never_overwrites_files_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let emit_to = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "emit",
            "--megatron",
            "v2.2",
            "examples/tiny.fmoe",
            "-o",
            out,
        ];
        args.extend_from_slice(extra);
        fmoec(&args)
    };
    let emit = |extra: &[&str]| emit_to(out_s, extra);
    // An emit into `out` that fails with exit status 1 saying `expected`.
    let refused = |expected: &str| {
        let r = emit(&[]);
        let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
        assert_eq!(r.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("nothing was written"), "{stderr}");
    };
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("README.md"), "mine\n").unwrap();
    refused("README.md` exists and is not written by fmoec");
    assert_eq!(
        std::fs::read_to_string(out.join("README.md")).unwrap(),
        "mine\n"
    );
    assert!(
        !out.join("train.sh").exists(),
        "nothing is written after a refusal"
    );

    std::fs::remove_file(out.join("README.md")).unwrap();
    assert!(emit(&[]).status.success());
    let first = std::fs::read_to_string(out.join("train.sh")).unwrap();
    // its own files, unchanged: emitted again without complaint
    assert!(emit(&[]).status.success());

    std::fs::write(out.join("train.sh"), format!("{first}# my change\n")).unwrap();
    refused("train.sh` exists and is changed since fmoec wrote it");
    assert!(std::fs::read_to_string(out.join("train.sh"))
        .unwrap()
        .ends_with("# my change\n"));

    assert!(emit(&["--force"]).status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("train.sh")).unwrap(),
        first
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let r = emit_to(file.to_str().unwrap(), &[]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("it is a file, not a folder"));
}

/// `fmoec emit --megatron list` prints every target and what it supports (no model file
/// needed); an unknown target is refused, naming the known ones; a missing model file too.
#[test]
fn emit_lists_its_targets_and_refuses_unknown_ones() {
    let out = fmoec(&["emit", "--megatron", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("v2.2  Megatron-LM v2.2, tree 8aa4619f"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  precision              fp32, fp16"),
        "{stdout}"
    );
    let out = fmoec(&["emit", "--megatron", "v9.9", "examples/tiny.fmoe"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no Megatron-LM release `v9.9` to emit for; known: v2.2"),
        "{stderr}"
    );
    let out = fmoec(&["emit", "--megatron", "v2.2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the model file is missing"), "{stderr}");
}

/// Every target emits its four files and the manifest that records their SHA-256.
#[test]
fn every_target_writes_its_files_and_the_manifest() {
    use sha2::{Digest, Sha256};
    for version in ["v2.2", "v2.5", "v3.0.2"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let r = fmoec(&[
            "emit",
            "--megatron",
            version,
            "examples/tiny.fmoe",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let manifest: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(out.join(".fmoec-emit.json")).unwrap()).unwrap();
        let patch = format!("megatron-{version}.patch");
        let names: Vec<&str> = manifest.keys().map(String::as_str).collect();
        let mut expected = vec!["README.md", "fmoec_moe.py", patch.as_str(), "train.sh"];
        expected.sort();
        assert_eq!(names, expected, "{version}");
        for (name, sum) in &manifest {
            let bytes = std::fs::read(out.join(name)).unwrap();
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(&hex, sum, "{version} {name}");
        }
    }
}

/// The deepest expression the parser takes (64 nested brackets, each holding 255 products
/// and 255 sums after the nested one: a tree about 32,000 levels deep) is checked without
/// overflowing the stack; one chain longer than 256 operands is an error.
#[test]
fn the_deepest_allowed_expression_is_checked_without_a_crash() {
    let mut e = String::from("1");
    for _ in 0..63 {
        e = format!("({e}{}{})", "*1".repeat(255), "+1".repeat(255));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deep.fmoe");
    std::fs::write(&file, format!("const x = {e}\n")).unwrap();
    let out = fmoec(&["check", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("E0221"),
        "no model: the only error\n{stderr}"
    );
    assert!(!stderr.contains("overflow"), "{stderr}");
}
