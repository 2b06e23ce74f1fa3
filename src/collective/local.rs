//! The in-process [`Collective`]: one thread per rank, shared mailboxes under a
//! `Mutex` + `Condvar`. Used by CI to test multi-rank behaviour without GPUs, and by a
//! CPU run that wants several ranks in one process.
//!
//! Every operation is built from point-to-point messages tagged with the sender's
//! operation number and name, so ranks that call collectives in different orders get
//! a mismatch error instead of wrong numbers. Dropping a handle (also by unwinding
//! from a panic) marks the rank as gone and wakes every waiter; a waiter whose peer is
//! gone with nothing queued fails at once, and every wait is bounded by the timeout.

use super::error::{CollectiveError, ErrorKind};
use super::groups::{GroupLabel, GroupLayout, Groups, LayoutError};
use super::{
    check_all_to_all_counts, check_peers, received_mismatch, Collective, PeerTransfer, Result,
};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::Tensor;

enum Payload {
    Tensor(Tensor),
    Counts(Vec<i64>),
    Empty,
}

struct Message {
    seq: u64,
    op: &'static str,
    payload: Payload,
}

#[derive(Clone, Copy)]
enum Presence {
    Here,
    Left { panicked: bool },
}

struct State {
    /// `queues[dst * size + src]`: messages from `src` waiting for `dst`.
    queues: Vec<VecDeque<Message>>,
    /// The same for point-to-point transfers, numbered per pair of ranks (collectives are
    /// numbered per group), so that the two never mix.
    p2p: Vec<VecDeque<Message>>,
    presence: Vec<Presence>,
}

struct Shared {
    label: GroupLabel,
    size: usize,
    state: Mutex<State>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the data if a test thread did.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One rank's handle to an in-process group. Create a group's handles with
/// [`LocalCollective::group`] and move each into its rank's thread.
pub struct LocalCollective {
    shared: Arc<Shared>,
    position: usize,
    next_seq: Cell<u64>,
    /// Point-to-point transfers sent to / received from each position so far.
    p2p_sent: RefCell<Vec<u64>>,
    p2p_received: RefCell<Vec<u64>>,
    timeout: Duration,
}

impl LocalCollective {
    /// The handles of one group, indexed by position in `label.members`.
    pub fn group(label: GroupLabel, timeout: Duration) -> Vec<LocalCollective> {
        let size = label.members.len();
        let shared = Arc::new(Shared {
            label,
            size,
            state: Mutex::new(State {
                queues: (0..size * size).map(|_| VecDeque::new()).collect(),
                p2p: (0..size * size).map(|_| VecDeque::new()).collect(),
                presence: vec![Presence::Here; size],
            }),
            arrived: Condvar::new(),
        });
        (0..size)
            .map(|position| LocalCollective {
                shared: Arc::clone(&shared),
                position,
                next_seq: Cell::new(0),
                p2p_sent: RefCell::new(vec![0; size]),
                p2p_received: RefCell::new(vec![0; size]),
                timeout,
            })
            .collect()
    }

    fn error(&self, op: &'static str, at: &str, kind: ErrorKind) -> CollectiveError {
        CollectiveError::new(&self.shared.label, op, at, kind)
    }

    fn tensor_error(
        &self,
        op: &'static str,
        at: &str,
    ) -> impl Fn(tch::TchError) -> CollectiveError + '_ {
        let at = at.to_string();
        move |e| self.error(op, &at, ErrorKind::Tensor(e))
    }

    fn begin(&self) -> u64 {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        seq
    }

    fn send(&self, dst: usize, seq: u64, op: &'static str, payload: Payload) {
        let mut state = self.shared.lock();
        if let Presence::Left { .. } = state.presence[dst] {
            // Nobody will read it. Not an error here: the failure belongs to the rank that
            // left, and this rank reports it when it waits for that rank's part.
            return;
        }
        state.queues[dst * self.shared.size + self.position].push_back(Message {
            seq,
            op,
            payload,
        });
        drop(state);
        self.shared.arrived.notify_all();
    }

    /// Wait for this operation's message from every rank in `sources`; payloads in the
    /// order of `sources`.
    fn receive(
        &self,
        sources: &[usize],
        seq: u64,
        op: &'static str,
        at: &str,
    ) -> Result<Vec<Payload>> {
        let deadline = Instant::now() + self.timeout;
        let size = self.shared.size;
        let mut got: Vec<Option<Payload>> = sources.iter().map(|_| None).collect();
        let mut state = self.shared.lock();
        loop {
            let mut gone: Option<(usize, bool)> = None;
            for (slot, &src) in got.iter_mut().zip(sources) {
                if slot.is_some() {
                    continue;
                }
                let queue = &mut state.queues[self.position * size + src];
                match queue.front() {
                    Some(m) if m.seq == seq && m.op == op => {
                        *slot = queue.pop_front().map(|m| m.payload);
                    }
                    Some(m) => {
                        let kind = ErrorKind::Mismatch {
                            peer: self.shared.label.global(src),
                            theirs: format!("{} (its collective #{})", m.op, m.seq),
                            ours: format!("{op} (its collective #{seq})"),
                        };
                        return Err(self.error(op, at, kind));
                    }
                    None => {
                        if let Presence::Left { panicked } = state.presence[src] {
                            let peer = self.shared.label.global(src);
                            // Prefer naming a rank that panicked over one that left after it.
                            if gone.is_none_or(|(_, p)| !p && panicked) {
                                gone = Some((peer, panicked));
                            }
                        }
                    }
                }
            }
            if let Some((peer, panicked)) = gone {
                return Err(self.error(op, at, ErrorKind::PeerGone { peer, panicked }));
            }
            if got.iter().all(Option::is_some) {
                return Ok(got.into_iter().flatten().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = got
                    .iter()
                    .zip(sources)
                    .filter(|(slot, _)| slot.is_none())
                    .map(|(_, &src)| self.shared.label.global(src))
                    .collect();
                return Err(self.error(
                    op,
                    at,
                    ErrorKind::Timeout {
                        waited: self.timeout,
                        missing,
                    },
                ));
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn everyone(&self) -> Vec<usize> {
        (0..self.shared.size).collect()
    }

    /// Waits for the point-to-point transfer number `seq` from position `src`.
    fn receive_p2p(&self, src: usize, seq: u64, at: &str) -> Result<Tensor> {
        const OP: &str = "send_recv";
        let deadline = Instant::now() + self.timeout;
        let size = self.shared.size;
        let peer = self.shared.label.global(src);
        let mut state = self.shared.lock();
        loop {
            let queue = &mut state.p2p[self.position * size + src];
            match queue.front() {
                Some(m) if m.seq == seq => {
                    return match queue.pop_front().map(|m| m.payload) {
                        Some(Payload::Tensor(t)) => Ok(t),
                        _ => Err(self.error(
                            OP,
                            at,
                            ErrorKind::Invalid(format!("rank {peer} sent no tensor")),
                        )),
                    };
                }
                Some(m) => {
                    let kind = ErrorKind::Mismatch {
                        peer,
                        theirs: format!("its transfer #{} to this rank", m.seq),
                        ours: format!("this rank's transfer #{seq} from it"),
                    };
                    return Err(self.error(OP, at, kind));
                }
                None => {
                    if let Presence::Left { panicked } = state.presence[src] {
                        return Err(self.error(OP, at, ErrorKind::PeerGone { peer, panicked }));
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let kind = ErrorKind::Timeout {
                    waited: self.timeout,
                    missing: vec![peer],
                };
                return Err(self.error(OP, at, kind));
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn copy_of(&self, tensor: &Tensor, op: &'static str, at: &str) -> Result<Tensor> {
        tensor.f_detach_copy().map_err(self.tensor_error(op, at))
    }
}

impl Drop for LocalCollective {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        self.shared.lock().presence[self.position] = Presence::Left { panicked };
        self.shared.arrived.notify_all();
    }
}

fn expect_tensor(payload: Payload) -> Option<Tensor> {
    match payload {
        Payload::Tensor(t) => Some(t),
        _ => None,
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.position
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn label(&self) -> &GroupLabel {
        &self.shared.label
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor, at: &str) -> Result<()> {
        const OP: &str = "all_reduce_sum";
        let seq = self.begin();
        for dst in self.everyone() {
            let copy = self.copy_of(tensor, OP, at)?;
            self.send(dst, seq, OP, Payload::Tensor(copy));
        }
        let parts = self.receive(&self.everyone(), seq, OP, at)?;
        let shape = tensor.size();
        let mut sum: Option<Tensor> = None;
        for (src, part) in parts.into_iter().enumerate() {
            let part = expect_tensor(part).unwrap_or_default();
            if !part.defined() || part.size() != shape || part.kind() != tensor.kind() {
                let message =
                    format!(
                    "rank {} sent a tensor of shape {:?} ({:?}) where this rank has {:?} ({:?})",
                    self.shared.label.global(src),
                    if part.defined() { part.size() } else { vec![] },
                    if part.defined() { Some(part.kind()) } else { None },
                    shape,
                    tensor.kind()
                );
                return Err(self.error(OP, at, ErrorKind::Invalid(message)));
            }
            sum = Some(match sum {
                None => part,
                Some(acc) => acc.f_add(&part).map_err(self.tensor_error(OP, at))?,
            });
        }
        if let Some(sum) = sum {
            tch::no_grad(|| tensor.f_copy_(&sum)).map_err(self.tensor_error(OP, at))?;
        }
        Ok(())
    }

    fn all_gather_counts(&self, counts: &[i64], at: &str) -> Result<Vec<Vec<i64>>> {
        const OP: &str = "all_gather_counts";
        let seq = self.begin();
        for dst in self.everyone() {
            self.send(dst, seq, OP, Payload::Counts(counts.to_vec()));
        }
        let parts = self.receive(&self.everyone(), seq, OP, at)?;
        Ok(parts
            .into_iter()
            .map(|p| match p {
                Payload::Counts(c) => c,
                _ => Vec::new(),
            })
            .collect())
    }

    fn all_to_all_v(
        &self,
        send: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
        at: &str,
    ) -> Result<Tensor> {
        const OP: &str = "all_to_all_v";
        let seq = self.begin();
        let size = self.shared.size;
        let rows = send.size().first().copied().unwrap_or(0);
        let invalid = |message: String| self.error(OP, at, ErrorKind::Invalid(message));
        check_all_to_all_counts(size, rows, send_counts, recv_counts).map_err(invalid)?;
        let parts = send
            .f_split_with_sizes(send_counts, 0)
            .map_err(self.tensor_error(OP, at))?;
        for (dst, part) in parts.iter().enumerate() {
            let copy = self.copy_of(part, OP, at)?;
            self.send(dst, seq, OP, Payload::Tensor(copy));
        }
        let received = self.receive(&self.everyone(), seq, OP, at)?;
        let mut pieces = Vec::with_capacity(size);
        for (src, part) in received.into_iter().enumerate() {
            let part = expect_tensor(part).unwrap_or_default();
            let got = if part.defined() {
                part.size().first().copied().unwrap_or(0)
            } else {
                -1
            };
            if got != recv_counts[src] || part.size().get(1..) != send.size().get(1..) {
                return Err(invalid(format!(
                    "expected {} rows of shape {:?} from rank {}, got {:?}",
                    recv_counts[src],
                    send.size().get(1..).unwrap_or_default(),
                    self.shared.label.global(src),
                    if part.defined() { part.size() } else { vec![] }
                )));
            }
            pieces.push(part);
        }
        Tensor::f_cat(&pieces, 0).map_err(self.tensor_error(OP, at))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize, at: &str) -> Result<()> {
        const OP: &str = "broadcast";
        let seq = self.begin();
        if root >= self.shared.size {
            let message = format!(
                "root {root} is outside a group of {} ranks",
                self.shared.size
            );
            return Err(self.error(OP, at, ErrorKind::Invalid(message)));
        }
        if self.position == root {
            for dst in self.everyone().into_iter().filter(|&d| d != root) {
                let copy = self.copy_of(tensor, OP, at)?;
                self.send(dst, seq, OP, Payload::Tensor(copy));
            }
            return Ok(());
        }
        let part = self
            .receive(&[root], seq, OP, at)?
            .into_iter()
            .next()
            .and_then(expect_tensor);
        match part {
            Some(part) if part.size() == tensor.size() && part.kind() == tensor.kind() => {
                tch::no_grad(|| tensor.f_copy_(&part)).map_err(self.tensor_error(OP, at))
            }
            _ => Err(self.error(
                OP,
                at,
                ErrorKind::Invalid(format!(
                    "the root's tensor does not match this rank's {:?}",
                    tensor.size()
                )),
            )),
        }
    }

    fn barrier(&self, at: &str) -> Result<()> {
        const OP: &str = "barrier";
        let seq = self.begin();
        for dst in self.everyone() {
            self.send(dst, seq, OP, Payload::Empty);
        }
        self.receive(&self.everyone(), seq, OP, at).map(|_| ())
    }

    fn send_recv(&self, transfers: &mut [PeerTransfer<'_>], at: &str) -> Result<()> {
        const OP: &str = "send_recv";
        let size = self.shared.size;
        check_peers(size, transfers).map_err(|m| self.error(OP, at, ErrorKind::Invalid(m)))?;
        // Sends never wait (they are queued), so all of them go first.
        for t in transfers.iter() {
            if let PeerTransfer::Send { tensor, to } = t {
                let copy = self.copy_of(tensor, OP, at)?;
                let seq = {
                    let mut sent = self.p2p_sent.borrow_mut();
                    sent[*to] += 1;
                    sent[*to] - 1
                };
                let mut state = self.shared.lock();
                if let Presence::Here = state.presence[*to] {
                    state.p2p[*to * size + self.position].push_back(Message {
                        seq,
                        op: OP,
                        payload: Payload::Tensor(copy),
                    });
                }
                drop(state);
                self.shared.arrived.notify_all();
            }
        }
        for t in transfers.iter_mut() {
            if let PeerTransfer::Recv { into, from } = t {
                let seq = self.p2p_received.borrow()[*from];
                let got = self.receive_p2p(*from, seq, at)?;
                self.p2p_received.borrow_mut()[*from] += 1;
                let peer = self.shared.label.global(*from);
                if let Some(message) = received_mismatch(peer, &got, into) {
                    return Err(self.error(OP, at, ErrorKind::Invalid(message)));
                }
                tch::no_grad(|| into.f_copy_(&got)).map_err(self.tensor_error(OP, at))?;
            }
        }
        Ok(())
    }
}

/// Every rank's [`Groups`] of in-process handles for `layout`, indexed by global rank.
pub fn local_world(layout: &GroupLayout, timeout: Duration) -> Result<Vec<Groups>, LayoutError> {
    layout.validate()?;
    let mut handles: Vec<Vec<Option<LocalCollective>>> = Vec::new();
    let mut index = std::collections::BTreeMap::new();
    for kind in super::GroupKind::ALL {
        for members in layout.groups(kind) {
            index.insert((kind, members[0]), handles.len());
            let label = GroupLabel {
                kind,
                members: members.clone(),
            };
            handles.push(
                LocalCollective::group(label, timeout)
                    .into_iter()
                    .map(Some)
                    .collect(),
            );
        }
    }
    let mut world = Vec::with_capacity(layout.world);
    for rank in 0..layout.world {
        let groups = Groups::connect(layout, rank, |label, position| {
            let slot = match index.get(&(label.kind, label.members[0])) {
                Some(&i) => handles[i].get_mut(position).and_then(Option::take),
                None => None,
            };
            match slot {
                Some(handle) => Ok(Box::new(handle) as Box<dyn Collective>),
                None => anyhow::bail!("no in-process handle for {label} position {position}"),
            }
        });
        // `validate` passed, so every handle exists and is taken once.
        match groups {
            Ok(groups) => world.push(groups),
            Err(_) => {
                return Err(LayoutError::Missing {
                    kind: "in-process",
                    rank,
                })
            }
        }
    }
    Ok(world)
}

/// Every rank's in-process handle to its tensor group, indexed by global rank; `groups`
/// partitions `0..world` (e.g. [`super::tensor_groups`]). Hand each rank its handle beside
/// its [`Groups`] from [`local_world`].
pub fn local_tensor_groups(
    world: usize,
    groups: &[Vec<usize>],
    timeout: Duration,
) -> Result<Vec<LocalCollective>, LayoutError> {
    let mut slots: Vec<Option<LocalCollective>> = (0..world).map(|_| None).collect();
    for members in groups {
        if members.is_empty() {
            return Err(LayoutError::EmptyGroup { kind: "tensor" });
        }
        let label = GroupLabel {
            kind: super::GroupKind::Tensor,
            members: members.clone(),
        };
        for (&rank, handle) in members.iter().zip(LocalCollective::group(label, timeout)) {
            match slots.get_mut(rank) {
                None => {
                    return Err(LayoutError::OutOfRange {
                        kind: "tensor",
                        rank,
                        world,
                    })
                }
                Some(Some(_)) => {
                    return Err(LayoutError::Duplicate {
                        kind: "tensor",
                        rank,
                    })
                }
                Some(slot) => *slot = Some(handle),
            }
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(rank, s)| {
            s.ok_or(LayoutError::Missing {
                kind: "tensor",
                rank,
            })
        })
        .collect()
}

/// Run `body` once per rank, each on its own thread with that rank's groups; the
/// results (or panics) in rank order. A rank that panics drops its handles, so the
/// others get [`ErrorKind::PeerGone`] instead of waiting.
pub fn run_ranks<R, F>(world: Vec<Groups>, body: F) -> Vec<std::thread::Result<R>>
where
    R: Send,
    F: Fn(Groups) -> R + Sync,
{
    std::thread::scope(|scope| {
        let threads: Vec<_> = world
            .into_iter()
            .map(|groups| {
                let body = &body;
                scope.spawn(move || body(groups))
            })
            .collect();
        threads.into_iter().map(|t| t.join()).collect()
    })
}
