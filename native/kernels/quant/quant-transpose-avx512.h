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

// Stores the first nr (<= 32) columns of an MR x 32 tile held as two vectors per row, masked so
// that a partial panel writes nothing past its columns.
template <size_t MR>
inline void StoreTile32(size_t nr, const __m512* acc0, const __m512* acc1, float* y, size_t ldy) {
  const __mmask16 m0 = nr >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : static_cast<__mmask16>((1u << (nr - 16)) - 1);
  for (size_t i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + i * ldy, m0, acc0[i]);
    _mm512_mask_storeu_ps(y + i * ldy + 16, m1, acc1[i]);
  }
}

}  // namespace
}  // namespace kernels
}  // namespace sonde
