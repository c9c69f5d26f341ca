// Quantised-weight matrix products on the GPU (the CPU family: kernels/quant): y[m][n] = x[m][.] . W[n][.]
// for W in GGUF q8_0 / q4_0 blocks, with the CPU kernels' precision definition (kernels/quant/quant.h):
// x is quantised per row and block of 32 to int8 with an fp32 scale, each block's integer dot product
// is exact in int32, and it enters an fp32 sum as fmaf(fp32(dw * dx), isum, acc).
//
// Device weight layout ("packed", made once at upload by quant_pack from the GGUF bytes): the
// 34 / 18-byte GGUF blocks are unaligned, which rules out 16-byte vector loads, so the quants and
// the scales are split into two aligned arrays:
//   quants  n rows of k int8 (q8_0) or of k / 2 bytes (q4_0, each 16-byte block of nibbles kept as
//           GGUF stores it: byte j holds element j in its low nibble and element j + 16 in its high);
//   scales  n rows of k / 32 fp16, starting at byte n * (row bytes of the quants).
// The bytes read per block are the GGUF ones (34 / 18), so GEMV bandwidth is unchanged.
//
// Ops:
//   quant_pack    [raw GGUF rows, packed]                   {type, n, k}
//   quant_matmul  [x f32 m*k, packed, y f32 m*n, scratch]   {type, m, n, k, algorithm?, simt?, reuse?}
//     scratch holds the quantised activations: m * k int8, then m * (k / 32) fp32 scales.
//     algorithm 0 auto (GEMV up to 16 rows, else GEMM), 1 GEMV, 2 GEMM; simt forces the SIMT GEMM
//     (dp4a) that devices below compute capability 8.0 run instead of the int8 mma.sync one;
//     gemv (one activation row): 0 default, 1 the warp-per-rows GEMV, 2 / 3 / 4 the streaming one
//     (below) with 1 / 2 / 4 blocks per lane and step; gemvWarps caps the streaming grid's warps;
//     reuse: scratch already holds this x quantised (by an earlier call with the same x, m and k,
//     as Q, K and V share their input), so the quantiser is skipped: one launch per product.

#include <cstdlib>
#include <string>

#include "kernels/quant/cuda/quantize_acts.h"
#include "kernels/quant/quant.h"
#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

constexpr int kQ8 = kernels::kQuantQ8_0;
constexpr int kQ4 = kernels::kQuantQ4_0;

// Bytes of one block's quants in the packed layout.
template <int T>
constexpr unsigned kQuantBytes = T == kQ8 ? 32 : 16;

// Four signed 4-bit values (nibble - 8) widened to int8 lanes: v holds one nibble per byte (0..15).
// q - 8 is the 4-bit two's complement of q ^ 8, and the sign bit (bit 3) times 0x1E fills the
// byte's upper half without carrying into the next byte (8 * 0x1E = 0xF0).
__device__ __forceinline__ uint32_t NibblesToS8(uint32_t v) {
  const uint32_t t = v ^ 0x08080808u;
  return t | ((t & 0x08080808u) * 0x1Eu);
}

// One block's quants as loaded (q8_0: 32 bytes, q4_0: 16 bytes in raw[0]), then widened to 8
// words of 4 int8 each in element order (word w = elements 4w..4w+3). Loads and widening are apart
// so that a loop can issue several blocks' loads before it waits on the first.
template <int T>
__device__ __forceinline__ void LoadBlock(const uint8_t* __restrict__ q, uint4 (&raw)[2]) {
  raw[0] = __ldg(reinterpret_cast<const uint4*>(q));
  if (T == kQ8) raw[1] = __ldg(reinterpret_cast<const uint4*>(q) + 1);
}

template <int T>
__device__ __forceinline__ void WidenBlock(const uint4 (&raw)[2], uint32_t (&w)[8]) {
  if (T == kQ8) {
    w[0] = raw[0].x, w[1] = raw[0].y, w[2] = raw[0].z, w[3] = raw[0].w;
    w[4] = raw[1].x, w[5] = raw[1].y, w[6] = raw[1].z, w[7] = raw[1].w;
  } else {
    const uint32_t v[4] = {raw[0].x, raw[0].y, raw[0].z, raw[0].w};
    for (int i = 0; i < 4; ++i) {
      w[i] = NibblesToS8(v[i] & 0x0F0F0F0Fu);
      w[i + 4] = NibblesToS8((v[i] >> 4) & 0x0F0F0F0Fu);
    }
  }
}

// ---- activations: one warp per block of 32, as QuantizeActivationRow does it on the CPU ----

constexpr unsigned kActThreads = 256;

__global__ void __launch_bounds__(kActThreads) QuantizeActsKernel(const float* __restrict__ x, int8_t* __restrict__ xq,
                                                                  float* __restrict__ xd, size_t blocks) {
  GridDependencyStart();
  const size_t b = (size_t(blockIdx.x) * kActThreads + threadIdx.x) / 32;
  if (b >= blocks) return;  // whole warps: blocks of 32 never straddle warps
  const size_t i = b * 32 + threadIdx.x % 32;
  const float v[1] = {x[i]};
  QuantizeActBlock<1>(v, i, true, xq, xd);
}

// ---- packing: one thread per GGUF block ----

template <int T>
__global__ void PackKernel(const uint8_t* __restrict__ raw, uint8_t* __restrict__ quants, uint16_t* __restrict__ scales,
                           size_t blocks) {
  const size_t b = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= blocks) return;
  constexpr unsigned kBytes = kQuantBytes<T>;
  const uint8_t* src = raw + b * (2 + kBytes);  // 2-byte aligned at best: byte loads
  scales[b] = static_cast<uint16_t>(src[0] | (src[1] << 8));
  uint32_t w[kBytes / 4];
  for (unsigned i = 0; i < kBytes / 4; ++i)
    w[i] = uint32_t(src[2 + 4 * i]) | uint32_t(src[3 + 4 * i]) << 8 | uint32_t(src[4 + 4 * i]) << 16 |
           uint32_t(src[5 + 4 * i]) << 24;
  uint4* dst = reinterpret_cast<uint4*>(quants + b * kBytes);
  for (unsigned i = 0; i < kBytes / 16; ++i) dst[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
}

// ---- GEMV (decode, up to 8 activation rows per launch): each warp takes R weight rows ----
// Each lane takes whole blocks (lane, lane + 32, ...), so a warp's loads cover 32 consecutive blocks
// of a row (1 KiB of q8_0, 512 B of q4_0) in 16-byte pieces, and U blocks of each of its R rows are
// loaded before the first dp4a needs them (64 to 128 bytes per lane in flight). R = 2 from two
// activation rows halves the activation loads per weight byte (they come from L1: every warp of
// the SM reads the same x); for one row it measured slower on an H200 (fewer warps in flight). The
// activations are not staged in shared memory: K up to 14336 would need 112 KiB of it at 8 rows.

constexpr unsigned kGemvWarps = 4;
constexpr unsigned kGemvMaxRows = 8;
// 'auto' runs the GEMV (in launches of up to 8 rows) up to this many rows: on an H200 at K = N =
// 4096 the GEMV took 29 us for 16 rows against the GEMM's 54 us, and broke even near 32.
constexpr unsigned kGemvAutoRows = 16;

// An int32 sum started at this bit pattern reads as the float 1.5 * 2^23 + sum for |sum| < 2^22, so
// one full-rate FADD of -1.5 * 2^23 converts it exactly (the int-to-float unit runs at a quarter
// of the FMA rate). A block's sum is at most 32 * 128 * 127 < 2^19.
constexpr int32_t kMagicInt = 0x4B400000;
constexpr float kMagicFloat = 12582912.0f;
__device__ __forceinline__ float MagicToFloat(int32_t v) { return __int_as_float(v) - kMagicFloat; }

template <int T, int M>
constexpr unsigned kGemvRowsPerWarp = M > 1 ? 2 : 1;
template <int T, int M>
constexpr unsigned kGemvUnroll = M == 1 ? 4 : (T == kQ8 ? 4 : 8) / kGemvRowsPerWarp<T, M>;

template <int T, int M, unsigned R, unsigned U>
__global__ void __launch_bounds__(kGemvWarps * 32) QuantGemvKernel(const int8_t* __restrict__ xq, const float* __restrict__ xd,
                                                                   const uint8_t* __restrict__ wq,
                                                                   const uint16_t* __restrict__ wd, float* __restrict__ y,
                                                                   unsigned n, unsigned k) {
  const unsigned row0 = (blockIdx.x * kGemvWarps + threadIdx.x / 32) * R, lane = threadIdx.x % 32;
  const unsigned rows = row0 >= n ? 0 : n - row0 < R ? n - row0 : R, nb = k / 32;
  // Launched dependent (PDL): the weights are constant, so the warp's rows start on their way to L2
  // while the kernel that writes x finishes; nothing else is touched before the wait.
  for (unsigned r = 0; r < rows; ++r) {
    const uint8_t* row = wq + size_t(row0 + r) * nb * kQuantBytes<T>;
    for (unsigned o = lane * 128; o < nb * kQuantBytes<T>; o += 32 * 128) PrefetchL2(row + o);
    if (lane == 0) PrefetchL2(wd + size_t(row0 + r) * nb);
  }
  GridDependencyStart();
  if (rows == 0) return;  // warp-uniform, and no block barrier below
  float acc[R][M];
  for (unsigned r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = 0.0f;
  // With one activation row its blocks are loaded with the weights' (kXAhead): x comes from L1, but
  // a load issued beside its dot product left each block waiting on it in turn (an H200 profile of
  // the q4_0 GEMV: half the cycles stalled on L1); loaded ahead, the 4096 x 14336 q8_0 GEMV went
  // from 3.12 to 3.60 TB/s. More rows would need too many registers for it.
  constexpr bool kXAhead = M == 1;
  for (unsigned b0 = lane; b0 < nb; b0 += 32 * U) {
    uint4 raw[U][R][2], xa[U][2];
    float dw[U][R], dxa[U];
    for (unsigned u = 0; u < U; ++u) {
      const unsigned b = b0 + 32 * u;
      if (b < nb) {
        for (unsigned r = 0; r < R; ++r)
          if (r < rows) {
            const size_t blk = size_t(row0 + r) * nb + b;
            LoadBlock<T>(wq + blk * kQuantBytes<T>, raw[u][r]);
            dw[u][r] = HalfToFloat(__ldg(wd + blk));
          }
        if (kXAhead) {
          xa[u][0] = __ldg(reinterpret_cast<const uint4*>(xq + size_t(b) * 32));
          xa[u][1] = __ldg(reinterpret_cast<const uint4*>(xq + size_t(b) * 32) + 1);
          dxa[u] = __ldg(xd + b);
        }
      }
    }
    for (unsigned u = 0; u < U; ++u) {
      const unsigned b = b0 + 32 * u;
      if (b >= nb) break;
      uint32_t w[R][8] = {};  // rows past n stay unread; zeros keep the host compiler from warning
      for (unsigned r = 0; r < R; ++r)
        if (r < rows) WidenBlock<T>(raw[u][r], w[r]);
      for (int i = 0; i < M; ++i) {
        const uint4* xp = reinterpret_cast<const uint4*>(xq + size_t(i) * k + size_t(b) * 32);
        const uint4 x0 = kXAhead ? xa[u][0] : __ldg(xp), x1 = kXAhead ? xa[u][1] : __ldg(xp + 1);
        const int xv[8] = {static_cast<int>(x0.x), static_cast<int>(x0.y), static_cast<int>(x0.z), static_cast<int>(x0.w),
                           static_cast<int>(x1.x), static_cast<int>(x1.y), static_cast<int>(x1.z), static_cast<int>(x1.w)};
        const float dx = kXAhead ? dxa[u] : __ldg(xd + size_t(i) * nb + b);
        for (unsigned r = 0; r < R; ++r) {
          if (r >= rows) break;
          int s = kMagicInt;
          for (int j = 0; j < 8; ++j) s = __dp4a(static_cast<int>(w[r][j]), xv[j], s);
          acc[r][i] = fmaf(dw[u][r] * dx, MagicToFloat(s), acc[r][i]);
        }
      }
    }
  }
  for (unsigned r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      for (int o = 16; o > 0; o >>= 1) acc[r][i] += __shfl_xor_sync(0xffffffffu, acc[r][i], o);
  if (lane == 0)
    for (unsigned r = 0; r < rows; ++r)
      for (int i = 0; i < M; ++i) y[size_t(i) * n + row0 + r] = acc[r][i];
}

// ---- streaming GEMV (one activation row): persistent warps, each step's loads issued one ahead ----
// The GEMV above gives each warp its rows and issues one round of loads per U blocks of a row,
// then waits on them: at k = 4096 a row is one or two rounds, so a warp's life is one or two DRAM
// round trips, and a grid of n / 4 blocks runs in 1.3 waves (the Q/K/V product's 6144 rows) whose
// last one leaves most SMs idle. Here the grid is what the SMs hold at once (kStreamBlocksPerSm<U>
// blocks each, the register budget's count), each warp takes a contiguous range of rows (the same
// count, within one, for all warps), and walks its rows' steps of U blocks per lane in order,
// loading step s + 1 (weights, x, both scales) before it computes step s: every warp keeps up to
// 2 U blocks per lane in flight from its first load to its last, across row ends. A lane sums the
// same blocks in the same order as in the GEMV above (b = lane + 32 j), so both give the same bits.
// On an H200 (16-layer q8_0 4096 x 14336 decode, device time per step): U = 1 1.444-1.450 ms against
// the GEMV above's 1.558-1.563; U = 2 1.609, U = 4 1.924 (fewer warps: occupancy, not bytes per
// warp, is what keeps the bus busy); three buffers of U = 1 (7 blocks per SM) 1.617; a cp.async
// ring of 4-8 steps per warp in shared memory, x staged there per block, 1.52-1.76. Tried later
// against 1.444-1.468 on the same VMs: 9 blocks per SM (same 56 registers) 1.445, 10 (48,
// spilling) 1.641; the first 8 / 16 / 32 MB of the grid's rows prefetched to L2 before the wait
// (the kernels ahead let it launch early) 1.471 / 1.51-1.54 / 1.60; one block per SM whose
// producer lane has the copy engine stream its rows into a ring of up to 32 shared-memory stages
// (cp.async.bulk, mbarriers), 4 / 8 / 16 consumer warps: 1.68-1.75 (the device's 1-D bulk copies
// delivered ~2.8 TB/s this way).

template <unsigned U>
constexpr unsigned kStreamBlocksPerSm = U == 1 ? 8 : U == 2 ? 5 : 3;

template <unsigned U>
struct StreamStep {  // one step's loads: block b0 + 32 u of a row, and of x
  uint4 w[U][2], x[U][2];
  float dw[U], dx[U];
};

template <int T, unsigned U>
__device__ __forceinline__ void LoadStreamStep(StreamStep<U>& s, const int8_t* __restrict__ xq, const float* __restrict__ xd,
                                               const uint8_t* __restrict__ wq, const uint16_t* __restrict__ wd,
                                               unsigned row, unsigned b0, unsigned nb) {
  SONDE_UNROLL
  for (unsigned u = 0; u < U; ++u) {
    const unsigned b = b0 + 32 * u;
    if (b < nb) {
      const size_t blk = size_t(row) * nb + b;
      LoadBlock<T>(wq + blk * kQuantBytes<T>, s.w[u]);
      s.dw[u] = HalfToFloat(__ldg(wd + blk));
      s.x[u][0] = __ldg(reinterpret_cast<const uint4*>(xq + size_t(b) * 32));
      s.x[u][1] = __ldg(reinterpret_cast<const uint4*>(xq + size_t(b) * 32) + 1);
      s.dx[u] = __ldg(xd + b);
    }
  }
}

template <int T, unsigned U>
__device__ __forceinline__ float DotStreamStep(const StreamStep<U>& s, unsigned b0, unsigned nb, float acc) {
  SONDE_UNROLL
  for (unsigned u = 0; u < U; ++u) {
    if (b0 + 32 * u >= nb) break;
    uint32_t w[8];
    WidenBlock<T>(s.w[u], w);
    const int xv[8] = {static_cast<int>(s.x[u][0].x), static_cast<int>(s.x[u][0].y), static_cast<int>(s.x[u][0].z),
                       static_cast<int>(s.x[u][0].w), static_cast<int>(s.x[u][1].x), static_cast<int>(s.x[u][1].y),
                       static_cast<int>(s.x[u][1].z), static_cast<int>(s.x[u][1].w)};
    int d = kMagicInt;
    SONDE_UNROLL
    for (int j = 0; j < 8; ++j) d = __dp4a(static_cast<int>(w[j]), xv[j], d);
    acc = fmaf(s.dw[u] * s.dx[u], MagicToFloat(d), acc);
  }
  return acc;
}

template <int T, unsigned U>
__global__ void __launch_bounds__(kGemvWarps * 32, kStreamBlocksPerSm<U>)
    QuantGemvStreamKernel(const int8_t* __restrict__ xq, const float* __restrict__ xd, const uint8_t* __restrict__ wq,
                          const uint16_t* __restrict__ wd, float* __restrict__ y, unsigned n, unsigned k,
                          unsigned rows_per_warp) {
  const unsigned warp = blockIdx.x * kGemvWarps + threadIdx.x / 32, lane = threadIdx.x % 32, nb = k / 32;
  const unsigned row0 = warp * rows_per_warp;
  const unsigned rows = row0 >= n ? 0 : n - row0 < rows_per_warp ? n - row0 : rows_per_warp;
  const unsigned chunks = (nb + 32 * U - 1) / (32 * U), steps = rows * chunks;
  // Launched dependent (PDL): the first two steps' weight lines start toward L2 while the kernel
  // that writes x finishes (all of a warp's rows would not fit in L2 for the wide products).
  for (unsigned s = 0; s < steps && s < 2; ++s) {
    const size_t row = row0 + s / chunks, begin = size_t(s % chunks) * 32 * U * kQuantBytes<T>;
    const size_t end = min(begin + 32 * U * kQuantBytes<T>, size_t(nb) * kQuantBytes<T>);
    for (size_t o = begin + lane * 128; o < end; o += 32 * 128) PrefetchL2(wq + row * nb * kQuantBytes<T> + o);
  }
  GridDependencyStart();
  if (steps == 0) return;  // warp-uniform, and no block barrier below
  StreamStep<U> a{}, b{};  // blocks past a row end stay unread; zeros keep the host compiler from warning
  unsigned s = 0, row = row0, chunk = 0;
  float acc = 0.0f;
  LoadStreamStep<T, U>(a, xq, xd, wq, wd, row, lane, nb);
  // One step: load the next into `next`, compute `cur`, finish the row at its last chunk. Called
  // with the two buffers in turn, so each keeps a fixed place in registers.
  const auto step = [&](const StreamStep<U>& cur, StreamStep<U>& next) {
    const bool more = s + 1 < steps, last = chunk + 1 == chunks;
    const unsigned next_row = last ? row + 1 : row, next_chunk = last ? 0 : chunk + 1;
    if (more) LoadStreamStep<T, U>(next, xq, xd, wq, wd, next_row, next_chunk * 32 * U + lane, nb);
    acc = DotStreamStep<T, U>(cur, chunk * 32 * U + lane, nb, acc);
    if (last) {
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) y[row] = acc;
      acc = 0.0f;
    }
    row = next_row, chunk = next_chunk, ++s;
    return more;
  };
  while (step(a, b) && step(b, a)) {
  }
}

// ---- GEMM with int8 tensor cores (prefill) ----
// A block tile is 64 activation rows x 128 weight rows; 8 warps as 2 (rows) x 4 (weight rows), each
// 32 x 32 = 2 x 4 mma tiles of m16n8k32. One m16n8k32 covers exactly one quant block in k, so its
// int32 result is the block's exact integer sum (accumulated onto kMagicInt, so that it converts to
// fp32 with one FADD), scaled by fp32(dw * dx) and FMA'd into the fp32 accumulator right after the
// mma: each output is one fp32 chain over the blocks in order, as in the CPU's blocked GEMM.
// Stages of 4 blocks (128 bytes of k) go through shared memory with the next stage's global loads
// held in registers meanwhile: 4 blocks of compute cover one load's latency. Shared rows are 144
// bytes (36 words): the 8 rows g = 0..7 a fragment load touches (4 words each) fall in 32
// distinct banks.

constexpr unsigned kMmaBm = 64, kMmaBn = 128, kMmaThreads = 256;
constexpr unsigned kStageBlocks = 4, kStageBytes = kStageBlocks * 32, kRowStride = kStageBytes + 16;
constexpr unsigned kChunksPerRow = kStageBytes / 16;

template <int T>
struct MmaStage {  // one stage's global loads, in registers between the loads and the shared stores
  uint4 a[kMmaBm * kChunksPerRow / kMmaThreads];          // 16-byte chunks tid + 256 h of the activations
  uint4 b[T == kQ8 ? kMmaBn * kChunksPerRow / kMmaThreads  // q8_0: chunks of the weight rows
                   : kMmaBn * kStageBlocks / kMmaThreads];  // q4_0: one packed block each
  float dx;                                                // scale [row tid / 4][block tid % 4]
  float dw[kMmaBn * kStageBlocks / kMmaThreads];           // scales tid + 256 h, as dx
};

template <int T>
__device__ __forceinline__ void LoadMmaStage(MmaStage<T>& s, const int8_t* __restrict__ xq, const float* __restrict__ xd,
                                             const uint8_t* __restrict__ wq, const uint16_t* __restrict__ wd,
                                             unsigned m, unsigned n, unsigned k, unsigned row0, unsigned col0,
                                             unsigned blk0) {
  const unsigned tid = threadIdx.x, nb = k / 32;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (unsigned h = 0; h < sizeof(s.a) / sizeof(s.a[0]); ++h) {
    const unsigned c = tid + kMmaThreads * h, r = row0 + c / kChunksPerRow, kb = blk0 * 32 + (c % kChunksPerRow) * 16;
    s.a[h] = r < m && kb < k ? __ldg(reinterpret_cast<const uint4*>(xq + size_t(r) * k + kb)) : zero;
  }
  for (unsigned h = 0; h < sizeof(s.b) / sizeof(s.b[0]); ++h) {
    const unsigned c = tid + kMmaThreads * h;
    if (T == kQ8) {
      const unsigned r = col0 + c / kChunksPerRow, kb = blk0 * 32 + (c % kChunksPerRow) * 16;
      s.b[h] = r < n && kb < k ? __ldg(reinterpret_cast<const uint4*>(wq + size_t(r) * k + kb)) : zero;
    } else {
      const unsigned r = col0 + c / kStageBlocks, b = blk0 + c % kStageBlocks;
      s.b[h] = r < n && b < nb ? __ldg(reinterpret_cast<const uint4*>(wq + (size_t(r) * nb + b) * 16)) : zero;
    }
  }
  {
    const unsigned r = row0 + tid / kStageBlocks, b = blk0 + tid % kStageBlocks;
    s.dx = r < m && b < nb ? __ldg(xd + size_t(r) * nb + b) : 0.0f;
  }
  for (unsigned h = 0; h < sizeof(s.dw) / sizeof(s.dw[0]); ++h) {
    const unsigned c = tid + kMmaThreads * h, r = col0 + c / kStageBlocks, b = blk0 + c % kStageBlocks;
    s.dw[h] = r < n && b < nb ? HalfToFloat(__ldg(wd + size_t(r) * nb + b)) : 0.0f;
  }
}

template <int T>
__device__ __forceinline__ void StoreMmaStage(const MmaStage<T>& s, uint8_t* as, uint8_t* bs, float* sdx, float* sdw) {
  const unsigned tid = threadIdx.x;
  for (unsigned h = 0; h < sizeof(s.a) / sizeof(s.a[0]); ++h) {
    const unsigned c = tid + kMmaThreads * h;
    *reinterpret_cast<uint4*>(as + (c / kChunksPerRow) * kRowStride + (c % kChunksPerRow) * 16) = s.a[h];
  }
  for (unsigned h = 0; h < sizeof(s.b) / sizeof(s.b[0]); ++h) {
    const unsigned c = tid + kMmaThreads * h;
    if (T == kQ8) {
      *reinterpret_cast<uint4*>(bs + (c / kChunksPerRow) * kRowStride + (c % kChunksPerRow) * 16) = s.b[h];
    } else {
      uint4 raw[2] = {s.b[h], s.b[h]};
      uint32_t w[8];
      WidenBlock<kQ4>(raw, w);
      uint8_t* dst = bs + (c / kStageBlocks) * kRowStride + (c % kStageBlocks) * 32;
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      *reinterpret_cast<uint4*>(dst + 16) = make_uint4(w[4], w[5], w[6], w[7]);
    }
  }
  sdx[tid] = s.dx;  // [row][block of the stage]
  for (unsigned h = 0; h < sizeof(s.dw) / sizeof(s.dw[0]); ++h) sdw[tid + kMmaThreads * h] = s.dw[h];
}

template <int T>
__global__ void __launch_bounds__(kMmaThreads) QuantGemmMmaKernel(const int8_t* __restrict__ xq, const float* __restrict__ xd,
                                                                  const uint8_t* __restrict__ wq,
                                                                  const uint16_t* __restrict__ wd, float* __restrict__ y,
                                                                  unsigned m, unsigned n, unsigned k) {
  static_assert(kMmaBm * kStageBlocks == kMmaThreads, "one activation scale per thread and stage");
  __shared__ uint4 as_words[kMmaBm * kRowStride / 16], bs_words[kMmaBn * kRowStride / 16];  // uint4: 16-byte aligned
  __shared__ float sdx[kMmaBm * kStageBlocks];
  __shared__ float sdw[kMmaBn * kStageBlocks];
  uint8_t* as = reinterpret_cast<uint8_t*>(as_words);
  uint8_t* bs = reinterpret_cast<uint8_t*>(bs_words);
  const unsigned row0 = blockIdx.y * kMmaBm, col0 = blockIdx.x * kMmaBn, nb = k / 32;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const unsigned wm = (warp / 4) * 32, wn = (warp % 4) * 32;  // the warp's tile within the block's
  float acc[2][4][4];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  MmaStage<T> next;
  LoadMmaStage<T>(next, xq, xd, wq, wd, m, n, k, row0, col0, 0);
  for (unsigned blk0 = 0; blk0 < nb; blk0 += kStageBlocks) {
    StoreMmaStage<T>(next, as, bs, sdx, sdw);
    __syncthreads();
    if (blk0 + kStageBlocks < nb) LoadMmaStage<T>(next, xq, xd, wq, wd, m, n, k, row0, col0, blk0 + kStageBlocks);
    const unsigned blocks = nb - blk0 < kStageBlocks ? nb - blk0 : kStageBlocks;
    for (unsigned sb = 0; sb < blocks; ++sb) {
      uint32_t a[2][4], b[4][2];
      for (int i = 0; i < 2; ++i) {
        const uint8_t* p = as + (wm + i * 16 + g) * kRowStride + sb * 32 + t * 4;
        a[i][0] = *reinterpret_cast<const uint32_t*>(p);
        a[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kRowStride);
        a[i][2] = *reinterpret_cast<const uint32_t*>(p + 16);
        a[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kRowStride + 16);
      }
      for (int j = 0; j < 4; ++j) {
        const uint8_t* p = bs + (wn + j * 8 + g) * kRowStride + sb * 32 + t * 4;
        b[j][0] = *reinterpret_cast<const uint32_t*>(p);
        b[j][1] = *reinterpret_cast<const uint32_t*>(p + 16);
      }
      float dx[2][2], dw[4][2];
      for (int i = 0; i < 2; ++i)
        for (int h = 0; h < 2; ++h) dx[i][h] = sdx[(wm + i * 16 + g + h * 8) * kStageBlocks + sb];
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 2; ++e) dw[j][e] = sdw[(wn + j * 8 + t * 2 + e) * kStageBlocks + sb];
      // All 8 products of the block issue before the first scaling waits on one.
      int32_t d[2][4][4];
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) {
          for (int e = 0; e < 4; ++e) d[i][j][e] = kMagicInt;
          MmaS8(d[i][j], a[i], b[j]);
        }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j)
          for (int e = 0; e < 4; ++e)
            acc[i][j][e] = fmaf(dw[j][e & 1] * dx[i][e >> 1], MagicToFloat(d[i][j][e]), acc[i][j][e]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e) {
        const unsigned r = row0 + wm + i * 16 + g + (e >> 1) * 8, c = col0 + wn + j * 8 + t * 2 + (e & 1);
        if (r < m && c < n) y[size_t(r) * n + c] = acc[i][j][e];
      }
}

// ---- SIMT GEMM (compute capability below 8.0, or forced): dp4a over shared-memory tiles ----
// 64 x 64 outputs per block of 16 x 16 threads, 4 x 4 per thread (rows ty + 16 i, weight rows
// tx + 16 j), one quant block per stage. Shared rows are 36 bytes (9 words): the 16 weight rows a
// half-warp reads at one word index fall in 16 distinct banks.

constexpr unsigned kSimtTile = 64, kSimtStride = 36;

template <int T>
__global__ void __launch_bounds__(256) QuantGemmSimtKernel(const int8_t* __restrict__ xq, const float* __restrict__ xd,
                                                           const uint8_t* __restrict__ wq, const uint16_t* __restrict__ wd,
                                                           float* __restrict__ y, unsigned m, unsigned n, unsigned k) {
  __shared__ uint32_t as_words[kSimtTile * kSimtStride / 4], bs_words[kSimtTile * kSimtStride / 4];
  uint8_t* as = reinterpret_cast<uint8_t*>(as_words);
  uint8_t* bs = reinterpret_cast<uint8_t*>(bs_words);
  __shared__ float sdx[kSimtTile], sdw[kSimtTile];
  const unsigned tid = threadIdx.x, tx = tid % 16, ty = tid / 16, nb = k / 32;
  const unsigned row0 = blockIdx.y * kSimtTile, col0 = blockIdx.x * kSimtTile;
  float acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (unsigned b = 0; b < nb; ++b) {
    // 64 rows x 8 words of each operand: two words per thread per operand.
    for (unsigned e = tid; e < kSimtTile * 8; e += 256) {
      const unsigned r = e / 8, w = e % 8, xr = row0 + r, wr = col0 + r;
      uint32_t xv = 0, wv = 0;
      if (xr < m) xv = __ldg(reinterpret_cast<const uint32_t*>(xq + size_t(xr) * k + size_t(b) * 32) + w);
      if (wr < n) {
        if (T == kQ8) {
          wv = __ldg(reinterpret_cast<const uint32_t*>(wq + (size_t(wr) * nb + b) * 32) + w);
        } else {
          const uint32_t p = __ldg(reinterpret_cast<const uint32_t*>(wq + (size_t(wr) * nb + b) * 16) + w % 4);
          wv = NibblesToS8((w < 4 ? p : p >> 4) & 0x0F0F0F0Fu);
        }
      }
      *reinterpret_cast<uint32_t*>(as + r * kSimtStride + w * 4) = xv;
      *reinterpret_cast<uint32_t*>(bs + r * kSimtStride + w * 4) = wv;
    }
    if (tid < kSimtTile) sdx[tid] = row0 + tid < m ? __ldg(xd + size_t(row0 + tid) * nb + b) : 0.0f;
    else if (tid < 2 * kSimtTile) {
      const unsigned c = col0 + tid - kSimtTile;
      sdw[tid - kSimtTile] = c < n ? HalfToFloat(__ldg(wd + size_t(c) * nb + b)) : 0.0f;
    }
    __syncthreads();
    int32_t s[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) s[i][j] = kMagicInt;
    for (int w = 0; w < 8; ++w) {
      int32_t av[4], bv[4];
      for (int i = 0; i < 4; ++i) av[i] = *reinterpret_cast<const int32_t*>(as + (ty + 16 * i) * kSimtStride + w * 4);
      for (int j = 0; j < 4; ++j) bv[j] = *reinterpret_cast<const int32_t*>(bs + (tx + 16 * j) * kSimtStride + w * 4);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) s[i][j] = __dp4a(av[i], bv[j], s[i][j]);
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        acc[i][j] = fmaf(sdw[tx + 16 * j] * sdx[ty + 16 * i], MagicToFloat(s[i][j]), acc[i][j]);
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const unsigned r = row0 + ty + 16 * i, c = col0 + tx + 16 * j;
      if (r < m && c < n) y[size_t(r) * n + c] = acc[i][j];
    }
}

// ---- ops ----

struct QuantShape {
  int type;
  int64_t n, k, nb;
  size_t quant_bytes;  // of all rows' quants: the scales' offset in the packed buffer
  size_t packed_bytes;
};

QuantShape ReadShape(const GpuOpCall& c) {
  QuantShape s;
  s.type = static_cast<int>(c.Int("type", kQ8, kQ4));
  s.n = c.Int("n");
  s.k = c.Int("k", 32);
  if (s.k % 32) c.Invalid("k (" + std::to_string(s.k) + ") must be a multiple of 32, the block size");
  s.nb = s.k / 32;
  s.quant_bytes = c.Count({s.n, s.nb, s.type == kQ8 ? 32 : 16});
  s.packed_bytes = s.quant_bytes + c.Count({s.n, s.nb, 2});
  return s;
}

void PackOp(GpuStream& stream, const GpuDeviceInfo&, const GpuOpCall& c) {
  const QuantShape s = ReadShape(c);
  const size_t blocks = c.Count({s.n, s.nb});
  const uint8_t* raw = c.Buffer<uint8_t>(0, c.Count({s.n, s.nb, s.type == kQ8 ? 34 : 18}), "raw weights");
  uint8_t* packed = c.Buffer<uint8_t>(1, s.packed_bytes, "packed weights");
  uint16_t* scales = reinterpret_cast<uint16_t*>(packed + s.quant_bytes);
  if (!blocks) return;
  if (s.type == kQ8)
    Launch(PackKernel<kQ8>, dim3(CeilDiv(blocks, 256)), dim3(256), 0, stream, raw, packed, scales, blocks);
  else
    Launch(PackKernel<kQ4>, dim3(CeilDiv(blocks, 256)), dim3(256), 0, stream, raw, packed, scales, blocks);
}

template <int T, int M, unsigned R = kGemvRowsPerWarp<T, M>, unsigned U = kGemvUnroll<T, M>>
void LaunchGemv(GpuStream& stream, const int8_t* xq, const float* xd, const uint8_t* wq, const uint16_t* wd, float* y,
                unsigned n, unsigned k) {
  LaunchDependent(QuantGemvKernel<T, M, R, U>, dim3(CeilDiv(n, kGemvWarps * R)), dim3(kGemvWarps * 32), 0, stream, xq, xd,
                  wq, wd, y, n, k);
}

// Which GEMV runs one activation row (the op's `gemv`; 0 takes the default: the streaming one with
// U = 1, or SONDE_GPU_GEMV=rows | stream1 | stream2 | stream4 where set, an A/B switch): 1 the
// warp-per-rows GEMV, 2 / 3 / 4 the streaming one with U = 1 / 2 / 4 blocks per lane and step.
// Several activation rows (batched decode) take the warp-per-rows GEMV.
enum GemvKind {
  kGemvDefault = 0, kGemvRows = 1, kGemvStream1 = 2, kGemvStream2 = 3, kGemvStream4 = 4,
  kGemvLast = kGemvStream4
};

int DefaultGemv() {
  static const int kind = [] {
    const char* v = std::getenv("SONDE_GPU_GEMV");
    if (!v) return int(kGemvStream1);
    const std::string s = v;
    return s == "rows" ? int(kGemvRows) : s == "stream2" ? int(kGemvStream2) : s == "stream4" ? int(kGemvStream4)
         : int(kGemvStream1);
  }();
  return kind;
}

template <int T, unsigned U>
void LaunchGemvStream(GpuStream& stream, unsigned sms, unsigned max_warps, const int8_t* xq, const float* xd,
                      const uint8_t* wq, const uint16_t* wd, float* y, unsigned n, unsigned k) {
  if (max_warps == 0) max_warps = sms * kStreamBlocksPerSm<U> * kGemvWarps;
  const unsigned rows_per_warp = CeilDiv(n, max_warps), warps = CeilDiv(n, rows_per_warp);
  LaunchDependent(QuantGemvStreamKernel<T, U>, dim3(CeilDiv(warps, kGemvWarps)), dim3(kGemvWarps * 32), 0, stream, xq, xd,
                  wq, wd, y, n, k, rows_per_warp);
}

template <int T>
void Gemv(GpuStream& stream, unsigned rows, const int8_t* xq, const float* xd, const uint8_t* wq, const uint16_t* wd,
          float* y, unsigned n, unsigned k, int kind, unsigned sms, unsigned max_warps) {
  if (rows == 1 && kind == kGemvDefault) kind = DefaultGemv();
  if (rows == 1 && kind == kGemvStream1) return LaunchGemvStream<T, 1>(stream, sms, max_warps, xq, xd, wq, wd, y, n, k);
  if (rows == 1 && kind == kGemvStream2) return LaunchGemvStream<T, 2>(stream, sms, max_warps, xq, xd, wq, wd, y, n, k);
  if (rows == 1 && kind == kGemvStream4) return LaunchGemvStream<T, 4>(stream, sms, max_warps, xq, xd, wq, wd, y, n, k);
  // One instantiation per row count keeps the accumulators in registers.
  switch (rows) {
    case 1:
      // Two blocks in flight per lane (56 registers: 9 blocks of 4 warps per SM) instead of four
      // (96: 5 blocks) up to n = 16384 rows: on an H200 that took the q8_0 GEMVs of 4096 rows
      // from 72 / 67% of read bandwidth to 76 / 74% (k = 4096 / 14336), q4_0 from 45 / 70% to
      // 50 / 76%; at 28672 rows four kept more bytes in flight (q4_0 72% against 68%), and R = 2
      // or eight blocks were slower everywhere.
      if (n <= 16384) return LaunchGemv<T, 1, 1, 2>(stream, xq, xd, wq, wd, y, n, k);
      return LaunchGemv<T, 1>(stream, xq, xd, wq, wd, y, n, k);
    case 2: return LaunchGemv<T, 2>(stream, xq, xd, wq, wd, y, n, k);
    case 3: return LaunchGemv<T, 3>(stream, xq, xd, wq, wd, y, n, k);
    case 4: return LaunchGemv<T, 4>(stream, xq, xd, wq, wd, y, n, k);
    case 5: return LaunchGemv<T, 5>(stream, xq, xd, wq, wd, y, n, k);
    case 6: return LaunchGemv<T, 6>(stream, xq, xd, wq, wd, y, n, k);
    case 7: return LaunchGemv<T, 7>(stream, xq, xd, wq, wd, y, n, k);
    default: return LaunchGemv<T, 8>(stream, xq, xd, wq, wd, y, n, k);
  }
}

template <int T>
void Matmul(GpuStream& stream, bool gemm, bool simt, unsigned m, unsigned n, unsigned k, const int8_t* xq, const float* xd,
            const uint8_t* wq, const uint16_t* wd, float* y, int gemv, unsigned sms, unsigned gemv_warps) {
  const unsigned nb = k / 32;
  if (!gemm) {
    for (unsigned r = 0; r < m; r += kGemvMaxRows) {
      const unsigned rows = m - r < kGemvMaxRows ? m - r : kGemvMaxRows;
      Gemv<T>(stream, rows, xq + size_t(r) * k, xd + size_t(r) * nb, wq, wd, y + size_t(r) * n, n, k, gemv, sms, gemv_warps);
    }
  } else if (simt) {
    Launch(QuantGemmSimtKernel<T>, dim3(CeilDiv(n, kSimtTile), CeilDiv(m, kSimtTile)), dim3(256), 0, stream, xq, xd, wq,
           wd, y, m, n, k);
  } else {
    Launch(QuantGemmMmaKernel<T>, dim3(CeilDiv(n, kMmaBn), CeilDiv(m, kMmaBm)), dim3(kMmaThreads), 0, stream, xq, xd, wq,
           wd, y, m, n, k);
  }
}

void MatmulOp(GpuStream& stream, const GpuDeviceInfo& device, const GpuOpCall& c) {
  const QuantShape s = ReadShape(c);
  const int64_t m = c.Int("m");
  const int algorithm = static_cast<int>(c.IntOr("algorithm", 0, 0, 2));
  const bool simt = c.IntOr("simt", 0, 0, 1) != 0 || ComputeCapability(device) < 80;
  const bool reuse = c.IntOr("reuse", 0, 0, 1) != 0;
  // gemv: GemvKind; gemvWarps: at most this many warps for a streaming GEMV (0: what the SMs hold),
  // so that tests reach several rows per warp on small shapes.
  const int gemv = static_cast<int>(c.IntOr("gemv", kGemvDefault, kGemvDefault, kGemvLast));
  const unsigned gemv_warps = static_cast<unsigned>(c.IntOr("gemvWarps", 0));
  // At least 1: the emulator and an unqueried device report 0 multiprocessors.
  const unsigned sms = static_cast<unsigned>(device.multiprocessors > 0 ? device.multiprocessors : 1);
  const float* x = c.Buffer<float>(0, c.Count({m, s.k}), "x");
  const uint8_t* packed = c.Buffer<uint8_t>(1, s.packed_bytes, "packed weights");
  float* y = c.Buffer<float>(2, c.Count({m, s.n}), "y");
  int8_t* xq = c.Buffer<int8_t>(3, c.Count({m, s.k}) + c.Count({m, s.nb, 4}), "scratch");
  float* xd = reinterpret_cast<float*>(xq + c.Count({m, s.k}));
  const bool gemm = algorithm == 2 || (algorithm == 0 && m > int64_t(kGemvAutoRows));
  if (gemm && m > int64_t(65535) * (simt ? kSimtTile : kMmaBm)) c.Invalid("m exceeds the GEMM grid's limit");
  if (m == 0 || s.n == 0) return;
  const size_t act_blocks = c.Count({m, s.nb});
  if (!reuse)
    LaunchDependent(QuantizeActsKernel, dim3(CeilDiv(act_blocks * 32, kActThreads)), dim3(kActThreads), 0, stream, x, xq,
                    xd, act_blocks);
  const uint16_t* wd = reinterpret_cast<const uint16_t*>(packed + s.quant_bytes);
  if (s.type == kQ8)
    Matmul<kQ8>(stream, gemm, simt, unsigned(m), unsigned(s.n), unsigned(s.k), xq, xd, packed, wd, y, gemv, sms, gemv_warps);
  else
    Matmul<kQ4>(stream, gemm, simt, unsigned(m), unsigned(s.n), unsigned(s.k), xq, xd, packed, wd, y, gemv, sms, gemv_warps);
}

}  // namespace

SONDE_GPU_OP("quant_pack", PackOp);
SONDE_GPU_OP("quant_matmul", MatmulOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
