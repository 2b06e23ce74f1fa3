//! Compute-dtype copies of the master weights, made once per training step instead of once
//! per micro-batch.
//!
//! The trainer keeps f32 masters and computes in bf16: every forward converts each weight,
//! and its backward converts the gradient back and adds it to the master's. Within one step
//! the masters do not change, so with feature `cuda` and the copies on ([`enable`]: the
//! trainer does when it replays micro-batches as a CUDA graph; `FMOEC_CAST_CACHE=1` does
//! everywhere) [`compute`] hands out one bf16 copy per weight, made on first use and
//! rewritten in place from the master at every [`begin_step`], through a shim op whose
//! backward adds the bf16 gradient straight into the master's f32 gradient (one pass
//! instead of a conversion and an add). The per-micro-batch forward casts disappear, and the
//! gradients reach the masters with the same values as before. The dense linears
//! (`moe::linear`, on a GPU) take the copy itself ([`cached`]) into one op of their own
//! (`runtime::cuda::linear`), whose backward has the weight gradient's GEMM accumulate into
//! the master's f32 gradient and adds the bias's f32 column sums likewise, so no bf16
//! gradient is written and read again (`FMOEC_FUSED_LINEAR=0`: through the shim op as every
//! other weight). Without a graph the copies stay off by default: the shim op's backward
//! calls back into Rust once per weight, and on the GPU-MoE example op by op an earlier variant (copies dropped every step, the gradient
//! converted before autograd's add) measured +3-5% on one H200 lease and -8-12% on another
//! (BENCHMARKS.md, session 3). With the graph they are worth 12% on GPT-2-medium-MoE (one H100,
//! session 18: 135.7k -> 152.6k tokens/s); until then the graph runner dropped them when it
//! moved from its warm-up to the capture, so the graph cast every weight in every micro-batch
//! (session 4's +0.4% measured nothing). Otherwise, and outside a step (eval, sampling, builds
//! without `cuda`), it is a plain `to_kind`.
//!
//! This module knows tensors and dtypes only, not the model or the optimizer.

use anyhow::Result;
use tch::{Kind, Tensor};

#[cfg(feature = "cuda")]
mod cache {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use tch::Tensor;

    /// This thread's copies: (data pointer, shape, dtype) of a master → (master, its copy).
    #[derive(Default)]
    pub struct Cache {
        /// Within a step: compute() hands out the copies.
        pub in_step: bool,
        pub copies: HashMap<(usize, Vec<i64>, String), (Tensor, Tensor)>,
    }
    thread_local! {
        // per thread: in-process ranks are threads, each with its own model and steps
        pub static CACHE: RefCell<Option<Cache>> = const { RefCell::new(None) };
    }
}

/// Turns the copies on for this thread's steps (also on with `FMOEC_CAST_CACHE=1`).
pub fn enable() {
    #[cfg(feature = "cuda")]
    cache::CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(Default::default());
        }
    });
}

/// Drops this thread's copies and turns them off.
pub fn disable() {
    #[cfg(feature = "cuda")]
    cache::CACHE.with(|c| *c.borrow_mut() = None);
}

/// Whether this thread's copies are on (between [`enable`] and [`disable`]).
pub fn enabled() -> bool {
    #[cfg(feature = "cuda")]
    return cache::CACHE.with(|c| c.borrow().is_some());
    #[cfg(not(feature = "cuda"))]
    false
}

/// Starts a step on this thread: with the copies on, every copy made in an earlier step is
/// rewritten in place from its master (the same memory, so a captured CUDA graph reads the
/// new values), and weights converted from now on are converted once and reused. The FP8
/// copies of `precision = fp8` likewise (always on: see [`crate::runtime::fp8`]).
pub fn begin_step() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        crate::runtime::fp8::begin_step()?;
        if std::env::var("FMOEC_CAST_CACHE").is_ok_and(|v| v == "1") {
            enable();
        }
        cache::CACHE.with(|c| -> Result<()> {
            if let Some(cache) = c.borrow_mut().as_mut() {
                let _guard = tch::no_grad_guard();
                for (master, copy) in cache.copies.values() {
                    copy.shallow_clone().f_copy_(master)?;
                }
                cache.in_step = true;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Ends this thread's step (call before the masters change): the copies are kept, but not
/// handed out until the next [`begin_step`] has refreshed them.
pub fn end_step() {
    #[cfg(feature = "cuda")]
    crate::runtime::fp8::end_step();
    #[cfg(feature = "cuda")]
    cache::CACHE.with(|c| {
        if let Some(cache) = c.borrow_mut().as_mut() {
            cache.in_step = false;
        }
    });
}

/// `w` in `kind` for a forward pass: within a step with the copies on, a master weight's
/// copy made once (the gradient still flows to `w`); otherwise `w.to_kind(kind)`.
pub fn compute(w: &Tensor, kind: Kind) -> Result<Tensor> {
    if w.kind() == kind {
        return Ok(w.shallow_clone());
    }
    #[cfg(feature = "cuda")]
    if let Some(copy) = cached(w, kind)? {
        return crate::runtime::cuda::cast_op(w, &copy);
    }
    Ok(w.f_to_kind(kind)?)
}

/// The copy of the master `w` in `kind` that [`compute`] hands out (made on first use), as a
/// plain tensor that does not require grad, for an op that routes the gradient to `w` itself
/// (`runtime::cuda::linear`): within a step with the copies on and `w` a master requiring
/// grad in another dtype; otherwise none.
pub fn cached(w: &Tensor, kind: Kind) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if w.kind() != kind && w.requires_grad() {
        return cache::CACHE.with(|c| -> Result<Option<Tensor>> {
            let mut c = c.borrow_mut();
            let Some(cache) = c.as_mut().filter(|c| c.in_step) else {
                return Ok(None);
            };
            let key = (w.data_ptr() as usize, w.size(), format!("{kind:?}"));
            if let Some((_, copy)) = cache.copies.get(&key) {
                return Ok(Some(copy.shallow_clone()));
            }
            let copy = tch::no_grad(|| w.f_to_kind(kind))?;
            cache
                .copies
                .insert(key, (w.shallow_clone(), copy.shallow_clone()));
            Ok(Some(copy))
        });
    }
    let _ = (w, kind);
    Ok(None)
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

        enable();
        begin_step().unwrap();
        let a = compute(&w, Kind::Double).unwrap();
        let b = compute(&w, Kind::Double).unwrap();
        assert_eq!(a.data_ptr(), b.data_ptr(), "one copy per step");
        // the first backward creates the master's gradient, the second adds into it
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

        // the next step refreshes the same copy in place from the changed master
        tch::no_grad(|| {
            let _ = w.shallow_clone().f_add_scalar_(1.0).unwrap();
        });
        begin_step().unwrap();
        let d = compute(&w, Kind::Double).unwrap();
        assert_eq!(d.data_ptr(), a.data_ptr(), "the same memory every step");
        assert!(d.allclose(&w.to_kind(Kind::Double), 0.0, 0.0, false));
        end_step();
        disable();
    }
}
