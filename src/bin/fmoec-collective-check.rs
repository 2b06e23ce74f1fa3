//! `fmoec-collective-check`: exercise the collective layer on several ranks and say
//! PASS or FAIL per check, then measure all-to-all and all-reduce bus bandwidth.
//!
//! ```text
//! fmoec-collective-check --gpus 2              # one process per GPU, NCCL (feature `cuda`)
//! fmoec-collective-check --device cpu --ranks 4  # in-process ranks on CPU threads (CI)
//! fmoec-collective-check --device cpu --ranks 4 --processes  # 4 processes over TCP
//! fmoec-collective-check --gpus 4 --no-bench --bench-moe S1,F0   # FasterMoE against plain EP
//! ```
//!
//! With `--gpus N` it relaunches itself as N ranks (the torchrun variables set, NCCL's
//! library made findable, `NCCL_NVLS_ENABLE=0`); it can also run under torchrun or any
//! launcher that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//! Every rank checks each operation on tensors with known contents, and the expert
//! exchange of a two-block MoE (forward, backward, gradient reduction by kind, global
//! norm clipping) against the single-rank run of the same global batch, computed on CPU
//! in f64 in each process, also with FasterMoE's smart schedule and shadowing. The exit code
//! is 0 only when every rank passes.
//!
//! `--bench-moe` times one MoE layer's exchange with its experts, forward and backward, on
//! the bench's shapes and routing (`fmoec bench moe`), plain and with FasterMoE's options.
//!
//! It owns no library logic: everything it runs is `fmoec::collective`.

use clap::Parser;
use fmoec::collective::local::{local_world, run_ranks};
use fmoec::collective::{Collective, ErrorKind, ExpertPlacement, GroupLayout, Groups};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "fmoec-collective-check",
    about = "Check the collective layer (NCCL or in-process) on several ranks and measure bandwidth"
)]
struct Args {
    /// Launch this many ranks on this machine, one per GPU (needs the `cuda` feature).
    #[arg(long)]
    gpus: Option<usize>,
    /// `cuda` (NCCL, one process per rank) or `cpu` (in-process ranks on threads).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Number of CPU ranks with `--device cpu` (threads of this process, or processes with
    /// `--processes`).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// With `--device cpu`: one process per rank, connected over TCP on loopback (the
    /// transport of CPU ranks on several machines), instead of threads. Under torchrun's
    /// variables with `--device cpu` this process is one such rank.
    #[arg(long)]
    processes: bool,
    /// Ranks per expert group (default: all ranks).
    #[arg(long)]
    expert_group: Option<usize>,
    /// Timeout of every collective, in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_secs: f64,
    /// Message sizes for the bandwidth measurement, MiB per rank.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    bench_mib: Vec<u64>,
    /// Skip the bandwidth measurement.
    #[arg(long)]
    no_bench: bool,
    /// Timed iterations per size (the median is reported; at least 20).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// At the end, let the last rank skip a barrier and check that the others get a
    /// timeout error naming the group (use a short --timeout-secs).
    #[arg(long)]
    check_timeout: bool,
    /// Time one MoE layer's expert exchange and experts (forward and backward) on these
    /// shapes of `fmoec bench moe` (S1, S1-T4096, S1-T512, S3, F0, tiny), every rank its own
    /// tokens: plain expert parallelism, the smart schedule, shadowing, and both.
    #[arg(long, value_delimiter = ',', value_name = "SHAPES")]
    bench_moe: Vec<String>,
    /// The routing of `--bench-moe`: balanced, skewed (the busiest expert 3x the mean) or
    /// all-to-one.
    #[arg(long, value_enum, default_value = "skewed")]
    moe_routing: fmoec::runtime::bench::RoutingKind,
    /// The link bandwidth (GB/s per direction) shadowing's decision assumes in
    /// `--bench-moe` (default: H100 SXM's NVLink, as `std.hardware` has it).
    #[arg(long, default_value_t = 450.0)]
    link_gbps: f64,
    /// The matmul rate (TFLOP/s) shadowing's decision assumes in `--bench-moe` (default:
    /// H100 SXM's dense bf16 peak).
    #[arg(long, default_value_t = 989.5)]
    tflops: f64,
}

fn main() {
    let args = Args::parse();
    let code = match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(args: Args) -> anyhow::Result<i32> {
    if args.iters < 20 {
        anyhow::bail!("--iters must be at least 20 (the median of fewer is not reported)");
    }
    let timeout = Duration::try_from_secs_f64(args.timeout_secs)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--timeout-secs must be a positive number"))?;
    match args.device.as_str() {
        "cpu" => run_cpu(&args, timeout),
        "cuda" => run_cuda(&args, timeout),
        other => anyhow::bail!("--device must be `cpu` or `cuda`, not `{other}`"),
    }
}

fn layout_for(world: usize, expert_group: Option<usize>) -> anyhow::Result<GroupLayout> {
    Ok(GroupLayout::data_parallel(
        world,
        expert_group.unwrap_or(world),
    )?)
}

fn run_cpu(args: &Args, timeout: Duration) -> anyhow::Result<i32> {
    use fmoec::collective::launch::{spawn_local, Launch};
    use fmoec::collective::rendezvous::DistEnv;
    if args.gpus.is_some() {
        anyhow::bail!("--gpus launches GPU ranks; with --device cpu use --ranks N");
    }
    if let Some(env) = DistEnv::from_env()? {
        // One rank of a multi-process run over TCP.
        let layout = layout_for(env.world, args.expert_group)?;
        let groups = fmoec::collective::tcp::connect(&layout, None, &env, timeout)?;
        let report = Report::new(String::new());
        rank_checks(&groups, Device::Cpu, args, &report);
        if args.check_timeout {
            timeout_check(&groups, &report, timeout);
        }
        return Ok(summary(report.failures()));
    }
    if args.processes {
        let program = std::env::current_exe()?;
        let rest: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let outcome = spawn_local(args.ranks, program, &rest, &Launch::default())?;
        if let Some(text) = outcome.describe() {
            eprintln!("fmoec-collective-check: {text}");
        }
        return Ok(outcome.exit_code());
    }
    let layout = layout_for(args.ranks, args.expert_group)?;
    let world = local_world(&layout, timeout)?;
    let results = run_ranks(world, |groups| {
        let rank = groups.rank();
        let report = Report::new(format!("[rank {rank}] "));
        rank_checks(&groups, Device::Cpu, args, &report);
        if args.check_timeout {
            timeout_check(&groups, &report, timeout);
        }
        report.failures()
    });
    let mut failures = 0;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(n) => failures += n,
            Err(_) => {
                println!("[rank {rank}] FAIL the rank panicked");
                failures += 1;
            }
        }
    }
    Ok(summary(failures))
}

fn summary(failures: usize) -> i32 {
    if failures == 0 {
        println!("ALL PASS");
        0
    } else {
        println!("{failures} check(s) FAILED");
        1
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &Args, _: Duration) -> anyhow::Result<i32> {
    anyhow::bail!(
        "this binary was built without the `cuda` feature; rebuild with `--features cuda` or use --device cpu"
    )
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &Args, timeout: Duration) -> anyhow::Result<i32> {
    use fmoec::collective::launch::{spawn_local, Launch};
    use fmoec::collective::nccl::{self, NcclLibrary};
    use fmoec::collective::rendezvous::DistEnv;

    let env = DistEnv::from_env()?;
    if let (Some(n), None) = (args.gpus, &env) {
        // The launcher: rerun this program as n ranks.
        let visible = tch::Cuda::device_count();
        if n as i64 > visible {
            anyhow::bail!("--gpus {n} but this machine shows {visible} CUDA device(s)");
        }
        let library = NcclLibrary::for_ranks()?;
        let program = std::env::current_exe()?;
        let mut rest: Vec<std::ffi::OsString> = Vec::new();
        let mut skip = false;
        for a in std::env::args_os().skip(1) {
            if skip {
                skip = false;
                continue;
            }
            match a.to_str() {
                Some("--gpus") => skip = true,
                Some(s) if s.starts_with("--gpus=") => {}
                _ => rest.push(a),
            }
        }
        let launch = Launch {
            env: library.env.clone(),
            ..Launch::default()
        };
        let outcome = spawn_local(n, program, &rest, &launch)?;
        if let Some(text) = outcome.describe() {
            eprintln!("fmoec-collective-check: {text}");
        }
        return Ok(outcome.exit_code());
    }
    let Some(env) = env else {
        anyhow::bail!("--device cuda needs --gpus N or the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)");
    };
    let layout = layout_for(env.world, args.expert_group)?;
    let (groups, device) = nccl::connect(&layout, &env, timeout)?;
    let report = Report::new(String::new());
    if env.rank == 0 {
        let version = nccl::nccl_version().unwrap_or(0);
        println!(
            "NCCL {}.{}.{} on {} rank(s), expert group {}",
            version / 10000,
            version / 100 % 100,
            version % 100,
            env.world,
            groups.expert().size()
        );
    }
    rank_checks(&groups, device, args, &report);
    let failures = report.failures();
    if args.check_timeout {
        timeout_check(&groups, &report, timeout);
        // The communicators are aborted now (or the peers are); skip their teardown.
        std::process::exit(if report.failures() == 0 { 0 } else { 1 });
    }
    Ok(summary(failures))
}

/// PASS/FAIL lines of one rank.
struct Report {
    prefix: String,
    failed: std::cell::Cell<usize>,
}

impl Report {
    fn new(prefix: String) -> Report {
        Report {
            prefix,
            failed: std::cell::Cell::new(0),
        }
    }

    fn check(&self, name: &str, result: Result<String, String>) {
        match result {
            Ok(detail) if detail.is_empty() => println!("{}PASS {name}", self.prefix),
            Ok(detail) => println!("{}PASS {name} ({detail})", self.prefix),
            Err(why) => {
                self.failed.set(self.failed.get() + 1);
                println!("{}FAIL {name}: {why}", self.prefix);
            }
        }
    }

    fn info(&self, text: &str) {
        println!("{}{text}", self.prefix);
    }

    fn failures(&self) -> usize {
        self.failed.get()
    }
}

type Check = Result<String, String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn rank_checks(groups: &Groups, device: Device, args: &Args, report: &Report) {
    report.check(
        "all_reduce_sum f32",
        all_reduce(groups, device, Kind::Float, false),
    );
    report.check(
        "all_reduce_sum f64",
        all_reduce(groups, device, Kind::Double, false),
    );
    report.check(
        "all_reduce_sum bf16",
        all_reduce(groups, device, Kind::BFloat16, false),
    );
    report.check(
        "all_reduce_sum i64",
        all_reduce(groups, device, Kind::Int64, false),
    );
    report.check(
        "all_reduce_sum f32 non-contiguous",
        all_reduce(groups, device, Kind::Float, true),
    );
    report.check("all_gather_counts", all_gather(groups));
    report.check(
        "all_to_all_v f64 [rows,3,2]",
        all_to_all(groups, device, Kind::Double),
    );
    report.check(
        "all_to_all_v bf16 [rows,3,2]",
        all_to_all(groups, device, Kind::BFloat16),
    );
    report.check("broadcast", broadcast(groups, device));
    report.check("barrier (every group)", barrier(groups));
    report.check(
        "expert exchange equals single rank (f64, tol 1e-10)",
        moe::equivalence(groups, device, Kind::Double, 1e-10),
    );
    report.check(
        "expert exchange equals single rank (f32, tol 1e-4)",
        moe::equivalence(groups, device, Kind::Float, 1e-4),
    );
    if groups.expert().size() > 1 {
        let chunks = groups.expert().size();
        for (kind, tolerance, name) in [
            (Kind::Double, 1e-10, "f64, tol 1e-10"),
            (Kind::Float, 1e-4, "f32, tol 1e-4"),
        ] {
            report.check(
                &format!("expert exchange in {chunks} chunks with expert 0 shadowed equals single rank ({name})"),
                moe::fastermoe_equivalence(groups, device, kind, tolerance, chunks),
            );
        }
    }
    if !args.no_bench {
        if let Err(e) = bench(groups, device, args, report) {
            report.check("bandwidth measurement", Err(e));
        }
    }
    if !args.bench_moe.is_empty() {
        if let Err(e) = fastermoe_bench::run(groups, device, args, report) {
            report.check("FasterMoE measurement", Err(e));
        }
    }
}

fn all_reduce(groups: &Groups, device: Device, kind: Kind, strided: bool) -> Check {
    let group = groups.data();
    let rank = group.rank() as f64;
    let n = group.size() as f64;
    let base = Tensor::arange(24, (Kind::Double, Device::Cpu)).reshape([4, 6]);
    let mine = (&base * (rank + 1.0)).to_kind(kind).to_device(device);
    let mut t = if strided { mine.tr() } else { mine };
    group
        .all_reduce_sum(&mut t, "check all_reduce_sum")
        .map_err(err)?;
    let got = t.to_device(Device::Cpu).to_kind(Kind::Double);
    let got = if strided { got.tr() } else { got };
    let want = &base * (n * (n + 1.0) / 2.0);
    let diff = (&got - &want).abs().max().double_value(&[]);
    // bf16 holds integers up to 256 exactly; the largest sum here is 23·n(n+1)/2.
    let tolerance = if kind == Kind::BFloat16 {
        want.max().double_value(&[]) / 128.0
    } else {
        0.0
    };
    if diff > tolerance {
        return Err(format!("max difference {diff} from the expected sum"));
    }
    Ok(format!("{}", group.label()))
}

fn all_gather(groups: &Groups) -> Check {
    let group = groups.expert();
    let counts: Vec<i64> = (0..5).map(|i| group.rank() as i64 * 10 + i).collect();
    let got = group
        .all_gather_counts(&counts, "check all_gather_counts")
        .map_err(err)?;
    let want: Vec<Vec<i64>> = (0..group.size())
        .map(|r| (0..5).map(|i| r as i64 * 10 + i).collect())
        .collect();
    if got != want {
        return Err(format!("got {got:?}, want {want:?}"));
    }
    Ok(format!("{}", group.label()))
}

/// Rows rank `p` sends to rank `q`: varies, and is zero for some pairs.
fn a2a_rows(p: usize, q: usize) -> i64 {
    ((p * 3 + q * 5 + 1) % 4) as i64
}

/// The value of element (row, i, j) that `p` sends to `q`.
fn a2a_block(p: usize, q: usize, rows: i64) -> Tensor {
    let r = Tensor::arange(rows, (Kind::Double, Device::Cpu)).reshape([rows, 1, 1]);
    let i = Tensor::arange(3, (Kind::Double, Device::Cpu)).reshape([1, 3, 1]);
    let j = Tensor::arange(2, (Kind::Double, Device::Cpu)).reshape([1, 1, 2]);
    // Small integers, exact in bf16: p·64 + q·16 + row·4 + 2i + j < 256 for 4 ranks.
    (r * 4.0 + i * 2.0 + j) + (p as f64 * 64.0 + q as f64 * 16.0)
}

fn all_to_all(groups: &Groups, device: Device, kind: Kind) -> Check {
    let group = groups.expert();
    let (me, n) = (group.rank(), group.size());
    if n > 4 {
        return Ok("skipped: the bf16-exact pattern covers groups of up to 4".into());
    }
    let send_counts: Vec<i64> = (0..n).map(|q| a2a_rows(me, q)).collect();
    let recv_counts: Vec<i64> = (0..n).map(|p| a2a_rows(p, me)).collect();
    let blocks: Vec<Tensor> = (0..n).map(|q| a2a_block(me, q, send_counts[q])).collect();
    let send = Tensor::cat(&blocks, 0).to_kind(kind).to_device(device);
    let got = group
        .all_to_all_v(&send, &send_counts, &recv_counts, "check all_to_all_v")
        .map_err(err)?;
    let want = Tensor::cat(
        &(0..n)
            .map(|p| a2a_block(p, me, recv_counts[p]))
            .collect::<Vec<_>>(),
        0,
    );
    let got = got.to_device(Device::Cpu).to_kind(Kind::Double);
    if got.size() != want.size() {
        return Err(format!("shape {:?}, want {:?}", got.size(), want.size()));
    }
    let diff = if want.numel() == 0 {
        0.0
    } else {
        (&got - &want).abs().max().double_value(&[])
    };
    if diff > 0.0 {
        return Err(format!("max difference {diff}"));
    }
    Ok(format!("{}, received {recv_counts:?} rows", group.label()))
}

fn broadcast(groups: &Groups, device: Device) -> Check {
    let group = groups.data();
    let root = group.size() - 1;
    let mut t = Tensor::full([7, 5], group.rank() as f64 + 0.5, (Kind::Float, device));
    group
        .broadcast(&mut t, root, "check broadcast")
        .map_err(err)?;
    let got = t.to_device(Device::Cpu);
    let want = root as f64 + 0.5;
    let diff = (got - want).abs().max().double_value(&[]);
    if diff != 0.0 {
        return Err(format!("values differ from the root's {want} by {diff}"));
    }
    Ok(format!("{}, root {root}", group.label()))
}

fn barrier(groups: &Groups) -> Check {
    for group in [
        groups.data(),
        groups.expert(),
        groups.expert_data(),
        groups.gate(),
    ] {
        group.barrier("check barrier").map_err(err)?;
    }
    Ok(String::new())
}

fn timeout_check(groups: &Groups, report: &Report, timeout: Duration) {
    let group = groups.data();
    if group.size() < 2 {
        report.check("timeout names the group", Ok("skipped: one rank".into()));
        return;
    }
    if group.rank() == group.size() - 1 {
        report.info("skipping the barrier on purpose (timeout check)");
        // Stay alive past the peers' deadline so they time out rather than see us exit.
        std::thread::sleep(timeout + timeout / 2 + Duration::from_secs(1));
        return;
    }
    let started = Instant::now();
    let result = match group.barrier("timeout check") {
        Ok(()) => Err("the barrier completed without the last rank".into()),
        Err(e) if matches!(*e.kind, ErrorKind::Timeout { .. }) => {
            let text = e.to_string();
            if text.contains(&group.label().to_string()) && text.contains("timeout check") {
                Ok(format!("after {:.1?}: {text}", started.elapsed()))
            } else {
                Err(format!(
                    "the message does not name the group and call site: {text}"
                ))
            }
        }
        Err(e) => Err(format!("expected a timeout, got: {e}")),
    };
    report.check("timeout names the group", result);
}

/// Median of per-iteration times (each iteration: barrier, then the timed operation).
fn time_op(
    group: &dyn Collective,
    device: Device,
    iters: usize,
    mut op: impl FnMut() -> Result<(), String>,
) -> Result<Duration, String> {
    for _ in 0..5 {
        op()?;
    }
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        group.barrier(&format!("bench barrier {i}")).map_err(err)?;
        if let Device::Cuda(d) = device {
            tch::Cuda::synchronize(d as i64);
        }
        let started = Instant::now();
        op()?;
        if let Device::Cuda(d) = device {
            tch::Cuda::synchronize(d as i64);
        }
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// The slowest rank's median, so every rank prints the same figure.
fn slowest(group: &dyn Collective, mine: Duration) -> Result<Duration, String> {
    let all = group
        .all_gather_counts(&[mine.as_nanos() as i64], "bench medians")
        .map_err(err)?;
    let max = all
        .iter()
        .filter_map(|c| c.first())
        .copied()
        .max()
        .unwrap_or(0);
    Ok(Duration::from_nanos(max.max(0) as u64))
}

fn bench(groups: &Groups, device: Device, args: &Args, report: &Report) -> Result<(), String> {
    let print = groups.rank() == 0;
    for (name, group) in [
        ("all_to_all_v", groups.expert()),
        ("all_reduce_sum", groups.data()),
    ] {
        let n = group.size();
        if n < 2 {
            continue;
        }
        for &mib in &args.bench_mib {
            let bytes = mib as i64 * (1 << 20);
            // bf16 rows of 1024 values (2 KiB), split evenly over the peers.
            let rows = (bytes / 2048 / n as i64) * n as i64;
            let bytes = rows * 2048;
            if rows == 0 {
                continue;
            }
            let elapsed = if name == "all_to_all_v" {
                let send = Tensor::ones([rows, 1024], (Kind::BFloat16, device));
                let counts = vec![rows / n as i64; n];
                time_op(group, device, args.iters, || {
                    group
                        .all_to_all_v(&send, &counts, &counts, "bench all_to_all_v")
                        .map(|_| ())
                        .map_err(err)
                })?
            } else {
                let mut t = Tensor::ones([rows, 1024], (Kind::BFloat16, device));
                time_op(group, device, args.iters, || {
                    group
                        .all_reduce_sum(&mut t, "bench all_reduce_sum")
                        .map_err(err)
                })?
            };
            let elapsed = slowest(group, elapsed)?;
            // nccl-tests' bus bandwidth: all-to-all moves (n-1)/n of the buffer over the
            // links, ring all-reduce 2(n-1)/n.
            let factor = if name == "all_to_all_v" {
                (n - 1) as f64 / n as f64
            } else {
                2.0 * (n - 1) as f64 / n as f64
            };
            let algbw = bytes as f64 / elapsed.as_secs_f64() / 1e9;
            if print {
                report.info(&format!(
                    "BENCH {name} {} ranks {mib} MiB/rank bf16 on {device:?}: median {:.3} ms (slowest rank, {} iters), algbw {algbw:.2} GB/s, busbw {:.2} GB/s",
                    n,
                    elapsed.as_secs_f64() * 1e3,
                    args.iters,
                    algbw * factor
                ));
            }
        }
    }
    Ok(())
}

/// The expert-exchange equivalence check: `fmoec::collective::selftest`'s two-block top-2
/// MoE, split over this run's ranks, against its single-rank run computed on CPU in f64.
mod moe {
    use super::*;
    use fmoec::collective::selftest::{self, Problem};

    /// Experts per rank of the expert group (the global count is this × group size).
    const EXPERTS_PER_RANK: usize = 2;
    const TOKENS_PER_RANK: i64 = 4;

    /// [`equivalence`] with the exchange in `chunks` chunks and expert 0 replicated.
    pub fn fastermoe_equivalence(
        groups: &Groups,
        device: Device,
        kind: Kind,
        tolerance: f64,
        chunks: usize,
    ) -> Check {
        let world = groups.world();
        let experts = EXPERTS_PER_RANK * groups.expert().size();
        let problem = Problem::new(TOKENS_PER_RANK * world as i64, experts, 7);
        let expected = selftest::reference(&problem, Kind::Double);
        let placement =
            ExpertPlacement::contiguous(experts, groups.expert().size()).map_err(err)?;
        let policy = selftest::ShadowThese(vec![0]);
        let options = fmoec::collective::ExchangeOptions {
            chunks,
            shadowing: Some(&policy),
        };
        let (got, records) =
            selftest::split_with(groups, device, kind, &problem, &placement, options)
                .map_err(err)?;
        if records
            .iter()
            .any(|r| r.shadowed != [0] || r.chunks != chunks)
        {
            return Err(format!("the exchanges ran as {records:?}"));
        }
        let max = largest_difference(groups, &expected, &got, &placement, tolerance)?;
        Ok(format!("{world} ranks, max difference {max:.1e}"))
    }

    /// This rank's share of `got` against the `expected` reference: the largest difference,
    /// or every one above `tolerance`.
    fn largest_difference(
        groups: &Groups,
        expected: &selftest::Outcome,
        got: &selftest::Outcome,
        placement: &ExpertPlacement,
        tolerance: f64,
    ) -> Result<f64, String> {
        let diffs = selftest::compare(
            expected,
            got,
            groups.rank(),
            groups.world(),
            groups.expert().rank(),
            placement,
        );
        let bad = selftest::failures(&diffs, tolerance);
        if !bad.is_empty() {
            return Err(bad.join("; "));
        }
        Ok(diffs.iter().map(|(_, d)| *d).fold(0.0, f64::max))
    }

    pub fn equivalence(groups: &Groups, device: Device, kind: Kind, tolerance: f64) -> Check {
        let world = groups.world();
        let experts = EXPERTS_PER_RANK * groups.expert().size();
        let problem = Problem::new(TOKENS_PER_RANK * world as i64, experts, 7);
        let expected = selftest::reference(&problem, Kind::Double);
        let placement =
            ExpertPlacement::contiguous(experts, groups.expert().size()).map_err(err)?;
        let got = selftest::split(groups, device, kind, &problem, &placement).map_err(err)?;
        let max = largest_difference(groups, &expected, &got, &placement, tolerance)?;
        Ok(format!(
            "{} ranks, {}, norm {:.6}, max difference {max:.1e}",
            world,
            groups.expert().label(),
            got.norm
        ))
    }
}

/// `--bench-moe`: one MoE layer's exchange with its experts, forward and backward, timed on
/// every rank with its own tokens (the bench's shape and routing), plain and with FasterMoE's
/// options; the slowest rank's median per variant.
mod fastermoe_bench {
    use super::*;
    use fmoec::collective::{exchange_experts_with, ExchangeOptions, ShadowPolicy, Tape};
    use fmoec::plan::fastermoe::ExchangeCosts;
    use fmoec::runtime::bench::{make_routing, smoke_shapes, standard_shapes, Shape};
    use fmoec::runtime::moe::{counts_of, Experts, PlannedShadowing, RankExperts};
    use fmoec::runtime::params::ParamStore;

    fn shape(name: &str) -> Result<Shape, String> {
        standard_shapes()
            .into_iter()
            .chain(smoke_shapes())
            .find(|s| s.name == name)
            .ok_or_else(|| {
                format!("--bench-moe: no shape `{name}` (S1, S1-T4096, S1-T512, S3, F0, tiny)")
            })
    }

    /// This rank's layer: its experts, tokens sorted by slot, combine weights.
    struct Layer {
        experts: Experts,
        placement: ExpertPlacement,
        x: Tensor,
        /// The token of each sorted row, and its combine weight.
        token: Tensor,
        weight: Tensor,
        counts: Vec<i64>,
        /// Busiest expert's load over the mean, over the whole group.
        skew: f64,
    }

    fn layer(groups: &Groups, device: Device, args: &Args, s: &Shape) -> Result<Layer, String> {
        let group = groups.expert();
        let g = group.size() as i64;
        if s.experts % g != 0 {
            return Err(format!(
                "--bench-moe {}: {} experts do not split over {g} ranks",
                s.name, s.experts
            ));
        }
        let kind = if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        // every rank draws its own tokens and routing, the experts from one seed
        tch::manual_seed(1000 + groups.rank() as i64);
        let (expert, weight) = make_routing(s, args.moe_routing, device).map_err(err)?;
        let x = Tensor::randn([s.tokens, s.width], (kind, device));
        tch::manual_seed(7);
        let mut store = ParamStore::new(device, kind);
        let mut experts = Experts::new(
            &mut store,
            "experts",
            s.experts / g,
            s.width,
            s.hidden,
            s.act,
            false,
            0.02,
        )
        .map_err(err)?;
        experts.path = fmoec::runtime::moe::ExpertPath::Grouped;
        let placement = ExpertPlacement::contiguous(s.experts as usize, g as usize).map_err(err)?;
        // contiguous placement: slot = expert
        let flat = expert.reshape([-1]);
        let order = flat.argsort_stable(true, 0, false);
        let counts_t = counts_of(&flat, s.experts).map_err(err)?;
        let counts = Vec::<i64>::try_from(counts_t.to_device(Device::Cpu)).map_err(err)?;
        let token = order.divide_scalar_mode(s.top_k, "floor");
        let weight = weight.reshape([-1]).index_select(0, &order).to_kind(kind);
        let all = group
            .all_gather_counts(&counts, "bench moe counts")
            .map_err(err)?;
        let load: Vec<i64> = (0..s.experts as usize)
            .map(|e| all.iter().map(|c| c[e]).sum())
            .collect();
        let mean = load.iter().sum::<i64>() as f64 / load.len().max(1) as f64;
        let max = load.iter().copied().max().unwrap_or(0) as f64;
        Ok(Layer {
            experts,
            placement,
            x,
            token,
            weight,
            counts,
            skew: if mean > 0.0 { max / mean } else { 0.0 },
        })
    }

    /// One forward and backward of the layer; the experts the exchange replicated.
    fn step(
        group: &dyn Collective,
        l: &Layer,
        options: ExchangeOptions,
        at: &str,
    ) -> Result<usize, String> {
        let x = l.x.detach().set_requires_grad(true);
        let mut tape = Tape::new();
        tape.step();
        let tokens = x.index_select(0, &l.token);
        let (y, exchange) = exchange_experts_with(
            group,
            &l.placement,
            &tokens,
            &l.counts,
            at,
            options,
            &RankExperts(&l.experts),
        )
        .map_err(err)?;
        let shadowed = exchange.shadowed().len();
        tape.record(exchange);
        let out = x
            .zeros_like()
            .index_add(0, &l.token, &(y * l.weight.unsqueeze(1)));
        let loss = out.to_kind(Kind::Float).square().mean(Kind::Float);
        tape.backward(&loss, group, at).map_err(err)?;
        Ok(shadowed)
    }

    pub fn run(
        groups: &Groups,
        device: Device,
        args: &Args,
        report: &Report,
    ) -> Result<(), String> {
        let group = groups.expert();
        let g = group.size();
        if g < 2 {
            return Err("--bench-moe needs an expert group of 2 ranks or more".into());
        }
        let print = groups.rank() == 0;
        for name in &args.bench_moe {
            let s = shape(name)?;
            let l = layer(groups, device, args, &s)?;
            let bytes = if device.is_cuda() { 2.0 } else { 4.0 };
            let (w, h) = (s.width as f64, s.hidden as f64);
            let matrices = s.act.matrices() as f64;
            // the planner's costs of this layer on the assumed links and GPUs
            let policy = PlannedShadowing(ExchangeCosts::of_layer(
                w * bytes,
                3.0 * 2.0 * matrices * w * h,
                matrices * w * h * bytes,
                args.link_gbps * 1e9,
                args.tflops * 1e12,
            ));
            let shadow = Some(&policy as &dyn ShadowPolicy);
            let mut variants: Vec<(String, usize, Option<&dyn ShadowPolicy>)> =
                vec![("plain".into(), 1, None)];
            if g > 2 {
                variants.push(("chunks(2)".into(), 2, None));
            }
            variants.push((format!("chunks({g})"), g, None));
            variants.push(("shadowing".into(), 1, shadow));
            variants.push((format!("shadowing + chunks({g})"), g, shadow));
            let mut plain = None;
            for (label, chunks, shadowing) in variants {
                let options = ExchangeOptions { chunks, shadowing };
                let at = format!("bench moe {name} {label}");
                let mut replicated = 0;
                let elapsed = time_op(group, device, args.iters, || {
                    replicated = step(group, &l, options, &at)?;
                    Ok(())
                })?;
                let elapsed = slowest(group, elapsed)?;
                let ms = elapsed.as_secs_f64() * 1e3;
                let base = *plain.get_or_insert(ms);
                if print {
                    let routing = clap::ValueEnum::to_possible_value(&args.moe_routing)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default();
                    report.info(&format!(
                        "BENCH moe {name} {} {routing} routing (max/mean load {:.2}) {g} ranks {label}: median {ms:.3} ms (slowest rank, {} iters), {:.2}x plain, {replicated} expert(s) replicated",
                        format!("{:?}", s.act).to_lowercase(),
                        l.skew,
                        args.iters,
                        base / ms
                    ));
                }
            }
        }
        Ok(())
    }
}
