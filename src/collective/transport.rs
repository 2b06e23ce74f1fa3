//! The collectives of the in-process ([`super::local`]) and TCP ([`super::tcp`]) backends,
//! written once over a message [`Transport`].
//!
//! This module owns:
//! - [`MessageCollective`]: every [`Collective`] operation as point-to-point messages (who
//!   sends what to whom, the order in which a sum adds the contributions, which arguments
//!   are refused), numbered per group for collectives and per pair of ranks for
//!   [`Collective::send_recv`], so that the two never mix;
//! - the [`Inbox`] where a rank's incoming messages wait: matching each message to the
//!   operation that expects it by operation number and name, and the errors a waiter gets
//!   (ranks out of step, a peer that left, the timeout);
//! - the [`Transport`] trait: the one thing a backend adds, carrying a message into a
//!   peer's inbox.
//!
//! It must not know how messages travel (threads, sockets, wire formats), nor about NCCL,
//! which is a backend of its own, nor about models.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::Tensor;

use super::error::{tensor_failure, CollectiveError, ErrorKind};
use super::groups::{GroupKind, GroupLabel};
use super::{
    check_all_to_all_counts, check_peers, received_mismatch, Collective, PeerTransfer, Result,
};

/// Every operation a message can belong to (a transport that writes the name as a number
/// numbers it by this list).
pub const OPERATIONS: [&str; 6] = [
    "all_reduce_sum",
    "all_gather_counts",
    "all_to_all_v",
    "broadcast",
    "barrier",
    "send_recv",
];

/// What one message carries.
#[derive(Debug)]
pub enum Payload {
    Empty,
    Counts(Vec<i64>),
    Tensor(Tensor),
}

impl Payload {
    /// The payload with its tensor copied, for a receiver that must own what it gets (it
    /// sums into it, copies it out) while the sender goes on changing its own.
    pub fn detached_copy(self) -> std::result::Result<Payload, tch::TchError> {
        Ok(match self {
            Payload::Tensor(t) => Payload::Tensor(t.f_detach_copy()?),
            other => other,
        })
    }
}

/// One message: the sender's operation number on its [`Channel`], the operation, and the
/// payload.
pub struct Message {
    pub seq: u64,
    pub op: &'static str,
    pub payload: Payload,
}

/// How messages are numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The group's collectives, numbered per group.
    Collective,
    /// Point-to-point transfers, numbered per pair of ranks.
    PointToPoint,
}

/// Which mailbox of the receiver a message goes to: its group (kind and first member;
/// each kind's groups partition the world, so the pair is unique) and channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub kind: GroupKind,
    pub first: usize,
    pub channel: Channel,
}

/// A receiver: its position in the group and its global rank.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub position: usize,
    pub rank: usize,
}

/// How one backend carries messages between the ranks of a group.
pub trait Transport: Send {
    /// Where this rank's messages arrive.
    fn inbox(&self) -> &Inbox;
    /// Carries `message` into `to`'s inbox, sent by this rank; never waits for `to` to
    /// receive it. The receiver must get its own copy of a tensor: the sender may change
    /// its tensor once this returns.
    fn send(&self, to: Peer, route: Route, message: Message) -> std::result::Result<(), ErrorKind>;
}

/// One rank's incoming messages, by route and sender (a global rank), and the senders
/// that left.
pub struct Inbox {
    mail: Mutex<Mail>,
    arrived: Condvar,
}

#[derive(Default)]
struct Mail {
    queues: HashMap<(Route, usize), VecDeque<Message>>,
    /// Peers that left (dropped their handle, ended, lost their connection).
    gone: HashMap<usize, Departure>,
}

/// How a peer left: whether it panicked, and in which order (0 for the first to leave).
#[derive(Clone, Copy)]
struct Departure {
    panicked: bool,
    order: usize,
}

impl Departure {
    /// Whether this departure is the one to name rather than `other`: a panic before a
    /// peer that left without one, else the earlier (a peer that leaves after another
    /// most likely follows it).
    fn names_the_cause_before(self, other: Departure) -> bool {
        (self.panicked, std::cmp::Reverse(self.order))
            > (other.panicked, std::cmp::Reverse(other.order))
    }
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            mail: Mutex::new(Mail::default()),
            arrived: Condvar::new(),
        }
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Mail> {
        // Nothing panics while holding the lock; recover the data if a test thread did.
        self.mail
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `message` from global rank `from` and wakes the waiters.
    pub fn deliver(&self, route: Route, from: usize, message: Message) {
        self.lock()
            .queues
            .entry((route, from))
            .or_default()
            .push_back(message);
        self.arrived.notify_all();
    }

    /// Records that global rank `peer` left (the first record stays) and wakes the
    /// waiters: one waiting for `peer` with nothing queued from it fails at once.
    pub fn depart(&self, peer: usize, panicked: bool) {
        let mut mail = self.lock();
        let order = mail.gone.len();
        mail.gone
            .entry(peer)
            .or_insert(Departure { panicked, order });
        drop(mail);
        self.arrived.notify_all();
    }

    /// Whether global rank `peer` left.
    pub fn has_left(&self, peer: usize) -> bool {
        self.lock().gone.contains_key(&peer)
    }

    /// Waits at most `timeout` for message `seq` of `op` on `route` from each global rank
    /// of `sources`; the payloads in the order of `sources`. A message of another
    /// operation at the head of a queue is a mismatch; a source that left with nothing
    /// queued fails the wait at once (naming one that panicked, else the one that left first).
    pub fn take(
        &self,
        route: Route,
        sources: &[usize],
        seq: u64,
        op: &'static str,
        timeout: Duration,
    ) -> std::result::Result<Vec<Payload>, ErrorKind> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<Payload>> = sources.iter().map(|_| None).collect();
        let mut mail = self.lock();
        loop {
            let expected = Expected { route, seq, op };
            if let Some((peer, panicked)) = mail.take_arrived(expected, sources, &mut got)? {
                return Err(ErrorKind::PeerGone { peer, panicked });
            }
            if got.iter().all(Option::is_some) {
                return Ok(got.into_iter().flatten().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ErrorKind::Timeout {
                    waited: timeout,
                    missing: still_missing(&got, sources),
                });
            }
            mail = self
                .arrived
                .wait_timeout(mail, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// The message a waiter expects from each of its sources.
#[derive(Clone, Copy)]
struct Expected {
    route: Route,
    seq: u64,
    op: &'static str,
}

impl Mail {
    /// Moves the `expected` message of each source still missing in `got` (by position in
    /// `sources`) out of its queue. A source whose queue starts with another message is a
    /// mismatch; of the sources that left with nothing queued, the one to name (see
    /// [`Departure::names_the_cause_before`]) and whether it panicked.
    fn take_arrived(
        &mut self,
        expected: Expected,
        sources: &[usize],
        got: &mut [Option<Payload>],
    ) -> std::result::Result<Option<(usize, bool)>, ErrorKind> {
        let mut gone: Option<(usize, Departure)> = None;
        for (slot, &src) in got.iter_mut().zip(sources) {
            if slot.is_some() {
                continue;
            }
            let queue = self.queues.entry((expected.route, src)).or_default();
            match queue.front() {
                Some(m) if m.seq == expected.seq && m.op == expected.op => {
                    *slot = queue.pop_front().map(|m| m.payload);
                }
                Some(m) => return Err(mismatch(expected, src, m)),
                None => {
                    if let Some(&left) = self.gone.get(&src) {
                        if gone.is_none_or(|(_, named)| left.names_the_cause_before(named)) {
                            gone = Some((src, left));
                        }
                    }
                }
            }
        }
        Ok(gone.map(|(src, left)| (src, left.panicked)))
    }
}

/// `src`'s message `m` at the head of its queue where a waiter `expected` another.
fn mismatch(expected: Expected, src: usize, m: &Message) -> ErrorKind {
    let Expected { route, seq, op } = expected;
    let (theirs, ours) = match route.channel {
        Channel::Collective => (
            format!("{} (its collective #{})", m.op, m.seq),
            format!("{op} (its collective #{seq})"),
        ),
        Channel::PointToPoint => (
            format!("its transfer #{} to this rank", m.seq),
            format!("this rank's transfer #{seq} from it"),
        ),
    };
    ErrorKind::Mismatch {
        peer: src,
        theirs,
        ours,
    }
}

/// The sources whose message has not come, in the order of `sources`.
fn still_missing(got: &[Option<Payload>], sources: &[usize]) -> Vec<usize> {
    got.iter()
        .zip(sources)
        .filter(|(slot, _)| slot.is_none())
        .map(|(_, &src)| src)
        .collect()
}

/// One rank's handle to one group whose operations are messages over transport `T`.
pub struct MessageCollective<T> {
    transport: T,
    label: GroupLabel,
    position: usize,
    timeout: Duration,
    next_seq: Cell<u64>,
    /// Point-to-point transfers sent to / received from each position so far.
    p2p_sent: RefCell<Vec<u64>>,
    p2p_received: RefCell<Vec<u64>>,
}

impl<T: Transport> MessageCollective<T> {
    /// The handle of position `position` in the group `label`, over `transport`.
    pub(crate) fn new(
        transport: T,
        label: GroupLabel,
        position: usize,
        timeout: Duration,
    ) -> MessageCollective<T> {
        let size = label.members.len();
        MessageCollective {
            transport,
            label,
            position,
            timeout,
            next_seq: Cell::new(0),
            p2p_sent: RefCell::new(vec![0; size]),
            p2p_received: RefCell::new(vec![0; size]),
        }
    }

    fn error(&self, op: &'static str, at: &str, kind: ErrorKind) -> CollectiveError {
        CollectiveError::new(&self.label, op, at, kind)
    }

    fn tensor_error(
        &self,
        op: &'static str,
        at: &str,
    ) -> impl Fn(tch::TchError) -> CollectiveError {
        tensor_failure(&self.label, op, at)
    }

    fn begin(&self) -> u64 {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        seq
    }

    fn everyone(&self) -> Vec<usize> {
        (0..self.label.members.len()).collect()
    }

    fn route(&self, channel: Channel) -> Route {
        Route {
            kind: self.label.kind,
            first: self.label.members.first().copied().unwrap_or(0),
            channel,
        }
    }

    /// Sends `payload` of operation `seq` on `channel` to group position `to`.
    fn send_message(
        &self,
        channel: Channel,
        to: usize,
        seq: u64,
        op: &'static str,
        payload: Payload,
        at: &str,
    ) -> Result<()> {
        let to = Peer {
            position: to,
            rank: self.label.global(to),
        };
        let message = Message { seq, op, payload };
        self.transport
            .send(to, self.route(channel), message)
            .map_err(|kind| self.error(op, at, kind))
    }

    /// Waits for operation `seq`'s message on `channel` from every group position in
    /// `sources`; payloads in that order.
    fn receive_messages(
        &self,
        channel: Channel,
        sources: &[usize],
        seq: u64,
        op: &'static str,
        at: &str,
    ) -> Result<Vec<Payload>> {
        let sources: Vec<usize> = sources.iter().map(|&s| self.label.global(s)).collect();
        self.transport
            .inbox()
            .take(self.route(channel), &sources, seq, op, self.timeout)
            .map_err(|kind| self.error(op, at, kind))
    }

    /// Sends this rank's part of collective `seq` to every rank and waits for theirs.
    fn exchange_with_everyone(
        &self,
        seq: u64,
        op: &'static str,
        mine: impl Fn() -> Payload,
        at: &str,
    ) -> Result<Vec<Payload>> {
        for dst in self.everyone() {
            self.send_message(Channel::Collective, dst, seq, op, mine(), at)?;
        }
        self.receive_messages(Channel::Collective, &self.everyone(), seq, op, at)
    }
}

fn expect_tensor(payload: Payload) -> Option<Tensor> {
    match payload {
        Payload::Tensor(t) => Some(t),
        _ => None,
    }
}

impl<T: Transport> Collective for MessageCollective<T> {
    fn rank(&self) -> usize {
        self.position
    }

    fn size(&self) -> usize {
        self.label.members.len()
    }

    fn label(&self) -> &GroupLabel {
        &self.label
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor, at: &str) -> Result<()> {
        const OP: &str = "all_reduce_sum";
        let seq = self.begin();
        let mine = || Payload::Tensor(tensor.shallow_clone());
        let parts = self.exchange_with_everyone(seq, OP, mine, at)?;
        let shape = tensor.size();
        let mut sum: Option<Tensor> = None;
        // In rank order, so that every rank adds the same numbers in the same order.
        for (src, part) in parts.into_iter().enumerate() {
            let part = expect_tensor(part).unwrap_or_default();
            if !part.defined() || part.size() != shape || part.kind() != tensor.kind() {
                let message =
                    format!(
                    "rank {} sent a tensor of shape {:?} ({:?}) where this rank has {:?} ({:?})",
                    self.label.global(src),
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
            let sum = sum
                .f_to_device(tensor.device())
                .map_err(self.tensor_error(OP, at))?;
            tch::no_grad(|| tensor.f_copy_(&sum)).map_err(self.tensor_error(OP, at))?;
        }
        Ok(())
    }

    fn all_gather_counts(&self, counts: &[i64], at: &str) -> Result<Vec<Vec<i64>>> {
        const OP: &str = "all_gather_counts";
        let seq = self.begin();
        let mine = || Payload::Counts(counts.to_vec());
        let parts = self.exchange_with_everyone(seq, OP, mine, at)?;
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
        let size = self.size();
        let rows = send.size().first().copied().unwrap_or(0);
        let invalid = |message: String| self.error(OP, at, ErrorKind::Invalid(message));
        check_all_to_all_counts(size, rows, send_counts, recv_counts).map_err(invalid)?;
        let parts = send
            .f_split_with_sizes(send_counts, 0)
            .map_err(self.tensor_error(OP, at))?;
        for (dst, part) in parts.iter().enumerate() {
            let payload = Payload::Tensor(part.shallow_clone());
            self.send_message(Channel::Collective, dst, seq, OP, payload, at)?;
        }
        let received = self.receive_messages(Channel::Collective, &self.everyone(), seq, OP, at)?;
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
                    self.label.global(src),
                    if part.defined() { part.size() } else { vec![] }
                )));
            }
            pieces.push(part);
        }
        Tensor::f_cat(&pieces, 0)
            .and_then(|t| t.f_to_device(send.device()))
            .map_err(self.tensor_error(OP, at))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize, at: &str) -> Result<()> {
        const OP: &str = "broadcast";
        let seq = self.begin();
        if root >= self.size() {
            let message = format!("root {root} is outside a group of {} ranks", self.size());
            return Err(self.error(OP, at, ErrorKind::Invalid(message)));
        }
        if self.position == root {
            for dst in self.everyone().into_iter().filter(|&d| d != root) {
                let payload = Payload::Tensor(tensor.shallow_clone());
                self.send_message(Channel::Collective, dst, seq, OP, payload, at)?;
            }
            return Ok(());
        }
        let part = self
            .receive_messages(Channel::Collective, &[root], seq, OP, at)?
            .into_iter()
            .next()
            .and_then(expect_tensor);
        match part {
            Some(part) if part.size() == tensor.size() && part.kind() == tensor.kind() => {
                let part = part
                    .f_to_device(tensor.device())
                    .map_err(self.tensor_error(OP, at))?;
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
        self.exchange_with_everyone(seq, OP, || Payload::Empty, at)
            .map(|_| ())
    }

    fn send_recv(&self, transfers: &mut [PeerTransfer<'_>], at: &str) -> Result<()> {
        const OP: &str = "send_recv";
        check_peers(self.size(), transfers)
            .map_err(|m| self.error(OP, at, ErrorKind::Invalid(m)))?;
        // A send never waits for the peer to receive, so all sends go first: two ranks
        // that send to each other in one batch do not wait for each other.
        for t in transfers.iter() {
            if let PeerTransfer::Send { tensor, to } = t {
                let seq = {
                    let mut sent = self.p2p_sent.borrow_mut();
                    sent[*to] += 1;
                    sent[*to] - 1
                };
                let payload = Payload::Tensor(tensor.shallow_clone());
                self.send_message(Channel::PointToPoint, *to, seq, OP, payload, at)?;
            }
        }
        for t in transfers.iter_mut() {
            if let PeerTransfer::Recv { into, from } = t {
                let seq = self.p2p_received.borrow()[*from];
                let payload = self
                    .receive_messages(Channel::PointToPoint, &[*from], seq, OP, at)?
                    .into_iter()
                    .next();
                self.p2p_received.borrow_mut()[*from] += 1;
                let peer = self.label.global(*from);
                let Some(Payload::Tensor(got)) = payload else {
                    let message = format!("rank {peer} sent no tensor");
                    return Err(self.error(OP, at, ErrorKind::Invalid(message)));
                };
                if let Some(message) = received_mismatch(peer, &got, into) {
                    return Err(self.error(OP, at, ErrorKind::Invalid(message)));
                }
                let got = got
                    .f_to_device(into.device())
                    .map_err(self.tensor_error(OP, at))?;
                tch::no_grad(|| into.f_copy_(&got)).map_err(self.tensor_error(OP, at))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(channel: Channel) -> Route {
        Route {
            kind: GroupKind::Pipeline,
            first: 0,
            channel,
        }
    }

    fn message(seq: u64, op: &'static str) -> Message {
        Message {
            seq,
            op,
            payload: Payload::Counts(vec![seq as i64]),
        }
    }

    const SOON: Duration = Duration::from_millis(50);

    #[test]
    fn messages_queued_before_a_peer_left_are_still_received() {
        let inbox = Inbox::default();
        let collective = route(Channel::Collective);
        inbox.deliver(collective, 3, message(0, "barrier"));
        inbox.depart(3, false);
        let got = inbox.take(collective, &[3], 0, "barrier", SOON).unwrap();
        assert!(matches!(got.as_slice(), [Payload::Counts(c)] if c == &[0]));
        let e = inbox
            .take(collective, &[3], 1, "barrier", SOON)
            .unwrap_err();
        assert!(matches!(
            e,
            ErrorKind::PeerGone {
                peer: 3,
                panicked: false
            }
        ));
    }

    #[test]
    fn of_two_peers_gone_the_one_that_panicked_is_named() {
        let inbox = Inbox::default();
        inbox.depart(3, false);
        inbox.depart(5, true);
        // a second record of the same departure does not change the first
        inbox.depart(5, false);
        let e = inbox
            .take(route(Channel::Collective), &[3, 5], 0, "barrier", SOON)
            .unwrap_err();
        assert!(matches!(
            e,
            ErrorKind::PeerGone {
                peer: 5,
                panicked: true
            }
        ));
    }

    /// Over TCP no departure is marked as a panic: of two peers gone before this rank
    /// waits for them, the one that left first is named (the other most likely left
    /// because of it), not the one first in the group.
    #[test]
    fn of_two_peers_gone_the_one_that_left_first_is_named() {
        let inbox = Inbox::default();
        inbox.depart(5, false);
        inbox.depart(3, false);
        let e = inbox
            .take(route(Channel::Collective), &[3, 5], 0, "barrier", SOON)
            .unwrap_err();
        assert!(
            matches!(
                e,
                ErrorKind::PeerGone {
                    peer: 5,
                    panicked: false
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_timeout_lists_the_silent_sources_in_order() {
        let inbox = Inbox::default();
        let collective = route(Channel::Collective);
        inbox.deliver(collective, 7, message(0, "all_reduce_sum"));
        let e = inbox
            .take(collective, &[2, 7, 4], 0, "all_reduce_sum", SOON)
            .unwrap_err();
        match e {
            ErrorKind::Timeout { waited, missing } => {
                assert_eq!((waited, missing), (SOON, vec![2, 4]));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Collectives and point-to-point transfers are numbered apart and say so when out of
    /// step; a message on one channel never answers a wait on the other.
    #[test]
    fn mismatches_name_the_operation_or_the_transfer() {
        let inbox = Inbox::default();
        let (collective, p2p) = (route(Channel::Collective), route(Channel::PointToPoint));
        inbox.deliver(collective, 1, message(4, "barrier"));
        inbox.deliver(p2p, 1, message(2, "send_recv"));
        let e = inbox
            .take(collective, &[1], 4, "all_gather_counts", SOON)
            .unwrap_err();
        assert_eq!(
            CollectiveError::new(&"data group [0,1]", "all_gather_counts", "step 2", e)
                .to_string(),
            "data group [0,1]: all_gather_counts at \"step 2\": rank 1 is at barrier (its collective #4) while this rank is at all_gather_counts (its collective #4): the ranks call collectives in different orders"
        );
        let e = inbox.take(p2p, &[1], 1, "send_recv", SOON).unwrap_err();
        assert!(matches!(
            &e,
            ErrorKind::Mismatch { peer: 1, theirs, ours }
                if theirs == "its transfer #2 to this rank" && ours == "this rank's transfer #1 from it"
        ));
        assert!(inbox.take(p2p, &[1], 2, "send_recv", SOON).is_ok());
    }
}
