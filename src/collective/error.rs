//! The one error type of collective operations: which group, which operation, which
//! call site, and what went wrong.

use std::fmt;
use std::time::Duration;

/// A failed collective call. Its message reads
/// `expert group [0,2]: all_to_all_v at "step 7, layer 1 dispatch": timed out after 5s waiting for rank 2`.
#[derive(Debug)]
pub struct CollectiveError {
    /// The group's label (`expert group [0,2]`).
    pub group: String,
    /// The operation (`all_reduce_sum`, `all_to_all_v`, ...).
    pub op: &'static str,
    /// The caller's label for the call site.
    pub at: String,
    /// Boxed to keep `Result<_, CollectiveError>` small.
    pub kind: Box<ErrorKind>,
}

/// What went wrong. Ranks are global ranks.
#[derive(Debug)]
pub enum ErrorKind {
    /// Peers did not arrive before the deadline.
    Timeout {
        waited: Duration,
        missing: Vec<usize>,
    },
    /// A peer dropped its handle (it returned, failed or panicked) before sending what
    /// this call needs.
    PeerGone { peer: usize, panicked: bool },
    /// A peer is at a different operation: the group's ranks called collectives in a
    /// different order.
    Mismatch {
        peer: usize,
        theirs: String,
        ours: String,
    },
    /// The arguments are inconsistent (counts that do not add up, shapes that differ).
    Invalid(String),
    /// A tensor operation failed.
    Tensor(tch::TchError),
    /// The communication library failed (an NCCL or CUDA error, a communicator that
    /// was aborted after an earlier timeout, a peer that NCCL reports as failed).
    Transport(String),
}

impl CollectiveError {
    pub(crate) fn new(
        group: &impl fmt::Display,
        op: &'static str,
        at: &str,
        kind: ErrorKind,
    ) -> Self {
        CollectiveError {
            group: group.to_string(),
            op,
            at: at.to_string(),
            kind: Box::new(kind),
        }
    }
}

/// How a transport's message ends when the library reports a peer's failure as the cause
/// (NCCL's `ncclRemoteError`: a peer rank failed or exited), so that
/// [`CollectiveError::follows_another_rank`] knows it.
pub(crate) const PEER_FAILED: &str = "a peer rank failed or exited";

impl CollectiveError {
    /// Whether this rank failed only because a peer left first (the peer's error says why):
    /// a peer that dropped its handle, or a transport that reports a failed peer.
    pub fn follows_another_rank(&self) -> bool {
        match self.kind.as_ref() {
            ErrorKind::PeerGone { .. } => true,
            ErrorKind::Transport(message) => message.contains(PEER_FAILED),
            _ => false,
        }
    }
}

/// For `map_err`: a failed tensor operation within operation `op` of `group`, called at `at`.
pub(crate) fn tensor_failure(
    group: &impl fmt::Display,
    op: &'static str,
    at: &str,
) -> impl Fn(tch::TchError) -> CollectiveError {
    let group = group.to_string();
    let at = at.to_string();
    move |e| CollectiveError::new(&group, op, &at, ErrorKind::Tensor(e))
}

impl fmt::Display for CollectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} at \"{}\": ", self.group, self.op, self.at)?;
        match self.kind.as_ref() {
            ErrorKind::Timeout { waited, missing } => {
                let ranks: Vec<String> = missing.iter().map(|r| r.to_string()).collect();
                let noun = if missing.len() == 1 { "rank" } else { "ranks" };
                write!(f, "timed out after {waited:?} waiting for {noun} {}", ranks.join(", "))
            }
            ErrorKind::PeerGone { peer, panicked: true } => {
                write!(f, "rank {peer} panicked and left the group")
            }
            ErrorKind::PeerGone { peer, panicked: false } => {
                write!(f, "rank {peer} left the group (dropped its handle) before this call completed")
            }
            ErrorKind::Mismatch { peer, theirs, ours } => write!(
                f,
                "rank {peer} is at {theirs} while this rank is at {ours}: the ranks call collectives in different orders"
            ),
            ErrorKind::Invalid(message) => f.write_str(message),
            ErrorKind::Tensor(e) => write!(f, "tensor operation failed: {e}"),
            ErrorKind::Transport(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for CollectiveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.kind.as_ref() {
            ErrorKind::Tensor(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: ErrorKind) -> CollectiveError {
        CollectiveError::new(&"data group [0,1]", "all_reduce_sum", "step 3", kind)
    }

    /// A rank whose transport reports a failed peer (NCCL's remote error, also when it is
    /// the reason a communicator was aborted) failed after another rank did, as a rank whose
    /// peer dropped its handle; a timeout or another transport error is a failure of its own.
    #[test]
    fn a_reported_peer_failure_follows_another_rank() {
        let remote = format!(
            "NCCL error: remote process exited or there was a network error; {PEER_FAILED}"
        );
        assert!(failure(ErrorKind::Transport(remote.clone())).follows_another_rank());
        let aborted = format!("the communicator was aborted after an earlier error: {remote}");
        assert!(failure(ErrorKind::Transport(aborted)).follows_another_rank());
        assert!(failure(ErrorKind::PeerGone {
            peer: 1,
            panicked: false
        })
        .follows_another_rank());
        assert!(!failure(ErrorKind::Transport(
            "NCCL error: unhandled system error".into()
        ))
        .follows_another_rank());
        let timeout = ErrorKind::Timeout {
            waited: Duration::from_secs(5),
            missing: vec![1],
        };
        assert!(!failure(timeout).follows_another_rank());
    }
}
