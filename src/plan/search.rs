//! `fmoec plan --auto`: try every tensor size (up to one host), pipeline size,
//! expert-group size and micro-batch for the file's world, keep the plans that work,
//! rank them by estimated step time, and say why the others were rejected.
//!
//! Costs each candidate with [`super::cost_for`]; knows no formulas of its own.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::cost::TimeEstimate;
use super::grid::divisors;
use super::{
    build_for, cost_for, diagnostics, expert_group_name, limits, Costed, Overrides, ParallelPlan,
    TargetRules,
};
use crate::check::{Checked, ExpertGroup};
use crate::diag::Diagnostic;

/// A candidate that failed, with the first reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    pub overrides: Overrides,
    pub code: String,
    pub message: String,
}

/// A configuration that works.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Every choice made, the micro-batch included: `build_for(checked, &overrides, &rules)`
    /// gives the full plan.
    pub overrides: Overrides,
    /// The training the plans are for (`--megatron`).
    pub rules: TargetRules,
    pub tensor: u64,
    pub pipeline: u64,
    /// Model chunks per stage (the file's where its pipeline allows them, else 1).
    pub virtual_stages: u64,
    pub data: u64,
    pub expert_group: String,
    pub expert_group_size: u64,
    pub micro_batch: u64,
    /// The largest memory of any rank.
    pub max_memory_bytes: u64,
    pub time: TimeEstimate,
}

impl Candidate {
    /// The full plan of this candidate.
    pub fn plan(&self, checked: &Checked) -> Option<ParallelPlan> {
        build_for(checked, &self.overrides, &self.rules).ok()
    }
}

/// The outcome of a search.
#[derive(Clone, Debug)]
pub struct SearchResult {
    /// Feasible configurations, most tokens/s first (ties: smaller tensor, then pipeline, then
    /// larger expert group).
    pub feasible: Vec<Candidate>,
    pub rejected: Vec<Rejected>,
    /// Why the file's `virtual_stages` were not planned, when they were not for every
    /// candidate (the target has no interleaved schedule).
    pub note: Option<String>,
}

/// Searches tensor ∈ divisors(world) up to `gpus_per_node`, pipeline ∈ divisors of the
/// rest, expert group ∈ {across data, every proper divisor of data, replicated} and
/// every micro-batch the planner tries. `world` overrides the file's GPU count. The file's
/// `virtual_stages` are kept where a pipeline can take them (its stages' layers split into
/// that many chunks and a multiple of the stages in micro-batches), else 1.
pub fn search(checked: &Checked, world: Option<u64>) -> SearchResult {
    let assumed = Overrides {
        world,
        ..Overrides::NONE
    };
    search_for(checked, &assumed, &TargetRules::default())
}

/// [`search`] for the training `rules` describe (`fmoec plan --auto --megatron VERSION`),
/// under the overrides that are assumptions rather than layout choices: `assumed`'s world,
/// memory model and routing skew hold for every candidate. Its layout fields (tensor,
/// pipeline, expert group, micro-batch, virtual stages) are what the search chooses, so
/// they are not read.
pub fn search_for(checked: &Checked, assumed: &Overrides, rules: &TargetRules) -> SearchResult {
    let w = assumed.world.unwrap_or(checked.parallel.gpus).max(1);
    // The search chooses the micro-batch itself, whatever the file says.
    let mut free = checked.clone();
    free.parallel.micro_batch = None;
    let checked = &free;
    // A target without the interleaved schedule is planned with one chunk per stage.
    let asked = checked.parallel.virtual_stages;
    let plain_only = asked > 1 && !rules.interleaved_schedule;
    let note = plain_only.then(|| {
        format!(
            "Megatron-LM {} has no interleaved pipeline schedule: the file's virtual_stages = {asked} is not planned (one model chunk per stage)",
            rules.version
        )
    });
    let mut feasible = Vec::new();
    let mut rejected = Vec::new();
    for layout in layouts(checked, w) {
        let o = Overrides {
            world: Some(w),
            tensor: Some(layout.tensor),
            pipeline: Some(layout.pipeline),
            expert_group: Some(layout.expert_group),
            micro_batch: None,
            virtual_stages: plain_only.then_some(1),
            memory_model: assumed.memory_model,
            routing_skew: assumed.routing_skew,
        };
        let interleaving = layout.pipeline > 1 && asked > 1 && !plain_only;
        match cost_layout(checked, o, rules, interleaving) {
            (o, Ok(c)) => feasible.push(Candidate::of(&layout, o, rules, &c)),
            (o, Err(diags)) => rejected.push(Rejected::of(o, diags)),
        }
    }
    sort_fastest_first(&mut feasible);
    SearchResult {
        feasible,
        rejected,
        note,
    }
}

impl Candidate {
    /// `layout` costed as `c` under the overrides `o`, for `rules`.
    fn of(layout: &SearchedLayout, o: Overrides, rules: &TargetRules, c: &Costed) -> Candidate {
        Candidate {
            overrides: Overrides {
                micro_batch: Some(c.costed.micro_batch),
                ..o
            },
            rules: rules.clone(),
            tensor: layout.tensor,
            pipeline: layout.pipeline,
            virtual_stages: c.grid.virtual_stages,
            data: layout.data,
            expert_group: expert_group_name(layout.expert_group),
            expert_group_size: c.experts.parallel,
            micro_batch: c.costed.micro_batch,
            max_memory_bytes: c.max_memory(),
            time: c.costed.time,
        }
    }
}

impl Rejected {
    /// The overrides `o` refused with `diags`: the first says why.
    fn of(o: Overrides, diags: Vec<Diagnostic>) -> Rejected {
        let first = diags.into_iter().next();
        Rejected {
            overrides: o,
            code: first.as_ref().map_or(String::new(), |d| d.code.clone()),
            message: first.map_or(String::new(), |d| d.message),
        }
    }
}

/// Most tokens/s first; ties: smaller tensor, then pipeline, then larger expert group.
fn sort_fastest_first(feasible: &mut [Candidate]) {
    feasible.sort_by(|a, b| {
        b.time
            .tokens_per_s
            .total_cmp(&a.time.tokens_per_s)
            .then(a.tensor.cmp(&b.tensor))
            .then(a.pipeline.cmp(&b.pipeline))
            .then(b.expert_group_size.cmp(&a.expert_group_size))
    });
}

/// One layout the search tries.
struct SearchedLayout {
    tensor: u64,
    pipeline: u64,
    data: u64,
    expert_group: ExpertGroup,
}

/// Every layout of world `w` the search tries, in the order it tries them: tensor sizes up to
/// one host, pipeline sizes dividing the rest, and (for a model with MoE layers) the expert
/// group across the data ranks, every proper divisor of the data size, and replicated.
fn layouts(checked: &Checked, w: u64) -> Vec<SearchedLayout> {
    let gpn = checked.parallel.hardware.gpus_per_node.max(1);
    let has_moe = checked.model.moe_layers().next().is_some();
    // Every layout of a world past the planner's limit is refused (P0012): cost one for the
    // diagnostic rather than enumerate the divisors of a number up to 2^64.
    let sizes_dividing = |n: u64| {
        if w > limits::GPUS {
            vec![1]
        } else {
            divisors(n)
        }
    };
    let mut out = Vec::new();
    for t in sizes_dividing(w).into_iter().filter(|t| *t <= gpn) {
        for p in sizes_dividing(w / t) {
            let d = w / (t * p);
            let mut groups = vec![ExpertGroup::AcrossData];
            if has_moe {
                groups.extend(
                    sizes_dividing(d)
                        .into_iter()
                        .filter(|g| *g > 1 && *g < d)
                        .map(|size| ExpertGroup::Size { size }),
                );
                if d > 1 {
                    groups.push(ExpertGroup::Replicated);
                }
            }
            out.extend(groups.into_iter().map(|expert_group| SearchedLayout {
                tensor: t,
                pipeline: p,
                data: d,
                expert_group,
            }));
        }
    }
    out
}

/// Costs one layout under `o`; where it would interleave (`interleaving`) and the schedule
/// cannot run the file's model chunks, plainly with one chunk per stage instead. The
/// overrides it was costed under, and the outcome.
fn cost_layout(
    checked: &Checked,
    o: Overrides,
    rules: &TargetRules,
    interleaving: bool,
) -> (Overrides, Result<Costed, Vec<Diagnostic>>) {
    let costed = cost_for(checked, &o, rules);
    let unschedulable = |d: &[Diagnostic]| {
        d.iter().any(|d| {
            d.code == diagnostics::CHUNKS_NOT_DIVISIBLE
                || d.code == diagnostics::INTERLEAVED_MICRO_BATCHES
        })
    };
    match &costed {
        Err(d) if interleaving && unschedulable(d) => {
            let plain = Overrides {
                virtual_stages: Some(1),
                ..o
            };
            let costed = cost_for(checked, &plain, rules);
            (plain, costed)
        }
        _ => (o, costed),
    }
}

/// The report: the best `top` plans and the rejections grouped by reason.
pub fn report(r: &SearchResult, top: usize) -> String {
    let mut o = String::new();
    let tried = r.feasible.len() + r.rejected.len();
    let _ = writeln!(
        o,
        "searched {}: {} feasible, {} rejected",
        crate::diag::count(tried as u64, "configuration", "configurations"),
        r.feasible.len(),
        r.rejected.len()
    );
    if let Some(note) = &r.note {
        let _ = writeln!(o, "note: {note}");
    }
    if !r.feasible.is_empty() {
        report_feasible(&mut o, r, top);
    }
    if !r.rejected.is_empty() {
        report_rejected(&mut o, r);
    }
    o
}

/// The table of the `top` best plans.
fn report_feasible(o: &mut String, r: &SearchResult, top: usize) {
    let _ = writeln!(o, "\nbest plans by estimated throughput");
    let _ = writeln!(
        o,
        "  #  tensor  pipeline  data    expert group  micro-batch  max memory       step     tokens/s    MFU"
    );
    for (i, p) in r.feasible.iter().take(top).enumerate() {
        let mem = p.max_memory_bytes;
        // `4 (x2)`: 4 stages of 2 model chunks each (the interleaved schedule)
        let pipeline = if p.virtual_stages > 1 {
            format!("{} (x{})", p.pipeline, p.virtual_stages)
        } else {
            p.pipeline.to_string()
        };
        let _ = writeln!(
            o,
            "  {:>1}  {:>6}  {:>8}  {:>4}  {:>14}  {:>11}  {:>10}  {:>8.3}s  {:>11}  {:>5.1}%",
            i + 1,
            p.tensor,
            pipeline,
            p.data,
            format!("{} ({})", p.expert_group, p.expert_group_size),
            p.micro_batch,
            super::render::bytes(mem),
            p.time.step_s,
            super::render::count(p.time.tokens_per_s.round() as u64),
            100.0 * p.time.mfu
        );
    }
}

/// The rejected configurations, one line a reason (its code) with one example.
fn report_rejected(o: &mut String, r: &SearchResult) {
    let _ = writeln!(o, "\nrejected");
    let mut by_code: BTreeMap<&str, Vec<&Rejected>> = BTreeMap::new();
    for x in &r.rejected {
        by_code.entry(x.code.as_str()).or_default().push(x);
    }
    for (code, xs) in by_code {
        let first = xs[0];
        let _ = writeln!(
            o,
            "  {code}: {} configuration{}, e.g. tensor {} pipeline {} expert group {}: {}",
            xs.len(),
            if xs.len() == 1 { "" } else { "s" },
            first.overrides.tensor.unwrap_or(0),
            first.overrides.pipeline.unwrap_or(0),
            first
                .overrides
                .expert_group
                .map_or("-".into(), expert_group_name),
            first.message
        );
    }
}
