//! Tensor parallelism in the runtime's model (Megatron-LM column/row-parallel layers,
//! FastMoE's expert slicing), on in-process ranks: a model split over tensor ranks (and
//! data ranks) must give the single-rank model's loss, logits and, once the reference
//! gradient is sliced the way the parameters are, its gradients; the global gradient norm
//! and the clipped gradients too. A backward that skips the tensor group's gradient
//! all-reduce must be caught by the same comparison.

use crate::runtime_common;

use std::time::Duration;

use fmoec::check::*;
use fmoec::collective::local::{local_tensor_groups, local_world, LocalCollective};
use fmoec::collective::ExpertPlacement;
use fmoec::collective::{
    clip_global_norm_tensor_parallel, reduce_gradients, sum_partial_gradients, tensor_groups,
    Collective, GroupKind, GroupLabel, GroupLayout, Groups, ParamKind, Tape, TensorSplit,
};
use fmoec::runtime::distributed::param_kind;
use fmoec::runtime::model::{
    lock_rng, ExchangedExperts, FfnModule, TensorParallel, TensorPass, Transformer,
};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(120);
const SEED: i64 = 7;
const MAX_NORM: f64 = 0.05;

/// The micro-batch key the gates are seeded from (the same on every rank and in the
/// reference, so random gates draw the same).
const ROUTING_KEY: [u64; 3] = [1, 0, 0];

/// The runtime tests' tiny model (a dense and an MoE block), by default with naive top-2
/// gating (no capacity), optionally with a shared expert and SwiGLU experts.
fn model(shared: bool, swiglu: bool) -> Model {
    model_with(GateKind::Naive, shared, swiglu)
}

fn model_with(gate: GateKind, shared: bool, swiglu: bool) -> Model {
    let mut m = runtime_common::tiny_model(gate);
    for layer in &mut m.layers {
        if let Ffn::Moe(moe) = &mut layer.ffn {
            if swiglu {
                moe.expert.act = Activation::Swiglu;
            }
            if shared {
                moe.shared = Some(SharedExperts {
                    count: 1,
                    expert: Mlp {
                        hidden: 32,
                        act: Activation::Gelu,
                        span: Default::default(),
                    },
                });
            }
        }
    }
    m
}

fn build(m: &Model, kind: Kind, tp: Option<TensorParallel>) -> Transformer {
    // In-process ranks share libtorch's generator with the gates' seeded draws.
    let _guard = lock_rng();
    tch::manual_seed(SEED);
    let mut model =
        Transformer::new_tensor_parallel(m, Device::Cpu, kind, kind, tp).expect("model builds");
    model.set_routing_key(Some(&ROUTING_KEY)).unwrap();
    model
}

/// The whole model cut to the experts `ids` of every MoE layer (expert parallelism), then
/// split over tensor ranks: the order the trainer must follow.
fn build_expert_parallel(m: &Model, kind: Kind, tp: TensorParallel, ids: &[i64]) -> Transformer {
    let mut model = build(m, kind, None);
    let index = Tensor::from_slice(ids);
    for block in &mut model.blocks {
        let FfnModule::Moe(layer) = &mut block.ffn else {
            continue;
        };
        let prefix = format!("layers.{}.ffn.experts.", block.index);
        let ex = &mut layer.experts;
        for p in model.store.params.iter_mut() {
            let Some(which) = p.name.strip_prefix(&prefix) else {
                continue;
            };
            let local = p
                .tensor
                .detach()
                .index_select(0, &index)
                .set_requires_grad(true);
            p.tensor = local.shallow_clone();
            let slot = match which {
                "w1" => Some(&mut ex.w1),
                "w2" => Some(&mut ex.w2),
                "w3" => ex.w3.as_mut(),
                "b1" => ex.b1.as_mut(),
                "b2" => ex.b2.as_mut(),
                other => panic!("unknown expert tensor {other}"),
            };
            if let Some(slot) = slot {
                *slot = local;
            }
        }
        ex.experts = ids.len() as i64;
    }
    model.split_tensor_parallel(tp).expect("tensor split");
    model
}

fn batch(m: &Model) -> Tensor {
    // In-process ranks share libtorch's generator with the gates' seeded draws.
    let _guard = lock_rng();
    tch::manual_seed(99);
    Tensor::randint(m.vocab as i64, [4, 9], (Kind::Int64, Device::Cpu))
}

/// The single-rank run: the mean over `shares` equal parts of the batch of (LM loss +
/// weighted balance loss), as `shares` data ranks each compute their own; one backward.
struct Reference {
    loss: f64,
    logits: Tensor,
    params: Vec<(String, Tensor, Tensor)>,
    norm: f64,
    scale: f64,
}

fn reference(m: &Model, kind: Kind, shares: i64) -> Reference {
    let model = build(m, kind, None);
    let tokens = batch(m);
    let rows = tokens.size()[0] / shares;
    let mut total = Tensor::zeros([], (Kind::Double, Device::Cpu));
    let mut logits = Vec::new();
    for s in 0..shares {
        let (lm, out) = model
            .loss(&tokens.narrow(0, s * rows, rows), true)
            .expect("reference forward");
        total += (lm + out.balance_loss).to_kind(Kind::Double);
        logits.push(out.logits);
    }
    let total = total / shares as f64;
    total.backward();
    let params: Vec<(String, Tensor, Tensor)> = model
        .store
        .params
        .iter()
        .map(|p| (p.name.clone(), p.tensor.detach(), p.tensor.grad()))
        .collect();
    let norm = params
        .iter()
        .map(|(_, _, g)| {
            g.to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        .sqrt();
    Reference {
        loss: total.double_value(&[]),
        logits: Tensor::cat(&logits, 0),
        params,
        norm,
        scale: (MAX_NORM / (norm + 1e-6)).min(1.0),
    }
}

/// How a rank's backward treats the tensor group.
#[derive(Clone, Copy, PartialEq)]
enum Backward {
    /// `Tape::backward_tensor_parallel` with the tensor group.
    Correct,
    /// The same, but each rank "all-reduces" over a group of itself: the gradient
    /// all-reduce of copy-to-region is skipped.
    SkipAllReduce,
}

/// Max differences one rank found against the reference, by what was compared.
type Diffs = Vec<(String, f64)>;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.size() != b.size() {
        return f64::INFINITY;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[allow(clippy::too_many_arguments)]
fn rank_run(
    m: &Model,
    kind: Kind,
    slicing: bool,
    expert_group: usize,
    backward: Backward,
    mut groups: Groups,
    tensor: LocalCollective,
    reference: Vec<(String, Tensor, Tensor)>,
    ref_logits: Tensor,
    expect: (f64, f64, f64),
) -> Diffs {
    groups
        .set_tensor(Box::new(tensor))
        .expect("the rank's tensor group");
    let tensor = groups.tensor();
    let tp = TensorParallel {
        rank: tensor.rank(),
        size: tensor.size(),
        expert_slicing: slicing,
    };
    // Contiguous placement over the expert group (FastMoE's), the same for every layer.
    let experts = m
        .layers
        .iter()
        .find_map(|l| match &l.ffn {
            Ffn::Moe(moe) => Some(moe.experts as usize),
            _ => None,
        })
        .expect("an MoE layer");
    let placement = ExpertPlacement::contiguous(experts, expert_group).expect("placement");
    let placements: std::collections::BTreeMap<usize, ExpertPlacement> = m
        .layers
        .iter()
        .filter(|l| matches!(l.ffn, Ffn::Moe(_)))
        .map(|l| (l.index, placement.clone()))
        .collect();
    let mine: Vec<i64> = placement
        .local_experts(groups.expert().rank())
        .iter()
        .map(|&e| e as i64)
        .collect();
    let model = if expert_group > 1 {
        build_expert_parallel(m, kind, tp, &mine)
    } else {
        build(m, kind, Some(tp))
    };
    let mut exchanged = ExchangedExperts {
        group: groups.expert(),
        placements: &placements,
        at: "test step",
        fastermoe: None,
        shadowed: None,
    };
    let tokens = batch(m);
    let shares = groups.data().size() as i64;
    let rows = tokens.size()[0] / shares;
    let me = groups.data().rank() as i64;
    let mut tape = Tape::new();
    let mut pass = TensorPass {
        group: tensor,
        tape: &mut tape,
        at: "test step",
        experts: if expert_group > 1 {
            Some(&mut exchanged)
        } else {
            None
        },
    };
    let (lm, out) = model
        .loss_tensor_parallel(&tokens.narrow(0, me * rows, rows), true, &mut pass)
        .expect("tensor-parallel forward");
    let loss = (lm + &out.balance_loss).to_kind(Kind::Double);
    let mut diffs = vec![(
        "logits".to_string(),
        max_diff(&out.logits, &ref_logits.narrow(0, me * rows, rows)),
    )];
    let alone = LocalCollective::group(
        GroupLabel {
            kind: GroupKind::Tensor,
            members: vec![groups.rank()],
        },
        TIMEOUT,
    )
    .pop()
    .expect("one handle");
    let group: &dyn Collective = match backward {
        Backward::Correct => tensor,
        Backward::SkipAllReduce => &alone,
    };
    tape.backward_tensor_parallel(&loss, groups.expert(), group, "test backward")
        .expect("backward");
    let splits = model.tensor_splits();
    let store = &model.store.params;
    let partial: Vec<(TensorSplit, &Tensor)> = splits
        .iter()
        .zip(store)
        .map(|(s, p)| (*s, &p.tensor))
        .collect();
    sum_partial_gradients(tensor, &partial, "test").expect("partial sums");
    let kinds: Vec<(ParamKind, &Tensor)> = store
        .iter()
        .map(|p| (param_kind(&p.name), &p.tensor))
        .collect();
    reduce_gradients(&groups, &kinds, "test").expect("gradient reduction");
    let with_split: Vec<(ParamKind, TensorSplit, &Tensor)> = store
        .iter()
        .zip(&splits)
        .map(|(p, s)| (param_kind(&p.name), *s, &p.tensor))
        .collect();
    let norm =
        clip_global_norm_tensor_parallel(&groups, tensor, &with_split, Some(MAX_NORM), "test")
            .expect("clipping");
    let mut global = loss.detach().reshape([1]);
    groups
        .data()
        .all_reduce_sum(&mut global, "loss")
        .expect("loss");
    let (ref_loss, ref_norm, ref_scale) = expect;
    diffs.push((
        "loss".into(),
        (global.double_value(&[0]) / shares as f64 - ref_loss).abs(),
    ));
    diffs.push(("norm".into(), (norm.total - ref_norm).abs()));
    diffs.push(("clip factor".into(), (norm.scale - ref_scale).abs()));
    let local = Tensor::from_slice(&mine);
    for (p, (name, value, grad)) in store.iter().zip(&reference) {
        assert_eq!(&p.name, name, "same parameters in the same order");
        let (value, grad) = if name.contains(".ffn.experts.") {
            (value.index_select(0, &local), grad.index_select(0, &local))
        } else {
            (value.shallow_clone(), grad.shallow_clone())
        };
        let value = model.tensor_shard_of(name, &value).expect("slice");
        let grad = model
            .tensor_shard_of(name, &(grad * ref_scale))
            .expect("slice");
        diffs.push((format!("{name} init"), max_diff(&p.tensor, &value)));
        diffs.push((
            format!("{name} gradient"),
            max_diff(&p.tensor.grad(), &grad),
        ));
    }
    diffs
}

/// Runs the model on `tensor × data` in-process ranks; every rank's differences.
fn split_run(
    m: &Model,
    kind: Kind,
    tensor: usize,
    data: usize,
    expert_group: usize,
    slicing: bool,
    backward: Backward,
) -> Vec<Diffs> {
    runtime_common::init();
    let world = tensor * data;
    let r = reference(m, kind, data as i64);
    assert!(r.scale < 1.0, "the test must clip (norm {})", r.norm);
    let layout = GroupLayout::tensor_data(world, tensor, expert_group).expect("layout");
    let groups = local_world(&layout, TIMEOUT).expect("groups");
    let tensors = local_tensor_groups(
        world,
        &tensor_groups(world, tensor).expect("tensor groups"),
        TIMEOUT,
    )
    .expect("tensor handles");
    let inputs: Vec<_> = groups
        .into_iter()
        .zip(tensors)
        .map(|(g, t)| {
            let params: Vec<(String, Tensor, Tensor)> = r
                .params
                .iter()
                .map(|(n, v, g)| (n.clone(), v.copy(), g.copy()))
                .collect();
            (g, t, params, r.logits.copy())
        })
        .collect();
    let expect = (r.loss, r.norm, r.scale);
    std::thread::scope(|scope| {
        let threads: Vec<_> = inputs
            .into_iter()
            .map(|(g, t, params, logits)| {
                scope.spawn(move || {
                    rank_run(
                        m,
                        kind,
                        slicing,
                        expert_group,
                        backward,
                        g,
                        t,
                        params,
                        logits,
                        expect,
                    )
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("rank thread"))
            .collect()
    })
}

fn failures(all: &[Diffs], tolerance: f64) -> Vec<String> {
    all.iter()
        .enumerate()
        .flat_map(|(rank, diffs)| {
            diffs
                .iter()
                .filter(|(_, d)| d.is_nan() || *d > tolerance)
                .map(move |(what, d)| format!("rank {rank}: {what} differs by {d:e}"))
        })
        .collect()
}

fn assert_equivalent(all: &[Diffs], tolerance: f64) {
    let worst =
        all.iter().flatten().fold(
            ("", 0.0f64),
            |w, (what, d)| if *d > w.1 { (what.as_str(), *d) } else { w },
        );
    eprintln!("largest difference: {:e} ({})", worst.1, worst.0);
    let bad = failures(all, tolerance);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // Every parameter was compared on every rank.
    assert!(all.iter().all(|d| d.len() > 40), "{:?}", all[0].len());
}

#[test]
fn two_tensor_ranks_match_one_rank_in_f64() {
    let m = model(false, false);
    assert_equivalent(
        &split_run(&m, Kind::Double, 2, 1, 1, true, Backward::Correct),
        1e-10,
    );
}

#[test]
fn two_tensor_ranks_match_one_rank_in_f32() {
    let m = model(false, false);
    assert_equivalent(
        &split_run(&m, Kind::Float, 2, 1, 1, true, Backward::Correct),
        1e-5,
    );
}

#[test]
fn unsliced_experts_and_shared_experts_match_one_rank() {
    let m = model(true, true);
    assert_equivalent(
        &split_run(&m, Kind::Double, 2, 1, 1, false, Backward::Correct),
        1e-10,
    );
    assert_equivalent(
        &split_run(&m, Kind::Double, 2, 1, 1, true, Backward::Correct),
        1e-10,
    );
}

#[test]
fn two_tensor_by_two_data_ranks_match_one_rank() {
    let m = model(true, false);
    assert_equivalent(
        &split_run(&m, Kind::Double, 2, 2, 1, true, Backward::Correct),
        1e-10,
    );
}

#[test]
fn two_tensor_by_two_data_ranks_with_experts_across_data_match_one_rank() {
    // The planned placement of `fmoec plan --world 4` for gpt2-medium-moe.fmoe: tensor 2 x
    // data 2, the expert group is the data group, experts sliced over the tensor ranks.
    let m = model(true, false);
    assert_equivalent(
        &split_run(&m, Kind::Double, 2, 2, 2, true, Backward::Correct),
        1e-10,
    );
    assert_equivalent(
        &split_run(&m, Kind::Double, 2, 2, 2, false, Backward::Correct),
        1e-10,
    );
}

#[test]
fn random_gates_seeded_per_micro_batch_match_one_rank() {
    // GShard (capacity, random routing of the second expert) and Switch (jitter, capacity)
    // draw from the generator: every rank seeds it from the same micro-batch key.
    for gate in [GateKind::Gshard, GateKind::Switch, GateKind::Noisy] {
        let m = model_with(gate, false, false);
        assert_equivalent(
            &split_run(&m, Kind::Double, 2, 1, 1, true, Backward::Correct),
            1e-10,
        );
    }
}

#[test]
fn a_backward_without_the_tensor_all_reduce_is_caught() {
    let m = model(false, false);
    let all = split_run(&m, Kind::Double, 2, 1, 1, true, Backward::SkipAllReduce);
    let bad = failures(&all, 1e-6);
    // The parameters before the first copy-to-region cut get only a rank's share.
    for wanted in [
        "embed.tokens gradient",
        "layers.0.norm1.weight gradient",
        "norm",
    ] {
        assert!(
            bad.iter().any(|b| b.contains(wanted)),
            "no failure for {wanted}: {bad:?}"
        );
    }
    // The forward is unaffected.
    assert!(!bad.iter().any(|b| b.contains("logits")), "{bad:?}");
}

#[test]
fn one_tensor_rank_is_the_single_rank_model() {
    runtime_common::init();
    let m = model(true, false);
    let plain = build(&m, Kind::Float, None);
    let split = build(
        &m,
        Kind::Float,
        Some(TensorParallel {
            rank: 0,
            size: 1,
            expert_slicing: false,
        }),
    );
    for (a, b) in plain.store.params.iter().zip(&split.store.params) {
        assert_eq!(a.name, b.name);
        assert!(a.tensor.equal(&b.tensor), "{} differs", a.name);
    }
    assert!(split
        .tensor_splits()
        .iter()
        .all(|s| *s == TensorSplit::Whole));
}

#[test]
fn a_split_that_does_not_divide_is_an_error() {
    runtime_common::init();
    let m = model(false, false);
    // In-process ranks share libtorch's generator with the gates' seeded draws.
    let _guard = lock_rng();
    let err = Transformer::new_tensor_parallel(
        &m,
        Device::Cpu,
        Kind::Float,
        Kind::Float,
        Some(TensorParallel {
            rank: 0,
            size: 3,
            expert_slicing: true,
        }),
    )
    .err()
    .expect("heads = 4 do not split over 3 ranks");
    assert!(
        format!("{err:#}").contains("not divisible by tensor = 3"),
        "{err:#}"
    );
}

#[test]
fn a_tensor_parallel_model_refuses_the_plain_forward() {
    runtime_common::init();
    let m = model(false, false);
    let model = build(
        &m,
        Kind::Float,
        Some(TensorParallel {
            rank: 1,
            size: 2,
            expert_slicing: true,
        }),
    );
    let err = model.loss(&batch(&m), false).err().expect("refused");
    assert!(
        format!("{err:#}").contains("forward_tensor_parallel"),
        "{err:#}"
    );
}

#[test]
fn the_plain_backward_refuses_a_tape_with_copy_to_region_cuts() {
    runtime_common::init();
    let group = LocalCollective::group(
        GroupLabel {
            kind: GroupKind::Tensor,
            members: vec![0],
        },
        TIMEOUT,
    )
    .pop()
    .expect("one handle");
    let x = Tensor::ones([3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let mut tape = Tape::new();
    tape.step();
    let leaf = tape.copy_to_tensor_region(&(&x * 2.0)).expect("cut");
    assert_eq!(tape.tensor_copies(), 1);
    let err = tape
        .backward(&leaf.sum(Kind::Double), &group, "step 0")
        .expect_err("refused");
    assert!(
        err.to_string().contains("backward_tensor_parallel"),
        "{err}"
    );

    // With the (one-rank) tensor group the gradient reaches `x`.
    let mut tape = Tape::new();
    tape.step();
    let leaf = tape.copy_to_tensor_region(&(&x * 2.0)).expect("cut");
    tape.backward_tensor_parallel(&leaf.sum(Kind::Double), &group, &group, "step 1")
        .expect("backward");
    assert_eq!(Vec::<f64>::try_from(x.grad()).unwrap(), vec![2.0; 3]);
}
