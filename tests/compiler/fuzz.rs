//! The parser, the checker and the planner's rules never panic: mutated example and
//! stdlib files (tokens deleted, duplicated, swapped, random characters inserted, text
//! truncated) go through what `fmoec check` runs (the front end, then the planner on what
//! it could build, errors or not), which must return (with diagnostics) whatever the
//! input. Mutations meant to keep an example valid (other values, layouts, selections,
//! names) go on through what `fmoec emit --megatron T` runs for every target, which must
//! refuse exactly what `fmoec plan --megatron T` refuses. Bounded to a fixed number of cases
//! so it takes a few seconds in CI.

use std::path::Path;

use fmoec::diag::{render_human, render_json, Sources};
use fmoec::driver::{analyse, Rules};
use proptest::prelude::*;

/// The example files, the stdlib sources and the ui tests' bad inputs: the corpus to
/// mutate.
fn corpus() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut texts = Vec::new();
    for sub in ["examples", "stdlib", "tests/ui"] {
        let mut paths: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "fmoe"))
            .collect();
        paths.sort();
        texts.extend(paths.iter().map(|p| std::fs::read_to_string(p).unwrap()));
    }
    texts
}

/// Splits text into tokens: words, single punctuation characters and whitespace runs,
/// so that joining them gives the text back.
fn tokens(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    let class = |c: char| {
        if c.is_alphanumeric() || c == '_' || c == '.' {
            0
        } else if c.is_whitespace() {
            1
        } else {
            2
        }
    };
    for c in text.chars() {
        let same = cur
            .chars()
            .last()
            .is_some_and(|p| class(p) == class(c) && class(c) != 2);
        if !same && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Insert(usize, String),
    Truncate(usize),
    /// Replaces the n-th number of the text by an extreme one.
    Number(usize, &'static str),
}

/// Numbers at the edges of what the checker and the planner compute with: zero, 2^32,
/// 2^63 - 1, 2^64 - 1, the largest and the smallest floats, past a float.
const EXTREME_NUMBERS: &[&str] = &[
    "0",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "1e308",
    "1.7976931348623157e308",
    "4.9e-324",
    "1e309",
    "65536",
    "1073741824",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (any::<usize>(), "[\\x00-\\x7f\\u{80}-\\u{10ffff}]{1,4}")
            .prop_map(|(a, s)| Mutation::Insert(a, s)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                "(",
                ")",
                "{",
                "}",
                "[",
                "]",
                "=",
                ",",
                "..",
                "\"",
                "///",
                "//",
                "-",
                "0",
                "x",
                "of",
                "override",
                "layers[",
                "moe(",
                "1e999",
                "99999999999999999999",
                "\n",
            ])
        )
            .prop_map(|(a, s)| Mutation::Insert(a, s.to_string())),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::sample::select(EXTREME_NUMBERS))
            .prop_map(|(i, n)| Mutation::Number(i, n)),
    ]
}

fn apply(mut toks: Vec<String>, mutations: &[Mutation]) -> String {
    for m in mutations {
        if toks.is_empty() {
            break;
        }
        let n = toks.len();
        match m {
            Mutation::Delete(i) => {
                toks.remove(i % n);
            }
            Mutation::Duplicate(i) => {
                let t = toks[i % n].clone();
                toks.insert(i % n, t);
            }
            Mutation::Swap(a, b) => toks.swap(a % n, b % n),
            Mutation::Insert(i, s) => toks.insert(i % (n + 1), s.clone()),
            Mutation::Truncate(i) => toks.truncate(i % n),
            Mutation::Number(i, number) => {
                let numbers: Vec<usize> = (0..n)
                    .filter(|&k| toks[k].starts_with(|c: char| c.is_ascii_digit()))
                    .collect();
                if !numbers.is_empty() {
                    toks[numbers[i % numbers.len()]] = number.to_string();
                }
            }
        }
    }
    toks.concat()
}

fn check_text(text: String) {
    let mut sources = Sources::new();
    let file = sources.add("fuzz.fmoe", text);
    let analysis = analyse(
        &mut sources,
        file,
        &Default::default(),
        Rules {
            data_files: true,
            ..Rules::AS_WRITTEN
        },
    );
    assert_eq!(analysis.checked.is_some(), analysis.errors == 0);
    assert_eq!(analysis.plan.is_some(), analysis.errors == 0);
    if let Some(plan) = &analysis.plan {
        assert_true_figures(plan);
    }
    let diags = analysis.diagnostics;
    // Rendering must not panic either, whatever the spans.
    let _ = render_human(&sources, &diags);
    let _ = render_json(&sources, &diags);
}

/// A plan that checks clean prints figures, not wrapped or saturated counts: times finite
/// and non-negative, memory the sum of its parts and within the GPU's.
fn assert_true_figures(plan: &fmoec::plan::ParallelPlan) {
    let t = &plan.time;
    for x in [
        t.step_s,
        t.bubble_fraction,
        t.tokens_per_s,
        t.peak_tflops,
        t.mfu,
    ] {
        assert!(x.is_finite() && x >= 0.0, "{t:?}");
    }
    for stage in &plan.stages {
        let (time, memory) = (&stage.cost.time, &stage.cost.memory);
        for x in [
            time.compute_s,
            time.tensor_s,
            time.all_to_all_s,
            time.pipeline_s,
            time.micro_batch_s,
            time.gradient_sync_s,
        ] {
            assert!(x.is_finite() && x >= 0.0, "{time:?}");
        }
        let parts: u128 = memory.parts().iter().map(|&(_, b)| u128::from(b)).sum();
        assert_eq!(u128::from(memory.total), parts, "{memory:?}");
        assert!(memory.total <= memory.capacity, "{memory:?}");
    }
}

/// Models that break the front end's rules but are still built go on to the planner
/// (memory and costs included): shapes no checked model has must not make it panic.
#[test]
fn models_with_broken_rules_are_planned_without_a_panic() {
    let model = |fields: &str, layer: &str| {
        format!(
            "use std.gates.*\nmodel m {{\n    {fields}\n    block = transformer(attention = \
             causal(), ffn = mlp(hidden = 64))\n    {layer}\n}}\nparallel {{ gpus = 4; \
             tensor = 2 }}\ntrain {{ data = builtin(\"shakespeare\"); batch = 8 x 8 tokens; \
             steps = 2; optimizer = adamw(lr = 1e-3) }}\n"
        )
    };
    let fields = [
        "vocab = 256; context = 8; width = 2; heads = 4; depth = 2",
        "vocab = 256; context = 8; width = 30; heads = 4; depth = 2",
        "vocab = 256; context = 8; width = 32; heads = 4; kv_heads = 3; depth = 2",
        "vocab = 2; context = 4; width = 32; heads = 4; depth = 2",
    ];
    let layers = [
        "layers[1].ffn = moe(experts = 2, top_k = 3, expert = mlp(hidden = 2))",
        "layers[1].ffn = moe(experts = 1, gate = switch(), expert = mlp(hidden = 3))",
        "layers[0].ffn = moe(experts = 4, top_k = 1, gate = gshard(), expert = mlp(hidden = 1))",
        "",
    ];
    for f in fields {
        for l in layers {
            check_text(model(f, l));
        }
    }
}

// Each case checks a whole file against the whole stdlib (about 20 ms in a debug
// build), so the case counts keep the test at a couple of seconds.
proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_files_never_panic(
        which in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let corpus = corpus();
        let text = &corpus[which % corpus.len()];
        check_text(apply(tokens(text), &mutations));
    }

}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_text(String::from_utf8_lossy(&bytes).into_owned());
    }
}

/// Every number of the tiny example at zero, at 2^63 - 1 and at the largest float a file
/// writes in one (a capacity factor of 1e308 overflowed the planner's activation sum; the
/// random mutations rarely land on such a number).
#[test]
fn every_number_of_an_example_at_the_extremes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(dir.join("examples/tiny.fmoe")).unwrap();
    let toks = tokens(&text);
    let numbers = toks
        .iter()
        .filter(|t| t.starts_with(|c: char| c.is_ascii_digit()))
        .count();
    assert!(numbers > 20);
    for n in 0..numbers {
        for extreme in ["0", "9223372036854775807", "1e308"] {
            check_text(apply(toks.clone(), &[Mutation::Number(n, extreme)]));
        }
    }
}

#[test]
fn tokens_round_trip() {
    for text in corpus() {
        assert_eq!(tokens(&text).concat(), text);
    }
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    for depth in [100, 2000] {
        let open = "(".repeat(depth);
        let close = ")".repeat(depth);
        check_text(format!("const a = {open}1{close}\n"));
        check_text(format!("model m {{\n    width = {open}\n}}\n"));
        check_text(format!("const b = {}1\n", "-".repeat(depth)));
    }
}

/// The example files (and CI's model files beside them), with every gate and hardware
/// profile in scope (`use ... .*` beside a file's own imports is allowed), so that a mutant
/// may name any of them: the corpus of mutations meant to keep a file valid.
fn valid_corpus() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut texts = Vec::new();
    for sub in ["examples", ".ci"] {
        let mut paths: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "fmoe"))
            .collect();
        paths.sort();
        texts.extend(paths.iter().map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            format!("use std.gates.*\nuse std.hardware.*\n{text}")
        }));
    }
    texts
}

/// For a field name, values that keep its file well-formed (most keep it valid): the first
/// token after `NAME =` is replaced by one of them.
const VALID_VALUES: &[(&str, &[&str])] = &[
    ("experts", &["1", "2", "3", "4", "8", "16", "64"]),
    ("top_k", &["1", "2", "3", "4", "6"]),
    ("hidden", &["1", "7", "64", "3 * width", "width + 1"]),
    ("act", &["gelu", "relu", "swiglu"]),
    ("gate", &["naive", "noisy", "gshard", "switch", "swipe"]),
    ("precision", &["fp32", "fp16", "bf16"]),
    ("micro_batch", &["1", "2", "3", "8"]),
    ("depth", &["1", "2", "3", "7"]),
    ("kv_heads", &["1", "2", "4"]),
    ("norm", &["layernorm", "rmsnorm"]),
    ("positions", &["learned", "rotary"]),
    ("bias", &["true", "false"]),
    ("tied_embeddings", &["true", "false"]),
    ("steps", &["1", "9223372036854775807"]),
    ("lr", &["1e-300", "1e300"]),
    ("dir", &["\"it's a `dir` $HOME \\\"q\\\" ü\"", "\"\""]),
];

/// Layer selections of the MoE layers.
const VALID_SELECTIONS: &[&str] = &[
    "0..depth",
    "1..depth step 2",
    "0",
    "depth - 1",
    "0, 2",
    "1..depth step 3",
];

/// Odd but legal model names (Python and shell words among them) and doc comments.
const ODD_NAMES: &[&str] = &["class", "None", "_", "import", "fmoec_moe", "self", "EOF"];
const ODD_DOCS: &[&str] = &["ünïcødé ✓ 数学 \"\"\" ''' \\ {{ v.world }} {% if %} $(x) `x`"];

#[derive(Clone, Debug)]
enum ValidMutation {
    /// Field `VALID_VALUES[field]`'s n-th occurrence gets its `value`-th value.
    Field(usize, usize, usize),
    /// The `parallel` block replaced: gpus, tensor, pipeline, the expert group and its extra
    /// line, picked by index.
    Parallel(usize, usize, usize, usize, usize),
    /// The n-th layer selection replaced.
    Selection(usize, usize),
    /// An override of layer 0 with another MoE layer (or a dense one).
    Override(usize),
    /// The model renamed.
    Name(usize),
    /// A doc comment before the model.
    Doc(usize),
    /// The `train` block removed.
    NoTrain,
}

fn valid_mutation() -> impl Strategy<Value = ValidMutation> {
    prop_oneof![
        (0..VALID_VALUES.len(), any::<usize>(), any::<usize>())
            .prop_map(|(f, v, n)| ValidMutation::Field(f, v, n)),
        (0..5usize, 0..4usize, 0..3usize, 0..5usize, 0..5usize)
            .prop_map(|(g, t, p, e, x)| ValidMutation::Parallel(g, t, p, e, x)),
        (0..VALID_SELECTIONS.len(), any::<usize>())
            .prop_map(|(s, n)| ValidMutation::Selection(s, n)),
        (0..3usize).prop_map(ValidMutation::Override),
        (0..ODD_NAMES.len()).prop_map(ValidMutation::Name),
        (0..ODD_DOCS.len()).prop_map(ValidMutation::Doc),
        Just(ValidMutation::NoTrain),
    ]
}

/// The index of the next token from `from` on that is not whitespace.
fn next_word(toks: &[String], from: usize) -> Option<usize> {
    (from..toks.len()).find(|&k| !toks[k].trim().is_empty())
}

/// The index of the token closing the bracket opened at `open`.
fn closing(toks: &[String], open: usize) -> Option<usize> {
    let (o, c) = match toks[open].as_str() {
        "{" => ("{", "}"),
        "[" => ("[", "]"),
        _ => return None,
    };
    let mut depth = 0;
    for (k, t) in toks.iter().enumerate().skip(open) {
        if t == o {
            depth += 1;
        } else if t == c {
            depth -= 1;
            if depth == 0 {
                return Some(k);
            }
        }
    }
    None
}

fn apply_valid(text: &str, mutations: &[ValidMutation]) -> String {
    let mut toks = tokens(text);
    for m in mutations {
        match m {
            ValidMutation::Field(f, v, n) => {
                let (name, values) = VALID_VALUES[*f];
                let places: Vec<usize> = (0..toks.len())
                    .filter(|&k| toks[k] == name)
                    .filter_map(|k| {
                        let eq = next_word(&toks, k + 1).filter(|&e| toks[e] == "=")?;
                        next_word(&toks, eq + 1)
                    })
                    .collect();
                if !places.is_empty() {
                    toks[places[n % places.len()]] = values[v % values.len()].to_string();
                }
            }
            ValidMutation::Parallel(g, t, p, e, x) => {
                if let Some(start) = (0..toks.len()).find(|&k| {
                    toks[k] == "parallel" && next_word(&toks, k + 1).is_some_and(|b| toks[b] == "{")
                }) {
                    let open = next_word(&toks, start + 1).unwrap();
                    if let Some(end) = closing(&toks, open) {
                        toks.drain(start..=end);
                    }
                }
                let gpus = [1, 2, 4, 8, 16][*g];
                let group = [
                    "across data",
                    "replicated",
                    "groups_of(1)",
                    "groups_of(2)",
                    "groups_of(4)",
                ][*e];
                let extra = [
                    "",
                    "expert_slicing = true",
                    "expert_slicing = false",
                    "micro_batch = 1",
                    "micro_batch = 3",
                ][*x];
                toks.push(format!(
                    "\nparallel {{\n    gpus = {gpus} of h100_sxm\n    tensor = {}\n    \
                     pipeline = {}\n    experts = {group}\n    {extra}\n}}\n",
                    [1, 2, 4, 8][*t],
                    [1, 2, 4][*p]
                ));
            }
            ValidMutation::Selection(s, n) => {
                let places: Vec<usize> = (0..toks.len())
                    .filter(|&k| toks[k] == "layers" && toks.get(k + 1).is_some_and(|b| b == "["))
                    .collect();
                if !places.is_empty() {
                    let open = places[n % places.len()] + 1;
                    if let Some(close) = closing(&toks, open) {
                        toks.splice(open + 1..close, [VALID_SELECTIONS[*s].to_string()]);
                    }
                }
            }
            ValidMutation::Override(o) => {
                let layer = [
                    "override layers[0].ffn = moe(experts = 4, top_k = 1, gate = switch(), \
                     expert = mlp(hidden = 64))",
                    "override layers[0].ffn = mlp(hidden = 4 * width)",
                    "override layers[0].ffn = moe(experts = 8, expert = mlp(hidden = 32), \
                     shared = shared_experts(expert = mlp(hidden = 32)))",
                ][*o];
                if let Some(k) = (0..toks.len()).find(|&k| toks[k] == "model") {
                    if let Some(open) = (k..toks.len()).find(|&b| toks[b] == "{") {
                        toks.insert(open + 1, format!("\n    {layer}\n"));
                    }
                }
            }
            ValidMutation::Name(i) => {
                if let Some(k) = (0..toks.len()).find(|&k| toks[k] == "model") {
                    if let Some(name) = next_word(&toks, k + 1) {
                        toks[name] = ODD_NAMES[*i].to_string();
                    }
                }
            }
            ValidMutation::Doc(i) => {
                if let Some(k) = (0..toks.len()).find(|&k| toks[k] == "model") {
                    toks.insert(k, format!("/// {}\n", ODD_DOCS[*i]));
                }
            }
            ValidMutation::NoTrain => {
                if let Some(start) = (0..toks.len()).find(|&k| {
                    toks[k] == "train" && next_word(&toks, k + 1).is_some_and(|b| toks[b] == "{")
                }) {
                    let open = next_word(&toks, start + 1).unwrap();
                    if let Some(end) = closing(&toks, open) {
                        toks.drain(start..=end);
                    }
                }
            }
        }
    }
    toks.concat()
}

/// A file that checks clean goes through what `fmoec emit --megatron T` runs for every target
/// T and runtime: no panic, and emit refuses it (with diagnostics) exactly where
/// `fmoec plan --megatron T` does; a refusal is the model's, never an internal error.
/// Returns whether the file checked clean.
fn emit_everywhere(text: String) -> bool {
    use fmoec::driver::Planning;
    use fmoec::emit::{self, EmitError, EmitOptions, Runtime};
    use fmoec::plan::{Overrides, TargetRules};
    let mut sources = Sources::new();
    let file = sources.add("fuzz.fmoe", text);
    let clean = analyse(&mut sources, file, &Default::default(), Rules::AS_WRITTEN);
    if clean.errors > 0 {
        return false;
    }
    let all = fmoec::check::megatron_targets();
    for target in emit::registry::targets().unwrap() {
        let rules = TargetRules::of(&target.decl);
        let analysis = analyse(
            &mut sources,
            file,
            &Default::default(),
            Rules {
                planning: Planning::For(&Overrides::NONE, &rules),
                ..Rules::AS_WRITTEN
            },
        );
        let (Some(checked), Some(plan)) = (analysis.checked, analysis.plan) else {
            assert!(analysis.errors > 0);
            continue;
        };
        for runtime in [Runtime::Fmoec, Runtime::Fastmoe] {
            let opts = EmitOptions {
                runtime,
                source_name: "fuzz\n.fmoe".into(),
                ..Default::default()
            };
            let emitted = emit::emit(&checked, &plan, &target, &opts);
            let name = match runtime {
                Runtime::Fmoec => "fmoec",
                Runtime::Fastmoe => "fastmoe",
            };
            if !target.decl.allows("runtimes", name) {
                assert!(matches!(emitted, Err(EmitError::Option(_))), "{emitted:?}");
                continue;
            }
            let planned = emit::validate(&checked, &plan, &target.decl, &all, runtime);
            let version = &target.decl.version;
            match (&planned, &emitted) {
                (Ok(_), Ok(e)) => assert!(!e.files.is_empty()),
                (Err(EmitError::Model(p)), Err(EmitError::Model(e))) => assert_eq!(p, e),
                _ => panic!("{version} {runtime:?}: plan {planned:?}, emit {emitted:?}"),
            }
        }
    }
    true
}

// Each case checks a file and, when it is clean, plans and emits it for every target (about
// 0.1 s in a debug build): the case count keeps the test at a few seconds.
proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn valid_mutants_emit_where_plan_accepts_them(
        which in any::<usize>(),
        mutations in prop::collection::vec(valid_mutation(), 1..5),
    ) {
        let corpus = valid_corpus();
        let text = &corpus[which % corpus.len()];
        emit_everywhere(apply_valid(text, &mutations));
    }
}

/// The valid mutations keep most files valid (else the test above would only check).
#[test]
fn valid_mutations_mostly_check_clean() {
    let corpus = valid_corpus();
    let mut clean = 0;
    let mut total = 0;
    for (i, text) in corpus.iter().enumerate() {
        let field = ValidMutation::Field(i % VALID_VALUES.len(), i, 0);
        total += 1;
        if emit_everywhere(apply_valid(text, &[field])) {
            clean += 1;
        }
    }
    assert!(clean * 2 > total, "{clean} of {total} clean");
}
