// The Hopper (sm_90a) part of the GPU dialect (runtime/cuda/dialect.h): what a kernel built around
// wgmma needs, each with a hardware form (inline PTX) and an emulated one that computes what the PTX
// ISA documents, so a kernel that gets a layout, a swizzle or a phase wrong fails its emulated test.
// Only the sources that use it include it (gemm, the selftests); CMake compiles those additionally
// for sm_90a (-gencode=arch=compute_90a,code=sm_90a).
//
//   mbarrier     MbarInit / MbarInitFence / MbarArrive / MbarArriveExpectTx / MbarWait (parity):
//                a 64-bit barrier in shared memory whose phase completes when the expected arrivals
//                have arrived and the expected transaction bytes (tensor copies) have landed.
//   tensor copy  TmaMap2d (host-encoded with EncodeTmaMap2d) + TmaLoad2d: a 2-D box of 16-bit
//                elements from global into shared memory through the copy engine, zero-filled out
//                of bounds, optionally 128B/64B/32B swizzled, completing bytes on an mbarrier.
//   wgmma        WgmmaDescriptor, WgmmaFence / WgmmaCommit / WgmmaWait<N>, WgmmaBf16/F16<N, kTransB>:
//                m64nNk16 with fp32 accumulators, A and B from shared memory through descriptors.
//   misc         FenceProxyAsync (ordinary shared stores -> async-proxy readers), SetMaxNReg.
//
// Code that uses these goes under `#if SONDE_GPU_SM90A` (true on the emulator and in nvcc's sm_90a
// device pass), with a fallback (usually __trap()) for the other passes; host code checks that the
// device is cc 9.0 and the sm_90a image was loaded before launching it.
//
// What the emulator cannot show here: the asynchrony. A wgmma reads its operands and a tensor copy
// writes shared memory when issued, so a kernel that frees a stage before WgmmaWait, or reads
// accumulators before it, passes here and fails on the GPU; the barrier protocol must be right by
// construction (see the GEMM's comments).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "runtime/cuda/dialect.h"

#if SONDE_GPU_EMULATED || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define SONDE_GPU_SM90A 1
#else
#define SONDE_GPU_SM90A 0
#endif

#if !SONDE_GPU_EMULATED
#include <cuda.h>  // CUtensorMap and the encoder's types only; the function comes from the driver at run time
#endif

namespace sonde {
namespace SONDE_GPU_NS {

// Swizzle modes with their descriptor codes (wgmma) and span in bytes: the 16-byte chunk j of a
// span-byte row lands at chunk j ^ (address bits 7.. of the row), i.e. Swizzle<3,4,3> (128B),
// <2,4,3> (64B), <1,4,3> (32B) on the shared address, per the PTX ISA's canonical layouts.
enum class Swizzle : int { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };
inline int SwizzleSpan(Swizzle s) { return s == Swizzle::k128B ? 128 : s == Swizzle::k64B ? 64 : s == Swizzle::k32B ? 32 : 16; }

// Whether `kernel` (a kernel of the calling source file) runs its sm_90a code on this device: on
// the emulator always; on a GPU when it is cc 9.0 (sm_90a code runs on nothing else), CMake built
// the file with an sm_90a image (SONDE_CUDA_SM90A) and that image is the one the driver loaded.
template <typename Kernel>
inline bool Sm90aImageLoaded(const GpuDeviceInfo& d, Kernel kernel) {
#if SONDE_GPU_EMULATED
  (void)d, (void)kernel;
  return true;
#elif defined(SONDE_CUDA_SM90A)
  if (ComputeCapability(d) != 90) return false;
  cudaFuncAttributes attr{};
  const bool ok = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)) == cudaSuccess && attr.binaryVersion == 90;
  cudaGetLastError();
  return ok;
#else
  (void)d, (void)kernel;
  return false;
#endif
}

// ------------------------------------------------------------------ shared addresses ----
#if SONDE_GPU_EMULATED
// The emulator's shared window is the launch's dynamic shared memory (1024-aligned); static
// __shared__ variables are not addressable by descriptors or copies here.
inline uint32_t SharedAddress(const void* p) {
  const unsigned char* base = emu::detail::DynamicShared();
  const unsigned char* q = static_cast<const unsigned char*>(p);
  if (!base || q < base || q - base >= (1 << 18)) __trap();
  return static_cast<uint32_t>(q - base);
}
namespace detail {
inline unsigned char* SharedAt(uint32_t addr) { return emu::detail::DynamicShared() + addr; }
}  // namespace detail
#else
__device__ __forceinline__ uint32_t SharedAddress(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// Rounds a dynamic shared memory pointer up to 1024 bytes (the 128B swizzle pattern's period);
// allocate 1024 bytes more than the layout needs.
__device__ __forceinline__ unsigned char* AlignShared1024(unsigned char* p) {
  const uint32_t a = SharedAddress(p);
  return p + ((1024 - (a & 1023)) & 1023);
}

// ------------------------------------------------------------------------- mbarrier ----
#if SONDE_GPU_EMULATED
namespace detail {
// The emulated state in the barrier's 8 bytes: low word the pending transaction bytes (signed),
// high word arrivals pending (bits 0-14), expected (15-29), bit 30 clear once initialised (fresh
// emulated shared memory is 0xff), bit 31 the current phase's parity.
struct MbarState {
  int32_t tx;
  uint32_t pending, expected, phase;
};
inline MbarState MbarLoad(const uint64_t* bar) {
  uint64_t v;
  std::memcpy(&v, bar, 8);
  const uint32_t hi = static_cast<uint32_t>(v >> 32);
  if (hi & (1u << 30)) __trap();  // used before MbarInit
  return {static_cast<int32_t>(static_cast<uint32_t>(v)), hi & 0x7fff, (hi >> 15) & 0x7fff, hi >> 31};
}
inline void MbarStore(uint64_t* bar, MbarState s) {
  if (s.pending == 0 && s.tx == 0) {  // the phase completes
    s.phase ^= 1;
    s.pending = s.expected;
  }
  const uint64_t v = (uint64_t(s.pending | (s.expected << 15) | (s.phase << 31)) << 32) | static_cast<uint32_t>(s.tx);
  std::memcpy(bar, &v, 8);
}
inline void MbarCompleteTx(uint64_t* bar, uint32_t bytes) {
  MbarState s = MbarLoad(bar);
  s.tx -= static_cast<int32_t>(bytes);
  MbarStore(bar, s);
}
struct MbarWaitArg {
  const uint64_t* bar;
  uint32_t parity;
};
inline bool MbarPhaseDone(const void* p) {
  const MbarWaitArg* w = static_cast<const MbarWaitArg*>(p);
  return MbarLoad(w->bar).phase != w->parity;
}
}  // namespace detail
inline void MbarInit(uint64_t* bar, uint32_t count) {
  if (count == 0 || count > 0x7fff) __trap();
  const uint64_t v = uint64_t(count | (count << 15)) << 32;
  std::memcpy(bar, &v, 8);
}
inline void MbarInitFence() {}
inline void MbarArrive(uint64_t* bar) {
  detail::MbarState s = detail::MbarLoad(bar);
  if (s.pending == 0) __trap();
  --s.pending;
  detail::MbarStore(bar, s);
}
inline void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  detail::MbarState s = detail::MbarLoad(bar);
  if (s.pending == 0) __trap();
  s.tx += static_cast<int32_t>(bytes);
  --s.pending;
  detail::MbarStore(bar, s);
}
// Returns once the phase of the given parity has completed: a fresh barrier is in phase 0, so
// waiting for parity 1 passes at once (the "previous phase" is complete).
inline void MbarWait(uint64_t* bar, uint32_t parity) {
  const detail::MbarWaitArg arg{bar, parity & 1};
  emu::detail::WaitUntil(detail::MbarPhaseDone, &arg, "an mbarrier phase");
}
#else
__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SharedAddress(bar)), "r"(count) : "memory");
}
// Makes initialised barriers visible to the copy engine (the async proxy); a __syncthreads after it
// makes them visible to the block.
__device__ __forceinline__ void MbarInitFence() {
#if SONDE_GPU_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SharedAddress(bar)) : "memory");
}
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
#if SONDE_GPU_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SharedAddress(bar)), "r"(bytes) : "memory");
#else
  __trap();
#endif
}
// On a GPU a phase that never completes (a protocol bug) traps after about 2^35 cycles (some
// seconds) instead of hanging the device: the launch then fails with an error at Synchronize().
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
#if SONDE_GPU_SM90A
  const uint32_t addr = SharedAddress(bar);
  uint32_t done = 0;
  long long start = 0;
  for (;;) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(addr), "r"(parity & 1) : "memory");
    if (done) break;
    const long long now = clock64();
    if (start == 0) start = now;
    else if (now - start > (1ll << 35)) __trap();
  }
#else
  __trap();
#endif
}
#endif

// -------------------------------------------------------------- tensor copies (TMA) ----
// A row-major matrix of 16-bit elements, `rows` x `cols` with rows `row_bytes` apart, copied in
// boxes of box_rows x box_cols; with a swizzle the box's row (box_cols * 2 bytes) must equal its span.
#if SONDE_GPU_EMULATED
struct TmaMap2d {
  const unsigned char* base;
  uint64_t cols, rows, row_bytes;
  uint32_t box_cols, box_rows;
  Swizzle swizzle;
};
#else
using TmaMap2d = CUtensorMap;
#endif

// Fills *map; an empty string, or what the driver (or the emulator's same checks) rejected.
inline std::string EncodeTmaMap2d(TmaMap2d* map, const void* base, uint64_t rows, uint64_t cols, uint64_t row_bytes,
                                  uint32_t box_rows, uint32_t box_cols, Swizzle swizzle) {
  if ((reinterpret_cast<uintptr_t>(base) & 15) || (row_bytes & 15) || row_bytes >= (uint64_t(1) << 40))
    return "the tensor copy needs a 16-byte aligned base and row stride";
  if (rows == 0 || cols == 0 || rows > (uint64_t(1) << 32) || cols > (uint64_t(1) << 32))
    return "the tensor copy needs 1..2^32 rows and columns";
  if (box_rows == 0 || box_rows > 256 || box_cols == 0 || box_cols > 256 || (box_cols * 2) % 16)
    return "the tensor copy's box must be 1..256 by 1..256 with rows a multiple of 16 bytes";
  if (swizzle != Swizzle::kNone && box_cols * 2 != static_cast<uint32_t>(SwizzleSpan(swizzle)))
    return "a swizzled tensor copy's box rows must span the swizzle";
#if SONDE_GPU_EMULATED
  *map = TmaMap2d{static_cast<const unsigned char*>(base), cols, rows, row_bytes, box_cols, box_rows, swizzle};
  return {};
#else
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                              const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  // The runtime hands out the driver's entry point, so nothing links against libcuda.
  static const Encode encode = []() -> Encode {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<Encode>(fn);
  }();
  if (!encode) return "the driver has no cuTensorMapEncodeTiled";
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapSwizzle sw = swizzle == Swizzle::k128B ? CU_TENSOR_MAP_SWIZZLE_128B
                                : swizzle == Swizzle::k64B ? CU_TENSOR_MAP_SWIZZLE_64B
                                : swizzle == Swizzle::k32B ? CU_TENSOR_MAP_SWIZZLE_32B
                                                           : CU_TENSOR_MAP_SWIZZLE_NONE;
  // OOB_FILL_NONE fills out-of-bounds elements with zeros, which is what edge tiles rely on.
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(base), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r));
  return {};
#endif
}

// Copies the box whose top-left element is (row, col) of the map (either may be negative or run
// past the end: those elements read as zero) to dst (shared, 128-byte aligned; 1024 for the
// 128B swizzle pattern to start at the box), swizzled per the map, and completes the box's bytes
// on bar. One thread issues it. col must be a multiple of 8 (the box starts on a 16-byte boundary
// of its row, as the copy engine requires: on an H200 any other column raises an illegal
// instruction that ends the context).
inline bool TmaColumnAligned(int col) { return (col & 7) == 0; }
#if SONDE_GPU_EMULATED
inline void TmaLoad2d(void* dst, const TmaMap2d* map, int col, int row, uint64_t* bar) {
  const uint32_t d = SharedAddress(dst);
  if ((d & 127) || !TmaColumnAligned(col)) __trap();
  const uint32_t row_bytes = map->box_cols * 2, span = static_cast<uint32_t>(SwizzleSpan(map->swizzle));
  for (uint32_t r = 0; r < map->box_rows; ++r) {
    for (uint32_t c = 0; c < map->box_cols; ++c) {
      const int64_t gr = int64_t(row) + r, gc = int64_t(col) + c;
      uint16_t v = 0;
      if (gr >= 0 && gc >= 0 && uint64_t(gr) < map->rows && uint64_t(gc) < map->cols)
        std::memcpy(&v, map->base + uint64_t(gr) * map->row_bytes + uint64_t(gc) * 2, 2);
      uint32_t addr = d + r * row_bytes + c * 2;
      if (map->swizzle != Swizzle::kNone) addr ^= ((addr >> 7) & (span / 16 - 1)) << 4;
      std::memcpy(detail::SharedAt(addr), &v, 2);
    }
  }
  detail::MbarCompleteTx(bar, map->box_rows * row_bytes);
}
#else
__device__ __forceinline__ void TmaLoad2d(void* dst, const TmaMap2d* map, int col, int row, uint64_t* bar) {
#if SONDE_GPU_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(SharedAddress(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(SharedAddress(bar))
      : "memory");
#else
  __trap();
#endif
}
#endif

// Orders this thread's earlier ordinary shared-memory writes before later reads by the async proxy
// (wgmma operands, tensor copies); each writing thread runs it before the barrier that publishes.
__device__ __forceinline__ void FenceProxyAsync() {
#if !SONDE_GPU_EMULATED && SONDE_GPU_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Register budget per thread of a warpgroup (all its threads run it); takes effect only in a kernel
// with a register cap at entry (__launch_bounds__(threads, 1)).
template <int kRegs>
__device__ __forceinline__ void SetMaxNRegDec() {
#if !SONDE_GPU_EMULATED && SONDE_GPU_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void SetMaxNRegInc() {
#if !SONDE_GPU_EMULATED && SONDE_GPU_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// --------------------------------------------------------------------------- wgmma ----
// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading and
// stride byte offsets (LBO, SBO; each encoded >> 4 in 14 bits), base offset 0 (the pattern starts
// 1024-aligned), swizzle mode. For 16-bit elements (T = 8 per 16 bytes) the canonical layouts give
// the byte offset of element (i along M or N, j along K) before the swizzle:
//   K-major, swizzled (span S):   (i % 8) * S + (i / 8) * SBO + j * 2                (LBO unused)
//   K-major, none:                (i % 8) * 16 + (i / 8) * SBO + (j % 8) * 2 + (j / 8) * LBO
//   MN-major, swizzled (span S):  (i % (S/2)) * 2 + (i / (S/2)) * LBO + (j % 8) * S + (j / 8) * SBO
//   MN-major, none:               (i % 8) * 2 + (i / 8) * SBO + (j % 8) * 16 + (j / 8) * LBO
// A is K-major ([m][k] rows); B is K-major ([n][k], "col" B) or, with kTransB, MN-major ([k][n]).
__device__ __forceinline__ uint64_t WgmmaDescriptor(const void* smem, uint32_t lbo, uint32_t sbo, Swizzle swizzle) {
  const uint64_t addr = (SharedAddress(smem) & 0x3ffff) >> 4;
  return addr | (uint64_t((lbo & 0x3ffff) >> 4) << 16) | (uint64_t((sbo & 0x3ffff) >> 4) << 32) |
         (uint64_t(static_cast<int>(swizzle)) << 62);
}

#if SONDE_GPU_EMULATED
namespace detail {
// The shared address of element (i, j) of a descriptor's matrix, per the table above.
inline uint32_t WgmmaElementAddress(uint64_t desc, bool mn_major, int i, int j) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4, lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
  if ((desc >> 49) & 7) __trap();  // base offsets are not emulated
  const Swizzle sw = static_cast<Swizzle>(desc >> 62);
  const uint32_t span = static_cast<uint32_t>(SwizzleSpan(sw)), ui = uint32_t(i), uj = uint32_t(j);
  uint32_t off;
  if (!mn_major) {
    off = sw == Swizzle::kNone ? (ui % 8) * 16 + (ui / 8) * sbo + (uj % 8) * 2 + (uj / 8) * lbo
                               : (ui % 8) * span + (ui / 8) * sbo + uj * 2;
  } else {
    off = sw == Swizzle::kNone ? (ui % 8) * 2 + (ui / 8) * sbo + (uj % 8) * 16 + (uj / 8) * lbo
                               : (ui % (span / 2)) * 2 + (ui / (span / 2)) * lbo + (uj % 8) * span + (uj / 8) * sbo;
  }
  uint32_t addr = start + off;
  if (sw != Swizzle::kNone) addr ^= ((addr >> 7) & (span / 16 - 1)) << 4;
  return addr;
}
template <int N, bool kTransB, typename Elem>
inline void EmulatedWgmma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N is a multiple of 8 up to 256");
  __syncwarp();  // .sync.aligned: the warp (and its warpgroup) issues it together
  // Thread t of the warpgroup holds D rows 16 (t / 32) + (t % 32) / 4 + {0, 8} and columns
  // 8 i + 2 (t % 4) + {0, 1}: d[4 i + 2 h + e] = D[row h][column e] (PTX ISA, m64nNk16 D fragment).
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned t = tid % 128, lane = t % 32;
  const int row0 = static_cast<int>(16 * (t / 32) + lane / 4), col0 = static_cast<int>(2 * (lane % 4));
  const auto at = [](uint32_t addr) {
    uint16_t v;
    std::memcpy(&v, SharedAt(addr), 2);
    return Elem::Get(v);
  };
  float a[2][16];
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k) a[h][k] = at(WgmmaElementAddress(desc_a, false, row0 + 8 * h, k));
  for (int i = 0; i < N / 8; ++i) {
    for (int e = 0; e < 2; ++e) {
      float b[16];
      for (int k = 0; k < 16; ++k) b[k] = at(WgmmaElementAddress(desc_b, kTransB, 8 * i + col0 + e, k));
      for (int h = 0; h < 2; ++h) {
        float s = d[4 * i + 2 * h + e];
        for (int k = 0; k < 16; ++k) s += a[h][k] * b[k];
        d[4 * i + 2 * h + e] = s;
      }
    }
  }
}
}  // namespace detail
inline void WgmmaFence() {}
inline void WgmmaCommit() {}
template <int kPending>
inline void WgmmaWait() {}
template <int K>
inline void WgmmaFenceOperands(float (&)[K]) {}
template <int N, bool kTransB>
inline void WgmmaBf16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  detail::EmulatedWgmma<N, kTransB, detail::Bf16Elem>(d, desc_a, desc_b);
}
template <int N, bool kTransB>
inline void WgmmaF16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  detail::EmulatedWgmma<N, kTransB, detail::F16Elem>(d, desc_a, desc_b);
}
#else
// Orders register accesses to the accumulators before the next wgmma reads them (all threads).
__device__ __forceinline__ void WgmmaFence() {
#if SONDE_GPU_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#if SONDE_GPU_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending committed groups are in flight; follow with WgmmaFenceOperands
// before reading the accumulators so the compiler cannot hoist those reads above the wait.
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
#if SONDE_GPU_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
template <int K>
__device__ __forceinline__ void WgmmaFenceOperands(float (&d)[K]) {
SONDE_UNROLL
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define SONDE_WGMMA_D8(b) "+f"(d[b + 0]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), \
                          "+f"(d[b + 4]), "+f"(d[b + 5]), "+f"(d[b + 6]), "+f"(d[b + 7])
#define SONDE_WGMMA_D64(b) SONDE_WGMMA_D8(b), SONDE_WGMMA_D8(b + 8), SONDE_WGMMA_D8(b + 16), SONDE_WGMMA_D8(b + 24), \
                           SONDE_WGMMA_D8(b + 32), SONDE_WGMMA_D8(b + 40), SONDE_WGMMA_D8(b + 48), SONDE_WGMMA_D8(b + 56)
namespace detail {
template <bool kTransB, bool kBf16>
__device__ __forceinline__ void Wgmma256(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
#if SONDE_GPU_SM90A
  // Operands %0..%127 are the accumulators, %128 / %129 the descriptors; scale-d 1 (D += A B),
  // scale-a/b 1, A K-major (trans-a 0), B per kTransB.
#define SONDE_WGMMA_ACC                                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, "  \
  "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "  \
  "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, " \
  "%106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "      \
  "%123, %124, %125, %126, %127}"
  if constexpr (kBf16) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " SONDE_WGMMA_ACC ", %128, %129, 1, 1, 1, 0, %130;\n"
                 : SONDE_WGMMA_D64(0), SONDE_WGMMA_D64(64)
                 : "l"(desc_a), "l"(desc_b), "n"(kTransB ? 1 : 0));
  } else {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " SONDE_WGMMA_ACC ", %128, %129, 1, 1, 1, 0, %130;\n"
                 : SONDE_WGMMA_D64(0), SONDE_WGMMA_D64(64)
                 : "l"(desc_a), "l"(desc_b), "n"(kTransB ? 1 : 0));
  }
#undef SONDE_WGMMA_ACC
#else
  __trap();
#endif
}
}  // namespace detail
// D (64 x N fp32, the m64nNk16 fragment: see EmulatedWgmma) += A (64 x 16) . B (16 x N). N = 256
// on hardware (the one shape the kernels use); the emulator takes any N.
template <int N, bool kTransB>
__device__ __forceinline__ void WgmmaBf16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(N == 256, "hardware wgmma is instantiated for N = 256 only");
  detail::Wgmma256<kTransB, true>(d, desc_a, desc_b);
}
template <int N, bool kTransB>
__device__ __forceinline__ void WgmmaF16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(N == 256, "hardware wgmma is instantiated for N = 256 only");
  detail::Wgmma256<kTransB, false>(d, desc_a, desc_b);
}
#undef SONDE_WGMMA_D64
#undef SONDE_WGMMA_D8
#endif

}  // namespace SONDE_GPU_NS
}  // namespace sonde
