// Paged attention for decode (one new query row per sequence) over the KV block pool, split-K
// ("flash-decoding"): a sequence's positions are cut into splits of split_len, each split is one
// block that folds its positions into (max, sum, acc) with an online softmax, and a second kernel
// combines the splits exactly (rescaling each by exp(max_i - max)). Long contexts so use many SMs
// even for one sequence; with one split the first kernel writes the normalised output itself.
//
// Two kernels compute a split:
// - tensor cores (16-bit KV with rows of whole 16-byte chunks, cc >= 8.0; see DecodeMmaKernel):
//   the query heads of a KV group are the rows of an mma, K/V tiles stream through shared memory
//   by cp.async, each K/V byte is read once per 16 heads;
// - SIMT (fp32 KV, odd head sizes, older GPUs, or simt forced): a block serves one KV head and up
//   to kG of the query heads that share it. Its 4 warps take positions round-robin; a warp reads a
//   row with its 32 lanes side by side (lane l holds elements l*kV.. of each 32*kV-wide chunk: 8-
//   or 16-byte loads), reduces the dot products with shuffles, and keeps its own online-softmax
//   state, merged across warps through shared memory at the end.
//
// MLA (deepseek2) decode is the same kernels over the latent cache: one stream whose row is
// [latent | rope key], every query head attends to it as key (absorbed query, kv_lora + rope wide)
// and as value (its first kv_lora elements), output kv_lora wide per head. On tensor cores the
// heads (16 per block) share one read of each latent row, and the value is the key tile's first
// kv_lora columns: the cache is read once, not once per head.
#include <algorithm>
#include <cmath>

#include "kernels/attention/cuda/paged.h"
#include "kernels/quant/cuda/quantize_acts.h"

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
  int stages;  // SIMT kernel staged through shared memory: tiles of kSimtTile positions in the ring
  float scale;
  // direct: the one split writes out itself; otherwise every split writes its partial and
  // CombineKernel, launched after, combines them (and quantises out where xq is set).
  bool direct;
  bool early;  // the combine lets the next kernel launch before its wait (GpuEarlyDependents)
  int8_t* xq;  // also out quantised (quantize_acts.h's rule, rows of heads * value_dim), or null
  float* xd;
};

// The SIMT kernel streams K/V through shared memory in tiles of this many positions (whole rounds
// of the 4 warps' 4 or 2 positions) where rows are whole 16-byte chunks and cp.async exists.
constexpr int kSimtTile = 32;

// Bytes of the SIMT kernel's warp merge area; the staging ring follows it.
__host__ __device__ inline size_t SimtMergeBytes(int kg, int value_dim) { return (size_t(kDecodeWarps) * kg * (2 + value_dim) * sizeof(float) + 15) / 16 * 16; }
size_t SimtStageBytes(int head_dim, int value_dim, bool separate_v, size_t eb) {
  return size_t(kSimtTile) * ((head_dim + (separate_v ? value_dim : 0)) * eb + sizeof(int));
}

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

template <int kType, int kPer, int kV, int kG, bool kStaged>
__global__ void __launch_bounds__(kDecodeWarps * 32) DecodeKernel(DecodeArgs a) {
  GridDependencyStart();
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
  // round instead of once per position. Staged, the rows come from a ring of tiles in shared memory
  // that cp.async fills `stages - 1` tiles ahead, so far more bytes are in flight than a warp's
  // registers hold.
  const size_t eb = sizeof(T);
  const int kchunks = int(a.head_dim * eb / 16), vchunks = int(a.value_dim * eb / 16);
  T* ring_k = nullptr;
  T* ring_v = nullptr;
  int* ring_ok = nullptr;
  int tiles = 1;
  const int tid = threadIdx.x, tpr = kDecodeWarps * 32 / kSimtTile, lrow = tid % kSimtTile, lchunk = tid / kSimtTile;
  const auto issue = [&](int it) {
    const int st = it % a.stages, pos = p0 + it * kSimtTile + lrow;
    const int id = pos < p1 ? table[pos / a.kv.block_size] : -1;
    const bool ok = id >= 0 && id < a.kv.blocks;
    const T* row = ok ? pool + size_t(id) * a.kv.block + key_at + size_t(pos % a.kv.block_size) * a.kv.row : pool;
    T* kd = ring_k + (size_t(st) * kSimtTile + lrow) * a.head_dim;
    for (int c = lchunk; c < kchunks; c += tpr) CpAsync16(kd + c * 16 / eb, ok ? row + c * 16 / eb : pool, ok ? 16 : 0);
    if (!values_in_keys) {
      T* vd = ring_v + (size_t(st) * kSimtTile + lrow) * a.value_dim;
      for (int c = lchunk; c < vchunks; c += tpr) CpAsync16(vd + c * 16 / eb, ok ? row + a.kv.value + c * 16 / eb : pool, ok ? 16 : 0);
    }
    if (lchunk == 0) ring_ok[st * kSimtTile + lrow] = ok;
  };
  if constexpr (kStaged) {
    SONDE_DYNAMIC_SHARED(unsigned char, raw);
    unsigned char* ring = raw + SimtMergeBytes(kG, a.value_dim);
    ring_k = reinterpret_cast<T*>(ring);
    ring_v = ring_k + size_t(a.stages) * kSimtTile * a.head_dim;
    ring_ok = reinterpret_cast<int*>(ring_v + (values_in_keys ? 0 : size_t(a.stages) * kSimtTile * a.value_dim));
    tiles = p1 > p0 ? (p1 - p0 + kSimtTile - 1) / kSimtTile : 0;
    for (int j = 0; j < a.stages - 1; ++j) {
      if (j < tiles) issue(j);
      CpAsyncCommit();
    }
  }
  for (int it = 0; it < tiles; ++it) {
  int q0 = p0, q1 = p1, st = 0;
  if constexpr (kStaged) {
    q0 = p0 + it * kSimtTile, q1 = min(p1, q0 + kSimtTile), st = it % a.stages;
    if (a.stages <= 2) CpAsyncWait<0>(); else if (a.stages == 3) CpAsyncWait<1>(); else CpAsyncWait<2>();
    __syncthreads();  // tile it has landed, and every warp is done with tile it - 1
    if (it + a.stages - 1 < tiles) issue(it + a.stages - 1);
    CpAsyncCommit();
  }
  for (int pb = q0 + warp * kU; pb < q1; pb += kDecodeWarps * kU) {
    float kx[kU][kPer], vx[kU][kPer];
    bool ok[kU];
    SONDE_ATTN_UNROLL
    for (int u = 0; u < kU; ++u) {
      const int p = pb + u;
      const T* kr;
      const T* vr;
      if constexpr (kStaged) {
        const int r = p - q0;  // < kSimtTile: tiles hold whole rounds
        ok[u] = p < q1 && ring_ok[st * kSimtTile + r];
        kr = ring_k + (size_t(st) * kSimtTile + r) * a.head_dim;
        vr = values_in_keys ? kr : ring_v + (size_t(st) * kSimtTile + r) * a.value_dim;
      } else {
        const int id = p < p1 ? table[p / a.kv.block_size] : -1;
        ok[u] = id >= 0 && id < a.kv.blocks;  // lib/cuda rejects bad ids; here they only must not fault
        kr = ok[u] ? pool + size_t(id) * a.kv.block + key_at + size_t(p % a.kv.block_size) * a.kv.row : pool;
        vr = kr + a.kv.value;
      }
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
          LoadWide<kType, kV>(vr + d, vd);
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

  }  // tiles

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
    if (a.direct) {
      a.out[head * a.value_dim + d] = sum > 0.0f ? v / sum : 0.0f;
    } else {
      float* pr = a.part + (head * a.splits + split) * (a.value_dim + 2);
      pr[d] = v;
      if (d == 0) pr[a.value_dim] = mx, pr[a.value_dim + 1] = sum;
    }
  }
}

// One block per (head, sequence): out = sum_i w_i acc_i / sum_i w_i sum_i, w_i = exp(max_i - max).
// With xq, out is also quantised, a warp per block of 32 values (value_dim % 32 == 0: the loop's
// trip count is the same in every lane of a warp), so the product reading it skips its quantiser.
__global__ void __launch_bounds__(128) CombineKernel(DecodeArgs a) {
  // The output product (o) launches at once: its weight lines start toward L2 during the attention.
  GridDependencyStart(a.early);
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
  for (int d0 = 0; d0 < a.value_dim; d0 += blockDim.x) {
    const int d = d0 + static_cast<int>(threadIdx.x);
    float v = 0.0f;
    if (d < a.value_dim) {
      for (int i = 0; i < n; ++i) v += weight[i] * pr[i * (a.value_dim + 2) + d];
      v = sum > 0.0f ? v / sum : 0.0f;
      a.out[head * a.value_dim + d] = v;
    }
    if (a.xq) QuantizeActBlock<1>({v}, head * a.value_dim + d, d < a.value_dim, a.xq, a.xd);
  }
}

// ---- tensor cores: the query heads of a KV group as the rows of an mma ----
// One block per (16 query heads of a KV group, KV head, split): every K/V byte of the split is read
// from memory once for all of its heads (for MLA, once for all heads of the sequence), streamed
// through shared memory by cp.async in a ring of `stages` tiles of `tile` positions, so several
// tiles' loads stay in flight while the tensor cores work on an earlier one; memory, not the
// arithmetic, sets the pace. Per tile: each of the 4 warps scores tile/4 positions (S = Q K^T,
// m16n8k16 with the heads as the 16 rows), the warps agree on the rows' new maximum through shared
// memory, write P, and each warp accumulates O += P V for its own quarter of the value columns
// (n-tiles warp, warp + 4, ...), so a wide MLA value row (512) is split over the warps instead of
// held by each. Q and P enter the mma as two 16-bit terms each (hi + lo, lo = the rounding error of
// hi): twice the mma work, which the memory time hides, for scores and weights near fp32 accuracy
// where a single 16-bit Q would cost ~3 decimal digits.
constexpr int kMmaWarps = 4, kMmaHeads = 16;

struct MmaPlan {
  int tile = 0, stages = 0, kpad = 0, pitch = 0;  // kpad: key width rounded to 32; pitch: smem row, halves
  size_t shared = 0;
  int per_sm = 0;  // blocks resident per SM by shared memory
};

__device__ __forceinline__ void CpAsyncWaitUpTo(int pending) {
  if (pending <= 0)
    CpAsyncWait<0>();
  else if (pending == 1)
    CpAsyncWait<1>();
  else
    CpAsyncWait<2>();
}

template <int kType>
__device__ __forceinline__ void MmaKv(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kType == kKvF16)
    MmaF16(d, a, b);
  else
    MmaBf16(d, a, b);
}

template <int kType>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi) {
  return uint32_t(KvElem<kType>::Put(lo)) | uint32_t(KvElem<kType>::Put(hi)) << 16;
}

// kNtw: value n-tiles (8 columns) per warp at most, value_dim <= 32 * kNtw.
template <int kType, int kNtw>
__global__ void __launch_bounds__(kMmaWarps * 32) DecodeMmaKernel(DecodeArgs a, MmaPlan plan) {
  GridDependencyStart();
  using E = KvElem<kType>;
  const int chunks_per_kv = (a.group + kMmaHeads - 1) / kMmaHeads;
  const int hc = static_cast<int>(blockIdx.x) % chunks_per_kv, split = static_cast<int>(blockIdx.x) / chunks_per_kv;
  const int kvh = blockIdx.y, s = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  int len = a.lens[s];
  len = len < 0 ? 0 : len > a.limit ? a.limit : len;
  const int p0 = split * a.split_len, p1 = min(len, p0 + a.split_len);
  if (!a.direct && p0 >= p1) return;  // past the end: the combine reads no partial of this split
  const int nh = min(kMmaHeads, a.group - hc * kMmaHeads), head0 = kvh * a.group + hc * kMmaHeads;
  const int tile = plan.tile, stages = plan.stages, pitch = plan.pitch, kpad = plan.kpad;
  const bool separate_v = a.kv.value != 0;

  // Shared: K tiles [stage][tile][pitch], V tiles (dense models) likewise, Q [hi|lo][16][pitch],
  // P [hi|lo][16][tile + 8], then fp32 row maxima / sums [warp][16] and the tiles' key flags.
  SONDE_DYNAMIC_SHARED(uint16_t, sh);
  uint16_t* sk = sh;
  uint16_t* sv = sk + size_t(stages) * tile * pitch;
  uint16_t* sq = sv + (separate_v ? size_t(stages) * tile * pitch : 0);
  const int ppitch = tile + 8;
  uint16_t* sp = sq + 2 * kMmaHeads * pitch;
  float* smax = reinterpret_cast<float*>(sp + 2 * kMmaHeads * ppitch);
  int* key_ok = reinterpret_cast<int*>(smax + kMmaWarps * kMmaHeads);

  // Q (scaled) as hi + lo in the KV's 16-bit type; rows past the group's heads and columns past the
  // key width are zero, so they add nothing to any score.
  for (int i = tid; i < kMmaHeads * kpad; i += blockDim.x) {
    const int r = i / kpad, c = i % kpad;
    const float v = r < nh && c < a.head_dim ? a.q[(size_t(s) * a.heads + head0 + r) * a.head_dim + c] * a.scale : 0.0f;
    const uint16_t hi = E::Put(v);
    sq[r * pitch + c] = hi;
    sq[(kMmaHeads + r) * pitch + c] = E::Put(v - E::Get(hi));
  }

  const uint16_t* pool = static_cast<const uint16_t*>(a.pool);
  const int32_t* table = a.tables + size_t(s) * a.width;
  const size_t key_at = a.kv.key + size_t(kvh) * a.kv.stream;
  const int kchunks = kpad / 8, kreal = a.head_dim / 8, vchunks = a.value_dim / 8;
  // Loader: threads_per_row threads share a row's 16-byte chunks; one table read per row and tile.
  const int tpr = blockDim.x / tile, lrow = tid % tile, lchunk = tid / tile;
  const int tiles = p1 > p0 ? (p1 - p0 + tile - 1) / tile : 0;
  const auto issue = [&](int it) {
    const int st = it % stages, pos = p0 + it * tile + lrow;
    const int id = pos < p1 ? table[pos / a.kv.block_size] : -1;
    const bool ok = id >= 0 && id < a.kv.blocks;  // lib/cuda rejects bad ids; here they only must not fault
    const uint16_t* row = ok ? pool + size_t(id) * a.kv.block + key_at + size_t(pos % a.kv.block_size) * a.kv.row : pool;
    uint16_t* kd = sk + (size_t(st) * tile + lrow) * pitch;
    for (int c = lchunk; c < kchunks; c += tpr) {
      const bool real = ok && c < kreal;  // columns past the key width are zero-filled
      CpAsync16(kd + c * 8, real ? row + c * 8 : pool, real ? 16 : 0);
    }
    if (separate_v) {
      uint16_t* vd = sv + (size_t(st) * tile + lrow) * pitch;
      for (int c = lchunk; c < vchunks; c += tpr) CpAsync16(vd + c * 8, ok ? row + a.kv.value + c * 8 : pool, ok ? 16 : 0);
    }
    if (lchunk == 0) key_ok[st * tile + lrow] = ok;
  };

  float o[kNtw][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g + 8
  const int wpos = warp * (tile / kMmaWarps), ntiles = tile / 32;  // this warp's first position; its 8-key n-tiles
  const int vtiles = a.value_dim / 8;
  // ldmatrix row addresses: A fragments (Q, P) take rows l%8 + 8((l/8)&1), columns +8 for l >= 16;
  // K's B fragments rows l%8 of an n-tile, columns 8(l/8) over a pair of k-steps; V's (trans)
  // rows l of a 32-position pair of k-steps.
  const int arow = lane % 8 + 8 * ((lane / 8) & 1), acol = 8 * (lane / 16);

  for (int j = 0; j < stages - 1; ++j) {
    if (j < tiles) issue(j);
    CpAsyncCommit();
  }
  for (int it = 0; it < tiles; ++it) {
    CpAsyncWaitUpTo(stages - 2);
    __syncthreads();  // tile `it` is in shared memory, and every warp is done with tile it - 1
    if (it + stages - 1 < tiles) issue(it + stages - 1);
    CpAsyncCommit();
    const int st = it % stages;
    const uint16_t* kt = sk + size_t(st) * tile * pitch;
    const uint16_t* vt = separate_v ? sv + size_t(st) * tile * pitch : kt;

    // S for this warp's positions [wpos, wpos + tile/4): ntiles n-tiles of 8.
    float sc[2][4] = {};
    for (int kc = 0; kc < kpad / 16; kc += 2) {
      uint32_t qa[2][2][4];  // [hi|lo][k-step of the pair]
      SONDE_UNROLL
      for (int part = 0; part < 2; ++part)
        SONDE_UNROLL
        for (int k = 0; k < 2; ++k) LdMatrixX4(qa[part][k], sq + (part * kMmaHeads + arow) * pitch + 16 * (kc + k) + acol);
      SONDE_UNROLL
      for (int nt = 0; nt < 2; ++nt) {
        if (nt >= ntiles) break;
        uint32_t kb[4];
        LdMatrixX4(kb, kt + (wpos + nt * 8 + lane % 8) * pitch + 16 * kc + 8 * (lane / 8));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        SONDE_UNROLL
        for (int part = 0; part < 2; ++part) {
          MmaKv<kType>(sc[nt], qa[part][0], b0);
          MmaKv<kType>(sc[nt], qa[part][1], b1);
        }
      }
    }
    // The tile's row maxima over all warps, then P = exp(S - m_new) and the rescale of what came before.
    float mx[2] = {-INFINITY, -INFINITY};
    SONDE_UNROLL
    for (int nt = 0; nt < 2; ++nt) {
      if (nt >= ntiles) break;
      SONDE_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int col = wpos + nt * 8 + 2 * t + (i & 1);
        if (!key_ok[st * tile + col]) sc[nt][i] = -INFINITY;
        mx[i >> 1] = fmaxf(mx[i >> 1], sc[nt][i]);
      }
    }
    SONDE_UNROLL
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      if (t == 0) smax[warp * kMmaHeads + g + 8 * r] = mx[r];
    }
    __syncthreads();
    float alpha[2];
    SONDE_UNROLL
    for (int r = 0; r < 2; ++r) {
      float mn = m[r];
      SONDE_UNROLL
      for (int w = 0; w < kMmaWarps; ++w) mn = fmaxf(mn, smax[w * kMmaHeads + g + 8 * r]);
      alpha[r] = mn == -INFINITY ? 1.0f : __expf(m[r] - mn);
      m[r] = mn;
      l[r] *= alpha[r];
    }
    SONDE_UNROLL
    for (int nt = 0; nt < 2; ++nt) {
      if (nt >= ntiles) break;
      float p[4];
      SONDE_UNROLL
      for (int i = 0; i < 4; ++i) {
        p[i] = sc[nt][i] == -INFINITY ? 0.0f : __expf(sc[nt][i] - m[i >> 1]);
        l[i >> 1] += p[i];
      }
      const int col = wpos + nt * 8 + 2 * t;
      SONDE_UNROLL
      for (int r = 0; r < 2; ++r) {
        const uint32_t hi = PackPair<kType>(p[2 * r], p[2 * r + 1]);
        const uint32_t lo = PackPair<kType>(p[2 * r] - E::Get(static_cast<uint16_t>(hi)), p[2 * r + 1] - E::Get(static_cast<uint16_t>(hi >> 16)));
        StoreVec<uint32_t>(sp + (g + 8 * r) * ppitch + col, hi);
        StoreVec<uint32_t>(sp + (kMmaHeads + g + 8 * r) * ppitch + col, lo);
      }
    }
    SONDE_UNROLL
    for (int j = 0; j < kNtw; ++j)
      SONDE_UNROLL
      for (int i = 0; i < 4; ++i) o[j][i] *= alpha[i >> 1];
    __syncthreads();  // P of every warp's positions is in shared memory

    // O += P V over the tile's tile/16 k-steps, for this warp's value n-tiles.
    for (int kp = 0; kp < ntiles; ++kp) {
      uint32_t pa[2][2][4];  // [hi|lo][k-step of the pair]
      SONDE_UNROLL
      for (int part = 0; part < 2; ++part)
        SONDE_UNROLL
        for (int k = 0; k < 2; ++k) LdMatrixX4(pa[part][k], sp + (part * kMmaHeads + arow) * ppitch + 16 * (2 * kp + k) + acol);
      SONDE_UNROLL
      for (int j = 0; j < kNtw; ++j) {
        const int nt = warp + kMmaWarps * j;
        if (nt >= vtiles) break;
        uint32_t vb[4];
        LdMatrixX4Trans(vb, vt + (32 * kp + lane) * pitch + 8 * nt);
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        SONDE_UNROLL
        for (int part = 0; part < 2; ++part) {
          MmaKv<kType>(o[j], pa[part][0], b0);
          MmaKv<kType>(o[j], pa[part][1], b1);
        }
      }
    }
  }

  // The rows' sums over the quad's lanes and the warps (every warp rescaled by the same maxima).
  SONDE_UNROLL
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  __syncthreads();  // smax is free
  if (t == 0) smax[warp * kMmaHeads + g] = l[0], smax[warp * kMmaHeads + g + 8] = l[1];
  __syncthreads();
  SONDE_UNROLL
  for (int r = 0; r < 2; ++r) {
    float sum = 0.0f;
    SONDE_UNROLL
    for (int w = 0; w < kMmaWarps; ++w) sum += smax[w * kMmaHeads + g + 8 * r];
    const int row = g + 8 * r;
    if (row >= nh) continue;
    const size_t head = size_t(s) * a.heads + head0 + row;
    if (a.direct) {
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      float* orow = a.out + head * a.value_dim;
      SONDE_UNROLL
      for (int j = 0; j < kNtw; ++j) {
        const int nt = warp + kMmaWarps * j;
        if (nt >= vtiles) break;
        StoreVec<float2>(orow + 8 * nt + 2 * t, make_float2(o[j][2 * r] * inv, o[j][2 * r + 1] * inv));
      }
    } else {
      float* pr = a.part + (head * a.splits + split) * (a.value_dim + 2);
      SONDE_UNROLL
      for (int j = 0; j < kNtw; ++j) {
        const int nt = warp + kMmaWarps * j;
        if (nt >= vtiles) break;
        StoreVec<float2>(pr + 8 * nt + 2 * t, make_float2(o[j][2 * r], o[j][2 * r + 1]));
      }
      if (warp == 0 && t == 0) pr[a.value_dim] = m[r], pr[a.value_dim + 1] = sum;
    }
  }
}

// Shared memory of the mma kernel for a tile and stage count.
size_t MmaShared(int tile, int stages, int pitch, bool separate_v) {
  return size_t(stages) * tile * pitch * 2 * (separate_v ? 2 : 1) + size_t(2) * kMmaHeads * pitch * 2 +
         size_t(2) * kMmaHeads * (tile + 8) * 2 + size_t(kMmaWarps) * kMmaHeads * 4 + size_t(stages) * tile * 4;
}

// The tile (64 positions, or 32 where 64 does not fit twice; only_tile pins one) and stage count
// (2..4) that keep the most bytes in flight per SM; stage count 0 when not even two tiles fit.
MmaPlan PlanMma(int head_dim, bool separate_v, size_t shared_limit, int only_tile) {
  MmaPlan best;
  const int kpad = (head_dim + 31) / 32 * 32, pitch = kpad + 8;  // pitch/8 odd: ldmatrix rows hit distinct banks
  const size_t per_sm = shared_limit + 1024;  // what an SM has: the opt-in block maximum plus the 1 KiB it reserves
  size_t best_flight = 0;
  for (const int tile : {64, 32}) {
    if (only_tile && tile != only_tile) continue;
    for (int stages = 2; stages <= 4; ++stages) {
      const size_t shared = MmaShared(tile, stages, pitch, separate_v);
      if (shared > shared_limit) break;
      const int resident = static_cast<int>(std::min<size_t>(per_sm / (shared + 1024), 8));
      const size_t flight = size_t(resident) * (stages - 1) * tile * pitch * (separate_v ? 2 : 1);
      if (flight > best_flight) {
        best_flight = flight;
        best = MmaPlan{tile, stages, kpad, pitch, shared, resident};
      }
    }
    if (best.stages) break;  // 64 fits: a wider tile halves the per-tile fixed work
  }
  return best;
}

template <int kType>
void LaunchDecodeMma(const DecodeArgs& a, const MmaPlan& plan, dim3 grid, GpuStream& st) {
  const int ntw = (a.value_dim / 8 + kMmaWarps - 1) / kMmaWarps;
  const dim3 block(kMmaWarps * 32);
  if (ntw <= 2)
    LaunchDependent(DecodeMmaKernel<kType, 2>, grid, block, plan.shared, st, a, plan);
  else if (ntw <= 4)
    LaunchDependent(DecodeMmaKernel<kType, 4>, grid, block, plan.shared, st, a, plan);
  else if (ntw <= 8)
    LaunchDependent(DecodeMmaKernel<kType, 8>, grid, block, plan.shared, st, a, plan);
  else
    LaunchDependent(DecodeMmaKernel<kType, 16>, grid, block, plan.shared, st, a, plan);
}

template <int kType, int kPer, int kV>
void LaunchDecode(const DecodeArgs& a, int kg, dim3 grid, size_t shared, GpuStream& st) {
  constexpr int kMax = GroupPerBlock(kPer);
  const dim3 block(kDecodeWarps * 32);
  if (a.stages) {
    if (kg == kMax)
      LaunchDependent(DecodeKernel<kType, kPer, kV, kMax, true>, grid, block, shared, st, a);
    else
      LaunchDependent(DecodeKernel<kType, kPer, kV, kMax / 2, true>, grid, block, shared, st, a);
  } else {
    if (kg == kMax)
      LaunchDependent(DecodeKernel<kType, kPer, kV, kMax, false>, grid, block, shared, st, a);
    else
      LaunchDependent(DecodeKernel<kType, kPer, kV, kMax / 2, false>, grid, block, shared, st, a);
  }
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
// count), 6 out quantised (with quantize = 1: rows * n int8, then rows * n / 32 fp32 scales,
// n = heads * value_dim, as quant_matmul's activations; written by the combine, so it needs the
// workspace even for one split). mla: the latent form (kvLora, ropeDim) instead of
// kvHeads/headDim.
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
  // Per head whole 32-blocks: a warp of the combine quantises one.
  if (c.IntOr("quantize", 0, 0, 1) && a.value_dim % 32)
    c.Invalid("quantize needs a value width that is a multiple of 32, got " + std::to_string(a.value_dim));
  QuantOutput(c, 6, seqs, heads * a.value_dim, &a.xq, &a.xd, "quantised out");
  const bool quantize = a.xq != nullptr;
  if (seqs == 0) return;

  // Tensor cores for 16-bit KV whose rows are whole 16-byte chunks (cp.async, ldmatrix), on cc 8.0+,
  // when two tiles fit in shared memory; the SIMT kernel otherwise (or with simt set). tile (32 or
  // 64) pins the mma kernel's tile, for tests of both.
  const bool simt = c.NumOr("simt", 0) != 0;
  const int64_t forced_tile = c.IntOr("tile", 0, 0, 64);
  if (forced_tile != 0 && forced_tile != 32 && forced_tile != 64) c.Invalid("tile must be 32 or 64, got " + std::to_string(forced_tile));
  MmaPlan plan;
  if (!simt && type != kKvF32 && ComputeCapability(dev) >= 80 && a.head_dim % 8 == 0 && a.value_dim % 8 == 0 &&
      a.value_dim <= 32 * 16) {
    plan = PlanMma(a.head_dim, !mla, dev.shared_per_block ? dev.shared_per_block : 48 * 1024, static_cast<int>(forced_tile));
  }
  const bool mma = plan.stages > 0;

  const int per = a.head_dim <= 64 ? 2 : a.head_dim <= 128 ? 4 : a.head_dim <= 256 ? 8 : 18;
  const int kg = mma ? kMmaHeads : GroupPerBlock(per, a.group), chunks_per_kv = (a.group + kg - 1) / kg;
  // Splits: as many as the workspace holds at most; splitLen forces a length.
  const int64_t max_len = c.IntOr("maxLen", cap, 1, cap);
  const int64_t forced = c.IntOr("splitLen", 0, 0, INT32_MAX);
  const size_t per_split = c.Count({seqs, heads, a.value_dim + 2}) * sizeof(float);
  const size_t room = c.buffers.size() > 5 ? c.buffers[5].bytes / per_split : 0;
  const int64_t units = seqs * kv_heads * chunks_per_kv;
  const int64_t sms = dev.multiprocessors > 0 ? dev.multiprocessors : 1;
  int64_t split_len;
  if (forced) {
    split_len = forced;
    const int64_t splits = (max_len + split_len - 1) / split_len;
    if (splits > 1 && room < static_cast<size_t>(splits))
      c.Invalid("workspace (buffer 5) holds " + std::to_string(c.buffers.size() > 5 ? c.buffers[5].bytes : 0) +
                " bytes, " + std::to_string(splits) + " splits need " + std::to_string(splits * per_split));
  } else if (mma) {
    // The split count that finishes soonest: every block streams split_len positions, the blocks
    // run in waves of (SMs x blocks per SM), and a block's fixed work (Q, pipeline fill, partial
    // write and its share of the combine) costs about two tiles.
    const int64_t slots = sms * std::min(plan.per_sm, 4), tile = plan.tile;
    const int64_t most = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(std::min<size_t>(room, 1 << 16)),
                                                                  (max_len + tile - 1) / tile, 4096}));
    int64_t best_cost = INT64_MAX;
    split_len = max_len;
    for (int64_t want = 1; want <= most; ++want) {
      const int64_t len = ((max_len + want - 1) / want + tile - 1) / tile * tile;
      const int64_t n = (max_len + len - 1) / len;
      const int64_t cost = (units * n + slots - 1) / slots * (len / tile + 2);
      if (cost < best_cost) best_cost = cost, split_len = len;
    }
  } else {
    // Enough blocks for 8 per SM (32 warps, the occupancy the register use allows), splits no
    // shorter than kMinSplitLen while that still gives every SM a block; shorter ones (down to a
    // round of the 4 warps' 16 rows) where it does not: one sequence of a few hundred positions
    // is then spread over the GPU instead of a few SMs each walking 256 positions alone.
    const int64_t want_blocks = sms * 8;
    int64_t splits = std::max<int64_t>(1, (want_blocks + units - 1) / units);
    const int64_t min_len = units * ((max_len + kMinSplitLen - 1) / kMinSplitLen) >= sms ? kMinSplitLen : 64;
    splits = std::min<int64_t>(splits, (max_len + min_len - 1) / min_len);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, static_cast<int64_t>(std::min<size_t>(room, 1 << 16))));
    split_len = (max_len + splits - 1) / splits;
    split_len = (split_len + 63) / 64 * 64;  // whole rounds of the 4 warps' 16 rows
  }
  a.split_len = static_cast<int>(std::min<int64_t>(split_len, cap));
  a.splits = static_cast<int>((max_len + a.split_len - 1) / a.split_len);
  // maxLen is a promise lib/cuda checks; a longer sequence is cut at the splits launched (never
  // past the workspace) rather than read out of bounds.
  a.limit = static_cast<int>(std::min<int64_t>(cap, int64_t(a.splits) * a.split_len));
  a.direct = a.splits == 1 && !quantize;
  a.early = GpuEarlyDependents();
  if (!a.direct) {
    if (room < 1) c.Invalid("the split results need the workspace (buffer 5): " + std::to_string(per_split) + " bytes per split");
    a.part = static_cast<float*>(c.buffers[5].data);
  }

  const dim3 grid(static_cast<unsigned>(a.splits * chunks_per_kv), static_cast<unsigned>(kv_heads), static_cast<unsigned>(seqs));
  if (mma) {
    if (type == kKvF16)
      LaunchDecodeMma<kKvF16>(a, plan, grid, st);
    else
      LaunchDecodeMma<kKvBf16>(a, plan, grid, st);
  } else {
    // Staged through shared memory (cc 8.0+, rows of whole 16-byte chunks): the stage count (2..4)
    // that keeps the most bytes in flight per SM; unstaged otherwise.
    size_t shared = SimtMergeBytes(kg, a.value_dim);
    const size_t limit = dev.shared_per_block ? dev.shared_per_block : 48 * 1024;
    if (ComputeCapability(dev) >= 80 && a.head_dim * eb % 16 == 0 && a.value_dim * eb % 16 == 0) {
      const size_t stage = SimtStageBytes(a.head_dim, a.value_dim, !mla, eb);
      size_t best = 0;
      for (int stages = 2; stages <= 4; ++stages) {
        const size_t need = shared + stages * stage;
        if (need > limit) break;
        const size_t flight = std::min<size_t>((limit + 1024) / (need + 1024), 8) * (stages - 1) * stage;
        if (flight > best) best = flight, a.stages = stages;
      }
      if (a.stages) shared += a.stages * stage;
    }
    switch (type) {
      case kKvF32: LaunchDecodeType<kKvF32>(a, per, kg, grid, shared, st); break;
      case kKvF16: LaunchDecodeType<kKvF16>(a, per, kg, grid, shared, st); break;
      default: LaunchDecodeType<kKvBf16>(a, per, kg, grid, shared, st); break;
    }
  }
  if (!a.direct)
    LaunchDependent(CombineKernel, dim3(static_cast<unsigned>(heads), static_cast<unsigned>(seqs)), dim3(128),
                    size_t(a.splits) * sizeof(float), st, a);
}

void PagedDecodeOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) { Decode(st, dev, c, false); }
void MlaDecodeOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) { Decode(st, dev, c, true); }

}  // namespace

SONDE_GPU_OP("paged_attention_decode", PagedDecodeOp);
SONDE_GPU_OP("mla_attention_decode", MlaDecodeOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
