// AVX-512F bf16-weight GEMM for CPUs without AVX512_BF16: each weight lane (a bf16 pair) is widened
// to two fp32 vectors with one shift (low half) and one AND (high half), then fp32 FMA with A kept
// in fp32 -- more exact than the vdpbf16ps kernel, which rounds A to bf16 as well.
// 8x32 tile: 16 zmm accumulators + 4 widened weight vectors + 2 broadcasts + the AND mask = 23
// registers; 16 independent chains cover the 4-cycle FMA latency on two pipes. (12 rows would need
// 24 + 4 + 2 + 1 = 31 and leave the compiler no room.)
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
void Tile(size_t nr, size_t k, const char* a, size_t a_stride, const uint32_t* w, float* c, size_t ldc,
          const GemmEpilogue* ep) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const size_t full_pairs = k / 2;
  for (size_t p = 0; p < full_pairs; ++p) {
    const __m512i w0 = _mm512_load_si512(w + p * kNr), w1 = _mm512_load_si512(w + p * kNr + 16);
    const __m512 lo0 = _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16));
    const __m512 lo1 = _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16));
    const __m512 hi0 = _mm512_castsi512_ps(_mm512_and_si512(w0, hi_mask));
    const __m512 hi1 = _mm512_castsi512_ps(_mm512_and_si512(w1, hi_mask));
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const float* ai = reinterpret_cast<const float*>(a + i * a_stride) + 2 * p;
      const __m512 a0 = _mm512_set1_ps(ai[0]), a1 = _mm512_set1_ps(ai[1]);
      acc0[i] = _mm512_fmadd_ps(a0, lo0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(a0, lo1, acc1[i]);
      acc0[i] = _mm512_fmadd_ps(a1, hi0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(a1, hi1, acc1[i]);
    }
  }
  if (k & 1) {  // last pair: the high halves are zero padding and A has no element k
    const size_t p = full_pairs;
    const __m512 lo0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_load_si512(w + p * kNr), 16));
    const __m512 lo1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_load_si512(w + p * kNr + 16), 16));
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512 a0 = _mm512_set1_ps(reinterpret_cast<const float*>(a + i * a_stride)[2 * p]);
      acc0[i] = _mm512_fmadd_ps(a0, lo0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(a0, lo1, acc1[i]);
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

using TileFn = void (*)(size_t, size_t, const char*, size_t, const uint32_t*, float*, size_t, const GemmEpilogue*);
const TileFn kTiles[kMr + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>, Tile<7>, Tile<8>};

void Bf16Gemm8x32Avx512(size_t mr, size_t nr, size_t k, const void* a, size_t a_stride, const void* w,
                        float* c, size_t ldc, const LowpGemmQuant*, const GemmEpilogue* ep) {
  if (mr == 0 || mr > kMr) return;
  kTiles[mr](nr, k, static_cast<const char*>(a), a_stride, static_cast<const uint32_t*>(w), c, ldc, ep);
}

}  // namespace

LowpGemmUkernelInfo Bf16GemmUkernelAvx512() {
  return {Bf16Gemm8x32Avx512, kMr, kNr, kLowpAF32, "bf16_gemm_8x32__avx512"};
}

}  // namespace kernels
}  // namespace sonde
