// Mixture-of-Experts dispatch on the GPU (the CPU family: kernels/moe, ops/moe.cc), in five steps
// that each are one launch (or two) over the whole batch:
//   route    router logits -> softmax/sigmoid scores -> (group-limited) top-k ids and weights,
//            one warp per token;
//   dispatch tokens per expert, the exclusive scan of those counts, and the permutation that
//            groups the (token, slot) pairs by expert, in token order within an expert;
//   gate_up  h = silu(x W_gate^T) * (x W_up^T) for every expert's group of rows, one grouped GEMM
//            launch for all experts (blocks map to (expert, row tile) pairs from the offsets),
//            reading x's rows through the permutation instead of copying them;
//   down     yo = h W_down^T, the same grouped GEMM;
//   combine  y[t] = sum_j weight[t, j] * yo[row of (t, j)], in slot order.
// "moe" runs all of them in one native call (the router GEMM is the grouped GEMM with one group).
//
// Determinism: no float atomics anywhere. A permuted row's position comes from ballot ranks in
// token order (not from an atomic counter), every output element of a GEMM is one thread's (one
// warp's) sum in a fixed k order, and combine sums each output element in one thread in slot
// order. Results are therefore bitwise the same from run to run, whatever the scheduling.
//
// Weights are float32 or bfloat16 (raw uint16 bits), each expert's matrix row-major [rows, cols] as
// GGUF stores it (y = x W^T). Three GEMM kernels, chosen per launch (ResolveKernel) or forced by
// the `kernel` parameter: 64 x 64 tiles on tensor cores for bf16 weights (MmaBf16, cc >= 8.0;
// activations rounded to bf16, fp32 sums), 64 x 64 tiles on the SIMT cores in fp32 (float32
// weights, or bf16 below cc 8.0; bf16 widened exactly), and a warp-per-column kernel for groups of
// a few rows (decode), also fp32.
#include <algorithm>
#include <cmath>
#include <string>

#include "runtime/cuda/dialect.h"

// Full unrolling keeps the accumulator arrays in registers (nvcc left the dual tensor-core
// kernel's 64 accumulators in local memory without it); the host compiler has no such pragma.
#if SONDE_GPU_EMULATED
#define MOE_UNROLL
#else
#define MOE_UNROLL _Pragma("unroll")
#endif

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

enum WeightType : int { kWeightF32 = 0, kWeightBf16 = 1 };
enum Scoring : int { kSoftmax = 0, kSigmoid = 1 };
// Which GEMM kernel: chosen from the shapes and the device, or forced (tests, benchmarks).
enum GemmKernel : int { kAutoKernel = 0, kTensorKernel = 1, kSimtKernel = 2, kGemvKernel = 3 };

// Routing keeps three rows of E floats per warp in shared memory (scores, keys, group flags) and a
// lane's taken-experts set in one 32-bit mask (experts lane, lane + 32, ...): E <= 32 * 32.
constexpr int kMaxExperts = 1024;
constexpr unsigned kRouteWarps = 4;
constexpr unsigned kDispatchThreads = 256;
// GEMM block tile: 64 rows x 64 output columns. 64 rows is a decode batch's k experts padded once
// and a prefill expert group in one or a few tiles.
constexpr int kTileM = 64, kTileN = 64;
constexpr int kSimtK = 16;
constexpr unsigned kSimtThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
// Tensor-core kernel: 4 warps of 32 x 32 outputs, k steps of 32. A shared row holds 32 bf16 (16
// words) plus 4 words of padding: a 20-word stride puts the 8 rows x 4 words of a fragment load
// on 32 different banks.
constexpr int kMmaK = 32;
constexpr int kMmaStride = kMmaK / 2 + 4;  // 32-bit words per shared row
constexpr unsigned kMmaThreads = 128;
constexpr int kGemvRows = 8;
constexpr unsigned kGemvWarps = 8;  // output columns per block of the skinny kernel
constexpr int kMaxDim = 1 << 21;  // keeps CeilDiv(dim, 64) within the grid's y limit (65535)

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(uint16_t v) { return Bf16ToFloat(v); }

__device__ __forceinline__ bool IsNan(float v) { return v != v; }

// a strictly ranks before b: larger first, NaN last (MoeRouteToken's order without the index).
__device__ __forceinline__ bool Better(float a, float b) {
  if (IsNan(a)) return false;
  if (IsNan(b)) return true;
  return a > b;
}

// (a, ia) ranks before (b, ib): Better, ties (and NaN against NaN) to the lower index; ib < 0
// means "nothing yet".
__device__ __forceinline__ bool Before(float a, int ia, float b, int ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  if (Better(a, b)) return true;
  if (Better(b, a)) return false;
  return ia < ib;
}

// The best (key, index) over the warp, returned to every lane.
__device__ __forceinline__ void WarpBest(float* key, int* index) {
  for (int o = 16; o > 0; o >>= 1) {
    const float k2 = __shfl_xor_sync(0xffffffffu, *key, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, *index, o);
    if (Before(k2, i2, *key, *index)) {
      *key = k2;
      *index = i2;
    }
  }
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per token, kRouteWarps tokens per block; shared: kRouteWarps * 3 * experts floats.
// Matches kernels::MoeRouteToken / MoeRouteTokenGrouped: the same scores (the softmax's sum in
// fp32 here, in double there), the same key order and tie-breaking, the same group choice.
__global__ void __launch_bounds__(kRouteWarps * 32)
    RouteKernel(const float* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ scores,
                int32_t* __restrict__ ids, float* __restrict__ weights, unsigned tokens, int experts, int k,
                int scoring, int renormalize, float scale, int groups, int groups_used) {
  SONDE_DYNAMIC_SHARED(float, shared);
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t token = size_t(blockIdx.x) * kRouteWarps + warp;
  if (token >= tokens) return;  // a whole warp leaves; the kernel has no block barrier
  float* probs = shared + size_t(warp) * 3 * experts;
  float* keys = probs + experts;
  float* group_flag = keys + experts;
  const float* lg = logits + token * experts;

  if (scoring == kSigmoid) {
    for (int e = lane; e < experts; e += 32) probs[e] = 1.0f / (1.0f + expf(-lg[e]));
  } else {
    // fmaxf skips a NaN as the CPU's `>` does; a NaN or infinite logit then makes every score NaN
    // through the sum, as there.
    float mx = -INFINITY;
    for (int e = lane; e < experts; e += 32) mx = fmaxf(mx, lg[e]);
    mx = WarpMax(mx);
    float sum = 0.0f;
    for (int e = lane; e < experts; e += 32) {
      const float p = expf(lg[e] - mx);
      probs[e] = p;
      sum += p;
    }
    const float inv = 1.0f / WarpSum(sum);
    for (int e = lane; e < experts; e += 32) probs[e] *= inv;
  }
  __syncwarp();

  if (groups > 1) {
    const int per = experts / groups;
    // A group's score: the sum of its two best keys (its one key for single-expert groups).
    for (int g = lane; g < groups; g += 32) {
      float best = -INFINITY, second = -INFINITY;
      bool seen = false;
      for (int e = g * per; e < (g + 1) * per; ++e) {
        const float key = bias ? probs[e] + bias[e] : probs[e];
        if (!seen || Better(key, best)) {
          second = best;
          best = key;
          seen = true;
        } else if (Better(key, second)) {
          second = key;
        }
      }
      keys[g] = per > 1 ? best + second : best;
    }
    __syncwarp();
    uint32_t chosen = 0;  // bit i: group lane + 32 i
    for (int pass = 0; pass < groups_used; ++pass) {
      float best = 0.0f;
      int bi = -1;
      for (int g = lane, i = 0; g < groups; g += 32, ++i)
        if (!(chosen >> i & 1u) && Before(keys[g], g, best, bi)) {
          best = keys[g];
          bi = g;
        }
      WarpBest(&best, &bi);
      if (bi >= 0 && static_cast<unsigned>(bi) % 32 == lane) chosen |= 1u << (bi / 32);
    }
    for (int g = lane, i = 0; g < groups; g += 32, ++i) group_flag[g] = (chosen >> i & 1u) ? 1.0f : 0.0f;
    __syncwarp();
    // As the CPU: the unchosen groups' experts get a bias of -inf, the chosen ones their own.
    for (int e = lane; e < experts; e += 32)
      keys[e] = probs[e] + (group_flag[e / per] != 0.0f ? (bias ? bias[e] : 0.0f) : -INFINITY);
  } else {
    for (int e = lane; e < experts; e += 32) keys[e] = bias ? probs[e] + bias[e] : probs[e];
  }
  __syncwarp();

  // k passes of a warp arg-best over the experts not yet taken: O(k E / 32) per lane.
  int32_t* out_ids = ids + token * k;
  float* out_w = weights + token * k;
  uint32_t taken = 0;  // bit i: expert lane + 32 i
  for (int j = 0; j < k; ++j) {
    float best = 0.0f;
    int bi = -1;
    for (int e = lane, i = 0; e < experts; e += 32, ++i)
      if (!(taken >> i & 1u) && Before(keys[e], e, best, bi)) {
        best = keys[e];
        bi = e;
      }
    WarpBest(&best, &bi);
    if (static_cast<unsigned>(bi) % 32 == lane) taken |= 1u << (bi / 32);
    if (lane == 0) {
      out_ids[j] = bi;
      out_w[j] = probs[bi];
    }
  }
  if (lane == 0 && (renormalize || scale != 1.0f)) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += out_w[j];
    const float denom = renormalize ? (sum > 6.103515625e-5f ? sum : 6.103515625e-5f) : 1.0f;  // llama.cpp's clamp
    for (int j = 0; j < k; ++j) out_w[j] = out_w[j] / denom * scale;
  }
  float* out_scores = scores + token * experts;
  for (int e = lane; e < experts; e += 32) out_scores[e] = probs[e];
}

// Block e counts the pairs routed to expert e (block-wide ballots: integer counts, no atomics), and
// the grid marks every pair unplaced (-1) before PermuteKernel places the ones that fit. Each block
// reads all pairs: tokens * k * experts int32 reads, which stay in L2 and are small next to the
// expert GEMMs (64 MiB of reads at 8192 tokens, k = 8 and 256 experts).
__global__ void __launch_bounds__(kDispatchThreads)
    CountKernel(const int32_t* __restrict__ ids, size_t pairs, int32_t* __restrict__ counts, int32_t* __restrict__ row_of) {
  const int e = static_cast<int>(blockIdx.x);
  int n = 0;
  for (size_t base = 0; base < pairs; base += blockDim.x) {
    const size_t i = base + threadIdx.x;
    n += __syncthreads_count(i < pairs && ids[i] == e);
  }
  if (threadIdx.x == 0) counts[e] = n;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += size_t(gridDim.x) * blockDim.x)
    row_of[i] = -1;
}

// Block e: its offset (the exclusive scan of the capped counts before it), then its pairs' rows in
// token order: a pair's rank among expert e's pairs is a block-wide prefix count of ballots.
// A rank at or past `capacity` is dropped (row_of stays -1): the earliest tokens keep their slot,
// as on the CPU. row_token[row] is the token whose x the row reads.
__global__ void __launch_bounds__(kDispatchThreads)
    PermuteKernel(const int32_t* __restrict__ ids, size_t pairs, int k, int experts, int capacity,
                  const int32_t* __restrict__ counts, int32_t* __restrict__ offsets, int32_t* __restrict__ row_of,
                  int32_t* __restrict__ row_token) {
  __shared__ int warp_counts[kDispatchThreads / 32];
  const int e = static_cast<int>(blockIdx.x);
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  int part = 0;
  for (int i = static_cast<int>(threadIdx.x); i < e; i += static_cast<int>(blockDim.x)) part += min(counts[i], capacity);
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  if (lane == 0) warp_counts[warp] = part;
  __syncthreads();
  int offset = 0;
  for (unsigned w = 0; w < warps; ++w) offset += warp_counts[w];
  const int rows = min(counts[e], capacity);
  if (threadIdx.x == 0) {
    offsets[e] = offset;
    if (e == experts - 1) offsets[experts] = offset + rows;
  }
  __syncthreads();  // warp_counts is reused below
  int base = 0;
  for (size_t chunk = 0; chunk < pairs && base < rows; chunk += blockDim.x) {
    const size_t i = chunk + threadIdx.x;
    const bool mine = i < pairs && ids[i] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (unsigned w = 0; w < warps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    const int rank = base + before + __popc(ballot & ((1u << lane) - 1u));
    if (mine && rank < rows) {
      row_of[i] = offset + rank;
      row_token[offset + rank] = static_cast<int32_t>(i / static_cast<size_t>(k));
    }
    base += total;
    __syncthreads();
  }
}

// The m-tile a block computes: its expert and row range. offsets == nullptr: one group of `rows`
// rows (the router GEMM). Offsets are clamped to [0, rows] and made monotone, so that offsets a
// caller wrote badly cannot send a block outside its buffers. Thread 0 walks the experts (O(E) per
// block, next to O(64 * 64 * K) of arithmetic); the block reads the result from shared memory.
struct Tile {
  int row0, row_end, expert;
};

__device__ __forceinline__ Tile FindTile(const int32_t* offsets, int groups, int rows, unsigned tile, int tile_rows,
                                         int* shared) {
  if (threadIdx.x == 0) {
    Tile t{-1, -1, 0};
    if (!offsets) {
      const long long r0 = static_cast<long long>(tile) * tile_rows;
      if (r0 < rows) t = Tile{static_cast<int>(r0), rows, 0};
    } else {
      long long seen = 0;
      int start = 0;
      for (int e = 0; e < groups; ++e) {
        const int lo = max(start, min(max(offsets[e], 0), rows));
        const int hi = max(lo, min(offsets[e + 1], rows));
        start = hi;
        const long long tiles = (hi - lo + tile_rows - 1) / tile_rows;
        if (tile < seen + tiles) {
          const int r0 = lo + static_cast<int>(tile - seen) * tile_rows;
          t = Tile{r0, hi, e};
          break;
        }
        seen += tiles;
      }
    }
    shared[0] = t.row0;
    shared[1] = t.row_end;
    shared[2] = t.expert;
  }
  __syncthreads();
  return Tile{shared[0], shared[1], shared[2]};
}

// The A row a permuted row reads: a_rows[r] (a token of x) or r itself; nullptr when r is past the
// tile's group or names a row outside A (zeros are loaded instead).
__device__ __forceinline__ const float* ARow(const float* a, const int32_t* a_rows, int a_limit, int r, int row_end,
                                             int kdim) {
  if (r >= row_end) return nullptr;
  const int src = a_rows ? a_rows[r] : r;
  return src >= 0 && src < a_limit ? a + size_t(src) * kdim : nullptr;
}

__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

// C[r, :] = A[row(r), :] . B_e^T (kDual: silu(A B0_e^T) * (A B1_e^T)) for the rows of every group,
// in fp32 on the SIMT cores. Thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j, so a
// k step reads shared A as a broadcast and shared B with consecutive lanes on consecutive words.
template <typename W, bool kDual>
__global__ void __launch_bounds__(kSimtThreads)
    GroupedGemmSimt(const float* __restrict__ a, const int32_t* __restrict__ a_rows, int a_limit,
                    const int32_t* __restrict__ offsets, int groups, int rows, const W* __restrict__ b0,
                    const W* __restrict__ b1, size_t expert_stride, float* __restrict__ c, int n, int kdim) {
  __shared__ float as[kSimtK][kTileM + 1];
  __shared__ float bs[kDual ? 2 : 1][kSimtK][kTileN + 1];
  __shared__ int tile_info[3];
  const Tile tile = FindTile(offsets, groups, rows, blockIdx.x, kTileM, tile_info);
  if (tile.row0 < 0) return;  // the whole block: the grid is an upper bound on the tiles
  const int col0 = static_cast<int>(blockIdx.y) * kTileN;
  const unsigned tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int lk = static_cast<int>(threadIdx.x % kSimtK), lr = static_cast<int>(threadIdx.x / kSimtK);
  const float* arow[4];
  const W* brow[2][4];
  MOE_UNROLL
  for (int p = 0; p < 4; ++p) {
    arow[p] = ARow(a, a_rows, a_limit, tile.row0 + lr + 16 * p, tile.row_end, kdim);
    const int col = col0 + lr + 16 * p;
    MOE_UNROLL
    for (int m = 0; m < (kDual ? 2 : 1); ++m) {
      const W* base = (m ? b1 : b0) + size_t(tile.expert) * expert_stride;
      brow[m][p] = col < n ? base + size_t(col) * kdim : nullptr;
    }
  }
  float acc[kDual ? 2 : 1][4][4] = {};
  for (int k0 = 0; k0 < kdim; k0 += kSimtK) {
    const int kk = k0 + lk;
    MOE_UNROLL
    for (int p = 0; p < 4; ++p) {
      as[lk][lr + 16 * p] = arow[p] && kk < kdim ? arow[p][kk] : 0.0f;
      MOE_UNROLL
      for (int m = 0; m < (kDual ? 2 : 1); ++m)
        bs[m][lk][lr + 16 * p] = brow[m][p] && kk < kdim ? ToFloat(brow[m][p][kk]) : 0.0f;
    }
    __syncthreads();
    MOE_UNROLL
    for (int q = 0; q < kSimtK; ++q) {
      float av[4];
      MOE_UNROLL
      for (int i = 0; i < 4; ++i) av[i] = as[q][ty + 16 * i];
      MOE_UNROLL
      for (int m = 0; m < (kDual ? 2 : 1); ++m)
        MOE_UNROLL
        for (int j = 0; j < 4; ++j) {
          const float bv = bs[m][q][tx + 16 * j];
          MOE_UNROLL
          for (int i = 0; i < 4; ++i) acc[m][i][j] += av[i] * bv;
        }
    }
    __syncthreads();
  }
  MOE_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int r = tile.row0 + static_cast<int>(ty) + 16 * i;
    if (r >= tile.row_end) continue;
    MOE_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int col = col0 + static_cast<int>(tx) + 16 * j;
      if (col < n) c[size_t(r) * n + col] = kDual ? Silu(acc[0][i][j]) * acc[kDual ? 1 : 0][i][j] : acc[0][i][j];
    }
  }
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  return uint32_t(FloatToBf16(lo)) | uint32_t(FloatToBf16(hi)) << 16;
}

// The same product on tensor cores for bf16 weights: A rounded to bf16 as it is staged, fp32
// accumulators. Warp w computes rows (w / 2) * 32 .. +32 and columns (w % 2) * 32 .. +32 of the
// block's tile as 2 x 4 m16n8k16 products per 16-wide k step. The next k tile's global loads are
// issued into registers before the current tile's products, so their latency hides behind them,
// and stored into the second shared buffer after them.
// vec: kdim % 8 == 0, so rows start 16-byte aligned and whole k tiles load as float4 / 8 x bf16.
template <bool kDual>
__global__ void __launch_bounds__(kMmaThreads)
    GroupedGemmMma(const float* __restrict__ a, const int32_t* __restrict__ a_rows, int a_limit,
                   const int32_t* __restrict__ offsets, int groups, int rows, const uint16_t* __restrict__ b0,
                   const uint16_t* __restrict__ b1, size_t expert_stride, float* __restrict__ c, int n, int kdim,
                   int vec) {
  constexpr int kMats = kDual ? 2 : 1;
  __align__(16) __shared__ uint32_t as[2][kTileM][kMmaStride];
  __align__(16) __shared__ uint32_t bs[2][kMats][kTileN][kMmaStride];
  __shared__ int tile_info[3];
  const Tile tile = FindTile(offsets, groups, rows, blockIdx.x, kTileM, tile_info);
  if (tile.row0 < 0) return;
  const int col0 = static_cast<int>(blockIdx.y) * kTileN;
  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wm = static_cast<int>(warp / 2) * 32, wn = static_cast<int>(warp % 2) * 32;
  // Staging: A as 4 float4 per thread (8 threads per 32-wide row, rows tid / 8 + 16 p), B as 2
  // 8 x bf16 vectors per thread and matrix (4 threads per row, rows tid / 4 + 32 p).
  const int a_r = static_cast<int>(tid / 8), a_c = static_cast<int>(tid % 8) * 4;
  const int b_r = static_cast<int>(tid / 4), b_c = static_cast<int>(tid % 4) * 8;
  const float* arow[4];
  const uint16_t* brow[kMats][2];
  MOE_UNROLL
  for (int p = 0; p < 4; ++p) arow[p] = ARow(a, a_rows, a_limit, tile.row0 + a_r + 16 * p, tile.row_end, kdim);
  MOE_UNROLL
  for (int m = 0; m < kMats; ++m)
    MOE_UNROLL
    for (int p = 0; p < 2; ++p) {
      const int col = col0 + b_r + 32 * p;
      brow[m][p] = col < n ? (m ? b1 : b0) + size_t(tile.expert) * expert_stride + size_t(col) * kdim : nullptr;
    }
  float4 ra[4];
  uint4 rb[kMats][2];
  auto load = [&](int k0) {
    if (vec && k0 + kMmaK <= kdim) {
      MOE_UNROLL
      for (int p = 0; p < 4; ++p)
        ra[p] = arow[p] ? *reinterpret_cast<const float4*>(arow[p] + k0 + a_c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      MOE_UNROLL
      for (int m = 0; m < kMats; ++m)
        MOE_UNROLL
        for (int p = 0; p < 2; ++p)
          rb[m][p] = brow[m][p] ? *reinterpret_cast<const uint4*>(brow[m][p] + k0 + b_c) : make_uint4(0, 0, 0, 0);
    } else {  // a k tail, or rows that are not 16-byte aligned: element by element, zeros outside
      MOE_UNROLL
      for (int p = 0; p < 4; ++p) {
        float v[4];
        MOE_UNROLL
        for (int q = 0; q < 4; ++q) {
          const int kk = k0 + a_c + q;
          v[q] = arow[p] && kk < kdim ? arow[p][kk] : 0.0f;
        }
        ra[p] = make_float4(v[0], v[1], v[2], v[3]);
      }
      MOE_UNROLL
      for (int m = 0; m < kMats; ++m)
        MOE_UNROLL
        for (int p = 0; p < 2; ++p) {
          uint32_t w[4];
          MOE_UNROLL
          for (int q = 0; q < 4; ++q) {
            const int kk = k0 + b_c + 2 * q;
            const uint32_t lo = brow[m][p] && kk < kdim ? brow[m][p][kk] : 0u;
            const uint32_t hi = brow[m][p] && kk + 1 < kdim ? brow[m][p][kk + 1] : 0u;
            w[q] = lo | hi << 16;
          }
          rb[m][p] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
  };
  auto store = [&](int buf) {
    MOE_UNROLL
    for (int p = 0; p < 4; ++p)
      *reinterpret_cast<uint2*>(&as[buf][a_r + 16 * p][a_c / 2]) =
          make_uint2(PackBf16(ra[p].x, ra[p].y), PackBf16(ra[p].z, ra[p].w));
    MOE_UNROLL
    for (int m = 0; m < kMats; ++m)
      MOE_UNROLL
      for (int p = 0; p < 2; ++p) *reinterpret_cast<uint4*>(&bs[buf][m][b_r + 32 * p][b_c / 2]) = rb[m][p];
  };
  float acc[kMats][2][4][4] = {};
  load(0);
  store(0);
  __syncthreads();
  // Two shared buffers: tile i + 1 is stored into the other one while (other warps') products of
  // tile i may still read this one, so one barrier per k tile suffices.
  int cur = 0;
  for (int k0 = 0; k0 < kdim; k0 += kMmaK) {
    const bool more = k0 + kMmaK < kdim;
    if (more) load(k0 + kMmaK);
    MOE_UNROLL
    for (int ks = 0; ks < kMmaK / 2; ks += 8) {  // two k16 steps, in words
      uint32_t af[2][4];
      MOE_UNROLL
      for (int mi = 0; mi < 2; ++mi) {
        const int r = wm + mi * 16 + static_cast<int>(g);
        af[mi][0] = as[cur][r][ks + t];
        af[mi][1] = as[cur][r + 8][ks + t];
        af[mi][2] = as[cur][r][ks + t + 4];
        af[mi][3] = as[cur][r + 8][ks + t + 4];
      }
      MOE_UNROLL
      for (int m = 0; m < kMats; ++m)
        MOE_UNROLL
        for (int ni = 0; ni < 4; ++ni) {
          const int col = wn + ni * 8 + static_cast<int>(g);
          const uint32_t bf[2] = {bs[cur][m][col][ks + t], bs[cur][m][col][ks + t + 4]};
          MOE_UNROLL
          for (int mi = 0; mi < 2; ++mi) MmaBf16(acc[m][mi][ni], af[mi], bf);
        }
    }
    if (more) store(cur ^ 1);
    __syncthreads();
    cur ^= 1;
  }
  MOE_UNROLL
  for (int mi = 0; mi < 2; ++mi)
    MOE_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int r = tile.row0 + wm + mi * 16 + static_cast<int>(g) + half * 8;
      if (r >= tile.row_end) continue;
      MOE_UNROLL
      for (int ni = 0; ni < 4; ++ni)
        MOE_UNROLL
        for (int q = 0; q < 2; ++q) {
          const int col = col0 + wn + ni * 8 + static_cast<int>(t) * 2 + q;
          const float v = acc[0][mi][ni][half * 2 + q];
          if (col < n) c[size_t(r) * n + col] = kDual ? Silu(v) * acc[kMats - 1][mi][ni][half * 2 + q] : v;
        }
    }
}

// Small groups (decode, small batches): a warp per output column and tile of up to kGemvRows rows,
// its lanes streaming the column's weight row 16 bytes at a time. Weight traffic is then the
// whole cost, and it is spread over N / 8 x tiles blocks instead of the N / 64 x tiles of the
// 64 x 64 kernels (a down GEMM of dModel 4096 would fill only 64 blocks per expert there). The
// A rows are re-read by every warp, from L1/L2: they are kGemvRows x K floats next to K x 8 columns
// of weights per block. fp32 products, as the SIMT tile kernel.
// vec: kdim % 8 == 0, so rows start 16-byte aligned.
__device__ __forceinline__ void Load8(const float* p, float (&v)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(p), hi = *reinterpret_cast<const float4*>(p + 4);
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}
__device__ __forceinline__ void Load8(const uint16_t* p, float (&v)[8]) {
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
  MOE_UNROLL
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <typename W, bool kDual>
__global__ void __launch_bounds__(kGemvWarps * 32)
    GroupedGemv(const float* __restrict__ a, const int32_t* __restrict__ a_rows, int a_limit,
                const int32_t* __restrict__ offsets, int groups, int rows, const W* __restrict__ b0,
                const W* __restrict__ b1, size_t expert_stride, float* __restrict__ c, int n, int kdim, int vec) {
  constexpr int kMats = kDual ? 2 : 1;
  __shared__ int tile_info[3];
  __shared__ float partial[kGemvWarps][kMats * kGemvRows][33];  // 33: lane r's reads hit 32 banks
  const Tile tile = FindTile(offsets, groups, rows, blockIdx.y, kGemvRows, tile_info);
  if (tile.row0 < 0) return;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col = static_cast<int>(blockIdx.x * kGemvWarps + warp);
  if (col >= n) return;  // a whole warp; no block barrier follows
  const float* arow[kGemvRows];
  MOE_UNROLL
  for (int r = 0; r < kGemvRows; ++r) arow[r] = ARow(a, a_rows, a_limit, tile.row0 + r, tile.row_end, kdim);
  const W* wrow[kMats];
  MOE_UNROLL
  for (int m = 0; m < kMats; ++m) wrow[m] = (m ? b1 : b0) + size_t(tile.expert) * expert_stride + size_t(col) * kdim;
  float acc[kMats][kGemvRows] = {};
  int k0 = 0;
  if (vec) {
    for (; k0 + 256 <= kdim; k0 += 256) {
      const int kk = k0 + static_cast<int>(lane) * 8;
      float wv[kMats][8];
      MOE_UNROLL
      for (int m = 0; m < kMats; ++m) Load8(wrow[m] + kk, wv[m]);
      MOE_UNROLL
      for (int r = 0; r < kGemvRows; ++r) {
        if (!arow[r]) continue;
        float xv[8];
        Load8(arow[r] + kk, xv);
        MOE_UNROLL
        for (int m = 0; m < kMats; ++m)
          MOE_UNROLL
          for (int i = 0; i < 8; ++i) acc[m][r] += xv[i] * wv[m][i];
      }
    }
  }
  for (int kk = k0 + static_cast<int>(lane); kk < kdim; kk += 32) {
    float wv[kMats];
    MOE_UNROLL
    for (int m = 0; m < kMats; ++m) wv[m] = ToFloat(wrow[m][kk]);
    MOE_UNROLL
    for (int r = 0; r < kGemvRows; ++r) {
      if (!arow[r]) continue;
      const float xv = arow[r][kk];
      MOE_UNROLL
      for (int m = 0; m < kMats; ++m) acc[m][r] += xv * wv[m];
    }
  }
  // The lanes' partial sums through shared memory, lane r then adding row r's 32 in lane order:
  // one warp barrier instead of 5 shuffles per row and matrix, and a fixed order of the sums.
  float* mine = &partial[warp][0][0];
  MOE_UNROLL
  for (int m = 0; m < kMats; ++m)
    MOE_UNROLL
    for (int r = 0; r < kGemvRows; ++r) mine[(m * kGemvRows + r) * 33 + lane] = acc[m][r];
  __syncwarp();
  const int r = static_cast<int>(lane);
  if (r < kGemvRows && tile.row0 + r < tile.row_end) {
    float v[kMats];
    MOE_UNROLL
    for (int m = 0; m < kMats; ++m) {
      v[m] = 0.0f;
      for (int i = 0; i < 32; ++i) v[m] += mine[(m * kGemvRows + r) * 33 + i];
    }
    c[size_t(tile.row0 + r) * n + col] = kDual ? Silu(v[0]) * v[kMats - 1] : v[0];
  }
}

// y[t, :] = sum_j weights[t, j] * yo[row_of[t, j], :], j in slot order, one thread per element;
// a pair without a row (dropped by the capacity) adds nothing.
__global__ void CombineKernel(const float* __restrict__ yo, const int32_t* __restrict__ row_of,
                              const float* __restrict__ weights, float* __restrict__ y, size_t count, int k, int d,
                              int rows) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const size_t token = i / static_cast<size_t>(d), col = i % static_cast<size_t>(d);
    float s = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int r = row_of[token * k + j];
      if (r >= 0 && r < rows) s += weights[token * k + j] * yo[size_t(r) * d + col];
    }
    y[i] = s;
  }
}

// ---- host side ----

dim3 StrideGrid(const GpuDeviceInfo& d, size_t count, unsigned threads) {
  const size_t want = (count + threads - 1) / threads, cap = size_t(d.multiprocessors > 0 ? d.multiprocessors : 1) * 8;
  return dim3(static_cast<unsigned>(want < cap ? want : cap));
}

struct RouteParams {
  int64_t tokens, experts, k;
  int scoring, renormalize, groups, groups_used;
  float scale;
  bool bias;
};

RouteParams ReadRoute(const GpuOpCall& c) {
  RouteParams p;
  p.tokens = c.Int("tokens");
  p.experts = c.Int("experts", 1, kMaxExperts);
  p.k = c.Int("k", 1, p.experts);
  p.scoring = static_cast<int>(c.IntOr("scoring", kSoftmax, kSoftmax, kSigmoid));
  p.renormalize = static_cast<int>(c.IntOr("renormalize", 0, 0, 1));
  p.scale = static_cast<float>(c.NumOr("scale", 1.0));
  if (!std::isfinite(p.scale)) c.Invalid("scale must be finite");
  p.groups = static_cast<int>(c.IntOr("groups", 1, 1, p.experts));
  if (p.experts % p.groups) c.Invalid("groups must divide experts");
  p.groups_used = static_cast<int>(c.IntOr("groupsUsed", p.groups, 1, p.groups));
  if (p.k > int64_t(p.groups_used) * (p.experts / p.groups)) c.Invalid("k experts do not fit in groupsUsed groups");
  p.bias = c.IntOr("bias", 0, 0, 1) != 0;
  return p;
}

void LaunchRoute(GpuStream& s, const RouteParams& p, const float* logits, const float* bias, float* scores,
                 int32_t* ids, float* weights) {
  if (!p.tokens) return;
  const size_t shared = size_t(kRouteWarps) * 3 * p.experts * sizeof(float);
  Launch(RouteKernel, dim3(CeilDiv(p.tokens, kRouteWarps)), dim3(kRouteWarps * 32), shared, s, logits, bias, scores,
         ids, weights, static_cast<unsigned>(p.tokens), static_cast<int>(p.experts), static_cast<int>(p.k), p.scoring,
         p.renormalize, p.scale, p.groups, p.groups_used);
}

void LaunchDispatch(GpuStream& s, size_t pairs, int k, int experts, int capacity, const int32_t* ids, int32_t* counts,
                    int32_t* offsets, int32_t* row_of, int32_t* row_token) {
  Launch(CountKernel, dim3(experts), dim3(kDispatchThreads), 0, s, ids, pairs, counts, row_of);
  Launch(PermuteKernel, dim3(experts), dim3(kDispatchThreads), 0, s, ids, pairs, k, experts, capacity, counts, offsets,
         row_of, row_token);
}

// One grouped GEMM launch. rows: the permuted rows (C's rows); offsets == nullptr: one group.
struct GemmArgs {
  const float* a;
  const int32_t* a_rows;
  int a_limit;
  const int32_t* offsets;
  int groups, rows;
  const void *b0, *b1;
  size_t expert_stride;  // elements
  float* c;
  int n, kdim;
};

// The kernel `kernel` asks for, kAutoKernel resolved: the skinny kernel while the groups average
// at most kGemvRows rows (weights read about once either way, and it has 8x the blocks), tensor
// cores for bf16 weights on cc >= 8.0, else the SIMT tiles.
int ResolveKernel(int kernel, int wtype, const GpuDeviceInfo& d, int rows, int groups) {
  if (kernel != kAutoKernel) return kernel;
  if (static_cast<long long>(rows) <= static_cast<long long>(kGemvRows) * groups) return kGemvKernel;
  return wtype == kWeightBf16 && ComputeCapability(d) >= 80 ? kTensorKernel : kSimtKernel;
}

template <typename W, bool kDual>
void LaunchTyped(GpuStream& s, int kernel, const GemmArgs& g) {
  const W* b0 = static_cast<const W*>(g.b0);
  const W* b1 = static_cast<const W*>(kDual ? g.b1 : g.b0);
  const int vec = g.kdim % 8 == 0;
  const unsigned groups_in_use = static_cast<unsigned>(std::min(g.groups, g.rows));
  // Each group's last tile may be partial: at most rows / tile full tiles plus one per non-empty group.
  const unsigned gemv_tiles = g.offsets ? CeilDiv(g.rows, kGemvRows) + groups_in_use : CeilDiv(g.rows, kGemvRows);
  // The gemv grid's y is its tiles: a forced gemv over more rows than that limit takes the SIMT tiles.
  if (kernel == kGemvKernel && gemv_tiles <= 65535) {
    Launch(GroupedGemv<W, kDual>, dim3(CeilDiv(g.n, kGemvWarps), gemv_tiles), dim3(kGemvWarps * 32), 0, s, g.a, g.a_rows,
           g.a_limit, g.offsets, g.groups, g.rows, b0, b1, g.expert_stride, g.c, g.n, g.kdim, vec);
    return;
  }
  const unsigned tiles = g.offsets ? CeilDiv(g.rows, kTileM) + groups_in_use : CeilDiv(g.rows, kTileM);
  const dim3 grid(tiles, CeilDiv(g.n, kTileN));
  if constexpr (std::is_same<W, uint16_t>::value) {
    if (kernel == kTensorKernel) {
      Launch(GroupedGemmMma<kDual>, grid, dim3(kMmaThreads), 0, s, g.a, g.a_rows, g.a_limit, g.offsets, g.groups, g.rows,
             b0, b1, g.expert_stride, g.c, g.n, g.kdim, vec);
      return;
    }
  }
  Launch(GroupedGemmSimt<W, kDual>, grid, dim3(kSimtThreads), 0, s, g.a, g.a_rows, g.a_limit, g.offsets, g.groups,
         g.rows, b0, b1, g.expert_stride, g.c, g.n, g.kdim);
}

// kernel: already checked by CheckKernel (tensor only for bf16 on cc >= 8.0).
void LaunchGroupedGemm(GpuStream& s, const GpuDeviceInfo& d, int kernel, int wtype, bool dual, const GemmArgs& g) {
  if (g.rows == 0) return;
  kernel = ResolveKernel(kernel, wtype, d, g.rows, g.groups);
  if (wtype == kWeightBf16)
    dual ? LaunchTyped<uint16_t, true>(s, kernel, g) : LaunchTyped<uint16_t, false>(s, kernel, g);
  else
    dual ? LaunchTyped<float, true>(s, kernel, g) : LaunchTyped<float, false>(s, kernel, g);
}

void LaunchCombine(GpuStream& s, const GpuDeviceInfo& d, size_t tokens, int k, int dm, int rows, const float* yo,
                   const int32_t* row_of, const float* weights, float* y) {
  const size_t count = tokens * size_t(dm);
  if (count) Launch(CombineKernel, StrideGrid(d, count, 256), dim3(256), 0, s, yo, row_of, weights, y, count, k, dm, rows);
}

const void* WeightBuffer(const GpuOpCall& c, size_t i, int wtype, size_t count, const char* what) {
  return wtype == kWeightBf16 ? static_cast<const void*>(c.Buffer<uint16_t>(i, count, what))
                              : static_cast<const void*>(c.Buffer<float>(i, count, what));
}

// The `kernel` parameter (GemmKernel, default auto); tensor cores need bf16 weights and cc >= 8.0.
int ReadKernel(const GpuOpCall& c, const GpuDeviceInfo& d, int wtype) {
  const int kernel = static_cast<int>(c.IntOr("kernel", kAutoKernel, kAutoKernel, kGemvKernel));
  if (kernel == kTensorKernel && wtype != kWeightBf16) c.Invalid("kernel 'tensor' needs bf16 weights");
  if (kernel == kTensorKernel && ComputeCapability(d) < 80)
    c.Invalid("kernel 'tensor' needs compute capability 8.0 or newer, " + d.id + " has " + std::to_string(d.cc_major) +
              "." + std::to_string(d.cc_minor));
  return kernel;
}

int WeightType(const GpuOpCall& c, const char* name) {
  return static_cast<int>(c.IntOr(name, kWeightF32, kWeightF32, kWeightBf16));
}

// The capacity in rows per expert: 0 (or absent) is unlimited.
int Capacity(const GpuOpCall& c) {
  const int64_t cap = c.IntOr("capacity", 0);
  return cap == 0 ? INT32_MAX : static_cast<int>(cap);
}

// Pairs (tokens x k) must index as int32 rows.
size_t Pairs(const GpuOpCall& c, int64_t tokens, int64_t k) {
  const size_t pairs = c.Count({tokens, k});
  if (pairs > size_t(INT32_MAX)) c.Invalid("tokens * k must be below 2^31");
  return pairs;
}

// buffers: logits [tokens, experts] f32, scores [tokens, experts] f32 (out), ids [tokens, k] int32
// (out), weights [tokens, k] f32 (out), then bias [experts] f32 when bias = 1.
void RouteOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const RouteParams p = ReadRoute(c);
  const size_t te = c.Count({p.tokens, p.experts}), tk = Pairs(c, p.tokens, p.k);
  const float* logits = c.Buffer<float>(0, te, "logits");
  float* scores = c.Buffer<float>(1, te, "scores");
  int32_t* ids = c.Buffer<int32_t>(2, tk, "ids");
  float* weights = c.Buffer<float>(3, tk, "weights");
  const float* bias = p.bias ? c.Buffer<float>(4, p.experts, "bias") : nullptr;
  LaunchRoute(s, p, logits, bias, scores, ids, weights);
}

// buffers: ids [tokens, k] int32, counts [experts] int32 (out), offsets [experts + 1] int32 (out),
// rowOf [tokens, k] int32 (out: the permuted row of each pair, -1 if dropped), rowToken
// [tokens * k] int32 (out: the token of each permuted row; rows past offsets[experts] unset).
void DispatchOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t tokens = c.Int("tokens"), experts = c.Int("experts", 1, kMaxExperts), k = c.Int("k", 1, experts);
  const size_t pairs = Pairs(c, tokens, k);
  const int32_t* ids = c.Buffer<int32_t>(0, pairs, "ids");
  int32_t* counts = c.Buffer<int32_t>(1, experts, "counts");
  int32_t* offsets = c.Buffer<int32_t>(2, experts + 1, "offsets");
  int32_t* row_of = c.Buffer<int32_t>(3, pairs, "rowOf");
  int32_t* row_token = c.Buffer<int32_t>(4, pairs, "rowToken");
  LaunchDispatch(s, pairs, static_cast<int>(k), static_cast<int>(experts), Capacity(c), ids, counts, offsets, row_of,
                 row_token);
}

struct FfnShape {
  int64_t rows, experts, d, f;
  int wtype;
};

FfnShape ReadFfn(const GpuOpCall& c) {
  FfnShape f;
  f.rows = c.Int("rows");
  f.experts = c.Int("experts", 1, kMaxExperts);
  f.d = c.Int("dModel", 1, kMaxDim);
  f.f = c.Int("dFf", 1, kMaxDim);
  f.wtype = WeightType(c, "weightType");
  return f;
}

// buffers: x [tokens, dModel] f32, rowToken [rows] int32, offsets [experts + 1] int32, gate and up
// [experts, dFf, dModel] (weightType), h [rows, dFf] f32 (out).
void GateUpOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const FfnShape f = ReadFfn(c);
  const int kernel = ReadKernel(c, d, f.wtype);
  const int64_t tokens = c.Int("tokens");
  const float* x = c.Buffer<float>(0, c.Count({tokens, f.d}), "x");
  const int32_t* row_token = c.Buffer<int32_t>(1, f.rows, "rowToken");
  const int32_t* offsets = c.Buffer<int32_t>(2, f.experts + 1, "offsets");
  const size_t wcount = c.Count({f.experts, f.f, f.d});
  const void* gate = WeightBuffer(c, 3, f.wtype, wcount, "gate");
  const void* up = WeightBuffer(c, 4, f.wtype, wcount, "up");
  float* h = c.Buffer<float>(5, c.Count({f.rows, f.f}), "h");
  LaunchGroupedGemm(s, d, kernel, f.wtype, true,
                    GemmArgs{x, row_token, static_cast<int>(tokens), offsets, static_cast<int>(f.experts),
                             static_cast<int>(f.rows), gate, up, size_t(f.f) * f.d, h, static_cast<int>(f.f),
                             static_cast<int>(f.d)});
}

// buffers: h [rows, dFf] f32, offsets [experts + 1] int32, down [experts, dModel, dFf] (weightType),
// yo [rows, dModel] f32 (out).
void DownOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const FfnShape f = ReadFfn(c);
  const int kernel = ReadKernel(c, d, f.wtype);
  const float* h = c.Buffer<float>(0, c.Count({f.rows, f.f}), "h");
  const int32_t* offsets = c.Buffer<int32_t>(1, f.experts + 1, "offsets");
  const void* down = WeightBuffer(c, 2, f.wtype, c.Count({f.experts, f.d, f.f}), "down");
  float* yo = c.Buffer<float>(3, c.Count({f.rows, f.d}), "yo");
  LaunchGroupedGemm(s, d, kernel, f.wtype, false,
                    GemmArgs{h, nullptr, static_cast<int>(f.rows), offsets, static_cast<int>(f.experts),
                             static_cast<int>(f.rows), down, down, size_t(f.d) * f.f, yo, static_cast<int>(f.d),
                             static_cast<int>(f.f)});
}

// buffers: yo [rows, dModel] f32, rowOf [tokens, k] int32, weights [tokens, k] f32, y [tokens, dModel] f32 (out).
void CombineOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t tokens = c.Int("tokens"), k = c.Int("k", 1), dm = c.Int("dModel", 1, kMaxDim), rows = c.Int("rows");
  const size_t pairs = Pairs(c, tokens, k);
  const float* yo = c.Buffer<float>(0, c.Count({rows, dm}), "yo");
  const int32_t* row_of = c.Buffer<int32_t>(1, pairs, "rowOf");
  const float* weights = c.Buffer<float>(2, pairs, "weights");
  float* y = c.Buffer<float>(3, c.Count({tokens, dm}), "y");
  LaunchCombine(s, d, tokens, static_cast<int>(k), static_cast<int>(dm), static_cast<int>(rows), yo, row_of, weights, y);
}

// The whole layer in one call. buffers: x [tokens, dModel] f32, router [experts, dModel]
// (routerType), gate, up [experts, dFf, dModel] and down [experts, dModel, dFf] (weightType),
// y [tokens, dModel] f32 (out), counts [experts] int32 (out), workspace (MoeWorkspace bytes), then
// bias [experts] f32 when bias = 1. The workspace layout is lib/cuda/moe.ts's gpuMoeWorkspaceBytes.
struct Workspace {
  size_t bytes = 0;
  size_t Take(size_t n) {
    const size_t at = bytes;
    bytes += (n + 255) / 256 * 256;
    return at;
  }
};

void MoeOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const RouteParams p = ReadRoute(c);
  const int64_t dm = c.Int("dModel", 1, kMaxDim), ff = c.Int("dFf", 1, kMaxDim);
  const int wtype = WeightType(c, "weightType"), rtype = WeightType(c, "routerType");
  const int kernel = ReadKernel(c, d, wtype);
  const size_t pairs = Pairs(c, p.tokens, p.k), te = c.Count({p.tokens, p.experts});
  const float* x = c.Buffer<float>(0, c.Count({p.tokens, dm}), "x");
  const void* router = WeightBuffer(c, 1, rtype, c.Count({p.experts, dm}), "router");
  const size_t wcount = c.Count({p.experts, ff, dm});
  const void* gate = WeightBuffer(c, 2, wtype, wcount, "gate");
  const void* up = WeightBuffer(c, 3, wtype, wcount, "up");
  const void* down = WeightBuffer(c, 4, wtype, wcount, "down");
  float* y = c.Buffer<float>(5, c.Count({p.tokens, dm}), "y");
  int32_t* counts = c.Buffer<int32_t>(6, p.experts, "counts");
  Workspace w;
  const size_t o_logits = w.Take(te * 4), o_scores = w.Take(te * 4), o_ids = w.Take(pairs * 4),
               o_weights = w.Take(pairs * 4), o_offsets = w.Take((p.experts + 1) * 4), o_row_of = w.Take(pairs * 4),
               o_row_token = w.Take(pairs * 4), o_h = w.Take(c.Count({int64_t(pairs), ff, 4})),
               o_yo = w.Take(c.Count({int64_t(pairs), dm, 4}));
  unsigned char* ws = c.Buffer<unsigned char>(7, w.bytes, "workspace");
  const float* bias = p.bias ? c.Buffer<float>(8, p.experts, "bias") : nullptr;
  if (!p.tokens) {
    s.Fill(counts, 0, p.experts * 4);
    return;
  }
  float* logits = reinterpret_cast<float*>(ws + o_logits);
  int32_t* ids = reinterpret_cast<int32_t*>(ws + o_ids);
  float* weights = reinterpret_cast<float*>(ws + o_weights);
  int32_t* offsets = reinterpret_cast<int32_t*>(ws + o_offsets);
  int32_t* row_of = reinterpret_cast<int32_t*>(ws + o_row_of);
  int32_t* row_token = reinterpret_cast<int32_t*>(ws + o_row_token);
  float* h = reinterpret_cast<float*>(ws + o_h);
  float* yo = reinterpret_cast<float*>(ws + o_yo);
  const int rows = static_cast<int>(pairs), experts = static_cast<int>(p.experts);
  LaunchGroupedGemm(s, d, kAutoKernel, rtype, false,
                    GemmArgs{x, nullptr, static_cast<int>(p.tokens), nullptr, 1, static_cast<int>(p.tokens), router,
                             router, 0, logits, experts, static_cast<int>(dm)});
  LaunchRoute(s, p, logits, bias, reinterpret_cast<float*>(ws + o_scores), ids, weights);
  LaunchDispatch(s, pairs, static_cast<int>(p.k), experts, Capacity(c), ids, counts, offsets, row_of, row_token);
  LaunchGroupedGemm(s, d, kernel, wtype, true,
                    GemmArgs{x, row_token, static_cast<int>(p.tokens), offsets, experts, rows, gate, up,
                             size_t(ff) * dm, h, static_cast<int>(ff), static_cast<int>(dm)});
  LaunchGroupedGemm(s, d, kernel, wtype, false,
                    GemmArgs{h, nullptr, rows, offsets, experts, rows, down, down, size_t(dm) * ff, yo,
                             static_cast<int>(dm), static_cast<int>(ff)});
  LaunchCombine(s, d, p.tokens, static_cast<int>(p.k), static_cast<int>(dm), rows, yo, row_of, weights, y);
}

}  // namespace

SONDE_GPU_OP("moe_route", RouteOp);
SONDE_GPU_OP("moe_dispatch", DispatchOp);
SONDE_GPU_OP("moe_gate_up", GateUpOp);
SONDE_GPU_OP("moe_down", DownOp);
SONDE_GPU_OP("moe_combine", CombineOp);
SONDE_GPU_OP("moe", MoeOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
