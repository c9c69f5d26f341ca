#include <math.h>

#include "kernels/attention/attention.h"
#include "kernels/gemm/lowp-gemm.h"

namespace sonde {
namespace kernels {

namespace {

// The fp32 scalar kernel's loop (f32-attention-scalar.cc) with every K/V element widened on load:
// the reference the F16C / AVX-512 variants are tested against.
constexpr size_t kChunk = 64;

void AttentionSpanF16Scalar(const float* q, size_t hd, const uint16_t* k, const uint16_t* v, size_t stride, size_t n,
                            float scale, AttentionState* st) {
  float s[kChunk];
  for (size_t t0 = 0; t0 < n; t0 += kChunk) {
    const size_t c = n - t0 < kChunk ? n - t0 : kChunk;
    float cmax = -INFINITY;
    for (size_t t = 0; t < c; ++t) {
      const uint16_t* kr = k + (t0 + t) * stride;
      float dot = 0.f;
      for (size_t j = 0; j < hd; ++j) dot += q[j] * LowpF16ToF32(kr[j]);
      s[t] = dot * scale;
      if (s[t] > cmax) cmax = s[t];
    }
    const float m = cmax > st->max ? cmax : st->max;
    const float rescale = st->max == -INFINITY ? 0.f : expf(st->max - m);
    st->sum *= rescale;
    for (size_t j = 0; j < hd; ++j) st->acc[j] *= rescale;
    for (size_t t = 0; t < c; ++t) {
      const float p = expf(s[t] - m);
      st->sum += p;
      const uint16_t* vr = v + (t0 + t) * stride;
      for (size_t j = 0; j < hd; ++j) st->acc[j] += p * LowpF16ToF32(vr[j]);
    }
    st->max = m;
  }
}

}  // namespace

AttentionF16Ukernels AttentionF16UkernelsScalar() { return {"scalar", AttentionSpanF16Scalar}; }

}  // namespace kernels
}  // namespace sonde
