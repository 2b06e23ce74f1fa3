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
    let row = ExpertRow::of(&shards[0])?;
    let rows = rows_by_expert(shards, from, &row)?;
    (0..to.ranks())
        .map(|q| row.stack(to.local_experts(q), &rows))
        .collect()
}

/// What every row of every shard is: shard 0's per-expert shape, dtype and device.
struct ExpertRow {
    shape: Vec<i64>,
    kind: tch::Kind,
    device: tch::Device,
}

impl ExpertRow {
    fn of(first: &Tensor) -> Result<ExpertRow, ReshardError> {
        let shape = first
            .size()
            .get(1..)
            .map(<[i64]>::to_vec)
            .unwrap_or_default();
        Ok(ExpertRow {
            shape,
            kind: first.f_kind()?,
            device: first.device(),
        })
    }

    /// The shard of the experts `held`, in that order, from `rows` (by global expert).
    fn stack(&self, held: &[usize], rows: &[Option<Tensor>]) -> Result<Tensor, ReshardError> {
        let parts: Vec<&Tensor> = held.iter().filter_map(|&e| rows[e].as_ref()).collect();
        Ok(if parts.is_empty() {
            let mut shape = vec![0i64];
            shape.extend(&self.shape);
            Tensor::f_zeros(shape, (self.kind, self.device))?
        } else {
            Tensor::f_cat(&parts, 0)?
        })
    }
}

/// Every global expert's row of `shards` (placed by `from`), each shard checked against
/// its placement and `row`.
fn rows_by_expert(
    shards: &[Tensor],
    from: &ExpertPlacement,
    row: &ExpertRow,
) -> Result<Vec<Option<Tensor>>, ReshardError> {
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
        if shape[1..] != row.shape[..] || shard.f_kind()? != row.kind {
            return Err(ReshardError::ShardShape {
                rank,
                shape,
                kind: shard.f_kind()?,
                expected: row.shape.clone(),
                expected_kind: row.kind,
            });
        }
        for (j, &expert) in held.iter().enumerate() {
            rows[expert] = Some(shard.f_narrow(0, j as i64, 1)?);
        }
    }
    Ok(rows)
}
