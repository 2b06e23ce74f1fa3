//! Compute-dtype copies of the master weights, made once per training step instead of once
//! per micro-batch.
//!
//! The trainer keeps f32 masters and computes in bf16: every forward converts each weight,
//! and its backward converts the gradient back. Within one step the masters do not change,
//! so with feature `cuda` and `FMOEC_CAST_CACHE=1` [`compute`] hands out one bf16 copy per
//! weight for the whole step (made under `no_grad` on first use after [`begin_step`])
//! through a shim op whose backward is the same conversion of the gradient to the master's
//! dtype: the per-micro-batch forward casts (one launch and a read and a write of every
//! weight) disappear, and the gradients reach the masters exactly as before. [`end_step`]
//! drops the copies before the optimizer changes the masters. It is off by default: the
//! shim op's backward calls back into Rust once per weight, and on the GPU-MoE example the
//! measured effect was +3-5% on one H200 lease and -8-12% on another (BENCHMARKS.md), within
//! the step-to-step spread of a launch-bound step. Otherwise, and outside a step (eval,
//! sampling, builds without `cuda`), it is a plain `to_kind`.
//!
//! This module knows tensors and dtypes only, not the model or the optimizer.

use anyhow::Result;
use tch::{Kind, Tensor};

#[cfg(feature = "cuda")]
mod cache {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use tch::Tensor;

    /// (data pointer, shape, dtype) of a master → its copy; `None` outside a step.
    pub type Map = HashMap<(usize, Vec<i64>, String), Tensor>;
    thread_local! {
        // per thread: in-process ranks are threads, each with its own model and steps
        pub static COPIES: RefCell<Option<Map>> = const { RefCell::new(None) };
    }
}

/// Starts a step on this thread: weights converted from now on are converted once and
/// reused.
pub fn begin_step() {
    #[cfg(feature = "cuda")]
    if std::env::var("FMOEC_CAST_CACHE").is_ok_and(|v| v == "1") {
        cache::COPIES.with(|c| *c.borrow_mut() = Some(Default::default()));
    }
}

/// Ends this thread's step: drops the copies (call before the masters change).
pub fn end_step() {
    #[cfg(feature = "cuda")]
    cache::COPIES.with(|c| *c.borrow_mut() = None);
}

/// `w` in `kind` for a forward pass: within a step, a master weight's copy made once for
/// the step (the gradient still flows to `w`); otherwise `w.to_kind(kind)`.
pub fn compute(w: &Tensor, kind: Kind) -> Result<Tensor> {
    if w.kind() == kind {
        return Ok(w.shallow_clone());
    }
    #[cfg(feature = "cuda")]
    if w.requires_grad() {
        let copy = cache::COPIES.with(|c| -> Result<Option<Tensor>> {
            let mut c = c.borrow_mut();
            let Some(map) = c.as_mut() else {
                return Ok(None);
            };
            let key = (w.data_ptr() as usize, w.size(), format!("{kind:?}"));
            if let Some(copy) = map.get(&key) {
                return Ok(Some(copy.shallow_clone()));
            }
            let copy = tch::no_grad(|| w.f_to_kind(kind))?;
            map.insert(key, copy.shallow_clone());
            Ok(Some(copy))
        })?;
        if let Some(copy) = copy {
            return crate::runtime::fused::cast_op(w, &copy);
        }
    }
    Ok(w.f_to_kind(kind)?)
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// Within a step the copy is made once and reused; the gradients that reach the master
    /// are those of a plain `to_kind` (f64 compute on the CPU stands in for bf16 on a GPU).
    #[test]
    fn cached_copies_give_the_gradients_of_plain_casts() {
        let w = Tensor::randn([5, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([4, 5], (Kind::Double, tch::Device::Cpu));
        let loss = |w: &Tensor| x.matmul(w).square().sum(Kind::Double);
        loss(&w.to_kind(Kind::Double)).backward();
        let plain = w.grad().copy();
        let _ = w.grad().zero_();

        std::env::set_var("FMOEC_CAST_CACHE", "1");
        begin_step();
        let a = compute(&w, Kind::Double).unwrap();
        let b = compute(&w, Kind::Double).unwrap();
        assert_eq!(a.data_ptr(), b.data_ptr(), "one copy per step");
        loss(&a).backward();
        loss(&b).backward();
        end_step();
        assert_eq!(w.grad().kind(), Kind::Float);
        assert!(w
            .grad()
            .allclose(&plain.multiply_scalar(2.0), 1e-6, 1e-6, false));

        // outside a step: a fresh conversion every time
        let c = compute(&w, Kind::Double).unwrap();
        assert_ne!(c.data_ptr(), a.data_ptr());
    }
}
