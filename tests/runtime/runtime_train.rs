//! Training lowers the loss below the corpus's unigram entropy; a resumed run repeats the
//! uninterrupted one exactly; damaged or mismatched checkpoints are refused, never overwritten.

use crate::runtime_common;

use std::path::Path;

use fmoec::check::{DataSource, GateKind};
use fmoec::runtime::train::{self, RunOptions, RunSummary, SampleOptions};
use tch::Device;

/// These tests train one at a time, as they did in a binary of their own. libtorch's generator
/// itself is guarded by `fmoec::runtime::model::lock_rng`, which the trainer and sampling take
/// around their draws (so a test cannot hold it across `train::run`), and which the tests of
/// the other modules in this binary take for theirs.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    runtime_common::init();
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn options(out: &Path, stop_after: Option<u64>, resume: bool) -> RunOptions {
    RunOptions {
        device: Device::Cpu,
        steps: None,
        stop_after,
        out: out.to_path_buf(),
        checkpoints: out.join("checkpoints"),
        resume: if resume {
            Some(out.join("checkpoints"))
        } else {
            None
        },
        ..RunOptions::default()
    }
}

/// The tests' tiny model with `gate`, training `steps` steps on the embedded corpus.
fn tiny_on_shakespeare(gate: GateKind, steps: u64) -> fmoec::check::Checked {
    runtime_common::tiny_checked(gate, steps, DataSource::Builtin("shakespeare".into()))
}

fn params_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(
        fmoec::runtime::checkpoint::resolve(dir)
            .unwrap()
            .join("model.safetensors"),
    )
    .unwrap()
}

#[test]
fn resume_repeats_the_uninterrupted_run_exactly() {
    let _rng = rng_lock();
    let checked = tiny_on_shakespeare(GateKind::Gshard, 12);
    let a = tempfile::tempdir().unwrap();
    let full: RunSummary = train::train(&checked, &options(a.path(), None, false)).unwrap();
    assert_eq!(full.steps_done, 12);

    let b = tempfile::tempdir().unwrap();
    let first = train::train(&checked, &options(b.path(), Some(7), false)).unwrap();
    assert_eq!(first.steps_done, 7);
    let second = train::train(&checked, &options(b.path(), None, true)).unwrap();
    assert_eq!(second.start_step, 7);
    assert_eq!(second.steps_done, 5);

    let joined: Vec<f64> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(joined, full.losses, "losses differ after resume");
    assert_eq!(
        params_bytes(&a.path().join("checkpoints")),
        params_bytes(&b.path().join("checkpoints")),
        "final parameters differ after resume"
    );

    // A fresh run into a folder with checkpoints is refused instead of overwriting them.
    let err = train::train(&checked, &options(b.path(), None, false)).unwrap_err();
    assert!(
        format!("{err:#}").contains("already holds a finished run (12 of 12 steps)"),
        "{err:#}"
    );

    // Sampling from the checkpoint produces the requested number of bytes.
    let text = train::sample(
        &checked,
        &SampleOptions {
            device: Device::Cpu,
            checkpoint: b.path().join("checkpoints"),
            prompt: "ROMEO:".into(),
            tokens: 20,
            temperature: 0.8,
            top_k: 40,
            seed: 1,
        },
    )
    .unwrap();
    assert!(!text.is_empty());
}

#[test]
fn damaged_or_mismatched_checkpoints_are_refused() {
    let _rng = rng_lock();
    let checked = tiny_on_shakespeare(GateKind::Switch, 2);
    let dir = tempfile::tempdir().unwrap();
    train::train(&checked, &options(dir.path(), None, false)).unwrap();
    let ckpt = fmoec::runtime::checkpoint::resolve(&dir.path().join("checkpoints")).unwrap();

    // a different model
    let other = tiny_on_shakespeare(GateKind::Naive, 2);
    let err = fmoec::runtime::checkpoint::load(&ckpt, &other.model)
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(message.contains("different model"), "{message}");
    // ... and says what differs, from the definition the manifest records
    assert!(
        message.contains("ffn.gate.kind of layer")
            && message.contains("(switch in the checkpoint, naive here)"),
        "{message}"
    );
    // A manifest of older fmoec, without the definition, is refused as before: by hash only.
    let manifest_file = ckpt.join("manifest.json");
    let manifest_text = std::fs::read_to_string(&manifest_file).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&manifest_text).unwrap();
    manifest
        .as_object_mut()
        .unwrap()
        .remove("model_definition")
        .expect("recorded");
    std::fs::write(&manifest_file, serde_json::to_string(&manifest).unwrap()).unwrap();
    let err = fmoec::runtime::checkpoint::load(&ckpt, &other.model)
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("different model") && message.ends_with("…)"),
        "{message}"
    );
    std::fs::write(&manifest_file, manifest_text).unwrap();

    // truncated
    let file = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = train::train(&checked, &options(dir.path(), Some(2), true)).unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");

    // same length, one byte flipped
    let mut flipped = bytes.clone();
    let n = flipped.len() - 3;
    flipped[n] ^= 0x40;
    std::fs::write(&file, &flipped).unwrap();
    let err = fmoec::runtime::checkpoint::load(&ckpt, &checked.model)
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    // the damaged checkpoint is still there, untouched
    assert_eq!(std::fs::read(&file).unwrap(), flipped);
}

/// `examples/tiny.fmoe` (the file's model, its optimizer and schedule; 100 steps of 8 x 128
/// tokens instead of the file's 300 of 16 x 128 to keep CI short) learns well below the
/// corpus's unigram entropy (3.33 nats/byte). Measured on CPU: mean of the last 10 training
/// losses 2.62, held-out loss 2.70.
#[test]
fn tiny_example_learns_below_the_unigram_entropy() {
    let _rng = rng_lock();
    let mut checked = runtime_common::example("tiny.fmoe");
    let t = checked.train.as_mut().expect("tiny.fmoe has a train block");
    t.steps = 100;
    t.batch_sequences = 8;
    let dir = tempfile::tempdir().unwrap();
    let s = train::train(&checked, &options(dir.path(), None, false)).unwrap();
    assert!(
        (s.unigram_entropy.unwrap() - 3.33).abs() < 0.01,
        "unigram entropy {:?}",
        s.unigram_entropy
    );
    let last: f64 = s.losses[s.losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(last < 2.9, "mean of the last 10 losses {last}");
    let eval = s.final_eval_loss.expect("evaluated at the last step");
    assert!(eval < 3.0, "held-out loss {eval}");
    assert!(dir.path().join("plot.png").exists());
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 100);
    let line: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(
        line["moe"].as_array().unwrap().len(),
        2,
        "two MoE layers report telemetry"
    );
    assert!(
        line["moe"][0]["tokens_per_expert"]
            .as_array()
            .unwrap()
            .len()
            == 8
    );
}

/// bf16 compute with fp32 master weights runs on the CPU too (the expert matmuls take the
/// per-expert loop there; CUDA uses grouped matmuls) and keeps the master weights in fp32.
#[test]
fn bf16_training_keeps_fp32_master_weights() {
    let _rng = rng_lock();
    let mut checked = tiny_on_shakespeare(GateKind::Gshard, 3);
    checked.train.as_mut().unwrap().precision = fmoec::check::Precision::Bf16;
    let dir = tempfile::tempdir().unwrap();
    let s = train::train(&checked, &options(dir.path(), None, false)).unwrap();
    assert_eq!(s.losses.len(), 3);
    assert!(s.losses.iter().all(|l| l.is_finite()));
    let st = std::fs::read(
        fmoec::runtime::checkpoint::resolve(&dir.path().join("checkpoints"))
            .unwrap()
            .join("model.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(
        st.tensor("layers.1.ffn.experts.w1").unwrap().dtype(),
        safetensors::Dtype::F32
    );
}

/// Without `micro_batch` in the file a run takes the planner's choice (`fmoec plan
/// --memory-model fmoec` for its layout): the fastest in its estimate (every micro-batch reads
/// the weights once more, so the largest) of those that leave 10% of the GPU's memory free.
#[test]
fn a_free_micro_batch_follows_the_planner() {
    use fmoec::plan::{self, MemoryModel, Overrides};
    let _rng = rng_lock();
    let mut checked = tiny_on_shakespeare(GateKind::Gshard, 1);
    checked.parallel.micro_batch = None;
    // 16 sequences of 64 tokens: the fastest is all 16 in one micro-batch
    let dir = tempfile::tempdir().unwrap();
    let s = train::train(&checked, &options(dir.path(), None, false)).unwrap();
    assert_eq!(s.micro_batch, 16);

    // a GPU that holds 16 sequences' activations with less than 10% to spare, 8 with more
    let memory = |m: u64| {
        let o = Overrides {
            micro_batch: Some(m),
            memory_model: Some(MemoryModel::Fmoec),
            ..Overrides::default()
        };
        plan::build_with(&checked, &o).unwrap().stages[0]
            .cost
            .memory
            .total
    };
    let (eight, sixteen) = (memory(8), memory(16));
    assert!((eight as f64) < 0.9 * sixteen as f64, "{eight} {sixteen}");
    checked.parallel.hardware.memory_bytes = sixteen;
    let dir = tempfile::tempdir().unwrap();
    let s = train::train(&checked, &options(dir.path(), None, false)).unwrap();
    assert_eq!(s.micro_batch, 8);
    assert_eq!(s.steps_done, 1);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["micro_batch"], 8);
}

/// `fmoec run` says which micro-batch the planner chose and why where it splits the batch:
/// examples/tiny.fmoe with 128 sequences a step runs micro-batches of 64 (the largest the
/// planner tries; every micro-batch reads the weights once more).
#[test]
fn the_run_notes_the_planners_micro_batch() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/tiny.fmoe")).unwrap();
    let file = dir.path().join("tiny-128.fmoe");
    std::fs::write(&file, text.replace("16 x 128 tokens", "128 x 128 tokens")).unwrap();
    let out = dir.path().join("run");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .arg("run")
        .arg(&file)
        .args(["--steps", "1", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // the file names no hardware: the planner's default profile
    assert!(
        stderr.contains(
            "note: micro-batch 64 of the 128 sequences per data rank: the planner's fastest of \
             those that leave 10% of the memory of `h100_sxm` free in its estimate (else of those that \
             fit): each micro-batch reads the weights once more; `fmoec plan --memory-model \
             fmoec` shows the estimate"
        ),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["micro_batch"], 64);
}

/// An output path that is a file is refused before anything runs, and left as it was.
#[test]
fn an_output_path_that_is_a_file_is_refused() {
    let _rng = rng_lock();
    let checked = tiny_on_shakespeare(GateKind::Gshard, 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("results");
    std::fs::write(&file, "keep\n").unwrap();
    let err = train::train(&checked, &options(&file, None, false)).unwrap_err();
    assert!(
        format!("{err:#}").contains("the output folder")
            && format!("{err:#}").contains("is a file"),
        "{err:#}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep\n");
}

/// Ctrl-C (SIGINT) during `fmoec run` finishes the step, writes a checkpoint, exits with
/// status 130, and `--resume` continues from that step. Under `--diagnostics json` the one
/// array says so (a warning, W0090), so that a tool reading it learns why the status is 130.
#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_the_run_resumes() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(["run", "examples/tiny.fmoe", "--quiet", "--out", out_s])
        .args(["--diagnostics", "json"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for two logged steps
    let metrics = out.join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no steps logged in 120 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let done = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert_eq!(
        done.status.code(),
        Some(130),
        "{stdout}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let saved = fmoec::runtime::checkpoint::resolve(&out.join("checkpoints")).unwrap();
    let name = saved.file_name().unwrap().to_string_lossy().into_owned();
    let step: u64 = name.trim_start_matches("step-").parse().unwrap();
    assert!(step >= 2, "{name}");
    assert!(
        stdout.contains(&format!("checkpoint {}", saved.display())),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&done.stderr);
    let array: Vec<serde_json::Value> = stderr
        .rfind("\n[\n")
        .and_then(|at| serde_json::from_str(&stderr[at + 1..]).ok())
        .unwrap_or_else(|| panic!("no JSON array at the end of: {stderr}"));
    let said = format!(
        "stopped by SIGINT (Ctrl-C): saved step {step} to `{}`",
        saved.display()
    );
    assert!(
        array.iter().any(|d| d["code"] == "W0090"
            && d["severity"] == "warning"
            && d["message"].as_str().is_some_and(|m| m.starts_with(&said))),
        "{stderr}"
    );

    // one more step from there
    let more = Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args([
            "run",
            "examples/tiny.fmoe",
            "--quiet",
            "--out",
            out_s,
            "--resume",
        ])
        .args(["--stop-after", &(step + 1).to_string()])
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&more.stdout);
    assert!(
        more.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&more.stderr)
    );
    assert!(
        stdout.contains(&format!("steps      {step} -> {} of 300", step + 1)),
        "{stdout}"
    );
}

/// `checkpoint = every(1, keep = 2)`: once a checkpoint is complete the older ones beyond the
/// newest two go, and the folder stays resumable; the folder's other contents are untouched
/// and a deletion left half-done earlier is finished.
#[test]
fn checkpoints_beyond_keep_are_deleted_oldest_first() {
    let _rng = rng_lock();
    let mut checked = tiny_on_shakespeare(GateKind::Gshard, 4);
    let t = checked.train.as_mut().unwrap();
    t.checkpoint.as_mut().unwrap().every = 1;
    t.checkpoint.as_mut().unwrap().keep = 2;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    std::fs::create_dir_all(root.join(".step-00000000.deleting/part")).unwrap();
    std::fs::create_dir_all(root.join("step-notes")).unwrap();
    std::fs::write(root.join("README"), "mine\n").unwrap();
    train::train(&checked, &options(dir.path(), Some(3), false)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "README",
            "latest",
            "step-00000002",
            "step-00000003",
            "step-notes"
        ]
    );
    // resumed to the end: step 4 written, step 2 deleted
    let s = train::train(&checked, &options(dir.path(), None, true)).unwrap();
    assert_eq!((s.start_step, s.steps_done), (3, 1));
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-0"))
        .collect();
    names.sort();
    assert_eq!(names, ["step-00000003", "step-00000004"]);
    assert!(fmoec::runtime::checkpoint::resolve(&root)
        .unwrap()
        .ends_with("step-00000004"));
}

/// `fmoec run FILE` without `--out`, as `bash .ci/train` runs it, works every time in one
/// folder: a finished run is followed by a new one beside it (`runs/tiny-2`, `ckpt/tiny-2`),
/// an unfinished one is continued, each said on stderr, and nothing written before changes.
#[test]
fn running_the_main_command_again_continues_or_starts_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
            .args(["run", file, "--quiet"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
    };
    let (_, said) = run(&["--steps", "2"]);
    assert!(
        said.contains("a new run: metrics in `runs/tiny`, checkpoints in `ckpt/tiny`"),
        "{said}"
    );
    let first = dir.path().join("runs/tiny/metrics.jsonl");
    let first_bytes = std::fs::read(&first).unwrap();

    let (stdout, said) = run(&["--steps", "2"]);
    assert!(
        said.contains("`ckpt/tiny` holds a finished run (2 of 2 steps), so this is a new run beside it: metrics in `runs/tiny-2`, checkpoints in `ckpt/tiny-2`"),
        "{said}"
    );
    assert!(
        stdout.contains("checkpoint ckpt/tiny-2/step-00000002"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(&first).unwrap(),
        first_bytes,
        "the first run's metrics changed"
    );
    assert!(dir
        .path()
        .join("ckpt/tiny/step-00000002/manifest.json")
        .exists());

    // stopped before the end of its schedule: the next run continues it
    run(&["--steps", "3", "--stop-after", "1"]);
    let (stdout, said) = run(&["--steps", "3"]);
    assert!(
        said.contains("continuing the unfinished run in `ckpt/tiny-3` from step 1 of 3"),
        "{said}"
    );
    assert!(stdout.contains("steps      1 -> 3 of 3"), "{stdout}");
}

/// `fmoec ARGS` run in `dir`, its output.
fn fmoec_in<I, S>(dir: &Path, args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `examples/tiny.fmoe` with `replace`'s pairs applied, written into `dir`.
fn tiny_variant(dir: &Path, name: &str, replace: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe"))
            .unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "{from}");
        text = text.replace(from, to);
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// As a cluster job runs it (stderr a log file, not a terminal): progress and evaluation lines
/// reach the log while the run goes on, and the scheduler's SIGTERM finishes the step, writes
/// a checkpoint and exits with 143 (128 + 15), like Ctrl-C does with 130.
#[cfg(unix)]
#[test]
fn as_a_cluster_job_the_log_shows_progress_and_sigterm_checkpoints() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_variant(
        dir.path(),
        "tiny-eval2.fmoe",
        &[(
            "eval       = every(50, batches = 4)",
            "eval       = every(2, batches = 1)",
        )],
    );
    let out = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .arg("run")
        .arg(&file)
        .args(["--log-interval", "0", "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = lines.send(line);
        }
    });
    let start = Instant::now();
    let mut log = Vec::new();
    let wanted = |log: &[String]| {
        log.iter().any(|l| l.starts_with("step 2 of 300 | loss "))
            && log.iter().any(|l| l.starts_with("step 2: eval loss "))
    };
    while !wanted(&log) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no progress in the log after 120 s: {log:?}"
        );
        assert!(child.try_wait().unwrap().is_none(), "ended early: {log:?}");
        if let Ok(line) = seen.recv_timeout(Duration::from_millis(200)) {
            log.push(line);
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the lines came only at the end"
    );
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let done = child.wait_with_output().unwrap();
    reader.join().unwrap();
    log.extend(seen.try_iter());
    let log = log.join("\n");
    assert_eq!(done.status.code(), Some(143), "{log}");
    let saved = fmoec::runtime::checkpoint::resolve(&out.join("checkpoints")).unwrap();
    let name = saved.file_name().unwrap().to_string_lossy().into_owned();
    let step: u64 = name.trim_start_matches("step-").parse().unwrap();
    assert!(step >= 2, "{name}");
    assert!(
        log.contains(&format!("stopped by SIGTERM: saved step {step} to")),
        "{log}"
    );
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        stdout.contains(&format!("steps      0 -> {step} of 300")),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count() as u64, step);
}

/// `--steps 0` is refused as `steps = 0` in the file is, and nothing is written.
/// `--resume` and `--sample` with nothing to read say that nothing is there, not that a
/// missing folder "is not a checkpoint"; a `latest` naming a checkpoint that is gone says
/// which.
#[test]
fn a_missing_checkpoint_is_named_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    for extra in [&["--resume"][..], &["--sample", "ROMEO:"]] {
        let mut args = vec!["run", file, "--out", "fresh"];
        args.extend_from_slice(extra);
        let out = fmoec_in(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("there is no checkpoint at `fresh/checkpoints`: it does not exist"),
            "{extra:?}: {stderr}"
        );
    }
    let root = dir.path().join("ckpt");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("latest"), "step-00000007\n").unwrap();
    let err = fmoec::runtime::checkpoint::resolve(&root).unwrap_err();
    assert!(
        format!("{err:#}").contains("names the checkpoint `step-00000007`, but"),
        "{err:#}"
    );
}

/// Sampling's flags mean nothing to a training run: refused without `--sample`, before
/// anything is read or written; a `--top-k` of 0 is refused in words.
#[test]
fn sampling_flags_need_sample_and_top_k_says_one_or_more() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    for flag in [
        &["--temperature", "0"][..],
        &["--top-k", "3"],
        &["--sample-tokens", "10"],
        &["--sample-seed", "7"],
    ] {
        let mut args = vec!["run", file, "--out", "fresh", "--steps", "1"];
        args.extend_from_slice(flag);
        let out = fmoec_in(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag:?}: {stderr}");
        assert!(stderr.contains("--sample <PROMPT>"), "{flag:?}: {stderr}");
        assert!(!dir.path().join("fresh").exists(), "{flag:?}: wrote a run");
    }
    let out = fmoec_in(
        dir.path(),
        ["run", file, "--sample", "ROMEO:", "--top-k", "0"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be 1 or more, found 0"), "{stderr}");
    assert!(!stderr.contains("9223372036854775807"), "{stderr}");
}

/// Writing a checkpoint (20 s for a large model) says so on rank 0, and how long it took,
/// in the run's lines; `--quiet` keeps them back.
#[test]
fn saving_a_checkpoint_says_so_unless_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    for (out, quiet) in [("said", false), ("quiet", true)] {
        let mut args = vec!["run", file, "--steps", "2", "--ranks", "2", "--out", out];
        if quiet {
            args.push("--quiet");
        }
        let run = fmoec_in(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("checkpoint step"))
            .collect();
        if quiet {
            assert!(lines.is_empty(), "{stderr}");
        } else {
            assert_eq!(lines.len(), 2, "{stderr}");
            assert_eq!(lines[0], "saving checkpoint step 2 ...");
            assert!(
                lines[1].starts_with("saved checkpoint step 2 in "),
                "{stderr}"
            );
        }
    }
}

/// A zero for any count of ranks, nodes or stages is clap's refusal (exit 2), worded alike,
/// before anything is read or written.
#[test]
fn zero_ranks_nodes_gpus_or_stages_are_refused_alike() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    for flag in [
        "--ranks",
        "--nodes",
        "--gpus",
        "--pipeline",
        "--virtual-stages",
    ] {
        let out = fmoec_in(dir.path(), ["run", file, "--out", "fresh", flag, "0"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains("must be 1 or more, found 0"),
            "{flag}: {stderr}"
        );
        assert!(!dir.path().join("fresh").exists(), "{flag}: wrote a run");
    }
}

/// `--steps` shorter than the file's warmup (30 in tiny.fmoe) is noted, not refused; and
/// `--resume` with `--out` says where it continues from, as a run continued without flags does.
#[test]
fn short_steps_note_the_warmup_and_resume_with_out_says_from_which_step() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", file, "--steps", "2", "--out", "r", "--quiet"];
        args.extend_from_slice(extra);
        let out = fmoec_in(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{extra:?}: {stderr}");
        stderr
    };
    let first = run(&["--stop-after", "1"]);
    assert!(
        first.contains(
            "note: the warmup of 30 steps is longer than --steps 2: the learning rate never \
             reaches its peak"
        ),
        "{first}"
    );
    assert!(!first.contains("continuing"), "{first}");
    let resumed = run(&["--resume"]);
    assert!(
        resumed.contains(
            "continuing the unfinished run in `r/checkpoints` from step 1 of 2 (metrics in `r`)"
        ),
        "{resumed}"
    );
}

/// A run whose output pipes close (`fmoec run ... | head`, a log reader that died) keeps
/// training and writes its checkpoint, instead of panicking on its next progress line.
#[test]
fn a_run_whose_output_pipes_close_still_finishes_and_checkpoints() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args([
            "run",
            file,
            "--steps",
            "3",
            "--out",
            "o",
            "--log-interval",
            "0",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let ckpt = dir.path().join("o/checkpoints");
    let latest = std::fs::read_to_string(ckpt.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000003");
    assert!(ckpt.join("step-00000003/manifest.json").exists());
}

/// Options that mean something only with other options are refused alone, with what they
/// need, before anything is written (not ignored, not blamed on an option not given).
#[test]
fn options_that_need_others_say_which() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    for (extra, expected) in [
        (
            &["--virtual-stages", "2"][..],
            "--virtual-stages needs a pipeline of several ranks",
        ),
        (
            &["--master", "127.0.0.1:29500"],
            "--master is for a run over several machines: give --nodes N",
        ),
        (
            &["--node-rank", "1"],
            "--node-rank is for a run over several machines: give --nodes N",
        ),
    ] {
        let mut args = vec!["run", file, "--steps", "2", "--out", "o"];
        args.extend_from_slice(extra);
        let out = fmoec_in(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(!dir.path().join("o").exists(), "{extra:?} wrote `o`");
    }
}

/// A --master port another program listens on: rank 0 cannot serve the rendezvous. The error
/// says so once (the OS's text used to be printed twice) and what to do; nothing is written.
#[test]
fn a_master_port_in_use_is_named_once_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let master = busy.local_addr().unwrap().to_string();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    let args = [
        "run",
        file,
        "--steps",
        "2",
        "--out",
        "o",
        "--ranks",
        "2",
        "--nodes",
        "2",
        "--node-rank",
        "0",
        "--master",
        &master,
        "--collective-timeout",
        "20",
    ];
    let out = fmoec_in(dir.path(), args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("rendezvous at {master}: the port is in use"))
            && stderr.contains("choose a free port for --master"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("in use").count(), 1, "{stderr}");
    assert!(!dir.path().join("o").exists());
}

#[test]
fn steps_zero_on_the_command_line_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    let out = fmoec_in(dir.path(), ["run", file, "--steps", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be >= 1, found 0"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Resuming a checkpoint at or past the end of the schedule trains nothing: an error that
/// says so, not "3 -> 3 of 2" and success. Likewise a `--stop-after` already passed.
#[test]
fn resuming_at_or_past_the_end_of_the_schedule_is_an_error() {
    let _rng = rng_lock();
    let checked = tiny_on_shakespeare(GateKind::Gshard, 3);
    let dir = tempfile::tempdir().unwrap();
    train::train(&checked, &options(dir.path(), None, false)).unwrap();
    let mut shorter = options(dir.path(), None, true);
    shorter.steps = Some(2);
    let err = format!("{:#}", train::train(&checked, &shorter).unwrap_err());
    assert!(
        err.contains("is at step 3, past the end of this run's schedule of 2 steps"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        train::train(&checked, &options(dir.path(), None, true)).unwrap_err()
    );
    assert!(err.contains("finished its run (3 of 3 steps)"), "{err}");
    let mut longer = options(dir.path(), Some(3), true);
    longer.steps = Some(5);
    let err = format!("{:#}", train::train(&checked, &longer).unwrap_err());
    assert!(err.contains("--stop-after 3, but checkpoint"), "{err}");
    // and the checkpoint is still the one of step 3
    assert!(
        fmoec::runtime::checkpoint::resolve(&dir.path().join("checkpoints"))
            .unwrap()
            .ends_with("step-00000003")
    );
}

/// Continuing an older checkpoint in the folder of a run that went further would mix two
/// histories: `latest` and the later checkpoints stay, metrics.jsonl loses their steps, and the
/// new run's checkpoint at a step that exists is silently not written. It is refused before
/// anything changes; continuing it into another folder works.
#[test]
fn resuming_an_older_checkpoint_beside_later_ones_is_refused() {
    let _rng = rng_lock();
    let checked = tiny_on_shakespeare(GateKind::Gshard, 4);
    let dir = tempfile::tempdir().unwrap();
    train::train(&checked, &options(dir.path(), Some(2), false)).unwrap();
    train::train(&checked, &options(dir.path(), None, true)).unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let metrics = std::fs::read(dir.path().join("metrics.jsonl")).unwrap();
    let mut older = options(dir.path(), None, true);
    older.resume = Some(checkpoints.join("step-00000002"));
    older.steps = Some(6);
    let err = format!("{:#}", train::train(&checked, &older).unwrap_err());
    assert!(
        err.contains("holds checkpoints after step 2 (up to step 4)") && err.contains("--out DIR"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("metrics.jsonl")).unwrap(),
        metrics
    );
    assert_eq!(
        std::fs::read_to_string(checkpoints.join("latest")).unwrap(),
        "step-00000004"
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let mut branch = options(elsewhere.path(), None, false);
    branch.resume = older.resume.clone();
    branch.steps = Some(6);
    let summary = train::train(&checked, &branch).unwrap();
    assert_eq!((summary.start_step, summary.steps_done), (2, 4));
}

/// A finished run's folder given again as --out: the refusal names what works (a new folder,
/// or --resume with a longer --steps) instead of sending the user to a plain --resume, which
/// is refused in turn; and `--resume` of it does not first claim to continue an unfinished run.
#[test]
fn a_finished_run_in_out_says_what_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_variant(
        dir.path(),
        "short.fmoe",
        &[
            ("batch      = 16 x 128 tokens", "batch      = 2 x 32 tokens"),
            (
                "eval       = every(50, batches = 4)",
                "eval       = every(50, batches = 1)",
            ),
        ],
    );
    let file = file.to_str().unwrap();
    let run = |extra: &[&str]| {
        let steps = if extra.contains(&"--steps") {
            &[][..]
        } else {
            &["--steps", "2"][..]
        };
        let mut args = vec!["run", file, "--out", "o", "--quiet"];
        args.extend_from_slice(steps);
        args.extend_from_slice(extra);
        let out = fmoec_in(dir.path(), &args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("already holds a finished run (2 of 2 steps); pass --out DIR"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--resume"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("finished its run (2 of 2 steps)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("continuing the unfinished run"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--resume", "--steps", "3"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("continuing the unfinished run in `o/checkpoints` from step 2 of 3"),
        "{stderr}"
    );
}

/// `--resume` keeps the lines of the steps before the checkpoint byte for byte (re-reading
/// and re-writing them changed digits: serde_json's float parsing is not exact), and drops
/// what a crashed run logged after its checkpoint, a torn last line included.
#[test]
fn resume_keeps_the_earlier_metrics_lines_byte_for_byte() {
    let _rng = rng_lock();
    let checked = tiny_on_shakespeare(GateKind::Gshard, 8);
    let dir = tempfile::tempdir().unwrap();
    train::train(&checked, &options(dir.path(), Some(4), false)).unwrap();
    let path = dir.path().join("metrics.jsonl");
    let before = std::fs::read(&path).unwrap();
    assert_eq!(before.split(|&b| b == b'\n').count(), 5);
    // what a run that crashed after step 5 (past its checkpoint of step 4) left behind
    let mut crashed = before.clone();
    crashed.extend_from_slice(b"{\"step\":5,\"loss\":9.0}\n{\"step\":6,\"lo");
    std::fs::write(&path, &crashed).unwrap();
    let s = train::train(&checked, &options(dir.path(), None, true)).unwrap();
    assert_eq!((s.start_step, s.steps_done), (4, 4));
    let after = std::fs::read(&path).unwrap();
    assert_eq!(&after[..before.len()], &before[..], "earlier lines changed");
    let steps: Vec<u64> = String::from_utf8(after)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
}

/// A model that cannot fit this machine is refused before anything is allocated, with the
/// planner's estimate and the machine's free memory, not after minutes in an allocation.
#[cfg(target_os = "linux")]
#[test]
fn a_model_that_does_not_fit_this_machine_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // about 3.3e12 parameters: tens of terabytes with their gradients and Adam moments, on a
    // declared GPU large enough for them (the file's own plan, which `run` checks when it loads
    // the file, passes), so that it is this machine's memory that refuses the run
    let file = tiny_variant(
        dir.path(),
        "huge.fmoe",
        &[
            ("width   = 128", "width   = 16384"),
            ("heads   = 4", "heads   = 128"),
            ("depth   = 4\n", "depth   = 1024\n"),
            (
                "train {",
                "hardware vast_gpu {\n    memory = 1000 * 1000000000000; bf16_tflops = 1000.0; \
                 fp16_tflops = 1000.0; fp32_tflops = 100.0\n    hbm_gbps = 3000.0; nvlink_gbps = 400.0; \
                 network_gbps = 50.0; gpus_per_node = 8\n}\n\nparallel {\n    gpus = 1 of vast_gpu\n}\n\ntrain {",
            ),
        ],
    );
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .arg("run")
        .arg(&file)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("this run does not fit: the planner estimates")
            && stderr.contains("TiB")
            && stderr.contains("but this host has")
            && stderr.contains("available (MemAvailable in /proc/meminfo)"),
        "{stderr}"
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
    assert!(!dir.path().join("runs/tiny/metrics.jsonl").exists());
}

/// `fmoec run` plans once: alone on one device, the plan is the planner's for one GPU of the
/// file's kind (`fmoec plan --world 1 --tensor 1 --pipeline 1 --expert-group replicated
/// --memory-model fmoec`), micro-batch and memory included, also for files written for many
/// GPUs; where the file's GPU cannot hold the model alone it is the same plan without the
/// memory limit, with a note, and the machine's own memory decides.
#[test]
fn a_run_alone_takes_the_planners_plan_for_one_device() {
    use fmoec::check::ExpertGroup;
    use fmoec::plan::{self, MemoryModel, Overrides};
    use fmoec::runtime::distributed::plan_alone;
    let alone = Overrides {
        world: Some(1),
        tensor: Some(1),
        pipeline: Some(1),
        expert_group: Some(ExpertGroup::Replicated),
        micro_batch: None,
        virtual_stages: None,
        memory_model: Some(MemoryModel::Fmoec),
        routing_skew: None,
    };
    let medium = runtime_common::example("gpt2-medium-moe.fmoe");
    let planned = plan::build_with(&medium, &alone).unwrap();
    let run = plan_alone(&medium).unwrap();
    assert_eq!(run.micro_batch, Some(planned.micro_batch));
    assert_eq!(run.memory, vec![planned.stages[0].cost.memory]);
    assert_eq!(run.layout.world, 1);
    assert_eq!(
        run.placements[&1].local_experts(0).len(),
        16,
        "every expert"
    );

    let deepseek = runtime_common::example("deepseek-moe.fmoe");
    let too_big = plan::build_with(&deepseek, &alone).unwrap_err();
    assert!(too_big.iter().all(|d| d.code == "P0009"));
    let run = plan_alone(&deepseek).unwrap();
    let memory = run.memory[0].total;
    assert!(memory > deepseek.parallel.hardware.memory_bytes, "{memory}");
    assert!(
        run.notes
            .iter()
            .any(|n| n.contains("cannot hold this model alone")),
        "{:?}",
        run.notes
    );
}

/// File and folder names with a line break and a tab (legal names; a model file's string can
/// hold them as `\n` and `\t`) are escaped in `run`'s human messages, one line each: a missing
/// data file, and an output folder (`--out`) that is a file. Before, the message broke at the
/// name and its rest started a line of its own.
#[test]
fn names_with_control_characters_are_escaped_in_runs_messages() {
    use std::ffi::OsStr;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_variant(
        dir.path(),
        "odd-data.fmoe",
        &[(
            "builtin(\"tiny-shakespeare\")",
            "text(\"my\\ncorpus\\t1.txt\")",
        )],
    );
    let missing = fmoec_in(dir.path(), [OsStr::new("run"), model.as_os_str()]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(r"`my\ncorpus\t1.txt`"),
        "the data file's name, escaped:\n{stderr}"
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with("corpus")),
        "a raw line break in the name:\n{stderr}"
    );

    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe");
    let in_the_way = dir.path().join("runs\nof\ttoday");
    std::fs::write(&in_the_way, "keep\n").unwrap();
    let refused = fmoec_in(
        dir.path(),
        [
            OsStr::new("run"),
            OsStr::new(tiny),
            OsStr::new("--out"),
            in_the_way.as_os_str(),
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    let shown = format!("{}/runs\\nof\\ttoday", dir.path().display());
    assert!(
        stderr.contains(&format!(
            "the output folder `{shown}` is a file, not a folder"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with("of\t")),
        "a raw line break in the name:\n{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&in_the_way).unwrap(), "keep\n");
}

/// `--trace` where it cannot record: a run of several ranks, `--trace-steps` alone, and (in a
/// build without the `cuda` feature, which holds the profiler's shim) any run. Each is refused
/// before the run writes anything.
#[test]
fn trace_is_refused_where_it_cannot_record() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = format!("{}/examples/tiny.fmoe", env!("CARGO_MANIFEST_DIR"));
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
            .args(["run", &tiny, "--steps", "1", "--quiet", "--out"])
            .arg(&out)
            .args(extra)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["--ranks", "2", "--trace"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--trace records a run in one process"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--trace-steps", "3"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--trace"), "{stderr}");
    #[cfg(not(feature = "cuda"))]
    {
        let (code, stderr) = run(&["--trace"]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains("--trace needs fmoec built with `--features cuda`"),
            "{stderr}"
        );
    }
    assert!(!out.join("metrics.jsonl").exists());
}

/// `fmoec run` checks the file's memory with its own model (fused attention: no scores), not
/// Megatron-LM v2.2's that `fmoec check` and `emit` use: on a 128 MiB GPU, micro-batches of 16
/// sequences fit the runtime (about 109 MiB) but not Megatron (about 143 MiB with the scores).
/// `check` refuses the file and says whose estimate that is; `run` trains it.
#[test]
fn run_checks_memory_with_its_own_model_not_megatrons() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_variant(
        dir.path(),
        "small-gpu.fmoe",
        &[
            ("steps      = 300", "steps      = 1"),
            ("checkpoint = every(100, dir = \"ckpt/tiny\")", "checkpoint = none"),
            ("eval       = every(50, batches = 4)", "eval       = none"),
            (
                "train {",
                "hardware small_gpu {\n    memory = 128 * 1048576; bf16_tflops = 10.0; \
                 fp16_tflops = 10.0; fp32_tflops = 1.0\n    hbm_gbps = 100.0; nvlink_gbps = 10.0; \
                 network_gbps = 1.0; gpus_per_node = 1\n}\n\nparallel {\n    gpus = 1 of small_gpu\n    \
                 micro_batch = 16\n}\n\ntrain {",
            ),
        ],
    );
    let check = fmoec_in(dir.path(), ["check".as_ref(), file.as_os_str()]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error[P0009]")
            && stderr.contains("the estimate is of Megatron-LM v2.2 training's memory")
            && stderr.contains("`fmoec plan --memory-model fmoec` estimates `fmoec run`'s"),
        "{stderr}"
    );
    let run = fmoec_in(
        dir.path(),
        ["run".as_ref(), file.as_os_str(), "--quiet".as_ref()],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("P0009"), "{stderr}");
    let metrics = std::fs::read_to_string(dir.path().join("runs/tiny/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
}

/// `fp8_fallbacks` of `fmoec plan --format json --memory-model fmoec FILE EXTRA`.
fn planned_fp8_fallbacks(file: &Path, extra: &[&str]) -> fmoec::plan::cost::Fp8Fallbacks {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(["plan", "--format", "json", "--memory-model", "fmoec"])
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let f = &plan["fp8_fallbacks"];
    let blocks = |key: &str| -> Vec<usize> {
        f[key]
            .as_array()
            .unwrap_or_else(|| panic!("no fp8_fallbacks.{key}: {stdout}"))
            .iter()
            .map(|b| b.as_u64().unwrap() as usize)
            .collect()
    };
    fmoec::plan::cost::Fp8Fallbacks {
        experts: blocks("experts"),
        weight_gradients: blocks("weight_gradients"),
        attention: blocks("attention"),
        mlps: blocks("mlps"),
        head: f["head"].as_bool().unwrap(),
    }
}

/// `fmoec plan`'s options for the one-device layout `fmoec run` takes alone.
const ALONE: &[&str] = &[
    "--world",
    "1",
    "--tensor",
    "1",
    "--pipeline",
    "1",
    "--expert-group",
    "replicated",
];

/// `fmoec run` under `precision = fp8` (on the CPU's emulation) keeps in bf16 what `fmoec plan`
/// says for the run's layout (`fp8_fallbacks` in its JSON), and says so: examples/tiny.fmoe
/// alone with `--precision fp8` (the MoE layers' experts fall back), and with `--precision
/// fp8-dense` on 2 ranks of 2 pipeline stages (the dense modules fall back too; rank 0 names
/// those of both stages). The plans are of the file with the flag's precision written in.
#[test]
fn the_runs_fp8_fallbacks_are_the_plans() {
    let dir = tempfile::tempdir().unwrap();
    let fp32 = tiny_variant(dir.path(), "tiny.fmoe", &[]);
    let cases: [(&str, &str, &[&str], &[&str]); 2] = [
        ("fp8", "precision  = fp8", &[], ALONE),
        (
            "fp8-dense",
            "precision  = fp8\n    fp8_dense = true",
            &["--ranks", "2", "--pipeline", "2"],
            &["--world", "2", "--pipeline", "2"],
        ),
    ];
    for (flag, written, layout, plan_layout) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
            .arg("run")
            .arg(&fp32)
            .args(["--precision", flag, "--steps", "1", "--quiet", "--out"])
            .arg(dir.path().join(flag))
            .args(layout)
            .env("FMOEC_FP8_EMULATE", "1")
            .env_remove("FMOEC_FP8_EXPERTS")
            .env_remove("FMOEC_FP8_DENSE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        let file = tiny_variant(
            dir.path(),
            &format!("tiny-{flag}.fmoe"),
            &[("precision  = fp32", written)],
        );
        let planned = planned_fp8_fallbacks(&file, plan_layout);
        assert!(!planned.experts.is_empty(), "{flag}: {planned:?}");
        let experts = format!(
            "note: precision = fp8: the experts of layer(s) {:?} stay in bf16, where",
            planned.experts
        );
        assert!(stderr.contains(&experts), "{flag}: {experts}\n{stderr}");
        match planned.dense_modules() {
            Some(modules) => {
                let dense = format!("note: fp8_dense: bf16 operands for {modules}, where");
                assert!(stderr.contains(&dense), "{flag}: {dense}\n{stderr}");
            }
            None => assert!(!stderr.contains("note: fp8_dense"), "{flag}: {stderr}"),
        }
        assert_eq!(flag == "fp8-dense", planned.dense_modules().is_some());
        assert_eq!(
            stderr.matches("note: precision = fp8:").count(),
            1,
            "{stderr}"
        );
    }
}

/// The examples `examples/` has with the file's `precision` set to fp8 (`fp8_dense` too with
/// `dense`), written into `dir`, and checked.
fn fp8_example(dir: &Path, name: &str, dense: bool) -> (std::path::PathBuf, fmoec::check::Checked) {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let written = if dense {
        "precision  = fp8\n    fp8_dense = true"
    } else {
        "precision  = fp8"
    };
    assert!(text.contains("precision  = bf16"), "{name}");
    let text = text.replace("precision  = bf16", written);
    let file = dir.join(name);
    std::fs::write(&file, &text).unwrap();
    let mut sources = fmoec::diag::Sources::new();
    let id = sources.add(file.display().to_string(), text);
    let mut sink = fmoec::diag::Sink::new();
    let checked = fmoec::check::check_file(&mut sources, id, &mut sink);
    assert_eq!(sink.error_count(), 0, "{name}");
    (file, checked.unwrap())
}

/// The runs of larger examples take the FP8 fallbacks `fmoec plan` prints for their layouts
/// (too large to train here: the run's plan, as `fmoec run` makes it, against the command's):
/// GPT-2-medium-MoE under fp8 (its MoE layers' experts fall back) on its 8 ranks (tensor 2,
/// sliced experts over 4 data ranks) and alone; DeepSeek-MoE under fp8_dense (its attention
/// projections, shared experts and head fall back too) on its 16 ranks (alone it does not fit
/// a GPU, which `fmoec plan` refuses).
#[test]
fn the_examples_runs_take_the_plans_fp8_fallbacks() {
    use fmoec::runtime::distributed::{plan_alone, plan_world_layout, LayoutChoice};
    let dir = tempfile::tempdir().unwrap();
    for (name, dense, runs_alone) in [
        ("gpt2-medium-moe.fmoe", false, true),
        ("deepseek-moe.fmoe", true, false),
    ] {
        let (file, checked) = fp8_example(dir.path(), name, dense);
        let (model, hw) = (&checked.model, &checked.parallel.hardware);
        let seq_len = checked.train.as_ref().unwrap().seq_len;
        let gpus = checked.parallel.gpus;
        let mut runs = vec![(
            plan_world_layout(&checked, gpus, LayoutChoice::default()).unwrap(),
            planned_fp8_fallbacks(&file, &[]),
        )];
        if runs_alone {
            runs.push((
                plan_alone(&checked).unwrap(),
                planned_fp8_fallbacks(&file, ALONE),
            ));
        }
        for (plan, planned) in runs {
            let tokens = plan.micro_batch.unwrap() * seq_len;
            let run = plan.fp8_fallbacks_for(model, hw, dense, tokens);
            assert_eq!(run, planned, "{name}");
            assert!(!planned.experts.is_empty(), "{name}: {planned:?}");
            assert_eq!(
                planned.dense_modules().is_some(),
                dense,
                "{name}: {planned:?}"
            );
        }
    }
}

/// A run whose plan the planner did not make (a library caller's `WorldPlan::data_parallel`)
/// takes the planner's rule for its layout: the fallbacks the planner gives the same layout at
/// the same micro-batch (examples/tiny.fmoe under fp8_dense, alone and with its experts over
/// 2 ranks).
#[test]
fn a_plan_made_without_the_planner_takes_the_planners_fp8_rule() {
    use fmoec::check::{ExpertGroup, Precision};
    use fmoec::runtime::distributed::{plan_alone, plan_world, WorldPlan};
    let mut checked = runtime_common::example("tiny.fmoe");
    checked.train.as_mut().unwrap().precision = Precision::Fp8 { dense: true };
    let (model, hw) = (&checked.model, &checked.parallel.hardware);
    let seq_len = checked.train.as_ref().unwrap().seq_len;
    for (ranks, planned) in [
        (1, plan_alone(&checked).unwrap()),
        (
            2,
            plan_world(&checked, 2, Some(ExpertGroup::Size { size: 2 })).unwrap(),
        ),
    ] {
        let bare = WorldPlan::data_parallel(&checked, ranks, ranks).unwrap();
        assert_eq!(bare.fp8_fallbacks, None);
        let tokens = planned.micro_batch.unwrap() * seq_len;
        let expected = planned.fp8_fallbacks.clone().unwrap();
        assert!(
            !expected.experts.is_empty() && expected.head,
            "{expected:?}"
        );
        assert_eq!(bare.fp8_fallbacks_for(model, hw, true, tokens), expected);
    }
}

/// The overrides go on top of the plan's fallbacks: `all` keeps nothing in bf16 (but an LM head
/// whose widths are not multiples of 16), `none` everything the precision covers; without
/// `fp8_dense` no dense module is listed; the environment's variables say the same as the
/// thread's settings.
#[test]
fn fp8_overrides_go_on_top_of_the_plans_fallbacks() {
    use fmoec::plan::cost::Fp8Fallbacks;
    use fmoec::runtime::fp8::{
        force_dense_on_this_thread, force_experts_on_this_thread,
        force_weight_grads_on_this_thread, with_overrides, Fp8Use,
    };
    let mut model = runtime_common::example("tiny.fmoe").model;
    let planned = Fp8Fallbacks {
        experts: vec![3],
        weight_gradients: vec![1],
        attention: vec![0],
        mlps: vec![2],
        head: false,
    };
    let dense = Fp8Use {
        experts: true,
        dense: true,
    };
    let settings = |e: Option<bool>, d: Option<bool>, model: &fmoec::check::Model, fp8: Fp8Use| {
        force_experts_on_this_thread(e);
        force_dense_on_this_thread(d);
        let f = with_overrides(&planned, model, fp8);
        force_experts_on_this_thread(None);
        force_dense_on_this_thread(None);
        f
    };
    assert_eq!(settings(None, None, &model, dense), planned);
    // the weight gradients keep the plan's choice (their own setting is below)
    assert_eq!(
        settings(Some(true), Some(true), &model, dense),
        Fp8Fallbacks {
            weight_gradients: vec![1],
            ..Fp8Fallbacks::default()
        }
    );
    let none = Fp8Fallbacks {
        experts: vec![1, 3],
        weight_gradients: vec![],
        attention: vec![0, 1, 2, 3],
        mlps: vec![0, 2],
        head: true,
    };
    assert_eq!(settings(Some(false), Some(false), &model, dense), none);
    // one override leaves the other half as planned
    let experts_all = Fp8Fallbacks {
        experts: vec![],
        ..planned.clone()
    };
    assert_eq!(settings(Some(true), None, &model, dense), experts_all);
    // without fp8_dense nothing dense is listed, whatever the dense setting
    let experts_only = Fp8Use {
        experts: true,
        dense: false,
    };
    let only = Fp8Fallbacks {
        experts: vec![3],
        weight_gradients: vec![1],
        ..Fp8Fallbacks::default()
    };
    assert_eq!(settings(None, Some(false), &model, experts_only), only);
    // the weight gradients: FP8 operands in every MoE layer, or in none; nothing listed
    // where no experts take FP8
    let grads = |all: Option<bool>, fp8: Fp8Use| {
        force_weight_grads_on_this_thread(all);
        let f = with_overrides(&planned, &model, fp8);
        force_weight_grads_on_this_thread(None);
        f.weight_gradients
    };
    assert_eq!(grads(Some(true), dense), Vec::<usize>::new());
    assert_eq!(grads(Some(false), dense), vec![1]);
    let no_experts = Fp8Use {
        experts: false,
        dense: true,
    };
    assert_eq!(grads(None, no_experts), Vec::<usize>::new());
    // a head of 250 columns cannot take FP8 even when forced
    model.vocab = 250;
    assert!(settings(None, Some(true), &model, dense).head);
    // the environment's `all` / `none`, in a process of its own
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .arg("run")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.fmoe"))
        .args([
            "--precision",
            "fp8-dense",
            "--steps",
            "1",
            "--quiet",
            "--out",
        ])
        .arg(tempfile::tempdir().unwrap().path().join("run"))
        .env("FMOEC_FP8_EMULATE", "1")
        .env("FMOEC_FP8_EXPERTS", "all")
        .env("FMOEC_FP8_DENSE", "none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("note: precision = fp8:"), "{stderr}");
    assert!(
        stderr.contains(
            "note: fp8_dense: bf16 operands for the attention projections of blocks [0, 1, 2, 3], \
             the MLPs of blocks [0, 2] and the LM head, where"
        ),
        "{stderr}"
    );
}
