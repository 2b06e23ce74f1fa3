//! Expert parallelism over in-process ranks equals the single-rank run.
//!
//! The reference is a small top-k softmax-gated MoE written here, independent of
//! `fmoec::collective`: each MoE block is `h = x @ w_in` (a replicated stand-in for
//! attention), `out = h + Σ_k softmax(top-k logits)_k · expert_k(h)` with
//! `logits = h @ w_gate` and experts `linear → gelu → linear`. Two blocks, loss
//! `mean over tokens of ½‖out − target‖²`. The split run gives every rank a quarter
//! (or half) of the tokens, exchanges tokens over the expert group with autograd cut,
//! runs backward in segments, reduces gradients by kind and clips by the global norm.
//!
//! Runs in f64 with tolerance 1e-10 absolute on outputs, loss, gradients and the norm
//! (values are O(1); the only differences are summation orders), and in f32 (what the
//! runtime uses on CPU) with tolerance 1e-5.
#![cfg(feature = "runtime")]

use fmoec::collective::local::{local_world, run_ranks};
use fmoec::collective::{
    clip_global_norm, exchange_experts, reduce_gradients, ExpertPlacement, GroupLayout, ParamKind,
    Tape,
};
use std::time::Duration;
use tch::{Kind, Tensor};

const WIDTH: i64 = 8;
const HIDDEN: i64 = 12;
const EXPERTS: usize = 4;
const TOP_K: i64 = 2;
const TOKENS: i64 = 16;
const BLOCKS: usize = 2;
const MAX_NORM: f64 = 0.05;
const F64: Precision = Precision {
    kind: Kind::Double,
    tolerance: 1e-10,
};
const F32: Precision = Precision {
    kind: Kind::Float,
    tolerance: 1e-5,
};

#[derive(Clone, Copy)]
struct Precision {
    kind: Kind,
    tolerance: f64,
}

/// Plain data (shape + values), so it can be shared between rank threads.
#[derive(Clone)]
struct Data {
    shape: Vec<i64>,
    values: Vec<f64>,
}

impl Data {
    fn of(t: &Tensor) -> Data {
        let t = t.detach().to_kind(Kind::Double).contiguous();
        Data {
            shape: t.size(),
            values: Vec::<f64>::try_from(t.reshape([-1])).unwrap(),
        }
    }

    fn tensor(&self, kind: Kind) -> Tensor {
        Tensor::from_slice(&self.values)
            .reshape(&self.shape)
            .to_kind(kind)
    }

    fn param(&self, kind: Kind) -> Tensor {
        self.tensor(kind).set_requires_grad(true)
    }
}

#[derive(Clone)]
struct BlockInit {
    w_in: Data,
    w_gate: Data,
    /// Stacked over all experts: w1 [E,d,h], b1 [E,h], w2 [E,h,d], b2 [E,d].
    experts: [Data; 4],
}

struct Init {
    x: Data,
    target: Data,
    blocks: Vec<BlockInit>,
}

fn init(seed: i64) -> Init {
    tch::manual_seed(seed);
    let randn = |shape: &[i64], scale: f64| {
        Data::of(&(Tensor::randn(shape, (Kind::Double, tch::Device::Cpu)) * scale))
    };
    let e = EXPERTS as i64;
    Init {
        x: randn(&[TOKENS, WIDTH], 1.0),
        target: randn(&[TOKENS, WIDTH], 1.0),
        blocks: (0..BLOCKS)
            .map(|_| BlockInit {
                w_in: randn(&[WIDTH, WIDTH], 0.4),
                w_gate: randn(&[WIDTH, e], 1.0),
                experts: [
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
    out: Data,
    loss: f64,
    /// Per block: w_in, w_gate, then the four expert tensors (local experts only).
    grads: Vec<Vec<Data>>,
    norm: f64,
    scale: f64,
}

/// The single-rank run: no exchange, no cuts, one `backward()`.
fn reference(init: &Init, kind: Kind) -> Outcome {
    let x = init.x.tensor(kind);
    let blocks: Vec<(Tensor, Tensor, Vec<Tensor>)> = init
        .blocks
        .iter()
        .map(|b| {
            (
                b.w_in.param(kind),
                b.w_gate.param(kind),
                b.experts.iter().map(|d| d.param(kind)).collect(),
            )
        })
        .collect();
    let mut h = x;
    for (w_in, w_gate, experts) in &blocks {
        let h0 = h.matmul(w_in);
        let (weights, index) = gate(&h0, w_gate);
        let mut moe = h0.zeros_like();
        for t in 0..TOKENS {
            for k in 0..TOP_K {
                let e = index.int64_value(&[t, k]);
                let y = expert(&h0.get(t), experts, e) * weights.get(t).get(k);
                moe = moe.index_add(0, &Tensor::from_slice(&[t]), &y.unsqueeze(0));
            }
        }
        h = &h0 + moe;
    }
    let loss = loss_of(&h, &init.target.tensor(kind));
    loss.backward();
    let mut params: Vec<Tensor> = Vec::new();
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
    let scale = if coefficient < 1.0 { coefficient } else { 1.0 };
    let grads = params
        .chunks(6)
        .map(|block| {
            block
                .iter()
                .map(|p| Data::of(&(p.grad() * scale)))
                .collect()
        })
        .collect();
    Outcome {
        out: Data::of(&h),
        loss: loss.double_value(&[]),
        grads,
        norm,
        scale,
    }
}

/// The split run on `world` in-process ranks with expert groups of `expert_group` ranks.
fn distributed(
    init: &Init,
    world: usize,
    expert_group: usize,
    placement: &ExpertPlacement,
    kind: Kind,
) -> Vec<Outcome> {
    let layout = GroupLayout::data_parallel(world, expert_group).unwrap();
    let ranks = local_world(&layout, Duration::from_secs(30)).unwrap();
    let share = TOKENS / world as i64;
    let results = run_ranks(ranks, |groups| {
        let rank = groups.rank();
        let position = groups.expert().rank();
        let local: Vec<i64> = placement
            .local_experts(position)
            .iter()
            .map(|&e| e as i64)
            .collect();
        let local_index = Tensor::from_slice(&local);
        let slot_of_expert = Tensor::from_slice(&placement.slot_of_expert());
        let x = init.x.tensor(kind).narrow(0, rank as i64 * share, share);
        let target = init
            .target
            .tensor(kind)
            .narrow(0, rank as i64 * share, share);
        let blocks: Vec<(Tensor, Tensor, Vec<Tensor>)> = init
            .blocks
            .iter()
            .map(|b| {
                let experts = b
                    .experts
                    .iter()
                    .map(|d| {
                        d.tensor(kind)
                            .index_select(0, &local_index)
                            .set_requires_grad(true)
                    })
                    .collect();
                (b.w_in.param(kind), b.w_gate.param(kind), experts)
            })
            .collect();

        let mut tape = Tape::new();
        let mut h = x;
        for (layer, (w_in, w_gate, experts)) in blocks.iter().enumerate() {
            tape.step();
            let h0 = tape.cut(&h.matmul(w_in)).unwrap();
            let (weights, index) = gate(&h0, w_gate);
            tape.step();
            let weights = tape.cut(&weights).unwrap();
            let token = Tensor::arange(share, (Kind::Int64, tch::Device::Cpu))
                .repeat_interleave_self_int(TOP_K, 0, None);
            let slot = slot_of_expert.index_select(0, &index.reshape([-1]));
            let order = slot.argsort_stable(true, 0, false);
            let token_sorted = token.index_select(0, &order);
            let counts_t = slot.bincount::<Tensor>(None, EXPERTS as i64);
            let counts = Vec::<i64>::try_from(&counts_t).unwrap();
            let tokens = h0.index_select(0, &token_sorted);
            let (y, exchange) = exchange_experts(
                groups.expert(),
                placement,
                &tokens,
                &counts,
                &format!("step 0, layer {layer}"),
                |received, local_counts| {
                    let mut start = 0;
                    let mut pieces = Vec::new();
                    for (j, &n) in local_counts.iter().enumerate() {
                        pieces.push(expert(&received.f_narrow(0, start, n)?, experts, j as i64));
                        start += n;
                    }
                    if pieces.is_empty() {
                        return Tensor::f_zeros([0, WIDTH], (received.kind(), tch::Device::Cpu));
                    }
                    Tensor::f_cat(&pieces, 0)
                },
            )
            .unwrap();
            tape.record(exchange);
            let w_sorted = weights.reshape([-1]).index_select(0, &order).unsqueeze(1);
            let moe = h0.zeros_like().index_add(0, &token_sorted, &(y * w_sorted));
            h = &h0 + moe;
        }
        let loss = loss_of(&h, &target);
        tape.backward(&loss, groups.expert(), "step 0 backward")
            .unwrap();

        let mut params: Vec<(ParamKind, &Tensor)> = Vec::new();
        for (w_in, w_gate, experts) in &blocks {
            params.push((ParamKind::Replicated, w_in));
            params.push((ParamKind::Gate, w_gate));
            params.extend(experts.iter().map(|p| (ParamKind::Expert, p)));
        }
        reduce_gradients(&groups, &params, "step 0").unwrap();
        let norm = clip_global_norm(&groups, &params, Some(MAX_NORM), "step 0").unwrap();
        let mut global_loss = loss.detach().reshape([1]);
        groups
            .data()
            .all_reduce_sum(&mut global_loss, "step 0 loss")
            .unwrap();
        let grads = params
            .chunks(6)
            .map(|block| block.iter().map(|(_, p)| Data::of(&p.grad())).collect())
            .collect();
        Outcome {
            out: Data::of(&h),
            loss: global_loss.double_value(&[0]) / world as f64,
            grads,
            norm: norm.total,
            scale: norm.scale,
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("rank panicked"))
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn rows(d: &Data, rows: &[usize]) -> Vec<f64> {
    let per: usize = d.shape[1..].iter().map(|&s| s as usize).product();
    rows.iter()
        .flat_map(|&r| d.values[r * per..(r + 1) * per].iter().copied())
        .collect()
}

fn assert_equivalent(
    world: usize,
    expert_group: usize,
    placement: &ExpertPlacement,
    precision: Precision,
) -> Vec<Outcome> {
    let init = init(7);
    let expected = reference(&init, precision.kind);
    assert!(
        expected.scale < 1.0,
        "the test must exercise clipping (norm {})",
        expected.norm
    );
    let got = distributed(&init, world, expert_group, placement, precision.kind);
    let share = TOKENS as usize / world;
    for (rank, outcome) in got.iter().enumerate() {
        let my_rows: Vec<usize> = (rank * share..(rank + 1) * share).collect();
        let what = format!("world {world}, expert group {expert_group}, rank {rank}");
        assert!(
            max_diff(&outcome.out.values, &rows(&expected.out, &my_rows)) < precision.tolerance,
            "{what}: output"
        );
        assert!(
            (outcome.loss - expected.loss).abs() < precision.tolerance,
            "{what}: loss {} vs {}",
            outcome.loss,
            expected.loss
        );
        assert!(
            (outcome.norm - expected.norm).abs() < precision.tolerance,
            "{what}: norm {} vs {}",
            outcome.norm,
            expected.norm
        );
        assert!(
            (outcome.scale - expected.scale).abs() < precision.tolerance,
            "{what}: clip scale"
        );
        let local = placement.local_experts(rank % expert_group);
        for (block, (got_block, want_block)) in
            outcome.grads.iter().zip(&expected.grads).enumerate()
        {
            for (i, name) in ["w_in", "w_gate"].iter().enumerate() {
                let d = max_diff(&got_block[i].values, &want_block[i].values);
                assert!(
                    d < precision.tolerance,
                    "{what}: block {block} {name} gradient differs by {d}"
                );
            }
            for (i, name) in ["w1", "b1", "w2", "b2"].iter().enumerate() {
                let d = max_diff(&got_block[2 + i].values, &rows(&want_block[2 + i], local));
                assert!(
                    d < precision.tolerance,
                    "{what}: block {block} expert {name} gradient differs by {d}"
                );
            }
        }
    }
    got
}

#[test]
fn two_ranks_equal_the_single_rank_run() {
    let placement = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    assert_equivalent(2, 2, &placement, F64);
    assert_equivalent(2, 2, &placement, F32);
}

#[test]
fn four_ranks_equal_the_single_rank_run() {
    let placement = ExpertPlacement::contiguous(EXPERTS, 4).unwrap();
    assert_equivalent(4, 4, &placement, F64);
    assert_equivalent(4, 4, &placement, F32);
}

#[test]
fn four_ranks_with_two_expert_groups_equal_the_single_rank_run() {
    // Expert groups [0,1] and [2,3]; expert-data groups [0,2] and [1,3].
    let placement = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    assert_equivalent(4, 2, &placement, F64);
    assert_equivalent(4, 2, &placement, F32);
}

#[test]
fn one_rank_through_the_exchange_equals_the_reference() {
    assert_equivalent(1, 1, &ExpertPlacement::contiguous(EXPERTS, 1).unwrap(), F64);
}

#[test]
fn moving_experts_between_ranks_does_not_change_the_norm() {
    let contiguous =
        assert_equivalent(4, 4, &ExpertPlacement::contiguous(EXPERTS, 4).unwrap(), F64);
    // Uneven and out of order, with one rank holding no expert at all.
    let moved = ExpertPlacement::new(vec![vec![3], vec![0, 2], vec![], vec![1]]).unwrap();
    let moved = assert_equivalent(4, 4, &moved, F64);
    for (a, b) in contiguous.iter().zip(&moved) {
        assert!(
            (a.norm - b.norm).abs() < 1e-12 * a.norm,
            "norm {} vs {}",
            a.norm,
            b.norm
        );
    }
}
