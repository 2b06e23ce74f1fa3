//! The pipeline schedule: what each stage does, in order, within one training step (or one
//! forward-only pass), as data ([`program`]), and a simulator that runs every stage's program
//! against the others ([`simulate`]).
//!
//! Megatron-LM's schedules (`schedules.py` of v2.5 and later): with one model chunk per
//! stage, 1F1B (stage `s` of `p` runs `min(p - s - 1, m)` forward passes to fill the pipeline,
//! then alternates one forward and one backward, then drains the backwards); with `v` model
//! chunks per stage (virtual stages: chunk `c` of stage `s` is virtual stage `c·p + s`, so
//! the last stage's output of chunk `c` goes to the first stage's chunk `c + 1`), the
//! interleaved 1F1B, which needs the micro-batches to be a multiple of `p` and shrinks the
//! pipeline's idle time by `v`. Transfers between neighbours are batched as Megatron batches
//! them (a stage sends what it just computed and receives what it needs next in one batch),
//! which is what keeps blocking point-to-point transfers (NCCL's) from waiting on each other.
//!
//! The simulator checks what the runtime relies on: every send has its receive, matched in
//! the order a pair of ranks issues them (NCCL's rule), with the same tensor at both ends; no
//! stage waits forever when a batch completes only once every peer has posted its part; every
//! micro-batch's forward and backward run once per chunk, after their inputs arrived. Given
//! each chunk's forward and backward time it also gives the step's duration, from which the
//! planner's bubble follows ([`bubble_fraction`]).
//!
//! Knows nothing about models, tensors or ranks: stages and micro-batches are numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What crosses from one stage to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Payload {
    /// A chunk's output, the next virtual stage's input.
    Activation,
    /// The gradient of a chunk's input, the previous virtual stage's output gradient.
    Gradient,
}

/// One transfer of an [`Action::Exchange`], seen from the stage that runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Transfer {
    /// Sent (else received).
    pub send: bool,
    pub payload: Payload,
    /// The other stage.
    pub peer: usize,
    /// This stage's model chunk the tensor belongs to: for a sent activation the chunk that
    /// computed it, for a received one the chunk it is the input of; for a sent gradient the
    /// chunk whose input it is the gradient of, for a received one the chunk whose output it
    /// is the gradient of.
    pub chunk: usize,
    pub micro: usize,
}

/// One thing a stage does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The forward pass of model chunk `chunk` on micro-batch `micro`.
    Forward { chunk: usize, micro: usize },
    /// Its backward pass.
    Backward { chunk: usize, micro: usize },
    /// One batch of transfers with neighbouring stages (sends first in the list, then
    /// receives, each kind in a fixed order, so that two stages that exchange several
    /// tensors in one batch issue them in the same order).
    Exchange(Vec<Transfer>),
}

/// The shape of a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pipeline {
    pub stages: usize,
    /// Model chunks per stage (1: plain 1F1B).
    pub virtual_stages: usize,
    /// Micro-batches per step (per data rank).
    pub micro_batches: usize,
}

impl Pipeline {
    /// Why this pipeline cannot be scheduled, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        let Pipeline {
            stages: p,
            virtual_stages: v,
            micro_batches: m,
        } = *self;
        if p == 0 || v == 0 || m == 0 {
            return Err("a pipeline needs at least one stage, chunk and micro-batch".into());
        }
        if v > 1 && p == 1 {
            return Err("virtual stages need more than one pipeline stage".into());
        }
        if !runs_micro_batches(p as u64, v as u64, m as u64) {
            return Err(format!(
                "the interleaved schedule needs the micro-batches per step ({m}) to be a multiple \
                 of the pipeline stages ({p})"
            ));
        }
        Ok(())
    }

    /// The virtual stage of chunk `chunk` on stage `stage`.
    pub fn virtual_stage(&self, stage: usize, chunk: usize) -> usize {
        chunk * self.stages + stage
    }

    /// The stage and chunk of virtual stage `vs`.
    fn place(&self, vs: usize) -> (usize, usize) {
        (vs % self.stages, vs / self.stages)
    }

    fn last_virtual(&self) -> usize {
        self.stages * self.virtual_stages - 1
    }
}

/// Whether a pipeline of `stages` stages of `virtual_stages` model chunks each runs
/// `micro_batches` per step: the interleaved schedule needs a multiple of the stages (the
/// planner's rule where the file gives the micro-batch, its choice where it does not, and
/// [`Pipeline::check`]'s); plain 1F1B runs any number.
pub fn runs_micro_batches(stages: u64, virtual_stages: u64, micro_batches: u64) -> bool {
    virtual_stages <= 1 || micro_batches.checked_rem(stages) == Some(0)
}

/// Where a stage's chunk sends its output, and where its input comes from (stage, chunk).
fn next_of(p: &Pipeline, stage: usize, chunk: usize) -> Option<(usize, usize)> {
    let vs = p.virtual_stage(stage, chunk);
    (vs < p.last_virtual()).then(|| p.place(vs + 1))
}

fn prev_of(p: &Pipeline, stage: usize, chunk: usize) -> Option<(usize, usize)> {
    let vs = p.virtual_stage(stage, chunk);
    (vs > 0).then(|| p.place(vs - 1))
}

/// Builds one stage's program, numbering what it receives per chunk in arrival order (the
/// i-th activation a chunk receives is its micro-batch i's input, as its sender computes
/// them in order).
struct Builder<'a> {
    p: &'a Pipeline,
    stage: usize,
    actions: Vec<Action>,
    received_activations: BTreeMap<usize, usize>,
    received_gradients: BTreeMap<usize, usize>,
}

impl Builder<'_> {
    fn compute(&mut self, a: Action) {
        self.actions.push(a);
    }

    /// Sends what `forward` (an activation, `Some((chunk, micro))`) and `backward` (a
    /// gradient) produced, where they go; receives an activation for chunk `recv_forward`
    /// and a gradient for chunk `recv_backward`, from where they come. An empty batch is
    /// left out.
    fn exchange(
        &mut self,
        forward: Option<(usize, usize)>,
        backward: Option<(usize, usize)>,
        recv_forward: Option<usize>,
        recv_backward: Option<usize>,
    ) {
        let batch: Vec<Transfer> = [
            forward.and_then(|(chunk, micro)| self.send(Payload::Activation, chunk, micro)),
            backward.and_then(|(chunk, micro)| self.send(Payload::Gradient, chunk, micro)),
            recv_forward.and_then(|chunk| self.receive(Payload::Activation, chunk)),
            recv_backward.and_then(|chunk| self.receive(Payload::Gradient, chunk)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !batch.is_empty() {
            self.actions.push(Action::Exchange(batch));
        }
    }

    /// The send of chunk `chunk`'s `payload` for micro-batch `micro`: an activation to the
    /// next virtual stage, a gradient to the previous one (none past either end).
    fn send(&self, payload: Payload, chunk: usize, micro: usize) -> Option<Transfer> {
        let towards = match payload {
            Payload::Activation => next_of(self.p, self.stage, chunk),
            Payload::Gradient => prev_of(self.p, self.stage, chunk),
        };
        let (peer, _) = towards?;
        Some(Transfer {
            send: true,
            payload,
            peer,
            chunk,
            micro,
        })
    }

    /// The receive of chunk `chunk`'s next `payload` (an activation from the previous
    /// virtual stage, a gradient from the next; none past either end), numbered in arrival
    /// order.
    fn receive(&mut self, payload: Payload, chunk: usize) -> Option<Transfer> {
        let (from, received) = match payload {
            Payload::Activation => (
                prev_of(self.p, self.stage, chunk),
                &mut self.received_activations,
            ),
            Payload::Gradient => (
                next_of(self.p, self.stage, chunk),
                &mut self.received_gradients,
            ),
        };
        let (peer, _) = from?;
        let n = received.entry(chunk).or_default();
        let micro = *n;
        *n += 1;
        Some(Transfer {
            send: false,
            payload,
            peer,
            chunk,
            micro,
        })
    }
}

/// Stage `stage`'s program for one step of `pipeline` (`forward_only`: the forward passes
/// alone, as evaluation runs them). See the module docs for the schedules.
pub fn program(
    pipeline: &Pipeline,
    stage: usize,
    forward_only: bool,
) -> Result<Vec<Action>, String> {
    pipeline.check()?;
    if stage >= pipeline.stages {
        return Err(format!(
            "stage {stage} of a pipeline of {} stages",
            pipeline.stages
        ));
    }
    let mut b = Builder {
        p: pipeline,
        stage,
        actions: Vec::new(),
        received_activations: BTreeMap::new(),
        received_gradients: BTreeMap::new(),
    };
    if pipeline.virtual_stages == 1 {
        one_f_one_b(&mut b, forward_only);
    } else {
        interleaved(&mut b, forward_only);
    }
    Ok(b.actions)
}

/// 1F1B without model chunks.
fn one_f_one_b(b: &mut Builder, forward_only: bool) {
    let (p, s, m) = (b.p.stages, b.stage, b.p.micro_batches);
    let warmup = if forward_only { m } else { (p - s - 1).min(m) };
    let steady = m - warmup;
    let fwd = |micro| Action::Forward { chunk: 0, micro };
    let bwd = |micro| Action::Backward { chunk: 0, micro };
    for i in 0..warmup {
        b.exchange(None, None, Some(0), None);
        b.compute(fwd(i));
        b.exchange(Some((0, i)), None, None, None);
    }
    if steady > 0 {
        b.exchange(None, None, Some(0), None);
    }
    for i in 0..steady {
        let f = warmup + i;
        b.compute(fwd(f));
        b.exchange(Some((0, f)), None, None, Some(0));
        b.compute(bwd(i));
        let last = i + 1 == steady;
        b.exchange(None, Some((0, i)), (!last).then_some(0), None);
    }
    if forward_only {
        return;
    }
    for i in steady..m {
        b.exchange(None, None, None, Some(0));
        b.compute(bwd(i));
        b.exchange(None, Some((0, i)), None, None);
    }
}

/// The interleaved 1F1B: the forwards of virtual micro-batch `k` (`m·v` of them) go through
/// the chunks in groups of `p` micro-batches, the backwards through the chunks in reverse.
/// Its three phases: the warm-up's forwards, the steady state's forward-backward pairs, the
/// cool-down's backwards.
fn interleaved(b: &mut Builder, forward_only: bool) {
    let run = Interleaving::of(b.p, b.stage, forward_only);
    // The first forward's input.
    b.exchange(None, None, Some(0), None);
    run.warmup(b);
    run.steady(b);
    if !forward_only {
        run.cooldown(b);
    }
}

/// One stage's interleaved 1F1B: what its phases share (the counts of virtual micro-batches,
/// where the stage sits) and how a virtual micro-batch maps to a chunk and a micro-batch.
struct Interleaving {
    stages: usize,
    /// Model chunks per stage.
    v: usize,
    /// Virtual micro-batches: every micro-batch once through every chunk (`m·v`).
    total: usize,
    /// Virtual micro-batches of one round through the chunks (`p` micro-batches each).
    group: usize,
    first: bool,
    last: bool,
    /// Every forward runs before the first backward: there is nothing to overlap (one group
    /// of micro-batches) or nothing to go backwards (forward only).
    all_warmup: bool,
    /// Forwards before the first backward.
    warmup: usize,
    /// Forward-backward pairs after them.
    steady: usize,
}

impl Interleaving {
    fn of(p: &Pipeline, stage: usize, forward_only: bool) -> Interleaving {
        let (stages, v, m) = (p.stages, p.virtual_stages, p.micro_batches);
        let total = m * v;
        let all_warmup = forward_only || m == stages;
        let warmup = if all_warmup {
            total
        } else {
            ((stages - stage - 1) * 2 + (v - 1) * stages).min(total)
        };
        Interleaving {
            stages,
            v,
            total,
            group: stages * v,
            first: stage == 0,
            last: stage == stages - 1,
            all_warmup,
            warmup,
            steady: total - warmup,
        }
    }

    /// The chunk of virtual micro-batch `k`, going `forward` or backward. `k` may run below 0
    /// (`k - (p - 1)` early on): taken modulo the group as Megatron does.
    fn chunk_of(&self, k: i64, forward: bool) -> usize {
        let c = k.rem_euclid(self.group as i64) as usize / self.stages;
        if forward {
            c
        } else {
            self.v - 1 - c
        }
    }

    /// The micro-batch of virtual micro-batch `k`.
    fn micro_of(&self, k: usize) -> usize {
        (k / self.group) * self.stages + k % self.stages
    }

    /// The warm-up: forwards, each sending its output and receiving the next forward's input
    /// (and, after the last, the first backward's gradient).
    fn warmup(&self, b: &mut Builder) {
        let (v, total, warmup) = (self.v, self.total, self.warmup);
        for k in 0..warmup {
            let (c, micro) = (self.chunk_of(k as i64, true), self.micro_of(k));
            b.compute(Action::Forward { chunk: c, micro });
            let next = self.chunk_of(k as i64 + 1, true);
            let recv_forward = !(self.first && next == 0) && k + 1 != total;
            let recv_backward = k + 1 == warmup && !self.all_warmup && !self.last;
            b.exchange(
                Some((c, micro)),
                None,
                recv_forward.then_some(next),
                recv_backward.then_some(v - 1),
            );
        }
    }

    /// The steady state: one forward and one backward, then one batch sending both results
    /// and receiving the next pair's inputs.
    fn steady(&self, b: &mut Builder) {
        let (v, steady) = (self.v, self.steady);
        for j in 0..steady {
            let fk = self.warmup + j;
            let (fc, fm) = (self.chunk_of(fk as i64, true), self.micro_of(fk));
            b.compute(Action::Forward {
                chunk: fc,
                micro: fm,
            });
            let (bc, bm) = (self.chunk_of(j as i64, false), self.micro_of(j));
            b.compute(Action::Backward {
                chunk: bc,
                micro: bm,
            });
            // The first stage runs p - 1 virtual micro-batches ahead of the last: what it
            // receives now is the last stage's output of that earlier micro-batch's chunk,
            // the input of the chunk after it.
            let ahead = self.stages as i64 - 1;
            let recv_forward = if self.first {
                let c = self.chunk_of(fk as i64 - ahead, true);
                (c != v - 1).then_some(c + 1)
            } else {
                Some(self.chunk_of(fk as i64 + 1, true))
            };
            let recv_backward = if self.last {
                let c = self.chunk_of(j as i64 - ahead, false);
                (c != 0).then(|| c - 1)
            } else {
                Some(self.chunk_of(j as i64 + 1, false))
            };
            let recv_forward = recv_forward.filter(|_| j + 1 != steady);
            b.exchange(Some((fc, fm)), Some((bc, bm)), recv_forward, recv_backward);
        }
    }

    /// The cool-down: the backwards left, each sending its gradient and receiving the next
    /// one's (after an all-forward warm-up, first the last chunk's gradient).
    fn cooldown(&self, b: &mut Builder) {
        let (v, total) = (self.v, self.total);
        if self.all_warmup {
            b.exchange(None, None, None, Some(v - 1));
        }
        for k in self.steady..total {
            let (c, micro) = (self.chunk_of(k as i64, false), self.micro_of(k));
            b.compute(Action::Backward { chunk: c, micro });
            let next = self.chunk_of(k as i64 + 1, false);
            let recv_backward = !(self.last && next == v - 1) && k + 1 != total;
            b.exchange(None, Some((c, micro)), None, recv_backward.then_some(next));
        }
    }
}

/// How long a stage takes for one chunk of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkTimes {
    pub forward: f64,
    pub backward: f64,
}

/// What [`simulate`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// When the last stage finished.
    pub end: f64,
    /// When each stage finished.
    pub stage_end: Vec<f64>,
    /// Most micro-batch chunks whose forward ran and whose backward had not, per stage.
    pub peak_in_flight: Vec<usize>,
}

/// Why a schedule is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleError(pub String);

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A transfer's identity at both ends: the payload, the virtual stage that produced it and
/// the micro-batch.
fn label(p: &Pipeline, stage: usize, t: &Transfer) -> (Payload, usize, usize) {
    let vs = p.virtual_stage(stage, t.chunk);
    let producer = match (t.send, t.payload) {
        (true, _) => vs,
        // a receive with no producer is refused before labels are made
        (false, Payload::Activation) => vs.wrapping_sub(1),
        (false, Payload::Gradient) => vs + 1,
    };
    (t.payload, producer, t.micro)
}

/// A transfer waited for: its ordered pair of stages `(from, to)` and its index in that
/// pair's queue.
type PairSlot = ((usize, usize), usize);
/// A transfer posted on a pair's queue: its label (payload, chunk, micro-batch) and the time
/// it was posted.
type PostedTransfer = ((Payload, usize, usize), f64);

/// Runs every stage's `programs[s]` of `pipeline` together: a compute action takes its time
/// on its stage, a batch of transfers completes once every peer has posted the matching
/// transfer (the n-th send from A to B meets B's n-th receive from A), and no transfer takes
/// time. Fails on the first inconsistency (see the module docs).
pub fn simulate(
    pipeline: &Pipeline,
    programs: &[Vec<Action>],
    times: &[ChunkTimes],
    forward_only: bool,
) -> Result<Timeline, ScheduleError> {
    let n = pipeline.stages;
    if programs.len() != n || times.len() != n {
        return Err(ScheduleError(format!(
            "{} programs for {n} stages",
            programs.len()
        )));
    }
    let mut sim = Simulation {
        p: pipeline,
        programs,
        times,
        stages: vec![StageRun::default(); n],
        sends: BTreeMap::new(),
        recvs: BTreeMap::new(),
    };
    sim.run_until_done()?;
    sim.check_every_transfer_received()?;
    sim.check_every_chunk_ran(forward_only)?;
    Ok(sim.timeline())
}

/// One stage's progress through its program in [`simulate`].
#[derive(Clone, Debug, Default)]
struct StageRun {
    /// The index of its next action.
    pc: usize,
    /// When its last action ended.
    clock: f64,
    /// The transfers of the batch it waits in, as (pair queue, index).
    posted: Option<Vec<PairSlot>>,
    /// The (chunk, micro-batch) pairs whose forward ran.
    forwarded: BTreeSet<(usize, usize)>,
    /// The (chunk, micro-batch) pairs whose backward ran.
    backwarded: BTreeSet<(usize, usize)>,
    /// What it received: (payload, chunk, micro-batch).
    arrived: BTreeSet<(Payload, usize, usize)>,
    in_flight: usize,
    peak_in_flight: usize,
}

/// Every stage's [`StageRun`] and the transfers posted between them.
struct Simulation<'a> {
    p: &'a Pipeline,
    programs: &'a [Vec<Action>],
    times: &'a [ChunkTimes],
    stages: Vec<StageRun>,
    /// Per ordered pair of stages (from, to): the sends posted, with labels and times.
    sends: BTreeMap<(usize, usize), Vec<PostedTransfer>>,
    /// The same for the receives.
    recvs: BTreeMap<(usize, usize), Vec<PostedTransfer>>,
}

impl Simulation<'_> {
    /// Lets each stage in turn run as far as it can, round after round, until every program
    /// ends; a round in which no stage moves is a deadlock.
    fn run_until_done(&mut self) -> Result<(), ScheduleError> {
        loop {
            let mut progressed = false;
            for s in 0..self.p.stages {
                progressed |= self.advance(s)?;
            }
            if self.stages_waiting().next().is_none() {
                return Ok(());
            }
            if !progressed {
                let waiting: Vec<String> = self
                    .stages_waiting()
                    .map(|s| format!("stage {s} at {:?}", self.programs[s][self.stages[s].pc]))
                    .collect();
                return Err(ScheduleError(format!("deadlock: {}", waiting.join("; "))));
            }
        }
    }

    /// The stages whose program has not ended.
    fn stages_waiting(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.p.stages).filter(|&s| self.stages[s].pc < self.programs[s].len())
    }

    /// Runs stage `s`'s actions until its program ends or it waits in a batch a peer has not
    /// posted its part of; whether it did anything (posting a batch counts).
    fn advance(&mut self, s: usize) -> Result<bool, ScheduleError> {
        let programs = self.programs;
        let mut progressed = false;
        while let Some(action) = programs[s].get(self.stages[s].pc) {
            match action {
                Action::Forward { chunk, micro } | Action::Backward { chunk, micro } => {
                    self.compute(s, action, (*chunk, *micro))?;
                }
                Action::Exchange(batch) => {
                    if self.stages[s].posted.is_none() {
                        self.post(s, batch)?;
                        progressed = true;
                    }
                    if !self.complete(s, batch)? {
                        return Ok(progressed);
                    }
                }
            }
            self.stages[s].pc += 1;
            progressed = true;
        }
        Ok(progressed)
    }

    /// Stage `s` runs the forward or backward `action` of `key` (chunk, micro-batch), once,
    /// after what it needs.
    fn compute(
        &mut self,
        s: usize,
        action: &Action,
        key: (usize, usize),
    ) -> Result<(), ScheduleError> {
        let p = self.p;
        let fail = |why: &str| Err(ScheduleError(format!("stage {s}: {action:?} {why}")));
        let (chunk, micro) = key;
        if chunk >= p.virtual_stages || micro >= p.micro_batches {
            return fail("is outside the pipeline");
        }
        let run = &mut self.stages[s];
        if matches!(action, Action::Forward { .. }) {
            if prev_of(p, s, chunk).is_some()
                && !run.arrived.contains(&(Payload::Activation, chunk, micro))
            {
                return fail("before its input arrived");
            }
            if !run.forwarded.insert(key) {
                return fail("runs twice");
            }
            run.in_flight += 1;
            run.peak_in_flight = run.peak_in_flight.max(run.in_flight);
            run.clock += self.times[s].forward;
        } else {
            if !run.forwarded.contains(&key) {
                return fail("before its forward");
            }
            if next_of(p, s, chunk).is_some()
                && !run.arrived.contains(&(Payload::Gradient, chunk, micro))
            {
                return fail("before its output's gradient arrived");
            }
            if !run.backwarded.insert(key) {
                return fail("runs twice");
            }
            run.in_flight -= 1;
            run.clock += self.times[s].backward;
        }
        Ok(())
    }

    /// Stage `s` posts each transfer of `batch` on its pair's queue, after checking that it
    /// has a peer that produces (a receive) or has computed (a send) it.
    fn post(&mut self, s: usize, batch: &[Transfer]) -> Result<(), ScheduleError> {
        let (p, n) = (self.p, self.p.stages);
        let fail = |why: String| Err(ScheduleError(format!("stage {s}: {why}")));
        let run = &self.stages[s];
        let mut mine = Vec::new();
        for t in batch {
            if t.peer >= n || t.peer == s {
                return fail(format!("a transfer with stage {}", t.peer));
            }
            let producer = match t.payload {
                Payload::Activation => prev_of(p, s, t.chunk),
                Payload::Gradient => next_of(p, s, t.chunk),
            };
            if !t.send && producer.map(|(stage, _)| stage) != Some(t.peer) {
                return fail(format!(
                    "receives {t:?}, which stage {} does not produce",
                    t.peer
                ));
            }
            if t.send {
                let done = match t.payload {
                    Payload::Activation => &run.forwarded,
                    Payload::Gradient => &run.backwarded,
                };
                if !done.contains(&(t.chunk, t.micro)) {
                    return fail(format!("sends {t:?} before computing it"));
                }
            }
            let pair = if t.send { (s, t.peer) } else { (t.peer, s) };
            let queues = if t.send {
                &mut self.sends
            } else {
                &mut self.recvs
            };
            let queue = queues.entry(pair).or_default();
            queue.push((label(p, s, t), run.clock));
            mine.push((pair, queue.len() - 1));
        }
        self.stages[s].posted = Some(mine);
        Ok(())
    }

    /// Completes stage `s`'s posted `batch` if every peer has posted its side: the received
    /// tensors arrive and the stage's clock moves to the latest post of the batch. `false`
    /// while a side is missing; an error where the two sides of a transfer differ.
    fn complete(&mut self, s: usize, batch: &[Transfer]) -> Result<bool, ScheduleError> {
        let run = &self.stages[s];
        let mine = run.posted.as_deref().unwrap_or_default();
        let mut end = run.clock;
        for (t, &(pair, i)) in batch.iter().zip(mine) {
            let (own, other) = if t.send {
                (&self.sends, &self.recvs)
            } else {
                (&self.recvs, &self.sends)
            };
            let Some(&(theirs, at)) = other.get(&pair).and_then(|l| l.get(i)) else {
                return Ok(false);
            };
            let (ours, _) = own[&pair][i];
            if theirs != ours {
                return Err(ScheduleError(format!(
                    "transfer #{i} from stage {} to stage {}: {:?} sent, {:?} received",
                    pair.0,
                    pair.1,
                    if t.send { ours } else { theirs },
                    if t.send { theirs } else { ours },
                )));
            }
            end = end.max(at);
        }
        let run = &mut self.stages[s];
        for t in batch.iter().filter(|t| !t.send) {
            run.arrived.insert((t.payload, t.chunk, t.micro));
        }
        run.clock = end;
        run.posted = None;
        Ok(true)
    }

    /// Every send met its receive once all programs ended.
    fn check_every_transfer_received(&self) -> Result<(), ScheduleError> {
        for (pair, list) in &self.sends {
            if self.recvs.get(pair).map_or(0, Vec::len) != list.len() {
                return Err(ScheduleError(format!(
                    "stage {} sends to stage {} what is never received",
                    pair.0, pair.1
                )));
            }
        }
        Ok(())
    }

    /// Every stage ran every chunk of every micro-batch forward (and backward, in training).
    fn check_every_chunk_ran(&self, forward_only: bool) -> Result<(), ScheduleError> {
        let want = self.p.virtual_stages * self.p.micro_batches;
        for (s, run) in self.stages.iter().enumerate() {
            if run.forwarded.len() != want || (!forward_only && run.backwarded.len() != want) {
                return Err(ScheduleError(format!(
                    "stage {s} does not run every chunk of every micro-batch"
                )));
            }
        }
        Ok(())
    }

    fn timeline(self) -> Timeline {
        let stage_end: Vec<f64> = self.stages.iter().map(|r| r.clock).collect();
        Timeline {
            end: stage_end.iter().copied().fold(0.0, f64::max),
            peak_in_flight: self.stages.iter().map(|r| r.peak_in_flight).collect(),
            stage_end,
        }
    }
}

/// The share of a step the pipeline stands idle, as the planner estimates it: with `p`
/// stages, `v` chunks per stage and `m` micro-batches, `(p - 1) / (v·m + p - 1)` (the
/// interleaved schedule's fill and drain take `(p - 1)/v` micro-batch times; plain 1F1B's
/// `p - 1`), the simulated schedule's own figure with equal stages ([`simulate`] checks it).
pub fn bubble_fraction(stages: u64, virtual_stages: u64, micro_batches: u64) -> f64 {
    let idle = stages.saturating_sub(1) as f64;
    idle / (virtual_stages.max(1) as f64 * micro_batches as f64 + idle)
}

/// Most micro-batch chunks in flight (forward run, backward not yet) on `stage`: their
/// activations are alive at once.
pub fn peak_in_flight(pipeline: &Pipeline, stage: usize) -> Result<usize, String> {
    let actions = program(pipeline, stage, false)?;
    let (mut now, mut peak) = (0usize, 0usize);
    for a in &actions {
        match a {
            Action::Forward { .. } => {
                now += 1;
                peak = peak.max(now);
            }
            Action::Backward { .. } => now = now.saturating_sub(1),
            Action::Exchange(_) => {}
        }
    }
    Ok(peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programs(p: &Pipeline, forward_only: bool) -> Vec<Vec<Action>> {
        (0..p.stages)
            .map(|s| program(p, s, forward_only).unwrap())
            .collect()
    }

    fn run(p: &Pipeline, forward_only: bool) -> Timeline {
        let times = vec![
            ChunkTimes {
                forward: 1.0 / p.virtual_stages as f64,
                backward: 2.0 / p.virtual_stages as f64,
            };
            p.stages
        ];
        simulate(p, &programs(p, forward_only), &times, forward_only)
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
    }

    /// Every pipeline up to 8 stages, 4 chunks and 24 micro-batches runs to the end: no
    /// stage waits forever, every transfer meets its own, every chunk of every micro-batch
    /// runs forward and backward once, after its inputs.
    #[test]
    fn every_small_pipeline_runs_through() {
        for stages in 1..=8 {
            for v in 1..=4 {
                for m in 1..=24 {
                    let p = Pipeline {
                        stages,
                        virtual_stages: v,
                        micro_batches: m,
                    };
                    if p.check().is_err() {
                        continue;
                    }
                    run(&p, false);
                    run(&p, true);
                }
            }
        }
    }

    /// With equal stages (a forward 1, a backward 2 per micro-batch and stage) a step takes
    /// `(m + (p - 1)/v)·3`: the bubble the planner estimates.
    #[test]
    fn the_step_takes_the_planners_bubble() {
        for (stages, v, m) in [
            (2, 1, 1),
            (2, 1, 8),
            (4, 1, 4),
            (4, 1, 16),
            (8, 1, 3),
            (4, 2, 8),
            (4, 4, 4),
            (2, 2, 4),
            (3, 3, 9),
            (8, 2, 16),
        ] {
            let p = Pipeline {
                stages,
                virtual_stages: v,
                micro_batches: m,
            };
            let t = run(&p, false);
            let ideal = 3.0 * m as f64;
            let bubble = (t.end - ideal) / t.end;
            let want = bubble_fraction(stages as u64, v as u64, m as u64);
            assert!(
                (bubble - want).abs() < 1e-9,
                "{p:?}: simulated bubble {bubble}, planned {want}"
            );
        }
    }

    #[test]
    fn one_f_one_b_keeps_at_most_the_stages_ahead_in_flight() {
        let p = Pipeline {
            stages: 4,
            virtual_stages: 1,
            micro_batches: 8,
        };
        let peaks: Vec<usize> = (0..4).map(|s| peak_in_flight(&p, s).unwrap()).collect();
        assert_eq!(peaks, vec![4, 3, 2, 1]);
        assert_eq!(run(&p, false).peak_in_flight, peaks);
    }

    #[test]
    fn bad_pipelines_say_why() {
        let p = Pipeline {
            stages: 4,
            virtual_stages: 2,
            micro_batches: 6,
        };
        assert!(p
            .check()
            .unwrap_err()
            .contains("multiple of the pipeline stages (4)"));
        let p = Pipeline {
            stages: 1,
            virtual_stages: 2,
            micro_batches: 6,
        };
        assert!(p
            .check()
            .unwrap_err()
            .contains("more than one pipeline stage"));
    }

    /// A schedule that sends in another order than its peer receives is caught.
    #[test]
    fn the_simulator_catches_a_wrong_schedule() {
        let p = Pipeline {
            stages: 2,
            virtual_stages: 1,
            micro_batches: 2,
        };
        let mut progs = programs(&p, false);
        // stage 1 drains its backwards without waiting for the second input
        progs[1].retain(
            |a| !matches!(a, Action::Exchange(b) if b.iter().any(|t| !t.send && t.micro == 1)),
        );
        let times = vec![
            ChunkTimes {
                forward: 1.0,
                backward: 2.0
            };
            2
        ];
        let e = simulate(&p, &progs, &times, false).unwrap_err();
        assert!(e.0.contains("before its input arrived"), "{e}");
        // two stages that both wait to receive first
        let recv = |peer, payload| {
            Action::Exchange(vec![Transfer {
                send: false,
                payload,
                peer,
                chunk: 0,
                micro: 0,
            }])
        };
        let progs = [
            vec![recv(1, Payload::Gradient)],
            vec![recv(0, Payload::Activation)],
        ];
        let e = simulate(&p, &progs, &times, true).unwrap_err();
        assert!(e.0.starts_with("deadlock"), "{e}");
    }
}
