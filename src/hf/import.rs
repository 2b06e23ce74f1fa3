//! Starting a run from its `init`: the tensors of what [`super::init::resolve`] found, read
//! into the run's fresh parameters (this rank's experts only; before any tensor-parallel
//! split), converted from the Hugging Face layout by [`super::layout::hf_tensors`] read
//! backwards, and upcycled where asked.
//!
//! Upcycling (Komatsuzaki et al., 2022; the semantics of Megatron-Core's `upcycling_utils`):
//! with `G` = dense hidden / expert hidden, expert `e` of an MoE layer is slice `e mod G` of
//! the dense MLP's hidden units (`w1`, `w3`, `b1` columns; `w2` rows, times `G`; `b2` as is),
//! and the gate is the run's fresh one with experts `jG..jG+G` sharing column `j`. A token's
//! top-k weights then come in equal shares within each group, so with weights that sum to 1
//! (renormalised top-k) and `top_k` a multiple of `G` the layer computes the dense MLP
//! exactly: a group's `G` slices, each scaled by `G` and weighted `w_j / G`, sum to `w_j`
//! times the dense MLP. With `noise`, every expert's weight matrices are multiplied by
//! `1 + noise · N(0, 1)`, drawn per expert from the run's seed. Everything outside the MoE
//! layers' feed-forward is copied. The optimizer starts fresh, the schedule at step 0.
//!
//! Knows nothing about the trainer beyond the parameter store it fills.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::init::{Format, Resolution, Resolved};
use super::layout::{self, mlp_param, param_shapes, split_layer, Part};
use crate::check::{InitSpec, Model};
use crate::diag::path_text;
use crate::runtime::checkpoint::Source as CheckpointSource;
use crate::runtime::data::mix_all;
use crate::runtime::model::lock_rng;
use crate::runtime::params::ParamStore;

/// Sets the parameters in `store` (the run's seeded initialisation, holding of each MoE layer
/// the experts `local[layer]`, all where absent) from `init`; returns one line for the log.
pub fn start_from(
    model: &Model,
    init: &InitSpec,
    store: &ParamStore,
    local: &BTreeMap<usize, Vec<usize>>,
    seed: u64,
) -> Result<String> {
    let resolved = resolve_for_run(model, init)?;
    let reader = Reader::open(&resolved)?;
    reader.check_zeros()?;
    let shapes: BTreeMap<String, layout::ParamShape> = param_shapes(model)
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    let _guard = tch::no_grad_guard();
    for p in &store.params {
        let Some(shape) = shapes.get(&p.name) else {
            bail!(
                "internal error: the runtime's parameter `{}` is not in the layout",
                p.name
            );
        };
        let experts: Option<Vec<usize>> = shape.experts.then(|| {
            let layer = split_layer(&p.name).map_or(0, |(l, _)| l);
            local
                .get(&layer)
                .cloned()
                .unwrap_or_else(|| (0..shape.shape[0] as usize).collect())
        });
        let value = match &resolved.upcycle {
            Some(plan) => upcycled(&reader, plan, &p.name, &p.tensor, experts.as_deref(), seed)?,
            None => reader.param(&p.name, experts.as_deref())?,
        };
        if let Some(value) = value {
            set_param(&p.name, &p.tensor, &value, init)?;
        }
    }
    Ok(resolved.description.clone())
}

/// What [`super::init::resolve`] found, or why the run cannot start from it.
fn resolve_for_run(model: &Model, init: &InitSpec) -> Result<Box<Resolved>> {
    match super::init::resolve(model, init) {
        Resolution::Ready(r, _) => Ok(r),
        Resolution::NotHere => bail!(
            "the checkpoint to start from (`init`), `{}`, is not here (paths are relative to the directory fmoec runs in)",
            init.source.path()
        ),
        Resolution::Failed(diags) => {
            let lines: Vec<String> = diags
                .iter()
                .filter(|d| d.is_error())
                .map(|d| format!("{}: {}", d.code, d.message))
                .collect();
            bail!(
                "the checkpoint to start from does not fit the model (`fmoec check` shows where):\n  {}",
                lines.join("\n  ")
            )
        }
    }
}

/// Copies `value` into the run's parameter `name` (`param`), which it must fit, finite.
fn set_param(name: &str, param: &Tensor, value: &Tensor, init: &InitSpec) -> Result<()> {
    if value.size() != param.size() {
        bail!(
            "`{}` from the checkpoint to start from is {:?}, the model needs {:?}",
            name,
            value.size(),
            param.size()
        );
    }
    // A NaN or infinity here would surface only as "the loss became NaN at step 1",
    // blaming the learning rate or the data.
    if !bool::try_from(value.f_isfinite()?.f_all()?)? {
        bail!(
            "`{}` from the checkpoint to start from (`{}`) holds NaN or infinite values; \
             the checkpoint is damaged or diverged",
            name,
            init.source.path()
        );
    }
    let mut target = param.shallow_clone();
    target.f_copy_(
        &value
            .f_to_kind(target.kind())?
            .f_to_device(target.device())?,
    )?;
    Ok(())
}

/// The value of the MoE model's parameter `name` upcycled from the dense model `reader`
/// holds; `None` where the run's fresh value stays (a noisy gate's noise projection; the gate
/// with `G` = 1).
fn upcycled(
    reader: &Reader,
    plan: &super::init::UpcyclePlan,
    name: &str,
    fresh: &Tensor,
    experts: Option<&[usize]>,
    seed: u64,
) -> Result<Option<Tensor>> {
    let upcycled_layer = split_layer(name).and_then(|(layer, rest)| {
        let g = plan.granularity.get(&layer)?;
        Some((layer, *g as i64, rest.strip_prefix("ffn.")?))
    });
    let Some((layer, g, rest)) = upcycled_layer else {
        return reader.param(name, None);
    };
    if let Some(gate) = rest.strip_prefix("gate.") {
        return upcycled_gate(fresh, g, gate);
    }
    let Some(w) = rest.strip_prefix("experts.") else {
        bail!("internal error: `{name}` in an upcycled layer");
    };
    let dense = reader
        .param(&mlp_param(layer, w), None)?
        .with_context(|| format!("the dense checkpoint has no `{}`", mlp_param(layer, w)))?;
    let Some(ids) = experts else {
        bail!("internal error: `{name}` is not an expert tensor");
    };
    let mut rows = Vec::with_capacity(ids.len());
    for &e in ids {
        let slice = expert_slice(&dense, w, e as i64 % g, g)?;
        rows.push(if plan.noise > 0.0 && matches!(w, "w1" | "w3" | "w2") {
            jittered(
                &slice,
                plan.noise,
                mix_all(&[seed, name_key(name), e as u64, 0x0C1E]),
            )?
        } else {
            slice
        });
    }
    if rows.is_empty() {
        return Ok(Some(fresh.f_zeros_like()?));
    }
    Ok(Some(Tensor::f_stack(&rows, 0)?))
}

/// An upcycled layer's gate parameter `gate` (`weight`, `noise`, ...): experts `jG..jG+G`
/// share the fresh column `j`; `None` (the fresh value) with `G` = 1 and for the noise
/// projection.
fn upcycled_gate(fresh: &Tensor, g: i64, gate: &str) -> Result<Option<Tensor>> {
    if g == 1 || gate == "noise" {
        return Ok(None);
    }
    // the last dimension is the experts
    let e = *fresh
        .size()
        .last()
        .context("a gate parameter has a shape")?;
    let columns: Vec<i64> = (0..e).map(|x| x / g).collect();
    let index = Tensor::f_from_slice(&columns)?.f_to_device(fresh.device())?;
    Ok(Some(fresh.f_detach()?.f_index_select(-1, &index)?))
}

/// Slice `c` of `g` of the dense MLP's parameter `w`, as one expert's (`w2` times `g`).
fn expert_slice(dense: &Tensor, w: &str, c: i64, g: i64) -> Result<Tensor> {
    Ok(match w {
        "w1" | "w3" => {
            let h = dense.size()[1] / g;
            dense.f_narrow(1, c * h, h)?
        }
        "b1" => {
            let h = dense.size()[0] / g;
            dense.f_narrow(0, c * h, h)?
        }
        "w2" => {
            let h = dense.size()[0] / g;
            dense.f_narrow(0, c * h, h)?.f_mul_scalar(g as f64)?
        }
        "b2" => dense.shallow_clone(),
        other => bail!("internal error: expert parameter `{other}`"),
    })
}

/// `x` times `1 + noise · N(0, 1)`, drawn from `seed`.
fn jittered(x: &Tensor, noise: f64, seed: u64) -> Result<Tensor> {
    let _rng = lock_rng();
    tch::manual_seed(seed as i64);
    let jitter = Tensor::f_randn(x.size(), (Kind::Float, Device::Cpu))?
        .f_mul_scalar(noise)?
        .f_add_scalar(1.0)?;
    Ok(x.f_mul(&jitter)?)
}

/// A stable key of a parameter name (FNV-1a), for per-expert noise seeds.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reads the source model's parameters by fmoec name.
enum Reader {
    Hf {
        /// Each shard, mapped.
        files: BTreeMap<PathBuf, memmap2::Mmap>,
        /// Where each tensor is.
        file_of: BTreeMap<String, PathBuf>,
        /// Per fmoec parameter, the Hugging Face tensors that hold its parts.
        parts: BTreeMap<String, Vec<(String, Part)>>,
        /// Tensors that must be zero, and why.
        zeros: Vec<(String, &'static str)>,
        shapes: BTreeMap<String, layout::ParamShape>,
    },
    Fmoec(Box<CheckpointSource>),
}

impl Reader {
    fn open(resolved: &Resolved) -> Result<Reader> {
        match &resolved.format {
            Format::Fmoec { dir } => Ok(Reader::Fmoec(Box::new(CheckpointSource::open_for_init(
                dir,
                &resolved.source_model,
            )?))),
            Format::Hf { arch, tensors } => {
                let mut files = BTreeMap::new();
                let mut file_of = BTreeMap::new();
                for (name, entry) in tensors {
                    if !files.contains_key(&entry.file) {
                        files.insert(entry.file.clone(), map(&entry.file)?);
                    }
                    file_of.insert(name.clone(), entry.file.clone());
                }
                let mut parts: BTreeMap<String, Vec<(String, Part)>> = BTreeMap::new();
                let mut zeros = Vec::new();
                for t in layout::hf_tensors(&resolved.source_model, *arch) {
                    match t.source {
                        layout::Source::Param(part) => parts
                            .entry(part.param.clone())
                            .or_default()
                            .push((t.name, part)),
                        layout::Source::Zero { why } => zeros.push((t.name, why)),
                    }
                }
                let shapes = param_shapes(&resolved.source_model)
                    .into_iter()
                    .map(|p| (p.name.clone(), p))
                    .collect();
                Ok(Reader::Hf {
                    files,
                    file_of,
                    parts,
                    zeros,
                    shapes,
                })
            }
        }
    }

    /// A Hugging Face tensor as f32.
    fn hf_tensor(
        files: &BTreeMap<PathBuf, memmap2::Mmap>,
        file_of: &BTreeMap<String, PathBuf>,
        name: &str,
    ) -> Result<Tensor> {
        let path = file_of
            .get(name)
            .with_context(|| format!("the Hugging Face checkpoint has no `{name}`"))?;
        let st = SafeTensors::deserialize(&files[path])
            .with_context(|| format!("`{}` is not a safetensors file", path_text(path)))?;
        let view = st
            .tensor(name)
            .with_context(|| format!("`{}` has no tensor `{name}`", path_text(path)))?;
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            other => bail!(
                "`{name}` in `{}` is {other:?}; fmoec reads F32, F16, BF16, F64",
                path_text(path)
            ),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?)
    }

    /// The zeros the Hugging Face layout adds must be zero, or the model would not compute
    /// what the checkpoint's does.
    fn check_zeros(&self) -> Result<()> {
        let Reader::Hf {
            files,
            file_of,
            zeros,
            ..
        } = self
        else {
            return Ok(());
        };
        for (name, why) in zeros {
            let x = Reader::hf_tensor(files, file_of, name)?;
            let max = x.f_abs()?.f_max()?.f_double_value(&[])?;
            if max != 0.0 {
                bail!(
                    "`{name}` of the Hugging Face checkpoint is not zero (largest magnitude {max:e}): this model file cannot compute it ({why})"
                );
            }
        }
        Ok(())
    }

    /// The source model's parameter `name` (with `experts`, only those rows of a stacked
    /// expert tensor, in that order); `None` when the source has none (a noisy gate's noise
    /// projection is not in Hugging Face checkpoints).
    fn param(&self, name: &str, experts: Option<&[usize]>) -> Result<Option<Tensor>> {
        match self {
            Reader::Fmoec(source) => Ok(Some(source.get(name, false, experts)?)),
            Reader::Hf {
                files,
                file_of,
                parts,
                shapes,
                ..
            } => {
                let Some(pieces) = parts.get(name) else {
                    return Ok(None);
                };
                let shape = &shapes
                    .get(name)
                    .with_context(|| format!("internal error: `{name}` has no shape"))?
                    .shape;
                let mut dims: Vec<i64> = shape.iter().map(|&n| n as i64).collect();
                if let Some(ids) = experts {
                    dims[0] = ids.len() as i64;
                }
                let out = Tensor::f_zeros(&dims, (Kind::Float, Device::Cpu))?;
                for (hf, part) in pieces {
                    let row = match (part.expert, experts) {
                        (Some(e), Some(ids)) => match ids.iter().position(|&i| i as u64 == e) {
                            Some(r) => Some(r as i64),
                            None => continue,
                        },
                        (Some(e), None) => Some(e as i64),
                        (None, _) => None,
                    };
                    let mut x = Reader::hf_tensor(files, file_of, hf)?;
                    if part.scale != 1.0 {
                        x = x.f_div_scalar(part.scale)?;
                    }
                    if part.transposed {
                        x = x.f_transpose(0, 1)?;
                    }
                    let mut target = match row {
                        Some(r) => out.f_select(0, r)?,
                        None => out.shallow_clone(),
                    };
                    if let Some((offset, len)) = part.columns {
                        target = target.f_narrow(-1, offset as i64, len as i64)?;
                    }
                    target.f_copy_(&x)?;
                }
                Ok(Some(out))
            }
        }
    }
}

fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path_text(path)))?;
    // SAFETY: the file is only read; a concurrent writer could change what we read, not the
    // memory safety of safetensors' bounds-checked views into the map.
    unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map `{}`", path_text(path)))
}
