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

__mmask16 TailMask(size_t rem) {
  return rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
}

float DotAvx512(size_t n, const float* x, const float* y) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(y + i + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(y + i + 48), s3);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = TailMask(n - i);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, y + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

void AxpyAvx512(size_t n, float a, const float* x, float* y) {
  const __m512 va = _mm512_set1_ps(a);
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 k = TailMask(n - i);
    _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, y + i)));
  }
}

}  // namespace

ReduceUkernels ReduceUkernelsAvx512() { return {"avx512", MaxAvx512, SumAvx512, DotAvx512, AxpyAvx512}; }

}  // namespace kernels
}  // namespace sonde
