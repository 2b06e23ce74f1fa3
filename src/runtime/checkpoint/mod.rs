//! Checkpoints: a directory per step with `model.safetensors` (parameters by their dotted
//! names), `optimizer.safetensors` (AdamW `m.<name>`, `v.<name>`) and `manifest.json` (model
//! hash, step, schedule, optimizer step, seed and RNG scheme, data position, file sizes and
//! SHA-256).
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
//!
//! By concern: [`manifest`] (what a checkpoint records), [`formats`] (how tensors are stored
//! and verified), [`writer`] (saving and pruning), [`reader`] (finding, verifying, restoring).

mod formats;
pub mod manifest;
mod reader;
mod writer;

pub use manifest::{
    model_hash, DataPosition, FileEntry, HeldExperts, LayerPlacement, LayoutRecord, Manifest,
    RunRecord, SaveInfo, Shard, ShardPart, ShardedManifest,
};
pub use reader::{load, resolve, resume, run_record, Loaded, Resumed, Source};
pub use writer::{prune, save, save_sharded};

use std::path::Path;

use tch::Tensor;

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

/// The directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step a `step-XXXXXXXX` directory name stands for; `None` for any other name.
fn step_of_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse::<u64>().ok())
}

/// The newest complete checkpoint (a `step-*` folder with a manifest) under `root`, by step;
/// `None` when there is none or `root` cannot be listed.
pub fn newest_step(root: &Path) -> Option<u64> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let step = step_of_dir_name(&entry.file_name().to_string_lossy())?;
            entry.path().join(MANIFEST_FILE).is_file().then_some(step)
        })
        .max()
}

fn shard_dir_name(rank: usize) -> String {
    format!("rank-{rank:05}")
}

/// The parameters of `store` that `keep` accepts, in store order, under their names (the
/// tensors of `model.safetensors`): handles on the live tensors.
fn named_params(store: &ParamStore, keep: impl Fn(&str) -> bool) -> Vec<(String, Tensor)> {
    store
        .params
        .iter()
        .filter(|p| keep(&p.name))
        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
        .collect()
}

/// The AdamW moments of those parameters, `m.<name>` then `v.<name>` for each (the tensors
/// of `optimizer.safetensors`): handles on the live tensors.
fn named_moments(
    store: &ParamStore,
    optim: &AdamW,
    keep: impl Fn(&str) -> bool,
) -> Vec<(String, Tensor)> {
    let mut named = Vec::new();
    for (i, p) in store.params.iter().enumerate() {
        if keep(&p.name) {
            named.push((format!("m.{}", p.name), optim.m[i].shallow_clone()));
            named.push((format!("v.{}", p.name), optim.v[i].shallow_clone()));
        }
    }
    named
}
