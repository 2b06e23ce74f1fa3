//! The Megatron-LM patch as data: small targeted edits, each anchored by a few context
//! lines, turned into a unified diff either from the recorded release or from a checkout.
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

use super::gitdiff::{self, FileDiff, Hunk};

/// One change: `before` + `remove` + `after` are consecutive lines of the original file
/// (`before` starting at the 1-based `line`); `remove` is replaced by `add`.
/// An empty `after` anchors the edit at the end of the file.
#[derive(Debug)]
pub struct Edit {
    pub line: usize,
    pub before: &'static [&'static str],
    pub remove: &'static [&'static str],
    pub add: &'static [&'static str],
    pub after: &'static [&'static str],
}

/// Every edit of one file, in file order, with the blob ids of the release's file before
/// and after the edits.
#[derive(Debug)]
pub struct FileEdits {
    pub path: &'static str,
    pub original_blob: &'static str,
    pub patched_blob: &'static str,
    pub edits: &'static [Edit],
}

/// A Megatron-LM release the patch is recorded for.
#[derive(Debug)]
pub struct ReleaseEdits {
    pub version: &'static str,
    pub commit: &'static str,
    pub files: &'static [FileEdits],
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

fn edit_lines(e: &Edit) -> impl Iterator<Item = &'static str> + '_ {
    e.before.iter().chain(e.remove).chain(e.after).copied()
}

fn hunk_body(e: &Edit) -> Vec<String> {
    let mut lines = Vec::new();
    lines.extend(e.before.iter().map(|l| format!(" {l}")));
    lines.extend(e.remove.iter().map(|l| format!("-{l}")));
    lines.extend(e.add.iter().map(|l| format!("+{l}")));
    lines.extend(e.after.iter().map(|l| format!(" {l}")));
    lines
}

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
                lines: hunk_body(e),
            };
            delta += e.add.len() as isize - e.remove.len() as isize;
            h
        })
        .collect()
}

/// The diff of the recorded release, without reading any Megatron file.
pub fn diff_recorded(release: &ReleaseEdits) -> String {
    release
        .files
        .iter()
        .map(|f| {
            let starts: Vec<usize> = f.edits.iter().map(|e| e.line).collect();
            FileDiff {
                path: f.path.to_string(),
                old_blob: f.original_blob.to_string(),
                new_blob: f.patched_blob.to_string(),
                hunks: hunks(f.edits, &starts),
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
        let want: Vec<&str> = edit_lines(e).collect();
        let n = want.len();
        let candidates = (next..=lines.len().saturating_sub(n))
            .filter(|&i| i + n <= lines.len() && lines[i..i + n] == want[..])
            .filter(|&i| !e.after.is_empty() || i + n == lines.len());
        let target = e.line.saturating_sub(1);
        let found = candidates.min_by_key(|&i| (i.abs_diff(target), i));
        let Some(i) = found else {
            let patched: Vec<&str> = e
                .before
                .iter()
                .chain(e.add)
                .chain(e.after)
                .copied()
                .collect();
            if !e.add.is_empty() && lines.windows(patched.len()).any(|w| w == &patched[..]) {
                return Err(CheckoutError::AlreadyPatched { path: path.into() });
            }
            return Err(CheckoutError::AnchorMissing {
                path: path.into(),
                line: e.line,
                first: want.first().copied().unwrap_or_default().to_string(),
            });
        };
        out.extend(&lines[next..i]);
        out.extend(e.before);
        out.extend(e.add);
        out.extend(e.after);
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
    release: &ReleaseEdits,
) -> Result<Vec<PatchedFile>, CheckoutError> {
    release
        .files
        .iter()
        .map(|f| {
            let file = root.join(f.path);
            let bytes = std::fs::read(&file).map_err(|e| CheckoutError::Read {
                path: file.display().to_string(),
                message: e.to_string(),
            })?;
            let original = String::from_utf8(bytes).map_err(|_| CheckoutError::NotUtf8 {
                path: f.path.to_string(),
            })?;
            let (patched, starts) = apply(f.path, &original, f.edits)?;
            let diff = FileDiff {
                path: f.path.to_string(),
                old_blob: gitdiff::blob_id(original.as_bytes()),
                new_blob: gitdiff::blob_id(patched.as_bytes()),
                hunks: hunks(f.edits, &starts),
            };
            Ok(PatchedFile {
                path: f.path.to_string(),
                original,
                patched,
                diff,
            })
        })
        .collect()
}

/// The diff computed from a checkout's real files.
pub fn diff_from_checkout(root: &Path, release: &ReleaseEdits) -> Result<String, CheckoutError> {
    Ok(patch_checkout(root, release)?
        .iter()
        .map(|p| p.diff.render())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    static EDITS: &[Edit] = &[
        Edit {
            line: 2,
            before: &["b", "c"],
            remove: &["d"],
            add: &["D1", "D2"],
            after: &["e", "f"],
        },
        Edit {
            line: 8,
            before: &["h", "i"],
            remove: &[],
            add: &["I"],
            after: &[],
        },
    ];

    #[test]
    fn applies_edits_and_numbers_hunks() {
        let text = "a\nb\nc\nd\ne\nf\ng\nh\ni\n";
        let (patched, starts) = apply("t.py", text, EDITS).unwrap();
        assert_eq!(patched, "a\nb\nc\nD1\nD2\ne\nf\ng\nh\ni\nI\n");
        assert_eq!(starts, vec![2, 8]);
        let hs = hunks(EDITS, &starts);
        assert_eq!((hs[1].old_start, hs[1].new_start), (8, 9));
    }

    #[test]
    fn finds_moved_anchor_and_rejects_missing_one() {
        let moved = "x\na\nb\nc\nd\ne\nf\ng\nh\ni\n";
        let (_, starts) = apply("t.py", moved, EDITS).unwrap();
        assert_eq!(starts, vec![3, 9]);
        let err = apply("t.py", "a\nb\nc\nD1\nD2\ne\nf\n", EDITS).unwrap_err();
        assert!(matches!(err, CheckoutError::AlreadyPatched { .. }));
        let err = apply("t.py", "a\nb\nc\nX\ne\nf\n", EDITS).unwrap_err();
        assert!(matches!(err, CheckoutError::AnchorMissing { line: 2, .. }));
        // an end-of-file edit does not match in the middle of the file
        let err = apply("t.py", "a\nb\nc\nd\ne\nf\nh\ni\nz\n", EDITS).unwrap_err();
        assert!(matches!(err, CheckoutError::AnchorMissing { line: 8, .. }));
    }
}
