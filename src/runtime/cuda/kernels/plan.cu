// The expert order of the T·k slots (DispatchPlan) and capacity positions. Keys are
// the slots' experts, anything outside [0, E) being the dropped key E, sorted last. Three
// launches: per-chunk counts, one scan, then a stable placement per chunk (ranks within a
// warp by __match_any_sync, warps in order through shared per-warp counts).
__device__ __forceinline__ int plan_key(const long long* keys, long long s, int E) {
  long long e = keys[s];
  return (e >= 0 && e < E) ? (int)e : E;
}

extern "C" __global__ void plan_count(const long long* __restrict__ keys, long long n, int E,
                                      long long chunk, int* __restrict__ block_counts) {
  extern __shared__ int cnt[];
  const int B = E + 1;
  for (int j = threadIdx.x; j < B; j += blockDim.x) cnt[j] = 0;
  __syncthreads();
  const long long lo = (long long)blockIdx.x * chunk;
  const long long hi = min(n, lo + chunk);
  for (long long s = lo + threadIdx.x; s < hi; s += blockDim.x) atomicAdd(&cnt[plan_key(keys, s, E)], 1);
  __syncthreads();
  for (int j = threadIdx.x; j < B; j += blockDim.x) block_counts[(long long)blockIdx.x * B + j] = cnt[j];
}

// One block: totals per key, counts [E] (int64) and group ends [E] (int32), each key's first
// row key_start [E+1], and each chunk's first row per key block_start [nb][E+1].
extern "C" __global__ void plan_scan(const int* __restrict__ block_counts, int nb, int E,
                                     long long* __restrict__ counts, int* __restrict__ offsets,
                                     long long* __restrict__ key_start,
                                     int* __restrict__ block_start) {
  extern __shared__ int start[];
  const int B = E + 1;
  for (int j = threadIdx.x; j < B; j += blockDim.x) {
    int t = 0;
    for (int b = 0; b < nb; ++b) t += block_counts[b * B + j];
    start[j] = t;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int j = 0; j < B; ++j) {
      int t = start[j];
      start[j] = acc;
      key_start[j] = acc;
      acc += t;
      if (j < E) {
        counts[j] = t;
        offsets[j] = acc;
      }
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < B; j += blockDim.x) {
    int acc = start[j];
    for (int b = 0; b < nb; ++b) {
      block_start[b * B + j] = acc;
      acc += block_counts[b * B + j];
    }
  }
}

// Stable placement of chunk blockIdx.x: row = first row of its key in this chunk + the slots
// of that key before it. With `pos`, writes only each slot's position within its key
// (row - key_start[key]); otherwise the plan's index maps.
extern "C" __global__ void plan_place(const long long* __restrict__ keys, long long n, int k,
                                      int E, long long chunk,
                                      const int* __restrict__ block_start,
                                      const long long* __restrict__ key_start,
                                      long long* __restrict__ pos, long long* __restrict__ order,
                                      long long* __restrict__ token,
                                      long long* __restrict__ sorted_key,
                                      long long* __restrict__ row_slot,
                                      long long* __restrict__ slot_row) {
  extern __shared__ int sh[];
  const int B = E + 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int* running = sh;
  int* wc = sh + B;
  for (int j = threadIdx.x; j < B; j += blockDim.x)
    running[j] = block_start[(long long)blockIdx.x * B + j];
  const long long lo = (long long)blockIdx.x * chunk;
  const long long hi = min(n, lo + chunk);
  for (long long base = lo; base < hi; base += blockDim.x) {
    const long long s = base + threadIdx.x;
    const int key = s < hi ? plan_key(keys, s, E) : -1;
    for (int i = threadIdx.x; i < nw * B; i += blockDim.x) wc[i] = 0;
    __syncthreads();
    const unsigned same = __match_any_sync(0xffffffffu, key);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (key >= 0 && rank == 0) wc[warp * B + key] = __popc(same);
    __syncthreads();
    if (key >= 0) {
      int before = 0;
      for (int w = 0; w < warp; ++w) before += wc[w * B + key];
      const long long row = (long long)running[key] + before + rank;
      if (pos) {
        pos[s] = row - key_start[key];
      } else {
        const bool kept = key < E;
        order[row] = s;
        token[row] = s / k;
        sorted_key[row] = key;
        row_slot[row] = kept ? s : -1;
        slot_row[s] = kept ? row : -1;
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < B; j += blockDim.x) {
      int t = 0;
      for (int w = 0; w < nw; ++w) t += wc[w * B + j];
      running[j] += t;
    }
    __syncthreads();
  }
}
