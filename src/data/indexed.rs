//! Megatron-LM's mmap indexed dataset, the format of `prefix.bin` / `prefix.idx` (v2.2's
//! `MMapIndexedDataset`, Megatron-Core's `IndexedDataset`: the same bytes):
//!
//! ```text
//! .bin  the token ids of every sequence, back to back, in the index's dtype (little-endian)
//! .idx  b"MMIDIDX\0\0", u64 version 1, u8 dtype code,
//!       u64 sequence count S, u64 document-index length D (documents + 1),
//!       i32 sizes[S], i64 byte pointers[S] (running sums of sizes · itemsize),
//!       i64 document index[D] (0, then the sequence count after each document)
//! ```
//!
//! The dtype is Megatron's `optimal_dtype(vocab_size)`: uint16 below 65500, else int32.
//! [`IndexedWriter`] writes both files into hidden temporaries and renames them into place
//! when finished, so a failed or interrupted run leaves nothing half-written. Readers live
//! with their users (`runtime::data`). Knows nothing about tokenizers or text.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::diag::path_text;

/// The `.idx` magic.
pub const INDEX_MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// The only index version Megatron writes.
pub const INDEX_VERSION: u64 = 1;

/// Megatron-LM's `DType` codes in `.idx` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDType {
    U8,
    I8,
    I16,
    I32,
    I64,
    F64,
    F32,
    U16,
}

impl TokenDType {
    pub fn from_code(code: u8) -> Option<TokenDType> {
        Some(match code {
            1 => TokenDType::U8,
            2 => TokenDType::I8,
            3 => TokenDType::I16,
            4 => TokenDType::I32,
            5 => TokenDType::I64,
            6 => TokenDType::F64,
            7 => TokenDType::F32,
            8 => TokenDType::U16,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            TokenDType::U8 => 1,
            TokenDType::I8 => 2,
            TokenDType::I16 => 3,
            TokenDType::I32 => 4,
            TokenDType::I64 => 5,
            TokenDType::F64 => 6,
            TokenDType::F32 => 7,
            TokenDType::U16 => 8,
        }
    }

    /// NumPy's name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            TokenDType::U8 => "uint8",
            TokenDType::I8 => "int8",
            TokenDType::I16 => "int16",
            TokenDType::I32 => "int32",
            TokenDType::I64 => "int64",
            TokenDType::F64 => "float64",
            TokenDType::F32 => "float32",
            TokenDType::U16 => "uint16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            TokenDType::U8 | TokenDType::I8 => 1,
            TokenDType::I16 | TokenDType::U16 => 2,
            TokenDType::I32 | TokenDType::F32 => 4,
            TokenDType::I64 | TokenDType::F64 => 8,
        }
    }

    /// The token id stored in `b` (`size()` bytes); `None` for floating-point dtypes.
    pub fn read(self, b: &[u8]) -> Option<i64> {
        Some(match self {
            TokenDType::U8 => b[0] as i64,
            TokenDType::I8 => b[0] as i8 as i64,
            TokenDType::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            TokenDType::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            TokenDType::I32 => i32::from_le_bytes(b[..4].try_into().ok()?) as i64,
            TokenDType::I64 => i64::from_le_bytes(b[..8].try_into().ok()?),
            TokenDType::F32 | TokenDType::F64 => return None,
        })
    }

    /// Megatron's `DType.optimal_dtype(vocab_size)` (v2.2: `__best_fitting_dtype`).
    pub fn for_vocab(vocab_size: usize) -> TokenDType {
        if vocab_size < 65500 {
            TokenDType::U16
        } else {
            TokenDType::I32
        }
    }
}

/// `prefix.bin` and `prefix.idx`.
pub fn paths(prefix: &str) -> (PathBuf, PathBuf) {
    (
        PathBuf::from(format!("{prefix}.bin")),
        PathBuf::from(format!("{prefix}.idx")),
    )
}

/// Bytes of the `.idx` header before the sizes: magic, version, dtype, the two counts.
pub const INDEX_HEADER_BYTES: usize = 34;

/// What an `.idx` header says: the token dtype and how many entries each table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    pub dtype: TokenDType,
    /// Sequences (entries of the sizes and of the pointers).
    pub sequences: u64,
    /// Entries of the document index (documents + 1).
    pub doc_entries: u64,
}

impl IndexHeader {
    /// Reads the header at the start of `bytes` (the `.idx` at `path`, named in errors):
    /// refuses a short file, another magic or version, and dtypes that are not token ids.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<IndexHeader> {
        let magic = &bytes[..bytes.len().min(INDEX_MAGIC.len())];
        if magic != &INDEX_MAGIC[..magic.len()] {
            bail!(
                "`{}` is not a Megatron-LM mmap index (its first bytes are not `MMIDIDX`)",
                path_text(path)
            );
        }
        if bytes.len() < INDEX_HEADER_BYTES {
            bail!(
                "`{}` is truncated: it ends inside the header",
                path_text(path)
            );
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let version = word(9);
        if version != INDEX_VERSION {
            bail!(
                "`{}` has index version {version}; only version {INDEX_VERSION} is supported",
                path_text(path)
            );
        }
        let code = bytes[17];
        let dtype = TokenDType::from_code(code).with_context(|| {
            format!(
                "`{}` names an unknown token dtype code {code}",
                path_text(path)
            )
        })?;
        if matches!(dtype, TokenDType::F32 | TokenDType::F64) {
            bail!(
                "`{}` holds floating-point values, not token ids",
                path_text(path)
            );
        }
        Ok(IndexHeader {
            dtype,
            sequences: word(18),
            doc_entries: word(26),
        })
    }

    /// Byte offsets where the sizes, the pointers and the document index end (`None` when
    /// the counts overflow, which no real file has).
    fn table_ends(&self) -> Option<[(u64, &'static str); 3]> {
        let sizes = (INDEX_HEADER_BYTES as u64).checked_add(self.sequences.checked_mul(4)?)?;
        let pointers = sizes.checked_add(self.sequences.checked_mul(8)?)?;
        let documents = pointers.checked_add(self.doc_entries.checked_mul(8)?)?;
        Some([
            (sizes, "sequence lengths"),
            (pointers, "sequence pointers"),
            (documents, "document indices"),
        ])
    }
}

/// Whether `prefix.idx` and `prefix.bin` hold a whole dataset, reading only the index's header
/// and its last sequence's entries (not the tables, not the tokens): the checker's view of
/// what `fmoec run` would refuse (a truncated `.idx`, or a `.bin` shorter than the last
/// sequence's end), with the words the run's reader uses.
pub fn check_dataset(prefix: &str) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let (bin_path, idx_path) = paths(prefix);
    let mut idx = std::fs::File::open(&idx_path)
        .with_context(|| format!("cannot read the Megatron index `{}`", path_text(&idx_path)))?;
    let idx_len = idx.metadata()?.len();
    let mut head = Vec::with_capacity(INDEX_HEADER_BYTES);
    (&mut idx)
        .take(INDEX_HEADER_BYTES as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read `{}`", path_text(&idx_path)))?;
    let header = IndexHeader::parse(&head, &idx_path)?;
    let ends = header.table_ends().with_context(|| {
        format!(
            "`{}` names more sequences than a file can hold",
            path_text(&idx_path)
        )
    })?;
    if let Some((_, what)) = ends.iter().find(|(end, _)| *end > idx_len) {
        bail!(
            "`{}` is truncated: it ends inside the {what}",
            path_text(&idx_path)
        );
    }
    let bin_len = std::fs::metadata(&bin_path)
        .with_context(|| format!("cannot open the Megatron data `{}`", path_text(&bin_path)))?
        .len();
    if header.sequences == 0 {
        return Ok(());
    }
    let last = header.sequences - 1;
    let mut read_at = |at: u64, n: usize| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        idx.seek(SeekFrom::Start(at))?;
        idx.read_exact(&mut buf)
            .with_context(|| format!("cannot read `{}`", path_text(&idx_path)))?;
        Ok(buf)
    };
    let size = i32::from_le_bytes(read_at(ends[0].0 - 4, 4)?.try_into().expect("4 bytes"));
    let pointer = i64::from_le_bytes(read_at(ends[1].0 - 8, 8)?.try_into().expect("8 bytes"));
    let end = (size as i64)
        .checked_mul(header.dtype.size() as i64)
        .and_then(|bytes| bytes.checked_add(pointer));
    if size < 0 || pointer < 0 || end.is_none_or(|end| end as u64 > bin_len) {
        bail!(
            "`{}` is truncated or does not match `{}`: sequence {last} ({size} tokens at byte \
             {pointer}) lies past its end ({bin_len} bytes)",
            path_text(&bin_path),
            path_text(&idx_path),
        );
    }
    Ok(())
}

/// A hidden temporary beside `path`, renamed onto it when complete.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes one indexed dataset: documents of sequences of token ids.
pub struct IndexedWriter {
    dtype: TokenDType,
    bin_path: PathBuf,
    idx_path: PathBuf,
    bin_tmp: PathBuf,
    bin: Option<BufWriter<std::fs::File>>,
    sizes: Vec<i32>,
    doc_idx: Vec<i64>,
    tokens: u64,
    scratch: Vec<u8>,
}

impl IndexedWriter {
    /// Starts `prefix.bin`/`prefix.idx`. Existing files are replaced only when finished,
    /// and only with `overwrite`.
    pub fn create(prefix: &str, dtype: TokenDType, overwrite: bool) -> Result<IndexedWriter> {
        let (bin_path, idx_path) = paths(prefix);
        if !overwrite {
            for p in [&bin_path, &idx_path] {
                if p.exists() {
                    bail!("`{}` exists; pass --overwrite to replace it", path_text(p));
                }
            }
        }
        if let Some(dir) = bin_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the folder `{}`", path_text(dir)))?;
        }
        let bin_tmp = temporary(&bin_path);
        let file = std::fs::File::create(&bin_tmp)
            .with_context(|| format!("cannot create `{}`", path_text(&bin_tmp)))?;
        Ok(IndexedWriter {
            dtype,
            bin_path,
            idx_path,
            bin_tmp,
            bin: Some(BufWriter::with_capacity(1 << 20, file)),
            sizes: Vec::new(),
            doc_idx: vec![0],
            tokens: 0,
            scratch: Vec::new(),
        })
    }

    pub fn dtype(&self) -> TokenDType {
        self.dtype
    }

    /// Appends one sequence (Megatron's `add_item`).
    pub fn add_sequence(&mut self, ids: &[u32]) -> Result<()> {
        self.scratch.clear();
        for &id in ids {
            match self.dtype {
                TokenDType::U16 => {
                    let v = u16::try_from(id).with_context(|| {
                        format!("token id {id} does not fit the dataset's uint16")
                    })?;
                    self.scratch.extend_from_slice(&v.to_le_bytes());
                }
                TokenDType::I32 => {
                    let v = i32::try_from(id).with_context(|| {
                        format!("token id {id} does not fit the dataset's int32")
                    })?;
                    self.scratch.extend_from_slice(&v.to_le_bytes());
                }
                other => bail!("internal error: writing {other:?} datasets is not supported"),
            }
        }
        let size = i32::try_from(ids.len())
            .with_context(|| format!("a sequence of {} tokens is too long", ids.len()))?;
        let bin = self
            .bin
            .as_mut()
            .context("internal error: writer finished")?;
        bin.write_all(&self.scratch)
            .with_context(|| format!("cannot write `{}`", path_text(&self.bin_tmp)))?;
        self.sizes.push(size);
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// Closes the current document (Megatron's `end_document`).
    pub fn end_document(&mut self) {
        self.doc_idx.push(self.sizes.len() as i64);
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn documents(&self) -> usize {
        self.doc_idx.len() - 1
    }

    pub fn sequences(&self) -> usize {
        self.sizes.len()
    }

    /// The `.idx` bytes for what was written.
    fn index_bytes(&self) -> Vec<u8> {
        let item = self.dtype.size() as i64;
        let mut out = Vec::with_capacity(34 + self.sizes.len() * 12 + self.doc_idx.len() * 8);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.push(self.dtype.code());
        out.extend_from_slice(&(self.sizes.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.doc_idx.len() as u64).to_le_bytes());
        for s in &self.sizes {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let mut pointer = 0i64;
        for &s in &self.sizes {
            out.extend_from_slice(&pointer.to_le_bytes());
            pointer += s as i64 * item;
        }
        for d in &self.doc_idx {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out
    }

    /// Writes the index and moves both files into place.
    pub fn finish(mut self) -> Result<(PathBuf, PathBuf)> {
        let bin = self.bin.take().context("internal error: writer finished")?;
        let file = bin
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write `{}`", path_text(&self.bin_tmp)))?;
        file.sync_all()
            .with_context(|| format!("cannot write `{}`", path_text(&self.bin_tmp)))?;
        drop(file);
        crate::driver::write_atomic(&self.idx_path, &self.index_bytes())
            .with_context(|| format!("cannot write `{}`", path_text(&self.idx_path)))?;
        std::fs::rename(&self.bin_tmp, &self.bin_path).with_context(|| {
            format!(
                "cannot move `{}` to `{}`",
                path_text(&self.bin_tmp),
                path_text(&self.bin_path)
            )
        })?;
        Ok((self.bin_path.clone(), self.idx_path.clone()))
    }
}

impl Drop for IndexedWriter {
    /// An unfinished writer removes its temporary: nothing half-written is left.
    fn drop(&mut self) {
        if self.bin.is_some() {
            self.bin = None;
            let _ = std::fs::remove_file(&self.bin_tmp);
        }
    }
}
