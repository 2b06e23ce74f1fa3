//! `fmoec run`: command-line arguments, and the edge between them and [`super::train`].

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::bail;

use crate::check::{Checked, ExpertGroup, Precision};
use crate::collective::rendezvous::DistEnv;
use crate::driver::{self, DiagFormat};
use crate::runtime::distributed::{self, WorldPlan};
use crate::runtime::folders::Series;
use crate::runtime::stop;
use crate::runtime::train::{self, RunOptions, RunSummary, SampleOptions};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The model file (with a `train` block).
    pub file: PathBuf,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
    /// Where to run: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Total training steps (the schedule's length, at least 1); default: the file's `steps`.
    #[arg(long, value_parser = at_least_one)]
    pub steps: Option<u64>,
    /// Stop with a checkpoint after this many completed steps, keeping the schedule of `--steps`.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Continue from a checkpoint: a `step-*` directory, or (without a value) the latest one in
    /// the run's checkpoint folder.
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    pub resume: Option<Option<PathBuf>>,
    /// Output folder for metrics.jsonl, summary.json, plot.png and checkpoints/ (default:
    /// `runs/<model name>`, with checkpoints in the train block's `checkpoint` dir if it names one).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Generate text after PROMPT from the latest checkpoint (or `--resume DIR`) instead of training.
    #[arg(long, value_name = "PROMPT")]
    pub sample: Option<String>,
    /// Bytes to generate with `--sample`.
    #[arg(long, default_value_t = 400)]
    pub sample_tokens: usize,
    /// Sampling temperature (0 picks the most likely byte).
    #[arg(long, default_value_t = 0.8, value_parser = non_negative)]
    pub temperature: f64,
    /// Sample among the k most likely bytes (1 or more).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(i64).range(1..))]
    pub top_k: i64,
    /// Seed for `--sample`.
    #[arg(long, default_value_t = 0)]
    pub sample_seed: u64,
    /// Override the train block's precision (`fp32`, or `bf16` compute with fp32 master weights).
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// No progress bar and no progress lines (evaluations, notes and the summary still print).
    #[arg(long)]
    pub quiet: bool,
    /// When stderr is not a terminal (a log file, a pipe, a cluster job), progress goes there as
    /// plain lines instead of a bar: after the first step, then at most every SECS seconds,
    /// and after the last step (0: every step).
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = non_negative_seconds)]
    pub log_interval: f64,
    /// Run every micro-batch eagerly, op by op. By default a run on one GPU captures one
    /// training micro-batch (forward and backward) as a CUDA graph after a warm-up micro-batch
    /// and replays it for the others (the same kernels, without the CPU launching each).
    #[arg(long)]
    pub no_cuda_graph: bool,
    /// Train on N GPUs of this machine: one process per GPU, NCCL between them (needs a build
    /// with `--features cuda`). Overrides the file's `gpus` as `fmoec plan --world` does.
    /// Started by torchrun (RANK, WORLD_SIZE, ... set), fmoec runs as that rank instead.
    #[arg(long, value_name = "N", conflicts_with = "ranks")]
    pub gpus: Option<u64>,
    /// Train on N in-process ranks (threads, CPU): the multi-GPU code path without GPUs.
    #[arg(long, value_name = "N")]
    pub ranks: Option<u64>,
    /// Override the expert group with several ranks: `data` (every data rank shares the
    /// experts), `replicated` (every rank holds every expert) or a size dividing the world.
    #[arg(long, value_name = "data|replicated|N", value_parser = parse_expert_group)]
    pub expert_group: Option<ExpertGroup>,
    /// Override the file's tensor-parallel size (like `fmoec plan --tensor`): ranks that
    /// split every layer's attention heads and MLP columns (and, with `expert_slicing`, the
    /// experts' hidden columns); the world is tensor x data. Needs several ranks.
    #[arg(long, value_name = "N")]
    pub tensor: Option<u64>,
    /// Seconds a collective may wait for the other ranks before the run stops with an error.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub collective_timeout: f64,
}

fn parse_expert_group(s: &str) -> Result<ExpertGroup, String> {
    match s {
        "data" => Ok(ExpertGroup::AcrossData),
        "replicated" => Ok(ExpertGroup::Replicated),
        n => match n.parse::<u64>() {
            Ok(size) if size > 0 => Ok(ExpertGroup::Size { size }),
            _ => Err(format!(
                "expected `data`, `replicated` or a positive number, found `{n}`"
            )),
        },
    }
}

/// How this process takes part in the run.
enum Mode {
    /// One device, no collectives.
    Single,
    /// N ranks on threads of this process.
    InProcess(u64),
    /// Start N processes (one per GPU) and wait for them.
    Launch(u64),
    /// One rank of a multi-process run (started by `--gpus` or torchrun).
    Rank(DistEnv),
}

fn mode(args: &RunArgs) -> anyhow::Result<Mode> {
    let env = DistEnv::from_env()?.filter(|e| e.world > 1);
    if let Some(n) = args.ranks {
        if n == 0 {
            bail!("--ranks must be at least 1");
        }
        if env.is_some() {
            bail!("--ranks runs every rank in this process; it cannot be one rank of a launched run (unset RANK and WORLD_SIZE)");
        }
        if args.device != "cpu" {
            bail!(
                "--ranks N runs in-process ranks on the CPU (--device cpu); for GPUs use --gpus N"
            );
        }
        return Ok(if n == 1 {
            Mode::Single
        } else {
            Mode::InProcess(n)
        });
    }
    match (args.gpus, env) {
        (Some(0), _) => bail!("--gpus must be at least 1"),
        (Some(n), Some(env)) => {
            if env.world as u64 != n {
                bail!("--gpus {n} but WORLD_SIZE is {}", env.world);
            }
            Ok(Mode::Rank(env))
        }
        (None, Some(env)) => Ok(Mode::Rank(env)),
        (Some(1), None) | (None, None) => Ok(Mode::Single),
        (Some(n), None) => Ok(Mode::Launch(n)),
    }
}

/// Whether this process speaks for the run: not the ranks 1.. of a launched run, and not
/// the launcher itself (its rank 0 speaks).
fn is_first_rank(mode: &Mode) -> bool {
    match mode {
        Mode::Rank(env) => env.rank == 0,
        Mode::Single | Mode::InProcess(_) => true,
        Mode::Launch(_) => false,
    }
}

/// `--precision` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Bf16,
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let loaded = match driver::load(&args.file, args.diagnostics) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let mut checked = loaded.checked.clone();
    if let (Some(p), Some(train)) = (args.precision, checked.train.as_mut()) {
        train.precision = match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Bf16 => Precision::Bf16,
        };
    }
    let checked = &checked;
    let mode = mode(args)?;
    if args.sample.is_some() && !matches!(mode, Mode::Single) {
        bail!("--sample runs on one device; leave out --gpus/--ranks");
    }
    let timeout = Duration::try_from_secs_f64(args.collective_timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| {
            anyhow::anyhow!("--collective-timeout must be a positive number of seconds")
        })?;
    let device_name = match (&mode, args.gpus, args.device.as_str()) {
        (Mode::Single, Some(1), "cpu") => "cuda",
        _ => args.device.as_str(),
    };
    let device = match mode {
        Mode::Single | Mode::InProcess(_) => super::parse_device(device_name)?,
        _ => tch::Device::Cpu,
    };
    // Said first: what follows (the planner's layout and its batch split) depends on it.
    let world = match &mode {
        Mode::Single => 1,
        Mode::InProcess(n) | Mode::Launch(n) => *n,
        Mode::Rank(env) => env.world as u64,
    };
    let tensor = args.tensor.unwrap_or(checked.parallel.tensor);
    let pipeline_note =
        distributed::pipeline_note(checked, world, if world == 1 { 1 } else { tensor });
    if let (Some(note), true) = (
        &pipeline_note,
        is_first_rank(&mode) && args.sample.is_none(),
    ) {
        eprintln!("note: {note}");
    }
    if checked.train.is_none() && args.sample.is_none() {
        bail!(
            "`{}` has no `train` block: `fmoec run` needs one (data, batch, steps, optimizer)",
            checked.model.name
        );
    }
    // `--out` puts everything under one folder; without it, checkpoints go where the train
    // block's `checkpoint = every(n, dir = ...)` says, the rest to `runs/<model>`, and a
    // second run of the file continues the first or starts the next beside it.
    let declared_dir = checked
        .train
        .as_ref()
        .and_then(|t| t.checkpoint.as_ref())
        .map(|c| PathBuf::from(&c.dir));
    let series = Series::new("runs", &checked.model.name, declared_dir);
    let (out, checkpoints, resume) = match (&args.out, &args.resume) {
        (Some(out), resume) => {
            let checkpoints = out.join("checkpoints");
            let resume = resume
                .as_ref()
                .map(|p| p.clone().unwrap_or_else(|| checkpoints.clone()));
            (out.clone(), checkpoints, resume)
        }
        (None, Some(dir)) => {
            let newest = series.newest_folders();
            let resume = dir.clone().unwrap_or_else(|| newest.checkpoints.clone());
            (newest.out, newest.checkpoints, Some(resume))
        }
        (None, None) if args.sample.is_some() => {
            let newest = series.newest_folders();
            (newest.out, newest.checkpoints, None)
        }
        (None, None) => {
            let total = args
                .steps
                .or(checked.train.as_ref().map(|t| t.steps))
                .unwrap_or_default();
            let choice = series.choose(total);
            if is_first_rank(&mode) {
                eprintln!("{}", choice.describe());
            }
            let folders = choice.folders().clone();
            let resume = choice.resumes().then(|| folders.checkpoints.clone());
            (folders.out, folders.checkpoints, resume)
        }
    };

    if let Some(prompt) = &args.sample {
        let text = train::sample(
            checked,
            &SampleOptions {
                device,
                checkpoint: resume.unwrap_or(checkpoints),
                prompt: prompt.clone(),
                tokens: args.sample_tokens,
                temperature: args.temperature,
                top_k: args.top_k,
                seed: args.sample_seed,
            },
        )?;
        println!("{prompt}{text}");
        return Ok(ExitCode::SUCCESS);
    }

    let opts = RunOptions {
        device,
        steps: args.steps,
        stop_after: args.stop_after,
        out,
        checkpoints,
        resume,
        progress: !args.quiet,
        log_interval: Duration::from_secs_f64(args.log_interval),
        print_summary: true,
        cuda_graph: !args.no_cuda_graph,
    };
    let launcher = matches!(mode, Mode::Launch(_));
    let plan_for = |world: u64| -> Result<WorldPlan, ExitCode> {
        distributed::plan_world_with(checked, world, args.expert_group, args.tensor).map_err(
            |diags| {
            if let (Some(note), true) = (&pipeline_note, launcher) {
                eprintln!("note: {note}");
            }
            driver::report(&loaded.sources, &diags, args.diagnostics);
            if args.diagnostics == DiagFormat::Human {
                let tensor = args.tensor.unwrap_or(checked.parallel.tensor);
                eprintln!(
                    "error: `{}` cannot run on {world} ranks with tensor = {tensor} (the planner's errors above){}",
                    args.file.display(),
                    if tensor > 1 && args.tensor.is_none() {
                        "; --tensor 1 runs without tensor parallelism"
                    } else {
                        ""
                    }
                );
            }
            ExitCode::from(1)
        },
        )
    };
    let summary = match mode {
        Mode::Single => {
            if args.expert_group.is_some() {
                bail!("--expert-group needs several ranks (--gpus N or --ranks N)");
            }
            if args.tensor.is_some_and(|t| t != 1) {
                bail!("--tensor needs several ranks (--gpus N or --ranks N)");
            }
            let plan = match distributed::plan_alone(checked) {
                Ok(p) => p,
                Err(diags) => {
                    driver::report(&loaded.sources, &diags, args.diagnostics);
                    if args.diagnostics == DiagFormat::Human {
                        eprintln!(
                            "error: `{}` cannot run on one device (the planner's errors above)",
                            args.file.display()
                        );
                    }
                    return Ok(ExitCode::from(1));
                }
            };
            train::train_alone(checked, &opts, &plan)?
        }
        Mode::InProcess(n) => {
            let plan = match plan_for(n) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let mut summaries = distributed::run_in_process(checked, &opts, &plan, timeout)?;
            summaries.swap_remove(0)
        }
        Mode::Launch(n) => {
            if let Err(code) = plan_for(n) {
                return Ok(code);
            }
            return launch(n, checked);
        }
        Mode::Rank(env) => {
            let plan = match plan_for(env.world as u64) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            return run_rank(checked, &opts, plan, &env, timeout);
        }
    };
    Ok(exit_code(&summary))
}

/// 0, or 128 + the signal that stopped the run (130 for Ctrl-C, 143 for SIGTERM).
fn exit_code(summary: &RunSummary) -> ExitCode {
    match summary.signal {
        Some(signal) => ExitCode::from(stop::exit_status(signal)),
        None if summary.interrupted => ExitCode::from(130),
        None => ExitCode::SUCCESS,
    }
}

#[cfg(not(feature = "cuda"))]
fn launch(n: u64, _: &Checked) -> anyhow::Result<ExitCode> {
    bail!(
        "--gpus {n} needs NCCL, and this fmoec was built without the `cuda` feature; rebuild with `cargo build --release --features cuda`, or use --ranks {n} for in-process CPU ranks"
    )
}

#[cfg(feature = "cuda")]
fn launch(n: u64, _: &Checked) -> anyhow::Result<ExitCode> {
    use crate::collective::launch::{spawn_local, Launch};
    use crate::collective::nccl::NcclLibrary;
    let visible = tch::Cuda::device_count();
    if n as i64 > visible {
        bail!("--gpus {n} but this machine shows {visible} CUDA device(s)");
    }
    let library = NcclLibrary::for_ranks()?;
    let program = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let launch = Launch {
        env: library.env.clone(),
        stop_signal: Some(stop::requested),
        ..Launch::default()
    };
    // Ctrl-C reaches the ranks (same process group); a SIGTERM sent to the launcher alone
    // (a scheduler's) is passed on to them. They checkpoint and stop together, and the
    // launcher waits for them instead of dying first.
    stop::install();
    let outcome = spawn_local(n as usize, program, &args, &launch)?;
    if let Some(text) = outcome.describe() {
        eprintln!("fmoec run: {text}");
    }
    Ok(ExitCode::from(outcome.exit_code().clamp(0, 255) as u8))
}

#[cfg(not(feature = "cuda"))]
fn run_rank(
    _: &Checked,
    _: &RunOptions,
    _: WorldPlan,
    env: &DistEnv,
    _: Duration,
) -> anyhow::Result<ExitCode> {
    bail!(
        "started as rank {} of {} (RANK/WORLD_SIZE are set), but this fmoec was built without the `cuda` feature (NCCL); rebuild with `--features cuda`, or unset them and use --ranks N on CPUs",
        env.rank,
        env.world
    )
}

#[cfg(feature = "cuda")]
fn run_rank(
    checked: &Checked,
    opts: &RunOptions,
    plan: WorldPlan,
    env: &DistEnv,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    use crate::collective::nccl;
    let (groups, device) = if plan.tensor_size() > 1 {
        nccl::connect_tensor_parallel(&plan.layout, &plan.tensor, env, timeout)?
    } else {
        nccl::connect(&plan.layout, env, timeout)?
    };
    let ctx = distributed::RankContext {
        groups,
        plan,
        device,
        timeout,
    };
    let mut opts = opts.clone();
    opts.device = device;
    let summary = train::train_ranked(checked, &opts, &ctx)?;
    Ok(exit_code(&summary))
}

/// A whole number >= 1 (`--steps`, like `steps` in the file).
fn at_least_one(v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(0) => Err("must be >= 1, found 0 (the number of training steps)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite number of seconds >= 0 (`--log-interval`).
fn non_negative_seconds(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(_) => Err("must be a number of seconds >= 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite number >= 0 (`--temperature`).
fn non_negative(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(_) => Err("must be a number >= 0 (0 picks the most likely byte)".into()),
        Err(e) => Err(e.to_string()),
    }
}
