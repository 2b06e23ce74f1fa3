//! fmoec: a compiler for Mixture-of-Experts training.
//!
//! The pipeline has one module and one artifact per phase:
//!
//! ```text
//! source ─syntax─▶ Ast ─check─▶ Model ─graph─▶ ModelGraph ─plan─▶ ParallelPlan ─┬─▶ runtime (train)
//!                                                                              └─▶ emit (Megatron patch)
//! ```
//!
//! Later phases never look at source text; they keep [`diag::Span`]s only to report
//! diagnostics against the user's file.

pub mod check;
#[cfg(feature = "runtime")]
pub mod collective;
pub mod console;
pub mod data;
pub mod diag;
pub mod digest;
pub mod driver;
pub mod emit;
pub mod gates;
pub mod graph;
pub mod hf;
pub mod plan;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod settings;
pub mod syntax;
