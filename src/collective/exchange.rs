//! The expert-parallel MoE exchange: counts, tokens to the experts' ranks, local
//! experts, results back; and its explicit backward. With FasterMoE's options
//! ([`ExchangeOptions`]): the exchange pipelined in chunks of peer ranks (the smart
//! schedule) and hot experts replicated to every rank (dynamic shadowing).
//!
//! Autograd is cut twice: the tokens a rank receives are a fresh leaf (`received`), and
//! the results it gets back are another (`combined`). [`ExchangeTape::backward`] runs
//! the reverse exchange: the gradient of `combined` travels to the experts' ranks,
//! goes through the local experts (accumulating their parameter gradients), and the
//! gradient of `received` travels back; the caller then backpropagates it from the
//! tokens it sent (see [`super::Tape`]).
//!
//! # The smart schedule
//! With `chunks = n` the peers of a rank at position `me` in a group of `G` are split by
//! their offset `o = (q − me) mod G` into `n` chunks (`o · n / G`; chunk 0 holds the rank
//! itself). Chunk `c`'s tokens go to the ranks at the offsets of chunk `c` and come from
//! those at the same offsets backwards, so the pairs match on every rank. Every chunk's
//! all-to-all is started first, then each chunk's experts run as soon as its tokens are
//! in and its results start back (FasterMoE's order: `S_0..S_n`, then `C_i` and `R_i`). On
//! backends that overlap ([`Collective::start_all_to_all_v`]: NCCL on a side stream) the
//! exchange of chunk `i + 1` travels while the experts of chunk `i` run; elsewhere the
//! same calls run one after another. The results equal the plain exchange's up to the
//! order in which the experts' gradients are summed.
//!
//! # Dynamic shadowing
//! Every rank knows every rank's counts (they are gathered first), so a [`ShadowPolicy`]
//! given the same counts decides the same on every rank. A shadowed expert's parameters are
//! broadcast from its owner; every rank runs its own tokens of that expert locally on the
//! copy (the owner too), sends none of them, and in the backward the copies' gradients are
//! summed back into the owner's gradient ([`super::grads::reduce_shadow_gradients`]),
//! before the optimizer step.
//!
//! Ordering on backends with a side stream: everything issued on the group's own
//! communicator (the counts, the broadcasts, the gradient reductions) happens while no
//! started all-to-all is pending; an exchange waits for all it started before it returns.

use super::error::{tensor_failure, CollectiveError, ErrorKind};
use super::grads::reduce_shadow_gradients;
use super::tape::backward_roots;
use super::{Collective, ExpertPlacement, PendingRows, Result};
use tch::{Kind, TchError, Tensor};

/// How one exchange runs (FasterMoE's options); the default is FastMoE's plain exchange.
#[derive(Clone, Copy, Default)]
pub struct ExchangeOptions<'a> {
    /// Chunks of peer ranks the exchange is pipelined in (0 or 1: one all-to-all each way;
    /// more than the group's ranks: one chunk per rank).
    pub chunks: usize,
    /// Decides which experts to replicate in this exchange (`None`: none).
    pub shadowing: Option<&'a dyn ShadowPolicy>,
}

/// Decides which experts an exchange replicates to every rank of the group.
pub trait ShadowPolicy {
    /// The global experts to replicate (any order, no repeats): `rows[s][e]` token rows
    /// of the group's rank `s` go to global expert `e`, held by position `owner[e]`. Every
    /// rank passes the same counts and must get the same answer.
    fn choose(&self, rows: &[Vec<i64>], owner: &[usize]) -> Vec<usize>;
}

/// This rank's experts of one MoE layer, as the exchange runs them.
pub trait LocalExperts {
    /// Runs `rows` (grouped by local expert: `counts[j]` rows for local expert `j`, in
    /// order) through this rank's experts and returns their outputs in the same order.
    /// Called on every rank, also with no rows.
    fn forward(&self, rows: &Tensor, counts: &[i64]) -> std::result::Result<Tensor, TchError>;

    /// The experts' parameters, each stacked over the local experts (`[E_local, ...]`), in
    /// an order and with trailing shapes and dtype every rank of the group shares (a rank
    /// with no experts returns `[0, ...]` tensors). Empty: these experts cannot be
    /// shadowed (the exchange then shadows none).
    fn parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// Runs `rows` (grouped: `counts[i]` rows for expert `i`) through the experts whose
    /// parameters are `params`, stacked like [`LocalExperts::parameters`] (`[S, ...]`),
    /// recording the graph back to `params`.
    fn forward_with(
        &self,
        params: &[Tensor],
        rows: &Tensor,
        counts: &[i64],
    ) -> std::result::Result<Tensor, TchError> {
        let _ = (params, rows, counts);
        Err(TchError::Torch(
            "these experts cannot run on replicated parameters".into(),
        ))
    }
}

/// The plain exchange's experts: a closure called once.
struct OnceExperts<F>(std::cell::RefCell<Option<F>>);

impl<F> LocalExperts for OnceExperts<F>
where
    F: FnOnce(&Tensor, &[i64]) -> std::result::Result<Tensor, TchError>,
{
    fn forward(&self, rows: &Tensor, counts: &[i64]) -> std::result::Result<Tensor, TchError> {
        match self.0.borrow_mut().take() {
            Some(f) => f(rows, counts),
            None => Err(TchError::Torch(
                "internal error: the experts closure of a plain exchange ran twice".into(),
            )),
        }
    }
}

/// One chunk of peers: what its forward exchanged and computed.
struct Chunk {
    /// Rows of the source tokens this chunk sends, in send order (`None`: all of them, in
    /// order).
    rows: Option<Tensor>,
    send_counts: Vec<i64>,
    recv_counts: Vec<i64>,
    /// Row `i` of the expert-major buffer is row `to_expert_major[i]` of the
    /// source-major one (`None`: the two orders agree).
    to_expert_major: Option<Tensor>,
    to_source_major: Option<Tensor>,
    received: Tensor,
    expert_out: Tensor,
}

/// The replicated experts of one exchange.
struct Shadows {
    /// Global ids, ascending.
    experts: Vec<usize>,
    /// (owner position, its local index) of each.
    owners: Vec<(usize, usize)>,
    /// Rows of the source tokens that ran on the copies, grouped by shadowed expert.
    rows: Tensor,
    /// Those rows, a leaf.
    kept: Tensor,
    /// The copies' parameters, `[S, P]` (each expert's parameters flattened), a leaf.
    params: Tensor,
    /// The copies' outputs for `kept`.
    out: Tensor,
    /// This rank's stacked expert parameters (the owner adds the copies' gradients).
    stacked: Vec<Tensor>,
}

/// What one exchange needs to run backward. Keep it until the backward pass; call
/// [`ExchangeTape::backward`] once, on every rank of the expert group, in the reverse
/// order of the forward exchanges.
pub struct ExchangeTape {
    at: String,
    source: Tensor,
    combined: Tensor,
    chunks: Vec<Chunk>,
    shadows: Option<Box<Shadows>>,
    send_counts: Vec<i64>,
    recv_counts: Vec<i64>,
    local_counts: Vec<i64>,
}

fn permute(t: &Tensor, index: &Option<Tensor>) -> std::result::Result<Tensor, tch::TchError> {
    match index {
        Some(index) => t.f_index_select(0, index),
        None => Ok(t.shallow_clone()),
    }
}

/// `t`'s rows `rows` (all of them when `None`).
fn take_rows(t: &Tensor, rows: &Option<Tensor>) -> std::result::Result<Tensor, TchError> {
    permute(t, rows)
}

/// `[rows, ...]` zeros shaped like `like`'s rows.
fn zero_rows(like: &Tensor, rows: i64) -> std::result::Result<Tensor, TchError> {
    let mut shape = like.size();
    if let Some(first) = shape.first_mut() {
        *first = rows;
    }
    Tensor::f_zeros(&shape, (like.kind(), like.device()))
}

/// An index tensor on `device`, `None` when it is `0..total` in order.
fn index_or_all(
    rows: &[i64],
    total: i64,
    device: tch::Device,
) -> std::result::Result<Option<Tensor>, TchError> {
    if rows.len() as i64 == total && rows.iter().enumerate().all(|(i, &r)| i as i64 == r) {
        return Ok(None);
    }
    Ok(Some(Tensor::f_from_slice(rows)?.f_to_device(device)?))
}

/// Run one MoE layer's experts across the expert group (FastMoE's plain exchange).
///
/// - `tokens`: this rank's token copies, `[N, ...]`, sorted by slot (see
///   [`ExpertPlacement::slot_of_expert`]); it may be attached to the autograd graph.
/// - `counts[slot]`: how many rows go to each slot (length = global experts, sum = N).
/// - `experts(received, local_counts)`: runs this rank's local experts on `received`
///   (`[R, ...]`, grouped by local expert, `local_counts[j]` rows for local expert `j`,
///   a leaf that requires grad) and returns `[R, ...]` outputs in the same order. It is
///   called on every rank, also with `R = 0`.
///
/// Returns `combined`: `[N, ...]`, the expert outputs for `tokens`' rows in the same
/// order, a leaf that requires grad, and the tape for the backward. Every rank of the
/// group must call this (the same number of times, in the same order), even with no
/// tokens. `at` labels the call site in errors (`"step 7, layer 3"`).
pub fn exchange_experts<F>(
    group: &dyn Collective,
    placement: &ExpertPlacement,
    tokens: &Tensor,
    counts: &[i64],
    at: &str,
    experts: F,
) -> Result<(Tensor, ExchangeTape)>
where
    F: FnOnce(&Tensor, &[i64]) -> std::result::Result<Tensor, tch::TchError>,
{
    let experts = OnceExperts(std::cell::RefCell::new(Some(experts)));
    exchange_experts_with(
        group,
        placement,
        tokens,
        counts,
        at,
        ExchangeOptions::default(),
        &experts,
    )
}

/// [`exchange_experts`] with FasterMoE's options: the exchange in `options.chunks` chunks
/// of peers, and the experts `options.shadowing` picks replicated (see the module docs).
/// `experts` runs this rank's experts (per chunk, so possibly several times) and, for
/// shadowing, gives and runs their parameters. Every rank of the group must pass the same
/// options.
pub fn exchange_experts_with(
    group: &dyn Collective,
    placement: &ExpertPlacement,
    tokens: &Tensor,
    counts: &[i64],
    at: &str,
    options: ExchangeOptions,
    experts: &dyn LocalExperts,
) -> Result<(Tensor, ExchangeTape)> {
    let rows = tokens.size().first().copied().unwrap_or(0);
    let (routing, shadowed, stacked) = route(
        group,
        placement,
        rows,
        counts,
        options.shadowing,
        experts,
        at,
    )?;

    // Shadowed experts: parameters from their owners, before any chunk starts.
    let shadows = PendingShadows::start(group, &routing, &shadowed, tokens, stacked, at)?;

    // Chunks of peers: every chunk's dispatch starts before any chunk's experts run.
    let chunks = options.chunks.clamp(1, group.size().max(1));
    let dispatched = start_dispatches(group, &routing, tokens, rows, chunks, at)?;
    let ran = run_chunks(group, &routing, dispatched, experts, at)?;

    // The replicas run this rank's own tokens of the shadowed experts meanwhile.
    let shadows = shadows
        .map(|pending| pending.run(shadowed, experts).map(Box::new))
        .transpose()
        .map_err(tensor_failure(group.label(), EXCHANGE, at))?;

    let combined = wait_and_combine(
        group,
        tokens,
        rows,
        &ran.chunks,
        ran.returning,
        shadows.as_deref(),
        at,
    )?;
    let tape = ExchangeTape {
        at: at.to_string(),
        source: tokens.shallow_clone(),
        combined: combined.shallow_clone(),
        chunks: ran.chunks,
        shadows,
        send_counts: routing.rows_to.iter().map(|r| r.len() as i64).collect(),
        recv_counts: routing.recv_from,
        local_counts: ran.local_counts,
    };
    Ok((combined, tape))
}

const EXCHANGE: &str = "exchange_experts";

/// An exchange refused for a call that does not fit (`message` says why).
fn invalid_call(group: &dyn Collective, at: &str, message: String) -> CollectiveError {
    CollectiveError::new(group.label(), EXCHANGE, at, ErrorKind::Invalid(message))
}

/// This rank's routing of its `rows` token copies (`counts` per slot) over the group: every
/// rank's counts gathered, the experts `policy` shadows this time (the same on every rank),
/// and this rank's stacked expert parameters to replicate them from.
fn route(
    group: &dyn Collective,
    placement: &ExpertPlacement,
    rows: i64,
    counts: &[i64],
    policy: Option<&dyn ShadowPolicy>,
    experts: &dyn LocalExperts,
    at: &str,
) -> Result<(Routing, Vec<usize>, Vec<Tensor>)> {
    let all_counts = gather_counts(group, placement, rows, counts, at)?;
    let (shadowed, stacked) = shadowed_experts(group, placement, &all_counts, policy, experts, at)?;
    let routing = Routing::new(placement, group.rank(), counts, all_counts, &shadowed);
    Ok((routing, shadowed, stacked))
}

/// Which experts run on replicas this time (the same answer on every rank, from every
/// rank's counts), and this rank's stacked expert parameters to replicate them from. None
/// without a policy, alone in the group, or when these experts cannot be shadowed.
fn shadowed_experts(
    group: &dyn Collective,
    placement: &ExpertPlacement,
    all_counts: &[Vec<i64>],
    policy: Option<&dyn ShadowPolicy>,
    experts: &dyn LocalExperts,
    at: &str,
) -> Result<(Vec<usize>, Vec<Tensor>)> {
    let Some(policy) = policy.filter(|_| group.size() > 1) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let stacked = experts.parameters();
    if stacked.is_empty() {
        return Ok((Vec::new(), stacked));
    }
    let shadowed = choose_shadowed(policy, placement, all_counts)
        .map_err(|message| invalid_call(group, at, message))?;
    Ok((shadowed, stacked))
}

/// Starts every chunk's dispatch before any expert runs (FasterMoE's order): each chunk's
/// plan, and its rows of `tokens` on their way to the experts' ranks.
fn start_dispatches(
    group: &dyn Collective,
    routing: &Routing,
    tokens: &Tensor,
    rows: i64,
    n: usize,
    at: &str,
) -> Result<Vec<(ChunkPlan, PendingRows)>> {
    let terr = tensor_failure(group.label(), EXCHANGE, at);
    let sent = tokens.f_detach().map_err(&terr)?;
    let mut dispatched = Vec::with_capacity(n);
    for c in 0..n {
        let plan = routing.chunk(c, n, rows, tokens.device()).map_err(&terr)?;
        let send = take_rows(&sent, &plan.rows).map_err(&terr)?;
        let label = chunk_label(at, "dispatch", c, n);
        let arrival =
            group.start_all_to_all_v(&send, &plan.send_counts, &plan.recv_counts, &label)?;
        dispatched.push((plan, arrival));
    }
    Ok(dispatched)
}

/// The chunks' experts run, and their results on the way back.
struct RanChunks {
    chunks: Vec<Chunk>,
    /// Each chunk's results travelling back to the tokens' ranks, in chunk order.
    returning: Vec<PendingRows>,
    /// Rows per local expert over all the chunks.
    local_counts: Vec<i64>,
}

/// Each chunk's experts as soon as its tokens are in, in chunk order; its results start
/// back before the next chunk's experts run.
fn run_chunks(
    group: &dyn Collective,
    routing: &Routing,
    dispatched: Vec<(ChunkPlan, PendingRows)>,
    experts: &dyn LocalExperts,
    at: &str,
) -> Result<RanChunks> {
    let n = dispatched.len();
    let mut ran = RanChunks {
        chunks: Vec::with_capacity(n),
        returning: Vec::with_capacity(n),
        local_counts: vec![0i64; routing.mine.len()],
    };
    for (c, (plan, arrival)) in dispatched.into_iter().enumerate() {
        for (total, rows) in ran.local_counts.iter_mut().zip(&plan.local_counts) {
            *total += rows;
        }
        let label = chunk_label(at, "combine", c, n);
        let (chunk, returning) = run_chunk(group, plan, arrival, experts, &label, at)?;
        ran.chunks.push(chunk);
        ran.returning.push(returning);
    }
    Ok(ran)
}

/// One chunk once its tokens arrive: this rank's experts run on them (a fresh leaf, grouped
/// by local expert) and their results start back (`label`).
fn run_chunk(
    group: &dyn Collective,
    plan: ChunkPlan,
    arrival: PendingRows,
    experts: &dyn LocalExperts,
    label: &str,
    at: &str,
) -> Result<(Chunk, PendingRows)> {
    let terr = tensor_failure(group.label(), EXCHANGE, at);
    let arrived = arrival.wait()?;
    let received = permute(&arrived, &plan.to_expert_major)
        .and_then(|t| t.f_detach())
        .and_then(|t| t.f_set_requires_grad(true))
        .map_err(&terr)?;
    let expert_out = experts
        .forward(&received, &plan.local_counts)
        .map_err(&terr)?;
    let expected: i64 = plan.local_counts.iter().sum();
    let out_rows = expert_out.size().first().copied().unwrap_or(-1);
    if out_rows != expected {
        return Err(invalid_call(
            group,
            at,
            format!("the experts returned {out_rows} rows for {expected} received"),
        ));
    }
    let back = permute(
        &expert_out.f_detach().map_err(&terr)?,
        &plan.to_source_major,
    )
    .map_err(&terr)?;
    let returning = group.start_all_to_all_v(&back, &plan.recv_counts, &plan.send_counts, label)?;
    let chunk = Chunk {
        rows: plan.rows,
        send_counts: plan.send_counts,
        recv_counts: plan.recv_counts,
        to_expert_major: plan.to_expert_major,
        to_source_major: plan.to_source_major,
        received,
        expert_out,
    };
    Ok((chunk, returning))
}

/// `"{at}, dispatch"`, or with several chunks `"{at}, dispatch chunk 2"`.
fn chunk_label(at: &str, what: &str, chunk: usize, chunks: usize) -> String {
    if chunks == 1 {
        format!("{at}, {what}")
    } else {
        format!("{at}, {what} chunk {chunk}")
    }
}

/// Checks this rank's call against the placement (the group's size, a count per expert
/// summing to the token rows) and gathers every rank's counts.
fn gather_counts(
    group: &dyn Collective,
    placement: &ExpertPlacement,
    rows: i64,
    counts: &[i64],
    at: &str,
) -> Result<Vec<Vec<i64>>> {
    let invalid = |message: String| invalid_call(group, at, message);
    let size = group.size();
    if placement.ranks() != size {
        return Err(invalid(format!(
            "the placement spreads experts over {} ranks but the group has {size}",
            placement.ranks()
        )));
    }
    if counts.len() != placement.experts()
        || counts.iter().any(|&c| c < 0)
        || counts.iter().sum::<i64>() != rows
    {
        return Err(invalid(format!(
            "counts {counts:?} must give, for each of the {} experts, how many of the {rows} token rows go to it",
            placement.experts()
        )));
    }
    let all_counts = group.all_gather_counts(counts, &format!("{at}, dispatch counts"))?;
    if all_counts.iter().any(|c| c.len() != counts.len()) {
        return Err(invalid(
            "the ranks disagree on the number of experts".into(),
        ));
    }
    Ok(all_counts)
}

/// Each global expert's (owner position, local index on it).
fn expert_owners(placement: &ExpertPlacement) -> Vec<(usize, usize)> {
    let mut owners = vec![(0, 0); placement.experts()];
    for p in 0..placement.ranks() {
        for (j, &e) in placement.local_experts(p).iter().enumerate() {
            owners[e] = (p, j);
        }
    }
    owners
}

/// The experts `policy` replicates, ascending and without repeats; a message when it names
/// one that does not exist.
fn choose_shadowed(
    policy: &dyn ShadowPolicy,
    placement: &ExpertPlacement,
    all_counts: &[Vec<i64>],
) -> std::result::Result<Vec<usize>, String> {
    let slot_of_expert = placement.slot_of_expert();
    let by_expert: Vec<Vec<i64>> = all_counts
        .iter()
        .map(|c| slot_of_expert.iter().map(|&s| c[s as usize]).collect())
        .collect();
    let owner: Vec<usize> = expert_owners(placement).iter().map(|&(p, _)| p).collect();
    let mut chosen = policy.choose(&by_expert, &owner);
    chosen.sort_unstable();
    chosen.dedup();
    match chosen.iter().find(|&&e| e >= placement.experts()) {
        Some(e) => Err(format!(
            "the shadowing policy chose expert {e} of {}",
            placement.experts()
        )),
        None => Ok(chosen),
    }
}

/// Where one exchange's rows go: this rank's rows per slot, those that travel to each
/// rank, and how many arrive from each; the shadowed experts' slots travel nowhere.
struct Routing {
    size: usize,
    me: usize,
    /// This rank's slots (its local experts in placement order).
    mine: std::ops::Range<usize>,
    counts: Vec<i64>,
    all_counts: Vec<Vec<i64>>,
    /// Each global expert's (owner position, local index on it).
    owners: Vec<(usize, usize)>,
    slot_of_expert: Vec<i64>,
    slot_shadowed: Vec<bool>,
    /// The first row of each slot in this rank's tokens.
    slot_start: Vec<i64>,
    /// Per destination rank, the rows of this rank's tokens it receives, in order.
    rows_to: Vec<Vec<i64>>,
    /// Per source rank, how many rows arrive here from it.
    recv_from: Vec<i64>,
}

/// One chunk's part of the exchange.
struct ChunkPlan {
    /// The rows of the tokens it sends, in send order (`None`: all, in order).
    rows: Option<Tensor>,
    send_counts: Vec<i64>,
    recv_counts: Vec<i64>,
    /// Rows per local expert that arrive in this chunk.
    local_counts: Vec<i64>,
    to_expert_major: Option<Tensor>,
    to_source_major: Option<Tensor>,
}

impl Routing {
    fn new(
        placement: &ExpertPlacement,
        me: usize,
        counts: &[i64],
        all_counts: Vec<Vec<i64>>,
        shadowed: &[usize],
    ) -> Routing {
        let size = placement.ranks();
        let slot_of_expert = placement.slot_of_expert();
        let mut slot_shadowed = vec![false; placement.experts()];
        for &e in shadowed {
            slot_shadowed[slot_of_expert[e] as usize] = true;
        }
        let mut slot_start = Vec::with_capacity(counts.len());
        let mut next = 0i64;
        for &c in counts {
            slot_start.push(next);
            next += c;
        }
        let mine = placement.slots(me);
        let recv_from = all_counts
            .iter()
            .map(|c| {
                mine.clone()
                    .filter(|&s| !slot_shadowed[s])
                    .map(|s| c[s])
                    .sum()
            })
            .collect();
        let mut routing = Routing {
            size,
            me,
            mine,
            counts: counts.to_vec(),
            all_counts,
            owners: expert_owners(placement),
            slot_of_expert,
            slot_shadowed,
            slot_start,
            rows_to: Vec::new(),
            recv_from,
        };
        routing.rows_to = (0..size)
            .map(|q| {
                placement
                    .slots(q)
                    .filter(|&s| !routing.slot_shadowed[s])
                    .flat_map(|s| routing.slot_rows(s))
                    .collect()
            })
            .collect();
        routing
    }

    /// The rows of this rank's tokens in `slot`.
    fn slot_rows(&self, slot: usize) -> std::ops::Range<i64> {
        self.slot_start[slot]..self.slot_start[slot] + self.counts[slot]
    }

    /// Chunk `c` of `n`: the peers at offsets `o` from this rank with `o·n/size == c`.
    fn chunk(
        &self,
        c: usize,
        n: usize,
        rows: i64,
        device: tch::Device,
    ) -> std::result::Result<ChunkPlan, TchError> {
        let size = self.size;
        let (targets, sources) = self.chunk_peers(c, n);
        let send_rows: Vec<i64> = (0..size)
            .filter(|&q| targets[q])
            .flat_map(|q| self.rows_to[q].iter().copied())
            .collect();
        let send_counts: Vec<i64> = (0..size)
            .map(|q| {
                if targets[q] {
                    self.rows_to[q].len() as i64
                } else {
                    0
                }
            })
            .collect();
        let recv_counts: Vec<i64> = (0..size)
            .map(|s| if sources[s] { self.recv_from[s] } else { 0 })
            .collect();
        let (order, received) = self.expert_major_order(&sources);
        let (to_expert_major, to_source_major) = permutations(&order, received, device)?;
        Ok(ChunkPlan {
            rows: index_or_all(&send_rows, rows, device)?,
            send_counts,
            recv_counts,
            local_counts: self.chunk_local_counts(&sources),
            to_expert_major,
            to_source_major,
        })
    }

    /// Which ranks chunk `c` of `n` sends to (`targets[q]`) and receives from
    /// (`sources[s]`): the same offsets, forwards and backwards.
    fn chunk_peers(&self, c: usize, n: usize) -> (Vec<bool>, Vec<bool>) {
        let (size, me) = (self.size, self.me);
        let chunk_of = |offset: usize| offset * n / size;
        let targets = (0..size)
            .map(|q| chunk_of((q + size - me) % size) == c)
            .collect();
        let sources = (0..size)
            .map(|s| chunk_of((me + size - s) % size) == c)
            .collect();
        (targets, sources)
    }

    /// Rows per local expert that arrive from `sources` (none for a shadowed one).
    fn chunk_local_counts(&self, sources: &[bool]) -> Vec<i64> {
        self.mine
            .clone()
            .map(|slot| {
                if self.slot_shadowed[slot] {
                    0
                } else {
                    (0..self.size)
                        .filter(|&s| sources[s])
                        .map(|s| self.all_counts[s][slot])
                        .sum()
                }
            })
            .collect()
    }

    /// The rows that arrive from `sources` (source-major: rank `s`, then local expert `j`)
    /// in expert-major order (`j`, then `s`), and how many arrive.
    fn expert_major_order(&self, sources: &[bool]) -> (Vec<i64>, i64) {
        let mine = &self.mine;
        let mut offsets = vec![vec![0i64; mine.len()]; self.size];
        let mut at_row = 0i64;
        for (s, row) in offsets.iter_mut().enumerate() {
            if !sources[s] {
                continue;
            }
            for (j, slot) in mine.clone().enumerate() {
                row[j] = at_row;
                if !self.slot_shadowed[slot] {
                    at_row += self.all_counts[s][slot];
                }
            }
        }
        let mut order = Vec::with_capacity(at_row as usize);
        for (j, slot) in mine.clone().enumerate() {
            if self.slot_shadowed[slot] {
                continue;
            }
            for s in (0..self.size).filter(|&s| sources[s]) {
                order.extend(offsets[s][j]..offsets[s][j] + self.all_counts[s][slot]);
            }
        }
        (order, at_row)
    }
}

/// The permutation `order` of `rows` rows as an index and its inverse (`None` for both
/// where it is the identity).
fn permutations(
    order: &[i64],
    rows: i64,
    device: tch::Device,
) -> std::result::Result<(Option<Tensor>, Option<Tensor>), TchError> {
    let Some(forward) = index_or_all(order, rows, device)? else {
        return Ok((None, None));
    };
    let mut inverse = vec![0i64; order.len()];
    for (i, &r) in order.iter().enumerate() {
        inverse[r as usize] = i as i64;
    }
    let backward = Tensor::f_from_slice(&inverse)?.f_to_device(device)?;
    Ok((Some(forward), Some(backward)))
}

/// The shadowed experts' parameters, broadcast from their owners, and this rank's rows for
/// them, before the chunks start.
struct PendingShadows {
    owners: Vec<(usize, usize)>,
    params: Tensor,
    rows: Tensor,
    kept: Tensor,
    counts: Vec<i64>,
    stacked: Vec<Tensor>,
}

impl PendingShadows {
    /// The `shadowed` experts' parameters on their way from their owners, and this rank's
    /// rows for them; `None` when no expert is shadowed.
    fn start(
        group: &dyn Collective,
        routing: &Routing,
        shadowed: &[usize],
        tokens: &Tensor,
        stacked: Vec<Tensor>,
        at: &str,
    ) -> Result<Option<PendingShadows>> {
        if shadowed.is_empty() {
            return Ok(None);
        }
        let terr = tensor_failure(group.label(), EXCHANGE, at);
        let all_owners: Vec<(usize, usize)> = shadowed.iter().map(|&e| routing.owners[e]).collect();
        let params = replicate(group, &stacked, &all_owners, at)?;
        let slot = |e: usize| routing.slot_of_expert[e] as usize;
        let kept_rows: Vec<i64> = shadowed
            .iter()
            .flat_map(|&e| routing.slot_rows(slot(e)))
            .collect();
        let counts = shadowed.iter().map(|&e| routing.counts[slot(e)]).collect();
        let rows = Tensor::f_from_slice(&kept_rows)
            .and_then(|t| t.f_to_device(tokens.device()))
            .map_err(&terr)?;
        let kept = tokens
            .f_detach()
            .and_then(|t| t.f_index_select(0, &rows))
            .and_then(|t| t.f_set_requires_grad(true))
            .map_err(&terr)?;
        Ok(Some(PendingShadows {
            owners: all_owners,
            params,
            rows,
            kept,
            counts,
            stacked,
        }))
    }

    /// The replicas run this rank's rows of the shadowed experts.
    fn run(
        self,
        experts: Vec<usize>,
        local: &dyn LocalExperts,
    ) -> std::result::Result<Shadows, TchError> {
        let views = parameter_views(&self.params, &self.stacked)?;
        let out = local.forward_with(&views, &self.kept, &self.counts)?;
        Ok(Shadows {
            experts,
            owners: self.owners,
            rows: self.rows,
            kept: self.kept,
            params: self.params,
            out,
            stacked: self.stacked,
        })
    }
}

/// Waits for every chunk's results, in chunk order, and puts them (and the replicas') at the
/// rows of `tokens` they came from: `combined`, a leaf that requires grad.
fn wait_and_combine(
    group: &dyn Collective,
    tokens: &Tensor,
    rows: i64,
    chunks: &[Chunk],
    returning: Vec<PendingRows>,
    shadows: Option<&Shadows>,
    at: &str,
) -> Result<Tensor> {
    let mut returned = Vec::with_capacity(returning.len());
    for r in returning {
        returned.push(r.wait()?);
    }
    combine(tokens, rows, chunks, returned, shadows)
        .and_then(|t| t.f_detach())
        .and_then(|t| t.f_set_requires_grad(true))
        .map_err(tensor_failure(group.label(), EXCHANGE, at))
}

/// The combined output rows: each chunk's returned rows (and the replicas' outputs) at the
/// rows of the tokens they came from.
fn combine(
    tokens: &Tensor,
    rows: i64,
    chunks: &[Chunk],
    mut returned: Vec<Tensor>,
    shadows: Option<&Shadows>,
) -> std::result::Result<Tensor, TchError> {
    if chunks.len() == 1 && shadows.is_none() && chunks[0].rows.is_none() {
        return Ok(returned.pop().unwrap_or_default());
    }
    let mut combined = zero_rows(tokens, rows)?;
    for (chunk, back) in chunks.iter().zip(&returned) {
        if let Some(index) = &chunk.rows {
            combined = combined.f_index_copy(0, index, back)?;
        } else {
            combined = back.shallow_clone();
        }
    }
    if let Some(s) = shadows {
        let out = s.out.f_detach()?;
        combined = combined.f_index_copy(0, &s.rows, &out)?;
    }
    Ok(combined)
}

/// The parameters of the experts `owners` (position, local index) names, flattened into
/// one row each (`[S, P]`), broadcast from each owner to the group: a leaf that requires
/// grad. `stacked` is this rank's [`LocalExperts::parameters`].
fn replicate(
    group: &dyn Collective,
    stacked: &[Tensor],
    owners: &[(usize, usize)],
    at: &str,
) -> Result<Tensor> {
    const OP: &str = "shadow experts";
    let terr = tensor_failure(group.label(), OP, at);
    let kind = stacked.first().map_or(Kind::Float, |t| t.kind());
    if stacked.iter().any(|t| t.kind() != kind || t.dim() == 0) {
        return Err(CollectiveError::new(
            group.label(),
            OP,
            at,
            ErrorKind::Invalid(
                "the experts' stacked parameters must share one dtype and have a leading expert dimension".into(),
            ),
        ));
    }
    let device = stacked.first().map_or(tch::Device::Cpu, |t| t.device());
    let per_expert: i64 = stacked
        .iter()
        .map(|t| t.size()[1..].iter().product::<i64>())
        .sum();
    let me = group.rank();
    let mut copies = Vec::with_capacity(owners.len());
    for (i, &(owner, local)) in owners.iter().enumerate() {
        let mut flat = if owner == me {
            let pieces: Vec<Tensor> = stacked
                .iter()
                .map(|t| t.f_detach()?.f_select(0, local as i64)?.f_reshape([-1]))
                .collect::<std::result::Result<_, _>>()
                .map_err(&terr)?;
            Tensor::f_cat(&pieces, 0)
                .and_then(|t| t.f_contiguous())
                .map_err(&terr)?
        } else {
            Tensor::f_zeros([per_expert], (kind, device)).map_err(&terr)?
        };
        if owner == me {
            // a copy: the broadcast works in place and the parameters must not move
            flat = flat.f_detach_copy().map_err(&terr)?;
        }
        group.broadcast(&mut flat, owner, &format!("{at}, shadowed expert {i}"))?;
        copies.push(flat);
    }
    Tensor::f_stack(&copies, 0)
        .and_then(|t| t.f_set_requires_grad(true))
        .map_err(&terr)
}

/// The columns of the flattened `[S, P]` copies that hold each stacked parameter,
/// reshaped to `[S, ...]` (attached to `params`' graph).
fn parameter_views(
    params: &Tensor,
    stacked: &[Tensor],
) -> std::result::Result<Vec<Tensor>, TchError> {
    let s = params.size()[0];
    let mut start = 0i64;
    let mut views = Vec::with_capacity(stacked.len());
    for t in stacked {
        let trailing = &t.size()[1..];
        let width: i64 = trailing.iter().product();
        let mut shape = vec![s];
        shape.extend_from_slice(trailing);
        views.push(params.f_narrow(1, start, width)?.f_reshape(&shape)?);
        start += width;
    }
    Ok(views)
}

impl ExchangeTape {
    /// The tokens given to the forward exchange (attached to their graph).
    pub fn source(&self) -> &Tensor {
        &self.source
    }

    /// Rows this rank received per local expert in the forward (all chunks).
    pub fn local_counts(&self) -> &[i64] {
        &self.local_counts
    }

    /// Rows this rank sent to / received from each rank of the group in the forward (all
    /// chunks; rows of shadowed experts stay home).
    pub fn send_counts(&self) -> &[i64] {
        &self.send_counts
    }

    pub fn recv_counts(&self) -> &[i64] {
        &self.recv_counts
    }

    /// The chunks the exchange ran in.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// The experts (global ids, ascending) that ran on replicas in this exchange.
    pub fn shadowed(&self) -> &[usize] {
        self.shadows.as_ref().map_or(&[], |s| s.experts.as_slice())
    }

    /// The reverse exchange. Reads the gradient accumulated on `combined` (zeros if
    /// none reached it), sends it to the experts' ranks, backpropagates it through the
    /// local experts (their parameters' `.grad` accumulate), and returns the gradient of
    /// [`ExchangeTape::source`], `[N, ...]`. The caller backpropagates it from `source`
    /// (with the other roots of the same segment: [`super::Tape`] does this).
    /// Shadowed experts' gradients are summed into their owners' `.grad`.
    /// Call once per forward exchange, on every rank of the group.
    pub fn backward(&self, group: &dyn Collective, at: &str) -> Result<Tensor> {
        let label = format!("{at}, {}", self.at);
        let terr = tensor_failure(group.label(), BACKWARD_OP, &label);
        let grad_combined = defined_or_zeros(&self.combined).map_err(&terr)?;
        let pending = self.send_result_gradients(group, &grad_combined, &label)?;
        let returning = self.experts_backward(group, pending, &label)?;
        let shadow_grads = self.shadows_backward(&grad_combined).map_err(&terr)?;
        let mut grads = Vec::with_capacity(returning.len());
        for r in returning {
            grads.push(r.wait()?);
        }
        // Only now, with no chunk in flight, the replicas' gradients go to their owners.
        if let (Some(s), Some((_, params))) = (&self.shadows, &shadow_grads) {
            reduce_shadow_gradients(group, &s.stacked, &s.owners, params, &label)?;
        }
        self.source_gradient(&grad_combined, grads, shadow_grads.map(|(kept, _)| kept))
            .map_err(&terr)
    }

    /// What the backward's exchange of chunk `c` is called in errors.
    fn backward_step(&self, label: &str, what: &str, c: usize) -> String {
        if self.chunks.len() == 1 {
            format!("{label}, {what} backward")
        } else {
            format!("{label}, {what} chunk {c} backward")
        }
    }

    /// Starts each chunk's part of `grad_combined` back to the ranks that ran its experts.
    fn send_result_gradients(
        &self,
        group: &dyn Collective,
        grad_combined: &Tensor,
        label: &str,
    ) -> Result<Vec<PendingRows>> {
        let terr = tensor_failure(group.label(), BACKWARD_OP, label);
        let mut pending = Vec::with_capacity(self.chunks.len());
        for (c, chunk) in self.chunks.iter().enumerate() {
            let grad = take_rows(grad_combined, &chunk.rows).map_err(&terr)?;
            pending.push(group.start_all_to_all_v(
                &grad,
                &chunk.send_counts,
                &chunk.recv_counts,
                &self.backward_step(label, "combine", c),
            )?);
        }
        Ok(pending)
    }

    /// As each chunk's gradient arrives: backpropagates it through the local experts and
    /// starts the gradient of the rows they received back to the ranks that sent them.
    fn experts_backward(
        &self,
        group: &dyn Collective,
        pending: Vec<PendingRows>,
        label: &str,
    ) -> Result<Vec<PendingRows>> {
        let terr = tensor_failure(group.label(), BACKWARD_OP, label);
        let mut returning = Vec::with_capacity(self.chunks.len());
        for (c, (chunk, arrival)) in self.chunks.iter().zip(pending).enumerate() {
            let grad_back = arrival.wait()?;
            let grad_expert_out = permute(&grad_back, &chunk.to_expert_major).map_err(&terr)?;
            if chunk.expert_out.requires_grad() {
                backward_roots(&[(&chunk.expert_out, &grad_expert_out)]).map_err(&terr)?;
            }
            let grad_received = defined_or_zeros(&chunk.received).map_err(&terr)?;
            let grad_sent = permute(&grad_received, &chunk.to_source_major).map_err(&terr)?;
            returning.push(group.start_all_to_all_v(
                &grad_sent,
                &chunk.recv_counts,
                &chunk.send_counts,
                &self.backward_step(label, "dispatch", c),
            )?);
        }
        Ok(returning)
    }

    /// The shadowed experts' backward, which runs here: the gradients of this rank's rows
    /// kept for them and of the replicas' parameters (`None` without shadowing).
    fn shadows_backward(
        &self,
        grad_combined: &Tensor,
    ) -> std::result::Result<Option<(Tensor, Tensor)>, TchError> {
        let Some(s) = &self.shadows else {
            return Ok(None);
        };
        let grad_out = grad_combined.f_index_select(0, &s.rows)?;
        if s.out.requires_grad() {
            backward_roots(&[(&s.out, &grad_out)])?;
        }
        Ok(Some((
            defined_or_zeros(&s.kept)?,
            defined_or_zeros(&s.params)?,
        )))
    }

    /// The gradient of [`ExchangeTape::source`]: each chunk's returned rows (`grads`) and
    /// the gradient of the rows kept for shadowed experts, each in its rows.
    fn source_gradient(
        &self,
        grad_combined: &Tensor,
        mut grads: Vec<Tensor>,
        shadow_kept: Option<Tensor>,
    ) -> std::result::Result<Tensor, TchError> {
        if self.chunks.len() == 1 && self.shadows.is_none() && self.chunks[0].rows.is_none() {
            return Ok(grads.pop().unwrap_or_default());
        }
        let rows = self.source.size().first().copied().unwrap_or(0);
        let mut grad_source = zero_rows(grad_combined, rows)?;
        for (chunk, g) in self.chunks.iter().zip(&grads) {
            grad_source = match &chunk.rows {
                Some(index) => grad_source.f_index_copy(0, index, g)?,
                None => g.shallow_clone(),
            };
        }
        if let (Some(s), Some(kept)) = (&self.shadows, &shadow_kept) {
            grad_source = grad_source.f_index_copy(0, &s.rows, kept)?;
        }
        Ok(grad_source)
    }
}

/// The operation the backward's errors name.
const BACKWARD_OP: &str = "exchange_experts backward";

/// `t.grad()`, or zeros shaped like `t` when no gradient reached it.
pub(crate) fn defined_or_zeros(t: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    let grad = t.grad();
    if grad.defined() {
        Ok(grad)
    } else {
        let kind = t.f_kind().unwrap_or(Kind::Float);
        Tensor::f_zeros(t.size(), (kind, t.device()))
    }
}
