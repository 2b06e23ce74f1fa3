//! The planner's groups against what Megatron-LM v2.2's own `initialize_model_parallel`
//! creates. `tests/megatron/v22_groups.json` was recorded by running the real
//! `megatron/mpu/initialize.py` (commit 8aa4619f) with torch.distributed replaced by a
//! recorder (`tests/megatron/v22_groups.py`), for every world up to 16 and every valid
//! (tensor, pipeline): the `new_group` calls in the order v2.2 makes them.

use fmoec::plan::Grid;
use serde_json::Value;

#[test]
fn groups_equal_megatron_v2_2_new_group_calls() {
    let text = include_str!("megatron/v22_groups.json");
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
