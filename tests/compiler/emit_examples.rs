//! Every example through `fmoec emit --megatron T` for every target T: snapshots of the emitted
//! files (all of them for v2.2; train.sh and README.md for the others, whose module differs from
//! v2.2's only in its Megatron glue, snapshotted in emit_snapshots.rs), or of the rendered
//! diagnostics for models a target cannot express.

use std::path::Path;

use fmoec::check;
use fmoec::diag::{self, Sink, Sources};
use fmoec::emit::{self, EmitError, EmitOptions};

use crate::fmoec_cli::{
    all_output, argument_after, argument_printing_python, emit_in, emitted_file, folder, root,
    EXAMPLES,
};

fn emit_example(name: &str, version: &str) -> Result<(Vec<(String, String)>, String), String> {
    emit_example_as(name, version, &format!("{name}.fmoe"))
}

/// [`emit_example`] for a model file named `source_name`.
fn emit_example_as(
    name: &str,
    version: &str,
    source_name: &str,
) -> Result<(Vec<(String, String)>, String), String> {
    let file_name = format!("examples/{name}.fmoe");
    let text = std::fs::read_to_string(root().join(&file_name)).unwrap();
    let mut sources = Sources::new();
    let file = sources.add(file_name, text);
    let mut sink = Sink::new();
    let checked = check::check_file(&mut sources, file, &mut sink).expect("examples check");
    assert!(!sink.has_errors(), "{name} has errors");
    let target = emit::registry::find(version).unwrap();
    let opts = EmitOptions {
        source_name: source_name.to_string(),
        relative_to: Some(crate::emit_fixture::WORKING_DIR.into()),
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
    for name in EXAMPLES {
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
    let mut names: Vec<String> = std::fs::read_dir(root().join("examples"))
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

/// `tokenizer = gpt2(vocab, merges)` (paths relative to where fmoec runs, as `fmoec run` reads
/// them; here a folder with a space in its name) is what every target's train.sh passes as
/// `--vocab-file` and `--merge-file` when VOCAB_FILE and MERGE_FILE are not set, and they still
/// override it. Before, train.sh ignored the file's tokenizer and stopped without the variables.
/// `tokenizer = hf(...)`, which no target's train.sh can pass, is a warning (W0812).
#[test]
fn a_gpt2_tokenizer_is_what_train_sh_passes_unless_overridden() {
    let tmp = tempfile::tempdir().unwrap();
    let work = folder(tmp.path(), "my work");
    std::fs::create_dir_all(work.join("tok")).unwrap();
    for file in ["vocab.json", "merges.txt", "tokenizer.json"] {
        std::fs::copy(
            root().join("tests/data_golden/tok").join(file),
            work.join("tok").join(file),
        )
        .unwrap();
    }
    let model = |tokenizer: &str| {
        format!(
            "use std.gates.gshard\nmodel m {{\n    vocab = 1024\n    context = 64\n    width = 64\n    \
             heads = 4\n    depth = 2\n    block = transformer(attention = causal(), ffn = mlp(hidden = 256))\n    \
             layers[1].ffn = moe(experts = 4, gate = gshard(), expert = mlp(hidden = 128))\n}}\n\
             train {{\n    data = megatron(\"corpus_text_document\")\n    tokenizer = {tokenizer}\n    \
             batch = 4 x 64 tokens\n    steps = 2\n    optimizer = adamw(lr = 1e-3)\n}}\n"
        )
    };
    std::fs::write(
        work.join("gpt2.fmoe"),
        model("gpt2(vocab = \"tok/vocab.json\", merges = \"tok/merges.txt\")"),
    )
    .unwrap();
    std::fs::write(work.join("hf.fmoe"), model("hf(\"tok/tokenizer.json\")")).unwrap();
    let python = argument_printing_python(tmp.path());
    let vocab = work.join("tok/vocab.json").to_string_lossy().into_owned();
    let merges = work.join("tok/merges.txt").to_string_lossy().into_owned();
    for decl in check::megatron_targets() {
        let v = &decl.version;
        let out = tmp.path().join(format!("out-{v}"));
        let warnings = emit_in(&work, v, "gpt2.fmoe", &out);
        assert!(!warnings.contains("W0812"), "{v}:\n{warnings}");
        let train_sh = out.join("train.sh");
        let syntax = std::process::Command::new("bash")
            .arg("-n")
            .arg(&train_sh)
            .output()
            .unwrap();
        assert!(syntax.status.success(), "{v}: bash -n failed");
        // the file names every file: the README's launch sets no variable and says which files
        // train.sh passes
        let readme = emitted_file(&out, "README.md");
        assert!(
            readme.contains("\nbash /path/to/out/train.sh ") && !readme.contains("VOCAB_FILE="),
            "{v}:\n{readme}"
        );
        for (var, path) in [("VOCAB_FILE", &vocab), ("MERGE_FILE", &merges)] {
            assert!(
                readme.contains(&format!("\n- `{var}`: `{path}`\n")),
                "{v}:\n{readme}"
            );
        }
        let launch = |vars: &[(&str, &str)]| {
            let mut cmd = std::process::Command::new("bash");
            cmd.arg(&train_sh)
                .current_dir(tmp.path())
                .env("PYTHON", &python)
                .env("NNODES", "1")
                .env("NPROC_PER_NODE", "1")
                .env_remove("VOCAB_FILE")
                .env_remove("MERGE_FILE")
                .env_remove("MOCK_DATA")
                .env_remove("TOKENIZER_TYPE");
            for (name, value) in vars {
                cmd.env(name, value);
            }
            let output = cmd.output().unwrap();
            assert!(output.status.success(), "{v}:\n{}", all_output(&output));
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        let defaults = launch(&[]);
        assert_eq!(
            argument_after(&defaults, "--vocab-file"),
            Some(vocab.clone()),
            "{v}:\n{defaults}"
        );
        assert_eq!(
            argument_after(&defaults, "--merge-file"),
            Some(merges.clone()),
            "{v}:\n{defaults}"
        );
        let overridden = launch(&[
            ("VOCAB_FILE", "/elsewhere/v.json"),
            ("MERGE_FILE", "/elsewhere/m.txt"),
        ]);
        assert_eq!(
            argument_after(&overridden, "--vocab-file").as_deref(),
            Some("/elsewhere/v.json"),
            "{v}"
        );
        assert_eq!(
            argument_after(&overridden, "--merge-file").as_deref(),
            Some("/elsewhere/m.txt"),
            "{v}"
        );

        let warnings = emit_in(&work, v, "hf.fmoe", &tmp.path().join(format!("hf-{v}")));
        assert!(
            warnings.contains(
                "warning[W0812]: the emitted train.sh cannot use the tokenizer `tok/tokenizer.json`"
            ),
            "{v}:\n{warnings}"
        );
    }
}

/// A small MoE model file whose train block reads the Megatron dataset `prefix`, with `extra`
/// lines at the block's end.
fn moe_on_megatron_data(prefix: &str, extra: &str) -> String {
    format!(
        "use std.gates.gshard\nmodel m {{\n    vocab = 50304\n    context = 64\n    width = 64\n    \
         heads = 4\n    depth = 2\n    block = transformer(attention = causal(), ffn = mlp(hidden = 256))\n    \
         layers[1].ffn = moe(experts = 4, gate = gshard(), expert = mlp(hidden = 128))\n}}\n\
         train {{\n    data = megatron({prefix:?})\n    batch = 4 x 64 tokens\n    steps = 2\n    \
         optimizer = adamw(lr = 1e-3)\n{extra}}}\n"
    )
}

/// Runs an emitted train.sh in `checkout` on one process with GPT-2 tokenizer files and the
/// model file's dataset, `python` printing Megatron's arguments; what it printed (the launch
/// must succeed).
fn launch_train_sh(train_sh: &Path, checkout: &Path, python: &Path, v: &str) -> String {
    let launch = std::process::Command::new("bash")
        .arg(train_sh)
        .current_dir(checkout)
        .env("PYTHON", python)
        .env("NNODES", "1")
        .env("NPROC_PER_NODE", "1")
        .env("VOCAB_FILE", "/t/vocab.json")
        .env("MERGE_FILE", "/t/merges.txt")
        .env_remove("DATA_PATH")
        .env_remove("MOCK_DATA")
        .env_remove("TOKENIZER_TYPE")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&launch.stdout).into_owned();
    assert!(launch.status.success(), "{v}:\n{printed}");
    printed
}

/// `data = megatron("prefix")` with a relative prefix names a dataset relative to the folder
/// `fmoec run` runs in (and `fmoec check` warns from, W0009), but train.sh runs in the
/// Megatron-LM checkout: every target's train.sh defaults DATA_PATH to the prefix resolved
/// against the folder `fmoec emit` ran in, one shell word whatever the name holds (here a space
/// and a quote), as it does VOCAB_FILE and MERGE_FILE. Before, it was the prefix as written,
/// which named a place inside the checkout. DATA_PATH still overrides it, and the README's
/// launch line no longer asks for it.
#[test]
fn a_relative_megatron_prefix_is_what_train_sh_passes_absolute() {
    let tmp = tempfile::tempdir().unwrap();
    let work = folder(tmp.path(), "emit here");
    let checkout = folder(tmp.path(), "Megatron-LM");
    let prefix = "data/it's my corpus_text_document";
    std::fs::write(work.join("m.fmoe"), moe_on_megatron_data(prefix, "")).unwrap();
    let expected = work.join(prefix).to_string_lossy().into_owned();
    let python = argument_printing_python(tmp.path());
    for decl in check::megatron_targets() {
        let v = &decl.version;
        let out = tmp.path().join(format!("out-{v}"));
        emit_in(&work, v, "m.fmoe", &out);
        let train_sh = out.join("train.sh");
        let syntax = std::process::Command::new("bash")
            .arg("-n")
            .arg(&train_sh)
            .output()
            .unwrap();
        assert!(syntax.status.success(), "{v}: bash -n failed");

        // train.sh's lines that set DATA_PATH, alone, in the checkout
        let text = emitted_file(&out, "train.sh");
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("DATA_PATH=")).collect();
        assert_eq!(lines.len(), 2, "{v}:\n{text}");
        let value = |data_path: Option<&str>| {
            let mut cmd = std::process::Command::new("bash");
            cmd.arg("-c")
                .arg(format!("{}\nprintf %s \"$DATA_PATH\"", lines.join("\n")))
                .current_dir(&checkout)
                .env_remove("DATA_PATH");
            if let Some(d) = data_path {
                cmd.env("DATA_PATH", d);
            }
            let output = cmd.output().unwrap();
            assert!(output.status.success(), "{v}: {lines:?}");
            String::from_utf8(output.stdout).unwrap()
        };
        assert_eq!(value(None), expected, "{v}: {lines:?}");
        assert_eq!(value(Some("/elsewhere/d")), "/elsewhere/d", "{v}");

        // the whole launch passes it to Megatron
        let printed = launch_train_sh(&out.join("train.sh"), &checkout, &python, v);
        assert_eq!(
            argument_after(&printed, "--data-path").as_deref(),
            Some(expected.as_str()),
            "{v}:\n{printed}"
        );

        // the README asks only for the tokenizer's files and names the dataset train.sh uses
        let readme = emitted_file(&out, "README.md");
        assert!(
            readme.contains("\nVOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \\\n")
                && !readme.contains("DATA_PATH="),
            "{v}:\n{readme}"
        );
        assert!(
            readme.contains(&format!("\n- `DATA_PATH`: `{expected}`\n")),
            "{v}:\n{readme}"
        );
    }
}

/// `checkpoint = every(N, dir = "...")` with a relative folder names a folder relative to where
/// `fmoec run` runs, but train.sh runs in the Megatron-LM checkout: every target's train.sh
/// passes Megatron's `--save` and `--load` the folder resolved against the folder `fmoec emit`
/// ran in, one shell word whatever the name holds (a space, a quote, backticks). Before, it was
/// the folder as written, and Megatron saved into (and resumed from) the checkout.
#[test]
fn a_relative_checkpoint_folder_is_what_train_sh_passes_absolute() {
    let tmp = tempfile::tempdir().unwrap();
    let work = folder(tmp.path(), "emit here");
    let checkout = folder(tmp.path(), "Megatron-LM");
    let dir = "ckpt/it's my `run`";
    std::fs::write(
        work.join("m.fmoe"),
        moe_on_megatron_data(
            "/data/corpus_text_document",
            &format!("    checkpoint = every(1, dir = {dir:?})\n"),
        ),
    )
    .unwrap();
    let expected = work.join(dir).to_string_lossy().into_owned();
    let python = argument_printing_python(tmp.path());
    for decl in check::megatron_targets() {
        let v = &decl.version;
        let out = tmp.path().join(format!("out-{v}"));
        emit_in(&work, v, "m.fmoe", &out);
        let printed = launch_train_sh(&out.join("train.sh"), &checkout, &python, v);
        for flag in ["--save", "--load"] {
            assert_eq!(
                argument_after(&printed, flag).as_deref(),
                Some(expected.as_str()),
                "{v} {flag}:\n{printed}"
            );
        }
    }
}

/// The code spans of the generated README hold any path: a model file's name and a dataset
/// prefix with a backtick, a space and a quote in them are each one code span, with the text
/// as written, when a CommonMark parser reads the README (markdown-it-py, if `FMOEC_PYTHON`
/// has it; else the spans' text is checked as written). Before, a single backtick fenced them
/// and the path's own backtick ended the span.
#[test]
fn readme_code_spans_hold_paths_with_backticks() {
    let tmp = tempfile::tempdir().unwrap();
    let work = folder(tmp.path(), "it's `my` work");
    let source = "a `b` c's.fmoe";
    std::fs::write(work.join(source), moe_on_megatron_data("data/x`y", "")).unwrap();
    let data = work.join("data/x`y").to_string_lossy().into_owned();
    let python = std::env::var("FMOEC_PYTHON").unwrap_or_else(|_| "python3".into());
    let parser = std::process::Command::new(&python)
        .args(["-c", "import markdown_it"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !parser {
        eprintln!("{python} has no markdown_it: the README's spans are checked as text only");
    }
    for decl in check::megatron_targets() {
        let v = &decl.version;
        let out = tmp.path().join(format!("out-{v}"));
        emit_in(&work, v, source, &out);
        let readme = out.join("README.md");
        let text = emitted_file(&out, "README.md");
        let mut spans = vec![source.to_string(), data.clone()];
        if decl.can("native_expert_parallel") {
            spans.push(format!(
                "fmoec plan --megatron {v} '{}'",
                source.replace('\'', r"'\''")
            ));
        }
        assert!(
            text.contains(&format!("\n- `DATA_PATH`: ``{data}``\n")),
            "{v}:\n{text}"
        );
        assert!(
            text.contains(&format!(" from ``{source}``")),
            "{v}:\n{text}"
        );
        if !parser {
            continue;
        }
        // every inline code span of the README, one per line (the texts hold no line break)
        let script = "import sys, markdown_it\n\
                      md = markdown_it.MarkdownIt('commonmark')\n\
                      for t in md.parse(open(sys.argv[1], encoding='utf-8').read()):\n\
                      \x20   for c in t.children or []:\n\
                      \x20       if c.type == 'code_inline': print(c.content)\n";
        let parsed = std::process::Command::new(&python)
            .args(["-c", script])
            .arg(&readme)
            .output()
            .unwrap();
        assert!(parsed.status.success(), "{v}: {parsed:?}");
        let found = String::from_utf8(parsed.stdout).unwrap();
        let found: Vec<&str> = found.lines().collect();
        for span in &spans {
            assert!(
                found.contains(&span.as_str()),
                "{v}: {span:?} not in {found:?}"
            );
        }
    }
}
