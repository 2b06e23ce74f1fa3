//! The `parallel` block: GPUs and their hardware profile, tensor and pipeline sizes,
//! the derived (or checked) data size, the expert group, expert slicing, micro-batch,
//! virtual pipeline stages, and FasterMoE's options for the expert exchange
//! (`smart_schedule`, `shadowing`).
//! Only what the block says on its own is checked here (types, names, a `data` that
//! disagrees with the derived one); every rule about how the model splits over the GPUs
//! (divisibility of the grid, heads, depth, experts, batch; memory) is the planner's, which
//! `fmoec check` runs on the block as written.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::errors;
use super::eval::Ctx;
use super::fields::{boolean, int, symbol, uint};
use super::model::*;
use super::scope::{EntityKind, ModId};
use super::value::{Type, Value, V};
use super::Checker;
use crate::diag::{did_you_mean, Span};
use crate::syntax::ast::{self, BlockKind};

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

/// A `parallel` block as the phases of [`Checker::parallel`] read it: its fields, evaluated
/// in its module, where its values are written, and whether every field written was right.
struct ParallelBlock<'b, 'e> {
    fields: BTreeMap<String, &'b ast::Field>,
    ctx: Ctx<'e>,
    kw: Span,
    spans: ParallelSpans,
    ok: bool,
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

    /// Checks a `parallel` block into a [`Parallel`], in its phases: the GPUs and their
    /// profile, the grid (tensor, pipeline, data), the expert group, then the options. Every
    /// field is read whatever became of the others, so that each mistake is reported in one
    /// pass.
    pub(crate) fn parallel(&mut self, m: ModId, block: &Rc<ast::Block>) -> Option<Parallel> {
        let mut b = ParallelBlock {
            fields: self.block_fields(block, PARALLEL_FIELDS),
            ctx: Ctx::module(m),
            kw: block.kw_span,
            spans: ParallelSpans {
                block: block.kw_span,
                ..Default::default()
            },
            ok: true,
        };
        let (gpus, hardware) = self.parallel_gpus(&mut b);
        let hardware = match hardware {
            Some(h) => Some(h),
            None => self.std_hardware(DEFAULT_HARDWARE),
        };
        let (tensor, pipeline, data) = self.parallel_grid(&mut b, gpus);
        let experts = self.expert_group(&mut b);
        let expert_slicing = self.expert_slicing(&mut b, tensor);
        let micro_batch = self
            .parallel_field(&mut b, "micro_batch", &Type::positive_int())
            .map(|v| {
                b.spans.micro_batch = v.span;
                uint(&v)
            });
        let smart_schedule = self.smart_schedule(&mut b);
        let shadowing = self.shadowing(&mut b);
        // Without a pipeline in effect they do nothing: the planner's W0011 says so, as it
        // knows the command line's `--pipeline`.
        let virtual_stages =
            match self.parallel_field(&mut b, "virtual_stages", &Type::positive_int()) {
                Some(v) => {
                    b.spans.virtual_stages = v.span;
                    uint(&v)
                }
                None => 1,
            };
        let hardware = hardware?;
        b.ok.then_some(Parallel {
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
            spans: b.spans,
        })
    }

    /// Field `name` of the block conformed to `ty`: `None` where it is not written or is
    /// wrong, and a wrong one (reported) fails the block. The rule of every field of the
    /// block but `gpus`, which was written out at each.
    fn parallel_field(&mut self, b: &mut ParallelBlock, name: &str, ty: &Type) -> Option<V> {
        let v = self.typed_field(&b.fields, name, ty, b.ctx);
        b.ok &= v.is_some() || !b.fields.contains_key(name);
        v
    }

    /// `tensor`, `pipeline` (1 where not written) and the data size they leave of `gpus`,
    /// checked against a written `data`.
    fn parallel_grid(&mut self, b: &mut ParallelBlock, gpus: u64) -> (u64, u64, u64) {
        let tensor_v = self.parallel_field(b, "tensor", &Type::positive_int());
        let pipeline_v = self.parallel_field(b, "pipeline", &Type::positive_int());
        let tensor = tensor_v.as_ref().map(uint).unwrap_or(1);
        let pipeline = pipeline_v.as_ref().map(uint).unwrap_or(1);
        b.spans.tensor = tensor_v.as_ref().map(|v| v.span).unwrap_or(b.kw);
        b.spans.pipeline = pipeline_v.as_ref().map(|v| v.span).unwrap_or(b.kw);
        // Whether `gpus` splits into tensor x pipeline groups is the planner's rule (P0001);
        // until it has said so, `data` is only a stand-in.
        let mp = tensor.saturating_mul(pipeline).max(1);
        let divides = gpus % mp == 0;
        let data = (gpus / mp).max(1);
        b.spans.data = b.spans.gpus;
        if let Some(dv) = self.parallel_field(b, "data", &Type::positive_int()) {
            b.spans.data = dv.span;
            if b.ok && divides && uint(&dv) != data {
                self.sink.push(errors::data_mismatch(
                    dv.span,
                    uint(&dv),
                    data,
                    gpus,
                    tensor,
                    pipeline,
                    b.spans.gpus,
                ));
            }
        }
        (tensor, pipeline, data)
    }

    /// `gpus = N of profile`, or a bare `N` on the default profile: the count, and the
    /// profile where the file names one (`None`: the default).
    fn parallel_gpus(&mut self, b: &mut ParallelBlock) -> (u64, Option<Hardware>) {
        let mut gpus = 1;
        let mut hardware = None;
        match b.fields.get("gpus").copied() {
            Some(f) => {
                b.spans.gpus = f.value.span;
                let v = self.eval(&f.value, b.ctx);
                let (count, hw) = match &v.value {
                    Value::Of(count, hw) => ((**count).clone(), Some(hw.clone())),
                    _ => (v.clone(), None),
                };
                let count = self.conform(count, &Type::positive_int(), "field `gpus`", b.ctx);
                match int(&count) {
                    Some(n) => gpus = n as u64,
                    None => b.ok = false,
                }
                if let (
                    Some(hw),
                    ast::ExprKind::Of {
                        hardware: ident, ..
                    },
                ) = (hw, &f.value.kind)
                {
                    b.spans.hardware = ident.span;
                    hardware = self.hardware_by_name(b.ctx.module, &hw, ident.span);
                    b.ok &= hardware.is_some();
                }
            }
            None => {
                self.sink.push(errors::missing_field(
                    b.kw,
                    "gpus",
                    "parallel",
                    "`N of profile`",
                ));
                b.ok = false;
            }
        }
        (gpus, hardware)
    }

    /// `expert_slicing = true | false` (off where not written); on without tensor
    /// parallelism it slices nothing (a warning).
    fn expert_slicing(&mut self, b: &mut ParallelBlock, tensor: u64) -> bool {
        let Some(v) = self.parallel_field(b, "expert_slicing", &Type::Bool) else {
            return false;
        };
        let on = boolean(&v);
        if on && tensor == 1 {
            self.sink.push(errors::slicing_without_tensor(v.span));
        }
        on
    }

    /// `shadowing = off | dynamic`; off where not written.
    fn shadowing(&mut self, b: &mut ParallelBlock) -> Shadowing {
        let ty = Type::Enum(vec!["off".into(), "dynamic".into()]);
        let Some(v) = self.parallel_field(b, "shadowing", &ty) else {
            return Shadowing::Off;
        };
        b.spans.shadowing = v.span;
        match symbol(&v) {
            "dynamic" => Shadowing::Dynamic,
            _ => Shadowing::Off,
        }
    }

    /// `experts = across(data) | replicated | groups_of(N)`; across data when not written.
    fn expert_group(&mut self, b: &mut ParallelBlock) -> ExpertGroup {
        match b.fields.get("experts").copied() {
            None => ExpertGroup::AcrossData,
            Some(f) => {
                b.spans.experts = f.value.span;
                let v = self.eval(&f.value, b.ctx);
                match &v.value {
                    Value::Across(g) if g == "data" => ExpertGroup::AcrossData,
                    Value::Across(g) => {
                        let gspan = match &f.value.kind {
                            ast::ExprKind::Across(i) => i.span,
                            _ => f.value.span,
                        };
                        self.sink
                            .push(errors::across_what(gspan, g, did_you_mean(g, ["data"])));
                        b.ok = false;
                        ExpertGroup::AcrossData
                    }
                    Value::Symbol(s) if s == "replicated" => ExpertGroup::Replicated,
                    Value::Ctor(c) if c.name == "groups_of" => {
                        // the planner's rules about the group point at its size
                        if let Some(size) = c.arg("size") {
                            b.spans.experts = size.span;
                        }
                        let size = c.arg("size").map(uint).unwrap_or(1);
                        ExpertGroup::Size { size }
                    }
                    Value::Error => {
                        b.ok = false;
                        ExpertGroup::AcrossData
                    }
                    Value::Symbol(s) => {
                        let help = did_you_mean(s, ["replicated"]);
                        self.sink.push(errors::bad_expert_group(
                            f.value.span,
                            &v.value.describe(),
                            help,
                        ));
                        b.ok = false;
                        ExpertGroup::AcrossData
                    }
                    other => {
                        self.sink.push(errors::bad_expert_group(
                            f.value.span,
                            &other.describe(),
                            None,
                        ));
                        b.ok = false;
                        ExpertGroup::AcrossData
                    }
                }
            }
        }
    }

    /// `smart_schedule = off | auto | chunks(N)`; whether `chunks` exceeds the expert group
    /// is the planner's (it knows the group).
    fn smart_schedule(&mut self, b: &mut ParallelBlock) -> SmartSchedule {
        let Some(f) = b.fields.get("smart_schedule").copied() else {
            return SmartSchedule::Off;
        };
        b.spans.smart_schedule = f.value.span;
        let v = self.eval(&f.value, b.ctx);
        match &v.value {
            Value::Symbol(s) if s == "auto" => SmartSchedule::Auto,
            Value::Symbol(s) if s == "off" => SmartSchedule::Off,
            Value::Ctor(c) if c.name == "chunks" => {
                if let Some(count) = c.arg("count") {
                    b.spans.smart_schedule = count.span;
                }
                SmartSchedule::Chunks {
                    count: c.arg("count").map(uint).unwrap_or(1),
                }
            }
            Value::Error => {
                b.ok = false;
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
                b.ok = false;
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

    /// The hardware profiles a file may name: those declared (the stdlib's and the file's),
    /// then the user's own from `fmoec.toml`.
    fn hardware_names(&self) -> Vec<String> {
        let mut names = self.block_names(BlockKind::Hardware);
        names.extend(self.user_hardware.keys().cloned());
        names
    }
}
