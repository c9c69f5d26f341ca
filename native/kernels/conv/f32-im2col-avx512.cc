// AVX-512 im2col into a GEMM B panel (see conv.h). The panel's pixels are split once per call into
// segments that stay on one output row; each row k of the panel is then one masked load/store
// pair per 16 pixels of a segment (stride 1: contiguous source, out-of-bounds lanes masked to 0;
// other strides: a masked gather). Masked-off lanes never touch memory, so reads stay inside x.
// This pass is what a small C_out conv pays per packed element (2 C_out FLOPs per element), so it
// must cost a fraction of a nanosecond per element: the portable version's per-element bounds
// checks cost as much as the GEMM at C_out = 64.
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h for masked loads/gathers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <stddef.h>

#include "kernels/conv/conv.h"

namespace sonde {
namespace kernels {
namespace {

struct Segment {
  size_t l, len;       // first panel column, pixels
  ptrdiff_t iy0, ix0;  // input row / column of tap (0, 0) for the segment's first pixel
};

inline __mmask16 Range(ptrdiff_t lo, ptrdiff_t hi) {
  // Lanes t with lo <= t < hi, for 0 <= t < 16.
  if (lo < 0) lo = 0;
  if (hi > 16) hi = 16;
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
}

void F32Im2colAvx512(const Im2colArgs* a, size_t k0, size_t kc, size_t j0, size_t ncols, size_t nr, float* panel) {
  Segment seg[64];
  size_t nseg = 0;
  for (size_t j = j0, l = 0; l < ncols && nseg < 64;) {
    const size_t oy = j / a->ow, ox = j % a->ow;
    const size_t len = a->ow - ox < ncols - l ? a->ow - ox : ncols - l;
    seg[nseg++] = {l, len, static_cast<ptrdiff_t>(oy * a->sh) - static_cast<ptrdiff_t>(a->pad_t),
                   static_cast<ptrdiff_t>(ox * a->sw) - static_cast<ptrdiff_t>(a->pad_l)};
    l += len;
    j += len;
  }
  const bool pointwise = a->kh == 1 && a->kw == 1 && a->sh == 1 && a->sw == 1 && a->pad_t == 0 && a->pad_l == 0 &&
                         a->oh == a->h && a->ow == a->w;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i gstep = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int>(a->sw)));
  const size_t taps = a->kh * a->kw, plane = a->h * a->w;
  const ptrdiff_t H = static_cast<ptrdiff_t>(a->h), W = static_cast<ptrdiff_t>(a->w);
  // (channel, ky, kx) of row k advance by one tap per row: no integer division per row (four
  // 64-bit divisions cost more than the row's loads and stores).
  size_t ch = k0 / taps, ky = k0 % taps / a->kw, kx = k0 % a->kw;
  for (size_t kk = 0; kk < kc; ++kk) {
    const size_t k = k0 + kk;
    float* dst = panel + kk * nr;
    // Zero the whole row first (nr is a multiple of 16 for this kernel's callers: 32), then write
    // the valid lanes; two stores per 16 lanes at most, all in L1.
    for (size_t l = 0; l < nr; l += 16) _mm512_storeu_ps(dst + l, zero);
    if (k >= a->kg) {
      if (k < a->kg + a->bias_rows)
        for (size_t l = 0; l < ncols; l += 16) _mm512_mask_storeu_ps(dst + l, Range(0, static_cast<ptrdiff_t>(ncols - l)), one);
      continue;
    }
    if (pointwise) {
      const float* src = a->x + k * plane + j0;
      for (size_t l = 0; l < ncols; l += 16) {
        const __mmask16 m = Range(0, static_cast<ptrdiff_t>(ncols - l));
        _mm512_mask_storeu_ps(dst + l, m, _mm512_maskz_loadu_ps(m, src + l));
      }
      continue;
    }
    const float* xp = a->x + ch * plane;
    const ptrdiff_t dy = static_cast<ptrdiff_t>(ky * a->dh), dx = static_cast<ptrdiff_t>(kx * a->dw);
    if (++kx == a->kw) {
      kx = 0;
      if (++ky == a->kh) {
        ky = 0;
        ++ch;
      }
    }
    for (size_t s = 0; s < nseg; ++s) {
      const Segment& g = seg[s];
      const ptrdiff_t iy = g.iy0 + dy;
      if (iy < 0 || iy >= H) continue;  // already zero
      const float* src = xp + iy * W;
      const ptrdiff_t ix0 = g.ix0 + dx;
      // The same window position one channel on is read kh*kw rows from now: fetch it into L1
      // ahead (the loads otherwise wait on L2 one (channel, ky) group at a time; prefetches never
      // fault, so the last channel's reach past the group is harmless).
      if (dx == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(src + plane + ix0), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(src + plane + ix0 + static_cast<ptrdiff_t>(g.len * a->sw)), _MM_HINT_T0);
      }
      for (size_t t = 0; t < g.len; t += 16) {
        const ptrdiff_t base = ix0 + static_cast<ptrdiff_t>(t * a->sw);
        const ptrdiff_t n = static_cast<ptrdiff_t>(g.len - t);
        __mmask16 m;
        __m512 v;
        if (a->sw == 1) {
          // Lanes u with 0 <= base + u < W and u < n.
          m = Range(-base, W - base) & Range(0, n);
          v = _mm512_maskz_loadu_ps(m, src + base);
        } else if (a->sw == 2) {
          // Two masked loads of 16 consecutive floats and a vpermt2ps keeping the even ones: far
          // cheaper than a gather (stride-2 convs: ResNet's stem and downsampling layers).
          const ptrdiff_t lo = base >= 0 ? 0 : (-base + 1) / 2;
          const ptrdiff_t hi = base >= W ? 0 : (W - base + 1) / 2;
          m = Range(lo, hi) & Range(0, n);
          const __m512 v0 = _mm512_maskz_loadu_ps(Range(-base, W - base), src + base);
          const __m512 v1 = _mm512_maskz_loadu_ps(Range(-base - 16, W - base - 16), src + base + 16);
          v = _mm512_maskz_mov_ps(m, _mm512_permutex2var_ps(v0, even, v1));
        } else {
          const ptrdiff_t sw = static_cast<ptrdiff_t>(a->sw);
          const ptrdiff_t lo = base >= 0 ? 0 : (-base + sw - 1) / sw;
          const ptrdiff_t hi = base >= W ? 0 : (W - base + sw - 1) / sw;
          m = Range(lo, hi) & Range(0, n);
          // Indices relative to src + base stay small; masked-off lanes are not read.
          v = _mm512_mask_i32gather_ps(zero, m, gstep, src + base, 4);
        }
        // v is zero outside m. A full store is much cheaper than a masked one on AMD cores, and the
        // lanes it writes past this segment belong to later segments of the same row (written
        // after this one) or to columns past ncols (zero, or ignored by the GEMM's masked stores);
        // only a chunk reaching past the row end must be masked.
        if (g.l + t + 16 <= nr) _mm512_storeu_ps(dst + g.l + t, v);
        else _mm512_mask_storeu_ps(dst + g.l + t, m, v);
      }
    }
  }
}

}  // namespace

F32Im2colUkernel F32Im2colUkernelAvx512() { return F32Im2colAvx512; }

}  // namespace kernels
}  // namespace sonde
