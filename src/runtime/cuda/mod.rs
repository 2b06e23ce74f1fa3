//! The CUDA code of the runtime (feature `cuda`), in one room:
//!
//! - [`device`]: torch's current stream, the caching allocator's statistics and CUDA events,
//!   through the C++ shim (`src/runtime/shim`);
//! - [`kernels`]: the kernels' source (`kernels/*.cu`, embedded and compiled by NVRTC at run
//!   time), their typed ids and parameter lists, and the launch;
//! - [`ops`]: each kernel as a function of tensors, with the same function in libtorch ops
//!   wherever the kernel does not apply (CPU tensors, other dtypes, unaligned rows);
//! - [`autograd`]: the fused MoE glue and the LM loss as autograd functions through the shim
//!   (tch has none of its own), and the generic halves other modules build ops on;
//! - [`linear`]: the dense linear whose backward accumulates the weight and bias gradients
//!   straight into their f32 masters (for the cast copies of `runtime::cast`);
//! - [`check`]: the self-check of all of the above against a libtorch reference of its own.
//!
//! The fused glue replaces the gather into expert order, SwiGLU's `silu(a)·b`, the weighted
//! combine and the expert biases' epilogue with kernels that read every row once and need no
//! atomics; the dispatch plan's stable expert order and the capacity queue positions come
//! from three kernels instead of a sort.
//!
//! The pre-norm blocks' residual add and the LayerNorm/RMSNorm that reads it are one kernel
//! ([`add_norm_op`], `kernels/norm.cu`: `s = x + h`, `y = norm(s)`), with a one-pass
//! backward whose gain and bias gradients are reduced from per-block partial sums into the
//! f32 masters' `.grad` (libtorch's gain/bias reduction, `GammaBetaBackward`, was half of
//! LayerNorm's time in a GPT-2-medium-MoE step). `FMOEC_FUSED_NORM=0` keeps libtorch's add
//! and norm, for timing one against the other.
//!
//! Nothing in this folder imports the rest of the runtime: the MoE layer, the casts and the
//! trainer call in, never the other way.

pub mod autograd;
pub mod check;
pub mod device;
pub mod kernels;
pub mod linear;
pub mod ops;
pub mod quant;

pub use autograd::{
    add_norm_op, bias_act_op, cast_op, combine_op, cross_entropy_rows, dispatch_op, swiglu_op,
    NormWeight,
};
pub(crate) use device::shim_error;
pub use device::{current_stream, empty_cache, memory, reset_peak_memory, Event};
pub use kernels::{kernels_ready, warn_unavailable, EpilogueAct};
pub use ops::{expert_order, key_positions, plan_kernels_apply, RowOrder, PLAN_MAX_EXPERTS};
