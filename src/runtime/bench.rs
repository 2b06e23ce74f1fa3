//! `fmoec bench moe`: times the MoE layer's expert path on one device, side by side with
//! baselines measured in the same process, and checks its numerics.
//!
//! What is timed is the work between the gate and the residual: dispatch (gather into
//! expert order), the experts (GELU: 2 matmuls, SwiGLU: 3) and the weighted combine, for a
//! routing fixed in advance (balanced, skewed, all-to-one) so every implementation sees the
//! same tokens per expert. Implementations:
//!
//! - `fmoec`: the runtime's own path ([`DispatchPlan`], [`dispatch`], [`Experts::forward`] on
//!   the grouped matmul, [`combine`]); no host synchronisation; with the `cuda` feature on a
//!   GPU, dispatch and combine are the fused kernels of `runtime::cuda`.
//! - `fmoec-unfused`: the same with libtorch dispatch and combine (shown where the fused
//!   kernels run, to say whether they help).
//! - `ops`: the libtorch-ops layer of issue 6 (argsort, bincount, index_select, grouped
//!   matmul, index_add), no masks, written with tch independently of the runtime.
//! - `sorted-loop`: FastMoE's scheme written with libtorch ops: sort by expert, read the
//!   counts on the host, one matmul per expert over its contiguous rows, `index_add` back.
//! - `naive-loop`: for each expert, find its tokens (`nonzero`), run them, scatter back.
//!
//! FLOPs count the expert matmuls only: forward `2·T·k·m·d·ffn` (m matrices), forward +
//! backward 3× that (the input requires grad, so no GEMM is skipped; the backward returns the
//! gradients of the input and weights without accumulating into `.grad`, as PyTorch does
//! after `zero_grad(set_to_none=True)`). The dense ceiling is an
//! 8192³ matmul in the same dtype, same process. On CUDA with the `cuda` feature, times are
//! CUDA events recorded on torch's current stream (median, p10, p90 over the timed
//! iterations, after warm-up) and each row reports the caching allocator's peak allocated
//! bytes (reset before the row); elsewhere they are host clocks around synchronised work,
//! and the report says so.
//!
//! Those times are op by op: the host issues every kernel of the forward and backward as it
//! goes, and the gaps between kernels count. A training step on one GPU replays each
//! micro-batch as a captured CUDA graph (see [`crate::runtime::replay`]), which has no such
//! gaps; with `--cuda-graph` every row is timed that way too (the forward and backward
//! captured once with the same capture as the trainer's, then replayed), beside its op-by-op
//! times, in the same process. A row whose work waits for the host (data-dependent shapes
//! read back, as `ops`' `bincount` does) cannot be captured, and the table says so.
//!
//! This module knows the MoE layer's stages, not the transformer or the trainer.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::check::Activation;
use crate::diag::path_text;
use crate::runtime::moe::{
    combine, dispatch, fused_available, run_experts, DispatchPlan, ExpertPath, Experts,
};
use crate::runtime::params::ParamStore;

/// One benchmark shape.
#[derive(Clone, Debug, Serialize)]
pub struct Shape {
    pub name: String,
    pub tokens: i64,
    pub width: i64,
    pub hidden: i64,
    pub experts: i64,
    pub top_k: i64,
    pub act: Activation,
}

impl Shape {
    fn new(
        name: &str,
        tokens: i64,
        width: i64,
        hidden: i64,
        experts: i64,
        top_k: i64,
        act: Activation,
    ) -> Shape {
        Shape {
            name: name.to_string(),
            tokens,
            width,
            hidden,
            experts,
            top_k,
            act,
        }
    }

    /// Expert-matmul FLOPs of one forward pass.
    pub fn forward_flops(&self) -> f64 {
        2.0 * (self.tokens * self.top_k) as f64
            * self.act.matrices() as f64
            * self.width as f64
            * self.hidden as f64
    }
}

/// The shapes of issue 6: S1 (Mixtral-like), S1 at fewer tokens, S3 (fine-grained), F0
/// (FastMoE's defaults); GELU everywhere and SwiGLU for S1 and S3.
pub fn standard_shapes() -> Vec<Shape> {
    use Activation::{Gelu, Swiglu};
    vec![
        Shape::new("S1", 16384, 4096, 14336, 8, 2, Gelu),
        Shape::new("S1", 16384, 4096, 14336, 8, 2, Swiglu),
        Shape::new("S1-T4096", 4096, 4096, 14336, 8, 2, Gelu),
        Shape::new("S1-T512", 512, 4096, 14336, 8, 2, Gelu),
        Shape::new("S3", 16384, 2048, 768, 128, 8, Gelu),
        Shape::new("S3", 16384, 2048, 768, 128, 8, Swiglu),
        Shape::new("F0", 4096, 1024, 4096, 64, 2, Gelu),
    ]
}

/// A tiny shape that runs on CPU in milliseconds (to test the harness itself).
pub fn smoke_shapes() -> Vec<Shape> {
    vec![
        Shape::new("tiny", 64, 32, 64, 4, 2, Activation::Gelu),
        Shape::new("tiny", 64, 32, 64, 4, 2, Activation::Swiglu),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingKind {
    /// Every expert gets the same number of tokens.
    Balanced,
    /// The busiest expert gets about 3× the mean.
    Skewed,
    /// Every token picks experts 0..k (one expert takes all first choices).
    AllToOne,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Implementation {
    Fmoec,
    /// `fmoec` with the fused kernels switched off (libtorch dispatch and combine).
    FmoecUnfused,
    /// `fmoec` with the expert matmuls on FP8 operands (`precision = fp8`), the weights'
    /// FP8 copies made once per step as in training (before the timed iterations).
    FmoecFp8,
    Ops,
    SortedLoop,
    NaiveLoop,
}

/// `[T, k]` distinct experts per token, and `[T, k]` combine weights summing to 1.
pub fn make_routing(shape: &Shape, kind: RoutingKind, device: Device) -> Result<(Tensor, Tensor)> {
    let (t, k, e) = (shape.tokens, shape.top_k, shape.experts);
    let expert = match kind {
        RoutingKind::Balanced => {
            // slot j of token i → (i·k + j) mod E: distinct within a token when k ≤ E
            Tensor::f_arange(t * k, (Kind::Int64, device))?
                .f_remainder(e)?
                .f_reshape([t, k])?
        }
        RoutingKind::Skewed => {
            // Gumbel top-k over log p with p_0 = 3/E and the rest uniform: distinct experts,
            // expert 0's load about 3× the mean
            let mut p = vec![(1.0 - 3.0 / e as f64) / (e - 1) as f64; e as usize];
            p[0] = 3.0 / e as f64;
            let logp = Tensor::from_slice(&p).f_to_device(device)?.f_log()?;
            let u = Tensor::f_rand([t, e], (Kind::Double, device))?.f_clamp(1e-12, 1.0 - 1e-12)?;
            let gumbel = u.f_log()?.f_neg()?.f_log()?.f_neg()?;
            let (_, idx) = logp
                .f_unsqueeze(0)?
                .f_add(&gumbel)?
                .f_topk(k, 1, true, true)?;
            idx
        }
        RoutingKind::AllToOne => Tensor::f_arange(k, (Kind::Int64, device))?
            .f_unsqueeze(0)?
            .f_expand([t, k], false)?
            .f_contiguous()?,
    };
    let weight = Tensor::f_randn([t, k], (Kind::Float, device))?.f_softmax(1, Kind::Float)?;
    Ok((expert, weight))
}

fn experts_for(shape: &Shape, device: Device, kind: Kind) -> Result<Experts> {
    let mut store = ParamStore::new(device, kind);
    let mut ex = Experts::new(
        &mut store,
        "experts",
        shape.experts,
        shape.width,
        shape.hidden,
        shape.act,
        false,
        0.02,
    )?;
    ex.path = ExpertPath::Grouped;
    Ok(ex)
}

/// The expert MLP's activation of `h`, the first matmul's output; SwiGLU multiplies it by
/// `up(w3)`, the third matmul (the baselines' one definition of the activation).
fn activate(ex: &Experts, h: Tensor, up: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    Ok(match (&ex.act, &ex.w3) {
        (Activation::Swiglu, Some(w3)) => h.f_silu()?.f_mul(&up(w3)?)?,
        (Activation::Relu, _) => h.f_relu()?,
        _ => h.f_gelu("none")?,
    })
}

/// The expert MLP for a contiguous block of rows of one expert.
fn mlp_rows(ex: &Experts, e: i64, x: &Tensor) -> Result<Tensor> {
    let kind = x.kind();
    let w1 = ex.w1.f_select(0, e)?.f_to_kind(kind)?;
    let w2 = ex.w2.f_select(0, e)?.f_to_kind(kind)?;
    let h = x.f_matmul(&w1)?;
    let h = activate(ex, h, |w3| {
        Ok(x.f_matmul(&w3.f_select(0, e)?.f_to_kind(kind)?)?)
    })?;
    Ok(h.f_matmul(&w2)?)
}

/// The baselines' combine: each sorted row of `ys` (slot `order[r]`, token `token[r]`)
/// times its routing weight, summed onto its token with `index_add` (`[T, d]` like `x`).
fn index_add_combine(
    ys: &Tensor,
    weight: &Tensor,
    order: &Tensor,
    token: &Tensor,
    x: &Tensor,
) -> Result<Tensor> {
    let w = weight
        .f_reshape([-1])?
        .f_index_select(0, order)?
        .f_to_kind(ys.kind())?;
    let out = x.f_zeros_like()?;
    Ok(out.f_index_add(0, token, &ys.f_mul(&w.f_unsqueeze(1)?)?)?)
}

/// One forward pass of the chosen implementation: `[T, d]` → `[T, d]`.
pub fn forward(
    imp: Implementation,
    ex: &Experts,
    x: &Tensor,
    expert: &Tensor,
    weight: &Tensor,
) -> Result<Tensor> {
    match imp {
        Implementation::Fmoec | Implementation::FmoecUnfused | Implementation::FmoecFp8 => {
            let fused = imp != Implementation::FmoecUnfused && fused_available(x.device());
            let plan = DispatchPlan::with_kernels(expert, ex.experts, false, fused)?;
            let (_, width, hidden) = ex.w1.size3()?;
            let rows = x.size2()?.0 * plan.top_k;
            let fp8_wgrad = fp8_wgrad_for(width, hidden, rows, ex.experts);
            let ex = ex.with_fp8(imp == Implementation::FmoecFp8, fp8_wgrad);
            run_experts(&ex, x, &plan, weight, x.size2()?.0)
        }
        Implementation::Ops => forward_ops(ex, x, expert, weight),
        Implementation::SortedLoop => forward_sorted_loop(ex, x, expert, weight),
        Implementation::NaiveLoop => forward_naive_loop(ex, x, expert, weight),
    }
}

/// Whether the `fmoec-fp8` rows take their weight gradients on FP8 operands (experts of
/// `width` → `hidden`, `rows` rows over `experts`): as `precision = fp8` would on an h100_sxm
/// (the planner's estimate, `plan::cost::fp8_weight_gradient`), or as
/// `FMOEC_FP8_WEIGHT_GRADS=all|none` says.
pub fn fp8_wgrad_for(width: i64, hidden: i64, rows: i64, experts: i64) -> bool {
    crate::runtime::fp8::fp8_weight_grads_forced().unwrap_or_else(|| {
        crate::check::hardware_profile("h100_sxm").is_some_and(|hw| {
            crate::plan::cost::fp8_weight_gradient(
                &hw,
                width as u64,
                hidden as u64,
                rows as f64 / experts.max(1) as f64,
            )
        })
    })
}

/// The baselines' dispatch: the `[T·k]` slots sorted by expert (stable), each slot's token,
/// and the tokens' rows of `x` in that order.
struct SortedSlots {
    /// The flat expert index of every slot, `[T·k]`.
    flat: Tensor,
    order: Tensor,
    token: Tensor,
    xs: Tensor,
}

impl SortedSlots {
    fn new(x: &Tensor, expert: &Tensor) -> Result<SortedSlots> {
        let k = expert.size()[1];
        let flat = expert.f_reshape([-1])?;
        let order = flat.f_argsort_stable(true, 0, false)?;
        let token = order.f_div_scalar_mode(k, "floor")?;
        let xs = x.f_index_select(0, &token)?;
        Ok(SortedSlots {
            flat,
            order,
            token,
            xs,
        })
    }
}

/// `ops`: bincount, then the grouped matmul over every expert's rows at once.
fn forward_ops(ex: &Experts, x: &Tensor, expert: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let sorted = SortedSlots::new(x, expert)?;
    let counts = sorted.flat.f_bincount(None::<Tensor>, ex.experts)?;
    let offsets = counts.f_cumsum(0, Kind::Int)?;
    let gmm = |a: &Tensor, w: &Tensor| -> Result<Tensor> {
        Ok(a.f_internal_grouped_mm(
            &w.f_to_kind(a.kind())?,
            Some(&offsets),
            None::<&Tensor>,
            None::<Kind>,
        )?)
    };
    let xs = &sorted.xs;
    let h = activate(ex, gmm(xs, &ex.w1)?, |w3| gmm(xs, w3))?;
    let ys = gmm(&h, &ex.w2)?;
    index_add_combine(&ys, weight, &sorted.order, &sorted.token, x)
}

/// `sorted-loop`: the counts read on the host, one matmul per expert over its rows.
fn forward_sorted_loop(
    ex: &Experts,
    x: &Tensor,
    expert: &Tensor,
    weight: &Tensor,
) -> Result<Tensor> {
    let sorted = SortedSlots::new(x, expert)?;
    let counts = Vec::<i64>::try_from(sorted.flat.f_bincount(None::<Tensor>, ex.experts)?)?;
    let mut parts = Vec::with_capacity(counts.len());
    let mut start = 0;
    for (e, &c) in counts.iter().enumerate() {
        if c > 0 {
            parts.push(mlp_rows(ex, e as i64, &sorted.xs.f_narrow(0, start, c)?)?);
        }
        start += c;
    }
    let ys = Tensor::f_cat(&parts, 0)?;
    index_add_combine(&ys, weight, &sorted.order, &sorted.token, x)
}

/// `naive-loop`: for each expert, its tokens found with `nonzero`, run, and added back.
fn forward_naive_loop(
    ex: &Experts,
    x: &Tensor,
    expert: &Tensor,
    weight: &Tensor,
) -> Result<Tensor> {
    let (t, d) = x.size2()?;
    let mut out = Tensor::f_zeros([t, d], (x.kind(), x.device()))?;
    for e in 0..ex.experts {
        let hit = expert.f_eq(e)?;
        let rows = hit.f_nonzero()?; // [n, 2]: (token, slot)
        if rows.size()[0] == 0 {
            continue;
        }
        let tok = rows.f_select(1, 0)?;
        let slot = rows.f_select(1, 1)?;
        let w = weight
            .f_index_select(0, &tok)?
            .f_gather(1, &slot.f_unsqueeze(1)?, false)?;
        let y = mlp_rows(ex, e, &x.f_index_select(0, &tok)?)?;
        out = out.f_index_add(0, &tok, &y.f_mul(&w.f_to_kind(y.kind())?)?)?;
    }
    Ok(out)
}

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
}

fn timing(mut samples: Vec<f64>) -> Timing {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Timing {
        median_ms: at(0.5),
        p10_ms: at(0.1),
        p90_ms: at(0.9),
    }
}

fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

/// Marks on the device's timeline: CUDA events on torch's current stream (feature `cuda`),
/// else host clocks taken after synchronising the device.
enum Mark {
    #[cfg(feature = "cuda")]
    Event(crate::runtime::cuda::Event),
    Host(Instant),
}

/// How this build times a device.
fn uses_events(device: Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

fn mark(device: Device) -> Result<Mark> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        let e = crate::runtime::cuda::Event::new()?;
        e.record(n)?;
        return Ok(Mark::Event(e));
    }
    sync(device);
    Ok(Mark::Host(Instant::now()))
}

/// Milliseconds between two marks (waits for the later one).
fn between(a: &Mark, b: &Mark) -> Result<f64> {
    match (a, b) {
        #[cfg(feature = "cuda")]
        (Mark::Event(a), Mark::Event(b)) => a.elapsed_ms(b),
        (Mark::Host(a), Mark::Host(b)) => Ok((*b - *a).as_secs_f64() * 1e3),
        #[allow(unreachable_patterns)]
        _ => bail!("marks of different kinds"),
    }
}

/// Resets the peak-memory statistic before a row (CUDA with the `cuda` feature).
fn reset_peak(device: Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        sync(device);
        return crate::runtime::cuda::reset_peak_memory(n);
    }
    let _ = device;
    Ok(())
}

/// Peak bytes allocated by torch's caching allocator since [`reset_peak`], if known.
fn peak_bytes(device: Device) -> Result<Option<i64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        sync(device);
        return Ok(Some(crate::runtime::cuda::memory(n)?.0));
    }
    let _ = device;
    Ok(None)
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub shape: Shape,
    pub routing: RoutingKind,
    pub implementation: Implementation,
    pub forward: Timing,
    pub backward: Timing,
    pub forward_backward: Timing,
    pub forward_tflops: f64,
    pub forward_backward_tflops: f64,
    pub tokens_per_s: f64,
    /// `‖out − ref‖ / ‖ref‖` against the f32 per-expert reference.
    pub rel_error: f64,
    /// Busiest expert's tokens over the mean.
    pub max_over_mean_load: f64,
    /// Peak bytes allocated by torch's caching allocator during the row (weights, inputs
    /// and the timed iterations), reset before the row; `None` without CUDA events.
    pub peak_memory_bytes: Option<i64>,
    /// `fmoec-fp8`: milliseconds to make the weights' FP8 copies, once per training step
    /// (not in the row's times, as a step's micro-batches share them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp8_weight_copies_ms: Option<f64>,
    /// With `--cuda-graph`: forward + backward replayed as one captured CUDA graph.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph: Option<GraphTiming>,
    /// The GPU's SM clock and power during the timed op-by-op iterations (NVML; `None` on
    /// the CPU, without the `cuda` feature or without NVML).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::runtime::telemetry::Summary>,
}

/// A row's forward + backward as a CUDA graph, as a training step replays it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GraphTiming {
    /// Captured once, then replayed: the time of each replay.
    Replayed(Timing),
    /// The capture failed, and why (libtorch's first line).
    NotCaptured(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub dtype: String,
    pub iterations: usize,
    /// `cuda-events` (CUDA events on torch's current stream) or `host-clock` (host clocks
    /// around synchronised work: no `cuda` feature, or the CPU).
    pub timer: String,
    /// With `--stages`: the `fmoec` forward stage by stage.
    pub stages: Vec<StageRow>,
    pub dense_ceiling_tflops: f64,
    pub rows: Vec<Row>,
}

pub struct Options {
    pub device: Device,
    pub kind: Kind,
    pub warmup: usize,
    pub iterations: usize,
    pub shapes: Vec<Shape>,
    pub routings: Vec<RoutingKind>,
    pub implementations: Vec<Implementation>,
    /// Also time the stages of the `fmoec` forward one by one (see [`StageRow`]).
    pub stages: bool,
    /// Also time every row's forward + backward replayed as a CUDA graph (CUDA, feature
    /// `cuda`): the whole run then issues its work on a side stream, as the trainer does.
    pub cuda_graph: bool,
}

/// The `fmoec` forward split into its stages, each timed alone (median ms over the timed
/// iterations, events around each stage): where the time goes besides the matmuls.
#[derive(Clone, Debug, Serialize)]
pub struct StageRow {
    pub shape: Shape,
    pub routing: RoutingKind,
    /// `plan` (sort, group ends, index maps), `dispatch`, `mm1` (first matmul; SwiGLU: both
    /// input matmuls), `activation`, `mm2`, `combine`.
    pub stages: Vec<(String, f64)>,
    /// Bytes the elementwise stages must move at least (read once, written once).
    pub glue_bytes: f64,
}

/// The stages of [`StageRow`], in order.
const STAGES: [&str; 6] = ["plan", "dispatch", "mm1", "activation", "mm2", "combine"];

/// Bytes the elementwise stages of `shape`'s forward move at least, in `kind`: dispatch
/// writes N·d (and reads T·d); the activation reads m-1 inputs of N·h and writes N·h;
/// combine reads N·d and writes T·d.
fn glue_bytes(shape: &Shape, kind: Kind) -> f64 {
    let elem = match kind {
        Kind::BFloat16 => 2.0,
        _ => 4.0,
    };
    let (n, d, h) = (
        (shape.tokens * shape.top_k) as f64,
        shape.width as f64,
        shape.hidden as f64,
    );
    let t = shape.tokens as f64;
    let act_inputs = (shape.act.matrices() - 1) as f64;
    elem * (n * d + t * d + (act_inputs + 1.0) * n * h + n * d + t * d)
}

/// Times an `n³` matmul in `kind`: the dense ceiling of this process.
pub fn dense_ceiling(
    device: Device,
    kind: Kind,
    n: i64,
    warmup: usize,
    iters: usize,
) -> Result<f64> {
    let a = Tensor::f_randn([n, n], (kind, device))?;
    let b = Tensor::f_randn([n, n], (kind, device))?;
    let mut samples = Vec::new();
    for i in 0..warmup + iters {
        let t0 = mark(device)?;
        let _c = a.f_matmul(&b)?;
        let t1 = mark(device)?;
        if i >= warmup {
            samples.push(between(&t0, &t1)?);
        }
    }
    let t = timing(samples);
    Ok(2.0 * (n as f64).powi(3) / (t.median_ms * 1e-3) / 1e12)
}

fn rel_error(out: &Tensor, reference: &Tensor) -> Result<f64> {
    let diff = out
        .f_to_kind(Kind::Double)?
        .f_sub(&reference.f_to_kind(Kind::Double)?)?;
    let num = diff.f_norm()?.f_double_value(&[])?;
    let den = reference
        .f_to_kind(Kind::Double)?
        .f_norm()?
        .f_double_value(&[])?;
    Ok(if den > 0.0 { num / den } else { num })
}

/// Ends an `fmoec-fp8` row's step: times one refresh of the weights' FP8 copies (what each
/// training step does once), checks that no FP8 scale overflowed, and drops the copies.
#[cfg(feature = "cuda")]
fn fp8_step_end(device: Device) -> Result<Option<f64>> {
    use crate::runtime::{cast, fp8};
    cast::end_step();
    let t0 = mark(device)?;
    fp8::begin_step()?;
    let t1 = mark(device)?;
    let ms = between(&t0, &t1)?;
    fp8::end_step();
    let overflowed = fp8::take_overflow(device)?;
    fp8::clear();
    if overflowed > 0 {
        bail!("{overflowed} FP8 scale(s) overflowed on random inputs");
    }
    Ok(Some(ms))
}

#[cfg(not(feature = "cuda"))]
fn fp8_step_end(_device: Device) -> Result<Option<f64>> {
    bail!("fmoec-fp8 needs a build with `--features cuda`")
}

/// Moves this thread's work on `device` to a side stream, where CUDA graphs are captured
/// (CUDA with feature `cuda`; elsewhere the error says what `--cuda-graph` needs).
fn use_side_stream(device: Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        return crate::runtime::graph::use_side_stream(n);
    }
    bail!(
        "--cuda-graph times CUDA graphs: it needs a CUDA device (not {device:?}) and a build \
         with `--features cuda`"
    )
}

/// Captures what `body` issues (one forward + backward, already run op by op on this stream
/// as the warm-up) with the trainer's capture, then replays it `warmup` times and times
/// `iterations` replays issued back to back (CUDA events around each). The outputs live in
/// the graph's memory until both go.
#[cfg(feature = "cuda")]
fn graph_timing(
    opts: &Options,
    body: impl FnOnce() -> Result<(Tensor, Vec<Tensor>)>,
) -> Result<GraphTiming> {
    let (graph, outputs) = match crate::runtime::replay::capture_warmed(body)? {
        Ok(captured) => captured,
        Err(why) => return Ok(GraphTiming::NotCaptured(why)),
    };
    for _ in 0..opts.warmup {
        graph.replay()?;
    }
    // back to back, as a step's micro-batches replay (events read after the last)
    let mut marks = Vec::with_capacity(opts.iterations);
    for _ in 0..opts.iterations {
        let t0 = mark(opts.device)?;
        graph.replay()?;
        marks.push((t0, mark(opts.device)?));
    }
    let samples = marks
        .iter()
        .map(|(t0, t1)| between(t0, t1))
        .collect::<Result<Vec<f64>>>()?;
    drop(outputs);
    drop(graph);
    Ok(GraphTiming::Replayed(timing(samples)))
}

#[cfg(not(feature = "cuda"))]
fn graph_timing(
    _opts: &Options,
    _body: impl FnOnce() -> Result<(Tensor, Vec<Tensor>)>,
) -> Result<GraphTiming> {
    bail!("--cuda-graph needs a build with `--features cuda`")
}

/// Runs every (shape, routing, implementation) and returns the table.
pub fn run(opts: &Options, mut progress: impl FnMut(&Row)) -> Result<Report> {
    if opts.iterations == 0 {
        bail!("--iters must be at least 1");
    }
    if opts.cuda_graph {
        use_side_stream(opts.device)?;
    }
    let ceiling = dense_ceiling(
        opts.device,
        opts.kind,
        if opts.device.is_cuda() { 8192 } else { 512 },
        3,
        10,
    )
    .context("timing the dense matmul ceiling")?;
    let mut rows = Vec::new();
    let mut stages = Vec::new();
    for shape in &opts.shapes {
        for &routing in &opts.routings {
            let case = Case::new(shape, routing, opts)?;
            for &imp in &opts.implementations {
                let row = case.row(imp, opts)?;
                progress(&row);
                rows.push(row);
            }
            if opts.stages {
                stages.push(case.stage_row(opts)?);
            }
        }
    }
    Ok(Report {
        device: format!("{:?}", opts.device),
        dtype: format!("{:?}", opts.kind),
        iterations: opts.iterations,
        timer: if uses_events(opts.device) {
            "cuda-events"
        } else {
            "host-clock"
        }
        .to_string(),
        dense_ceiling_tflops: ceiling,
        rows,
        stages,
    })
}

/// One (shape, routing): the experts, the routing, the input and backward seed every
/// implementation of the case is given, and the f32 reference they are checked against.
struct Case<'a> {
    shape: &'a Shape,
    routing: RoutingKind,
    ex: Experts,
    expert: Tensor,
    weight: Tensor,
    x: Tensor,
    /// The gradient of the output the backward starts from.
    grad: Tensor,
    /// The f32 per-expert output, for each row's `rel_error`.
    reference: Tensor,
    max_over_mean: f64,
}

/// A row's op-by-op iterations: the timed samples (ms) and what was measured around them.
struct OpByOp {
    forward: Vec<f64>,
    backward: Vec<f64>,
    both: Vec<f64>,
    gpu: Option<crate::runtime::telemetry::Summary>,
    peak_memory_bytes: Option<i64>,
}

impl<'a> Case<'a> {
    fn new(shape: &'a Shape, routing: RoutingKind, opts: &Options) -> Result<Case<'a>> {
        let ex = experts_for(shape, opts.device, opts.kind)?;
        let (expert, weight) = make_routing(shape, routing, opts.device)?;
        let counts = Vec::<f64>::try_from(
            expert
                .f_reshape([-1])?
                .f_bincount(None::<Tensor>, shape.experts)?
                .f_to_kind(Kind::Double)?,
        )?;
        let mean = counts.iter().sum::<f64>() / counts.len() as f64;
        let max_over_mean = counts.iter().cloned().fold(0.0, f64::max) / mean;
        let x = Tensor::f_randn([shape.tokens, shape.width], (opts.kind, opts.device))?;
        let grad = Tensor::f_randn([shape.tokens, shape.width], (opts.kind, opts.device))?;
        let reference = reference_output(&ex, &x, &expert, &weight)?;
        Ok(Case {
            shape,
            routing,
            ex,
            expert,
            weight,
            x,
            grad,
            reference,
            max_over_mean,
        })
    }

    /// Checks `imp` against the reference, times it op by op (and as a CUDA graph with
    /// `--cuda-graph`), and returns its row.
    fn row(&self, imp: Implementation, opts: &Options) -> Result<Row> {
        reset_peak(opts.device)?;
        let out = tch::no_grad(|| self.forward(imp, &self.x))?;
        let err = rel_error(&out, &self.reference)?;
        drop(out);
        // FP8: the weights' copies are made in the first iteration and reused, as within a
        // training step
        let fp8 = imp == Implementation::FmoecFp8;
        if fp8 {
            crate::runtime::cast::begin_step()?;
        }
        let timed = self.op_by_op(imp, opts)?;
        // the graph reads this step's FP8 weight copies, as a training step's does
        let graph = if opts.cuda_graph {
            Some(graph_timing(opts, || {
                let xg = self.x.f_detach()?.f_set_requires_grad(true)?;
                let out = self.forward(imp, &xg)?;
                let grads = self.backward(&out, &xg, opts)?;
                Ok((out, grads))
            })?)
        } else {
            None
        };
        let fp8_weight_copies_ms = if fp8 {
            fp8_step_end(opts.device)?
        } else {
            None
        };
        let (fwd, bwd, both) = (
            timing(timed.forward),
            timing(timed.backward),
            timing(timed.both),
        );
        let flops = self.shape.forward_flops();
        Ok(Row {
            shape: self.shape.clone(),
            routing: self.routing,
            implementation: imp,
            forward_tflops: flops / (fwd.median_ms * 1e-3) / 1e12,
            forward_backward_tflops: 3.0 * flops / (both.median_ms * 1e-3) / 1e12,
            tokens_per_s: self.shape.tokens as f64 / (both.median_ms * 1e-3),
            forward: fwd,
            backward: bwd,
            forward_backward: both,
            rel_error: err,
            max_over_mean_load: self.max_over_mean,
            peak_memory_bytes: timed.peak_memory_bytes,
            fp8_weight_copies_ms,
            graph,
            gpu: timed.gpu,
        })
    }

    fn forward(&self, imp: Implementation, x: &Tensor) -> Result<Tensor> {
        forward(imp, &self.ex, x, &self.expert, &self.weight)
    }

    /// The backward of `out` from the seed Σ out · grad (one elementwise pass over `[T, d]`):
    /// the gradients of the input `xg` and the weights, returned, not accumulated into
    /// `.grad` (as after PyTorch's default `zero_grad(set_to_none=True)`).
    fn backward(&self, out: &Tensor, xg: &Tensor, opts: &Options) -> Result<Vec<Tensor>> {
        let seed = out.f_mul(&self.grad)?.f_sum(opts.kind)?;
        let ex = &self.ex;
        let inputs: Vec<Tensor> = [Some(xg), Some(&ex.w1), Some(&ex.w2), ex.w3.as_ref()]
            .into_iter()
            .flatten()
            .map(|t| t.shallow_clone())
            .collect();
        Ok(Tensor::f_run_backward(&[&seed], &inputs, false, false)?)
    }

    /// The warm-up and timed iterations of `imp` op by op, the GPU sampled over the timed
    /// ones, and the peak memory of them all.
    fn op_by_op(&self, imp: Implementation, opts: &Options) -> Result<OpByOp> {
        let (mut fwd, mut bwd, mut both) = (Vec::new(), Vec::new(), Vec::new());
        let mut sampler = None;
        for i in 0..opts.warmup + opts.iterations {
            if i == opts.warmup {
                // the warm-up's work done, the GPU is sampled over the timed iterations alone
                sync(opts.device);
                sampler = crate::runtime::telemetry::sample(opts.device);
            }
            let xg = self.x.f_detach()?.f_set_requires_grad(true)?;
            let t0 = mark(opts.device)?;
            let out = self.forward(imp, &xg)?;
            let t1 = mark(opts.device)?;
            let grads = self.backward(&out, &xg, opts)?;
            let t2 = mark(opts.device)?;
            drop(grads);
            if i >= opts.warmup {
                fwd.push(between(&t0, &t1)?);
                bwd.push(between(&t1, &t2)?);
                both.push(between(&t0, &t2)?);
            }
            drop(out);
        }
        sync(opts.device);
        let gpu = sampler.and_then(|s| s.finish());
        // the op-by-op iterations' peak (the graph's memory comes on top)
        let peak_memory_bytes = peak_bytes(opts.device)?;
        Ok(OpByOp {
            forward: fwd,
            backward: bwd,
            both,
            gpu,
            peak_memory_bytes,
        })
    }

    /// The `fmoec` forward of the case stage by stage (see [`StageRow`]).
    fn stage_row(&self, opts: &Options) -> Result<StageRow> {
        let samples = self.stage_samples(opts)?;
        Ok(StageRow {
            shape: self.shape.clone(),
            routing: self.routing,
            stages: STAGES
                .iter()
                .zip(samples)
                .map(|(n, s)| (n.to_string(), timing(s).median_ms))
                .collect(),
            glue_bytes: glue_bytes(self.shape, opts.kind),
        })
    }

    /// Each stage's timed samples (ms), a mark between every two stages.
    fn stage_samples(&self, opts: &Options) -> Result<Vec<Vec<f64>>> {
        let ex = &self.ex;
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
        let gmm = |a: &Tensor, w: &Tensor, plan: &DispatchPlan| -> Result<Tensor> {
            Ok(a.f_internal_grouped_mm(
                &w.f_to_kind(a.kind())?,
                Some(&plan.offsets),
                None::<&Tensor>,
                None::<Kind>,
            )?)
        };
        for i in 0..opts.warmup + opts.iterations {
            let xg = self.x.f_detach()?.f_set_requires_grad(true)?;
            let mut marks = vec![mark(opts.device)?];
            let plan = DispatchPlan::new(&self.expert, ex.experts, false)?;
            marks.push(mark(opts.device)?);
            let xs = dispatch(&xg, &plan)?;
            marks.push(mark(opts.device)?);
            let h1 = gmm(&xs, &ex.w1, &plan)?;
            let h3 = match &ex.w3 {
                Some(w3) => Some(gmm(&xs, w3, &plan)?),
                None => None,
            };
            marks.push(mark(opts.device)?);
            let h = ex.activation(h1, h3, &plan)?;
            marks.push(mark(opts.device)?);
            let ys = gmm(&h, &ex.w2, &plan)?;
            marks.push(mark(opts.device)?);
            let _out = combine(&ys, &plan, &self.weight, self.shape.tokens)?;
            marks.push(mark(opts.device)?);
            if i >= opts.warmup {
                for (j, s) in samples.iter_mut().enumerate() {
                    s.push(between(&marks[j], &marks[j + 1])?);
                }
            }
        }
        Ok(samples)
    }
}

/// The f32 reference of a case: the same weights upcast, one expert at a time.
fn reference_output(ex: &Experts, x: &Tensor, expert: &Tensor, weight: &Tensor) -> Result<Tensor> {
    tch::no_grad(|| -> Result<Tensor> {
        let ex32 = Experts {
            experts: ex.experts,
            act: ex.act,
            w1: ex.w1.f_to_kind(Kind::Float)?,
            w2: ex.w2.f_to_kind(Kind::Float)?,
            w3: ex.w3.as_ref().map(|w| w.to_kind(Kind::Float)),
            b1: None,
            b2: None,
            path: ExpertPath::Loop,
            fp8: false,
            fp8_wgrad: true,
        };
        forward(
            Implementation::SortedLoop,
            &ex32,
            &x.f_to_kind(Kind::Float)?,
            expert,
            weight,
        )
    })
}

/// The side-by-side table: one line per (shape, routing, implementation), with the ratio to
/// the `ops` row (the libtorch-ops baseline) of the same shape and routing and to the dense
/// ceiling; then the tables of what was also measured.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    render_rows(report, &mut s);
    render_graph_rows(report, &mut s);
    render_fp8_rows(report, &mut s);
    render_gpu(report, &mut s);
    render_stages(report, &mut s);
    s
}

impl Row {
    /// Whether `other` is `imp`'s row of this row's shape and routing.
    fn same_case(&self, other: &Row, imp: Implementation) -> bool {
        other.implementation == imp
            && other.routing == self.routing
            && other.shape.name == self.shape.name
            && other.shape.act == self.shape.act
    }
}

/// `imp`'s row of `r`'s shape and routing, if the report has one.
fn row_of<'r>(report: &'r Report, r: &Row, imp: Implementation) -> Option<&'r Row> {
    report.rows.iter().find(|o| r.same_case(o, imp))
}

/// The heading and the op-by-op rows.
fn render_rows(report: &Report, s: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "device {}  dtype {}  timer {}  {} timed iterations  dense 8192^3 matmul {:.0} TFLOP/s",
        report.device, report.dtype, report.timer, report.iterations, report.dense_ceiling_tflops
    );
    let _ = writeln!(
        s,
        "{:<9} {:<7} {:<11} {:<12} {:>8} {:>8} {:>8} {:>17} {:>7} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8} {:>9}",
        "shape",
        "act",
        "routing",
        "impl",
        "fwd ms",
        "bwd ms",
        "f+b ms",
        "f+b p10-p90",
        "fwd TF",
        "f+b TF",
        "%dense",
        "tok/s",
        "peak MiB",
        "x ops",
        "x fmoec",
        "rel err"
    );
    for r in &report.rows {
        let ratio_to = |imp: Implementation| {
            row_of(report, r, imp)
                .map(|o| {
                    format!(
                        "{:.2}x",
                        o.forward_backward.median_ms / r.forward_backward.median_ms
                    )
                })
                .unwrap_or_default()
        };
        let _ = writeln!(
            s,
            "{} {:>8.3} {:>8.3} {:>8.3} {:>17} {:>7.1} {:>7.1} {:>6.1}% {:>9.3e} {:>8} {:>8} {:>8} {:>9.2e}",
            row_head(r),
            r.forward.median_ms,
            r.backward.median_ms,
            r.forward_backward.median_ms,
            format!("{:.3}-{:.3}", r.forward_backward.p10_ms, r.forward_backward.p90_ms),
            r.forward_tflops,
            r.forward_backward_tflops,
            100.0 * r.forward_backward_tflops / report.dense_ceiling_tflops,
            r.tokens_per_s,
            r.peak_memory_bytes
                .map(|b| format!("{:.0}", b as f64 / (1u64 << 20) as f64))
                .unwrap_or_else(|| "-".to_string()),
            ratio_to(Implementation::Ops),
            ratio_to(Implementation::Fmoec),
            r.rel_error,
        );
    }
}

/// The `fmoec-fp8` rows' weight copies, and whether the planner would take FP8 for them.
fn render_fp8_rows(report: &Report, s: &mut String) {
    use std::fmt::Write;
    let fp8_rows: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.fp8_weight_copies_ms.is_some())
        .collect();
    if fp8_rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nfmoec-fp8: the expert matmuls on FP8 operands (bf16 out); \"x fmoec\" is the speed-up over \
         fmoec's bf16 layer. Not in the times: the weights' FP8 copies, made once per training \
         step; and whether `precision = fp8` would take FP8 for such a layer on an h100_sxm \
         (the planner's estimate; elsewhere it falls back to bf16):"
    );
    let h100 = crate::check::hardware_profile("h100_sxm");
    for r in fp8_rows {
        let sh = &r.shape;
        let pays = h100.as_ref().map(|hw| {
            crate::plan::cost::fp8_pays_for_experts(
                hw,
                sh.width as u64,
                sh.hidden as u64,
                sh.act,
                (sh.tokens * sh.top_k) as f64,
                sh.experts as u64,
            )
        });
        let rows = sh.tokens * sh.top_k;
        let _ = writeln!(
            s,
            "  {} weight copies {:.3} ms per step; weight gradients on {} operands ({} rows an \
             expert); on h100_sxm: {}",
            case_head(sh, r.routing),
            r.fp8_weight_copies_ms.unwrap_or(0.0),
            match fp8_wgrad_for(sh.width, sh.hidden, rows, sh.experts) {
                true => "FP8",
                false => "bf16",
            },
            rows / sh.experts.max(1),
            match pays {
                Some(true) => "fp8",
                Some(false) => "bf16 (fp8 would not pay)",
                None => "?",
            }
        );
    }
}

/// With `--stages`: the `fmoec` forward of each case stage by stage.
fn render_stages(report: &Report, s: &mut String) {
    use std::fmt::Write;
    if report.stages.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nfmoec forward by stage (median ms, each stage timed alone; glue = dispatch + activation + combine)"
    );
    let _ = writeln!(
        s,
        "{:<9} {:<7} {:<11} {:>8} {:>9} {:>8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>10}",
        "shape",
        "act",
        "routing",
        "plan",
        "dispatch",
        "mm1",
        "activation",
        "mm2",
        "combine",
        "sum",
        "glue GB",
        "glue GB/s"
    );
    for r in &report.stages {
        let get = |n: &str| {
            r.stages
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| *v)
                .unwrap_or(0.0)
        };
        let glue_ms = get("dispatch") + get("activation") + get("combine");
        let _ = writeln!(
            s,
            "{} {:>8.3} {:>9.3} {:>8.3} {:>10.3} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>10.0}",
            case_head(&r.shape, r.routing),
            get("plan"),
            get("dispatch"),
            get("mm1"),
            get("activation"),
            get("mm2"),
            get("combine"),
            r.stages.iter().map(|(_, v)| v).sum::<f64>(),
            r.glue_bytes / 1e9,
            r.glue_bytes / 1e9 / (glue_ms * 1e-3),
        );
    }
}

/// A routing's or implementation's name as the command line spells it (its serde name).
fn label(v: serde_json::Result<serde_json::Value>) -> String {
    v.ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A case's shape, activation and routing, as the tables' first columns.
fn case_head(shape: &Shape, routing: RoutingKind) -> String {
    format!(
        "{:<9} {:<7} {:<11}",
        shape.name,
        format!("{:?}", shape.act).to_lowercase(),
        label(serde_json::to_value(routing)),
    )
}

/// A row's shape, activation, routing and implementation, as the tables' first columns.
fn row_head(r: &Row) -> String {
    format!(
        "{} {:<12}",
        case_head(&r.shape, r.routing),
        label(serde_json::to_value(r.implementation)),
    )
}

/// Each row's SM clock and power while it was timed, where NVML sampled them: under the
/// power cap the clock falls by an amount that depends on the work, so rows are compared at
/// the clocks they ran at.
fn render_gpu(report: &Report, s: &mut String) {
    use std::fmt::Write;
    let rows: Vec<(&Row, &crate::runtime::telemetry::Summary)> = report
        .rows
        .iter()
        .filter_map(|r| r.gpu.as_ref().map(|g| (r, g)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nthe GPU while each row was timed (NVML, every 10 ms): SM clock median (lowest), power \
         median, share of samples held down by the power cap"
    );
    for (r, g) in rows {
        let _ = writeln!(
            s,
            "  {} {:>5} MHz ({:>4})  {:>5.0} W  power cap {:>3.0}%  ({} samples)",
            row_head(r),
            g.sm_mhz_median,
            g.sm_mhz_min,
            g.power_w_median,
            100.0 * g.power_capped,
            g.samples
        );
    }
}

/// With `--cuda-graph`: each row's forward + backward replayed as a CUDA graph, with the
/// ratios to the `ops` and `fmoec` rows' graphs and what op by op cost on top.
fn render_graph_rows(report: &Report, s: &mut String) {
    use std::fmt::Write;
    if report.rows.iter().all(|r| r.graph.is_none()) {
        return;
    }
    let _ = writeln!(
        s,
        "\nforward + backward as a CUDA graph (captured once, replayed back to back, as `fmoec run` \
         replays a micro-batch); \"op by op +\" is what the op-by-op f+b above takes on top"
    );
    let _ = writeln!(
        s,
        "{:<9} {:<7} {:<11} {:<12} {:>8} {:>17} {:>7} {:>7} {:>8} {:>8} {:>11}",
        "shape",
        "act",
        "routing",
        "impl",
        "f+b ms",
        "f+b p10-p90",
        "f+b TF",
        "%dense",
        "x ops",
        "x fmoec",
        "op by op +"
    );
    let replayed = |r: &Row| match &r.graph {
        Some(GraphTiming::Replayed(t)) => Some(t.median_ms),
        _ => None,
    };
    for r in &report.rows {
        let head = row_head(r);
        match &r.graph {
            None => {}
            Some(GraphTiming::NotCaptured(why)) => {
                let _ = writeln!(s, "{head} not captured: {why}");
            }
            Some(GraphTiming::Replayed(t)) => {
                let ratio_to = |imp: Implementation| {
                    row_of(report, r, imp)
                        .and_then(replayed)
                        .map(|o| format!("{:.2}x", o / t.median_ms))
                        .unwrap_or_default()
                };
                let flops = 3.0 * r.shape.forward_flops() / (t.median_ms * 1e-3) / 1e12;
                let _ = writeln!(
                    s,
                    "{head} {:>8.3} {:>17} {:>7.1} {:>6.1}% {:>8} {:>8} {:>11.3}",
                    t.median_ms,
                    format!("{:.3}-{:.3}", t.p10_ms, t.p90_ms),
                    flops,
                    100.0 * flops / report.dense_ceiling_tflops,
                    ratio_to(Implementation::Ops),
                    ratio_to(Implementation::Fmoec),
                    r.forward_backward.median_ms - t.median_ms,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ms` as a row's timing, its p10 and p90 around it.
    fn timing_of(ms: f64) -> Timing {
        Timing {
            median_ms: ms,
            p10_ms: ms * 0.9,
            p90_ms: ms * 1.25,
        }
    }

    /// A row of `both` ms forward + backward (a third of it forward), the other figures
    /// derived from that.
    fn fixed_row(
        shape: &Shape,
        routing: RoutingKind,
        implementation: Implementation,
        both: f64,
    ) -> Row {
        Row {
            shape: shape.clone(),
            routing,
            implementation,
            forward: timing_of(both / 3.0),
            backward: timing_of(both * 2.0 / 3.0),
            forward_backward: timing_of(both),
            forward_tflops: 12.5 / both,
            forward_backward_tflops: 37.5 / both,
            tokens_per_s: 64.0 / (both * 1e-3),
            rel_error: 1.5e-6 * both,
            max_over_mean_load: 1.0,
            peak_memory_bytes: Some((both * 1048576.0) as i64),
            fp8_weight_copies_ms: None,
            graph: None,
            gpu: None,
        }
    }

    /// A report of a GPU run timed with CUDA events.
    fn gpu_report(iterations: usize, dense_ceiling_tflops: f64, rows: Vec<Row>) -> Report {
        Report {
            device: "Cuda(0)".into(),
            dtype: "BFloat16".into(),
            iterations,
            timer: "cuda-events".into(),
            stages: vec![],
            dense_ceiling_tflops,
            rows,
        }
    }

    #[test]
    fn implementations_agree_on_cpu() {
        tch::manual_seed(7);
        for shape in smoke_shapes() {
            let ex = experts_for(&shape, Device::Cpu, Kind::Float).unwrap();
            for routing in [
                RoutingKind::Balanced,
                RoutingKind::Skewed,
                RoutingKind::AllToOne,
            ] {
                let (expert, weight) = make_routing(&shape, routing, Device::Cpu).unwrap();
                let x = Tensor::randn([shape.tokens, shape.width], (Kind::Float, Device::Cpu));
                let a = forward(Implementation::Fmoec, &ex, &x, &expert, &weight).unwrap();
                let b = forward(Implementation::SortedLoop, &ex, &x, &expert, &weight).unwrap();
                let c = forward(Implementation::NaiveLoop, &ex, &x, &expert, &weight).unwrap();
                let d = forward(Implementation::Ops, &ex, &x, &expert, &weight).unwrap();
                assert!(rel_error(&a, &b).unwrap() < 1e-5, "{routing:?}");
                assert!(rel_error(&d, &b).unwrap() < 1e-5, "{routing:?}");
                assert!(rel_error(&c, &b).unwrap() < 1e-5, "{routing:?}");
            }
        }
    }

    #[test]
    fn routings_have_the_promised_loads() {
        tch::manual_seed(3);
        let shape = Shape::new("s", 20000, 8, 8, 16, 2, Activation::Gelu);
        let load = |kind| {
            let (expert, _) = make_routing(&shape, kind, Device::Cpu).unwrap();
            // distinct experts within each token
            let sorted = expert.sort(1, false).0;
            let same = sorted
                .narrow(1, 0, 1)
                .eq_tensor(&sorted.narrow(1, 1, 1))
                .sum(Kind::Int64)
                .int64_value(&[]);
            assert_eq!(same, 0, "{kind:?}");
            let c = Vec::<f64>::try_from(
                expert
                    .reshape([-1])
                    .bincount(None::<Tensor>, 16)
                    .to_kind(Kind::Double),
            )
            .unwrap();
            c.iter().cloned().fold(0.0, f64::max) / (c.iter().sum::<f64>() / 16.0)
        };
        assert!((load(RoutingKind::Balanced) - 1.0).abs() < 1e-9);
        let skew = load(RoutingKind::Skewed);
        assert!((2.5..3.5).contains(&skew), "skewed max/mean {skew}");
        assert!((load(RoutingKind::AllToOne) - 8.0).abs() < 1e-9);
    }

    #[test]
    fn harness_runs_and_renders() {
        let opts = Options {
            device: Device::Cpu,
            kind: Kind::Float,
            warmup: 1,
            iterations: 3,
            shapes: smoke_shapes(),
            routings: vec![RoutingKind::Skewed],
            stages: true,
            cuda_graph: false,
            implementations: vec![
                Implementation::Fmoec,
                Implementation::Ops,
                Implementation::SortedLoop,
            ],
        };
        let report = run(&opts, |_| {}).unwrap();
        assert_eq!(report.rows.len(), 6);
        assert_eq!(report.timer, "host-clock");
        assert_eq!(report.stages.len(), 2);
        assert!(report.stages.iter().all(|r| r.stages.len() == 6));
        for r in &report.rows {
            assert!(r.rel_error < 1e-5, "{r:?}");
            assert!(r.forward.median_ms > 0.0 && r.forward_backward_tflops > 0.0);
        }
        let table = render(&report);
        assert!(
            table.contains("sorted-loop") && table.contains("1.00x"),
            "{table}"
        );
        assert!(!table.contains("CUDA graph"), "{table}");
    }

    /// A report with every table `render` draws (op by op, CUDA graphs, FP8 weight copies,
    /// GPU clocks, stages) and one with the op-by-op table alone, rendered from fixed numbers:
    /// the snapshot holds the whole text, spacing included.
    #[test]
    fn render_draws_every_table_from_fixed_numbers() {
        let shapes = smoke_shapes();
        let t = timing_of;
        let row = |s: usize, routing, imp, both| fixed_row(&shapes[s], routing, imp, both);
        use Implementation::{Fmoec, FmoecFp8, NaiveLoop, Ops, SortedLoop};
        use RoutingKind::{AllToOne, Balanced, Skewed};
        let mut rows = vec![
            row(0, Balanced, Fmoec, 35.0),
            row(0, Balanced, Ops, 38.0),
            row(0, Balanced, FmoecFp8, 25.0),
            row(0, Skewed, SortedLoop, 51.25),
            row(1, AllToOne, Fmoec, 7.5),
            row(1, AllToOne, NaiveLoop, 90.0),
        ];
        rows[0].graph = Some(GraphTiming::Replayed(t(34.0)));
        rows[1].graph = Some(GraphTiming::NotCaptured("stream is capturing".into()));
        rows[2].graph = Some(GraphTiming::Replayed(t(22.5)));
        rows[2].fp8_weight_copies_ms = Some(0.75);
        rows[3].peak_memory_bytes = None;
        rows[4].graph = Some(GraphTiming::Replayed(t(6.0)));
        rows[2].gpu = Some(crate::runtime::telemetry::Summary {
            samples: 40,
            sm_mhz_median: 1590,
            sm_mhz_min: 1485,
            power_w_median: 696.6,
            power_capped: 1.0,
        });
        rows[5].gpu = Some(crate::runtime::telemetry::Summary {
            samples: 7,
            sm_mhz_median: 1980,
            sm_mhz_min: 1755,
            power_w_median: 301.2,
            power_capped: 0.25,
        });
        let stage = |s: usize, routing, ms: [f64; 6]| StageRow {
            shape: shapes[s].clone(),
            routing,
            stages: ["plan", "dispatch", "mm1", "activation", "mm2", "combine"]
                .iter()
                .zip(ms)
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            glue_bytes: 3.5e6 * (s + 1) as f64,
        };
        let mut full = gpu_report(50, 712.3, rows.clone());
        full.stages = vec![
            stage(0, Balanced, [0.125, 0.25, 3.5, 0.5, 2.75, 0.375]),
            stage(1, AllToOne, [0.0625, 1.0, 7.0, 1.5, 5.25, 2.0]),
        ];
        let plain = Report {
            device: "Cpu".into(),
            dtype: "Float".into(),
            iterations: 3,
            timer: "host-clock".into(),
            stages: vec![],
            dense_ceiling_tflops: 0.0421,
            rows: rows
                .into_iter()
                .map(|r| Row {
                    peak_memory_bytes: None,
                    fp8_weight_copies_ms: None,
                    graph: None,
                    gpu: None,
                    ..r
                })
                .collect(),
        };
        insta::assert_snapshot!(format!("{}\n---\n{}", render(&full), render(&plain)));
    }

    /// `--cuda-graph` where no graph can be captured is refused up front, saying what it needs.
    #[test]
    fn cuda_graphs_need_a_gpu() {
        let opts = Options {
            device: Device::Cpu,
            kind: Kind::Float,
            warmup: 1,
            iterations: 1,
            shapes: smoke_shapes(),
            routings: vec![RoutingKind::Balanced],
            stages: false,
            cuda_graph: true,
            implementations: vec![Implementation::Fmoec],
        };
        let err = run(&opts, |_| {}).unwrap_err();
        assert!(
            format!("{err}").contains("--cuda-graph times CUDA graphs: it needs a CUDA device"),
            "{err}"
        );
    }

    /// The graph table: each row's replayed time, its ratios to the `ops` and `fmoec` rows'
    /// graphs where they were captured, what op by op adds, and a row that could not be
    /// captured with libtorch's reason.
    #[test]
    fn graph_rows_render_beside_the_op_by_op_ones() {
        let shape = smoke_shapes().remove(0);
        let row = |implementation, both: f64, graph| Row {
            graph,
            ..fixed_row(&shape, RoutingKind::Balanced, implementation, both)
        };
        let mut report = gpu_report(
            3,
            700.0,
            vec![
                row(
                    Implementation::Fmoec,
                    35.0,
                    Some(GraphTiming::Replayed(timing_of(34.0))),
                ),
                row(
                    Implementation::Ops,
                    38.0,
                    Some(GraphTiming::NotCaptured(
                        "operation not permitted when stream is capturing".into(),
                    )),
                ),
                row(
                    Implementation::FmoecFp8,
                    25.0,
                    Some(GraphTiming::Replayed(timing_of(22.5))),
                ),
            ],
        );
        let table = render(&report);
        let graph_part = table
            .split("as a CUDA graph")
            .nth(1)
            .expect("a graph table");
        let line = |imp: &str| {
            graph_part
                .lines()
                .find(|l| l.split_whitespace().nth(3) == Some(imp))
                .unwrap_or_else(|| panic!("no {imp} line in {table}"))
                .to_string()
        };
        let fp8 = line("fmoec-fp8");
        // 34 / 22.5 = 1.51x fmoec's graph; op by op took 2.5 ms more; no ops graph to compare
        assert!(fp8.contains("22.500") && fp8.contains("1.51x"), "{fp8}");
        assert!(fp8.trim_end().ends_with("2.500"), "{fp8}");
        assert!(!fp8.contains("x ops"), "{fp8}");
        assert!(line("fmoec").contains("1.00x"), "{table}");
        assert!(
            line("ops").contains("not captured: operation not permitted when stream is capturing"),
            "{table}"
        );
        // no row was sampled: no clock table
        assert!(
            !table.contains("the GPU while each row was timed"),
            "{table}"
        );
        report.rows[2].gpu = Some(crate::runtime::telemetry::Summary {
            samples: 40,
            sm_mhz_median: 1590,
            sm_mhz_min: 1485,
            power_w_median: 696.6,
            power_capped: 1.0,
        });
        let table = render(&report);
        let clocks = table
            .split("the GPU while each row was timed")
            .nth(1)
            .expect("a clock table");
        assert!(
            clocks.contains("fmoec-fp8     1590 MHz (1485)    697 W  power cap 100%  (40 samples)"),
            "{table}"
        );
        assert_eq!(clocks.lines().filter(|l| l.contains(" MHz ")).count(), 1);
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains(r#""sm_mhz_median":1590"#), "{json}");
        assert!(
            json.contains(r#""graph":{"replayed":{"median_ms":22.5"#),
            "{json}"
        );
        assert!(
            json.contains(r#""not-captured":"operation not permitted"#),
            "{json}"
        );
    }
}

/// `fmoec bench moe` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Compute dtype: bf16 (CUDA) or f32; fp8 adds `fmoec-fp8` rows (the expert matmuls on
    /// FP8 operands, on Hopper GPUs) beside the bf16 `fmoec` and `ops` rows.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32", "fp8"])]
    pub dtype: String,
    /// Timed iterations per row (after warm-up).
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Only these shapes (S1, S1-T4096, S1-T512, S3, F0); all by default. `tiny` runs a
    /// CPU-sized smoke shape.
    #[arg(long = "shape", value_name = "NAME")]
    pub shapes: Vec<String>,
    /// Only these routings; all by default.
    #[arg(long = "routing", value_enum)]
    pub routings: Vec<RoutingKind>,
    /// Only these implementations; all by default.
    #[arg(long = "impl", value_enum)]
    pub implementations: Vec<Implementation>,
    /// Check the fused CUDA kernels and their autograd ops against a CPU f64 reference on
    /// random inputs with dropped slots, then exit (before any timing).
    #[arg(long)]
    pub check_kernels: bool,
    /// Also time the `fmoec` forward stage by stage (plan, dispatch, matmuls, activation,
    /// combine) and print that table after the main one.
    #[arg(long)]
    pub stages: bool,
    /// Also time each row's forward + backward captured once as a CUDA graph and replayed,
    /// as `fmoec run` replays a micro-batch (no gaps between kernels for the host to fill),
    /// and print that table after the op-by-op one, which stays. CUDA only; a row that
    /// cannot be captured (its work waits for the host) says so there.
    #[arg(long)]
    pub cuda_graph: bool,
    /// Also write the full report as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<std::path::PathBuf>,
}

fn or_all<T: Clone>(chosen: &[T], all: Vec<T>) -> Vec<T> {
    if chosen.is_empty() {
        all
    } else {
        chosen.to_vec()
    }
}

#[cfg(feature = "cuda")]
fn check_kernels(device: Device) -> Result<std::process::ExitCode> {
    if let Device::Cuda(n) = device {
        crate::runtime::cuda::kernels_ready(n)?;
    }
    for line in crate::runtime::cuda::check::self_check(device)? {
        println!("{line}");
    }
    // the FP8 quantisations and matmuls, where the device has FP8 (or the CPU's emulation)
    match crate::runtime::fp8::mode_for(device) {
        Ok(_) => {
            for line in crate::runtime::fp8::self_check(device)? {
                println!("{line}");
            }
        }
        Err(e) => println!("fp8 checks skipped: {e:#}"),
    }
    // the gates' keyed draws (the kernel, against the int64 ops on the CPU): the same bits,
    // for keys with high bits set, streams past 2^32 / 0x2545F491 and more elements than the
    // kernel's grid covers in one sweep
    {
        use crate::runtime::moe::{draw_key_words, draw_stream_word, keyed_uniform};
        let cases: [(u64, i64, &[i64]); 3] = [
            (0x0123_4567_89AB_CDEF, 3, &[1000, 7]),
            (u64::MAX, 0, &[8192]),
            (42, 1 << 40, &[1_000_003]),
        ];
        for (seed, stream, shape) in cases {
            let key = Tensor::f_from_slice(&draw_key_words(seed))?;
            let want = keyed_uniform(&key, stream, shape)?;
            let got = crate::runtime::cuda::ops::keyed_uniform(
                &key.f_to_device(device)?,
                draw_stream_word(stream),
                shape,
            )?
            .f_to_device(Device::Cpu)?;
            if !got.f_equal(&want)? {
                bail!("keyed draws: the device's differ from the CPU's (seed {seed:#x}, stream {stream}, shape {shape:?})");
            }
        }
        println!("keyed draws: bit-equal to the CPU ok");
    }
    println!("all kernel checks passed on {device:?}");
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(not(feature = "cuda"))]
fn check_kernels(_device: Device) -> Result<std::process::ExitCode> {
    bail!("--check-kernels needs a build with `--features cuda` (the kernels are CUDA-only)")
}

/// Runs the benchmark from the command line: a progress line per row on stderr, the table
/// on stdout.
pub fn run_cli(args: &BenchArgs) -> Result<std::process::ExitCode> {
    let device = crate::runtime::parse_device(&args.device)?;
    if args.check_kernels {
        return check_kernels(device);
    }
    let opts = options(args, device)?;
    let report = run(&opts, |r| {
        eprintln!(
            "{} {:?} {:?} {:?}: fwd+bwd {:.3} ms, {:.1} TFLOP/s",
            r.shape.name,
            r.shape.act,
            r.routing,
            r.implementation,
            r.forward_backward.median_ms,
            r.forward_backward_tflops
        )
    })?;
    if let Some(path) = &args.json {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path_text(path)))?;
    }
    print!("{}", render(&report));
    Ok(std::process::ExitCode::SUCCESS)
}

/// The run the command line asks for on `device`, refusing what cannot run there.
fn options(args: &BenchArgs, device: Device) -> Result<Options> {
    let kind = compute_kind(&args.dtype, device)?;
    if args.cuda_graph && !(cfg!(feature = "cuda") && device.is_cuda()) {
        bail!(
            "--cuda-graph times CUDA graphs: it needs a CUDA device (not {device:?}) and a \
             build with `--features cuda`; without it the rows are timed op by op"
        );
    }
    let fp8 = args.dtype == "fp8";
    if !fp8 && args.implementations.contains(&Implementation::FmoecFp8) {
        bail!("--impl fmoec-fp8 needs --dtype fp8");
    }
    Ok(Options {
        device,
        kind,
        warmup: args.warmup,
        iterations: args.iters,
        shapes: chosen_shapes(&args.shapes)?,
        routings: or_all(
            &args.routings,
            vec![
                RoutingKind::Balanced,
                RoutingKind::Skewed,
                RoutingKind::AllToOne,
            ],
        ),
        stages: args.stages,
        cuda_graph: args.cuda_graph,
        implementations: or_all(&args.implementations, default_implementations(fp8, device)),
    })
}

/// The dtype of `--dtype` on `device`: `fp8` times its FP8 rows beside bf16 ones (f32 ones
/// under the CPU's emulation).
fn compute_kind(dtype: &str, device: Device) -> Result<Kind> {
    Ok(match dtype {
        "bf16" if !device.is_cuda() => {
            bail!("bf16 grouped matmuls need CUDA; use `--dtype f32` on CPU")
        }
        "bf16" => Kind::BFloat16,
        "fp8" => match crate::runtime::fp8::mode_for(device)
            .map_err(|e| anyhow::anyhow!("--dtype fp8: {e:#}"))?
        {
            crate::runtime::fp8::Fp8Mode::Device => Kind::BFloat16,
            // the emulation's other rows in f32, as bf16 grouped matmuls need CUDA
            crate::runtime::fp8::Fp8Mode::Emulated => Kind::Float,
        },
        _ => Kind::Float,
    })
}

/// The shapes named by `--shape` (the standard ones without it; `tiny` only when named).
fn chosen_shapes(names: &[String]) -> Result<Vec<Shape>> {
    let mut shapes: Vec<Shape> = standard_shapes()
        .into_iter()
        .chain(smoke_shapes())
        .collect();
    if names.is_empty() {
        shapes.retain(|s| s.name != "tiny");
    } else {
        for name in names {
            if !shapes.iter().any(|s| &s.name == name) {
                bail!("unknown shape `{name}`: expected S1, S1-T4096, S1-T512, S3, F0 or tiny");
            }
        }
        shapes.retain(|s| names.contains(&s.name));
    }
    Ok(shapes)
}

/// The implementations timed without `--impl`: with `--dtype fp8`, FP8 beside `fmoec` and
/// `ops`; else every one (`fmoec-unfused` where the fused kernels run).
fn default_implementations(fp8: bool, device: Device) -> Vec<Implementation> {
    if fp8 {
        return vec![
            Implementation::Fmoec,
            Implementation::Ops,
            Implementation::FmoecFp8,
        ];
    }
    let mut all = vec![Implementation::Fmoec];
    if crate::runtime::moe::fused_available(device) {
        all.push(Implementation::FmoecUnfused);
    }
    all.extend([
        Implementation::Ops,
        Implementation::SortedLoop,
        Implementation::NaiveLoop,
    ]);
    all
}
