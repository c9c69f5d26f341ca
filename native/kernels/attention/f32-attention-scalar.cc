#include <math.h>

#include "kernels/attention/attention.h"

namespace sonde {
namespace kernels {

namespace {

// Scores are computed a chunk at a time into a stack buffer: the chunk's max is folded into the
// running max once per chunk instead of once per key.
constexpr size_t kChunk = 64;

void AttentionSpanScalar(const float* q, size_t hd, const float* k, const float* v, size_t stride, size_t n,
                         float scale, AttentionState* st) {
  float s[kChunk];
  for (size_t t0 = 0; t0 < n; t0 += kChunk) {
    const size_t c = n - t0 < kChunk ? n - t0 : kChunk;
    float cmax = -INFINITY;
    for (size_t t = 0; t < c; ++t) {
      const float* kr = k + (t0 + t) * stride;
      float dot = 0.f;
      for (size_t j = 0; j < hd; ++j) dot += q[j] * kr[j];
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
      const float* vr = v + (t0 + t) * stride;
      for (size_t j = 0; j < hd; ++j) st->acc[j] += p * vr[j];
    }
    st->max = m;
  }
}

}  // namespace

AttentionUkernels AttentionUkernelsScalar() { return {"scalar", AttentionSpanScalar}; }

}  // namespace kernels
}  // namespace sonde
