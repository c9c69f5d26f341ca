// AVX-512 quantised-weight dot products. Float weights: 16 lanes per step, two accumulator sets per
// row (the FMA latency chain of a GEMV), a masked tail for K not a multiple of 16 (masked loads do
// not fault past the end of the row). Block weights: quant-avx512.h, exact int16 path.
#include "kernels/quant/quant-avx512.h"

namespace sonde {
namespace kernels {
namespace {

template <int32_t T>
inline __m512 LoadW16(const uint8_t* w, size_t p, __mmask16 m) {
  if (T == kQuantF32) return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(w) + p);
  const __m256i h = _mm256_maskz_loadu_epi16(m, w + 2 * p);
  if (T == kQuantF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int32_t T, size_t MR>
void FloatDotMr(size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  __m512 acc0[MR], acc1[MR];
  for (size_t i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  const __mmask16 all = 0xFFFF;
  size_t p = 0;
  for (; p + 32 <= k; p += 32) {
    const __m512 w0 = LoadW16<T>(w, p, all), w1 = LoadW16<T>(w, p + 16, all);
    for (size_t i = 0; i < MR; ++i) {
      const float* x = a->x + i * a->ldx + p;
      acc0[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x), w0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), w1, acc1[i]);
    }
  }
  for (; p < k; p += 16) {
    const __mmask16 m = k - p >= 16 ? all : static_cast<__mmask16>((1u << (k - p)) - 1);
    const __m512 w0 = LoadW16<T>(w, p, m);
    for (size_t i = 0; i < MR; ++i)
      acc0[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a->x + i * a->ldx + p), w0, acc0[i]);
  }
  for (size_t i = 0; i < MR; ++i) y[i * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
}

template <int32_t T>
void FloatDot(size_t mr, size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  switch (mr) {
    case 4: return FloatDotMr<T, 4>(k, w, a, y, ldy);
    case 3: return FloatDotMr<T, 3>(k, w, a, y, ldy);
    case 2: return FloatDotMr<T, 2>(k, w, a, y, ldy);
    case 1: return FloatDotMr<T, 1>(k, w, a, y, ldy);
    default: return;
  }
}

}  // namespace

QuantDotUkernelInfo QuantDotUkernelAvx512(int32_t type) {
  switch (type) {
    case kQuantF32: return {FloatDot<kQuantF32>, kQuantActF32, 0, "f32_dot_4xk__avx512"};
    case kQuantF16: return {FloatDot<kQuantF16>, kQuantActF32, 0, "f16_dot_4xk__avx512"};
    case kQuantBf16: return {FloatDot<kQuantBf16>, kQuantActF32, 0, "bf16_dot_4xk__avx512"};
    case kQuantQ8_0: return {BlockDot<kQuantQ8_0, false>, kQuantActQ8, 0, "q8_0_qs8_dot_4xk__avx512_maddubs"};
    case kQuantQ4_0: return {BlockDot<kQuantQ4_0, false>, kQuantActQ8, 0, "q4_0_qs8_dot_4xk__avx512_maddubs"};
    default: return {nullptr, 0, 0, "?"};
  }
}

}  // namespace kernels
}  // namespace sonde
