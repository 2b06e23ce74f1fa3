//! Multi-rank training: the world a run is split over (from the planner's groups and
//! expert placement), one rank's context, its share of the experts, and the
//! expert-parallel MoE feed-forward that the trainer hooks into the model.
//!
//! Owns: [`WorldPlan`] (what the runtime takes from the one [`crate::plan::ParallelPlan`] the
//! planner makes for a run, [`plan_world_with`] for ranks and [`plan_alone`] for one device:
//! a [`GroupLayout`], the tensor groups, one [`ExpertPlacement`] per MoE layer, the
//! micro-batch, one rank's memory and what stays in bf16 under `precision = fp8`, with
//! pipeline = 1: Megatron-LM's tensor × data grid, experts over the data ranks of each tensor
//! rank; the runtime never re-derives any of them), [`RankContext`] (a
//! rank's [`Groups`] and that plan, and the experts it holds), [`param_kinds`] (how each parameter's gradient is
//! shared), [`ExpertParallel`] (the MoE layer across the expert group with autograd cut at
//! the exchange, recorded on a [`Tape`]) and [`run_in_process`] (N ranks on threads, the
//! `local` backend). It must not know about the command line, files or NCCL setup: the
//! trainer ([`super::train`]) decides what runs on which rank; the collective layer moves
//! the tensors.
//!
//! # Forward and backward of one MoE block on a rank
//! ```text
//! x (residual after attention) ──cut A──▶ xl ──norm──▶ h ──cut A'──▶ hl ──gate (seeded per
//! micro-batch and layer)──▶ routing ──sort by slot──▶ tokens ──exchange_experts──▶ ys
//! out = xl + Σ_slots cut_B(weight) · ys (+ shared(hl)); balance = cut_B(balance loss)
//! ```
//! The backward replays B (reverse all-to-alls, one pass through gate and dispatch), then
//! A' (norm), then A (attention and everything up to the previous MoE block).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use crate::check::{Checked, ExpertGroup};
use crate::collective::local::{local_tensor_groups, local_world, run_ranks};
use crate::collective::{
    exchange_experts_with, CollectiveError, ErrorKind, ExpertPlacement, GroupLayout, Groups,
    ParamKind, Tape,
};
use crate::diag::Diagnostic;
use crate::plan::{self, Memory, MemoryModel, MoeLayerPlan, Overrides, ParallelPlan};
use crate::runtime::model::{ModelPart, MoeHook, NormLayer, Transformer};
use crate::runtime::moe::{self, MoeLayer, Telemetry};
use crate::runtime::train::{RunOptions, RunSummary};

/// The split of one run over its ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct WorldPlan {
    pub layout: GroupLayout,
    /// The tensor(-parallel) groups, partitioning the world (consecutive runs of `tensor`
    /// ranks, Megatron-LM's; one rank each with tensor = 1).
    pub tensor: Vec<Vec<usize>>,
    /// Whether routed experts are sliced over the tensor ranks (the plan's `expert_slicing`;
    /// false with tensor = 1).
    pub expert_slicing: bool,
    /// Per MoE layer (block index): which experts each position of an expert group of the
    /// layer's stage holds.
    pub placements: BTreeMap<usize, ExpertPlacement>,
    /// What each pipeline stage holds (one whole-model part without a pipeline).
    pub parts: Vec<ModelPart>,
    /// Model chunks per stage (the interleaved schedule with more than one).
    pub virtual_stages: usize,
    /// What the runtime changed in the file's `parallel` block (said once by rank 0).
    pub notes: Vec<String>,
    /// The planner's warnings about this layout (what `fmoec plan` with the same options
    /// warns about), for the command line to report once.
    pub warnings: Vec<Diagnostic>,
    /// The planner's micro-batch for this layout (sequences per data rank), the one the run
    /// uses when the file gives none; `None`: plans made without the planner.
    pub micro_batch: Option<u64>,
    /// The planner's memory of one rank of each stage for `fmoec run` (`--memory-model
    /// fmoec`); empty: plans made without the planner.
    pub memory: Vec<Memory>,
    /// FasterMoE's smart schedule and shadowing as planned (`None`: the plain exchange).
    pub fastermoe: Option<plan::FasterMoePlan>,
    /// Under `precision = fp8`: what the planner keeps in bf16 on this layout at its
    /// micro-batch (`fmoec plan`'s `fp8_fallbacks`); `None` for other precisions and plans made
    /// without the planner (see [`WorldPlan::fp8_fallbacks_for`]).
    pub fp8_fallbacks: Option<plan::cost::Fp8Fallbacks>,
}

/// What `fmoec run` asks of the layout besides the world size, like `fmoec plan`'s options
/// (`None`: the file's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayoutChoice {
    pub expert_group: Option<ExpertGroup>,
    pub tensor: Option<u64>,
    pub pipeline: Option<u64>,
    pub virtual_stages: Option<u64>,
}

/// The runtime's overrides of the file's `parallel` block for a world of `world` ranks: the
/// world size (like `fmoec plan --world`), the layout's choices (`--tensor`, `--pipeline`,
/// `--virtual-stages`, `--expert-group`; the file's where not given), and the runtime's own
/// memory model (`fmoec plan --memory-model fmoec`).
pub fn overrides(world: u64, choice: LayoutChoice) -> Overrides {
    Overrides {
        world: Some(world),
        tensor: choice.tensor,
        pipeline: choice.pipeline,
        expert_group: choice.expert_group,
        micro_batch: None,
        virtual_stages: choice.virtual_stages,
        memory_model: Some(MemoryModel::Fmoec),
        routing_skew: None,
    }
}

/// Plans `checked` on `world` ranks with [`overrides`] and the file's tensor and pipeline
/// sizes; the planner's diagnostics on failure.
pub fn plan_world(
    checked: &Checked,
    world: u64,
    expert_group: Option<ExpertGroup>,
) -> Result<WorldPlan, Vec<Diagnostic>> {
    plan_world_with(checked, world, expert_group, None)
}

/// [`plan_world`] with the tensor size `tensor` instead of the file's (`None`: the file's).
pub fn plan_world_with(
    checked: &Checked,
    world: u64,
    expert_group: Option<ExpertGroup>,
    tensor: Option<u64>,
) -> Result<WorldPlan, Vec<Diagnostic>> {
    let choice = LayoutChoice {
        expert_group,
        tensor,
        ..LayoutChoice::default()
    };
    plan_world_layout(checked, world, choice)
}

/// Plans `checked` on `world` ranks with the layout `choice` (the file's where it says
/// nothing), as `fmoec plan --world N --memory-model fmoec` with the same options does.
pub fn plan_world_layout(
    checked: &Checked,
    world: u64,
    choice: LayoutChoice,
) -> Result<WorldPlan, Vec<Diagnostic>> {
    let plan = plan::build_with(checked, &overrides(world, choice))?;
    let mut world_plan = WorldPlan::from_plan(&plan).map_err(|e| runtime_refused(checked, e))?;
    let p = &checked.parallel;
    if p.declared && (plan.tensor != p.tensor || plan.pipeline != p.pipeline) {
        let mut said = Vec::new();
        if plan.tensor != p.tensor {
            said.push(format!(
                "tensor = {} (the file says {})",
                plan.tensor, p.tensor
            ));
        }
        if plan.pipeline != p.pipeline {
            said.push(format!(
                "pipeline = {} (the file says {})",
                plan.pipeline, p.pipeline
            ));
        }
        world_plan
            .notes
            .push(format!("running {}, data = {}", said.join(", "), plan.data));
    }
    if p.declared && p.gpus != world {
        world_plan.notes.push(format!(
            "running on {world} rank(s) instead of the file's gpus = {}",
            p.gpus
        ));
    }
    Ok(world_plan)
}

/// The plan of a run alone on one device: one GPU of the file's kind (`fmoec plan --world 1
/// --tensor 1 --pipeline 1 --expert-group replicated --memory-model fmoec`). When only memory
/// stands in the way (the file's GPU cannot hold the model alone, the machine this runs on
/// may), the plan of such a GPU without a memory limit, with a note: the run then judges the
/// fit by the machine's own free memory ([`crate::runtime::fit`]).
pub fn plan_alone(checked: &Checked) -> Result<WorldPlan, Vec<Diagnostic>> {
    let alone = overrides(
        1,
        LayoutChoice {
            expert_group: Some(ExpertGroup::Replicated),
            tensor: Some(1),
            pipeline: Some(1),
            virtual_stages: None,
        },
    );
    let mut world_plan = plan_alone_with(checked, &alone)?;
    let p = &checked.parallel;
    if p.declared && (p.tensor > 1 || p.pipeline > 1) {
        world_plan.notes.insert(
            0,
            format!(
                "one device: the file's tensor = {} x pipeline = {} runs as one rank holding the \
                 whole model (--ranks N or --gpus N runs its layout)",
                p.tensor, p.pipeline
            ),
        );
    }
    Ok(world_plan)
}

fn plan_alone_with(checked: &Checked, alone: &Overrides) -> Result<WorldPlan, Vec<Diagnostic>> {
    let plan = match plan::build_with(checked, alone) {
        Ok(plan) => plan,
        Err(diags)
            if diags
                .iter()
                .all(|d| d.code == plan::diagnostics::OUT_OF_MEMORY) =>
        {
            let mut unlimited = checked.clone();
            unlimited.parallel.hardware.memory_bytes = u64::MAX;
            let mut plan = plan::build_with(&unlimited, alone)?;
            plan.hardware = checked.parallel.hardware.clone();
            let mut world_plan =
                WorldPlan::from_plan(&plan).map_err(|e| runtime_refused(checked, e))?;
            world_plan.notes.push(format!(
                "one `{}` ({}) cannot hold this model alone: the planner estimates {} for it \
                 (`fmoec plan --world 1 --memory-model fmoec`); running anyway where it fits",
                checked.parallel.hardware.name,
                plan::render::bytes(checked.parallel.hardware.memory_bytes),
                plan::render::bytes(world_plan.memory.first().map_or(0, |m| m.total))
            ));
            return Ok(world_plan);
        }
        Err(diags) => return Err(diags),
    };
    WorldPlan::from_plan(&plan).map_err(|e| runtime_refused(checked, e))
}

/// The planner's plan is one the runtime cannot use (a located error at `gpus`).
fn runtime_refused(checked: &Checked, e: anyhow::Error) -> Vec<Diagnostic> {
    vec![Diagnostic::error(
        "P0900",
        checked.parallel.spans.gpus,
        format!("the runtime cannot use this plan: {e:#}"),
    )]
}

/// Renders planner diagnostics as one error (for callers without the source text).
pub fn diagnostics_error(diags: &[Diagnostic]) -> anyhow::Error {
    let lines: Vec<String> = diags
        .iter()
        .map(|d| {
            let mut line = format!("[{}] {}", d.code, d.message);
            if let Some(help) = &d.help {
                line.push_str(&format!(" (help: {help})"));
            }
            line
        })
        .collect();
    anyhow::anyhow!("no plan for this world: {}", lines.join("; "))
}

fn ranks_of(lists: &[Vec<u64>]) -> Vec<Vec<usize>> {
    lists
        .iter()
        .map(|g| g.iter().map(|&r| r as usize).collect())
        .collect()
}

/// The plan's tensor groups, checked to split the world into groups of its tensor size.
fn tensor_groups_of(plan: &ParallelPlan) -> Result<Vec<Vec<usize>>> {
    let tensor = ranks_of(&plan.groups.tensor);
    let mut seen = vec![0usize; plan.world as usize];
    for &r in tensor.iter().flatten() {
        match seen.get_mut(r) {
            Some(c) => *c += 1,
            None => bail!("the plan's tensor groups name rank {r} outside the world"),
        }
    }
    if seen.iter().any(|&c| c != 1) || tensor.iter().any(|g| g.len() != plan.tensor as usize) {
        bail!(
            "the plan's tensor groups {:?} do not split the world into groups of {}",
            tensor,
            plan.tensor
        );
    }
    Ok(tensor)
}

/// The plan's groups as the collective layer takes them, validated, with as many stages as
/// the plan's pipeline.
fn layout_of(plan: &ParallelPlan) -> Result<GroupLayout> {
    // The planner lists embedding groups for the first and last stages only; the
    // collective layer wants every rank in one (a middle stage's rank alone).
    let mut embedding = ranks_of(&plan.groups.embedding);
    for r in 0..plan.world as usize {
        if !embedding.iter().any(|g| g.contains(&r)) {
            embedding.push(vec![r]);
        }
    }
    let layout = GroupLayout {
        world: plan.world as usize,
        data: ranks_of(&plan.groups.data),
        expert: ranks_of(&plan.groups.expert),
        expert_data: ranks_of(&plan.groups.expert_data),
        gate: ranks_of(&plan.groups.gate),
        pipeline: ranks_of(&plan.groups.pipeline),
        embedding,
    };
    layout.validate()?;
    if layout.stages() != plan.pipeline as usize || plan.stages.len() != layout.stages() {
        bail!(
            "the plan's pipeline groups have {} stages, its pipeline is {}",
            layout.stages(),
            plan.pipeline
        );
    }
    Ok(layout)
}

/// What each of the plan's stages holds: its layers (in model chunks with virtual stages),
/// and whether the embedding and the head.
fn parts_of(plan: &ParallelPlan) -> Vec<ModelPart> {
    plan.stages
        .iter()
        .map(|s| {
            let chunks = if s.chunks.is_empty() {
                std::iter::once(s.first_layer as usize..s.end_layer as usize).collect()
            } else {
                s.chunks
                    .iter()
                    .map(|c| c[0] as usize..c[1] as usize)
                    .collect()
            };
            ModelPart {
                chunks,
                embedding: s.embedding,
                head: s.head,
            }
        })
        .collect()
}

/// The expert placement of MoE layer `layer`: what each position of the first expert group
/// of its stage holds, checked against every rank's experts and the layer's expert count.
fn placement_of(
    plan: &ParallelPlan,
    layout: &GroupLayout,
    layer: &MoeLayerPlan,
) -> Result<ExpertPlacement> {
    // the first expert group of the layer's stage (every expert group lies in one)
    let stage = layer.stage as usize;
    let Some(first) = layout
        .expert
        .iter()
        .find(|g| g.first().is_some_and(|&r| layout.stage_of(r) == stage))
    else {
        bail!("layer {}: no expert group on stage {stage}", layer.layer);
    };
    let held = |rank: usize| -> Vec<usize> {
        plan.ranks
            .get(rank)
            .and_then(|r| r.experts.iter().find(|h| h.layer == layer.layer))
            .map(|h| h.ids.iter().map(|&e| e as usize).collect())
            .unwrap_or_default()
    };
    let positions: Vec<Vec<usize>> = first.iter().map(|&r| held(r)).collect();
    // Every expert group of the stage must hold the experts the same way (position
    // p of each group holds what position p of the first holds), the others none.
    for group in &layout.expert {
        let on_stage = group.iter().all(|&r| layout.stage_of(r) == stage);
        for (p, &r) in group.iter().enumerate() {
            if !on_stage && !held(r).is_empty() {
                bail!(
                    "layer {}: rank {r} of stage {} holds experts {:?} of a layer of stage {stage}",
                    layer.layer,
                    layout.stage_of(r),
                    held(r)
                );
            }
            if on_stage && held(r) != positions[p] {
                bail!(
                    "layer {}: rank {r} holds experts {:?}, but position {p} of the first expert group holds {:?}",
                    layer.layer,
                    held(r),
                    positions[p]
                );
            }
        }
    }
    let placement = ExpertPlacement::new(positions)
        .map_err(|e| anyhow::anyhow!("layer {}: {e}", layer.layer))?;
    if placement.experts() != layer.experts as usize {
        bail!(
            "layer {}: the placement holds {} experts, the layer has {}",
            layer.layer,
            placement.experts(),
            layer.experts
        );
    }
    Ok(placement)
}

impl WorldPlan {
    /// The groups, stages and expert placement of a plan.
    pub fn from_plan(plan: &ParallelPlan) -> Result<WorldPlan> {
        let tensor = tensor_groups_of(plan)?;
        let layout = layout_of(plan)?;
        let parts = parts_of(plan);
        let placements = plan
            .moe_layers
            .iter()
            .map(|layer| Ok((layer.layer, placement_of(plan, &layout, layer)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(WorldPlan {
            layout,
            tensor,
            expert_slicing: plan.expert_slicing && plan.tensor > 1,
            placements,
            parts,
            virtual_stages: plan.virtual_stages as usize,
            notes: Vec::new(),
            warnings: plan.warnings.clone(),
            micro_batch: Some(plan.micro_batch),
            memory: plan.stages.iter().map(|s| s.cost.memory).collect(),
            fastermoe: plan.fastermoe.clone(),
            fp8_fallbacks: plan.fp8_fallbacks.clone(),
        })
    }

    /// Pipeline stages.
    pub fn stages(&self) -> usize {
        self.parts.len().max(1)
    }

    /// Ranks per tensor group (1 without tensor parallelism).
    pub fn tensor_size(&self) -> usize {
        self.tensor.first().map_or(1, Vec::len)
    }

    /// Data parallelism with expert groups of `expert_group` consecutive ranks and FastMoE's
    /// contiguous placement, without the planner (tests, or placements of one's own).
    pub fn data_parallel(
        checked: &Checked,
        world: usize,
        expert_group: usize,
    ) -> Result<WorldPlan> {
        let layout = GroupLayout::data_parallel(world, expert_group)?;
        let mut placements = BTreeMap::new();
        for (layer, moe) in checked.model.moe_layers() {
            placements.insert(
                layer,
                ExpertPlacement::contiguous(moe.experts as usize, expert_group)
                    .map_err(|e| anyhow::anyhow!("layer {layer}: {e}"))?,
            );
        }
        Ok(WorldPlan {
            layout,
            tensor: (0..world).map(|r| vec![r]).collect(),
            expert_slicing: false,
            placements,
            parts: vec![ModelPart::whole(checked.model.layers.len())],
            virtual_stages: 1,
            notes: Vec::new(),
            warnings: Vec::new(),
            micro_batch: None,
            memory: Vec::new(),
            fastermoe: None,
            fp8_fallbacks: None,
        })
    }

    /// What a run of `model` on `hardware` keeps in bf16 under `precision = fp8` (`dense`:
    /// with `fp8_dense`) on this layout at `tokens` a micro-batch, before the overrides
    /// ([`crate::runtime::fp8::with_overrides`]): the planner's choice where the planner made
    /// this plan (at its micro-batch, which is the run's), else the planner's rule
    /// ([`plan::cost::fp8_fallbacks`]) for this layout's tensor split and expert placement.
    pub fn fp8_fallbacks_for(
        &self,
        model: &crate::check::Model,
        hardware: &crate::check::Hardware,
        dense: bool,
        tokens: u64,
    ) -> plan::cost::Fp8Fallbacks {
        if let Some(planned) = &self.fp8_fallbacks {
            return planned.clone();
        }
        let tensor = self.tensor_size() as u64;
        let layout = plan::cost::Fp8Layout {
            dense,
            tensor,
            expert_parallel: self.placements.values().next().map_or(1, |p| p.ranks()) as u64,
            expert_slices: if self.expert_slicing { tensor } else { 1 },
            tokens,
        };
        plan::cost::fp8_fallbacks(model, hardware, &layout)
    }
}

/// One rank's handles and the plan it runs.
pub struct RankContext {
    pub groups: Groups,
    pub plan: WorldPlan,
    /// Where this rank's tensors live (its GPU, or the CPU for in-process ranks).
    pub device: tch::Device,
    /// Bound on every collective's wait.
    pub timeout: Duration,
    /// Ranks of the run whose memory is this rank's device's (the in-process ranks of one
    /// host, the CPU ranks one machine started; 1 for a GPU), for the memory check.
    pub ranks_sharing_device: usize,
}

impl RankContext {
    pub fn rank(&self) -> usize {
        self.groups.rank()
    }

    pub fn world(&self) -> usize {
        self.groups.world()
    }

    /// Ranks in this rank's tensor group (1 without tensor parallelism).
    pub fn tensor_size(&self) -> usize {
        self.groups.tensor().size()
    }

    /// Sums `t` over the whole world, in place: over the ranks of this rank's stage (the
    /// gate group), then over the stages (the pipeline group).
    pub fn all_reduce_world(&self, t: &mut Tensor, at: &str) -> Result<()> {
        self.groups.gate().all_reduce_sum(t, at)?;
        if self.stages() > 1 {
            self.groups.pipeline().all_reduce_sum(t, at)?;
        }
        Ok(())
    }

    /// Pipeline stages of the run.
    pub fn stages(&self) -> usize {
        self.plan.stages()
    }

    /// This rank's pipeline stage.
    pub fn stage(&self) -> usize {
        self.groups.pipeline().rank()
    }

    /// What of the model this rank holds.
    pub fn part(&self) -> &ModelPart {
        &self.plan.parts[self.stage().min(self.plan.parts.len() - 1)]
    }

    /// Ranks that split the batch (the world divided by the tensor and pipeline sizes).
    pub fn data_size(&self) -> usize {
        self.groups.data().size()
    }

    pub fn data_rank(&self) -> usize {
        self.groups.data().rank()
    }

    pub fn expert_group_size(&self) -> usize {
        self.groups.expert().size()
    }

    /// The global experts this rank holds in MoE layer `layer`, in local order (none of a
    /// layer on another pipeline stage).
    pub fn local_experts(&self, layer: usize) -> &[usize] {
        if !self.part().holds_layer(layer) {
            return &[];
        }
        self.plan
            .placements
            .get(&layer)
            .map(|p| p.local_experts(self.groups.expert().rank()))
            .unwrap_or_default()
    }
}

/// How each parameter of the store (in order) is shared between ranks: routed experts,
/// gates, everything else replicated (shared experts included).
pub fn param_kinds(model: &Transformer) -> Vec<ParamKind> {
    model
        .store
        .params
        .iter()
        .map(|p| param_kind(&p.name))
        .collect()
}

/// The kind of the parameter named `name` (`layers.3.ffn.experts.w1` is an expert tensor).
pub fn param_kind(name: &str) -> ParamKind {
    if name.contains(".ffn.experts.") {
        ParamKind::Expert
    } else if name.contains(".ffn.gate.") {
        ParamKind::Gate
    } else {
        ParamKind::Replicated
    }
}

/// The expert-parallel MoE feed-forward of one forward pass: the hook the trainer gives
/// [`Transformer::forward_with`]. Training passes keep a [`Tape`]; run
/// [`ExpertParallel::backward`] once on the pass's loss.
pub struct ExpertParallel<'a> {
    ctx: &'a RankContext,
    tape: Option<Tape>,
    at: String,
}

impl<'a> ExpertParallel<'a> {
    /// `train`: record the cuts for a backward. `at` labels the collectives
    /// (`"step 12, micro-batch 3"`).
    pub fn new(ctx: &'a RankContext, train: bool, at: String) -> ExpertParallel<'a> {
        ExpertParallel {
            ctx,
            tape: train.then(Tape::new),
            at,
        }
    }

    /// Backpropagates `loss` through every segment and exchange of the pass.
    pub fn backward(self, loss: &Tensor) -> Result<()> {
        let at = format!("{} backward", self.at);
        match self.tape {
            Some(tape) => tape.backward(loss, self.ctx.groups.expert(), &at)?,
            None => bail!("internal error: backward of a pass run without a tape"),
        }
        Ok(())
    }

    fn cut(&mut self, t: &Tensor, new_step: bool) -> Result<Tensor> {
        match &mut self.tape {
            Some(tape) => {
                if new_step {
                    tape.step();
                }
                Ok(tape.cut(t)?)
            }
            None => Ok(t.shallow_clone()),
        }
    }
}

impl MoeHook for ExpertParallel<'_> {
    fn moe(
        &mut self,
        index: usize,
        layer: &MoeLayer,
        norm: &NormLayer,
        x: &Tensor,
        train: bool,
        key: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Telemetry)> {
        let placement = self
            .ctx
            .plan
            .placements
            .get(&index)
            .with_context(|| format!("no expert placement for MoE layer {index}"))?;
        let (b, t, d) = x.size3()?;
        let tokens = b * t;
        let xl = self.cut(&x.f_reshape([tokens, d])?, true)?;
        let h = norm.forward(&xl)?;
        let hl = self.cut(&h, true)?;
        let routing = layer.gate.route(&hl, train, key)?;
        let dispatch = Dispatch::sorted_by_slot(&routing, placement, layer.gate.experts, &hl)?;

        if let Some(tape) = &mut self.tape {
            tape.step();
        }
        let weight = self.cut(&routing.weight, false)?;
        let balance = self.cut(&routing.balance_loss, false)?;
        let (ys, shadowed) = self.exchange(index, layer, placement, &dispatch, hl.device())?;
        let mut out = dispatch.weighted_sum(&ys, &weight, tokens, d, hl.device())?;
        if let Some(shared) = &layer.shared {
            out = out.f_add(&shared.forward(&hl)?)?;
        }
        let y = xl.f_add(&out)?.f_reshape([b, t, d])?;
        let mut telemetry = tch::no_grad(|| {
            let per_expert = dispatch.per_slot.f_index_select(0, &dispatch.slot_table)?;
            moe::telemetry(&routing, &per_expert, tokens)
        })?;
        telemetry.shadowed = shadowed;
        Ok((y, balance, telemetry))
    }
}

impl ExpertParallel<'_> {
    /// MoE layer `index`'s exchange of `dispatch`'s rows over the expert group, with
    /// FasterMoE's chunks and shadowing where the plan asks for them, recorded on the tape.
    /// The experts' outputs (in `dispatch`'s order) and, with shadowing, which experts ran
    /// on replicas.
    fn exchange(
        &mut self,
        index: usize,
        layer: &MoeLayer,
        placement: &ExpertPlacement,
        dispatch: &Dispatch,
        device: tch::Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let ctx = self.ctx;
        let at = format!("{}, layer {index}", self.at);
        let schedule = moe::LayerSchedule::of(ctx.plan.fastermoe.as_ref(), index);
        let (ys, exchange) = exchange_experts_with(
            ctx.groups.expert(),
            placement,
            &dispatch.send,
            &dispatch.counts,
            &at,
            schedule.options(),
            &moe::RankExperts(&layer.experts),
        )?;
        let shadowed = schedule.shadowed(&exchange, layer.gate.experts, device)?;
        if let Some(tape) = &mut self.tape {
            tape.record(exchange);
        }
        Ok((ys, shadowed))
    }
}

/// One MoE layer's token copies on this rank, sorted by the slot of their expert in the
/// placement's order, as the exchange takes them.
struct Dispatch {
    /// Each global expert's slot.
    slot_table: Tensor,
    /// Kept copies per slot, `[E]` on the device.
    per_slot: Tensor,
    /// The same on the CPU.
    counts: Vec<i64>,
    /// The kept copies (positions in the flattened `[T * k]` routing), by slot.
    sent: Tensor,
    /// The token of each sent copy.
    token: Tensor,
    /// The sent copies' rows of the layer's normed input.
    send: Tensor,
}

impl Dispatch {
    /// `routing`'s copies of `hl`'s rows sorted by slot (`experts`: the layer's global
    /// count).
    fn sorted_by_slot(
        routing: &moe::Routing,
        placement: &ExpertPlacement,
        experts: i64,
        hl: &Tensor,
    ) -> Result<Dispatch> {
        let k = routing.expert.size()[1];
        let device = hl.device();
        // Slots in the placement's order; dropped slots (-1) sort past the last one.
        let slot_table = Tensor::f_from_slice(&placement.slot_of_expert())?.f_to_device(device)?;
        let flat = routing.expert.f_reshape([-1])?;
        let valid = flat.f_ge(0)?;
        let slot = slot_table
            .f_index_select(0, &flat.f_clamp_min(0)?)?
            .f_where_scalarother(&valid, experts)?;
        let order = slot.f_argsort_stable(true, 0, false)?;
        let per_slot = moe::counts_of(&slot, experts + 1)?.f_narrow(0, 0, experts)?;
        let counts = Vec::<i64>::try_from(&per_slot.f_to_device(tch::Device::Cpu)?)?;
        let kept: i64 = counts.iter().sum();
        let sent = order.f_narrow(0, 0, kept)?;
        let token = sent.f_div_scalar_mode(k, "floor")?;
        let send = hl.f_index_select(0, &token)?;
        Ok(Dispatch {
            slot_table,
            per_slot,
            counts,
            sent,
            token,
            send,
        })
    }

    /// The experts' outputs `ys` (one row per sent copy) weighted by the copies' combine
    /// `weight` and summed per token: `[tokens, d]` on `device`.
    fn weighted_sum(
        &self,
        ys: &Tensor,
        weight: &Tensor,
        tokens: i64,
        d: i64,
        device: tch::Device,
    ) -> Result<Tensor> {
        let w = weight
            .f_reshape([-1])?
            .f_index_select(0, &self.sent)?
            .f_to_kind(ys.kind())?;
        let weighted = ys.f_mul(&w.f_unsqueeze(1)?)?;
        Ok(
            Tensor::f_zeros([tokens, d], (ys.kind(), device))?.f_index_add(
                0,
                &self.token,
                &weighted,
            )?,
        )
    }
}

/// The first error of a multi-rank run worth showing: a rank's own failure rather than
/// the "peer gone" its failure caused in the others. An error every one of the `world` ranks
/// hit alike (a bad `--out`, a missing data file) is the run's, said without a rank.
pub fn first_error(errors: Vec<(usize, anyhow::Error)>, world: usize) -> Option<anyhow::Error> {
    let is_echo = |e: &anyhow::Error| {
        e.chain().any(|c| {
            c.downcast_ref::<CollectiveError>()
                .is_some_and(|ce| matches!(ce.kind.as_ref(), ErrorKind::PeerGone { .. }))
        })
    };
    let every_rank_alike = errors.len() == world
        && errors
            .windows(2)
            .all(|pair| format!("{:#}", pair[0].1) == format!("{:#}", pair[1].1));
    if every_rank_alike {
        return errors.into_iter().next().map(|(_, e)| e);
    }
    let position = errors
        .iter()
        .position(|(_, e)| !is_echo(e))
        .unwrap_or_default();
    errors
        .into_iter()
        .nth(position)
        .map(|(rank, e)| e.context(format!("rank {rank} failed")))
}

/// Trains on `plan.layout.world` in-process ranks (threads, the `local` backend, CPU).
/// Returns every rank's summary (rank 0's wrote the files); the first real error otherwise.
pub fn run_in_process(
    checked: &Checked,
    opts: &RunOptions,
    plan: &WorldPlan,
    timeout: Duration,
) -> Result<Vec<RunSummary>> {
    if !matches!(opts.device, tch::Device::Cpu) {
        bail!("in-process ranks (--ranks N) run on the CPU; for GPUs use --gpus N");
    }
    let mut world = local_world(&plan.layout, timeout)?;
    if plan.tensor_size() > 1 {
        let handles = local_tensor_groups(plan.layout.world, &plan.tensor, timeout)?;
        for (groups, handle) in world.iter_mut().zip(handles) {
            groups.set_tensor(Box::new(handle))?;
        }
    }
    let results = run_ranks(world, |groups| {
        let rank = groups.rank();
        let ctx = RankContext {
            groups,
            plan: plan.clone(),
            device: tch::Device::Cpu,
            timeout,
            ranks_sharing_device: plan.layout.world,
        };
        (
            rank,
            crate::runtime::train::train_ranked(checked, opts, &ctx),
        )
    });
    let mut summaries = Vec::new();
    let mut errors = Vec::new();
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Ok((_, Ok(summary))) => summaries.push(summary),
            Ok((r, Err(e))) => errors.push((r, e)),
            Err(_) => errors.push((rank, anyhow::anyhow!("the rank's thread panicked"))),
        }
    }
    match first_error(errors, plan.layout.world) {
        Some(e) => Err(e),
        None => Ok(summaries),
    }
}
