//! The parameter store: every trainable tensor of a model, in creation order, under the
//! dotted name it has in checkpoints (`layers.3.ffn.experts.w1`), with its weight-decay flag,
//! and how they are drawn (in creation order, or per name from a seed, holding only a rank's
//! experts of each stacked expert tensor).
//!
//! Parameters are the fp32 master copies (f64 in gradient checks); modules cast them to the
//! compute dtype at each use, so bf16 training keeps fp32 master weights and fp32 gradients.
//! Knows nothing about what the parameters mean.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::runtime::data::mix_all;

/// A stable 64-bit key of a parameter name (FNV-1a), for per-parameter seeds.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

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
    /// With `Some(seed)` every parameter draws from libtorch's generator seeded by `seed` and
    /// its name, and stacked expert tensors seed each expert's slice by its index as well:
    /// the values do not depend on creation order or on which experts a rank builds. With
    /// `None` parameters draw in creation order from the generator as the caller seeded it.
    pub seed: Option<u64>,
    /// The experts to build per stacked-expert prefix (`layers.3.ffn.experts`), in the order
    /// the tensors hold them; every expert where a prefix is absent.
    pub local_experts: BTreeMap<String, Vec<usize>>,
}

impl ParamStore {
    pub fn new(device: Device, kind: Kind) -> ParamStore {
        ParamStore {
            device,
            kind,
            params: Vec::new(),
            seed: None,
            local_experts: BTreeMap::new(),
        }
    }

    /// Draws `shape` per `init` (for `Normal`, after reseeding the generator from `key` when
    /// the store has a seed).
    fn draw(&self, key: &[u64], shape: &[i64], init: Init) -> Result<Tensor> {
        let opts = (self.kind, self.device);
        Ok(match init {
            Init::Normal(std) => {
                if let Some(seed) = self.seed {
                    let mut words = vec![seed];
                    words.extend_from_slice(key);
                    tch::manual_seed(mix_all(&words) as i64);
                }
                Tensor::f_randn(shape, opts)?.f_mul_scalar(std)?
            }
            Init::Zeros => Tensor::f_zeros(shape, opts)?,
            Init::Ones => Tensor::f_ones(shape, opts)?,
        })
    }

    fn register(&mut self, name: &str, t: Tensor, decay: bool) -> Result<Tensor> {
        if self.params.iter().any(|p| p.name == name) {
            bail!("internal error: parameter `{name}` registered twice");
        }
        let t = t.f_set_requires_grad(true)?;
        self.params.push(Param {
            name: name.to_string(),
            tensor: t.shallow_clone(),
            decay,
        });
        Ok(t)
    }

    /// Creates a parameter.
    pub fn var(&mut self, name: &str, shape: &[i64], init: Init, decay: bool) -> Result<Tensor> {
        let t = self.draw(&[name_key(name)], shape, init)?;
        self.register(name, t, decay)
    }

    /// Creates the stacked tensor `{prefix}.{name}` of `experts` experts of `shape` each,
    /// holding only the experts [`ParamStore::local_experts`] lists for `prefix` (all by
    /// default). With a seed each expert's slice is drawn on its own, so a rank holding
    /// experts 4..8 gets the same values as the one-rank model's slices 4..8 without drawing
    /// the others.
    pub fn expert_var(
        &mut self,
        prefix: &str,
        name: &str,
        experts: i64,
        shape: &[i64],
        init: Init,
        decay: bool,
    ) -> Result<Tensor> {
        let full = format!("{prefix}.{name}");
        let ids: Vec<i64> = match self.local_experts.get(prefix) {
            Some(ids) => ids.iter().map(|&e| e as i64).collect(),
            None => (0..experts).collect(),
        };
        if let Some(&bad) = ids.iter().find(|&&e| e < 0 || e >= experts) {
            bail!("internal error: expert {bad} of `{full}`, which has {experts}");
        }
        let t = if ids.is_empty() {
            // a rank may hold no expert of a layer
            let none: Vec<i64> = std::iter::once(0).chain(shape.iter().copied()).collect();
            Tensor::f_zeros(&none, (self.kind, self.device))?
        } else if self.seed.is_some() {
            let rows = ids
                .iter()
                .map(|&e| self.draw(&[name_key(&full), e as u64], shape, init))
                .collect::<Result<Vec<_>>>()?;
            Tensor::f_stack(&rows, 0)?
        } else {
            let whole: Vec<i64> = std::iter::once(experts)
                .chain(shape.iter().copied())
                .collect();
            let t = self.draw(&[], &whole, init)?;
            if ids.len() as i64 == experts {
                t
            } else {
                let index = Tensor::f_from_slice(&ids)?.f_to_device(self.device)?;
                t.f_index_select(0, &index)?
            }
        };
        self.register(&full, t, decay)
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
