// Low-precision-weight GEMM microkernels (bf16, fp16, int8 weights; fp32 accumulation or exact s32
// sums; the fp32 epilogue of gemm.h). C[mr x nr] = epilogue(A[mr x K] * W[K x nr]) over the whole K
// in one call: no K blocking, because the packed panels are 2-4x smaller than fp32 ones (a 32-column
// bf16 panel of K = 4096 is 256 KiB, inside L2) and int8 sums must stay in s32 until dequantised.
//
// Packed layouts (per panel of NR columns, zero-padded past N and past K):
//   bf16: for each pair of k, NR uint32 lanes holding (b[k][j] in the low half, b[k+1][j] in the
//         high half) -- the operand order of vdpbf16ps; the fp32 fallbacks widen a lane with one
//         shift (low) and one AND (high).
//   fp16: for each k, NR IEEE halves (F16C converts 8 or 16 of them per instruction).
//   qs8:  for each quad of k, NR int32 lanes holding b[k..k+3][j] as s8 -- the operand of vpdpbusd.
// A forms, prepared once per run by the operator (native/ops/gemm_lowp.cc):
//   fp32 rows (bf16 fallbacks, fp16); bf16 pairs (uint32 per k pair, zero-padded; avx512bf16);
//   u8 quads (K rounded up to 4, zero-padded) with per-row scale and zero point (qs8).
// Only C headers here: ISA-specific translation units include this file.
#pragma once
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {

// Scale, reciprocal and zero point of one row of A quantised to u8, from the row's range
// [lo, hi] (lo <= 0 <= hi, both finite; the definition is in native/ops/gemm_lowp.h). Shared by
// the scalar and SIMD quantisers so that every variant produces the same integers.
// Returns 0 for an all-zero row (scale 1, zero point 0, every byte 0).
static inline int LowpU8Params(float lo, float hi, float* scale, float* inv, float* zero) {
  if (hi == lo) {
    *scale = 1.0f;
    *inv = 1.0f;
    *zero = 0.0f;
    return 0;
  }
  // hi/255 - lo/255 rather than (hi - lo)/255: the difference of two large finite values could
  // overflow. A scale below FLT_MIN would make 1/s infinite, so it is clamped there.
  float s = hi / 255.0f - lo / 255.0f;
  if (!(s >= FLT_MIN)) s = FLT_MIN;
  float z = nearbyintf(-lo / s);
  z = z < 0.0f ? 0.0f : (z > 255.0f ? 255.0f : z);
  *scale = s;
  *inv = 1.0f / s;
  *zero = z;
  return 1;
}

// Quantises one row of A (k floats) to kq >= k u8 values (zero-padded), its scale and zero point.
// A row holding NaN or Inf gets scale NaN (its output row becomes NaN) and zeros.
typedef void (*LowpQuantizeRowU8)(const float* a, size_t k, size_t kq, uint8_t* dst, float* scale,
                                  int32_t* zero);
#if defined(__x86_64__) || defined(_M_X64)
void LowpQuantizeRowU8Avx512(const float* a, size_t k, size_t kq, uint8_t* dst, float* scale, int32_t* zero);
#endif

// Per-tile quantisation terms of the qs8 kernels (offset to the tile's first row / column):
//   C[i][j] = (float)(acc_s32[i][j] - a_zero[i] * w_sum[j]) * (a_scale[i] * w_scale[j])
// then the GemmEpilogue. Null for bf16/fp16.
struct LowpGemmQuant {
  const float* a_scale;
  const int32_t* a_zero;
  const float* w_scale;
  const int32_t* w_sum;
};

// a: the tile's first row in the kernel's A form (tiled: its block); a_stride: bytes between rows
// (of the row-major form); w: the panel;
// k: the true K (the kernels round it up to their pair/quad); ep: null when there is no epilogue.
typedef void (*LowpGemmUkernel)(size_t mr, size_t nr, size_t k, const void* a, size_t a_stride,
                                const void* w, float* c, size_t ldc, const LowpGemmQuant* q,
                                const GemmEpilogue* ep);

enum LowpAForm : int32_t {
  kLowpAF32 = 0,       // fp32 rows as given
  kLowpABf16Pairs = 1, // bf16 pairs, round to nearest even
  kLowpAU8Quads = 2,   // dynamically quantised u8 with per-row scale and zero point
};

struct LowpGemmUkernelInfo {
  LowpGemmUkernel fn;
  uint32_t mr;
  uint32_t nr;
  int32_t a_form;  // LowpAForm
  const char* name;
  // What the kernel reads past K: panels and A rows padded with zeros to a multiple of this many k
  // (0: only to its pair or quad). The tile kernels (AMX) read whole 32- or 64-k tile rows.
  uint32_t k_align = 0;
  // A in tile-major blocks: each block of mr rows holds, for every k_align-wide step of K, the mr
  // rows' k_align values one row after another ([K / k_align][mr][k_align]), so a tile of A is one
  // contiguous run (row-major rows a multiple of 4 KiB apart fill one L1 set). A block starts where
  // the row-major block would (a_stride x its first row); the last one is whole, its rows past M
  // read and their results dropped.
  bool a_tiled = false;
};

// fp32 -> bf16 with round to nearest even; NaN stays a (quiet) NaN of the same sign.
static inline uint16_t LowpF32ToBf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float LowpBf16ToF32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 <-> fp32 in plain C (packing runs on the x86-64-v2 baseline, without F16C).
// Round to nearest even; overflow gives +-Inf, NaN stays NaN, subnormals are kept.
static inline uint16_t LowpF32ToF16(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: Inf
  if (ax < 0x38800000u) {                                                // below 2^-14: subnormal half
    if (ax < 0x33000000u) return static_cast<uint16_t>(sign);             // below 2^-25: rounds to 0
    const uint32_t e = ax >> 23;
    const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // value = mant * 2^(e-150); half unit = 2^-24
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<uint16_t>(sign | h);
}

static inline float LowpF16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  float f;
  if (e == 0) {
    f = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    u |= sign;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  const uint32_t u = sign | (e == 31 ? (0x7F800000u | (m << 13)) : (((e + 112u) << 23) | (m << 13)));
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// int8 accumulation bound: |sum u8 * s8| <= K * 255 * 127 must fit in s32 (vpdpbusd wraps).
static const size_t kQs8MaxK = 66311;

LowpGemmUkernelInfo Bf16GemmUkernelScalar();
LowpGemmUkernelInfo F16GemmUkernelScalar();
LowpGemmUkernelInfo Qs8GemmUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
LowpGemmUkernelInfo Bf16GemmUkernelAvx2();
LowpGemmUkernelInfo Bf16GemmUkernelAvx512();
LowpGemmUkernelInfo Bf16GemmUkernelAvx512Bf16();
LowpGemmUkernelInfo F16GemmUkernelAvx2();
LowpGemmUkernelInfo F16GemmUkernelAvx512();
LowpGemmUkernelInfo Qs8GemmUkernelAvx2();
LowpGemmUkernelInfo Qs8GemmUkernelAvx512();
LowpGemmUkernelInfo Qs8GemmUkernelAvx512Vnni();
LowpGemmUkernelInfo Bf16GemmUkernelAmx();
LowpGemmUkernelInfo Qs8GemmUkernelAmx();
#endif

// The independent int8 reference: exact 64-bit sums of (u8 - zero point) * s8 on unpacked,
// row-major quantised B (K x N), dequantised in double, then the scalar epilogue.
void Qs8GemmReference(size_t m, size_t n, size_t k, const uint8_t* a, size_t lda, const float* a_scale,
                      const int32_t* a_zero, const int8_t* b, size_t ldb, const float* w_scale, float* c,
                      size_t ldc, const GemmEpilogue* ep);

}  // namespace kernels
}  // namespace sonde
