// Paged attention for decode (one new query row per sequence) over the KV block pool, split-K
// ("flash-decoding"): a sequence's positions are cut into splits of split_len, each split is one
// block that folds its positions into (max, sum, acc) with an online softmax, and a second kernel
// combines the splits exactly (rescaling each by exp(max_i - max)). Long contexts so use many SMs
// even for one sequence; with one split the first kernel writes the normalised output itself.
//
// A block serves one KV head and up to kG of the query heads that share it (GQA), so each K/V row
// is read from memory once for the group. Its 4 warps take positions round-robin; a warp reads a
// row with its 32 lanes side by side (lane l holds elements l*kV.. of each 32*kV-wide chunk: 8- or
// 16-byte loads, whole 128-byte lines per warp), reduces the dot products with shuffles, and keeps
// its own online-softmax state, merged across warps through shared memory at the end. Decode is
// bound by the KV bytes read, so this SIMT form is the path on every device. Its arithmetic grows
// with the GQA group (a dot product, its reduction and a value update per head and position); at
// 8 or more heads per KV head the shuffles come near the memory time, and the next step would be
// the group's heads as the rows of an mma (as prefill.cu does with query rows).
//
// MLA (deepseek2) decode is the same kernel over the latent cache: one stream whose row is
// [latent | rope key], every query head attends to it as key (absorbed query, kv_lora + rope wide)
// and as value (its first kv_lora elements), output kv_lora wide per head.
#include <algorithm>
#include <cmath>

#include "kernels/attention/cuda/paged.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

using namespace attention;

constexpr int kDecodeWarps = 4;
// Below this many positions a split costs more in its fixed work (q load, warp merge, partial
// write) than it gains in parallelism.
constexpr int kMinSplitLen = 256;
constexpr int kMaxHeadDim = 576;  // deepseek2's latent row: 512 + 64

struct DecodeArgs {
  const float* q;        // [seq][head][head_dim]
  const void* pool;
  const int32_t* tables;  // [seq][width]
  const int32_t* lens;    // [seq]: positions [0, len) are attended
  float* out;             // [seq][head][value_dim]
  float* part;            // splits > 1: [seq][head][split][value_dim + 2]: acc, then max and sum
  PoolLayout kv;
  int heads, group, head_dim, value_dim, width, split_len, splits;
  int limit;  // positions attended at most: the table's and the splits' capacity
  float scale;
};

// Query heads per block for kPer elements per lane: q and acc take 2 * kG * kPer registers, so
// the most a block may serve shrinks with the head size; a GQA group of at most half of that gets
// a kernel of half the width (fewer registers, more resident warps to keep loads in flight).
constexpr int GroupPerBlock(int per) { return per <= 4 ? 8 : per <= 8 ? 4 : 2; }
int GroupPerBlock(int per, int group) { return group <= GroupPerBlock(per) / 2 ? GroupPerBlock(per) / 2 : GroupPerBlock(per); }

// Replaces each v[u] by its sum over the warp's 32 lanes. For 4 values, a butterfly that halves
// the values each lane carries (2 shuffles at distance 16, 1 at 8, 3 on the last value, then 4 to
// hand the sums back) takes 10 shuffles instead of 4 x 5: shuffles, not bytes, bound a round of
// 8 query heads.
template <int kN>
__device__ __forceinline__ void WarpSums(float (&v)[kN], int lane) {
  if constexpr (kN == 4) {
    const bool hi = lane & 16, mid = lane & 8;
    float a = hi ? v[2] : v[0], b = hi ? v[3] : v[1];
    a += __shfl_xor_sync(0xffffffffu, hi ? v[0] : v[2], 16);
    b += __shfl_xor_sync(0xffffffffu, hi ? v[1] : v[3], 16);
    float c = mid ? b : a;  // this lane's value now: position (hi ? 2 : 0) + (mid ? 1 : 0)
    c += __shfl_xor_sync(0xffffffffu, mid ? a : b, 8);
    c += __shfl_xor_sync(0xffffffffu, c, 4);
    c += __shfl_xor_sync(0xffffffffu, c, 2);
    c += __shfl_xor_sync(0xffffffffu, c, 1);
    SONDE_ATTN_UNROLL
    for (int u = 0; u < 4; ++u) v[u] = __shfl_sync(0xffffffffu, c, u * 8);
  } else {
    SONDE_ATTN_UNROLL
    for (int u = 0; u < kN; ++u)
      SONDE_ATTN_UNROLL
      for (int o = 16; o > 0; o >>= 1) v[u] += __shfl_xor_sync(0xffffffffu, v[u], o);
  }
}

template <int kType, int kPer, int kV, int kG>
__global__ void __launch_bounds__(kDecodeWarps * 32) DecodeKernel(DecodeArgs a) {
  using T = typename KvElem<kType>::T;
  constexpr int kChunks = kPer / kV, kU = kPer <= 8 ? 4 : 2;
  const int chunks_per_kv = (a.group + kG - 1) / kG;
  const int hc = static_cast<int>(blockIdx.x) % chunks_per_kv, split = static_cast<int>(blockIdx.x) / chunks_per_kv;
  const int kvh = blockIdx.y, s = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int len = a.lens[s];
  len = len < 0 ? 0 : len > a.limit ? a.limit : len;
  const int p0 = split * a.split_len, p1 = min(len, p0 + a.split_len);
  const int nh = min(kG, a.group - hc * kG), head0 = kvh * a.group + hc * kG;

  float q[kG][kPer], acc[kG][kPer], m[kG], l[kG];
SONDE_ATTN_UNROLL
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
SONDE_ATTN_UNROLL
    for (int e = 0; e < kPer; ++e) {
      const int d = (e / kV) * 32 * kV + lane * kV + e % kV;
      q[g][e] = g < nh && d < a.head_dim ? a.q[(size_t(s) * a.heads + head0 + g) * a.head_dim + d] * a.scale : 0.0f;
      acc[g][e] = 0.0f;
    }
  }

  const T* pool = static_cast<const T*>(a.pool);
  const int32_t* table = a.tables + size_t(s) * a.width;
  const size_t key_at = a.kv.key + size_t(kvh) * a.kv.stream;
  const bool values_in_keys = a.kv.value == 0;
  // kU consecutive positions per warp and round: their 2 * kU row loads are in flight together
  // (decode is latency-bound on memory without them), and the online softmax rescales once per
  // round instead of once per position.
  for (int pb = p0 + warp * kU; pb < p1; pb += kDecodeWarps * kU) {
    float kx[kU][kPer], vx[kU][kPer];
    bool ok[kU];
    SONDE_ATTN_UNROLL
    for (int u = 0; u < kU; ++u) {
      const int p = pb + u;
      const int id = p < p1 ? table[p / a.kv.block_size] : -1;
      ok[u] = id >= 0 && id < a.kv.blocks;  // lib/cuda rejects bad ids; here they only must not fault
      const T* kr = ok[u] ? pool + size_t(id) * a.kv.block + key_at + size_t(p % a.kv.block_size) * a.kv.row : pool;
      SONDE_ATTN_UNROLL
      for (int c = 0; c < kChunks; ++c) {
        const int d = c * 32 * kV + lane * kV;
        float* kd = kx[u] + c * kV;
        float* vd = vx[u] + c * kV;
        if (ok[u] && d < a.head_dim) {
          LoadWide<kType, kV>(kr + d, kd);
        } else {
          SONDE_ATTN_UNROLL
          for (int j = 0; j < kV; ++j) kd[j] = 0.0f;
        }
        if (values_in_keys) {
          SONDE_ATTN_UNROLL
          for (int j = 0; j < kV; ++j) vd[j] = d < a.value_dim ? kd[j] : 0.0f;
        } else if (ok[u] && d < a.value_dim) {
          LoadWide<kType, kV>(kr + a.kv.value + d, vd);
        } else {
          SONDE_ATTN_UNROLL
          for (int j = 0; j < kV; ++j) vd[j] = 0.0f;
        }
      }
    }
    SONDE_ATTN_UNROLL
    for (int g = 0; g < kG; ++g) {
      if (g >= nh) break;
      float sc[kU];
      SONDE_ATTN_UNROLL
      for (int u = 0; u < kU; ++u) {
        sc[u] = 0.0f;
        SONDE_ATTN_UNROLL
        for (int e = 0; e < kPer; ++e) sc[u] += q[g][e] * kx[u][e];
      }
      WarpSums<kU>(sc, lane);
      float mx = m[g];
      SONDE_ATTN_UNROLL
      for (int u = 0; u < kU; ++u) {
        sc[u] = ok[u] ? sc[u] : -INFINITY;
        mx = fmaxf(mx, sc[u]);
      }
      if (mx == -INFINITY) continue;  // nothing seen yet (the same in every lane)
      const float rescale = __expf(m[g] - mx);
      l[g] *= rescale;
      SONDE_ATTN_UNROLL
      for (int e = 0; e < kPer; ++e) acc[g][e] *= rescale;
      SONDE_ATTN_UNROLL
      for (int u = 0; u < kU; ++u) {
        const float pe = __expf(sc[u] - mx);  // 0 for a skipped position
        l[g] += pe;
        SONDE_ATTN_UNROLL
        for (int e = 0; e < kPer; ++e) acc[g][e] += pe * vx[u][e];
      }
      m[g] = mx;
    }
  }

  // Merge the warps: [warp][g] max and sum, then [warp][g][value_dim] sums.
  SONDE_DYNAMIC_SHARED(float, sh);
  float* sm = sh;
  float* sl = sh + kDecodeWarps * kG;
  float* sacc = sl + kDecodeWarps * kG;
  if (lane == 0) {
SONDE_ATTN_UNROLL
    for (int g = 0; g < kG; ++g) sm[warp * kG + g] = m[g], sl[warp * kG + g] = l[g];
  }
SONDE_ATTN_UNROLL
  for (int g = 0; g < kG; ++g) {
    if (g >= nh) break;
SONDE_ATTN_UNROLL
    for (int e = 0; e < kPer; ++e) {
      const int d = (e / kV) * 32 * kV + lane * kV + e % kV;
      if (d < a.value_dim) sacc[(warp * kG + g) * a.value_dim + d] = acc[g][e];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nh * a.value_dim; i += blockDim.x) {
    const int g = i / a.value_dim, d = i % a.value_dim;
    float mx = -INFINITY;
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sm[w * kG + g]);
    float sum = 0.0f, v = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) {
      if (sm[w * kG + g] == -INFINITY) continue;  // that warp saw no position
      const float f = __expf(sm[w * kG + g] - mx);
      sum += f * sl[w * kG + g];
      v += f * sacc[(w * kG + g) * a.value_dim + d];
    }
    const size_t head = size_t(s) * a.heads + head0 + g;
    if (a.splits == 1) {
      a.out[head * a.value_dim + d] = sum > 0.0f ? v / sum : 0.0f;
    } else {
      float* pr = a.part + (head * a.splits + split) * (a.value_dim + 2);
      pr[d] = v;
      if (d == 0) pr[a.value_dim] = mx, pr[a.value_dim + 1] = sum;
    }
  }
}

// One block per (head, sequence): out = sum_i w_i acc_i / sum_i w_i sum_i, w_i = exp(max_i - max).
__global__ void __launch_bounds__(128) CombineKernel(DecodeArgs a) {
  const int h = blockIdx.x, s = blockIdx.y;
  int len = a.lens[s];
  len = len < 0 ? 0 : len > a.limit ? a.limit : len;
  const int n = (len + a.split_len - 1) / a.split_len;
  const size_t head = size_t(s) * a.heads + h;
  const float* pr = a.part + head * a.splits * (a.value_dim + 2);
  SONDE_DYNAMIC_SHARED(float, weight);  // [splits]
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = fmaxf(mx, pr[i * (a.value_dim + 2) + a.value_dim]);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float mi = pr[i * (a.value_dim + 2) + a.value_dim];
    weight[i] = mi == -INFINITY ? 0.0f : __expf(mi - mx);
  }
  __syncthreads();
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += weight[i] * pr[i * (a.value_dim + 2) + a.value_dim + 1];
  for (int d = threadIdx.x; d < a.value_dim; d += blockDim.x) {
    float v = 0.0f;
    for (int i = 0; i < n; ++i) v += weight[i] * pr[i * (a.value_dim + 2) + d];
    a.out[head * a.value_dim + d] = sum > 0.0f ? v / sum : 0.0f;
  }
}

template <int kType, int kPer, int kV>
void LaunchDecode(const DecodeArgs& a, int kg, dim3 grid, size_t shared, GpuStream& st) {
  constexpr int kMax = GroupPerBlock(kPer);
  if (kg == kMax)
    Launch(DecodeKernel<kType, kPer, kV, kMax>, grid, dim3(kDecodeWarps * 32), shared, st, a);
  else
    Launch(DecodeKernel<kType, kPer, kV, kMax / 2>, grid, dim3(kDecodeWarps * 32), shared, st, a);
}

// kV: the widest load (4 or 2 elements) that divides a lane's share and both row widths, else 1.
template <int kType, int kPer>
void LaunchDecodePer(const DecodeArgs& a, int kg, dim3 grid, size_t shared, GpuStream& st) {
  constexpr int kV = kPer % 4 == 0 ? 4 : 2;
  if (a.head_dim % kV == 0 && a.value_dim % kV == 0)
    LaunchDecode<kType, kPer, kV>(a, kg, grid, shared, st);
  else
    LaunchDecode<kType, kPer, 1>(a, kg, grid, shared, st);
}

template <int kType>
void LaunchDecodeType(const DecodeArgs& a, int per, int kg, dim3 grid, size_t shared, GpuStream& st) {
  switch (per) {
    case 2: return LaunchDecodePer<kType, 2>(a, kg, grid, shared, st);
    case 4: return LaunchDecodePer<kType, 4>(a, kg, grid, shared, st);
    case 8: return LaunchDecodePer<kType, 8>(a, kg, grid, shared, st);
    default: return LaunchDecodePer<kType, 18>(a, kg, grid, shared, st);
  }
}

// Buffers: 0 q (f32), 1 pool, 2 block tables (int32, seqs x width), 3 lengths (int32, seqs),
// 4 out (f32), 5 workspace (optional, f32: the splits' partial results; its size bounds the split
// count). mla: the latent form (kvLora, ropeDim) instead of kvHeads/headDim.
void Decode(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c, bool mla) {
  const int type = KvTypeOf(c);
  DecodeArgs a{};
  const int64_t seqs = c.Int("seqs", 0, 65535), heads = c.Int("heads", 1, 1 << 16);
  int64_t kv_heads;
  if (mla) {
    const int64_t kv_lora = c.Int("kvLora", 1, kMaxHeadDim), rope = c.Int("ropeDim", 0, kMaxHeadDim);
    if (kv_lora + rope > kMaxHeadDim) c.Invalid("kvLora + ropeDim must be at most " + std::to_string(kMaxHeadDim));
    kv_heads = 1;
    a.head_dim = static_cast<int>(kv_lora + rope);
    a.value_dim = static_cast<int>(kv_lora);
    a.kv = PoolLayoutOf(c, 1, a.head_dim, 0);
    a.scale = static_cast<float>(c.Num("scale"));
  } else {
    kv_heads = c.Int("kvHeads", 1, 65535);
    if (heads % kv_heads) c.Invalid("heads (" + std::to_string(heads) + ") must be a multiple of kvHeads (" + std::to_string(kv_heads) + ")");
    a.head_dim = a.value_dim = static_cast<int>(c.Int("headDim", 1, kMaxHeadDim));
    a.kv = PoolLayoutOf(c, 2 * kv_heads, a.head_dim, kv_heads);
    a.scale = static_cast<float>(c.NumOr("scale", 1.0 / std::sqrt(static_cast<double>(a.head_dim))));
  }
  a.heads = static_cast<int>(heads);
  a.group = static_cast<int>(heads / kv_heads);
  a.width = static_cast<int>(c.Int("width", 1));
  const int64_t cap = static_cast<int64_t>(a.width) * a.kv.block_size;
  if (cap > INT32_MAX) c.Invalid("width * blockSize must fit in int32");
  const size_t eb = KvElemBytes(type);
  a.q = c.Buffer<float>(0, c.Count({seqs, heads, a.head_dim}), "q");
  a.pool = c.Buffer<unsigned char>(1, c.Count({a.kv.blocks, static_cast<int64_t>(a.kv.block), static_cast<int64_t>(eb)}), "pool");
  a.tables = c.Buffer<int32_t>(2, c.Count({seqs, a.width}), "blockTables");
  a.lens = c.Buffer<int32_t>(3, c.Count({seqs}), "seqLens");
  a.out = c.Buffer<float>(4, c.Count({seqs, heads, a.value_dim}), "out");
  if (seqs == 0) return;

  const int per = a.head_dim <= 64 ? 2 : a.head_dim <= 128 ? 4 : a.head_dim <= 256 ? 8 : 18;
  const int kg = GroupPerBlock(per, a.group), chunks_per_kv = (a.group + kg - 1) / kg;
  // Splits: enough blocks for 8 per SM (32 warps, the occupancy the register use allows), split
  // no shorter than kMinSplitLen, as many as the workspace holds; splitLen forces a length.
  const int64_t max_len = c.IntOr("maxLen", cap, 1, cap);
  const int64_t forced = c.IntOr("splitLen", 0, 0, INT32_MAX);
  const size_t per_split = c.Count({seqs, heads, a.value_dim + 2}) * sizeof(float);
  const size_t room = c.buffers.size() > 5 ? c.buffers[5].bytes / per_split : 0;
  int64_t split_len;
  if (forced) {
    split_len = forced;
    const int64_t splits = (max_len + split_len - 1) / split_len;
    if (splits > 1 && room < static_cast<size_t>(splits))
      c.Invalid("workspace (buffer 5) holds " + std::to_string(c.buffers.size() > 5 ? c.buffers[5].bytes : 0) +
                " bytes, " + std::to_string(splits) + " splits need " + std::to_string(splits * per_split));
  } else {
    const int64_t units = seqs * kv_heads * chunks_per_kv;
    const int64_t want_blocks = int64_t(dev.multiprocessors > 0 ? dev.multiprocessors : 1) * 8;
    int64_t splits = std::max<int64_t>(1, (want_blocks + units - 1) / units);
    splits = std::min<int64_t>(splits, (max_len + kMinSplitLen - 1) / kMinSplitLen);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, static_cast<int64_t>(std::min<size_t>(room, 1 << 16))));
    split_len = (max_len + splits - 1) / splits;
    split_len = (split_len + 63) / 64 * 64;  // whole rounds of the 4 warps' 16 rows
  }
  a.split_len = static_cast<int>(std::min<int64_t>(split_len, cap));
  a.splits = static_cast<int>((max_len + a.split_len - 1) / a.split_len);
  // maxLen is a promise lib/cuda checks; a longer sequence is cut at the splits launched (never
  // past the workspace) rather than read out of bounds.
  a.limit = static_cast<int>(std::min<int64_t>(cap, int64_t(a.splits) * a.split_len));
  if (a.splits > 1) a.part = static_cast<float*>(c.buffers[5].data);

  const dim3 grid(static_cast<unsigned>(a.splits * chunks_per_kv), static_cast<unsigned>(kv_heads), static_cast<unsigned>(seqs));
  const size_t shared = size_t(kDecodeWarps) * kg * (2 + a.value_dim) * sizeof(float);
  switch (type) {
    case kKvF32: LaunchDecodeType<kKvF32>(a, per, kg, grid, shared, st); break;
    case kKvF16: LaunchDecodeType<kKvF16>(a, per, kg, grid, shared, st); break;
    default: LaunchDecodeType<kKvBf16>(a, per, kg, grid, shared, st); break;
  }
  if (a.splits > 1) Launch(CombineKernel, dim3(static_cast<unsigned>(heads), static_cast<unsigned>(seqs)), dim3(128),
                           size_t(a.splits) * sizeof(float), st, a);
}

void PagedDecodeOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) { Decode(st, dev, c, false); }
void MlaDecodeOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) { Decode(st, dev, c, true); }

}  // namespace

SONDE_GPU_OP("paged_attention_decode", PagedDecodeOp);
SONDE_GPU_OP("mla_attention_decode", MlaDecodeOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
