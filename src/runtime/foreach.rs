//! libtorch's multi-tensor kernels for the optimizer step (feature `cuda`, through the C++
//! shim): AdamW over a list of parameters in one fused kernel, the sum of squares of a list
//! of gradients, and scaling a list in place. Op by op, the step of a model with a few
//! hundred parameters is a few thousand small kernels and about a dozen passes over every
//! parameter; these are a handful of launches and one pass. They run on any device libtorch
//! has them for (the CPU too, which the tests use); the trainer uses them on GPUs.
//!
//! This module knows tensors only, not the model, the store or the schedule.

use std::ffi::{c_int, c_void};

use anyhow::{anyhow, Result};
use tch::Tensor;

use crate::runtime::cuda::shim_error;

extern "C" {
    fn fmoec_shim_fused_adamw(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        m: *mut *mut c_void,
        v: *mut *mut c_void,
        n: c_int,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> c_int;
    fn fmoec_shim_sum_squares(ts: *mut *mut c_void, n: c_int, out: *mut *mut c_void) -> c_int;
    fn fmoec_shim_scale(ts: *mut *mut c_void, n: c_int, by: *mut c_void) -> c_int;
}

/// Handles to `ts` and the raw pointers the shim reads (valid while the handles live).
fn pointers(ts: &[&Tensor]) -> (Vec<Tensor>, Vec<*mut c_void>) {
    let mut handles: Vec<Tensor> = ts.iter().map(|t| t.shallow_clone()).collect();
    let ptrs = handles
        .iter_mut()
        .map(|t| t.as_mut_ptr() as *mut c_void)
        .collect();
    (handles, ptrs)
}

/// The AdamW hyper-parameters of one fused step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// 1-based step (bias correction).
    pub step: u64,
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW step in place over `params` with `grads` and the moments `m`, `v` (equal
/// lengths; f32, one device): `p ← p·(1 − lr·wd)`, then the bias-corrected Adam update.
pub fn fused_adamw(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    h: AdamWStep,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || m.len() != n || v.len() != n {
        return Err(anyhow!("fused AdamW: lists of different lengths"));
    }
    if n == 0 {
        return Ok(());
    }
    let (_p, mut pp) = pointers(params);
    let (_g, mut gp) = pointers(grads);
    let (_m, mut mp) = pointers(m);
    let (_v, mut vp) = pointers(v);
    // SAFETY: four arrays of `n` live tensors (the handles above); the shim catches exceptions.
    let rc = unsafe {
        fmoec_shim_fused_adamw(
            pp.as_mut_ptr(),
            gp.as_mut_ptr(),
            mp.as_mut_ptr(),
            vp.as_mut_ptr(),
            n as c_int,
            h.step as f64,
            h.lr,
            h.betas.0,
            h.betas.1,
            h.weight_decay,
            h.eps,
        )
    };
    if rc != 0 {
        return Err(shim_error("fused AdamW step"));
    }
    Ok(())
}

/// `Σ_t Σ t²` over `ts` (an f32 scalar on their device; no host sync). `ts` is not empty.
pub fn sum_squares(ts: &[&Tensor]) -> Result<Tensor> {
    let (_h, mut p) = pointers(ts);
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: an array of live tensors; the shim returns a `new at::Tensor` we own.
    let rc = unsafe { fmoec_shim_sum_squares(p.as_mut_ptr(), p.len() as c_int, &mut out) };
    if rc != 0 || out.is_null() {
        return Err(shim_error("sum of squares"));
    }
    // SAFETY: `out` is a fresh `at::Tensor` from the shim.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Multiplies every tensor of `ts` in place by the scalar tensor `by`.
pub fn scale(ts: &[&Tensor], by: &Tensor) -> Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let (_h, mut p) = pointers(ts);
    let mut by = by.shallow_clone();
    // SAFETY: live tensors for the call; the shim catches exceptions.
    let rc = unsafe {
        fmoec_shim_scale(
            p.as_mut_ptr(),
            p.len() as c_int,
            by.as_mut_ptr() as *mut c_void,
        )
    };
    if rc != 0 {
        return Err(shim_error("scaling gradients"));
    }
    Ok(())
}
