#include <immintrin.h>

#include "kernels/math/vmath-avx512.h"
#include "kernels/moe/moe.h"

namespace sonde {
namespace kernels {

namespace {

void SwigluAvx512(size_t n, const float* gate, const float* up, float* h) {
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 u = _mm512_maskz_loadu_ps(m, up + i);
    _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(_mm512_mul_ps(g, avx512::Sigmoid(g)), u));
  }
}

void ScaleAddAvx512(size_t n, float w, const float* x, float* y) {
  const __m512 vw = _mm512_set1_ps(w);
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(vw, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

}  // namespace

MoeUkernels MoeUkernelsAvx512() { return MoeUkernels{"avx512", SwigluAvx512, ScaleAddAvx512}; }

}  // namespace kernels
}  // namespace sonde
