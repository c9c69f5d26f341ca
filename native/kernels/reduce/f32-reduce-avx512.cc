#include <immintrin.h>
#include <math.h>

#include "kernels/reduce/reduce.h"

namespace sonde {
namespace kernels {
namespace {

// Two vectors per step (VMAXPS: 4-cycle latency, two ports); the tail is one masked load, filled
// with the identity (-Inf for max, 0 for sum). NaN is tracked apart, because VMAXPS returns its
// second operand when either is NaN.
float MaxAvx512(size_t n, const float* x) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 m0 = ninf, m1 = ninf;
  __mmask16 unord = 0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    m0 = _mm512_max_ps(v0, m0);
    m1 = _mm512_max_ps(v1, m1);
    unord |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q);
  }
  for (; i < n; i += 16) {
    const size_t rem = n - i;
    const __mmask16 k = rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
    const __m512 v = _mm512_mask_loadu_ps(ninf, k, x + i);
    m0 = _mm512_max_ps(v, m0);
    unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  if (unord) return NAN;
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

float SumAvx512(size_t n, const float* x) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(x + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_loadu_ps(x + i + 48));
  }
  for (; i < n; i += 16) {
    const size_t rem = n - i;
    const __mmask16 k = rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
    s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(k, x + i));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

}  // namespace

ReduceUkernels ReduceUkernelsAvx512() { return {"avx512", MaxAvx512, SumAvx512}; }

}  // namespace kernels
}  // namespace sonde
