// SwiGLU's silu(a) * b, forward and backward, one pass each.

// silu(x) * y as every kernel computes it (the FP8 epilogue too, so their bits agree)
__device__ __forceinline__ float swiglu_f(float x, float y) { return x / (1.0f + __expf(-x)) * y; }

// the gradients of silu(x) * y for the output's gradient z, as every kernel computes them
// (the FP8 pass of SwiGLU's backward too)
__device__ __forceinline__ void swiglu_d(float x, float y, float z, float& da, float& db) {
  const float s = 1.0f / (1.0f + __expf(-x));
  db = z * (x * s);
  da = z * y * s * (1.0f + x * (1.0f - s));
}

template <typename T>
__device__ void swiglu_fwd(const T* a, const T* b, T* out, long long n) {
  const int N = Vec<T>::N;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N; i < n;
       i += (long long)gridDim.x * blockDim.x * N) {
    float x[16 / sizeof(T)], y[16 / sizeof(T)];
    ldv(a + i, x);
    ldv(b + i, y);
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = swiglu_f(x[j], y[j]);
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
    for (int j = 0; j < N; ++j) swiglu_d(x[j], y[j], z[j], da[j], db[j]);
    stv(ga + i, da);
    stv(gb + i, db);
  }
}

#define SWIGLU_INSTANCES(T, NAME) \
extern "C" __global__ void swiglu_fwd_##NAME(const T* a, const T* b, T* out, long long n) { \
    swiglu_fwd<T>(a, b, out, n); } \
extern "C" __global__ void swiglu_bwd_##NAME(const T* a, const T* b, const T* g, T* ga, T* gb, \
    long long n) { swiglu_bwd<T>(a, b, g, ga, gb, n); }
SWIGLU_INSTANCES(bf16_t, bf16)
SWIGLU_INSTANCES(float, f32)
