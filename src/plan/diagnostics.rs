//! Every diagnostic the planner reports, with its stable code and wording, in one place.
//!
//! Codes are `P0001`...; never reuse or renumber one. Constructors take the values and
//! spans they talk about and know nothing about how the planner found the problem.

use crate::diag::{count, Diagnostic, Span};
use crate::plan::cost::MemoryModel;

/// `gpus` not divisible by `tensor × pipeline`.
pub const WORLD_NOT_DIVISIBLE: &str = "P0001";
/// Attention heads not divisible by `tensor`.
pub const HEADS_NOT_DIVISIBLE: &str = "P0002";
/// Key/value heads not divisible by `tensor`.
pub const KV_HEADS_NOT_DIVISIBLE: &str = "P0003";
/// A feed-forward hidden size not divisible by `tensor`.
pub const FFN_NOT_DIVISIBLE: &str = "P0004";
/// An expert's hidden size not divisible by `tensor` under expert slicing.
pub const EXPERT_HIDDEN_NOT_DIVISIBLE: &str = "P0005";
/// `depth` not divisible by `pipeline`.
pub const DEPTH_NOT_DIVISIBLE: &str = "P0006";
/// A layer's experts not divisible by the expert group size.
pub const EXPERTS_NOT_DIVISIBLE: &str = "P0007";
/// The expert group size does not divide the data-parallel size.
pub const EXPERT_GROUP_NOT_DIVISIBLE: &str = "P0008";
/// A rank needs more memory than its GPU has.
pub const OUT_OF_MEMORY: &str = "P0009";
/// A size that must be at least 1 is 0.
pub const ZERO_SIZE: &str = "P0010";
/// The global batch does not split into micro-batches over the data ranks.
pub const BATCH_NOT_DIVISIBLE: &str = "P0011";
/// A size beyond what the planner's arithmetic supports.
pub const TOO_LARGE: &str = "P0012";
/// A plan too large to list rank by rank.
pub const TOO_MANY_TO_LIST: &str = "P0013";
/// `precision = fp8` on a GPU without FP8 tensor cores.
pub const NO_FP8: &str = "P0014";
/// A layer's experts not divisible by the expert x tensor ranks that hold them whole (a
/// Megatron-Core layout whose experts have biases and cannot be sliced).
pub const EXPERTS_NOT_DIVISIBLE_WHOLE: &str = "P0015";
/// A pipeline stage's blocks not divisible by `virtual_stages`.
pub const CHUNKS_NOT_DIVISIBLE: &str = "P0016";
/// The interleaved schedule with micro-batches that are not a multiple of the stages.
pub const INTERLEAVED_MICRO_BATCHES: &str = "P0017";
/// Warning: a tensor-parallel group spans hosts.
pub const TENSOR_ACROSS_HOSTS: &str = "P0101";
/// Warning: the pipeline idles for most of the step.
pub const LARGE_BUBBLE: &str = "P0102";
/// Warning: `smart_schedule = chunks(N)` with more chunks than the expert group has ranks.
pub const CHUNKS_OVER_EXPERT_GROUP: &str = "P0110";
/// Warning: FasterMoE's options on a layout whose experts are not exchanged.
pub const NOTHING_TO_EXCHANGE: &str = "P0111";
/// Warning: experts with biases are spread whole over expert x tensor ranks instead of sliced.
pub const WHOLE_EXPERTS_FOR_BIAS: &str = "P0103";
/// Warning: the vocabulary is padded to a multiple of the tensor size.
pub const VOCAB_PADDED: &str = "P0104";
/// Warning: model chunks asked for (`virtual_stages` > 1) where the pipeline in effect has one
/// stage. A `W` code, not a `P` one: the checker raised it before the planner judged it against
/// the pipeline in effect, and codes are never renumbered.
pub const VIRTUAL_STAGES_WITHOUT_PIPELINE: &str = "W0011";

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `tensor` and `pipeline` carry the span of their value where the file writes one.
pub fn world_not_divisible(
    gpus: (u64, Span),
    tensor: (u64, Option<Span>),
    pipeline: (u64, Option<Span>),
) -> Diagnostic {
    let tp = tensor.0 * pipeline.0;
    // the nearest multiples of tensor × pipeline below and above the world size
    let below = gpus.0 / tp.max(1) * tp;
    let fits: Vec<String> = [below, below + tp]
        .into_iter()
        .filter(|g| *g > 0 && *g != gpus.0)
        .map(|g| g.to_string())
        .collect();
    let mut d = Diagnostic::error(
        WORLD_NOT_DIVISIBLE,
        gpus.1,
        format!(
            "{} cannot be split into tensor = {} × pipeline = {} ({} per data-parallel replica)",
            count(gpus.0, "GPU", "GPUs"),
            tensor.0,
            pipeline.0,
            count(tp, "GPU", "GPUs")
        ),
    )
    .with_label(format!("{} is not a multiple of {}", gpus.0, tp));
    for (what, (_, span)) in [("tensor size", tensor), ("pipeline size", pipeline)] {
        if let Some(span) = span {
            d = d.with_secondary(span, what);
        }
    }
    d.with_help(format!(
        "use a multiple of {tp} GPUs (such as {}), or change tensor or pipeline",
        fits.join(" or ")
    ))
}

pub fn heads_not_divisible(heads: (u64, Span), tensor: (u64, Span), kv: bool) -> Diagnostic {
    let (code, what) = if kv {
        (KV_HEADS_NOT_DIVISIBLE, "key/value heads")
    } else {
        (HEADS_NOT_DIVISIBLE, "attention heads")
    };
    Diagnostic::error(
        code,
        tensor.1,
        format!(
            "{} cannot be split over tensor = {} ranks",
            count(heads.0, &what[..what.len() - 1], what),
            tensor.0
        ),
    )
    .with_label(format!("{} does not divide {}", tensor.0, heads.0))
    .with_secondary(
        heads.1,
        if kv {
            format!(
                "heads declared here; the model has {}",
                count(heads.0, "key/value head", "key/value heads")
            )
        } else {
            format!(
                "{} declared here",
                count(heads.0, "attention head", "attention heads")
            )
        },
    )
    .with_help(
        "Megatron splits attention by heads: choose a tensor size that divides the head count",
    )
}

pub fn ffn_not_divisible(
    layer: usize,
    hidden: u64,
    at: Span,
    tensor: (u64, Span),
    expert: bool,
) -> Diagnostic {
    let (code, what) = if expert {
        (EXPERT_HIDDEN_NOT_DIVISIBLE, "expert hidden size")
    } else {
        (FFN_NOT_DIVISIBLE, "feed-forward hidden size")
    };
    Diagnostic::error(
        code,
        at,
        format!(
            "layer {layer}: {what} {hidden} cannot be split over tensor = {} ranks",
            tensor.0
        ),
    )
    .with_label(format!("{} does not divide {hidden}", tensor.0))
    .with_secondary(tensor.1, "tensor size")
    .with_help(if expert {
        "each tensor rank holds hidden / tensor of every local expert: choose sizes that divide, or turn off expert slicing"
    } else {
        "choose a tensor size that divides the hidden size"
    })
}

pub fn depth_not_divisible(depth: (u64, Span), pipeline: (u64, Span)) -> Diagnostic {
    Diagnostic::error(
        DEPTH_NOT_DIVISIBLE,
        pipeline.1,
        format!(
            "{} cannot be split evenly over pipeline = {} stages",
            count(depth.0, "layer", "layers"),
            pipeline.0
        ),
    )
    .with_label(format!("{} does not divide {}", pipeline.0, depth.0))
    .with_secondary(depth.1, format!("depth = {}", depth.0))
    .with_help("Megatron-LM v2.2 gives every stage the same number of layers: choose a pipeline size that divides the depth")
}

pub fn chunks_not_divisible(
    depth: (u64, Span),
    pipeline: u64,
    virtual_stages: (u64, Span),
) -> Diagnostic {
    let per_stage = depth.0 / pipeline.max(1);
    Diagnostic::error(
        CHUNKS_NOT_DIVISIBLE,
        virtual_stages.1,
        format!(
            "the {} of each of the {pipeline} pipeline stages cannot be split into {} model chunks",
            count(per_stage, "layer", "layers"),
            virtual_stages.0
        ),
    )
    .with_label(format!("{} does not divide {per_stage}", virtual_stages.0))
    .with_secondary(depth.1, format!("depth = {}", depth.0))
    .with_help("every virtual stage holds the same number of layers: choose virtual_stages dividing depth / pipeline")
}

pub fn interleaved_micro_batches(
    micro_batches: u64,
    pipeline: u64,
    virtual_stages: (u64, Span),
    batch: Span,
) -> Diagnostic {
    Diagnostic::error(
        INTERLEAVED_MICRO_BATCHES,
        virtual_stages.1,
        format!(
            "the interleaved schedule ({} model chunks per stage) needs the micro-batches of a step to be a multiple of the {pipeline} pipeline stages, but there are {micro_batches}",
            virtual_stages.0
        ),
    )
    .with_label("interleaved schedule asked for here")
    .with_secondary(batch, format!("{} per data rank", count(micro_batches, "micro-batch", "micro-batches")))
    .with_help(format!(
        "use a batch or micro-batch that gives a multiple of {pipeline} micro-batches per data rank, or virtual_stages = 1"
    ))
}

/// `group_span`: the `experts = ...` line of the `parallel` block where the file has one,
/// else the block itself (the expert group is then the data group, by default).
pub fn experts_not_divisible(
    layer: usize,
    experts: (u64, Span),
    group: u64,
    (group_span, group_written): (Span, bool),
) -> Diagnostic {
    Diagnostic::error(
        EXPERTS_NOT_DIVISIBLE,
        experts.1,
        format!(
            "layer {layer}: experts = {} is not divisible by the {group} ranks of the expert group",
            experts.0
        ),
    )
    .with_label(format!(
        "{} over {group} ranks",
        count(experts.0, "expert", "experts")
    ))
    .with_secondary(
        group_span,
        if group_written {
            format!("expert group of {group} ranks")
        } else {
            format!("no `experts` line: the expert group is the data group, {group} ranks")
        },
    )
    .with_help(format!(
        "every rank of an expert group holds the same number of experts: use a multiple of {group} experts, or a smaller expert group"
    ))
}

pub fn expert_group_not_divisible(size: u64, data: u64, at: Span) -> Diagnostic {
    Diagnostic::error(
        EXPERT_GROUP_NOT_DIVISIBLE,
        at,
        format!(
            "an expert group of {size} ranks does not divide the {}",
            count(data, "data-parallel rank", "data-parallel ranks")
        ),
    )
    .with_label(format!("{size} does not divide {data}"))
    .with_help("expert groups are consecutive data ranks: choose a size that divides the data size")
}

/// `parts`: (name, bytes) of the rank's memory, largest first; `model`: whose training the
/// estimate describes.
pub fn out_of_memory(
    rank: u64,
    stage: u64,
    need: u64,
    hardware: (&str, u64, Span),
    parts: &[(&str, u64)],
    micro_batch: u64,
    model: MemoryModel,
) -> Diagnostic {
    let (name, have, span) = hardware;
    let mut d = Diagnostic::error(
        OUT_OF_MEMORY,
        span,
        format!(
            "rank {rank} (pipeline stage {stage}) needs {} but a {name} has {} (over by {})",
            gib(need),
            gib(have),
            gib(need.saturating_sub(have))
        ),
    )
    .with_label(format!("{} per GPU", gib(have)));
    if let Some((what, bytes)) = parts.first() {
        d = d.with_note(format!(
            "the largest part is {what}: {} of {}",
            gib(*bytes),
            gib(need)
        ));
    }
    let all: Vec<String> = parts
        .iter()
        .map(|(w, b)| format!("{w} {}", gib(*b)))
        .collect();
    d.with_note(format!(
        "at micro-batch {micro_batch}: {}",
        all.join(", ")
    ))
    .with_note(memory_model_note(model))
    .with_help("use more GPUs, a larger tensor or pipeline size, a larger expert group, or a smaller micro-batch; `fmoec plan --auto` searches for plans that fit")
}

/// Whose memory a P0009 estimate is, and how to ask for the other.
fn memory_model_note(model: MemoryModel) -> String {
    match model {
        MemoryModel::Fmoec => format!("the estimate is of {}'s memory", model.describe()),
        _ => format!(
            "the estimate is of {}'s memory; `fmoec plan --memory-model fmoec` estimates `fmoec run`'s (fused attention, no stored scores)",
            model.describe()
        ),
    }
}

pub fn zero_size(what: &str, at: Span) -> Diagnostic {
    Diagnostic::error(ZERO_SIZE, at, format!("{what} must be at least 1")).with_label("0 here")
}

/// `micro`: the micro-batch when one is given (the file or `--micro-batch`), else the batch
/// must at least split over the data ranks.
pub fn batch_not_divisible(
    batch: u64,
    (data, data_at): (u64, Option<Span>),
    micro: Option<u64>,
    at: Span,
) -> Diagnostic {
    let per_step = data * micro.unwrap_or(1);
    let over = match micro {
        Some(m) => format!(
            "into micro-batches of {m} over {}",
            count(data, "data-parallel rank", "data-parallel ranks")
        ),
        None => format!(
            "over {}",
            count(data, "data-parallel rank", "data-parallel ranks")
        ),
    };
    let mut d = Diagnostic::error(
        BATCH_NOT_DIVISIBLE,
        at,
        format!(
            "a global batch of {} cannot be split {over}",
            count(batch, "sequence", "sequences")
        ),
    )
    .with_label(format!("{batch} is not a multiple of {per_step}"));
    if let Some(span) = data_at {
        d = d.with_secondary(
            span,
            format!("{} from here", count(data, "data rank", "data ranks")),
        );
    }
    d.with_help(match micro {
        Some(_) => {
            format!("use a multiple of {per_step} sequences, or another micro-batch or data size")
        }
        None => format!("use a multiple of {per_step} sequences, or another data size"),
    })
}

pub fn too_large(what: &str, value: u64, limit: u64, at: Span) -> Diagnostic {
    Diagnostic::error(
        TOO_LARGE,
        at,
        format!("{what} = {value} is larger than the planner supports (at most {limit})"),
    )
    .with_label("too large to plan")
    .with_note("the limits keep every byte and FLOP count of the plan exact in 64 bits")
}

pub fn too_many_to_list(world: u64, ids: u64, limit: u64, at: Span) -> Diagnostic {
    Diagnostic::error(
        TOO_MANY_TO_LIST,
        at,
        format!(
            "the plan would list {ids} expert ids over its {}; fmoec lists at most {limit}",
            count(world, "rank", "ranks")
        ),
    )
    .with_label("too many ranks to list")
    .with_help(
        "hold fewer experts per rank (a larger expert group), or plan fewer GPUs; `--auto` \
         still compares such configurations without listing their ranks",
    )
}

pub fn no_fp8(hardware: (&str, Span), precision: Span) -> Diagnostic {
    Diagnostic::error(
        NO_FP8,
        precision,
        format!(
            "precision = fp8 needs FP8 tensor cores, and `{}` has none",
            hardware.0
        ),
    )
    .with_label("FP8 matmuls requested here")
    .with_secondary(hardware.1, "this GPU's profile has no `fp8_tflops`")
    .with_help("use precision = bf16, or a GPU with FP8 tensor cores (h100_sxm, h200)")
}

pub fn tensor_across_hosts(tensor: (u64, Span), gpus_per_node: u64) -> Diagnostic {
    Diagnostic::warning(
        TENSOR_ACROSS_HOSTS,
        tensor.1,
        format!(
            "tensor = {} spans more than one host of {}: its all-reduces, several per layer, go over the network",
            tensor.0,
            count(gpus_per_node, "GPU", "GPUs")
        ),
    )
    .with_label("tensor group crosses hosts")
    .with_help(format!(
        "keep tensor at most {gpus_per_node} and dividing it; use pipeline or data parallelism across hosts"
    ))
}

pub fn large_bubble(
    bubble: f64,
    micro_batches: u64,
    (pipeline, virtual_stages): (u64, u64),
    at: Span,
) -> Diagnostic {
    Diagnostic::warning(
        LARGE_BUBBLE,
        at,
        format!(
            "the pipeline idles {:.0}% of each step: {} for {pipeline} stages",
            100.0 * bubble,
            count(micro_batches, "micro-batch", "micro-batches")
        ),
    )
    .with_label("few micro-batches per step")
    .with_help(format!(
        "use a larger batch or a smaller micro-batch: at least {} micro-batches keep the bubble at or under 20%",
        (4 * (pipeline - 1)).div_ceil(virtual_stages.max(1))
    ))
}

pub fn chunks_over_expert_group(chunks: u64, group: u64, at: Span) -> Diagnostic {
    Diagnostic::warning(
        CHUNKS_OVER_EXPERT_GROUP,
        at,
        format!(
            "the expert exchange is split by peer ranks: {chunks} chunks over an expert group of {} run as {group}",
            count(group, "rank", "ranks")
        ),
    )
    .with_label(format!("at most {group} here"))
    .with_help("use `smart_schedule = auto` to let the planner choose")
}

pub fn nothing_to_exchange(option: &str, world: u64, at: Span) -> Diagnostic {
    if world == 1 {
        return Diagnostic::warning(
            NOTHING_TO_EXCHANGE,
            at,
            format!("`{option}` has nothing to do on one GPU: no tokens are exchanged"),
        )
        .with_label("no expert exchange to schedule")
        .with_help(
            "it acts where the experts are spread over several ranks: `gpus = N` here, \
             `fmoec plan --world N`, or `fmoec run --gpus N` / `--ranks N`",
        );
    }
    Diagnostic::warning(
        NOTHING_TO_EXCHANGE,
        at,
        format!(
            "`{option}` has nothing to do: on these {world} ranks every rank holds every expert, so no tokens are exchanged"
        ),
    )
    .with_label("no expert exchange to schedule")
    .with_help("spread the experts over ranks (`experts = across data` or `groups_of(N)` with N > 1)")
}

/// The target cannot slice experts with biases (Megatron-Core): a layer's experts must divide
/// over the `ranks = group × tensor` expert-parallel ranks that hold them whole.
pub fn experts_not_divisible_whole(
    layer: usize,
    experts: (u64, Span),
    (group, tensor, ranks): (u64, u64, u64),
    target: &str,
    slicing: Span,
) -> Diagnostic {
    Diagnostic::error(
        EXPERTS_NOT_DIVISIBLE_WHOLE,
        experts.1,
        format!(
            "layer {layer}: experts = {} do not divide over the {ranks} expert-parallel ranks that \
             hold them on Megatron-LM {target}",
            experts.0
        ),
    )
    .with_label(format!(
        "{} over {group} x {tensor} ranks",
        count(experts.0, "expert", "experts")
    ))
    .with_secondary(slicing, "experts sliced over the tensor ranks")
    .with_help(format!(
        "Megatron-LM {target} slices no expert that has biases: each of the {group} x {tensor} \
         ranks holds whole experts. Use a multiple of {ranks} experts, `bias = false`, or \
         `expert_slicing = false`"
    ))
}

pub fn whole_experts_for_bias(
    (group, tensor): (u64, u64),
    target: &str,
    slicing: Span,
) -> Diagnostic {
    Diagnostic::warning(
        WHOLE_EXPERTS_FOR_BIAS,
        slicing,
        format!(
            "Megatron-LM {target} slices no expert that has biases: the experts are spread whole \
             over {} expert-parallel ranks ({group} x {tensor}), the same weights per GPU as \
             slicing them over the {tensor} tensor ranks",
            group * tensor
        ),
    )
    .with_label("experts with biases")
    .with_help("with `bias = false` the experts are sliced over the tensor ranks as written")
}

pub fn vocab_padded(vocab: (u64, Span), padded: u64, tensor: u64, target: &str) -> Diagnostic {
    Diagnostic::warning(
        VOCAB_PADDED,
        vocab.1,
        format!(
            "Megatron-LM {target} splits the vocabulary evenly over the {tensor} tensor ranks: \
             vocab = {} is padded to {padded} rows",
            vocab.0
        ),
    )
    .with_label(format!("not a multiple of {tensor}"))
    .with_help(format!(
        "a vocabulary that is a multiple of {tensor} trains without padding rows"
    ))
}

/// Where a value of the layout in effect comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The model file (or its default, where it writes none).
    File,
    /// The command line's flag (`--pipeline`, `--virtual-stages`).
    Flag,
}

/// W0011: `chunks` model chunks per stage with one pipeline stage. `at` is the file's
/// `virtual_stages` where the chunks come from the file; else (`--virtual-stages`) the file's
/// `pipeline`, or its `parallel` block when that is not written or `--pipeline 1` replaces it.
pub fn virtual_stages_without_pipeline(
    (chunks, chunks_from): (u64, Origin),
    pipeline_from: Origin,
    at: Span,
) -> Diagnostic {
    let asked = match chunks_from {
        Origin::File => "`virtual_stages`".to_string(),
        Origin::Flag => format!("`--virtual-stages {chunks}`"),
    };
    let pipeline = match pipeline_from {
        Origin::File => "pipeline = 1",
        Origin::Flag => "`--pipeline 1`",
    };
    let label = match chunks_from {
        Origin::File => "no pipeline to interleave".to_string(),
        Origin::Flag => format!("{pipeline}: no pipeline to interleave"),
    };
    let remedy = match (chunks_from, pipeline_from) {
        (Origin::File, Origin::File) => "set `pipeline` to 2 or more",
        (Origin::File, Origin::Flag) => "leave out `--pipeline 1`, or give `--virtual-stages 1`",
        (Origin::Flag, Origin::File) => "set `pipeline` (or `--pipeline`) to 2 or more",
        (Origin::Flag, Origin::Flag) => {
            "give `--pipeline` 2 or more, or leave out `--virtual-stages`"
        }
    };
    Diagnostic::warning(
        VIRTUAL_STAGES_WITHOUT_PIPELINE,
        at,
        format!("{asked} has no effect with {pipeline}"),
    )
    .with_label(label)
    .with_help(format!(
        "the interleaved schedule splits each of several pipeline stages into model chunks: {remedy}"
    ))
}
