//! Every diagnostic the checker reports, as a named constructor with a stable code.
//! The rules call these with spans and facts; all wording lives here.
//!
//! Codes: `E02xx` names and imports, `E03xx` values, types and calls, `E04xx` model
//! rules, `E05xx` parallel rules, `E06xx` train rules, `E07xx` stdlib declarations,
//! `W0xxx` warnings. (`E01xx` are syntax errors, in `syntax::errors`.)

use super::value::Fraction;
use crate::diag::{count, Diagnostic, Span};

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("`{s}`")).collect();
    match quoted.len() {
        0 => String::new(),
        1 => quoted[0].clone(),
        n => format!("{} and {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    }
}

fn with_opt_help(d: Diagnostic, help: Option<String>) -> Diagnostic {
    match help {
        Some(h) => d.with_help(h),
        None => d,
    }
}

// ---- E02xx: names and imports ------------------------------------------------------

/// The help for a name the stdlib has but the file does not import: "`gshard` is in
/// `std.gates`: add `use std.gates.gshard`".
pub fn add_use(name: &str, module: &str) -> String {
    format!("`{name}` is in `{module}`: add `use {module}.{name}`")
}

pub fn unknown_name(span: Span, name: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error("E0201", span, format!("unknown name `{name}`"))
            .with_label("not defined here"),
        help,
    )
}

pub fn unknown_function(span: Span, name: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error(
            "E0202",
            span,
            format!("unknown constructor or definition `{name}`"),
        )
        .with_label("not defined here"),
        help,
    )
}

pub fn import_not_std(span: Span, root: &str) -> Diagnostic {
    Diagnostic::error("E0203", span, format!("cannot import from `{root}`"))
        .with_label("only the standard library can be imported")
        .with_help("imports start with `std`, as in `use std.gates.gshard`")
}

pub fn import_needs_item(span: Span, module: Option<&str>) -> Diagnostic {
    let m = module.unwrap_or("gates");
    Diagnostic::error("E0204", span, "an import names an item or `*`")
        .with_label("incomplete import")
        .with_help(format!("write `use std.{m}.NAME` or `use std.{m}.*`"))
}

pub fn unknown_module(span: Span, name: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error("E0205", span, format!("no stdlib module `std.{name}`"))
            .with_label("unknown module")
            .with_note("the modules are std.gates, std.experts, std.blocks, std.train, std.parallel, std.hardware, std.presets and std.megatron"),
        help,
    )
}

pub fn import_too_deep(span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0206",
        span,
        "an import has the form `use std.MODULE.NAME` or `use std.MODULE.*`",
    )
    .with_label("unexpected path segment")
}

pub fn unknown_import(
    span: Span,
    name: &str,
    module: &str,
    help: Option<String>,
    names: &[&str],
) -> Diagnostic {
    let shown: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let d = Diagnostic::error("E0207", span, format!("`{module}` has no item `{name}`"))
        .with_label("not in this module")
        .with_note(format!("`{module}` declares {}", list(&shown)));
    with_opt_help(d, help)
}

pub fn duplicate_import(span: Span, name: &str, first: Span) -> Diagnostic {
    Diagnostic::error("E0208", span, format!("`{name}` is imported twice"))
        .with_label("imported again")
        .with_secondary(first, "first imported here")
}

pub fn import_shadows_item(span: Span, name: &str, item: Span) -> Diagnostic {
    Diagnostic::error(
        "E0209",
        span,
        format!("`{name}` is both imported and declared in this file"),
    )
    .with_label("imported here")
    .with_secondary(item, "declared here")
    .with_help("rename the declaration or drop the import")
}

pub fn duplicate_item(span: Span, name: &str, first: Span) -> Diagnostic {
    Diagnostic::error("E0210", span, format!("`{name}` is declared twice"))
        .with_label("declared again")
        .with_secondary(first, "first declared here")
}

pub fn cyclic(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error("E0211", span, format!("`{name}` depends on itself"))
        .with_label("used while it is being computed")
}

pub fn constructor_not_called(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error("E0212", span, format!("`{name}` is a constructor; call it"))
        .with_label("needs arguments")
        .with_help(format!(
            "write `{name}()` for its defaults, or `{name}(...)` with arguments"
        ))
}

pub fn def_not_called(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error("E0213", span, format!("`{name}` is a definition; call it"))
        .with_label("needs arguments")
        .with_help(format!("write `{name}(...)`"))
}

pub fn not_a_value(span: Span, name: &str, what: &str) -> Diagnostic {
    Diagnostic::error("E0214", span, format!("`{name}` is a {what}, not a value"))
        .with_label("cannot be used in an expression")
}

pub fn not_callable(span: Span, name: &str, what: &str) -> Diagnostic {
    Diagnostic::error(
        "E0215",
        span,
        format!("`{name}` is a {what} and cannot be called"),
    )
    .with_label("not a constructor or definition")
}

pub fn unknown_preset(span: Span, name: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error("E0216", span, format!("unknown model preset `{name}`"))
            .with_label("no model of this name"),
        help,
    )
}

pub fn not_a_preset(span: Span, name: &str, what: &str) -> Diagnostic {
    Diagnostic::error("E0217", span, format!("`{name}` is a {what}, not a model"))
        .with_label("a model can only start from another model")
}

pub fn preset_cycle(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error(
        "E0218",
        span,
        format!("model presets loop back through `{name}`"),
    )
    .with_label("this preset chain never ends")
}

pub fn unknown_hardware(span: Span, name: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error("E0219", span, format!("unknown hardware profile `{name}`"))
            .with_label("no hardware profile of this name"),
        help,
    )
}

pub fn not_hardware(span: Span, name: &str, what: &str) -> Diagnostic {
    Diagnostic::error(
        "E0220",
        span,
        format!("`{name}` is a {what}, not a hardware profile"),
    )
    .with_label("expected a hardware profile")
}

pub fn no_model(span: Span) -> Diagnostic {
    Diagnostic::error("E0221", span, "this file declares no model")
        .with_label("expected a `model NAME { ... }` block")
        .with_help(
            "start from a preset: `use std.presets.gpt2_small` then `model mine : gpt2_small {}`",
        )
}

pub fn second_model(span: Span, first: Span) -> Diagnostic {
    Diagnostic::error("E0222", span, "a file declares one model")
        .with_label("second model")
        .with_secondary(first, "first model here")
}

pub fn second_block(span: Span, kind: &str, first: Span) -> Diagnostic {
    Diagnostic::error(
        "E0223",
        span,
        format!("a file has at most one `{kind}` block"),
    )
    .with_label("second block")
    .with_secondary(first, "first block here")
}

// ---- E03xx: values, types and calls -----------------------------------------------

pub fn type_mismatch(span: Span, what: &str, expected: &str, found: &str) -> Diagnostic {
    Diagnostic::error(
        "E0301",
        span,
        format!("{what} expects {expected}, found {found}"),
    )
    .with_label(format!("expected {expected}"))
}

/// The help fits how the fraction came to be: a number written with one, a `/` that is not
/// exact, or other arithmetic on a written fraction.
pub fn not_an_integer(span: Span, what: &str, value: f64, fraction: Fraction) -> Diagnostic {
    let help = match fraction {
        Fraction::Written => format!(
            "write a whole number here, such as `{}` or `{}`",
            value.floor(),
            value.ceil()
        ),
        Fraction::Divided => "`/` gives a fraction when the division is not exact; round with \
                              `floor(...)` or `ceil(...)`"
            .to_string(),
        Fraction::Computed => {
            "the arithmetic gives a fraction; round it with `floor(...)` or `ceil(...)`".to_string()
        }
    };
    Diagnostic::error(
        "E0302",
        span,
        format!("{what} must be an integer, found {value}"),
    )
    .with_label("not a whole number")
    .with_help(help)
}

pub fn out_of_range(span: Span, what: &str, value: &str, bound: &str) -> Diagnostic {
    Diagnostic::error(
        "E0303",
        span,
        format!("{what} must be {bound}, found {value}"),
    )
    .with_label(format!("must be {bound}"))
}

pub fn not_a_variant(
    span: Span,
    name: &str,
    what: &str,
    variants: &[String],
    help: Option<String>,
) -> Diagnostic {
    with_opt_help(
        Diagnostic::error(
            "E0304",
            span,
            format!("`{name}` is not a choice for {what}"),
        )
        .with_label(format!("expected one of {}", variants.join(", "))),
        help,
    )
}

pub fn wrong_kind(
    span: Span,
    what: &str,
    kind: &str,
    found: &str,
    help: Option<String>,
) -> Diagnostic {
    with_opt_help(
        Diagnostic::error(
            "E0305",
            span,
            format!("{what} expects a `{kind}`, found {found}"),
        )
        .with_label(format!("expected a `{kind}`")),
        help,
    )
}

pub fn unknown_argument(
    span: Span,
    name: &str,
    callee: &str,
    help: Option<String>,
    decl: Span,
) -> Diagnostic {
    with_opt_help(
        Diagnostic::error(
            "E0306",
            span,
            format!("`{callee}` has no parameter `{name}`"),
        )
        .with_label("unknown argument")
        .with_secondary(decl, format!("`{callee}` is declared here")),
        help,
    )
}

pub fn missing_arguments(
    span: Span,
    callee: &str,
    missing: &[String],
    decl: Option<Span>,
) -> Diagnostic {
    let s = if missing.len() == 1 { "" } else { "s" };
    let d = Diagnostic::error(
        "E0307",
        span,
        format!("`{callee}` is missing the argument{s} {}", list(missing)),
    )
    .with_label(format!("add {}", list(missing)));
    match decl {
        Some(decl) => d.with_secondary(decl, format!("`{callee}` is declared here")),
        None => d,
    }
}

pub fn too_many_arguments(span: Span, callee: &str, max: usize) -> Diagnostic {
    Diagnostic::error(
        "E0308",
        span,
        format!(
            "`{callee}` takes at most {max} argument{}",
            if max == 1 { "" } else { "s" }
        ),
    )
    .with_label("one argument too many")
}

pub fn positional_after_keyword(span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0309",
        span,
        "a positional argument after a keyword argument",
    )
    .with_label("name this argument")
    .with_help("write positional arguments first, then `name = value` ones")
}

pub fn argument_twice(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error("E0310", span, format!("argument `{name}` is given twice"))
        .with_label("given again")
}

pub fn division_by_zero(span: Span) -> Diagnostic {
    Diagnostic::error("E0311", span, "division by zero").with_label("this is zero")
}

pub fn overflow(span: Span) -> Diagnostic {
    Diagnostic::error("E0312", span, "arithmetic overflow")
        .with_label("the result does not fit in 64 bits")
}

pub fn not_a_number(span: Span, found: &str) -> Diagnostic {
    Diagnostic::error("E0313", span, format!("expected a number, found {found}"))
        .with_label("not a number")
}

pub fn bad_operands(span: Span, op: &str, a: &str, b: &str) -> Diagnostic {
    Diagnostic::error("E0314", span, format!("cannot apply `{op}` to {a} and {b}"))
        .with_label("operands of the wrong type")
}

pub fn too_deep(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error("E0315", span, format!("calls nest too deeply in `{name}`"))
        .with_label("does a definition call itself?")
}

pub fn rounding_arity(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error("E0316", span, format!("`{name}` takes exactly one number"))
        .with_label(format!("write `{name}(x)`"))
}

pub fn unknown_field(
    span: Span,
    name: &str,
    block: &str,
    help: Option<String>,
    known: &[&str],
) -> Diagnostic {
    let known: Vec<String> = known.iter().map(|s| s.to_string()).collect();
    with_opt_help(
        Diagnostic::error(
            "E0317",
            span,
            format!("a `{block}` block has no field `{name}`"),
        )
        .with_label("unknown field")
        .with_note(format!("the fields are {}", list(&known))),
        help,
    )
}

pub fn duplicate_field(span: Span, name: &str, first: Span) -> Diagnostic {
    Diagnostic::error("E0318", span, format!("field `{name}` is set twice"))
        .with_label("set again")
        .with_secondary(first, "first set here")
}

/// The value of a line that sets a required field, for a help (`32 x 1024 tokens` for a
/// `train` block's `batch`), where there is a usual one.
fn example_value(block: &str, name: &str) -> Option<&'static str> {
    Some(match (block, name) {
        ("train", "data") => "builtin(\"tiny-shakespeare\")",
        ("train", "batch") => "32 x 1024 tokens",
        ("train", "steps") => "1000",
        ("train", "optimizer") => "adamw(lr = 3e-4)",
        ("parallel", "gpus") => "8 of h100_sxm",
        _ => return None,
    })
}

pub fn missing_field(span: Span, name: &str, block: &str, ty: &str) -> Diagnostic {
    let example = match example_value(block, name) {
        Some(value) => format!("`{name} = {value}`"),
        None => format!("`{name} = ...` ({ty})"),
    };
    Diagnostic::error(
        "E0319",
        span,
        format!("this `{block}` block needs `{name}`"),
    )
    .with_label(format!("`{name}` is missing"))
    .with_help(format!("add a line such as {example}"))
}

/// One E0319 for every required field a block leaves out (`missing`: each field's name and
/// type, in the block's order): the block is one mistake, and its help lists every line to add
/// (with a usual value where there is one, else the type).
pub fn missing_fields(span: Span, block: &str, missing: &[(String, String)]) -> Diagnostic {
    if let [(name, ty)] = missing {
        return missing_field(span, name, block, ty);
    }
    let names: Vec<String> = missing.iter().map(|(n, _)| n.clone()).collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let lines: Vec<String> = missing
        .iter()
        .map(|(name, ty)| match example_value(block, name) {
            Some(value) => format!("    {name:width$} = {value}"),
            None => format!("    {name:width$} = ...    // {ty}"),
        })
        .collect();
    Diagnostic::error(
        "E0319",
        span,
        format!("this `{block}` block needs {}", list(&names)),
    )
    .with_label(format!("{} fields are missing", missing.len()))
    .with_help(format!("add these lines:\n{}", lines.join("\n")))
}

pub fn layers_outside_model(span: Span, block: &str) -> Diagnostic {
    Diagnostic::error(
        "E0320",
        span,
        format!("layer selections belong in a `model` block, not `{block}`"),
    )
    .with_label("not allowed here")
}

// ---- E04xx: model rules -----------------------------------------------------------

pub fn model_missing_fields(span: Span, model: &str, missing: &[String]) -> Diagnostic {
    Diagnostic::error(
        "E0401",
        span,
        format!("model `{model}` does not set {}", list(missing)),
    )
    .with_label("incomplete model")
    .with_help("set them, or start from a preset such as `model mine : gpt2_small { ... }`")
}

pub fn width_not_divisible(span: Span, width: u64, heads: u64, heads_span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0402",
        span,
        format!("width {width} is not divisible by {heads} heads"),
    )
    .with_label(format!("{width} / {heads} is not a whole head size"))
    .with_secondary(heads_span, "heads set here")
}

pub fn heads_not_divisible(span: Span, heads: u64, kv: u64, heads_span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0403",
        span,
        format!("{heads} query heads cannot share {kv} key/value heads evenly"),
    )
    .with_label(format!("{heads} is not divisible by {kv}"))
    .with_secondary(heads_span, "heads set here")
}

pub fn heads_disagree(
    span: Span,
    field: &str,
    here: u64,
    model: u64,
    model_span: Span,
) -> Diagnostic {
    Diagnostic::error(
        "E0404",
        span,
        format!("the attention's `{field} = {here}` disagrees with the model's {model}"),
    )
    .with_label("differs from the model")
    .with_secondary(model_span, "the model's value")
    .with_help(format!(
        "drop `{field}` from `causal(...)`: it defaults to the model's"
    ))
}

pub fn unknown_layer_field(span: Span, name: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error("E0405", span, format!("a layer has no setting `{name}`"))
            .with_label("only `ffn` can be set per layer"),
        help,
    )
}

pub fn layer_out_of_range(span: Span, index: i64, depth: u64, depth_span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0406",
        span,
        format!("layer {index} does not exist in a model of depth {depth}"),
    )
    .with_label(format!(
        "layers are numbered 0 to {}",
        depth.saturating_sub(1)
    ))
    .with_secondary(depth_span, "depth set here")
}

pub fn range_end_past_depth(span: Span, end: i64, depth: u64, depth_span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0407",
        span,
        format!("the range ends at {end}, past the model's depth {depth}"),
    )
    .with_label(format!("at most {depth} (the end is excluded)"))
    .with_secondary(depth_span, "depth set here")
}

pub fn empty_range(span: Span, start: i64, end: i64) -> Diagnostic {
    Diagnostic::error(
        "E0408",
        span,
        format!("the range {start}..{end} selects no layer"),
    )
    .with_label("empty range")
    .with_help("a range `a..b` selects a, a+1, ..., b-1; the end is excluded")
}

pub fn empty_selection(span: Span) -> Diagnostic {
    Diagnostic::error("E0409", span, "this selection names no layer").with_label("empty")
}

pub fn layer_selected_twice(span: Span, index: u64) -> Diagnostic {
    Diagnostic::error(
        "E0410",
        span,
        format!("layer {index} is selected twice in one selection"),
    )
    .with_label("selected again")
}

pub fn layer_assigned_twice(span: Span, index: u64, first: Span) -> Diagnostic {
    Diagnostic::error(
        "E0411",
        span,
        format!("layer {index}'s `ffn` is assigned twice"),
    )
    .with_label("assigned again")
    .with_secondary(first, "first assigned here")
    .with_help(
        "if the later assignment is meant to replace the earlier, write `override layers[...]`",
    )
}

/// Where a rule about one argument's value points: the value the user wrote, or, when the
/// signature's default supplied it, the user's call (with a note at the default in the
/// stdlib), since that call is what the user can change.
#[derive(Clone, Copy, Debug)]
pub enum ArgAt {
    Written(Span),
    Defaulted { call: Span, default: Span },
}

/// A diagnostic about argument `param` (value `value`) at `at`; `label` says what is wrong
/// with the value.
fn about_argument(
    code: &str,
    at: ArgAt,
    param: &str,
    value: u64,
    message: String,
    label: String,
) -> Diagnostic {
    match at {
        ArgAt::Written(span) => Diagnostic::error(code, span, message).with_label(label),
        ArgAt::Defaulted { call, default } => Diagnostic::error(code, call, message)
            .with_label(format!(
                "`{param}` is not given here, so it is {value}: {label}"
            ))
            .with_secondary(default, format!("the default of `{param}`")),
    }
}

pub fn top_k_exceeds_experts(
    at: ArgAt,
    top_k: u64,
    experts: u64,
    experts_span: Span,
) -> Diagnostic {
    about_argument(
        "E0412",
        at,
        "top_k",
        top_k,
        format!(
            "top_k = {top_k} is more than the layer's {}",
            count(experts, "expert", "experts")
        ),
        "each token would need more experts than exist".into(),
    )
    .with_secondary(experts_span, "experts set here")
    .with_help(format!("set `top_k` to at most {experts}"))
}

pub fn gate_needs_top_k(
    at: ArgAt,
    gate: &str,
    needed: u64,
    top_k: u64,
    gate_span: Span,
) -> Diagnostic {
    about_argument(
        "E0413",
        at,
        "top_k",
        top_k,
        format!("the `{gate}` gate routes to top-{needed}, but top_k = {top_k}"),
        format!("must be {needed} for `{gate}`"),
    )
    .with_secondary(gate_span, "gate chosen here")
    .with_help(format!("write `top_k = {needed}` in this `moe(...)`"))
}

pub fn unknown_gate(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error(
        "E0414",
        span,
        format!("fmoec has no implementation of the gate `{name}`"),
    )
    .with_label("not one of fmoec's gates")
    .with_help(format!("the gates are {}", crate::gates::NAMES.join(", ")))
}

// ---- E05xx: parallel rules --------------------------------------------------------
// E0501 and E0505-E0507 were copies of the planner's rules; the planner reports them
// (P0001, P0008, P0002, P0006). Codes are never reused.

#[allow(clippy::too_many_arguments)]
pub fn data_mismatch(
    span: Span,
    given: u64,
    derived: u64,
    gpus: u64,
    tensor: u64,
    pipeline: u64,
    gpus_span: Span,
) -> Diagnostic {
    Diagnostic::error(
        "E0502",
        span,
        format!(
            "data = {given}, but gpus / (tensor x pipeline) = {gpus} / ({tensor} x {pipeline}) = {derived}"
        ),
    )
    .with_label(format!("should be {derived}"))
    .with_secondary(gpus_span, "GPU count set here")
    .with_help("`data` is derived; leave it out or make it agree")
}

pub fn across_what(span: Span, group: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error(
            "E0503",
            span,
            format!("experts can be spread across `data`, not `{group}`"),
        )
        .with_label("expected `data`"),
        help,
    )
}

pub fn bad_expert_group(span: Span, found: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error(
            "E0504",
            span,
            format!(
                "`experts` expects `across data`, `groups_of(N)` or `replicated`, found {found}"
            ),
        )
        .with_label("not an expert group"),
        help,
    )
}

pub fn bad_smart_schedule(span: Span, found: &str, help: Option<String>) -> Diagnostic {
    with_opt_help(
        Diagnostic::error(
            "E0508",
            span,
            format!("`smart_schedule` expects `chunks(N)`, `auto` or `off`, found {found}"),
        )
        .with_label("not a schedule of the expert exchange"),
        help,
    )
}

// ---- E06xx: train rules -----------------------------------------------------------
// E0602 was a copy of the planner's P0011 (the batch over data ranks and micro-batches).

pub fn seq_len_past_context(span: Span, len: u64, context: u64, context_span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0601",
        span,
        format!("sequences of {len} tokens are longer than the model's context {context}"),
    )
    .with_label(format!("at most {context}"))
    .with_secondary(context_span, "context set here")
}

pub fn every_wrong_arg(span: Span, arg: &str, here: &str, belongs: &str) -> Diagnostic {
    Diagnostic::error(
        "E0603",
        span,
        format!("`{arg}` is for `{belongs}`, not `{here}`"),
    )
    .with_label("not used here")
}

/// `checkpoint = every(N, dir = "")`: `run` would have no folder to write, and Megatron-LM
/// given `--save ''` saves nothing, silently.
pub fn empty_checkpoint_dir(span: Span) -> Diagnostic {
    Diagnostic::error("E0617", span, "the checkpoint folder is empty")
        .with_label("no folder named")
        .with_help(
            "name a folder, such as `dir = \"checkpoints\"` (the default when `dir` is left out), \
             or write `checkpoint = none` to save no checkpoints",
        )
}

pub fn byte_vocab_too_small(span: Span, vocab: u64, vocab_span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0604",
        span,
        format!("this data is read as bytes (token ids 0 to 255), but vocab = {vocab}"),
    )
    .with_label("byte-level data")
    .with_secondary(vocab_span, "vocab set here")
    .with_help("set `vocab = 256` or more")
}

pub fn tokenizer_unreadable(span: Span, error: &str) -> Diagnostic {
    Diagnostic::error("E0608", span, "cannot load the tokenizer")
        .with_label(error.to_string())
        .with_help("paths are relative to the working directory")
}

pub fn vocab_below_tokenizer(
    span: Span,
    vocab: u64,
    size: u64,
    padded: u64,
    tokenizer_span: Span,
) -> Diagnostic {
    Diagnostic::error(
        "E0606",
        span,
        format!("vocab = {vocab} cannot hold the tokenizer's {size} tokens"),
    )
    .with_label(format!("at least {size}"))
    .with_secondary(tokenizer_span, format!("{size} tokens"))
    .with_help(format!(
        "set `vocab = {padded}` (the tokenizer's size padded as Megatron-LM pads it)"
    ))
}

pub fn jsonl_without_tokenizer(span: Span) -> Diagnostic {
    Diagnostic::error("E0607", span, "JSON-lines data needs a tokenizer")
        .with_label("read through which tokenizer?")
        .with_help(
            "add `tokenizer = hf(\"tokenizer.json\")` to the train block \
             (`fmoec tokenizer train` makes one)",
        )
}

pub fn unknown_corpus(span: Span, name: &str, known: &[&str], help: Option<String>) -> Diagnostic {
    let names: Vec<String> = known.iter().map(|n| format!("`{n}`")).collect();
    with_opt_help(
        Diagnostic::error(
            "E0605",
            span,
            format!("there is no built-in corpus named `{name}`"),
        )
        .with_label("not built in")
        .with_note(format!("the built-in corpora: {}", names.join(", "))),
        help,
    )
}

pub fn upcycle_of_upcycle(span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0610",
        span,
        "`upcycle` starts from a dense checkpoint, not from another `upcycle`",
    )
    .with_label("not `from_hf(...)` or `from_checkpoint(...)`")
    .with_help("write `upcycle(from_hf(\"DIR\"))` or `upcycle(from_checkpoint(\"DIR\"))`")
}

pub fn fp8_dense_without_fp8(span: Span, precision: Span) -> Diagnostic {
    let d = Diagnostic::error(
        "E0609",
        span,
        "`fp8_dense` applies only with `precision = fp8`",
    )
    .with_label("no FP8 matmuls to extend")
    .with_help("set `precision = fp8`, or remove `fp8_dense`");
    if precision == Span::default() {
        d
    } else {
        d.with_secondary(precision, "precision set here")
    }
}

// ---- E07xx: stdlib declarations ----------------------------------------------------

pub fn constructor_outside_stdlib(span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0701",
        span,
        "constructors are declared only in the standard library",
    )
    .with_label("not allowed in a model file")
    .with_help("use `def name(params) = expr` for a reusable definition")
}

pub fn unknown_kind(span: Span, kind: &str, kinds: &[&str]) -> Diagnostic {
    Diagnostic::error("E0702", span, format!("unknown constructor kind `{kind}`"))
        .with_note(format!("the kinds are {}", kinds.join(", ")))
}

pub fn duplicate_param(span: Span, name: &str) -> Diagnostic {
    Diagnostic::error(
        "E0703",
        span,
        format!("parameter `{name}` is declared twice"),
    )
}

pub fn bound_not_literal(span: Span) -> Diagnostic {
    Diagnostic::error("E0704", span, "a bound must be a number literal")
}

pub fn bound_on_non_number(span: Span, ty: &str) -> Diagnostic {
    Diagnostic::error(
        "E0705",
        span,
        format!("`{ty}` cannot have bounds; only `int` and `float` can"),
    )
}

pub fn unknown_type(span: Span, name: &str, known: &[&str]) -> Diagnostic {
    Diagnostic::error("E0706", span, format!("unknown type `{name}`"))
        .with_note(format!("the types are {}", known.join(", ")))
}

// ---- W0xxx: warnings --------------------------------------------------------------

pub fn unused_import(span: Span, name: &str) -> Diagnostic {
    Diagnostic::warning("W0001", span, format!("unused import `{name}`"))
        .with_label("nothing uses this")
        .with_help("remove the `use`")
}

pub fn unused_glob(span: Span) -> Diagnostic {
    Diagnostic::warning("W0002", span, "nothing from this import is used")
        .with_label("unused import")
        .with_help("remove the `use`")
}

pub fn unused_item(span: Span, what: &str, name: &str) -> Diagnostic {
    Diagnostic::warning("W0003", span, format!("unused {what} `{name}`")).with_label("never used")
}

pub fn preset_layers_replaced(span: Span, layers: &[u64], first: Span) -> Diagnostic {
    let shown: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
    let s = if layers.len() == 1 { "" } else { "s" };
    Diagnostic::warning(
        "W0004",
        span,
        format!(
            "this replaces the preset's feed-forward of layer{s} {}",
            shown.join(", ")
        ),
    )
    .with_label("overrides the preset")
    .with_secondary(first, "the preset assigns it here")
    .with_help("write `override layers[...]` to say this is intended")
}

pub fn override_without_effect(span: Span) -> Diagnostic {
    Diagnostic::warning("W0005", span, "`override` replaces nothing")
        .with_label("no earlier assignment of these layers")
        .with_help("remove `override`")
}

pub fn slicing_without_tensor(span: Span) -> Diagnostic {
    Diagnostic::warning(
        "W0006",
        span,
        "`expert_slicing` has no effect with tensor = 1",
    )
    .with_label("nothing to slice over")
}

pub fn warmup_past_steps(span: Span, warmup: u64, steps: u64, steps_span: Span) -> Diagnostic {
    Diagnostic::warning(
        "W0007",
        span,
        format!(
            "warmup of {warmup} steps is longer than training ({})",
            count(steps, "step", "steps")
        ),
    )
    .with_label("the learning rate never reaches its peak")
    .with_secondary(steps_span, "steps set here")
}

pub fn vocab_not_megatron_padded(
    span: Span,
    vocab: u64,
    size: u64,
    padded: u64,
    tensor: u64,
    tokenizer_span: Span,
) -> Diagnostic {
    Diagnostic::warning(
        "W0010",
        span,
        format!("vocab = {vocab} is not the tokenizer's {size} tokens padded as Megatron-LM pads them ({padded})"),
    )
    .with_label(format!("Megatron-LM would use {padded}"))
    .with_secondary(tokenizer_span, format!("{size} tokens"))
    .with_note(format!(
        "Megatron-LM rounds the tokenizer's size up to a multiple of 128 (--make-vocab-size-divisible-by) x {tensor} (tensor)"
    ))
    .with_help(format!("set `vocab = {padded}` to train the model Megatron-LM would"))
}

pub fn data_file_missing(span: Span, files: &[String]) -> Diagnostic {
    let shown: Vec<String> = files
        .iter()
        .map(|f| format!("`{}`", crate::diag::path_text(f)))
        .collect();
    let (what, verb) = if files.len() == 1 {
        ("file", "does")
    } else {
        ("files", "do")
    };
    Diagnostic::warning(
        "W0009",
        span,
        format!("the data {what} {} {verb} not exist", shown.join(" and ")),
    )
    .with_label("not found")
    .with_note("paths are relative to the directory `fmoec run` starts in; the run stops if the data is missing then")
}

pub fn megatron_dataset_damaged(span: Span, problem: &anyhow::Error) -> Diagnostic {
    Diagnostic::error("E0615", span, format!("{problem:#}"))
        .with_label("`fmoec run` would refuse this dataset")
        .with_help("write it again (`fmoec data` or Megatron-LM's `tools/preprocess_data.py`)")
}

/// The file's `precision` that the device of `fmoec run` cannot run (`precision = fp8` on the
/// CPU, or on a GPU before Hopper): `why` is the runtime's reason.
pub fn precision_cannot_run(span: Span, message: &str, why: &str) -> Diagnostic {
    Diagnostic::error("E0616", span, message)
        .with_label("not on this device")
        .with_note(why)
        .with_help(
            "`precision = bf16` (or `fp32`) runs here; `--precision bf16` sets it for one run",
        )
}

pub fn every_past_steps(span: Span, every: u64, steps: u64, steps_span: Span) -> Diagnostic {
    Diagnostic::warning(
        "W0008",
        span,
        format!(
            "every {every} steps never comes in {} of training",
            count(steps, "step", "steps")
        ),
    )
    .with_label("longer than the training")
    .with_secondary(steps_span, "steps set here")
}
