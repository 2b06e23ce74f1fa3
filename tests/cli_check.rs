//! `fmoec check` as a user runs it: exit codes, the human and JSON formats.

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
