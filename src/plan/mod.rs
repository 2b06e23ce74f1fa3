//! `plan`: the [`ParallelPlan`], computed from the checked model, its [`ModelGraph`] and
//! the `parallel` block (plus the `train` block for batch and precision).
//!
//! Owns the rank grid and process groups (Megatron-LM v2.2 layout, [`grid`]), the expert
//! placement (FastMoE on Megatron), per-rank parameters and memory, per-step traffic and
//! FLOPs, the time estimate ([`cost`]), the planner's diagnostics ([`diagnostics`]) and
//! the search behind `--auto` ([`search`]). It reads only `check::Checked` and the
//! graph; it knows nothing about source text (only spans), tensors, NCCL or templates.
//! The formulas are written out in README.md ("`fmoec plan`").
//!
//! # For the runtime and the emitter
//! - [`build`] / [`build_with`] give a [`ParallelPlan`] or every planner diagnostic.
//! - `plan.ranks[r]`: coordinates (`tensor_rank`, `pipeline_rank`, `data_rank`,
//!   `expert_rank`) and the experts rank `r` holds per MoE layer ([`HeldExperts`]:
//!   global ids and the `[start, end)` slice of each expert's hidden dimension).
//! - `plan.groups` ([`Groups`]): every process group kind as rank lists, in Megatron's
//!   creation order; [`Groups::containing`] finds a rank's group of a [`GroupKind`].
//! - `plan.stages[s].first_layer..end_layer`: the blocks of pipeline stage `s` (with
//!   virtual stages, `plan.stages[s].chunks`: those of each of its model chunks).
//! - [`Grid::coords`] / [`Grid::rank`] convert between ranks and coordinates without
//!   listing groups.

pub mod cli;
pub mod cost;
pub mod diagnostics;
pub mod fastermoe;
pub mod grid;
pub mod render;
pub mod schedule;
pub mod search;

use serde::Serialize;

use crate::check::{
    Checked, ExpertGroup, Ffn, Hardware, Model, Parallel, Precision, Shadowing, SmartSchedule,
    Train,
};
use crate::diag::Diagnostic;
use crate::diag::Span;
use crate::graph::{self, ModelGraph};

pub use cost::{ExpertPlacement, LayerExchange, Memory, MemoryModel, StageCost, TimeEstimate};
pub use grid::{Coords, ExpertGrid, Grid, GroupKind, Groups, Layout};

/// What the Megatron-LM generation a plan is made for decides, read from its target
/// declaration's capabilities (`stdlib/megatron.fmoe`), never from its name: `fmoec plan
/// --megatron VERSION` and `fmoec emit --megatron VERSION` plan with them. The [`Default`] is
/// FastMoE on Megatron-LM v2.2 (what `fmoec plan` describes without `--megatron`).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetRules {
    /// The target's version as the command line names it (`core_v0.19`); empty by default.
    pub version: String,
    /// Megatron-Core's rank layout where the target has `native_expert_parallel`.
    pub layout: Layout,
    /// The vocabulary is padded to a multiple of this times the tensor size: 1 where the target
    /// takes the file's vocabulary (`pinned_vocab`), else the tokenizer padding of Megatron-LM.
    pub vocab_multiple: u64,
    /// The target's distributed optimizer (`distributed_optimizer`) shards the optimizer state.
    pub distributed_optimizer: bool,
    /// The target can slice experts that have biases over the tensor ranks
    /// (`sliced_expert_bias`); else it spreads them whole over expert × tensor ranks.
    pub sliced_expert_bias: bool,
    /// The target runs the interleaved pipeline schedule (`virtual_stages`); `fmoec run`
    /// does, and `--auto` plans a target without it with one model chunk per stage.
    pub interleaved_schedule: bool,
    /// The training runs FasterMoE's `smart_schedule` and `shadowing` (`fmoec run` does; no
    /// Megatron-LM target does, W0810): elsewhere the plan costs plain expert parallelism.
    pub fastermoe: bool,
}

impl Default for TargetRules {
    fn default() -> TargetRules {
        TargetRules {
            version: String::new(),
            layout: Layout::Fastmoe,
            vocab_multiple: cost::VOCAB_PAD,
            distributed_optimizer: false,
            sliced_expert_bias: true,
            interleaved_schedule: true,
            fastermoe: true,
        }
    }
}

impl TargetRules {
    /// The rules of one declared target.
    pub fn of(target: &crate::check::MegatronTarget) -> TargetRules {
        TargetRules {
            version: target.version.clone(),
            layout: if target.can("native_expert_parallel") {
                Layout::MegatronCore
            } else {
                Layout::Fastmoe
            },
            vocab_multiple: if target.can("pinned_vocab") {
                1
            } else {
                cost::VOCAB_PAD
            },
            distributed_optimizer: target.can("distributed_optimizer"),
            sliced_expert_bias: target.can("sliced_expert_bias"),
            interleaved_schedule: target.allows("virtual_stages", "true"),
            fastermoe: false,
        }
    }

    /// `checked` as these rules train it: without FasterMoE's options where the training has
    /// none; `None` where nothing changes.
    fn trained(&self, checked: &Checked) -> Option<Checked> {
        if self.fastermoe || checked.parallel.fastermoe_options().is_empty() {
            return None;
        }
        let mut plain = checked.clone();
        plain.parallel.smart_schedule = SmartSchedule::Off;
        plain.parallel.shadowing = Shadowing::Off;
        Some(plain)
    }

    /// The memory model of a training under these rules (`--memory-model` overrides it).
    fn memory_model(&self) -> MemoryModel {
        match self.layout {
            Layout::Fastmoe => MemoryModel::Megatron,
            Layout::MegatronCore => MemoryModel::MegatronCore,
        }
    }

    /// Whether Megatron-Core holds `model`'s experts whole on expert × tensor ranks instead of
    /// slicing them over the `tensor` ranks as `par` asks: they have biases, and the target
    /// cannot slice those (`sliced_expert_bias`). The placement and the plan's
    /// `whole_experts_for_bias` both read this.
    fn whole_experts_for_bias(&self, model: &Model, par: &Parallel, tensor: u64) -> bool {
        self.layout == Layout::MegatronCore
            && par.expert_slicing
            && tensor > 1
            && model.bias
            && !self.sliced_expert_bias
    }

    fn training(&self) -> cost::TrainingRules {
        cost::TrainingRules {
            vocab_multiple: self.vocab_multiple,
            distributed_optimizer: self.distributed_optimizer,
        }
    }
}

/// What a plan for Megatron-Core holds beyond the common plan (absent from other plans' JSON).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MegatronCorePlan {
    /// `--expert-model-parallel-size`: ranks splitting each MoE layer's experts
    /// (`expert_group_size` of the plan).
    pub expert_parallel: u64,
    /// `--expert-tensor-parallel-size`: ranks slicing each expert.
    pub expert_tensor: u64,
    /// Ranks holding the same expert slices.
    pub expert_data: u64,
    /// The experts have biases and the file slices them: Megatron-Core holds them whole on
    /// `expert_parallel = group × tensor` ranks instead.
    pub whole_experts_for_bias: bool,
    /// `--padded-vocab-size`.
    pub padded_vocab: u64,
    /// `--use-distributed-optimizer` (the memory estimate shards the optimizer state).
    pub distributed_optimizer: bool,
    /// The expert-tensor groups, in Megatron-Core's creation order.
    pub expert_tensor_groups: Vec<Vec<u64>>,
}

/// What-if changes to the `parallel` block from the command line (`--world`, ...).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub world: Option<u64>,
    pub tensor: Option<u64>,
    pub pipeline: Option<u64>,
    pub expert_group: Option<ExpertGroup>,
    pub micro_batch: Option<u64>,
    /// Model chunks per pipeline stage (`--virtual-stages`).
    pub virtual_stages: Option<u64>,
    /// Whose memory to estimate (default: Megatron-LM v2.2's).
    pub memory_model: Option<MemoryModel>,
    /// The busiest expert of each MoE layer routes this many times the mean (default 1,
    /// balanced): what the time estimate and FasterMoE's shadowing assume.
    pub routing_skew: Option<f64>,
}

impl Overrides {
    /// No overrides: the file as written.
    pub const NONE: Overrides = Overrides {
        world: None,
        tensor: None,
        pipeline: None,
        expert_group: None,
        micro_batch: None,
        virtual_stages: None,
        memory_model: None,
        routing_skew: None,
    };

    /// `--tensor 2 --pipeline 4`, for notes on diagnostics: the overrides of the layout (the
    /// memory model is named by the diagnostic it changes, P0009, not here: `fmoec run` plans
    /// with its own without the user asking).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(w) = self.world {
            parts.push(format!("--world {w}"));
        }
        if let Some(t) = self.tensor {
            parts.push(format!("--tensor {t}"));
        }
        if let Some(p) = self.pipeline {
            parts.push(format!("--pipeline {p}"));
        }
        if let Some(e) = self.expert_group {
            parts.push(format!("--expert-group {}", expert_group_name(e)));
        }
        if let Some(m) = self.micro_batch {
            parts.push(format!("--micro-batch {m}"));
        }
        if let Some(v) = self.virtual_stages {
            parts.push(format!("--virtual-stages {v}"));
        }
        if let Some(s) = self.routing_skew {
            parts.push(format!("--routing-skew {s}"));
        }
        parts.join(" ")
    }
}

/// `data`, `replicated` or the size, as written on the command line.
pub fn expert_group_name(e: ExpertGroup) -> String {
    match e {
        ExpertGroup::AcrossData => "data".into(),
        ExpertGroup::Replicated => "replicated".into(),
        ExpertGroup::Size { size } => size.to_string(),
    }
}

/// One pipeline stage: its blocks and whether it holds the embedding and the head.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    pub stage: u64,
    /// Blocks `first..end` (end exclusive); with virtual stages, those of its first chunk.
    pub first_layer: u64,
    pub end_layer: u64,
    /// With virtual stages, the blocks `[first, end)` of each of its model chunks in the
    /// order it runs them (chunk `c` is virtual stage `c·pipeline + stage`); empty without.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<[u64; 2]>,
    pub embedding: bool,
    pub head: bool,
    pub cost: StageCost,
}

/// The experts one rank holds in one MoE layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldExperts {
    pub layer: usize,
    /// Global expert ids, ascending.
    pub ids: Vec<u64>,
    /// The slice `[start, end)` of each expert's hidden dimension this rank holds
    /// (all of it without expert slicing).
    pub hidden: [u64; 2],
}

/// One rank of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankPlan {
    pub rank: u64,
    /// Host index, assuming `gpus_per_node` consecutive ranks per host.
    pub node: u64,
    pub tensor_rank: u64,
    pub pipeline_rank: u64,
    pub data_rank: u64,
    pub expert_rank: u64,
    pub experts: Vec<HeldExperts>,
    pub memory_bytes: u64,
}

/// One MoE layer's placement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoeLayerPlan {
    pub layer: usize,
    pub stage: u64,
    pub experts: u64,
    pub top_k: u64,
    pub experts_per_rank: u64,
    pub expert_hidden: u64,
    /// Hidden size of each expert held by one rank (`expert_hidden / tensor` when sliced).
    pub hidden_per_rank: u64,
    /// Train capacity factor, if the gate has one.
    pub capacity: Option<f64>,
}

/// Whole-model parameter counts (the same on every plan of one model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModelParams {
    pub total: u64,
    /// Routed expert parameters, all layers.
    pub expert: u64,
    pub gate: u64,
    /// Parameters one token goes through: everything but the routed experts, plus
    /// `top_k / experts` of them.
    pub active: u64,
}

/// The complete plan. Invariants: `world == tensor * pipeline * data`; every group
/// kind partitions the ranks (embedding excepted); `ranks[i].rank == i`; `stages.len()
/// == pipeline`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParallelPlan {
    /// Version of this JSON schema; bumped on any incompatible change.
    pub schema: u32,
    pub model: String,
    pub hardware: Hardware,
    pub world: u64,
    pub tensor: u64,
    pub pipeline: u64,
    /// Model chunks per pipeline stage (the interleaved schedule; 1, left out of the JSON, is
    /// plain 1F1B).
    #[serde(skip_serializing_if = "is_one")]
    pub virtual_stages: u64,
    pub data: u64,
    /// `data`, `replicated` or a size.
    pub expert_group: String,
    pub expert_group_size: u64,
    pub expert_slicing: bool,
    pub precision: Precision,
    pub seq_len: u64,
    /// Sequences per micro-batch per data rank.
    pub micro_batch: u64,
    /// Micro-batches per step per data rank.
    pub micro_batches: u64,
    /// Sequences per step over all data ranks.
    pub global_batch: u64,
    /// What the planner assumed because the file did not say.
    pub assumptions: Vec<String>,
    pub params: ModelParams,
    pub stages: Vec<Stage>,
    pub moe_layers: Vec<MoeLayerPlan>,
    pub ranks: Vec<RankPlan>,
    pub groups: Groups,
    pub time: TimeEstimate,
    /// Under `precision = fp8`: what keeps bf16 operands because FP8 would not pay there
    /// (absent for other precisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp8_fallbacks: Option<cost::Fp8Fallbacks>,
    /// FasterMoE's smart schedule and dynamic shadowing as planned; present when the file
    /// turns either on or the plan assumes skewed routing (`--routing-skew`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastermoe: Option<FasterMoePlan>,
    /// Megatron-Core's own values, in a plan made for it (`--megatron core_v0.19`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub megatron_core: Option<MegatronCorePlan>,
    /// Warnings about a plan that works but wastes time (not part of the JSON).
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// FasterMoE's options for the expert exchange and what the planner made of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FasterMoePlan {
    /// As the planned training runs it: the file's (`off`, `auto`, `chunks(N)`); `off`, as
    /// its `shadowing`, for a Megatron-LM target, which has neither.
    pub smart_schedule: SmartSchedule,
    pub shadowing: Shadowing,
    /// The busiest expert's load over the mean that the estimate assumes (1: balanced).
    pub routing_skew: f64,
    /// Per MoE layer: its chunk count, the experts shadowing replicates at that skew, and
    /// the seconds of its exchange and experts per micro-batch on the busiest rank.
    pub layers: Vec<LayerExchange>,
}

/// Plan-level schema version (see README.md, "`fmoec plan`").
pub const SCHEMA_VERSION: u32 = 1;

fn is_one(v: &u64) -> bool {
    *v == 1
}

/// The model's parameter counts.
pub fn model_params(g: &ModelGraph, checked: &Checked) -> ModelParams {
    let p = g.params();
    let active_expert: u64 = checked
        .model
        .moe_layers()
        .map(|(_, m)| {
            m.top_k * graph::mlp_params(checked.model.width, &m.expert, checked.model.bias).total()
        })
        .sum();
    ModelParams {
        total: p.total(),
        expert: p.expert,
        gate: p.gate,
        active: p.total() - p.expert + active_expert,
    }
}

/// The `parallel` block after overrides, with the values diagnostics point at.
struct Setup {
    world: u64,
    tensor: u64,
    pipeline: u64,
    /// Model chunks per stage as asked (the file's, or `--virtual-stages`); without effect
    /// with one stage.
    virtual_stages: u64,
    expert_group: ExpertGroup,
    micro_batch: Option<u64>,
    /// The micro-batch comes from `--micro-batch`, not the file.
    micro_batch_overridden: bool,
}

/// `diags` with a note naming the command-line overrides in force, where there are any.
fn plan_error(mut diags: Vec<Diagnostic>, o: &Overrides) -> Vec<Diagnostic> {
    let overrides = o.describe();
    if !overrides.is_empty() {
        let note = format!("with command-line overrides {overrides}");
        for d in &mut diags {
            d.notes.push(note.clone());
        }
    }
    diags
}

/// Plans the file as written.
pub fn build(checked: &Checked) -> Result<ParallelPlan, Vec<Diagnostic>> {
    build_with(checked, &Overrides::default())
}

/// Plans the file with command-line overrides. Every error found is returned (not just
/// the first); a plan comes back only when every rank fits its memory.
pub fn build_with(checked: &Checked, o: &Overrides) -> Result<ParallelPlan, Vec<Diagnostic>> {
    build_for(checked, o, &TargetRules::default())
}

/// Plans the file with command-line overrides for the training `rules` describe (one Megatron-LM
/// target's layout, vocabulary and memory).
pub fn build_for(
    checked: &Checked,
    o: &Overrides,
    rules: &TargetRules,
) -> Result<ParallelPlan, Vec<Diagnostic>> {
    let trained = rules.trained(checked);
    let checked = trained.as_ref().unwrap_or(checked);
    let mut p = cost_for(checked, o, rules)?;
    p.warnings
        .extend(virtual_stages_without_pipeline(checked, o));
    // Every rank lists the ids of the experts it holds: refuse plans whose listing alone
    // would take gigabytes (a million replicated-expert ranks would take terabytes).
    let layers = moe_layer_plans(&checked.model, &p.grid, &p.experts);
    let ids = listed_expert_ids(p.grid.per_stage(), &layers);
    if ids > limits::LISTED_EXPERT_IDS {
        let filled = with_fallback_spans(checked);
        let sp = &filled.as_ref().unwrap_or(checked).parallel.spans;
        return Err(plan_error(
            vec![diagnostics::too_many_to_list(
                p.grid.world,
                ids,
                limits::LISTED_EXPERT_IDS,
                sp.gpus.join(sp.hardware),
            )],
            o,
        ));
    }
    Ok(assemble(checked, p, o.routing_skew))
}

/// W0011, the one place it is judged: model chunks asked for (the file's `virtual_stages`, or
/// `--virtual-stages`) where the pipeline in effect (the file's `pipeline`, or `--pipeline`)
/// has one stage. It points at the file's `virtual_stages` where the chunks come from the file,
/// else at what set the pipeline: the file's `pipeline` (or its block, where the file writes
/// none), or the block when `--pipeline 1` replaces it.
fn virtual_stages_without_pipeline(checked: &Checked, o: &Overrides) -> Option<Diagnostic> {
    use diagnostics::Origin;
    let s = Setup::of(&checked.parallel, o);
    if s.virtual_stages <= 1 || s.pipeline != 1 {
        return None;
    }
    let filled = with_fallback_spans(checked);
    let sp = &filled.as_ref().unwrap_or(checked).parallel.spans;
    let origin = |flag: Option<u64>| match flag {
        Some(_) => Origin::Flag,
        None => Origin::File,
    };
    let (chunks_from, pipeline_from) = (origin(o.virtual_stages), origin(o.pipeline));
    let at = match (chunks_from, pipeline_from) {
        (Origin::File, _) => sp.virtual_stages,
        (Origin::Flag, Origin::File) => sp.pipeline,
        // `--pipeline 1` is not the file's text: the block it replaces a value of (the model,
        // in a file without one).
        (Origin::Flag, Origin::Flag) if sp.block.start == sp.block.end => checked.model.spans.name,
        (Origin::Flag, Origin::Flag) => sp.block,
    };
    let warning = diagnostics::virtual_stages_without_pipeline(
        (s.virtual_stages, chunks_from),
        pipeline_from,
        at,
    );
    plan_error(vec![warning], o).pop()
}

/// A configuration checked and costed, before ranks and groups are listed (cheap even
/// for very large worlds; what `--auto` compares).
pub struct Costed {
    pub grid: Grid,
    /// Where the experts sit (the expert group after the target's layout).
    pub experts: ExpertPlacement,
    pub rules: TargetRules,
    /// The planner's warnings about the placement it had to choose.
    pub warnings: Vec<Diagnostic>,
    pub expert_group: ExpertGroup,
    pub precision: Precision,
    pub seq_len: u64,
    pub costed: cost::Costed,
    pub assumptions: Vec<String>,
    pub graph: ModelGraph,
}

impl Costed {
    /// The largest memory of any rank.
    pub fn max_memory(&self) -> u64 {
        self.costed
            .stages
            .iter()
            .map(|s| s.memory.total)
            .max()
            .unwrap_or(0)
    }
}

/// Tokens per micro-batch of the runtime's [`default_micro_batch`].
pub const DEFAULT_MICRO_TOKENS: u64 = 8192;

/// The micro-batch of a run whose plan was made without the planner (the runtime's
/// `micro_batch_for`): the largest divisor of a data rank's `share` of the batch (in
/// sequences) with at most [`DEFAULT_MICRO_TOKENS`] tokens, at least 1. A plan's free
/// micro-batch is the cost model's choice instead (`pick_micro_batch`).
pub fn default_micro_batch(share: u64, seq_len: u64) -> u64 {
    let cap = (DEFAULT_MICRO_TOKENS / seq_len.max(1)).max(1);
    (1..=share.min(cap))
        .rev()
        .find(|m| share % m == 0)
        .unwrap_or(1)
}

/// Share of a GPU's memory the planner keeps free when it chooses the micro-batch: its
/// estimate of `fmoec run` was 4-9% off the measured peak (BENCHMARKS.md).
pub const FREE_CHOICE_HEADROOM: f64 = 0.10;

/// Whether every rank of `c` leaves [`FREE_CHOICE_HEADROOM`] of its GPU free.
fn roomy(c: &cost::Costed) -> bool {
    c.stages
        .iter()
        .all(|s| s.memory.total as f64 <= (1.0 - FREE_CHOICE_HEADROOM) * s.memory.capacity as f64)
}

/// The fastest of the `fitting` (seconds per token, micro-batch, costed) candidates among
/// those that leave [`FREE_CHOICE_HEADROOM`] free on every rank, or among all of them where
/// none does. Of candidates within a millionth of the fastest (the cost model ties them only
/// where the weights cost nothing to read), the largest: larger matmuls run closer to a GPU's
/// peak, which the model's flat FLOP rate does not see.
fn pick_micro_batch(fitting: Vec<(f64, u64, cost::Costed)>) -> Option<cost::Costed> {
    let any_roomy = fitting.iter().any(|(.., c)| roomy(c));
    let kept: Vec<_> = fitting
        .into_iter()
        .filter(|(.., c)| !any_roomy || roomy(c))
        .collect();
    let fastest = kept.iter().map(|(t, ..)| *t).fold(f64::INFINITY, f64::min);
    kept.into_iter()
        .filter(|(t, ..)| *t <= fastest * (1.0 + 1e-6))
        .max_by_key(|(_, m, _)| *m)
        .map(|(.., c)| c)
}

/// Checks and costs the file with overrides, choosing the micro-batch when it is free.
pub fn cost_with(checked: &Checked, o: &Overrides) -> Result<Costed, Vec<Diagnostic>> {
    cost_for(checked, o, &TargetRules::default())
}

/// Where the experts of `model` sit on `grid` under `rules`, with the warnings of that choice;
/// an error for each layer whose experts do not divide over the ranks that hold them.
fn place_experts(
    model: &Model,
    par: &Parallel,
    grid: &Grid,
    rules: &TargetRules,
) -> Result<(ExpertPlacement, Vec<Diagnostic>), Vec<Diagnostic>> {
    let whole_for_bias = rules.whole_experts_for_bias(model, par, grid.tensor);
    let mut warnings = Vec::new();
    if whole_for_bias {
        warnings.extend(whole_experts_rules(model, par, grid, rules)?);
    }
    warnings.extend(pinned_vocab_padded(model, grid.tensor, rules));
    Ok((expert_placement(par, grid, rules, whole_for_bias), warnings))
}

/// The ranks that split and slice each MoE layer's experts, and how far apart they sit.
fn expert_placement(
    par: &Parallel,
    grid: &Grid,
    rules: &TargetRules,
    whole_for_bias: bool,
) -> ExpertPlacement {
    let (t, g) = (grid.tensor, grid.expert_group);
    let slices = if par.expert_slicing && t > 1 { t } else { 1 };
    match rules.layout {
        Layout::Fastmoe => ExpertPlacement {
            layout: Layout::Fastmoe,
            parallel: g,
            slices,
            stride: t,
        },
        // Megatron-Core's expert grid: the expert-tensor ranks are the tensor ranks when the
        // file slices experts; else each tensor rank routes its own slice of the sequence to
        // whole experts (expert-tensor size 1)
        Layout::MegatronCore if whole_for_bias => ExpertPlacement {
            layout: Layout::MegatronCore,
            parallel: g * t,
            slices: 1,
            stride: 1,
        },
        Layout::MegatronCore => ExpertPlacement {
            layout: Layout::MegatronCore,
            parallel: g,
            slices,
            stride: slices,
        },
    }
}

/// Experts with biases held whole on expert × tensor ranks (see
/// [`TargetRules::whole_experts_for_bias`]): an error for each layer whose experts do not
/// divide over those ranks, else the warning that the file's slicing is not what runs (where
/// there are MoE layers).
fn whole_experts_rules(
    model: &Model,
    par: &Parallel,
    grid: &Grid,
    rules: &TargetRules,
) -> Result<Option<Diagnostic>, Vec<Diagnostic>> {
    let (t, g) = (grid.tensor, grid.expert_group);
    let mut errors = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in model.moe_layers() {
        if m.experts % (g * t) != 0 && seen.insert(m.spans.experts) {
            errors.push(diagnostics::experts_not_divisible_whole(
                i,
                (m.experts, m.spans.experts),
                (g, t, g * t),
                &rules.version,
                par.spans.tensor,
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let has_moe_layers = model.moe_layers().next().is_some();
    Ok(has_moe_layers
        .then(|| diagnostics::whole_experts_for_bias((g, t), &rules.version, par.spans.tensor)))
}

/// A target that takes the file's vocabulary (`pinned_vocab`) still pads it to a multiple of
/// the tensor size: the warning saying so, where it does.
fn pinned_vocab_padded(model: &Model, tensor: u64, rules: &TargetRules) -> Option<Diagnostic> {
    let padded = cost::padded_vocab_to(model.vocab, rules.vocab_multiple, tensor);
    (rules.vocab_multiple == 1 && padded != model.vocab).then(|| {
        diagnostics::vocab_padded(
            (model.vocab, model.spans.vocab),
            padded,
            tensor,
            &rules.version,
        )
    })
}

/// Checks and costs the file with overrides for the training `rules` describe, choosing the
/// micro-batch when it is free.
pub fn cost_for(
    checked: &Checked,
    o: &Overrides,
    rules: &TargetRules,
) -> Result<Costed, Vec<Diagnostic>> {
    let trained = rules.trained(checked);
    let checked = trained.as_ref().unwrap_or(checked);
    let filled = with_fallback_spans(checked);
    let checked = filled.as_ref().unwrap_or(checked);
    let s = Setup::of(&checked.parallel, o);
    let grid = validate(&Parts::of(checked), &s).map_err(|d| plan_error(d, o))?;
    let (experts, warnings) = place_experts(&checked.model, &checked.parallel, &grid, rules)
        .map_err(|d| plan_error(d, o))?;
    let mut assumptions = Vec::new();
    let step = StepShape::of(checked, &grid, &mut assumptions).map_err(|d| plan_error(d, o))?;
    let g = graph::lower(&checked.model, step.seq_len);
    let candidates = step
        .micro_batch_candidates(s.micro_batch, &mut assumptions)
        .map_err(|d| plan_error(d, o))?;
    let training = rules.training();
    let memory_model = o.memory_model.unwrap_or(rules.memory_model());
    let cost_at = |m: u64| {
        cost::evaluate(
            &g,
            checked,
            &grid,
            &experts,
            &training,
            step.precision,
            step.seq_len,
            m,
            step.micro_batches(m).max(1),
            memory_model,
            o.routing_skew.unwrap_or(1.0),
        )
    };
    let costed = fastest_fitting(candidates, cost_at).map_err(|first_failure| {
        let (par, sp) = (&checked.parallel, &checked.parallel.spans);
        let at = (par.hardware.name.as_str(), sp.gpus.join(sp.hardware));
        plan_error(vec![first_failure.out_of_memory(&grid, at)], o)
    })?;
    Ok(Costed {
        grid,
        experts,
        rules: rules.clone(),
        warnings,
        expert_group: s.expert_group,
        precision: step.precision,
        seq_len: step.seq_len,
        costed,
        assumptions,
        graph: g,
    })
}

/// Micro-batches per step assumed without a `train` block, per pipeline stage.
const MICRO_BATCHES_PER_STAGE_WITHOUT_TRAIN: u64 = 4;

/// Sequences of a data rank's share of the batch assumed without a `train` block, when the
/// micro-batch is chosen.
const SHARE_WITHOUT_TRAIN: u64 = 64;

/// What one step is made of before its micro-batch is chosen: the `train` block's precision,
/// sequences and batch, or what the planner assumes without one.
struct StepShape<'c> {
    train: Option<&'c Train>,
    /// The grid's data ranks.
    data: u64,
    /// The grid's pipeline stages.
    pipeline: u64,
    /// The grid's model chunks per stage.
    virtual_stages: u64,
    /// The `parallel` block's span of `virtual_stages`, for the diagnostic about them.
    virtual_stages_span: Span,
    precision: Precision,
    seq_len: u64,
    /// Sequences a data rank takes per step (`None`: no `train` block).
    per_rank_batch: Option<u64>,
}

impl<'c> StepShape<'c> {
    /// The step of `checked` on `grid`, with what it assumes (in `assumptions`); an error
    /// where the precision is FP8 on a GPU without FP8 tensor cores.
    fn of(
        checked: &'c Checked,
        grid: &Grid,
        assumptions: &mut Vec<String>,
    ) -> Result<StepShape<'c>, Vec<Diagnostic>> {
        let (par, train) = (&checked.parallel, checked.train.as_ref());
        let precision = match train {
            Some(t) => t.precision,
            None => {
                assumptions.push(
                    "no train block: bf16 mixed precision (fp32 master weights, Adam)".into(),
                );
                Precision::Bf16
            }
        };
        if let (Precision::Fp8 { .. }, None) = (precision, par.hardware.fp8_tflops) {
            let sp = &par.spans;
            let at = train.map(|t| t.spans.precision).unwrap_or(sp.block);
            return Err(vec![diagnostics::no_fp8(
                (&par.hardware.name, sp.hardware),
                at,
            )]);
        }
        let seq_len = match train {
            Some(t) => t.seq_len,
            None => {
                assumptions.push(format!(
                    "no train block: sequences of {} (the context)",
                    crate::diag::count(checked.model.context, "token", "tokens")
                ));
                checked.model.context
            }
        };
        if train.is_none() {
            assumptions.push(format!(
                "no train block: {} micro-batches per step ({MICRO_BATCHES_PER_STAGE_WITHOUT_TRAIN} × pipeline)",
                MICRO_BATCHES_PER_STAGE_WITHOUT_TRAIN * grid.pipeline
            ));
        }
        Ok(StepShape {
            train,
            data: grid.data,
            pipeline: grid.pipeline,
            virtual_stages: grid.virtual_stages,
            virtual_stages_span: par.spans.virtual_stages,
            precision,
            seq_len,
            per_rank_batch: train.map(|t| t.batch_sequences / grid.data),
        })
    }

    /// Micro-batches per step (per data rank) at micro-batch `m`.
    fn micro_batches(&self, m: u64) -> u64 {
        match self.train {
            Some(t) => micro_batches_per_step(t.batch_sequences, self.data, m),
            None => MICRO_BATCHES_PER_STAGE_WITHOUT_TRAIN * self.pipeline,
        }
    }

    /// Whether the schedule runs micro-batch `m`: the interleaved one needs a multiple of the
    /// stages in micro-batches.
    fn schedulable(&self, m: u64) -> bool {
        schedule::runs_micro_batches(self.pipeline, self.virtual_stages, self.micro_batches(m))
    }

    /// The micro-batches to cost: `asked` (the file's or `--micro-batch`), else the powers of
    /// two up to 64 that divide a data rank's share of the batch, and the share's largest
    /// divisor up to 64, those the schedule runs (in `assumptions`, how the choice is made);
    /// an error where the schedule runs none of them.
    fn micro_batch_candidates(
        &self,
        asked: Option<u64>,
        assumptions: &mut Vec<String>,
    ) -> Result<Vec<u64>, Vec<Diagnostic>> {
        if let Some(m) = asked {
            return Ok(vec![m]);
        }
        let b = self.per_rank_batch;
        let limit = b.unwrap_or(SHARE_WITHOUT_TRAIN).min(64);
        let mut c: Vec<u64> = (0..7)
            .map(|i| 1u64 << i)
            .filter(|m| *m <= limit && b.is_none_or(|b| b % m == 0))
            .filter(|&m| self.schedulable(m))
            .collect();
        // a share like 12 or 48 also gets its largest micro-batch, not only 4 or 16
        let largest = b.and_then(|b| (1..=limit).rev().find(|m| b % m == 0));
        if let Some(m) = largest.filter(|m| !c.contains(m) && self.schedulable(*m)) {
            c.push(m);
            c.sort_unstable();
        }
        if let (true, Some(t), Some(b)) = (c.is_empty(), self.train, b) {
            return Err(vec![diagnostics::interleaved_micro_batches(
                b,
                self.pipeline,
                (self.virtual_stages, self.virtual_stages_span),
                t.spans.batch,
            )]);
        }
        if c.len() > 1 {
            assumptions.push(format!(
                "micro-batch not given: chose the fastest in the estimate among {c:?} of \
                 those that leave {:.0}% of the memory free (else of those that fit)",
                FREE_CHOICE_HEADROOM * 100.0
            ));
        }
        Ok(c)
    }
}

/// The fastest of the `candidates` micro-batches that fits, as [`pick_micro_batch`] chooses
/// among them at `cost_at`; else the first that does not fit.
fn fastest_fitting(
    candidates: Vec<u64>,
    cost_at: impl Fn(u64) -> cost::Costed,
) -> Result<cost::Costed, cost::Costed> {
    let mut fitting: Vec<(f64, u64, cost::Costed)> = Vec::new();
    let mut first_failure: Option<cost::Costed> = None;
    for m in candidates {
        let c = cost_at(m);
        if c.fits() {
            // Seconds per token: the step time when the batch is fixed, and still fair
            // when it grows with the micro-batch (no train block).
            let t = 1.0 / c.time.tokens_per_s.max(f64::MIN_POSITIVE);
            fitting.push((t, m, c));
        } else if first_failure.is_none() {
            first_failure = Some(c);
        }
    }
    match (pick_micro_batch(fitting), first_failure) {
        (Some(c), _) => Ok(c),
        (None, Some(c)) => Err(c),
        (None, None) => unreachable!("every micro-batch candidate is costed"),
    }
}

/// FasterMoE's options that cannot do what they say on this layout (warnings).
fn fastermoe_warnings(par: &Parallel, grid: &Grid, warnings: &mut Vec<Diagnostic>) {
    if grid.expert_group <= 1 {
        // On one GPU too: the option was written, and does nothing on the world planned.
        for (name, at) in par.fastermoe_options() {
            warnings.push(diagnostics::nothing_to_exchange(name, grid.world, at));
        }
        return;
    }
    if let SmartSchedule::Chunks { count } = par.smart_schedule {
        if count > grid.expert_group {
            warnings.push(diagnostics::chunks_over_expert_group(
                count,
                grid.expert_group,
                par.spans.smart_schedule,
            ));
        }
    }
}

/// Values the file did not write (no `parallel` block, no `micro_batch`) have empty
/// spans; point their diagnostics at the `parallel` block, else the model's name (`None`:
/// every span is written). Every diagnostic about the placement reads these (the target's
/// in `emit::validate` too).
pub fn with_fallback_spans(checked: &Checked) -> Option<Checked> {
    let parallel = filled_parallel(&checked.parallel, Some(checked.model.spans.name))?;
    Some(Checked {
        parallel,
        ..checked.clone()
    })
}

/// `parallel` with its empty spans pointing at the block (else at `model_name`); `None`
/// when no span is empty.
fn filled_parallel(parallel: &Parallel, model_name: Option<Span>) -> Option<Parallel> {
    let empty = |s: &Span| s.start == s.end;
    let ps = &parallel.spans;
    let all = [
        &ps.gpus,
        &ps.hardware,
        &ps.tensor,
        &ps.pipeline,
        &ps.data,
        &ps.experts,
        &ps.micro_batch,
        &ps.virtual_stages,
        &ps.smart_schedule,
        &ps.shadowing,
    ];
    if !all.iter().any(|s| empty(s)) {
        return None;
    }
    let fallback = match model_name {
        Some(name) if empty(&ps.block) => name,
        _ => ps.block,
    };
    let mut p = parallel.clone();
    let ps = &mut p.spans;
    for s in [
        &mut ps.gpus,
        &mut ps.hardware,
        &mut ps.tensor,
        &mut ps.pipeline,
        &mut ps.data,
        &mut ps.experts,
        &mut ps.micro_batch,
        &mut ps.virtual_stages,
        &mut ps.smart_schedule,
        &mut ps.shadowing,
    ] {
        if empty(s) {
            *s = fallback;
        }
    }
    Some(p)
}

/// What the planner's layout rules read: the model where it could be built, the
/// placement, and the training batch where there is one.
struct Parts<'a> {
    model: Option<&'a Model>,
    parallel: &'a Parallel,
    train: Option<&'a Train>,
}

impl<'a> Parts<'a> {
    fn of(checked: &'a Checked) -> Parts<'a> {
        Parts {
            model: Some(&checked.model),
            parallel: &checked.parallel,
            train: checked.train.as_ref(),
        }
    }
}

/// Upper bounds on declared sizes under which every count the planner computes fits in
/// a `u64` (see README.md, "`fmoec plan`"); far above any real model or cluster.
pub mod limits {
    pub const WIDTH: u64 = 1 << 16;
    pub const HIDDEN: u64 = 1 << 18;
    pub const VOCAB: u64 = 1 << 22;
    pub const CONTEXT: u64 = 1 << 20;
    pub const EXPERTS: u64 = 1 << 12;
    pub const SHARED_EXPERTS: u64 = 1 << 10;
    pub const DEPTH: u64 = 1 << 10;
    pub const GPUS: u64 = 1 << 20;
    pub const BATCH: u64 = 1 << 30;
    pub const MICRO_BATCH: u64 = 1 << 20;
    /// Expert ids listed over all ranks of one plan (the JSON plan of a million ranks with
    /// 2^26 of them took 3.6 s and 3 GB; this is a quarter of that).
    pub const LISTED_EXPERT_IDS: u64 = 1 << 24;
}

fn check_limits(parts: &Parts, s: &Setup) -> Vec<Diagnostic> {
    let mut sizes = setup_sizes(parts, s);
    if let Some(m) = parts.model {
        sizes.extend(model_sizes(m));
    }
    sizes
        .into_iter()
        .filter(|size| size.value > size.limit)
        .map(|size| diagnostics::too_large(size.what, size.value, size.limit, size.at))
        .collect()
}

/// A size the planner bounds: what it is called, its value, its limit, where it is written.
struct Bounded {
    what: &'static str,
    value: u64,
    limit: u64,
    at: Span,
}

fn bounded(what: &'static str, value: u64, limit: u64, at: Span) -> Bounded {
    Bounded {
        what,
        value,
        limit,
        at,
    }
}

/// The bounded sizes of the parallel layout and the batch.
fn setup_sizes(parts: &Parts, s: &Setup) -> Vec<Bounded> {
    let ps = &parts.parallel.spans;
    let mut sizes = vec![
        bounded("gpus", s.world, limits::GPUS, ps.gpus),
        bounded("tensor", s.tensor, limits::GPUS, ps.tensor),
        bounded("pipeline", s.pipeline, limits::GPUS, ps.pipeline),
        bounded(
            "virtual_stages",
            s.virtual_stages,
            limits::DEPTH,
            ps.virtual_stages,
        ),
    ];
    if let Some(mb) = s.micro_batch {
        sizes.push(bounded(
            "micro_batch",
            mb,
            limits::MICRO_BATCH,
            ps.micro_batch,
        ));
    }
    if let Some(t) = parts.train {
        sizes.push(bounded(
            "batch",
            t.batch_sequences,
            limits::BATCH,
            t.spans.batch,
        ));
        sizes.push(bounded(
            "sequence length",
            t.seq_len,
            limits::CONTEXT,
            t.spans.batch,
        ));
    }
    sizes
}

/// The bounded sizes of the model, each layer declaration's once.
fn model_sizes(m: &Model) -> Vec<Bounded> {
    let ms = &m.spans;
    let mut sizes = vec![
        bounded("width", m.width, limits::WIDTH, ms.width),
        // Heads past the width and top_k past the experts are the front end's errors, but
        // the planner still costs such a model in the same pass: bound them like the sizes
        // they are compared with (the front end leaves key/value heads at most the heads).
        bounded("heads", m.attention.heads, limits::WIDTH, ms.heads),
        bounded("vocab", m.vocab, limits::VOCAB, ms.vocab),
        bounded("context", m.context, limits::CONTEXT, ms.context),
        bounded("depth", m.depth(), limits::DEPTH, ms.depth),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for l in &m.layers {
        match &l.ffn {
            Ffn::Dense(d) if seen.insert(d.span) => {
                sizes.push(bounded("hidden", d.hidden, limits::HIDDEN, d.span));
            }
            Ffn::Moe(moe) if seen.insert(moe.spans.call) => {
                sizes.extend([
                    bounded("experts", moe.experts, limits::EXPERTS, moe.spans.experts),
                    bounded("top_k", moe.top_k, limits::EXPERTS, moe.spans.top_k),
                    bounded("hidden", moe.expert.hidden, limits::HIDDEN, moe.expert.span),
                ]);
                if let Some(sh) = &moe.shared {
                    sizes.extend([
                        bounded(
                            "shared experts",
                            sh.count,
                            limits::SHARED_EXPERTS,
                            sh.expert.span,
                        ),
                        bounded("hidden", sh.expert.hidden, limits::HIDDEN, sh.expert.span),
                    ]);
                }
            }
            _ => {}
        }
    }
    sizes
}

/// The planner's rules that need no cost model (sizes, the grid's divisibility, heads,
/// hidden sizes, depth, the expert group, experts, the batch), on the `parallel` block as
/// written or under the overrides: every diagnostic, none when the layout is sound.
/// `fmoec check` runs this where the front end could not build all of the file, so that
/// one pass reports every mistake it can: without a model, the rules about the placement
/// alone (the grid, the expert group); without a `train` block, those without the batch.
pub fn layout_rules(
    model: Option<&Model>,
    parallel: &Parallel,
    train: Option<&Train>,
    o: &Overrides,
) -> Vec<Diagnostic> {
    let filled = filled_parallel(parallel, model.map(|m| m.spans.name));
    let parallel = filled.as_ref().unwrap_or(parallel);
    let parts = Parts {
        model,
        parallel,
        train,
    };
    match validate(&parts, &Setup::of(parallel, o)) {
        Ok(_) => Vec::new(),
        Err(d) => plan_error(d, o),
    }
}

impl Setup {
    fn of(par: &Parallel, o: &Overrides) -> Setup {
        Setup {
            world: o.world.unwrap_or(par.gpus),
            tensor: o.tensor.unwrap_or(par.tensor),
            pipeline: o.pipeline.unwrap_or(par.pipeline),
            virtual_stages: o.virtual_stages.unwrap_or(par.virtual_stages),
            expert_group: o.expert_group.unwrap_or(par.experts),
            micro_batch: o.micro_batch.or(par.micro_batch),
            micro_batch_overridden: o.micro_batch.is_some(),
        }
    }
}

/// Divisibility and size checks; the grid when they all pass. Every rule that can still be
/// decided is checked (not only the first to fail): all of them need the sizes to be in
/// range, those about the model need the model, and those about the expert group and the
/// batch need the data size. The diagnostics come in the order of these phases.
fn validate(parts: &Parts, s: &Setup) -> Result<Grid, Vec<Diagnostic>> {
    let sizes = size_rules(parts, s);
    if !sizes.is_empty() {
        return Err(sizes);
    }
    let mut errs = Vec::new();
    let data = data_size(parts.parallel, s, &mut errs);
    if let Some(model) = parts.model {
        model_rules(model, parts.parallel, s, &mut errs);
    }
    // No data size: nothing below can be decided.
    let Some(data) = data else {
        return Err(errs);
    };
    let expert_group = expert_group_size(parts.parallel, s, data, &mut errs);
    if let (Some(model), Some(group)) = (parts.model, expert_group) {
        experts_rules(model, parts.parallel, group, &mut errs);
    }
    if let Some(train) = parts.train {
        batch_rules(train, parts.parallel, s, data, &mut errs);
    }
    let Some(expert_group) = expert_group.filter(|_| errs.is_empty()) else {
        return Err(errs);
    };
    Ok(Grid {
        world: s.world,
        tensor: s.tensor,
        pipeline: s.pipeline,
        virtual_stages: s.virtual_stages_in_effect(),
        data,
        expert_group,
    })
}

/// The sizes every other rule divides by are not zero, and no size is past the planner's
/// [`limits`].
fn size_rules(parts: &Parts, s: &Setup) -> Vec<Diagnostic> {
    let sp = &parts.parallel.spans;
    let mut errs = Vec::new();
    for (v, what, at) in [
        (s.world, "gpus", sp.gpus),
        (s.tensor, "tensor", sp.tensor),
        (s.pipeline, "pipeline", sp.pipeline),
    ] {
        if v == 0 {
            errs.push(diagnostics::zero_size(what, at));
        }
    }
    if s.micro_batch == Some(0) {
        errs.push(diagnostics::zero_size("micro_batch", sp.micro_batch));
    }
    if s.virtual_stages == 0 {
        errs.push(diagnostics::zero_size("virtual_stages", sp.virtual_stages));
    }
    if let ExpertGroup::Size { size: 0 } = s.expert_group {
        errs.push(diagnostics::zero_size("the expert group size", sp.experts));
    }
    errs.extend(check_limits(parts, s));
    errs
}

/// `span` where the file wrote the value, `None` where it did not: values the file did not
/// write point at the `parallel` block, and are not labelled as if they were written there.
fn written(par: &Parallel, span: Span) -> Option<Span> {
    (span != par.spans.block).then_some(span)
}

/// The data-parallel size, where the world divides into tensor × pipeline (else an error).
fn data_size(par: &Parallel, s: &Setup, errs: &mut Vec<Diagnostic>) -> Option<u64> {
    let sp = &par.spans;
    let tp = s.tensor * s.pipeline;
    if s.world % tp != 0 {
        errs.push(diagnostics::world_not_divisible(
            (s.world, sp.gpus),
            (s.tensor, written(par, sp.tensor)),
            (s.pipeline, written(par, sp.pipeline)),
        ));
        return None;
    }
    Some(s.world / tp)
}

/// The expert group's size on `data` data ranks, where a size asked for divides them (else an
/// error).
fn expert_group_size(
    par: &Parallel,
    s: &Setup,
    data: u64,
    errs: &mut Vec<Diagnostic>,
) -> Option<u64> {
    match s.expert_group {
        ExpertGroup::AcrossData => Some(data),
        ExpertGroup::Replicated => Some(1),
        ExpertGroup::Size { size } if data % size != 0 => {
            errs.push(diagnostics::expert_group_not_divisible(
                size,
                data,
                par.spans.experts,
            ));
            None
        }
        ExpertGroup::Size { size } => Some(size),
    }
}

/// Each MoE layer's experts divide over an expert `group` (one diagnostic per declaration of
/// the experts, which layers usually share).
fn experts_rules(model: &Model, par: &Parallel, group: u64, errs: &mut Vec<Diagnostic>) {
    let sp = &par.spans;
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in model.moe_layers() {
        if m.experts % group != 0 && seen.insert(m.spans.experts) {
            errs.push(diagnostics::experts_not_divisible(
                i,
                (m.experts, m.spans.experts),
                group,
                (sp.experts, written(par, sp.experts).is_some()),
            ));
        }
    }
}

/// The batch divides into `data` ranks' micro-batches, and where the micro-batch is given, the
/// interleaved schedule runs that many of them (where it is chosen, the planner picks among
/// those the schedule runs, see [`StepShape::micro_batch_candidates`]).
fn batch_rules(train: &Train, par: &Parallel, s: &Setup, data: u64, errs: &mut Vec<Diagnostic>) {
    let sp = &par.spans;
    let batch = train.batch_sequences;
    let m = s.micro_batch.unwrap_or(1);
    let divisible = batch != 0 && batch % (data * m) == 0;
    if !divisible {
        let at = if par.micro_batch.is_some() && !s.micro_batch_overridden {
            sp.micro_batch
        } else {
            train.spans.batch
        };
        errs.push(diagnostics::batch_not_divisible(
            batch,
            (data, written(par, sp.data)),
            s.micro_batch,
            at,
        ));
    }
    let virtual_stages = s.virtual_stages_in_effect();
    if let (Some(m), true) = (s.micro_batch, divisible) {
        let micro_batches = micro_batches_per_step(batch, data, m);
        if !schedule::runs_micro_batches(s.pipeline, virtual_stages, micro_batches) {
            errs.push(diagnostics::interleaved_micro_batches(
                micro_batches,
                s.pipeline,
                (virtual_stages, sp.virtual_stages),
                train.spans.batch,
            ));
        }
    }
}

/// Micro-batches a data rank runs per step: its share of `batch` sequences over `data` ranks,
/// in micro-batches of `micro_batch` sequences.
fn micro_batches_per_step(batch: u64, data: u64, micro_batch: u64) -> u64 {
    batch / data.max(1) / micro_batch.max(1)
}

impl Setup {
    /// Model chunks per stage: as asked with several stages, 1 with one (W0011 says so, see
    /// [`virtual_stages_without_pipeline`]).
    fn virtual_stages_in_effect(&self) -> u64 {
        if self.pipeline > 1 {
            self.virtual_stages
        } else {
            1
        }
    }
}

/// The rules about how the model splits: heads and hidden sizes over `tensor`, depth over
/// `pipeline`.
fn model_rules(model: &Model, par: &Parallel, s: &Setup, errs: &mut Vec<Diagnostic>) {
    let sp = &par.spans;
    let att = &model.attention;
    if att.heads % s.tensor != 0 {
        errs.push(diagnostics::heads_not_divisible(
            (att.heads, model.spans.heads),
            (s.tensor, sp.tensor),
            false,
        ));
    } else if att.kv_heads % s.tensor != 0 {
        errs.push(diagnostics::heads_not_divisible(
            (att.kv_heads, model.spans.heads),
            (s.tensor, sp.tensor),
            true,
        ));
    }
    ffn_rules(model, par, s, errs);
    if model.depth() % s.pipeline != 0 {
        errs.push(diagnostics::depth_not_divisible(
            (model.depth(), model.spans.depth),
            (s.pipeline, sp.pipeline),
        ));
    } else if model.depth() % (s.pipeline * s.virtual_stages_in_effect()) != 0 {
        errs.push(diagnostics::chunks_not_divisible(
            (model.depth(), model.spans.depth),
            s.pipeline,
            (s.virtual_stages, sp.virtual_stages),
        ));
    }
}

/// Every hidden width tensor parallelism splits must divide by the tensor size: a dense
/// MLP's, an MoE layer's shared experts' (together), and its routed experts' when experts
/// are sliced over the tensor ranks.
fn ffn_rules(model: &Model, par: &Parallel, s: &Setup, errs: &mut Vec<Diagnostic>) {
    // One diagnostic per distinct problem: layers usually share their ffn declaration.
    let mut seen = std::collections::BTreeSet::new();
    for l in &model.layers {
        // (hidden width, where it is declared, whether it is the routed experts')
        let mut split: Vec<(u64, Span, bool)> = Vec::new();
        match &l.ffn {
            Ffn::Dense(m) => split.push((m.hidden, m.span, false)),
            Ffn::Moe(m) => {
                if let Some(sh) = &m.shared {
                    split.push((sh.count * sh.expert.hidden, sh.expert.span, false));
                }
                if par.expert_slicing {
                    split.push((m.expert.hidden, m.expert.span, true));
                }
            }
        }
        for (hidden, at, expert) in split {
            if hidden % s.tensor != 0 && seen.insert((at, expert)) {
                errs.push(diagnostics::ffn_not_divisible(
                    l.index,
                    hidden,
                    at,
                    (s.tensor, par.spans.tensor),
                    expert,
                ));
            }
        }
    }
}

/// The plan of a costed configuration: its MoE layers, ranks, stages and groups listed, its
/// warnings and FasterMoE's and Megatron-Core's parts added.
fn assemble(checked: &Checked, p: Costed, routing_skew: Option<f64>) -> ParallelPlan {
    let Costed {
        grid,
        experts: placement,
        rules,
        warnings: placement_warnings,
        expert_group,
        precision,
        seq_len,
        costed,
        assumptions,
        graph: g,
    } = p;
    let par = &checked.parallel;
    let depth = checked.model.depth();
    let moe_layers = moe_layer_plans(&checked.model, &grid, &placement);
    let core_grid = megatron_core_grid(&placement);
    let ranks = rank_plans(
        &grid,
        core_grid.as_ref(),
        placement.slices,
        gpus_per_node(par),
        &moe_layers,
        &costed,
    );
    let stages = stage_plans(&grid, depth, &costed);
    let groups = group_plans(&grid, core_grid.as_ref());
    let megatron_core = core_grid.map(|eg| megatron_core_plan(checked, &grid, &rules, &eg));
    let warnings = layout_warnings(checked, &grid, &costed, placement_warnings);
    let fastermoe = fastermoe_plan(par, routing_skew, &costed);
    ParallelPlan {
        fastermoe,
        fp8_fallbacks: costed.fp8_fallbacks.as_deref().cloned(),
        warnings,
        schema: SCHEMA_VERSION,
        model: checked.model.name.clone(),
        hardware: par.hardware.clone(),
        world: grid.world,
        tensor: grid.tensor,
        pipeline: grid.pipeline,
        virtual_stages: grid.virtual_stages,
        data: grid.data,
        expert_group: expert_group_name(expert_group),
        expert_group_size: placement.parallel,
        expert_slicing: placement.slices > 1,
        precision,
        seq_len,
        micro_batch: costed.micro_batch,
        micro_batches: costed.micro_batches,
        global_batch: costed.micro_batch * costed.micro_batches * grid.data,
        assumptions,
        params: model_params(&g, checked),
        stages,
        moe_layers,
        ranks,
        groups,
        time: costed.time,
        megatron_core,
    }
}

/// Ranks per host, as the plan assumes them (at least 1).
fn gpus_per_node(par: &Parallel) -> u64 {
    par.hardware.gpus_per_node.max(1)
}

/// How many expert ids the plan's ranks list: each of a stage's `per_stage` ranks lists the
/// experts it holds of that stage's MoE layers (the placement's share, after the target's
/// layout).
pub fn listed_expert_ids(per_stage: u64, layers: &[MoeLayerPlan]) -> u64 {
    layers
        .iter()
        .map(|m| per_stage.saturating_mul(m.experts_per_rank))
        .fold(0, u64::saturating_add)
}

/// Each MoE layer's stage, experts and the share of them (and of their hidden size) one rank
/// holds under `placement`.
fn moe_layer_plans(model: &Model, grid: &Grid, placement: &ExpertPlacement) -> Vec<MoeLayerPlan> {
    let depth = model.depth();
    model
        .moe_layers()
        .map(|(i, m)| MoeLayerPlan {
            layer: i,
            stage: grid.stage_of_layer(i as u64, depth),
            experts: m.experts,
            top_k: m.top_k,
            experts_per_rank: m.experts / placement.parallel,
            expert_hidden: m.expert.hidden,
            hidden_per_rank: m.expert.hidden / placement.slices,
            capacity: m.gate.capacity.map(|c| c.train),
        })
        .collect()
}

/// Megatron-Core's expert grid, where the plan is for it.
fn megatron_core_grid(placement: &ExpertPlacement) -> Option<ExpertGrid> {
    match placement.layout {
        Layout::MegatronCore => Some(ExpertGrid {
            expert_parallel: placement.parallel,
            expert_tensor: placement.slices,
        }),
        Layout::Fastmoe => None,
    }
}

/// Every process group: the grid's, with Megatron-Core's expert and expert-data groups where
/// the plan is for it.
fn group_plans(grid: &Grid, core_grid: Option<&ExpertGrid>) -> Groups {
    match core_grid {
        Some(eg) => Groups {
            expert: eg.expert_groups(grid),
            expert_data: eg.expert_data_groups(grid),
            ..grid.groups()
        },
        None => grid.groups(),
    }
}

/// What a plan for Megatron-Core adds: its expert grid's sizes and groups, its vocabulary and
/// optimizer.
fn megatron_core_plan(
    checked: &Checked,
    grid: &Grid,
    rules: &TargetRules,
    eg: &ExpertGrid,
) -> MegatronCorePlan {
    MegatronCorePlan {
        expert_parallel: eg.expert_parallel,
        expert_tensor: eg.expert_tensor,
        expert_data: eg.expert_data(grid),
        whole_experts_for_bias: rules.whole_experts_for_bias(
            &checked.model,
            &checked.parallel,
            grid.tensor,
        ),
        padded_vocab: cost::padded_vocab_to(checked.model.vocab, rules.vocab_multiple, grid.tensor),
        distributed_optimizer: rules.distributed_optimizer,
        expert_tensor_groups: eg.expert_tensor_groups(grid),
    }
}

/// Every rank's coordinates, the experts it holds (ids and hidden slice per MoE layer of its
/// stage) and its stage's memory.
fn rank_plans(
    grid: &Grid,
    core_grid: Option<&ExpertGrid>,
    slices: u64,
    gpn: u64,
    moe_layers: &[MoeLayerPlan],
    costed: &cost::Costed,
) -> Vec<RankPlan> {
    (0..grid.world)
        .map(|r| {
            let mut c = grid.coords(r);
            // the rank among the expert-tensor ranks slicing its experts
            let mut slice = if slices > 1 { c.tensor_rank } else { 0 };
            if let Some(eg) = &core_grid {
                (c.expert_rank, slice) = eg.coords(grid, r);
            }
            let experts = moe_layers
                .iter()
                .filter(|m| m.stage == c.pipeline_rank)
                .map(|m| {
                    let first = c.expert_rank * m.experts_per_rank;
                    let lo = slice * m.hidden_per_rank;
                    HeldExperts {
                        layer: m.layer,
                        ids: (first..first + m.experts_per_rank).collect(),
                        hidden: [lo, lo + m.hidden_per_rank],
                    }
                })
                .collect();
            RankPlan {
                rank: r,
                node: r / gpn,
                tensor_rank: c.tensor_rank,
                pipeline_rank: c.pipeline_rank,
                data_rank: c.data_rank,
                expert_rank: c.expert_rank,
                experts,
                memory_bytes: costed.stages[c.pipeline_rank as usize].memory.total,
            }
        })
        .collect()
}

/// Every stage's layers (its model chunks with virtual stages) and costs.
fn stage_plans(grid: &Grid, depth: u64, costed: &cost::Costed) -> Vec<Stage> {
    costed
        .stages
        .iter()
        .enumerate()
        .map(|(s, c)| {
            let chunks = grid.chunks_of(s as u64, depth);
            Stage {
                stage: s as u64,
                first_layer: chunks[0][0],
                end_layer: chunks[0][1],
                chunks: if grid.virtual_stages > 1 {
                    chunks
                } else {
                    Vec::new()
                },
                embedding: s == 0,
                head: s as u64 == grid.pipeline - 1,
                cost: c.clone(),
            }
        })
        .collect()
}

/// The placement's warnings, and the layout's: tensor groups across hosts, a large bubble,
/// FasterMoE's options that cannot act.
fn layout_warnings(
    checked: &Checked,
    grid: &Grid,
    costed: &cost::Costed,
    placement_warnings: Vec<Diagnostic>,
) -> Vec<Diagnostic> {
    let par = &checked.parallel;
    let gpn = gpus_per_node(par);
    let mut warnings = placement_warnings;
    if grid.tensor > 1 && (grid.tensor > gpn || gpn % grid.tensor != 0) {
        warnings.push(diagnostics::tensor_across_hosts(
            (grid.tensor, par.spans.tensor),
            gpn,
        ));
    }
    if costed.time.bubble_fraction > 0.5 {
        let at = checked
            .train
            .as_ref()
            .map_or(par.spans.pipeline, |t| t.spans.batch);
        warnings.push(diagnostics::large_bubble(
            costed.time.bubble_fraction,
            costed.micro_batches,
            (grid.pipeline, grid.virtual_stages),
            at,
        ));
    }
    fastermoe_warnings(par, grid, &mut warnings);
    warnings
}

/// FasterMoE's part of the plan, where the file turns an option on or the routing is skewed:
/// each MoE layer's exchange, in layer order.
fn fastermoe_plan(
    par: &Parallel,
    routing_skew: Option<f64>,
    costed: &cost::Costed,
) -> Option<FasterMoePlan> {
    (!par.smart_schedule.is_off() || !par.shadowing.is_off() || routing_skew.is_some()).then(|| {
        FasterMoePlan {
            smart_schedule: par.smart_schedule,
            shadowing: par.shadowing,
            routing_skew: routing_skew.unwrap_or(1.0),
            layers: {
                // in layer order: with virtual stages a stage's layers are not contiguous
                let mut layers: Vec<LayerExchange> = costed
                    .stages
                    .iter()
                    .flat_map(|s| s.exchanges.iter().cloned())
                    .collect();
                layers.sort_by_key(|x| x.layer);
                layers
            },
        }
    })
}
