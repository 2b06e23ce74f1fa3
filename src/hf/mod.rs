//! Hugging Face checkpoints, out and in. `fmoec export --hf OUT CHECKPOINT` maps a checked model
//! onto the `transformers` architecture that computes exactly what fmoec's runtime computes
//! and writes `config.json`, sharded safetensors with their index, and the tokenizer; the
//! `train` block's `init = from_hf(DIR)`, `from_checkpoint(DIR)` or `upcycle(...)` of either
//! starts a run from such a checkpoint, an fmoec checkpoint of another run, or a dense model
//! upcycled into the file's MoE layers.
//!
//! How fmoec's runtime computes (src/runtime/model.rs, moe.rs) and so what a counterpart must
//! do: pre-norm blocks with RMSNorm (eps 1e-5); rotate-half rotary embeddings of the whole
//! head (base 10,000); causal attention with grouped-query heads repeated as
//! `repeat_interleave`; SwiGLU `w2(silu(w1 x) * w3 x)`; linear weights stored `[in, out]`
//! (transposed here into `[out, in]`); the head tied to the embedding unless
//! `tied_embeddings = false`. Gates: `naive()`, `noisy()` and `swipe()` pick the top-k
//! logits and soft-max them among themselves at inference, which equals transformers'
//! softmax over all experts renormalised over the top k (Mixtral; Qwen2-MoE with
//! `norm_topk_prob`); a noisy gate's noise projection is used in training only and is not
//! exported (an import leaves it at its seeded start). Shared experts are one MLP added to the
//! routed output; Qwen2-MoE multiplies its shared expert by `sigmoid(shared_expert_gate x)`, so
//! the export sets that gate to zero (sigmoid 0.5, exact) and doubles the shared expert's down
//! projection (exact); an import halves it and requires the gate to be zero.
//!
//! Architectures: every layer dense → `LlamaForCausalLM`; every layer MoE without shared
//! experts → `MixtralForCausalLM`; otherwise (shared experts, or dense and MoE layers mixed
//! with shared experts) → `Qwen2MoeForCausalLM` with `mlp_only_layers`. DeepSeek-V2/V3 use
//! multi-head latent attention (a normalised low-rank key/value latent and a rotary key
//! shared by the heads), and Qwen3-MoE normalises queries and keys per head: no fmoec file
//! matches them. Everything without a counterpart is refused with a located diagnostic.
//!
//! By concern: [`architecture`] (the choice, `config.json` both ways), [`layout`] (every
//! tensor by name and shape, and the one Hugging Face ↔ fmoec tensor table), [`init`] (an
//! `init` source's metadata checked against the model: what `fmoec check` says), and with the
//! runtime [`export`], [`import`] (the tensors, upcycling) and [`cli`]. Knows nothing about
//! training beyond the parameters a run starts from.

pub mod architecture;
#[cfg(feature = "runtime")]
pub mod cli;
#[cfg(feature = "runtime")]
pub mod export;
#[cfg(feature = "runtime")]
pub mod import;
pub mod init;
pub mod layout;
