//! Snapshots of the plan table, JSON and DOT for hand-built models (the fixtures) and,
//! once the front end parses them, for every file in `examples/`. Review diffs with
//! `cargo insta review`; never accept blindly.

mod plan_fixtures;

use fmoec::check::{self, Activation, ExpertGroup, Ffn, GateKind, Norm, Positions, Precision};
use fmoec::plan;
use plan_fixtures::*;

fn mixtral_64() -> check::Checked {
    let mut m = gpt("mixtral", 32000, 4096, 32, 32, false);
    m.attention.kv_heads = 8;
    m.attention.head_dim = 128;
    m.norm = Norm::RmsNorm;
    m.positions = Positions::Rotary;
    m.bias = false;
    for l in m.layers.iter_mut() {
        let mut moe = gshard_moe(8, 2, 14336);
        moe.expert.act = Activation::Swiglu;
        moe.gate.kind = GateKind::Naive;
        moe.gate.capacity = None;
        l.ffn = Ffn::Moe(moe);
    }
    checked(
        m,
        parallel(64, 8, 1, ExpertGroup::AcrossData),
        Some(train(512, 4096, Precision::Bf16)),
    )
}

#[test]
fn fixture_gpt2_small_one_gpu_plan_only() {
    let c = checked(
        gpt("gpt2", 50257, 768, 12, 12, true),
        parallel(1, 1, 1, ExpertGroup::AcrossData),
        None,
    );
    let p = plan::build(&c).unwrap();
    insta::assert_snapshot!("gpt2_small_table", plan::render::table(&p));
}

#[test]
fn fixture_gpt_moe_small_16() {
    let c = checked(
        gpt_moe_small(),
        parallel(16, 2, 2, ExpertGroup::Size { size: 2 }),
        Some(train(256, 1024, Precision::Bf16)),
    );
    let p = plan::build(&c).unwrap();
    insta::assert_snapshot!("gpt_moe_small_table", plan::render::table(&p));
    insta::assert_snapshot!("gpt_moe_small_json", plan::render::json(&p));
    let g = fmoec::graph::lower(&c.model, p.seq_len);
    insta::assert_snapshot!("gpt_moe_small_dot", plan::render::dot(&p, &g));
}

#[test]
fn fixture_mixtral_64_auto() {
    let c = mixtral_64();
    let p = plan::build(&c).unwrap();
    insta::assert_snapshot!("mixtral_64_table", plan::render::table(&p));
    let r = plan::search::search(&c, None);
    insta::assert_snapshot!("mixtral_64_auto", plan::search::report(&r, 5));
}
