//! Costs of one plan, per pipeline stage (every rank of a stage holds the same shapes):
//! parameters and memory, per-step traffic, FLOPs and the time estimate.
//!
//! Owns the formulas of README.md ("`fmoec plan`"); knows nothing about how groups are listed or how
//! results are printed. All ranks of one stage cost the same under balanced routing, so
//! costs are kept per stage and copied to ranks by the caller.

use serde::Serialize;

use crate::check::{
    Activation, Checked, Ffn, Hardware, Model, Moe, Precision, Shadowing, SmartSchedule,
};
use crate::diag::{Diagnostic, Span};
use crate::graph::{self, ModelGraph, NodeKind};

use super::diagnostics;
use super::fastermoe::{self, ExchangeCosts, GroupRows};
use super::grid::{Grid, Layout};

/// Megatron-LM pads the vocabulary to a multiple of this times the tensor size
/// (`--make-vocab-size-divisible-by`, default 128).
pub const VOCAB_PAD: u64 = 128;

/// Megatron's padded vocabulary for tensor size `t`.
pub fn padded_vocab(vocab: u64, tensor: u64) -> u64 {
    padded_vocab_to(vocab, VOCAB_PAD, tensor)
}

/// The vocabulary padded to a multiple of `multiple × tensor`: [`VOCAB_PAD`] where Megatron pads
/// its tokenizer's vocabulary, 1 where the target takes the file's (`--padded-vocab-size`, which
/// must split evenly over the tensor ranks).
pub fn padded_vocab_to(vocab: u64, multiple: u64, tensor: u64) -> u64 {
    let m = multiple.max(1) * tensor.max(1);
    vocab.div_ceil(m) * m
}

/// Where one MoE layer's experts sit, for the cost model (the planner derives it from the
/// expert group, the slicing and the target's layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExpertPlacement {
    pub layout: Layout,
    /// Ranks that split a layer's experts and exchange its tokens (all-to-all).
    pub parallel: u64,
    /// Ranks that hold slices of the same experts (`hidden / slices` each).
    pub slices: u64,
    /// Rank distance between neighbours of one expert group: the tensor size in FastMoE's
    /// layout (data ranks are `t` apart), the expert-tensor size in Megatron-Core's.
    pub stride: u64,
}

impl ExpertPlacement {
    /// Ranks holding the same expert slices, in a stage of `per_stage` ranks.
    pub fn expert_data(&self, per_stage: u64) -> u64 {
        per_stage / (self.stride * self.parallel).max(1)
    }
}

/// What the memory estimate assumes of the training beyond the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainingRules {
    /// The vocabulary is padded to a multiple of this times the tensor size.
    pub vocab_multiple: u64,
    /// Megatron-Core's distributed optimizer: fp32 main weights (and gradients) and the Adam
    /// moments sharded over the data-parallel group (experts': the expert-data group).
    pub distributed_optimizer: bool,
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
    /// Megatron-Core (`fmoec plan --megatron core_v0.19`, chosen with the target): bf16 weights with fp32 main
    /// gradients, or fp16 weights and gradients with fp32 main copies, the optimizer's fp32
    /// state sharded by its distributed optimizer; sequence parallelism and fused attention
    /// (every activation split over the tensor ranks, no attention scores stored).
    #[value(skip)]
    MegatronCore,
}

impl MemoryModel {
    pub fn describe(self) -> &'static str {
        match self {
            MemoryModel::Megatron => "Megatron-LM v2.2 training",
            MemoryModel::Fmoec => "`fmoec run`",
            MemoryModel::MegatronCore => "Megatron-Core training",
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
    /// Megatron-Core only (0 for the other models): what its local attention keeps beyond
    /// `total` when Transformer Engine is missing and the emitted `train.sh` falls back to
    /// Megatron's local modules: each layer's attention probabilities, their dropout mask and
    /// output for the micro-batches in flight, and the one score buffer they share.
    #[serde(skip_serializing_if = "is_zero")]
    pub unfused_attention: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Memory {
    /// (name, bytes), largest first.
    pub fn parts(&self) -> Vec<(&'static str, u64)> {
        let (optimizer, weights) = match self.model {
            MemoryModel::Megatron => (
                "optimizer state (fp32 master weights and Adam moments)",
                "weights",
            ),
            MemoryModel::MegatronCore => (
                "optimizer state (fp32 main weights and Adam moments, sharded)",
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
    /// The stage's weights read at the compute precision (forward, and again for the input
    /// gradient) and their gradients accumulated into fp32 (read and write), at the GPU's
    /// memory bandwidth: the same for every micro-batch whatever its tokens
    /// ([`weight_traffic_bytes`]).
    pub weight_traffic_s: f64,
    /// `compute + weight_traffic + tensor + all_to_all + pipeline`.
    pub micro_batch_s: f64,
    /// Data, expert-data, gate and embedding all-reduces, once per step.
    pub gradient_sync_s: f64,
}

/// Everything one rank of a stage costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageCost {
    pub params: RankParams,
    pub memory: Memory,
    /// Matmul FLOPs per step of one rank (forward and backward); 128 bits, since real
    /// trainings pass 2^64 FLOPs per step.
    pub flops_per_step: u128,
    pub traffic: Traffic,
    pub time: StageTime,
    /// Each MoE layer's expert exchange under FasterMoE's model (see
    /// [`super::fastermoe`]); the plan lists them apart from the stage's JSON.
    #[serde(skip)]
    pub exchanges: Vec<LayerExchange>,
}

/// One MoE layer's expert exchange and experts for one micro-batch (forward and backward)
/// on the busiest rank of its expert group, under the file's smart schedule and
/// shadowing and the plan's routing skew.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerExchange {
    pub layer: usize,
    /// What its rows and experts cost (the runtime's shadowing decides with these).
    pub costs: ExchangeCosts,
    /// Chunks of the pipelined exchange (1: one all-to-all each way).
    pub chunks: u64,
    /// Experts that dynamic shadowing replicates at the plan's routing skew (0 without
    /// shadowing).
    pub shadowed: u64,
    /// Seconds of plain expert parallelism: transfer and experts of the busiest rank, in
    /// sequence, with no chunks and no shadows.
    pub plain_s: f64,
    /// Seconds with the file's options (what the time estimate counts).
    pub planned_s: f64,
    /// Seconds with dynamic shadowing whether or not the file asks for it (to show what it
    /// would do).
    pub with_shadowing_s: f64,
    /// Experts dynamic shadowing would replicate (whether or not the file asks for it).
    pub would_shadow: u64,
}

impl LayerExchange {
    /// A layer whose experts all sit on each rank (an expert group of one rank, or no
    /// experts): its `rows` are computed where they are, with nothing to exchange or shadow.
    fn nothing_exchanged(layer: usize, costs: ExchangeCosts, rows: f64) -> LayerExchange {
        let compute_s = rows * costs.row_compute_s;
        LayerExchange {
            layer,
            costs,
            chunks: 1,
            shadowed: 0,
            plain_s: compute_s,
            planned_s: compute_s,
            with_shadowing_s: compute_s,
            would_shadow: 0,
        }
    }
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
    /// Model matmul FLOPs per step, all ranks (3 × forward, no recomputation); 128 bits, since
    /// real trainings pass 2^64 (a 400B-parameter dense model on 16M tokens does 4·10^19).
    pub model_flops_per_step: u128,
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
    /// Under `precision = fp8` on a GPU with FP8 tensor cores: what stays in bf16 (boxed:
    /// a costed candidate is passed around by value).
    pub fp8_fallbacks: Option<Box<Fp8Fallbacks>>,
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
            st.memory.model,
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

/// Bytes a micro-batch moves per parameter to accumulate the parameter's gradient into an
/// fp32 buffer: read and write (`fmoec run`'s fp32 gradients, Megatron-LM's `main_grad`).
const GRADIENT_ACCUMULATION_BYTES: u64 = 8;

/// Bytes one micro-batch moves through a rank's memory for its `params` parameters, whatever
/// its tokens, at `precision`: each weight read at the compute precision by the forward pass
/// and again by the input gradient (fp32 training reads the fp32 weights themselves), and its
/// gradient accumulated in fp32 ([`GRADIENT_ACCUMULATION_BYTES`]). Lookup tables (the
/// embeddings on a stage without the head) count as read whole.
pub fn weight_traffic_bytes(params: u64, precision: Precision) -> u64 {
    params.saturating_mul(2 * act_bytes(precision) + GRADIENT_ACCUMULATION_BYTES)
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

/// Bytes per parameter under Megatron-Core: (weight, main gradient, optimizer state), the last
/// sharded by the distributed optimizer (Megatron's `docs/user-guide/features/dist_optimizer.md`):
/// bf16 weights with fp32 main gradients and fp32 main weights + Adam moments (2, 4, 12); fp16
/// weights and gradients with fp32 main weights, main gradients and moments (2, 2, 16); fp32
/// (4, 4, 8). FP8 keeps bf16 weights (Transformer Engine's FP8 copies are not counted).
fn core_param_bytes(p: Precision) -> (u64, u64, u64) {
    match p {
        Precision::Bf16 | Precision::Fp8 { .. } => (2, 4, 12),
        Precision::Fp16 => (2, 2, 16),
        Precision::Fp32 => (4, 4, 8),
    }
}

/// Activation bytes of one block and one micro-batch on one rank of a Megatron-Core training
/// (see README.md, "`fmoec plan`"): v2.2's terms ([`block_activations`]) with sequence
/// parallelism (Megatron-Core requires it for MoE with tensor parallelism: every activation is
/// split over the `t` tensor ranks) and fused attention (Transformer Engine's or flash: no
/// attention scores, `4·heads·sb/t` fp32 softmax statistics). In an MoE layer each tensor rank
/// routes its own `sb/t` tokens: `R = ⌈min(c·k, E)·sb/t⌉` rows ([`routed_rows`]), gathered over
/// the `e` expert-tensor ranks (`e·R` rows of `f/e` per expert: the internals are `m·a·R·f`).
fn block_activations_core(
    c: &Checked,
    layer: usize,
    grid: &Grid,
    experts: &ExpertPlacement,
    a: u64,
    sb: u64,
) -> u64 {
    let w = |x: u64| x as u128;
    let m = &c.model;
    let (a, sb, t, h) = (w(a), w(sb), w(grid.tensor), w(m.width));
    let att = &m.attention;
    let q = w(att.heads) * w(att.head_dim);
    let kv = w(att.kv_heads) * w(att.head_dim);
    // Norm inputs (2), QKV input, Q K V, the attention output (the projection's input), its
    // softmax statistics, the dropout mask (1 byte).
    let attention =
        (3 * a * sb * h + a * sb * (q + 2 * kv) + a * sb * q + 4 * w(att.heads) * sb + sb * h) / t;
    let ffn = match &m.layers[layer].ffn {
        Ffn::Dense(mlp) => {
            (a * sb * h + w(mlp.act.matrices()) * a * sb * w(mlp.hidden) + sb * h) / t
        }
        Ffn::Moe(moe) => {
            let e = w(experts.slices);
            let routed = routed_rows(moe, sb as f64 / t as f64);
            let shared = moe.shared.as_ref().map_or(0, |s| {
                w(s.expert.act.matrices()) * a * sb * w(s.count) * w(s.expert.hidden) / t
            });
            // Input, fp32 gate logits, the rows gathered for the experts, the experts'
            // internals, their outputs, the dropout mask.
            (a * sb * h + 4 * sb * w(moe.experts) + sb * h) / t
                + 2 * a * e * routed * h
                + w(moe.expert.act.matrices()) * a * routed * w(moe.expert.hidden)
                + shared
        }
    };
    u64::try_from(attention + ffn).unwrap_or(u64::MAX)
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

/// The share of the HBM bandwidth the FP8 quantisations reach in a layer: 0.18, with the
/// bytes of [`FP8_QUANT_BYTES_INPUT`] and [`FP8_QUANT_BYTES_HIDDEN`], keeps the verdicts of
/// the FP8 layer measured on an H100 with the column maxima in the passes (BENCHMARKS.md
/// 2026-12-06 part 3, call C): S1 in FP8 (estimated 1.23x, measured 1.40x; SwiGLU 1.17x,
/// measured 1.45x), F0 in bf16 (estimated 0.95x, measured 0.86-0.92x) and S3 in bf16
/// (estimated 0.43-0.48x, measured 0.79-0.86x). Single passes reach 0.7-0.8 of the
/// bandwidth; the layer's time beyond its matmuls is more than its passes' bytes explain
/// (launch gaps and small kernels: call B's profile), which this share stands for.
const FP8_QUANT_BANDWIDTH_SHARE: f64 = 0.18;

/// Bytes the FP8 quantisations move per element of an expert layer's activations: its
/// input (the forward copy, written by the dispatch with its column maxima: 1; transposed
/// for the weight gradient: 3; its gradient row-wise, written by the combine's backward: 1,
/// and transposed: 3) and each hidden activation (row-wise forward, written by the
/// activation's pass: 1; transposed: 3; its gradient row-wise, written by the activation's
/// backward, and transposed: 4; SwiGLU's two gradients quantise in a pass of their own,
/// the same 8 a matrix on average).
const FP8_QUANT_BYTES_INPUT: f64 = 8.0;
const FP8_QUANT_BYTES_HIDDEN: f64 = 8.0;
/// The same where the weight gradients stay bf16 ([`fp8_weight_gradient`]): the row-wise
/// copies alone (the forward's and the gradient's, 1 each), neither transposed copy nor
/// column maxima.
const FP8_QUANT_BYTES_ROWS_ONLY: f64 = 2.0;

/// The same for a dense matmul's input and output widths (row-wise and transposed copies of
/// the input and of the output's gradient).
const FP8_QUANT_BYTES_DENSE: f64 = 8.0;

/// The share of the HBM bandwidth a dense matmul's FP8 passes reach, with the bytes of
/// [`FP8_QUANT_BYTES_DENSE`] over its input and output widths: 0.65. GPT-2-medium-MoE's step,
/// traced on an H100 with only its experts and with every matmul in FP8 (BENCHMARKS.md
/// 2026-12-07 22:59 UTC: 1,394 and 1,447 ms, its dense matmuls 202 ms faster in FP8), paid
/// about 255 ms for the 675 GB these bytes count: 0.79 of the bandwidth at its widths (the
/// 0.65 was first taken from an experts-only step estimated, not traced, at 19:58 UTC). 0.65
/// stays because the verdicts measured hold from 0.63 to 0.72 and not at 0.79: below 0.63 the
/// DeepSeek-MoE slice's attention would stay bf16 (in FP8 with its head and first MLP it trained
/// 3.3% faster than with every dense matmul in bf16), from 0.73 its shared experts' MLPs would
/// take FP8 (with them it trained 0.3-0.7% slower, four rounds in two calls).
/// GPT-2-medium-MoE and the GPT 345M slice keep their dense matmuls in bf16 up to 1.5 at least
/// (0.40 before the bias went into the FP8 matmul's epilogue and the row passes raised the
/// column maxima, when the all-FP8 step took 1,654 ms).
const FP8_DENSE_QUANT_BANDWIDTH_SHARE: f64 = 0.65;

/// The share of the HBM bandwidth at which the weight gradients' own FP8 passes (each
/// operand's transposed copy with its column maxima: 3 bytes an element of the input and of
/// the output gradient) are counted when [`fp8_weight_gradient`] decides: 0.5, fitted to the
/// layers measured on an H100 with the weight gradients on FP8 and on bf16 operands, in
/// alternating processes (BENCHMARKS.md 2026-12-08 01:17 UTC), per matrix: S3 (1024 rows an
/// expert, 2048 → 768) 0.5 ms faster in bf16 (estimated 0.61), the S1 shapes at 1024 rows
/// (4096 → 14336) 0.33 ms faster in FP8 (estimated 0.32); at 128 rows an expert F0 and S1
/// (0.12 ms faster in bf16 each; estimated 0.06 and 0.03: the passes' fixed costs, which
/// this share leaves out, weigh more there).
const FP8_WEIGHT_GRAD_COPY_BANDWIDTH_SHARE: f64 = 0.5;

/// Whether the weight gradients `xᵀ · g` of experts of `width` → `hidden` that get
/// `rows_per_expert` rows each take FP8 operands: where the FP8 matmul's time and its
/// operands' transposed copies ([`FP8_WEIGHT_GRAD_COPY_BANDWIDTH_SHARE`]) take less than the
/// bf16 matmul on the layer's own bf16 operands ([`weight_gradient_matmul`]). Not with few
/// rows an expert, where both precisions only write the gradient (bf16 `width × hidden`,
/// the same in either), nor with narrow matrices, where FP8's matmul is little faster (S3:
/// 1.10x) and its copies cost more than it saves. `fmoec run` decides so per MoE layer, as
/// the plan assumes.
pub fn fp8_weight_gradient(hw: &Hardware, width: u64, hidden: u64, rows_per_expert: f64) -> bool {
    let Some(m) = weight_gradient_matmul(hw, width, hidden, rows_per_expert) else {
        return false;
    };
    let hbm = hw.hbm_gbps.max(1e-9) * 1e9;
    let copies = 3.0 * rows_per_expert * (width + hidden) as f64
        / (hbm * FP8_WEIGHT_GRAD_COPY_BANDWIDTH_SHARE);
    m.fp8_s + copies < m.bf16_s
}

/// One dense matmul (`rows` × `k` times `k` × `n`) forward and backward (three matmuls) in
/// bf16 and with FP8 operands on `hw` (`None` without FP8 tensor cores): each matmul the
/// longer of its FLOPs at the rate of its shape ([`BF16_MATMUL_SHARE`],
/// [`fp8_matmul_share`]) and its bytes at the HBM bandwidth; FP8 adds its passes' bytes
/// ([`FP8_QUANT_BYTES_DENSE`] per element of the input and output widths) at
/// [`FP8_DENSE_QUANT_BANDWIDTH_SHARE`] of the bandwidth.
pub fn fp8_dense_estimate(hw: &Hardware, k: u64, n: u64, rows: f64) -> Option<Fp8ExpertEstimate> {
    let one = one_matmul(hw, k, n, rows)?;
    let hbm = hw.hbm_gbps.max(1e-9) * 1e9;
    let quant_bytes = FP8_QUANT_BYTES_DENSE * rows * (k as f64 + n as f64);
    Some(Fp8ExpertEstimate {
        bf16_s: 3.0 * one.bf16_s,
        fp8_s: 3.0 * one.fp8_s + quant_bytes / (hbm * FP8_DENSE_QUANT_BANDWIDTH_SHARE),
    })
}

/// One matmul of `rows` × `k` times `k` × `n` (out `rows` × `n`, bf16) in bf16 and with FP8
/// operands on `hw` (`None` without FP8 tensor cores): [`matmul_estimate`] with its bytes both
/// operands (FP8's at 1 byte) and the output.
fn one_matmul(hw: &Hardware, k: u64, n: u64, rows: f64) -> Option<Fp8ExpertEstimate> {
    let (kf, nf) = (k as f64, n as f64);
    matmul_estimate(hw, k, n, rows, |operand| {
        operand * (rows * kf + kf * nf) + 2.0 * rows * nf
    })
}

/// The weight gradient `xᵀ · g` of one such matmul (`rows` × `k` and `rows` × `n` in, `k` ×
/// `n` out, bf16): [`matmul_estimate`] with its bytes the two operands and the gradient it
/// writes.
fn weight_gradient_matmul(hw: &Hardware, k: u64, n: u64, rows: f64) -> Option<Fp8ExpertEstimate> {
    let (kf, nf) = (k as f64, n as f64);
    matmul_estimate(hw, k, n, rows, |operand| {
        operand * rows * (kf + nf) + 2.0 * kf * nf
    })
}

/// A matmul of `2 · rows · k · n` FLOPs moving `bytes(operand)` bytes (operands of `operand`
/// bytes an element) in bf16 and with FP8 operands on `hw` (`None` without FP8 tensor
/// cores): the longer of its FLOPs at the rate matmuls of widths `k` and `n` reach
/// ([`BF16_MATMUL_SHARE`], [`fp8_matmul_share`]) and its bytes at the HBM bandwidth.
fn matmul_estimate(
    hw: &Hardware,
    k: u64,
    n: u64,
    rows: f64,
    bytes: impl Fn(f64) -> f64,
) -> Option<Fp8ExpertEstimate> {
    let fp8_peak = hw.fp8_tflops? * 1e12;
    let bf16_rate = hw.bf16_tflops * 1e12 * BF16_MATMUL_SHARE;
    let fp8_rate =
        bf16_rate * fp8_peak / (hw.bf16_tflops.max(1e-9) * 1e12) * fp8_matmul_share(k.min(n));
    let hbm = hw.hbm_gbps.max(1e-9) * 1e9;
    let flops = 2.0 * rows * k as f64 * n as f64;
    let at = |rate: f64, operand: f64| -> f64 { (flops / rate).max(bytes(operand) / hbm) };
    Some(Fp8ExpertEstimate {
        bf16_s: at(bf16_rate, 2.0),
        fp8_s: at(fp8_rate, 1.0),
    })
}

/// Whether a module's dense matmuls (`shapes`: each `(k, n)`, all taking `rows` rows) run in
/// FP8 under `fp8_dense`: where every width is a multiple of 16 (as `_scaled_mm` needs) and
/// [`fp8_dense_estimate`] says that together they are faster
/// (narrow models lose more to the passes than the faster matmuls save; `fmoec run` keeps
/// such a module in bf16, as the plan assumes).
pub fn fp8_pays_for_dense(hw: &Hardware, shapes: &[(u64, u64)], rows: f64) -> bool {
    let (mut bf16_s, mut fp8_s) = (0.0, 0.0);
    for &(k, n) in shapes {
        // the FP8 matmul takes widths that are multiples of 16 only
        if k % 16 != 0 || n % 16 != 0 {
            return false;
        }
        let Some(e) = fp8_dense_estimate(hw, k, n, rows) else {
            return false;
        };
        bf16_s += e.bf16_s;
        fp8_s += e.fp8_s;
    }
    !shapes.is_empty() && fp8_s < bf16_s
}

/// Under `precision = fp8`, what keeps bf16 operands because FP8 would not pay there at the
/// plan's micro-batch ([`fp8_fallbacks`]); `fmoec run` takes the plan's for the layout it
/// runs, and says so.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Fp8Fallbacks {
    /// The MoE layers (block indices) whose routed experts stay in bf16.
    pub experts: Vec<usize>,
    /// The MoE layers whose routed experts take FP8 but whose weight gradients take the
    /// layer's bf16 operands ([`fp8_weight_gradient`]).
    pub weight_gradients: Vec<usize>,
    /// Under `fp8_dense`: the blocks whose attention projections stay in bf16,
    pub attention: Vec<usize>,
    /// those whose dense MLP or shared experts do,
    pub mlps: Vec<usize>,
    /// and whether the LM head does.
    pub head: bool,
}

impl Fp8Fallbacks {
    /// The dense modules that stay in bf16, for a note: "the attention projections of blocks
    /// [0, 1], the MLPs of blocks [0] and the LM head"; `None` where there are none.
    pub fn dense_modules(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.attention.is_empty() {
            parts.push(format!(
                "the attention projections of blocks {:?}",
                self.attention
            ));
        }
        if !self.mlps.is_empty() {
            parts.push(format!("the MLPs of blocks {:?}", self.mlps));
        }
        if self.head {
            parts.push("the LM head".to_string());
        }
        let last = parts.pop()?;
        Some(match parts.is_empty() {
            true => last,
            false => format!("{} and {last}", parts.join(", ")),
        })
    }

    /// Everything that stays in bf16, for the plan: "the experts of layers [1, 3], ...";
    /// `None` where everything asked for takes FP8.
    pub fn describe(&self) -> Option<String> {
        let experts =
            (!self.experts.is_empty()).then(|| format!("the experts of layers {:?}", self.experts));
        let gradients = (!self.weight_gradients.is_empty()).then(|| {
            format!(
                "the expert weight gradients of layers {:?}",
                self.weight_gradients
            )
        });
        let parts: Vec<String> = [experts, gradients, self.dense_modules()]
            .into_iter()
            .flatten()
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// What decides, on one rank of a training, which modules keep bf16 operands under
/// `precision = fp8` ([`fp8_fallbacks`]): the plan's layout and micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Layout {
    /// `fp8_dense`: the attention projections, dense MLPs, shared experts and LM head too.
    pub dense: bool,
    /// Tensor ranks splitting the attention's heads and the MLPs' hidden columns.
    pub tensor: u64,
    /// Ranks splitting each MoE layer's experts (each holds `experts / expert_parallel`).
    pub expert_parallel: u64,
    /// Ranks holding slices of the same experts (`hidden / expert_slices` each).
    pub expert_slices: u64,
    /// Tokens of one micro-batch (its sequences times their length).
    pub tokens: u64,
}

/// What keeps bf16 operands under `precision = fp8` on one rank of `layout`: each MoE
/// layer's routed experts where [`fp8_pays_for_experts`] says no for its share of the
/// experts and their rows, and with `dense` each module where [`fp8_pays_for_dense`] says no
/// for its matmuls ([`fp8_dense_shapes`]); the LM head as `fmoec run` computes it (FP8 runs
/// nowhere else): the file's vocabulary, not padded, whole on every tensor rank. The
/// planner's choice (`fmoec plan`'s `fp8:` line), which `fmoec run` takes for the layout it
/// runs; the one rule for callers that have no plan.
pub fn fp8_fallbacks(model: &Model, hw: &Hardware, layout: &Fp8Layout) -> Fp8Fallbacks {
    let Fp8Layout {
        dense,
        tensor,
        tokens,
        ..
    } = *layout;
    let t = tensor.max(1);
    let keeps_bf16 = |shapes: &[(u64, u64)]| !fp8_pays_for_dense(hw, shapes, tokens as f64);
    // a block's modules (the vocabulary sizes only the head, whose matmul is the run's below,
    // not the padded and split one the costs take)
    let block_keeps_bf16 = |kind: NodeKind, layer: usize| -> Option<bool> {
        let shapes = fp8_dense_shapes(model, kind, Some(layer), t, model.vocab)?;
        Some(keeps_bf16(&shapes))
    };
    let mut f = Fp8Fallbacks::default();
    for (l, layer) in model.layers.iter().enumerate() {
        if let Ffn::Moe(moe) = &layer.ffn {
            let hidden = moe.expert.hidden / layout.expert_slices.max(1);
            let rows = (tokens * moe.top_k) as f64;
            let experts = (moe.experts / layout.expert_parallel.max(1)).max(1);
            if !fp8_pays_for_experts(hw, model.width, hidden, moe.expert.act, rows, experts) {
                f.experts.push(l);
            } else if !fp8_weight_gradient(hw, model.width, hidden, rows / experts as f64) {
                f.weight_gradients.push(l);
            }
        }
        if !dense {
            continue;
        }
        if block_keeps_bf16(NodeKind::Attention, l) == Some(true) {
            f.attention.push(l);
        }
        if block_keeps_bf16(NodeKind::Mlp, l) == Some(true) {
            f.mlps.push(l);
        }
    }
    f.head = dense && keeps_bf16(&[(model.width, model.vocab)]);
    f
}

/// The dense matmuls `(k, n)` that `fp8_dense` puts on FP8 operands in graph node `kind`
/// (of block `layer`) on one of `t` tensor ranks: the attention's two projections, a dense
/// MLP's or the shared experts' matrices, the LM head over the padded vocabulary `vpad`;
/// `None` for other nodes and for a block without such matrices.
pub fn fp8_dense_shapes(
    m: &Model,
    kind: NodeKind,
    layer: Option<usize>,
    t: u64,
    vpad: u64,
) -> Option<Vec<(u64, u64)>> {
    let h = m.width;
    let mlp = |act: Activation, hidden: u64| -> Vec<(u64, u64)> {
        let mut shapes = vec![(h, hidden / t); act.matrices() as usize - 1];
        shapes.push((hidden / t, h));
        shapes
    };
    match kind {
        NodeKind::Attention => {
            let att = &m.attention;
            let q = att.heads * att.head_dim;
            let qkv = (att.heads + 2 * att.kv_heads) * att.head_dim;
            Some(vec![(h, qkv / t), (q / t, h)])
        }
        NodeKind::Mlp | NodeKind::SharedExperts => match &m.layers.get(layer?)?.ffn {
            Ffn::Dense(d) => Some(mlp(d.act, d.hidden)),
            Ffn::Moe(moe) => moe
                .shared
                .as_ref()
                .map(|s| mlp(s.expert.act, s.count * s.expert.hidden)),
        },
        NodeKind::LmHead => Some(vec![(h, vpad / t)]),
        _ => None,
    }
}

/// Seconds of matmuls in bf16 and with FP8 operands: one MoE layer's routed experts on one
/// rank for a micro-batch, forward and backward ([`fp8_expert_estimate`]), a dense matmul's
/// three ([`fp8_dense_estimate`]), or a single matmul.
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
/// little when narrow matrices leave its tensor cores idle. The weight gradients count their
/// operands and the gradient they write instead, and take FP8 operands only where
/// [`fp8_weight_gradient`] says so. FP8 adds its quantisation passes over the activations at
/// the HBM bandwidth (without the weight gradients' transposed copies where those stay bf16).
pub fn fp8_expert_estimate(
    hw: &Hardware,
    width: u64,
    hidden: u64,
    act: Activation,
    rows: f64,
    experts: u64,
) -> Option<Fp8ExpertEstimate> {
    // the matmuls of one expert: its share of the rows
    let per_expert = rows / experts.max(1) as f64;
    let one = one_matmul(hw, width, hidden, per_expert)?;
    let wgrad = weight_gradient_matmul(hw, width, hidden, per_expert)?;
    let fp8_wgrad = fp8_weight_gradient(hw, width, hidden, per_expert);
    let hbm = hw.hbm_gbps.max(1e-9) * 1e9;
    let (k, n) = (width as f64, hidden as f64);
    let matrices = act.matrices() as f64 * experts as f64;
    let (bytes_input, bytes_hidden) = match fp8_wgrad {
        true => (FP8_QUANT_BYTES_INPUT, FP8_QUANT_BYTES_HIDDEN),
        false => (FP8_QUANT_BYTES_ROWS_ONLY, FP8_QUANT_BYTES_ROWS_ONLY),
    };
    let quant_bytes = rows * (bytes_input * k + bytes_hidden * n * (act.matrices() as f64 - 1.0));
    Some(Fp8ExpertEstimate {
        bf16_s: matrices * (2.0 * one.bf16_s + wgrad.bf16_s),
        fp8_s: matrices * (2.0 * one.fp8_s + if fp8_wgrad { wgrad.fp8_s } else { wgrad.bf16_s })
            + quant_bytes / (hbm * FP8_QUANT_BANDWIDTH_SHARE),
    })
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

/// Attention scores of one block for one micro-batch on one tensor rank (`heads/t` heads of
/// `seq × seq` for each of the micro-batch's sequences), in elements; saturating.
fn attention_scores(c: &Checked, grid: &Grid, seq: u64, sb: u64) -> u64 {
    let w = |x: u64| x as u128;
    let scores = w(c.model.attention.heads) * w(seq) * w(sb) / w(grid.tensor);
    u64::try_from(scores).unwrap_or(u64::MAX)
}

/// Rows that reach a rank's experts from `tokens` routed tokens under balanced routing:
/// `⌈c·k·tokens⌉`, `c` the train capacity factor (1 without a capacity). At most
/// `experts · tokens`: a token reaches an expert at most once, so a factor beyond
/// `experts / top_k` (any float a file may write) grants rows that are never filled.
fn routed_rows(moe: &Moe, tokens: f64) -> u128 {
    let cap = moe.gate.capacity.map(|c| c.train.max(1.0)).unwrap_or(1.0);
    let rows = (cap * moe.top_k as f64).min(moe.experts as f64) * tokens;
    rows.ceil() as u128
}

/// Activation bytes of one block for one micro-batch on one rank (see README.md, "`fmoec plan`").
fn block_activations(c: &Checked, layer: usize, grid: &Grid, a: u64, seq: u64, sb: u64) -> u64 {
    // u128: attention scores grow with seq², and the planner must not overflow on
    // whatever sizes a file declares (the result saturates instead).
    let w = |x: u64| x as u128;
    let m = &c.model;
    let scores = w(attention_scores(c, grid, seq, sb));
    let (a, sb, t, h) = (w(a), w(sb), w(grid.tensor), w(m.width));
    let att = &m.attention;
    let q = w(att.heads) * w(att.head_dim);
    let kv = w(att.kv_heads) * w(att.head_dim);
    // Norm inputs (2), QKV input, Q K V, attention scores: softmax output, dropout mask
    // (1 byte), dropout output; projection input; dropout mask (1 byte).
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
            let routed = routed_rows(moe, sb as f64);
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

/// One MoE layer's expert exchange under FasterMoE's model ([`fastermoe`]), for one
/// micro-batch on the busiest rank of an expert group of `group` ranks: `rows` token rows per
/// rank, `row` = (bytes of one row, the group's bandwidth), `flops` = (expert FLOPs of one
/// row forward and backward, the rate the estimate runs them at, FP8 or not),
/// `expert_params` parameters of one expert on one rank (broadcast and reduced as the fp32
/// masters `fmoec run` keeps when shadowed).
#[allow(clippy::too_many_arguments)]
fn layer_exchange(
    c: &Checked,
    (layer, moe): (usize, &crate::check::Moe),
    group: u64,
    rows: f64,
    (row_bytes, bw): (f64, f64),
    (row_flops, rate): (f64, f64),
    expert_params: u64,
    routing_skew: f64,
) -> LayerExchange {
    let costs = ExchangeCosts::of_layer(row_bytes, row_flops, expert_params as f64 * 4.0, bw, rate);
    let experts = moe.experts as usize;
    let g = group.max(1) as usize;
    if g <= 1 || experts == 0 {
        return LayerExchange::nothing_exchanged(layer, costs, rows);
    }
    let (table, owner) = group_routing(experts, g, rows, routing_skew);
    let routed = GroupRows {
        rows: &table,
        owner: &owner,
    };
    let chunks_for = |transfer: f64, compute: f64| {
        exchange_chunks(
            c.parallel.smart_schedule,
            transfer,
            compute,
            group,
            costs.call_s,
        )
    };
    let (t0, x0) = routed.busiest(&vec![false; experts], &costs);
    let chosen = fastermoe::choose_shadows(&routed, &costs);
    let mut mask = vec![false; experts];
    for &e in &chosen {
        mask[e] = true;
    }
    let (ts, xs) = routed.busiest(&mask, &costs);
    let shadow_chunks = chunks_for(ts, xs);
    let with_shadowing_s = fastermoe::pipelined_s(ts, xs, shadow_chunks, costs.call_s)
        + chosen.len() as f64 * costs.shadow_s;
    let (chunks, shadowed, planned_s) = match c.parallel.shadowing {
        Shadowing::Dynamic => (shadow_chunks, chosen.len() as u64, with_shadowing_s),
        Shadowing::Off => {
            let n = chunks_for(t0, x0);
            (n, 0, fastermoe::pipelined_s(t0, x0, n, costs.call_s))
        }
    };
    LayerExchange {
        layer,
        costs,
        chunks,
        shadowed,
        plain_s: t0 + x0,
        planned_s,
        with_shadowing_s,
        would_shadow: chosen.len() as u64,
    }
}

/// The rows each of the `g` ranks of an expert group routes to each expert (every rank the
/// same `rows`, shared out with `routing_skew`), and each expert's owning rank (experts in
/// consecutive blocks per rank).
fn group_routing(
    experts: usize,
    g: usize,
    rows: f64,
    routing_skew: f64,
) -> (Vec<Vec<f64>>, Vec<usize>) {
    let per = (experts / g).max(1);
    let owner: Vec<usize> = (0..experts).map(|e| (e / per).min(g - 1)).collect();
    let shares = fastermoe::skewed_shares(experts, routing_skew);
    let table: Vec<Vec<f64>> = vec![shares.iter().map(|p| rows * p).collect(); g];
    (table, owner)
}

/// How many chunks the exchange is pipelined in under `smart_schedule`, for a transfer and
/// compute of these lengths over an expert group of `group` ranks.
fn exchange_chunks(
    smart_schedule: SmartSchedule,
    transfer_s: f64,
    compute_s: f64,
    group: u64,
    call_s: f64,
) -> u64 {
    match smart_schedule {
        SmartSchedule::Off => 1,
        SmartSchedule::Auto => fastermoe::best_chunks(transfer_s, compute_s, group, call_s),
        SmartSchedule::Chunks { count } => count.clamp(1, group),
    }
}

/// Costs every stage at micro-batch `mb` with `micro_batches` per step, the experts placed as
/// `experts` says. `routing_skew`: the
/// busiest expert of each MoE layer routes this many times the mean (1: balanced; see
/// [`fastermoe::skewed_shares`]).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    g: &ModelGraph,
    c: &Checked,
    grid: &Grid,
    experts: &ExpertPlacement,
    rules: &TrainingRules,
    precision: Precision,
    seq_len: u64,
    mb: u64,
    micro_batches: u64,
    model: MemoryModel,
    routing_skew: f64,
) -> Costed {
    let tokens = mb * seq_len;
    let hw = &c.parallel.hardware;
    let fp8 = match precision {
        Precision::Fp8 { dense } => hw.fp8_tflops.map(|f| (f * 1e12, dense)),
        _ => None,
    };
    let vpad = padded_vocab_to(c.model.vocab, rules.vocab_multiple, grid.tensor);
    let fp8_fallbacks = fp8.map(|(_, dense)| {
        let layout = Fp8Layout {
            dense,
            tensor: grid.tensor,
            expert_parallel: experts.parallel,
            expert_slices: experts.slices,
            tokens,
        };
        Box::new(fp8_fallbacks(&c.model, hw, &layout))
    });
    let fp8_experts = fp8_experts(c, fp8_fallbacks.as_deref());
    let e = Eval {
        g,
        c,
        grid,
        experts,
        rules,
        precision,
        seq_len,
        mb,
        micro_batches,
        model,
        routing_skew,
        a: act_bytes(precision),
        tokens,
        vpad,
        peak: peak_tflops(c, precision).max(1e-9) * 1e12,
        fp8,
        fp8_experts,
        fp8_fallbacks: fp8_fallbacks.as_deref(),
    };
    let stages: Vec<StageCost> = (0..grid.pipeline).map(|s| e.stage(s)).collect();
    let time = e.step_time(&stages);
    Costed {
        micro_batch: mb,
        micro_batches,
        stages,
        time,
        fp8_fallbacks,
    }
}

/// Per layer: whether its experts run in FP8 (under `precision = fp8` on a GPU with FP8
/// tensor cores, `fallbacks` given): each MoE layer that `fallbacks` does not keep in bf16.
fn fp8_experts(c: &Checked, fallbacks: Option<&Fp8Fallbacks>) -> Vec<bool> {
    c.model
        .layers
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            matches!(layer.ffn, Ffn::Moe(_)) && fallbacks.is_some_and(|f| !f.experts.contains(&l))
        })
        .collect()
}

/// What every stage's cost reads: the configuration, and what is derived from it once.
struct Eval<'a> {
    g: &'a ModelGraph,
    c: &'a Checked,
    grid: &'a Grid,
    experts: &'a ExpertPlacement,
    rules: &'a TrainingRules,
    precision: Precision,
    seq_len: u64,
    mb: u64,
    micro_batches: u64,
    model: MemoryModel,
    routing_skew: f64,
    /// Bytes of an activation element.
    a: u64,
    /// Tokens of one micro-batch.
    tokens: u64,
    /// The vocabulary as the embedding and head hold it (padded).
    vpad: u64,
    /// The dense peak (FLOP/s) the matmuls outside FP8 run at.
    peak: f64,
    /// `precision = fp8` on a GPU with FP8 tensor cores: its peak (FLOP/s), and whether the
    /// dense matmuls take it too.
    fp8: Option<(f64, bool)>,
    /// Per layer: its experts run in FP8 (where the estimate says it pays).
    fp8_experts: Vec<bool>,
    /// What stays in bf16 under `precision = fp8` (`None` otherwise).
    fp8_fallbacks: Option<&'a Fp8Fallbacks>,
}

/// One stage's parameters per rank and FLOPs per token, before its MoE layers are costed.
struct StageWork {
    rp: RankParams,
    flops_per_token: u64,
    /// Each layer's expert matmul FLOPs per token on this rank.
    expert_flops_per_token: Vec<u64>,
    /// Of `flops_per_token`, those on FP8 operands.
    fp8_flops_per_token: u64,
    /// Bytes the FP8 quantisations move per token.
    fp8_quant_bytes_per_token: f64,
    /// The same for the dense matmuls in FP8 (`fp8_dense`), at their own bandwidth share.
    fp8_dense_quant_bytes_per_token: f64,
    /// Bytes of the FP8 copies' scales.
    fp8_scale_bytes: u64,
}

/// One stage's MoE exchanges, activations per micro-batch and tensor-parallel messages.
struct StageLayers {
    all_to_all: Vec<AllToAll>,
    exchanges: Vec<LayerExchange>,
    a2a_s: f64,
    act: u64,
    /// Attention scores (elements) of one micro-batch over the stage's layers, on one rank.
    scores: u64,
    tensor_msgs: u64,
}

impl Eval<'_> {
    /// Model chunks per stage.
    fn v(&self) -> u64 {
        self.grid.virtual_stages.max(1)
    }

    fn stage_of(&self, layer: usize) -> u64 {
        self.grid.stage_of_layer(layer as u64, self.c.model.depth())
    }

    /// Everything one rank of stage `s` costs.
    fn stage(&self, s: u64) -> StageCost {
        let mut work = self.stage_work(s);
        let layers = self.stage_layers(s, &mut work);
        let memory = self.stage_memory(s, &work, layers.act, layers.scores);
        let StageLayers {
            all_to_all,
            exchanges,
            a2a_s,
            tensor_msgs,
            ..
        } = layers;
        let (traffic, time) = self.stage_traffic_and_time(s, &work, all_to_all, tensor_msgs, a2a_s);
        StageCost {
            params: work.rp,
            memory,
            flops_per_step: u128::from(work.flops_per_token)
                * u128::from(self.tokens)
                * u128::from(self.micro_batches),
            traffic,
            time,
            exchanges,
        }
    }

    /// Whether graph node `n` runs on stage `s`: a block's nodes on their layer's stage, the
    /// embedding on the first stage, the final norm, head and loss on the last.
    fn on_stage(&self, n: &graph::Node, s: u64) -> bool {
        match n.layer {
            Some(l) => self.stage_of(l) == s,
            None => {
                (n.kind == NodeKind::Embedding && s == 0)
                    || (n.kind != NodeKind::Embedding && s == self.grid.pipeline - 1)
            }
        }
    }

    /// The word embedding's parameters on one tensor rank (the padded vocabulary split over
    /// the tensor ranks): an untied head, and the last stage's copy of a tied one, hold as
    /// many.
    fn word_embedding_shard(&self) -> u64 {
        self.vpad * self.c.model.width / self.grid.tensor
    }

    /// The LM head's FLOPs per token on one tensor rank, from the graph's `fb` (forward and
    /// backward, 6·width·vocab): scaled to the padded vocabulary.
    fn lm_head_flops(&self, fb: u64) -> u64 {
        fb / self.c.model.vocab.max(1) * self.vpad / self.grid.tensor
    }

    /// Stage `s`'s parameters per rank and FLOPs per token, from the graph's nodes on it.
    fn stage_work(&self, s: u64) -> StageWork {
        let fp8_dense = self.fp8.is_some_and(|(_, dense)| dense);
        let mut w = StageWork {
            rp: RankParams::default(),
            flops_per_token: 0,
            expert_flops_per_token: vec![0; self.c.model.layers.len()],
            fp8_flops_per_token: 0,
            fp8_quant_bytes_per_token: 0.0,
            fp8_dense_quant_bytes_per_token: 0.0,
            fp8_scale_bytes: 0,
        };
        for (_, n) in self.g.nodes().filter(|(_, n)| self.on_stage(n, s)) {
            if fp8_dense {
                self.add_fp8_dense_matmuls(n, &mut w);
            }
            if n.kind == NodeKind::Experts && n.layer.is_some_and(|l| self.fp8_experts[l]) {
                w.fp8_flops_per_token += (n.flops_fwd + n.flops_bwd) / self.experts.slices;
            }
            self.add_params_and_flops(n, &mut w);
        }
        w
    }

    /// Node `n`'s dense matmuls on FP8 operands (the projections, not the attention scores),
    /// unless [`fp8_fallbacks`] keeps the node in bf16 at this micro-batch: their FLOPs per
    /// token, and the quantisation bytes and scales of every dense matmul's input and output
    /// widths.
    fn add_fp8_dense_matmuls(&self, n: &graph::Node, w: &mut StageWork) {
        let (m, t) = (&self.c.model, self.grid.tensor);
        let fb = n.flops_fwd + n.flops_bwd;
        let Some(shapes) = fp8_dense_shapes(m, n.kind, n.layer, t, self.vpad) else {
            return;
        };
        let Some(f) = self.fp8_fallbacks else {
            return;
        };
        let in_bf16 = match (n.kind, n.layer) {
            (NodeKind::Attention, Some(l)) => f.attention.contains(&l),
            (NodeKind::Mlp | NodeKind::SharedExperts, Some(l)) => f.mlps.contains(&l),
            (NodeKind::LmHead, _) => f.head,
            _ => true,
        };
        if in_bf16 {
            return;
        }
        w.fp8_flops_per_token += match n.kind {
            // the attention scores stay in bf16
            NodeKind::Attention => {
                (fb - 3 * 4 * self.seq_len * m.attention.heads * m.attention.head_dim) / t
            }
            NodeKind::LmHead => self.lm_head_flops(fb),
            _ => fb / t,
        };
        let width: u64 = shapes.iter().map(|(k, n)| k + n).sum();
        w.fp8_dense_quant_bytes_per_token += FP8_QUANT_BYTES_DENSE * width as f64;
        w.fp8_scale_bytes += 4 * width;
    }

    /// Node `n`'s parameters on one rank, by placement, and its FLOPs per token there.
    fn add_params_and_flops(&self, n: &graph::Node, w: &mut StageWork) {
        let (t, te) = (self.grid.tensor, self.experts.slices);
        let fb = n.flops_fwd + n.flops_bwd;
        match n.kind {
            NodeKind::Embedding => {
                w.rp.sharded += self.word_embedding_shard();
                w.rp.replicated += n.params.replicated;
            }
            NodeKind::LmHead => {
                if !self.g.tied_embeddings || self.grid.pipeline > 1 {
                    w.rp.sharded += self.word_embedding_shard();
                }
                w.flops_per_token += self.lm_head_flops(fb);
            }
            NodeKind::Experts => {
                w.flops_per_token += fb / te;
                if let Some(slot) = n.layer.and_then(|l| w.expert_flops_per_token.get_mut(l)) {
                    *slot += fb / te;
                }
            }
            NodeKind::Gate => {
                w.rp.gate += n.params.gate;
                w.flops_per_token += fb;
            }
            _ => {
                w.rp.sharded += n.params.sharded / t;
                w.rp.replicated += n.params.replicated;
                w.flops_per_token += fb / t;
            }
        }
    }

    /// Stage `s`'s layers: activations, tensor-parallel messages, and each MoE layer's
    /// experts (their parameters and FP8 copies go into `w`) and exchange.
    fn stage_layers(&self, s: u64, w: &mut StageWork) -> StageLayers {
        let (c, m, grid) = (self.c, &self.c.model, self.grid);
        let mut out = StageLayers {
            all_to_all: Vec::new(),
            exchanges: Vec::new(),
            a2a_s: 0.0,
            act: 0,
            scores: 0,
            tensor_msgs: 0,
        };
        for layer in (0..m.layers.len()).filter(|&l| self.stage_of(l) == s) {
            out.act = out.act.saturating_add(self.layer_activations(layer));
            out.scores =
                out.scores
                    .saturating_add(attention_scores(c, grid, self.seq_len, self.tokens));
            // Attention output, forward and backward.
            out.tensor_msgs += 2;
            match &m.layers[layer].ffn {
                Ffn::Dense(_) => out.tensor_msgs += 2,
                Ffn::Moe(moe) => {
                    if self.experts.slices > 1 || moe.shared.is_some() {
                        out.tensor_msgs += 2;
                    }
                    self.add_moe_layer(s, (layer, moe), w, &mut out);
                }
            }
        }
        self.add_model_ends(s, &mut out);
        if grid.tensor == 1 {
            out.tensor_msgs = 0;
        }
        w.rp.total = w.rp.sharded + w.rp.replicated + w.rp.gate + w.rp.expert;
        out
    }

    /// One micro-batch's activations of block `layer` on one rank, as the memory model keeps
    /// them.
    fn layer_activations(&self, layer: usize) -> u64 {
        let (c, grid, a, tokens) = (self.c, self.grid, self.a, self.tokens);
        match self.model {
            MemoryModel::Megatron => block_activations(c, layer, grid, a, self.seq_len, tokens),
            MemoryModel::Fmoec => block_activations_fmoec(c, layer, a, tokens),
            MemoryModel::MegatronCore => {
                block_activations_core(c, layer, grid, self.experts, a, tokens)
            }
        }
    }

    /// MoE layer `layer` of stage `s`: its experts on one rank (parameters and FP8 copies,
    /// into `w`), and its exchange: bytes per micro-batch and the time it adds to one.
    fn add_moe_layer(
        &self,
        s: u64,
        (layer, moe): (usize, &Moe),
        w: &mut StageWork,
        out: &mut StageLayers,
    ) {
        let (c, experts) = (self.c, self.experts);
        let (h, a, tokens) = (c.model.width, self.a, self.tokens);
        let one_expert = self.add_local_experts((layer, moe), w);
        let (exchange, gather, gather_ranks) = self.exchange_bytes(moe);
        let bytes = exchange.saturating_add(gather);
        out.all_to_all.push(AllToAll {
            layer,
            fwd_bytes: bytes,
            bwd_bytes: bytes,
        });
        let (transfer_s, bw) = self.transfer_seconds(s, exchange, (gather, gather_ranks));
        let rate = self.expert_rate(layer);
        let compute_s = w.expert_flops_per_token[layer] as f64 * tokens as f64 / rate.max(1e-9);
        let x = layer_exchange(
            c,
            (layer, moe),
            experts.parallel,
            (tokens * moe.top_k) as f64,
            ((h * a) as f64, bw),
            (
                w.expert_flops_per_token[layer] as f64 / moe.top_k.max(1) as f64,
                rate.max(1e-9),
            ),
            one_expert,
            self.routing_skew,
        );
        out.a2a_s += self.exchange_adds(transfer_s, x.planned_s - compute_s);
        out.exchanges.push(x);
    }

    /// The seconds an MoE layer of stage `s` spends on the wire per micro-batch, forward and
    /// backward: `exchange` bytes over its expert group, and `gather` bytes among its
    /// `gather_ranks` expert-tensor ranks; with the expert group's bandwidth.
    fn transfer_seconds(
        &self,
        s: u64,
        exchange: u64,
        (gather, gather_ranks): (u64, u64),
    ) -> (f64, f64) {
        let (c, experts) = (self.c, self.experts);
        // The groups of tensor rank 0 of this stage, as (lowest, highest) rank: they
        // are increasing, so they share a host exactly when those two do.
        let base = self.grid.rank(0, 0, s);
        let egroup = [base, base + (experts.parallel - 1) * experts.stride];
        let bw = bandwidth(c, &egroup);
        let mut transfer_s = 2.0 * exchange as f64 / bw;
        if gather > 0 {
            // the expert-tensor group: consecutive ranks (tp-ep-dp-pp order)
            let group = [base, base + gather_ranks - 1];
            transfer_s += 2.0 * gather as f64 / bandwidth(c, &group);
        }
        (transfer_s, bw)
    }

    /// The FLOP rate MoE layer `layer`'s experts compute at: FP8's where they are FP8.
    fn expert_rate(&self, layer: usize) -> f64 {
        match self.fp8 {
            Some((fp8_peak, _)) if self.fp8_experts[layer] => fp8_peak,
            _ => self.peak,
        }
    }

    /// The time an MoE layer's exchange adds to a micro-batch. Without FasterMoE's options
    /// on balanced routing the estimate is the transfer alone (`transfer_s`), as it always
    /// was; otherwise what the layer takes beyond its balanced experts (`beyond_experts_s`,
    /// its planned time less the experts' compute).
    fn exchange_adds(&self, transfer_s: f64, beyond_experts_s: f64) -> f64 {
        let c = self.c;
        let plain = c.parallel.smart_schedule.is_off()
            && c.parallel.shadowing.is_off()
            && self.routing_skew <= 1.0;
        if plain {
            transfer_s
        } else {
            beyond_experts_s.max(0.0)
        }
    }

    /// MoE layer `layer`'s experts on one rank: their parameters, and with FP8 experts the
    /// copies' scales and quantisation bytes, go into `w`. Returns the parameters of one
    /// expert on the rank.
    fn add_local_experts(&self, (layer, moe): (usize, &Moe), w: &mut StageWork) -> u64 {
        let (m, te, ep) = (&self.c.model, self.experts.slices, self.experts.parallel);
        let h = m.width;
        let one = graph::mlp_params(h, &moe.expert, m.bias);
        let one_expert = one.sharded / te + one.replicated;
        let local = moe.experts / ep;
        w.rp.expert += local * one_expert;
        if self.fp8_experts[layer] {
            let (hidden, matrices) = (moe.expert.hidden / te, moe.expert.act.matrices());
            // each matrix: a scale per output column and per row
            w.fp8_scale_bytes += local * matrices * 4 * (h + hidden);
            w.fp8_quant_bytes_per_token += (moe.top_k * local * ep) as f64
                / moe.experts.max(1) as f64
                * (FP8_QUANT_BYTES_INPUT * h as f64
                    + FP8_QUANT_BYTES_HIDDEN * (hidden * (matrices - 1)) as f64);
        }
        one_expert
    }

    /// An MoE layer's bytes per micro-batch and direction on one rank: those its all-to-all
    /// exchanges over the expert group, those the expert-tensor ranks gather from each other
    /// (Megatron-Core), and how many ranks gather.
    fn exchange_bytes(&self, moe: &Moe) -> (u64, u64, u64) {
        let (t, te, g) = (self.grid.tensor, self.experts.slices, self.experts.parallel);
        let (h, a, tokens) = (self.c.model.width, self.a, self.tokens);
        // Megatron-Core: sequence parallelism gives each tensor rank its own slice
        // of the micro-batch to route, and after the exchange the expert-tensor
        // ranks gather each other's tokens (reduce-scattered back in the combine)
        let (routed, gather_ranks) = match self.model {
            MemoryModel::MegatronCore => (tokens / t, te),
            _ => (tokens, 1),
        };
        let rows = 2 * (moe.top_k as u128) * (routed as u128) * (h as u128) * a as u128;
        let exchange = u64::try_from(rows * (g as u128 - 1) / g as u128).unwrap_or(u64::MAX);
        let gather = u64::try_from(rows * (gather_ranks as u128 - 1)).unwrap_or(u64::MAX);
        (exchange, gather, gather_ranks)
    }

    /// The model's ends on stage `s`: on the first stage the embedding's all-reduced output;
    /// on the last the head's all-reduced input gradient, and what stays alive for the loss.
    fn add_model_ends(&self, s: u64, out: &mut StageLayers) {
        let (t, p) = (self.grid.tensor, self.grid.pipeline);
        let (h, a, tokens, vpad) = (self.c.model.width, self.a, self.tokens, self.vpad);
        if s == 0 {
            // The vocab-parallel embedding's output is all-reduced.
            out.tensor_msgs += 1;
        }
        if s == p - 1 {
            // The LM head's input gradient is all-reduced; the final norm input and the
            // fp32 logits of the vocab-parallel cross entropy stay alive. `fmoec run`
            // keeps the final norm's input and output, the fp32 logits and their
            // log-softmax, and at the start of the backward pass their gradient.
            out.tensor_msgs += 1;
            out.act = match self.model {
                MemoryModel::Megatron => out
                    .act
                    .saturating_add(a * tokens * h)
                    .saturating_add((4 * tokens).saturating_mul(vpad) / t),
                MemoryModel::Fmoec => out
                    .act
                    .saturating_add(2 * a * tokens * h)
                    .saturating_add((12 * tokens).saturating_mul(self.c.model.vocab)),
                // sequence-parallel final norm input; vocab-parallel fp32 logits
                MemoryModel::MegatronCore => out
                    .act
                    .saturating_add(a * tokens * h / t)
                    .saturating_add((4 * tokens).saturating_mul(vpad) / t),
            };
        }
    }

    /// The experts' data-parallel replicas (the expert-data group's size).
    fn expert_data(&self) -> u64 {
        self.experts.expert_data(self.grid.per_stage())
    }

    /// Stage `s`'s memory per rank: weights, gradients, optimizer state, and the activations
    /// of the micro-batches in flight (`act` each; `scores` attention scores each, which
    /// only Megatron-Core's local attention keeps).
    fn stage_memory(&self, s: u64, w: &StageWork, act: u64, scores: u64) -> Memory {
        let in_flight = self.in_flight(s);
        let (weights, grads, optimizer) = self.parameter_state(w);
        let activations = act.saturating_mul(in_flight) / self.v();
        Memory {
            model: self.model,
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
            capacity: self.c.parallel.hardware.memory_bytes,
            unfused_attention: self.unfused_attention(scores, in_flight),
        }
    }

    /// Micro-batches whose activations are alive at once on stage `s`: plain 1F1B keeps the
    /// stages ahead of this one in flight; the interleaved schedule counts model chunks (each
    /// 1/v of the stage's activations), as its program runs them (1F1B's count of chunks where
    /// it cannot run).
    fn in_flight(&self, s: u64) -> u64 {
        let (p, v, micro_batches) = (self.grid.pipeline, self.v(), self.micro_batches);
        let one_f_one_b = (p - s).min(micro_batches).max(1);
        if v == 1 {
            return one_f_one_b;
        }
        let pipeline = super::schedule::Pipeline {
            stages: p as usize,
            virtual_stages: v as usize,
            micro_batches: micro_batches as usize,
        };
        super::schedule::peak_in_flight(&pipeline, s as usize)
            .map_or(one_f_one_b * v, |n| n.max(1) as u64)
    }

    /// A rank's weights, gradients and optimizer state for the stage's parameters (`w`), in
    /// bytes, as the memory model keeps them.
    fn parameter_state(&self, w: &StageWork) -> (u64, u64, u64) {
        let (model, precision, rp) = (self.model, self.precision, &w.rp);
        let pb = precision.param_bytes();
        let (weight_b, grad_b, optimizer_b) = match model {
            MemoryModel::Megatron => (pb, pb, optimizer_bytes(precision)),
            MemoryModel::Fmoec => fmoec_param_bytes(precision),
            MemoryModel::MegatronCore => core_param_bytes(precision),
        };
        let weights = rp
            .total
            .saturating_mul(weight_b)
            .saturating_add(match model {
                MemoryModel::Fmoec => w.fp8_scale_bytes,
                MemoryModel::Megatron | MemoryModel::MegatronCore => 0,
            });
        let grads = rp.total.saturating_mul(grad_b);
        (weights, grads, self.optimizer_state(rp, optimizer_b))
    }

    /// The optimizer state of parameters `rp` at `optimizer_b` bytes each: the distributed
    /// optimizer shards it over the data-parallel group, the experts' over the expert-data
    /// group.
    fn optimizer_state(&self, rp: &RankParams, optimizer_b: u64) -> u64 {
        if self.model == MemoryModel::MegatronCore && self.rules.distributed_optimizer {
            let dense = (rp.total - rp.expert) as u128;
            let sharded = dense.div_ceil(self.grid.data as u128)
                + (rp.expert as u128).div_ceil(self.expert_data() as u128);
            u64::try_from(sharded * optimizer_b as u128).unwrap_or(u64::MAX)
        } else {
            rp.total.saturating_mul(optimizer_b)
        }
    }

    /// Megatron-Core's local attention (no Transformer Engine), for `scores` attention scores
    /// per micro-batch in flight: per layer the probabilities (a bytes), the dropout mask (1)
    /// and its output (a), as Megatron-LM v2.2 keeps them, and one score buffer of a layer
    /// (`a` bytes) that every layer reuses; 0 for the other memory models.
    fn unfused_attention(&self, scores: u64, in_flight: u64) -> u64 {
        match self.model {
            // every layer has the model's attention: a stage with layers has one layer's scores
            MemoryModel::MegatronCore if scores > 0 => {
                let one_layer = attention_scores(self.c, self.grid, self.seq_len, self.tokens);
                (2 * self.a + 1)
                    .saturating_mul(scores)
                    .saturating_mul(in_flight)
                    / self.v()
                    + self.a.saturating_mul(one_layer)
            }
            _ => 0,
        }
    }

    /// Stage `s`'s bytes sent per step and its time per micro-batch and for the gradient
    /// synchronisation, from its layers' MoE exchanges (`all_to_all`, taking `a2a_s`) and
    /// tensor-parallel messages ([`StageLayers`]).
    fn stage_traffic_and_time(
        &self,
        s: u64,
        w: &StageWork,
        all_to_all: Vec<AllToAll>,
        tensor_msgs: u64,
        a2a_s: f64,
    ) -> (Traffic, StageTime) {
        let traffic = self.stage_traffic(s, w, all_to_all, tensor_msgs);
        let compute_s = self.compute_s(w);
        let tensor_s = self.tensor_s(s, tensor_msgs);
        let pipeline_s = self.pipeline_s(s);
        let weight_traffic_s = self.weight_traffic_s(w);
        let time = StageTime {
            compute_s,
            tensor_s,
            all_to_all_s: a2a_s,
            pipeline_s,
            weight_traffic_s,
            micro_batch_s: compute_s + weight_traffic_s + tensor_s + a2a_s + pipeline_s,
            gradient_sync_s: self.gradient_sync_s(s, &traffic),
        };
        (traffic, time)
    }

    /// One activation (or its gradient) of a micro-batch on one rank, in bytes: a
    /// tensor-parallel message, and what a pipeline transfer carries.
    fn activation_message(&self) -> u64 {
        self.tokens * self.c.model.width * self.a
    }

    /// Bytes of `tensor_msgs` tensor-parallel messages.
    fn tensor_bytes(&self, tensor_msgs: u64) -> u64 {
        tensor_msgs.saturating_mul(self.activation_message())
    }

    /// Ranks of the gate group: all ranks of one pipeline stage.
    fn gate_group_size(&self) -> u64 {
        self.grid.per_stage()
    }

    /// Stage `s`'s pipeline bytes per micro-batch, sent and received.
    fn pipeline_bytes(&self, s: u64) -> u64 {
        2 * self.pipeline_transfers(s) * self.activation_message()
    }

    /// Stage `s`'s pipeline transfers per micro-batch in each direction: each chunk sends its
    /// output on and its input's gradient back, except at the model's two ends, and receives
    /// as many.
    fn pipeline_transfers(&self, s: u64) -> u64 {
        let p = self.grid.pipeline;
        2 * self.v() - u64::from(s == 0) - u64::from(s + 1 == p)
    }

    /// Stage `s` holds the tied word embedding with another stage (the first and the last
    /// stage of a pipeline), whose gradients they all-reduce.
    fn holds_tied_embedding(&self, s: u64) -> bool {
        let p = self.grid.pipeline;
        self.g.tied_embeddings && p > 1 && (s == 0 || s == p - 1)
    }

    /// Tensor rank 0 of the first and of the last stage (as a group's lowest and highest rank).
    fn first_and_last_stage(&self) -> [u64; 2] {
        [
            self.grid.rank(0, 0, 0),
            self.grid.rank(0, 0, self.grid.pipeline - 1),
        ]
    }

    /// The experts' gradient group of stage `s` (tensor rank 0's), as its lowest and highest
    /// rank.
    fn expert_data_group(&self, s: u64) -> [u64; 2] {
        let base = self.grid.rank(0, 0, s);
        let (stride, ep) = (self.experts.stride, self.experts.parallel);
        [base, base + (self.expert_data() - 1) * stride * ep]
    }

    /// Stage `s`'s bytes sent per step.
    fn stage_traffic(
        &self,
        s: u64,
        w: &StageWork,
        all_to_all: Vec<AllToAll>,
        tensor_msgs: u64,
    ) -> Traffic {
        let (grid, micro_batches) = (self.grid, self.micro_batches);
        let rp = &w.rp;
        let grad_bytes = self.precision.param_bytes();
        let tensor_bytes = self.tensor_bytes(tensor_msgs);
        let p2p = self.pipeline_bytes(s);
        let dense = rp.sharded + rp.replicated;
        let emb_bytes = if self.holds_tied_embedding(s) {
            self.word_embedding_shard() * grad_bytes
        } else {
            0
        };
        Traffic {
            tensor_allreduce_bytes: tensor_bytes.saturating_mul(micro_batches),
            all_to_all_bytes: all_to_all
                .iter()
                .map(|x| (x.fwd_bytes.saturating_add(x.bwd_bytes)).saturating_mul(micro_batches))
                .fold(0u64, u64::saturating_add),
            all_to_all,
            data_allreduce_bytes: if grid.data > 1 { dense * grad_bytes } else { 0 },
            expert_data_allreduce_bytes: if self.expert_data() > 1 {
                rp.expert * grad_bytes
            } else {
                0
            },
            gate_allreduce_bytes: if self.gate_group_size() > 1 {
                rp.gate * grad_bytes
            } else {
                0
            },
            embedding_allreduce_bytes: emb_bytes,
            pipeline_send_bytes: (p2p / 2).saturating_mul(micro_batches),
            pipeline_recv_bytes: (p2p / 2).saturating_mul(micro_batches),
        }
    }

    /// A micro-batch's compute on one rank: its FLOPs at the dense peak, those on FP8 operands
    /// at the FP8 peak, and the FP8 quantisations' memory traffic.
    fn compute_s(&self, w: &StageWork) -> f64 {
        let (tokens, peak) = (self.tokens, self.peak);
        let hw = &self.c.parallel.hardware;
        match self.fp8 {
            Some((fp8_peak, _)) => {
                (w.flops_per_token - w.fp8_flops_per_token) as f64 * tokens as f64 / peak
                    + w.fp8_flops_per_token as f64 * tokens as f64 / fp8_peak
                    + w.fp8_quant_bytes_per_token * tokens as f64
                        / (hw.hbm_gbps.max(1e-9) * 1e9 * FP8_QUANT_BANDWIDTH_SHARE)
                    + w.fp8_dense_quant_bytes_per_token * tokens as f64
                        / (hw.hbm_gbps.max(1e-9) * 1e9 * FP8_DENSE_QUANT_BANDWIDTH_SHARE)
            }
            None => w.flops_per_token as f64 * tokens as f64 / peak,
        }
    }

    /// A micro-batch's reads of the rank's weights and accumulation of their gradients
    /// ([`weight_traffic_bytes`]) at the GPU's memory bandwidth.
    fn weight_traffic_s(&self, w: &StageWork) -> f64 {
        let hbm = self.c.parallel.hardware.hbm_gbps.max(1e-9) * 1e9;
        weight_traffic_bytes(w.rp.total, self.precision) as f64 / hbm
    }

    /// A micro-batch's tensor-parallel all-reduces on stage `s` (`tensor_msgs` messages).
    fn tensor_s(&self, s: u64, tensor_msgs: u64) -> f64 {
        let (grid, t) = (self.grid, self.grid.tensor);
        let tensor_bytes = self.tensor_bytes(tensor_msgs);
        let tgroup = [grid.rank(0, 0, s), grid.rank(t - 1, 0, s)];
        allreduce_s(tensor_bytes, t, bandwidth(self.c, &tgroup))
    }

    /// A micro-batch's pipeline transfers on stage `s`, at the slowest link to a neighbour.
    fn pipeline_s(&self, s: u64) -> f64 {
        if self.pipeline_transfers(s) == 0 {
            return 0.0;
        }
        self.pipeline_bytes(s) as f64 / self.pipeline_bandwidth(s)
    }

    /// The slowest link between stage `s` and a stage it exchanges activations with.
    fn pipeline_bandwidth(&self, s: u64) -> f64 {
        let (c, grid, p) = (self.c, self.grid, self.grid.pipeline);
        let first = grid.rank(0, 0, s);
        let mut bw = f64::INFINITY;
        if s > 0 {
            bw = bw.min(bandwidth(c, &[grid.rank(0, 0, s - 1), first]));
        }
        if s + 1 < p {
            bw = bw.min(bandwidth(c, &[first, grid.rank(0, 0, s + 1)]));
        }
        // the interleaved schedule's wrap-around from the last stage to the first
        if self.v() > 1 && p > 1 && (s == 0 || s + 1 == p) {
            bw = bw.min(bandwidth(c, &self.first_and_last_stage()));
        }
        bw
    }

    /// Stage `s`'s gradient synchronisation per step: the data, expert-data and gate groups'
    /// all-reduces of `traffic`, and the tied embedding's between the first and last stage.
    fn gradient_sync_s(&self, s: u64, traffic: &Traffic) -> f64 {
        let (c, grid, t) = (self.c, self.grid, self.grid.tensor);
        let base = grid.rank(0, 0, s);
        let dgroup = [base, grid.rank(0, grid.data - 1, s)];
        let gate_group = [base, grid.rank(t - 1, grid.data - 1, s)];
        allreduce_s(
            traffic.data_allreduce_bytes,
            grid.data,
            bandwidth(c, &dgroup),
        ) + allreduce_s(
            traffic.expert_data_allreduce_bytes,
            self.expert_data(),
            bandwidth(c, &self.expert_data_group(s)),
        ) + allreduce_s(
            traffic.gate_allreduce_bytes,
            self.gate_group_size(),
            bandwidth(c, &gate_group),
        ) + if self.holds_tied_embedding(s) {
            allreduce_s(
                traffic.embedding_allreduce_bytes,
                2,
                bandwidth(c, &self.first_and_last_stage()),
            )
        } else {
            0.0
        }
    }

    /// The step: the slowest stage's micro-batches, the pipeline's fill and drain, and the
    /// slowest gradient synchronisation; tokens per second and MFU from it.
    fn step_time(&self, stages: &[StageCost]) -> TimeEstimate {
        let (g, grid, peak) = (self.g, self.grid, self.peak);
        let (p, v, micro_batches) = (grid.pipeline, self.v(), self.micro_batches);
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
        let global_tokens = self.mb * micro_batches * grid.data * self.seq_len;
        let model_flops_per_step = u128::from(g.flops_per_token()) * u128::from(global_tokens);
        TimeEstimate {
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
                g.flops_per_token() as f64 * global_tokens as f64
                    / (step_s * grid.world as f64 * peak)
            } else {
                0.0
            },
        }
    }
}
