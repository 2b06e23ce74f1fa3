//! The Megatron-LM targets: each a declaration in `stdlib/megatron.fmoe` (its tree, the files
//! it patches, its capabilities) joined with its template folder under `src/emit/templates/`
//! (its recorded `megatron.patch`, and the templates it writes differently from `shared/`).
//!
//! Adding a target is a declaration plus a folder: `build.rs` turns every folder into an
//! entry of [`FOLDERS`](generated::FOLDERS) with an askama template per emitted file, and
//! [`targets`] joins the two by the declaration's `templates` field.
//!
//! Owns finding a target by its version and `fmoec emit --megatron list`. Knows nothing about
//! models (`support` holds what a model asks of a target) or what the templates say.

use std::fmt::Write as _;

use super::megatron::ReleasePatch;
use super::view::TargetView;
use super::EmitError;
use crate::check::targets::{CapabilityValues, CAPABILITIES};
use crate::check::{self, Capability, MegatronTarget};

/// Renders one emitted file from the view.
pub(super) type Render = fn(&TargetView) -> askama::Result<String>;

/// One template folder, as `build.rs` found it.
pub(super) struct Folder {
    pub name: &'static str,
    /// `megatron.patch`, when the folder has one.
    pub patch: Option<&'static str>,
    pub module: Render,
    pub train: Render,
    pub readme: Render,
}

mod generated {
    use super::{Folder, TargetView};
    include!(concat!(env!("OUT_DIR"), "/emit_targets.rs"));
}

/// A declared target with its template folder and parsed patch.
pub struct Target {
    pub decl: MegatronTarget,
    pub(super) folder: &'static Folder,
    /// The recorded patch (`None`: the target patches nothing).
    pub patch: Option<ReleasePatch>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("decl", &self.decl)
            .field("folder", &self.folder.name)
            .finish()
    }
}

impl Target {
    /// `megatron-v2.2.patch`.
    pub fn patch_name(&self) -> String {
        format!("megatron-{}.patch", self.decl.version)
    }
}

/// Joins a declaration with its folder; an error says what is inconsistent (a bug in the
/// stdlib or the templates, which `every_target_is_a_declaration_plus_a_folder` in
/// `tests/compiler/emit_snapshots.rs` keeps from shipping).
fn join(decl: MegatronTarget) -> Result<Target, String> {
    let folder = generated::FOLDERS
        .iter()
        .find(|f| f.name == decl.templates)
        .ok_or_else(|| {
            format!(
                "target {} names the template folder `{}`, which src/emit/templates/ lacks",
                decl.version, decl.templates
            )
        })?;
    let patch = match folder.patch {
        Some(text) => Some(
            ReleasePatch::parse(text)
                .map_err(|e| format!("src/emit/templates/{}/megatron.patch, {e}", folder.name))?,
        ),
        None => None,
    };
    let in_patch: Vec<&str> = patch
        .iter()
        .flat_map(|p| p.files.iter().map(|f| f.path.as_str()))
        .collect();
    if in_patch != decl.patched_files {
        return Err(format!(
            "target {} declares patched_files {:?}, its patch changes {:?}",
            decl.version, decl.patched_files, in_patch
        ));
    }
    Ok(Target {
        decl,
        folder,
        patch,
    })
}

/// Every declared target with its folder, in declaration order.
pub fn targets() -> Result<Vec<Target>, String> {
    check::megatron_targets().into_iter().map(join).collect()
}

/// The versions of the declared targets.
pub fn versions() -> Vec<String> {
    check::megatron_targets()
        .into_iter()
        .map(|t| t.version)
        .collect()
}

/// Template folders no declaration names (a folder without a declaration is a mistake).
pub fn undeclared_folders() -> Vec<&'static str> {
    let declared = check::megatron_targets();
    generated::FOLDERS
        .iter()
        .map(|f| f.name)
        .filter(|n| !declared.iter().any(|t| t.templates == *n))
        .collect()
}

/// The target named `version` on the command line.
pub fn find(version: &str) -> Result<Target, EmitError> {
    let decl = check::megatron_targets()
        .into_iter()
        .find(|t| t.version == version)
        .ok_or_else(|| EmitError::UnknownRelease {
            version: version.to_string(),
            known: versions(),
        })?;
    join(decl).map_err(EmitError::Internal)
}

/// What `fmoec emit --megatron list` prints: every target, its tree and what it supports.
pub fn list() -> String {
    let mut out = String::new();
    for t in check::megatron_targets() {
        let _ = writeln!(
            out,
            "{}  Megatron-LM {}, tree {}, torch >= {}",
            t.version, t.version, t.tree, t.torch_min
        );
        // sorted, as each target's declaration may list them in any order
        let mut patched_files = t.patched_files.clone();
        patched_files.sort();
        let patches = if patched_files.is_empty() {
            "nothing".to_string()
        } else {
            patched_files.join(", ")
        };
        let _ = writeln!(out, "  patches        {patches}");
        for spec in CAPABILITIES {
            let value = match (t.capabilities.get(spec.field), spec.values) {
                (Some(Capability::Set(vs)), _) if vs.is_empty() => "none".to_string(),
                (Some(Capability::Set(vs)), _) => vs.join(", "),
                (Some(Capability::Flag(on)), CapabilityValues::Flag) => {
                    if *on { "yes" } else { "no" }.to_string()
                }
                _ => "?".to_string(),
            };
            let _ = writeln!(out, "  {:<22} {value:<40} {}", spec.field, spec.about);
        }
        out.push('\n');
    }
    out.push_str(
        "A model file that asks for a value a target does not list is refused for that target \
         (an error pointing at the file).\n",
    );
    out
}
