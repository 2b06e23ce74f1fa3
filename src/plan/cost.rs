//! Costs of one plan, per pipeline stage (every rank of a stage holds the same shapes):
//! parameters and memory, per-step traffic, FLOPs and the time estimate.
//!
//! Owns the formulas of README.md ("`fmoec plan`"); knows nothing about how groups are listed or how
//! results are printed. All ranks of one stage cost the same under balanced routing, so
//! costs are kept per stage and copied to ranks by the caller.

use serde::Serialize;

use crate::check::{Activation, Checked, Ffn, Hardware, Precision};
use crate::diag::{Diagnostic, Span};
use crate::graph::{self, ModelGraph, NodeKind};

use super::diagnostics;
use super::grid::Grid;

/// Megatron-LM pads the vocabulary to a multiple of this times the tensor size
/// (`--make-vocab-size-divisible-by`, default 128).
pub const VOCAB_PAD: u64 = 128;

/// Megatron's padded vocabulary for tensor size `t`.
pub fn padded_vocab(vocab: u64, tensor: u64) -> u64 {
    let m = VOCAB_PAD * tensor;
    vocab.div_ceil(m) * m
}

/// Parameters held by one rank, by how they are placed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RankParams {
    /// Tensor-parallel shards (`1/tensor` of the matrix each).
    pub sharded: u64,
    /// Copied on every tensor rank, all-reduced over the data group.
    pub replicated: u64,
    /// Gate weights, all-reduced over the gate group.
    pub gate: u64,
    /// The rank's own experts (or their tensor slices).
    pub expert: u64,
    pub total: u64,
}

/// Whose training the memory estimate describes: the two keep different tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryModel {
    /// Megatron-LM v2.2 with FastMoE (what `fmoec emit` targets): half-precision weights
    /// and gradients, fp32 master weights and Adam moments, attention scores, softmax and
    /// dropout masks stored for the backward pass.
    #[default]
    Megatron,
    /// `fmoec run`: fp32 master weights and gradients, Adam moments, half-precision copies
    /// of the weights made at each use and kept for the backward pass, fused attention (no
    /// scores stored), no dropout, fp32 logits.
    Fmoec,
}

impl MemoryModel {
    pub fn describe(self) -> &'static str {
        match self {
            MemoryModel::Megatron => "Megatron-LM v2.2 training",
            MemoryModel::Fmoec => "`fmoec run`",
        }
    }
}

/// Bytes of one rank's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Whose training these figures describe.
    pub model: MemoryModel,
    pub weights: u64,
    pub grads: u64,
    /// fp32 master weights (mixed precision) and the two Adam moments.
    pub optimizer: u64,
    /// Activations of one micro-batch on this stage.
    pub activations_per_micro_batch: u64,
    /// Micro-batches whose activations are alive at once (1F1B: `min(pipeline - stage,
    /// micro_batches)`; the interleaved schedule: model chunks of micro-batches, each with
    /// 1/virtual_stages of the stage's activations, as many as its program keeps).
    pub in_flight: u64,
    pub activations: u64,
    pub total: u64,
    /// The GPU's memory, for comparison.
    pub capacity: u64,
}

impl Memory {
    /// (name, bytes), largest first.
    pub fn parts(&self) -> Vec<(&'static str, u64)> {
        let (optimizer, weights) = match self.model {
            MemoryModel::Megatron => (
                "optimizer state (fp32 master weights and Adam moments)",
                "weights",
            ),
            MemoryModel::Fmoec => (
                "optimizer state (Adam moments)",
                "weights (fp32 masters and their compute copies)",
            ),
        };
        let mut v = vec![
            (optimizer, self.optimizer),
            (weights, self.weights),
            ("gradients", self.grads),
            ("activations", self.activations),
        ];
        v.sort_by_key(|p| std::cmp::Reverse(p.1));
        v
    }
}

/// One MoE layer's token all-to-all for one micro-batch, bytes sent by one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AllToAll {
    pub layer: usize,
    /// Dispatch and combine of the forward pass.
    pub fwd_bytes: u64,
    /// Their gradients in the backward pass.
    pub bwd_bytes: u64,
}

/// Bytes one rank of a stage moves. All-reduce figures are message (buffer) sizes;
/// the time model applies the ring factor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    /// Tensor-parallel all-reduces per step (forward and backward).
    pub tensor_allreduce_bytes: u64,
    /// Per MoE layer of this stage, per micro-batch.
    pub all_to_all: Vec<AllToAll>,
    /// Per step, sum over layers and micro-batches.
    pub all_to_all_bytes: u64,
    /// Gradient all-reduce over the data group per step (dense, non-gate parameters).
    pub data_allreduce_bytes: u64,
    /// Expert gradients over the expert-data group per step (0 when it has one rank).
    pub expert_data_allreduce_bytes: u64,
    /// Gate gradients over the gate group per step.
    pub gate_allreduce_bytes: u64,
    /// Tied word-embedding gradients between first and last stage per step.
    pub embedding_allreduce_bytes: u64,
    /// Activations and their gradients sent to neighbouring stages per step.
    pub pipeline_send_bytes: u64,
    /// Activations and their gradients received from neighbouring stages per step.
    pub pipeline_recv_bytes: u64,
}

/// Seconds of one micro-batch (forward + backward) on one rank of a stage, and of the
/// gradient synchronisation at the end of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StageTime {
    pub compute_s: f64,
    pub tensor_s: f64,
    pub all_to_all_s: f64,
    pub pipeline_s: f64,
    /// `compute + tensor + all_to_all + pipeline`.
    pub micro_batch_s: f64,
    /// Data, expert-data, gate and embedding all-reduces, once per step.
    pub gradient_sync_s: f64,
}

/// Everything one rank of a stage costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageCost {
    pub params: RankParams,
    pub memory: Memory,
    /// Matmul FLOPs per step of one rank (forward and backward).
    pub flops_per_step: u64,
    pub traffic: Traffic,
    pub time: StageTime,
}

/// The step estimate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeEstimate {
    /// `(micro_batches + (pipeline - 1) / virtual_stages) * slowest micro_batch_s + slowest
    /// gradient_sync_s`.
    pub step_s: f64,
    /// Idle share of the 1F1B schedule: `(pipeline - 1) / (virtual_stages · micro_batches +
    /// pipeline - 1)` ([`super::schedule::bubble_fraction`]).
    pub bubble_fraction: f64,
    pub tokens_per_s: f64,
    /// Model matmul FLOPs per step, all ranks (3 × forward, no recomputation).
    pub model_flops_per_step: u64,
    /// Peak dense TFLOP/s of one GPU at the plan's precision.
    pub peak_tflops: f64,
    /// `model_flops_per_step / (step_s * world * peak)`.
    pub mfu: f64,
}

/// The costed plan for one micro-batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct Costed {
    pub micro_batch: u64,
    pub micro_batches: u64,
    pub stages: Vec<StageCost>,
    pub time: TimeEstimate,
}

impl Costed {
    pub fn fits(&self) -> bool {
        self.stages
            .iter()
            .all(|s| s.memory.total <= s.memory.capacity)
    }

    /// The diagnostic for the stage most over its memory.
    pub fn out_of_memory(&self, grid: &Grid, hardware: (&str, Span)) -> Diagnostic {
        let (s, st) = self
            .stages
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| s.memory.total.saturating_sub(s.memory.capacity))
            .unwrap_or((0, &self.stages[0]));
        let rank = grid.rank(0, 0, s as u64);
        diagnostics::out_of_memory(
            rank,
            s as u64,
            st.memory.total,
            (hardware.0, st.memory.capacity, hardware.1),
            &st.memory.parts(),
            self.micro_batch,
        )
    }
}

/// Bytes of one activation element at a precision.
fn act_bytes(p: Precision) -> u64 {
    match p {
        Precision::Fp32 => 4,
        Precision::Bf16 | Precision::Fp16 | Precision::Fp8 { .. } => 2,
    }
}

/// Bytes of optimizer state per parameter: Adam's two fp32 moments, plus an fp32 master
/// copy under mixed precision.
fn optimizer_bytes(p: Precision) -> u64 {
    match p {
        Precision::Fp32 => 8,
        Precision::Bf16 | Precision::Fp16 | Precision::Fp8 { .. } => 12,
    }
}

/// The dense peak the plan's matmuls run at outside FP8, and MFU's denominator: with
/// `precision = fp8` the bf16 peak (the FP8 matmuls are timed at `fp8_tflops` apart).
fn peak_tflops(c: &Checked, p: Precision) -> f64 {
    let h = &c.parallel.hardware;
    match p {
        Precision::Bf16 | Precision::Fp8 { .. } => h.bf16_tflops,
        Precision::Fp16 => h.fp16_tflops,
        Precision::Fp32 => h.fp32_tflops,
    }
}

/// Bandwidth in bytes/s between the ranks of `group`: NVLink when they share a host,
/// else the network.
fn bandwidth(c: &Checked, group: &[u64]) -> f64 {
    let h = &c.parallel.hardware;
    let gpn = h.gpus_per_node.max(1);
    let one_host = group.windows(2).all(|w| w[0] / gpn == w[1] / gpn);
    let gbps = if one_host {
        h.nvlink_gbps
    } else {
        h.network_gbps
    };
    gbps.max(1e-9) * 1e9
}

/// Ring all-reduce time of `bytes` over `n` ranks.
fn allreduce_s(bytes: u64, n: u64, bw: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    2.0 * (n - 1) as f64 / n as f64 * bytes as f64 / bw
}

/// Bytes per parameter of `fmoec run`: (weights, gradients, optimizer). fp32 master
/// weights, plus a compute-precision copy of each made at use and kept for the backward
/// pass under mixed precision (with `precision = fp8`, a matrix in FP8 has two e4m3 copies
/// instead, one per operand layout: 2 bytes all the same; their scales are counted apart);
/// fp32 gradients; two fp32 Adam moments.
fn fmoec_param_bytes(p: Precision) -> (u64, u64, u64) {
    match p {
        Precision::Fp32 => (4, 4, 8),
        Precision::Bf16 | Precision::Fp16 | Precision::Fp8 { .. } => (4 + 2, 4, 8),
    }
}

/// bf16 grouped matmuls reach this share of the bf16 peak (703 of 989.5 TFLOP/s at S1 on an
/// H100, DESIGN.md "Measured facts for FP8").
const BF16_MATMUL_SHARE: f64 = 0.71;

/// The FP8 grouped matmul's speed over the bf16 one, as a share of the peaks' ratio, by the
/// smaller of the two matrix widths: 0.88 at 4096 and above (S1: forward, input and weight
/// gradient 1.76x on an H100 on average), 0.55 at 768 and below (S3: 1.10x), interpolated in
/// log2 between (measured with fast accumulation, BENCHMARKS.md 2026-12-06).
fn fp8_matmul_share(smaller_width: u64) -> f64 {
    let (lo, hi) = (768f64.log2(), 4096f64.log2());
    let t = (((smaller_width.max(1)) as f64).log2() - lo) / (hi - lo);
    0.55 + t.clamp(0.0, 1.0) * (0.88 - 0.55)
}

/// The share of the HBM bandwidth the FP8 quantisations reach in a layer: 0.27 puts the
/// bytes of [`FP8_QUANT_BYTES_INPUT`] and [`FP8_QUANT_BYTES_HIDDEN`] at the time S1's FP8
/// layer took beyond its matmuls on an H100 (about 10 ms of 31; single passes reach about
/// 0.6 at S3's sizes, but a layer's also wait on small launches and their column maxima;
/// BENCHMARKS.md 2026-12-06). With it the estimate keeps S1 in FP8 (measured 1.12-1.14x) and
/// F0 and S3 in bf16 (measured 0.28-0.47x in FP8).
const FP8_QUANT_BANDWIDTH_SHARE: f64 = 0.27;

/// Bytes the FP8 quantisations move per element of an expert layer's activations: its
/// input (transposed for the weight gradient: 5; its gradient row-wise and transposed: 8;
/// the forward copy is written by the dispatch: 1) and each hidden activation (row-wise
/// forward: 3, transposed: 5, its gradient both ways: 8).
const FP8_QUANT_BYTES_INPUT: f64 = 14.0;
const FP8_QUANT_BYTES_HIDDEN: f64 = 16.0;
/// The same for a dense matmul's input and output widths (row-wise and transposed copies of
/// the input and of the output's gradient).
const FP8_QUANT_BYTES_DENSE: f64 = 8.0;

/// One MoE layer's routed experts on one rank, for a micro-batch: forward and backward of
/// its matmuls in bf16 and with FP8 operands (see [`fp8_expert_estimate`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8ExpertEstimate {
    pub bf16_s: f64,
    pub fp8_s: f64,
}

/// The estimated time of one MoE layer's expert matmuls, forward and backward, in bf16 and
/// in FP8 on `hw` (`None` without FP8 tensor cores): `rows` token rows (tokens × top-k) over
/// `experts` local experts of `width` → `hidden` (`act`'s matrices). Each of the three
/// matmuls per matrix (forward, input and weight gradient) takes the longer of its FLOPs at
/// the rate matmuls of that shape reach ([`BF16_MATMUL_SHARE`], [`fp8_matmul_share`]) and
/// its bytes (inputs, weights, output; FP8 operands are 1 byte) at the HBM bandwidth: so
/// FP8 pays twice over when the experts' few rows leave the matmuls streaming weights, and
/// little when narrow matrices leave its tensor cores idle. FP8 adds its quantisation passes
/// over the activations at the HBM bandwidth.
pub fn fp8_expert_estimate(
    hw: &Hardware,
    width: u64,
    hidden: u64,
    act: Activation,
    rows: f64,
    experts: u64,
) -> Option<Fp8ExpertEstimate> {
    let fp8_peak = hw.fp8_tflops? * 1e12;
    let bf16_rate = hw.bf16_tflops * 1e12 * BF16_MATMUL_SHARE;
    let fp8_rate = bf16_rate * fp8_peak / (hw.bf16_tflops.max(1e-9) * 1e12)
        * fp8_matmul_share(width.min(hidden));
    let hbm = hw.hbm_gbps.max(1e-9) * 1e9;
    let (k, n) = (width as f64, hidden as f64);
    let r = rows / experts.max(1) as f64;
    let flops = 2.0 * r * k * n;
    // one matmul of one expert: operands A (r × k or r × n), B (k × n), out
    let one = |rate: f64, operand: f64| -> f64 {
        let bytes = operand * (r * k + k * n) + 2.0 * r * n;
        (flops / rate).max(bytes / hbm)
    };
    let matmuls = 3.0 * act.matrices() as f64 * experts as f64;
    let bf16_s = matmuls * one(bf16_rate, 2.0);
    let quant_bytes = rows
        * (FP8_QUANT_BYTES_INPUT * k + FP8_QUANT_BYTES_HIDDEN * n * (act.matrices() as f64 - 1.0));
    let fp8_s = matmuls * one(fp8_rate, 1.0) + quant_bytes / (hbm * FP8_QUANT_BANDWIDTH_SHARE);
    Some(Fp8ExpertEstimate { bf16_s, fp8_s })
}

/// Whether an MoE layer's experts run in FP8 under `precision = fp8`: where
/// [`fp8_expert_estimate`] says FP8 is faster (`fmoec run` falls back to bf16 per layer
/// elsewhere, as the plan assumes).
pub fn fp8_pays_for_experts(
    hw: &Hardware,
    width: u64,
    hidden: u64,
    act: Activation,
    rows: f64,
    experts: u64,
) -> bool {
    fp8_expert_estimate(hw, width, hidden, act, rows, experts).is_some_and(|e| e.fp8_s < e.bf16_s)
}

/// Activation bytes `fmoec run` keeps for one block and one micro-batch of `sb` tokens
/// (see README.md, "`fmoec plan`"): both norms' inputs and outputs, Q K V, the fused
/// attention's output and fp32 log-sum-exp, the projection's input (a copy), rotary copies;
/// the MLP's internals; for MoE layers the fp32 gate logits and probabilities, the
/// dispatched tokens (`top_k` rows per token), the experts' internals and outputs.
fn block_activations_fmoec(c: &Checked, layer: usize, a: u64, sb: u64) -> u64 {
    let w = |x: u64| x as u128;
    let m = &c.model;
    let (a, sb, h) = (w(a), w(sb), w(m.width));
    let att = &m.attention;
    let q = w(att.heads) * w(att.head_dim);
    let kv = w(att.kv_heads) * w(att.head_dim);
    let rotary = if m.positions == crate::check::Positions::Rotary {
        2 * a * sb * (q + kv)
    } else {
        0
    };
    let attention = a * sb * (4 * h + 2 * q + q + 2 * kv) + 4 * w(att.heads) * sb + rotary;
    let internals = |act: crate::check::Activation, rows: u128, hidden: u128| {
        2 * (w(act.matrices()) - 1) * a * rows * hidden
    };
    let ffn = match &m.layers[layer].ffn {
        Ffn::Dense(mlp) => internals(mlp.act, sb, w(mlp.hidden)),
        Ffn::Moe(moe) => {
            let routed = w(moe.top_k) * sb;
            let shared = moe.shared.as_ref().map_or(0, |s| {
                w(s.count) * internals(s.expert.act, sb, w(s.expert.hidden))
            });
            8 * sb * w(moe.experts)
                + 2 * a * routed * h
                + internals(moe.expert.act, routed, w(moe.expert.hidden))
                + shared
        }
    };
    u64::try_from(attention + ffn).unwrap_or(u64::MAX)
}

/// Activation bytes of one block for one micro-batch on one rank (see README.md, "`fmoec plan`").
fn block_activations(c: &Checked, layer: usize, grid: &Grid, a: u64, seq: u64, sb: u64) -> u64 {
    // u128: attention scores grow with seq², and the planner must not overflow on
    // whatever sizes a file declares (the result saturates instead).
    let w = |x: u64| x as u128;
    let m = &c.model;
    let (a, seq, sb, t, h) = (w(a), w(seq), w(sb), w(grid.tensor), w(m.width));
    let att = &m.attention;
    let q = w(att.heads) * w(att.head_dim);
    let kv = w(att.kv_heads) * w(att.head_dim);
    // Norm inputs (2), QKV input, Q K V, attention scores: softmax output, dropout mask
    // (1 byte), dropout output; projection input; dropout mask (1 byte).
    let scores = w(att.heads) * seq * sb / t;
    let attention = 2 * a * sb * h
        + a * sb * h
        + a * sb * (q + 2 * kv) / t
        + (2 * a + 1) * scores
        + a * sb * q / t
        + sb * h;
    let ffn = match &m.layers[layer].ffn {
        Ffn::Dense(mlp) => a * sb * h + w(mlp.act.matrices()) * a * sb * w(mlp.hidden) / t + sb * h,
        Ffn::Moe(moe) => {
            let te = if c.parallel.expert_slicing { t } else { 1 };
            let cap = moe.gate.capacity.map(|c| c.train.max(1.0)).unwrap_or(1.0);
            let routed = (cap * (moe.top_k as f64) * (sb as f64)).ceil() as u128;
            let shared = moe.shared.as_ref().map_or(0, |s| {
                w(s.expert.act.matrices()) * a * sb * w(s.count) * w(s.expert.hidden) / t
            });
            // Input, fp32 gate logits, dispatched tokens, expert internals, expert
            // outputs, dropout mask.
            a * sb * h
                + 4 * sb * w(moe.experts)
                + a * routed * h
                + w(moe.expert.act.matrices()) * a * routed * w(moe.expert.hidden) / te
                + a * routed * h
                + sb * h
                + shared
        }
    };
    u64::try_from(attention + ffn).unwrap_or(u64::MAX)
}

/// Costs every stage at micro-batch `mb` with `micro_batches` per step.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    g: &ModelGraph,
    c: &Checked,
    grid: &Grid,
    precision: Precision,
    seq_len: u64,
    mb: u64,
    micro_batches: u64,
    model: MemoryModel,
) -> Costed {
    let m = &c.model;
    let t = grid.tensor;
    let p = grid.pipeline;
    let v = grid.virtual_stages.max(1);
    let a = act_bytes(precision);
    let pb = precision.param_bytes();
    let slicing = c.parallel.expert_slicing && t > 1;
    let te = if slicing { t } else { 1 };
    let depth = m.depth();
    let tokens = mb * seq_len;
    let h = m.width;
    let vpad = padded_vocab(m.vocab, t);
    let peak = peak_tflops(c, precision).max(1e-9) * 1e12;
    let hw = &c.parallel.hardware;
    // FP8 (`precision = fp8` on a GPU with FP8 tensor cores): its peak, whether the dense
    // matmuls take it too, and which MoE layers' experts do (where it pays)
    let fp8 = match precision {
        Precision::Fp8 { dense } => hw.fp8_tflops.map(|f| (f * 1e12, dense)),
        _ => None,
    };
    let fp8_dense = fp8.is_some_and(|(_, dense)| dense);
    let fp8_experts: Vec<bool> = m
        .layers
        .iter()
        .map(|l| match (&l.ffn, fp8) {
            (Ffn::Moe(moe), Some(_)) => fp8_pays_for_experts(
                hw,
                m.width,
                moe.expert.hidden / te,
                moe.expert.act,
                (tokens * moe.top_k) as f64,
                (moe.experts / grid.expert_group).max(1),
            ),
            _ => false,
        })
        .collect();
    let stage_of = |layer: usize| grid.stage_of_layer(layer as u64, depth);
    let mut stages = Vec::new();
    for s in 0..p {
        let on_stage = |n: &graph::Node| match n.layer {
            Some(l) => stage_of(l) == s,
            None => {
                (n.kind == NodeKind::Embedding && s == 0)
                    || (n.kind != NodeKind::Embedding && s == p - 1)
            }
        };
        // Parameters.
        let mut rp = RankParams::default();
        let mut flops_per_token = 0u64;
        // of which with FP8 operands, the FP8 quantisations' bytes per token, and the bytes
        // of the FP8 copies' scales
        let mut fp8_flops_per_token = 0u64;
        let mut fp8_quant_bytes_per_token = 0.0f64;
        let mut fp8_scale_bytes = 0u64;
        let att = &m.attention;
        let (qkv_out, proj_in) = (
            (att.heads + 2 * att.kv_heads) * att.head_dim,
            att.heads * att.head_dim,
        );
        for (_, n) in g.nodes().filter(|(_, n)| on_stage(n)) {
            let fb = n.flops_fwd + n.flops_bwd;
            if fp8_dense {
                // the projections, not the attention scores; every dense matmul's input
                // and output widths
                let dense_widths = match n.kind {
                    NodeKind::Attention => {
                        fp8_flops_per_token += (fb - 3 * 4 * seq_len * proj_in) / t;
                        Some(h + qkv_out / t + proj_in / t + h)
                    }
                    NodeKind::Mlp | NodeKind::SharedExperts => {
                        fp8_flops_per_token += fb / t;
                        let (act, hidden) = match n.layer.map(|l| &m.layers[l].ffn) {
                            Some(Ffn::Dense(mlp)) => (mlp.act, mlp.hidden),
                            Some(Ffn::Moe(moe)) => match &moe.shared {
                                Some(s) => (s.expert.act, s.count * s.expert.hidden),
                                None => (Activation::Gelu, 0),
                            },
                            None => (Activation::Gelu, 0),
                        };
                        Some(act.matrices() * (h + hidden / t))
                    }
                    NodeKind::LmHead => {
                        fp8_flops_per_token += fb / m.vocab.max(1) * vpad / t;
                        Some(h + vpad / t)
                    }
                    _ => None,
                };
                if let Some(w) = dense_widths {
                    fp8_quant_bytes_per_token += FP8_QUANT_BYTES_DENSE * w as f64;
                    fp8_scale_bytes += 4 * w;
                }
            }
            if n.kind == NodeKind::Experts && n.layer.is_some_and(|l| fp8_experts[l]) {
                fp8_flops_per_token += fb / te;
            }
            match n.kind {
                NodeKind::Embedding => {
                    rp.sharded += vpad * h / t;
                    rp.replicated += n.params.replicated;
                }
                NodeKind::LmHead => {
                    if !g.tied_embeddings || p > 1 {
                        rp.sharded += vpad * h / t;
                    }
                    // fb is 6·width·vocab: scale it to the padded vocabulary.
                    flops_per_token += fb / m.vocab.max(1) * vpad / t;
                }
                NodeKind::Experts => flops_per_token += fb / te,
                NodeKind::Gate => {
                    rp.gate += n.params.gate;
                    flops_per_token += fb;
                }
                _ => {
                    rp.sharded += n.params.sharded / t;
                    rp.replicated += n.params.replicated;
                    flops_per_token += fb / t;
                }
            }
        }
        let mut all_to_all = Vec::new();
        let mut a2a_s = 0.0;
        let mut act = 0u64;
        let mut tensor_msgs = 0u64;
        // The groups of tensor rank 0 of this stage, as (lowest, highest) rank: they
        // are increasing, so they share a host exactly when those two do.
        let base = grid.rank(0, 0, s);
        let dgroup = [base, grid.rank(0, grid.data - 1, s)];
        let egroup = [base, grid.rank(0, grid.expert_group - 1, s)];
        for layer in (0..m.layers.len()).filter(|&l| stage_of(l) == s) {
            act = act.saturating_add(match model {
                MemoryModel::Megatron => block_activations(c, layer, grid, a, seq_len, tokens),
                MemoryModel::Fmoec => block_activations_fmoec(c, layer, a, tokens),
            });
            // Attention output, forward and backward.
            tensor_msgs += 2;
            match &m.layers[layer].ffn {
                Ffn::Dense(_) => tensor_msgs += 2,
                Ffn::Moe(moe) => {
                    if slicing || moe.shared.is_some() {
                        tensor_msgs += 2;
                    }
                    let one = graph::mlp_params(h, &moe.expert, m.bias);
                    let local = moe.experts / grid.expert_group;
                    rp.expert += local * (one.sharded / te + one.replicated);
                    if fp8_experts[layer] {
                        let (hidden, matrices) =
                            (moe.expert.hidden / te, moe.expert.act.matrices());
                        // each matrix: a scale per output column and per row
                        fp8_scale_bytes += local * matrices * 4 * (h + hidden);
                        fp8_quant_bytes_per_token += (moe.top_k * local * grid.expert_group) as f64
                            / moe.experts.max(1) as f64
                            * (FP8_QUANT_BYTES_INPUT * h as f64
                                + FP8_QUANT_BYTES_HIDDEN * (hidden * (matrices - 1)) as f64);
                    }
                    let g = grid.expert_group;
                    let bytes = u64::try_from(
                        2 * (moe.top_k as u128)
                            * (tokens as u128)
                            * (h as u128)
                            * (a as u128)
                            * (g as u128 - 1)
                            / g as u128,
                    )
                    .unwrap_or(u64::MAX);
                    all_to_all.push(AllToAll {
                        layer,
                        fwd_bytes: bytes,
                        bwd_bytes: bytes,
                    });
                    a2a_s += 2.0 * bytes as f64 / bandwidth(c, &egroup);
                }
            }
        }
        if s == 0 {
            // The vocab-parallel embedding's output is all-reduced.
            tensor_msgs += 1;
        }
        if s == p - 1 {
            // The LM head's input gradient is all-reduced; the final norm input and the
            // fp32 logits of the vocab-parallel cross entropy stay alive. `fmoec run`
            // keeps the final norm's input and output, the fp32 logits and their
            // log-softmax, and at the start of the backward pass their gradient.
            tensor_msgs += 1;
            act = match model {
                MemoryModel::Megatron => act
                    .saturating_add(a * tokens * h)
                    .saturating_add((4 * tokens).saturating_mul(vpad) / t),
                MemoryModel::Fmoec => act
                    .saturating_add(2 * a * tokens * h)
                    .saturating_add((12 * tokens).saturating_mul(m.vocab)),
            };
        }
        if t == 1 {
            tensor_msgs = 0;
        }
        rp.total = rp.sharded + rp.replicated + rp.gate + rp.expert;
        let grad_bytes = pb;
        // Micro-batches whose activations are alive at once: plain 1F1B keeps the stages
        // ahead of this one in flight; the interleaved schedule counts model chunks (each
        // 1/v of the stage's activations), as its program runs them.
        let in_flight = if v == 1 {
            (p - s).min(micro_batches).max(1)
        } else {
            let pipeline = super::schedule::Pipeline {
                stages: p as usize,
                virtual_stages: v as usize,
                micro_batches: micro_batches as usize,
            };
            super::schedule::peak_in_flight(&pipeline, s as usize)
                .map_or((p - s).min(micro_batches).max(1) * v, |n| n.max(1) as u64)
        };
        let (weight_b, grad_b, optimizer_b) = match model {
            MemoryModel::Megatron => (pb, grad_bytes, optimizer_bytes(precision)),
            MemoryModel::Fmoec => fmoec_param_bytes(precision),
        };
        let weights = rp
            .total
            .saturating_mul(weight_b)
            .saturating_add(match model {
                MemoryModel::Fmoec => fp8_scale_bytes,
                MemoryModel::Megatron => 0,
            });
        let grads = rp.total.saturating_mul(grad_b);
        let optimizer = rp.total.saturating_mul(optimizer_b);
        let activations = act.saturating_mul(in_flight) / v;
        let memory = Memory {
            model,
            weights,
            grads,
            optimizer,
            activations_per_micro_batch: act,
            in_flight,
            activations,
            total: weights
                .saturating_add(grads)
                .saturating_add(optimizer)
                .saturating_add(activations),
            capacity: c.parallel.hardware.memory_bytes,
        };
        // Traffic per step.
        let msg = tokens * h * a;
        let tensor_bytes = tensor_msgs.saturating_mul(msg);
        // Per micro-batch each chunk sends its output on and its input's gradient back,
        // except at the model's two ends, and receives as many.
        let transfers = 2 * v - u64::from(s == 0) - u64::from(s + 1 == p);
        let p2p = 2 * transfers * msg;
        let dense = rp.sharded + rp.replicated;
        let tied_copy = g.tied_embeddings && p > 1 && (s == 0 || s == p - 1);
        let emb_bytes = if tied_copy {
            vpad * h / t * grad_bytes
        } else {
            0
        };
        let ed = grid.data / grid.expert_group;
        let edgroup = [base, grid.rank(0, (ed - 1) * grid.expert_group, s)];
        let gate_group = [base, grid.rank(t - 1, grid.data - 1, s)];
        let gate_size = grid.world / p;
        let traffic = Traffic {
            tensor_allreduce_bytes: tensor_bytes.saturating_mul(micro_batches),
            all_to_all_bytes: all_to_all
                .iter()
                .map(|x| (x.fwd_bytes.saturating_add(x.bwd_bytes)).saturating_mul(micro_batches))
                .fold(0u64, u64::saturating_add),
            all_to_all,
            data_allreduce_bytes: if grid.data > 1 { dense * grad_bytes } else { 0 },
            expert_data_allreduce_bytes: if ed > 1 { rp.expert * grad_bytes } else { 0 },
            gate_allreduce_bytes: if gate_size > 1 {
                rp.gate * grad_bytes
            } else {
                0
            },
            embedding_allreduce_bytes: emb_bytes,
            pipeline_send_bytes: (p2p / 2).saturating_mul(micro_batches),
            pipeline_recv_bytes: (p2p / 2).saturating_mul(micro_batches),
        };
        let tgroup = [base, grid.rank(t - 1, 0, s)];
        let first = grid.rank(0, 0, s);
        let pipe_bw = {
            let mut bw = f64::INFINITY;
            if s > 0 {
                bw = bw.min(bandwidth(c, &[grid.rank(0, 0, s - 1), first]));
            }
            if s + 1 < p {
                bw = bw.min(bandwidth(c, &[first, grid.rank(0, 0, s + 1)]));
            }
            // the interleaved schedule's wrap-around from the last stage to the first
            if v > 1 && p > 1 && (s == 0 || s + 1 == p) {
                bw = bw.min(bandwidth(c, &[grid.rank(0, 0, 0), grid.rank(0, 0, p - 1)]));
            }
            bw
        };
        let compute_s = match fp8 {
            Some((fp8_peak, _)) => {
                (flops_per_token - fp8_flops_per_token) as f64 * tokens as f64 / peak
                    + fp8_flops_per_token as f64 * tokens as f64 / fp8_peak
                    + fp8_quant_bytes_per_token * tokens as f64
                        / (hw.hbm_gbps.max(1e-9) * 1e9 * FP8_QUANT_BANDWIDTH_SHARE)
            }
            None => flops_per_token as f64 * tokens as f64 / peak,
        };
        let tensor_s = allreduce_s(tensor_bytes, t, bandwidth(c, &tgroup));
        let pipeline_s = if transfers == 0 {
            0.0
        } else {
            p2p as f64 / pipe_bw
        };
        let gradient_sync_s = allreduce_s(
            traffic.data_allreduce_bytes,
            grid.data,
            bandwidth(c, &dgroup),
        ) + allreduce_s(
            traffic.expert_data_allreduce_bytes,
            ed,
            bandwidth(c, &edgroup),
        ) + allreduce_s(
            traffic.gate_allreduce_bytes,
            gate_size,
            bandwidth(c, &gate_group),
        ) + if tied_copy {
            allreduce_s(
                emb_bytes,
                2,
                bandwidth(c, &[grid.rank(0, 0, 0), grid.rank(0, 0, p - 1)]),
            )
        } else {
            0.0
        };
        let time = StageTime {
            compute_s,
            tensor_s,
            all_to_all_s: a2a_s,
            pipeline_s,
            micro_batch_s: compute_s + tensor_s + a2a_s + pipeline_s,
            gradient_sync_s,
        };
        stages.push(StageCost {
            params: rp,
            memory,
            flops_per_step: flops_per_token
                .saturating_mul(tokens)
                .saturating_mul(micro_batches),
            traffic,
            time,
        });
    }
    let slowest = stages
        .iter()
        .map(|s| s.time.micro_batch_s)
        .fold(0.0, f64::max);
    let sync = stages
        .iter()
        .map(|s| s.time.gradient_sync_s)
        .fold(0.0, f64::max);
    // The interleaved schedule fills and drains the pipeline in 1/v of a micro-batch time
    // per stage (plan::schedule simulates it to this figure).
    let step_s = (micro_batches as f64 + (p - 1) as f64 / v as f64) * slowest + sync;
    let global_tokens = mb * micro_batches * grid.data * seq_len;
    let model_flops_per_step = g.flops_per_token().saturating_mul(global_tokens);
    let time = TimeEstimate {
        step_s,
        bubble_fraction: super::schedule::bubble_fraction(p, v, micro_batches),
        tokens_per_s: if step_s > 0.0 {
            global_tokens as f64 / step_s
        } else {
            0.0
        },
        model_flops_per_step,
        peak_tflops: peak / 1e12,
        mfu: if step_s > 0.0 {
            g.flops_per_token() as f64 * global_tokens as f64 / (step_s * grid.world as f64 * peak)
        } else {
            0.0
        },
    };
    Costed {
        micro_batch: mb,
        micro_batches,
        stages,
        time,
    }
}
