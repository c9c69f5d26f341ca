// AVX-512 pointwise-conv GEMM, 12x32 tile: the f32 GEMM kernel of kernels/gemm, except that B is
// read in place from the NCHW input (row k = channel k, rows ldb = H*W floats apart; masked loads at
// the end of a row so nothing past it is read) and a per-row bias (one per output channel) seeds the
// accumulators. A is element (i, k) at a[i * lda + k * ldk]: row-major weights (ldk 1) or the direct
// path's 32-channel blocks (lda 1, ldk 32), so one packed copy serves both. A 1x1 stride-1 convolution then needs no packing pass at all: with C_out = 32..64
// the im2col copy cost as much as the FMAs. Same registers as the GEMM kernel: 24 zmm
// accumulators + 2 for the B row + 1 broadcast = 27 of 32.
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h for _mm512_setzero_ps/masked loads.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/conv/conv.h"
#include "kernels/gemm/epilogue-avx512.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 12;
constexpr size_t kNr = 32;

template <size_t MR>
void Tile(size_t nr, size_t kc, const float* a, size_t lda, size_t ldk, const float* b, size_t ldb, const float* row_bias,
          float* c, size_t ldc, bool accumulate, const GemmEpilogue* ep) {
  const __mmask16 m0 = nr >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : static_cast<__mmask16>((1u << (nr - 16)) - 1);
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = row_bias ? _mm512_set1_ps(row_bias[i]) : _mm512_setzero_ps();
    acc1[i] = acc0[i];
  }
  for (size_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_maskz_loadu_ps(m0, b + k * ldb);
    const __m512 w1 = _mm512_maskz_loadu_ps(m1, b + k * ldb + 16);
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k * ldk]);
      acc0[i] = _mm512_fmadd_ps(av, w0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(av, w1, acc1[i]);
    }
  }
  avx512::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx512::LoadColumnTerms(ep, 0, m0);
    t1 = avx512::LoadColumnTerms(ep, 16, m1);
  }
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    __m512 v0 = acc0[i], v1 = acc1[i];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ci));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, ci + 16));
    }
    if (ep) {
      v0 = avx512::ApplyEpilogue(v0, t0, ep, i, 0, m0);
      v1 = avx512::ApplyEpilogue(v1, t1, ep, i, 16, m1);
    }
    _mm512_mask_storeu_ps(ci, m0, v0);
    _mm512_mask_storeu_ps(ci + 16, m1, v1);
  }
}

void F32ConvGemm12x32Avx512(size_t mr, size_t nr, size_t kc, const float* a, size_t lda, size_t ldk, const float* b, size_t ldb,
                            const float* row_bias, float* c, size_t ldc, bool accumulate, const GemmEpilogue* ep) {
  switch (mr) {
    case 12: return Tile<12>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 11: return Tile<11>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 10: return Tile<10>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 9: return Tile<9>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 8: return Tile<8>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 7: return Tile<7>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 6: return Tile<6>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 5: return Tile<5>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 4: return Tile<4>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 3: return Tile<3>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 2: return Tile<2>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    case 1: return Tile<1>(nr, kc, a, lda, ldk, b, ldb, row_bias, c, ldc, accumulate, ep);
    default: return;
  }
}

}  // namespace

F32ConvGemmUkernelInfo F32ConvGemmUkernelAvx512() {
  return {F32ConvGemm12x32Avx512, kMr, kNr, "f32_conv1x1_gemm_12x32__avx512"};
}

}  // namespace kernels
}  // namespace sonde
