//! Resharding stacked expert tensors between placements (4 ranks → 2 → 1, moved
//! experts, and back) keeps every global expert's values.

use fmoec::collective::{reshard_experts, ExpertPlacement, ReshardError};
use tch::{Kind, Tensor};

const EXPERTS: usize = 8;

/// Expert `e`'s rows are filled with `100 * e + offset`, so every value says which
/// expert it belongs to.
fn global() -> Tensor {
    let e =
        Tensor::arange(EXPERTS as i64, (Kind::Float, tch::Device::Cpu)).reshape([-1, 1, 1]) * 100.0;
    e + Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).reshape([1, 3, 2])
}

fn shards_of(placement: &ExpertPlacement) -> Vec<Tensor> {
    let g = global();
    (0..placement.ranks())
        .map(|p| {
            let index: Vec<i64> = placement
                .local_experts(p)
                .iter()
                .map(|&e| e as i64)
                .collect();
            g.index_select(0, &Tensor::from_slice(&index))
        })
        .collect()
}

fn assert_same(a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.size(), y.size());
        assert!(x.equal(y));
    }
}

#[test]
fn four_ranks_to_two_to_one_and_back() {
    let four = ExpertPlacement::contiguous(EXPERTS, 4).unwrap();
    let two = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    let one = ExpertPlacement::contiguous(EXPERTS, 1).unwrap();
    let on_four = shards_of(&four);
    let on_two = reshard_experts(&on_four, &four, &two).unwrap();
    assert_same(&on_two, &shards_of(&two));
    let on_one = reshard_experts(&on_four, &four, &one).unwrap();
    assert_same(&on_one, &[global()]);
    assert_same(&reshard_experts(&on_one, &one, &four).unwrap(), &on_four);
    assert_same(&reshard_experts(&on_two, &two, &four).unwrap(), &on_four);
}

#[test]
fn moved_and_uneven_placements() {
    let four = ExpertPlacement::contiguous(EXPERTS, 4).unwrap();
    let moved = ExpertPlacement::new(vec![vec![7, 0, 3], vec![], vec![5, 1, 2, 6, 4]]).unwrap();
    let resharded = reshard_experts(&shards_of(&four), &four, &moved).unwrap();
    assert_same(&resharded, &shards_of(&moved));
    assert_eq!(resharded[1].size(), vec![0, 3, 2]);
    assert_same(
        &reshard_experts(&resharded, &moved, &four).unwrap(),
        &shards_of(&four),
    );
}

#[test]
fn inconsistent_inputs_are_errors() {
    let four = ExpertPlacement::contiguous(EXPERTS, 4).unwrap();
    let two = ExpertPlacement::contiguous(EXPERTS, 2).unwrap();
    let shards = shards_of(&four);
    assert!(matches!(
        reshard_experts(&shards[..3], &four, &two),
        Err(ReshardError::ShardCount {
            given: 3,
            expected: 4
        })
    ));
    let six = ExpertPlacement::contiguous(6, 2).unwrap();
    assert!(matches!(
        reshard_experts(&shards, &four, &six),
        Err(ReshardError::ExpertCount { from: 8, to: 6 })
    ));
    let mut wrong_rows = shards_of(&four);
    wrong_rows[2] = wrong_rows[2].narrow(0, 0, 1);
    assert!(matches!(
        reshard_experts(&wrong_rows, &four, &two),
        Err(ReshardError::ShardRows { rank: 2, .. })
    ));
    let mut wrong_shape = shards_of(&four);
    wrong_shape[1] = Tensor::zeros([2, 2, 3], (Kind::Float, tch::Device::Cpu));
    assert!(matches!(
        reshard_experts(&wrong_shape, &four, &two),
        Err(ReshardError::ShardShape { rank: 1, .. })
    ));
    assert!(ExpertPlacement::new(vec![vec![0, 1], vec![1]]).is_err());
    assert!(ExpertPlacement::new(vec![vec![0, 3]]).is_err());
    assert!(ExpertPlacement::contiguous(EXPERTS, 3).is_err());
}
