//! `fmoec check` as a user runs it: exit codes, the human and JSON formats; and `fmoec emit`'s
//! output folder.

use std::path::{Path, PathBuf};

use crate::fmoec_cli::{
    command_in, emit_output, emitted_file, example, fmoec, fmoec_in, json_diagnostics, model_file,
    root, stderr_text, stdout_text, SMALL_MODEL,
};

#[test]
fn examples_check_with_exit_code_zero() {
    let mut args = vec!["check"];
    let files: Vec<String> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| format!("examples/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".fmoe"))
        .collect();
    args.extend(files.iter().map(String::as_str));
    let out = fmoec(&args);
    let stderr = stderr_text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("ok: ").count(), files.len(), "{stderr}");
    // The only warnings: the Megatron datasets the examples name are not in this clone.
    assert_eq!(
        stderr.matches("warning").count(),
        stderr.matches("warning[W0009]").count(),
        "{stderr}"
    );
}

#[test]
fn errors_exit_one_in_both_formats() {
    let human = fmoec(&["check", "tests/ui/name-typo.fmoe"]);
    assert_eq!(human.status.code(), Some(1));
    let text = stderr_text(&human);
    assert!(
        text.contains("error[E0201]: unknown name `widht`"),
        "{text}"
    );
    assert!(text.contains("tests/ui/name-typo.fmoe:7:70"), "{text}");
    assert!(text.contains("did you mean `width`?"), "{text}");

    let json = fmoec(&["check", "--diagnostics", "json", "tests/ui/name-typo.fmoe"]);
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
    let text = stderr_text(&out);
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
    let text = stderr_text(&out);
    assert!(
        text.contains("cannot read `tests/ui/no-such-file.fmoe`"),
        "{text}"
    );
}

#[test]
fn unreadable_file_exits_two_even_beside_a_file_with_errors() {
    let out = fmoec(&["check", "tests/ui/name-typo.fmoe", "no/such/model.fmoe"]);
    assert_eq!(out.status.code(), Some(2));
    let text = stderr_text(&out);
    assert!(
        text.contains("error: cannot read `no/such/model.fmoe`"),
        "{text}"
    );
    // the readable file is still checked and reported
    assert!(text.contains("error[E0201]"), "{text}");
}

/// A model file past the size cap (a device such as `/dev/zero`, a runaway generated file) is
/// refused like an unreadable one, after reading only the cap: it used to be read whole
/// (`fmoec check /dev/zero` filled the memory) and a file of NUL bytes was then parsed.
#[test]
fn a_file_past_the_size_cap_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.fmoe");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(fmoec::driver::MAX_MODEL_FILE_BYTES + 1)
        .unwrap();
    let big = big.to_str().unwrap();
    for format in ["human", "json"] {
        let out = fmoec(&["check", "--diagnostics", format, big]);
        assert_eq!(out.status.code(), Some(2));
        let text = stderr_text(&out);
        assert!(text.contains(&format!("cannot read `{big}`")), "{text}");
        assert!(text.contains("larger than 16 MiB"), "{text}");
    }
}

/// `fmoec emit` replaces the files it wrote before, but never a file it did not write or one
/// edited since: those stop it before anything is written, unless `--force`.
#[test]
fn emit_never_overwrites_files_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let emit_to =
        |out: &Path, extra: &[&str]| emit_output("v2.2", "examples/tiny.fmoe", out, extra);
    let emit = |extra: &[&str]| emit_to(&out, extra);
    // An emit into `out` that fails with exit status 1 saying `expected`.
    let refused = |expected: &str| {
        let r = emit(&[]);
        let stderr = stderr_text(&r);
        assert_eq!(r.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("nothing was written"), "{stderr}");
    };
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("README.md"), "mine\n").unwrap();
    refused("README.md` exists and is not written by fmoec");
    assert_eq!(emitted_file(&out, "README.md"), "mine\n");
    // the same refusal as JSON: one array, the file in the way named
    let json = emit(&["--diagnostics", "json"]);
    assert_eq!(json.status.code(), Some(1));
    let items = json_diagnostics(&json);
    let readme = out.join("README.md");
    assert!(
        items
            .iter()
            .any(|d| d["code"] == "E0002" && d["primary"]["file"] == readme.to_str().unwrap()),
        "{items:?}"
    );
    assert!(
        !out.join("train.sh").exists(),
        "nothing is written after a refusal"
    );

    std::fs::remove_file(out.join("README.md")).unwrap();
    assert!(emit(&[]).status.success());
    let first = emitted_file(&out, "train.sh");
    // its own files, unchanged: emitted again without complaint
    assert!(emit(&[]).status.success());

    std::fs::write(out.join("train.sh"), format!("{first}# my change\n")).unwrap();
    refused("train.sh` exists and is changed since fmoec wrote it");
    assert!(emitted_file(&out, "train.sh").ends_with("# my change\n"));

    assert!(emit(&["--force"]).status.success());
    assert_eq!(emitted_file(&out, "train.sh"), first);

    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let r = emit_to(&file, &[]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr_text(&r).contains("it is a file, not a folder"));

    // A folder where a file goes (the manifest too) stops the emit even with --force, before
    // anything is written: before, --force wrote the patch and the module, then failed on the
    // folder, leaving half an emit without its manifest.
    for in_the_way in ["train.sh", ".fmoec-emit.json"] {
        let blocked = dir.path().join(format!("blocked-{in_the_way}"));
        std::fs::create_dir_all(blocked.join(in_the_way)).unwrap();
        for extra in [&[][..], &["--force"][..]] {
            let r = emit_to(&blocked, extra);
            let stderr = stderr_text(&r);
            assert_eq!(r.status.code(), Some(1), "{stderr}");
            assert!(
                stderr.contains(&format!("{in_the_way}` exists and is not a file"))
                    && stderr.contains("nothing was written")
                    && !stderr.contains("--force to overwrite"),
                "{stderr}"
            );
            let left: Vec<_> = std::fs::read_dir(&blocked).unwrap().collect();
            assert_eq!(left.len(), 1, "{in_the_way} {extra:?}: {left:?}");
        }
    }
}

/// `fmoec emit --megatron list` prints every target and what it supports (no model file
/// needed); an unknown target is refused, naming the known ones; a missing model file too.
#[test]
fn emit_lists_its_targets_and_refuses_unknown_ones() {
    let out = fmoec(&["emit", "--megatron", "list"]);
    let stdout = stdout_text(&out);
    assert!(out.status.success(), "{}", stderr_text(&out));
    assert!(
        stdout.contains("v2.2  Megatron-LM v2.2, tree 8aa4619f"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  precision              fp32, fp16"),
        "{stdout}"
    );
    let out = fmoec(&["emit", "--megatron", "v9.9", "examples/tiny.fmoe"]);
    let stderr = stderr_text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no Megatron-LM release `v9.9` to emit for; known: core_v0.19, v2.2"),
        "{stderr}"
    );
    let out = fmoec(&["emit", "--megatron", "v2.2"]);
    let stderr = stderr_text(&out);
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
        let r = emit_output(version, "examples/tiny.fmoe", &out, &[]);
        assert!(r.status.success(), "{}", stderr_text(&r));
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
    let file = model_file(dir.path(), "deep.fmoe", format!("const x = {e}\n"));
    let out = fmoec(&["check", file.to_str().unwrap()]);
    let stderr = stderr_text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("E0221"),
        "no model: the only error\n{stderr}"
    );
    assert!(!stderr.contains("overflow"), "{stderr}");
}

/// Issue 14, item 5: `--diagnostics json` is machine-readable every time: `[]` for a clean
/// file, one array for several files, an element for a file that cannot be read.
#[test]
fn json_diagnostics_are_one_array_every_time() {
    let clean = fmoec(&["check", "--diagnostics", "json", "examples/tiny.fmoe"]);
    assert_eq!(clean.status.code(), Some(0));
    assert!(json_diagnostics(&clean).is_empty());
    assert!(clean.stdout.is_empty());

    let two = fmoec(&[
        "check",
        "--diagnostics",
        "json",
        "tests/ui/name-typo.fmoe",
        "tests/ui/warn-unused.fmoe",
    ]);
    assert_eq!(two.status.code(), Some(1));
    let items = json_diagnostics(&two);
    let files: Vec<&str> = items
        .iter()
        .map(|d| d["primary"]["file"].as_str().unwrap())
        .collect();
    assert!(files.contains(&"tests/ui/name-typo.fmoe"), "{items:?}");
    assert!(files.contains(&"tests/ui/warn-unused.fmoe"), "{items:?}");

    let unreadable = fmoec(&[
        "check",
        "--diagnostics",
        "json",
        "tests/ui/name-typo.fmoe",
        "no/such/model.fmoe",
    ]);
    assert_eq!(unreadable.status.code(), Some(2));
    let items = json_diagnostics(&unreadable);
    let missing = items
        .iter()
        .find(|d| d["code"] == "E0001")
        .expect("an element for the unreadable file");
    assert_eq!(missing["severity"], "error");
    assert_eq!(missing["primary"]["file"], "no/such/model.fmoe");
    assert!(missing["message"]
        .as_str()
        .unwrap()
        .contains("cannot read `no/such/model.fmoe`"));
    assert!(items.iter().any(|d| d["code"] == "E0201"), "{items:?}");
}

/// A model file that is not UTF-8 is refused with E0001 at its first bad byte (line and
/// column of the text before it, the byte named), in both formats; not at line 0.
#[test]
fn a_file_that_is_not_utf8_is_refused_at_its_first_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    // `é` in Latin-1 (0xE9) inside a doc comment on line 3, after `/// caf` (7 characters)
    let mut bytes = b"use std.gates.gshard\nconst a = 1\n/// caf".to_vec();
    bytes.push(0xE9);
    bytes.extend_from_slice(b" au lait\nconst b = 2\n");
    let file = model_file(dir.path(), "latin1.fmoe", bytes);
    let path = file.to_str().unwrap();

    let human = fmoec(&["check", path]);
    assert_eq!(human.status.code(), Some(2));
    let stderr = stderr_text(&human);
    assert!(
        stderr.contains("error[E0001]: cannot read")
            && stderr
                .contains("it is not UTF-8 text (byte 0xE9 at line 3, column 8, byte offset 40)")
            && stderr.contains(&format!("{path}:3:8"))
            && stderr.contains("/// caf\u{FFFD} au lait"),
        "{stderr}"
    );

    let json = fmoec(&["check", "--diagnostics", "json", path]);
    assert_eq!(json.status.code(), Some(2));
    let items = json_diagnostics(&json);
    assert_eq!(items.len(), 1, "{items:?}");
    let primary = &items[0]["primary"];
    assert_eq!(items[0]["code"], "E0001");
    assert_eq!(primary["file"], path);
    assert_eq!(
        (&primary["line"], &primary["column"]),
        (&3.into(), &8.into())
    );
    assert_eq!(
        (&primary["start"], &primary["end"]),
        (&40.into(), &40.into())
    );
    assert!(
        primary["message"].as_str().unwrap().contains("byte 0xE9"),
        "{items:?}"
    );

    // A file cut inside a character: the first byte of the unfinished one.
    std::fs::write(&file, b"const a = 1\n// \xE2\x82").unwrap();
    let cut = fmoec(&["check", "--diagnostics", "json", path]);
    let items = json_diagnostics(&cut);
    assert_eq!(items[0]["code"], "E0001");
    assert_eq!(
        (&items[0]["primary"]["line"], &items[0]["primary"]["column"]),
        (&2.into(), &4.into())
    );
    assert!(
        items[0]["message"].as_str().unwrap().contains("byte 0xE2"),
        "{items:?}"
    );

    // UTF-16 (what Windows PowerShell's `>` writes) is named as such.
    let utf16: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain("const a = 1\n".encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    std::fs::write(&file, utf16).unwrap();
    let items = json_diagnostics(&fmoec(&["check", "--diagnostics", "json", path]));
    assert_eq!(items[0]["primary"]["line"], 1);
    assert!(
        items[0]["help"].as_str().unwrap().contains("UTF-16"),
        "{items:?}"
    );
}

/// Rendered diagnostics reach stderr in few large writes, not one system call per piece
/// that codespan prints (a file of 400,000 unused constants spent most of its 30 s `check`
/// printing their warnings so). Seen from outside: stderr is a pipe no one reads yet, and once
/// 32 KiB have gone into it the process has made only a handful of write calls
/// (`/proc/PID/io`; before, thousands).
#[cfg(target_os = "linux")]
#[test]
fn many_warnings_are_printed_in_few_writes() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut text: String = (0..2000)
        .map(|i| format!("const unused_{i} = {i}\n"))
        .collect();
    text += SMALL_MODEL;
    let file = model_file(dir.path(), "unused.fmoe", text);
    let child = command_in(root())
        .args(["check", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fmoec runs");
    let io = format!("/proc/{}/io", child.id());
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    let (written, writes) = loop {
        let now = std::fs::read_to_string(&io).unwrap_or_default();
        let (written, writes) = (field(&now, "wchar:"), field(&now, "syscw:"));
        if written >= 32 << 10 || start.elapsed().as_secs() > 120 {
            break (written, writes);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = stderr_text(&out);
    assert_eq!(stderr.matches("warning[W0003]").count(), 2000);
    assert!(written >= 32 << 10, "{written} bytes written");
    assert!(writes < 100, "{writes} write calls for {written} bytes");
}

/// Issue 14, item 5: one flag name for the diagnostics' format in every subcommand;
/// `check --format` (its old name) says so instead of meaning something else.
#[test]
fn every_subcommand_takes_diagnostics_json() {
    let file = "tests/ui/check-five-mistakes.fmoe";
    let mut commands = vec![
        vec!["plan", "--diagnostics", "json", file],
        vec!["emit", "--diagnostics", "json", "--megatron", "v2.2", file],
    ];
    // (a build without the runtime has no `run` to ask)
    if cfg!(feature = "runtime") {
        commands.push(vec!["run", "--diagnostics", "json", file]);
    }
    for args in commands {
        let out = fmoec(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let codes: Vec<String> = json_diagnostics(&out)
            .iter()
            .map(|d| d["code"].as_str().unwrap().to_string())
            .collect();
        // the front end's and the planner's mistakes, in one array
        for code in ["E0413", "E0604", "E0605", "P0007", "P0011"] {
            assert!(codes.iter().any(|c| c == code), "{args:?}: {codes:?}");
        }
    }
    let old = fmoec(&["check", "--format", "json", "examples/tiny.fmoe"]);
    assert_eq!(old.status.code(), Some(2));
    assert!(stderr_text(&old).contains("is now `--diagnostics json`"));
}

/// Issue 14, item 3: `check` says "ok" only to what `plan` plans; five mistakes of
/// different phases are reported by one `check`, the same ones `plan` reports.
#[test]
fn check_reports_the_planners_mistakes_in_the_same_pass() {
    let check = fmoec(&["check", "tests/ui/check-five-mistakes.fmoe"]);
    assert_eq!(check.status.code(), Some(1));
    let text = stderr_text(&check);
    for code in ["E0413", "E0604", "E0605", "P0007", "P0011"] {
        assert!(text.contains(&format!("error[{code}]")), "{code}\n{text}");
    }
    assert!(text.contains("due to 5 previous errors"), "{text}");
    let plan = fmoec(&["plan", "tests/ui/check-five-mistakes.fmoe"]);
    assert_eq!(plan.status.code(), Some(1));
    assert_eq!(stderr_text(&plan), text);
    // Every example that checks also plans.
    for example in [
        "tiny",
        "gpt2-medium-moe",
        "mixtral-8x7b",
        "deepseek-moe",
        "plan-only",
    ] {
        let file = format!("examples/{example}.fmoe");
        assert!(fmoec(&["check", &file]).status.success(), "{file}");
        assert!(fmoec(&["plan", &file]).status.success(), "{file}");
    }
}

/// A value given on the command line has no place in the file: its diagnostic points at the
/// model (the `parallel` block where there is one), not at the file's first character, and
/// says which overrides were in force.
#[test]
fn override_diagnostics_point_at_the_model_not_at_the_first_line() {
    let out = fmoec(&[
        "plan",
        "examples/tiny.fmoe",
        "--world",
        "2",
        "--pipeline",
        "2",
        "--virtual-stages",
        "3",
    ]);
    let stderr = stderr_text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error[P0016]"), "{stderr}");
    assert!(stderr.contains("examples/tiny.fmoe:8:7"), "{stderr}");
    assert!(!stderr.contains("examples/tiny.fmoe:1:1"), "{stderr}");
    assert!(
        stderr.contains("with command-line overrides --world 2 --pipeline 2 --virtual-stages 3"),
        "{stderr}"
    );
}

/// `plan --megatron core_v0.19` says what the emitted train.sh's fallback to Megatron's local
/// attention (no Transformer Engine) adds to its memory; other targets have no such line.
#[test]
fn plan_for_megatron_core_shows_the_local_attention_memory() {
    let out = fmoec(&[
        "plan",
        "--megatron",
        "core_v0.19",
        "examples/mixtral-8x7b.fmoe",
    ]);
    let stdout = stdout_text(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert!(
        stdout.contains(
            "without Transformer Engine (train.sh falls back to Megatron's local attention"
        ),
        "{stdout}"
    );
    // 5 × 67,108,864 × 8 × 4 + 2 × 67,108,864 bytes (tests/plan_costs.rs) = 10.12 GiB
    assert!(stdout.contains("up to 10.12 GiB more"), "{stdout}");
    let v22 = fmoec(&["plan", "examples/mixtral-8x7b.fmoe"]);
    assert!(!stdout_text(&v22).contains("without Transformer Engine"));
}

/// `plan --megatron VERSION` plans the training `emit --megatron VERSION` writes: what the
/// target cannot train is refused by both, with the same diagnostic and exit code, and no
/// plan is printed.
#[test]
fn plan_for_a_target_refuses_what_emit_refuses() {
    let interleaved = ["--world", "2", "--pipeline", "2", "--virtual-stages", "2"];
    let mut args = vec!["plan", "--megatron", "core_v0.19", "examples/tiny.fmoe"];
    args.extend(interleaved);
    let out = fmoec(&args);
    let stderr = stderr_text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", stdout_text(&out));
    assert!(
        stderr
            .contains("error[E0801]: Megatron-LM core_v0.19 has no interleaved pipeline schedule"),
        "{stderr}"
    );
    assert!(stderr.contains("examples/tiny.fmoe:8:7"), "{stderr}");
    // The same refusal, from plan and from emit, for a model the v2.x releases cannot build.
    let dir = tempfile::tempdir().unwrap();
    let emit_out = dir.path().join("out");
    let emit = emit_output("v2.2", "examples/mixtral-8x7b.fmoe", &emit_out, &[]);
    let plan = fmoec(&["plan", "--megatron", "v2.2", "examples/mixtral-8x7b.fmoe"]);
    let codes = |o: &std::process::Output| {
        let text = stderr_text(o);
        let mut codes: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("error["))
            .map(|l| l[..5].to_string())
            .collect();
        codes.sort();
        codes
    };
    assert_eq!(emit.status.code(), Some(1));
    assert_eq!(plan.status.code(), Some(1));
    assert!(!codes(&plan).is_empty());
    assert_eq!(codes(&plan), codes(&emit));
    assert!(plan.stdout.is_empty());
    assert!(!emit_out.exists());
    // A target that can train it prints the plan.
    let ok = fmoec(&[
        "plan",
        "--megatron",
        "core_v0.19",
        "examples/mixtral-8x7b.fmoe",
    ]);
    assert!(ok.status.success(), "{}", stderr_text(&ok));
    assert!(stdout_text(&ok).contains("Megatron-Core layout"));
}

/// `plan --auto --megatron VERSION` lists only layouts the target can train: without an
/// interleaved schedule, the file's `virtual_stages` are not planned, and it says so;
/// without a target (`fmoec run`) they are.
#[test]
fn auto_plans_for_a_target_only_what_it_can_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let file = model_file(
        dir.path(),
        "interleaved.fmoe",
        example("tiny").replace(
            "train {",
            "parallel {\n    gpus = 4\n    pipeline = 2\n    virtual_stages = 2\n}\n\ntrain {",
        ),
    );
    let file = file.to_str().unwrap();
    let out = fmoec(&[
        "plan",
        "--auto",
        "--top",
        "20",
        "--megatron",
        "core_v0.19",
        file,
    ]);
    let stdout = stdout_text(&out);
    assert!(out.status.success(), "{}", stderr_text(&out));
    assert!(
        stdout.contains("note: Megatron-LM core_v0.19 has no interleaved pipeline schedule"),
        "{stdout}"
    );
    assert!(!stdout.contains("(x2)"), "{stdout}");
    let run = fmoec(&["plan", "--auto", "--top", "20", file]);
    let stdout = stdout_text(&run);
    assert!(run.status.success());
    assert!(stdout.contains("(x2)"), "{stdout}");
    assert!(!stdout.contains("note:"), "{stdout}");
}

/// A model file reading the Megatron dataset `d/out_text_document` beside it, written into
/// `dir` with a copy of the golden dataset (`tests/data_golden`, `fmoec data`'s output).
fn megatron_dataset_in(dir: &Path) -> PathBuf {
    let root = root();
    std::fs::create_dir(dir.join("d")).unwrap();
    for ext in ["bin", "idx"] {
        std::fs::copy(
            root.join(format!(
                "tests/data_golden/expected/core-hf/out_text_document.{ext}"
            )),
            dir.join(format!("d/out_text_document.{ext}")),
        )
        .unwrap();
    }
    let tokenizer = root.join("tests/data_golden/tok/tokenizer.json");
    model_file(
        dir,
        "m.fmoe",
        format!(
            "model m {{\n    vocab = 1024; context = 32; width = 32; heads = 2; depth = 1\n    \
             block = transformer(attention = causal(), ffn = mlp(hidden = 64))\n}}\n\n\
             train {{\n    data      = megatron(\"d/out_text_document\")\n    \
             tokenizer = hf({tokenizer:?})\n    batch     = 4 x 32 tokens\n    \
             steps     = 2\n    optimizer = adamw(lr = 1e-3)\n}}\n"
        ),
    )
}

fn check_in(dir: &Path) -> (Option<i32>, String) {
    let out = fmoec_in(dir, &["check", "m.fmoe"]);
    (out.status.code(), stderr_text(&out))
}

#[test]
fn check_refuses_a_truncated_megatron_dataset_at_its_data_line() {
    let dir = tempfile::tempdir().unwrap();
    megatron_dataset_in(dir.path());
    let (code, text) = check_in(dir.path());
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok: m.fmoe"), "{text}");

    let idx = dir.path().join("d/out_text_document.idx");
    let whole_idx = std::fs::read(&idx).unwrap();
    std::fs::write(&idx, &whole_idx[..1000]).unwrap();
    let (code, text) = check_in(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "error[E0615]: `d/out_text_document.idx` is truncated: it ends inside the sequence pointers"
        ),
        "{text}"
    );
    assert!(text.contains("m.fmoe:7:17"), "{text}");

    std::fs::write(&idx, &whole_idx).unwrap();
    let bin = dir.path().join("d/out_text_document.bin");
    let whole_bin = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &whole_bin[..whole_bin.len() - 2]).unwrap();
    let (code, text) = check_in(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("error[E0615]: `d/out_text_document.bin` is truncated or does not match `d/out_text_document.idx`"),
        "{text}"
    );
}

/// What clap refuses before any subcommand runs (a bad value, an unknown flag, a missing
/// file) is one JSON diagnostic under `--diagnostics json`, with clap's exit code; clap's
/// own text otherwise.
#[test]
fn command_line_refusals_are_json_under_diagnostics_json() {
    let cases: [&[&str]; 4] = [
        &[
            "plan",
            "examples/tiny.fmoe",
            "--world",
            "0",
            "--diagnostics",
            "json",
        ],
        &[
            "check",
            "--diagnostics",
            "json",
            "--bogus",
            "examples/tiny.fmoe",
        ],
        &["check", "--diagnostics=json"],
        &[
            "emit",
            "--diagnostics",
            "json",
            "--wrold",
            "2",
            "examples/tiny.fmoe",
        ],
    ];
    for args in cases {
        let out = fmoec(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let items = json_diagnostics(&out);
        assert_eq!(items.len(), 1, "{args:?}: {items:?}");
        let d = &items[0];
        assert_eq!(d["severity"], "error", "{args:?}");
        assert_eq!(d["code"], "E0002", "{args:?}");
        assert!(d["primary"].is_null(), "{args:?}");
        let message = d["message"].as_str().unwrap();
        assert!(!message.starts_with("error"), "{message}");
        assert!(!message.contains("Usage"), "{message}");
    }
    let items = json_diagnostics(&fmoec(cases[0]));
    assert_eq!(
        items[0]["message"],
        "invalid value '0' for '--world <N>': must be 1 or more, found 0"
    );
    let items = json_diagnostics(&fmoec(cases[1]));
    assert!(items[0]["help"].as_str().unwrap().contains("-- --bogus"));

    // without `--diagnostics json`, clap's text as before; `--help` is not an error
    let text = fmoec(&["check", "--bogus", "examples/tiny.fmoe"]);
    assert_eq!(text.status.code(), Some(2));
    let stderr = stderr_text(&text);
    assert!(
        stderr.starts_with("error: unexpected argument '--bogus'"),
        "{stderr}"
    );
    let help = fmoec(&["check", "--diagnostics", "json", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout_text(&help).contains("Usage"));
}

/// A panic (a bug in fmoec, here one asked for by `FMOEC_DEBUG_PANIC`) ends like any other
/// error: in JSON one array whose element has code `E0003`, in human form an `error:` line
/// with a help instead of Rust's panic text; exit code 101 in both. With `RUST_BACKTRACE`,
/// the backtrace comes too (in JSON as the element's note).
#[test]
fn a_panic_is_reported_as_an_error_of_the_command() {
    let panicking = |args: &[&str], backtrace: bool| {
        let mut c = command_in(root());
        c.args(args)
            .env("FMOEC_DEBUG_PANIC", "main")
            .env_remove("RUST_BACKTRACE");
        if backtrace {
            c.env("RUST_BACKTRACE", "1");
        }
        c.output().expect("fmoec runs")
    };
    for backtrace in [false, true] {
        let json = panicking(
            &["check", "--diagnostics", "json", "examples/tiny.fmoe"],
            backtrace,
        );
        assert_eq!(json.status.code(), Some(101));
        let items = json_diagnostics(&json);
        assert_eq!(items.len(), 1, "{items:?}");
        let d = &items[0];
        assert_eq!(
            (&d["severity"], &d["code"]),
            (&"error".into(), &"E0003".into())
        );
        let message = d["message"].as_str().unwrap();
        assert!(
            message.starts_with("fmoec failed inside: FMOEC_DEBUG_PANIC=main"),
            "{message}"
        );
        assert!(d["help"].as_str().unwrap().contains("a bug in fmoec"));
        let notes = d["notes"].as_array().unwrap();
        match backtrace {
            false => assert!(notes.is_empty(), "{notes:?}"),
            true => assert!(notes[0].as_str().unwrap().starts_with("backtrace:\n")),
        }
    }

    let human = panicking(&["plan", "examples/tiny.fmoe"], false);
    assert_eq!(human.status.code(), Some(101));
    let stderr = stderr_text(&human);
    assert!(
        stderr.starts_with("error: fmoec failed inside: FMOEC_DEBUG_PANIC=main"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\n  help: this is a bug in fmoec"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(human.stdout.is_empty());
    let traced = panicking(&["plan", "examples/tiny.fmoe"], true);
    let stderr = stderr_text(&traced);
    assert!(stderr.contains("panicked at"), "{stderr}");
    assert!(stderr.contains("stack backtrace:"), "{stderr}");
}

/// A legal file name with a line break: the human output shows it escaped (`a\nb.fmoe`) in
/// each diagnostic's header and in the summary line, so no line of the output starts with the
/// rest of the name; the JSON keeps the real name (JSON escapes it by itself).
#[test]
fn a_file_name_with_a_line_break_is_shown_escaped_and_kept_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let file = model_file(
        dir.path(),
        "a\nb.fmoe",
        "model m {\n    vocab = 256\n    widht = 3\n}\n",
    );
    let path = file.to_str().unwrap();
    let shown = format!("{}/a\\nb.fmoe", dir.path().display());

    let human = fmoec(&["check", path]);
    assert_eq!(human.status.code(), Some(1));
    let stderr = stderr_text(&human);
    assert!(stderr.contains(&format!("┌─ {shown}:3:5\n")), "{stderr}");
    assert!(
        stderr.contains(&format!("error: could not check `{shown}` due to")),
        "{stderr}"
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with("b.fmoe")),
        "a raw line break in the name:\n{stderr}"
    );

    let json = fmoec(&["check", "--diagnostics", "json", path]);
    let items = json_diagnostics(&json);
    assert!(!items.is_empty());
    for item in &items {
        assert_eq!(item["primary"]["file"], path, "{item}");
    }
}

/// A line break and a tab in a file or folder name are escaped in the text of every message
/// that names it, not only in a diagnostic's header: E0001's `cannot read` (a file that is
/// not there, and one that is not UTF-8), a data file the model names that is not there
/// (W0009, the name a string of the model file), and `emit`'s file in the way. No line of the
/// human output starts with the rest of a name; the JSON's `file` is the real name. Before,
/// each of these messages broke at the name.
#[test]
fn names_with_control_characters_are_escaped_in_messages() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    // No line of `stderr` starts with `rest` (the name's part after a raw line break).
    let one_line = |stderr: &str, rest: &str| {
        assert!(
            !stderr.lines().any(|l| l.starts_with(rest)),
            "a raw line break in a name:\n{stderr}"
        );
    };
    // `fmoec check PATH` in both formats: the human one's exit code and text, the JSON items.
    let check = |path: &str| {
        let human = fmoec(&["check", path]);
        let json = fmoec(&["check", "--diagnostics", "json", path]);
        (
            human.status.code(),
            stderr_text(&human),
            json_diagnostics(&json),
        )
    };

    let missing = dir.path().join("no\nsuch\tmodel.fmoe");
    let missing_s = missing.to_str().unwrap();
    let (code, stderr, items) = check(missing_s);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains(&format!(
            "error: cannot read `{base}/no\\nsuch\\tmodel.fmoe`: "
        )),
        "{stderr}"
    );
    one_line(&stderr, "such");
    assert!(
        items
            .iter()
            .any(|d| d["code"] == "E0001" && d["primary"]["file"] == missing_s),
        "{items:?}"
    );

    let latin1 = model_file(
        dir.path(),
        "caf\u{e9}\nau\tlait.fmoe",
        b"const a = 1\n// caf\xE9\n",
    );
    let latin1_s = latin1.to_str().unwrap();
    let (code, stderr, items) = check(latin1_s);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains(&format!(
            "error[E0001]: cannot read `{base}/caf\u{e9}\\nau\\tlait.fmoe`: it is not UTF-8 text"
        )),
        "{stderr}"
    );
    one_line(&stderr, "au");
    assert_eq!(items[0]["primary"]["file"], latin1_s, "{items:?}");

    let model = model_file(
        dir.path(),
        "data.fmoe",
        format!(
            "{SMALL_MODEL}train {{\n    data = text(\"my\\ncorpus\\t1.txt\")\n    \
             batch = 4 x 8 tokens\n    steps = 2\n    optimizer = adamw(lr = 1e-3)\n}}\n"
        ),
    );
    let human = fmoec(&["check", model.to_str().unwrap()]);
    let stderr = stderr_text(&human);
    assert!(human.status.success(), "{stderr}");
    assert!(
        stderr.contains(r"warning[W0009]: the data file `my\ncorpus\t1.txt` does not exist"),
        "{stderr}"
    );
    one_line(&stderr, "corpus");

    let out = dir.path().join("out\nput\tfolder");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("README.md"), "mine\n").unwrap();
    let emit = |format: &str| {
        emit_output(
            "v2.2",
            "examples/tiny.fmoe",
            &out,
            &["--diagnostics", format],
        )
    };
    let human = emit("human");
    assert_eq!(human.status.code(), Some(1));
    let stderr = stderr_text(&human);
    assert!(
        stderr.contains(&format!(
            "error: `{base}/out\\nput\\tfolder/README.md` exists and is not written by fmoec\n"
        )),
        "{stderr}"
    );
    one_line(&stderr, "put");
    let items = json_diagnostics(&emit("json"));
    let readme = out.join("README.md");
    assert!(
        items
            .iter()
            .any(|d| d["code"] == "E0002" && d["primary"]["file"] == readme.to_str().unwrap()),
        "{items:?}"
    );
}
