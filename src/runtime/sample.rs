//! Text generation from a checkpoint (`fmoec run --sample PROMPT`): the prompt is encoded and
//! the sample decoded by the train block's tokenizer, or as bytes where the model reads bytes;
//! temperature and top-k sampling from libtorch's generator, seeded. Knows nothing about
//! training.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::check::{Checked, DataSource};
use crate::data::tokenizer::{Flavour, TextTokenizer};
use crate::runtime::checkpoint;
use crate::runtime::data::mix_all;
use crate::runtime::model::{lock_rng, Transformer};
use crate::runtime::train::compute_kind;

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub device: Device,
    pub checkpoint: PathBuf,
    pub prompt: String,
    pub tokens: usize,
    pub temperature: f64,
    pub top_k: i64,
    pub seed: u64,
}

/// Generates `tokens` bytes after `prompt` from a checkpoint of the checked model.
pub fn sample(checked: &Checked, opts: &SampleOptions) -> Result<String> {
    let model_decl = &checked.model;
    let text = TextIds::of(checked)?;
    let source = checkpoint::Source::open(&opts.checkpoint, model_decl)?;
    let compute = match &checked.train {
        Some(t) => compute_kind(t.precision)?,
        None => Kind::Float,
    };
    // Sampling draws from libtorch's global generator: hold it, as the trainer does, so
    // other threads of this process (tests, in-process ranks) do not move its state.
    let _rng = lock_rng();
    let model = Transformer::new(model_decl, opts.device, Kind::Float, compute)?;
    let all = model_decl
        .moe_layers()
        .map(|(layer, m)| (layer, (0..m.experts as usize).collect()))
        .collect();
    source.restore(&model.store, None, &all)?;
    tch::manual_seed(mix_all(&[opts.seed, 0x5A3]) as i64);
    let _guard = tch::no_grad_guard();
    let mut ids = text.encode(&opts.prompt)?;
    let ctx = model_decl.context as usize;
    let start = ids.len();
    for _ in 0..opts.tokens {
        let from = ids.len().saturating_sub(ctx);
        let input = Tensor::f_from_slice(&ids[from..])?
            .f_unsqueeze(0)?
            .f_to(opts.device)?;
        let out = model.forward(&input, false)?;
        let last = out
            .logits
            .f_select(1, -1)?
            .f_select(0, 0)?
            .f_to_kind(Kind::Float)?;
        let next = if opts.temperature <= 0.0 {
            last.f_argmax(0, false)?.f_int64_value(&[])?
        } else {
            let scaled = last.f_div_scalar(opts.temperature)?;
            let k = opts.top_k.clamp(1, scaled.size()[0]);
            let (vals, idx) = scaled.f_topk(k, 0, true, true)?;
            let probs = vals.f_softmax(0, Kind::Float)?;
            let pick = probs.f_multinomial(1, false)?;
            idx.f_index_select(0, &pick)?.f_int64_value(&[0])?
        };
        ids.push(next);
    }
    text.decode(&ids[start..])
}

/// How the model's token ids are text: bytes, or the ids of the train block's tokenizer.
enum TextIds {
    Bytes,
    Tokenizer(Box<TextTokenizer>),
}

impl TextIds {
    fn of(checked: &Checked) -> Result<TextIds> {
        let data = checked.train.as_ref().map(|t| &t.data);
        match data {
            Some(DataSource::Tokenized { tokenizer, .. }) => Ok(TextIds::Tokenizer(Box::new(
                TextTokenizer::load(&tokenizer.source(), Flavour::Core)?,
            ))),
            // a Megatron dataset's ids come from a tokenizer the file does not name
            Some(DataSource::Megatron(prefix)) => bail!(
                "--sample cannot turn the ids of `megatron(\"{}\")` into text: name the \
                 tokenizer that made the dataset in the train block (`tokenizer = \
                 hf(\"tokenizer.json\")` or `gpt2(vocab = ..., merges = ...)`)",
                crate::diag::path_text(prefix)
            ),
            _ if checked.model.vocab < 256 => bail!(
                "sampling text needs a byte-level vocabulary (vocab >= 256) or a tokenizer, \
                 the model has {}",
                checked.model.vocab
            ),
            _ => Ok(TextIds::Bytes),
        }
    }

    /// The prompt's ids (a newline for an empty prompt, so that there is something to
    /// continue).
    fn encode(&self, prompt: &str) -> Result<Vec<i64>> {
        let prompt = if prompt.is_empty() { "\n" } else { prompt };
        Ok(match self {
            TextIds::Bytes => prompt.bytes().map(i64::from).collect(),
            TextIds::Tokenizer(tk) => tk.encode(prompt)?.into_iter().map(i64::from).collect(),
        })
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        match self {
            TextIds::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&t| t.clamp(0, 255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            TextIds::Tokenizer(tk) => {
                let ids: Vec<u32> = ids.iter().map(|&t| t.max(0) as u32).collect();
                tk.decode(&ids)
            }
        }
    }
}
