// The column sums of a gradient g [rows, d] in f32 (a dense linear's bias gradient), added
// into or written to an f32 vector: two launches, no atomics, every column summed in the
// same order at every call.

// Pass 1: partial[c, col] = the sum of g's rows in chunk c (chunk_rows rows from c *
// chunk_rows). Grid (column blocks of 32 VEC, chunks), 256 threads: 8 row lanes x 32 column
// lanes, four rows in flight per thread, f32 sums, the 8 row lanes added in shared memory.
template <typename T>
__device__ void col_sums_part(const T* __restrict__ g, float* __restrict__ partial,
                              long long rows, int d, long long chunk_rows) {
  const int N = Vec<T>::N;
  __shared__ float part[8][32 * (16 / sizeof(T))];
  const long long lo = (long long)blockIdx.y * chunk_rows;
  const long long hi = min(rows, lo + chunk_rows);
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int c = (blockIdx.x * 32 + lx) * N;
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
      partial[(long long)blockIdx.y * d + c + j] = s;
    }
  }
}

// Pass 2: out[col] = (accumulate ? out[col] : 0) + the chunks' partial sums in chunk order.
// One thread per column, grid-stride.
extern "C" __global__ void col_sums_finish(const float* partial, float* out, int chunks, int d,
                                           int accumulate) {
  for (long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x; col < d;
       col += (long long)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(long long)c * d + col];
    out[col] = accumulate ? out[col] + s : s;
  }
}

extern "C" __global__ void col_sums_part_bf16(const bf16_t* g, float* partial, long long rows,
                                              int d, long long chunk_rows) {
  col_sums_part<bf16_t>(g, partial, rows, d, chunk_rows);
}
extern "C" __global__ void col_sums_part_f32(const float* g, float* partial, long long rows,
                                             int d, long long chunk_rows) {
  col_sums_part<float>(g, partial, rows, d, chunk_rows);
}
