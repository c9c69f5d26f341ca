// AVX2 + FMA vector math shared by every kernel family (see vmath-avx512.h). Include only from
// *-avx2.cc files.
#pragma once
#include <immintrin.h>

namespace sonde {
namespace kernels {
namespace avx2 {

static inline __m256 Set(float v) { return _mm256_set1_ps(v); }
// MAXPS/MINPS return their second operand when either is NaN, so the constant goes first: a clamp
// written this way passes NaN through.
static inline __m256 ClampLo(float lo, __m256 x) { return _mm256_max_ps(Set(lo), x); }
static inline __m256 ClampHi(float hi, __m256 x) { return _mm256_min_ps(Set(hi), x); }

// Same algorithm and polynomial as the AVX-512 Exp. Without scalef, 2^n is built in two halves
// (n in [-150, 128] splits into exponents that are both normal), so subnormal results and overflow
// to Inf still come out right. A NaN input gives a NaN polynomial, which any scale keeps NaN.
static inline __m256 Exp(__m256 x) {
  x = ClampHi(88.8f, ClampLo(-104.0f, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, Set(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, Set(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, Set(-2.12194440e-4f), r);
  __m256 p = Set(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, Set(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, Set(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, Set(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, Set(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, Set(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, Set(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// Same rational approximation as the AVX-512 Erf.
static inline __m256 Erf(__m256 x) {
  x = ClampHi(4.0f, ClampLo(-4.0f, x));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = Set(-2.72614225801306e-10f);
  p = _mm256_fmadd_ps(x2, p, Set(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(x2, p, Set(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(x2, p, Set(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(x2, p, Set(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(x2, p, Set(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(x2, p, Set(-1.60960333262415e-02f));
  p = _mm256_mul_ps(x, p);
  __m256 q = Set(-1.45660718464996e-05f);
  q = _mm256_fmadd_ps(x2, q, Set(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(x2, q, Set(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(x2, q, Set(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(x2, q, Set(-1.42647390514189e-02f));
  return _mm256_div_ps(p, q);
}

static inline __m256 Tanh(__m256 x) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = Set(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, Set(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, Set(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, Set(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, Set(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 e = Exp(_mm256_add_ps(ax, ax));
  __m256 large = _mm256_sub_ps(Set(1.0f), _mm256_div_ps(Set(2.0f), _mm256_add_ps(e, Set(1.0f))));
  large = _mm256_or_ps(large, _mm256_and_ps(sign, x));
  return _mm256_blendv_ps(large, small, _mm256_cmp_ps(ax, Set(0.625f), _CMP_LT_OQ));
}

// exp(-|x|) never overflows: for x < 0, e / (1 + e) keeps full relative accuracy down to where e
// itself becomes subnormal. A NaN x fails the comparison and gives 1 / NaN = NaN.
static inline __m256 Sigmoid(__m256 x) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 e = Exp(_mm256_or_ps(x, sign));
  const __m256 num = _mm256_blendv_ps(Set(1.0f), e, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_div_ps(num, _mm256_add_ps(Set(1.0f), e));
}

}  // namespace avx2
}  // namespace kernels
}  // namespace sonde
