//! Git's unified diff, as `git apply` reads it: blob ids, `diff --git` headers, hunks.
//!
//! Owns the text format only; it knows nothing about Megatron or models. A [`FileDiff`]
//! is built from the original file's blob id, the patched file's blob id and the hunks.

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
