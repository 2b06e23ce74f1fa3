//! Stop requests from outside: SIGINT (Ctrl-C) and SIGTERM (what a cluster's scheduler sends
//! before it kills a job, and what `kill` sends by default) both ask the trainer to finish the
//! current step, write a checkpoint and exit with `128 + signal` (130, 143), so `--resume`
//! continues where it stopped.
//!
//! The handler only records the signal's number (an atomic store, which is all a signal
//! handler may safely do); the trainer polls [`requested`] between steps. Knows nothing about
//! training or processes.

use std::sync::atomic::{AtomicI32, Ordering};

use crate::diag::path_text;

/// The number of the last stop signal received, 0 for none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
static INSTALLED: std::sync::Once = std::sync::Once::new();

/// SIGINT's number (Ctrl-C): exit status 130.
pub const SIGINT: i32 = 2;
/// SIGTERM's number: exit status 143.
pub const SIGTERM: i32 = 15;

#[cfg(unix)]
extern "C" fn record(signal: libc::c_int) {
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM (once per process). Afterwards neither signal
/// ends the process by itself: the trainer (or the launcher, which passes it on to its ranks)
/// sees it in [`requested`] and stops in order.
pub fn install() {
    INSTALLED.call_once(|| {
        #[cfg(unix)]
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `record` is async-signal-safe (one atomic store), and the `sigaction`
            // struct is fully initialised (zeroed, then handler, an empty mask and flags)
            // before it is passed by pointer. SA_RESTART keeps the checkpoint's file writes
            // from failing with EINTR when a signal arrives during them.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = record as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                action.sa_flags = libc::SA_RESTART;
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
    });
}

/// The stop signal received since the last [`clear`], if any.
pub fn requested() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Forgets a stop signal received before now (a new run starts).
pub fn clear() {
    RECEIVED.store(0, Ordering::SeqCst);
}

/// `SIGINT (Ctrl-C)`, `SIGTERM` or `signal N`.
pub fn name(signal: i32) -> String {
    match signal {
        SIGINT => "SIGINT (Ctrl-C)".into(),
        SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// What a run says when a signal stopped it at `step` (`None`: a stop without a signal),
/// with the checkpoint it saved there: the trainer's line, and the run's W0090 in JSON.
pub fn stopped_text(signal: Option<i32>, step: u64, saved: Option<&std::path::Path>) -> String {
    let by = signal.map_or("a stop request".into(), name);
    match saved {
        Some(saved) => format!(
            "stopped by {by}: saved step {step} to `{}`; continue with --resume",
            path_text(saved)
        ),
        None => format!("stopped by {by} after step {step}"),
    }
}

/// The shell's exit status for a process stopped by `signal`: 128 + its number.
pub fn exit_status(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}
