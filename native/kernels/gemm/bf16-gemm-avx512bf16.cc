// AVX-512 BF16 GEMM, 12x32 tile: each vdpbf16ps does 16 lanes x 2 k (a bf16 pair of A broadcast
// against the pair-interleaved weight lanes) into fp32. 24 zmm accumulators + 2 weight vectors +
// 1 broadcast = 27 of 32 registers; 24 independent chains cover the dot-product latency (5-6
// cycles) at up to two issues per cycle. A is rounded to bf16 (nearest even) by the operator, so
// this kernel rounds activations too, like oneDNN's and ONNX Runtime's bf16 matmul.
// vdpbf16ps flushes denormal inputs and outputs to zero (it ignores MXCSR).
// Checked with objdump (GCC 12, -O3): the k loop is 2 aligned loads + 12 vpbroadcastd + 24
// vdpbf16ps with all accumulators in zmm registers, no spills (unlike _mm512_dpbusd_epi32, see
// qs8-gemm-avx512vnni.cc).
// GCC 12 reports a false -Wmaybe-uninitialized inside the avx512 intrinsics headers.
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
void Tile(size_t nr, size_t k, const char* a, size_t a_stride, const uint32_t* w, float* c, size_t ldc,
          const GemmEpilogue* ep) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  const size_t pairs = (k + 1) / 2;
  for (size_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_load_si512(w + p * kNr);
    const __m512bh w1 = (__m512bh)_mm512_load_si512(w + p * kNr + 16);
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(reinterpret_cast<const int32_t*>(a + i * a_stride)[p]);
      acc0[i] = _mm512_dpbf16_ps(acc0[i], av, w0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], av, w1);
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

void Bf16Gemm12x32Avx512Bf16(size_t mr, size_t nr, size_t k, const void* a_, size_t a_stride, const void* w_,
                             float* c, size_t ldc, const LowpGemmQuant*, const GemmEpilogue* ep) {
  const char* a = static_cast<const char*>(a_);
  const uint32_t* w = static_cast<const uint32_t*>(w_);
  switch (mr) {
    case 12: return Tile<12>(nr, k, a, a_stride, w, c, ldc, ep);
    case 11: return Tile<11>(nr, k, a, a_stride, w, c, ldc, ep);
    case 10: return Tile<10>(nr, k, a, a_stride, w, c, ldc, ep);
    case 9: return Tile<9>(nr, k, a, a_stride, w, c, ldc, ep);
    case 8: return Tile<8>(nr, k, a, a_stride, w, c, ldc, ep);
    case 7: return Tile<7>(nr, k, a, a_stride, w, c, ldc, ep);
    case 6: return Tile<6>(nr, k, a, a_stride, w, c, ldc, ep);
    case 5: return Tile<5>(nr, k, a, a_stride, w, c, ldc, ep);
    case 4: return Tile<4>(nr, k, a, a_stride, w, c, ldc, ep);
    case 3: return Tile<3>(nr, k, a, a_stride, w, c, ldc, ep);
    case 2: return Tile<2>(nr, k, a, a_stride, w, c, ldc, ep);
    case 1: return Tile<1>(nr, k, a, a_stride, w, c, ldc, ep);
    default: return;
  }
}

}  // namespace

LowpGemmUkernelInfo Bf16GemmUkernelAvx512Bf16() {
  return {Bf16Gemm12x32Avx512Bf16, kMr, kNr, kLowpABf16Pairs, "bf16_gemm_12x32__avx512bf16"};
}

}  // namespace kernels
}  // namespace sonde
