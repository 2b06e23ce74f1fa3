//! The Mixture-of-Experts feed-forward layer, with FastMoE's gates.
//!
//! Reference: FastMoE (laekov/fastmoe: `fmoe/layers.py`, `fmoe/gates/*.py`) and the GShard,
//! Switch and noisy top-k papers. The layer runs in four stages, each a method, so that an
//! expert-parallel runtime can put a token exchange between [`dispatch`] and
//! [`Experts::forward`] (and the reverse exchange before [`combine`]) without touching the rest:
//!
//! ```text
//! x [T, d] ──Gate::route──▶ Routing (expert [T, k], weight [T, k], balance loss, telemetry)
//!          ──DispatchPlan::new──▶ counts [E], int32 offsets [E], slot order (no host sync)
//!          ──dispatch──▶ xs [T·k, d] in expert order
//!          ──Experts::forward──▶ ys [T·k, d] (grouped matmuls, or a per-expert loop)
//!          ──combine──▶ out [T, d] = Σ_slots weight · ys (dropped slots add nothing)
//! ```
//!
//! Dropped slots (expert index -1, over capacity or randomly routed away) are sorted past the
//! last expert's group; `combine` never reads their rows and `dispatch`'s backward never
//! reads their gradients (the fused kernels skip them, the libtorch path masks them), so
//! whatever the grouped matmul leaves in rows outside every group never reaches the output or
//! a gradient. Expert biases are added by a fused epilogue that skips those rows (with the
//! `cuda` feature on a GPU); a libtorch bias would gather them, so there the matmuls are
//! masked. With the `cuda` feature on a GPU, the plan, `dispatch` and `combine` are fused
//! kernels without atomics (`runtime::cuda`); elsewhere they are libtorch ops. A token with every slot dropped contributes nothing here and passes through the
//! block's residual connection only.
//!
//! The emitted module's layer (`src/emit/templates/shared/fmoec_moe.py`) computes the same
//! routing, output, gradients and balance loss on the same weights, inputs and draws
//! ([`Gate::draws`]), and FastMoE's layer does too but for the semantics that differ from it on
//! purpose (capacity `ceil(factor · k · T / E)` in slot-major order after GShard's random
//! routing, Switch's jitter on the gate input, SWIPE's experts as its workers, a naive-gate
//! balance loss, ...): tests/compiler/emit_python.rs runs the three, and README.md, "Where fmoec
//! differs from FastMoE on purpose", lists the differences in one place.
//!
//! Across an expert group the collective layer moves the tokens; [`RankExperts`] gives it this
//! rank's experts (to run, and for FasterMoE's shadowing to replicate), and [`LayerSchedule`]
//! turns the plan's FasterMoE section into the exchange's options (chunks, and the shadowing
//! decision with the planner's costs, [`PlannedShadowing`]).
//!
//! This module knows nothing about the transformer around it, the optimizer or checkpoints; it
//! only needs a [`ParamStore`] to register its parameters under a name prefix.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::check::{Activation, Capacity, GateKind, Moe};
use crate::runtime::cast;
use crate::runtime::params::{Init, ParamStore};

/// How the expert matmuls run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertPath {
    /// `torch._grouped_mm` over the stacked expert weights: one call per matrix, no host sync.
    /// Needs f32 (CPU or CUDA) or bf16 (CUDA), rows whose byte stride is a multiple of 16.
    Grouped,
    /// One matmul per expert over its rows; reads the counts on the host. Any dtype (f64 for
    /// gradient checks).
    Loop,
}

/// Picks the grouped path where libtorch supports it for this dtype, device and shape.
pub fn default_path(kind: Kind, device: tch::Device, width: i64, hidden: i64) -> ExpertPath {
    let bytes = match kind {
        Kind::Float => 4,
        Kind::BFloat16 if device.is_cuda() => 2,
        _ => return ExpertPath::Loop,
    };
    if (width * bytes) % 16 == 0 && (hidden * bytes) % 16 == 0 {
        ExpertPath::Grouped
    } else {
        ExpertPath::Loop
    }
}

/// The routing decision for one batch of tokens.
pub struct Routing {
    /// `[T, k]` int64 expert per slot; `-1` marks a dropped slot.
    pub expert: Tensor,
    /// `[T, k]` combine weight per slot (differentiable, f32).
    pub weight: Tensor,
    /// The gate's balance loss, unweighted (f32 scalar; zero for gates without one).
    pub balance_loss: Tensor,
    /// Softmax of the (clean) gate logits, `[T, E]` f32, for telemetry.
    pub probs: Tensor,
}

/// Per-layer routing statistics, still on the device (read them once per logging step).
pub struct Telemetry {
    /// Tokens routed to each expert after drops, `[E]` f32.
    pub tokens_per_expert: Tensor,
    /// Fraction of the `T·k` slots that were dropped (scalar f32).
    pub dropped_fraction: Tensor,
    /// Mean entropy (nats) of the gate's softmax over all experts (scalar f32).
    pub gate_entropy: Tensor,
    /// The unweighted balance loss (scalar f32).
    pub balance_loss: Tensor,
    /// FasterMoE's dynamic shadowing: 1 for each expert that ran on replicas in this
    /// exchange, `[E]` f32 (`None` where no exchange could shadow).
    pub shadowed: Option<Tensor>,
}

/// Host copy of [`Telemetry`].
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TelemetryReport {
    pub tokens_per_expert: Vec<f64>,
    /// Busiest expert's tokens over the mean (1.0 is perfectly balanced).
    pub max_over_mean_load: f64,
    pub dropped_fraction: f64,
    pub gate_entropy: f64,
    pub balance_loss: f64,
    /// Experts replicated per exchange by FasterMoE's dynamic shadowing, averaged over the
    /// step's exchanges (micro-batches and expert groups); absent without shadowing.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shadowed_experts: Option<f64>,
    /// Per expert, the share of the step's exchanges in which it was replicated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shadowed_share: Option<Vec<f64>>,
}

impl Telemetry {
    pub fn report(&self) -> Result<TelemetryReport> {
        let counts = Vec::<f64>::try_from(self.tokens_per_expert.f_to_kind(Kind::Double)?)?;
        let mean = counts.iter().sum::<f64>() / counts.len().max(1) as f64;
        let max = counts.iter().cloned().fold(0.0, f64::max);
        let shadowed_share = match &self.shadowed {
            Some(s) => Some(Vec::<f64>::try_from(s.f_to_kind(Kind::Double)?)?),
            None => None,
        };
        Ok(TelemetryReport {
            shadowed_experts: shadowed_share.as_ref().map(|s| s.iter().sum()),
            shadowed_share,
            max_over_mean_load: if mean > 0.0 { max / mean } else { 0.0 },
            tokens_per_expert: counts,
            dropped_fraction: self.dropped_fraction.f_double_value(&[])?,
            gate_entropy: self.gate_entropy.f_double_value(&[])?,
            balance_loss: self.balance_loss.f_double_value(&[])?,
        })
    }
}

/// The gate: scores tokens, picks `k` experts each, and computes the balance loss.
pub struct Gate {
    pub kind: GateKind,
    pub experts: i64,
    pub top_k: i64,
    pub capacity: Option<Capacity>,
    pub jitter: f64,
    pub random_routing: bool,
    /// Weight of the balance loss in the training loss.
    pub balance_weight: f64,
    /// `[d, E]`.
    pub weight: Tensor,
    /// `[E]`; `None` for the noisy gate (FastMoE's noisy gate has no bias) and for models
    /// without biases.
    pub bias: Option<Tensor>,
    /// Noisy gate only: `[d, E]` noise scale projection.
    pub noise: Option<Tensor>,
}

/// The random draws a gate's routing takes in training ([`Gate::draws`] makes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RandomDraws {
    /// The noisy gate's standard normal noise, `[T, E]`.
    Noise,
    /// GShard's uniform random-routing draws, `[T]`.
    RandomRouting,
    /// Switch's uniform jitter draws, `x`'s shape and dtype.
    Jitter,
}

/// Noisy top-k's floor on the noise standard deviation (FastMoE: `noise_epsilon`).
const NOISE_EPSILON: f64 = 1e-2;

/// The two 32-bit words of a gate's draw key (see [`keyed_uniform`]) from a 64-bit seed.
pub fn draw_key_words(seed: u64) -> [i64; 2] {
    [(seed & 0xFFFF_FFFF) as i64, (seed >> 32) as i64]
}

/// murmur3's 32-bit finaliser with multipliers below 2^31, on int64 tensors holding 32-bit
/// values: every product stays below 2^63, so the same bits come out on every device.
fn mix32(x: &Tensor) -> Result<Tensor> {
    const M: i64 = 0xFFFF_FFFF;
    let x = x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(16)?)?;
    let x = x.f_mul_scalar(0x7FEB_352D)?.f_bitwise_and(M)?;
    let x = x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(15)?)?;
    let x = x.f_mul_scalar(0x68E3_1DA5)?.f_bitwise_and(M)?;
    Ok(x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(16)?)?)
}

/// The 32-bit word [`keyed_uniform`]'s hash adds for `stream`.
pub fn draw_stream_word(stream: i64) -> i64 {
    stream.wrapping_mul(0x2545_F491) & 0xFFFF_FFFF
}

/// Uniform draws in `[0, 1)` of `shape` (f32), a counter-based hash of `key` (`[2]` int64,
/// two 32-bit words, see [`draw_key_words`]), `stream` and each element's index. No generator
/// state: the same key gives the same values on every device, rank and thread, in any order,
/// and inside a CUDA graph (the key lives in device memory, so a replay with a new key
/// draws anew). On a GPU with the fused kernels one kernel computes the same bits
/// (`FMOEC_FUSED_DRAWS=0` keeps these ops).
pub fn keyed_uniform(key: &Tensor, stream: i64, shape: &[i64]) -> Result<Tensor> {
    const M: i64 = 0xFFFF_FFFF;
    let stream_word = draw_stream_word(stream);
    // `fmoec bench moe --check-kernels` compares the kernel's bits with these ops on the CPU,
    // whatever this switch says.
    #[cfg(feature = "cuda")]
    if !std::env::var("FMOEC_FUSED_DRAWS").is_ok_and(|v| v == "0") && fused_available(key.device())
    {
        return crate::runtime::cuda::ops::keyed_uniform(key, stream_word, shape);
    }
    let n: i64 = shape.iter().product();
    let index = Tensor::f_arange(n, (Kind::Int64, key.device()))?;
    let x = index
        .f_mul_scalar(0x61C8_8647)?
        .f_add(&key.f_select(0, 0)?)?
        .f_add_scalar(stream_word)?
        .f_bitwise_and(M)?;
    let x = mix32(&mix32(&x)?.f_bitwise_xor_tensor(&key.f_select(0, 1)?)?)?;
    // the top 24 bits: exact in f32, below 1
    Ok(x.f_bitwise_right_shift_tensor_scalar(8)?
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(1.0 / (1u64 << 24) as f64)?
        .f_reshape(shape)?)
}

/// Standard normal draws of `shape` (f32) from [`keyed_uniform`]'s streams `2·stream` and
/// `2·stream + 1` (Box–Muller).
pub fn keyed_normal(key: &Tensor, stream: i64, shape: &[i64]) -> Result<Tensor> {
    let u1 = keyed_uniform(key, 2 * stream, shape)?;
    let u2 = keyed_uniform(key, 2 * stream + 1, shape)?;
    let radius = u1.f_neg()?.f_log1p()?.f_mul_scalar(-2.0)?.f_sqrt()?;
    Ok(radius.f_mul(&u2.f_mul_scalar(2.0 * std::f64::consts::PI)?.f_cos()?)?)
}

/// `shape` uniform draws in `[0, 1)` of `kind` on `device`: keyed when a key is given,
/// else from libtorch's generator.
fn uniform(
    key: Option<&Tensor>,
    shape: &[i64],
    (kind, device): (Kind, tch::Device),
) -> Result<Tensor> {
    match key {
        Some(k) => Ok(keyed_uniform(&k.f_to_device(device)?, 0, shape)?.f_to_kind(kind)?),
        None => Ok(Tensor::f_rand(shape, (kind, device))?),
    }
}

/// `shape` standard normal draws of `kind` on `device`, keyed or not as in [`uniform`].
fn normal(
    key: Option<&Tensor>,
    shape: &[i64],
    (kind, device): (Kind, tch::Device),
) -> Result<Tensor> {
    match key {
        Some(k) => Ok(keyed_normal(&k.f_to_device(device)?, 0, shape)?.f_to_kind(kind)?),
        None => Ok(Tensor::f_randn(shape, (kind, device))?),
    }
}

impl Gate {
    /// Registers the gate's parameters under `prefix` as its definition (`crate::gates`) lists
    /// them: the scores' `weight` `[d, E]`, a `bias` `[E]` when the model's linear layers have
    /// biases, the noisy gate's `noise` `[d, E]`.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        moe: &Moe,
        width: i64,
        bias: bool,
    ) -> Result<Gate> {
        let def = crate::gates::of(moe.gate.kind);
        let (mut weight, mut bias_param, mut noise) = (None, None, None);
        for p in def.params_with(bias) {
            let shape: Vec<i64> = p
                .shape
                .dims(width as u64, moe.experts)
                .iter()
                .map(|&n| n as i64)
                .collect();
            let (init, decays) = if p.is_bias {
                (Init::Zeros, false)
            } else {
                (Init::Normal(0.02), true)
            };
            let t = store.var(&format!("{prefix}.{}", p.name), &shape, init, decays)?;
            match p.name {
                "weight" => weight = Some(t),
                "bias" => bias_param = Some(t),
                "noise" => noise = Some(t),
                other => bail!("gate parameter `{other}` has no use in the runtime"),
            }
        }
        let Some(weight) = weight else {
            bail!("the {} gate's definition has no `weight`", def.name);
        };
        Ok(Gate {
            kind: moe.gate.kind,
            experts: moe.experts as i64,
            top_k: moe.top_k as i64,
            capacity: moe.gate.capacity,
            jitter: moe.gate.jitter,
            random_routing: moe.gate.random_routing,
            balance_weight: moe.gate.balance_loss,
            weight,
            bias: bias_param,
            noise,
        })
    }

    /// Whether routing may drop slots (`-1`): a capacity, or GShard's random routing.
    pub fn may_drop(&self, train: bool) -> bool {
        self.capacity.is_some() || self.random_draws(train) == Some(RandomDraws::RandomRouting)
    }

    /// Per-expert capacity for `tokens` tokens, or `None` when this gate (or mode) has none.
    pub fn capacity_for(&self, tokens: i64, train: bool) -> Option<i64> {
        let c = self.capacity?;
        let factor = if train { c.train } else { c.eval };
        Some((factor * (self.top_k * tokens) as f64 / self.experts as f64).ceil() as i64)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let gk = gate_kind(x);
        let w = cast::compute(&self.weight, x.kind())?;
        let mut l = x.f_matmul(&w)?;
        if let Some(b) = &self.bias {
            l = l.f_add(&cast::compute(b, x.kind())?)?;
        }
        Ok(l.f_to_kind(gk)?)
    }

    /// Routes `x` (`[T, d]`). Randomness (noise, jitter, random routing) is used only when
    /// `train`: keyed by `key` (`[2]` int64, see [`keyed_uniform`]) when given, else from
    /// libtorch's generator.
    pub fn route(&self, x: &Tensor, train: bool, key: Option<&Tensor>) -> Result<Routing> {
        let draws = self.draws(x, train, key)?;
        self.route_with_draws(x, train, draws.as_ref())
    }

    /// The random draws routing `x` (`[T, d]`) takes, or `None` where it takes none (in
    /// evaluation, or a gate without randomness): the noisy gate's standard normal noise
    /// `[T, E]`, GShard's uniform random-routing draws `[T]`, Switch's uniform jitter draws
    /// `[T, d]` (in `x`'s dtype). Keyed as in [`Gate::route`]. A test gives the same draws to
    /// other implementations of the gate ([`Gate::route_with_draws`]).
    pub fn draws(&self, x: &Tensor, train: bool, key: Option<&Tensor>) -> Result<Option<Tensor>> {
        let Some(draws) = self.random_draws(train) else {
            return Ok(None);
        };
        let (t, _d) = x.size2()?;
        let gk = gate_kind(x);
        Ok(Some(match draws {
            RandomDraws::Noise => normal(key, &[t, self.experts], (gk, x.device()))?,
            RandomDraws::RandomRouting => uniform(key, &[t], (gk, x.device()))?,
            RandomDraws::Jitter => uniform(key, &x.size(), (x.kind(), x.device()))?,
        }))
    }

    /// The one rule for which random draws this gate's routing takes: only in training, and
    /// there the noisy gate's noise always, GShard's random routing when it is on with
    /// `top_k >= 2`, Switch's jitter when `jitter > 0`; `None` where it takes none.
    fn random_draws(&self, train: bool) -> Option<RandomDraws> {
        if !train {
            return None;
        }
        match self.kind {
            GateKind::Noisy => Some(RandomDraws::Noise),
            GateKind::Gshard if self.random_routing && self.top_k >= 2 => {
                Some(RandomDraws::RandomRouting)
            }
            GateKind::Switch if self.jitter > 0.0 => Some(RandomDraws::Jitter),
            GateKind::Naive | GateKind::Gshard | GateKind::Switch | GateKind::Swipe => None,
        }
    }

    /// [`Gate::route`] with the given draws (as [`Gate::draws`] makes them).
    pub fn route_with_draws(
        &self,
        x: &Tensor,
        train: bool,
        draws: Option<&Tensor>,
    ) -> Result<Routing> {
        let (t, _d) = x.size2()?;
        let draws = self.draws_taken(train, draws)?;
        match self.kind {
            GateKind::Naive => self.route_naive(x, t),
            GateKind::Noisy => self.route_noisy(x, draws),
            GateKind::Gshard => self.route_gshard(x, t, train, draws),
            GateKind::Switch => self.route_switch(x, t, train, draws),
            GateKind::Swipe => self.route_swipe(x, train),
        }
    }

    /// The draws this routing takes (where [`Gate::random_draws`] says it takes some),
    /// refusing to route without them; `None` where it takes none.
    fn draws_taken<'d>(
        &self,
        train: bool,
        draws: Option<&'d Tensor>,
    ) -> Result<Option<&'d Tensor>> {
        Ok(match (self.random_draws(train).is_some(), draws) {
            (true, Some(d)) => Some(d),
            (true, None) => bail!("internal error: the {:?} gate routes with draws", self.kind),
            (false, _) => None,
        })
    }

    /// Top-k of the logits, the weights soft-maxed among them, with DeepSeek-MoE's
    /// expert-level balance loss over the `t` tokens.
    fn route_naive(&self, x: &Tensor, t: i64) -> Result<Routing> {
        let (gk, k, e) = (gate_kind(x), self.top_k, self.experts);
        let logits = self.logits(x)?;
        let (val, idx) = logits.f_topk(k, -1, true, true)?;
        let probs = logits.f_softmax(-1, gk)?;
        // E · Σ_e f_e · P_e: f_e the fraction of the T·k slots routed to e, P_e the
        // mean probability of e (DeepSeek-MoE's expert-level balance loss)
        let f_e = counts_of(&idx, e)?
            .f_to_kind(gk)?
            .f_div_scalar((t * k) as f64)?;
        let p_e = probs.f_mean_dim(0, false, gk)?;
        let balance = f_e.f_mul(&p_e)?.f_sum(gk)?.f_mul_scalar(e as f64)?;
        Ok(Routing {
            expert: idx,
            weight: val.f_softmax(-1, gk)?,
            balance_loss: balance,
            probs,
        })
    }

    /// Top-k of the logits plus the standard normal `noise` (in training) scaled by the
    /// learned noise, with the importance and load losses.
    fn route_noisy(&self, x: &Tensor, noise: Option<&Tensor>) -> Result<Routing> {
        let (gk, k, e) = (gate_kind(x), self.top_k, self.experts);
        let clean = self.logits(x)?;
        let Some(noise_w) = self.noise.as_ref() else {
            bail!("internal error: a noisy gate without its noise projection");
        };
        let raw_std = x
            .f_matmul(&cast::compute(noise_w, x.kind())?)?
            .f_to_kind(gk)?;
        let (noisy, std) = match noise {
            Some(noise) => {
                let std = raw_std.f_softplus()?.f_add_scalar(NOISE_EPSILON)?;
                (clean.f_add(&noise.f_mul(&std)?)?, Some(std))
            }
            None => (clean.shallow_clone(), None),
        };
        let m = (k + 1).min(e);
        let (top_val, top_idx) = noisy.f_topk(m, -1, true, true)?;
        let top_k_val = top_val.f_narrow(1, 0, k)?;
        let top_k_idx = top_idx.f_narrow(1, 0, k)?;
        let weight = top_k_val.f_softmax(-1, gk)?;
        let gates = clean.f_zeros_like()?.f_scatter(1, &top_k_idx, &weight)?;
        let importance = gates.f_sum_dim_intlist(0, false, gk)?;
        let load = match (&std, k < e) {
            (Some(std), true) => {
                prob_in_top_k(&clean, &noisy, std, &top_val, k)?.f_sum_dim_intlist(0, false, gk)?
            }
            _ => gates.f_gt(0.0)?.f_sum_dim_intlist(0, false, gk)?,
        };
        let balance = cv_squared(&importance)?.f_add(&cv_squared(&load)?)?;
        Ok(Routing {
            expert: top_k_idx,
            weight,
            balance_loss: balance,
            probs: clean.f_softmax(-1, gk)?,
        })
    }

    /// Top-2 of the logits, the second expert dropped where its uniform draw `random` (in
    /// training) exceeds twice its weight, then the capacity; GShard's auxiliary loss.
    fn route_gshard(
        &self,
        x: &Tensor,
        t: i64,
        train: bool,
        random: Option<&Tensor>,
    ) -> Result<Routing> {
        let (gk, k, e) = (gate_kind(x), self.top_k, self.experts);
        let logits = self.logits(x)?;
        let (val, idx) = logits.f_topk(k, -1, true, true)?;
        let weight = val.f_softmax(-1, gk)?;
        let probs = logits.f_softmax(-1, gk)?;
        // l_aux = E · Σ_e (fraction of tokens whose first choice is e) · (mean prob of e)
        let top1 = idx.f_select(1, 0)?;
        let c_e = counts_of(&top1, e)?.f_to_kind(gk)?.f_div_scalar(t as f64)?;
        let m_e = probs.f_mean_dim(0, false, gk)?;
        let balance = c_e.f_mul(&m_e)?.f_sum(gk)?.f_mul_scalar(e as f64)?;
        let mut expert = idx;
        if let Some(r) = random {
            let drop = weight.f_select(1, 1)?.f_mul_scalar(2.0)?.f_lt_tensor(r)?;
            let second = expert.f_select(1, 1)?.f_masked_fill(&drop, -1)?;
            expert = Tensor::f_stack(&[expert.f_select(1, 0)?, second], 1)?;
            if k > 2 {
                bail!("gshard routes at most two experts per token (top_k = {k})");
            }
        }
        if let Some(cap) = self.capacity_for(t, train) {
            expert = limit_by_capacity(&expert, e, cap)?;
        }
        Ok(Routing {
            expert,
            weight,
            balance_loss: balance,
            probs,
        })
    }

    /// Top-k of the probabilities of the input scaled by the uniform `jitter` draws (in
    /// training), then the capacity; the Switch balance loss over the kept slots.
    fn route_switch(
        &self,
        x: &Tensor,
        t: i64,
        train: bool,
        jitter: Option<&Tensor>,
    ) -> Result<Routing> {
        let (gk, k, e) = (gate_kind(x), self.top_k, self.experts);
        let xin = if let Some(u) = jitter {
            let scale = u
                .f_mul_scalar(2.0 * self.jitter)?
                .f_add_scalar(1.0 - self.jitter)?;
            x.f_mul(&scale)?
        } else {
            x.shallow_clone()
        };
        let logits = self.logits(&xin)?;
        let probs = logits.f_softmax(-1, gk)?;
        let (val, idx) = probs.f_topk(k, -1, true, true)?;
        let mut expert = idx;
        if let Some(cap) = self.capacity_for(t, train) {
            expert = limit_by_capacity(&expert, e, cap)?;
        }
        // l_aux = E · Σ_e (fraction of kept slots at e) · (Σ_t p_te / kept slots)
        let (counts, kept) = valid_counts(&expert, e, gk)?;
        let kept = kept.f_clamp_min(1.0)?;
        let fraction = counts.f_div(&kept)?;
        let prob = probs.f_sum_dim_intlist(0, false, gk)?.f_div(&kept)?;
        let balance = fraction.f_mul(&prob)?.f_sum(gk)?.f_mul_scalar(e as f64)?;
        Ok(Routing {
            expert,
            weight: val,
            balance_loss: balance,
            probs,
        })
    }

    /// Top-k of the logits; in training, over-loaded experts' tokens swapped to under-loaded
    /// ones ([`swipe`]) and weighted by their own logits. No balance loss.
    fn route_swipe(&self, x: &Tensor, train: bool) -> Result<Routing> {
        let (gk, k, e) = (gate_kind(x), self.top_k, self.experts);
        let zero = Tensor::f_zeros([], (gk, x.device()))?;
        let logits = self.logits(x)?;
        let probs = logits.f_softmax(-1, gk)?;
        let (val, idx) = logits.f_topk(k, -1, true, true)?;
        if !train {
            return Ok(Routing {
                expert: idx,
                weight: val.f_softmax(-1, gk)?,
                balance_loss: zero,
                probs,
            });
        }
        let expert = swipe(&idx, e)?;
        let chosen = logits.f_gather(1, &expert, false)?;
        Ok(Routing {
            expert,
            weight: chosen.f_softmax(-1, gk)?,
            balance_loss: zero,
            probs,
        })
    }
}

/// Gates compute in f32 (f64 when the layer runs in f64, for gradient checks).
fn gate_kind(x: &Tensor) -> Kind {
    if x.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Squared coefficient of variation with an unbiased variance, as FastMoE's noisy gate.
pub fn cv_squared(x: &Tensor) -> Result<Tensor> {
    if x.size()[0] <= 1 {
        return Ok(Tensor::f_zeros([], (x.kind(), x.device()))?);
    }
    let var = x.f_var(true)?;
    let mean = x.f_mean(x.kind())?;
    Ok(var.f_div(&mean.f_square()?.f_add_scalar(1e-10)?)?)
}

/// Noisy top-k: the probability, under fresh noise, that each logit is in the top k.
fn prob_in_top_k(
    clean: &Tensor,
    noisy: &Tensor,
    std: &Tensor,
    top_values: &Tensor,
    k: i64,
) -> Result<Tensor> {
    let threshold_in = top_values.f_narrow(1, k, 1)?;
    let threshold_out = top_values.f_narrow(1, k - 1, 1)?;
    let is_in = noisy.f_gt_tensor(&threshold_in)?;
    let cdf = |z: Tensor| -> Result<Tensor> {
        Ok(z.f_div_scalar(std::f64::consts::SQRT_2)?
            .f_erf()?
            .f_add_scalar(1.0)?
            .f_mul_scalar(0.5)?)
    };
    let p_in = cdf(clean.f_sub(&threshold_in)?.f_div(std)?)?;
    let p_out = cdf(clean.f_sub(&threshold_out)?.f_div(std)?)?;
    Ok(p_in.f_where_self(&is_in, &p_out)?)
}

/// How often each value `0..bins` occurs in `keys` (int64, every key in range; `[bins]`
/// int64), without the host synchronisation of libtorch's `bincount` on a GPU (which reads
/// the keys' minimum and maximum back to size its output).
pub fn counts_of(keys: &Tensor, bins: i64) -> Result<Tensor> {
    let flat = keys.f_reshape([-1])?;
    Ok(
        Tensor::f_zeros([bins], (Kind::Int64, flat.device()))?.f_scatter_add(
            0,
            &flat,
            &flat.f_ones_like()?,
        )?,
    )
}

/// Tokens per expert among kept slots (`[E]` f32) and the number of kept slots (scalar f32).
fn valid_counts(expert: &Tensor, e: i64, kind: Kind) -> Result<(Tensor, Tensor)> {
    let flat = expert.f_reshape([-1])?;
    let sentinel = flat.f_where_scalarother(&flat.f_ge(0)?, e)?;
    let counts = counts_of(&sentinel, e + 1)?
        .f_narrow(0, 0, e)?
        .f_to_kind(kind)?;
    let kept = counts.f_sum(kind)?;
    Ok((counts, kept))
}

/// Position of every slot within its expert's queue, slots ordered slot-major then by token
/// (all first choices before any second choice). Dropped slots (`-1`) get large positions.
fn queue_positions(expert: &Tensor, e: i64) -> Result<Tensor> {
    let (t, k) = expert.size2()?;
    // slot-major order: row r = slot·T + token
    let order_major = expert.f_transpose(0, 1)?.f_reshape([-1])?;
    #[cfg(feature = "cuda")]
    if fused_available(expert.device()) && crate::runtime::cuda::plan_kernels_apply(&order_major, e)
    {
        let pos = crate::runtime::cuda::key_positions(&order_major, e)?;
        return Ok(pos.f_reshape([k, t])?.f_transpose(0, 1)?);
    }
    let keyed = order_major.f_where_scalarother(&order_major.f_ge(0)?, e)?;
    let sorted = keyed.f_argsort_stable(true, 0, false)?;
    let counts = counts_of(&keyed, e + 1)?;
    let starts = counts.f_cumsum(0, Kind::Int64)?.f_sub(&counts)?;
    let sorted_keys = keyed.f_index_select(0, &sorted)?;
    let rank = Tensor::f_arange(t * k, (Kind::Int64, expert.device()))?;
    let pos_sorted = rank.f_sub(&starts.f_index_select(0, &sorted_keys)?)?;
    let pos = pos_sorted
        .f_zeros_like()?
        .f_scatter(0, &sorted, &pos_sorted)?;
    Ok(pos.f_reshape([k, t])?.f_transpose(0, 1)?)
}

/// Drops (sets to -1) the slots beyond each expert's `capacity`.
pub fn limit_by_capacity(expert: &Tensor, e: i64, capacity: i64) -> Result<Tensor> {
    let pos = queue_positions(expert, e)?;
    let over = pos.f_ge(capacity)?;
    Ok(expert.f_masked_fill(&over, -1)?)
}

/// SWIPE (FastMoE's `swipe_once`, one process, one expert per "worker"): slot by slot, each
/// expert keeps at most its remaining share of `ceil(T·k / E)` tokens in token order; the
/// overflow goes, in token order, to the experts with capacity left, lowest index first.
fn swipe(idx: &Tensor, e: i64) -> Result<Tensor> {
    let (t, k) = idx.size2()?;
    let device = idx.device();
    let share = (t * k + e - 1) / e;
    let mut cap = Tensor::f_full([e], share, (Kind::Int64, device))?;
    let mut columns = Vec::with_capacity(k as usize);
    for slot in 0..k {
        let col = idx.f_select(1, slot)?; // [T]
        let onehot = col.f_one_hot(e)?; // [T, E]
        let pos = onehot
            .f_cumsum(0, Kind::Int64)?
            .f_mul(&onehot)?
            .f_sum_dim_intlist(1, false, Kind::Int64)?
            .f_sub_scalar(1)?;
        let cap_of = cap.f_index_select(0, &col)?;
        let keep = pos.f_lt_tensor(&cap_of)?;
        let counts = onehot.f_sum_dim_intlist(0, false, Kind::Int64)?;
        cap = cap.f_sub(&counts)?.f_clamp_min(0)?;
        // dropped tokens, in token order, fill the experts with capacity left
        let dropped = keep.f_logical_not()?.f_to_kind(Kind::Int64)?;
        let rank = dropped.f_cumsum(0, Kind::Int64)?.f_sub_scalar(1)?;
        let cum = cap.f_cumsum(0, Kind::Int64)?;
        let target = rank
            .f_searchsorted(&cum, false, true, "right", None::<Tensor>)?
            .f_clamp_max(e - 1)?;
        let n_dropped = dropped.f_sum(Kind::Int64)?;
        let before = cum.f_sub(&cap)?;
        let taken = n_dropped.f_sub(&before)?.f_clamp_min(0)?.f_minimum(&cap)?;
        cap = cap.f_sub(&taken)?;
        columns.push(col.f_where_self(&keep, &target)?);
    }
    Ok(Tensor::f_stack(&columns, 1)?)
}

/// Where each slot goes: the expert order of the `T·k` slots and the group sizes.
pub struct DispatchPlan {
    /// Slot indices (`token·k + slot`) sorted by expert, dropped slots last. `[T·k]` int64.
    pub order: Tensor,
    /// The token of each sorted row. `[T·k]` int64.
    pub token: Tensor,
    /// The expert of each sorted row (`E` for dropped rows). `[T·k]` int64.
    pub expert: Tensor,
    /// Whether each sorted row is a kept slot. `[T·k, 1]` bool.
    pub valid: Tensor,
    /// The slot of each sorted row, `-1` for dropped rows. `[T·k]` int64.
    pub row_slot: Tensor,
    /// The sorted row of each slot (`token·k + slot`), `-1` for dropped slots. `[T·k]` int64.
    pub slot_row: Tensor,
    /// Kept tokens per expert. `[E]` int64.
    pub counts: Tensor,
    /// Cumulative group ends for `_grouped_mm`. `[E]` int32.
    pub offsets: Tensor,
    pub experts: i64,
    pub top_k: i64,
    /// Whether some slot may be dropped (`-1`); when false the masks around the dropped rows
    /// are skipped (the caller knows its gate has no capacity and no random routing).
    pub may_drop: bool,
    /// Whether this layer runs the fused CUDA kernels (feature `cuda`, a CUDA device,
    /// kernels compiled; switch off with `FMOEC_FUSED=0`): the plan itself, [`dispatch`],
    /// [`combine`], and in [`Experts::forward`] the bias epilogue and SwiGLU. Each kernel
    /// still falls back to libtorch for dtypes or row widths it does not take.
    pub fused: bool,
}

impl DispatchPlan {
    /// Sorts the slots by expert with no host synchronisation (a stable sort, and group ends
    /// by binary search in the sorted keys).
    pub fn new(routing_expert: &Tensor, e: i64, may_drop: bool) -> Result<DispatchPlan> {
        let fused = fused_available(routing_expert.device());
        DispatchPlan::with_kernels(routing_expert, e, may_drop, fused)
    }

    /// [`DispatchPlan::new`] with the fused kernels on or off for this layer (`fused` true
    /// only where [`fused_available`]); off, everything runs as libtorch ops.
    pub fn with_kernels(
        routing_expert: &Tensor,
        e: i64,
        may_drop: bool,
        fused: bool,
    ) -> Result<DispatchPlan> {
        let (_t, k) = routing_expert.size2()?;
        let flat = routing_expert.f_reshape([-1])?;
        let n = flat.size()[0];
        let device = flat.device();
        #[cfg(feature = "cuda")]
        if fused && crate::runtime::cuda::plan_kernels_apply(&flat, e) {
            // the same maps from three kernels instead of a sort and a dozen small ops
            let o = crate::runtime::cuda::expert_order(&flat, k, e)?;
            let valid = o.sorted_key.f_lt(e)?.f_unsqueeze(1)?;
            return Ok(DispatchPlan {
                order: o.order,
                token: o.token,
                expert: o.sorted_key,
                valid,
                row_slot: o.row_slot,
                slot_row: o.slot_row,
                counts: o.counts,
                offsets: o.offsets,
                experts: e,
                top_k: k,
                may_drop,
                fused: true,
            });
        }
        let keyed = flat.f_where_scalarother(&flat.f_ge(0)?, e)?;
        let order = keyed.f_argsort_stable(true, 0, false)?;
        let expert = keyed.f_index_select(0, &order)?;
        let offsets = Tensor::f_arange(e, (Kind::Int64, device))?.f_searchsorted(
            &expert,
            true,
            true,
            "right",
            None::<Tensor>,
        )?;
        let ends = offsets.f_to_kind(Kind::Int64)?;
        let zero = Tensor::f_zeros([1], (Kind::Int64, device))?;
        let counts = ends.f_diff(1, 0, Some(&zero), None::<&Tensor>)?;
        let valid = expert.f_lt(e)?;
        let row_slot = order.f_where_scalarother(&valid, -1)?;
        let rows = Tensor::f_arange(n, (Kind::Int64, device))?;
        let slot_row = order
            .f_empty_like()?
            .f_scatter(0, &order, &rows)?
            .f_where_scalarother(&flat.f_ge(0)?, -1)?;
        let token = order.f_div_scalar_mode(k, "floor")?;
        Ok(DispatchPlan {
            order,
            token,
            expert,
            valid: valid.f_unsqueeze(1)?,
            row_slot,
            slot_row,
            counts,
            offsets,
            experts: e,
            top_k: k,
            may_drop,
            fused,
        })
    }
}

impl DispatchPlan {
    /// The plan of rows already grouped by expert (`counts[j]` rows for expert `j`, in
    /// order, none dropped), as an expert-parallel rank receives them: only
    /// [`Experts::forward`] reads it (no dispatch or combine), `fused` where
    /// [`fused_available`].
    pub fn grouped(counts: &Tensor, rows: i64) -> Result<DispatchPlan> {
        let device = counts.device();
        let experts = counts.size()[0];
        let arange = Tensor::f_arange(rows, (Kind::Int64, device))?;
        let expert = Tensor::f_arange(experts, (Kind::Int64, device))?
            .f_repeat_interleave_self_tensor(counts, 0, Some(rows))?;
        Ok(DispatchPlan {
            order: arange.shallow_clone(),
            token: arange.shallow_clone(),
            expert,
            valid: Tensor::f_ones([rows, 1], (Kind::Bool, device))?,
            row_slot: arange.shallow_clone(),
            slot_row: arange,
            offsets: counts.f_cumsum(0, Kind::Int)?,
            counts: counts.shallow_clone(),
            experts,
            top_k: 1,
            may_drop: false,
            fused: fused_available(device),
        })
    }
}

/// Whether the fused CUDA kernels can run on `device` (see [`DispatchPlan::fused`]).
#[cfg(feature = "cuda")]
pub fn fused_available(device: tch::Device) -> bool {
    match device {
        tch::Device::Cuda(n) => {
            if std::env::var("FMOEC_FUSED").is_ok_and(|v| v == "0") {
                return false;
            }
            let ok = crate::runtime::cuda::kernels_ready(n).is_ok();
            if !ok {
                crate::runtime::cuda::warn_unavailable(n);
            }
            ok
        }
        _ => false,
    }
}

/// Whether the fused CUDA kernels can run on `device`: never without feature `cuda`.
#[cfg(not(feature = "cuda"))]
pub fn fused_available(_device: tch::Device) -> bool {
    false
}

/// Gathers the tokens into expert order: `[T, d]` → `[T·k, d]`, dropped rows zeroed.
pub fn dispatch(x: &Tensor, plan: &DispatchPlan) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if plan.fused {
        return crate::runtime::cuda::dispatch_op(x, &plan.row_slot, &plan.slot_row, plan.top_k);
    }
    let xs = x.f_index_select(0, &plan.token)?;
    if !plan.may_drop {
        return Ok(xs);
    }
    Ok(xs.f_where_self(&plan.valid, &xs.f_zeros_like()?)?)
}

/// Weighted sum of the expert outputs back onto their tokens: `[T·k, d]` → `[T, d]`.
/// Rows of dropped slots are never read (the grouped matmul leaves them uninitialised).
pub fn combine(ys: &Tensor, plan: &DispatchPlan, weight: &Tensor, tokens: i64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if plan.fused && weight.kind() == Kind::Float {
        return crate::runtime::cuda::combine_op(ys, weight, &plan.slot_row, &plan.row_slot);
    }
    let w = weight
        .f_reshape([-1])?
        .f_index_select(0, &plan.order)?
        .f_to_kind(ys.kind())?;
    let ys = if plan.may_drop {
        ys.f_where_self(&plan.valid, &ys.f_zeros_like()?)?
    } else {
        ys.shallow_clone()
    };
    let weighted = ys.f_mul(&w.f_unsqueeze(1)?)?;
    let d = ys.size()[1];
    let out = Tensor::f_zeros([tokens, d], (ys.kind(), ys.device()))?;
    Ok(out.f_index_add(0, &plan.token, &weighted)?)
}

/// `E` experts of one shape as stacked tensors (`w1 [E, d, h]`, `w2 [E, h, d]`, SwiGLU's
/// `w3 [E, d, h]`, biases `[E, h]` / `[E, d]`).
pub struct Experts {
    pub experts: i64,
    pub act: Activation,
    pub w1: Tensor,
    pub w2: Tensor,
    pub w3: Option<Tensor>,
    pub b1: Option<Tensor>,
    pub b2: Option<Tensor>,
    pub path: ExpertPath,
    /// The grouped matmuls with FP8 operands (`precision = fp8`, feature `cuda`; see
    /// `runtime::fp8`). Only on the grouped path.
    pub fp8: bool,
    /// With `fp8`: the weight gradients on FP8 operands too, else on the layer's bf16 input
    /// and output gradient (the plan's choice, `plan::cost::fp8_weight_gradient`).
    pub fp8_wgrad: bool,
}

impl Experts {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        experts: i64,
        width: i64,
        hidden: i64,
        act: Activation,
        bias: bool,
        out_std: f64,
    ) -> Result<Experts> {
        let mut var = |name: &str, shape: &[i64], init: Init, decay: bool| {
            store.expert_var(prefix, name, experts, shape, init, decay)
        };
        let w1 = var("w1", &[width, hidden], Init::Normal(0.02), true)?;
        let w3 = if act == Activation::Swiglu {
            Some(var("w3", &[width, hidden], Init::Normal(0.02), true)?)
        } else {
            None
        };
        let w2 = var("w2", &[hidden, width], Init::Normal(out_std), true)?;
        let (b1, b2) = if bias {
            (
                Some(var("b1", &[hidden], Init::Zeros, false)?),
                Some(var("b2", &[width], Init::Zeros, false)?),
            )
        } else {
            (None, None)
        };
        // the experts this store holds (a rank's share, or all)
        let experts = w1.size()[0];
        Ok(Experts {
            experts,
            act,
            w1,
            w2,
            w3,
            b1,
            b2,
            path: ExpertPath::Grouped,
            fp8: false,
            fp8_wgrad: true,
        })
    }

    /// The same experts (the same tensors), with FP8 operands or not (and with FP8 operands
    /// for their weight gradients or not).
    pub fn with_fp8(&self, fp8: bool, fp8_wgrad: bool) -> Experts {
        Experts {
            experts: self.experts,
            act: self.act,
            w1: self.w1.shallow_clone(),
            w2: self.w2.shallow_clone(),
            w3: self.w3.as_ref().map(Tensor::shallow_clone),
            b1: self.b1.as_ref().map(Tensor::shallow_clone),
            b2: self.b2.as_ref().map(Tensor::shallow_clone),
            path: self.path,
            fp8,
            fp8_wgrad,
        }
    }

    /// The grouped (or looped) matmul of every row with its expert's `w`. `masked` zeroes
    /// the rows of dropped slots on both sides.
    fn mm(&self, xs: &Tensor, w: &Tensor, plan: &DispatchPlan, masked: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fp8 && self.path == ExpertPath::Grouped {
            // the master goes in: its FP8 copies are made once per step
            let xs = if masked {
                xs.f_where_self(&plan.valid, &xs.f_zeros_like()?)?
            } else {
                xs.shallow_clone()
            };
            let out = crate::runtime::fp8::grouped_mm(&xs, w, &plan.offsets, self.fp8_wgrad)?;
            return if masked {
                Ok(out.f_where_self(&plan.valid, &out.f_zeros_like()?)?)
            } else {
                Ok(out)
            };
        }
        let w = cast::compute(w, xs.kind())?;
        match self.path {
            ExpertPath::Grouped => {
                let xs = if masked {
                    xs.f_where_self(&plan.valid, &xs.f_zeros_like()?)?
                } else {
                    xs.shallow_clone()
                };
                let out = xs.f_internal_grouped_mm(
                    &w,
                    Some(&plan.offsets),
                    None::<&Tensor>,
                    None::<Kind>,
                )?;
                if masked {
                    Ok(out.f_where_self(&plan.valid, &out.f_zeros_like()?)?)
                } else {
                    Ok(out)
                }
            }
            ExpertPath::Loop => {
                let counts = Vec::<i64>::try_from(&plan.counts)?;
                let (n, _) = xs.size2()?;
                let out_dim = w.size()[2];
                let mut parts = Vec::with_capacity(counts.len() + 1);
                let mut start = 0;
                for (e, &c) in counts.iter().enumerate() {
                    parts.push(
                        xs.f_narrow(0, start, c)?
                            .f_matmul(&w.f_select(0, e as i64)?)?,
                    );
                    start += c;
                }
                parts.push(Tensor::f_zeros(
                    [n - start, out_dim],
                    (xs.kind(), xs.device()),
                )?);
                Ok(Tensor::f_cat(&parts, 0)?)
            }
        }
    }

    fn row_bias(
        &self,
        b: &Option<Tensor>,
        plan: &DispatchPlan,
        kind: Kind,
    ) -> Result<Option<Tensor>> {
        match b {
            None => Ok(None),
            Some(b) => {
                let idx = plan.expert.f_clamp_max(self.experts - 1)?;
                // Rows of the master, cast after the gather, so that the backward sums each
                // expert's row gradients in f32. From a bf16 copy libtorch sums them in bf16
                // over all the call's rows: on a rank of an expert group every rank's rows
                // of the expert, where a run alone sums one micro-batch's and adds in f32.
                Ok(Some(b.f_index_select(0, &idx)?.f_to_kind(kind)?))
            }
        }
    }

    /// `act(h + the bias of each row's expert)` (no activation for `None`): the fused
    /// epilogue when `fused` (one pass, per-expert column sums backward), else libtorch
    /// (also GELU without a bias: kernels of our own measured no faster than libtorch's,
    /// BENCHMARKS.md session 5).
    fn bias_then(
        &self,
        h: Tensor,
        b: &Option<Tensor>,
        plan: &DispatchPlan,
        act: Option<Activation>,
        fused: bool,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (true, Some(b)) = (fused, b) {
            use crate::runtime::cuda::{bias_act_op, EpilogueAct};
            let code = match act {
                None => Some(EpilogueAct::None),
                Some(Activation::Gelu) => Some(EpilogueAct::Gelu),
                Some(Activation::Relu) => Some(EpilogueAct::Relu),
                Some(Activation::Swiglu) => None,
            };
            if let Some(code) = code {
                return bias_act_op(&h, &cast::compute(b, h.kind())?, &plan.expert, code);
            }
        }
        let _ = fused;
        let mut h = h;
        if let Some(b) = self.row_bias(b, plan, h.kind())? {
            h = h.f_add(&b)?;
        }
        match act {
            Some(a) => activate(&h, a),
            None => Ok(h),
        }
    }

    /// The activation whose FP8 pass runs between the expert matmuls (it writes the second
    /// matmul's FP8 rows), if the experts take one: FP8, grouped and fused, no first bias.
    #[cfg(feature = "cuda")]
    fn fp8_activation(
        &self,
        with_h3: bool,
        plan: &DispatchPlan,
    ) -> Option<crate::runtime::fp8::Fp8Act> {
        use crate::runtime::fp8::Fp8Act;
        if !(self.fp8 && self.path == ExpertPath::Grouped && plan.fused && self.b1.is_none()) {
            return None;
        }
        match (self.act, with_h3) {
            (Activation::Swiglu, true) => Some(Fp8Act::Swiglu),
            (Activation::Gelu, false) => Some(Fp8Act::Gelu),
            (Activation::Relu, false) => Some(Fp8Act::Relu),
            _ => None,
        }
    }

    /// The hidden activation of the first matmul's output `h` (SwiGLU: with the third
    /// matrix's `h3`), the first bias included: fused kernels where the plan allows them.
    pub fn activation(&self, h: Tensor, h3: Option<Tensor>, plan: &DispatchPlan) -> Result<Tensor> {
        let fused = self.path == ExpertPath::Grouped && plan.fused;
        #[cfg(feature = "cuda")]
        if let Some(act) = self.fp8_activation(h3.is_some(), plan) {
            // the activation's pass writes the FP8 rows of the second matmul's input
            return crate::runtime::fp8::activation(
                &h,
                h3.as_ref(),
                act,
                &plan.offsets,
                self.fp8_wgrad,
            );
        }
        match h3 {
            Some(h3) => {
                let h1 = self.bias_then(h, &self.b1, plan, None, fused)?;
                #[cfg(feature = "cuda")]
                if plan.fused {
                    return crate::runtime::cuda::swiglu_op(&h1, &h3);
                }
                Ok(h1.f_silu()?.f_mul(&h3)?)
            }
            None => self.bias_then(h, &self.b1, plan, Some(self.act), fused),
        }
    }

    /// Runs every row of `xs` (in expert order, as [`dispatch`] makes it) through its expert.
    ///
    /// Rows past the last group (dropped slots) are left uninitialised by `_grouped_mm`,
    /// forward (its output) and backward (its input's gradient). Nothing reads them without
    /// biases: `combine` skips dropped rows forward, and `dispatch`'s backward skips (fused)
    /// or masks (libtorch) them. The fused bias epilogue writes zeros there (loading those
    /// rows with the rest but not using them) and sums each expert's own rows only; a
    /// libtorch bias gathered for those rows would collect that memory into its gradient,
    /// so there the matmuls are masked on both sides.
    pub fn forward(&self, xs: &Tensor, plan: &DispatchPlan) -> Result<Tensor> {
        let fused = self.path == ExpertPath::Grouped && plan.fused;
        let masked = !fused && plan.may_drop && (self.b1.is_some() || self.b2.is_some());
        let h = self.mm(xs, &self.w1, plan, masked)?;
        let h3 = match (&self.act, &self.w3) {
            (Activation::Swiglu, Some(w3)) => Some(self.mm(xs, w3, plan, masked)?),
            _ => None,
        };
        #[cfg(feature = "cuda")]
        if let Some(act) = self.fp8_activation(h3.is_some(), plan) {
            use crate::runtime::fp8::{activation_mm, fuses_activation};
            if fuses_activation() {
                // the activation's output is never written in bf16 nor kept for the backward
                let y = activation_mm(
                    &h,
                    h3.as_ref(),
                    act,
                    &self.w2,
                    &plan.offsets,
                    self.fp8_wgrad,
                )?;
                return self.bias_then(y, &self.b2, plan, None, fused);
            }
        }
        let h = self.activation(h, h3, plan)?;
        let y = self.mm(&h, &self.w2, plan, masked)?;
        self.bias_then(y, &self.b2, plan, None, fused)
    }
}

/// GELU (erf form) or ReLU; SwiGLU is handled where its third matrix is.
pub fn activate(h: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Gelu => h.f_gelu("none")?,
        Activation::Relu => h.f_relu()?,
        Activation::Swiglu => h.f_silu()?,
    })
}

/// A dense MLP (`w1 [d, h]`, `w2 [h, d]`, SwiGLU's `w3 [d, h]`), also used for shared experts.
pub struct DenseMlp {
    pub act: Activation,
    pub w1: Tensor,
    pub w2: Tensor,
    pub w3: Option<Tensor>,
    pub b1: Option<Tensor>,
    pub b2: Option<Tensor>,
    /// The projections with FP8 operands (`fp8_dense`; see [`project`]).
    pub fp8: bool,
}

impl DenseMlp {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        width: i64,
        hidden: i64,
        act: Activation,
        bias: bool,
        out_std: f64,
    ) -> Result<DenseMlp> {
        let w1 = store.var(
            &format!("{prefix}.w1"),
            &[width, hidden],
            Init::Normal(0.02),
            true,
        )?;
        let w3 = if act == Activation::Swiglu {
            Some(store.var(
                &format!("{prefix}.w3"),
                &[width, hidden],
                Init::Normal(0.02),
                true,
            )?)
        } else {
            None
        };
        let w2 = store.var(
            &format!("{prefix}.w2"),
            &[hidden, width],
            Init::Normal(out_std),
            true,
        )?;
        let (b1, b2) = if bias {
            (
                Some(store.var(&format!("{prefix}.b1"), &[hidden], Init::Zeros, false)?),
                Some(store.var(&format!("{prefix}.b2"), &[width], Init::Zeros, false)?),
            )
        } else {
            (None, None)
        };
        Ok(DenseMlp {
            act,
            w1,
            w2,
            w3,
            b1,
            b2,
            fp8: false,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.hidden(x)?;
        project(&h, &self.w2, self.b2.as_ref(), self.fp8)
    }

    /// The activation of the hidden layer (`act(x · w1 + b1)`, SwiGLU with `x · w3`).
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let h = project(x, &self.w1, self.b1.as_ref(), self.fp8)?;
        match &self.w3 {
            Some(w3) => Ok(h.f_silu()?.f_mul(&project(x, w3, None, self.fp8)?)?),
            None => activate(&h, self.act),
        }
    }
}

/// `x · w (+ b)` as [`linear`], with FP8 operands when `fp8` (feature `cuda`; both widths
/// multiples of 16, else in the compute dtype as [`linear`]).
pub fn project(x: &Tensor, w: &Tensor, b: Option<&Tensor>, fp8: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fp8 {
        use crate::runtime::fp8::{linear as fp8_linear, linear_applies, WeightLayout};
        if let [k, n] = w.size().as_slice() {
            if linear_applies(*k, *n) {
                return fp8_linear(x, w, b, WeightLayout::InOut);
            }
        }
    }
    let _ = fp8;
    linear(x, w, b)
}

/// `x · w (+ b)` in `x`'s dtype over the last dimension (`w` is `[in, out]`). With a bias it
/// is one `addmm` on the 2-D view, which libtorch runs with the bias in cuBLASLt's epilogue
/// on a GPU instead of a separate broadcast add. On a GPU with the cast copies handed out
/// (`runtime::cast`), the same forward through `runtime::cuda::linear`'s op, whose backward
/// accumulates the weight and bias gradients straight into the f32 masters
/// (`FMOEC_FUSED_LINEAR=0` keeps the cast op).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = fused_linear(x, w, b)? {
        return Ok(out);
    }
    let kind = x.kind();
    let w = cast::compute(w, kind)?;
    let Some(b) = b else {
        return Ok(x.f_matmul(&w)?);
    };
    let mut shape = x.size();
    let Some(last) = shape.last_mut() else {
        bail!("linear: a scalar input");
    };
    let x2 = x.f_reshape([-1, *last])?;
    *last = w.size()[1];
    Ok(cast::compute(b, kind)?.f_addmm(&x2, &w)?.f_reshape(shape)?)
}

/// [`linear`] as `runtime::cuda::linear`'s op where it applies: `x` on a GPU, the switch on,
/// and the cast copies of `w` (and of `b`) handed out; otherwise none.
#[cfg(feature = "cuda")]
fn fused_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    use crate::runtime::cuda::linear::{linear_op, switched_off};
    if !x.device().is_cuda() || switched_off() {
        return Ok(None);
    }
    let kind = x.kind();
    let Some(w_copy) = cast::cached(w, kind)? else {
        return Ok(None);
    };
    let b_copy = match b {
        Some(b) => match cast::cached(b, kind)? {
            Some(copy) => Some(copy),
            None => return Ok(None),
        },
        None => None,
    };
    let bias = b.zip(b_copy.as_ref());
    Ok(Some(linear_op(x, w, &w_copy, bias)?))
}

/// One MoE feed-forward layer: gate, routed experts and optional shared experts.
pub struct MoeLayer {
    pub gate: Gate,
    pub experts: Experts,
    /// DeepSeek-MoE shared experts, as one MLP of `count · hidden` (the sum of `count` MLPs).
    pub shared: Option<DenseMlp>,
}

/// The output of [`MoeLayer::forward`].
pub struct MoeOutput {
    /// `[T, d]`.
    pub out: Tensor,
    pub balance_loss: Tensor,
    pub telemetry: Telemetry,
}

impl MoeLayer {
    /// Registers the layer's parameters under `prefix` (`layers.3.ffn`): `gate.*`,
    /// `experts.{w1,w2,w3,b1,b2}`, `shared.*`.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        moe: &Moe,
        width: i64,
        bias: bool,
        out_std: f64,
    ) -> Result<MoeLayer> {
        let gate = Gate::new(store, &format!("{prefix}.gate"), moe, width, bias)?;
        let experts = Experts::new(
            store,
            &format!("{prefix}.experts"),
            moe.experts as i64,
            width,
            moe.expert.hidden as i64,
            moe.expert.act,
            bias,
            out_std,
        )?;
        let shared = match &moe.shared {
            Some(s) => Some(DenseMlp::new(
                store,
                &format!("{prefix}.shared"),
                width,
                (s.count * s.expert.hidden) as i64,
                s.expert.act,
                bias,
                out_std,
            )?),
            None => None,
        };
        Ok(MoeLayer {
            gate,
            experts,
            shared,
        })
    }

    /// `x`: `[T, d]` (tokens flattened); `key`: the gate's draw key (see [`Gate::route`]).
    /// The output does not include the residual.
    pub fn forward(&self, x: &Tensor, train: bool, key: Option<&Tensor>) -> Result<MoeOutput> {
        let draws = self.gate.draws(x, train, key)?;
        self.forward_with_draws(x, train, draws.as_ref())
    }

    /// [`MoeLayer::forward`] with the gate's random draws given (see [`Gate::draws`]).
    pub fn forward_with_draws(
        &self,
        x: &Tensor,
        train: bool,
        draws: Option<&Tensor>,
    ) -> Result<MoeOutput> {
        let (t, _d) = x.size2()?;
        let routing = self.gate.route_with_draws(x, train, draws)?;
        let plan = DispatchPlan::new(
            &routing.expert,
            self.gate.experts,
            self.gate.may_drop(train),
        )?;
        // (an expert-parallel runtime exchanges the dispatched rows by `plan.counts` between
        // the dispatch and the experts, and sends the outputs back before the combine)
        let mut out = run_experts(&self.experts, x, &plan, &routing.weight, t)?;
        if let Some(shared) = &self.shared {
            out = out.f_add(&shared.forward(x)?)?;
        }
        let telemetry = tch::no_grad(|| telemetry(&routing, &plan.counts, t))?;
        Ok(MoeOutput {
            out,
            balance_loss: routing.balance_loss,
            telemetry,
        })
    }
}

impl MoeLayer {
    /// [`dispatch_to`] this layer's experts.
    pub fn dispatch(&self, x: &Tensor, plan: &DispatchPlan) -> Result<Tensor> {
        dispatch_to(&self.experts, x, plan)
    }
}

/// [`dispatch`] for `experts`, writing the rows' FP8 copy in the same pass when they take FP8
/// operands and the fused kernels run (then call `runtime::fp8::forget_prequantized` once
/// they have run).
pub fn dispatch_to(experts: &Experts, x: &Tensor, plan: &DispatchPlan) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if experts.fp8 && experts.path == ExpertPath::Grouped && plan.fused {
        return crate::runtime::fp8::dispatch(
            x,
            &plan.row_slot,
            &plan.slot_row,
            plan.top_k,
            &plan.offsets,
            experts.fp8_wgrad,
        );
    }
    let _ = experts;
    dispatch(x, plan)
}

/// The weighted [`combine`] of `experts`' outputs: with FP8 operands, no second bias and the
/// fused kernels, the combine whose backward writes the FP8 rows of the experts' output
/// gradient (`runtime::fp8::combine`).
pub fn combine_from(
    experts: &Experts,
    ys: &Tensor,
    plan: &DispatchPlan,
    weight: &Tensor,
    tokens: i64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if experts.fp8
        && experts.path == ExpertPath::Grouped
        && experts.b2.is_none()
        && plan.fused
        && weight.kind() == Kind::Float
    {
        return crate::runtime::fp8::combine(
            ys,
            weight,
            &plan.slot_row,
            &plan.row_slot,
            &plan.offsets,
            experts.fp8_wgrad,
        );
    }
    let _ = experts;
    combine(ys, plan, weight, tokens)
}

/// `x` (`[T, d]`) through `experts` as `plan` routes it, combined with `weight` (`[T, k]`)
/// onto `tokens` rows: [`dispatch_to`], the experts, [`combine_from`] (the FP8 copies written
/// on the way are dropped once the experts have run).
pub fn run_experts(
    experts: &Experts,
    x: &Tensor,
    plan: &DispatchPlan,
    weight: &Tensor,
    tokens: i64,
) -> Result<Tensor> {
    let xs = dispatch_to(experts, x, plan)?;
    let ys = experts.forward(&xs, plan);
    #[cfg(feature = "cuda")]
    crate::runtime::fp8::forget_prequantized();
    combine_from(experts, &ys?, plan, weight, tokens)
}

/// A layer's routing statistics for `tokens` tokens, from the tokens each expert kept
/// (`counts`, `[E]`, any numeric kind; `DispatchPlan::counts` on one rank).
pub fn telemetry(routing: &Routing, counts: &Tensor, tokens: i64) -> Result<Telemetry> {
    let counts = counts.f_to_kind(Kind::Float)?;
    let slots = (tokens * routing.expert.size()[1]) as f64;
    let kept = counts.f_sum(Kind::Float)?;
    let dropped = kept.f_div_scalar(-slots)?.f_add_scalar(1.0)?;
    let p = &routing.probs;
    let entropy = p
        .f_mul(&p.f_clamp_min(1e-30)?.f_log()?)?
        .f_sum_dim_intlist(1, false, Kind::Float)?
        .f_neg()?
        .f_mean(Kind::Float)?;
    Ok(Telemetry {
        shadowed: None,
        tokens_per_expert: counts,
        dropped_fraction: dropped,
        gate_entropy: entropy,
        balance_loss: routing.balance_loss.f_detach()?.f_to_kind(Kind::Float)?,
    })
}

// ---- The layer's experts across an expert group (the collective exchange) -------------------

/// This rank's routed experts as the collective exchange runs them
/// ([`crate::collective::exchange_experts_with`]): rows grouped by local expert, and, for
/// FasterMoE's shadowing, their stacked parameters (`w1`, `w2`, then `w3`, `b1`, `b2` where
/// they exist) and a forward on replicas of them.
pub struct RankExperts<'a>(pub &'a Experts);

impl RankExperts<'_> {
    fn run(experts: &Experts, rows: &Tensor, counts: &[i64]) -> Result<Tensor> {
        let (n, width) = rows.size2()?;
        let device = rows.device();
        if n == 0 || counts.is_empty() {
            return Ok(Tensor::f_zeros([n, width], (rows.kind(), device))?);
        }
        let counts = Tensor::f_from_slice(counts)?.f_to_device(device)?;
        let plan = DispatchPlan::grouped(&counts, n)?;
        experts.forward(rows, &plan)
    }
}

fn tch_error(e: anyhow::Error) -> tch::TchError {
    tch::TchError::Torch(format!("{e:#}"))
}

impl crate::collective::LocalExperts for RankExperts<'_> {
    fn forward(&self, rows: &Tensor, counts: &[i64]) -> Result<Tensor, tch::TchError> {
        RankExperts::run(self.0, rows, counts).map_err(tch_error)
    }

    fn parameters(&self) -> Vec<Tensor> {
        let e = self.0;
        [
            Some(&e.w1),
            Some(&e.w2),
            e.w3.as_ref(),
            e.b1.as_ref(),
            e.b2.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(Tensor::shallow_clone)
        .collect()
    }

    fn forward_with(
        &self,
        params: &[Tensor],
        rows: &Tensor,
        counts: &[i64],
    ) -> Result<Tensor, tch::TchError> {
        let e = self.0;
        let mut next = params.iter().map(Tensor::shallow_clone);
        let mut take = |present: bool| if present { next.next() } else { None };
        let (Some(w1), Some(w2)) = (take(true), take(true)) else {
            return Err(tch::TchError::Torch(
                "replicated experts need w1 and w2".into(),
            ));
        };
        let replicas = Experts {
            experts: params.first().map_or(0, |p| p.size()[0]),
            act: e.act,
            w1,
            w2,
            w3: take(e.w3.is_some()),
            b1: take(e.b1.is_some()),
            b2: take(e.b2.is_some()),
            path: e.path,
            // FP8 copies of weights are cached per step by their address: replicas are
            // fresh tensors every exchange, so they run in the compute dtype.
            fp8: false,
            fp8_wgrad: true,
        };
        RankExperts::run(&replicas, rows, counts).map_err(tch_error)
    }
}

/// FasterMoE's dynamic shadowing decided with the planner's costs of one MoE layer
/// ([`crate::plan::fastermoe::choose_shadows`]): what `fmoec plan` assumes, decided on the
/// counts of each exchange.
pub struct PlannedShadowing(pub crate::plan::fastermoe::ExchangeCosts);

impl crate::collective::ShadowPolicy for PlannedShadowing {
    fn choose(&self, rows: &[Vec<i64>], owner: &[usize]) -> Vec<usize> {
        let rows: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| r.iter().map(|&c| c as f64).collect())
            .collect();
        crate::plan::fastermoe::choose_shadows(
            &crate::plan::fastermoe::GroupRows { rows: &rows, owner },
            &self.0,
        )
    }
}

/// How one MoE layer's exchange runs under the plan's FasterMoE section: its chunks and,
/// with `shadowing = dynamic`, the policy that picks the replicas.
pub struct LayerSchedule {
    chunks: usize,
    shadowing: Option<PlannedShadowing>,
}

impl LayerSchedule {
    /// MoE layer `layer` (block index) under `plan` (`None`: FastMoE's plain exchange).
    pub fn of(plan: Option<&crate::plan::FasterMoePlan>, layer: usize) -> LayerSchedule {
        let planned = plan.and_then(|p| p.layers.iter().find(|x| x.layer == layer).map(|x| (p, x)));
        match planned {
            None => LayerSchedule {
                chunks: 1,
                shadowing: None,
            },
            Some((p, x)) => LayerSchedule {
                chunks: x.chunks.max(1) as usize,
                shadowing: (p.shadowing == crate::check::Shadowing::Dynamic)
                    .then_some(PlannedShadowing(x.costs)),
            },
        }
    }

    /// The exchange's options.
    pub fn options(&self) -> crate::collective::ExchangeOptions<'_> {
        crate::collective::ExchangeOptions {
            chunks: self.chunks,
            shadowing: self
                .shadowing
                .as_ref()
                .map(|s| s as &dyn crate::collective::ShadowPolicy),
        }
    }

    /// The `[E]` f32 indicator of the experts `exchange` replicated, on `device`, for the
    /// telemetry (`None` without shadowing).
    pub fn shadowed(
        &self,
        exchange: &crate::collective::ExchangeTape,
        experts: i64,
        device: tch::Device,
    ) -> Result<Option<Tensor>> {
        if self.shadowing.is_none() {
            return Ok(None);
        }
        let mut flags = vec![0f32; experts.max(0) as usize];
        for &e in exchange.shadowed() {
            if let Some(f) = flags.get_mut(e) {
                *f = 1.0;
            }
        }
        Ok(Some(Tensor::f_from_slice(&flags)?.f_to_device(device)?))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::linear;
    use crate::runtime::cuda::linear::linear_op;

    /// A master `[shape]` in f32 requiring grad, with `.grad` already holding `preset` when
    /// given (as after an earlier micro-batch or a zeroed step).
    fn master(values: &Tensor, preset: Option<&Tensor>) -> Tensor {
        let m = values.detach().set_requires_grad(true);
        if let Some(p) = preset {
            m.multiply(p).sum(Kind::Float).backward();
        }
        m
    }

    /// The fused linear's CPU path (f64 compute standing in for bf16 on f32 masters, `mm` and
    /// `add_` standing in for the dtype-out GEMM) gives the output and the gradients of plain
    /// autograd through [`linear`] (no cast copies: `to_kind` and `addmm`): with and without
    /// a bias, 2-D and 3-D inputs, with and without a `.grad` on the masters before the first
    /// of two micro-batches; the second accumulates into the same `.grad`.
    #[test]
    fn fused_linear_gives_the_gradients_of_linear() {
        tch::manual_seed(17);
        let f32_cpu = (Kind::Float, Device::Cpu);
        let f64_cpu = (Kind::Double, Device::Cpu);
        let (k, n) = (5i64, 7i64);
        for shape in [vec![6i64, k], vec![2, 3, k]] {
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = n;
            for with_bias in [false, true] {
                for preset in [false, true] {
                    let case = format!("x {shape:?}, bias {with_bias}, preset .grad {preset}");
                    let (w0, b0) = (Tensor::randn([k, n], f32_cpu), Tensor::randn([n], f32_cpu));
                    let (pw, pb) = (Tensor::randn([k, n], f32_cpu), Tensor::randn([n], f32_cpu));
                    let (pw, pb) = (preset.then_some(&pw), preset.then_some(&pb));
                    // fused: the masters and their copies; plain: masters of their own
                    let (w, b) = (master(&w0, pw), master(&b0, pb));
                    let (w_plain, b_plain) = (master(&w0, pw), master(&b0, pb));
                    let w_copy = w.detach().to_kind(Kind::Double);
                    let b_copy = b.detach().to_kind(Kind::Double);
                    let mut grad_at = preset.then(|| w.grad().data_ptr() as usize);
                    for mb in 0..2 {
                        let x0 = Tensor::randn(shape.as_slice(), f64_cpu);
                        let g = Tensor::randn(out_shape.as_slice(), f64_cpu);
                        let x = x0.detach().set_requires_grad(true);
                        let x_plain = x0.detach().set_requires_grad(true);
                        let bias = with_bias.then_some((&b, &b_copy));
                        let got = linear_op(&x, &w, &w_copy, bias).unwrap();
                        let want =
                            linear(&x_plain, &w_plain, with_bias.then_some(&b_plain)).unwrap();
                        assert_eq!(got.size(), out_shape, "{case}");
                        assert!(got.allclose(&want, 1e-12, 1e-12, false), "{case}");
                        got.multiply(&g).sum(Kind::Double).backward();
                        want.multiply(&g).sum(Kind::Double).backward();
                        let close = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-6, 1e-6, false);
                        assert!(close(&x.grad(), &x_plain.grad()), "{case}: dx, mb {mb}");
                        assert_eq!(w.grad().kind(), Kind::Float, "{case}");
                        assert!(close(&w.grad(), &w_plain.grad()), "{case}: dw, mb {mb}");
                        if with_bias {
                            assert_eq!(b.grad().kind(), Kind::Float, "{case}");
                            assert!(close(&b.grad(), &b_plain.grad()), "{case}: db, mb {mb}");
                        } else if let Some(pb) = pb {
                            assert!(b.grad().equal(pb), "{case}: an unused bias's .grad");
                        } else {
                            assert!(!b.grad().defined(), "{case}: an unused bias's .grad");
                        }
                        // every micro-batch after the master has a .grad adds into it in place
                        let at = w.grad().data_ptr() as usize;
                        if let Some(before) = grad_at {
                            assert_eq!(at, before, "{case}: .grad replaced in mb {mb}");
                        }
                        grad_at = Some(at);
                    }
                }
            }
        }
    }
}
