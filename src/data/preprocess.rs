//! `fmoec data`: text or JSON-lines into Megatron-LM indexed datasets, the bytes Megatron's
//! `tools/preprocess_data.py` writes for the same input and tokenizer (v2.2 and
//! Megatron-Core), on all cores.
//!
//! What Megatron's script does, and so what this does:
//! - every JSON line is a document; for each `--json-keys` key its string is tokenized and
//!   written as one sequence of `{prefix}_{key}_document`; empty sequences are left out but
//!   the document still ends (its index entry repeats); `--append-eod` adds the
//!   end-of-document id to the document's last sequence (Megatron-Core: only when the
//!   document has tokens; v2.2 fails on an empty document, so it is refused here);
//! - Megatron-Core also takes a list of strings (sentences, as its sentence splitter writes
//!   them): each non-empty one is a sequence of the document.
//!
//! Where Megatron's script fails (a blank line, a line that is not JSON, a missing key,
//! invalid UTF-8), this says where instead: blank lines are skipped (and counted), the rest
//! are errors naming the file and line. A text input (not JSON) is one document, the file's
//! whole content, as Megatron gives `{"text": <the file>}`.
//!
//! Knows nothing about models or training.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::indexed::{IndexedWriter, TokenDType};
use super::tokenizer::{Flavour, TextTokenizer};
use crate::diag::path_text;

/// How input files are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// One JSON object per line (Megatron's `--input`).
    Jsonl,
    /// A plain UTF-8 text file: one document.
    Text,
}

impl InputFormat {
    /// `.json`, `.jsonl` and `.ndjson` are JSON lines; anything else is text.
    pub fn of(path: &Path) -> InputFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json" | "jsonl" | "ndjson") => InputFormat::Jsonl,
            _ => InputFormat::Text,
        }
    }
}

/// What to preprocess and how.
pub struct Preprocess<'a> {
    pub inputs: &'a [PathBuf],
    /// `None`: by each file's extension ([`InputFormat::of`]).
    pub format: Option<InputFormat>,
    pub json_keys: &'a [String],
    pub tokenizer: &'a TextTokenizer,
    pub flavour: Flavour,
    /// The end-of-document id to append, if any.
    pub eod: Option<u32>,
    pub output_prefix: &'a str,
    pub overwrite: bool,
    pub progress: bool,
}

/// One output dataset.
#[derive(Debug)]
pub struct Output {
    pub key: String,
    pub bin: PathBuf,
    pub idx: PathBuf,
    pub dtype: TokenDType,
    pub documents: usize,
    pub sequences: usize,
    pub tokens: u64,
}

/// What a run did.
#[derive(Debug)]
pub struct Summary {
    pub outputs: Vec<Output>,
    pub documents: usize,
    pub blank_lines: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Megatron's output prefix of `key`: `{prefix}_{key}_document`.
pub fn output_prefix(prefix: &str, key: &str) -> String {
    format!("{prefix}_{key}_document")
}

/// A key's value in one document: a string, or (Megatron-Core) a list of sentences.
enum Field {
    Text(String),
    Sentences(Vec<String>),
}

/// Pulls the wanted keys out of a JSON object without building the rest (the last of
/// repeated keys wins, as in Python's `json.loads`).
struct WantedKeys<'k> {
    keys: &'k [String],
}

struct FieldSeed;

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Option<Field>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<Field>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Some(Field::Text(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Some(Field::Text(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(Some(Field::Sentences(out)))
            }
            // anything else: reported by the caller as "not a string"
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(None)
            }
        }
        d.deserialize_any(V)
    }
}

/// Per wanted key: absent, present but not text, or its value.
type Fields = Vec<Option<Option<Field>>>;

impl<'de> DeserializeSeed<'de> for WantedKeys<'_> {
    type Value = Fields;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct V<'k>(&'k [String]);
        impl<'de> Visitor<'de> for V<'_> {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Fields = self.0.iter().map(|_| None).collect();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match self.0.iter().position(|k| *k == key) {
                        Some(i) => out[i] = Some(map.next_value_seed(FieldSeed)?),
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V(self.keys))
    }
}

/// The sequences of one document for each key.
type Encoded = Vec<Vec<Vec<u32>>>;

/// Where a document came from, for messages.
#[derive(Clone, Copy)]
struct Origin<'a> {
    file: &'a Path,
    line: usize,
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}", path_text(self.file))
        } else {
            write!(f, "{}:{}", path_text(self.file), self.line)
        }
    }
}

impl Preprocess<'_> {
    /// Tokenizes one document's texts (one entry per key) into its sequences.
    fn encode(&self, fields: Vec<Field>, at: Origin) -> Result<Encoded> {
        fields
            .into_iter()
            .zip(self.json_keys)
            .map(|(field, key)| {
                let sentences = match field {
                    Field::Text(t) => vec![t],
                    Field::Sentences(list) => {
                        if self.flavour == Flavour::V2_2 {
                            bail!(
                                "{at}: `{key}` is a list; Megatron-LM v2.2's script takes a \
                                 string (lists of sentences are Megatron-Core's)"
                            );
                        }
                        list
                    }
                };
                let mut seqs = Vec::with_capacity(sentences.len());
                for s in &sentences {
                    let ids = self
                        .tokenizer
                        .encode(s)
                        .with_context(|| format!("{at}: cannot tokenize `{key}`"))?;
                    if !ids.is_empty() {
                        seqs.push(ids);
                    }
                }
                if let Some(eod) = self.eod {
                    match seqs.last_mut() {
                        Some(last) => last.push(eod),
                        None if self.flavour == Flavour::V2_2 => bail!(
                            "{at}: `{key}` has no tokens, and Megatron-LM v2.2's script fails \
                             on an empty document with --append-eod (it appends to the last \
                             sentence); leave the line out, or use --megatron core, which \
                             writes the document without the end-of-document token"
                        ),
                        None => {}
                    }
                }
                Ok(seqs)
            })
            .collect()
    }

    fn parse_line(&self, line: &[u8], at: Origin) -> Result<Option<Vec<Field>>> {
        let text = std::str::from_utf8(line).map_err(|e| {
            anyhow::anyhow!(
                "{at}: not valid UTF-8 (byte {} of the line)",
                e.valid_up_to() + 1
            )
        })?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = WantedKeys {
            keys: self.json_keys,
        }
        .deserialize(&mut de)
        .and_then(|f| de.end().map(|_| f))
        .map_err(|e| anyhow::anyhow!("{at}: not a JSON object: {e}"))?;
        let mut out = Vec::with_capacity(fields.len());
        for (field, key) in fields.into_iter().zip(self.json_keys) {
            match field {
                None => bail!("{at}: the JSON object has no key `{key}`"),
                Some(None) => bail!("{at}: `{key}` is not a string"),
                Some(Some(f)) => out.push(f),
            }
        }
        Ok(Some(out))
    }

    /// Runs the whole preprocessing.
    pub fn run(&self) -> Result<Summary> {
        let start = Instant::now();
        let total_bytes = self.check_inputs()?;
        let dtype = TokenDType::for_vocab(self.tokenizer.vocab_size);
        let mut writers = self
            .json_keys
            .iter()
            .map(|key| {
                IndexedWriter::create(
                    &output_prefix(self.output_prefix, key),
                    dtype,
                    self.overwrite,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let bar = progress_bar(self.progress, total_bytes);
        let mut summary = Summary {
            outputs: Vec::new(),
            documents: 0,
            blank_lines: 0,
            bytes: 0,
            seconds: 0.0,
        };
        for input in self.inputs {
            match self.format.unwrap_or(InputFormat::of(input)) {
                InputFormat::Text => self.run_text(input, &mut writers, &mut summary, &bar)?,
                InputFormat::Jsonl => self.run_jsonl(input, &mut writers, &mut summary, &bar)?,
            }
        }
        bar.finish_and_clear();
        for (key, w) in self.json_keys.iter().zip(writers) {
            let (documents, sequences, tokens, dtype) =
                (w.documents(), w.sequences(), w.tokens(), w.dtype());
            let (bin, idx) = w.finish()?;
            summary.outputs.push(Output {
                key: key.clone(),
                bin,
                idx,
                dtype,
                documents,
                sequences,
                tokens,
            });
        }
        summary.seconds = start.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// Refuses what cannot be read before anything is written: no keys, an input that is
    /// missing or a folder, a text input with several keys. Returns the inputs' total bytes.
    fn check_inputs(&self) -> Result<u64> {
        if self.json_keys.is_empty() {
            bail!("no JSON keys to read (--json-keys)");
        }
        let mut total_bytes = 0u64;
        for input in self.inputs {
            let meta = std::fs::metadata(input)
                .with_context(|| format!("cannot read the input `{}`", path_text(input)))?;
            if meta.is_dir() {
                bail!("the input `{}` is a folder, not a file", path_text(input));
            }
            total_bytes += meta.len();
            if self.format.unwrap_or(InputFormat::of(input)) == InputFormat::Text
                && self.json_keys.len() != 1
            {
                bail!(
                    "`{}` is a text input: it has one document, not the keys {}",
                    path_text(input),
                    self.json_keys.join(", ")
                );
            }
        }
        Ok(total_bytes)
    }

    /// A text input: the whole file is one document.
    fn run_text(
        &self,
        input: &Path,
        writers: &mut [IndexedWriter],
        summary: &mut Summary,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let mut text = Vec::new();
        BufReader::new(open_input(input)?)
            .read_to_end(&mut text)
            .with_context(|| cannot_read(input))?;
        let at = Origin {
            file: input,
            line: 0,
        };
        let text = String::from_utf8(text).map_err(|e| {
            anyhow::anyhow!(
                "{at}: not valid UTF-8 (byte {})",
                e.utf8_error().valid_up_to() + 1
            )
        })?;
        let len = text.len() as u64;
        let doc = self.encode(vec![Field::Text(text)], at)?;
        write_document(writers, doc)?;
        summary.documents += 1;
        summary.bytes += len;
        bar.inc(len);
        Ok(())
    }

    /// A JSON-lines input: every line a document, read in batches that the workers parse
    /// and tokenize, written in the input's order.
    fn run_jsonl(
        &self,
        input: &Path,
        writers: &mut [IndexedWriter],
        summary: &mut Summary,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let mut reader = BufReader::with_capacity(1 << 20, open_input(input)?);
        let mut line_no = 0usize;
        loop {
            let (batch, bytes) = read_batch(&mut reader, input, &mut line_no)?;
            if batch.is_empty() {
                return Ok(());
            }
            for doc in self.encode_batch(input, &batch) {
                match doc? {
                    None => summary.blank_lines += 1,
                    Some(doc) => {
                        write_document(writers, doc)?;
                        summary.documents += 1;
                    }
                }
            }
            summary.bytes += bytes as u64;
            bar.inc(bytes as u64);
        }
    }

    /// Each line of `batch` parsed and tokenized on the workers, in order: `None` for a
    /// blank line.
    fn encode_batch(
        &self,
        input: &Path,
        batch: &[(usize, Vec<u8>)],
    ) -> Vec<Result<Option<Encoded>>> {
        batch
            .par_iter()
            .map(|(line, text)| {
                let at = Origin {
                    file: input,
                    line: *line,
                };
                match self.parse_line(text, at)? {
                    None => Ok(None),
                    Some(fields) => self.encode(fields, at).map(Some),
                }
            })
            .collect()
    }
}

/// The next lines of `reader` (the input `input`), up to about [`BATCH_BYTES`] of them, each
/// with its line number (counted on in `line_no`), and their bytes; none at the end.
fn read_batch(
    reader: &mut impl BufRead,
    input: &Path,
    line_no: &mut usize,
) -> Result<(Lines, usize)> {
    let mut batch: Lines = Vec::new();
    let mut bytes = 0usize;
    while bytes < BATCH_BYTES {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| cannot_read(input))?;
        if n == 0 {
            break;
        }
        *line_no += 1;
        bytes += n;
        batch.push((*line_no, line));
    }
    Ok((batch, bytes))
}

/// Lines of an input, each with its line number (from 1).
type Lines = Vec<(usize, Vec<u8>)>;

/// Bytes of JSON lines per batch handed to the workers.
const BATCH_BYTES: usize = 4 << 20;

/// Opens the input file `input`.
fn open_input(input: &Path) -> Result<std::fs::File> {
    std::fs::File::open(input).with_context(|| cannot_read(input))
}

/// What is said where the input `input` cannot be opened or read.
fn cannot_read(input: &Path) -> String {
    format!("cannot read `{}`", path_text(input))
}

fn write_document(writers: &mut [IndexedWriter], doc: Encoded) -> Result<()> {
    for (w, seqs) in writers.iter_mut().zip(doc) {
        for s in &seqs {
            w.add_sequence(s)?;
        }
        w.end_document();
    }
    Ok(())
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
