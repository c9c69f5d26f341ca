#include <immintrin.h>

#include "kernels/math/vmath-avx2.h"
#include "kernels/moe/moe.h"

namespace sonde {
namespace kernels {

namespace {

// silu(g) = g * sigmoid(g): Sigmoid builds on exp(-|g|), which cannot overflow.
void SwigluAvx2(size_t n, const float* gate, const float* up, float* h) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_mul_ps(g, avx2::Sigmoid(g)), _mm256_loadu_ps(up + i)));
  }
  if (i < n) {
    // The tail through a masked load/store: no scalar loop whose exp would differ from the lanes'.
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), idx);
    const __m256 g = _mm256_maskload_ps(gate + i, mask);
    const __m256 u = _mm256_maskload_ps(up + i, mask);
    _mm256_maskstore_ps(h + i, mask, _mm256_mul_ps(_mm256_mul_ps(g, avx2::Sigmoid(g)), u));
  }
}

void ScaleAddAvx2(size_t n, float w, const float* x, float* y) {
  const __m256 vw = _mm256_set1_ps(w);
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

}  // namespace

MoeUkernels MoeUkernelsAvx2() { return MoeUkernels{"avx2", SwigluAvx2, ScaleAddAvx2}; }

}  // namespace kernels
}  // namespace sonde
