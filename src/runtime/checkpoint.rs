//! Checkpoints: a directory per step with `model.safetensors` (parameters by their dotted
//! names), `optimizer.safetensors` (AdamW `m.<name>`, `v.<name>`) and `manifest.json` (model
//! hash, step, optimizer step, seed and RNG scheme, data position, file sizes and SHA-256).
//!
//! A run on many ranks writes format v2 ([`save_sharded`]): one `rank-NNNNN/` folder per rank
//! that holds something (rank 0: every replicated and gate parameter and its experts; the
//! other ranks of the first expert-data position: their experts only, as FastMoE does), each
//! with the same two files, and one `manifest.json` that records the world, the group layout,
//! every MoE layer's placement, which rank holds which experts, and every shard's sizes and
//! SHA-256. [`resume`] reads either format onto any placement: each rank reads the shards that
//! hold its experts (and their AdamW moments), so a checkpoint saved on N ranks resumes on M.
//! Tensors are always whole (a tensor-parallel run gathers its slices before saving and
//! slices after loading), so a checkpoint also resumes under any tensor size.
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
use tch::{Device, Kind, Tensor};

use std::collections::BTreeMap;

use crate::check::Model;
use crate::runtime::distributed::{param_kind, RankContext};
use crate::runtime::optim::AdamW;
use crate::runtime::params::ParamStore;

pub const FORMAT: &str = "fmoec-checkpoint-v1";
/// The sharded format of multi-rank runs.
pub const FORMAT_SHARDED: &str = "fmoec-checkpoint-v2";
const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const MANIFEST_FILE: &str = "manifest.json";
/// The file naming the newest complete checkpoint of a folder.
pub const LATEST: &str = "latest";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What both manifest formats record about the run (flattened into each: the JSON keys
/// stay at the top level, in this order).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub format: String,
    pub model: String,
    /// SHA-256 of the checked model's JSON (architecture, not spans).
    pub model_hash: String,
    /// Completed optimizer steps; training resumes at this step.
    pub step: u64,
    /// The length of the run's schedule (`--steps`); absent in checkpoints of older fmoec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    pub tokens_seen: u64,
    pub seed: u64,
    /// How the random state is derived, so that `seed` and `step` restore it exactly.
    pub rng: String,
    /// The data source and the position in it (data windows are keyed by step).
    pub data: DataPosition,
    pub optimizer_step: u64,
    pub precision: String,
}

impl RunRecord {
    fn new(format: &str, info: &SaveInfo, optimizer_step: u64) -> RunRecord {
        RunRecord {
            format: format.to_string(),
            model: info.model.name.clone(),
            model_hash: model_hash(info.model),
            step: info.step,
            total_steps: Some(info.total_steps),
            tokens_seen: info.tokens_seen,
            seed: info.seed,
            rng: RNG_SCHEME.to_string(),
            data: DataPosition {
                source: info.data_source.clone(),
                next_step: info.step,
            },
            optimizer_step,
            precision: info.precision.clone(),
        }
    }

    /// Refuses a checkpoint written for another architecture than `model`.
    fn check_model(&self, dir: &Path, model: &Model) -> Result<()> {
        let want = model_hash(model);
        if self.model_hash != want {
            bail!(
                "checkpoint `{}` was written for a different model (`{}`, hash {}…) than `{}` (hash {}…)",
                dir.display(),
                self.model,
                &self.model_hash[..12.min(self.model_hash.len())],
                model.name,
                &want[..12]
            );
        }
        Ok(())
    }
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    #[serde(flatten)]
    pub run: RunRecord,
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
    crate::driver::sha256_hex(&json)
}

/// Reads `name` (a path relative to the checkpoint `dir`) after checking that the manifest
/// lists it, and that its size and SHA-256 are the listed ones.
fn read_listed(dir: &Path, files: &[FileEntry], name: &str) -> Result<Vec<u8>> {
    let entry = files.iter().find(|f| f.name == name).with_context(|| {
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
    if crate::driver::sha256_hex(&bytes) != entry.sha256 {
        bail!(
            "checkpoint file `{}` is corrupt: its SHA-256 does not match the manifest",
            p.display()
        );
    }
    Ok(bytes)
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
    /// The schedule's length.
    pub total_steps: u64,
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
            sha256: crate::driver::sha256_hex(&bytes),
        });
    }
    let manifest = Manifest {
        run: RunRecord::new(FORMAT, info, optim.step),
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

/// Deletes all but the newest `keep` complete checkpoints (`step-*` folders with a manifest)
/// under `root`, never the one `latest` names; `keep == 0` keeps all. Each folder is first
/// renamed to a hidden name, so an interrupted deletion never leaves a damaged `step-*` folder
/// behind (the next prune finishes it). Returns the checkpoints deleted.
pub fn prune(root: &Path, keep: u64) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let latest = std::fs::read_to_string(root.join(LATEST))
        .map(|s| s.trim().to_string())
        .ok();
    let mut steps: Vec<(u64, String)> = Vec::new();
    for entry in
        std::fs::read_dir(root).with_context(|| format!("cannot list `{}`", root.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let path = root.join(&name);
        if name.starts_with(".step-") && name.ends_with(".deleting") {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot delete `{}`", path.display()))?;
            continue;
        }
        let Some(step) = name
            .strip_prefix("step-")
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok())
        else {
            continue;
        };
        if path.join(MANIFEST_FILE).is_file() {
            steps.push((step, name));
        }
    }
    steps.sort_unstable_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut deleted = Vec::new();
    for (_, name) in steps.into_iter().skip(keep as usize) {
        if latest.as_deref() == Some(name.as_str()) {
            continue;
        }
        let path = root.join(&name);
        let doomed = root.join(format!(".{name}.deleting"));
        std::fs::rename(&path, &doomed)
            .with_context(|| format!("cannot delete `{}`", path.display()))?;
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("cannot delete `{}`", doomed.display()))?;
        deleted.push(path);
    }
    Ok(deleted)
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

/// What the manifest of the checkpoint at `path` (a `step-*` folder, or a root with
/// `latest`) says about its run, in either format, without reading or checking its tensors.
pub fn run_record(path: &Path) -> Result<RunRecord> {
    let dir = resolve(path)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read `{}`", manifest_path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "`{}` is not a valid checkpoint manifest",
            manifest_path.display()
        )
    })
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
    if manifest.run.format == FORMAT_SHARDED {
        bail!(
            "`{}` was written by a run on several ranks (format `{FORMAT_SHARDED}`); read it with checkpoint::resume",
            dir.display()
        );
    }
    if manifest.run.format != FORMAT {
        bail!(
            "`{}` has format `{}`; this fmoec reads `{FORMAT}`",
            dir.display(),
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
        optim.step = self.manifest.run.optimizer_step;
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

// ---------------------------------------------------------------------------------------
// Sharded checkpoints (many ranks)
// ---------------------------------------------------------------------------------------

const RNG_SCHEME: &str = "data windows are keyed by (seed, step, micro-batch, row) and the gates' \
     random draws by (seed, step, micro-batch, layer); micro-batch m of a step runs on data rank m mod D";

/// One MoE layer's placement in a sharded checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerPlacement {
    pub layer: usize,
    pub experts: usize,
    /// Global expert ids held by each position of an expert group, in local order.
    pub positions: Vec<Vec<usize>>,
}

/// The experts one shard holds in one layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeldExperts {
    pub layer: usize,
    pub ids: Vec<usize>,
}

/// One rank's folder of a sharded checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Shard {
    pub rank: usize,
    /// `rank-NNNNN`.
    pub dir: String,
    /// Its position in its expert group.
    pub expert_position: usize,
    /// Whether it holds the replicated and gate parameters (rank 0 only).
    pub replicated: bool,
    pub experts: Vec<HeldExperts>,
    pub files: Vec<FileEntry>,
}

/// The group layout a sharded checkpoint was written with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayoutRecord {
    pub data: Vec<Vec<usize>>,
    pub expert: Vec<Vec<usize>>,
    pub expert_data: Vec<Vec<usize>>,
    pub gate: Vec<Vec<usize>>,
}

/// `manifest.json` of format v2.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardedManifest {
    #[serde(flatten)]
    pub run: RunRecord,
    pub world: usize,
    pub expert_group: usize,
    pub layout: LayoutRecord,
    pub placements: Vec<LayerPlacement>,
    pub shards: Vec<Shard>,
}

/// Whether every rank of the world reports `ok` (a sum over [`RankContext::world_group`]).
fn all_ok(ctx: &RankContext, ok: bool, at: &str) -> Result<bool> {
    let mut t = Tensor::f_from_slice(&[f64::from(u8::from(!ok))])?.f_to_device(ctx.device)?;
    ctx.world_group().all_reduce_sum(&mut t, at)?;
    Ok(t.f_double_value(&[0])? == 0.0)
}

fn shard_dir_name(rank: usize) -> String {
    format!("rank-{rank:05}")
}

/// This rank's shard entry (without files).
fn shard_of(ctx: &RankContext, rank: usize, layout: &crate::collective::GroupLayout) -> Shard {
    use crate::collective::GroupKind;
    let position = layout
        .members(GroupKind::Expert, rank)
        .and_then(|m| m.iter().position(|&r| r == rank))
        .unwrap_or_default();
    Shard {
        rank,
        dir: shard_dir_name(rank),
        expert_position: position,
        replicated: rank == 0,
        experts: ctx
            .plan
            .placements
            .iter()
            .map(|(&layer, p)| HeldExperts {
                layer,
                ids: p.local_experts(position).to_vec(),
            })
            .collect(),
        files: Vec::new(),
    }
}

/// The ranks that write a shard: rank 0 and every rank at expert-data position 0, of those
/// only tensor rank 0 (with tensor parallelism the trainer hands every rank whole tensors, so
/// tensor rank 0 of a data rank holds what the whole tensor group holds).
fn writers(plan: &crate::runtime::distributed::WorldPlan) -> Vec<usize> {
    use crate::collective::GroupKind;
    let layout = &plan.layout;
    let tensor_first = |r: usize| {
        plan.tensor
            .iter()
            .find(|g| g.contains(&r))
            .is_none_or(|g| g.first() == Some(&r))
    };
    (0..layout.world)
        .filter(|&r| {
            r == 0
                || (tensor_first(r)
                    && layout
                        .members(GroupKind::ExpertData, r)
                        .is_some_and(|m| m.first() == Some(&r)))
        })
        .collect()
}

/// Writes this rank's part of the checkpoint after `info.step` steps under `root`. Every rank
/// calls it; the step folder appears (by one rename, then `latest`) only after every shard
/// was written and synced, so a crash leaves no half-written checkpoint behind `latest`.
pub fn save_sharded(
    root: &Path,
    info: &SaveInfo<'_>,
    store: &ParamStore,
    optim: &AdamW,
    ctx: &RankContext,
) -> Result<PathBuf> {
    let rank = ctx.rank();
    let layout = &ctx.plan.layout;
    let name = step_dir_name(info.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    let at = format!("checkpoint {name}");

    // 1. rank 0 prepares the temporary folder.
    let mut problem = None;
    if rank == 0 {
        let prepared = (|| -> Result<()> {
            std::fs::create_dir_all(root)
                .with_context(|| format!("cannot create `{}`", root.display()))?;
            if final_dir.exists() {
                bail!(
                    "refusing to overwrite the existing checkpoint `{}` (resume from it with --resume, or choose another --out)",
                    final_dir.display()
                );
            }
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir(&tmp)?;
            Ok(())
        })();
        problem = prepared.err();
    }
    if !all_ok(ctx, problem.is_none(), &format!("{at}, prepare"))? {
        return Err(problem.unwrap_or_else(|| {
            anyhow::anyhow!(
                "rank 0 could not prepare checkpoint `{}`",
                final_dir.display()
            )
        }));
    }

    // 2. the writers write their shard and a small list of its files.
    let writes = writers(&ctx.plan).contains(&rank);
    let written = (|| -> Result<()> {
        if !writes {
            return Ok(());
        }
        let dir = tmp.join(shard_dir_name(rank));
        std::fs::create_dir(&dir)?;
        let keep = |n: &str| rank == 0 || param_kind(n) == crate::collective::ParamKind::Expert;
        let mut model_named = Vec::new();
        let mut optim_named = Vec::new();
        for (i, p) in store.params.iter().enumerate() {
            if !keep(&p.name) {
                continue;
            }
            model_named.push((p.name.clone(), p.tensor.shallow_clone()));
            optim_named.push((format!("m.{}", p.name), optim.m[i].shallow_clone()));
            optim_named.push((format!("v.{}", p.name), optim.v[i].shallow_clone()));
        }
        let mut shard = shard_of(ctx, rank, layout);
        for (file, named) in [(MODEL_FILE, &model_named), (OPTIM_FILE, &optim_named)] {
            let bytes = serialize(named)?;
            write_synced(&dir.join(file), &bytes)?;
            shard.files.push(FileEntry {
                name: format!("{}/{file}", shard.dir),
                bytes: bytes.len() as u64,
                sha256: crate::driver::sha256_hex(&bytes),
            });
        }
        write_synced(
            &dir.join("shard.json"),
            serde_json::to_string_pretty(&shard)?.as_bytes(),
        )?;
        Ok(())
    })();
    let failed = written.as_ref().err().map(|e| format!("{e:#}"));
    if !all_ok(ctx, written.is_ok(), &format!("{at}, shards"))? {
        bail!(
            "checkpoint `{}` was not written: {}",
            final_dir.display(),
            failed.unwrap_or_else(|| "another rank could not write its shard".into())
        );
    }

    // 3. rank 0 writes the manifest and moves the folder into place.
    let mut problem = None;
    if rank == 0 {
        let finished = (|| -> Result<()> {
            let mut shards = Vec::new();
            for r in writers(&ctx.plan) {
                let p = tmp.join(shard_dir_name(r)).join("shard.json");
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read `{}`", p.display()))?;
                let shard: Shard = serde_json::from_str(&text)?;
                std::fs::remove_file(&p)?;
                shards.push(shard);
            }
            let manifest = ShardedManifest {
                run: RunRecord::new(FORMAT_SHARDED, info, optim.step),
                world: layout.world,
                expert_group: ctx.expert_group_size(),
                layout: LayoutRecord {
                    data: layout.data.clone(),
                    expert: layout.expert.clone(),
                    expert_data: layout.expert_data.clone(),
                    gate: layout.gate.clone(),
                },
                placements: ctx
                    .plan
                    .placements
                    .iter()
                    .map(|(&layer, p)| LayerPlacement {
                        layer,
                        experts: p.experts(),
                        positions: (0..p.ranks())
                            .map(|q| p.local_experts(q).to_vec())
                            .collect(),
                    })
                    .collect(),
                shards,
            };
            write_synced(
                &tmp.join(MANIFEST_FILE),
                serde_json::to_string_pretty(&manifest)?.as_bytes(),
            )?;
            std::fs::rename(&tmp, &final_dir).with_context(|| {
                format!("cannot move the checkpoint into `{}`", final_dir.display())
            })?;
            let latest_tmp = root.join(format!(".{LATEST}.tmp-{}", std::process::id()));
            write_synced(&latest_tmp, name.as_bytes())?;
            std::fs::rename(&latest_tmp, root.join(LATEST))?;
            Ok(())
        })();
        problem = finished.err();
    }
    if !all_ok(ctx, problem.is_none(), &format!("{at}, manifest"))? {
        return Err(problem.unwrap_or_else(|| {
            anyhow::anyhow!(
                "rank 0 could not finish checkpoint `{}`",
                final_dir.display()
            )
        }));
    }
    Ok(final_dir)
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
        let dir = resolve(path)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("cannot read `{}`", manifest_path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "`{}` is not a valid checkpoint manifest",
                manifest_path.display()
            )
        })?;
        let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
        let manifest = match format {
            FORMAT => {
                let v1: Manifest = serde_json::from_value(value).with_context(|| {
                    format!(
                        "`{}` is not a valid checkpoint manifest",
                        manifest_path.display()
                    )
                })?;
                single_as_sharded(v1, model)
            }
            FORMAT_SHARDED => serde_json::from_value(value).with_context(|| {
                format!(
                    "`{}` is not a valid checkpoint manifest",
                    manifest_path.display()
                )
            })?,
            other => bail!(
                "`{}` has format `{other}`; this fmoec reads `{FORMAT}` and `{FORMAT_SHARDED}`",
                dir.display()
            ),
        };
        manifest.run.check_model(&dir, model)?;
        if !manifest.shards.iter().any(|s| s.replicated) {
            bail!(
                "checkpoint `{}`: no shard holds the replicated parameters",
                dir.display()
            );
        }
        let mut rows = BTreeMap::new();
        for (layer, moe) in model.moe_layers() {
            let experts = moe.experts as usize;
            let mut of = vec![(usize::MAX, 0); experts];
            for (i, shard) in manifest.shards.iter().enumerate() {
                for held in shard.experts.iter().filter(|h| h.layer == layer) {
                    for (row, &e) in held.ids.iter().enumerate() {
                        match of.get_mut(e) {
                            Some(slot) => *slot = (i, row),
                            None => bail!(
                                "checkpoint `{}`: shard {} holds expert {e} of layer {layer}, which has {experts}",
                                dir.display(),
                                shard.dir
                            ),
                        }
                    }
                }
            }
            if let Some(missing) = of.iter().position(|s| s.0 == usize::MAX) {
                bail!(
                    "checkpoint `{}`: no shard holds expert {missing} of layer {layer}",
                    dir.display()
                );
            }
            rows.insert(layer, of);
        }
        Ok(Source {
            dir,
            manifest,
            cache: Default::default(),
            rows,
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
                self.dir.display(),
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
        let replicated = self
            .manifest
            .shards
            .iter()
            .position(|s| s.replicated)
            .unwrap_or_default();
        if param_kind(key) != crate::collective::ParamKind::Expert {
            return self.tensor(replicated, optim, name);
        }
        let layer =
            expert_layer(key).with_context(|| format!("internal error: `{key}` names no layer"))?;
        let rows = self.rows.get(&layer).with_context(|| {
            format!(
                "checkpoint `{}` has no placement for MoE layer {layer}",
                self.dir.display()
            )
        })?;
        let all: Vec<usize> = (0..rows.len()).collect();
        let wanted = experts.unwrap_or(&all);
        let mut parts = Vec::with_capacity(wanted.len());
        let mut shard_tensors: BTreeMap<usize, Tensor> = BTreeMap::new();
        for &e in wanted {
            let &(index, row) = rows.get(e).with_context(|| {
                format!(
                    "expert {e} of layer {layer} is not in checkpoint `{}`",
                    self.dir.display()
                )
            })?;
            if let std::collections::btree_map::Entry::Vacant(slot) = shard_tensors.entry(index) {
                slot.insert(self.tensor(index, optim, name)?);
            }
            let t = &shard_tensors[&index];
            if t.size().first().copied().unwrap_or(0) <= row as i64 {
                bail!(
                    "checkpoint `{}`: `{name}` of shard {} has {} rows, the manifest places expert {e} at row {row}",
                    self.dir.display(),
                    self.manifest.shards[index].dir,
                    t.size().first().copied().unwrap_or(0)
                );
            }
            parts.push(t.f_narrow(0, row as i64, 1)?);
        }
        if parts.is_empty() {
            let any = self.tensor(rows[0].0, optim, name)?;
            let mut shape = any.size();
            shape[0] = 0;
            return Ok(Tensor::f_zeros(shape, (any.kind(), Device::Cpu))?);
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
                    self.dir.display(),
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

/// `layers.3.ffn.experts.w1` -> 3.
fn expert_layer(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A v1 (single-rank) checkpoint seen as one shard holding everything.
fn single_as_sharded(v1: Manifest, model: &Model) -> ShardedManifest {
    let experts: Vec<HeldExperts> = model
        .moe_layers()
        .map(|(layer, m)| HeldExperts {
            layer,
            ids: (0..m.experts as usize).collect(),
        })
        .collect();
    ShardedManifest {
        run: v1.run,
        world: 1,
        expert_group: 1,
        layout: LayoutRecord {
            data: vec![vec![0]],
            expert: vec![vec![0]],
            expert_data: vec![vec![0]],
            gate: vec![vec![0]],
        },
        placements: experts
            .iter()
            .map(|h| LayerPlacement {
                layer: h.layer,
                experts: h.ids.len(),
                positions: vec![h.ids.clone()],
            })
            .collect(),
        shards: vec![Shard {
            rank: 0,
            dir: String::new(),
            expert_position: 0,
            replicated: true,
            experts,
            files: v1.files,
        }],
    }
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
