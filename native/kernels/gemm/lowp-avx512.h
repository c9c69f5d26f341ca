// Shared tail of the AVX-512 low-precision-weight kernels (for *-avx512*.cc files only; static
// inline so nothing compiled for AVX-512 is shared with baseline code): column masks, the qs8
// dequantisation and the store of one tile row through the fp32 epilogue of epilogue-avx512.h.
#pragma once
#include <immintrin.h>

#include "kernels/gemm/epilogue-avx512.h"
#include "kernels/gemm/lowp-gemm.h"

namespace sonde {
namespace kernels {
namespace avx512 {

static inline __mmask16 LowpMask(size_t nr, size_t col) {  // lanes [col, min(nr, col + 16))
  if (nr >= col + 16) return 0xFFFF;
  if (nr <= col) return 0;
  return static_cast<__mmask16>((1u << (nr - col)) - 1);
}

// Writes row i (columns [col, col + 16)) of a tile: epilogue if any, masked store.
static inline void LowpStore(__m512 v, const ColumnTerms& t, float* ci, size_t i, size_t col, __mmask16 m,
                             const GemmEpilogue* ep) {
  if (ep) v = ApplyEpilogue(v, t, ep, i, col, m);
  _mm512_mask_storeu_ps(ci + col, m, v);
}

// (acc - a_zero[i] * w_sum[col..]) as fp32, times a_scale[i] * w_scale[col..]; wrapping s32 maths
// is exact because the true value fits in s32 (K <= kQs8MaxK).
struct Qs8ColumnTerms {
  __m512i w_sum;
  __m512 w_scale;
};

static inline Qs8ColumnTerms LoadQs8ColumnTerms(const LowpGemmQuant* q, size_t col, __mmask16 m) {
  return {_mm512_maskz_loadu_epi32(m, q->w_sum + col), _mm512_maskz_loadu_ps(m, q->w_scale + col)};
}

static inline __m512 Qs8Dequantize(__m512i acc, const Qs8ColumnTerms& t, const LowpGemmQuant* q, size_t i) {
  const __m512i s = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(q->a_zero[i]), t.w_sum));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_set1_ps(q->a_scale[i]), t.w_scale));
}

}  // namespace avx512
}  // namespace kernels
}  // namespace sonde
