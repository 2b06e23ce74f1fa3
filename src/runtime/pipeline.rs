//! Pipeline parallelism in the trainer: one rank's pipeline stage of a training step or of
//! an evaluation, run as the planner's schedule says ([`crate::plan::schedule`]: 1F1B, or
//! the interleaved 1F1B with several model chunks per stage): its chunks' forward and
//! backward passes, micro-batch by micro-batch, and the activations and their gradients
//! exchanged with the neighbouring stages over the pipeline group
//! ([`crate::collective::Collective::send_recv`], in the schedule's batches).
//!
//! A chunk's input, when another stage computed it, becomes a leaf of this stage's graph.
//! Its backward starts from the part of the loss computed here (on the last stage the
//! micro-batch's LM loss, on every stage the weighted balance losses of its MoE layers, each
//! divided by the rank's micro-batches) plus `Σ output · gradient` with the gradient the next
//! stage sent back, and runs through the chunk's expert exchanges and tensor regions (the
//! same [`Tape`]s as without a pipeline); the input leaf's gradient goes back in turn. So
//! the stages together compute the single-rank step's gradients, every MoE layer's balance
//! loss included.
//!
//! Knows nothing about the command line, checkpoints or the optimizer: the trainer hands it
//! the model, the data and the rank's context and adds up what each forward pass returns.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::collective::{PeerTransfer, Tape};
use crate::plan::schedule::{self, Action, Payload, Pipeline, Transfer};
use crate::runtime::data::Dataset;
use crate::runtime::distributed::{ExpertParallel, RankContext};
use crate::runtime::model::{
    next_token_loss, next_token_pairs, ChunkOutput, ExchangedExperts, TensorPass, Transformer,
};
use crate::runtime::moe::Telemetry;

/// Where a pass's micro-batches come from.
#[derive(Clone, Copy, Debug)]
pub enum Feed {
    /// Training step `step` (0-based): the rank's micro-batch `i` is micro-batch `i·D + d`
    /// of the global batch (data rank `d` of `D`), keyed `(seed, step, micro-batch)`.
    Train { step: u64 },
    /// Evaluation over `batches` held-out batches: the rank's pass `i` is batch `i·D + d`,
    /// counted while it is one of them (a rank short of batches repeats one uncounted, as
    /// every rank runs as many passes), keyed `(seed, key, batch)`.
    Eval { batches: u64, key: u64 },
}

/// What a pass needs besides the model and the rank.
pub struct Source<'a> {
    pub data: &'a Dataset,
    pub seed: u64,
    /// Sequences per micro-batch.
    pub rows: usize,
    /// Tokens read per sequence (the sequence and its next token).
    pub window: usize,
    pub feed: Feed,
}

impl Source<'_> {
    /// The global index of the rank's micro-batch `i`, and whether it counts.
    fn micro(&self, ctx: &RankContext, i: usize) -> (u64, bool) {
        let (d, r) = (ctx.data_size() as u64, ctx.data_rank() as u64);
        let m = i as u64 * d + r;
        match self.feed {
            Feed::Train { .. } => (m, true),
            Feed::Eval { batches, .. } if m < batches => (m, true),
            Feed::Eval { batches, .. } => (r % batches.max(1), false),
        }
    }

    fn key(&self, m: u64) -> [u64; 3] {
        match self.feed {
            Feed::Train { step } => [self.seed, step, m],
            Feed::Eval { key, .. } => [self.seed, key, m],
        }
    }

    /// Micro-batch `m`'s tokens on `device`.
    fn batch(&self, m: u64, device: Device) -> Result<Tensor> {
        let eval = matches!(self.feed, Feed::Eval { .. });
        let t = self
            .data
            .batch(eval, &self.key(m), self.rows, self.window, Device::Cpu)?;
        Ok(t.f_to_device(device)?)
    }
}

/// What one forward pass of a model chunk gave.
pub struct Forwarded {
    /// The global micro-batch (or evaluation batch) it ran.
    pub micro: u64,
    /// Whether it counts (an evaluation rank's repeated batch does not).
    pub counted: bool,
    /// The LM loss, on the chunk that ends the model.
    pub lm: Option<Tensor>,
    /// Its MoE layers' weighted balance losses and telemetry (no graph).
    pub balance: Tensor,
    pub telemetry: Vec<(usize, Telemetry)>,
}

/// The autograd cuts of one chunk's forward pass, replayed by its backward.
enum Segments<'c> {
    /// Tensor = 1: the expert exchanges' tape.
    Experts(ExpertParallel<'c>),
    /// Tensor parallelism: the pass's tape (regions and exchanges).
    Tensor(Tape),
}

/// A chunk's forward pass, kept until its backward.
struct InFlight<'c> {
    /// The input leaf, when another stage (or chunk) computed the input.
    input: Option<Tensor>,
    /// The output, when another chunk takes it on.
    output: Option<Tensor>,
    /// The part of the loss computed here (divided by the rank's micro-batches).
    root: Tensor,
    segments: Segments<'c>,
}

/// The schedule's shape for `micro_batches` micro-batches per rank on `ctx`'s pipeline.
pub fn pipeline_of(ctx: &RankContext, micro_batches: usize) -> Pipeline {
    Pipeline {
        stages: ctx.stages(),
        virtual_stages: ctx.plan.virtual_stages.max(1),
        micro_batches,
    }
}

/// Passes an evaluation of `batches` held-out batches takes on every rank: its data rank's
/// share (rounded up, every rank running as many), then up to a multiple of the stages for
/// the interleaved schedule.
pub fn eval_passes(ctx: &RankContext, batches: u64) -> usize {
    let share = batches.max(1).div_ceil(ctx.data_size() as u64) as usize;
    if ctx.plan.virtual_stages > 1 {
        share.div_ceil(ctx.stages()) * ctx.stages()
    } else {
        share
    }
}

/// Runs this rank's stage of one pass of `micro_batches` micro-batches by the schedule
/// (`train`: forward and backward, the gradients adding up in the parameters' `.grad`;
/// otherwise forward only). Returns every forward pass's losses and telemetry, in the order
/// they ran.
pub fn run(
    model: &mut Transformer,
    ctx: &RankContext,
    source: &Source,
    micro_batches: usize,
    train: bool,
    label: &str,
) -> Result<Vec<Forwarded>> {
    let pipeline = pipeline_of(ctx, micro_batches);
    let program = schedule::program(&pipeline, ctx.stage(), !train).map_err(|e| {
        anyhow::anyhow!("internal error: no pipeline schedule for {pipeline:?}: {e}")
    })?;
    let mut stage = StagePass::new(model, ctx, source, micro_batches, train, label);
    for action in &program {
        match *action {
            Action::Forward { chunk, micro } => stage.forward(chunk, micro)?,
            Action::Backward { chunk, micro } => stage.backward(chunk, micro)?,
            Action::Exchange(ref transfers) => stage.exchange(transfers)?,
        }
    }
    stage.finish()
}

/// One pass of [`run`] as it goes through the schedule's actions: the tensors each chunk
/// and micro-batch (keyed `(chunk, micro)`) waits with, and the forward passes so far.
struct StagePass<'p, 'c> {
    model: &'p mut Transformer,
    ctx: &'c RankContext,
    source: &'p Source<'p>,
    train: bool,
    label: &'p str,
    /// The shape of an activation sent between stages.
    activation: [i64; 3],
    /// The rank's micro-batches: each one's loss is divided by it.
    share: f64,
    in_flight: BTreeMap<(usize, usize), InFlight<'c>>,
    /// Forward-only outputs waiting to be sent.
    outputs: BTreeMap<(usize, usize), Tensor>,
    inputs: BTreeMap<(usize, usize), Tensor>,
    output_grads: BTreeMap<(usize, usize), Tensor>,
    input_grads: BTreeMap<(usize, usize), Tensor>,
    forwarded: Vec<Forwarded>,
}

impl<'p, 'c> StagePass<'p, 'c> {
    fn new(
        model: &'p mut Transformer,
        ctx: &'c RankContext,
        source: &'p Source<'p>,
        micro_batches: usize,
        train: bool,
        label: &'p str,
    ) -> StagePass<'p, 'c> {
        let width = model.model.width as i64;
        StagePass {
            activation: [source.rows as i64, source.window as i64 - 1, width],
            share: micro_batches as f64,
            model,
            ctx,
            source,
            train,
            label,
            in_flight: BTreeMap::new(),
            outputs: BTreeMap::new(),
            inputs: BTreeMap::new(),
            output_grads: BTreeMap::new(),
            input_grads: BTreeMap::new(),
            forwarded: Vec::new(),
        }
    }

    /// Chunk `chunk`'s forward pass of the rank's micro-batch `micro`, from the data on the
    /// chunk that starts the model, else from the input received; kept for its backward
    /// when training, its output kept to be sent otherwise.
    fn forward(&mut self, chunk: usize, micro: usize) -> Result<()> {
        let (ctx, source, train) = (self.ctx, self.source, self.train);
        let (m, counted) = source.micro(ctx, micro);
        let at = format!("{}, micro-batch {m}, chunk {chunk}", self.label);
        let (starts, ends) = self.model.chunk_ends(chunk)?;
        if train {
            self.model.set_routing_key(Some(&source.key(m)))?;
        }
        let batch = if starts || ends {
            Some(source.batch(m, ctx.device)?)
        } else {
            None
        };
        let (input, leaf) = match (&batch, starts) {
            (Some(b), true) => (next_token_pairs(b)?.0, None),
            _ => {
                let received = self
                    .inputs
                    .remove(&(chunk, micro))
                    .with_context(|| format!("internal error: {at}: its input never arrived"))?;
                let leaf = received.f_detach()?.f_set_requires_grad(train)?;
                (leaf.shallow_clone(), train.then_some(leaf))
            }
        };
        let (out, segments) = forward(self.model, ctx, chunk, &input, train, &at)?;
        let lm = match (&batch, ends) {
            (Some(b), true) => Some(next_token_loss(&out.output, &next_token_pairs(b)?.1)?),
            _ => None,
        };
        self.forwarded.push(Forwarded {
            micro: m,
            counted,
            lm: lm.as_ref().map(Tensor::f_detach).transpose()?,
            balance: out.balance_loss.f_detach()?,
            telemetry: out.telemetry,
        });
        let output = (!ends).then_some(out.output);
        if !train {
            if let Some(output) = output {
                self.outputs.insert((chunk, micro), output.f_detach()?);
            }
            return Ok(());
        }
        let here = match &lm {
            Some(lm) => lm.f_add(&out.balance_loss)?,
            None => out.balance_loss,
        };
        self.in_flight.insert(
            (chunk, micro),
            InFlight {
                input: leaf,
                output,
                root: here.f_div_scalar(self.share)?,
                segments,
            },
        );
        Ok(())
    }

    /// Chunk `chunk`'s backward pass of micro-batch `micro`: from its part of the loss plus
    /// `Σ output · gradient` with the gradient the next chunk sent back; its input's
    /// gradient kept to be sent in turn.
    fn backward(&mut self, chunk: usize, micro: usize) -> Result<()> {
        let ctx = self.ctx;
        let (m, _) = self.source.micro(ctx, micro);
        let at = format!("{}, micro-batch {m}, chunk {chunk} backward", self.label);
        let f = self
            .in_flight
            .remove(&(chunk, micro))
            .with_context(|| format!("internal error: {at} without its forward"))?;
        let mut total = f.root;
        if let Some(y) = &f.output {
            let g = self.output_grads.remove(&(chunk, micro)).with_context(|| {
                format!("internal error: {at}: its output's gradient never arrived")
            })?;
            total = total
                .f_to_kind(Kind::Double)?
                .f_add(&y.f_mul(&g)?.f_sum(Kind::Double)?)?;
        }
        match f.segments {
            Segments::Experts(hook) => hook.backward(&total)?,
            Segments::Tensor(tape) => tape.backward_tensor_parallel(
                &total,
                ctx.groups.expert(),
                ctx.groups.tensor(),
                &at,
            )?,
        }
        if let Some(x) = f.input {
            let g = x.grad();
            let g = if g.defined() { g } else { x.f_zeros_like()? };
            self.input_grads.insert((chunk, micro), g.f_detach()?);
        }
        Ok(())
    }

    /// One batch of the schedule's transfers with the neighbouring stages: what it sends
    /// (activations, or input gradients) taken from where the passes left them, and what it
    /// receives put where the next passes take them.
    fn exchange(&mut self, transfers: &[Transfer]) -> Result<()> {
        let label = self.label;
        let mut sent = Vec::new();
        for t in transfers.iter().filter(|t| t.send) {
            let key = (t.chunk, t.micro);
            let tensor = match t.payload {
                Payload::Activation if self.train => self
                    .in_flight
                    .get(&key)
                    .and_then(|f| f.output.as_ref())
                    .map(Tensor::f_detach)
                    .transpose()?,
                Payload::Activation => self.outputs.remove(&key),
                Payload::Gradient => self.input_grads.remove(&key),
            };
            let Some(tensor) = tensor else {
                bail!("internal error: {label}: nothing to send for {t:?}");
            };
            sent.push(tensor);
        }
        let mut received: Vec<Tensor> = transfers
            .iter()
            .filter(|t| !t.send)
            .map(|_| Tensor::f_zeros(self.activation, (self.model.compute, self.ctx.device)))
            .collect::<Result<_, _>>()?;
        {
            let mut sends = sent.iter();
            let mut recvs = received.iter_mut();
            let mut batch = Vec::with_capacity(transfers.len());
            for t in transfers {
                batch.push(if t.send {
                    PeerTransfer::Send {
                        tensor: sends.next().context("internal error: send")?,
                        to: t.peer,
                    }
                } else {
                    PeerTransfer::Recv {
                        into: recvs.next().context("internal error: receive")?,
                        from: t.peer,
                    }
                });
            }
            self.ctx
                .groups
                .pipeline()
                .send_recv(&mut batch, &format!("{label}, pipeline transfers"))?;
        }
        for (t, tensor) in transfers.iter().filter(|t| !t.send).zip(received) {
            let slot = match t.payload {
                Payload::Activation => &mut self.inputs,
                Payload::Gradient => &mut self.output_grads,
            };
            slot.insert((t.chunk, t.micro), tensor);
        }
        Ok(())
    }

    /// Clears the routing key and refuses a schedule that left a tensor behind.
    fn finish(self) -> Result<Vec<Forwarded>> {
        self.model.set_routing_key(None)?;
        if !(self.in_flight.is_empty()
            && self.inputs.is_empty()
            && self.output_grads.is_empty()
            && self.input_grads.is_empty()
            && self.outputs.is_empty())
        {
            bail!(
                "internal error: {}: the schedule left tensors unsent or unused",
                self.label
            );
        }
        Ok(self.forwarded)
    }
}

/// Chunk `chunk`'s forward pass on this rank's groups, its cuts recorded for the backward.
fn forward<'c>(
    model: &Transformer,
    ctx: &'c RankContext,
    chunk: usize,
    input: &Tensor,
    train: bool,
    at: &str,
) -> Result<(ChunkOutput, Segments<'c>)> {
    if ctx.tensor_size() > 1 {
        let mut tape = Tape::new();
        let mut exchanged = ExchangedExperts {
            group: ctx.groups.expert(),
            placements: &ctx.plan.placements,
            at,
            fastermoe: ctx.plan.fastermoe.as_ref(),
            shadowed: None,
        };
        let mut pass = TensorPass {
            group: ctx.groups.tensor(),
            tape: &mut tape,
            at,
            experts: if ctx.expert_group_size() > 1 {
                Some(&mut exchanged)
            } else {
                None
            },
        };
        let out = model.forward_chunk_tensor_parallel(chunk, input, train, &mut pass)?;
        return Ok((out, Segments::Tensor(tape)));
    }
    let mut hook = ExpertParallel::new(ctx, train, at.to_string());
    let out = model.forward_chunk_with(chunk, input, train, Some(&mut hook))?;
    Ok((out, Segments::Experts(hook)))
}
