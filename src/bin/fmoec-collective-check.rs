//! `fmoec-collective-check`: exercise the collective layer on several ranks and say
//! PASS or FAIL per check, then measure all-to-all and all-reduce bus bandwidth.
//!
//! ```text
//! fmoec-collective-check --gpus 2              # one process per GPU, NCCL (feature `cuda`)
//! fmoec-collective-check --device cpu --ranks 4  # in-process ranks on CPU threads (CI)
//! ```
//!
//! With `--gpus N` it relaunches itself as N ranks (the torchrun variables set, NCCL's
//! library made findable, `NCCL_NVLS_ENABLE=0`); it can also run under torchrun or any
//! launcher that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//! Every rank checks each operation on tensors with known contents, and the expert
//! exchange of a two-block MoE (forward, backward, gradient reduction by kind, global
//! norm clipping) against the single-rank run of the same global batch, computed on CPU
//! in f64 in each process. The exit code is 0 only when every rank passes.
//!
//! It owns no library logic: everything it runs is `fmoec::collective`.

use clap::Parser;
use fmoec::collective::local::{local_world, run_ranks};
use fmoec::collective::{
    clip_global_norm, exchange_experts, reduce_gradients, Collective, ErrorKind, ExpertPlacement,
    GroupLayout, Groups, ParamKind, Tape,
};
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
    /// Number of in-process ranks with `--device cpu`.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
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
    if args.gpus.is_some() {
        anyhow::bail!("--gpus launches GPU ranks; with --device cpu use --ranks N");
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
    if !args.no_bench {
        if let Err(e) = bench(groups, device, args, report) {
            report.check("bandwidth measurement", Err(e));
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

/// The expert-exchange equivalence check: a two-block top-2 MoE, single rank vs split.
mod moe {
    use super::*;

    const WIDTH: i64 = 8;
    const HIDDEN: i64 = 12;
    /// Experts per rank of the expert group (the global count is this × group size).
    const EXPERTS_PER_RANK: usize = 2;
    const TOP_K: i64 = 2;
    const TOKENS_PER_RANK: i64 = 4;
    const BLOCKS: usize = 2;
    const MAX_NORM: f64 = 0.05;

    struct Block {
        w_in: Tensor,
        w_gate: Tensor,
        /// Stacked over experts: w1 [E,d,h], b1 [E,h], w2 [E,h,d], b2 [E,d].
        experts: Vec<Tensor>,
    }

    struct Init {
        x: Tensor,
        target: Tensor,
        blocks: Vec<Block>,
    }

    /// The same numbers on every rank: a fixed seed on CPU in f64.
    fn init(tokens: i64, experts: usize) -> Init {
        // In-process ranks share torch's global generator: seed and draw under a lock.
        static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(7);
        let randn =
            |shape: &[i64], scale: f64| Tensor::randn(shape, (Kind::Double, Device::Cpu)) * scale;
        let e = experts as i64;
        Init {
            x: randn(&[tokens, WIDTH], 1.0),
            target: randn(&[tokens, WIDTH], 1.0),
            blocks: (0..BLOCKS)
                .map(|_| Block {
                    w_in: randn(&[WIDTH, WIDTH], 0.4),
                    w_gate: randn(&[WIDTH, e], 1.0),
                    experts: vec![
                        randn(&[e, WIDTH, HIDDEN], 0.3),
                        randn(&[e, HIDDEN], 0.1),
                        randn(&[e, HIDDEN, WIDTH], 0.3),
                        randn(&[e, WIDTH], 0.1),
                    ],
                })
                .collect(),
        }
    }

    fn expert(x: &Tensor, p: &[Tensor], j: i64) -> Tensor {
        let hidden = (x.matmul(&p[0].get(j)) + p[1].get(j)).gelu("none");
        hidden.matmul(&p[2].get(j)) + p[3].get(j)
    }

    fn gate(h: &Tensor, w_gate: &Tensor) -> (Tensor, Tensor) {
        let (values, index) = h.matmul(w_gate).topk(TOP_K, -1, true, true);
        (values.softmax(-1, values.kind()), index)
    }

    fn loss_of(out: &Tensor, target: &Tensor) -> Tensor {
        (out - target)
            .square()
            .sum_dim_intlist(1, false, out.kind())
            .mean(out.kind())
            * 0.5
    }

    struct Outcome {
        out: Tensor,
        loss: f64,
        /// Per block: w_in, w_gate, w1, b1, w2, b2 (experts: local rows only).
        grads: Vec<Vec<Tensor>>,
        norm: f64,
    }

    /// A fresh leaf (a copy: `to_kind`/`to_device` alias when nothing changes, and the
    /// reference and the split run must not share parameters).
    fn param(t: &Tensor, kind: Kind, device: Device) -> Tensor {
        t.detach()
            .to_kind(kind)
            .to_device(device)
            .copy()
            .set_requires_grad(true)
    }

    /// Single rank, whole batch, one `backward()`, on CPU in f64.
    fn reference(init: &Init, tokens: i64) -> Outcome {
        let blocks: Vec<(Tensor, Tensor, Vec<Tensor>)> = init
            .blocks
            .iter()
            .map(|b| {
                let p = |t: &Tensor| param(t, Kind::Double, Device::Cpu);
                (p(&b.w_in), p(&b.w_gate), b.experts.iter().map(p).collect())
            })
            .collect();
        let mut h = init.x.shallow_clone();
        for (w_in, w_gate, experts) in &blocks {
            let h0 = h.matmul(w_in);
            let (weights, index) = gate(&h0, w_gate);
            let mut moe = h0.zeros_like();
            for t in 0..tokens {
                for k in 0..TOP_K {
                    let e = index.int64_value(&[t, k]);
                    let y = expert(&h0.get(t), experts, e) * weights.get(t).get(k);
                    moe = moe.index_add(0, &Tensor::from_slice(&[t]), &y.unsqueeze(0));
                }
            }
            h = &h0 + moe;
        }
        let loss = loss_of(&h, &init.target);
        loss.backward();
        let mut params = Vec::new();
        for (w_in, w_gate, experts) in &blocks {
            params.push(w_in.shallow_clone());
            params.push(w_gate.shallow_clone());
            params.extend(experts.iter().map(Tensor::shallow_clone));
        }
        let norm = params
            .iter()
            .map(|p| p.grad().square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let coefficient = MAX_NORM / (norm + 1e-6);
        let scale = coefficient.min(1.0);
        Outcome {
            out: h.detach(),
            loss: loss.double_value(&[]),
            grads: params
                .chunks(6)
                .map(|b| b.iter().map(|p| p.grad() * scale).collect())
                .collect(),
            norm,
        }
    }

    fn split(
        groups: &Groups,
        device: Device,
        kind: Kind,
        init: &Init,
        placement: &ExpertPlacement,
    ) -> fmoec::collective::Result<Outcome> {
        let rank = groups.rank();
        let world = groups.world();
        let position = groups.expert().rank();
        let local: Vec<i64> = placement
            .local_experts(position)
            .iter()
            .map(|&e| e as i64)
            .collect();
        let local_index = Tensor::from_slice(&local);
        let slot_of_expert = Tensor::from_slice(&placement.slot_of_expert()).to_device(device);
        let share = TOKENS_PER_RANK;
        let mine = |t: &Tensor| {
            t.narrow(0, rank as i64 * share, share)
                .to_kind(kind)
                .to_device(device)
        };
        let (x, target) = (mine(&init.x), mine(&init.target));
        let blocks: Vec<(Tensor, Tensor, Vec<Tensor>)> = init
            .blocks
            .iter()
            .map(|b| {
                let experts = b
                    .experts
                    .iter()
                    .map(|t| param(&t.index_select(0, &local_index), kind, device))
                    .collect();
                (
                    param(&b.w_in, kind, device),
                    param(&b.w_gate, kind, device),
                    experts,
                )
            })
            .collect();
        let tensor_err = |e: tch::TchError| fmoec::collective::CollectiveError {
            group: groups.expert().label().to_string(),
            op: "check",
            at: "expert equivalence".into(),
            kind: Box::new(ErrorKind::Tensor(e)),
        };
        let mut tape = Tape::new();
        let mut h = x;
        for (layer, (w_in, w_gate, experts)) in blocks.iter().enumerate() {
            tape.step();
            let h0 = tape.cut(&h.matmul(w_in)).map_err(tensor_err)?;
            let (weights, index) = gate(&h0, w_gate);
            tape.step();
            let weights = tape.cut(&weights).map_err(tensor_err)?;
            let token = Tensor::arange(share, (Kind::Int64, device))
                .repeat_interleave_self_int(TOP_K, 0, None);
            let slot = slot_of_expert.index_select(0, &index.reshape([-1]));
            let order = slot.argsort_stable(true, 0, false);
            let token_sorted = token.index_select(0, &order);
            let counts_t = slot
                .bincount::<Tensor>(None, placement.experts() as i64)
                .to_device(Device::Cpu);
            let counts = Vec::<i64>::try_from(&counts_t).map_err(tensor_err)?;
            let tokens = h0.index_select(0, &token_sorted);
            let (y, exchange) = exchange_experts(
                groups.expert(),
                placement,
                &tokens,
                &counts,
                &format!("check, layer {layer}"),
                |received, local_counts| {
                    let mut start = 0;
                    let mut pieces = Vec::new();
                    for (j, &n) in local_counts.iter().enumerate() {
                        pieces.push(expert(&received.f_narrow(0, start, n)?, experts, j as i64));
                        start += n;
                    }
                    if pieces.is_empty() {
                        return Tensor::f_zeros([0, WIDTH], (received.kind(), received.device()));
                    }
                    Tensor::f_cat(&pieces, 0)
                },
            )?;
            tape.record(exchange);
            let w_sorted = weights.reshape([-1]).index_select(0, &order).unsqueeze(1);
            let moe = h0.zeros_like().index_add(0, &token_sorted, &(y * w_sorted));
            h = &h0 + moe;
        }
        let loss = loss_of(&h, &target);
        tape.backward(&loss, groups.expert(), "check backward")?;
        let mut params: Vec<(ParamKind, &Tensor)> = Vec::new();
        for (w_in, w_gate, experts) in &blocks {
            params.push((ParamKind::Replicated, w_in));
            params.push((ParamKind::Gate, w_gate));
            params.extend(experts.iter().map(|p| (ParamKind::Expert, p)));
        }
        reduce_gradients(groups, &params, "check")?;
        let norm = clip_global_norm(groups, &params, Some(MAX_NORM), "check")?;
        let mut global_loss = loss.detach().reshape([1]);
        groups
            .data()
            .all_reduce_sum(&mut global_loss, "check loss")?;
        let grads = params
            .chunks(6)
            .map(|b| {
                b.iter()
                    .map(|(_, p)| p.grad().to_device(Device::Cpu).to_kind(Kind::Double))
                    .collect()
            })
            .collect();
        Ok(Outcome {
            out: h.detach().to_device(Device::Cpu).to_kind(Kind::Double),
            loss: global_loss.double_value(&[0]) / world as f64,
            grads,
            norm: norm.total,
        })
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        if a.size() != b.size() {
            return f64::INFINITY;
        }
        if a.numel() == 0 {
            return 0.0;
        }
        (a - b).abs().max().double_value(&[])
    }

    pub fn equivalence(groups: &Groups, device: Device, kind: Kind, tolerance: f64) -> Check {
        let world = groups.world();
        let tokens = TOKENS_PER_RANK * world as i64;
        let experts = EXPERTS_PER_RANK * groups.expert().size();
        let init = init(tokens, experts);
        let expected = reference(&init, tokens);
        let placement =
            ExpertPlacement::contiguous(experts, groups.expert().size()).map_err(err)?;
        let got = split(groups, device, kind, &init, &placement).map_err(err)?;
        let rank = groups.rank() as i64;
        let mut worst: Vec<(String, f64)> = vec![
            (
                "output".into(),
                max_diff(
                    &got.out,
                    &expected
                        .out
                        .narrow(0, rank * TOKENS_PER_RANK, TOKENS_PER_RANK),
                ),
            ),
            ("loss".into(), (got.loss - expected.loss).abs()),
            ("norm".into(), (got.norm - expected.norm).abs()),
        ];
        let local: Vec<i64> = placement
            .local_experts(groups.expert().rank())
            .iter()
            .map(|&e| e as i64)
            .collect();
        let local_index = Tensor::from_slice(&local);
        let names = ["w_in", "w_gate", "w1", "b1", "w2", "b2"];
        for (block, (g, w)) in got.grads.iter().zip(&expected.grads).enumerate() {
            for (i, name) in names.iter().enumerate() {
                let want = if i < 2 {
                    w[i].shallow_clone()
                } else {
                    w[i].index_select(0, &local_index)
                };
                worst.push((
                    format!("block {block} {name} gradient"),
                    max_diff(&g[i], &want),
                ));
            }
        }
        let bad: Vec<String> = worst
            .iter()
            .filter(|(_, d)| d.is_nan() || *d > tolerance)
            .map(|(what, d)| format!("{what} differs by {d:e}"))
            .collect();
        if !bad.is_empty() {
            return Err(bad.join("; "));
        }
        let max = worst.iter().map(|(_, d)| *d).fold(0.0, f64::max);
        Ok(format!(
            "{} ranks, {}, norm {:.6}, max difference {max:.1e}",
            world,
            groups.expert().label(),
            got.norm
        ))
    }
}
