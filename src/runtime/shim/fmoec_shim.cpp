// fmoec's C++ shim over libtorch pieces that tch does not expose: the current CUDA stream
// of a device, the caching allocator's statistics, and one autograd Function whose forward
// and backward call back into Rust (tch has no custom autograd). Built by build.rs (cc
// crate) with the `cuda` feature only, against torch's and CUDA's headers; it needs no nvcc
// and no GPU to build. It knows nothing about fmoec's model or what the callbacks compute.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include <cstdint>
#include <exception>

namespace {
size_t aggregate() {
  return static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
}

// The Rust side: `phase` 0 is forward (4 inputs, writes 1 output), 1 is backward (the 4
// saved inputs and the output's gradient, writes 4 gradients, undefined where none).
// Inputs are owned copies (`new at::Tensor`) the callee frees; outputs are `new at::Tensor`
// the callee allocates (or null for an undefined tensor). Returns 0 on success.
typedef int (*fmoec_callback)(int64_t op, int phase, at::Tensor** in, int n_in,
                              at::Tensor** out, int n_out);

thread_local std::string last_error;

at::Tensor take(at::Tensor* p) {
  if (p == nullptr) return at::Tensor();
  at::Tensor t = *p;
  delete p;
  return t;
}

struct RustFunction : public torch::autograd::Function<RustFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& c, const at::Tensor& d,
                            int64_t op, int64_t callback) {
    auto cb = reinterpret_cast<fmoec_callback>(callback);
    at::Tensor* in[4] = {new at::Tensor(a), new at::Tensor(b), new at::Tensor(c),
                         new at::Tensor(d)};
    at::Tensor* out[1] = {nullptr};
    if (cb(op, 0, in, 4, out, 1) != 0) {
      throw std::runtime_error("fmoec fused op " + std::to_string(op) + ": forward failed");
    }
    ctx->save_for_backward({a, b, c, d});
    ctx->saved_data["op"] = op;
    ctx->saved_data["callback"] = callback;
    return take(out[0]);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto op = ctx->saved_data["op"].toInt();
    auto cb = reinterpret_cast<fmoec_callback>(ctx->saved_data["callback"].toInt());
    at::Tensor* in[5];
    for (int i = 0; i < 4; ++i) in[i] = new at::Tensor(saved[i]);
    in[4] = new at::Tensor(grads[0]);
    at::Tensor* out[4] = {nullptr, nullptr, nullptr, nullptr};
    if (cb(op, 1, in, 5, out, 4) != 0) {
      for (auto* p : out) delete p;
      throw std::runtime_error("fmoec fused op " + std::to_string(op) + ": backward failed");
    }
    return {take(out[0]), take(out[1]), take(out[2]), take(out[3]), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" {

// Applies the Rust-backed autograd function `op` to four tensors (pass undefined tensors
// for unused slots). On success returns 0 and a `new at::Tensor` in *out; on error -1 and
// the message in fmoec_shim_last_error().
int fmoec_shim_apply(int64_t op, void* callback, at::Tensor* a, at::Tensor* b, at::Tensor* c,
                     at::Tensor* d, at::Tensor** out) {
  try {
    at::Tensor r = RustFunction::apply(*a, *b, *c, *d, op, reinterpret_cast<int64_t>(callback));
    *out = new at::Tensor(r);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
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
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    *peak = stats.allocated_bytes[aggregate()].peak;
    *current = stats.allocated_bytes[aggregate()].current;
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// Resets the peak statistics of `device`; 0 on success, -1 on error.
int fmoec_shim_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// Returns the allocator's unused cached blocks to the device; 0 on success, -1 on error.
int fmoec_shim_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}
}
