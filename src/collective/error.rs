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

impl CollectiveError {
    /// Whether this rank failed only because a peer left first (the peer's error says why).
    pub fn follows_another_rank(&self) -> bool {
        matches!(self.kind.as_ref(), ErrorKind::PeerGone { .. })
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
