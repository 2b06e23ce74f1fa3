//! `init`: where a run's parameters start. [`resolve`] reads what an `init` source says about
//! itself (a Hugging Face `config.json`, an fmoec checkpoint's `manifest.json`, and the
//! safetensors headers: names, dtypes, shapes; never the tensors) and checks it against the
//! model file, with diagnostics at the model's text: `fmoec check` (and every command that
//! checks a file) knows before a run allocates anything whether the checkpoint fits.
//!
//! For `upcycle(...)` the source is read as the model file's *dense twin*: the same model with
//! every MoE layer a dense MLP of the source's hidden size. Upcycling then needs, per MoE
//! layer, the experts' hidden size to divide the dense one (`G` = dense / expert hidden; `G` >
//! 1 is fine-grained upcycling), the experts to be a multiple of `G`, and no shared experts.
//!
//! The runtime's import (`super::import`) reads the tensors of what this module resolved.
//! Knows nothing about libtorch or training.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::architecture::{architecture, compare_config, model_differs, Architecture};
use super::layout::{self, experts_param, mlp_param, param_shapes, split_layer};
use crate::check::{Activation, Ffn, GateKind, InitSource, InitSpec, Layer, Mlp, Model, Moe};
use crate::diag::{path_text, Diagnostic, Span};

/// One tensor as a safetensors header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    pub file: PathBuf,
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// How the source stores its tensors.
#[derive(Clone, Debug)]
pub enum Format {
    /// A Hugging Face folder: every tensor by its name, in the files the index names.
    Hf {
        arch: Architecture,
        tensors: BTreeMap<String, HeaderEntry>,
    },
    /// An fmoec checkpoint (`step-*` folder) of either format, read by the runtime's
    /// checkpoint reader.
    Fmoec { dir: PathBuf },
}

/// What [`resolve`] found: how to read the source, and what to make of it.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The model the source's tensors are read as: the model file's own, or for `upcycle`
    /// its dense twin.
    pub source_model: Model,
    pub format: Format,
    pub upcycle: Option<UpcyclePlan>,
    /// One line for the run's log.
    pub description: String,
}

/// How a dense model becomes the MoE model.
#[derive(Clone, Debug, PartialEq)]
pub struct UpcyclePlan {
    pub noise: f64,
    /// Per MoE layer, `G`: the dense hidden size over the experts' (1: every expert a copy of
    /// the dense MLP; `G` > 1: expert `e` is slice `e mod G` of it, its down projection times
    /// `G`, and experts `jG..jG+G` share gate column `j`).
    pub granularity: BTreeMap<usize, u64>,
}

/// The result of [`resolve`].
pub enum Resolution {
    /// The source is not on this machine (`fmoec check` warns; `fmoec run` fails).
    NotHere,
    /// Errors (and maybe warnings); nothing to read.
    Failed(Vec<Diagnostic>),
    /// Readable and fitting the model; warnings, if any.
    Ready(Box<Resolved>, Vec<Diagnostic>),
}

/// Diagnostics of this module.
mod says {
    use super::*;

    pub fn unreadable(at: Span, what: &str, why: &str) -> Diagnostic {
        Diagnostic::error("E0611", at, format!("cannot read {what}"))
            .with_label("the checkpoint to start from")
            .with_note(why.to_string())
    }

    pub fn not_found(at: Span, path: &str) -> Diagnostic {
        Diagnostic::warning(
            "W0611",
            at,
            format!(
                "the checkpoint to start from, `{}`, is not here",
                crate::diag::path_text(path)
            ),
        )
        .with_label("not found, relative to the working directory")
        .with_note("`fmoec run` reads it relative to the directory it runs in")
    }

    pub fn cannot_upcycle(at: Span, message: String, init: Span) -> Diagnostic {
        Diagnostic::error("E0614", at, message).with_secondary(init, "upcycled from here")
    }
}

pub use says::not_found;

/// Where the parameter `name` comes from in the model's text.
fn span_of(model: &Model, name: &str) -> Span {
    match split_layer(name).and_then(|(i, _)| model.layers.get(i)) {
        Some(l) => l.span,
        None if name.starts_with("embed") || name.starts_with("head") => model.spans.vocab,
        None => model.spans.name,
    }
}

fn shape_text(s: &[u64]) -> String {
    let parts: Vec<String> = s.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// The safetensors dtypes an import converts to f32.
const DTYPES: &[&str] = &["F32", "F16", "BF16", "F64"];

fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

/// The tensors a safetensors file holds, from its header; the file must be long enough for
/// every tensor the header places in it.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, HeaderEntry>, String> {
    let (json, data, total) = header_json(path)?;
    let mut out = BTreeMap::new();
    for (name, entry) in json {
        if name == "__metadata__" {
            continue;
        }
        let entry = header_entry(path, &name, &entry, data, total)?;
        out.insert(name, entry);
    }
    Ok(out)
}

/// A safetensors file's header as JSON, with the bytes of data after it and the file's
/// length.
fn header_json(path: &Path) -> Result<(serde_json::Map<String, Value>, u64, u64), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("`{}`: {e}", path_text(path)))?;
    let total = file
        .metadata()
        .map_err(|e| format!("`{}`: {e}", path_text(path)))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| {
        format!(
            "`{}` is not a safetensors file (too short)",
            path_text(path)
        )
    })?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || 8 + n > total {
        return Err(format!(
            "`{}` is not a safetensors file (its header claims {n} bytes)",
            path_text(path)
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("`{}`: {e}", path_text(path)))?;
    let json = serde_json::from_slice(&header)
        .map_err(|e| format!("`{}` has a bad safetensors header: {e}", path_text(path)))?;
    Ok((json, total - 8 - n, total))
}

/// Tensor `name`'s header `entry`, whose offsets must fit its dtype and shape and the `data`
/// bytes of the file.
fn header_entry(
    path: &Path,
    name: &str,
    entry: &Value,
    data: u64,
    total: u64,
) -> Result<HeaderEntry, String> {
    let dtype = entry
        .get("dtype")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let numbers = |key: &str| -> Option<Vec<u64>> {
        entry
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
    };
    let (Some(shape), Some(offsets)) = (numbers("shape"), numbers("data_offsets")) else {
        return Err(format!(
            "`{}`: tensor `{name}` has no shape or offsets in the header",
            path_text(path)
        ));
    };
    let bytes = dtype_bytes(&dtype).map(|b| b * shape.iter().product::<u64>());
    match offsets.as_slice() {
        [begin, end] if *end <= data && Some(end - begin) == bytes => {}
        [_, end] if *end > data => {
            return Err(format!(
                "`{}` is truncated: tensor `{name}` ends at byte {end} of the data, which \
                 holds only {data} bytes ({total} bytes in the file)",
                path_text(path)
            ))
        }
        _ => {
            return Err(format!(
                "`{}`: tensor `{name}` ({dtype}, {}) has offsets {offsets:?} that do not fit it",
                path_text(path),
                shape_text(&shape)
            ))
        }
    }
    Ok(HeaderEntry {
        file: path.to_path_buf(),
        dtype,
        shape,
    })
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("`{}`: {e}", path_text(path)))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("`{}` is not JSON: {e}", path_text(path)))
}

/// The tensors of a Hugging Face folder: `model.safetensors.index.json` and its shards, or
/// one `model.safetensors`.
fn hf_tensors_in(dir: &Path) -> Result<BTreeMap<String, HeaderEntry>, String> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let index = read_json(&index)?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or("`model.safetensors.index.json` has no `weight_map`")?;
        let mut files: BTreeMap<String, BTreeMap<String, HeaderEntry>> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or("a `weight_map` entry is not a file name")?;
            if !files.contains_key(file) {
                files.insert(file.to_string(), read_header(&dir.join(file))?);
            }
            let entry = files[file].get(name).ok_or_else(|| {
                format!("the index places `{name}` in `{file}`, which does not hold it")
            })?;
            out.insert(name.clone(), entry.clone());
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return read_header(&single);
    }
    Err(format!(
        "`{}` has neither `model.safetensors.index.json` nor `model.safetensors` (a `pytorch_model.bin` is not read: save with `safe_serialization=True`)",
        path_text(dir)
    ))
}

/// The `step-*` folder a checkpoint path names (itself, or a root's `latest`).
fn checkpoint_dir(path: &Path) -> Result<PathBuf, String> {
    if path.join("manifest.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    if let Ok(name) = std::fs::read_to_string(&latest) {
        return Ok(path.join(name.trim()));
    }
    Err(format!(
        "`{}` is not an fmoec checkpoint: it has neither `manifest.json` nor `latest`",
        path_text(path)
    ))
}

/// The whole tensors of an fmoec checkpoint (all experts of each layer) from its manifest and
/// the header of the shard with the replicated parameters.
fn checkpoint_tensors(dir: &Path) -> Result<BTreeMap<String, HeaderEntry>, String> {
    let manifest = read_json(&dir.join("manifest.json"))?;
    let format = manifest.get("format").and_then(Value::as_str).unwrap_or("");
    match format {
        "fmoec-checkpoint-v1" => read_header(&dir.join("model.safetensors")),
        "fmoec-checkpoint-v2" => {
            let shard = manifest
                .get("shards")
                .and_then(Value::as_array)
                .and_then(|s| {
                    s.iter()
                        .find(|s| s.get("replicated").and_then(Value::as_bool) == Some(true))
                })
                .and_then(|s| s.get("dir").and_then(Value::as_str))
                .ok_or("its manifest has no shard with the replicated parameters")?;
            let mut tensors = read_header(&dir.join(shard).join("model.safetensors"))?;
            let experts: BTreeMap<u64, u64> = manifest
                .get("placements")
                .and_then(Value::as_array)
                .map(|p| {
                    p.iter()
                        .filter_map(|p| {
                            Some((p.get("layer")?.as_u64()?, p.get("experts")?.as_u64()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            for (name, entry) in tensors.iter_mut() {
                if let Some(layer) = expert_layer(name) {
                    if let (Some(&count), Some(first)) =
                        (experts.get(&layer), entry.shape.first_mut())
                    {
                        *first = count;
                    }
                }
            }
            Ok(tensors)
        }
        other => Err(format!(
            "its manifest has format `{other}`; this fmoec reads fmoec-checkpoint-v1 and -v2"
        )),
    }
}

/// `layers.3.ffn.experts.w1` -> 3.
fn expert_layer(name: &str) -> Option<u64> {
    let (layer, tail) = split_layer(name)?;
    tail.starts_with("ffn.experts.").then_some(layer as u64)
}

/// `model` with every MoE layer a dense MLP of `hidden(layer)` (the experts' activation).
fn dense_twin(model: &Model, hidden: impl Fn(usize) -> u64) -> Model {
    let mut twin = model.clone();
    for layer in &mut twin.layers {
        if let Ffn::Moe(m) = &layer.ffn {
            layer.ffn = Ffn::Dense(Mlp {
                hidden: hidden(layer.index),
                act: m.expert.act,
                span: m.expert.span,
            });
        }
    }
    twin
}

/// Names and shapes the model needs against those the source has: missing, misshapen and
/// unexpected tensors, at the model's text (E0613). `wanted`: (name, shape, where).
fn compare_tensors(
    wanted: &[(String, Vec<u64>, Span)],
    have: &BTreeMap<String, HeaderEntry>,
    ignored: impl Fn(&str) -> bool,
    init: Span,
    what: &str,
) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = wanted
        .iter()
        .filter_map(|(name, shape, at)| tensor_misfit(name, shape, *at, have.get(name), what))
        .map(|d| d.with_secondary(init, "the checkpoint to start from"))
        .collect();
    // a model of another shape mismatches everywhere: the first few say it
    if out.len() > 6 {
        let n = out.len() - 6;
        out.truncate(6);
        out.push(
            Diagnostic::error(
                "E0613",
                init,
                format!("{n} more tensors do not fit the model"),
            )
            .with_label("the checkpoint to start from"),
        );
    }
    out.extend(unexpected_tensors(wanted, have, ignored, init, what));
    out
}

/// Why the source's tensor `name` (`have`) does not give the model's (of `shape`, at `at`):
/// it is missing, of another shape, or of a dtype fmoec does not read.
fn tensor_misfit(
    name: &str,
    shape: &[u64],
    at: Span,
    have: Option<&HeaderEntry>,
    what: &str,
) -> Option<Diagnostic> {
    Some(match have {
        None => Diagnostic::error("E0613", at, format!("{what} has no tensor `{name}`"))
            .with_label(format!("needs `{name}` {}", shape_text(shape))),
        Some(h) if h.shape != shape => Diagnostic::error(
            "E0613",
            at,
            format!(
                "tensor `{name}` is {} in {what}, the model needs {}",
                shape_text(&h.shape),
                shape_text(shape)
            ),
        )
        .with_label(format!("makes `{name}` {}", shape_text(shape))),
        Some(h) if !DTYPES.contains(&h.dtype.as_str()) => Diagnostic::error(
            "E0613",
            at,
            format!(
                "tensor `{name}` is {} in {what}; fmoec reads F32, F16, BF16 and F64",
                h.dtype
            ),
        ),
        Some(_) => return None,
    })
}

/// The source's tensors the model has no use for (but those `ignored`), the first six by
/// name: a different model.
fn unexpected_tensors(
    wanted: &[(String, Vec<u64>, Span)],
    have: &BTreeMap<String, HeaderEntry>,
    ignored: impl Fn(&str) -> bool,
    init: Span,
    what: &str,
) -> Option<Diagnostic> {
    let known: std::collections::BTreeSet<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    let extra: Vec<&String> = have
        .keys()
        .filter(|n| !known.contains(n.as_str()) && !ignored(n))
        .collect();
    if extra.is_empty() {
        return None;
    }
    let shown: Vec<String> = extra.iter().take(6).map(|n| format!("`{n}`")).collect();
    let more = if extra.len() > 6 {
        format!(" and {} more", extra.len() - 6)
    } else {
        String::new()
    };
    Some(
        Diagnostic::error(
            "E0613",
            init,
            format!(
                "{what} holds tensors this model does not have: {}{more}",
                shown.join(", ")
            ),
        )
        .with_label("the checkpoint to start from")
        .with_help("it is a different model: declare the model the checkpoint holds"),
    )
}

/// Reads `init`'s source (metadata only) and checks it against `model`.
pub fn resolve(model: &Model, init: &InitSpec) -> Resolution {
    let path = Path::new(init.source.path());
    if !path.exists() {
        return Resolution::NotHere;
    }
    let result = match &init.source {
        InitSource::Hf(_) => resolve_hf(model, init, path),
        InitSource::Checkpoint(_) => resolve_checkpoint(model, init, path),
    };
    let (source_model, format, mut warnings) = match result {
        Ok(r) => r,
        Err(d) => return Resolution::Failed(d),
    };
    let mut description = match &format {
        Format::Hf { arch, .. } => format!("{} `{}`", arch.class(), path_text(path)),
        Format::Fmoec { dir } => format!("fmoec checkpoint `{}`", path_text(dir)),
    };
    let upcycle = match &init.upcycle {
        None => None,
        Some(u) => match upcycle_plan(model, &source_model, init, u.noise) {
            Ok((plan, more)) => {
                warnings.extend(more);
                let gs: std::collections::BTreeSet<u64> =
                    plan.granularity.values().copied().collect();
                let gs: Vec<String> = gs.iter().map(u64::to_string).collect();
                description = format!(
                    "upcycled {} from {description} (G = {})",
                    crate::diag::count(plan.granularity.len() as u64, "MoE layer", "MoE layers"),
                    gs.join(", ")
                );
                Some(plan)
            }
            Err(d) => return Resolution::Failed(d),
        },
    };
    Resolution::Ready(
        Box::new(Resolved {
            source_model,
            format,
            upcycle,
            description,
        }),
        warnings,
    )
}

type Found = (Model, Format, Vec<Diagnostic>);

fn resolve_hf(model: &Model, init: &InitSpec, dir: &Path) -> Result<Found, Vec<Diagnostic>> {
    let at = init.source_span;
    let config = read_json(&dir.join("config.json"))
        .map_err(|e| vec![says::unreadable(at, "the Hugging Face checkpoint", &e)])?;
    let source_model = match &init.upcycle {
        Some(_) => hf_dense_twin(model, init, &config)?,
        None => model.clone(),
    };
    let arch = architecture(&source_model).map_err(|diags| {
        diags
            .into_iter()
            .map(|d| d.with_secondary(at, "starts from a Hugging Face checkpoint"))
            .collect::<Vec<_>>()
    })?;
    let mut found = compare_config(&source_model, arch, &config, at);
    if found.iter().any(Diagnostic::is_error) {
        return Err(found);
    }
    let tensors = hf_tensors_in(dir).map_err(|e| {
        vec![says::unreadable(
            at,
            "the Hugging Face checkpoint's weights",
            &e,
        )]
    })?;
    let errors = compare_hf_tensors(model, &source_model, arch, &tensors, at);
    if !errors.is_empty() {
        found.extend(errors);
        return Err(found);
    }
    Ok((source_model, Format::Hf { arch, tensors }, found))
}

/// The dense twin a Hugging Face checkpoint is read as for `upcycle`: its config must be a
/// dense model's, and say the MLPs' size.
fn hf_dense_twin(model: &Model, init: &InitSpec, config: &Value) -> Result<Model, Vec<Diagnostic>> {
    let at = init.source_span;
    match Architecture::of_config(config) {
        Ok(Architecture::Llama) => {}
        Ok(other) => {
            return Err(vec![says::cannot_upcycle(
                at,
                format!(
                    "upcycle starts from a dense model; this checkpoint is {} ({})",
                    other.describe(),
                    other.class()
                ),
                init.span,
            )
            .with_label("not a dense checkpoint")])
        }
        // compare_config says what it is
        Err(_) => {}
    }
    let hidden = config
        .get("intermediate_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            vec![says::unreadable(
                at,
                "the Hugging Face checkpoint",
                "its config.json has no `intermediate_size`",
            )]
        })?;
    Ok(dense_twin(model, |_| hidden))
}

/// The tensors of `source_model`'s counterpart in `arch` against those the folder holds,
/// located at `model`'s text.
fn compare_hf_tensors(
    model: &Model,
    source_model: &Model,
    arch: Architecture,
    tensors: &BTreeMap<String, HeaderEntry>,
    init: Span,
) -> Vec<Diagnostic> {
    let wanted: Vec<(String, Vec<u64>, Span)> = layout::hf_tensors(source_model, arch)
        .into_iter()
        .map(|t| {
            let at = match &t.source {
                layout::Source::Param(p) => span_of(model, &p.param),
                layout::Source::Zero { .. } => model.spans.name,
            };
            (t.name, t.shape, at)
        })
        .collect();
    let tied = source_model.tied_embeddings;
    compare_tensors(
        &wanted,
        tensors,
        |n| n.ends_with("rotary_emb.inv_freq") || (tied && n == "lm_head.weight"),
        init,
        "the Hugging Face checkpoint",
    )
}

fn resolve_checkpoint(
    model: &Model,
    init: &InitSpec,
    path: &Path,
) -> Result<Found, Vec<Diagnostic>> {
    let at = init.source_span;
    let unreadable = |e: String| vec![says::unreadable(at, "the fmoec checkpoint", &e)];
    let dir = checkpoint_dir(path).map_err(unreadable)?;
    let tensors = checkpoint_tensors(&dir).map_err(unreadable)?;
    let mut differs = headline_differences(model, &tensors, at);
    if init.upcycle.is_none() {
        differs.extend(layer_differences(model, &tensors, at));
    }
    if !differs.is_empty() {
        return Err(differs);
    }
    let source_model = match &init.upcycle {
        Some(_) => checkpoint_dense_twin(model, init, &tensors)?,
        None => model.clone(),
    };
    let wanted: Vec<(String, Vec<u64>, Span)> = param_shapes(&source_model)
        .into_iter()
        .map(|p| {
            let at = span_of(model, &p.name);
            (p.name, p.shape, at)
        })
        .collect();
    let errors = compare_tensors(&wanted, &tensors, |_| false, at, "the fmoec checkpoint");
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok((source_model, Format::Fmoec { dir }, Vec::new()))
}

/// The dense twin an fmoec checkpoint is read as for `upcycle`: each of the model's MoE
/// layers a dense MLP of the checkpoint's, which must have one of the experts' activation.
fn checkpoint_dense_twin(
    model: &Model,
    init: &InitSpec,
    tensors: &BTreeMap<String, HeaderEntry>,
) -> Result<Model, Vec<Diagnostic>> {
    let problems: Vec<Diagnostic> = model
        .moe_layers()
        .filter_map(|(i, m)| not_a_dense_source(model, init, tensors, i, m))
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(dense_twin(model, |i| {
        tensors
            .get(&mlp_param(i, "w1"))
            .and_then(|t| t.shape.get(1).copied())
            .unwrap_or(0)
    }))
}

/// Why the checkpoint's layer `i` cannot be upcycled into the MoE layer `m`: it has no dense
/// MLP, or one of another activation than the experts'.
fn not_a_dense_source(
    model: &Model,
    init: &InitSpec,
    tensors: &BTreeMap<String, HeaderEntry>,
    i: usize,
    m: &Moe,
) -> Option<Diagnostic> {
    if !tensors.contains_key(&mlp_param(i, "w1")) {
        let what = if tensors.contains_key(&experts_param(i, "w1")) {
            "is an MoE layer"
        } else {
            "has no MLP"
        };
        return Some(
            says::cannot_upcycle(
                model.layers[i].span,
                format!("upcycle starts from a dense model; layer {i} of the checkpoint {what}"),
                init.span,
            )
            .with_label(format!("layer {i} becomes an MoE layer")),
        );
    }
    let gated = tensors.contains_key(&mlp_param(i, "w3"));
    if gated == (m.expert.act == Activation::Swiglu) {
        return None;
    }
    let act = |g: bool| if g { "SwiGLU" } else { "GELU or ReLU" };
    Some(
        says::cannot_upcycle(
            m.expert.span,
            format!(
                "the experts are {}, the checkpoint's layer {i} MLP is {}",
                act(!gated),
                act(gated)
            ),
            init.span,
        )
        .with_label("the experts' activation")
        .with_help("the experts copy the dense MLP: declare them with its activation"),
    )
}

/// The vocabulary, width and depth an fmoec checkpoint's tensors imply, against the model's
/// (E0612 at the model's fields): a model of another size otherwise mismatches in every tensor.
fn headline_differences(
    model: &Model,
    tensors: &BTreeMap<String, HeaderEntry>,
    init: Span,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let Some([vocab, width]) = tensors.get("embed.tokens").map(|e| e.shape.as_slice()) {
        let evidence = format!("its `embed.tokens` is {}", shape_text(&[*vocab, *width]));
        out.extend(fields_differ(
            [
                ("vocab", model.spans.vocab, model.vocab, *vocab),
                ("width", model.spans.width, model.width, *width),
            ],
            &evidence,
            init,
        ));
    }
    let depth = tensors
        .keys()
        .filter_map(|n| split_layer(n).map(|(i, _)| i as u64))
        .max()
        .map_or(0, |i| i + 1);
    if depth != model.depth() {
        out.push(model_differs(
            model.spans.depth,
            "depth",
            &model.depth().to_string(),
            &depth.to_string(),
            &format!("its tensors: layers 0 to {}", depth.saturating_sub(1)),
            init,
        ));
    }
    out
}

/// E0612 for each model field (name, where, ours) that the checkpoint (theirs, shown by
/// `evidence`) has another value of.
fn fields_differ(
    fields: [(&str, Span, u64, u64); 2],
    evidence: &str,
    init: Span,
) -> Vec<Diagnostic> {
    fields
        .into_iter()
        .filter(|(_, _, ours, theirs)| ours != theirs)
        .map(|(field, at, ours, theirs)| {
            model_differs(
                at,
                field,
                &ours.to_string(),
                &theirs.to_string(),
                evidence,
                init,
            )
        })
        .collect()
}

/// Layers that are dense in one and MoE in the other, or MoE layers of other sizes (E0612),
/// for a checkpoint of the same model: a dense one is what `upcycle` starts from.
fn layer_differences(
    model: &Model,
    tensors: &BTreeMap<String, HeaderEntry>,
    init: Span,
) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = Vec::new();
    for layer in &model.layers {
        let i = layer.index;
        let theirs_moe = tensors.contains_key(&experts_param(i, "w1"));
        let theirs_dense = tensors.contains_key(&mlp_param(i, "w1"));
        if theirs_moe == theirs_dense {
            continue;
        }
        if let (Ffn::Moe(m), Some(w1)) = (&layer.ffn, tensors.get(&experts_param(i, "w1"))) {
            for d in expert_sizes_differ(i, m, &w1.shape, init) {
                // one `block = ...` line declares many layers: say it once
                if !out.iter().any(|o| o.primary == d.primary) {
                    out.push(d);
                }
            }
        }
        let ours_moe = matches!(layer.ffn, Ffn::Moe(_));
        if theirs_moe != ours_moe {
            out.push(layer_kind_differs(layer, ours_moe, theirs_moe, init));
        }
    }
    out
}

/// E0612 where the MoE layer `i` (`m`) has another expert count or hidden size than the
/// checkpoint's stacked experts (`w1` of shape `shape`).
fn expert_sizes_differ(i: usize, m: &Moe, shape: &[u64], init: Span) -> Vec<Diagnostic> {
    let evidence = format!("its `{}` is {}", experts_param(i, "w1"), shape_text(shape));
    let theirs = |dim: usize| shape.get(dim).copied().unwrap_or_default();
    fields_differ(
        [
            ("experts", m.spans.experts, m.experts, theirs(0)),
            (
                "the experts' hidden",
                m.expert.span,
                m.expert.hidden,
                theirs(2),
            ),
        ],
        &evidence,
        init,
    )
}

/// E0612: layer `layer` is dense here and MoE in the checkpoint, or the other way round.
fn layer_kind_differs(layer: &Layer, ours_moe: bool, theirs_moe: bool, init: Span) -> Diagnostic {
    let i = layer.index;
    let kind = |moe: bool| if moe { "an MoE layer" } else { "a dense MLP" };
    let d = Diagnostic::error(
        "E0612",
        layer.span,
        format!(
            "layer {i} is {} here, {} in the checkpoint to start from",
            kind(ours_moe),
            kind(theirs_moe)
        ),
    )
    .with_label(format!("layer {i}'s feed-forward"))
    .with_secondary(init, format!("its layer {i} is {}", kind(theirs_moe)));
    if ours_moe {
        d.with_help("to start MoE layers from a dense model's MLPs, write `init = upcycle(from_checkpoint(...))`")
    } else {
        d
    }
}

/// `G` per MoE layer, or why the layer cannot be upcycled; warnings where the upcycled
/// model's output at step 0 will not be the dense model's.
fn upcycle_plan(
    model: &Model,
    dense: &Model,
    init: &InitSpec,
    noise: f64,
) -> Result<(UpcyclePlan, Vec<Diagnostic>), Vec<Diagnostic>> {
    // (layer, diagnostic with LAYERS for the layers it concerns): merged below, since one
    // `block = ...` line usually declares every layer
    let mut errors: Vec<(usize, Diagnostic)> = Vec::new();
    let mut warnings: Vec<(usize, Diagnostic)> = Vec::new();
    let mut granularity = BTreeMap::new();
    for (i, m) in model.moe_layers() {
        let Ffn::Dense(d) = &dense.layers[i].ffn else {
            continue;
        };
        match granularity_of(m, d, init) {
            Err(e) => errors.push((i, *e)),
            Ok(g) => {
                granularity.insert(i, g);
                warnings.extend(not_dense_at_step_zero(m, g).map(|w| (i, w)));
            }
        }
    }
    if !errors.is_empty() {
        return Err(merge_layers(errors));
    }
    Ok((UpcyclePlan { noise, granularity }, merge_layers(warnings)))
}

/// `G` for the MoE layer `m` upcycled from the dense MLP `d`, or why it cannot be (E0614
/// with LAYERS).
fn granularity_of(m: &Moe, d: &Mlp, init: &InitSpec) -> Result<u64, Box<Diagnostic>> {
    if m.shared.is_some() {
        return Err(Box::new(
            says::cannot_upcycle(
                m.spans.call,
                "LAYERS: shared experts; upcycling makes routed experts only".to_string(),
                init.span,
            )
            .with_label("shared experts")
            .with_help("upcycle into a model without shared experts (`shared = none`)"),
        ));
    }
    let (hd, he) = (d.hidden, m.expert.hidden);
    if he == 0 || hd % he != 0 {
        return Err(Box::new(says::cannot_upcycle(
            m.expert.span,
            format!("the experts' hidden size {he} does not divide the dense MLP's {hd} (LAYERS)"),
            init.span,
        )
        .with_label(format!("hidden = {he}"))
        .with_help(format!(
            "use hidden = {hd} (every expert a copy of the dense MLP) or a divisor of it (fine-grained: each expert one slice)"
        ))));
    }
    let g = hd / he;
    if m.experts % g != 0 {
        return Err(Box::new(
            says::cannot_upcycle(
                m.spans.experts,
                format!(
                "{} experts cannot hold whole copies of the dense MLP cut into {g} slices (LAYERS)",
                m.experts
            ),
                init.span,
            )
            .with_label(format!("not a multiple of {g}"))
            .with_help(format!("use a multiple of {g} experts")),
        ));
    }
    Ok(g)
}

/// W0612 (with LAYERS) where the MoE layer `m` upcycled with `G` = `g` will not compute the
/// dense MLP at step 0: its gate's weights do not sum to 1, or a token does not see whole
/// groups of `g` slices.
fn not_dense_at_step_zero(m: &Moe, g: u64) -> Option<Diagnostic> {
    let equal_weights = matches!(
        m.gate.kind,
        GateKind::Naive | GateKind::Noisy | GateKind::Swipe
    );
    if !equal_weights {
        return Some(Diagnostic::warning(
            "W0612",
            m.gate.span,
            "the upcycled LAYERS will not compute the dense MLP at step 0".to_string(),
        )
        .with_label(match m.gate.kind {
            GateKind::Switch => "its top-1 weight is the expert's probability, below 1",
            _ => "its capacity drops tokens, and in training random routing drops second choices",
        })
        .with_note("the dense model's output is kept when the top-k weights sum to 1 and no token is dropped: `naive()`, `noisy()`, `swipe()`"));
    }
    if m.top_k % g == 0 {
        return None;
    }
    Some(Diagnostic::warning(
        "W0612",
        m.spans.top_k,
        "the upcycled LAYERS will not compute the dense MLP at step 0".to_string(),
    )
    .with_label(format!("top_k = {} is not a multiple of G = {g}", m.top_k))
    .with_note(format!(
        "with each expert one of {g} slices of the dense MLP, a token sees the whole MLP only when it is routed to whole groups of {g} experts (which share a gate column): top_k a multiple of {g}"
    )))
}

/// One diagnostic per place and problem, naming the layers it concerns where its message
/// says LAYERS.
fn merge_layers(found: Vec<(usize, Diagnostic)>) -> Vec<Diagnostic> {
    let mut merged: Vec<(Vec<usize>, Diagnostic)> = Vec::new();
    for (layer, d) in found {
        match merged.iter_mut().find(|(_, m)| *m == d) {
            Some((layers, _)) => layers.push(layer),
            None => merged.push((vec![layer], d)),
        }
    }
    merged
        .into_iter()
        .map(|(layers, mut d)| {
            let names: Vec<String> = layers.iter().map(usize::to_string).collect();
            let text = match names.as_slice() {
                [one] => format!("layer {one}"),
                [init @ .., last] => format!("layers {} and {last}", init.join(", ")),
                [] => String::new(),
            };
            d.message = d.message.replace("LAYERS", &text);
            d
        })
        .collect()
}
