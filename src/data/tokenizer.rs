//! Tokenizers through Hugging Face's `tokenizers` crate: a `tokenizer.json`, or GPT-2's
//! `vocab.json` + `merges.txt` pair (what Megatron-LM's `GPT2BPETokenizer` reads), with the
//! token ids, vocabulary size and end-of-document token Megatron-LM's preprocessing uses.
//!
//! Megatron's releases differ in one detail that changes ids: v2.2's own Python BPE treats
//! `<|endoftext|>` in the text as plain characters, while Megatron-Core's GPT-2 tokenizer
//! (transformers' `GPT2TokenizerFast`) recognises it as the special token. [`Flavour`] picks
//! which; a `tokenizer.json` always behaves as transformers does (added tokens recognised,
//! the post-processor's special tokens added), as Megatron-Core's `HuggingFaceTokenizer`.
//! Knows nothing about datasets, models or training.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, ModelWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer};

use crate::diag::path_text;

/// GPT-2's end-of-document token (Megatron's `eod`).
pub const GPT2_EOD: &str = "<|endoftext|>";

/// Where a tokenizer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A Hugging Face `tokenizer.json`.
    Json(PathBuf),
    /// GPT-2's byte-level BPE files.
    Gpt2 { vocab: PathBuf, merges: PathBuf },
}

impl std::fmt::Display for TokenizerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerSource::Json(p) => write!(f, "hf(\"{}\")", path_text(p)),
            TokenizerSource::Gpt2 { vocab, merges } => write!(
                f,
                "gpt2(vocab = \"{}\", merges = \"{}\")",
                path_text(vocab),
                path_text(merges)
            ),
        }
    }
}

/// Which Megatron-LM release's tokenization to reproduce (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavour {
    /// Megatron-LM v2.2 (`megatron/tokenizer/gpt2_tokenization.py`).
    #[value(name = "v2.2")]
    V2_2,
    /// Megatron-Core (`core_v0.19.0`: transformers' tokenizers).
    #[default]
    Core,
}

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The contents of the added tokens, when the fast byte-level path applies (see
    /// [`super::byte_level`]): texts holding none of them take it.
    fast: Option<Vec<String>>,
    /// Megatron's `tokenizer.vocab_size`: every id the tokenizer can produce is below it.
    pub vocab_size: usize,
    source: TokenizerSource,
}

fn tk_err(e: Box<dyn std::error::Error + Send + Sync>) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl TextTokenizer {
    pub fn load(source: &TokenizerSource, flavour: Flavour) -> Result<TextTokenizer> {
        let inner = match source {
            TokenizerSource::Json(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the tokenizer `{}`", path_text(path)))?;
                Tokenizer::from_bytes(text.as_bytes()).map_err(|e| {
                    anyhow::anyhow!(
                        "`{}` is not a Hugging Face tokenizer.json: {e}",
                        path_text(path)
                    )
                })?
            }
            TokenizerSource::Gpt2 { vocab, merges } => {
                for p in [vocab, merges] {
                    if !p.is_file() {
                        bail!("cannot read the GPT-2 tokenizer file `{}`", path_text(p));
                    }
                }
                let bpe = BPE::from_file(&path_str(vocab)?, &path_str(merges)?)
                    .build()
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "`{}` and `{}` are not GPT-2 BPE files (vocab.json, merges.txt): {e}",
                            path_text(vocab),
                            path_text(merges)
                        )
                    })?;
                let mut tk = Tokenizer::new(bpe);
                tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
                tk.with_decoder(Some(ByteLevel::default()));
                if flavour == Flavour::Core && tk.token_to_id(GPT2_EOD).is_some() {
                    tk.add_special_tokens(&[AddedToken::from(GPT2_EOD, true)]);
                }
                tk
            }
        };
        let vocab_size = inner.get_vocab_size(true);
        let fast = fast_path_applies(&inner).then(|| {
            inner
                .get_added_tokens_decoder()
                .into_values()
                .map(|t| t.content)
                .collect()
        });
        Ok(TextTokenizer {
            inner,
            fast,
            vocab_size,
            source: source.clone(),
        })
    }

    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }

    /// The id of `token`, if the vocabulary (or its added tokens) has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Megatron's end-of-document id: GPT-2's `<|endoftext|>`; for a `tokenizer.json`,
    /// `eod` (the `eos_token` of its `tokenizer_config.json`, as Megatron-Core reads it)
    /// or, without one, `<|endoftext|>`.
    pub fn eod(&self, eod: Option<&str>) -> Result<u32> {
        let name = eod.unwrap_or(GPT2_EOD);
        self.token_id(name).with_context(|| {
            format!(
                "the tokenizer {} has no end-of-document token `{name}`",
                self.source
            )
        })
    }

    /// Token ids of `text` as Megatron's preprocessing gets them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let (Some(added), ModelWrapper::BPE(bpe)) = (&self.fast, self.inner.get_model()) {
            if !added.iter().any(|a| text.contains(a.as_str())) {
                let mut ids = Vec::with_capacity(text.len() / 3);
                super::byte_level::encode_into(bpe, text, &mut ids)?;
                return Ok(ids);
            }
        }
        self.encode_with_pipeline(text)
    }

    /// [`TextTokenizer::encode`] through the `tokenizers` crate's whole pipeline.
    pub fn encode_with_pipeline(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(tk_err)
            .context("the tokenizer failed")?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (for messages and samples).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tk_err)
    }

    /// The `eos_token` named by a `tokenizer_config.json` beside a `tokenizer.json`.
    pub fn config_eos(&self) -> Option<String> {
        let TokenizerSource::Json(path) = &self.source else {
            return None;
        };
        let config = path.with_file_name("tokenizer_config.json");
        let text = std::fs::read_to_string(config).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        match value.get("eos_token")? {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v.get("content")?.as_str().map(str::to_string),
        }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Whether the tokenizer is GPT-2's byte-level BPE with nothing around it that the fast
/// path leaves out (a normalizer, another pre-tokenizer, a post-processor adding tokens,
/// BPE dropout).
fn fast_path_applies(tk: &Tokenizer) -> bool {
    let byte_level_split = matches!(
        tk.get_pre_tokenizer(),
        Some(PreTokenizerWrapper::ByteLevel(b)) if !b.add_prefix_space && b.use_regex
    );
    let plain_post = matches!(
        tk.get_post_processor(),
        None | Some(PostProcessorWrapper::ByteLevel(_))
    );
    let plain_bpe = matches!(tk.get_model(), ModelWrapper::BPE(b) if b.dropout.is_none());
    tk.get_normalizer().is_none() && byte_level_split && plain_post && plain_bpe
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("the path `{}` is not valid UTF-8", path_text(p)))
}

/// Megatron-LM's padded vocabulary: `vocab` rounded up to a multiple of
/// `--make-vocab-size-divisible-by` (128) times the tensor-parallel size.
pub fn megatron_padded_vocab(vocab: u64, divisible_by: u64, tensor: u64) -> u64 {
    let multiple = divisible_by.max(1) * tensor.max(1);
    vocab.div_ceil(multiple) * multiple
}
