//! What a training run says while it runs, on stderr: a progress bar on a terminal; where
//! stderr is a file or a pipe (a cluster job's log, CI, `2> log`), plain lines instead, one
//! after the first step, then one whenever `--log-interval` seconds have passed, and one at
//! the last step. Evaluation lines and notes reach both. Knows nothing about training.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The progress display of one run (rank 0's; the other ranks get a silent one).
pub struct Progress {
    how: Display,
    total: u64,
    /// Whether [`Progress::say`] lines are printed (only the rank that speaks for the run).
    speaks: bool,
}

enum Display {
    Bar(indicatif::ProgressBar),
    Lines {
        every: Duration,
        last: Option<Instant>,
    },
    Silent,
}

impl Progress {
    /// `speaks`: this process prints for the run (rank 0); `show`: progress is wanted (no
    /// `--quiet`); lines every `every` when stderr is not a terminal. Starts at `start` of
    /// `total` steps.
    pub fn new(speaks: bool, show: bool, every: Duration, start: u64, total: u64) -> Progress {
        let how = if !(speaks && show) {
            Display::Silent
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .expect("valid template"),
            );
            bar.set_position(start);
            Display::Bar(bar)
        } else {
            Display::Lines { every, last: None }
        };
        Progress { how, total, speaks }
    }

    /// Step `step` is done; `status` describes it (loss, learning rate, throughput, ...).
    /// `last`: no step follows in this process.
    pub fn step(&mut self, step: u64, status: &str, last: bool) {
        let total = self.total;
        match &mut self.how {
            Display::Bar(bar) => {
                bar.set_position(step);
                bar.set_message(status.to_string());
            }
            Display::Lines { every, last: when } => {
                let due = when.is_none_or(|t| t.elapsed() >= *every);
                if due || last {
                    crate::errln!("step {step} of {total} | {status}");
                    *when = Some(Instant::now());
                }
            }
            Display::Silent => {}
        }
    }

    /// A line for the run's log (an evaluation, a warning), above the bar on a terminal.
    pub fn say(&self, line: &str) {
        if !self.speaks {
            return;
        }
        match &self.how {
            Display::Bar(bar) => bar.println(line),
            _ => crate::errln!("{line}"),
        }
    }

    /// A line about long work under way between steps (a checkpoint being written): as
    /// [`Progress::say`], but only where progress is shown (not under `--quiet`).
    pub fn working(&self, line: &str) {
        match &self.how {
            Display::Bar(bar) => bar.println(line),
            Display::Lines { .. } => crate::errln!("{line}"),
            Display::Silent => {}
        }
    }

    /// The run failed: leave the bar where it stopped.
    pub fn abandon(&self) {
        if let Display::Bar(bar) = &self.how {
            bar.abandon();
        }
    }

    /// The run is over: clear the bar (the summary follows).
    pub fn finish(&self) {
        if let Display::Bar(bar) = &self.how {
            bar.finish_and_clear();
        }
    }
}
