// AVX-512 block-weight (q8_0, q4_0) dot products shared by quant-avx512.cc (exact int16 path) and
// quant-avx512vnni.cc (vpdpbusd). Everything is in an anonymous namespace, so each ISA translation
// unit gets its own copy and no AVX512-VNNI code can be linked into the plain AVX-512 kernels.
//
// Two blocks per zmm: 64 weights, decoded once per pair and used for up to 4 activation rows.
// A pair's int32 lanes 0-7 belong to block 2p and 8-15 to block 2p+1; they are converted to fp32
// and FMA'd with [dw dx of 2p x 8, of 2p+1 x 8]; one horizontal sum per row at the end.
// An odd last block loads only its own bytes (the weights may end at the end of the mapping); the
// activations are zero-padded to an even block count.
//   plain:  |w| and x negated where w < 0 (masked subtract: AVX-512 has no vpsignb), vpmaddubsw
//           (pairs <= 2 * 128 * 127, no saturation), vpmaddwd with ones.
//   vnni:   weights made unsigned (q8_0: w + 128 by flipping the sign bit; q4_0: the raw nibble,
//           w + 8), vpdpbusd(u8 w, s8 x) starting from the precomputed -offset * sum(x) of each block.
// Measured on the 2-core AVX-512 VM (L2-resident weights, one row, TSC cycles per 64 weights, 2.1
// GHz TSC): q8_0 2.8 (maddubs) / 3.0 (vnni), q4_0 3.6 / 2.9. Loads and the shuffle port bound the
// loop more than the int8 arithmetic: the q4_0 nibbles are spread with load-only broadcasts and a
// variable shift (4.3 -> 3.6 against two inserts and a lane shuffle), and the vnni correction is an
// 8-byte masked broadcast (3.5 -> 3.0 for q8_0 and 3.3 -> 2.9 for q4_0 against a 64-byte vector).
#pragma once
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <string.h>

#include "kernels/quant/quant.h"

namespace sonde {
namespace kernels {
namespace {

inline __m512i ones16() { return _mm512_set1_epi16(1); }


// The weights of blocks b and b+1 (only b when !two) as 64 bytes: signed values when !kUnsigned,
// else the unsigned form of the vnni kernel.
template <int32_t T, bool kUnsigned>
inline __m512i LoadPair(const uint8_t* w, size_t b, bool two) {
  if (T == kQuantQ8_0) {
    const uint8_t* blk = w + b * kQ8_0BlockBytes;
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    __m512i z;
    if (two) {
      z = _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ8_0BlockBytes + 2)), 1);
    } else {
      z = _mm512_zextsi256_si512(lo);
    }
    return kUnsigned ? _mm512_xor_si512(z, _mm512_set1_epi8(static_cast<char>(0x80))) : z;
  }
  // Each block's 16 bytes broadcast to two 128-bit lanes (a load-only broadcast from memory, the
  // second one masked onto the upper half), then the odd lanes shifted right by 4: lanes
  // [lo b, hi b, lo b+1, hi b+1], i.e. elements 0-15 then 16-31 of each block, with no shuffle.
  // Without a second block the upper half repeats block b; its activations are zero padding.
  const uint8_t* blk = w + b * kQ4_0BlockBytes;
  __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
  if (two) z = _mm512_mask_broadcast_i32x4(z, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + kQ4_0BlockBytes + 2)));
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                          0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
  z = _mm512_and_si512(_mm512_srlv_epi16(z, shifts), _mm512_set1_epi8(0x0F));
  return kUnsigned ? z : _mm512_sub_epi8(z, _mm512_set1_epi8(8));
}

// vpdpbusd through inline asm, as in kernels/gemm/qs8-gemm-avx512vnni.cc: GCC 12 spills the
// intrinsic's tied accumulator.
#if defined(__AVX512VNNI__)
inline __m512i Dpbusd(__m512i acc, __m512i a_u8, __m512i b_s8) {
  __asm__("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a_u8), [b] "v"(b_s8));
  return acc;
}
#endif

// One pair of blocks (b, b+1; only b when !two) for MR rows, added to acc.
template <int32_t T, bool kVnni, size_t MR>
inline void Pair(const uint8_t* w, size_t b, bool two, const QuantActs* a, __m512* acc) {
  const uint8_t* blk = w + b * (T == kQuantQ8_0 ? kQ8_0BlockBytes : kQ4_0BlockBytes);
  // Block scales as scalars (F16C), multiplied by each row's dx below and spread with two
  // broadcasts (one masked onto lanes 8-15).
  uint16_t h0, h1 = 0;
  memcpy(&h0, blk, 2);
  if (two) memcpy(&h1, blk + (T == kQuantQ8_0 ? kQ8_0BlockBytes : kQ4_0BlockBytes), 2);
  const float dw0 = _cvtsh_ss(h0), dw1 = _cvtsh_ss(h1);
  const __m512i wq = LoadPair<T, kVnni>(w, b, two);
  __m512i wabs;
  __mmask64 neg = 0;
  if (!kVnni) {
    wabs = _mm512_abs_epi8(wq);
    neg = _mm512_movepi8_mask(wq);
  }
  for (size_t i = 0; i < MR; ++i) {
    const __m512i xq = _mm512_loadu_si512(a->q + i * a->q_stride + b * kQuantBlock);
    __m512i isum;
#if defined(__AVX512VNNI__)
    if (kVnni) {
      // The start value: c_b in lane 0 and c_b+1 in lane 9 (each block's 8 lanes need the
      // correction once, in any lane), from an 8-byte masked broadcast instead of a 64-byte load.
      const __m512i c = _mm512_maskz_broadcast_i32x2(0x0201, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a->corr + i * a->corr_stride + b)));
      isum = Dpbusd(c, wq, xq);
    } else
#endif
    {
      const __m512i xs = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
      isum = _mm512_madd_epi16(_mm512_maddubs_epi16(wabs, xs), ones16());
    }
    const float* dx = a->d + i * a->d_stride + b;
    const __m512 s = _mm512_mask_broadcastss_ps(_mm512_set1_ps(dw0 * dx[0]), 0xFF00, _mm_set_ss(dw1 * dx[1]));
    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc[i]);
  }
}

// Two sets of accumulators, even and odd pairs, so the 4-cycle FMA chain of a single row (M = 1)
// does not bound the loop.
template <int32_t T, bool kVnni, size_t MR>
void BlockDotMr(size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  __m512 acc0[MR], acc1[MR];
  for (size_t i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  const size_t nb = k / kQuantBlock;
  size_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    Pair<T, kVnni, MR>(w, b, true, a, acc0);
    Pair<T, kVnni, MR>(w, b + 2, true, a, acc1);
  }
  if (b < nb) Pair<T, kVnni, MR>(w, b, b + 1 < nb, a, acc0);
  if (b + 2 < nb) Pair<T, kVnni, MR>(w, b + 2, b + 3 < nb, a, acc1);
  for (size_t i = 0; i < MR; ++i) y[i * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
}

template <int32_t T, bool kVnni>
void BlockDot(size_t mr, size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  switch (mr) {
    case 4: return BlockDotMr<T, kVnni, 4>(k, w, a, y, ldy);
    case 3: return BlockDotMr<T, kVnni, 3>(k, w, a, y, ldy);
    case 2: return BlockDotMr<T, kVnni, 2>(k, w, a, y, ldy);
    case 1: return BlockDotMr<T, kVnni, 1>(k, w, a, y, ldy);
    default: return;
  }
}

}  // namespace
}  // namespace kernels
}  // namespace sonde
