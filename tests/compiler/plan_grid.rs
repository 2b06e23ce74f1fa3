//! The rank grid against an independent transcription of Megatron-LM v2.2's
//! `initialize_model_parallel` loops (megatron/mpu/initialize.py at 8aa4619f), for
//! every world size up to 64 and every valid (tensor, pipeline); and the expert groups
//! against FastMoE's definition.

use std::collections::BTreeSet;

use crate::plan_fixtures::*;
use fmoec::check::ExpertGroup;
use fmoec::plan::{self, Grid, Overrides};
use proptest::prelude::*;

/// The groups v2.2 creates, written as its Python loops are, in creation order.
struct V22 {
    data: Vec<Vec<u64>>,
    model: Vec<Vec<u64>>,
    tensor: Vec<Vec<u64>>,
    pipeline: Vec<Vec<u64>>,
    embedding: Vec<Vec<u64>>,
}

fn v22(world: u64, t: u64, p: u64) -> V22 {
    let d = world / (t * p);
    let num_pipeline_groups = world / p;
    let num_tensor_groups = world / t;
    let mut data = Vec::new();
    for i in 0..p {
        let start = i * num_pipeline_groups;
        let end = (i + 1) * num_pipeline_groups;
        for j in 0..t {
            let mut ranks = Vec::new();
            let mut r = start + j;
            while r < end {
                ranks.push(r);
                r += t;
            }
            data.push(ranks);
        }
    }
    let mut model = Vec::new();
    for i in 0..d as usize {
        model.push(data.iter().map(|g| g[i]).collect());
    }
    let mut tensor = Vec::new();
    for i in 0..num_tensor_groups {
        tensor.push((i * t..(i + 1) * t).collect());
    }
    let mut pipeline = Vec::new();
    let mut embedding = Vec::new();
    for i in 0..num_pipeline_groups {
        let mut ranks = Vec::new();
        let mut r = i;
        while r < world {
            ranks.push(r);
            r += num_pipeline_groups;
        }
        embedding.push(if ranks.len() > 1 {
            vec![ranks[0], ranks[ranks.len() - 1]]
        } else {
            ranks.clone()
        });
        pipeline.push(ranks);
    }
    V22 {
        data,
        model,
        tensor,
        pipeline,
        embedding,
    }
}

/// Each rank in exactly one group, and all ranks covered.
fn assert_partition(kind: &str, groups: &[Vec<u64>], world: u64) {
    let mut seen = BTreeSet::new();
    for g in groups {
        for r in g {
            assert!(seen.insert(*r), "{kind}: rank {r} in two groups");
        }
    }
    assert_eq!(seen, (0..world).collect(), "{kind}: not every rank");
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n).filter(|d| n % d == 0).collect()
}

#[test]
fn groups_equal_megatron_v2_2_for_every_world_up_to_64() {
    let mut cases = 0;
    for world in 1..=64u64 {
        for t in divisors(world) {
            for p in divisors(world / t) {
                let d = world / (t * p);
                let grid = Grid {
                    world,
                    tensor: t,
                    pipeline: p,
                    virtual_stages: 1,
                    data: d,
                    expert_group: d,
                };
                let g = grid.groups();
                let want = v22(world, t, p);
                assert_eq!(g.data, want.data, "data w={world} t={t} p={p}");
                assert_eq!(g.model, want.model, "model w={world} t={t} p={p}");
                assert_eq!(g.tensor, want.tensor, "tensor w={world} t={t} p={p}");
                assert_eq!(g.pipeline, want.pipeline, "pipeline w={world} t={t} p={p}");
                assert_eq!(
                    g.embedding, want.embedding,
                    "embedding w={world} t={t} p={p}"
                );
                for (kind, gs) in [
                    ("tensor", &g.tensor),
                    ("pipeline", &g.pipeline),
                    ("data", &g.data),
                    ("model", &g.model),
                    ("expert", &g.expert),
                    ("expert_data", &g.expert_data),
                    ("gate", &g.gate),
                ] {
                    assert_partition(kind, gs, world);
                }
                // Coordinates agree with group membership.
                for r in 0..world {
                    let c = grid.coords(r);
                    assert_eq!(g.tensor[(r / t) as usize][c.tensor_rank as usize], r);
                    assert_eq!(
                        g.data[(c.pipeline_rank * t + c.tensor_rank) as usize]
                            [c.data_rank as usize],
                        r
                    );
                    assert_eq!(
                        g.pipeline[(r % (world / p)) as usize][c.pipeline_rank as usize],
                        r
                    );
                    assert_eq!(grid.rank(c.tensor_rank, c.data_rank, c.pipeline_rank), r);
                }
                cases += 1;
            }
        }
    }
    // Sum over w ≤ 64 of the number of ordered pairs (t, p) with t·p | w.
    assert!(cases > 500, "only {cases} cases");
}

/// The docstring example of v2.2's initialize_model_parallel: 16 GPUs, t = 2, p = 4.
#[test]
fn megatron_docstring_example() {
    let g = Grid {
        world: 16,
        tensor: 2,
        pipeline: 4,
        virtual_stages: 1,
        data: 2,
        expert_group: 2,
    }
    .groups();
    let v = |x: &[&[u64]]| x.iter().map(|g| g.to_vec()).collect::<Vec<_>>();
    assert_eq!(
        g.data,
        v(&[
            &[0, 2],
            &[1, 3],
            &[4, 6],
            &[5, 7],
            &[8, 10],
            &[9, 11],
            &[12, 14],
            &[13, 15]
        ])
    );
    assert_eq!(
        g.tensor,
        v(&[
            &[0, 1],
            &[2, 3],
            &[4, 5],
            &[6, 7],
            &[8, 9],
            &[10, 11],
            &[12, 13],
            &[14, 15]
        ])
    );
    assert_eq!(
        g.pipeline,
        v(&[
            &[0, 4, 8, 12],
            &[1, 5, 9, 13],
            &[2, 6, 10, 14],
            &[3, 7, 11, 15]
        ])
    );
}

proptest! {
    /// Expert groups split each data group into consecutive runs of `size` data ranks;
    /// expert-data groups join the ranks at the same position of those runs. Each rank's
    /// experts come from its position, and every expert of a layer is held exactly once
    /// per expert group.
    #[test]
    fn expert_groups_and_placement(t_exp in 0u32..3, p_exp in 0u32..2, d_exp in 0u32..4, g_exp in 0u32..4, e_mul in 1u64..3) {
        let (t, p, d) = (1u64 << t_exp, 1u64 << p_exp, 1u64 << d_exp);
        let size = 1u64 << g_exp.min(d_exp);
        let world = t * p * d;
        let experts = size * e_mul * 2;
        let mut model = gpt_moe_small();
        for l in model.layers.iter_mut() {
            if let fmoec::check::Ffn::Moe(m) = &mut l.ffn {
                m.experts = experts;
                m.top_k = 2;
            }
        }
        let c = checked(model, parallel(world, t, p, ExpertGroup::Size { size }), None);
        let o = Overrides { micro_batch: Some(1), pipeline: Some(p), ..Overrides::default() };
        let plan = plan::build_with(&c, &o).map_err(|d| TestCaseError::fail(format!("{:?}", d[0].message)))?;
        prop_assert_eq!(plan.expert_group_size, size);
        for eg in &plan.groups.expert {
            prop_assert_eq!(eg.len() as u64, size);
            // Consecutive members of one data group.
            let dg = plan.groups.data.iter().find(|g| g.contains(&eg[0])).unwrap();
            let pos = dg.iter().position(|r| *r == eg[0]).unwrap();
            prop_assert_eq!(&dg[pos..pos + eg.len()], &eg[..]);
            // Together they hold each expert of each layer exactly once.
            for layer in plan.moe_layers.iter().filter(|m| m.stage == plan.ranks[eg[0] as usize].pipeline_rank) {
                let mut held: Vec<u64> = eg.iter().flat_map(|r| {
                    plan.ranks[*r as usize].experts.iter().find(|e| e.layer == layer.layer).unwrap().ids.clone()
                }).collect();
                held.sort();
                prop_assert_eq!(held, (0..experts).collect::<Vec<_>>());
            }
        }
        for edg in &plan.groups.expert_data {
            prop_assert_eq!(edg.len() as u64, d / size);
            let first = &plan.ranks[edg[0] as usize];
            for r in edg {
                prop_assert_eq!(&plan.ranks[*r as usize].experts, &first.experts);
            }
        }
        for (s, gate) in plan.groups.gate.iter().enumerate() {
            prop_assert!(gate.iter().all(|r| plan.ranks[*r as usize].pipeline_rank == s as u64));
            prop_assert_eq!(gate.len() as u64, world / p);
        }
    }
}

#[test]
fn containing_finds_each_ranks_group() {
    let g = Grid {
        world: 16,
        tensor: 2,
        pipeline: 2,
        virtual_stages: 1,
        data: 4,
        expert_group: 2,
    }
    .groups();
    use fmoec::plan::GroupKind;
    assert_eq!(g.containing(GroupKind::Data, 5), Some(&[1u64, 3, 5, 7][..]));
    assert_eq!(g.containing(GroupKind::Expert, 5), Some(&[5u64, 7][..]));
    assert_eq!(g.containing(GroupKind::ExpertData, 5), Some(&[1u64, 5][..]));
    assert_eq!(
        g.containing(GroupKind::Gate, 9),
        Some(&(8u64..16).collect::<Vec<_>>()[..])
    );
    assert_eq!(g.containing(GroupKind::Embedding, 3), Some(&[3u64, 11][..]));
    assert_eq!(g.containing(GroupKind::Tensor, 99), None);
    for kind in GroupKind::ALL {
        assert!(!g.of_kind(kind).is_empty());
    }
}
