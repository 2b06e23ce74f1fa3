//! `metrics.jsonl`, one JSON object per step, written as each step ends (so a log reader or a
//! crash sees every finished step). A resumed run keeps the lines of the steps before its
//! checkpoint byte for byte, as they were written (a resumed run can be diffed against an
//! uninterrupted one), and drops the lines of steps after it (a run that crashed may have
//! logged past its last checkpoint); a fresh run never overwrites an earlier run's lines.
//! Knows the file's format, nothing about training.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::diag::path_text;

/// The open `metrics.jsonl` of a run.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

/// The one field a kept line is judged by.
#[derive(Deserialize)]
struct StepOnly {
    step: u64,
}

impl MetricsLog {
    /// Creates `dir/metrics.jsonl` for a fresh run. Refused when the file already holds
    /// lines: they are an earlier run's, and only `--resume` continues it.
    pub fn create(dir: &Path) -> Result<MetricsLog> {
        let path = dir.join("metrics.jsonl");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            bail!(
                "`{}` holds the metrics of an earlier run, which left no checkpoint to resume; \
                 move it away or choose another --out",
                path_text(&path)
            );
        }
        let file =
            File::create(&path).with_context(|| format!("cannot write `{}`", path_text(&path)))?;
        Ok(MetricsLog { path, file })
    }

    /// Opens `dir/metrics.jsonl` of a run resumed after `step` steps: the lines of steps up
    /// to `step` stay as they are, the rest of the file goes, and new lines follow them.
    pub fn resume(dir: &Path, step: u64) -> Result<MetricsLog> {
        let path = dir.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot write `{}`", path_text(&path)))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .with_context(|| format!("cannot read `{}`", path_text(&path)))?;
        let keep = kept_prefix(&text, step);
        file.set_len(keep as u64)
            .and_then(|()| file.seek(SeekFrom::End(0)).map(drop))
            .with_context(|| format!("cannot write `{}`", path_text(&path)))?;
        if keep > 0 && text[keep - 1] != b'\n' {
            file.write_all(b"\n")?;
        }
        Ok(MetricsLog { path, file })
    }

    /// Appends one step's line.
    pub fn append(&mut self, record: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .with_context(|| format!("cannot write `{}`", path_text(&self.path)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Bytes of `text` made of whole lines of steps `<= step`, up to the first line that is not
/// (a later step, or a line cut short by a crash).
fn kept_prefix(text: &[u8], step: u64) -> usize {
    let mut end = 0;
    for line in text.split_inclusive(|&b| b == b'\n') {
        match serde_json::from_slice::<StepOnly>(line) {
            Ok(s) if s.step <= step => end += line.len(),
            _ => break,
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_lines_end_at_the_resumed_step_or_a_broken_line() {
        let text = b"{\"step\":1,\"loss\":1.0000000000000002}\n{\"step\":2}\n{\"step\":3}\n{\"st";
        assert_eq!(kept_prefix(text, 2), 48);
        assert_eq!(kept_prefix(text, 0), 0);
        assert_eq!(kept_prefix(text, 9), text.len() - 4);
    }
}
