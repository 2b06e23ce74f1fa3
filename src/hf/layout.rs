//! The tensors of a model by name and shape, without building them: fmoec's parameters as the
//! runtime's parameter store names them (the names checkpoints use), and the tensors of the
//! model's Hugging Face counterpart, each with the part of an fmoec parameter it is made of.
//! The export and the import both read this one table, in opposite directions.
//!
//! Knows nothing about libtorch or files. `tests/runtime/data.rs` checks that [`param_shapes`] is
//! what the runtime builds, for every example.

use crate::check::{Activation, Ffn, Layer, Mlp, Model, Moe, Norm, Positions};

use super::architecture::Architecture;

/// One fmoec parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamShape {
    pub name: String,
    pub shape: Vec<u64>,
    /// A stacked expert tensor: its first dimension is the layer's experts (a rank holds some).
    pub experts: bool,
}

/// Every parameter of `model`, in the order the runtime creates them.
pub fn param_shapes(model: &Model) -> Vec<ParamShape> {
    let mut params = Params {
        model,
        out: Vec::new(),
    };
    let d = model.width;
    params.add("embed.tokens".into(), vec![model.vocab, d], false);
    if model.positions == Positions::Learned {
        params.add("embed.positions".into(), vec![model.context, d], false);
    }
    for layer in &model.layers {
        params.block(layer);
    }
    params.norm("norm");
    if !model.tied_embeddings {
        params.add("head.weight".into(), vec![model.vocab, d], false);
    }
    params.out
}

/// The prefix of layer `layer`'s parameters ([`split_layer`] reads it back).
fn layer_prefix(layer: usize) -> String {
    format!("layers.{layer}")
}

/// The prefix of layer `layer`'s feed-forward parameters.
fn ffn_prefix(layer: usize) -> String {
    format!("{}.ffn", layer_prefix(layer))
}

/// Parameter `w` (`w1`, `w3`, `w2`, `b1`, `b2`) of layer `layer`'s dense MLP.
pub fn mlp_param(layer: usize, w: &str) -> String {
    format!("{}.{w}", ffn_prefix(layer))
}

/// Parameter `w` of layer `layer`'s stacked experts.
pub fn experts_param(layer: usize, w: &str) -> String {
    format!("{}.experts.{w}", ffn_prefix(layer))
}

/// A parameter's name as its layer and the rest (`layers.3.ffn.w1` -> 3, `ffn.w1`); `None`
/// for the parameters outside the layers.
pub fn split_layer(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    Some((layer.parse().ok()?, tail))
}

/// [`param_shapes`] as it goes: the model and the parameters listed so far.
struct Params<'m> {
    model: &'m Model,
    out: Vec<ParamShape>,
}

impl Params<'_> {
    fn add(&mut self, name: String, shape: Vec<u64>, experts: bool) {
        self.out.push(ParamShape {
            name,
            shape,
            experts,
        })
    }

    fn norm(&mut self, prefix: &str) {
        let d = self.model.width;
        self.add(format!("{prefix}.weight"), vec![d], false);
        if self.model.norm == Norm::LayerNorm {
            self.add(format!("{prefix}.bias"), vec![d], false);
        }
    }

    /// Transformer block `layer`: its norms, its attention, its feed-forward.
    fn block(&mut self, layer: &Layer) {
        let d = self.model.width;
        let a = &self.model.attention;
        let qkv_out = (a.heads + 2 * a.kv_heads) * a.head_dim;
        let p = layer_prefix(layer.index);
        self.norm(&format!("{p}.norm1"));
        self.add(format!("{p}.attn.qkv.weight"), vec![d, qkv_out], false);
        self.add(
            format!("{p}.attn.proj.weight"),
            vec![a.heads * a.head_dim, d],
            false,
        );
        if self.model.bias {
            self.add(format!("{p}.attn.qkv.bias"), vec![qkv_out], false);
            self.add(format!("{p}.attn.proj.bias"), vec![d], false);
        }
        self.norm(&format!("{p}.norm2"));
        match &layer.ffn {
            Ffn::Dense(m) => self.mlp(&ffn_prefix(layer.index), m, m.hidden),
            Ffn::Moe(m) => self.moe(layer.index, m),
        }
    }

    /// An MLP's `prefix.{w1,w3,w2,b1,b2}`.
    fn mlp(&mut self, prefix: &str, mlp: &Mlp, hidden: u64) {
        let d = self.model.width;
        self.add(format!("{prefix}.w1"), vec![d, hidden], false);
        if mlp.act == Activation::Swiglu {
            self.add(format!("{prefix}.w3"), vec![d, hidden], false);
        }
        self.add(format!("{prefix}.w2"), vec![hidden, d], false);
        if self.model.bias {
            self.add(format!("{prefix}.b1"), vec![hidden], false);
            self.add(format!("{prefix}.b2"), vec![d], false);
        }
    }

    /// An MoE layer: the gate's parameters, the stacked experts, the shared experts as one
    /// MLP.
    fn moe(&mut self, layer: usize, m: &Moe) {
        let d = self.model.width;
        let ffn = ffn_prefix(layer);
        for g in crate::gates::of(m.gate.kind).params_with(self.model.bias) {
            self.add(
                format!("{ffn}.gate.{}", g.name),
                g.shape.dims(d, m.experts),
                false,
            );
        }
        let (e, h) = (m.experts, m.expert.hidden);
        self.add(experts_param(layer, "w1"), vec![e, d, h], true);
        if m.expert.act == Activation::Swiglu {
            self.add(experts_param(layer, "w3"), vec![e, d, h], true);
        }
        self.add(experts_param(layer, "w2"), vec![e, h, d], true);
        if self.model.bias {
            self.add(experts_param(layer, "b1"), vec![e, h], true);
            self.add(experts_param(layer, "b2"), vec![e, d], true);
        }
        if let Some(s) = &m.shared {
            self.mlp(
                &format!("{ffn}.shared"),
                &s.expert,
                s.count * s.expert.hidden,
            );
        }
    }
}

/// The part of an fmoec parameter a Hugging Face tensor holds:
/// `hf = scale · transpose?(param[expert][..., columns])`.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub param: String,
    /// The expert's row of a stacked expert tensor.
    pub expert: Option<u64>,
    /// `(offset, length)` along the parameter's last dimension (q, k, v of the fused `qkv`).
    pub columns: Option<(u64, u64)>,
    /// fmoec stores linear weights `[in, out]`, transformers `[out, in]`.
    pub transposed: bool,
    pub scale: f64,
}

/// What a Hugging Face tensor is made of.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Param(Part),
    /// No fmoec counterpart: zeros that make the architecture compute what fmoec computes
    /// (an import requires them to be zero).
    Zero {
        why: &'static str,
    },
}

/// One tensor of the Hugging Face checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub source: Source,
}

fn part(param: String) -> Part {
    Part {
        param,
        expert: None,
        columns: None,
        transposed: false,
        scale: 1.0,
    }
}

/// The tensors of `model`'s counterpart in `arch`, in the order an export writes them (the
/// noisy gates' noise projections, used in training only, have none).
pub fn hf_tensors(model: &Model, arch: Architecture) -> Vec<HfTensor> {
    let mut tensors = HfTensors {
        model,
        arch,
        out: Vec::new(),
    };
    tensors.push(
        "model.embed_tokens.weight".into(),
        vec![model.vocab, model.width],
        same("embed.tokens".into()),
    );
    for layer in &model.layers {
        tensors.block(layer);
    }
    tensors.final_norm_and_head();
    tensors.out
}

/// [`hf_tensors`] as it goes: the model, the architecture, and the tensors listed so far.
struct HfTensors<'m> {
    model: &'m Model,
    arch: Architecture,
    out: Vec<HfTensor>,
}

impl HfTensors<'_> {
    fn push(&mut self, name: String, shape: Vec<u64>, source: Source) {
        self.out.push(HfTensor {
            name,
            shape,
            source,
        })
    }

    /// Transformer block `layer`: its two norms, its attention, its feed-forward.
    fn block(&mut self, layer: &Layer) {
        let d = self.model.width;
        let p = layer_prefix(layer.index);
        let hf = format!("model.layers.{}", layer.index);
        self.push(
            format!("{hf}.input_layernorm.weight"),
            vec![d],
            same(format!("{p}.norm1.weight")),
        );
        self.push(
            format!("{hf}.post_attention_layernorm.weight"),
            vec![d],
            same(format!("{p}.norm2.weight")),
        );
        self.attention(&p, &hf);
        match &layer.ffn {
            Ffn::Dense(m) => self.mlp(
                &ffn_prefix(layer.index),
                &format!("{hf}.mlp"),
                m.hidden,
                1.0,
            ),
            Ffn::Moe(m) => self.moe(layer.index, &hf, m),
        }
    }

    /// fmoec's fused `qkv` as q, k and v projections (each with its bias, where there is
    /// one), then the output projection.
    fn attention(&mut self, p: &str, hf: &str) {
        let d = self.model.width;
        let a = &self.model.attention;
        let (h, kvh, hd) = (a.heads, a.kv_heads, a.head_dim);
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let (offset, len) = match j {
                0 => (0, h * hd),
                1 => (h * hd, kvh * hd),
                _ => ((h + kvh) * hd, kvh * hd),
            };
            self.push(
                format!("{hf}.self_attn.{name}.weight"),
                vec![len, d],
                Source::Param(Part {
                    columns: Some((offset, len)),
                    transposed: true,
                    ..part(format!("{p}.attn.qkv.weight"))
                }),
            );
            let bias = if self.model.bias {
                Some(Source::Param(Part {
                    columns: Some((offset, len)),
                    ..part(format!("{p}.attn.qkv.bias"))
                }))
            } else if self.arch == Architecture::Qwen2Moe {
                // Qwen2-MoE's q/k/v always have biases (older transformers ignore qkv_bias)
                Some(Source::Zero {
                    why: "the model file has no biases (`bias = false`)",
                })
            } else {
                None
            };
            if let Some(source) = bias {
                self.push(format!("{hf}.self_attn.{name}.bias"), vec![len], source);
            }
        }
        self.push(
            format!("{hf}.self_attn.o_proj.weight"),
            vec![d, h * hd],
            linear(format!("{p}.attn.proj.weight"), 1.0),
        );
        if self.model.bias {
            self.push(
                format!("{hf}.self_attn.o_proj.bias"),
                vec![d],
                same(format!("{p}.attn.proj.bias")),
            );
        }
    }

    /// fmoec's `prefix.{w1,w3,w2,b1,b2}` as a Hugging Face MLP under `hf`.
    fn mlp(&mut self, prefix: &str, hf: &str, hidden: u64, down_scale: f64) {
        let d = self.model.width;
        self.push(
            format!("{hf}.gate_proj.weight"),
            vec![hidden, d],
            linear(format!("{prefix}.w1"), 1.0),
        );
        self.push(
            format!("{hf}.up_proj.weight"),
            vec![hidden, d],
            linear(format!("{prefix}.w3"), 1.0),
        );
        self.push(
            format!("{hf}.down_proj.weight"),
            vec![d, hidden],
            linear(format!("{prefix}.w2"), down_scale),
        );
        if self.model.bias {
            self.push(
                format!("{hf}.gate_proj.bias"),
                vec![hidden],
                same(format!("{prefix}.b1")),
            );
            self.push(
                format!("{hf}.up_proj.bias"),
                vec![hidden],
                Source::Zero {
                    why: "fmoec's SwiGLU has a bias on the gate projection only",
                },
            );
            self.push(
                format!("{hf}.down_proj.bias"),
                vec![d],
                same(format!("{prefix}.b2")),
            );
        }
    }

    /// An MoE layer: the router, each expert's three matrices (Mixtral's `w1, w3, w2` or
    /// Qwen2-MoE's projections), and the shared experts as Qwen2-MoE's shared expert.
    fn moe(&mut self, layer: usize, hf: &str, m: &Moe) {
        let d = self.model.width;
        let ffn = ffn_prefix(layer);
        let (block, names) = if self.arch == Architecture::Mixtral {
            ("block_sparse_moe", ["w1", "w3", "w2"])
        } else {
            ("mlp", ["gate_proj", "up_proj", "down_proj"])
        };
        let eh = m.expert.hidden;
        self.push(
            format!("{hf}.{block}.gate.weight"),
            vec![m.experts, d],
            linear(format!("{ffn}.gate.weight"), 1.0),
        );
        for e in 0..m.experts {
            let x = format!("{hf}.{block}.experts.{e}");
            for (k, (w, shape)) in [
                ("w1", vec![eh, d]),
                ("w3", vec![eh, d]),
                ("w2", vec![d, eh]),
            ]
            .into_iter()
            .enumerate()
            {
                self.push(
                    format!("{x}.{}.weight", names[k]),
                    shape,
                    Source::Param(Part {
                        expert: Some(e),
                        transposed: true,
                        ..part(experts_param(layer, w))
                    }),
                );
            }
        }
        if let Some(s) = &m.shared {
            // sigmoid(0) = 1/2 exactly, so the doubled down projection gives the sum
            self.mlp(
                &format!("{ffn}.shared"),
                &format!("{hf}.mlp.shared_expert"),
                s.count * s.expert.hidden,
                2.0,
            );
            self.push(
                format!("{hf}.mlp.shared_expert_gate.weight"),
                vec![1, d],
                Source::Zero {
                    why: "fmoec adds its shared experts ungated (Qwen2-MoE's sigmoid gate at 0 halves them; the down projection is doubled)",
                },
            );
        }
    }

    /// The final norm, and the head unless it is the tied embedding.
    fn final_norm_and_head(&mut self) {
        let (vocab, d) = (self.model.vocab, self.model.width);
        self.push(
            "model.norm.weight".into(),
            vec![d],
            same("norm.weight".into()),
        );
        if !self.model.tied_embeddings {
            self.push(
                "lm_head.weight".into(),
                vec![vocab, d],
                same("head.weight".into()),
            );
        }
    }
}

/// A Hugging Face tensor that is the fmoec parameter `param` as it is.
fn same(param: String) -> Source {
    Source::Param(part(param))
}

/// A Hugging Face linear weight from fmoec's `[in, out]` parameter `param`, times `scale`.
fn linear(param: String, scale: f64) -> Source {
    Source::Param(Part {
        transposed: true,
        scale,
        ..part(param)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::{Sink, Sources};

    fn model(source: &str) -> Model {
        let mut sources = Sources::new();
        let file = sources.add("m.fmoe", source.to_string());
        let mut sink = Sink::new();
        crate::check::check_file(&mut sources, file, &mut sink)
            .expect("the model checks")
            .model
    }

    /// `split_layer` reads back the layer of every name the layout builds, and nothing
    /// outside the layers: init and import find a parameter's layer by it.
    #[test]
    fn every_layer_parameter_splits_back_into_its_layer() {
        let m = model(
            "use std.gates.*\n\nmodel m {\n    vocab = 64\n    context = 8\n    width = 16\n    heads = 2\n    depth = 12\n    norm = layernorm\n    bias = true\n    block = transformer(attention = causal(), ffn = mlp(hidden = 32, act = swiglu))\n    layers[11].ffn = moe(experts = 4, top_k = 2, gate = noisy(), expert = mlp(hidden = 8, act = gelu), shared = shared_experts(expert = mlp(hidden = 8, act = swiglu)))\n}\n",
        );
        let shapes = param_shapes(&m);
        let mut per_layer = vec![0; 12];
        for p in &shapes {
            match split_layer(&p.name) {
                Some((layer, rest)) => {
                    assert_eq!(p.name, format!("{}.{rest}", layer_prefix(layer)));
                    per_layer[layer] += 1;
                    if p.experts {
                        let w = rest.strip_prefix("ffn.experts.").expect("an expert tensor");
                        assert_eq!(p.name, experts_param(layer, w));
                    }
                }
                None => assert!(!p.name.starts_with("layers"), "{}", p.name),
            }
        }
        assert!(per_layer.iter().all(|&n| n > 0), "{per_layer:?}");
        assert!(shapes.iter().any(|p| p.name == mlp_param(10, "w3")));
        assert!(shapes.iter().any(|p| p.name == experts_param(11, "b2")));
        assert_eq!(split_layer("layers.7"), Some((7, "")));
        assert_eq!(split_layer("layers.x.ffn.w1"), None);
        assert_eq!(split_layer("norm.weight"), None);
    }
}
