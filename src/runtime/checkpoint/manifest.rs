//! What a checkpoint's `manifest.json` records, in both formats: the run (model hash, step,
//! schedule, seed and RNG scheme, data position, optimizer step, precision), every file's size
//! and SHA-256, and for the sharded format the world, the group layout, every MoE layer's
//! placement and which shard holds which experts. Serde types and the model hash only: no
//! file is read or written here.

use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::check::Model;
use crate::diag::path_text;

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
    /// That JSON itself, so that a refusal can say what differs (the hash stays the
    /// authority); absent in checkpoints of older fmoec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_definition: Option<serde_json::Value>,
    /// The model file the run was started from, absolute, so that `fmoec export` finds it
    /// without `--model`; absent in checkpoints of older fmoec, of runs not started from a
    /// file, and where the path is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_file: Option<String>,
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
    pub(super) fn new(format: &str, info: &SaveInfo, optimizer_step: u64) -> RunRecord {
        RunRecord {
            format: format.to_string(),
            model: info.model.name.clone(),
            model_hash: model_hash(info.model),
            model_definition: Some(model_definition(info.model)),
            model_file: info.model_file.and_then(|p| p.to_str()).map(str::to_string),
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
    /// The hash decides; the recorded definition, where there is one, only names what
    /// differs.
    pub(super) fn check_model(&self, dir: &Path, model: &Model) -> Result<()> {
        let want = model_hash(model);
        if self.model_hash != want {
            let differences = self
                .model_definition
                .as_ref()
                .map(|saved| describe_model_differences(saved, &model_definition(model)))
                .unwrap_or_default();
            let what_differs = if differences.is_empty() {
                String::new()
            } else {
                format!(": {}", differences.join("; "))
            };
            bail!(
                "checkpoint `{}` was written for a different model (`{}`, hash {}…) than `{}` (hash {}…){what_differs}",
                path_text(dir),
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

/// What [`super::save`] and [`super::save_sharded`] record besides tensors.
pub struct SaveInfo<'a> {
    pub model: &'a Model,
    pub step: u64,
    /// The schedule's length.
    pub total_steps: u64,
    pub tokens_seen: u64,
    pub seed: u64,
    pub data_source: String,
    pub precision: String,
    /// The model file the run was started from (absolute), if any.
    pub model_file: Option<&'a Path>,
}

/// SHA-256 (hex) of the model's architecture.
pub fn model_hash(model: &Model) -> String {
    let json = serde_json::to_vec(model).expect("the model serializes");
    crate::digest::sha256_hex(&json)
}

/// The model's architecture as JSON: what [`model_hash`] hashes.
fn model_definition(model: &Model) -> serde_json::Value {
    serde_json::to_value(model).expect("the model serializes")
}

/// How many differences a refusal names before it says how many more there are.
const DIFFERENCES_NAMED: usize = 4;

/// What differs between the model a checkpoint recorded and the model given, in the
/// model's field order, each as `field (A in the checkpoint, B here)`. A field that
/// differs alike in several layers is named once with those layers.
fn describe_model_differences(saved: &serde_json::Value, given: &serde_json::Value) -> Vec<String> {
    let mut found = Vec::new();
    collect_differences("", saved, given, &mut found);
    // Group `layers[i].path` by (path, values), keeping the first occurrence's place.
    let mut grouped: Vec<(String, Vec<usize>, String)> = Vec::new();
    for (path, values) in found {
        let per_layer = path.strip_prefix("layers[").and_then(|rest| {
            let (index, field) = rest.split_once("].")?;
            Some((index.parse::<usize>().ok()?, field.to_string()))
        });
        match per_layer {
            Some((layer, field)) => {
                match grouped
                    .iter_mut()
                    .find(|(f, layers, v)| !layers.is_empty() && *f == field && *v == values)
                {
                    Some((_, layers, _)) => layers.push(layer),
                    None => grouped.push((field, vec![layer], values)),
                }
            }
            None => grouped.push((path, Vec::new(), values)),
        }
    }
    let mut lines: Vec<String> = grouped
        .iter()
        .take(DIFFERENCES_NAMED)
        .map(|(field, layers, values)| match layers.as_slice() {
            [] => format!("{field} ({values})"),
            [one] => format!("{field} of layer {one} ({values})"),
            many => {
                let list: Vec<String> = many.iter().map(usize::to_string).collect();
                format!("{field} of layers {} ({values})", list.join(", "))
            }
        })
        .collect();
    if grouped.len() > DIFFERENCES_NAMED {
        lines.push(format!("and {} more", grouped.len() - DIFFERENCES_NAMED));
    }
    lines
}

/// Appends `(path, "A in the checkpoint, B here")` for every differing leaf. An object
/// whose `kind` differs (a dense layer against an MoE layer) is one difference, not one
/// per field of each kind; so is a list of another length (the layers: `depth`).
fn collect_differences(
    path: &str,
    saved: &serde_json::Value,
    given: &serde_json::Value,
    found: &mut Vec<(String, String)>,
) {
    use serde_json::Value;
    match (saved, given) {
        (Value::Object(a), Value::Object(b)) => collect_field_differences(path, a, b, found),
        (Value::Array(a), Value::Array(b)) if a.len() != b.len() => {
            let name = if path == "layers" {
                "depth".to_string()
            } else {
                format!("length of {path}")
            };
            found.push((
                name,
                format!("{} in the checkpoint, {} here", a.len(), b.len()),
            ));
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                collect_differences(&format!("{path}[{i}]"), va, vb, found);
            }
        }
        (a, b) if a != b => found.push((path.to_string(), both_values(a, b))),
        _ => {}
    }
}

/// [`collect_differences`] of two objects at `path`: their `kind` alone where it differs,
/// else each field, those only one side has included.
fn collect_field_differences(
    path: &str,
    saved: &serde_json::Map<String, serde_json::Value>,
    given: &serde_json::Map<String, serde_json::Value>,
    found: &mut Vec<(String, String)>,
) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    if let (Some(ka), Some(kb)) = (saved.get("kind"), given.get("kind")) {
        if ka != kb {
            found.push((join("kind"), both_values(ka, kb)));
            return;
        }
    }
    for (key, va) in saved {
        match given.get(key) {
            Some(vb) => collect_differences(&join(key), va, vb, found),
            None => found.push((
                join(key),
                format!("{} in the checkpoint, none here", brief(va)),
            )),
        }
    }
    for (key, vb) in given {
        if !saved.contains_key(key) {
            found.push((
                join(key),
                format!("none in the checkpoint, {} here", brief(vb)),
            ));
        }
    }
}

/// `A in the checkpoint, B here`.
fn both_values(saved: &serde_json::Value, given: &serde_json::Value) -> String {
    format!("{} in the checkpoint, {} here", brief(saved), brief(given))
}

/// A JSON value as a user reads it: strings without quotes, `none` for null.
fn brief(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "none".to_string(),
        other => other.to_string(),
    }
}

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
    /// Whether it holds the replicated and gate parameters (rank 0 only; with pipeline
    /// parallelism the first rank of each stage, those of its stage's part).
    pub replicated: bool,
    /// With pipeline parallelism, the part of the model the shard's replicated parameters
    /// belong to; absent: the whole model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<ShardPart>,
    pub experts: Vec<HeldExperts>,
    pub files: Vec<FileEntry>,
}

/// The part of the model a pipeline stage's shard holds (its replicated parameters'
/// names): blocks `[first, end)` per model chunk, the token embedding (first stage), the
/// final norm and an untied head (last stage). The last stage's copy of a tied embedding is
/// not saved: it is the first stage's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardPart {
    pub stage: usize,
    pub layers: Vec<[usize; 2]>,
    pub embedding: bool,
    pub head: bool,
}

impl ShardPart {
    /// Whether the replicated parameter `name` is this part's.
    pub fn holds(&self, name: &str) -> bool {
        if let Some(rest) = name.strip_prefix("layers.") {
            let layer = rest.split('.').next().and_then(|n| n.parse::<usize>().ok());
            return layer.is_some_and(|l| self.layers.iter().any(|r| (r[0]..r[1]).contains(&l)));
        }
        if name.starts_with("embed.") {
            return self.embedding;
        }
        self.head && (name.starts_with("norm.") || name.starts_with("head."))
    }
}

/// The group layout a sharded checkpoint was written with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayoutRecord {
    pub data: Vec<Vec<usize>>,
    pub expert: Vec<Vec<usize>>,
    pub expert_data: Vec<Vec<usize>>,
    pub gate: Vec<Vec<usize>>,
    /// The pipeline groups (one rank per stage), with pipeline parallelism.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipeline: Vec<Vec<usize>>,
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

/// A v1 (single-rank) checkpoint seen as one shard holding everything.
pub(super) fn single_as_sharded(v1: Manifest, model: &Model) -> ShardedManifest {
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
            pipeline: Vec::new(),
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
            part: None,
            experts,
            files: v1.files,
        }],
    }
}
