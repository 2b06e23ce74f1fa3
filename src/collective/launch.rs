//! Local launcher: one process per rank of this machine (a GPU each, or CPU ranks) with the
//! torchrun variables set, so `--gpus N` needs no external tool, and a run over several
//! machines is one launcher per machine ([`Launch::first_rank`], [`Launch::world`]).
//!
//! [`spawn_local`] starts `n` copies of a program with `RANK` (this node's first rank plus
//! i), `LOCAL_RANK` (i), `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`
//! set (and `NCCL_NVLS_ENABLE=0` unless the caller's environment sets it), prefixes each line
//! the ranks print with `[rank RANK]` (on stderr unless [`Launch::label_stderr`] says not),
//! and waits. When one rank fails (non-zero exit or a signal) the others are killed at once,
//! so a dead rank never leaves its peers hanging in a collective; the launcher's result
//! names the first rank that failed and its exit code (all of them, when several failed
//! between two polls: which came first cannot be told). A rank that failed only because
//! another did exits with [`FOLLOWED_ANOTHER_RANK`]; the launcher then waits a moment for the
//! failure it followed, so that the cause is named and not its echo. Ranks that stop with
//! `128 + signal` after the launcher passed that signal on did what was asked: the launcher
//! waits for all of them and reports the run as interrupted, not as failed.
//!
//! It knows nothing about NCCL or tensors; the library search path for NCCL is the
//! caller's business (it passes extra environment variables in [`Launch::env`]).

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// What [`spawn_local`] needs besides the program: extra environment and the
/// rendezvous address.
#[derive(Clone, Debug)]
pub struct Launch {
    /// `MASTER_ADDR` given to the ranks.
    pub master_addr: String,
    /// `MASTER_PORT`; `None` picks a free port on `master_addr`.
    pub master_port: Option<u16>,
    /// More variables for every rank (e.g. `LD_LIBRARY_PATH`).
    pub env: Vec<(OsString, OsString)>,
    /// Polled while the ranks run: the number of a signal the launcher received (a
    /// scheduler's SIGTERM), which is then sent on, once, to every rank still running.
    pub stop_signal: Option<fn() -> Option<i32>>,
    /// The global rank of this machine's first process (node rank × processes per node).
    pub first_rank: usize,
    /// Ranks of the whole run, all machines (`None`: the `n` started here).
    pub world: Option<usize>,
    /// Whether the lines the ranks print on stderr start with `[rank RANK]` as those on
    /// stdout do; without, they are passed on as printed, so that stderr reads as one
    /// process's would (a caller whose stderr has a format of its own, which the ranks keep).
    pub label_stderr: bool,
    /// How often the launcher looks at the ranks (whether one exited, a stop signal came).
    pub poll_every: Duration,
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            master_addr: "127.0.0.1".into(),
            master_port: None,
            env: Vec::new(),
            stop_signal: None,
            first_rank: 0,
            world: None,
            label_stderr: true,
            poll_every: Duration::from_millis(20),
        }
    }
}

/// The exit code of a rank whose failure follows another rank's (rank 0 gave up the
/// rendezvous, a peer left a collective): its error points at the other rank's, which is the
/// one to name.
pub const FOLLOWED_ANOTHER_RANK: u8 = 3;

/// How long the launcher waits, after a rank failed with [`FOLLOWED_ANOTHER_RANK`], for the
/// failure it followed before it stops the rest.
const FOLLOWED_FAILURE_GRACE: Duration = Duration::from_secs(3);

/// How a launched run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Each local rank's exit status (`None`: it was killed by the launcher before it
    /// exited on its own).
    pub statuses: Vec<Option<ExitStatus>>,
    /// The local rank whose failure is the run's: the first that failed on its own, else
    /// the first that failed after another rank ([`FOLLOWED_ANOTHER_RANK`]).
    pub failed: Option<(usize, ExitStatus)>,
    /// The other local ranks whose failure, of the same kind as `failed`'s (on their own or
    /// after another rank), was seen in the same poll: which of them failed first the
    /// launcher cannot tell, so all are named.
    pub failed_with: Vec<(usize, ExitStatus)>,
    /// The stop signal the launcher passed on, when the ranks then stopped as asked (with
    /// `128 + signal`) and none failed.
    pub interrupted: Option<i32>,
    /// The global rank of local rank 0 (for messages).
    pub first_rank: usize,
}

impl Outcome {
    /// The code the launcher process should exit with: 0, the failed rank's code, or
    /// 128 + signal for a rank killed by a signal (the shell's convention).
    pub fn exit_code(&self) -> i32 {
        match (self.failed, self.interrupted) {
            (Some((_, status)), _) => code_of(status),
            (None, Some(signal)) => 128 + signal,
            (None, None) => 0,
        }
    }

    /// The global ranks that stopped as asked after an interruption (none when the run was
    /// not interrupted).
    pub fn stopped_as_asked(&self) -> Vec<usize> {
        let Some(signal) = self.interrupted else {
            return Vec::new();
        };
        self.statuses
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some_and(|s| s.code() == Some(128 + signal)))
            .map(|(r, _)| self.first_rank + r)
            .collect()
    }

    /// A one-line account of a failure (`rank 1 exited with code 3; stopped rank(s) 0, 2`);
    /// ranks that failed in one poll are all named (`rank 0 exited with code 7 and rank 1
    /// exited with code 5, seen at once: ...`).
    pub fn describe(&self) -> Option<String> {
        let (rank, status) = self.failed?;
        let stopped: Vec<String> = self
            .statuses
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_none())
            .map(|(r, _)| (self.first_rank + r).to_string())
            .collect();
        let failures: Vec<String> = std::iter::once((rank, status))
            .chain(self.failed_with.iter().copied())
            .map(|(r, s)| format!("rank {} {}", self.first_rank + r, status_text(s)))
            .collect();
        let mut text = match failures.split_last() {
            Some((last, [first, rest @ ..])) => format!(
                "{first}{} and {last}, seen at once (which rank failed first cannot be told)",
                rest.iter().map(|f| format!(", {f}")).collect::<String>()
            ),
            _ => failures.concat(),
        };
        if status.code() == Some(i32::from(FOLLOWED_ANOTHER_RANK)) {
            text.push_str(if self.failed_with.is_empty() {
                " (it failed after another rank did: that rank's error says why)"
            } else {
                " (they failed after another rank did: that rank's error says why)"
            });
        }
        if !stopped.is_empty() {
            text.push_str(&format!("; stopped rank(s) {}", stopped.join(", ")));
        }
        Some(text)
    }
}

fn code_of(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return if code == 0 { 1 } else { code };
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return 128 + signal;
        }
    }
    1
}

fn status_text(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    format!("ended with {status}")
}

/// A failure to start the ranks (not a rank's own failure, which is in [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("--gpus must be at least 1")]
    NoRanks,
    #[error("cannot find a free port on {addr} for the rendezvous: {source}")]
    Port {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start rank {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for rank {rank}: {source}")]
    Wait {
        rank: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Pick a TCP port on `addr` for the rendezvous, free when picked (bound and released): one
/// below the kernel's range of ephemeral ports, so that no other program's `bind` of port 0
/// or outgoing connection takes it before rank 0 binds it again (ports of that range are
/// handed out all the time). Where the range is unknown or nothing below it is free, a port
/// the kernel picks (port 0).
pub fn free_port(addr: &str) -> Result<u16, LaunchError> {
    if let Some(port) = ephemeral_range_start().and_then(|start| free_port_below(addr, start)) {
        return Ok(port);
    }
    std::net::TcpListener::bind((addr, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| LaunchError::Port {
            addr: addr.to_string(),
            source,
        })
}

/// The lowest port the kernel hands out for port 0 and outgoing connections.
fn ephemeral_range_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// Ports below this are left alone (well-known and registered services crowd there).
const LOWEST_PICKED_PORT: u16 = 10_000;

/// A port in `LOWEST_PICKED_PORT..start` that binds on `addr`. Each call of a process tries
/// other ports than the last (two runs started together get two ports), starting from a
/// place set by the process id (two processes picking at once rarely meet).
fn free_port_below(addr: &str, start: u16) -> Option<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PICKED: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(start.checked_sub(LOWEST_PICKED_PORT)?);
    if span == 0 {
        return None;
    }
    let first = std::process::id().wrapping_mul(7919) % span;
    (0..64).find_map(|_| {
        let step = PICKED.fetch_add(1, Ordering::Relaxed);
        let offset = (first + step.wrapping_mul(4099)) % span;
        let port = LOWEST_PICKED_PORT + offset as u16;
        std::net::TcpListener::bind((addr, port)).ok().map(|_| port)
    })
}

/// Start `n` ranks of `program args...` on this machine (rank i uses GPU i), forward
/// their output with a `[rank i]` prefix (see [`Launch::label_stderr`]), and wait for all
/// of them. When a rank fails the remaining ones are killed and the result names the
/// failure.
pub fn spawn_local(
    n: usize,
    program: impl AsRef<OsStr>,
    args: &[OsString],
    launch: &Launch,
) -> Result<Outcome, LaunchError> {
    if n == 0 {
        return Err(LaunchError::NoRanks);
    }
    let port = match launch.master_port {
        Some(port) => port,
        None => free_port(&launch.master_addr)?,
    };
    let program = program.as_ref();
    let world = launch.world.unwrap_or(n);
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let (done, forwarded) = std::sync::mpsc::channel::<()>();
    let mut forwarders = 0;
    for local in 0..n {
        let rank = launch.first_rank + local;
        let vars = RankVars {
            rank,
            local,
            world,
            local_world: n,
            port,
        };
        let mut command = rank_command(program, args, launch, &vars);
        match command.spawn() {
            Ok(mut child) => {
                forwarders += forward_output(&mut child, rank, launch.label_stderr, &done);
                children.push(child);
            }
            Err(source) => {
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(LaunchError::Spawn {
                    rank,
                    program: program.to_string_lossy().into_owned(),
                    source,
                });
            }
        }
    }
    let outcome = supervise(&mut children, launch.stop_signal, launch.poll_every).map(|mut o| {
        o.first_rank = launch.first_rank;
        o
    });
    last_lines(&forwarded, forwarders);
    outcome
}

/// The torchrun variables of one rank.
struct RankVars {
    /// `RANK`: the global rank.
    rank: usize,
    /// `LOCAL_RANK`: its index on this machine.
    local: usize,
    world: usize,
    /// `LOCAL_WORLD_SIZE`: the ranks started on this machine.
    local_world: usize,
    port: u16,
}

/// The command of one rank: the program, the torchrun variables and the launch's own.
fn rank_command(program: &OsStr, args: &[OsString], launch: &Launch, vars: &RankVars) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("RANK", vars.rank.to_string())
        .env("LOCAL_RANK", vars.local.to_string())
        .env("WORLD_SIZE", vars.world.to_string())
        .env("LOCAL_WORLD_SIZE", vars.local_world.to_string())
        .env("MASTER_ADDR", &launch.master_addr)
        .env("MASTER_PORT", vars.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        // NVLink SHARP needs multicast objects the lent machines do not grant.
        command.env("NCCL_NVLS_ENABLE", "0");
    }
    for (key, value) in &launch.env {
        command.env(key, value);
    }
    receive_stop_signals(&mut command);
    command
}

/// Forwards `child`'s stdout and stderr with `[rank RANK]` (stderr only if `label_stderr`);
/// each forwarder says on `done` when its stream ends. Returns how many it started.
fn forward_output(
    child: &mut Child,
    rank: usize,
    label_stderr: bool,
    done: &std::sync::mpsc::Sender<()>,
) -> usize {
    let mut forwarders = 0;
    if let Some(out) = child.stdout.take() {
        forward(out, Output::Stdout, Some(rank), done.clone());
        forwarders += 1;
    }
    if let Some(err) = child.stderr.take() {
        forward(
            err,
            Output::Stderr,
            label_stderr.then_some(rank),
            done.clone(),
        );
        forwarders += 1;
    }
    forwarders
}

/// Lets the ranks' last lines through. A pipe can stay open after its rank is gone (a
/// process the rank started still holds it), so this waits at most 2 s for the `forwarders`.
fn last_lines(forwarded: &std::sync::mpsc::Receiver<()>, forwarders: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for _ in 0..forwarders {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if forwarded.recv_timeout(left).is_err() {
            break;
        }
    }
}

/// Poll the ranks until all exit or one fails; on failure kill the rest (after
/// [`FOLLOWED_FAILURE_GRACE`] when the failure follows another rank's). A stop signal
/// (`stop_signal`) is passed on to the running ranks once; a rank that then exits with
/// `128 + signal` stopped as asked, and the others are left to stop likewise.
fn supervise(
    children: &mut [Child],
    stop_signal: Option<fn() -> Option<i32>>,
    poll_every: Duration,
) -> Result<Outcome, LaunchError> {
    let mut watch = Watch::new(children.len());
    while watch.goes_on() {
        if let Some(signal) = stop_signal.and_then(|f| f()) {
            watch.pass_on(signal, children);
        }
        if let Err(error) = watch.poll(children) {
            kill_all(children, &watch.statuses);
            return Err(error);
        }
        std::thread::sleep(poll_every);
    }
    Ok(watch.outcome(children))
}

/// A local rank and how it exited.
type RankStatus = (usize, ExitStatus);

/// What [`supervise`] knows of the ranks so far.
struct Watch {
    statuses: Vec<Option<ExitStatus>>,
    /// In the order seen, each with the number of the poll that saw it (one poll's are in
    /// rank order: that is not the order they failed in).
    failures: Vec<(usize, ExitStatus, usize)>,
    /// Polls so far.
    polls: usize,
    /// The stop signal passed on to the ranks.
    passed_on: Option<i32>,
    /// When the wait for the failure a rank followed ends (set at the first failure).
    grace_ends: Option<std::time::Instant>,
}

impl Watch {
    fn new(n: usize) -> Watch {
        Watch {
            statuses: vec![None; n],
            failures: Vec::new(),
            polls: 0,
            passed_on: None,
            grace_ends: None,
        }
    }

    /// The first failure that did not follow another rank's.
    fn own_failure(&self) -> Option<(usize, ExitStatus, usize)> {
        self.failures
            .iter()
            .find(|(_, s, _)| !followed_another(*s))
            .copied()
    }

    /// The failure that is the run's: the first on its own, else the first after another
    /// rank's; with the other failures of its kind seen in the same poll.
    fn run_failure(&self) -> Option<(RankStatus, Vec<RankStatus>)> {
        let (rank, status, poll) = self.own_failure().or(self.failures.first().copied())?;
        let with = self
            .failures
            .iter()
            .filter(|&&(r, s, p)| {
                r != rank && p == poll && followed_another(s) == followed_another(status)
            })
            .map(|&(r, s, _)| (r, s))
            .collect();
        Some(((rank, status), with))
    }

    /// Whether to keep polling: a rank still runs, none failed on its own, and the grace
    /// after a follow-on failure has not ended.
    fn goes_on(&self) -> bool {
        self.statuses.iter().any(Option::is_none)
            && self.own_failure().is_none()
            && self
                .grace_ends
                .is_none_or(|end| std::time::Instant::now() < end)
    }

    /// Sends `signal` to every rank still running, the first time only.
    fn pass_on(&mut self, signal: i32, children: &[Child]) {
        if self.passed_on.is_some() {
            return;
        }
        self.passed_on = Some(signal);
        for (child, status) in children.iter().zip(&self.statuses) {
            if status.is_none() {
                send_signal(child, signal);
            }
        }
    }

    /// Records the ranks that exited since the last poll, and their failures (not a rank
    /// that stopped as asked).
    fn poll(&mut self, children: &mut [Child]) -> Result<(), LaunchError> {
        self.polls += 1;
        for (rank, child) in children.iter_mut().enumerate() {
            if self.statuses[rank].is_some() {
                continue;
            }
            let status = child
                .try_wait()
                .map_err(|source| LaunchError::Wait { rank, source })?;
            if let Some(status) = status {
                self.statuses[rank] = Some(status);
                let as_asked = self.stopped_as_asked(status);
                if !status.success() && !as_asked {
                    self.failures.push((rank, status, self.polls));
                }
            }
        }
        if !self.failures.is_empty() && self.grace_ends.is_none() {
            self.grace_ends = Some(std::time::Instant::now() + FOLLOWED_FAILURE_GRACE);
        }
        Ok(())
    }

    /// Whether `status` is `128 + signal` after the launcher passed `signal` on.
    fn stopped_as_asked(&self, status: ExitStatus) -> bool {
        self.passed_on
            .is_some_and(|signal| status.code() == Some(128 + signal))
    }

    /// The run's outcome once polling ended: the ranks still running are killed when one
    /// failed.
    fn outcome(self, children: &mut [Child]) -> Outcome {
        let (failed, failed_with) = match self.run_failure() {
            Some((failed, with)) => (Some(failed), with),
            None => (None, Vec::new()),
        };
        if failed.is_some() {
            kill_all(children, &self.statuses);
        }
        let interrupted = self.passed_on.filter(|_| {
            failed.is_none()
                && self
                    .statuses
                    .iter()
                    .any(|s| s.is_some_and(|s| self.stopped_as_asked(s)))
        });
        Outcome {
            statuses: self.statuses,
            failed,
            failed_with,
            interrupted,
            first_rank: 0,
        }
    }
}

/// Lets a rank receive the stop signals the launcher passes on, however the launcher was
/// started: a launcher started in the background by a script (`fmoec run ... &`, `nohup`)
/// has SIGINT ignored, its children inherit that, and a shell cannot trap a signal ignored on
/// entry, so such a rank would never stop as asked.
#[cfg(unix)]
fn receive_stop_signals(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and calls only signal(2),
    // which is async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn receive_stop_signals(_: &mut Command) {}

/// Whether a rank's status says it failed only after another rank did.
fn followed_another(status: ExitStatus) -> bool {
    status.code() == Some(i32::from(FOLLOWED_ANOTHER_RANK))
}

#[cfg(unix)]
fn send_signal(child: &Child, signal: i32) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child this process has not reaped yet (its status
        // is still unknown), so the pid cannot belong to another process.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

#[cfg(not(unix))]
fn send_signal(_: &Child, _: i32) {}

fn kill_all(children: &mut [Child], statuses: &[Option<ExitStatus>]) {
    for (child, status) in children.iter_mut().zip(statuses) {
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where [`forward`] passes a rank's lines on.
#[derive(Clone, Copy)]
enum Output {
    Stdout,
    Stderr,
}

/// Passes each line of `stream` on to this process's `output`, after `[rank RANK] ` when
/// `label` names the rank, and says `done` at the end of the stream.
fn forward(
    stream: impl Read + Send + 'static,
    output: Output,
    label: Option<usize>,
    done: std::sync::mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            let text = match label {
                Some(rank) => format!("[rank {rank}] {line}\n"),
                None => format!("{line}\n"),
            };
            let _ = match output {
                Output::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
                Output::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
            };
        }
        let _ = done.send(());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sh(script: &str) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    #[test]
    fn ranks_get_the_torchrun_variables_and_succeed_together() {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $NCCL_NVLS_ENABLE $EXTRA\" > {}/rank$RANK",
            dir.path().display()
        );
        let launch = Launch {
            master_port: Some(29555),
            env: vec![("EXTRA".into(), "x".into())],
            ..Launch::default()
        };
        let outcome = spawn_local(3, "sh", &sh(&script), &launch).unwrap();
        assert_eq!(outcome.exit_code(), 0);
        assert!(outcome.describe().is_none());
        for rank in 0..3 {
            let text = std::fs::read_to_string(dir.path().join(format!("rank{rank}"))).unwrap();
            let nvls = std::env::var("NCCL_NVLS_ENABLE").unwrap_or_else(|_| "0".into());
            assert_eq!(
                text.trim(),
                format!("{rank} {rank} 3 127.0.0.1 29555 {nvls} x")
            );
        }
    }

    #[test]
    fn the_second_node_of_two_starts_ranks_two_and_three() {
        let dir = tempfile::tempdir().unwrap();
        // rank 3 fails only once rank 2 has written its line: the launcher stops the other
        // ranks when one fails, and on a loaded machine rank 2 may not have run yet
        let script = format!(
            "d={}; echo \"$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT\" > $d/tmp$RANK && mv $d/tmp$RANK $d/rank$RANK; \
             if [ $RANK = 3 ]; then i=0; while [ ! -f $d/rank2 ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; exit 5; fi; exit 0",
            dir.path().display()
        );
        let launch = Launch {
            master_addr: "10.1.2.3".into(),
            master_port: Some(29600),
            first_rank: 2,
            world: Some(4),
            ..Launch::default()
        };
        let outcome = spawn_local(2, "sh", &sh(&script), &launch).unwrap();
        for (rank, local) in [(2, 0), (3, 1)] {
            let text = std::fs::read_to_string(dir.path().join(format!("rank{rank}"))).unwrap();
            assert_eq!(text.trim(), format!("{rank} {local} 4 2 10.1.2.3 29600"));
        }
        assert_eq!(outcome.exit_code(), 5);
        assert!(
            outcome
                .describe()
                .unwrap()
                .starts_with("rank 3 exited with code 5"),
            "{:?}",
            outcome.describe()
        );
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_gives_its_exit_code() {
        // Rank 1 fails after a moment; ranks 0 and 2 would sleep for a minute.
        let started = Instant::now();
        let script = "if [ \"$RANK\" = 1 ]; then sleep 0.2; exit 7; else sleep 60; fi";
        let outcome = spawn_local(3, "sh", &sh(script), &Launch::default()).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the launcher hung"
        );
        assert_eq!(outcome.exit_code(), 7);
        assert_eq!(outcome.failed.map(|(r, _)| r), Some(1));
        let text = outcome.describe().unwrap();
        assert_eq!(text, "rank 1 exited with code 7; stopped rank(s) 0, 2");
    }

    #[test]
    fn ranks_that_fail_in_one_poll_are_all_named() {
        // Both ranks fail at the same moment, between the launcher's first poll (at once)
        // and its second (a second later): it cannot tell which failed first.
        let script = "sleep 0.5; if [ \"$RANK\" = 1 ]; then exit 5; else exit 7; fi";
        let launch = Launch {
            poll_every: Duration::from_secs(2),
            ..Launch::default()
        };
        let outcome = spawn_local(
            3,
            "sh",
            &sh(&format!("[ $RANK = 2 ] && exec sleep 60; {script}")),
            &launch,
        )
        .unwrap();
        assert_eq!(
            outcome.describe().unwrap(),
            "rank 0 exited with code 7 and rank 1 exited with code 5, seen at once (which \
             rank failed first cannot be told); stopped rank(s) 2"
        );
        assert_eq!(outcome.exit_code(), 7);
        // One failure a poll earlier than the other's is named alone.
        let script = "if [ \"$RANK\" = 1 ]; then sleep 0.3; exit 5; else sleep 1.5; exit 7; fi";
        let launch = Launch {
            poll_every: Duration::from_secs(1),
            ..Launch::default()
        };
        let outcome = spawn_local(2, "sh", &sh(script), &launch).unwrap();
        assert_eq!(
            outcome.describe().unwrap(),
            "rank 1 exited with code 5; stopped rank(s) 0"
        );
    }

    #[test]
    fn a_rank_killed_by_a_signal_is_reported() {
        let script = "if [ \"$RANK\" = 0 ]; then kill -9 $$; else sleep 60; fi";
        let outcome = spawn_local(2, "sh", &sh(script), &Launch::default()).unwrap();
        assert_eq!(outcome.exit_code(), 128 + 9);
        assert!(outcome.describe().unwrap().contains("killed by signal 9"));
    }

    #[cfg(unix)]
    /// Sets `flag` (the launcher's stop signal "received") on a thread once each of the
    /// first `ranks` ranks has written `ready$RANK` in `dir`, that is, has set its trap.
    fn set_once_ready(
        dir: &std::path::Path,
        ranks: usize,
        flag: &'static std::sync::atomic::AtomicBool,
    ) -> std::thread::JoinHandle<()> {
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            while !(0..ranks).all(|r| dir.join(format!("ready{r}")).exists()) {
                std::thread::sleep(Duration::from_millis(20));
            }
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    }

    #[test]
    fn a_stop_signal_of_the_launcher_is_passed_on_to_the_ranks() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // The launcher "receives" SIGTERM once both ranks have set their trap.
        static READY: AtomicBool = AtomicBool::new(false);
        // Each rank says which signal reached it and exits 0; without the signal they would
        // sleep for a minute.
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "trap 'echo TERM > {0}/rank$RANK; kill $!; exit 0' TERM; touch {0}/ready$RANK; sleep 60 & wait",
            dir.path().display()
        );
        let launch = Launch {
            stop_signal: Some(|| READY.load(Ordering::SeqCst).then_some(15)),
            ..Launch::default()
        };
        let watcher = set_once_ready(dir.path(), 2, &READY);
        let started = Instant::now();
        let outcome = spawn_local(2, "sh", &sh(&script), &launch).unwrap();
        watcher.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(30), "not passed on");
        assert_eq!(outcome.exit_code(), 0, "{:?}", outcome.describe());
        for rank in 0..2 {
            let text = std::fs::read_to_string(dir.path().join(format!("rank{rank}"))).unwrap();
            assert_eq!(text.trim(), "TERM");
        }
    }

    #[test]
    fn a_failure_that_follows_another_ranks_is_not_named_as_the_cause() {
        // Rank 1 fails at once because rank 0 gave up (exit 3); rank 0's own failure comes
        // a moment later: it is the one named, and not stopped by the launcher.
        let script = "if [ \"$RANK\" = 1 ]; then exit 3; else sleep 0.3; exit 1; fi";
        let outcome = spawn_local(2, "sh", &sh(script), &Launch::default()).unwrap();
        assert_eq!(outcome.describe().unwrap(), "rank 0 exited with code 1");
        assert_eq!(outcome.exit_code(), 1);
        // Alone (the cause is on another machine), the follow-on failure is named as such
        // once the grace is over, and the ranks still running are stopped.
        let started = Instant::now();
        let script = "if [ \"$RANK\" = 1 ]; then exit 3; else sleep 60; fi";
        let outcome = spawn_local(2, "sh", &sh(script), &Launch::default()).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the launcher hung"
        );
        assert_eq!(
            outcome.describe().unwrap(),
            "rank 1 exited with code 3 (it failed after another rank did: that rank's error \
             says why); stopped rank(s) 0"
        );
    }

    #[cfg(unix)]
    #[test]
    fn ranks_that_stop_as_asked_are_an_interruption_not_a_failure() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static READY: AtomicBool = AtomicBool::new(false);
        // On SIGINT each rank "saves" and exits 130, rank 1 more slowly than rank 0: the
        // launcher must not stop rank 1 when rank 0 is done.
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "trap 'kill $!; if [ $RANK = 1 ]; then sleep 0.5; fi; echo saved > {0}/rank$RANK; exit 130' INT; \
             touch {0}/ready$RANK; sleep 60 & wait",
            dir.path().display()
        );
        let launch = Launch {
            stop_signal: Some(|| READY.load(Ordering::SeqCst).then_some(2)),
            ..Launch::default()
        };
        let watcher = set_once_ready(dir.path(), 2, &READY);
        let outcome = spawn_local(2, "sh", &sh(&script), &launch).unwrap();
        watcher.join().unwrap();
        assert_eq!(outcome.describe(), None);
        assert_eq!(outcome.interrupted, Some(2));
        assert_eq!(outcome.stopped_as_asked(), vec![0, 1]);
        assert_eq!(outcome.exit_code(), 130);
        for rank in 0..2 {
            let text = std::fs::read_to_string(dir.path().join(format!("rank{rank}"))).unwrap();
            assert_eq!(text.trim(), "saved");
        }
    }

    /// The rendezvous port is picked below the ephemeral range (where another program's
    /// port-0 bind or outgoing connection could take it before rank 0 binds it), free, and
    /// another one at each call.
    #[test]
    fn a_free_port_is_picked_below_the_ephemeral_range() {
        let Some(start) = ephemeral_range_start() else {
            return; // not Linux: the kernel's pick
        };
        let ports: Vec<u16> = (0..3).map(|_| free_port("127.0.0.1").unwrap()).collect();
        for &port in &ports {
            assert!(
                (LOWEST_PICKED_PORT..start).contains(&port),
                "{port} not below the ephemeral range starting at {start}"
            );
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
        assert!(ports[0] != ports[1] && ports[1] != ports[2], "{ports:?}");
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_hang() {
        let e = spawn_local(2, "/nonexistent/fmoec-rank", &[], &Launch::default()).unwrap_err();
        assert!(e.to_string().starts_with("cannot start rank 0"), "{e}");
        assert!(matches!(
            spawn_local(0, "sh", &[], &Launch::default()),
            Err(LaunchError::NoRanks)
        ));
    }
}
