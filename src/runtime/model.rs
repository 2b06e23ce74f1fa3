//! The decoder-only transformer instantiated from a checked [`Model`]: one module per layer
//! of `Model.layers`, dense or MoE feed-forward as declared.
//!
//! Architecture: GPT-2 / Megatron-LM GPT (pre-norm blocks, causal self-attention through
//! libtorch's `scaled_dot_product_attention`, grouped-query attention when `kv_heads < heads`,
//! learned absolute positions or rotary embeddings, final norm, LM head tied to the token
//! embedding, or a `head.weight` of its own with `tied_embeddings = false`). Initialisation as Megatron-LM: normal(0, 0.02), output projections (attention
//! `proj`, MLP/expert `w2`) normal(0, 0.02/√(2·layers)), biases zero, norm gains one.
//!
//! Tensor parallelism (Megatron-LM v2.2's column/row-parallel attention and MLPs,
//! FastMoE's expert slicing) is an opt-in split of the built model
//! ([`Transformer::new_tensor_parallel`], [`TensorParallel`]) with its own forward pass
//! ([`Transformer::forward_tensor_parallel`]) that records autograd cuts on a
//! [`Tape`]; the single-device path does not change.
//!
//! Pipeline parallelism: a rank builds only its [`ModelPart`] (its stage's blocks, the
//! embedding on the first stage, the final norm and head on the last, with a copy of a tied
//! embedding) and runs one model chunk at a time ([`Transformer::forward_chunk_with`],
//! [`Transformer::forward_chunk_tensor_parallel`]), from token ids or the previous chunk's
//! hidden states to hidden states or logits; the trainer moves them between stages.
//!
//! Every module is built by [`FfnModule::build`] / [`Block::new`] from one layer description,
//! so a later ModelGraph-driven construction can call the same constructors node by node.
//! This module knows nothing about optimizers, data or checkpoints; of the collective layer
//! it uses only the handles and cuts a tensor-parallel pass is given.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::check::{Ffn, Layer, Model, Norm, Positions};
use crate::collective::{
    exchange_experts_with, reduce_from_tensor_region, Collective, ExpertPlacement, Tape,
    TensorSplit,
};
use crate::runtime::cast;
use crate::runtime::moe::{self, DenseMlp, DispatchPlan, MoeLayer, Telemetry};
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
        let (w, b) = self.weights(x.kind())?;
        self.libtorch(x, &w, b.as_ref())
    }

    /// The gain and the bias in `kind` for a forward pass ([`cast::compute`]).
    fn weights(&self, kind: Kind) -> Result<(Tensor, Option<Tensor>)> {
        let w = cast::compute(&self.weight, kind)?;
        let b = self
            .bias
            .as_ref()
            .map(|b| cast::compute(b, kind))
            .transpose()?;
        Ok((w, b))
    }

    /// The norm of `x` with libtorch's op, the weights `w` and `b` given in `x`'s dtype.
    fn libtorch(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        Ok(match self.kind {
            Norm::LayerNorm => x.f_layer_norm([self.width], Some(w), b, NORM_EPS, true)?,
            Norm::RmsNorm => x.f_rms_norm([self.width], Some(w), NORM_EPS)?,
        })
    }

    /// The residual stream `s = x + h` (`x` itself without `h`) and its norm `norm(s)`, as a
    /// pre-norm block reads them. On a GPU in bf16 or f32 with a width the kernels take (a
    /// multiple of 8 up to 8192), one fused pass ([`crate::runtime::cuda::add_norm_op`]: the
    /// add, the norm and their backward, the weights' gradients added into the masters' f32
    /// `.grad`); `FMOEC_FUSED_NORM=0` keeps libtorch's add and norm, which run everywhere
    /// else.
    pub fn add_forward(&self, x: &Tensor, h: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && fused_norm_enabled() {
            use crate::runtime::cuda::{add_norm_op, NormWeight};
            let (w, b) = self.weights(x.kind())?;
            let (wc, bc) = (w.f_detach()?, b.as_ref().map(|b| b.f_detach()).transpose()?);
            let gamma = NormWeight {
                master: &self.weight,
                copy: &wc,
            };
            let beta = match (&self.bias, &bc) {
                (Some(master), Some(copy)) => Some(NormWeight { master, copy }),
                _ => None,
            };
            if let Some(out) = add_norm_op(x, h, gamma, beta, NORM_EPS)? {
                return Ok((out.s, out.y));
            }
            let s = match h {
                Some(h) => x.f_add(h)?,
                None => x.shallow_clone(),
            };
            let y = self.libtorch(&s, &w, b.as_ref())?;
            return Ok((s, y));
        }
        let s = match h {
            Some(h) => x.f_add(h)?,
            None => x.shallow_clone(),
        };
        let y = self.forward(&s)?;
        Ok((s, y))
    }
}

/// Whether the fused residual add and norm may run (`FMOEC_FUSED_NORM=0` keeps libtorch's).
#[cfg(feature = "cuda")]
fn fused_norm_enabled() -> bool {
    std::env::var("FMOEC_FUSED_NORM").map_or(true, |v| v != "0")
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
    /// Set when `heads`, `kv_heads`, `qkv` and `proj` are this tensor rank's share.
    tensor: Option<TensorParallel>,
    /// The projections with FP8 operands (`fp8_dense`).
    fp8: bool,
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
            tensor: None,
            fp8: false,
        })
    }

    /// `x`: `[B, T, d]` → `[B, T, d]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.tensor.is_some_and(|tp| tp.size > 1) {
            bail!("internal error: a tensor-parallel model runs through Transformer::forward_tensor_parallel");
        }
        self.forward_local(x, self.proj_bias.as_ref())
    }

    /// This rank's heads, through its rows of the output projection, plus `proj_bias` if
    /// given: the whole output with one rank, the rank's partial sum (no bias) with tensor
    /// parallelism.
    fn forward_local(&self, x: &Tensor, proj_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, _d) = x.size3()?;
        let kind = x.kind();
        let qkv = moe::project(x, &self.qkv, self.qkv_bias.as_ref(), self.fp8)?;
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
        moe::project(&y, &self.proj, proj_bias, self.fp8)
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

/// The residual stream between blocks: `x` and the last block's feed-forward output not yet
/// added to it, which the next norm adds in its fused pass ([`NormLayer::add_forward`]).
struct Residual {
    x: Tensor,
    pending: Option<Tensor>,
}

impl Residual {
    fn whole(x: Tensor) -> Residual {
        Residual { x, pending: None }
    }

    /// The stream with the pending output added.
    fn sum(self) -> Result<Tensor> {
        Ok(match self.pending {
            Some(h) => self.x.f_add(&h)?,
            None => self.x,
        })
    }

    /// `(stream, norm(stream))`, the pending output added in the norm's pass.
    fn norm(&self, norm: &NormLayer) -> Result<(Tensor, Tensor)> {
        norm.add_forward(&self.x, self.pending.as_ref())
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
    /// `hook`, the MoE feed-forward (from `norm2` on) is the hook's. Each residual add is
    /// the next norm's ([`NormLayer::add_forward`]): the stream comes in and goes out with the
    /// last feed-forward output pending.
    fn forward<'h>(
        &self,
        stream: Residual,
        train: bool,
        hook: Option<&mut (dyn MoeHook + 'h)>,
        keys: Option<&Tensor>,
    ) -> Result<(Residual, Option<(Tensor, Telemetry)>)> {
        let (x, n1) = stream.norm(&self.norm1)?;
        let a = self.attn.forward(&n1)?;
        let key = layer_key(keys, self.index)?;
        if let (FfnModule::Moe(layer), Some(hook)) = (&self.ffn, hook) {
            let x = x.f_add(&a)?;
            let (y, balance, telemetry) =
                hook.moe(self.index, layer, &self.norm2, &x, train, key.as_ref())?;
            return Ok((Residual::whole(y), Some((balance, telemetry))));
        }
        let (x, h) = self.norm2.add_forward(&x, Some(&a))?;
        let pending = |y: Tensor| Residual {
            x,
            pending: Some(y),
        };
        match &self.ffn {
            FfnModule::Dense(mlp) => Ok((pending(mlp.forward(&h)?), None)),
            FfnModule::Moe(layer) => {
                let (b, t, d) = h.size3()?;
                let out = layer.forward(&h.f_reshape([b * t, d])?, train, key.as_ref())?;
                let y = out.out.f_reshape([b, t, d])?;
                Ok((pending(y), Some((out.balance_loss, out.telemetry))))
            }
        }
    }
}

/// Runs a block's MoE feed-forward somewhere else than in this process alone (the
/// expert-parallel runtime: its experts are spread over an expert group).
pub trait MoeHook {
    /// `x`: the residual stream after attention, `[B, T, d]`. Returns `x + ffn(norm(x))`,
    /// the layer's unweighted balance loss and its telemetry. The gate routes with `key`
    /// (this layer's draw key, see [`Transformer::set_routing_key`]).
    fn moe(
        &mut self,
        index: usize,
        layer: &MoeLayer,
        norm: &NormLayer,
        x: &Tensor,
        train: bool,
        key: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Telemetry)>;
}

static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds libtorch's global generator for this thread (in-process ranks and tests share it).
pub fn lock_rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// The gates' draw keys of the micro-batch `key` (`[seed, step, micro]`), `depth` rows of two
/// 32-bit words (row `layer` from `mix(key, layer)`, see [`moe::keyed_uniform`]): the gate of
/// MoE layer `layer` draws the same noise, jitter and random routing whichever rank, thread or
/// device routes these tokens.
pub fn routing_key_words(key: &[u64], depth: usize) -> Vec<i64> {
    (0..depth)
        .flat_map(|layer| {
            let mut words = key.to_vec();
            words.push(0x0A7E);
            words.push(layer as u64);
            moe::draw_key_words(crate::runtime::data::mix_all(&words))
        })
        .collect()
}

/// Copies the CPU tensor `src` into `dst`: on a GPU through pinned memory, without waiting
/// for the device (a plain copy from pageable memory waits for the stream to drain).
pub fn copy_from_host(src: &Tensor, dst: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    if dst.device().is_cuda() {
        return crate::runtime::graph::copy_from_host(src, dst);
    }
    dst.shallow_clone().f_copy_(src)?;
    Ok(())
}

/// Row `layer` of the `[depth, 2]` draw keys (a view, no copy).
fn layer_key(keys: Option<&Tensor>, layer: usize) -> Result<Option<Tensor>> {
    Ok(match keys {
        Some(k) => Some(k.f_select(0, layer as i64)?),
        None => None,
    })
}

/// The part of the model one rank builds and runs: all of it without pipeline parallelism;
/// with it, its stage's blocks in model chunks (one per virtual stage it holds), the
/// embedding on the first stage and the final norm and head on the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPart {
    /// Blocks `start..end` of each model chunk, in the order the rank runs them.
    pub chunks: Vec<Range<usize>>,
    /// Holds the token embedding (and learned positions): the first stage.
    pub embedding: bool,
    /// Holds the final norm and the head (a copy of the token embedding, when they are
    /// tied): the last stage.
    pub head: bool,
}

impl ModelPart {
    /// The whole model of `depth` blocks as one chunk.
    pub fn whole(depth: usize) -> ModelPart {
        ModelPart {
            chunks: std::iter::once(0..depth).collect(),
            embedding: true,
            head: true,
        }
    }

    /// Refuses chunks that are empty or reach past the model's `depth` blocks.
    fn check(&self, depth: usize) -> Result<()> {
        if self
            .chunks
            .iter()
            .any(|c| c.start >= c.end || c.end > depth)
        {
            bail!(
                "internal error: model chunks {:?} of a model of {depth} blocks",
                self.chunks
            );
        }
        Ok(())
    }

    pub fn holds_layer(&self, layer: usize) -> bool {
        self.chunks.iter().any(|c| c.contains(&layer))
    }

    /// Whether this part's copy of the tied token embedding is another part's too (the last
    /// stage's copy of the first stage's): the first stage counts it (the gradient norm,
    /// checkpoints); the two are kept equal (their gradients summed between them).
    pub fn holds_tied_copy(&self, model: &Model) -> bool {
        model.tied_embeddings && self.head && !self.embedding
    }
}

/// The whole language model, or one rank's [`ModelPart`] of it.
pub struct Transformer {
    pub model: Model,
    pub store: ParamStore,
    /// What of the model this one holds.
    pub part: ModelPart,
    /// The token embedding (first stage; and the last one's copy with a tied head).
    tokens: Option<Tensor>,
    positions: Option<Tensor>,
    pub blocks: Vec<Block>,
    /// The final norm (last stage).
    norm: Option<NormLayer>,
    /// The untied output projection (`None`: the head is the token embedding).
    head: Option<Tensor>,
    /// Compute dtype (f32, bf16, or f64 in gradient checks).
    pub compute: Kind,
    /// The draw keys of the micro-batch being trained (`[depth, 2]` int64 on the model's
    /// device, see [`Transformer::set_routing_key`]); `None`: the gates draw from libtorch's
    /// generator.
    pub routing_keys: Option<Tensor>,
    /// The device tensor [`Transformer::set_routing_key`] writes (kept, so its address stays).
    keys_buffer: Option<Tensor>,
    /// The tied LM head with FP8 operands (`fp8_dense`; see [`Transformer::set_fp8`]).
    pub fp8_head: bool,
}

/// What one model chunk's forward pass yields ([`Transformer::forward_chunk_with`]).
pub struct ChunkOutput {
    /// The logits `[B, T, vocab]` when the chunk ends the model, else its hidden states
    /// `[B, T, d]` (the next chunk's input), in the compute dtype.
    pub output: Tensor,
    /// Σ over the chunk's MoE layers of `balance_loss_weight · balance_loss` (f32 scalar).
    pub balance_loss: Tensor,
    /// `(layer index, telemetry)` per MoE layer of the chunk.
    pub telemetry: Vec<(usize, Telemetry)>,
}

/// What one forward pass yields besides the logits.
pub struct ForwardOutput {
    /// `[B, T, vocab]` in the compute dtype.
    pub logits: Tensor,
    /// Σ over MoE layers of `balance_loss_weight · balance_loss` (f32 scalar).
    pub balance_loss: Tensor,
    /// `(layer index, telemetry)` per MoE layer.
    pub telemetry: Vec<(usize, Telemetry)>,
}

impl Transformer {
    /// Builds every parameter (drawing from libtorch's generator in creation order, so seed
    /// it first).
    pub fn new(model: &Model, device: Device, master: Kind, compute: Kind) -> Result<Transformer> {
        let whole = ModelPart::whole(model.layers.len());
        Transformer::build(model, ParamStore::new(device, master), compute, &whole)
    }

    /// Builds the parameters of one rank: every parameter drawn from `seed` and its name
    /// (see [`ParamStore::seed`]), and of each MoE layer only the experts `local` lists for
    /// it (all where a layer is absent), with the values the one-rank model gives them.
    /// Hold [`lock_rng`] around it.
    pub fn new_seeded(
        model: &Model,
        device: Device,
        master: Kind,
        compute: Kind,
        seed: u64,
        local: &BTreeMap<usize, Vec<usize>>,
    ) -> Result<Transformer> {
        let whole = ModelPart::whole(model.layers.len());
        Transformer::new_part_seeded(model, device, master, compute, seed, local, &whole)
    }

    /// [`Transformer::new_seeded`] of one [`ModelPart`] (a pipeline stage): its parameters
    /// only, each with the value the whole model gives it (a tied head's copy of the token
    /// embedding too).
    pub fn new_part_seeded(
        model: &Model,
        device: Device,
        master: Kind,
        compute: Kind,
        seed: u64,
        local: &BTreeMap<usize, Vec<usize>>,
        part: &ModelPart,
    ) -> Result<Transformer> {
        let mut store = ParamStore::new(device, master);
        store.seed = Some(seed);
        store.local_experts = local
            .iter()
            .map(|(layer, ids)| (format!("layers.{layer}.ffn.experts"), ids.clone()))
            .collect();
        Transformer::build(model, store, compute, part)
    }

    /// The parameters `part` holds, created in the order that draws them (embedding,
    /// positions, blocks, final norm, head), and the modules over them.
    fn build(
        model: &Model,
        mut store: ParamStore,
        compute: Kind,
        part: &ModelPart,
    ) -> Result<Transformer> {
        part.check(model.layers.len())?;
        let (tokens, positions) = Transformer::embedding_params(&mut store, model, part)?;
        let mut blocks = Vec::with_capacity(model.layers.len());
        for layer in model.layers.iter().filter(|l| part.holds_layer(l.index)) {
            blocks.push(Block::new(&mut store, layer, model)?);
        }
        let (norm, head) = Transformer::head_params(&mut store, model, part)?;
        let mut t = Transformer {
            model: model.clone(),
            store,
            part: part.clone(),
            tokens,
            positions,
            blocks,
            norm,
            head,
            compute,
            routing_keys: None,
            keys_buffer: None,
            fp8_head: false,
        };
        t.set_compute(compute);
        Ok(t)
    }

    /// The token embedding (on the first stage, and on the last one when the head is tied to
    /// it) and the learned positions (first stage).
    fn embedding_params(
        store: &mut ParamStore,
        model: &Model,
        part: &ModelPart,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = model.width as i64;
        let tokens = if part.embedding || (part.head && model.tied_embeddings) {
            Some(store.var(
                "embed.tokens",
                &[model.vocab as i64, d],
                Init::Normal(0.02),
                true,
            )?)
        } else {
            None
        };
        let positions = match model.positions {
            Positions::Learned if part.embedding => Some(store.var(
                "embed.positions",
                &[model.context as i64, d],
                Init::Normal(0.02),
                true,
            )?),
            _ => None,
        };
        Ok((tokens, positions))
    }

    /// The final norm and, with `tied_embeddings = false`, the output projection (last
    /// stage).
    fn head_params(
        store: &mut ParamStore,
        model: &Model,
        part: &ModelPart,
    ) -> Result<(Option<NormLayer>, Option<Tensor>)> {
        let d = model.width as i64;
        let norm = if part.head {
            Some(NormLayer::new(store, "norm", model.norm, d)?)
        } else {
            None
        };
        // `tied_embeddings = false`: an output projection of its own, `[vocab, width]` like
        // the embedding it replaces in the head.
        let head = if model.tied_embeddings || !part.head {
            None
        } else {
            Some(store.var(
                "head.weight",
                &[model.vocab as i64, d],
                Init::Normal(0.02),
                true,
            )?)
        };
        Ok((norm, head))
    }

    /// Keys the gates' random draws to the micro-batch `key` (`[seed, step, micro]`, see
    /// [`routing_key_words`]), or back to libtorch's generator with `None`. The keys are
    /// written into the same device tensor every time (a captured CUDA graph reads them
    /// there), without waiting for the device.
    pub fn set_routing_key(&mut self, key: Option<&[u64]>) -> Result<()> {
        let Some(key) = key else {
            self.routing_keys = None;
            return Ok(());
        };
        let depth = self.model.layers.len();
        let words =
            Tensor::f_from_slice(&routing_key_words(key, depth))?.f_reshape([depth as i64, 2])?;
        let buffer = match &self.keys_buffer {
            Some(b) => b.shallow_clone(),
            None => {
                let b = words.f_zeros_like()?.f_to_device(self.store.device)?;
                self.keys_buffer = Some(b.shallow_clone());
                b
            }
        };
        copy_from_host(&words, &buffer)?;
        self.routing_keys = Some(buffer);
        Ok(())
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

    /// Runs the matmuls `fp8` names with FP8 operands (`precision = fp8`, see
    /// [`crate::runtime::fp8`]): the routed experts of each MoE layer, and with `fp8_dense`
    /// the attention's projections, the dense MLPs, the shared experts and the LM head; all but
    /// those `bf16` keeps in the compute dtype (by block index: the run's choice,
    /// [`crate::runtime::fp8::with_overrides`] over the planner's
    /// [`crate::plan::cost::fp8_fallbacks`]).
    pub fn set_fp8(
        &mut self,
        fp8: crate::runtime::fp8::Fp8Use,
        bf16: &crate::runtime::fp8::Fp8Fallbacks,
    ) {
        for b in &mut self.blocks {
            let i = b.index;
            b.attn.fp8 = fp8.dense && !bf16.attention.contains(&i);
            let mlp = match &mut b.ffn {
                FfnModule::Dense(mlp) => Some(mlp),
                FfnModule::Moe(layer) => {
                    layer.experts.fp8 = fp8.experts && !bf16.experts.contains(&i);
                    layer.experts.fp8_wgrad = !bf16.weight_gradients.contains(&i);
                    layer.shared.as_mut()
                }
            };
            if let Some(mlp) = mlp {
                mlp.fp8 = fp8.dense && !bf16.mlps.contains(&i);
            }
        }
        self.fp8_head = fp8.dense && !bf16.head;
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
        hook: Option<&mut dyn MoeHook>,
    ) -> Result<ForwardOutput> {
        self.check_whole()?;
        Ok(self.forward_chunk_with(0, tokens, train, hook)?.into())
    }

    /// Refuses a forward pass of the whole model on a part of it.
    fn check_whole(&self) -> Result<()> {
        if self.part != ModelPart::whole(self.model.layers.len()) {
            bail!(
                "internal error: a whole-model pass on a pipeline stage's part ({:?})",
                self.part
            );
        }
        Ok(())
    }

    /// Blocks `start..end` of this part's model chunk `chunk`.
    pub fn chunk_range(&self, chunk: usize) -> Result<Range<usize>> {
        match self.part.chunks.get(chunk) {
            Some(r) => Ok(r.clone()),
            None => bail!(
                "internal error: model chunk {chunk} of a part with {}",
                self.part.chunks.len()
            ),
        }
    }

    /// Whether chunk `chunk` starts the model (its input is token ids) and whether it ends
    /// it (its output is the logits).
    pub fn chunk_ends(&self, chunk: usize) -> Result<(bool, bool)> {
        let r = self.chunk_range(chunk)?;
        Ok((r.start == 0, r.end == self.model.layers.len()))
    }

    /// The forward pass of this part's model chunk `chunk`, the MoE feed-forwards run by
    /// `hook` (when given): `input` is the token ids `[B, T]` when the chunk starts the
    /// model, else the previous chunk's hidden states `[B, T, d]`; the output is the logits
    /// when it ends the model, else its hidden states.
    pub fn forward_chunk_with(
        &self,
        chunk: usize,
        input: &Tensor,
        train: bool,
        mut hook: Option<&mut dyn MoeHook>,
    ) -> Result<ChunkOutput> {
        let keys = self.routing_keys.as_ref();
        self.run_chunk(chunk, input, |block, stream| {
            block.forward(stream, train, hook.as_deref_mut(), keys)
        })
    }

    /// Model chunk `chunk` of `input` (see [`Transformer::forward_chunk_with`]), each of its
    /// blocks run by `forward`: the embedding where the chunk starts the model, the blocks
    /// in order with their MoE extras gathered, the head where it ends it.
    fn run_chunk(
        &self,
        chunk: usize,
        input: &Tensor,
        mut forward: impl FnMut(&Block, Residual) -> Result<(Residual, Option<(Tensor, Telemetry)>)>,
    ) -> Result<ChunkOutput> {
        let range = self.chunk_range(chunk)?;
        let (starts, ends) = self.chunk_ends(chunk)?;
        let mut stream = Residual::whole(if starts {
            self.embed(input)?
        } else {
            input.shallow_clone()
        });
        let mut extras = MoeExtras::new(self.store.device)?;
        for block in self.blocks.iter().filter(|b| range.contains(&b.index)) {
            let (next, extra) = forward(block, stream)?;
            stream = next;
            extras.add(block, extra)?;
        }
        if !ends {
            return Ok(extras.with_output(stream.sum()?));
        }
        Ok(extras.with_output(self.head(&stream)?))
    }

    /// The token embedding this part holds.
    fn tokens(&self) -> Result<&Tensor> {
        match &self.tokens {
            Some(t) => Ok(t),
            None => bail!("internal error: this pipeline stage holds no token embedding"),
        }
    }

    /// Token (and learned position) embeddings of `tokens` `[B, T]`, in the compute dtype.
    ///
    /// The rows are gathered from the master and then cast (the values a gather from a bf16
    /// copy gives), so that the backward sums each token's row gradients in f32. Gathered
    /// from a bf16 copy, libtorch sums them in bf16, rounding at every addition, and a tied
    /// head sharing that copy adds its gradient to them in bf16 as well; the head casts the
    /// matrix itself ([`Transformer::head`]).
    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_b, t) = tokens.size2()?;
        if t > self.model.context as i64 {
            bail!(
                "sequence of {t} tokens is longer than the model's context {}",
                self.model.context
            );
        }
        let mut x = Tensor::f_embedding(self.tokens()?, tokens, -1, false, false)?
            .f_to_kind(self.compute)?;
        if let Some(pos) = &self.positions {
            x = x.f_add(&cast::compute(pos, self.compute)?.f_narrow(0, 0, t)?)?;
        }
        Ok(x)
    }

    /// The final norm (adding the last block's pending output in its pass) and the tied
    /// head: logits of the last hidden states, in the compute dtype.
    fn head(&self, stream: &Residual) -> Result<Tensor> {
        let Some(norm) = &self.norm else {
            bail!("internal error: this pipeline stage holds no head");
        };
        let weight = match &self.head {
            Some(head) => head,
            None => self.tokens()?,
        };
        #[cfg(feature = "cuda")]
        if self.fp8_head {
            use crate::runtime::fp8::{linear, WeightLayout};
            return linear(&stream.norm(norm)?.1, weight, None, WeightLayout::OutIn);
        }
        // The lookup reads the master's rows (see `embed`): the head's gradient reaches the
        // master through a cast of its own and is added to theirs in f32.
        let weight = cast::compute(weight, self.compute)?;
        Ok(stream.norm(norm)?.1.f_matmul(&weight.f_transpose(0, 1)?)?)
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
        let (input, target) = next_token_pairs(batch)?;
        let out = self.forward_with(&input, train, hook)?;
        let lm = next_token_loss(&out.logits, &target)?;
        Ok((lm, out))
    }
}

// ---------------------------------------------------------------------------------------
// Tensor parallelism (Megatron-LM v2.2, FastMoE on Megatron)
// ---------------------------------------------------------------------------------------

/// This rank's place in its tensor-parallel group, fixed when the model is built
/// ([`Transformer::new_tensor_parallel`]). The group's handle is not kept here (a
/// [`Collective`] handle belongs to the rank's groups and is not `Sync`); the forward pass
/// takes it ([`Transformer::forward_tensor_parallel`]).
///
/// What each tensor rank holds (Megatron-LM's `ColumnParallelLinear` /
/// `RowParallelLinear`):
/// - attention: `heads / size` query heads and `kv_heads / size` key/value heads (its
///   columns of the fused `qkv` and its rows of `proj`); `proj`'s bias whole, added after
///   the all-reduce;
/// - dense MLPs and shared experts: columns `[rank·f/size, (rank+1)·f/size)` of `w1`, `w3`,
///   `b1` and those rows of `w2`; `b2` whole, added after the all-reduce;
/// - routed experts with `expert_slicing` (FastMoE on Megatron): the same hidden columns of
///   every expert it holds; `b2` whole but added by tensor rank 0 only (inside the expert,
///   before the MoE output's all-reduce), so its gradient is summed over the tensor group
///   ([`TensorSplit::Partial`]). Without slicing every tensor rank holds whole experts and
///   runs the same tokens through them;
/// - embedding, positions, norms, gates and the (tied) head: whole, on every tensor rank
///   (Megatron splits the vocabulary; the runtime does not, so each tensor rank keeps the
///   whole `vocab × width` embedding and computes the whole logits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorParallel {
    /// Position in the tensor group (`global rank mod size` in Megatron's layout).
    pub rank: usize,
    /// Ranks in the tensor group (the file's `tensor`).
    pub size: usize,
    /// Whether routed experts are sliced over the tensor ranks (the planner's
    /// `expert_slicing`, i.e. `Checked.parallel.expert_slicing && tensor > 1`).
    pub expert_slicing: bool,
}

/// How the parameter `name` of a model split by `tp` is shared over the tensor group (see
/// [`TensorParallel`]); every parameter is [`TensorSplit::Whole`] without one or with a
/// group of one rank.
pub fn tensor_split(name: &str, tp: Option<TensorParallel>) -> TensorSplit {
    let Some(tp) = tp.filter(|tp| tp.size > 1) else {
        return TensorSplit::Whole;
    };
    let Some(rest) = name.strip_prefix("layers.") else {
        return TensorSplit::Whole;
    };
    let rest = rest.split_once('.').map_or("", |(_, r)| r);
    let sharded_mlp = |m: &str| matches!(m, "w1" | "w3" | "b1" | "w2");
    match rest {
        "attn.qkv.weight" | "attn.qkv.bias" | "attn.proj.weight" => TensorSplit::Sharded,
        _ => {
            if let Some(m) = rest.strip_prefix("ffn.experts.") {
                if !tp.expert_slicing {
                    TensorSplit::Whole
                } else if sharded_mlp(m) {
                    TensorSplit::Sharded
                } else {
                    TensorSplit::Partial
                }
            } else if let Some(m) = rest
                .strip_prefix("ffn.shared.")
                .or_else(|| rest.strip_prefix("ffn."))
            {
                if sharded_mlp(m) {
                    TensorSplit::Sharded
                } else {
                    TensorSplit::Whole
                }
            } else {
                TensorSplit::Whole
            }
        }
    }
}

/// Where a tensor-sharded parameter's slice lies: the dimension and the `(start, length)`
/// pieces concatenated along it.
type Pieces = (i64, Vec<(i64, i64)>);

/// Slices of a sharded parameter named `name` with full shape `shape` for rank `tp.rank`;
/// `None` for a parameter every tensor rank holds whole.
fn shard_pieces(
    name: &str,
    shape: &[i64],
    model: &Model,
    tp: TensorParallel,
) -> Result<Option<Pieces>> {
    if tensor_split(name, Some(tp)) != TensorSplit::Sharded {
        return Ok(None);
    }
    let (j, t) = (tp.rank as i64, tp.size as i64);
    let last = shape.len() as i64 - 1;
    let even = |what: &str, n: i64| -> Result<i64> {
        if n % t != 0 {
            bail!("`{name}`: {what} {n} is not divisible by tensor = {t}");
        }
        Ok(n / t)
    };
    let a = &model.attention;
    let (h, kvh, hd) = (a.heads as i64, a.kv_heads as i64, a.head_dim as i64);
    let piece = |dim: i64, what: &str| -> Result<Option<Pieces>> {
        let n = even(what, shape[dim as usize])?;
        Ok(Some((dim, vec![(j * n, n)])))
    };
    if name.ends_with(".attn.qkv.weight") || name.ends_with(".attn.qkv.bias") {
        let (hl, kvl) = (even("heads", h)?, even("kv_heads", kvh)?);
        return Ok(Some((
            last,
            vec![
                (j * hl * hd, hl * hd),
                (h * hd + j * kvl * hd, kvl * hd),
                ((h + kvh) * hd + j * kvl * hd, kvl * hd),
            ],
        )));
    }
    if name.ends_with(".attn.proj.weight") {
        even("heads", h)?;
        return piece(0, "heads × head_dim");
    }
    let matrix = name.rsplit('.').next().unwrap_or_default();
    let experts = name.contains(".ffn.experts.");
    match (matrix, experts) {
        ("w1" | "w3" | "b1", _) => piece(last, "hidden size"),
        ("w2", true) => piece(1, "hidden size"),
        ("w2", false) => piece(0, "hidden size"),
        _ => Ok(None),
    }
}

fn narrow_pieces(full: &Tensor, (dim, pieces): &Pieces) -> Result<Tensor> {
    let parts: Vec<Tensor> = pieces
        .iter()
        .map(|&(start, len)| full.f_narrow(*dim, start, len))
        .collect::<Result<_, _>>()?;
    Ok(Tensor::f_cat(&parts, *dim)?)
}

/// A dense MLP's partial output on this tensor rank (its hidden columns), without `b2`.
fn mlp_partial(mlp: &DenseMlp, x: &Tensor) -> Result<Tensor> {
    moe::project(&mlp.hidden(x)?, &mlp.w2, None, mlp.fp8)
}

fn add_bias(x: Tensor, bias: &Option<Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => x.f_add(&cast::compute(b, x.kind())?)?,
        None => x,
    })
}

/// What a tensor-parallel forward pass needs besides the tokens: the tensor group, the
/// tape that records its cuts (run [`Tape::backward_tensor_parallel`] on it with the same
/// group) and a label for the collectives (`"step 12, micro-batch 3"`).
pub struct TensorPass<'a> {
    pub group: &'a dyn Collective,
    pub tape: &'a mut Tape,
    pub at: &'a str,
    /// Who runs the MoE layers' routed experts: `None` runs every expert of the layer on
    /// this rank; [`ExchangedExperts`] spreads them over an expert group.
    pub experts: Option<&'a mut dyn RoutedExperts>,
}

/// Runs a MoE layer's routed experts inside a tensor-parallel pass (the place where
/// expert parallelism plugs in).
pub trait RoutedExperts {
    /// `h`: `[N, d]`, the layer's input, a leaf of the tape (the copy-to-region leaf when
    /// experts are sliced); `expert`: `[N, k]` routed experts (−1: dropped); `weight`:
    /// `[N, k]` combine weights, a leaf. Returns `Σ_slots weight · expert(h)`, `[N, d]`: this
    /// rank's partial sum when the experts are sliced (the caller all-reduces it over the
    /// tensor group). Anything recorded on `tape` goes in a new step (its graph must start
    /// at the leaves, whose own step comes earlier).
    fn combined(
        &mut self,
        index: usize,
        layer: &MoeLayer,
        h: &Tensor,
        expert: &Tensor,
        weight: &Tensor,
        tape: &mut Tape,
    ) -> Result<Tensor>;

    /// The experts the last [`RoutedExperts::combined`] ran on replicas (FasterMoE's
    /// shadowing), as the telemetry's `[E]` indicator; `None` where nothing could be.
    fn take_shadowed(&mut self) -> Option<Tensor> {
        None
    }
}

/// The routed experts spread over an expert group (FastMoE on Megatron: the data-parallel
/// group of this tensor rank), tokens moved by [`exchange_experts`]. Each MoE layer's
/// `experts` must already hold only this rank's experts (in the placement's local order)
/// and, with slicing, only this tensor rank's hidden columns of them.
pub struct ExchangedExperts<'a> {
    /// The expert group (`Groups::expert()`).
    pub group: &'a dyn Collective,
    /// Per MoE layer (block index): which experts each position of the group holds.
    pub placements: &'a std::collections::BTreeMap<usize, ExpertPlacement>,
    /// Label for the collectives (`"step 12, micro-batch 3"`).
    pub at: &'a str,
    /// FasterMoE's smart schedule and shadowing as planned (`None`: the plain exchange).
    pub fastermoe: Option<&'a crate::plan::FasterMoePlan>,
    /// What the last exchange replicated (see [`RoutedExperts::take_shadowed`]).
    pub shadowed: Option<Tensor>,
}

impl RoutedExperts for ExchangedExperts<'_> {
    fn combined(
        &mut self,
        index: usize,
        layer: &MoeLayer,
        h: &Tensor,
        expert: &Tensor,
        weight: &Tensor,
        tape: &mut Tape,
    ) -> Result<Tensor> {
        let Some(placement) = self.placements.get(&index) else {
            bail!("no expert placement for MoE layer {index}");
        };
        let (n, d) = h.size2()?;
        let k = expert.size()[1];
        let e = layer.gate.experts;
        let device = h.device();
        // Slots in the placement's order; dropped slots (-1) sort past the last one.
        let slot_table = Tensor::f_from_slice(&placement.slot_of_expert())?.f_to_device(device)?;
        let flat = expert.f_reshape([-1])?;
        let slot = slot_table
            .f_index_select(0, &flat.f_clamp_min(0)?)?
            .f_where_scalarother(&flat.f_ge(0)?, e)?;
        let order = slot.f_argsort_stable(true, 0, false)?;
        let per_slot = moe::counts_of(&slot, e + 1)?.f_narrow(0, 0, e)?;
        let counts = Vec::<i64>::try_from(&per_slot.f_to_device(Device::Cpu)?)?;
        let kept: i64 = counts.iter().sum();
        let sent = order.f_narrow(0, 0, kept)?;
        let token = sent.f_div_scalar_mode(k, "floor")?;
        tape.step();
        let at = format!("{}, layer {index}", self.at);
        let schedule = moe::LayerSchedule::of(self.fastermoe, index);
        let (ys, exchange) = exchange_experts_with(
            self.group,
            placement,
            &h.f_index_select(0, &token)?,
            &counts,
            &at,
            schedule.options(),
            &moe::RankExperts(&layer.experts),
        )?;
        self.shadowed = schedule.shadowed(&exchange, e, device)?;
        tape.record(exchange);
        let w = weight
            .f_reshape([-1])?
            .f_index_select(0, &sent)?
            .f_to_kind(ys.kind())?;
        Ok(Tensor::f_zeros([n, d], (ys.kind(), device))?.f_index_add(
            0,
            &token,
            &ys.f_mul(&w.f_unsqueeze(1)?)?,
        )?)
    }

    fn take_shadowed(&mut self) -> Option<Tensor> {
        self.shadowed.take()
    }
}

impl TensorPass<'_> {
    fn reduce(&self, partial: &Tensor, what: &str) -> Result<Tensor> {
        let at = format!("{}, {what}", self.at);
        Ok(reduce_from_tensor_region(self.group, partial, &at)?)
    }

    /// The routed experts' output `routed` (`[N, d]`) with the shared experts' (of their
    /// input `shared_input`) added, all-reduced over the tensor group where either is this
    /// rank's partial sum: the routed experts when `sliced`, the shared ones always.
    fn add_shared(
        &self,
        layer: &MoeLayer,
        routed: Tensor,
        shared_input: Option<&Tensor>,
        sliced: bool,
        what: &str,
    ) -> Result<Tensor> {
        let mut out = routed;
        if let (Some(shared), Some(hs)) = (&layer.shared, shared_input) {
            let partial = mlp_partial(shared, hs)?;
            out = if sliced {
                self.reduce(&out.f_add(&partial)?, what)?
            } else {
                out.f_add(&self.reduce(&partial, what)?)?
            };
            out = add_bias(out, &shared.b2)?;
        } else if sliced {
            out = self.reduce(&out, what)?;
        }
        Ok(out)
    }

    /// A copy-to-region cut where the computation after it is split over the tensor
    /// ranks, a plain cut where every tensor rank computes the same.
    fn enter(&mut self, t: &Tensor, split: bool) -> Result<Tensor> {
        Ok(if split {
            self.tape.copy_to_tensor_region(t)?
        } else {
            self.tape.cut(t)?
        })
    }
}

/// The cuts of a MoE layer's inputs in a tensor-parallel pass (the fourth tape step).
struct MoeCuts {
    /// The routed experts' input `[N, d]` (copy to region when they are sliced).
    he: Tensor,
    /// The combine weights `[N, k]`.
    weight: Tensor,
    /// The gate's balance loss.
    balance: Tensor,
    /// The shared experts' input, where the layer has them.
    shared_input: Option<Tensor>,
}

impl MoeCuts {
    fn enter(
        pass: &mut TensorPass,
        layer: &MoeLayer,
        h: &Tensor,
        routing: &moe::Routing,
        split: bool,
        sliced: bool,
    ) -> Result<MoeCuts> {
        let he = pass.enter(h, sliced)?;
        let weight = pass.enter(&routing.weight, sliced)?;
        let balance = pass.tape.cut(&routing.balance_loss)?;
        // The shared experts' input is cut in this step too: a runner may open the
        // next one.
        let shared_input = match (&layer.shared, sliced) {
            (None, _) => None,
            (Some(_), true) => Some(he.shallow_clone()),
            (Some(_), false) => Some(pass.enter(h, split)?),
        };
        Ok(MoeCuts {
            he,
            weight,
            balance,
            shared_input,
        })
    }
}

impl Block {
    /// [`Block::forward`] on one tensor rank. Four tape steps per block, in forward order:
    /// the block input (a plain cut of the residual stream), the attention input (copy to
    /// region), the residual after attention (plain cut), the feed-forward input (copy to
    /// region; with an MoE layer also the combine weights and the balance loss). Replayed in
    /// reverse, each segment of the graph is traversed once and every leaf's gradient is
    /// complete before its step runs.
    fn forward_tensor_parallel(
        &self,
        x: &Tensor,
        train: bool,
        tp: TensorParallel,
        keys: Option<&Tensor>,
        pass: &mut TensorPass,
    ) -> Result<(Tensor, Option<(Tensor, Telemetry)>)> {
        let split = tp.size > 1;
        let x = self.attention_tensor_parallel(x, split, pass)?;
        pass.tape.step();
        let h = self.norm2.forward(&x)?;
        match &self.ffn {
            FfnModule::Dense(mlp) => {
                let hl = pass.enter(&h, split)?;
                let what = format!("layer {} mlp", self.index);
                let z = pass.reduce(&mlp_partial(mlp, &hl)?, &what)?;
                Ok((x.f_add(&add_bias(z, &mlp.b2)?)?, None))
            }
            FfnModule::Moe(layer) => {
                let (out, balance, telemetry) =
                    self.moe_tensor_parallel(layer, &h, train, tp, keys, pass)?;
                Ok((x.f_add(&out)?, Some((balance, telemetry))))
            }
        }
    }

    /// The first three tape steps: the block input's cut, attention over the tensor group,
    /// and the cut of the residual stream after it.
    fn attention_tensor_parallel(
        &self,
        x: &Tensor,
        split: bool,
        pass: &mut TensorPass,
    ) -> Result<Tensor> {
        pass.tape.step();
        let x = pass.tape.cut(x)?;
        pass.tape.step();
        let a = pass.enter(&self.norm1.forward(&x)?, split)?;
        let y = pass.reduce(
            &self.attn.forward_local(&a, None)?,
            &format!("layer {} attention", self.index),
        )?;
        let y = add_bias(y, &self.attn.proj_bias)?;
        pass.tape.step();
        Ok(pass.tape.cut(&x.f_add(&y)?)?)
    }

    /// The MoE feed-forward of `h` (`norm2`'s output, `[B, T, d]`) on one tensor rank, in the
    /// fourth tape step (a runner of the routed experts may open more): its output `[B, T,
    /// d]`, whole on every tensor rank, the balance loss's cut and the telemetry.
    fn moe_tensor_parallel(
        &self,
        layer: &MoeLayer,
        h: &Tensor,
        train: bool,
        tp: TensorParallel,
        keys: Option<&Tensor>,
        pass: &mut TensorPass,
    ) -> Result<(Tensor, Tensor, Telemetry)> {
        let i = self.index;
        let (b, t, d) = h.size3()?;
        let h = h.f_reshape([b * t, d])?;
        let split = tp.size > 1;
        let sliced = split && tp.expert_slicing;
        // Keyed per (micro-batch, layer): every tensor rank (and every data rank
        // that routes these tokens) draws the same noise, jitter and random routing.
        let routing = layer.gate.route(&h, train, layer_key(keys, i)?.as_ref())?;
        let cuts = MoeCuts::enter(pass, layer, &h, &routing, split, sliced)?;
        let plan = DispatchPlan::new(
            &routing.expert,
            layer.gate.experts,
            layer.gate.may_drop(train),
        )?;
        let mut shadowed = None;
        let routed = match pass.experts.as_deref_mut() {
            Some(runner) => {
                let out = runner.combined(
                    i,
                    layer,
                    &cuts.he,
                    &routing.expert,
                    &cuts.weight,
                    pass.tape,
                )?;
                shadowed = runner.take_shadowed();
                out
            }
            None => moe::run_experts(&layer.experts, &cuts.he, &plan, &cuts.weight, b * t)?,
        };
        let what = format!("layer {i} moe");
        let out = pass.add_shared(layer, routed, cuts.shared_input.as_ref(), sliced, &what)?;
        let mut telemetry = tch::no_grad(|| moe::telemetry(&routing, &plan.counts, b * t))?;
        telemetry.shadowed = shadowed;
        Ok((out.f_reshape([b, t, d])?, cuts.balance, telemetry))
    }

    /// Keeps this tensor rank's share of the block's parameters (see [`TensorParallel`]),
    /// in the modules and in `store`.
    fn shard(&mut self, store: &mut ParamStore, model: &Model, tp: TensorParallel) -> Result<()> {
        let prefix = format!("layers.{}", self.index);
        let mut take = |name: String, t: &mut Tensor| -> Result<()> {
            let Some(pieces) = shard_pieces(&name, &t.size(), model, tp)? else {
                return Ok(());
            };
            let local = tch::no_grad(|| narrow_pieces(t, &pieces))?;
            *t = store.replace(&name, &local)?;
            Ok(())
        };
        let attn = &mut self.attn;
        take(format!("{prefix}.attn.qkv.weight"), &mut attn.qkv)?;
        if let Some(bias) = attn.qkv_bias.as_mut() {
            take(format!("{prefix}.attn.qkv.bias"), bias)?;
        }
        take(format!("{prefix}.attn.proj.weight"), &mut attn.proj)?;
        let t = tp.size as i64;
        attn.heads /= t;
        attn.kv_heads /= t;
        attn.tensor = Some(tp);
        let mut mlp = |p: &str, m: &mut DenseMlp| {
            take_mlp(
                &mut take,
                p,
                &mut m.w1,
                &mut m.w2,
                m.w3.as_mut(),
                m.b1.as_mut(),
            )
        };
        match &mut self.ffn {
            FfnModule::Dense(m) => mlp(&format!("{prefix}.ffn"), m)?,
            FfnModule::Moe(layer) => {
                if let Some(shared) = layer.shared.as_mut() {
                    mlp(&format!("{prefix}.ffn.shared"), shared)?;
                }
                if tp.expert_slicing {
                    let e = &mut layer.experts;
                    take_mlp(
                        &mut take,
                        &format!("{prefix}.ffn.experts"),
                        &mut e.w1,
                        &mut e.w2,
                        e.w3.as_mut(),
                        e.b1.as_mut(),
                    )?;
                    if tp.rank != 0 {
                        // The bias stays in the store (whole, summed over the tensor group
                        // after the backward) but only tensor rank 0 adds it.
                        layer.experts.b2 = None;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Hands an MLP's (or stacked experts') tensor-split matrices to `take` under their store
/// names `{prefix}.w1`, `.w2`, `.w3`, `.b1` (`b2` is added after the reduce, whole).
fn take_mlp(
    take: &mut dyn FnMut(String, &mut Tensor) -> Result<()>,
    prefix: &str,
    w1: &mut Tensor,
    w2: &mut Tensor,
    w3: Option<&mut Tensor>,
    b1: Option<&mut Tensor>,
) -> Result<()> {
    take(format!("{prefix}.w1"), w1)?;
    take(format!("{prefix}.w2"), w2)?;
    if let Some(w3) = w3 {
        take(format!("{prefix}.w3"), w3)?;
    }
    if let Some(b1) = b1 {
        take(format!("{prefix}.b1"), b1)?;
    }
    Ok(())
}

impl Transformer {
    /// [`Transformer::new`] on one rank of a tensor group: every parameter is drawn whole,
    /// exactly as the single-rank model draws it (seed the generator the same way), then
    /// the rank keeps its share (see [`TensorParallel`]). `None` is [`Transformer::new`].
    pub fn new_tensor_parallel(
        model: &Model,
        device: Device,
        master: Kind,
        compute: Kind,
        tp: Option<TensorParallel>,
    ) -> Result<Transformer> {
        let mut t = Transformer::new(model, device, master, compute)?;
        if let Some(tp) = tp {
            t.split_tensor_parallel(tp)?;
        }
        Ok(t)
    }

    /// Keeps this tensor rank's share of every parameter of a whole model (see
    /// [`TensorParallel`]), in the modules and in the store. With expert parallelism, keep
    /// the rank's experts first (the stacked expert tensors, `b2` included, cut to its
    /// experts), then split: on tensor ranks other than 0 a sliced layer's module no longer
    /// holds `b2` (the store still does).
    pub fn split_tensor_parallel(&mut self, tp: TensorParallel) -> Result<()> {
        if self.tensor_parallel().is_some() {
            bail!("internal error: the model is already split over tensor ranks");
        }
        let compute = self.compute;
        let t = self;
        if tp.size == 0 || tp.rank >= tp.size {
            bail!(
                "tensor rank {} is outside a tensor group of {} ranks",
                tp.rank,
                tp.size
            );
        }
        let tp = TensorParallel {
            expert_slicing: tp.expert_slicing && tp.size > 1,
            ..tp
        };
        let model = t.model.clone();
        // Every size checked before anything changes.
        for p in &t.store.params {
            shard_pieces(&p.name, &p.tensor.size(), &model, tp)?;
        }
        for block in &mut t.blocks {
            block.shard(&mut t.store, &model, tp)?;
        }
        t.set_compute(compute);
        Ok(())
    }

    /// The tensor-parallel split this model was built with.
    pub fn tensor_parallel(&self) -> Option<TensorParallel> {
        self.blocks.first().and_then(|b| b.attn.tensor)
    }

    /// How each parameter of the store (in order) is split over the tensor group.
    pub fn tensor_splits(&self) -> Vec<TensorSplit> {
        let tp = self.tensor_parallel();
        self.store
            .params
            .iter()
            .map(|p| tensor_split(&p.name, tp))
            .collect()
    }

    /// This tensor rank's share of a whole tensor shaped like parameter `name` of the
    /// single-rank model (a checkpoint's tensor, a reference gradient): the same slices the
    /// parameter itself got. Whole parameters come back unchanged.
    pub fn tensor_shard_of(&self, name: &str, full: &Tensor) -> Result<Tensor> {
        match self.tensor_parallel() {
            Some(tp) => match shard_pieces(name, &full.size(), &self.model, tp)? {
                Some(pieces) => narrow_pieces(full, &pieces),
                None => Ok(full.shallow_clone()),
            },
            None => Ok(full.shallow_clone()),
        }
    }

    /// The inverse of [`Transformer::tensor_shard_of`] up to the other ranks' slices: a
    /// tensor of the whole shape `full` (the single-rank model's shape of `name`) holding
    /// `local` (this rank's slice, shaped like its parameter) where the split put it and
    /// zeros elsewhere, so that summing it over the tensor group gives the whole tensor
    /// exactly. `None` for a parameter every tensor rank holds whole.
    pub fn tensor_whole_from_shard(
        &self,
        name: &str,
        full: &[i64],
        local: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(tp) = self.tensor_parallel() else {
            return Ok(None);
        };
        let Some((dim, pieces)) = shard_pieces(name, full, &self.model, tp)? else {
            return Ok(None);
        };
        let _guard = tch::no_grad_guard();
        let whole = Tensor::f_zeros(full, (local.kind(), local.device()))?;
        let mut offset = 0;
        for (start, len) in pieces {
            let mut view = whole.f_narrow(dim, start, len)?;
            view.f_copy_(&local.f_narrow(dim, offset, len)?)?;
            offset += len;
        }
        if offset != local.size()[dim as usize] {
            bail!(
                "internal error: `{name}`: the slice has {} rows along dimension {dim}, the split gives {offset}",
                local.size()[dim as usize]
            );
        }
        Ok(Some(whole))
    }

    /// [`Transformer::forward`] on one rank of a tensor group (a model from
    /// [`Transformer::new_tensor_parallel`]), recording its cuts on `pass.tape`. Every rank
    /// of the group runs it on the same tokens; with random gates set
    /// [`Transformer::routing_keys`] so that every rank draws the same (see
    /// [`routing_key_words`]). The logits are whole on every rank.
    pub fn forward_tensor_parallel(
        &self,
        tokens: &Tensor,
        train: bool,
        pass: &mut TensorPass,
    ) -> Result<ForwardOutput> {
        self.check_whole()?;
        Ok(self
            .forward_chunk_tensor_parallel(0, tokens, train, pass)?
            .into())
    }

    /// [`Transformer::forward_chunk_with`] on one rank of a tensor group, as
    /// [`Transformer::forward_tensor_parallel`] runs the whole model.
    pub fn forward_chunk_tensor_parallel(
        &self,
        chunk: usize,
        input: &Tensor,
        train: bool,
        pass: &mut TensorPass,
    ) -> Result<ChunkOutput> {
        let Some(tp) = self.tensor_parallel() else {
            bail!("internal error: the model was built without a tensor-parallel split");
        };
        let keys = self.routing_keys.as_ref();
        self.run_chunk(chunk, input, |block, stream| {
            let (y, extra) =
                block.forward_tensor_parallel(&stream.sum()?, train, tp, keys, pass)?;
            Ok((Residual::whole(y), extra))
        })
    }

    /// [`Transformer::loss`] through [`Transformer::forward_tensor_parallel`].
    pub fn loss_tensor_parallel(
        &self,
        batch: &Tensor,
        train: bool,
        pass: &mut TensorPass,
    ) -> Result<(Tensor, ForwardOutput)> {
        let (input, target) = next_token_pairs(batch)?;
        let out = self.forward_tensor_parallel(&input, train, pass)?;
        let lm = next_token_loss(&out.logits, &target)?;
        Ok((lm, out))
    }
}

/// Mean cross-entropy of `logits` `[B, T, V]` (compute dtype) against `target` `[B, T]`,
/// computed in f32: on a GPU with the fused kernels one pass over the logits in their own
/// dtype each way ([`crate::runtime::cuda`]), else libtorch's on f32 logits.
pub fn next_token_loss(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let v = logits.size()[2];
    let flat = logits.f_reshape([-1, v])?;
    let target = target.f_reshape([-1])?;
    #[cfg(feature = "cuda")]
    if moe::fused_available(logits.device()) {
        if let Some(rows) = crate::runtime::cuda::cross_entropy_rows(&flat, &target)? {
            // the mean over targets inside the vocabulary (libtorch's ignore_index rows)
            let counted = target.f_ge(0)?.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
            return Ok(rows.f_sum(Kind::Float)?.f_div(&counted)?);
        }
    }
    Ok(flat.f_to_kind(Kind::Float)?.f_cross_entropy_loss(
        &target,
        None::<&Tensor>,
        tch::Reduction::Mean,
        -100,
        0.0,
    )?)
}

/// The inputs `tokens[:, :-1]` and next-token targets `tokens[:, 1:]` of a batch.
pub fn next_token_pairs(batch: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_b, t1) = batch.size2()?;
    Ok((batch.f_narrow(1, 0, t1 - 1)?, batch.f_narrow(1, 1, t1 - 1)?))
}

impl From<ChunkOutput> for ForwardOutput {
    /// The whole model's pass: its one chunk's output is the logits.
    fn from(out: ChunkOutput) -> ForwardOutput {
        ForwardOutput {
            logits: out.output,
            balance_loss: out.balance_loss,
            telemetry: out.telemetry,
        }
    }
}

/// The MoE blocks' weighted balance losses and telemetry, gathered over one forward pass.
struct MoeExtras {
    balance: Tensor,
    telemetry: Vec<(usize, Telemetry)>,
}

impl MoeExtras {
    fn new(device: Device) -> Result<MoeExtras> {
        Ok(MoeExtras {
            balance: Tensor::f_zeros([], (Kind::Float, device))?,
            telemetry: Vec::new(),
        })
    }

    /// Takes what `block`'s forward returned beside its output.
    fn add(&mut self, block: &Block, extra: Option<(Tensor, Telemetry)>) -> Result<()> {
        if let (Some((loss, tel)), FfnModule::Moe(layer)) = (extra, &block.ffn) {
            let w = layer.gate.balance_weight;
            if w != 0.0 {
                self.balance = self.balance.f_add(&loss.f_mul_scalar(w)?)?;
            }
            self.telemetry.push((block.index, tel));
        }
        Ok(())
    }

    fn with_output(self, output: Tensor) -> ChunkOutput {
        ChunkOutput {
            output,
            balance_loss: self.balance,
            telemetry: self.telemetry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off the kernels (here on a CPU) a norm's residual add is libtorch's add and its norm
    /// libtorch's: the same values as the two ops, and without `h` the stream is `x` itself.
    #[test]
    fn add_forward_off_the_kernels_is_the_add_and_the_norm() {
        for kind in [Norm::LayerNorm, Norm::RmsNorm] {
            let mut store = ParamStore::new(Device::Cpu, Kind::Float);
            let norm = NormLayer::new(&mut store, "norm", kind, 16).unwrap();
            // gains and biases of their own, not ones and zeros
            tch::no_grad(|| {
                let _ = norm.weight.shallow_clone().uniform_(0.5, 1.5);
                if let Some(b) = &norm.bias {
                    let _ = b.shallow_clone().uniform_(-0.5, 0.5);
                }
            });
            let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
            let h = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
            let (s, y) = norm.add_forward(&x, Some(&h)).unwrap();
            let sum = x.f_add(&h).unwrap();
            assert!(s.equal(&sum), "{kind:?}");
            assert!(y.equal(&norm.forward(&sum).unwrap()), "{kind:?}");
            let (s, y) = norm.add_forward(&x, None).unwrap();
            assert_eq!(s.data_ptr(), x.data_ptr(), "{kind:?}");
            assert!(y.equal(&norm.forward(&x).unwrap()), "{kind:?}");
        }
    }

    /// `FMOEC_FUSED_NORM=0`, and only that, keeps libtorch's add and norm on a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn fused_norm_is_on_unless_switched_off() {
        std::env::set_var("FMOEC_FUSED_NORM", "0");
        assert!(!fused_norm_enabled());
        std::env::set_var("FMOEC_FUSED_NORM", "1");
        assert!(fused_norm_enabled());
        std::env::remove_var("FMOEC_FUSED_NORM");
        assert!(fused_norm_enabled());
    }
}
