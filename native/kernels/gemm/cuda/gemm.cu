// GEMM on the GPU (the CPU family: kernels/gemm, ops/gemm.cc, ops/gemm_lowp.cc):
//   C[m, n] = epilogue(A[m, k] . B[k, n]), row-major with leading dimensions, fp32 accumulation, fp32 C,
// with the CPU GEMM's epilogue (per-column scale and bias, activation, residual before or after it)
// applied while the tile is still in registers. Kernels:
//   mma   fp16/bf16 B (A fp32 or B's type): 128x128x32 block tiles, 8 warps of 64x32, mma.sync
//         m16n8k16 with fragments from ldmatrix (.trans for B, which stays row-major [k][n] in
//         shared memory); fp32 A is rounded to B's type as it is staged into shared memory.
//         16-bit A and B with 16-byte aligned rows skip the registers: cp.async into 4 stages.
//   wgmma fp16/bf16 A and B of one type on Hopper (sm_90a, cc 9.0): 128x256x64 tiles, one
//         persistent block per SM, a producer warpgroup streaming 4 shared stages through the
//         tensor copy engine (mbarriers), two consumer warpgroups on wgmma m64n256k16 from shared
//         memory. 'auto' takes it when the
//         device and build have it, lda/ldb allow the copies, and SONDE_GPU_WGMMA is not 0.
//   simt  any B type: 128x128x8 block tiles, 8x8 outputs per thread, fp32 FMA (cc < 8.0, fp32 B);
//         64x64 (4x4 per thread) where 128 would leave SMs idle, and K split across blocks
//         (split_k.h) where the tiles alone still do.
//   gemv  m small (decode): streams B once per 8 rows of A with 16-byte loads, K split over the
//         block's 64 row groups and reduced in shared memory.
//   int8  s8 weights quantised per column (gemm_pack_s8) and A quantised per row to u8 at run time,
//         both exactly as ops/gemm_lowp.cc does, so the s32 sums equal the CPU int8 path's; the
//         product runs on mma.sync m16n8k32 (s8 x s8) with A stored as u8 - 128 and the shift
//         folded back through the column sums of the weights, or on dp4a (gemv form) below cc 8.0.
// The other shared tiles are double-buffered through registers: the next K tile is loaded from
// global memory while the cores work on the current one, so one __syncthreads per K tile suffices.
#include <cfloat>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "kernels/gemm/cuda/epilogue.h"
#include "kernels/gemm/cuda/split_k.h"
#include "runtime/cuda/dialect.h"
#include "runtime/cuda/dialect_sm90.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

// Element types of A and B, shared with lib/cuda/gemm.ts (GPU_GEMM_TYPE there).
enum DType : int { kF32 = 0, kF16 = 1, kBf16 = 2 };
// Kernel choice, shared with lib/cuda/gemm.ts.
enum Choice : int { kAuto = 0, kMma = 1, kSimt = 2, kGemv = 3, kWgmma = 4 };

// int8: |sum of K products (u8 - z) x s8| <= K * 255 * 127 must fit in int32 (as on the CPU).
constexpr int64_t kS8MaxK = 66311;

struct Epilogue {
  const float* scale;
  const float* bias;
  const float* residual;
  size_t ldr;
  int act;
  int residual_before;
  float alpha, beta;
};

struct Shape {
  int m, n, k;
  size_t lda, ldb, ldc;
  int vec_a, vec_b, vec_c;  // 16-byte loads/stores allowed (aligned base, leading dimension a multiple)
};

template <int kCode>
using Ty = Stored<kCode>;

__device__ __forceinline__ bool Finite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

__device__ __forceinline__ float Activate(float v, const Epilogue& e) { return ActivateCode(v, e.act, e.alpha, e.beta); }

__device__ __forceinline__ float ApplyEpilogue(float acc, int row, int col, const Epilogue& e) {
  float v = e.scale ? acc * e.scale[col] : acc;
  if (e.bias) v += e.bias[col];
  const float r = e.residual ? e.residual[size_t(row) * e.ldr + col] : 0.0f;
  if (e.residual && e.residual_before) v += r;
  v = Activate(v, e);
  if (e.residual && !e.residual_before) v += r;
  return v;
}

// ApplyEpilogue with the activation a compile-time constant (kAct < 0: read at run time), for
// stores unrolled over many registers: there a run-time switch per element lays every activation's
// code (erf, tanh, exp) between consecutive stores, so the executed path jumps through hundreds of
// KiB of code and misses the instruction cache at each element.
template <int kAct>
__device__ __forceinline__ float ApplyEpilogueAs(float acc, int row, int col, const Epilogue& e) {
  float v = e.scale ? acc * e.scale[col] : acc;
  if (e.bias) v += e.bias[col];
  const float r = e.residual ? e.residual[size_t(row) * e.ldr + col] : 0.0f;
  if (e.residual && e.residual_before) v += r;
  if constexpr (kAct < 0) v = Activate(v, e);
  else if constexpr (kAct != kGpuActNone) v = ActivateCode(v, kAct, e.alpha, e.beta);
  if (e.residual && !e.residual_before) v += r;
  return v;
}

// Calls body(std::integral_constant<int, code>): the activation as a constant for none and ReLU
// (a GEMM's usual epilogues; a constant copy of the exp / erf / tanh ones makes ptxas spill the
// accumulators), -1 for the rest, which read it at run time.
template <typename Body>
__device__ __forceinline__ void WithActivation(int act, Body&& body) {
  if (act == kGpuActNone) body(std::integral_constant<int, kGpuActNone>{});
  else if (act == kGpuActRelu) body(std::integral_constant<int, kGpuActRelu>{});
  else body(std::integral_constant<int, -1>{});
}

// Four consecutive elements of a row as floats; `avail` of them exist (<= 0: none, p unused).
template <int T>
__device__ __forceinline__ void Load4(const typename Ty<T>::T* p, int avail, bool vec, float (&v)[4]) {
  if (vec && avail >= 4) {
    if constexpr (T == kF32) {
      const float4 q = LoadVec<float4>(p);
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
      const uint2 q = LoadVec<uint2>(p);
      v[0] = Ty<T>::Get(static_cast<uint16_t>(q.x)), v[1] = Ty<T>::Get(static_cast<uint16_t>(q.x >> 16));
      v[2] = Ty<T>::Get(static_cast<uint16_t>(q.y)), v[3] = Ty<T>::Get(static_cast<uint16_t>(q.y >> 16));
    }
  } else {
SONDE_UNROLL
    for (int i = 0; i < 4; ++i) v[i] = i < avail ? Ty<T>::Get(p[i]) : 0.0f;
  }
}

// Eight consecutive 16-bit values as raw bits in a uint4 (low half first), zero past `avail`.
__device__ __forceinline__ uint4 Load8Raw(const uint16_t* p, int avail, bool vec) {
  if (vec && avail >= 8) return LoadVec<uint4>(p);
  uint32_t w[4];
SONDE_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = 2 * i < avail ? p[2 * i] : 0u, hi = 2 * i + 1 < avail ? p[2 * i + 1] : 0u;
    w[i] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ int Avail(int row, int rows, int col, int cols, int width) {
  if (row >= rows || col >= cols) return 0;
  return cols - col < width ? cols - col : width;
}

// ---------------------------------------------------------------- SIMT (fp32 FMA) ----
constexpr int kSimtBK = 8, kSimtThreads = 256;

// kB x kB block tiles (128, or 64 where 128 leaves the device idle), 16 x 16 threads, each owning
// kB / 16 rows {ty*4.., 64+ty*4..} and columns {tx*4.., 64+tx*4..} (one group of 4 at kB = 64): the
// two halves keep each warp's float4 reads of a shared row on distinct banks.
// K split (split_k.h): block z runs K tiles [z * tiles_per_split, +tiles_per_split) and, with more
// than one split, adds its raw sums into c with atomics (GemmSplitEpilogueKernel applies ep after).
template <int TA, int TB, int kB>
__global__ void __launch_bounds__(kSimtThreads) SimtGemmKernel(const void* a_, const void* b_, float* __restrict__ c,
                                                              Shape sh, Epilogue ep, int splits, int tiles_per_split) {
  using SA = typename Ty<TA>::T;
  using SB = typename Ty<TB>::T;
  constexpr int kH = kB / 64, kT = 4 * kH;  // halves, outputs per thread along each axis
  const SA* a = static_cast<const SA*>(a_);
  const SB* b = static_cast<const SB*>(b_);
  // A transposed (k-major) so a thread's four rows are one float4; +4 keeps that alignment.
  __align__(16) __shared__ float As[2][kSimtBK][kB + 4];
  __align__(16) __shared__ float Bs[2][kSimtBK][kB];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int bm = blockIdx.y * kB, bn = blockIdx.x * kB;
  // Loaders: A tile kB rows x 8 k, B tile 8 k x kB columns, 4 elements a thread (the first 2 kB threads).
  const bool loads = tid < 2 * kB;
  const int a_row = tid / 2, a_k = (tid % 2) * 4;
  const int b_k = tid / (kB / 4), b_col = (tid % (kB / 4)) * 4;
  float ra[4], rb[4];
  auto load = [&](int k0) {
    if (!loads) return;
    const int arow = bm + a_row, acol = k0 + a_k;
    const int aav = Avail(arow, sh.m, acol, sh.k, 4);
    Load4<TA>(aav > 0 ? a + size_t(arow) * sh.lda + acol : a, aav, sh.vec_a, ra);
    const int brow = k0 + b_k, bcol = bn + b_col;
    const int bav = Avail(brow, sh.k, bcol, sh.n, 4);
    Load4<TB>(bav > 0 ? b + size_t(brow) * sh.ldb + bcol : b, bav, sh.vec_b, rb);
  };
  auto store = [&](int buf) {
    if (!loads) return;
SONDE_UNROLL
    for (int i = 0; i < 4; ++i) As[buf][a_k + i][a_row] = ra[i];
    *reinterpret_cast<float4*>(&Bs[buf][b_k][b_col]) = make_float4(rb[0], rb[1], rb[2], rb[3]);
  };
  float acc[kT][kT] = {};
  const int all = (sh.k + kSimtBK - 1) / kSimtBK, t0 = blockIdx.z * tiles_per_split;
  const int tiles = (all < t0 + tiles_per_split ? all : t0 + tiles_per_split) - t0, k0 = t0 * kSimtBK;
  if (tiles > 0) {
    load(k0);
    store(0);
    __syncthreads();
  }
  for (int t = 0; t < tiles; ++t) {
    const int cur = t & 1;
    if (t + 1 < tiles) load(k0 + (t + 1) * kSimtBK);
SONDE_UNROLL
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float av[kT], bv[kT];
SONDE_UNROLL
      for (int h = 0; h < kH; ++h) {
        const float4 a4 = *reinterpret_cast<const float4*>(&As[cur][kk][64 * h + ty * 4]);
        const float4 b4 = *reinterpret_cast<const float4*>(&Bs[cur][kk][64 * h + tx * 4]);
        av[4 * h] = a4.x, av[4 * h + 1] = a4.y, av[4 * h + 2] = a4.z, av[4 * h + 3] = a4.w;
        bv[4 * h] = b4.x, bv[4 * h + 1] = b4.y, bv[4 * h + 2] = b4.z, bv[4 * h + 3] = b4.w;
      }
SONDE_UNROLL
      for (int i = 0; i < kT; ++i)
SONDE_UNROLL
        for (int j = 0; j < kT; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    if (t + 1 < tiles) store(cur ^ 1);
    __syncthreads();
  }
SONDE_UNROLL
  for (int i = 0; i < kT; ++i) {
    const int row = bm + 64 * (i / 4) + ty * 4 + i % 4;
    if (row >= sh.m) continue;
SONDE_UNROLL
    for (int h = 0; h < kH; ++h) {
      const int col = bn + h * 64 + tx * 4;
      float* out = c + size_t(row) * sh.ldc + col;
      if (splits > 1) {
        for (int j = 0; j < 4 && col + j < sh.n; ++j) atomicAdd(out + j, acc[i][h * 4 + j]);
        continue;
      }
      float v[4];
SONDE_UNROLL
      for (int j = 0; j < 4; ++j) v[j] = col + j < sh.n ? ApplyEpilogue(acc[i][h * 4 + j], row, col + j, ep) : 0.0f;
      if (sh.vec_c && col + 3 < sh.n) {
        *reinterpret_cast<float4*>(out) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
        for (int j = 0; j < 4 && col + j < sh.n; ++j) out[j] = v[j];
      }
    }
  }
}

// Before a split-K GEMM: c's m x n starts as the residual (added before the activation, apart from
// c) or as zeros; columns past n within ldc are left alone.
__global__ void GemmSplitStartKernel(float* __restrict__ c, Shape sh, const float* __restrict__ residual, size_t ldr) {
  const size_t count = size_t(sh.m) * sh.n;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const size_t row = i / sh.n, col = i - row * sh.n;
    c[row * sh.ldc + col] = residual ? residual[row * ldr + col] : 0.0f;
  }
}

// After a split-K GEMM: c holds the raw sums; the epilogue in place.
__global__ void GemmSplitEpilogueKernel(float* __restrict__ c, Shape sh, Epilogue ep) {
  const size_t count = size_t(sh.m) * sh.n;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const size_t row = i / sh.n, col = i - row * sh.n;
    float* p = c + row * sh.ldc + col;
    *p = ApplyEpilogue(*p, static_cast<int>(row), static_cast<int>(col), ep);
  }
}

// ------------------------------------------------------- tensor cores (mma.sync) ----
constexpr int kMmaBM = 128, kMmaBN = 128, kMmaThreads = 256;
// Shared rows in 32-bit words. A: 32 16-bit k (or 64 int8 k) + 4 words of padding: the 8 rows an
// ldmatrix phase reads (16 bytes each) start 80 bytes apart, on 8 distinct groups of 4 banks.
// 16-bit B: 128 columns + 4 words, rows 272 bytes apart, likewise. int8 B: 128 quads (a word each)
// + 8, which puts the rows t of a fragment load 8 banks apart.
constexpr int kAStride = 20;
constexpr int kB16Stride = kMmaBN / 2 + 4;
constexpr int kBS8Stride = kMmaBN + 8;
constexpr int kMmaBK16 = 32;  // 16-bit elements per K tile: two m16n8k16 steps
constexpr int kMmaBK8 = 64;   // int8 elements per K tile: two m16n8k32 steps

__device__ __forceinline__ uint32_t Pack2(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

template <int TB>
__device__ __forceinline__ void Mma16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (TB == kBf16) MmaBf16(d, a, b);
  else MmaF16(d, a, b);
}

// Stores the warp's 64x32 accumulator tile (4 x 4 m16n8 fragments) through the epilogue, one
// unrolled copy per activation class (see ApplyEpilogueAs).
template <typename Value>
__device__ __forceinline__ void StoreMmaTile(float* c, const Shape& sh, const Epilogue& ep, int row_base, int col_base,
                                             Value value) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  WithActivation(ep.act, [&](auto act) {
    constexpr int kAct = decltype(act)::value;
SONDE_UNROLL
    for (int mi = 0; mi < 4; ++mi)
SONDE_UNROLL
      for (int ni = 0; ni < 4; ++ni)
SONDE_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int row = row_base + mi * 16 + g + h * 8, col = col_base + ni * 8 + 2 * t;
          if (row >= sh.m || col >= sh.n) continue;
          float* out = c + size_t(row) * sh.ldc + col;
          const float v0 = ApplyEpilogueAs<kAct>(value(mi, ni, 2 * h, row, col), row, col, ep);
          if (col + 1 < sh.n) {
            const float v1 = ApplyEpilogueAs<kAct>(value(mi, ni, 2 * h + 1, row, col + 1), row, col + 1, ep);
            if (sh.vec_c) {
              *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
            } else {
              out[0] = v0;
              out[1] = v1;
            }
          } else {
            out[0] = v0;
          }
        }
  });
}

// The warp's four m16 A fragments of K step ks (32 bytes: k16 of 16-bit values or k32 of int8)
// from a shared A tile of kAStride-word rows: ldmatrix matrices rows 0-7 / 8-15 x bytes 0-15 / 16-31.
__device__ __forceinline__ void LoadAFragments(const uint32_t* as, int row0, int ks, uint32_t (&af)[4][4]) {
  const int lane = threadIdx.x % 32;
SONDE_UNROLL
  for (int mi = 0; mi < 4; ++mi) {
    const int row = row0 + mi * 16 + lane % 8 + ((lane / 8) % 2) * 8;
    LdMatrixX4(af[mi], &as[row * kAStride + ks * 8 + (lane / 16) * 4]);
  }
}

template <int TA, int TB>
__global__ void __launch_bounds__(kMmaThreads, 2) MmaGemmKernel(const void* a_, const uint16_t* __restrict__ b,
                                                            float* __restrict__ c, Shape sh, Epilogue ep) {
  using SA = typename Ty<TA>::T;
  const SA* a = static_cast<const SA*>(a_);
  __align__(16) __shared__ uint32_t As[2][kMmaBM * kAStride];
  __align__(16) __shared__ uint32_t Bs[2][kMmaBK16 * kB16Stride];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;  // the warp's 64x32 tile in the block's 128x128
  const int bm = blockIdx.y * kMmaBM, bn = blockIdx.x * kMmaBN;
  // Staging registers: fp32 A as 4 chunks of 4 floats (rounded when stored), 16-bit A as 2 chunks
  // of 8; B as 2 chunks of 8 (row idx/16, columns (idx%16)*8).
  constexpr int kAChunks = TA == kF32 ? 4 : 2;
  float ra32[TA == kF32 ? 4 : 1][4];
  uint4 ra16[TA == kF32 ? 1 : 2];
  uint4 rb[2];
  auto load = [&](int k0) {
SONDE_UNROLL
    for (int ch = 0; ch < kAChunks; ++ch) {
      const int idx = tid + ch * kMmaThreads;
      if constexpr (TA == kF32) {
        const int row = bm + idx / 8, col = k0 + (idx % 8) * 4;
        const int av = Avail(row, sh.m, col, sh.k, 4);
        Load4<kF32>(av > 0 ? a + size_t(row) * sh.lda + col : a, av, sh.vec_a, ra32[ch]);
      } else {
        const int row = bm + idx / 4, col = k0 + (idx % 4) * 8;
        const int av = Avail(row, sh.m, col, sh.k, 8);
        ra16[ch] = Load8Raw(av > 0 ? a + size_t(row) * sh.lda + col : a, av, sh.vec_a);
      }
    }
SONDE_UNROLL
    for (int ch = 0; ch < 2; ++ch) {
      const int idx = tid + ch * kMmaThreads;
      const int row = k0 + idx / 16, col = bn + (idx % 16) * 8;
      const int av = Avail(row, sh.k, col, sh.n, 8);
      rb[ch] = Load8Raw(av > 0 ? b + size_t(row) * sh.ldb + col : b, av, sh.vec_b);
    }
  };
  auto store = [&](int buf) {
SONDE_UNROLL
    for (int ch = 0; ch < kAChunks; ++ch) {
      const int idx = tid + ch * kMmaThreads;
      if constexpr (TA == kF32) {
        const float* v = ra32[ch];
        *reinterpret_cast<uint2*>(&As[buf][(idx / 8) * kAStride + (idx % 8) * 2]) =
            make_uint2(Pack2(Ty<TB>::Put(v[0]), Ty<TB>::Put(v[1])), Pack2(Ty<TB>::Put(v[2]), Ty<TB>::Put(v[3])));
      } else {
        *reinterpret_cast<uint4*>(&As[buf][(idx / 4) * kAStride + (idx % 4) * 4]) = ra16[ch];
      }
    }
SONDE_UNROLL
    for (int ch = 0; ch < 2; ++ch) {
      const int idx = tid + ch * kMmaThreads;
      *reinterpret_cast<uint4*>(&Bs[buf][(idx / 16) * kB16Stride + (idx % 16) * 4]) = rb[ch];
    }
  };
  float acc[4][4][4] = {};
  const int tiles = (sh.k + kMmaBK16 - 1) / kMmaBK16;
  if (tiles > 0) {
    load(0);
    store(0);
    __syncthreads();
  }
  for (int tile = 0; tile < tiles; ++tile) {
    const int cur = tile & 1;
    if (tile + 1 < tiles) load((tile + 1) * kMmaBK16);
SONDE_UNROLL
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[4][4], bf[4][2];
      LoadAFragments(As[cur], wm * 64, ks, af);
SONDE_UNROLL
      for (int p = 0; p < 2; ++p) {
        // B is k-major in shared memory: the transposing load pairs rows 2t, 2t+1 of column g, for
        // two n8 tiles (matrices: k 0-7 / 8-15 of columns n0.., then of n0 + 8..).
        const int k = ks * 16 + lane % 8 + ((lane / 8) % 2) * 8, n = wn * 32 + p * 16 + (lane / 16) * 8;
        uint32_t r[4];
        LdMatrixX4Trans(r, &Bs[cur][k * kB16Stride + n / 2]);
        bf[2 * p][0] = r[0], bf[2 * p][1] = r[1], bf[2 * p + 1][0] = r[2], bf[2 * p + 1][1] = r[3];
      }
SONDE_UNROLL
      for (int mi = 0; mi < 4; ++mi)
SONDE_UNROLL
        for (int ni = 0; ni < 4; ++ni) Mma16<TB>(acc[mi][ni], af[mi], bf[ni]);
    }
    if (tile + 1 < tiles) store(cur ^ 1);
    __syncthreads();
  }
  StoreMmaTile(c, sh, ep, bm + wm * 64, bn + wn * 32,
               [&](int mi, int ni, int i, int, int) { return acc[mi][ni][i]; });
}

// The same block and warp tiles for 16-bit A and B with 16-byte aligned rows, fed by cp.async into
// kMmaStages shared stages instead of through registers: up to kMmaStages - 1 K tiles are in flight
// while the tensor cores work, and no staging registers compete with the accumulators. Edge chunks
// copy only the bytes inside the matrix and zero-fill the rest.
constexpr int kMmaStages = 4;
constexpr int kMmaAStageWords = kMmaBM * kAStride, kMmaBStageWords = kMmaBK16 * kB16Stride;
constexpr size_t kMmaPipeSharedBytes = size_t(kMmaStages) * (kMmaAStageWords + kMmaBStageWords) * 4;  // 74 KiB

template <int TB>
__global__ void __launch_bounds__(kMmaThreads, 2) MmaPipeGemmKernel(const uint16_t* __restrict__ a,
                                                                const uint16_t* __restrict__ b, float* __restrict__ c,
                                                                Shape sh, Epilogue ep) {
  SONDE_DYNAMIC_SHARED(uint32_t, smem);
  uint32_t* As = smem;                                   // [stage][kMmaAStageWords]
  uint32_t* Bs = smem + kMmaStages * kMmaAStageWords;    // [stage][kMmaBStageWords]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int bm = blockIdx.y * kMmaBM, bn = blockIdx.x * kMmaBN;
  const int tiles = (sh.k + kMmaBK16 - 1) / kMmaBK16;
  // Tile t into stage t % kMmaStages: A 128 rows x 4 chunks of 8, B 32 rows x 16 chunks, 2 + 2 per thread.
  auto issue = [&](int t) {
    const int st = t % kMmaStages, k0 = t * kMmaBK16;
SONDE_UNROLL
    for (int ch = 0; ch < 2; ++ch) {
      const int idx = tid + ch * kMmaThreads;
      const int arow = idx / 4, acol = (idx % 4) * 8;
      const int aav = Avail(bm + arow, sh.m, k0 + acol, sh.k, 8);
      CpAsync16(&As[st * kMmaAStageWords + arow * kAStride + (idx % 4) * 4],
                aav > 0 ? a + size_t(bm + arow) * sh.lda + k0 + acol : a, 2 * (aav > 0 ? aav : 0));
      const int brow = idx / 16, bcol = (idx % 16) * 8;
      const int bav = Avail(k0 + brow, sh.k, bn + bcol, sh.n, 8);
      CpAsync16(&Bs[st * kMmaBStageWords + brow * kB16Stride + (idx % 16) * 4],
                bav > 0 ? b + size_t(k0 + brow) * sh.ldb + bn + bcol : b, 2 * (bav > 0 ? bav : 0));
    }
  };
  // One commit group per tile slot, empty ones included, so that "at most kMmaStages - 2 pending"
  // always means tile t has landed.
SONDE_UNROLL
  for (int t = 0; t < kMmaStages - 1; ++t) {
    if (t < tiles) issue(t);
    CpAsyncCommit();
  }
  float acc[4][4][4] = {};
  for (int tile = 0; tile < tiles; ++tile) {
    CpAsyncWait<kMmaStages - 2>();
    // Publishes tile's stage to every warp, and tells the issuing threads below that every warp is
    // done with tile - 1, whose stage the next issue overwrites.
    __syncthreads();
    if (tile + kMmaStages - 1 < tiles) issue(tile + kMmaStages - 1);
    CpAsyncCommit();
    const uint32_t* as = As + (tile % kMmaStages) * kMmaAStageWords;
    const uint32_t* bs = Bs + (tile % kMmaStages) * kMmaBStageWords;
SONDE_UNROLL
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[4][4], bf[4][2];
      LoadAFragments(as, wm * 64, ks, af);
SONDE_UNROLL
      for (int p = 0; p < 2; ++p) {
        const int k = ks * 16 + lane % 8 + ((lane / 8) % 2) * 8, n = wn * 32 + p * 16 + (lane / 16) * 8;
        uint32_t r[4];
        LdMatrixX4Trans(r, &bs[k * kB16Stride + n / 2]);
        bf[2 * p][0] = r[0], bf[2 * p][1] = r[1], bf[2 * p + 1][0] = r[2], bf[2 * p + 1][1] = r[3];
      }
SONDE_UNROLL
      for (int mi = 0; mi < 4; ++mi)
SONDE_UNROLL
        for (int ni = 0; ni < 4; ++ni) Mma16<TB>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  CpAsyncWait<0>();  // nothing may be left writing shared memory when the block exits
  StoreMmaTile(c, sh, ep, bm + wm * 64, bn + wn * 32,
               [&](int mi, int ni, int i, int, int) { return acc[mi][ni][i]; });
}

// ------------------------------------------------- Hopper tensor cores (wgmma, sm_90a) ----
// 128x256 block tiles, K tiles of 64, kWgStages shared stages. Warpgroup 0 is the producer: one
// thread streams each stage's A box (128 rows x 64 k) and B boxes (64 k x 64 columns, 4 of them)
// through the tensor copy engine, 128B-swizzled, out-of-bounds elements zero-filled (so any M, N,
// K works without predicates); warpgroups 1 and 2 each own 64 rows x 256 columns and run
// m64n256k16 wgmma straight from shared memory (A K-major, B [k][n] = MN-major), 4 per K tile.
// Per stage two mbarriers: `full` completes when the producer's arrival and the copies' bytes are
// in, `empty` when all 8 consumer warps have seen their wgmmas on it retire.
constexpr int kWgBM = 128, kWgBN = 256, kWgBK = 64, kWgStages = 4, kWgThreads = 384;
constexpr int kWgABytes = kWgBM * kWgBK * 2;             // 16 KiB: 128 rows of 128 bytes
constexpr int kWgBBoxBytes = kWgBK * 64 * 2;             // 8 KiB: 64 k rows of 64 columns
constexpr int kWgStageBytes = kWgABytes + 4 * kWgBBoxBytes;  // 48 KiB, a multiple of 1024
// Stages, their barriers, and slack to align the stages to the swizzle pattern's 1024 bytes.
constexpr size_t kWgSharedBytes = size_t(kWgStages) * kWgStageBytes + 2 * kWgStages * sizeof(uint64_t) + 1024;

#if SONDE_GPU_SM90A
// Stores a consumer's 64x256 accumulators (the m64nNk16 fragment) through the epilogue, one
// unrolled copy per activation (see ApplyEpilogueAs).
__device__ __forceinline__ void StoreWgmmaTile(float* c, const Shape& sh, const Epilogue& ep, int row_base, int col_base,
                                               const float (&acc)[128]) {
  const int t = threadIdx.x % 128, lane = t % 32;
  const int row0 = row_base + 16 * (t / 32) + lane / 4, col0 = col_base + 2 * (lane % 4);
  WithActivation(ep.act, [&](auto act) {
    constexpr int kAct = decltype(act)::value;
SONDE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
      if (row >= sh.m) continue;
      float* out_row = c + size_t(row) * sh.ldc;
SONDE_UNROLL
      for (int i = 0; i < 32; ++i) {
        const int col = col0 + 8 * i;
        if (col >= sh.n) continue;
        const float v0 = ApplyEpilogueAs<kAct>(acc[4 * i + 2 * h], row, col, ep);
        if (col + 1 < sh.n) {
          const float v1 = ApplyEpilogueAs<kAct>(acc[4 * i + 2 * h + 1], row, col + 1, ep);
          if (sh.vec_c) {
            *reinterpret_cast<float2*>(out_row + col) = make_float2(v0, v1);
          } else {
            out_row[col] = v0;
            out_row[col + 1] = v1;
          }
        } else {
          out_row[col] = v0;
        }
      }
    }
  });
}
#endif

template <int TB>
__global__ void __launch_bounds__(kWgThreads, 1) WgmmaGemmKernel(const __grid_constant__ TmaMap2d a_map,
                                                                 const __grid_constant__ TmaMap2d b_map,
                                                                 float* __restrict__ c, Shape sh, Epilogue ep) {
#if SONDE_GPU_SM90A
  SONDE_DYNAMIC_SHARED(unsigned char, raw);
  unsigned char* smem = AlignShared1024(raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kWgStages * kWgStageBytes);
  uint64_t* empty = full + kWgStages;
  const int tid = threadIdx.x, wg = tid / 128;
  // Persistent: block b runs tiles b, b + gridDim.x, ... (the grid is one block per SM), so the
  // producer streams the next tile's first stages while the consumers store the last one.
  // Tiles go in groups of kGroupRows row tiles, column-major inside a group: the blocks at work
  // at once then share a few row tiles of A and a band of B columns in L2 instead of sweeping all
  // of B for every row tile (which, for B past L2's size, reads B from memory once per row tile).
  constexpr int kGroupRows = 8;
  const int tiles_m = (sh.m + kWgBM - 1) / kWgBM, tiles_n = (sh.n + kWgBN - 1) / kWgBN;
  const int total = tiles_m * tiles_n, per_group = kGroupRows * tiles_n;
  const auto origin = [&](int tile, int& bm, int& bn) {
    const int group = tile / per_group, first_m = group * kGroupRows;
    const int rows_in_group = min(kGroupRows, tiles_m - first_m), in_group = tile - group * per_group;
    bm = (first_m + in_group % rows_in_group) * kWgBM;
    bn = (in_group / rows_in_group) * kWgBN;
  };
  const int k_tiles = (sh.k + kWgBK - 1) / kWgBK;
  if (tid == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], 2 * 4);  // one release per consumer warp
    }
    MbarInitFence();
  }
  __syncthreads();
  // Stage use number `it` (counted over all of this block's tiles) goes to stage it % kWgStages in
  // round it / kWgStages; round r of a stage completes the barriers' phase r, of parity r & 1.
  if (wg == 0) {
    // The producer needs few registers; giving them up lets the consumers hold 128 accumulators
    // each without spilling.
    SetMaxNRegDec<40>();
    if (tid == 0) {
      int it = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < total; tile += static_cast<int>(gridDim.x)) {
        int bm, bn;
        origin(tile, bm, bn);
        // B boxes wholly past column n are not copied: their stale columns only reach accumulator
        // columns that are never stored. (Row and K boxes always start inside the matrix.)
        const int b_boxes = min(4, (sh.n - bn + 63) / 64);
        for (int t = 0; t < k_tiles; ++t, ++it) {
          const int s = it % kWgStages;
          // Waits for the consumers' release of the stage's previous round; round 0 waits for
          // parity 1, which a fresh barrier reports complete.
          MbarWait(&empty[s], ((it / kWgStages) & 1) ^ 1);
          MbarArriveExpectTx(&full[s], kWgABytes + b_boxes * kWgBBoxBytes);
          unsigned char* stage = smem + s * kWgStageBytes;
          TmaLoad2d(stage, &a_map, t * kWgBK, bm, &full[s]);
SONDE_UNROLL
          for (int j = 0; j < 4; ++j) {
            if (j < b_boxes) TmaLoad2d(stage + kWgABytes + j * kWgBBoxBytes, &b_map, bn + 64 * j, t * kWgBK, &full[s]);
          }
        }
      }
    }
  } else {
    SetMaxNRegInc<232>();
    const int cw = wg - 1, lane = tid % 32;  // rows 64 cw .. 64 cw + 63 of each block tile
    int it = 0;
    for (int tile = static_cast<int>(blockIdx.x); tile < total; tile += static_cast<int>(gridDim.x)) {
      int bm, bn;
      origin(tile, bm, bn);
      float acc[128];
SONDE_UNROLL
      for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
      for (int t = 0; t < k_tiles; ++t, ++it) {
        const int s = it % kWgStages;
        MbarWait(&full[s], (it / kWgStages) & 1);
        const unsigned char* a_tile = smem + s * kWgStageBytes + cw * 64 * 128;
        const unsigned char* b_tile = smem + s * kWgStageBytes + kWgABytes;
        WgmmaFenceOperands(acc);
        WgmmaFence();
SONDE_UNROLL
        for (int ks = 0; ks < kWgBK / 16; ++ks) {
          // A: k16 is 32 bytes into each 128-byte swizzled row (the swizzle applies to the address,
          // so stepping the start within the pattern is exact); 8-row groups 1024 bytes apart.
          // B: k16 is two 8-row groups (2048 bytes) down; 64-column boxes 8 KiB apart (LBO).
          const uint64_t da = WgmmaDescriptor(a_tile + ks * 32, 16, 1024, Swizzle::k128B);
          const uint64_t db = WgmmaDescriptor(b_tile + ks * 2048, kWgBBoxBytes, 1024, Swizzle::k128B);
          if constexpr (TB == kBf16) WgmmaBf16<256, true>(acc, da, db);
          else WgmmaF16<256, true>(acc, da, db);
        }
        WgmmaCommit();
        // One group stays in flight: once use it - 1's wgmmas have retired its stage may be refilled.
        WgmmaWait<1>();
        WgmmaFenceOperands(acc);
        // After its warp's wait (.sync.aligned: every lane has retired its share), lane 0 releases.
        if (t > 0 && lane == 0) MbarArrive(&empty[(it - 1) % kWgStages]);
      }
      WgmmaWait<0>();
      WgmmaFenceOperands(acc);
      if (k_tiles > 0 && lane == 0) MbarArrive(&empty[(it - 1) % kWgStages]);  // the tile's last stage
      StoreWgmmaTile(c, sh, ep, bm + cw * 64, bn, acc);
    }
  }
#else
  __trap();  // this image was built without sm_90a; the op never launches it there
#endif
}

// Per-row quantisation of A for the int8 kernels, in the scratch buffer: kq bytes per row (K
// rounded up to 16, zero-padded), then m float scales, then m int32 zero points.
struct QuantA {
  const int8_t* q;  // u8 - 128, so that s8 x s8 tensor-core products apply
  const float* scale;
  const int32_t* zero;
  int kq;
};

// s8 weights: K quads x n int32 (b[4q..4q+3][j] as s8, the m16n8k32 B register), per-column
// scale and sum of the quantised weights.
struct QuantB {
  const int32_t* q;
  const float* scale;
  const int32_t* sum;
};

// sum((u - z) w) = sum((u - 128) w) + (128 - z) sum(w), exactly in int32; then as the CPU's qs8
// kernels: (float)s * (a_scale * w_scale).
__device__ __forceinline__ float Dequant(int32_t acc, int row, int col, const QuantA& qa, const QuantB& qb) {
  const int32_t s = acc + (128 - qa.zero[row]) * qb.sum[col];
  return static_cast<float>(s) * (qa.scale[row] * qb.scale[col]);
}

__global__ void __launch_bounds__(kMmaThreads) MmaS8GemmKernel(QuantA qa, QuantB qb, float* __restrict__ c, Shape sh,
                                                              Epilogue ep) {
  __align__(16) __shared__ uint32_t As[2][kMmaBM * kAStride];
  __align__(16) __shared__ uint32_t Bs[2][(kMmaBK8 / 4) * kBS8Stride];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wm = warp / 4, wn = warp % 4;
  const int bm = blockIdx.y * kMmaBM, bn = blockIdx.x * kMmaBN;
  const int quads = qa.kq / 4;
  uint4 ra[2], rb[2];
  auto load = [&](int k0) {  // k0 in bytes (int8 elements)
SONDE_UNROLL
    for (int ch = 0; ch < 2; ++ch) {
      const int idx = tid + ch * kMmaThreads;
      const int row = bm + idx / 4, col = k0 + (idx % 4) * 16;  // kq is a multiple of 16
      ra[ch] = row < sh.m && col < qa.kq ? LoadVec<uint4>(qa.q + size_t(row) * qa.kq + col) : make_uint4(0, 0, 0, 0);
      const int qrow = k0 / 4 + idx / 32, qcol = bn + (idx % 32) * 4;
      const int av = Avail(qrow, quads, qcol, sh.n, 4);
      const int32_t* p = qb.q + size_t(qrow) * sh.n + qcol;
      if (sh.vec_b && av == 4) {
        rb[ch] = LoadVec<uint4>(p);
      } else {
        uint32_t w[4];
        for (int i = 0; i < 4; ++i) w[i] = i < av ? static_cast<uint32_t>(p[i]) : 0u;
        rb[ch] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  };
  auto store = [&](int buf) {
SONDE_UNROLL
    for (int ch = 0; ch < 2; ++ch) {
      const int idx = tid + ch * kMmaThreads;
      *reinterpret_cast<uint4*>(&As[buf][(idx / 4) * kAStride + (idx % 4) * 4]) = ra[ch];
      *reinterpret_cast<uint4*>(&Bs[buf][(idx / 32) * kBS8Stride + (idx % 32) * 4]) = rb[ch];
    }
  };
  int32_t acc[4][4][4] = {};
  const int tiles = (qa.kq + kMmaBK8 - 1) / kMmaBK8;
  if (tiles > 0) {
    load(0);
    store(0);
    __syncthreads();
  }
  for (int tile = 0; tile < tiles; ++tile) {
    const int cur = tile & 1;
    if (tile + 1 < tiles) load((tile + 1) * kMmaBK8);
    const uint32_t* bs = Bs[cur];
SONDE_UNROLL
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[4][4], bf[4][2];
      LoadAFragments(As[cur], wm * 64, ks, af);
SONDE_UNROLL
      for (int ni = 0; ni < 4; ++ni) {
        const int col = wn * 32 + ni * 8 + g;
        bf[ni][0] = bs[(ks * 8 + t) * kBS8Stride + col];
        bf[ni][1] = bs[(ks * 8 + 4 + t) * kBS8Stride + col];
      }
SONDE_UNROLL
      for (int mi = 0; mi < 4; ++mi)
SONDE_UNROLL
        for (int ni = 0; ni < 4; ++ni) MmaS8(acc[mi][ni], af[mi], bf[ni]);
    }
    if (tile + 1 < tiles) store(cur ^ 1);
    __syncthreads();
  }
  StoreMmaTile(c, sh, ep, bm + wm * 64, bn + wn * 32,
               [&](int mi, int ni, int i, int row, int col) { return Dequant(acc[mi][ni][i], row, col, qa, qb); });
}

// ------------------------------------------------------------------------- GEMV ----
// Row groups of 4 lanes; the 4 lanes read one 64-byte run of a B row (two full sectors), the
// groups split K, and each group keeps a batch of kGemvUnroll 16-byte loads in flight while it
// multiplies the previous batch (two register batches, so the loads never drain between batches).
// R rows of A per block: 8, or 1 for decode. Decode is weight streaming: a block per column run
// and, with few runs (n = 4096 bf16 is 128 of them, fewer than an H200's 132 SMs), up to 1024
// threads per run, so that every SM has 64-128 KiB of weights requested at once, what covering
// DRAM latency at full bandwidth takes; 256 threads per run there leave most SMs a quarter of it.
constexpr int kGemvThreads = 256, kGemvLanes = 4, kGemvRows = 8;
// 16-byte loads per batch (two batches in registers); decode kernels are held to 64 registers so
// that 1024 threads fit an SM (4 blocks of 256, 2 of 512, 1 of 1024), which two batches of 8
// would spill.
constexpr int kGemvUnroll = 4;
template <int R, int kThreads>
constexpr int kGemvMinBlocks = R == 1 ? 1024 / kThreads : 1;

// Sums acc over the block's row groups (warp shuffles, then the warps through shared memory)
// and hands each (row, column-in-block) total to out.
template <int kThreads, typename Acc, int VW, int R, typename Out>
__device__ __forceinline__ void GemvReduce(Acc (&acc)[R][VW], int rows, Acc* red, Out out) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kCols = kGemvLanes * VW;
SONDE_UNROLL
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
SONDE_UNROLL
    for (int v = 0; v < VW; ++v) {
      Acc s = acc[r][v];
      for (int o = kGemvLanes; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane < kGemvLanes) red[(warp * R + r) * kCols + lane * VW + v] = s;
    }
  }
  __syncthreads();
  for (int o = tid; o < rows * kCols; o += kThreads) {
    const int r = o / kCols, cc = o % kCols;
    Acc s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += red[(w * R + r) * kCols + cc];
    out(r, cc, s);
  }
}

template <int TA, int TB, int R, int kThreads>
__global__ void __launch_bounds__(kThreads, kGemvMinBlocks<R, kThreads>) GemvKernel(const void* a_, const void* b_, float* __restrict__ c,
                                                      Shape sh, Epilogue ep) {
  using SA = typename Ty<TA>::T;
  using SB = typename Ty<TB>::T;
  constexpr int VW = 16 / sizeof(SB);  // columns per lane: one 16-byte load
  constexpr int kGroups = kThreads / kGemvLanes;
  const SA* a = static_cast<const SA*>(a_);
  const SB* b = static_cast<const SB*>(b_);
  __shared__ float red[(kThreads / 32) * R * kGemvLanes * VW];
  const int tid = threadIdx.x, sub = tid % kGemvLanes, group = tid / kGemvLanes;
  const int col0 = blockIdx.x * (kGemvLanes * VW) + sub * VW;
  constexpr int kUnroll = kGemvUnroll, kStep = kGroups * kUnroll;
  const int row0 = blockIdx.y * R, rows = sh.m - row0 < R ? sh.m - row0 : R;
  const int bav = col0 < sh.n ? (sh.n - col0 < VW ? sh.n - col0 : VW) : 0;
  float acc[R][VW] = {};
  // Raw 16-byte vectors: held as loaded (4 registers each) until used, so that a batch fits in
  // flight beside the sums; widened to fp32 only in the FMA loop.
  const auto load = [&](uint4 (&raw)[kUnroll], int k0) {
SONDE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int kk = k0 + u * kGroups + group;
      const int av = kk < sh.k ? bav : 0;
      const SB* p = b + size_t(kk < sh.k ? kk : 0) * sh.ldb + (bav > 0 ? col0 : 0);
      if constexpr (TB == kF32) {
        float v[4];
        Load4<kF32>(p, av, sh.vec_b, v);
        raw[u] = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
      } else {
        raw[u] = Load8Raw(p, av, sh.vec_b);
      }
    }
  };
  const auto multiply = [&](const uint4 (&raw)[kUnroll], int k0) {
SONDE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int kk = k0 + u * kGroups + group;
      if (kk >= sh.k) break;
      float bv[VW];
      const uint32_t w[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
SONDE_UNROLL
      for (int i = 0; i < 4; ++i) {
        if constexpr (TB == kF32) {
          bv[i] = __uint_as_float(w[i]);
        } else {
          bv[2 * i] = Ty<TB>::Get(static_cast<uint16_t>(w[i]));
          bv[2 * i + 1] = Ty<TB>::Get(static_cast<uint16_t>(w[i] >> 16));
        }
      }
SONDE_UNROLL
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        const float x = Ty<TA>::Get(a[size_t(row0 + r) * sh.lda + kk]);
SONDE_UNROLL
        for (int v = 0; v < VW; ++v) acc[r][v] = fmaf(x, bv[v], acc[r][v]);
      }
    }
  };
  uint4 even[kUnroll] = {}, odd[kUnroll] = {};
  if (sh.k > 0) load(even, 0);
  for (int k0 = 0; k0 < sh.k; k0 += 2 * kStep) {
    if (k0 + kStep < sh.k) load(odd, k0 + kStep);
    multiply(even, k0);
    if (k0 + kStep >= sh.k) break;
    if (k0 + 2 * kStep < sh.k) load(even, k0 + 2 * kStep);
    multiply(odd, k0 + kStep);
  }
  GemvReduce<kThreads, float, VW, R>(acc, rows, red, [&](int r, int cc, float s) {
    const int col = blockIdx.x * (kGemvLanes * VW) + cc, row = row0 + r;
    if (col < sh.n) c[size_t(row) * sh.ldc + col] = ApplyEpilogue(s, row, col, ep);
  });
}

// The int8 product as a GEMV (and the SIMT int8 path below cc 8.0): dp4a over one K quad of 4
// columns per 16-byte load, batches in flight as GemvKernel's.
template <int R, int kThreads>
__global__ void __launch_bounds__(kThreads, kGemvMinBlocks<R, kThreads>) GemvS8Kernel(QuantA qa, QuantB qb, float* __restrict__ c, Shape sh,
                                                        Epilogue ep) {
  constexpr int VW = 4;
  constexpr int kGroups = kThreads / kGemvLanes;
  __shared__ int32_t red[(kThreads / 32) * R * kGemvLanes * VW];
  const int tid = threadIdx.x, sub = tid % kGemvLanes, group = tid / kGemvLanes;
  const int col0 = blockIdx.x * (kGemvLanes * VW) + sub * VW;
  constexpr int kUnroll = kGemvUnroll, kStep = kGroups * kUnroll;
  const int row0 = blockIdx.y * R, rows = sh.m - row0 < R ? sh.m - row0 : R;
  const int bav = col0 < sh.n ? (sh.n - col0 < VW ? sh.n - col0 : VW) : 0;
  const int quads = qa.kq / 4;
  int32_t acc[R][VW] = {};
  const auto load = [&](int4 (&bv)[kUnroll], int q0) {
SONDE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int qq = q0 + u * kGroups + group;
      const int av = qq < quads ? bav : 0;
      const int32_t* p = qb.q + size_t(qq < quads ? qq : 0) * sh.n + (bav > 0 ? col0 : 0);
      if (sh.vec_b && av == VW) {
        bv[u] = LoadVec<int4>(p);
      } else {
        bv[u] = make_int4(av > 0 ? p[0] : 0, av > 1 ? p[1] : 0, av > 2 ? p[2] : 0, av > 3 ? p[3] : 0);
      }
    }
  };
  const auto multiply = [&](const int4 (&bv)[kUnroll], int q0) {
SONDE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int qq = q0 + u * kGroups + group;
      if (qq >= quads) break;
      const int32_t w[VW] = {bv[u].x, bv[u].y, bv[u].z, bv[u].w};
SONDE_UNROLL
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        const int32_t x = LoadVec<int32_t>(qa.q + size_t(row0 + r) * qa.kq + size_t(qq) * 4);
SONDE_UNROLL
        for (int v = 0; v < VW; ++v) acc[r][v] = __dp4a(x, w[v], acc[r][v]);
      }
    }
  };
  int4 even[kUnroll] = {}, odd[kUnroll] = {};
  if (quads > 0) load(even, 0);
  for (int q0 = 0; q0 < quads; q0 += 2 * kStep) {
    if (q0 + kStep < quads) load(odd, q0 + kStep);
    multiply(even, q0);
    if (q0 + kStep >= quads) break;
    if (q0 + 2 * kStep < quads) load(even, q0 + 2 * kStep);
    multiply(odd, q0 + kStep);
  }
  GemvReduce<kThreads, int32_t, VW, R>(acc, rows, red, [&](int r, int cc, int32_t s) {
    const int col = blockIdx.x * (kGemvLanes * VW) + cc, row = row0 + r;
    if (col < sh.n) c[size_t(row) * sh.ldc + col] = ApplyEpilogue(Dequant(s, row, col, qa, qb), row, col, ep);
  });
}

// ------------------------------------------------------------ int8 quantisation ----
// One block per row of A: its range, then ops/gemm_lowp.cc's QuantizeRow (LowpU8Params) step for
// step, so the bytes equal the CPU's; stored as u - 128.
__global__ void __launch_bounds__(256) QuantizeRowsKernel(const float* __restrict__ a, size_t lda, int k, int kq,
                                                         int8_t* __restrict__ q, float* __restrict__ scale,
                                                         int32_t* __restrict__ zero) {
  __shared__ float s_lo[32], s_hi[32];
  __shared__ int s_bad[32];
  const size_t row = blockIdx.x;
  const float* x = a + row * lda;
  float lo = 0.0f, hi = 0.0f;
  int bad = 0;
  for (int p = threadIdx.x; p < k; p += blockDim.x) {
    const float v = x[p];
    bad |= !Finite(v);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) s_lo[warp] = lo, s_hi[warp] = hi, s_bad[warp] = bad;
  __syncthreads();
  lo = 0.0f, hi = 0.0f, bad = 0;
  for (int w = 0; w < warps; ++w) lo = fminf(lo, s_lo[w]), hi = fmaxf(hi, s_hi[w]), bad |= s_bad[w];
  int8_t* dst = q + row * size_t(kq);
  if (bad || hi == lo) {  // a non-finite row becomes NaN; an all-zero row is u8 0 at zero point 0
    for (int p = threadIdx.x; p < kq; p += blockDim.x) dst[p] = -128;
    if (threadIdx.x == 0) scale[row] = bad ? NAN : 1.0f, zero[row] = 0;
    return;
  }
  // hi/255 - lo/255 rather than (hi - lo)/255, and the FLT_MIN floor: as LowpU8Params.
  float s = hi / 255.0f - lo / 255.0f;
  if (!(s >= FLT_MIN)) s = FLT_MIN;
  float z = rintf(-lo / s);
  z = z < 0.0f ? 0.0f : (z > 255.0f ? 255.0f : z);
  const float inv = 1.0f / s;
  for (int p = threadIdx.x; p < kq; p += blockDim.x) {
    float u = p < k ? rintf(x[p] * inv) + z : 0.0f;
    u = u < 0.0f ? 0.0f : (u > 255.0f ? 255.0f : u);
    dst[p] = static_cast<int8_t>(static_cast<int>(u) - 128);
  }
  if (threadIdx.x == 0) scale[row] = s, zero[row] = static_cast<int32_t>(z);
}

// One thread per column of B: symmetric per-column scale amax / 127 and round-to-nearest-even
// quantisation, as PackedLowpGemmWeights::Pack. A column holding NaN or Inf gets scale NaN, which
// the op reports.
__global__ void PackS8Kernel(const float* __restrict__ b, size_t ldb, int k, int n, int quads, int32_t* __restrict__ q,
                             float* __restrict__ scale, int32_t* __restrict__ sum) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float amax = 0.0f;
  bool finite = true;
  for (int p = 0; p < k; ++p) {
    const float v = b[size_t(p) * ldb + j];
    finite &= Finite(v);
    amax = fmaxf(amax, fabsf(v));
  }
  const float s = amax / 127.0f;
  int32_t total = 0;
  for (int qq = 0; qq < quads; ++qq) {
    uint32_t word = 0;
    for (int e = 0; e < 4; ++e) {
      const int p = qq * 4 + e;
      float v = 0.0f;
      if (p < k && s > 0.0f) v = fminf(127.0f, fmaxf(-127.0f, rintf(b[size_t(p) * ldb + j] / s)));
      const int iv = static_cast<int>(v);
      total += iv;
      word |= (static_cast<uint32_t>(iv) & 0xffu) << (8 * e);
    }
    q[size_t(qq) * n + j] = static_cast<int32_t>(word);
  }
  scale[j] = finite ? s : NAN;
  sum[j] = total;
}

// ------------------------------------------------------------------------- ops ----
bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The optional epilogue buffers follow the op's fixed ones, in the order bias, scale, residual.
Epilogue ReadEpilogue(const GpuOpCall& c, size_t next, int64_t m, int64_t n) {
  Epilogue e{};
  if (c.IntOr("hasBias", 0, 0, 1)) e.bias = c.Buffer<float>(next++, n, "bias");
  if (c.IntOr("hasScale", 0, 0, 1)) e.scale = c.Buffer<float>(next++, n, "scale");
  if (c.IntOr("hasResidual", 0, 0, 1)) {
    e.ldr = static_cast<size_t>(c.IntOr("ldr", n, n > 0 ? n : 1));
    e.residual = c.Buffer<float>(next++, m > 0 ? (m - 1) * e.ldr + n : 0, "residual");
  }
  e.act = static_cast<int>(c.IntOr("activation", kGpuActNone, 0, kGpuActCount - 1));
  e.alpha = static_cast<float>(c.NumOr("alpha", 0.0));
  e.beta = static_cast<float>(c.NumOr("beta", 0.0));
  if (e.act == kGpuActClip && !(e.alpha <= e.beta)) c.Invalid("clip needs alpha <= beta");
  e.residual_before = static_cast<int>(c.IntOr("residualBeforeActivation", 0, 0, 1));
  return e;
}

// Rows * leading dimension, less the unused tail of the last row: the elements an operand spans.
size_t Span(const GpuOpCall& c, int64_t rows, int64_t ld, int64_t cols) {
  return rows > 0 && cols > 0 ? c.Count({rows - 1, ld}) + static_cast<size_t>(cols) : 0;
}

// Whether this device runs the wgmma kernel (asked once: the answer is the build's and the
// driver's, the same for every cc 9.0 device).
bool WgmmaAvailable(const GpuDeviceInfo& d) {
  if (SONDE_GPU_EMULATED) return true;
  if (ComputeCapability(d) != 90) return false;
  static const bool loaded = Sm90aImageLoaded(d, WgmmaGemmKernel<kBf16>);
  return loaded;
}

// SONDE_GPU_WGMMA=0 keeps 'auto' off the wgmma kernel (a safety valve; 'wgmma' forced still runs it).
bool WgmmaDisabledByEnv() {
  const char* v = std::getenv("SONDE_GPU_WGMMA");
  return v && v[0] == '0' && v[1] == 0;
}

// SONDE_GPU_MMA_PIPE=0 keeps 16-bit A on the register-staged mma kernel (the safety valve of the
// cp.async one).
bool MmaPipeDisabledByEnv() {
  const char* v = std::getenv("SONDE_GPU_MMA_PIPE");
  return v && v[0] == '0' && v[1] == 0;
}

// The tensor copies read A and B in place: 16-byte aligned bases and rows (lda, ldb multiples of 8).
bool WgmmaLayoutOk(const void* a, size_t lda, const void* b, size_t ldb) {
  return Aligned16(a) && Aligned16(b) && lda % 8 == 0 && ldb % 8 == 0;
}

template <int TB>
void RunWgmmaGemm(GpuStream& s, const GpuOpCall& call, int sms, const void* a, const void* b, float* c, const Shape& sh,
                  const Epilogue& ep) {
  TmaMap2d a_map{}, b_map{};
  if (sh.k > 0) {  // K = 0 runs no K tile, so the maps stay unused (and could not describe an empty matrix)
    std::string e = EncodeTmaMap2d(&a_map, a, uint64_t(sh.m), uint64_t(sh.k), sh.lda * 2, kWgBM, kWgBK, Swizzle::k128B);
    if (e.empty()) e = EncodeTmaMap2d(&b_map, b, uint64_t(sh.k), uint64_t(sh.n), sh.ldb * 2, kWgBK, 64, Swizzle::k128B);
    if (!e.empty()) call.Invalid("kernel 'wgmma': " + e);
  }
  const uint64_t tiles = uint64_t(CeilDiv(sh.n, kWgBN)) * CeilDiv(sh.m, kWgBM);
  if (tiles > 0x7fffffffu) call.Invalid("kernel 'wgmma': more than 2^31 - 1 block tiles");
  // One block per SM (its shared stages fill the SM), each looping over tiles.
  const uint64_t blocks = sms > 0 && uint64_t(sms) < tiles ? uint64_t(sms) : tiles;
  Launch(WgmmaGemmKernel<TB>, dim3(static_cast<unsigned>(blocks)), dim3(kWgThreads), kWgSharedBytes, s, a_map, b_map, c,
         sh, ep);
}

// Threads per block of a decode GEMV over `runs` column runs (one block each): as many as keep
// the runs in one wave, 1024 threads per SM.
int GemvThreads(unsigned runs, int sms) {
  const unsigned n = sms > 0 ? unsigned(sms) : 1u;
  return runs <= n ? 1024 : runs <= 2 * n ? 512 : kGemvThreads;
}

// The SIMT kernel, on 64 x 64 tiles where 128 x 128 ones would leave SMs idle, with K split
// where the tiles alone still do (a transformer's projections at batch 1: M = 128 tokens, N =
// 256-1024: 2-8 blocks of 128), each split keeping 8 K tiles of 8. The op's `simtTile` (64, 128)
// and `splitK` (> 0) pin either (tests). c starts as zeros, or as a residual added before the
// activation (in place: already there); a residual added after it in c itself cannot split.
struct SimtPlan {
  int tile;         // 0: chosen
  int64_t split_k;  // 0: chosen
};

template <int TA, int TB>
void RunSimtGemm(GpuStream& s, int sms, const SimtPlan& plan, const void* a, const void* b, float* c, const Shape& sh,
                 const Epilogue& ep) {
  sms = std::max(sms, 1);
  const int64_t forced = plan.split_k;
  const bool small = plan.tile ? plan.tile == 64 : int64_t(CeilDiv(sh.n, 128)) * CeilDiv(sh.m, 128) < sms;
  const int tile = small ? 64 : 128;
  const dim3 tiles(CeilDiv(sh.n, tile), CeilDiv(sh.m, tile));
  const int64_t k_tiles = CeilDiv(sh.k, kSimtBK);
  const bool in_place = ep.residual == c;
  static const int min_tiles = KSplitMinTiles("SONDE_GPU_GEMM_SPLIT", 8);
  // A residual in c itself starts the sums only where it is laid out as c (ldr = ldc).
  const KSplit k = MakeKSplit(forced > 0 ? forced : AutoKSplits(int64_t(tiles.x) * tiles.y, sms, k_tiles, min_tiles), k_tiles,
                              ep.residual && ep.residual_before && !ep.scale && (!in_place || ep.ldr == sh.ldc), in_place);
  const dim3 grid(tiles.x, tiles.y, static_cast<unsigned>(k.splits));
  const auto launch = [&](const Epilogue& kernel_ep) {
    if (small) Launch(SimtGemmKernel<TA, TB, 64>, grid, dim3(kSimtThreads), 0, s, a, b, c, sh, kernel_ep, k.splits, k.tiles_per_split);
    else Launch(SimtGemmKernel<TA, TB, 128>, grid, dim3(kSimtThreads), 0, s, a, b, c, sh, kernel_ep, k.splits, k.tiles_per_split);
  };
  if (k.splits == 1) return launch(ep);
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>(CeilDiv(size_t(sh.m) * sh.n, 256), 4096));
  if (!(k.residual_in_sums && in_place))
    Launch(GemmSplitStartKernel, dim3(blocks), dim3(256), 0, s, c, sh, k.residual_in_sums ? ep.residual : nullptr, ep.ldr);
  launch(Epilogue{});
  Epilogue after = ep;
  if (k.residual_in_sums) after.residual = nullptr;
  Launch(GemmSplitEpilogueKernel, dim3(blocks), dim3(256), 0, s, c, sh, after);
}

template <int TA, int TB>
void RunGemm(GpuStream& s, int sms, int choice, const SimtPlan& simt, const void* a, const void* b, float* c, const Shape& sh,
             const Epilogue& ep) {
  if (choice == kGemv) {
    const dim3 grid(CeilDiv(sh.n, kGemvLanes * (16 / sizeof(typename Ty<TB>::T))), sh.m == 1 ? 1 : CeilDiv(sh.m, kGemvRows));
    const int threads = sh.m == 1 ? GemvThreads(grid.x, sms) : kGemvThreads;
    if (sh.m > 1) Launch(GemvKernel<TA, TB, kGemvRows, kGemvThreads>, grid, dim3(threads), 0, s, a, b, c, sh, ep);
    else if (threads == 1024) Launch(GemvKernel<TA, TB, 1, 1024>, grid, dim3(threads), 0, s, a, b, c, sh, ep);
    else if (threads == 512) Launch(GemvKernel<TA, TB, 1, 512>, grid, dim3(threads), 0, s, a, b, c, sh, ep);
    else Launch(GemvKernel<TA, TB, 1, kGemvThreads>, grid, dim3(threads), 0, s, a, b, c, sh, ep);
    return;
  }
  const dim3 grid(CeilDiv(sh.n, kMmaBN), CeilDiv(sh.m, kMmaBM));
  if constexpr (TB != kF32) {
    if (choice == kMma) {
      if constexpr (TA == TB) {
        if (sh.vec_a && sh.vec_b && !MmaPipeDisabledByEnv()) {
          Launch(MmaPipeGemmKernel<TB>, grid, dim3(kMmaThreads), kMmaPipeSharedBytes, s, static_cast<const uint16_t*>(a),
                 static_cast<const uint16_t*>(b), c, sh, ep);
          return;
        }
      }
      Launch(MmaGemmKernel<TA, TB>, grid, dim3(kMmaThreads), 0, s, a, static_cast<const uint16_t*>(b), c, sh, ep);
      return;
    }
  }
  RunSimtGemm<TA, TB>(s, sms, simt, a, b, c, sh, ep);
}

// Whether the mma kernel's 128 x 128 tiles would leave over half the SMs idle: there the SIMT
// kernel (64 x 64 tiles, K split) reads the 16-bit weights instead, with A kept in fp32, as the
// conv family does for its 1x1s. H200, bf16 transformer session: batch 1 (2-8 mma blocks) 0.439 ->
// 0.299 ms; batch 8 (16-64 blocks) 0.718-0.730 ms against 0.742 on mma (a quarter of the SMs as
// the bound: 0.772).
bool MmaStarves(int64_t m, int64_t n, const GpuDeviceInfo& d) {
  return 2 * int64_t(CeilDiv(size_t(n), kMmaBN)) * CeilDiv(size_t(m), kMmaBM) < std::max(d.multiprocessors, 1);
}

// buffers: a, b, c, then bias / scale / residual as flagged. params: m, n, k, lda, ldb, ldc,
// aType, bType (DType), kernel (Choice), the epilogue's.
void GemmOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t m = c.Int("m"), n = c.Int("n"), k = c.Int("k");
  const int64_t lda = c.IntOr("lda", k, k > 0 ? k : 1), ldb = c.IntOr("ldb", n, n > 0 ? n : 1);
  const int64_t ldc = c.IntOr("ldc", n, n > 0 ? n : 1);
  const int b_type = static_cast<int>(c.Int("bType", 0, 2));
  const int a_type = static_cast<int>(c.IntOr("aType", kF32, 0, 2));
  if (a_type != kF32 && a_type != b_type) c.Invalid("aType must be f32 or the same type as bType");
  int choice = static_cast<int>(c.IntOr("kernel", kAuto, 0, 4));
  const SimtPlan simt{static_cast<int>(c.IntOr("simtTile", 0, 0, 128)), c.IntOr("splitK", 0, 0, 65535)};
  if (simt.tile != 0 && simt.tile != 64 && simt.tile != 128) c.Invalid("simtTile must be 64 or 128");
  const bool tensor_cores = ComputeCapability(d) >= 80;
  if (choice == kMma && b_type == kF32) c.Invalid("kernel 'mma' needs fp16 or bf16 weights");
  if (choice == kMma && !tensor_cores) c.Invalid("kernel 'mma' needs compute capability 8.0 or newer");
  if (choice == kWgmma && (b_type == kF32 || a_type != b_type)) c.Invalid("kernel 'wgmma' needs A and B both fp16 or both bf16");
  if (choice == kWgmma && !WgmmaAvailable(d))
    c.Invalid("kernel 'wgmma' needs a compute capability 9.0 GPU and a build with sm_90a code");
  const size_t a_elem = a_type == kF32 ? 4 : 2, b_elem = b_type == kF32 ? 4 : 2;
  const void* a = a_elem == 4 ? static_cast<const void*>(c.Buffer<float>(0, Span(c, m, lda, k), "a"))
                              : c.Buffer<uint16_t>(0, Span(c, m, lda, k), "a");
  const void* b = b_elem == 4 ? static_cast<const void*>(c.Buffer<float>(1, Span(c, k, ldb, n), "b"))
                              : c.Buffer<uint16_t>(1, Span(c, k, ldb, n), "b");
  float* out = c.Buffer<float>(2, Span(c, m, ldc, n), "c");
  const Epilogue ep = ReadEpilogue(c, 3, m, n);
  const bool wgmma_layout = WgmmaLayoutOk(a, size_t(lda), b, size_t(ldb));
  if (choice == kWgmma && !wgmma_layout)
    c.Invalid("kernel 'wgmma' needs a and b 16-byte aligned with lda and ldb multiples of 8");
  if (choice == kAuto) {
    if (m <= kGemvRows) choice = kGemv;
    else if (b_type != kF32 && a_type == b_type && wgmma_layout && WgmmaAvailable(d) && !WgmmaDisabledByEnv()) choice = kWgmma;
    else if (b_type != kF32 && tensor_cores && !MmaStarves(m, n, d)) choice = kMma;
    else choice = kSimt;
  }
  if (m == 0 || n == 0) return;
  Shape sh{static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), size_t(lda), size_t(ldb), size_t(ldc),
           Aligned16(a) && (lda * a_elem) % 16 == 0, Aligned16(b) && (ldb * b_elem) % 16 == 0,
           Aligned16(out) && ldc % 4 == 0};
  if (choice == kMma || choice == kGemv || choice == kWgmma) {  // float2 stores need only 8-byte alignment
    sh.vec_c = (reinterpret_cast<uintptr_t>(out) & 7) == 0 && ldc % 2 == 0;
  }
  if (choice == kWgmma) {
    if (b_type == kBf16) RunWgmmaGemm<kBf16>(s, c, d.multiprocessors, a, b, out, sh, ep);
    else RunWgmmaGemm<kF16>(s, c, d.multiprocessors, a, b, out, sh, ep);
    return;
  }
  switch (b_type * 3 + a_type) {
    case kF32 * 3 + kF32: RunGemm<kF32, kF32>(s, d.multiprocessors, choice, simt, a, b, out, sh, ep); break;
    case kF16 * 3 + kF32: RunGemm<kF32, kF16>(s, d.multiprocessors, choice, simt, a, b, out, sh, ep); break;
    case kF16 * 3 + kF16: RunGemm<kF16, kF16>(s, d.multiprocessors, choice, simt, a, b, out, sh, ep); break;
    case kBf16 * 3 + kF32: RunGemm<kF32, kBf16>(s, d.multiprocessors, choice, simt, a, b, out, sh, ep); break;
    default: RunGemm<kBf16, kBf16>(s, d.multiprocessors, choice, simt, a, b, out, sh, ep); break;
  }
}

int64_t RoundUp16(int64_t k) { return (k + 15) / 16 * 16; }

// buffers: b (fp32 [k, ldb]), q (int32 [ceil16(k) / 4, n]), scale [n], sum [n]. params: k, n, ldb.
void PackS8Op(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t k = c.Int("k", 0, kS8MaxK), n = c.Int("n"), ldb = c.IntOr("ldb", n, n > 0 ? n : 1);
  const int64_t quads = RoundUp16(k) / 4;
  const float* b = c.Buffer<float>(0, Span(c, k, ldb, n), "b");
  int32_t* q = c.Buffer<int32_t>(1, c.Count({quads, n}), "q");
  float* scale = c.Buffer<float>(2, n, "scale");
  int32_t* sum = c.Buffer<int32_t>(3, n, "sum");
  if (n == 0) return;
  Launch(PackS8Kernel, dim3(CeilDiv(n, 128)), dim3(128), 0, s, b, size_t(ldb), static_cast<int>(k),
         static_cast<int>(n), static_cast<int>(quads), q, scale, sum);
  // Weights are packed once per load, so waiting here to name a bad column costs nothing that matters.
  std::vector<float> host(static_cast<size_t>(n));
  s.Download(host.data(), scale, host.size() * sizeof(float));
  s.Synchronize();
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(host[j]))
      c.Invalid("int8 quantisation needs finite weights, but column " + std::to_string(j) + " of b holds NaN or Inf");
}

// buffers: a (fp32), q, wscale, wsum (from gemm_pack_s8), c, scratch (m * ceil16(k) + 8 m bytes),
// then bias / scale / residual as flagged. params: m, n, k, lda, ldc, kernel, the epilogue's.
void GemmS8Op(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t m = c.Int("m"), n = c.Int("n"), k = c.Int("k", 0, kS8MaxK);
  const int64_t lda = c.IntOr("lda", k, k > 0 ? k : 1), ldc = c.IntOr("ldc", n, n > 0 ? n : 1);
  const int64_t kq = RoundUp16(k);
  int choice = static_cast<int>(c.IntOr("kernel", kAuto, 0, 3));
  const bool tensor_cores = ComputeCapability(d) >= 80;
  if (choice == kMma && !tensor_cores) c.Invalid("kernel 'mma' needs compute capability 8.0 or newer");
  if (choice == kAuto) choice = m > kGemvRows && tensor_cores ? kMma : kGemv;
  const float* a = c.Buffer<float>(0, Span(c, m, lda, k), "a");
  QuantB qb{c.Buffer<int32_t>(1, c.Count({kq / 4, n}), "q"), c.Buffer<float>(2, n, "wscale"),
            c.Buffer<int32_t>(3, n, "wsum")};
  float* out = c.Buffer<float>(4, Span(c, m, ldc, n), "c");
  unsigned char* scratch = c.Buffer<unsigned char>(5, c.Count({m, kq + 8}), "scratch");
  const Epilogue ep = ReadEpilogue(c, 6, m, n);
  if (m == 0 || n == 0) return;
  int8_t* aq = reinterpret_cast<int8_t*>(scratch);
  float* ascale = reinterpret_cast<float*>(scratch + size_t(m) * kq);
  int32_t* azero = reinterpret_cast<int32_t*>(ascale + m);
  Launch(QuantizeRowsKernel, dim3(static_cast<unsigned>(m)), dim3(256), 0, s, a, size_t(lda), static_cast<int>(k),
         static_cast<int>(kq), aq, ascale, azero);
  const QuantA qa{aq, ascale, azero, static_cast<int>(kq)};
  Shape sh{static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), size_t(lda), size_t(n), size_t(ldc),
           1, Aligned16(qb.q) && n % 4 == 0, (reinterpret_cast<uintptr_t>(out) & 7) == 0 && ldc % 2 == 0};
  if (choice == kMma) {
    Launch(MmaS8GemmKernel, dim3(CeilDiv(n, kMmaBN), CeilDiv(m, kMmaBM)), dim3(kMmaThreads), 0, s, qa, qb, out, sh, ep);
  } else {
    const dim3 grid(CeilDiv(n, kGemvLanes * 4), m == 1 ? 1 : CeilDiv(m, kGemvRows));
    const int threads = m == 1 ? GemvThreads(grid.x, d.multiprocessors) : kGemvThreads;
    if (m > 1) Launch(GemvS8Kernel<kGemvRows, kGemvThreads>, grid, dim3(threads), 0, s, qa, qb, out, sh, ep);
    else if (threads == 1024) Launch(GemvS8Kernel<1, 1024>, grid, dim3(threads), 0, s, qa, qb, out, sh, ep);
    else if (threads == 512) Launch(GemvS8Kernel<1, 512>, grid, dim3(threads), 0, s, qa, qb, out, sh, ep);
    else Launch(GemvS8Kernel<1, kGemvThreads>, grid, dim3(threads), 0, s, qa, qb, out, sh, ep);
  }
}

}  // namespace

SONDE_GPU_OP("gemm", GemmOp);
SONDE_GPU_OP("gemm_pack_s8", PackS8Op);
SONDE_GPU_OP("gemm_s8", GemmS8Op);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
