// The gates' keyed draws (moe::keyed_uniform) in one pass instead of about thirty int64
// elementwise ops: murmur3's 32-bit finaliser over each element's index, the stream word and
// the key's two 32-bit words. The key is read from device memory, so a CUDA graph replayed
// with a new key draws anew. Every step is arithmetic modulo 2^32, as the ops' int64 masks
// are, so the bits are the ops' on any device.
__device__ __forceinline__ unsigned draw_mix32(unsigned x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x68E31DA5u;
  x ^= x >> 16;
  return x;
}

// out[i] = top 24 bits of the hash / 2^24, in [0, 1); stream_word = stream · 0x2545F491 mod 2^32.
extern "C" __global__ void keyed_uniform(const long long* __restrict__ key, long long stream_word,
                                         long long n, float* __restrict__ out) {
  const unsigned k0 = (unsigned)key[0], k1 = (unsigned)key[1], s = (unsigned)stream_word;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    unsigned x = (unsigned)i * 0x61C88647u + k0 + s;
    x = draw_mix32(draw_mix32(x) ^ k1);
    out[i] = (float)(x >> 8) * (1.0f / 16777216.0f);
  }
}
