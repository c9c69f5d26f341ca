// AVX-512 VNNI kernel of the q8_0x32 layout (quant.h): tiles of up to 4 activation rows x one group
// of 32 weight rows.
//
// Per block the group is 17 aligned cache lines read in order: the scales line, then 8 pairs of
// lines that each hold one 4-byte group of the block for rows 0-15 and 16-31. A line feeds one
// vpdpbusd per activation row with the row's 4 bytes broadcast, and the sums land with lane r =
// weight row r, so no shuffle or horizontal add is left: per block and row pair 2 x 8 vpdpbusd,
// 2 conversions, a multiply and an FMA each (the row-layout 16-row kernel needs ~3 shuffles per
// pair of blocks to bring the sums into lanes, which bounded it below the read bandwidth).
// Tile: MR x 32 fp32 accumulators and MR x 2 int32 block sums (16 zmm at MR = 4), two weight
// vectors, the broadcast activations and the two scale vectors: nothing spills.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <string.h>

#include "kernels/quant/quant-transpose-avx512.h"
#include "kernels/quant/quant.h"

namespace sonde {
namespace kernels {
namespace {

// vpdpbusd through inline asm, as in kernels/gemm/qs8-gemm-avx512vnni.cc: GCC 12 spills the
// intrinsic's tied accumulator.
inline __m512i Dpbusd(__m512i acc, __m512i a_u8, __m512i b_s8) {
  __asm__("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a_u8), [b] "v"(b_s8));
  return acc;
}

template <size_t MR>
void Q8x32Mr(size_t nr, size_t k, const uint8_t* group, const QuantActs* a, float* y, size_t ldy) {
  __m512 acc0[MR], acc1[MR];
  for (size_t i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  const size_t nb = k / kQuantBlock;
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* pb = group + b * kQ8_0x32BlockBytes;
    __m512i s0[MR], s1[MR];
    for (size_t i = 0; i < MR; ++i) s0[i] = s1[i] = _mm512_set1_epi32(a->corr[i * a->corr_stride + b]);
    const int8_t* xb = a->q + b * kQuantBlock;
    for (size_t g = 0; g < 8; ++g) {
      const __m512i w0 = _mm512_load_si512(pb + 64 + g * 128), w1 = _mm512_load_si512(pb + 128 + g * 128);
      for (size_t i = 0; i < MR; ++i) {
        int32_t x4;
        memcpy(&x4, xb + i * a->q_stride + 4 * g, 4);
        const __m512i xv = _mm512_set1_epi32(x4);
        s0[i] = Dpbusd(s0[i], w0, xv);
        s1[i] = Dpbusd(s1[i], w1, xv);
      }
    }
    const __m512i h = _mm512_load_si512(pb);
    const __m512 dw0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    const __m512 dw1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
    for (size_t i = 0; i < MR; ++i) {
      const __m512 dx = _mm512_set1_ps(a->d[i * a->d_stride + b]);
      acc0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[i]), _mm512_mul_ps(dw0, dx), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[i]), _mm512_mul_ps(dw1, dx), acc1[i]);
    }
  }
  StoreTile32<MR>(nr, acc0, acc1, y, ldy);
}

void Q8x32(size_t mr, size_t nr, size_t k, const uint8_t* group, const QuantActs* a, float* y, size_t ldy) {
  switch (mr) {
    case 4: return Q8x32Mr<4>(nr, k, group, a, y, ldy);
    case 3: return Q8x32Mr<3>(nr, k, group, a, y, ldy);
    case 2: return Q8x32Mr<2>(nr, k, group, a, y, ldy);
    case 1: return Q8x32Mr<1>(nr, k, group, a, y, ldy);
    default: return;
  }
}

}  // namespace

QuantQ8_0x32Ukernel QuantQ8_0x32UkernelAvx512Vnni() { return Q8x32; }

}  // namespace kernels
}  // namespace sonde
