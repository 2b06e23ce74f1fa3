//! `hardware` profiles and `megatron` targets: blocks of plain fields read into
//! [`Hardware`] and [`MegatronTarget`]. The stdlib declares them; a user file may add
//! its own hardware profile.
//!
//! A target's capabilities are data: [`CAPABILITIES`] lists what every declaration states
//! (the values of one model property each target accepts); this module checks that they are
//! stated and well-formed, and knows nothing about what emit makes of them.

use std::rc::Rc;

use super::eval::Ctx;
use std::collections::BTreeMap;

use super::fields::{boolean, float, string, symbol, uint};
use super::model::*;
use super::scope::ModId;
use super::value::{Bound, Type, Value, V};
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

/// The fields of a `megatron` declaration besides its capabilities.
pub const MEGATRON_FIELDS: &[&str] =
    &["version", "tree", "templates", "patched_files", "torch_min"];

/// What the values of one capability are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapabilityValues {
    /// A set of these names (a tuple, or one name).
    OneOf(&'static [&'static str]),
    /// A set of `true` / `false` (the values of a boolean property of the model).
    Bools,
    /// `true` or `false`: whether the target can do it at all.
    Flag,
}

impl CapabilityValues {
    /// How the values are written in a declaration (`(layernorm | rmsnorm)`), for the
    /// diagnostic of a declaration that does not state them.
    pub(crate) fn written(&self) -> String {
        match self {
            CapabilityValues::OneOf(names) => format!("({})", names.join(" | ")),
            CapabilityValues::Bools => "(true | false)".to_string(),
            CapabilityValues::Flag => "true | false".to_string(),
        }
    }
}

/// One capability a `megatron` declaration must state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapabilitySpec {
    pub field: &'static str,
    /// What it is about, for `fmoec emit --megatron list`.
    pub about: &'static str,
    pub values: CapabilityValues,
}

/// Every capability, in the order `fmoec emit --megatron list` prints them. A target's
/// declaration states each one; emit derives its diagnostics from them (`emit::support`).
pub const CAPABILITIES: &[CapabilitySpec] = &[
    CapabilitySpec {
        field: "norm",
        about: "normalisation",
        values: CapabilityValues::OneOf(&["layernorm", "rmsnorm"]),
    },
    CapabilitySpec {
        field: "positions",
        about: "position embeddings",
        values: CapabilityValues::OneOf(&["learned", "rotary"]),
    },
    CapabilitySpec {
        field: "attention",
        about: "attention",
        values: CapabilityValues::OneOf(&["multi_head", "grouped_query"]),
    },
    CapabilitySpec {
        field: "bias",
        about: "linear layers with biases",
        values: CapabilityValues::Bools,
    },
    CapabilitySpec {
        field: "tied_embeddings",
        about: "LM head tied to the embedding",
        values: CapabilityValues::Bools,
    },
    CapabilitySpec {
        field: "dense_act",
        about: "dense MLP activations",
        values: CapabilityValues::OneOf(&["gelu", "relu", "swiglu"]),
    },
    CapabilitySpec {
        field: "dense_hidden",
        about: "dense MLP hidden size other than 4 x width",
        values: CapabilityValues::Flag,
    },
    CapabilitySpec {
        field: "expert_act",
        about: "expert activations",
        values: CapabilityValues::OneOf(&["gelu", "relu", "swiglu"]),
    },
    CapabilitySpec {
        field: "gates",
        about: "gates",
        values: CapabilityValues::OneOf(crate::gates::NAMES),
    },
    CapabilitySpec {
        field: "native_gates",
        about: "gates its own MoE router reproduces (trained natively)",
        values: CapabilityValues::OneOf(crate::gates::NAMES),
    },
    CapabilitySpec {
        field: "shared_experts",
        about: "shared experts",
        values: CapabilityValues::Flag,
    },
    CapabilitySpec {
        field: "shared_expert_bias",
        about: "shared experts with biases",
        values: CapabilityValues::Flag,
    },
    CapabilitySpec {
        field: "precision",
        about: "precision",
        values: CapabilityValues::OneOf(&["fp32", "fp16", "bf16"]),
    },
    CapabilitySpec {
        field: "expert_groups",
        about: "expert groups",
        values: CapabilityValues::OneOf(&["across_data", "groups", "replicated"]),
    },
    CapabilitySpec {
        field: "expert_slicing",
        about: "experts sliced over tensor ranks",
        values: CapabilityValues::Bools,
    },
    CapabilitySpec {
        field: "sliced_expert_bias",
        about: "experts with biases sliced over tensor ranks",
        values: CapabilityValues::Flag,
    },
    CapabilitySpec {
        field: "runtimes",
        about: "MoE runtimes (--runtime)",
        values: CapabilityValues::OneOf(&["fmoec", "fastmoe"]),
    },
    CapabilitySpec {
        field: "native_expert_parallel",
        about: "Megatron's own MoE and expert parallelism",
        values: CapabilityValues::Flag,
    },
    CapabilitySpec {
        field: "distributed_optimizer",
        about: "distributed optimizer",
        values: CapabilityValues::Flag,
    },
    CapabilitySpec {
        field: "pinned_vocab",
        about: "the file's vocabulary (padded only to the tensor size)",
        values: CapabilityValues::Flag,
    },
];

impl Checker<'_> {
    /// The profile a `hardware` block declares, read (and its errors reported) on first use.
    pub(crate) fn hardware(&mut self, m: ModId, block: &Rc<ast::Block>) -> Option<Hardware> {
        if let Some(read) = self.hardware_read.get(&block.span) {
            return read.clone();
        }
        let read = self.read_hardware(m, block);
        self.hardware_read.insert(block.span, read.clone());
        read
    }

    fn read_hardware(&mut self, m: ModId, block: &Rc<ast::Block>) -> Option<Hardware> {
        let fields = self.block_fields(block, HARDWARE_FIELDS);
        let ctx = Ctx::module(m);
        let kw = block.kw_span;
        let pos_int = Type::positive_int();
        let pos_float = Type::Float(vec![Bound {
            op: CmpOp::Gt,
            value: 0.0,
        }]);
        let fp8 = self.typed_field(&fields, "fp8_tflops", &pos_float, ctx);
        let fp8_bad = fields.contains_key("fp8_tflops") && fp8.is_none();
        let mut missing = Vec::new();
        let mut req = |this: &mut Self, name: &str, ty: &Type| {
            this.field_noting_missing(&fields, name, ty, ctx, &mut missing)
        };
        let memory = req(self, "memory", &pos_int);
        let bf16 = req(self, "bf16_tflops", &pos_float);
        let fp16 = req(self, "fp16_tflops", &pos_float);
        let fp32 = req(self, "fp32_tflops", &pos_float);
        let hbm = req(self, "hbm_gbps", &pos_float);
        let nvlink = req(self, "nvlink_gbps", &pos_float);
        let network = req(self, "network_gbps", &pos_float);
        let per_node = req(self, "gpus_per_node", &pos_int);
        if !missing.is_empty() {
            self.sink
                .push(errors::missing_fields(kw, "hardware", &missing));
        }
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

    /// Checks a `megatron` declaration into a [`MegatronTarget`], in its phases: its plain
    /// fields, its patched files, its capabilities; every field it lacks is reported in one
    /// diagnostic at the keyword.
    pub(crate) fn megatron_target(
        &mut self,
        m: ModId,
        block: &Rc<ast::Block>,
    ) -> Option<MegatronTarget> {
        let known: Vec<&str> = MEGATRON_FIELDS
            .iter()
            .copied()
            .chain(CAPABILITIES.iter().map(|c| c.field))
            .collect();
        let fields = self.block_fields(block, &known);
        let ctx = Ctx::module(m);
        let mut missing = Vec::new();
        let mut req = |this: &mut Self, name: &str| {
            this.field_noting_missing(&fields, name, &Type::Str, ctx, &mut missing)
        };
        let version = req(self, "version");
        let tree = req(self, "tree");
        let templates = req(self, "templates");
        let torch_min = req(self, "torch_min");
        let files = self.patched_files(&fields, ctx, &mut missing);
        let capabilities = self.capabilities(&fields, ctx, &mut missing);
        if !missing.is_empty() {
            self.sink
                .push(errors::missing_fields(block.kw_span, "megatron", &missing));
        }
        let capabilities = capabilities?;
        Some(MegatronTarget {
            name: block.name.as_ref()?.name.clone(),
            version: string(&version?),
            tree: string(&tree?),
            templates: string(&templates?),
            patched_files: files?,
            torch_min: string(&torch_min?),
            capabilities,
        })
    }

    /// `patched_files = ("a.py", ...)`: the files a target's patch touches (a wrong item
    /// reported and left out); noted in `missing` where not written.
    fn patched_files(
        &mut self,
        fields: &BTreeMap<String, &ast::Field>,
        ctx: Ctx,
        missing: &mut Vec<(String, String)>,
    ) -> Option<Vec<String>> {
        let Some(f) = fields.get("patched_files") else {
            missing.push(("patched_files".to_string(), "(string, ...)".to_string()));
            return None;
        };
        let v = self.eval(&f.value, ctx);
        let items = self.items(v, &Type::Str, "a patched file", ctx);
        Some(items.iter().map(string).collect())
    }

    /// Every capability of [`CAPABILITIES`] as the declaration states it; each one it does
    /// not state is noted in `missing` (with the values it takes), and makes the target
    /// incomplete (`None`).
    fn capabilities(
        &mut self,
        fields: &BTreeMap<String, &ast::Field>,
        ctx: Ctx,
        missing: &mut Vec<(String, String)>,
    ) -> Option<BTreeMap<String, Capability>> {
        let mut capabilities = BTreeMap::new();
        let mut complete = true;
        for spec in CAPABILITIES {
            let Some(f) = fields.get(spec.field) else {
                missing.push((spec.field.to_string(), spec.values.written()));
                complete = false;
                continue;
            };
            let capability = self.capability(spec, f, ctx);
            capabilities.insert(spec.field.to_string(), capability);
        }
        complete.then_some(capabilities)
    }

    /// One capability's values as field `f` states them (a wrong value reported and left
    /// out).
    fn capability(&mut self, spec: &CapabilitySpec, f: &ast::Field, ctx: Ctx) -> Capability {
        let v = self.eval(&f.value, ctx);
        let what = format!("capability `{}`", spec.field);
        match spec.values {
            CapabilityValues::Flag => {
                let v = self.conform(v, &Type::Bool, &what, ctx);
                Capability::Flag(boolean(&v))
            }
            CapabilityValues::Bools => {
                let items = self.items(v, &Type::Bool, &what, ctx);
                Capability::Set(items.iter().map(|b| boolean(b).to_string()).collect())
            }
            CapabilityValues::OneOf(names) => {
                let ty = Type::Enum(names.iter().map(|n| n.to_string()).collect());
                let items = self.items(v, &ty, &what, ctx);
                Capability::Set(items.iter().map(|s| symbol(s).to_string()).collect())
            }
        }
    }

    /// The items of a tuple (or one value standing alone), each conformed to `ty`; erroneous
    /// items are reported and left out.
    fn items(&mut self, v: V, ty: &Type, what: &str, ctx: Ctx) -> Vec<V> {
        let items = match v.value {
            Value::Tuple(items) => items,
            _ => vec![v],
        };
        items
            .into_iter()
            .map(|item| self.conform(item, ty, what, ctx))
            .filter(|item| !item.is_error())
            .collect()
    }
}
