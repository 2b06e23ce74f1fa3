//! What a model asks of a Megatron-LM target, checked against the target's declared
//! capabilities (`check::targets::CAPABILITIES`, `stdlib/megatron.fmoe`).
//!
//! Every diagnostic here is generated from the capabilities: a value the model uses that the
//! target does not list is an error at the place the file asks for it, naming the targets that
//! have it; where Megatron has a stand-in (fp16 for bf16, its own dense MLP) it is a warning
//! saying what trains instead. No rule is written for one release.
//!
//! Knows nothing about templates, patches or any particular release.

use super::act_name;
use crate::check::{
    Activation, Checked, ExpertGroup, Ffn, Gate, GateKind, MegatronTarget, Norm, Positions,
    Precision,
};
use crate::diag::{Diagnostic, Span};
use crate::plan::ParallelPlan;

/// One thing the model asks of a target: a value of one capability, and where it asks.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    /// The capability (`norm`, `precision`, ...).
    pub field: &'static str,
    /// The value's name as the declarations write it (`rmsnorm`, `false`, `bf16`).
    pub value: String,
    /// How a message names it: "RMSNorm (`norm = rmsnorm`)".
    pub what: String,
    pub span: Span,
}

pub(super) fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Fp16 => "fp16",
        Precision::Bf16 => "bf16",
        Precision::Fp8 { .. } => "fp8",
    }
}

/// What the model file and its plan ask for, each value once per place it is written (layers
/// assigned by one selection share their spans). Dense MLPs are left to [`dense_mlp`].
pub fn asks(c: &Checked, plan: &ParallelPlan) -> Vec<Ask> {
    let mut out = Asks::default();
    model_asks(c, &mut out);
    moe_asks(c, &mut out);
    placement_asks(c, plan, &mut out);
    if let Some(t) = &c.train {
        let p = precision_name(t.precision);
        out.ask("precision", p, p.to_string(), t.spans.precision);
    }
    once_each(out.0)
}

/// The asks of [`asks`], in the order they are found.
#[derive(Default)]
struct Asks(Vec<Ask>);

impl Asks {
    fn ask(&mut self, field: &'static str, value: &str, what: String, span: Span) {
        self.0.push(Ask {
            field,
            value: value.to_string(),
            what,
            span,
        });
    }
}

/// The model's own properties: normalisation, positions, attention, biases, the LM head.
fn model_asks(c: &Checked, out: &mut Asks) {
    let m = &c.model;
    let at = m.spans.name;
    match m.norm {
        Norm::LayerNorm => out.ask("norm", "layernorm", "LayerNorm".into(), at),
        Norm::RmsNorm => out.ask("norm", "rmsnorm", "RMSNorm (`norm = rmsnorm`)".into(), at),
    }
    match m.positions {
        Positions::Learned => out.ask("positions", "learned", "learned positions".into(), at),
        Positions::Rotary => out.ask(
            "positions",
            "rotary",
            "rotary position embeddings (`positions = rotary`)".into(),
            at,
        ),
    }
    if m.attention.kv_heads == m.attention.heads {
        out.ask("attention", "multi_head", "multi-head attention".into(), at);
    } else {
        let what = format!(
            "grouped-query attention ({} key/value heads for {} heads)",
            m.attention.kv_heads, m.attention.heads
        );
        out.ask("attention", "grouped_query", what, at);
    }
    if m.bias {
        out.ask("bias", "true", "linear layers with biases".into(), at);
    } else {
        let what = "linear layers without bias (`bias = false`)";
        out.ask("bias", "false", what.into(), at);
    }
    if m.tied_embeddings {
        out.ask("tied_embeddings", "true", "tied LM head".into(), at);
    } else {
        let what = "untied LM head (`tied_embeddings = false`)";
        out.ask("tied_embeddings", "false", what.into(), at);
    }
}

/// Each MoE layer's experts' activation, gate and shared experts, where the layer writes them.
fn moe_asks(c: &Checked, out: &mut Asks) {
    for (_, moe) in c.model.moe_layers() {
        let act = act_name(moe.expert.act);
        out.ask("expert_act", act, format!("{act} experts"), moe.expert.span);
        let gate = crate::emit::gate_name(moe.gate.kind);
        out.ask("gates", gate, format!("{gate} gate"), moe.gate.span);
        if moe.shared.is_some() {
            let call = moe.spans.call;
            out.ask("shared_experts", "true", "shared experts".into(), call);
            if c.model.bias {
                let what = "shared experts with biases";
                out.ask("shared_expert_bias", "true", what.into(), call);
            }
        }
    }
}

/// How the plan places the MoE layers (expert groups, slicing over tensor ranks) and its
/// pipeline schedule.
fn placement_asks(c: &Checked, plan: &ParallelPlan, out: &mut Asks) {
    let p = &c.parallel;
    if c.model.moe_layers().next().is_some() {
        let (value, what) = match p.experts {
            ExpertGroup::AcrossData => (
                "across_data",
                "experts across the data-parallel group".to_string(),
            ),
            ExpertGroup::Size { size } => (
                "groups",
                format!("expert groups of {size} data ranks (`groups_of({size})`)"),
            ),
            ExpertGroup::Replicated => ("replicated", "replicated experts".to_string()),
        };
        out.ask("expert_groups", value, what, p.spans.experts);
        if plan.tensor > 1 {
            let (value, what) = if plan.expert_slicing {
                ("true", "experts sliced over the tensor ranks")
            } else {
                (
                    "false",
                    "experts whole on every tensor rank (`expert_slicing = false`)",
                )
            };
            out.ask("expert_slicing", value, what.into(), p.spans.tensor);
        }
    }
    if plan.virtual_stages > 1 {
        // no target declares it yet: refused with the targets' usual message
        let what = format!(
            "interleaved pipeline schedule (`virtual_stages = {}`)",
            plan.virtual_stages
        );
        out.ask("virtual_stages", "true", what, p.spans.virtual_stages);
    }
}

/// `items` in their order, each once (layers assigned by one selection share their spans, so
/// a rule finds the same thing for each of them).
pub(super) fn once_each<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// The values a target lists for a capability, comma-separated (`fmoec, fastmoe`); empty for a
/// capability that is not a set.
pub(super) fn listed(target: &MegatronTarget, field: &str) -> String {
    match target.capabilities.get(field) {
        Some(crate::check::Capability::Set(v)) => v.join(", "),
        _ => String::new(),
    }
}

/// The activation of Megatron's dense MLP for `wanted`: it where the target has it, else the
/// first the target has of GELU, ReLU and SwiGLU.
fn dense_act(target: &MegatronTarget, wanted: &str) -> Option<&'static str> {
    const ACTS: [&str; 3] = ["gelu", "relu", "swiglu"];
    ACTS.into_iter()
        .find(|a| *a == wanted && target.allows("dense_act", a))
        .or_else(|| ACTS.into_iter().find(|a| target.allows("dense_act", a)))
}

/// "v2.5, v3.0.2 have it; or train it with `fmoec run`".
fn who_has_it(field: &str, value: &str, all: &[MegatronTarget]) -> String {
    let have: Vec<&str> = all
        .iter()
        .filter(|t| t.allows(field, value))
        .map(|t| t.version.as_str())
        .collect();
    match have.as_slice() {
        [] => "no Megatron-LM target has it yet; train it with `fmoec run`".to_string(),
        [one] => {
            format!("Megatron-LM {one} has it (`--megatron {one}`); or train it with `fmoec run`")
        }
        many => format!("{} have it; or train it with `fmoec run`", many.join(", ")),
    }
}

/// Where Megatron has a stand-in for what the target lacks: precisions, in order of preference.
fn precision_stand_in(asked: &str, target: &MegatronTarget) -> Option<&'static str> {
    let order: &[&str] = match asked {
        "bf16" => &["fp16"],
        "fp16" => &["bf16"],
        "fp8" => &["bf16", "fp16"],
        _ => &[],
    };
    order
        .iter()
        .copied()
        .find(|p| target.allows("precision", p))
}

/// The diagnostics of `c` for `target` (errors and warnings), given every declared target.
pub fn diagnostics(
    c: &Checked,
    plan: &ParallelPlan,
    target: &MegatronTarget,
    all: &[MegatronTarget],
) -> Vec<Diagnostic> {
    let v = &target.version;
    let mut out = Vec::new();
    for a in asks(c, plan) {
        if target.allows(a.field, &a.value) {
            continue;
        }
        if a.field == "precision" {
            if let Some(instead) = precision_stand_in(&a.value, target) {
                let how = match instead {
                    "fp16" => "fp16 with loss scaling",
                    _ => "bf16 with fp32 master weights",
                };
                out.push(Diagnostic::warning(
                    "W0803",
                    a.span,
                    format!(
                        "Megatron-LM {v} has no {}; train.sh uses --{instead} ({how})",
                        a.value
                    ),
                ));
                continue;
            }
        }
        out.push(
            Diagnostic::error(
                "E0801",
                a.span,
                format!("Megatron-LM {v} has no {}", a.what),
            )
            .with_label("asked for here")
            .with_help(who_has_it(a.field, &a.value, all)),
        );
    }
    out.extend(dense_mlp(c, target));
    out
}

/// Megatron's dense MLP trains the layers that are not MoE: its activation and hidden size are
/// the target's (`dense_act`; `dense_hidden`: settable, else 4 x width). Anything else is said
/// once, at the first dense layer that differs, with what trains instead.
fn dense_mlp(c: &Checked, target: &MegatronTarget) -> Option<Diagnostic> {
    let m = &c.model;
    let dense: Vec<_> = m
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Dense(mlp) => Some(mlp),
            Ffn::Moe(_) => None,
        })
        .collect();
    let first = dense.first()?;
    let hidden = if target.can("dense_hidden") {
        first.hidden
    } else {
        4 * m.width
    };
    let act = dense_act(target, act_name(first.act))?;
    let odd = dense
        .iter()
        .find(|d| d.hidden != hidden || act_name(d.act) != act)?;
    let hidden_text = if target.can("dense_hidden") {
        format!("{hidden} (one --ffn-hidden-size for every layer)")
    } else {
        format!("4 x width = {hidden}")
    };
    Some(Diagnostic::warning(
        "W0801",
        odd.span,
        format!(
            "Megatron-LM {}'s dense MLP is {act} with hidden {hidden_text}; its dense layers train that instead",
            target.version
        ),
    ))
}

/// The dense MLP's hidden size train.sh passes (`--ffn-hidden-size`), when the target takes
/// one and the model has dense layers.
pub fn dense_hidden(c: &Checked, target: &MegatronTarget) -> Option<u64> {
    if !target.can("dense_hidden") {
        return None;
    }
    c.model.layers.iter().find_map(|l| match &l.ffn {
        Ffn::Dense(mlp) => Some(mlp.hidden),
        Ffn::Moe(_) => None,
    })
}

/// The precision train.sh trains in: the file's, or the target's stand-in for it.
pub fn precision_flag(c: &Checked, target: &MegatronTarget) -> Option<&'static str> {
    let t = c.train.as_ref()?;
    let asked = precision_name(t.precision);
    let p = if target.allows("precision", asked) {
        asked
    } else {
        precision_stand_in(asked, target)?
    };
    match p {
        "fp32" => None,
        "fp16" => Some("--fp16"),
        _ => Some("--bf16"),
    }
}

/// The capacity FastMoE's GShard and Switch gates are built with (their constructors' defaults).
const FASTMOE_CAPACITY: (f64, f64) = (1.2, 2.4);
/// FastMoE's Switch gate's `switch_eps` default.
const FASTMOE_SWITCH_EPS: f64 = 0.1;

/// What `--runtime fastmoe` cannot train as the model file declares it (E0809), each at the
/// place the file asks: training would stop at its first step, or train another model.
///
/// FastMoE's own Megatron layer (`fmoe.megatron.layers.MegatronMLP`) splits experts over the
/// whole data-parallel group or not at all, its experts are GELU MLPs, it builds each gate
/// with FastMoE's defaults (none of the model file's gate arguments reach it), and its noisy
/// gate does not run in its own layer (a flat index its `FMoE` misroutes for `top_k > 1`, and
/// in evaluation a 0 / 0 that torch's `Normal` refuses).
pub fn fastmoe_runtime(c: &Checked, plan: &ParallelPlan) -> Vec<Diagnostic> {
    let mut problems: Vec<(Span, String)> = fastmoe_expert_group(c, plan).into_iter().collect();
    for (_, moe) in c.model.moe_layers() {
        if moe.expert.act != Activation::Gelu {
            problems.push((
                moe.expert.span,
                format!(
                    "{FASTMOE} has GELU experts only, not {} experts",
                    act_name(moe.expert.act)
                ),
            ));
        }
        problems.extend(fastmoe_gate(&moe.gate));
    }
    once_each(problems.into_iter().map(|(span, message)| {
        Diagnostic::error("E0809", span, message)
            .with_label("asked for here")
            .with_help("`--runtime fmoec` (the default) trains it")
    }))
}

/// How E0809's messages name the runtime they are about.
const FASTMOE: &str = "FastMoE's Megatron layer (`--runtime fastmoe`)";

/// An expert group that is neither one rank nor the whole data-parallel group.
fn fastmoe_expert_group(c: &Checked, plan: &ParallelPlan) -> Option<(Span, String)> {
    (c.model.moe_layers().next().is_some()
        && plan.expert_group_size != 1
        && plan.expert_group_size != plan.data)
        .then(|| {
            (
                c.parallel.spans.experts,
                format!(
                    "{FASTMOE} splits experts over the whole data-parallel group ({} ranks) or not at all, not over expert groups of {} data ranks",
                    plan.data, plan.expert_group_size
                ),
            )
        })
}

/// A gate FastMoE's layer cannot run, or runs with its own defaults instead of this one's
/// arguments.
fn fastmoe_gate(g: &Gate) -> Option<(Span, String)> {
    let capacity = g.capacity.map(|c| (c.train, c.eval));
    let defaults = match g.kind {
        GateKind::Noisy => {
            return Some((
                g.span,
                format!(
                    "{FASTMOE} cannot run FastMoE's noisy gate: its layer misroutes the gate's flat index (top_k > 1) and its evaluation divides by zero noise"
                ),
            ))
        }
        GateKind::Gshard => (capacity != Some(FASTMOE_CAPACITY) || !g.random_routing)
            .then(|| "capacity (1.2, 2.4) and random routing".to_string()),
        GateKind::Switch => (capacity != Some(FASTMOE_CAPACITY)
            || g.jitter != FASTMOE_SWITCH_EPS)
            .then(|| format!("capacity (1.2, 2.4) and jitter {FASTMOE_SWITCH_EPS}")),
        GateKind::Naive | GateKind::Swipe => None,
    }?;
    Some((
        g.span,
        format!(
            "{FASTMOE} builds its {} gate with FastMoE's defaults ({defaults}); this gate's arguments cannot reach it",
            crate::emit::gate_name(g.kind)
        ),
    ))
}

/// How a target trains the file's MoE layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoePath {
    /// No MoE layer.
    Dense,
    /// Megatron's own MoE (`native_expert_parallel`): its router, experts and token dispatcher,
    /// set by the launch arguments alone.
    Native,
    /// fmoec's module; `why` says what Megatron's own MoE cannot express (empty where the
    /// target has no MoE of its own).
    Module { why: String },
}

/// The activation of Megatron's own MLPs (`--swiglu` or GELU): the dense layers' where there are
/// any and the target has it, else the first MoE layer's experts'.
pub fn megatron_act(c: &Checked, target: &MegatronTarget) -> &'static str {
    let dense = c.model.layers.iter().find_map(|l| match &l.ffn {
        Ffn::Dense(mlp) => Some(act_name(mlp.act)),
        Ffn::Moe(_) => None,
    });
    let first_expert = c
        .model
        .moe_layers()
        .next()
        .map(|(_, m)| act_name(m.expert.act));
    let wanted = dense.or(first_expert).unwrap_or("gelu");
    dense_act(target, wanted).unwrap_or("gelu")
}

/// Whether `target`'s own MoE trains the file's MoE layers exactly (every layer alike, a gate
/// its router computes (`native_gates`), experts with Megatron's MLP activation), and if not,
/// why.
pub fn moe_path(c: &Checked, target: &MegatronTarget) -> MoePath {
    let layers: Vec<_> = c.model.moe_layers().collect();
    let Some((first_index, first)) = layers.first() else {
        return MoePath::Dense;
    };
    let v = &target.version;
    if !target.can("native_expert_parallel") {
        return MoePath::Module { why: String::new() };
    }
    let module = |why: String| MoePath::Module { why };
    let shape = |m: &crate::check::Moe| {
        (
            m.experts,
            m.top_k,
            m.gate.kind,
            m.expert.hidden,
            m.expert.act,
            m.shared.as_ref().map(|s| (s.count, s.expert.hidden)),
        )
    };
    if let Some((i, other)) = layers.iter().find(|(_, m)| shape(m) != shape(first)) {
        return module(format!(
            "its MoE layers differ (layer {first_index}: {} experts of hidden {}, top-{}, {} gate; \
             layer {i}: {} of hidden {}, top-{}, {} gate), and Megatron-LM {v}'s own MoE has one \
             expert count, size, top-k and gate for all of them",
            first.experts,
            first.expert.hidden,
            first.top_k,
            crate::emit::gate_name(first.gate.kind),
            other.experts,
            other.expert.hidden,
            other.top_k,
            crate::emit::gate_name(other.gate.kind),
        ));
    }
    let gate = crate::emit::gate_name(first.gate.kind);
    if !target.allows("native_gates", gate) {
        let native = listed(target, "native_gates");
        return module(format!(
            "Megatron-LM {v}'s own router computes the {native} gate only, not the {gate} gate"
        ));
    }
    if first.top_k == 1 {
        return module(format!(
            "with top_k = 1 Megatron-LM {v}'s router weights the chosen expert by its softmax \
             probability (it needs --moe-router-pre-softmax), the {gate} gate by 1"
        ));
    }
    let act = act_name(first.expert.act);
    let megatron = megatron_act(c, target);
    if act != megatron {
        return module(format!(
            "its experts are {act}, and Megatron-LM {v}'s own experts take the activation of its \
             dense MLP ({megatron})"
        ));
    }
    MoePath::Native
}
