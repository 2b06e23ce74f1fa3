//! `fmoec export --hf OUT CHECKPOINT`: the command line of the Hugging Face export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Device, Kind};

use super::architecture::{architecture, Architecture};
use super::export;
use crate::check::{Checked, GateKind, Model, TokenizerSpec};
use crate::data::tokenizer::{Flavour, TextTokenizer};
use crate::diag::path_text;
use crate::driver::{self, DiagFormat};
use crate::runtime::checkpoint::Source;

/// Export a checkpoint for Hugging Face `transformers` (config.json, sharded safetensors
/// with their index, the tokenizer).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  fmoec export --hf hf/ runs/mixtral/checkpoints --model mixtral.fmoe"
)]
pub struct ExportArgs {
    /// Output folder (new, empty, or an earlier export of fmoec's).
    #[arg(long = "hf", value_name = "OUT")]
    pub out: PathBuf,
    /// A checkpoint (`step-*` folder) or a checkpoint root with `latest`.
    pub checkpoint: PathBuf,
    /// The model file [default: the one the run recorded in the checkpoint, else the one
    /// `.fmoe` file in the checkpoint's folder or the two above it].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Largest safetensors shard, in bytes (a bigger tensor gets a shard of its own).
    #[arg(long, default_value_t = 5_000_000_000)]
    pub max_shard_size: u64,
}

/// The model file of the checkpoint: the one its run recorded, where that file is still
/// there, else the one model file beside the checkpoint.
fn find_model(checkpoint: &Path) -> Result<PathBuf> {
    let recorded = crate::runtime::checkpoint::run_record(checkpoint)
        .ok()
        .and_then(|r| r.model_file)
        .map(PathBuf::from);
    match recorded {
        Some(file) if file.is_file() => Ok(file),
        recorded => model_beside(checkpoint).map_err(|e| match recorded {
            Some(gone) => anyhow::anyhow!(
                "the run's model file `{}` is not there any more, and {e:#}",
                path_text(&gone)
            ),
            None => e,
        }),
    }
}

/// The one model file in the checkpoint's folder or the two above it.
fn model_beside(checkpoint: &Path) -> Result<PathBuf> {
    let full = checkpoint
        .canonicalize()
        .with_context(|| format!("cannot read the checkpoint `{}`", path_text(checkpoint)))?;
    let mut dir = Some(full.as_path());
    for _ in 0..3 {
        let Some(d) = dir else { break };
        let found: Vec<PathBuf> = std::fs::read_dir(d)
            .map(|it| {
                it.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "fmoe"))
                    .collect()
            })
            .unwrap_or_default();
        match found.len() {
            0 => dir = d.parent(),
            1 => return Ok(found[0].clone()),
            _ => bail!(
                "`{}` holds several model files; name one with --model",
                path_text(d)
            ),
        }
    }
    bail!(
        "no model file beside `{}`; name it with --model FILE",
        path_text(checkpoint)
    )
}

pub fn run(args: &ExportArgs) -> Result<ExitCode> {
    let model_file = match &args.model {
        Some(m) => m.clone(),
        None => find_model(&args.checkpoint)?,
    };
    let loaded = match driver::load(&model_file, DiagFormat::Human) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let checked = &loaded.checked;
    let model = &checked.model;
    let Some(arch) = exportable(&loaded) else {
        return Ok(ExitCode::from(1));
    };
    let _guard = tch::no_grad_guard();
    let (source, named) = read_tensors(model, arch, &args.checkpoint)?;
    let tokenizer = ExportTokenizer::of(checked)?;
    let files = export::files(
        checked,
        arch,
        &named,
        args.max_shard_size,
        tokenizer.files(),
        tokenizer.eos_token_id,
    )
    .context("cannot build the export")?;
    let record = json!({
        "format": "fmoec-hf-export-v1",
        "architecture": arch.class(),
        "model": model.name,
        "model_hash": crate::runtime::checkpoint::model_hash(model),
        "checkpoint": source.dir.display().to_string(),
        "step": source.manifest.run.step,
    });
    let written = export::place(&args.out, &files, record)?;
    if model
        .moe_layers()
        .any(|(_, m)| m.gate.kind == GateKind::Noisy)
    {
        crate::errln!("note: the noisy gates' noise projections are used in training only; they are not exported");
    }
    crate::outln!(
        "{} ({} tensors, step {}) -> {} ({} files)",
        arch.class(),
        named.len(),
        source.manifest.run.step,
        path_text(&args.out),
        written.len() + 1
    );
    Ok(ExitCode::SUCCESS)
}

/// The architecture the loaded model exports as, or `None` after reporting every feature
/// that has no counterpart.
fn exportable(loaded: &driver::Loaded) -> Option<Architecture> {
    let model = &loaded.checked.model;
    match architecture(model) {
        Ok(a) => Some(a),
        Err(diags) => {
            driver::report(&loaded.sources, &diags, DiagFormat::Human);
            crate::errln!(
                "error: `{}` cannot be exported for transformers ({} feature{} without a counterpart)",
                model.name,
                diags.len(),
                if diags.len() == 1 { "" } else { "s" }
            );
            None
        }
    }
}

/// The checkpoint's parameters as the Hugging Face tensors of `arch`, by name, with the
/// checkpoint they came from.
fn read_tensors(
    model: &Model,
    arch: Architecture,
    checkpoint: &Path,
) -> Result<(Source, Vec<(String, tch::Tensor)>)> {
    let shapes =
        crate::runtime::model::Transformer::new(model, Device::Cpu, Kind::Float, Kind::Float)?;
    let source = Source::open(checkpoint, model)?;
    let params: BTreeMap<String, tch::Tensor> =
        source.parameters(&shapes.store)?.into_iter().collect();
    let named = export::tensors(model, arch, &params)?;
    Ok((source, named))
}

/// The tokenizer an export writes beside the model: its `tokenizer.json` (a GPT-2
/// tokenizer converted into one) with `tokenizer_config.json` where there is one, and the
/// end-of-document token's id.
struct ExportTokenizer {
    files: Option<(PathBuf, Option<PathBuf>)>,
    eos_token_id: Option<u32>,
}

impl ExportTokenizer {
    /// The train block's tokenizer; none without one.
    fn of(checked: &Checked) -> Result<ExportTokenizer> {
        let Some(spec) = checked.train.as_ref().and_then(|t| t.data.tokenizer()) else {
            return Ok(ExportTokenizer {
                files: None,
                eos_token_id: None,
            });
        };
        let tk = TextTokenizer::load(&spec.source(), Flavour::Core)?;
        let eos_token_id = tk.eod(tk.config_eos().as_deref()).ok();
        let files = match spec {
            TokenizerSpec::Hf { path } => {
                let p = PathBuf::from(path);
                let config = p.with_file_name("tokenizer_config.json");
                (p, Some(config))
            }
            TokenizerSpec::Gpt2 { .. } => {
                let dir = std::env::temp_dir().join(format!("fmoec-export-{}", std::process::id()));
                std::fs::create_dir_all(&dir)?;
                let json = dir.join("tokenizer.json");
                tk.inner()
                    .save(&json, true)
                    .map_err(|e| anyhow::anyhow!("cannot convert the GPT-2 tokenizer: {e}"))?;
                (json, None)
            }
        };
        Ok(ExportTokenizer {
            files: Some(files),
            eos_token_id,
        })
    }

    fn files(&self) -> Option<(&Path, Option<&Path>)> {
        self.files
            .as_ref()
            .map(|(json, config)| (json.as_path(), config.as_deref()))
    }
}
