// AVX2 bf16-weight GEMM: each weight lane (a bf16 pair) is widened to two fp32 vectors (shift for
// the low half, AND for the high half), then fp32 FMA with A kept in fp32.
// 4x16 tile: 8 ymm accumulators + 4 widened weight vectors + 2 broadcasts + the AND mask = 15 of
// the 16 registers; 8 independent chains cover the 4-cycle FMA latency on two pipes.
#include <immintrin.h>

#include "kernels/gemm/lowp-avx2.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 4;
constexpr size_t kNr = 16;

template <size_t MR>
void Tile(size_t nr, size_t k, const char* a, size_t a_stride, const uint32_t* w, float* c, size_t ldc,
          const GemmEpilogue* ep) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm256_setzero_ps();
    acc1[i] = _mm256_setzero_ps();
  }
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const size_t full_pairs = k / 2;
  for (size_t p = 0; p < full_pairs; ++p) {
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + p * kNr));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + p * kNr + 8));
    const __m256 lo0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    const __m256 lo1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    const __m256 hi0 = _mm256_castsi256_ps(_mm256_and_si256(w0, hi_mask));
    const __m256 hi1 = _mm256_castsi256_ps(_mm256_and_si256(w1, hi_mask));
#pragma GCC unroll 8
    for (size_t i = 0; i < MR; ++i) {
      const float* ai = reinterpret_cast<const float*>(a + i * a_stride) + 2 * p;
      const __m256 a0 = _mm256_broadcast_ss(ai), a1 = _mm256_broadcast_ss(ai + 1);
      acc0[i] = _mm256_fmadd_ps(a0, lo0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(a0, lo1, acc1[i]);
      acc0[i] = _mm256_fmadd_ps(a1, hi0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(a1, hi1, acc1[i]);
    }
  }
  if (k & 1) {  // last pair: the high halves are zero padding and A has no element k
    const size_t p = full_pairs;
    const __m256 lo0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(w + p * kNr)), 16));
    const __m256 lo1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(w + p * kNr + 8)), 16));
#pragma GCC unroll 8
    for (size_t i = 0; i < MR; ++i) {
      const __m256 a0 = _mm256_broadcast_ss(reinterpret_cast<const float*>(a + i * a_stride) + 2 * p);
      acc0[i] = _mm256_fmadd_ps(a0, lo0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(a0, lo1, acc1[i]);
    }
  }
  const __m256i m0 = avx2::LowpMask(nr, 0), m1 = avx2::LowpMask(nr, 8);
  avx2::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx2::LoadColumnTerms(ep, 0, m0);
    t1 = avx2::LoadColumnTerms(ep, 8, m1);
  }
#pragma GCC unroll 8
  for (size_t i = 0; i < MR; ++i) {
    avx2::LowpStore(acc0[i], t0, c + i * ldc, i, 0, m0, ep);
    avx2::LowpStore(acc1[i], t1, c + i * ldc, i, 8, m1, ep);
  }
}

using TileFn = void (*)(size_t, size_t, const char*, size_t, const uint32_t*, float*, size_t, const GemmEpilogue*);
const TileFn kTiles[kMr + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>};

void Bf16Gemm4x16Avx2(size_t mr, size_t nr, size_t k, const void* a, size_t a_stride, const void* w,
                      float* c, size_t ldc, const LowpGemmQuant*, const GemmEpilogue* ep) {
  if (mr == 0 || mr > kMr) return;
  kTiles[mr](nr, k, static_cast<const char*>(a), a_stride, static_cast<const uint32_t*>(w), c, ldc, ep);
}

}  // namespace

LowpGemmUkernelInfo Bf16GemmUkernelAvx2() { return {Bf16Gemm4x16Avx2, kMr, kNr, kLowpAF32, "bf16_gemm_4x16__avx2"}; }

}  // namespace kernels
}  // namespace sonde
