//! The planner's groups against what Megatron-LM v2.2's own `initialize_model_parallel`
//! creates. `tests/megatron/v22_groups.json` was recorded by running the real
//! `megatron/mpu/initialize.py` (commit 8aa4619f) with torch.distributed replaced by a
//! recorder (`tests/megatron/v22_groups.py`), for every world up to 16 and every valid
//! (tensor, pipeline): the `new_group` calls in the order v2.2 makes them.

use fmoec::plan::Grid;
use serde_json::Value;

#[test]
fn groups_equal_megatron_v2_2_new_group_calls() {
    let text = include_str!("../megatron/v22_groups.json");
    let cases: Vec<Value> = serde_json::from_str(text).unwrap();
    assert_eq!(cases.len(), 110);
    for case in cases {
        let n = |k: &str| case[k].as_u64().unwrap();
        let (world, tensor, pipeline) = (n("world"), n("tensor"), n("pipeline"));
        let data = world / (tensor * pipeline);
        let g = Grid {
            world,
            tensor,
            pipeline,
            virtual_stages: 1,
            data,
            expert_group: data,
        }
        .groups();
        // v2.2's order: data groups, model groups, tensor groups, then each pipeline
        // group followed by its embedding group.
        let mut ours: Vec<Vec<u64>> = Vec::new();
        ours.extend(g.data.iter().cloned());
        ours.extend(g.model.iter().cloned());
        ours.extend(g.tensor.iter().cloned());
        for (p, e) in g.pipeline.iter().zip(&g.embedding) {
            ours.push(p.clone());
            ours.push(e.clone());
        }
        let theirs: Vec<Vec<u64>> =
            serde_json::from_value(case["new_group_calls"].clone()).unwrap();
        assert_eq!(
            ours, theirs,
            "world {world} tensor {tensor} pipeline {pipeline}"
        );
    }
}

/// The planner's Megatron-Core layout against the groups Megatron-Core's own
/// `initialize_model_parallel` (core_v0.19.0) creates. `tests/megatron_core/core_groups.json`
/// was recorded by running it with torch.distributed replaced by a recorder
/// (`tests/megatron_core/core_groups.py`) for every tensor, pipeline, expert-parallel and
/// expert-tensor size (1 or the tensor size) of the worlds 1, 2, 3, 4, 6, 8, 12 and 16: each
/// kind of group in the order Megatron creates it.
#[test]
fn groups_equal_megatron_core_initialize_model_parallel() {
    use fmoec::plan::ExpertGrid;
    let text = include_str!("../megatron_core/core_groups.json");
    let cases: Vec<Value> = serde_json::from_str(text).unwrap();
    assert_eq!(cases.len(), 270);
    for case in cases {
        let n = |k: &str| case[k].as_u64().unwrap();
        let (world, tensor, pipeline) = (n("world"), n("tensor"), n("pipeline"));
        let (ep, etp) = (n("expert_parallel"), n("expert_tensor"));
        let grid = Grid {
            world,
            tensor,
            pipeline,
            virtual_stages: 1,
            data: world / (tensor * pipeline),
            expert_group: ep,
        };
        let dense = grid.groups();
        let experts = ExpertGrid {
            expert_parallel: ep,
            expert_tensor: etp,
        };
        let ours = [
            ("tensor", dense.tensor.clone()),
            ("pipeline", dense.pipeline.clone()),
            ("data", dense.data.clone()),
            ("model", dense.model.clone()),
            ("embedding", dense.embedding.clone()),
            ("expert", experts.expert_groups(&grid)),
            ("expert_tensor", experts.expert_tensor_groups(&grid)),
            ("expert_data", experts.expert_data_groups(&grid)),
        ];
        let what = format!("world {world} tensor {tensor} pipeline {pipeline} expert {ep} x {etp}");
        for (kind, groups) in ours {
            let theirs: Vec<Vec<u64>> =
                serde_json::from_value(case["groups"][kind].clone()).unwrap();
            assert_eq!(groups, theirs, "{kind} groups, {what}");
        }
        // every rank's coordinates name its place in those groups
        for rank in 0..world {
            let (e, s) = experts.coords(&grid, rank);
            let expert_group = experts
                .expert_groups(&grid)
                .into_iter()
                .find(|g| g.contains(&rank))
                .unwrap();
            assert_eq!(expert_group[e as usize], rank, "{what}");
            let slices = experts
                .expert_tensor_groups(&grid)
                .into_iter()
                .find(|g| g.contains(&rank))
                .unwrap();
            assert_eq!(slices[s as usize], rank, "{what}");
        }
    }
}
