//! The dense linear `x · w (+ b)` as one autograd op whose backward accumulates the weight's
//! and the bias's gradients straight into their f32 masters' `.grad` (Megatron-LM's
//! `gradient_accumulation_fusion`, here for the bf16 copies of `runtime::cast`).
//!
//! With the cast copies on, a dense linear used to compute `dW = xᵀ · dy` as a GEMM writing
//! bf16, which the cast op's backward then read again to add into the master's f32 `.grad`;
//! the bias's gradient was a bf16 column sum, converted and added likewise. Here the backward
//! is, per micro-batch:
//!
//! - `dx = dy · w_copyᵀ` in the compute dtype (as autograd's);
//! - `dW`: one GEMM with bf16 operands, f32 accumulation and the master's `.grad` as both its
//!   addend and its output (`addmm(grad, xᵀ, dy, out_dtype = f32, out = grad)`), so nothing
//!   is written in bf16 or read twice. Where the master has no `.grad` yet (the first
//!   micro-batch), the f32 `mm` result is handed to autograd to start it;
//! - `db`: the column sums of `dy` in f32, added into the bias master's `.grad` (or handed to
//!   autograd to start it), without a bf16 round trip: on a GPU two kernel launches without
//!   atomics (partial sums over chunks of rows, then their sum added into the `.grad`).
//!
//! The dtype-out GEMM is CUDA's with bf16 or f16 operands and an f32 master; elsewhere (the
//! CPU, which tests the op) an `mm` in the compute dtype and an `add_` stand in for it. The
//! backward reads no value on the host and allocates only its outputs and the column sums'
//! partials (from the graph's own pool within a capture), so it runs inside a CUDA graph
//! capture. `moe::linear` uses it when the cast copies are handed
//! out and the tensors are on a GPU; `FMOEC_FUSED_LINEAR=0` keeps the earlier path (the cast
//! op and autograd's own matmul backward), to time one against the other.
//!
//! Knows tensors, dtypes and the shim's autograd, not the layer, the casts' cache or the
//! trainer.

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::autograd::{apply, shim_callback, unused, Phase};
use super::ops::column_sums;

/// Whether `FMOEC_FUSED_LINEAR=0` asks for the unfused linear (the cast op's backward).
pub fn switched_off() -> bool {
    std::env::var("FMOEC_FUSED_LINEAR").is_ok_and(|v| v == "0")
}

/// The op's two forms, as the shim carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinearOp {
    /// Inputs: `x` `[T, K]`, the master `w` `[K, N]`, its copy; two unused slots.
    Plain,
    /// The same and the bias master `[N]` and its copy.
    Biased,
}

impl LinearOp {
    fn code(self) -> i64 {
        match self {
            LinearOp::Plain => 1,
            LinearOp::Biased => 2,
        }
    }

    fn from_code(code: i64) -> Result<LinearOp> {
        Ok(match code {
            1 => LinearOp::Plain,
            2 => LinearOp::Biased,
            _ => bail!("unknown linear op {code}"),
        })
    }
}

/// `x · w_copy (+ b_copy)` over the last dimension of `x` (in its dtype; `w_copy` is `[K, N]`,
/// the master `w` converted, not requiring grad; `bias` is the bias master `[N]` and its copy
/// likewise), differentiable in `x`, `w` and the bias master: the masters' gradients are added
/// into their `.grad` by the backward itself where it exists (see the module doc).
pub fn linear_op(
    x: &Tensor,
    w: &Tensor,
    w_copy: &Tensor,
    bias: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let mut shape = x.size();
    let Some(&k) = shape.last() else {
        bail!("linear: a scalar input");
    };
    let n = match w_copy.size().as_slice() {
        &[wk, n] if wk == k && w.size() == [wk, n] => n,
        s => bail!(
            "linear: weight {s:?} (master {:?}) for inputs of width {k}",
            w.size()
        ),
    };
    let (op, b, b_copy) = match bias {
        Some((b, b_copy)) => {
            if b.size() != [n] || b_copy.size() != [n] {
                bail!(
                    "linear: bias {:?} (copy {:?}) for {n} outputs",
                    b.size(),
                    b_copy.size()
                );
            }
            (LinearOp::Biased, b.shallow_clone(), b_copy.shallow_clone())
        }
        None => (LinearOp::Plain, unused()?, unused()?),
    };
    let out = apply(
        linear_callback,
        op.code(),
        vec![
            x.f_reshape([-1, k])?,
            w.shallow_clone(),
            w_copy.shallow_clone(),
            b,
            b_copy,
        ],
    )
    .context("fused linear")?;
    *shape.last_mut().expect("checked above") = n;
    Ok(out.f_reshape(shape)?)
}

shim_callback!(linear_callback => |op, phase, ins| run_op(LinearOp::from_code(op)?, phase, ins));

fn run_op(op: LinearOp, phase: Phase, inputs: Vec<Tensor>) -> Result<Vec<Option<Tensor>>> {
    let Some([x, w, w_copy, b, b_copy]) = inputs.get(..5) else {
        bail!("linear: {} inputs", inputs.len());
    };
    match phase {
        // the linear's own forward: addmm with the bias in cuBLASLt's epilogue on a GPU
        Phase::Forward => Ok(vec![Some(match op {
            LinearOp::Plain => x.f_mm(w_copy)?,
            LinearOp::Biased => b_copy.f_addmm(x, w_copy)?,
        })]),
        Phase::Backward => {
            let g = &inputs[5];
            if !g.defined() {
                return Ok(vec![None, None, None, None, None]);
            }
            let g = g.f_to_kind(x.kind())?;
            let dx = if x.requires_grad() {
                Some(g.f_mm(&w_copy.f_tr()?)?)
            } else {
                None
            };
            let dw = if w.requires_grad() {
                weight_gradient(w, x, &g)?
            } else {
                None
            };
            let db = if op == LinearOp::Biased && b.requires_grad() {
                bias_gradient(b, &g)?
            } else {
                None
            };
            Ok(vec![dx, dw, None, db, None])
        }
    }
}

/// Whether `xᵀ · dy` can be one GEMM writing `master`'s dtype: CUDA's dtype-out GEMM, bf16 or
/// f16 operands and an f32 master.
fn dtype_out_gemm(master: &Tensor, x: &Tensor) -> bool {
    x.device().is_cuda()
        && master.kind() == Kind::Float
        && matches!(x.kind(), Kind::BFloat16 | Kind::Half)
}

/// `master`'s `.grad` where it exists with the master's dtype and shape (autograd has started
/// it: every micro-batch after the first), else none.
fn existing_grad(master: &Tensor) -> Option<Tensor> {
    let acc = master.grad();
    (acc.defined() && acc.kind() == master.kind() && acc.size() == master.size()).then_some(acc)
}

/// The weight's gradient `xᵀ · g` (`x` `[T, K]`, `g` `[T, N]`): accumulated into the master's
/// `.grad` by the GEMM itself where that exists (then none for autograd), else the f32
/// product for autograd to start it.
fn weight_gradient(master: &Tensor, x: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    let xt = x.f_tr()?;
    let fused = dtype_out_gemm(master, x);
    match existing_grad(master) {
        Some(acc) if fused && acc.is_contiguous() => {
            // out = self = .grad: beta = alpha = 1, accumulated in f32 (libtorch 2.11's
            // `addmm.dtype_out`)
            let _ = acc.f_addmm_dtype_out(&acc, &xt, g, Kind::Float)?;
            Ok(None)
        }
        Some(mut acc) => {
            let _ = acc.f_add_(&xt.f_mm(g)?)?;
            Ok(None)
        }
        None if fused => Ok(Some(xt.f_mm_dtype(g, Kind::Float)?)),
        None => Ok(Some(xt.f_mm(g)?.f_to_kind(master.kind())?)),
    }
}

/// The bias's gradient, the column sums of `g` (`[T, N]`) in f32 when `g` is bf16 or f16
/// ([`column_sums`]: on a GPU the kernels' second pass adds them into the `.grad`): added into
/// the master's `.grad` where that exists (then none for autograd), else handed to autograd in
/// the master's dtype.
pub fn bias_gradient(master: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    match existing_grad(master) {
        Some(acc) => {
            column_sums(g, Some(&acc))?;
            Ok(None)
        }
        None => match column_sums(g, None)? {
            Some(sums) => Ok(Some(sums.f_to_kind(master.kind())?)),
            None => bail!("linear: column sums without a destination returned none"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_codes_round_trip() {
        for op in [LinearOp::Plain, LinearOp::Biased] {
            assert_eq!(LinearOp::from_code(op.code()).unwrap(), op);
        }
        assert!(LinearOp::from_code(7).is_err());
    }
}
