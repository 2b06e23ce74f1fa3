// The column sums of a gradient g [rows, d] in f32 (a dense linear's bias gradient), added
// into or written to an f32 vector: two launches, no atomics, every column summed in the
// same order at every call.

// Pass 1: partial[c, col] = the sum of g's rows in chunk c (chunk_rows rows from c *
// chunk_rows). Grid (column blocks of 32 VEC, chunks), 256 threads: 8 row lanes x 32 column
// lanes, four rows in flight per thread, f32 sums, the 8 row lanes added in shared memory.
template <typename T>
__device__ void col_sums_part(const T* __restrict__ g, float* __restrict__ partial,
                              long long rows, int d, long long chunk_rows) {
  const long long lo = (long long)blockIdx.y * chunk_rows;
  const long long hi = min(rows, lo + chunk_rows);
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int c = (blockIdx.x * 32 + lx) * Vec<T>::N;
  float acc[16 / sizeof(T)];
  block_column_sums(g, lo, hi, d, c, acc);
  if (ly == 0 && c < d) {
#pragma unroll
    for (int j = 0; j < Vec<T>::N; ++j) partial[(long long)blockIdx.y * d + c + j] = acc[j];
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
