//! Where a run's files go when the command line names no folder, and what a second
//! `fmoec run` of the same file does there.
//!
//! A file's runs form a series of folder pairs: the first run writes its metrics to
//! `runs/<model>` and its checkpoints to the train block's `checkpoint` dir (or
//! `runs/<model>/checkpoints`); run `k` (k ≥ 2) writes to `runs/<model>-k` and `<dir>-k`.
//! A new `fmoec run` looks at the newest run of the series: if its latest checkpoint stopped
//! before the end of its schedule (and the schedule is the one asked for now), it continues
//! that run; otherwise it starts the next run of the series beside it. Either way it says
//! which, and nothing already written is touched.
//!
//! Reads only folder listings and the latest checkpoint's manifest ([`checkpoint::run_record`]);
//! knows nothing about training or the command line.

use std::path::{Path, PathBuf};

use crate::diag::path_text;
use crate::runtime::checkpoint;

/// The two folders one run writes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFolders {
    /// `metrics.jsonl`, `summary.json`, `plot.png`.
    pub out: PathBuf,
    /// `step-*` checkpoints and `latest`.
    pub checkpoints: PathBuf,
}

/// What `fmoec run` does with the series when the command line names no folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The series is empty: its first run.
    First(RunFolders),
    /// Continue the newest run from its latest checkpoint.
    Continue {
        folders: RunFolders,
        /// Steps its latest checkpoint completed.
        step: u64,
        total_steps: u64,
    },
    /// The newest run cannot be continued (`why`): start the next one.
    Next {
        previous: RunFolders,
        why: String,
        folders: RunFolders,
    },
}

impl Choice {
    pub fn folders(&self) -> &RunFolders {
        match self {
            Choice::First(f)
            | Choice::Continue { folders: f, .. }
            | Choice::Next { folders: f, .. } => f,
        }
    }

    /// Whether the run starts from the newest run's latest checkpoint.
    pub fn resumes(&self) -> bool {
        matches!(self, Choice::Continue { .. })
    }

    /// One line saying what the run does and where.
    pub fn describe(&self) -> String {
        let place = |f: &RunFolders| {
            format!(
                "metrics in `{}`, checkpoints in `{}`",
                path_text(&f.out),
                path_text(&f.checkpoints)
            )
        };
        match self {
            Choice::First(f) => format!("a new run: {}", place(f)),
            Choice::Continue {
                folders,
                step,
                total_steps,
            } => format!(
                "{}; --out DIR starts a separate run)",
                continuing(folders, *step, *total_steps)
            ),
            Choice::Next {
                previous,
                why,
                folders,
            } => format!(
                "`{}` {why}, so this is a new run beside it: {}",
                path_text(&previous.checkpoints),
                place(folders)
            ),
        }
    }
}

/// "continuing the unfinished run in `CKPT` from step N of T (metrics in `OUT`", the start
/// of the line a continued run prints, however it was asked for (again, or `--resume`); the
/// caller closes the parenthesis.
pub fn continuing(folders: &RunFolders, step: u64, total_steps: u64) -> String {
    format!(
        "continuing the unfinished run in `{}` from step {step} of {total_steps} (metrics in `{}`",
        path_text(&folders.checkpoints),
        path_text(&folders.out)
    )
}

/// The series of one model's runs.
#[derive(Clone, Debug)]
pub struct Series {
    /// Where run `k` keeps its metrics: `<runs>/<model>` and `<runs>/<model>-k`.
    runs: PathBuf,
    model: String,
    /// The train block's checkpoint dir, if it names one.
    declared: Option<PathBuf>,
}

impl Series {
    /// The runs of `model` under `runs` (normally `runs/`), with checkpoints in `declared`
    /// (the train block's `checkpoint` dir) or inside each run's folder.
    pub fn new(runs: impl Into<PathBuf>, model: &str, declared: Option<PathBuf>) -> Series {
        Series {
            runs: runs.into(),
            model: model.to_string(),
            declared,
        }
    }

    /// The folders of run `k` (1-based).
    pub fn folders(&self, k: u64) -> RunFolders {
        let suffixed = |name: &str| {
            if k == 1 {
                name.to_string()
            } else {
                format!("{name}-{k}")
            }
        };
        let out = self.runs.join(suffixed(&self.model));
        let checkpoints = match &self.declared {
            None => out.join("checkpoints"),
            Some(dir) if k == 1 => dir.clone(),
            Some(dir) => match dir.file_name() {
                Some(name) => dir.with_file_name(suffixed(&name.to_string_lossy())),
                // `dir = "."` and the like: the later runs get folders inside it
                None => dir.join(format!("run-{k}")),
            },
        };
        RunFolders { out, checkpoints }
    }

    /// Whether run `k` has written anything a new run could lose.
    fn in_use(&self, k: u64) -> bool {
        let f = self.folders(k);
        f.out.join("metrics.jsonl").exists()
            || f.out.join("summary.json").exists()
            || f.checkpoints.join(checkpoint::LATEST).exists()
    }

    /// Numbers of the runs whose folders exist (candidates for [`Series::newest`]).
    fn numbers(&self) -> Vec<u64> {
        let mut found = vec![1];
        let mut scan = |dir: &Path, stem: &str| {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let k = name
                    .strip_prefix(stem)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .filter(|&k| k >= 2);
                if let Some(k) = k {
                    found.push(k);
                }
            }
        };
        scan(&self.runs, &self.model);
        if let Some(dir) = &self.declared {
            if let (Some(name), Some(parent)) = (dir.file_name(), dir.parent()) {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                scan(parent, &name.to_string_lossy());
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// The newest run that wrote something, if any.
    pub fn newest(&self) -> Option<u64> {
        self.numbers().into_iter().rev().find(|&k| self.in_use(k))
    }

    /// The folders of the newest run (the first run's when there is none): where `--resume`
    /// and `--sample` look without a folder.
    pub fn newest_folders(&self) -> RunFolders {
        self.folders(self.newest().unwrap_or(1))
    }

    /// What a run of `total_steps` steps does: continue the newest run if its latest
    /// checkpoint stopped before the end of the same schedule, else start the next run.
    pub fn choose(&self, total_steps: u64) -> Choice {
        let Some(k) = self.newest() else {
            return Choice::First(self.folders(1));
        };
        let previous = self.folders(k);
        let why = if !previous.checkpoints.join(checkpoint::LATEST).exists() {
            format!(
                "holds no checkpoint of the run whose metrics are in `{}` (it stopped before its first one)",
                path_text(&previous.out)
            )
        } else {
            match checkpoint::run_record(&previous.checkpoints) {
                Err(e) => format!("has a latest checkpoint that cannot be read ({e:#})"),
                Ok(record) => {
                    let theirs = record.total_steps.unwrap_or(total_steps);
                    if record.step >= theirs {
                        format!("holds a finished run ({} of {theirs} steps)", record.step)
                    } else if theirs != total_steps {
                        format!(
                            "holds a run of {theirs} steps stopped at step {}, and this run has {total_steps}",
                            record.step
                        )
                    } else {
                        return Choice::Continue {
                            folders: previous,
                            step: record.step,
                            total_steps,
                        };
                    }
                }
            }
        };
        Choice::Next {
            previous,
            why,
            folders: self.folders(k + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_runs_get_numbered_folders() {
        let s = Series::new("runs", "tiny", Some("ckpt/tiny".into()));
        assert_eq!(
            s.folders(1),
            RunFolders {
                out: "runs/tiny".into(),
                checkpoints: "ckpt/tiny".into()
            }
        );
        assert_eq!(
            s.folders(3),
            RunFolders {
                out: "runs/tiny-3".into(),
                checkpoints: "ckpt/tiny-3".into()
            }
        );
        let s = Series::new("runs", "tiny", None);
        assert_eq!(
            s.folders(2).checkpoints,
            PathBuf::from("runs/tiny-2/checkpoints")
        );
    }

    #[test]
    fn an_empty_series_starts_its_first_run_and_metrics_alone_count_as_used() {
        let dir = tempfile::tempdir().unwrap();
        let s = Series::new(dir.path().join("runs"), "tiny", None);
        assert_eq!(s.choose(10), Choice::First(s.folders(1)));
        // a run that died before its first checkpoint left metrics: never overwritten
        std::fs::create_dir_all(s.folders(1).out).unwrap();
        std::fs::write(s.folders(1).out.join("metrics.jsonl"), "{}\n").unwrap();
        match s.choose(10) {
            Choice::Next { folders, why, .. } => {
                assert_eq!(folders, s.folders(2));
                assert!(why.contains("no checkpoint"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // an empty folder left behind is not a run
        std::fs::create_dir_all(s.folders(7).out).unwrap();
        assert_eq!(s.newest(), Some(1));
    }
}
