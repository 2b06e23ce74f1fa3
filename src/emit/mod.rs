//! `emit`: FastMoE's Megatron-LM integration, generated from a checked model, for every
//! Megatron-LM release declared in `stdlib/megatron.fmoe`.
//!
//! ```text
//! Checked ─┬─ support.rs: what the model asks, against the target's capabilities ─▶ diagnostics
//!          ├─ view.rs: one TargetView ──askama (the target's folder, else shared/)──▶
//!          │                            fmoec_moe.py, train.sh, README.md
//!          └─ the target's recorded patch (megatron.rs, gitdiff.rs) ─▶ megatron-VERSION.patch
//! ```
//!
//! Owns the emitted files and their bytes. A target is data ([`registry`]): a declaration
//! (tree, patched files, capabilities) and a template folder (its `megatron.patch` and the
//! templates it writes differently from `src/emit/templates/shared/`). The patch is a fixed
//! set of small edits per release that only call into the generated module; everything that
//! depends on the model (layer selection, experts, gates, defaults of the arguments) is in the
//! module, so the patch's blob ids can be recorded and verified once per release. With a
//! checkout (`--megatron-src`) the patch is computed from its real files instead.
//!
//! Takes the finished [`ParallelPlan`](crate::plan::ParallelPlan): the rank grid, the process
//! groups, the experts per rank and the micro-batch are the planner's (the rules that make a
//! plan valid live there only).
//!
//! Must not know about: source text (only spans for diagnostics), the runtime, how the
//! planner computes its plan, or any particular release (no code here names one).

pub mod cli;
pub mod gitdiff;
pub mod megatron;
pub mod registry;
pub mod support;
pub mod view;

use std::path::PathBuf;

use crate::check::{Activation, Checked, DataSource, GateKind, Schedule, TokenizerSpec};
use crate::diag::Diagnostic;
use crate::plan::{Overrides, ParallelPlan, TargetRules};

use megatron::CheckoutError;
pub use registry::Target;
use view::{ArgLine, GateView, GroupRow, LayerView, TargetView};

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
    /// The folder the model file's relative data and tokenizer paths are taken from, as
    /// `fmoec run` takes them from the folder it runs in; `None`: the current directory.
    /// train.sh gets them absolute ([`view::RunFile`]).
    pub relative_to: Option<PathBuf>,
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
    /// `--megatron` names no declared release.
    UnknownRelease { version: String, known: Vec<String> },
    /// An option the target cannot honour (no place in the model file to point at).
    Option(String),
    /// A target whose declaration and template folder disagree (a bug, not a user error).
    Internal(String),
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
                "no Megatron-LM release `{version}` to emit for; known: {} \
                 (`fmoec emit --megatron list` says what each supports)",
                known.join(", ")
            ),
            EmitError::Option(m) => write!(f, "{m}"),
            EmitError::Internal(m) => write!(f, "internal error: {m}"),
            EmitError::Checkout(e) => write!(f, "{e}"),
            EmitError::Render(e) => write!(f, "internal error rendering a template: {e}"),
        }
    }
}

impl std::error::Error for EmitError {}

/// The plan `emit` takes for `target`: the file as written, planned with the target's rules
/// (its rank layout, vocabulary and memory; `fmoec plan --megatron VERSION` prints it).
pub fn plan_for(checked: &Checked, target: &Target) -> Result<ParallelPlan, Vec<Diagnostic>> {
    crate::plan::build_for(checked, &Overrides::NONE, &TargetRules::of(&target.decl))
}

/// Everything `fmoec emit` writes for `target`, as (relative path, contents), from the checked
/// model and its plan ([`plan_for`]): the options and the plan checked against the target, the
/// model validated for it, then one view rendered by the target's templates beside its patch.
pub fn emit(
    checked: &Checked,
    plan: &ParallelPlan,
    target: &Target,
    opts: &EmitOptions,
) -> Result<Emitted, EmitError> {
    let decl = &target.decl;
    let runtime = runtime_for(decl, opts.runtime)?;
    if plan.megatron_core.is_some() != decl.can("native_expert_parallel") {
        return Err(EmitError::Internal(format!(
            "the plan was not made for Megatron-LM {} (plan it with `emit::plan_for`)",
            decl.version
        )));
    }
    let all = crate::check::megatron_targets();
    let warnings = validate(checked, plan, decl, &all, opts.runtime)?;
    let patch = patch_for(target, opts)?;
    let view = target_view(checked, plan, target, opts, runtime, &warnings);
    let files = render_files(target, &view, patch)?;
    Ok(Emitted { files, warnings })
}

/// The runtime's name (`fmoec`, `fastmoe`), where the target has it.
fn runtime_for(
    decl: &crate::check::MegatronTarget,
    runtime: Runtime,
) -> Result<&'static str, EmitError> {
    let name = match runtime {
        Runtime::Fmoec => "fmoec",
        Runtime::Fastmoe => "fastmoe",
    };
    if decl.allows("runtimes", name) {
        return Ok(name);
    }
    Err(EmitError::Option(format!(
        "Megatron-LM {} has no `--runtime {name}`; its runtimes: {}",
        decl.version,
        support::listed(decl, "runtimes")
    )))
}

/// The target's patch: computed from the checkout `--megatron-src` names, else the recorded
/// one; `None` for a target that patches nothing.
fn patch_for(target: &Target, opts: &EmitOptions) -> Result<Option<String>, EmitError> {
    Ok(match (&target.patch, &opts.megatron_src) {
        (Some(p), Some(root)) => {
            Some(megatron::diff_from_checkout(root, p).map_err(EmitError::Checkout)?)
        }
        (Some(p), None) => Some(megatron::diff_recorded(p)),
        (None, _) => None,
    })
}

/// Every value the target's templates print, for the model, its plan and the emit's warnings.
fn target_view(
    checked: &Checked,
    plan: &ParallelPlan,
    target: &Target,
    opts: &EmitOptions,
    runtime: &'static str,
    warnings: &[Diagnostic],
) -> TargetView {
    let decl = &target.decl;
    let moe_path = support::moe_path(checked, decl);
    let layers = layer_views(checked, plan);
    let source_name = view::one_line(&opts.source_name);
    let relative_to = opts.relative_to.as_deref();
    let per_node = plan.hardware.gpus_per_node.max(1);
    TargetView {
        megatron_version: decl.version.clone(),
        tree: decl.tree.clone(),
        patch_name: target.patch_name(),
        patched_files: decl.patched_files.clone(),
        module_name: MODULE_NAME,
        fmoec_version: env!("CARGO_PKG_VERSION"),
        source_name_md: view::md_code(&source_name),
        plan_command_md: view::md_code(&format!(
            "fmoec plan --megatron {} {}",
            decl.version,
            view::sh_word(&source_name)
        )),
        source_name,
        model_name: checked.model.name.clone(),
        runtime,
        fastmoe: opts.runtime == Runtime::Fastmoe,
        gates: gate_views(),
        bias: py_bool(checked.model.bias),
        expert_group_size: if plan.expert_group_size == plan.data {
            0
        } else {
            plan.expert_group_size
        },
        experts_per_worker: experts_per_worker(&layers),
        planned_layout: planned_layout(plan),
        expert_group: expert_group_words(plan),
        groups: group_rows(plan),
        nproc_per_node: plan.world.min(per_node),
        nnodes: plan.world.div_ceil(per_node),
        world: plan.world,
        files: launch_files(checked, relative_to),
        args: launch_args(checked, plan, decl, &layers, &moe_path, relative_to),
        notes: warnings.iter().map(|d| d.message.clone()).collect(),
        layers,
        native: moe_path == support::MoePath::Native,
        fmoec_layer: matches!(moe_path, support::MoePath::Module { .. }),
        native_unfit: match moe_path {
            support::MoePath::Module { why } => why,
            _ => String::new(),
        },
        vocab: built_vocab(checked, plan),
        megatron_act: support::megatron_act(checked, decl),
    }
}

/// The files of the emit in their order: the patch, the module (where the target needs it),
/// train.sh and README.md, each ending with a line break.
fn render_files(
    target: &Target,
    view: &TargetView,
    patch: Option<String>,
) -> Result<Vec<(String, String)>, EmitError> {
    let render = |f: registry::Render| -> Result<String, EmitError> {
        let mut s = f(view).map_err(EmitError::Render)?;
        if !s.ends_with('\n') {
            s.push('\n');
        }
        Ok(s)
    };
    let folder = target.folder;
    let mut files = Vec::new();
    if let Some(patch) = patch {
        files.push((target.patch_name(), patch));
    }
    // A target with a MoE of its own needs the module only where its MoE cannot train the
    // file's layers; the patches of the others call into it.
    if !target.decl.can("native_expert_parallel") || view.fmoec_layer {
        files.push((format!("{MODULE_NAME}.py"), render(folder.module)?));
    }
    files.push(("train.sh".to_string(), render(folder.train)?));
    files.push(("README.md".to_string(), render(folder.readme)?));
    Ok(files)
}

/// The generated module's `experts_per_worker`: the experts per rank where every MoE layer has
/// the same count, else `None`.
fn experts_per_worker(layers: &[LayerView]) -> String {
    let mut per: Vec<u64> = layers.iter().map(|l| l.experts_per_rank).collect();
    per.dedup();
    match per.as_slice() {
        [one] => one.to_string(),
        _ => "None".to_string(),
    }
}

/// Which ranks share experts, in the README's words.
fn expert_group_words(plan: &ParallelPlan) -> String {
    match plan.expert_group_size {
        1 => "no ranks (every rank holds every expert)".to_string(),
        n if n == plan.data => format!("the data-parallel group ({n} ranks)"),
        n => format!("sub-groups of {n} consecutive data-parallel ranks"),
    }
}

/// The vocabulary Megatron builds the model with: the planner's padded one for a target that
/// pins it (Megatron-Core), else the file's.
fn built_vocab(c: &Checked, plan: &ParallelPlan) -> u64 {
    plan.megatron_core
        .as_ref()
        .map_or(c.model.vocab, |core| core.padded_vocab)
}

/// The files the model file names that train.sh passes to Megatron: the `megatron("prefix")`
/// dataset and a `gpt2(vocab, merges)` tokenizer's files.
fn launch_files(checked: &Checked, relative_to: Option<&std::path::Path>) -> view::LaunchFiles {
    let resolve = |path: &str| view::RunFile::resolve(path, relative_to);
    let Some(train) = &checked.train else {
        return view::LaunchFiles::new(None, None, None);
    };
    let prefix = match &train.data {
        DataSource::Megatron(prefix) => Some(prefix),
        DataSource::Tokenized { source, .. } => match source.as_ref() {
            DataSource::Megatron(prefix) => Some(prefix),
            _ => None,
        },
        DataSource::Builtin(_) | DataSource::Text(_) | DataSource::Jsonl { .. } => None,
    };
    let (vocab, merges) = match train.data.tokenizer() {
        Some(TokenizerSpec::Gpt2 { vocab, merges }) => {
            (Some(resolve(vocab)), Some(resolve(merges)))
        }
        Some(TokenizerSpec::Hf { .. }) | None => (None, None),
    };
    view::LaunchFiles::new(prefix.map(|p| resolve(p)), vocab, merges)
}

/// What `target` cannot express (errors, as [`EmitError::Model`]) or approximates (the
/// warnings returned): the capability diagnostics of [`support`] (and what FastMoE's layer
/// cannot train, with `--runtime fastmoe`), then the rules every Megatron-LM target shares:
/// the model's, the train block's, and FasterMoE's options. Each is said once.
/// `fmoec plan --megatron VERSION` reports the same, so that a plan is never shown for a
/// training `emit` would refuse.
pub fn validate(
    c: &Checked,
    plan: &ParallelPlan,
    target: &crate::check::MegatronTarget,
    all: &[crate::check::MegatronTarget],
    runtime: Runtime,
) -> Result<Vec<Diagnostic>, EmitError> {
    // values the file does not write (or a command-line override gave) point at the
    // `parallel` block or the model, as the planner's diagnostics do
    let filled = crate::plan::with_fallback_spans(c);
    let c = filled.as_ref().unwrap_or(c);
    let (mut errors, mut warnings): (Vec<_>, Vec<_>) = support::diagnostics(c, plan, target, all)
        .into_iter()
        .partition(|d| d.severity == crate::diag::Severity::Error);
    if runtime == Runtime::Fastmoe {
        errors.extend(support::fastmoe_runtime(c, plan));
    }
    warnings.extend(model_warnings(c, plan, target));
    warnings.extend(train_warnings(c, target));
    warnings.extend(fastermoe_warnings(c, target));
    // Layers assigned by one selection share their spans: say each thing once.
    if errors.is_empty() {
        Ok(support::once_each(warnings))
    } else {
        errors.extend(warnings);
        Err(EmitError::Model(support::once_each(errors)))
    }
}

/// What the target trains differently from the model: a dense model (W0802), the vocabulary of
/// Megatron's tokenizer (W0804), and what Megatron's own MoE changes.
fn model_warnings(
    c: &Checked,
    plan: &ParallelPlan,
    target: &crate::check::MegatronTarget,
) -> Vec<Diagnostic> {
    let m = &c.model;
    let v = &target.version;
    let mut warnings = Vec::new();
    if m.moe_layers().next().is_none() {
        warnings.push(Diagnostic::warning(
            "W0802",
            m.spans.name,
            "the model has no MoE layer; the patch trains it dense",
        ));
    }
    // Megatron takes the vocabulary from its tokenizer: GPT-2 BPE, 50257 tokens padded to a
    // multiple of 128 x tensor size (a target that pins the file's vocabulary builds that one).
    let padded = 50257u64.div_ceil(128 * plan.tensor) * 128 * plan.tensor;
    if !target.can("pinned_vocab") && !(50257..=padded.max(50304)).contains(&m.vocab) {
        warnings.push(Diagnostic::warning(
            "W0804",
            m.spans.vocab,
            format!(
                "Megatron-LM {v} takes the vocabulary from its GPT-2 tokenizer ({padded} entries \
                 with padding), not vocab = {}",
                m.vocab
            ),
        ));
    }
    warnings.extend(native_moe_warnings(c, target));
    warnings
}

/// What of the train block the emitted training cannot follow: no block (W0805), a Hugging
/// Face tokenizer (W0812), `keep` (W0806), `init` (W0811).
fn train_warnings(c: &Checked, target: &crate::check::MegatronTarget) -> Vec<Diagnostic> {
    let v = &target.version;
    let Some(t) = &c.train else {
        return vec![Diagnostic::warning(
            "W0805",
            c.model.spans.name,
            "no `train` block: train.sh has no batch, steps or optimizer arguments; pass them after the script",
        )];
    };
    let mut warnings = Vec::new();
    // Megatron's GPT-2 tokenizer reads vocab.json and merges.txt; train.sh defaults them to
    // a `gpt2(...)` tokenizer's files, but has nothing to pass for a tokenizer.json.
    if let Some(TokenizerSpec::Hf { path }) = t.data.tokenizer() {
        warnings.push(hf_tokenizer_warning(t, target, path));
    }
    if let Some(ck) = t.checkpoint.as_ref().filter(|ck| ck.keep > 0) {
        warnings.push(Diagnostic::warning(
            "W0806",
            t.spans.checkpoint,
            format!(
                "Megatron-LM {v} keeps every checkpoint: `keep = {}` applies to `fmoec run` only",
                ck.keep
            ),
        ));
    }
    // Megatron reads neither a Hugging Face folder nor an fmoec checkpoint: without a word
    // the emitted training would start from random weights where the file says otherwise.
    if let Some(init) = &t.init {
        warnings.push(
            Diagnostic::warning(
                "W0811",
                init.span,
                format!(
                    "`init` applies to `fmoec run` only: a Megatron-LM {v} training (what \
                     `emit --megatron {v}` writes) starts from Megatron's own initialisation, \
                     or from a Megatron checkpoint in its `--load` folder"
                ),
            )
            .with_label("applies to `fmoec run` only"),
        );
    }
    warnings
}

/// W0812: `tokenizer = hf(path)`, which train.sh cannot pass to Megatron's GPT-2 tokenizer.
fn hf_tokenizer_warning(
    t: &crate::check::Train,
    target: &crate::check::MegatronTarget,
    path: &str,
) -> Diagnostic {
    let v = &target.version;
    let what = if target.can("native_expert_parallel") {
        "set TOKENIZER_TYPE and TOKENIZER_MODEL (or VOCAB_FILE and MERGE_FILE) for train.sh"
    } else {
        "set VOCAB_FILE and MERGE_FILE (GPT-2's vocab.json and merges.txt) for train.sh"
    };
    Diagnostic::warning(
        "W0812",
        t.spans.tokenizer,
        format!(
            "the emitted train.sh cannot use the tokenizer {}: Megatron-LM {v}'s \
             GPT-2 tokenizer reads a vocab.json and a merges.txt; {what}",
            view::md_code(&crate::diag::one_line(path))
        ),
    )
    .with_label("not passed to Megatron")
    .with_help("`tokenizer = gpt2(vocab = \"vocab.json\", merges = \"merges.txt\")` is passed on")
}

/// W0810: FasterMoE's options are `fmoec run`'s: no emitted training has them. Said by `emit`
/// and by `plan --megatron` alike, so worded for both.
fn fastermoe_warnings(c: &Checked, target: &crate::check::MegatronTarget) -> Vec<Diagnostic> {
    let v = &target.version;
    c.parallel
        .fastermoe_options()
        .into_iter()
        .map(|(name, at)| {
            Diagnostic::warning(
                "W0810",
                at,
                format!(
                    "`{name}` is FasterMoE's option of `fmoec run`; a Megatron-LM {v} training (what `emit --megatron {v}` writes and `plan --megatron {v}` costs) exchanges experts without it"
                ),
            )
            .with_label("applies to `fmoec run` only")
        })
        .collect()
}

/// What Megatron's own MoE trains differently from the file where it builds the layers' shared
/// experts. (Its router's auxiliary loss, E·Σ f_e·P_e over the top-k choices, is the naive
/// gate's balance loss: W0807 is retired.)
fn native_moe_warnings(c: &Checked, target: &crate::check::MegatronTarget) -> Vec<Diagnostic> {
    let v = &target.version;
    let mut out = Vec::new();
    let megatron = support::megatron_act(c, target);
    for (_, moe) in c.model.moe_layers() {
        if let Some(shared) = &moe.shared {
            if target.can("native_expert_parallel") && act_name(shared.expert.act) != megatron {
                out.push(Diagnostic::warning(
                    "W0808",
                    shared.expert.span,
                    format!(
                        "Megatron-LM {v}'s shared experts take the activation of its dense MLP \
                         ({megatron}), not {}",
                        act_name(shared.expert.act)
                    ),
                ));
            }
        }
    }
    out
}

/// The gate's name as the stdlib and the generated module spell it.
pub fn gate_name(k: GateKind) -> &'static str {
    crate::gates::of(k).name
}

/// The activation's name as the stdlib and the generated module spell it.
pub(crate) fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::Relu => "relu",
        Activation::Swiglu => "swiglu",
    }
}

fn layer_views(c: &Checked, plan: &ParallelPlan) -> Vec<LayerView> {
    c.model
        .moe_layers()
        .map(|(index, moe)| LayerView {
            index,
            experts: moe.experts,
            top_k: moe.top_k,
            gate: gate_name(moe.gate.kind),
            hidden: moe.expert.hidden,
            act: act_name(moe.expert.act),
            capacity: py_capacity(moe.gate.capacity),
            balance_loss: view::py_float(moe.gate.balance_loss),
            jitter: view::py_float(moe.gate.jitter),
            random_routing: py_bool(moe.gate.random_routing),
            shared: match &moe.shared {
                Some(s) => format!(
                    "dict(count={}, hidden={}, act='{}')",
                    s.count,
                    s.expert.hidden,
                    act_name(s.expert.act)
                ),
                None => "None".to_string(),
            },
            experts_per_rank: plan
                .moe_layers
                .iter()
                .find(|l| l.layer == index)
                .map_or(moe.experts, |l| l.experts_per_rank),
        })
        .collect()
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

fn py_capacity(c: Option<crate::check::Capacity>) -> String {
    match c {
        Some(cap) => format!(
            "({}, {})",
            view::py_float(cap.train),
            view::py_float(cap.eval)
        ),
        None => "None".to_string(),
    }
}

/// The generated module's gate table: every gate's definition with its stdlib defaults.
fn gate_views() -> Vec<GateView> {
    crate::check::gate_defaults()
        .iter()
        .map(|g| {
            let def = crate::gates::of(g.kind);
            GateView {
                name: def.name,
                class: def.python_class,
                top_k: def.top_k.map_or("None".to_string(), |k| k.to_string()),
                capacity: py_capacity(g.capacity),
                balance_loss: view::py_float(g.balance_loss),
                jitter: view::py_float(g.jitter),
                random_routing: py_bool(g.random_routing),
            }
        })
        .collect()
}

/// `"16 GPUs of h100_sxm: tensor 2 x pipeline 1 x data 8"` (`"1 GPU of ..."`).
fn planned_layout(plan: &ParallelPlan) -> String {
    format!(
        "{} GPU{} of {}: tensor {} x pipeline {} x data {}",
        plan.world,
        if plan.world == 1 { "" } else { "s" },
        plan.hardware.name,
        plan.tensor,
        plan.pipeline,
        plan.data
    )
}

fn group_rows(plan: &ParallelPlan) -> Vec<GroupRow> {
    let g = &plan.groups;
    let mut rows: Vec<(&'static str, &[Vec<u64>])> = vec![
        ("tensor", &g.tensor),
        ("pipeline", &g.pipeline),
        ("data", &g.data),
        ("expert (all-to-all)", &g.expert),
        ("gate (all-reduce)", &g.gate),
    ];
    if let Some(core) = &plan.megatron_core {
        rows.push(("expert-data (expert gradients)", &g.expert_data));
        rows.push(("expert-tensor (expert slices)", &core.expert_tensor_groups));
    }
    rows.into_iter()
        .map(|(kind, groups)| GroupRow {
            kind,
            groups: groups_text(groups),
        })
        .collect()
}

/// Groups of ranks as the README lists them: `[0, 1] [2, 3]`, the first 8 and a count.
fn groups_text(gs: &[Vec<u64>]) -> String {
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
}

/// Reads one printed value of a layer (for the uniform `--fmoe-*` launch arguments).
type LayerField = dyn Fn(&LayerView) -> String;

/// `--moe-layer-freq`'s pattern (1 for an MoE layer), as the shortest Python list expression
/// Megatron evaluates: a repeated period (`([0,1]*12)`), else a dense prefix and a uniform rest
/// (`([0]+[1]*13)`), else the list.
fn moe_layer_pattern(c: &Checked) -> String {
    let bits: Vec<u8> = c
        .model
        .layers
        .iter()
        .map(|l| u8::from(matches!(l.ffn, crate::check::Ffn::Moe(_))))
        .collect();
    let list = |b: &[u8]| -> String {
        let items: Vec<String> = b.iter().map(u8::to_string).collect();
        format!("[{}]", items.join(","))
    };
    let n = bits.len();
    if let Some(period) = (1..n).find(|p| n % p == 0 && bits.chunks(*p).all(|c| c == &bits[..*p])) {
        return format!("({}*{})", list(&bits[..period]), n / period);
    }
    if let Some(split) = (1..n).find(|&i| {
        bits[..i].iter().all(|b| *b == bits[0]) && bits[i..].iter().all(|b| *b == bits[i])
    }) {
        return format!("([{}]*{}+[{}]*{})", bits[0], split, bits[split], n - split);
    }
    list(&bits)
}

/// Megatron's own MoE arguments (`native_expert_parallel`), from the first MoE layer: the MoE
/// layers themselves where Megatron's MoE trains them (`MoePath::Native`); otherwise the
/// expert groups, Megatron's checks and its loss bookkeeping around the generated module's
/// layers, which take their own values from the module's table.
fn megatron_moe_args(
    c: &Checked,
    arg: &mut dyn FnMut(&str, Option<String>),
    moe_path: &support::MoePath,
) {
    let Some((_, first)) = c.model.moe_layers().next() else {
        return;
    };
    let native = *moe_path == support::MoePath::Native;
    if !native {
        arg(
            "--spec",
            Some(format!("{MODULE_NAME} transformer_layer_spec")),
        );
    }
    arg("--num-experts", Some(first.experts.to_string()));
    if c.model.moe_layers().count() != c.model.layers.len() {
        arg(
            "--moe-layer-freq",
            Some(view::sh_word(&moe_layer_pattern(c))),
        );
    }
    arg("--moe-router-topk", Some(first.top_k.to_string()));
    if first.top_k == 1 {
        // Megatron's router refuses top-1 without it
        arg("--moe-router-pre-softmax", None);
    }
    arg(
        "--moe-ffn-hidden-size",
        Some(first.expert.hidden.to_string()),
    );
    if let Some(shared) = &first.shared {
        arg(
            "--moe-shared-expert-intermediate-size",
            Some((shared.count * shared.expert.hidden).to_string()),
        );
    }
    let loss = first.gate.balance_loss;
    if native && loss == 0.0 {
        arg("--moe-router-load-balancing-type", Some("none".to_string()));
        arg("--moe-aux-loss-coeff", Some("0".to_string()));
    } else {
        // the module's layers report their gate losses to Megatron's log under this type
        arg(
            "--moe-router-load-balancing-type",
            Some("aux_loss".to_string()),
        );
        if native {
            arg("--moe-aux-loss-coeff", Some(view::py_float(loss)));
        }
    }
    arg("--moe-token-dispatcher-type", Some("alltoall".to_string()));
}

/// Megatron's launch arguments for the model, the plan and the target's capabilities: the
/// arguments every release takes, then those a capability brings (a model property the target
/// can set, Megatron's own MoE and expert parallelism, its distributed optimizer), so a target
/// that declares a capability gets its arguments without code of its own.
fn launch_args(
    c: &Checked,
    plan: &ParallelPlan,
    target: &crate::check::MegatronTarget,
    layers: &[LayerView],
    moe_path: &support::MoePath,
    relative_to: Option<&std::path::Path>,
) -> Vec<ArgLine> {
    let native_moe = target.can("native_expert_parallel");
    let mut args: Vec<(String, Option<String>)> = Vec::new();
    let mut arg = |flag: &str, value: Option<String>| args.push((flag.to_string(), value));
    parallel_args(plan, target, layers, &mut arg);
    model_args(c, plan, target, &mut arg);
    arg("--micro-batch-size", Some(plan.micro_batch.to_string()));
    if !native_moe {
        // the patch's expert-aware data parallelism replaces Megatron's local DDP
        arg("--DDP-impl", Some("local".to_string()));
    }
    if c.train.is_none() && plan.megatron_core.is_some() {
        // no train block: the global batch the plan was costed for (its micro-batches in
        // flight), not Megatron's default of one micro-batch per data rank
        arg("--global-batch-size", Some(plan.global_batch.to_string()));
    }
    if let Some(t) = &c.train {
        train_args(c, t, target, relative_to, &mut arg);
    }
    arg("--log-interval", Some("10".to_string()));
    if layers.is_empty() {
        // a dense model: no MoE arguments
    } else if native_moe {
        megatron_moe_args(c, &mut arg, moe_path);
    } else {
        fmoe_args(layers, &mut arg);
    }
    args.into_iter()
        .map(|(f, v)| ArgLine {
            text: match v {
                Some(v) => format!("{f} {v}"),
                None => f,
            },
        })
        .collect()
}

/// The rank layout: tensor, pipeline and (Megatron-Core) expert sizes, the optimizer's sharding.
fn parallel_args(
    plan: &ParallelPlan,
    target: &crate::check::MegatronTarget,
    layers: &[LayerView],
    arg: &mut dyn FnMut(&str, Option<String>),
) {
    let native_moe = target.can("native_expert_parallel");
    arg(
        "--tensor-model-parallel-size",
        Some(plan.tensor.to_string()),
    );
    arg(
        "--pipeline-model-parallel-size",
        Some(plan.pipeline.to_string()),
    );
    if native_moe {
        // Megatron-Core requires sequence parallelism for MoE with tensor parallelism
        if plan.tensor > 1 {
            arg("--sequence-parallel", None);
        }
        if let Some(core) = &plan.megatron_core {
            if !layers.is_empty() {
                arg(
                    "--expert-model-parallel-size",
                    Some(core.expert_parallel.to_string()),
                );
                arg(
                    "--expert-tensor-parallel-size",
                    Some(core.expert_tensor.to_string()),
                );
            }
        }
    }
    if target.can("distributed_optimizer") {
        arg("--use-distributed-optimizer", None);
    }
}

/// The model's shape and the properties the target can set.
fn model_args(
    c: &Checked,
    plan: &ParallelPlan,
    target: &crate::check::MegatronTarget,
    arg: &mut dyn FnMut(&str, Option<String>),
) {
    let m = &c.model;
    arg("--num-layers", Some(m.depth().to_string()));
    arg("--hidden-size", Some(m.width.to_string()));
    if let Some(hidden) = support::dense_hidden(c, target) {
        arg("--ffn-hidden-size", Some(hidden.to_string()));
    }
    arg("--num-attention-heads", Some(m.attention.heads.to_string()));
    // Model properties a target can set where it has more than one value for them.
    if target.allows("attention", "grouped_query") && m.attention.kv_heads < m.attention.heads {
        arg("--group-query-attention", None);
        arg("--num-query-groups", Some(m.attention.kv_heads.to_string()));
    }
    arg("--seq-length", Some(plan.seq_len.to_string()));
    arg("--max-position-embeddings", Some(m.context.to_string()));
    if target.can("pinned_vocab") {
        arg(
            "--padded-vocab-size",
            Some(built_vocab(c, plan).to_string()),
        );
    }
    if target.allows("norm", "rmsnorm") {
        let norm = match m.norm {
            crate::check::Norm::LayerNorm => "LayerNorm",
            crate::check::Norm::RmsNorm => "RMSNorm",
        };
        arg("--normalization", Some(norm.to_string()));
    }
    if target.allows("positions", "rotary") {
        let positions = match m.positions {
            crate::check::Positions::Learned => "learned_absolute",
            crate::check::Positions::Rotary => "rope",
        };
        arg("--position-embedding-type", Some(positions.to_string()));
    }
    if target.allows("dense_act", "swiglu") && support::megatron_act(c, target) == "swiglu" {
        arg("--swiglu", None);
    }
    if target.allows("bias", "false") && !m.bias {
        arg("--disable-bias-linear", None);
    }
    if target.allows("tied_embeddings", "false") && !m.tied_embeddings {
        arg("--untie-embeddings-and-output-weights", None);
    }
}

/// The `train` block: batch, steps, optimizer and schedule, clipping, precision, checkpoints,
/// evaluation, seed.
fn train_args(
    c: &Checked,
    t: &crate::check::Train,
    target: &crate::check::MegatronTarget,
    relative_to: Option<&std::path::Path>,
    arg: &mut dyn FnMut(&str, Option<String>),
) {
    arg("--global-batch-size", Some(t.batch_sequences.to_string()));
    arg("--train-iters", Some(t.steps.to_string()));
    optimizer_args(t, target, arg);
    arg(
        "--clip-grad",
        Some(view::py_float(t.clip_grad.unwrap_or(0.0))),
    );
    if let Some(flag) = support::precision_flag(c, target) {
        arg(flag, None);
    }
    checkpoint_and_eval_args(t, target, relative_to, arg);
    arg("--seed", Some(t.seed.to_string()));
}

/// AdamW and the learning-rate schedule.
fn optimizer_args(
    t: &crate::check::Train,
    target: &crate::check::MegatronTarget,
    arg: &mut dyn FnMut(&str, Option<String>),
) {
    let native_moe = target.can("native_expert_parallel");
    let crate::check::Optimizer::Adamw {
        lr,
        betas,
        eps,
        weight_decay,
    } = t.optimizer;
    if native_moe {
        arg("--optimizer", Some("adam".to_string()));
    }
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
            if native_moe {
                arg("--lr-decay-iters", Some(t.steps.to_string()));
            }
            arg("--min-lr", Some(view::py_float(lr * min_lr_ratio)));
        }
    }
    arg("--weight-decay", Some(view::py_float(weight_decay)));
    arg("--adam-beta1", Some(view::py_float(betas.0)));
    arg("--adam-beta2", Some(view::py_float(betas.1)));
    arg("--adam-eps", Some(view::py_float(eps)));
}

/// Checkpoints and evaluation. The checkpoint folder is written absolute, a relative one taken
/// from `relative_to` ([`view::RunFile`]): Megatron runs in its own checkout.
fn checkpoint_and_eval_args(
    t: &crate::check::Train,
    target: &crate::check::MegatronTarget,
    relative_to: Option<&std::path::Path>,
    arg: &mut dyn FnMut(&str, Option<String>),
) {
    let native_moe = target.can("native_expert_parallel");
    if let Some(ck) = &t.checkpoint {
        let dir = view::RunFile::resolve(&ck.dir, relative_to);
        arg("--save", Some(dir.word.clone()));
        arg("--load", Some(dir.word));
        arg("--save-interval", Some(ck.every.to_string()));
        if native_moe {
            // dist_checkpointing: one copy of each expert, resharded on load
            arg("--ckpt-format", Some("torch_dist".to_string()));
        }
    }
    match &t.eval {
        Some(ev) => {
            arg("--eval-interval", Some(ev.every.to_string()));
            arg("--eval-iters", Some(ev.batches.to_string()));
        }
        // no evaluation; Megatron-Core still divides the run by an evaluation interval
        None if native_moe => {
            arg("--eval-interval", Some(t.steps.to_string()));
            arg("--eval-iters", Some("0".to_string()));
        }
        None => {}
    }
}

/// FastMoE's MoE arguments (the module's defaults, spelled out so that the command says what it trains): each where every MoE layer has the same value.
fn fmoe_args(layers: &[LayerView], arg: &mut dyn FnMut(&str, Option<String>)) {
    // The MoE arguments (the module's defaults, spelled out so the command says what it trains).
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
