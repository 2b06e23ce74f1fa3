//! Rendezvous of a multi-process run: the torchrun environment ([`DistEnv`]) and a
//! one-shot TCP exchange in which rank 0 hands every other rank the same bytes (the
//! NCCL unique ids of the run's communicators).
//!
//! Protocol (one connection per rank, text header then raw bytes):
//! `FMOEC-RENDEZVOUS 1 <rank> <world> <tag>\n` from the client; the server answers
//! `OK <len>\n` followed by `len` bytes, or `ERR <message>\n`. `tag` is a fingerprint of
//! what the ranks must agree on (the group layout), so a rank started with different
//! settings fails with a message instead of joining the wrong communicators.
//! Rank 0 serves until every rank has fetched the bytes, which makes the exchange a
//! barrier too; every wait has a deadline and names the ranks that did not come.
//!
//! A second exchange, [`DistEnv::gather_addresses`], is an all-gather of where each rank
//! listens (what the TCP transport between CPU ranks, [`super::tcp`], needs):
//! `FMOEC-GATHER 2 <rank> <world> <tag> <port>\n` from each client; rank 0 answers
//! `JOINED\n` at once (or `ERR <message>\n`), keeps every connection until all ranks came,
//! then answers each with `OK <world>\n` and one `host:port` line per rank (a client's host
//! is the address rank 0 saw it connect from; rank 0's is `MASTER_ADDR`). A joined client
//! waits a whole timeout from `JOINED` on, so that rank 0, whose timeout began earlier,
//! gives up first and names the ranks that did not come.
//!
//! In both exchanges rank 0 answers a hello as soon as it reads it, so a client that hears
//! nothing within [`FIRST_ANSWER_WITHIN`] knows it reached something other than an fmoec
//! rank 0 (another program on the port) and says so, instead of waiting for other ranks.
//!
//! It knows nothing about NCCL or tensors: the payload is opaque bytes; of the groups, only
//! whether a [`GroupLayout`] fits the environment (`DistEnv::place_in`).

use super::groups::{tensor_group_of, GroupLayout};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &str = "FMOEC-RENDEZVOUS 1";
/// Version 2: rank 0 acknowledges each rank at once (`JOINED`).
const GATHER_MAGIC: &str = "FMOEC-GATHER 2";
/// How long a client waits for rank 0's first line after its hello. Rank 0 answers each
/// hello as it reads it, and spends at most [`HELLO_WITHIN`] on each client before it, so
/// a longer silence is not rank 0's.
pub const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long rank 0 waits for a connected client's hello (a real rank sends it at once; a
/// silent stranger must not keep the real ranks waiting).
const HELLO_WITHIN: Duration = Duration::from_secs(2);
/// Largest payload a client accepts (a unique id is 128 bytes; a run has a few).
const MAX_PAYLOAD: usize = 1 << 20;

/// A rendezvous that failed: bad environment, timeout, or a peer that disagrees.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("rendezvous at {addr}: timed out after {waited:?}: {what}")]
    Timeout {
        addr: String,
        waited: Duration,
        what: String,
    },
    #[error("rendezvous at {addr}: {message}")]
    Refused { addr: String, message: String },
    /// What answers at the address connects but says nothing: not an fmoec rank 0.
    #[error("rendezvous at {addr}: rank {rank} connected, but nothing there answered as an fmoec rendezvous within {waited:?} (another program on this port?); check --master (MASTER_ADDR and MASTER_PORT under torchrun) and that node 0, with rank 0, is started")]
    Silent {
        addr: String,
        rank: usize,
        waited: Duration,
    },
    /// Rank 0 closed the connection without answering: it gave up (its own error says why).
    #[error("rendezvous at {addr}: rank 0 closed the connection without answering rank {rank} (see rank 0's error)")]
    Abandoned { addr: String, rank: usize },
    /// Rank 0 went away in the middle of the address table of [`fetch_gather`].
    #[error("rendezvous at {addr}: rank 0 went away while sending the address table to rank {rank} ({got} of {world} entries arrived; see rank 0's error)")]
    CutShort {
        addr: String,
        rank: usize,
        got: usize,
        world: usize,
    },
    // The I/O error is in the message and not a `source`: `{:#}` would print it twice.
    #[error("rendezvous at {addr}: {error}")]
    Io { addr: String, error: std::io::Error },
}

impl RendezvousError {
    /// Whether this rank failed only because rank 0 did (its error is the one to read).
    pub fn follows_another_rank(&self) -> bool {
        matches!(
            self,
            RendezvousError::Abandoned { .. } | RendezvousError::CutShort { .. }
        )
    }
}

/// One process's place in the run, from the torchrun variables `RANK`, `WORLD_SIZE`,
/// `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The GPU this process uses on its node.
    pub local_rank: usize,
    pub master_addr: String,
    /// The port rank 0 serves the rendezvous on: `FMOEC_RENDEZVOUS_PORT` if set; else
    /// `MASTER_PORT`, or `MASTER_PORT + 1` under torchrun, whose agent already listens on
    /// `MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE=True`).
    pub master_port: u16,
}

impl DistEnv {
    /// Read the process environment. `Ok(None)` when neither `RANK` nor `WORLD_SIZE` is
    /// set (not launched as one rank of a run).
    pub fn from_env() -> Result<Option<DistEnv>, RendezvousError> {
        DistEnv::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`DistEnv::from_env`] over any variable lookup (tests).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<DistEnv>, RendezvousError> {
        if var("RANK").is_none() && var("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let vars = Vars(&var);
        let rank = vars.number("RANK", None)?;
        let world = vars.number("WORLD_SIZE", None)?;
        let local_rank = vars.number("LOCAL_RANK", Some(rank))?;
        if world == 0 || rank >= world {
            return Err(RendezvousError::Env {
                name: "RANK",
                message: format!("rank {rank} is outside a world of {world} ranks"),
            });
        }
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = vars.master_port(world)?;
        let master_port = vars.rendezvous_port(master_port)?;
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Rank 0 serves `payload()` to every other rank; the others fetch it. Every rank
    /// returns the same bytes, or an error by `timeout`. With one rank nothing is
    /// served. `tag` must be equal on every rank (see the module docs).
    pub fn exchange(
        &self,
        tag: &str,
        timeout: Duration,
        payload: impl FnOnce() -> Result<Vec<u8>, RendezvousError>,
    ) -> Result<Vec<u8>, RendezvousError> {
        if self.world == 1 {
            return payload();
        }
        if self.rank == 0 {
            let addr = self.address();
            let listener = bind(&addr)?;
            let bytes = payload()?;
            serve(&listener, self.world, tag, &bytes, timeout)?;
            Ok(bytes)
        } else {
            fetch(&self.address(), self.rank, self.world, tag, timeout)
        }
    }
}

impl DistEnv {
    /// Checks that this process fits `layout` (and the tensor groups `tensor`, when given):
    /// a valid layout of `WORLD_SIZE` ranks. Returns this rank's tensor group.
    pub(crate) fn place_in(
        &self,
        layout: &GroupLayout,
        tensor: Option<&[Vec<usize>]>,
    ) -> anyhow::Result<Option<Vec<usize>>> {
        layout.validate()?;
        if layout.world != self.world {
            anyhow::bail!(
                "the layout has {} ranks but WORLD_SIZE is {}",
                layout.world,
                self.world
            );
        }
        let mine = tensor.map(|lists| tensor_group_of(lists, layout.world, self.rank));
        Ok(mine.transpose()?)
    }

    /// Every rank's `host:port`, indexed by rank, given this rank's listening `port`: rank 0
    /// serves the gather on `MASTER_ADDR:MASTER_PORT` (its own entry is `MASTER_ADDR`), the
    /// others fetch it. A barrier too; every wait ends by `timeout`.
    pub fn gather_addresses(
        &self,
        tag: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<String>, RendezvousError> {
        let own = host_port(&self.master_addr, port);
        if self.world == 1 {
            return Ok(vec![own]);
        }
        if self.rank == 0 {
            let listener = bind(&self.address())?;
            serve_gather(&listener, self.world, tag, &own, timeout)
        } else {
            fetch_gather(&self.address(), self.rank, self.world, tag, port, timeout)
        }
    }
}

/// The variable lookup of [`DistEnv::from_vars`], with the parsing of its numbers and ports.
struct Vars<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Vars<'_, F> {
    /// `name` as a non-negative integer; `default` when it is not set.
    fn number(&self, name: &'static str, default: Option<usize>) -> Result<usize, RendezvousError> {
        match (self.0)(name) {
            Some(text) => parse_var(name, &text, "a non-negative integer"),
            None => default.ok_or(RendezvousError::Env {
                name,
                message: "not set (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT go together)"
                    .into(),
            }),
        }
    }

    /// `name` as a port number, `None` when it is not set.
    fn port(&self, name: &'static str) -> Result<Option<u16>, RendezvousError> {
        (self.0)(name)
            .map(|text| parse_var(name, &text, "a port number"))
            .transpose()
    }

    /// `MASTER_PORT`: needed by a world of several ranks, 0 for one rank without it.
    fn master_port(&self, world: usize) -> Result<u16, RendezvousError> {
        match self.port("MASTER_PORT")? {
            Some(port) => Ok(port),
            None if world == 1 => Ok(0),
            None => Err(RendezvousError::Env {
                name: "MASTER_PORT",
                message: "not set; rank 0 serves the rendezvous on MASTER_ADDR:MASTER_PORT".into(),
            }),
        }
    }

    /// The port rank 0 serves the rendezvous on (see [`DistEnv::master_port`]).
    fn rendezvous_port(&self, master_port: u16) -> Result<u16, RendezvousError> {
        let agent_store = (self.0)("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        match self.port("FMOEC_RENDEZVOUS_PORT")? {
            Some(port) => Ok(port),
            None if agent_store && master_port != 0 => {
                master_port.checked_add(1).ok_or(RendezvousError::Env {
                    name: "MASTER_PORT",
                    message: "65535 leaves no port for the rendezvous next to torchrun's store; set FMOEC_RENDEZVOUS_PORT".into(),
                })
            }
            None => Ok(master_port),
        }
    }
}

/// Variable `name`'s `text` parsed (trimmed), or an error saying it is not `what`.
fn parse_var<T: std::str::FromStr>(
    name: &'static str,
    text: &str,
    what: &str,
) -> Result<T, RendezvousError> {
    text.trim().parse::<T>().map_err(|_| RendezvousError::Env {
        name,
        message: format!("`{text}` is not {what}"),
    })
}

/// `host:port`, with brackets around an IPv6 host.
fn host_port(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

/// Rank 0's side of [`DistEnv::gather_addresses`]: waits for ranks `1..world`, then answers
/// each with the whole table (`own` is rank 0's entry).
pub fn serve_gather(
    listener: &TcpListener,
    world: usize,
    tag: &str,
    own: &str,
    timeout: Duration,
) -> Result<Vec<String>, RendezvousError> {
    let mut table: Vec<String> = vec![String::new(); world];
    table[0] = own.to_string();
    let mut clients: Vec<TcpStream> = Vec::new();
    admit_ranks(
        listener,
        world,
        tag,
        Exchange::Gather,
        timeout,
        |hello, from, mut stream| {
            // At once, so that the rank knows it reached rank 0 while it waits for the others.
            if stream
                .write_all(b"JOINED\n")
                .and_then(|()| stream.flush())
                .is_err()
            {
                return false;
            }
            let port = hello.port.unwrap_or_default();
            table[hello.rank] = SocketAddr::new(from.ip(), port).to_string();
            clients.push(stream);
            true
        },
    )?;
    let mut answer = format!("OK {world}\n");
    for entry in &table {
        answer.push_str(entry);
        answer.push('\n');
    }
    let addr = local_addr(listener);
    for mut client in clients {
        client
            .write_all(answer.as_bytes())
            .and_then(|()| client.flush())
            .map_err(io_error(&addr))?;
    }
    Ok(table)
}

/// A rank's side of [`DistEnv::gather_addresses`]: connects to rank 0 (retrying until
/// `timeout`), says where it listens, and waits for the table.
pub fn fetch_gather(
    addr: &str,
    rank: usize,
    world: usize,
    tag: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<String>, RendezvousError> {
    let hello = Exchange::Gather.hello(rank, world, tag, Some(port));
    let waiting = format!("rank {rank} joined rank 0, but not every rank did");
    let (joined, mut reader) = ask_rank_zero(addr, rank, &hello, timeout)?;
    if joined != "JOINED" {
        return Err(unexpected_answer(addr, &joined));
    }
    // Rank 0 answers, or gives up naming the ranks that did not come, within its own
    // timeout, which began before it said JOINED. A rank that started before rank 0 waits
    // that long from now: were its wait to end first, it would be the failure named, and
    // all it could say is that some rank did not come.
    reader
        .get_ref()
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(io_error(addr))?;
    let mut line = String::new();
    let read = reader
        .read_line(&mut line)
        .map_err(read_error(addr, rank, timeout, &waiting))?;
    if read == 0 {
        return Err(RendezvousError::Abandoned {
            addr: addr.to_string(),
            rank,
        });
    }
    let line = line.trim_end();
    if line != format!("OK {world}") {
        return Err(unexpected_answer(addr, line));
    }
    let mut table = Vec::with_capacity(world);
    for got in 0..world {
        let mut entry = String::new();
        reader
            .read_line(&mut entry)
            .map_err(read_error(addr, rank, timeout, &waiting))?;
        // an entry without its newline is one rank 0 did not finish
        if !entry.ends_with('\n') {
            return Err(RendezvousError::CutShort {
                addr: addr.to_string(),
                rank,
                got,
                world,
            });
        }
        table.push(entry.trim_end().to_string());
    }
    Ok(table)
}

/// The two exchanges rank 0 serves: the same hello but for its magic and, for the gather,
/// the port the client listens on.
#[derive(Clone, Copy)]
enum Exchange {
    /// [`serve`] / [`fetch`]: rank 0's bytes to every rank.
    Bytes,
    /// [`serve_gather`] / [`fetch_gather`]: every rank's address to every rank.
    Gather,
}

impl Exchange {
    fn magic(self) -> &'static str {
        match self {
            Exchange::Bytes => MAGIC,
            Exchange::Gather => GATHER_MAGIC,
        }
    }

    /// What rank 0 calls a client that does not speak this exchange.
    fn client(self) -> &'static str {
        match self {
            Exchange::Bytes => "rendezvous",
            Exchange::Gather => "gather",
        }
    }

    /// A client's hello line: `MAGIC rank world tag [port]`.
    fn hello(self, rank: usize, world: usize, tag: &str, port: Option<u16>) -> String {
        let tag = tag.replace(['\n', ' '], "_");
        let port = port.map(|p| format!(" {p}")).unwrap_or_default();
        format!("{} {rank} {world} {tag}{port}\n", self.magic())
    }

    /// The hello of `line`, or the reason to refuse it.
    fn parse(self, line: &str) -> Result<Hello, String> {
        let fields: Vec<&str> = line.trim_end().split(' ').collect();
        let (magic, rest) = fields.split_at(fields.len().min(2));
        if magic.join(" ") != self.magic() {
            let (name, version) = self.magic().split_once(' ').unwrap_or((self.magic(), ""));
            return Err(match magic {
                [their_name, theirs] if *their_name == name => format!(
                    "it speaks version {theirs} of fmoec's {} exchange, rank 0 version {version}: \
                     every node must run the same fmoec",
                    self.client()
                ),
                _ => format!("not an fmoec {} client", self.client()),
            });
        }
        let malformed = || "malformed hello".to_string();
        let (rank, world, tag, port) = match (self, rest) {
            (Exchange::Bytes, [rank, world, tag]) => (rank, world, tag, None),
            (Exchange::Gather, [rank, world, tag, port]) => (
                rank,
                world,
                tag,
                Some(port.parse::<u16>().map_err(|_| malformed())?),
            ),
            _ => return Err(malformed()),
        };
        match (rank.parse::<usize>(), world.parse::<usize>()) {
            (Ok(rank), Ok(world)) => Ok(Hello {
                rank,
                world,
                tag: tag.to_string(),
                port,
            }),
            _ => Err(malformed()),
        }
    }
}

/// What a client says when it connects.
struct Hello {
    rank: usize,
    world: usize,
    tag: String,
    /// Where it listens ([`Exchange::Gather`]).
    port: Option<u16>,
}

/// Rank 0's side of both exchanges: accepts clients on `listener` until `admit` has taken
/// each of ranks `1..world` once (given the rank's hello, the address it connected from and
/// its connection, it answers the rank and says whether it counts), or fails
/// by `timeout` naming the ranks that did not come. A bad client (not fmoec, a duplicate
/// rank, a port scanner) gets an `ERR` line and is not counted; a rank that disagrees on the
/// world size or the tag fails rank 0 too.
fn admit_ranks(
    listener: &TcpListener,
    world: usize,
    tag: &str,
    exchange: Exchange,
    timeout: Duration,
    mut admit: impl FnMut(&Hello, SocketAddr, TcpStream) -> bool,
) -> Result<(), RendezvousError> {
    let addr = local_addr(listener);
    let deadline = Instant::now() + timeout;
    let mut joined = vec![false; world];
    joined[0] = true;
    listener.set_nonblocking(true).map_err(io_error(&addr))?;
    while joined.iter().any(|j| !j) {
        let (stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !joined[r]).collect();
                    return Err(RendezvousError::Timeout {
                        addr,
                        waited: timeout,
                        what: format!("{} did not connect", ranks_text(&missing)),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(io_error(&addr)(e)),
        };
        let Some((hello, mut stream)) = read_hello(stream, deadline, exchange) else {
            continue;
        };
        let rank = hello.rank;
        if let Some(message) = disagreement(&hello, world, tag) {
            refuse(&mut stream, &message);
            return Err(RendezvousError::Refused { addr, message });
        }
        if rank == 0 || rank >= world || joined[rank] {
            let message =
                format!("rank {rank} is not a rank that still has to join (world {world})");
            refuse(&mut stream, &message);
            continue;
        }
        joined[rank] = admit(&hello, from, stream);
    }
    Ok(())
}

/// A client's answer: `ERR` and why it is not counted.
fn refuse(stream: &mut TcpStream, message: &str) {
    let _ = stream.write_all(format!("ERR {message}\n").as_bytes());
}

/// A new client's hello line (read within [`HELLO_WITHIN`], and before `deadline`), with its
/// connection; `None` for one that says nothing readable, or something that is not a
/// hello of this `exchange` (it is refused).
fn read_hello(
    stream: TcpStream,
    deadline: Instant,
    exchange: Exchange,
) -> Option<(Hello, TcpStream)> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(left.min(HELLO_WITHIN)));
    let _ = stream.set_write_timeout(Some(left));
    let mut reader = BufReader::new(stream.take(1024));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return None;
    }
    let mut stream = reader.into_inner().into_inner();
    match exchange.parse(&line) {
        Ok(hello) => Some((hello, stream)),
        Err(message) => {
            refuse(&mut stream, &message);
            None
        }
    }
}

/// Why a rank that disagrees with rank 0 on the world size or the configuration fails the
/// rendezvous.
fn disagreement(hello: &Hello, world: usize, tag: &str) -> Option<String> {
    let rank = hello.rank;
    if hello.world != world {
        Some(format!(
            "rank {rank} was started with WORLD_SIZE={}, rank 0 with {world}",
            hello.world
        ))
    } else if hello.tag != tag {
        Some(format!(
            "rank {rank} has a different configuration (`{}`) than rank 0 (`{tag}`)",
            hello.tag
        ))
    } else {
        None
    }
}

/// The time left until `deadline`, at least a millisecond (a socket timeout of zero is
/// refused).
pub(crate) fn time_left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A client's talk with rank 0: connects to `addr` (retrying until `timeout`), sends
/// `hello`, and reads the first line of the answer. An `ERR` line is a refusal; otherwise the
/// line (without its newline) and the reader, positioned after it, its read timeout what is
/// left of `timeout`. No first line within [`FIRST_ANSWER_WITHIN`] is
/// [`RendezvousError::Silent`].
fn ask_rank_zero(
    addr: &str,
    rank: usize,
    hello: &str,
    timeout: Duration,
) -> Result<(String, BufReader<TcpStream>), RendezvousError> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_until(addr, rank, deadline, timeout)?;
    let io = io_error(addr);
    let left = time_left(deadline);
    let first_answer_within = left.min(FIRST_ANSWER_WITHIN);
    stream
        .set_read_timeout(Some(first_answer_within))
        .map_err(&io)?;
    stream.set_write_timeout(Some(left)).map_err(&io)?;
    stream
        .write_all(hello.as_bytes())
        .map_err(gone_or(addr, rank, &io))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let read = reader.read_line(&mut line).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => RendezvousError::Silent {
            addr: addr.to_string(),
            rank,
            waited: first_answer_within,
        },
        _ => gone_or(addr, rank, &io)(e),
    })?;
    if read == 0 {
        // Rank 0 gave up (its own deadline, a rank that disagreed) and closed the
        // connection; its own error says why.
        return Err(RendezvousError::Abandoned {
            addr: addr.to_string(),
            rank,
        });
    }
    let line = line.trim_end().to_string();
    if let Some(message) = line.strip_prefix("ERR ") {
        return Err(RendezvousError::Refused {
            addr: addr.to_string(),
            message: format!("rank 0 refused rank {rank}: {message}"),
        });
    }
    let left = time_left(deadline);
    reader.get_ref().set_read_timeout(Some(left)).map_err(&io)?;
    Ok((line, reader))
}

/// A client's failed read from rank 0: past its deadline, a timeout saying `waiting`.
fn read_error<'a>(
    addr: &'a str,
    rank: usize,
    timeout: Duration,
    waiting: &'a str,
) -> impl Fn(std::io::Error) -> RendezvousError + 'a {
    move |e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => RendezvousError::Timeout {
            addr: addr.to_string(),
            waited: timeout,
            what: waiting.to_string(),
        },
        _ => gone_or(addr, rank, &io_error(addr))(e),
    }
}

/// A client's failed talk with rank 0: [`RendezvousError::Abandoned`] where rank 0 went away
/// (it reset the connection: a process that died, or was stopped by its launcher, with the
/// hello unread), so that this rank follows rank 0's failure; else `other`'s error.
fn gone_or<'a>(
    addr: &'a str,
    rank: usize,
    other: &'a impl Fn(std::io::Error) -> RendezvousError,
) -> impl Fn(std::io::Error) -> RendezvousError + 'a {
    move |e| match e.kind() {
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::UnexpectedEof => RendezvousError::Abandoned {
            addr: addr.to_string(),
            rank,
        },
        _ => other(e),
    }
}

fn unexpected_answer(addr: &str, line: &str) -> RendezvousError {
    RendezvousError::Refused {
        addr: addr.to_string(),
        message: format!("unexpected answer `{line}` (another service on this port?)"),
    }
}

/// A connection to `addr`, retried until `deadline` (rank 0 may start after this rank).
fn connect_until(
    addr: &str,
    rank: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, RendezvousError> {
    let mut last_error = String::from("no address to connect to");
    loop {
        if Instant::now() >= deadline {
            return Err(RendezvousError::Timeout {
                addr: addr.to_string(),
                waited: timeout,
                what: format!(
                    "rank {rank} could not reach rank 0 (is it running and is MASTER_ADDR/MASTER_PORT right?); last error: {last_error}"
                ),
            });
        }
        let targets: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(list) => list.collect(),
            Err(e) => {
                last_error = e.to_string();
                Vec::new()
            }
        };
        for target in targets {
            match TcpStream::connect_timeout(&target, time_left(deadline)) {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn io_error(addr: &str) -> impl Fn(std::io::Error) -> RendezvousError + '_ {
    move |error| RendezvousError::Io {
        addr: addr.to_string(),
        error,
    }
}

/// The address `listener` listens on, for messages.
fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Listen on `addr` (`host:port`; port 0 picks a free one).
pub fn bind(addr: &str) -> Result<TcpListener, RendezvousError> {
    TcpListener::bind(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => RendezvousError::Refused {
            addr: addr.to_string(),
            message: "the port is in use (by another run or program on this machine); choose a \
                      free port for --master (torchrun's MASTER_PORT)"
                .into(),
        },
        _ => io_error(addr)(e),
    })
}

fn ranks_text(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
    let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
    format!("{noun} {}", list.join(", "))
}

/// Serve `payload` on `listener` until ranks `1..world` have each fetched it once.
pub fn serve(
    listener: &TcpListener,
    world: usize,
    tag: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), RendezvousError> {
    let mut message = format!("OK {}\n", payload.len()).into_bytes();
    message.extend_from_slice(payload);
    admit_ranks(
        listener,
        world,
        tag,
        Exchange::Bytes,
        timeout,
        |_, _, mut stream| {
            // A rank counts once it has the bytes.
            stream
                .write_all(&message)
                .and_then(|_| stream.flush())
                .is_ok()
        },
    )
}

/// Fetch rank 0's payload from `addr`, retrying the connection until `timeout` (rank 0
/// may start later than this rank).
pub fn fetch(
    addr: &str,
    rank: usize,
    world: usize,
    tag: &str,
    timeout: Duration,
) -> Result<Vec<u8>, RendezvousError> {
    let hello = Exchange::Bytes.hello(rank, world, tag, None);
    let waiting = format!("rank {rank} connected but rank 0 did not answer");
    let (line, mut reader) = ask_rank_zero(addr, rank, &hello, timeout)?;
    let len = line
        .strip_prefix("OK ")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or_else(|| unexpected_answer(addr, &line))?;
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .map_err(read_error(addr, rank, timeout, &waiting))?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, RendezvousError> {
        DistEnv::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn reads_the_torchrun_variables() {
        assert_eq!(env(&[]).unwrap(), None);
        let got = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            DistEnv {
                rank: 3,
                world: 4,
                local_rank: 1,
                master_addr: "10.0.0.2".into(),
                master_port: 29500
            }
        );
        assert_eq!(got.address(), "10.0.0.2:29500");
        // Under torchrun its agent's store holds MASTER_PORT: use the next port, or the
        // one given explicitly.
        let base = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ];
        assert_eq!(env(&base).unwrap().unwrap().master_port, 29501);
        let mut explicit = base.to_vec();
        explicit.push(("FMOEC_RENDEZVOUS_PORT", "31000"));
        assert_eq!(env(&explicit).unwrap().unwrap().master_port, 31000);
    }

    #[test]
    fn bad_variables_are_named() {
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK: `x` is not"), "{e}");
        let e = env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.to_string().contains("outside a world of 2"), "{e}");
        let e = env(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("environment variable MASTER_PORT"),
            "{e}"
        );
        let e = env(&[("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK: not set"), "{e}");
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes_over_loopback() {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let payload: Vec<u8> = (0..=255u8).cycle().take(3 * 128).collect();
        let timeout = Duration::from_secs(20);
        let got = std::thread::scope(|s| {
            let server = s.spawn(|| serve(&listener, 4, "layout-a", &payload, timeout));
            let clients: Vec<_> = (1..4)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || fetch(&addr, rank, 4, "layout-a", timeout))
                })
                .collect();
            server.join().unwrap().unwrap();
            clients
                .into_iter()
                .map(|c| c.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(got, vec![payload.clone(); 3]);
    }

    #[test]
    fn a_client_retries_until_rank_zero_listens() {
        // Find a free port, release it, start the client first, the server later.
        let port = crate::collective::launch::free_port("127.0.0.1").unwrap();
        let addr = format!("127.0.0.1:{port}");
        let timeout = Duration::from_secs(20);
        let client = {
            let addr = addr.clone();
            std::thread::spawn(move || fetch(&addr, 1, 2, "t", timeout))
        };
        std::thread::sleep(Duration::from_millis(300));
        let listener = bind(&addr).unwrap();
        serve(&listener, 2, "t", b"id", timeout).unwrap();
        assert_eq!(client.join().unwrap().unwrap(), b"id");
    }

    #[test]
    fn timeouts_name_the_missing_ranks() {
        // a port that nothing else takes once it is let go (below the ephemeral range)
        let port = crate::collective::launch::free_port("127.0.0.1").unwrap();
        let listener = bind(&format!("127.0.0.1:{port}")).unwrap();
        let e = serve(&listener, 3, "t", b"x", Duration::from_millis(200)).unwrap_err();
        assert!(
            e.to_string()
                .contains("timed out after 200ms: ranks 1, 2 did not connect"),
            "{e}"
        );
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = fetch(&addr, 1, 3, "t", Duration::from_millis(200)).unwrap_err();
        assert!(
            e.to_string().contains("rank 1 could not reach rank 0"),
            "{e}"
        );
    }

    #[test]
    fn every_rank_gets_every_ranks_address() {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let timeout = Duration::from_secs(20);
        let (server, clients) = std::thread::scope(|s| {
            let server = s.spawn(|| serve_gather(&listener, 3, "t", "127.0.0.1:7000", timeout));
            let clients: Vec<_> = (1..3)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || fetch_gather(&addr, rank, 3, "t", 7000 + rank as u16, timeout))
                })
                .collect();
            let clients: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
            (server.join().unwrap(), clients)
        });
        let want = vec!["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"];
        assert_eq!(server.unwrap(), want);
        for c in clients {
            assert_eq!(c.unwrap(), want);
        }
        let e = serve_gather(
            &bind("127.0.0.1:0").unwrap(),
            2,
            "t",
            "x:1",
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rank 1 did not connect"), "{e}");
    }

    /// The first line rank 0 answers `line` with.
    fn answer_to(addr: &str, line: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        answer
    }

    /// Both exchanges refuse a stranger, a malformed hello, rank 0 and a rank that already
    /// joined with an `ERR` line, do not count them, and go on serving the real ranks.
    #[test]
    fn bad_clients_are_refused_and_not_counted() {
        let timeout = Duration::from_secs(20);
        for exchange in [Exchange::Bytes, Exchange::Gather] {
            let listener = bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let port = matches!(exchange, Exchange::Gather).then_some(7000);
            std::thread::scope(|s| {
                let server = s.spawn(|| match exchange {
                    Exchange::Bytes => serve(&listener, 2, "t", b"id", timeout),
                    Exchange::Gather => serve_gather(&listener, 2, "t", "x:1", timeout).map(|_| ()),
                });
                let client = exchange.client();
                let stranger = answer_to(&addr, "GET / HTTP/1.0\n");
                assert_eq!(stranger, format!("ERR not an fmoec {client} client\n"));
                let magic = exchange.magic();
                let (name, _) = magic.split_once(' ').unwrap();
                let older = answer_to(&addr, &format!("{name} 0 1 2 t 7000\n"));
                assert!(
                    older.starts_with(&format!(
                        "ERR it speaks version 0 of fmoec's {client} exchange"
                    )) && older.ends_with("every node must run the same fmoec\n"),
                    "{older}"
                );
                let malformed = answer_to(&addr, &format!("{magic} one 2 t 7000\n"));
                assert_eq!(malformed, "ERR malformed hello\n");
                let zero = answer_to(&addr, &exchange.hello(0, 2, "t", port));
                assert_eq!(
                    zero,
                    "ERR rank 0 is not a rank that still has to join (world 2)\n"
                );
                match exchange {
                    Exchange::Bytes => assert_eq!(fetch(&addr, 1, 2, "t", timeout).unwrap(), b"id"),
                    Exchange::Gather => assert_eq!(
                        fetch_gather(&addr, 1, 2, "t", 7001, timeout).unwrap(),
                        vec!["x:1", "127.0.0.1:7001"]
                    ),
                }
                server.join().unwrap().unwrap();
            });
        }
        // a rank that fetched the bytes and comes again
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::scope(|s| {
            let server = s.spawn(|| serve(&listener, 3, "t", b"id", timeout));
            assert_eq!(fetch(&addr, 1, 3, "t", timeout).unwrap(), b"id");
            let e = fetch(&addr, 1, 3, "t", timeout).unwrap_err().to_string();
            assert!(
                e.contains("rank 1 is not a rank that still has to join"),
                "{e}"
            );
            assert_eq!(fetch(&addr, 2, 3, "t", timeout).unwrap(), b"id");
            server.join().unwrap().unwrap();
        });
    }

    /// Rank 1 starts before rank 0 and joins it; rank 2 never comes. Both wait as long, so
    /// rank 1's wait would end first, with a timeout that can only say "not every rank
    /// did", and its launcher would name rank 1 as the failure. Once joined, rank 1 waits
    /// for rank 0's own deadline instead: rank 0 gives up first, naming rank 2, and rank 1
    /// follows it. (Rank 1 must hear JOINED within its own timeout of connecting: rank 0
    /// serves 300 ms after it, leaving 2.7 s for a loaded machine to schedule rank 0; with
    /// 0.8 s the test failed once while two test suites shared two cores.)
    #[test]
    fn a_rank_that_joined_first_follows_rank_zeros_timeout_naming_the_missing_rank() {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let timeout = Duration::from_millis(3000);
        let (zero, zero_started, (one, one_ended)) = std::thread::scope(|s| {
            let rank_1 = s.spawn(|| {
                let e = fetch_gather(&addr, 1, 3, "t", 7001, timeout).unwrap_err();
                (e, Instant::now())
            });
            std::thread::sleep(Duration::from_millis(300));
            let started = Instant::now();
            let zero = serve_gather(&listener, 3, "t", "x:1", timeout).unwrap_err();
            (zero, started, rank_1.join().unwrap())
        });
        assert!(
            zero.to_string().ends_with("rank 2 did not connect"),
            "{zero}"
        );
        assert!(one.follows_another_rank(), "rank 1: {one}");
        assert!(
            one_ended >= zero_started + timeout,
            "rank 1 gave up before rank 0's deadline: {one}"
        );
    }

    /// Rank 0 that stops before answering (its own deadline passed) is named as such, not
    /// as "another service on this port".
    #[test]
    fn a_rank_zero_that_closes_without_answering_is_named() {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let rank_zero = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut hello = String::new();
            BufReader::new(&mut stream).read_line(&mut hello).unwrap();
        });
        let e = fetch_gather(&addr, 1, 2, "t", 7001, Duration::from_secs(20)).unwrap_err();
        rank_zero.join().unwrap();
        assert!(
            e.to_string().ends_with(
                "rank 0 closed the connection without answering rank 1 (see rank 0's error)"
            ),
            "{e}"
        );
    }

    /// Rank 0 that dies in the middle of the address table: the rank says so, naming rank 0
    /// and following its failure, and never takes the missing entries for empty addresses.
    #[test]
    fn a_gather_table_cut_short_is_an_error_naming_rank_zero() {
        for cut in [
            "",
            "10.0.0.1:7000\n",
            "10.0.0.1:7000\n10.0.0.2:7001\n10.0.0.3:70",
        ] {
            let listener = bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let rank_zero = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let mut hello = String::new();
                BufReader::new(&mut stream).read_line(&mut hello).unwrap();
                stream.write_all(b"JOINED\nOK 3\n").unwrap();
                stream.write_all(cut.as_bytes()).unwrap();
                // rank 0 dies here: the connection closes with the table unfinished
            });
            let e = fetch_gather(&addr, 1, 3, "t", 7001, Duration::from_secs(20)).unwrap_err();
            rank_zero.join().unwrap();
            let got = cut.matches('\n').count();
            assert_eq!(
                e.to_string(),
                format!(
                    "rendezvous at {addr}: rank 0 went away while sending the address table \
                     to rank 1 ({got} of 3 entries arrived; see rank 0's error)"
                )
            );
            assert!(e.follows_another_rank(), "{e}");
        }
    }

    /// Rank 0 that dies (killed by its launcher when another rank of its node failed) with a
    /// rank's hello still unread resets the connection: that rank follows rank 0's failure
    /// (it is not a failure of its own, with "Connection reset by peer", for its launcher
    /// to name), in both exchanges.
    #[test]
    fn a_rank_zero_that_resets_the_connection_is_followed() {
        for gather in [true, false] {
            let listener = bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let rank_zero = std::thread::spawn(move || {
                let (stream, _) = listener.accept().unwrap();
                // the hello arrives and is never read: closing then sends a reset
                std::thread::sleep(Duration::from_millis(300));
                drop(stream);
            });
            let timeout = Duration::from_secs(20);
            let e = if gather {
                fetch_gather(&addr, 1, 2, "t", 7001, timeout).unwrap_err()
            } else {
                fetch(&addr, 1, 2, "t", timeout).unwrap_err()
            };
            rank_zero.join().unwrap();
            assert!(e.follows_another_rank(), "{e}");
            assert!(
                e.to_string().ends_with(
                    "rank 0 closed the connection without answering rank 1 (see rank 0's error)"
                ),
                "{e}"
            );
        }
    }

    /// `--master` naming a port where another program listens, accepts and never answers:
    /// both exchanges say that the address did not answer as an fmoec rendezvous (naming it,
    /// pointing at `--master` and node 0), not that other ranks are missing.
    #[test]
    fn a_master_address_that_accepts_and_stays_silent_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let silent = std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..2 {
                held.push(listener.accept().unwrap().0);
            }
            let _ = wait.recv();
        });
        let timeout = Duration::from_millis(1500);
        let errors = [
            fetch_gather(&addr, 2, 4, "t", 7002, timeout).unwrap_err(),
            fetch(&addr, 2, 4, "t", timeout).unwrap_err(),
        ];
        drop(done);
        silent.join().unwrap();
        for e in errors {
            let e = e.to_string();
            assert!(
                e.starts_with(&format!("rendezvous at {addr}: rank 2 connected, but nothing there answered as an fmoec rendezvous within"))
                    && e.contains("check --master")
                    && e.contains("node 0")
                    && !e.contains("not every rank"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_rank_with_other_settings_is_refused() {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let timeout = Duration::from_secs(20);
        let (server, client) = std::thread::scope(|s| {
            let server = s.spawn(|| serve(&listener, 2, "layout-a", b"x", timeout));
            let client = fetch(&addr, 1, 2, "layout-b", timeout);
            (server.join().unwrap(), client)
        });
        let e = client.unwrap_err().to_string();
        assert!(
            e.contains("rank 0 refused rank 1") && e.contains("layout-b"),
            "{e}"
        );
        let e = server.unwrap_err().to_string();
        assert!(e.contains("different configuration"), "{e}");
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (server, client) = std::thread::scope(|s| {
            let server = s.spawn(|| serve(&listener, 2, "t", b"x", timeout));
            let client = fetch(&addr, 1, 3, "t", timeout);
            (server.join().unwrap(), client)
        });
        assert!(client.unwrap_err().to_string().contains("WORLD_SIZE=3"));
        assert!(server.is_err());
    }
}
