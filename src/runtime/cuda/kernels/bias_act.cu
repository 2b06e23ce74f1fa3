// The expert biases as an epilogue of the grouped matmuls (bias plus activation), and the
// per-expert column sums of its backward.

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

// Pass 1: partial[s, e, :] = the f32 sums of slice s of expert e's rows (rows sorted by
// expert; dropped rows, expert E, last and never read; an expert's rows cut in `slices`
// spans of equal length, the last shorter). Grid (E, column chunks of 32 VEC x slices), 256
// threads (block_column_sums), no atomics: the sums' order depends on `slices` only.
template <typename T>
__device__ void segment_sums_part(const T* __restrict__ g, const long long* __restrict__ row_expert,
                                  float* __restrict__ partial, long long rows, int d, int slices) {
  const long long e = blockIdx.x, E = gridDim.x;
  const int chunks = gridDim.y / slices;
  const int chunk = blockIdx.y % chunks, s = blockIdx.y / chunks;
  const long long lo = lower_row(row_expert, rows, e), hi = lower_row(row_expert, rows, e + 1);
  const long long span = (hi - lo + slices - 1) / slices;
  const long long a = min(hi, lo + s * span), b = min(hi, a + span);
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int c = (chunk * 32 + lx) * Vec<T>::N;
  float acc[16 / sizeof(T)];
  block_column_sums(g, a, b, d, c, acc);
  if (ly == 0 && c < d) {
#pragma unroll
    for (int j = 0; j < Vec<T>::N; ++j) partial[((long long)s * E + e) * d + c + j] = acc[j];
  }
}

// Pass 2: out[i] = the slices' partial sums of element i (of n = E * d) in slice order, in
// T. One thread per element, grid-stride.
template <typename T>
__device__ void segment_sums_finish(const float* __restrict__ partial, T* __restrict__ out,
                                    int slices, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < slices; ++s) sum += partial[(long long)s * n + i];
    st(out + i, sum);
  }
}

#define BIAS_INSTANCES(T, NAME) \
extern "C" __global__ void bias_act0_##NAME(const T* h, const T* bias, const long long* row_expert, \
    int E, const T* g, T* out, long long rows, int d) { bias_act<T, 0>(h, bias, row_expert, E, g, out, rows, d); } \
extern "C" __global__ void bias_act1_##NAME(const T* h, const T* bias, const long long* row_expert, \
    int E, const T* g, T* out, long long rows, int d) { bias_act<T, 1>(h, bias, row_expert, E, g, out, rows, d); } \
extern "C" __global__ void bias_act2_##NAME(const T* h, const T* bias, const long long* row_expert, \
    int E, const T* g, T* out, long long rows, int d) { bias_act<T, 2>(h, bias, row_expert, E, g, out, rows, d); } \
extern "C" __global__ void segment_sums_part_##NAME(const T* g, const long long* row_expert, \
    float* partial, long long rows, int d, int slices) { \
  segment_sums_part<T>(g, row_expert, partial, rows, d, slices); } \
extern "C" __global__ void segment_sums_finish_##NAME(const float* partial, T* out, int slices, \
    long long n) { segment_sums_finish<T>(partial, out, slices, n); }
BIAS_INSTANCES(bf16_t, bf16)
BIAS_INSTANCES(float, f32)
