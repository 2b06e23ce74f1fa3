//! What the language means, checked on small files: the values that come out in
//! `Checked` for constants, arithmetic, definitions, presets, selections, user hardware
//! profiles and defaults.

use fmoec::check::{self, Activation, ExpertGroup, Ffn, GateKind, Norm, Positions, Precision};
use fmoec::diag::{render_human, Sink, Sources};

fn check_ok(text: &str) -> check::Checked {
    let mut sources = Sources::new();
    let file = sources.add("t.fmoe", text);
    let mut sink = Sink::new();
    let checked = check::check_file(&mut sources, file, &mut sink);
    let diags = sink.into_sorted();
    assert!(diags.is_empty(), "{}", render_human(&sources, &diags));
    checked.expect("checks")
}

/// The codes `fmoec check` reports (the front end's and the planner's), in file order.
fn codes(text: &str) -> Vec<String> {
    let mut sources = Sources::new();
    let file = sources.add("t.fmoe", text);
    let analysis = fmoec::driver::analyse(
        &mut sources,
        file,
        &Default::default(),
        fmoec::driver::Rules::AS_WRITTEN,
    );
    analysis.diagnostics.into_iter().map(|d| d.code).collect()
}

const SMALL: &str = "
model m {
    vocab = 256
    context = 64
    width = 96
    heads = 4
    depth = 6
    block = transformer(attention = causal(), ffn = mlp(hidden = 4 * width))
";

#[test]
fn defaults_of_a_plan_only_file() {
    let c = check_ok(&format!("{SMALL}}}\n"));
    assert!(c.train.is_none());
    assert!(!c.parallel.declared);
    assert_eq!(
        (c.parallel.gpus, c.parallel.data, c.parallel.tensor),
        (1, 1, 1)
    );
    assert_eq!(c.parallel.hardware.name, "h100_sxm");
    let m = &c.model;
    assert_eq!(m.attention.kv_heads, 4);
    assert_eq!(m.attention.head_dim, 24);
    assert_eq!(
        (m.norm, m.positions, m.bias, m.tied_embeddings),
        (Norm::LayerNorm, Positions::Learned, true, true)
    );
    assert_eq!(m.layers.len(), 6);
    assert!(m.layers.iter().enumerate().all(|(i, l)| l.index == i));
    assert!(
        matches!(&m.layers[0].ffn, Ffn::Dense(mlp) if mlp.hidden == 384 && mlp.act == Activation::Gelu)
    );
}

/// A step as large as an integer goes (2^63 - 1) selects the range's first layer: the
/// next index overflowed (a panic in a debug build; in a release build it wrapped and
/// selected layers 2^63 and 2^64 - 1).
#[test]
fn a_step_past_the_range_selects_its_first_layer() {
    let c = check_ok(&format!(
        "use std.gates.*\n{SMALL}
    layers[1..depth step 9223372036854775807].ffn = moe(experts = 8, gate = gshard(), expert = mlp(hidden = 96))
}}
"
    ));
    let moe: Vec<usize> = c
        .model
        .layers
        .iter()
        .filter(|l| matches!(l.ffn, Ffn::Moe(_)))
        .map(|l| l.index)
        .collect();
    assert_eq!(moe, [1]);
}

#[test]
fn selections_ranges_steps_lists_and_override() {
    let c = check_ok(&format!(
        "use std.gates.*\n{SMALL}
    layers[1..depth step 2].ffn = moe(experts = 8, gate = gshard(), expert = mlp(hidden = 4 * width / 2))
    layers[0, 2].ffn = moe(experts = 4, top_k = 1, gate = switch(), expert = mlp(hidden = 32, act = relu))
    override layers[5].ffn = mlp(hidden = 8)
}}
"
    ));
    let kinds: Vec<String> = c
        .model
        .layers
        .iter()
        .map(|l| match &l.ffn {
            Ffn::Dense(m) => format!("dense{}", m.hidden),
            Ffn::Moe(m) => format!("moe{}x{}", m.experts, m.expert.hidden),
        })
        .collect();
    assert_eq!(
        kinds,
        ["moe4x32", "moe8x192", "moe4x32", "moe8x192", "dense384", "dense8"]
    );
    let Ffn::Moe(switch) = &c.model.layers[0].ffn else {
        panic!()
    };
    assert_eq!(switch.gate.kind, GateKind::Switch);
    assert_eq!(switch.gate.jitter, 0.1);
    let Ffn::Moe(gshard) = &c.model.layers[1].ffn else {
        panic!()
    };
    assert!(gshard.gate.random_routing);
    assert_eq!(
        gshard.gate.capacity.map(|c| (c.train, c.eval)),
        Some((1.2, 2.4))
    );
}

#[test]
fn arithmetic_definitions_and_rounding() {
    let c = check_ok(
        "
const base = 64
/// A SwiGLU expert of 8/3 of `scale * base`, rounded down.
def swiglu_expert(scale = 1) = mlp(hidden = floor(scale * base * 8 / 3), act = swiglu)
model m {
    vocab = 2 * 128; context = base
    width = base * 2
    heads = (width / 32) % 5
    depth = 2
    block = transformer(attention = causal(), ffn = swiglu_expert(scale = 2))
    layers[1].ffn = moe(experts = ceil(7 / 2),
                        top_k = 1,
                        expert = swiglu_expert())
}
",
    );
    assert_eq!(c.model.vocab, 256);
    assert_eq!(c.model.attention.heads, 4);
    assert!(
        matches!(&c.model.layers[0].ffn, Ffn::Dense(m) if m.hidden == 341 && m.act == Activation::Swiglu)
    );
    assert!(
        matches!(&c.model.layers[1].ffn, Ffn::Moe(m) if m.experts == 4 && m.expert.hidden == 170)
    );
}

#[test]
fn presets_follow_overridden_fields() {
    let c = check_ok(
        "use std.presets.gpt2_medium\nmodel m : gpt2_medium {\n    width = 512\n    depth = 2\n}\n",
    );
    assert_eq!(c.model.attention.heads, 16);
    assert_eq!(c.model.layers.len(), 2);
    assert!(matches!(&c.model.layers[1].ffn, Ffn::Dense(m) if m.hidden == 2048));
    let mix = check_ok("use std.presets.mixtral_8x7b\nmodel m : mixtral_8x7b {}\n");
    assert_eq!(
        (mix.model.attention.kv_heads, mix.model.norm, mix.model.bias),
        (8, Norm::RmsNorm, false)
    );
    assert!(mix
        .model
        .moe_layers()
        .all(|(_, m)| m.experts == 8 && m.top_k == 2 && m.expert.act == Activation::Swiglu));
    let ds = check_ok("use std.presets.deepseek_moe_16b\nmodel m : deepseek_moe_16b {}\n");
    assert!(matches!(ds.model.layers[0].ffn, Ffn::Dense(_)));
    let (_, moe) = ds.model.moe_layers().next().unwrap();
    assert_eq!(
        (moe.experts, moe.top_k, moe.shared.as_ref().map(|s| s.count)),
        (64, 6, Some(2))
    );
}

#[test]
fn user_hardware_parallel_and_train() {
    let c = check_ok(&format!(
        "hardware lab {{
    memory = 24 * 1000000000; bf16_tflops = 165.0; fp16_tflops = 165.0; fp32_tflops = 82.6
    hbm_gbps = 1008.0; nvlink_gbps = 32.0; network_gbps = 12.5; gpus_per_node = 4
}}
{SMALL}}}
parallel {{
    gpus = 12 of lab
    pipeline = 3
    experts = groups_of(2)
    micro_batch = 2
}}
train {{
    data = megatron(\"data/x\")
    batch = 16
    steps = 100
    optimizer = adamw(lr = 3e-4, betas = (0.9, 0.95),)
    clip_grad = none
    precision = bf16
    checkpoint = every(50, dir = \"c\")
}}
"
    ));
    assert_eq!(c.parallel.hardware.name, "lab");
    assert_eq!(c.parallel.hardware.gpus_per_node, 4);
    assert_eq!(
        (c.parallel.data, c.parallel.experts),
        (4, ExpertGroup::Size { size: 2 })
    );
    let t = c.train.unwrap();
    assert_eq!((t.batch_sequences, t.seq_len), (16, 64));
    assert_eq!(t.clip_grad, None);
    assert_eq!(t.precision, Precision::Bf16);
    assert_eq!(t.seed, 1234);
    assert_eq!(
        t.checkpoint.map(|c| (c.every, c.dir)),
        Some((50, "c".to_string()))
    );
    assert!(t.eval.is_none());
}

/// `none` switches a policy off: the block is valid and the run has neither.
#[test]
fn checkpoint_and_eval_none_switch_them_off() {
    let c = check_ok(&format!(
        "{SMALL}}}
train {{
    data = megatron(\"data/x\")
    batch = 16
    steps = 100
    optimizer = adamw(lr = 3e-4)
    schedule = cosine(warmup = 10)
    checkpoint = none
    eval = none
}}
"
    ));
    let t = c.train.unwrap();
    assert!(t.checkpoint.is_none());
    assert!(t.eval.is_none());
    assert_eq!(t.clip_grad, Some(1.0));
    assert!(matches!(
        t.schedule,
        check::Schedule::Cosine { warmup: 10, .. }
    ));
}

#[test]
fn errors_are_all_reported_in_one_run() {
    let found = codes(&format!(
        "{SMALL}
    layers[9].ffn = mlp(hidden = 4)
    layers[0].ffn = moe(experts = 2, top_k = 3, expert = mlp(hidden = 4))
}}
parallel {{ gpus = 7; tensor = 2 }}
"
    ));
    // the model could not be built (layer 9): of the planner's rules, those about the
    // placement alone still run
    assert_eq!(found, ["E0406", "E0412", "P0001"]);
}

#[test]
fn inexact_division_is_an_error_only_where_an_integer_is_needed() {
    let fine = format!("{SMALL}}}\ntrain {{ data = builtin(\"shakespeare\"); batch = 4; steps = 10; optimizer = adamw(lr = 1 / 3) }}\n");
    assert!(codes(&fine).is_empty());
    let bad = fine.replace("steps = 10", "steps = 10 / 3");
    assert_eq!(codes(&bad), ["E0302"]);
}
