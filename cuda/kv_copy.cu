// Gather and scatter of KV head slices between paged KV caches and a contiguous staging region.
//
// Everything is counted in vectors of type V (uint4 = 16 B down to unsigned char), so every KV
// dtype is moved bit for bit. The launcher picks the widest V that divides every pointer, stride
// and offset involved.
//
//   cache plane p  : [slots][slot_len]       (slot_len = heads * head_dim, in V units)
//   a token's slice: row_len vectors at head_offset inside its slot
//   staging        : [plane][token][row_len] (plane = K layers, then V layers)
//
// One launch covers every plane (blockIdx.y) and every token of a (chunk, destination) pair.

template <typename V, bool kGather>
__global__ void __launch_bounds__(512) kv_copy(
    const unsigned long long* __restrict__ planes,  // [num_planes] cache plane base addresses
    const int* __restrict__ slots,                  // [num_tokens] cache slot of each token
    V* __restrict__ staging,                        // [num_planes, num_tokens, row_len]
    const unsigned int num_tokens,
    const unsigned int row_len,
    const long long slot_len,
    const long long head_offset) {
  constexpr int kUnroll = 2;  // loads in flight per thread before the first store (tuned on H100)
  const unsigned int n = num_tokens * row_len;  // vectors per plane; the launcher keeps n < 2^31
  V* cache = reinterpret_cast<V*>(planes[blockIdx.y]) + head_offset;
  V* stage = staging + static_cast<long long>(blockIdx.y) * n;
  const unsigned int step = gridDim.x * blockDim.x * kUnroll;
  for (unsigned int base = blockIdx.x * blockDim.x * kUnroll + threadIdx.x; base < n; base += step) {
    V buf[kUnroll];
    long long where[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const unsigned int i = base + u * blockDim.x;
      if (i < n) {
        const unsigned int t = i / row_len;
        where[u] = static_cast<long long>(__ldg(slots + t)) * slot_len + (i - t * row_len);
        if constexpr (kGather) {
          buf[u] = __ldcs(cache + where[u]);
        } else {
          buf[u] = __ldcs(stage + i);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const unsigned int i = base + u * blockDim.x;
      if (i < n) {
        if constexpr (kGather) {
          __stcs(stage + i, buf[u]);
        } else {
          __stcs(cache + where[u], buf[u]);
        }
      }
    }
  }
}
