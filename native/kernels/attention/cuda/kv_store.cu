// Writes a step's new K/V rows (fp32, after RoPE) into the KV block pool at their positions, in the
// pool's element type (round to nearest even for f16/bf16, as the CPU's StoreRow): what ops/llm.cc
// does before it attends, so that prefill and decode read the new rows from the blocks.
#include <algorithm>

#include "kernels/attention/cuda/paged.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

using namespace attention;

struct StoreArgs {
  const float* k;  // [row][kv_head][head_dim]
  const float* v;  // the same, or nullptr when the value is the key row (MLA's latent cache)
  void* pool;
  const int32_t* tables;  // [seq][width]
  const int32_t* meta;    // [seq][3]: first position, token count, first row
  PoolLayout kv;
  int rows, kv_heads, width;
};

template <int kType>
__global__ void __launch_bounds__(256) StoreKernel(StoreArgs a) {
  using E = KvElem<kType>;
  using T = typename E::T;
  const int s = blockIdx.y;
  const int start = a.meta[3 * s], tokens = a.meta[3 * s + 1], row0 = a.meta[3 * s + 2];
  // lib/cuda rejects inconsistent metadata; here it only must not write out of bounds.
  if (start < 0 || tokens < 0 || row0 < 0 || row0 > a.rows - tokens || start > a.width * a.kv.block_size - tokens) return;
  const size_t per_row = size_t(a.kv_heads) * a.kv.row, total = size_t(tokens) * per_row;
  const int32_t* table = a.tables + size_t(s) * a.width;
  T* pool = static_cast<T*>(a.pool);
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(i / per_row), h = static_cast<int>(i % per_row / a.kv.row), d = static_cast<int>(i % a.kv.row);
    const int pos = start + t, id = table[pos / a.kv.block_size];
    if (id < 0 || id >= a.kv.blocks) continue;
    T* at = pool + size_t(id) * a.kv.block + a.kv.key + size_t(h) * a.kv.stream + size_t(pos % a.kv.block_size) * a.kv.row + d;
    const size_t src = (size_t(row0 + t) * a.kv_heads + h) * a.kv.row + d;
    if constexpr (kType == kKvF32) {
      at[0] = a.k[src];
      if (a.v) at[a.kv.value] = a.v[src];
    } else {
      at[0] = E::Put(a.k[src]);
      if (a.v) at[a.kv.value] = E::Put(a.v[src]);
    }
  }
}

// Buffers: 0 k (f32, rows x kvHeads x headDim), 1 v (likewise; ignored with mla), 2 pool, 3 block
// tables (int32, seqs x width), 4 sequences (int32, seqs x [start, tokens, row0]). mla: one
// stream per layer whose row (headDim = kvLora + ropeDim) is key and value.
void KvStoreOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int type = KvTypeOf(c);
  StoreArgs a{};
  const bool mla = c.NumOr("mla", 0) != 0;
  const int64_t seqs = c.Int("seqs", 0, 65535), rows = c.Int("rows");
  const int64_t kv_heads = mla ? 1 : c.Int("kvHeads", 1, 65535), head_dim = c.Int("headDim", 1, 1 << 16);
  a.kv = mla ? PoolLayoutOf(c, 1, head_dim, 0) : PoolLayoutOf(c, 2 * kv_heads, head_dim, kv_heads);
  a.rows = static_cast<int>(rows), a.kv_heads = static_cast<int>(kv_heads);
  a.width = static_cast<int>(c.Int("width", 1));
  if (static_cast<int64_t>(a.width) * a.kv.block_size > INT32_MAX) c.Invalid("width * blockSize must fit in int32");
  const size_t count = c.Count({rows, kv_heads, head_dim});
  a.k = c.Buffer<float>(0, count, "k");
  a.v = mla ? nullptr : c.Buffer<float>(1, count, "v");
  a.pool = c.Buffer<unsigned char>(2, c.Count({a.kv.blocks, static_cast<int64_t>(a.kv.block), static_cast<int64_t>(KvElemBytes(type))}), "pool");
  a.tables = c.Buffer<int32_t>(3, c.Count({seqs, a.width}), "blockTables");
  a.meta = c.Buffer<int32_t>(4, c.Count({seqs, 3}), "sequences");
  const int64_t max_tokens = c.Int("maxTokens", 0, rows);
  if (seqs == 0 || max_tokens == 0) return;
  const size_t per_seq = size_t(max_tokens) * kv_heads * head_dim;
  const size_t cap = size_t(dev.multiprocessors > 0 ? dev.multiprocessors : 1) * 8;
  const dim3 grid(static_cast<unsigned>(std::min<size_t>(CeilDiv(per_seq, 256), cap)), static_cast<unsigned>(seqs));
  switch (type) {
    case kKvF32: Launch(StoreKernel<kKvF32>, grid, dim3(256), 0, st, a); break;
    case kKvF16: Launch(StoreKernel<kKvF16>, grid, dim3(256), 0, st, a); break;
    default: Launch(StoreKernel<kKvBf16>, grid, dim3(256), 0, st, a); break;
  }
}

}  // namespace

SONDE_GPU_OP("kv_store", KvStoreOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
