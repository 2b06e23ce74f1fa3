//! Training a checked model: the command line's [`RunOptions`], what a run reports
//! ([`StepMetrics`] per step in `metrics.jsonl`, [`RunSummary`] at the end), the entry points
//! ([`train`] alone, [`train_alone`] with a plan, [`train_ranked`] as one rank of many), and
//! what the trainer's phases share (the micro-batch rules for plans made without the planner,
//! the held-out evaluation, sums over the ranks). The loop itself is
//! [`crate::runtime::trainer::Trainer`]; sampling is [`crate::runtime::sample`].
//!
//! Reproducibility: the data windows of step `s` are keyed by `(seed, s, micro, row)` and the
//! gates' random draws by `(seed, s, micro, layer)` (see [`crate::runtime::model::routing_key_words`]),
//! so a run's whole random state is `(seed, step)`; with the optimizer state restored from a
//! checkpoint a resumed CPU run repeats the uninterrupted one bit for bit.
//!
//! Many ranks ([`train_ranked`] with a [`RankContext`]): every data rank takes whole
//! micro-batches of the same global batch (micro-batch `m` goes to data rank `m mod D`), so
//! each gate sees the tokens it sees in the single-rank run with the same `micro_batch`, and
//! each rank's loss is the mean over its own micro-batches; the gradient reduction by kind
//! (replicated over the data group, experts over the expert-data group, gates over the gate
//! group, each divided by `D`) then gives the single-rank gradients. Rank 0 alone prints,
//! writes metrics, summary and plot. Knows nothing about the command line.
//!
//! Tensor parallelism (a [`RankContext`] whose tensor group has `t > 1` ranks, Megatron-LM's
//! layout): the model is built whole and seeded as alone, cut to the rank's experts, restored
//! from a checkpoint (whole tensors), and only then split over the tensor group
//! ([`Transformer::split_tensor_parallel`], AdamW's moments sliced alike). The tensor ranks
//! of one data rank run the same micro-batches through
//! [`Transformer::loss_tensor_parallel`]; partial gradients are summed over the tensor group
//! before the reduction by kind, and the global norm counts each slice once. Checkpoints stay
//! layout-free: sharded tensors (and their moments) are summed back to whole ones over the
//! tensor group and written by tensor rank 0 of each writer, so they resume on any world and
//! tensor size.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::check::{Checked, Precision, Train};
use crate::collective::Tape;
use crate::diag::path_text;
use crate::runtime::data::Dataset;
use crate::runtime::distributed::{self, ExpertParallel, RankContext, WorldPlan};
use crate::runtime::model::{ExchangedExperts, ForwardOutput, TensorPass, Transformer};
use crate::runtime::moe::TelemetryReport;
use crate::runtime::trainer::Trainer;

pub use crate::runtime::sample::{sample, SampleOptions};

/// Keys the held-out batches (`(seed, EVAL_KEY, batch)`).
pub(crate) const EVAL_KEY: u64 = 0xE7A1;

/// Where and how to run, from the command line.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub device: Device,
    /// Total steps (the schedule's length); default: the file's `steps`.
    pub steps: Option<u64>,
    /// Stop (with a checkpoint) after this many completed steps, keeping the schedule.
    pub stop_after: Option<u64>,
    pub out: PathBuf,
    /// Checkpoint root (default `out/checkpoints`).
    pub checkpoints: PathBuf,
    /// Resume from this checkpoint (a `step-*` directory or a root with `latest`).
    pub resume: Option<PathBuf>,
    pub progress: bool,
    /// Where stderr is not a terminal: a progress line at most this often (and after the
    /// first and the last step).
    pub log_interval: Duration,
    /// Print the end summary on stdout.
    pub print_summary: bool,
    /// Alone on a GPU (and built with `cuda`): replay the training micro-batch as a CUDA graph
    /// (see [`crate::runtime::graph`]); ignored elsewhere.
    pub cuda_graph: bool,
    /// The model file, absolute, recorded in every checkpoint (`fmoec export` finds it there).
    pub model_file: Option<PathBuf>,
    /// Record a few steps with libtorch's profiler into a Chrome trace (`--trace`).
    pub trace: Option<crate::runtime::trace::TraceRequest>,
}

impl Default for RunOptions {
    /// A run on the CPU with the file's steps into `runs/default`, no progress display.
    fn default() -> Self {
        RunOptions {
            device: Device::Cpu,
            steps: None,
            stop_after: None,
            out: PathBuf::from("runs/default"),
            checkpoints: PathBuf::from("runs/default/checkpoints"),
            resume: None,
            progress: false,
            log_interval: Duration::from_secs(10),
            print_summary: false,
            cuda_graph: false,
            model_file: None,
            trace: None,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based number of this step (steps completed after it).
    pub step: u64,
    pub loss: f64,
    /// Weighted balance loss added to the LM loss.
    pub balance_loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub moe: Vec<LayerMetrics>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_ppl: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub layer: usize,
    #[serde(flatten)]
    pub telemetry: TelemetryReport,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub model: String,
    pub parameters: i64,
    pub data: String,
    pub device: String,
    pub precision: String,
    /// Sequences of `seq_len` tokens per step (the global batch).
    pub batch_sequences: u64,
    pub seq_len: u64,
    /// Sequences per micro-batch on each data rank.
    pub micro_batch: u64,
    pub start_step: u64,
    pub steps_done: u64,
    pub total_steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub final_eval_ppl: Option<f64>,
    /// Of the training split (byte data only).
    pub unigram_entropy: Option<f64>,
    pub interrupted: bool,
    /// The signal that stopped the run (2: SIGINT, 15: SIGTERM), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub checkpoint: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
    /// Every step's LM loss in this process (for tests and the summary).
    #[serde(skip)]
    pub losses: Vec<f64>,
    /// The GPU's SM clock and power while the steps ran (NVML; rank 0's GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::runtime::telemetry::Summary>,
    /// Where the GPU's time went in the steps `--trace` recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::runtime::trace::TraceSummary>,
}

pub fn compute_kind(p: Precision) -> Result<Kind> {
    Ok(match p {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 | Precision::Fp8 { .. } => Kind::BFloat16,
        Precision::Fp16 => bail!(
            "precision = fp16 needs loss scaling, which the built-in runtime does not do; use bf16"
        ),
    })
}

pub(crate) fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
        Precision::Fp8 { dense: false } => "fp8",
        Precision::Fp8 { dense: true } => "fp8 (dense too)",
    }
}

/// Sequences per micro-batch of a plan made without the planner on one rank: the file's
/// `micro_batch`, else the largest divisor of the batch with at most
/// [`crate::plan::DEFAULT_MICRO_TOKENS`] tokens.
pub fn micro_batch(checked: &Checked, train: &Train) -> Result<u64> {
    micro_batch_for(checked, train, 1)
}

/// Sequences per micro-batch on each of `data_ranks` data ranks, for a plan made without the
/// planner: the file's `micro_batch` (which must split the batch evenly over the ranks), else
/// the largest divisor of a rank's share of the batch with at most
/// [`crate::plan::DEFAULT_MICRO_TOKENS`] tokens ([`crate::plan::default_micro_batch`]).
pub fn micro_batch_for(checked: &Checked, train: &Train, data_ranks: u64) -> Result<u64> {
    let batch = train.batch_sequences;
    let d = data_ranks.max(1);
    if batch % d != 0 {
        bail!("the batch of {batch} sequences cannot be split evenly over {d} data ranks");
    }
    let share = batch / d;
    if let Some(mb) = checked.parallel.micro_batch {
        if mb == 0 || share % mb != 0 {
            if d == 1 {
                bail!("micro_batch = {mb} does not divide the batch of {batch} sequences");
            }
            bail!(
                "micro_batch = {mb} does not divide the {share} sequences of each of the {d} data ranks (batch {batch}); choose a divisor of {share}"
            );
        }
        return Ok(mb);
    }
    Ok(crate::plan::default_micro_batch(share, train.seq_len))
}

/// Trains the checked model alone on `opts.device`, planned as [`distributed::plan_alone`]
/// plans it (or, where the planner finds no plan, with the runtime's defaults). Returns the
/// summary; errors are user-facing.
pub fn train(checked: &Checked, opts: &RunOptions) -> Result<RunSummary> {
    let plan =
        distributed::plan_alone(checked).or_else(|_| WorldPlan::data_parallel(checked, 1, 1))?;
    train_alone(checked, opts, &plan)
}

/// Trains the checked model alone on `opts.device` with the plan `plan` (a world of one).
pub fn train_alone(checked: &Checked, opts: &RunOptions, plan: &WorldPlan) -> Result<RunSummary> {
    Trainer::setup(checked, opts, plan, None)?.run()
}

/// Trains the checked model as one rank of many. Every rank of a run calls this with the
/// same arguments; rank 0 writes the files.
pub fn train_ranked(checked: &Checked, opts: &RunOptions, ctx: &RankContext) -> Result<RunSummary> {
    agree_on_out(ctx, &opts.out)?;
    Trainer::setup(checked, opts, &ctx.plan, Some(ctx))?.run()
}

/// The file rank 0 leaves in the run's folder for [`agree_on_out`], for a moment.
const SHARED_OUT_MARK: &str = ".fmoec-shared-out";

/// Refuses a run whose ranks do not all see one output folder (ranks on machines without a
/// shared filesystem), as it starts: rank 0 writes a fresh token into the folder and every
/// other rank reads it back. Without this the first checkpoint fails, maybe hours in, with
/// "No such file or directory" on the other machines. Every rank gets the same error. When
/// rank 0 cannot write there at all, the trainer's own check of the folder says why.
fn agree_on_out(ctx: &RankContext, out: &Path) -> Result<()> {
    let rank = ctx.rank();
    let mark = out.join(SHARED_OUT_MARK);
    let (token, written, created) = if rank == 0 {
        let token = fresh_token();
        let created = !out.exists();
        let written = std::fs::create_dir_all(out)
            .and_then(|()| crate::driver::write_atomic(&mark, token.to_string().as_bytes()))
            .is_ok();
        (token, written, created)
    } else {
        (0, false, false)
    };
    // the token in two halves, each exact in an f64
    let halves = [(token >> 32) as f64, (token & 0xffff_ffff) as f64];
    let shared = sum_over_world(
        ctx,
        &[halves[0], halves[1], f64::from(u8::from(written))],
        "the run's folder",
    )?;
    if shared[2] == 0.0 {
        return Ok(());
    }
    let token = ((shared[0] as u64) << 32) | shared[1] as u64;
    let mut unseen = vec![0.0; ctx.world()];
    if rank != 0 {
        let seen = std::fs::read_to_string(&mark)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        unseen[rank] = f64::from(u8::from(seen != Some(token)));
    }
    let unseen = sum_over_world(ctx, &unseen, "the run's folder")?;
    let ranks: Vec<String> = (0..unseen.len())
        .filter(|&r| unseen[r] > 0.0)
        .map(|r| r.to_string())
        .collect();
    if rank == 0 {
        let _ = std::fs::remove_file(&mark);
        // made only for the mark: the trainer makes it again once every check has passed
        if created {
            let _ = std::fs::remove_dir(out);
        }
    }
    if !ranks.is_empty() {
        let who = match ranks.as_slice() {
            [rank] => format!("rank {rank} does not"),
            _ => format!("ranks {} do not", ranks.join(", ")),
        };
        bail!(
            "the ranks do not share the run's folder `{}`: {who} see what rank 0 writes there; a run over several machines needs its folder (--out) on a filesystem every machine shares, under the same path",
            path_text(out),
        );
    }
    Ok(())
}

/// A number that differs from run to run (the time and this process), so that a mark left
/// in a folder by another run is not taken for this one's.
fn fresh_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Mean held-out loss over the file's eval batches (fixed windows, same every time).
pub fn evaluate(
    model: &Transformer,
    data: &Dataset,
    seed: u64,
    batches: u64,
    rows: usize,
    window: usize,
) -> Result<f64> {
    evaluate_ranked(model, data, seed, batches, rows, window, None)
}

/// [`evaluate`] on one rank of many: the data ranks share the batches (batch `j` on data
/// rank `j mod D`; the ranks of one tensor group take the same batches) and sum their losses
/// over the data group, so every rank gets the single-rank value for 1/D of the work. Every
/// rank runs the same number of forward passes (the expert exchanges and tensor reductions
/// in them are collective): a rank short of batches repeats one and leaves its loss out.
pub fn evaluate_ranked(
    model: &Transformer,
    data: &Dataset,
    seed: u64,
    batches: u64,
    rows: usize,
    window: usize,
    ctx: Option<&RankContext>,
) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let batches = batches.max(1);
    let (d, r) = ctx.map_or((1, 0), |c| (c.data_size() as u64, c.data_rank() as u64));
    let mut total = 0.0;
    for i in 0..batches.div_ceil(d) {
        let j = i * d + r;
        let counted = j < batches;
        let j = if counted { j } else { r % batches };
        let batch = data.batch(true, &[seed, EVAL_KEY, j], rows, window, model.store.device)?;
        let (lm, _) = match ctx {
            Some(ctx) if ctx.tensor_size() > 1 => {
                let at = format!("eval batch {j}");
                tensor_parallel_loss(model, ctx, &batch, false, &mut Tape::new(), &at)?
            }
            Some(ctx) => {
                let mut hook = ExpertParallel::new(ctx, false, format!("eval batch {j}"));
                model.loss_with(&batch, false, Some(&mut hook))?
            }
            None => model.loss(&batch, false)?,
        };
        if counted {
            total += lm.f_double_value(&[])?;
        }
    }
    if let Some(c) = ctx.filter(|_| d > 1) {
        total = sum_over_data(c, &[total], "eval")?[0];
    }
    Ok(total / batches as f64)
}

/// The loss of `batch` through the tensor-parallel model on `ctx`'s groups, its cuts and
/// exchanges recorded on `tape` (experts exchanged when the expert group has several ranks).
pub(crate) fn tensor_parallel_loss(
    model: &Transformer,
    ctx: &RankContext,
    batch: &Tensor,
    train: bool,
    tape: &mut Tape,
    at: &str,
) -> Result<(Tensor, ForwardOutput)> {
    let mut ex = ExchangedExperts {
        group: ctx.groups.expert(),
        placements: &ctx.plan.placements,
        at,
        fastermoe: ctx.plan.fastermoe.as_ref(),
        shadowed: None,
    };
    let mut pass = TensorPass {
        group: ctx.groups.tensor(),
        tape,
        at,
        experts: if ctx.expert_group_size() > 1 {
            Some(&mut ex)
        } else {
            None
        },
    };
    model.loss_tensor_parallel(batch, train, &mut pass)
}

/// Sums `values` (f64, on any device) over the data group.
pub(crate) fn sum_over_data(ctx: &RankContext, values: &[f64], at: &str) -> Result<Vec<f64>> {
    let mut t = Tensor::f_from_slice(values)?.f_to_device(ctx.device)?;
    ctx.groups.data().all_reduce_sum(&mut t, at)?;
    Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
}

/// Sums `values` (f64, on any device) over the whole world (see
/// [`RankContext::all_reduce_world`]).
pub(crate) fn sum_over_world(ctx: &RankContext, values: &[f64], at: &str) -> Result<Vec<f64>> {
    let mut t = Tensor::f_from_slice(values)?.f_to_device(ctx.device)?;
    ctx.all_reduce_world(&mut t, at)?;
    Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
}

pub(crate) fn print_summary(s: &RunSummary) {
    crate::outln!("model      {} ({} parameters)", s.model, s.parameters);
    crate::outln!("data       {}", s.data);
    crate::outln!("device     {} ({})", s.device, s.precision);
    if let Some(g) = &s.gpu {
        crate::outln!("gpu        {g}");
    }
    crate::outln!(
        "batch      {} x {} tokens per step, micro-batches of {} sequences",
        s.batch_sequences,
        s.seq_len,
        s.micro_batch
    );
    crate::outln!(
        "steps      {} -> {} of {} ({} tokens, {:.1} s, {:.0} tokens/s)",
        s.start_step,
        s.start_step + s.steps_done,
        s.total_steps,
        s.tokens,
        s.seconds,
        s.tokens_per_s
    );
    if let (Some(a), Some(b)) = (s.first_loss, s.final_loss) {
        match s.unigram_entropy {
            Some(h) => {
                crate::outln!("loss       {a:.4} -> {b:.4} (unigram entropy of the data {h:.4})")
            }
            None => crate::outln!("loss       {a:.4} -> {b:.4}"),
        }
    }
    if let (Some(l), Some(p)) = (s.final_eval_loss, s.final_eval_ppl) {
        crate::outln!("eval       loss {l:.4}, perplexity {p:.2}");
    }
    if let Some(c) = &s.checkpoint {
        crate::outln!("checkpoint {}", path_text(c));
    }
    crate::outln!("metrics    {}", path_text(&s.metrics));
    if let Some(p) = &s.plot {
        crate::outln!("plot       {}", path_text(p));
    }
    if let Some(t) = &s.trace {
        crate::outln!("trace      {}", crate::runtime::trace::title(t));
    }
}
