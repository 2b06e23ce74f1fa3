// The residual add fused with the pre-norm that reads it: s = x + h and y = norm(s) · gamma
// (+ beta), LayerNorm (rms = 0) or RMSNorm (rms = 1), rows of width d (d % 8 == 0,
// d <= NORM_THREADS_MAX · NORM_HELD), statistics in f32 (biased variance, as libtorch).
// One block per row (grid-stride over rows), each thread holding its NORM_HELD values of the
// row in registers: vector t and t + blockDim.x, ... of the row. Forward writes s, y and per
// row the mean (LayerNorm) and rstd in f32. Backward, from dy and the gradient ds reaching s
// from later (or null): dx = ds + norm'(dy), one pass per row, and the gain's (and bias's)
// gradients as per-block f32 partial sums (one row of `d` per block), which norm_reduce adds
// up (into the master's f32 gradient where it accumulates).
#define NORM_HELD 16
#define NORM_THREADS_MAX 512

// v as stored in T and loaded back (libtorch's add rounds the residual sum to the dtype
// before its norm reads it)
__device__ __forceinline__ float as_stored(float v, const float*) { return v; }
__device__ __forceinline__ float as_stored(float v, const bf16_t*) {
  bf16_t b;
  st(&b, v);
  return ld(&b);
}

// The sum of v over the block, returned to every thread; `sh` holds 32 floats, free on
// entry and on return.
__device__ __forceinline__ float norm_block_sum(float v, float* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < nw ? sh[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

template <typename T>
__device__ void norm_fwd(const T* __restrict__ x, const T* __restrict__ h,
                         const T* __restrict__ gamma, const T* __restrict__ beta,
                         T* __restrict__ s_out, T* __restrict__ y_out, float* __restrict__ mean_out,
                         float* __restrict__ rstd_out, long long rows, int d, int rms, float eps) {
  const int N = Vec<T>::N;
  const int V = NORM_HELD / N;
  __shared__ float sh[32];
  const float inv_d = 1.0f / (float)d;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    float v[NORM_HELD];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * N;
      if (c < d) {
        const long long at = r * d + c;
        ldv(x + at, v + k * N);
        if (h) {
          float w[16 / sizeof(T)];
          ldv(h + at, w);
#pragma unroll
          for (int j = 0; j < N; ++j) v[k * N + j] = as_stored(v[k * N + j] + w[j], x);
          stv(s_out + at, v + k * N);
        }
#pragma unroll
        for (int j = 0; j < N; ++j) sum += v[k * N + j];
      }
    }
    float mean = 0.0f;
    if (!rms) mean = norm_block_sum(sum, sh) * inv_d;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * N;
      if (c < d) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float u = v[k * N + j] - mean;
          sq += u * u;
        }
      }
    }
    const float rstd = rsqrtf(norm_block_sum(sq, sh) * inv_d + eps);
    if (threadIdx.x == 0) {
      if (mean_out) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * N;
      if (c < d) {
        float g[16 / sizeof(T)], b[16 / sizeof(T)];
        ldv(gamma + c, g);
        ldv_or_zeros(beta, c, b);
#pragma unroll
        for (int j = 0; j < N; ++j) g[j] = (v[k * N + j] - mean) * rstd * g[j] + b[j];
        stv(y_out + r * d + c, g);
      }
    }
  }
}

// dgamma_part / dbeta_part: [gridDim.x, d] f32, row blockIdx.x this block's sums (dbeta_part
// null for RMSNorm). mean null for RMSNorm. ds null where no gradient reaches s from later.
template <typename T>
__device__ void norm_bwd(const T* __restrict__ dy, const T* __restrict__ ds,
                         const T* __restrict__ s, const T* __restrict__ gamma,
                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                         T* __restrict__ dx, float* __restrict__ dgamma_part,
                         float* __restrict__ dbeta_part, long long rows, int d) {
  const int N = Vec<T>::N;
  const int V = NORM_HELD / N;
  __shared__ float sh[32];
  const float inv_d = 1.0f / (float)d;
  float dg[NORM_HELD], db[NORM_HELD];
#pragma unroll
  for (int i = 0; i < NORM_HELD; ++i) { dg[i] = 0.0f; db[i] = 0.0f; }
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const float mean = mean_in ? mean_in[r] : 0.0f, rstd = rstd_in[r];
    float xh[NORM_HELD], gy[NORM_HELD];
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * N;
      if (c < d) {
        const long long at = r * d + c;
        float g[16 / sizeof(T)];
        ldv(s + at, xh + k * N);
        ldv(dy + at, gy + k * N);
        ldv(gamma + c, g);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const int i = k * N + j;
          xh[i] = (xh[i] - mean) * rstd;
          dg[i] += gy[i] * xh[i];
          db[i] += gy[i];
          gy[i] *= g[j];
          a += gy[i];
          b += gy[i] * xh[i];
        }
      }
    }
    a = mean_in ? norm_block_sum(a, sh) * inv_d : 0.0f;
    b = norm_block_sum(b, sh) * inv_d;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * N;
      if (c < d) {
        const long long at = r * d + c;
        float o[16 / sizeof(T)];
        ldv_or_zeros(ds, at, o);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const int i = k * N + j;
          o[j] += rstd * (gy[i] - a - xh[i] * b);
        }
        stv(dx + at, o);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * N;
    if (c < d) {
      // 16-byte stores: d % 8 == 0, so every row of partial sums starts 16-byte aligned
      const long long at = (long long)blockIdx.x * d + c;
#pragma unroll
      for (int j = 0; j < N; j += 4) {
        const int i = k * N + j;
        *reinterpret_cast<float4*>(dgamma_part + at + j) =
            make_float4(dg[i], dg[i + 1], dg[i + 2], dg[i + 3]);
        if (dbeta_part)
          *reinterpret_cast<float4*>(dbeta_part + at + j) =
              make_float4(db[i], db[i + 1], db[i + 2], db[i + 3]);
      }
    }
  }
}

// out[c] = (accumulate ? out[c] : 0) + sum over the `parts` rows of part[p, c] (f32), for
// the gain (blockIdx.y 0: part_a into out_a) and the bias (blockIdx.y 1: part_b into out_b,
// skipped where null). Grid (column chunks of 32, 2), 1024 threads: 32 row lanes x 32
// columns, four rows in flight per thread, then the lanes' sums added in shared memory (the
// same order every time: no atomics).
extern "C" __global__ void __launch_bounds__(1024)
    norm_reduce(const float* __restrict__ part_a, float* __restrict__ out_a,
                const float* __restrict__ part_b, float* __restrict__ out_b, int parts, int d,
                int accumulate) {
  __shared__ float sums[32][33];
  const float* part = blockIdx.y == 0 ? part_a : part_b;
  float* out = blockIdx.y == 0 ? out_a : out_b;
  if (!part || !out) return;
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + lx;
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
  if (c < d) {
    int p = ly;
    for (; p + 96 < parts; p += 128) {
      a0 += part[(long long)p * d + c];
      a1 += part[(long long)(p + 32) * d + c];
      a2 += part[(long long)(p + 64) * d + c];
      a3 += part[(long long)(p + 96) * d + c];
    }
    for (; p < parts; p += 32) a0 += part[(long long)p * d + c];
  }
  sums[ly][lx] = (a0 + a1) + (a2 + a3);
  __syncthreads();
  if (ly == 0 && c < d) {
    float t = 0.0f;
#pragma unroll
    for (int y = 0; y < 32; ++y) t += sums[y][lx];
    out[c] = accumulate ? out[c] + t : t;
  }
}

#define NORM_INSTANCES(T, NAME) \
extern "C" __global__ void __launch_bounds__(NORM_THREADS_MAX) norm_fwd_##NAME(const T* x, \
    const T* h, const T* gamma, const T* beta, T* s, T* y, float* mean, float* rstd, \
    long long rows, int d, int rms) { \
    norm_fwd<T>(x, h, gamma, beta, s, y, mean, rstd, rows, d, rms, 1e-5f); } \
extern "C" __global__ void __launch_bounds__(NORM_THREADS_MAX) norm_bwd_##NAME(const T* dy, \
    const T* ds, const T* s, const T* gamma, const float* mean, const float* rstd, T* dx, \
    float* dgamma_part, float* dbeta_part, long long rows, int d) { \
    norm_bwd<T>(dy, ds, s, gamma, mean, rstd, dx, dgamma_part, dbeta_part, rows, d); }
NORM_INSTANCES(bf16_t, bf16)
NORM_INSTANCES(float, f32)
