//! Expert parallelism over in-process ranks equals the single-rank run.
//!
//! The problem is `fmoec::collective::selftest`'s two-block top-2 MoE (its reference is
//! computed token by token without any part of the collective layer). The split run gives
//! every rank a quarter (or half) of the tokens, exchanges tokens over the expert group with
//! autograd cut, runs backward in segments, reduces gradients by kind and clips by the
//! global norm.
//!
//! Runs in f64 with tolerance 1e-10 absolute on outputs, loss, gradients and the norm
//! (values are O(1); the only differences are summation orders), and in f32 (what the
//! runtime uses on CPU) with tolerance 1e-5.
//!
//! FasterMoE's options change only where the work happens: the exchange pipelined in
//! chunks of peers, and experts replicated to every rank of the group ("shadowed", their
//! gradients summed back into the owner's), give the same outputs, loss, gradients and norm.

use fmoec::collective::local::{local_world, run_ranks};
use fmoec::collective::selftest::{self, ExchangeRecord, Outcome, Problem, ShadowThese};
use fmoec::collective::{ExchangeOptions, ExpertPlacement, GroupLayout};
use std::time::Duration;
use tch::{Device, Kind};

const EXPERTS: usize = 4;
const TOKENS: i64 = 16;

fn distributed(
    problem: &Problem,
    world: usize,
    expert_group: usize,
    placement: &ExpertPlacement,
    kind: Kind,
) -> Vec<Outcome> {
    let layout = GroupLayout::data_parallel(world, expert_group).unwrap();
    let ranks = local_world(&layout, Duration::from_secs(30)).unwrap();
    run_ranks(ranks, |groups| {
        selftest::split(&groups, Device::Cpu, kind, problem, placement).unwrap()
    })
    .into_iter()
    .map(|r| r.expect("rank panicked"))
    .collect()
}

fn assert_equivalent(
    world: usize,
    expert_group: usize,
    placement: &ExpertPlacement,
    kind: Kind,
    tolerance: f64,
) -> Vec<Outcome> {
    let problem = Problem::new(TOKENS, EXPERTS, 7);
    let expected = selftest::reference(&problem, kind);
    assert!(
        expected.scale < 1.0,
        "the test must exercise clipping (norm {})",
        expected.norm
    );
    let got = distributed(&problem, world, expert_group, placement, kind);
    for (rank, outcome) in got.iter().enumerate() {
        let diffs = selftest::compare(
            &expected,
            outcome,
            rank,
            world,
            rank % expert_group,
            placement,
        );
        assert_eq!(diffs.len(), 4 + 6 * selftest::BLOCKS);
        let bad = selftest::failures(&diffs, tolerance);
        assert!(
            bad.is_empty(),
            "world {world}, expert group {expert_group}, rank {rank}: {}",
            bad.join("; ")
        );
    }
    got
}

fn both_precisions(world: usize, expert_group: usize, placement: &ExpertPlacement) {
    assert_equivalent(world, expert_group, placement, Kind::Double, 1e-10);
    assert_equivalent(world, expert_group, placement, Kind::Float, 1e-5);
}

#[test]
fn two_ranks_equal_the_single_rank_run() {
    both_precisions(2, 2, &ExpertPlacement::contiguous(EXPERTS, 2).unwrap());
}

#[test]
fn four_ranks_equal_the_single_rank_run() {
    both_precisions(4, 4, &ExpertPlacement::contiguous(EXPERTS, 4).unwrap());
}

#[test]
fn four_ranks_with_two_expert_groups_equal_the_single_rank_run() {
    // Expert groups [0,1] and [2,3]; expert-data groups [0,2] and [1,3].
    both_precisions(4, 2, &ExpertPlacement::contiguous(EXPERTS, 2).unwrap());
}

#[test]
fn one_rank_through_the_exchange_equals_the_reference() {
    let placement = ExpertPlacement::contiguous(EXPERTS, 1).unwrap();
    assert_equivalent(1, 1, &placement, Kind::Double, 1e-10);
}

#[test]
fn a_wrong_gradient_is_reported() {
    // The comparison itself must catch a difference: perturb one expert gradient.
    let placement = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    let problem = Problem::new(TOKENS, EXPERTS, 7);
    let expected = selftest::reference(&problem, Kind::Double);
    let mut got = distributed(&problem, 2, 2, &placement, Kind::Double).remove(1);
    got.grads[1][4].values[3] += 1e-6;
    let bad = selftest::failures(
        &selftest::compare(&expected, &got, 1, 2, 1, &placement),
        1e-10,
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].starts_with("block 1 w2 gradient"), "{bad:?}");
}

#[test]
fn moving_experts_between_ranks_does_not_change_the_norm() {
    let contiguous = assert_equivalent(
        4,
        4,
        &ExpertPlacement::contiguous(EXPERTS, 4).unwrap(),
        Kind::Double,
        1e-10,
    );
    // Uneven and out of order, with one rank holding no expert at all.
    let moved = ExpertPlacement::new(vec![vec![3], vec![0, 2], vec![], vec![1]]).unwrap();
    let moved = assert_equivalent(4, 4, &moved, Kind::Double, 1e-10);
    for (a, b) in contiguous.iter().zip(&moved) {
        assert!(
            (a.norm - b.norm).abs() < 1e-12 * a.norm,
            "norm {} vs {}",
            a.norm,
            b.norm
        );
    }
}

// ---- FasterMoE: the smart schedule and dynamic shadowing ---------------------------

/// The split run with `chunks` and the experts in `shadow` replicated in every exchange;
/// per rank its outcome and what each block's exchange did.
fn distributed_with(
    problem: &Problem,
    world: usize,
    expert_group: usize,
    placement: &ExpertPlacement,
    kind: Kind,
    chunks: usize,
    shadow: &[usize],
) -> Vec<(Outcome, Vec<ExchangeRecord>)> {
    let layout = GroupLayout::data_parallel(world, expert_group).unwrap();
    let ranks = local_world(&layout, Duration::from_secs(30)).unwrap();
    run_ranks(ranks, |groups| {
        let policy = ShadowThese(shadow.to_vec());
        let options = ExchangeOptions {
            chunks,
            shadowing: (!shadow.is_empty()).then_some(&policy as _),
        };
        selftest::split_with(&groups, Device::Cpu, kind, problem, placement, options).unwrap()
    })
    .into_iter()
    .map(|r| r.expect("rank panicked"))
    .collect()
}

fn assert_equivalent_with(
    world: usize,
    expert_group: usize,
    placement: &ExpertPlacement,
    chunks: usize,
    shadow: &[usize],
) -> Vec<Vec<ExchangeRecord>> {
    let mut records = Vec::new();
    for (kind, tolerance) in [(Kind::Double, 1e-10), (Kind::Float, 1e-5)] {
        let problem = Problem::new(TOKENS, EXPERTS, 7);
        let expected = selftest::reference(&problem, kind);
        let got = distributed_with(
            &problem,
            world,
            expert_group,
            placement,
            kind,
            chunks,
            shadow,
        );
        for (rank, (outcome, blocks)) in got.iter().enumerate() {
            let what = format!(
                "world {world}, expert group {expert_group}, {chunks} chunks, shadowing {shadow:?}, rank {rank}, {kind:?}"
            );
            let diffs = selftest::compare(
                &expected,
                outcome,
                rank,
                world,
                rank % expert_group,
                placement,
            );
            let bad = selftest::failures(&diffs, tolerance);
            assert!(bad.is_empty(), "{what}: {}", bad.join("; "));
            // the replicas really ran (in every block), or none did in a group of one
            let mut want: Vec<usize> = if expert_group > 1 {
                shadow.to_vec()
            } else {
                Vec::new()
            };
            want.sort_unstable();
            for block in blocks {
                assert_eq!(block.shadowed, want, "{what}: shadowed experts");
                assert_eq!(
                    block.chunks,
                    chunks.clamp(1, expert_group),
                    "{what}: chunks"
                );
            }
        }
        records = got.into_iter().map(|(_, r)| r).collect();
    }
    records
}

#[test]
fn the_smart_schedule_equals_the_single_rank_run() {
    let two = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    let four = ExpertPlacement::contiguous(EXPERTS, 4).unwrap();
    assert_equivalent_with(2, 2, &two, 2, &[]);
    assert_equivalent_with(4, 4, &four, 2, &[]);
    assert_equivalent_with(4, 4, &four, 4, &[]);
    // more chunks than ranks: one chunk per rank
    assert_equivalent_with(4, 4, &four, 9, &[]);
    // two expert groups of two
    assert_equivalent_with(4, 2, &two, 2, &[]);
}

#[test]
fn shadowed_experts_equal_the_single_rank_run() {
    let two = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    let four = ExpertPlacement::contiguous(EXPERTS, 4).unwrap();
    assert_equivalent_with(2, 2, &two, 1, &[0]);
    assert_equivalent_with(4, 4, &four, 1, &[1, 2]);
    // every expert replicated: no token leaves its rank
    let all = assert_equivalent_with(4, 4, &four, 1, &[0, 1, 2, 3]);
    assert!(all.iter().flatten().all(|b| b.sent_away == 0), "{all:?}");
    // a replicated expert's tokens stay home: fewer rows travel than without shadows
    let plain = assert_equivalent_with(4, 4, &four, 1, &[]);
    let one = assert_equivalent_with(4, 4, &four, 1, &[1]);
    let sent = |r: &[Vec<ExchangeRecord>]| -> i64 { r.iter().flatten().map(|b| b.sent_away).sum() };
    assert!(sent(&one) < sent(&plain), "{one:?} vs {plain:?}");
    assert_equivalent_with(4, 2, &two, 1, &[3]);
}

#[test]
fn shadowing_and_the_smart_schedule_together_equal_the_single_rank_run() {
    let four = ExpertPlacement::contiguous(EXPERTS, 4).unwrap();
    assert_equivalent_with(4, 4, &four, 4, &[0]);
    assert_equivalent_with(4, 4, &four, 2, &[3, 1]);
    // uneven and out of order, a rank holding no expert, its neighbour's expert replicated
    let moved = ExpertPlacement::new(vec![vec![3], vec![0, 2], vec![], vec![1]]).unwrap();
    assert_equivalent_with(4, 4, &moved, 4, &[2]);
    assert_equivalent_with(4, 4, &moved, 2, &[0, 3]);
}

#[test]
fn a_lost_shadow_gradient_is_reported() {
    // The owner of a replicated expert must get every rank's share of its gradient: the
    // comparison catches one rank's share missing.
    let two = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    let problem = Problem::new(TOKENS, EXPERTS, 7);
    let expected = selftest::reference(&problem, Kind::Double);
    let (mut got, _) = distributed_with(&problem, 2, 2, &two, Kind::Double, 1, &[0]).remove(0);
    got.grads[0][2].values[0] += 1e-6;
    let bad = selftest::failures(&selftest::compare(&expected, &got, 0, 2, 0, &two), 1e-10);
    assert_eq!(bad.len(), 1, "{bad:?}");
}

#[test]
fn a_shadowing_policy_that_names_no_expert_is_an_error() {
    let two = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    let problem = Problem::new(TOKENS, EXPERTS, 7);
    let layout = GroupLayout::data_parallel(2, 2).unwrap();
    let ranks = local_world(&layout, Duration::from_secs(30)).unwrap();
    let errors = run_ranks(ranks, |groups| {
        let policy = ShadowThese(vec![EXPERTS + 3]);
        let options = ExchangeOptions {
            chunks: 1,
            shadowing: Some(&policy),
        };
        selftest::split_with(&groups, Device::Cpu, Kind::Double, &problem, &two, options)
            .err()
            .map(|e| e.to_string())
    });
    for e in errors {
        let e = e.expect("rank panicked").expect("an error");
        assert!(
            e.contains("expert group [0,1]")
                && e.contains("the shadowing policy chose expert 7 of 4"),
            "{e}"
        );
    }
}
