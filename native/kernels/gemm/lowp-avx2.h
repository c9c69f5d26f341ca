// Shared tail of the AVX2 low-precision-weight kernels (for *-avx2.cc files only; static inline):
// lane masks, the qs8 dequantisation and the store of one tile row through epilogue-avx2.h.
#pragma once
#include <immintrin.h>

#include "kernels/gemm/epilogue-avx2.h"
#include "kernels/gemm/lowp-gemm.h"

namespace sonde {
namespace kernels {
namespace avx2 {

static inline __m256i LowpMask(size_t nr, size_t col) {  // lanes [col, min(nr, col + 8))
  const size_t n = nr >= col + 8 ? 8 : nr <= col ? 0 : nr - col;
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline void LowpStore(__m256 v, const ColumnTerms& t, float* ci, size_t i, size_t col, __m256i m,
                             const GemmEpilogue* ep) {
  if (ep) v = ApplyEpilogue(v, t, ep, i, col, m);
  _mm256_maskstore_ps(ci + col, m, v);
}

struct Qs8ColumnTerms {
  __m256i w_sum;
  __m256 w_scale;
};

static inline Qs8ColumnTerms LoadQs8ColumnTerms(const LowpGemmQuant* q, size_t col, __m256i m) {
  return {_mm256_maskload_epi32(q->w_sum + col, m), _mm256_maskload_ps(q->w_scale + col, m)};
}

static inline __m256 Qs8Dequantize(__m256i acc, const Qs8ColumnTerms& t, const LowpGemmQuant* q, size_t i) {
  const __m256i s = _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_set1_epi32(q->a_zero[i]), t.w_sum));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(_mm256_set1_ps(q->a_scale[i]), t.w_scale));
}

}  // namespace avx2
}  // namespace kernels
}  // namespace sonde
