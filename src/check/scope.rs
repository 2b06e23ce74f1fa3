//! Modules and names: the embedded stdlib's modules, the user's file, `use` imports,
//! the prelude, and looking a name up from a module. Knows nothing about what the
//! named things mean (that is eval's and the rules' job).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::errors;
use super::signature::Signature;
use super::Checker;
use crate::diag::{did_you_mean, FileId, Span};
use crate::syntax::ast::{self, BlockKind, Item};

/// Index of a module in [`Checker::modules`].
pub type ModId = usize;

/// The stdlib modules, their pseudo file names and sources, in load order.
pub const STDLIB: &[(&str, &str)] = &[
    ("gates", include_str!("../../stdlib/gates.fmoe")),
    ("experts", include_str!("../../stdlib/experts.fmoe")),
    ("blocks", include_str!("../../stdlib/blocks.fmoe")),
    ("train", include_str!("../../stdlib/train.fmoe")),
    ("parallel", include_str!("../../stdlib/parallel.fmoe")),
    ("hardware", include_str!("../../stdlib/hardware.fmoe")),
    ("presets", include_str!("../../stdlib/presets.fmoe")),
    ("megatron", include_str!("../../stdlib/megatron.fmoe")),
];

/// Modules every file sees without a `use`.
pub const PRELUDE: &[&str] = &["experts", "blocks", "train", "parallel"];

#[derive(Clone, Debug)]
pub enum EntityKind {
    Const(Rc<ast::Const>),
    Def(Rc<ast::Def>),
    Ctor(Rc<Signature>),
    Block(Rc<ast::Block>),
}

impl EntityKind {
    pub fn describe(&self) -> &'static str {
        match self {
            EntityKind::Const(_) => "constant",
            EntityKind::Def(_) => "definition",
            EntityKind::Ctor(_) => "constructor",
            EntityKind::Block(b) => match b.kind {
                BlockKind::Model => "model",
                BlockKind::Hardware => "hardware profile",
                BlockKind::Megatron => "Megatron-LM target",
                BlockKind::Parallel | BlockKind::Train => "block",
            },
        }
    }
}

#[derive(Debug)]
pub struct Entity {
    pub kind: EntityKind,
    pub name_span: Span,
    pub used: Cell<bool>,
}

#[derive(Debug)]
pub struct Import {
    pub module: ModId,
    pub name: String,
    pub span: Span,
    pub used: Cell<bool>,
}

#[derive(Debug)]
pub struct Glob {
    pub module: ModId,
    pub span: Span,
    pub used: Cell<bool>,
    /// Prelude globs are implicit: never reported unused.
    pub implicit: bool,
}

#[derive(Debug)]
pub struct Module {
    /// `std.gates`, or the user's file name.
    pub path: String,
    pub file: FileId,
    pub is_std: bool,
    pub items: BTreeMap<String, Entity>,
    pub imports: BTreeMap<String, Import>,
    pub globs: Vec<Glob>,
    /// `parallel` and `train` blocks (they have no name).
    pub anon_blocks: Vec<Rc<ast::Block>>,
}

/// Where a name led.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub module: ModId,
    pub name: String,
    pub kind: EntityKind,
}

impl Checker<'_> {
    /// Registers the items of a parsed file as a module (imports are resolved later).
    pub(crate) fn add_module(&mut self, path: &str, file: FileId, is_std: bool, parsed: ast::File) {
        let mut items: BTreeMap<String, Entity> = BTreeMap::new();
        let mut anon_blocks = Vec::new();
        let mut uses = Vec::new();
        for item in parsed.items {
            let (name, kind) = match item {
                Item::Use(u) => {
                    uses.push(u);
                    continue;
                }
                Item::Const(c) => (c.name.clone(), EntityKind::Const(Rc::new(c))),
                Item::Def(d) => (d.name.clone(), EntityKind::Def(Rc::new(d))),
                Item::Builtin(b) => {
                    if !is_std {
                        self.sink.push(errors::constructor_outside_stdlib(b.span));
                        continue;
                    }
                    let id = self.modules.len();
                    let sig = self.signature(&b, id);
                    (b.name.clone(), EntityKind::Ctor(Rc::new(sig)))
                }
                Item::Block(b) => match b.name.clone() {
                    Some(name) => (name, EntityKind::Block(Rc::new(b))),
                    None => {
                        anon_blocks.push(Rc::new(b));
                        continue;
                    }
                },
            };
            self.declare(&mut items, &name, kind);
        }
        self.modules.push(Module {
            path: path.to_string(),
            file,
            is_std,
            items,
            imports: BTreeMap::new(),
            globs: Vec::new(),
            anon_blocks,
        });
        self.pending_uses.push((self.modules.len() - 1, uses));
    }

    /// Adds the item `name` to a module's `items`; a name declared twice is reported at the
    /// second, and the first stays.
    fn declare(
        &mut self,
        items: &mut BTreeMap<String, Entity>,
        name: &ast::Ident,
        kind: EntityKind,
    ) {
        if name.name.is_empty() {
            return;
        }
        if let Some(prev) = items.get(&name.name) {
            self.sink.push(errors::duplicate_item(
                name.span,
                &name.name,
                prev.name_span,
            ));
            return;
        }
        items.insert(
            name.name.clone(),
            Entity {
                kind,
                name_span: name.span,
                used: Cell::new(false),
            },
        );
    }

    /// Resolves every module's `use` items and adds the prelude.
    pub(crate) fn resolve_imports(&mut self) {
        let pending = std::mem::take(&mut self.pending_uses);
        for (m, uses) in pending {
            for p in PRELUDE {
                if let Some(target) = self.std_module(p) {
                    if target != m {
                        self.modules[m].globs.push(Glob {
                            module: target,
                            span: Span::default(),
                            used: Cell::new(false),
                            implicit: true,
                        });
                    }
                }
            }
            for u in uses {
                self.resolve_use(m, &u);
            }
        }
    }

    pub(crate) fn std_module(&self, name: &str) -> Option<ModId> {
        self.modules
            .iter()
            .position(|m| m.is_std && m.path == format!("std.{name}"))
    }

    /// Resolves one `use` of module `m`, in its phases: the stdlib module it names, then
    /// a glob of that module or one item of it.
    fn resolve_use(&mut self, m: ModId, u: &ast::Use) {
        let Some((target, module_name)) = self.used_module(u) else {
            return;
        };
        if u.glob {
            self.import_glob(m, u, target);
        } else {
            self.import_item(m, u, target, module_name);
        }
    }

    /// The stdlib module a `use` names, and its name as written: the path must start at
    /// `std`, name a stdlib module, and go at most one item deeper.
    fn used_module<'u>(&mut self, u: &'u ast::Use) -> Option<(ModId, &'u ast::Ident)> {
        let root = u.path.first()?;
        if root.name != "std" {
            self.sink
                .push(errors::import_not_std(root.span, &root.name));
            return None;
        }
        let Some(module_name) = u.path.get(1) else {
            self.sink.push(errors::import_needs_item(u.span, None));
            return None;
        };
        let Some(target) = self.std_module(&module_name.name) else {
            let names: Vec<&str> = STDLIB.iter().map(|(n, _)| *n).collect();
            self.sink.push(errors::unknown_module(
                module_name.span,
                &module_name.name,
                did_you_mean(&module_name.name, names),
            ));
            return None;
        };
        if u.path.len() > 3 {
            self.sink.push(errors::import_too_deep(u.path[3].span));
            return None;
        }
        Some((target, module_name))
    }

    /// `use std.gates.*`: every item of `target`, looked up after the module's own items
    /// and imports; the path must stop at the module.
    fn import_glob(&mut self, m: ModId, u: &ast::Use, target: ModId) {
        if u.path.len() != 2 {
            self.sink.push(errors::import_too_deep(u.span));
            return;
        }
        self.modules[m].globs.push(Glob {
            module: target,
            span: u.span,
            used: Cell::new(false),
            implicit: false,
        });
    }

    /// `use std.gates.gshard`: one item of `target` (named `module_name` in the path),
    /// which must exist there, not be imported twice, nor have the name of the module's
    /// own item.
    fn import_item(&mut self, m: ModId, u: &ast::Use, target: ModId, module_name: &ast::Ident) {
        let Some(item) = u.path.get(2) else {
            self.sink
                .push(errors::import_needs_item(u.span, Some(&module_name.name)));
            return;
        };
        if !self.modules[target].items.contains_key(&item.name) {
            let names: Vec<&str> = self.modules[target]
                .items
                .keys()
                .map(String::as_str)
                .collect();
            let help = did_you_mean(&item.name, names.iter().copied());
            self.sink.push(errors::unknown_import(
                item.span,
                &item.name,
                &format!("std.{}", module_name.name),
                help,
                &names,
            ));
            return;
        }
        if let Some(prev) = self.modules[m].imports.get(&item.name) {
            self.sink
                .push(errors::duplicate_import(item.span, &item.name, prev.span));
            return;
        }
        if let Some(own) = self.modules[m].items.get(&item.name) {
            self.sink.push(errors::import_shadows_item(
                item.span,
                &item.name,
                own.name_span,
            ));
            return;
        }
        self.modules[m].imports.insert(
            item.name.clone(),
            Import {
                module: target,
                name: item.name.clone(),
                span: u.span,
                used: Cell::new(false),
            },
        );
    }

    /// Looks `name` up from module `m`: its own items, its imports, then its globs (the
    /// prelude included). Marks what it finds as used.
    pub(crate) fn lookup(&self, m: ModId, name: &str) -> Option<Resolved> {
        let module = self.modules.get(m)?;
        if let Some(e) = module.items.get(name) {
            e.used.set(true);
            return Some(Resolved {
                module: m,
                name: name.to_string(),
                kind: e.kind.clone(),
            });
        }
        if let Some(i) = module.imports.get(name) {
            i.used.set(true);
            let e = self.modules[i.module].items.get(&i.name)?;
            e.used.set(true);
            return Some(Resolved {
                module: i.module,
                name: name.to_string(),
                kind: e.kind.clone(),
            });
        }
        for g in &module.globs {
            if let Some(e) = self.modules[g.module].items.get(name) {
                g.used.set(true);
                e.used.set(true);
                return Some(Resolved {
                    module: g.module,
                    name: name.to_string(),
                    kind: e.kind.clone(),
                });
            }
        }
        None
    }

    /// Every name visible from `m`, for "did you mean".
    pub(crate) fn visible_names(&self, m: ModId) -> Vec<String> {
        let Some(module) = self.modules.get(m) else {
            return Vec::new();
        };
        let mut names: Vec<String> = module.items.keys().cloned().collect();
        names.extend(module.imports.keys().cloned());
        for g in &module.globs {
            names.extend(self.modules[g.module].items.keys().cloned());
        }
        names
    }

    /// The names of the blocks of `kind` (models, hardware profiles) every module declares,
    /// module by module in load order: the presets and profiles a name may mean, for "did you
    /// mean" (the same walk was written for each).
    pub(crate) fn block_names(&self, kind: BlockKind) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(|m| {
                m.items.iter().filter_map(move |(n, e)| match &e.kind {
                    EntityKind::Block(b) if b.kind == kind => Some(n.clone()),
                    _ => None,
                })
            })
            .collect()
    }

    /// The stdlib module that defines `name` but is not imported into `m`, if any, for
    /// the help "add `use std.gates.gshard`".
    fn importable_from(&self, name: &str) -> Option<String> {
        self.modules
            .iter()
            .find(|md| md.is_std && md.items.contains_key(name))
            .map(|md| md.path.clone())
    }

    /// The help for a `name` that is not found: the `use` that imports it where a stdlib
    /// module has it, else the closest of `candidates` (asked for only then). One rule for
    /// unknown names, calls, presets and hardware profiles, which wrote it out each.
    pub(crate) fn not_found_help(
        &self,
        name: &str,
        candidates: impl FnOnce(&Self) -> Vec<String>,
    ) -> Option<String> {
        match self.importable_from(name) {
            Some(module) => Some(errors::add_use(name, &module)),
            None => did_you_mean(name, candidates(self).iter().map(String::as_str)),
        }
    }
}
