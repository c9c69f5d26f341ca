// AVX2 quantised-weight dot products. Float weights: 8 lanes per step, two interleaved accumulator
// sets per row so the 4-cycle FMA chain does not limit a GEMV. Block weights: one block (32 int8)
// per ymm, exact int8 products with the llama.cpp sign trick: vpmaddubsw(|w|, sign(x, w)) gives
// pairs |w| * (+-x) <= 2 * 128 * 127 = 32512, below int16 saturation because the activations are
// in [-127, 127]; vpmaddwd with ones widens to int32. Each block's int32 lanes are converted to fp32
// and FMA'd with fp32(dw * dx) into a vector accumulator, reduced once per row.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <string.h>

#include "kernels/quant/quant.h"

namespace sonde {
namespace kernels {
namespace {

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int32_t T>
inline __m256 LoadW8(const uint8_t* w, size_t p) {
  if (T == kQuantF32) return _mm256_loadu_ps(reinterpret_cast<const float*>(w) + p);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * p));
  if (T == kQuantF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int32_t T>
inline float WeightAt(const uint8_t* w, size_t p) {
  if (T == kQuantF32) {
    float v;
    memcpy(&v, w + 4 * p, 4);
    return v;
  }
  uint16_t h;
  memcpy(&h, w + 2 * p, 2);
  if (T == kQuantF16) return _cvtsh_ss(h);
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

template <int32_t T, size_t MR>
void FloatDotMr(size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  __m256 acc0[MR], acc1[MR];
  for (size_t i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  size_t p = 0;
  for (; p + 16 <= k; p += 16) {
    const __m256 w0 = LoadW8<T>(w, p), w1 = LoadW8<T>(w, p + 8);
    for (size_t i = 0; i < MR; ++i) {
      const float* x = a->x + i * a->ldx + p;
      acc0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w1, acc1[i]);
    }
  }
  if (p + 8 <= k) {
    const __m256 w0 = LoadW8<T>(w, p);
    for (size_t i = 0; i < MR; ++i) acc0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a->x + i * a->ldx + p), w0, acc0[i]);
    p += 8;
  }
  for (size_t i = 0; i < MR; ++i) {
    float s = HSum(_mm256_add_ps(acc0[i], acc1[i]));
    const float* x = a->x + i * a->ldx;
    for (size_t q = p; q < k; ++q) s += x[q] * WeightAt<T>(w, q);
    y[i * ldy] = s;
  }
}

// One block's 32 weights as signed int8 and its scale.
template <int32_t T>
inline __m256i LoadBlock(const uint8_t* w, size_t b, float* dw) {
  if (T == kQuantQ8_0) {
    const uint8_t* blk = w + b * kQ8_0BlockBytes;
    uint16_t h;
    memcpy(&h, blk, 2);
    *dw = _cvtsh_ss(h);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  }
  const uint8_t* blk = w + b * kQ4_0BlockBytes;
  uint16_t h;
  memcpy(&h, blk, 2);
  *dw = _cvtsh_ss(h);
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m), _mm_and_si128(qs, m));
  return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
}

template <int32_t T, size_t MR>
inline void Block(const uint8_t* w, size_t b, const QuantActs* a, __m256* acc) {
  float dw;
  const __m256i wq = LoadBlock<T>(w, b, &dw);
  const __m256i wabs = _mm256_sign_epi8(wq, wq);
  for (size_t i = 0; i < MR; ++i) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a->q + i * a->q_stride + b * kQuantBlock));
    const __m256i p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, wq));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
    acc[i] = _mm256_fmadd_ps(f, _mm256_set1_ps(dw * a->d[i * a->d_stride + b]), acc[i]);
  }
}

// Even and odd blocks go to two accumulator sets: a single row's FMA chain would otherwise bound
// the loop at one block per FMA latency.
template <int32_t T, size_t MR>
void BlockDotMr(size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  __m256 acc0[MR], acc1[MR];
  for (size_t i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  const size_t nb = k / kQuantBlock;
  size_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    Block<T, MR>(w, b, a, acc0);
    Block<T, MR>(w, b + 1, a, acc1);
  }
  if (b < nb) Block<T, MR>(w, b, a, acc0);
  for (size_t i = 0; i < MR; ++i) y[i * ldy] = HSum(_mm256_add_ps(acc0[i], acc1[i]));
}

template <int32_t T, bool kBlock>
void Dot(size_t mr, size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  switch (mr) {
    case 4: return kBlock ? BlockDotMr<T, 4>(k, w, a, y, ldy) : FloatDotMr<T, 4>(k, w, a, y, ldy);
    case 3: return kBlock ? BlockDotMr<T, 3>(k, w, a, y, ldy) : FloatDotMr<T, 3>(k, w, a, y, ldy);
    case 2: return kBlock ? BlockDotMr<T, 2>(k, w, a, y, ldy) : FloatDotMr<T, 2>(k, w, a, y, ldy);
    case 1: return kBlock ? BlockDotMr<T, 1>(k, w, a, y, ldy) : FloatDotMr<T, 1>(k, w, a, y, ldy);
    default: return;
  }
}

}  // namespace

QuantDotUkernelInfo QuantDotUkernelAvx2(int32_t type) {
  switch (type) {
    case kQuantF32: return {Dot<kQuantF32, false>, kQuantActF32, 0, "f32_dot_4xk__avx2"};
    case kQuantF16: return {Dot<kQuantF16, false>, kQuantActF32, 0, "f16_dot_4xk__avx2"};
    case kQuantBf16: return {Dot<kQuantBf16, false>, kQuantActF32, 0, "bf16_dot_4xk__avx2"};
    case kQuantQ8_0: return {Dot<kQuantQ8_0, true>, kQuantActQ8, 0, "q8_0_qs8_dot_4xk__avx2_maddubs"};
    case kQuantQ4_0: return {Dot<kQuantQ4_0, true>, kQuantActQ8, 0, "q4_0_qs8_dot_4xk__avx2_maddubs"};
    default: return {nullptr, 0, 0, "?"};
  }
}

}  // namespace kernels
}  // namespace sonde
