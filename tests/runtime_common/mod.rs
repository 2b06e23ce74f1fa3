//! A hand-built checked model for the runtime tests (a small byte-level GPT with one dense
//! and one MoE block), independent of the front end.
#![allow(dead_code)]

use fmoec::check::*;

/// One libtorch thread: the tests' numbers do not depend on it, but on a busy 2-core machine
/// several OpenMP threads per test binary spin against each other and run 10-20x slower.
pub fn init() {
    tch::set_num_threads(1);
}

/// Checks a model file from `examples/` with the real front end.
pub fn example(name: &str) -> Checked {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut sources = fmoec::diag::Sources::new();
    let file = sources.add(path.clone(), text);
    let mut sink = fmoec::diag::Sink::new();
    let checked = fmoec::check::check_file(&mut sources, file, &mut sink);
    assert_eq!(sink.error_count(), 0, "{path} has errors");
    checked.expect("the example checks")
}

pub fn tiny_model(gate: GateKind) -> Model {
    let moe = Moe {
        experts: 4,
        top_k: if gate == GateKind::Switch { 1 } else { 2 },
        gate: Gate {
            kind: gate,
            capacity: match gate {
                GateKind::Gshard | GateKind::Switch => Some(Capacity {
                    train: 1.25,
                    eval: 2.0,
                }),
                _ => None,
            },
            balance_loss: 0.01,
            jitter: if gate == GateKind::Switch { 0.01 } else { 0.0 },
            random_routing: gate == GateKind::Gshard,
            span: Default::default(),
        },
        expert: Mlp {
            hidden: 64,
            act: Activation::Gelu,
            span: Default::default(),
        },
        shared: None,
        spans: Default::default(),
    };
    Model {
        name: "tiny".into(),
        vocab: 256,
        context: 64,
        width: 64,
        attention: Attention {
            heads: 4,
            kv_heads: 4,
            head_dim: 16,
            causal: true,
        },
        norm: Norm::LayerNorm,
        positions: Positions::Learned,
        tied_embeddings: true,
        bias: true,
        layers: vec![
            Layer {
                index: 0,
                ffn: Ffn::Dense(Mlp {
                    hidden: 256,
                    act: Activation::Gelu,
                    span: Default::default(),
                }),
                span: Default::default(),
            },
            Layer {
                index: 1,
                ffn: Ffn::Moe(moe),
                span: Default::default(),
            },
        ],
        spans: Default::default(),
    }
}

pub fn hardware() -> Hardware {
    Hardware {
        name: "cpu".into(),
        memory_bytes: 1 << 34,
        bf16_tflops: 1.0,
        fp16_tflops: 1.0,
        fp32_tflops: 1.0,
        fp8_tflops: None,
        hbm_gbps: 10.0,
        nvlink_gbps: 0.0,
        network_gbps: 0.0,
        gpus_per_node: 1,
    }
}

pub fn tiny_checked(gate: GateKind, steps: u64, data: DataSource) -> Checked {
    Checked {
        model: tiny_model(gate),
        parallel: Parallel {
            declared: false,
            gpus: 1,
            hardware: hardware(),
            tensor: 1,
            pipeline: 1,
            data: 1,
            experts: ExpertGroup::Replicated,
            expert_slicing: false,
            micro_batch: Some(8),
            smart_schedule: SmartSchedule::Off,
            shadowing: Shadowing::Off,
            virtual_stages: 1,
            spans: Default::default(),
        },
        train: Some(Train {
            data,
            batch_sequences: 16,
            seq_len: 64,
            steps,
            optimizer: Optimizer::Adamw {
                lr: 3e-3,
                betas: (0.9, 0.95),
                eps: 1e-8,
                weight_decay: 0.1,
            },
            schedule: Schedule::Cosine {
                warmup: 10,
                min_lr_ratio: 0.1,
            },
            clip_grad: Some(1.0),
            precision: Precision::Fp32,
            checkpoint: Some(CheckpointPolicy {
                every: 5,
                dir: "ckpt".into(),
                keep: 0,
            }),
            eval: Some(EvalPolicy {
                every: 50,
                batches: 2,
            }),
            seed: 1234,
            init: None,
            spans: Default::default(),
        }),
    }
}
