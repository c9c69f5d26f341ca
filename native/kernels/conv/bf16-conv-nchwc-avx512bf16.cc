// AVX-512 BF16 direct convolution on a bf16 channel-blocked input (see Bf16NchwcConvUkernelAvx512Bf16
// in conv.h): the fp32 tile of f32-conv-nchwc-avx512.cc (up to 14 pixels x 32 output channels, 28
// zmm accumulators + 2 weight vectors + 1 broadcast) with vdpbf16ps in place of the FMA, so each
// instruction does a pair of input channels: per pair and tap, 2 weight loads + 14 broadcasts feed
// 28 dot products, half the instructions (and half the weight bytes) of the fp32 loop per MAC.
// vdpbf16ps flushes denormal inputs and outputs to zero (it ignores MXCSR) and adds its two
// products one after the other in fp32 (each product is exact: 8-bit x 8-bit significands).
// GCC 12 reports false -Wmaybe-uninitialized / -Wuninitialized inside the avx512 intrinsics headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/conv/conv.h"
#include "kernels/conv/nchwc-avx512.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kB = kNchwcBlock;       // input channels per block
constexpr size_t kPairs = kB / 2;        // bf16 pairs per block
constexpr size_t kOcb = kNchwcOutBlock;  // output channels per weight block

// R output rows of P pixels (R * P <= 14). No predictive commoning, as in the fp32 tiles: at stride
// 2 a pixel's input at tap kx + 2 is the next pixel's at kx, and keeping those alive spills.
template <size_t NV, size_t P, size_t SW, size_t R>
__attribute__((optimize("no-predictive-commoning"))) void Tile(const NchwcConvArgs* a, size_t oy, size_t ox0) {
  constexpr size_t kPix = R * P;
  __m512 acc[NV][kPix];
#pragma GCC unroll 16
  for (size_t p = 0; p < kPix; ++p)
    for (size_t v = 0; v < NV; ++v) acc[v][p] = _mm512_setzero_ps();
  // In uint16 elements.
  const size_t row = a->wp * kB, plane = a->hp * row, row_step = a->sh * row;
  const uint32_t* w = static_cast<const uint32_t*>(a->w);
  const uint16_t* xb = static_cast<const uint16_t*>(a->x) + oy * row_step + ox0 * SW * kB;
  const char* pf = a->pf;
  const char* const pf_end = pf ? pf + a->pf_bytes : nullptr;
  for (size_t cb = 0; cb < a->c_blocks; ++cb, xb += plane) {
    // The last block's pairs past c_last have zero weights: skipped.
    const size_t np = cb + 1 == a->c_blocks ? (a->c_last + 1) / 2 : kPairs;
    for (size_t ky = 0; ky < a->kh; ++ky) {
#pragma GCC unroll 1
      for (size_t kx = 0; kx < a->kw; ++kx) {
        avx512::PrefetchWeightSlice(pf, pf_end, a->pf_step);
        const uint16_t* xt = xb + ky * row + kx * kB;
#pragma GCC unroll 1
        for (size_t c = 0; c < np; ++c, w += kOcb) {
          const __m512bh w0 = (__m512bh)_mm512_load_si512(w);
          const __m512bh w1 = NV > 1 ? (__m512bh)_mm512_load_si512(w + 16) : w0;
#pragma GCC unroll 16
          for (size_t p = 0; p < kPix; ++p) {
            int32_t pair;
            __builtin_memcpy(&pair, xt + (p / P) * row_step + (p % P) * SW * kB + 2 * c, sizeof(pair));
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc[0][p] = _mm512_dpbf16_ps(acc[0][p], xv, w0);
            if (NV > 1) acc[NV - 1][p] = _mm512_dpbf16_ps(acc[NV - 1][p], xv, w1);
          }
        }
        w += (kPairs - np) * kOcb;
      }
    }
  }
  if (a->y_bf16) avx512::StoreNchwcTile<NV, P, R, true>(a, oy, ox0, acc);
  else avx512::StoreNchwcTile<NV, P, R>(a, oy, ox0, acc);
}

// The stem form: x a zero-padded bf16 NCHW copy ([c_in][hp][wp], c_blocks = c_in), where a pixel's
// taps kx = 2j and 2j + 1 of one row are adjacent: one 32-bit broadcast per pixel and pair of taps,
// against weights [c_in][kh][ceil(kw / 2) pairs][32 outputs] (an odd kw's last pair has a zero high
// half; the copy has a column more, so that tap reads a zero in range). A 7x7 kernel takes 4 steps
// per row instead of the fp32 stem's 7.
template <size_t NV, size_t P, size_t SW, size_t R>
__attribute__((optimize("no-predictive-commoning"))) void StemTile(const NchwcConvArgs* a, size_t oy, size_t ox0) {
  constexpr size_t kPix = R * P;
  __m512 acc[NV][kPix];
#pragma GCC unroll 16
  for (size_t p = 0; p < kPix; ++p)
    for (size_t v = 0; v < NV; ++v) acc[v][p] = _mm512_setzero_ps();
  const size_t row = a->wp, plane = a->hp * row, row_step = a->sh * row, pairs = (a->kw + 1) / 2;
  const uint32_t* w = static_cast<const uint32_t*>(a->w);
  const uint16_t* xb = static_cast<const uint16_t*>(a->x) + oy * row_step + ox0 * SW;
  for (size_t c = 0; c < a->c_blocks; ++c, xb += plane) {
    for (size_t ky = 0; ky < a->kh; ++ky) {
      const uint16_t* xt = xb + ky * row;
#pragma GCC unroll 1
      for (size_t j = 0; j < pairs; ++j, w += kOcb) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512(w);
        const __m512bh w1 = NV > 1 ? (__m512bh)_mm512_load_si512(w + 16) : w0;
#pragma GCC unroll 16
        for (size_t p = 0; p < kPix; ++p) {
          int32_t pair;
          __builtin_memcpy(&pair, xt + (p / P) * row_step + (p % P) * SW + 2 * j, sizeof(pair));
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
          acc[0][p] = _mm512_dpbf16_ps(acc[0][p], xv, w0);
          if (NV > 1) acc[NV - 1][p] = _mm512_dpbf16_ps(acc[NV - 1][p], xv, w1);
        }
      }
    }
  }
  avx512::StoreNchwcTile<NV, P, R>(a, oy, ox0, acc);
}

typedef void (*TileFn)(const NchwcConvArgs*, size_t, size_t);

#define SONDE_BF16_ROW(T, NV, SW)                                                                          \
  {&T<NV, 1, SW, 1>, &T<NV, 2, SW, 1>, &T<NV, 3, SW, 1>, &T<NV, 4, SW, 1>, &T<NV, 5, SW, 1>,  \
   &T<NV, 6, SW, 1>, &T<NV, 7, SW, 1>, &T<NV, 8, SW, 1>, &T<NV, 9, SW, 1>, &T<NV, 10, SW, 1>, \
   &T<NV, 11, SW, 1>, &T<NV, 12, SW, 1>, &T<NV, 13, SW, 1>, &T<NV, 14, SW, 1>}
#define SONDE_BF16_ROW_PAIR(T, NV, SW)                                                                     \
  {&T<NV, 1, SW, 2>, &T<NV, 2, SW, 2>, &T<NV, 3, SW, 2>, &T<NV, 4, SW, 2>, &T<NV, 5, SW, 2>,  \
   &T<NV, 6, SW, 2>, &T<NV, 7, SW, 2>}
static_assert(kNchwcMaxPixels == 14, "the tables below list 14 tile widths (7 for row pairs)");
// [vectors of output channels - 1][stride - 1][pixels - 1], for the blocked tiles and the stem tiles.
constexpr TileFn kTiles[2][2][kNchwcMaxPixels] = {{SONDE_BF16_ROW(Tile, 1, 1), SONDE_BF16_ROW(Tile, 1, 2)},
                                                  {SONDE_BF16_ROW(Tile, 2, 1), SONDE_BF16_ROW(Tile, 2, 2)}};
constexpr TileFn kRowPairTiles[2][2][kNchwcMaxPixels / 2] = {
    {SONDE_BF16_ROW_PAIR(Tile, 1, 1), SONDE_BF16_ROW_PAIR(Tile, 1, 2)},
    {SONDE_BF16_ROW_PAIR(Tile, 2, 1), SONDE_BF16_ROW_PAIR(Tile, 2, 2)}};
constexpr TileFn kStemTiles[2][2][kNchwcMaxPixels] = {{SONDE_BF16_ROW(StemTile, 1, 1), SONDE_BF16_ROW(StemTile, 1, 2)},
                                                      {SONDE_BF16_ROW(StemTile, 2, 1), SONDE_BF16_ROW(StemTile, 2, 2)}};
constexpr TileFn kStemRowPairTiles[2][2][kNchwcMaxPixels / 2] = {
    {SONDE_BF16_ROW_PAIR(StemTile, 1, 1), SONDE_BF16_ROW_PAIR(StemTile, 1, 2)},
    {SONDE_BF16_ROW_PAIR(StemTile, 2, 1), SONDE_BF16_ROW_PAIR(StemTile, 2, 2)}};
#undef SONDE_BF16_ROW
#undef SONDE_BF16_ROW_PAIR

void Bf16DirectConvAvx512Bf16(const NchwcConvArgs* a, size_t oy, size_t ox0, size_t np, size_t rows) {
  const size_t nv = a->oc_valid > 16 ? 1 : 0;
  if (rows == 2) kRowPairTiles[nv][a->sw - 1][np - 1](a, oy, ox0);
  else kTiles[nv][a->sw - 1][np - 1](a, oy, ox0);
}

void Bf16StemConvAvx512Bf16(const NchwcConvArgs* a, size_t oy, size_t ox0, size_t np, size_t rows) {
  const size_t nv = a->oc_valid > 16 ? 1 : 0;
  if (rows == 2) kStemRowPairTiles[nv][a->sw - 1][np - 1](a, oy, ox0);
  else kStemTiles[nv][a->sw - 1][np - 1](a, oy, ox0);
}

void F32ToBf16Avx512Bf16(const float* src, size_t n, uint16_t* dst) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)v);
  }
  for (; i < n; i += 16) {
    const size_t left = n - i < 16 ? n - i : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)v);
  }
}

}  // namespace

F32NchwcConvUkernel Bf16NchwcConvUkernelAvx512Bf16() { return Bf16DirectConvAvx512Bf16; }
F32NchwcConvUkernel Bf16NchwConvUkernelAvx512Bf16() { return Bf16StemConvAvx512Bf16; }
F32ToBf16Ukernel F32ToBf16UkernelAvx512Bf16() { return F32ToBf16Avx512Bf16; }

}  // namespace kernels
}  // namespace sonde
