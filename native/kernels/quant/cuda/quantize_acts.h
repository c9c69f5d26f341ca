// The GPU's activation quantiser for the q8_0 / q4_0 products, the CPU's rule
// (kernels/quant/quant.h: QuantizeActivationRow): per block of 32 values, d = amax / 127 and
// q = rint(v * (127 / amax)); a block with a NaN or an infinity gets d = NaN and zeros, one whose
// amax is below 2^-120 (where 127 / amax overflows fp32) is all zero. quant.cu's quantiser and the
// transformer kernels that write their output quantised (llm.cu) share it, so the rule is here once.
#pragma once
#include <cfloat>
#include <cstddef>
#include <cstdint>

#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

// kPer consecutive values v of element i (i % kPer == 0) held by each of the 32 / kPer consecutive
// lanes of a warp that hold one block: q at xq[i..], the block's d at xd[i / 32] (by its first
// lane). Every lane of the warp calls it (the shuffles take the whole warp); `store` is false for
// lanes whose block lies past the data.
template <int kPer>
__device__ __forceinline__ void QuantizeActBlock(const float (&v)[kPer], size_t i, bool store, int8_t* xq, float* xd) {
  constexpr int kLanes = 32 / kPer;
  static_assert(kLanes * kPer == 32, "a block is 32 values");
  int finite = 1;
  float amax = 0.0f;
  for (int j = 0; j < kPer; ++j) {
    const float a = fabsf(v[j]);
    finite &= a <= FLT_MAX;  // false for NaN and +-Inf
    amax = fmaxf(amax, a);
  }
  for (int o = 1; o < kLanes; o <<= 1) finite &= __shfl_xor_sync(0xffffffffu, finite, o);
  amax = finite ? amax : 0.0f;
  for (int o = 1; o < kLanes; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (!store) return;
  const bool zero = !finite || amax < 7.52316384526264e-37f;
  const float id = zero ? 0.0f : 127.0f / amax;
  for (int j = 0; j < kPer; ++j) xq[i + j] = zero ? 0 : static_cast<int8_t>(static_cast<int>(rintf(v[j] * id)));
  if (i % 32 == 0) xd[i / 32] = !finite ? NAN : zero ? 0.0f : amax / 127.0f;
}

// An op's optional quantised output (params quantize = 1): buffer i holds rows * n int8, then
// rows * n / 32 fp32 scales, as quant_matmul's scratch; xq and xd are null without quantize.
inline void QuantOutput(const GpuOpCall& c, size_t i, int64_t rows, int64_t n, int8_t** xq, float** xd,
                        const char* what = "scratch") {
  *xq = nullptr, *xd = nullptr;
  if (!c.IntOr("quantize", 0, 0, 1)) return;
  if (n % 32) c.Invalid("n (" + std::to_string(n) + ") must be a multiple of 32 to quantise");
  *xq = c.Buffer<int8_t>(i, c.Count({rows, n}) + c.Count({rows, n / 32, 4}), what);
  *xd = reinterpret_cast<float*>(*xq + c.Count({rows, n}));
}

}  // namespace SONDE_GPU_NS
}  // namespace sonde
