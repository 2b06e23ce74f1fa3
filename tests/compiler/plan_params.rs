//! Parameter counts of the ModelGraph against closed forms.

use crate::plan_fixtures::*;
use fmoec::check::{Activation, ExpertGroup, Ffn, Norm, Positions, SharedExperts};
use fmoec::graph::{self, NodeKind};
use fmoec::plan;

/// Closed form of a GPT-2-style model with tied embeddings:
/// `V·h + n_ctx·h + L·(12h² + 13h) + 2h` (per block: 2 LayerNorms 4h, QKV 3h²+3h,
/// projection h²+h, MLP 8h²+5h).
fn gpt2_closed_form(v: u64, n_ctx: u64, h: u64, l: u64) -> u64 {
    v * h + n_ctx * h + l * (12 * h * h + 13 * h) + 2 * h
}

#[test]
fn gpt2_small_tied_is_124_439_808() {
    let m = gpt("gpt2", 50257, 768, 12, 12, true);
    let g = graph::lower(&m, 1024);
    assert_eq!(g.params().total(), 124_439_808);
    assert_eq!(g.params().total(), gpt2_closed_form(50257, 1024, 768, 12));
    // Node order: embedding, 12 blocks of 6 dense nodes, final norm, head, loss.
    assert_eq!(g.node_count(), 1 + 12 * 6 + 3);
    let kinds: Vec<NodeKind> = g.nodes().map(|(_, n)| n.kind).take(7).collect();
    assert_eq!(
        kinds,
        [
            NodeKind::Embedding,
            NodeKind::Norm,
            NodeKind::Attention,
            NodeKind::Residual,
            NodeKind::Norm,
            NodeKind::Mlp,
            NodeKind::Residual
        ]
    );
}

#[test]
fn gpt2_sizes_and_untied_head() {
    // GPT-2 medium / large / xl (tied): 354,823,168 / 774,030,080 / 1,557,611,200.
    for (h, heads, l, want) in [
        (1024, 16, 24, 354_823_168u64),
        (1280, 20, 36, 774_030_080),
        (1600, 25, 48, 1_557_611_200),
    ] {
        let g = graph::lower(&gpt("gpt2", 50257, h, heads, l, true), 1024);
        assert_eq!(g.params().total(), want, "h={h}");
        assert_eq!(want, gpt2_closed_form(50257, 1024, h, l as u64));
    }
    let untied = graph::lower(&gpt("gpt2", 50257, 768, 12, 12, false), 1024);
    assert_eq!(untied.params().total(), 124_439_808 + 50257 * 768);
}

#[test]
fn moe_layer_params() {
    let m = gpt_moe_small();
    let g = graph::lower(&m, 1024);
    let h = 768u64;
    // Each MoE layer: gate h·E + E (bias); E experts of (h·f + f + f·h + h), f = 1536.
    let gate = h * 32 + 32;
    let expert = h * 1536 + 1536 + 1536 * h + h;
    assert_eq!(gate, 24_608);
    assert_eq!(expert, 2_361_600);
    let dense_block = 12 * h * h + 13 * h;
    let moe_block = 4 * h * h + 8 * h + gate + 32 * expert; // attention + norms + moe
    let want = 50304 * h + 1024 * h + 6 * dense_block + 6 * moe_block + 2 * h;
    let p = g.params();
    assert_eq!(p.total(), want);
    assert_eq!(p.expert, 6 * 32 * expert);
    assert_eq!(p.gate, 6 * gate);
    let c = checked(m, parallel(1, 1, 1, ExpertGroup::AcrossData), None);
    let mp = plan::model_params(&g, &c);
    // A token goes through top_k = 2 experts per MoE layer.
    assert_eq!(mp.active, want - 6 * 32 * expert + 6 * 2 * expert);
}

#[test]
fn mixtral_shapes_swiglu_gqa_rmsnorm() {
    // Mixtral-8x7B: h 4096, 32 layers, 32 heads, 8 kv heads, 8 experts of SwiGLU 14336,
    // vocab 32000, untied, no biases, RMSNorm, rotary: 46,702,792,704 parameters.
    let mut m = gpt("mixtral", 32000, 4096, 32, 32, false);
    m.attention.kv_heads = 8;
    m.attention.head_dim = 128;
    m.norm = Norm::RmsNorm;
    m.positions = Positions::Rotary;
    m.bias = false;
    for l in m.layers.iter_mut() {
        let mut moe = gshard_moe(8, 2, 14336);
        moe.expert.act = Activation::Swiglu;
        moe.gate.kind = fmoec::check::GateKind::Naive;
        l.ffn = Ffn::Moe(moe);
    }
    let g = graph::lower(&m, 4096);
    assert_eq!(g.params().total(), 46_702_792_704);
}

#[test]
fn shared_experts_are_dense_and_flops_count_top_k() {
    let mut m = gpt_moe_small();
    if let Ffn::Moe(moe) = &mut m.layers[1].ffn {
        moe.shared = Some(SharedExperts {
            count: 2,
            expert: mlp(1536, Activation::Gelu, 20),
        });
    }
    let g = graph::lower(&m, 1024);
    let shared = g
        .nodes()
        .find(|(_, n)| n.kind == NodeKind::SharedExperts)
        .map(|(_, n)| n.clone())
        .unwrap();
    // One MLP of hidden 2 × 1536 (one output bias): 2·768·3072 + 3072 + 768, as the
    // runtime builds it; two separate experts would hold one more bias of 768.
    assert_eq!(shared.params.total(), 2 * 768 * 3072 + 3072 + 768);
    assert_eq!(shared.params.total(), 2 * 2_361_600 - 768);
    assert_eq!(shared.flops_fwd, 2 * 2 * 768 * 3072);
    let experts = g
        .nodes()
        .find(|(_, n)| n.kind == NodeKind::Experts)
        .map(|(_, n)| n.clone())
        .unwrap();
    // top_k = 2 experts of 2 matrices 768×1536, 2 FLOPs per multiply-add.
    assert_eq!(experts.flops_fwd, 2 * 2 * 2 * 768 * 1536);
    assert_eq!(experts.flops_bwd, 2 * experts.flops_fwd);
    // Shared experts feed the residual beside the combine.
    let dot = g.to_dot(1, |_| 0);
    assert!(dot.contains("layers.1.moe.shared_experts"));
}

#[test]
fn dense_flops_match_megatron_per_token_count() {
    // Megatron's per-token forward FLOPs for GPT: 24·h²·(1 + s/(6h)) per layer
    // + 2·V·h for the head.
    let (h, s, l, v) = (768u64, 1024u64, 12u64, 50257u64);
    let g = graph::lower(&gpt("gpt2", v, h, 12, l as usize, true), s);
    let fwd: u64 = g.nodes().map(|(_, n)| n.flops_fwd).sum();
    assert_eq!(fwd, l * (24 * h * h + 4 * s * h) + 2 * v * h);
    assert_eq!(g.flops_per_token(), 3 * fwd);
}

/// Issue 14, item 6: one model, one parameter count. For every example and every stdlib
/// expert kind, the planner's count equals the runtime's (the model `fmoec run` builds, its
/// parameters counted) and the emitted module's (its MoE layer classes built by Python from
/// the same layer specs, their parameters counted).
///
/// What each side can build, and so what is compared:
/// - Sizes: the examples have up to 47 billion parameters, too many to allocate here, so
///   each model is shrunk first (width 4 per head, vocabulary 256, context 16, every hidden
///   size about 8 per width of the original) keeping everything that decides which tensors
///   exist: depth, norms, positions, biases, tying, key/value heads, activations, gates,
///   expert counts, shared experts. A count that differs in structure (the SwiGLU bias this
///   test was written for) differs at any size.
/// - The runtime: every model whole. It ties the LM head to the embedding, so an untied
///   model (Mixtral, DeepSeek) is built tied and compared with the planner's tied count;
///   the untied head's `vocab·width` is checked in `gpt2_sizes_and_untied_head`.
/// - The emitted module (Megatron-LM v2.2's `fmoec_moe.py`): each MoE layer's gate and
///   routed experts, from the module's own `MoELayer` class with that layer's spec (the
///   module builds no more of the model; Megatron does). Its classes cannot express shared
///   experts (v2.2 has none) nor linear layers without biases (their biases always exist):
///   for those, the routed experts and the gate are compared, and for a bias-free model
///   the module's weight matrices alone. `fmoec emit` refuses such models (Mixtral and
///   DeepSeek among the examples) with a diagnostic; another target will emit them.
#[test]
fn planner_runtime_and_emitted_module_count_the_same_parameters() {
    let mut models: Vec<(String, fmoec::check::Model)> = Vec::new();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "fmoe"))
        .collect();
    files.sort();
    for path in &files {
        let c = check_text(&std::fs::read_to_string(path).unwrap());
        models.push((path.display().to_string(), shrink(&c.model)));
    }
    assert!(models.len() >= 6, "{} examples", models.len());
    // Every expert kind with and without biases and shared experts; the gates (whose count
    // does not depend on the experts) taken in turn, so that each meets both biases.
    let gates = ["naive", "noisy", "gshard", "switch", "swipe"];
    let mut turn = 0;
    for act in ["gelu", "relu", "swiglu"] {
        for shared in [false, true] {
            for bias in [true, false] {
                let gate = gates[turn % gates.len()];
                turn += 1;
                let c = check_text(&expert_kind_file(act, bias, shared, gate));
                let name = format!("{act}, bias {bias}, shared {shared}, {gate}");
                models.push((name, c.model));
            }
        }
    }

    #[cfg(feature = "runtime")]
    for (name, model) in &models {
        let tied = fmoec::check::Model {
            tied_embeddings: true,
            ..model.clone()
        };
        let planner = graph::lower(&tied, 16).params().total();
        // Building draws the initial weights from libtorch's process-wide generator.
        let built = {
            let _rng = fmoec::runtime::model::lock_rng();
            fmoec::runtime::model::Transformer::new(
                &tied,
                tch::Device::Cpu,
                tch::Kind::Float,
                tch::Kind::Float,
            )
        }
        .unwrap_or_else(|e| panic!("{name}: the runtime cannot build it: {e:#}"));
        assert_eq!(
            built.store.numel() as u64,
            planner,
            "{name}: the runtime's parameters against the planner's"
        );
    }

    let Some(counts) = emitted_module_moe_counts(&models) else {
        eprintln!("skipped the emitted module: no python with torch (set FMOEC_PYTHON)");
        return;
    };
    let mut compared = 0;
    for (name, model) in &models {
        let g = graph::lower(model, 16);
        for (layer, moe) in model.moe_layers() {
            let node = |part: &str| {
                g.nodes()
                    .find(|(_, n)| n.name == format!("layers.{layer}.moe.{part}"))
                    .map(|(_, n)| n.params.total())
                    .unwrap_or_else(|| panic!("{name}: no node layers.{layer}.moe.{part}"))
            };
            let planner = node("gate") + node("experts");
            let (weights, biases) = counts[&format!("{name}/{layer}")];
            let module = if model.bias {
                weights + biases
            } else {
                weights
            };
            assert_eq!(
                module, planner,
                "{name}, layer {layer} ({} experts of {:?}): the emitted module's gate and \
                 routed experts against the planner's",
                moe.experts, moe.expert.act
            );
            compared += 1;
        }
    }
    assert!(compared > 24, "{compared} MoE layers compared");
}

/// A checked file; panics on any diagnostic.
fn check_text(text: &str) -> fmoec::check::Checked {
    let mut sources = fmoec::diag::Sources::new();
    let file = sources.add("t.fmoe", text.to_string());
    let mut sink = fmoec::diag::Sink::new();
    let checked = fmoec::check::check_file(&mut sources, file, &mut sink);
    let diags = sink.into_sorted();
    assert!(
        diags.is_empty(),
        "{}",
        fmoec::diag::render_human(&sources, &diags)
    );
    checked.expect("checks")
}

/// A small model whose every other layer is an MoE layer of the given kind.
fn expert_kind_file(act: &str, bias: bool, shared: bool, gate: &str) -> String {
    let top_k = if gate == "switch" { 1 } else { 2 };
    let shared = if shared {
        format!(", shared = shared_experts(count = 2, expert = mlp(hidden = 24, act = {act}))")
    } else {
        String::new()
    };
    format!(
        "use std.gates.{gate}\n\
         model m {{\n    vocab = 256; context = 16; width = 32; heads = 4; depth = 4\n    \
         bias = {bias}\n    \
         block = transformer(attention = causal(), ffn = mlp(hidden = 64, act = {act}))\n    \
         layers[1..depth step 2].ffn = moe(experts = 4, top_k = {top_k}, gate = {gate}(), \
         expert = mlp(hidden = 40, act = {act}){shared})\n}}\n"
    )
}

/// `m` with small sizes and the same structure (see the test above).
fn shrink(m: &fmoec::check::Model) -> fmoec::check::Model {
    let width = 4 * m.attention.heads;
    // about 8 per width of the original: GPT-2 XL's 24 layers of 64 experts stay small
    let scale = |hidden: u64| (hidden * 8 / m.width).div_ceil(8).max(1) * 8;
    let mut small = m.clone();
    small.width = width;
    small.vocab = 256;
    small.context = 16;
    small.attention.head_dim = 4;
    for l in &mut small.layers {
        match &mut l.ffn {
            Ffn::Dense(d) => d.hidden = scale(d.hidden),
            Ffn::Moe(moe) => {
                moe.expert.hidden = scale(moe.expert.hidden);
                if let Some(s) = &mut moe.shared {
                    s.expert.hidden = scale(s.expert.hidden);
                }
            }
        }
    }
    small
}

/// Every MoE layer of `models` built by the emitted module's `MoELayer` in Python: weights
/// and biases counted apart, by `"{model}/{layer}"`. `None` without a Python with torch.
fn emitted_module_moe_counts(
    models: &[(String, fmoec::check::Model)],
) -> Option<std::collections::BTreeMap<String, (u64, u64)>> {
    let python = match std::env::var_os("FMOEC_PYTHON") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let venv = std::path::PathBuf::from(std::env::var_os("HOME")?)
                .join(".cache/fmoec/venv/bin/python");
            venv.exists().then_some(venv)?
        }
    };
    // The module as a user gets it: `fmoec emit` on an example.
    let dir = tempfile::tempdir().unwrap();
    let emitted = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(["emit", "--megatron", "v2.2", "examples/tiny.fmoe", "-o"])
        .arg(dir.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        emitted.status.success(),
        "{}",
        String::from_utf8_lossy(&emitted.stderr)
    );
    let mut cases = Vec::new();
    for (name, model) in models {
        for (layer, moe) in model.moe_layers() {
            let act = match moe.expert.act {
                fmoec::check::Activation::Gelu => "gelu",
                fmoec::check::Activation::Relu => "relu",
                fmoec::check::Activation::Swiglu => "swiglu",
            };
            let gate = format!("{:?}", moe.gate.kind).to_lowercase();
            cases.push(serde_json::json!({
                "key": format!("{name}/{layer}"),
                "width": model.width,
                "layer": layer,
                "spec": {
                    "experts": moe.experts, "top_k": moe.top_k, "gate": gate,
                    "hidden": moe.expert.hidden, "act": act,
                    "capacity": moe.gate.capacity.map(|c| [c.train, c.eval]),
                    "balance_loss": moe.gate.balance_loss, "jitter": moe.gate.jitter,
                    "random_routing": moe.gate.random_routing,
                },
            }));
        }
    }
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&cases_file, serde_json::to_string(&cases).unwrap()).unwrap();
    let script = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import fmoec_moe as m
out = {}
for case in json.load(open(sys.argv[2])):
    spec = dict(case['spec'])
    if spec['capacity'] is not None:
        spec['capacity'] = tuple(spec['capacity'])
    layer = m.MoELayer(spec, case['width'], spec['experts'], m.Topology(), layer_index=case['layer'])
    weights = sum(p.numel() for n, p in layer.named_parameters() if not n.endswith('bias'))
    biases = sum(p.numel() for n, p in layer.named_parameters() if n.endswith('bias'))
    out[case['key']] = [weights, biases]
print(json.dumps(out))
"#;
    let run = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(dir.path())
        .arg(&cases_file)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let counts: std::collections::BTreeMap<String, (u64, u64)> =
        serde_json::from_slice(&run.stdout).unwrap();
    Some(counts)
}
