//! The checked model: the artifact of `check`, read by every later phase.
//!
//! Invariant: every name is resolved, every constant evaluated, every constructor
//! argument present and typed, and the model rules hold (width divisible by heads,
//! `top_k <= experts`, one feed-forward per layer, `layers.len() == depth`, ...).
//! Later phases (graph, plan, runtime, emit) read only these types, never source text;
//! the spans kept here let them report diagnostics against the user's file.
//!
//! Sizes are `u64` counts (elements, not bytes) unless a name says otherwise.

use serde::Serialize;

use crate::diag::Span;

/// Everything one `.fmoe` file declares, checked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Checked {
    pub model: Model,
    /// The `parallel` block; a file without one gets a single-GPU default
    /// (`Parallel::single`), with `declared = false`.
    pub parallel: Parallel,
    /// The `train` block; `None` for plan-only files.
    pub train: Option<Train>,
}

/// A decoder-only transformer language model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Model {
    pub name: String,
    pub vocab: u64,
    /// Maximum sequence length (positions).
    pub context: u64,
    /// Hidden size `d_model`.
    pub width: u64,
    pub attention: Attention,
    pub norm: Norm,
    pub positions: Positions,
    /// LM head shares the token embedding matrix.
    pub tied_embeddings: bool,
    /// Linear layers carry biases (GPT-2, Megatron GPT: yes; Mixtral: no).
    pub bias: bool,
    /// One entry per block, `layers[i].index == i`, `layers.len() == depth`.
    pub layers: Vec<Layer>,
    #[serde(skip)]
    pub spans: ModelSpans,
}

impl Model {
    pub fn depth(&self) -> u64 {
        self.layers.len() as u64
    }

    pub fn moe_layers(&self) -> impl Iterator<Item = (usize, &Moe)> {
        self.layers.iter().filter_map(|l| match &l.ffn {
            Ffn::Moe(m) => Some((l.index, m)),
            Ffn::Dense(_) => None,
        })
    }
}

/// Where the model's headline values were written, for diagnostics from later phases.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelSpans {
    /// The model's name in its declaration.
    pub name: Span,
    pub vocab: Span,
    pub context: Span,
    pub width: Span,
    pub heads: Span,
    pub depth: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attention {
    pub heads: u64,
    /// Key/value heads (grouped-query attention); equals `heads` for plain multi-head.
    pub kv_heads: u64,
    /// `width / heads`.
    pub head_dim: u64,
    pub causal: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    LayerNorm,
    RmsNorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Learned absolute position embeddings (GPT-2, Megatron GPT).
    Learned,
    /// Rotary embeddings (Mixtral, DeepSeek); no parameters.
    Rotary,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Layer {
    pub index: usize,
    pub ffn: Ffn,
    /// Where this layer's feed-forward was assigned (the `block` default or a
    /// `layers[...]` selection).
    #[serde(skip)]
    pub span: Span,
}

// Built once per layer and read in place; boxing would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Gelu,
    Relu,
    /// `w2(silu(w1 x) * w3 x)`: three matrices instead of two.
    Swiglu,
}

impl Activation {
    /// Number of `width x hidden` matrices in one MLP with this activation.
    pub fn matrices(self) -> u64 {
        match self {
            Activation::Swiglu => 3,
            Activation::Gelu | Activation::Relu => 2,
        }
    }
}

/// A two-layer (or gated three-matrix) feed-forward network.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mlp {
    pub hidden: u64,
    pub act: Activation,
    #[serde(skip)]
    pub span: Span,
}

/// A Mixture-of-Experts feed-forward layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Moe {
    /// Global number of routed experts in this layer.
    pub experts: u64,
    pub top_k: u64,
    pub gate: Gate,
    /// Shape of each routed expert.
    pub expert: Mlp,
    /// Always-on shared experts (DeepSeek-MoE); `None` for plain MoE.
    pub shared: Option<SharedExperts>,
    #[serde(skip)]
    pub spans: MoeSpans,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MoeSpans {
    /// The whole `moe(...)` call.
    pub call: Span,
    pub experts: Span,
    pub top_k: Span,
}

/// `count` shared experts, each an [`Mlp`]; every token goes through all of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SharedExperts {
    pub count: u64,
    pub expert: Mlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateKind {
    /// Softmax over the top-k logits.
    Naive,
    /// Noisy top-k (Shazeer et al. 2017) with its importance/load balance loss.
    Noisy,
    /// GShard: top-2, capacity, random routing of the second expert, aux loss.
    Gshard,
    /// Switch: top-1, multiplicative jitter, capacity, aux loss.
    Switch,
    /// SWIPE: balance by swapping tokens to under-loaded experts.
    Swipe,
}

/// Capacity factors: each expert takes at most `factor * top_k * tokens / experts`
/// tokens; the rest are dropped (index -1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Capacity {
    pub train: f64,
    pub eval: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gate {
    pub kind: GateKind,
    /// `None`: no capacity limit (naive, noisy, swipe).
    pub capacity: Option<Capacity>,
    /// Weight of the gate's balance loss added to the LM loss (0 disables it).
    pub balance_loss: f64,
    /// Switch: multiplicative jitter epsilon on the input (0 disables it).
    pub jitter: f64,
    /// GShard: route the second expert with probability `2 * p2`.
    pub random_routing: bool,
    #[serde(skip)]
    pub span: Span,
}

/// The `parallel` block.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Parallel {
    /// Whether the file had a `parallel` block (else these are defaults).
    pub declared: bool,
    /// World size.
    pub gpus: u64,
    pub hardware: Hardware,
    pub tensor: u64,
    pub pipeline: u64,
    /// `gpus / (tensor * pipeline)`; checked to divide exactly.
    pub data: u64,
    pub experts: ExpertGroup,
    /// Slice each expert's hidden dimension over tensor ranks (FastMoE on Megatron:
    /// each tensor rank holds `hidden / tensor` of every local expert).
    pub expert_slicing: bool,
    /// Sequences per micro-batch per data rank; `None` lets the planner choose.
    pub micro_batch: Option<u64>,
    /// FasterMoE's smart schedule of the expert exchange (`smart_schedule`).
    #[serde(skip_serializing_if = "SmartSchedule::is_off")]
    pub smart_schedule: SmartSchedule,
    /// FasterMoE's dynamic shadowing of hot experts (`shadowing`).
    #[serde(skip_serializing_if = "Shadowing::is_off")]
    pub shadowing: Shadowing,
    /// Model chunks per pipeline stage (Megatron-LM's virtual pipeline size): 1 is plain
    /// 1F1B, more runs the interleaved schedule. Without effect with pipeline = 1. Left out
    /// of the JSON when 1.
    #[serde(skip_serializing_if = "is_one")]
    pub virtual_stages: u64,
    #[serde(skip)]
    pub spans: ParallelSpans,
}

impl Parallel {
    /// FasterMoE's options the file turns on, by name with where it writes them.
    pub fn fastermoe_options(&self) -> Vec<(&'static str, Span)> {
        let mut on = Vec::new();
        if !self.smart_schedule.is_off() {
            on.push(("smart_schedule", self.spans.smart_schedule));
        }
        if !self.shadowing.is_off() {
            on.push(("shadowing", self.spans.shadowing));
        }
        on
    }
}

/// FasterMoE's smart schedule: the expert exchange split into chunks of peer ranks,
/// pipelined with the expert matmuls (`smart_schedule = chunks(N)`, `auto` or `off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SmartSchedule {
    /// One all-to-all each way (FastMoE's exchange).
    #[default]
    Off,
    /// The planner's cost model picks the chunk count.
    Auto,
    /// This many chunks (at most the expert group's ranks).
    Chunks { count: u64 },
}

impl SmartSchedule {
    pub fn is_off(&self) -> bool {
        *self == SmartSchedule::Off
    }
}

/// FasterMoE's dynamic shadowing: per step, experts whose tokens cost more to send than
/// their weights are replicated to every rank of the expert group (`shadowing = dynamic`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shadowing {
    #[default]
    Off,
    Dynamic,
}

impl Shadowing {
    pub fn is_off(&self) -> bool {
        *self == Shadowing::Off
    }
}

fn is_one(v: &u64) -> bool {
    *v == 1
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ParallelSpans {
    /// The `parallel` keyword (or the model name when no block was written).
    pub block: Span,
    pub gpus: Span,
    pub hardware: Span,
    pub tensor: Span,
    pub pipeline: Span,
    pub data: Span,
    pub experts: Span,
    pub micro_batch: Span,
    pub smart_schedule: Span,
    pub shadowing: Span,
    pub virtual_stages: Span,
}

/// Which ranks share one layer's experts between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExpertGroup {
    /// FastMoE on Megatron: the expert group is the whole data-parallel group.
    AcrossData,
    /// A sub-group of `size` consecutive data ranks (size divides `data`); ranks at the
    /// same position in different sub-groups hold the same experts (expert-data group).
    Size { size: u64 },
    /// Every rank holds every expert (plain data parallelism of the MoE layer).
    Replicated,
}

/// A hardware profile from `std.hardware` (or the user's settings).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hardware {
    pub name: String,
    pub memory_bytes: u64,
    /// Dense tensor-core peak, without sparsity.
    pub bf16_tflops: f64,
    pub fp16_tflops: f64,
    pub fp32_tflops: f64,
    /// Dense FP8 (e4m3) tensor-core peak; `None` where the GPU has no FP8 tensor cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp8_tflops: Option<f64>,
    /// HBM bandwidth, GB/s (10^9 bytes).
    pub hbm_gbps: f64,
    /// Per-GPU NVLink bandwidth in one direction, GB/s.
    pub nvlink_gbps: f64,
    /// Per-GPU network (inter-node) bandwidth in one direction, GB/s.
    pub network_gbps: f64,
    pub gpus_per_node: u64,
}

/// The `train` block.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Train {
    pub data: DataSource,
    /// Global batch in sequences (over all data ranks and micro-batches).
    pub batch_sequences: u64,
    /// Tokens per sequence (at most the model's context).
    pub seq_len: u64,
    pub steps: u64,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    /// Clip the global gradient 2-norm to this value; `None` disables clipping.
    pub clip_grad: Option<f64>,
    pub precision: Precision,
    pub checkpoint: Option<CheckpointPolicy>,
    pub eval: Option<EvalPolicy>,
    pub seed: u64,
    /// `init = ...`: where the run's parameters start; `None`: the seeded initialisation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSpec>,
    #[serde(skip)]
    pub spans: TrainSpans,
}

/// `init = from_hf("DIR")`, `from_checkpoint("DIR")`, or `upcycle(...)` of either.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InitSpec {
    pub source: InitSource,
    /// `upcycle(...)`: the source is a dense model whose MLPs become every MoE layer's experts.
    pub upcycle: Option<Upcycle>,
    /// The whole `init` value.
    #[serde(skip)]
    pub span: Span,
    /// The `from_hf(...)` or `from_checkpoint(...)` call.
    #[serde(skip)]
    pub source_span: Span,
}

/// Where an `init` reads its weights.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum InitSource {
    /// A Hugging Face folder (`config.json`, safetensors).
    Hf(String),
    /// An fmoec checkpoint: a `step-*` folder, or a checkpoint folder with `latest`.
    Checkpoint(String),
}

impl InitSource {
    pub fn path(&self) -> &str {
        match self {
            InitSource::Hf(p) | InitSource::Checkpoint(p) => p,
        }
    }
}

/// `upcycle(dense, noise = 0.0)`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Upcycle {
    /// Each expert's weights are the dense ones times `1 + noise · N(0, 1)`.
    pub noise: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrainSpans {
    pub block: Span,
    pub data: Span,
    /// `tokenizer = ...` (the block's keyword where there is none).
    pub tokenizer: Span,
    pub batch: Span,
    pub steps: Span,
    pub precision: Span,
    pub checkpoint: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum DataSource {
    /// A corpus embedded in the binary, by name (`"tiny-shakespeare"`).
    Builtin(String),
    /// A plain UTF-8 text file, tokenized as bytes.
    Text(String),
    /// A Megatron-LM indexed dataset: path prefix of `.bin`/`.idx`.
    Megatron(String),
    /// JSON lines, the string under `key` of each line a document (only inside
    /// [`DataSource::Tokenized`]).
    Jsonl { path: String, key: String },
    /// The train block's `tokenizer = ...`: a text source (builtin, text, jsonl) read through
    /// it, or a Megatron dataset it made.
    Tokenized {
        source: Box<DataSource>,
        tokenizer: TokenizerSpec,
    },
}

/// `tokenizer = hf("tokenizer.json")` or `gpt2(vocab = "vocab.json", merges = "merges.txt")`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TokenizerSpec {
    Hf { path: String },
    Gpt2 { vocab: String, merges: String },
}

impl TokenizerSpec {
    pub fn source(&self) -> crate::data::tokenizer::TokenizerSource {
        use crate::data::tokenizer::TokenizerSource;
        match self {
            TokenizerSpec::Hf { path } => TokenizerSource::Json(path.into()),
            TokenizerSpec::Gpt2 { vocab, merges } => TokenizerSource::Gpt2 {
                vocab: vocab.into(),
                merges: merges.into(),
            },
        }
    }
}

impl DataSource {
    /// The tokenizer the data is read through, if any.
    pub fn tokenizer(&self) -> Option<&TokenizerSpec> {
        match self {
            DataSource::Tokenized { tokenizer, .. } => Some(tokenizer),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Optimizer {
    /// AdamW with decoupled weight decay (none on norms and biases).
    Adamw {
        lr: f64,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    },
}

impl Optimizer {
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Adamw { lr, .. } => *lr,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Constant {
        warmup: u64,
    },
    /// Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step.
    Cosine {
        warmup: u64,
        min_lr_ratio: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bf16 compute with fp32 master weights.
    Bf16,
    /// fp16 compute with fp32 master weights and loss scaling.
    Fp16,
    /// bf16 compute with fp32 master weights, the routed experts' matmuls with FP8 (e4m3)
    /// operands, and with `dense` (`fp8_dense = true`) also the attention projections, the
    /// dense MLPs and the LM head.
    Fp8 {
        dense: bool,
    },
}

impl Precision {
    /// Bytes of one element of the compute (model) weights.
    pub fn param_bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 | Precision::Fp16 | Precision::Fp8 { .. } => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckpointPolicy {
    /// Save every this many steps (and at the end).
    pub every: u64,
    pub dir: String,
    /// How many of the newest checkpoints to keep (0: all).
    pub keep: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalPolicy {
    /// Evaluate every this many steps.
    pub every: u64,
    /// Held-out batches per evaluation.
    pub batches: u64,
}

/// A Megatron-LM release the emitter can target, declared in `stdlib/megatron.fmoe`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MegatronTarget {
    /// The declaration's name (`v2_2`).
    pub name: String,
    /// As the user names it on the command line: `"v2.2"`.
    pub version: String,
    /// The source tree the patch applies to: a commit (tags may be gone) or a tag.
    pub tree: String,
    /// The folder of templates under `src/emit/templates/` (`"v2.2"`).
    pub templates: String,
    /// Files the patch touches, relative to the Megatron-LM root.
    pub patched_files: Vec<String>,
    /// Oldest torch version the release supports (`"1.8"`).
    pub torch_min: String,
    /// Every capability of `check::targets::CAPABILITIES`, by field name.
    pub capabilities: std::collections::BTreeMap<String, Capability>,
}

/// One capability of a target: the values of a model property it accepts, or whether it can
/// do something at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Capability {
    Set(Vec<String>),
    Flag(bool),
}

impl MegatronTarget {
    /// Whether capability `field` allows `value` (a name, or `"true"`/`"false"`); a flag
    /// allows `"true"` when set. Unknown fields allow nothing.
    pub fn allows(&self, field: &str, value: &str) -> bool {
        match self.capabilities.get(field) {
            Some(Capability::Set(values)) => values.iter().any(|v| v == value),
            Some(Capability::Flag(on)) => *on && value == "true",
            None => false,
        }
    }

    /// Whether flag `field` is set.
    pub fn can(&self, field: &str) -> bool {
        self.allows(field, "true")
    }
}
