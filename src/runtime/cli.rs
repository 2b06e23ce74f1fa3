//! `fmoec run`: command-line arguments, and the edge between them and [`super::train`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Duration;

use anyhow::bail;

use crate::check::{Checked, ExpertGroup, Precision};
use crate::collective::rendezvous::DistEnv;
use crate::diag::path_text;
use crate::driver::{self, DiagFormat};
use crate::plan::{MemoryModel, Overrides};
use crate::runtime::distributed::{self, WorldPlan};
use crate::runtime::folders::{RunFolders, Series};
use crate::runtime::stop;
use crate::runtime::trace::TraceRequest;
use crate::runtime::train::{self, RunOptions, RunSummary, SampleOptions};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The model file (with a `train` block).
    pub file: PathBuf,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
    /// Where to run: `cpu` (the default), `cuda` or `cuda:N`. As one rank of a run started by
    /// torchrun, `--device cpu` makes it a CPU rank (TCP between the ranks); without it the
    /// rank runs on GPU LOCAL_RANK (NCCL).
    #[arg(long)]
    pub device: Option<String>,
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
    /// Tokens to generate with `--sample` (bytes, for a model without a tokenizer).
    #[arg(long, default_value_t = 400, requires = "sample")]
    pub sample_tokens: usize,
    /// Sampling temperature (0 picks the most likely token).
    #[arg(long, default_value_t = 0.8, value_parser = non_negative, requires = "sample")]
    pub temperature: f64,
    /// Sample among the k most likely tokens (1 or more).
    #[arg(long, default_value_t = 40, value_parser = driver::one_or_more::<i64>, requires = "sample")]
    pub top_k: i64,
    /// Seed for `--sample`.
    #[arg(long, default_value_t = 0, requires = "sample")]
    pub sample_seed: u64,
    /// Override the train block's precision (`fp32`; `bf16` compute with fp32 master weights;
    /// `fp8`: bf16 with the experts' matmuls in FP8, on Hopper GPUs; `fp8-dense`: the dense
    /// matmuls in FP8 too).
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
    /// Record a few steps with libtorch's profiler into a Chrome trace at FILE (default:
    /// `trace.json` in the output folder; ui.perfetto.dev opens it), and print where the GPU's
    /// time went in them, by kind of work. The steps follow the first of the run, which warms
    /// up and captures the CUDA graph. A run in one process; needs a build with `--features cuda`.
    #[arg(long, num_args = 0..=1, value_name = "FILE", conflicts_with = "sample")]
    pub trace: Option<Option<PathBuf>>,
    /// How many steps `--trace` records.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = driver::one_or_more::<u64>, requires = "trace")]
    pub trace_steps: u64,
    /// Train on N GPUs of this machine: one process per GPU, NCCL between them (needs a build
    /// with `--features cuda`). Overrides the file's `gpus` as `fmoec plan --world` does.
    /// Started by torchrun (RANK, WORLD_SIZE, ... set), fmoec runs as that rank instead.
    #[arg(long, value_name = "N", conflicts_with = "ranks", value_parser = driver::one_or_more::<u64>)]
    pub gpus: Option<u64>,
    /// Train on N in-process ranks (threads, CPU): the multi-GPU code path without GPUs.
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub ranks: Option<u64>,
    /// Override the expert group with several ranks: `data` (every data rank shares the
    /// experts), `replicated` (every rank holds every expert) or a size dividing the world.
    #[arg(long, value_name = "data|replicated|N", value_parser = parse_expert_group)]
    pub expert_group: Option<ExpertGroup>,
    /// Override the file's tensor-parallel size (like `fmoec plan --tensor`): ranks that
    /// split every layer's attention heads and MLP columns (and, with `expert_slicing`, the
    /// experts' hidden columns); the world is tensor x data. Needs several ranks.
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub tensor: Option<u64>,
    /// Override the file's pipeline size (like `fmoec plan --pipeline`): stages of
    /// consecutive blocks, the micro-batches flowing through them by Megatron-LM's 1F1B
    /// schedule; the world is tensor x pipeline x data. Needs several ranks.
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub pipeline: Option<u64>,
    /// Override the file's `virtual_stages` (like `fmoec plan --virtual-stages`): model
    /// chunks per pipeline stage; 2 or more run the interleaved schedule. Needs several ranks
    /// and a pipeline.
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub virtual_stages: Option<u64>,
    /// Seconds a collective may wait for the other ranks before the run stops with an error.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub collective_timeout: f64,
    /// Machines the run spans. Each runs the same command with its own --node-rank and starts
    /// its ranks: --gpus K per node (one process per GPU, NCCL) or --ranks K per node (one
    /// process per CPU rank, TCP); the world is N x K.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = driver::one_or_more::<u64>)]
    pub nodes: u64,
    /// This machine's index among the --nodes (0..N); node 0 holds rank 0 and the rendezvous.
    #[arg(long, value_name = "I")]
    pub node_rank: Option<u64>,
    /// Node 0's address and a free port, reachable from every node, where rank 0 serves the
    /// rendezvous (torchrun's MASTER_ADDR and MASTER_PORT).
    #[arg(long, value_name = "ADDR:PORT")]
    pub master: Option<String>,
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
    /// Start this machine's ranks as processes and wait for them.
    Launch(NodeLaunch),
    /// One rank of a multi-process run (started by `--gpus`, `--nodes` or torchrun).
    Rank(DistEnv, Transport),
}

/// The ranks one launcher starts: `per_node` processes, ranks `node_rank · per_node ..`, of
/// a world of `nodes · per_node`.
struct NodeLaunch {
    per_node: u64,
    nodes: u64,
    node_rank: u64,
    /// Where rank 0 serves the rendezvous (`None`: a free port on this machine).
    master: Option<(String, u16)>,
    /// CPU ranks over TCP (`--ranks`) rather than GPU ranks over NCCL (`--gpus`).
    cpu: bool,
}

/// How a rank of a multi-process run reaches the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// GPU `LOCAL_RANK`, NCCL.
    Nccl,
    /// CPU, TCP ([`crate::collective::tcp`]).
    Tcp,
}

/// `ADDR:PORT` of `--master`.
fn parse_master(text: &str) -> anyhow::Result<(String, u16)> {
    let (addr, port) = text
        .rsplit_once(':')
        .filter(|(a, _)| !a.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("--master `{text}`: expected ADDR:PORT, e.g. 10.0.0.1:29500")
        })?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| anyhow::anyhow!("--master `{text}`: `{port}` is not a port number"))?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    Ok((addr.to_string(), port))
}

fn mode(args: &RunArgs) -> anyhow::Result<Mode> {
    let env = DistEnv::from_env()?.filter(|e| e.world > 1);
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if args.ranks == Some(0) {
        bail!("--ranks must be at least 1");
    }
    if args.gpus == Some(0) {
        bail!("--gpus must be at least 1");
    }
    if args.nodes > 1 || args.node_rank.is_some() || args.master.is_some() {
        return several_nodes_mode(args, env);
    }
    if let Some(n) = args.ranks {
        if env.is_some() {
            bail!("--ranks runs every rank in this process; it cannot be one rank of a launched run (unset RANK and WORLD_SIZE, or give --nodes for one process per rank)");
        }
        if args.device.as_deref().is_some_and(|d| d != "cpu") {
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
    let transport = if args.device.as_deref() == Some("cpu") {
        Transport::Tcp
    } else {
        Transport::Nccl
    };
    match (args.gpus, env) {
        (Some(n), Some(env)) => {
            if env.world as u64 != n {
                bail!("--gpus {n} but WORLD_SIZE is {}", env.world);
            }
            Ok(Mode::Rank(env, Transport::Nccl))
        }
        (None, Some(env)) => Ok(Mode::Rank(env, transport)),
        (Some(1), None) | (None, None) => Ok(Mode::Single),
        (Some(n), None) => Ok(Mode::Launch(NodeLaunch {
            per_node: n,
            nodes: 1,
            node_rank: 0,
            master: None,
            cpu: false,
        })),
    }
}

/// The mode of a run over `--nodes` machines (or with `--node-rank`/`--master`, which need
/// it): one of the ranks a node's launcher started (`env`), or that launcher.
fn several_nodes_mode(args: &RunArgs, env: Option<DistEnv>) -> anyhow::Result<Mode> {
    if args.nodes == 1 {
        // --node-rank or --master alone: they mean nothing without --nodes N.
        let given = if args.node_rank.is_some() {
            "--node-rank"
        } else {
            "--master"
        };
        bail!(
            "{given} is for a run over several machines: give --nodes N (and --gpus K or \
             --ranks K per node); on this machine alone leave it out"
        );
    }
    let (per_node, cpu) = match (args.gpus, args.ranks) {
        (Some(k), None) => (k, false),
        (None, Some(k)) => (k, true),
        _ => bail!(
            "--nodes needs the ranks each node starts: --gpus K (one process per GPU, NCCL) \
             or --ranks K (one process per CPU rank, TCP)"
        ),
    };
    if cpu && args.device.as_deref().is_some_and(|d| d != "cpu") {
        bail!("--ranks K starts CPU ranks; for GPUs use --gpus K");
    }
    let world = per_node * args.nodes;
    if let Some(env) = env {
        // One of the ranks a node's launcher started.
        if env.world as u64 != world {
            bail!(
                "--nodes {} x {per_node} ranks per node is {world} ranks, but WORLD_SIZE is {}",
                args.nodes,
                env.world
            );
        }
        let transport = if cpu { Transport::Tcp } else { Transport::Nccl };
        return Ok(Mode::Rank(env, transport));
    }
    Ok(Mode::Launch(NodeLaunch {
        per_node,
        nodes: args.nodes,
        node_rank: node_rank(args)?,
        master: master(args)?,
        cpu,
    }))
}

/// `--node-rank`, which each of several nodes needs (`None` of one node is 0).
fn node_rank(args: &RunArgs) -> anyhow::Result<u64> {
    Ok(match (args.node_rank, args.nodes) {
        (Some(i), n) if i < n => i,
        (Some(i), n) => bail!(
            "--node-rank {i} is not a node of --nodes {n} (0..{})",
            n - 1
        ),
        (None, 1) => 0,
        (None, n) => bail!(
            "--nodes {n} needs --node-rank I (0..{}) on each node",
            n - 1
        ),
    })
}

/// `--master`, which several nodes need (`None` of one node: a free port here).
fn master(args: &RunArgs) -> anyhow::Result<Option<(String, u16)>> {
    Ok(match (&args.master, args.nodes) {
        (Some(m), _) => Some(parse_master(m)?),
        (None, 1) => None,
        (None, n) => bail!(
            "--nodes {n} needs --master ADDR:PORT, the same on every node: node 0's address \
             and a free port there"
        ),
    })
}

/// The layout flags that need several ranks, refused on one device (before the file is read:
/// the run alone is planned with the others).
fn refuse_layout_flags_alone(args: &RunArgs) -> anyhow::Result<()> {
    // `--gpus 1` / `--ranks 1` looks like a rank count but is the run alone: say so.
    let one_rank = match (args.gpus, args.ranks) {
        (Some(1), _) => "; --gpus 1 is one rank",
        (_, Some(1)) => "; --ranks 1 is one rank",
        _ => "",
    };
    if args.expert_group.is_some() {
        bail!("--expert-group needs several ranks (--gpus N or --ranks N){one_rank}");
    }
    if args.tensor.is_some_and(|t| t != 1) {
        bail!("--tensor needs several ranks (--gpus N or --ranks N){one_rank}");
    }
    if args.pipeline.is_some_and(|p| p != 1) {
        bail!("--pipeline needs several ranks (--gpus N or --ranks N){one_rank}");
    }
    if args.virtual_stages.is_some_and(|v| v != 1) {
        bail!(
            "--virtual-stages needs a pipeline of several ranks (--gpus N or --ranks N, with \
             --pipeline P){one_rank}"
        );
    }
    Ok(())
}

/// Set by fmoec's launcher for the ranks it starts: the launcher has reported the run's
/// warnings (they report errors only).
const STARTED_BY_FMOEC: &str = "FMOEC_STARTED_BY_LAUNCHER";

/// Set by fmoec's launcher under `--diagnostics json`: a folder where each rank it starts
/// writes its JSON array (`rank-RANK.json`) instead of printing it, for the launcher to
/// print in its own one array.
const RANK_DIAGNOSTICS_DIR: &str = "FMOEC_RANK_DIAGNOSTICS_DIR";

/// Where this process writes its JSON diagnostics for the launcher that started it (`None`:
/// not started by one, or not under `--diagnostics json`).
fn diagnostics_file_of_this_rank() -> Option<PathBuf> {
    let dir = std::env::var_os(RANK_DIAGNOSTICS_DIR)?;
    let rank: usize = std::env::var("RANK").ok()?.trim().parse().ok()?;
    Some(rank_diagnostics_file(Path::new(&dir), rank))
}

fn rank_diagnostics_file(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.json"))
}

/// The folder a launcher under `--diagnostics json` gives its ranks for their diagnostics
/// ([`RANK_DIAGNOSTICS_DIR`]), removed with what is in it when dropped.
struct RankDiagnostics {
    dir: PathBuf,
}

impl RankDiagnostics {
    fn create() -> anyhow::Result<RankDiagnostics> {
        let dir =
            std::env::temp_dir().join(format!("fmoec-rank-diagnostics-{}", std::process::id()));
        // A folder of that name can only be left by a process of the same id that died.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create `{}` for the ranks' diagnostics: {e}",
                path_text(&dir)
            )
        })?;
        Ok(RankDiagnostics { dir })
    }

    /// Reports what the ranks `ranks` wrote, in rank order: a diagnostic that several ranks
    /// wrote alike once, each with a note naming its ranks.
    fn report(&self, ranks: std::ops::Range<usize>) {
        let mut said: Vec<(serde_json::Value, Vec<usize>)> = Vec::new();
        for rank in ranks {
            let items = match driver::read_handed_json(&rank_diagnostics_file(&self.dir, rank)) {
                Ok(items) => items.unwrap_or_default(),
                Err(e) => {
                    driver::report_error(
                        &format!("the diagnostics of rank {rank} are lost: {e:#}"),
                        None,
                        DiagFormat::Json,
                    );
                    continue;
                }
            };
            for item in items {
                match said.iter_mut().find(|(seen, _)| *seen == item) {
                    Some((_, by)) => by.push(rank),
                    None => said.push((item, vec![rank])),
                }
            }
        }
        let items = said
            .into_iter()
            .map(|(mut item, ranks)| {
                let ranks: Vec<String> = ranks.iter().map(usize::to_string).collect();
                let note = match ranks.len() {
                    1 => format!("from rank {}", ranks[0]),
                    _ => format!("from ranks {}", ranks.join(", ")),
                };
                match item.get_mut("notes").and_then(|n| n.as_array_mut()) {
                    Some(notes) => notes.push(note.into()),
                    None => item["notes"] = serde_json::json!([note]),
                }
                item
            })
            .collect();
        driver::report_json(items);
    }
}

impl Drop for RankDiagnostics {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this process reports the warnings of the run (the file's and its plan's), so that
/// each is said once: a run in this process does; of a launched run, the launcher of node 0
/// (it checks and plans the file before any rank starts: its lines are not prefixed with a
/// rank, and in JSON its array is the run's) or, under torchrun, rank 0.
fn reports_warnings(mode: &Mode) -> bool {
    match mode {
        Mode::Single | Mode::InProcess(_) => true,
        Mode::Launch(node) => node.node_rank == 0,
        Mode::Rank(env, _) => env.rank == 0 && std::env::var_os(STARTED_BY_FMOEC).is_none(),
    }
}

/// Whether this process speaks for the run: not the ranks 1.. of a launched run, and not
/// the launcher itself (its rank 0 speaks).
fn is_first_rank(mode: &Mode) -> bool {
    match mode {
        Mode::Rank(env, _) => env.rank == 0,
        Mode::Single | Mode::InProcess(_) => true,
        Mode::Launch(_) => false,
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

/// `precision = fp8` (the file's, or `--precision`'s) on ranks that cannot run it (the CPU
/// outside the tests' emulation, a GPU before Hopper): refused before anything starts, at the
/// file's `precision` or naming the flag. A launched run's GPU ranks each say it themselves
/// (their device is not known here). `None`: nothing to refuse.
fn refuse_fp8_where_it_cannot_run(
    args: &RunArgs,
    loaded: &driver::Loaded,
    checked: &Checked,
    mode: &Mode,
    device: tch::Device,
) -> Option<ExitCode> {
    let train = checked.train.as_ref()?;
    let Precision::Fp8 { dense } = train.precision else {
        return None;
    };
    let device = match mode {
        Mode::Single | Mode::InProcess(_) => device,
        Mode::Launch(node) if node.cpu => tch::Device::Cpu,
        _ => return None,
    };
    let why = super::fp8::mode_for(device).err()?;
    let on = match device {
        tch::Device::Cpu => "the CPU".to_string(),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}"),
    };
    match args.precision {
        Some(flag) => {
            let flag = clap::ValueEnum::to_possible_value(&flag)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            driver::report_error_with_help(
                &format!("`--precision {flag}` cannot run on {on}: {why:#}"),
                Some("`--precision bf16` (or `fp32`) runs here"),
                args.diagnostics,
            );
        }
        None => {
            let what = match dense {
                true => "`precision = fp8` with `fp8_dense`",
                false => "`precision = fp8`",
            };
            let refusal = crate::check::errors::precision_cannot_run(
                train.spans.precision,
                &format!("{what} cannot run on {on}"),
                &format!("{why:#}"),
            );
            driver::report(&loaded.sources, &[refusal], args.diagnostics);
        }
    }
    Some(ExitCode::from(1))
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    if args.diagnostics == DiagFormat::Json {
        if let Some(file) = diagnostics_file_of_this_rank() {
            driver::hand_json_to(file);
        }
    }
    if let Ok(rank) = std::env::var("RANK") {
        driver::panic_if_asked(&format!("rank-{}", rank.trim()));
    }
    let mode = mode(args)?;
    if let Mode::Single = mode {
        refuse_layout_flags_alone(args)?;
    }
    let reports_warnings = reports_warnings(&mode);
    let loaded = match load(args, &mode, reports_warnings) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let checked = with_precision_flag(&loaded.checked, args);
    let checked = &checked;
    if args.sample.is_some() && !matches!(mode, Mode::Single) {
        bail!("--sample runs on one device; leave out --gpus/--ranks");
    }
    let timeout = collective_timeout(args)?;
    let device = device(args, &mode)?;
    if args.trace.is_some() && !matches!(mode, Mode::Single) {
        bail!("--trace records a run in one process: leave out --gpus, --ranks and --nodes (or trace a run on one device)");
    }
    if let Some(code) = refuse_fp8_where_it_cannot_run(args, &loaded, checked, &mode, device) {
        return Ok(code);
    }
    if checked.train.is_none() && args.sample.is_none() {
        bail!(
            "`{}` has no `train` block: `fmoec run` needs one (data, batch, steps, optimizer)",
            checked.model.name
        );
    }
    let world = world_size(&mode);
    let world_plan = match plan_world(args, &loaded, checked, &mode, world, reports_warnings) {
        Ok(plan) => plan,
        Err(code) => return Ok(code),
    };
    let (out, checkpoints, resume) = run_folders(args, checked, &mode);
    if let Some(prompt) = &args.sample {
        return sample(args, checked, device, prompt, resume.unwrap_or(checkpoints));
    }
    say_before_training(args, checked, &mode, &out, resume.as_ref());
    let opts = run_options(args, device, out, checkpoints, resume);
    train_in_mode(args, &loaded, checked, mode, world_plan, &opts, timeout)
}

/// The trainer's options: the command line's, on `device`, writing to `out` and
/// `checkpoints`, continuing `resume` if given.
fn run_options(
    args: &RunArgs,
    device: tch::Device,
    out: PathBuf,
    checkpoints: PathBuf,
    resume: Option<PathBuf>,
) -> RunOptions {
    let trace = args.trace.as_ref().map(|file| TraceRequest {
        path: file.clone().unwrap_or_else(|| out.join("trace.json")),
        steps: args.trace_steps,
    });
    RunOptions {
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
        model_file: std::path::absolute(&args.file).ok(),
        trace,
    }
}

/// `--collective-timeout`, a positive number of seconds.
fn collective_timeout(args: &RunArgs) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(args.collective_timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--collective-timeout must be a positive number of seconds"))
}

/// The device this process trains on: `--device` (`--gpus 1` alone: `cuda`; default: the
/// CPU); a launcher's and a launched rank's are the CPU here (a GPU rank finds its own).
fn device(args: &RunArgs, mode: &Mode) -> anyhow::Result<tch::Device> {
    let name = match (mode, args.gpus, args.device.as_deref()) {
        (Mode::Single, Some(1), None) => "cuda",
        (_, _, device) => device.unwrap_or("cpu"),
    };
    Ok(match mode {
        Mode::Single | Mode::InProcess(_) => super::parse_device(name)?,
        _ => tch::Device::Cpu,
    })
}

/// The number of ranks of the whole run.
fn world_size(mode: &Mode) -> u64 {
    match mode {
        Mode::Single => 1,
        Mode::InProcess(n) => *n,
        Mode::Launch(node) => node.per_node * node.nodes,
        Mode::Rank(env, _) => env.world as u64,
    }
}

/// `--sample`: text generated after `prompt` from `checkpoint`, printed with the prompt.
fn sample(
    args: &RunArgs,
    checked: &Checked,
    device: tch::Device,
    prompt: &str,
    checkpoint: PathBuf,
) -> anyhow::Result<ExitCode> {
    let text = train::sample(
        checked,
        &SampleOptions {
            device,
            checkpoint,
            prompt: prompt.to_string(),
            tokens: args.sample_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            seed: args.sample_seed,
        },
    )?;
    crate::outln!("{prompt}{text}");
    Ok(ExitCode::SUCCESS)
}

/// Reads, checks and plans the file as this process of the run must: alone, the run's plan is
/// the file with the layout flags given (each 1 by now), as `fmoec plan` with them has it; on
/// several ranks the file as written must plan, and the run's own plan (its world's) comes
/// later, with its warnings. Either plan's memory is the runtime's (`fmoec plan --memory-model
/// fmoec`). Only the process that reports the run's warnings says them.
fn load(args: &RunArgs, mode: &Mode, reports_warnings: bool) -> Result<driver::Loaded, ExitCode> {
    // the runtime's own memory, not the Megatron-LM training `fmoec emit` writes (fused
    // attention keeps no scores, so a micro-batch may fit here that Megatron's would not)
    let alone = Overrides {
        tensor: args.tensor,
        pipeline: args.pipeline,
        virtual_stages: args.virtual_stages,
        memory_model: Some(MemoryModel::Fmoec),
        ..Overrides::NONE
    };
    let as_written = Overrides {
        memory_model: Some(MemoryModel::Fmoec),
        ..Overrides::NONE
    };
    let rules = driver::Rules {
        planning: match mode {
            Mode::Single => driver::Planning::With(&alone),
            _ => driver::Planning::With(&as_written),
        },
        data_files: false,
        warnings: match (&mode, reports_warnings) {
            (_, false) => driver::Warnings::None,
            (Mode::Single, true) => driver::Warnings::All,
            (_, true) => driver::Warnings::FrontEnd,
        },
    };
    driver::load_with(&args.file, args.diagnostics, rules)
}

/// The checked file with `--precision` applied.
fn with_precision_flag(checked: &Checked, args: &RunArgs) -> Checked {
    let mut checked = checked.clone();
    if let (Some(p), Some(train)) = (args.precision, checked.train.as_mut()) {
        train.precision = match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Fp8 => Precision::Fp8 { dense: false },
            PrecisionArg::Fp8Dense => Precision::Fp8 { dense: true },
        };
    }
    checked
}

/// The plan of the run's world (`None` alone, where the trainer plans), its warnings said by
/// the process that reports them; on the planner's errors, the exit code after saying them.
fn plan_world(
    args: &RunArgs,
    loaded: &driver::Loaded,
    checked: &Checked,
    mode: &Mode,
    world: u64,
    reports_warnings: bool,
) -> Result<Option<WorldPlan>, ExitCode> {
    if let Mode::Single = mode {
        return Ok(None);
    }
    let choice = distributed::LayoutChoice {
        expert_group: args.expert_group,
        tensor: args.tensor,
        pipeline: args.pipeline,
        virtual_stages: args.virtual_stages,
    };
    // On several ranks, the world's plan before anything else is said: its warnings come
    // with the file's.
    match distributed::plan_world_layout(checked, world, choice) {
        Ok(plan) => {
            if reports_warnings {
                driver::report(&loaded.sources, &plan.warnings, args.diagnostics);
            }
            Ok(Some(plan))
        }
        Err(diags) => {
            driver::report(&loaded.sources, &diags, args.diagnostics);
            if args.diagnostics == DiagFormat::Human {
                let tensor = args.tensor.unwrap_or(checked.parallel.tensor);
                let pipeline = args.pipeline.unwrap_or(checked.parallel.pipeline);
                let mut hints = Vec::new();
                if tensor > 1 && args.tensor.is_none() {
                    hints.push("--tensor 1 runs without tensor parallelism");
                }
                if pipeline > 1 && args.pipeline.is_none() {
                    hints.push("--pipeline 1 runs without pipeline parallelism");
                }
                crate::errln!(
                        "error: `{}` cannot run on {world} ranks with tensor = {tensor} and pipeline = {pipeline} (the planner's errors above){}",
                        path_text(&args.file),
                        hints.iter().map(|h| format!("; {h}")).collect::<String>()
                    );
            }
            Err(ExitCode::from(1))
        }
    }
}

/// Where the run writes (`out`), its checkpoints, and the checkpoint it resumes, if any.
fn run_folders(
    args: &RunArgs,
    checked: &Checked,
    mode: &Mode,
) -> (PathBuf, PathBuf, Option<PathBuf>) {
    // `--out` puts everything under one folder; without it, checkpoints go where the train
    // block's `checkpoint = every(n, dir = ...)` says, the rest to `runs/<model>`, and a
    // second run of the file continues the first or starts the next beside it.
    let declared_dir = checked
        .train
        .as_ref()
        .and_then(|t| t.checkpoint.as_ref())
        .map(|c| PathBuf::from(&c.dir));
    let series = Series::new("runs", &checked.model.name, declared_dir);
    match (&args.out, &args.resume) {
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
            if is_first_rank(mode) {
                crate::errln!("{}", choice.describe());
            }
            let folders = choice.folders().clone();
            let resume = choice.resumes().then(|| folders.checkpoints.clone());
            (folders.out, folders.checkpoints, resume)
        }
    }
}

/// The notes of the first rank before training: a warmup longer than `--steps`, and which run
/// `--resume` continues.
fn say_before_training(
    args: &RunArgs,
    checked: &Checked,
    mode: &Mode,
    out: &Path,
    resume: Option<&PathBuf>,
) {
    // The file's warmup past the file's steps is the checker's W0007; past `--steps` only the
    // run knows.
    if let (Some(steps), Some(train), true) = (args.steps, &checked.train, is_first_rank(mode)) {
        let warmup = match train.schedule {
            crate::check::Schedule::Constant { warmup }
            | crate::check::Schedule::Cosine { warmup, .. } => warmup,
        };
        if warmup > steps {
            crate::errln!(
                "note: the warmup of {warmup} steps is longer than --steps {steps}: the learning \
                 rate never reaches its peak"
            );
        }
    }
    // Continuing a run said so when it was chosen from the folders; `--resume` says it too.
    if let (Some(checkpoint), true) = (resume, args.resume.is_some() && is_first_rank(mode)) {
        if let Ok(record) = crate::runtime::checkpoint::run_record(checkpoint) {
            let total_steps = args
                .steps
                .or(record.total_steps)
                .or(checked.train.as_ref().map(|t| t.steps))
                .unwrap_or(record.step);
            let folders = RunFolders {
                out: out.to_path_buf(),
                checkpoints: checkpoint.clone(),
            };
            // A checkpoint at or past the end is refused by the trainer, which says why.
            if record.step < total_steps {
                crate::errln!(
                    "{})",
                    crate::runtime::folders::continuing(&folders, record.step, total_steps)
                );
            }
        }
    }
}

/// Trains as the mode says: alone, on in-process ranks, by starting this node's ranks, or as
/// one rank of a launched run.
fn train_in_mode(
    args: &RunArgs,
    loaded: &driver::Loaded,
    checked: &Checked,
    mode: Mode,
    world_plan: Option<WorldPlan>,
    opts: &RunOptions,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let summary = match (mode, world_plan) {
        (Mode::Single, _) => {
            let plan = match distributed::plan_alone(checked) {
                Ok(p) => p,
                Err(diags) => {
                    driver::report(&loaded.sources, &diags, args.diagnostics);
                    if args.diagnostics == DiagFormat::Human {
                        crate::errln!(
                            "error: `{}` cannot run on one device (the planner's errors above)",
                            path_text(&args.file)
                        );
                    }
                    return Ok(ExitCode::from(1));
                }
            };
            train::train_alone(checked, opts, &plan)?
        }
        (Mode::InProcess(_), Some(plan)) => {
            let mut summaries = distributed::run_in_process(checked, opts, &plan, timeout)?;
            summaries.swap_remove(0)
        }
        (Mode::Launch(node), Some(_)) => return launch(&node, args.diagnostics),
        (Mode::Rank(env, transport), Some(plan)) => {
            let result = match transport {
                Transport::Tcp => run_cpu_rank(checked, opts, plan, &env, timeout),
                Transport::Nccl => run_rank(checked, opts, plan, &env, timeout),
            };
            return match result {
                // Said as any error is, with the code that lets the launcher name the
                // failure this one followed.
                Err(e) if follows_another_rank(&e) => {
                    driver::report_error(&format!("{e:#}"), None, args.diagnostics);
                    Ok(ExitCode::from(
                        crate::collective::launch::FOLLOWED_ANOTHER_RANK,
                    ))
                }
                other => other,
            };
        }
        (_, None) => {
            bail!("no plan was made for the run's ranks (a bug in fmoec; please report it)")
        }
    };
    if let Some(text) = interruption(&summary) {
        driver::report_interruption(&text, args.diagnostics);
    }
    Ok(exit_code(&summary))
}

/// What the run says of itself when a signal stopped it (the line the trainer prints, for
/// the JSON array); `None` for a run that was not interrupted.
fn interruption(summary: &RunSummary) -> Option<String> {
    if !summary.interrupted {
        return None;
    }
    Some(stop::stopped_text(
        summary.signal,
        summary.start_step + summary.steps_done,
        summary.checkpoint.as_deref(),
    ))
}

/// Whether a rank's error only follows another rank's (rank 0 gave up the rendezvous, a
/// peer left a collective).
fn follows_another_rank(error: &anyhow::Error) -> bool {
    use crate::collective::{rendezvous::RendezvousError, CollectiveError};
    error.chain().any(|cause| {
        cause
            .downcast_ref::<RendezvousError>()
            .is_some_and(RendezvousError::follows_another_rank)
            || cause
                .downcast_ref::<CollectiveError>()
                .is_some_and(CollectiveError::follows_another_rank)
    })
}

/// 0, or 128 + the signal that stopped the run (130 for Ctrl-C, 143 for SIGTERM).
fn exit_code(summary: &RunSummary) -> ExitCode {
    match summary.signal {
        Some(signal) => ExitCode::from(stop::exit_status(signal)),
        None if summary.interrupted => ExitCode::from(130),
        None => ExitCode::SUCCESS,
    }
}

/// Starts this machine's ranks (`node`) as processes of this program with the same
/// arguments and the torchrun variables, passes a stop signal on to them, waits, and exits
/// with the first failing rank's code. Under `--diagnostics json` this process's stderr
/// is what one process of the run would print: the ranks' lines as they print them (rank
/// 0's progress), then one JSON array, this launcher's with the ranks' diagnostics in it.
fn launch(node: &NodeLaunch, format: DiagFormat) -> anyhow::Result<ExitCode> {
    use crate::collective::launch::{spawn_local, Launch};
    let n = node.per_node;
    let mut launch = Launch {
        stop_signal: Some(stop::requested),
        first_rank: (node.node_rank * n) as usize,
        world: Some((node.nodes * n) as usize),
        ..Launch::default()
    };
    if let Some((addr, port)) = &node.master {
        launch.master_addr = addr.clone();
        launch.master_port = Some(*port);
    }
    if !node.cpu {
        launch.env = gpu_ranks_env(n)?;
    }
    launch.env.push((STARTED_BY_FMOEC.into(), "1".into()));
    let rank_diagnostics = match format {
        DiagFormat::Json => {
            let diagnostics = RankDiagnostics::create()?;
            launch.env.push((
                RANK_DIAGNOSTICS_DIR.into(),
                diagnostics.dir.clone().into_os_string(),
            ));
            launch.label_stderr = false;
            Some(diagnostics)
        }
        DiagFormat::Human => None,
    };
    let program = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // Ctrl-C reaches the ranks (same process group); a SIGTERM sent to the launcher alone
    // (a scheduler's) is passed on to them. They checkpoint and stop together, and the
    // launcher waits for them instead of dying first.
    stop::install();
    let outcome = spawn_local(n as usize, program, &args, &launch)?;
    if let Some(diagnostics) = &rank_diagnostics {
        diagnostics.report(launch.first_rank..launch.first_rank + n as usize);
    }
    if let Some(text) = outcome.describe() {
        match format {
            DiagFormat::Human => crate::errln!("fmoec run: {text}"),
            DiagFormat::Json => driver::report_error(&text, None, format),
        }
    } else if let Some(signal) = outcome.interrupted {
        let ranks: Vec<String> = outcome
            .stopped_as_asked()
            .iter()
            .map(usize::to_string)
            .collect();
        let text = match ranks.as_slice() {
            [rank] => format!(
                "interrupted by {}: rank {rank} stopped after the step, saving its part of the checkpoint",
                stop::name(signal)
            ),
            _ => format!(
                "interrupted by {}: ranks {} stopped together after the same step, each saving its part of the checkpoint",
                stop::name(signal),
                ranks.join(", ")
            ),
        };
        match format {
            DiagFormat::Human => crate::errln!("fmoec run: {text}"),
            DiagFormat::Json => driver::report_interruption(&text, format),
        }
    }
    Ok(ExitCode::from(outcome.exit_code().clamp(0, 255) as u8))
}

#[cfg(not(feature = "cuda"))]
fn gpu_ranks_env(n: u64) -> anyhow::Result<Vec<(std::ffi::OsString, std::ffi::OsString)>> {
    bail!(
        "--gpus {n} needs NCCL, and this fmoec was built without the `cuda` feature; rebuild with `cargo build --release --features cuda`, or use --ranks {n} for CPU ranks"
    )
}

/// What the GPU ranks of this machine need in their environment (NCCL's library made
/// findable), after checking the machine has `n` GPUs.
#[cfg(feature = "cuda")]
fn gpu_ranks_env(n: u64) -> anyhow::Result<Vec<(std::ffi::OsString, std::ffi::OsString)>> {
    use crate::collective::nccl::NcclLibrary;
    let visible = tch::Cuda::device_count();
    if n as i64 > visible {
        bail!("--gpus {n} but this machine shows {visible} CUDA device(s)");
    }
    Ok(NcclLibrary::for_ranks()?.env.clone())
}

/// One CPU rank of a multi-process run: the collectives over TCP.
fn run_cpu_rank(
    checked: &Checked,
    opts: &RunOptions,
    plan: WorldPlan,
    env: &DistEnv,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let tensor = (plan.tensor_size() > 1).then_some(plan.tensor.as_slice());
    let groups = crate::collective::tcp::connect(&plan.layout, tensor, env, timeout)?;
    // The ranks this machine started share its memory (torchrun and fmoec's launcher say how
    // many there are).
    let local_world = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(1);
    let ctx = distributed::RankContext {
        groups,
        plan,
        device: tch::Device::Cpu,
        timeout,
        ranks_sharing_device: local_world.max(1),
    };
    let mut opts = opts.clone();
    opts.device = tch::Device::Cpu;
    let summary = train::train_ranked(checked, &opts, &ctx)?;
    Ok(exit_code(&summary))
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
        "started as rank {} of {} (RANK/WORLD_SIZE are set) on a GPU, but this fmoec was built without the `cuda` feature (NCCL); rebuild with `--features cuda`, or pass --device cpu for a CPU rank (TCP between the ranks)",
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
        ranks_sharing_device: 1,
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
        Ok(_) => Err("must be a number >= 0 (0 picks the most likely token)".into()),
        Err(e) => Err(e.to_string()),
    }
}
