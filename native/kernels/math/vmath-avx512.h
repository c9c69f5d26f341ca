// AVX-512 vector math shared by every kernel family (elementwise ops, GEMM and conv epilogues), so
// that an activation fused into a GEMM gives the same bits as the standalone op. Include only from
// *-avx512*.cc files: everything here is static inline, so no copy compiled for AVX-512 can be
// picked by the linker for baseline code.
#pragma once
#include <immintrin.h>

namespace sonde {
namespace kernels {
namespace avx512 {

static inline __m512 Set(float v) { return _mm512_set1_ps(v); }

// MAXPS/MINPS return their second operand when either is NaN, so the constant goes first: a clamp
// written this way passes NaN through.
static inline __m512 ClampLo(float lo, __m512 x) { return _mm512_max_ps(Set(lo), x); }
static inline __m512 ClampHi(float hi, __m512 x) { return _mm512_min_ps(Set(hi), x); }

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by the Cephes degree-6
// polynomial (with FMA: <= 2 ulp before scaling). scalef multiplies by 2^n with correct overflow
// to Inf and gradual underflow into subnormals. The clamp keeps n finite; exp(-104) already rounds
// to 0 and exp(88.8) to Inf.
static inline __m512 Exp(__m512 x) {
  x = ClampHi(88.8f, ClampLo(-104.0f, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, Set(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, Set(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, Set(-2.12194440e-4f), r);
  __m512 p = Set(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, Set(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, Set(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, Set(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, Set(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, Set(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, Set(1.0f));
  return _mm512_scalef_ps(p, n);
}

// erf by the odd/even rational approximation of Eigen's generic_fast_erf_float on [-4, 4]
// (outside, erf is +-1 in float).
static inline __m512 Erf(__m512 x) {
  x = ClampHi(4.0f, ClampLo(-4.0f, x));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = Set(-2.72614225801306e-10f);
  p = _mm512_fmadd_ps(x2, p, Set(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(x2, p, Set(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(x2, p, Set(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(x2, p, Set(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(x2, p, Set(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(x2, p, Set(-1.60960333262415e-02f));
  p = _mm512_mul_ps(x, p);
  __m512 q = Set(-1.45660718464996e-05f);
  q = _mm512_fmadd_ps(x2, q, Set(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(x2, q, Set(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(x2, q, Set(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(x2, q, Set(-1.42647390514189e-02f));
  return _mm512_div_ps(p, q);
}

// |x| < 0.625: Cephes tanhf odd polynomial (no cancellation near 0); otherwise
// 1 - 2 / (exp(2|x|) + 1) with the sign of x put back.
static inline __m512 Tanh(__m512 x) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512 ax = _mm512_andnot_ps(sign, x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = Set(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, z, Set(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, z, Set(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, z, Set(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, z, Set(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __m512 e = Exp(_mm512_add_ps(ax, ax));
  __m512 large = _mm512_sub_ps(Set(1.0f), _mm512_div_ps(Set(2.0f), _mm512_add_ps(e, Set(1.0f))));
  large = _mm512_or_ps(large, _mm512_and_ps(sign, x));
  const __mmask16 is_small = _mm512_cmp_ps_mask(ax, Set(0.625f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(is_small, large, small);
}

// exp(-|x|) never overflows: for x < 0, e / (1 + e) keeps full relative accuracy down to where e
// itself becomes subnormal. A NaN x fails the comparison and gives 1 / NaN = NaN.
static inline __m512 Sigmoid(__m512 x) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512 e = Exp(_mm512_or_ps(x, sign));
  const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), Set(1.0f), e);
  return _mm512_div_ps(num, _mm512_add_ps(Set(1.0f), e));
}

}  // namespace avx512
}  // namespace kernels
}  // namespace sonde
