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
