//! Parameter counts of the ModelGraph against closed forms.

mod plan_fixtures;

use fmoec::check::{Activation, ExpertGroup, Ffn, Norm, Positions, SharedExperts};
use fmoec::graph::{self, NodeKind};
use fmoec::plan;
use plan_fixtures::*;

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
    assert_eq!(shared.params.total(), 2 * 2_361_600);
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
