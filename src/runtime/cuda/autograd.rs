//! Autograd functions whose forward and backward are Rust, through the C++ shim (tch has
//! no custom autograd): the fused MoE glue ([`dispatch_op`], [`combine_op`], [`swiglu_op`],
//! [`bias_act_op`]), the LM loss ([`cross_entropy_rows`]) and [`cast_op`], which hands a
//! weight's precomputed compute-dtype copy to autograd (for `runtime::cast`).
//!
//! The shim's function takes a list of tensors, an op code and a callback; [`apply`] and
//! [`callback_body`] are the generic halves other modules build their own ops on (each with
//! its own callback and op codes, so this module needs to know none of them).
//!
//! Knows the ops' index conventions (see [`super::ops`]), not the layer or the trainer.

use std::ffi::{c_int, c_void};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::device::shim_error;
use super::kernels::{device_index, kernels_ready, Elem, EpilogueAct};
use super::ops::{
    bias_act_pass, gather_rows, norm_backward, norm_forward, norm_kernel_fits, norm_reduce,
    row_dots, segment_sums, sum_rows, swiglu, swiglu_backward, xent_backward, xent_forward,
    NORM_KERNEL_EPS,
};

/// The shim's callback: `phase` 0 is the forward (`n_in` inputs, writes 1 output), 1 the
/// backward (the saved inputs and the output's gradient, writes one gradient per input,
/// null where none). Inputs are owned `at::Tensor*` copies the callee frees; outputs are
/// `at::Tensor*` the callee allocates. Returns 0 on success.
pub type Callback = unsafe extern "C" fn(
    op: i64,
    phase: c_int,
    inputs: *mut *mut c_void,
    n_in: c_int,
    outputs: *mut *mut c_void,
    n_out: c_int,
) -> c_int;

extern "C" {
    fn fmoec_shim_apply(
        op: i64,
        callback: *mut c_void,
        inputs: *mut *mut c_void,
        n_in: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn fmoec_shim_apply_multi(
        op: i64,
        callback: *mut c_void,
        inputs: *mut *mut c_void,
        n_in: c_int,
        out: *mut *mut c_void,
        n_out: c_int,
        keep: i64,
    ) -> c_int;
}

/// Which half of an autograd function the callback runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The inputs in; the one output out.
    Forward,
    /// The saved inputs and the output's gradient (last) in; one gradient per input out.
    Backward,
}

/// Defines `unsafe extern "C" fn NAME`, a shim [`Callback`] that runs `RUN` (a
/// `Fn(i64, Phase, Vec<Tensor>) -> Result<Vec<Option<Tensor>>>`, the op code, the phase and the
/// tensors) through [`callback_body`]: the shim takes a C function pointer, not a closure, so
/// each family of ops has a function of its own, and this writes it.
macro_rules! shim_callback {
    ($(#[$meta:meta])* $name:ident => $run:expr) => {
        $(#[$meta])*
        unsafe extern "C" fn $name(
            op: i64,
            phase: std::ffi::c_int,
            inputs: *mut *mut std::ffi::c_void,
            n_in: std::ffi::c_int,
            outputs: *mut *mut std::ffi::c_void,
            n_out: std::ffi::c_int,
        ) -> std::ffi::c_int {
            // SAFETY: the shim calls this with its callback contract, which `callback_body`
            // needs.
            unsafe {
                $crate::runtime::cuda::autograd::callback_body(
                    op, phase, inputs, n_in, outputs, n_out, $run,
                )
            }
        }
    };
}
pub(crate) use shim_callback;

/// The body of a shim callback: takes ownership of the inputs, runs `run` on them (op code
/// and phase as the shim passed them), hands the outputs to the shim, and turns errors and
/// panics into a non-zero status with the error on stderr (the shim's exception says which
/// op failed).
///
/// # Safety
/// `inputs` must hold `n_in` owned `at::Tensor*` and `outputs` have room for `n_out`
/// pointers: the shim's contract for its callbacks.
pub unsafe fn callback_body(
    op: i64,
    phase: c_int,
    inputs: *mut *mut c_void,
    n_in: c_int,
    outputs: *mut *mut c_void,
    n_out: c_int,
    run: impl Fn(i64, Phase, Vec<Tensor>) -> Result<Vec<Option<Tensor>>>,
) -> c_int {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        let phase = match phase {
            0 => Phase::Forward,
            1 => Phase::Backward,
            other => bail!("unknown phase {other}"),
        };
        let mut ins = Vec::with_capacity(n_in as usize);
        for i in 0..n_in as usize {
            // SAFETY: the shim passes `n_in` `new at::Tensor` copies that we now own.
            ins.push(unsafe { Tensor::from_ptr((*inputs.add(i)).cast()) });
        }
        let outs = run(op, phase, ins)?;
        if outs.len() != n_out as usize {
            bail!("op {op}: {} outputs for {n_out} slots", outs.len());
        }
        for (i, o) in outs.into_iter().enumerate() {
            let p = match o {
                Some(mut t) => {
                    let p = t.as_mut_ptr() as *mut c_void;
                    // the shim takes ownership of the at::Tensor behind `p`
                    std::mem::forget(t);
                    p
                }
                None => std::ptr::null_mut(),
            };
            // SAFETY: `outputs` has `n_out` slots and `i < n_out` (checked above).
            unsafe { *outputs.add(i) = p };
        }
        Ok(())
    }));
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("fmoec op {op} ({phase}): {e:#}");
            1
        }
        Err(_) => 1,
    }
}

/// Applies the autograd function `op` of `callback` to `inputs` (at most 16; pass defined
/// empty tensors for unused slots: autograd reads every input's device) and returns its one
/// output.
pub fn apply(callback: Callback, op: i64, inputs: Vec<Tensor>) -> Result<Tensor> {
    let mut inputs = inputs;
    let mut ptrs: Vec<*mut c_void> = inputs
        .iter_mut()
        .map(|t| t.as_mut_ptr() as *mut c_void)
        .collect();
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `ptrs` points at the `at::Tensor`s of `inputs`, which stay alive (and are not
    // moved) for the call; the shim copies them, and on success hands back a fresh
    // `at::Tensor` that we own; `callback` has the shim's callback signature.
    let rc = unsafe {
        fmoec_shim_apply(
            op,
            callback as *mut c_void,
            ptrs.as_mut_ptr(),
            ptrs.len() as c_int,
            &mut out,
        )
    };
    drop(inputs);
    if rc != 0 || out.is_null() {
        return Err(shim_error(&format!("autograd op {op}")));
    }
    // SAFETY: `out` is a `new at::Tensor` from the shim, owned from here on.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// [`apply`] for an op with `n_out` outputs whose backward reads only the inputs of index
/// set in the bit mask `keep` (the others are not held for it; it gets undefined tensors in
/// their place) and the outputs: its callback's backward gets the `n` inputs, the `n_out`
/// outputs, then one gradient per output (undefined where none reached it), and writes one
/// gradient per input.
pub fn apply_multi(
    callback: Callback,
    op: i64,
    inputs: Vec<Tensor>,
    n_out: usize,
    keep: u64,
) -> Result<Vec<Tensor>> {
    let mut inputs = inputs;
    let mut ptrs: Vec<*mut c_void> = inputs
        .iter_mut()
        .map(|t| t.as_mut_ptr() as *mut c_void)
        .collect();
    let mut out: Vec<*mut c_void> = vec![std::ptr::null_mut(); n_out];
    // SAFETY: as in `apply`: `ptrs` points at the live `at::Tensor`s of `inputs`, which the
    // shim copies; `out` has `n_out` slots, which on success hold fresh `at::Tensor`s that
    // we own.
    let rc = unsafe {
        fmoec_shim_apply_multi(
            op,
            callback as *mut c_void,
            ptrs.as_mut_ptr(),
            ptrs.len() as c_int,
            out.as_mut_ptr(),
            n_out as c_int,
            keep as i64,
        )
    };
    drop(inputs);
    if rc != 0 || out.iter().any(|p| p.is_null()) {
        // SAFETY: each non-null slot is a `new at::Tensor` from the shim, owned here.
        out.iter()
            .filter(|p| !p.is_null())
            .for_each(|p| drop(unsafe { Tensor::from_ptr(p.cast()) }));
        return Err(shim_error(&format!("autograd op {op}")));
    }
    // SAFETY: every slot is a `new at::Tensor` from the shim, owned from here on.
    Ok(out
        .into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p.cast()) })
        .collect())
}

/// A defined, empty tensor for an unused input slot.
pub fn unused() -> Result<Tensor> {
    Ok(Tensor::f_empty([0], (Kind::Float, Device::Cpu))?)
}

/// The fused glue ops of this module, each with what it needs besides its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FusedOp {
    /// Gather into expert order; `k` slots per token.
    Dispatch {
        k: i64,
    },
    Combine,
    Swiglu,
    BiasAct(EpilogueAct),
    Cast,
    CrossEntropy,
}

impl FusedOp {
    /// The op as the shim carries it: the kind in the low 8 bits, the parameter above.
    fn code(self) -> i64 {
        match self {
            FusedOp::Dispatch { k } => 1 | (k << 8),
            FusedOp::Combine => 2,
            FusedOp::Swiglu => 3,
            FusedOp::BiasAct(act) => {
                4 | (match act {
                    EpilogueAct::None => 0,
                    EpilogueAct::Gelu => 1,
                    EpilogueAct::Relu => 2,
                } << 8)
            }
            FusedOp::Cast => 5,
            FusedOp::CrossEntropy => 6,
        }
    }

    fn from_code(code: i64) -> Result<FusedOp> {
        let param = code >> 8;
        Ok(match code & 0xFF {
            1 => FusedOp::Dispatch { k: param },
            2 => FusedOp::Combine,
            3 => FusedOp::Swiglu,
            4 => FusedOp::BiasAct(match param {
                0 => EpilogueAct::None,
                1 => EpilogueAct::Gelu,
                2 => EpilogueAct::Relu,
                _ => bail!("fused op {code}: unknown activation"),
            }),
            5 => FusedOp::Cast,
            6 => FusedOp::CrossEntropy,
            _ => bail!("unknown fused op {code}"),
        })
    }
}

fn run_op(op: FusedOp, phase: Phase, inputs: Vec<Tensor>) -> Result<Vec<Option<Tensor>>> {
    let undefined = |t: &Tensor| !t.defined();
    match (op, phase) {
        // dispatch: a = x [T, d], b = row_slot [N], c = slot_row [T·k]
        (FusedOp::Dispatch { k }, Phase::Forward) => {
            Ok(vec![Some(gather_rows(&inputs[0], &inputs[1], k, None)?)])
        }
        (FusedOp::Dispatch { k }, Phase::Backward) => Ok(vec![
            dispatch_backward(&inputs[2], &inputs[3], k)?,
            None,
            None,
        ]),
        // combine: a = ys [N, d], b = weight [T, k] f32, c = slot_row [T·k], d = row_slot [N]
        (FusedOp::Combine, Phase::Forward) => {
            let (ys, w, slot_row) = (&inputs[0], &inputs[1], &inputs[2]);
            let k = combine_k(&inputs)?;
            let w = w.f_to_kind(Kind::Float)?;
            Ok(vec![Some(sum_rows(ys, slot_row, k, Some(&w))?)])
        }
        (FusedOp::Combine, Phase::Backward) => {
            let k = combine_k(&inputs)?;
            let (ys, w, slot_row, row_slot, g) =
                (&inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4]);
            if undefined(g) {
                return Ok(vec![None, None, None, None]);
            }
            let g = g.f_to_kind(ys.kind())?;
            let gys = if ys.requires_grad() {
                Some(gather_rows(
                    &g,
                    row_slot,
                    k,
                    Some(&w.f_to_kind(Kind::Float)?),
                )?)
            } else {
                None
            };
            let gw = combine_weight_gradient(ys, w, slot_row, &g)?;
            Ok(vec![gys, gw, None, None])
        }
        // swiglu: a = h1, b = h3
        (FusedOp::Swiglu, Phase::Forward) => Ok(vec![Some(swiglu(&inputs[0], &inputs[1])?)]),
        (FusedOp::Swiglu, Phase::Backward) => {
            if undefined(&inputs[2]) {
                return Ok(vec![None, None]);
            }
            let g = inputs[2].f_to_kind(inputs[0].kind())?;
            let (ga, gb) = swiglu_backward(&inputs[0], &inputs[1], &g)?;
            Ok(vec![Some(ga), Some(gb)])
        }
        // bias epilogue: a = h [N, d], b = bias [E, d], c = row_expert [N]
        (FusedOp::BiasAct(act), Phase::Forward) => {
            let out = bias_act_pass(&inputs[0], &inputs[1], &inputs[2], act, None)?;
            Ok(vec![Some(out)])
        }
        (FusedOp::BiasAct(act), Phase::Backward) => {
            let (h, bias, row_expert, g) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
            if undefined(g) {
                return Ok(vec![None, None, None]);
            }
            let g = g.f_to_kind(h.kind())?;
            let gh = bias_act_pass(h, bias, row_expert, act, Some(&g))?;
            let gb = if bias.requires_grad() {
                Some(segment_sums(&gh, row_expert, bias.size()[0])?)
            } else {
                None
            };
            Ok(vec![h.requires_grad().then_some(gh), gb, None])
        }
        // cross-entropy: a = logits [N, V], b = target [N] int64, c = lse [N] f32 (written)
        (FusedOp::CrossEntropy, Phase::Forward) => Ok(vec![Some(xent_forward(
            &inputs[0], &inputs[1], &inputs[2],
        )?)]),
        (FusedOp::CrossEntropy, Phase::Backward) => {
            let g = &inputs[3];
            if undefined(g) {
                return Ok(vec![None, None, None]);
            }
            let grad = xent_backward(&inputs[0], &inputs[1], &inputs[2], g)?;
            Ok(vec![Some(grad), None, None])
        }
        // cast: a = master, b = its copy in the compute dtype (made by the caller)
        (FusedOp::Cast, Phase::Forward) => Ok(vec![Some(inputs[1].f_detach()?)]),
        (FusedOp::Cast, Phase::Backward) => {
            let (master, g) = (&inputs[0], &inputs[2]);
            if undefined(g) {
                return Ok(vec![None, None]);
            }
            Ok(vec![master_gradient(master, g)?, None])
        }
    }
}

/// The backward of a gather into expert order (the fused dispatch's and the FP8 one's): each
/// token's gradient, the sum of its `k` slots' rows of `g` (`[N, d]`, expert order; dropped
/// slots skipped), none where `g` is undefined.
pub fn dispatch_backward(slot_row: &Tensor, g: &Tensor, k: i64) -> Result<Option<Tensor>> {
    if !g.defined() {
        return Ok(None);
    }
    Ok(Some(sum_rows(g, slot_row, k, None)?))
}

/// The gradient of a combine in its gate weights `w` (`[T, k]`, none unless it requires
/// grad): each slot's expert output row `ys[slot_row[s]]` dotted with its token's output
/// gradient `g` (`[T, d]`, `ys`'s dtype), in `w`'s dtype.
pub fn combine_weight_gradient(
    ys: &Tensor,
    w: &Tensor,
    slot_row: &Tensor,
    g: &Tensor,
) -> Result<Option<Tensor>> {
    if !w.requires_grad() {
        return Ok(None);
    }
    let k = *w.size().last().unwrap_or(&1);
    Ok(Some(
        row_dots(ys, slot_row, k, g)?
            .f_to_kind(w.kind())?
            .f_reshape(w.size())?,
    ))
}

/// A master weight's gradient `g` (any dtype, the master's element count): added into the
/// master's `.grad` in one pass (f32 += bf16) where that exists, and then none for autograd;
/// else converted to the master's dtype and shape for autograd to start it.
pub fn master_gradient(master: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    let g = g.f_reshape(master.size())?;
    let mut acc = master.grad();
    if acc.defined() && acc.kind() == master.kind() && acc.size() == g.size() {
        let _ = acc.f_add_(&g)?;
        return Ok(None);
    }
    Ok(Some(g.f_to_kind(master.kind())?))
}

/// `k` of a combine: the weight's second dimension (`[T, k]`), checked against the indices.
fn combine_k(inputs: &[Tensor]) -> Result<i64> {
    let slots = inputs[2].size()[0];
    let rows = inputs[3].size()[0];
    if rows != slots || slots == 0 {
        bail!("combine: {rows} expert rows for {slots} slots");
    }
    let w = &inputs[1];
    match w.size().as_slice() {
        [_, k] => Ok(*k),
        _ => bail!("combine: weight must be [T, k]"),
    }
}

shim_callback!(fused_callback => |op, phase, ins| run_op(FusedOp::from_code(op)?, phase, ins));

fn apply_fused(op: FusedOp, inputs: Vec<Tensor>) -> Result<Tensor> {
    apply(fused_callback, op.code(), inputs)
}

/// Gathers `x` (`[T, d]`) into expert order (`[N, d]`; rows with `row_slot < 0` are zero),
/// differentiable in `x` with a gather-sum backward (no atomics).
pub fn dispatch_op(x: &Tensor, row_slot: &Tensor, slot_row: &Tensor, k: i64) -> Result<Tensor> {
    apply_fused(
        FusedOp::Dispatch { k },
        vec![
            x.shallow_clone(),
            row_slot.shallow_clone(),
            slot_row.shallow_clone(),
        ],
    )
    .context("fused dispatch")
}

/// `silu(h1) · h3` in one pass, differentiable in both with a one-pass backward.
pub fn swiglu_op(h1: &Tensor, h3: &Tensor) -> Result<Tensor> {
    apply_fused(
        FusedOp::Swiglu,
        vec![h1.shallow_clone(), h3.shallow_clone()],
    )
    .context("fused swiglu")
}

/// `act(h[r] + bias[row_expert[r]])` over rows in expert order (zero rows for dropped slots,
/// whose `h` rows are not used), differentiable in `h` and `bias` (`[E, d]`, `h`'s dtype):
/// one pass forward, one pass plus per-expert column sums (no atomics) backward.
pub fn bias_act_op(
    h: &Tensor,
    bias: &Tensor,
    row_expert: &Tensor,
    act: EpilogueAct,
) -> Result<Tensor> {
    apply_fused(
        FusedOp::BiasAct(act),
        vec![
            h.shallow_clone(),
            bias.shallow_clone(),
            row_expert.shallow_clone(),
        ],
    )
    .context("fused bias epilogue")
}

/// Per-row cross-entropy `logsumexp(logits[r]) - logits[r, target[r]]` (`[N]` f32; 0 where the
/// target is outside `[0, V)`) of `logits` `[N, V]` (bf16 or f32, on a GPU, rows of a multiple
/// of 16 bytes) against `target` `[N]`, differentiable in `logits`: one pass over the logits
/// forward and one backward, in their own dtype, instead of a conversion to f32, a
/// log-softmax and its backward. `None` where the kernels do not apply.
pub fn cross_entropy_rows(logits: &Tensor, target: &Tensor) -> Result<Option<Tensor>> {
    if Elem::of(logits).is_none()
        || logits.dim() != 2
        || !logits.is_contiguous()
        || logits.size()[1] >= i32::MAX as i64
        || kernels_ready(device_index(logits)).is_err()
    {
        return Ok(None);
    }
    let rows = logits.size()[0];
    let target = target.f_to_kind(Kind::Int64)?.f_contiguous()?;
    if target.size() != [rows] {
        bail!(
            "cross-entropy: {rows} rows of logits, targets {:?}",
            target.size()
        );
    }
    let lse = Tensor::f_empty([rows], (Kind::Float, logits.device()))?;
    Ok(Some(
        apply_fused(
            FusedOp::CrossEntropy,
            vec![logits.shallow_clone(), target, lse],
        )
        .context("cross-entropy")?,
    ))
}

/// `copy` (`master` already converted, not requiring grad) as a differentiable function of
/// `master`: no work forward; backward, the gradient added into `master`'s `.grad` in one
/// pass where that exists, else converted to `master`'s dtype for autograd to start it.
pub fn cast_op(master: &Tensor, copy: &Tensor) -> Result<Tensor> {
    apply_fused(
        FusedOp::Cast,
        vec![master.shallow_clone(), copy.shallow_clone()],
    )
    .context("cached cast")
}

/// `out[t] = Σ_j weight[t, j] · ys[slot_row[t·k+j]]` (`[T, d]`), differentiable in `ys` and
/// `weight` (`[T, k]`, f32) with gather backwards (no atomics).
pub fn combine_op(
    ys: &Tensor,
    weight: &Tensor,
    slot_row: &Tensor,
    row_slot: &Tensor,
) -> Result<Tensor> {
    apply_fused(
        FusedOp::Combine,
        vec![
            ys.shallow_clone(),
            weight.shallow_clone(),
            slot_row.shallow_clone(),
            row_slot.shallow_clone(),
        ],
    )
    .context("fused combine")
}

/// The norm of [`add_norm_op`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormOp {
    /// LayerNorm: gain and bias.
    LayerNorm,
    /// RMSNorm: gain only.
    RmsNorm,
}

/// [`add_norm_op`] as its callback carries it: the norm in bit 0 (RMSNorm set), bit 1 set
/// when there is a residual branch `h` (two outputs).
fn norm_code(norm: NormOp, with_h: bool) -> i64 {
    (norm == NormOp::RmsNorm) as i64 | (with_h as i64) << 1
}

fn norm_from_code(code: i64) -> Result<(NormOp, bool)> {
    if !(0..4).contains(&code) {
        bail!("unknown norm op {code}");
    }
    let norm = if code & 1 == 1 {
        NormOp::RmsNorm
    } else {
        NormOp::LayerNorm
    };
    Ok((norm, code & 2 == 2))
}

/// The input slots of [`add_norm_op`]: the rows `x` and `h` (`[rows, d]`), the gain's master
/// and its copy in `x`'s dtype, the bias's (LayerNorm), and the per-row statistics (f32,
/// written by the forward; the mean for LayerNorm only). Unused slots hold [`unused`].
const NORM_X: usize = 0;
const NORM_H: usize = 1;
const NORM_GAMMA: usize = 2;
const NORM_GAMMA_COPY: usize = 3;
const NORM_BETA: usize = 4;
const NORM_BETA_COPY: usize = 5;
const NORM_MEAN: usize = 6;
const NORM_RSTD: usize = 7;
const NORM_INPUTS: usize = 8;

/// The inputs the backward reads: `x` where there is no `h` (then `s` is `x`), the masters
/// (their `.grad`), the gain's copy and the statistics; never `h`, nor `x` beside it (`s` is
/// an output, saved).
fn norm_keep(with_h: bool) -> u64 {
    let mut keep = [NORM_GAMMA, NORM_GAMMA_COPY, NORM_BETA, NORM_MEAN, NORM_RSTD]
        .iter()
        .fold(0u64, |k, i| k | 1 << i);
    if !with_h {
        keep |= 1 << NORM_X;
    }
    keep
}

/// The weights of a norm: the master (normally f32, requiring grad: the gradient is added
/// into its `.grad`) and its copy in the activations' dtype (not requiring grad; the master
/// itself, detached, where the dtypes agree).
pub struct NormWeight<'a> {
    pub master: &'a Tensor,
    pub copy: &'a Tensor,
}

/// What [`add_norm_op`] returns: the residual stream `s` (`x + h`; `x` itself where there
/// was no `h`) and the norm's output `y`, both `x`'s shape.
pub struct AddNorm {
    pub s: Tensor,
    pub y: Tensor,
}

/// `s = x + h` (where `h` is given) and `y = norm(s) · gamma (+ beta)` over the last
/// dimension, eps [`NORM_KERNEL_EPS`], statistics in f32, in one pass; differentiable in `x`,
/// `h` and the masters, with a one-pass backward (`dx = dh = ds + norm'(dy)`) whose gain and
/// bias gradients are reduced from per-block partial sums straight into the masters' f32
/// `.grad` where that exists. `None` where the kernels do not apply ([`norm_kernel_fits`],
/// another eps, or no kernels on the device): the caller runs libtorch.
pub fn add_norm_op(
    x: &Tensor,
    h: Option<&Tensor>,
    gamma: NormWeight,
    beta: Option<NormWeight>,
    eps: f64,
) -> Result<Option<AddNorm>> {
    let norm = if beta.is_some() {
        NormOp::LayerNorm
    } else {
        NormOp::RmsNorm
    };
    let d = *x.size().last().unwrap_or(&0);
    let masters_fit = gamma.master.numel() as i64 == d
        && beta.as_ref().is_none_or(|b| b.master.numel() as i64 == d);
    if eps != NORM_KERNEL_EPS
        || !masters_fit
        || norm_kernel_fits(x, h, gamma.copy, beta.as_ref().map(|b| b.copy)).is_none()
        || kernels_ready(device_index(x)).is_err()
    {
        return Ok(None);
    }
    let rows = x.numel() as i64 / d;
    let f32s = (Kind::Float, x.device());
    let with_h = h.is_some();
    // `x` and `h` as they are, not reshaped to `[rows, d]`: a view of each would come back from
    // their gradients' view backward as two views of the one `dx`, which two leaves' `.grad`
    // would both take as their own and then accumulate into twice (the same tensor for both,
    // as libtorch's add hands back, is copied by autograd where two hold it)
    let mut inputs = Vec::with_capacity(NORM_INPUTS);
    inputs.push(x.shallow_clone());
    inputs.push(h.map(Tensor::shallow_clone).map_or_else(unused, Ok)?);
    inputs.push(gamma.master.shallow_clone());
    inputs.push(gamma.copy.f_detach()?);
    match &beta {
        Some(b) => {
            inputs.push(b.master.shallow_clone());
            inputs.push(b.copy.f_detach()?);
            inputs.push(Tensor::f_empty([rows], f32s)?);
        }
        None => {
            inputs.push(unused()?);
            inputs.push(unused()?);
            inputs.push(unused()?);
        }
    }
    inputs.push(Tensor::f_empty([rows], f32s)?);
    let outs = apply_multi(
        norm_callback,
        norm_code(norm, with_h),
        inputs,
        1 + with_h as usize,
        norm_keep(with_h),
    )
    .context("fused residual add and norm")?;
    let mut outs = outs.into_iter();
    let (s, y) = match (with_h, outs.next(), outs.next()) {
        (true, Some(s), Some(y)) => (s, y),
        (false, Some(y), None) => (x.shallow_clone(), y),
        _ => bail!("fused residual add and norm: unexpected outputs"),
    };
    Ok(Some(AddNorm { s, y }))
}

/// The forward and backward of [`add_norm_op`] (see [`apply_multi`] for the tensors each
/// gets).
fn run_norm(code: i64, phase: Phase, inputs: Vec<Tensor>) -> Result<Vec<Option<Tensor>>> {
    let (norm, with_h) = norm_from_code(code)?;
    let n_out = 1 + with_h as usize;
    let layer = norm == NormOp::LayerNorm;
    let expected = match phase {
        Phase::Forward => NORM_INPUTS,
        Phase::Backward => NORM_INPUTS + 2 * n_out,
    };
    if inputs.len() != expected {
        bail!("fused norm: {} tensors for {expected}", inputs.len());
    }
    let mean = layer.then(|| &inputs[NORM_MEAN]);
    let rstd = &inputs[NORM_RSTD];
    let gamma = &inputs[NORM_GAMMA_COPY];
    match phase {
        Phase::Forward => {
            let out = norm_forward(
                &inputs[NORM_X],
                with_h.then(|| &inputs[NORM_H]),
                gamma,
                layer.then(|| &inputs[NORM_BETA_COPY]),
                mean,
                rstd,
            )?;
            Ok(match out.s {
                Some(s) => vec![Some(s), Some(out.y)],
                None => vec![Some(out.y)],
            })
        }
        Phase::Backward => {
            // the outputs (s and y, or y), then their gradients
            let grads = &inputs[NORM_INPUTS + n_out..];
            let (s, ds, dy) = if with_h {
                (&inputs[NORM_INPUTS], Some(&grads[0]), &grads[1])
            } else {
                (&inputs[NORM_X], None, &grads[0])
            };
            let ds = match ds.filter(|g| g.defined()) {
                Some(g) => Some(g.f_to_kind(s.kind())?.f_contiguous()?),
                None => None,
            };
            let mut out: Vec<Option<Tensor>> = (0..NORM_INPUTS).map(|_| None).collect();
            let dx = if dy.defined() {
                let dy = dy.f_to_kind(s.kind())?.f_contiguous()?;
                let (dx, dgamma, dbeta) = norm_backward(&dy, ds.as_ref(), s, gamma, mean, rstd)?;
                let masters = [(NORM_GAMMA, Some(dgamma)), (NORM_BETA, dbeta)];
                let reduced = reduce_into_masters(
                    masters
                        .into_iter()
                        .filter_map(|(slot, part)| Some((&inputs[slot], part?)))
                        .collect(),
                )?;
                for (slot, g) in [NORM_GAMMA, NORM_BETA].into_iter().zip(reduced) {
                    out[slot] = g;
                }
                Some(dx)
            } else {
                ds
            };
            if let Some(dx) = dx {
                if with_h {
                    out[NORM_H] = Some(dx.shallow_clone());
                }
                out[NORM_X] = Some(dx);
            }
            Ok(out)
        }
    }
}

/// Reduces each `(master, partial sums)` pair's partial sums (`[blocks, d]` f32) into the
/// master's gradient: added into its `.grad` where that is an f32 tensor of its shape (then
/// none for autograd), else summed into a new one (converted to the master's dtype) that
/// autograd adds or starts `.grad` with; none for a master that does not require grad. One
/// launch where both masters are reduced the same way.
fn reduce_into_masters(pairs: Vec<(&Tensor, Tensor)>) -> Result<Vec<Option<Tensor>>> {
    // (partial sums, target, accumulate), for the masters that require grad
    let mut targets = Vec::with_capacity(pairs.len());
    for (master, part) in &pairs {
        if !master.requires_grad() {
            targets.push(None);
            continue;
        }
        let acc = master.grad();
        let into_grad = master.kind() == Kind::Float
            && acc.defined()
            && acc.kind() == Kind::Float
            && acc.size() == master.size()
            && acc.is_contiguous()
            && acc.device() == part.device();
        let target = if into_grad {
            acc
        } else {
            Tensor::f_empty([part.size()[1]], (Kind::Float, part.device()))?
        };
        targets.push(Some((part, target, into_grad)));
    }
    let live: Vec<_> = targets.iter().flatten().collect();
    match live.as_slice() {
        [(pa, ta, a), (pb, tb, b)] if a == b => norm_reduce(pa, ta, Some((pb, tb)), *a)?,
        _ => {
            for (part, target, accumulate) in &live {
                norm_reduce(part, target, None, *accumulate)?;
            }
        }
    }
    pairs
        .iter()
        .zip(targets)
        .map(|((master, _), t)| match t {
            Some((_, target, false)) => Ok(Some(
                target.f_reshape(master.size())?.f_to_kind(master.kind())?,
            )),
            _ => Ok(None),
        })
        .collect()
}

shim_callback!(norm_callback => run_norm);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_codes_round_trip() {
        for op in [
            FusedOp::Dispatch { k: 8 },
            FusedOp::Combine,
            FusedOp::Swiglu,
            FusedOp::BiasAct(EpilogueAct::None),
            FusedOp::BiasAct(EpilogueAct::Gelu),
            FusedOp::BiasAct(EpilogueAct::Relu),
            FusedOp::Cast,
            FusedOp::CrossEntropy,
        ] {
            assert_eq!(FusedOp::from_code(op.code()).unwrap(), op);
        }
        assert!(FusedOp::from_code(99).is_err());
    }

    #[test]
    fn norm_codes_round_trip() {
        for norm in [NormOp::LayerNorm, NormOp::RmsNorm] {
            for with_h in [false, true] {
                assert_eq!(
                    norm_from_code(norm_code(norm, with_h)).unwrap(),
                    (norm, with_h)
                );
            }
        }
        assert!(norm_from_code(4).is_err());
    }

    /// The backward keeps what it reads, and never the residual branch `h`, which it does
    /// not read (nor `x` where the residual sum `s` is an output).
    #[test]
    fn norm_backward_keeps_only_what_it_reads() {
        let kept = |keep: u64| (0..NORM_INPUTS).filter(move |i| keep >> i & 1 == 1);
        let with_h: Vec<usize> = kept(norm_keep(true)).collect();
        assert!(!with_h.contains(&NORM_H) && !with_h.contains(&NORM_X));
        for slot in [NORM_GAMMA, NORM_GAMMA_COPY, NORM_BETA, NORM_MEAN, NORM_RSTD] {
            assert!(with_h.contains(&slot), "slot {slot}");
        }
        let without: Vec<usize> = kept(norm_keep(false)).collect();
        assert!(without.contains(&NORM_X) && !without.contains(&NORM_H));
    }

    /// On a CPU (or with another eps) the op declines, and the caller's libtorch path runs.
    #[test]
    fn add_norm_declines_where_the_kernels_do_not_apply() {
        let x = Tensor::ones([2, 3, 16], (Kind::Float, Device::Cpu));
        let g = Tensor::ones([16], (Kind::Float, Device::Cpu));
        let weight = || NormWeight {
            master: &g,
            copy: &g,
        };
        assert!(add_norm_op(&x, Some(&x), weight(), None, NORM_KERNEL_EPS)
            .unwrap()
            .is_none());
        assert!(add_norm_op(&x, None, weight(), Some(weight()), 1e-6)
            .unwrap()
            .is_none());
    }

    /// A two-output op for [`two_outputs_reach_autograd`]: `(a + b, a · b)`, whose backward
    /// keeps `a` alone (it finds `b` as `(a + b) - a`, from the saved outputs).
    fn run_pair(_op: i64, phase: Phase, ins: Vec<Tensor>) -> Result<Vec<Option<Tensor>>> {
        match phase {
            Phase::Forward => Ok(vec![
                Some(ins[0].f_add(&ins[1])?),
                Some(ins[0].f_mul(&ins[1])?),
            ]),
            Phase::Backward => {
                let [a, b, sum, _prod, g_sum, g_prod] = ins.as_slice() else {
                    bail!("{} tensors for the backward", ins.len());
                };
                if b.defined() {
                    bail!("b was kept for the backward");
                }
                for g in [g_sum, g_prod] {
                    if g.defined() && g.f_abs()?.f_max()?.f_double_value(&[])? == 0.0 {
                        bail!("an unused output's gradient was made zeros");
                    }
                }
                if _op == 1 {
                    // one tensor for both inputs, as `dx = dh` of the fused norm
                    let g = g_sum.f_mul_scalar(1.0)?;
                    return Ok(vec![Some(g.shallow_clone()), Some(g)]);
                }
                let b = sum.f_sub(a)?;
                let mut ga = a.f_zeros_like()?;
                let mut gb = a.f_zeros_like()?;
                if g_sum.defined() {
                    ga = ga.f_add(g_sum)?;
                    gb = gb.f_add(g_sum)?;
                }
                if g_prod.defined() {
                    ga = ga.f_add(&g_prod.f_mul(&b)?)?;
                    gb = gb.f_add(&g_prod.f_mul(a)?)?;
                }
                Ok(vec![Some(ga), Some(gb)])
            }
        }
    }

    shim_callback!(pair_callback => run_pair);

    /// One gradient tensor handed back for two inputs (the fused norm's `dx = dh`): over two
    /// backward passes each leaf's `.grad` accumulates on its own (autograd copies a gradient
    /// two hold). Given views of the leaves instead (`a.reshape([1, 3])`, as `add_norm_op`
    /// once passed `[rows, d]` views), each view's backward hands its leaf a view of the one
    /// tensor, both `.grad` share it and the second pass leaves 3.0 in each: so the op takes
    /// `x` and `h` as they are (the GPU check's failures of 2026-12-07, 14:15 UTC).
    #[test]
    fn one_gradient_for_two_inputs_accumulates_apart() {
        let leaf = |v: &[f64]| Tensor::from_slice(v).set_requires_grad(true);
        let (a, b) = (leaf(&[1.0, 2.0, -3.0]), leaf(&[4.0, -5.0, 0.5]));
        for _ in 0..2 {
            let outs = apply_multi(
                pair_callback,
                1,
                vec![a.shallow_clone(), b.shallow_clone()],
                2,
                1,
            )
            .unwrap();
            outs[0].sum(Kind::Double).backward();
        }
        assert_eq!(Vec::<f64>::try_from(&a.grad()).unwrap(), [2.0, 2.0, 2.0]);
        assert_eq!(Vec::<f64>::try_from(&b.grad()).unwrap(), [2.0, 2.0, 2.0]);
    }

    /// The shim's multi-output function: both outputs' values, both gradients back to the
    /// inputs, an unused output's gradient undefined (not zeros), and only the kept inputs
    /// saved for the backward.
    #[test]
    fn two_outputs_reach_autograd() {
        let leaf = |v: &[f64]| Tensor::from_slice(v).set_requires_grad(true);
        let (a, b) = (leaf(&[1.0, 2.0, -3.0]), leaf(&[4.0, -5.0, 0.5]));
        let outs = apply_multi(
            pair_callback,
            0,
            vec![a.shallow_clone(), b.shallow_clone()],
            2,
            1,
        )
        .unwrap();
        assert_eq!(outs.len(), 2);
        assert_eq!(Vec::<f64>::try_from(&outs[0]).unwrap(), [5.0, -3.0, -2.5]);
        assert_eq!(Vec::<f64>::try_from(&outs[1]).unwrap(), [4.0, -10.0, -1.5]);
        // 3·(a + b) + a·b
        outs[0]
            .f_mul_scalar(3.0)
            .unwrap()
            .f_add(&outs[1])
            .unwrap()
            .sum(Kind::Double)
            .backward();
        assert_eq!(Vec::<f64>::try_from(&a.grad()).unwrap(), [7.0, -2.0, 3.5]);
        assert_eq!(Vec::<f64>::try_from(&b.grad()).unwrap(), [4.0, 5.0, 0.0]);
        // the product alone: the sum's gradient is undefined, not zeros
        let (a, b) = (leaf(&[1.0, 2.0, -3.0]), leaf(&[4.0, -5.0, 0.5]));
        let outs = apply_multi(
            pair_callback,
            0,
            vec![a.shallow_clone(), b.shallow_clone()],
            2,
            1,
        )
        .unwrap();
        outs[1].sum(Kind::Double).backward();
        assert_eq!(Vec::<f64>::try_from(&a.grad()).unwrap(), [4.0, -5.0, 0.5]);
        assert_eq!(Vec::<f64>::try_from(&b.grad()).unwrap(), [1.0, 2.0, -3.0]);
    }
}
