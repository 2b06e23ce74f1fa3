//! The runtime's integration tests in one binary: the libtorch MoE layer and model, training
//! and checkpoints, tensor, pipeline and data parallelism on in-process ranks, the collective
//! layer and its self-check binary, and `fmoec data` / `fmoec export --hf` with the models they
//! feed. Each module was once a test binary of its own; every one links libtorch, so they share
//! one (`cargo test --test runtime MODULE::`). The compiler's tests are tests/compiler's.
//!
//! Libtorch's generator is process-wide and every module's tests run on the threads of this
//! one process: a test that seeds or draws from it holds `fmoec::runtime::model::lock_rng`,
//! the lock the trainer, sampling and the collective self-check take for their own draws.

#[cfg(feature = "runtime")]
mod collective_check;
#[cfg(feature = "runtime")]
mod collective_moe;
#[cfg(feature = "runtime")]
mod collective_ops;
#[cfg(feature = "runtime")]
mod collective_reshard;
// `fmoec data` runs without libtorch; only its modules that build models need the runtime.
mod data;
#[cfg(feature = "runtime")]
mod runtime_bf16;
#[cfg(feature = "runtime")]
mod runtime_data;
#[cfg(feature = "runtime")]
mod runtime_moe;
#[cfg(feature = "runtime")]
mod runtime_multi;
#[cfg(feature = "runtime")]
mod runtime_tensor;
#[cfg(feature = "runtime")]
mod runtime_train;

#[cfg(feature = "runtime")]
#[path = "../runtime_common/mod.rs"]
mod runtime_common;
