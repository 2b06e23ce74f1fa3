//! `check`: from the syntax tree to a typed [`Checked`] model with no unresolved names.
//!
//! Owns name resolution (imports from the embedded stdlib, constants, definitions),
//! constant evaluation, constructor argument checking against stdlib signatures, and the
//! model rules. Knows nothing about parallel plans, runtimes or emitters beyond the
//! types it produces.

pub mod model;

pub use model::*;

use crate::diag::{Sink, Sources};

/// Parses and checks one source file already added to `sources`.
///
/// Every problem goes to `sink` (all of them, not just the first); the result is
/// `Some` only when there were no errors. Warnings may accompany a `Some`.
pub fn check_file(
    _sources: &mut Sources,
    _file: crate::diag::FileId,
    _sink: &mut Sink,
) -> Option<Checked> {
    // Filled in by the front end (syntax + check).
    None
}

/// The Megatron-LM releases declared in `stdlib/megatron.fmoe`.
pub fn megatron_targets() -> Vec<MegatronTarget> {
    Vec::new()
}

/// A hardware profile declared in `stdlib/hardware.fmoe`, by name (`"h100_sxm"`).
pub fn hardware_profile(_name: &str) -> Option<Hardware> {
    None
}
