//! A checked model built by hand (the tests do not depend on the front end): a small GPT
//! with MoE layers, the shape the Megatron harness trains.

#![allow(dead_code)]

use fmoec::check::*;

pub fn hardware() -> Hardware {
    Hardware {
        name: "h100_sxm".into(),
        memory_bytes: 80 << 30,
        bf16_tflops: 989.0,
        fp16_tflops: 989.0,
        fp32_tflops: 67.0,
        fp8_tflops: None,
        hbm_gbps: 3350.0,
        nvlink_gbps: 450.0,
        network_gbps: 50.0,
        gpus_per_node: 8,
    }
}

pub fn gate(kind: GateKind) -> Gate {
    let capacity = match kind {
        GateKind::Gshard | GateKind::Switch => Some(Capacity {
            train: 1.2,
            eval: 2.4,
        }),
        _ => None,
    };
    Gate {
        kind,
        capacity,
        balance_loss: 0.01,
        jitter: if kind == GateKind::Switch { 0.1 } else { 0.0 },
        random_routing: kind == GateKind::Gshard,
        span: Default::default(),
    }
}

/// `depth` layers of width 64; every odd layer is MoE with `experts` experts and `kind` gate.
pub fn checked(gpus: u64, tensor: u64, pipeline: u64, experts: u64, kind: GateKind) -> Checked {
    let width = 64;
    let depth = 4;
    let top_k = match kind {
        GateKind::Switch => 1,
        _ => 2,
    };
    let layers = (0..depth)
        .map(|i| Layer {
            index: i,
            ffn: if i % 2 == 1 {
                Ffn::Moe(Moe {
                    experts,
                    top_k,
                    gate: gate(kind),
                    expert: Mlp {
                        hidden: 128,
                        act: Activation::Gelu,
                        span: Default::default(),
                    },
                    shared: None,
                    spans: Default::default(),
                })
            } else {
                Ffn::Dense(Mlp {
                    hidden: 4 * width,
                    act: Activation::Gelu,
                    span: Default::default(),
                })
            },
            span: Default::default(),
        })
        .collect();
    let data = gpus / (tensor * pipeline);
    Checked {
        model: Model {
            name: "tiny_moe".into(),
            vocab: 50304,
            context: 128,
            width,
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
            layers,
            spans: Default::default(),
        },
        parallel: Parallel {
            declared: true,
            gpus,
            hardware: hardware(),
            tensor,
            pipeline,
            data,
            experts: ExpertGroup::AcrossData,
            expert_slicing: tensor > 1,
            micro_batch: Some(2),
            smart_schedule: SmartSchedule::Off,
            shadowing: Shadowing::Off,
            virtual_stages: 1,
            spans: Default::default(),
        },
        train: Some(Train {
            data: DataSource::Megatron("data/my-corpus_text_document".into()),
            batch_sequences: 8 * data,
            seq_len: 128,
            steps: 100,
            optimizer: Optimizer::Adamw {
                lr: 3e-4,
                betas: (0.9, 0.95),
                eps: 1e-8,
                weight_decay: 0.1,
            },
            schedule: Schedule::Cosine {
                warmup: 10,
                min_lr_ratio: 0.1,
            },
            clip_grad: Some(1.0),
            precision: Precision::Fp16,
            checkpoint: Some(CheckpointPolicy {
                every: 50,
                dir: "ckpt".into(),
                keep: 0,
            }),
            eval: None,
            seed: 1234,
            init: None,
            spans: Default::default(),
        }),
    }
}

/// The folder the snapshot tests emit "from": train.sh writes the model file's relative data
/// path absolute, and a snapshot must not hold the path of the checkout the tests run in.
pub const WORKING_DIR: &str = "/where/fmoec/ran";

/// `fmoec emit --megatron version` of a hand-built model: its plan, then the files. Relative
/// paths are taken from [`WORKING_DIR`] unless `opts` names a folder.
pub fn emit(
    c: &Checked,
    version: &str,
    opts: &fmoec::emit::EmitOptions,
) -> Result<fmoec::emit::Emitted, fmoec::emit::EmitError> {
    let target = fmoec::emit::registry::find(version).expect("a declared target");
    let plan =
        fmoec::emit::plan_for(c, &target).unwrap_or_else(|ds| panic!("the fixture plans: {ds:?}"));
    let opts = fmoec::emit::EmitOptions {
        relative_to: Some(opts.relative_to.clone().unwrap_or(WORKING_DIR.into())),
        ..opts.clone()
    };
    fmoec::emit::emit(c, &plan, &target, &opts)
}
