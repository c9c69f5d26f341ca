// What the GPU attention kernels share: the KV block pool's layout (the CPU pool's, ops/kv_pool.h,
// so a GPU pool can hold the same blocks byte for byte), the element types a pool stores, and the
// op-side reading of a pool's shape from an op call.
//
// Block layout: [layer][stream][position][row_width]. A dense model's layer has 2 * kv_heads
// streams (keys of every KV head, then values), rows of head_dim; an MLA (deepseek2) layer has one
// stream whose row is [normalised latent (kv_lora) | roped key part (rope_dim)], read as the key in
// full and as the value in its first kv_lora elements.
#pragma once
#include "runtime/cuda/dialect.h"

// Full unrolling of fixed-trip loops over register arrays (nvcc); the host compiler has no such
// pragma and needs none.
#if SONDE_GPU_EMULATED
#define SONDE_ATTN_UNROLL
#else
#define SONDE_ATTN_UNROLL _Pragma("unroll")
#endif

namespace sonde {
namespace SONDE_GPU_NS {
namespace attention {

// KV element types, shared with lib/cuda/attention.ts (KV_DTYPE). f32 and f16 are the CPU pool's
// (KvDtype); bf16 is a GPU-only choice (same bytes as f16, the range of f32).
enum KvType : int { kKvF32 = 0, kKvF16 = 1, kKvBf16 = 2, kKvTypeCount };

template <int kType>
using KvElem = Stored<kType>;

// kV consecutive elements at p widened to fp32, as one 4-, 8- or 16-byte load (p aligned to it).
template <int kType, int kV>
__device__ __forceinline__ void LoadWide(const typename KvElem<kType>::T* p, float* out) {
  using E = KvElem<kType>;
  if constexpr (kType == kKvF32 && kV == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else if constexpr (kType == kKvF32 && kV == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x, out[1] = v.y;
  } else if constexpr (kType != kKvF32 && kV == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    out[0] = E::Get(static_cast<uint16_t>(v.x)), out[1] = E::Get(static_cast<uint16_t>(v.x >> 16));
    out[2] = E::Get(static_cast<uint16_t>(v.y)), out[3] = E::Get(static_cast<uint16_t>(v.y >> 16));
  } else if constexpr (kType != kKvF32 && kV == 2) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(p);
    out[0] = E::Get(static_cast<uint16_t>(v)), out[1] = E::Get(static_cast<uint16_t>(v >> 16));
  } else {
    static_assert(kV == 1, "LoadWide: 1, 2 or 4 elements");
    out[0] = E::Get(p[0]);
  }
}

// Where one layer's rows live in the pool, in elements. Keys of KV head h at position p of block b:
// b * block + key + h * stream + (p % block_size) * row; its value row is `value` further on.
struct PoolLayout {
  size_t block = 0, stream = 0, key = 0, value = 0;
  int row = 0, block_size = 0, blocks = 0;
};

// Reads blockSize, numBlocks, layers and layer from the call and lays out a layer of `streams`
// streams of `row` elements; value_stream: the stream index of KV head 0's values (0 for MLA).
inline PoolLayout PoolLayoutOf(const GpuOpCall& c, int64_t streams, int64_t row, int64_t value_stream) {
  PoolLayout p;
  p.block_size = static_cast<int>(c.Int("blockSize", 1, 1 << 16));
  p.blocks = static_cast<int>(c.Int("numBlocks", 1));
  const int64_t layers = c.IntOr("layers", 1, 1, 1 << 12), layer = c.IntOr("layer", 0, 0, layers - 1);
  p.row = static_cast<int>(row);
  p.stream = c.Count({p.block_size, row});
  p.block = c.Count({layers, streams, p.block_size, row});
  p.key = static_cast<size_t>(layer * streams) * p.stream;
  p.value = static_cast<size_t>(value_stream) * p.stream;
  return p;
}

inline int KvTypeOf(const GpuOpCall& c) { return static_cast<int>(c.Int("dtype", 0, kKvTypeCount - 1)); }
inline size_t KvElemBytes(int type) { return type == kKvF32 ? 4 : 2; }

}  // namespace attention
}  // namespace SONDE_GPU_NS
}  // namespace sonde
