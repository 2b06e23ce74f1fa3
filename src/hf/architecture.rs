//! Which `transformers` architecture computes what an fmoec model computes, both ways: the
//! choice for a model (or located refusals, H0001), the `config.json` an export writes, and
//! the comparison of a checkpoint's `config.json` with a model file (what an import needs).
//! Reads no tensors and knows nothing about libtorch, so `fmoec check` uses it in every build.

use serde_json::{json, Value};

use crate::check::{Activation, Ffn, GateKind, Layer, Mlp, Model, Moe, Norm, Positions};
use crate::diag::{Diagnostic, Span};

/// The `transformers` architecture an export targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mixtral,
    Qwen2Moe,
}

impl Architecture {
    pub fn class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
        }
    }
}

/// fmoec's norm epsilon and rotary base (src/runtime/model.rs).
const NORM_EPS: f64 = 1e-5;
const ROPE_BASE: f64 = 10_000.0;

fn refuse(span: Span, feature: &str, why: &str) -> Diagnostic {
    Diagnostic::error(
        "H0001",
        span,
        format!("no Hugging Face architecture that fmoec exports has {feature}"),
    )
    .with_label(feature.to_string())
    .with_note(why.to_string())
}

/// Picks the architecture, or says every feature that has none.
pub fn architecture(model: &Model) -> Result<Architecture, Vec<Diagnostic>> {
    let moe: Vec<(usize, &Moe)> = model.moe_layers().collect();
    let dense: Vec<(&Mlp, Span)> = dense_layers(model).map(|(l, m)| (m, l.span)).collect();
    let mut out = refuse_norm_and_positions(model);
    out.extend(refuse_dense_activations(&dense));
    for (index, m) in &moe {
        out.extend(refuse_moe_layer(model, model.layers[*index].span, m));
    }
    out.extend(refuse_uneven_layers(model, &moe, &dense));
    let (arch, mixed) = choose(&moe, &dense);
    out.extend(mixed);
    if out.is_empty() {
        Ok(arch)
    } else {
        Err(out)
    }
}

/// The model's dense layers with their MLPs, in order.
fn dense_layers(model: &Model) -> impl Iterator<Item = (&Layer, &Mlp)> {
    model.layers.iter().filter_map(|l| match &l.ffn {
        Ffn::Dense(m) => Some((l, m)),
        Ffn::Moe(_) => None,
    })
}

/// The norm and the positions every architecture has.
fn refuse_norm_and_positions(model: &Model) -> Vec<Diagnostic> {
    let at = model.spans.name;
    let mut out = Vec::new();
    if model.norm != Norm::RmsNorm {
        out.push(refuse(
            at,
            "`norm = layernorm`",
            "Llama, Mixtral and Qwen2-MoE use RMSNorm; set `norm = rmsnorm`",
        ));
    }
    if model.positions != Positions::Rotary {
        out.push(refuse(
            at,
            "`positions = learned`",
            "Llama, Mixtral and Qwen2-MoE use rotary embeddings; set `positions = rotary`",
        ));
    }
    out
}

/// Dense MLPs that are not SwiGLU, once per place (one `block = ...` line declares many).
fn refuse_dense_activations(dense: &[(&Mlp, Span)]) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for (m, span) in dense {
        if m.act != Activation::Swiglu && !seen.contains(span) {
            seen.push(*span);
            let act = format!("{:?}", m.act).to_lowercase();
            out.push(refuse(
                *span,
                &format!("a {act} MLP"),
                "the architectures' MLPs are SwiGLU; use `act = swiglu`",
            ));
        }
    }
    out
}

/// What one MoE layer (declared at `span`) has that no architecture has.
fn refuse_moe_layer(model: &Model, span: Span, m: &Moe) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if m.expert.act != Activation::Swiglu {
        out.push(refuse(
            span,
            &format!("{:?} experts", m.expert.act).to_lowercase(),
            "the architectures' experts are SwiGLU; use `act = swiglu`",
        ));
    }
    if let Some(s) = &m.shared {
        if s.expert.act != Activation::Swiglu {
            out.push(refuse(
                span,
                "non-SwiGLU shared experts",
                "Qwen2-MoE's shared expert is SwiGLU",
            ));
        }
    }
    match m.gate.kind {
        GateKind::Naive | GateKind::Noisy | GateKind::Swipe => {}
        GateKind::Gshard => out.push(refuse(span, "the GShard gate", "its capacity drops tokens at inference; transformers' MoE blocks never drop one")),
        GateKind::Switch => out.push(refuse(span, "the Switch gate", "its capacity drops tokens, and its top-1 weight is the expert's probability, not renormalised")),
    }
    if model.bias {
        out.push(refuse(span, "biases in an MoE model (`bias = true`)", "Mixtral's and Qwen2-MoE's routers, experts and output projections have no biases; set `bias = false`"));
    }
    out
}

/// A Hugging Face config has one shape for all its MoE layers and one for its dense ones.
fn refuse_uneven_layers(
    model: &Model,
    moe: &[(usize, &Moe)],
    dense: &[(&Mlp, Span)],
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if moe.len() > 1 && !moe.windows(2).all(|w| w[0].1 == w[1].1) {
        out.push(refuse(
            model.layers[moe[1].0].span,
            "MoE layers of different shapes",
            "every MoE layer of a Hugging Face config has the same experts, top-k and sizes",
        ));
    }
    if dense.windows(2).any(|w| w[0].0.hidden != w[1].0.hidden) {
        out.push(refuse(
            dense[1].1,
            "dense layers of different sizes",
            "a Hugging Face config has one intermediate size for its dense layers",
        ));
    }
    out
}

/// The architecture for these layers, with the refusal of a mix none of them has.
fn choose(moe: &[(usize, &Moe)], dense: &[(&Mlp, Span)]) -> (Architecture, Option<Diagnostic>) {
    if moe.is_empty() {
        return (Architecture::Llama, None);
    }
    if dense.is_empty() && moe[0].1.shared.is_none() {
        return (Architecture::Mixtral, None);
    }
    let mixed = moe[0].1.shared.is_none().then(|| {
        refuse(
            dense[0].1,
            "dense layers mixed with MoE layers without shared experts",
            "Mixtral has MoE layers only; Qwen2-MoE, which mixes them, always has a shared expert",
        )
    });
    (Architecture::Qwen2Moe, mixed)
}

/// `config.json` for `arch`.
pub fn config(model: &Model, arch: Architecture) -> Value {
    let a = &model.attention;
    let mut c = json!({
        "architectures": [arch.class()],
        "vocab_size": model.vocab,
        "hidden_size": model.width,
        "num_hidden_layers": model.layers.len(),
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "max_position_embeddings": model.context,
        "rms_norm_eps": NORM_EPS,
        "rope_theta": ROPE_BASE,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE},
        "hidden_act": "silu",
        "tie_word_embeddings": model.tied_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    let obj = c.as_object_mut().expect("an object");
    let keys = match arch {
        Architecture::Llama => llama_config(model),
        Architecture::Mixtral => mixtral_config(first_moe(model)),
        Architecture::Qwen2Moe => qwen2_moe_config(model, first_moe(model)),
    };
    for (key, value) in keys {
        obj.insert(key.into(), value);
    }
    c
}

/// The first MoE layer of a model that Mixtral or Qwen2-MoE was chosen for.
fn first_moe(model: &Model) -> &Moe {
    model
        .moe_layers()
        .next()
        .map(|(_, m)| m)
        .expect("a Mixtral- or Qwen2-MoE-style model has MoE layers")
}

/// The keys of a Llama config besides the common ones, in the order written.
fn llama_config(model: &Model) -> Vec<(&'static str, Value)> {
    let dense_hidden = dense_layers(model).next().map(|(_, m)| m.hidden);
    vec![
        ("model_type", json!("llama")),
        ("intermediate_size", json!(dense_hidden)),
        ("attention_bias", json!(model.bias)),
        ("mlp_bias", json!(model.bias)),
    ]
}

/// The keys of a Mixtral config besides the common ones (`m`: the MoE layers' shape).
fn mixtral_config(m: &Moe) -> Vec<(&'static str, Value)> {
    vec![
        ("model_type", json!("mixtral")),
        ("intermediate_size", json!(m.expert.hidden)),
        ("num_local_experts", json!(m.experts)),
        ("num_experts_per_tok", json!(m.top_k)),
        ("router_jitter_noise", json!(0.0)),
        ("output_router_logits", json!(false)),
        ("sliding_window", Value::Null),
    ]
}

/// The keys of a Qwen2-MoE config besides the common ones (`m`: the MoE layers' shape; the
/// dense layers are `mlp_only_layers`).
fn qwen2_moe_config(model: &Model, m: &Moe) -> Vec<(&'static str, Value)> {
    let dense_hidden = dense_layers(model).next().map(|(_, m)| m.hidden);
    let shared = m.shared.as_ref().map_or(0, |s| s.count * s.expert.hidden);
    let dense_layers: Vec<usize> = dense_layers(model).map(|(l, _)| l.index).collect();
    vec![
        ("model_type", json!("qwen2_moe")),
        (
            "intermediate_size",
            json!(dense_hidden.unwrap_or(m.expert.hidden)),
        ),
        ("moe_intermediate_size", json!(m.expert.hidden)),
        ("shared_expert_intermediate_size", json!(shared)),
        ("num_experts", json!(m.experts)),
        ("num_experts_per_tok", json!(m.top_k)),
        ("norm_topk_prob", json!(true)),
        ("decoder_sparse_step", json!(1)),
        ("mlp_only_layers", json!(dense_layers)),
        ("qkv_bias", json!(true)),
        ("use_sliding_window", json!(false)),
        ("output_router_logits", json!(false)),
    ]
}

impl Architecture {
    /// The architecture a checkpoint's `config.json` names (`architectures`, else
    /// `model_type`), or what it names when fmoec has no such architecture.
    pub fn of_config(config: &Value) -> Result<Architecture, String> {
        let class = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str);
        let model_type = config.get("model_type").and_then(Value::as_str);
        for arch in [
            Architecture::Llama,
            Architecture::Mixtral,
            Architecture::Qwen2Moe,
        ] {
            if class == Some(arch.class())
                || (class.is_none() && model_type == Some(arch.model_type()))
            {
                return Ok(arch);
            }
        }
        Err(class
            .or(model_type)
            .unwrap_or("a model with neither `architectures` nor `model_type`")
            .to_string())
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mixtral => "mixtral",
            Architecture::Qwen2Moe => "qwen2_moe",
        }
    }

    /// What a user would call the kind of model.
    pub fn describe(self) -> &'static str {
        match self {
            Architecture::Llama => "a dense Llama-style model",
            Architecture::Mixtral => "a Mixtral-style MoE model",
            Architecture::Qwen2Moe => "a Qwen2-MoE-style model (shared experts)",
        }
    }
}

/// A checkpoint that does not describe the model file (E0612): the model field at `at`, with
/// what the checkpoint says (`evidence`) pointed at by `init`.
pub fn model_differs(
    at: Span,
    field: &str,
    ours: &str,
    theirs: &str,
    evidence: &str,
    init: Span,
) -> Diagnostic {
    Diagnostic::error(
        "E0612",
        at,
        format!("the model has {field} = {ours}, the checkpoint to start from has {theirs}"),
    )
    .with_label(format!("{field} = {ours} here"))
    .with_secondary(init, evidence.to_string())
    .with_help(format!(
        "set {field} = {theirs} to start from this checkpoint, or start from one of this model's shape"
    ))
}

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "nothing".into(),
        Some(v) => v.to_string(),
    }
}

/// Compares a checkpoint's `config.json` with the `config.json` the model file exports as
/// (both for `arch`): every difference in shape or architecture is an error at the model's
/// own text (E0612); settings that change what the model computes but that the language
/// cannot express (rotary base, norm epsilon, sliding windows, unnormalised top-k) are one
/// warning (W0613) at `init`, since training adapts to them.
pub fn compare_config(
    model: &Model,
    arch: Architecture,
    theirs: &Value,
    init: Span,
) -> Vec<Diagnostic> {
    if let Some(wrong) = architecture_differs(model, arch, theirs, init) {
        return vec![wrong];
    }
    let mut out = shapes_differ(model, arch, theirs, init);
    if arch == Architecture::Qwen2Moe {
        out.extend(sparse_layers_differ(model, theirs, init));
    }
    out.extend(settings_the_file_cannot_express(model, arch, theirs, init));
    out
}

/// E0612 when the checkpoint is another architecture (or one fmoec does not read).
fn architecture_differs(
    model: &Model,
    arch: Architecture,
    theirs: &Value,
    init: Span,
) -> Option<Diagnostic> {
    let name = model.spans.name;
    match Architecture::of_config(theirs) {
        Ok(a) if a == arch => None,
        Ok(a) => Some(
            Diagnostic::error(
                "E0612",
                name,
                format!(
                    "`{}` is {} ({}); the checkpoint to start from is {} ({})",
                    model.name,
                    arch.describe(),
                    arch.class(),
                    a.describe(),
                    a.class()
                ),
            )
            .with_label(format!("exports as {}", arch.class()))
            .with_secondary(init, format!("config.json: {}", a.class()))
            .with_help(if a == Architecture::Llama {
                "to turn a dense checkpoint into an MoE model, start from `upcycle(...)` of it"
            } else {
                "declare the layers as the checkpoint has them (see `fmoec export --hf` in the README for the mapping)"
            }),
        ),
        Err(other) => Some(
            Diagnostic::error(
                "E0612",
                init,
                format!(
                    "the checkpoint to start from is a `{other}`; fmoec reads LlamaForCausalLM, MixtralForCausalLM and Qwen2MoeForCausalLM"
                ),
            )
            .with_label("its config.json names this architecture"),
        ),
    }
}

/// One `config.json` key compared with the model file: the key, the model's field as the
/// user wrote it, where it was written, and the checkpoint's default where the key is absent.
type ConfigField = (&'static str, &'static str, Span, Option<Value>);

/// E0612 for every shape the model file and the checkpoint's config disagree on, at the
/// model's own text.
fn shapes_differ(model: &Model, arch: Architecture, theirs: &Value, init: Span) -> Vec<Diagnostic> {
    let ours = config(model, arch);
    let mut fields = common_shape_fields(model, theirs);
    fields.extend(architecture_shape_fields(model, arch));
    fields
        .into_iter()
        .filter_map(|field| field_differs(&ours, theirs, field, init))
        .collect()
}

/// The shapes every architecture's config has.
fn common_shape_fields(model: &Model, theirs: &Value) -> Vec<ConfigField> {
    let get = |key: &str| present(theirs, key);
    let head_dim = match (
        get("hidden_size").and_then(Value::as_u64),
        get("num_attention_heads").and_then(Value::as_u64),
    ) {
        (Some(h), Some(n)) if n > 0 => Some(json!(h / n)),
        _ => None,
    };
    vec![
        ("vocab_size", "vocab", model.spans.vocab, None),
        ("hidden_size", "width", model.spans.width, None),
        ("num_hidden_layers", "depth", model.spans.depth, None),
        ("num_attention_heads", "heads", model.spans.heads, None),
        (
            "num_key_value_heads",
            "kv_heads",
            model.spans.heads,
            get("num_attention_heads").cloned(),
        ),
        (
            "head_dim",
            "the head size (width / heads)",
            model.spans.heads,
            head_dim,
        ),
        (
            "tie_word_embeddings",
            "tied_embeddings",
            model.spans.name,
            Some(json!(false)),
        ),
    ]
}

/// The shapes of `arch`'s MLPs, experts and biases.
fn architecture_shape_fields(model: &Model, arch: Architecture) -> Vec<ConfigField> {
    let first_dense = dense_layers(model).next().map(|(_, m)| m.span);
    match arch {
        Architecture::Llama => llama_shape_fields(model, first_dense),
        Architecture::Mixtral => mixtral_shape_fields(first_moe(model)),
        Architecture::Qwen2Moe => qwen2_moe_shape_fields(first_moe(model), first_dense),
    }
}

/// Llama's MLP size (at the first dense MLP) and biases.
fn llama_shape_fields(model: &Model, first_dense: Option<Span>) -> Vec<ConfigField> {
    let name = model.spans.name;
    vec![
        (
            "intermediate_size",
            "the MLP's hidden",
            first_dense.unwrap_or(name),
            None,
        ),
        ("attention_bias", "bias", name, Some(json!(false))),
        ("mlp_bias", "bias", name, Some(json!(false))),
    ]
}

/// Mixtral's experts (`m`: the first MoE layer), with transformers' defaults.
fn mixtral_shape_fields(m: &Moe) -> Vec<ConfigField> {
    vec![
        (
            "intermediate_size",
            "the experts' hidden",
            m.expert.span,
            None,
        ),
        (
            "num_local_experts",
            "experts",
            m.spans.experts,
            Some(json!(8)),
        ),
        (
            "num_experts_per_tok",
            "top_k",
            m.spans.top_k,
            Some(json!(2)),
        ),
    ]
}

/// Qwen2-MoE's dense MLPs (where the model has some) and experts (`m`: the first MoE layer).
fn qwen2_moe_shape_fields(m: &Moe, first_dense: Option<Span>) -> Vec<ConfigField> {
    let mut fields = Vec::new();
    if let Some(at) = first_dense {
        fields.push(("intermediate_size", "the dense MLPs' hidden", at, None));
    }
    fields.extend([
        (
            "moe_intermediate_size",
            "the experts' hidden",
            m.expert.span,
            None,
        ),
        (
            "shared_expert_intermediate_size",
            "the shared experts' hidden (count x hidden)",
            m.spans.call,
            None,
        ),
        ("num_experts", "experts", m.spans.experts, None),
        ("num_experts_per_tok", "top_k", m.spans.top_k, None),
    ]);
    fields
}

/// E0612 where the checkpoint's `key` (or its default) is not what the model exports.
fn field_differs(
    ours: &Value,
    theirs: &Value,
    (key, field, at, default): ConfigField,
    init: Span,
) -> Option<Diagnostic> {
    let want = ours.get(key);
    let have = present(theirs, key).cloned().or(default);
    let same = match (want, &have) {
        (Some(w), Some(h)) => w == h || (w.as_f64().is_some() && w.as_f64() == h.as_f64()),
        (None, None) => true,
        _ => false,
    };
    if same {
        return None;
    }
    let theirs = show(have.as_ref());
    Some(model_differs(
        at,
        field,
        &show(want),
        &theirs,
        &format!("its config.json: `{key}` = {theirs}"),
        init,
    ))
}

/// Qwen2-MoE: E0612 at the first layer that is sparse in one and dense in the other.
fn sparse_layers_differ(model: &Model, theirs: &Value, init: Span) -> Option<Diagnostic> {
    let get = |key: &str| present(theirs, key);
    // transformers: layer i is sparse unless listed in mlp_only_layers, and only every
    // decoder_sparse_step-th layer is
    let only: Vec<u64> = get("mlp_only_layers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let step = get("decoder_sparse_step")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1);
    for layer in &model.layers {
        let i = layer.index as u64;
        let sparse = !only.contains(&i) && (i + 1) % step == 0;
        let ours_sparse = matches!(layer.ffn, Ffn::Moe(_));
        if sparse != ours_sparse {
            let kind = |s: bool| if s { "an MoE layer" } else { "a dense MLP" };
            return Some(
                Diagnostic::error(
                    "E0612",
                    layer.span,
                    format!(
                        "layer {i} is {} here, {} in the checkpoint to start from",
                        kind(ours_sparse),
                        kind(sparse)
                    ),
                )
                .with_label(format!("layer {i}'s feed-forward"))
                .with_secondary(init, "its config.json: `mlp_only_layers`, `decoder_sparse_step`")
                .with_help("declare the same layers dense (`layers[...] .ffn = mlp(...)`) as the checkpoint's `mlp_only_layers`"),
            );
        }
    }
    None
}

/// W0613: what the checkpoint computes differently in ways the language cannot express
/// (rotary base and scaling, norm epsilon, the gated MLP's activation, sliding windows,
/// unnormalised top-k), one warning at `init`.
fn settings_the_file_cannot_express(
    model: &Model,
    arch: Architecture,
    theirs: &Value,
    init: Span,
) -> Option<Diagnostic> {
    let mut differ = rotary_differences(theirs);
    differ.extend(norm_and_activation_differences(theirs));
    differ.extend(sliding_window(model, arch, theirs));
    differ.extend(unnormalised_top_k(arch, theirs));
    if differ.is_empty() {
        return None;
    }
    Some(
            Diagnostic::warning(
                "W0613",
                init,
                "the checkpoint's model computes differently from this model file in ways the file cannot express",
            )
            .with_label("its config.json differs")
            .with_note(format!("it has {}", differ.join("; ")))
            .with_note("the run starts from its weights and trains with fmoec's settings; its first losses are higher than the checkpoint's own"),
    )
}

/// A rotary base other than fmoec's, and any rotary scaling.
fn rotary_differences(theirs: &Value) -> Vec<String> {
    let mut differ = Vec::new();
    let theta = present(theirs, "rope_theta")
        .or_else(|| {
            theirs
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
        })
        .and_then(Value::as_f64)
        .unwrap_or(ROPE_BASE);
    if theta != ROPE_BASE {
        differ.push(format!("rotary base {theta} (fmoec: {ROPE_BASE})"));
    }
    let rope_type = ["rope_scaling", "rope_parameters"]
        .iter()
        .filter_map(|key| theirs.get(*key))
        .filter_map(|r| r.get("rope_type").or_else(|| r.get("type")))
        .filter_map(Value::as_str)
        .find(|t| *t != "default")
        .unwrap_or("default");
    if rope_type != "default" {
        differ.push(format!("rotary scaling `{rope_type}` (fmoec: none)"));
    }
    differ
}

/// Another RMSNorm epsilon, or another activation in the gated MLPs.
fn norm_and_activation_differences(theirs: &Value) -> Vec<String> {
    let mut differ = Vec::new();
    if let Some(eps) = present(theirs, "rms_norm_eps").and_then(Value::as_f64) {
        if eps != NORM_EPS {
            differ.push(format!("RMSNorm epsilon {eps:e} (fmoec: {NORM_EPS:e})"));
        }
    }
    if let Some(act) = present(theirs, "hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            differ.push(format!("`{act}` in its gated MLPs (fmoec's SwiGLU: silu)"));
        }
    }
    differ
}

/// Attention over a window shorter than the model's context (Qwen2-MoE's only where it
/// says `use_sliding_window`).
fn sliding_window(model: &Model, arch: Architecture, theirs: &Value) -> Option<String> {
    let window = match arch {
        Architecture::Qwen2Moe => present(theirs, "use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        _ => true,
    };
    let w = present(theirs, "sliding_window")
        .and_then(Value::as_u64)
        .filter(|_| window)?;
    (w < model.context).then(|| {
        format!(
            "sliding-window attention over {w} tokens (fmoec: the whole context, {})",
            model.context
        )
    })
}

/// Qwen2-MoE's top-k weights without `norm_topk_prob`.
fn unnormalised_top_k(arch: Architecture, theirs: &Value) -> Option<String> {
    let normalised = present(theirs, "norm_topk_prob")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    (arch == Architecture::Qwen2Moe && !normalised).then(|| {
        "top-k gate weights that are not renormalised (fmoec's gates renormalise them)".into()
    })
}

/// `key` of a config, where it is there and not null.
fn present<'v>(config: &'v Value, key: &str) -> Option<&'v Value> {
    config.get(key).filter(|v| !v.is_null())
}
