//! `collective`: process groups and the communication a multi-rank MoE training needs.
//!
//! This module owns:
//! - the [`Collective`] trait: one rank's handle to one process group, with every
//!   operation bounded by a timeout and every error naming the group, the operation
//!   and the caller's label (`"step 12, layer 3 dispatch"`), so a hang becomes a
//!   message instead of a frozen job;
//! - [`Groups`]: one rank's handles for its data, expert, expert-data, gate, pipeline and
//!   embedding groups, built from a [`GroupLayout`] (lists of rank lists that the planner
//!   computes), and its tensor group ([`tensor_groups`], [`Groups::set_tensor`]);
//! - point-to-point transfers ([`Collective::send_recv`]) between pipeline stages;
//! - [`local`]: an in-process implementation over CPU threads, so tests exercise
//!   multi-rank behaviour without GPUs; [`tcp`]: the same between processes (CPU ranks on
//!   several processes or machines), connected through the [`rendezvous`]; both are one
//!   [`MessageCollective`], the operations written once over a message transport;
//! - the expert-parallel MoE exchange ([`exchange_experts`]) with its explicit backward,
//!   and FasterMoE's smart schedule and dynamic shadowing of it
//!   ([`exchange_experts_with`], [`ExchangeOptions`]),
//!   and the [`Tape`] that runs a backward pass in segments around autograd cuts
//!   (tch has no custom autograd functions), with Megatron's tensor-parallel region
//!   operators ([`Tape::copy_to_tensor_region`], [`reduce_from_tensor_region`]);
//! - gradient reduction by parameter kind ([`reduce_gradients`]) and the global
//!   gradient-norm clipping with experts spread over ranks ([`clip_global_norm`]);
//! - [`reshard_experts`]: moving stacked expert tensors from one expert placement to
//!   another (checkpoints saved on N ranks, loaded on M).
//!
//! It must not know about models, gates, optimizers, checkpoint files or the `.fmoe`
//! language: it moves tensors between ranks and keeps the bookkeeping that makes a
//! split run equal the single-rank run of the same global batch.
//!
//! # Where NCCL goes
//! A GPU implementation is a second type implementing [`Collective`] (planned: a
//! `nccl` submodule behind the `cuda` feature, on the cudarc crate's NCCL bindings):
//! `all_reduce_sum` and `broadcast` map to `ncclAllReduce`/`ncclBroadcast`,
//! `all_gather_counts` to `ncclAllGather` on a small device buffer, `all_to_all_v` to
//! `ncclSend`/`ncclRecv` pairs inside `ncclGroupStart/End`, `barrier` to an all-reduce
//! of one element. Timeouts come from polling `ncclCommGetAsyncError` on a non-blocking
//! communicator and `ncclCommAbort` when the deadline passes. [`Groups::connect`] takes
//! a constructor for such handles, so nothing else in this module changes.
//! That implementation is [`nccl`] (feature `cuda`); [`rendezvous`] exchanges its
//! unique ids over TCP under the torchrun variables and [`launch`] starts one process
//! per GPU (see README.md ("The collective layer")).

mod error;
mod exchange;
mod grads;
mod groups;
pub mod launch;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
mod placement;
pub mod rendezvous;
mod reshard;
pub mod selftest;
mod tape;
pub mod tcp;
mod transport;

pub use error::{CollectiveError, ErrorKind};
pub use exchange::{
    exchange_experts, exchange_experts_with, ExchangeOptions, ExchangeTape, LocalExperts,
    ShadowPolicy,
};
pub use grads::{
    clip_global_norm, clip_global_norm_pipeline, clip_global_norm_tensor_parallel,
    reduce_gradients, sum_partial_gradients, sum_tied_gradients, GradientNorm, ParamKind,
    TensorSplit,
};
pub use groups::{tensor_groups, GroupKind, GroupLabel, GroupLayout, Groups, LayoutError};
pub use placement::{ExpertPlacement, PlacementError};
pub use reshard::{reshard_experts, ReshardError};
pub use tape::{backward_roots, reduce_from_tensor_region, Cut, Tape};
pub use transport::MessageCollective;

use tch::Tensor;

/// Result of a collective operation.
pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// One transfer of a batch of point-to-point transfers ([`Collective::send_recv`]); peers are
/// positions in the group.
pub enum PeerTransfer<'a> {
    /// Send `tensor` to position `to`.
    Send { tensor: &'a Tensor, to: usize },
    /// Receive into `into` (preallocated with the shape and dtype the peer sends) from
    /// position `from`.
    Recv { into: &'a mut Tensor, from: usize },
}

impl PeerTransfer<'_> {
    /// The other rank of the transfer (a group position).
    pub fn peer(&self) -> usize {
        match self {
            PeerTransfer::Send { to, .. } => *to,
            PeerTransfer::Recv { from, .. } => *from,
        }
    }
}

/// One rank's handle to one process group.
///
/// Ranks are positions inside the group (`0..size()`); [`Collective::label`] maps them
/// back to global ranks for messages. Every member must call the same operations in the
/// same order (the in-process implementation checks this and reports a mismatch). `at`
/// is the caller's label for the call site (step, layer, phase); it appears in every
/// error. No operation waits longer than the handle's timeout.
pub trait Collective: Send {
    /// This rank's position in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// The group's kind and global ranks, for messages (`expert group [0,2]`).
    fn label(&self) -> &GroupLabel;
    /// Element-wise sum over the group, in place. Every rank gets the same bits: the
    /// contributions are added in rank order.
    fn all_reduce_sum(&self, tensor: &mut Tensor, at: &str) -> Result<()>;
    /// Every rank's `counts`, indexed by group rank.
    fn all_gather_counts(&self, counts: &[i64], at: &str) -> Result<Vec<Vec<i64>>>;
    /// Variable all-to-all over rows: the first `send_counts[0]` rows of `send` go to
    /// rank 0, the next `send_counts[1]` to rank 1, and so on; the result holds
    /// `recv_counts[s]` rows from each rank `s`, in rank order. Trailing dimensions and
    /// dtype are those of `send`; the counts must agree with the peers' send counts.
    fn all_to_all_v(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
        at: &str,
    ) -> Result<Tensor>;
    /// Copy `root`'s tensor into every rank's `tensor` (same shape and dtype), in place.
    fn broadcast(&self, tensor: &mut Tensor, root: usize, at: &str) -> Result<()>;
    /// Wait until every rank of the group has reached this call.
    fn barrier(&self, at: &str) -> Result<()>;
    /// Point to point: the sends and receives of `transfers` as one batch (one NCCL group of
    /// `ncclSend`/`ncclRecv`), returning when all are done; two ranks that send to each
    /// other in one batch do not wait for each other. Only the ranks named take part, and
    /// between two ranks transfers are matched in the order they are issued (the n-th send
    /// from A to B is B's n-th receive from A, over all batches), so the sender's tensor and
    /// the receiver's must agree in shape and dtype (the in-process and TCP backends check
    /// it; NCCL cannot).
    fn send_recv(&self, transfers: &mut [PeerTransfer<'_>], at: &str) -> Result<()>;
    /// [`Collective::send_recv`] of one send.
    fn send(&self, tensor: &Tensor, to: usize, at: &str) -> Result<()> {
        self.send_recv(&mut [PeerTransfer::Send { tensor, to }], at)
    }
    /// [`Collective::send_recv`] of one receive.
    fn recv(&self, into: &mut Tensor, from: usize, at: &str) -> Result<()> {
        self.send_recv(&mut [PeerTransfer::Recv { into, from }], at)
    }

    /// [`Collective::all_to_all_v`], started: backends that can overlap it with other
    /// work (NCCL, on a side stream and communicator) return before it is done, and
    /// [`PendingRows::wait`] gives its rows; the others run it now. Between starting one
    /// and waiting for all the group's started ones, a rank calls no other operation of
    /// the group but further starts (the side communicator runs apart from the group's
    /// own); every member starts the same calls in the same order.
    fn start_all_to_all_v(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
        at: &str,
    ) -> Result<PendingRows> {
        self.all_to_all_v(send, send_counts, recv_counts, at)
            .map(PendingRows::ready)
    }

    /// Element-wise sum over the group into `root`'s `tensor`, in place; the other ranks'
    /// `tensor` may hold the sum too or be left as it was (NCCL's `ncclReduce`). By
    /// default an all-reduce, which gives every rank the sum.
    fn reduce_sum(&self, tensor: &mut Tensor, root: usize, at: &str) -> Result<()> {
        if root >= self.size() {
            let message = format!("root {root} is outside a group of {} ranks", self.size());
            return Err(CollectiveError::new(
                self.label(),
                "reduce_sum",
                at,
                ErrorKind::Invalid(message),
            ));
        }
        self.all_reduce_sum(tensor, at)
    }
}

/// A started [`Collective::start_all_to_all_v`]: its rows once [`PendingRows::wait`]
/// returns.
pub struct PendingRows(Pending);

enum Pending {
    Ready(Tensor),
    Started(Box<dyn FinishRows>),
}

/// The backend's side of a started all-to-all.
pub trait FinishRows: Send {
    /// Waits (bounded by the group's timeout) until the rows are there.
    fn finish(self: Box<Self>) -> Result<Tensor>;
}

impl PendingRows {
    /// Rows that are already there.
    pub fn ready(rows: Tensor) -> PendingRows {
        PendingRows(Pending::Ready(rows))
    }

    /// Rows a backend is still moving.
    pub fn started(pending: Box<dyn FinishRows>) -> PendingRows {
        PendingRows(Pending::Started(pending))
    }

    /// The received rows (`recv_counts` from each rank, in rank order).
    pub fn wait(self) -> Result<Tensor> {
        match self.0 {
            Pending::Ready(rows) => Ok(rows),
            Pending::Started(pending) => pending.finish(),
        }
    }
}

/// Checks the peers of a [`Collective::send_recv`] batch against a group of `size` ranks.
pub(crate) fn check_peers(size: usize, transfers: &[PeerTransfer<'_>]) -> Result<(), String> {
    match transfers.iter().find(|t| t.peer() >= size) {
        Some(t) => Err(format!(
            "peer {} is outside a group of {size} ranks",
            t.peer()
        )),
        None => Ok(()),
    }
}

/// The message when a received tensor is not what the receiver expects.
pub(crate) fn received_mismatch(peer: usize, got: &Tensor, into: &Tensor) -> Option<String> {
    let shape = if got.defined() { got.size() } else { vec![] };
    let kind = got.defined().then(|| got.kind());
    (shape != into.size() || kind != Some(into.kind())).then(|| {
        format!(
            "rank {peer} sent a tensor of shape {shape:?} ({kind:?}) where this rank receives {:?} ({:?})",
            into.size(),
            into.kind()
        )
    })
}

/// Checks the arguments of [`Collective::all_to_all_v`] before any rank sends: one send and
/// one receive count per rank, none negative, and the send counts splitting the `rows` to
/// send. The message is shared by every implementation.
pub(crate) fn check_all_to_all_counts(
    size: usize,
    rows: i64,
    send_counts: &[i64],
    recv_counts: &[i64],
) -> std::result::Result<(), String> {
    if send_counts.len() != size || recv_counts.len() != size {
        return Err(format!(
            "{} send counts and {} receive counts for a group of {size} ranks",
            send_counts.len(),
            recv_counts.len()
        ));
    }
    if send_counts.iter().chain(recv_counts).any(|&c| c < 0)
        || send_counts.iter().sum::<i64>() != rows
    {
        return Err(format!(
            "send counts {send_counts:?} do not split the {rows} rows to send"
        ));
    }
    Ok(())
}
