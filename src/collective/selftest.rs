//! A small MoE whose split run must equal its single-rank run: the yardstick for the
//! expert exchange, used by the CPU tests (`tests/runtime/collective_moe.rs`) and by
//! `fmoec-collective-check` on real NCCL ranks.
//!
//! The model: two blocks of `h0 = h @ w_in` (a replicated stand-in for attention), then
//! `h = h0 + Σ_k softmax(top-k logits)_k · expert_k(h0)` with `logits = h0 @ w_gate` and
//! experts `linear → gelu → linear` with biases; loss `mean over tokens of ½‖h − target‖²`.
//! [`reference`] computes it on one rank, token by token, with one `backward()`, and no
//! part of this layer; [`split`] gives every rank its contiguous share of the tokens and only
//! its experts, exchanges tokens with [`exchange_experts`], runs backward in segments with
//! [`Tape`], reduces gradients by kind and clips by the global norm ([`split_with`]: with
//! FasterMoE's smart schedule and shadowing). [`compare`] lists the differences. Everything
//! is plain data ([`Data`]) so rank threads can share it.
//!
//! It knows nothing about the runtime's model or trainer.

use tch::{Device, Kind, Tensor};

use super::{
    clip_global_norm, exchange_experts_with, reduce_gradients, CollectiveError, ErrorKind,
    ExchangeOptions, ExpertPlacement, Groups, LocalExperts, ParamKind, ShadowPolicy, Tape,
};

pub const WIDTH: i64 = 8;
pub const HIDDEN: i64 = 12;
pub const TOP_K: i64 = 2;
pub const BLOCKS: usize = 2;
/// Small enough that every test run clips.
pub const MAX_NORM: f64 = 0.05;

/// A tensor as plain values (shape + f64 values, row-major).
#[derive(Clone, Debug)]
pub struct Data {
    pub shape: Vec<i64>,
    pub values: Vec<f64>,
}

impl Data {
    pub fn of(t: &Tensor) -> Data {
        let t = t
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .contiguous();
        Data {
            shape: t.size(),
            values: Vec::<f64>::try_from(t.reshape([-1])).unwrap_or_default(),
        }
    }

    pub fn tensor(&self, kind: Kind, device: Device) -> Tensor {
        Tensor::from_slice(&self.values)
            .reshape(&self.shape)
            .to_kind(kind)
            .to_device(device)
    }

    /// A fresh leaf that requires grad.
    fn param(&self, kind: Kind, device: Device) -> Tensor {
        self.tensor(kind, device).set_requires_grad(true)
    }

    /// The values of the given rows (first dimension), concatenated.
    pub fn rows(&self, rows: &[usize]) -> Vec<f64> {
        let per: usize = self.shape[1..].iter().map(|&s| s as usize).product();
        rows.iter()
            .flat_map(|&r| self.values[r * per..(r + 1) * per].iter().copied())
            .collect()
    }
}

/// One block's initial parameters.
#[derive(Clone, Debug)]
pub struct BlockInit {
    pub w_in: Data,
    pub w_gate: Data,
    /// Stacked over all experts: w1 [E,d,h], b1 [E,h], w2 [E,h,d], b2 [E,d].
    pub experts: [Data; 4],
}

/// The problem: inputs, targets and parameters, the same on every rank.
#[derive(Clone, Debug)]
pub struct Problem {
    pub tokens: i64,
    pub experts: usize,
    pub x: Data,
    pub target: Data,
    pub blocks: Vec<BlockInit>,
}

impl Problem {
    /// Draws the problem from a fixed seed on CPU in f64. In-process ranks (and the other
    /// tests of a test binary) share torch's global generator, so drawing holds its lock.
    pub fn new(tokens: i64, experts: usize, seed: i64) -> Problem {
        let _guard = crate::runtime::model::lock_rng();
        tch::manual_seed(seed);
        let randn = |shape: &[i64], scale: f64| {
            Data::of(&(Tensor::randn(shape, (Kind::Double, Device::Cpu)) * scale))
        };
        let e = experts as i64;
        Problem {
            tokens,
            experts,
            x: randn(&[tokens, WIDTH], 1.0),
            target: randn(&[tokens, WIDTH], 1.0),
            blocks: (0..BLOCKS)
                .map(|_| BlockInit {
                    w_in: randn(&[WIDTH, WIDTH], 0.4),
                    w_gate: randn(&[WIDTH, e], 1.0),
                    experts: [
                        randn(&[e, WIDTH, HIDDEN], 0.3),
                        randn(&[e, HIDDEN], 0.1),
                        randn(&[e, HIDDEN, WIDTH], 0.3),
                        randn(&[e, WIDTH], 0.1),
                    ],
                })
                .collect(),
        }
    }
}

/// What one run (or one rank of a split run) produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// This rank's output rows.
    pub out: Data,
    /// The global loss (mean over all tokens).
    pub loss: f64,
    /// Per block: w_in, w_gate, then the four expert tensors (this rank's experts only),
    /// after clipping.
    pub grads: Vec<Vec<Data>>,
    /// Global gradient norm before clipping.
    pub norm: f64,
    /// The clipping factor applied (1 when not clipped).
    pub scale: f64,
}

fn expert(x: &Tensor, p: &[Tensor], j: i64) -> Tensor {
    let hidden = (x.matmul(&p[0].get(j)) + p[1].get(j)).gelu("none");
    hidden.matmul(&p[2].get(j)) + p[3].get(j)
}

fn gate(h: &Tensor, w_gate: &Tensor) -> (Tensor, Tensor) {
    let (values, index) = h.matmul(w_gate).topk(TOP_K, -1, true, true);
    (values.softmax(-1, values.kind()), index)
}

fn loss_of(out: &Tensor, target: &Tensor) -> Tensor {
    (out - target)
        .square()
        .sum_dim_intlist(1, false, out.kind())
        .mean(out.kind())
        * 0.5
}

type Block = (Tensor, Tensor, Vec<Tensor>);

/// The single-rank run on CPU: no exchange, no cuts, token by token, one `backward()`.
pub fn reference(problem: &Problem, kind: Kind) -> Outcome {
    let cpu = Device::Cpu;
    let blocks: Vec<Block> = problem
        .blocks
        .iter()
        .map(|b| {
            (
                b.w_in.param(kind, cpu),
                b.w_gate.param(kind, cpu),
                b.experts.iter().map(|d| d.param(kind, cpu)).collect(),
            )
        })
        .collect();
    let mut h = problem.x.tensor(kind, cpu);
    for block in &blocks {
        h = reference_block(&h, block, problem.tokens);
    }
    let loss = loss_of(&h, &problem.target.tensor(kind, cpu));
    loss.backward();
    clipped_outcome(&h, &loss, &blocks)
}

/// One block of the reference on `h`, token by token: `h0 = h · w_in` plus each token's
/// experts' outputs weighted by the gate.
fn reference_block(h: &Tensor, (w_in, w_gate, experts): &Block, tokens: i64) -> Tensor {
    let h0 = h.matmul(w_in);
    let (weights, index) = gate(&h0, w_gate);
    let mut moe = h0.zeros_like();
    for t in 0..tokens {
        for k in 0..TOP_K {
            let e = index.int64_value(&[t, k]);
            let y = expert(&h0.get(t), experts, e) * weights.get(t).get(k);
            moe = moe.index_add(0, &Tensor::from_slice(&[t]), &y.unsqueeze(0));
        }
    }
    &h0 + moe
}

/// The reference's outcome once its loss went backward: output `h`, the loss, and the
/// gradients of `blocks` clipped to a global norm of [`MAX_NORM`].
fn clipped_outcome(h: &Tensor, loss: &Tensor, blocks: &[Block]) -> Outcome {
    let params: Vec<Tensor> = blocks
        .iter()
        .flat_map(|(w_in, w_gate, experts)| {
            [w_in.shallow_clone(), w_gate.shallow_clone()]
                .into_iter()
                .chain(experts.iter().map(Tensor::shallow_clone))
        })
        .collect();
    let norm = params
        .iter()
        .map(|p| p.grad().square().sum(Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    let scale = (MAX_NORM / (norm + 1e-6)).min(1.0);
    Outcome {
        out: Data::of(h),
        loss: loss.double_value(&[]),
        grads: params
            .chunks(6)
            .map(|b| b.iter().map(|p| Data::of(&(p.grad() * scale))).collect())
            .collect(),
        norm,
        scale,
    }
}

/// The selftest's experts on one rank: `[w1, b1, w2, b2]` stacked over its local experts.
struct BlockExperts<'a>(&'a [Tensor]);

impl LocalExperts for BlockExperts<'_> {
    fn forward(&self, rows: &Tensor, counts: &[i64]) -> Result<Tensor, tch::TchError> {
        self.forward_with(self.0, rows, counts)
    }

    fn parameters(&self) -> Vec<Tensor> {
        self.0.iter().map(Tensor::shallow_clone).collect()
    }

    fn forward_with(
        &self,
        params: &[Tensor],
        rows: &Tensor,
        counts: &[i64],
    ) -> Result<Tensor, tch::TchError> {
        let mut start = 0;
        let mut pieces = Vec::new();
        for (j, &n) in counts.iter().enumerate() {
            pieces.push(expert(&rows.f_narrow(0, start, n)?, params, j as i64));
            start += n;
        }
        if pieces.is_empty() {
            return Tensor::f_zeros([0, WIDTH], (rows.kind(), rows.device()));
        }
        Tensor::f_cat(&pieces, 0)
    }
}

/// Shadows the same experts in every exchange (tests and the check binary; the runtime's
/// policy weighs the counts).
pub struct ShadowThese(pub Vec<usize>);

impl ShadowPolicy for ShadowThese {
    fn choose(&self, _rows: &[Vec<i64>], _owner: &[usize]) -> Vec<usize> {
        self.0.clone()
    }
}

/// Tokens per rank of a split run over `world` ranks.
pub fn share(problem: &Problem, world: usize) -> i64 {
    problem.tokens / world as i64
}

/// One rank's part of the split run: its share of the tokens, its experts from
/// `placement` (over its expert group), on `device` in `kind`.
pub fn split(
    groups: &Groups,
    device: Device,
    kind: Kind,
    problem: &Problem,
    placement: &ExpertPlacement,
) -> super::Result<Outcome> {
    split_with(
        groups,
        device,
        kind,
        problem,
        placement,
        ExchangeOptions::default(),
    )
    .map(|(outcome, _)| outcome)
}

/// What one block's exchange did on one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeRecord {
    /// The experts that ran on replicas (ascending).
    pub shadowed: Vec<usize>,
    /// Chunks of peers the exchange ran in.
    pub chunks: usize,
    /// Token rows this rank sent to the other ranks of its group.
    pub sent_away: i64,
}

/// [`split`] with FasterMoE's options on every exchange; also returns what each block's
/// exchange did.
pub fn split_with(
    groups: &Groups,
    device: Device,
    kind: Kind,
    problem: &Problem,
    placement: &ExpertPlacement,
    options: ExchangeOptions,
) -> super::Result<(Outcome, Vec<ExchangeRecord>)> {
    let run = SplitRun {
        groups,
        placement,
        options,
        device,
        slot_of_expert: Tensor::from_slice(&placement.slot_of_expert()).to_device(device),
        share: share(problem, groups.world()),
    };
    let mine = |d: &Data| {
        d.tensor(kind, device)
            .narrow(0, groups.rank() as i64 * run.share, run.share)
    };
    let (x, target) = (mine(&problem.x), mine(&problem.target));
    let blocks = run.local_blocks(problem, kind);
    let mut tape = Tape::new();
    let mut records = Vec::new();
    let mut h = x;
    for (layer, block) in blocks.iter().enumerate() {
        let (out, record) = run.block(&mut tape, &h, block, layer)?;
        records.push(record);
        h = out;
    }
    let outcome = run.finish(tape, &h, &target, &blocks)?;
    Ok((outcome, records))
}

/// One rank's split run: its groups, the placement and options of every exchange, and its
/// share of the tokens.
struct SplitRun<'a> {
    groups: &'a Groups,
    placement: &'a ExpertPlacement,
    options: ExchangeOptions<'a>,
    device: Device,
    slot_of_expert: Tensor,
    /// Tokens per rank.
    share: i64,
}

impl SplitRun<'_> {
    /// The blocks' parameters as this rank holds them: the replicated ones whole, of the
    /// experts only its own.
    fn local_blocks(&self, problem: &Problem, kind: Kind) -> Vec<Block> {
        let local: Vec<i64> = self
            .placement
            .local_experts(self.groups.expert().rank())
            .iter()
            .map(|&e| e as i64)
            .collect();
        let local_index = Tensor::from_slice(&local);
        problem
            .blocks
            .iter()
            .map(|b| {
                let experts = b
                    .experts
                    .iter()
                    .map(|d| {
                        d.tensor(kind, Device::Cpu)
                            .index_select(0, &local_index)
                            .to_device(self.device)
                            .set_requires_grad(true)
                    })
                    .collect();
                (
                    b.w_in.param(kind, self.device),
                    b.w_gate.param(kind, self.device),
                    experts,
                )
            })
            .collect()
    }

    fn tensor_err(&self) -> impl Fn(tch::TchError) -> CollectiveError + '_ {
        |e| CollectiveError {
            group: self.groups.expert().label().to_string(),
            op: "selftest",
            at: "expert equivalence".into(),
            kind: Box::new(ErrorKind::Tensor(e)),
        }
    }

    /// Block `layer` on this rank's rows `h`, its exchange recorded on `tape`: the output
    /// rows and what the exchange did.
    fn block(
        &self,
        tape: &mut Tape,
        h: &Tensor,
        (w_in, w_gate, experts): &Block,
        layer: usize,
    ) -> super::Result<(Tensor, ExchangeRecord)> {
        let tensor_err = self.tensor_err();
        tape.step();
        let h0 = tape.cut(&h.matmul(w_in)).map_err(&tensor_err)?;
        let (weights, index) = gate(&h0, w_gate);
        tape.step();
        let weights = tape.cut(&weights).map_err(&tensor_err)?;
        let token = Tensor::arange(self.share, (Kind::Int64, self.device))
            .repeat_interleave_self_int(TOP_K, 0, None);
        let slot = self.slot_of_expert.index_select(0, &index.reshape([-1]));
        let order = slot.argsort_stable(true, 0, false);
        let token_sorted = token.index_select(0, &order);
        let counts_t = slot
            .bincount::<Tensor>(None, self.placement.experts() as i64)
            .to_device(Device::Cpu);
        let counts = Vec::<i64>::try_from(&counts_t).map_err(&tensor_err)?;
        let tokens = h0.index_select(0, &token_sorted);
        let (y, exchange) = exchange_experts_with(
            self.groups.expert(),
            self.placement,
            &tokens,
            &counts,
            &format!("step 0, layer {layer}"),
            self.options,
            &BlockExperts(experts),
        )?;
        let me = self.groups.expert().rank();
        let record = ExchangeRecord {
            shadowed: exchange.shadowed().to_vec(),
            chunks: exchange.chunks(),
            sent_away: exchange
                .send_counts()
                .iter()
                .enumerate()
                .filter(|&(q, _)| q != me)
                .map(|(_, &c)| c)
                .sum(),
        };
        tape.record(exchange);
        let w_sorted = weights.reshape([-1]).index_select(0, &order).unsqueeze(1);
        let moe = h0.zeros_like().index_add(0, &token_sorted, &(y * w_sorted));
        Ok((&h0 + moe, record))
    }

    /// The backward from the loss of the output `h`, the gradients reduced by kind and
    /// clipped by the global norm.
    fn finish(
        &self,
        tape: Tape,
        h: &Tensor,
        target: &Tensor,
        blocks: &[Block],
    ) -> super::Result<Outcome> {
        let groups = self.groups;
        let loss = loss_of(h, target);
        tape.backward(&loss, groups.expert(), "step 0 backward")?;
        let mut params: Vec<(ParamKind, &Tensor)> = Vec::new();
        for (w_in, w_gate, experts) in blocks {
            params.push((ParamKind::Replicated, w_in));
            params.push((ParamKind::Gate, w_gate));
            params.extend(experts.iter().map(|p| (ParamKind::Expert, p)));
        }
        reduce_gradients(groups, &params, "step 0")?;
        let norm = clip_global_norm(groups, &params, Some(MAX_NORM), "step 0")?;
        let mut global_loss = loss.detach().reshape([1]);
        groups
            .data()
            .all_reduce_sum(&mut global_loss, "step 0 loss")?;
        Ok(Outcome {
            out: Data::of(h),
            loss: global_loss.double_value(&[0]) / groups.world() as f64,
            grads: params
                .chunks(6)
                .map(|b| b.iter().map(|(_, p)| Data::of(&p.grad())).collect())
                .collect(),
            norm: norm.total,
            scale: norm.scale,
        })
    }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d.is_nan() { f64::NAN } else { m.max(d) })
}

/// Every quantity of rank `rank`'s outcome against the reference, as `(what, max abs
/// difference)`: its output rows, the loss, the norm, the clip factor, and each gradient
/// (expert gradients against the reference's rows of this rank's experts).
pub fn compare(
    expected: &Outcome,
    got: &Outcome,
    rank: usize,
    world: usize,
    expert_position: usize,
    placement: &ExpertPlacement,
) -> Vec<(String, f64)> {
    let share = expected.out.shape[0] as usize / world;
    let my_rows: Vec<usize> = (rank * share..(rank + 1) * share).collect();
    let mut diffs = vec![
        (
            "output".to_string(),
            max_diff(&got.out.values, &expected.out.rows(&my_rows)),
        ),
        ("loss".into(), (got.loss - expected.loss).abs()),
        ("norm".into(), (got.norm - expected.norm).abs()),
        ("clip factor".into(), (got.scale - expected.scale).abs()),
    ];
    let local = placement.local_experts(expert_position);
    let names = ["w_in", "w_gate", "w1", "b1", "w2", "b2"];
    for (block, (g, w)) in got.grads.iter().zip(&expected.grads).enumerate() {
        for (i, name) in names.iter().enumerate() {
            let want = if i < 2 {
                w[i].values.clone()
            } else {
                w[i].rows(local)
            };
            diffs.push((
                format!("block {block} {name} gradient"),
                max_diff(&g[i].values, &want),
            ));
        }
    }
    diffs
}

/// The differences above `tolerance` (or NaN), as messages; empty when all agree.
pub fn failures(diffs: &[(String, f64)], tolerance: f64) -> Vec<String> {
    diffs
        .iter()
        .filter(|(_, d)| d.is_nan() || *d > tolerance)
        .map(|(what, d)| format!("{what} differs by {d:e}"))
        .collect()
}
