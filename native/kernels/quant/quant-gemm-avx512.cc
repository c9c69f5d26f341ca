// AVX-512 blocked GEMM of f32 / f16 / bf16 weights (layout and precision: quant.h).
//
// Packing widens a panel of 32 weight rows to fp32, K-major, once per call; the microkernel then
// runs 12 activation rows x 32 weight rows: 24 fp32 accumulators + 2 weight vectors + 1 broadcast
// = 27 of the 32 zmm. Per k it issues 2 loads, 12 broadcasts (load-port uops) and 24 FMAs, so the
// two FMA pipes, not the loads, bound it; each output is a single FMA chain over k in order (the
// precision definition's fp32 sum).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <string.h>

#include "kernels/quant/quant-transpose-avx512.h"
#include "kernels/quant/quant.h"

namespace sonde {
namespace kernels {
namespace {

const size_t kMr = 12;

// 16 consecutive weights of a row as fp32.
template <int32_t T>
inline __m512 Load16(const uint8_t* row, size_t p, __mmask16 m) {
  if (T == kQuantF32) return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + p);
  const __m256i h = _mm256_maskz_loadu_epi16(m, row + 2 * p);
  if (T == kQuantF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Widens 16 rows x 16 columns at a time and transposes them in registers: a scalar pack costs
// about as much as the microkernel at M = 64.
template <int32_t T>
void PackFloat(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, uint8_t* panel_bytes) {
  float* panel = reinterpret_cast<float*>(panel_bytes);
  for (size_t half = 0; half < 2; ++half) {
    for (size_t p = 0; p < k; p += 16) {
      const __mmask16 m = k - p >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - p)) - 1);
      __m512 r[16];
      for (size_t i = 0; i < 16; ++i) {
        const size_t row = half * 16 + i;
        r[i] = row < nr ? Load16<T>(w + row * row_bytes, p, m) : _mm512_setzero_ps();
      }
      Transpose16(r);
      const size_t cols = k - p >= 16 ? 16 : k - p;
      for (size_t c = 0; c < cols; ++c) _mm512_store_ps(panel + (p + c) * kQuantGemmNr + half * 16, r[c]);
    }
  }
}

template <size_t MR>
void GemmMr(size_t nr, size_t k, const uint8_t* panel_bytes, const QuantActs* a, float* y, size_t ldy) {
  const float* panel = reinterpret_cast<const float*>(panel_bytes);
  __m512 acc0[MR], acc1[MR];
  for (size_t i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  const float* x = a->x;
  const size_t ldx = a->ldx;
  for (size_t p = 0; p < k; ++p) {
    const __m512 w0 = _mm512_load_ps(panel + p * kQuantGemmNr), w1 = _mm512_load_ps(panel + p * kQuantGemmNr + 16);
    for (size_t i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * ldx + p]);
      acc0[i] = _mm512_fmadd_ps(xv, w0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(xv, w1, acc1[i]);
    }
  }
  StoreTile32<MR>(nr, acc0, acc1, y, ldy);
}

void Gemm(size_t mr, size_t nr, size_t k, const uint8_t* panel, const QuantActs* a, float* y, size_t ldy) {
  switch (mr) {
    case 12: return GemmMr<12>(nr, k, panel, a, y, ldy);
    case 11: return GemmMr<11>(nr, k, panel, a, y, ldy);
    case 10: return GemmMr<10>(nr, k, panel, a, y, ldy);
    case 9: return GemmMr<9>(nr, k, panel, a, y, ldy);
    case 8: return GemmMr<8>(nr, k, panel, a, y, ldy);
    case 7: return GemmMr<7>(nr, k, panel, a, y, ldy);
    case 6: return GemmMr<6>(nr, k, panel, a, y, ldy);
    case 5: return GemmMr<5>(nr, k, panel, a, y, ldy);
    case 4: return GemmMr<4>(nr, k, panel, a, y, ldy);
    case 3: return GemmMr<3>(nr, k, panel, a, y, ldy);
    case 2: return GemmMr<2>(nr, k, panel, a, y, ldy);
    case 1: return GemmMr<1>(nr, k, panel, a, y, ldy);
    default: return;
  }
}

}  // namespace

QuantGemmUkernelInfo QuantGemmUkernelAvx512(int32_t type) {
  switch (type) {
    case kQuantF32: return {PackFloat<kQuantF32>, Gemm, kMr, kQuantActF32, "f32_gemm_12x32__avx512"};
    case kQuantF16: return {PackFloat<kQuantF16>, Gemm, kMr, kQuantActF32, "f16_gemm_12x32__avx512"};
    case kQuantBf16: return {PackFloat<kQuantBf16>, Gemm, kMr, kQuantActF32, "bf16_gemm_12x32__avx512"};
    default: return {nullptr, nullptr, 0, 0, "?"};
  }
}

}  // namespace kernels
}  // namespace sonde
