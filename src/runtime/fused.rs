//! CUDA-only pieces of the runtime (feature `cuda`): the C++ shim's current stream and
//! caching-allocator statistics, CUDA events on torch's current stream, and the fused MoE
//! glue kernels (compiled at run time with NVRTC, launched on torch's current stream) wrapped
//! as autograd functions through the shim.
//!
//! The fused ops replace the gather into expert order ([`dispatch_op`]), SwiGLU's `silu(a)·b`
//! ([`swiglu_op`], one pass forward and backward) and the weighted
//! combine ([`combine_op`]) with kernels that read every row once and need no atomics: the
//! combine gathers each token's `k` expert rows and sums them in f32, and its backward is a
//! gather (expert-row gradients) plus one dot product per slot (weight gradients); the
//! dispatch's backward is the same gather-sum. Dropped slots (`-1` in the index tensors) are
//! skipped, so rows the grouped matmul leaves uninitialised are never used. The expert
//! biases run as an epilogue ([`bias_act_op`]: bias plus GELU/ReLU in one pass, dropped rows
//! written as zero without using their input; backward one pass plus per-expert column
//! sums, [`segment_sums`]). The dispatch plan's stable expert order and the capacity queue
//! positions come from three kernels ([`expert_order`], [`key_positions`]: per-chunk counts,
//! a scan, a stable placement by warp-level matching) instead of a sort. [`cast_op`] hands a
//! weight's precomputed compute-dtype copy to autograd (for `runtime::cast`).
//!
//! Where a kernel does not apply (CPU tensors, dtypes other than bf16/f32, widths that are
//! not a multiple of 16 bytes) the callbacks compute the same function with libtorch ops, so
//! the autograd wiring is testable on a CPU. This module knows the MoE layer's index
//! conventions, not the layer, the model or the trainer.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys as cu;
use cudarc::runtime::sys as rt;
use tch::{Device, Kind, Tensor};

type Callback = unsafe extern "C" fn(
    op: i64,
    phase: c_int,
    inputs: *mut *mut c_void,
    n_in: c_int,
    outputs: *mut *mut c_void,
    n_out: c_int,
) -> c_int;

extern "C" {
    fn fmoec_shim_current_stream(device: c_int) -> *mut c_void;
    fn fmoec_shim_memory(device: c_int, peak: *mut i64, current: *mut i64) -> c_int;
    fn fmoec_shim_reset_peak(device: c_int) -> c_int;
    fn fmoec_shim_empty_cache() -> c_int;
    fn fmoec_shim_apply(
        op: i64,
        callback: *mut c_void,
        a: *mut c_void,
        b: *mut c_void,
        c: *mut c_void,
        d: *mut c_void,
        out: *mut *mut c_void,
    ) -> c_int;
    fn fmoec_shim_last_error() -> *const c_char;
}

/// The `cudaStream_t` libtorch issues work to on `device` now.
pub fn current_stream(device: usize) -> Result<*mut c_void> {
    // SAFETY: the shim catches every C++ exception and returns null instead.
    let s = unsafe { fmoec_shim_current_stream(device as c_int) };
    if s.is_null() && !tch::Cuda::is_available() {
        bail!("no CUDA device: no current stream");
    }
    Ok(s)
}

/// `(peak, current)` bytes allocated by torch's caching allocator on `device`.
pub fn memory(device: usize) -> Result<(i64, i64)> {
    let (mut peak, mut current) = (0i64, 0i64);
    // SAFETY: plain out-pointers; the shim catches exceptions.
    let rc = unsafe { fmoec_shim_memory(device as c_int, &mut peak, &mut current) };
    if rc != 0 {
        return Err(shim_error("reading torch's CUDA allocator statistics"));
    }
    Ok((peak, current))
}

/// Resets the allocator's peak statistics on `device` (after returning cached blocks).
pub fn reset_peak_memory(device: usize) -> Result<()> {
    empty_cache()?;
    // SAFETY: no arguments beyond the index; the shim catches exceptions.
    if unsafe { fmoec_shim_reset_peak(device as c_int) } != 0 {
        return Err(shim_error("resetting torch's CUDA allocator statistics"));
    }
    Ok(())
}

/// Returns the caching allocator's unused blocks to the device.
pub fn empty_cache() -> Result<()> {
    // SAFETY: no arguments; the shim catches exceptions.
    if unsafe { fmoec_shim_empty_cache() } != 0 {
        return Err(shim_error("emptying torch's CUDA allocator cache"));
    }
    Ok(())
}

/// An error saying `what` failed, with the message the shim kept for this thread.
pub(crate) fn shim_error(what: &str) -> anyhow::Error {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    let msg = unsafe { CStr::from_ptr(fmoec_shim_last_error()) }.to_string_lossy();
    anyhow!("{what}: {msg}")
}

fn rt_check(what: &str, e: rt::cudaError_t) -> Result<()> {
    if e != rt::cudaError::cudaSuccess {
        bail!("{what}: CUDA runtime error {e:?}");
    }
    Ok(())
}

/// A CUDA event recorded on torch's current stream.
pub struct Event(rt::cudaEvent_t);

impl Event {
    pub fn new() -> Result<Event> {
        let mut e = std::ptr::null_mut();
        // SAFETY: out-pointer to a fresh handle.
        rt_check("cudaEventCreate", unsafe { rt::cudaEventCreate(&mut e) })?;
        Ok(Event(e))
    }

    /// Records the event on `device`'s current torch stream.
    pub fn record(&self, device: usize) -> Result<()> {
        let s = current_stream(device)?;
        // SAFETY: a live event and a stream handle from torch.
        rt_check("cudaEventRecord", unsafe {
            rt::cudaEventRecord(self.0, s as rt::cudaStream_t)
        })
    }

    /// Milliseconds from `self` to `end` (waits for `end`).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        let mut ms = 0f32;
        // SAFETY: both events are live and recorded.
        unsafe {
            rt_check("cudaEventSynchronize", rt::cudaEventSynchronize(end.0))?;
            rt_check(
                "cudaEventElapsedTime",
                rt::cudaEventElapsedTime(&mut ms, self.0, end.0),
            )?;
        }
        Ok(ms as f64)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the handle is live and owned.
        unsafe {
            rt::cudaEventDestroy(self.0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kernels

/// The CUDA source compiled by NVRTC. bf16 is handled as raw 16-bit words (no cuda_bf16.h
/// needed at run time); every sum is in f32. `VEC` elements (16 bytes) per load.
const SOURCE: &str = r#"
typedef unsigned short bf16_t;
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const bf16_t* p) { return __uint_as_float(((unsigned)*p) << 16); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16_t* p, float v) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) { *p = 0x7fc0; return; }
  u += 0x7fffu + ((u >> 16) & 1u);
  *p = (bf16_t)(u >> 16);
}
template <typename T> struct __align__(16) Vec { static const int N = 16 / sizeof(T); T v[16 / sizeof(T)]; };
template <typename T> __device__ __forceinline__ void ldv(const T* p, float* out) {
  Vec<T> x = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = ld(&x.v[i]);
}
template <typename T> __device__ __forceinline__ void stv(T* p, const float* in) {
  Vec<T> x;
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) st(&x.v[i], in[i]);
  *reinterpret_cast<Vec<T>*>(p) = x;
}
#if __CUDA_ARCH__ >= 800
// eight bf16 in four conversions (round to nearest even, NaN kept), one 16-byte store
template <> __device__ __forceinline__ void stv<bf16_t>(bf16_t* p, const float* in) {
  uint4 w;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w.x) : "f"(in[1]), "f"(in[0]));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w.y) : "f"(in[3]), "f"(in[2]));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w.z) : "f"(in[5]), "f"(in[4]));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w.w) : "f"(in[7]), "f"(in[6]));
  *reinterpret_cast<uint4*>(p) = w;
}
#endif

// out[r] = scale[s] * src[s / k] for s = row_slot[r] >= 0, else 0. One warp per row, each
// lane keeping up to four 16-byte loads in flight.
template <typename T>
__device__ void gather_rows(const T* __restrict__ src, const long long* __restrict__ row_slot,
                            int k, const float* __restrict__ scale, T* __restrict__ out,
                            long long rows, int d) {
  const int N = Vec<T>::N;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (long long r = (long long)blockIdx.x * warps + (threadIdx.x >> 5); r < rows;
       r += (long long)gridDim.x * warps) {
    long long s = row_slot[r];
    float w = (s >= 0 && scale) ? scale[s] : 1.0f;
    const T* from = src + (s >= 0 ? (s / k) * (long long)d : 0);
    T* to = out + r * (long long)d;
    for (int c0 = lane * N; c0 < d; c0 += 4 * 32 * N) {
      float v[4][16 / sizeof(T)];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        int c = c0 + u * 32 * N;
        if (s >= 0 && c < d) {
          ldv(from + c, v[u]);
        } else {
#pragma unroll
          for (int i = 0; i < N; ++i) v[u][i] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        int c = c0 + u * 32 * N;
        if (c < d) {
#pragma unroll
          for (int i = 0; i < N; ++i) v[u][i] *= w;
          stv(to + c, v[u]);
        }
      }
    }
  }
}

// out[t] = sum_j weight[t k + j] * src[slot_row[t k + j]] over kept slots.
template <typename T>
__device__ void sum_rows(const T* src, const long long* slot_row, int k, const float* weight,
                         T* out, long long tokens, int d) {
  const int N = Vec<T>::N;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
      float acc[16 / sizeof(T)];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.0f;
      for (int j = 0; j < k; ++j) {
        long long r = slot_row[t * k + j];
        if (r < 0) continue;
        float w = weight ? weight[t * k + j] : 1.0f;
        float v[16 / sizeof(T)];
        ldv(src + r * (long long)d + c, v);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += w * v[i];
      }
      stv(out + t * (long long)d + c, acc);
    }
  }
}

// out[t k + j] = <a[slot_row[t k + j]], b[t]> over kept slots, 0 for dropped ones.
template <typename T>
__device__ void row_dots(const T* a, const long long* slot_row, int k, const T* b, float* out,
                         long long tokens, int d) {
  const int N = Vec<T>::N;
  __shared__ float part[32];
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int j = 0; j < k; ++j) {
      long long r = slot_row[t * k + j];
      float acc = 0.0f;
      if (r >= 0) {
        for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
          float x[16 / sizeof(T)], y[16 / sizeof(T)];
          ldv(a + r * (long long)d + c, x);
          ldv(b + t * (long long)d + c, y);
#pragma unroll
          for (int i = 0; i < N; ++i) acc += x[i] * y[i];
        }
      }
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
      __syncthreads();
      if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += part[w];
        out[t * k + j] = s;
      }
      __syncthreads();
    }
  }
}

// SwiGLU: out = silu(a) * b; backward ga = g * b * silu'(a), gb = g * silu(a). n % VEC == 0.
template <typename T>
__device__ void swiglu_fwd(const T* a, const T* b, T* out, long long n) {
  const int N = Vec<T>::N;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N; i < n;
       i += (long long)gridDim.x * blockDim.x * N) {
    float x[16 / sizeof(T)], y[16 / sizeof(T)];
    ldv(a + i, x);
    ldv(b + i, y);
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = x[j] / (1.0f + __expf(-x[j])) * y[j];
    stv(out + i, x);
  }
}
template <typename T>
__device__ void swiglu_bwd(const T* a, const T* b, const T* g, T* ga, T* gb, long long n) {
  const int N = Vec<T>::N;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N; i < n;
       i += (long long)gridDim.x * blockDim.x * N) {
    float x[16 / sizeof(T)], y[16 / sizeof(T)], z[16 / sizeof(T)], da[16 / sizeof(T)], db[16 / sizeof(T)];
    ldv(a + i, x);
    ldv(b + i, y);
    ldv(g + i, z);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float s = 1.0f / (1.0f + __expf(-x[j]));
      float silu = x[j] * s;
      db[j] = z[j] * silu;
      da[j] = z[j] * y[j] * s * (1.0f + x[j] * (1.0f - s));
    }
    stv(ga + i, da);
    stv(gb + i, db);
  }
}

// Activations of the epilogue: 0 none, 1 GELU (erf form), 2 ReLU (compile-time ACT).
template <int ACT> __device__ __forceinline__ float act_f(float x) {
  if (ACT == 1) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  if (ACT == 2) return x > 0.0f ? x : 0.0f;
  return x;
}
template <int ACT> __device__ __forceinline__ float act_d(float x) {
  if (ACT == 1)
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
           x * 0.39894228040143268f * __expf(-0.5f * x * x);
  if (ACT == 2) return x > 0.0f ? 1.0f : 0.0f;
  return 1.0f;
}

// Bias epilogue of a grouped matmul, rows in expert order: out[r] = act(h[r] + bias[e])
// with e = row_expert[r]; rows of dropped slots (e outside [0, E)) are written as zero
// (their `h` is loaded with the rest but never used: rows past the last group are
// allocated, uninitialised). Backward (g given): gh[r] = g[r] * act'(h[r] + bias[e]), zero
// for dropped rows. d % VEC == 0. Grid (rows, chunks of blockDim vectors): one 16-byte
// vector per thread, loaded before the row's expert is known; no index arithmetic beyond
// the row.
template <typename T, int ACT>
__device__ void bias_act(const T* __restrict__ h, const T* __restrict__ bias,
                         const long long* __restrict__ row_expert, int E,
                         const T* __restrict__ g, T* __restrict__ out, long long rows, int d) {
  const int N = Vec<T>::N;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * N;
  if (c >= d) return;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const long long at = r * d + c;
    float x[16 / sizeof(T)], z[16 / sizeof(T)];
    ldv(h + at, x);
    if (g) ldv(g + at, z);
    const long long e = row_expert[r];
    if (e >= 0 && e < E) {
      float b[16 / sizeof(T)];
      ldv(bias + e * d + c, b);
      if (g) {
#pragma unroll
        for (int j = 0; j < N; ++j) x[j] = z[j] * act_d<ACT>(x[j] + b[j]);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) x[j] = act_f<ACT>(x[j] + b[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) x[j] = 0.0f;
    }
    stv(out + at, x);
  }
}

// First row whose expert is >= e in the sorted row_expert.
__device__ __forceinline__ long long lower_row(const long long* row_expert, long long rows,
                                               long long e) {
  long long lo = 0, hi = rows;
  while (lo < hi) {
    long long mid = (lo + hi) >> 1;
    if (row_expert[mid] < e) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// out[e] = sum of g's rows of expert e (rows sorted by expert; dropped rows, expert E, last
// and never read). Grid (E, column chunks of 32 VEC), 256 threads: 8 row lanes x 32 column
// lanes, four rows in flight per thread, f32 sums, no atomics.
template <typename T>
__device__ void segment_sums(const T* __restrict__ g, const long long* __restrict__ row_expert,
                             T* __restrict__ out, long long rows, int d) {
  const int N = Vec<T>::N;
  __shared__ float part[8][32 * (16 / sizeof(T))];
  const long long e = blockIdx.x;
  const long long lo = lower_row(row_expert, rows, e), hi = lower_row(row_expert, rows, e + 1);
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int c = (blockIdx.y * 32 + lx) * N;
  float acc[16 / sizeof(T)];
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j] = 0.0f;
  if (c < d) {
    for (long long r = lo + ly; r < hi; r += 32) {
      float v[4][16 / sizeof(T)];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        long long rr = r + u * 8;
        if (rr < hi) {
          ldv(g + rr * d + c, v[u]);
        } else {
#pragma unroll
          for (int j = 0; j < N; ++j) v[u][j] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] += v[u][j];
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) part[ly][lx * N + j] = acc[j];
  __syncthreads();
  if (ly == 0 && c < d) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float s = 0.0f;
      for (int y = 0; y < 8; ++y) s += part[y][lx * N + j];
      acc[j] = s;
    }
    stv(out + e * d + c, acc);
  }
}

// ---- The expert order of the T·k slots (DispatchPlan) and capacity positions. Keys are
// the slots' experts, anything outside [0, E) being the dropped key E, sorted last. Three
// launches: per-chunk counts, one scan, then a stable placement per chunk (ranks within a
// warp by __match_any_sync, warps in order through shared per-warp counts).
__device__ __forceinline__ int plan_key(const long long* keys, long long s, int E) {
  long long e = keys[s];
  return (e >= 0 && e < E) ? (int)e : E;
}

extern "C" __global__ void plan_count(const long long* __restrict__ keys, long long n, int E,
                                      long long chunk, int* __restrict__ block_counts) {
  extern __shared__ int cnt[];
  const int B = E + 1;
  for (int j = threadIdx.x; j < B; j += blockDim.x) cnt[j] = 0;
  __syncthreads();
  const long long lo = (long long)blockIdx.x * chunk;
  const long long hi = min(n, lo + chunk);
  for (long long s = lo + threadIdx.x; s < hi; s += blockDim.x) atomicAdd(&cnt[plan_key(keys, s, E)], 1);
  __syncthreads();
  for (int j = threadIdx.x; j < B; j += blockDim.x) block_counts[(long long)blockIdx.x * B + j] = cnt[j];
}

// One block: totals per key, counts [E] (int64) and group ends [E] (int32), each key's first
// row key_start [E+1], and each chunk's first row per key block_start [nb][E+1].
extern "C" __global__ void plan_scan(const int* __restrict__ block_counts, int nb, int E,
                                     long long* __restrict__ counts, int* __restrict__ offsets,
                                     long long* __restrict__ key_start,
                                     int* __restrict__ block_start) {
  extern __shared__ int start[];
  const int B = E + 1;
  for (int j = threadIdx.x; j < B; j += blockDim.x) {
    int t = 0;
    for (int b = 0; b < nb; ++b) t += block_counts[b * B + j];
    start[j] = t;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int j = 0; j < B; ++j) {
      int t = start[j];
      start[j] = acc;
      key_start[j] = acc;
      acc += t;
      if (j < E) {
        counts[j] = t;
        offsets[j] = acc;
      }
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < B; j += blockDim.x) {
    int acc = start[j];
    for (int b = 0; b < nb; ++b) {
      block_start[b * B + j] = acc;
      acc += block_counts[b * B + j];
    }
  }
}

// Stable placement of chunk blockIdx.x: row = first row of its key in this chunk + the slots
// of that key before it. With `pos`, writes only each slot's position within its key
// (row - key_start[key]); otherwise the plan's index maps.
extern "C" __global__ void plan_place(const long long* __restrict__ keys, long long n, int k,
                                      int E, long long chunk,
                                      const int* __restrict__ block_start,
                                      const long long* __restrict__ key_start,
                                      long long* __restrict__ pos, long long* __restrict__ order,
                                      long long* __restrict__ token,
                                      long long* __restrict__ sorted_key,
                                      long long* __restrict__ row_slot,
                                      long long* __restrict__ slot_row) {
  extern __shared__ int sh[];
  const int B = E + 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int* running = sh;
  int* wc = sh + B;
  for (int j = threadIdx.x; j < B; j += blockDim.x)
    running[j] = block_start[(long long)blockIdx.x * B + j];
  const long long lo = (long long)blockIdx.x * chunk;
  const long long hi = min(n, lo + chunk);
  for (long long base = lo; base < hi; base += blockDim.x) {
    const long long s = base + threadIdx.x;
    const int key = s < hi ? plan_key(keys, s, E) : -1;
    for (int i = threadIdx.x; i < nw * B; i += blockDim.x) wc[i] = 0;
    __syncthreads();
    const unsigned same = __match_any_sync(0xffffffffu, key);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (key >= 0 && rank == 0) wc[warp * B + key] = __popc(same);
    __syncthreads();
    if (key >= 0) {
      int before = 0;
      for (int w = 0; w < warp; ++w) before += wc[w * B + key];
      const long long row = (long long)running[key] + before + rank;
      if (pos) {
        pos[s] = row - key_start[key];
      } else {
        const bool kept = key < E;
        order[row] = s;
        token[row] = s / k;
        sorted_key[row] = key;
        row_slot[row] = kept ? s : -1;
        slot_row[s] = kept ? row : -1;
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < B; j += blockDim.x) {
      int t = 0;
      for (int w = 0; w < nw; ++w) t += wc[w * B + j];
      running[j] += t;
    }
    __syncthreads();
  }
}

// ---- Cross-entropy of logits rows against target columns (the LM loss), reading the logits
// in their own dtype. Forward: one block per row, an online max and sum of exponentials ->
// lse[r] = log sum_j exp(x[r, j]) and loss[r] = lse[r] - x[r, target[r]] (0 where the target
// is outside [0, V)). Backward: grad[r, j] = (exp(x[r, j] - lse[r]) - [j == target[r]]) * g[r].
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == NEG_INF) return;
  s = s * __expf(m - M) + s2 * __expf(m2 - M);
  m = M;
}
template <typename T>
__device__ void xent_fwd(const T* __restrict__ logits, const long long* __restrict__ target,
                         float* __restrict__ loss, float* __restrict__ lse, long long rows, int V) {
  const int N = Vec<T>::N;
  __shared__ float wm[32], ws[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = logits + r * (long long)V;
    float m = NEG_INF, s = 0.0f;
    for (int c = threadIdx.x * N; c < V; c += blockDim.x * N) {
      float v[16 / sizeof(T)];
      ldv(x + c, v);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (v[i] > m) {
          s = s * __expf(m - v[i]) + 1.0f;
          m = v[i];
        } else if (v[i] != NEG_INF) {
          s += __expf(v[i] - m);
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_merge(m, s, m2, s2);
    }
    if (lane == 0) { wm[warp] = m; ws[warp] = s; }
    __syncthreads();
    if (warp == 0) {
      m = lane < nw ? wm[lane] : NEG_INF;
      s = lane < nw ? ws[lane] : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
      }
      if (lane == 0) {
        const float l = m + __logf(s);
        const long long t = target[r];
        lse[r] = l;
        loss[r] = (t >= 0 && t < V) ? l - ld(x + t) : 0.0f;
      }
    }
    __syncthreads();
  }
}
template <typename T>
__device__ void xent_bwd(const T* __restrict__ logits, const long long* __restrict__ target,
                         const float* __restrict__ lse, const float* __restrict__ g,
                         T* __restrict__ grad, long long rows, int V) {
  const int N = Vec<T>::N;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = logits + r * (long long)V;
    T* o = grad + r * (long long)V;
    const long long t = target[r];
    const float l = lse[r], gr = (t >= 0 && t < V) ? g[r] : 0.0f;
    for (int c = threadIdx.x * N; c < V; c += blockDim.x * N) {
      float v[16 / sizeof(T)];
      ldv(x + c, v);
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = (__expf(v[i] - l) - (c + i == t ? 1.0f : 0.0f)) * gr;
      stv(o + c, v);
    }
  }
}

#define INSTANCES(T, NAME) \
extern "C" __global__ void swiglu_fwd_##NAME(const T* a, const T* b, T* out, long long n) { \
    swiglu_fwd<T>(a, b, out, n); } \
extern "C" __global__ void swiglu_bwd_##NAME(const T* a, const T* b, const T* g, T* ga, T* gb, \
    long long n) { swiglu_bwd<T>(a, b, g, ga, gb, n); } \
extern "C" __global__ void gather_rows_##NAME(const T* src, const long long* row_slot, int k, \
    const float* scale, T* out, long long rows, int d) { gather_rows<T>(src, row_slot, k, scale, out, rows, d); } \
extern "C" __global__ void sum_rows_##NAME(const T* src, const long long* slot_row, int k, \
    const float* weight, T* out, long long tokens, int d) { sum_rows<T>(src, slot_row, k, weight, out, tokens, d); } \
extern "C" __global__ void row_dots_##NAME(const T* a, const long long* slot_row, int k, \
    const T* b, float* out, long long tokens, int d) { row_dots<T>(a, slot_row, k, b, out, tokens, d); } \
extern "C" __global__ void bias_act0_##NAME(const T* h, const T* bias, const long long* row_expert, \
    int E, const T* g, T* out, long long rows, int d) { bias_act<T, 0>(h, bias, row_expert, E, g, out, rows, d); } \
extern "C" __global__ void bias_act1_##NAME(const T* h, const T* bias, const long long* row_expert, \
    int E, const T* g, T* out, long long rows, int d) { bias_act<T, 1>(h, bias, row_expert, E, g, out, rows, d); } \
extern "C" __global__ void bias_act2_##NAME(const T* h, const T* bias, const long long* row_expert, \
    int E, const T* g, T* out, long long rows, int d) { bias_act<T, 2>(h, bias, row_expert, E, g, out, rows, d); } \
extern "C" __global__ void segment_sums_##NAME(const T* g, const long long* row_expert, T* out, \
    long long rows, int d) { segment_sums<T>(g, row_expert, out, rows, d); } \
extern "C" __global__ void xent_fwd_##NAME(const T* logits, const long long* target, float* loss, \
    float* lse, long long rows, int V) { xent_fwd<T>(logits, target, loss, lse, rows, V); } \
extern "C" __global__ void xent_bwd_##NAME(const T* logits, const long long* target, \
    const float* lse, const float* g, T* grad, long long rows, int V) { \
    xent_bwd<T>(logits, target, lse, g, grad, rows, V); }
INSTANCES(bf16_t, bf16)
INSTANCES(float, f32)
"#;

const KERNELS: [&str; 25] = [
    "plan_count",
    "plan_scan",
    "plan_place",
    "swiglu_fwd_bf16",
    "swiglu_bwd_bf16",
    "swiglu_fwd_f32",
    "swiglu_bwd_f32",
    "gather_rows_bf16",
    "sum_rows_bf16",
    "row_dots_bf16",
    "gather_rows_f32",
    "sum_rows_f32",
    "row_dots_f32",
    "bias_act0_bf16",
    "bias_act1_bf16",
    "bias_act2_bf16",
    "segment_sums_bf16",
    "bias_act0_f32",
    "bias_act1_f32",
    "bias_act2_f32",
    "segment_sums_f32",
    "xent_fwd_bf16",
    "xent_bwd_bf16",
    "xent_fwd_f32",
    "xent_bwd_f32",
];

struct Module {
    ctx: cu::CUcontext,
    functions: HashMap<&'static str, cu::CUfunction>,
}

// SAFETY: driver handles are process-wide and usable from any thread once the context is
// made current there (every launch does so).
unsafe impl Send for Module {}

fn cu_check(what: &str, r: cu::CUresult) -> Result<()> {
    if r != cu::CUresult::CUDA_SUCCESS {
        bail!("{what}: CUDA driver error {r:?}");
    }
    Ok(())
}

fn modules() -> &'static Mutex<HashMap<usize, std::result::Result<Module, String>>> {
    static M: OnceLock<Mutex<HashMap<usize, std::result::Result<Module, String>>>> =
        OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

fn compile(major: i32, minor: i32) -> Result<Vec<u8>> {
    use cudarc::nvrtc::result as nv;
    // SAFETY: dlopen of libnvrtc; no other preconditions.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("libnvrtc was not found (add the CUDA libraries, e.g. torch's nvidia/cu13/lib, to LD_LIBRARY_PATH)");
    }
    let src = CString::new(SOURCE)?;
    let name = CString::new("fmoec_fused.cu")?;
    let prog = nv::create_program(&src, Some(&name)).map_err(|e| anyhow!("nvrtc: {e:?}"))?;
    let opts = vec![
        format!("--gpu-architecture=compute_{major}{minor}"),
        "-std=c++17".to_string(),
        "--use_fast_math".to_string(),
    ];
    // SAFETY: `prog` is a live program handle, destroyed below.
    let result = unsafe { nv::compile_program(prog, &opts) };
    let out = match result {
        Ok(()) => unsafe { nv::get_ptx(prog) }
            .map(|p| p.into_iter().map(|c| c as u8).collect::<Vec<u8>>())
            .map_err(|e| anyhow!("nvrtc get_ptx: {e:?}")),
        Err(e) => {
            let log = unsafe { nv::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> = l.into_iter().map(|c| c as u8).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            Err(anyhow!("nvrtc compile failed: {e:?}\n{log}"))
        }
    };
    // SAFETY: destroyed once.
    unsafe {
        let _ = nv::destroy_program(prog);
    }
    out
}

fn load(device: usize) -> Result<Module> {
    // SAFETY: dlopen of libcuda; the calls below follow the driver API's contract.
    unsafe {
        if !cu::is_culib_present() {
            bail!("libcuda was not found");
        }
        cu_check("cuInit", cu::cuInit(0))?;
        let mut dev = 0;
        cu_check("cuDeviceGet", cu::cuDeviceGet(&mut dev, device as c_int))?;
        let mut ctx = std::ptr::null_mut();
        cu_check(
            "cuDevicePrimaryCtxRetain",
            cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
        )?;
        cu_check("cuCtxSetCurrent", cu::cuCtxSetCurrent(ctx))?;
        let (mut major, mut minor) = (0, 0);
        cu_check(
            "cuDeviceGetAttribute",
            cu::cuDeviceGetAttribute(
                &mut major,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                dev,
            ),
        )?;
        cu_check(
            "cuDeviceGetAttribute",
            cu::cuDeviceGetAttribute(
                &mut minor,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                dev,
            ),
        )?;
        let mut ptx = compile(major, minor)?;
        ptx.push(0);
        let mut module = std::ptr::null_mut();
        cu_check(
            "cuModuleLoadData",
            cu::cuModuleLoadData(&mut module, ptx.as_ptr() as *const c_void),
        )?;
        let mut functions = HashMap::new();
        for name in KERNELS {
            let cname = CString::new(name)?;
            let mut f = std::ptr::null_mut();
            cu_check(
                "cuModuleGetFunction",
                cu::cuModuleGetFunction(&mut f, module, cname.as_ptr()),
            )?;
            functions.insert(name, f);
        }
        Ok(Module { ctx, functions })
    }
}

/// Compiles and loads the kernels for `device` (once); the error says why they cannot run.
pub fn kernels_ready(device: usize) -> Result<()> {
    let mut m = modules()
        .lock()
        .map_err(|_| anyhow!("kernel cache poisoned"))?;
    let entry = m
        .entry(device)
        .or_insert_with(|| load(device).map_err(|e| format!("{e:#}")));
    match entry {
        Ok(_) => Ok(()),
        Err(e) => bail!("fused kernels unavailable on cuda:{device}: {e}"),
    }
}

/// Says once on stderr why the fused kernels cannot run (the libtorch path runs instead).
pub fn warn_unavailable(device: usize) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = kernels_ready(device) {
        WARNED.call_once(|| eprintln!("warning: {e:#}; using the libtorch path"));
    }
}

/// One kernel argument, passed by value.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(*mut c_void),
    Int(c_int),
    Long(i64),
}

/// A tensor's data pointer as a kernel argument (null for `None`).
fn arg(t: Option<&Tensor>) -> Arg {
    Arg::Ptr(t.map(|t| t.data_ptr()).unwrap_or(std::ptr::null_mut()))
}

/// Launches kernel `name` on `device`'s current torch stream: `blocks` blocks (x, capped
/// for grid-stride kernels) by `blocks_y`, `threads` threads each with `shared_bytes` of
/// dynamic shared memory.
fn launch(
    device: usize,
    name: &str,
    (blocks, blocks_y): (i64, u32),
    (threads, shared_bytes): (u32, u32),
    args: &[Arg],
) -> Result<()> {
    if blocks == 0 || blocks_y == 0 {
        return Ok(());
    }
    kernels_ready(device)?;
    let m = modules()
        .lock()
        .map_err(|_| anyhow!("kernel cache poisoned"))?;
    let module = match m.get(&device) {
        Some(Ok(module)) => module,
        _ => bail!("fused kernels not loaded on cuda:{device}"),
    };
    let f = *module
        .functions
        .get(name)
        .ok_or_else(|| anyhow!("no kernel {name}"))?;
    let stream = current_stream(device)?;
    let grid = blocks.min(1 << 20) as u32;
    let mut values = args.to_vec();
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(p) => p as *mut *mut c_void as *mut c_void,
            Arg::Int(i) => i as *mut c_int as *mut c_void,
            Arg::Long(l) => l as *mut i64 as *mut c_void,
        })
        .collect();
    // SAFETY: `params` point at live values matching the kernel's signature (`values` is not
    // moved until the call returns); the tensors they reference are contiguous, on
    // `device`, and outlive the launch (stream-ordered).
    unsafe {
        cu_check("cuCtxSetCurrent", cu::cuCtxSetCurrent(module.ctx))?;
        cu_check(
            name,
            cu::cuLaunchKernel(
                f,
                grid,
                blocks_y,
                1,
                threads,
                1,
                1,
                shared_bytes,
                stream as cu::CUstream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            ),
        )?;
    }
    Ok(())
}

/// Whether the kernels apply to `t` (CUDA, bf16 or f32, rows of a multiple of 16 bytes).
fn kernel_suffix(t: &Tensor) -> Option<&'static str> {
    if !t.device().is_cuda() {
        return None;
    }
    let (suffix, bytes) = match t.kind() {
        Kind::BFloat16 => ("bf16", 2),
        Kind::Float => ("f32", 4),
        _ => return None,
    };
    let d = *t.size().last()?;
    if (d * bytes) % 16 != 0 || (t.data_ptr() as usize) % 16 != 0 {
        return None;
    }
    Some(suffix)
}

fn device_index(t: &Tensor) -> usize {
    match t.device() {
        Device::Cuda(n) => n,
        _ => 0,
    }
}

/// Launches a row kernel of signature `(src, index, k, f32 weights or null, out, n, d)`
/// (`gather_rows_*`, `sum_rows_*`) writing `n` rows of `src`'s width, on `blocks` blocks.
fn launch_rows(
    kernel: &str,
    src: &Tensor,
    index: &Tensor,
    k: i64,
    weights: Option<&Tensor>,
    n: i64,
    blocks: i64,
) -> Result<Tensor> {
    let (_, d) = src.size2()?;
    let src = src.f_contiguous()?;
    let index = index.f_contiguous()?;
    let weights = weights
        .map(|w| w.f_to_kind(Kind::Float)?.f_contiguous())
        .transpose()?;
    let out = Tensor::f_empty([n, d], (src.kind(), src.device()))?;
    launch(
        device_index(&src),
        kernel,
        (blocks, 1),
        (128, 0),
        &[
            arg(Some(&src)),
            arg(Some(&index)),
            Arg::Int(k as c_int),
            arg(weights.as_ref()),
            arg(Some(&out)),
            Arg::Long(n),
            Arg::Int(d as c_int),
        ],
    )?;
    Ok(out)
}

/// `out[r] = scale[s] · src[s / k]` for `s = row_slot[r] ≥ 0`, zero rows elsewhere.
pub fn gather_rows(
    src: &Tensor,
    row_slot: &Tensor,
    k: i64,
    scale: Option<&Tensor>,
) -> Result<Tensor> {
    let rows = row_slot.size()[0];
    if let Some(suffix) = kernel_suffix(src) {
        // one warp per row, four rows per block
        let kernel = format!("gather_rows_{suffix}");
        return launch_rows(&kernel, src, row_slot, k, scale, rows, (rows + 3) / 4);
    }
    // libtorch reference: the same function
    let valid = row_slot.f_ge(0)?;
    let s = row_slot.f_clamp_min(0)?;
    let mut out = src.f_index_select(0, &s.f_div_scalar_mode(k, "floor")?)?;
    if let Some(scale) = scale {
        let w = scale
            .f_reshape([-1])?
            .f_index_select(0, &s)?
            .f_to_kind(src.kind())?;
        out = out.f_mul(&w.f_unsqueeze(1)?)?;
    }
    Ok(out.f_where_self(&valid.f_unsqueeze(1)?, &out.f_zeros_like()?)?)
}

/// `out[t] = Σ_j weight[t·k+j] · src[slot_row[t·k+j]]` over kept slots (`[T, d]`).
pub fn sum_rows(
    src: &Tensor,
    slot_row: &Tensor,
    k: i64,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, d) = src.size2()?;
    let tokens = slot_row.size()[0] / k;
    if let Some(suffix) = kernel_suffix(src) {
        // one block per token
        let kernel = format!("sum_rows_{suffix}");
        return launch_rows(&kernel, src, slot_row, k, weight, tokens, tokens);
    }
    let valid = slot_row.f_ge(0)?;
    let rows = src.f_index_select(0, &slot_row.f_clamp_min(0)?)?; // [T·k, d]
    let mut w = valid.f_to_kind(Kind::Float)?;
    if let Some(weight) = weight {
        w = w.f_mul(&weight.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
    }
    let w = w.f_to_kind(src.kind())?.f_reshape([tokens, 1, k])?;
    let rows = rows.f_where_self(&valid.f_unsqueeze(1)?, &rows.f_zeros_like()?)?;
    Ok(w.f_bmm(&rows.f_reshape([tokens, k, d])?)?
        .f_squeeze_dim(1)?)
}

/// `out[t·k+j] = ⟨a[slot_row[t·k+j]], b[t]⟩` (f32) over kept slots, zero for dropped ones.
pub fn row_dots(a: &Tensor, slot_row: &Tensor, k: i64, b: &Tensor) -> Result<Tensor> {
    let (_, d) = a.size2()?;
    let tokens = slot_row.size()[0] / k;
    if let (Some(suffix), true) = (kernel_suffix(a), a.kind() == b.kind()) {
        let a = a.f_contiguous()?;
        let b = b.f_contiguous()?;
        let idx = slot_row.f_contiguous()?;
        let out = Tensor::f_empty([tokens * k], (Kind::Float, a.device()))?;
        launch(
            device_index(&a),
            &format!("row_dots_{suffix}"),
            (tokens, 1),
            (128, 0),
            &[
                arg(Some(&a)),
                arg(Some(&idx)),
                Arg::Int(k as c_int),
                arg(Some(&b)),
                arg(Some(&out)),
                Arg::Long(tokens),
                Arg::Int(d as c_int),
            ],
        )?;
        return Ok(out);
    }
    let valid = slot_row.f_ge(0)?;
    let rows = a
        .f_index_select(0, &slot_row.f_clamp_min(0)?)?
        .f_to_kind(Kind::Float)?
        .f_reshape([tokens, k, d])?;
    let dots = rows
        .f_mul(&b.f_to_kind(Kind::Float)?.f_unsqueeze(1)?)?
        .f_sum_dim_intlist(2, false, Kind::Float)?
        .f_reshape([tokens * k])?;
    Ok(dots.f_where_self(&valid, &dots.f_zeros_like()?)?)
}

// ---------------------------------------------------------------------------------------
// Autograd functions through the shim

const OP_DISPATCH: i64 = 1;
const OP_COMBINE: i64 = 2;
const OP_SWIGLU: i64 = 3;
const OP_BIAS_ACT: i64 = 4;
const OP_CAST: i64 = 5;
const OP_XENT: i64 = 6;

/// Elements per 16-byte vector for a kernel's dtype suffix (`bf16` or `f32`).
fn vec_len(suffix: &str) -> i64 {
    if suffix == "bf16" {
        8
    } else {
        4
    }
}

/// Launches the grid-stride elementwise kernel `{name}_{suffix}` over `n` elements on
/// `like`'s device: blocks of 128 threads, one 16-byte vector per thread and iteration.
fn launch_elementwise(name: &str, suffix: &str, like: &Tensor, n: i64, args: &[Arg]) -> Result<()> {
    let blocks = ((n / vec_len(suffix) + 127) / 128).min(132 * 16);
    launch(
        device_index(like),
        &format!("{name}_{suffix}"),
        (blocks, 1),
        (128, 0),
        args,
    )
}

/// `silu(a) · b`, one pass (f32 inside).
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let (Some(suffix), true, true) = (
        kernel_suffix(a),
        kernel_suffix(b).is_some(),
        a.size() == b.size() && a.kind() == b.kind(),
    ) {
        let a = a.f_contiguous()?;
        let b = b.f_contiguous()?;
        let out = a.f_empty_like()?;
        let n = a.numel() as i64;
        launch_elementwise(
            "swiglu_fwd",
            suffix,
            &a,
            n,
            &[arg(Some(&a)), arg(Some(&b)), arg(Some(&out)), Arg::Long(n)],
        )?;
        return Ok(out);
    }
    Ok(a.f_silu()?.f_mul(b)?)
}

/// The gradients of `silu(a) · b` for the output gradient `g`: `(ga, gb)`, one pass.
pub fn swiglu_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    if let (Some(suffix), true, true) = (
        kernel_suffix(a),
        kernel_suffix(b).is_some() && kernel_suffix(g).is_some(),
        a.size() == b.size()
            && a.size() == g.size()
            && a.kind() == b.kind()
            && a.kind() == g.kind(),
    ) {
        let a = a.f_contiguous()?;
        let b = b.f_contiguous()?;
        let g = g.f_contiguous()?;
        let ga = a.f_empty_like()?;
        let gb = a.f_empty_like()?;
        let n = a.numel() as i64;
        launch_elementwise(
            "swiglu_bwd",
            suffix,
            &a,
            n,
            &[
                arg(Some(&a)),
                arg(Some(&b)),
                arg(Some(&g)),
                arg(Some(&ga)),
                arg(Some(&gb)),
                Arg::Long(n),
            ],
        )?;
        return Ok((ga, gb));
    }
    let s = a.f_sigmoid()?;
    let silu = a.f_mul(&s)?;
    let gb = g.f_mul(&silu)?;
    let ds = s.f_mul(&a.f_mul(&s.f_neg()?.f_add_scalar(1.0)?)?.f_add_scalar(1.0)?)?;
    let ga = g.f_mul(b)?.f_mul(&ds)?;
    Ok((ga, gb))
}

/// The most experts the plan kernels take (their shared memory holds 33·(E+1) ints).
pub const PLAN_MAX_EXPERTS: i64 = 256;
/// Slots per block of the plan kernels.
const PLAN_CHUNK: i64 = 4096;

/// Whether the plan kernels apply to `keys` (`[n]` int64 on a CUDA device, `e` experts);
/// `FMOEC_FUSED_PLAN=0` switches them off (the libtorch sort runs instead).
pub fn plan_kernels_apply(keys: &Tensor, e: i64) -> bool {
    keys.device().is_cuda()
        && keys.kind() == Kind::Int64
        && keys.dim() == 1
        && (1..=PLAN_MAX_EXPERTS).contains(&e)
        && keys.size()[0] < i32::MAX as i64
        && !std::env::var("FMOEC_FUSED_PLAN").is_ok_and(|v| v == "0")
}

/// A stable expert order of `n` slots, as [`crate::runtime::moe::DispatchPlan`] holds it.
pub struct RowOrder {
    /// Slot of each row (slots sorted by key, stable; dropped slots, key `E`, last).
    pub order: Tensor,
    /// `order / k`.
    pub token: Tensor,
    /// The key of each row (`E` for dropped slots).
    pub sorted_key: Tensor,
    /// Slot of each row, `-1` for dropped rows.
    pub row_slot: Tensor,
    /// Row of each slot, `-1` for dropped slots.
    pub slot_row: Tensor,
    /// Kept slots per expert, `[E]` int64.
    pub counts: Tensor,
    /// Group ends, `[E]` int32.
    pub offsets: Tensor,
}

/// Per-chunk counts and the scan: `(counts, offsets, key_start, block_start, chunks)`.
fn plan_counts(keys: &Tensor, e: i64) -> Result<(Tensor, Tensor, Tensor, Tensor, i64)> {
    let n = keys.size()[0];
    let (dev, di, b) = (keys.device(), device_index(keys), e + 1);
    let nb = ((n + PLAN_CHUNK - 1) / PLAN_CHUNK).max(1);
    let block_counts = Tensor::f_empty([nb, b], (Kind::Int, dev))?;
    launch(
        di,
        "plan_count",
        (nb, 1),
        (512, (b * 4) as u32),
        &[
            arg(Some(keys)),
            Arg::Long(n),
            Arg::Int(e as c_int),
            Arg::Long(PLAN_CHUNK),
            arg(Some(&block_counts)),
        ],
    )?;
    let counts = Tensor::f_empty([e], (Kind::Int64, dev))?;
    let offsets = Tensor::f_empty([e], (Kind::Int, dev))?;
    let key_start = Tensor::f_empty([b], (Kind::Int64, dev))?;
    let block_start = Tensor::f_empty([nb, b], (Kind::Int, dev))?;
    launch(
        di,
        "plan_scan",
        (1, 1),
        (1024, (b * 4) as u32),
        &[
            arg(Some(&block_counts)),
            Arg::Int(nb as c_int),
            Arg::Int(e as c_int),
            arg(Some(&counts)),
            arg(Some(&offsets)),
            arg(Some(&key_start)),
            arg(Some(&block_start)),
        ],
    )?;
    Ok((counts, offsets, key_start, block_start, nb))
}

/// The placement pass: positions within each key (`pos`) or the index maps (`maps`).
fn plan_place(
    keys: &Tensor,
    k: i64,
    e: i64,
    (key_start, block_start, nb): (&Tensor, &Tensor, i64),
    pos: Option<&Tensor>,
    maps: Option<[&Tensor; 5]>,
) -> Result<()> {
    let b = e + 1;
    let map = |i: usize| maps.map(|m| m[i]);
    launch(
        device_index(keys),
        "plan_place",
        (nb, 1),
        (1024, (33 * b * 4) as u32),
        &[
            arg(Some(keys)),
            Arg::Long(keys.size()[0]),
            Arg::Int(k as c_int),
            Arg::Int(e as c_int),
            Arg::Long(PLAN_CHUNK),
            arg(Some(block_start)),
            arg(Some(key_start)),
            arg(pos),
            arg(map(0)),
            arg(map(1)),
            arg(map(2)),
            arg(map(3)),
            arg(map(4)),
        ],
    )
}

/// The stable expert order of the slots `keys` (`[n]` int64, slot `s = token·k + j`, keys
/// outside `[0, e)` dropped) in three launches and no host synchronisation. The caller
/// checks [`plan_kernels_apply`].
pub fn expert_order(keys: &Tensor, k: i64, e: i64) -> Result<RowOrder> {
    let keys = keys.f_contiguous()?;
    let n = keys.size()[0];
    let (counts, offsets, key_start, block_start, nb) = plan_counts(&keys, e)?;
    let new = || Tensor::f_empty([n], (Kind::Int64, keys.device()));
    let (order, token, sorted_key, row_slot, slot_row) = (new()?, new()?, new()?, new()?, new()?);
    plan_place(
        &keys,
        k,
        e,
        (&key_start, &block_start, nb),
        None,
        Some([&order, &token, &sorted_key, &row_slot, &slot_row]),
    )?;
    Ok(RowOrder {
        order,
        token,
        sorted_key,
        row_slot,
        slot_row,
        counts,
        offsets,
    })
}

/// Each slot's position among the slots of its key before it (`[n]` int64; dropped slots
/// counted among themselves), for capacity limits. The caller checks [`plan_kernels_apply`].
pub fn key_positions(keys: &Tensor, e: i64) -> Result<Tensor> {
    let keys = keys.f_contiguous()?;
    let (_, _, key_start, block_start, nb) = plan_counts(&keys, e)?;
    let pos = Tensor::f_empty([keys.size()[0]], (Kind::Int64, keys.device()))?;
    plan_place(
        &keys,
        1,
        e,
        (&key_start, &block_start, nb),
        Some(&pos),
        None,
    )?;
    Ok(pos)
}

/// Activations of the bias epilogue ([`bias_act_op`]): none (bias only), GELU (erf form), ReLU.
pub const ACT_NONE: i64 = 0;
pub const ACT_GELU: i64 = 1;
pub const ACT_RELU: i64 = 2;

fn act_ref(x: &Tensor, act: i64) -> Result<Tensor> {
    Ok(match act {
        ACT_GELU => x.f_gelu("none")?,
        ACT_RELU => x.f_relu()?,
        _ => x.shallow_clone(),
    })
}

fn act_grad_ref(x: &Tensor, act: i64) -> Result<Tensor> {
    Ok(match act {
        ACT_GELU => {
            let cdf = x
                .f_mul_scalar(std::f64::consts::FRAC_1_SQRT_2)?
                .f_erf()?
                .f_add_scalar(1.0)?
                .f_mul_scalar(0.5)?;
            let pdf = x.f_square()?.f_mul_scalar(-0.5)?.f_exp()?.f_mul_scalar(
                0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2,
            )?;
            cdf.f_add(&x.f_mul(&pdf)?)?
        }
        ACT_RELU => x.f_gt(0.0)?.f_to_kind(x.kind())?,
        _ => x.f_ones_like()?,
    })
}

/// The rows of `row_expert` that are kept slots (`[N, 1]` bool) and their expert clamped
/// into `[0, E)` (for the libtorch reference paths).
fn kept_rows(row_expert: &Tensor, experts: i64) -> Result<(Tensor, Tensor)> {
    let valid = row_expert
        .f_ge(0)?
        .f_logical_and(&row_expert.f_lt(experts)?)?
        .f_unsqueeze(1)?;
    Ok((valid, row_expert.f_clamp(0, experts - 1)?))
}

/// The bias epilogue of a grouped matmul over rows in expert order:
/// `act(h[r] + bias[row_expert[r]])`, zero rows for dropped slots (`row_expert[r]` outside
/// `[0, E)`, whose `h` rows are not used). With `g`, the backward instead:
/// `g[r] · act'(h[r] + bias[e])`, zero for dropped rows. `bias` is `[E, d]` of `h`'s dtype.
fn bias_act_pass(
    h: &Tensor,
    bias: &Tensor,
    row_expert: &Tensor,
    act: i64,
    g: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, d) = h.size2()?;
    let experts = bias.size()[0];
    let same = |t: &Tensor| kernel_suffix(t).is_some() && t.kind() == h.kind() && t.size()[1] == d;
    if let (Some(suffix), true, true) = (
        kernel_suffix(h),
        same(bias),
        g.is_none_or(|g| same(g) && g.size()[0] == rows),
    ) {
        let h = h.f_contiguous()?;
        let bias = bias.f_contiguous()?;
        let g = g.map(|g| g.f_contiguous()).transpose()?;
        let idx = row_expert.f_contiguous()?;
        let out = h.f_empty_like()?;
        // a block of 128 threads per row and 128 vectors
        let per_block = 128 * vec_len(suffix);
        launch(
            device_index(&h),
            &format!("bias_act{act}_{suffix}"),
            (rows, ((d + per_block - 1) / per_block) as u32),
            (128, 0),
            &[
                arg(Some(&h)),
                arg(Some(&bias)),
                arg(Some(&idx)),
                Arg::Int(experts as c_int),
                arg(g.as_ref()),
                arg(Some(&out)),
                Arg::Long(rows),
                Arg::Int(d as c_int),
            ],
        )?;
        return Ok(out);
    }
    let (valid, idx) = kept_rows(row_expert, experts)?;
    let pre = h.f_add(&bias.f_index_select(0, &idx)?)?;
    let out = match g {
        None => act_ref(&pre, act)?,
        Some(g) => g.f_mul(&act_grad_ref(&pre, act)?)?,
    };
    Ok(out.f_where_self(&valid, &out.f_zeros_like()?)?)
}

/// `out[e] = Σ g[r]` over the rows `r` of expert `e` (`[E, d]`, f32 sums in `g`'s dtype);
/// `row_expert` is sorted (expert order) with dropped rows (`E`) last, never read.
pub fn segment_sums(g: &Tensor, row_expert: &Tensor, experts: i64) -> Result<Tensor> {
    let (rows, d) = g.size2()?;
    if let Some(suffix) = kernel_suffix(g) {
        let g = g.f_contiguous()?;
        let idx = row_expert.f_contiguous()?;
        let out = Tensor::f_empty([experts, d], (g.kind(), g.device()))?;
        launch(
            device_index(&g),
            &format!("segment_sums_{suffix}"),
            (experts, ((d / vec_len(suffix) + 31) / 32) as u32),
            (256, 0),
            &[
                arg(Some(&g)),
                arg(Some(&idx)),
                arg(Some(&out)),
                Arg::Long(rows),
                Arg::Int(d as c_int),
            ],
        )?;
        return Ok(out);
    }
    let (valid, idx) = kept_rows(row_expert, experts)?;
    let kept = g.f_where_self(&valid, &g.f_zeros_like()?)?;
    Ok(Tensor::f_zeros([experts, d], (g.kind(), g.device()))?.f_index_add(0, &idx, &kept)?)
}

fn run_op(op: i64, phase: c_int, inputs: Vec<Tensor>) -> Result<Vec<Option<Tensor>>> {
    let undefined = |t: &Tensor| !t.defined();
    match (op, phase) {
        // dispatch: a = x [T, d], b = row_slot [N], c = slot_row [T·k], d = k (as a tensor)
        (OP_DISPATCH, 0) => {
            let k = inputs[3].f_int64_value(&[])?;
            Ok(vec![Some(gather_rows(&inputs[0], &inputs[1], k, None)?)])
        }
        (OP_DISPATCH, 1) => {
            let k = inputs[3].f_int64_value(&[])?;
            let g = &inputs[4];
            let gx = if undefined(g) {
                None
            } else {
                Some(sum_rows(g, &inputs[2], k, None)?)
            };
            Ok(vec![gx, None, None, None])
        }
        // combine: a = ys [N, d], b = weight [T, k] f32, c = slot_row [T·k], d = row_slot [N]
        (OP_COMBINE, 0) => {
            let (ys, w, slot_row) = (&inputs[0], &inputs[1], &inputs[2]);
            let k = combine_k(&inputs)?;
            let w = w.f_to_kind(Kind::Float)?;
            Ok(vec![Some(sum_rows(ys, slot_row, k, Some(&w))?)])
        }
        (OP_COMBINE, 1) => {
            let k = combine_k(&inputs)?;
            let (ys, w, slot_row, row_slot, g) =
                (&inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4]);
            if undefined(g) {
                return Ok(vec![None, None, None, None]);
            }
            let g = g.f_to_kind(ys.kind())?;
            let gys = if ys.requires_grad() {
                Some(gather_rows(
                    &g,
                    row_slot,
                    k,
                    Some(&w.f_to_kind(Kind::Float)?),
                )?)
            } else {
                None
            };
            let gw = if w.requires_grad() {
                Some(
                    row_dots(ys, slot_row, k, &g)?
                        .f_to_kind(w.kind())?
                        .f_reshape(w.size())?,
                )
            } else {
                None
            };
            Ok(vec![gys, gw, None, None])
        }
        // swiglu: a = h1, b = h3
        (OP_SWIGLU, 0) => Ok(vec![Some(swiglu(&inputs[0], &inputs[1])?)]),
        (OP_SWIGLU, 1) => {
            if undefined(&inputs[4]) {
                return Ok(vec![None, None, None, None]);
            }
            let g = inputs[4].f_to_kind(inputs[0].kind())?;
            let (ga, gb) = swiglu_backward(&inputs[0], &inputs[1], &g)?;
            Ok(vec![Some(ga), Some(gb), None, None])
        }
        // bias epilogue: a = h [N, d], b = bias [E, d], c = row_expert [N], d = act (CPU)
        (OP_BIAS_ACT, 0) => {
            let act = inputs[3].f_int64_value(&[])?;
            let out = bias_act_pass(&inputs[0], &inputs[1], &inputs[2], act, None)?;
            Ok(vec![Some(out)])
        }
        (OP_BIAS_ACT, 1) => {
            let (h, bias, row_expert, g) = (&inputs[0], &inputs[1], &inputs[2], &inputs[4]);
            if undefined(g) {
                return Ok(vec![None, None, None, None]);
            }
            let act = inputs[3].f_int64_value(&[])?;
            let g = g.f_to_kind(h.kind())?;
            let gh = bias_act_pass(h, bias, row_expert, act, Some(&g))?;
            let gb = if bias.requires_grad() {
                Some(segment_sums(&gh, row_expert, bias.size()[0])?)
            } else {
                None
            };
            Ok(vec![h.requires_grad().then_some(gh), gb, None, None])
        }
        // cross-entropy: a = logits [N, V], b = target [N] int64, c = lse [N] f32 (written)
        (OP_XENT, 0) => Ok(vec![Some(xent_forward(
            &inputs[0], &inputs[1], &inputs[2],
        )?)]),
        (OP_XENT, 1) => {
            let g = &inputs[4];
            if undefined(g) {
                return Ok(vec![None, None, None, None]);
            }
            let grad = xent_backward(&inputs[0], &inputs[1], &inputs[2], g)?;
            Ok(vec![Some(grad), None, None, None])
        }
        // cast: a = master, b = its copy in the compute dtype (made by the caller)
        (OP_CAST, 0) => Ok(vec![Some(inputs[1].f_detach()?)]),
        (OP_CAST, 1) => {
            let (master, g) = (&inputs[0], &inputs[4]);
            if undefined(g) {
                return Ok(vec![None, None, None, None]);
            }
            // Add into the master's gradient in one pass (f32 += bf16) where it exists;
            // else hand autograd the converted gradient to start it.
            let mut acc = master.grad();
            if acc.defined() && acc.kind() == master.kind() && acc.size() == g.size() {
                let _ = acc.f_add_(g)?;
                return Ok(vec![None, None, None, None]);
            }
            Ok(vec![Some(g.f_to_kind(master.kind())?), None, None, None])
        }
        _ => bail!("unknown fused op {op} phase {phase}"),
    }
}

/// `k` of a combine: the weight's second dimension (`[T, k]`), checked against the indices.
fn combine_k(inputs: &[Tensor]) -> Result<i64> {
    let slots = inputs[2].size()[0];
    let rows = inputs[3].size()[0];
    if rows != slots || slots == 0 {
        bail!("combine: {rows} expert rows for {slots} slots");
    }
    let w = &inputs[1];
    match w.size().as_slice() {
        [_, k] => Ok(*k),
        _ => bail!("combine: weight must be [T, k]"),
    }
}

unsafe extern "C" fn callback(
    op: i64,
    phase: c_int,
    inputs: *mut *mut c_void,
    n_in: c_int,
    outputs: *mut *mut c_void,
    n_out: c_int,
) -> c_int {
    let result = std::panic::catch_unwind(|| -> Result<()> {
        let mut ins = Vec::with_capacity(n_in as usize);
        for i in 0..n_in as usize {
            // SAFETY: the shim passes `new at::Tensor` copies that we own.
            ins.push(unsafe { Tensor::from_ptr((*inputs.add(i)).cast()) });
        }
        let outs = run_op(op, phase, ins)?;
        if outs.len() != n_out as usize {
            bail!("fused op {op}: {} outputs for {n_out} slots", outs.len());
        }
        for (i, o) in outs.into_iter().enumerate() {
            let p = match o {
                Some(mut t) => {
                    let p = t.as_mut_ptr() as *mut c_void;
                    std::mem::forget(t);
                    p
                }
                None => std::ptr::null_mut(),
            };
            // SAFETY: `outputs` has `n_out` slots; the shim takes ownership.
            unsafe { *outputs.add(i) = p };
        }
        Ok(())
    });
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("fmoec fused op {op} (phase {phase}): {e:#}");
            1
        }
        Err(_) => 1,
    }
}

fn apply(op: i64, mut a: Tensor, mut b: Tensor, mut c: Tensor, mut d: Tensor) -> Result<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: the four tensors are live for the call; the shim copies them and hands back
    // a fresh `at::Tensor` we own.
    let rc = unsafe {
        fmoec_shim_apply(
            op,
            callback as Callback as *mut c_void,
            a.as_mut_ptr() as *mut c_void,
            b.as_mut_ptr() as *mut c_void,
            c.as_mut_ptr() as *mut c_void,
            d.as_mut_ptr() as *mut c_void,
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(shim_error(&format!("fused op {op}")));
    }
    // SAFETY: `out` is a `new at::Tensor` from the shim.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Gathers `x` (`[T, d]`) into expert order (`[N, d]`; rows with `row_slot < 0` are zero),
/// differentiable in `x` with a gather-sum backward (no atomics).
pub fn dispatch_op(x: &Tensor, row_slot: &Tensor, slot_row: &Tensor, k: i64) -> Result<Tensor> {
    let kt = Tensor::from(k);
    apply(
        OP_DISPATCH,
        x.shallow_clone(),
        row_slot.shallow_clone(),
        slot_row.shallow_clone(),
        kt,
    )
    .context("fused dispatch")
}

/// `silu(h1) · h3` in one pass, differentiable in both with a one-pass backward.
pub fn swiglu_op(h1: &Tensor, h3: &Tensor) -> Result<Tensor> {
    // unused slots: defined empty tensors (autograd reads every input's device)
    let none = Tensor::f_empty([0], (Kind::Float, Device::Cpu))?;
    apply(
        OP_SWIGLU,
        h1.shallow_clone(),
        h3.shallow_clone(),
        none.shallow_clone(),
        none,
    )
    .context("fused swiglu")
}

/// `act(h[r] + bias[row_expert[r]])` over rows in expert order (zero rows for dropped slots,
/// whose `h` rows are not used), differentiable in `h` and `bias` (`[E, d]`, `h`'s dtype):
/// one pass forward, one pass plus per-expert column sums (no atomics) backward.
pub fn bias_act_op(h: &Tensor, bias: &Tensor, row_expert: &Tensor, act: i64) -> Result<Tensor> {
    apply(
        OP_BIAS_ACT,
        h.shallow_clone(),
        bias.shallow_clone(),
        row_expert.shallow_clone(),
        Tensor::from(act),
    )
    .context("fused bias epilogue")
}

/// Blocks of 256 threads for the row kernels of `xent_*`, capped for their grid-stride loop.
fn xent_blocks(rows: i64) -> i64 {
    rows.min(132 * 64)
}

/// Launches `xent_{pass}_*` over the rows of `logits` (`[N, V]`) with the tensor arguments
/// `tensors` (after the logits), then the row count and `V`.
fn launch_xent(pass: &str, logits: &Tensor, tensors: &[&Tensor]) -> Result<()> {
    let (rows, v) = logits.size2()?;
    let suffix = kernel_suffix(logits).context("cross-entropy: unsupported logits")?;
    let mut args = vec![arg(Some(logits))];
    args.extend(tensors.iter().map(|t| arg(Some(t))));
    args.extend([Arg::Long(rows), Arg::Int(v as c_int)]);
    launch(
        device_index(logits),
        &format!("xent_{pass}_{suffix}"),
        (xent_blocks(rows), 1),
        (256, 0),
        &args,
    )
}

fn xent_forward(logits: &Tensor, target: &Tensor, lse: &Tensor) -> Result<Tensor> {
    let loss = Tensor::f_empty([logits.size()[0]], (Kind::Float, logits.device()))?;
    launch_xent("fwd", logits, &[target, &loss, lse])?;
    Ok(loss)
}

fn xent_backward(logits: &Tensor, target: &Tensor, lse: &Tensor, g: &Tensor) -> Result<Tensor> {
    let g = g.f_to_kind(Kind::Float)?.f_contiguous()?;
    let grad = logits.f_empty_like()?;
    launch_xent("bwd", logits, &[target, lse, &g, &grad])?;
    Ok(grad)
}

/// Per-row cross-entropy `logsumexp(logits[r]) - logits[r, target[r]]` (`[N]` f32; 0 where the
/// target is outside `[0, V)`) of `logits` `[N, V]` (bf16 or f32, on a GPU, rows of a multiple
/// of 16 bytes) against `target` `[N]`, differentiable in `logits`: one pass over the logits
/// forward and one backward, in their own dtype, instead of a conversion to f32, a
/// log-softmax and its backward. `None` where the kernels do not apply.
pub fn cross_entropy_rows(logits: &Tensor, target: &Tensor) -> Result<Option<Tensor>> {
    if kernel_suffix(logits).is_none()
        || logits.dim() != 2
        || !logits.is_contiguous()
        || logits.size()[1] >= i32::MAX as i64
        || kernels_ready(device_index(logits)).is_err()
    {
        return Ok(None);
    }
    let rows = logits.size()[0];
    let target = target.f_to_kind(Kind::Int64)?.f_contiguous()?;
    if target.size() != [rows] {
        bail!(
            "cross-entropy: {rows} rows of logits, targets {:?}",
            target.size()
        );
    }
    let lse = Tensor::f_empty([rows], (Kind::Float, logits.device()))?;
    let none = Tensor::f_empty([0], (Kind::Float, Device::Cpu))?;
    Ok(Some(
        apply(OP_XENT, logits.shallow_clone(), target, lse, none).context("cross-entropy")?,
    ))
}

/// `copy` (`master` already converted, not requiring grad) as a differentiable function of
/// `master`: no work forward; backward, the gradient added into `master`'s `.grad` in one
/// pass where that exists, else converted to `master`'s dtype for autograd to start it.
pub fn cast_op(master: &Tensor, copy: &Tensor) -> Result<Tensor> {
    let none = Tensor::f_empty([0], (Kind::Float, Device::Cpu))?;
    apply(
        OP_CAST,
        master.shallow_clone(),
        copy.shallow_clone(),
        none.shallow_clone(),
        none,
    )
    .context("cached cast")
}

/// `out[t] = Σ_j weight[t, j] · ys[slot_row[t·k+j]]` (`[T, d]`), differentiable in `ys` and
/// `weight` (`[T, k]`, f32) with gather backwards (no atomics).
pub fn combine_op(
    ys: &Tensor,
    weight: &Tensor,
    slot_row: &Tensor,
    row_slot: &Tensor,
) -> Result<Tensor> {
    apply(
        OP_COMBINE,
        ys.shallow_clone(),
        weight.shallow_clone(),
        slot_row.shallow_clone(),
        row_slot.shallow_clone(),
    )
    .context("fused combine")
}

// ---------------------------------------------------------------------------------------
// Device self-check (`fmoec bench moe --check-kernels`)

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
    let b = b.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
    if a.f_isnan()?.f_any()?.f_int64_value(&[])? != 0 {
        return Ok(f64::NAN);
    }
    let num = a.f_sub(&b)?.f_norm()?.f_double_value(&[])?;
    let den = b.f_norm()?.f_double_value(&[])?;
    Ok(if den > 0.0 { num / den } else { num })
}

/// Fills the caching allocator's next block of `n` elements with NaN, so a kernel that
/// leaves an element unwritten shows up as NaN in the check.
fn poison(n: i64, kind: Kind, device: Device) -> Result<()> {
    let _ = Tensor::f_full([n], f64::NAN, (kind, device))?;
    Ok(())
}

/// The comparisons of [`self_check`]: one line each, and how many failed.
#[derive(Default)]
struct Checks {
    lines: Vec<String>,
    failed: usize,
}

impl Checks {
    fn record(&mut self, label: String, ok: bool, detail: String) {
        if !ok {
            self.failed += 1;
        }
        let verdict = if ok { "ok" } else { "FAILED" };
        self.lines.push(format!("{label}: {detail} {verdict}"));
    }

    /// `got` within `tol` (relative, norm-wise) of `want`; NaN anywhere fails.
    fn close(&mut self, label: String, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
        let r = rel(got, want)?;
        self.record(label, r.is_finite() && r <= tol, format!("rel err {r:.2e}"));
        Ok(())
    }

    /// The same integers (shape and values).
    fn equal(&mut self, label: String, got: &Tensor, want: &Tensor) -> Result<()> {
        let got = got.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let want = want.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let ok = got.size() == want.size() && got.f_equal(&want)?;
        self.record(label, ok, "equal".to_string());
        Ok(())
    }
}

/// Backpropagates `Σ out · g`, computed in `kind` on `out`'s device.
fn seed_backward(out: &Tensor, g: &Tensor, kind: Kind) -> Result<()> {
    out.f_to_kind(kind)?
        .f_mul(&g.f_to_device(out.device())?.f_to_kind(kind)?)?
        .f_sum(kind)?
        .f_backward()?;
    Ok(())
}

/// Checks every kernel and fused autograd op on `device` against the libtorch reference
/// computed on the CPU in f64, on fresh random inputs with dropped slots, and the plan
/// kernels for integer equality with libtorch's sort. Returns one line per check; an error
/// if any is off (tolerance 1e-5 for f32, 8e-3 for bf16).
pub fn self_check(device: Device) -> Result<Vec<String>> {
    use crate::runtime::moe::{combine, dispatch, limit_by_capacity, DispatchPlan};
    let mut c = Checks::default();
    let kinds: &[Kind] = if device.is_cuda() {
        &[Kind::Float, Kind::BFloat16]
    } else {
        &[Kind::Float]
    };
    let cpu = Device::Cpu;
    let tol_of = |kind: Kind| if kind == Kind::BFloat16 { 8e-3 } else { 1e-5 };
    let randn = |shape: &[i64], kind: Kind| -> Result<Tensor> {
        Ok(Tensor::f_randn(shape, (Kind::Double, cpu))?.f_to_kind(kind)?)
    };
    let leaf64 = |t: &Tensor| -> Result<Tensor> {
        Ok(t.f_to_kind(Kind::Double)?.f_set_requires_grad(true)?)
    };
    for &kind in kinds {
        let tol = tol_of(kind);
        for &(t, k, e, d) in &[
            (37i64, 3i64, 5i64, 64i64),
            (1000, 8, 128, 2048),
            (513, 2, 8, 1032),
        ] {
            let label = |name: &str| format!("{name:<26} {kind:?} T={t} k={k} E={e} d={d}");
            let mut expert = Tensor::f_randint(e, [t, k], (Kind::Int64, cpu))?;
            let drop = Tensor::f_rand([t, k], (Kind::Float, cpu))?.f_lt(0.2)?;
            expert = expert.f_masked_fill(&drop, -1)?;
            let (x, ys, g, gxs) = (
                randn(&[t, d], kind)?,
                randn(&[t * k, d], kind)?,
                randn(&[t, d], kind)?,
                randn(&[t * k, d], kind)?,
            );
            let w = Tensor::f_rand([t, k], (Kind::Float, cpu))?;
            // reference: libtorch on the CPU in f64
            let plan_ref = DispatchPlan::new(&expert, e, true)?;
            let x64 = leaf64(&x)?;
            let xs_ref = dispatch(&x64, &plan_ref)?;
            seed_backward(&xs_ref, &gxs, Kind::Double)?;
            let (ys64, w64) = (leaf64(&ys)?, leaf64(&w)?);
            let out_ref = combine(&ys64, &plan_ref, &w64, t)?;
            seed_backward(&out_ref, &g, Kind::Double)?;
            let (gys_ref, gw_ref, gx_ref) = (ys64.grad(), w64.grad(), x64.grad());

            // device: raw kernels, then the autograd ops
            let dev = |t: &Tensor| t.f_to_device(device);
            let plan = DispatchPlan::new(&dev(&expert)?, e, true)?;
            let (xd, ysd, wd, gd) = (dev(&x)?, dev(&ys)?, dev(&w)?, dev(&g)?);
            // poison the dropped rows of ys with NaN: no kernel may read them
            let dropped_rows = plan.row_slot.f_lt(0)?.f_unsqueeze(1)?;
            let ysd = ysd.f_masked_fill(&dropped_rows, f64::NAN)?;
            poison(t * k * d, kind, device)?;
            let got = gather_rows(&xd, &plan.row_slot, k, None)?;
            c.close(label("gather_rows"), &got, &xs_ref, tol)?;
            poison(t * d, kind, device)?;
            let got = sum_rows(&ysd, &plan.slot_row, k, Some(&wd))?;
            c.close(label("sum_rows (weighted)"), &got, &out_ref, tol)?;
            poison(t * k, Kind::Float, device)?;
            let got = row_dots(&ysd, &plan.slot_row, k, &gd)?.f_reshape([t, k])?;
            c.close(label("row_dots"), &got, &gw_ref, tol)?;
            let xg = xd.f_detach()?.f_set_requires_grad(true)?;
            let xs = dispatch_op(&xg, &plan.row_slot, &plan.slot_row, k)?;
            seed_backward(&xs, &gxs, Kind::Float)?;
            c.close(label("dispatch_op forward"), &xs, &xs_ref, tol)?;
            c.close(label("dispatch_op grad x"), &xg.grad(), &gx_ref, tol)?;
            let ysg = ysd.f_detach()?.f_set_requires_grad(true)?;
            let wg = wd.f_detach()?.f_set_requires_grad(true)?;
            let out = combine_op(&ysg, &wg, &plan.slot_row, &plan.row_slot)?;
            seed_backward(&out, &g, Kind::Float)?;
            c.close(label("combine_op forward"), &out, &out_ref, tol)?;
            c.close(label("combine_op grad ys"), &ysg.grad(), &gys_ref, tol)?;
            c.close(label("combine_op grad weight"), &wg.grad(), &gw_ref, tol)?;
        }
        for &(rows, h) in &[(37i64, 64i64), (4099, 768)] {
            let label = |name: &str| format!("{name:<26} {kind:?} rows={rows} h={h}");
            let a = randn(&[rows, h], kind)?
                .f_mul_scalar(3.0)?
                .f_to_kind(kind)?;
            let (b, g) = (randn(&[rows, h], kind)?, randn(&[rows, h], kind)?);
            let (a64, b64) = (leaf64(&a)?, leaf64(&b)?);
            let want = a64.f_silu()?.f_mul(&b64)?;
            seed_backward(&want, &g, Kind::Double)?;
            let ag = a.f_to_device(device)?.f_set_requires_grad(true)?;
            let bg = b.f_to_device(device)?.f_set_requires_grad(true)?;
            poison(rows * h, kind, device)?;
            let got = swiglu_op(&ag, &bg)?;
            seed_backward(&got, &g, Kind::Float)?;
            c.close(label("swiglu_op forward"), &got, &want, tol)?;
            c.close(label("swiglu_op grad h1"), &ag.grad(), &a64.grad(), tol)?;
            c.close(label("swiglu_op grad h3"), &bg.grad(), &b64.grad(), tol)?;
        }
        for &(rows, e, d) in &[(37i64, 5i64, 64i64), (4099, 16, 768), (3001, 128, 1032)] {
            for act in [ACT_NONE, ACT_GELU, ACT_RELU] {
                let label =
                    |name: &str| format!("{name:<26} {kind:?} act={act} rows={rows} E={e} d={d}");
                // rows in expert order, the last fifth dropped (expert E)
                let kept = rows * 4 / 5;
                let (sorted, _) =
                    Tensor::f_randint(e, [kept], (Kind::Int64, cpu))?.f_sort(0, false)?;
                let dropped = Tensor::f_full([rows - kept], e, (Kind::Int64, cpu))?;
                let row_expert = Tensor::f_cat(&[sorted, dropped], 0)?;
                let h = randn(&[rows, d], kind)?
                    .f_mul_scalar(2.0)?
                    .f_to_kind(kind)?;
                let (b, g) = (randn(&[e, d], kind)?, randn(&[rows, d], kind)?);
                let (h64, b64) = (leaf64(&h)?, leaf64(&b)?);
                let (valid, idx) = kept_rows(&row_expert, e)?;
                let y = act_ref(&h64.f_add(&b64.f_index_select(0, &idx)?)?, act)?;
                let want = y.f_where_self(&valid, &y.f_zeros_like()?)?;
                seed_backward(&want, &g, Kind::Double)?;
                // the dropped rows of h are NaN on the device: the kernels may not read them
                let hd = h
                    .f_to_device(device)?
                    .f_masked_fill(&valid.f_logical_not()?.f_to_device(device)?, f64::NAN)?
                    .f_set_requires_grad(true)?;
                let bd = b.f_to_device(device)?.f_set_requires_grad(true)?;
                poison(rows * d, kind, device)?;
                let got = bias_act_op(&hd, &bd, &row_expert.f_to_device(device)?, act)?;
                seed_backward(&got, &g, Kind::Float)?;
                c.close(label("bias_act_op forward"), &got, &want, tol)?;
                c.close(label("bias_act_op grad h"), &hd.grad(), &h64.grad(), tol)?;
                c.close(label("bias_act_op grad bias"), &bd.grad(), &b64.grad(), tol)?;
            }
        }
    }
    // the plan kernels against the libtorch sort on the CPU: the same integers
    for &(t, k, e) in &[
        (37i64, 3i64, 5i64),
        (1000, 8, 128),
        (5000, 2, 16),
        (9001, 2, 256),
    ] {
        let label = |name: &str| format!("plan {name:<21} T={t} k={k} E={e}");
        let mut expert = Tensor::f_randint(e, [t, k], (Kind::Int64, cpu))?;
        let drop = Tensor::f_rand([t, k], (Kind::Float, cpu))?.f_lt(0.2)?;
        expert = expert.f_masked_fill(&drop, -1)?;
        let want = DispatchPlan::new(&expert, e, true)?;
        let got = DispatchPlan::new(&expert.f_to_device(device)?, e, true)?;
        for (name, g, w) in [
            ("order", &got.order, &want.order),
            ("token", &got.token, &want.token),
            ("expert", &got.expert, &want.expert),
            ("row_slot", &got.row_slot, &want.row_slot),
            ("slot_row", &got.slot_row, &want.slot_row),
            ("counts", &got.counts, &want.counts),
            ("offsets", &got.offsets, &want.offsets),
        ] {
            c.equal(label(name), g, w)?;
        }
        let cap = (k * t + e - 1) / e;
        let limited = limit_by_capacity(&expert.f_to_device(device)?, e, cap)?;
        c.equal(
            label("capacity"),
            &limited,
            &limit_by_capacity(&expert, e, cap)?,
        )?;
    }
    // the LM loss: per-row cross-entropy and its gradient, one row's target ignored
    for &kind in kinds {
        let tol = tol_of(kind);
        for &(rows, v) in &[(37i64, 264i64), (300, 50304)] {
            let label = |name: &str| format!("{name:<26} {kind:?} rows={rows} V={v}");
            let logits = randn(&[rows, v], kind)?
                .f_mul_scalar(4.0)?
                .f_to_kind(kind)?;
            let target = Tensor::f_randint(v, [rows], (Kind::Int64, cpu))?;
            let _ = target.f_get(0)?.f_fill_(-100)?;
            let g = Tensor::f_rand([rows], (Kind::Float, cpu))?;
            let l64 = leaf64(&logits)?;
            let keep = target.f_ge(0)?;
            let picked = l64
                .f_log_softmax(1, Kind::Double)?
                .f_gather(1, &target.f_clamp_min(0)?.f_unsqueeze(1)?, false)?
                .f_squeeze_dim(1)?
                .f_neg()?;
            let want = picked.f_where_self(&keep, &picked.f_zeros_like()?)?;
            seed_backward(&want, &g, Kind::Double)?;
            let ld = logits.f_to_device(device)?.f_set_requires_grad(true)?;
            let got = cross_entropy_rows(&ld, &target.f_to_device(device)?)?;
            let Some(got) = got else {
                c.record(
                    label("cross_entropy_rows"),
                    !device.is_cuda(),
                    "not applied".into(),
                );
                continue;
            };
            seed_backward(&got, &g, Kind::Float)?;
            c.close(label("cross_entropy_rows forward"), &got, &want, 1e-5)?;
            c.close(
                label("cross_entropy_rows grad"),
                &ld.grad(),
                &l64.grad(),
                tol,
            )?;
        }
    }
    // the gates' keyed draws: the same bits on the device as on the CPU
    {
        use crate::runtime::moe::{draw_key_words, keyed_uniform};
        let key = Tensor::f_from_slice(&draw_key_words(0x0123_4567_89AB_CDEF))?;
        let want = keyed_uniform(&key, 3, &[1000, 7])?;
        let got = keyed_uniform(&key.f_to_device(device)?, 3, &[1000, 7])?;
        let got = got.f_to_device(cpu)?;
        let same = got.f_equal(&want)?;
        c.record(
            "keyed draws".to_string(),
            same,
            "bit-equal to the CPU".to_string(),
        );
    }
    if c.failed > 0 {
        bail!(
            "{} kernel check(s) failed:\n{}",
            c.failed,
            c.lines.join("\n")
        );
    }
    Ok(c.lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' source compiles with NVRTC for Hopper (no GPU needed, only libnvrtc:
    /// torch's `nvidia/cu13/lib`, which `.ci/env.sh` puts on the library path); skipped,
    /// saying so, where libnvrtc is absent.
    #[test]
    fn kernel_source_compiles_with_nvrtc() {
        // SAFETY: dlopen of libnvrtc only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        let ptx = compile(9, 0).unwrap();
        let ptx = String::from_utf8_lossy(&ptx);
        for name in KERNELS {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} missing from the PTX"
            );
        }
    }

    /// On a CPU the ops take their libtorch branch: this checks the autograd wiring through
    /// the C++ shim (forward, every gradient, dropped slots) against the f64 reference.
    #[test]
    fn fused_ops_match_the_reference_on_cpu() {
        let lines = self_check(Device::Cpu).unwrap();
        assert!(lines.len() >= 70, "{lines:?}");
        assert!(lines.iter().all(|l| l.ends_with(" ok")), "{lines:?}");
    }
}
