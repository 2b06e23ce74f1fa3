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

    /// One update with learning rate `lr` from the gradients now in the store.
    pub fn step(&mut self, store: &mut ParamStore, lr: f64) -> Result<()> {
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
    for p in &mut store.params {
        let mut g = p.tensor.grad();
        if g.defined() {
            let _ = g.f_mul_(&coef.f_to_kind(g.kind())?)?;
        }
    }
    Ok(norm)
}
