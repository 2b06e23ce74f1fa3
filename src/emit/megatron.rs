//! The Megatron-LM patch as data: small targeted edits, each anchored by a few context
//! lines, turned into a unified diff either from the recorded release or from a checkout.
//! Each release's edits are its recorded patch (`megatron.patch` in its template folder),
//! read back into [`Edit`]s.
//!
//! Megatron's source never enters this repository. An [`Edit`] quotes only the handful of
//! lines `git apply` needs around the change (context and removed lines); the rest of each
//! file is known only by its git blob id and line numbers, recorded from the release
//! tree. Two ways to build the diff, which give the same bytes for the recorded release:
//!
//! - [`diff_recorded`]: from the recorded line numbers and blob ids (no checkout needed).
//! - [`diff_from_checkout`]: reads the files of a checkout, finds each edit's lines
//!   (nearest to the recorded line, exact match), applies the edits and computes line
//!   numbers and blob ids from the real bytes. It also works on a tree whose files moved a
//!   little (other commits), and fails clearly when an anchor is gone.
//!
//! The edits are model-independent: everything that depends on the `.fmoe` file lives in
//! the generated Python module the patch imports. That is what makes recorded blob ids of
//! the patched files possible.

use std::fmt;
use std::path::Path;

use super::gitdiff::{self, FileDiff, Hunk, ParseError};
use crate::diag::path_text;

/// One change, a hunk of the recorded patch: its body lines keep their ' ', '-', '+' prefix.
/// The original lines (context and removed) start at the 1-based `line`; a hunk that ends in
/// a change rather than context is anchored at the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    pub line: usize,
    pub body: Vec<String>,
}

impl Edit {
    /// The lines of the original file this edit covers (context and removed lines).
    fn original(&self) -> Vec<&str> {
        self.body
            .iter()
            .filter(|l| !l.starts_with('+'))
            .map(|l| &l[1..])
            .collect()
    }

    /// What they become (context and added lines).
    fn patched(&self) -> Vec<&str> {
        self.body
            .iter()
            .filter(|l| !l.starts_with('-'))
            .map(|l| &l[1..])
            .collect()
    }

    fn at_end_of_file(&self) -> bool {
        self.body.last().is_some_and(|l| !l.starts_with(' '))
    }
}

/// Every edit of one file, in file order, with the blob ids of the release's file before
/// and after the edits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEdits {
    pub path: String,
    pub original_blob: String,
    pub patched_blob: String,
    pub edits: Vec<Edit>,
}

/// The patch of one Megatron-LM release, as recorded in its template folder
/// (`src/emit/templates/<folder>/megatron.patch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleasePatch {
    pub files: Vec<FileEdits>,
}

impl ReleasePatch {
    /// Reads a recorded patch; [`diff_recorded`] renders it back byte for byte.
    pub fn parse(text: &str) -> Result<ReleasePatch, ParseError> {
        let files = gitdiff::parse(text)?
            .into_iter()
            .map(|f| FileEdits {
                path: f.path,
                original_blob: f.old_blob,
                patched_blob: f.new_blob,
                edits: f
                    .hunks
                    .into_iter()
                    .map(|h| Edit {
                        line: h.old_start,
                        body: h.lines,
                    })
                    .collect(),
            })
            .collect();
        Ok(ReleasePatch { files })
    }
}

/// Why a checkout could not be patched.
#[derive(Debug, PartialEq, Eq)]
pub enum CheckoutError {
    Read {
        path: String,
        message: String,
    },
    NotUtf8 {
        path: String,
    },
    CrLf {
        path: String,
    },
    AnchorMissing {
        path: String,
        line: usize,
        first: String,
    },
    AlreadyPatched {
        path: String,
    },
}

impl fmt::Display for CheckoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckoutError::Read { path, message } => write!(f, "cannot read `{path}`: {message}"),
            CheckoutError::NotUtf8 { path } => write!(f, "`{path}` is not UTF-8 text"),
            CheckoutError::CrLf { path } => {
                write!(f, "`{path}` has CRLF line endings; the release uses LF")
            }
            CheckoutError::AlreadyPatched { path } => write!(
                f,
                "`{path}` already has the patch's changes; give an unpatched checkout"
            ),
            CheckoutError::AnchorMissing { path, line, first } => write!(
                f,
                "`{path}` does not contain the lines the patch changes near line {line} \
                 (starting with `{}`); is this the right Megatron-LM release?",
                first.trim()
            ),
        }
    }
}

impl std::error::Error for CheckoutError {}

/// Hunks for edits at the given 1-based start lines (one per edit, in order).
fn hunks(edits: &[Edit], starts: &[usize]) -> Vec<Hunk> {
    let mut delta: isize = 0;
    edits
        .iter()
        .zip(starts)
        .map(|(e, &start)| {
            let h = Hunk {
                old_start: start,
                new_start: (start as isize + delta) as usize,
                lines: e.body.clone(),
            };
            delta += e.patched().len() as isize - e.original().len() as isize;
            h
        })
        .collect()
}

/// The diff of the recorded release, without reading any Megatron file.
pub fn diff_recorded(release: &ReleasePatch) -> String {
    release
        .files
        .iter()
        .map(|f| {
            let starts: Vec<usize> = f.edits.iter().map(|e| e.line).collect();
            FileDiff {
                path: f.path.clone(),
                old_blob: f.original_blob.clone(),
                new_blob: f.patched_blob.clone(),
                hunks: hunks(&f.edits, &starts),
            }
            .render()
        })
        .collect()
}

/// A file of a checkout with the edits applied.
pub struct PatchedFile {
    pub path: String,
    pub original: String,
    pub patched: String,
    pub diff: FileDiff,
}

/// Applies one file's edits to its text; returns the patched text and the edits' start lines.
pub fn apply(
    path: &str,
    text: &str,
    edits: &[Edit],
) -> Result<(String, Vec<usize>), CheckoutError> {
    if text.contains("\r\n") {
        return Err(CheckoutError::CrLf { path: path.into() });
    }
    let ends_with_newline = text.ends_with('\n');
    let body = text.strip_suffix('\n').unwrap_or(text);
    let lines: Vec<&str> = if text.is_empty() {
        Vec::new()
    } else {
        body.split('\n').collect()
    };
    let mut starts = Vec::new();
    let mut out: Vec<&str> = Vec::new();
    let mut next = 0usize; // first original line not yet copied
    for e in edits {
        let want = e.original();
        let n = want.len();
        let candidates = (next..=lines.len().saturating_sub(n))
            .filter(|&i| i + n <= lines.len() && lines[i..i + n] == want[..])
            .filter(|&i| !e.at_end_of_file() || i + n == lines.len());
        let target = e.line.saturating_sub(1);
        let found = candidates.min_by_key(|&i| (i.abs_diff(target), i));
        let Some(i) = found else {
            let patched = e.patched();
            if patched != want && lines.windows(patched.len()).any(|w| w == &patched[..]) {
                return Err(CheckoutError::AlreadyPatched { path: path.into() });
            }
            return Err(CheckoutError::AnchorMissing {
                path: path.into(),
                line: e.line,
                first: want.first().copied().unwrap_or_default().to_string(),
            });
        };
        out.extend(&lines[next..i]);
        out.extend(e.patched());
        next = i + n;
        starts.push(i + 1);
    }
    out.extend(&lines[next..]);
    let mut patched = out.join("\n");
    if ends_with_newline || lines.is_empty() {
        patched.push('\n');
    }
    Ok((patched, starts))
}

/// Reads the release's files from `root` (a Megatron-LM checkout) and patches them.
pub fn patch_checkout(
    root: &Path,
    release: &ReleasePatch,
) -> Result<Vec<PatchedFile>, CheckoutError> {
    release
        .files
        .iter()
        .map(|f| {
            let file = root.join(&f.path);
            let bytes = std::fs::read(&file).map_err(|e| CheckoutError::Read {
                path: path_text(&file),
                message: e.to_string(),
            })?;
            let original = String::from_utf8(bytes).map_err(|_| CheckoutError::NotUtf8 {
                path: f.path.clone(),
            })?;
            let (patched, starts) = apply(&f.path, &original, &f.edits)?;
            let diff = FileDiff {
                path: f.path.clone(),
                old_blob: gitdiff::blob_id(original.as_bytes()),
                new_blob: gitdiff::blob_id(patched.as_bytes()),
                hunks: hunks(&f.edits, &starts),
            };
            Ok(PatchedFile {
                path: f.path.clone(),
                original,
                patched,
                diff,
            })
        })
        .collect()
}

/// The diff computed from a checkout's real files.
pub fn diff_from_checkout(root: &Path, release: &ReleasePatch) -> Result<String, CheckoutError> {
    Ok(patch_checkout(root, release)?
        .iter()
        .map(|p| p.diff.render())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edits() -> Vec<Edit> {
        let body = |ls: &[&str]| ls.iter().map(|l| l.to_string()).collect();
        vec![
            Edit {
                line: 2,
                body: body(&[" b", " c", "-d", "+D1", "+D2", " e", " f"]),
            },
            Edit {
                line: 8,
                body: body(&[" h", " i", "+I"]),
            },
        ]
    }

    #[test]
    fn applies_edits_and_numbers_hunks() {
        let text = "a\nb\nc\nd\ne\nf\ng\nh\ni\n";
        let (patched, starts) = apply("t.py", text, &edits()).unwrap();
        assert_eq!(patched, "a\nb\nc\nD1\nD2\ne\nf\ng\nh\ni\nI\n");
        assert_eq!(starts, vec![2, 8]);
        let hs = hunks(&edits(), &starts);
        assert_eq!((hs[1].old_start, hs[1].new_start), (8, 9));
    }

    #[test]
    fn finds_moved_anchor_and_rejects_missing_one() {
        let moved = "x\na\nb\nc\nd\ne\nf\ng\nh\ni\n";
        let (_, starts) = apply("t.py", moved, &edits()).unwrap();
        assert_eq!(starts, vec![3, 9]);
        let err = apply("t.py", "a\nb\nc\nD1\nD2\ne\nf\n", &edits()).unwrap_err();
        assert!(matches!(err, CheckoutError::AlreadyPatched { .. }));
        let err = apply("t.py", "a\nb\nc\nX\ne\nf\n", &edits()).unwrap_err();
        assert!(matches!(err, CheckoutError::AnchorMissing { line: 2, .. }));
        // an end-of-file edit does not match in the middle of the file
        let err = apply("t.py", "a\nb\nc\nd\ne\nf\nh\ni\nz\n", &edits()).unwrap_err();
        assert!(matches!(err, CheckoutError::AnchorMissing { line: 8, .. }));
    }

    #[test]
    fn a_parsed_patch_renders_back_byte_for_byte() {
        let text = FileDiff {
            path: "megatron/t.py".into(),
            old_blob: "1".repeat(40),
            new_blob: "2".repeat(40),
            hunks: hunks(&edits(), &[2, 8]),
        }
        .render();
        let release = ReleasePatch::parse(&text).unwrap();
        assert_eq!(release.files[0].edits, edits());
        assert_eq!(diff_recorded(&release), text);
    }
}
