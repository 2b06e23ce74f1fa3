//! `hardware` profiles and `megatron` targets: blocks of plain fields read into
//! [`Hardware`] and [`MegatronTarget`]. The stdlib declares them; a user file may add
//! its own hardware profile.

use std::rc::Rc;

use super::eval::Ctx;
use super::fields::{float, string, uint};
use super::model::*;
use super::scope::ModId;
use super::value::{Bound, Type, Value};
use super::{errors, Checker};
use crate::syntax::ast::{self, CmpOp};

pub const HARDWARE_FIELDS: &[&str] = &[
    "memory",
    "bf16_tflops",
    "fp16_tflops",
    "fp32_tflops",
    "fp8_tflops",
    "hbm_gbps",
    "nvlink_gbps",
    "network_gbps",
    "gpus_per_node",
];

pub const MEGATRON_FIELDS: &[&str] = &[
    "version",
    "commit",
    "transformer_module",
    "patched_files",
    "torch_min",
];

impl Checker<'_> {
    pub(crate) fn hardware(&mut self, m: ModId, block: &Rc<ast::Block>) -> Option<Hardware> {
        let fields = self.block_fields(block, HARDWARE_FIELDS);
        let ctx = Ctx::module(m);
        let kw = block.kw_span;
        let pos_int = Type::Int(vec![Bound {
            op: CmpOp::Ge,
            value: 1.0,
        }]);
        let pos_float = Type::Float(vec![Bound {
            op: CmpOp::Gt,
            value: 0.0,
        }]);
        let req = |this: &mut Self, name: &str, ty: &Type| {
            this.required_field(&fields, name, ty, ctx, kw, "hardware")
        };
        let memory = req(self, "memory", &pos_int);
        let bf16 = req(self, "bf16_tflops", &pos_float);
        let fp16 = req(self, "fp16_tflops", &pos_float);
        let fp32 = req(self, "fp32_tflops", &pos_float);
        let fp8 = self.typed_field(&fields, "fp8_tflops", &pos_float, ctx);
        let fp8_bad = fields.contains_key("fp8_tflops") && fp8.is_none();
        let hbm = req(self, "hbm_gbps", &pos_float);
        let nvlink = req(self, "nvlink_gbps", &pos_float);
        let network = req(self, "network_gbps", &pos_float);
        let per_node = req(self, "gpus_per_node", &pos_int);
        if fp8_bad {
            return None;
        }
        Some(Hardware {
            name: block.name.as_ref()?.name.clone(),
            memory_bytes: uint(&memory?),
            bf16_tflops: float(&bf16?),
            fp16_tflops: float(&fp16?),
            fp32_tflops: float(&fp32?),
            fp8_tflops: fp8.as_ref().map(float),
            hbm_gbps: float(&hbm?),
            nvlink_gbps: float(&nvlink?),
            network_gbps: float(&network?),
            gpus_per_node: uint(&per_node?),
        })
    }

    pub(crate) fn megatron_target(
        &mut self,
        m: ModId,
        block: &Rc<ast::Block>,
    ) -> Option<MegatronTarget> {
        let fields = self.block_fields(block, MEGATRON_FIELDS);
        let ctx = Ctx::module(m);
        let kw = block.kw_span;
        let req = |this: &mut Self, name: &str| {
            this.required_field(&fields, name, &Type::Str, ctx, kw, "megatron")
        };
        let version = req(self, "version");
        let commit = req(self, "commit");
        let module = req(self, "transformer_module");
        let torch_min = req(self, "torch_min");
        let files = match fields.get("patched_files") {
            Some(f) => {
                let v = self.eval(&f.value, ctx);
                match &v.value {
                    Value::Tuple(items) => {
                        let mut out = Vec::new();
                        for item in items {
                            let s = self.conform(item.clone(), &Type::Str, "a patched file", ctx);
                            out.push(string(&s));
                        }
                        Some(out)
                    }
                    Value::Str(s) => Some(vec![s.clone()]),
                    other => {
                        self.sink.push(errors::type_mismatch(
                            v.span,
                            "field `patched_files`",
                            "a tuple of strings",
                            &other.describe(),
                        ));
                        None
                    }
                }
            }
            None => {
                self.sink.push(errors::missing_field(
                    kw,
                    "patched_files",
                    "megatron",
                    "(string, ...)",
                ));
                None
            }
        };
        Some(MegatronTarget {
            version: string(&version?),
            commit: string(&commit?),
            transformer_module: string(&module?),
            patched_files: files?,
            torch_min: string(&torch_min?),
        })
    }
}
