// Kernels that pin down the execution model the emulator implements: warp shuffles with widths,
// votes, block barriers with predicates, static and dynamic shared memory, and the mma fragment
// layouts. test/cuda/emulator.test.ts checks their outputs against hand-derived expectations on the
// emulator and, where a GPU is present, on the GPU: the same expectations holding on both is what
// makes the emulator's verdict on the other kernels worth having.
#include "runtime/cuda/dialect.h"

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
void Misuse(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, 3));
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

}  // namespace SONDE_GPU_NS
}  // namespace sonde
