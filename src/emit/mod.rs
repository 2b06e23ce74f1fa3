//! `emit`: FastMoE's Megatron-LM integration, generated from a checked model.
//!
//! ```text
//! Checked ─┬─ view models (view.rs) ──askama──▶ fmoec_moe.py, train.sh, README.md
//!          └─ recorded edits (v2_2.rs) ─────────▶ megatron-v2.2.patch (megatron.rs, gitdiff.rs)
//! ```
//!
//! Owns: the emitted files and their bytes. The patch is a fixed set of small edits per
//! Megatron release that only call into the generated module; everything that depends on
//! the model (layer selection, experts, gates, defaults of the arguments) is in the module,
//! so the patch's blob ids can be recorded and verified once per release. With a checkout
//! (`--megatron-src`) the patch is computed from its real files instead.
//!
//! Must not know about: source text (only spans for diagnostics), the runtime, how the
//! planner computes its plan (`layout.rs` is a minimal stand-in, swapped for `plan` later).

pub mod cli;
pub mod gitdiff;
pub mod layout;
pub mod megatron;
pub mod v2_2;
pub mod view;

use std::path::PathBuf;

use askama::Template;

use crate::check::{
    Activation, Checked, DataSource, Ffn, GateKind, MegatronTarget, Norm, Positions, Precision,
    Schedule,
};
use crate::diag::Diagnostic;

use layout::Layout;
use megatron::{CheckoutError, ReleaseEdits};
use view::{ArgLine, GroupRow, LayerView, ModuleView, ReadmeView, TrainView};

/// The Python module name the patch imports.
pub const MODULE_NAME: &str = "fmoec_moe";

/// Which MoE implementation the generated module uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// fmoec's self-contained PyTorch module.
    #[default]
    Fmoec,
    /// FastMoE's `fmoe.megatron` (needs FastMoE and its CUDA extension installed).
    Fastmoe,
}

#[derive(Clone, Debug, Default)]
pub struct EmitOptions {
    pub runtime: Runtime,
    /// A Megatron-LM checkout to compute the patch from (else the recorded release).
    pub megatron_src: Option<PathBuf>,
    /// The model file's name as shown in generated headers (no absolute paths: byte-stable).
    pub source_name: String,
}

/// The emitted files, relative paths in a fixed order, and warnings.
#[derive(Debug)]
pub struct Emitted {
    pub files: Vec<(String, String)>,
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug)]
pub enum EmitError {
    /// Problems with the model for this Megatron release, pointing into the model file.
    Model(Vec<Diagnostic>),
    /// `--megatron` names a release that has no recorded edits.
    UnknownRelease { version: String, known: Vec<String> },
    /// The checkout given with `--megatron-src` could not be patched.
    Checkout(CheckoutError),
    /// A template failed to render (a bug, not a user error).
    Render(askama::Error),
}

impl std::fmt::Display for EmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmitError::Model(ds) => {
                write!(f, "{} error(s) in the model for this release", ds.len())
            }
            EmitError::UnknownRelease { version, known } => write!(
                f,
                "no Megatron-LM release `{version}` to emit for; known: {}",
                known.join(", ")
            ),
            EmitError::Checkout(e) => write!(f, "{e}"),
            EmitError::Render(e) => write!(f, "internal error rendering a template: {e}"),
        }
    }
}

impl std::error::Error for EmitError {}

/// The releases with recorded edits.
pub fn releases() -> &'static [&'static ReleaseEdits] {
    static RELEASES: [&ReleaseEdits; 1] = [&v2_2::RELEASE];
    &RELEASES
}

/// Finds the target for `version` among `targets` (declared in the stdlib) and its edits.
pub fn find_release<'a>(
    version: &str,
    targets: &'a [MegatronTarget],
) -> Result<(&'static ReleaseEdits, Option<&'a MegatronTarget>), EmitError> {
    let release = releases().iter().find(|r| r.version == version).copied();
    let target = targets.iter().find(|t| t.version == version);
    match release {
        Some(r) => Ok((r, target)),
        None => Err(EmitError::UnknownRelease {
            version: version.to_string(),
            known: releases().iter().map(|r| r.version.to_string()).collect(),
        }),
    }
}

/// Everything `fmoec emit` writes, as (relative path, contents).
pub fn emit(
    checked: &Checked,
    release: &ReleaseEdits,
    opts: &EmitOptions,
) -> Result<Emitted, EmitError> {
    let warnings = validate(checked)?;
    let patch = match &opts.megatron_src {
        Some(root) => megatron::diff_from_checkout(root, release).map_err(EmitError::Checkout)?,
        None => megatron::diff_recorded(release),
    };
    let layout = Layout::new(&checked.parallel);
    let layers = layer_views(checked, &layout);
    let planned = planned_layout(checked);
    let experts_per_worker = {
        let mut per: Vec<u64> = layers.iter().map(|l| l.experts_per_rank).collect();
        per.dedup();
        match per.as_slice() {
            [one] => one.to_string(),
            _ => "None".to_string(),
        }
    };
    let fastmoe = opts.runtime == Runtime::Fastmoe;
    let module = ModuleView {
        module_name: MODULE_NAME,
        megatron_version: release.version.to_string(),
        fmoec_version: env!("CARGO_PKG_VERSION"),
        source_name: opts.source_name.clone(),
        model_name: checked.model.name.clone(),
        runtime: if fastmoe { "fastmoe" } else { "fmoec" },
        fastmoe,
        layers: layers.clone(),
        expert_group_size: if layout.expert_group_size == layout.data {
            0
        } else {
            layout.expert_group_size
        },
        experts_per_worker,
        planned_layout: planned.clone(),
    };
    let train = train_view(
        checked,
        release,
        &layers,
        &opts.source_name,
        micro_batch(checked),
    );
    let patch_name = format!("megatron-{}.patch", release.version);
    let readme = ReadmeView {
        megatron_version: release.version.to_string(),
        commit: release.commit.to_string(),
        source_name: opts.source_name.clone(),
        model_name: checked.model.name.clone(),
        patch_name: patch_name.clone(),
        module_name: MODULE_NAME,
        fastmoe,
        planned_layout: planned,
        layers,
        expert_group: match layout.expert_group_size {
            1 => "no ranks (every rank holds every expert)".to_string(),
            n if n == layout.data => format!("the data-parallel group ({n} ranks)"),
            n => format!("sub-groups of {n} consecutive data-parallel ranks"),
        },
        groups: group_rows(&layout),
        patched_files: release.files.iter().map(|f| f.path.to_string()).collect(),
        notes: warnings.iter().map(|d| d.message.clone()).collect(),
    };
    let files = vec![
        (patch_name, patch),
        (format!("{MODULE_NAME}.py"), render(&module)?),
        ("train.sh".to_string(), render(&train)?),
        ("README.md".to_string(), render(&readme)?),
    ];
    Ok(Emitted { files, warnings })
}

fn render(t: &impl Template) -> Result<String, EmitError> {
    let mut s = t.render().map_err(EmitError::Render)?;
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Ok(s)
}

/// What Megatron-LM v2.2 cannot express: errors; what it approximates: warnings.
fn validate(c: &Checked) -> Result<Vec<Diagnostic>, EmitError> {
    let m = &c.model;
    let p = &c.parallel;
    let name = m.spans.name;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut unsupported = |what: &str, help: &str| {
        errors.push(
            Diagnostic::error(
                "E0801",
                name,
                format!("Megatron-LM v2.2's GPT has no {what}"),
            )
            .with_label("this model")
            .with_help(help.to_string()),
        );
    };
    if m.norm == Norm::RmsNorm {
        unsupported(
            "RMSNorm",
            "use `norm = layernorm` or train it with `fmoec run`",
        );
    }
    if m.positions == Positions::Rotary {
        unsupported(
            "rotary position embeddings",
            "use learned positions or `fmoec run`",
        );
    }
    if m.attention.kv_heads != m.attention.heads {
        unsupported(
            "grouped-query attention",
            "use as many key/value heads as heads",
        );
    }
    if !m.bias {
        unsupported("linear layers without bias", "set `bias = true`");
    }
    if !m.tied_embeddings {
        unsupported("untied LM head", "tie the LM head to the token embedding");
    }
    if m.depth() % p.pipeline != 0 {
        errors.push(
            Diagnostic::error(
                "E0802",
                m.spans.depth,
                format!(
                    "depth {} is not divisible by the {} pipeline stages",
                    m.depth(),
                    p.pipeline
                ),
            )
            .with_secondary(p.spans.pipeline, "pipeline size set here"),
        );
    }
    if m.attention.heads % p.tensor != 0 {
        errors.push(
            Diagnostic::error(
                "E0803",
                m.spans.heads,
                format!(
                    "{} heads do not divide over {} tensor ranks",
                    m.attention.heads, p.tensor
                ),
            )
            .with_secondary(p.spans.tensor, "tensor size set here"),
        );
    }
    let group = layout::expert_group_size(p.experts, p.data);
    let mut moe_count = 0;
    let mut dense_warned = false;
    for layer in &m.layers {
        match &layer.ffn {
            Ffn::Dense(mlp) => {
                let megatron_like = mlp.hidden == 4 * m.width && mlp.act == Activation::Gelu;
                if !megatron_like && !dense_warned {
                    dense_warned = true;
                    warnings.push(Diagnostic::warning(
                        "W0801",
                        mlp.span,
                        format!(
                            "Megatron-LM v2.2's dense MLP is gelu with hidden 4 x width = {}; \
                             its dense layers train that instead",
                            4 * m.width
                        ),
                    ));
                }
            }
            Ffn::Moe(moe) => {
                moe_count += 1;
                if moe.shared.is_some() {
                    errors.push(
                        Diagnostic::error(
                            "E0804",
                            moe.spans.call,
                            "shared experts are not supported by the Megatron-LM emitter",
                        )
                        .with_help("remove `shared` or train with `fmoec run`"),
                    );
                }
                if moe.experts % group != 0 {
                    errors.push(
                        Diagnostic::error(
                            "E0805",
                            moe.spans.experts,
                            format!(
                                "experts = {} is not divisible by the {group} ranks of the expert group",
                                moe.experts
                            ),
                        )
                        .with_secondary(p.spans.experts, "expert group chosen here"),
                    );
                }
                if moe.expert.hidden % p.tensor != 0 {
                    errors.push(
                        Diagnostic::error(
                            "E0806",
                            moe.expert.span,
                            format!(
                                "expert hidden size {} is not divisible by the {} tensor ranks that slice it",
                                moe.expert.hidden, p.tensor
                            ),
                        )
                        .with_secondary(p.spans.tensor, "tensor size set here"),
                    );
                }
                let k_needed = match moe.gate.kind {
                    GateKind::Gshard => Some(2),
                    GateKind::Switch => Some(1),
                    _ => None,
                };
                if let Some(k) = k_needed {
                    if moe.top_k != k {
                        errors.push(Diagnostic::error(
                            "E0807",
                            moe.spans.top_k,
                            format!(
                                "the {} gate routes each token to {k} expert(s), not top_k = {}",
                                gate_name(moe.gate.kind),
                                moe.top_k
                            ),
                        ));
                    }
                }
            }
        }
    }
    if moe_count == 0 {
        warnings.push(Diagnostic::warning(
            "W0802",
            name,
            "the model has no MoE layer; the patch trains it dense",
        ));
    }
    // Megatron takes the vocabulary from its tokenizer: GPT-2 BPE, 50257 tokens padded to a
    // multiple of 128 x tensor size.
    let padded = 50257u64.div_ceil(128 * p.tensor) * 128 * p.tensor;
    if !(50257..=padded.max(50304)).contains(&m.vocab) {
        warnings.push(Diagnostic::warning(
            "W0804",
            m.spans.vocab,
            format!(
                "Megatron-LM v2.2 takes the vocabulary from its GPT-2 tokenizer ({padded} entries \
                 with padding), not vocab = {}",
                m.vocab
            ),
        ));
    }
    if c.train.is_none() {
        warnings.push(Diagnostic::warning(
            "W0805",
            name,
            "no `train` block: train.sh has no batch, steps or optimizer arguments; pass them after the script",
        ));
    }
    if let Some(t) = &c.train {
        if let Some(ck) = t.checkpoint.as_ref().filter(|ck| ck.keep > 0) {
            warnings.push(Diagnostic::warning(
                "W0806",
                t.spans.checkpoint,
                format!(
                    "Megatron-LM v2.2 keeps every checkpoint: `keep = {}` applies to `fmoec run` only",
                    ck.keep
                ),
            ));
        }
        if t.precision == Precision::Bf16 {
            warnings.push(Diagnostic::warning(
                "W0803",
                t.spans.precision,
                "Megatron-LM v2.2 has no bf16; train.sh uses --fp16 (fp16 with loss scaling)",
            ));
        }
        if let Precision::Fp8 { .. } = t.precision {
            warnings.push(Diagnostic::warning(
                "W0803",
                t.spans.precision,
                "Megatron-LM v2.2 has no FP8 (nor bf16); train.sh uses --fp16 (fp16 with loss scaling)",
            ));
        }
        let micro = p.micro_batch.unwrap_or(1);
        if t.batch_sequences % (micro * p.data) != 0 {
            errors.push(
                Diagnostic::error(
                    "E0808",
                    t.spans.batch,
                    format!(
                        "a batch of {} sequences does not split into micro-batches of {micro} over {} data ranks",
                        t.batch_sequences, p.data
                    ),
                )
                .with_help("Megatron needs batch = micro-batch x data ranks x micro-batches"),
            );
        }
    }
    // Layers assigned by one selection share its spans: say each thing once.
    let unique = |ds: Vec<Diagnostic>| {
        let mut out: Vec<Diagnostic> = Vec::new();
        for d in ds {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    };
    if errors.is_empty() {
        Ok(unique(warnings))
    } else {
        errors.extend(warnings);
        Err(EmitError::Model(unique(errors)))
    }
}

fn gate_name(k: GateKind) -> &'static str {
    match k {
        GateKind::Naive => "naive",
        GateKind::Noisy => "noisy",
        GateKind::Gshard => "gshard",
        GateKind::Switch => "switch",
        GateKind::Swipe => "swipe",
    }
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::Relu => "relu",
        Activation::Swiglu => "swiglu",
    }
}

fn layer_views(c: &Checked, layout: &Layout) -> Vec<LayerView> {
    c.model
        .moe_layers()
        .map(|(index, moe)| LayerView {
            index,
            experts: moe.experts,
            top_k: moe.top_k,
            gate: gate_name(moe.gate.kind),
            hidden: moe.expert.hidden,
            act: act_name(moe.expert.act),
            capacity: match moe.gate.capacity {
                Some(cap) => format!(
                    "({}, {})",
                    view::py_float(cap.train),
                    view::py_float(cap.eval)
                ),
                None => "None".to_string(),
            },
            balance_loss: view::py_float(moe.gate.balance_loss),
            jitter: view::py_float(moe.gate.jitter),
            random_routing: if moe.gate.random_routing {
                "True"
            } else {
                "False"
            },
            experts_per_rank: moe.experts / layout.expert_group_size.max(1),
        })
        .collect()
}

fn planned_layout(c: &Checked) -> String {
    let p = &c.parallel;
    format!(
        "{} GPUs of {}: tensor {} x pipeline {} x data {}",
        p.gpus, p.hardware.name, p.tensor, p.pipeline, p.data
    )
}

fn group_rows(l: &Layout) -> Vec<GroupRow> {
    let fmt = |gs: &[Vec<u64>]| -> String {
        const SHOWN: usize = 8;
        let mut parts: Vec<String> = gs
            .iter()
            .take(SHOWN)
            .map(|g| {
                let ranks: Vec<String> = g.iter().map(u64::to_string).collect();
                format!("[{}]", ranks.join(", "))
            })
            .collect();
        if gs.len() > SHOWN {
            parts.push(format!("... ({} groups)", gs.len()));
        }
        parts.join(" ")
    };
    vec![
        GroupRow {
            kind: "tensor",
            groups: fmt(&l.tensor_groups),
        },
        GroupRow {
            kind: "pipeline",
            groups: fmt(&l.pipeline_groups),
        },
        GroupRow {
            kind: "data",
            groups: fmt(&l.data_groups),
        },
        GroupRow {
            kind: "expert (all-to-all)",
            groups: fmt(&l.expert_groups),
        },
        GroupRow {
            kind: "gate (all-reduce)",
            groups: fmt(&l.gate_groups),
        },
    ]
}

/// Reads one printed value of a layer (for the uniform `--fmoe-*` launch arguments).
type LayerField = dyn Fn(&LayerView) -> String;

/// The micro-batch train.sh passes: the file's, else the one `fmoec plan` chooses for it
/// (Megatron-LM's memory model), else — a plan that does not fit — the planner's default rule.
fn micro_batch(c: &Checked) -> u64 {
    if let Some(m) = c.parallel.micro_batch {
        return m;
    }
    match crate::plan::cost_with(c, &crate::plan::Overrides::default()) {
        Ok(planned) => planned.costed.micro_batch,
        Err(_) => {
            let seq = c.train.as_ref().map_or(c.model.context, |t| t.seq_len);
            let share = c
                .train
                .as_ref()
                .map_or(1, |t| t.batch_sequences / c.parallel.data.max(1));
            crate::plan::default_micro_batch(share.max(1), seq)
        }
    }
}

fn train_view(
    c: &Checked,
    release: &ReleaseEdits,
    layers: &[LayerView],
    source_name: &str,
    micro: u64,
) -> TrainView {
    let m = &c.model;
    let p = &c.parallel;
    let mut args: Vec<(String, Option<String>)> = Vec::new();
    let mut arg = |flag: &str, value: Option<String>| args.push((flag.to_string(), value));
    arg("--tensor-model-parallel-size", Some(p.tensor.to_string()));
    arg(
        "--pipeline-model-parallel-size",
        Some(p.pipeline.to_string()),
    );
    arg("--num-layers", Some(m.depth().to_string()));
    arg("--hidden-size", Some(m.width.to_string()));
    arg("--num-attention-heads", Some(m.attention.heads.to_string()));
    let seq = c.train.as_ref().map_or(m.context, |t| t.seq_len);
    arg("--seq-length", Some(seq.to_string()));
    arg("--max-position-embeddings", Some(m.context.to_string()));
    arg("--micro-batch-size", Some(micro.to_string()));
    arg("--DDP-impl", Some("local".to_string()));
    if let Some(t) = &c.train {
        arg("--global-batch-size", Some(t.batch_sequences.to_string()));
        arg("--train-iters", Some(t.steps.to_string()));
        let crate::check::Optimizer::Adamw {
            lr,
            betas,
            eps,
            weight_decay,
        } = t.optimizer;
        arg("--lr", Some(view::py_float(lr)));
        match t.schedule {
            Schedule::Constant { warmup } => {
                arg("--lr-decay-style", Some("constant".to_string()));
                arg("--lr-warmup-iters", Some(warmup.to_string()));
            }
            Schedule::Cosine {
                warmup,
                min_lr_ratio,
            } => {
                arg("--lr-decay-style", Some("cosine".to_string()));
                arg("--lr-warmup-iters", Some(warmup.to_string()));
                arg("--min-lr", Some(view::py_float(lr * min_lr_ratio)));
            }
        }
        arg("--weight-decay", Some(view::py_float(weight_decay)));
        arg("--adam-beta1", Some(view::py_float(betas.0)));
        arg("--adam-beta2", Some(view::py_float(betas.1)));
        arg("--adam-eps", Some(view::py_float(eps)));
        arg(
            "--clip-grad",
            Some(view::py_float(t.clip_grad.unwrap_or(0.0))),
        );
        if t.precision != Precision::Fp32 {
            arg("--fp16", None);
        }
        if let Some(ck) = &t.checkpoint {
            arg("--save", Some(view::sh_word(&ck.dir)));
            arg("--load", Some(view::sh_word(&ck.dir)));
            arg("--save-interval", Some(ck.every.to_string()));
        }
        if let Some(ev) = &t.eval {
            arg("--eval-interval", Some(ev.every.to_string()));
            arg("--eval-iters", Some(ev.batches.to_string()));
        }
        arg("--seed", Some(t.seed.to_string()));
    }
    arg("--log-interval", Some("10".to_string()));
    // The MoE arguments (the module's defaults, spelled out so the command says what it trains).
    if !layers.is_empty() {
        let indices: Vec<String> = layers.iter().map(|l| l.index.to_string()).collect();
        arg("--fmoe-layers", Some(indices.join(" ")));
        let uniform = |f: &dyn Fn(&LayerView) -> String| -> Option<String> {
            let first = f(&layers[0]);
            layers.iter().all(|l| f(l) == first).then_some(first)
        };
        let fields: [(&str, &LayerField); 6] = [
            ("--fmoe-num-experts", &|l| l.experts_per_rank.to_string()),
            ("--fmoe-top-k", &|l| l.top_k.to_string()),
            ("--fmoe-balance-strategy", &|l| l.gate.to_string()),
            ("--fmoe-balance-loss-weight", &|l| l.balance_loss.clone()),
            ("--fmoe-hidden-size", &|l| l.hidden.to_string()),
            ("--fmoe-capacity", &|l| {
                l.capacity
                    .trim_matches(|c| c == '(' || c == ')')
                    .replace(',', "")
            }),
        ];
        for (flag, f) in fields {
            if let Some(v) = uniform(f) {
                if v != "None" {
                    arg(flag, Some(v));
                }
            }
        }
    }
    let args = args
        .into_iter()
        .map(|(f, v)| ArgLine {
            text: match v {
                Some(v) => format!("{f} {v}"),
                None => f,
            },
        })
        .collect();
    let per_node = p.hardware.gpus_per_node.max(1);
    let data_path = c.train.as_ref().and_then(|t| match &t.data {
        DataSource::Megatron(path) => Some(view::sh_word(path)),
        DataSource::Builtin(_) | DataSource::Text(_) => None,
    });
    TrainView {
        megatron_version: release.version.to_string(),
        source_name: source_name.to_string(),
        model_name: m.name.clone(),
        nproc_per_node: p.gpus.min(per_node),
        nnodes: p.gpus.div_ceil(per_node),
        data_path,
        args,
    }
}
