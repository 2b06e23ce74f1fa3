//! Which expert-group position holds which global experts, and the "slot" order the
//! MoE exchange sends tokens in.

use std::fmt;

/// The experts of one MoE layer spread over the positions of an expert group.
///
/// `ranks[p]` lists the global experts position `p` holds, in its local order (local
/// expert `j` of position `p` is global expert `ranks[p][j]`). Every expert appears
/// exactly once. The *slot order* is the concatenation `ranks[0] ++ ranks[1] ++ ...`:
/// the exchange expects tokens sorted by slot, so each destination's tokens are one
/// contiguous block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPlacement {
    ranks: Vec<Vec<usize>>,
    slot_of_expert: Vec<usize>,
}

/// A placement that does not hold every expert exactly once.
#[derive(Debug, PartialEq, Eq)]
pub struct PlacementError(pub String);

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlacementError {}

impl ExpertPlacement {
    /// `experts / ranks` consecutive experts per position (FastMoE's layout).
    pub fn contiguous(experts: usize, ranks: usize) -> Result<ExpertPlacement, PlacementError> {
        if ranks == 0 || experts % ranks != 0 {
            return Err(PlacementError(format!(
                "{experts} experts cannot be split evenly over {ranks} ranks"
            )));
        }
        let per = experts / ranks;
        ExpertPlacement::new(
            (0..ranks)
                .map(|p| (p * per..(p + 1) * per).collect())
                .collect(),
        )
    }

    /// Any placement; each global expert `0..E` must appear exactly once.
    pub fn new(ranks: Vec<Vec<usize>>) -> Result<ExpertPlacement, PlacementError> {
        if ranks.is_empty() {
            return Err(PlacementError("a placement needs at least one rank".into()));
        }
        let experts: usize = ranks.iter().map(Vec::len).sum();
        let mut slot_of_expert = vec![usize::MAX; experts];
        let mut slot = 0;
        for (position, held) in ranks.iter().enumerate() {
            for &e in held {
                match slot_of_expert.get_mut(e) {
                    Some(s) if *s == usize::MAX => *s = slot,
                    Some(_) => {
                        return Err(PlacementError(format!(
                            "expert {e} is placed twice (again on rank {position})"
                        )))
                    }
                    None => {
                        return Err(PlacementError(format!(
                            "expert {e} on rank {position} is outside the {experts} experts placed"
                        )))
                    }
                }
                slot += 1;
            }
        }
        Ok(ExpertPlacement {
            ranks,
            slot_of_expert,
        })
    }

    /// Global expert count.
    pub fn experts(&self) -> usize {
        self.slot_of_expert.len()
    }

    /// Number of expert-group positions.
    pub fn ranks(&self) -> usize {
        self.ranks.len()
    }

    /// The global experts position `p` holds, in local order (empty if `p` is out of range).
    pub fn local_experts(&self, position: usize) -> &[usize] {
        self.ranks
            .get(position)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Slot of each global expert: sort tokens by `slot_of_expert[expert]` before the
    /// exchange (as a lookup tensor: `Tensor::from_slice(&placement.slot_of_expert())`).
    pub fn slot_of_expert(&self) -> Vec<i64> {
        self.slot_of_expert.iter().map(|&s| s as i64).collect()
    }

    /// The slots of position `p`: `start..start + len`.
    pub fn slots(&self, position: usize) -> std::ops::Range<usize> {
        let start: usize = self.ranks.iter().take(position).map(Vec::len).sum();
        start..start + self.local_experts(position).len()
    }
}
