// Rotary position embedding on the GPU, in place over rows of heads (the CPU's kernels/norm
// RopeRow and RopeRowYarn): pair j is (2j, 2j+1) in the normal ordering and (j, j + dims/2) in
// NeoX's, rotated by pair j's angle at the row's position.
//
// The angle is computed as the CPU computes it, so both round the same way: theta_0 = pos *
// freq_scale, then theta_{j+1} = theta_j * theta_scale in fp32 (theta_scale = base^(-2/dims) from
// the host's powf). One thread per (row, head, pair) repeats those j multiplications: at most
// dims/2 of them, cheap next to the row's memory traffic, and exact where pow(theta_scale, j)
// would differ in the last bit and so drift at long positions.
#include <algorithm>
#include <cmath>

#include "kernels/attention/cuda/paged.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

struct RopeArgs {
  float* x;
  const int32_t* pos;  // [row]
  size_t row_stride, head_stride, offset;
  int rows, heads, dims;
  float freq_scale, theta_scale;
  bool neox, yarn;
  float ext_factor, corr_low, corr_span, magnitude;  // YaRN only
};

__global__ void __launch_bounds__(256) RopeKernel(RopeArgs a) {
  const int half = a.dims / 2;
  const size_t total = size_t(a.rows) * a.heads * half;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i % half);
    const size_t rh = i / half;
    const int h = static_cast<int>(rh % a.heads), row = static_cast<int>(rh / a.heads);
    const float p = static_cast<float>(a.pos[row]);
    float c, s;
    if (!a.yarn) {
      float theta = p * a.freq_scale;
      for (int k = 0; k < j; ++k) theta *= a.theta_scale;
      c = cosf(theta), s = sinf(theta);
    } else {
      float extrap = p;
      for (int k = 0; k < j; ++k) extrap *= a.theta_scale;
      const float interp = a.freq_scale * extrap;
      float theta = interp;
      if (a.ext_factor != 0.0f) {
        const float y = (static_cast<float>(j) - a.corr_low) / a.corr_span;
        const float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * a.ext_factor;
        theta = interp * (1.0f - mix) + extrap * mix;
      }
      c = cosf(theta) * a.magnitude, s = sinf(theta) * a.magnitude;
    }
    float* r = a.x + size_t(row) * a.row_stride + size_t(h) * a.head_stride + a.offset;
    float* u = a.neox ? r + j : r + 2 * j;
    float* v = a.neox ? r + j + half : r + 2 * j + 1;
    const float x0 = *u, x1 = *v;
    *u = x0 * c - x1 * s;
    *v = x0 * s + x1 * c;
  }
}

// Buffers: 0 x (f32), 1 positions (int32, rows). Head h of row r starts at r * rowStride +
// h * headStride + offset (defaults: packed heads of `dims`), and its first `dims` values rotate.
void RopeOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  RopeArgs a{};
  const int64_t rows = c.Int("rows"), heads = c.Int("heads", 1, 1 << 20), dims = c.Int("dims", 2, 1 << 16);
  if (dims % 2) c.Invalid("dims must be even, got " + std::to_string(dims));
  const int64_t head_stride = c.IntOr("headStride", dims, 0, INT64_C(1) << 40);
  const int64_t offset = c.IntOr("offset", 0, 0, INT64_C(1) << 40);
  const int64_t row_stride = c.IntOr("rowStride", heads * head_stride, 0, INT64_C(1) << 40);
  // The last element touched, + 1: every head's rotated span inside the buffer.
  const size_t extent = rows == 0 ? 0 : c.Count({rows - 1, row_stride}) + c.Count({heads - 1, head_stride}) + offset + dims;
  a.x = c.Buffer<float>(0, extent, "x");
  a.pos = c.Buffer<int32_t>(1, c.Count({rows}), "positions");
  a.rows = static_cast<int>(rows), a.heads = static_cast<int>(heads), a.dims = static_cast<int>(dims);
  a.row_stride = static_cast<size_t>(row_stride), a.head_stride = static_cast<size_t>(head_stride);
  a.offset = static_cast<size_t>(offset);
  const float base = static_cast<float>(c.NumOr("base", 10000.0));
  if (!(base > 0.0f)) c.Invalid("base must be positive");
  a.freq_scale = static_cast<float>(c.NumOr("freqScale", 1.0));
  a.theta_scale = powf(base, -2.0f / static_cast<float>(dims));
  a.neox = c.NumOr("neox", 0) != 0;
  a.yarn = c.NumOr("yarn", 0) != 0;
  a.ext_factor = static_cast<float>(c.NumOr("extFactor", 0.0));
  const float corr_low = static_cast<float>(c.NumOr("corrLow", 0.0)), corr_high = static_cast<float>(c.NumOr("corrHigh", 0.0));
  a.corr_low = corr_low;
  a.corr_span = corr_high - corr_low > 0.001f ? corr_high - corr_low : 0.001f;
  const float magnitude = static_cast<float>(c.NumOr("magnitude", 1.0));
  a.magnitude = a.ext_factor != 0.0f ? magnitude * (1.0f + 0.1f * logf(1.0f / a.freq_scale)) : magnitude;
  const size_t total = size_t(rows) * heads * (dims / 2);
  if (total == 0) return;
  const size_t cap = size_t(dev.multiprocessors > 0 ? dev.multiprocessors : 1) * 8;
  Launch(RopeKernel, dim3(static_cast<unsigned>(std::min<size_t>(CeilDiv(total, 256), cap))), dim3(256), 0, st, a);
}

}  // namespace

SONDE_GPU_OP("rope", RopeOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
