//! A [`Collective`] between processes over TCP, for CPU ranks that do not share a process:
//! `fmoec run --ranks K --nodes N` (K processes per node) and CPU ranks started by torchrun.
//! The in-process [`super::local`] handles reach only threads of one process; NCCL only GPUs.
//!
//! Connecting ([`connect`]): every rank listens on a port of its own; the rendezvous
//! ([`DistEnv::gather_addresses`], on `MASTER_ADDR:MASTER_PORT`) gives every rank every
//! other's address; then each rank connects to every lower rank and accepts the higher ones:
//! one TCP connection per pair of ranks, shared by all groups, each opened with a hello that
//! carries the rank and the layout's fingerprint (a rank started with other settings is
//! refused). One reader thread per connection sorts incoming messages into the process's
//! inbox by (group, sender).
//!
//! The operations are [`super::MessageCollective`]'s, over the [`TcpTransport`], as the
//! in-process ones are: ranks that call collectives in different orders get a mismatch
//! error, a peer whose connection closed (its process ended or died) fails the waiters at
//! once, every wait ends by the handle's timeout, and all-reduce adds the contributions in
//! rank order, so every rank gets the same bits. Tensors travel as their raw bytes (any
//! device: they go through the CPU).
//!
//! Wire format of one message (little-endian): group kind `u8` (with bit 7 set for a
//! point-to-point transfer, numbered per pair of ranks instead of per group), the group's
//! first member `u32`, operation number `u64`, operation `u8`, payload `u8` (0 none, 1
//! counts: `u64` n then n `i64`; 2 tensor: dtype `u8`, rank `u8`, that many `i64` sizes,
//! `u64` byte count, the bytes).
//!
//! It knows nothing about models, gates or NCCL.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::error::ErrorKind;
use super::groups::{GroupKind, GroupLabel, GroupLayout, Groups};
use super::rendezvous::{time_left, DistEnv};
use super::transport::{
    Channel, Inbox, Message, MessageCollective, Payload, Peer, Route, Transport, OPERATIONS,
};
use super::Collective;

const HELLO: &str = "FMOEC-MESH 1";
/// Largest tensor or counts message accepted (a corrupt length must not allocate terabytes).
const MAX_MESSAGE: u64 = 1 << 40;

/// Group kinds by their code on the wire.
const GROUP_KINDS: [GroupKind; 7] = [
    GroupKind::Data,
    GroupKind::Expert,
    GroupKind::ExpertData,
    GroupKind::Gate,
    GroupKind::Tensor,
    GroupKind::Pipeline,
    GroupKind::Embedding,
];

/// Set in the group kind's byte for a point-to-point transfer.
const P2P: u8 = 0x80;

/// Tensor dtypes by their code on the wire.
const DTYPES: [Kind; 9] = [
    Kind::Float,
    Kind::Double,
    Kind::BFloat16,
    Kind::Half,
    Kind::Int64,
    Kind::Int,
    Kind::Int8,
    Kind::Uint8,
    Kind::Bool,
];

/// The code of `item` in `list` (its position).
fn code_of<T: PartialEq>(list: &[T], item: &T) -> Option<u8> {
    list.iter().position(|x| x == item).map(|i| i as u8)
}

/// The group kind byte and first member of `route` on the wire.
fn route_code(route: Route) -> (u8, u32) {
    let kind = code_of(&GROUP_KINDS, &route.kind).unwrap_or_default();
    let channel = match route.channel {
        Channel::Collective => 0,
        Channel::PointToPoint => P2P,
    };
    (kind | channel, route.first as u32)
}

/// The route of a group kind byte and first member read from the wire.
fn code_route(kind: u8, first: u32) -> Option<Route> {
    let channel = if kind & P2P == 0 {
        Channel::Collective
    } else {
        Channel::PointToPoint
    };
    Some(Route {
        kind: *GROUP_KINDS.get((kind & !P2P) as usize)?,
        first: first as usize,
        channel,
    })
}

/// One process's connections to every other rank.
struct Mesh {
    rank: usize,
    /// Writing ends, by global rank (`None` for this rank).
    peers: Vec<Option<Mutex<TcpStream>>>,
    /// What the reader threads have received, for every group of this rank.
    inbox: Inbox,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Ends the reader threads (they see EOF) and tells the peers this rank is done.
        for peer in self.peers.iter().flatten() {
            if let Ok(stream) = peer.lock() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Encodes one message (see the module docs).
fn encode(route: Route, message: &Message) -> std::result::Result<Vec<u8>, String> {
    let (kind, first) = route_code(route);
    let mut out = Vec::new();
    out.push(kind);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&message.seq.to_le_bytes());
    out.push(code_of(&OPERATIONS, &message.op).unwrap_or(OPERATIONS.len() as u8));
    match &message.payload {
        Payload::Empty => out.push(0),
        Payload::Counts(counts) => {
            out.push(1);
            out.extend_from_slice(&(counts.len() as u64).to_le_bytes());
            for c in counts {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        Payload::Tensor(t) => {
            let code = code_of(&DTYPES, &t.kind())
                .ok_or_else(|| format!("cannot send a {:?} tensor over TCP", t.kind()))?;
            let t = t
                .f_detach()
                .and_then(|t| t.f_to_device(Device::Cpu))
                .and_then(|t| t.f_contiguous())
                .map_err(|e| e.to_string())?;
            let size = t.size();
            let numel = t.numel();
            let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut bytes, numel)
                .map_err(|e| e.to_string())?;
            out.push(2);
            out.push(code);
            out.push(size.len() as u8);
            for d in &size {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
    }
    Ok(out)
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn invalid(text: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, text)
}

/// Decodes one message; `Ok(None)` at a clean end of the stream.
fn decode(r: &mut impl Read) -> std::io::Result<Option<(Route, Message)>> {
    let kind = match read_u8(r) {
        Ok(k) => k,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let first = read_u32(r)?;
    let route = code_route(kind, first).ok_or_else(|| invalid(format!("group kind {kind}")))?;
    let seq = read_u64(r)?;
    let op = OPERATIONS
        .get(read_u8(r)? as usize)
        .copied()
        .unwrap_or("an unknown operation");
    let payload = match read_u8(r)? {
        0 => Payload::Empty,
        1 => Payload::Counts(decode_counts(r)?),
        2 => Payload::Tensor(decode_tensor(r)?),
        other => return Err(invalid(format!("payload type {other}"))),
    };
    Ok(Some((route, Message { seq, op, payload })))
}

/// Decodes a payload of counts: their number, then each as 8 bytes.
fn decode_counts(r: &mut impl Read) -> std::io::Result<Vec<i64>> {
    let n = read_u64(r)?;
    if n > MAX_MESSAGE / 8 {
        return Err(invalid(format!("a message of {n} counts")));
    }
    let mut counts = Vec::with_capacity(n as usize);
    for _ in 0..n {
        counts.push(read_u64(r)? as i64);
    }
    Ok(counts)
}

/// Decodes a tensor payload: its dtype code, shape and bytes, which must agree.
fn decode_tensor(r: &mut impl Read) -> std::io::Result<Tensor> {
    let code = read_u8(r)?;
    let kind = DTYPES
        .get(code as usize)
        .copied()
        .ok_or_else(|| invalid(format!("dtype code {code}")))?;
    let dims = read_u8(r)?;
    let mut size = Vec::with_capacity(dims as usize);
    for _ in 0..dims {
        size.push(read_u64(r)? as i64);
    }
    let n = read_u64(r)?;
    let numel: i64 = size.iter().product();
    if n > MAX_MESSAGE
        || size.iter().any(|&d| d < 0)
        || numel as u64 * kind.elt_size_in_bytes() as u64 != n
    {
        return Err(invalid(format!(
            "a tensor of shape {size:?} ({kind:?}) in {n} bytes"
        )));
    }
    let mut bytes = vec![0u8; n as usize];
    r.read_exact(&mut bytes)?;
    Tensor::f_from_data_size(&bytes, &size, kind).map_err(|e| invalid(e.to_string()))
}

/// Reads `peer`'s messages into the inbox until its connection ends.
fn read_from(mesh: std::sync::Weak<Mesh>, peer: usize, stream: TcpStream) {
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    // Until a clean end (the rank ended or failed) or a broken connection: either way the
    // waiters for this peer then fail at once, as for a rank that left the group.
    while let Ok(Some((route, message))) = decode(&mut reader) {
        match mesh.upgrade() {
            Some(mesh) => mesh.inbox.deliver(route, peer, message),
            None => return,
        }
    }
    if let Some(mesh) = mesh.upgrade() {
        mesh.inbox.depart(peer, false);
    }
}

/// The TCP transport of one rank, shared by its groups: a message to another rank is
/// written to that rank's connection, one to itself goes straight into its inbox.
pub struct TcpTransport(Arc<Mesh>);

impl Transport for TcpTransport {
    fn inbox(&self) -> &Inbox {
        &self.0.inbox
    }

    fn send(&self, to: Peer, route: Route, message: Message) -> Result<(), ErrorKind> {
        let mesh = &self.0;
        let global = to.rank;
        if global == mesh.rank {
            let payload = message.payload.detached_copy().map_err(ErrorKind::Tensor)?;
            mesh.inbox
                .deliver(route, global, Message { payload, ..message });
            return Ok(());
        }
        let bytes = encode(route, &message).map_err(ErrorKind::Invalid)?;
        let Some(Some(peer)) = mesh.peers.get(global) else {
            return Err(ErrorKind::Transport(format!(
                "no connection to rank {global}"
            )));
        };
        let mut stream = peer.lock().unwrap_or_else(|p| p.into_inner());
        stream.write_all(&bytes).map_err(|e| {
            use std::io::ErrorKind as Io;
            let closed = matches!(
                e.kind(),
                Io::BrokenPipe | Io::ConnectionReset | Io::ConnectionAborted
            );
            if closed || mesh.inbox.has_left(global) {
                ErrorKind::PeerGone {
                    peer: global,
                    panicked: false,
                }
            } else {
                ErrorKind::Transport(format!("sending to rank {global}: {e}"))
            }
        })
    }
}

/// One rank's handle to one group over TCP.
pub type TcpCollective = MessageCollective<TcpTransport>;

/// A fingerprint of what every rank must agree on: the layout and the tensor groups.
pub fn layout_tag(layout: &GroupLayout, tensor: Option<&[Vec<usize>]>) -> String {
    let digest = crate::digest::sha256_hex(format!("{layout:?} {tensor:?}").as_bytes());
    format!("layout-{}", &digest[..16])
}

/// The hello one rank sends the other on a new connection, and the answer.
fn hello(rank: usize, tag: &str) -> String {
    format!("{HELLO} {rank} {tag}\n")
}

/// Opens this process's connections to every other rank of `env`'s world and builds its
/// [`Groups`] for `layout` (and its tensor group, when `tensor` lists the tensor groups),
/// all on TCP. Every rank of the world calls it; it returns once every pair is connected, or
/// fails by `timeout` naming who did not come.
pub fn connect(
    layout: &GroupLayout,
    tensor: Option<&[Vec<usize>]>,
    env: &DistEnv,
    timeout: Duration,
) -> anyhow::Result<Groups> {
    let my_tensor = env.place_in(layout, tensor)?;
    let deadline = Instant::now() + timeout;
    let (rank, world) = (env.rank, env.world);
    let tag = layout_tag(layout, tensor);
    let listener = TcpListener::bind("0.0.0.0:0")
        .map_err(|e| anyhow::anyhow!("rank {rank}: cannot listen for its peers: {e}"))?;
    let port = listener.local_addr()?.port();
    let addresses = env.gather_addresses(&tag, port, timeout)?;

    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    // Connect to every lower rank, then accept every higher one: the lower ranks reach their
    // accepting phase first, so no pair waits on the other.
    for (peer, address) in addresses.iter().enumerate().take(rank) {
        streams[peer] = Some(greet_lower_rank(rank, peer, address, &tag, deadline)?);
    }
    accept_higher_ranks(&listener, rank, &tag, deadline, timeout, &mut streams)?;

    let mesh = start_mesh(rank, streams, timeout)?;
    groups_over_mesh(&mesh, layout, rank, my_tensor, timeout)
}

/// Rank `rank`'s connection to the lower rank `peer` at `address`: opened (retried until
/// `deadline`), this rank's hello sent, and the peer's `OK` read.
fn greet_lower_rank(
    rank: usize,
    peer: usize,
    address: &str,
    tag: &str,
    deadline: Instant,
) -> anyhow::Result<TcpStream> {
    let mut stream = connect_peer(address, deadline).map_err(|e| {
        anyhow::anyhow!("rank {rank} could not connect to rank {peer} at {address}: {e}")
    })?;
    stream.set_read_timeout(Some(time_left(deadline)))?;
    stream.write_all(hello(rank, tag).as_bytes())?;
    let line = read_handshake_line(&stream, 1024)
        .map_err(|e| anyhow::anyhow!("rank {peer} did not answer rank {rank}'s hello: {e}"))?;
    if line.trim_end() != "OK" {
        anyhow::bail!(
            "rank {peer} refused rank {rank}: {}",
            line.trim_end().trim_start_matches("ERR ")
        );
    }
    Ok(stream)
}

/// Accepts a connection from every rank above `rank` into `streams` (by their hellos; a
/// stranger is answered `ERR` and ignored), until `deadline`; a timeout names the ranks that
/// did not come.
fn accept_higher_ranks(
    listener: &TcpListener,
    rank: usize,
    tag: &str,
    deadline: Instant,
    timeout: Duration,
    streams: &mut [Option<TcpStream>],
) -> anyhow::Result<()> {
    let world = streams.len();
    listener.set_nonblocking(true)?;
    while let Some(waiting) = (rank + 1..world).find(|&p| streams[p].is_none()) {
        let (mut stream, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (rank + 1..world)
                        .filter(|&p| streams[p].is_none())
                        .map(|p| p.to_string())
                        .collect();
                    anyhow::bail!(
                        "rank {rank}: timed out after {timeout:?} waiting for rank(s) {} to connect (first: {waiting})",
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(peer) = answer_hello(&mut stream, rank, tag, deadline, streams)? {
            streams[peer] = Some(stream);
        }
    }
    Ok(())
}

/// Reads the hello on an accepted `stream` and answers it: the higher rank it comes from
/// (answered `OK`), `None` for a connection that is not a rank this one still waits for
/// (answered `ERR`, or silent), or an error for a rank started with another configuration
/// than `tag`.
fn answer_hello(
    stream: &mut TcpStream,
    rank: usize,
    tag: &str,
    deadline: Instant,
    streams: &[Option<TcpStream>],
) -> anyhow::Result<Option<usize>> {
    let world = streams.len();
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(time_left(deadline)))?;
    let Ok(line) = read_handshake_line(&*stream, 1024) else {
        return Ok(None);
    };
    let fields: Vec<&str> = line.trim_end().split(' ').collect();
    let peer = match fields.as_slice() {
        [a, b, peer, their_tag] if format!("{a} {b}") == HELLO => match peer.parse::<usize>() {
            Ok(p) if p > rank && p < world && streams[p].is_none() => {
                if *their_tag != tag {
                    let _ = stream.write_all(
                        format!("ERR rank {rank} has another configuration (`{tag}`)\n").as_bytes(),
                    );
                    anyhow::bail!(
                        "rank {p} has a different configuration (`{their_tag}`) than rank {rank} (`{tag}`)"
                    );
                }
                p
            }
            _ => {
                let _ = stream.write_all(b"ERR not a rank this one waits for\n");
                return Ok(None);
            }
        },
        _ => {
            let _ = stream.write_all(b"ERR not an fmoec rank\n");
            return Ok(None);
        }
    };
    stream.write_all(b"OK\n")?;
    Ok(Some(peer))
}

/// The mesh of rank `rank`'s connections (`streams` by global rank, `None` for itself), each
/// with writes bounded by `timeout` and a reader thread that sorts its messages into the
/// inbox.
fn start_mesh(
    rank: usize,
    streams: Vec<Option<TcpStream>>,
    timeout: Duration,
) -> anyhow::Result<Arc<Mesh>> {
    let mut readers = Vec::new();
    let mut peers = Vec::with_capacity(streams.len());
    for (peer, stream) in streams.into_iter().enumerate() {
        match stream {
            None => peers.push(None),
            Some(stream) => {
                stream.set_read_timeout(None)?;
                stream.set_write_timeout(Some(timeout))?;
                stream.set_nodelay(true)?;
                readers.push((peer, stream.try_clone()?));
                peers.push(Some(Mutex::new(stream)));
            }
        }
    }
    let mesh = Arc::new(Mesh {
        rank,
        peers,
        inbox: Inbox::default(),
    });
    for (peer, stream) in readers {
        let weak = Arc::downgrade(&mesh);
        std::thread::Builder::new()
            .name(format!("fmoec-tcp-from-{peer}"))
            .spawn(move || read_from(weak, peer, stream))?;
    }
    Ok(mesh)
}

/// Rank `rank`'s [`Groups`] of `layout` over `mesh`, with its tensor group (`my_tensor`:
/// its members) when it has one.
fn groups_over_mesh(
    mesh: &Arc<Mesh>,
    layout: &GroupLayout,
    rank: usize,
    my_tensor: Option<Vec<usize>>,
    timeout: Duration,
) -> anyhow::Result<Groups> {
    let handle = |label: GroupLabel, position: usize| {
        let transport = TcpTransport(Arc::clone(mesh));
        Box::new(TcpCollective::new(transport, label, position, timeout)) as Box<dyn Collective>
    };
    let mut groups = Groups::connect(layout, rank, |label, position| Ok(handle(label, position)))?;
    if let Some(members) = my_tensor {
        let position = members.iter().position(|&r| r == rank).unwrap_or_default();
        let label = GroupLabel {
            kind: GroupKind::Tensor,
            members,
        };
        groups.set_tensor(handle(label, position))?;
    }
    Ok(groups)
}

/// One handshake line (`OK`, `ERR ...`, a hello) of at most `limit` bytes from `stream`,
/// read a byte at a time: a peer may send its first message right behind its `OK`, and a
/// buffered reader would swallow that message with the line.
fn read_handshake_line(mut stream: impl Read, limit: u64) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while (line.len() as u64) < limit {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a text line"))
}

/// A connection to a peer's `address`, retried until `deadline`.
fn connect_peer(address: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    loop {
        let targets: Vec<SocketAddr> = address.to_socket_addrs()?.collect();
        for target in &targets {
            match TcpStream::connect_timeout(target, time_left(deadline)) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::PeerTransfer;

    fn env(rank: usize, world: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    /// A port for rank 0's rendezvous that no port-0 bind takes in the meantime.
    fn free_port() -> u16 {
        crate::collective::launch::free_port("127.0.0.1").unwrap()
    }

    /// Three ranks on threads, each with its own connections, as separate processes have.
    fn on_three_ranks<R: Send>(
        timeout: Duration,
        body: impl Fn(Groups) -> R + Sync,
    ) -> Vec<anyhow::Result<R>> {
        let layout = GroupLayout::data_parallel(3, 3).unwrap();
        let port = free_port();
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..3)
                .map(|rank| {
                    let (layout, body) = (&layout, &body);
                    s.spawn(move || connect(layout, None, &env(rank, 3, port), timeout).map(body))
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_handshake_line_leaves_the_messages_behind_it_unread() {
        // A peer may answer `OK` and send its first message before this rank reads the
        // answer: both arrive together, and the message must stay in the stream.
        let mut stream = std::io::Cursor::new(b"OK\nFIRST MESSAGE".to_vec());
        assert_eq!(read_handshake_line(&mut stream, 1024).unwrap(), "OK\n");
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "FIRST MESSAGE");
        // at most `limit` bytes, and a stream that ends without a newline gives what it had
        let mut long = std::io::Cursor::new(b"0123456789".to_vec());
        assert_eq!(read_handshake_line(&mut long, 4).unwrap(), "0123");
        let mut short = std::io::Cursor::new(b"ERR".to_vec());
        assert_eq!(read_handshake_line(&mut short, 1024).unwrap(), "ERR");
    }

    /// Tensor groups that do not partition the world are refused before any connection.
    #[test]
    fn tensor_groups_must_partition_the_world() {
        let layout = GroupLayout::data_parallel(3, 3).unwrap();
        let timeout = Duration::from_secs(1);
        for (lists, want) in [
            (
                vec![vec![0, 1], vec![1, 2]],
                "tensor groups: rank 1 is in more than one group",
            ),
            (vec![vec![0, 1]], "tensor groups: rank 2 is in no group"),
            (
                vec![vec![0, 1, 2, 3]],
                "rank 3 is outside the world of 3 ranks",
            ),
            (
                vec![vec![0, 1, 2], vec![]],
                "tensor groups: a group is empty",
            ),
        ] {
            let Err(e) = connect(&layout, Some(&lists), &env(0, 3, free_port()), timeout) else {
                panic!("{lists:?} was accepted");
            };
            assert!(e.to_string().contains(want), "{lists:?}: {e}");
        }
    }

    /// What one rank got from each collective of [`collectives_of`].
    type Collected = (Vec<f32>, Vec<Vec<i64>>, Vec<f64>, Vec<f64>);

    /// All-reduce, all-gather, all-to-all (rank `r` sends `(r + d) % 2` rows to rank `d`,
    /// each row `10 r + d`), broadcast from rank 1 and a barrier, on group `g`.
    fn collectives_of(g: &dyn Collective) -> Collected {
        let r = g.rank() as f64;
        let mut t = Tensor::from_slice(&[r, 10.0 * r, 0.5]).to_kind(Kind::Float);
        g.all_reduce_sum(&mut t, "sum").unwrap();
        let counts = g
            .all_gather_counts(&[g.rank() as i64, 7], "counts")
            .unwrap();
        let send_counts: Vec<i64> = (0..3).map(|d| ((g.rank() + d) % 2) as i64).collect();
        let recv_counts: Vec<i64> = (0..3).map(|s| ((s + g.rank()) % 2) as i64).collect();
        let rows: Vec<f64> = (0..3usize)
            .flat_map(|d| std::iter::repeat_n((10 * g.rank() + d) as f64, (g.rank() + d) % 2))
            .collect();
        let send = Tensor::from_slice(&rows).reshape([-1, 1]);
        let got = g
            .all_to_all_v(&send, &send_counts, &recv_counts, "a2a")
            .unwrap();
        let mut b = Tensor::from_slice(&[r, r]);
        g.broadcast(&mut b, 1, "bcast").unwrap();
        g.barrier("barrier").unwrap();
        (
            Vec::<f32>::try_from(&t).unwrap(),
            counts,
            Vec::<f64>::try_from(got.reshape([-1])).unwrap(),
            Vec::<f64>::try_from(&b).unwrap(),
        )
    }

    /// Point to point around the ring of three, both ways in one batch, twice, with a
    /// collective between (the two are numbered apart): per round, what came from the
    /// previous rank (its rank plus the round) and from the next (its rank and the round).
    fn ring_of(g: &dyn Collective) -> Vec<(f64, Vec<i64>)> {
        let r = g.rank() as f64;
        let (next, prev) = ((g.rank() + 1) % 3, (g.rank() + 2) % 3);
        let mut ring = Vec::new();
        for round in 0..2 {
            let a = Tensor::from_slice(&[r + round as f64]);
            let mut from_prev = a.zeros_like();
            let mut from_next = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
            let back = Tensor::from_slice(&[g.rank() as i64, round]);
            let mut transfers = [
                PeerTransfer::Send {
                    tensor: &a,
                    to: next,
                },
                PeerTransfer::Send {
                    tensor: &back,
                    to: prev,
                },
                PeerTransfer::Recv {
                    into: &mut from_prev,
                    from: prev,
                },
                PeerTransfer::Recv {
                    into: &mut from_next,
                    from: next,
                },
            ];
            g.send_recv(&mut transfers, "ring").unwrap();
            g.barrier("between").unwrap();
            ring.push((
                Vec::<f64>::try_from(&from_prev).unwrap()[0],
                Vec::<i64>::try_from(&from_next).unwrap(),
            ));
        }
        ring
    }

    #[test]
    fn operations_give_every_rank_the_same_results() {
        let results = on_three_ranks(Duration::from_secs(30), |groups| {
            (collectives_of(groups.data()), ring_of(groups.data()))
        });
        for (rank, result) in results.into_iter().enumerate() {
            let ((sum, counts, got, b), ring) = result.unwrap();
            let (next, prev) = ((rank + 1) % 3, (rank + 2) % 3);
            for (round, (a, back)) in ring.into_iter().enumerate() {
                assert_eq!(a, (prev + round) as f64, "rank {rank}");
                assert_eq!(back, vec![next as i64, round as i64], "rank {rank}");
            }
            assert_eq!(sum, vec![3.0, 30.0, 1.5]);
            assert_eq!(counts, vec![vec![0, 7], vec![1, 7], vec![2, 7]]);
            let want: Vec<f64> = (0..3usize)
                .flat_map(|s| std::iter::repeat_n((10 * s + rank) as f64, (s + rank) % 2))
                .collect();
            assert_eq!(got, want, "rank {rank}");
            assert_eq!(b, vec![1.0, 1.0]);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_and_a_late_one_times_out() {
        let results = on_three_ranks(Duration::from_secs(30), |groups| {
            if groups.rank() == 2 {
                return Ok(());
            }
            groups.data().barrier("step 3").map_err(|e| e.to_string())
        });
        for r in &results[..2] {
            let e = r.as_ref().unwrap().as_ref().unwrap_err();
            assert!(
                e.contains("data group [0,1,2]: barrier at \"step 3\": rank 2 left the group"),
                "{e}"
            );
        }
        let results = on_three_ranks(Duration::from_millis(400), |groups| {
            if groups.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1500));
                return Ok(());
            }
            groups.data().barrier("step 4").map_err(|e| e.to_string())
        });
        let e = results[0].as_ref().unwrap().as_ref().unwrap_err();
        assert!(
            e.contains("timed out after 400ms waiting for rank 1"),
            "{e}"
        );
    }

    /// Rank 0 of two runs `connect` on a thread; this test is rank 1: it passes the
    /// rendezvous, then knocks on rank 0's port with lines that are not (yet) the hello it
    /// waits for. Each gets its answer and rank 0 keeps waiting, until a hello of another
    /// configuration ends its `connect` with an error naming both.
    #[test]
    fn the_mesh_handshake_answers_strangers_and_refuses_another_configuration() {
        let layout = GroupLayout::data_parallel(2, 2).unwrap();
        let tag = layout_tag(&layout, None);
        let (port, timeout) = (free_port(), Duration::from_secs(30));
        std::thread::scope(|s| {
            let rank0 = s.spawn(|| connect(&layout, None, &env(0, 2, port), timeout).map(|_| ()));
            let addresses = env(1, 2, port)
                .gather_addresses(&tag, free_port(), timeout)
                .unwrap();
            let ask = |line: &str| {
                let mut stream = TcpStream::connect(&addresses[0]).unwrap();
                stream.write_all(line.as_bytes()).unwrap();
                read_handshake_line(&stream, 1024).unwrap()
            };
            assert_eq!(ask("GET / HTTP/1.0\n"), "ERR not an fmoec rank\n");
            for not_awaited in [0, 2] {
                assert_eq!(
                    ask(&hello(not_awaited, &tag)),
                    "ERR not a rank this one waits for\n"
                );
            }
            assert_eq!(
                ask(&hello(1, "layout-other")),
                format!("ERR rank 0 has another configuration (`{tag}`)\n")
            );
            let e = rank0.join().unwrap().unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "rank 1 has a different configuration (`layout-other`) than rank 0 (`{tag}`)"
                )
            );
        });
    }

    /// This test as rank 0 refuses the hello of rank 1's `connect`, which says so; then, as
    /// rank 1, it passes the rendezvous but never connects, and rank 0's `connect` gives up by
    /// the timeout naming it.
    #[test]
    fn a_refused_hello_and_a_rank_that_never_connects_are_errors_naming_the_ranks() {
        let layout = GroupLayout::data_parallel(2, 2).unwrap();
        let tag = layout_tag(&layout, None);
        let (port, timeout) = (free_port(), Duration::from_secs(30));
        std::thread::scope(|s| {
            let rank1 = s.spawn(|| connect(&layout, None, &env(1, 2, port), timeout).map(|_| ()));
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let mesh_port = listener.local_addr().unwrap().port();
            env(0, 2, port)
                .gather_addresses(&tag, mesh_port, timeout)
                .unwrap();
            let (mut stream, _) = listener.accept().unwrap();
            assert_eq!(read_handshake_line(&stream, 1024).unwrap(), hello(1, &tag));
            stream.write_all(b"ERR busy\n").unwrap();
            let e = rank1.join().unwrap().unwrap_err().to_string();
            assert_eq!(e, "rank 0 refused rank 1: busy");
        });

        let (port, short) = (free_port(), Duration::from_millis(1500));
        std::thread::scope(|s| {
            let rank0 = s.spawn(|| connect(&layout, None, &env(0, 2, port), short).map(|_| ()));
            env(1, 2, port)
                .gather_addresses(&tag, free_port(), timeout)
                .unwrap();
            let e = rank0.join().unwrap().unwrap_err().to_string();
            assert_eq!(
                e,
                "rank 0: timed out after 1.5s waiting for rank(s) 1 to connect (first: 1)"
            );
        });
    }
}
