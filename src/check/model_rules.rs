//! The `model` block: preset inheritance, fields, the block's default feed-forward,
//! per-layer selections (`layers[1..depth step 2].ffn = ...`, one assignment per layer
//! unless `override`), and the shape rules (width divisible by heads, heads divisible
//! by kv_heads, top_k at most experts, gate and top_k agreeing).

use std::collections::BTreeMap;
use std::rc::Rc;

use super::errors;
use super::eval::{Ctx, FieldEnv};
use super::fields::{boolean, float, int, symbol, uint};
use super::model::*;
use super::scope::{EntityKind, ModId};
use super::value::{CtorValue, Type, Value, V};
use super::Checker;
use crate::diag::{did_you_mean, Span};
use crate::syntax::ast::{self, BlockKind, SelItem};

/// Layers a model may have: far above any real model (the planner takes 1,024), low enough
/// that checking one layer at a time stays quick.
pub const MAX_DEPTH: u64 = 1 << 16;

pub const MODEL_FIELDS: &[&str] = &[
    "vocab",
    "context",
    "width",
    "heads",
    "kv_heads",
    "depth",
    "norm",
    "positions",
    "bias",
    "tied_embeddings",
    "block",
];

/// Presets may nest this deep (a cycle would not end).
const MAX_PRESET_DEPTH: usize = 16;

/// A model block's fields as the phases of [`Checker::model`] read them: the fields of the
/// block and its presets (evaluated on first use), where each is written, and the block's
/// module.
struct ModelScope {
    env: FieldEnv,
    spans_of: BTreeMap<String, Span>,
    module: ModId,
}

impl ModelScope {
    /// Where the model's fields are evaluated: its module, with its fields in scope.
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            module: self.module,
            locals: None,
            fields: Some(&self.env),
        }
    }
}

/// A model block's fields, read and typed: `None` where not written or wrong (reported).
struct ModelFields {
    vocab: Option<V>,
    context: Option<V>,
    width: Option<V>,
    heads: Option<V>,
    depth: Option<V>,
    block: Option<V>,
    kv_heads: Option<V>,
    norm: Option<V>,
    positions: Option<V>,
    bias: Option<V>,
    tied_embeddings: Option<V>,
}

/// The model's depth, and where it is written (a selection past it points there).
#[derive(Clone, Copy)]
struct Depth {
    layers: u64,
    span: Span,
}

/// A layer selection being read: where it is evaluated, the depth its layers lie under,
/// and the layers it picked so far, in order.
struct Selection<'c> {
    ctx: Ctx<'c>,
    depth: Depth,
    picked: Vec<u64>,
}

impl Checker<'_> {
    /// The preset chain of a model block, root first: `[(module, block), ...]`.
    fn preset_chain(
        &mut self,
        m: ModId,
        block: &Rc<ast::Block>,
    ) -> Option<Vec<(ModId, Rc<ast::Block>)>> {
        let mut chain = vec![(m, block.clone())];
        let mut cur = (m, block.clone());
        while let Some(parent) = cur.1.parent.clone() {
            if chain.len() > MAX_PRESET_DEPTH {
                self.sink
                    .push(errors::preset_cycle(parent.span, &parent.name));
                return None;
            }
            match self.lookup(cur.0, &parent.name) {
                Some(r) => match r.kind {
                    EntityKind::Block(b) if b.kind == BlockKind::Model => {
                        if chain.iter().any(|(_, c)| Rc::ptr_eq(c, &b)) {
                            self.sink
                                .push(errors::preset_cycle(parent.span, &parent.name));
                            return None;
                        }
                        chain.push((r.module, b.clone()));
                        cur = (r.module, b);
                    }
                    other => {
                        self.sink.push(errors::not_a_preset(
                            parent.span,
                            &parent.name,
                            other.describe(),
                        ));
                        return None;
                    }
                },
                None => {
                    let help = self
                        .not_found_help(&parent.name, |this| this.block_names(BlockKind::Model));
                    self.sink
                        .push(errors::unknown_preset(parent.span, &parent.name, help));
                    return None;
                }
            }
        }
        chain.reverse();
        Some(chain)
    }

    /// Checks a model block (with its presets) into a [`Model`], in its phases: the preset
    /// chain, the fields of the chain, the fields read and typed, the depth, the attention's
    /// heads, the layers, then the model.
    pub(crate) fn model(&mut self, m: ModId, block: &Rc<ast::Block>) -> Option<Model> {
        let name = block.name.clone()?;
        let chain = self.preset_chain(m, block)?;
        let (exprs, spans_of) = self.chain_fields(&chain, block);
        let scope = ModelScope {
            env: FieldEnv::new(exprs),
            spans_of,
            module: m,
        };
        let f = self.model_fields(&scope, &name);
        let (Some(vocab), Some(context), Some(width), Some(heads), Some(depth), Some(blockv)) =
            (f.vocab, f.context, f.width, f.heads, f.depth, f.block)
        else {
            return None;
        };
        let Value::Ctor(block_ctor) = &blockv.value else {
            return None;
        };
        let depth = Depth {
            layers: self.model_depth(&depth)?,
            span: depth.span,
        };
        let (heads_n, kv_n) = self.attention_heads(block_ctor, &heads, f.kv_heads.as_ref(), &width);
        let width_n = uint(&width);
        let layers = self.model_layers(&scope, &chain, block_ctor, &blockv, depth)?;
        Some(Model {
            name: name.name.clone(),
            vocab: uint(&vocab),
            context: uint(&context),
            width: width_n,
            attention: Attention {
                heads: heads_n,
                kv_heads: kv_n,
                head_dim: width_n.checked_div(heads_n).unwrap_or(0),
                causal: true,
            },
            norm: match f.norm.as_ref().map(symbol) {
                Some("rmsnorm") => Norm::RmsNorm,
                _ => Norm::LayerNorm,
            },
            positions: match f.positions.as_ref().map(symbol) {
                Some("rotary") => Positions::Rotary,
                _ => Positions::Learned,
            },
            tied_embeddings: f.tied_embeddings.as_ref().map(boolean).unwrap_or(true),
            bias: f.bias.as_ref().map(boolean).unwrap_or(true),
            layers,
            spans: ModelSpans {
                name: name.span,
                vocab: vocab.span,
                context: context.span,
                width: width.span,
                heads: heads.span,
                depth: depth.span,
            },
        })
    }

    /// The fields of a model block read and typed, required ones first; every required
    /// field that is not written is reported in one diagnostic at the model's name.
    fn model_fields(&mut self, scope: &ModelScope, name: &ast::Ident) -> ModelFields {
        let mut missing = Vec::new();
        let mut required = |this: &mut Self, field: &str, ty: &Type| -> Option<V> {
            if !scope.env.exprs.contains_key(field) {
                missing.push(field.to_string());
                return None;
            }
            this.model_field(scope, field, ty)
        };
        let vocab = required(self, "vocab", &Type::positive_int());
        let context = required(self, "context", &Type::positive_int());
        let width = required(self, "width", &Type::positive_int());
        let heads = required(self, "heads", &Type::positive_int());
        let depth = required(self, "depth", &Type::positive_int());
        let block = required(self, "block", &Type::Kind("block".into()));
        let fields = ModelFields {
            vocab,
            context,
            width,
            heads,
            depth,
            block,
            kv_heads: self.model_field(scope, "kv_heads", &Type::positive_int()),
            norm: self.model_field(
                scope,
                "norm",
                &Type::Enum(vec!["layernorm".into(), "rmsnorm".into()]),
            ),
            positions: self.model_field(
                scope,
                "positions",
                &Type::Enum(vec!["learned".into(), "rotary".into()]),
            ),
            bias: self.model_field(scope, "bias", &Type::Bool),
            tied_embeddings: self.model_field(scope, "tied_embeddings", &Type::Bool),
        };
        if !missing.is_empty() {
            self.sink.push(errors::model_missing_fields(
                name.span, &name.name, &missing,
            ));
        }
        fields
    }

    /// Field `field` of the model conformed to `ty`: `None` where it is not written or is
    /// wrong (reported, and poisoned so that the fields using it stay quiet).
    fn model_field(&mut self, scope: &ModelScope, field: &str, ty: &Type) -> Option<V> {
        let span = *scope.spans_of.get(field)?;
        let v = self.field_value(&scope.env, field, span)?;
        let v = self.conform(v, ty, &format!("field `{field}`"), scope.ctx());
        if v.is_error() {
            scope.env.poison(field, span);
            return None;
        }
        Some(v)
    }

    /// The model's depth, refused above [`MAX_DEPTH`]: every layer is materialised after
    /// this, so the refusal comes before they are allocated.
    fn model_depth(&mut self, depth: &V) -> Option<u64> {
        let depth_n = uint(depth);
        if depth_n > MAX_DEPTH {
            self.sink.push(errors::out_of_range(
                depth.span,
                "depth",
                &depth_n.to_string(),
                &format!("at most {MAX_DEPTH}"),
            ));
            return None;
        }
        Some(depth_n)
    }

    /// Every layer's feed-forward: the block's own everywhere, then the `layers[...]`
    /// assignments of each block of the chain, the furthest preset first. `None` where the
    /// block's feed-forward or an assignment was wrong (reported), or a layer has none.
    fn model_layers(
        &mut self,
        scope: &ModelScope,
        chain: &[(ModId, Rc<ast::Block>)],
        block_ctor: &CtorValue,
        blockv: &V,
        depth: Depth,
    ) -> Option<Vec<Layer>> {
        // The shape rules leave a well-formed model (reported, not fatal), so that later
        // rules, the planner's included, still run in the same pass. `ok` is about whether
        // the model could be built at all.
        let mut ok = true;
        let default_ffn = block_ctor.arg("ffn").cloned();
        let default_ffn = default_ffn.and_then(|v| self.ffn(&v));
        let mut layers: Vec<Option<(Ffn, Span)>> = match &default_ffn {
            Some(f) => vec![Some((f.clone(), blockv.span)); depth.layers as usize],
            None => vec![None; depth.layers as usize],
        };
        if default_ffn.is_none() {
            ok = false;
        }
        // Layer index -> the selection of a preset that assigned it.
        let mut inherited: BTreeMap<u64, Span> = BTreeMap::new();
        for (bm, b) in chain {
            let bctx = Ctx {
                module: *bm,
                locals: None,
                fields: Some(&scope.env),
            };
            ok &= self.layer_assigns(b, bctx, depth, &mut layers, &mut inherited);
        }
        if !ok {
            return None;
        }
        let layers: Vec<Layer> = layers
            .into_iter()
            .enumerate()
            .filter_map(|(index, l)| l.map(|(ffn, span)| Layer { index, ffn, span }))
            .collect();
        if layers.len() as u64 != depth.layers {
            return None;
        }
        Some(layers)
    }

    /// The fields of `block` and of the presets it extends (`chain`, the furthest preset
    /// first, so that a nearer block's field replaces a preset's): each as its expression with
    /// the module it is written in, and where it is written. Only `block` reports its own
    /// field mistakes here; presets are checked on their own (the stdlib test checks every
    /// preset).
    fn chain_fields(
        &mut self,
        chain: &[(ModId, Rc<ast::Block>)],
        block: &Rc<ast::Block>,
    ) -> (BTreeMap<String, (ast::Expr, ModId)>, BTreeMap<String, Span>) {
        let mut exprs: BTreeMap<String, (ast::Expr, ModId)> = BTreeMap::new();
        let mut spans_of: BTreeMap<String, Span> = BTreeMap::new();
        for (bm, b) in chain {
            let fields = if Rc::ptr_eq(b, block) {
                self.block_fields(b, MODEL_FIELDS)
            } else {
                let mut quiet = crate::diag::Sink::new();
                std::mem::swap(self.sink, &mut quiet);
                let f = self.block_fields(b, MODEL_FIELDS);
                std::mem::swap(self.sink, &mut quiet);
                f
            };
            for (n, f) in fields {
                exprs.insert(n.clone(), (f.value.clone(), *bm));
                spans_of.insert(n, f.value.span);
            }
        }
        (exprs, spans_of)
    }

    /// The attention's heads and key/value heads: the model's, optionally restated by
    /// `causal(heads = ..., kv_heads = ...)` (a disagreement is reported and the restated value
    /// taken); the width must split over the heads and the heads over the key/value heads
    /// (reported, not fatal).
    fn attention_heads(
        &mut self,
        block_ctor: &CtorValue,
        heads: &V,
        kv_heads: Option<&V>,
        width: &V,
    ) -> (u64, u64) {
        let attention_ctor = block_ctor.arg("attention").and_then(ctor_of);
        let mut heads_n = uint(heads);
        let mut kv_n = kv_heads.map(uint).unwrap_or(heads_n);
        if let Some(att) = &attention_ctor {
            if let Some(h) = att.arg("heads").and_then(int) {
                if h as u64 != heads_n {
                    self.sink.push(errors::heads_disagree(
                        att.arg("heads").map(|v| v.span).unwrap_or(att.span),
                        "heads",
                        h as u64,
                        heads_n,
                        heads.span,
                    ));
                }
                heads_n = h as u64;
            }
            if let Some(k) = att.arg("kv_heads").and_then(int) {
                if let Some(kv) = kv_heads {
                    if k as u64 != uint(kv) {
                        self.sink.push(errors::heads_disagree(
                            att.arg("kv_heads").map(|v| v.span).unwrap_or(att.span),
                            "kv_heads",
                            k as u64,
                            uint(kv),
                            kv.span,
                        ));
                    }
                }
                kv_n = k as u64;
            }
        }
        let width_n = uint(width);
        if heads_n > 0 && width_n % heads_n != 0 {
            self.sink.push(errors::width_not_divisible(
                width.span, width_n, heads_n, heads.span,
            ));
        }
        if kv_n > 0 && heads_n % kv_n != 0 {
            let kv_span = kv_heads.map(|v| v.span).unwrap_or(heads.span);
            self.sink.push(errors::heads_not_divisible(
                kv_span, heads_n, kv_n, heads.span,
            ));
        }
        // Reported above; more key/value heads than heads leave a model no rule after this
        // one should cost (any count up to 2^63 overflowed the attention's sizes).
        (heads_n, kv_n.min(heads_n))
    }

    /// Applies the `layers[...]` assignments of one block; `false` if any was wrong.
    ///
    /// Within one block a layer may be assigned once, or again with `override`. A
    /// block that replaces a layer its preset assigned gets a warning unless it says
    /// `override`. `inherited` holds the presets' assignments and receives this
    /// block's.
    fn layer_assigns(
        &mut self,
        block: &ast::Block,
        ctx: Ctx,
        depth: Depth,
        layers: &mut [Option<(Ffn, Span)>],
        inherited: &mut BTreeMap<u64, Span>,
    ) -> bool {
        let mut ok = true;
        // Layer index -> the selection (in this block) that assigned it.
        let mut assigned: BTreeMap<u64, Span> = BTreeMap::new();
        for a in &block.layers {
            ok &= self.layer_assign(a, ctx, depth, layers, &mut assigned, inherited);
        }
        inherited.extend(assigned);
        ok
    }

    /// One `layers[...].ffn = ...`: its selection, its value, and what it replaces (a layer
    /// this block assigned already, or one of the preset it extends).
    fn layer_assign(
        &mut self,
        a: &ast::LayerAssign,
        ctx: Ctx,
        depth: Depth,
        layers: &mut [Option<(Ffn, Span)>],
        assigned: &mut BTreeMap<u64, Span>,
        inherited: &BTreeMap<u64, Span>,
    ) -> bool {
        if a.field.name != "ffn" {
            self.sink.push(errors::unknown_layer_field(
                a.field.span,
                &a.field.name,
                did_you_mean(&a.field.name, ["ffn"]),
            ));
            return false;
        }
        let Some(indices) = self.selection(a, ctx, depth) else {
            return false;
        };
        let v = self.eval(&a.value, ctx);
        let v = self.conform(v, &Type::Kind("ffn".into()), "a layer's `ffn`", ctx);
        let ffn = if v.is_error() { None } else { self.ffn(&v) };
        let ok = self.layer_replacements(a, &indices, assigned, inherited);
        for &i in &indices {
            assigned.insert(i, a.selection_span);
        }
        let Some(f) = ffn else {
            return false;
        };
        for &i in &indices {
            if let Some(slot) = layers.get_mut(i as usize) {
                *slot = Some((f.clone(), a.span));
            }
        }
        ok
    }

    /// The layers of `indices` that were assigned before: twice in this block is an error
    /// unless the assignment says `override`; an `override` that replaces nothing, and
    /// replacing a preset's layers without one, are warned about.
    fn layer_replacements(
        &mut self,
        a: &ast::LayerAssign,
        indices: &[u64],
        assigned: &BTreeMap<u64, Span>,
        inherited: &BTreeMap<u64, Span>,
    ) -> bool {
        let mut ok = true;
        let mut replaced_any = false;
        let mut from_preset: Vec<(u64, Span)> = Vec::new();
        for &i in indices {
            if let Some(prev) = assigned.get(&i) {
                replaced_any = true;
                if a.override_span.is_none() {
                    self.sink
                        .push(errors::layer_assigned_twice(a.selection_span, i, *prev));
                    ok = false;
                }
            } else if let Some(prev) = inherited.get(&i) {
                replaced_any = true;
                from_preset.push((i, *prev));
            }
        }
        match a.override_span {
            Some(os) if !replaced_any => self.sink.push(errors::override_without_effect(os)),
            None if !from_preset.is_empty() => {
                let idx: Vec<u64> = from_preset.iter().map(|(i, _)| *i).collect();
                self.sink.push(errors::preset_layers_replaced(
                    a.selection_span,
                    &idx,
                    from_preset[0].1,
                ));
            }
            _ => {}
        }
        ok
    }

    /// The layer indices a selection names, checked to lie inside `0..depth`, be
    /// non-empty, and not name a layer twice: each item picks its layers in turn (every
    /// item's mistakes reported, not only the first's).
    fn selection(&mut self, a: &ast::LayerAssign, ctx: Ctx, depth: Depth) -> Option<Vec<u64>> {
        let mut sel = Selection {
            ctx,
            depth,
            picked: Vec::new(),
        };
        let mut ok = true;
        for item in &a.selection {
            ok &= match item {
                SelItem::Index(e) => self.select_index(&mut sel, e),
                SelItem::Range {
                    start,
                    end,
                    step,
                    span,
                } => self.select_range(&mut sel, start, end, step.as_deref(), *span),
            };
        }
        if ok && sel.picked.is_empty() {
            self.sink.push(errors::empty_selection(a.selection_span));
            return None;
        }
        ok.then_some(sel.picked)
    }

    /// `layers[i]`: one layer, inside the model.
    fn select_index(&mut self, sel: &mut Selection, e: &ast::Expr) -> bool {
        let Some(i) = self.selection_number(sel.ctx, e, &Type::Int(Vec::new()), "a layer index")
        else {
            return false;
        };
        if i < 0 || i as u64 >= sel.depth.layers {
            self.sink.push(errors::layer_out_of_range(
                e.span,
                i,
                sel.depth.layers,
                sel.depth.span,
            ));
            return false;
        }
        self.pick(sel, i as u64, e.span)
    }

    /// `layers[start..end step n]`: the numbers read (all three, so that each one's mistake
    /// is reported), the range checked to lie inside the model and hold a layer, then
    /// every layer of it picked.
    fn select_range(
        &mut self,
        sel: &mut Selection,
        start: &ast::Expr,
        end: &ast::Expr,
        step: Option<&ast::Expr>,
        span: Span,
    ) -> bool {
        let idx_ty = Type::Int(Vec::new());
        let s = self.selection_number(sel.ctx, start, &idx_ty, "a range start");
        let e = self.selection_number(sel.ctx, end, &idx_ty, "a range end");
        let st = match step {
            Some(st) => self.selection_number(sel.ctx, st, &Type::positive_int(), "a range step"),
            None => Some(1),
        };
        let (Some(s), Some(e), Some(st)) = (s, e, st) else {
            return false;
        };
        let depth = sel.depth;
        if s < 0 || s as u64 > depth.layers {
            self.sink.push(errors::layer_out_of_range(
                start.span,
                s,
                depth.layers,
                depth.span,
            ));
            return false;
        }
        if e < 0 || e as u64 > depth.layers {
            self.sink.push(errors::range_end_past_depth(
                end.span,
                e,
                depth.layers,
                depth.span,
            ));
            return false;
        }
        if s >= e {
            self.sink.push(errors::empty_range(span, s, e));
            return false;
        }
        let mut ok = true;
        let mut i = s;
        while i < e {
            ok &= self.pick(sel, i as u64, span);
            // A step past the range (up to i64::MAX) ends it.
            let Some(next) = i.checked_add(st) else {
                break;
            };
            i = next;
        }
        ok
    }

    /// A number of a selection, evaluated and conformed to `ty` (`what` names it in a
    /// mistake); `None` where it was wrong (reported).
    fn selection_number(&mut self, ctx: Ctx, e: &ast::Expr, ty: &Type, what: &str) -> Option<i64> {
        let v = self.eval(e, ctx);
        let v = self.conform(v, ty, what, ctx);
        int(&v)
    }

    /// Adds layer `i` to the selection; `false` (reported at `span`) when the selection
    /// named it already. The one rule for an index and a range.
    fn pick(&mut self, sel: &mut Selection, i: u64, span: Span) -> bool {
        if sel.picked.contains(&i) {
            self.sink.push(errors::layer_selected_twice(span, i));
            return false;
        }
        sel.picked.push(i);
        true
    }

    /// A feed-forward from a checked `mlp(...)` or `moe(...)` value.
    pub(crate) fn ffn(&mut self, v: &V) -> Option<Ffn> {
        let c = ctor_of(v)?;
        match c.name.as_str() {
            "moe" => self.moe(&c).map(Ffn::Moe),
            _ => mlp_of(&c).map(Ffn::Dense),
        }
    }

    fn moe(&mut self, c: &CtorValue) -> Option<Moe> {
        let experts_v = c.arg("experts")?;
        let top_k_v = c.arg("top_k")?;
        let gate_c = c.arg("gate").and_then(ctor_of)?;
        let expert = c.arg("expert").and_then(ctor_of).and_then(|e| mlp_of(&e))?;
        let shared = shared_experts(c)?;
        let kind = self.moe_gate_rules(c, experts_v, top_k_v, &gate_c)?;
        Some(Moe {
            experts: uint(experts_v),
            top_k: uint(top_k_v),
            gate: gate_of(&gate_c, kind),
            expert,
            shared,
            spans: MoeSpans {
                call: c.span,
                experts: experts_v.span,
                top_k: top_k_v.span,
            },
        })
    }

    /// The MoE layer's `top_k` against its expert count and its gate, and the gate's kind;
    /// `None` for a gate fmoec does not implement.
    fn moe_gate_rules(
        &mut self,
        c: &CtorValue,
        experts_v: &V,
        top_k_v: &V,
        gate_c: &CtorValue,
    ) -> Option<GateKind> {
        let (experts, top_k) = (uint(experts_v), uint(top_k_v));
        // A rule broken here leaves a well-formed layer: it is reported, and the model is
        // still built so that the planner's rules can run on it in the same pass.
        let top_k_at = match c.explicit("top_k") {
            Some(v) => errors::ArgAt::Written(v.span),
            None => errors::ArgAt::Defaulted {
                call: c.callee_span,
                default: top_k_v.span,
            },
        };
        if top_k > experts {
            self.sink.push(errors::top_k_exceeds_experts(
                top_k_at,
                top_k,
                experts,
                experts_v.span,
            ));
        }
        let Some(def) = crate::gates::by_name(&gate_c.name) else {
            // Only the stdlib declares gates; one fmoec does not implement is refused, never
            // trained as another.
            self.sink
                .push(errors::unknown_gate(gate_c.callee_span, &gate_c.name));
            return None;
        };
        if let Some(k) = def.top_k {
            if top_k != k {
                self.sink.push(errors::gate_needs_top_k(
                    top_k_at,
                    &gate_c.name,
                    k,
                    top_k,
                    gate_c.callee_span,
                ));
            }
        }
        Some(def.kind)
    }
}

/// An MoE layer's `shared = shared(...)` experts: `Some(None)` when it has none, `None` when
/// they are not well-formed.
fn shared_experts(c: &CtorValue) -> Option<Option<SharedExperts>> {
    let Some(s) = c.arg("shared").and_then(ctor_of) else {
        return Some(None);
    };
    Some(Some(SharedExperts {
        count: s.arg("count").map(uint).unwrap_or(1),
        expert: s.arg("expert").and_then(ctor_of).and_then(|e| mlp_of(&e))?,
    }))
}

/// A gate's settings from its checked constructor call (every argument present: given or the
/// stdlib's default).
pub(crate) fn gate_of(gate_c: &CtorValue, kind: GateKind) -> Gate {
    let capacity = gate_c.arg("capacity").and_then(|v| match &v.value {
        Value::Tuple(items) if items.len() == 2 => Some(Capacity {
            train: float(&items[0]),
            eval: float(&items[1]),
        }),
        _ => None,
    });
    Gate {
        kind,
        capacity,
        balance_loss: gate_c.arg("balance_loss").map(float).unwrap_or(0.0),
        jitter: gate_c.arg("jitter").map(float).unwrap_or(0.0),
        random_routing: gate_c.arg("random_routing").map(boolean).unwrap_or(false),
        span: gate_c.span,
    }
}

pub fn ctor_of(v: &V) -> Option<Rc<CtorValue>> {
    match &v.value {
        Value::Ctor(c) => Some(c.clone()),
        _ => None,
    }
}

fn mlp_of(c: &CtorValue) -> Option<Mlp> {
    if c.name != "mlp" {
        return None;
    }
    Some(Mlp {
        hidden: c.arg("hidden").map(uint)?,
        act: match c.arg("act").map(symbol) {
            Some("relu") => Activation::Relu,
            Some("swiglu") => Activation::Swiglu,
            _ => Activation::Gelu,
        },
        span: c.span,
    })
}
