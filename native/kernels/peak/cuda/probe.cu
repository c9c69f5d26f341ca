// Ceilings the cuda bench suite reports kernels against, measured on the device itself: read
// bandwidth (a streaming reduction), the SIMT fp32 FMA rate and the mma.sync bf16 rate with
// operands in registers. Each writes one value per block so the compiler cannot drop the work.
#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

__global__ void ReadKernel(const float4* __restrict__ x, size_t count4, float* __restrict__ out) {
  float s = 0.0f;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count4; i += size_t(gridDim.x) * blockDim.x) {
    const float4 v = x[i];
    s += v.x + v.y + v.z + v.w;
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) atomicAdd(out + blockIdx.x, s);
}

// 8 independent FMA chains per thread hide the FMA latency.
__global__ void FmaKernel(int iters, float seed, float* __restrict__ out) {
  float a[8];
  for (int j = 0; j < 8; ++j) a[j] = seed + j;
  for (int i = 0; i < iters; ++i)
    for (int j = 0; j < 8; ++j) a[j] = fmaf(a[j], 0.999f, 0.001f);
  float s = 0.0f;
  for (int j = 0; j < 8; ++j) s += a[j];
  if (s == 12345.678f) out[blockIdx.x] = s;  // never true in practice; keeps the chains live
}

// 4 independent accumulators per warp keep the tensor cores' pipeline full.
__global__ void MmaKernel(int iters, float* __restrict__ out) {
  uint32_t a[4] = {threadIdx.x, threadIdx.x + 1, threadIdx.x + 2, threadIdx.x + 3}, b[2] = {threadIdx.x, threadIdx.x + 5};
  float acc[4][4] = {};
  for (int i = 0; i < iters; ++i)
    for (int j = 0; j < 4; ++j) MmaBf16(acc[j], a, b);
  float s = 0.0f;
  for (int j = 0; j < 4; ++j) s += acc[j][0] + acc[j][1] + acc[j][2] + acc[j][3];
  if (s == 12345.678f) out[blockIdx.x] = s;
}

void ProbeRead(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const size_t count4 = c.Count({c.Int("count4", 1, INT64_C(1) << 36)});
  const float4* x = c.Buffer<float4>(0, count4, "x");
  const unsigned blocks = static_cast<unsigned>(d.multiprocessors > 0 ? d.multiprocessors * 4 : 4);
  float* out = c.Buffer<float>(1, blocks, "out");
  Launch(ReadKernel, dim3(blocks), dim3(512), 0, s, x, count4, out);
}

void ProbeFma(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t blocks = c.Int("blocks", 1, 1 << 20), iters = c.Int("iters", 1, 1 << 24);
  float* out = c.Buffer<float>(0, blocks, "out");
  Launch(FmaKernel, dim3(blocks), dim3(256), 0, s, static_cast<int>(iters), 1.0f, out);
}

void ProbeMma(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  if (ComputeCapability(d) < 80) c.Invalid("mma.sync bf16 needs compute capability 8.0");
  const int64_t blocks = c.Int("blocks", 1, 1 << 20), iters = c.Int("iters", 1, 1 << 24);
  float* out = c.Buffer<float>(0, blocks, "out");
  Launch(MmaKernel, dim3(blocks), dim3(128), 0, s, static_cast<int>(iters), out);
}

}  // namespace

SONDE_GPU_OP("probe_read", ProbeRead);
SONDE_GPU_OP("probe_fma", ProbeFma);
SONDE_GPU_OP("probe_mma", ProbeMma);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
