//! Every impossible configuration gets a located diagnostic with a stable code.

use crate::plan_fixtures::*;
use fmoec::check::{ExpertGroup, Precision};
use fmoec::diag::Diagnostic;
use fmoec::plan::{self, Overrides};

fn errors(c: &fmoec::check::Checked, o: Overrides) -> Vec<Diagnostic> {
    plan::build_with(c, &o).expect_err("plan should fail")
}

fn moe16() -> fmoec::check::Checked {
    checked(
        gpt_moe_small(),
        parallel(16, 2, 1, ExpertGroup::AcrossData),
        Some(train(256, 1024, Precision::Bf16)),
    )
}

#[test]
fn world_not_divisible_points_at_gpus() {
    let mut c = moe16();
    c.parallel.gpus = 12;
    c.parallel.pipeline = 4; // 12 is not a multiple of 2·4 = 8
    let d = errors(&c, Overrides::default());
    assert_eq!(d[0].code, "P0001");
    assert_eq!(d[0].primary.span, span(S_GPUS));
    assert_eq!(d[0].secondary[0].span, span(S_TENSOR));
    assert_eq!(d[0].secondary[1].span, span(S_PIPELINE));
    assert!(d[0].message.contains("12 GPUs"), "{}", d[0].message);
    assert!(d[0].help.as_ref().unwrap().contains("16"));
}

#[test]
fn heads_and_ffn_not_divisible_by_tensor() {
    // 12 heads, hidden 3072 and expert hidden 1536 over tensor 8: heads fail, 3072 and
    // 1536 divide. Tensor 5 over 20 GPUs: heads and both hidden sizes fail.
    let d = errors(
        &moe16(),
        Overrides {
            world: Some(20),
            tensor: Some(5),
            ..Overrides::default()
        },
    );
    let codes: Vec<&str> = d.iter().map(|d| d.code.as_str()).collect();
    assert_eq!(codes, ["P0002", "P0004", "P0005"]);
    assert_eq!(d[0].primary.span, span(S_TENSOR));
    assert_eq!(d[0].secondary[0].span, span(S_HEADS));
    assert_eq!(d[1].primary.span, span(S_MLP));
    assert_eq!(d[2].primary.span, span(S_EXPERT_MLP));
    // Overrides are named, so the user knows the file was not what failed.
    assert!(d[0].notes.iter().any(|n| n.contains("--tensor 5")));
}

#[test]
fn depth_not_divisible_by_pipeline() {
    let d = errors(
        &moe16(),
        Overrides {
            tensor: Some(1),
            pipeline: Some(8),
            ..Overrides::default()
        },
    );
    assert_eq!(d[0].code, "P0006");
    assert_eq!(d[0].primary.span, span(S_PIPELINE));
    assert_eq!(d[0].secondary[0].span, span(S_DEPTH));
}

#[test]
fn experts_not_divisible_by_expert_group() {
    // 32 experts over a data group of 16 ranks is fine; over Size 3 of data 6 it is not.
    let mut c = moe16();
    c.parallel.gpus = 12;
    c.parallel.experts = ExpertGroup::Size { size: 3 };
    c.train = Some(train(48, 1024, Precision::Bf16));
    let d = errors(&c, Overrides::default());
    assert_eq!(
        d.len(),
        1,
        "one diagnostic for all layers sharing a declaration"
    );
    assert_eq!(d[0].code, "P0007");
    assert_eq!(d[0].primary.span, span(S_MOE_EXPERTS));
    assert_eq!(d[0].secondary[0].span, span(S_EXPERTS_GROUP));
    assert!(d[0]
        .message
        .contains("experts = 32 is not divisible by the 3 ranks"));
}

#[test]
fn expert_group_must_divide_data() {
    let d = errors(
        &moe16(),
        Overrides {
            expert_group: Some(ExpertGroup::Size { size: 3 }),
            ..Overrides::default()
        },
    );
    assert_eq!(d[0].code, "P0008");
    assert_eq!(d[0].primary.span, span(S_EXPERTS_GROUP));
}

#[test]
fn over_memory_says_by_how_much_and_what_dominates() {
    // Mixtral-sized experts on 8 GPUs with every expert on every rank.
    let mut m = gpt_moe_small();
    m.width = 4096;
    m.attention.head_dim = 4096 / 12;
    m.attention.heads = 32;
    m.attention.kv_heads = 32;
    m.attention.head_dim = 128;
    for l in m.layers.iter_mut() {
        if let fmoec::check::Ffn::Moe(moe) = &mut l.ffn {
            moe.expert.hidden = 14336;
        }
        if let fmoec::check::Ffn::Dense(d) = &mut l.ffn {
            d.hidden = 14336;
        }
    }
    let c = checked(
        m,
        parallel(8, 1, 1, ExpertGroup::Replicated),
        Some(train(8, 1024, Precision::Bf16)),
    );
    let d = errors(&c, Overrides::default());
    assert_eq!(d[0].code, "P0009");
    assert_eq!(d[0].primary.span, span(S_GPUS).join(span(S_HARDWARE)));
    assert!(d[0].message.contains("over by"), "{}", d[0].message);
    assert!(
        d[0].notes[0].starts_with("the largest part is optimizer state"),
        "{:?}",
        d[0].notes
    );
}

#[test]
fn zero_sizes_and_batch_split() {
    let d = errors(
        &moe16(),
        Overrides {
            tensor: Some(0),
            ..Overrides::default()
        },
    );
    assert_eq!(d[0].code, "P0010");
    let d = errors(
        &moe16(),
        Overrides {
            micro_batch: Some(3),
            ..Overrides::default()
        },
    );
    assert_eq!(d[0].code, "P0011");
    assert_eq!(d[0].primary.span, span(S_BATCH));
}

#[test]
fn auto_finds_plans_and_explains_rejections() {
    let r = plan::search::search(&moe16(), Some(64));
    assert!(!r.feasible.is_empty());
    assert!(r
        .feasible
        .windows(2)
        .all(|w| w[0].time.tokens_per_s >= w[1].time.tokens_per_s));
    // tensor 8 cannot split 12 heads; it must be rejected with P0002.
    assert!(r
        .rejected
        .iter()
        .any(|x| x.code == "P0002" && x.overrides.tensor == Some(8)));
    let text = plan::search::report(&r, 3);
    assert!(text.contains("best plans"), "{text}");
    assert!(text.contains("P0002"), "{text}");
}

#[test]
fn absurd_sizes_are_diagnosed_not_overflowed() {
    let mut c = moe16();
    c.model.vocab = 1 << 40;
    let d = errors(&c, Overrides::default());
    assert_eq!(d[0].code, "P0012");
    // At the limits everything still computes (saturating) and is simply out of memory.
    let mut c = moe16();
    c.model.context = plan::limits::CONTEXT;
    c.model.width = plan::limits::WIDTH;
    c.model.attention.heads = 64;
    c.model.attention.kv_heads = 64;
    c.model.attention.head_dim = plan::limits::WIDTH / 64;
    c.train = Some(train(1 << 30, plan::limits::CONTEXT, Precision::Bf16));
    let d = errors(
        &c,
        Overrides {
            micro_batch: Some(plan::limits::MICRO_BATCH),
            ..Overrides::default()
        },
    );
    assert_eq!(d[0].code, "P0009", "{:?}", d[0].message);
    let r = plan::search::search(&c, Some(plan::limits::GPUS));
    assert!(r.feasible.is_empty());
}

/// `fmoec plan --auto --world N` with N past the planner's limit of GPUs is refused with
/// P0012 at once: the search used to enumerate the divisors of N first, which for 2^64 - 1
/// never ended (and took minutes for any N near 2^63).
#[test]
fn auto_refuses_a_world_past_the_limit_without_enumerating_it() {
    for world in [plan::limits::GPUS + 1, 1 << 62, u64::MAX] {
        let r = plan::search::search(&moe16(), Some(world));
        assert!(r.feasible.is_empty());
        assert!(!r.rejected.is_empty());
        assert!(r.rejected.iter().all(|x| x.code == "P0012"), "{world}");
    }
}

#[test]
fn warnings_for_plans_that_work_but_waste_time() {
    // Tensor 16 on hosts of 8 GPUs; one micro-batch for 4 stages.
    let mut m = gpt_moe_small();
    m.attention.heads = 16;
    m.attention.kv_heads = 16;
    m.attention.head_dim = 48;
    let c = checked(
        m,
        parallel(64, 16, 4, ExpertGroup::AcrossData),
        Some(train(1, 1024, Precision::Bf16)),
    );
    let p = plan::build(&c).unwrap();
    let codes: Vec<&str> = p.warnings.iter().map(|d| d.code.as_str()).collect();
    assert_eq!(codes, ["P0101", "P0102"]);
    assert_eq!(p.warnings[0].primary.span, span(S_TENSOR));
    assert_eq!(p.warnings[1].primary.span, span(S_BATCH));
    assert!(p.warnings[1].message.contains("idles 75%"));
    assert!(plan::build(&moe16()).unwrap().warnings.is_empty());
}

/// A plan whose ranks would list more expert ids than fmoec lists is refused with P0013
/// (a million ranks each holding every replicated expert took all of a 24 GB machine), at
/// the `parallel` block; `--auto`'s search still costs such worlds.
#[test]
fn plans_too_large_to_list_are_refused() {
    let world = plan::limits::GPUS;
    let c = checked(
        gpt_moe_small(),
        parallel(world, 1, 1, ExpertGroup::Replicated),
        Some(train(world, 1024, Precision::Bf16)),
    );
    let d = plan::build(&c).unwrap_err();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].code, "P0013", "{:?}", d[0].message);
    assert!(
        d[0].message
            .contains(&format!("expert ids over its {world} ranks")),
        "{}",
        d[0].message
    );
    assert_eq!(d[0].primary.span, span(S_GPUS).join(span(S_HARDWARE)));
}

/// P0013's count is the number of expert ids the plan's ranks list: each rank lists only its
/// stage's MoE layers, and its share after the target's layout (Megatron-Core holds biased
/// experts whole over expert × tensor ranks). It counted every layer on every rank, and
/// divided by the file's expert group, so it refused plans whose listing fits.
#[test]
fn the_listing_limit_counts_the_ids_the_ranks_list() {
    let mut biased = gpt_moe_small();
    biased.bias = true;
    let targets = fmoec::emit::registry::targets().unwrap();
    let mut rules: Vec<plan::TargetRules> = vec![plan::TargetRules::default()];
    rules.extend(targets.iter().map(|t| plan::TargetRules::of(&t.decl)));
    let mut compared = 0;
    for model in [gpt_moe_small(), biased] {
        for (gpus, tensor, pipeline) in [(16, 2, 1), (16, 2, 2), (32, 2, 4), (8, 1, 2)] {
            for experts in [ExpertGroup::AcrossData, ExpertGroup::Replicated] {
                for slicing in [false, true] {
                    let mut par = parallel(gpus, tensor, pipeline, experts);
                    par.expert_slicing = slicing;
                    let c = checked(model.clone(), par, Some(train(64, 1024, Precision::Bf16)));
                    for r in &rules {
                        let Ok(p) = plan::build_for(&c, &Overrides::default(), r) else {
                            continue;
                        };
                        let listed: u64 = p
                            .ranks
                            .iter()
                            .flat_map(|rank| &rank.experts)
                            .map(|held| held.ids.len() as u64)
                            .sum();
                        let per_stage = p.world / p.pipeline;
                        assert_eq!(
                            plan::listed_expert_ids(per_stage, &p.moe_layers),
                            listed,
                            "{gpus} GPUs, tensor {tensor}, pipeline {pipeline}, {experts:?}, slicing {slicing}"
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared >= 64, "{compared} plans compared");
}
