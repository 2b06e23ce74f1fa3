//! Resharding stacked expert tensors between placements: a checkpoint's expert
//! parameters (and optimizer moments) saved as `[E_local, ...]` per rank under one
//! [`ExpertPlacement`] become the shards of another (N ranks to M ranks, or the same
//! ranks with experts moved). A pure function on tensors: the checkpoint format that
//! stores the shards and the placements is the runtime's.

use super::ExpertPlacement;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum ReshardError {
    #[error("{given} shards given for a placement over {expected} ranks")]
    ShardCount { given: usize, expected: usize },
    #[error("the source placement has {from} experts, the target {to}")]
    ExpertCount { from: usize, to: usize },
    #[error(
        "shard {rank} has shape {shape:?}; its placement holds {experts} experts (dimension 0)"
    )]
    ShardRows {
        rank: usize,
        shape: Vec<i64>,
        experts: usize,
    },
    #[error("shard {rank} has shape {shape:?} ({kind:?}) but shard 0 has per-expert shape {expected:?} ({expected_kind:?})")]
    ShardShape {
        rank: usize,
        shape: Vec<i64>,
        kind: tch::Kind,
        expected: Vec<i64>,
        expected_kind: tch::Kind,
    },
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
}

/// `shards[p]` (`[from.local_experts(p).len(), ...]`, local order of `from`) become the
/// shards of `to`: result `q` is `[to.local_experts(q).len(), ...]` in `to`'s local
/// order, each row the same global expert's. The results are new tensors.
pub fn reshard_experts(
    shards: &[Tensor],
    from: &ExpertPlacement,
    to: &ExpertPlacement,
) -> Result<Vec<Tensor>, ReshardError> {
    if shards.len() != from.ranks() {
        return Err(ReshardError::ShardCount {
            given: shards.len(),
            expected: from.ranks(),
        });
    }
    if from.experts() != to.experts() {
        return Err(ReshardError::ExpertCount {
            from: from.experts(),
            to: to.experts(),
        });
    }
    let first = &shards[0];
    let per_expert = first
        .size()
        .get(1..)
        .map(<[i64]>::to_vec)
        .unwrap_or_default();
    let (kind, device) = (first.f_kind()?, first.device());
    let mut rows: Vec<Option<Tensor>> = (0..from.experts()).map(|_| None).collect();
    for (rank, shard) in shards.iter().enumerate() {
        let shape = shard.size();
        let held = from.local_experts(rank);
        if shape.first().copied() != Some(held.len() as i64) {
            return Err(ReshardError::ShardRows {
                rank,
                shape,
                experts: held.len(),
            });
        }
        if shape[1..] != per_expert[..] || shard.f_kind()? != kind {
            return Err(ReshardError::ShardShape {
                rank,
                shape,
                kind: shard.f_kind()?,
                expected: per_expert,
                expected_kind: kind,
            });
        }
        for (j, &expert) in held.iter().enumerate() {
            rows[expert] = Some(shard.f_narrow(0, j as i64, 1)?);
        }
    }
    let mut out = Vec::with_capacity(to.ranks());
    for q in 0..to.ranks() {
        let parts: Vec<&Tensor> = to
            .local_experts(q)
            .iter()
            .filter_map(|&e| rows[e].as_ref())
            .collect();
        let shard = if parts.is_empty() {
            let mut shape = vec![0i64];
            shape.extend(&per_expert);
            Tensor::f_zeros(shape, (kind, device))?
        } else {
            Tensor::f_cat(&parts, 0)?
        };
        out.push(shard);
    }
    Ok(out)
}
