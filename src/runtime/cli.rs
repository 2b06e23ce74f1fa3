//! `fmoec run`: command-line arguments, and the edge between them and [`super::train`].

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::bail;

use crate::check::{Checked, ExpertGroup, Precision};
use crate::collective::rendezvous::DistEnv;
use crate::driver::{self, DiagFormat};
use crate::runtime::distributed::{self, WorldPlan};
use crate::runtime::train::{self, RunOptions, SampleOptions};

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
    /// Total training steps (the schedule's length); default: the file's `steps`.
    #[arg(long)]
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
    /// Override the train block's precision (`fp32`; `bf16` compute with fp32 master weights;
    /// `fp8`: bf16 with the experts' matmuls in FP8, on Hopper GPUs; `fp8-dense`: the dense
    /// matmuls in FP8 too).
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
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

/// `--precision` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Bf16,
    /// bf16 with the routed experts' matmuls in FP8 (`precision = fp8`).
    Fp8,
    /// fp8 with the dense matmuls in FP8 too (`precision = fp8` and `fp8_dense = true`).
    Fp8Dense,
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
            PrecisionArg::Fp8 => Precision::Fp8 { dense: false },
            PrecisionArg::Fp8Dense => Precision::Fp8 { dense: true },
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
    // `--out` puts everything under one folder; without it, checkpoints go where the train
    // block's `checkpoint = every(n, dir = ...)` says, the rest to `runs/<model>`.
    let declared_dir = checked
        .train
        .as_ref()
        .and_then(|t| t.checkpoint.as_ref())
        .map(|c| PathBuf::from(&c.dir));
    let (out, checkpoints) = match (&args.out, declared_dir) {
        (Some(out), _) => (out.clone(), out.join("checkpoints")),
        (None, Some(dir)) => (PathBuf::from("runs").join(&checked.model.name), dir),
        (None, None) => {
            let out = PathBuf::from("runs").join(&checked.model.name);
            let ckpt = out.join("checkpoints");
            (out, ckpt)
        }
    };
    let resume = args
        .resume
        .as_ref()
        .map(|p| p.clone().unwrap_or_else(|| checkpoints.clone()));

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
        print_summary: true,
        cuda_graph: !args.no_cuda_graph,
    };
    let plan_for = |world: u64| -> Result<WorldPlan, ExitCode> {
        distributed::plan_world_with(checked, world, args.expert_group, args.tensor).map_err(
            |diags| {
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
            train::train(checked, &opts)?
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
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
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
        ..Launch::default()
    };
    // Ctrl-C reaches the ranks (same process group); they checkpoint and stop together, and
    // the launcher waits for them instead of dying first.
    train::install_interrupt_handler();
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
    let summary = train::train_ranked(checked, &opts, Some(&ctx))?;
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// A finite number >= 0 (`--temperature`).
fn non_negative(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(_) => Err("must be a number >= 0 (0 picks the most likely byte)".into()),
        Err(e) => Err(e.to_string()),
    }
}
