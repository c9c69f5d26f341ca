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

// One activation row (decode) against nr weight rows, read one after another: a single sequential
// stream, which the hardware prefetchers follow at the read bandwidth (rows side by side, even 2
// or 4 of them, fell to a fraction of it on the 2-core AVX-512 VM). Four accumulators: a step of
// 16 f16 weights is 32 bytes, so the 4-cycle FMA chain of FloatDotMr's two would cap one row at 16
// bytes a cycle, near the bandwidth; with four the loop runs well above it (L2-resident f16: 70
// against 49 GB/s) and stays memory-bound. No per-row indirect call or mr switch.
template <int32_t T>
void FloatRows(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, const QuantActs* a, float* y) {
  const float* x = a->x;
  const __mmask16 all = 0xFFFF;
  for (size_t j = 0; j < nr; ++j, w += row_bytes) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    size_t p = 0;
    for (; p + 64 <= k; p += 64) {
      acc0 = _mm512_fmadd_ps(LoadW16<T>(w, p, all), _mm512_loadu_ps(x + p), acc0);
      acc1 = _mm512_fmadd_ps(LoadW16<T>(w, p + 16, all), _mm512_loadu_ps(x + p + 16), acc1);
      acc2 = _mm512_fmadd_ps(LoadW16<T>(w, p + 32, all), _mm512_loadu_ps(x + p + 32), acc2);
      acc3 = _mm512_fmadd_ps(LoadW16<T>(w, p + 48, all), _mm512_loadu_ps(x + p + 48), acc3);
    }
    for (; p < k; p += 16) {
      const __mmask16 m = k - p >= 16 ? all : static_cast<__mmask16>((1u << (k - p)) - 1);
      acc0 = _mm512_fmadd_ps(LoadW16<T>(w, p, m), _mm512_maskz_loadu_ps(m, x + p), acc0);
    }
    y[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
  }
}

}  // namespace

void QuantizeActivationRowAvx512(const float* x, size_t k, int8_t* q, float* d, int32_t* sums) {
  const size_t nb = k / kQuantBlock, nb_pad = (nb + 1) & ~static_cast<size_t>(1);
  const __m512 sign = _mm512_set1_ps(-0.0f), big = _mm512_set1_ps(3.40282347e+38f);  // FLT_MAX
  for (size_t b = 0; b < nb; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + b * kQuantBlock), x1 = _mm512_loadu_ps(x + b * kQuantBlock + 16);
    const __m512 a0 = _mm512_andnot_ps(sign, x0), a1 = _mm512_andnot_ps(sign, x1);
    // NaN compares false: a block holding NaN or +-Inf is not finite.
    const bool finite = (_mm512_cmp_ps_mask(a0, big, _CMP_LE_OQ) & _mm512_cmp_ps_mask(a1, big, _CMP_LE_OQ)) == 0xFFFF;
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    int8_t* qb = q + b * kQuantBlock;
    int32_t s = 0;
    if (!finite || amax < 7.52316384526264e-37f) {  // 2^-120, the scalar quantiser's threshold
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_setzero_si256());
      d[b] = finite ? 0.0f : __builtin_nanf("");
    } else {
      const __m512 id = _mm512_set1_ps(127.0f / amax);
      d[b] = amax / 127.0f;
      // cvtps2dq rounds by MXCSR: nearest, ties to even, as nearbyintf does.
      const __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), v1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(v0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(v1));
      s = _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));
    }
    if (sums) sums[b] = s;
  }
  for (size_t b = nb; b < nb_pad; ++b) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQuantBlock), _mm256_setzero_si256());
    d[b] = 0.0f;
    if (sums) sums[b] = 0;
  }
}

QuantDotUkernelInfo QuantDotUkernelAvx512(int32_t type) {
  switch (type) {
    case kQuantF32: return {FloatDot<kQuantF32>, kQuantActF32, 0, "f32_dot_4xk__avx512", FloatRows<kQuantF32>};
    case kQuantF16: return {FloatDot<kQuantF16>, kQuantActF32, 0, "f16_dot_4xk__avx512", FloatRows<kQuantF16>};
    case kQuantBf16: return {FloatDot<kQuantBf16>, kQuantActF32, 0, "bf16_dot_4xk__avx512", FloatRows<kQuantBf16>};
    case kQuantQ8_0: return {BlockDot<kQuantQ8_0, false>, kQuantActQ8, 0, "q8_0_qs8_dot_4xk__avx512_maddubs"};
    case kQuantQ4_0: return {BlockDot<kQuantQ4_0, false>, kQuantActQ8, 0, "q4_0_qs8_dot_4xk__avx512_maddubs"};
    default: return {nullptr, 0, 0, "?"};
  }
}

}  // namespace kernels
}  // namespace sonde
