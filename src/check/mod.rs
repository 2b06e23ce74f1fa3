//! `check`: from the syntax tree to a typed [`Checked`] model with no unresolved names.
//!
//! Owns name resolution (imports from the embedded stdlib, constants, definitions),
//! constant evaluation, constructor argument checking against stdlib signatures, and the
//! model rules. Knows nothing about parallel plans, runtimes or emitters beyond the
//! types it produces.
//!
//! One file per concern: [`scope`] (modules, imports, lookup), [`signature`]
//! (constructor declarations), [`eval`] (expressions and calls), [`fields`] (block
//! fields), [`model_rules`], [`parallel_rules`], [`train_rules`], [`targets`] (hardware
//! and Megatron targets), and [`errors`] (every diagnostic's wording and code).

pub mod errors;
pub mod eval;
pub mod fields;
pub mod model;
pub mod model_rules;
pub mod parallel_rules;
pub mod scope;
pub mod signature;
pub mod targets;
pub mod train_rules;
pub mod value;

pub use model::*;

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::OnceLock;

use crate::diag::{FileId, Sink, Sources, Span};
use crate::syntax::ast::{self, BlockKind};
use scope::{EntityKind, ModId, Module, STDLIB};
use value::V;

/// The state of one check: the modules loaded (stdlib and the user's file), memoised
/// constants, and the sink every rule reports to.
pub struct Checker<'a> {
    pub(crate) sink: &'a mut Sink,
    pub(crate) modules: Vec<Module>,
    pub(crate) pending_uses: Vec<(ModId, Vec<ast::Use>)>,
    pub(crate) const_memo: HashMap<(ModId, String), V>,
    pub(crate) const_active: HashSet<(ModId, String)>,
    pub(crate) call_depth: usize,
    /// The user's file had syntax errors: "no model" would only repeat them.
    pub(crate) syntax_errors: bool,
    /// Hardware profiles from the user's `fmoec.toml`, found after the file's and the
    /// stdlib's own.
    pub(crate) user_hardware: std::collections::BTreeMap<String, Hardware>,
    /// Each `hardware` block read once, by its span: a block is read where it is declared
    /// and again where `gpus = N of NAME` names it, and its errors must be reported once.
    pub(crate) hardware_read: HashMap<Span, Option<Hardware>>,
}

impl<'a> Checker<'a> {
    /// A checker with the embedded stdlib parsed and registered in `sources` under
    /// `<stdlib>/NAME.fmoe`.
    fn with_stdlib(sources: &mut Sources, sink: &'a mut Sink) -> Self {
        let mut c = Checker {
            sink,
            modules: Vec::new(),
            pending_uses: Vec::new(),
            const_memo: HashMap::new(),
            const_active: HashSet::new(),
            call_depth: 0,
            syntax_errors: false,
            user_hardware: Default::default(),
            hardware_read: HashMap::new(),
        };
        for (name, text) in STDLIB {
            let id = sources.add(format!("<stdlib>/{name}.fmoe"), *text);
            let parsed = crate::syntax::parse(text, id, c.sink);
            c.add_module(&format!("std.{name}"), id, true, parsed);
        }
        c
    }

    /// Checks every item of the user's module and returns what could be built of it,
    /// errors or not (see [`BestEffort`]). `errors_before`: the sink's error count before
    /// the user's file was parsed.
    ///
    /// In its phases: the named items (constants, hardware profiles, targets), the one
    /// model, the `parallel` and `train` blocks, then the warnings for what nothing used.
    fn check_user(&mut self, m: ModId, errors_before: usize) -> BestEffort {
        let models = self.check_named_items(m);
        let model = self.the_model(m, &models);
        let (parallel_block, train_block) = self.placement_blocks(m);
        let parallel = match &parallel_block {
            Some(b) => self.parallel(m, b),
            None => {
                let at = model
                    .as_ref()
                    .map(|md| md.spans.name)
                    .unwrap_or(self.file_start(m));
                self.default_parallel(at)
            }
        };
        let train = train_block
            .as_ref()
            .map(|b| self.train(m, b, model.as_ref(), parallel.as_ref()));
        // Where a check stopped early (an error), what it would have used is unknown:
        // "unused" would be a guess, and a wrong one sends the user after the wrong line.
        if self.sink.error_count() == errors_before {
            self.report_unused(m);
        }
        let complete = model.is_some() && parallel.is_some() && !matches!(train, Some(None));
        BestEffort {
            model,
            parallel,
            train: train.flatten(),
            complete,
        }
    }

    /// Where module `m`'s file starts: the place of a mistake about the whole file.
    fn file_start(&self, m: ModId) -> Span {
        Span::new(self.modules[m].file, 0, 0)
    }

    /// Checks the named items of module `m` in name order (constants, hardware profiles,
    /// Megatron targets) and returns its model blocks in file order, for [`Self::the_model`].
    fn check_named_items(&mut self, m: ModId) -> Vec<Rc<ast::Block>> {
        let items: Vec<(EntityKind, Span)> = self.modules[m]
            .items
            .values()
            .map(|e| (e.kind.clone(), e.name_span))
            .collect();
        let mut models = Vec::new();
        for (kind, span) in &items {
            match kind {
                EntityKind::Const(c) => {
                    self.const_value(m, c, *span);
                }
                EntityKind::Block(b) => match b.kind {
                    BlockKind::Model => models.push(b.clone()),
                    BlockKind::Hardware => {
                        self.hardware(m, b);
                    }
                    BlockKind::Megatron => {
                        self.megatron_target(m, b);
                    }
                    BlockKind::Parallel | BlockKind::Train => {}
                },
                EntityKind::Def(_) | EntityKind::Ctor(_) => {}
            }
        }
        models.sort_by_key(|b| b.span.start);
        models
    }

    /// The file's model, checked: a file must have exactly one. Without one it is an
    /// error (unless syntax errors explain it); each model after the first is an error, and
    /// none of them is checked then.
    fn the_model(&mut self, m: ModId, models: &[Rc<ast::Block>]) -> Option<Model> {
        match models {
            [] => {
                if !self.syntax_errors {
                    self.sink.push(errors::no_model(self.file_start(m)));
                }
                None
            }
            [only] => self.model(m, only),
            [first, rest @ ..] => {
                let name_or_kw =
                    |b: &ast::Block| b.name.as_ref().map(|n| n.span).unwrap_or(b.kw_span);
                for b in rest {
                    self.sink
                        .push(errors::second_model(name_or_kw(b), name_or_kw(first)));
                }
                None
            }
        }
    }

    /// The file's `parallel` and `train` blocks (each `None` where the file has none): the
    /// first of each kind; a second one is an error and is not checked.
    fn placement_blocks(&mut self, m: ModId) -> (Option<Rc<ast::Block>>, Option<Rc<ast::Block>>) {
        let anon = self.modules[m].anon_blocks.clone();
        let mut parallel_block: Option<Rc<ast::Block>> = None;
        let mut train_block: Option<Rc<ast::Block>> = None;
        for b in anon {
            let slot = if b.kind == BlockKind::Parallel {
                &mut parallel_block
            } else {
                &mut train_block
            };
            match slot {
                Some(first) => self.sink.push(errors::second_block(
                    b.kw_span,
                    b.kind.as_str(),
                    first.kw_span,
                )),
                None => *slot = Some(b),
            }
        }
        (parallel_block, train_block)
    }

    /// Warnings for the user's imports, constants and definitions that nothing used.
    fn report_unused(&mut self, m: ModId) {
        let module = &self.modules[m];
        let mut warnings = Vec::new();
        for (name, i) in &module.imports {
            if !i.used.get() {
                warnings.push(errors::unused_import(i.span, name));
            }
        }
        for g in &module.globs {
            if !g.implicit && !g.used.get() {
                warnings.push(errors::unused_glob(g.span));
            }
        }
        for (name, e) in &module.items {
            if e.used.get() {
                continue;
            }
            match &e.kind {
                EntityKind::Const(_) => {
                    warnings.push(errors::unused_item(e.name_span, "constant", name))
                }
                EntityKind::Def(_) => {
                    warnings.push(errors::unused_item(e.name_span, "definition", name))
                }
                _ => {}
            }
        }
        self.sink.extend(warnings);
    }

    /// Checks every item of every stdlib module (signatures' defaults, presets, hardware,
    /// targets); used by tests and by [`check_stdlib`].
    fn check_std_items(&mut self) {
        for m in 0..self.modules.len() {
            if !self.modules[m].is_std {
                continue;
            }
            let items: Vec<(EntityKind, Span)> = self.modules[m]
                .items
                .values()
                .map(|e| (e.kind.clone(), e.name_span))
                .collect();
            for (kind, span) in items {
                match kind {
                    EntityKind::Const(c) => {
                        self.const_value(m, &c, span);
                    }
                    EntityKind::Ctor(sig) => {
                        if sig.kind == "gate" && crate::gates::by_name(&sig.name).is_none() {
                            self.sink
                                .push(errors::unknown_gate(sig.name_span, &sig.name));
                        }
                        for p in &sig.params {
                            if let Some(d) = &p.default {
                                let ctx = eval::Ctx::module(m);
                                let v = self.eval(d, ctx);
                                let what = format!("default of `{}` of `{}`", p.name, sig.name);
                                self.conform(v, &p.ty, &what, ctx);
                            }
                        }
                    }
                    EntityKind::Block(b) => match b.kind {
                        BlockKind::Model => {
                            self.model(m, &b);
                        }
                        BlockKind::Hardware => {
                            self.hardware(m, &b);
                        }
                        BlockKind::Megatron => {
                            self.megatron_target(m, &b);
                        }
                        BlockKind::Parallel | BlockKind::Train => {}
                    },
                    EntityKind::Def(_) => {}
                }
            }
        }
    }
}

/// What the front end could build of a file, whether or not it found errors: the rules of
/// later phases (the planner's) run on it so that one `fmoec check` reports the mistakes of
/// every phase. Each block is here when it could be built, even where a rule about it
/// failed (the errors are in the sink). Never hand it to a back end: only [`check_file`]'s
/// result is checked.
#[derive(Clone, Debug)]
pub struct BestEffort {
    pub model: Option<Model>,
    /// The `parallel` block, or the single-GPU default of a file without one.
    pub parallel: Option<Parallel>,
    /// The `train` block; `None` also when the file has one that could not be built.
    pub train: Option<Train>,
    /// Every block the file declares was built (the model, the placement, and training
    /// when declared): plans of what is here describe the file.
    pub complete: bool,
}

impl BestEffort {
    /// The three blocks as one [`Checked`], when the model and its placement were built.
    pub fn checked(&self) -> Option<Checked> {
        Some(Checked {
            model: self.model.clone()?,
            parallel: self.parallel.clone()?,
            train: self.train.clone(),
        })
    }
}

/// Parses and checks one source file already added to `sources`.
///
/// Every problem goes to `sink` (all of them, not just the first); the result is
/// `Some` only when there were no errors. Warnings may accompany a `Some`.
pub fn check_file(sources: &mut Sources, file: FileId, sink: &mut Sink) -> Option<Checked> {
    check_file_with(sources, file, sink, &Default::default())
}

/// [`check_file`] with the user's own hardware profiles (from `fmoec.toml`), usable in
/// `gpus = N of NAME` like the stdlib's.
pub fn check_file_with(
    sources: &mut Sources,
    file: FileId,
    sink: &mut Sink,
    user_hardware: &std::collections::BTreeMap<String, Hardware>,
) -> Option<Checked> {
    let errors_before = sink.error_count();
    let best = check_file_best_effort(sources, file, sink, user_hardware);
    if sink.error_count() > errors_before {
        None
    } else {
        best.checked()
    }
}

/// Parses and checks one source file, reporting every problem to `sink`, and returns what
/// could be built of it even where there were errors (see [`BestEffort`]).
pub fn check_file_best_effort(
    sources: &mut Sources,
    file: FileId,
    sink: &mut Sink,
    user_hardware: &std::collections::BTreeMap<String, Hardware>,
) -> BestEffort {
    let text = sources.text(file).to_string();
    let name = sources.name(file).to_string();
    let mut checker = Checker::with_stdlib(sources, sink);
    checker.user_hardware = user_hardware.clone();
    let before_parse = checker.sink.error_count();
    let parsed = crate::syntax::parse(&text, file, checker.sink);
    checker.syntax_errors = checker.sink.error_count() > before_parse;
    checker.add_module(&name, file, false, parsed);
    checker.resolve_imports();
    let m = checker.modules.len() - 1;
    checker.check_user(m, before_parse)
}

/// Checks the embedded stdlib on its own: every signature, preset, hardware profile
/// and Megatron target. Diagnostics point into `<stdlib>/*.fmoe`.
pub fn check_stdlib(sources: &mut Sources, sink: &mut Sink) {
    let mut checker = Checker::with_stdlib(sources, sink);
    checker.resolve_imports();
    checker.check_std_items();
}

struct StdFacts {
    targets: Vec<MegatronTarget>,
    hardware: Vec<Hardware>,
    /// Each stdlib gate with every argument at its default.
    gates: Vec<Gate>,
}

fn std_facts() -> &'static StdFacts {
    static FACTS: OnceLock<StdFacts> = OnceLock::new();
    FACTS.get_or_init(|| {
        let mut sources = Sources::new();
        let mut sink = Sink::new();
        let mut checker = Checker::with_stdlib(&mut sources, &mut sink);
        checker.resolve_imports();
        let mut targets = Vec::new();
        let mut hardware = Vec::new();
        let mut gates = Vec::new();
        for m in 0..checker.modules.len() {
            let sigs: Vec<Rc<signature::Signature>> = checker.modules[m]
                .items
                .values()
                .filter_map(|e| match &e.kind {
                    EntityKind::Ctor(sig) if sig.kind == "gate" => Some(sig.clone()),
                    _ => None,
                })
                .collect();
            for sig in sigs {
                let Some(def) = crate::gates::by_name(&sig.name) else {
                    continue;
                };
                let call = checker.call_ctor(
                    &sig,
                    sig.name_span,
                    &[],
                    sig.name_span,
                    eval::Ctx::module(m),
                );
                if let Some(c) = model_rules::ctor_of(&call) {
                    gates.push(model_rules::gate_of(&c, def.kind));
                }
            }
            let blocks: Vec<Rc<ast::Block>> = checker.modules[m]
                .items
                .values()
                .filter_map(|e| match &e.kind {
                    EntityKind::Block(b) => Some(b.clone()),
                    _ => None,
                })
                .collect();
            for b in blocks {
                match b.kind {
                    BlockKind::Megatron => targets.extend(checker.megatron_target(m, &b)),
                    BlockKind::Hardware => hardware.extend(checker.hardware(m, &b)),
                    _ => {}
                }
            }
        }
        gates.sort_by_key(|g: &Gate| crate::gates::GATES.iter().position(|d| d.kind == g.kind));
        StdFacts {
            targets,
            hardware,
            gates,
        }
    })
}

/// The Megatron-LM releases declared in `stdlib/megatron.fmoe`.
pub fn megatron_targets() -> Vec<MegatronTarget> {
    std_facts().targets.clone()
}

/// Every gate of `stdlib/gates.fmoe` with its arguments at their defaults, in the order of
/// `gates::GATES` (the stdlib is the one home of the defaults).
pub fn gate_defaults() -> Vec<Gate> {
    std_facts().gates.clone()
}

/// A hardware profile declared in `stdlib/hardware.fmoe`, by name (`"h100_sxm"`).
pub fn hardware_profile(name: &str) -> Option<Hardware> {
    std_facts()
        .hardware
        .iter()
        .find(|h| h.name == name)
        .cloned()
}
