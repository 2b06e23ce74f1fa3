//! Git's unified diff, as `git apply` reads it: blob ids, `diff --git` headers, hunks.
//!
//! Owns the text format only; it knows nothing about Megatron or models. A [`FileDiff`]
//! is built from the original file's blob id, the patched file's blob id and the hunks, and
//! [`parse`] reads back what [`FileDiff::render`] writes.

use sha1::{Digest, Sha1};

/// Git's object id of a blob: SHA-1 of `"blob <len>\0" + bytes`, in hex.
pub fn blob_id(bytes: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// One hunk: `old_start` is 1-based; `lines` are the body lines with their ' ', '-', '+' prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hunk {
    pub old_start: usize,
    pub new_start: usize,
    pub lines: Vec<String>,
}

impl Hunk {
    fn counts(&self) -> (usize, usize) {
        let old = self.lines.iter().filter(|l| !l.starts_with('+')).count();
        let new = self.lines.iter().filter(|l| !l.starts_with('-')).count();
        (old, new)
    }
}

/// The diff of one existing file (mode 100644).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDiff {
    pub path: String,
    pub old_blob: String,
    pub new_blob: String,
    pub hunks: Vec<Hunk>,
}

impl FileDiff {
    /// The text `git diff --full-index` would print for this file (full 40-hex ids).
    pub fn render(&self) -> String {
        let mut out = format!(
            "diff --git a/{p} b/{p}\nindex {}..{} 100644\n--- a/{p}\n+++ b/{p}\n",
            self.old_blob,
            self.new_blob,
            p = self.path
        );
        for h in &self.hunks {
            let (old, new) = h.counts();
            out.push_str(&format!(
                "@@ -{} +{} @@\n",
                range(h.old_start, old),
                range(h.new_start, new)
            ));
            for l in &h.lines {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Why a unified diff could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line of the diff.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Reads a diff in the form [`FileDiff::render`] writes (`git diff --full-index` of existing
/// files: `diff --git`, `index OLD..NEW 100644`, `---`/`+++`, hunks), checking that each
/// hunk's line counts match its header. `parse(&render(d)) == d` for every diff.
pub fn parse(text: &str) -> Result<Vec<FileDiff>, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut files = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (path, old_blob, new_blob) = file_header(&lines, i)?;
        i += 4;
        let mut hunks = Vec::new();
        while i < lines.len() && lines[i].starts_with("@@ ") {
            hunks.push(hunk(&lines, &mut i)?);
        }
        if hunks.is_empty() {
            return Err(parse_error(i, format!("`{path}` has no hunks")));
        }
        files.push(FileDiff {
            path,
            old_blob,
            new_blob,
            hunks,
        });
    }
    Ok(files)
}

/// The error at the 0-based line `i`.
fn parse_error(i: usize, message: String) -> ParseError {
    ParseError {
        line: i + 1,
        message,
    }
}

/// The four header lines of one file from line `i` (`diff --git`, `index`, `---`, `+++`): its
/// path, old blob id and new blob id.
fn file_header(lines: &[&str], i: usize) -> Result<(String, String, String), ParseError> {
    let Some(paths) = lines[i].strip_prefix("diff --git a/") else {
        return Err(parse_error(
            i,
            format!("expected `diff --git a/...`, found `{}`", lines[i]),
        ));
    };
    let path = paths
        .split_once(" b/")
        .map(|(a, _)| a.to_string())
        .ok_or_else(|| parse_error(i, "a `diff --git` line without ` b/`".into()))?;
    let index = lines
        .get(i + 1)
        .and_then(|l| l.strip_prefix("index "))
        .and_then(|l| l.strip_suffix(" 100644"))
        .and_then(|l| l.split_once(".."))
        .ok_or_else(|| parse_error(i + 1, "expected `index OLD..NEW 100644`".into()))?;
    if lines.get(i + 2) != Some(&format!("--- a/{path}").as_str())
        || lines.get(i + 3) != Some(&format!("+++ b/{path}").as_str())
    {
        return Err(parse_error(
            i + 2,
            format!("expected `--- a/{path}` and `+++ b/{path}`"),
        ));
    }
    Ok((path, index.0.to_string(), index.1.to_string()))
}

/// The hunk whose `@@` header is line `*i`, checked against the header's counts; `*i` moves
/// past its body.
fn hunk(lines: &[&str], i: &mut usize) -> Result<Hunk, ParseError> {
    let header = lines[*i];
    let Some(((old_start, old_count), (new_start, new_count))) = hunk_header(header) else {
        return Err(parse_error(
            *i,
            format!("a malformed hunk header `{header}`"),
        ));
    };
    let at = *i;
    *i += 1;
    let mut body = Vec::new();
    while *i < lines.len() && !lines[*i].starts_with("@@ ") && !lines[*i].starts_with("diff --git ")
    {
        if !matches!(lines[*i].chars().next(), Some(' ' | '-' | '+')) {
            return Err(parse_error(
                *i,
                format!(
                    "a hunk line must start with ' ', '-' or '+': `{}`",
                    lines[*i]
                ),
            ));
        }
        body.push(lines[*i].to_string());
        *i += 1;
    }
    let hunk = Hunk {
        old_start: first_line(old_start, old_count),
        new_start: first_line(new_start, new_count),
        lines: body,
    };
    if hunk.counts() != (old_count, new_count) {
        return Err(parse_error(
            at,
            format!("hunk `{header}` has {:?} lines (old, new)", hunk.counts()),
        ));
    }
    Ok(hunk)
}

/// `@@ -START[,COUNT] +START[,COUNT] @@`: the old and the new (start, count).
fn hunk_header(header: &str) -> Option<((usize, usize), (usize, usize))> {
    let numbers = |part: &str| -> Option<(usize, usize)> {
        let (start, count) = part.split_once(',').unwrap_or((part, "1"));
        Some((start.parse().ok()?, count.parse().ok()?))
    };
    let (old, new) = header
        .strip_prefix("@@ -")?
        .strip_suffix(" @@")?
        .split_once(" +")?;
    Some((numbers(old)?, numbers(new)?))
}

/// A hunk's 1-based first line from its header's start: an empty side (`-0,0`, an insertion
/// at the start of the file) names the line before it; [`range`] writes it back.
fn first_line(start: usize, count: usize) -> usize {
    if count == 0 {
        start + 1
    } else {
        start
    }
}

fn range(start: usize, count: usize) -> String {
    match count {
        1 => format!("{start}"),
        0 => format!("{},0", start.saturating_sub(1)),
        _ => format!("{start},{count}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            blob_id(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        // the empty blob
        assert_eq!(blob_id(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
    }

    #[test]
    fn parses_what_it_renders() {
        let d = FileDiff {
            path: "m/a.py".into(),
            old_blob: "1".repeat(40),
            new_blob: "2".repeat(40),
            hunks: vec![
                Hunk {
                    old_start: 3,
                    new_start: 3,
                    lines: vec![" x".into(), "-y".into(), "+z".into(), "+w".into()],
                },
                Hunk {
                    old_start: 9,
                    new_start: 10,
                    lines: vec![" a".into(), "+b".into()],
                },
            ],
        };
        let text = d.render() + &d.render();
        assert_eq!(parse(&text).unwrap(), vec![d.clone(), d]);
        let bad = "diff --git a/x b/x\nindex 1..2 100644\n--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n a\n";
        assert_eq!(parse(bad).unwrap_err().line, 5);
        assert_eq!(parse("junk\n").unwrap_err().line, 1);
    }

    #[test]
    fn renders_header_and_ranges() {
        let d = FileDiff {
            path: "a.py".into(),
            old_blob: "1".repeat(40),
            new_blob: "2".repeat(40),
            hunks: vec![Hunk {
                old_start: 3,
                new_start: 3,
                lines: vec![
                    " x".into(),
                    "-y".into(),
                    "+z".into(),
                    "+w".into(),
                    " v".into(),
                ],
            }],
        };
        let text = d.render();
        assert!(text.starts_with("diff --git a/a.py b/a.py\nindex 1111"));
        assert!(text.contains("\n@@ -3,3 +3,4 @@\n x\n-y\n+z\n+w\n v\n"));
    }
}
