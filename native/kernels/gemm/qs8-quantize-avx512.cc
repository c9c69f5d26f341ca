// AVX-512 dynamic quantisation of one row of A to u8 for the qs8 GEMM: the same bytes, scale and
// zero point as the scalar QuantizeRow of native/ops/gemm_lowp.cc (both use LowpU8Params, and
// vcvtps2dq rounds half to even like nearbyint), 16 floats per step instead of one. The scalar
// loop was ~1 ns per element, 2 ms of a 1024x1024 int8 GEMM's ~5 ms.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <string.h>

#include "kernels/gemm/lowp-gemm.h"

namespace sonde {
namespace kernels {

void LowpQuantizeRowU8Avx512(const float* a, size_t k, size_t kq, uint8_t* dst, float* scale, int32_t* zero) {
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
  __mmask16 bad = 0;
  size_t p = 0;
  for (; p + 16 <= k; p += 16) {
    const __m512 v = _mm512_loadu_ps(a + p);
    bad |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN | SNaN | +Inf | -Inf
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  if (p < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - p)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, a + p);  // masked-off lanes are 0: inside [lo, hi]
    bad |= _mm512_fpclass_ps_mask(v, 0x99);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  memset(dst, 0, kq);
  if (bad) {
    *scale = __builtin_nanf("");
    *zero = 0;
    return;
  }
  float s, inv, z;
  if (!LowpU8Params(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), &s, &inv, &z)) {
    *scale = s;
    *zero = 0;
    return;
  }
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i vz = _mm512_set1_epi32(static_cast<int>(z));
  const __m512i zero_i = _mm512_setzero_si512(), max_i = _mm512_set1_epi32(255);
  for (p = 0; p < k; p += 16) {
    const size_t left = k - p;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, a + p);
    // Rounds with the current mode (nearest even), as nearbyint does.
    __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, vinv)), vz);
    u = _mm512_min_epi32(_mm512_max_epi32(u, zero_i), max_i);
    _mm_mask_storeu_epi8(dst + p, m, _mm512_cvtepi32_epi8(u));
  }
  *scale = s;
  *zero = static_cast<int32_t>(z);
}

}  // namespace kernels
}  // namespace sonde
