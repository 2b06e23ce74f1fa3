//! The NCCL implementation of [`Collective`] (feature `cuda`), on the cudarc crate's
//! NCCL and CUDA-runtime bindings, loaded at run time.
//!
//! This module owns: communicator creation for a [`GroupLayout`] (one NCCL unique id
//! per distinct member list, made by rank 0 and handed out by [`super::rendezvous`]),
//! the mapping of each operation onto NCCL calls, the timeout (non-blocking
//! communicators polled against a deadline, `ncclCommAbort` when it passes) and
//! finding `libnccl` for the ranks ([`NcclLibrary`]). It must not know about models or
//! the planner: it gets rank lists and tensors.
//!
//! # Streams and ordering
//! Tensors are tch (libtorch) CUDA tensors; their `data_ptr()` device pointers go to
//! NCCL, and every NCCL call is issued on the legacy default stream (the null stream),
//! which is also libtorch's default stream. So an NCCL call starts after the kernels
//! that produced its input and finishes before later kernels read its output, with no
//! extra events. (Code that makes another torch stream current must synchronise it
//! with the null stream before calling in here.) Each call then waits on the host until
//! the null stream has drained: the timeout needs a completion to observe, counts must
//! reach the host anyway, and the tensors stay alive for the whole call. Overlapping
//! reductions with the backward pass needs a side stream and events (not done yet).
//!
//! # Timeouts
//! Communicators are created non-blocking (`config.blocking = 0`): calls return at
//! once (`ncclInProgress`), and [`Comm::wait`] polls `ncclCommGetAsyncError` until the
//! work is enqueued, then `cudaStreamQuery(null)` until it has run, until the deadline.
//! On timeout the communicator is aborted (`ncclCommAbort`), the error names the group,
//! the operation and the caller's label like the in-process implementation, and every
//! later call on that communicator fails at once. NCCL cannot tell which peer is late,
//! so a timeout lists all the other members of the group.
//!
//! # Mapping
//! `all_reduce_sum` → in-place `ncclAllReduce(sum)` (NCCL gives every rank the same
//! bits, but not in rank order); `all_gather_counts` → `ncclAllGather` of an int64
//! device buffer; `all_to_all_v` → `ncclGroupStart`, `ncclSend`/`ncclRecv` per peer
//! with a non-zero count (self included) as bytes, `ncclGroupEnd`; `broadcast` →
//! in-place `ncclBroadcast` of bytes; `barrier` → all-reduce of one float.
//! A group of one rank needs no communicator and does its work locally.
//!
//! # Started all-to-alls (FasterMoE's smart schedule)
//! [`Collective::start_all_to_all_v`] runs on a side communicator (`ncclCommSplit` of the
//! group's, made at the first call, which every member reaches at the same point) and a
//! side stream created non-blocking (so the legacy default stream does not serialise with
//! it): the side stream waits for an event recorded on the null stream (the rows to send
//! are ready), issues the sends and receives, and records an event that
//! [`PendingRows::wait`] polls against the deadline before the null stream is made to wait
//! on it. The exchange issues nothing on the group's own communicator while started
//! all-to-alls are pending, so the two communicators never wait on each other. `reduce_sum`
//! is `ncclReduce` to the root. Compiled, not yet run on GPUs (no machine with several
//! GPUs was lent since it was written).

use super::error::{tensor_failure, CollectiveError, ErrorKind, PEER_FAILED};
use super::groups::{GroupLabel, GroupLayout, Groups};
use super::rendezvous::{DistEnv, RendezvousError};
use super::{
    check_all_to_all_counts, check_peers, received_mismatch, Collective, FinishRows, PeerTransfer,
    PendingRows, Result,
};
use cudarc::nccl::sys as nccl;
use cudarc::runtime::sys as cuda;
use std::collections::BTreeMap;
use std::ffi::{c_void, CStr, OsString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// `NCCL_VERSION(2, 28, 0)`: the layout of the `ncclConfig_t` this crate passes.
const CONFIG_VERSION: u32 = 22800;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default".
const UNDEF: i32 = i32::MIN;

fn null_stream() -> nccl::cudaStream_t {
    std::ptr::null_mut()
}

fn nccl_text(result: nccl::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for every result code.
    let text = unsafe { nccl::ncclGetErrorString(result) };
    if text.is_null() {
        return format!("{result:?}");
    }
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

fn cuda_text(error: cuda::cudaError_t) -> String {
    // SAFETY: cudaGetErrorString returns a static C string for every error code.
    let text = unsafe { cuda::cudaGetErrorString(error) };
    if text.is_null() {
        return format!("{error:?}");
    }
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

struct RawComm(nccl::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are
// not concurrent; `Comm` serialises them with its mutex.
unsafe impl Send for RawComm {}

struct CommState {
    raw: RawComm,
    /// Set when the communicator failed or was aborted; later calls fail with it.
    broken: Option<String>,
}

/// One NCCL communicator, shared by the handles of groups with the same members.
struct Comm {
    state: Mutex<CommState>,
    timeout: Duration,
}

enum Wait {
    Done,
    TimedOut,
    Failed(String),
}

impl Comm {
    /// `ncclCommInitRankConfig` (non-blocking) and wait until it is ready.
    fn init(
        id: nccl::ncclUniqueId,
        size: usize,
        position: usize,
        timeout: Duration,
        label: &GroupLabel,
    ) -> anyhow::Result<Comm> {
        let mut config = nonblocking_config();
        let mut raw: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `config` outlive the call; the id came from ncclGetUniqueId
        // on rank 0 and `position < size`.
        let result = unsafe {
            nccl::ncclCommInitRankConfig(&mut raw, size as i32, id, position as i32, &mut config)
        };
        if !matches!(
            result,
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress
        ) || raw.is_null()
        {
            anyhow::bail!(
                "{label}: ncclCommInitRank failed: {} (is NCCL_NVLS_ENABLE=0 set on machines without multicast?)",
                nccl_text(result)
            );
        }
        Comm::ready(raw, timeout, label)
    }

    /// A second communicator over the same ranks (`ncclCommSplit`, one color, keys by
    /// position), for work on a side stream. Every member calls it at the same point.
    fn split(&self, position: usize, label: &GroupLabel) -> anyhow::Result<Comm> {
        let mut state = self.lock();
        if let Some(reason) = &state.broken {
            anyhow::bail!("{label}: the communicator was aborted earlier: {reason}");
        }
        let mut config = nonblocking_config();
        let mut raw: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: the parent is live (not broken); `raw` and `config` outlive the call.
        let result =
            unsafe { nccl::ncclCommSplit(state.raw.0, 0, position as i32, &mut raw, &mut config) };
        if !matches!(
            result,
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress
        ) || raw.is_null()
        {
            let message = last_error(&state, result);
            abort(&mut state, format!("ncclCommSplit: {message}"));
            anyhow::bail!("{label}: splitting a side communicator failed: {message}");
        }
        match self.poll(&mut state, false) {
            Wait::Done => {}
            Wait::TimedOut => {
                let message = format!(
                    "{label}: splitting a side communicator timed out after {:?}",
                    self.timeout
                );
                abort(&mut state, message.clone());
                anyhow::bail!(message);
            }
            Wait::Failed(message) => {
                abort(&mut state, message.clone());
                anyhow::bail!("{label}: splitting a side communicator failed: {message}");
            }
        }
        drop(state);
        Comm::ready(raw, self.timeout, label)
    }

    /// Wraps a communicator being created and waits until it is ready.
    fn ready(raw: nccl::ncclComm_t, timeout: Duration, label: &GroupLabel) -> anyhow::Result<Comm> {
        let comm = Comm {
            state: Mutex::new(CommState {
                raw: RawComm(raw),
                broken: None,
            }),
            timeout,
        };
        let mut state = comm.lock();
        match comm.poll(&mut state, false) {
            Wait::Done => {}
            Wait::TimedOut => {
                let message = format!(
                    "{label}: creating the NCCL communicator timed out after {timeout:?} (a rank did not join)"
                );
                abort(&mut state, message.clone());
                anyhow::bail!(message);
            }
            Wait::Failed(message) => {
                abort(&mut state, message.clone());
                anyhow::bail!("{label}: creating the NCCL communicator failed: {message}");
            }
        }
        drop(state);
        Ok(comm)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CommState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Poll until NCCL has enqueued the last call and, with `stream`, until the null
    /// stream has run it; bounded by the timeout.
    fn poll(&self, state: &mut CommState, stream: bool) -> Wait {
        let started = Instant::now();
        let mut enqueued = false;
        let mut spins = 0u32;
        loop {
            if !enqueued {
                let mut status = nccl::ncclResult_t::ncclSuccess;
                // SAFETY: the communicator is live (not aborted: callers check `broken`).
                let result = unsafe { nccl::ncclCommGetAsyncError(state.raw.0, &mut status) };
                if result != nccl::ncclResult_t::ncclSuccess {
                    return Wait::Failed(format!("ncclCommGetAsyncError: {}", nccl_text(result)));
                }
                match status {
                    nccl::ncclResult_t::ncclSuccess => enqueued = true,
                    nccl::ncclResult_t::ncclInProgress => {}
                    other => return Wait::Failed(last_error(state, other)),
                }
            }
            if enqueued {
                if !stream {
                    return Wait::Done;
                }
                // SAFETY: querying the legacy default stream has no preconditions.
                let result = unsafe { cuda::cudaStreamQuery(std::ptr::null_mut()) };
                match result {
                    cuda::cudaError_t::cudaSuccess => return Wait::Done,
                    cuda::cudaError_t::cudaErrorNotReady => {
                        // A peer that failed shows up as an async error while we wait.
                        let mut status = nccl::ncclResult_t::ncclSuccess;
                        // SAFETY: as above: the communicator is live (callers check `broken`)
                        // and `status` is a valid out-pointer.
                        let _ = unsafe { nccl::ncclCommGetAsyncError(state.raw.0, &mut status) };
                        if !matches!(
                            status,
                            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress
                        ) {
                            return Wait::Failed(last_error(state, status));
                        }
                    }
                    other => return Wait::Failed(format!("CUDA error: {}", cuda_text(other))),
                }
            }
            if started.elapsed() >= self.timeout {
                return Wait::TimedOut;
            }
            // Spin briefly (small collectives take tens of microseconds), then back off.
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else if spins < 4000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// A non-blocking `ncclConfig_t` with NCCL's defaults otherwise.
fn nonblocking_config() -> nccl::ncclConfig_t {
    // SAFETY: ncclConfig_t is plain data; every field NCCL reads is set below.
    let mut config: nccl::ncclConfig_t = unsafe { std::mem::zeroed() };
    config.size = std::mem::size_of::<nccl::ncclConfig_t>();
    config.magic = CONFIG_MAGIC;
    config.version = CONFIG_VERSION;
    config.blocking = 0;
    config.cgaClusterSize = UNDEF;
    config.minCTAs = UNDEF;
    config.maxCTAs = UNDEF;
    config.netName = std::ptr::null();
    config.splitShare = UNDEF;
    config.trafficClass = UNDEF;
    config.commName = std::ptr::null();
    config.collnetEnable = UNDEF;
    config.CTAPolicy = UNDEF;
    config.shrinkShare = UNDEF;
    config.nvlsCTAs = UNDEF;
    config.nChannelsPerNetPeer = UNDEF;
    config.nvlinkCentricSched = UNDEF;
    config
}

/// A CUDA stream that does not synchronise with the legacy default stream.
struct SideStream(cuda::cudaStream_t);
// SAFETY: a CUDA stream handle may be used from any thread; `Side` uses it under its
// communicator's mutex.
unsafe impl Send for SideStream {}
unsafe impl Sync for SideStream {}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: every started all-to-all on it was waited for (or its communicator
        // aborted) before the handle that owns it goes.
        unsafe {
            cuda::cudaStreamDestroy(self.0);
        }
    }
}

/// The side communicator and stream of a group's started all-to-alls.
struct Side {
    comm: Arc<Comm>,
    stream: SideStream,
}

/// A CUDA event (timing off), destroyed with its owner.
struct Event(cuda::cudaEvent_t);
// SAFETY: event handles may be used from any thread.
unsafe impl Send for Event {}

impl Event {
    fn new() -> std::result::Result<Event, String> {
        let mut raw: cuda::cudaEvent_t = std::ptr::null_mut();
        // SAFETY: `raw` outlives the call.
        let result =
            unsafe { cuda::cudaEventCreateWithFlags(&mut raw, cuda::cudaEventDisableTiming) };
        if result != cuda::cudaError_t::cudaSuccess {
            return Err(format!("cudaEventCreate: {}", cuda_text(result)));
        }
        Ok(Event(raw))
    }

    /// Records the event on `stream`.
    fn record(&self, stream: cuda::cudaStream_t) -> std::result::Result<(), String> {
        // SAFETY: the event and the stream are live.
        let result = unsafe { cuda::cudaEventRecord(self.0, stream) };
        if result != cuda::cudaError_t::cudaSuccess {
            return Err(format!("cudaEventRecord: {}", cuda_text(result)));
        }
        Ok(())
    }

    /// Makes `stream` wait for the event's work.
    fn wait_on(&self, stream: cuda::cudaStream_t) -> std::result::Result<(), String> {
        // SAFETY: the event and the stream are live.
        let result = unsafe { cuda::cudaStreamWaitEvent(stream, self.0, 0) };
        if result != cuda::cudaError_t::cudaSuccess {
            return Err(format!("cudaStreamWaitEvent: {}", cuda_text(result)));
        }
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: destroying an event whose work is pending is allowed (CUDA releases it
        // once the work is done).
        unsafe {
            cuda::cudaEventDestroy(self.0);
        }
    }
}

/// An all-to-all running on a group's side stream: its buffers stay alive until it is
/// done.
struct SideAllToAll {
    label: GroupLabel,
    position: usize,
    size: usize,
    at: String,
    side: Arc<Side>,
    done: Event,
    _send: Tensor,
    out: Option<Tensor>,
}

impl SideAllToAll {
    fn error(&self, kind: ErrorKind) -> CollectiveError {
        CollectiveError::new(&self.label, "all_to_all_v (side stream)", &self.at, kind)
    }

    /// Polls the done event and the side communicator's errors until the deadline.
    fn poll(&self) -> Result<()> {
        let comm = &self.side.comm;
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let mut state = comm.lock();
            if let Some(reason) = &state.broken {
                let message = format!("the side communicator was aborted: {reason}");
                return Err(self.error(ErrorKind::Transport(message)));
            }
            // SAFETY: the event is live.
            match unsafe { cuda::cudaEventQuery(self.done.0) } {
                cuda::cudaError_t::cudaSuccess => return Ok(()),
                cuda::cudaError_t::cudaErrorNotReady => {
                    let mut status = nccl::ncclResult_t::ncclSuccess;
                    // SAFETY: the communicator is live (not broken).
                    let _ = unsafe { nccl::ncclCommGetAsyncError(state.raw.0, &mut status) };
                    if !matches!(
                        status,
                        nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress
                    ) {
                        let message = last_error(&state, status);
                        abort(&mut state, format!("at \"{}\": {message}", self.at));
                        return Err(self.error(ErrorKind::Transport(message)));
                    }
                }
                other => {
                    let message = format!("CUDA error: {}", cuda_text(other));
                    abort(&mut state, message.clone());
                    return Err(self.error(ErrorKind::Transport(message)));
                }
            }
            if started.elapsed() >= comm.timeout {
                abort(
                    &mut state,
                    format!("at \"{}\" timed out after {:?}", self.at, comm.timeout),
                );
                let missing = self.label.others(self.size, self.position);
                return Err(self.error(ErrorKind::Timeout {
                    waited: comm.timeout,
                    missing,
                }));
            }
            drop(state);
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else if spins < 4000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

impl FinishRows for SideAllToAll {
    fn finish(mut self: Box<Self>) -> Result<Tensor> {
        self.poll()?;
        // The null stream's later kernels read the rows: order them after the side work
        // (already complete; this keeps CUDA's view of the dependency).
        self.done
            .wait_on(std::ptr::null_mut())
            .map_err(|m| self.error(ErrorKind::Transport(m)))?;
        self.out
            .take()
            .ok_or_else(|| self.error(ErrorKind::Invalid("finished twice".into())))
    }
}

impl Drop for SideAllToAll {
    fn drop(&mut self) {
        if self.out.is_some() {
            // Dropped unfinished (an error elsewhere): the buffers must outlive the GPU
            // work, so wait for it (or abort the side communicator at the deadline).
            let _ = self.poll();
        }
    }
}

fn last_error(state: &CommState, result: nccl::ncclResult_t) -> String {
    // SAFETY: the communicator is live; the returned string is owned by NCCL.
    let detail = unsafe { nccl::ncclGetLastError(state.raw.0) };
    let detail = if detail.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(detail) }
            .to_string_lossy()
            .into_owned()
    };
    let mut text = format!("NCCL error: {}", nccl_text(result));
    if !detail.is_empty() {
        text.push_str(&format!(" ({detail})"));
    }
    if result == nccl::ncclResult_t::ncclRemoteError {
        text.push_str(&format!("; {PEER_FAILED}"));
    }
    text
}

fn abort(state: &mut CommState, reason: String) {
    if state.broken.is_none() {
        // SAFETY: the communicator is live; after this it is never used again.
        unsafe {
            nccl::ncclCommAbort(state.raw.0);
        }
        state.broken = Some(reason);
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        let state = self.lock();
        if state.broken.is_none() {
            // SAFETY: every call on it has completed (each operation waits); the
            // communicator is not used after this.
            unsafe {
                nccl::ncclCommDestroy(state.raw.0);
            }
        }
    }
}

/// One rank's handle to one group over NCCL.
/// An all-to-all's send rows (contiguous), its output, and the bytes of one row.
struct Rows {
    send: Tensor,
    out: Tensor,
    row_bytes: usize,
}

pub struct NcclCollective {
    label: GroupLabel,
    position: usize,
    size: usize,
    device: Device,
    comm: Option<Arc<Comm>>,
    /// The side communicator and stream, made at the first started all-to-all.
    side: Mutex<Option<Arc<Side>>>,
}

fn data_type(kind: Kind) -> Option<nccl::ncclDataType_t> {
    use nccl::ncclDataType_t as T;
    Some(match kind {
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::Half => T::ncclFloat16,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Int => T::ncclInt32,
        Kind::Int64 => T::ncclInt64,
        Kind::Int8 => T::ncclInt8,
        Kind::Uint8 => T::ncclUint8,
        _ => return None,
    })
}

impl NcclCollective {
    fn error(&self, op: &'static str, at: &str, kind: ErrorKind) -> CollectiveError {
        CollectiveError::new(&self.label, op, at, kind)
    }

    /// Issues the all-to-all of `rows` (`send_counts` rows to each peer, `recv_counts` from
    /// each) on the side communicator's stream, and waits until NCCL has enqueued it; a
    /// failure aborts the side communicator. The caller keeps `rows` alive until the work is
    /// done.
    fn enqueue_on_side(
        &self,
        side: &Side,
        rows: &Rows,
        (send_counts, recv_counts): (&[i64], &[i64]),
        op: &'static str,
        at: &str,
    ) -> Result<()> {
        let (send_ptr, recv_ptr) = (
            rows.send.data_ptr() as *mut u8,
            rows.out.data_ptr() as *mut u8,
        );
        let stream = side.stream.0 as nccl::cudaStream_t;
        let mut state = side.comm.lock();
        if let Some(reason) = &state.broken {
            let message = format!("the side communicator was aborted earlier: {reason}");
            return Err(self.error(op, at, ErrorKind::Transport(message)));
        }
        let comm = state.raw.0;
        // SAFETY: offsets stay inside `send` (counts sum to its rows) and `out` (sized from
        // recv_counts); the caller keeps both alive until the work is done.
        let result = unsafe {
            issue_all_to_all_rows(
                (send_ptr, recv_ptr),
                (send_counts, recv_counts),
                rows.row_bytes,
                comm,
                stream,
            )
        };
        if !matches!(
            result,
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress
        ) {
            let message = last_error(&state, result);
            abort(&mut state, format!("{op} at \"{at}\": {message}"));
            return Err(self.error(op, at, ErrorKind::Transport(message)));
        }
        // A non-blocking communicator takes the group's calls in the background: wait until
        // they are enqueued before recording the event behind them.
        match side.comm.poll(&mut state, false) {
            Wait::Done => Ok(()),
            Wait::TimedOut => {
                abort(
                    &mut state,
                    format!("{op} at \"{at}\": enqueueing timed out"),
                );
                let missing = self.label.others(self.size, self.position);
                Err(self.error(
                    op,
                    at,
                    ErrorKind::Timeout {
                        waited: side.comm.timeout,
                        missing,
                    },
                ))
            }
            Wait::Failed(message) => {
                abort(&mut state, format!("{op} at \"{at}\": {message}"));
                Err(self.error(op, at, ErrorKind::Transport(message)))
            }
        }
    }

    fn tensor_error(
        &self,
        op: &'static str,
        at: &str,
    ) -> impl Fn(tch::TchError) -> CollectiveError {
        tensor_failure(&self.label, op, at)
    }

    /// NCCL's type for summing `t`'s elements, or why it has none.
    fn sum_type(&self, t: &Tensor, op: &'static str, at: &str) -> Result<nccl::ncclDataType_t> {
        data_type(t.kind()).ok_or_else(|| {
            let message = format!("NCCL cannot sum {:?} tensors", t.kind());
            self.error(op, at, ErrorKind::Invalid(message))
        })
    }

    /// `root` names a rank of this group.
    fn check_root(&self, root: usize, op: &'static str, at: &str) -> Result<()> {
        if root >= self.size {
            let message = format!("root {root} is outside a group of {} ranks", self.size);
            return Err(self.error(op, at, ErrorKind::Invalid(message)));
        }
        Ok(())
    }

    /// Issues an in-place collective on `tensor`: `issue(pointer, elements, comm)` on its
    /// memory, or on a contiguous copy written back after; nothing without a communicator or
    /// elements.
    fn in_place(
        &self,
        tensor: &mut Tensor,
        op: &'static str,
        at: &str,
        issue: impl FnOnce(*mut std::ffi::c_void, usize, nccl::ncclComm_t) -> nccl::ncclResult_t,
    ) -> Result<()> {
        if self.comm.is_none() || tensor.numel() == 0 {
            return Ok(());
        }
        let work = if tensor.is_contiguous() {
            tensor.shallow_clone()
        } else {
            tensor.f_contiguous().map_err(self.tensor_error(op, at))?
        };
        let (ptr, count) = (work.data_ptr(), work.numel());
        self.run(op, at, |comm| issue(ptr, count, comm))?;
        if !tensor.is_contiguous() {
            tch::no_grad(|| tensor.f_copy_(&work)).map_err(self.tensor_error(op, at))?;
        }
        Ok(())
    }

    fn check_device(&self, t: &Tensor, op: &'static str, at: &str) -> Result<()> {
        if t.device() != self.device {
            let message = format!(
                "the tensor is on {:?} but this rank's communicator is on {:?}",
                t.device(),
                self.device
            );
            return Err(self.error(op, at, ErrorKind::Invalid(message)));
        }
        Ok(())
    }

    /// An all-to-all's rows: `send` contiguous on this rank's device, and the output of
    /// `recv_counts` rows of the same row shape and kind.
    fn rows_for_all_to_all(
        &self,
        send: &Tensor,
        recv_counts: &[i64],
        op: &'static str,
        at: &str,
    ) -> Result<Rows> {
        self.check_device(send, op, at)?;
        let mut out_shape = send.size();
        if out_shape.is_empty() {
            let message = "a tensor with no dimensions has no rows".to_string();
            return Err(self.error(op, at, ErrorKind::Invalid(message)));
        }
        let send = send.f_contiguous().map_err(self.tensor_error(op, at))?;
        let row_bytes =
            (out_shape[1..].iter().product::<i64>() as usize) * send.kind().elt_size_in_bytes();
        out_shape[0] = recv_counts.iter().sum();
        let out = Tensor::f_empty(&out_shape, (send.kind(), self.device))
            .map_err(self.tensor_error(op, at))?;
        Ok(Rows {
            send,
            out,
            row_bytes,
        })
    }

    /// The side communicator and stream, made on first use (every member of the group
    /// reaches its first started all-to-all at the same point).
    fn side(&self, op: &'static str, at: &str) -> Result<Option<Arc<Side>>> {
        let Some(comm) = &self.comm else {
            return Ok(None);
        };
        let mut side = self.side.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = side.as_ref() {
            return Ok(Some(Arc::clone(s)));
        }
        let split = comm
            .split(self.position, &self.label)
            .map_err(|e| self.error(op, at, ErrorKind::Transport(format!("{e:#}"))))?;
        let mut stream: cuda::cudaStream_t = std::ptr::null_mut();
        // SAFETY: `stream` outlives the call; this thread's device is the rank's GPU.
        let result =
            unsafe { cuda::cudaStreamCreateWithFlags(&mut stream, cuda::cudaStreamNonBlocking) };
        if result != cuda::cudaError_t::cudaSuccess {
            let message = format!("cudaStreamCreateWithFlags: {}", cuda_text(result));
            return Err(self.error(op, at, ErrorKind::Transport(message)));
        }
        let made = Arc::new(Side {
            comm: Arc::new(split),
            stream: SideStream(stream),
        });
        *side = Some(Arc::clone(&made));
        Ok(Some(made))
    }

    /// Run `issue` (the NCCL calls) on the live communicator, then wait for it.
    fn run(
        &self,
        op: &'static str,
        at: &str,
        issue: impl FnOnce(nccl::ncclComm_t) -> nccl::ncclResult_t,
    ) -> Result<()> {
        let Some(comm) = &self.comm else {
            return Ok(());
        };
        let mut state = comm.lock();
        if let Some(reason) = &state.broken {
            let message = format!("the communicator was aborted earlier: {reason}");
            return Err(self.error(op, at, ErrorKind::Transport(message)));
        }
        let result = issue(state.raw.0);
        if !matches!(
            result,
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress
        ) {
            let message = last_error(&state, result);
            abort(&mut state, format!("{op} at \"{at}\": {message}"));
            return Err(self.error(op, at, ErrorKind::Transport(message)));
        }
        match comm.poll(&mut state, true) {
            Wait::Done => Ok(()),
            Wait::TimedOut => {
                abort(
                    &mut state,
                    format!("{op} at \"{at}\" timed out after {:?}", comm.timeout),
                );
                let missing = self.label.others(self.size, self.position);
                Err(self.error(
                    op,
                    at,
                    ErrorKind::Timeout {
                        waited: comm.timeout,
                        missing,
                    },
                ))
            }
            Wait::Failed(message) => {
                abort(&mut state, format!("{op} at \"{at}\": {message}"));
                Err(self.error(op, at, ErrorKind::Transport(message)))
            }
        }
    }
}

/// Issues one exchange of rows as a group of `ncclSend`/`ncclRecv` on `stream`: peer `p` gets
/// the next `send_counts[p]` rows of `row_bytes` from `send` and its `recv_counts[p]` rows
/// land next in `recv`. The group's first failure, else success (or in progress).
///
/// # Safety
/// `send` and `recv` hold the counts' rows and stay alive until the group's work is done.
unsafe fn issue_all_to_all_rows(
    (send, recv): (*mut u8, *mut u8),
    (send_counts, recv_counts): (&[i64], &[i64]),
    row_bytes: usize,
    comm: nccl::ncclComm_t,
    stream: nccl::cudaStream_t,
) -> nccl::ncclResult_t {
    let mut results = vec![nccl::ncclGroupStart()];
    let (mut sent, mut received) = (0usize, 0usize);
    for (peer, (&s, &r)) in send_counts.iter().zip(recv_counts).enumerate() {
        let (s, r) = (s as usize * row_bytes, r as usize * row_bytes);
        if s > 0 {
            results.push(nccl::ncclSend(
                send.add(sent) as *const c_void,
                s,
                nccl::ncclDataType_t::ncclUint8,
                peer as i32,
                comm,
                stream,
            ));
        }
        if r > 0 {
            results.push(nccl::ncclRecv(
                recv.add(received) as *mut c_void,
                r,
                nccl::ncclDataType_t::ncclUint8,
                peer as i32,
                comm,
                stream,
            ));
        }
        sent += s;
        received += r;
    }
    results.push(nccl::ncclGroupEnd());
    group_result(results)
}

fn group_result(results: impl IntoIterator<Item = nccl::ncclResult_t>) -> nccl::ncclResult_t {
    results
        .into_iter()
        .find(|r| {
            !matches!(
                r,
                nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress
            )
        })
        .unwrap_or(nccl::ncclResult_t::ncclSuccess)
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.position
    }

    fn size(&self) -> usize {
        self.size
    }

    fn label(&self) -> &GroupLabel {
        &self.label
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor, at: &str) -> Result<()> {
        const OP: &str = "all_reduce_sum";
        self.check_device(tensor, OP, at)?;
        let dtype = self.sum_type(tensor, OP, at)?;
        // SAFETY: `ptr` is `count` elements of `dtype` on this rank's device, alive until
        // `run` returns (it waits for completion).
        self.in_place(tensor, OP, at, |ptr, count, comm| unsafe {
            nccl::ncclAllReduce(
                ptr,
                ptr,
                count,
                dtype,
                nccl::ncclRedOp_t::ncclSum,
                comm,
                null_stream(),
            )
        })
    }

    fn all_gather_counts(&self, counts: &[i64], at: &str) -> Result<Vec<Vec<i64>>> {
        const OP: &str = "all_gather_counts";
        if self.comm.is_none() {
            return Ok(vec![counts.to_vec()]);
        }
        let len = counts.len();
        // The length travels first so ranks that disagree on it get an error, not garbage.
        let mut mine = Vec::with_capacity(len + 1);
        mine.push(len as i64);
        mine.extend_from_slice(counts);
        let send = Tensor::from_slice(&mine)
            .f_to_device(self.device)
            .map_err(self.tensor_error(OP, at))?;
        let recv = Tensor::f_zeros([(self.size * (len + 1)) as i64], (Kind::Int64, self.device))
            .map_err(self.tensor_error(OP, at))?;
        let (send_ptr, recv_ptr) = (send.data_ptr(), recv.data_ptr());
        // SAFETY: `send` holds len+1 int64, `recv` size·(len+1); both live through `run`.
        self.run(OP, at, |comm| unsafe {
            nccl::ncclAllGather(
                send_ptr,
                recv_ptr,
                len + 1,
                nccl::ncclDataType_t::ncclInt64,
                comm,
                null_stream(),
            )
        })?;
        let all = Vec::<i64>::try_from(
            recv.f_to_device(Device::Cpu)
                .map_err(self.tensor_error(OP, at))?,
        )
        .map_err(self.tensor_error(OP, at))?;
        let mut out = Vec::with_capacity(self.size);
        for (position, chunk) in all.chunks(len + 1).enumerate() {
            if chunk[0] != len as i64 {
                let message = format!(
                    "rank {} sent {} counts where this rank sent {len}",
                    self.label.global(position),
                    chunk[0]
                );
                return Err(self.error(OP, at, ErrorKind::Invalid(message)));
            }
            out.push(chunk[1..].to_vec());
        }
        Ok(out)
    }

    fn all_to_all_v(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
        at: &str,
    ) -> Result<Tensor> {
        const OP: &str = "all_to_all_v";
        let size = self.size;
        let rows = send.size().first().copied().unwrap_or(0);
        check_all_to_all_counts(size, rows, send_counts, recv_counts)
            .map_err(|message| self.error(OP, at, ErrorKind::Invalid(message)))?;
        let Rows {
            send,
            out,
            row_bytes,
        } = self.rows_for_all_to_all(send, recv_counts, OP, at)?;
        if self.comm.is_none() {
            tch::no_grad(|| out.shallow_clone().f_copy_(&send))
                .map_err(self.tensor_error(OP, at))?;
            return Ok(out);
        }
        let (send_ptr, recv_ptr) = (send.data_ptr() as *mut u8, out.data_ptr() as *mut u8);
        // SAFETY: offsets stay inside `send` (counts sum to its rows) and `out` (sized
        // from recv_counts); both live through `run`, which waits for completion.
        self.run(OP, at, |comm| unsafe {
            issue_all_to_all_rows(
                (send_ptr, recv_ptr),
                (send_counts, recv_counts),
                row_bytes,
                comm,
                null_stream(),
            )
        })?;
        Ok(out)
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize, at: &str) -> Result<()> {
        const OP: &str = "broadcast";
        self.check_root(root, OP, at)?;
        self.check_device(tensor, OP, at)?;
        let element = tensor.kind().elt_size_in_bytes();
        // SAFETY: `ptr` holds `count` elements of `element` bytes on this device, alive
        // through `run`.
        self.in_place(tensor, OP, at, |ptr, count, comm| unsafe {
            nccl::ncclBroadcast(
                ptr,
                ptr,
                count * element,
                nccl::ncclDataType_t::ncclUint8,
                root as i32,
                comm,
                null_stream(),
            )
        })
    }

    fn start_all_to_all_v(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
        at: &str,
    ) -> Result<PendingRows> {
        const OP: &str = "all_to_all_v (side stream)";
        let size = self.size;
        let rows = send.size().first().copied().unwrap_or(0);
        check_all_to_all_counts(size, rows, send_counts, recv_counts)
            .map_err(|message| self.error(OP, at, ErrorKind::Invalid(message)))?;
        let Some(side) = self.side(OP, at)? else {
            // one rank: nothing to overlap
            return self
                .all_to_all_v(send, send_counts, recv_counts, at)
                .map(PendingRows::ready);
        };
        let buffers = self.rows_for_all_to_all(send, recv_counts, OP, at)?;
        let transport = |m: String| self.error(OP, at, ErrorKind::Transport(m));
        // The rows to send were written on the null stream: the side stream waits for them.
        let ready = Event::new().map_err(transport)?;
        ready.record(std::ptr::null_mut()).map_err(transport)?;
        ready.wait_on(side.stream.0).map_err(transport)?;
        let done = Event::new().map_err(transport)?;
        self.enqueue_on_side(&side, &buffers, (send_counts, recv_counts), OP, at)?;
        let Rows { send, out, .. } = buffers;
        done.record(side.stream.0).map_err(transport)?;
        Ok(PendingRows::started(Box::new(SideAllToAll {
            label: self.label.clone(),
            position: self.position,
            size,
            at: at.to_string(),
            side,
            done,
            _send: send,
            out: Some(out),
        })))
    }

    fn reduce_sum(&self, tensor: &mut Tensor, root: usize, at: &str) -> Result<()> {
        const OP: &str = "reduce_sum";
        self.check_root(root, OP, at)?;
        self.check_device(tensor, OP, at)?;
        let dtype = self.sum_type(tensor, OP, at)?;
        // SAFETY: `ptr` is `count` elements of `dtype` on this rank's device, alive until
        // `run` returns (it waits for completion).
        self.in_place(tensor, OP, at, |ptr, count, comm| unsafe {
            nccl::ncclReduce(
                ptr,
                ptr,
                count,
                dtype,
                nccl::ncclRedOp_t::ncclSum,
                root as i32,
                comm,
                null_stream(),
            )
        })
    }

    fn send_recv(&self, transfers: &mut [PeerTransfer<'_>], at: &str) -> Result<()> {
        const OP: &str = "send_recv";
        check_peers(self.size, transfers).map_err(|m| self.error(OP, at, ErrorKind::Invalid(m)))?;
        for t in transfers.iter() {
            match t {
                PeerTransfer::Send { tensor, .. } => self.check_device(tensor, OP, at)?,
                PeerTransfer::Recv { into, .. } => self.check_device(into, OP, at)?,
            }
        }
        if self.comm.is_none() {
            return self.send_recv_alone(transfers, at);
        }
        // NCCL moves bytes between contiguous buffers: non-contiguous sends go through a
        // copy, non-contiguous receives through a buffer copied back afterwards.
        let mut buffers = Vec::with_capacity(transfers.len());
        for t in transfers.iter() {
            let (tensor, send) = match t {
                PeerTransfer::Send { tensor, .. } => (*tensor, true),
                PeerTransfer::Recv { into, .. } => (&**into, false),
            };
            let buffer = if tensor.is_contiguous() {
                tensor.shallow_clone()
            } else {
                tensor.f_contiguous().map_err(self.tensor_error(OP, at))?
            };
            buffers.push(PeerBuffer {
                bytes: buffer.numel() * buffer.kind().elt_size_in_bytes(),
                buffer,
                peer: t.peer() as i32,
                send,
            });
        }
        // SAFETY: every pointer is `bytes` bytes of a contiguous tensor on this rank's
        // device, kept alive by `buffers` until `run` returns (it waits for completion).
        self.run(OP, at, |comm| unsafe {
            let mut results = vec![nccl::ncclGroupStart()];
            for b in buffers.iter().filter(|b| b.bytes > 0) {
                let ptr = b.buffer.data_ptr();
                results.push(if b.send {
                    nccl::ncclSend(
                        ptr as *const c_void,
                        b.bytes,
                        nccl::ncclDataType_t::ncclUint8,
                        b.peer,
                        comm,
                        null_stream(),
                    )
                } else {
                    nccl::ncclRecv(
                        ptr,
                        b.bytes,
                        nccl::ncclDataType_t::ncclUint8,
                        b.peer,
                        comm,
                        null_stream(),
                    )
                });
            }
            results.push(nccl::ncclGroupEnd());
            group_result(results)
        })?;
        for (t, b) in transfers.iter_mut().zip(&buffers) {
            if let PeerTransfer::Recv { into, .. } = t {
                if !into.is_contiguous() {
                    tch::no_grad(|| into.f_copy_(&b.buffer)).map_err(self.tensor_error(OP, at))?;
                }
            }
        }
        Ok(())
    }

    fn barrier(&self, at: &str) -> Result<()> {
        const OP: &str = "barrier";
        if self.comm.is_none() {
            return Ok(());
        }
        let one =
            Tensor::f_ones([1], (Kind::Float, self.device)).map_err(self.tensor_error(OP, at))?;
        let ptr = one.data_ptr();
        // SAFETY: one float on this device, alive through `run`.
        self.run(OP, at, |comm| unsafe {
            nccl::ncclAllReduce(
                ptr,
                ptr,
                1,
                nccl::ncclDataType_t::ncclFloat32,
                nccl::ncclRedOp_t::ncclSum,
                comm,
                null_stream(),
            )
        })
    }
}

impl NcclCollective {
    /// [`Collective::send_recv`] in a group of one (no communicator): every transfer is with
    /// this rank itself, the n-th receive taking the n-th send.
    fn send_recv_alone(&self, transfers: &mut [PeerTransfer<'_>], at: &str) -> Result<()> {
        const OP: &str = "send_recv";
        let mut sent = std::collections::VecDeque::new();
        for t in transfers.iter() {
            if let PeerTransfer::Send { tensor, .. } = t {
                sent.push_back(tensor.f_detach_copy().map_err(self.tensor_error(OP, at))?);
            }
        }
        for t in transfers.iter_mut() {
            if let PeerTransfer::Recv { into, .. } = t {
                let Some(got) = sent.pop_front() else {
                    let message = "a receive from this rank itself with nothing sent".into();
                    return Err(self.error(OP, at, ErrorKind::Invalid(message)));
                };
                if let Some(message) = received_mismatch(self.label.global(0), &got, into) {
                    return Err(self.error(OP, at, ErrorKind::Invalid(message)));
                }
                tch::no_grad(|| into.f_copy_(&got)).map_err(self.tensor_error(OP, at))?;
            }
        }
        Ok(())
    }
}

/// One transfer of an NCCL point-to-point batch: a contiguous buffer on the rank's device
/// (the caller's tensor, or a copy of it), its size in bytes and the peer.
struct PeerBuffer {
    buffer: Tensor,
    bytes: usize,
    peer: i32,
    send: bool,
}

/// Where the process's NCCL library is and how ranks find it.
///
/// cudarc opens NCCL by the names `libnccl.so`, `libnccl.so.<CUDA major>`, ... but not
/// `libnccl.so.2`, the only name pip's `nvidia-nccl` package installs (next to torch:
/// `site-packages/nvidia/nccl/lib/libnccl.so.2`, which libtorch_cuda already loads).
/// [`NcclLibrary::for_ranks`] makes a private directory with a `libnccl.so` link to
/// that file and gives it to the ranks in `LD_LIBRARY_PATH`; the directory is removed
/// when the value is dropped.
///
/// cudarc must open the very file libtorch_cuda loaded, not merely some `libnccl.so`:
/// with two copies in one process (say a CUDA image's system NCCL 2.28.3 opened by
/// cudarc next to torch's wheel 2.28.9), the copy cudarc opened binds its internal calls
/// to NCCL's exported functions (`ncclCommGetAsyncError`, ...) to the copy loaded
/// first, whose `struct ncclComm` has another layout, and the first collective fails
/// with "corrupted comm object detected". So the link is made even when some
/// `libnccl.so` is already on the search path, and [`connect`] refuses to run with two
/// copies mapped.
pub struct NcclLibrary {
    link_dir: Option<PathBuf>,
    /// Variables to add to each rank's environment.
    pub env: Vec<(OsString, OsString)>,
}

impl NcclLibrary {
    /// Whether this process can open NCCL through cudarc now.
    pub fn loadable() -> bool {
        // SAFETY: only tries dlopen on candidate names.
        unsafe { nccl::is_culib_present() }
    }

    /// The `libnccl.so*` file mapped into this process (libtorch_cuda depends on it),
    /// or else `$FMOEC_NCCL_LIB`. The mapped file comes first: a second copy of NCCL in
    /// the ranks breaks every collective (see the type's docs).
    pub fn locate() -> Option<PathBuf> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        if let Some(mapped) = nccl_mappings(&maps).into_iter().next() {
            return Some(mapped.path);
        }
        std::env::var_os("FMOEC_NCCL_LIB").map(PathBuf::from)
    }

    /// The environment ranks need to open the NCCL this process has (empty when it has
    /// none and ranks can open one by name already).
    pub fn for_ranks() -> anyhow::Result<NcclLibrary> {
        let Some(library) = NcclLibrary::locate() else {
            if NcclLibrary::loadable() {
                return Ok(NcclLibrary {
                    link_dir: None,
                    env: Vec::new(),
                });
            }
            anyhow::bail!(
                "cannot find libnccl: it is not loaded by libtorch_cuda and FMOEC_NCCL_LIB is not set; point FMOEC_NCCL_LIB at libnccl.so.2 (pip: site-packages/nvidia/nccl/lib/libnccl.so.2)"
            );
        };
        let dir = std::env::temp_dir().join(format!("fmoec-nccl-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let link = dir.join("libnccl.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link).map_err(|e| {
            anyhow::anyhow!(
                "cannot link {} to {}: {e}",
                link.display(),
                library.display()
            )
        })?;
        let mut path = OsString::from(&dir);
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            path.push(":");
            path.push(old);
        }
        Ok(NcclLibrary {
            link_dir: Some(dir),
            env: vec![("LD_LIBRARY_PATH".into(), path)],
        })
    }
}

impl Drop for NcclLibrary {
    fn drop(&mut self) {
        if let Some(dir) = &self.link_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One NCCL library file mapped into this process.
#[derive(Debug, PartialEq, Eq)]
struct MappedNccl {
    path: PathBuf,
    /// Device and inode: one file reached by several paths (a link) is one copy.
    file: (String, u64),
}

/// The distinct `libnccl.so*` files in a `/proc/<pid>/maps` text, in the order they
/// first appear.
fn nccl_mappings(maps: &str) -> Vec<MappedNccl> {
    let mut found: Vec<MappedNccl> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(dev), Some(inode)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let path: Vec<&str> = fields.collect();
        let path = PathBuf::from(path.join(" "));
        let is_nccl = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libnccl.so"));
        let Ok(inode) = inode.parse::<u64>() else {
            continue;
        };
        let file = (dev.to_string(), inode);
        if is_nccl && !found.iter().any(|m| m.file == file) {
            found.push(MappedNccl { path, file });
        }
    }
    found
}

/// Fail when this process has more than one NCCL library mapped (cudarc opened another
/// file than the one libtorch_cuda loaded): calls would cross between the copies and
/// the first collective would fail with "corrupted comm object detected".
fn check_one_nccl(maps: &str) -> anyhow::Result<()> {
    let copies = nccl_mappings(maps);
    if copies.len() > 1 {
        let paths: Vec<String> = copies
            .iter()
            .map(|m| m.path.display().to_string())
            .collect();
        anyhow::bail!(
            "this process has {} different NCCL libraries loaded ({}): cudarc opened `libnccl.so` from the library search path, not the {} that libtorch_cuda loaded, and NCCL calls would cross between the copies (\"corrupted comm object detected\"); start the ranks with the fmoec launcher (`--gpus N`), which links the right file, or put a directory holding a `libnccl.so` symlink to {} first on LD_LIBRARY_PATH",
            copies.len(),
            paths.join(", "),
            paths[0],
            paths[0]
        );
    }
    Ok(())
}

/// A short fingerprint of the layout, so ranks started with different layouts fail at
/// the rendezvous instead of joining the wrong communicators.
fn layout_tag(layout: &GroupLayout) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{layout:?}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("layout-{hex}")
}

/// The distinct member lists that need a communicator, in the order every rank creates
/// them (group kinds in [`super::GroupKind::ALL`] order, then as listed).
fn communicators(layout: &GroupLayout) -> Vec<Vec<usize>> {
    let mut seen = Vec::new();
    for kind in super::GroupKind::ALL {
        for members in layout.groups(kind) {
            if members.len() > 1 && !seen.contains(members) {
                seen.push(members.clone());
            }
        }
    }
    seen
}

/// The member lists that need a communicator with tensor groups too: the layout's
/// ([`communicators`]), then the tensor groups not among them.
fn communicators_with_tensor(layout: &GroupLayout, tensor: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut seen = communicators(layout);
    for members in tensor {
        if members.len() > 1 && !seen.contains(members) {
            seen.push(members.clone());
        }
    }
    seen
}

/// Connect this process's groups over NCCL: select the GPU `env.local_rank`, get the
/// unique ids from rank 0 over TCP (see [`super::rendezvous`]), and create one
/// communicator per distinct member list. Every collective (and the setup) is bounded
/// by `timeout`. Returns the groups and the device their tensors must be on.
pub fn connect(
    layout: &GroupLayout,
    env: &DistEnv,
    timeout: Duration,
) -> anyhow::Result<(Groups, Device)> {
    connect_with(layout, None, env, timeout)
}

/// [`connect`] with tensor parallelism: `tensor` lists the tensor groups (partitioning the
/// world, e.g. [`super::tensor_groups`] or the planner's `tensor` lists); their
/// communicators are created after the layout's, and the returned [`Groups`] hold this
/// rank's ([`Groups::tensor`]). The rendezvous fingerprint covers the tensor groups too.
pub fn connect_tensor_parallel(
    layout: &GroupLayout,
    tensor: &[Vec<usize>],
    env: &DistEnv,
    timeout: Duration,
) -> anyhow::Result<(Groups, Device)> {
    connect_with(layout, Some(tensor), env, timeout)
}

/// The bytes of one NCCL unique id.
const ID_BYTES: usize = std::mem::size_of::<nccl::ncclUniqueId>();

/// Fails unless cudarc can open NCCL and the copy it opens is the one libtorch_cuda loaded.
fn check_nccl_loaded() -> anyhow::Result<()> {
    if !NcclLibrary::loadable() {
        let found = NcclLibrary::locate()
            .map(|p| format!("this process has {} loaded, but ", p.display()))
            .unwrap_or_default();
        anyhow::bail!(
            "cannot open NCCL: {found}cudarc looks for `libnccl.so` (not `libnccl.so.2`); start the ranks with the fmoec launcher (`--gpus N`), which links it, or put a directory holding a `libnccl.so` symlink to libnccl.so.2 on LD_LIBRARY_PATH"
        );
    }
    // Make cudarc open its copy now, then check it is the one libtorch_cuda loaded.
    let _ = nccl_version();
    check_one_nccl(&std::fs::read_to_string("/proc/self/maps").unwrap_or_default())
}

/// Makes GPU `LOCAL_RANK` this process's CUDA device, and returns it.
fn use_local_gpu(env: &DistEnv) -> anyhow::Result<Device> {
    let devices = tch::Cuda::device_count();
    if env.local_rank as i64 >= devices {
        anyhow::bail!(
            "LOCAL_RANK {} needs GPU {} but this process sees {devices} CUDA device(s)",
            env.local_rank,
            env.local_rank
        );
    }
    // SAFETY: plain runtime call with a valid device index.
    let set = unsafe { cuda::cudaSetDevice(env.local_rank as i32) };
    if set != cuda::cudaError_t::cudaSuccess {
        anyhow::bail!("cudaSetDevice({}): {}", env.local_rank, cuda_text(set));
    }
    Ok(Device::Cuda(env.local_rank))
}

/// The members of every communicator of `layout` (and of the `tensor` groups, where given),
/// and the rendezvous tag that fingerprints them.
fn communicator_lists(
    layout: &GroupLayout,
    tensor: Option<&[Vec<usize>]>,
) -> (Vec<Vec<usize>>, String) {
    match tensor {
        None => (communicators(layout), layout_tag(layout)),
        Some(t) => (
            communicators_with_tensor(layout, t),
            format!("{}-tensor-{}", layout_tag(layout), {
                use sha2::{Digest, Sha256};
                let digest = Sha256::digest(format!("{t:?}").as_bytes());
                digest
                    .iter()
                    .take(4)
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            }),
        ),
    }
}

/// One NCCL unique id per communicator (`count` of them), made by rank 0 and sent to every
/// rank through the rendezvous under `tag`: their bytes one after the other.
fn exchange_unique_ids(
    env: &DistEnv,
    tag: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    let payload = env.exchange(tag, timeout, || {
        let mut bytes = Vec::with_capacity(count * ID_BYTES);
        for _ in 0..count {
            // SAFETY: ncclUniqueId is a plain byte array, for which all zeros is a valid value.
            let mut id: nccl::ncclUniqueId = unsafe { std::mem::zeroed() };
            // SAFETY: `id` is a valid out-pointer.
            let result = unsafe { nccl::ncclGetUniqueId(&mut id) };
            if result != nccl::ncclResult_t::ncclSuccess {
                return Err(RendezvousError::Refused {
                    addr: env.address(),
                    message: format!("ncclGetUniqueId: {}", nccl_text(result)),
                });
            }
            bytes.extend(id.internal.iter().map(|&c| c as u8));
        }
        Ok(bytes)
    })?;
    if payload.len() != count * ID_BYTES {
        anyhow::bail!(
            "rank 0 sent {} bytes of NCCL ids, expected {}",
            payload.len(),
            count * ID_BYTES
        );
    }
    Ok(payload)
}

/// The NCCL unique id whose bytes are `bytes` (`ID_BYTES` of them).
fn unique_id(bytes: &[u8]) -> nccl::ncclUniqueId {
    // SAFETY: ncclUniqueId is a plain byte array, for which all zeros is a valid value.
    let mut id: nccl::ncclUniqueId = unsafe { std::mem::zeroed() };
    for (dst, &src) in id.internal.iter_mut().zip(bytes) {
        *dst = src as _;
    }
    id
}

fn connect_with(
    layout: &GroupLayout,
    tensor: Option<&[Vec<usize>]>,
    env: &DistEnv,
    timeout: Duration,
) -> anyhow::Result<(Groups, Device)> {
    let my_tensor = env.place_in(layout, tensor)?;
    check_nccl_loaded()?;
    let device = use_local_gpu(env)?;
    let (lists, tag) = communicator_lists(layout, tensor);
    let payload = exchange_unique_ids(env, &tag, lists.len(), timeout)?;
    let mut comms: BTreeMap<Vec<usize>, Arc<Comm>> = BTreeMap::new();
    let mut open = |label: super::GroupLabel, position: usize| {
        let size = label.members.len();
        let comm = if size == 1 {
            None
        } else if let Some(comm) = comms.get(&label.members) {
            Some(Arc::clone(comm))
        } else {
            let index = lists
                .iter()
                .position(|m| *m == label.members)
                .ok_or_else(|| anyhow::anyhow!("{label}: no NCCL id for this group"))?;
            let id = unique_id(&payload[index * ID_BYTES..(index + 1) * ID_BYTES]);
            let comm = Arc::new(Comm::init(id, size, position, timeout, &label)?);
            comms.insert(label.members.clone(), Arc::clone(&comm));
            Some(comm)
        };
        Ok(Box::new(NcclCollective {
            label,
            position,
            size,
            device,
            comm,
            side: Mutex::new(None),
        }) as Box<dyn Collective>)
    };
    let mut groups = Groups::connect(layout, env.rank, &mut open)?;
    if let Some(members) = my_tensor {
        let position = members
            .iter()
            .position(|&r| r == env.rank)
            .unwrap_or_default();
        let label = super::GroupLabel {
            kind: super::GroupKind::Tensor,
            members,
        };
        groups.set_tensor(open(label, position)?)?;
    }
    Ok((groups, device))
}

/// The NCCL version this process loaded (`2.28.9` as 22809).
pub fn nccl_version() -> Option<i32> {
    let mut version = 0;
    // SAFETY: valid out-pointer.
    let result = unsafe { nccl::ncclGetVersion(&mut version) };
    (result == nccl::ncclResult_t::ncclSuccess).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_groups_get_communicators_after_the_layout() {
        // Megatron's 2 tensor x 2 data: data = expert [0,2] [1,3], gate [0..4], tensor
        // [0,1] [2,3].
        let layout = GroupLayout::tensor_data(4, 2, 2).unwrap();
        let tensor = crate::collective::tensor_groups(4, 2).unwrap();
        assert_eq!(
            communicators_with_tensor(&layout, &tensor),
            vec![
                vec![0, 2],
                vec![1, 3],
                vec![0, 1, 2, 3],
                vec![0, 1],
                vec![2, 3]
            ]
        );
    }

    #[test]
    fn groups_with_the_same_members_share_a_communicator() {
        // 4 ranks, expert groups [0,1] [2,3]: data = gate = [0..4] (one communicator),
        // expert-data [0,2] [1,3].
        let layout = GroupLayout::data_parallel(4, 2).unwrap();
        assert_eq!(
            communicators(&layout),
            vec![
                vec![0, 1, 2, 3],
                vec![0, 1],
                vec![2, 3],
                vec![0, 2],
                vec![1, 3]
            ]
        );
        // One rank per expert group: expert groups need no communicator.
        let layout = GroupLayout::data_parallel(2, 1).unwrap();
        assert_eq!(communicators(&layout), vec![vec![0, 1]]);
        assert_eq!(
            layout_tag(&GroupLayout::data_parallel(4, 2).unwrap()),
            layout_tag(&GroupLayout::data_parallel(4, 2).unwrap())
        );
        assert_ne!(
            layout_tag(&GroupLayout::data_parallel(4, 2).unwrap()),
            layout_tag(&GroupLayout::data_parallel(4, 4).unwrap())
        );
    }

    #[test]
    fn pipeline_and_embedding_groups_get_communicators_after_the_others() {
        // 2 stages of 2 data ranks: data = expert = gate per stage, pipeline [0,2] [1,3],
        // whose first and last stage are the embedding groups (the same communicators).
        let layout = GroupLayout::megatron(4, 1, 2, 2).unwrap();
        assert_eq!(
            communicators(&layout),
            vec![vec![0, 1], vec![2, 3], vec![0, 2], vec![1, 3]]
        );
        // 4 stages: the embedding groups [0,3] are new, the middle stages alone.
        let layout = GroupLayout::megatron(4, 1, 4, 1).unwrap();
        assert_eq!(communicators(&layout), vec![vec![0, 1, 2, 3], vec![0, 3]]);
    }

    /// A rank's handle to a group of one on `device` (no communicator: nothing to connect).
    fn alone(device: Device) -> NcclCollective {
        NcclCollective {
            label: GroupLabel {
                kind: crate::collective::GroupKind::Pipeline,
                members: vec![3],
            },
            position: 0,
            size: 1,
            device,
            comm: None,
            side: Mutex::new(None),
        }
    }

    #[test]
    fn point_to_point_checks_its_peers_and_in_a_group_of_one_goes_to_itself() {
        let g = alone(Device::Cpu);
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).reshape([3, 1]);
        let b = Tensor::from_slice(&[4.0f32, 5.0]);
        let (mut ra, mut rb) = (a.zeros_like(), b.zeros_like());
        g.send_recv(
            &mut [
                PeerTransfer::Send { tensor: &a, to: 0 },
                PeerTransfer::Send { tensor: &b, to: 0 },
                PeerTransfer::Recv {
                    into: &mut ra,
                    from: 0,
                },
                PeerTransfer::Recv {
                    into: &mut rb,
                    from: 0,
                },
            ],
            "step 1",
        )
        .unwrap();
        assert!(ra.equal(&a) && rb.equal(&b));
        let e = g.send(&a, 1, "step 2").unwrap_err().to_string();
        assert!(
            e.contains("pipeline group [3]: send_recv at \"step 2\"")
                && e.contains("peer 1 is outside a group of 1 ranks"),
            "{e}"
        );
        let mut wrong = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let e = g
            .send_recv(
                &mut [
                    PeerTransfer::Send { tensor: &a, to: 0 },
                    PeerTransfer::Recv {
                        into: &mut wrong,
                        from: 0,
                    },
                ],
                "step 3",
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("where this rank receives [2]"), "{e}");
        // a tensor on another device than the communicator's is refused before anything moves
        let e = alone(Device::Cuda(0))
            .send(&a, 0, "step 4")
            .unwrap_err()
            .to_string();
        assert!(e.contains("the tensor is on Cpu"), "{e}");
    }

    #[test]
    fn two_nccl_copies_are_found_and_refused() {
        let torch = "/v/site-packages/nvidia/nccl/lib/libnccl.so.2";
        let link = "/tmp/fmoec-nccl-1/libnccl.so";
        let system = "/usr/lib/x86_64-linux-gnu/libnccl.so.2.28.3";
        let line = |perms: &str, dev: &str, inode: u64, path: &str| {
            format!("7f0000000000-7f0000001000 {perms} 00000000 {dev} {inode}                   {path}\n")
        };
        // torch's file, reached again through the launcher's link: one copy.
        let one = [
            line("r--p", "fe:00", 0, ""),
            line("r--p", "fe:00", 11, "/usr/lib/libc.so.6"),
            line("r--p", "fe:00", 42, torch),
            line("r-xp", "fe:00", 42, torch),
            line("r-xp", "fe:00", 42, link),
        ]
        .concat();
        assert_eq!(
            nccl_mappings(&one),
            vec![MappedNccl {
                path: torch.into(),
                file: ("fe:00".into(), 42)
            }]
        );
        check_one_nccl(&one).unwrap();
        // cudarc opened a system libnccl.so next to torch's: refused, naming both.
        let two = one + &line("r-xp", "fe:01", 7, system);
        assert_eq!(nccl_mappings(&two).len(), 2);
        let e = check_one_nccl(&two).unwrap_err().to_string();
        assert!(e.contains(torch) && e.contains(system), "{e}");
        assert!(e.contains("corrupted comm object"), "{e}");
        // The same path on another device is another file.
        let moved = line("r-xp", "fe:00", 42, torch) + &line("r-xp", "fe:02", 42, torch);
        assert_eq!(nccl_mappings(&moved).len(), 2);
        assert!(nccl_mappings("").is_empty());
        check_one_nccl("garbage\n\n1 2 3").unwrap();
    }

    /// The library torch loaded becomes loadable by name in the ranks' environment, and
    /// it wins over another `libnccl.so` on the search path (a CUDA image's system
    /// NCCL, here a copy of torch's file): a child process loads torch's file first (as
    /// libtorch_cuda does), then opens `libnccl.so` (what cudarc asks for) and gets the
    /// same copy, and reads its version. Needs no GPU; needs `python3` for `ctypes`.
    #[test]
    fn ranks_open_the_nccl_that_torch_loaded() {
        let path = NcclLibrary::locate().expect("libtorch_cuda loads libnccl.so.2");
        assert!(path.exists(), "{}", path.display());
        let decoy = tempfile::tempdir().unwrap();
        std::fs::copy(&path, decoy.path().join("libnccl.so")).unwrap();
        let library = NcclLibrary::for_ranks().unwrap();
        assert!(library.link_dir.is_some(), "torch's NCCL is always linked");
        let script = format!(
            "import ctypes, os\n\
             torch = ctypes.CDLL({:?}, mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)\n\
             l = ctypes.CDLL('libnccl.so')\n\
             at = lambda lib: ctypes.cast(lib.ncclGetVersion, ctypes.c_void_p).value\n\
             assert at(l) == at(torch), 'libnccl.so is another copy than torch loaded'\n\
             v = ctypes.c_int()\n\
             assert l.ncclGetVersion(ctypes.byref(v)) == 0\n\
             print(v.value)",
            path.display().to_string()
        );
        let child = |library_path: &OsString| {
            let mut command = std::process::Command::new("python3");
            command.args(["-c", &script]);
            for (key, value) in &library.env {
                command.env(key, value);
            }
            command.env("LD_LIBRARY_PATH", library_path);
            command.output().expect("python3 runs")
        };
        // Without the link, `libnccl.so` is the other copy (the failure this guards).
        let alone = child(&decoy.path().as_os_str().to_owned());
        assert!(!alone.status.success());
        assert!(
            String::from_utf8_lossy(&alone.stderr).contains("another copy"),
            "{}",
            String::from_utf8_lossy(&alone.stderr)
        );
        // With the ranks' environment it is torch's, even with the other on the path.
        let (_, ranks_path) = library
            .env
            .iter()
            .find(|(k, _)| k == "LD_LIBRARY_PATH")
            .expect("the ranks get LD_LIBRARY_PATH");
        let mut with_decoy = ranks_path.clone();
        with_decoy.push(":");
        with_decoy.push(decoy.path());
        let output = child(&with_decoy);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let version: i32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap();
        assert!(version >= CONFIG_VERSION as i32, "NCCL {version}");
        let dir = library.link_dir.clone();
        drop(library);
        assert!(
            dir.is_none_or(|d| !d.exists()),
            "the link directory is removed"
        );
    }
}
