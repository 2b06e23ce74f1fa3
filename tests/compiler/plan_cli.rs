//! `fmoec plan` end to end: formats, overrides, exit codes, located errors.

use std::process::Command;

fn fmoec(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn json_has_the_documented_fields() {
    let (code, out, _) = fmoec(&["plan", "examples/mixtral-8x7b.fmoe", "--format", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in ["world", "tensor", "pipeline", "data", "ranks", "groups"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    let r = &v["ranks"][9];
    for k in [
        "rank",
        "tensor_rank",
        "pipeline_rank",
        "data_rank",
        "expert_rank",
        "experts",
        "memory_bytes",
    ] {
        assert!(r.get(k).is_some(), "rank missing {k}");
    }
    for k in [
        "tensor",
        "pipeline",
        "data",
        "model",
        "expert",
        "expert_data",
        "gate",
    ] {
        assert!(v["groups"][k].is_array(), "groups missing {k}");
    }
    // Rank 9 of 64 with t = 8, p = 4: tensor rank 1, data rank 1, stage 0.
    assert_eq!(r["tensor_rank"], 1);
    assert_eq!(r["data_rank"], 1);
    assert_eq!(r["pipeline_rank"], 0);
    // Byte-stable.
    let (_, again, _) = fmoec(&["plan", "examples/mixtral-8x7b.fmoe", "--format", "json"]);
    assert_eq!(out, again);
}

#[test]
fn overrides_and_located_errors() {
    let (code, out, _) = fmoec(&[
        "plan",
        "examples/mixtral-8x7b.fmoe",
        "--world",
        "32",
        "--pipeline",
        "2",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["world"].as_u64(), v["data"].as_u64()),
        (Some(32), Some(2))
    );
    let (code, _, err) = fmoec(&["plan", "examples/mixtral-8x7b.fmoe", "--pipeline", "5"]);
    assert_eq!(code, 1);
    assert!(err.contains("error[P0006]"), "{err}");
    assert!(err.contains("examples/mixtral-8x7b.fmoe:14:"), "{err}");
    let (code, _, err) = fmoec(&["plan", "examples/mixtral-8x7b.fmoe", "--expert-group", "x"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn dot_has_one_cluster_per_stage() {
    let (code, out, _) = fmoec(&["plan", "examples/mixtral-8x7b.fmoe", "--format", "dot"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("subgraph cluster_stage").count(), 4);
    assert!(out.starts_with("digraph model {"));
}

#[test]
fn auto_prints_best_plans() {
    let (code, out, _) = fmoec(&["plan", "--auto", "examples/tiny.fmoe", "--world", "8"]);
    assert_eq!(code, 0);
    assert!(out.contains("best plans by estimated throughput"), "{out}");
}

/// `--auto` ranks layouts in a table; a format meant for one plan is refused, not ignored.
#[test]
fn auto_refuses_a_format_for_one_plan() {
    for format in ["json", "dot"] {
        let (code, out, err) = fmoec(&[
            "plan",
            "--auto",
            "examples/tiny.fmoe",
            "--world",
            "8",
            "--format",
            format,
        ]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains(&format!("no --format {format}")), "{err}");
    }
}

/// The layout overrides are what `--auto` chooses, and `--top` only means something with
/// `--auto`: both together with the other are refused instead of silently dropped.
#[test]
fn auto_refuses_the_layout_it_searches_and_top_needs_auto() {
    for layout in [
        &["--tensor", "2"][..],
        &["--pipeline", "2"],
        &["--expert-group", "2"],
        &["--micro-batch", "2"],
        &["--virtual-stages", "2"],
    ] {
        let mut args = vec!["plan", "--auto", "examples/tiny.fmoe", "--world", "8"];
        args.extend_from_slice(layout);
        let (code, out, err) = fmoec(&args);
        assert_eq!(code, 2, "{layout:?}: {out}{err}");
        assert!(err.contains("cannot be used with"), "{layout:?}: {err}");
    }
    let (code, _, err) = fmoec(&["plan", "examples/tiny.fmoe", "--top", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--auto"), "{err}");
}

/// The assumptions `--memory-model` and `--routing-skew` hold for every layout `--auto`
/// ranks: the runtime's memory model changes the memory column, a skew the step times.
#[test]
fn auto_plans_under_the_memory_model_and_routing_skew() {
    // (the best layout replicates the experts, which no skew slows: compare the top five)
    let base = [
        "plan",
        "--auto",
        "examples/gpt2-medium-moe.fmoe",
        "--top",
        "5",
    ];
    let (code, plain, err) = fmoec(&base);
    assert_eq!(code, 0, "{err}");
    for assumption in [["--memory-model", "fmoec"], ["--routing-skew", "3"]] {
        let mut args = base.to_vec();
        args.extend_from_slice(&assumption);
        let (code, assumed, err) = fmoec(&args);
        assert_eq!(code, 0, "{assumption:?}: {err}");
        assert_ne!(plain, assumed, "{assumption:?} changed nothing:\n{assumed}");
    }
}

/// `fmoec plan ... | head`: a reader that stops early ends the plan quietly, with no panic.
#[test]
fn a_plan_into_a_closed_pipe_ends_quietly() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args([
            "plan",
            "examples/mixtral-8x7b.fmoe",
            "--world",
            "512",
            "--format",
            "json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn a_routing_skew_shows_what_shadowing_would_do() {
    // The 8-GPU example: its experts spread over the data ranks, routing as skewed as the
    // bench's `skewed` (the busiest expert 3x the mean)
    let (code, out, err) = fmoec(&[
        "plan",
        "examples/gpt2-medium-moe.fmoe",
        "--routing-skew",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "expert exchange (FasterMoE): smart_schedule = off, shadowing = off, routing skew 3"
        ),
        "{out}"
    );
    assert!(out.contains("shadowing would"), "{out}");
    let (code, out, _) = fmoec(&[
        "plan",
        "examples/gpt2-medium-moe.fmoe",
        "--routing-skew",
        "3",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["fastermoe"]["routing_skew"].as_f64(), Some(3.0));
    assert_eq!(v["fastermoe"]["layers"].as_array().map(Vec::len), Some(12));
    // without a skew or the options, the plan has no such section
    let (_, out, _) = fmoec(&["plan", "examples/gpt2-medium-moe.fmoe", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.get("fastermoe").is_none());
    for bad in ["0.5", "nan", "inf", "x"] {
        let (code, _, err) = fmoec(&[
            "plan",
            "examples/gpt2-medium-moe.fmoe",
            "--routing-skew",
            bad,
        ]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--routing-skew"), "{bad}: {err}");
    }
}

#[test]
fn virtual_stages_flag_without_a_pipeline_warns_like_the_files_value() {
    let (code, out, err) = fmoec(&[
        "plan",
        "examples/gpt2-medium-moe.fmoe",
        "--virtual-stages",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pipeline 1"), "{out}");
    assert!(
        err.contains("warning[W0011]: `--virtual-stages 2` has no effect with pipeline = 1"),
        "{err}"
    );
    // at the file's `pipeline = 1`
    assert!(err.contains("examples/gpt2-medium-moe.fmoe:32:16"), "{err}");
    assert!(
        err.contains("with command-line overrides --virtual-stages 2"),
        "{err}"
    );
    // with a pipeline it takes effect, and nothing is said
    let (code, out, err) = fmoec(&[
        "plan",
        "examples/gpt2-medium-moe.fmoe",
        "--virtual-stages",
        "2",
        "--pipeline",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 model chunks per stage"), "{out}");
    assert!(!err.contains("W0011"), "{err}");
}

#[test]
fn zero_sizes_on_the_command_line_are_refused_at_the_flag() {
    for flag in [
        "--world",
        "--tensor",
        "--pipeline",
        "--micro-batch",
        "--virtual-stages",
        "--expert-group",
    ] {
        let (code, _, err) = fmoec(&["plan", "examples/tiny.fmoe", flag, "0"]);
        assert_eq!(code, 2, "{flag}: {err}");
        assert!(
            err.contains(&format!("invalid value '0' for '{flag}")),
            "{err}"
        );
        assert!(err.contains("1 or more"), "{flag}: {err}");
        assert!(!err.contains("0 here"), "{flag}: {err}");
        assert!(!err.contains("examples/tiny.fmoe:"), "{flag}: {err}");
    }
}

/// The file's `virtual_stages` are judged against the pipeline in effect: `--pipeline 2`
/// gives them one (no W0011, in `plan` and `run`), `--pipeline 1` takes it away (W0011 at
/// the file's `virtual_stages`, which `check` does not warn about).
#[test]
fn the_files_virtual_stages_are_judged_against_the_pipeline_flag() {
    let file = "tests/ui/warn-virtual-stages-without-pipeline.fmoe";
    let (code, _, err) = fmoec(&["plan", file]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning[W0011]"), "{err}");
    let (code, out, err) = fmoec(&["plan", file, "--pipeline", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 model chunks per stage"), "{out}");
    assert!(!err.contains("W0011"), "{err}");
    if cfg!(feature = "runtime") {
        // tiny.fmoe (it trains) on 2 GPUs with 2 virtual stages; on one device `run` refuses
        // `--pipeline 2` before it reads the file
        let tiny = std::fs::read_to_string("examples/tiny.fmoe").unwrap();
        let path = std::env::temp_dir().join(format!("fmoec-w0011-{}.fmoe", std::process::id()));
        std::fs::write(
            &path,
            tiny + "\nparallel {\n    gpus = 2\n    virtual_stages = 2\n}\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let (code, _, err) = fmoec(&["run", path, "--pipeline", "2"]);
        std::fs::remove_file(path).unwrap();
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("--pipeline needs several ranks"), "{err}");
        assert!(!err.contains("W0011"), "{err}");
    }

    let file = "tests/ui/parallel-virtual-stages-over-layers.fmoe";
    let (code, _, err) = fmoec(&["plan", file, "--pipeline", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning[W0011]: `virtual_stages` has no effect with `--pipeline 1`"),
        "{err}"
    );
    assert!(err.contains(&format!("{file}:17:22")), "{err}");
    assert!(
        err.contains("with command-line overrides --pipeline 1"),
        "{err}"
    );
}

/// W0011 is one rule, the planner's, judged on the layout in effect and said once: by `check`
/// and `plan` at the file's `virtual_stages`; `--virtual-stages N` replaces the file's value
/// (one warning, about the flag, none with `--virtual-stages 1`); with `--pipeline 1` too it
/// names both flags; in JSON, one element.
#[test]
fn w0011_is_said_once_about_the_virtual_stages_in_effect() {
    let file = "tests/ui/warn-virtual-stages-without-pipeline.fmoe";
    let at_the_files_value = format!("{file}:16:22");
    let count = |err: &str| err.matches("warning[W0011]").count();
    for command in ["check", "plan"] {
        let (code, _, err) = fmoec(&[command, file]);
        assert_eq!(code, 0, "{command}: {err}");
        assert_eq!(count(&err), 1, "{command}: {err}");
        assert!(
            err.contains("warning[W0011]: `virtual_stages` has no effect with pipeline = 1"),
            "{command}: {err}"
        );
        assert!(err.contains(&at_the_files_value), "{command}: {err}");
    }
    let (code, _, err) = fmoec(&["plan", file, "--virtual-stages", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&err), 1, "{err}");
    assert!(
        err.contains("warning[W0011]: `--virtual-stages 2` has no effect with pipeline = 1"),
        "{err}"
    );
    assert!(!err.contains(&at_the_files_value), "{err}");
    let (code, _, err) = fmoec(&["plan", file, "--virtual-stages", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&err), 0, "{err}");
    let (code, _, err) = fmoec(&["plan", file, "--pipeline", "1", "--virtual-stages", "3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&err), 1, "{err}");
    assert!(
        err.contains("warning[W0011]: `--virtual-stages 3` has no effect with `--pipeline 1`"),
        "{err}"
    );
    let (code, _, err) = fmoec(&[
        "plan",
        file,
        "--virtual-stages",
        "2",
        "--diagnostics",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let items: Vec<serde_json::Value> = serde_json::from_str(&err).unwrap();
    let w0011: Vec<_> = items.iter().filter(|d| d["code"] == "W0011").collect();
    assert_eq!(w0011.len(), 1, "{err}");
    assert_eq!(w0011[0]["primary"]["line"], 14, "{err}");
}

/// Under `precision = fp8` the plan says what keeps bf16 operands, as `fmoec run` decides it:
/// GPT-2-medium-MoE's narrow experts and, with `fp8_dense`, every dense module of width
/// 1024; Mixtral's slice only its 256-wide LM head. Other precisions have no such line.
#[test]
fn an_fp8_plan_says_what_stays_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let with_dense = |from: &str, name: &str| {
        let src =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(from))
                .unwrap();
        let fp8 = src.replace(
            "precision  = bf16",
            "precision  = fp8\n    fp8_dense  = true",
        );
        assert_ne!(fp8, src);
        let path = dir.path().join(name);
        std::fs::write(&path, fp8).unwrap();
        path.to_str().unwrap().to_string()
    };
    let gpt2 = with_dense(".ci/fp8-gpt2-medium-moe-bf16.fmoe", "gpt2.fmoe");
    let (code, out, err) = fmoec(&["plan", &gpt2, "--memory-model", "fmoec"]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with("fp8:")).expect(&out);
    assert!(
        line.starts_with("fp8:       bf16 operands for the experts of layers [1, 3, 5,"),
        "{line}"
    );
    assert!(line.contains("the MLPs of blocks [0, 2, 4,"), "{line}");
    assert!(
        line.contains("and the LM head, where FP8 would not pay at 8,192 tokens"),
        "{line}"
    );
    let (_, json, _) = fmoec(&["plan", &gpt2, "--memory-model", "fmoec", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["fp8_fallbacks"]["attention"].as_array().map(Vec::len),
        Some(24)
    );
    assert_eq!(v["fp8_fallbacks"]["head"], true);
    let mixtral = with_dense(".ci/fp8-mixtral-slice-bf16.fmoe", "mixtral.fmoe");
    let (code, out, err) = fmoec(&["plan", &mixtral]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("fp8:       bf16 operands for the LM head, where FP8 would not pay"),
        "{out}"
    );
    let (_, out, _) = fmoec(&[
        "plan",
        ".ci/fp8-mixtral-slice-bf16.fmoe",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.get("fp8_fallbacks").is_none());
}
