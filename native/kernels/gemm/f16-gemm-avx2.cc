// AVX2 fp16-weight GEMM: F16C widens 8 halves per vcvtph2ps, then fp32 FMA with A in fp32.
// 6x16 tile as f32_gemm_6x16__avx2: 12 ymm accumulators + 2 weight vectors + 1 broadcast = 15 of
// the 16 registers.
#include <immintrin.h>

#include "kernels/gemm/lowp-avx2.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 6;
constexpr size_t kNr = 16;

template <size_t MR>
void Tile(size_t nr, size_t k, const char* a, size_t a_stride, const uint16_t* w, float* c, size_t ldc,
          const GemmEpilogue* ep) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm256_setzero_ps();
    acc1[i] = _mm256_setzero_ps();
  }
  for (size_t kk = 0; kk < k; ++kk) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(w + kk * kNr)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(w + kk * kNr + 8)));
#pragma GCC unroll 8
    for (size_t i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(reinterpret_cast<const float*>(a + i * a_stride) + kk);
      acc0[i] = _mm256_fmadd_ps(av, w0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(av, w1, acc1[i]);
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

using TileFn = void (*)(size_t, size_t, const char*, size_t, const uint16_t*, float*, size_t, const GemmEpilogue*);
const TileFn kTiles[kMr + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>};

void F16Gemm6x16Avx2(size_t mr, size_t nr, size_t k, const void* a, size_t a_stride, const void* w,
                     float* c, size_t ldc, const LowpGemmQuant*, const GemmEpilogue* ep) {
  if (mr == 0 || mr > kMr) return;
  kTiles[mr](nr, k, static_cast<const char*>(a), a_stride, static_cast<const uint16_t*>(w), c, ldc, ep);
}

}  // namespace

LowpGemmUkernelInfo F16GemmUkernelAvx2() { return {F16Gemm6x16Avx2, kMr, kNr, kLowpAF32, "f16_gemm_6x16__avx2"}; }

}  // namespace kernels
}  // namespace sonde
