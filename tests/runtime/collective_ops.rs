//! The collectives of the in-process and the TCP backend (one implementation over two
//! transports): results, the same bits over both, and failures that name the group and
//! the call site instead of hanging (timeouts, ranks that die, ranks out of step).

use fmoec::collective::local::{local_world, run_ranks, LocalCollective};
use fmoec::collective::rendezvous::DistEnv;
use fmoec::collective::{
    Collective, ErrorKind, GroupKind, GroupLabel, GroupLayout, Groups, LayoutError, PeerTransfer,
};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

fn world(n: usize, timeout: Duration) -> Vec<fmoec::collective::Groups> {
    local_world(&GroupLayout::data_parallel(n, n).unwrap(), timeout).unwrap()
}

/// How the ranks of a test reach each other.
#[derive(Clone, Copy, Debug)]
enum Backend {
    /// `local`: handles of one process.
    InProcess,
    /// `tcp`: every rank connects on its own, as separate processes do.
    Tcp,
}

const BACKENDS: [Backend; 2] = [Backend::InProcess, Backend::Tcp];

/// Runs `body` once per rank of `layout`, each on its own thread with its groups over
/// `backend`; the results (or panics) in rank order.
fn on_ranks<R: Send>(
    backend: Backend,
    layout: &GroupLayout,
    timeout: Duration,
    body: impl Fn(Groups) -> R + Sync,
) -> Vec<std::thread::Result<R>> {
    match backend {
        Backend::InProcess => run_ranks(local_world(layout, timeout).unwrap(), body),
        Backend::Tcp => {
            // A free port is found by binding it and letting it go, so another process may
            // take it before rank 0 binds it again (rarely: it is below the ports that
            // port-0 binds get): then every rank gives up and the ranks run again on another.
            for _ in 0..4 {
                if let Some(results) = on_tcp_ranks(layout, timeout, &body) {
                    return results;
                }
            }
            panic!("rank 0 found its port taken four times")
        }
    }
}

/// [`on_ranks`] over TCP on one free port; `None` where rank 0 found the port taken.
fn on_tcp_ranks<R: Send>(
    layout: &GroupLayout,
    timeout: Duration,
    body: &(impl Fn(Groups) -> R + Sync),
) -> Option<Vec<std::thread::Result<R>>> {
    let port = fmoec::collective::launch::free_port("127.0.0.1").unwrap();
    let results: Vec<std::thread::Result<Option<R>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..layout.world)
            .map(|rank| {
                let env = DistEnv {
                    rank,
                    world: layout.world,
                    local_rank: rank,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                };
                scope.spawn(move || {
                    let connect = fmoec::collective::tcp::connect;
                    // the handles' timeout bounds the connecting too
                    match connect(layout, None, &env, timeout) {
                        Err(e) if format!("{e:#}").contains("the port is in use") => None,
                        groups => Some(body(groups.expect("rank connects over TCP"))),
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join()).collect()
    });
    if results.iter().any(|r| matches!(r, Ok(None))) {
        return None;
    }
    Some(
        results
            .into_iter()
            .map(|r| r.map(|r| r.expect("connected")))
            .collect(),
    )
}

#[test]
fn operations_give_the_expected_values_on_four_ranks() {
    for backend in BACKENDS {
        operations_give_the_expected_values(backend);
    }
}

fn operations_give_the_expected_values(backend: Backend) {
    let layout = GroupLayout::data_parallel(4, 4).unwrap();
    let results = on_ranks(backend, &layout, Duration::from_secs(20), |groups| {
        let g = groups.data();
        let r = g.rank() as f64;
        let mut t = Tensor::from_slice(&[r, 10.0 * r, 0.5]).reshape([3, 1]);
        g.all_reduce_sum(&mut t, "test all_reduce").unwrap();
        let counts = g
            .all_gather_counts(&[g.rank() as i64, 7], "test all_gather")
            .unwrap();
        // Rank r sends (r + d) % 3 rows to rank d; row values encode (source, destination).
        let send_counts: Vec<i64> = (0..4).map(|d| ((g.rank() + d) % 3) as i64).collect();
        let recv_counts: Vec<i64> = (0..4).map(|s| ((s + g.rank()) % 3) as i64).collect();
        let rows: Vec<f64> = (0..4usize)
            .flat_map(|d| std::iter::repeat_n((10 * g.rank() + d) as f64, (g.rank() + d) % 3))
            .flat_map(|v| [v, -v])
            .collect();
        let send = Tensor::from_slice(&rows).reshape([-1, 2]);
        let received = g
            .all_to_all_v(&send, &send_counts, &recv_counts, "test all_to_all")
            .unwrap();
        let mut b = Tensor::from_slice(&[r, r]);
        g.broadcast(&mut b, 2, "test broadcast").unwrap();
        g.barrier("test barrier").unwrap();
        (
            values(&t),
            counts,
            values(&received),
            received.size(),
            values(&b),
        )
    });
    for (rank, result) in results.into_iter().enumerate() {
        let (sum, counts, received, shape, broadcast) = result.unwrap();
        assert_eq!(sum, vec![6.0, 60.0, 2.0], "{backend:?}");
        assert_eq!(counts, (0..4).map(|s| vec![s, 7]).collect::<Vec<_>>());
        let expected: Vec<f64> = (0..4usize)
            .flat_map(|s| std::iter::repeat_n((10 * s + rank) as f64, (s + rank) % 3))
            .flat_map(|v| [v, -v])
            .collect();
        assert_eq!(received, expected, "{backend:?} rank {rank}");
        assert_eq!(shape[1], 2);
        assert_eq!(broadcast, vec![2.0, 2.0], "{backend:?}");
    }
}

/// The bits of a tensor's values, with its dtype and shape.
fn bits(t: &Tensor) -> (Kind, Vec<i64>, Vec<u8>) {
    let t = t.contiguous();
    let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, t.numel());
    (t.kind(), t.size(), bytes)
}

/// A tensor of `shape` and `kind` with values in [-1000, 1000) drawn from `seed` (not from
/// libtorch's generator, which the rank threads share).
fn noise(seed: &mut u64, shape: &[i64], kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| {
            // xorshift64
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 11) as f64 / (1u64 << 53) as f64 * 2000.0 - 1000.0
        })
        .collect();
    Tensor::from_slice(&values).reshape(shape).to_kind(kind)
}

/// Every operation of a script on pseudo-random data, in f32, f64 and bf16: each rank's
/// results, as bits.
fn script_of_every_operation(groups: Groups) -> Vec<(Kind, Vec<i64>, Vec<u8>)> {
    let g = groups.data();
    let (rank, size) = (g.rank(), g.size());
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (rank as u64 + 1);
    let mut out = Vec::new();
    for (round, kind) in [Kind::Float, Kind::Double, Kind::BFloat16]
        .into_iter()
        .enumerate()
    {
        let options = (kind, tch::Device::Cpu);
        // sums whose order shows in the last bits
        let mut t = noise(&mut seed, &[257], kind);
        g.all_reduce_sum(&mut t, "bits: all_reduce").unwrap();
        out.push(bits(&t));
        // the same on one of the other groups (its own numbering)
        let mut e = noise(&mut seed, &[3, 5], kind);
        groups
            .expert()
            .all_reduce_sum(&mut e, "bits: expert")
            .unwrap();
        out.push(bits(&e));
        let counts: Vec<i64> = (0..size)
            .map(|d| ((rank + 2 * d + round) % 4) as i64)
            .collect();
        let gathered = g.all_gather_counts(&counts, "bits: counts").unwrap();
        let recv: Vec<i64> = gathered.iter().map(|c| c[rank]).collect();
        let rows = noise(&mut seed, &[counts.iter().sum::<i64>(), 3], kind);
        let got = g
            .all_to_all_v(&rows, &counts, &recv, "bits: all_to_all")
            .unwrap();
        out.push(bits(&got));
        let mut b = noise(&mut seed, &[4], kind);
        g.broadcast(&mut b, size - 1, "bits: broadcast").unwrap();
        out.push(bits(&b));
        g.barrier("bits: barrier").unwrap();
        let (next, prev) = ((rank + 1) % size, (rank + size - 1) % size);
        let mine = noise(&mut seed, &[2, 2], kind);
        let mut from_prev = Tensor::zeros([2, 2], options);
        g.send_recv(
            &mut [
                PeerTransfer::Send {
                    tensor: &mine,
                    to: next,
                },
                PeerTransfer::Recv {
                    into: &mut from_prev,
                    from: prev,
                },
            ],
            "bits: ring",
        )
        .unwrap();
        out.push(bits(&from_prev));
    }
    out
}

/// The one implementation of the collectives gives the same bits whichever transport
/// carries its messages (four ranks, two expert groups of two).
#[test]
fn every_operation_gives_the_same_bits_in_process_and_over_tcp() {
    let layout = GroupLayout::data_parallel(4, 2).unwrap();
    let timeout = Duration::from_secs(30);
    let over = |backend| -> Vec<_> {
        on_ranks(backend, &layout, timeout, script_of_every_operation)
            .into_iter()
            .map(|r| r.expect("no rank panics"))
            .collect()
    };
    let (local, tcp) = (over(Backend::InProcess), over(Backend::Tcp));
    assert_eq!(local.len(), 4);
    for (rank, (a, b)) in local.iter().zip(&tcp).enumerate() {
        assert_eq!(a.len(), 15);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                x == y,
                "rank {rank}, result {i}: {:?} {:?} differ",
                x.0,
                x.1
            );
        }
    }
    // and the all-reduce is the same on every rank
    for r in &local[1..] {
        assert_eq!(r[0], local[0][0]);
    }
}

#[test]
fn all_reduce_gives_every_rank_the_same_bits() {
    let results = run_ranks(world(4, Duration::from_secs(20)), |groups| {
        let g = groups.data();
        // libtorch's generator is process-wide: the other ranks and tests draw from it too.
        let mut t = {
            let _rng = fmoec::runtime::model::lock_rng();
            tch::manual_seed(g.rank() as i64);
            Tensor::randn([257], (Kind::Float, tch::Device::Cpu)) * 1e3
        };
        g.all_reduce_sum(&mut t, "bits").unwrap();
        Vec::<f32>::try_from(t).unwrap()
    });
    let results: Vec<Vec<f32>> = results.into_iter().map(Result::unwrap).collect();
    for r in &results[1..] {
        assert!(r
            .iter()
            .zip(&results[0])
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

/// A layout where expert groups are strided ([0,2], [1,3]) and expert-data groups
/// consecutive, to see global ranks in messages.
fn strided_layout() -> GroupLayout {
    GroupLayout {
        world: 4,
        data: vec![vec![0, 1, 2, 3]],
        expert: vec![vec![0, 2], vec![1, 3]],
        expert_data: vec![vec![0, 1], vec![2, 3]],
        gate: vec![vec![0, 1, 2, 3]],
        pipeline: (0..4).map(|r| vec![r]).collect(),
        embedding: (0..4).map(|r| vec![r]).collect(),
    }
}

#[test]
fn a_timeout_names_the_group_and_the_step() {
    for backend in BACKENDS {
        a_timeout_names_the_group_and_the_step_over(backend);
    }
}

fn a_timeout_names_the_group_and_the_step_over(backend: Backend) {
    let timeout = Duration::from_millis(300);
    let results = on_ranks(backend, &strided_layout(), timeout, |groups| {
        if groups.rank() == 2 {
            // Stays alive but never joins: rank 0 must time out, not wait.
            std::thread::sleep(Duration::from_millis(1200));
            return None;
        }
        if groups.rank() != 0 {
            return None;
        }
        let start = Instant::now();
        let mut t = Tensor::from_slice(&[1.0f32]);
        let err = groups
            .expert()
            .all_reduce_sum(&mut t, "step 7, layer 3 gradients")
            .unwrap_err();
        Some((
            err.to_string(),
            matches!(*err.kind, ErrorKind::Timeout { .. }),
            start.elapsed(),
        ))
    });
    let (message, is_timeout, elapsed) = results.into_iter().next().unwrap().unwrap().unwrap();
    assert!(is_timeout, "{backend:?}: {message}");
    assert!(message.contains("expert group [0,2]"), "{message}");
    assert!(message.contains("step 7, layer 3"), "{message}");
    assert!(message.contains("all_reduce_sum"), "{message}");
    assert!(message.contains("waiting for rank 2"), "{message}");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
}

#[test]
fn a_rank_that_panics_makes_the_others_fail_instead_of_hanging() {
    // The timeout is long: the others must notice the departure, not the deadline.
    let start = Instant::now();
    let results = run_ranks(world(4, Duration::from_secs(60)), |groups| {
        if groups.rank() == 3 {
            panic!("rank 3 fails before the all-to-all");
        }
        let g = groups.expert();
        let send = Tensor::zeros([4, 2], (Kind::Float, tch::Device::Cpu));
        g.all_to_all_v(
            &send,
            &[1, 1, 1, 1],
            &[1, 1, 1, 1],
            "step 12, layer 1 dispatch",
        )
        .map(|_| ())
    });
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(results[3].is_err(), "rank 3 panicked");
    for result in &results[..3] {
        let err = result.as_ref().unwrap().as_ref().unwrap_err();
        assert!(
            matches!(
                *err.kind,
                ErrorKind::PeerGone {
                    peer: 3,
                    panicked: true
                }
            ),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("expert group [0,1,2,3]")
                && message.contains("step 12, layer 1 dispatch"),
            "{message}"
        );
        assert!(message.contains("rank 3 panicked"), "{message}");
    }
}

#[test]
fn a_rank_that_drops_its_handle_makes_the_others_fail() {
    for backend in BACKENDS {
        a_rank_that_drops_its_handle_makes_the_others_fail_over(backend);
    }
}

fn a_rank_that_drops_its_handle_makes_the_others_fail_over(backend: Backend) {
    let layout = GroupLayout::data_parallel(2, 2).unwrap();
    let results = on_ranks(backend, &layout, Duration::from_secs(60), |groups| {
        if groups.rank() == 1 {
            drop(groups);
            return None;
        }
        Some(groups.data().barrier("step 1 barrier").unwrap_err())
    });
    let err = results.into_iter().next().unwrap().unwrap().unwrap();
    assert!(
        matches!(
            *err.kind,
            ErrorKind::PeerGone {
                peer: 1,
                panicked: false
            }
        ),
        "{backend:?}: {err}"
    );
    assert!(err.to_string().contains("data group [0,1]"), "{err}");
}

#[test]
fn ranks_out_of_step_get_a_mismatch_error() {
    for backend in BACKENDS {
        ranks_out_of_step_get_a_mismatch_error_over(backend);
    }
}

fn ranks_out_of_step_get_a_mismatch_error_over(backend: Backend) {
    let layout = GroupLayout::data_parallel(2, 2).unwrap();
    let results = on_ranks(backend, &layout, Duration::from_secs(20), |groups| {
        let g = groups.data();
        if g.rank() == 0 {
            g.barrier("step 2").map(|_| ())
        } else {
            g.all_gather_counts(&[1], "step 2").map(|_| ())
        }
    });
    let messages: Vec<String> = results
        .into_iter()
        .map(|r| r.unwrap().unwrap_err().to_string())
        .collect();
    assert!(
        messages[0].contains("rank 1 is at all_gather_counts (its collective #0)"),
        "{backend:?}: {}",
        messages[0]
    );
    assert!(
        messages[1].contains("rank 0 is at barrier"),
        "{backend:?}: {}",
        messages[1]
    );
}

#[test]
fn bad_counts_are_errors_not_panics() {
    let handles = LocalCollective::group(
        GroupLabel {
            kind: GroupKind::Expert,
            members: vec![5],
        },
        Duration::from_secs(1),
    );
    let g = &handles[0];
    let send = Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu));
    let err = g.all_to_all_v(&send, &[2], &[3], "step 0").unwrap_err();
    assert!(err.to_string().contains("do not split the 3 rows"), "{err}");
    let err = g.all_to_all_v(&send, &[3, 0], &[3], "step 0").unwrap_err();
    assert!(err.to_string().contains("for a group of 1 ranks"), "{err}");
    let mut t = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
    assert!(g.broadcast(&mut t, 4, "step 0").is_err());
}

#[test]
fn layouts_are_validated() {
    assert_eq!(
        GroupLayout::data_parallel(6, 4).unwrap_err(),
        LayoutError::Indivisible { size: 4, world: 6 }
    );
    let mut layout = strided_layout();
    layout.expert = vec![vec![0, 2], vec![1]];
    assert_eq!(
        layout.validate().unwrap_err(),
        LayoutError::Missing {
            kind: "expert",
            rank: 3
        }
    );
    let mut layout = strided_layout();
    layout.gate = vec![vec![0, 1, 2, 3, 4]];
    assert!(matches!(
        layout.validate().unwrap_err(),
        LayoutError::OutOfRange { rank: 4, .. }
    ));
    let mut layout = strided_layout();
    layout.expert_data = vec![vec![0, 1, 2, 3]];
    assert!(matches!(
        layout.validate().unwrap_err(),
        LayoutError::Product { .. }
    ));
    let mut layout = strided_layout();
    layout.pipeline = vec![vec![0, 2], vec![1, 3]];
    layout.embedding = vec![vec![0, 1], vec![2], vec![3]];
    assert!(matches!(
        layout.validate().unwrap_err(),
        LayoutError::EmbeddingOutsidePipeline { rank: 0, .. }
    ));
    let layout = GroupLayout::data_parallel(8, 4).unwrap();
    assert_eq!(layout.members(GroupKind::ExpertData, 5), Some(&[1, 5][..]));
    assert_eq!(
        layout.members(GroupKind::Expert, 5),
        Some(&[4, 5, 6, 7][..])
    );
    // Megatron-LM's grid with 2 tensor x 2 pipeline x 2 data (the planner's lists).
    let layout = GroupLayout::megatron(8, 2, 2, 2).unwrap();
    assert_eq!(
        layout.data,
        vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
    );
    assert_eq!(layout.gate, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    assert_eq!(
        layout.pipeline,
        vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
    );
    assert_eq!(layout.embedding, layout.pipeline);
    assert_eq!((layout.stages(), layout.stage_of(6)), (2, 1));
    let layout = GroupLayout::megatron(4, 1, 4, 1).unwrap();
    assert_eq!(
        layout.embedding,
        vec![vec![0, 3], vec![1], vec![2]],
        "the middle stages hold no embedding"
    );
}

/// Four pipeline stages pass a tensor down and its gradient back up, in batches that
/// send and receive at once (the first and last stage also talk to each other, as the
/// interleaved schedule's wrap-around does); every transfer arrives in order, from the rank
/// it was sent by.
#[test]
fn point_to_point_transfers_arrive_in_order() {
    for backend in BACKENDS {
        point_to_point_transfers_arrive_in_order_over(backend);
    }
}

fn point_to_point_transfers_arrive_in_order_over(backend: Backend) {
    let layout = GroupLayout::megatron(4, 1, 4, 1).unwrap();
    let results = on_ranks(backend, &layout, Duration::from_secs(20), |groups| {
        let g = groups.pipeline();
        let s = g.rank();
        let (next, prev) = ((s + 1) % 4, (s + 3) % 4);
        let mut got = Vec::new();
        for round in 0..3 {
            let mine = Tensor::from_slice(&[(10 * s + round) as f32, -1.0]);
            let grad = Tensor::from_slice(&[(100 * s + round) as i64]);
            let mut from_prev = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
            let mut from_next = Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu));
            g.send_recv(
                &mut [
                    PeerTransfer::Send {
                        tensor: &mine,
                        to: next,
                    },
                    PeerTransfer::Send {
                        tensor: &grad,
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
                ],
                &format!("round {round}"),
            )
            .unwrap();
            got.push((values(&from_prev)[0], values(&from_next)[0]));
        }
        // one-way transfers with the convenience forms
        if s == 0 {
            g.send(&Tensor::from_slice(&[7.0f64]), 3, "last").unwrap();
        } else if s == 3 {
            let mut t = Tensor::zeros([1], (Kind::Double, tch::Device::Cpu));
            g.recv(&mut t, 0, "last").unwrap();
            got.push((values(&t)[0], 0.0));
        }
        got
    });
    for (s, result) in results.into_iter().enumerate() {
        let got = result.unwrap();
        let (next, prev) = ((s + 1) % 4, (s + 3) % 4);
        for (round, &(a, g)) in got.iter().take(3).enumerate() {
            assert_eq!(
                a,
                (10 * prev + round) as f64,
                "{backend:?} stage {s} round {round}"
            );
            assert_eq!(g, (100 * next + round) as f64, "stage {s} round {round}");
        }
        assert_eq!(got.len(), if s == 3 { 4 } else { 3 });
    }
}

/// A receive whose tensor is not what the peer sent, a peer that never sends, and a peer
/// that left are errors naming the group, the call site and the peer.
#[test]
fn point_to_point_failures_name_the_peer() {
    for backend in BACKENDS {
        point_to_point_failures_name_the_peer_over(backend);
    }
}

fn point_to_point_failures_name_the_peer_over(backend: Backend) {
    let layout = GroupLayout::megatron(3, 1, 3, 1).unwrap();
    let results = on_ranks(backend, &layout, Duration::from_millis(400), |groups| {
        let g = groups.pipeline();
        match g.rank() {
            0 => {
                g.send(&Tensor::from_slice(&[1.0f32, 2.0]), 1, "step 1")
                    .unwrap();
                None
            }
            1 => {
                let mut wrong = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
                let shape = g.recv(&mut wrong, 0, "step 1").unwrap_err().to_string();
                let mut t = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
                let late = g.recv(&mut t, 2, "step 2").unwrap_err().to_string();
                let gone = g.recv(&mut t, 0, "step 3").unwrap_err().to_string();
                Some((shape, late, gone))
            }
            _ => {
                std::thread::sleep(Duration::from_millis(900));
                None
            }
        }
    });
    let (shape, late, gone) = results.into_iter().nth(1).unwrap().unwrap().unwrap();
    assert!(
        shape.contains("pipeline group [0,1,2]: send_recv at \"step 1\"")
            && shape.contains("rank 0 sent a tensor of shape [2]")
            && shape.contains("where this rank receives [3]"),
        "{backend:?}: {shape}"
    );
    assert!(
        late.contains("timed out after 400ms waiting for rank 2"),
        "{late}"
    );
    assert!(
        gone.contains("rank 0 left the group"),
        "{backend:?}: {gone}"
    );
}

#[test]
fn a_stalled_exchange_names_the_expert_group_and_the_layer() {
    use fmoec::collective::{exchange_experts, ExpertPlacement};
    let layout = GroupLayout::data_parallel(2, 2).unwrap();
    let ranks = local_world(&layout, Duration::from_millis(300)).unwrap();
    let results = run_ranks(ranks, |groups| {
        if groups.rank() == 1 {
            std::thread::sleep(Duration::from_millis(1000));
            return None;
        }
        let placement = ExpertPlacement::contiguous(2, 2).unwrap();
        let tokens = Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu));
        let result = exchange_experts(
            groups.expert(),
            &placement,
            &tokens,
            &[2, 1],
            "step 7, layer 3",
            |x, _| Ok(x.shallow_clone()),
        );
        Some(result.err().map(|e| e.to_string()))
    });
    let message = results
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(message.starts_with("expert group [0,1]: all_gather_counts at \"step 7, layer 3, dispatch counts\": timed out"), "{message}");
}

/// A parameter whose gradient is `grad` (f64, on the CPU).
fn with_grad(grad: &[f64]) -> Tensor {
    let p = Tensor::zeros([grad.len() as i64], (Kind::Double, tch::Device::Cpu))
        .set_requires_grad(true);
    (&p * Tensor::from_slice(grad)).sum(Kind::Double).backward();
    p
}

/// Two pipeline stages of one rank each: the tied embedding's gradients (its copy on each
/// stage) are summed over the embedding group, and the global norm counts every parameter
/// once (the last stage's copy left out) and clips both copies alike.
#[test]
fn the_norm_over_pipeline_stages_counts_the_tied_copy_once() {
    use fmoec::collective::{
        clip_global_norm_pipeline, sum_tied_gradients, ParamKind, TensorSplit,
    };
    let layout = GroupLayout::megatron(2, 1, 2, 1).unwrap();
    let ranks = local_world(&layout, Duration::from_secs(20)).unwrap();
    let results = run_ranks(ranks, |groups| {
        let stage = groups.pipeline().rank();
        // stage 0: a block's weight and the embedding; stage 1: its block and the tied head
        let (own, tied) = if stage == 0 {
            (with_grad(&[3.0]), with_grad(&[1.0, 2.0]))
        } else {
            (with_grad(&[4.0]), with_grad(&[2.0, 1.0]))
        };
        sum_tied_gradients(groups.embedding(), &[&tied], "test tied").unwrap();
        let params = [
            (ParamKind::Replicated, TensorSplit::Whole, &own),
            (ParamKind::Replicated, TensorSplit::Whole, &tied),
        ];
        let counted = [true, stage == 0];
        let norm = clip_global_norm_pipeline(
            &groups,
            groups.tensor(),
            &params,
            &counted,
            Some(1.0),
            "test norm",
        )
        .unwrap();
        (norm.total, values(&tied.grad()), values(&own.grad()))
    });
    let want = (9.0f64 + 9.0 + 9.0 + 16.0).sqrt();
    let scale = 1.0 / (want + 1e-6);
    for (stage, r) in results.into_iter().enumerate() {
        let (total, tied, own) = r.unwrap();
        assert!((total - want).abs() < 1e-12, "stage {stage}: norm {total}");
        for g in tied {
            assert!((g - 3.0 * scale).abs() < 1e-12, "stage {stage}: tied {g}");
        }
        let first = if stage == 0 { 3.0 } else { 4.0 };
        assert!(
            (own[0] - first * scale).abs() < 1e-12,
            "stage {stage}: {own:?}"
        );
    }
}
