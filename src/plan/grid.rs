//! The rank grid: process groups exactly as Megatron-LM v2.2 builds them
//! (`megatron/mpu/initialize.py`, `initialize_model_parallel`), plus FastMoE's expert,
//! expert-data and gate groups.
//!
//! Owns only integer arithmetic over ranks; knows nothing about models or costs.
//!
//! With world `W`, tensor size `t`, pipeline size `p` and data size `d = W/(t·p)`:
//! - tensor groups: `[i·t, (i+1)·t)` for `i < W/t`;
//! - pipeline groups: `range(i, W, W/p)` for `i < W/p`;
//! - data groups: for stage `s < p` and tensor rank `j < t`, `range(s·W/p + j, (s+1)·W/p, t)`;
//! - model groups: for `i < d`, the `i`-th member of every data group, in the order the
//!   data groups were built;
//! - embedding groups: first and last member of each pipeline group (one member when
//!   `p = 1`).
//!
//! So rank `r` has tensor rank `r mod t`, data rank `(r mod W/p) div t` and pipeline rank
//! `r div (W/p)`.

use serde::Serialize;

/// Sizes of the grid; `world == tensor * pipeline * data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Grid {
    pub world: u64,
    pub tensor: u64,
    pub pipeline: u64,
    /// Model chunks per pipeline stage (1 without the interleaved schedule).
    pub virtual_stages: u64,
    pub data: u64,
    /// Size of one expert group; divides `data`.
    pub expert_group: u64,
}

/// A rank's coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Coords {
    pub tensor_rank: u64,
    pub pipeline_rank: u64,
    pub data_rank: u64,
    /// Position in its expert group (`data_rank mod expert_group`).
    pub expert_rank: u64,
}

/// Every process group, each kind a list of rank lists that partitions the ranks
/// (embedding groups excepted: they hold only first and last stages).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Groups {
    pub tensor: Vec<Vec<u64>>,
    pub pipeline: Vec<Vec<u64>>,
    pub data: Vec<Vec<u64>>,
    pub model: Vec<Vec<u64>>,
    /// Ranks that exchange tokens by all-to-all and split one layer's experts.
    pub expert: Vec<Vec<u64>>,
    /// Ranks holding the same experts (their expert gradients are all-reduced here).
    pub expert_data: Vec<Vec<u64>>,
    /// All ranks of one pipeline stage (FastMoE all-reduces gate gradients here).
    pub gate: Vec<Vec<u64>>,
    /// First and last stage of each pipeline group (tied embedding gradients).
    pub embedding: Vec<Vec<u64>>,
}

impl Grid {
    /// Ranks of one pipeline stage (FastMoE's gate group).
    pub fn per_stage(&self) -> u64 {
        self.world / self.pipeline
    }

    /// Blocks per model chunk of a model `depth` blocks deep (`depth / (pipeline ·
    /// virtual_stages)`, at least 1).
    pub fn layers_per_chunk(&self, depth: u64) -> u64 {
        (depth / (self.pipeline * self.virtual_stages).max(1)).max(1)
    }

    /// The pipeline stage holding block `layer`: chunk `c` of stage `s` is virtual stage
    /// `c·pipeline + s`, and virtual stage `k` holds blocks `[k·n, (k+1)·n)`.
    pub fn stage_of_layer(&self, layer: u64, depth: u64) -> u64 {
        (layer / self.layers_per_chunk(depth)) % self.pipeline
    }

    /// The blocks `[first, end)` of each of `stage`'s model chunks, in the order it runs them.
    pub fn chunks_of(&self, stage: u64, depth: u64) -> Vec<[u64; 2]> {
        let n = self.layers_per_chunk(depth);
        (0..self.virtual_stages)
            .map(|c| {
                let k = c * self.pipeline + stage;
                [k * n, (k + 1) * n]
            })
            .collect()
    }

    pub fn coords(&self, rank: u64) -> Coords {
        let data_rank = (rank % self.per_stage()) / self.tensor;
        Coords {
            tensor_rank: rank % self.tensor,
            pipeline_rank: rank / self.per_stage(),
            data_rank,
            expert_rank: data_rank % self.expert_group,
        }
    }

    /// The rank at the given coordinates (inverse of [`Grid::coords`]).
    pub fn rank(&self, tensor_rank: u64, data_rank: u64, pipeline_rank: u64) -> u64 {
        pipeline_rank * self.per_stage() + data_rank * self.tensor + tensor_rank
    }

    /// Data groups in Megatron's creation order (stage-major, then tensor rank).
    pub fn data_groups(&self) -> Vec<Vec<u64>> {
        let n = self.per_stage();
        let mut out = Vec::new();
        for i in 0..self.pipeline {
            for j in 0..self.tensor {
                out.push(
                    (i * n + j..(i + 1) * n)
                        .step_by(self.tensor as usize)
                        .collect(),
                );
            }
        }
        out
    }

    pub fn groups(&self) -> Groups {
        let w = self.world;
        let data = self.data_groups();
        let model = (0..self.data as usize)
            .map(|i| data.iter().map(|g| g[i]).collect())
            .collect();
        let tensor = (0..w / self.tensor)
            .map(|i| (i * self.tensor..(i + 1) * self.tensor).collect())
            .collect();
        let n = self.per_stage();
        let pipeline: Vec<Vec<u64>> = (0..n)
            .map(|i| (i..w).step_by(n as usize).collect())
            .collect();
        let embedding = pipeline
            .iter()
            .map(|g| {
                if g.len() > 1 {
                    vec![g[0], g[g.len() - 1]]
                } else {
                    g.clone()
                }
            })
            .collect();
        let e = self.expert_group as usize;
        let mut expert = Vec::new();
        let mut expert_data = Vec::new();
        for g in &data {
            for chunk in g.chunks(e) {
                expert.push(chunk.to_vec());
            }
            for k in 0..e {
                expert_data.push(g.iter().skip(k).step_by(e).copied().collect());
            }
        }
        let gate = (0..self.pipeline)
            .map(|s| (s * n..(s + 1) * n).collect())
            .collect();
        Groups {
            tensor,
            pipeline,
            data,
            model,
            expert,
            expert_data,
            gate,
            embedding,
        }
    }
}

/// Divisors of `n` in increasing order.
pub fn divisors(n: u64) -> Vec<u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d = 1u64;
    // `d <= n / d`, not `d * d <= n`: the square saturates at u64::MAX and never ends the
    // loop for n = u64::MAX.
    while d <= n / d {
        if n % d == 0 {
            small.push(d);
            if d != n / d {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// A kind of process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKind {
    Tensor,
    Pipeline,
    Data,
    Model,
    Expert,
    ExpertData,
    Gate,
    Embedding,
}

impl GroupKind {
    pub const ALL: [GroupKind; 8] = [
        GroupKind::Tensor,
        GroupKind::Pipeline,
        GroupKind::Data,
        GroupKind::Model,
        GroupKind::Expert,
        GroupKind::ExpertData,
        GroupKind::Gate,
        GroupKind::Embedding,
    ];
}

impl Groups {
    /// Every group of one kind.
    pub fn of_kind(&self, kind: GroupKind) -> &[Vec<u64>] {
        match kind {
            GroupKind::Tensor => &self.tensor,
            GroupKind::Pipeline => &self.pipeline,
            GroupKind::Data => &self.data,
            GroupKind::Model => &self.model,
            GroupKind::Expert => &self.expert,
            GroupKind::ExpertData => &self.expert_data,
            GroupKind::Gate => &self.gate,
            GroupKind::Embedding => &self.embedding,
        }
    }

    /// The group of `kind` that holds `rank` (`None` only for embedding groups, which
    /// hold first and last stages alone, or a rank outside the world).
    pub fn containing(&self, kind: GroupKind, rank: u64) -> Option<&[u64]> {
        self.of_kind(kind)
            .iter()
            .find(|g| g.contains(&rank))
            .map(Vec::as_slice)
    }
}

/// Which rank layout a plan's experts follow (the dense groups are the same in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// FastMoE on Megatron-LM v2.x: an expert group is a run of `g` consecutive members of one
    /// data group ([`Groups::expert`] of [`Grid::groups`]); tensor ranks never share one.
    #[default]
    Fastmoe,
    /// Megatron-Core's `parallel_state` (`initialize_model_parallel`, order `tp-cp-ep-dp-pp`,
    /// no context parallelism): the dense ranks as Megatron-LM v2.2 lays them out (`tp-dp-pp`),
    /// the experts on their own grid `tp-ep-dp-pp` of expert-tensor × expert-parallel ×
    /// expert-data ranks inside each pipeline stage ([`ExpertGrid`]).
    MegatronCore,
}

impl Layout {
    pub fn is_fastmoe(&self) -> bool {
        *self == Layout::Fastmoe
    }
}

/// Megatron-Core's expert grid. Within a pipeline stage of `W/p` ranks, local rank
/// `i = etp_rank + etp·ep_rank + etp·ep·edp_rank` (`etp` expert-tensor, `ep` expert-parallel and
/// `edp = W/(p·etp·ep)` expert-data ranks), as `RankGenerator(tp=etp, ep=ep, dp=edp, pp=p,
/// order='tp-ep-dp-pp')` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExpertGrid {
    /// Ranks that split one MoE layer's experts and exchange its tokens (all-to-all).
    pub expert_parallel: u64,
    /// Ranks that hold slices of the same experts (`hidden / expert_tensor` each).
    pub expert_tensor: u64,
}

impl ExpertGrid {
    /// Ranks holding the same expert slices (their expert gradients are summed there).
    pub fn expert_data(&self, grid: &Grid) -> u64 {
        grid.per_stage() / (self.expert_parallel * self.expert_tensor)
    }

    /// `(expert-parallel rank, expert-tensor rank)` of `rank`.
    pub fn coords(&self, grid: &Grid, rank: u64) -> (u64, u64) {
        let i = rank % grid.per_stage();
        (
            (i / self.expert_tensor) % self.expert_parallel,
            i % self.expert_tensor,
        )
    }

    /// The sizes of the grid's axes, fastest first: expert-tensor, expert-parallel,
    /// expert-data, pipeline.
    fn axes(&self, grid: &Grid) -> [u64; 4] {
        [
            self.expert_tensor,
            self.expert_parallel,
            self.expert_data(grid),
            grid.pipeline,
        ]
    }

    /// The expert-parallel groups, in the order Megatron-Core creates them.
    pub fn expert_groups(&self, grid: &Grid) -> Vec<Vec<u64>> {
        rank_groups(&self.axes(grid), [false, true, false, false])
    }

    /// The expert-tensor groups (ranks slicing the same experts).
    pub fn expert_tensor_groups(&self, grid: &Grid) -> Vec<Vec<u64>> {
        rank_groups(&self.axes(grid), [true, false, false, false])
    }

    /// The expert-data-parallel groups.
    pub fn expert_data_groups(&self, grid: &Grid) -> Vec<Vec<u64>> {
        rank_groups(&self.axes(grid), [false, false, true, false])
    }
}

/// The groups of the masked axes of a grid whose rank is `Σ index[i]·stride[i]` (axes fastest
/// first), as Megatron-Core's `generate_masked_orthogonal_rank_groups` lists them: one group per
/// combination of the other axes (the first of them fastest), its members along the masked
/// axes (the first of them fastest).
fn rank_groups(sizes: &[u64; 4], mask: [bool; 4]) -> Vec<Vec<u64>> {
    let mut strides = [1u64; 4];
    for i in 1..4 {
        strides[i] = strides[i - 1] * sizes[i - 1];
    }
    let pick = |want: bool| -> Vec<(u64, u64)> {
        (0..4)
            .filter(|&i| mask[i] == want)
            .map(|i| (sizes[i], strides[i]))
            .collect()
    };
    let (inside, outside) = (pick(true), pick(false));
    let offsets = |axes: &[(u64, u64)]| -> Vec<u64> {
        let count: u64 = axes.iter().map(|(n, _)| n).product();
        (0..count)
            .map(|mut k| {
                let mut at = 0;
                for (n, stride) in axes {
                    at += (k % n) * stride;
                    k /= n;
                }
                at
            })
            .collect()
    };
    let members = offsets(&inside);
    offsets(&outside)
        .into_iter()
        .map(|base| members.iter().map(|m| base + m).collect())
        .collect()
}
