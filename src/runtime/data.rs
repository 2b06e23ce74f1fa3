//! Training data: the embedded corpus and plain text files (byte-level tokens, or through the
//! train block's tokenizer), JSON lines through a tokenizer, and Megatron-LM's indexed
//! datasets (`.bin`/`.idx`, the mmap format `tools/preprocess_data.py` and `fmoec data`
//! write), as one token stream split into a training part and a held-out tail.
//!
//! Batches are windows of `seq_len + 1` tokens at positions drawn from a counter-based
//! generator keyed by `(seed, step, micro-batch, row)`, so the data position of a run is just
//! its step: resuming at step `s` reads exactly what the uninterrupted run would have.
//! Knows nothing about models or training.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::check::{DataSource, TokenizerSpec};
use crate::data::tokenizer::{Flavour, TextTokenizer};
use crate::diag::path_text;

pub use crate::data::corpus::{builtin_text, BUILTIN_NAMES};

/// Fraction of the stream held out for evaluation (the tail).
const HELDOUT_FRACTION: f64 = 0.05;

/// SplitMix64: a counter-based 64-bit mixer (Steele et al.), used to derive every seed.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes a list of words into one seed.
pub fn mix_all(words: &[u64]) -> u64 {
    words.iter().fold(0x5EED_u64, |acc, w| mix(acc ^ mix(*w)))
}

use crate::data::indexed::{IndexHeader, INDEX_HEADER_BYTES};
pub use crate::data::indexed::{TokenDType, INDEX_MAGIC};

/// A Megatron-LM indexed dataset, memory-mapped.
pub struct IndexedDataset {
    pub dtype: TokenDType,
    /// Tokens per sequence.
    pub sizes: Vec<i32>,
    /// Byte offset of each sequence in `.bin`.
    pub pointers: Vec<i64>,
    /// Document boundaries as sequence indices (`len = documents + 1`).
    pub doc_idx: Vec<i64>,
    bin: memmap2::Mmap,
}

fn take<'a>(buf: &'a [u8], at: &mut usize, n: usize, what: &str, path: &Path) -> Result<&'a [u8]> {
    let end = at.checked_add(n).filter(|&e| e <= buf.len());
    match end {
        Some(end) => {
            let s = &buf[*at..end];
            *at = end;
            Ok(s)
        }
        None => bail!(
            "`{}` is truncated: it ends inside the {what}",
            path_text(path)
        ),
    }
}

/// The three tables of an index after its header: each sequence's length and byte offset,
/// and the document boundaries.
type IndexTables = (Vec<i32>, Vec<i64>, Vec<i64>);

/// Reads the tables of index `idx` (at `idx_path`) that `header` announces.
fn index_tables(idx: &[u8], header: &IndexHeader, idx_path: &Path) -> Result<IndexTables> {
    let mut at = INDEX_HEADER_BYTES;
    let count = usize::try_from(header.sequences).context("sequence count overflows")?;
    let docs = usize::try_from(header.doc_entries).context("document count overflows")?;
    let n4 = count.checked_mul(4).context("sequence count overflows")?;
    let sizes: Vec<i32> = take(idx, &mut at, n4, "sequence lengths", idx_path)?
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let n8 = count.checked_mul(8).context("sequence count overflows")?;
    let pointers = le_i64s(take(idx, &mut at, n8, "sequence pointers", idx_path)?);
    let d8 = docs.checked_mul(8).context("document count overflows")?;
    let doc_idx = le_i64s(take(idx, &mut at, d8, "document indices", idx_path)?);
    Ok((sizes, pointers, doc_idx))
}

/// Little-endian `i64`s, one per 8 bytes.
fn le_i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

impl IndexedDataset {
    /// Opens `prefix.idx` and `prefix.bin`.
    pub fn open(prefix: &str) -> Result<IndexedDataset> {
        let idx_path = Path::new(&format!("{prefix}.idx")).to_path_buf();
        let bin_path = Path::new(&format!("{prefix}.bin")).to_path_buf();
        let idx = std::fs::read(&idx_path).with_context(|| {
            format!("cannot read the Megatron index `{}`", path_text(&idx_path))
        })?;
        let header = IndexHeader::parse(&idx, &idx_path)?;
        let (sizes, pointers, doc_idx) = index_tables(&idx, &header, &idx_path)?;
        let file = std::fs::File::open(&bin_path)
            .with_context(|| format!("cannot open the Megatron data `{}`", path_text(&bin_path)))?;
        // SAFETY: the file is only read; a concurrent writer could change what we read, not
        // memory safety of the bounds-checked accesses below.
        let bin = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map `{}`", path_text(&bin_path)))?;
        let dataset = IndexedDataset {
            dtype: header.dtype,
            sizes,
            pointers,
            doc_idx,
            bin,
        };
        dataset.check_within_data(&bin_path, &idx_path)?;
        Ok(dataset)
    }

    /// Fails unless every sequence the index lists lies inside the `.bin` file.
    fn check_within_data(&self, bin_path: &Path, idx_path: &Path) -> Result<()> {
        let item = self.dtype.size() as i64;
        for (i, (&s, &p)) in self.sizes.iter().zip(&self.pointers).enumerate() {
            if s < 0 || p < 0 || (p + s as i64 * item) as usize > self.bin.len() {
                bail!(
                    "`{}` is truncated or does not match `{}`: sequence {i} ({s} tokens at byte {p}) \
                     lies past its end ({} bytes)",
                    path_text(bin_path),
                    path_text(idx_path),
                    self.bin.len()
                );
            }
        }
        Ok(())
    }

    /// The tokens of sequence `i`.
    pub fn sequence(&self, i: usize) -> Result<Vec<i64>> {
        let (Some(&size), Some(&ptr)) = (self.sizes.get(i), self.pointers.get(i)) else {
            bail!(
                "sequence {i} is out of range ({} sequences)",
                self.sizes.len()
            );
        };
        let item = self.dtype.size();
        let bytes = &self.bin[ptr as usize..ptr as usize + size as usize * item];
        bytes
            .chunks_exact(item)
            .map(|c| self.dtype.read(c).context("unreadable token"))
            .collect()
    }

    /// Total tokens over all sequences.
    pub fn total_tokens(&self) -> usize {
        self.sizes.iter().map(|&s| s as usize).sum()
    }

    /// Whether the sequences lie back to back in `.bin` from the first pointer on (as
    /// `preprocess_data.py` writes them), so the stream can be read straight from the map.
    fn contiguous(&self) -> bool {
        let item = self.dtype.size() as i64;
        self.pointers
            .windows(2)
            .zip(&self.sizes)
            .all(|(p, &s)| p[1] == p[0] + s as i64 * item)
    }

    /// `len` tokens of the stream from token `start`, read from the map (contiguous layout).
    fn flat(&self, start: usize, len: usize) -> Vec<i64> {
        let item = self.dtype.size();
        let base = self.pointers.first().copied().unwrap_or(0) as usize + start * item;
        self.bin[base..base + len * item]
            .chunks_exact(item)
            .map(|c| self.dtype.read(c).unwrap_or(-1))
            .collect()
    }

    /// All tokens, sequence after sequence (documents concatenated, as Megatron's GPT dataset).
    pub fn stream(&self) -> Result<Vec<i64>> {
        let mut out = Vec::with_capacity(self.sizes.iter().map(|&s| s as usize).sum());
        for i in 0..self.sizes.len() {
            out.extend(self.sequence(i)?);
        }
        Ok(out)
    }
}

/// Where a run's tokens live.
enum Tokens {
    Memory(Vec<i64>),
    /// A Megatron dataset whose sequences lie back to back: read windows from the map.
    Mapped(IndexedDataset),
}

/// The token stream of a run, with its training and held-out ranges.
pub struct Dataset {
    pub description: String,
    tokens: Tokens,
    len: usize,
    train_len: usize,
}

impl Dataset {
    /// Loads a data source and checks its tokens fit the model's vocabulary.
    pub fn load(source: &DataSource, vocab: u64) -> Result<Dataset> {
        let (description, tokens): (String, Vec<i64>) = match source {
            DataSource::Builtin(name) => {
                let bytes = builtin_text(name)?;
                (
                    format!("builtin(\"{name}\"), {} bytes", bytes.len()),
                    bytes.into_iter().map(i64::from).collect(),
                )
            }
            DataSource::Text(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read the text file `{}`", path_text(path)))?;
                (
                    format!("text(\"{}\"), {} bytes", path_text(path), bytes.len()),
                    bytes.into_iter().map(i64::from).collect(),
                )
            }
            DataSource::Jsonl { path, .. } => {
                bail!(
                    "jsonl(\"{}\") needs a tokenizer (`tokenizer = ...` in the train block)",
                    path_text(path)
                )
            }
            DataSource::Tokenized { source, tokenizer } => {
                if let DataSource::Megatron(_) = source.as_ref() {
                    // the tokenizer made the dataset: its ids are read as they are
                    return Dataset::load(source, vocab);
                }
                Dataset::tokenized(source, tokenizer)?
            }
            DataSource::Megatron(prefix) => return Dataset::megatron(prefix, vocab),
        };
        Dataset::from_tokens(description, tokens, vocab)
    }

    /// The description and tokens of a text source read through `tokenizer`.
    fn tokenized(source: &DataSource, tokenizer: &TokenizerSpec) -> Result<(String, Vec<i64>)> {
        let tk = TextTokenizer::load(&tokenizer.source(), Flavour::Core)?;
        let tokens = tokenize_source(source, &tk)?;
        Ok((
            format!(
                "{} through {}, {} tokens",
                describe(source),
                tk.source(),
                tokens.len()
            ),
            tokens,
        ))
    }

    /// A Megatron dataset: read from the map where its sequences lie back to back (its ids
    /// checked in one pass), else read into memory.
    fn megatron(prefix: &str, vocab: u64) -> Result<Dataset> {
        let ds = IndexedDataset::open(prefix)?;
        let description = format!(
            "megatron(\"{}\"), {} documents, {} tokens",
            path_text(prefix),
            ds.doc_idx.len().saturating_sub(1),
            ds.total_tokens()
        );
        if ds.contiguous() {
            let len = ds.total_tokens();
            // one pass over the map to check the ids, without holding them
            let mut at = 0;
            while at < len {
                let n = (len - at).min(1 << 20);
                check_vocab(&ds.flat(at, n), vocab)?;
                at += n;
            }
            return Ok(Dataset::split(description, Tokens::Mapped(ds), len));
        }
        Dataset::from_tokens(description, ds.stream()?, vocab)
    }

    pub fn from_tokens(description: String, tokens: Vec<i64>, vocab: u64) -> Result<Dataset> {
        check_vocab(&tokens, vocab)?;
        let len = tokens.len();
        Ok(Dataset::split(description, Tokens::Memory(tokens), len))
    }

    fn split(description: String, tokens: Tokens, len: usize) -> Dataset {
        let held = ((len as f64) * HELDOUT_FRACTION) as usize;
        Dataset {
            description,
            tokens,
            len,
            train_len: len - held,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn window(&self, start: usize, len: usize) -> Vec<i64> {
        match &self.tokens {
            Tokens::Memory(t) => t[start..start + len].to_vec(),
            Tokens::Mapped(ds) => ds.flat(start, len),
        }
    }

    /// Unigram entropy of the training split, for data held in memory (bytes); `None` for
    /// memory-mapped Megatron data (a pass over it is not worth it for a summary line).
    pub fn unigram_entropy(&self) -> Option<f64> {
        match &self.tokens {
            Tokens::Memory(t) => Some(unigram_entropy(&t[..self.train_len])),
            Tokens::Mapped(_) => None,
        }
    }

    /// Checks both splits can hold a window of `window` tokens.
    pub fn check_window(&self, window: usize) -> Result<()> {
        if self.train_len <= window || self.len - self.train_len <= window {
            bail!(
                "the data ({}) is too small for sequences of {} tokens: it needs more than {} \
                 tokens in its held-out tail ({}% of the stream)",
                self.description,
                window - 1,
                window,
                (HELDOUT_FRACTION * 100.0) as u32
            );
        }
        Ok(())
    }

    /// `rows` windows of `window` tokens from `split`, at positions keyed by `key`.
    pub fn batch(
        &self,
        heldout: bool,
        key: &[u64],
        rows: usize,
        window: usize,
        device: Device,
    ) -> Result<Tensor> {
        let (offset, part_len) = if heldout {
            (self.train_len, self.len - self.train_len)
        } else {
            (0, self.train_len)
        };
        let span = (part_len - window) as u64;
        let mut buf = Vec::with_capacity(rows * window);
        for r in 0..rows {
            let mut words = key.to_vec();
            words.push(r as u64);
            let start = (mix_all(&words) % span) as usize;
            buf.extend(self.window(offset + start, window));
        }
        Ok(Tensor::f_from_slice(&buf)?
            .f_reshape([rows as i64, window as i64])?
            .f_to(device)?
            .f_to_kind(Kind::Int64)?)
    }
}

fn describe(source: &DataSource) -> String {
    match source {
        DataSource::Builtin(n) => format!("builtin(\"{n}\")"),
        DataSource::Text(p) => format!("text(\"{}\")", path_text(p)),
        DataSource::Megatron(p) => format!("megatron(\"{}\")", path_text(p)),
        DataSource::Jsonl { path, key } => {
            format!("jsonl(\"{}\", key = \"{key}\")", path_text(path))
        }
        DataSource::Tokenized { source, .. } => describe(source),
    }
}

/// The token stream of a text source read through `tk`: the documents' ids one after the
/// other, each followed by the end-of-document token when the tokenizer has one (as
/// `fmoec data --append-eod` writes them).
fn tokenize_source(source: &DataSource, tk: &TextTokenizer) -> Result<Vec<i64>> {
    use rayon::prelude::*;
    let eod = tk
        .config_eos()
        .and_then(|e| tk.token_id(&e))
        .or_else(|| tk.token_id(crate::data::tokenizer::GPT2_EOD));
    let documents = text_documents(source)?;
    let encoded: Vec<Vec<u32>> = documents
        .par_iter()
        .map(|d| tk.encode(d))
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(encoded.iter().map(|e| e.len() + 1).sum());
    for ids in encoded {
        if ids.is_empty() {
            continue;
        }
        out.extend(ids.into_iter().map(i64::from));
        out.extend(eod.map(i64::from));
    }
    Ok(out)
}

/// The documents of a text source: the whole text of a built-in corpus or a text file, one
/// per line of a JSON-lines file.
fn text_documents(source: &DataSource) -> Result<Vec<String>> {
    Ok(match source {
        DataSource::Builtin(name) => {
            vec![String::from_utf8(builtin_text(name)?)
                .context("the embedded corpus is not UTF-8")?]
        }
        DataSource::Text(path) => vec![std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the text file `{}` as UTF-8", path_text(path))
        })?],
        DataSource::Jsonl { path, key } => jsonl_documents(path, key)?,
        other => bail!("internal error: {} is not text", describe(other)),
    })
}

/// The string under `key` of each non-blank line of the JSON-lines file `path`.
fn jsonl_documents(path: &str, key: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}` as UTF-8", path_text(path)))?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path_text(path), i + 1))?;
        match v.get(key) {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            _ => bail!(
                "{}:{}: no string under the key `{key}`",
                path_text(path),
                i + 1
            ),
        }
    }
    Ok(docs)
}

fn check_vocab(tokens: &[i64], vocab: u64) -> Result<()> {
    if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as u64 >= vocab) {
        bail!(
            "the data holds token id {bad}, outside the model's vocabulary of {vocab} \
             (byte-level text needs vocab >= 256)"
        );
    }
    Ok(())
}

/// Unigram entropy (nats per token) of a token stream: the loss of the best context-free model.
pub fn unigram_entropy(tokens: &[i64]) -> f64 {
    let mut counts = std::collections::BTreeMap::new();
    for &t in tokens {
        *counts.entry(t).or_insert(0u64) += 1;
    }
    let n = tokens.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}
