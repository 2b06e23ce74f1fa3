//! Reading checkpoints: finding one ([`resolve`], [`run_record`]), and restoring a run's
//! parameters and AdamW state from either format onto any expert placement ([`Source`],
//! [`resume`]; [`load`] for the single-rank format alone). Sizes, hashes, the model hash and
//! every tensor's name and shape are checked before anything in the model changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::SafeTensors;
use tch::{Device, Tensor};

use super::formats::{kind_of, read_listed};
use super::manifest::{single_as_sharded, Manifest, RunRecord, ShardedManifest};
use super::{
    named_moments, named_params, FORMAT, FORMAT_SHARDED, LATEST, MANIFEST_FILE, MODEL_FILE,
    OPTIM_FILE,
};
use crate::check::Model;
use crate::diag::path_text;
use crate::runtime::distributed::param_kind;
use crate::runtime::optim::AdamW;
use crate::runtime::params::ParamStore;

/// Resolves a checkpoint directory: a `step-*` directory itself, or a root holding `latest`.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        bail!(
            "there is no checkpoint at `{}`: it does not exist (a run writes its first \
             checkpoint at its first `checkpoint = every(N)` step, at --stop-after or when it \
             is stopped)",
            path_text(path)
        );
    }
    if path.join(MANIFEST_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST);
    if latest.exists() {
        let name = std::fs::read_to_string(&latest)
            .with_context(|| format!("cannot read `{}`", path_text(&latest)))?;
        let dir = path.join(name.trim());
        if !dir.join(MANIFEST_FILE).exists() {
            bail!(
                "`{}` names the checkpoint `{}`, but `{}` is not there",
                path_text(&latest),
                name.trim(),
                path_text(dir.join(MANIFEST_FILE))
            );
        }
        return Ok(dir);
    }
    bail!(
        "`{}` is not a checkpoint: it has neither `{MANIFEST_FILE}` nor a `{LATEST}` pointer",
        path_text(path)
    )
}

/// What the manifest of the checkpoint at `path` (a `step-*` folder, or a root with
/// `latest`) says about its run, in either format, without reading or checking its tensors.
pub fn run_record(path: &Path) -> Result<RunRecord> {
    let dir = resolve(path)?;
    let (manifest_path, text) = read_manifest(&dir)?;
    serde_json::from_str(&text).with_context(|| not_a_manifest(&manifest_path))
}

/// The path and text of the manifest of the checkpoint folder `dir`.
fn read_manifest(dir: &Path) -> Result<(PathBuf, String)> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read `{}`", path_text(&manifest_path)))?;
    Ok((manifest_path, text))
}

/// What is said of a manifest that does not parse as one.
fn not_a_manifest(manifest_path: &Path) -> String {
    format!(
        "`{}` is not a valid checkpoint manifest",
        path_text(manifest_path)
    )
}

/// A verified checkpoint, read into memory.
pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: Manifest,
    model_bytes: Vec<u8>,
    optim_bytes: Vec<u8>,
}

/// Reads and verifies a checkpoint against `model` without changing anything.
pub fn load(path: &Path, model: &Model) -> Result<Loaded> {
    let dir = resolve(path)?;
    let (manifest_path, text) = read_manifest(&dir)?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| not_a_manifest(&manifest_path))?;
    if manifest.run.format == FORMAT_SHARDED {
        bail!(
            "`{}` was written by a run on several ranks (format `{FORMAT_SHARDED}`); read it with checkpoint::resume",
            path_text(&dir)
        );
    }
    if manifest.run.format != FORMAT {
        bail!(
            "`{}` has format `{}`; this fmoec reads `{FORMAT}`",
            path_text(&dir),
            manifest.run.format
        );
    }
    manifest.run.check_model(&dir, model)?;
    let read = |name: &str| read_listed(&dir, &manifest.files, name);
    let model_bytes = read(MODEL_FILE)?;
    let optim_bytes = read(OPTIM_FILE)?;
    Ok(Loaded {
        dir,
        manifest,
        model_bytes,
        optim_bytes,
    })
}

fn restore_into(bytes: &[u8], file: &str, names: &[(String, Tensor)]) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("`{file}` is not a safetensors file"))?;
    let mut found: HashMap<String, ()> = HashMap::new();
    let mut staged = Vec::new();
    for (name, target) in names {
        let view = st
            .tensor(name)
            .with_context(|| format!("`{file}` has no tensor `{name}`"))?;
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        if shape != target.size() {
            bail!(
                "`{file}`: tensor `{name}` has shape {shape:?}, the model needs {:?}",
                target.size()
            );
        }
        let t = Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)?;
        staged.push(t);
        found.insert(name.clone(), ());
    }
    let extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !found.contains_key(*n))
        .cloned()
        .collect();
    if !extra.is_empty() {
        bail!(
            "`{file}` holds tensors the model does not have: {}",
            extra.join(", ")
        );
    }
    let _guard = tch::no_grad_guard();
    for ((_, target), src) in names.iter().zip(staged) {
        let mut target = target.shallow_clone();
        target.f_copy_(&src.f_to_kind(target.kind())?.f_to_device(target.device())?)?;
    }
    Ok(())
}

impl Loaded {
    /// Copies the parameters into `store` and the optimizer state into `optim`.
    pub fn restore(&self, store: &ParamStore, optim: &mut AdamW) -> Result<()> {
        self.restore_params(store)?;
        let optim_named = named_moments(store, optim, |_| true);
        restore_into(&self.optim_bytes, OPTIM_FILE, &optim_named)?;
        optim.step = self.manifest.run.optimizer_step;
        Ok(())
    }

    /// Copies only the parameters (for sampling).
    pub fn restore_params(&self, store: &ParamStore) -> Result<()> {
        let model_named = named_params(store, |_| true);
        restore_into(&self.model_bytes, MODEL_FILE, &model_named)
    }
}

/// What [`resume`] restored.
#[derive(Clone, Debug)]
pub struct Resumed {
    pub dir: PathBuf,
    pub step: u64,
    pub tokens_seen: u64,
    pub seed: u64,
    /// The world the checkpoint was written on.
    pub world: usize,
}

/// The (model, optimizer) file contents of one shard.
type ShardBytes = (Vec<u8>, Vec<u8>);

/// A checkpoint of either format, opened and checked against the model; shards are read
/// (and their sizes and hashes verified) when first needed.
pub struct Source {
    pub dir: PathBuf,
    pub manifest: ShardedManifest,
    /// Bytes of each shard's (model, optimizer) files, by shard index.
    cache: std::cell::RefCell<BTreeMap<usize, std::rc::Rc<ShardBytes>>>,
    /// For each layer: global expert -> (shard index, row).
    rows: BTreeMap<usize, Vec<(usize, usize)>>,
}

impl Source {
    /// Opens `path` (a `step-*` folder, or a root with `latest`) of format v1 or v2.
    pub fn open(path: &Path, model: &Model) -> Result<Source> {
        Source::open_checked(path, model, true)
    }

    /// Opens a checkpoint of another model than `model` to start a run from (`init`): as
    /// [`Source::open`] without the model-hash check; `model` gives the layers' expert counts,
    /// and the caller checks every tensor's name and shape.
    pub fn open_for_init(path: &Path, model: &Model) -> Result<Source> {
        Source::open_checked(path, model, false)
    }

    fn open_checked(path: &Path, model: &Model, same_model: bool) -> Result<Source> {
        let dir = resolve(path)?;
        let manifest = Source::read_either_manifest(&dir, model)?;
        if same_model {
            manifest.run.check_model(&dir, model)?;
        }
        if !manifest.shards.iter().any(|s| s.replicated) {
            bail!(
                "checkpoint `{}`: no shard holds the replicated parameters",
                path_text(&dir)
            );
        }
        let mut rows = BTreeMap::new();
        for (layer, moe) in model.moe_layers() {
            let of = expert_rows(&dir, &manifest, layer, moe.experts as usize)?;
            rows.insert(layer, of);
        }
        Ok(Source {
            dir,
            manifest,
            cache: Default::default(),
            rows,
        })
    }

    /// The manifest of the checkpoint folder `dir` as a sharded one: format v2 as it is,
    /// format v1 as one shard holding everything.
    fn read_either_manifest(dir: &Path, model: &Model) -> Result<ShardedManifest> {
        let (manifest_path, text) = read_manifest(dir)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| not_a_manifest(&manifest_path))?;
        let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
        Ok(match format {
            FORMAT => {
                let v1: Manifest = serde_json::from_value(value)
                    .with_context(|| not_a_manifest(&manifest_path))?;
                single_as_sharded(v1, model)
            }
            FORMAT_SHARDED => {
                serde_json::from_value(value).with_context(|| not_a_manifest(&manifest_path))?
            }
            other => bail!(
                "`{}` has format `{other}`; this fmoec reads `{FORMAT}` and `{FORMAT_SHARDED}`",
                path_text(dir)
            ),
        })
    }

    fn shard_bytes(&self, index: usize) -> Result<std::rc::Rc<ShardBytes>> {
        if let Some(b) = self.cache.borrow().get(&index) {
            return Ok(b.clone());
        }
        let shard = &self.manifest.shards[index];
        let read = |file: &str| -> Result<Vec<u8>> {
            let name = if shard.dir.is_empty() {
                file.to_string()
            } else {
                format!("{}/{file}", shard.dir)
            };
            read_listed(&self.dir, &shard.files, &name)
        };
        let bytes = std::rc::Rc::new((read(MODEL_FILE)?, read(OPTIM_FILE)?));
        self.cache.borrow_mut().insert(index, bytes.clone());
        Ok(bytes)
    }

    fn tensor(&self, index: usize, optim: bool, name: &str) -> Result<Tensor> {
        let bytes = self.shard_bytes(index)?;
        let shard = &self.manifest.shards[index];
        let (data, file) = if optim {
            (&bytes.1, OPTIM_FILE)
        } else {
            (&bytes.0, MODEL_FILE)
        };
        let st = SafeTensors::deserialize(data)
            .with_context(|| format!("`{}/{}` is not a safetensors file", shard.dir, file))?;
        let view = st.tensor(name).with_context(|| {
            format!(
                "checkpoint `{}`: `{}/{file}` has no tensor `{name}`",
                path_text(&self.dir),
                shard.dir
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        Ok(Tensor::f_from_data_size(
            view.data(),
            &shape,
            kind_of(view.dtype())?,
        )?)
    }

    /// The saved value of `name` (`m.`/`v.` prefixed in the optimizer file): a replicated
    /// parameter as saved, or an expert tensor holding the rows of `experts` in that order.
    pub fn get(&self, name: &str, optim: bool, experts: Option<&[usize]>) -> Result<Tensor> {
        let key = if optim {
            name.split_once('.').map_or(name, |(_, rest)| rest)
        } else {
            name
        };
        if param_kind(key) != crate::collective::ParamKind::Expert {
            return self.replicated(key, optim, name);
        }
        let layer =
            expert_layer(key).with_context(|| format!("internal error: `{key}` names no layer"))?;
        let rows = self.rows.get(&layer).with_context(|| {
            format!(
                "checkpoint `{}` has no placement for MoE layer {layer}",
                path_text(&self.dir)
            )
        })?;
        let all: Vec<usize> = (0..rows.len()).collect();
        let wanted = experts.unwrap_or(&all);
        if wanted.is_empty() {
            let any = self.tensor(rows[0].0, optim, name)?;
            let mut shape = any.size();
            shape[0] = 0;
            return Ok(Tensor::f_zeros(shape, (any.kind(), Device::Cpu))?);
        }
        self.expert_tensor(name, optim, layer, rows, wanted)
    }

    /// A replicated parameter `key` (its tensor `name` in the model or optimizer file) from
    /// the shard that holds it: the replicated one, or with pipeline stages its stage's.
    fn replicated(&self, key: &str, optim: bool, name: &str) -> Result<Tensor> {
        let Some(holder) = self
            .manifest
            .shards
            .iter()
            .position(|s| s.replicated && s.part.as_ref().is_none_or(|p| p.holds(key)))
        else {
            bail!(
                "checkpoint `{}`: no shard holds `{key}`",
                path_text(&self.dir)
            );
        };
        self.tensor(holder, optim, name)
    }

    /// The rows of the experts `wanted` (global ids, at least one) of MoE layer `layer`'s
    /// tensor `name`, in that order, each read from the shard `rows` places it in.
    fn expert_tensor(
        &self,
        name: &str,
        optim: bool,
        layer: usize,
        rows: &[(usize, usize)],
        wanted: &[usize],
    ) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(wanted.len());
        let mut shard_tensors: BTreeMap<usize, Tensor> = BTreeMap::new();
        for &e in wanted {
            let &(index, row) = rows.get(e).with_context(|| {
                format!(
                    "expert {e} of layer {layer} is not in checkpoint `{}`",
                    path_text(&self.dir)
                )
            })?;
            if let std::collections::btree_map::Entry::Vacant(slot) = shard_tensors.entry(index) {
                slot.insert(self.tensor(index, optim, name)?);
            }
            let t = &shard_tensors[&index];
            if t.size().first().copied().unwrap_or(0) <= row as i64 {
                bail!(
                    "checkpoint `{}`: `{name}` of shard {} has {} rows, the manifest places expert {e} at row {row}",
                    path_text(&self.dir),
                    self.manifest.shards[index].dir,
                    t.size().first().copied().unwrap_or(0)
                );
            }
            parts.push(t.f_narrow(0, row as i64, 1)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Copies the saved parameters (and, with `optim`, the AdamW state) into `store`, taking
    /// for every MoE layer the experts `local[layer]` in that order.
    pub fn restore(
        &self,
        store: &ParamStore,
        optim: Option<&mut AdamW>,
        local: &BTreeMap<usize, Vec<usize>>,
    ) -> Result<()> {
        let experts_of = |name: &str| -> Option<&[usize]> {
            if param_kind(name) != crate::collective::ParamKind::Expert {
                return None;
            }
            expert_layer(name)
                .and_then(|l| local.get(&l))
                .map(Vec::as_slice)
        };
        let mut staged = Vec::new();
        let check = |name: &str, got: &Tensor, target: &Tensor| -> Result<()> {
            if got.size() != target.size() {
                bail!(
                    "checkpoint `{}`: tensor `{name}` has shape {:?}, the model needs {:?}",
                    path_text(&self.dir),
                    got.size(),
                    target.size()
                );
            }
            Ok(())
        };
        for (i, p) in store.params.iter().enumerate() {
            let experts = experts_of(&p.name);
            let t = self.get(&p.name, false, experts)?;
            check(&p.name, &t, &p.tensor)?;
            staged.push((p.tensor.shallow_clone(), t));
            if let Some(adam) = optim.as_ref() {
                for (prefix, target) in [("m", &adam.m[i]), ("v", &adam.v[i])] {
                    let name = format!("{prefix}.{}", p.name);
                    let t = self.get(&name, true, experts)?;
                    check(&name, &t, target)?;
                    staged.push((target.shallow_clone(), t));
                }
            }
        }
        let _guard = tch::no_grad_guard();
        for (mut target, src) in staged {
            target.f_copy_(&src.f_to_kind(target.kind())?.f_to_device(target.device())?)?;
        }
        if let Some(adam) = optim {
            adam.step = self.manifest.run.optimizer_step;
        }
        Ok(())
    }

    /// Every parameter with all experts in global order (for comparisons and export).
    pub fn parameters(&self, store: &ParamStore) -> Result<Vec<(String, Tensor)>> {
        store
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), self.get(&p.name, false, None)?)))
            .collect()
    }
}

/// Where each of the `experts` experts of MoE layer `layer` lies in the checkpoint at `dir`:
/// (shard index, row), by global expert id; every expert must be held.
fn expert_rows(
    dir: &Path,
    manifest: &ShardedManifest,
    layer: usize,
    experts: usize,
) -> Result<Vec<(usize, usize)>> {
    let mut of = vec![(usize::MAX, 0); experts];
    for (i, shard) in manifest.shards.iter().enumerate() {
        for held in shard.experts.iter().filter(|h| h.layer == layer) {
            for (row, &e) in held.ids.iter().enumerate() {
                match of.get_mut(e) {
                    Some(slot) => *slot = (i, row),
                    None => bail!(
                        "checkpoint `{}`: shard {} holds expert {e} of layer {layer}, which has {experts}",
                        path_text(dir),
                        shard.dir
                    ),
                }
            }
        }
    }
    if let Some(missing) = of.iter().position(|s| s.0 == usize::MAX) {
        bail!(
            "checkpoint `{}`: no shard holds expert {missing} of layer {layer}",
            path_text(dir)
        );
    }
    Ok(of)
}

/// `layers.3.ffn.experts.w1` -> 3.
fn expert_layer(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Restores parameters and AdamW state from a checkpoint of either format onto this rank's
/// experts (`local[layer]`: global ids in local order), resharding as needed.
pub fn resume(
    path: &Path,
    model: &Model,
    store: &ParamStore,
    optim: &mut AdamW,
    local: &BTreeMap<usize, Vec<usize>>,
) -> Result<Resumed> {
    let source = Source::open(path, model)?;
    source.restore(store, Some(optim), local)?;
    Ok(Resumed {
        dir: source.dir.clone(),
        step: source.manifest.run.step,
        tokens_seen: source.manifest.run.tokens_seen,
        seed: source.manifest.run.seed,
        world: source.manifest.world,
    })
}
