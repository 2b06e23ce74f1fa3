//! The training loop: micro-batches with gradient accumulation, balance losses, clipping,
//! AdamW, warmup + cosine, periodic held-out evaluation, metrics (JSONL), progress bar,
//! checkpoints, Ctrl-C, and the end-of-run summary and plot; plus text sampling from a
//! checkpoint.
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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::check::{Checked, Precision, Train};
use crate::collective::{
    clip_global_norm, clip_global_norm_tensor_parallel, reduce_gradients, sum_partial_gradients,
    ParamKind, Tape, TensorSplit,
};
use crate::runtime::cast;
use crate::runtime::checkpoint::{self, SaveInfo};
use crate::runtime::data::{mix_all, Dataset};
use crate::runtime::distributed::{self, ExpertParallel, RankContext};
use crate::runtime::model::{
    lock_rng, ExchangedExperts, ForwardOutput, TensorParallel, TensorPass, Transformer,
};
use crate::runtime::moe::{Telemetry, TelemetryReport};
use crate::runtime::optim::{self, AdamW};
use crate::runtime::plot;

const EVAL_KEY: u64 = 0xE7A1;
const STEP_KEY: u64 = 0x57E9;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: std::sync::Once = std::sync::Once::new();

/// Installs the Ctrl-C handler (once per process): it asks the loop to checkpoint and stop.
pub fn install_interrupt_handler() {
    HANDLER.call_once(|| {
        // If another handler is installed already, Ctrl-C keeps its default meaning.
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

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
    /// Print the end summary on stdout.
    pub print_summary: bool,
    /// Alone on a GPU (and built with `cuda`): replay the training micro-batch as a CUDA graph
    /// (see [`crate::runtime::graph`]); ignored elsewhere.
    pub cuda_graph: bool,
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
    pub checkpoint: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
    /// Every step's LM loss in this process (for tests and the summary).
    #[serde(skip)]
    pub losses: Vec<f64>,
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

fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
        Precision::Fp8 { dense: false } => "fp8",
        Precision::Fp8 { dense: true } => "fp8 (dense too)",
    }
}

/// Sequences per micro-batch: the file's `micro_batch`, else the largest divisor of the batch
/// with at most [`crate::plan::DEFAULT_MICRO_TOKENS`] tokens.
pub fn micro_batch(checked: &Checked, train: &Train) -> Result<u64> {
    micro_batch_for(checked, train, 1)
}

/// Sequences per micro-batch on each of `data_ranks` data ranks: the file's `micro_batch`
/// (which must split the batch evenly over the ranks), else the largest divisor of a rank's
/// share of the batch with at most [`crate::plan::DEFAULT_MICRO_TOKENS`] tokens (the planner's
/// [`crate::plan::default_micro_batch`]).
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

/// The micro-batch of a run on `data_ranks` data ranks: the file's, else the planner's for
/// the run's layout (several ranks: `ctx`'s plan; one: a plan of one GPU), which is
/// [`micro_batch_for`]'s default unless that leaves less than
/// [`crate::plan::FREE_CHOICE_HEADROOM`] of the GPU free in the planner's memory estimate;
/// then also a note saying so. Without a plan (one rank whose model does not fit the file's
/// GPU at all, or ranks laid out without the planner): the default.
fn run_micro_batch(
    checked: &Checked,
    train: &Train,
    data_ranks: u64,
    ctx: Option<&RankContext>,
) -> Result<(u64, Option<String>)> {
    let default = micro_batch_for(checked, train, data_ranks)?;
    if checked.parallel.micro_batch.is_some() {
        return Ok((default, None));
    }
    let planned = match ctx {
        Some(c) => c.plan.micro_batch,
        None => {
            let one = distributed::overrides(1, None, Some(1));
            crate::plan::cost_with(checked, &one)
                .ok()
                .map(|p| p.costed.micro_batch)
        }
    };
    let share = train.batch_sequences / data_ranks.max(1);
    match planned {
        Some(m) if m != default && m > 0 && share % m == 0 => Ok((
            m,
            Some(format!(
                "micro-batch {m} sequences: {default} (the default, at most {} tokens) would \
                 leave less than {:.0}% of a `{}` GPU free in the planner's memory estimate \
                 (`fmoec plan --memory-model fmoec`)",
                crate::plan::DEFAULT_MICRO_TOKENS,
                crate::plan::FREE_CHOICE_HEADROOM * 100.0,
                checked.parallel.hardware.name
            )),
        )),
        _ => Ok((default, None)),
    }
}

struct Accum {
    counts: Tensor,
    dropped: Tensor,
    entropy: Tensor,
    balance: Tensor,
}

fn accumulate(acc: &mut Vec<(usize, Accum)>, tel: Vec<(usize, Telemetry)>) -> Result<()> {
    if acc.is_empty() {
        for (layer, t) in tel {
            acc.push((
                layer,
                // copies: a replayed CUDA graph rewrites its outputs in place
                Accum {
                    counts: t.tokens_per_expert.f_detach_copy()?,
                    dropped: t.dropped_fraction.f_detach_copy()?,
                    entropy: t.gate_entropy.f_detach_copy()?,
                    balance: t.balance_loss.f_detach_copy()?,
                },
            ));
        }
        return Ok(());
    }
    for ((_, a), (_, t)) in acc.iter_mut().zip(tel) {
        a.counts = a.counts.f_add(&t.tokens_per_expert)?;
        a.dropped = a.dropped.f_add(&t.dropped_fraction)?;
        a.entropy = a.entropy.f_add(&t.gate_entropy)?;
        a.balance = a.balance.f_add(&t.balance_loss)?;
    }
    Ok(())
}

fn reports(acc: Vec<(usize, Accum)>, micro: f64) -> Result<Vec<LayerMetrics>> {
    acc.into_iter()
        .map(|(layer, a)| {
            let t = Telemetry {
                tokens_per_expert: a.counts,
                dropped_fraction: a.dropped.f_div_scalar(micro)?,
                gate_entropy: a.entropy.f_div_scalar(micro)?,
                balance_loss: a.balance.f_div_scalar(micro)?,
            };
            Ok(LayerMetrics {
                layer,
                telemetry: t.report()?,
            })
        })
        .collect()
}

/// One training micro-batch alone on a device: forward, loss, backward (the gradients add
/// up in the masters' `.grad`); returns the LM loss and the forward's extras.
fn train_micro_batch(
    model: &Transformer,
    batch: &Tensor,
    n_micro: u64,
) -> Result<(Tensor, ForwardOutput)> {
    let (lm, out) = model.loss(batch, true)?;
    let total = lm.f_add(&out.balance_loss)?.f_div_scalar(n_micro as f64)?;
    total.f_backward()?;
    Ok((lm, out))
}

/// How the micro-batches of a run alone on one device are run: op by op, or (feature `cuda`,
/// on a GPU) one warm-up micro-batch op by op, then the next captured as a CUDA graph and
/// every later one a replay of it with its own tokens and draw keys copied in (see
/// [`crate::runtime::graph`]). A capture that fails (some op waits for the host) says why
/// once and leaves the run op by op.
enum Runner {
    Eager,
    #[cfg(feature = "cuda")]
    Warmup,
    #[cfg(feature = "cuda")]
    Capture,
    #[cfg(feature = "cuda")]
    Replay(Box<Captured>),
}

/// A captured micro-batch: the graph, its input tokens and its outputs (rewritten in place
/// by every replay).
#[cfg(feature = "cuda")]
struct Captured {
    graph: crate::runtime::graph::Graph,
    batch: Tensor,
    lm: Tensor,
    out: ForwardOutput,
}

impl Runner {
    /// Graphs when asked for, on a GPU: the run moves to a side stream of torch's pool. Not
    /// for a model with MoE layers outside bf16 (`grouped`: it has some; `compute`: its
    /// dtype), which says so: there libtorch's grouped matmul takes a fallback that reads the
    /// group sizes on the host, which no graph can capture (its CUTLASS path is bf16 only).
    fn new(cuda_graph: bool, device: Device, compute: Kind, grouped: bool) -> Result<Runner> {
        #[cfg(feature = "cuda")]
        if let (true, Device::Cuda(n)) = (cuda_graph, device) {
            if grouped && compute != Kind::BFloat16 {
                eprintln!(
                    "note: micro-batches run op by op, not as a CUDA graph: outside bf16 \
                     libtorch's grouped matmul reads its group sizes on the host (precision = \
                     bf16 gets the graph)"
                );
                return Ok(Runner::Eager);
            }
            crate::runtime::graph::use_side_stream(n)?;
            // one bf16 copy of each weight per step, at addresses the graph keeps reading
            cast::enable();
            return Ok(Runner::Warmup);
        }
        let _ = (cuda_graph, device, compute, grouped);
        Ok(Runner::Eager)
    }

    /// Runs one micro-batch of `tokens` (on the CPU) with the model's draw keys as they are
    /// set now.
    fn run(
        &mut self,
        model: &Transformer,
        tokens: &Tensor,
        n_micro: u64,
    ) -> Result<(Tensor, ForwardOutput)> {
        let device = model.store.device;
        match self {
            Runner::Eager => train_micro_batch(model, &tokens.f_to_device(device)?, n_micro),
            #[cfg(feature = "cuda")]
            Runner::Warmup => {
                let out = train_micro_batch(model, &tokens.f_to_device(device)?, n_micro)?;
                *self = Runner::Capture;
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Runner::Capture => {
                use crate::runtime::{cuda::empty_cache, graph::Graph};
                let batch = tokens.f_to_device(device)?;
                // Every gradient must exist before the capture: the graph then adds into
                // it, as every eager micro-batch after the first does.
                let missing = model
                    .store
                    .params
                    .iter()
                    .find(|p| p.tensor.requires_grad() && !p.tensor.grad().defined());
                let captured = match missing {
                    Some(p) => Err(anyhow::anyhow!(
                        "`{}` got no gradient in the warm-up micro-batch",
                        p.name
                    )),
                    None => {
                        // the warm-up's cached blocks would otherwise stay beside the graph's pool
                        empty_cache()?;
                        Graph::capture(|| train_micro_batch(model, &batch, n_micro))
                    }
                };
                match captured {
                    Ok((graph, (lm, out))) => {
                        graph.replay()?;
                        let result = (lm.shallow_clone(), shallow(&out));
                        *self = Runner::Replay(Box::new(Captured {
                            graph,
                            batch,
                            lm,
                            out,
                        }));
                        Ok(result)
                    }
                    Err(e) => {
                        // libtorch's messages go on with a C++ backtrace: the first line says it
                        let why = format!("{e:#}");
                        eprintln!(
                            "warning: the training micro-batch could not be captured as a CUDA \
                             graph ({}); running it op by op (--no-cuda-graph says so up front)",
                            why.lines().next().unwrap_or_default()
                        );
                        *self = Runner::Eager;
                        cast::disable();
                        train_micro_batch(model, &batch, n_micro)
                    }
                }
            }
            #[cfg(feature = "cuda")]
            Runner::Replay(c) => {
                if tokens.size() != c.batch.size() {
                    bail!(
                        "internal error: a micro-batch of shape {:?} for a graph captured with {:?}",
                        tokens.size(),
                        c.batch.size()
                    );
                }
                crate::runtime::model::copy_from_host(tokens, &c.batch)?;
                c.graph.replay()?;
                Ok((c.lm.shallow_clone(), shallow(&c.out)))
            }
        }
    }

    /// How the micro-batches ran, for the summary's device line (empty: op by op).
    fn describe(&self) -> &'static str {
        match self {
            #[cfg(feature = "cuda")]
            Runner::Replay(_) => " + CUDA graph",
            _ => "",
        }
    }
}

impl Drop for Runner {
    /// The run is over (or failed): this thread's weight copies go.
    fn drop(&mut self) {
        cast::disable();
        #[cfg(feature = "cuda")]
        crate::runtime::fp8::clear();
    }
}

/// Another handle on the same output tensors.
#[cfg(feature = "cuda")]
fn shallow(out: &ForwardOutput) -> ForwardOutput {
    ForwardOutput {
        logits: out.logits.shallow_clone(),
        balance_loss: out.balance_loss.shallow_clone(),
        telemetry: out
            .telemetry
            .iter()
            .map(|(i, t)| {
                (
                    *i,
                    Telemetry {
                        tokens_per_expert: t.tokens_per_expert.shallow_clone(),
                        dropped_fraction: t.dropped_fraction.shallow_clone(),
                        gate_entropy: t.gate_entropy.shallow_clone(),
                        balance_loss: t.balance_loss.shallow_clone(),
                    },
                )
            })
            .collect(),
    }
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
fn tensor_parallel_loss(
    model: &Transformer,
    ctx: &RankContext,
    batch: &Tensor,
    train: bool,
    tape: &mut Tape,
    at: &str,
) -> Result<(Tensor, crate::runtime::model::ForwardOutput)> {
    let mut ex = ExchangedExperts {
        group: ctx.groups.expert(),
        placements: &ctx.plan.placements,
        at,
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
fn sum_over_data(ctx: &RankContext, values: &[f64], at: &str) -> Result<Vec<f64>> {
    let mut t = Tensor::f_from_slice(values)?.f_to_device(ctx.device)?;
    ctx.groups.data().all_reduce_sum(&mut t, at)?;
    Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
}

/// Sums `values` (f64, on any device) over the whole world (see
/// [`RankContext::world_group`]).
fn sum_over_world(ctx: &RankContext, values: &[f64], at: &str) -> Result<Vec<f64>> {
    let mut t = Tensor::f_from_slice(values)?.f_to_device(ctx.device)?;
    ctx.world_group().all_reduce_sum(&mut t, at)?;
    Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
}

/// Sums every MoE layer's accumulated telemetry over the data group.
fn reduce_telemetry(ctx: &RankContext, acc: &mut [(usize, Accum)], at: &str) -> Result<()> {
    for (layer, a) in acc.iter_mut() {
        let e = a.counts.size()[0];
        let packed = Tensor::f_cat(
            &[
                a.counts.f_to_kind(Kind::Float)?,
                a.dropped.f_to_kind(Kind::Float)?.f_reshape([1])?,
                a.entropy.f_to_kind(Kind::Float)?.f_reshape([1])?,
                a.balance.f_to_kind(Kind::Float)?.f_reshape([1])?,
            ],
            0,
        )?;
        let mut packed = packed.f_to_device(ctx.device)?;
        ctx.groups
            .data()
            .all_reduce_sum(&mut packed, &format!("{at}, layer {layer} telemetry"))?;
        a.counts = packed.f_narrow(0, 0, e)?;
        a.dropped = packed.f_select(0, e)?;
        a.entropy = packed.f_select(0, e + 1)?;
        a.balance = packed.f_select(0, e + 2)?;
    }
    Ok(())
}

fn read_metrics(path: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Trains the checked model. Returns the summary; errors are user-facing.
pub fn train(checked: &Checked, opts: &RunOptions) -> Result<RunSummary> {
    train_ranked(checked, opts, None)
}

/// Trains the checked model as one rank of many (`ctx`), or alone (`None`). Every rank of a
/// run calls this with the same arguments; rank 0 writes the files.
pub fn train_ranked(
    checked: &Checked,
    opts: &RunOptions,
    ctx: Option<&RankContext>,
) -> Result<RunSummary> {
    let Some(train) = &checked.train else {
        bail!(
            "`{}` has no `train` block: `fmoec run` needs one (data, batch, steps, optimizer)",
            checked.model.name
        );
    };
    let model_decl = &checked.model;
    let total_steps = opts.steps.unwrap_or(train.steps);
    let stop_at = opts.stop_after.unwrap_or(total_steps).min(total_steps);
    let mut compute = compute_kind(train.precision)?;
    let seq = train.seq_len as usize;
    if train.seq_len > model_decl.context {
        bail!(
            "seq_len {} exceeds the model's context {}",
            train.seq_len,
            model_decl.context
        );
    }
    let window = seq + 1;
    let main = ctx.is_none_or(|c| c.rank() == 0);
    let data_ranks = ctx.map_or(1, |c| c.data_size()) as u64;
    let data_rank = ctx.map_or(0, |c| c.data_rank()) as u64;
    let device = ctx.map_or(opts.device, |c| c.device);
    let fp8 = match train.precision {
        Precision::Fp8 { dense } => {
            // the CPU's emulation computes the rest in f32 (bf16 matmuls are slow there)
            if crate::runtime::fp8::mode_for(device)? == crate::runtime::fp8::Fp8Mode::Emulated {
                compute = Kind::Float;
            }
            Some(crate::runtime::fp8::Fp8Use {
                experts: true,
                dense,
            })
        }
        _ => None,
    };
    let (mb, mb_note) = run_micro_batch(checked, train, data_ranks, ctx)?;
    // Micro-batches of the global batch; this rank runs `m = i·D + data_rank`.
    let n_micro = train.batch_sequences / mb;
    let n_local = n_micro / data_ranks;
    let data = Dataset::load(&train.data, model_decl.vocab)?;
    data.check_window(window)?;

    for (dir, what) in [
        (&opts.out, "the output folder"),
        (&opts.checkpoints, "the checkpoint folder"),
    ] {
        if dir.exists() && !dir.is_dir() {
            bail!("{what} `{}` is a file, not a folder", dir.display());
        }
    }
    if opts.resume.is_none() && opts.checkpoints.join("latest").exists() {
        bail!(
            "`{}` already holds checkpoints; pass --resume to continue that run, or --out DIR \
             for a new one",
            opts.checkpoints.display()
        );
    }

    // The experts this rank holds per MoE layer (all of them alone).
    let local: std::collections::BTreeMap<usize, Vec<usize>> = model_decl
        .moe_layers()
        .map(|(layer, m)| {
            let ids = match ctx {
                Some(c) => c.local_experts(layer).to_vec(),
                None => (0..m.experts as usize).collect(),
            };
            (layer, ids)
        })
        .collect();
    // Only this rank's experts are built, with the values the one-rank model gives them.
    let mut model = {
        let _rng = lock_rng();
        let seed = mix_all(&[train.seed, 0xB01D]);
        Transformer::new_seeded(model_decl, device, Kind::Float, compute, seed, &local)?
    };
    let tensor = ctx.map_or(1, |c| c.tensor_size());
    if let Some(c) = ctx {
        if c.plan.tensor_size() != tensor {
            bail!(
                "internal error: the plan has tensor groups of {}, the rank's tensor group has {tensor} ranks",
                c.plan.tensor_size()
            );
        }
    }
    let mut adam = AdamW::new(&train.optimizer, &model.store)?;
    let mut start_step = 0;
    let mut tokens_seen = 0;
    if let Some(path) = &opts.resume {
        let resumed = checkpoint::resume(path, model_decl, &model.store, &mut adam, &local)?;
        start_step = resumed.step;
        tokens_seen = resumed.tokens_seen;
        if resumed.seed != train.seed {
            bail!(
                "checkpoint `{}` was written with seed {}, the file says {}",
                resumed.dir.display(),
                resumed.seed,
                train.seed
            );
        }
    }
    // The shapes of the whole (unsplit) parameters, for gathering them into checkpoints.
    let whole_shapes: Vec<Vec<i64>> = model.store.params.iter().map(|p| p.tensor.size()).collect();
    if let Some(c) = ctx.filter(|_| tensor > 1) {
        model.split_tensor_parallel(TensorParallel {
            rank: c.groups.tensor().rank(),
            size: tensor,
            expert_slicing: c.plan.expert_slicing,
        })?;
        for (i, p) in model.store.params.iter().enumerate() {
            adam.m[i] = model.tensor_shard_of(&p.name, &adam.m[i])?;
            adam.v[i] = model.tensor_shard_of(&p.name, &adam.v[i])?;
        }
    }
    let kinds = distributed::param_kinds(&model);
    let splits = model.tensor_splits();
    model.set_compute(compute);
    if let Some(fp8) = fp8 {
        let tokens = (mb * train.seq_len) as i64;
        let bf16_layers = model.set_fp8(fp8, tokens, &checked.parallel.hardware);
        if main && !bf16_layers.is_empty() {
            eprintln!(
                "note: precision = fp8: the experts of layer(s) {bf16_layers:?} stay in bf16, where \
                 the planner estimates FP8 would not pay on `{}` (`fmoec plan` says why; \
                 FMOEC_FP8_EXPERTS=all forces FP8)",
                checked.parallel.hardware.name
            );
        }
    }
    if main {
        if let Some(c) = ctx {
            for note in &c.plan.notes {
                eprintln!("note: {note}");
            }
        }
        if let Some(note) = &mb_note {
            eprintln!("note: {note}");
        }
    }

    let metrics_path = opts.out.join("metrics.jsonl");
    // Keep the history before the resumed step (a crashed run may have logged past its last
    // checkpoint), drop the rest.
    let kept: Vec<String> = if opts.resume.is_some() && main {
        read_metrics(&metrics_path)
            .into_iter()
            .filter(|m| m.step <= start_step)
            .map(|m| serde_json::to_string(&m).expect("metrics serialize"))
            .collect()
    } else {
        Vec::new()
    };
    let mut metrics_file: Box<dyn Write> = if main {
        std::fs::create_dir_all(&opts.out)
            .with_context(|| format!("cannot create `{}`", opts.out.display()))?;
        let mut file = std::fs::File::create(&metrics_path)
            .with_context(|| format!("cannot write `{}`", metrics_path.display()))?;
        for line in &kept {
            writeln!(file, "{line}")?;
        }
        Box::new(file)
    } else {
        Box::new(std::io::sink())
    };

    install_interrupt_handler();
    INTERRUPTED.store(false, Ordering::SeqCst);

    let bar = if opts.progress && main {
        indicatif::ProgressBar::new(total_steps)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(start_step);

    let lr_max = train.optimizer.lr();
    let save_info = |step: u64, tokens: u64| SaveInfo {
        model: model_decl,
        step,
        tokens_seen: tokens,
        seed: train.seed,
        data_source: data.description.clone(),
        precision: precision_name(train.precision).to_string(),
    };
    let mut runner = Runner::new(
        opts.cuda_graph && ctx.is_none(),
        device,
        compute,
        model_decl.moe_layers().next().is_some(),
    )?;
    let started = Instant::now();
    let mut losses = Vec::new();
    let mut last_ckpt = None;
    let mut last_eval = None;
    let mut interrupted = false;
    let tokens_per_step = train.batch_sequences * train.seq_len;
    // Checkpoints kept after each save (0: all).
    let keep = train.checkpoint.as_ref().map_or(0, |c| c.keep);
    let mut step = start_step;
    while step < stop_at {
        let step_start = Instant::now();
        if ctx.is_none() {
            let _rng = lock_rng();
            tch::manual_seed(mix_all(&[train.seed, STEP_KEY, step]) as i64);
        }
        model.store.zero_grad();
        cast::begin_step()?;
        let mut lm_sum = Tensor::f_zeros([], (Kind::Float, device))?;
        let mut bal_sum = Tensor::f_zeros([], (Kind::Float, device))?;
        let mut acc = Vec::new();
        for i in 0..n_local {
            let m = i * data_ranks + data_rank;
            let key = [train.seed, step, m];
            let tokens = data.batch(false, &key, mb as usize, window, Device::Cpu)?;
            model.set_routing_key(Some(&key))?;
            let (lm, out) = match ctx {
                None => runner.run(&model, &tokens, n_micro)?,
                Some(c) if tensor > 1 => {
                    let batch = tokens.f_to_device(device)?;
                    let label = format!("step {}, micro-batch {m}", step + 1);
                    let mut tape = Tape::new();
                    let (lm, out) =
                        tensor_parallel_loss(&model, c, &batch, true, &mut tape, &label)?;
                    let total = lm.f_add(&out.balance_loss)?.f_div_scalar(n_local as f64)?;
                    tape.backward_tensor_parallel(
                        &total,
                        c.groups.expert(),
                        c.groups.tensor(),
                        &format!("{label} backward"),
                    )?;
                    (lm, out)
                }
                Some(c) => {
                    let batch = tokens.f_to_device(device)?;
                    let label = format!("step {}, micro-batch {m}", step + 1);
                    let mut hook = ExpertParallel::new(c, true, label);
                    let (lm, out) = model.loss_with(&batch, true, Some(&mut hook))?;
                    let total = lm.f_add(&out.balance_loss)?.f_div_scalar(n_local as f64)?;
                    hook.backward(&total)?;
                    (lm, out)
                }
            };
            lm_sum = lm_sum.f_add(&lm.f_detach()?)?;
            bal_sum = bal_sum.f_add(&out.balance_loss.f_detach()?)?;
            accumulate(&mut acc, out.telemetry)?;
        }
        model.set_routing_key(None)?;
        cast::end_step();
        let (grad_norm, loss, balance) = match ctx {
            Some(c) => {
                let at = format!("step {}", step + 1);
                let norm = {
                    let params: Vec<(ParamKind, &Tensor)> = kinds
                        .iter()
                        .zip(&model.store.params)
                        .map(|(k, p)| (*k, &p.tensor))
                        .collect();
                    if tensor > 1 {
                        let partial: Vec<(TensorSplit, &Tensor)> = splits
                            .iter()
                            .zip(&model.store.params)
                            .map(|(s, p)| (*s, &p.tensor))
                            .collect();
                        sum_partial_gradients(c.groups.tensor(), &partial, &at)?;
                        reduce_gradients(&c.groups, &params, &at)?;
                        let with_split: Vec<(ParamKind, TensorSplit, &Tensor)> = kinds
                            .iter()
                            .zip(&splits)
                            .zip(&model.store.params)
                            .map(|((k, s), p)| (*k, *s, &p.tensor))
                            .collect();
                        clip_global_norm_tensor_parallel(
                            &c.groups,
                            c.groups.tensor(),
                            &with_split,
                            train.clip_grad,
                            &at,
                        )?
                    } else {
                        reduce_gradients(&c.groups, &params, &at)?;
                        clip_global_norm(&c.groups, &params, train.clip_grad, &at)?
                    }
                };
                let sums = sum_over_data(
                    c,
                    &[lm_sum.f_double_value(&[])?, bal_sum.f_double_value(&[])?],
                    &format!("{at}, loss"),
                )?;
                reduce_telemetry(c, &mut acc, &at)?;
                (
                    norm.total,
                    sums[0] / n_micro as f64,
                    sums[1] / n_micro as f64,
                )
            }
            None => {
                let norm = match train.clip_grad {
                    Some(c) => optim::clip_grad_norm(&mut model.store, c)?,
                    None => optim::global_grad_norm(&model.store)?,
                };
                (
                    norm.f_double_value(&[])?,
                    lm_sum.f_double_value(&[])? / n_micro as f64,
                    bal_sum.f_double_value(&[])? / n_micro as f64,
                )
            }
        };
        #[cfg(feature = "cuda")]
        if fp8.is_some() {
            let overflowed = crate::runtime::fp8::take_overflow(device)?;
            if overflowed > 0 {
                bar.abandon();
                bail!(
                    "step {}: {overflowed} FP8 scale(s) overflowed (a tensor quantised to FP8 held \
                     Inf or NaN); the step was not applied. Lower the learning rate, or train \
                     with precision = bf16 to see where the values diverge",
                    step + 1
                );
            }
        }
        let lr = optim::learning_rate(&train.schedule, lr_max, step, total_steps);
        adam.step(&mut model.store, lr)?;
        step += 1;
        tokens_seen += tokens_per_step;

        if !loss.is_finite() {
            bar.abandon();
            bail!(
                "the loss became {loss} at step {step}; lower the learning rate or check the data"
            );
        }
        losses.push(loss);
        let dt = step_start.elapsed().as_secs_f64();
        let moe = if main {
            reports(acc, n_micro as f64)?
        } else {
            Vec::new()
        };
        let mut rec = StepMetrics {
            step,
            loss,
            balance_loss: balance,
            lr,
            grad_norm,
            tokens: tokens_seen,
            tokens_per_s: tokens_per_step as f64 / dt.max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
            moe,
            eval_loss: None,
            eval_ppl: None,
        };
        if let Some(ev) = &train.eval {
            if ev.every > 0 && (step % ev.every == 0 || step == total_steps) {
                let l = evaluate_ranked(
                    &model,
                    &data,
                    train.seed,
                    ev.batches,
                    mb as usize,
                    window,
                    ctx,
                )?;
                rec.eval_loss = Some(l);
                rec.eval_ppl = Some(l.exp());
                last_eval = Some(l);
                bar.println(format!(
                    "step {step}: eval loss {l:.4}, perplexity {:.2}",
                    l.exp()
                ));
            }
        }
        writeln!(metrics_file, "{}", serde_json::to_string(&rec)?)?;
        let load = rec
            .moe
            .iter()
            .map(|m| m.telemetry.max_over_mean_load)
            .fold(0.0, f64::max);
        bar.set_position(step);
        bar.set_message(format!(
            "loss {loss:.4} | lr {lr:.2e} | {:.0} tok/s | max/mean load {load:.2} | bal {balance:.4}",
            rec.tokens_per_s
        ));
        if let Some(policy) = &train.checkpoint {
            if policy.every > 0 && step % policy.every == 0 && step < stop_at {
                last_ckpt = Some(save_checkpoint(
                    &opts.checkpoints,
                    &save_info(step, tokens_seen),
                    &model,
                    &whole_shapes,
                    &adam,
                    ctx,
                    keep,
                )?);
            }
        }
        let mut stop = INTERRUPTED.load(Ordering::SeqCst);
        if let Some(c) = ctx {
            // Every rank stops at the same step, whichever of them saw Ctrl-C.
            let flag = sum_over_world(c, &[f64::from(u8::from(stop))], "interrupt flag")?;
            stop = flag[0] > 0.0;
        }
        if stop {
            interrupted = true;
            break;
        }
    }
    metrics_file.flush()?;
    if step > start_step || opts.resume.is_none() {
        let dir = opts.checkpoints.join(checkpoint::step_dir_name(step));
        // Every rank must take the same branch: rank 0's view of the folder decides.
        let mut exists = dir.exists();
        if let Some(c) = ctx {
            let seen = f64::from(u8::from(exists && c.rank() == 0));
            exists = sum_over_world(c, &[seen], "final checkpoint")?[0] > 0.0;
        }
        if !exists {
            last_ckpt = Some(save_checkpoint(
                &opts.checkpoints,
                &save_info(step, tokens_seen),
                &model,
                &whole_shapes,
                &adam,
                ctx,
                keep,
            )?);
        }
    }
    bar.finish_and_clear();
    if interrupted && main {
        eprintln!(
            "interrupted: saved step {step} to `{}`; continue with --resume",
            last_ckpt
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let done = step - start_step;
    let plot_path = opts.out.join("plot.png");
    let plot = if main {
        let history = read_metrics(&metrics_path);
        match plot::draw(&history, &plot_path) {
            Ok(()) => Some(plot_path),
            Err(e) => {
                eprintln!("warning: could not draw `{}`: {e:#}", plot_path.display());
                None
            }
        }
    } else {
        None
    };
    let (parameters, device_name) = match ctx {
        Some(c) => {
            // Experts counted once over the expert group, the rest once; tensor-sharded
            // parameters summed over the tensor group first.
            let mut expert = 0i64;
            let mut rest = 0i64;
            let mut sharded = [0i64; 2];
            for ((k, s), p) in kinds.iter().zip(&splits).zip(&model.store.params) {
                let n = p.tensor.numel() as i64;
                let is_expert = *k == ParamKind::Expert;
                match (is_expert, *s == TensorSplit::Sharded && tensor > 1) {
                    (e, true) => sharded[usize::from(e)] += n,
                    (true, false) => expert += n,
                    (false, false) => rest += n,
                }
            }
            if tensor > 1 {
                let mut t = Tensor::f_from_slice(&sharded)?.f_to_device(c.device)?;
                c.groups
                    .tensor()
                    .all_reduce_sum(&mut t, "sharded parameter count")?;
                rest += t.f_int64_value(&[0])?;
                expert += t.f_int64_value(&[1])?;
            }
            let mut t = Tensor::f_from_slice(&[expert])?.f_to_device(c.device)?;
            c.groups
                .expert()
                .all_reduce_sum(&mut t, "parameter count")?;
            let expert = t.f_int64_value(&[0])?;
            let name = if tensor > 1 {
                format!(
                    "{:?} x {} ranks (tensor {tensor} x data {})",
                    device,
                    c.world(),
                    c.data_size()
                )
            } else {
                format!("{:?} x {} ranks", device, c.world())
            };
            (rest + expert, name)
        }
        None => (
            model.store.numel(),
            format!("{device:?}{}", runner.describe()),
        ),
    };
    let summary = RunSummary {
        model: model_decl.name.clone(),
        parameters,
        data: data.description.clone(),
        device: device_name,
        precision: precision_name(train.precision).to_string(),
        batch_sequences: train.batch_sequences,
        seq_len: train.seq_len,
        micro_batch: mb,
        start_step,
        steps_done: done,
        total_steps,
        tokens: tokens_seen,
        seconds,
        tokens_per_s: (done * tokens_per_step) as f64 / seconds.max(1e-9),
        first_loss: losses.first().copied(),
        final_loss: losses.last().copied(),
        final_eval_loss: last_eval,
        final_eval_ppl: last_eval.map(f64::exp),
        unigram_entropy: data.unigram_entropy(),
        interrupted,
        checkpoint: last_ckpt,
        metrics: metrics_path,
        plot,
        losses,
    };
    if main {
        std::fs::write(
            opts.out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        if opts.print_summary {
            print_summary(&summary);
        }
    }
    Ok(summary)
}

/// Saves a checkpoint, then (rank 0, once every rank's part is written) deletes all but the
/// newest `keep` (0 keeps all). A failed deletion is a warning: the new checkpoint is complete.
fn save_checkpoint(
    root: &Path,
    info: &SaveInfo<'_>,
    model: &Transformer,
    whole_shapes: &[Vec<i64>],
    adam: &AdamW,
    ctx: Option<&RankContext>,
    keep: u64,
) -> Result<PathBuf> {
    let saved = match ctx {
        Some(c) if c.tensor_size() > 1 => {
            let (store, adam) = gather_tensor_parallel(model, whole_shapes, adam, c, info.step)?;
            checkpoint::save_sharded(root, info, &store, &adam, c)
        }
        Some(c) => checkpoint::save_sharded(root, info, &model.store, adam, c),
        None => checkpoint::save(root, info, &model.store, adam),
    }?;
    if ctx.is_none_or(|c| c.rank() == 0) {
        if let Err(e) = checkpoint::prune(root, keep) {
            eprintln!("warning: older checkpoints were not all deleted (keep = {keep}): {e:#}");
        }
    }
    Ok(saved)
}

/// The whole parameters and AdamW moments of a tensor-parallel rank: every sharded tensor
/// placed in a zero tensor of its whole shape and summed over the tensor group (exact: each
/// element is one rank's value plus zeros), the rest shared as they are. Every rank of the
/// tensor group calls it, in the same order.
fn gather_tensor_parallel(
    model: &Transformer,
    whole_shapes: &[Vec<i64>],
    adam: &AdamW,
    ctx: &RankContext,
    step: u64,
) -> Result<(crate::runtime::params::ParamStore, AdamW)> {
    let _guard = tch::no_grad_guard();
    let at = format!("checkpoint of step {step}, gathering tensor slices");
    let mut store = crate::runtime::params::ParamStore::new(model.store.device, model.store.kind);
    let mut m = Vec::with_capacity(adam.m.len());
    let mut v = Vec::with_capacity(adam.v.len());
    let whole = |name: &str, shape: &[i64], local: &Tensor| -> Result<Tensor> {
        match model.tensor_whole_from_shard(name, shape, local)? {
            Some(mut t) => {
                ctx.groups.tensor().all_reduce_sum(&mut t, &at)?;
                Ok(t)
            }
            None => Ok(local.shallow_clone()),
        }
    };
    for (i, (p, shape)) in model.store.params.iter().zip(whole_shapes).enumerate() {
        store.params.push(crate::runtime::params::Param {
            name: p.name.clone(),
            tensor: whole(&p.name, shape, &p.tensor.f_detach()?)?,
            decay: p.decay,
        });
        m.push(whole(&p.name, shape, &adam.m[i])?);
        v.push(whole(&p.name, shape, &adam.v[i])?);
    }
    let gathered = AdamW {
        betas: adam.betas,
        eps: adam.eps,
        weight_decay: adam.weight_decay,
        step: adam.step,
        m,
        v,
    };
    Ok((store, gathered))
}

fn print_summary(s: &RunSummary) {
    println!("model      {} ({} parameters)", s.model, s.parameters);
    println!("data       {}", s.data);
    println!("device     {} ({})", s.device, s.precision);
    println!(
        "batch      {} x {} tokens per step, micro-batches of {} sequences",
        s.batch_sequences, s.seq_len, s.micro_batch
    );
    println!(
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
            Some(h) => println!("loss       {a:.4} -> {b:.4} (unigram entropy of the data {h:.4})"),
            None => println!("loss       {a:.4} -> {b:.4}"),
        }
    }
    if let (Some(l), Some(p)) = (s.final_eval_loss, s.final_eval_ppl) {
        println!("eval       loss {l:.4}, perplexity {p:.2}");
    }
    if let Some(c) = &s.checkpoint {
        println!("checkpoint {}", c.display());
    }
    println!("metrics    {}", s.metrics.display());
    if let Some(p) = &s.plot {
        println!("plot       {}", p.display());
    }
}

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub device: Device,
    pub checkpoint: PathBuf,
    pub prompt: String,
    pub tokens: usize,
    pub temperature: f64,
    pub top_k: i64,
    pub seed: u64,
}

/// Generates `tokens` bytes after `prompt` from a checkpoint of the checked model.
pub fn sample(checked: &Checked, opts: &SampleOptions) -> Result<String> {
    let model_decl = &checked.model;
    if model_decl.vocab < 256 {
        bail!(
            "sampling text needs a byte-level vocabulary (vocab >= 256), the model has {}",
            model_decl.vocab
        );
    }
    let source = checkpoint::Source::open(&opts.checkpoint, model_decl)?;
    let compute = match &checked.train {
        Some(t) => compute_kind(t.precision)?,
        None => Kind::Float,
    };
    // Sampling draws from libtorch's global generator: hold it, as the trainer does, so
    // other threads of this process (tests, in-process ranks) do not move its state.
    let _rng = lock_rng();
    let model = Transformer::new(model_decl, opts.device, Kind::Float, compute)?;
    let all = model_decl
        .moe_layers()
        .map(|(layer, m)| (layer, (0..m.experts as usize).collect()))
        .collect();
    source.restore(&model.store, None, &all)?;
    tch::manual_seed(mix_all(&[opts.seed, 0x5A3]) as i64);
    let _guard = tch::no_grad_guard();
    let mut ids: Vec<i64> = opts.prompt.bytes().map(i64::from).collect();
    if ids.is_empty() {
        ids.push(b'\n' as i64);
    }
    let ctx = model_decl.context as usize;
    let start = ids.len();
    for _ in 0..opts.tokens {
        let from = ids.len().saturating_sub(ctx);
        let input = Tensor::f_from_slice(&ids[from..])?
            .f_unsqueeze(0)?
            .f_to(opts.device)?;
        let out = model.forward(&input, false)?;
        let last = out
            .logits
            .f_select(1, -1)?
            .f_select(0, 0)?
            .f_to_kind(Kind::Float)?;
        let next = if opts.temperature <= 0.0 {
            last.f_argmax(0, false)?.f_int64_value(&[])?
        } else {
            let scaled = last.f_div_scalar(opts.temperature)?;
            let k = opts.top_k.clamp(1, scaled.size()[0]);
            let (vals, idx) = scaled.f_topk(k, 0, true, true)?;
            let probs = vals.f_softmax(0, Kind::Float)?;
            let pick = probs.f_multinomial(1, false)?;
            idx.f_index_select(0, &pick)?.f_int64_value(&[0])?
        };
        ids.push(next);
    }
    let bytes: Vec<u8> = ids[start..]
        .iter()
        .map(|&t| t.clamp(0, 255) as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
