//! Every example through `fmoec emit --megatron T` for every target T: snapshots of the emitted
//! files (all of them for v2.2; train.sh and README.md for the others, whose module differs from
//! v2.2's only in its Megatron glue, snapshotted in emit_snapshots.rs), or of the rendered
//! diagnostics for models a target cannot express.

use std::path::Path;

use fmoec::check;
use fmoec::diag::{self, Sink, Sources};
use fmoec::emit::{self, EmitError, EmitOptions};

fn emit_example(name: &str, version: &str) -> Result<(Vec<(String, String)>, String), String> {
    emit_example_as(name, version, &format!("{name}.fmoe"))
}

/// [`emit_example`] for a model file named `source_name`.
fn emit_example_as(
    name: &str,
    version: &str,
    source_name: &str,
) -> Result<(Vec<(String, String)>, String), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file_name = format!("examples/{name}.fmoe");
    let text = std::fs::read_to_string(root.join(&file_name)).unwrap();
    let mut sources = Sources::new();
    let file = sources.add(file_name, text);
    let mut sink = Sink::new();
    let checked = check::check_file(&mut sources, file, &mut sink).expect("examples check");
    assert!(!sink.has_errors(), "{name} has errors");
    let target = emit::registry::find(version).unwrap();
    let opts = EmitOptions {
        source_name: source_name.to_string(),
        ..Default::default()
    };
    let plan =
        emit::plan_for(&checked, &target).unwrap_or_else(|ds| panic!("{name} plans: {ds:?}"));
    match emit::emit(&checked, &plan, &target, &opts) {
        Ok(e) => Ok((e.files, diag::render_human(&sources, &e.warnings))),
        Err(EmitError::Model(ds)) => Err(diag::render_human(&sources, &ds)),
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn examples_megatron_can_train() {
    for name in ["tiny", "gpt2-medium-moe", "gpt345m-fmoefy", "plan-only"] {
        let (files, warnings) =
            emit_example(name, "v2.2").unwrap_or_else(|d| panic!("{name}:\n{d}"));
        for (file, text) in files {
            insta::assert_snapshot!(format!("{name}__{file}"), text);
        }
        insta::assert_snapshot!(format!("{name}__warnings"), warnings);
    }
}

#[test]
fn examples_megatron_v22_cannot_express_are_diagnostics() {
    for name in ["mixtral-8x7b", "deepseek-moe"] {
        let rendered = emit_example(name, "v2.2")
            .err()
            .unwrap_or_else(|| panic!("{name} emitted"));
        insta::assert_snapshot!(format!("{name}__errors"), rendered);
    }
}

/// Megatron-LM v2.5 and v3.0.2 train what v2.2 does (with bf16 and the dense MLP's own hidden
/// size) and refuse Mixtral and DeepSeek for what they lack, naming Megatron-Core, which has it.
#[test]
fn examples_for_every_later_target() {
    for decl in check::megatron_targets() {
        // Megatron-Core's own MoE target is below
        if decl.version == "v2.2" || decl.can("native_expert_parallel") {
            continue;
        }
        let target = decl.version;
        for name in ["tiny", "gpt2-medium-moe", "gpt345m-fmoefy", "plan-only"] {
            let (files, warnings) =
                emit_example(name, &target).unwrap_or_else(|d| panic!("{target} {name}:\n{d}"));
            for (file, text) in files {
                if file == "train.sh" || file == "README.md" {
                    insta::assert_snapshot!(format!("{target}__{name}__{file}"), text);
                }
            }
            insta::assert_snapshot!(format!("{target}__{name}__warnings"), warnings);
        }
        for name in ["mixtral-8x7b", "deepseek-moe"] {
            let rendered = emit_example(name, &target)
                .err()
                .unwrap_or_else(|| panic!("{target} {name} emitted"));
            insta::assert_snapshot!(format!("{target}__{name}__errors"), rendered);
        }
    }
}

/// Megatron-Core emits all six examples: Megatron-Core's own MoE where it computes the file's
/// MoE layers (GPT-345M's and Mixtral's naive top-2, DeepSeek's with shared experts), the
/// generated module through `--spec` where it cannot (gshard, per-layer experts, switch). Every
/// emitted file and the warnings are snapshotted; no patch is written.
#[test]
fn examples_megatron_core() {
    let native = ["gpt345m-fmoefy", "mixtral-8x7b", "deepseek-moe"];
    for name in [
        "tiny",
        "gpt2-medium-moe",
        "gpt345m-fmoefy",
        "mixtral-8x7b",
        "deepseek-moe",
        "plan-only",
    ] {
        let (files, warnings) =
            emit_example(name, "core_v0.19").unwrap_or_else(|d| panic!("{name}:\n{d}"));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        if native.contains(&name) {
            assert_eq!(names, ["train.sh", "README.md"], "{name}");
        } else {
            assert_eq!(names, ["fmoec_moe.py", "train.sh", "README.md"], "{name}");
        }
        // the batch the plan was costed for, also without a train block (plan-only): Megatron
        // would otherwise run one micro-batch per data rank, not the plan's micro-batches
        let train_sh = &files.iter().find(|(n, _)| n == "train.sh").unwrap().1;
        assert!(train_sh.contains("--global-batch-size "), "{name}");
        for (file, text) in &files {
            insta::assert_snapshot!(format!("core_v0.19__{name}__{file}"), text);
        }
        insta::assert_snapshot!(format!("core_v0.19__{name}__warnings"), warnings);
        // byte-stable
        assert_eq!(
            files,
            emit_example(name, "core_v0.19").unwrap().0,
            "{name} twice"
        );
    }
}

/// A model file's name is printed in comments of the emitted files: a line break in it (a
/// legal file name) stays escaped inside its comment instead of starting a line of Python or
/// shell (`fmoec_moe.py` did not parse, `bash -n train.sh` failed).
#[test]
fn a_file_name_with_line_breaks_stays_in_its_comment() {
    let source_name = "a\nfmoec_injected = 1\rb\u{85}.fmoe";
    for decl in check::megatron_targets() {
        let (files, _) = emit_example_as("tiny", &decl.version, source_name)
            .unwrap_or_else(|d| panic!("{}:\n{d}", decl.version));
        for (file, text) in &files {
            assert!(
                !text.contains("fmoec_injected = 1\r") && !text.contains('\u{85}'),
                "{} {file}:\n{text}",
                decl.version
            );
            if file.ends_with(".py") || file.ends_with(".sh") {
                let named = text
                    .lines()
                    .filter(|l| l.contains("fmoec_injected"))
                    .count();
                let commented = text
                    .lines()
                    .filter(|l| {
                        l.contains(r"a\nfmoec_injected = 1\rb\u{85}.fmoe") && l.starts_with('#')
                    })
                    .count();
                assert!(named > 0 && named == commented, "{} {file}", decl.version);
            }
        }
    }
}

#[test]
fn every_example_is_covered() {
    let mut names: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter_map(|n| n.strip_suffix(".fmoe").map(str::to_string))
            .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "deepseek-moe",
            "gpt2-medium-moe",
            "gpt345m-fmoefy",
            "mixtral-8x7b",
            "plan-only",
            "tiny"
        ]
    );
}
