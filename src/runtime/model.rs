//! The decoder-only transformer instantiated from a checked [`Model`]: one module per layer
//! of `Model.layers`, dense or MoE feed-forward as declared.
//!
//! Architecture: GPT-2 / Megatron-LM GPT (pre-norm blocks, causal self-attention through
//! libtorch's `scaled_dot_product_attention`, grouped-query attention when `kv_heads < heads`,
//! learned absolute positions or rotary embeddings, final norm, LM head tied to the token
//! embedding). Initialisation as Megatron-LM: normal(0, 0.02), output projections (attention
//! `proj`, MLP/expert `w2`) normal(0, 0.02/√(2·layers)), biases zero, norm gains one.
//!
//! Every module is built by [`FfnModule::build`] / [`Block::new`] from one layer description,
//! so a later ModelGraph-driven construction can call the same constructors node by node.
//! This module knows nothing about optimizers, data or checkpoints.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::check::{Ffn, Layer, Model, Norm, Positions};
use crate::runtime::moe::{self, DenseMlp, MoeLayer, Telemetry};
use crate::runtime::params::{Init, ParamStore};

const NORM_EPS: f64 = 1e-5;
const ROPE_BASE: f64 = 10_000.0;

/// A norm layer (LayerNorm with gain and bias, or RMSNorm with gain).
pub struct NormLayer {
    kind: Norm,
    weight: Tensor,
    bias: Option<Tensor>,
    width: i64,
}

impl NormLayer {
    fn new(store: &mut ParamStore, prefix: &str, kind: Norm, width: i64) -> Result<NormLayer> {
        let weight = store.var(&format!("{prefix}.weight"), &[width], Init::Ones, false)?;
        let bias = match kind {
            Norm::LayerNorm => {
                Some(store.var(&format!("{prefix}.bias"), &[width], Init::Zeros, false)?)
            }
            Norm::RmsNorm => None,
        };
        Ok(NormLayer {
            kind,
            weight,
            bias,
            width,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.f_to_kind(x.kind())?;
        Ok(match self.kind {
            Norm::LayerNorm => {
                let b = self
                    .bias
                    .as_ref()
                    .map(|b| b.f_to_kind(x.kind()))
                    .transpose()?;
                x.f_layer_norm([self.width], Some(&w), b.as_ref(), NORM_EPS, true)?
            }
            Norm::RmsNorm => x.f_rms_norm([self.width], Some(&w), NORM_EPS)?,
        })
    }
}

/// Causal self-attention with a fused `qkv` projection.
pub struct Attention {
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    rotary: bool,
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    proj: Tensor,
    proj_bias: Option<Tensor>,
}

impl Attention {
    fn new(store: &mut ParamStore, prefix: &str, model: &Model, out_std: f64) -> Result<Attention> {
        let d = model.width as i64;
        let a = &model.attention;
        let (h, kvh, hd) = (a.heads as i64, a.kv_heads as i64, a.head_dim as i64);
        let qkv_out = (h + 2 * kvh) * hd;
        let qkv = store.var(
            &format!("{prefix}.qkv.weight"),
            &[d, qkv_out],
            Init::Normal(0.02),
            true,
        )?;
        let proj = store.var(
            &format!("{prefix}.proj.weight"),
            &[h * hd, d],
            Init::Normal(out_std),
            true,
        )?;
        let (qkv_bias, proj_bias) = if model.bias {
            (
                Some(store.var(
                    &format!("{prefix}.qkv.bias"),
                    &[qkv_out],
                    Init::Zeros,
                    false,
                )?),
                Some(store.var(&format!("{prefix}.proj.bias"), &[d], Init::Zeros, false)?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            rotary: model.positions == Positions::Rotary,
            qkv,
            qkv_bias,
            proj,
            proj_bias,
        })
    }

    /// `x`: `[B, T, d]` → `[B, T, d]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _d) = x.size3()?;
        let kind = x.kind();
        let mut qkv = x.f_matmul(&self.qkv.f_to_kind(kind)?)?;
        if let Some(bias) = &self.qkv_bias {
            qkv = qkv.f_add(&bias.f_to_kind(kind)?)?;
        }
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let parts = qkv.f_split_with_sizes([h * hd, kvh * hd, kvh * hd], -1)?;
        // q = q.view(b, t, h, hd).transpose(1, 2)
        let q = parts[0].f_reshape([b, t, h, hd])?.f_transpose(1, 2)?;
        let k = parts[1].f_reshape([b, t, kvh, hd])?.f_transpose(1, 2)?;
        let v = parts[2].f_reshape([b, t, kvh, hd])?.f_transpose(1, 2)?;
        let (q, k) = if self.rotary {
            let (cos, sin) = rotary_tables(t, hd, x.device(), kind)?;
            (apply_rotary(&q, &cos, &sin)?, apply_rotary(&k, &cos, &sin)?)
        } else {
            (q, k)
        };
        let y = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            true,
            None::<f64>,
            kvh < h,
        )?;
        let y = y.f_transpose(1, 2)?.f_reshape([b, t, h * hd])?;
        let mut out = y.f_matmul(&self.proj.f_to_kind(kind)?)?;
        if let Some(bias) = &self.proj_bias {
            out = out.f_add(&bias.f_to_kind(kind)?)?;
        }
        Ok(out)
    }
}

/// `cos`, `sin` tables `[T, hd]` for rotate-half rotary embeddings.
fn rotary_tables(t: i64, hd: i64, device: Device, kind: Kind) -> Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let inv = Tensor::f_arange(half, (Kind::Float, device))?
        .f_mul_scalar(-2.0 * ROPE_BASE.ln() / hd as f64)?
        .f_exp()?;
    let pos = Tensor::f_arange(t, (Kind::Float, device))?;
    let angles = pos.f_unsqueeze(1)?.f_mul(&inv.f_unsqueeze(0)?)?;
    let angles = Tensor::f_cat(&[&angles, &angles], 1)?;
    Ok((
        angles.f_cos()?.f_to_kind(kind)?,
        angles.f_sin()?.f_to_kind(kind)?,
    ))
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.size()[3];
    let x1 = x.f_narrow(3, 0, hd / 2)?;
    let x2 = x.f_narrow(3, hd / 2, hd - hd / 2)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], 3)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}

/// A block's feed-forward network.
pub enum FfnModule {
    Dense(DenseMlp),
    Moe(Box<MoeLayer>),
}

impl FfnModule {
    /// The one place a feed-forward module is made from a layer's declaration.
    pub fn build(
        store: &mut ParamStore,
        prefix: &str,
        ffn: &Ffn,
        model: &Model,
        out_std: f64,
    ) -> Result<FfnModule> {
        let d = model.width as i64;
        Ok(match ffn {
            Ffn::Dense(mlp) => FfnModule::Dense(DenseMlp::new(
                store,
                prefix,
                d,
                mlp.hidden as i64,
                mlp.act,
                model.bias,
                out_std,
            )?),
            Ffn::Moe(m) => {
                let mut layer = MoeLayer::new(store, prefix, m, d, model.bias, out_std)?;
                layer.experts.path =
                    moe::default_path(Kind::Float, store.device, d, m.expert.hidden as i64);
                FfnModule::Moe(Box::new(layer))
            }
        })
    }
}

/// One pre-norm transformer block.
pub struct Block {
    pub index: usize,
    norm1: NormLayer,
    attn: Attention,
    norm2: NormLayer,
    pub ffn: FfnModule,
}

impl Block {
    pub fn new(store: &mut ParamStore, layer: &Layer, model: &Model) -> Result<Block> {
        let d = model.width as i64;
        let prefix = format!("layers.{}", layer.index);
        let out_std = 0.02 / (2.0 * model.layers.len() as f64).sqrt();
        Ok(Block {
            index: layer.index,
            norm1: NormLayer::new(store, &format!("{prefix}.norm1"), model.norm, d)?,
            attn: Attention::new(store, &format!("{prefix}.attn"), model, out_std)?,
            norm2: NormLayer::new(store, &format!("{prefix}.norm2"), model.norm, d)?,
            ffn: FfnModule::build(store, &format!("{prefix}.ffn"), &layer.ffn, model, out_std)?,
        })
    }

    /// `x + attn(norm1(x))`, then `+ ffn(norm2(.))`; returns the MoE output's extras. With a
    /// `hook`, the MoE feed-forward (from `norm2` on) is the hook's.
    fn forward<'h>(
        &self,
        x: &Tensor,
        train: bool,
        hook: Option<&mut (dyn MoeHook + 'h)>,
        routing_key: Option<&[u64]>,
    ) -> Result<(Tensor, Option<(Tensor, Telemetry)>)> {
        let x = x.f_add(&self.attn.forward(&self.norm1.forward(x)?)?)?;
        if let (FfnModule::Moe(layer), Some(hook)) = (&self.ffn, hook) {
            let (y, balance, telemetry) =
                hook.moe(self.index, layer, &self.norm2, &x, train, routing_key)?;
            return Ok((y, Some((balance, telemetry))));
        }
        let h = self.norm2.forward(&x)?;
        match &self.ffn {
            FfnModule::Dense(mlp) => Ok((x.f_add(&mlp.forward(&h)?)?, None)),
            FfnModule::Moe(layer) => {
                // The gate's random draws (noise, jitter, random routing) come from the
                // global generator; seeded per (key, layer) they do not depend on which
                // rank routes these tokens or on other threads.
                let _rng = match (train, routing_key) {
                    (true, Some(key)) => Some(seed_routing(key, self.index)),
                    _ => None,
                };
                let (b, t, d) = h.size3()?;
                let out = layer.forward(&h.f_reshape([b * t, d])?, train)?;
                let y = out.out.f_reshape([b, t, d])?;
                Ok((x.f_add(&y)?, Some((out.balance_loss, out.telemetry))))
            }
        }
    }
}

/// Runs a block's MoE feed-forward somewhere else than in this process alone (the
/// expert-parallel runtime: its experts are spread over an expert group).
pub trait MoeHook {
    /// `x`: the residual stream after attention, `[B, T, d]`. Returns `x + ffn(norm(x))`,
    /// the layer's unweighted balance loss and its telemetry. With `train` and a
    /// `routing_key`, the gate must route under [`seed_routing`]`(key, index)`.
    fn moe(
        &mut self,
        index: usize,
        layer: &MoeLayer,
        norm: &NormLayer,
        x: &Tensor,
        train: bool,
        routing_key: Option<&[u64]>,
    ) -> Result<(Tensor, Tensor, Telemetry)>;
}

static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds libtorch's global generator for this thread (in-process ranks and tests share it).
pub fn lock_rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks the generator and seeds it with `mix(key, layer)`: the gate of MoE layer `layer`
/// routes the micro-batch `key` (`[seed, step, micro]`) with the same random draws
/// whichever rank or thread runs it. Hold the guard while the gate draws.
pub fn seed_routing(key: &[u64], layer: usize) -> std::sync::MutexGuard<'static, ()> {
    let guard = lock_rng();
    let mut words = key.to_vec();
    words.push(0x0A7E);
    words.push(layer as u64);
    tch::manual_seed(crate::runtime::data::mix_all(&words) as i64);
    guard
}

/// The whole language model.
pub struct Transformer {
    pub model: Model,
    pub store: ParamStore,
    tokens: Tensor,
    positions: Option<Tensor>,
    pub blocks: Vec<Block>,
    norm: NormLayer,
    /// Compute dtype (f32, bf16, or f64 in gradient checks).
    pub compute: Kind,
    /// The micro-batch being trained (`[seed, step, micro]`): the gates' random draws are
    /// seeded from it per layer (see [`seed_routing`]). `None`: the generator as it is.
    pub routing_key: Option<Vec<u64>>,
}

/// What one forward pass yields besides the logits.
pub struct ForwardOutput {
    /// `[B, T, vocab]` in f32.
    pub logits: Tensor,
    /// Σ over MoE layers of `balance_loss_weight · balance_loss` (f32 scalar).
    pub balance_loss: Tensor,
    /// `(layer index, telemetry)` per MoE layer.
    pub telemetry: Vec<(usize, Telemetry)>,
}

impl Transformer {
    /// Builds every parameter (drawing from libtorch's generator, so seed it first).
    pub fn new(model: &Model, device: Device, master: Kind, compute: Kind) -> Result<Transformer> {
        if !model.tied_embeddings {
            bail!(
                "the runtime supports only tied input/output embeddings (model `{}`)",
                model.name
            );
        }
        let mut store = ParamStore::new(device, master);
        let d = model.width as i64;
        let tokens = store.var(
            "embed.tokens",
            &[model.vocab as i64, d],
            Init::Normal(0.02),
            true,
        )?;
        let positions = match model.positions {
            Positions::Learned => Some(store.var(
                "embed.positions",
                &[model.context as i64, d],
                Init::Normal(0.02),
                true,
            )?),
            Positions::Rotary => None,
        };
        let mut blocks = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            blocks.push(Block::new(&mut store, layer, model)?);
        }
        let norm = NormLayer::new(&mut store, "norm", model.norm, d)?;
        let mut t = Transformer {
            model: model.clone(),
            store,
            tokens,
            positions,
            blocks,
            norm,
            compute,
            routing_key: None,
        };
        t.set_compute(compute);
        Ok(t)
    }

    /// Changes the compute dtype (and the expert matmul path that suits it).
    pub fn set_compute(&mut self, compute: Kind) {
        self.compute = compute;
        let device = self.store.device;
        let d = self.model.width as i64;
        for b in &mut self.blocks {
            if let FfnModule::Moe(layer) = &mut b.ffn {
                let h = layer.experts.w1.size()[2];
                layer.experts.path = moe::default_path(compute, device, d, h);
            }
        }
    }

    /// `tokens`: `[B, T]` int64 → logits and the MoE extras.
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Result<ForwardOutput> {
        self.forward_with(tokens, train, None)
    }

    /// [`Transformer::forward`] with the MoE feed-forwards run by `hook` (when given).
    pub fn forward_with(
        &self,
        tokens: &Tensor,
        train: bool,
        mut hook: Option<&mut dyn MoeHook>,
    ) -> Result<ForwardOutput> {
        let (_b, t) = tokens.size2()?;
        if t > self.model.context as i64 {
            bail!(
                "sequence of {t} tokens is longer than the model's context {}",
                self.model.context
            );
        }
        let emb = self.tokens.f_to_kind(self.compute)?;
        let mut x = Tensor::f_embedding(&emb, tokens, -1, false, false)?;
        if let Some(pos) = &self.positions {
            x = x.f_add(&pos.f_narrow(0, 0, t)?.f_to_kind(self.compute)?)?;
        }
        let mut balance = Tensor::f_zeros([], (Kind::Float, self.store.device))?;
        let mut telemetry = Vec::new();
        let key = self.routing_key.as_deref();
        let hooked = hook.is_some();
        for block in &self.blocks {
            let (y, extra) = block.forward(&x, train, hook.as_deref_mut(), key)?;
            x = y;
            if let (Some((loss, tel)), FfnModule::Moe(layer)) = (extra, &block.ffn) {
                let w = layer.gate.balance_weight;
                if w != 0.0 {
                    balance = balance.f_add(&loss.f_mul_scalar(w)?)?;
                }
                telemetry.push((block.index, tel));
            }
        }
        let x = self.norm.forward(&x)?;
        // A hooked (segmented) backward traverses the head and the embedding in different
        // passes: they must not share the cast's graph node.
        let emb = if hooked {
            self.tokens.f_to_kind(self.compute)?
        } else {
            emb
        };
        let logits = x
            .f_matmul(&emb.f_transpose(0, 1)?)?
            .f_to_kind(Kind::Float)?;
        Ok(ForwardOutput {
            logits,
            balance_loss: balance,
            telemetry,
        })
    }

    /// Mean next-token cross-entropy of `tokens[:, 1:]` given `tokens[:, :-1]`, plus extras.
    pub fn loss(&self, batch: &Tensor, train: bool) -> Result<(Tensor, ForwardOutput)> {
        self.loss_with(batch, train, None)
    }

    /// [`Transformer::loss`] with the MoE feed-forwards run by `hook` (when given).
    pub fn loss_with(
        &self,
        batch: &Tensor,
        train: bool,
        hook: Option<&mut dyn MoeHook>,
    ) -> Result<(Tensor, ForwardOutput)> {
        let (_b, t1) = batch.size2()?;
        let input = batch.f_narrow(1, 0, t1 - 1)?;
        let target = batch.f_narrow(1, 1, t1 - 1)?;
        let out = self.forward_with(&input, train, hook)?;
        let v = out.logits.size()[2];
        let lm = out.logits.f_reshape([-1, v])?.f_cross_entropy_loss(
            &target.f_reshape([-1])?,
            None::<&Tensor>,
            tch::Reduction::Mean,
            -100,
            0.0,
        )?;
        Ok((lm, out))
    }
}
