#include <immintrin.h>
#include <math.h>

#include "kernels/attention/attention.h"

namespace sonde {
namespace kernels {

namespace {

constexpr size_t kChunk = 64;

// 16 halves per vcvtph2ps (one ymm load widened to a zmm); the head_dim tail is a masked 16-bit
// load (AVX-512BW) of the remaining halves, zeros beyond, widened the same way.
inline __m512 LoadHalves(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 LoadHalvesMasked(__mmask16 mask, const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

void AttentionSpanF16Avx512(const float* q, size_t hd, const uint16_t* k, const uint16_t* v, size_t stride, size_t n,
                            float scale, AttentionState* st) {
  float s[kChunk];
  const size_t full = hd & ~static_cast<size_t>(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (hd - full)) - 1);
  for (size_t t0 = 0; t0 < n; t0 += kChunk) {
    const size_t c = n - t0 < kChunk ? n - t0 : kChunk;
    float cmax = -INFINITY;
    for (size_t t = 0; t < c; ++t) {
      const uint16_t* kr = k + (t0 + t) * stride;
      __m512 acc = _mm512_setzero_ps();
      size_t j = 0;
      for (; j < full; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), LoadHalves(kr + j), acc);
      if (tail) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + j), LoadHalvesMasked(tail, kr + j), acc);
      s[t] = _mm512_reduce_add_ps(acc) * scale;
      if (s[t] > cmax) cmax = s[t];
    }
    const float m = cmax > st->max ? cmax : st->max;
    const float rescale = st->max == -INFINITY ? 0.f : expf(st->max - m);
    st->sum *= rescale;
    const __m512 vr = _mm512_set1_ps(rescale);
    size_t j = 0;
    for (; j < full; j += 16) _mm512_storeu_ps(st->acc + j, _mm512_mul_ps(_mm512_loadu_ps(st->acc + j), vr));
    if (tail) _mm512_mask_storeu_ps(st->acc + j, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, st->acc + j), vr));
    for (size_t t = 0; t < c; ++t) {
      const float p = expf(s[t] - m);
      st->sum += p;
      const __m512 vp = _mm512_set1_ps(p);
      const uint16_t* vrow = v + (t0 + t) * stride;
      j = 0;
      for (; j < full; j += 16)
        _mm512_storeu_ps(st->acc + j, _mm512_fmadd_ps(vp, LoadHalves(vrow + j), _mm512_loadu_ps(st->acc + j)));
      if (tail)
        _mm512_mask_storeu_ps(st->acc + j, tail,
                              _mm512_fmadd_ps(vp, LoadHalvesMasked(tail, vrow + j), _mm512_maskz_loadu_ps(tail, st->acc + j)));
    }
    st->max = m;
  }
}

}  // namespace

AttentionF16Ukernels AttentionF16UkernelsAvx512() { return {"avx512", AttentionSpanF16Avx512}; }

}  // namespace kernels
}  // namespace sonde
