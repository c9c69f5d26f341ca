// Conv2d and pooling on the GPU (the CPU family: kernels/conv, ops/conv.cc), float32 NCHW.
//
// Layout: the kernels read and write the caller's NCHW tensors as they are. As an implicit GEMM,
// C[m][co] = sum_k A[m][k] * W[co][k] with m = (image, output pixel) and k = (ci, kh, kw); in NCHW
// consecutive m of one image are consecutive addresses of both the input rows (stride 1) and the
// output plane, so the im2col gather along m and the epilogue's stores are coalesced without any
// layout transform before or after the op (an NHWC kernel would need two extra passes over the
// activations per conv while the rest of the runtime is NCHW). The weights stay OIHW ([co][k], k
// contiguous), which is also the layout the mma B fragment wants (pairs of consecutive k).
//
// Paths, chosen in ConvOp:
// - depthwise (one input channel per group, incl. channel multipliers): a direct kernel over
//   shared-memory tiles of the plane; its work is too thin (K = kh*kw) for a GEMM tile.
// - bf16 on cc >= 8.0: mma.sync m16n8k16 with both operands rounded to bf16, fp32 accumulation;
//   when K = cIn/groups*kh*kw is a multiple of 8, the pipelined kernel (cp.async stages, ldmatrix,
//   128 x 128 or 256 x 64 blocks, K split across blocks when the grid is small; a 1x1 whose grid
//   would still starve the device goes to the SIMT kernel instead), else the register-staged one
//   (the stem's 3 input channels).
// - otherwise SIMT fp32 (with bf16-rounded operands when precision is bf16: the same numbers as the
//   mma path on devices without bf16 tensor cores, and the path `simt` forces for tests), K split
//   across blocks like the pipelined kernel's when the grid is small.
// BatchNorm is folded into the weights and bias on the host (lib/cuda/conv.ts) before upload.
#include <algorithm>

#include "kernels/gemm/cuda/epilogue.h"
#include "kernels/gemm/cuda/split_k.h"
#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

struct ConvGeometry {
  int n, c_in, h, w;
  int c_out, oh, ow;
  int kh, kw, sh, sw, pt, pl, dh, dw;
  int groups, cin_g, cout_g;
  int k;  // cin_g * kh * kw
  int m;  // n * oh * ow
};

// Rounds to bf16 and back: the value a bf16 operand holds.
__device__ __forceinline__ float RoundBf16(float v) { return Bf16ToFloat(FloatToBf16(v)); }

// Where output row m lives: its image's offset into the output (for channel 0) and its input window.
struct PixelCursor {
  bool valid;
  const float* x;  // input of this image at channel (group's first)
  int ih0, iw0;    // top-left of the window (may be negative: padding)
  size_t out;      // index of (image, channel 0, pixel) in the output
};

__device__ __forceinline__ PixelCursor LocatePixel(const float* x, int m, int group, const ConvGeometry& g) {
  PixelCursor c{};
  c.valid = m < g.m;
  if (!c.valid) return c;
  const int ohw = g.oh * g.ow, img = m / ohw, p = m - img * ohw, oy = p / g.ow, ox = p - oy * g.ow;
  c.x = x + (size_t(img) * g.c_in + size_t(group) * g.cin_g) * g.h * g.w;
  c.ih0 = oy * g.sh - g.pt;
  c.iw0 = ox * g.sw - g.pl;
  c.out = size_t(img) * g.c_out * ohw + p;
  return c;
}

// The im2col gather without divisions in the load loop: for each k of a K tile, where its tap sits
// relative to a window's top-left pixel (offset in the group's input, and dy / dx for the bounds
// check). Built by the first BK threads one K tile ahead, into the table half the loads of the
// current iteration do not read, so the one barrier per K step also publishes it.
struct TapTable {
  int off, dy, dx;
};
constexpr int kTapPastK = -(1 << 30);  // dy of k >= K: every window's row check fails, giving zero

__device__ __forceinline__ void BuildTaps(TapTable* taps, int k0, int count, const ConvGeometry& g) {
  const int i = threadIdx.x;
  if (i >= count) return;
  const int k = k0 + i;
  TapTable t{0, kTapPastK, 0};
  if (k < g.k) {
    const int per = g.kh * g.kw, ci = k / per, r = k - ci * per, ky = r / g.kw, kx = r - ky * g.kw;
    t.dy = ky * g.dh;
    t.dx = kx * g.dw;
    t.off = ci * g.h * g.w + t.dy * g.w + t.dx;
  }
  taps[i] = t;
}

// A[m][k] of the implicit im2col matrix for the tap of k; zero in the padding and past K.
__device__ __forceinline__ float Im2colAt(const PixelCursor& c, const TapTable& t, const ConvGeometry& g) {
  const int iy = c.ih0 + t.dy, ix = c.iw0 + t.dx;
  if (!c.valid || unsigned(iy) >= unsigned(g.h) || unsigned(ix) >= unsigned(g.w)) return 0.0f;
  return c.x[ptrdiff_t(t.off) + ptrdiff_t(c.ih0) * g.w + c.iw0];
}

// ---- SIMT implicit GEMM: 64 pixels x 64 channels per block, K in steps of 16 ----
// 256 threads, each 4 consecutive pixels x 4 channels in registers: 16 FMAs per two float4 shared
// loads. (The same code with kSimtT = 8, 128 x 128 tiles and 64 FMAs per four loads, ran 1.1 to 2.2x
// slower on an H200 at ResNet-50 shapes: 148 registers and a quarter of the blocks leave too few
// warps to hide the im2col gathers.) kSimtT/4 groups of 4 pixels (channels) 64 apart per thread, so
// the 16 threads reading one shared row read 64 consecutive floats. Shared tiles are
// double-buffered with the next tile's global loads issued before the current tile's FMAs, so one
// barrier per K step covers both hazards. Grids too small to fill the device split K (PlanKSplit).
constexpr int kSimtBK = 16, kSimtThreads = 256, kSimtT = 4;

template <bool kBf16>
__global__ void __launch_bounds__(kSimtThreads)
    ConvSimtKernel(const float* __restrict__ x, const void* __restrict__ weights, float* __restrict__ y, ConvGeometry g,
                   GpuEpilogue ep, int splits, int tiles_per_split) {
  constexpr int kB = 16 * kSimtT, kHalves = kSimtT / 4;
  constexpr int kARows = kSimtThreads / kB, kAPer = kSimtBK / kARows;  // k rows a_k + kARows i
  constexpr int kBPer = kB / 16;                                        // channels b_n + 16 i
  __align__(16) __shared__ float As[2][kSimtBK][kB];
  __align__(16) __shared__ float Bs[2][kSimtBK][kB];
  __shared__ TapTable taps[2][kSimtBK];
  const int tid = threadIdx.x, group = blockIdx.z / splits, split = blockIdx.z - group * splits;
  const int m0 = blockIdx.x * kB, n0 = blockIdx.y * kB;
  // This split's K tiles: [t0, t0 + count) of kSimtBK each (the last may run past K: zeros).
  const int tiles = (g.k + kSimtBK - 1) / kSimtBK, t0 = split * tiles_per_split;
  const int count = (tiles < t0 + tiles_per_split ? tiles : t0 + tiles_per_split) - t0, kb = t0 * kSimtBK;
  // Loader roles: A by pixel (coalesced along m), B by k (coalesced along a weight row).
  const int a_m = tid % kB, a_k = tid / kB;
  const int b_k = tid % kSimtBK, b_n = tid / kSimtBK;
  const PixelCursor pix = LocatePixel(x, m0 + a_m, group, g);
  const size_t wrow0 = size_t(group) * g.cout_g;
  auto weight = [&](int co, int k) -> float {
    if (co >= g.cout_g || k >= g.k) return 0.0f;
    const size_t i = (wrow0 + co) * g.k + k;
    return kBf16 ? Bf16ToFloat(static_cast<const uint16_t*>(weights)[i]) : static_cast<const float*>(weights)[i];
  };
  float ra[kAPer], rb[kBPer];
  auto load = [&](int k0, const TapTable* t) {
    SONDE_UNROLL
    for (int i = 0; i < kAPer; ++i) {
      const float v = Im2colAt(pix, t[a_k + kARows * i], g);
      ra[i] = kBf16 ? RoundBf16(v) : v;
    }
    SONDE_UNROLL
    for (int i = 0; i < kBPer; ++i) rb[i] = weight(n0 + b_n + 16 * i, k0 + b_k);
  };
  auto store = [&](int buf) {
    SONDE_UNROLL
    for (int i = 0; i < kAPer; ++i) As[buf][a_k + kARows * i][a_m] = ra[i];
    SONDE_UNROLL
    for (int i = 0; i < kBPer; ++i) Bs[buf][b_k][b_n + 16 * i] = rb[i];
  };
  // Output (i, j) of this thread is pixel m0 + tm(i), channel n0 + tn(j).
  const int tx = (tid % 16) * 4, ty = (tid / 16) * 4;
  auto tm = [&](int i) { return (i / 4) * 64 + tx + i % 4; };
  auto tn = [&](int j) { return (j / 4) * 64 + ty + j % 4; };
  float acc[kSimtT][kSimtT] = {};
  BuildTaps(taps[0], kb, kSimtBK, g);
  BuildTaps(taps[1], kb + kSimtBK, kSimtBK, g);
  __syncthreads();
  load(kb, taps[0]);
  store(0);
  __syncthreads();
  int buf = 0;
  for (int j = 0; j < count; ++j) {
    const int k0 = kb + j * kSimtBK;
    const bool more = j + 1 < count;
    if (more) load(k0 + kSimtBK, taps[buf ^ 1]);
    SONDE_UNROLL
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float av[kSimtT], bv[kSimtT];
      SONDE_UNROLL
      for (int h = 0; h < kHalves; ++h) {
        const float4 a = *reinterpret_cast<const float4*>(&As[buf][kk][h * 64 + tx]);
        const float4 b = *reinterpret_cast<const float4*>(&Bs[buf][kk][h * 64 + ty]);
        av[4 * h] = a.x, av[4 * h + 1] = a.y, av[4 * h + 2] = a.z, av[4 * h + 3] = a.w;
        bv[4 * h] = b.x, bv[4 * h + 1] = b.y, bv[4 * h + 2] = b.z, bv[4 * h + 3] = b.w;
      }
      SONDE_UNROLL
      for (int i = 0; i < kSimtT; ++i)
        SONDE_UNROLL
        for (int j = 0; j < kSimtT; ++j) acc[i][j] += av[i] * bv[j];
    }
    if (more) store(buf ^ 1);
    BuildTaps(taps[buf], k0 + 2 * kSimtBK, kSimtBK, g);  // for the load two steps on
    __syncthreads();
    buf ^= 1;
  }
  const size_t ohw = size_t(g.oh) * g.ow;
  SONDE_UNROLL
  for (int i = 0; i < kSimtT; ++i) {
    const PixelCursor c = LocatePixel(x, m0 + tm(i), group, g);
    if (!c.valid) continue;
    SONDE_UNROLL
    for (int j = 0; j < kSimtT; ++j) {
      const int co = n0 + tn(j);
      if (co >= g.cout_g) continue;
      const size_t ch = wrow0 + co, o = c.out + ch * ohw;
      if (splits == 1) y[o] = GpuApplyEpilogue(acc[i][j], ch, o, ep);
      else atomicAdd(&y[o], acc[i][j]);
    }
  }
}

// ---- Tensor cores: bf16 mma.sync, K in steps of 32 ----
// Warps in a kWarpsM x kWarpsN grid, each 32 pixels x 32 channels (2 m16 x 4 n8 tiles, 32 fp32
// accumulators): 64 x 64 with 4 warps, or 64 x 128 with 8 for layers of >= 128 channels, where the
// wider tile halves the im2col gathers (the kernel's bottleneck) per FLOP. Shared tiles hold bf16
// pairs k-contiguous ([row][k]) so that every A and B fragment register is one 32-bit shared load;
// rows are padded by 8 halves (16 bytes) so the 8 rows a fragment load touches fall in different banks.
constexpr int kMmaBK = 32, kMmaLd = kMmaBK + 8;


__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  return uint32_t(FloatToBf16(lo)) | (uint32_t(FloatToBf16(hi)) << 16);
}

template <int kWarpsM, int kWarpsN>
__global__ void __launch_bounds__(kWarpsM * kWarpsN * 32)
    ConvMmaBf16Kernel(const float* __restrict__ x, const uint16_t* __restrict__ weights, float* __restrict__ y,
                      ConvGeometry g, GpuEpilogue ep) {
  constexpr int kBM = 32 * kWarpsM, kBN = 32 * kWarpsN, kThreads = 32 * kWarpsM * kWarpsN;
  // Loader roles: A by pixel (coalesced along m), B by k pair (coalesced along a weight row).
  constexpr int kAStep = 2 * (kThreads / kBM), kAPairs = kMmaBK / kAStep;  // k pairs per thread
  constexpr int kBStep = kThreads / 16, kBPairs = kBN / kBStep;
  __align__(16) __shared__ uint16_t As[2][kBM][kMmaLd];
  __align__(16) __shared__ uint16_t Bs[2][kBN][kMmaLd];
  __shared__ TapTable taps[2][kMmaBK];
  const int tid = threadIdx.x, group = blockIdx.z;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int a_m = tid % kBM, a_k = (tid / kBM) * 2;  // pairs a_k + kAStep i
  const int b_k = (tid % 16) * 2, b_n = tid / 16;     // channels b_n + kBStep i
  const PixelCursor pix = LocatePixel(x, m0 + a_m, group, g);
  const size_t wrow0 = size_t(group) * g.cout_g;
  uint32_t ra[kAPairs], rb[kBPairs];
  auto load = [&](int k0, const TapTable* t) {
    SONDE_UNROLL
    for (int i = 0; i < kAPairs; ++i) {
      const int ka = a_k + kAStep * i;
      ra[i] = PackBf16(Im2colAt(pix, t[ka], g), Im2colAt(pix, t[ka + 1], g));
    }
    SONDE_UNROLL
    for (int i = 0; i < kBPairs; ++i) {
      const int co = n0 + b_n + kBStep * i, kb = k0 + b_k;
      uint32_t lo = 0, hi = 0;
      if (co < g.cout_g) {
        const uint16_t* wr = weights + (wrow0 + co) * g.k;
        if (kb < g.k) lo = wr[kb];
        if (kb + 1 < g.k) hi = wr[kb + 1];
      }
      rb[i] = lo | (hi << 16);
    }
  };
  auto store = [&](int buf) {
    SONDE_UNROLL
    for (int i = 0; i < kAPairs; ++i) StoreVec<uint32_t>(&As[buf][a_m][a_k + kAStep * i], ra[i]);
    SONDE_UNROLL
    for (int i = 0; i < kBPairs; ++i) StoreVec<uint32_t>(&Bs[buf][b_n + kBStep * i][b_k], rb[i]);
  };
  const int warp = tid / 32, lane = tid % 32, gq = lane / 4, tq = lane % 4;
  const int wm = (warp % kWarpsM) * 32, wn = (warp / kWarpsM) * 32;
  float acc[2][4][4] = {};
  BuildTaps(taps[0], 0, kMmaBK, g);
  BuildTaps(taps[1], kMmaBK, kMmaBK, g);
  __syncthreads();
  load(0, taps[0]);
  store(0);
  __syncthreads();
  int buf = 0;
  for (int k0 = 0; k0 < g.k; k0 += kMmaBK) {
    const bool more = k0 + kMmaBK < g.k;
    if (more) load(k0 + kMmaBK, taps[buf ^ 1]);
    SONDE_UNROLL
    for (int kk = 0; kk < kMmaBK; kk += 16) {
      uint32_t a[2][4], b[4][2];
      SONDE_UNROLL
      for (int mi = 0; mi < 2; ++mi) {
        const int r = wm + mi * 16 + gq;
        a[mi][0] = LoadVec<uint32_t>(&As[buf][r][kk + 2 * tq]);
        a[mi][1] = LoadVec<uint32_t>(&As[buf][r + 8][kk + 2 * tq]);
        a[mi][2] = LoadVec<uint32_t>(&As[buf][r][kk + 2 * tq + 8]);
        a[mi][3] = LoadVec<uint32_t>(&As[buf][r + 8][kk + 2 * tq + 8]);
      }
      SONDE_UNROLL
      for (int ni = 0; ni < 4; ++ni) {
        const int c = wn + ni * 8 + gq;
        b[ni][0] = LoadVec<uint32_t>(&Bs[buf][c][kk + 2 * tq]);
        b[ni][1] = LoadVec<uint32_t>(&Bs[buf][c][kk + 2 * tq + 8]);
      }
      SONDE_UNROLL
      for (int mi = 0; mi < 2; ++mi)
        SONDE_UNROLL
        for (int ni = 0; ni < 4; ++ni) MmaBf16(acc[mi][ni], a[mi], b[ni]);
    }
    if (more) store(buf ^ 1);
    BuildTaps(taps[buf], k0 + 2 * kMmaBK, kMmaBK, g);  // for the load two steps on
    __syncthreads();
    buf ^= 1;
  }
  const size_t ohw = size_t(g.oh) * g.ow;
  SONDE_UNROLL
  for (int mi = 0; mi < 2; ++mi)
    SONDE_UNROLL
    for (int half = 0; half < 2; ++half) {
      const PixelCursor c = LocatePixel(x, m0 + wm + mi * 16 + gq + half * 8, group, g);
      if (!c.valid) continue;
      SONDE_UNROLL
      for (int ni = 0; ni < 4; ++ni)
        SONDE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int co = n0 + wn + ni * 8 + 2 * tq + e;
          if (co >= g.cout_g) continue;
          const size_t ch = wrow0 + co, o = c.out + ch * ohw;
          y[o] = GpuApplyEpilogue(acc[mi][ni][half * 2 + e], ch, o, ep);
        }
    }
}

// ---- Tensor cores, pipelined: 128 x 128 (or 256 x 64) blocks fed by cp.async ----
// For K a multiple of 8 (every conv with 8k input channels per group): the bf16 weight rows are
// 16-byte aligned, so B tiles go global -> shared by cp.async through kPipeStages stages and reach
// the mma as ldmatrix fragments, with no registers or conversion in between. A stays fp32 in shared
// memory, k-major ([k][pixel], pixels contiguous as in the NCHW input), and is rounded to bf16 pairs
// as the fragments are read: that lets a 1x1 / stride 1 / unpadded conv (ResNet's bottleneck
// 1x1s, MobileNet's pointwise convs) copy its A tile with cp.async too, 4 pixels of one channel per
// 16 bytes. Other windows gather A through registers one tile ahead (the older kernel's scheme),
// but over blocks of 16K outputs, which halves the gathers per FLOP against 64 x 128.
// Warps kWarpsM (pixels) x 8 / kWarpsM (channels), 64 x 32 each: 128 x 128 blocks, or 256 x 64
// for groups of <= 64 channels (ResNet's layer1), where a 128-channel tile would be half zeros.
// Rows of the fp32 A tile are padded by 4 floats so the 32 lanes of a fragment read (k rows 2tq,
// 2tq + 1 or + 8, pixels gq) hit 32 banks; rows of B by 8 halves so the 8 rows of an ldmatrix
// matrix do. Gathered A tiles go through registers in two halves of K, each loaded before and
// stored after one k16 step of mma: the loads are in flight during the tensor-core work, with half
// the registers. Grids too small to fill the device split K (PlanKSplit).
constexpr int kPipeBK = 32, kPipeStages = 3, kPipeThreads = 256, kPipeLdB = kPipeBK + 8;

// A copied: fp32 [k][pixel]; A gathered: bf16 [pixel][k] like B, rounded once by the gathering
// thread instead of by every channel warp, and read by ldmatrix.
template <int kWarpsM, bool kCopyA>
struct PipeTile {
  static constexpr int kBM = 64 * kWarpsM, kBN = 32 * (8 / kWarpsM), kLdA = kCopyA ? kBM + 4 : kPipeLdB;
  static constexpr size_t kStageABytes = kCopyA ? size_t(kPipeBK) * kLdA * 4 : size_t(kBM) * kLdA * 2;
  static constexpr size_t kStageB = size_t(kBN) * kPipeLdB;  // halves
  static constexpr size_t kSharedBytes = kPipeStages * (kStageABytes + kStageB * 2);  // <= 111 KiB
};

template <int kWarpsM, bool kCopyA>
__global__ void __launch_bounds__(kPipeThreads, 2)
    ConvMmaPipeKernel(const float* __restrict__ x, const uint16_t* __restrict__ weights, float* __restrict__ y,
                      ConvGeometry g, GpuEpilogue ep, int splits, int tiles_per_split) {
  using T = PipeTile<kWarpsM, kCopyA>;
  constexpr int kBM = T::kBM, kBN = T::kBN, kLdA = T::kLdA;
  SONDE_DYNAMIC_SHARED(unsigned char, smem);
  // Stage st of A: fp32 at As32(st) when copied, bf16 at As16(st) when gathered.
  const auto As32 = [&](int st) { return reinterpret_cast<float*>(smem + st * T::kStageABytes); };
  const auto As16 = [&](int st) { return reinterpret_cast<uint16_t*>(smem + st * T::kStageABytes); };
  uint16_t* Bs = reinterpret_cast<uint16_t*>(smem + kPipeStages * T::kStageABytes);
  __shared__ TapTable taps[2][kPipeBK];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gq = lane / 4, tq = lane % 4;
  const int group = blockIdx.z / splits, split = blockIdx.z - group * splits;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int tiles = (g.k + kPipeBK - 1) / kPipeBK;
  const int t0 = split * tiles_per_split, count = (tiles < t0 + tiles_per_split ? tiles : t0 + tiles_per_split) - t0;
  const size_t wrow0 = size_t(group) * g.cout_g, ohw = size_t(g.oh) * g.ow;
  // cp.async roles. B: rows tid / 4 + 64 i, chunk of 8 k (tid % 4). Copied A: pixels
  // 4 (tid % (kBM / 4)) .. + 3 (one image, as ohw % 4 == 0), channel rows tid / (kBM / 4) + kCaStep i.
  constexpr int kBChunks = kBN / 64, kCaCols = kBM / 4, kCaStep = kPipeThreads / kCaCols, kCaChunks = kPipeBK / kCaStep;
  const int b_row = tid / 4, b_col = (tid % 4) * 8;
  const int ca_m = (tid % kCaCols) * 4, ca_k = tid / kCaCols;
  const float* ca_x = x;
  const bool ca_valid = kCopyA && m0 + ca_m < g.m;
  if (ca_valid) {
    const size_t m = size_t(m0 + ca_m), img = m / ohw;
    ca_x = x + (img * g.c_in + size_t(group) * g.cin_g) * ohw + (m - img * ohw);
  }
  auto issue = [&](int j) {
    const int st = j % kPipeStages, k0 = (t0 + j) * kPipeBK;
    uint16_t* bs = Bs + st * T::kStageB;
    SONDE_UNROLL
    for (int i = 0; i < kBChunks; ++i) {
      const int row = b_row + 64 * i, co = n0 + row, kb = k0 + b_col;
      const bool ok = co < g.cout_g && kb < g.k;  // K % 8 == 0: a chunk is all inside or all past K
      CpAsync16(&bs[row * kPipeLdB + b_col], ok ? weights + (wrow0 + co) * g.k + kb : weights, ok ? 16 : 0);
    }
    if (kCopyA) {
      float* as = As32(st);
      SONDE_UNROLL
      for (int i = 0; i < kCaChunks; ++i) {
        const int kr = ca_k + kCaStep * i;
        const bool ok = ca_valid && k0 + kr < g.k;
        CpAsync16(&as[kr * kLdA + ca_m], ok ? ca_x + size_t(k0 + kr) * ohw : x, ok ? 16 : 0);
      }
    }
  };
  // Gathered A roles: pixel tid % kBM, k pairs tid / kBM + kGaStep i; half h holds k 16h .. 16h + 15.
  constexpr int kGaStep = kPipeThreads / kBM, kGaHalf = kCopyA ? 1 : 8 / kGaStep;
  const int ga_m = tid % kBM, ga_p = tid / kBM;
  const PixelCursor pix = LocatePixel(x, kCopyA ? g.m : m0 + ga_m, group, g);
  uint32_t ra[kGaHalf];
  auto gather = [&](const TapTable* t, int half) {
    SONDE_UNROLL
    for (int i = 0; i < kGaHalf; ++i) {
      const int k = 16 * half + 2 * (ga_p + kGaStep * i);
      ra[i] = PackBf16(Im2colAt(pix, t[k], g), Im2colAt(pix, t[k + 1], g));
    }
  };
  auto store = [&](int j, int half) {
    uint16_t* as = As16(j % kPipeStages) + ga_m * kLdA + 16 * half + 2 * ga_p;
    SONDE_UNROLL
    for (int i = 0; i < kGaHalf; ++i) StoreVec<uint32_t>(as + 2 * kGaStep * i, ra[i]);
  };
  if (!kCopyA) {
    BuildTaps(taps[0], t0 * kPipeBK, kPipeBK, g);
    BuildTaps(taps[1], (t0 + 1) * kPipeBK, kPipeBK, g);
    __syncthreads();
    for (int half = 0; half < 2; ++half) {
      gather(taps[0], half);
      store(0, half);
    }
  }
  // One commit group per tile slot, empty ones included, so that "at most kPipeStages - 2
  // pending" always means tile j has landed.
  SONDE_UNROLL
  for (int j = 0; j < kPipeStages - 1; ++j) {
    if (j < count) issue(j);
    CpAsyncCommit();
  }
  const int wm = (warp % kWarpsM) * 64, wn = (warp / kWarpsM) * 32;
  float acc[4][4][4] = {};
  for (int j = 0; j < count; ++j) {
    CpAsyncWait<kPipeStages - 2>();
    // Publishes tile j (copied, or stored by the threads last iteration) and tells the issuers that
    // every warp is done with tile j - 1, whose stage the next issue overwrites. Tile j + 1's stage
    // was last read in iteration j + 1 - kPipeStages, so the gathers below may store into it at once.
    __syncthreads();
    if (j + kPipeStages - 1 < count) issue(j + kPipeStages - 1);
    CpAsyncCommit();
    const bool more = !kCopyA && j + 1 < count;
    const int st = j % kPipeStages;
    const uint16_t* bs = Bs + st * T::kStageB;
    SONDE_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int kk = 16 * half;
      if (more) gather(taps[(j + 1) % 2], half);
      uint32_t a[4][4], b[4][2];
      SONDE_UNROLL
      for (int mi = 0; mi < 4; ++mi) {
        if (kCopyA) {
          const float* lo = As32(st) + (kk + 2 * tq) * kLdA + wm + mi * 16 + gq;  // k rows 2tq, 2tq + 1
          const float* hi = lo + 8 * kLdA;                                          // k rows + 8
          a[mi][0] = PackBf16(lo[0], lo[kLdA]);
          a[mi][1] = PackBf16(lo[8], lo[kLdA + 8]);
          a[mi][2] = PackBf16(hi[0], hi[kLdA]);
          a[mi][3] = PackBf16(hi[8], hi[kLdA + 8]);
        } else {
          // Matrices: pixels +0..7 / +8..15 ((lane / 8) % 2) by k +0..7 / +8..15 (lane / 16).
          const int m = wm + mi * 16 + lane % 8 + ((lane / 8) % 2) * 8, k = kk + (lane / 16) * 8;
          LdMatrixX4(a[mi], &As16(st)[m * kLdA + k]);
        }
      }
      SONDE_UNROLL
      for (int p = 0; p < 2; ++p) {
        // Matrices: channels +0..7 / +8..15 (lane / 16) by k +0..7 / +8..15 ((lane / 8) % 2).
        const int n = wn + p * 16 + (lane / 16) * 8 + lane % 8, k = kk + ((lane / 8) % 2) * 8;
        uint32_t r[4];
        LdMatrixX4(r, &bs[n * kPipeLdB + k]);
        b[2 * p][0] = r[0], b[2 * p][1] = r[1], b[2 * p + 1][0] = r[2], b[2 * p + 1][1] = r[3];
      }
      SONDE_UNROLL
      for (int mi = 0; mi < 4; ++mi)
        SONDE_UNROLL
        for (int ni = 0; ni < 4; ++ni) MmaBf16(acc[mi][ni], a[mi], b[ni]);
      if (more) store(j + 1, half);
    }
    if (more) BuildTaps(taps[j % 2], (t0 + j + 2) * kPipeBK, kPipeBK, g);  // tile j + 2's, read after the next barrier
  }
  CpAsyncWait<0>();  // nothing may be left writing shared memory when the block exits
  SONDE_UNROLL
  for (int mi = 0; mi < 4; ++mi)
    SONDE_UNROLL
    for (int half = 0; half < 2; ++half) {
      const PixelCursor c = LocatePixel(x, m0 + wm + mi * 16 + gq + half * 8, group, g);
      if (!c.valid) continue;
      SONDE_UNROLL
      for (int ni = 0; ni < 4; ++ni)
        SONDE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int co = n0 + wn + ni * 8 + 2 * tq + e;
          if (co >= g.cout_g) continue;
          const size_t ch = wrow0 + co, o = c.out + ch * ohw;
          const float v = acc[mi][ni][half * 2 + e];
          if (splits == 1) y[o] = GpuApplyEpilogue(v, ch, o, ep);
          else atomicAdd(&y[o], v);
        }
    }
}

// Before a split-K conv whose residual is added before the activation and lives apart from y: y
// starts as that residual, so the splits' sums land on it.
__global__ void ConvSplitStartKernel(float* __restrict__ y, const float* __restrict__ residual, size_t count) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) y[i] = residual[i];
}

// After a split-K conv: y holds the raw sums. Planes along grid.y (looping past 65535).
__global__ void ConvSplitEpilogueKernel(float* __restrict__ y, size_t planes, int ohw, int c_out, GpuEpilogue ep) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= ohw) return;
  for (size_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const size_t o = plane * ohw + p;
    y[o] = GpuApplyEpilogue(y[o], plane % c_out, o, ep);
  }
}

// ---- Depthwise (one input channel per group) ----
// One block of 32 x 8 threads per 32 x 32 tile of an output plane: its input window (with halo, zeros
// for padding) and the channel's kh*kw weights go to shared memory once, coalesced, and each thread
// then computes 4 outputs of a column from shared memory. (A per-output gather from global memory
// re-reads every input kh*kw times through L1, and 32 x 8 tiles of one output per thread left the
// blocks too short to hide their load latency: both ran at ~0.45 TB/s on an H200.) Planes go along
// grid.y (looping past 65535), tiles along grid.x, so no thread divides a 64-bit index.
constexpr int kDwTileW = 32, kDwThreadsY = 8, kDwRowsPerThread = 4, kDwTileH = kDwThreadsY * kDwRowsPerThread;

// Shared floats the tile needs: its input window plus the weights.
size_t DepthwiseShared(int kh, int kw, int sh, int sw, int dh, int dw) {
  const size_t th = size_t(kDwTileH - 1) * sh + size_t(kh - 1) * dh + 1, tw = size_t(kDwTileW - 1) * sw + size_t(kw - 1) * dw + 1;
  return th * tw + size_t(kh) * kw;
}

template <bool kBf16>
__global__ void __launch_bounds__(kDwTileW * kDwThreadsY)
    ConvDepthwiseKernel(const float* __restrict__ x, const void* __restrict__ weights, float* __restrict__ y,
                        ConvGeometry g, GpuEpilogue ep) {
  SONDE_DYNAMIC_SHARED(float, tile);
  const int th = (kDwTileH - 1) * g.sh + (g.kh - 1) * g.dh + 1, tw = (kDwTileW - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  const int taps = g.kh * g.kw;
  float* wt = tile + th * tw;
  const int tiles_x = (g.ow + kDwTileW - 1) / kDwTileW;
  const int ty0 = (blockIdx.x / tiles_x) * kDwTileH, tx0 = (blockIdx.x % tiles_x) * kDwTileW;
  const int iy0 = ty0 * g.sh - g.pt, ix0 = tx0 * g.sw - g.pl;
  const int tid = threadIdx.y * kDwTileW + threadIdx.x, threads = kDwTileW * kDwThreadsY;
  const int ox = tx0 + threadIdx.x;
  const size_t ohw = size_t(g.oh) * g.ow, planes = size_t(g.n) * g.c_out;
  for (size_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int co = static_cast<int>(plane % g.c_out), img = static_cast<int>(plane / g.c_out);  // once per plane
    const float* xp = x + (size_t(img) * g.c_in + co / g.cout_g) * g.h * g.w;
    for (int i = tid; i < th * tw; i += threads) {
      const int r = i / tw, c = i - r * tw, iy = iy0 + r, ix = ix0 + c;
      const float v = unsigned(iy) < unsigned(g.h) && unsigned(ix) < unsigned(g.w) ? xp[size_t(iy) * g.w + ix] : 0.0f;
      tile[i] = kBf16 ? RoundBf16(v) : v;
    }
    for (int i = tid; i < taps; i += threads) {
      const size_t wi = size_t(co) * taps + i;
      wt[i] = kBf16 ? Bf16ToFloat(static_cast<const uint16_t*>(weights)[wi]) : static_cast<const float*>(weights)[wi];
    }
    __syncthreads();
    SONDE_UNROLL
    for (int j = 0; j < kDwRowsPerThread; ++j) {
      const int row = threadIdx.y + kDwThreadsY * j, oy = ty0 + row;
      if (oy >= g.oh || ox >= g.ow) continue;
      const float* base = tile + row * g.sh * tw + threadIdx.x * g.sw;
      float acc = 0.0f;
      for (int ky = 0; ky < g.kh; ++ky)
        for (int kx = 0; kx < g.kw; ++kx) acc += base[ky * g.dh * tw + kx * g.dw] * wt[ky * g.kw + kx];
      const size_t o = plane * ohw + size_t(oy) * g.ow + ox;
      y[o] = GpuApplyEpilogue(acc, co, o, ep);
    }
    __syncthreads();  // the next plane overwrites the tile
  }
}

// ---- Pooling ----
enum PoolKind : int { kPoolMax = 0, kPoolAverage = 1, kPoolGlobalAverage = 2 };

struct PoolGeometry {
  int h, w, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw;
  int count_include_pad;
};

// One output per thread. Max ignores padding (-inf when a window holds no input, as
// the CPU's padded plane gives); average divides by the taps inside the input unless pads count.
// Pixels of a plane along grid.x, planes along grid.y (looping past 65535): no 64-bit division.
__global__ void PoolKernel(int kind, const float* __restrict__ x, float* __restrict__ y, size_t planes, PoolGeometry g) {
  const int ohw = g.oh * g.ow, p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= ohw) return;
  const int oy = p / g.ow, ox = p - oy * g.ow;
  for (size_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const size_t o = plane * ohw + p;
    const float* xp = x + plane * g.h * g.w;
    float acc = kind == kPoolMax ? -INFINITY : 0.0f;
    int rows = 0, cols = 0;
    for (int ky = 0; ky < g.kh; ++ky) {
      const int iy = oy * g.sh - g.pt + ky * g.dh;
      if (unsigned(iy) >= unsigned(g.h)) continue;
      ++rows;
      cols = 0;
      for (int kx = 0; kx < g.kw; ++kx) {
        const int ix = ox * g.sw - g.pl + kx * g.dw;
        if (unsigned(ix) >= unsigned(g.w)) continue;
        ++cols;
        const float v = xp[size_t(iy) * g.w + ix];
        if (kind == kPoolMax) acc = v > acc ? v : acc;
        else acc += v;
      }
    }
    if (kind == kPoolAverage) {
      // rows x cols taps lie inside the input (0 / 0 when none do, as on the CPU)
      acc = g.count_include_pad ? acc * (1.0f / static_cast<float>(g.kh * g.kw))
                                : acc / (static_cast<float>(rows) * static_cast<float>(cols));
    }
    y[o] = acc;
  }
}

// One warp per plane, 8 planes per block: ResNet's last planes are 7x7, far too small for a block each.
constexpr unsigned kGlobalPoolWarps = 8;
__global__ void __launch_bounds__(kGlobalPoolWarps * 32)
    GlobalAveragePoolKernel(const float* __restrict__ x, float* __restrict__ y, size_t planes, size_t hw) {
  const size_t plane = size_t(blockIdx.x) * kGlobalPoolWarps + threadIdx.x / 32;
  if (plane >= planes) return;  // whole warps leave together
  const unsigned lane = threadIdx.x % 32;
  const float* xp = x + plane * hw;
  float s = 0.0f;
  for (size_t i = lane; i < hw; i += 32) s += xp[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) y[plane] = s / static_cast<float>(hw);
}

// Output size along one axis with explicit pads (lib/cuda resolves autoPad); 0 when it would be empty.
int64_t OutSize(int64_t in, int64_t k, int64_t s, int64_t d, int64_t p0, int64_t p1) {
  const int64_t ext = (k - 1) * d + 1;
  return in + p0 + p1 < ext ? 0 : (in + p0 + p1 - ext) / s + 1;
}

// Window geometry shared by conv and pooling; checks what the kernels' int arithmetic relies on.
void ReadWindow(const GpuOpCall& c, int64_t h, int64_t w, int64_t* kh, int64_t* kw, int64_t* oh, int64_t* ow, int64_t v[8]) {
  *kh = c.Int("kh", 1);
  *kw = c.Int("kw", 1);
  const char* names[8] = {"sh", "sw", "dh", "dw", "pt", "pl", "pb", "pr"};
  for (int i = 0; i < 8; ++i) v[i] = c.Int(names[i], i < 4 ? 1 : 0);
  if (v[4] >= (*kh - 1) * v[2] + 1 || v[6] >= (*kh - 1) * v[2] + 1 || v[5] >= (*kw - 1) * v[3] + 1 ||
      v[7] >= (*kw - 1) * v[3] + 1)
    c.Invalid("pads must be smaller than the dilated kernel extent");
  *oh = OutSize(h, *kh, v[0], v[2], v[4], v[6]);
  *ow = OutSize(w, *kw, v[1], v[3], v[5], v[7]);
  if (*oh <= 0 || *ow <= 0) c.Invalid("output size would be <= 0 (input plus pads smaller than the dilated kernel)");
  // Window coordinates (o * s + k * d) stay in int.
  if ((*oh + *kh) * (v[0] + v[2]) + h > INT32_MAX || (*ow + *kw) * (v[1] + v[3]) + w > INT32_MAX)
    c.Invalid("window coordinates exceed the int32 range");
}

// K split across blocks (grid.z = groups x splits) where the output tiles alone fill the device
// badly (ResNet-50's layer4 3x3 at batch 1: 8 SIMT blocks for 132 SMs), by split_k.h's count: each
// split keeps 8 K tiles (4 lost on the stem at batch 1); `splitK` forces a count (tests). y starts as
// zeros, or as the residual where that is added before the activation (an in-place residual, as
// sessions' bottleneck convs have, is already there: splitting those gave ResNet-50 at batch 8 1-2%
// in fp32 and bf16 sessions); then ConvSplitEpilogueKernel applies the rest of the epilogue. A
// residual added after the activation and stored in y itself would be lost to the zeroing: that
// conv never splits.
KSplit PlanKSplit(const GpuOpCall& c, const GpuDeviceInfo& d, const ConvGeometry& g, const GpuEpilogue& ep, const float* y,
                  int64_t tile_blocks, int k_tiles, int slots_per_sm) {
  static const int min_tiles = KSplitMinTiles("SONDE_GPU_CONV_SPLIT", 8);
  int64_t splits = c.IntOr("splitK", 0, 0, 65535);
  if (splits == 0)
    splits = AutoKSplits(tile_blocks * g.groups, int64_t(std::max(d.multiprocessors, 1)) * slots_per_sm, k_tiles, min_tiles);
  const KSplit k = MakeKSplit(splits, k_tiles, ep.residual && ep.residual_before_activation && !ep.scale, ep.residual == y);
  if (int64_t(k.splits) * g.groups > 65535) c.Invalid("groups x K splits exceed 65535 blocks");
  return k;
}

// Runs launch(kernel epilogue) between y's start and the split epilogue when K is split.
template <typename LaunchFn>
void RunKSplit(GpuStream& s, const KSplit& k, const ConvGeometry& g, const GpuEpilogue& ep, float* y, LaunchFn&& launch) {
  if (k.splits == 1) return launch(ep);
  const size_t ohw = size_t(g.oh) * g.ow, planes = size_t(g.n) * g.c_out, count = planes * ohw;
  if (!k.residual_in_sums) s.Fill(y, 0, count * sizeof(float));
  else if (ep.residual != y)
    Launch(ConvSplitStartKernel, dim3(static_cast<unsigned>(std::min<size_t>(CeilDiv(count, 256), 4096))), dim3(256), 0, s, y,
           ep.residual, count);
  launch(GpuEpilogue{});
  GpuEpilogue after = ep;
  if (k.residual_in_sums) after.residual = nullptr;
  Launch(ConvSplitEpilogueKernel, dim3(CeilDiv(ohw, 256), static_cast<unsigned>(std::min<size_t>(planes, 65535))), dim3(256),
         0, s, y, planes, static_cast<int>(ohw), g.c_out, after);
}

// The pipelined kernel's grid: output tiles x (groups x K splits).
template <int kWarpsM>
struct PipeGrid {
  dim3 grid;
  KSplit k;
  PipeGrid(const GpuOpCall& c, const GpuDeviceInfo& d, const ConvGeometry& g, const GpuEpilogue& ep, const float* y) {
    using T = PipeTile<kWarpsM, false>;  // the block shape; copying A changes only the shared layout
    const dim3 tiles(CeilDiv(g.m, T::kBM), CeilDiv(g.cout_g, T::kBN));
    if (tiles.y > 65535) c.Invalid("cOut/groups is too large (over 65535 channel tiles)");
    k = PlanKSplit(c, d, g, ep, y, int64_t(tiles.x) * tiles.y, static_cast<int>(CeilDiv(g.k, kPipeBK)), 2);
    grid = dim3(tiles.x, tiles.y, static_cast<unsigned>(k.splits * g.groups));
  }
  // Whether a 1x1 conv's grid leaves over half the SMs idle: there the SIMT kernel's 64 x 64 tiles
  // (4x the blocks) with bf16 operands ran faster on an H200 (ResNet-50 and MobileNetV2 1x1s at
  // batch 1, 2-50 blocks: 1.19-2.05x; MobileNetV2's project at batch 8, 24 blocks: 1.29x; ResNet-50
  // bf16 session at batch 1: 1.668 -> 1.537 ms). KxK convs stay here: their 3x3s of 26-28 blocks
  // ran 0.92-0.93x on the SIMT kernel (its im2col gathers per FLOP), layer4's of 72 blocks 1.00x.
  bool Starves(const GpuDeviceInfo& d, const ConvGeometry& g) const {
    return g.kh * g.kw == 1 && size_t(grid.x) * grid.y * grid.z * 2 < size_t(std::max(d.multiprocessors, 1));
  }
};

template <int kWarpsM>
void LaunchPipe(GpuStream& s, const PipeGrid<kWarpsM>& pg, const float* x, const uint16_t* w16, float* y, const ConvGeometry& g,
                const GpuEpilogue& ep) {
  const bool copy_a = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 && g.oh == g.h &&
                      g.ow == g.w && size_t(g.oh) * g.ow % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const KSplit& k = pg.k;
  RunKSplit(s, k, g, ep, y, [&](const GpuEpilogue& kernel_ep) {
    if (copy_a)
      Launch(ConvMmaPipeKernel<kWarpsM, true>, pg.grid, dim3(kPipeThreads), PipeTile<kWarpsM, true>::kSharedBytes, s, x, w16, y,
             g, kernel_ep, k.splits, k.tiles_per_split);
    else
      Launch(ConvMmaPipeKernel<kWarpsM, false>, pg.grid, dim3(kPipeThreads), PipeTile<kWarpsM, false>::kSharedBytes, s, x, w16,
             y, g, kernel_ep, k.splits, k.tiles_per_split);
  });
}

// The pipelined kernel unless its grid starves the device (`simt` = 2, force, asks for tensor cores
// wherever they run); false: the caller runs the SIMT kernel.
template <int kWarpsM>
bool TryPipe(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c, bool force, const float* x, const uint16_t* w16, float* y,
             const ConvGeometry& g, const GpuEpilogue& ep) {
  const PipeGrid<kWarpsM> pg(c, d, g, ep, y);
  if (!force && pg.Starves(d, g)) return false;
  LaunchPipe(s, pg, x, w16, y, g, ep);
  return true;
}

// Buffers: 0 x [n, cIn, h, w], 1 weights [cOut, cIn/groups, kh, kw] (float32, or bf16 bits when
// bf16), 2 bias [cOut], 3 y [n, cOut, oh, ow], 4 residual like y (when residual = 1).
void ConvOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  ConvGeometry g{};
  const int64_t n = c.Int("n"), c_in = c.Int("cIn", 1), h = c.Int("h", 1), w = c.Int("w", 1);
  const int64_t c_out = c.Int("cOut", 1), groups = c.Int("groups", 1, 65535);
  int64_t kh, kw, oh, ow, v[8];
  ReadWindow(c, h, w, &kh, &kw, &oh, &ow, v);
  if (c_in % groups || c_out % groups) c.Invalid("groups must divide cIn and cOut");
  // simt: 0 chooses, 1 runs the SIMT kernel even where tensor cores would, 2 keeps tensor cores on
  // grids too small for them (tests reach the pipelined kernel's tile edges so).
  const int64_t simt_mode = c.IntOr("simt", 0, 0, 2);
  const bool bf16 = c.IntOr("bf16", 0, 0, 1) != 0, simt = simt_mode == 1;
  const bool residual = c.IntOr("residual", 0, 0, 1) != 0;
  const int64_t cin_g = c_in / groups, k = cin_g * kh * kw;
  if (k > INT32_MAX || c.Count({n, oh, ow}) > size_t(INT32_MAX) || c.Count({c_in, h, w}) > size_t(INT32_MAX))
    c.Invalid("n*oh*ow, cIn*h*w and cIn/groups*kh*kw must fit in int32");
  const size_t x_count = c.Count({n, c_in, h, w}), y_count = c.Count({n, c_out, oh, ow});
  const float* x = c.Buffer<float>(0, x_count, "x");
  const size_t w_count = c.Count({c_out, k});
  const void* weights = bf16 ? static_cast<const void*>(c.Buffer<uint16_t>(1, w_count, "weights"))
                             : static_cast<const void*>(c.Buffer<float>(1, w_count, "weights"));
  GpuEpilogue ep = GpuEpilogueParams(c);
  ep.bias = c.Buffer<float>(2, c_out, "bias");
  float* y = c.Buffer<float>(3, y_count, "y");
  if (residual) ep.residual = c.Buffer<float>(4, y_count, "residual");
  g.n = static_cast<int>(n); g.c_in = static_cast<int>(c_in); g.h = static_cast<int>(h); g.w = static_cast<int>(w);
  g.c_out = static_cast<int>(c_out); g.oh = static_cast<int>(oh); g.ow = static_cast<int>(ow);
  g.kh = static_cast<int>(kh); g.kw = static_cast<int>(kw);
  g.sh = static_cast<int>(v[0]); g.sw = static_cast<int>(v[1]); g.dh = static_cast<int>(v[2]); g.dw = static_cast<int>(v[3]);
  g.pt = static_cast<int>(v[4]); g.pl = static_cast<int>(v[5]);
  g.groups = static_cast<int>(groups); g.cin_g = static_cast<int>(cin_g); g.cout_g = static_cast<int>(c_out / groups);
  g.k = static_cast<int>(k); g.m = static_cast<int>(n * oh * ow);
  if (y_count == 0) return;
  if (cin_g == 1) {
    const size_t shared = DepthwiseShared(g.kh, g.kw, g.sh, g.sw, g.dh, g.dw) * sizeof(float);
    if (shared > d.shared_per_block && shared > 48 * 1024) c.Invalid("the depthwise window (kernel, stride, dilation) needs more shared memory than the device has");
    const dim3 grid(CeilDiv(g.ow, kDwTileW) * CeilDiv(g.oh, kDwTileH), static_cast<unsigned>(std::min<int64_t>(n * c_out, 65535)));
    if (bf16) Launch(ConvDepthwiseKernel<true>, grid, dim3(kDwTileW, kDwThreadsY), shared, s, x, weights, y, g, ep);
    else Launch(ConvDepthwiseKernel<false>, grid, dim3(kDwTileW, kDwThreadsY), shared, s, x, weights, y, g, ep);
    return;
  }
  const bool mma = bf16 && !simt && ComputeCapability(d) >= 80;
  const uint16_t* w16 = static_cast<const uint16_t*>(weights);
  // 256 x 64 blocks for groups of <= 64 channels where the device has the shared memory for them.
  const int warps_m = g.cout_g <= 64 && PipeTile<4, true>::kSharedBytes <= d.shared_per_block ? 4 : 2;
  if (mma && g.k % 8 == 0 && reinterpret_cast<uintptr_t>(w16) % 16 == 0 && PipeTile<2, true>::kSharedBytes <= d.shared_per_block) {
    const bool force = simt_mode == 2;
    if (warps_m == 4 ? TryPipe<4>(s, d, c, force, x, w16, y, g, ep) : TryPipe<2>(s, d, c, force, x, w16, y, g, ep)) return;
  } else if (mma) {
    // 128-channel tiles wherever a group has that many: on an H200 they beat 64 x 64 at every
    // ResNet-50 shape, even layer4's, whose grid they halve to 28 blocks (6.9 vs 5.1 TFLOP/s).
    const bool w = g.cout_g >= 128;
    const dim3 grid(CeilDiv(g.m, 64), CeilDiv(g.cout_g, w ? 128 : 64), g.groups);
    if (grid.y > 65535) c.Invalid("cOut/groups is too large (over 65535 tiles of 64 channels)");
    if (w) Launch(ConvMmaBf16Kernel<2, 4>, grid, dim3(256), 0, s, x, w16, y, g, ep);
    else Launch(ConvMmaBf16Kernel<2, 2>, grid, dim3(128), 0, s, x, w16, y, g, ep);
    return;
  }
  const dim3 tiles_grid(CeilDiv(g.m, 16 * kSimtT), CeilDiv(g.cout_g, 16 * kSimtT));
  if (tiles_grid.y > 65535) c.Invalid("cOut/groups is too large (over 65535 tiles of 64 channels)");
  const KSplit ks = PlanKSplit(c, d, g, ep, y, int64_t(tiles_grid.x) * tiles_grid.y, static_cast<int>(CeilDiv(g.k, kSimtBK)), 1);
  const dim3 grid(tiles_grid.x, tiles_grid.y, static_cast<unsigned>(ks.splits * g.groups));
  RunKSplit(s, ks, g, ep, y, [&](const GpuEpilogue& kernel_ep) {
    if (bf16) Launch(ConvSimtKernel<true>, grid, dim3(kSimtThreads), 0, s, x, weights, y, g, kernel_ep, ks.splits, ks.tiles_per_split);
    else Launch(ConvSimtKernel<false>, grid, dim3(kSimtThreads), 0, s, x, weights, y, g, kernel_ep, ks.splits, ks.tiles_per_split);
  });
}

// Buffers: 0 x [planes, h, w], 1 y [planes, oh, ow] (global: [planes]). kind: PoolKind.
void PoolOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, 2));
  const int64_t planes = c.Int("planes"), h = c.Int("h", 1), w = c.Int("w", 1);
  const float* x = c.Buffer<float>(0, c.Count({planes, h, w}), "x");
  if (kind == kPoolGlobalAverage) {
    float* y = c.Buffer<float>(1, size_t(planes), "y");
    if (planes)
      Launch(GlobalAveragePoolKernel, dim3(CeilDiv(size_t(planes), kGlobalPoolWarps)), dim3(kGlobalPoolWarps * 32), 0, s, x,
             y, size_t(planes), size_t(h) * size_t(w));
    return;
  }
  int64_t kh, kw, oh, ow, v[8];
  ReadWindow(c, h, w, &kh, &kw, &oh, &ow, v);
  const size_t y_count = c.Count({planes, oh, ow});
  float* y = c.Buffer<float>(1, y_count, "y");
  PoolGeometry g{static_cast<int>(h), static_cast<int>(w), static_cast<int>(oh), static_cast<int>(ow),
                 static_cast<int>(kh), static_cast<int>(kw), static_cast<int>(v[0]), static_cast<int>(v[1]),
                 static_cast<int>(v[4]), static_cast<int>(v[5]), static_cast<int>(v[2]), static_cast<int>(v[3]),
                 static_cast<int>(c.IntOr("countIncludePad", 0, 0, 1))};
  if (oh * ow > INT32_MAX - 256) c.Invalid("oh*ow must fit in int32");
  if (y_count)
    Launch(PoolKernel, dim3(CeilDiv(size_t(oh * ow), 256), static_cast<unsigned>(std::min<int64_t>(planes, 65535))), dim3(256), 0, s,
           kind, x, y, size_t(planes), g);
}

}  // namespace

SONDE_GPU_OP("conv2d", ConvOp);
SONDE_GPU_OP("pool2d", PoolOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
