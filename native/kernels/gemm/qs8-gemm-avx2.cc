// AVX2 int8 GEMM. Exact like the VNNI kernel: vpmaddubsw would saturate its int16 pair sums
// (255 * 127 * 2 > 32767), so each quad lane is split into even and odd bytes as int16 (A
// zero-extended, W sign-extended once per k quad for all rows) and vpmaddwd adds int16 products
// into s32 exactly.
// 4x16 tile: 8 ymm accumulators + 4 split weight vectors + 2 split activations + 2 products = 16
// registers (the byte mask is folded into a memory operand).
#include <immintrin.h>

#include "kernels/gemm/lowp-avx2.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 4;
constexpr size_t kNr = 16;

template <size_t MR>
void Tile(size_t nr, size_t k, const uint8_t* a, size_t a_stride, const int32_t* w, float* c, size_t ldc,
          const LowpGemmQuant* q, const GemmEpilogue* ep) {
  __m256i acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm256_setzero_si256();
    acc1[i] = _mm256_setzero_si256();
  }
  const __m256i low_bytes = _mm256_set1_epi16(0x00FF);
  const size_t quads = (k + 3) / 4;
  for (size_t p = 0; p < quads; ++p) {
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + p * kNr));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + p * kNr + 8));
    const __m256i we0 = _mm256_srai_epi16(_mm256_slli_epi16(w0, 8), 8), wo0 = _mm256_srai_epi16(w0, 8);
    const __m256i we1 = _mm256_srai_epi16(_mm256_slli_epi16(w1, 8), 8), wo1 = _mm256_srai_epi16(w1, 8);
#pragma GCC unroll 8
    for (size_t i = 0; i < MR; ++i) {
      const __m256i av = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(a + i * a_stride)[p]);
      const __m256i ae = _mm256_and_si256(av, low_bytes), ao = _mm256_srli_epi16(av, 8);
      acc0[i] = _mm256_add_epi32(acc0[i], _mm256_add_epi32(_mm256_madd_epi16(ae, we0), _mm256_madd_epi16(ao, wo0)));
      acc1[i] = _mm256_add_epi32(acc1[i], _mm256_add_epi32(_mm256_madd_epi16(ae, we1), _mm256_madd_epi16(ao, wo1)));
    }
  }
  const __m256i m0 = avx2::LowpMask(nr, 0), m1 = avx2::LowpMask(nr, 8);
  const avx2::Qs8ColumnTerms q0 = avx2::LoadQs8ColumnTerms(q, 0, m0), q1 = avx2::LoadQs8ColumnTerms(q, 8, m1);
  avx2::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx2::LoadColumnTerms(ep, 0, m0);
    t1 = avx2::LoadColumnTerms(ep, 8, m1);
  }
#pragma GCC unroll 8
  for (size_t i = 0; i < MR; ++i) {
    avx2::LowpStore(avx2::Qs8Dequantize(acc0[i], q0, q, i), t0, c + i * ldc, i, 0, m0, ep);
    avx2::LowpStore(avx2::Qs8Dequantize(acc1[i], q1, q, i), t1, c + i * ldc, i, 8, m1, ep);
  }
}

using TileFn = void (*)(size_t, size_t, const uint8_t*, size_t, const int32_t*, float*, size_t,
                        const LowpGemmQuant*, const GemmEpilogue*);
const TileFn kTiles[kMr + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>};

void Qs8Gemm4x16Avx2(size_t mr, size_t nr, size_t k, const void* a, size_t a_stride, const void* w,
                     float* c, size_t ldc, const LowpGemmQuant* q, const GemmEpilogue* ep) {
  if (mr == 0 || mr > kMr) return;
  kTiles[mr](nr, k, static_cast<const uint8_t*>(a), a_stride, static_cast<const int32_t*>(w), c, ldc, q, ep);
}

}  // namespace

LowpGemmUkernelInfo Qs8GemmUkernelAvx2() { return {Qs8Gemm4x16Avx2, kMr, kNr, kLowpAU8Quads, "qs8_gemm_4x16__avx2"}; }

}  // namespace kernels
}  // namespace sonde
