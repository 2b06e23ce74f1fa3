//! AdamW with decoupled weight decay, the learning-rate schedule, and clipping by the global
//! gradient 2-norm.
//!
//! AdamW as Loshchilov & Hutter (and `torch.optim.AdamW`): `p ← p − lr·wd·p` for decayed
//! parameters, then the bias-corrected Adam step. State (`m`, `v`, step) is kept in fp32 next to
//! the fp32 master weights and saved in checkpoints. Knows nothing about the model beyond the
//! [`ParamStore`].

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::check::{Optimizer, Schedule};
use crate::runtime::params::ParamStore;

/// AdamW state for every parameter of a store (same order).
pub struct AdamW {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (bias correction uses `step` after the increment).
    pub step: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(opt: &Optimizer, store: &ParamStore) -> Result<AdamW> {
        let Optimizer::Adamw {
            betas,
            eps,
            weight_decay,
            ..
        } = opt;
        let mut m = Vec::new();
        let mut v = Vec::new();
        for p in &store.params {
            m.push(p.tensor.f_zeros_like()?.f_detach()?);
            v.push(p.tensor.f_zeros_like()?.f_detach()?);
        }
        Ok(AdamW {
            betas: *betas,
            eps: *eps,
            weight_decay: *weight_decay,
            step: 0,
            m,
            v,
        })
    }

    /// One update with learning rate `lr` from the gradients now in the store: on a GPU
    /// (feature `cuda`) with libtorch's fused multi-tensor kernel, else op by op.
    pub fn step(&mut self, store: &mut ParamStore, lr: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if store.device.is_cuda() && store.params.iter().all(|p| p.tensor.kind() == Kind::Float) {
            return self.step_fused(store, lr);
        }
        self.step_ops(store, lr)
    }

    /// [`AdamW::step`] with libtorch's fused AdamW over the decayed parameters, then over the
    /// others (the same update, one pass over each tensor).
    #[cfg(feature = "cuda")]
    pub fn step_fused(&mut self, store: &mut ParamStore, lr: f64) -> Result<()> {
        use crate::runtime::foreach::{fused_adamw, AdamWStep};
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let params: Vec<Tensor> = store
            .params
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .collect();
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        for decayed in [true, false] {
            let chosen: Vec<usize> = (0..store.params.len())
                .filter(|&i| grads[i].defined())
                .filter(|&i| (store.params[i].decay && self.weight_decay != 0.0) == decayed)
                .collect();
            let pick = |ts: &[Tensor]| -> Vec<Tensor> {
                chosen.iter().map(|&i| ts[i].shallow_clone()).collect()
            };
            let (p, g, m, v) = (pick(&params), pick(&grads), pick(&self.m), pick(&self.v));
            fused_adamw(
                &refs(&p),
                &refs(&g),
                &refs(&m),
                &refs(&v),
                AdamWStep {
                    step: self.step,
                    lr,
                    betas: self.betas,
                    weight_decay: if decayed { self.weight_decay } else { 0.0 },
                    eps: self.eps,
                },
            )?;
        }
        Ok(())
    }

    /// [`AdamW::step`] op by op.
    pub fn step_ops(&mut self, store: &mut ParamStore, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (i, p) in store.params.iter_mut().enumerate() {
            let g = p.tensor.grad();
            if !g.defined() {
                continue;
            }
            if p.decay && self.weight_decay != 0.0 {
                let _ = p.tensor.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
            }
            let _ = self.m[i].f_mul_scalar_(b1)?;
            let _ = self.m[i].f_add_(&g.f_mul_scalar(1.0 - b1)?)?;
            let _ = self.v[i].f_mul_scalar_(b2)?;
            let _ = self.v[i].f_add_(&g.f_square()?.f_mul_scalar(1.0 - b2)?)?;
            let denom = self.v[i]
                .f_div_scalar(bc2)?
                .f_sqrt()?
                .f_add_scalar(self.eps)?;
            let update = self.m[i].f_div(&denom)?.f_mul_scalar(lr / bc1)?;
            let _ = p.tensor.f_sub_(&update)?;
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn refs(ts: &[Tensor]) -> Vec<&Tensor> {
    ts.iter().collect()
}

/// The gradients the store's parameters have (those without one left out).
#[cfg(feature = "cuda")]
fn defined_grads(store: &ParamStore) -> Vec<Tensor> {
    store
        .params
        .iter()
        .map(|p| p.tensor.grad())
        .filter(|g| g.defined())
        .collect()
}

/// Learning rate at 0-based `step` of `total`: linear warmup to `lr` over `warmup` steps, then
/// constant or cosine decay to `min_lr_ratio · lr` at the last step.
pub fn learning_rate(schedule: &Schedule, lr: f64, step: u64, total: u64) -> f64 {
    let warmup = match schedule {
        Schedule::Constant { warmup } | Schedule::Cosine { warmup, .. } => *warmup,
    };
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant { .. } => lr,
        Schedule::Cosine { min_lr_ratio, .. } => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            let min = lr * min_lr_ratio;
            min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// The global 2-norm of all gradients (f32 scalar, on the device; no host sync).
pub fn global_grad_norm(store: &ParamStore) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if store.device.is_cuda() {
        let grads = defined_grads(store);
        if !grads.is_empty() {
            return Ok(crate::runtime::foreach::sum_squares(&refs(&grads))?.f_sqrt()?);
        }
    }
    let mut sq = Tensor::f_zeros([], (Kind::Float, store.device))?;
    for p in &store.params {
        let g = p.tensor.grad();
        if g.defined() {
            sq = sq.f_add(&g.f_to_kind(Kind::Float)?.f_square()?.f_sum(Kind::Float)?)?;
        }
    }
    Ok(sq.f_sqrt()?)
}

/// Scales all gradients by `min(1, max_norm / (norm + 1e-6))`; returns the norm before.
pub fn clip_grad_norm(store: &mut ParamStore, max_norm: f64) -> Result<Tensor> {
    let norm = global_grad_norm(store)?;
    let _guard = tch::no_grad_guard();
    let coef = norm
        .f_add_scalar(1e-6)?
        .f_reciprocal()?
        .f_mul_scalar(max_norm)?
        .f_clamp_max(1.0)?;
    #[cfg(feature = "cuda")]
    if store.device.is_cuda() {
        let grads = defined_grads(store);
        if grads.iter().all(|g| g.kind() == Kind::Float) {
            crate::runtime::foreach::scale(&refs(&grads), &coef)?;
            return Ok(norm);
        }
    }
    for p in &mut store.params {
        let mut g = p.tensor.grad();
        if g.defined() {
            let _ = g.f_mul_(&coef.f_to_kind(g.kind())?)?;
        }
    }
    Ok(norm)
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::runtime::params::Init;

    /// libtorch's fused AdamW (the GPU path, run here on the CPU) gives the op-by-op update:
    /// parameters and moments over three steps, decayed and not, one parameter without a
    /// gradient left alone; and the multi-tensor norm and scaling match the loops.
    #[test]
    fn fused_step_norm_and_clip_match_the_ops() {
        let build = || {
            tch::manual_seed(5);
            let mut store = ParamStore::new(tch::Device::Cpu, Kind::Float);
            let _ = store.var("a", &[7, 5], Init::Normal(1.0), true).unwrap();
            let _ = store.var("b", &[5], Init::Normal(1.0), false).unwrap();
            let _ = store.var("c", &[3, 3], Init::Normal(1.0), true).unwrap();
            store
        };
        let opt = Optimizer::Adamw {
            lr: 1e-2,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (mut s1, mut s2) = (build(), build());
        let (mut a1, mut a2) = (
            AdamW::new(&opt, &s1).unwrap(),
            AdamW::new(&opt, &s2).unwrap(),
        );
        for step in 0..3 {
            tch::manual_seed(step);
            let x = Tensor::randn([4, 7], (Kind::Float, tch::Device::Cpu));
            for s in [&mut s1, &mut s2] {
                s.zero_grad();
                let y = x.matmul(&s.params[0].tensor) + &s.params[1].tensor;
                y.square().sum(Kind::Float).backward();
            }
            a1.step_ops(&mut s1, 1e-2).unwrap();
            a2.step_fused(&mut s2, 1e-2).unwrap();
        }
        for i in 0..3 {
            let (p1, p2) = (&s1.params[i].tensor, &s2.params[i].tensor);
            assert!(p1.allclose(p2, 1e-5, 1e-6, false), "param {i}");
            assert!(a1.m[i].allclose(&a2.m[i], 1e-5, 1e-7, false), "m {i}");
            assert!(a1.v[i].allclose(&a2.v[i], 1e-5, 1e-7, false), "v {i}");
        }
        assert!(!s2.params[2].tensor.grad().defined(), "c is not used");

        let grads: Vec<Tensor> = s1.params.iter().take(2).map(|p| p.tensor.grad()).collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let want = global_grad_norm(&s1).unwrap().square().double_value(&[]);
        let got = crate::runtime::foreach::sum_squares(&refs)
            .unwrap()
            .double_value(&[]);
        assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
        let before = grads[0].copy();
        crate::runtime::foreach::scale(&refs, &Tensor::from(0.5f32)).unwrap();
        assert!(grads[0].allclose(&before.multiply_scalar(0.5), 1e-6, 0.0, false));
    }
}
