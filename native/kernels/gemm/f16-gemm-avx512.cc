// AVX-512 fp16-weight GEMM: F16C widens 16 halves per vcvtph2ps, then fp32 FMA with A in fp32.
// 12x32 tile as f32_gemm_12x32__avx512: 24 zmm accumulators + 2 widened weight vectors + 1
// broadcast = 27 of 32 registers; two conversions are amortised over 24 FMAs per k.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/gemm/lowp-avx512.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 12;
constexpr size_t kNr = 32;

template <size_t MR>
void Tile(size_t nr, size_t k, const char* a, size_t a_stride, const uint16_t* w, float* c, size_t ldc,
          const GemmEpilogue* ep) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  for (size_t kk = 0; kk < k; ++kk) {
    const __m512 w0 = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(w + kk * kNr)));
    const __m512 w1 = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(w + kk * kNr + 16)));
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(reinterpret_cast<const float*>(a + i * a_stride)[kk]);
      acc0[i] = _mm512_fmadd_ps(av, w0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(av, w1, acc1[i]);
    }
  }
  const __mmask16 m0 = avx512::LowpMask(nr, 0), m1 = avx512::LowpMask(nr, 16);
  avx512::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx512::LoadColumnTerms(ep, 0, m0);
    t1 = avx512::LoadColumnTerms(ep, 16, m1);
  }
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    avx512::LowpStore(acc0[i], t0, c + i * ldc, i, 0, m0, ep);
    avx512::LowpStore(acc1[i], t1, c + i * ldc, i, 16, m1, ep);
  }
}

using TileFn = void (*)(size_t, size_t, const char*, size_t, const uint16_t*, float*, size_t, const GemmEpilogue*);
const TileFn kTiles[kMr + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>,
                                Tile<7>, Tile<8>, Tile<9>, Tile<10>, Tile<11>, Tile<12>};

void F16Gemm12x32Avx512(size_t mr, size_t nr, size_t k, const void* a, size_t a_stride, const void* w,
                        float* c, size_t ldc, const LowpGemmQuant*, const GemmEpilogue* ep) {
  if (mr == 0 || mr > kMr) return;
  kTiles[mr](nr, k, static_cast<const char*>(a), a_stride, static_cast<const uint16_t*>(w), c, ldc, ep);
}

}  // namespace

LowpGemmUkernelInfo F16GemmUkernelAvx512() {
  return {F16Gemm12x32Avx512, kMr, kNr, kLowpAF32, "f16_gemm_12x32__avx512"};
}

}  // namespace kernels
}  // namespace sonde
