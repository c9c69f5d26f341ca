// Norms, softmax and elementwise ops on the GPU (the CPU family: kernels/norm, kernels/elementwise).
// A row op gives each row one block; reductions are warp shuffles and then one warp over the
// per-warp partials, so any row length works with a fixed block of 256 threads.
#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

constexpr unsigned kRowThreads = 256;

// The sum of v over the block, returned to every thread. scratch: 32 floats of shared memory.
template <bool kMax>
__device__ __forceinline__ float BlockReduce(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : (kMax ? -INFINITY : 0.0f);
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  __syncthreads();  // scratch is reused by the caller's next reduction
  return v;
}

__global__ void __launch_bounds__(kRowThreads) RmsNormKernel(const float* __restrict__ x, const float* __restrict__ w,
                                                            float* __restrict__ y, unsigned n, float eps) {
  GridDependencyStart();
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const float* xr = x + row * n;
  float* yr = y + row * n;
  float ss = 0.0f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
  ss = BlockReduce<false>(ss, scratch);
  const float scale = rsqrtf(ss / static_cast<float>(n) + eps);
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

// Two passes over the row (mean, then centred squares) as the CPU reference does, so cancellation
// in E[x^2] - E[x]^2 cannot differ between the two.
__global__ void __launch_bounds__(kRowThreads) LayerNormKernel(const float* __restrict__ x, const float* __restrict__ gamma,
                                                              const float* __restrict__ beta, float* __restrict__ y,
                                                              unsigned n, float eps) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const float* xr = x + row * n;
  float* yr = y + row * n;
  float s = 0.0f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
  const float mean = BlockReduce<false>(s, scratch) / static_cast<float>(n);
  float v = 0.0f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = xr[i] - mean;
    v += d * d;
  }
  const float inv = rsqrtf(BlockReduce<false>(v, scratch) / static_cast<float>(n) + eps);
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) yr[i] = (xr[i] - mean) * inv * gamma[i] + beta[i];
}

__global__ void __launch_bounds__(kRowThreads) SoftmaxKernel(const float* __restrict__ x, float* __restrict__ y, unsigned n) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const float* xr = x + row * n;
  float* yr = y + row * n;
  float m = -INFINITY;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
  m = BlockReduce<true>(m, scratch);
  float s = 0.0f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = expf(xr[i] - m);
    yr[i] = e;
    s += e;
  }
  const float inv = 1.0f / BlockReduce<false>(s, scratch);
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) yr[i] *= inv;
}

// Rows of n % 4 == 0 and n <= 4 * kRowThreads * kVec: each thread keeps its kVec float4s of the row
// in registers, so the row is read from memory once (the loops above read it two or three times).
template <int kVec>
struct RowCache {
  float4 v[kVec];
  __device__ __forceinline__ void Load(const float* row, unsigned n4) {
    const float4* r = reinterpret_cast<const float4*>(row);
    for (int j = 0; j < kVec; ++j) {
      const unsigned i = threadIdx.x + j * kRowThreads;
      v[j] = i < n4 ? r[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
};

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) RmsNormRegKernel(const float* __restrict__ x, const float* __restrict__ w,
                                                               float* __restrict__ y, unsigned n, float eps) {
  GridDependencyStart();
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const unsigned n4 = n / 4;
  RowCache<kVec> c;
  c.Load(x + row * n, n4);
  float ss = 0.0f;
  for (int j = 0; j < kVec; ++j) ss += c.v[j].x * c.v[j].x + c.v[j].y * c.v[j].y + c.v[j].z * c.v[j].z + c.v[j].w * c.v[j].w;
  const float scale = rsqrtf(BlockReduce<false>(ss, scratch) / static_cast<float>(n) + eps);
  const float4* w4 = reinterpret_cast<const float4*>(w);
  float4* y4 = reinterpret_cast<float4*>(y + row * n);
  for (int j = 0; j < kVec; ++j) {
    const unsigned i = threadIdx.x + j * kRowThreads;
    if (i >= n4) break;
    const float4 g = w4[i], a = c.v[j];
    y4[i] = make_float4(a.x * scale * g.x, a.y * scale * g.y, a.z * scale * g.z, a.w * scale * g.w);
  }
}

template <int kVec>
__global__ void __launch_bounds__(kRowThreads) SoftmaxRegKernel(const float* __restrict__ x, float* __restrict__ y, unsigned n) {
  GridDependencyStart();
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const unsigned n4 = n / 4;
  RowCache<kVec> c;
  c.Load(x + row * n, n4);
  float m = -INFINITY;
  for (int j = 0; j < kVec; ++j)
    if (threadIdx.x + j * kRowThreads < n4) m = fmaxf(m, fmaxf(fmaxf(c.v[j].x, c.v[j].y), fmaxf(c.v[j].z, c.v[j].w)));
  m = BlockReduce<true>(m, scratch);
  float s = 0.0f;
  for (int j = 0; j < kVec; ++j) {
    if (threadIdx.x + j * kRowThreads >= n4) break;
    float4& a = c.v[j];
    a = make_float4(expf(a.x - m), expf(a.y - m), expf(a.z - m), expf(a.w - m));
    s += a.x + a.y + a.z + a.w;
  }
  const float inv = 1.0f / BlockReduce<false>(s, scratch);
  float4* y4 = reinterpret_cast<float4*>(y + row * n);
  for (int j = 0; j < kVec; ++j) {
    const unsigned i = threadIdx.x + j * kRowThreads;
    if (i >= n4) break;
    const float4 a = c.v[j];
    y4[i] = make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
  }
}

// The register-cached kernel for rows that fit (kVec float4s per thread), else the looping one.
template <typename Kernel, typename... Args>
bool LaunchCached(Kernel k1, Kernel k2, Kernel k4, Kernel k8, int64_t rows, int64_t n, GpuStream& s, Args... args) {
  if (n % 4 != 0) return false;
  const int64_t per_thread = (n / 4 + kRowThreads - 1) / kRowThreads;
  Kernel k = per_thread <= 1 ? k1 : per_thread <= 2 ? k2 : per_thread <= 4 ? k4 : per_thread <= 8 ? k8 : nullptr;
  if (!k) return false;
  LaunchDependent(k, dim3(static_cast<unsigned>(rows)), dim3(kRowThreads), 0, s, args...);
  return true;
}

// Unary op codes, shared with lib/cuda (GPU_UNARY there).
enum Unary : int { kRelu, kSigmoid, kTanh, kExp, kSilu, kGeluErf, kGeluTanh, kUnaryCount };

__device__ __forceinline__ float ApplyUnary(int op, float v) {
  switch (op) {
    case kRelu: return v > 0.0f ? v : 0.0f;
    case kSigmoid: return 1.0f / (1.0f + expf(-v));
    case kTanh: return tanhf(v);
    case kExp: return expf(v);
    case kSilu: return v / (1.0f + expf(-v));
    case kGeluErf: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    default: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  }
}

__global__ void UnaryKernel(int op, const float* __restrict__ x, float* __restrict__ y, size_t count) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    y[i] = ApplyUnary(op, x[i]);
}

enum Binary : int { kAdd, kSub, kMul, kDiv, kBinaryCount };

// b repeats every bcount elements: the same shape (bcount = count), or a row broadcast (bias).
__global__ void BinaryKernel(int op, const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                             size_t count, size_t bcount) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const float u = a[i], v = b[i % bcount];
    y[i] = op == kAdd ? u + v : op == kSub ? u - v : op == kMul ? u * v : u / v;
  }
}

// SwiGLU's product: y = silu(gate) * up.
__global__ void SiluMulKernel(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ y,
                              size_t count) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    y[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

enum Convert : int { kF32ToF16, kF16ToF32, kF32ToBf16, kBf16ToF32 };

__global__ void ConvertKernel(int kind, const void* __restrict__ x, void* __restrict__ y, size_t count) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    switch (kind) {
      case kF32ToF16: static_cast<uint16_t*>(y)[i] = FloatToHalf(static_cast<const float*>(x)[i]); break;
      case kF16ToF32: static_cast<float*>(y)[i] = HalfToFloat(static_cast<const uint16_t*>(x)[i]); break;
      case kF32ToBf16: static_cast<uint16_t*>(y)[i] = FloatToBf16(static_cast<const float*>(x)[i]); break;
      default: static_cast<float*>(y)[i] = Bf16ToFloat(static_cast<const uint16_t*>(x)[i]); break;
    }
  }
}

// Grid for a grid-stride loop: enough blocks to fill the device, no more than the work needs.
dim3 StrideGrid(const GpuDeviceInfo& d, size_t count, unsigned threads) {
  const size_t want = (count + threads - 1) / threads, cap = size_t(d.multiprocessors > 0 ? d.multiprocessors : 1) * 8;
  return dim3(static_cast<unsigned>(want < cap ? want : cap));
}

void RowShape(const GpuOpCall& c, int64_t* rows, int64_t* n) {
  *rows = c.Int("rows");
  *n = c.Int("n", 1);
}

void RmsNormOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  int64_t rows, n;
  RowShape(c, &rows, &n);
  const size_t count = c.Count({rows, n});
  const float* x = c.Buffer<float>(0, count, "x");
  const float* w = c.Buffer<float>(1, n, "weight");
  float* y = c.Buffer<float>(2, count, "y");
  const float eps = static_cast<float>(c.NumOr("eps", 1e-6));
  if (!rows) return;
  if (!c.IntOr("looping", 0, 0, 1) &&
      LaunchCached(RmsNormRegKernel<1>, RmsNormRegKernel<2>, RmsNormRegKernel<4>, RmsNormRegKernel<8>, rows, n, s, x, w, y,
                   static_cast<unsigned>(n), eps))
    return;
  LaunchDependent(RmsNormKernel, dim3(rows), dim3(kRowThreads), 0, s, x, w, y, n, eps);
}

void LayerNormOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  int64_t rows, n;
  RowShape(c, &rows, &n);
  const size_t count = c.Count({rows, n});
  const float* x = c.Buffer<float>(0, count, "x");
  const float* g = c.Buffer<float>(1, n, "gamma");
  const float* b = c.Buffer<float>(2, n, "beta");
  float* y = c.Buffer<float>(3, count, "y");
  if (rows)
    Launch(LayerNormKernel, dim3(rows), dim3(kRowThreads), 0, s, x, g, b, y, n, static_cast<float>(c.NumOr("eps", 1e-5)));
}

void SoftmaxOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  int64_t rows, n;
  RowShape(c, &rows, &n);
  const size_t count = c.Count({rows, n});
  const float* x = c.Buffer<float>(0, count, "x");
  float* y = c.Buffer<float>(1, count, "y");
  if (!rows) return;
  if (!c.IntOr("looping", 0, 0, 1) &&
      LaunchCached(SoftmaxRegKernel<1>, SoftmaxRegKernel<2>, SoftmaxRegKernel<4>, SoftmaxRegKernel<8>, rows, n, s, x, y,
                   static_cast<unsigned>(n)))
    return;
  Launch(SoftmaxKernel, dim3(rows), dim3(kRowThreads), 0, s, x, y, n);
}

void UnaryOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int op = static_cast<int>(c.Int("op", 0, kUnaryCount - 1));
  const size_t count = c.Count({c.Int("count", 0, INT64_C(1) << 40)});
  const float* x = c.Buffer<float>(0, count, "x");
  float* y = c.Buffer<float>(1, count, "y");
  if (count) Launch(UnaryKernel, StrideGrid(d, count, 256), dim3(256), 0, s, op, x, y, count);
}

void BinaryOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int op = static_cast<int>(c.Int("op", 0, kBinaryCount - 1));
  const size_t count = c.Count({c.Int("count", 0, INT64_C(1) << 40)});
  const size_t bcount = c.Count({c.Int("bCount", 1, INT64_C(1) << 40)});
  if (count % bcount) c.Invalid("count must be a multiple of bCount");
  const float* a = c.Buffer<float>(0, count, "a");
  const float* b = c.Buffer<float>(1, bcount, "b");
  float* y = c.Buffer<float>(2, count, "y");
  if (count) Launch(BinaryKernel, StrideGrid(d, count, 256), dim3(256), 0, s, op, a, b, y, count, bcount);
}

void SiluMulOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const size_t count = c.Count({c.Int("count", 0, INT64_C(1) << 40)});
  const float* gate = c.Buffer<float>(0, count, "gate");
  const float* up = c.Buffer<float>(1, count, "up");
  float* y = c.Buffer<float>(2, count, "y");
  if (count) Launch(SiluMulKernel, StrideGrid(d, count, 256), dim3(256), 0, s, gate, up, y, count);
}

void ConvertOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, 3));
  const size_t count = c.Count({c.Int("count", 0, INT64_C(1) << 40)});
  const bool from_f32 = kind == kF32ToF16 || kind == kF32ToBf16;
  const void* x = from_f32 ? static_cast<const void*>(c.Buffer<float>(0, count, "x")) : c.Buffer<uint16_t>(0, count, "x");
  void* y = from_f32 ? static_cast<void*>(c.Buffer<uint16_t>(1, count, "y")) : c.Buffer<float>(1, count, "y");
  if (count) Launch(ConvertKernel, StrideGrid(d, count, 256), dim3(256), 0, s, kind, x, y, count);
}

}  // namespace

SONDE_GPU_OP("rms_norm", RmsNormOp);
SONDE_GPU_OP("layer_norm", LayerNormOp);
SONDE_GPU_OP("softmax", SoftmaxOp);
SONDE_GPU_OP("unary", UnaryOp);
SONDE_GPU_OP("binary", BinaryOp);
SONDE_GPU_OP("silu_mul", SiluMulOp);
SONDE_GPU_OP("convert", ConvertOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
