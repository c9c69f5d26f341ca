// The parts of the AVX-512 direct convolution tiles (see NchwcConvArgs in conv.h) that do not depend
// on the input's element type: the 16x16 register transpose and the tile's store (bias, activation,
// residual, blocked or NCHW output). For inclusion by *-avx512*.cc files only (static, so no copy
// compiled for one ISA level is shared with code built for another).
#pragma once
#include <immintrin.h>

#include "kernels/conv/conv.h"
#include "kernels/gemm/epilogue-avx512.h"

namespace sonde {
namespace kernels {
namespace avx512 {

// The direct tiles' share of the next block's weights (NchwcConvArgs::pf): up to `bytes` more of
// [pf, end) asked of L2, advancing pf; called once per input-channel block and tap (or row of
// taps), so the misses spread over the tile's FMAs. pf null: nothing.
static inline void PrefetchWeightSlice(const char*& pf, const char* end, size_t bytes) {
  if (!pf) return;
  for (const char* const stop = pf + bytes; pf < end && pf < stop; pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
}

// In-register 16x16 transpose: r[l] = 16 pixels of channel l in, r[p] = 16 channels of pixel p out.
// Pairs (unpack ps), then quads (unpack pd), then 128-bit lanes across the four row groups.
static inline void Transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane k: column 4k + j of rows 4i .. 4i+3.
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
    t[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Stores a tile of R output rows of P pixels x NV vectors of 16 output channels (acc[v][p]: the 16
// channels of pixel p), adding the bias and applying the epilogue. kBf16Y: the blocked y holds bf16
// (rounded to nearest even; only in files built with AVX512_BF16).
template <size_t NV, size_t P, size_t R, bool kBf16Y = false>
static inline void StoreNchwcTile(const NchwcConvArgs* a, size_t oy, size_t ox0, __m512 (&acc)[NV][R * P]) {
  constexpr size_t kPix = R * P;
  constexpr size_t kB = kNchwcBlock;
  const GemmEpilogue* ep = a->ep;
  if (a->y_row) {
    const float* res = ep ? ep->residual : nullptr;
    // A partial block's lanes past oc_valid are stored as zeros: its weights there are zero, but
    // 0 * Inf is NaN, and a bf16 pair of an odd channel count reads one such lane.
    __mmask16 keep[NV];
    for (size_t v = 0; v < NV; ++v) {
      const size_t valid = a->oc_valid > v * 16 ? a->oc_valid - v * 16 : 0;
      keep[v] = valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
    }
#pragma GCC unroll 16
    for (size_t p = 0; p < kPix; ++p) {
      const size_t pix = (oy + p / P) * a->y_row + (ox0 + p % P) * kB;
      const size_t rpix = (oy + p / P) * a->res_row + (ox0 + p % P) * kB;
      for (size_t v = 0; v < NV; ++v) {
        __m512 r = _mm512_add_ps(acc[v][p], _mm512_load_ps(a->bias + v * 16));
        if (ep) {
          if (res) {
            const __m512 rv = _mm512_loadu_ps(res + v * a->res_block + rpix);
            r = ep->residual_before_activation ? Activate(_mm512_add_ps(r, rv), ep)
                                               : _mm512_add_ps(Activate(r, ep), rv);
          } else {
            r = Activate(r, ep);
          }
        }
        r = _mm512_maskz_mov_ps(keep[v], r);
        if constexpr (kBf16Y) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(a->y) + v * a->y_block + pix),
                              (__m256i)_mm512_cvtneps_pbh(r));
        } else {
          _mm512_storeu_ps(a->y + v * a->y_block + pix, r);
        }
      }
    }
    return;
  }
  // NCHW: a 16x16 register transpose per output vector turns the pixel-major accumulators into
  // one vector per channel (lane r P + p = pixel p of row r); each row leaves by a masked store
  // whose address is shifted back by r P lanes. A P-lane gather per channel did this before at
  // ~12% of a 7x7/2 stem tile's time (K = 147); the transposes are ~128 shuffles per tile.
  const size_t hwo = a->oh * a->ow;
  for (size_t v = 0; v < NV && v * 16 < a->oc_valid; ++v) {
    const __m512 b = _mm512_load_ps(a->bias + v * 16);
    __m512 t[16];
#pragma GCC unroll 16
    for (size_t p = 0; p < 16; ++p) t[p] = p < kPix ? _mm512_add_ps(acc[v][p], b) : _mm512_setzero_ps();
    Transpose16x16(t);
    const size_t channels = a->oc_valid - v * 16 < 16 ? a->oc_valid - v * 16 : 16;
    for (size_t l = 0; l < channels; ++l) {
      for (size_t r = 0; r < R; ++r) {
        const __mmask16 m = static_cast<__mmask16>(((1u << P) - 1) << (r * P));
        // Element (row oy + r, column ox0) sits at lane r P of t[l]; at >= r P since ow >= P.
        const size_t at = (v * 16 + l) * hwo + (oy + r) * a->ow + ox0 - r * P;
        __m512 o = t[l];
        if (ep) {
          if (ep->residual) {
            const __m512 res = _mm512_maskz_loadu_ps(m, ep->residual + at);
            o = ep->residual_before_activation ? Activate(_mm512_add_ps(o, res), ep)
                                               : _mm512_add_ps(Activate(o, ep), res);
          } else {
            o = Activate(o, ep);
          }
        }
        _mm512_mask_storeu_ps(a->y + at, m, o);
      }
    }
  }
}

}  // namespace avx512
}  // namespace kernels
}  // namespace sonde
