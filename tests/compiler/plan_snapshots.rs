//! Snapshots of the plan table, JSON and DOT for hand-built models (the fixtures) and,
//! once the front end parses them, for every file in `examples/`. Review diffs with
//! `cargo insta review`; never accept blindly.

use crate::plan_fixtures::*;
use fmoec::check::{self, Activation, ExpertGroup, Ffn, GateKind, Norm, Positions, Precision};
use fmoec::plan;

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

/// Checks one example with the real front end.
fn load_example(path: &std::path::Path) -> check::Checked {
    let text = std::fs::read_to_string(path).unwrap();
    let mut sources = fmoec::diag::Sources::new();
    let file = sources.add(path.display().to_string(), text);
    let mut sink = fmoec::diag::Sink::new();
    let checked = check::check_file(&mut sources, file, &mut sink);
    assert!(
        !sink.has_errors(),
        "{}: {:?}",
        path.display(),
        sink.diagnostics()
    );
    checked.unwrap()
}

fn examples() -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "fmoe"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

#[test]
fn every_example_plans_and_matches_its_snapshots() {
    for path in examples() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let c = load_example(&path);
        let p = plan::build(&c).unwrap_or_else(|d| panic!("{name}: {:#?}", d));
        // Invariants every plan keeps.
        assert_eq!(p.world, p.tensor * p.pipeline * p.data, "{name}");
        assert_eq!(p.ranks.len() as u64, p.world, "{name}");
        assert!(p
            .ranks
            .iter()
            .all(|r| r.memory_bytes <= p.hardware.memory_bytes));
        insta::assert_snapshot!(format!("example_{name}_table"), plan::render::table(&p));
        insta::assert_snapshot!(format!("example_{name}_json"), plan::render::json(&p));
    }
}

#[test]
fn auto_finds_plans_for_mixtral_on_64_h100s() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mixtral-8x7b.fmoe");
    let c = load_example(&path);
    assert_eq!(c.parallel.gpus, 64);
    let r = plan::search::search(&c, None);
    assert!(r.feasible.len() >= 5);
    // Every plan found fits and keeps tensor parallelism inside one 8-GPU host.
    for p in &r.feasible {
        assert!(p.tensor <= 8);
        assert!(p.max_memory_bytes <= c.parallel.hardware.memory_bytes);
    }
    // The best candidate expands into a full plan with the same estimate.
    let best = r.feasible[0].plan(&c).unwrap();
    assert_eq!(best.time, r.feasible[0].time);
    assert_eq!(best.ranks.len(), 64);
    // Mixtral's 8 experts cannot spread over more than 8 ranks.
    assert!(r
        .rejected
        .iter()
        .filter(|x| x.code == "P0007")
        .all(|x| x.message.contains("experts = 8")));
    insta::assert_snapshot!("example_mixtral_auto", plan::search::report(&r, 5));
}

#[test]
fn fixture_gpt_moe_small_fastermoe_skewed() {
    // FasterMoE's options on 8 ranks of one host, the busiest expert at 8x the mean (a
    // quarter of the tokens)
    let mut p = parallel(8, 1, 1, ExpertGroup::AcrossData);
    p.smart_schedule = check::SmartSchedule::Auto;
    p.shadowing = check::Shadowing::Dynamic;
    let c = checked(gpt_moe_small(), p, Some(train(64, 1024, Precision::Bf16)));
    let o = plan::Overrides {
        routing_skew: Some(8.0),
        ..plan::Overrides::default()
    };
    let p = plan::build_with(&c, &o).unwrap();
    let table = plan::render::table(&p);
    let section = &table[table.find("\ntime per rank").unwrap()..];
    insta::assert_snapshot!("gpt_moe_small_fastermoe_skewed_table", section);
    let json = serde_json::to_string_pretty(&p.fastermoe).unwrap();
    insta::assert_snapshot!("gpt_moe_small_fastermoe_skewed_json", json);
}
