//! The in-process [`Collective`]: one thread per rank, an inbox per rank shared between
//! the group's threads. Used by CI to test multi-rank behaviour without GPUs, and by a
//! CPU run that wants several ranks in one process.
//!
//! The operations are [`super::MessageCollective`]'s, over the [`InProcess`] transport: a
//! message is a copy of the sender's tensor queued in the receiver's inbox. Dropping a
//! handle (also by unwinding from a panic) marks the rank as gone in every inbox of its
//! group and wakes every waiter.

use super::groups::{check_partition, GroupLabel, GroupLayout, Groups, LayoutError};
use super::transport::{Inbox, Message, MessageCollective, Peer, Route, Transport};
use super::{Collective, ErrorKind};
use std::sync::Arc;
use std::time::Duration;

/// The in-process transport of one rank of one group: a message goes straight into the
/// receiver's inbox, shared between the group's threads.
pub struct InProcess {
    /// Every position's inbox.
    inboxes: Arc<[Inbox]>,
    position: usize,
    /// This rank's global rank.
    rank: usize,
}

impl Transport for InProcess {
    fn inbox(&self) -> &Inbox {
        &self.inboxes[self.position]
    }

    fn send(&self, to: Peer, route: Route, message: Message) -> Result<(), ErrorKind> {
        let inbox = &self.inboxes[to.position];
        if inbox.has_left(to.rank) {
            // Nobody will read it. Not an error here: the failure belongs to the rank that
            // left, and this rank reports it when it waits for that rank's part.
            return Ok(());
        }
        let payload = message.payload.detached_copy().map_err(ErrorKind::Tensor)?;
        inbox.deliver(route, self.rank, Message { payload, ..message });
        Ok(())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Also when unwinding from a panic: the waiters fail at once instead of timing out.
        let panicked = std::thread::panicking();
        for inbox in self.inboxes.iter() {
            inbox.depart(self.rank, panicked);
        }
    }
}

/// One rank's handle to an in-process group. Create a group's handles with
/// [`LocalCollective::group`] and move each into its rank's thread.
pub type LocalCollective = MessageCollective<InProcess>;

impl MessageCollective<InProcess> {
    /// The handles of one group, indexed by position in `label.members`.
    pub fn group(label: GroupLabel, timeout: Duration) -> Vec<LocalCollective> {
        let size = label.members.len();
        let inboxes: Arc<[Inbox]> = (0..size).map(|_| Inbox::default()).collect();
        (0..size)
            .map(|position| {
                let transport = InProcess {
                    inboxes: Arc::clone(&inboxes),
                    position,
                    rank: label.global(position),
                };
                MessageCollective::new(transport, label.clone(), position, timeout)
            })
            .collect()
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
    check_partition("tensor", world, groups)?;
    let mut slots: Vec<Option<LocalCollective>> = (0..world).map(|_| None).collect();
    for members in groups {
        let label = GroupLabel {
            kind: super::GroupKind::Tensor,
            members: members.clone(),
        };
        for (&rank, handle) in members.iter().zip(LocalCollective::group(label, timeout)) {
            slots[rank] = Some(handle);
        }
    }
    // A partition: every rank has its handle.
    Ok(slots.into_iter().flatten().collect())
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
