// Cross-entropy of logits rows against target columns (the LM loss), reading the logits
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

#define XENT_INSTANCES(T, NAME) \
extern "C" __global__ void xent_fwd_##NAME(const T* logits, const long long* target, float* loss, \
    float* lse, long long rows, int V) { xent_fwd<T>(logits, target, loss, lse, rows, V); } \
extern "C" __global__ void xent_bwd_##NAME(const T* logits, const long long* target, \
    const float* lse, const float* g, T* grad, long long rows, int V) { \
    xent_bwd<T>(logits, target, lse, g, grad, rows, V); }
XENT_INSTANCES(bf16_t, bf16)
XENT_INSTANCES(float, f32)
