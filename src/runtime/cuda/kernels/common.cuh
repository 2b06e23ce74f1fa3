// Shared by every kernel file (NVRTC compiles them as one program, this file first).
// bf16 is handled as raw 16-bit words (no cuda_bf16.h needed at run time); every sum is in
// f32. `Vec<T>` is 16 bytes: VEC = 8 bf16 or 4 f32 elements per load.
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

// The vector at p + at, or zeros where p is null (an optional input).
template <typename T>
__device__ __forceinline__ void ldv_or_zeros(const T* p, long long at, float* out) {
  if (p) {
    ldv(p + at, out);
  } else {
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) out[i] = 0.0f;
  }
}

// A column reduction for block_column_reduce: the f32 sum of the values, added in row order.
struct ColumnSum {
  static __device__ __forceinline__ float fold(float acc, float v) { return acc + v; }
  static __device__ __forceinline__ float merge(float a, float b) { return a + b; }
};
// The largest |value| (a non-finite value as Inf), as an FP8 scale's amax.
struct ColumnAbsMax {
  static __device__ __forceinline__ float fold(float acc, float v) {
    return isfinite(v) ? fmaxf(acc, fabsf(v)) : __int_as_float(0x7f800000);
  }
  static __device__ __forceinline__ float merge(float a, float b) { return fmaxf(a, b); }
};

// R (ColumnSum, ColumnAbsMax) of rows [lo, hi) of g [*, d] in VEC columns from c = (column
// lane) * VEC of this block's 32-lane column chunk, from 0: 256 threads, 8 row lanes x 32
// column lanes, four rows in flight per thread, the 8 row lanes merged in shared memory in
// lane order. Every thread of the block calls it (it synchronises; a block may call it again,
// for its next group of rows); on return, row lane 0's `acc` holds its columns' results
// (columns c >= d: zeros, not to be written).
template <typename T, typename R>
__device__ void block_column_reduce(const T* __restrict__ g, long long lo, long long hi, int d,
                                    int c, float* acc) {
  const int N = Vec<T>::N;
  __shared__ float part[8][32 * (16 / sizeof(T))];
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
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
        for (int j = 0; j < N; ++j) acc[j] = R::fold(acc[j], v[u][j]);
    }
  }
  // a call before this one may still be reading `part`
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) part[ly][lx * N + j] = acc[j];
  __syncthreads();
  if (ly == 0 && c < d) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float s = 0.0f;
      for (int y = 0; y < 8; ++y) s = R::merge(s, part[y][lx * N + j]);
      acc[j] = s;
    }
  }
}

// The f32 column sums of rows [lo, hi) of g (block_column_reduce's way).
template <typename T>
__device__ void block_column_sums(const T* __restrict__ g, long long lo, long long hi, int d,
                                  int c, float* acc) {
  block_column_reduce<T, ColumnSum>(g, lo, hi, d, c, acc);
}
