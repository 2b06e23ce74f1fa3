//! `precision = fp8`: the expert matmuls (and with `fp8_dense`, the attention projections,
//! the dense MLPs and the LM head) with FP8 (e4m3) operands; bf16 everywhere else, f32
//! master weights and optimizer state as with `precision = bf16`.
//!
//! The recipe (dynamic scaling, see [`crate::runtime::cuda::quant`] for the scales):
//! - forward `y = x · W`: `x` row-wise, `W` per output column; `_scaled_grouped_mm` (experts,
//!   `W` column-major: its transposed copy) or `_scaled_mm` (dense), bf16 out, fast
//!   accumulation;
//! - input gradient `gx = g · Wᵀ`: `g` row-wise, `W` per row (its own layout);
//! - weight gradient `gW = xᵀ · g`: both transposed, scaled per column within each expert's
//!   tokens (padded to multiples of 16 tokens, as the FP8 grouped matmul needs).
//!
//! Each weight's two FP8 copies are made once per training step ([`begin_step`] rewrites
//! them in place from the masters, so a captured CUDA graph reads the new values; within
//! the step every micro-batch's forward and backward use them); outside a step (eval) they
//! are made at each use. The dispatch's gather writes the tokens' FP8 copy in the same pass
//! ([`dispatch`]). A scale whose tensor held Inf or NaN counts into a per-device counter that
//! the trainer reads once per step ([`take_overflow`]): such a step is refused, not trained on.
//!
//! On a GPU of compute capability 9.0 or later everything runs on the device; on the CPU only
//! as an emulation for tests ([`Fp8Mode::Emulated`], `FMOEC_FP8_EMULATE=1`): the same FP8
//! values and scales (the quantisation is computed with the same roundings), the products in
//! f32 and rounded to bf16 as the device's are.
//!
//! Which modules take FP8 is the planner's choice ([`crate::plan::cost::fp8_fallbacks`]);
//! [`with_overrides`] applies `FMOEC_FP8_EXPERTS` / `FMOEC_FP8_DENSE` to it.
//!
//! Knows the matmuls' operand layouts and the step protocol; not the model around them.

use anyhow::{bail, Result};
use tch::Device;

/// How the FP8 matmuls run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Mode {
    /// On a GPU with FP8 tensor cores: `_scaled_grouped_mm` and `_scaled_mm`.
    Device,
    /// The CPU reference: FP8 rounding and scales as on the device, products in f32.
    Emulated,
}

/// What runs in FP8 in a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fp8Use {
    /// The routed experts' matmuls (each MoE layer where FP8 pays, see
    /// [`crate::plan::cost::fp8_pays_for_experts`]).
    pub experts: bool,
    /// The attention projections, the dense MLPs (and shared experts) and the LM head.
    pub dense: bool,
}

pub use crate::plan::cost::Fp8Fallbacks;

/// Whether `precision = fp8` can run on `device`, and how; the error says why not (the
/// reason alone: the caller names what asked for FP8).
pub fn mode_for(device: Device) -> Result<Fp8Mode> {
    match device {
        Device::Cpu => {
            if std::env::var("FMOEC_FP8_EMULATE").is_ok_and(|v| v == "1")
                || EMULATE.with(|e| e.get())
            {
                Ok(Fp8Mode::Emulated)
            } else {
                bail!(
                    "FP8 runs on a GPU with FP8 tensor cores (Hopper, compute capability 9.0, \
                     or newer); on the CPU only as a slow emulation for the tests \
                     (FMOEC_FP8_EMULATE=1)"
                )
            }
        }
        Device::Cuda(n) => cuda_mode(n),
        other => bail!("FP8 does not run on {other:?}"),
    }
}

thread_local! {
    static EMULATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static EXPERTS_FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static DENSE_FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static ACT_ON_LOAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static WEIGHT_GRADS_FORCED: std::cell::Cell<Option<bool>> =
        const { std::cell::Cell::new(None) };
}

/// On this thread, every FP8 MoE layer's expert weight gradients on FP8 operands
/// (`Some(true)`), none (`Some(false)`), or where they pay (`None`), as
/// `FMOEC_FP8_WEIGHT_GRADS=all|none` does for the process: for tests.
pub fn force_weight_grads_on_this_thread(all: Option<bool>) {
    WEIGHT_GRADS_FORCED.with(|f| f.set(all));
}

/// On this thread, every activation between FP8 expert matmuls fused with the second matmul
/// (`Some(true)`: its output computed again on load by the weight gradient, never kept),
/// none (`Some(false)`: the output written and kept, the default), or as
/// `FMOEC_FP8_ACT_ON_LOAD` says (`None`): for the tests and checks that compare the two.
pub fn activation_on_load_on_this_thread(on: Option<bool>) {
    ACT_ON_LOAD.with(|f| f.set(on));
}

/// On this thread, every MoE layer's experts in FP8 (`Some(true)`), none (`Some(false)`), or
/// where it pays (`None`), as `FMOEC_FP8_EXPERTS=all|none` does for the process: for tests.
pub fn force_experts_on_this_thread(all: Option<bool>) {
    EXPERTS_FORCED.with(|f| f.set(all));
}

/// On this thread, every dense module's matmuls in FP8 under `fp8_dense` (`Some(true)`),
/// none (`Some(false)`), or where it pays (`None`), as `FMOEC_FP8_DENSE=all|none` does for
/// the process: for tests.
pub fn force_dense_on_this_thread(all: Option<bool>) {
    DENSE_FORCED.with(|f| f.set(all));
}

/// Lets this thread run `precision = fp8` on the CPU as the emulation (as
/// `FMOEC_FP8_EMULATE=1` does for the process): for tests, which share their process.
pub fn emulate_on_this_thread(on: bool) {
    EMULATE.with(|e| e.set(on));
}

#[cfg(feature = "cuda")]
fn cuda_mode(n: usize) -> Result<Fp8Mode> {
    let capability = crate::runtime::cuda::kernels::capability(n)
        .map_err(|e| anyhow::anyhow!("FP8 needs fmoec's FP8 kernels, which cannot run: {e:#}"))?;
    if capability < 90 {
        bail!(
            "FP8 needs FP8 tensor cores with grouped FP8 matmuls (Hopper, compute capability \
             9.0, or newer); cuda:{n} has compute capability {}.{}",
            capability / 10,
            capability % 10
        );
    }
    Ok(Fp8Mode::Device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_mode(_n: usize) -> Result<Fp8Mode> {
    bail!("FP8 on a GPU needs a build with `--features cuda`")
}

/// What a run keeps in bf16 under `precision = fp8` (`fp8`: what the precision puts on FP8
/// operands): `planned`, the planner's choice for the run's layout
/// ([`crate::plan::cost::fp8_fallbacks`]), with the overrides applied on top:
/// `FMOEC_FP8_EXPERTS=all` keeps no MoE layer's experts in bf16, `=none` every one;
/// `FMOEC_FP8_DENSE=all` no dense module (but an LM head whose widths are not multiples of 16,
/// which its FP8 linear cannot take), `=none` every block's attention projections, every dense
/// MLP and shared experts, and the head; `FMOEC_FP8_WEIGHT_GRADS=all` puts the expert weight
/// gradients of every MoE layer on FP8 operands, `=none` none; the tests' thread settings
/// likewise.
pub fn with_overrides(
    planned: &Fp8Fallbacks,
    model: &crate::check::Model,
    fp8: Fp8Use,
) -> Fp8Fallbacks {
    use crate::check::Ffn;
    let mut f = planned.clone();
    if !fp8.experts {
        f.experts.clear();
    } else if let Some(all) = forced("FMOEC_FP8_EXPERTS", &EXPERTS_FORCED) {
        f.experts = model
            .moe_layers()
            .filter(|_| !all)
            .map(|(l, _)| l)
            .collect();
    }
    if !fp8.experts {
        f.weight_gradients.clear();
    } else if let Some(all) = fp8_weight_grads_forced() {
        f.weight_gradients = model
            .moe_layers()
            .filter(|_| !all)
            .map(|(l, _)| l)
            .collect();
    }
    // only layers whose experts take FP8 have weight gradients to choose for
    f.weight_gradients.retain(|l| !f.experts.contains(l));
    if !fp8.dense {
        (f.attention, f.mlps, f.head) = (Vec::new(), Vec::new(), false);
    } else if let Some(all) = forced("FMOEC_FP8_DENSE", &DENSE_FORCED) {
        let has_mlp = |ffn: &Ffn| match ffn {
            Ffn::Dense(_) => true,
            Ffn::Moe(moe) => moe.shared.is_some(),
        };
        let blocks = model.layers.iter().filter(|_| !all);
        f.attention = blocks.clone().map(|l| l.index).collect();
        f.mlps = blocks
            .filter(|l| has_mlp(&l.ffn))
            .map(|l| l.index)
            .collect();
        // the head's FP8 linear takes widths that are multiples of 16 only (a projection's
        // falls back to bf16 by itself)
        f.head = !all || model.width % 16 != 0 || model.vocab % 16 != 0;
    }
    f
}

/// The expert weight gradients on FP8 operands in every FP8 MoE layer (`Some(true)`), in none
/// (`Some(false)`), or where they pay (`None`): `FMOEC_FP8_WEIGHT_GRADS=all|none`, else this
/// thread's setting ([`force_weight_grads_on_this_thread`]).
pub fn fp8_weight_grads_forced() -> Option<bool> {
    forced("FMOEC_FP8_WEIGHT_GRADS", &WEIGHT_GRADS_FORCED)
}

/// FP8 forced everywhere (`Some(true)`) or nowhere (`Some(false)`) by the environment
/// variable `var` (`all` or `none`), else by this thread's `local` setting (the tests'); `None`
/// where the estimate decides.
fn forced(
    var: &str,
    local: &'static std::thread::LocalKey<std::cell::Cell<Option<bool>>>,
) -> Option<bool> {
    match std::env::var(var).as_deref() {
        Ok("all") => Some(true),
        Ok("none") => Some(false),
        _ => local.with(|f| f.get()),
    }
}

#[cfg(feature = "cuda")]
pub use ops::*;

#[cfg(feature = "cuda")]
mod ops {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use anyhow::{bail, Context, Result};
    use tch::{Device, Kind, Tensor};

    use crate::runtime::cuda::autograd::{
        apply, combine_weight_gradient, dispatch_backward, master_gradient, shim_callback, Phase,
    };
    use crate::runtime::cuda::check::{rel, Checks};
    pub use crate::runtime::cuda::kernels::Fp8Act;
    pub use crate::runtime::cuda::kernels::Fp8ActGrad;
    use crate::runtime::cuda::linear::bias_gradient;
    use crate::runtime::cuda::ops::{gather_rows, sum_rows, swiglu_backward};
    use crate::runtime::cuda::quant::{
        act_grad_quant_rows, act_quant_rows, act_quant_rows_only, act_quant_transposed,
        column_maxima_reference, gather_quant_rows, overflow_counter, padded_ends,
        padded_ends_reference, quant_rows, quant_rows_with_maxima, quant_rows_with_maxima_into,
        quant_transposed, quant_transposed_into, reduce_maxima_on_this_thread,
        side_by_side_positions, swiglu_grad_quant_rows, ColumnMaxima, Fp8, MaximaReduction,
        Transposed,
    };

    /// How a master weight holds the matmul's `W` (`[K, N]`: `x · W`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum WeightLayout {
        /// `[E, K, N]`: stacked experts.
        Experts,
        /// `[K, N]`.
        InOut,
        /// `[N, K]`: `W` is the master transposed (the tied LM head, `x · embᵀ`).
        OutIn,
    }

    /// A weight's two FP8 copies.
    struct WeightCopies {
        /// The master they are made from (a handle: it keeps the address unique too).
        master: Tensor,
        layout: WeightLayout,
        /// The forward operand `[E, N, K]` (each output column's `K` values contiguous) with
        /// `[E, N]` scales, as quantised (see [`WeightCopies::forward`]).
        fwd: Fp8,
        /// The input-gradient operand `[E, K, N]` with `[E, K]` scales, as quantised.
        dgrad: Fp8,
        /// The group ends the stacked copy was made with.
        ends: Tensor,
    }

    /// `(E, K, N)` of a master in `layout`.
    fn dims(master: &Tensor, layout: WeightLayout) -> Result<(i64, i64, i64)> {
        Ok(match (layout, master.size().as_slice()) {
            (WeightLayout::Experts, &[e, k, n]) => (e, k, n),
            (WeightLayout::InOut, &[k, n]) => (1, k, n),
            (WeightLayout::OutIn, &[n, k]) => (1, k, n),
            (l, s) => bail!("FP8 weight: shape {s:?} is not {l:?}"),
        })
    }

    /// The master as the rows both FP8 copies are made from, and the length of the stacked
    /// copy's groups: stacked experts `[E·K, N]` in groups of `K` (the row copy is the input
    /// gradient's operand, the stacked one the forward's), or the tied head's `[N, K]` as one
    /// group of `N` (the row copy is the forward's operand, the stacked one the input
    /// gradient's).
    fn rows_and_len(master: &Tensor, layout: WeightLayout) -> Result<(Tensor, i64)> {
        let (e, k, n) = dims(master, layout)?;
        Ok(match layout {
            WeightLayout::Experts | WeightLayout::InOut => (master.f_reshape([e * k, n])?, k),
            WeightLayout::OutIn => (master.shallow_clone(), n),
        })
    }

    impl WeightCopies {
        /// Storage for both copies, then written as every step's [`WeightCopies::refresh`]
        /// writes it.
        fn new(master: &Tensor, layout: WeightLayout, overflow: Option<&Tensor>) -> Result<Self> {
            let (rows, len) = rows_and_len(master, layout)?;
            let (r, c) = rows.size2()?;
            let device = master.device();
            let empty = |q: &[i64], scale: &[i64]| -> Result<Fp8> {
                Ok(Fp8 {
                    q: Tensor::f_empty(q, (Kind::Float8e4m3fn, device))?,
                    scale: Tensor::f_empty(scale, (Kind::Float, device))?,
                })
            };
            let row_copy = empty(&[r, c], &[r])?;
            let stacked = empty(&[r / len, c, len], &[r / len, c])?;
            let (fwd, dgrad) = match layout {
                WeightLayout::OutIn => (row_copy, stacked),
                WeightLayout::Experts | WeightLayout::InOut => (stacked, row_copy),
            };
            let copies = WeightCopies {
                master: master.shallow_clone(),
                layout,
                fwd,
                dgrad,
                ends: Tensor::f_arange_start_step(len, r + 1, len, (Kind::Int, device))?,
            };
            copies.refresh(overflow)?;
            Ok(copies)
        }

        /// Another handle on the same tensors.
        fn shallow_clone(&self) -> WeightCopies {
            WeightCopies {
                master: self.master.shallow_clone(),
                layout: self.layout,
                fwd: self.fwd.shallow_clone(),
                dgrad: self.dgrad.shallow_clone(),
                ends: self.ends.shallow_clone(),
            }
        }

        /// Rewrites both copies in place from the master.
        fn refresh(&self, overflow: Option<&Tensor>) -> Result<()> {
            let _guard = tch::no_grad_guard();
            let (rows, len) = rows_and_len(&self.master, self.layout)?;
            let (row_copy, stacked) = match self.layout {
                WeightLayout::OutIn => (&self.fwd, &self.dgrad),
                WeightLayout::Experts | WeightLayout::InOut => (&self.dgrad, &self.fwd),
            };
            let maxima = quant_rows_with_maxima_into(&rows, None, overflow, &self.ends, row_copy)?;
            quant_transposed_into(
                &rows,
                &self.ends,
                &self.ends,
                Transposed::Stacked { len },
                overflow,
                maxima.as_ref(),
                stacked,
            )
        }

        /// The forward operand: `[E, N, K]` e4m3 and `[E, N]` scales.
        fn forward(&self) -> Result<Fp8> {
            let (e, k, n) = dims(&self.master, self.layout)?;
            Ok(Fp8 {
                q: self.fwd.q.f_reshape([e, n, k])?,
                scale: self.fwd.scale.f_reshape([e, n])?,
            })
        }

        /// The input-gradient operand: `[E, K, N]` e4m3 and `[E, K]` scales.
        fn dgrad(&self) -> Result<Fp8> {
            let (e, k, n) = dims(&self.master, self.layout)?;
            Ok(Fp8 {
                q: self.dgrad.q.f_reshape([e, k, n])?,
                scale: self.dgrad.scale.f_reshape([e, k])?,
            })
        }
    }

    type WeightKey = (usize, Vec<i64>, WeightLayout);

    /// The FP8 state of one thread's CPU work (in-process ranks are threads, each with its
    /// own model) or of the GPU ([`GPU_STATE`]).
    #[derive(Default)]
    struct State {
        /// Within a training step: weight copies are cached.
        in_step: bool,
        weights: HashMap<WeightKey, WeightCopies>,
        /// Per device: how many scaling groups had a non-finite amax (int32 `[1]`).
        overflow: Vec<(Device, Tensor)>,
        /// FP8 row copies that the pass making a tensor wrote beside it (the tensor itself
        /// kept, so its address stays unique while the copy is here): the dispatch's `xs`
        /// and the activation's output until the experts have run; the combine's backward's
        /// gradient rows until the second matmul's backward takes them.
        prequantized: Vec<(Tensor, Fp8)>,
        /// How many matmuls took a copy from `prequantized` (for the tests).
        prequantized_used: u64,
        /// What the passes over an expert matmul's operand left for its weight gradient
        /// (see [`OperandExtras`]).
        extras: Vec<OperandExtras>,
        /// For the activation fused with the second matmul ([`activation_mm`]): the column
        /// maxima of the activation's output that its forward pass raised, kept by the
        /// activation's input (the output itself is not kept) until the backward's transposed
        /// copy of the output takes them.
        act_maxima: Vec<(Tensor, ColumnMaxima)>,
        /// How many weight gradients took column maxima from a pass before them (for the
        /// tests).
        maxima_used: u64,
        /// How many times a weight's FP8 copies were made (for the checks).
        copies_made: u64,
    }

    /// For a tensor that expert matmuls take (`xs`, the activation's output, their output
    /// gradients): the column maxima of its expert groups that the pass making it raised,
    /// and its transposed FP8 copy once a weight gradient made it, kept for the next weight
    /// gradient of the same tensor (SwiGLU's two first matmuls share `xs`). Dropped when
    /// the last of `uses` weight gradients has run (or at the next step).
    struct OperandExtras {
        /// The tensor (a handle: it keeps the address unique while the entry lives).
        tensor: Tensor,
        maxima: Option<ColumnMaxima>,
        /// The side-by-side copy and its padded ends.
        transposed: Option<(Fp8, Tensor)>,
        /// Weight gradients still to run on the tensor.
        uses: u32,
    }

    fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
        a.data_ptr() == b.data_ptr()
            && a.size() == b.size()
            && a.stride() == b.stride()
            && a.kind() == b.kind()
    }

    thread_local! {
        static STATE: RefCell<State> = RefCell::new(State::default());
    }

    /// The state of the GPU's work: libtorch runs the backward of GPU ops on its autograd
    /// engine's device thread, not the thread that ran the forward, so the copies, counters
    /// and pass copies of a GPU run live here, shared by both (one GPU per process; the
    /// in-process ranks of the tests run on the CPU, each thread with its own state).
    static GPU_STATE: std::sync::LazyLock<std::sync::Mutex<State>> =
        std::sync::LazyLock::new(|| std::sync::Mutex::new(State::default()));

    /// `f` on the state of work on `device` (the GPU's, or this thread's on the CPU). `f` must
    /// not reach the state again.
    fn with_state<R>(device: Device, f: impl FnOnce(&mut State) -> R) -> R {
        if device.is_cuda() {
            let mut s = GPU_STATE.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s)
        } else {
            STATE.with(|s| f(&mut s.borrow_mut()))
        }
    }

    /// `f` on this thread's state and on the GPU's.
    fn each_state<R>(mut f: impl FnMut(&mut State) -> Result<R>) -> Result<(R, R)> {
        let cpu = STATE.with(|s| f(&mut s.borrow_mut()))?;
        let gpu = f(&mut GPU_STATE.lock().unwrap_or_else(|e| e.into_inner()))?;
        Ok((cpu, gpu))
    }

    /// The overflow counter on `device` (made on first use).
    fn overflow(device: Device) -> Result<Tensor> {
        with_state(device, |s| s.counter(device))
    }

    impl State {
        fn counter(&mut self, device: Device) -> Result<Tensor> {
            if let Some((_, t)) = self.overflow.iter().find(|(d, _)| *d == device) {
                return Ok(t.shallow_clone());
            }
            let t = overflow_counter(device)?;
            self.overflow.push((device, t.shallow_clone()));
            Ok(t)
        }
    }

    /// Starts a training step (on this thread's CPU work and on the GPU): every cached
    /// weight copy is rewritten in place from its master (which the optimizer has changed),
    /// the overflow counters are zeroed, and weights quantised from now on are cached until
    /// [`end_step`].
    pub fn begin_step() -> Result<()> {
        each_state(|s| -> Result<()> {
            s.in_step = true;
            s.prequantized.clear();
            s.extras.clear();
            s.act_maxima.clear();
            let devices: Vec<Device> = s.weights.values().map(|w| w.master.device()).collect();
            for d in devices {
                let _ = s.counter(d)?;
            }
            let _guard = tch::no_grad_guard();
            for (_, counter) in &s.overflow {
                let _ = counter.shallow_clone().f_zero_()?;
            }
            for w in s.weights.values() {
                let o = s
                    .overflow
                    .iter()
                    .find(|(d, _)| *d == w.master.device())
                    .map(|(_, t)| t);
                w.refresh(o)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Ends the step (call before the masters change): the copies are kept but not used
    /// until the next [`begin_step`] has refreshed them.
    pub fn end_step() {
        let _ = each_state(|s| -> Result<()> {
            s.in_step = false;
            Ok(())
        });
    }

    /// Drops the copies and counters (this thread's and the GPU's).
    pub fn clear() {
        let _ = each_state(|s| -> Result<()> {
            *s = State::default();
            Ok(())
        });
    }

    /// How many scaling groups on `device` had a non-finite amax since the last call (or
    /// [`begin_step`]), and zeroes the count. Reads the device (a host synchronisation).
    pub fn take_overflow(device: Device) -> Result<i64> {
        let counter = with_state(device, |s| {
            s.overflow
                .iter()
                .find(|(d, _)| *d == device)
                .map(|(_, t)| t.shallow_clone())
        });
        let Some(counter) = counter else {
            return Ok(0);
        };
        let n = counter.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        let _ = counter.shallow_clone().f_zero_()?;
        Ok(n)
    }

    /// The FP8 copies of `master` (in `layout`): this step's, or made now outside a step.
    fn weight_copies<R>(
        master: &Tensor,
        layout: WeightLayout,
        f: impl FnOnce(&WeightCopies) -> Result<R>,
    ) -> Result<R> {
        let device = master.device();
        let o = overflow(device)?;
        let key = (master.data_ptr() as usize, master.size(), layout);
        let (cached, in_step) = with_state(device, |s| {
            let cached = match (s.in_step, s.weights.get(&key)) {
                (true, Some(w)) => Some(w.shallow_clone()),
                _ => None,
            };
            (cached, s.in_step)
        });
        if let Some(w) = cached {
            return f(&w);
        }
        let copies = WeightCopies::new(master, layout, Some(&o))?;
        with_state(device, |s| s.copies_made += 1);
        if !in_step {
            return f(&copies);
        }
        let r = f(&copies)?;
        with_state(device, |s| s.weights.insert(key, copies));
        Ok(r)
    }

    /// Keeps `q`, the FP8 rows of `t` written by the pass that made `t`.
    fn remember_prequantized(t: &Tensor, q: Fp8) {
        with_state(t.device(), |s| s.prequantized.push((t.shallow_clone(), q)));
    }

    /// The FP8 copy the pass that made `xs` wrote, if it did; `take` forgets it.
    fn prequantized(xs: &Tensor, take: bool) -> Option<Fp8> {
        with_state(xs.device(), |s| {
            let at = s.prequantized.iter().position(|(t, _)| {
                t.data_ptr() == xs.data_ptr()
                    && t.size() == xs.size()
                    && t.stride() == xs.stride()
                    && t.kind() == xs.kind()
            })?;
            s.prequantized_used += 1;
            if take {
                Some(s.prequantized.swap_remove(at).1)
            } else {
                Some(s.prequantized[at].1.shallow_clone())
            }
        })
    }

    /// Forgets the FP8 copies of the dispatch and the activation (the experts have run).
    pub fn forget_prequantized() {
        let _ = each_state(|s| -> Result<()> {
            s.prequantized.clear();
            Ok(())
        });
    }

    /// How many matmuls took an FP8 copy written by the pass before them (this thread's CPU
    /// work and the GPU's).
    pub fn prequantized_used() -> u64 {
        each_state(|s| -> Result<u64> { Ok(s.prequantized_used) })
            .map(|(cpu, gpu)| cpu + gpu)
            .unwrap_or(0)
    }

    /// Keeps the column maxima that the pass making `t` raised, for `uses` weight gradients
    /// (forward passes: 0, raised by each matmul's forward that takes `t`).
    fn remember_maxima(t: &Tensor, maxima: Option<ColumnMaxima>, uses: u32) {
        let Some(maxima) = maxima else {
            return;
        };
        with_state(t.device(), |s| {
            s.extras.push(OperandExtras {
                tensor: t.shallow_clone(),
                maxima: Some(maxima),
                transposed: None,
                uses,
            })
        });
    }

    /// Whether column maxima or a transposed copy are kept for `t` (an earlier matmul of
    /// this forward took it).
    fn has_extras(t: &Tensor) -> bool {
        with_state(t.device(), |s| {
            s.extras.iter().any(|e| same_tensor(&e.tensor, t))
        })
    }

    /// Forgets what was kept for `t` (its pass ran without autograd: no weight gradient
    /// will come).
    fn forget_extras(t: &Tensor) {
        with_state(t.device(), |s| {
            s.extras.retain(|e| !same_tensor(&e.tensor, t))
        });
    }

    /// One more weight gradient will run on `t` (a matmul's forward took it).
    fn note_use(t: &Tensor) {
        with_state(t.device(), |s| {
            if let Some(e) = s.extras.iter_mut().find(|e| same_tensor(&e.tensor, t)) {
                e.uses += 1;
            }
        });
    }

    /// The side-by-side transposed copy of `t` for a weight gradient (rows in groups ending
    /// at `ends`): the one an earlier weight gradient of `t` made, or made now from the
    /// column maxima its pass raised (or its own); each call is one of `t`'s uses.
    fn transposed_operand(
        t: &Tensor,
        ends: &Tensor,
        layout: Transposed,
        overflow: &Tensor,
    ) -> Result<(Fp8, Tensor)> {
        // maxima of other groups than these (another op's) are not taken
        let cells = ends.size()[0] * t.size()[1];
        let (maxima, made) = with_state(t.device(), |s| {
            match s.extras.iter().find(|e| same_tensor(&e.tensor, t)) {
                Some(e) => (
                    e.maxima
                        .as_ref()
                        .filter(|m| m.numel() as i64 == cells)
                        .map(Tensor::shallow_clone),
                    e.transposed
                        .as_ref()
                        .map(|(q, p)| (q.shallow_clone(), p.shallow_clone())),
                ),
                None => (None, None),
            }
        });
        let copy = match made {
            Some(copy) => copy,
            None => {
                if maxima.is_some() {
                    with_state(t.device(), |s| s.maxima_used += 1);
                }
                quant_transposed(t, ends, layout, Some(overflow), maxima.as_ref())?
            }
        };
        with_state(t.device(), |s| {
            if let Some(at) = s.extras.iter().position(|e| same_tensor(&e.tensor, t)) {
                let e = &mut s.extras[at];
                e.uses = e.uses.saturating_sub(1);
                if e.uses == 0 {
                    s.extras.swap_remove(at);
                } else if e.transposed.is_none() {
                    e.transposed = Some((copy.0.shallow_clone(), copy.1.shallow_clone()));
                }
            }
        });
        Ok(copy)
    }

    /// How many tensors' column maxima or transposed copies are kept for weight gradients
    /// still to come (this thread's CPU work and the GPU's; none once a backward is done).
    pub fn operand_extras_held() -> usize {
        each_state(|s| -> Result<usize> { Ok(s.extras.len() + s.act_maxima.len()) })
            .map(|(cpu, gpu)| cpu + gpu)
            .unwrap_or(0)
    }

    /// How many weight gradients took column maxima raised by the pass before them (this
    /// thread's CPU work and the GPU's).
    pub fn maxima_used() -> u64 {
        each_state(|s| -> Result<u64> { Ok(s.maxima_used) })
            .map(|(cpu, gpu)| cpu + gpu)
            .unwrap_or(0)
    }

    /// Fast accumulation in the FP8 matmuls, forward and backward (libtorch's precise
    /// accumulation made the grouped weight gradient 2-3x slower at S3 and F0 on an H100,
    /// BENCHMARKS.md 2026-12-06); `FMOEC_FP8_FAST_ACCUM=0` turns it off.
    fn fast_accum() -> bool {
        !std::env::var("FMOEC_FP8_FAST_ACCUM").is_ok_and(|v| v == "0")
    }

    /// `out[rows of group g] = a · b[g]` (`a` row-wise `[M, K]`, `b` the forward-layout
    /// operand `[E, N, K]` with `[E, N]` scales), bf16 `[M, N]`; rows past the last group are
    /// left as the matmul leaves them.
    fn grouped(a: &Fp8, b: &Fp8, ends: &Tensor, fast: bool) -> Result<Tensor> {
        if a.q.device().is_cuda() {
            return Ok(a.q.f_internal_scaled_grouped_mm(
                &b.q.f_transpose(1, 2)?,
                &a.scale,
                &b.scale,
                Some(ends),
                None,
                None,
                Kind::BFloat16,
                fast,
            )?);
        }
        let a32 = a.dequantize_rows()?;
        let b32 = b.dequantize_rows()?.f_transpose(1, 2)?;
        Ok(a32
            .f_internal_grouped_mm(&b32, Some(ends), None::<&Tensor>, None::<Kind>)?
            .f_to_kind(Kind::BFloat16)?)
    }

    /// `gW[g] = aᵀ_g · b_g` over the positions of group g: `at` `[K, P]` and `bt` `[N, P]`
    /// side by side with `[G·K]` / `[G·N]` scales, groups ending at `pad_ends`; bf16
    /// `[G, K, N]`.
    fn grouped_weight_grad(at: &Fp8, bt: &Fp8, pad_ends: &Tensor, fast: bool) -> Result<Tensor> {
        if at.q.device().is_cuda() {
            return Ok(at.q.f_internal_scaled_grouped_mm(
                &bt.q.f_transpose(0, 1)?,
                &at.scale,
                &bt.scale,
                Some(pad_ends),
                None,
                None,
                Kind::BFloat16,
                fast,
            )?);
        }
        let groups = pad_ends.size()[0];
        let (k, p) = at.q.size2()?;
        let n = bt.q.size()[0];
        let positions = Tensor::f_arange(p, (Kind::Int64, at.q.device()))?;
        let group = positions
            .f_searchsorted(
                &pad_ends.f_to_kind(Kind::Int64)?,
                false,
                true,
                "right",
                None::<Tensor>,
            )?
            .f_clamp_max(groups - 1)?;
        let scale_of = |t: &Fp8, rows: i64| -> Result<Tensor> {
            // [rows, P]: the scale of each row in each position's group
            Ok(t.scale
                .f_reshape([groups, rows])?
                .f_index_select(0, &group)?
                .f_transpose(0, 1)?)
        };
        let a32 = at.q.f_to_kind(Kind::Float)?.f_mul(&scale_of(at, k)?)?;
        let b32 = bt.q.f_to_kind(Kind::Float)?.f_mul(&scale_of(bt, n)?)?;
        // the weight gradient of the dequantised operands, positions as rows
        unquantised_weight_grad(&a32.f_transpose(0, 1)?, &b32.f_transpose(0, 1)?, pad_ends)
    }

    /// `gW[e] = x_eᵀ · g_e` over the rows of each expert group (ending at `ends`; rows past
    /// the last group are not read) with the operands as the layer has them (bf16 on the
    /// GPU, f32 in the emulation): the weight gradient where FP8 operands would not pay
    /// (the layer's `fp8_wgrad`, [`crate::plan::cost::fp8_weight_gradient`]); bf16 `[E, K,
    /// N]`. libtorch's grouped matmul (a tensor-core kernel of our own, mma.sync with the sum
    /// added to the held gradient, was slower on an H100: BENCHMARKS.md 2026-12-08).
    fn unquantised_weight_grad(x: &Tensor, g: &Tensor, ends: &Tensor) -> Result<Tensor> {
        Ok(x.f_transpose(0, 1)?
            .f_internal_grouped_mm(g, Some(ends), None::<&Tensor>, None::<Kind>)?
            .f_to_kind(Kind::BFloat16)?)
    }

    /// `a · bᵀ (+ bias)` of two row-wise FP8 operands (`a` `[M, K]`, `b` `[N, K]`, `bias`
    /// bf16 `[N]`, added to the f32 products in the matmul's epilogue), bf16 `[M, N]`.
    fn dense(a: &Fp8, b: &Fp8, bias: Option<&Tensor>, fast: bool) -> Result<Tensor> {
        let (m, _) = a.q.size2()?;
        let (n, _) = b.q.size2()?;
        if a.q.device().is_cuda() {
            return Ok(a.q.f_internal_scaled_mm(
                &b.q.f_transpose(0, 1)?,
                &a.scale.f_reshape([m, 1])?,
                &b.scale.f_reshape([1, n])?,
                bias,
                None::<&Tensor>,
                Kind::BFloat16,
                fast,
            )?);
        }
        let out = a
            .dequantize_rows()?
            .f_matmul(&b.dequantize_rows()?.f_transpose(0, 1)?)?;
        let out = match bias {
            Some(bias) => out.f_add(&bias.f_to_kind(Kind::Float)?)?,
            None => out,
        };
        Ok(out.f_to_kind(Kind::BFloat16)?)
    }

    /// The FP8 ops of this module, with what they need besides their tensors. The experts'
    /// ops carry their layer's `fp8_wgrad`: whether its weight gradients take FP8 operands
    /// (then the passes making those operands raise the column maxima of their transposed
    /// copies), else the layer's bf16 input and output gradient as they are.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fp8Op {
        /// Experts: `xs` rows in groups times stacked weights.
        Grouped { fp8_wgrad: bool },
        /// Dense: `x · W (+ b)` with `W` held as the layout says; `biased`: with the bias
        /// master and its compute copy as inputs 2 and 3.
        Linear { layout: WeightLayout, biased: bool },
        /// The dispatch's gather, writing the FP8 copy too; `k` slots per token.
        Dispatch { k: i64, fp8_wgrad: bool },
        /// The activation between the expert matmuls, writing its output's FP8 rows too.
        Act { act: Fp8Act, fp8_wgrad: bool },
        /// The combine, whose backward writes the FP8 rows of the experts' output gradient.
        Combine { fp8_wgrad: bool },
        /// The activation and the second expert matmul as one node: the activation's output
        /// exists only as its FP8 rows (forward) and its transposed FP8 copy (backward).
        ActGrouped { act: Fp8Act, fp8_wgrad: bool },
    }

    impl Fp8Op {
        /// Bits 0-7 the op, 8-15 its parameter, 16 `fp8_wgrad`.
        fn code(self) -> i64 {
            let w = |fp8_wgrad: bool| i64::from(fp8_wgrad) << 16;
            match self {
                Fp8Op::Grouped { fp8_wgrad } => 1 | w(fp8_wgrad),
                Fp8Op::Linear { layout, biased } => {
                    2 | (match layout {
                        WeightLayout::Experts => 0,
                        WeightLayout::InOut => 1,
                        WeightLayout::OutIn => 2,
                    } << 8)
                        | (i64::from(biased) << 12)
                }
                Fp8Op::Dispatch { k, fp8_wgrad } => 3 | (k << 8) | w(fp8_wgrad),
                Fp8Op::Act { act, fp8_wgrad } => 4 | (act.code() << 8) | w(fp8_wgrad),
                Fp8Op::Combine { fp8_wgrad } => 5 | w(fp8_wgrad),
                Fp8Op::ActGrouped { act, fp8_wgrad } => 6 | (act.code() << 8) | w(fp8_wgrad),
            }
        }

        fn from_code(code: i64) -> Result<Fp8Op> {
            let param = (code >> 8) & 0xFF;
            let fp8_wgrad = match code >> 16 {
                0 => false,
                1 => true,
                _ => bail!("FP8 op {code}: unknown weight gradient flag"),
            };
            Ok(match code & 0xFF {
                1 => Fp8Op::Grouped { fp8_wgrad },
                2 => Fp8Op::Linear {
                    layout: match param & 0xF {
                        1 => WeightLayout::InOut,
                        2 => WeightLayout::OutIn,
                        _ => bail!("FP8 op {code}: unknown layout"),
                    },
                    biased: match param >> 4 {
                        0 => false,
                        1 => true,
                        _ => bail!("FP8 op {code}: unknown bias flag"),
                    },
                },
                3 => Fp8Op::Dispatch {
                    k: param,
                    fp8_wgrad,
                },
                4 => Fp8Op::Act {
                    act: act_of_code(code)?,
                    fp8_wgrad,
                },
                5 => Fp8Op::Combine { fp8_wgrad },
                6 => Fp8Op::ActGrouped {
                    act: act_of_code(code)?,
                    fp8_wgrad,
                },
                _ => bail!("unknown FP8 op {code}"),
            })
        }
    }

    /// An activation's op-code parameter.
    trait ActCode {
        fn code(self) -> i64;
    }

    impl ActCode for Fp8Act {
        fn code(self) -> i64 {
            match self {
                Fp8Act::Gelu => 0,
                Fp8Act::Relu => 1,
                Fp8Act::Swiglu => 2,
            }
        }
    }

    /// The activation of an op code's parameter.
    fn act_of_code(code: i64) -> Result<Fp8Act> {
        Fp8Act::ALL
            .into_iter()
            .find(|a| a.code() == (code >> 8) & 0xFF)
            .with_context(|| format!("FP8 op {code}: unknown activation"))
    }

    /// The FP8 rows of an expert matmul's output gradient `g` (rows in groups ending at
    /// `ends`, from `limit` on past them): the ones the combine's backward or the activation's
    /// backward wrote, else quantised here, with the column maxima of its groups for the
    /// weight gradient when `for_weight` (then kept for [`transposed_operand`]).
    fn gradient_rows(
        g: &Tensor,
        ends: &Tensor,
        limit: &Tensor,
        overflow: &Tensor,
        for_weight: bool,
    ) -> Result<Fp8> {
        Ok(match prequantized(g, true) {
            Some(gq) => gq,
            None if for_weight => {
                let (gq, maxima) = quant_rows_with_maxima(g, Some(limit), Some(overflow), ends)?;
                remember_maxima(g, maxima, 1);
                gq
            }
            None => quant_rows(g, Some(limit), Some(overflow))?,
        })
    }

    /// One phase of an FP8 autograd op on its inputs: the gradients of the inputs in the
    /// backward (`None` where an input takes none), the output in the forward.
    fn run_op(op: Fp8Op, phase: Phase, inputs: Vec<Tensor>) -> Result<Vec<Option<Tensor>>> {
        let inputs = &inputs[..];
        match (op, phase) {
            (Fp8Op::Grouped { .. }, Phase::Forward) => grouped_forward(inputs),
            (Fp8Op::Grouped { fp8_wgrad }, Phase::Backward) => grouped_backward(fp8_wgrad, inputs),
            (Fp8Op::Linear { layout, biased }, Phase::Forward) => {
                linear_forward(layout, biased, inputs)
            }
            (Fp8Op::Linear { layout, biased }, Phase::Backward) => {
                linear_backward(layout, biased, inputs)
            }
            (Fp8Op::Dispatch { k, fp8_wgrad }, Phase::Forward) => {
                dispatch_forward(k, fp8_wgrad, inputs)
            }
            (Fp8Op::Dispatch { k, .. }, Phase::Backward) => {
                let gx = dispatch_backward(&inputs[2], &inputs[4], k)?;
                Ok(vec![gx, None, None, None])
            }
            (Fp8Op::Act { act, fp8_wgrad }, Phase::Forward) => act_forward(act, fp8_wgrad, inputs),
            (Fp8Op::Act { act, fp8_wgrad }, Phase::Backward) => {
                let (a, b, ends, g) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
                if !g.defined() {
                    return Ok(vec![None, None, None]);
                }
                let (ga, gb) = act_backward(act, fp8_wgrad, a, b, ends, g)?;
                Ok(vec![Some(ga), gb, None])
            }
            (Fp8Op::ActGrouped { act, fp8_wgrad }, Phase::Forward) => {
                act_grouped_forward(act, fp8_wgrad, inputs)
            }
            (Fp8Op::ActGrouped { act, fp8_wgrad }, Phase::Backward) => {
                act_grouped_backward(act, fp8_wgrad, inputs)
            }
            // combine: a = ys [N, d], b = weight [T, k] f32, c = slot_row [T·k], d = row_slot
            // [N], e = the expert groups' ends [E] int32
            (Fp8Op::Combine { .. }, Phase::Forward) => {
                let (ys, w, slot_row) = (&inputs[0], &inputs[1], &inputs[2]);
                let k = w.size()[1];
                Ok(vec![Some(sum_rows(
                    ys,
                    slot_row,
                    k,
                    Some(&w.f_contiguous()?),
                )?)])
            }
            (Fp8Op::Combine { fp8_wgrad }, Phase::Backward) => combine_backward(fp8_wgrad, inputs),
        }
    }

    /// The experts' grouped matmul: `xs` [M, K], `W` [E, K, N], the groups' ends [E] int32.
    fn grouped_forward(inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let (xs, w, ends) = (&inputs[0], &inputs[1], &inputs[2]);
        let o = overflow(xs.device())?;
        let groups = ends.size()[0];
        let limit = ends.f_narrow(0, groups - 1, 1)?;
        let a = match prequantized(xs, false) {
            Some(a) => a,
            None => quant_rows(xs, Some(&limit), Some(&o))?,
        };
        // this matmul's weight gradient will take xs's transposed copy
        if w.requires_grad() {
            note_use(xs);
        }
        let out = weight_copies(w, WeightLayout::Experts, |c| {
            grouped(&a, &c.forward()?, ends, fast_accum())
        })?;
        Ok(vec![Some(out.f_to_kind(xs.kind())?)])
    }

    /// Its backward: the gradients of `xs` and `W` from the output's (input 3).
    fn grouped_backward(fp8_wgrad: bool, inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let (xs, w, ends, g) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
        if !g.defined() {
            return Ok(vec![None, None, None]);
        }
        let o = overflow(xs.device())?;
        let (rows, _) = xs.size2()?;
        let groups = ends.size()[0];
        let limit = ends.f_narrow(0, groups - 1, 1)?;
        let g = g.f_contiguous()?;
        let wgrad_in_fp8 = fp8_wgrad && w.requires_grad();
        // the combine's backward wrote the FP8 rows of the second matmul's gradient, and
        // the activation's backward (GELU, ReLU) those of the first's; elsewhere (the
        // two of SwiGLU) the row-wise pass raises the column maxima too
        let gq = gradient_rows(&g, ends, &limit, &o, wgrad_in_fp8)?;
        let gx = if xs.requires_grad() {
            let gx = weight_copies(w, WeightLayout::Experts, |c| {
                grouped(&gq, &c.dgrad()?, ends, fast_accum())
            })?;
            Some(gx.f_to_kind(xs.kind())?)
        } else {
            None
        };
        let gw = if wgrad_in_fp8 {
            let layout = Transposed::SideBySide {
                positions: side_by_side_positions(rows, groups),
            };
            let (at, pad_ends) = transposed_operand(xs, ends, layout, &o)?;
            let (bt, _) = transposed_operand(&g, ends, layout, &o)?;
            master_gradient(w, &grouped_weight_grad(&at, &bt, &pad_ends, fast_accum())?)?
        } else if w.requires_grad() {
            master_gradient(w, &unquantised_weight_grad(xs, &g, ends)?)?
        } else {
            None
        };
        Ok(vec![gx, gw, None])
    }

    /// A dense matmul: `x` [M, K], the master weight in `layout` and, when `biased`, the bias
    /// master and its bf16 copy (added in the matmul's epilogue). With the weight's gradient
    /// to come, the row pass over `x` raises its column maxima too, kept for the backward's
    /// transposed copy (which then need not read `x` a third time); a second matmul of the
    /// same `x` (SwiGLU's two projections) shares that copy.
    fn linear_forward(
        layout: WeightLayout,
        biased: bool,
        inputs: &[Tensor],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (&inputs[0], &inputs[1]);
        let o = overflow(x.device())?;
        let a = if w.requires_grad() && !has_extras(x) {
            let ends = whole(x)?;
            let (a, maxima) = quant_rows_with_maxima(x, None, Some(&o), &ends)?;
            remember_maxima(x, maxima, 0);
            a
        } else {
            quant_rows(x, None, Some(&o))?
        };
        if w.requires_grad() {
            note_use(x);
        }
        let bias = biased.then(|| &inputs[3]);
        let out = weight_copies(w, layout, |c| {
            dense(&a, &only_matrix(&c.forward()?)?, bias, fast_accum())
        })?;
        Ok(vec![Some(out.f_to_kind(x.kind())?)])
    }

    /// A dense weight's FP8 copy as the stacked copy's one matrix (and its scales).
    fn only_matrix(stacked: &Fp8) -> Result<Fp8> {
        Ok(Fp8 {
            q: stacked.q.f_select(0, 0)?,
            scale: stacked.scale.f_select(0, 0)?,
        })
    }

    /// The one group of a dense matmul's `rows` (its ends, int32 `[1]`).
    fn whole(x: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_full([1], x.size()[0], (Kind::Int, x.device()))?)
    }

    /// Its backward: the gradients of `x`, of the master weight and of the bias master from
    /// the output's (the last input). The row pass over the gradient raises its column maxima
    /// for the weight gradient's transposed copy; the bias's gradient is the gradient's column
    /// sums, added into the master's `.grad` in f32 (as the bf16 linear's).
    fn linear_backward(
        layout: WeightLayout,
        biased: bool,
        inputs: &[Tensor],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (&inputs[0], &inputs[1]);
        // the bias master is input 2 when there is one (else input 2 is the gradient)
        let b = biased.then(|| &inputs[2]);
        let g = &inputs[inputs.len() - 1];
        if !g.defined() {
            return Ok((1..inputs.len()).map(|_| None).collect());
        }
        let o = overflow(x.device())?;
        let (rows, _) = x.size2()?;
        let g = g.f_contiguous()?;
        let ends = whole(x)?;
        let (gq, g_maxima) = match (x.requires_grad(), w.requires_grad()) {
            (true, true) => {
                let (gq, maxima) = quant_rows_with_maxima(&g, None, Some(&o), &ends)?;
                (Some(gq), maxima)
            }
            (true, false) => (Some(quant_rows(&g, None, Some(&o))?), None),
            (false, _) => (None, None),
        };
        let gx = match gq {
            Some(gq) => {
                // gx = g · Wᵀ: W's rows [K, N] are the right operand's rows
                let gx = weight_copies(w, layout, |c| {
                    dense(&gq, &only_matrix(&c.dgrad()?)?, None, fast_accum())
                })?;
                Some(gx.f_to_kind(x.kind())?)
            }
            None => None,
        };
        let gw = if w.requires_grad() {
            let layout_t = Transposed::SideBySide {
                positions: side_by_side_positions(rows, 1),
            };
            let (xt, _) = transposed_operand(x, &ends, layout_t, &o)?;
            let (gt, _) = quant_transposed(&g, &ends, layout_t, Some(&o), g_maxima.as_ref())?;
            let grad = match layout {
                // gW = xᵀ · g, [K, N]
                WeightLayout::InOut => dense(&xt, &gt, None, fast_accum())?,
                // the master is Wᵀ: gWᵀ = gᵀ · x, [N, K]
                _ => dense(&gt, &xt, None, fast_accum())?,
            };
            master_gradient(w, &grad)?
        } else {
            None
        };
        let gb = match b {
            Some(b) if b.requires_grad() => bias_gradient(b, &g)?,
            _ => None,
        };
        let mut grads = vec![gx, gw];
        if biased {
            grads.extend([gb, None]);
        }
        Ok(grads)
    }

    /// The dispatch: `x` [T, d] gathered by `row_slot` [N] into expert order, its FP8 rows (and
    /// with `fp8_wgrad` its column maxima) kept for the first matmul (inputs: x, row_slot,
    /// slot_row [T·k], the groups' ends [E] int32).
    fn dispatch_forward(k: i64, fp8_wgrad: bool, inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let (x, row_slot, ends) = (&inputs[0], &inputs[1], &inputs[3]);
        let o = overflow(x.device())?;
        let col_ends = fp8_wgrad.then_some(ends);
        let (xs, q, maxima) = gather_quant_rows(x, row_slot, k, None, Some(&o), col_ends)?;
        remember_prequantized(&xs, q);
        remember_maxima(&xs, maxima, 0);
        Ok(vec![Some(xs)])
    }

    /// The activation: `h1` [N, H] (and `h3` for SwiGLU), its FP8 rows (and with `fp8_wgrad` its
    /// column maxima) kept for the second matmul (inputs: h1, h3 or unused, the groups' ends [E]
    /// int32).
    fn act_forward(act: Fp8Act, fp8_wgrad: bool, inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let (a, ends) = (&inputs[0], &inputs[2]);
        let b = (act == Fp8Act::Swiglu).then_some(&inputs[1]);
        let o = overflow(a.device())?;
        let limit = ends.f_narrow(0, ends.size()[0] - 1, 1)?;
        let col_ends = fp8_wgrad.then_some(ends);
        let (out, q, maxima) = act_quant_rows(a, b, act, Some(&limit), Some(&o), col_ends)?;
        remember_prequantized(&out, q);
        remember_maxima(&out, maxima, 0);
        Ok(vec![Some(out)])
    }

    /// The activation fused with the second matmul: `h1` [N, H], `h3` (SwiGLU) or unused,
    /// `W2` [E, H, d], the groups' ends [E] int32.
    fn act_grouped_forward(
        act: Fp8Act,
        fp8_wgrad: bool,
        inputs: &[Tensor],
    ) -> Result<Vec<Option<Tensor>>> {
        let (a, w, ends) = (&inputs[0], &inputs[2], &inputs[3]);
        let b = (act == Fp8Act::Swiglu).then_some(&inputs[1]);
        let o = overflow(a.device())?;
        let limit = ends.f_narrow(0, ends.size()[0] - 1, 1)?;
        // the activation's FP8 rows alone: its output in bf16 is neither written nor
        // kept (the weight gradient's transposed copy computes it again from `a`)
        let col_ends = (fp8_wgrad && w.requires_grad()).then_some(ends);
        let (q, maxima) = act_quant_rows_only(a, b, act, Some(&limit), Some(&o), col_ends)?;
        if let Some(maxima) = maxima {
            with_state(a.device(), |s| {
                s.act_maxima.push((a.shallow_clone(), maxima))
            });
        }
        let out = weight_copies(w, WeightLayout::Experts, |c| {
            grouped(&q, &c.forward()?, ends, fast_accum())
        })?;
        Ok(vec![Some(out.f_to_kind(a.kind())?)])
    }

    /// Its backward: the gradients of `h1` (and `h3`) and `W2` from the output's (input 4).
    fn act_grouped_backward(
        act: Fp8Act,
        fp8_wgrad: bool,
        inputs: &[Tensor],
    ) -> Result<Vec<Option<Tensor>>> {
        let (a, b, w, ends, g) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4]);
        if !g.defined() {
            return Ok(vec![None, None, None, None]);
        }
        let o = overflow(a.device())?;
        let (rows, _) = a.size2()?;
        let groups = ends.size()[0];
        let limit = ends.f_narrow(0, groups - 1, 1)?;
        let g = g.f_contiguous()?;
        let maxima = take_act_maxima(a);
        let wgrad_in_fp8 = fp8_wgrad && w.requires_grad();
        // as the second matmul's backward: the output gradient's FP8 rows (the
        // combine's backward wrote them), the activation's gradient, the weight's
        let gq = gradient_rows(&g, ends, &limit, &o, wgrad_in_fp8)?;
        let gh = if a.requires_grad() || b.requires_grad() {
            let gh = weight_copies(w, WeightLayout::Experts, |c| {
                grouped(&gq, &c.dgrad()?, ends, fast_accum())
            })?;
            Some(gh.f_to_kind(a.kind())?)
        } else {
            None
        };
        drop(gq);
        let gw = if wgrad_in_fp8 {
            let layout = Transposed::SideBySide {
                positions: side_by_side_positions(rows, groups),
            };
            if maxima.is_some() {
                with_state(a.device(), |s| s.maxima_used += 1);
            }
            let swiglu_b = (act == Fp8Act::Swiglu).then_some(b);
            let (at, pad_ends) =
                act_quant_transposed(a, swiglu_b, act, ends, layout, Some(&o), maxima.as_ref())?;
            let (bt, _) = transposed_operand(&g, ends, layout, &o)?;
            master_gradient(w, &grouped_weight_grad(&at, &bt, &pad_ends, fast_accum())?)?
        } else if w.requires_grad() {
            // the activation's output, which the forward did not keep, made again in bf16
            let swiglu_b = (act == Fp8Act::Swiglu).then_some(b);
            let (h, _, _) = act_quant_rows(a, swiglu_b, act, Some(&limit), None, None)?;
            master_gradient(w, &unquantised_weight_grad(&h, &g, ends)?)?
        } else {
            None
        };
        let (ga, gb) = match gh {
            Some(gh) => {
                let (ga, gb) = act_backward(act, fp8_wgrad, a, b, ends, &gh)?;
                (Some(ga), gb)
            }
            None => (None, None),
        };
        Ok(vec![ga, gb, gw, None])
    }

    /// The combine's backward: the gate-weighted gradient of `ys` (with its FP8 rows, kept for the
    /// second matmul) and the gradient of the gate weights (inputs: ys [N, d], weight [T, k] f32,
    /// slot_row [T·k], row_slot [N], the groups' ends [E] int32, the output's gradient).
    fn combine_backward(fp8_wgrad: bool, inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let (ys, w, slot_row, row_slot, ends, g) = (
            &inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4], &inputs[5],
        );
        if !g.defined() {
            return Ok(vec![None, None, None, None, None]);
        }
        let k = w.size()[1];
        let g = g.f_to_kind(ys.kind())?.f_contiguous()?;
        let gys = if ys.requires_grad() {
            let o = overflow(g.device())?;
            let col_ends = fp8_wgrad.then_some(ends);
            let (gys, q, maxima) = gather_quant_rows(&g, row_slot, k, Some(w), Some(&o), col_ends)?;
            remember_prequantized(&gys, q);
            remember_maxima(&gys, maxima, 1);
            Some(gys)
        } else {
            None
        };
        let gw = combine_weight_gradient(ys, w, slot_row, &g)?;
        Ok(vec![gys, gw, None, None, None])
    }
    /// The activation's backward: the gradient of `a` (and SwiGLU's of `b`) from the output's
    /// `g`. Its pass writes the FP8 rows (and column maxima) of each gradient, the first
    /// matmuls' output gradients, for their backward; rows past the last group are zeros
    /// (nothing reads them).
    fn act_backward(
        act: Fp8Act,
        fp8_wgrad: bool,
        a: &Tensor,
        b: &Tensor,
        ends: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let g = g.f_to_kind(a.kind())?.f_contiguous()?;
        let o = overflow(a.device())?;
        let limit = ends.f_narrow(0, ends.size()[0] - 1, 1)?;
        let col_ends = fp8_wgrad.then_some(ends);
        let one_input = match act {
            Fp8Act::Gelu => Fp8ActGrad::Gelu,
            Fp8Act::Relu => Fp8ActGrad::Relu,
            // `FMOEC_FP8_SWIGLU_GRAD_PASS=0`: the SwiGLU kernel, and each gradient's FP8 rows
            // made by the first matmuls' backward (the way before the pass; for timing)
            Fp8Act::Swiglu
                if std::env::var("FMOEC_FP8_SWIGLU_GRAD_PASS").is_ok_and(|v| v == "0") =>
            {
                let (ga, gb) = swiglu_backward(a, b, &g)?;
                return Ok((ga, Some(gb)));
            }
            Fp8Act::Swiglu => {
                let ((ga, qa, maxima_a), (gb, qb, maxima_b)) =
                    swiglu_grad_quant_rows(a, b, &g, Some(&limit), Some(&o), col_ends)?;
                remember_prequantized(&ga, qa);
                remember_maxima(&ga, maxima_a, 1);
                remember_prequantized(&gb, qb);
                remember_maxima(&gb, maxima_b, 1);
                return Ok((ga, Some(gb)));
            }
        };
        let (ga, q, maxima) =
            act_grad_quant_rows(a, &g, one_input, Some(&limit), Some(&o), col_ends)?;
        remember_prequantized(&ga, q);
        remember_maxima(&ga, maxima, 1);
        Ok((ga, None))
    }

    /// The column maxima of the activation's output that [`activation_mm`]'s forward raised
    /// from `a`, forgotten here.
    fn take_act_maxima(a: &Tensor) -> Option<ColumnMaxima> {
        with_state(a.device(), |s| {
            let at = s.act_maxima.iter().position(|(t, _)| same_tensor(t, a))?;
            Some(s.act_maxima.swap_remove(at).1)
        })
    }

    shim_callback!(fp8_callback => |op, phase, ins| run_op(Fp8Op::from_code(op)?, phase, ins));

    /// Every row of `xs` (`[M, K]`, bf16, or f32 in the emulation; rows in expert groups
    /// ending at `ends`, int32 `[E]`) times its expert's `w` (the master, `[E, K, N]`) with
    /// FP8 operands: `[M, N]` in `xs`'s type, differentiable in both. Rows past the last group
    /// are left as the matmul leaves them (as with the bf16 grouped matmul). `fp8_wgrad`: the
    /// weight gradient on FP8 operands, else on `xs` and the output's gradient as they are
    /// (the layer's choice, [`crate::plan::cost::fp8_weight_gradient`]).
    pub fn grouped_mm(xs: &Tensor, w: &Tensor, ends: &Tensor, fp8_wgrad: bool) -> Result<Tensor> {
        let (_, k) = xs.size2()?;
        let n = *w.size().last().unwrap_or(&0);
        if k % 16 != 0 || n % 16 != 0 {
            bail!("FP8 experts need widths that are multiples of 16 (here {k} → {n})");
        }
        apply(
            fp8_callback,
            Fp8Op::Grouped { fp8_wgrad }.code(),
            vec![
                xs.f_contiguous()?,
                w.shallow_clone(),
                ends.f_to_kind(Kind::Int)?,
            ],
        )
        .context("FP8 grouped matmul")
    }

    /// `x · W (+ b)` over the last dimension with FP8 operands, `W` held by `w` as `layout`
    /// says (`InOut`: `w` is `[K, N]`; `OutIn`: `w` is `[N, K]`, the tied head) and the bias
    /// added in the matmul's epilogue; in `x`'s type, differentiable in `x`, `w` and `b`.
    pub fn linear(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        layout: WeightLayout,
    ) -> Result<Tensor> {
        let mut shape = x.size();
        let Some(&k) = shape.last() else {
            bail!("FP8 linear: a scalar input");
        };
        let n = match (layout, w.size().as_slice()) {
            (WeightLayout::InOut, &[wk, n]) if wk == k => n,
            (WeightLayout::OutIn, &[n, wk]) if wk == k => n,
            (_, s) => bail!("FP8 linear: weight {s:?} for inputs of width {k}"),
        };
        let x2 = x.f_reshape([-1, k])?.f_contiguous()?;
        let mut inputs = vec![x2.shallow_clone(), w.shallow_clone()];
        if let Some(b) = b {
            if b.size() != [n] {
                bail!("FP8 linear: bias {:?} for {n} outputs", b.size());
            }
            // the epilogue's bf16 bias: the step's cast copy of the master (or one made now)
            let copy = match crate::runtime::cast::cached(b, Kind::BFloat16)? {
                Some(copy) => copy,
                None => tch::no_grad(|| b.f_to_kind(Kind::BFloat16))?,
            };
            inputs.extend([b.shallow_clone(), copy]);
        }
        let out = apply(
            fp8_callback,
            Fp8Op::Linear {
                layout,
                biased: b.is_some(),
            }
            .code(),
            inputs,
        )
        .context("FP8 linear")?;
        if !out.requires_grad() {
            // no backward will take the column maxima its pass kept
            forget_extras(&x2);
        }
        *shape.last_mut().expect("checked above") = n;
        Ok(out.f_reshape(shape)?)
    }

    /// Whether [`linear`] takes `x · W` of these widths (`K`, `N` multiples of 16).
    pub fn linear_applies(k: i64, n: i64) -> bool {
        k % 16 == 0 && n % 16 == 0
    }

    /// The dispatch's gather into expert order (as `cuda::dispatch_op`), writing the rows'
    /// FP8 copy in the same pass where the kernels run; [`grouped_mm`] then takes it instead
    /// of quantising `xs` again. Call [`forget_prequantized`] once the experts have run.
    /// With grad and `fp8_wgrad`, the pass raises the column maxima of `xs`'s expert groups
    /// (ending at `ends`) too, for the first matmul's weight gradient on FP8 operands.
    pub fn dispatch(
        x: &Tensor,
        row_slot: &Tensor,
        slot_row: &Tensor,
        k: i64,
        ends: &Tensor,
        fp8_wgrad: bool,
    ) -> Result<Tensor> {
        // the op's code holds k in 8 bits
        if !(1..=255).contains(&k) {
            bail!("FP8 dispatch: {k} slots a token (1 to 255)");
        }
        let xs = apply(
            fp8_callback,
            Fp8Op::Dispatch { k, fp8_wgrad }.code(),
            vec![
                x.shallow_clone(),
                row_slot.shallow_clone(),
                slot_row.shallow_clone(),
                ends.f_to_kind(Kind::Int)?,
            ],
        )
        .context("FP8 dispatch")?;
        if !xs.requires_grad() {
            forget_extras(&xs);
        }
        Ok(xs)
    }

    /// The activation between the expert matmuls (`act(h1)`, or SwiGLU's `silu(h1) · h3`;
    /// rows in expert groups ending at `ends`, rows past the last group zero), writing its
    /// output's FP8 rows in the same pass: the second matmul ([`grouped_mm`]) takes them
    /// instead of quantising the output again. Differentiable in `h1` and `h3`. Call
    /// [`forget_prequantized`] once the experts have run. `fp8_wgrad`: as [`grouped_mm`]'s.
    pub fn activation(
        h1: &Tensor,
        h3: Option<&Tensor>,
        act: Fp8Act,
        ends: &Tensor,
        fp8_wgrad: bool,
    ) -> Result<Tensor> {
        if (act == Fp8Act::Swiglu) != h3.is_some() {
            bail!(
                "FP8 activation {act:?}: {} inputs",
                1 + h3.is_some() as usize
            );
        }
        let h3 = match h3 {
            Some(h3) => h3.f_contiguous()?,
            None => crate::runtime::cuda::autograd::unused()?,
        };
        let out = apply(
            fp8_callback,
            Fp8Op::Act { act, fp8_wgrad }.code(),
            vec![h1.f_contiguous()?, h3, ends.f_to_kind(Kind::Int)?],
        )
        .context("FP8 activation")?;
        if !out.requires_grad() {
            forget_extras(&out);
        }
        Ok(out)
    }

    /// Whether the experts take their activation with [`activation_mm`] (else [`activation`]
    /// then [`grouped_mm`]): with `FMOEC_FP8_ACT_ON_LOAD=1`, or on this thread as
    /// [`super::activation_on_load_on_this_thread`] says. Off by default: it keeps the
    /// activation's output (S1: 0.94 GB of bf16) out of memory from the forward to the
    /// backward, but on an H100 the S1 GELU
    /// layer ran 0.8 ms slower with it (the passes compute GELU's erf three times instead
    /// of once and are bound by that arithmetic, not by the bytes they no longer write), and
    /// SwiGLU's within the run-to-run spread (BENCHMARKS.md 2026-12-06 11:17 UTC).
    pub fn fuses_activation() -> bool {
        super::ACT_ON_LOAD
            .with(|f| f.get())
            .unwrap_or_else(|| std::env::var("FMOEC_FP8_ACT_ON_LOAD").is_ok_and(|v| v == "1"))
    }

    /// The activation between the expert matmuls and the second matmul in one node:
    /// `act(h1) · w[e]` (SwiGLU: `(silu(h1) · h3) · w[e]`) for the rows of each expert group
    /// (ending at `ends`), `w` the master `[E, H, d]`, in `h1`'s type, differentiable in
    /// `h1`, `h3` and `w`. The same values as [`activation`] then [`grouped_mm`], bit for bit,
    /// but the activation's output is never written in bf16 nor kept for the backward: the
    /// forward's pass writes only its FP8 rows (and column maxima), and the weight
    /// gradient's transposed copy computes it again from `h1` (and `h3`), which autograd
    /// keeps anyway for the activation's backward.
    pub fn activation_mm(
        h1: &Tensor,
        h3: Option<&Tensor>,
        act: Fp8Act,
        w: &Tensor,
        ends: &Tensor,
        fp8_wgrad: bool,
    ) -> Result<Tensor> {
        if (act == Fp8Act::Swiglu) != h3.is_some() {
            bail!(
                "FP8 activation {act:?}: {} inputs",
                1 + h3.is_some() as usize
            );
        }
        let (_, k) = h1.size2()?;
        let n = *w.size().last().unwrap_or(&0);
        if k % 16 != 0 || n % 16 != 0 {
            bail!("FP8 experts need widths that are multiples of 16 (here {k} → {n})");
        }
        let h1 = h1.f_contiguous()?;
        let h3 = match h3 {
            Some(h3) => h3.f_contiguous()?,
            None => crate::runtime::cuda::autograd::unused()?,
        };
        let out = apply(
            fp8_callback,
            Fp8Op::ActGrouped { act, fp8_wgrad }.code(),
            vec![
                h1.shallow_clone(),
                h3,
                w.shallow_clone(),
                ends.f_to_kind(Kind::Int)?,
            ],
        )
        .context("FP8 activation and matmul")?;
        if !out.requires_grad() {
            let _ = take_act_maxima(&h1);
        }
        Ok(out)
    }

    /// The weighted combine of the expert outputs `ys` back onto their tokens (as
    /// `cuda::combine_op`; `weight` `[T, k]` f32), whose backward writes the FP8 rows of the
    /// experts' output gradient in the gather it makes anyway: the second matmul's backward
    /// takes them instead of quantising the gradient again (and, with `fp8_wgrad`, raises the
    /// column maxima of their transposed copy).
    pub fn combine(
        ys: &Tensor,
        weight: &Tensor,
        slot_row: &Tensor,
        row_slot: &Tensor,
        ends: &Tensor,
        fp8_wgrad: bool,
    ) -> Result<Tensor> {
        let slots = slot_row.size()[0];
        if weight.dim() != 2 || weight.numel() as i64 != slots || row_slot.size()[0] != slots {
            bail!(
                "FP8 combine: weight {:?} for {slots} slots and {} expert rows",
                weight.size(),
                row_slot.size()[0]
            );
        }
        apply(
            fp8_callback,
            Fp8Op::Combine { fp8_wgrad }.code(),
            vec![
                ys.shallow_clone(),
                weight.shallow_clone(),
                slot_row.shallow_clone(),
                row_slot.shallow_clone(),
                ends.f_to_kind(Kind::Int)?,
            ],
        )
        .context("FP8 combine")
    }

    /// `xs` gathered by the reference (not quantised): for the checks.
    pub fn gather_reference(x: &Tensor, row_slot: &Tensor, k: i64) -> Result<Tensor> {
        gather_rows(x, row_slot, k, None)
    }

    /// Checks the FP8 kernels and ops on `device` (one line each; an error if any is off):
    /// the quantisations bit for bit against the libtorch reference on the CPU (row-wise with
    /// and without the gather and the limit, transposed side by side with uneven and empty
    /// groups, stacked), and the autograd ops (experts and dense, forward and both
    /// gradients) against the CPU emulation (within bf16 rounding and accumulation order)
    /// and against f64 on the unquantised inputs (FP8's own error). Rows past the last
    /// group hold NaN: nothing may read them. On the CPU both sides are the reference.
    pub fn self_check(device: Device) -> Result<Vec<String>> {
        let mut c = Checks::default();
        check_padded_ends(&mut c, device)?;
        let kinds: &[Kind] = if device.is_cuda() {
            &[Kind::BFloat16, Kind::Float]
        } else {
            &[Kind::Float]
        };
        for &kind in kinds {
            let rows = RowsCase::new(device, kind)?;
            rows.check_rows_and_copies(&mut c)?;
            rows.check_gathers(&mut c)?;
            rows.check_activations(&mut c)?;
            rows.check_many_groups(&mut c)?;
            rows.check_non_finite(&mut c)?;
        }
        // the ops: experts (E = 5, one group empty, dropped rows) with their weight gradients
        // on FP8 and on bf16 operands, and dense, both layouts; the larger shape on a GPU only
        // (the CPU's emulation of it takes minutes)
        let shapes: &[(i64, i64, i64, bool)] = if device.is_cuda() {
            &[
                (512, 256, 384, true),
                (512, 256, 384, false),
                (4096, 1024, 2048, true),
            ]
        } else {
            &[(512, 256, 384, true), (512, 256, 384, false)]
        };
        for &(rows_kept, k, n, fp8_wgrad) in shapes {
            let ops = OpsCase::new(device, rows_kept, k, n, fp8_wgrad)?;
            ops.check_experts(&mut c)?;
            ops.check_activation_mm(&mut c)?;
            if fp8_wgrad {
                ops.check_dense(&mut c)?;
            }
        }
        clear();
        if c.failed > 0 {
            bail!("{} FP8 check(s) failed:\n{}", c.failed, c.lines.join("\n"));
        }
        Ok(c.lines)
    }

    /// Records whether `got`'s FP8 rows and scales are bit-equal to `want`'s (NaN where both
    /// hold NaN).
    fn same(c: &mut Checks, label: String, got: &Fp8, want: &Fp8) -> Result<()> {
        let cpu = Device::Cpu;
        let q = got.q.f_to_device(cpu)?.f_to_kind(Kind::Float)?;
        let qw = want.q.f_to_device(cpu)?.f_to_kind(Kind::Float)?;
        let s = got.scale.f_to_device(cpu)?;
        let sw = want.scale.f_to_device(cpu)?;
        let ok = q.size() == qw.size()
            && q.f_eq_tensor(&qw)?
                .f_logical_or(&q.f_isnan()?.f_logical_and(&qw.f_isnan()?)?)?
                .f_all()?
                .f_int64_value(&[])?
                != 0
            && s.f_equal(&sw)?;
        c.record(label, ok, "bit-equal to the reference".into());
        Ok(())
    }

    /// Records whether a pass raised column maxima bit-equal to the reference's `want`.
    fn same_maxima(c: &mut Checks, label: String, got: Option<&Tensor>, want: &Tensor) {
        let got = got.map(|g| g.to_device(Device::Cpu));
        let ok = got.as_ref().is_some_and(|g| g.equal(want));
        c.record(
            label,
            ok,
            match got {
                Some(_) if ok => "bit-equal to the reference".into(),
                Some(_) => "differ from the reference".into(),
                None => "not raised by the pass".into(),
            },
        );
    }

    /// The padded group ends (the weight gradients' groups): one group, uneven ones with
    /// empty ones among them, and more than the kernel's 32 a step (S3's 128 experts).
    fn check_padded_ends(c: &mut Checks, device: Device) -> Result<()> {
        let cpu = Device::Cpu;
        for counts in [
            vec![5i32],
            vec![37, 0, 200, 16, 91, 0],
            (0..130).map(|g| g * 7 % 45).collect(),
        ] {
            let ends: Vec<i32> = counts
                .iter()
                .scan(0, |acc, n| {
                    *acc += n;
                    Some(*acc)
                })
                .collect();
            let ends = Tensor::f_from_slice(&ends)?;
            let got = padded_ends(&ends.f_to_device(device)?)?.f_to_device(cpu)?;
            let want = padded_ends_reference(&ends)?;
            c.record(
                format!("fp8 padded group ends           groups={}", counts.len()),
                got.kind() == want.kind() && got.equal(&want),
                "equal to the reference's".into(),
            );
        }
        Ok(())
    }

    /// The inputs of the row passes' checks in one kind: groups of uneven sizes, one empty,
    /// an all-zero row, and rows past the last group holding NaN, on the CPU and on the
    /// device.
    struct RowsCase {
        device: Device,
        kind: Kind,
        /// `[rows, d]`, on the CPU and on the device
        x: Tensor,
        xd: Tensor,
        /// the groups' ends (int32), on the CPU and on the device
        ends: Tensor,
        ed: Tensor,
        /// the last group's end (`kept`), on the CPU and on the device
        limit: Tensor,
        limit_d: Tensor,
        kept: i64,
        rows: i64,
        d: i64,
        /// the device's overflow counter
        o: Tensor,
        /// the weight gradient's layout of `x`'s groups
        layout: Transposed,
    }

    impl RowsCase {
        fn new(device: Device, kind: Kind) -> Result<RowsCase> {
            let cpu = Device::Cpu;
            // groups of uneven sizes, one empty, and rows past the last group
            let counts = [37i64, 0, 200, 16, 91];
            let ends_v: Vec<i32> = counts
                .iter()
                .scan(0i64, |acc, c| {
                    *acc += c;
                    Some(*acc as i32)
                })
                .collect();
            let kept = *ends_v.last().unwrap() as i64;
            let (rows, d) = (kept + 21, 256i64);
            let x = Tensor::f_randn([rows, d], (Kind::Float, cpu))?
                .f_mul_scalar(3.0)?
                .f_to_kind(kind)?;
            // one all-zero row, and NaN past the last group
            let _ = x.f_narrow(0, 5, 1)?.f_zero_()?;
            let _ = x.f_narrow(0, kept, rows - kept)?.f_fill_(f64::NAN)?;
            let ends = Tensor::f_from_slice(&ends_v)?;
            let limit = ends.f_narrow(0, counts.len() as i64 - 1, 1)?;
            let layout = Transposed::SideBySide {
                positions: side_by_side_positions(rows, counts.len() as i64),
            };
            Ok(RowsCase {
                device,
                kind,
                xd: x.f_to_device(device)?,
                x,
                ed: ends.f_to_device(device)?,
                ends,
                limit_d: limit.f_to_device(device)?,
                limit,
                kept,
                rows,
                d,
                o: overflow(device)?,
                layout,
            })
        }

        fn label(&self, n: &str) -> String {
            let (kind, rows, d) = (self.kind, self.rows, self.d);
            format!("fp8 {n:<30} {kind:?} rows={rows} d={d}")
        }

        /// The row-wise pass (with the limit, and raising the groups' column maxima too),
        /// the transposed copies side by side (with and without the rows' maxima) and
        /// stacked, and no overflow from the rows past the groups.
        fn check_rows_and_copies(&self, c: &mut Checks) -> Result<()> {
            let (device, layout) = (self.device, self.layout);
            let (x, xd, ends, ed, limit, limit_d, o) = (
                &self.x,
                &self.xd,
                &self.ends,
                &self.ed,
                &self.limit,
                &self.limit_d,
                &self.o,
            );
            let label = |n: &str| self.label(n);
            let got = quant_rows(xd, Some(limit_d), Some(o))?;
            let want = quant_rows(x, Some(limit), None)?;
            same(c, label("rows (limit)"), &got, &want)?;
            // the row-wise pass raising the column maxima of the groups too
            let (got, maxima) = quant_rows_with_maxima(xd, Some(limit_d), Some(o), ed)?;
            same(c, label("rows with column maxima"), &got, &want)?;
            let maxima_ref = column_maxima_reference(x, ends)?;
            same_maxima(
                c,
                label("rows' column maxima"),
                maxima.as_ref(),
                &maxima_ref,
            );
            let (got, _) = quant_transposed(xd, ed, layout, Some(o), None)?;
            let (want, _) = quant_transposed(x, ends, layout, None, None)?;
            same(c, label("transposed, groups side by side"), &got, &want)?;
            let (got, _) = quant_transposed(xd, ed, layout, Some(o), maxima.as_ref())?;
            same(c, label("transposed from the rows' maxima"), &got, &want)?;
            let n_over = take_overflow(device)?;
            c.record(
                label("rows past the groups"),
                n_over == 0,
                format!("{n_over} overflows"),
            );
            // four stacked groups of `len` rows each, on the device against the reference
            let stacked = |c: &mut Checks, len: i64, what: &str| -> Result<()> {
                let w = x.f_narrow(0, 0, 4 * len)?;
                let ends: Vec<i32> = (1..=4).map(|g| (g * len) as i32).collect();
                let wends = Tensor::f_from_slice(&ends)?;
                let layout = Transposed::Stacked { len };
                let (got, _) = quant_transposed(
                    &w.f_to_device(device)?,
                    &wends.f_to_device(device)?,
                    layout,
                    None,
                    None,
                )?;
                let (want, _) = quant_transposed(&w, &wends, layout, None, None)?;
                same(c, label(what), &got, &want)?;
                // a weight copy's way: the row pass raises the maxima the stacked copy takes
                let (wd, ed) = (w.f_to_device(device)?, wends.f_to_device(device)?);
                let (_, maxima) = quant_rows_with_maxima(&wd, None, None, &ed)?;
                let (got, _) = quant_transposed(&wd, &ed, layout, None, maxima.as_ref())?;
                same(c, label(&format!("{what}, rows' maxima")), &got, &want)
            };
            stacked(c, 64, "transposed, stacked")?;
            // groups of a length that is no multiple of 16: the copy's byte-wise stores
            stacked(c, 24, "transposed, stacked by 24")?;
            Ok(())
        }

        /// The dispatch's gather and the combine's backward, each with its FP8 rows and
        /// column maxima in one pass.
        fn check_gathers(&self, c: &mut Checks) -> Result<()> {
            let device = self.device;
            let (x, o) = (&self.x, &self.o);
            let cpu = Device::Cpu;
            let label = |n: &str| self.label(n);
            // the dispatch's gather and quantisation in one pass
            let (t, k) = (100i64, 3i64);
            let tokens = x.f_narrow(0, 0, t)?;
            let mut slots = Tensor::f_randperm(t * k, (Kind::Int64, cpu))?;
            let _ = slots.f_narrow(0, 0, 17)?.f_fill_(-1)?;
            slots = slots.f_contiguous()?;
            // expert groups of the gathered rows (the last 17 of the 300 past them)
            let gather_ends = Tensor::f_from_slice(&[50i32, 50, 190, 283])?;
            let (xs, got, maxima) = gather_quant_rows(
                &tokens.f_to_device(device)?,
                &slots.f_to_device(device)?,
                k,
                None,
                None,
                Some(&gather_ends.f_to_device(device)?),
            )?;
            let xs_ref = gather_reference(&tokens, &slots, k)?;
            let want = quant_rows(&xs_ref, None, None)?;
            same(c, label("gather and rows"), &got, &want)?;
            c.close(label("gather's copy"), &xs, &xs_ref, 0.0)?;
            same_maxima(
                c,
                label("gather's column maxima"),
                maxima.as_ref(),
                &column_maxima_reference(&xs_ref, &gather_ends)?,
            );
            // the combine's backward: the weighted gather and its FP8 rows in one pass; the
            // copy is the gather kernel's (or reference's) output on the same device, the
            // FP8 rows the reference's quantisation of that copy
            let gate = Tensor::f_rand([t * k], (Kind::Float, cpu))?;
            let (td, sd, gd) = (
                tokens.f_to_device(device)?,
                slots.f_to_device(device)?,
                gate.f_to_device(device)?,
            );
            let (gys, got, maxima) = gather_quant_rows(
                &td,
                &sd,
                k,
                Some(&gd),
                Some(o),
                Some(&gather_ends.f_to_device(device)?),
            )?;
            let gys_ref = gather_rows(&td, &sd, k, Some(&gd))?;
            c.close(label("weighted gather's copy"), &gys, &gys_ref, 0.0)?;
            let want = quant_rows(&gys_ref.f_to_device(cpu)?, None, None)?;
            same(c, label("weighted gather and rows"), &got, &want)?;
            same_maxima(
                c,
                label("weighted gather's column maxima"),
                maxima.as_ref(),
                &column_maxima_reference(&gys.f_to_device(cpu)?, &gather_ends)?,
            );
            Ok(())
        }

        /// A fused pass's output (the activation's, or its backward's input gradient)
        /// beside `alone` (the op by itself on the same device) within `tol` on the
        /// groups' rows, zeros past them (no overflow from the NaN there), its FP8 rows and
        /// column maxima the reference's of that output; gives the reference's rows and
        /// the output on the CPU.
        #[allow(clippy::too_many_arguments)]
        fn pass_output(
            &self,
            c: &mut Checks,
            what: &str,
            out: &Tensor,
            alone: &Tensor,
            tol: f64,
            got: &Fp8,
            maxima: Option<&Tensor>,
        ) -> Result<(Fp8, Tensor)> {
            let (kept, rows) = (self.kept, self.rows);
            let (limit, ends) = (&self.limit, &self.ends);
            let label = |n: &str| self.label(n);
            c.close(
                label(&format!("{what} output")),
                &out.f_narrow(0, 0, kept)?,
                &alone.f_narrow(0, 0, kept)?,
                tol,
            )?;
            let past = out
                .f_narrow(0, kept, rows - kept)?
                .f_abs()?
                .f_sum(Kind::Float)?
                .f_double_value(&[])?;
            c.record(
                label(&format!("{what} past the groups")),
                past == 0.0,
                format!("sum |.| {past:.2e}"),
            );
            let out_cpu = out.f_to_device(Device::Cpu)?;
            let want = quant_rows(&out_cpu, Some(limit), None)?;
            same(c, label(&format!("{what} and rows")), got, &want)?;
            same_maxima(
                c,
                label(&format!("{what}'s column maxima")),
                maxima,
                &column_maxima_reference(&out_cpu, ends)?,
            );
            Ok((want, out_cpu))
        }

        /// The activations' passes and their backward passes, each beside the op alone on
        /// the same device, with no overflow from the rows past the groups.
        fn check_activations(&self, c: &mut Checks) -> Result<()> {
            let (a, b) = (
                self.xd.shallow_clone(),
                self.xd.f_flip([1])?.f_contiguous()?,
            );
            for act in Fp8Act::ALL {
                self.check_act_pass(c, act, &a, (act == Fp8Act::Swiglu).then_some(&b))?;
            }
            let g = b.f_mul_scalar(0.5)?;
            self.check_act_backward(c, &a, &g)?;
            self.check_swiglu_backward(c, &a, &b, &g)?;
            let n_over = take_overflow(self.device)?;
            c.record(
                self.label("fused passes' overflows"),
                n_over == 0,
                format!("{n_over} overflows"),
            );
            Ok(())
        }

        /// The activation's pass: its output beside the activation alone on the same device
        /// (SwiGLU: the SwiGLU kernel's bits; GELU: libtorch's within a bf16 rounding), its
        /// FP8 rows the reference's quantisation of that output; the pass without its output;
        /// the transposed copy computed on load.
        fn check_act_pass(
            &self,
            c: &mut Checks,
            act: Fp8Act,
            a: &Tensor,
            b: Option<&Tensor>,
        ) -> Result<()> {
            let (kind, layout) = (self.kind, self.layout);
            let (ends, ed, limit_d, o) = (&self.ends, &self.ed, &self.limit_d, &self.o);
            let label = |n: &str| self.label(n);
            let (out, got, maxima) = act_quant_rows(a, b, act, Some(limit_d), Some(o), Some(ed))?;
            let alone = match b {
                Some(b) => crate::runtime::cuda::ops::swiglu(a, b)?,
                None if act == Fp8Act::Gelu => a.f_gelu("none")?,
                None => a.f_relu()?,
            };
            let tol = match (act, kind) {
                (Fp8Act::Gelu, Kind::BFloat16) => 4e-3,
                (Fp8Act::Gelu, _) => 1e-6,
                _ => 0.0,
            };
            let (want, out_cpu) = self.pass_output(
                c,
                &format!("{act:?}"),
                &out,
                &alone,
                tol,
                &got,
                maxima.as_ref(),
            )?;
            // the pass without its output: the same FP8 rows and maxima
            let (got, maxima) = act_quant_rows_only(a, b, act, Some(limit_d), Some(o), Some(ed))?;
            same(c, label(&format!("{act:?} rows alone")), &got, &want)?;
            same_maxima(
                c,
                label(&format!("{act:?} alone's column maxima")),
                maxima.as_ref(),
                &column_maxima_reference(&out_cpu, ends)?,
            );
            // the transposed copy of the output computed on load from the input(s): the
            // reference's copy of the output the pass writes (uneven and empty groups;
            // NaN past the last group, never read), with the pass's maxima and without
            let (want, _) = quant_transposed(&out_cpu, ends, layout, None, None)?;
            let (got, _) = act_quant_transposed(a, b, act, ed, layout, Some(o), maxima.as_ref())?;
            same(
                c,
                label(&format!("{act:?} transposed on load")),
                &got,
                &want,
            )?;
            let (got, _) = act_quant_transposed(a, b, act, ed, layout, Some(o), None)?;
            same(
                c,
                label(&format!("{act:?} transposed, own maxima")),
                &got,
                &want,
            )?;
            Ok(())
        }

        /// The activation's backward pass: the input's gradient beside libtorch's backward on
        /// the same device (GELU within a bf16 rounding: the kernels' erf and exp are the fast
        /// ones), its FP8 rows and column maxima the reference's of that gradient.
        fn check_act_backward(&self, c: &mut Checks, a: &Tensor, g: &Tensor) -> Result<()> {
            let (kind, ed, limit_d, o) = (self.kind, &self.ed, &self.limit_d, &self.o);
            for act in Fp8ActGrad::ALL {
                let (ga, got, maxima) =
                    act_grad_quant_rows(a, g, act, Some(limit_d), Some(o), Some(ed))?;
                let alone = match act {
                    Fp8ActGrad::Gelu => a.f_gelu_backward(g, "none")?,
                    Fp8ActGrad::Relu => a.f_threshold_backward(g, 0.0)?,
                };
                let tol = match (act, kind) {
                    (Fp8ActGrad::Gelu, Kind::BFloat16) => 8e-3,
                    (Fp8ActGrad::Gelu, _) => 1e-5,
                    _ => 0.0,
                };
                let what = format!("{act:?} backward");
                let _ = self.pass_output(c, &what, &ga, &alone, tol, &got, maxima.as_ref())?;
            }
            Ok(())
        }

        /// SwiGLU's backward pass: both gradients beside the SwiGLU kernel's backward on the
        /// same device (the same arithmetic, swiglu_d), their FP8 rows and column maxima the
        /// reference's of those gradients; rows past the groups zeros.
        fn check_swiglu_backward(
            &self,
            c: &mut Checks,
            a: &Tensor,
            b: &Tensor,
            g: &Tensor,
        ) -> Result<()> {
            let (kind, ed, limit_d, o) = (self.kind, &self.ed, &self.limit_d, &self.o);
            let ((ga, qa, maxima_a), (gb, qb, maxima_b)) =
                swiglu_grad_quant_rows(a, b, g, Some(limit_d), Some(o), Some(ed))?;
            let (ga_alone, gb_alone) = swiglu_backward(a, b, g)?;
            let tol = if kind == Kind::BFloat16 { 4e-3 } else { 1e-6 };
            for (what, grad, alone, q, maxima) in [
                ("Swiglu backward a", &ga, &ga_alone, &qa, &maxima_a),
                ("Swiglu backward b", &gb, &gb_alone, &qb, &maxima_b),
            ] {
                let _ = self.pass_output(c, what, grad, alone, tol, q, maxima.as_ref())?;
            }
            Ok(())
        }

        /// Many groups of mixed sizes over more rows than a pass has blocks: blocks whose
        /// chunk holds whole groups, starts or ends inside one, or meets empty ones; the
        /// column maxima bit-equal both ways the blocks hand them on.
        fn check_many_groups(&self, c: &mut Checks) -> Result<()> {
            let (device, kind, d) = (self.device, self.kind, self.d);
            let o = &self.o;
            let cpu = Device::Cpu;
            let sizes = [1i64, 0, 2, 3, 7, 11, 29, 57, 300, 1500, 4, 0, 9, 130];
            let many: Vec<i32> = sizes
                .iter()
                .cycle()
                .take(sizes.len() * 20)
                .scan(0i64, |acc, c| {
                    *acc += c;
                    Some(*acc as i32)
                })
                .collect();
            let many_rows = *many.last().unwrap() as i64 + 5;
            let wide = Tensor::f_randn([many_rows, d], (Kind::Float, cpu))?.f_to_kind(kind)?;
            let many_ends = Tensor::f_from_slice(&many)?;
            let want = column_maxima_reference(&wide, &many_ends)?;
            for way in [MaximaReduction::TwoStep, MaximaReduction::Atomic] {
                reduce_maxima_on_this_thread(Some(way));
                let got = quant_rows_with_maxima(
                    &wide.f_to_device(device)?,
                    None,
                    Some(o),
                    &many_ends.f_to_device(device)?,
                );
                reduce_maxima_on_this_thread(None);
                same_maxima(
                    c,
                    format!(
                        "fp8 {:<30} {kind:?} rows={many_rows} d={d}",
                        format!("{} groups' maxima, {way:?}", many.len())
                    ),
                    got?.1.as_ref(),
                    &want,
                );
            }
            Ok(())
        }

        /// An Inf inside a group is an overflow; a NaN and an Inf inside the groups leave
        /// every other value of the output as without them.
        fn check_non_finite(&self, c: &mut Checks) -> Result<()> {
            self.check_inf_overflows(c)?;
            self.check_nan_and_inf(c)
        }

        /// An Inf inside a group is an overflow.
        fn check_inf_overflows(&self, c: &mut Checks) -> Result<()> {
            let (device, kept, o) = (self.device, self.kept, &self.o);
            let bad = self.x.f_narrow(0, 0, kept)?.f_detach_copy()?;
            let _ = bad.f_get(3)?.f_get(7)?.f_fill_(f64::INFINITY)?;
            let _ = quant_rows(&bad.f_to_device(device)?, None, Some(o))?;
            let n_over = take_overflow(device)?;
            c.record(
                self.label("an Inf overflows"),
                n_over == 1,
                format!("{n_over} overflows"),
            );
            Ok(())
        }

        /// A NaN and an Inf inside the groups: the bf16 passes take `held`'s way for a row
        /// with a NaN, so every other value of the output (that row's too) and of every other
        /// row is as without them, the FP8 rows the reference's of that output, and each such
        /// row an overflow.
        fn check_nan_and_inf(&self, c: &mut Checks) -> Result<()> {
            let (device, kept, d) = (self.device, self.kept, self.d);
            let (x, ed, o) = (&self.x, &self.ed, &self.o);
            let cpu = Device::Cpu;
            let clean_in = x.f_narrow(0, 0, kept)?.f_to_device(device)?;
            let bad_in = clean_in.f_detach_copy()?;
            let _ = bad_in.f_get(3)?.f_get(7)?.f_fill_(f64::NAN)?;
            let _ = bad_in.f_get(40)?.f_get(9)?.f_fill_(f64::INFINITY)?;
            let keep = Tensor::f_ones([kept, d], (Kind::Bool, device))?;
            let _ = keep.f_get(3)?.f_get(7)?.f_fill_(0i64)?;
            let _ = keep.f_get(40)?.f_get(9)?.f_fill_(0i64)?;
            let _ = take_overflow(device)?;
            let got = quant_rows(&bad_in, None, Some(o))?;
            let want = quant_rows(&bad_in.f_to_device(cpu)?, None, None)?;
            same(c, self.label("rows with a NaN and an Inf"), &got, &want)?;
            let grad_of = clean_in.f_flip([1])?.f_contiguous()?;
            for (name, bad_out, clean_out, got, maxima) in [
                {
                    let gelu = |x: &Tensor, o: Option<&Tensor>| {
                        act_quant_rows(x, None, Fp8Act::Gelu, None, o, Some(ed))
                    };
                    let (out, q, maxima) = gelu(&bad_in, Some(o))?;
                    ("Gelu", out, gelu(&clean_in, None)?.0, q, maxima)
                },
                {
                    let backward = |x: &Tensor, o: Option<&Tensor>| {
                        act_grad_quant_rows(x, &grad_of, Fp8ActGrad::Gelu, None, o, Some(ed))
                    };
                    let (out, q, maxima) = backward(&bad_in, Some(o))?;
                    (
                        "Gelu backward",
                        out,
                        backward(&clean_in, None)?.0,
                        q,
                        maxima,
                    )
                },
            ] {
                self.check_pass_with_nan(c, name, &keep, (&bad_out, &clean_out), &got, maxima)?;
            }
            let n_over = take_overflow(device)?;
            c.record(
                self.label("NaN and Inf rows overflow"),
                n_over == 6,
                format!("{n_over} overflows (6 expected: 2 rows in each of 3 passes)"),
            );
            Ok(())
        }

        /// Pass `name` over an input with a NaN and an Inf: its output `bad_out` equals the
        /// output without them (`clean_out`) at every value `keep` marks, and its FP8 rows
        /// (`got`) and column `maxima` are the reference's of that output.
        fn check_pass_with_nan(
            &self,
            c: &mut Checks,
            name: &str,
            keep: &Tensor,
            (bad_out, clean_out): (&Tensor, &Tensor),
            got: &Fp8,
            maxima: Option<ColumnMaxima>,
        ) -> Result<()> {
            let kept_equal = |got: &Tensor, want: &Tensor| -> Result<bool> {
                Ok(got
                    .f_masked_select(keep)?
                    .f_equal(&want.f_masked_select(keep)?)?)
            };
            c.record(
                self.label(&format!("{name} with a NaN, other values")),
                kept_equal(bad_out, clean_out)?,
                "bit-equal to the pass without the NaN and the Inf".into(),
            );
            let bad_cpu = bad_out.f_to_device(Device::Cpu)?;
            let want = quant_rows(&bad_cpu, None, None)?;
            same(
                c,
                self.label(&format!("{name} with a NaN, rows")),
                got,
                &want,
            )?;
            same_maxima(
                c,
                self.label(&format!("{name} with a NaN, column maxima")),
                maxima.as_ref(),
                &column_maxima_reference(&bad_cpu, &self.ends)?,
            );
            Ok(())
        }
    }

    /// The inputs of the autograd ops' checks: `e = 5` experts (one empty) over `rows_kept`
    /// rows of width `k` and 40 dropped ones (NaN), weights `k -> n`, in the kind the device
    /// holds (bf16 on a GPU), so that the emulation and the references start from the same
    /// values.
    struct OpsCase {
        device: Device,
        kind: Kind,
        rows_kept: i64,
        k: i64,
        n: i64,
        /// the experts' ends
        cut: Vec<i64>,
        ends: Tensor,
        /// `[rows, k]` inputs, `[e, k, n]` weights, `[rows, n]` output gradients (on the CPU)
        x: Tensor,
        w: Tensor,
        g: Tensor,
        /// the experts' weight gradients on FP8 operands (else on bf16 ones)
        fp8_wgrad: bool,
    }

    impl OpsCase {
        fn new(device: Device, rows_kept: i64, k: i64, n: i64, fp8_wgrad: bool) -> Result<OpsCase> {
            let cpu = Device::Cpu;
            let e = 5i64;
            let mut cut: Vec<i64> = (0..e - 1)
                .map(|_| rand_u(rows_kept as u64) as i64)
                .collect();
            cut.push(rows_kept);
            cut.sort_unstable();
            cut[1] = cut[0]; // an empty expert
            let ends = Tensor::f_from_slice(&cut.iter().map(|&v| v as i32).collect::<Vec<_>>())?;
            let rows = rows_kept + 40;
            // the inputs as the device holds them (bf16 there), so that the emulation and
            // the references start from the same values
            let kind = if device.is_cuda() {
                Kind::BFloat16
            } else {
                Kind::Float
            };
            let held = |t: Tensor| t.f_to_kind(kind)?.f_to_kind(Kind::Float);
            let x = held(Tensor::f_randn([rows, k], (Kind::Float, cpu))?)?;
            let _ = x.f_narrow(0, rows_kept, 40)?.f_fill_(f64::NAN)?;
            let w = Tensor::f_randn([e, k, n], (Kind::Float, cpu))?.f_mul_scalar(0.05)?;
            let g = held(Tensor::f_randn([rows, n], (Kind::Float, cpu))?)?;
            Ok(OpsCase {
                device,
                kind,
                rows_kept,
                k,
                n,
                cut,
                ends,
                x,
                w,
                g,
                fp8_wgrad,
            })
        }

        fn label(&self, name: &str) -> String {
            let (rows_kept, k, n) = (self.rows_kept, self.k, self.n);
            format!("fp8 {name:<30} rows={rows_kept} {k}->{n}")
        }

        /// [`OpsCase::label`] with the operands of the experts' weight gradients.
        fn experts_label(&self, name: &str) -> String {
            let wgrad = if self.fp8_wgrad { "fp8" } else { "bf16" };
            format!("{} wgrad {wgrad}", self.label(name))
        }

        /// The experts' grouped matmul on `dev` in `kind`: the kept rows' output and input
        /// gradient, and the weight gradient, on the CPU in f32.
        fn experts(&self, dev: Device, kind: Kind) -> Result<(Tensor, Tensor, Tensor)> {
            let rows_kept = self.rows_kept;
            let (ends, x, w, g) = (&self.ends, &self.x, &self.w, &self.g);
            let cpu = Device::Cpu;
            let xg = leaf(x, dev, kind)?;
            let wg = leaf(w, dev, Kind::Float)?;
            let out = grouped_mm(&xg, &wg, &ends.f_to_device(dev)?, self.fp8_wgrad)?;
            let gd = g.f_to_device(dev)?.f_to_kind(out.kind())?;
            let kept_out = out.f_narrow(0, 0, rows_kept)?;
            kept_out
                .f_to_kind(Kind::Float)?
                .f_mul(&gd.f_narrow(0, 0, rows_kept)?.f_to_kind(Kind::Float)?)?
                .f_sum(Kind::Float)?
                .f_backward()?;
            Ok((
                kept_out.f_to_device(cpu)?.f_to_kind(Kind::Float)?,
                xg.grad()
                    .f_narrow(0, 0, rows_kept)?
                    .f_to_device(cpu)?
                    .f_to_kind(Kind::Float)?,
                wg.grad().f_to_device(cpu)?,
            ))
        }

        /// The experts' op: the weight's copies made once per step, the forward and both
        /// gradients against the CPU emulation and against f64 (FP8's own error).
        fn check_experts(&self, c: &mut Checks) -> Result<()> {
            let (device, kind, rows_kept) = (self.device, self.kind, self.rows_kept);
            let (cut, x, w, g) = (&self.cut, &self.x, &self.w, &self.g);
            let label = |n: &str| self.experts_label(n);
            let (out, gx, gw) = self.experts(device, kind)?;
            // within a step the backward (on a GPU, libtorch's autograd thread runs it) takes
            // the weight's copies that the forward made
            begin_step()?;
            let made = with_state(device, |s| s.copies_made);
            let _ = self.experts(device, kind)?;
            let made = with_state(device, |s| s.copies_made) - made;
            end_step();
            c.record(
                label("weight copies, once per step"),
                made == 1,
                format!("{made} made in a step's forward and backward"),
            );
            let (out_e, gx_e, gw_e) = self.experts(Device::Cpu, Kind::Float)?;
            c.close(label("experts forward vs emulation"), &out, &out_e, 1e-2)?;
            c.close(label("experts grad x vs emulation"), &gx, &gx_e, 1e-2)?;
            c.close(label("experts grad w vs emulation"), &gw, &gw_e, 1e-2)?;
            // FP8's own error: against f64 on the unquantised inputs
            let x64 = x.f_narrow(0, 0, rows_kept)?.f_to_kind(Kind::Double)?;
            let w64 = w.f_to_kind(Kind::Double)?;
            let g64 = g.f_narrow(0, 0, rows_kept)?.f_to_kind(Kind::Double)?;
            let mut outs = Vec::new();
            let mut gxs = Vec::new();
            let mut gws = Vec::new();
            let mut start = 0;
            for (j, &end) in cut.iter().enumerate() {
                let xe = x64.f_narrow(0, start, end - start)?;
                let ge = g64.f_narrow(0, start, end - start)?;
                let we = w64.f_select(0, j as i64)?;
                outs.push(xe.f_matmul(&we)?);
                gxs.push(ge.f_matmul(&we.f_transpose(0, 1)?)?);
                gws.push(xe.f_transpose(0, 1)?.f_matmul(&ge)?);
                start = end;
            }
            let want_out = Tensor::f_cat(&outs, 0)?;
            let want_gx = Tensor::f_cat(&gxs, 0)?;
            let want_gw = Tensor::f_stack(&gws, 0)?;
            c.close(label("experts forward vs f64"), &out, &want_out, 8e-2)?;
            c.close(label("experts grad x vs f64"), &gx, &want_gx, 8e-2)?;
            c.close(label("experts grad w vs f64"), &gw, &want_gw, 8e-2)?;
            let empty = gw.f_select(0, 1)?.f_abs()?.f_max()?.f_double_value(&[])?;
            c.record(
                label("empty expert's grad w"),
                empty == 0.0,
                format!("max |.| {empty:.2e}"),
            );
            Ok(())
        }

        /// The activation fused with the second matmul (`x` as the first matmul's output,
        /// `w` as the second's weight): bit for bit the activation's output then the
        /// matmul, forward and every gradient.
        fn check_activation_mm(&self, c: &mut Checks) -> Result<()> {
            let (device, kind, rows_kept) = (self.device, self.kind, self.rows_kept);
            let (ends, x, w, g) = (&self.ends, &self.x, &self.w, &self.g);
            let cpu = Device::Cpu;
            let label = |n: &str| self.experts_label(n);
            for act in Fp8Act::ALL {
                let run_act = |on_load: bool| -> Result<Vec<Tensor>> {
                    let h1 = leaf(x, device, kind)?;
                    let h3 = leaf(&x.f_flip([1])?, device, kind)?;
                    let wg = leaf(w, device, Kind::Float)?;
                    let ed = ends.f_to_device(device)?;
                    let h3 = (act == Fp8Act::Swiglu).then_some(h3);
                    let out = if on_load {
                        activation_mm(&h1, h3.as_ref(), act, &wg, &ed, self.fp8_wgrad)?
                    } else {
                        let h = activation(&h1, h3.as_ref(), act, &ed, self.fp8_wgrad)?;
                        grouped_mm(&h, &wg, &ed, self.fp8_wgrad)?
                    };
                    forget_prequantized();
                    let kept_out = out.f_narrow(0, 0, rows_kept)?;
                    let gd = g.f_narrow(0, 0, rows_kept)?.f_to_device(device)?;
                    kept_out
                        .f_to_kind(Kind::Float)?
                        .f_mul(&gd)?
                        .f_sum(Kind::Float)?
                        .f_backward()?;
                    let mut got = vec![kept_out, h1.grad().f_narrow(0, 0, rows_kept)?, wg.grad()];
                    if let Some(h3) = &h3 {
                        got.push(h3.grad().f_narrow(0, 0, rows_kept)?);
                    }
                    got.into_iter().map(|t| Ok(t.f_to_device(cpu)?)).collect()
                };
                let want = run_act(false)?;
                let got = run_act(true)?;
                let ok = want.len() == got.len() && want.iter().zip(&got).all(|(a, b)| a.equal(b));
                c.record(
                    label(&format!("{act:?} and matmul, output on load")),
                    ok,
                    if ok {
                        "bit-equal to the output then the matmul".into()
                    } else {
                        "differ from the output then the matmul".into()
                    },
                );
            }
            Ok(())
        }

        /// The dense op in both weight layouts: forward and both gradients against the CPU
        /// emulation and against f64.
        fn check_dense(&self, c: &mut Checks) -> Result<()> {
            let (device, kind, rows_kept) = (self.device, self.kind, self.rows_kept);
            let (x, w, g) = (&self.x, &self.w, &self.g);
            let cpu = Device::Cpu;
            let label = |n: &str| self.label(n);
            // a bias as the projections have (in the matmul's epilogue), and none as the
            // tied head
            let bias = Tensor::f_randn([self.n], (Kind::Float, cpu))?;
            for (layout, biased) in [(WeightLayout::InOut, true), (WeightLayout::OutIn, false)] {
                let xs = x.f_narrow(0, 0, rows_kept)?;
                let wd = match layout {
                    WeightLayout::OutIn => w.f_select(0, 0)?.f_transpose(0, 1)?.f_contiguous()?,
                    _ => w.f_select(0, 0)?.f_contiguous()?,
                };
                let gs = g.f_narrow(0, 0, rows_kept)?;
                let run = |dev: Device, kind: Kind| -> Result<[Tensor; 4]> {
                    let xg = leaf(&xs, dev, kind)?;
                    let wg = leaf(&wd, dev, Kind::Float)?;
                    let bg = leaf(&bias, dev, Kind::Float)?;
                    let out = linear(&xg, &wg, biased.then_some(&bg), layout)?;
                    out.f_to_kind(Kind::Float)?
                        .f_mul(&gs.f_to_device(dev)?)?
                        .f_sum(Kind::Float)?
                        .f_backward()?;
                    let gb = if biased {
                        bg.grad().f_to_device(cpu)?
                    } else {
                        Tensor::f_zeros([self.n], (Kind::Float, cpu))?
                    };
                    Ok([
                        out.f_to_device(cpu)?.f_to_kind(Kind::Float)?,
                        xg.grad().f_to_device(cpu)?.f_to_kind(Kind::Float)?,
                        wg.grad().f_to_device(cpu)?,
                        gb,
                    ])
                };
                let [out, gx, gw, gb] = run(device, kind)?;
                let [out_e, gx_e, gw_e, gb_e] = run(cpu, Kind::Float)?;
                let l = |n: &str| {
                    let with = if biased { " with bias" } else { "" };
                    label(&format!("dense {layout:?}{with} {n}"))
                };
                c.close(l("forward vs emulation"), &out, &out_e, 1e-2)?;
                c.close(l("grad x vs emulation"), &gx, &gx_e, 1e-2)?;
                c.close(l("grad w vs emulation"), &gw, &gw_e, 1e-2)?;
                let w64 = w.f_select(0, 0)?.f_to_kind(Kind::Double)?;
                let x64 = xs.f_to_kind(Kind::Double)?;
                let g64 = gs.f_to_kind(Kind::Double)?;
                let want_gw = x64.f_transpose(0, 1)?.f_matmul(&g64)?;
                let want_gw = match layout {
                    WeightLayout::OutIn => want_gw.f_transpose(0, 1)?,
                    _ => want_gw,
                };
                let mut want_out = x64.f_matmul(&w64)?;
                if biased {
                    want_out = want_out.f_add(&bias.f_to_kind(Kind::Double)?)?;
                    // the bias's gradient: the output gradient's column sums, in f32 both
                    c.close(l("grad b vs emulation"), &gb, &gb_e, 1e-2)?;
                    let want_gb = g64.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
                    c.close(l("grad b vs f64"), &gb, &want_gb, 1e-2)?;
                }
                c.close(l("forward vs f64"), &out, &want_out, 8e-2)?;
                c.close(l("grad w vs f64"), &gw, &want_gw, 8e-2)?;
                let r = rel(&gx, &g64.f_matmul(&w64.f_transpose(0, 1)?)?)?;
                c.record(
                    l("grad x vs f64"),
                    r.is_finite() && r <= 8e-2,
                    format!("rel err {r:.2e}"),
                );
            }
            Ok(())
        }
    }

    /// A fresh leaf requiring grad: `t`'s values on `device` in `kind`.
    fn leaf(t: &Tensor, device: Device, kind: Kind) -> Result<Tensor> {
        Ok(t.f_detach()?
            .f_to_device(device)?
            .f_to_kind(kind)?
            .f_detach_copy()?
            .f_set_requires_grad(true)?)
    }

    /// A pseudo-random number below `n` from libtorch's generator.
    fn rand_u(n: u64) -> u64 {
        Tensor::randint(n.max(1) as i64, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// On the CPU both sides of the check are the reference: this runs the ops' autograd
        /// wiring and the emulation against f64 in CI.
        #[test]
        fn fp8_ops_match_the_reference_on_cpu() {
            let lines = self_check(Device::Cpu).unwrap();
            eprintln!("{}", lines.join("\n"));
            assert!(lines.len() >= 25, "{lines:?}");
            assert!(lines.iter().all(|l| l.ends_with(" ok")), "{lines:?}");
        }

        /// `examples/tiny.fmoe` with `precision`, `steps` steps and learning rate `lr`, a
        /// smaller batch, no checkpoints or evaluation.
        fn tiny(precision: &str, steps: u64, lr: &str) -> crate::check::Checked {
            let steps = format!("steps = {steps}");
            let lr = format!("lr = {lr}");
            crate::runtime::testing::tiny(&[
                ("precision  = fp32", precision),
                ("steps      = 300", &steps),
                ("lr = 1e-3", &lr),
                ("batch      = 16 x 128 tokens", "batch = 8 x 64 tokens"),
            ])
        }

        fn run(checked: &crate::check::Checked) -> Result<crate::runtime::train::RunSummary> {
            let dir = tempfile::tempdir().unwrap();
            crate::runtime::testing::train_alone(
                checked,
                &crate::runtime::train::RunOptions {
                    device: Device::Cpu,
                    steps: None,
                    stop_after: None,
                    out: dir.path().to_path_buf(),
                    checkpoints: dir.path().join("checkpoints"),
                    resume: None,
                    progress: false,
                    print_summary: false,
                    cuda_graph: false,
                    ..Default::default()
                },
            )
        }

        /// The tiny example in the CPU's emulation of FP8 (experts, then every matmul) against
        /// fp32 from the same seed and data: the losses stay within FP8's rounding of the
        /// fp32 run's, and both learn.
        #[test]
        fn fp8_trains_the_tiny_example_as_fp32_does() {
            super::super::emulate_on_this_thread(true);
            super::super::force_experts_on_this_thread(Some(true));
            let steps = 8;
            let fp32 = run(&tiny("precision = fp32", steps, "1e-3")).unwrap();
            let fp8 = run(&tiny("precision = fp8", steps, "1e-3")).unwrap();
            super::super::force_dense_on_this_thread(Some(true));
            let dense = run(&tiny("precision = fp8\n fp8_dense = true", steps, "1e-3")).unwrap();
            // the dense matmuls stay in bf16 where FP8 does not pay (these narrow layers):
            // the run with only the experts in FP8
            super::super::force_dense_on_this_thread(None);
            let dense_auto =
                run(&tiny("precision = fp8\n fp8_dense = true", steps, "1e-3")).unwrap();
            // the same in bf16 where FP8 does not pay (these narrow experts): the fp32 run's
            let auto = {
                super::super::force_experts_on_this_thread(None);
                run(&tiny("precision = fp8", steps, "1e-3")).unwrap()
            };
            super::super::emulate_on_this_thread(false);
            assert_eq!(auto.losses, fp32.losses);
            assert_eq!(dense_auto.losses, fp8.losses);
            assert_ne!(
                dense.losses, fp8.losses,
                "FP8 dense matmuls change the rounding"
            );
            assert_ne!(fp8.losses, fp32.losses, "FP8 changes the rounding");
            assert_eq!(fp8.precision, "fp8");
            for (label, r) in [("fp8", &fp8), ("fp8 dense", &dense)] {
                for (i, (a, b)) in r.losses.iter().zip(&fp32.losses).enumerate() {
                    assert!(
                        (a - b).abs() / b < 0.02,
                        "{label} step {}: {a} against fp32 {b}\n{:?}\n{:?}",
                        i + 1,
                        r.losses,
                        fp32.losses
                    );
                }
                assert!(
                    r.losses[steps as usize - 1] < r.losses[0] - 0.3,
                    "{label}: {:?}",
                    r.losses
                );
            }
        }

        /// A step whose FP8 scales overflow (here: a learning rate that blows the weights up)
        /// stops the run with the step's number, before the optimizer applies it.
        #[test]
        fn an_fp8_overflow_stops_the_run_before_the_step_is_applied() {
            super::super::emulate_on_this_thread(true);
            super::super::force_experts_on_this_thread(Some(true));
            let err = run(&tiny("precision = fp8", 6, "1e30")).unwrap_err();
            super::super::force_experts_on_this_thread(None);
            super::super::emulate_on_this_thread(false);
            let msg = format!("{err:#}");
            assert!(msg.contains("FP8 scale(s) overflowed"), "{msg}");
            assert!(msg.contains("the step was not applied"), "{msg}");
        }

        /// The fused passes (the activation writing its output's FP8 rows, the combine's
        /// backward writing the experts' output gradient's) give what quantising each tensor
        /// on its own gives, and the matmuls take those copies: the whole expert path with
        /// the fused plan against the unfused one, forward and every gradient (on the CPU
        /// both quantise with the reference; `self_check` holds the kernels to it on a GPU).
        #[test]
        fn dense_projections_take_their_passes_column_maxima_and_share_a_copy() {
            let cpu = Device::Cpu;
            let (t, d, h) = (24i64, 32i64, 48i64);
            tch::manual_seed(23);
            let x = Tensor::randn([t, d], (Kind::Float, cpu)).to_kind(Kind::BFloat16);
            let g = Tensor::randn([t, h], (Kind::Float, cpu));
            let w1 = Tensor::randn([d, h], (Kind::Float, cpu)) * 0.1;
            let w3 = Tensor::randn([d, h], (Kind::Float, cpu)) * 0.1;
            let b1 = Tensor::randn([h], (Kind::Float, cpu));
            // SwiGLU's two projections of one `x` (shared: one transposed copy of it, made
            // from the maxima the first forward's pass raised), or of two copies of it (each
            // its own); the weight gradients the same bits either way
            let run = |shared: bool| -> (Vec<Tensor>, u64) {
                let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
                let (l1, l3, lb) = (leaf(&w1), leaf(&w3), leaf(&b1));
                let xa = leaf(&x);
                let xb = if shared { xa.shallow_clone() } else { leaf(&x) };
                let before = maxima_used();
                let a = linear(&xa, &l1, Some(&lb), WeightLayout::InOut).unwrap();
                let b = linear(&xb, &l3, None, WeightLayout::InOut).unwrap();
                assert_eq!(operand_extras_held(), if shared { 1 } else { 2 });
                (a.to_kind(Kind::Float) * &g + b.to_kind(Kind::Float) * &g)
                    .sum(Kind::Float)
                    .backward();
                assert_eq!(operand_extras_held(), 0, "kept past the backward");
                let used = maxima_used() - before;
                (vec![a.detach(), l1.grad(), l3.grad(), lb.grad()], used)
            };
            let (shared, used_shared) = run(true);
            let (separate, used_separate) = run(false);
            assert_eq!((used_shared, used_separate), (1, 2));
            for (n, (a, b)) in shared.iter().zip(&separate).enumerate() {
                assert!(a.equal(b), "tensor {n} differs");
            }
            // the bias in the epilogue: the output is x·W + b rounded once to bf16, and
            // the bias's gradient the output gradient's column sums (in f32)
            let want_gb = g
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float)
                .sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
            assert!(shared[3].allclose(&want_gb, 1e-5, 1e-5, false));
            // no backward (evaluation): nothing kept
            let w = w1.set_requires_grad(true);
            let _ = tch::no_grad(|| linear(&x, &w, None, WeightLayout::InOut)).unwrap();
            assert_eq!(operand_extras_held(), 0, "kept without a backward");
        }

        #[test]
        fn fused_quantisations_give_the_separate_ones_and_the_matmuls_take_them() {
            use crate::check::Activation;
            use crate::runtime::moe::{run_experts, DispatchPlan, ExpertPath, Experts};
            let cpu = Device::Cpu;
            let (t, k, e, d, h) = (40i64, 2i64, 4i64, 32i64, 48i64);
            tch::manual_seed(17);
            // token i's slots go to experts i² mod 4 and (i² + 3) mod 4: uneven groups
            let i = Tensor::arange(t, (Kind::Int64, cpu)).unsqueeze(1);
            let expert = Tensor::cat(&[&i * &i, &i * &i + 3], 1).remainder(e);
            let gate = Tensor::rand([t, k], (Kind::Float, cpu));
            let x = Tensor::randn([t, d], (Kind::Float, cpu));
            let g = Tensor::randn([t, d], (Kind::Float, cpu));
            let w1 = Tensor::randn([e, d, h], (Kind::Float, cpu)) * 0.1;
            let w2 = Tensor::randn([e, h, d], (Kind::Float, cpu)) * 0.1;
            let w3 = Tensor::randn([e, d, h], (Kind::Float, cpu)) * 0.1;
            // (matmuls that took a pass's copy) for each activation, with the fused plan:
            // the first matmul(s) the dispatch's and the activation backward's (SwiGLU's
            // two first matmuls one gradient each), the second the activation's forward and
            // the combine's backward; (weight
            // gradients that took a pass's column maxima) fused and not: the passes' above,
            // and every output gradient's own row-wise pass (SwiGLU's second first matmul
            // reuses the first's transposed copy of xs)
            // (the second matmul takes the activation's FP8 rows straight from its pass when
            // the two are one node: one fewer taken through the kept copies)
            for (act, takes, maxima) in [
                (Activation::Gelu, 4, (4, 2)),
                (Activation::Relu, 4, (4, 2)),
                (Activation::Swiglu, 6, (5, 3)),
            ] {
                let run =
                    |fused: bool, on_load: bool, fp8_wgrad: bool| -> (Vec<Tensor>, u64, u64) {
                        let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
                        let (xl, gl) = (leaf(&x), leaf(&gate));
                        let ex = Experts {
                            experts: e,
                            act,
                            w1: leaf(&w1),
                            w2: leaf(&w2),
                            w3: (act == Activation::Swiglu).then(|| leaf(&w3)),
                            b1: None,
                            b2: None,
                            path: ExpertPath::Grouped,
                            fp8: true,
                            fp8_wgrad,
                        };
                        let mut plan =
                            DispatchPlan::with_kernels(&expert, e, false, false).unwrap();
                        // the fused ops (each with its libtorch fallback on the CPU)
                        plan.fused = fused;
                        let before = prequantized_used();
                        let maxima_before = maxima_used();
                        crate::runtime::fp8::activation_on_load_on_this_thread(Some(on_load));
                        let out = run_experts(&ex, &xl, &plan, &gl, t);
                        crate::runtime::fp8::activation_on_load_on_this_thread(None);
                        let out = out.unwrap();
                        (&out * &g).sum(Kind::Float).backward();
                        let mut got = vec![
                            out.detach(),
                            xl.grad(),
                            gl.grad(),
                            ex.w1.grad(),
                            ex.w2.grad(),
                        ];
                        if let Some(w3) = &ex.w3 {
                            got.push(w3.grad());
                        }
                        assert_eq!(operand_extras_held(), 0, "{act:?}: kept past the backward");
                        (
                            got,
                            prequantized_used() - before,
                            maxima_used() - maxima_before,
                        )
                    };
                let (fused, used, fused_maxima) = run(true, false, true);
                let (separate, unused, own_maxima) = run(false, false, true);
                assert_eq!((used, unused), (takes, 0), "{act:?}");
                assert_eq!((fused_maxima, own_maxima), maxima, "{act:?}");
                // the activation's output computed again on load by the weight gradient's
                // transposed copy: the same bits everywhere, the same maxima taken
                let (on_load, used, on_load_maxima) = run(true, true, true);
                assert_eq!(used, takes - 1, "{act:?} on load");
                assert_eq!(on_load_maxima, maxima.0, "{act:?} on load");
                for (n, (a, b)) in on_load.iter().zip(&fused).enumerate() {
                    assert!(a.equal(b), "{act:?} on load, tensor {n} differs");
                }
                // SwiGLU's fused pass and libtorch's silu · h3 (and their backwards) round
                // differently in f32, which can move an FP8 rounding and with it one element
                // of a bf16 weight gradient by an ulp; GELU and ReLU compute the same values
                let tol = if act == Activation::Swiglu {
                    2e-3
                } else {
                    1e-5
                };
                let close = |a: &[Tensor], b: &[Tensor], tol: f64, what: &str| {
                    for (n, (a, b)) in a.iter().zip(b).enumerate() {
                        let diff = (a - b).abs().max().double_value(&[]);
                        let top = b.abs().max().double_value(&[]);
                        assert!(
                            top > 0.0 && diff <= tol * top,
                            "{act:?} {what} tensor {n}: {diff} of {top}"
                        );
                    }
                };
                close(&fused, &separate, tol, "fused");
                // the weight gradients on the layer's bf16 operands (as where the experts'
                // rows are few): no column maxima raised or taken, nothing kept; the output
                // and the input and gate gradients the same bits as above (their operands
                // are the same), the weight gradients those of the operands unquantised
                let (bf16_wgrad, used, no_maxima) = run(true, false, false);
                assert_eq!(
                    (used, no_maxima),
                    (takes, 0),
                    "{act:?} bf16 weight gradients"
                );
                for n in 0..3 {
                    assert!(
                        bf16_wgrad[n].equal(&fused[n]),
                        "{act:?} bf16 wgrad, tensor {n}"
                    );
                }
                close(
                    &bf16_wgrad[3..],
                    &fused[3..],
                    0.1,
                    "bf16 wgrad against fp8 wgrad",
                );
                let (separate_bf16, _, _) = run(false, false, false);
                close(&separate_bf16, &bf16_wgrad, tol, "separate bf16 wgrad");
                // with the activation on load, its output made again for the weight gradient:
                // the same bits as the output the forward kept
                let (on_load_bf16, _, no_maxima) = run(true, true, false);
                assert_eq!(no_maxima, 0, "{act:?} on load, bf16 weight gradients");
                for (n, (a, b)) in on_load_bf16.iter().zip(&bf16_wgrad).enumerate() {
                    assert!(a.equal(b), "{act:?} on load bf16 wgrad, tensor {n} differs");
                }
            }
            forget_prequantized();
        }

        /// The weight gradient on unquantised operands is each expert's `xᵀ · g` over its
        /// rows, whatever the rows past the last group hold (padding the matmul must not
        /// read), empty groups giving zeros.
        #[test]
        fn unquantised_weight_gradient_is_each_experts_own() {
            tch::manual_seed(5);
            let (k, n) = (24i64, 40i64);
            let counts = [7i64, 0, 12, 5];
            let used: i64 = counts.iter().sum();
            let rows = used + 6;
            let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
            let g = Tensor::randn([rows, n], (Kind::Float, Device::Cpu));
            // padding rows past the last group: large, so reading them would show
            let _ = x.narrow(0, used, rows - used).fill_(1e4);
            let ends: Vec<i32> = counts
                .iter()
                .scan(0i64, |acc, c| {
                    *acc += c;
                    Some(*acc as i32)
                })
                .collect();
            let ends = Tensor::from_slice(&ends);
            let got = unquantised_weight_grad(&x, &g, &ends).unwrap();
            assert_eq!(got.size(), [4, k, n]);
            let mut start = 0;
            for (e, c) in counts.iter().enumerate() {
                let want = x
                    .narrow(0, start, *c)
                    .transpose(0, 1)
                    .matmul(&g.narrow(0, start, *c))
                    .to_kind(Kind::BFloat16)
                    .to_kind(Kind::Float);
                let diff = (got.get(e as i64).to_kind(Kind::Float) - &want)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(
                    diff <= 1e-2 * (1.0 + want.abs().max().double_value(&[])),
                    "expert {e}: {diff}"
                );
                start += c;
            }
            assert_eq!(got.get(1).abs().max().double_value(&[]), 0.0);
        }

        /// On the CPU without the emulation, `precision = fp8` is refused up front.
        #[test]
        fn fp8_on_the_cpu_is_refused_without_the_emulation() {
            let err = run(&tiny("precision = fp8", 2, "1e-3")).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains("FP8 tensor cores") && msg.contains("FMOEC_FP8_EMULATE"),
                "{msg}"
            );
        }

        #[test]
        fn op_codes_round_trip() {
            let mut ops = vec![
                Fp8Op::Linear {
                    layout: WeightLayout::InOut,
                    biased: false,
                },
                Fp8Op::Linear {
                    layout: WeightLayout::InOut,
                    biased: true,
                },
                Fp8Op::Linear {
                    layout: WeightLayout::OutIn,
                    biased: false,
                },
            ];
            for fp8_wgrad in [false, true] {
                ops.extend([
                    Fp8Op::Grouped { fp8_wgrad },
                    Fp8Op::Dispatch { k: 2, fp8_wgrad },
                    Fp8Op::Dispatch { k: 8, fp8_wgrad },
                    Fp8Op::Combine { fp8_wgrad },
                ]);
                for act in Fp8Act::ALL {
                    ops.push(Fp8Op::Act { act, fp8_wgrad });
                    ops.push(Fp8Op::ActGrouped { act, fp8_wgrad });
                }
            }
            for op in ops {
                assert_eq!(Fp8Op::from_code(op.code()).unwrap(), op);
            }
            assert!(Fp8Op::from_code(1 | (2 << 16)).is_err());
        }
    }
}
