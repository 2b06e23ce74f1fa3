//! Hand-built checked models for the planner tests (used until, and beside, the real
//! examples parsed by the front end).
#![allow(dead_code)]

use fmoec::check::*;
use fmoec::diag::{FileId, Span};

/// Distinct fake spans so tests can tell which value a diagnostic points at.
pub fn span(n: usize) -> Span {
    Span::new(FileId(0), n * 10, n * 10 + 5)
}

pub const S_GPUS: usize = 1;
pub const S_TENSOR: usize = 2;
pub const S_PIPELINE: usize = 3;
pub const S_EXPERTS_GROUP: usize = 4;
pub const S_HEADS: usize = 5;
pub const S_DEPTH: usize = 6;
pub const S_MOE_EXPERTS: usize = 7;
pub const S_MLP: usize = 8;
pub const S_EXPERT_MLP: usize = 9;
pub const S_HARDWARE: usize = 10;
pub const S_BATCH: usize = 11;

/// NVIDIA H100 SXM5 80GB: 989.4 dense bf16/fp16 TFLOP/s, 67 fp32 (non-tensor) TFLOP/s,
/// 3.35 TB/s HBM3, NVLink 4 450 GB/s per direction, one 400 Gb/s NIC per GPU (50 GB/s).
pub fn h100() -> Hardware {
    Hardware {
        name: "h100_sxm".into(),
        memory_bytes: 80 * (1 << 30),
        bf16_tflops: 989.4,
        fp16_tflops: 989.4,
        fp32_tflops: 66.9,
        fp8_tflops: None,
        hbm_gbps: 3350.0,
        nvlink_gbps: 450.0,
        network_gbps: 50.0,
        gpus_per_node: 8,
    }
}

pub fn parallel(gpus: u64, tensor: u64, pipeline: u64, experts: ExpertGroup) -> Parallel {
    Parallel {
        declared: true,
        gpus,
        hardware: h100(),
        tensor,
        pipeline,
        data: gpus / (tensor * pipeline).max(1),
        experts,
        expert_slicing: true,
        micro_batch: None,
        smart_schedule: SmartSchedule::Off,
        shadowing: Shadowing::Off,
        virtual_stages: 1,
        spans: ParallelSpans {
            block: span(0),
            gpus: span(S_GPUS),
            hardware: span(S_HARDWARE),
            tensor: span(S_TENSOR),
            pipeline: span(S_PIPELINE),
            data: span(0),
            experts: span(S_EXPERTS_GROUP),
            micro_batch: span(12),
            smart_schedule: span(0),
            shadowing: span(0),
            virtual_stages: span(0),
        },
    }
}

pub fn mlp(hidden: u64, act: Activation, at: usize) -> Mlp {
    Mlp {
        hidden,
        act,
        span: span(at),
    }
}

/// A GPT-2-shaped model (LayerNorm, learned positions, biases, GELU MLP of 4×width).
pub fn gpt(name: &str, vocab: u64, width: u64, heads: u64, depth: usize, tied: bool) -> Model {
    Model {
        name: name.into(),
        vocab,
        context: 1024,
        width,
        attention: Attention {
            heads,
            kv_heads: heads,
            head_dim: width / heads,
            causal: true,
        },
        norm: Norm::LayerNorm,
        positions: Positions::Learned,
        tied_embeddings: tied,
        bias: true,
        layers: (0..depth)
            .map(|index| Layer {
                index,
                ffn: Ffn::Dense(mlp(4 * width, Activation::Gelu, S_MLP)),
                span: span(S_MLP),
            })
            .collect(),
        spans: ModelSpans {
            name: span(0),
            vocab: span(0),
            context: span(0),
            width: span(0),
            heads: span(S_HEADS),
            depth: span(S_DEPTH),
        },
    }
}

pub fn gshard_moe(experts: u64, top_k: u64, hidden: u64) -> Moe {
    Moe {
        experts,
        top_k,
        gate: Gate {
            kind: GateKind::Gshard,
            capacity: Some(Capacity {
                train: 1.2,
                eval: 2.4,
            }),
            balance_loss: 0.01,
            jitter: 0.0,
            random_routing: true,
            span: span(13),
        },
        expert: mlp(hidden, Activation::Gelu, S_EXPERT_MLP),
        shared: None,
        spans: MoeSpans {
            call: span(14),
            experts: span(S_MOE_EXPERTS),
            top_k: span(15),
        },
    }
}

/// DESIGN.md's gpt_moe_small: GPT-2 small shape, vocab 50304, every second block an MoE
/// of 32 experts, top-2 GShard, expert hidden 4·768/2.
pub fn gpt_moe_small() -> Model {
    let mut m = gpt("gpt_moe_small", 50304, 768, 12, 12, true);
    for l in m.layers.iter_mut().skip(1).step_by(2) {
        l.ffn = Ffn::Moe(gshard_moe(32, 2, 1536));
    }
    m
}

pub fn train(batch_sequences: u64, seq_len: u64, precision: Precision) -> Train {
    Train {
        data: DataSource::Builtin("tiny-shakespeare".into()),
        batch_sequences,
        seq_len,
        steps: 10,
        optimizer: Optimizer::Adamw {
            lr: 3e-4,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
        },
        schedule: Schedule::Constant { warmup: 0 },
        clip_grad: Some(1.0),
        precision,
        checkpoint: None,
        eval: None,
        seed: 1,
        init: None,
        spans: TrainSpans {
            batch: span(S_BATCH),
            ..TrainSpans::default()
        },
    }
}

pub fn checked(model: Model, parallel: Parallel, train: Option<Train>) -> Checked {
    Checked {
        model,
        parallel,
        train,
    }
}
