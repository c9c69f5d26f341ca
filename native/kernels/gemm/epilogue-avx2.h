// AVX2 GEMM epilogue, for inclusion by *-avx2.cc files only (static inline: nothing compiled for
// AVX2 can be shared with baseline code). Same formulas as epilogue-avx512.h, with the vector math
// of kernels/math/vmath-avx2.h.
#pragma once
#include <immintrin.h>

#include "kernels/gemm/gemm.h"
#include "kernels/math/vmath-avx2.h"

namespace sonde {
namespace kernels {
namespace avx2 {

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
