// fmoec's C++ shim over libtorch pieces that tch does not expose: the current CUDA stream
// of a device, the caching allocator's statistics, autograd Functions (one output, or
// several) whose forward and backward call back into Rust (tch has no custom autograd),
// CUDA graphs (capture of torch's work on a side stream, replay), and libtorch's
// multi-tensor kernels for the optimizer step (fused AdamW, one norm and one scaling over a
// list of gradients), and libtorch's profiler (Kineto) for `fmoec run --trace`. Built by
// build.rs (cc crate) with the `cuda` feature only, against torch's and CUDA's headers; it
// needs no nvcc and no GPU to build. It knows nothing about fmoec's model or what the
// callbacks compute. Every entry point that returns a status sets the thread's last error.
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <cstdint>
#include <exception>

namespace {
size_t aggregate() {
  return static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
}

// The Rust side: `phase` 0 is forward (`n_in` inputs, writes 1 output), 1 is backward (the
// `n_in` saved inputs and the output's gradient, writes one gradient per input, null where
// none). Inputs are owned copies (`new at::Tensor`) the callee frees; outputs are `new
// at::Tensor` the callee allocates (or null for an undefined tensor). Returns 0 on success.
typedef int (*fmoec_callback)(int64_t op, int phase, at::Tensor** in, int n_in,
                              at::Tensor** out, int n_out);

thread_local std::string last_error;

// Runs `f`: 0 when it returns, -1 with its message in last_error when it throws.
template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

at::Tensor take(at::Tensor* p) {
  if (p == nullptr) return at::Tensor();
  at::Tensor t = *p;
  delete p;
  return t;
}

struct RustFunction : public torch::autograd::Function<RustFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                            int64_t op, int64_t callback) {
    auto cb = reinterpret_cast<fmoec_callback>(callback);
    const int n = static_cast<int>(inputs.size());
    std::vector<at::Tensor*> in(n);
    for (int i = 0; i < n; ++i) in[i] = new at::Tensor(inputs[i]);
    at::Tensor* out[1] = {nullptr};
    if (cb(op, 0, in.data(), n, out, 1) != 0) {
      throw std::runtime_error("fmoec autograd op " + std::to_string(op) + ": forward failed");
    }
    ctx->save_for_backward(inputs.vec());
    ctx->saved_data["op"] = op;
    ctx->saved_data["callback"] = callback;
    return take(out[0]);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto op = ctx->saved_data["op"].toInt();
    auto cb = reinterpret_cast<fmoec_callback>(ctx->saved_data["callback"].toInt());
    const int n = static_cast<int>(saved.size());
    std::vector<at::Tensor*> in(n + 1);
    for (int i = 0; i < n; ++i) in[i] = new at::Tensor(saved[i]);
    in[n] = new at::Tensor(grads[0]);
    std::vector<at::Tensor*> out(n, nullptr);
    if (cb(op, 1, in.data(), n + 1, out.data(), n) != 0) {
      for (auto* p : out) delete p;
      throw std::runtime_error("fmoec autograd op " + std::to_string(op) + ": backward failed");
    }
    // one gradient per tensor input, then none for `op` and `callback`
    torch::autograd::variable_list result;
    result.reserve(n + 2);
    for (auto* p : out) result.push_back(take(p));
    result.push_back(at::Tensor());
    result.push_back(at::Tensor());
    return result;
  }
};

// RustFunction with `n_out` outputs. Forward writes `n_out` outputs and saves the inputs
// whose bit is set in `keep` (the others as undefined tensors: an input the backward does not
// read is not held alive for it) and every output. Backward passes the callback the `n_in`
// saved inputs, the `n_out` saved outputs and one gradient per output (undefined where none
// reached it: gradients are not made zeros), and takes one gradient per input.
struct RustFunctionMulti : public torch::autograd::Function<RustFunctionMulti> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList inputs, int64_t op,
                                                int64_t callback, int64_t n_out, int64_t keep) {
    ctx->set_materialize_grads(false);
    auto cb = reinterpret_cast<fmoec_callback>(callback);
    const int n = static_cast<int>(inputs.size());
    std::vector<at::Tensor*> in(n);
    for (int i = 0; i < n; ++i) in[i] = new at::Tensor(inputs[i]);
    std::vector<at::Tensor*> out(n_out, nullptr);
    if (cb(op, 0, in.data(), n, out.data(), static_cast<int>(n_out)) != 0) {
      for (auto* p : out) delete p;
      throw std::runtime_error("fmoec autograd op " + std::to_string(op) + ": forward failed");
    }
    torch::autograd::variable_list outputs;
    outputs.reserve(n_out);
    for (auto* p : out) outputs.push_back(take(p));
    std::vector<at::Tensor> saved;
    saved.reserve(n + n_out);
    for (int i = 0; i < n; ++i) {
      saved.push_back(i < 64 && ((keep >> i) & 1) ? inputs[i] : at::Tensor());
    }
    for (const auto& o : outputs) saved.push_back(o);
    ctx->save_for_backward(saved);
    ctx->saved_data["op"] = op;
    ctx->saved_data["callback"] = callback;
    ctx->saved_data["n_in"] = static_cast<int64_t>(n);
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto op = ctx->saved_data["op"].toInt();
    auto cb = reinterpret_cast<fmoec_callback>(ctx->saved_data["callback"].toInt());
    const int n = static_cast<int>(ctx->saved_data["n_in"].toInt());
    const int all = static_cast<int>(saved.size() + grads.size());
    std::vector<at::Tensor*> in(all);
    for (size_t i = 0; i < saved.size(); ++i) in[i] = new at::Tensor(saved[i]);
    for (size_t i = 0; i < grads.size(); ++i) in[saved.size() + i] = new at::Tensor(grads[i]);
    std::vector<at::Tensor*> out(n, nullptr);
    if (cb(op, 1, in.data(), all, out.data(), n) != 0) {
      for (auto* p : out) delete p;
      throw std::runtime_error("fmoec autograd op " + std::to_string(op) + ": backward failed");
    }
    // one gradient per tensor input, then none for `op`, `callback`, `n_out` and `keep`
    torch::autograd::variable_list result;
    result.reserve(n + 4);
    for (auto* p : out) result.push_back(take(p));
    for (int i = 0; i < 4; ++i) result.push_back(at::Tensor());
    return result;
  }
};
}  // namespace

extern "C" {

// Applies the Rust-backed autograd function `op` to the `n` tensors `inputs` (the callee
// keeps its own copies). On success returns 0 and a `new at::Tensor` in *out; on error -1
// and the message in fmoec_shim_last_error().
int fmoec_shim_apply(int64_t op, void* callback, at::Tensor** inputs, int n, at::Tensor** out) {
  return guarded([&] {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (int i = 0; i < n; ++i) list.push_back(*inputs[i]);
    at::Tensor r = RustFunction::apply(at::TensorList(list), op,
                                       reinterpret_cast<int64_t>(callback));
    *out = new at::Tensor(r);
  });
}

// fmoec_shim_apply for an op with `n_out` outputs (RustFunctionMulti: the inputs of bit set
// in `keep` and the outputs saved for the backward). On success returns 0 and `n_out` `new
// at::Tensor` in out[0..n_out]; on error -1 and the message in fmoec_shim_last_error().
int fmoec_shim_apply_multi(int64_t op, void* callback, at::Tensor** inputs, int n,
                           at::Tensor** out, int n_out, int64_t keep) {
  return guarded([&] {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (int i = 0; i < n; ++i) list.push_back(*inputs[i]);
    auto r = RustFunctionMulti::apply(at::TensorList(list), op,
                                      reinterpret_cast<int64_t>(callback),
                                      static_cast<int64_t>(n_out), keep);
    if (static_cast<int>(r.size()) != n_out) {
      throw std::runtime_error("fmoec autograd op " + std::to_string(op) + ": " +
                               std::to_string(r.size()) + " outputs for " +
                               std::to_string(n_out));
    }
    for (int i = 0; i < n_out; ++i) out[i] = new at::Tensor(r[i]);
  });
}

const char* fmoec_shim_last_error() { return last_error.c_str(); }

// The `cudaStream_t` torch's ops on `device` are issued to now; null on error.
void* fmoec_shim_current_stream(int device) {
  try {
    return static_cast<void*>(
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  } catch (const std::exception&) {
    return nullptr;
  }
}

// Peak and current bytes allocated through torch's caching allocator on `device` since the
// last reset; 0 on success, -1 on error.
int fmoec_shim_memory(int device, int64_t* peak, int64_t* current) {
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    *peak = stats.allocated_bytes[aggregate()].peak;
    *current = stats.allocated_bytes[aggregate()].current;
  });
}

// Resets the peak statistics of `device`; 0 on success, -1 on error.
int fmoec_shim_reset_peak(int device) {
  return guarded([&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

// Returns the allocator's unused cached blocks to the device; 0 on success, -1 on error.
int fmoec_shim_empty_cache() {
  return guarded([&] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

// Makes a stream from torch's pool the current stream of `device` on this thread (a CUDA
// graph is captured on a stream other than the default one, and work meant for a graph is
// best warmed up on the same stream). 0 on success, -1 on error.
int fmoec_shim_use_side_stream(int device) {
  return guarded([&] {
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::getCurrentCUDAStream(index).synchronize();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
  });
}

// Copies the CPU tensor `src` into `dst` (on a GPU, same shape and dtype) through pinned
// memory, on the current stream, without waiting for the device (a copy from pageable memory
// waits for the stream to drain). 0 on success, -1 on error.
int fmoec_shim_copy_from_host(at::Tensor* src, at::Tensor* dst) {
  return guarded([&] {
    dst->copy_(src->pin_memory(), /*non_blocking=*/true);
  });
}

// A new, empty CUDA graph (null on error).
void* fmoec_shim_graph_new() {
  try {
    return static_cast<void*>(new at::cuda::CUDAGraph());
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

// Starts capturing torch's work on the current stream into `graph`, with its own memory
// pool and torch's default (global) capture mode: a call that would synchronise the stream,
// from any thread, fails the capture instead of running. 0 on success, -1 on error.
int fmoec_shim_graph_begin(void* graph) {
  return guarded([&] {
    static_cast<at::cuda::CUDAGraph*>(graph)->capture_begin();
  });
}

// Ends the capture (also after a failed one, leaving the stream usable); 0 when the graph
// is ready to replay, -1 otherwise.
int fmoec_shim_graph_end(void* graph) {
  return guarded([&] {
    static_cast<at::cuda::CUDAGraph*>(graph)->capture_end();
  });
}

// Replays a captured graph on the current stream; 0 on success, -1 on error.
int fmoec_shim_graph_replay(void* graph) {
  return guarded([&] {
    static_cast<at::cuda::CUDAGraph*>(graph)->replay();
  });
}

// Frees a graph and returns its memory pool to the allocator.
void fmoec_shim_graph_free(void* graph) {
  try {
    delete static_cast<at::cuda::CUDAGraph*>(graph);
  } catch (...) {
  }
}

namespace {
std::vector<at::Tensor> list(at::Tensor** ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}
}  // namespace

// One AdamW step (decoupled weight decay, bias correction at `step`) over `n` parameters
// with their gradients and moments, all f32 on one device, with libtorch's fused kernel.
// 0 on success, -1 on error.
int fmoec_shim_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** m,
                           at::Tensor** v, int n, double step, double lr, double beta1,
                           double beta2, double weight_decay, double eps) {
  return guarded([&] {
    if (n == 0) return;
    auto p = list(params, n);
    auto steps = std::vector<at::Tensor>(
        n, at::full({}, step, p[0].options().dtype(at::kFloat)));
    at::_fused_adamw_(p, list(grads, n), list(m, n), list(v, n), {}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// The sum of squares of `n` tensors (an f32 scalar on their device, no host sync) in
// *out; 0 on success, -1 on error.
int fmoec_shim_sum_squares(at::Tensor** ts, int n, at::Tensor** out) {
  return guarded([&] {
    auto norms = at::_foreach_norm(list(ts, n), 2, at::kFloat);
    *out = new at::Tensor(at::stack(norms).square().sum());
  });
}

// Multiplies `n` tensors in place by the scalar tensor `by`; 0 on success, -1 on error.
int fmoec_shim_scale(at::Tensor** ts, int n, at::Tensor* by) {
  return guarded([&] {
    auto t = list(ts, n);
    at::_foreach_mul_(t, *by);
  });
}

namespace {
namespace kineto = torch::autograd::profiler;
namespace profiler = torch::profiler::impl;

profiler::ProfilerConfig trace_config() {
  return profiler::ProfilerConfig(profiler::ProfilerState::KINETO);
}

// The operators on the CPU, and with `cuda` the kernels, copies and memsets on the GPU.
std::set<profiler::ActivityType> trace_activities(int cuda) {
  std::set<profiler::ActivityType> a{profiler::ActivityType::CPU};
  if (cuda) a.insert(profiler::ActivityType::CUDA);
  return a;
}
}  // namespace

// Prepares libtorch's profiler (with `cuda`, CUPTI: before a CUDA graph is captured, so that
// the graph's kernels are recorded when it replays). 0 on success, -1 on error.
int fmoec_shim_trace_prepare(int cuda) {
  return guarded([&] { kineto::prepareProfiler(trace_config(), trace_activities(cuda)); });
}

// Starts recording; 0 on success, -1 on error.
int fmoec_shim_trace_start(int cuda) {
  return guarded([&] { kineto::enableProfiler(trace_config(), trace_activities(cuda)); });
}

// Stops recording and writes what was recorded to `path` as a Chrome trace; 0 on success,
// -1 on error.
int fmoec_shim_trace_stop(const char* path) {
  return guarded([&] {
    auto result = kineto::disableProfiler();
    if (!result) throw std::runtime_error("the profiler was not recording");
    result->save(path);
  });
}
}
