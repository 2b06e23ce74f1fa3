//! Every target's patch against a real Megatron-LM checkout, when `FMOEC_MEGATRON_<VERSION>`
//! names one (`FMOEC_MEGATRON_V22` for v2.2 at tree 8aa4619f2b2a57b5725026a50ebd2b15e8121482,
//! `FMOEC_MEGATRON_V25`, `FMOEC_MEGATRON_V302`: the version upper-cased without dots).
//! Megatron's source never enters this repository or CI; without the variables these tests
//! only say what they skipped.
//!
//! With `FMOEC_HARNESS_PYTHON` too (a python with torch 2.x, numpy, six and regex), the
//! emitted integration trains inside the patched tree (`tests/megatron/harness.py` on CPU
//! ranks with gloo).
//!
//! Megatron-Core (core_v0.19, no patch): with `FMOEC_MEGATRON_CORE_PKG` (a folder holding
//! megatron/core and megatron/training: PyPI's megatron-core 0.19.0 wheel unzipped, as CI does)
//! the emitted train.sh of all six examples passes Megatron's own argument validation and builds
//! `fmoec plan`'s parameter count; with `FMOEC_MEGATRON_CORE_V019` (a checkout at tag
//! core_v0.19.0: pretrain_gpt.py is not in the wheel) the emitted tiny model trains in the real
//! pretrain_gpt.py on CPU ranks and resumes. The Python is `FMOEC_MEGATRON_CORE_PYTHON`, else
//! `FMOEC_PYTHON` (torch, numpy, psutil).

use std::path::{Path, PathBuf};
use std::process::Command;

use fmoec::emit::{gitdiff, megatron, registry, Target};

use crate::fmoec_cli::{
    all_output, emit_in, example, model_file, plan_json_to, root, succeeds, EXAMPLES,
};

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

fn copy_tree(from: &Path, to: &Path) {
    succeeds(
        Command::new("git")
            .args(["-C"])
            .arg(from)
            .args(["worktree", "list"]),
    );
    succeeds(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// A copy of `checkout` at `tree` with `patch` applied (`git apply`).
fn patched_copy(checkout: &Path, tree: &Path, patch: &Path) {
    copy_tree(checkout, tree);
    succeeds(
        Command::new("git")
            .current_dir(tree)
            .arg("apply")
            .arg(patch),
    );
}

/// Whether the patched tree's `megatron/arguments.py` knows the command-line flag `flag`.
fn parser_knows(tree: &Path, flag: &str) -> bool {
    std::fs::read_to_string(tree.join("megatron/arguments.py"))
        .unwrap()
        .contains(flag)
}

/// The shared stand-ins train.sh needs on a CPU (`FMOEC_MEGATRON_HARNESS`, else
/// `../shared/megatron-harness`).
fn megatron_harness() -> PathBuf {
    std::env::var_os("FMOEC_MEGATRON_HARNESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/megatron-harness"))
}

/// The emitted `out/train.sh` launched from `work` (made, with tests/megatron/parse_args_only.py
/// as its pretrain_gpt.py) on 2 CPU ranks against the patched `tree`: only the release's own
/// `parse_args` runs, and prints what it parsed. The caller sets the data variables.
fn parse_args_launch(python: &Path, tree: &Path, out: &Path, work: &Path) -> Command {
    std::fs::create_dir_all(work).unwrap();
    std::fs::copy(
        root().join("tests/megatron/parse_args_only.py"),
        work.join("pretrain_gpt.py"),
    )
    .unwrap();
    let mut cmd = Command::new("bash");
    cmd.current_dir(work)
        .arg(out.join("train.sh"))
        .env("PYTHON", python)
        .env("MEGATRON_TREE", tree)
        .env("FMOEC_MEGATRON_HARNESS", megatron_harness())
        .env("NNODES", "1")
        .env("NPROC_PER_NODE", "2")
        .env("MASTER_PORT", next_port().to_string());
    // v2.2's parser compiles its CUDA softmax kernel unless told not to (a CPU has none)
    if parser_knows(tree, "--no-scaled-masked-softmax-fusion") {
        cmd.arg("--no-scaled-masked-softmax-fusion");
    }
    cmd
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
        succeeds(
            Command::new("git")
                .current_dir(&tree)
                .args(["apply", "--check"])
                .arg(&patch),
        );
        succeeds(
            Command::new("git")
                .current_dir(&tree)
                .arg("apply")
                .arg(&patch),
        );
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
        succeeds(&mut cmd);
        // and it reverses cleanly
        succeeds(
            Command::new("git")
                .current_dir(&tree)
                .args(["apply", "-R", "--check"])
                .arg(&patch),
        );
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

/// Emits `tests/megatron/harness.fmoe` for `release` with the fmoec binary, as a user does,
/// into `dir/out`, and patches a copy of the checkout at `dir/megatron` with its patch.
fn emitted_and_patched(release: &str, checkout: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let out = dir.join("out");
    emit_harness_model(release, &out);
    let tree = dir.join("megatron");
    patched_copy(
        checkout,
        &tree,
        &out.join(format!("megatron-{release}.patch")),
    );
    (out, tree)
}

/// Emits `tests/megatron/harness.fmoe` for `release` with the fmoec binary, as a user does.
fn emit_harness_model(release: &str, out: &Path) {
    emit_in(root(), release, "tests/megatron/harness.fmoe", out);
}

/// A rendezvous port for the next harness run (tests of this file run in parallel).
fn next_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(29531);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs the harness on `ranks` CPU processes from the patched tree; returns its output.
fn run_harness(python: &Path, tree: &Path, module: &Path, ranks: u32, args: &[&str]) -> String {
    let root = root();
    let out = Command::new(python)
        .current_dir(tree)
        .env("PYTHONPATH", module)
        .env("HANG_DUMP_S", "120")
        .env("OMP_NUM_THREADS", "1")
        .args(["-m", "torch.distributed.run", "--nproc_per_node"])
        .arg(ranks.to_string())
        .arg("--master_port")
        .arg(next_port().to_string())
        .arg(root.join("tests/megatron/harness.py"))
        .args(args)
        .output()
        .expect("spawn the harness");
    let text = all_output(&out);
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
    let (out, tree) = emitted_and_patched("v2.2", &root, tmp.path());
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

/// Every target's integration trains inside its real Megatron-LM on CPU ranks, in the layouts
/// tensor x pipeline x data 1x1x2, 2x1x2, 1x2x2, 2x2x1 and 2x2x2: fp16 with an overflow in the
/// experts of one data rank at step 1 (skipped by every rank), clipping that triggers on every
/// other step, checkpoint save / scramble / load bit for bit, replicas bit-identical, experts
/// different on every data rank, the same loss on every tensor rank; and bf16 where the target
/// has it.
#[test]
fn every_layout_trains_inside_real_megatron() {
    let Some(python) = harness_python() else {
        return;
    };
    for (target, root) in checkouts() {
        if target.patch.is_none() {
            // Megatron-Core: core_emitted_tiny_trains_and_resumes_in_pretrain_gpt
            continue;
        }
        let version = target.decl.version.clone();
        let tmp = tempfile::tempdir().unwrap();
        let (out, tree) = emitted_and_patched(&version, &root, tmp.path());
        for (t, p, d) in [(1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 1), (2, 2, 2)] {
            let ckpt = tmp.path().join(format!("ckpt-{t}{p}{d}"));
            let (tp, pp, overflow) = (t.to_string(), p.to_string(), format!("1:{}", d - 1));
            let text = run_harness(
                &python,
                &tree,
                &out,
                t * p * d,
                &[
                    "--tp",
                    &tp,
                    "--pp",
                    &pp,
                    "--steps",
                    "4",
                    "--fp16",
                    "--initial-loss-scale",
                    "1024",
                    "--clip-grad",
                    "0.05",
                    "--expect-clipping",
                    "--overflow",
                    &overflow,
                    "--ckpt-dir",
                    ckpt.to_str().unwrap(),
                ],
            );
            let summaries = text.matches("skipped [1], ").count();
            assert_eq!(
                summaries as u32,
                t * p * d,
                "{version} {t}x{p}x{d}:\n{text}"
            );
        }
        if target.decl.allows("precision", "bf16") {
            let ckpt = tmp.path().join("ckpt-bf16");
            let mut args = vec![
                "--tp",
                "2",
                "--steps",
                "3",
                "--bf16",
                "--clip-grad",
                "0.05",
                "--expect-clipping",
                "--ckpt-dir",
                ckpt.to_str().unwrap(),
            ];
            // apex's fused weight-gradient kernel (v3.0.2's default with bf16) is CUDA only
            if parser_knows(&tree, "--no-gradient-accumulation-fusion") {
                args.push("--no-gradient-accumulation-fusion");
            }
            run_harness(&python, &tree, &out, 4, &args);
        }
    }
}

/// The emitted train.sh starts every release under torch 2.x (torchrun, the ranks in the
/// environment) and the release's own parser, with fmoec's argument group, accepts every
/// argument it passes (before, torch 2.x's launcher passed `--local-rank=N`, which they reject):
/// a stand-in pretrain_gpt.py runs only Megatron's `parse_args` on 2 ranks.
#[test]
fn train_sh_starts_each_release_and_its_parser_takes_every_argument() {
    let Some(python) = harness_python() else {
        return;
    };
    for (target, checkout) in checkouts() {
        if target.patch.is_none() {
            // Megatron-Core's train.sh: core_emitted_arguments_pass_megatron_core_as_planned
            continue;
        }
        let version = target.decl.version.clone();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        emit_in(root(), &version, "examples/gpt2-medium-moe.fmoe", &out);
        let tree = tmp.path().join("megatron");
        patched_copy(&checkout, &tree, &out.join(target.patch_name()));
        let output = parse_args_launch(&python, &tree, &out, &tmp.path().join("work"))
            .env("DATA_PATH", "corpus_text_document")
            .env("VOCAB_FILE", "vocab.json")
            .env("MERGE_FILE", "merges.txt")
            .output()
            .unwrap();
        let text = all_output(&output);
        assert!(output.status.success(), "{version}:\n{text}");
        // the ranks' lines may interleave with Megatron's own prints
        let expected = "of 2: tp 2 pp 1 dp 1 micro 32 global 256 layers 24 fmoe_layers [1, 3,";
        assert_eq!(
            text.matches("PARSED rank ").count(),
            2,
            "{version}:\n{text}"
        );
        assert_eq!(text.matches(expected).count(), 2, "{version}:\n{text}");
    }
}

/// `examples/gpt2-medium-moe.fmoe` reading a Megatron dataset and a GPT-2 tokenizer by relative
/// paths (`data/my corpus_text_document`, `tok/vocab.json`, `tok/merges.txt`) and saving its
/// checkpoints into a relative folder (`ckpt/my run`), written into `dir` with the tokenizer's
/// files beside it (the checker reads them): the model file `fmoec emit` runs on in `dir`.
/// Returns the four paths, absolute.
fn model_with_relative_files(dir: &Path) -> (PathBuf, [String; 4]) {
    let root = root();
    std::fs::create_dir_all(dir.join("tok")).unwrap();
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(
            root.join("tests/data_golden/tok").join(file),
            dir.join("tok").join(file),
        )
        .unwrap();
    }
    let text = example("gpt2-medium-moe");
    let data = "    data       = builtin(\"tiny-shakespeare\")\n";
    assert!(text.contains(data));
    let text = text.replace(
        data,
        "    data       = megatron(\"data/my corpus_text_document\")\n    \
         tokenizer  = gpt2(vocab = \"tok/vocab.json\", merges = \"tok/merges.txt\")\n",
    );
    let checkpoint = "    checkpoint = every(1000, dir = \"ckpt/gpt2-medium-moe\")\n";
    assert!(text.contains(checkpoint));
    let text = text.replace(
        checkpoint,
        "    checkpoint = every(1000, dir = \"ckpt/my run\")\n",
    );
    let model = model_file(dir, "relative-files.fmoe", text);
    let absolute = |p: &str| dir.join(p).to_str().unwrap().to_string();
    (
        model,
        [
            absolute("data/my corpus_text_document"),
            absolute("tok/vocab.json"),
            absolute("tok/merges.txt"),
            absolute("ckpt/my run"),
        ],
    )
}

/// The files a model file names by relative paths (a `megatron("prefix")` dataset, a
/// `gpt2(vocab, merges)` tokenizer, the checkpoint folder) reach Megatron absolute, resolved
/// against the folder `fmoec emit` ran in, though train.sh runs in the Megatron-LM checkout:
/// each release's own parser (`parse_args` of the patched tree, on 2 ranks) receives them so,
/// with none of DATA_PATH, VOCAB_FILE, MERGE_FILE set; Megatron-Core's
/// `parse_and_validate_args` (with `FMOEC_MEGATRON_CORE_PKG`) receives the dataset and the
/// checkpoint folder so, with `TOKENIZER_TYPE=NullTokenizer` (its GPT-2 tokenizer is built while
/// parsing, from Hugging Face's hub). Before, `--data-path` was the prefix as written, and
/// `--save`/`--load` the folder as written, which Megatron would have used inside the checkout.
#[test]
fn megatrons_parser_receives_the_model_files_absolute() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("my models");
    let (model, [data, vocab, merges, ckpt]) = model_with_relative_files(&models);
    let emit = |version: &str, out: &Path| emit_in(&models, version, "relative-files.fmoe", out);
    let files = format!(
        "data_path ['{data}'] vocab_file '{vocab}' merge_file '{merges}' save '{ckpt}' load '{ckpt}'"
    );
    if let Some(python) = harness_python() {
        for (target, checkout) in checkouts() {
            if target.patch.is_none() {
                continue;
            }
            let version = target.decl.version.clone();
            let dir = tmp.path().join(&version);
            let out = dir.join("out");
            emit(&version, &out);
            let tree = dir.join("megatron");
            patched_copy(&checkout, &tree, &out.join(target.patch_name()));
            let output = parse_args_launch(&python, &tree, &out, &dir.join("work"))
                .env_remove("DATA_PATH")
                .env_remove("VOCAB_FILE")
                .env_remove("MERGE_FILE")
                .output()
                .unwrap();
            let text = all_output(&output);
            assert!(output.status.success(), "{version}:\n{text}");
            assert_eq!(
                text.matches(&files).count(),
                2,
                "{version}: {files}\n{text}"
            );
            eprintln!(
                "{version}: {}",
                text.lines().find(|l| l.contains(&files)).unwrap()
            );
        }
    }
    let Some(package) = std::env::var_os("FMOEC_MEGATRON_CORE_PKG") else {
        eprintln!(
            "skipped core_v0.19: set FMOEC_MEGATRON_CORE_PKG to the megatron-core 0.19.0 wheel \
             unzipped"
        );
        return;
    };
    let out = tmp.path().join("core_v0.19");
    emit("core_v0.19", &out);
    let plan_json = tmp.path().join("plan.json");
    plan_json_to(&models, "core_v0.19", &model, &plan_json);
    let checkout = tmp.path().join("Megatron-LM");
    std::fs::create_dir_all(&checkout).unwrap();
    let text = core_check_args(
        "core_v0.19",
        check_args_launch(&out, &plan_json, &package)
            .current_dir(&checkout)
            .env("TOKENIZER_TYPE", "NullTokenizer")
            .env_remove("MOCK_DATA")
            .env_remove("DATA_PATH"),
    );
    let data_path = format!("data_path ['{data}']");
    assert!(text.contains(&data_path), "core_v0.19: {data_path}\n{text}");
    let checkpoints = format!("save '{ckpt}' load '{ckpt}'");
    assert!(
        text.contains(&checkpoints),
        "core_v0.19: {checkpoints}\n{text}"
    );
    eprintln!("{}", text.lines().find(|l| l.contains(&data_path)).unwrap());
}

/// The Python for Megatron-Core (torch, numpy and psutil; Python 3.11 works through
/// tests/megatron_core/mcore_cpu.py's `typing.override` stand-in).
fn core_python() -> String {
    std::env::var("FMOEC_MEGATRON_CORE_PYTHON")
        .or_else(|_| std::env::var("FMOEC_PYTHON"))
        .unwrap_or_else(|_| "python3".into())
}

/// The emitted `out/train.sh` with tests/megatron_core/check_args.py as its training script, on
/// one rank: Megatron-Core (the wheel unzipped at `package`) validates its arguments and builds
/// the model, to be compared with the plan in `plan_json`.
fn check_args_launch(out: &Path, plan_json: &Path, package: &std::ffi::OsStr) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(out.join("train.sh"))
        .env("PYTHON", core_python())
        .env("PRETRAIN", root().join("tests/megatron_core/check_args.py"))
        .env("FMOEC_PLAN_JSON", plan_json)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONPATH", package)
        .env("NNODES", "1")
        .env("NPROC_PER_NODE", "1")
        .env("MASTER_PORT", next_port().to_string());
    cmd
}

/// Runs a [`check_args_launch`], which must succeed and say CHECK_ARGS_OK (else the test fails
/// with what it printed, headed `what`); what it printed.
fn core_check_args(what: &str, launch: &mut Command) -> String {
    let output = launch.output().unwrap();
    let text = all_output(&output);
    assert!(
        output.status.success() && text.contains("CHECK_ARGS_OK"),
        "{what}:\n{text}"
    );
    text
}

/// Emits `examples/NAME.fmoe` (or any model file) for core_v0.19 into `out` as a user does.
fn emit_core(model: &Path, out: &Path) {
    emit_in(root(), "core_v0.19", model, out);
}

/// The emitted launch of every example, with tests/megatron_core/check_args.py as the training
/// script: Megatron-Core's own `parse_and_validate_args` accepts every argument train.sh passes
/// with the plan's world size, `TransformerConfig` accepts the real layout, and the model it
/// builds (on the meta device; the generated module through `--spec` where the file needs it)
/// has exactly `fmoec plan --megatron core_v0.19`'s parameters by kind, layout, micro-batches,
/// vocabulary and optimizer. (Before, plan-only's train.sh gave no global batch: Megatron ran
/// one micro-batch where the plan counted 16.)
#[test]
fn core_emitted_arguments_pass_megatron_core_as_planned() {
    let Some(package) = std::env::var_os("FMOEC_MEGATRON_CORE_PKG") else {
        eprintln!(
            "skipped: set FMOEC_MEGATRON_CORE_PKG to the megatron-core 0.19.0 wheel unzipped"
        );
        return;
    };
    let root = root();
    for name in EXAMPLES {
        let tmp = tempfile::tempdir().unwrap();
        let model = root.join(format!("examples/{name}.fmoe"));
        let out = tmp.path().join("out");
        emit_core(&model, &out);
        let plan_json = tmp.path().join("plan.json");
        plan_json_to(root, "core_v0.19", &model, &plan_json);
        let text = core_check_args(
            name,
            check_args_launch(&out, &plan_json, &package).env("MOCK_DATA", "1"),
        );
        eprintln!("{}", text.lines().next().unwrap_or(""));
    }
}

/// The tiny example emitted for core_v0.19 in three layouts (its `parallel` block written as a
/// user would) trains in the tree's own pretrain_gpt.py on CPU ranks (gloo, mock data, the
/// generated module through `--spec`): finite losses, the gradient norm above the emitted
/// `--clip-grad` (clipping acts), and a fresh start from the mid-run torch_dist checkpoint gives
/// the uninterrupted run's gradient norms and losses (tests/megatron_core/train_emitted.py).
#[test]
fn core_emitted_tiny_trains_and_resumes_in_pretrain_gpt() {
    let Some(checkout) = std::env::var_os("FMOEC_MEGATRON_CORE_V019") else {
        eprintln!(
            "skipped: set FMOEC_MEGATRON_CORE_V019 to a Megatron-LM checkout at core_v0.19.0"
        );
        return;
    };
    let root = root();
    let tiny = example("tiny");
    for (name, gpus, tensor, pipeline, experts) in [
        ("expert 2", 2, 1, 1, "across data"),
        ("tensor 2 x expert 2", 4, 2, 1, "groups_of(2)"),
        ("pipeline 2", 2, 1, 2, "across data"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let source = format!(
            "use std.hardware.h100_sxm\n{tiny}\nparallel {{\n    gpus     = {gpus} of h100_sxm\n    \
             tensor   = {tensor}\n    pipeline = {pipeline}\n    experts  = {experts}\n}}\n"
        );
        let model = model_file(tmp.path(), "tiny.fmoe", source);
        let out = tmp.path().join("out");
        emit_core(&model, &out);
        let train_sh = std::fs::read_to_string(out.join("train.sh")).unwrap();
        assert!(
            train_sh.contains(&format!("--tensor-model-parallel-size {tensor} "))
                && train_sh.contains(&format!("--pipeline-model-parallel-size {pipeline} "))
                && train_sh.contains(if pipeline == 1 {
                    "--expert-model-parallel-size 2 "
                } else {
                    "--expert-model-parallel-size 1 "
                }),
            "{name}:\n{train_sh}"
        );
        let output = Command::new(core_python())
            .arg(root.join("tests/megatron_core/train_emitted.py"))
            .arg(&out)
            .args(["--nproc", &gpus.to_string()])
            .env("PYTHON", core_python())
            .env("MEGATRON_LM", &checkout)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap();
        let text = all_output(&output);
        assert!(
            output.status.success() && text.contains("TRAIN_EMITTED_OK"),
            "{name}:\n{text}"
        );
        eprintln!("{name}:\n{text}");
    }
}
