// A 16 x 16 transpose of 32-bit elements in zmm registers, shared by the blocked GEMMs' packing
// (quant-gemm-avx512.cc: fp32 weights; quant-gemm-avx512vnni.cc: 4-byte groups of int8 weights).
// Anonymous namespace: each ISA translation unit gets its own copy.
#pragma once
#include <immintrin.h>

namespace sonde {
namespace kernels {
namespace {

// 16 x 16 fp32 transpose in registers: r[i] holds row i on entry, column i on exit.
inline void Transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // r[4a + b], 128-bit lane L: column 4L + b of rows 4a .. 4a + 3. Column c = 4L + b is lane L of
  // r[b], r[4 + b], r[8 + b], r[12 + b]: a 4 x 4 transpose of 128-bit lanes for each b.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

}  // namespace
}  // namespace kernels
}  // namespace sonde
