// Causal paged attention for prefill (many new query rows per sequence), flash-attention style: a
// block owns a tile of one sequence's query rows for one head, walks the key tiles its rows can see
// (block-table indirection per key row), keeps an online softmax per row and never materialises the
// scores. The K/V of the new rows are in the pool already (as ops/llm.cc writes them before it
// attends), so a query at position p sees positions [0, p] of its sequence.
//
// Two kernels:
// - tensor cores (16-bit KV, head_dim 64/96/128, compute capability >= 8.0): 4 warps x 16 query
//   rows, 64-key tiles of K and V streamed into shared memory by cp.async, two stages (tile it + 1
//   lands while tile it is worked on), one table read per key row and tile; S = Q K^T and O += P V
//   on mma.m16n8k16 (f16 or bf16 by the KV's type) with fp32 accumulators, B fragments by ldmatrix
//   (K as stored; V through the transposing form). Q is converted to the KV's 16-bit type once into
//   registers (the A fragments); the S accumulators are re-packed as the A fragments of P V without
//   leaving registers (their layouts coincide, dialect.h).
// - SIMT (fp32 KV, other head sizes, older GPUs, or simt forced): 4 warps x 4 query rows, 32-key
//   tiles; lane j scores key j, then every lane accumulates its own output dims.
#include <algorithm>
#include <cmath>

#include "kernels/attention/cuda/paged.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

using namespace attention;

constexpr int kMaxHeadDim = 256;

struct PrefillArgs {
  const float* q;         // [row][head][head_dim]
  const void* pool;
  const int32_t* tables;  // [seq][width]
  const int32_t* meta;    // [seq][3]: first position, token count, first row in q/out
  float* out;             // [row][head][head_dim]
  PoolLayout kv;
  int rows, heads, group, head_dim, width;
  int stages;  // tensor cores: K/V tiles in the cp.async ring
  float scale;
};

// The sequence's (start, tokens, row0) when consistent with the buffers, else false: lib/cuda
// rejects such metadata, and here it only must not make a kernel read or write out of bounds.
__device__ __forceinline__ bool SequenceOf(const PrefillArgs& a, int s, int* start, int* tokens, int* row0) {
  *start = a.meta[3 * s], *tokens = a.meta[3 * s + 1], *row0 = a.meta[3 * s + 2];
  return *start >= 0 && *tokens >= 0 && *row0 >= 0 && *row0 <= a.rows - *tokens &&
         *start <= a.width * a.kv.block_size - *tokens;
}

// ---- tensor cores ----
constexpr int kMmaRows = 64, kMmaKeys = 64, kMmaWarps = 4;

template <int kType>
__device__ __forceinline__ uint32_t Pack2(float lo, float hi) {
  return uint32_t(KvElem<kType>::Put(lo)) | uint32_t(KvElem<kType>::Put(hi)) << 16;
}

__device__ __forceinline__ void CpAsyncWaitUpTo(int pending) {
  if (pending <= 0)
    CpAsyncWait<0>();
  else
    CpAsyncWait<1>();
}

size_t MmaShared(int head_dim, int stages) { return size_t(stages) * kMmaKeys * ((head_dim + 8) * 2 * sizeof(uint16_t) + sizeof(int)); }

template <int kType>
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kType == kKvF16)
    MmaF16(d, a, b);
  else
    MmaBf16(d, a, b);
}

template <int kType, int kD>
__global__ void __launch_bounds__(kMmaWarps * 32) PrefillMmaKernel(PrefillArgs a) {
  // K and V tiles as they lie in the pool, rows of kD + 8 halves: a row pitch of an odd number of
  // 16-byte units puts the 8 rows an ldmatrix reads on 8 different bank groups.
  constexpr int kPitch = kD + 8;
  // Causal tiles further down see more keys: the grid hands out the longest ones first, so the
  // short ones fill the tail instead of one long tile running alone at the end.
  const int s = blockIdx.z, h = blockIdx.y, qt = gridDim.x - 1 - blockIdx.x;
  int start, tokens, row0;
  if (!SequenceOf(a, s, &start, &tokens, &row0) || qt * kMmaRows >= tokens) return;  // the whole block leaves
  const int kvh = h / a.group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  SONDE_DYNAMIC_SHARED(uint16_t, sk);  // [stage][key][kPitch]
  uint16_t* sv = sk + a.stages * kMmaKeys * kPitch;  // [stage][key][kPitch]
  int* key_ok = reinterpret_cast<int*>(sv + a.stages * kMmaKeys * kPitch);  // [stage][key]

  // Q's A fragments: rows warp*16 + g (+8), columns kc*16 + 2t (+1, +8, +9) of the tile.
  const int r_lo = qt * kMmaRows + warp * 16 + g, r_hi = r_lo + 8;
  uint32_t qa[kD / 16][4];
  SONDE_ATTN_UNROLL
  for (int kc = 0; kc < kD / 16; ++kc) {
    SONDE_ATTN_UNROLL
    for (int r = 0; r < 4; ++r) {
      const int row = r & 1 ? r_hi : r_lo, col = kc * 16 + 2 * t + (r >> 1) * 8;
      float2 v = make_float2(0.0f, 0.0f);
      if (row < tokens) v = *reinterpret_cast<const float2*>(a.q + (size_t(row0 + row) * a.heads + h) * kD + col);
      qa[kc][r] = Pack2<kType>(v.x * a.scale, v.y * a.scale);  // scaled before rounding: the same relative error
    }
  }

  const int q_last = start + min(tokens, (qt + 1) * kMmaRows) - 1;
  const int pos_lo = start + r_lo, pos_hi = start + r_hi;
  const int32_t* table = a.tables + size_t(s) * a.width;
  const uint16_t* pool = static_cast<const uint16_t*>(a.pool);
  const size_t key_at = a.kv.key + size_t(kvh) * a.kv.stream;
  float o[kD / 8][4] = {};
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};

  // Loader: two threads per key row, alternate 16-byte chunks; one table read per row and tile.
  // cp.async lands tile it + 1 while the warps work on tile it.
  const int lrow_ = tid % kMmaKeys, lchunk = tid / kMmaKeys, tpr = kMmaWarps * 32 / kMmaKeys;
  const auto issue = [&](int it) {
    const int st = it % a.stages, pos = it * kMmaKeys + lrow_;
    const int id = pos <= q_last ? table[pos / a.kv.block_size] : -1;
    const bool ok = id >= 0 && id < a.kv.blocks;
    const uint16_t* kr = ok ? pool + size_t(id) * a.kv.block + key_at + size_t(pos % a.kv.block_size) * kD : pool;
    uint16_t* kd = sk + (st * kMmaKeys + lrow_) * kPitch;
    uint16_t* vd = sv + (st * kMmaKeys + lrow_) * kPitch;
    SONDE_ATTN_UNROLL
    for (int c = lchunk; c < kD / 8; c += tpr) {
      CpAsync16(kd + c * 8, ok ? kr + c * 8 : pool, ok ? 16 : 0);
      CpAsync16(vd + c * 8, ok ? kr + a.kv.value + c * 8 : pool, ok ? 16 : 0);
    }
    if (lchunk == 0) key_ok[st * kMmaKeys + lrow_] = ok;
  };
  const int tiles = q_last / kMmaKeys + 1, stages = a.stages;
  // A ring of `stages` tiles (3 where shared memory allows): the loads of the next ones are in
  // flight while the warps work on tile it.
  for (int j = 0; j < stages - 1; ++j) {
    if (j < tiles) issue(j);
    CpAsyncCommit();
  }
  // Keys wholly at or before the warp's first row need no causal mask.
  const int warp_first = start + qt * kMmaRows + warp * 16;
  for (int it = 0; it < tiles; ++it) {
    const int k0 = it * kMmaKeys, st = it % stages;
    CpAsyncWaitUpTo(stages - 2);
    __syncthreads();  // tile it is in shared memory, and every warp is done with tile it - 1
    if (it + stages - 1 < tiles) issue(it + stages - 1);
    CpAsyncCommit();
    const uint16_t* kt = sk + st * kMmaKeys * kPitch;
    const uint16_t* vt = sv + st * kMmaKeys * kPitch;

    // S = Q K^T: 8 n-tiles of 8 keys; one ldmatrix gives an n-tile's B fragments for two k-steps.
    float sc[kMmaKeys / 8][4] = {};
    SONDE_ATTN_UNROLL
    for (int kc = 0; kc < kD / 16; kc += 2) {
      SONDE_ATTN_UNROLL
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
        uint32_t kb[4];
        LdMatrixX4(kb, kt + (nt * 8 + lane % 8) * kPitch + kc * 16 + 8 * (lane / 8));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        Mma<kType>(sc[nt], qa[kc], b0);
        Mma<kType>(sc[nt], qa[kc + 1], b1);
      }
    }
    // Causal mask, scale, and the online softmax of this lane's two rows (reduced over the quad
    // of lanes that share them).
    float mx[2] = {-INFINITY, -INFINITY};
    const bool masked = k0 + kMmaKeys - 1 > warp_first;  // (a bad block id there reads as a zero row, never faults)
    SONDE_ATTN_UNROLL
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
      SONDE_ATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        if (masked) {
          const int col = nt * 8 + 2 * t + (i & 1), pos = k0 + col;
          if (!key_ok[st * kMmaKeys + col] || pos > (i < 2 ? pos_lo : pos_hi)) sc[nt][i] = -INFINITY;
        }
        mx[i >> 1] = fmaxf(mx[i >> 1], sc[nt][i]);
      }
    }
    SONDE_ATTN_UNROLL
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float mn = fmaxf(mrow[r], mx[r]);
      const float rescale = mn == -INFINITY ? 1.0f : __expf(mrow[r] - mn);
      mrow[r] = mn;
      lrow[r] *= rescale;
      SONDE_ATTN_UNROLL
      for (int dt = 0; dt < kD / 8; ++dt) o[dt][2 * r] *= rescale, o[dt][2 * r + 1] *= rescale;
    }
    SONDE_ATTN_UNROLL
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
      SONDE_ATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        const float p = sc[nt][i] == -INFINITY ? 0.0f : __expf(sc[nt][i] - mrow[i >> 1]);
        sc[nt][i] = p;
        lrow[i >> 1] += p;
      }
    }
    // O += P V: P's A fragment for keys kc*16.. is S n-tiles 2kc and 2kc+1; V's B fragments come
    // from the row-major V tile by a transposing ldmatrix, one per n-tile of dims and two k-steps.
    SONDE_ATTN_UNROLL
    for (int kp = 0; kp < kMmaKeys / 32; ++kp) {
      uint32_t pa[2][4];
      SONDE_ATTN_UNROLL
      for (int k = 0; k < 2; ++k) {
        const int kc = 2 * kp + k;
        pa[k][0] = Pack2<kType>(sc[2 * kc][0], sc[2 * kc][1]);
        pa[k][1] = Pack2<kType>(sc[2 * kc][2], sc[2 * kc][3]);
        pa[k][2] = Pack2<kType>(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
        pa[k][3] = Pack2<kType>(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
      }
      SONDE_ATTN_UNROLL
      for (int dt = 0; dt < kD / 8; ++dt) {
        uint32_t vb[4];
        LdMatrixX4Trans(vb, vt + (32 * kp + lane) * kPitch + 8 * dt);
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        Mma<kType>(o[dt], pa[0], b0);
        Mma<kType>(o[dt], pa[1], b1);
      }
    }
  }

  SONDE_ATTN_UNROLL
  for (int r = 0; r < 2; ++r) {
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    const int row = r ? r_hi : r_lo;
    if (row >= tokens) continue;
    const float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
    float* orow = a.out + (size_t(row0 + row) * a.heads + h) * kD + 2 * t;
    SONDE_ATTN_UNROLL
    for (int dt = 0; dt < kD / 8; ++dt)
      *reinterpret_cast<float2*>(orow + dt * 8) = make_float2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
  }
}

// ---- SIMT ----
constexpr int kSimtRows = 16, kSimtKeys = 32, kSimtWarps = 4, kRowsPerWarp = kSimtRows / kSimtWarps;

size_t SimtShared(int d, size_t eb) { return kSimtKeys * (d + 1) * eb + kSimtKeys * d * eb + kSimtRows * d * sizeof(float); }

// kPer: output dims per lane (head_dim <= 32 * kPer).
template <int kType, int kPer>
__global__ void __launch_bounds__(kSimtWarps * 32) PrefillSimtKernel(PrefillArgs a) {
  using T = typename KvElem<kType>::T;
  using E = KvElem<kType>;
  const int s = blockIdx.z, h = blockIdx.y, qt = gridDim.x - 1 - blockIdx.x;  // longest tiles first
  int start, tokens, row0;
  if (!SequenceOf(a, s, &start, &tokens, &row0) || qt * kSimtRows >= tokens) return;
  const int kvh = h / a.group, d_all = a.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  SONDE_DYNAMIC_SHARED(unsigned char, raw);
  T* sk = reinterpret_cast<T*>(raw);                // [key][d_all + 1]: lane j reads row j, no bank conflicts
  T* sv = sk + kSimtKeys * (d_all + 1);             // [key][d_all]
  float* sq = reinterpret_cast<float*>(sv + kSimtKeys * d_all);  // [row][d_all]
  __shared__ int key_ok[kSimtKeys];

  for (int i = threadIdx.x; i < kSimtRows * d_all; i += blockDim.x) {
    const int r = i / d_all, row = qt * kSimtRows + r;
    sq[i] = row < tokens ? a.q[(size_t(row0 + row) * a.heads + h) * d_all + i % d_all] * a.scale : 0.0f;
  }
  const int q_last = start + min(tokens, (qt + 1) * kSimtRows) - 1;
  const int32_t* table = a.tables + size_t(s) * a.width;
  const T* pool = static_cast<const T*>(a.pool);
  const size_t key_at = a.kv.key + size_t(kvh) * a.kv.stream;
  float acc[kRowsPerWarp][kPer] = {}, m[kRowsPerWarp], l[kRowsPerWarp];
  int pos_of[kRowsPerWarp];
  SONDE_ATTN_UNROLL
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY, l[i] = 0.0f;
    pos_of[i] = start + qt * kSimtRows + warp * kRowsPerWarp + i;  // past the tokens: computed, not stored
  }

  for (int k0 = 0; k0 <= q_last; k0 += kSimtKeys) {
    __syncthreads();
    for (int i = threadIdx.x; i < kSimtKeys * d_all; i += blockDim.x) {
      const int r = i / d_all, c = i % d_all, pos = k0 + r;
      const int id = pos <= q_last ? table[pos / a.kv.block_size] : -1;
      const bool ok = id >= 0 && id < a.kv.blocks;
      T kx{}, vx{};
      if (ok) {
        const T* kr = pool + size_t(id) * a.kv.block + key_at + size_t(pos % a.kv.block_size) * d_all + c;
        kx = kr[0];
        vx = kr[a.kv.value];
      }
      sk[r * (d_all + 1) + c] = kx;
      sv[r * d_all + c] = vx;
      if (c == 0) key_ok[r] = ok;
    }
    __syncthreads();
    SONDE_ATTN_UNROLL
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float* qr = sq + (warp * kRowsPerWarp + i) * d_all;
      const T* kr = sk + lane * (d_all + 1);
      float dot = 0.0f;
      for (int d = 0; d < d_all; ++d) dot += qr[d] * E::Get(kr[d]);
      const float sc = key_ok[lane] && k0 + lane <= pos_of[i] ? dot : -INFINITY;
      float mx = sc;
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mn = fmaxf(m[i], mx);
      const float rescale = mn == -INFINITY ? 1.0f : __expf(m[i] - mn);
      const float p = sc == -INFINITY ? 0.0f : __expf(sc - mn);
      float ps = p;
      for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
      l[i] = l[i] * rescale + ps;
      m[i] = mn;
      SONDE_ATTN_UNROLL
      for (int e = 0; e < kPer; ++e) acc[i][e] *= rescale;
      for (int j = 0; j < kSimtKeys; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        const T* vr = sv + j * d_all;
        SONDE_ATTN_UNROLL
        for (int e = 0; e < kPer; ++e)
          if (lane + 32 * e < d_all) acc[i][e] += pj * E::Get(vr[lane + 32 * e]);
      }
    }
  }
  SONDE_ATTN_UNROLL
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int row = qt * kSimtRows + warp * kRowsPerWarp + i;
    if (row >= tokens) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    float* orow = a.out + (size_t(row0 + row) * a.heads + h) * d_all;
    SONDE_ATTN_UNROLL
    for (int e = 0; e < kPer; ++e)
      if (lane + 32 * e < d_all) orow[lane + 32 * e] = acc[i][e] * inv;
  }
}

template <int kType>
void LaunchSimt(const PrefillArgs& a, int max_tokens, int seqs, size_t shared, GpuStream& st) {
  const dim3 grid(CeilDiv(max_tokens, kSimtRows), a.heads, seqs), block(kSimtWarps * 32);
  if (a.head_dim <= 64)
    Launch(PrefillSimtKernel<kType, 2>, grid, block, shared, st, a);
  else if (a.head_dim <= 128)
    Launch(PrefillSimtKernel<kType, 4>, grid, block, shared, st, a);
  else
    Launch(PrefillSimtKernel<kType, 8>, grid, block, shared, st, a);
}

template <int kType>
void LaunchMma(const PrefillArgs& a, int max_tokens, int seqs, GpuStream& st) {
  const dim3 grid(CeilDiv(max_tokens, kMmaRows), a.heads, seqs), block(kMmaWarps * 32);
  const size_t shared = MmaShared(a.head_dim, a.stages);
  if (a.head_dim == 64)
    Launch(PrefillMmaKernel<kType, 64>, grid, block, shared, st, a);
  else if (a.head_dim == 96)
    Launch(PrefillMmaKernel<kType, 96>, grid, block, shared, st, a);
  else
    Launch(PrefillMmaKernel<kType, 128>, grid, block, shared, st, a);
}

// Buffers: 0 q (f32, rows x heads x headDim), 1 pool, 2 block tables (int32, seqs x width),
// 3 sequences (int32, seqs x [start, tokens, row0]), 4 out (f32, like q).
void PrefillOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int type = KvTypeOf(c);
  PrefillArgs a{};
  const int64_t seqs = c.Int("seqs", 0, 65535), rows = c.Int("rows");
  const int64_t heads = c.Int("heads", 1, 65535), kv_heads = c.Int("kvHeads", 1, 65535);
  if (heads % kv_heads) c.Invalid("heads (" + std::to_string(heads) + ") must be a multiple of kvHeads (" + std::to_string(kv_heads) + ")");
  a.head_dim = static_cast<int>(c.Int("headDim", 1, kMaxHeadDim));
  a.kv = PoolLayoutOf(c, 2 * kv_heads, a.head_dim, kv_heads);
  a.rows = static_cast<int>(rows);
  a.heads = static_cast<int>(heads);
  a.group = static_cast<int>(heads / kv_heads);
  a.width = static_cast<int>(c.Int("width", 1));
  if (static_cast<int64_t>(a.width) * a.kv.block_size > INT32_MAX) c.Invalid("width * blockSize must fit in int32");
  a.scale = static_cast<float>(c.NumOr("scale", 1.0 / std::sqrt(static_cast<double>(a.head_dim))));
  const int64_t max_tokens = c.Int("maxTokens", 0, rows);
  const size_t eb = KvElemBytes(type);
  a.q = c.Buffer<float>(0, c.Count({rows, heads, a.head_dim}), "q");
  a.pool = c.Buffer<unsigned char>(1, c.Count({a.kv.blocks, static_cast<int64_t>(a.kv.block), static_cast<int64_t>(eb)}), "pool");
  a.tables = c.Buffer<int32_t>(2, c.Count({seqs, a.width}), "blockTables");
  a.meta = c.Buffer<int32_t>(3, c.Count({seqs, 3}), "sequences");
  a.out = c.Buffer<float>(4, c.Count({rows, heads, a.head_dim}), "out");
  if (seqs == 0 || max_tokens == 0) return;
  const bool simt = c.NumOr("simt", 0) != 0;
  const size_t limit = dev.shared_per_block ? dev.shared_per_block : 48 * 1024;
  a.stages = MmaShared(a.head_dim, 3) <= limit ? 3 : 2;
  const bool mma = !simt && type != kKvF32 && ComputeCapability(dev) >= 80 &&
                   (a.head_dim == 64 || a.head_dim == 96 || a.head_dim == 128) && MmaShared(a.head_dim, a.stages) <= limit;
  const int mt = static_cast<int>(max_tokens), ns = static_cast<int>(seqs);
  if (mma) {
    if (type == kKvF16)
      LaunchMma<kKvF16>(a, mt, ns, st);
    else
      LaunchMma<kKvBf16>(a, mt, ns, st);
    return;
  }
  const size_t shared = SimtShared(a.head_dim, eb);
  if (dev.shared_per_block && shared > dev.shared_per_block)
    c.Invalid("headDim " + std::to_string(a.head_dim) + " with this KV type needs " + std::to_string(shared) +
              " bytes of shared memory per block; " + dev.id + " has " + std::to_string(dev.shared_per_block));
  switch (type) {
    case kKvF32: LaunchSimt<kKvF32>(a, mt, ns, shared, st); break;
    case kKvF16: LaunchSimt<kKvF16>(a, mt, ns, shared, st); break;
    default: LaunchSimt<kKvBf16>(a, mt, ns, shared, st); break;
  }
}

}  // namespace

SONDE_GPU_OP("paged_attention_prefill", PrefillOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
