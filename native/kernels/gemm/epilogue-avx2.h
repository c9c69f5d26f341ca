// AVX2 GEMM epilogue, for inclusion by *-avx2.cc files only (static inline: nothing compiled for
// AVX2 can be shared with baseline code). Same formulas and accuracy as epilogue-avx512.h; without
// vscalefps, 2^n is built in the exponent field, so the reduced input is kept in the normal range
// and the overflow (> 88.72 -> +inf) and underflow (< -87.33 -> 0) ends are blended in.
#pragma once
#include <immintrin.h>

#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {
namespace avx2 {

static inline __m256 Exp(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return y;
}

static inline __m256 Sigmoid(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, Exp(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

static inline __m256 Erf(__m256 x) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign_bit, x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = Exp(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
  const __m256 y = _mm256_fnmadd_ps(p, e, one);
  return _mm256_or_ps(y, _mm256_and_ps(sign_bit, x));
}

static inline __m256 Tanh(__m256 u) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = Exp(_mm256_add_ps(u, u));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(one, e)));
}

static inline __m256 Activate(__m256 v, const GemmEpilogue* ep) {
  switch (ep->activation) {
    case kActRelu: return _mm256_max_ps(_mm256_setzero_ps(), v);
    case kActClip:
      return _mm256_min_ps(_mm256_set1_ps(ep->beta), _mm256_max_ps(_mm256_set1_ps(ep->alpha), v));
    case kActSilu: return _mm256_mul_ps(v, Sigmoid(v));
    case kActGeluErf: {
      const __m256 e = Erf(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)));
      return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    }
    case kActGeluTanh: {
      const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
      const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f),
                                     _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
      return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(_mm256_set1_ps(1.0f), Tanh(u)));
    }
    case kActSigmoid: return Sigmoid(v);
    case kActLeakyRelu: {
      const __m256 neg = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
      return _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(ep->alpha)), neg);
    }
    case kActHardSwish: {
      __m256 t = _mm256_add_ps(v, _mm256_set1_ps(3.0f));
      t = _mm256_min_ps(_mm256_set1_ps(6.0f), _mm256_max_ps(_mm256_setzero_ps(), t));
      return _mm256_mul_ps(v, _mm256_mul_ps(t, _mm256_set1_ps(1.0f / 6.0f)));
    }
    default: return v;
  }
}

struct ColumnTerms {
  __m256 scale, bias;
  bool has_scale;
};

static inline ColumnTerms LoadColumnTerms(const GemmEpilogue* ep, size_t col, __m256i m) {
  ColumnTerms t;
  t.has_scale = ep->scale != nullptr;
  t.scale = t.has_scale ? _mm256_maskload_ps(ep->scale + col, m) : _mm256_set1_ps(1.0f);
  t.bias = ep->bias ? _mm256_maskload_ps(ep->bias + col, m) : _mm256_setzero_ps();
  return t;
}

static inline __m256 ApplyEpilogue(__m256 acc, const ColumnTerms& t, const GemmEpilogue* ep, size_t i,
                                   size_t col, __m256i m) {
  __m256 v = t.has_scale ? _mm256_fmadd_ps(acc, t.scale, t.bias) : _mm256_add_ps(acc, t.bias);
  if (ep->residual) {
    const __m256 r = _mm256_maskload_ps(ep->residual + i * ep->ldr + col, m);
    if (ep->residual_before_activation) return Activate(_mm256_add_ps(v, r), ep);
    return _mm256_add_ps(Activate(v, ep), r);
  }
  return Activate(v, ep);
}

}  // namespace avx2
}  // namespace kernels
}  // namespace sonde
