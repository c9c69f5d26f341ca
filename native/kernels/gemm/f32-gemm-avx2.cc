// AVX2+FMA f32 GEMM, 6x16 tile: 12 ymm accumulators + 2 for the W row + 1 broadcast of A = 15 of
// the 16 registers.
#include <immintrin.h>

#include "kernels/gemm/epilogue-avx2.h"
#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 6;
constexpr size_t kNr = 16;

inline __m256i LaneMask(size_t n) {  // lanes [0, n) set, n in [0, 8]
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

template <size_t MR>
void Tile(size_t nr, size_t kc, const float* a, size_t lda, const float* w, float* c, size_t ldc,
          bool accumulate, const GemmEpilogue* ep) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm256_setzero_ps();
    acc1[i] = _mm256_setzero_ps();
  }
  for (size_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(w + k * kNr);
    const __m256 w1 = _mm256_load_ps(w + k * kNr + 8);
#pragma GCC unroll 8
    for (size_t i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      acc0[i] = _mm256_fmadd_ps(av, w0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(av, w1, acc1[i]);
    }
  }
  const __m256i m0 = LaneMask(nr >= 8 ? 8 : nr);
  const __m256i m1 = LaneMask(nr >= 16 ? 8 : nr <= 8 ? 0 : nr - 8);
  avx2::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx2::LoadColumnTerms(ep, 0, m0);
    t1 = avx2::LoadColumnTerms(ep, 8, m1);
  }
#pragma GCC unroll 8
  for (size_t i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    __m256 v0 = acc0[i], v1 = acc1[i];
    if (accumulate) {
      v0 = _mm256_add_ps(v0, _mm256_maskload_ps(ci, m0));
      v1 = _mm256_add_ps(v1, _mm256_maskload_ps(ci + 8, m1));
    }
    if (ep) {
      v0 = avx2::ApplyEpilogue(v0, t0, ep, i, 0, m0);
      v1 = avx2::ApplyEpilogue(v1, t1, ep, i, 8, m1);
    }
    _mm256_maskstore_ps(ci, m0, v0);
    _mm256_maskstore_ps(ci + 8, m1, v1);
  }
}

void F32Gemm6x16Avx2(size_t mr, size_t nr, size_t kc, const float* a, size_t lda, const float* w,
                     float* c, size_t ldc, bool accumulate, const GemmEpilogue* ep) {
  switch (mr) {
    case 6: return Tile<6>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 5: return Tile<5>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 4: return Tile<4>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 3: return Tile<3>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 2: return Tile<2>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 1: return Tile<1>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    default: return;
  }
}

}  // namespace

F32GemmUkernelInfo F32GemmUkernelAvx2() { return {F32Gemm6x16Avx2, kMr, kNr, "f32_gemm_6x16__avx2", nullptr, {}}; }

}  // namespace kernels
}  // namespace sonde
