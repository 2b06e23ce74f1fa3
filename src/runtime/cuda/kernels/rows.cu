// Row moves of the MoE layer: the gather into expert order (dispatch), the weighted
// gather-sum back onto tokens (combine) and its weight gradients.

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


#define ROWS_INSTANCES(T, NAME) \
extern "C" __global__ void gather_rows_##NAME(const T* src, const long long* row_slot, int k, \
    const float* scale, T* out, long long rows, int d) { gather_rows<T>(src, row_slot, k, scale, out, rows, d); } \
extern "C" __global__ void sum_rows_##NAME(const T* src, const long long* slot_row, int k, \
    const float* weight, T* out, long long tokens, int d) { sum_rows<T>(src, slot_row, k, weight, out, tokens, d); } \
extern "C" __global__ void row_dots_##NAME(const T* a, const long long* slot_row, int k, \
    const T* b, float* out, long long tokens, int d) { row_dots<T>(a, slot_row, k, b, out, tokens, d); }
ROWS_INSTANCES(bf16_t, bf16)
ROWS_INSTANCES(float, f32)
