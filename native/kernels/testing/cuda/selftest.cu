// Kernels that pin down the execution model the emulator implements: warp shuffles with widths,
// votes, block barriers with predicates, static and dynamic shared memory, the mma fragment
// layouts, and Hopper's mbarrier phases, tensor copies (swizzle, zero fill) and wgmma (descriptors,
// shared-memory layouts, D fragment). test/cuda/emulator.test.ts checks their outputs against hand-derived expectations on the
// emulator and, where a GPU is present, on the GPU: the same expectations holding on both is what
// makes the emulator's verdict on the other kernels worth having.
#include "runtime/cuda/dialect.h"
#include "runtime/cuda/dialect_sm90.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

// out[tid * 8 + j]: j = 0 shfl_xor(tid, 5, width 16), 1 shfl_down(tid, 3, 16), 2 shfl_up(tid, 2, 8),
// 3 shfl(tid, lane 7 within 16), 4 ballot(tid odd), 5 any(tid == 37), 6 all(tid < 64), 7 lane id.
__global__ void WarpOpsKernel(int* out) {
  const int tid = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  int* o = out + tid * 8;
  o[0] = __shfl_xor_sync(0xffffffffu, tid, 5, 16);
  o[1] = __shfl_down_sync(0xffffffffu, tid, 3, 16);
  o[2] = __shfl_up_sync(0xffffffffu, tid, 2, 8);
  o[3] = __shfl_sync(0xffffffffu, tid, 7, 16);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, tid & 1));
  o[5] = __any_sync(0xffffffffu, tid == 37);
  o[6] = __all_sync(0xffffffffu, tid < 64);
  o[7] = static_cast<int>(threadIdx.x % 32);
}

// Per block: out[block * 4 + 0] = sum of in over the block via static shared memory,
// [1] = __syncthreads_count(in > 0), [2] = __syncthreads_and(in >= 0), [3] = __syncthreads_or(in > 100),
// and dyn_out[block * blockDim + t] = in of thread (blockDim - 1 - t) of the block via dynamic shared memory.
__global__ void BlockOpsKernel(const int* in, int* out, int* dyn_out) {
  __shared__ int sum;
  SONDE_DYNAMIC_SHARED(int, dyn);
  const unsigned t = threadIdx.x;
  const int v = in[blockIdx.x * blockDim.x + t];
  if (t == 0) sum = 0;
  __syncthreads();
  atomicAdd(&sum, v);
  dyn[t] = v;
  const int count = __syncthreads_count(v > 0);
  const int all = __syncthreads_and(v >= 0);
  const int any = __syncthreads_or(v > 100);
  if (t == 0) {
    out[blockIdx.x * 4 + 0] = sum;
    out[blockIdx.x * 4 + 1] = count;
    out[blockIdx.x * 4 + 2] = all;
    out[blockIdx.x * 4 + 3] = any;
  }
  dyn_out[blockIdx.x * blockDim.x + t] = dyn[blockDim.x - 1 - t];
}

// One warp: D (16x8, fp32 or int32) = A (16xK row-major) * B (Kx8 given as 8 rows of K, i.e. B^T
// row-major), fragments loaded as dialect.h documents. kind 0 bf16, 1 f16 (K = 16), 2 s8 (K = 32).
__global__ void MmaKernel(int kind, const void* a, const void* bt, void* d) {
  const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
  uint32_t fa[4], fb[2];
  if (kind < 2) {
    const uint16_t* A = static_cast<const uint16_t*>(a);
    const uint16_t* B = static_cast<const uint16_t*>(bt);
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r & 1) * 8, col = t * 2 + (r >> 1) * 8;
      fa[r] = uint32_t(A[row * 16 + col]) | (uint32_t(A[row * 16 + col + 1]) << 16);
    }
    for (int r = 0; r < 2; ++r) {
      const int k = t * 2 + r * 8;
      fb[r] = uint32_t(B[g * 16 + k]) | (uint32_t(B[g * 16 + k + 1]) << 16);
    }
    float acc[4] = {0, 0, 0, 0};
    if (kind == 0)
      MmaBf16(acc, fa, fb);
    else
      MmaF16(acc, fa, fb);
    float* D = static_cast<float*>(d);
    for (int i = 0; i < 4; ++i) D[(g + (i >> 1) * 8) * 8 + t * 2 + (i & 1)] = acc[i];
  } else {
    const uint8_t* A = static_cast<const uint8_t*>(a);
    const uint8_t* B = static_cast<const uint8_t*>(bt);
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r & 1) * 8, col = t * 4 + (r >> 1) * 16;
      uint32_t v = 0;
      for (int e = 0; e < 4; ++e) v |= uint32_t(A[row * 32 + col + e]) << (8 * e);
      fa[r] = v;
    }
    for (int r = 0; r < 2; ++r) {
      const int k = t * 4 + r * 16;
      uint32_t v = 0;
      for (int e = 0; e < 4; ++e) v |= uint32_t(B[g * 32 + k + e]) << (8 * e);
      fb[r] = v;
    }
    int32_t acc[4] = {0, 0, 0, 0};
    MmaS8(acc, fa, fb);
    int32_t* D = static_cast<int32_t*>(d);
    for (int i = 0; i < 4; ++i) D[(g + (i >> 1) * 8) * 8 + t * 2 + (i & 1)] = acc[i];
  }
}

// One warp: ldmatrix x4 and x4.trans of a 16x16 16-bit tile in shared memory (rows padded to 48
// bytes), lane l pointing at row l % 16, columns (l / 16) * 8: out[l][0..3] plain, [4..7] transposed.
__global__ void LdMatrixKernel(const uint16_t* in, uint32_t* out) {
  __align__(16) __shared__ uint16_t tile[16 * 24];
  for (int i = static_cast<int>(threadIdx.x); i < 256; i += 32) tile[(i / 16) * 24 + i % 16] = in[i];
  __syncwarp();
  const int l = static_cast<int>(threadIdx.x);
  uint32_t r[4], rt[4];
  const uint16_t* row = &tile[(l % 16) * 24 + (l / 16) * 8];
  LdMatrixX4(r, row);
  LdMatrixX4Trans(rt, row);
  for (int i = 0; i < 4; ++i) out[l * 8 + i] = r[i], out[l * 8 + 4 + i] = rt[i];
}

void LdMatrix(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  if (ComputeCapability(d) < 75) c.Invalid("ldmatrix needs compute capability 7.5");
  const uint16_t* in = c.Buffer<uint16_t>(0, 256, "in");
  uint32_t* out = c.Buffer<uint32_t>(1, 32 * 8, "out");
  Launch(LdMatrixKernel, dim3(1), dim3(32), 0, s, in, out);
}

void WarpOps(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t blocks = c.Int("blocks", 1, 64), threads = c.Int("threads", 32, 1024);
  if (threads % 32) c.Invalid("threads must be a multiple of 32");
  int* out = c.Buffer<int>(0, c.Count({blocks, threads, 8}), "out");
  Launch(WarpOpsKernel, dim3(blocks), dim3(threads), 0, s, out);
}

void BlockOps(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t blocks = c.Int("blocks", 1, 64), threads = c.Int("threads", 1, 1024);
  const int* in = c.Buffer<int>(0, c.Count({blocks, threads}), "in");
  int* out = c.Buffer<int>(1, c.Count({blocks, 4}), "out");
  int* dyn = c.Buffer<int>(2, c.Count({blocks, threads}), "dynOut");
  Launch(BlockOpsKernel, dim3(blocks), dim3(threads), threads * sizeof(int), s, in, out, dyn);
}

void Mma(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, 2));
  if (ComputeCapability(d) < 80) c.Invalid("mma.sync for these types needs compute capability 8.0");
  const size_t k = kind == 2 ? 32 : 16, elem = kind == 2 ? 1 : 2;
  const void* a = c.Buffer<uint8_t>(0, 16 * k * elem, "a");
  const void* bt = c.Buffer<uint8_t>(1, 8 * k * elem, "bt");
  void* out = c.Buffer<uint8_t>(2, 16 * 8 * 4, "d");
  Launch(MmaKernel, dim3(1), dim3(32), 0, s, kind, a, bt, out);
}

// One warp: lane l copies 16 bytes from src + 16 l to shared memory with cp.async, of which only
// l % 17 come from src (the rest zero-filled); out = the shared bytes after the wait.
__global__ void CpAsyncKernel(const unsigned char* src, unsigned char* out) {
  SONDE_DYNAMIC_SHARED(unsigned char, buf);
  const int l = static_cast<int>(threadIdx.x);
  CpAsync16(buf + 16 * l, src + 16 * l, l % 17);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();
  for (int i = 0; i < 16; ++i) out[16 * l + i] = buf[16 * l + i];
}

void CpAsync(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  if (ComputeCapability(d) < 80) c.Invalid("cp.async needs compute capability 8.0");
  const unsigned char* src = c.Buffer<unsigned char>(0, 512, "src");
  unsigned char* out = c.Buffer<unsigned char>(1, 512, "out");
  Launch(CpAsyncKernel, dim3(1), dim3(32), 512, s, src, out);
}

// ---- Hopper (sm_90a): the ops reject other devices ----
struct WgmmaOperand {
  int swizzle, lbo, sbo, offset;  // descriptor fields, and the start's byte offset into the image
};

// One warpgroup: the A (64x16) and B (16x256) images, laid out by the caller per the ISA's canonical
// layouts, copied into shared memory (B at the next 1024 bytes after A); one wgmma m64n256k16 from
// descriptors; D written row-major [64][256] from the fragment layout the ISA documents: thread t
// holds rows 16 (t / 32) + (t % 32) / 4 + {0, 8}, columns 8 i + 2 (t % 4) + {0, 1} in d[4 i + 2 h + e].
template <int kKind, bool kTransB>
__global__ void __launch_bounds__(128) WgmmaKernel(const unsigned char* a_img, int a_bytes,
                                                   const unsigned char* b_img, int b_bytes, WgmmaOperand ao,
                                                   WgmmaOperand bo, float* d) {
#if SONDE_GPU_SM90A
  SONDE_DYNAMIC_SHARED(unsigned char, raw);
  unsigned char* sa = AlignShared1024(raw);
  unsigned char* sb = sa + (a_bytes + 1023) / 1024 * 1024;
  const int t = static_cast<int>(threadIdx.x);
  for (int i = t; i < a_bytes; i += 128) sa[i] = a_img[i];
  for (int i = t; i < b_bytes; i += 128) sb[i] = b_img[i];
  FenceProxyAsync();
  __syncthreads();
  float acc[128];
SONDE_UNROLL
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  const uint64_t da = WgmmaDescriptor(sa + ao.offset, ao.lbo, ao.sbo, static_cast<Swizzle>(ao.swizzle));
  const uint64_t db = WgmmaDescriptor(sb + bo.offset, bo.lbo, bo.sbo, static_cast<Swizzle>(bo.swizzle));
  WgmmaFenceOperands(acc);
  WgmmaFence();
  if constexpr (kKind == 0) WgmmaBf16<256, kTransB>(acc, da, db);
  else WgmmaF16<256, kTransB>(acc, da, db);
  WgmmaCommit();
  WgmmaWait<0>();
  WgmmaFenceOperands(acc);
  const int lane = t % 32;
SONDE_UNROLL
  for (int i = 0; i < 32; ++i)
SONDE_UNROLL
    for (int h = 0; h < 2; ++h)
SONDE_UNROLL
      for (int e = 0; e < 2; ++e)
        d[(16 * (t / 32) + lane / 4 + 8 * h) * 256 + 8 * i + 2 * (lane % 4) + e] = acc[4 * i + 2 * h + e];
#else
  __trap();
#endif
}

// One tensor copy of a box_rows x box_cols box at (row0, col0) into shared memory, completed on an
// mbarrier; then the raw shared bytes of the box, as the swizzle left them, into out.
__global__ void TmaKernel(const __grid_constant__ TmaMap2d map, int row0, int col0, int box_bytes, uint16_t* out) {
#if SONDE_GPU_SM90A
  SONDE_DYNAMIC_SHARED(unsigned char, raw);
  unsigned char* box = AlignShared1024(raw);
  uint64_t* bar = reinterpret_cast<uint64_t*>(box + (box_bytes + 1023) / 1024 * 1024);
  if (threadIdx.x == 0) {
    MbarInit(bar, 1);
    MbarInitFence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    MbarArriveExpectTx(bar, static_cast<uint32_t>(box_bytes));
    TmaLoad2d(box, &map, col0, row0, bar);
  }
  MbarWait(bar, 0);
  for (int i = static_cast<int>(threadIdx.x); i < box_bytes / 2; i += static_cast<int>(blockDim.x)) {
    uint16_t v;
    memcpy(&v, box + 2 * i, 2);
    out[i] = v;
  }
#else
  __trap();
#endif
}

// Producer / consumer over two shared slots guarded by mbarriers, as the GEMM's pipeline: lane 0
// of warp 0 writes round r's value (r * r + 1) into slot r % 2 once the consumers have released it,
// the 32 lanes of warp 1 wait for it and add value * (lane + 1): out[lane] = sum over rounds.
__global__ void MbarrierKernel(int rounds, int* out) {
#if SONDE_GPU_SM90A
  __shared__ uint64_t bars[4];  // full[2], empty[2]
  __shared__ int slot[2];
  uint64_t* full = bars;
  uint64_t* empty = bars + 2;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    for (int s = 0; s < 2; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], 32);
    }
    MbarInitFence();
  }
  __syncthreads();
  if (t == 0) {
    for (int r = 0; r < rounds; ++r) {
      MbarWait(&empty[r % 2], ((r / 2) & 1) ^ 1);
      slot[r % 2] = r * r + 1;
      MbarArrive(&full[r % 2]);
    }
  } else if (t >= 32) {
    int sum = 0;
    for (int r = 0; r < rounds; ++r) {
      MbarWait(&full[r % 2], (r / 2) & 1);
      sum += slot[r % 2] * (t - 31);
      MbarArrive(&empty[r % 2]);
    }
    out[t - 32] = sum;
  }
#else
  __trap();
#endif
}

template <typename Kernel>
void NeedSm90a(const GpuDeviceInfo& d, const GpuOpCall& c, Kernel kernel) {
  if (SONDE_GPU_EMULATED) return;
  static const bool loaded = ComputeCapability(d) == 90 && Sm90aImageLoaded(d, kernel);
  if (ComputeCapability(d) != 90 || !loaded) c.Invalid("needs a compute capability 9.0 GPU and a build with sm_90a code");
}

// buffers: aImage, bImage (raw shared-memory images), d (float [64][256]). params: kind (0 bf16,
// 1 f16), transB, then per operand (a, b) swizzle (descriptor code), lbo, sbo, offset.
void Wgmma(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  NeedSm90a(d, c, WgmmaKernel<0, true>);
  const int kind = static_cast<int>(c.Int("kind", 0, 1)), trans_b = static_cast<int>(c.Int("transB", 0, 1));
  const int64_t a_bytes = c.Int("aBytes", 16, 32768), b_bytes = c.Int("bBytes", 16, 65536);
  const unsigned char* a = c.Buffer<unsigned char>(0, a_bytes, "aImage");
  const unsigned char* b = c.Buffer<unsigned char>(1, b_bytes, "bImage");
  float* out = c.Buffer<float>(2, 64 * 256, "d");
  const auto operand = [&](const char* sw, const char* lbo, const char* sbo, const char* off) {
    return WgmmaOperand{static_cast<int>(c.Int(sw, 0, 3)), static_cast<int>(c.Int(lbo, 0, 262128)),
                        static_cast<int>(c.Int(sbo, 0, 262128)), static_cast<int>(c.Int(off, 0, 65535))};
  };
  const WgmmaOperand ao = operand("aSwizzle", "aLbo", "aSbo", "aOffset");
  const WgmmaOperand bo = operand("bSwizzle", "bLbo", "bSbo", "bOffset");
  const size_t shared = size_t((a_bytes + 1023) / 1024 * 1024 + b_bytes + 1024);
  auto* kernel = kind == 0 ? (trans_b ? WgmmaKernel<0, true> : WgmmaKernel<0, false>)
                           : (trans_b ? WgmmaKernel<1, true> : WgmmaKernel<1, false>);
  Launch(kernel, dim3(1), dim3(128), shared, s, a, static_cast<int>(a_bytes), b, static_cast<int>(b_bytes), ao, bo, out);
}

// buffers: src (16-bit [rows][ld]), out (16-bit, the box's shared bytes). params: rows, cols, ld,
// boxRows, boxCols, swizzle (0 none, 1 128B, 2 64B, 3 32B), row0, col0.
void Tma(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  NeedSm90a(d, c, TmaKernel);
  const int64_t rows = c.Int("rows", 1), cols = c.Int("cols", 1), ld = c.Int("ld", cols);
  const int64_t box_rows = c.Int("boxRows", 1, 256), box_cols = c.Int("boxCols", 1, 256);
  const int swizzle = static_cast<int>(c.Int("swizzle", 0, 3));
  const int row0 = static_cast<int>(c.Int("row0", -256, INT32_MAX)), col0 = static_cast<int>(c.Int("col0", -256, INT32_MAX));
  const uint16_t* src = c.Buffer<uint16_t>(0, c.Count({rows - 1, ld}) + static_cast<size_t>(cols), "src");
  uint16_t* out = c.Buffer<uint16_t>(1, c.Count({box_rows, box_cols}), "out");
  TmaMap2d map{};
  const std::string e = EncodeTmaMap2d(&map, src, uint64_t(rows), uint64_t(cols), uint64_t(ld) * 2, uint32_t(box_rows),
                                       uint32_t(box_cols), static_cast<Swizzle>(swizzle));
  if (!e.empty()) c.Invalid(e);
  if (!TmaColumnAligned(col0)) c.Invalid("col0 must be a multiple of 8: a tensor copy's box starts on a 16-byte boundary");
  const int box_bytes = static_cast<int>(box_rows * box_cols * 2);
  Launch(TmaKernel, dim3(1), dim3(64), size_t((box_bytes + 1023) / 1024 * 1024 + 8 + 1024), s, map, row0, col0,
         box_bytes, out);
}

void Mbarrier(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  NeedSm90a(d, c, MbarrierKernel);
  const int rounds = static_cast<int>(c.Int("rounds", 0, 1000));
  int* out = c.Buffer<int>(0, 32, "out");
  Launch(MbarrierKernel, dim3(1), dim3(64), 0, s, rounds, out);
}

#if SONDE_GPU_EMULATED
// Misuse a GPU would hang on or silently survive; only the emulator can run these safely.
// Lane 0 waits for lane 1 in a warp sync while lane 1 waits for lane 0 at the block barrier.
// (A thread that exits before a __syncthreads the others reach is fine since Volta: exited
// threads do not count, so that is no deadlock on the GPU or here.)
__global__ void StuckBarrierKernel() {
  if (threadIdx.x == 0)
    __syncwarp(0x3u);
  else
    __syncthreads();
}
__global__ void ExitedLaneKernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}
// Waits for a phase of an mbarrier that nobody arrives at (its expected arrival never comes).
__global__ void StuckMbarrierKernel() {
  __shared__ uint64_t bar;
  if (threadIdx.x == 0) MbarInit(&bar, 2);
  __syncthreads();
  if (threadIdx.x == 0) MbarArrive(&bar);
  MbarWait(&bar, 0);
}
void Misuse(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, 4));
  if (kind == 4) Launch(StuckMbarrierKernel, dim3(1), dim3(32), 0, s);
  if (kind == 0) Launch(StuckBarrierKernel, dim3(1), dim3(64), 0, s);
  if (kind == 1) Launch(ExitedLaneKernel, dim3(1), dim3(32), 0, s, c.Buffer<int>(0, 32, "out"));
  if (kind == 2) Launch(StuckBarrierKernel, dim3(1), dim3(2048), 0, s);  // too many threads per block
  if (kind == 3) Launch(StuckBarrierKernel, dim3(1), dim3(32), size_t(1) << 20, s);  // too much shared memory
}
SONDE_GPU_OP("selftest_misuse", Misuse);
#endif

}  // namespace

SONDE_GPU_OP("selftest_warp", WarpOps);
SONDE_GPU_OP("selftest_block", BlockOps);
SONDE_GPU_OP("selftest_mma", Mma);
SONDE_GPU_OP("selftest_ldmatrix", LdMatrix);
SONDE_GPU_OP("selftest_cp_async", CpAsync);
SONDE_GPU_OP("selftest_wgmma", Wgmma);
SONDE_GPU_OP("selftest_tma", Tma);
SONDE_GPU_OP("selftest_mbarrier", Mbarrier);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
