//! Checkpoints: a directory per step with `model.safetensors` (parameters by their dotted
//! names), `optimizer.safetensors` (AdamW `m.<name>`, `v.<name>`) and `manifest.json` (model
//! hash, step, optimizer step, seed and RNG scheme, data position, file sizes and SHA-256).
//!
//! Writes are atomic: everything goes into a hidden temporary directory that is renamed into
//! place, and the `latest` pointer is replaced by rename; an existing checkpoint is never
//! overwritten. Loading verifies sizes, hashes, the model hash and every tensor's shape before
//! touching the model, so a truncated, corrupt or mismatched checkpoint is refused with a clear
//! error. Knows nothing about how training uses the state it restores.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::check::Model;
use crate::runtime::optim::AdamW;
use crate::runtime::params::ParamStore;

pub const FORMAT: &str = "fmoec-checkpoint-v1";
const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const MANIFEST_FILE: &str = "manifest.json";
const LATEST: &str = "latest";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub model: String,
    /// SHA-256 of the checked model's JSON (architecture, not spans).
    pub model_hash: String,
    /// Completed optimizer steps; training resumes at this step.
    pub step: u64,
    pub tokens_seen: u64,
    pub seed: u64,
    /// How the random state is derived, so that `seed` and `step` restore it exactly.
    pub rng: String,
    /// The data source and the position in it (data windows are keyed by step).
    pub data: DataPosition,
    pub optimizer_step: u64,
    pub precision: String,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataPosition {
    pub source: String,
    pub next_step: u64,
}

/// SHA-256 (hex) of the model's architecture.
pub fn model_hash(model: &Model) -> String {
    let json = serde_json::to_vec(model).expect("the model serializes");
    hex(&Sha256::digest(&json))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Int64 => Dtype::I64,
        other => bail!("cannot store a {other:?} tensor in a checkpoint"),
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::I64 => Kind::Int64,
        other => bail!("checkpoint tensor of unsupported dtype {other:?}"),
    })
}

fn tensor_bytes(t: &Tensor) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut buf, numel)?;
    let shape = t.size().iter().map(|&s| s as usize).collect();
    Ok((dtype_of(t.kind())?, shape, buf))
}

fn serialize(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(n, t)| tensor_bytes(t).map(|(d, s, b)| (n.clone(), d, s, b)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::tensor::serialize(views, &None)?)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("cannot create `{}`", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// What [`save`] records besides tensors.
pub struct SaveInfo<'a> {
    pub model: &'a Model,
    pub step: u64,
    pub tokens_seen: u64,
    pub seed: u64,
    pub data_source: String,
    pub precision: String,
}

/// Writes a checkpoint under `root` (`root/step-XXXXXXXX`), atomically; refuses to replace one.
pub fn save(
    root: &Path,
    info: &SaveInfo<'_>,
    store: &ParamStore,
    optim: &AdamW,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create `{}`", root.display()))?;
    let final_dir = root.join(step_dir_name(info.step));
    if final_dir.exists() {
        bail!(
            "refusing to overwrite the existing checkpoint `{}` (resume from it with --resume, or \
             choose another --out)",
            final_dir.display()
        );
    }
    let tmp = root.join(format!(
        ".{}.tmp-{}",
        step_dir_name(info.step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    let model_named: Vec<(String, Tensor)> = store
        .params
        .iter()
        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
        .collect();
    let mut optim_named = Vec::new();
    for (i, p) in store.params.iter().enumerate() {
        optim_named.push((format!("m.{}", p.name), optim.m[i].shallow_clone()));
        optim_named.push((format!("v.{}", p.name), optim.v[i].shallow_clone()));
    }
    let mut files = Vec::new();
    for (name, named) in [(MODEL_FILE, &model_named), (OPTIM_FILE, &optim_named)] {
        let bytes = serialize(named)?;
        write_synced(&tmp.join(name), &bytes)?;
        files.push(FileEntry {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
        });
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        model: info.model.name.clone(),
        model_hash: model_hash(info.model),
        step: info.step,
        tokens_seen: info.tokens_seen,
        seed: info.seed,
        rng: "libtorch's generator is reseeded before every step with mix(seed, step); data \
              windows are keyed by (seed, step, micro-batch, row)"
            .to_string(),
        data: DataPosition {
            source: info.data_source.clone(),
            next_step: info.step,
        },
        optimizer_step: optim.step,
        precision: info.precision.clone(),
        files,
    };
    write_synced(
        &tmp.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move the checkpoint into `{}`", final_dir.display()))?;
    let latest_tmp = root.join(format!(".{LATEST}.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, step_dir_name(info.step).as_bytes())?;
    std::fs::rename(&latest_tmp, root.join(LATEST))?;
    Ok(final_dir)
}

/// Resolves a checkpoint directory: a `step-*` directory itself, or a root holding `latest`.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST);
    if latest.exists() {
        let name = std::fs::read_to_string(&latest)?;
        return Ok(path.join(name.trim()));
    }
    bail!(
        "`{}` is not a checkpoint: it has neither `{MANIFEST_FILE}` nor a `{LATEST}` pointer",
        path.display()
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
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read `{}`", manifest_path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text).with_context(|| {
        format!(
            "`{}` is not a valid checkpoint manifest",
            manifest_path.display()
        )
    })?;
    if manifest.format != FORMAT {
        bail!(
            "`{}` has format `{}`; this fmoec reads `{FORMAT}`",
            dir.display(),
            manifest.format
        );
    }
    let want = model_hash(model);
    if manifest.model_hash != want {
        bail!(
            "checkpoint `{}` was written for a different model (`{}`, hash {}…) than `{}` (hash {}…)",
            dir.display(),
            manifest.model,
            &manifest.model_hash[..12.min(manifest.model_hash.len())],
            model.name,
            &want[..12]
        );
    }
    let read = |name: &str| -> Result<Vec<u8>> {
        let entry = manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .with_context(|| {
                format!(
                    "checkpoint `{}`'s manifest does not list `{name}`",
                    dir.display()
                )
            })?;
        let p = dir.join(name);
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read `{}`", p.display()))?;
        if bytes.len() as u64 != entry.bytes {
            bail!(
                "checkpoint file `{}` is truncated or damaged: {} bytes, the manifest says {}",
                p.display(),
                bytes.len(),
                entry.bytes
            );
        }
        if hex(&Sha256::digest(&bytes)) != entry.sha256 {
            bail!(
                "checkpoint file `{}` is corrupt: its SHA-256 does not match the manifest",
                p.display()
            );
        }
        Ok(bytes)
    };
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
        let model_named: Vec<(String, Tensor)> = store
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        restore_into(&self.model_bytes, MODEL_FILE, &model_named)?;
        let mut optim_named = Vec::new();
        for (i, p) in store.params.iter().enumerate() {
            optim_named.push((format!("m.{}", p.name), optim.m[i].shallow_clone()));
            optim_named.push((format!("v.{}", p.name), optim.v[i].shallow_clone()));
        }
        restore_into(&self.optim_bytes, OPTIM_FILE, &optim_named)?;
        optim.step = self.manifest.optimizer_step;
        Ok(())
    }

    /// Copies only the parameters (for sampling).
    pub fn restore_params(&self, store: &ParamStore) -> Result<()> {
        let model_named: Vec<(String, Tensor)> = store
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        restore_into(&self.model_bytes, MODEL_FILE, &model_named)
    }
}
