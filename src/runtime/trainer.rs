//! The trainer: one run of the training loop in this process, alone on a device or as one
//! rank of many, in phases.
//!
//! - [`Trainer::setup`]: everything checked and allocated before the first step, in this
//!   order: the plan's micro-batch, the output folders, the memory check (before anything
//!   is allocated), the data, this rank's model (only its experts), the optimizer, the run's
//!   starting point ([`Trainer::start_from`]: a checkpoint, or the seeded initialisation),
//!   the tensor split, the metrics log and the progress display.
//! - [`Trainer::step`]: one optimizer step: this rank's micro-batches forward and backward
//!   ([`Trainer::forward_backward`], by [`Pass`]), the reduction of the gradients by kind and
//!   the clipping by the global norm ([`Trainer::reduce_and_clip`]), AdamW, the step's
//!   metrics.
//! - [`Trainer::evaluate`]: the held-out loss, shared by the data ranks.
//! - [`Trainer::save`]: a checkpoint (sharded with several ranks, gathered whole under tensor
//!   parallelism), then the older ones beyond `keep` deleted.
//! - [`Trainer::finish`]: the final checkpoint, the plot and the summary.
//!
//! [`Trainer::run`] runs them in order, logs every step, and stops after the step in which a
//! signal arrived ([`stop`]), every rank at the same step.
//!
//! # Pipeline parallelism
//! A rank of a pipeline stage holds its stage's [`ModelPart`] (its blocks, in model chunks
//! with virtual stages; the embedding on the first stage, the final norm and the head on the
//! last, with a copy of a tied embedding). [`Pass::Pipeline`] runs all of the step's
//! micro-batches inside [`Trainer::forward_backward`] by the schedule
//! ([`crate::runtime::pipeline`]); [`Trainer::reduce_and_clip`] then reduces the gradients
//! within the stage as without a pipeline, sums the tied embedding's between the first and
//! the last stage (which keeps the two copies equal), sums the norm's squares over the
//! stages (the copy counted once) and the losses and telemetry over the stages; evaluation
//! runs the schedule forward only; checkpoints hold each stage's part under the whole
//! model's names, so they resume on any pipeline size. Knows nothing about the command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::check::{Checked, Precision, Train};
use crate::collective::{
    clip_global_norm, clip_global_norm_pipeline, clip_global_norm_tensor_parallel,
    reduce_gradients, sum_partial_gradients, sum_tied_gradients, Collective, ParamKind, Tape,
    TensorSplit,
};
use crate::diag::path_text;
use crate::runtime::checkpoint::{self, SaveInfo};
use crate::runtime::data::{mix_all, Dataset};
use crate::runtime::distributed::{self, ExpertParallel, RankContext, WorldPlan};
use crate::runtime::metrics::MetricsLog;
use crate::runtime::model::{lock_rng, ForwardOutput, ModelPart, TensorParallel, Transformer};
use crate::runtime::moe::Telemetry;
use crate::runtime::optim::{self, AdamW};
use crate::runtime::params::{Param, ParamStore};
use crate::runtime::pipeline::{self, Feed};
use crate::runtime::progress::Progress;
use crate::runtime::replay::Runner;
use crate::runtime::train::{
    compute_kind, evaluate_ranked, micro_batch_for, precision_name, print_summary, sum_over_data,
    sum_over_world, tensor_parallel_loss, LayerMetrics, RunOptions, RunSummary, StepMetrics,
    EVAL_KEY,
};
use crate::runtime::{cast, fit, fp8, plot, stop, telemetry, trace};

/// Keys libtorch's generator for a step of a run alone (nothing of the run draws from it
/// today; kept so that a future draw is reproducible too).
const STEP_KEY: u64 = 0x57E9;

/// The token embedding, which a tied head shares (the first and the last pipeline stage
/// each hold it).
const TIED_EMBEDDING: &str = "embed.tokens";

/// How this process runs one training micro-batch forward and backward.
enum Pass {
    /// Alone on a device: op by op, or replayed as a CUDA graph.
    Alone(Runner),
    /// One rank of many with tensor = 1: the experts exchanged over the expert group, the
    /// backward replayed in segments ([`ExpertParallel`]).
    ExpertParallel,
    /// One rank of a tensor group (and of an expert group): Megatron's regions around the
    /// sharded matrices ([`Transformer::loss_tensor_parallel`]).
    TensorParallel,
    /// One rank of a pipeline stage: the step's micro-batches through its model chunks by
    /// the schedule ([`pipeline::run`]), with tensor and expert parallelism inside.
    Pipeline,
}

/// What one step's micro-batches of this rank add up to, before any reduction.
pub struct StepSums {
    /// Sum of the micro-batches' LM losses.
    lm: Tensor,
    /// Sum of their weighted balance losses.
    balance: Tensor,
    /// Per MoE layer, its telemetry summed over the micro-batches.
    telemetry: Vec<(usize, Accum)>,
}

impl StepSums {
    /// Nothing yet: zero losses on `device`, no telemetry.
    fn zero(device: Device) -> Result<StepSums> {
        Ok(StepSums {
            lm: Tensor::f_zeros([], (Kind::Float, device))?,
            balance: Tensor::f_zeros([], (Kind::Float, device))?,
            telemetry: Vec::new(),
        })
    }

    /// Adds one micro-batch's LM loss (a pipeline stage without the head has none), its
    /// balance loss and its telemetry.
    fn add(
        &mut self,
        lm: Option<&Tensor>,
        balance: &Tensor,
        telemetry: Vec<(usize, Telemetry)>,
    ) -> Result<()> {
        if let Some(lm) = lm {
            self.lm = self.lm.f_add(lm)?;
        }
        self.balance = self.balance.f_add(balance)?;
        accumulate(&mut self.telemetry, telemetry)
    }
}

/// A step's reduced figures.
struct Reduced {
    grad_norm: f64,
    /// Mean LM loss over the global batch's micro-batches.
    loss: f64,
    balance: f64,
    telemetry: Vec<(usize, Accum)>,
}

impl Reduced {
    /// The step's figures, with its summed `[lm, balance]` losses averaged over the global
    /// batch's `micro_batches`.
    fn over_global_batch(
        micro_batches: u64,
        grad_norm: f64,
        [lm, balance]: [f64; 2],
        telemetry: Vec<(usize, Accum)>,
    ) -> Reduced {
        let micro_batches = micro_batches as f64;
        Reduced {
            grad_norm,
            loss: lm / micro_batches,
            balance: balance / micro_batches,
            telemetry,
        }
    }
}

/// Every parameter's tensor (the reductions act on its `.grad`) as the collectives take
/// them: with its kind, with how tensor parallelism splits it, or with both.
struct GradientViews<'t> {
    by_kind: Vec<(ParamKind, &'t Tensor)>,
    by_split: Vec<(TensorSplit, &'t Tensor)>,
    with_split: Vec<(ParamKind, TensorSplit, &'t Tensor)>,
}

impl<'t> GradientViews<'t> {
    fn of(kinds: &[ParamKind], splits: &[TensorSplit], params: &'t [Param]) -> GradientViews<'t> {
        let by_kind = kinds
            .iter()
            .zip(params)
            .map(|(k, p)| (*k, &p.tensor))
            .collect();
        let with_split: Vec<(ParamKind, TensorSplit, &Tensor)> = kinds
            .iter()
            .zip(splits)
            .zip(params)
            .map(|((k, s), p)| (*k, *s, &p.tensor))
            .collect();
        let by_split = with_split.iter().map(|&(_, s, t)| (s, t)).collect();
        GradientViews {
            by_kind,
            by_split,
            with_split,
        }
    }
}

/// The training loop of one run in this process; see the module docs for its phases.
pub struct Trainer<'a> {
    checked: &'a Checked,
    train: &'a Train,
    opts: &'a RunOptions,
    ctx: Option<&'a RankContext>,
    device: Device,
    /// Rank 0: prints, writes metrics, summary and plot.
    main: bool,
    /// Tokens read per sequence: the sequence and its next token.
    window: usize,
    /// Sequences per micro-batch.
    micro_batch: u64,
    /// Micro-batches of the global batch per step; this rank runs `m = i·D + data_rank` for
    /// `i < local_micro_batches`.
    micro_batches: u64,
    local_micro_batches: u64,
    data_ranks: u64,
    data_rank: u64,
    /// Ranks per tensor group.
    tensor: usize,
    total_steps: u64,
    /// This process stops (with a checkpoint) after this step.
    stop_at: u64,
    tokens_per_step: u64,
    /// Checkpoints kept after each save (0: all).
    keep: u64,
    data: Dataset,
    model: Transformer,
    adam: AdamW,
    kinds: Vec<ParamKind>,
    splits: Vec<TensorSplit>,
    /// Whether each parameter counts in the gradient norm and the parameter count (all but
    /// the last pipeline stage's copy of a tied embedding).
    counted: Vec<bool>,
    /// The shapes of the whole (unsplit) parameters, for gathering them into checkpoints.
    whole_shapes: Vec<Vec<i64>>,
    pass: Pass,
    start_step: u64,
    /// Steps completed.
    step: u64,
    tokens_seen: u64,
    metrics: Option<MetricsLog>,
    progress: Progress,
    losses: Vec<f64>,
    last_checkpoint: Option<PathBuf>,
    last_eval: Option<f64>,
    started: Instant,
    /// `precision = fp8`: every step checks the FP8 scales' overflow counter before applying.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fp8: bool,
    /// Rank 0 on a GPU NVML sees: the clock and power while the steps run.
    gpu: Option<telemetry::Sampler>,
    /// `--trace`: libtorch's profiler recording the chosen steps.
    #[cfg(feature = "cuda")]
    tracer: Option<trace::Tracer>,
    /// What the trace found, once written.
    trace: Option<trace::TraceSummary>,
}

impl<'a> Trainer<'a> {
    /// Checks the run and sets it up for its first step. `plan` is the run's plan (with a
    /// `ctx`, the rank's: `ctx.plan`). Errors are user-facing; nothing is allocated before
    /// the memory check.
    pub fn setup(
        checked: &'a Checked,
        opts: &'a RunOptions,
        plan: &'a WorldPlan,
        ctx: Option<&'a RankContext>,
    ) -> Result<Trainer<'a>> {
        let shape = RunShape::of(checked, opts, plan, ctx)?;
        check_output_folders(opts)?;
        check_memory(plan, ctx, shape.device)?;
        let local = local_experts(checked, ctx);
        let allocated = allocate(checked, opts, plan, ctx, &shape, &local)?;
        let mut trainer = Trainer::assemble(checked, opts, ctx, &shape, allocated);
        trainer.start_from(&local)?;
        if let Some(c) = ctx {
            trainer.agree_on_start(c)?;
        }
        trainer.shard_over_tensor_group(plan)?;
        trainer.classify_params();
        trainer.set_precision(&shape, plan);
        trainer.prepare_trace()?;
        if trainer.main {
            for note in plan.notes.iter().chain(&shape.micro_batch_note) {
                crate::errln!("note: {note}");
            }
        }
        trainer.open_outputs()?;
        stop::install();
        stop::clear();
        trainer.start_progress();
        Ok(trainer)
    }

    /// The trainer over what [`allocate`] made, before its starting point is set: at step 0,
    /// with no metrics log and a silent progress display yet.
    fn assemble(
        checked: &'a Checked,
        opts: &'a RunOptions,
        ctx: Option<&'a RankContext>,
        shape: &RunShape<'a>,
        allocated: Allocated,
    ) -> Trainer<'a> {
        let Allocated {
            data,
            model,
            adam,
            pass,
        } = allocated;
        let whole_shapes = model.store.params.iter().map(|p| p.tensor.size()).collect();
        Trainer {
            checked,
            train: shape.train,
            opts,
            ctx,
            device: shape.device,
            main: shape.main,
            window: shape.window,
            micro_batch: shape.micro_batch,
            micro_batches: shape.micro_batches,
            local_micro_batches: shape.micro_batches / shape.data_ranks,
            data_ranks: shape.data_ranks,
            data_rank: shape.data_rank,
            tensor: shape.tensor,
            total_steps: shape.total_steps,
            stop_at: shape.stop_at,
            tokens_per_step: shape.train.batch_sequences * shape.train.seq_len,
            keep: shape.train.checkpoint.as_ref().map_or(0, |c| c.keep),
            data,
            model,
            adam,
            kinds: Vec::new(),
            splits: Vec::new(),
            counted: Vec::new(),
            whole_shapes,
            pass,
            start_step: 0,
            step: 0,
            tokens_seen: 0,
            metrics: None,
            progress: Progress::new(false, false, opts.log_interval, 0, shape.total_steps),
            losses: Vec::new(),
            last_checkpoint: None,
            last_eval: None,
            started: Instant::now(),
            fp8: shape.fp8.is_some(),
            gpu: None,
            #[cfg(feature = "cuda")]
            tracer: None,
            trace: None,
        }
    }

    /// Under tensor parallelism, keeps this rank's shard of every split parameter and of its
    /// optimizer state (the starting point was set on the whole parameters).
    fn shard_over_tensor_group(&mut self, plan: &WorldPlan) -> Result<()> {
        let Some(c) = self.ctx.filter(|_| self.tensor > 1) else {
            return Ok(());
        };
        self.model.split_tensor_parallel(TensorParallel {
            rank: c.groups.tensor().rank(),
            size: self.tensor,
            expert_slicing: plan.expert_slicing,
        })?;
        let (model, adam) = (&self.model, &mut self.adam);
        for (i, p) in model.store.params.iter().enumerate() {
            adam.m[i] = model.tensor_shard_of(&p.name, &adam.m[i])?;
            adam.v[i] = model.tensor_shard_of(&p.name, &adam.v[i])?;
        }
        Ok(())
    }

    /// Each parameter's kind for the gradient reduction, its tensor split, and whether it
    /// counts in the gradient norm (a pipeline's second copy of a tied embedding does not).
    fn classify_params(&mut self) {
        self.kinds = distributed::param_kinds(&self.model);
        self.splits = self.model.tensor_splits();
        let copy = self.model.part.holds_tied_copy(&self.model.model);
        self.counted = self
            .model
            .store
            .params
            .iter()
            .map(|p| !(copy && p.name == TIED_EMBEDDING))
            .collect();
    }

    /// The model's compute dtype and, with `precision = fp8`, its FP8 matmuls: the plan's
    /// choice for the run's layout ([`WorldPlan::fp8_fallbacks_for`]) with the overrides on top
    /// ([`fp8::with_overrides`]). Rank 0 says what stays in bf16.
    fn set_precision(&mut self, shape: &RunShape, plan: &WorldPlan) {
        self.model.set_compute(shape.compute);
        let Some(fp8) = shape.fp8 else {
            return;
        };
        let tokens = shape.micro_batch * shape.train.seq_len;
        let (model, hardware) = (&self.checked.model, &self.checked.parallel.hardware);
        let planned = plan.fp8_fallbacks_for(model, hardware, fp8.dense, tokens);
        let bf16 = fp8::with_overrides(&planned, model, fp8);
        self.model.set_fp8(fp8, &bf16);
        if !self.main {
            return;
        }
        if !bf16.experts.is_empty() {
            crate::errln!(
                "note: precision = fp8: the experts of layer(s) {:?} stay in bf16, where the \
                 planner estimates FP8 would not pay on `{}` (`fmoec plan` says why; \
                 FMOEC_FP8_EXPERTS=all forces FP8)",
                bf16.experts,
                hardware.name
            );
        }
        if !bf16.weight_gradients.is_empty() {
            crate::errln!(
                "note: precision = fp8: the expert weight gradients of layer(s) {:?} take their \
                 bf16 operands, where the planner estimates that FP8's transposed copies would \
                 cost more than its faster matmul saves on `{}` (FMOEC_FP8_WEIGHT_GRADS=all \
                 forces FP8)",
                bf16.weight_gradients,
                hardware.name
            );
        }
        if let Some(modules) = bf16.dense_modules() {
            crate::errln!(
                "note: fp8_dense: bf16 operands for {modules}, where the planner estimates \
                 that FP8's quantisation passes would cost more than its faster matmuls save on \
                 `{}` at {tokens} tokens a micro-batch (FMOEC_FP8_DENSE=all forces FP8)",
                hardware.name
            );
        }
    }

    /// The output folder (made by every rank, so that a folder that cannot be made fails all
    /// of them alike: one error for the run, not rank 0's with the others' echoes; each
    /// writes its shards under it anyway) and rank 0's metrics log, continued on a resume.
    fn open_outputs(&mut self) -> Result<()> {
        let out = &self.opts.out;
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create `{}`", path_text(out)))?;
        if self.main {
            self.metrics = Some(if self.opts.resume.is_some() {
                MetricsLog::resume(out, self.start_step)?
            } else {
                MetricsLog::create(out)?
            });
        }
        Ok(())
    }

    /// The progress display from the starting step, and the clock of the run's throughput.
    fn start_progress(&mut self) {
        self.progress = Progress::new(
            self.main,
            self.opts.progress,
            self.opts.log_interval,
            self.start_step,
            self.total_steps,
        );
        self.started = Instant::now();
    }

    /// Where the run's parameters and optimizer state come from before its first step: the
    /// checkpoint it continues (`--resume`; this rank's experts `local`, resharded as needed),
    /// else the train block's `init` (a Hugging Face or fmoec checkpoint, or an upcycled dense
    /// model: the parameters only, with a fresh optimizer, `crate::hf::import`), else the
    /// seeded initialisation the model was built with. This is the one place a run's initial
    /// state is set, onto the whole (not yet tensor-split) parameters.
    fn start_from(&mut self, local: &BTreeMap<usize, Vec<usize>>) -> Result<()> {
        let Some(path) = &self.opts.resume else {
            if let Some(init) = &self.train.init {
                let from = crate::hf::import::start_from(
                    &self.checked.model,
                    init,
                    &self.model.store,
                    local,
                    self.train.seed,
                )?;
                if self.main {
                    crate::errln!("note: the run starts from {from}");
                }
            }
            return Ok(());
        };
        let resumed = checkpoint::resume(
            path,
            &self.checked.model,
            &self.model.store,
            &mut self.adam,
            local,
        )?;
        check_resumable(
            &resumed.dir,
            resumed.step,
            self.total_steps,
            self.opts.stop_after,
        )?;
        // Continuing an older checkpoint in a folder that holds later ones would mix two
        // histories: the later checkpoints (and `latest`) would stay while metrics.jsonl lost
        // their steps, and this run's own checkpoints at their steps would not be written.
        if let Some(newest) =
            checkpoint::newest_step(&self.opts.checkpoints).filter(|&newest| newest > resumed.step)
        {
            bail!(
                "`{}` holds checkpoints after step {} (up to step {newest}): continuing step {} \
                 there would mix two runs' checkpoints and metrics; pass --out DIR to continue \
                 it into another folder (or remove the later checkpoints first)",
                path_text(&self.opts.checkpoints),
                resumed.step,
                resumed.step,
            );
        }
        if resumed.seed != self.train.seed {
            bail!(
                "checkpoint `{}` was written with seed {}, the file says {}",
                path_text(&resumed.dir),
                resumed.seed,
                self.train.seed
            );
        }
        self.start_step = resumed.step;
        self.step = resumed.step;
        self.tokens_seen = resumed.tokens_seen;
        Ok(())
    }

    /// Refuses to go on unless every rank starts from the same step: ranks on machines that
    /// do not see the same folders would resume different checkpoints, or some none.
    fn agree_on_start(&self, ctx: &RankContext) -> Result<()> {
        let sums = sum_over_world(ctx, &[self.start_step as f64, 1.0], "starting step")?;
        if sums[0] != self.start_step as f64 * sums[1] {
            bail!(
                "the ranks do not start from the same step (this rank, {}, starts from step {}): \
                 every rank must see the same checkpoint folder `{}`; on several machines put \
                 --out on a filesystem they share",
                ctx.rank(),
                self.start_step,
                path_text(&self.opts.checkpoints)
            );
        }
        Ok(())
    }

    /// Trains until the stop step or a stop signal, then [`Trainer::finish`]es.
    pub fn run(mut self) -> Result<RunSummary> {
        let mut stopped_by = None;
        if self.main {
            self.gpu = telemetry::sample(self.device);
        }
        while self.step < self.stop_at {
            self.trace_before_step()?;
            let mut record = self.step()?;
            self.trace_after_step(false);
            if self.evaluation_due() {
                let loss = self.evaluate()?;
                record.eval_loss = Some(loss);
                record.eval_ppl = Some(loss.exp());
                self.progress.say(&format!(
                    "step {}: eval loss {loss:.4}, perplexity {:.2}",
                    self.step,
                    loss.exp()
                ));
            }
            self.log(&record)?;
            if self.checkpoint_due() {
                self.save()?;
            }
            stopped_by = self.stop_signal()?;
            if stopped_by.is_some() {
                break;
            }
        }
        self.finish(stopped_by)
    }

    /// `--trace`: prepares libtorch's profiler for the steps it records (before the first
    /// step, so before a CUDA graph is captured). A run of one process only.
    fn prepare_trace(&mut self) -> Result<()> {
        let Some(request) = &self.opts.trace else {
            return Ok(());
        };
        if self.ctx.is_some() {
            bail!("--trace records a run of one process; this run has several ranks");
        }
        #[cfg(feature = "cuda")]
        {
            let tracer = trace::Tracer::prepare(request, self.device, self.step, self.stop_at)?;
            self.tracer = Some(tracer);
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = request;
            bail!(
                "--trace needs fmoec built with `--features cuda` (libtorch's profiler is reached \
                 through its C++ shim, which that feature builds; it traces CPU runs too)"
            )
        }
    }

    /// `--trace`: starts recording when the step about to run is the first traced one.
    fn trace_before_step(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(t) = &mut self.tracer {
            t.before_step(self.step + 1)?;
        }
        Ok(())
    }

    /// `--trace`: after the last traced step (or, `ending`, when the run ends before it),
    /// writes the trace and keeps its summary. A trace that cannot be written is a warning:
    /// the run goes on.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn trace_after_step(&mut self, ending: bool) {
        #[cfg(feature = "cuda")]
        if let Some(t) = &mut self.tracer {
            let written = if ending {
                t.finish(self.step)
            } else {
                t.after_step(self.step)
            };
            match written {
                Ok(Some(summary)) => {
                    for line in trace::summary_lines(&summary) {
                        self.progress.say(&line);
                    }
                    self.trace = Some(summary);
                }
                Ok(None) => {}
                Err(e) => crate::errln!("warning: --trace: {e:#}"),
            }
        }
    }

    /// This rank's model: after a [`Trainer::step`] its parameters' `.grad` hold that step's
    /// gradients, reduced over the ranks and clipped, as the optimizer applied them.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// One optimizer step; returns its metrics (without evaluation).
    pub fn step(&mut self) -> Result<StepMetrics> {
        let started = Instant::now();
        let sums = self.forward_backward()?;
        let reduced = self.reduce_and_clip(sums)?;
        #[cfg(feature = "cuda")]
        if self.fp8 {
            let overflowed = fp8::take_overflow(self.device)?;
            if overflowed > 0 {
                self.progress.abandon();
                bail!(
                    "step {}: {overflowed} FP8 scale(s) overflowed (a tensor quantised to FP8 held \
                     Inf or NaN); the step was not applied. Lower the learning rate, or train \
                     with precision = bf16 to see where the values diverge",
                    self.step + 1
                );
            }
        }
        let lr = optim::learning_rate(
            &self.train.schedule,
            self.train.optimizer.lr(),
            self.step,
            self.total_steps,
        );
        self.adam.step(&mut self.model.store, lr)?;
        self.step += 1;
        self.tokens_seen += self.tokens_per_step;
        let (step, loss) = (self.step, reduced.loss);
        if !loss.is_finite() {
            self.progress.abandon();
            bail!(
                "the loss became {loss} at step {step}; lower the learning rate or check the data"
            );
        }
        self.losses.push(loss);
        let seconds = started.elapsed().as_secs_f64();
        let moe = if self.main {
            reports(reduced.telemetry, self.micro_batches as f64)?
        } else {
            Vec::new()
        };
        Ok(StepMetrics {
            step,
            loss,
            balance_loss: reduced.balance,
            lr,
            grad_norm: reduced.grad_norm,
            tokens: self.tokens_seen,
            tokens_per_s: self.tokens_per_step as f64 / seconds.max(1e-9),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            moe,
            eval_loss: None,
            eval_ppl: None,
        })
    }

    /// This rank's micro-batches of the step, forward and backward (the gradients add up in
    /// the masters' `.grad`), each loss divided by the micro-batches this rank runs.
    fn forward_backward(&mut self) -> Result<StepSums> {
        if self.ctx.is_none() {
            self.seed_libtorch_for_the_step();
        }
        self.model.store.zero_grad();
        cast::begin_step()?;
        let mut sums = StepSums::zero(self.device)?;
        match (&self.pass, self.ctx) {
            (Pass::Pipeline, Some(c)) => self.micro_batches_by_the_schedule(c, &mut sums)?,
            _ => self.micro_batches_one_by_one(&mut sums)?,
        }
        cast::end_step();
        Ok(sums)
    }

    /// Alone: keys libtorch's generator by the run's seed and the step (see [`STEP_KEY`]).
    fn seed_libtorch_for_the_step(&self) {
        let _rng = lock_rng();
        tch::manual_seed(mix_all(&[self.train.seed, STEP_KEY, self.step]) as i64);
    }

    /// A pipeline stage: the step's micro-batches through this stage's model chunks by the
    /// schedule ([`pipeline::run`]), their losses and telemetry added to `sums`.
    fn micro_batches_by_the_schedule(
        &mut self,
        c: &RankContext,
        sums: &mut StepSums,
    ) -> Result<()> {
        let step = self.step;
        let source = pipeline::Source {
            data: &self.data,
            seed: self.train.seed,
            rows: self.micro_batch as usize,
            window: self.window,
            feed: Feed::Train { step },
        };
        let label = format!("step {}", step + 1);
        let passes = pipeline::run(
            &mut self.model,
            c,
            &source,
            self.local_micro_batches as usize,
            true,
            &label,
        )?;
        for f in passes {
            sums.add(f.lm.as_ref(), &f.balance, f.telemetry)?;
        }
        Ok(())
    }

    /// Alone, or a rank without a pipeline: this rank's micro-batches of the step one after
    /// another by its [`Pass`], each routed by its own key; their detached losses and
    /// telemetry added to `sums`.
    fn micro_batches_one_by_one(&mut self, sums: &mut StepSums) -> Result<()> {
        let (seed, step) = (self.train.seed, self.step);
        for i in 0..self.local_micro_batches {
            let m = i * self.data_ranks + self.data_rank;
            let key = [seed, step, m];
            let tokens = self.data.batch(
                false,
                &key,
                self.micro_batch as usize,
                self.window,
                Device::Cpu,
            )?;
            self.model.set_routing_key(Some(&key))?;
            let (lm, out) = self.micro_batch_pass(&tokens, m)?;
            let (lm, balance) = (lm.f_detach()?, out.balance_loss.f_detach()?);
            sums.add(Some(&lm), &balance, out.telemetry)?;
        }
        self.model.set_routing_key(None)?;
        Ok(())
    }

    /// Micro-batch `m` (its `tokens` on the CPU) forward and backward by this process's
    /// [`Pass`]; the LM loss and the forward's extras.
    fn micro_batch_pass(&mut self, tokens: &Tensor, m: u64) -> Result<(Tensor, ForwardOutput)> {
        let label = format!("step {}, micro-batch {m}", self.step + 1);
        let share = self.local_micro_batches as f64;
        match (&mut self.pass, self.ctx) {
            (Pass::Alone(runner), _) => runner.run(&self.model, tokens, self.micro_batches),
            (Pass::TensorParallel, Some(c)) => {
                let batch = tokens.f_to_device(self.device)?;
                let mut tape = Tape::new();
                let (lm, out) =
                    tensor_parallel_loss(&self.model, c, &batch, true, &mut tape, &label)?;
                let total = lm.f_add(&out.balance_loss)?.f_div_scalar(share)?;
                tape.backward_tensor_parallel(
                    &total,
                    c.groups.expert(),
                    c.groups.tensor(),
                    &format!("{label} backward"),
                )?;
                Ok((lm, out))
            }
            (Pass::ExpertParallel, Some(c)) => {
                let batch = tokens.f_to_device(self.device)?;
                let mut hook = ExpertParallel::new(c, true, label);
                let (lm, out) = self.model.loss_with(&batch, true, Some(&mut hook))?;
                let total = lm.f_add(&out.balance_loss)?.f_div_scalar(share)?;
                hook.backward(&total)?;
                Ok((lm, out))
            }
            (Pass::Pipeline, _) => {
                bail!("internal error: a pipeline stage runs its micro-batches by its schedule")
            }
            (_, None) => bail!("internal error: a ranked pass without a rank context"),
        }
    }

    /// Reduces the step's gradients by kind over the ranks (none alone), clips them by the
    /// global norm, and averages the losses and telemetry over the global batch.
    fn reduce_and_clip(&mut self, sums: StepSums) -> Result<Reduced> {
        let Some(c) = self.ctx else {
            return self.clip_alone(sums);
        };
        let at = format!("step {}", self.step + 1);
        let grads = GradientViews::of(&self.kinds, &self.splits, &self.model.store.params);
        self.reduce_over_groups(c, &grads, &at)?;
        let grad_norm = self.clip_over_groups(c, &grads, &at)?;
        self.reduce_figures(c, sums, grad_norm, &at)
    }

    /// [`Trainer::reduce_and_clip`] alone on a device: nothing to reduce, the gradients
    /// clipped by their norm.
    fn clip_alone(&mut self, sums: StepSums) -> Result<Reduced> {
        let norm = match self.train.clip_grad {
            Some(max) => optim::clip_grad_norm(&mut self.model.store, max)?,
            None => optim::global_grad_norm(&self.model.store)?,
        };
        let grad_norm = norm.f_double_value(&[])?;
        let losses = [
            sums.lm.f_double_value(&[])?,
            sums.balance.f_double_value(&[])?,
        ];
        Ok(Reduced::over_global_batch(
            self.micro_batches,
            grad_norm,
            losses,
            sums.telemetry,
        ))
    }

    /// Reduces every gradient over the groups that share its parameter: the partial
    /// gradients of tensor-split parameters summed over the tensor group, each kind over its
    /// groups ([`reduce_gradients`]), and on a pipeline the tied embedding's over its two
    /// stages. Every rank calls the same collectives in this order.
    fn reduce_over_groups(&self, c: &RankContext, grads: &GradientViews, at: &str) -> Result<()> {
        if self.tensor > 1 {
            sum_partial_gradients(c.groups.tensor(), &grads.by_split, at)?;
        }
        reduce_gradients(&c.groups, &grads.by_kind, at)?;
        if c.stages() > 1 {
            self.sum_tied_embedding_gradients(c, at)?;
        }
        Ok(())
    }

    /// The first and the last stage each hold the tied embedding: its whole gradient is the
    /// sum of theirs (Megatron-LM's embedding group). Only those two stages take part.
    fn sum_tied_embedding_gradients(&self, c: &RankContext, at: &str) -> Result<()> {
        let part = &self.model.part;
        if !(self.checked.model.tied_embeddings && (part.embedding || part.head)) {
            return Ok(());
        }
        let tied: Vec<&Tensor> = self
            .model
            .store
            .params
            .iter()
            .filter(|p| p.name == TIED_EMBEDDING)
            .map(|p| &p.tensor)
            .collect();
        sum_tied_gradients(c.groups.embedding(), &tied, at)?;
        Ok(())
    }

    /// Clips the reduced gradients by their global norm over the whole model (summed over
    /// the tensor group's shards and, on a pipeline, over the stages with a tied embedding's
    /// copy counted once); the norm before clipping.
    fn clip_over_groups(&self, c: &RankContext, grads: &GradientViews, at: &str) -> Result<f64> {
        let clip = self.train.clip_grad;
        let tensor_group = c.groups.tensor();
        let norm = if c.stages() > 1 {
            clip_global_norm_pipeline(
                &c.groups,
                tensor_group,
                &grads.with_split,
                &self.counted,
                clip,
                at,
            )?
        } else if self.tensor > 1 {
            clip_global_norm_tensor_parallel(&c.groups, tensor_group, &grads.with_split, clip, at)?
        } else {
            clip_global_norm(&c.groups, &grads.by_kind, clip, at)?
        };
        Ok(norm.total)
    }

    /// The step's losses summed over the data ranks and the stages, and its telemetry
    /// reduced over the ranks, both averaged over the global batch.
    fn reduce_figures(
        &self,
        c: &RankContext,
        sums: StepSums,
        grad_norm: f64,
        at: &str,
    ) -> Result<Reduced> {
        let StepSums {
            lm,
            balance,
            mut telemetry,
        } = sums;
        let losses = sum_over_data_and_stages(
            c,
            &[lm.f_double_value(&[])?, balance.f_double_value(&[])?],
            &format!("{at}, loss"),
        )?;
        reduce_telemetry(&self.checked.model, c, &mut telemetry, at)?;
        Ok(Reduced::over_global_batch(
            self.micro_batches,
            grad_norm,
            [losses[0], losses[1]],
            telemetry,
        ))
    }

    /// Whether the step just completed is an evaluation step (every `eval.every`, and the
    /// schedule's last).
    fn evaluation_due(&self) -> bool {
        self.train.eval.as_ref().is_some_and(|ev| {
            ev.every > 0 && (self.step % ev.every == 0 || self.step == self.total_steps)
        })
    }

    /// The held-out loss now (every rank calls it at the same step).
    pub fn evaluate(&mut self) -> Result<f64> {
        let batches = self.train.eval.as_ref().map_or(1, |ev| ev.batches);
        if let (Pass::Pipeline, Some(c)) = (&self.pass, self.ctx) {
            let loss = self.evaluate_pipeline(c, batches)?;
            self.last_eval = Some(loss);
            return Ok(loss);
        }
        let loss = evaluate_ranked(
            &self.model,
            &self.data,
            self.train.seed,
            batches,
            self.micro_batch as usize,
            self.window,
            self.ctx,
        )?;
        self.last_eval = Some(loss);
        Ok(loss)
    }

    /// [`Trainer::evaluate`] on a pipeline stage: the held-out batches shared by the data
    /// ranks as [`evaluate_ranked`] shares them, each run forward through the stages by the
    /// schedule; the last stage's losses summed over the data ranks and the stages.
    fn evaluate_pipeline(&mut self, c: &RankContext, batches: u64) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let batches = batches.max(1);
        let source = pipeline::Source {
            data: &self.data,
            seed: self.train.seed,
            rows: self.micro_batch as usize,
            window: self.window,
            feed: Feed::Eval {
                batches,
                key: EVAL_KEY,
            },
        };
        let passes = pipeline::eval_passes(c, batches);
        let label = format!("eval after step {}", self.step);
        let forwarded = pipeline::run(&mut self.model, c, &source, passes, false, &label)?;
        let mut total = 0.0;
        for f in forwarded.iter().filter(|f| f.counted) {
            if let Some(lm) = &f.lm {
                total += lm.f_double_value(&[])?;
            }
        }
        let sum = sum_over_data_and_stages(c, &[total], &label)?[0];
        Ok(sum / batches as f64)
    }

    /// Writes the step's line to `metrics.jsonl` and shows it.
    fn log(&mut self, record: &StepMetrics) -> Result<()> {
        if let Some(log) = &mut self.metrics {
            log.append(record)?;
        }
        let load = record
            .moe
            .iter()
            .map(|m| m.telemetry.max_over_mean_load)
            .fold(0.0, f64::max);
        self.progress.step(
            self.step,
            &format!(
                "loss {:.4} | lr {:.2e} | {:.0} tok/s | max/mean load {load:.2} | bal {:.4}",
                record.loss, record.lr, record.tokens_per_s, record.balance_loss
            ),
            self.step >= self.stop_at,
        );
        Ok(())
    }

    /// Whether the train block's `checkpoint = every(N)` asks for one after this step (the
    /// stop step's is [`Trainer::finish`]'s).
    fn checkpoint_due(&self) -> bool {
        self.train
            .checkpoint
            .as_ref()
            .is_some_and(|p| p.every > 0 && self.step % p.every == 0 && self.step < self.stop_at)
    }

    /// The stop signal every rank agrees on after this step (SIGTERM over SIGINT when both
    /// came), whichever of them received it.
    fn stop_signal(&self) -> Result<Option<i32>> {
        let signal = stop::requested();
        let Some(c) = self.ctx else {
            return Ok(signal);
        };
        let seen = |s: i32| f64::from(u8::from(signal == Some(s)));
        let flags = sum_over_world(c, &[seen(stop::SIGINT), seen(stop::SIGTERM)], "stop signal")?;
        Ok(if flags[1] > 0.0 {
            Some(stop::SIGTERM)
        } else if flags[0] > 0.0 {
            Some(stop::SIGINT)
        } else {
            None
        })
    }

    /// Saves a checkpoint of the step just completed, then (rank 0, once every rank's part
    /// is written) deletes all but the newest `keep` (0 keeps all). A failed deletion is a
    /// warning: the new checkpoint is complete.
    pub fn save(&mut self) -> Result<PathBuf> {
        if let Some(c) = self.ctx.filter(|c| c.stages() > 1) {
            self.check_tied_copies(c)?;
        }
        // A large model's checkpoint takes long enough to look like a hang without a word.
        let saving = Instant::now();
        self.progress
            .working(&format!("saving checkpoint step {} ...", self.step));
        let root = &self.opts.checkpoints;
        let info = SaveInfo {
            model: &self.checked.model,
            step: self.step,
            total_steps: self.total_steps,
            tokens_seen: self.tokens_seen,
            seed: self.train.seed,
            data_source: self.data.description.clone(),
            precision: precision_name(self.train.precision).to_string(),
            model_file: self.opts.model_file.as_deref(),
        };
        let saved = match self.ctx {
            Some(c) if self.tensor > 1 => {
                let (store, adam) = gather_tensor_parallel(
                    &self.model,
                    &self.whole_shapes,
                    &self.adam,
                    c,
                    self.step,
                )?;
                checkpoint::save_sharded(root, &info, &store, &adam, c)
            }
            Some(c) => checkpoint::save_sharded(root, &info, &self.model.store, &self.adam, c),
            None => checkpoint::save(root, &info, &self.model.store, &self.adam),
        }?;
        if self.main {
            if let Err(e) = checkpoint::prune(root, self.keep) {
                crate::errln!(
                    "warning: older checkpoints were not all deleted (keep = {}): {e:#}",
                    self.keep
                );
            }
        }
        let took = saving.elapsed();
        let took = if took < std::time::Duration::from_secs(1) {
            format!("{} ms", took.as_millis())
        } else {
            format!("{:.1} s", took.as_secs_f64())
        };
        self.progress
            .working(&format!("saved checkpoint step {} in {took}", self.step));
        self.last_checkpoint = Some(saved.clone());
        Ok(saved)
    }

    /// Refuses to save when the last pipeline stage's copy of the tied embedding is not the
    /// first stage's bit for bit (their gradients are summed between them and they take the
    /// same optimizer steps, so they cannot differ unless something is wrong): a checkpoint
    /// holds the first stage's alone. Every rank takes part.
    fn check_tied_copies(&self, c: &RankContext) -> Result<()> {
        let part = &self.model.part;
        let at = format!("checkpoint of step {}, tied embedding", self.step);
        let mut differs = 0.0;
        if self.checked.model.tied_embeddings && (part.embedding || part.head) {
            let Some(mine) = self.model.store.get(TIED_EMBEDDING) else {
                bail!("internal error: a first or last stage without the token embedding");
            };
            let mine = mine.tensor.f_detach_copy()?;
            let mut first = mine.f_detach_copy()?;
            c.groups.embedding().broadcast(&mut first, 0, &at)?;
            if !first.equal(&mine) {
                differs = 1.0;
            }
        }
        if sum_over_world(c, &[differs], &at)?[0] > 0.0 {
            bail!(
                "internal error: step {}: the last pipeline stage's copy of the tied token \
                 embedding differs from the first stage's",
                self.step
            );
        }
        Ok(())
    }

    /// Ends the run: the checkpoint of the last step (unless it exists), the plot, the
    /// summary (`summary.json`, and on stdout). `stopped_by`: the signal that ended it early.
    pub fn finish(mut self, stopped_by: Option<i32>) -> Result<RunSummary> {
        self.trace_after_step(true);
        self.save_final_checkpoint()?;
        self.progress.finish();
        if let (Some(signal), true) = (stopped_by, self.main) {
            self.say_stopped(signal);
        }
        let seconds = self.started.elapsed().as_secs_f64();
        let plot = if self.main { self.draw_plot() } else { None };
        let summary = self.summary(stopped_by, seconds, plot)?;
        if self.main {
            self.write_summary(&summary)?;
        }
        Ok(summary)
    }

    /// Saves the last step's checkpoint unless the folder holds it already (rank 0's view
    /// decides for every rank, so that all take the same branch) or this run resumed and
    /// took no step.
    fn save_final_checkpoint(&mut self) -> Result<()> {
        let resumed_without_a_step = self.opts.resume.is_some() && self.step <= self.start_step;
        if resumed_without_a_step {
            return Ok(());
        }
        let dir = self
            .opts
            .checkpoints
            .join(checkpoint::step_dir_name(self.step));
        let mut exists = dir.exists();
        if let Some(c) = self.ctx {
            let seen = f64::from(u8::from(exists && c.rank() == 0));
            exists = sum_over_world(c, &[seen], "final checkpoint")?[0] > 0.0;
        }
        if !exists {
            self.save()?;
        }
        Ok(())
    }

    /// Tells the user (rank 0) which signal stopped the run, where its last step was saved
    /// and how to continue.
    fn say_stopped(&self, signal: i32) {
        crate::errln!(
            "{}",
            stop::stopped_text(Some(signal), self.step, self.last_checkpoint.as_deref())
        );
    }

    /// `metrics.jsonl` in the output folder.
    fn metrics_path(&self) -> PathBuf {
        self.opts.out.join("metrics.jsonl")
    }

    /// Draws the loss curve of `metrics.jsonl` into `plot.png` (rank 0); a failure is a
    /// warning, since the run itself is complete. The plot's path where it was drawn.
    fn draw_plot(&self) -> Option<PathBuf> {
        let plot_path = self.opts.out.join("plot.png");
        let history = read_metrics(&self.metrics_path());
        match plot::draw(&history, &plot_path) {
            Ok(()) => Some(plot_path),
            Err(e) => {
                crate::errln!("warning: could not draw `{}`: {e:#}", path_text(&plot_path));
                None
            }
        }
    }

    /// The run's summary, `seconds` after it started; every rank takes part in counting the
    /// parameters. Takes the trainer's losses, last checkpoint and GPU sampler.
    fn summary(
        &mut self,
        stopped_by: Option<i32>,
        seconds: f64,
        plot: Option<PathBuf>,
    ) -> Result<RunSummary> {
        let (parameters, device_name) = self.parameters_and_device()?;
        let gpu = self.gpu.take().and_then(|s| s.finish());
        let train = self.train;
        let done = self.step - self.start_step;
        Ok(RunSummary {
            model: self.checked.model.name.clone(),
            parameters,
            data: self.data.description.clone(),
            device: device_name,
            precision: precision_name(train.precision).to_string(),
            batch_sequences: train.batch_sequences,
            seq_len: train.seq_len,
            micro_batch: self.micro_batch,
            start_step: self.start_step,
            steps_done: done,
            total_steps: self.total_steps,
            tokens: self.tokens_seen,
            seconds,
            tokens_per_s: (done * self.tokens_per_step) as f64 / seconds.max(1e-9),
            first_loss: self.losses.first().copied(),
            final_loss: self.losses.last().copied(),
            final_eval_loss: self.last_eval,
            final_eval_ppl: self.last_eval.map(f64::exp),
            unigram_entropy: self.data.unigram_entropy(),
            interrupted: stopped_by.is_some(),
            signal: stopped_by,
            checkpoint: self.last_checkpoint.take(),
            metrics: self.metrics_path(),
            plot,
            losses: std::mem::take(&mut self.losses),
            gpu,
            trace: self.trace.take(),
        })
    }

    /// Writes `summary.json` into the output folder and, unless asked not to, prints the
    /// summary (rank 0).
    fn write_summary(&self, summary: &RunSummary) -> Result<()> {
        std::fs::write(
            self.opts.out.join("summary.json"),
            serde_json::to_string_pretty(summary)?,
        )?;
        if self.opts.print_summary {
            print_summary(summary);
        }
        Ok(())
    }

    /// The model's parameter count (with several ranks: experts counted once over the expert
    /// group, the rest once, tensor-sharded parameters summed over the tensor group first)
    /// and the summary's device line.
    fn parameters_and_device(&self) -> Result<(i64, String)> {
        let Some(c) = self.ctx else {
            return Ok((self.model.store.numel(), self.device_line_alone()));
        };
        let parameters = self.parameters_here().summed_over_ranks(c, self.tensor)?;
        Ok((parameters, self.device_line_ranked(c)))
    }

    /// This rank's counted parameters, by how they add up over the ranks.
    fn parameters_here(&self) -> ParameterCounts {
        let mut counts = ParameterCounts::default();
        for (((k, s), p), counted) in self
            .kinds
            .iter()
            .zip(&self.splits)
            .zip(&self.model.store.params)
            .zip(&self.counted)
        {
            if !counted {
                continue;
            }
            let n = p.tensor.numel() as i64;
            let is_expert = *k == ParamKind::Expert;
            match (is_expert, *s == TensorSplit::Sharded && self.tensor > 1) {
                (e, true) => counts.sharded[usize::from(e)] += n,
                (true, false) => counts.expert += n,
                (false, false) => counts.rest += n,
            }
        }
        counts
    }

    /// The summary's device line alone: the device, and how the step runs on it.
    fn device_line_alone(&self) -> String {
        let how = match &self.pass {
            Pass::Alone(runner) => runner.describe(),
            _ => "",
        };
        format!("{:?}{how}", self.device)
    }

    /// The summary's device line with several ranks: the device, the ranks and, with tensor
    /// or pipeline parallelism, their grid.
    fn device_line_ranked(&self, c: &RankContext) -> String {
        let (device, tensor, stages) = (self.device, self.tensor, c.stages());
        if stages > 1 {
            let chunks = match c.plan.virtual_stages {
                v if v > 1 => format!(", {v} chunks each"),
                _ => String::new(),
            };
            format!(
                "{device:?} x {} ranks (tensor {tensor} x pipeline {stages}{chunks} x data {})",
                c.world(),
                c.data_size()
            )
        } else if tensor > 1 {
            format!(
                "{device:?} x {} ranks (tensor {tensor} x data {})",
                c.world(),
                c.data_size()
            )
        } else {
            format!("{device:?} x {} ranks", c.world())
        }
    }
}

/// One rank's parameter elements (those it counts), by how they add up over the ranks.
#[derive(Default)]
struct ParameterCounts {
    /// Experts' (not tensor-sharded): each expert group holds every expert once.
    expert: i64,
    /// The rest (not tensor-sharded): every rank of a stage holds the same.
    rest: i64,
    /// Tensor-sharded, `[rest, expert]`: each tensor group holds them once.
    sharded: [i64; 2],
}

impl ParameterCounts {
    /// The model's count from every rank's: the sharded ones summed over the tensor group
    /// (when `tensor > 1`), then the experts over the expert group, then every stage's part
    /// over the pipeline (with several stages); every rank takes part, in this order.
    fn summed_over_ranks(self, c: &RankContext, tensor: usize) -> Result<i64> {
        let ParameterCounts {
            mut expert,
            mut rest,
            sharded,
        } = self;
        let device = c.device;
        if tensor > 1 {
            let at = "sharded parameter count";
            let sums = sum_counts(c.groups.tensor(), device, &sharded, at)?;
            rest += sums[0];
            expert += sums[1];
        }
        let expert = sum_counts(c.groups.expert(), device, &[expert], "parameter count")?[0];
        if c.stages() > 1 {
            // every stage holds its own part: summed over the stages
            let at = "parameter count over the stages";
            return Ok(sum_counts(c.groups.pipeline(), device, &[rest + expert], at)?[0]);
        }
        Ok(rest + expert)
    }
}

/// `counts` summed over `group`, through a tensor on the rank's `device`.
fn sum_counts(
    group: &dyn Collective,
    device: Device,
    counts: &[i64],
    at: &str,
) -> Result<Vec<i64>> {
    let mut t = Tensor::f_from_slice(counts)?.f_to_device(device)?;
    group.all_reduce_sum(&mut t, at)?;
    (0..counts.len() as i64)
        .map(|i| Ok(t.f_int64_value(&[i])?))
        .collect()
}

/// What [`Trainer::setup`] derives from the file, the options and the rank before it looks
/// at any folder or allocates anything.
struct RunShape<'a> {
    train: &'a Train,
    total_steps: u64,
    /// This process stops (with a checkpoint) after this step.
    stop_at: u64,
    /// The dtype the model computes in (f32 where FP8 is emulated on the CPU).
    compute: Kind,
    /// Tokens read per sequence: the sequence and its next token.
    window: usize,
    /// Rank 0 (or the run alone).
    main: bool,
    data_ranks: u64,
    data_rank: u64,
    /// Ranks per tensor group.
    tensor: usize,
    device: Device,
    fp8: Option<fp8::Fp8Use>,
    /// Sequences per micro-batch, and the note that says why when the planner chose it.
    micro_batch: u64,
    micro_batch_note: Option<String>,
    /// Micro-batches of the global batch per step.
    micro_batches: u64,
}

impl<'a> RunShape<'a> {
    /// Refuses a file without a `train` block, a sequence longer than the context, and FP8
    /// where it cannot run; the micro-batch is the plan's ([`run_micro_batch`]).
    fn of(
        checked: &'a Checked,
        opts: &RunOptions,
        plan: &WorldPlan,
        ctx: Option<&RankContext>,
    ) -> Result<RunShape<'a>> {
        let Some(train) = &checked.train else {
            bail!(
                "`{}` has no `train` block: `fmoec run` needs one (data, batch, steps, optimizer)",
                checked.model.name
            );
        };
        let total_steps = opts.steps.unwrap_or(train.steps);
        let stop_at = opts.stop_after.unwrap_or(total_steps).min(total_steps);
        let mut compute = compute_kind(train.precision)?;
        if train.seq_len > checked.model.context {
            bail!(
                "seq_len {} exceeds the model's context {}",
                train.seq_len,
                checked.model.context
            );
        }
        let data_ranks = ctx.map_or(1, |c| c.data_size()) as u64;
        let device = ctx.map_or(opts.device, |c| c.device);
        let fp8 = match train.precision {
            Precision::Fp8 { dense } => {
                // the CPU's emulation computes the rest in f32 (bf16 matmuls are slow there)
                let mode = fp8::mode_for(device).map_err(|e| {
                    anyhow::anyhow!("precision = fp8 cannot run here: {e:#}; use bf16 or fp32")
                })?;
                if mode == fp8::Fp8Mode::Emulated {
                    compute = Kind::Float;
                }
                Some(fp8::Fp8Use {
                    experts: true,
                    dense,
                })
            }
            _ => None,
        };
        let (micro_batch, micro_batch_note) = run_micro_batch(checked, train, data_ranks, plan)?;
        Ok(RunShape {
            train,
            total_steps,
            stop_at,
            compute,
            window: train.seq_len as usize + 1,
            main: ctx.is_none_or(|c| c.rank() == 0),
            data_ranks,
            data_rank: ctx.map_or(0, |c| c.data_rank()) as u64,
            tensor: ctx.map_or(1, |c| c.tensor_size()),
            device,
            fp8,
            micro_batch,
            micro_batch_note,
            micro_batches: train.batch_sequences / micro_batch,
        })
    }
}

/// Refuses an output or checkpoint folder that is a file, and a new run into a folder that
/// holds checkpoints (saying how to continue or extend the run there).
fn check_output_folders(opts: &RunOptions) -> Result<()> {
    for (dir, what) in [
        (&opts.out, "the output folder"),
        (&opts.checkpoints, "the checkpoint folder"),
    ] {
        if is_file_not_folder(dir) {
            bail!("{what} `{}` is a file, not a folder", path_text(dir));
        }
    }
    if opts.resume.is_some() || !opts.checkpoints.join(checkpoint::LATEST).exists() {
        return Ok(());
    }
    // --resume of a finished run is refused too (nothing to train): say what does work
    let finished = checkpoint::run_record(&opts.checkpoints)
        .ok()
        .and_then(|r| r.total_steps.filter(|&t| r.step >= t).map(|t| (r.step, t)));
    match finished {
        Some((step, total)) => bail!(
            "`{}` already holds a finished run ({step} of {total} steps); pass --out DIR \
             for a new run, or --resume with --steps N (N > {step}) to extend that one",
            path_text(&opts.checkpoints)
        ),
        None => bail!(
            "`{}` already holds checkpoints; pass --resume to continue that run, or \
             --out DIR for a new one",
            path_text(&opts.checkpoints)
        ),
    }
}

/// Whether something other than a folder sits at `dir`. One look at the path, not two
/// (`exists` then `is_dir`): with several ranks, rank 0 removes the folder it made for
/// the shared-folder mark while the other ranks check it, and a folder that vanishes
/// between two looks is not a file.
pub fn is_file_not_folder(dir: &Path) -> bool {
    std::fs::metadata(dir).is_ok_and(|m| !m.is_dir())
}

/// Refuses a run whose ranks would not fit the device, before anything is allocated, with
/// the planner's figure and the machine's.
fn check_memory(plan: &WorldPlan, ctx: Option<&RankContext>, device: Device) -> Result<()> {
    let Some(memory) = sharing_memory(plan, ctx) else {
        return Ok(());
    };
    let in_process = ctx.map_or(1, |c| c.ranks_sharing_device as u64);
    let layout = format!(
        "--world {} --tensor {} --pipeline {}",
        plan.layout.world,
        plan.tensor_size(),
        plan.stages()
    );
    fit::check(&memory, in_process, device, &layout)
}

/// What [`allocate`] makes for a run, in its order.
struct Allocated {
    data: Dataset,
    model: Transformer,
    adam: AdamW,
    pass: Pass,
}

/// Loads the data, builds this rank's part of the model (only its stage and its experts
/// `local`, with the values the one-rank model gives them) and its optimizer, and chooses
/// how a micro-batch runs ([`Pass`]; a pipeline's schedule is checked first).
fn allocate(
    checked: &Checked,
    opts: &RunOptions,
    plan: &WorldPlan,
    ctx: Option<&RankContext>,
    shape: &RunShape,
    local: &BTreeMap<usize, Vec<usize>>,
) -> Result<Allocated> {
    let (model_decl, train) = (&checked.model, shape.train);
    let data = Dataset::load(&train.data, model_decl.vocab)?;
    data.check_window(shape.window)?;
    let part = ctx.map_or_else(
        || ModelPart::whole(model_decl.layers.len()),
        |c| c.part().clone(),
    );
    let model = {
        let _rng = lock_rng();
        let seed = mix_all(&[train.seed, 0xB01D]);
        Transformer::new_part_seeded(
            model_decl,
            shape.device,
            Kind::Float,
            shape.compute,
            seed,
            local,
            &part,
        )?
    };
    if ctx.is_some() && plan.tensor_size() != shape.tensor {
        bail!(
            "internal error: the plan has tensor groups of {}, the rank's tensor group has {} ranks",
            plan.tensor_size(),
            shape.tensor
        );
    }
    let adam = AdamW::new(&train.optimizer, &model.store)?;
    let pass = match ctx {
        None => Pass::Alone(Runner::new(
            opts.cuda_graph,
            shape.device,
            shape.compute,
            model_decl.moe_layers().next().is_some(),
        )?),
        Some(c) if c.stages() > 1 => {
            let schedule =
                pipeline::pipeline_of(c, (shape.micro_batches / shape.data_ranks) as usize);
            schedule
                .check()
                .map_err(|e| anyhow::anyhow!("the pipeline schedule cannot run this batch: {e}"))?;
            Pass::Pipeline
        }
        Some(_) if shape.tensor > 1 => Pass::TensorParallel,
        Some(_) => Pass::ExpertParallel,
    };
    Ok(Allocated {
        data,
        model,
        adam,
        pass,
    })
}

/// The planner's memory of one rank as the memory check needs it: this rank's stage on a
/// device of its own; the mean over the stages where ranks of every stage share the device
/// (in-process and CPU ranks: each stage has as many ranks).
fn sharing_memory(plan: &WorldPlan, ctx: Option<&RankContext>) -> Option<crate::plan::Memory> {
    let own = ctx.map_or(0, |c| c.stage());
    let first = plan.memory.get(own).or(plan.memory.first())?;
    if ctx.is_none_or(|c| c.ranks_sharing_device <= 1) || plan.memory.len() <= 1 {
        return Some(*first);
    }
    let n = plan.memory.len() as u64;
    let mean = |f: fn(&crate::plan::Memory) -> u64| plan.memory.iter().map(f).sum::<u64>() / n;
    Some(crate::plan::Memory {
        weights: mean(|m| m.weights),
        grads: mean(|m| m.grads),
        optimizer: mean(|m| m.optimizer),
        activations: mean(|m| m.activations),
        total: mean(|m| m.total),
        ..*first
    })
}

/// The experts this rank holds per MoE layer (all of them alone), in local order.
fn local_experts(checked: &Checked, ctx: Option<&RankContext>) -> BTreeMap<usize, Vec<usize>> {
    checked
        .model
        .moe_layers()
        .map(|(layer, m)| {
            let ids = match ctx {
                Some(c) => c.local_experts(layer).to_vec(),
                None => (0..m.experts as usize).collect(),
            };
            (layer, ids)
        })
        .collect()
}

/// The micro-batch of a run on `data_ranks` data ranks: the plan's, which is the planner's
/// choice for the run's layout (the file's `micro_batch`, else the fastest in its estimate of
/// those that leave [`crate::plan::FREE_CHOICE_HEADROOM`] of the GPU free, or of those that fit
/// where none does), with a note saying so where it splits a rank's share of the batch. Plans
/// made without the planner: [`micro_batch_for`].
fn run_micro_batch(
    checked: &Checked,
    train: &Train,
    data_ranks: u64,
    plan: &WorldPlan,
) -> Result<(u64, Option<String>)> {
    let Some(m) = plan.micro_batch else {
        return Ok((micro_batch_for(checked, train, data_ranks)?, None));
    };
    let d = data_ranks.max(1);
    let share = train.batch_sequences / d;
    if m == 0 || train.batch_sequences % d != 0 || share % m != 0 {
        bail!(
            "internal error: the plan's micro-batch of {m} sequences does not split the batch of \
             {} sequences over {d} data ranks",
            train.batch_sequences
        );
    }
    let stages = plan.parts.len();
    let note = (checked.parallel.micro_batch.is_none() && m < share).then(|| {
        let (layout, bubble) = if stages > 1 {
            (
                format!(" for {stages} pipeline stages"),
                ", and more of them shrink the pipeline's bubble",
            )
        } else {
            (String::new(), "")
        };
        format!(
            "micro-batch {m} of the {share} sequences per data rank: the planner's fastest{layout} \
             of those that leave {:.0}% of the memory of `{}` free in its estimate (else of those that \
             fit): each micro-batch reads the weights once more{bubble}; `fmoec plan \
             --memory-model fmoec` shows the estimate",
            crate::plan::FREE_CHOICE_HEADROOM * 100.0,
            checked.parallel.hardware.name
        )
    });
    Ok((m, note))
}

/// Refuses to continue the checkpoint in `dir`, at step `at`, when nothing would be trained:
/// it is at or past the end of the schedule of `total_steps`, or past `--stop-after`.
fn check_resumable(dir: &Path, at: u64, total_steps: u64, stop_after: Option<u64>) -> Result<()> {
    if at > total_steps {
        bail!(
            "checkpoint `{}` is at step {at}, past the end of this run's schedule of {total_steps} \
             steps; pass --steps N with N > {at} to continue it with a longer schedule",
            path_text(dir)
        );
    }
    if at == total_steps {
        bail!(
            "checkpoint `{}` finished its run ({at} of {total_steps} steps): nothing to train; \
             --steps N with N > {at} continues it with a longer schedule; for a new run leave \
             out --resume (with --out, name another folder)",
            path_text(dir)
        );
    }
    if let Some(stop) = stop_after.filter(|&s| s <= at) {
        bail!(
            "--stop-after {stop}, but checkpoint `{}` is already at step {at}",
            path_text(dir)
        );
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

/// One MoE layer's telemetry summed over micro-batches.
struct Accum {
    counts: Tensor,
    dropped: Tensor,
    entropy: Tensor,
    balance: Tensor,
    /// FasterMoE's shadowing: per expert, the exchanges that replicated it.
    shadowed: Option<Tensor>,
}

/// Adds one forward pass's telemetry to `acc`, layer by layer (in layer order: a pipeline
/// stage's passes each bring only the layers of one model chunk).
fn accumulate(acc: &mut Vec<(usize, Accum)>, tel: Vec<(usize, Telemetry)>) -> Result<()> {
    for (layer, t) in tel {
        match acc.binary_search_by_key(&layer, |(l, _)| *l) {
            Ok(i) => {
                let a = &mut acc[i].1;
                a.counts = a.counts.f_add(&t.tokens_per_expert)?;
                a.dropped = a.dropped.f_add(&t.dropped_fraction)?;
                a.entropy = a.entropy.f_add(&t.gate_entropy)?;
                a.balance = a.balance.f_add(&t.balance_loss)?;
                if let (Some(sum), Some(s)) = (&mut a.shadowed, &t.shadowed) {
                    *sum = sum.f_add(s)?;
                }
            }
            Err(i) => acc.insert(
                i,
                (
                    layer,
                    // copies: a replayed CUDA graph rewrites its outputs in place
                    Accum {
                        counts: t.tokens_per_expert.f_detach_copy()?,
                        dropped: t.dropped_fraction.f_detach_copy()?,
                        entropy: t.gate_entropy.f_detach_copy()?,
                        balance: t.balance_loss.f_detach_copy()?,
                        shadowed: t.shadowed.as_ref().map(Tensor::f_detach_copy).transpose()?,
                    },
                ),
            ),
        }
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
                // every data rank's exchanges, summed: over the step's micro-batches they
                // are `micro` exchanges per expert group on average
                shadowed: a.shadowed.map(|s| s.f_div_scalar(micro)).transpose()?,
            };
            Ok(LayerMetrics {
                layer,
                telemetry: t.report()?,
            })
        })
        .collect()
}

/// Sums every MoE layer's accumulated telemetry over the data group, and with a pipeline
/// over the stages too (each holds its own layers'), so that `acc` ends with every MoE
/// layer of `model` on every rank. One all-reduce per group: the layers packed in order,
/// zeros for those another stage holds. Each layer's slice also carries a marker and the
/// shadowing counts (zeros without shadowing), so that every rank packs the same layout
/// whether or not it holds the layer or shadows its experts.
fn reduce_telemetry(
    model: &crate::check::Model,
    ctx: &RankContext,
    acc: &mut Vec<(usize, Accum)>,
    at: &str,
) -> Result<()> {
    let layers: Vec<(usize, i64)> = model
        .moe_layers()
        .map(|(l, m)| (l, m.experts as i64))
        .collect();
    // counts (e), dropped, entropy, balance, shadowing marker, shadowed (e)
    let slice = |e: i64| 2 * e + 4;
    let mut pieces = Vec::new();
    for &(layer, e) in &layers {
        match acc.iter().find(|(l, _)| *l == layer) {
            Some((_, a)) => {
                let (marker, shadowed) = match &a.shadowed {
                    Some(s) => (
                        Tensor::f_ones([1], (Kind::Float, ctx.device))?,
                        s.f_to_kind(Kind::Float)?,
                    ),
                    None => (
                        Tensor::f_zeros([1], (Kind::Float, ctx.device))?,
                        Tensor::f_zeros([e], (Kind::Float, ctx.device))?,
                    ),
                };
                pieces.extend([
                    a.counts.f_to_kind(Kind::Float)?,
                    a.dropped.f_to_kind(Kind::Float)?.f_reshape([1])?,
                    a.entropy.f_to_kind(Kind::Float)?.f_reshape([1])?,
                    a.balance.f_to_kind(Kind::Float)?.f_reshape([1])?,
                    marker,
                    shadowed,
                ]);
            }
            None => pieces.push(Tensor::f_zeros([slice(e)], (Kind::Float, ctx.device))?),
        }
    }
    if pieces.is_empty() {
        return Ok(());
    }
    let mut packed = Tensor::f_cat(&pieces, 0)?.f_to_device(ctx.device)?;
    let what = format!("{at}, MoE telemetry");
    ctx.groups.data().all_reduce_sum(&mut packed, &what)?;
    if ctx.stages() > 1 {
        ctx.groups.pipeline().all_reduce_sum(&mut packed, &what)?;
    }
    // one copy to the host for the markers, not one per layer
    let host = packed.f_to_device(tch::Device::Cpu)?;
    acc.clear();
    let mut offset = 0;
    for (layer, e) in layers {
        let shadowing = host.f_double_value(&[offset + e + 3])? > 0.0;
        acc.push((
            layer,
            Accum {
                counts: packed.f_narrow(0, offset, e)?,
                dropped: packed.f_select(0, offset + e)?,
                entropy: packed.f_select(0, offset + e + 1)?,
                balance: packed.f_select(0, offset + e + 2)?,
                shadowed: if shadowing {
                    Some(packed.f_narrow(0, offset + e + 4, e)?)
                } else {
                    None
                },
            },
        ));
        offset += slice(e);
    }
    Ok(())
}

/// Sums `values` over the data group and then, with a pipeline, over the stages (each
/// stage's share: the last stage's LM losses, every stage's balance losses).
fn sum_over_data_and_stages(ctx: &RankContext, values: &[f64], at: &str) -> Result<Vec<f64>> {
    let sums = sum_over_data(ctx, values, at)?;
    if ctx.stages() == 1 {
        return Ok(sums);
    }
    let mut t = Tensor::f_from_slice(&sums)?.f_to_device(ctx.device)?;
    ctx.groups.pipeline().all_reduce_sum(&mut t, at)?;
    Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
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
) -> Result<(ParamStore, AdamW)> {
    let _guard = tch::no_grad_guard();
    let at = format!("checkpoint of step {step}, gathering tensor slices");
    let mut store = ParamStore::new(model.store.device, model.store.kind);
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
        store.params.push(Param {
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
