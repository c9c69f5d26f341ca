#include <immintrin.h>
#include <math.h>

#include "kernels/attention/attention.h"

namespace sonde {
namespace kernels {

namespace {

constexpr size_t kChunk = 64;

float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// F16C widens 8 halves per vcvtph2ps straight from memory, so an f16 cache costs one extra
// instruction per 8 elements over f32 and halves the bytes attention streams. The head_dim tail
// (not a multiple of 8) widens one element at a time.
void AttentionSpanF16Avx2(const float* q, size_t hd, const uint16_t* k, const uint16_t* v, size_t stride, size_t n,
                          float scale, AttentionState* st) {
  float s[kChunk];
  const size_t full = hd & ~static_cast<size_t>(7);
  for (size_t t0 = 0; t0 < n; t0 += kChunk) {
    const size_t c = n - t0 < kChunk ? n - t0 : kChunk;
    float cmax = -INFINITY;
    for (size_t t = 0; t < c; ++t) {
      const uint16_t* kr = k + (t0 + t) * stride;
      __m256 acc = _mm256_setzero_ps();
      size_t j = 0;
      for (; j < full; j += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr + j))), acc);
      float dot = HorizontalSum(acc);
      for (; j < hd; ++j) dot += q[j] * _cvtsh_ss(kr[j]);
      s[t] = dot * scale;
      if (s[t] > cmax) cmax = s[t];
    }
    const float m = cmax > st->max ? cmax : st->max;
    const float rescale = st->max == -INFINITY ? 0.f : expf(st->max - m);
    st->sum *= rescale;
    const __m256 vr = _mm256_set1_ps(rescale);
    size_t j = 0;
    for (; j < full; j += 8) _mm256_storeu_ps(st->acc + j, _mm256_mul_ps(_mm256_loadu_ps(st->acc + j), vr));
    for (; j < hd; ++j) st->acc[j] *= rescale;
    for (size_t t = 0; t < c; ++t) {
      const float p = expf(s[t] - m);
      st->sum += p;
      const __m256 vp = _mm256_set1_ps(p);
      const uint16_t* vrow = v + (t0 + t) * stride;
      j = 0;
      for (; j < full; j += 8) {
        const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vrow + j)));
        _mm256_storeu_ps(st->acc + j, _mm256_fmadd_ps(vp, vv, _mm256_loadu_ps(st->acc + j)));
      }
      for (; j < hd; ++j) st->acc[j] += p * _cvtsh_ss(vrow[j]);
    }
    st->max = m;
  }
}

}  // namespace

AttentionF16Ukernels AttentionF16UkernelsAvx2() { return {"avx2", AttentionSpanF16Avx2}; }

}  // namespace kernels
}  // namespace sonde
