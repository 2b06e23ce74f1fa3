//! The export itself: architecture choice (or located refusals), tensor mapping, config,
//! shards, tokenizer, atomic placement. See the module doc of [`crate::hf`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::check::{Activation, Checked, Ffn, GateKind, Mlp, Model, Moe, Norm, Positions};
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
        format!("{feature} has no Hugging Face counterpart"),
    )
    .with_label(feature.to_string())
    .with_note(why.to_string())
}

/// Picks the architecture, or says every feature that has none.
pub fn architecture(model: &Model) -> Result<Architecture, Vec<Diagnostic>> {
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
    let moe: Vec<(usize, &Moe)> = model.moe_layers().collect();
    let dense: Vec<(&Mlp, Span)> = model
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Dense(m) => Some((m, l.span)),
            Ffn::Moe(_) => None,
        })
        .collect();
    let mut seen = Vec::new();
    for (m, span) in &dense {
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
    for (index, m) in &moe {
        let span = model.layers[*index].span;
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
    }
    let all_same = |v: &[(usize, &Moe)]| v.windows(2).all(|w| w[0].1 == w[1].1);
    if moe.len() > 1 && !all_same(&moe) {
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
    let arch = if moe.is_empty() {
        Architecture::Llama
    } else if dense.is_empty() && moe[0].1.shared.is_none() {
        Architecture::Mixtral
    } else {
        if moe[0].1.shared.is_none() {
            out.push(refuse(dense[0].1, "dense layers mixed with MoE layers without shared experts", "Mixtral has MoE layers only; Qwen2-MoE, which mixes them, always has a shared expert"));
        }
        Architecture::Qwen2Moe
    };
    if out.is_empty() {
        Ok(arch)
    } else {
        Err(out)
    }
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
    let moe = model.moe_layers().next().map(|(_, m)| m.clone());
    let dense_hidden = model.layers.iter().find_map(|l| match &l.ffn {
        Ffn::Dense(m) => Some(m.hidden),
        Ffn::Moe(_) => None,
    });
    let obj = c.as_object_mut().expect("an object");
    match arch {
        Architecture::Llama => {
            obj.insert("model_type".into(), json!("llama"));
            obj.insert("intermediate_size".into(), json!(dense_hidden));
            obj.insert("attention_bias".into(), json!(model.bias));
            obj.insert("mlp_bias".into(), json!(model.bias));
        }
        Architecture::Mixtral => {
            let m = moe.expect("an MoE layer");
            obj.insert("model_type".into(), json!("mixtral"));
            obj.insert("intermediate_size".into(), json!(m.expert.hidden));
            obj.insert("num_local_experts".into(), json!(m.experts));
            obj.insert("num_experts_per_tok".into(), json!(m.top_k));
            obj.insert("router_jitter_noise".into(), json!(0.0));
            obj.insert("output_router_logits".into(), json!(false));
            obj.insert("sliding_window".into(), Value::Null);
        }
        Architecture::Qwen2Moe => {
            let m = moe.expect("an MoE layer");
            let shared = m.shared.as_ref().map_or(0, |s| s.count * s.expert.hidden);
            let dense_layers: Vec<usize> = model
                .layers
                .iter()
                .filter(|l| matches!(l.ffn, Ffn::Dense(_)))
                .map(|l| l.index)
                .collect();
            obj.insert("model_type".into(), json!("qwen2_moe"));
            obj.insert(
                "intermediate_size".into(),
                json!(dense_hidden.unwrap_or(m.expert.hidden)),
            );
            obj.insert("moe_intermediate_size".into(), json!(m.expert.hidden));
            obj.insert("shared_expert_intermediate_size".into(), json!(shared));
            obj.insert("num_experts".into(), json!(m.experts));
            obj.insert("num_experts_per_tok".into(), json!(m.top_k));
            obj.insert("norm_topk_prob".into(), json!(true));
            obj.insert("decoder_sparse_step".into(), json!(1));
            obj.insert("mlp_only_layers".into(), json!(dense_layers));
            obj.insert("qkv_bias".into(), json!(true));
            obj.insert("use_sliding_window".into(), json!(false));
            obj.insert("output_router_logits".into(), json!(false));
        }
    }
    c
}

/// fmoec's `[in, out]` weight as a Hugging Face `[out, in]` one.
fn t(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_transpose(0, 1)?.f_contiguous()?)
}

/// The exported tensors by Hugging Face name, in a stable order.
pub fn tensors(
    model: &Model,
    arch: Architecture,
    params: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let get = |name: &str| -> Result<Tensor> {
        params
            .get(name)
            .map(|p| p.f_to_kind(Kind::Float).map_err(Into::into))
            .with_context(|| format!("the checkpoint has no `{name}`"))?
    };
    let a = &model.attention;
    let (h, kvh, hd) = (a.heads as i64, a.kv_heads as i64, a.head_dim as i64);
    let mut out: Vec<(String, Tensor)> =
        vec![("model.embed_tokens.weight".into(), get("embed.tokens")?)];
    for layer in &model.layers {
        let i = layer.index;
        let p = format!("layers.{i}");
        let hf = format!("model.layers.{i}");
        out.push((
            format!("{hf}.input_layernorm.weight"),
            get(&format!("{p}.norm1.weight"))?,
        ));
        out.push((
            format!("{hf}.post_attention_layernorm.weight"),
            get(&format!("{p}.norm2.weight"))?,
        ));
        let qkv = get(&format!("{p}.attn.qkv.weight"))?;
        let parts = qkv.f_split_with_sizes([h * hd, kvh * hd, kvh * hd], 1)?;
        let qkv_bias = match params.get(&format!("{p}.attn.qkv.bias")) {
            Some(b) => Some(b.f_split_with_sizes([h * hd, kvh * hd, kvh * hd], 0)?),
            None => None,
        };
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.push((format!("{hf}.self_attn.{name}.weight"), t(&parts[j])?));
            let bias = match &qkv_bias {
                Some(b) => Some(b[j].f_contiguous()?),
                // Qwen2-MoE's q/k/v always have biases (older transformers ignore qkv_bias)
                None if arch == Architecture::Qwen2Moe => Some(Tensor::f_zeros(
                    [parts[j].size()[1]],
                    (Kind::Float, Device::Cpu),
                )?),
                None => None,
            };
            if let Some(b) = bias {
                out.push((format!("{hf}.self_attn.{name}.bias"), b));
            }
        }
        out.push((
            format!("{hf}.self_attn.o_proj.weight"),
            t(&get(&format!("{p}.attn.proj.weight"))?)?,
        ));
        if let Some(b) = params.get(&format!("{p}.attn.proj.bias")) {
            out.push((format!("{hf}.self_attn.o_proj.bias"), b.shallow_clone()));
        }
        let mlp = |prefix: &str,
                   hf_prefix: &str,
                   down_scale: f64,
                   out: &mut Vec<(String, Tensor)>|
         -> Result<()> {
            let w1 = get(&format!("{prefix}.w1"))?;
            out.push((format!("{hf_prefix}.gate_proj.weight"), t(&w1)?));
            out.push((
                format!("{hf_prefix}.up_proj.weight"),
                t(&get(&format!("{prefix}.w3"))?)?,
            ));
            out.push((
                format!("{hf_prefix}.down_proj.weight"),
                t(&get(&format!("{prefix}.w2"))?.f_mul_scalar(down_scale)?)?,
            ));
            if let Some(b1) = params.get(&format!("{prefix}.b1")) {
                out.push((format!("{hf_prefix}.gate_proj.bias"), b1.shallow_clone()));
                out.push((format!("{hf_prefix}.up_proj.bias"), b1.f_zeros_like()?));
            }
            if let Some(b2) = params.get(&format!("{prefix}.b2")) {
                out.push((format!("{hf_prefix}.down_proj.bias"), b2.shallow_clone()));
            }
            Ok(())
        };
        match (&layer.ffn, arch) {
            (Ffn::Dense(_), _) => mlp(&format!("{p}.ffn"), &format!("{hf}.mlp"), 1.0, &mut out)?,
            (Ffn::Moe(m), Architecture::Mixtral | Architecture::Qwen2Moe) => {
                let (block, names) = if arch == Architecture::Mixtral {
                    ("block_sparse_moe", ["w1", "w3", "w2"])
                } else {
                    ("mlp", ["gate_proj", "up_proj", "down_proj"])
                };
                out.push((
                    format!("{hf}.{block}.gate.weight"),
                    t(&get(&format!("{p}.ffn.gate.weight"))?)?,
                ));
                let w1 = get(&format!("{p}.ffn.experts.w1"))?;
                let w3 = get(&format!("{p}.ffn.experts.w3"))?;
                let w2 = get(&format!("{p}.ffn.experts.w2"))?;
                for e in 0..m.experts as i64 {
                    let x = format!("{hf}.{block}.experts.{e}");
                    out.push((format!("{x}.{}.weight", names[0]), t(&w1.f_select(0, e)?)?));
                    out.push((format!("{x}.{}.weight", names[1]), t(&w3.f_select(0, e)?)?));
                    out.push((format!("{x}.{}.weight", names[2]), t(&w2.f_select(0, e)?)?));
                }
                if arch == Architecture::Qwen2Moe {
                    // sigmoid(0) = 1/2 exactly, so the doubled down projection gives the sum
                    mlp(
                        &format!("{p}.ffn.shared"),
                        &format!("{hf}.mlp.shared_expert"),
                        2.0,
                        &mut out,
                    )?;
                    out.push((
                        format!("{hf}.mlp.shared_expert_gate.weight"),
                        Tensor::f_zeros([1, model.width as i64], (Kind::Float, Device::Cpu))?,
                    ));
                }
            }
            (Ffn::Moe(_), Architecture::Llama) => {
                bail!("internal error: an MoE layer in a Llama export")
            }
        }
    }
    out.push(("model.norm.weight".into(), get("norm.weight")?));
    if !model.tied_embeddings {
        out.push(("lm_head.weight".into(), get("head.weight")?));
    }
    Ok(out)
}

fn tensor_bytes(x: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    let x = x.f_to_kind(Kind::Float)?.f_contiguous()?;
    let n = x.numel();
    let mut buf = vec![0u8; n * 4];
    x.f_copy_data_u8(&mut buf, n)?;
    Ok((x.size().iter().map(|&s| s as usize).collect(), buf))
}

/// The files of an export, by name, in memory.
pub fn files(
    checked: &Checked,
    arch: Architecture,
    named: &[(String, Tensor)],
    shard_bytes: u64,
    tokenizer: Option<(&Path, Option<&Path>)>,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let model = &checked.model;
    let mut files = BTreeMap::new();
    // shards of at most `shard_bytes` (a bigger tensor gets a shard of its own)
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for (i, (_, x)) in named.iter().enumerate() {
        let bytes = x.numel() as u64 * 4;
        total += bytes;
        if size + bytes > shard_bytes && !shards.last().expect("a shard").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("a shard").push(i);
        size += bytes;
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (s, members) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, count);
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = members
            .iter()
            .map(|&i| tensor_bytes(&named[i].1).map(|(shape, b)| (named[i].0.clone(), shape, b)))
            .collect::<Result<_>>()?;
        let views: Vec<(String, TensorView<'_>)> = raw
            .iter()
            .map(|(n, shape, b)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
            .collect::<Result<_>>()?;
        let meta: std::collections::HashMap<String, String> =
            [("format".to_string(), "pt".to_string())].into();
        files.insert(
            name.clone(),
            safetensors::tensor::serialize(views, &Some(meta))?,
        );
        for &i in members {
            weight_map.insert(named[i].0.clone(), json!(name));
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    files.insert("model.safetensors.index.json".into(), pretty(&index)?);
    files.insert("config.json".into(), pretty(&config(model, arch))?);
    files.insert(
        "generation_config.json".into(),
        pretty(&json!({"do_sample": false}))?,
    );
    if let Some((json_path, config_path)) = tokenizer {
        files.insert(
            "tokenizer.json".into(),
            std::fs::read(json_path)
                .with_context(|| format!("cannot read the tokenizer `{}`", json_path.display()))?,
        );
        let config = match config_path.filter(|p| p.is_file()) {
            Some(p) => {
                std::fs::read(p).with_context(|| format!("cannot read `{}`", p.display()))?
            }
            None => pretty(&json!({"tokenizer_class": "PreTrainedTokenizerFast"}))?,
        };
        files.insert("tokenizer_config.json".into(), config);
    }
    Ok(files)
}

fn pretty(v: &Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s.into_bytes())
}

/// The record an export leaves in its folder.
pub const RECORD: &str = "fmoec-export.json";

/// Writes `files` into `out`: each file atomically; a folder holding files this tool did not
/// write (or that were edited since) is refused; stale files of an earlier export are removed.
pub fn place(
    out: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    record_extra: Value,
) -> Result<Vec<PathBuf>> {
    let mut previous: Vec<String> = Vec::new();
    if out.exists() {
        if !out.is_dir() {
            bail!("`{}` exists and is not a folder", out.display());
        }
        let record: Option<Value> = std::fs::read(out.join(RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let listed: BTreeMap<String, String> = record
            .as_ref()
            .and_then(|r| r.get("files"))
            .and_then(|f| serde_json::from_value(f.clone()).ok())
            .unwrap_or_default();
        for entry in std::fs::read_dir(out)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name == RECORD {
                continue;
            }
            match listed.get(&name) {
                Some(hash) if *hash == crate::driver::sha256_hex(&std::fs::read(out.join(&name))?) => {}
                Some(_) => bail!("`{}` was edited since fmoec exported it; refusing to replace it (move it away first)", out.join(&name).display()),
                None => bail!("`{}` holds `{name}`, which fmoec did not write; refusing to export into it (choose an empty or new folder)", out.display()),
            }
        }
        previous = listed.into_keys().collect();
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
    let mut hashes = serde_json::Map::new();
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = out.join(name);
        crate::driver::write_atomic(&path, bytes)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        hashes.insert(name.clone(), json!(crate::driver::sha256_hex(bytes)));
        written.push(path);
    }
    for stale in previous.iter().filter(|n| !files.contains_key(*n)) {
        let _ = std::fs::remove_file(out.join(stale));
    }
    let mut record = record_extra;
    record["files"] = Value::Object(hashes);
    crate::driver::write_atomic(&out.join(RECORD), &pretty(&record)?)?;
    Ok(written)
}
