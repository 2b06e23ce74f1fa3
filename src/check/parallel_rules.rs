//! The `parallel` block: GPUs and their hardware profile, tensor and pipeline sizes,
//! the derived (or checked) data size, the expert group, expert slicing, micro-batch,
//! virtual pipeline stages, and FasterMoE's options for the expert exchange
//! (`smart_schedule`, `shadowing`).
//! Only what the block says on its own is checked here (types, names, a `data` that
//! disagrees with the derived one); every rule about how the model splits over the GPUs
//! (divisibility of the grid, heads, depth, experts, batch; memory) is the planner's, which
//! `fmoec check` runs on the block as written.

use std::rc::Rc;

use super::errors;
use super::eval::Ctx;
use super::fields::{boolean, int, symbol, uint};
use super::model::*;
use super::scope::{EntityKind, ModId};
use super::value::{Bound, Type, Value};
use super::Checker;
use crate::diag::{did_you_mean, Span};
use crate::syntax::ast::{self, BlockKind, CmpOp};

pub const PARALLEL_FIELDS: &[&str] = &[
    "gpus",
    "tensor",
    "pipeline",
    "data",
    "experts",
    "expert_slicing",
    "micro_batch",
    "smart_schedule",
    "shadowing",
    "virtual_stages",
];

/// The profile of a file without a `parallel` block (or with a bare GPU count).
pub const DEFAULT_HARDWARE: &str = "h100_sxm";

fn pos_int() -> Type {
    Type::Int(vec![Bound {
        op: CmpOp::Ge,
        value: 1.0,
    }])
}

impl Checker<'_> {
    /// The single-GPU default for files without a `parallel` block.
    pub(crate) fn default_parallel(&mut self, at: Span) -> Option<Parallel> {
        let hardware = self.std_hardware(DEFAULT_HARDWARE)?;
        Some(Parallel {
            declared: false,
            gpus: 1,
            hardware,
            tensor: 1,
            pipeline: 1,
            data: 1,
            experts: ExpertGroup::AcrossData,
            expert_slicing: false,
            micro_batch: None,
            smart_schedule: SmartSchedule::Off,
            shadowing: Shadowing::Off,
            virtual_stages: 1,
            spans: ParallelSpans {
                block: at,
                ..Default::default()
            },
        })
    }

    fn std_hardware(&mut self, name: &str) -> Option<Hardware> {
        let m = self.std_module("hardware")?;
        match self.lookup(m, name)?.kind {
            EntityKind::Block(b) if b.kind == BlockKind::Hardware => self.hardware(m, &b),
            _ => None,
        }
    }

    pub(crate) fn parallel(&mut self, m: ModId, block: &Rc<ast::Block>) -> Option<Parallel> {
        let fields = self.block_fields(block, PARALLEL_FIELDS);
        let ctx = Ctx::module(m);
        let mut spans = ParallelSpans {
            block: block.kw_span,
            ..Default::default()
        };
        let mut ok = true;

        let (gpus, hardware) =
            self.parallel_gpus(m, &fields, ctx, block.kw_span, &mut spans, &mut ok);
        let hardware = match hardware {
            Some(h) => Some(h),
            None => self.std_hardware(DEFAULT_HARDWARE),
        };
        let tensor_v = self.typed_field(&fields, "tensor", &pos_int(), ctx);
        let pipeline_v = self.typed_field(&fields, "pipeline", &pos_int(), ctx);
        ok &= !fields.contains_key("tensor") || tensor_v.is_some();
        ok &= !fields.contains_key("pipeline") || pipeline_v.is_some();
        let tensor = tensor_v.as_ref().map(uint).unwrap_or(1);
        let pipeline = pipeline_v.as_ref().map(uint).unwrap_or(1);
        spans.tensor = tensor_v.as_ref().map(|v| v.span).unwrap_or(block.kw_span);
        spans.pipeline = pipeline_v.as_ref().map(|v| v.span).unwrap_or(block.kw_span);
        // Whether `gpus` splits into tensor x pipeline groups is the planner's rule (P0001);
        // until it has said so, `data` is only a stand-in.
        let mp = tensor.saturating_mul(pipeline).max(1);
        let divides = gpus % mp == 0;
        let data = (gpus / mp).max(1);
        spans.data = spans.gpus;
        if let Some(dv) = self.typed_field(&fields, "data", &pos_int(), ctx) {
            spans.data = dv.span;
            if ok && divides && uint(&dv) != data {
                self.sink.push(errors::data_mismatch(
                    dv.span,
                    uint(&dv),
                    data,
                    gpus,
                    tensor,
                    pipeline,
                    spans.gpus,
                ));
            }
        } else if fields.contains_key("data") {
            ok = false;
        }

        let experts = self.expert_group(&fields, ctx, &mut spans, &mut ok);
        let expert_slicing = match self.typed_field(&fields, "expert_slicing", &Type::Bool, ctx) {
            Some(v) => {
                let on = boolean(&v);
                if on && tensor == 1 {
                    self.sink.push(errors::slicing_without_tensor(v.span));
                }
                on
            }
            None => {
                ok &= !fields.contains_key("expert_slicing");
                false
            }
        };
        let micro_batch = match self.typed_field(&fields, "micro_batch", &pos_int(), ctx) {
            Some(v) => {
                spans.micro_batch = v.span;
                Some(uint(&v))
            }
            None => {
                ok &= !fields.contains_key("micro_batch");
                None
            }
        };
        let smart_schedule = self.smart_schedule(&fields, ctx, &mut spans, &mut ok);
        let shadowing_ty = Type::Enum(vec!["off".into(), "dynamic".into()]);
        let shadowing = match self.typed_field(&fields, "shadowing", &shadowing_ty, ctx) {
            Some(v) => {
                spans.shadowing = v.span;
                match symbol(&v) {
                    "dynamic" => Shadowing::Dynamic,
                    _ => Shadowing::Off,
                }
            }
            None => {
                ok &= !fields.contains_key("shadowing");
                Shadowing::Off
            }
        };
        let virtual_stages = match self.typed_field(&fields, "virtual_stages", &pos_int(), ctx) {
            // Without a pipeline in effect they do nothing: the planner's W0011 says so, as
            // it knows the command line's `--pipeline`.
            Some(v) => {
                spans.virtual_stages = v.span;
                uint(&v)
            }
            None => {
                ok &= !fields.contains_key("virtual_stages");
                1
            }
        };
        let hardware = hardware?;
        ok.then_some(Parallel {
            declared: true,
            gpus,
            hardware,
            tensor,
            pipeline,
            data,
            experts,
            expert_slicing,
            micro_batch,
            smart_schedule,
            shadowing,
            virtual_stages,
            spans,
        })
    }

    /// `gpus = N of profile`, or a bare `N` on the default profile: the count, and the
    /// profile where the file names one (`None`: the default).
    fn parallel_gpus(
        &mut self,
        m: ModId,
        fields: &std::collections::BTreeMap<String, &ast::Field>,
        ctx: Ctx,
        kw: Span,
        spans: &mut ParallelSpans,
        ok: &mut bool,
    ) -> (u64, Option<Hardware>) {
        let mut gpus = 1;
        let mut hardware = None;
        match fields.get("gpus") {
            Some(f) => {
                spans.gpus = f.value.span;
                let v = self.eval(&f.value, ctx);
                let (count, hw) = match &v.value {
                    Value::Of(count, hw) => ((**count).clone(), Some(hw.clone())),
                    _ => (v.clone(), None),
                };
                let count = self.conform(count, &pos_int(), "field `gpus`", ctx);
                match int(&count) {
                    Some(n) => gpus = n as u64,
                    None => *ok = false,
                }
                if let (
                    Some(hw),
                    ast::ExprKind::Of {
                        hardware: ident, ..
                    },
                ) = (hw, &f.value.kind)
                {
                    spans.hardware = ident.span;
                    hardware = self.hardware_by_name(m, &hw, ident.span);
                    *ok &= hardware.is_some();
                }
            }
            None => {
                self.sink.push(errors::missing_field(
                    kw,
                    "gpus",
                    "parallel",
                    "`N of profile`",
                ));
                *ok = false;
            }
        }
        (gpus, hardware)
    }

    /// `experts = across(data) | replicated | groups_of(N)`; across data when not written.
    fn expert_group(
        &mut self,
        fields: &std::collections::BTreeMap<String, &ast::Field>,
        ctx: Ctx,
        spans: &mut ParallelSpans,
        ok: &mut bool,
    ) -> ExpertGroup {
        match fields.get("experts") {
            None => ExpertGroup::AcrossData,
            Some(f) => {
                spans.experts = f.value.span;
                let v = self.eval(&f.value, ctx);
                match &v.value {
                    Value::Across(g) if g == "data" => ExpertGroup::AcrossData,
                    Value::Across(g) => {
                        let gspan = match &f.value.kind {
                            ast::ExprKind::Across(i) => i.span,
                            _ => f.value.span,
                        };
                        self.sink
                            .push(errors::across_what(gspan, g, did_you_mean(g, ["data"])));
                        *ok = false;
                        ExpertGroup::AcrossData
                    }
                    Value::Symbol(s) if s == "replicated" => ExpertGroup::Replicated,
                    Value::Ctor(c) if c.name == "groups_of" => {
                        // the planner's rules about the group point at its size
                        if let Some(size) = c.arg("size") {
                            spans.experts = size.span;
                        }
                        let size = c.arg("size").map(uint).unwrap_or(1);
                        ExpertGroup::Size { size }
                    }
                    Value::Error => {
                        *ok = false;
                        ExpertGroup::AcrossData
                    }
                    Value::Symbol(s) => {
                        let help = did_you_mean(s, ["replicated"]);
                        self.sink.push(errors::bad_expert_group(
                            f.value.span,
                            &v.value.describe(),
                            help,
                        ));
                        *ok = false;
                        ExpertGroup::AcrossData
                    }
                    other => {
                        self.sink.push(errors::bad_expert_group(
                            f.value.span,
                            &other.describe(),
                            None,
                        ));
                        *ok = false;
                        ExpertGroup::AcrossData
                    }
                }
            }
        }
    }

    /// `smart_schedule = off | auto | chunks(N)`; whether `chunks` exceeds the expert group
    /// is the planner's (it knows the group).
    fn smart_schedule(
        &mut self,
        fields: &std::collections::BTreeMap<String, &ast::Field>,
        ctx: Ctx,
        spans: &mut ParallelSpans,
        ok: &mut bool,
    ) -> SmartSchedule {
        let Some(f) = fields.get("smart_schedule") else {
            return SmartSchedule::Off;
        };
        spans.smart_schedule = f.value.span;
        let v = self.eval(&f.value, ctx);
        match &v.value {
            Value::Symbol(s) if s == "auto" => SmartSchedule::Auto,
            Value::Symbol(s) if s == "off" => SmartSchedule::Off,
            Value::Ctor(c) if c.name == "chunks" => {
                if let Some(count) = c.arg("count") {
                    spans.smart_schedule = count.span;
                }
                SmartSchedule::Chunks {
                    count: c.arg("count").map(uint).unwrap_or(1),
                }
            }
            Value::Error => {
                *ok = false;
                SmartSchedule::Off
            }
            other => {
                let help = match other {
                    Value::Symbol(s) => did_you_mean(s, ["auto", "off"]),
                    _ => None,
                };
                self.sink.push(errors::bad_smart_schedule(
                    f.value.span,
                    &other.describe(),
                    help,
                ));
                *ok = false;
                SmartSchedule::Off
            }
        }
    }

    fn hardware_by_name(&mut self, m: ModId, name: &str, span: Span) -> Option<Hardware> {
        match self.lookup(m, name) {
            Some(r) => match r.kind {
                EntityKind::Block(b) if b.kind == BlockKind::Hardware => {
                    self.hardware(r.module, &b)
                }
                other => {
                    self.sink
                        .push(errors::not_hardware(span, name, other.describe()));
                    None
                }
            },
            None if self.user_hardware.contains_key(name) => self.user_hardware.get(name).cloned(),
            None => {
                let help = self.not_found_help(name, Self::hardware_names);
                self.sink.push(errors::unknown_hardware(span, name, help));
                None
            }
        }
    }

    fn hardware_names(&self) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(|m| {
                m.items.iter().filter_map(|(n, e)| match &e.kind {
                    EntityKind::Block(b) if b.kind == BlockKind::Hardware => Some(n.clone()),
                    _ => None,
                })
            })
            .chain(self.user_hardware.keys().cloned())
            .collect()
    }
}
