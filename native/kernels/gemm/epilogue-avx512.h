// AVX-512 GEMM epilogue: the activations of GemmEpilogue on one zmm of a tile row, for inclusion by
// *-avx512.cc files only. Functions are static inline so no copy compiled for AVX-512 can be shared
// with baseline code.
//
// Accuracy against the libm-based scalar reference (GemmActivateScalar):
// - exp: Cody-Waite reduction to |r| <= ln2/2 and a degree-6 Taylor polynomial (truncation error
//   < r^7/5040 < 1.3e-8 relative) scaled by vscalefps: about 2 ulp.
// - erf: Abramowitz & Stegun 7.1.26, absolute error <= 1.5e-7.
// - tanh via 1 - 2 / (1 + exp(2u)): absolute error of a few 1e-8 near 0, a few ulp elsewhere.
// Bounds are ordered (max(lo, v), min(hi, v)) so that a NaN input propagates, as IEEE asks.
#pragma once
#include <immintrin.h>

#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {
namespace avx512 {

static inline __m512 Exp(__m512 x) {
  // Past 89 exp overflows to +inf and below -104 it is 0; vscalefps produces both from n.
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 Sigmoid(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, Exp(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

static inline __m512 Erf(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), ax, one));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = Exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax)));
  const __m512 y = _mm512_fnmadd_ps(p, e, one);
  // Copy x's sign onto y (erf is odd); a NaN x makes t, p and y NaN.
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

static inline __m512 Tanh(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = Exp(_mm512_add_ps(u, u));
  return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)));
}

static inline __m512 Activate(__m512 v, const GemmEpilogue* ep) {
  switch (ep->activation) {
    case kActRelu: return _mm512_max_ps(_mm512_setzero_ps(), v);
    case kActClip:
      return _mm512_min_ps(_mm512_set1_ps(ep->beta), _mm512_max_ps(_mm512_set1_ps(ep->alpha), v));
    case kActSilu: return _mm512_mul_ps(v, Sigmoid(v));
    case kActGeluErf: {
      const __m512 e = Erf(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    }
    case kActGeluTanh: {
      const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                     _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), Tanh(u)));
    }
    case kActSigmoid: return Sigmoid(v);
    case kActLeakyRelu: {
      const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
      return _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(ep->alpha));
    }
    case kActHardSwish: {
      __m512 t = _mm512_add_ps(v, _mm512_set1_ps(3.0f));
      t = _mm512_min_ps(_mm512_set1_ps(6.0f), _mm512_max_ps(_mm512_setzero_ps(), t));
      return _mm512_mul_ps(v, _mm512_mul_ps(t, _mm512_set1_ps(1.0f / 6.0f)));
    }
    default: return v;
  }
}

// Per-column operands of the epilogue for one 16-lane slice of a tile, loaded once per tile.
struct ColumnTerms {
  __m512 scale, bias;
  bool has_scale;
};

static inline ColumnTerms LoadColumnTerms(const GemmEpilogue* ep, size_t col, __mmask16 m) {
  ColumnTerms t;
  t.has_scale = ep->scale != nullptr;
  t.scale = t.has_scale ? _mm512_maskz_loadu_ps(m, ep->scale + col) : _mm512_set1_ps(1.0f);
  t.bias = ep->bias ? _mm512_maskz_loadu_ps(m, ep->bias + col) : _mm512_setzero_ps();
  return t;
}

// acc is row i, columns [col, col + 16) of the tile (lanes outside m are ignored by the store).
static inline __m512 ApplyEpilogue(__m512 acc, const ColumnTerms& t, const GemmEpilogue* ep, size_t i,
                                   size_t col, __mmask16 m) {
  __m512 v = t.has_scale ? _mm512_fmadd_ps(acc, t.scale, t.bias) : _mm512_add_ps(acc, t.bias);
  if (ep->residual) {
    const __m512 r = _mm512_maskz_loadu_ps(m, ep->residual + i * ep->ldr + col);
    if (ep->residual_before_activation) return Activate(_mm512_add_ps(v, r), ep);
    return _mm512_add_ps(Activate(v, ep), r);
  }
  return Activate(v, ep);
}

}  // namespace avx512
}  // namespace kernels
}  // namespace sonde
