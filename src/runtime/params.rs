//! The parameter store: every trainable tensor of a model, in creation order, under the
//! dotted name it has in checkpoints (`layers.3.ffn.experts.w1`), with its weight-decay flag.
//!
//! Parameters are the fp32 master copies (f64 in gradient checks); modules cast them to the
//! compute dtype at each use, so bf16 training keeps fp32 master weights and fp32 gradients.
//! Knows nothing about what the parameters mean.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// How a parameter starts.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// One named parameter.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// Whether AdamW's decoupled weight decay applies (not on norms and biases).
    pub decay: bool,
}

/// All parameters of one model, in a fixed order.
pub struct ParamStore {
    pub device: Device,
    /// Master dtype (f32; f64 for gradient checks).
    pub kind: Kind,
    pub params: Vec<Param>,
}

impl ParamStore {
    pub fn new(device: Device, kind: Kind) -> ParamStore {
        ParamStore {
            device,
            kind,
            params: Vec::new(),
        }
    }

    /// Creates a parameter; draws from libtorch's generator in creation order.
    pub fn var(&mut self, name: &str, shape: &[i64], init: Init, decay: bool) -> Result<Tensor> {
        if self.params.iter().any(|p| p.name == name) {
            bail!("internal error: parameter `{name}` registered twice");
        }
        let opts = (self.kind, self.device);
        let t = match init {
            Init::Normal(std) => Tensor::f_randn(shape, opts)?.f_mul_scalar(std)?,
            Init::Zeros => Tensor::f_zeros(shape, opts)?,
            Init::Ones => Tensor::f_ones(shape, opts)?,
        };
        let t = t.f_set_requires_grad(true)?;
        self.params.push(Param {
            name: name.to_string(),
            tensor: t.shallow_clone(),
            decay,
        });
        Ok(t)
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }
}

impl ParamStore {
    /// Replaces the tensor of parameter `name` by a copy of `values` (a fresh leaf that
    /// requires grad and owns its memory, e.g. this rank's slice of the full tensor) and
    /// returns it.
    pub fn replace(&mut self, name: &str, values: &Tensor) -> Result<Tensor> {
        let values = values.f_detach()?;
        let mut t = values.f_zeros_like()?.f_contiguous()?;
        tch::no_grad(|| t.f_copy_(&values))?;
        let t = t.f_set_requires_grad(true)?;
        match self.params.iter_mut().find(|p| p.name == name) {
            Some(p) => p.tensor = t.shallow_clone(),
            None => bail!("internal error: no parameter `{name}` to replace"),
        }
        Ok(t)
    }
}
