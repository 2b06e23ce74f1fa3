// FP8 (e4m3) operands of the scaled matmuls, with dynamic scales computed from the tensor
// itself: q = satfinite_e4m3(x * inv) and scale = 1 / inv (what the matmul multiplies back),
// where inv = 448 / max(amax, FP8_EPS) over the scaling group (a row, or a column of one
// expert's rows). All-zero groups get the floor, so no scale is 0, Inf or NaN; a group whose
// amax is not finite (the input overflowed) raises *overflow. Every division and product is
// IEEE-rounded (no fast-math approximation), so the libtorch reference computes the same bits.
// Needs the FP8 conversion instructions of compute capability 8.9 and later.
#if __CUDA_ARCH__ >= 890

#define FP8_MAX 448.0f
#define FP8_EPS 1e-12f

// Whether the bf16 row-wise passes work on packed bf16 bits in their first phase
// (row_source_bf16); FMOEC_FP8_HELD_ROWS (defined when FMOEC_FP8_PACKED_ROWS=0) keeps the
// per-value way of row_source, to compare the two in one build. Both give the same bits.
#ifdef FMOEC_FP8_HELD_ROWS
#define FP8_PACKED_ROWS false
#else
#define FP8_PACKED_ROWS true
#endif

__device__ __forceinline__ float fp8_floor(float amax) { return fmaxf(amax, FP8_EPS); }
__device__ __forceinline__ float fp8_inv(float amax) { return __fdiv_rn(FP8_MAX, fp8_floor(amax)); }
__device__ __forceinline__ float fp8_scale(float amax) { return __fdiv_rn(fp8_floor(amax), FP8_MAX); }

// two values into two e4m3 bytes, x0 in the low byte (round to nearest even, saturating)
__device__ __forceinline__ unsigned short e4m3x2(float x0, float x1) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(x1), "f"(x0));
  return r;
}

// The Vec<T>::N values of one 16-byte load, scaled and packed: 8 bytes for bf16, 4 for f32.
template <typename T> struct Packed;
template <> struct Packed<bf16_t> {
  typedef uint2 type;
  static __device__ __forceinline__ uint2 pack(const float* v, float inv) {
    uint2 p;
    p.x = (unsigned)e4m3x2(__fmul_rn(v[0], inv), __fmul_rn(v[1], inv)) |
          ((unsigned)e4m3x2(__fmul_rn(v[2], inv), __fmul_rn(v[3], inv)) << 16);
    p.y = (unsigned)e4m3x2(__fmul_rn(v[4], inv), __fmul_rn(v[5], inv)) |
          ((unsigned)e4m3x2(__fmul_rn(v[6], inv), __fmul_rn(v[7], inv)) << 16);
    return p;
  }
};
template <> struct Packed<float> {
  typedef unsigned type;
  static __device__ __forceinline__ unsigned pack(const float* v, float inv) {
    return (unsigned)e4m3x2(__fmul_rn(v[0], inv), __fmul_rn(v[1], inv)) |
           ((unsigned)e4m3x2(__fmul_rn(v[2], inv), __fmul_rn(v[3], inv)) << 16);
  }
};

// max over the block of `v` (blockDim.x a multiple of 32, at most 1024); every thread gets it
__device__ __forceinline__ float block_max(float v, float* part) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float m = 0.0f;
  for (int w = 0; w < nw; ++w) m = fmaxf(m, part[w]);
  return m;
}

// A value as T holds it (bf16: rounded to nearest even; f32: itself).
template <typename T> __device__ __forceinline__ float held(float x);
template <> __device__ __forceinline__ float held<float>(float x) { return x; }
template <> __device__ __forceinline__ float held<bf16_t>(float x) {
  bf16_t b;
  st(&b, x);
  return ld(&b);
}

// The row values the quantisation sees, from one 16-byte load at column c of the row's
// source(s), each as T holds it (so the copy written in T and the FP8 copy agree): SRC 0
// the row itself, times `w` when `weighted` (the combine's backward: w = the slot's gate
// weight, one product as gather_rows computes it); SRC 1 GELU (erf form), 2 ReLU (act_f of
// the bias epilogue); 3 SwiGLU's silu(a) * b (swiglu_f, as the SwiGLU kernel computes it);
// 4 and 5 the backward of GELU and ReLU, b * act'(a) (act_d, as the bias epilogue's backward).
template <typename T, int SRC>
__device__ __forceinline__ void row_source(const T* a, const T* b, int c, bool weighted, float w,
                                           float* v) {
  const int N = Vec<T>::N;
  ldv(a + c, v);
  if (SRC == 0) {
    if (weighted) {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = held<T>(__fmul_rn(v[i], w));
    }
  } else if (SRC == 3) {
    float y[16 / sizeof(T)];
    ldv(b + c, y);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = held<T>(swiglu_f(v[i], y[i]));
  } else if (SRC >= 4) {
    // the activation's backward: b is the output's gradient, the product as the bias
    // epilogue's backward computes it
    float z[16 / sizeof(T)];
    ldv(b + c, z);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = held<T>(z[i] * act_d<SRC - 3>(v[i]));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = held<T>(act_f<SRC>(v[i]));
  }
}

// Eight bf16 (one 16-byte vector's bits) as f32: ld's conversion, two a word.
__device__ __forceinline__ void unpack_bf16x8(uint4 p, float* v) {
  const unsigned w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Eight f32 as bf16, rounded to nearest even, in one 16-byte vector: four conversions of
// two values each. Every value that is not NaN gets the bits `held` gives it; a NaN comes
// out as some NaN (the passes take `held` for a row with a NaN, so their bits stay as before).
__device__ __forceinline__ uint4 pack_bf16x8(const float* v) {
  uint4 p;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p.x) : "f"(v[1]), "f"(v[0]));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p.y) : "f"(v[3]), "f"(v[2]));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p.z) : "f"(v[5]), "f"(v[4]));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p.w) : "f"(v[7]), "f"(v[6]));
  return p;
}

// row_source for bf16 as the bf16 bits of one 16-byte vector, without `held`'s rounding and
// unpacking of each value: the same arithmetic, then pack_bf16x8 (the row itself, unweighted,
// is its bits as loaded). The per-value rounding, unpacking and maxima were about 40% of
// GELU's first phase in PTX instructions, so the first phase works on these bits: the copy
// stored as they are, |v| as the bits with the sign cleared, maxima as two 16-bit maxima a
// word. On an H100 GELU's pass went from 1231 to 1047 us, its backward from 1520 to 1463
// (BENCHMARKS.md, 2026-12-06, FP8 part 6).
template <int SRC>
__device__ __forceinline__ uint4 row_source_bf16(const bf16_t* a, const bf16_t* b, int c,
                                                 bool weighted, float w) {
  const uint4 raw = *reinterpret_cast<const uint4*>(a + c);
  if (SRC == 0 && !weighted) return raw;
  float v[8];
  unpack_bf16x8(raw, v);
  if (SRC == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(v[i], w);
  } else if (SRC == 3) {
    float y[8];
    ldv(b + c, y);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = swiglu_f(v[i], y[i]);
  } else if (SRC >= 4) {
    float z[8];
    ldv(b + c, z);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = z[i] * act_d<SRC - 3>(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = act_f<SRC>(v[i]);
  }
  return pack_bf16x8(v);
}

// |v| of eight bf16 as their bits (the sign cleared: NaN stays above 0x7f80, Inf's bits).
__device__ __forceinline__ uint4 abs_bf16x8(uint4 p) {
  return make_uint4(p.x & 0x7fff7fffu, p.y & 0x7fff7fffu, p.z & 0x7fff7fffu, p.w & 0x7fff7fffu);
}

// raise_slots for bf16 from abs_bf16x8's bits: two 16-bit maxima a word, a NaN as Inf
// (AbsBits<bf16_t>::of's bits for every value).
__device__ __forceinline__ void raise_slots_bf16(unsigned char* slots, int c, uint4 m) {
  uint4* at = reinterpret_cast<uint4*>(reinterpret_cast<unsigned short*>(slots) + c);
  uint4 s = *at;
  s.x = __vmaxu2(s.x, __vminu2(m.x, 0x7f807f80u));
  s.y = __vmaxu2(s.y, __vminu2(m.y, 0x7f807f80u));
  s.z = __vmaxu2(s.z, __vminu2(m.z, 0x7f807f80u));
  s.w = __vmaxu2(s.w, __vminu2(m.w, 0x7f807f80u));
  *at = s;
}

// |v| as the bits of T (v as T holds it, so the bits are exact; a non-finite value as Inf):
// ordered as the values, so a maximum over them is an integer maximum, in any order.
template <typename T> struct AbsBits;
template <> struct AbsBits<bf16_t> {
  typedef unsigned short type;
  static __device__ __forceinline__ unsigned short of(float v) {
    return isfinite(v) ? (unsigned short)(__float_as_uint(fabsf(v)) >> 16) : (unsigned short)0x7f80;
  }
  // the f32 bits of the same value (col_amax's int bits)
  static __device__ __forceinline__ int f32_bits(unsigned short b) { return (int)((unsigned)b << 16); }
};
template <> struct AbsBits<float> {
  typedef unsigned type;
  static __device__ __forceinline__ unsigned of(float v) {
    return isfinite(v) ? __float_as_uint(fabsf(v)) : 0x7f800000u;
  }
  static __device__ __forceinline__ int f32_bits(unsigned b) { return (int)b; }
};

// A block's running column maxima in shared memory (`slots`, d values of AbsBits<T>, 16
// bytes per vector): each thread owns the columns of its row loop (c = threadIdx.x * N +
// j * blockDim.x * N), so no barrier guards them.
template <typename T>
__device__ __forceinline__ void raise_slots(unsigned char* slots, int c, const float* v) {
  typedef typename AbsBits<T>::type B;
  const int N = Vec<T>::N;
  uint4* at = reinterpret_cast<uint4*>(reinterpret_cast<B*>(slots) + c);
  uint4 w = *at;
  B* b = reinterpret_cast<B*>(&w);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const B x = AbsBits<T>::of(v[i]);
    b[i] = x > b[i] ? x : b[i];
  }
  *at = w;
}

// Hands on group g's column maxima as this thread's slots hold them, and zeroes the slots.
// Without `partial`: raises colmax[g * d + c] (col_amax's int bits) by atomicMax, where a
// slot saw something. With `partial` (the two-step reduction): a group whose rows lie in
// this block's chunk alone (chunk_owns) is this block's to store, plainly, into colmax; a
// group shared with other blocks gets this block's slots copied, as they are, into its
// partial row (slot 0: the block's first group, 1: its last), for colmax_reduce. On an H100
// this took back about 0.11 ms of S1's four passes with maxima from the atomics at the end of
// every persistent block (all on the same few addresses); they remain about 0.5 ms slower
// than the passes without maxima (BENCHMARKS.md 2026-12-06, part 4).
template <typename T>
__device__ __forceinline__ void flush_slots(unsigned char* slots, int* colmax, int g, int d,
                                            unsigned char* partial, bool owned, int slot) {
  typedef typename AbsBits<T>::type B;
  const int N = Vec<T>::N;
  B* s = reinterpret_cast<B*>(slots);
  B* part = partial ? reinterpret_cast<B*>(partial) + ((long long)blockIdx.x * 2 + slot) * d
                    : nullptr;
  for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
    if (part && !owned) {
      *reinterpret_cast<uint4*>(part + c) = *reinterpret_cast<const uint4*>(s + c);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const B b = s[c + i];
        int* at = colmax + (long long)g * d + c + i;
        if (part) *at = AbsBits<T>::f32_bits(b);
        else if (b) atomicMax(at, AbsBits<T>::f32_bits(b));
      }
    }
    *reinterpret_cast<uint4*>(s + c) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// First row of group g (groups are consecutive row ranges ending at ends[g], int32).
__device__ __forceinline__ long long group_start(const int* ends, int g) {
  return g == 0 ? 0 : (long long)ends[g - 1];
}

// Whether group g (rows group_start(g) to ends[g]) lies within one chunk of `chunk` rows (the
// row-wise pass's blocks take consecutive chunks): the same test in the pass and in
// colmax_reduce, so each shared group's partial rows are the ones the reduction reads.
__device__ __forceinline__ bool chunk_owns(long long start, long long end, long long chunk) {
  return start / chunk == (end - 1) / chunk;
}

// One output of a row-wise pass: the rows in T (if kept: `copy`), their FP8 rows and scales,
// and the column maxima (`colmax`, with the two-step reduction's `partial` rows).
template <typename T> struct RowOut {
  T* copy;
  unsigned char* q;
  float* scale;
  int* colmax;
  unsigned char* partial;
};

// How many outputs a row-wise pass of SRC writes: SwiGLU's backward (SRC 6) both inputs'
// gradients, every other one row.
template <int SRC> struct RowOuts { static const int n = SRC == 6 ? 2 : 1; };

// row_source for every output of SRC, from one 16-byte load at column c of each source:
// SRC 6 reads a, b and the output's gradient g (g3) and gives (ga, gb) as swiglu_d computes
// them (the SwiGLU kernel's backward), each as T holds it.
template <typename T, int SRC>
__device__ __forceinline__ void row_sources(const T* a, const T* b, const T* g3, int c,
                                            bool weighted, float w,
                                            float (*v)[16 / sizeof(T)]) {
  if constexpr (SRC == 6) {
    const int N = Vec<T>::N;
    float y[16 / sizeof(T)], z[16 / sizeof(T)];
    ldv(a + c, v[0]);
    ldv(b + c, y);
    ldv(g3 + c, z);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float da, db;
      swiglu_d(v[0][i], y[i], z[i], da, db);
      v[0][i] = held<T>(da);
      v[1][i] = held<T>(db);
    }
  } else {
    row_source<T, SRC>(a, b, c, weighted, w, v[0]);
  }
}

// row_source_bf16 for every output of SRC (SRC 6 as row_sources).
template <int SRC>
__device__ __forceinline__ void row_sources_bf16(const bf16_t* a, const bf16_t* b,
                                                 const bf16_t* g3, int c, bool weighted,
                                                 float w, uint4* p) {
  if constexpr (SRC == 6) {
    float x[8], y[8], z[8], da[8], db[8];
    ldv(a + c, x);
    ldv(b + c, y);
    ldv(g3 + c, z);
#pragma unroll
    for (int i = 0; i < 8; ++i) swiglu_d(x[i], y[i], z[i], da[i], db[i]);
    p[0] = pack_bf16x8(da);
    p[1] = pack_bf16x8(db);
  } else {
    p[0] = row_source_bf16<SRC>(a, b, c, weighted, w);
  }
}

// Row-wise quantisation of `rows` rows of width d (d % VEC == 0), one block per row:
// q[r] = e4m3(row * inv_r), scale[r] = 1 / inv_r, where the row is what row_source makes of
// the source row(s) (SRC above: the row, the weighted row, or an activation of it). The row
// is read from src[r] (and src2[r] for SwiGLU), or with `row_slot` (SRC 0), gathered as the
// dispatch does: src[s / k] for s = row_slot[r] >= 0, else a zero row, times weight[s] when
// `weight` is not null (the combine's backward). SwiGLU's backward (SRC 6) reads src, src2
// and the gradient src3 and writes two outputs, ga into out[0] and gb into out[1], from one
// read of its three inputs (its kernel and two passes after it read ga and gb twice more).
// `copy` (if not null) receives the row in T as well (the gather's or the activation's
// output, written in the first pass and read back in the second), so the pass that makes
// the tensor writes its FP8 copy too. With `limit` (if not null, an int32 on the device),
// rows from *limit on are outside every expert group: written as zeros with the floor's
// scale, never read (they hold whatever the grouped matmul left there), and they raise no
// overflow. The row is read twice (its amax, then the conversion; the second read mostly
// from L2; with `copy`, the copy): a variant keeping rows in registers (256 threads, all
// loads in flight) measured slower on an H100 (BENCHMARKS.md, 2026-12-06).
// With `colmax` (int32 [groups * d], zeroed by the caller), the pass also raises the column
// maxima of each row group (rows in groups ending at `ends`, as fp8_col_amax computes them,
// so the transposed copy needs no pass of its own for them): then each block takes a
// contiguous chunk of rows, keeps its maxima in d * sizeof(T) bytes of dynamic shared memory
// an output and hands them on when its rows leave the group and at the end (flush_slots):
// with `partial` (2 * gridDim.x * d values of AbsBits<T>) into its partial rows for
// colmax_reduce, or stored where the group is its own; without, by atomicMax on the bits
// (order-free).
template <typename T, int SRC>
__device__ void quant_rows(const T* __restrict__ src, const T* __restrict__ src2,
                           const T* __restrict__ src3, const long long* __restrict__ row_slot,
                           int k, const float* __restrict__ weight,
                           const int* __restrict__ limit, RowOut<T> out0, RowOut<T> out1,
                           int* __restrict__ overflow, long long rows, int d,
                           const int* __restrict__ ends, int groups) {
  const int N = Vec<T>::N;
  const int OUTS = RowOuts<SRC>::n;
  typedef typename Packed<T>::type P;
  typedef typename AbsBits<T>::type B;
  const RowOut<T> out[2] = {out0, out1};
  __shared__ float part[32];
  extern __shared__ __align__(16) unsigned char col_slots[];
  // output o's column maxima slots
  auto slots = [&](int o) { return col_slots + (long long)o * d * sizeof(B); };
  const long long valid_rows = limit ? (long long)*limit : rows;
  const bool cols = out0.colmax != nullptr && groups > 0;
  long long r_begin = blockIdx.x, r_end = rows, r_step = gridDim.x;
  long long chunk = 1;
  int g = 0;
  if (cols) {
    chunk = (rows + gridDim.x - 1) / gridDim.x;
    r_begin = (long long)blockIdx.x * chunk;
    r_end = min(rows, r_begin + chunk);
    r_step = 1;
    for (int c = threadIdx.x * N; c < OUTS * d; c += blockDim.x * N)
      *reinterpret_cast<uint4*>(reinterpret_cast<B*>(col_slots) + c) = make_uint4(0u, 0u, 0u, 0u);
    int hi_g = groups;  // the group of r_begin: the first whose end is past it
    while (g < hi_g) {
      int mid = (g + hi_g) >> 1;
      if ((long long)ends[mid] <= r_begin) g = mid + 1; else hi_g = mid;
    }
  }
  const int g_first = g;
  // hands on group g's maxima (an empty group has none; a block past the rows saw none)
  auto flush = [&](int group) {
    const long long start = group_start(ends, group), end = ends[group];
    if (end > start && r_begin < r_end) {
#pragma unroll
      for (int o = 0; o < OUTS; ++o)
        flush_slots<T>(slots(o), out[o].colmax, group, d, out[o].partial,
                       chunk_owns(start, end, chunk), group == g_first ? 0 : 1);
    }
  };
  for (long long r = r_begin; r < r_end; r += r_step) {
    if (cols) {
      while (g < groups && r >= (long long)ends[g]) {
        flush(g);
        ++g;
      }
    }
    const bool counted = cols && g < groups;
    const T* from = nullptr;
    const T* from2 = nullptr;
    const T* from3 = nullptr;
    float w = 1.0f;
    if (r < valid_rows) {
      if (row_slot) {
        const long long s = row_slot[r];
        if (s >= 0) {
          from = src + (s / k) * (long long)d;
          if (weight) w = weight[s];
        }
      } else {
        from = src + r * (long long)d;
        if (src2) from2 = src2 + r * (long long)d;
        if (src3) from3 = src3 + r * (long long)d;
      }
    }
    const bool weighted = weight != nullptr;
    float amax[2] = {0.0f, 0.0f};
    // bf16: whether the row holds a NaN (then the second phase takes `held`'s bits, as
    // before the packed first phase, so even a NaN's bits in the copy stay the same)
    bool row_nan = false;
    if constexpr (sizeof(T) == 2 && FP8_PACKED_ROWS) {
      // two 16-bit maxima of |v|'s bits an output (a NaN above Inf's 0x7f80)
      unsigned amax2[2] = {0u, 0u};
      if (from) {
        for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
          uint4 p[2];
          row_sources_bf16<SRC>(from, from2, from3, c, weighted, w, p);
#pragma unroll
          for (int o = 0; o < OUTS; ++o) {
            if (out[o].copy) *reinterpret_cast<uint4*>(out[o].copy + r * (long long)d + c) = p[o];
            const uint4 m = abs_bf16x8(p[o]);
            amax2[o] = __vmaxu2(amax2[o], __vmaxu2(__vmaxu2(m.x, m.y), __vmaxu2(m.z, m.w)));
            if (counted) raise_slots_bf16(slots(o), c, m);
          }
        }
      }
      unsigned top[2] = {0u, 0u};
#pragma unroll
      for (int o = 0; o < OUTS; ++o) top[o] = max(amax2[o] & 0xffffu, amax2[o] >> 16);
      row_nan = __syncthreads_or(max(top[0], top[1]) > 0x7f80u) != 0;
      // a non-finite value makes the row's amax Inf (an overflow), as below
#pragma unroll
      for (int o = 0; o < OUTS; ++o) amax[o] = __uint_as_float(min(top[o], 0x7f80u) << 16);
    } else if (from) {
      for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
        float v[2][16 / sizeof(T)];
        row_sources<T, SRC>(from, from2, from3, c, weighted, w, v);
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
          if (out[o].copy) stv(out[o].copy + r * (long long)d + c, v[o]);
          if (counted) raise_slots<T>(slots(o), c, v[o]);
          bool bad = false;
#pragma unroll
          for (int i = 0; i < N; ++i) {
            amax[o] = fmaxf(amax[o], fabsf(v[o][i]));
            bad |= !isfinite(v[o][i]);
          }
          // NaN is lost by fmaxf: a non-finite value makes the row's amax Inf (an overflow)
          if (bad) amax[o] = __int_as_float(0x7f800000);
        }
      }
    }
    float inv[2];
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
      amax[o] = block_max(amax[o], part);
      inv[o] = fp8_inv(amax[o]);
      if (threadIdx.x == 0) {
        out[o].scale[r] = fp8_scale(amax[o]);
        if (!isfinite(amax[o]) && overflow) atomicAdd(overflow, 1);
      }
    }
    for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
      float v[2][16 / sizeof(T)];
      if (from && (row_nan || !out[0].copy)) {
        // bf16, a row with a NaN: the first phase's copy written again, as `held` rounds
        // (NaN to 0x7fc0), and read back as before; or no copy: the row again
        if constexpr (sizeof(T) == 2 && FP8_PACKED_ROWS) {
          if (!row_nan) {
            uint4 p[2];
            row_sources_bf16<SRC>(from, from2, from3, c, weighted, w, p);
#pragma unroll
            for (int o = 0; o < OUTS; ++o) unpack_bf16x8(p[o], v[o]);
          } else {
            row_sources<T, SRC>(from, from2, from3, c, weighted, w, v);
          }
        } else {
          row_sources<T, SRC>(from, from2, from3, c, weighted, w, v);
        }
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
          if (row_nan && out[o].copy) {
            stv(out[o].copy + r * (long long)d + c, v[o]);
            ldv(out[o].copy + r * (long long)d + c, v[o]);
          }
        }
      } else if (from) {
        // what this thread wrote in the first pass (the same columns; mostly from L2): the
        // activation is computed once
#pragma unroll
        for (int o = 0; o < OUTS; ++o) ldv(out[o].copy + r * (long long)d + c, v[o]);
      } else {
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
#pragma unroll
          for (int i = 0; i < N; ++i) v[o][i] = 0.0f;
          if (out[o].copy) stv(out[o].copy + r * (long long)d + c, v[o]);
        }
      }
#pragma unroll
      for (int o = 0; o < OUTS; ++o)
        *reinterpret_cast<P*>(out[o].q + r * (long long)d + c) = Packed<T>::pack(v[o], inv[o]);
    }
  }
  if (cols && g < groups) flush(g);
}

// The second step of the two-step column maxima, after a row-wise pass over `nblocks`
// chunks of `chunk` rows: each group shared by several of its blocks (chunk_owns false) gets
// the maximum of their partial rows, raised into colmax by atomicMax on the bits (order-free)
// once per column for each span of `per_span` consecutive blocks: a few atomics, not one per
// block. Grid: x = spans, y = column vectors by blockDim.x. Block b's row for group g: slot 0
// where g is b's first group (b starts inside g, or where g starts), else slot 1 (g starts
// inside b's chunk: its last group).
template <typename T>
__device__ void colmax_reduce(const unsigned char* __restrict__ partial,
                              const int* __restrict__ ends, int groups, long long chunk,
                              long long nblocks, int per_span, int* __restrict__ colmax, int d) {
  typedef typename AbsBits<T>::type B;
  const int N = Vec<T>::N;
  const long long s0 = (long long)blockIdx.x * per_span;
  const long long s1 = min(nblocks, s0 + per_span) - 1;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * N;
  if (s0 > s1 || c >= d) return;
  const long long r0 = s0 * chunk, r1 = (s1 + 1) * chunk;
  int g = 0, hi_g = groups;  // the group of row r0: the first whose end is past it
  while (g < hi_g) {
    int mid = (g + hi_g) >> 1;
    if ((long long)ends[mid] <= r0) g = mid + 1; else hi_g = mid;
  }
  const B* rows = reinterpret_cast<const B*>(partial);
  for (; g < groups && group_start(ends, g) < r1; ++g) {
    const long long start = group_start(ends, g), end = ends[g];
    if (end <= start || chunk_owns(start, end, chunk)) continue;
    const long long b_lo = start / chunk;
    const long long lo = max(b_lo, s0), hi = min(min((end - 1) / chunk, nblocks - 1), s1);
    B m[16 / sizeof(T)];
#pragma unroll
    for (int i = 0; i < N; ++i) m[i] = 0;
#pragma unroll 4
    for (long long b = lo; b <= hi; ++b) {
      const int slot = (b == b_lo && start != b * chunk) ? 1 : 0;
      const uint4 w = *reinterpret_cast<const uint4*>(rows + (b * 2 + slot) * d + c);
      const B* v = reinterpret_cast<const B*>(&w);
#pragma unroll
      for (int i = 0; i < N; ++i) m[i] = v[i] > m[i] ? v[i] : m[i];
    }
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (m[i]) atomicMax(colmax + (long long)g * d + c + i, AbsBits<T>::f32_bits(m[i]));
  }
}

// Column amax of each group's rows, as the int bits of the (non-negative) float in
// amax[g * d + c] (zeroed by the caller; atomicMax on those bits orders them as the floats;
// a NaN counts as Inf). Grid (row chunks of CHUNK rows, column chunks of 32 vectors): a block
// walks the groups its rows meet and, per group, reduces its rows as the column sums do
// (block_column_reduce: 8 row lanes x 32 column lanes of one 16-byte vector each, four rows
// in flight per thread, the row lanes merged in shared memory) and raises the group's column
// maxima once.
#define COL_CHUNK 128
template <typename T>
__device__ void col_amax(const T* __restrict__ x, const int* __restrict__ ends, int groups,
                         int* __restrict__ amax, int d) {
  const int N = Vec<T>::N;
  const long long total = ends[groups - 1];
  const long long r0 = (long long)blockIdx.x * COL_CHUNK;
  const long long r1 = min(total, r0 + COL_CHUNK);
  if (r0 >= r1) return;
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int c = (blockIdx.y * 32 + lx) * N;
  int g = 0, hi_g = groups;  // the group of row r0: first whose end is past it
  while (g < hi_g) {
    int mid = (g + hi_g) >> 1;
    if ((long long)ends[mid] <= r0) g = mid + 1; else hi_g = mid;
  }
  for (; g < groups && group_start(ends, g) < r1; ++g) {
    const long long lo = max(r0, group_start(ends, g)), hi = min(r1, (long long)ends[g]);
    float m[16 / sizeof(T)];
    block_column_reduce<T, ColumnAbsMax>(x, lo, hi, d, c, m);
    if (ly == 0 && c < d && hi > lo) {
#pragma unroll
      for (int j = 0; j < N; ++j) atomicMax(amax + (long long)g * d + c + j, __float_as_int(m[j]));
    }
  }
}

// From col_amax's maxima (int bits): inv[i] and scale[i] of each of the n scaling groups,
// and *overflow raised where a maximum is not finite.
extern "C" __global__ void fp8_scales_from_amax(const int* __restrict__ amax, float* __restrict__ inv,
                                                float* __restrict__ scale, int* __restrict__ overflow,
                                                long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float a = __int_as_float(amax[i]);
    inv[i] = fp8_inv(a);
    scale[i] = fp8_scale(a);
    if (!isfinite(a) && overflow) atomicAdd(overflow, 1);
  }
}

// The padded group ends of the side-by-side transposed copy, from the group ends `ends`
// (int32, cumulative, non-decreasing): pad_ends[g] = the sum of the row counts of groups 0
// to g, each rounded up to a multiple of 16 (int32, as the libtorch reference's cumsum).
// One warp, 32 groups a step (a shuffle scan, the carry handed on), so the copy and the
// weight gradient get them from one launch instead of a handful of libtorch ops.
extern "C" __global__ void fp8_padded_ends(const int* __restrict__ ends, int groups,
                                           int* __restrict__ pad_ends) {
  const int lane = threadIdx.x & 31;
  if (threadIdx.x >= 32) return;
  int carry = 0;
  for (int g0 = 0; g0 < groups; g0 += 32) {
    const int g = g0 + lane;
    int n = 0;
    if (g < groups) n = (ends[g] - (g == 0 ? 0 : ends[g - 1]) + 15) / 16 * 16;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, n, o);
      if (lane >= o) n += t;
    }
    if (g < groups) pad_ends[g] = carry + n;
    carry += __shfl_sync(0xffffffffu, n, 31);
  }
}

// The transposed FP8 copy with per-group column scales (`inv`, [groups, d], from col_amax):
// out[c, j] for the output positions j of group g, which hold the group's rows in order and
// then zeros up to the group's padded length (pad_ends, int32 cumulative, multiples of 4).
// Output address: g * group_stride + c * col_stride + (base ? pad_start(g) : 0) + (j -
// pad_start(g)); so one [d, P] matrix of all groups side by side (group_stride 0, col_stride P,
// base 1: the weight gradient's operands) or [groups, d, len] stacked (the weights' forward
// operand: group_stride d * len, col_stride len, base 0). Positions past the last group (up to
// `positions`) are zeros.
// Tiles of TP = 128 positions x TC = 64 columns, 256 threads. A thread loads 4 consecutive
// positions of one 16-byte column vector (4 loads in flight; a warp reads 4 rows of 128
// contiguous bytes each), converts them with their groups' scales and writes, per column,
// the 4 FP8 bytes as one word of the tile (bytes in shared memory, 16-byte chunks of each
// column row swizzled by the column's vector index, so neither phase has bank conflicts);
// then each thread stores 16 positions of a column with one 16-byte store where they are
// contiguous and aligned in the output (always side by side; stacked when len % 16 == 0),
// byte by byte otherwise.
#define TP 128
#define TC 64
// Whether the bf16 transposed copy of a tensor (SRC 0) keeps its loads as bits
// (FMOEC_FP8_HELD_TRANSPOSE, defined when FMOEC_FP8_PACKED_TRANSPOSE=0, keeps the per-value
// way, to compare the two in one build). Both give the same bits.
#ifdef FMOEC_FP8_HELD_TRANSPOSE
#define FP8_PACKED_TRANSPOSE false
#else
#define FP8_PACKED_TRANSPOSE true
#endif
__device__ __forceinline__ int tile_chunk(int col, int chunk, int n) {
  return chunk ^ ((col / n) & 7);
}
// SRC (as row_source's): 0 reads x itself; 1-3 compute the activation of x (SwiGLU: of x
// and x2) on load, each value as the activation's row-wise pass computes it and T holds it,
// so the copy is bit-equal to the transposed copy of the output that pass would write: the
// forward then writes no output for the weight gradient (S1: 0.94 GB of bf16 not written
// and not kept until the backward).
template <typename T, int SRC>
__device__ void quant_transpose(const T* __restrict__ x, const T* __restrict__ x2,
                                const int* __restrict__ ends,
                                const int* __restrict__ pad_ends, int groups,
                                const float* __restrict__ inv, unsigned char* __restrict__ out,
                                long long positions, int d, long long group_stride,
                                long long col_stride, int base) {
  const int N = Vec<T>::N;
  __shared__ __align__(16) unsigned tile[TC][TP / 4];
  __shared__ int tile_group[TP];
  __shared__ long long tile_row[TP];
  const long long j0 = (long long)blockIdx.x * TP;
  const int c0 = blockIdx.y * TC;
  // which group and source row each position of the tile holds (-1: a zero)
  for (int t = threadIdx.x; t < TP; t += blockDim.x) {
    const long long j = j0 + t;
    int lo = 0, hi = groups;  // first group whose padded end is past j
    while (lo < hi) {
      int mid = (lo + hi) >> 1;
      if ((long long)pad_ends[mid] <= j) lo = mid + 1; else hi = mid;
    }
    long long row = -1;
    if (j < positions && lo < groups) {
      const long long pstart = lo == 0 ? 0 : (long long)pad_ends[lo - 1];
      const long long r = group_start(ends, lo) + (j - pstart);
      if (r < (long long)ends[lo]) row = r;
    }
    tile_group[t] = lo;
    tile_row[t] = row;
  }
  __syncthreads();
  // load and convert: units of (4 positions, one column vector), column vectors fastest
  const int vecs = TC / N;
  for (int u = threadIdx.x; u < (TP / 4) * vecs; u += blockDim.x) {
    const int cv = u % vecs, jq = u / vecs;
    const int c = c0 + cv * N;
    if constexpr (sizeof(T) == 2 && SRC == 0 && FP8_PACKED_TRANSPOSE) {
      // bf16 rows as loaded: the four loads in flight as bits (16 registers, not 32
      // floats), each unpacked when converted, and a tile's scales loaded once per group.
      // 48 registers a thread instead of 55, so 5 blocks a multiprocessor instead of 4: on an
      // H100 S1's copies of h took 486-494 us instead of 670-676, of xs 139-141 instead of
      // 194-196 (BENCHMARKS.md, 2026-12-06, FP8 part 7)
      uint4 raw[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const long long row = tile_row[jq * 4 + p];
        raw[p] = (row >= 0 && c < d) ? *reinterpret_cast<const uint4*>(x + row * d + c)
                                     : make_uint4(0u, 0u, 0u, 0u);
      }
      unsigned word[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
      float s[8];
      int held_group = -1;
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int g = tile_group[jq * 4 + p];
        if (g < groups && c < d) {
          if (g != held_group) {
            const float4* at = reinterpret_cast<const float4*>(inv + (long long)g * d + c);
            const float4 lo = at[0], hi = at[1];
            s[0] = lo.x; s[1] = lo.y; s[2] = lo.z; s[3] = lo.w;
            s[4] = hi.x; s[5] = hi.y; s[6] = hi.z; s[7] = hi.w;
            held_group = g;
          }
          float v[8];
          unpack_bf16x8(raw[p], v);
#pragma unroll
          for (int e = 0; e < 8; e += 2) {
            const unsigned two = e4m3x2(__fmul_rn(v[e], s[e]), __fmul_rn(v[e + 1], s[e + 1]));
            word[e] |= (two & 0xffu) << (8 * p);
            word[e + 1] |= (two >> 8) << (8 * p);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int col = cv * 8 + e;
        tile[col][tile_chunk(col, jq >> 2, 8) * 4 + (jq & 3)] = word[e];
      }
      continue;
    }
    float v[4][16 / sizeof(T)];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const long long row = tile_row[jq * 4 + p];
      if (row >= 0 && c < d) {
        row_source<T, SRC>(x + row * d, x2 ? x2 + row * d : nullptr, c, false, 1.0f, v[p]);
      } else {
#pragma unroll
        for (int e = 0; e < N; ++e) v[p][e] = 0.0f;
      }
    }
    unsigned word[16 / sizeof(T)];
#pragma unroll
    for (int e = 0; e < N; ++e) word[e] = 0u;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int g = tile_group[jq * 4 + p];
      if (g < groups && c < d) {
        float s[16 / sizeof(T)];
        const float* at = inv + (long long)g * d + c;
#pragma unroll
        for (int e = 0; e < N; ++e) s[e] = at[e];
#pragma unroll
        for (int e = 0; e < N; e += 2) {
          const unsigned two = e4m3x2(__fmul_rn(v[p][e], s[e]), __fmul_rn(v[p][e + 1], s[e + 1]));
          word[e] |= (two & 0xffu) << (8 * p);
          word[e + 1] |= (two >> 8) << (8 * p);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const int col = cv * N + e;
      tile[col][tile_chunk(col, jq >> 2, N) * 4 + (jq & 3)] = word[e];
    }
  }
  __syncthreads();
  // store: TC columns of TP / 16 chunks of 16 positions
  for (int i = threadIdx.x; i < TC * (TP / 16); i += blockDim.x) {
    const int cc = i / (TP / 16), chunk = i % (TP / 16);
    const int c = c0 + cc;
    const long long j = j0 + chunk * 16;
    if (c >= d || j >= positions) continue;
    const uint4 w = *reinterpret_cast<const uint4*>(&tile[cc][tile_chunk(cc, chunk, N) * 4]);
    const int g = tile_group[chunk * 16];
    const long long pstart = (g < groups && g > 0) ? (long long)pad_ends[g - 1] : 0;
    const long long at = g < groups
        ? (long long)g * group_stride + (long long)c * col_stride + (base ? pstart : 0) + (j - pstart)
        : (long long)c * col_stride + j;
    const bool one_run = j + 16 <= positions &&
        (group_stride == 0 || tile_group[chunk * 16 + 15] == g) && (at & 15) == 0;
    if (one_run) {
      *reinterpret_cast<uint4*>(out + at) = w;
    } else {
      for (int b = 0; b < 16 && j + b < positions; ++b) {
        // the byte by shifts (an index into w would put it in local memory)
        const unsigned word = b < 4 ? w.x : b < 8 ? w.y : b < 12 ? w.z : w.w;
        const unsigned char byte = (unsigned char)(word >> (8 * (b & 3)));
        const int gb = tile_group[chunk * 16 + b];
        const long long pb = (gb < groups && gb > 0) ? (long long)pad_ends[gb - 1] : 0;
        const long long ab = gb < groups
            ? (long long)gb * group_stride + (long long)c * col_stride + (base ? pb : 0) + (j + b - pb)
            : (long long)c * col_stride + j + b;
        out[ab] = byte;
      }
    }
  }
}

#define FP8_INSTANCES(T, NAME) \
extern "C" __global__ void fp8_quant_rows_##NAME(const T* src, const long long* row_slot, int k, \
    const float* weight, const int* limit, T* copy, unsigned char* q, float* scale, int* overflow, \
    long long rows, int d, const int* ends, int groups, int* colmax, unsigned char* partial) { \
    quant_rows<T, 0>(src, nullptr, nullptr, row_slot, k, weight, limit, \
                     RowOut<T>{copy, q, scale, colmax, partial}, RowOut<T>{}, overflow, rows, d, \
                     ends, groups); } \
extern "C" __global__ void fp8_swiglu_grad_quant_rows_##NAME(const T* a, const T* b, \
    const T* g, const int* limit, T* ga, unsigned char* qa, float* sa, int* overflow, long long rows, \
    int d, const int* ends, int groups, int* colmax_a, unsigned char* partial_a, T* gb, \
    unsigned char* qb, float* sb, int* colmax_b, unsigned char* partial_b) { \
    quant_rows<T, 6>(a, b, g, nullptr, 1, nullptr, limit, \
                     RowOut<T>{ga, qa, sa, colmax_a, partial_a}, \
                     RowOut<T>{gb, qb, sb, colmax_b, partial_b}, overflow, rows, d, ends, groups); } \
FP8_ACT_INSTANCE(T, NAME, 1) \
FP8_ACT_INSTANCE(T, NAME, 2) \
FP8_ACT_INSTANCE(T, NAME, 3) \
FP8_ACT_INSTANCE(T, NAME, 4) \
FP8_ACT_INSTANCE(T, NAME, 5) \
extern "C" __global__ void fp8_col_amax_##NAME(const T* x, const int* ends, int groups, \
    int* amax, int d) { col_amax<T>(x, ends, groups, amax, d); } \
extern "C" __global__ void fp8_colmax_reduce_##NAME(const unsigned char* partial, \
    const int* ends, int groups, long long chunk, long long nblocks, int per_span, int* colmax, \
    int d) { colmax_reduce<T>(partial, ends, groups, chunk, nblocks, per_span, colmax, d); } \
FP8_TRANSPOSE_INSTANCE(T, NAME, quant_transpose, 0) \
FP8_TRANSPOSE_INSTANCE(T, NAME, act1_quant_transpose, 1) \
FP8_TRANSPOSE_INSTANCE(T, NAME, act2_quant_transpose, 2) \
FP8_TRANSPOSE_INSTANCE(T, NAME, act3_quant_transpose, 3)
// the transposed copy of a tensor (SRC 0: x2 unused) or of an activation's output computed
// on load from its input(s) (SRC 1-3)
#define FP8_TRANSPOSE_INSTANCE(T, NAME, KIND, SRC) \
extern "C" __global__ void fp8_##KIND##_##NAME(const T* x, const T* x2, const int* ends, \
    const int* pad_ends, int groups, const float* inv, unsigned char* out, long long positions, \
    int d, long long group_stride, long long col_stride, int base) { \
    quant_transpose<T, SRC>(x, x2, ends, pad_ends, groups, inv, out, positions, d, group_stride, \
                            col_stride, base); }
// the activation's pass writing its output and the output's row-wise FP8 copy (SRC 1-3),
// or its backward's pass writing the input's gradient and that gradient's copy (SRC 4-5)
#define FP8_ACT_INSTANCE(T, NAME, SRC) \
extern "C" __global__ void fp8_act##SRC##_quant_rows_##NAME(const T* a, const T* b, \
    const int* limit, T* out, unsigned char* q, float* scale, int* overflow, long long rows, \
    int d, const int* ends, int groups, int* colmax, unsigned char* partial) { \
    quant_rows<T, SRC>(a, b, nullptr, nullptr, 1, nullptr, limit, \
                       RowOut<T>{out, q, scale, colmax, partial}, RowOut<T>{}, overflow, rows, d, \
                       ends, groups); }
FP8_INSTANCES(bf16_t, bf16)
FP8_INSTANCES(float, f32)

#endif
