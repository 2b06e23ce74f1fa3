//! Megatron-LM v2.2's rank layout and FastMoE's expert placement, as far as the emitter
//! needs them (launch arguments, the README's placement table, experts per rank).
//!
//! Kept small and isolated on purpose: the planner (`plan`) owns the full layout; once its
//! `ParallelPlan` is available this module is replaced by reading it. Knows nothing about
//! templates or files.

use crate::check::{ExpertGroup, Parallel};

/// Process groups of one Megatron v2.2 launch (`mpu/initialize.py`), rank lists in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub world: u64,
    pub tensor: u64,
    pub pipeline: u64,
    pub data: u64,
    /// Consecutive ranks `[i·t, (i+1)·t)`.
    pub tensor_groups: Vec<Vec<u64>>,
    /// Strided ranks `range(i, W, W/p)`.
    pub pipeline_groups: Vec<Vec<u64>>,
    /// For stage s and tensor rank j: `range(s·W/p + j, (s+1)·W/p, t)`.
    pub data_groups: Vec<Vec<u64>>,
    /// Ranks that split one MoE layer's experts between them (all-to-all group).
    pub expert_groups: Vec<Vec<u64>>,
    /// All ranks of one pipeline stage: the gate's all-reduce group.
    pub gate_groups: Vec<Vec<u64>>,
    /// Ranks in one expert group.
    pub expert_group_size: u64,
}

impl Layout {
    /// The layout of `parallel` (sizes already checked to multiply to `gpus`).
    pub fn new(parallel: &Parallel) -> Layout {
        let (w, t, p) = (parallel.gpus, parallel.tensor, parallel.pipeline);
        let d = parallel.data;
        let stage = w / p;
        let tensor_groups = (0..w / t).map(|i| (i * t..(i + 1) * t).collect()).collect();
        let pipeline_groups = (0..stage)
            .map(|i| (i..w).step_by(stage as usize).collect())
            .collect();
        let mut data_groups = Vec::new();
        for s in 0..p {
            for j in 0..t {
                data_groups.push(
                    (s * stage + j..(s + 1) * stage)
                        .step_by(t as usize)
                        .collect(),
                );
            }
        }
        let expert_group_size = expert_group_size(parallel.experts, d);
        let expert_groups = data_groups
            .iter()
            .flat_map(|g: &Vec<u64>| g.chunks(expert_group_size as usize).map(|c| c.to_vec()))
            .collect();
        let gate_groups = (0..p)
            .map(|s| (s * stage..(s + 1) * stage).collect())
            .collect();
        Layout {
            world: w,
            tensor: t,
            pipeline: p,
            data: d,
            tensor_groups,
            pipeline_groups,
            data_groups,
            expert_groups,
            gate_groups,
            expert_group_size,
        }
    }
}

/// Ranks sharing one layer's experts.
pub fn expert_group_size(group: ExpertGroup, data: u64) -> u64 {
    match group {
        ExpertGroup::AcrossData => data,
        ExpertGroup::Size { size } => size,
        ExpertGroup::Replicated => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Hardware, ParallelSpans};

    fn parallel(gpus: u64, tensor: u64, pipeline: u64, experts: ExpertGroup) -> Parallel {
        Parallel {
            declared: true,
            gpus,
            hardware: Hardware {
                name: "test".into(),
                memory_bytes: 0,
                bf16_tflops: 0.0,
                fp8_tflops: None,
                fp16_tflops: 0.0,
                fp32_tflops: 0.0,
                hbm_gbps: 0.0,
                nvlink_gbps: 0.0,
                network_gbps: 0.0,
                gpus_per_node: 8,
            },
            tensor,
            pipeline,
            data: gpus / (tensor * pipeline),
            experts,
            expert_slicing: tensor > 1,
            micro_batch: None,
            spans: ParallelSpans::default(),
        }
    }

    #[test]
    fn megatron_v22_groups_for_16_gpus_t2_p2() {
        // The example in Megatron's mpu/initialize.py docstring.
        let l = Layout::new(&parallel(16, 2, 2, ExpertGroup::AcrossData));
        assert_eq!(l.tensor_groups[0], vec![0, 1]);
        assert_eq!(l.tensor_groups[7], vec![14, 15]);
        assert_eq!(l.pipeline_groups[0], vec![0, 8]);
        assert_eq!(l.pipeline_groups[7], vec![7, 15]);
        assert_eq!(
            l.data_groups,
            vec![
                vec![0, 2, 4, 6],
                vec![1, 3, 5, 7],
                vec![8, 10, 12, 14],
                vec![9, 11, 13, 15]
            ]
        );
        assert_eq!(l.expert_groups, l.data_groups);
        assert_eq!(
            l.gate_groups,
            vec![(0..8).collect::<Vec<_>>(), (8..16).collect()]
        );
    }

    #[test]
    fn expert_sub_groups_split_each_data_group() {
        let l = Layout::new(&parallel(8, 1, 1, ExpertGroup::Size { size: 4 }));
        assert_eq!(l.expert_groups, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        let r = Layout::new(&parallel(4, 1, 1, ExpertGroup::Replicated));
        assert_eq!(r.expert_groups.len(), 4);
    }
}
