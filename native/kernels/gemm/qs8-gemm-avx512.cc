// AVX-512BW int8 GEMM for CPUs without VNNI. vpmaddubsw is not used: it adds two u8 x s8 products
// into a saturating int16 (255 * 127 * 2 > 32767). Instead each quad lane is split into its even
// and odd bytes as int16 (u8 zero-extended for A, s8 sign-extended for W, shared by all rows) and
// vpmaddwd adds pairs of int16 products into exact s32: two vpmaddwd + two vpaddd per vpdpbusd.
// 8x32 tile: 16 zmm accumulators + 4 split weight vectors + 2 split activations + 2 products +
// the byte mask = 25 registers (12 rows would not fit).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/gemm/lowp-avx512.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 8;
constexpr size_t kNr = 32;

template <size_t MR>
void Tile(size_t nr, size_t k, const uint8_t* a, size_t a_stride, const int32_t* w, float* c, size_t ldc,
          const LowpGemmQuant* q, const GemmEpilogue* ep) {
  __m512i acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_si512();
    acc1[i] = _mm512_setzero_si512();
  }
  const __m512i low_bytes = _mm512_set1_epi16(0x00FF);
  const size_t quads = (k + 3) / 4;
  for (size_t p = 0; p < quads; ++p) {
    const __m512i w0 = _mm512_load_si512(w + p * kNr), w1 = _mm512_load_si512(w + p * kNr + 16);
    const __m512i we0 = _mm512_srai_epi16(_mm512_slli_epi16(w0, 8), 8), wo0 = _mm512_srai_epi16(w0, 8);
    const __m512i we1 = _mm512_srai_epi16(_mm512_slli_epi16(w1, 8), 8), wo1 = _mm512_srai_epi16(w1, 8);
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(a + i * a_stride)[p]);
      const __m512i ae = _mm512_and_si512(av, low_bytes), ao = _mm512_srli_epi16(av, 8);
      acc0[i] = _mm512_add_epi32(acc0[i], _mm512_add_epi32(_mm512_madd_epi16(ae, we0), _mm512_madd_epi16(ao, wo0)));
      acc1[i] = _mm512_add_epi32(acc1[i], _mm512_add_epi32(_mm512_madd_epi16(ae, we1), _mm512_madd_epi16(ao, wo1)));
    }
  }
  const __mmask16 m0 = avx512::LowpMask(nr, 0), m1 = avx512::LowpMask(nr, 16);
  const avx512::Qs8ColumnTerms q0 = avx512::LoadQs8ColumnTerms(q, 0, m0), q1 = avx512::LoadQs8ColumnTerms(q, 16, m1);
  avx512::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx512::LoadColumnTerms(ep, 0, m0);
    t1 = avx512::LoadColumnTerms(ep, 16, m1);
  }
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    avx512::LowpStore(avx512::Qs8Dequantize(acc0[i], q0, q, i), t0, c + i * ldc, i, 0, m0, ep);
    avx512::LowpStore(avx512::Qs8Dequantize(acc1[i], q1, q, i), t1, c + i * ldc, i, 16, m1, ep);
  }
}

using TileFn = void (*)(size_t, size_t, const uint8_t*, size_t, const int32_t*, float*, size_t,
                        const LowpGemmQuant*, const GemmEpilogue*);
const TileFn kTiles[kMr + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>, Tile<7>, Tile<8>};

void Qs8Gemm8x32Avx512(size_t mr, size_t nr, size_t k, const void* a, size_t a_stride, const void* w,
                       float* c, size_t ldc, const LowpGemmQuant* q, const GemmEpilogue* ep) {
  if (mr == 0 || mr > kMr) return;
  kTiles[mr](nr, k, static_cast<const uint8_t*>(a), a_stride, static_cast<const int32_t*>(w), c, ldc, q, ep);
}

}  // namespace

LowpGemmUkernelInfo Qs8GemmUkernelAvx512() {
  return {Qs8Gemm8x32Avx512, kMr, kNr, kLowpAU8Quads, "qs8_gemm_8x32__avx512"};
}

}  // namespace kernels
}  // namespace sonde
