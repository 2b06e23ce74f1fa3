//! Memory and traffic figures worked by hand.

use crate::plan_fixtures::*;
use fmoec::check::{ExpertGroup, Ffn, Precision, Shadowing, SmartSchedule};
use fmoec::plan::{self, MemoryModel, Overrides};

/// GPT-2 small (tied, vocab 50257) on one H100, bf16, 8 sequences of 1024 per step,
/// micro-batch 8 (one micro-batch).
///
/// Parameters on the rank: Megatron pads the vocabulary to a multiple of 128·t = 128:
/// 50304, so 124,439,808 + (50304 − 50257)·768 = 124,475,904.
///   weights   2 B × 124,475,904 =   248,951,808
///   grads     2 B × 124,475,904 =   248,951,808
///   optimizer 12 B × 124,475,904 = 1,493,710,848 (fp32 master 4 + Adam m 4 + v 4)
/// Activations (Korthikanti et al. 2022, t = 1): per block s·b·h·34 + 5·a·s²·b with
/// s = 1024, b = 8, h = 768, a = 12 heads:
///   sbh = 8192·768 = 6,291,456; 34·sbh = 213,909,504; 5·12·1024²·8 = 503,316,480;
///   per block 717,225,984; 12 blocks 8,606,711,808;
///   last stage: final-norm input 2·sbh = 12,582,912 and fp32 logits
///   4·8192·50304 = 1,648,361,472;
///   total 10,267,656,192, one micro-batch in flight.
/// Total 248,951,808·2 + 1,493,710,848 + 10,267,656,192 = 12,259,270,656.
#[test]
fn gpt2_small_memory_by_hand() {
    let c = checked(
        gpt("gpt2", 50257, 768, 12, 12, true),
        parallel(1, 1, 1, ExpertGroup::AcrossData),
        Some(train(8, 1024, Precision::Bf16)),
    );
    let o = Overrides {
        micro_batch: Some(8),
        ..Overrides::default()
    };
    let p = plan::build_with(&c, &o).unwrap();
    let m = &p.stages[0].cost.memory;
    assert_eq!(p.stages[0].cost.params.total, 124_475_904);
    assert_eq!(m.weights, 248_951_808);
    assert_eq!(m.grads, 248_951_808);
    assert_eq!(m.optimizer, 1_493_710_848);
    assert_eq!(m.activations_per_micro_batch, 10_267_656_192);
    assert_eq!(m.in_flight, 1);
    assert_eq!(m.total, 12_259_270_656);
    assert_eq!(p.ranks[0].memory_bytes, 12_259_270_656);
}

/// The same model as `fmoec run` trains it (`--memory-model fmoec`), micro-batch 8 of 1024
/// tokens (sb = 8192), bf16 compute:
/// - weights: 124,475,904 params × (4 B fp32 master + 2 B bf16 copy) = 746,855,424;
///   gradients × 4 B = 497,903,616; Adam moments × 8 B = 995,807,232;
/// - per block: 2 B · 8192 · (4·768 norms + 2·768 attention out and projection input +
///   3·768 Q K V) + 4 B · 12 heads · 8192 log-sum-exp = 113,639,424, and the MLP's two
///   internals 2 · 2 B · 8192 · 3072 = 100,663,296; 12 blocks: 2,571,632,640;
/// - head: final norm in and out 2 · 2 B · 8192 · 768 = 25,165,824, fp32 logits, their
///   log-softmax and gradient 12 B · 8192 · 50257 = 4,940,464,128;
/// - total 9,777,828,864.
#[test]
fn gpt2_small_memory_of_fmoec_run_by_hand() {
    let c = checked(
        gpt("gpt2", 50257, 768, 12, 12, true),
        parallel(1, 1, 1, ExpertGroup::AcrossData),
        Some(train(8, 1024, Precision::Bf16)),
    );
    let o = Overrides {
        micro_batch: Some(8),
        memory_model: Some(MemoryModel::Fmoec),
        ..Overrides::default()
    };
    let p = plan::build_with(&c, &o).unwrap();
    let m = &p.stages[0].cost.memory;
    assert_eq!(m.model, MemoryModel::Fmoec);
    assert_eq!(m.weights, 746_855_424);
    assert_eq!(m.grads, 497_903_616);
    assert_eq!(m.optimizer, 995_807_232);
    assert_eq!(m.activations_per_micro_batch, 7_537_262_592);
    assert_eq!(m.total, 9_777_828_864);
}

/// gpt_moe_small on 16 H100s, tensor 2, pipeline 1, experts across data (8 ranks),
/// micro-batch 4 of 1024 tokens, 32 sequences per step (one micro-batch per rank).
///
/// All-to-all of one MoE layer, one micro-batch, one rank, forward: each of the
/// T = 4·1024 = 4096 tokens goes to k = 2 experts; with balanced routing 7/8 of the
/// assignments leave the rank, each a 768-wide bf16 row, and come back after the experts:
///   2 (dispatch + combine) · 2 · 4096 · 768 · 2 B · 7/8 = 22,020,096 bytes;
/// backward moves the same gradients: 22,020,096.
/// Tensor all-reduces per step: 4 per block (2 forward, 2 backward; MoE blocks too,
/// experts being sliced) + 1 embedding + 1 head = 50 messages of T·h·2 B = 6,291,456:
///   314,572,800 bytes.
#[test]
fn moe_traffic_by_hand() {
    let c = checked(
        gpt_moe_small(),
        parallel(16, 2, 1, ExpertGroup::AcrossData),
        Some(train(32, 1024, Precision::Bf16)),
    );
    let o = Overrides {
        micro_batch: Some(4),
        ..Overrides::default()
    };
    let p = plan::build_with(&c, &o).unwrap();
    assert_eq!(p.micro_batches, 1);
    let t = &p.stages[0].cost.traffic;
    assert_eq!(t.all_to_all.len(), 6);
    for x in &t.all_to_all {
        assert_eq!(x.fwd_bytes, 22_020_096);
        assert_eq!(x.bwd_bytes, 22_020_096);
    }
    assert_eq!(t.all_to_all_bytes, 6 * 2 * 22_020_096);
    assert_eq!(t.tensor_allreduce_bytes, 314_572_800);
    assert_eq!(t.pipeline_send_bytes, 0);
    // Each rank holds 32/8 = 4 experts per MoE layer, half of each expert's hidden.
    assert_eq!(p.moe_layers[0].experts_per_rank, 4);
    assert_eq!(p.moe_layers[0].hidden_per_rank, 768);
    let r5 = &p.ranks[5];
    assert_eq!((r5.tensor_rank, r5.data_rank, r5.expert_rank), (1, 2, 2));
    assert_eq!(r5.experts[0].ids, vec![8, 9, 10, 11]);
    assert_eq!(r5.experts[0].hidden, [768, 1536]);
    // Expert-data groups are single ranks, so no expert gradient all-reduce.
    assert_eq!(t.expert_data_allreduce_bytes, 0);
    assert!(p.groups.expert_data.iter().all(|g| g.len() == 1));
    assert_eq!(p.groups.expert[0], vec![0, 2, 4, 6, 8, 10, 12, 14]);
}

#[test]
fn pipeline_stages_hold_their_layers_and_in_flight_micro_batches() {
    let c = checked(
        gpt_moe_small(),
        parallel(8, 1, 4, ExpertGroup::AcrossData),
        Some(train(64, 1024, Precision::Bf16)),
    );
    let o = Overrides {
        micro_batch: Some(2),
        ..Overrides::default()
    };
    let p = plan::build_with(&c, &o).unwrap();
    assert_eq!(p.micro_batches, 16);
    let in_flight: Vec<u64> = p.stages.iter().map(|s| s.cost.memory.in_flight).collect();
    assert_eq!(in_flight, [4, 3, 2, 1]);
    assert_eq!((p.stages[1].first_layer, p.stages[1].end_layer), (3, 6));
    // Every rank of stage 1 holds layers 3 and 5's experts only.
    let held: Vec<usize> = p.ranks[2].experts.iter().map(|e| e.layer).collect();
    assert_eq!(held, [3, 5]);
    // Middle stages send forward activations and backward gradients both ways.
    let t = &p.stages[1].cost.traffic;
    assert_eq!(t.pipeline_send_bytes, 2 * 16 * 2 * 1024 * 768 * 2);
    // Tied embeddings are all-reduced between first and last stage only.
    assert!(p.stages[0].cost.traffic.embedding_allreduce_bytes > 0);
    assert_eq!(p.stages[1].cost.traffic.embedding_allreduce_bytes, 0);
    assert_eq!(p.time.bubble_fraction, 3.0 / 19.0);
}

/// The same pipeline with 3 model chunks per stage (one block each, Megatron-LM's interleaved
/// schedule): stage 1 holds blocks 1, 5 and 9 (virtual stages 1, 5, 9); every chunk sends
/// its output on and its input's gradient back, so a middle stage moves 3 times the
/// activations; the bubble shrinks to (p − 1)/(v·m + p − 1) = 3/51 and the step to
/// (m + (p − 1)/v) micro-batch times; the first stage keeps (p − 1)·2 + (v − 1)·p + 1 = 15
/// chunks in flight (5 micro-batches' activations).
#[test]
fn interleaved_stages_hold_chunks_and_shrink_the_bubble() {
    let mut c = checked(
        gpt_moe_small(),
        parallel(8, 1, 4, ExpertGroup::AcrossData),
        Some(train(64, 1024, Precision::Bf16)),
    );
    c.parallel.virtual_stages = 3;
    let o = Overrides {
        micro_batch: Some(2),
        ..Overrides::default()
    };
    let p = plan::build_with(&c, &o).unwrap();
    assert_eq!((p.virtual_stages, p.micro_batches), (3, 16));
    assert_eq!(p.stages[1].chunks, vec![[1, 2], [5, 6], [9, 10]]);
    assert_eq!((p.stages[1].first_layer, p.stages[1].end_layer), (1, 2));
    let held: Vec<usize> = p.ranks[2].experts.iter().map(|e| e.layer).collect();
    assert_eq!(held, [1, 5, 9]);
    let msg = 2 * 1024 * 768 * 2;
    assert_eq!(
        p.stages[1].cost.traffic.pipeline_send_bytes,
        6 * 16 * msg,
        "3 chunks, each sending both ways"
    );
    assert_eq!(p.stages[0].cost.traffic.pipeline_send_bytes, 5 * 16 * msg);
    assert_eq!(p.time.bubble_fraction, 3.0 / 51.0);
    let slowest = p
        .stages
        .iter()
        .map(|s| s.cost.time.micro_batch_s)
        .fold(0.0, f64::max);
    let sync = p
        .stages
        .iter()
        .map(|s| s.cost.time.gradient_sync_s)
        .fold(0.0, f64::max);
    assert!((p.time.step_s - (17.0 * slowest + sync)).abs() < 1e-12 * p.time.step_s);
    let m = &p.stages[0].cost.memory;
    assert_eq!(m.in_flight, 15);
    assert_eq!(m.activations, m.activations_per_micro_batch * 15 / 3);
    // the JSON says so; without virtual stages it keeps its former shape
    let json = plan::render::json(&p);
    assert!(json.contains("\"virtual_stages\": 3") && json.contains("\"chunks\""));
    c.parallel.virtual_stages = 1;
    let plain = plan::render::json(&plan::build_with(&c, &o).unwrap());
    assert!(!plain.contains("virtual_stages") && !plain.contains("chunks"));
    // the table says which schedule
    let table = plan::render::table(&p);
    assert!(
        table.contains("schedule:  interleaved 1F1B, 3 model chunks per stage")
            && table.contains("1..2,5..6,9..10"),
        "{table}"
    );
}

#[test]
fn planner_chooses_micro_batch_and_is_deterministic() {
    let c = checked(
        gpt_moe_small(),
        parallel(16, 2, 1, ExpertGroup::AcrossData),
        Some(train(256, 1024, Precision::Bf16)),
    );
    let a = plan::build(&c).unwrap();
    let b = plan::build(&c).unwrap();
    assert_eq!(plan::render::json(&a), plan::render::json(&b));
    assert_eq!(plan::render::table(&a), plan::render::table(&b));
    assert_eq!(a.global_batch, 256);
    assert!(a.time.mfu > 0.0 && a.time.mfu <= 1.0);
}

/// The runtime's default for plans made without the planner: the largest divisor of a rank's
/// share with at most 8192 tokens.
#[test]
fn the_runtimes_default_micro_batch_is_the_largest_divisor_up_to_8192_tokens() {
    assert_eq!(plan::default_micro_batch(256, 1024), 8);
    assert_eq!(plan::default_micro_batch(12, 1024), 6);
    assert_eq!(plan::default_micro_batch(3, 4096), 1);
    assert_eq!(plan::default_micro_batch(5, 16384), 1);
    assert_eq!(plan::default_micro_batch(16, 128), 16);
}

/// Every micro-batch reads the rank's weights at the compute precision twice (forward, input
/// gradient) and accumulates their gradients in fp32 (read + write), at the HBM bandwidth.
/// GPT-2 small alone on an H100 (3350 GB/s), 124,475,904 parameters (see above):
///   bf16: (2·2 + 8) B × 124,475,904 = 1,493,710,848 B → 0.4459 ms
///   fp32: (2·4 + 8) B × 124,475,904 = 1,991,614,464 B → 0.5945 ms
#[test]
fn every_micro_batch_reads_the_weights_and_accumulates_their_gradients() {
    for (precision, bytes) in [
        (Precision::Bf16, 1_493_710_848u64),
        (Precision::Fp32, 1_991_614_464),
    ] {
        let c = checked(
            gpt("gpt2", 50257, 768, 12, 12, true),
            parallel(1, 1, 1, ExpertGroup::AcrossData),
            Some(train(8, 1024, precision)),
        );
        assert_eq!(
            plan::cost::weight_traffic_bytes(124_475_904, precision),
            bytes
        );
        for m in [1, 8] {
            let o = Overrides {
                micro_batch: Some(m),
                ..Overrides::default()
            };
            let p = plan::build_with(&c, &o).unwrap();
            let t = &p.stages[0].cost.time;
            let expected = bytes as f64 / 3350e9;
            assert!(
                (t.weight_traffic_s - expected).abs() < 1e-12,
                "{m}: {} {expected}",
                t.weight_traffic_s
            );
            let sum = t.compute_s + t.weight_traffic_s + t.tensor_s + t.all_to_all_s + t.pipeline_s;
            assert!((t.micro_batch_s - sum).abs() < 1e-12);
            let json = plan::render::json(&p);
            assert!(json.contains("\"weight_traffic_s\""), "{json}");
        }
    }
}

/// GPT-2-medium-MoE alone on one H100 (examples/gpt2-medium-moe.fmoe with `--world 1 --tensor
/// 1 --pipeline 1 --memory-model fmoec`: 1,261,697,232 parameters, 256 sequences of 1024
/// per step), as `fmoec run` plans it on one GPU. Each micro-batch costs 4.52 ms of weight
/// traffic besides its FLOPs, so larger micro-batches are faster (measured on an H100:
/// 166,000 / 184,100 / 197,600 tokens/s at 8 / 16 / 32; the estimate's gains are smaller);
/// the free choice is the largest that leaves 10% free: 32 (68.8 GiB of 79.6); 64 does not
/// fit.
#[test]
fn gpt2_medium_moe_alone_takes_the_largest_micro_batch_that_leaves_room() {
    let c = example("gpt2-medium-moe");
    let alone = |micro_batch: Option<u64>| Overrides {
        world: Some(1),
        tensor: Some(1),
        pipeline: Some(1),
        micro_batch,
        memory_model: Some(MemoryModel::Fmoec),
        ..Overrides::default()
    };
    let at = |m: u64| plan::build_with(&c, &alone(Some(m))).unwrap();
    let (p8, p16, p32) = (at(8), at(16), at(32));
    assert_eq!(p8.stages[0].cost.params.total, 1_261_697_232);
    let weights = 1_261_697_232.0 * 12.0 / 3350e9;
    assert!((p8.stages[0].cost.time.weight_traffic_s - weights).abs() < 1e-12);
    let tps = |p: &plan::ParallelPlan| p.time.tokens_per_s;
    assert!(tps(&p8) < tps(&p16) && tps(&p16) < tps(&p32));
    // each doubling gains less: the weight traffic is a smaller share of a larger micro-batch
    assert!(tps(&p16) / tps(&p8) > tps(&p32) / tps(&p16));
    assert!(plan::build_with(&c, &alone(Some(64))).is_err());

    let free = plan::build_with(&c, &alone(None)).unwrap();
    assert_eq!((free.micro_batch, free.micro_batches), (32, 8));
    let memory = &free.stages[0].cost.memory;
    assert!(memory.total as f64 <= 0.9 * memory.capacity as f64);
    assert_eq!(
        format!("{:.1}", memory.total as f64 / (1u64 << 30) as f64),
        "68.8"
    );
    assert!(
        free.assumptions.iter().any(|a| a
            == "micro-batch not given: chose the fastest in the estimate among [1, 2, 4, 8, 16, \
                32, 64] of those that leave 10% of the memory free (else of those that fit)"),
        "{:?}",
        free.assumptions
    );
}

/// The free micro-batch is the fastest in the estimate of those that leave 10% of the GPU
/// free, else the fastest that fits; a micro-batch that does not fit is never chosen. GPT-2
/// small, 32 sequences of 1024 per step.
#[test]
fn a_free_micro_batch_is_the_fastest_that_leaves_room() {
    let gpt2_on = |memory_bytes: u64| {
        let mut p = parallel(1, 1, 1, ExpertGroup::AcrossData);
        p.hardware.memory_bytes = memory_bytes;
        checked(
            gpt("gpt2", 50257, 768, 12, 12, true),
            p,
            Some(train(32, 1024, Precision::Bf16)),
        )
    };
    let at = |c: &fmoec::check::Checked, m: u64| {
        let o = Overrides {
            micro_batch: Some(m),
            ..Overrides::default()
        };
        plan::build_with(c, &o)
    };
    // 8 sequences take 12,259,270,656 B (above); on a GPU of 12.4 GB they fit with less than
    // 10% to spare, and 4 is chosen though 8 is faster in the estimate
    let c = gpt2_on(12_400_000_000);
    let (four, eight) = (at(&c, 4).unwrap(), at(&c, 8).unwrap());
    assert!(eight.time.tokens_per_s > four.time.tokens_per_s);
    assert!(at(&c, 16).is_err());
    assert_eq!(plan::build(&c).unwrap().micro_batch, 4);
    // where no micro-batch leaves 10% free, the fastest that fits: 1 sequence (a little over
    // 1.8 GB of weights and state, and its activations) on a GPU it fills to over 90%
    let one = at(&gpt2_on(100_000_000_000), 1).unwrap().stages[0]
        .cost
        .memory
        .total;
    let c = gpt2_on(one + one / 20);
    assert!(at(&c, 2).is_err());
    assert_eq!(plan::build(&c).unwrap().micro_batch, 1);
    assert!(at(&c, 1).unwrap().stages[0].cost.memory.total as f64 > 0.9 * (one + one / 20) as f64);

    // a share that is no power of two is tried whole too: 12 sequences run as one micro-batch
    let mut p = parallel(1, 1, 1, ExpertGroup::AcrossData);
    p.hardware.memory_bytes = 100_000_000_000;
    let c = checked(
        gpt("gpt2", 50257, 768, 12, 12, true),
        p,
        Some(train(12, 1024, Precision::Bf16)),
    );
    let p = plan::build(&c).unwrap();
    assert_eq!((p.micro_batch, p.micro_batches), (12, 1));
    assert!(
        p.assumptions
            .iter()
            .any(|a| a.contains("among [1, 2, 4, 12] of those")),
        "{:?}",
        p.assumptions
    );
}

/// With a pipeline the choice weighs the bubble, `(p − 1) / (m + p − 1)`, which favours many
/// small micro-batches, against each micro-batch's reads of the stage's weights, which favour
/// few large ones. GPT-2 small on 4 stages, 32 sequences of 1024: the fastest is smaller than
/// the largest that fits; with weights free to read (an HBM of 10^9 GB/s) the bubble alone
/// decides and takes micro-batches of 1.
#[test]
fn a_pipeline_weighs_its_bubble_against_the_weight_traffic() {
    let gpt2_on_4_stages = |hbm_gbps: f64| {
        let mut p = parallel(4, 1, 4, ExpertGroup::AcrossData);
        p.hardware.hbm_gbps = hbm_gbps;
        checked(
            gpt("gpt2", 50257, 768, 12, 12, true),
            p,
            Some(train(32, 1024, Precision::Bf16)),
        )
    };
    let c = gpt2_on_4_stages(3350.0);
    let chosen = plan::build(&c).unwrap();
    let costed: Vec<(u64, f64)> = [1u64, 2, 4, 8, 16, 32]
        .into_iter()
        .filter_map(|m| {
            let o = Overrides {
                micro_batch: Some(m),
                ..Overrides::default()
            };
            plan::build_with(&c, &o)
                .ok()
                .map(|p| (m, p.time.tokens_per_s))
        })
        .collect();
    let largest = costed.iter().map(|(m, _)| *m).max().unwrap();
    let fastest = costed.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    assert_eq!(chosen.micro_batch, fastest, "{costed:?}");
    assert!(1 < fastest && fastest < largest, "{costed:?}");
    let free_weights = plan::build(&gpt2_on_4_stages(1e9)).unwrap();
    assert_eq!(
        (free_weights.micro_batch, free_weights.micro_batches),
        (1, 32)
    );
}

/// The H100 profile with its FP8 peak (dense, as its datasheet gives it).
fn fp8_h100() -> fmoec::check::Hardware {
    let mut hw = h100();
    hw.fp8_tflops = Some(1979.0);
    hw
}

/// The plan of `model` on `parallel`'s layout of [`fp8_h100`]s at `precision`: 8 sequences
/// of 1024 a step, all in one micro-batch, `fmoec run`'s memory model.
fn fp8_plan(
    model: fmoec::check::Model,
    parallel: fmoec::check::Parallel,
    precision: Precision,
) -> plan::ParallelPlan {
    let mut c = checked(model, parallel, Some(train(8, 1024, precision)));
    c.parallel.hardware = fp8_h100();
    let o = Overrides {
        micro_batch: Some(8),
        memory_model: Some(MemoryModel::Fmoec),
        ..Overrides::default()
    };
    plan::build_with(&c, &o).unwrap()
}

/// `precision = fp8` on an H100 profile with FP8 tensor cores: the same weights, gradients
/// and optimizer state as bf16 (two e4m3 copies of each FP8 matrix take the 2 bytes of its
/// bf16 copy), plus the FP8 copies' scales (`--memory-model fmoec`); the expert matmuls at
/// the FP8 peak, so the step is faster; MFU still over the bf16 peak.
///
/// A model with S1's experts: width 4096, depth 2, block 1 an MoE layer of 8 experts
/// 4096 → 14336 (GELU: 2 matrices), all on one rank, where the planner's estimate takes FP8
/// (checked below). Scales: per matrix one f32 per output column and one per row,
/// 4 B · (4096 + 14336) = 73,728 B; × 2 matrices × 8 experts = 1,179,648 B.
#[test]
fn fp8_memory_adds_the_scales_and_time_runs_the_experts_at_the_fp8_peak() {
    let model = || {
        let mut m = gpt("s1_moe", 50304, 4096, 32, 2, true);
        m.layers[1].ffn = fmoec::check::Ffn::Moe(gshard_moe(8, 2, 14336));
        m
    };
    let build = |precision: Precision| {
        fp8_plan(
            model(),
            parallel(1, 1, 1, ExpertGroup::AcrossData),
            precision,
        )
    };
    let hw = fp8_h100();
    assert!(plan::cost::fp8_pays_for_experts(
        &hw,
        4096,
        14336,
        fmoec::check::Activation::Gelu,
        8192.0 * 2.0,
        8
    ));
    let bf16 = build(Precision::Bf16);
    let fp8 = build(Precision::Fp8 { dense: false });
    let (mb, mf) = (&bf16.stages[0].cost.memory, &fp8.stages[0].cost.memory);
    assert_eq!(mf.weights, mb.weights + 1_179_648);
    assert_eq!(mf.grads, mb.grads);
    assert_eq!(mf.optimizer, mb.optimizer);
    assert_eq!(mf.activations, mb.activations);
    assert!(fp8.time.step_s < bf16.time.step_s);
    assert_eq!(fp8.time.peak_tflops, bf16.time.peak_tflops);
}

/// FP8 pays for S1's wide experts (4096 → 14336; measured 1.49-1.55x on an H100) and, with
/// its weight gradients on bf16 operands, for F0's (1024 → 4096, 128 rows an expert: 1.11-1.16x,
/// BENCHMARKS.md 2026-12-08); not for S3's (2048 → 768), whose quantisations the estimate
/// counts as costing more than its FP8 matmuls save (measured 0.79-0.92x with FP8 weight
/// gradients, 1.03-1.10x without: the estimate keeps them in bf16, the safe side).
#[test]
fn fp8_pays_for_wide_experts_and_not_for_narrow_ones() {
    use fmoec::check::Activation::Gelu;
    let hw = fp8_h100();
    let pays = |w, h, rows: f64, e| plan::cost::fp8_pays_for_experts(&hw, w, h, Gelu, rows, e);
    assert!(pays(4096, 14336, 16384.0 * 2.0, 8));
    assert!(pays(1024, 4096, 4096.0 * 2.0, 64));
    assert!(!pays(2048, 768, 16384.0 * 8.0, 128));
    // no FP8 tensor cores: never
    assert!(!plan::cost::fp8_pays_for_experts(
        &h100(),
        4096,
        14336,
        Gelu,
        32768.0,
        8
    ));
}

/// `fp8_dense` pays for Mixtral's attention projections (4096 → 6144 and 4096 → 4096, 8,192
/// rows: FP8's matmuls measured 1.76-2.22x bf16's on an H100), not for GPT-2-medium's width
/// of 1024, where the passes cost more than the matmuls save (fp8 with the dense matmuls
/// 0.83x bf16's step at micro-batch 32; BENCHMARKS.md 2026-12-07 16:21 UTC); and the plan
/// times the modules it keeps in bf16 as bf16.
#[test]
fn fp8_dense_pays_for_wide_projections_and_not_for_narrow_ones() {
    let hw = fp8_h100();
    let pays = |shapes: &[(u64, u64)], rows: f64| plan::cost::fp8_pays_for_dense(&hw, shapes, rows);
    assert!(pays(&[(4096, 6144), (4096, 4096)], 8192.0));
    assert!(!pays(&[(1024, 3072), (1024, 1024)], 32768.0));
    assert!(!pays(&[(1024, 4096), (4096, 1024)], 32768.0));
    assert!(!pays(&[(1024, 50304)], 32768.0));
    assert!(!pays(&[], 8192.0));
    assert!(!plan::cost::fp8_pays_for_dense(
        &h100(),
        &[(4096, 6144)],
        8192.0
    ));
    let build = |width: u64, dense: bool| {
        fp8_plan(
            gpt("dense", 50304, width, 16, 2, true),
            parallel(1, 1, 1, ExpertGroup::AcrossData),
            Precision::Fp8 { dense },
        )
    };
    // at width 1024 `fp8_dense` keeps every module in bf16: the plan of fp8 without it
    let (narrow, narrow_dense) = (build(1024, false), build(1024, true));
    let all_bf16 = plan::cost::Fp8Fallbacks {
        experts: vec![],
        weight_gradients: vec![],
        attention: vec![0, 1],
        mlps: vec![0, 1],
        head: true,
    };
    assert_eq!(narrow_dense.fp8_fallbacks, Some(all_bf16));
    assert_eq!(narrow.fp8_fallbacks, Some(Default::default()));
    assert_eq!(narrow_dense.time.step_s, narrow.time.step_s);
    assert_eq!(
        narrow_dense.stages[0].cost.memory,
        narrow.stages[0].cost.memory
    );
    // at 4096 the projections go to FP8: a faster step
    let (wide, wide_dense) = (build(4096, false), build(4096, true));
    let fallbacks = wide_dense.fp8_fallbacks.clone().unwrap();
    assert!(
        fallbacks.attention.is_empty() && fallbacks.mlps.is_empty(),
        "{fallbacks:?}"
    );
    assert!(
        wide_dense.time.step_s < wide.time.step_s,
        "{:?} {:?}",
        wide_dense.time,
        wide.time
    );
}

/// The LM head's FP8 choice is made for the head `fmoec run` computes (FP8 runs nowhere
/// else): the file's vocabulary, not padded, whole on every tensor rank; not the padded head
/// split over the tensor ranks that the costs take for Megatron-LM. At width 4096 and 8,192
/// tokens a micro-batch: a vocabulary of 50257 (no multiple of 16, which FP8's matmul needs)
/// keeps the head in bf16, although its padding to 50304 would pay; one of 4096 on 8 tensor
/// ranks takes FP8 (4096 → 4096 pays), although a rank's 512 columns would not.
#[test]
fn fp8_dense_decides_the_head_the_run_computes() {
    let hw = fp8_h100();
    let pays = |k: u64, n: u64| plan::cost::fp8_pays_for_dense(&hw, &[(k, n)], 8192.0);
    assert_eq!(plan::cost::padded_vocab(50257, 1), 50304);
    assert!(pays(4096, 50304) && !pays(4096, 50257));
    assert_eq!(plan::cost::padded_vocab(4096, 8) / 8, 512);
    assert!(pays(4096, 4096) && !pays(4096, 512));
    let head = |vocab: u64, tensor: u64| {
        fp8_plan(
            gpt("head", vocab, 4096, 32, 2, true),
            parallel(tensor, tensor, 1, ExpertGroup::AcrossData),
            Precision::Fp8 { dense: true },
        )
        .fp8_fallbacks
        .unwrap()
        .head
    };
    assert!(head(50257, 1));
    assert!(!head(50304, 1));
    assert!(!head(4096, 8));
}

/// `plan::cost::fp8_fallbacks`, the rule for callers without a plan, gives the plan's
/// fallbacks for the plan's layout and micro-batch: here GPT-2-medium-MoE's blocks on 2
/// tensor ranks with sliced experts over 4 data ranks, 4 sequences of 1024 a micro-batch.
#[test]
fn fp8_fallbacks_of_a_layout_are_the_plans() {
    let mut m = gpt("medium_moe", 50304, 1024, 16, 4, true);
    for l in [1, 3] {
        m.layers[l].ffn = Ffn::Moe(gshard_moe(16, 2, 2048));
    }
    let mut p = parallel(8, 2, 1, ExpertGroup::AcrossData);
    p.expert_slicing = true;
    let mut c = checked(m, p, Some(train(16, 1024, Precision::Fp8 { dense: true })));
    c.parallel.hardware = fp8_h100();
    let plan = plan::build_with(&c, &Overrides::default()).unwrap();
    assert_eq!((plan.tensor, plan.data, plan.micro_batch), (2, 4, 4));
    assert!(plan.expert_slicing);
    let layout = plan::cost::Fp8Layout {
        dense: true,
        tensor: 2,
        expert_parallel: 4,
        expert_slices: 2,
        tokens: 4 * 1024,
    };
    let fallbacks = plan::cost::fp8_fallbacks(&c.model, &c.parallel.hardware, &layout);
    assert_eq!(plan.fp8_fallbacks, Some(fallbacks.clone()));
    // at width 1024 nothing pays
    assert_eq!(fallbacks.experts, vec![1, 3]);
    assert_eq!(fallbacks.attention, vec![0, 1, 2, 3]);
    assert_eq!(fallbacks.mlps, vec![0, 2]);
    assert!(fallbacks.head);
}

/// `precision = fp8` on a GPU whose profile has no `fp8_tflops` is the planner's error.
#[test]
fn fp8_on_a_gpu_without_fp8_tensor_cores_is_refused() {
    let c = checked(
        gpt_moe_small(),
        parallel(1, 1, 1, ExpertGroup::AcrossData),
        Some(train(8, 1024, Precision::Fp8 { dense: false })),
    );
    let err = plan::build_with(&c, &Overrides::default()).unwrap_err();
    assert_eq!(err[0].code, "P0014", "{err:?}");
    assert!(err[0].message.contains("FP8 tensor cores"), "{err:?}");
}

// ---- FasterMoE: the smart schedule and dynamic shadowing in the time estimate --------

/// Four MoE blocks of 8 experts (Mixtral's expert shape: width 4096, hidden 14336, top-2)
/// on 8 H100s, one expert per rank, bf16, 16 sequences of 4096 per step.
fn big_moe(smart: SmartSchedule, shadowing: Shadowing) -> fmoec::check::Checked {
    let mut m = gpt("big_moe", 32000, 4096, 32, 4, false);
    for l in m.layers.iter_mut() {
        l.ffn = Ffn::Moe(gshard_moe(8, 2, 14336));
    }
    let mut p = parallel(8, 1, 1, ExpertGroup::AcrossData);
    p.smart_schedule = smart;
    p.shadowing = shadowing;
    checked(m, p, Some(train(16, 4096, Precision::Bf16)))
}

fn skewed(skew: f64) -> Overrides {
    Overrides {
        routing_skew: Some(skew),
        ..Overrides::default()
    }
}

fn a2a_s(p: &plan::ParallelPlan) -> f64 {
    p.stages[0].cost.time.all_to_all_s
}

/// One layer by hand, micro-batch m (the planner's), T = 4096·m tokens, R = 2T rows per
/// rank:
///   a row moves 4096 · 2 B over NVLink at 450 GB/s: 18.2 ns, four times (dispatch,
///   combine, their gradients), 7/8 of the rows leave the rank;
///   a row through its expert, forward and backward: 3 · 2 · 2 · 4096 · 14336 FLOP at
///   the fixture's 989.4 TFLOP/s = 712 ns;
///   replicating an expert: its 2·4096·14336 + 14336 + 4096 parameters as fp32, broadcast
///   and reduced: 2 · 4 B · 117,459,968 / 450 GB/s = 2.09 ms, plus 2 calls of 100 µs.
/// Plain expert parallelism, balanced: 4 · R · 7/8 · 18.2 ns + R · 712 ns.
#[test]
fn fastermoe_costs_by_hand() {
    let p = plan::build(&big_moe(SmartSchedule::Off, Shadowing::Dynamic)).unwrap();
    let f = p.fastermoe.as_ref().expect("the plan lists the exchange");
    let rows = (2 * 4096 * p.micro_batch) as f64;
    let row_transfer = 4096.0 * 2.0 / 450e9;
    let row_compute = 3.0 * 2.0 * 2.0 * 4096.0 * 14336.0 / 989.4e12;
    let params = (2 * 4096 * 14336 + 14336 + 4096) as f64;
    let shadow = 2.0 * 4.0 * params / 450e9 + 2.0 * 100e-6;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    assert_eq!(f.layers.len(), 4);
    for x in &f.layers {
        assert!(close(x.costs.row_transfer_s, row_transfer), "{x:?}");
        assert!(close(x.costs.row_compute_s, row_compute), "{x:?}");
        assert!(close(x.costs.shadow_s, shadow), "{x:?}");
        let plain = 4.0 * rows * 7.0 / 8.0 * row_transfer + rows * row_compute;
        assert!(close(x.plain_s, plain), "{} vs {plain}", x.plain_s);
        // balanced: nothing worth replicating
        assert_eq!(x.shadowed, 0);
        assert!(close(x.planned_s, plain));
    }
    // the same estimate as without the options, up to rounding
    let off = plan::build(&big_moe(SmartSchedule::Off, Shadowing::Off)).unwrap();
    assert!(off.fastermoe.is_none());
    assert!((a2a_s(&p) - a2a_s(&off)).abs() <= 1e-9 * a2a_s(&off));
}

#[test]
fn the_smart_schedule_hides_part_of_the_exchange() {
    let off = plan::build(&big_moe(SmartSchedule::Off, Shadowing::Off)).unwrap();
    let auto = plan::build(&big_moe(SmartSchedule::Auto, Shadowing::Off)).unwrap();
    let f = auto.fastermoe.as_ref().unwrap();
    for x in &f.layers {
        assert!(x.chunks >= 2, "{x:?}");
        assert!(x.planned_s < x.plain_s, "{x:?}");
        // max(T, X) + min(T, X) / n + 4 (n - 1) calls
        let rows = (2 * 4096 * auto.micro_batch) as f64;
        let t = 4.0 * rows * 7.0 / 8.0 * x.costs.row_transfer_s;
        let c = rows * x.costs.row_compute_s;
        let n = x.chunks as f64;
        let want = t.max(c) + t.min(c) / n + 4.0 * (n - 1.0) * 100e-6;
        assert!((x.planned_s - want).abs() <= 1e-9 * want, "{x:?}");
    }
    assert!(a2a_s(&auto) < a2a_s(&off));
    assert!(auto.time.step_s < off.time.step_s);
    // a given chunk count is used as given, at most one chunk per rank
    let four = plan::build(&big_moe(SmartSchedule::Chunks { count: 4 }, Shadowing::Off)).unwrap();
    assert!(four.fastermoe.unwrap().layers.iter().all(|x| x.chunks == 4));
    let many = plan::build(&big_moe(
        SmartSchedule::Chunks { count: 64 },
        Shadowing::Off,
    ))
    .unwrap();
    assert!(many.fastermoe.unwrap().layers.iter().all(|x| x.chunks == 8));
    assert_eq!(many.warnings.len(), 1, "{:?}", many.warnings);
    assert_eq!(many.warnings[0].code, "P0110");
}

/// `plan --megatron VERSION` plans what `emit --megatron VERSION` trains, and no Megatron-LM
/// target has FasterMoE's options (W0810): its time estimate is plain expert parallelism's,
/// not the smart schedule's or shadowing's.
#[test]
fn a_megatron_target_costs_the_exchange_without_fastermoe() {
    for target in fmoec::check::megatron_targets() {
        let rules = plan::TargetRules::of(&target);
        let plain = plan::build_for(
            &big_moe(SmartSchedule::Off, Shadowing::Off),
            &skewed(3.0),
            &rules,
        )
        .unwrap();
        let asked = plan::build_for(
            &big_moe(SmartSchedule::Auto, Shadowing::Dynamic),
            &skewed(3.0),
            &rules,
        )
        .unwrap();
        let v = &target.version;
        assert_eq!(asked.time.step_s, plain.time.step_s, "{v}");
        let f = asked.fastermoe.as_ref().unwrap();
        assert_eq!(f.smart_schedule, SmartSchedule::Off, "{v}");
        assert_eq!(f.shadowing, Shadowing::Off, "{v}");
        assert!(
            f.layers.iter().all(|x| x.chunks == 1 && x.shadowed == 0),
            "{v}"
        );
    }
    // `fmoec run`'s plan keeps them
    let run = plan::build_with(
        &big_moe(SmartSchedule::Auto, Shadowing::Dynamic),
        &skewed(3.0),
    )
    .unwrap();
    let plain =
        plan::build_with(&big_moe(SmartSchedule::Off, Shadowing::Off), &skewed(3.0)).unwrap();
    assert!(run.time.step_s < plain.time.step_s);
}

#[test]
fn shadowing_replicates_the_hot_expert_under_skewed_routing() {
    let off = plan::build_with(&big_moe(SmartSchedule::Off, Shadowing::Off), &skewed(3.0)).unwrap();
    let dynamic = plan::build_with(
        &big_moe(SmartSchedule::Off, Shadowing::Dynamic),
        &skewed(3.0),
    )
    .unwrap();
    // without shadowing the busiest rank holds the hot expert: 3x the rows of the balanced run
    let balanced = plan::build(&big_moe(SmartSchedule::Off, Shadowing::Off)).unwrap();
    assert!(off.time.step_s > balanced.time.step_s);
    let f = off.fastermoe.as_ref().expect("a skew shows the exchange");
    for x in &f.layers {
        let rows = (2 * 4096 * off.micro_batch) as f64;
        // the hot expert's rank receives 3/8 of every rank's rows, computes 8 · 3/8 = 3x
        let busiest = 4.0 * rows * 3.0 / 8.0 * 7.0 * x.costs.row_transfer_s
            + 3.0 * rows * x.costs.row_compute_s;
        assert!((x.plain_s - busiest).abs() <= 1e-9 * busiest, "{x:?}");
        assert_eq!(x.shadowed, 0);
        assert_eq!(x.would_shadow, 1);
    }
    let d = dynamic.fastermoe.as_ref().unwrap();
    for x in &d.layers {
        assert_eq!(x.shadowed, 1, "{x:?}");
        assert!(x.planned_s < x.plain_s, "{x:?}");
    }
    assert!(dynamic.time.step_s < off.time.step_s);
    // the table says what shadowing would do when the file does not ask for it
    let table = plan::render::table(&off);
    assert!(table.contains("shadowing would"), "{table}");
    assert!(table.contains("1 expert ("), "{table}");
}

/// FasterMoE in an interleaved pipeline: the four MoE blocks on pipeline 2 with 2 model chunks
/// per stage (stage 0 runs blocks 0 and 2, stage 1 blocks 1 and 3), the experts across each
/// stage's 4 data ranks, routing skewed 3x. Every MoE layer is listed once and in layer order,
/// costed on its own stage's expert group of 4: as a plan of one stage (4 GPUs, no pipeline)
/// costs it, the hot expert replicated; each stage's all-to-all time is its two layers'.
#[test]
fn fastermoe_in_an_interleaved_pipeline_costs_each_layer_on_its_stage() {
    let faster = |gpus: u64, pipeline: u64, virtual_stages: u64| {
        let mut c = big_moe(SmartSchedule::Auto, Shadowing::Dynamic);
        c.parallel = fmoec::check::Parallel {
            smart_schedule: c.parallel.smart_schedule,
            shadowing: c.parallel.shadowing,
            virtual_stages,
            ..parallel(gpus, 1, pipeline, ExpertGroup::AcrossData)
        };
        let o = Overrides {
            micro_batch: Some(1),
            ..skewed(3.0)
        };
        plan::build_with(&c, &o).unwrap()
    };
    let p = faster(8, 2, 2);
    assert_eq!((p.pipeline, p.virtual_stages, p.data), (2, 2, 4));
    assert_eq!(p.stages[0].chunks, vec![[0, 1], [2, 3]]);
    let f = p.fastermoe.as_ref().expect("the options are planned");
    let layers: Vec<usize> = f.layers.iter().map(|x| x.layer).collect();
    assert_eq!(
        layers,
        [0, 1, 2, 3],
        "one entry per MoE layer, in layer order"
    );
    let one_stage = faster(4, 1, 1);
    let alone = one_stage.fastermoe.as_ref().unwrap();
    for (x, y) in f.layers.iter().zip(&alone.layers) {
        assert_eq!((x.chunks, x.shadowed), (y.chunks, y.shadowed), "{x:?}");
        assert_eq!(x.shadowed, 1, "{x:?}");
        assert!(x.planned_s < x.plain_s, "{x:?}");
        assert!(
            (x.planned_s - y.planned_s).abs() <= 1e-12 * y.planned_s,
            "{x:?} {y:?}"
        );
    }
    // each stage runs two of the four identical layers: half the one-stage plan's exchange
    for s in &p.stages {
        let half = one_stage.stages[0].cost.time.all_to_all_s / 2.0;
        assert!(
            (s.cost.time.all_to_all_s - half).abs() <= 1e-9 * half,
            "{s:?}"
        );
    }
    // and shadowing pays there as without a pipeline
    let mut plain = big_moe(SmartSchedule::Off, Shadowing::Off);
    plain.parallel = fmoec::check::Parallel {
        virtual_stages: 2,
        ..parallel(8, 1, 2, ExpertGroup::AcrossData)
    };
    let o = Overrides {
        micro_batch: Some(1),
        ..skewed(3.0)
    };
    let off = plan::build_with(&plain, &o).unwrap();
    assert!(p.time.step_s < off.time.step_s);
}

/// An example file, checked by the front end.
fn example(name: &str) -> fmoec::check::Checked {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let file_name = format!("examples/{name}.fmoe");
    let text = std::fs::read_to_string(root.join(&file_name)).unwrap();
    let mut sources = fmoec::diag::Sources::new();
    let file = sources.add(file_name, text);
    let mut sink = fmoec::diag::Sink::new();
    fmoec::check::check_file(&mut sources, file, &mut sink).expect("the examples check")
}

fn core_rules() -> plan::TargetRules {
    let core = fmoec::check::megatron_targets()
        .into_iter()
        .find(|t| t.version == "core_v0.19")
        .unwrap();
    plan::TargetRules::of(&core)
}

/// Mixtral-8x7B (examples/mixtral-8x7b.fmoe: 64 H100s, tensor 8, pipeline 4, data 2, experts
/// in groups of 2 sliced over the tensor ranks, bf16) planned for Megatron-Core.
///
/// Expert grid: expert-parallel 2 × expert-tensor 8, so expert-data 16 / (2·8) = 1.
/// Stage 0 on one rank: the word embedding 32,000·4096/8 = 16,384,000 (the file's vocabulary:
/// no padding to 128·t) + 8 blocks of attention ((32 + 2·8)·128·4096 + 4096·4096)/8 = 5,242,880
/// = 58,327,040 tensor-sharded; 8 norms of 2·4096 = 65,536 replicated; 8 gates 4096·8 =
/// 262,144; 8 layers × 4 experts × 3·4096·14336/8 = 704,643,072 expert parameters.
///   weights    2 B × 763,297,792                                 =  1,526,595,584
///   grads      4 B (fp32 main gradients) × 763,297,792           =  3,053,191,168
///   optimizer 12 B × (58,654,720 / 2 data ranks + 704,643,072 / 1) = 8,807,645,184
#[test]
fn mixtral_memory_for_megatron_core_by_hand() {
    let c = example("mixtral-8x7b");
    let p = plan::build_for(&c, &Overrides::default(), &core_rules()).unwrap();
    let core = p.megatron_core.as_ref().expect("a Megatron-Core plan");
    assert_eq!(
        (core.expert_parallel, core.expert_tensor, core.expert_data),
        (2, 8, 1)
    );
    assert_eq!(core.padded_vocab, 32_000);
    assert!(core.distributed_optimizer && !core.whole_experts_for_bias);
    let st = &p.stages[0].cost;
    assert_eq!(
        (
            st.params.sharded,
            st.params.replicated,
            st.params.gate,
            st.params.expert
        ),
        (58_327_040, 65_536, 262_144, 704_643_072)
    );
    let m = &st.memory;
    assert_eq!(m.model, MemoryModel::MegatronCore);
    assert_eq!(m.weights, 1_526_595_584);
    assert_eq!(m.grads, 3_053_191_168);
    assert_eq!(m.optimizer, 8_807_645_184);
    // Without Transformer Engine the local attention keeps, per layer and micro-batch in
    // flight, 32/8 heads × 4096² probabilities (2 B), their dropout mask (1 B) and output
    // (2 B): 5 × 67,108,864 × 8 layers × 4 in flight, plus one shared 2 B score buffer.
    assert_eq!(m.in_flight, 4);
    assert_eq!(m.unfused_attention, 5 * 67_108_864 * 8 * 4 + 2 * 67_108_864);
    // the expert groups are Megatron-Core's: expert-parallel ranks 8 apart (the expert-tensor
    // ranks in between), each rank holding 4 of the 8 experts, an eighth of each
    assert_eq!(p.groups.expert[0], vec![0, 8]);
    assert_eq!(core.expert_tensor_groups[0], (0..8).collect::<Vec<u64>>());
    assert_eq!(p.ranks[9].expert_rank, 1);
    assert_eq!(p.ranks[9].experts[0].ids, vec![4, 5, 6, 7]);
    assert_eq!(p.ranks[9].experts[0].hidden, [1792, 3584]);
    // without the target the same file is planned as before: v2.2's padding and bytes
    let v22 = plan::build(&c).unwrap();
    assert!(v22.megatron_core.is_none());
    assert_eq!(v22.stages[0].cost.memory.model, MemoryModel::Megatron);
    assert_eq!(v22.stages[0].cost.memory.unfused_attention, 0);
    assert_eq!(
        v22.stages[0].cost.params.sharded,
        58_327_040 + 768 * 4096 / 8
    );
}

/// Mixtral's MoE traffic under Megatron-Core (micro-batch 1 of 4096 tokens, width 4096, bf16,
/// top-2, tensor 8 with sequence parallelism, expert-parallel 2, expert-tensor 8): each tensor
/// rank routes its own 4096 / 8 = 512 tokens, so per layer and direction
///   exchange over the expert-parallel pair: 2 (dispatch, combine) · 2 · 512 · 4096 · 2 B · 1/2
///                                                                          =   8,388,608
///   expert-tensor all-gather and reduce-scatter of the received rows over 8 ranks:
///                                            2 · 2 · 512 · 4096 · 2 B · 7  = 117,440,512
/// (before: v2.2's 2 · 2 · 4096 · 4096 · 2 B · 1/2 = 67,108,864 for every model, the whole
/// micro-batch exchanged and no gather).
#[test]
fn mixtral_all_to_all_for_megatron_core_by_hand() {
    let c = example("mixtral-8x7b");
    let p = plan::build_for(&c, &Overrides::default(), &core_rules()).unwrap();
    let traffic = &p.stages[0].cost.traffic;
    assert_eq!(traffic.all_to_all.len(), 8);
    for layer in &traffic.all_to_all {
        assert_eq!(
            (layer.fwd_bytes, layer.bwd_bytes),
            (8_388_608 + 117_440_512, 8_388_608 + 117_440_512)
        );
    }
    // v2.2's plan of the same file keeps its formula
    let v22 = plan::build(&c).unwrap();
    assert_eq!(
        v22.stages[0].cost.traffic.all_to_all[0].fwd_bytes,
        67_108_864
    );
}

/// gpt2-medium-moe slices experts that have biases over tensor 2: Megatron-Core cannot, so its
/// plan spreads them whole over 4 × 2 = 8 expert-parallel ranks (a warning says so: the same
/// weights per GPU, each output bias on one rank instead of two); experts
/// that do not divide over those 8 ranks are an error at the expert count.
#[test]
fn megatron_core_spreads_experts_with_biases_whole() {
    let c = example("gpt2-medium-moe");
    let p = plan::build_for(&c, &Overrides::default(), &core_rules()).unwrap();
    let core = p.megatron_core.as_ref().unwrap();
    assert_eq!((core.expert_parallel, core.expert_tensor), (8, 1));
    assert!(core.whole_experts_for_bias);
    assert_eq!(p.expert_group_size, 8);
    assert!(!p.expert_slicing);
    let per_rank: Vec<u64> = p.moe_layers.iter().map(|l| l.experts_per_rank).collect();
    assert_eq!(per_rank[0], 2);
    assert_eq!(*per_rank.last().unwrap(), 4);
    assert!(p.warnings.iter().any(|d| d.code == "P0103"));
    // the same weights per GPU as the v2.2 plan, which slices them, and half the output
    // biases (v2.2 keeps each local expert's on both tensor ranks): 11 layers of 4 local
    // experts and one of 8, 1024 each
    let v22 = plan::build(&c).unwrap();
    assert_eq!(
        v22.stages[0].cost.params.expert - p.stages[0].cost.params.expert,
        (11 * 4 + 8) * 1024 / 2
    );

    let mut c12 = c.clone();
    for l in &mut c12.model.layers {
        if let fmoec::check::Ffn::Moe(m) = &mut l.ffn {
            if m.experts == 16 {
                m.experts = 12;
            }
        }
    }
    let errors = plan::build_for(&c12, &Overrides::default(), &core_rules()).unwrap_err();
    assert!(errors.iter().any(|d| d.code == "P0015"), "{errors:?}");
    // v2.2 slices them: 12 experts over 4 ranks are fine there
    assert!(plan::build(&c12).is_ok());
}

/// Mixtral for Megatron-Core with the interleaved schedule (2 model chunks of 4 blocks per
/// stage): stage 0 runs blocks 0..4 and 16..20, and its ranks hold those layers' experts in
/// Megatron-Core's expert grid; the bubble is (p − 1)/(v·m + p − 1) with the 32 micro-batches
/// of a data rank, and the first stage keeps (p − 1)·2 + (v − 1)·p + 1 = 11 chunks in flight
/// (5.5 micro-batches' activations, as 11 chunks of half a stage).
#[test]
fn mixtral_for_megatron_core_with_virtual_stages() {
    let mut c = example("mixtral-8x7b");
    c.parallel.virtual_stages = 2;
    let p = plan::build_for(&c, &Overrides::default(), &core_rules()).unwrap();
    assert!(p.megatron_core.is_some());
    assert_eq!((p.pipeline, p.virtual_stages), (4, 2));
    assert_eq!(p.stages[0].chunks, vec![[0, 4], [16, 20]]);
    let layers: Vec<usize> = p.ranks[0].experts.iter().map(|e| e.layer).collect();
    assert_eq!(layers, [0, 1, 2, 3, 16, 17, 18, 19]);
    // the expert grid is the one without virtual stages
    let plain = plan::build_for(
        &example("mixtral-8x7b"),
        &Overrides::default(),
        &core_rules(),
    )
    .unwrap();
    assert_eq!(p.groups, plain.groups);
    assert_eq!(p.ranks[9].experts[0].ids, vec![4, 5, 6, 7]);
    assert_eq!(p.ranks[9].experts[0].hidden, [1792, 3584]);
    let m = p.micro_batches;
    assert_eq!(p.time.bubble_fraction, 3.0 / (2 * m + 3) as f64);
    let memory = &p.stages[0].cost.memory;
    assert_eq!(memory.model, MemoryModel::MegatronCore);
    assert_eq!(memory.in_flight, 11);
    assert_eq!(
        memory.activations,
        memory.activations_per_micro_batch * 11 / 2
    );
    // the same weights and optimizer state per rank as 1F1B (the stage holds 8 blocks either way)
    assert_eq!(memory.weights, plain.stages[0].cost.memory.weights);
    assert_eq!(memory.optimizer, plain.stages[0].cost.memory.optimizer);
}

/// Megatron-Core takes the file's vocabulary and only needs it to split over the tensor ranks:
/// GPT-2's 50,257 at tensor 2 becomes 50,258 rows (a warning), where v2.2 pads to 50,432.
#[test]
fn megatron_core_pads_the_vocabulary_only_to_the_tensor_size() {
    let c = checked(
        gpt("gpt2", 50257, 768, 12, 12, true),
        parallel(2, 2, 1, ExpertGroup::AcrossData),
        Some(train(8, 1024, Precision::Bf16)),
    );
    let p = plan::build_for(&c, &Overrides::default(), &core_rules()).unwrap();
    assert_eq!(p.megatron_core.as_ref().unwrap().padded_vocab, 50_258);
    assert!(p.warnings.iter().any(|d| d.code == "P0104"));
    assert_eq!(
        plan::build(&c).unwrap().stages[0].cost.params.sharded - p.stages[0].cost.params.sharded,
        (50_432 - 50_258) * 768 / 2
    );
}

/// A step's FLOPs pass 2^64 for real trainings (a 400B-parameter dense model on a batch of
/// 16M tokens does 4·10^19); the plan counts them exactly instead of stopping at
/// `u64::MAX`. Here GPT-2 small on 2^25 sequences of 1024 tokens on one GPU, micro-batch 8.
#[test]
fn step_flops_past_2_to_the_64_are_exact() {
    let model = gpt("gpt2", 50257, 768, 12, 12, true);
    let per_token = fmoec::graph::lower(&model, 1024).flops_per_token();
    let plan_of = |sequences: u64| {
        let c = checked(
            model.clone(),
            parallel(1, 1, 1, ExpertGroup::AcrossData),
            Some(train(sequences, 1024, Precision::Bf16)),
        );
        let o = Overrides {
            micro_batch: Some(8),
            ..Overrides::default()
        };
        plan::build_with(&c, &o).unwrap()
    };
    let p = plan_of(1 << 25);
    let tokens = (1u128 << 25) * 1024;
    let expected = u128::from(per_token) * tokens;
    assert!(expected > u128::from(u64::MAX));
    assert_eq!(p.time.model_flops_per_step, expected);
    // The rank's FLOPs (its padded vocabulary included): one micro-batch's, 2^22 times.
    let one_micro_batch = plan_of(8).stages[0].cost.flops_per_step;
    assert_eq!(p.stages[0].cost.flops_per_step, one_micro_batch << 22);
    let json = plan::render::json(&p);
    assert!(json.contains(&format!("\"model_flops_per_step\": {expected}")));
}

/// A capacity factor beyond `experts / top_k` grants each expert more rows than a
/// micro-batch has tokens (a token reaches an expert at most once): the dispatched rows stop
/// at `experts · sb`, so any larger factor, up to the largest float a file can write, costs
/// what `experts / top_k` costs (it overflowed the activation sum before), in both memory
/// models of Megatron.
#[test]
fn capacity_beyond_experts_over_top_k_costs_every_row_once() {
    let train_batch = || train(256, 1024, Precision::Bf16);
    let with_capacity = |train: f64| {
        let mut m = gpt_moe_small();
        for l in &mut m.layers {
            if let Ffn::Moe(moe) = &mut l.ffn {
                moe.gate.capacity.as_mut().unwrap().train = train;
            }
        }
        checked(
            m,
            parallel(16, 2, 1, ExpertGroup::AcrossData),
            Some(train_batch()),
        )
    };
    let o = Overrides {
        micro_batch: Some(2),
        ..Overrides::default()
    };
    let activations = |c: &fmoec::check::Checked, core: bool| {
        let p = if core {
            plan::build_for(c, &o, &core_rules()).unwrap()
        } else {
            plan::build_with(c, &o).unwrap()
        };
        p.stages[0].cost.memory.activations_per_micro_batch
    };
    for core in [false, true] {
        // 32 experts, top-2: a factor of 16 already lets every token reach every expert.
        let whole = activations(&with_capacity(16.0), core);
        assert!(activations(&with_capacity(8.0), core) < whole);
        for huge in [16.5, 1e9, 1e308, f64::MAX] {
            assert_eq!(activations(&with_capacity(huge), core), whole, "{huge}");
        }
    }
}

/// The experts' weight gradients take FP8 operands where the rows an expert and the widths
/// let FP8's matmul save more than its transposed copies cost, as measured on an H100 with
/// the weight gradients on FP8 and on bf16 operands in alternating processes (BENCHMARKS.md
/// 2026-12-08): FP8 at 1024 and 4096 rows of 4096 → 14336 (S1-T4096, S1), bf16 at 128 rows
/// (F0, S1-T512: both precisions only write the gradient) and for narrow experts (S3, 2048
/// → 768 at 1024 rows); never without FP8 tensor cores.
#[test]
fn fp8_weight_gradients_where_their_copies_pay() {
    let hw = fp8_h100();
    let fp8 = |w, h, rows| plan::cost::fp8_weight_gradient(&hw, w, h, rows);
    assert!(fp8(4096, 14336, 4096.0));
    assert!(fp8(4096, 14336, 1024.0));
    assert!(!fp8(4096, 14336, 128.0));
    assert!(!fp8(1024, 4096, 128.0));
    assert!(!fp8(2048, 768, 1024.0));
    assert!(!plan::cost::fp8_weight_gradient(
        &h100(),
        4096,
        14336,
        4096.0
    ));
}

/// Experts of F0's width (1024 → 4096), 128 of them at micro-batch 8 (about 160 rows each),
/// take FP8 with their weight gradients on bf16 operands, and the plan says so; S1's take
/// FP8 throughout.
#[test]
fn the_plan_lists_the_weight_gradients_that_stay_bf16() {
    let build = |width, heads, experts, hidden| {
        let mut m = gpt("moe", 50304, width, heads, 2, true);
        m.layers[1].ffn = fmoec::check::Ffn::Moe(gshard_moe(experts, 2, hidden));
        fp8_plan(
            m,
            parallel(1, 1, 1, ExpertGroup::AcrossData),
            Precision::Fp8 { dense: false },
        )
    };
    let f0 = build(1024, 16, 128, 4096).fp8_fallbacks.unwrap();
    assert_eq!(
        (&f0.experts[..], &f0.weight_gradients[..]),
        (&[][..], &[1][..])
    );
    let text = f0.describe().unwrap();
    assert_eq!(text, "the expert weight gradients of layers [1]");
    let s1 = build(4096, 32, 8, 14336).fp8_fallbacks.unwrap();
    assert_eq!(s1, Default::default());
}
