//! Writing checkpoints: one rank's ([`save`], format v1) or every rank's part of a sharded
//! one ([`save_sharded`], format v2), each into a hidden temporary folder renamed into place
//! once complete, then `latest`; and deleting all but the newest `keep` ([`prune`]). An
//! existing checkpoint is never overwritten.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::formats::{serialize, write_synced};
use super::manifest::{
    FileEntry, HeldExperts, LayerPlacement, LayoutRecord, Manifest, RunRecord, SaveInfo, Shard,
    ShardPart, ShardedManifest,
};
use super::{
    named_moments, named_params, shard_dir_name, step_dir_name, FORMAT, FORMAT_SHARDED, LATEST,
    MANIFEST_FILE, MODEL_FILE, OPTIM_FILE,
};
use crate::diag::path_text;
use crate::runtime::distributed::{param_kind, RankContext};
use crate::runtime::optim::AdamW;
use crate::runtime::params::ParamStore;

/// Writes a checkpoint under `root` (`root/step-XXXXXXXX`), atomically; refuses to replace one.
pub fn save(
    root: &Path,
    info: &SaveInfo<'_>,
    store: &ParamStore,
    optim: &AdamW,
) -> Result<PathBuf> {
    let folders = StepFolders::of_this_process(root, info.step);
    folders.prepare()?;
    let all = |_: &str| true;
    let files = write_state(
        &folders.tmp,
        str::to_string,
        &named_params(store, all),
        &named_moments(store, optim, all),
    )?;
    let manifest = Manifest {
        run: RunRecord::new(FORMAT, info, optim.step),
        files,
    };
    folders.publish(&manifest)?;
    Ok(folders.done)
}

/// Writes the parameters (`model.safetensors`) and their AdamW moments
/// (`optimizer.safetensors`) into `dir`, synced; returns their manifest entries, each
/// named `listed_as(file)`.
fn write_state(
    dir: &Path,
    listed_as: impl Fn(&str) -> String,
    model_named: &[(String, Tensor)],
    optim_named: &[(String, Tensor)],
) -> Result<Vec<FileEntry>> {
    let mut files = Vec::new();
    for (file, named) in [(MODEL_FILE, model_named), (OPTIM_FILE, optim_named)] {
        let bytes = serialize(named)?;
        write_synced(&dir.join(file), &bytes)?;
        files.push(FileEntry {
            name: listed_as(file),
            bytes: bytes.len() as u64,
            sha256: crate::digest::sha256_hex(&bytes),
        });
    }
    Ok(files)
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
        std::fs::read_dir(root).with_context(|| format!("cannot list `{}`", path_text(root)))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let path = root.join(&name);
        if name.starts_with(".step-") && name.ends_with(".deleting") {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot delete `{}`", path_text(&path)))?;
            continue;
        }
        let Some(step) = super::step_of_dir_name(&name) else {
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
            .with_context(|| format!("cannot delete `{}`", path_text(&path)))?;
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("cannot delete `{}`", path_text(&doomed)))?;
        deleted.push(path);
    }
    Ok(deleted)
}

/// Whether every rank of the world reports `ok` (a sum over
/// [`RankContext::all_reduce_world`]).
fn all_ok(ctx: &RankContext, ok: bool, at: &str) -> Result<bool> {
    let mut t = Tensor::f_from_slice(&[f64::from(u8::from(!ok))])?.f_to_device(ctx.device)?;
    ctx.all_reduce_world(&mut t, at)?;
    Ok(t.f_double_value(&[0])? == 0.0)
}

/// This rank's shard entry (without files).
fn shard_of(ctx: &RankContext, rank: usize, layout: &crate::collective::GroupLayout) -> Shard {
    use crate::collective::GroupKind;
    let position = layout
        .members(GroupKind::Expert, rank)
        .and_then(|m| m.iter().position(|&r| r == rank))
        .unwrap_or_default();
    let part = ctx.part();
    Shard {
        rank,
        dir: shard_dir_name(rank),
        expert_position: position,
        replicated: replicated_writer(layout, rank),
        part: (ctx.stages() > 1).then(|| ShardPart {
            stage: ctx.stage(),
            layers: part.chunks.iter().map(|c| [c.start, c.end]).collect(),
            embedding: part.embedding,
            head: part.head,
        }),
        experts: ctx
            .plan
            .placements
            .iter()
            .filter(|(&layer, _)| part.holds_layer(layer))
            .map(|(&layer, p)| HeldExperts {
                layer,
                ids: p.local_experts(position).to_vec(),
            })
            .collect(),
        files: Vec::new(),
    }
}

/// Whether `rank` writes its stage's replicated and gate parameters: the first rank of its
/// stage (rank 0 without a pipeline).
fn replicated_writer(layout: &crate::collective::GroupLayout, rank: usize) -> bool {
    layout
        .members(crate::collective::GroupKind::Gate, rank)
        .is_some_and(|m| m.first() == Some(&rank))
}

/// The ranks that write a shard: the first rank of each pipeline stage (rank 0 without a
/// pipeline) and every rank at expert-data position 0, of those only tensor rank 0 (with
/// tensor parallelism the trainer hands every rank whole tensors, so tensor rank 0 of a data
/// rank holds what the whole tensor group holds).
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
            replicated_writer(layout, r)
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
    let folders = StepFolders::new(root, info.step);
    let at = format!("checkpoint {}", folders.name);
    let rank_zero = ctx.rank() == 0;

    // 1. rank 0 prepares the temporary folder.
    let prepared = if rank_zero { folders.prepare() } else { Ok(()) };
    agree_with_rank_zero(ctx, prepared, &format!("{at}, prepare"), || {
        format!(
            "rank 0 could not prepare checkpoint `{}`",
            path_text(&folders.done)
        )
    })?;

    // 2. the writers write their shard and a small list of its files.
    let written = if writers(&ctx.plan).contains(&ctx.rank()) {
        write_shard(&folders.tmp, info, store, optim, ctx)
    } else {
        Ok(())
    };
    let failed = written.as_ref().err().map(|e| format!("{e:#}"));
    if !all_ok(ctx, written.is_ok(), &format!("{at}, shards"))? {
        bail!(
            "checkpoint `{}` was not written: {}",
            path_text(&folders.done),
            failed.unwrap_or_else(|| "another rank could not write its shard".into())
        );
    }

    // 3. rank 0 writes the manifest and moves the folder into place.
    let finished = if rank_zero {
        folders.finish(info, optim, ctx)
    } else {
        Ok(())
    };
    agree_with_rank_zero(ctx, finished, &format!("{at}, manifest"), || {
        format!(
            "rank 0 could not finish checkpoint `{}`",
            path_text(&folders.done)
        )
    })?;
    Ok(folders.done)
}

/// The folders of a sharded checkpoint's step: written under `tmp`, renamed to `done`.
struct StepFolders<'r> {
    root: &'r Path,
    /// `step-XXXXXXXX`.
    name: String,
    done: PathBuf,
    tmp: PathBuf,
}

impl<'r> StepFolders<'r> {
    /// The folders of a sharded checkpoint, whose ranks find the temporary folder by name.
    fn new(root: &'r Path, step: u64) -> StepFolders<'r> {
        let name = step_dir_name(step);
        StepFolders {
            root,
            done: root.join(&name),
            tmp: root.join(format!(".{name}.tmp")),
            name,
        }
    }

    /// The folders of a checkpoint this process writes alone (its temporary folder named
    /// after the process).
    fn of_this_process(root: &'r Path, step: u64) -> StepFolders<'r> {
        let name = step_dir_name(step);
        StepFolders {
            root,
            done: root.join(&name),
            tmp: root.join(format!(".{name}.tmp-{}", std::process::id())),
            name,
        }
    }

    /// Rank 0: refuses to overwrite the step's checkpoint and makes an empty temporary
    /// folder (removing one an interrupted save left).
    fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(self.root)
            .with_context(|| format!("cannot create `{}`", path_text(self.root)))?;
        if self.done.exists() {
            bail!(
                "refusing to overwrite the existing checkpoint `{}` (resume from it with --resume, or choose another --out)",
                path_text(&self.done)
            );
        }
        if self.tmp.exists() {
            std::fs::remove_dir_all(&self.tmp)?;
        }
        std::fs::create_dir(&self.tmp)?;
        Ok(())
    }

    /// Rank 0, once every shard is written: the manifest (over the shards' lists of files,
    /// which it removes), the folder moved into place, then `latest` naming it.
    fn finish(&self, info: &SaveInfo<'_>, optim: &AdamW, ctx: &RankContext) -> Result<()> {
        let shards = self.take_shard_lists(ctx)?;
        self.publish(&sharded_manifest(info, optim, ctx, shards))
    }

    /// Writes `manifest` into the temporary folder, moves the folder into place, then
    /// replaces `latest` to name it.
    fn publish(&self, manifest: &impl serde::Serialize) -> Result<()> {
        write_synced(
            &self.tmp.join(MANIFEST_FILE),
            serde_json::to_string_pretty(manifest)?.as_bytes(),
        )?;
        std::fs::rename(&self.tmp, &self.done).with_context(|| {
            format!(
                "cannot move the checkpoint into `{}`",
                path_text(&self.done)
            )
        })?;
        let latest_tmp = self
            .root
            .join(format!(".{LATEST}.tmp-{}", std::process::id()));
        write_synced(&latest_tmp, self.name.as_bytes())?;
        std::fs::rename(&latest_tmp, self.root.join(LATEST))?;
        Ok(())
    }

    /// Every writer's `shard.json`, read and removed, in the writers' order.
    fn take_shard_lists(&self, ctx: &RankContext) -> Result<Vec<Shard>> {
        let mut shards = Vec::new();
        for r in writers(&ctx.plan) {
            let p = self.tmp.join(shard_dir_name(r)).join("shard.json");
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read `{}`", path_text(&p)))?;
            let shard: Shard = serde_json::from_str(&text)?;
            std::fs::remove_file(&p)?;
            shards.push(shard);
        }
        Ok(shards)
    }
}

/// Passes on what rank 0 did alone once every rank knows whether it worked: rank 0 returns
/// its own error, the others `elsewhere`'s message.
fn agree_with_rank_zero(
    ctx: &RankContext,
    outcome: Result<()>,
    at: &str,
    elsewhere: impl FnOnce() -> String,
) -> Result<()> {
    let problem = outcome.err();
    if !all_ok(ctx, problem.is_none(), at)? {
        return Err(problem.unwrap_or_else(|| anyhow::anyhow!(elsewhere())));
    }
    Ok(())
}

/// A writer's shard under `tmp`: the parameters it saves (its experts; with the replicated
/// ones on its stage's first rank) and their optimizer state, then `shard.json`, the list of
/// its files that rank 0 gathers into the manifest.
fn write_shard(
    tmp: &Path,
    info: &SaveInfo<'_>,
    store: &ParamStore,
    optim: &AdamW,
    ctx: &RankContext,
) -> Result<()> {
    let rank = ctx.rank();
    let layout = &ctx.plan.layout;
    let dir = tmp.join(shard_dir_name(rank));
    std::fs::create_dir(&dir)?;
    // The last stage's copy of a tied embedding is the first stage's: saved once.
    let copy = ctx.part().holds_tied_copy(info.model);
    let replicated = replicated_writer(layout, rank);
    let keep = |n: &str| {
        let expert = param_kind(n) == crate::collective::ParamKind::Expert;
        (replicated || expert) && !(copy && n == "embed.tokens")
    };
    let mut shard = shard_of(ctx, rank, layout);
    shard.files = write_state(
        &dir,
        |file| format!("{}/{file}", shard.dir),
        &named_params(store, keep),
        &named_moments(store, optim, keep),
    )?;
    write_synced(
        &dir.join("shard.json"),
        serde_json::to_string_pretty(&shard)?.as_bytes(),
    )?;
    Ok(())
}

/// The manifest of a sharded checkpoint: the run, the world's layout, the experts' placement
/// and the `shards`.
fn sharded_manifest(
    info: &SaveInfo<'_>,
    optim: &AdamW,
    ctx: &RankContext,
    shards: Vec<Shard>,
) -> ShardedManifest {
    let layout = &ctx.plan.layout;
    ShardedManifest {
        run: RunRecord::new(FORMAT_SHARDED, info, optim.step),
        world: layout.world,
        expert_group: ctx.expert_group_size(),
        layout: LayoutRecord {
            data: layout.data.clone(),
            expert: layout.expert.clone(),
            expert_data: layout.expert_data.clone(),
            gate: layout.gate.clone(),
            pipeline: if layout.stages() > 1 {
                layout.pipeline.clone()
            } else {
                Vec::new()
            },
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
    }
}
