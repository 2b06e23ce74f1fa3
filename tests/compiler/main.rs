//! The compiler's integration tests in one binary: the language, the diagnostics (tests/ui),
//! `fmoec check`, `plan` and `emit` as a user runs them, the planner's numbers, snapshots of
//! plans and emitted files, the fuzzer, the emitted Python module under pytest and, when the
//! `FMOEC_MEGATRON_*` variables name them, the emitted patches against real Megatron trees.
//! Each module was once a test binary of its own; every one links libtorch, so they share
//! one (`cargo test --test compiler MODULE::`). Training in the runtime is tests/runtime's.
//!
//! Libtorch's generator is process-wide: a test that seeds or draws from it holds
//! `fmoec::runtime::model::lock_rng` (as the trainer does), since every module's tests run
//! on the threads of this one process.

mod cli_check;
mod emit_examples;
mod emit_megatron;
mod emit_python;
mod emit_snapshots;
mod examples;
mod fmoec_cli;
mod fuzz;
mod language;
mod plan_cli;
mod plan_costs;
mod plan_diagnostics;
mod plan_grid;
mod plan_megatron;
mod plan_params;
mod plan_settings;
mod plan_snapshots;
mod ui;

#[path = "../emit_fixture/mod.rs"]
mod emit_fixture;
#[path = "../plan_fixtures/mod.rs"]
mod plan_fixtures;
