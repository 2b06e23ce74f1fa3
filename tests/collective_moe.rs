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
#![cfg(feature = "runtime")]

use fmoec::collective::local::{local_world, run_ranks};
use fmoec::collective::selftest::{self, Outcome, Problem};
use fmoec::collective::{ExpertPlacement, GroupLayout};
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
