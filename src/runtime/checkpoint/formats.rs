//! How tensors are stored in a checkpoint: safetensors files of named tensors (f32, f64,
//! bf16, f16, i64), written and synced, and read back only after the manifest's size and
//! SHA-256 of the file matched. Knows nothing about which tensors a checkpoint holds.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

use super::manifest::FileEntry;
use crate::diag::path_text;

/// Reads `name` (a path relative to the checkpoint `dir`) after checking that the manifest
/// lists it, and that its size and SHA-256 are the listed ones.
pub(super) fn read_listed(dir: &Path, files: &[FileEntry], name: &str) -> Result<Vec<u8>> {
    let entry = files.iter().find(|f| f.name == name).with_context(|| {
        format!(
            "checkpoint `{}`'s manifest does not list `{name}`",
            path_text(dir)
        )
    })?;
    let p = dir.join(name);
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read `{}`", path_text(&p)))?;
    if bytes.len() as u64 != entry.bytes {
        bail!(
            "checkpoint file `{}` is truncated or damaged: {} bytes, the manifest says {}",
            path_text(&p),
            bytes.len(),
            entry.bytes
        );
    }
    if crate::digest::sha256_hex(&bytes) != entry.sha256 {
        bail!(
            "checkpoint file `{}` is corrupt: its SHA-256 does not match the manifest",
            path_text(&p)
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

pub(super) fn kind_of(dtype: Dtype) -> Result<Kind> {
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

pub(super) fn serialize(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
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

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("cannot create `{}`", path_text(path)))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
