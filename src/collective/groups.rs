//! Which ranks talk to which: the [`GroupLayout`] (lists of rank lists per group kind,
//! computed by the planner) and one rank's [`Groups`] of handles.

use super::Collective;
use std::fmt;

/// The process groups a rank of an MoE training belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupKind {
    /// Ranks that hold the same replicated parameters and split the batch.
    Data,
    /// Ranks that share one MoE layer's experts between them (the token all-to-all).
    Expert,
    /// Ranks that hold the same experts (same position in different expert groups).
    ExpertData,
    /// Ranks whose gate gradients are all-reduced together (FastMoE: one pipeline stage).
    Gate,
    /// One rank of every pipeline stage with the same tensor and data position (Megatron's
    /// pipeline group: activations and their gradients go point to point between
    /// neighbours, and the norm's squares are summed over it).
    Pipeline,
    /// The first and last stage of a pipeline group, which hold the tied token embedding
    /// (Megatron's embedding group: its gradient is summed between them); a rank of another
    /// stage, or every rank without pipeline parallelism, is a group of its own.
    Embedding,
    /// Ranks that split one layer's matrices (Megatron's tensor-model-parallel group).
    /// Not part of a [`GroupLayout`] (whose kinds are [`GroupKind::ALL`]): its lists
    /// come from [`tensor_groups`] or the planner's `tensor` groups, and the handle is
    /// opened beside the [`Groups`].
    Tensor,
}

impl GroupKind {
    pub const ALL: [GroupKind; 6] = [
        GroupKind::Data,
        GroupKind::Expert,
        GroupKind::ExpertData,
        GroupKind::Gate,
        GroupKind::Pipeline,
        GroupKind::Embedding,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Data => "data",
            GroupKind::Expert => "expert",
            GroupKind::ExpertData => "expert-data",
            GroupKind::Gate => "gate",
            GroupKind::Pipeline => "pipeline",
            GroupKind::Embedding => "embedding",
            GroupKind::Tensor => "tensor",
        }
    }
}

/// A group's kind and its members as global ranks; displays as `expert group [0,2]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLabel {
    pub kind: GroupKind,
    pub members: Vec<usize>,
}

impl GroupLabel {
    /// The global rank of group position `position`.
    pub fn global(&self, position: usize) -> usize {
        self.members.get(position).copied().unwrap_or(position)
    }

    /// The global ranks of a group of `size` but the one at `position` (the peers a rank
    /// waited for when a collective times out).
    pub fn others(&self, size: usize, position: usize) -> Vec<usize> {
        (0..size)
            .filter(|&p| p != position)
            .map(|p| self.global(p))
            .collect()
    }
}

impl fmt::Display for GroupLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranks: Vec<String> = self.members.iter().map(|r| r.to_string()).collect();
        write!(f, "{} group [{}]", self.kind.name(), ranks.join(","))
    }
}

/// A layout the collective layer cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the world has no ranks")]
    EmptyWorld,
    #[error("{kind} groups: rank {rank} is outside the world of {world} ranks")]
    OutOfRange {
        kind: &'static str,
        rank: usize,
        world: usize,
    },
    #[error("{kind} groups: rank {rank} is in more than one group")]
    Duplicate { kind: &'static str, rank: usize },
    #[error("{kind} groups: rank {rank} is in no group")]
    Missing { kind: &'static str, rank: usize },
    #[error("{kind} groups: a group is empty")]
    EmptyGroup { kind: &'static str },
    #[error("rank {rank}: its {kind} group {group:?} is not inside its data group {data:?}")]
    NotInData {
        rank: usize,
        kind: &'static str,
        group: Vec<usize>,
        data: Vec<usize>,
    },
    #[error(
        "rank {rank}: expert group ({expert} ranks) times expert-data group ({expert_data} ranks) is not its data group ({data} ranks)"
    )]
    Product {
        rank: usize,
        expert: usize,
        expert_data: usize,
        data: usize,
    },
    #[error("expert group size {size} does not divide the {world} ranks")]
    Indivisible { size: usize, world: usize },
    #[error(
        "rank {rank}: its embedding group {group:?} is not inside its pipeline group {pipeline:?}"
    )]
    EmbeddingOutsidePipeline {
        rank: usize,
        group: Vec<usize>,
        pipeline: Vec<usize>,
    },
}

/// Every group of every kind, as lists of global ranks. Each kind's lists partition
/// `0..world`. Invariants checked by [`GroupLayout::validate`]: a rank's expert and
/// expert-data groups lie inside its data group and their sizes multiply to the data
/// group's size (each expert group holds every expert once; each expert-data group
/// holds one position's experts once per expert group); a rank's embedding group lies
/// inside its pipeline group. A pipeline group lists its ranks in stage order (position
/// `s` is stage `s`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    pub world: usize,
    pub data: Vec<Vec<usize>>,
    pub expert: Vec<Vec<usize>>,
    pub expert_data: Vec<Vec<usize>>,
    pub gate: Vec<Vec<usize>>,
    pub pipeline: Vec<Vec<usize>>,
    pub embedding: Vec<Vec<usize>>,
}

impl GroupLayout {
    /// Pure data parallelism (tensor = pipeline = 1) with expert groups of
    /// `expert_group` consecutive ranks: data and gate groups are the whole world,
    /// expert-data groups are strided (`[p, p + expert_group, ...]`).
    pub fn data_parallel(world: usize, expert_group: usize) -> Result<GroupLayout, LayoutError> {
        // Megatron's grid with tensor = 1: one data group of the whole world
        GroupLayout::tensor_data(world, 1, expert_group)
    }

    /// Megatron-LM v2.2's layout with tensor size `tensor` and pipeline = 1 (see
    /// [`tensor_groups`] for the tensor groups): data groups are strided
    /// (`[j, j + tensor, ...]` for tensor rank `j`), expert groups are consecutive runs of
    /// `expert_group` members of each data group, expert-data groups the members of one
    /// data group at the same position in their expert groups, and the gate group is the
    /// whole world (FastMoE: one pipeline stage).
    pub fn tensor_data(
        world: usize,
        tensor: usize,
        expert_group: usize,
    ) -> Result<GroupLayout, LayoutError> {
        GroupLayout::megatron(world, tensor, 1, expert_group)
    }

    /// Megatron-LM v2.2's layout with tensor size `tensor` and `pipeline` stages of
    /// `world / pipeline` consecutive ranks: within a stage as [`GroupLayout::tensor_data`]
    /// (the gate group is the stage); pipeline groups are strided (`[i, i + world/pipeline,
    /// ...]`), embedding groups their first and last members.
    pub fn megatron(
        world: usize,
        tensor: usize,
        pipeline: usize,
        expert_group: usize,
    ) -> Result<GroupLayout, LayoutError> {
        check_split(world, pipeline)?;
        let per_stage = world / pipeline;
        check_split(per_stage, tensor)?;
        let data_size = per_stage / tensor;
        check_split(data_size, expert_group)?;
        let data = megatron_data_groups(pipeline, per_stage, tensor);
        let pipeline_groups: Vec<Vec<usize>> = (0..per_stage)
            .map(|i| (i..world).step_by(per_stage).collect())
            .collect();
        let embedding = embedding_groups(&pipeline_groups);
        let (expert, expert_data) = expert_groups(&data, expert_group);
        let layout = GroupLayout {
            world,
            data,
            expert,
            expert_data,
            gate: (0..pipeline)
                .map(|s| (s * per_stage..(s + 1) * per_stage).collect())
                .collect(),
            pipeline: pipeline_groups,
            embedding,
        };
        layout.validate()?;
        Ok(layout)
    }

    /// Pipeline stages (the size of a pipeline group).
    pub fn stages(&self) -> usize {
        self.pipeline.first().map_or(1, Vec::len)
    }

    /// The pipeline stage of `rank` (its position in its pipeline group).
    pub fn stage_of(&self, rank: usize) -> usize {
        self.members(GroupKind::Pipeline, rank)
            .and_then(|g| g.iter().position(|&r| r == rank))
            .unwrap_or_default()
    }

    pub fn groups(&self, kind: GroupKind) -> &[Vec<usize>] {
        match kind {
            GroupKind::Data => &self.data,
            GroupKind::Expert => &self.expert,
            GroupKind::ExpertData => &self.expert_data,
            GroupKind::Gate => &self.gate,
            GroupKind::Pipeline => &self.pipeline,
            GroupKind::Embedding => &self.embedding,
            // Kept beside the layout: see GroupKind::Tensor.
            GroupKind::Tensor => &[],
        }
    }

    /// The members of `rank`'s group of `kind` (in the order given; a rank's position in
    /// the list is its rank inside the group).
    pub fn members(&self, kind: GroupKind, rank: usize) -> Option<&[usize]> {
        self.groups(kind)
            .iter()
            .find(|g| g.contains(&rank))
            .map(Vec::as_slice)
    }

    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.world == 0 {
            return Err(LayoutError::EmptyWorld);
        }
        for kind in GroupKind::ALL {
            check_partition(kind.name(), self.world, self.groups(kind))?;
        }
        for rank in 0..self.world {
            let member = |kind| self.members(kind, rank).unwrap_or_default();
            let data = member(GroupKind::Data);
            for kind in [GroupKind::Expert, GroupKind::ExpertData] {
                let group = member(kind);
                if !group.iter().all(|r| data.contains(r)) {
                    return Err(LayoutError::NotInData {
                        rank,
                        kind: kind.name(),
                        group: group.to_vec(),
                        data: data.to_vec(),
                    });
                }
            }
            let (expert, expert_data) = (
                member(GroupKind::Expert).len(),
                member(GroupKind::ExpertData).len(),
            );
            if expert * expert_data != data.len() {
                return Err(LayoutError::Product {
                    rank,
                    expert,
                    expert_data,
                    data: data.len(),
                });
            }
            let (embedding, pipeline) = (member(GroupKind::Embedding), member(GroupKind::Pipeline));
            if !embedding.iter().all(|r| pipeline.contains(r)) {
                return Err(LayoutError::EmbeddingOutsidePipeline {
                    rank,
                    group: embedding.to_vec(),
                    pipeline: pipeline.to_vec(),
                });
            }
        }
        Ok(())
    }
}

/// Checks that the `kind` groups `lists` are non-empty and partition `0..world`.
pub(crate) fn check_partition(
    kind: &'static str,
    world: usize,
    lists: &[Vec<usize>],
) -> Result<(), LayoutError> {
    let mut seen = vec![false; world];
    for group in lists {
        if group.is_empty() {
            return Err(LayoutError::EmptyGroup { kind });
        }
        for &rank in group {
            match seen.get_mut(rank) {
                None => return Err(LayoutError::OutOfRange { kind, rank, world }),
                Some(true) => return Err(LayoutError::Duplicate { kind, rank }),
                Some(slot) => *slot = true,
            }
        }
    }
    match seen.iter().position(|s| !s) {
        Some(rank) => Err(LayoutError::Missing { kind, rank }),
        None => Ok(()),
    }
}

/// The tensor group of `rank` among the tensor groups `lists` (from [`tensor_groups`] or
/// the planner), once they are checked to partition `0..world`.
pub(crate) fn tensor_group_of(
    lists: &[Vec<usize>],
    world: usize,
    rank: usize,
) -> Result<Vec<usize>, LayoutError> {
    check_partition("tensor", world, lists)?;
    lists
        .iter()
        .find(|g| g.contains(&rank))
        .cloned()
        .ok_or(LayoutError::OutOfRange {
            kind: "tensor",
            rank,
            world,
        })
}

/// Megatron-LM v2.2's data groups: in each of the `pipeline` stages of `per_stage`
/// consecutive ranks, tensor rank `j`'s group is `[j, j + tensor, ...]`.
fn megatron_data_groups(pipeline: usize, per_stage: usize, tensor: usize) -> Vec<Vec<usize>> {
    (0..pipeline)
        .flat_map(|s| {
            (0..tensor).map(move |j| {
                (s * per_stage + j..(s + 1) * per_stage)
                    .step_by(tensor)
                    .collect()
            })
        })
        .collect()
}

/// The embedding groups of `pipeline_groups`: each group's first and last members together,
/// every other member alone (a group of one stage is its own).
fn embedding_groups(pipeline_groups: &[Vec<usize>]) -> Vec<Vec<usize>> {
    pipeline_groups
        .iter()
        .flat_map(|g| match g.as_slice() {
            [first, .., last] => {
                let mut pairs = vec![vec![*first, *last]];
                pairs.extend(g[1..g.len() - 1].iter().map(|&r| vec![r]));
                pairs
            }
            _ => vec![g.clone()],
        })
        .collect()
}

/// The expert groups (consecutive runs of `expert_group` members of each data group) and the
/// expert-data groups (the members of one data group at the same position in their expert
/// groups).
fn expert_groups(data: &[Vec<usize>], expert_group: usize) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let mut expert = Vec::new();
    let mut expert_data = Vec::new();
    for group in data {
        expert.extend(group.chunks(expert_group).map(<[usize]>::to_vec));
        expert_data.extend((0..expert_group).map(|p| {
            group
                .iter()
                .copied()
                .skip(p)
                .step_by(expert_group)
                .collect::<Vec<usize>>()
        }));
    }
    (expert, expert_data)
}

/// Refuses splitting `world` ranks into groups of `size` unless the world is non-empty and
/// `size` divides it.
fn check_split(world: usize, size: usize) -> Result<(), LayoutError> {
    if world == 0 {
        return Err(LayoutError::EmptyWorld);
    }
    if size == 0 || world % size != 0 {
        return Err(LayoutError::Indivisible { size, world });
    }
    Ok(())
}

/// Megatron-LM v2.2's tensor groups for pipeline = 1: consecutive runs of `tensor` ranks
/// (`[i·t, (i+1)·t)`), the same lists `fmoec plan` prints as `tensor`.
pub fn tensor_groups(world: usize, tensor: usize) -> Result<Vec<Vec<usize>>, LayoutError> {
    check_split(world, tensor)?;
    Ok((0..world / tensor)
        .map(|i| (i * tensor..(i + 1) * tensor).collect())
        .collect())
}

/// One rank's handles to the groups of its [`GroupLayout`], and to its tensor group (see
/// [`Groups::set_tensor`]).
pub struct Groups {
    rank: usize,
    world: usize,
    data: Box<dyn Collective>,
    expert: Box<dyn Collective>,
    expert_data: Box<dyn Collective>,
    gate: Box<dyn Collective>,
    pipeline: Box<dyn Collective>,
    embedding: Box<dyn Collective>,
    tensor: Box<dyn Collective>,
}

impl Groups {
    /// Build `rank`'s handles: `connect(label, position)` opens the handle for one group
    /// (label = kind and members, position = this rank's place in it). Groups are
    /// connected in the order of [`GroupKind::ALL`] (data, expert, expert-data, gate,
    /// pipeline, embedding) on every rank, which is what communicator creation (a
    /// collective itself on NCCL) needs.
    pub fn connect<F>(layout: &GroupLayout, rank: usize, mut connect: F) -> anyhow::Result<Groups>
    where
        F: FnMut(GroupLabel, usize) -> anyhow::Result<Box<dyn Collective>>,
    {
        layout.validate()?;
        if rank >= layout.world {
            anyhow::bail!("rank {rank} is outside the world of {} ranks", layout.world);
        }
        let mut open = |kind| -> anyhow::Result<Box<dyn Collective>> {
            let members = layout.members(kind, rank).unwrap_or_default().to_vec();
            let position = members.iter().position(|&r| r == rank).unwrap_or_default();
            connect(GroupLabel { kind, members }, position)
        };
        let alone = GroupLabel {
            kind: GroupKind::Tensor,
            members: vec![rank],
        };
        // A group of one never waits; the timeout is only a formality.
        let tensor = super::local::LocalCollective::group(alone, std::time::Duration::from_secs(1))
            .pop()
            .map(|h| Box::new(h) as Box<dyn Collective>)
            .ok_or_else(|| anyhow::anyhow!("internal error: no handle for a group of one"))?;
        Ok(Groups {
            tensor,
            rank,
            world: layout.world,
            data: open(GroupKind::Data)?,
            expert: open(GroupKind::Expert)?,
            expert_data: open(GroupKind::ExpertData)?,
            gate: open(GroupKind::Gate)?,
            pipeline: open(GroupKind::Pipeline)?,
            embedding: open(GroupKind::Embedding)?,
        })
    }

    /// Global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn get(&self, kind: GroupKind) -> &dyn Collective {
        match kind {
            GroupKind::Data => self.data.as_ref(),
            GroupKind::Expert => self.expert.as_ref(),
            GroupKind::ExpertData => self.expert_data.as_ref(),
            GroupKind::Gate => self.gate.as_ref(),
            GroupKind::Pipeline => self.pipeline.as_ref(),
            GroupKind::Embedding => self.embedding.as_ref(),
            GroupKind::Tensor => self.tensor.as_ref(),
        }
    }

    /// The tensor group: this rank alone (tensor = 1) until [`Groups::set_tensor`] gives
    /// it the real one.
    pub fn tensor(&self) -> &dyn Collective {
        self.tensor.as_ref()
    }

    /// Hands this rank its tensor-group handle (opened after the four groups of
    /// [`Groups::connect`], in the same order on every rank: a communicator's creation is a
    /// collective call on NCCL). Refused unless the handle's group contains this rank.
    pub fn set_tensor(&mut self, handle: Box<dyn Collective>) -> anyhow::Result<()> {
        let label = handle.label();
        if label.kind != GroupKind::Tensor || label.members.get(handle.rank()) != Some(&self.rank) {
            anyhow::bail!(
                "rank {}: {label} at position {} is not this rank's tensor group",
                self.rank,
                handle.rank()
            );
        }
        self.tensor = handle;
        Ok(())
    }

    pub fn data(&self) -> &dyn Collective {
        self.data.as_ref()
    }

    pub fn expert(&self) -> &dyn Collective {
        self.expert.as_ref()
    }

    pub fn expert_data(&self) -> &dyn Collective {
        self.expert_data.as_ref()
    }

    pub fn gate(&self) -> &dyn Collective {
        self.gate.as_ref()
    }

    /// This rank's pipeline group: one rank per stage, position = stage.
    pub fn pipeline(&self) -> &dyn Collective {
        self.pipeline.as_ref()
    }

    /// The first and last stage of this rank's pipeline group (the tied embedding's
    /// holders); this rank alone on another stage or without a pipeline.
    pub fn embedding(&self) -> &dyn Collective {
        self.embedding.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::{GroupKind, GroupLabel};

    /// A timeout names every member but the rank that waited, by global rank.
    #[test]
    fn others_are_the_global_ranks_but_ones_own() {
        let label = GroupLabel {
            kind: GroupKind::Expert,
            members: vec![4, 5, 6],
        };
        assert_eq!(label.others(3, 1), [4, 6]);
        assert_eq!(label.others(3, 0), [5, 6]);
    }
}
