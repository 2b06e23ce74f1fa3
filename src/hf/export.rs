//! The export itself: the tensors (by [`layout::hf_tensors`]), the shards, the config, the
//! tokenizer, atomic placement. See the module doc of [`crate::hf`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::architecture::{config, Architecture};
use super::layout;
use crate::check::{Checked, Model};
use crate::diag::path_text;

/// The exported tensors by Hugging Face name, in the order of [`layout::hf_tensors`].
pub fn tensors(
    model: &Model,
    arch: Architecture,
    params: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    layout::hf_tensors(model, arch)
        .into_iter()
        .map(|t| {
            let shape: Vec<i64> = t.shape.iter().map(|&n| n as i64).collect();
            let x = match &t.source {
                layout::Source::Zero { .. } => Tensor::f_zeros(&shape, (Kind::Float, Device::Cpu))?,
                layout::Source::Param(part) => {
                    let p = params
                        .get(&part.param)
                        .with_context(|| format!("the checkpoint has no `{}`", part.param))?;
                    hf_part(p, part)?
                }
            };
            if x.size() != shape {
                bail!(
                    "internal error: `{}` came out {:?}, transformers expects {shape:?}",
                    t.name,
                    x.size()
                );
            }
            Ok((t.name, x))
        })
        .collect()
}

/// `part` of the fmoec parameter `p` as the Hugging Face tensor holds it.
fn hf_part(p: &Tensor, part: &layout::Part) -> Result<Tensor> {
    let mut x = p.f_to_kind(Kind::Float)?;
    if let Some(e) = part.expert {
        x = x.f_select(0, e as i64)?;
    }
    if let Some((offset, len)) = part.columns {
        x = x.f_narrow(-1, offset as i64, len as i64)?;
    }
    if part.transposed {
        x = x.f_transpose(0, 1)?;
    }
    if part.scale != 1.0 {
        x = x.f_mul_scalar(part.scale)?;
    }
    Ok(x.f_contiguous()?)
}

fn tensor_bytes(x: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    let x = x.f_to_kind(Kind::Float)?.f_contiguous()?;
    let n = x.numel();
    let mut buf = vec![0u8; n * 4];
    x.f_copy_data_u8(&mut buf, n)?;
    Ok((x.size().iter().map(|&s| s as usize).collect(), buf))
}

/// The files of an export, by name, in memory (`eos_token_id`: the tokenizer's
/// end-of-document token, for `generate()`).
pub fn files(
    checked: &Checked,
    arch: Architecture,
    named: &[(String, Tensor)],
    shard_bytes: u64,
    tokenizer: Option<(&Path, Option<&Path>)>,
    eos_token_id: Option<u32>,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let (shards, total) = shard_plan(named, shard_bytes);
    let mut weight_map = serde_json::Map::new();
    for (s, members) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards.len());
        files.insert(name.clone(), shard_file(named, members)?);
        for &i in members {
            weight_map.insert(named[i].0.clone(), json!(name));
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    files.insert("model.safetensors.index.json".into(), pretty(&index)?);
    files.extend(config_files(&checked.model, arch, eos_token_id)?);
    if let Some((json_path, config_path)) = tokenizer {
        files.extend(tokenizer_files(json_path, config_path)?);
    }
    Ok(files)
}

/// The tensors (by index into `named`, in order) of each shard of at most `shard_bytes` (a
/// bigger tensor gets a shard of its own), and the bytes of them all.
fn shard_plan(named: &[(String, Tensor)], shard_bytes: u64) -> (Vec<Vec<usize>>, u64) {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for (i, (_, x)) in named.iter().enumerate() {
        let bytes = x.numel() as u64 * 4;
        total += bytes;
        if size + bytes > shard_bytes && !shards.last().expect("a shard").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("a shard").push(i);
        size += bytes;
    }
    (shards, total)
}

/// The safetensors file of the tensors `members` of `named` (f32).
fn shard_file(named: &[(String, Tensor)], members: &[usize]) -> Result<Vec<u8>> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = members
        .iter()
        .map(|&i| tensor_bytes(&named[i].1).map(|(shape, b)| (named[i].0.clone(), shape, b)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, shape, b)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<_>>()?;
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    Ok(safetensors::tensor::serialize(views, &Some(meta))?)
}

/// `config.json` and `generation_config.json` (with `eos_token_id` where the tokenizer has
/// one: transformers' `generate()` stops there).
fn config_files(
    model: &Model,
    arch: Architecture,
    eos_token_id: Option<u32>,
) -> Result<[(String, Vec<u8>); 2]> {
    let mut config = config(model, arch);
    let mut generation = json!({"do_sample": false});
    if let Some(eos) = eos_token_id {
        config["eos_token_id"] = json!(eos);
        generation["eos_token_id"] = json!(eos);
    }
    Ok([
        ("config.json".into(), pretty(&config)?),
        ("generation_config.json".into(), pretty(&generation)?),
    ])
}

/// `tokenizer.json` (a copy of `json_path`) and `tokenizer_config.json` (a copy of the one
/// beside it, or one naming the fast tokenizer class).
fn tokenizer_files(json_path: &Path, config_path: Option<&Path>) -> Result<[(String, Vec<u8>); 2]> {
    let json = std::fs::read(json_path)
        .with_context(|| format!("cannot read the tokenizer `{}`", path_text(json_path)))?;
    let config = match config_path.filter(|p| p.is_file()) {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read `{}`", path_text(p)))?,
        None => pretty(&json!({"tokenizer_class": "PreTrainedTokenizerFast"}))?,
    };
    Ok([
        ("tokenizer.json".into(), json),
        ("tokenizer_config.json".into(), config),
    ])
}

fn pretty(v: &Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s.into_bytes())
}

/// The record an export leaves in its folder.
pub const RECORD: &str = "fmoec-export.json";

/// Writes `files` into `out`: each file atomically; a folder holding files this tool did not
/// write (or that were edited since) is refused; stale files of an earlier export are removed.
pub fn place(
    out: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    record_extra: Value,
) -> Result<Vec<PathBuf>> {
    let mut previous: Vec<String> = Vec::new();
    if out.exists() {
        if !out.is_dir() {
            bail!("`{}` exists and is not a folder", path_text(out));
        }
        let record: Option<Value> = std::fs::read(out.join(RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let listed: BTreeMap<String, String> = record
            .as_ref()
            .and_then(|r| r.get("files"))
            .and_then(|f| serde_json::from_value(f.clone()).ok())
            .unwrap_or_default();
        for entry in std::fs::read_dir(out)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name == RECORD {
                continue;
            }
            match listed.get(&name) {
                Some(hash) if *hash == crate::driver::sha256_hex(&std::fs::read(out.join(&name))?) => {}
                Some(_) => bail!("`{}` was edited since fmoec exported it; refusing to replace it (move it away first)", path_text(out.join(&name))),
                None => bail!("`{}` holds `{name}`, which fmoec did not write; refusing to export into it (choose an empty or new folder)", path_text(out)),
            }
        }
        previous = listed.into_keys().collect();
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", path_text(out)))?;
    let mut hashes = serde_json::Map::new();
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = out.join(name);
        crate::driver::write_atomic(&path, bytes)
            .with_context(|| format!("cannot write `{}`", path_text(&path)))?;
        hashes.insert(name.clone(), json!(crate::driver::sha256_hex(bytes)));
        written.push(path);
    }
    for stale in previous.iter().filter(|n| !files.contains_key(*n)) {
        let _ = std::fs::remove_file(out.join(stale));
    }
    let mut record = record_extra;
    record["files"] = Value::Object(hashes);
    crate::driver::write_atomic(&out.join(RECORD), &pretty(&record)?)?;
    Ok(written)
}
