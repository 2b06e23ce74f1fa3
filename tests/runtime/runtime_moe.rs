//! The MoE layer against a per-token reference, gradients against finite differences, and
//! the gates' balance losses against hand-computed values.

use fmoec::check::{Activation, Capacity, Gate, GateKind, Mlp, Moe};
use fmoec::runtime::moe::{self, ExpertPath, MoeLayer};
use fmoec::runtime::params::ParamStore;
use tch::{Device, Kind, Tensor};

/// libtorch's generator is process-wide and the tests of every module of this binary run on
/// parallel threads: every test that draws random numbers holds the runtime's own lock on it,
/// which the trainer and the other modules' tests take too.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    tch::set_num_threads(1);
    fmoec::runtime::model::lock_rng()
}

fn moe_decl(
    kind: GateKind,
    experts: u64,
    top_k: u64,
    capacity: Option<(f64, f64)>,
    act: Activation,
) -> Moe {
    Moe {
        experts,
        top_k,
        gate: Gate {
            kind,
            capacity: capacity.map(|(train, eval)| Capacity { train, eval }),
            balance_loss: 0.01,
            jitter: if kind == GateKind::Switch { 0.1 } else { 0.0 },
            random_routing: kind == GateKind::Gshard,
            span: Default::default(),
        },
        expert: Mlp {
            hidden: 8,
            act,
            span: Default::default(),
        },
        shared: None,
        spans: Default::default(),
    }
}

fn layer(decl: &Moe, width: i64, kind: Kind, bias: bool, seed: i64) -> (ParamStore, MoeLayer) {
    tch::manual_seed(seed);
    let mut store = ParamStore::new(Device::Cpu, kind);
    let mut l = MoeLayer::new(&mut store, "layers.1.ffn", decl, width, bias, 0.05).unwrap();
    // larger gate weights than the 0.02 init so routing differs between tokens
    tch::no_grad(|| {
        let _ = l.gate.weight.shallow_clone().f_mul_scalar_(25.0).unwrap();
        if let Some(b) = &l.experts.b1 {
            let _ = b.shallow_clone().f_normal_(0.0, 0.1).unwrap();
        }
        if let Some(b) = &l.experts.b2 {
            let _ = b.shallow_clone().f_normal_(0.0, 0.1).unwrap();
        }
    });
    l.experts.path = if kind == Kind::Double {
        ExpertPath::Loop
    } else {
        ExpertPath::Grouped
    };
    (store, l)
}

fn expert_ref(l: &MoeLayer, e: i64, x: &Tensor) -> Tensor {
    let ex = &l.experts;
    let mut h = x.matmul(&ex.w1.get(e));
    if let Some(b) = &ex.b1 {
        h += b.get(e);
    }
    let h = match (&ex.w3, ex.act) {
        (Some(w3), _) => h.silu() * x.matmul(&w3.get(e)),
        (None, Activation::Relu) => h.relu(),
        (None, _) => h.gelu("none"),
    };
    let mut y = h.matmul(&ex.w2.get(e));
    if let Some(b) = &ex.b2 {
        y += b.get(e);
    }
    y
}

/// Each token through its kept experts, weighted, one at a time.
fn per_token(l: &MoeLayer, x: &Tensor, expert: &Tensor, weight: &Tensor) -> Tensor {
    let (t, d) = x.size2().unwrap();
    let k = expert.size()[1];
    let out = Tensor::zeros([t, d], (x.kind(), Device::Cpu));
    for i in 0..t {
        let mut acc = Tensor::zeros([d], (x.kind(), Device::Cpu));
        for j in 0..k {
            let e = expert.int64_value(&[i, j]);
            if e < 0 {
                continue;
            }
            let w = weight.double_value(&[i, j]);
            acc += expert_ref(l, e, &x.get(i).unsqueeze(0)).squeeze_dim(0) * w;
        }
        out.get(i).copy_(&acc);
    }
    out
}

fn check_against_reference(
    kind: GateKind,
    capacity: Option<(f64, f64)>,
    top_k: u64,
    act: Activation,
    bias: bool,
    train: bool,
) -> (i64, i64) {
    let decl = moe_decl(kind, 4, top_k, capacity, act);
    let (_store, l) = layer(&decl, 8, Kind::Float, bias, 7);
    let x = Tensor::randn([24, 8], (Kind::Float, Device::Cpu));
    tch::manual_seed(99);
    let out = l.forward(&x, train, None).unwrap();
    tch::manual_seed(99);
    let routing = l.gate.route(&x, train, None).unwrap();
    let reference = per_token(&l, &x, &routing.expert, &routing.weight);
    let diff = (&out.out - &reference).abs().max().double_value(&[]);
    assert!(
        diff < 1e-5,
        "{kind:?} capacity {capacity:?} train {train}: max diff {diff}"
    );
    let dropped = routing.expert.lt(0).sum(Kind::Int64).int64_value(&[]);
    let tel = out.telemetry.report().unwrap();
    let kept: f64 = tel.tokens_per_expert.iter().sum();
    assert_eq!(
        kept as i64,
        24 * top_k as i64 - dropped,
        "telemetry counts kept slots"
    );
    assert!((tel.dropped_fraction - dropped as f64 / (24.0 * top_k as f64)).abs() < 1e-6);
    assert!(tel.gate_entropy > 0.0 && tel.gate_entropy <= (4f64).ln() + 1e-6);
    (dropped, 24 * top_k as i64)
}

#[test]
fn every_gate_matches_the_per_token_reference() {
    let _rng = rng_lock();
    for &train in &[true, false] {
        check_against_reference(GateKind::Naive, None, 2, Activation::Gelu, true, train);
        check_against_reference(GateKind::Noisy, None, 2, Activation::Gelu, false, train);
        check_against_reference(
            GateKind::Gshard,
            Some((4.0, 4.0)),
            2,
            Activation::Gelu,
            true,
            train,
        );
        check_against_reference(
            GateKind::Switch,
            Some((4.0, 4.0)),
            1,
            Activation::Relu,
            true,
            train,
        );
        check_against_reference(GateKind::Swipe, None, 2, Activation::Swiglu, false, train);
    }
}

#[test]
fn capacity_drops_pass_only_the_kept_slots() {
    let _rng = rng_lock();
    // capacity 0.5 · k · T / E: at least half the slots must go
    let (dropped, slots) = check_against_reference(
        GateKind::Gshard,
        Some((0.5, 0.5)),
        2,
        Activation::Gelu,
        true,
        false,
    );
    assert!(dropped * 2 >= slots, "gshard dropped {dropped} of {slots}");
    let (dropped, slots) = check_against_reference(
        GateKind::Switch,
        Some((0.5, 0.5)),
        1,
        Activation::Gelu,
        false,
        true,
    );
    assert!(dropped * 2 >= slots, "switch dropped {dropped} of {slots}");
}

#[test]
fn a_token_with_every_slot_dropped_gets_zero_ffn_output() {
    let _rng = rng_lock();
    let decl = moe_decl(GateKind::Switch, 4, 1, Some((0.25, 0.25)), Activation::Gelu);
    let (_s, l) = layer(&decl, 8, Kind::Float, true, 3);
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    let out = l.forward(&x, false, None).unwrap().out;
    let routing = l.gate.route(&x, false, None).unwrap();
    let mut seen = 0;
    for i in 0..16 {
        if routing.expert.int64_value(&[i, 0]) < 0 {
            seen += 1;
            assert_eq!(out.get(i).abs().max().double_value(&[]), 0.0);
        }
    }
    assert!(seen > 0);
}

/// Capacity keeps, per expert, the first `C` slots in slot-major token order.
#[test]
fn capacity_keeps_first_choices_first() {
    let _rng = rng_lock();
    let expert = Tensor::from_slice(&[0i64, 1, 0, 2, 0, 1, 1, 0, 0, 3]).reshape([5, 2]);
    let limited = moe::limit_by_capacity(&expert, 4, 2).unwrap();
    let got = Vec::<i64>::try_from(limited.reshape([-1])).unwrap();
    // tokens (first, second): (0,1) (0,2) (0,1) (1,0) (0,3); queues in slot-major order:
    // expert 0: t0, t1 kept; t2, t4 (first choices) and t3 (second choice) dropped;
    // expert 1: t3 (first), t0 (second) kept; t2 (second) dropped; experts 2, 3: kept.
    assert_eq!(got, vec![0, 1, 0, 2, -1, -1, 1, -1, -1, 3]);
}

#[test]
fn swipe_balances_loads_without_drops() {
    let _rng = rng_lock();
    let decl = moe_decl(GateKind::Swipe, 4, 2, None, Activation::Gelu);
    let (_s, l) = layer(&decl, 8, Kind::Float, false, 5);
    // a skewed input: every token is nearly the same, so the plain top-k sends all to 2 experts
    let x = Tensor::randn([1, 8], (Kind::Float, Device::Cpu)).repeat([32, 1])
        + Tensor::randn([32, 8], (Kind::Float, Device::Cpu)) * 0.01;
    let naive = l.gate.route(&x, false, None).unwrap();
    let naive_counts =
        Vec::<i64>::try_from(naive.expert.reshape([-1]).bincount(None::<Tensor>, 4)).unwrap();
    assert_eq!(*naive_counts.iter().max().unwrap(), 32);
    let r = l.gate.route(&x, true, None).unwrap();
    let counts = Vec::<i64>::try_from(r.expert.reshape([-1]).bincount(None::<Tensor>, 4)).unwrap();
    assert_eq!(counts, vec![16, 16, 16, 16]);
    assert_eq!(r.expert.lt(0).sum(Kind::Int64).int64_value(&[]), 0);
}

/// Central differences in f64 through the per-expert loop path.
#[test]
fn gradients_match_finite_differences() {
    let _rng = rng_lock();
    for (kind, cap, k) in [
        (GateKind::Naive, None, 2),
        (GateKind::Gshard, Some((0.75, 0.75)), 2),
        (GateKind::Switch, Some((1.0, 1.0)), 1),
    ] {
        let decl = moe_decl(kind, 3, k, cap, Activation::Gelu);
        let (store, l) = layer(&decl, 4, Kind::Double, true, 11);
        let x = Tensor::randn([6, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let r = Tensor::randn([6, 4], (Kind::Double, Device::Cpu));
        let f = |x: &Tensor| -> Tensor {
            let o = l.forward(x, false, None).unwrap();
            (o.out * &r).sum(Kind::Double) + o.balance_loss.to_kind(Kind::Double) * 0.0
        };
        let loss = f(&x);
        loss.backward();
        let eps = 1e-6;
        let mut checked = 0;
        let mut targets: Vec<(String, Tensor)> = store
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        targets.push(("x".into(), x.shallow_clone()));
        for (name, t) in targets {
            let g = t.grad();
            let flat = t.view([-1]);
            let n = flat.size()[0];
            for i in (0..n).step_by(((n / 5).max(1)) as usize) {
                let orig = flat.double_value(&[i]);
                let at = |v: f64| {
                    tch::no_grad(|| {
                        let _ = flat.get(i).fill_(v);
                    });
                    tch::no_grad(|| f(&x)).double_value(&[])
                };
                let up = at(orig + eps);
                let down = at(orig - eps);
                at(orig);
                let numeric = (up - down) / (2.0 * eps);
                let analytic = g.view([-1]).double_value(&[i]);
                assert!(
                    (numeric - analytic).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "{kind:?} {name}[{i}]: numeric {numeric} analytic {analytic}"
                );
                checked += 1;
            }
        }
        assert!(checked > 20);
    }
}

fn gate_with_identity(
    kind: GateKind,
    e: i64,
    top_k: u64,
    cap: Option<(f64, f64)>,
) -> (ParamStore, MoeLayer) {
    let decl = moe_decl(kind, e as u64, top_k, cap, Activation::Gelu);
    let mut store = ParamStore::new(Device::Cpu, Kind::Float);
    let l = MoeLayer::new(&mut store, "ffn", &decl, e, false, 0.02).unwrap();
    tch::no_grad(|| {
        l.gate
            .weight
            .shallow_clone()
            .copy_(&Tensor::eye(e, (Kind::Float, Device::Cpu)));
        if let Some(b) = &l.gate.bias {
            let _ = b.shallow_clone().zero_();
        }
    });
    (store, l)
}

fn softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

const LOGITS: [[f64; 3]; 4] = [
    [2.0, 1.0, 0.0],
    [0.0, 3.0, 1.0],
    [1.0, 0.5, 0.0],
    [0.0, 0.2, 2.0],
];

fn logits_tensor() -> Tensor {
    Tensor::from_slice(&LOGITS.concat())
        .reshape([4, 3])
        .to_kind(Kind::Float)
}

#[test]
fn gshard_loss_is_e_times_sum_of_first_choice_fraction_times_mean_prob() {
    let _rng = rng_lock();
    let (_s, l) = gate_with_identity(GateKind::Gshard, 3, 2, Some((10.0, 10.0)));
    let r = l.gate.route(&logits_tensor(), false, None).unwrap();
    // first choices: 0, 1, 0, 2 -> c = (2/4, 1/4, 1/4)
    let c = [0.5, 0.25, 0.25];
    let probs: Vec<Vec<f64>> = LOGITS.iter().map(|r| softmax(r)).collect();
    let m: Vec<f64> = (0..3)
        .map(|e| probs.iter().map(|p| p[e]).sum::<f64>() / 4.0)
        .collect();
    let want = 3.0 * (0..3).map(|e| c[e] * m[e]).sum::<f64>();
    let got = r.balance_loss.double_value(&[]);
    assert!((got - want).abs() < 1e-6, "gshard loss {got}, hand {want}");
    // combine weights: softmax over the two best logits of each token
    let w0 = softmax(&[2.0, 1.0]);
    assert!((r.weight.double_value(&[0, 0]) - w0[0]).abs() < 1e-6);
}

#[test]
fn switch_loss_is_e_times_sum_of_fraction_times_mean_prob_over_kept_tokens() {
    let _rng = rng_lock();
    let (_s, l) = gate_with_identity(GateKind::Switch, 3, 1, Some((10.0, 10.0)));
    let r = l.gate.route(&logits_tensor(), false, None).unwrap();
    let probs: Vec<Vec<f64>> = LOGITS.iter().map(|r| softmax(r)).collect();
    let f = [0.5, 0.25, 0.25];
    let p: Vec<f64> = (0..3)
        .map(|e| probs.iter().map(|q| q[e]).sum::<f64>() / 4.0)
        .collect();
    let want = 3.0 * (0..3).map(|e| f[e] * p[e]).sum::<f64>();
    let got = r.balance_loss.double_value(&[]);
    assert!((got - want).abs() < 1e-6, "switch loss {got}, hand {want}");
    // the combine weight is the top-1 probability itself
    assert!((r.weight.double_value(&[1, 0]) - probs[1][1]).abs() < 1e-6);
}

#[test]
fn noisy_loss_is_cv_squared_of_importance_plus_load_without_noise() {
    let _rng = rng_lock();
    let (_s, l) = gate_with_identity(GateKind::Noisy, 3, 1, None);
    let r = l.gate.route(&logits_tensor(), false, None).unwrap();
    // top-1 gates are 1.0 at experts 0, 1, 0, 2: importance = load = (2, 1, 1)
    let cv2 = |v: [f64; 3]| {
        let mean = v.iter().sum::<f64>() / 3.0;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0;
        var / (mean * mean + 1e-10)
    };
    let want = cv2([2.0, 1.0, 1.0]) * 2.0;
    let got = r.balance_loss.double_value(&[]);
    assert!((got - want).abs() < 1e-6, "noisy loss {got}, hand {want}");
}

/// The naive gate's loss (DeepSeek-MoE's expert-level balance loss; FastMoE's naive gate has
/// none, so before this `naive(balance_loss = 0.001)` trained without one): E times the sum
/// over experts of the fraction of the T·k slots routed there times the mean probability.
#[test]
fn naive_loss_is_e_times_sum_of_slot_fraction_times_mean_prob() {
    let _rng = rng_lock();
    let (_s, l) = gate_with_identity(GateKind::Naive, 3, 2, None);
    let r = l.gate.route(&logits_tensor(), true, None).unwrap();
    // top-2 of each token: {0, 1}, {1, 2}, {0, 1}, {2, 1} -> slots (2, 4, 2) of 8
    let f = [2.0 / 8.0, 4.0 / 8.0, 2.0 / 8.0];
    let probs: Vec<Vec<f64>> = LOGITS.iter().map(|r| softmax(r)).collect();
    let p: Vec<f64> = (0..3)
        .map(|e| probs.iter().map(|q| q[e]).sum::<f64>() / 4.0)
        .collect();
    let want = 3.0 * (0..3).map(|e| f[e] * p[e]).sum::<f64>();
    let got = r.balance_loss.double_value(&[]);
    assert!((got - want).abs() < 1e-6, "naive loss {got}, hand {want}");
    // it has a gradient: the weight of the loss trains the gate
    assert!(r.balance_loss.requires_grad());
}

#[test]
fn swipe_has_no_balance_loss() {
    let _rng = rng_lock();
    let (_s, l) = gate_with_identity(GateKind::Swipe, 3, 2, None);
    let r = l.gate.route(&logits_tensor(), true, None).unwrap();
    assert_eq!(r.balance_loss.double_value(&[]), 0.0);
}

/// The draws a gate takes are the ones [`Gate::draws`] makes: routing with them given is
/// routing with the key, for every gate that draws.
#[test]
fn routing_with_the_keys_draws_given_is_routing_with_the_key() {
    let _rng = rng_lock();
    for (kind, top_k, cap) in [
        (GateKind::Noisy, 2, None),
        (GateKind::Gshard, 2, Some((1.0, 2.0))),
        (GateKind::Switch, 1, Some((1.0, 2.0))),
    ] {
        let decl = moe_decl(kind, 4, top_k, cap, Activation::Gelu);
        let (_s, l) = layer(&decl, 8, Kind::Float, true, 3);
        let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
        let key = Tensor::from_slice(&moe::draw_key_words(99));
        let draws = l.gate.draws(&x, true, Some(&key)).unwrap();
        assert!(draws.is_some(), "{kind:?} draws in training");
        let keyed = l.gate.route(&x, true, Some(&key)).unwrap();
        let given = l.gate.route_with_draws(&x, true, draws.as_ref()).unwrap();
        assert!(keyed.expert.equal(&given.expert), "{kind:?}");
        assert!(keyed.weight.equal(&given.weight), "{kind:?}");
        // in evaluation no gate draws, and one that needs draws refuses to route without
        assert!(l.gate.draws(&x, false, Some(&key)).unwrap().is_none());
        assert!(l.gate.route_with_draws(&x, true, None).is_err());
    }
}

/// [`Gate::draws`] and [`Gate::route_with_draws`] follow one rule for when a gate takes
/// random draws: where `draws` makes none, routing takes none (and routes without them);
/// where it makes some, routing refuses to go on without them. Every gate, with its random
/// options on and off, in training and in evaluation.
#[test]
fn a_gate_routes_with_draws_exactly_where_it_makes_them() {
    let _rng = rng_lock();
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    let key = Tensor::from_slice(&moe::draw_key_words(7));
    let kinds = [
        GateKind::Naive,
        GateKind::Noisy,
        GateKind::Gshard,
        GateKind::Switch,
        GateKind::Swipe,
    ];
    let mut drawing = Vec::new();
    for kind in kinds {
        for top_k in [1, 2] {
            for random_on in [false, true] {
                let mut decl = moe_decl(kind, 4, top_k, None, Activation::Gelu);
                decl.gate.jitter = if random_on && kind == GateKind::Switch {
                    0.1
                } else {
                    0.0
                };
                decl.gate.random_routing = random_on && kind == GateKind::Gshard;
                let (_s, l) = layer(&decl, 8, Kind::Float, false, 5);
                for train in [false, true] {
                    let case =
                        format!("{kind:?}, top_k {top_k}, random {random_on}, train {train}");
                    let draws = l.gate.draws(&x, train, Some(&key)).unwrap();
                    let without = l.gate.route_with_draws(&x, train, None);
                    assert_eq!(draws.is_some(), without.is_err(), "{case}");
                    if let Some(d) = &draws {
                        l.gate.route_with_draws(&x, train, Some(d)).unwrap();
                        drawing.push(case);
                    }
                }
            }
        }
    }
    // the gates that draw: noisy always in training, GShard's random routing with top-2,
    // Switch's jitter
    assert_eq!(
        drawing,
        [
            "Noisy, top_k 1, random false, train true",
            "Noisy, top_k 1, random true, train true",
            "Noisy, top_k 2, random false, train true",
            "Noisy, top_k 2, random true, train true",
            "Gshard, top_k 2, random true, train true",
            "Switch, top_k 1, random true, train true",
            "Switch, top_k 2, random true, train true",
        ]
    );
}

/// A noisy gate that lost its noise projection (the runtime builds none such) is an internal
/// error from routing, not a panic.
#[test]
fn a_noisy_gate_without_its_noise_projection_is_an_internal_error() {
    let _rng = rng_lock();
    let decl = moe_decl(GateKind::Noisy, 4, 2, None, Activation::Gelu);
    let (_s, mut l) = layer(&decl, 8, Kind::Float, false, 5);
    l.gate.noise = None;
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    for train in [false, true] {
        let err = l
            .gate
            .route(&x, train, None)
            .err()
            .map(|e| format!("{e:#}"));
        assert_eq!(
            err.as_deref(),
            Some("internal error: a noisy gate without its noise projection"),
            "train {train}"
        );
    }
}

/// The grouped-matmul path and the per-expert loop give the same output and gradients, also
/// with dropped slots and expert biases (rows past the last group must not leak anywhere).
#[test]
fn grouped_path_matches_loop_path_with_drops() {
    let _rng = rng_lock();
    let decl = moe_decl(GateKind::Gshard, 4, 2, Some((0.5, 0.5)), Activation::Gelu);
    let run = |path: ExpertPath| {
        let (store, mut l) = layer(&decl, 8, Kind::Float, true, 21);
        l.experts.path = path;
        let x = Tensor::randn([32, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let o = l.forward(&x, false, None).unwrap();
        (o.out.sum(Kind::Float) + o.out.square().sum(Kind::Float)).backward();
        let mut grads: Vec<Tensor> = store.params.iter().map(|p| p.tensor.grad()).collect();
        grads.push(x.grad());
        (o.out.detach(), grads)
    };
    let (a, ga) = run(ExpertPath::Grouped);
    let (b, gb) = run(ExpertPath::Loop);
    assert!((&a - &b).abs().max().double_value(&[]) < 1e-5);
    for (x, y) in ga.iter().zip(&gb) {
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d < 1e-4, "gradient differs by {d}");
    }
}

#[test]
fn counts_of_matches_bincount() {
    let _g = rng_lock();
    for &(n, bins) in &[(1i64, 1i64), (1000, 17), (4096, 129)] {
        let keys = Tensor::randint(bins, [n], (Kind::Int64, Device::Cpu));
        let want = keys.bincount::<Tensor>(None, bins);
        assert!(
            moe::counts_of(&keys, bins).unwrap().equal(&want),
            "n={n} bins={bins}"
        );
    }
}

#[test]
fn linear_with_a_bias_is_matmul_plus_bias_with_the_same_gradients() {
    let _g = rng_lock();
    let x = Tensor::randn([2, 3, 5], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let w = Tensor::randn([5, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::randn([4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let got = moe::linear(&x, &w, Some(&b)).unwrap();
    let want = x.matmul(&w) + &b;
    assert_eq!(got.size(), vec![2, 3, 4]);
    assert!(got.allclose(&want, 1e-12, 1e-12, false));
    let g = Tensor::randn([2, 3, 4], (Kind::Double, Device::Cpu));
    let grads = |out: &Tensor| {
        Tensor::run_backward(&[(out * &g).sum(Kind::Double)], &[&x, &w, &b], true, false)
    };
    for (a, e) in grads(&got).iter().zip(grads(&want).iter()) {
        assert!(a.allclose(e, 1e-12, 1e-12, false));
    }
    // without a bias it is the plain matmul
    let plain = moe::linear(&x, &w, None).unwrap();
    assert!(plain.allclose(&x.matmul(&w), 1e-12, 1e-12, false));
}

/// The gates' keyed draws: uniform in [0, 1) and standard normal by their moments, a pure
/// function of (key, stream, index), and different for another key or stream.
#[test]
fn keyed_draws_are_uniform_normal_and_reproducible() {
    let key = Tensor::from_slice(&moe::draw_key_words(0xDEAD_BEEF_1234_5678));
    let u = moe::keyed_uniform(&key, 0, &[400, 500]).unwrap();
    assert_eq!(u.size(), vec![400, 500]);
    assert_eq!(u.kind(), Kind::Float);
    let (min, max) = (u.min().double_value(&[]), u.max().double_value(&[]));
    assert!(
        (0.0..1e-4).contains(&min) && max < 1.0 && max > 1.0 - 1e-4,
        "{min} {max}"
    );
    let mean = u.mean(Kind::Double).double_value(&[]);
    let var = u.var(true).double_value(&[]);
    assert!((mean - 0.5).abs() < 3e-3, "mean {mean}");
    assert!((var - 1.0 / 12.0).abs() < 2e-3, "variance {var}");
    // neighbours are not correlated
    let a = u.reshape([-1]).narrow(0, 0, 199_999);
    let b = u.reshape([-1]).narrow(0, 1, 199_999);
    let corr = (&a - 0.5)
        .multiply(&(&b - 0.5))
        .mean(Kind::Double)
        .double_value(&[])
        * 12.0;
    assert!(corr.abs() < 1e-2, "lag-1 correlation {corr}");

    assert!(moe::keyed_uniform(&key, 0, &[400, 500]).unwrap().equal(&u));
    let other_key = Tensor::from_slice(&moe::draw_key_words(0xDEAD_BEEF_1234_5679));
    for other in [
        moe::keyed_uniform(&other_key, 0, &[400, 500]).unwrap(),
        moe::keyed_uniform(&key, 1, &[400, 500]).unwrap(),
    ] {
        let same = other.eq_tensor(&u).to_kind(Kind::Float).mean(Kind::Double);
        assert!(same.double_value(&[]) < 1e-3);
    }

    let z = moe::keyed_normal(&key, 0, &[200_000]).unwrap();
    let (mean, std) = (
        z.mean(Kind::Double).double_value(&[]),
        z.std(true).double_value(&[]),
    );
    assert!(
        mean.abs() < 1e-2 && (std - 1.0).abs() < 1e-2,
        "{mean} {std}"
    );
    assert!(z.isfinite().all().int64_value(&[]) == 1);
}

/// With a draw key, a training route is a function of the key: the same key routes the same
/// way (noise, jitter and random routing alike), another key differently.
#[test]
fn keyed_routing_repeats_for_the_same_key() {
    let _g = rng_lock();
    for kind in [GateKind::Noisy, GateKind::Gshard, GateKind::Switch] {
        let decl = moe_decl(kind, 8, 2, None, Activation::Gelu);
        let (_s, l) = layer(&decl, 16, Kind::Float, false, 5);
        let x = Tensor::randn([64, 16], (Kind::Float, Device::Cpu));
        let key = Tensor::from_slice(&moe::draw_key_words(42));
        tch::manual_seed(1);
        let a = l.gate.route(&x, true, Some(&key)).unwrap();
        tch::manual_seed(2);
        let b = l.gate.route(&x, true, Some(&key)).unwrap();
        assert!(a.expert.equal(&b.expert), "{kind:?}");
        assert!(a.weight.equal(&b.weight), "{kind:?}");
        let other = Tensor::from_slice(&moe::draw_key_words(43));
        let c = l.gate.route(&x, true, Some(&other)).unwrap();
        assert!(
            !c.weight.equal(&a.weight) || !c.expert.equal(&a.expert),
            "{kind:?}"
        );
    }
}

/// The gate's parameters are its one definition's (`fmoec::gates`), as the planner counts
/// them: a bias only when the model's linear layers have biases (before, the runtime gave
/// every gate but the noisy one a bias, so a bias-free model had `E` parameters more per MoE
/// layer than `fmoec plan` counted).
#[test]
fn gate_parameters_follow_the_gate_definition() {
    // building layers draws their weights from libtorch's global generator
    let _rng = rng_lock();
    for kind in [
        GateKind::Naive,
        GateKind::Noisy,
        GateKind::Gshard,
        GateKind::Switch,
    ] {
        let top_k = if kind == GateKind::Switch { 1 } else { 2 };
        for bias in [true, false] {
            let decl = moe_decl(kind, 4, top_k, None, Activation::Gelu);
            let mut store = ParamStore::new(Device::Cpu, Kind::Float);
            let l = MoeLayer::new(&mut store, "ffn", &decl, 8, bias, 0.02).unwrap();
            let def = fmoec::gates::of(kind);
            for p in def.params {
                let present = store.get(&format!("ffn.gate.{}", p.name)).is_some();
                assert_eq!(
                    present,
                    bias || !p.is_bias,
                    "{kind:?} bias={bias} {}",
                    p.name
                );
            }
            let count: i64 = [
                Some(&l.gate.weight),
                l.gate.bias.as_ref(),
                l.gate.noise.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(|t| t.numel() as i64)
            .sum();
            assert_eq!(
                count as u64,
                def.param_count(8, 4, bias),
                "{kind:?} bias={bias}"
            );
        }
    }
}

/// `precision = fp8` needs the CUDA parts (its matmuls and the autograd functions are in
/// the shim): a build without them refuses it with a plain message, on any device.
#[cfg(not(feature = "cuda"))]
#[test]
fn fp8_needs_a_build_with_the_cuda_feature() {
    let err = fmoec::runtime::fp8::mode_for(Device::Cuda(0)).unwrap_err();
    assert!(format!("{err}").contains("--features cuda"), "{err}");
    // the CPU: only the emulation, and only when asked for
    let err = fmoec::runtime::fp8::mode_for(Device::Cpu).unwrap_err();
    assert!(format!("{err}").contains("FMOEC_FP8_EMULATE=1"), "{err}");
}

/// `fmoec run` refuses `precision = fp8` on the CPU (outside the tests' emulation) before
/// anything starts: at the file's `precision` (E0616, in both formats) when the file asks for
/// it, naming the flag when `--precision` does; alone and on in-process ranks.
#[test]
fn fp8_on_the_cpu_is_refused_at_the_files_precision() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = format!("{}/examples/tiny.fmoe", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&tiny).unwrap();
    let file = dir.path().join("fp8.fmoe");
    std::fs::write(&file, text.replace("precision  = fp32", "precision  = fp8")).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("precision  = fp32"))
        .unwrap()
        + 1;
    let run = |file: &std::path::Path, extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fmoec"))
            .arg("run")
            .arg(file)
            .args(["--steps", "1", "--out"])
            .arg(dir.path().join("out"))
            .args(extra)
            .env("NO_COLOR", "1")
            .env_remove("FMOEC_FP8_EMULATE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr)
    };
    for ranks in [&[][..], &["--ranks", "2"]] {
        let (code, stderr) = run(&file, &[ranks, &["--diagnostics", "json"]].concat());
        assert_eq!(code, Some(1), "{stderr}");
        let said: serde_json::Value = serde_json::from_str(&stderr).expect(&stderr);
        let d = &said[0];
        assert_eq!(said.as_array().unwrap().len(), 1, "{stderr}");
        assert_eq!(d["code"], "E0616", "{stderr}");
        assert_eq!(d["message"], "`precision = fp8` cannot run on the CPU");
        assert_eq!(d["primary"]["line"], line, "{stderr}");
        assert!(d["notes"][0].as_str().unwrap().contains("FP8 tensor cores"));
    }
    let (code, stderr) = run(&file, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error[E0616]: `precision = fp8` cannot run on the CPU"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("fp8.fmoe:{line}:")), "{stderr}");
    let (code, stderr) = run(std::path::Path::new(&tiny), &["--precision", "fp8-dense"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: `--precision fp8-dense` cannot run on the CPU: FP8 runs on"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists(), "nothing is written");
}
