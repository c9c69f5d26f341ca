// AVX-512 window kernel (depthwise convolution, max and average pooling) on one NCHW plane, 16
// output columns per vector. The plane is first copied into a padded scratch plane (it fits L1/L2:
// 112x112 floats are 49 KiB), so each tap is one unaligned load (stride 1), two loads and a
// vpermt2ps that keeps the even lanes (stride 2), or a gather (other strides). These ops are
// memory bound: the input is read once from memory and the output written once; the taps re-read
// the scratch plane from cache.
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h for masked loads/gathers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <math.h>

#include "kernels/conv/conv.h"
#include "kernels/gemm/epilogue-avx512.h"

namespace sonde {
namespace kernels {
namespace {

// The padded scratch plane's rows [r0, r1): the window loops fill it a few rows ahead of the
// output row they make, so each row is read from the input while the last rows' taps compute, and
// taken from L1 by them; the whole plane first (112x112 in: 59 KiB, past L1) made the 3x3/2 max
// pool of ResNet's stem (64 planes, NCHW in pruned models) 0.34 ms, half of it this fill.
void FillPadded(const WindowArgs* a, float pad, size_t r0, size_t r1) {
  const size_t cols = WindowScratchCols(a);
  const __m512 pv = _mm512_set1_ps(pad);
  for (size_t r = r0; r < r1; ++r) {
    float* dst = a->scratch + r * cols;
    const size_t iy = r - a->pad_t;  // wraps for r < pad_t: then >= ih
    const bool inside = r >= a->pad_t && iy < a->ih;
    // Pad the whole row with vector stores, then copy the input row over it.
    size_t c = 0;
    for (; c + 16 <= cols; c += 16) _mm512_storeu_ps(dst + c, pv);
    if (c < cols) _mm512_mask_storeu_ps(dst + c, static_cast<__mmask16>((1u << (cols - c)) - 1), pv);
    if (inside) {
      // Inline vector copy: rows are 7-112 floats, too short for a libc call to pay off.
      const float* src = a->in + iy * a->iw;
      float* d = dst + a->pad_l;
      size_t x = 0;
      for (; x + 16 <= a->iw; x += 16) _mm512_storeu_ps(d + x, _mm512_loadu_ps(src + x));
      if (x < a->iw) {
        const __mmask16 m = static_cast<__mmask16>((1u << (a->iw - x)) - 1);
        _mm512_mask_storeu_ps(d + x, m, _mm512_maskz_loadu_ps(m, src + x));
      }
    }
  }
}

// Fills the scratch rows output row oy (and those before it) reads, from `filled` on.
class RowFiller {
 public:
  RowFiller(const WindowArgs* a) : a_(a), pad_(a->op == kWindowMax ? -INFINITY : 0.0f), rows_(WindowScratchRows(a)) {}
  void Through(size_t oy) {
    size_t need = oy * a_->sh + (a_->kh - 1) * a_->dh + 1;
    if (need > rows_) need = rows_;
    if (need > filled_) {
      FillPadded(a_, pad_, filled_, need);
      filled_ = need;
    }
  }

 private:
  const WindowArgs* a_;
  float pad_;
  size_t rows_, filled_ = 0;
};

template <int SW>
inline __m512 Tap(const float* p, size_t sw, __m512i even, __m512i gidx) {
  if (SW == 1) return _mm512_loadu_ps(p);
  if (SW == 2) return _mm512_permutex2var_ps(_mm512_loadu_ps(p), even, _mm512_loadu_ps(p + 16));
  return _mm512_i32gather_ps(gidx, p, 4);
}

// A depthwise conv's sums of output (oy, ox..ox+15) through the bias and the fused epilogue
// (activation, residual) to the masked lanes of the output row.
inline void FinishConv(const WindowArgs* a, __m512 acc, size_t oy, size_t ox, __mmask16 m) {
  acc = _mm512_add_ps(acc, _mm512_set1_ps(a->bias));
  const GemmEpilogue* ep = a->ep;
  if (ep) {
    if (ep->residual) {
      const __m512 r = _mm512_maskz_loadu_ps(m, ep->residual + oy * a->ow + ox);
      acc = ep->residual_before_activation ? avx512::Activate(_mm512_add_ps(acc, r), ep)
                                           : _mm512_add_ps(avx512::Activate(acc, ep), r);
    } else {
      acc = avx512::Activate(acc, ep);
    }
  }
  _mm512_mask_storeu_ps(a->out + oy * a->ow + ox, m, acc);
}

// NV output vectors of row oy from column ox0 (the last one n < 16 wide where the row ends there):
// each its own accumulator, so the taps of one vector do not wait on the last tap's result. One at
// a time, every max or add followed the previous through its 4-cycle latency (and a permute's 3 at
// stride 2): the 3x3/2 max pool of a 112x112 plane (ResNet's, NCHW in pruned models) took ~5.8 us.
template <int SW, size_t NV>
inline void WindowVectors(const WindowArgs* a, size_t oy, size_t ox0, size_t cols, __m512i even, __m512i gidx) {
  const int op = a->op;
  const float* rows = a->scratch + oy * a->sh * cols;
  float* out = a->out + oy * a->ow;
  __m512 acc[NV];
#pragma GCC unroll 4
  for (size_t v = 0; v < NV; ++v) acc[v] = _mm512_set1_ps(op == kWindowMax ? -INFINITY : 0.0f);
  for (size_t ky = 0; ky < a->kh; ++ky) {
    const float* row = rows + ky * a->dh * cols + ox0 * a->sw;
    for (size_t kx = 0; kx < a->kw; ++kx) {
      const float* tap = row + kx * a->dw;
      const __m512 wk = _mm512_set1_ps(op == kWindowConv ? a->weights[ky * a->kw + kx] : 0.0f);
#pragma GCC unroll 4
      for (size_t v = 0; v < NV; ++v) {
        const __m512 x = Tap<SW>(tap + 16 * v * a->sw, a->sw, even, gidx);
        if (op == kWindowConv) acc[v] = _mm512_fmadd_ps(x, wk, acc[v]);
        else if (op == kWindowMax) acc[v] = _mm512_max_ps(x, acc[v]);  // (x > acc) ? x : acc, as the scalar kernel
        else acc[v] = _mm512_add_ps(acc[v], x);
      }
    }
  }
  const __m512 inv_taps = _mm512_set1_ps(1.0f / static_cast<float>(a->kh * a->kw));
#pragma GCC unroll 4
  for (size_t v = 0; v < NV; ++v) {
    const size_t ox = ox0 + 16 * v;
    const size_t n = a->ow - ox < 16 ? a->ow - ox : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    __m512 r = acc[v];
    if (op == kWindowConv) {
      FinishConv(a, r, oy, ox, m);
      continue;
    }
    if (op == kWindowAvg) {
      if (a->row_count) {
        const __m512 cnt = _mm512_mul_ps(_mm512_set1_ps(a->row_count[oy]), _mm512_maskz_loadu_ps(m, a->col_count + ox));
        r = _mm512_maskz_div_ps(m, r, cnt);
      } else {
        r = _mm512_mul_ps(r, inv_taps);
      }
    }
    _mm512_mask_storeu_ps(out + ox, m, r);
  }
}

template <int SW>
void Window(const WindowArgs* a) {
  constexpr size_t kVectors = 4;
  const size_t cols = WindowScratchCols(a);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(a->sw)));
  const size_t vectors = (a->ow + 15) / 16, whole = vectors / kVectors * kVectors;
  RowFiller fill(a);
  for (size_t oy = 0; oy < a->oh; ++oy) {
    fill.Through(oy);
    for (size_t v = 0; v < whole; v += kVectors) WindowVectors<SW, kVectors>(a, oy, 16 * v, cols, even, gidx);
    switch (vectors - whole) {
      case 3: WindowVectors<SW, 3>(a, oy, 16 * whole, cols, even, gidx); break;
      case 2: WindowVectors<SW, 2>(a, oy, 16 * whole, cols, even, gidx); break;
      case 1: WindowVectors<SW, 1>(a, oy, 16 * whole, cols, even, gidx); break;
      default: break;
    }
  }
}

// Depthwise 3x3 (MobileNet's, EfficientNet's), stride SW: the nine taps stay in registers and two
// output rows are made per pass, so each of their four input rows is loaded once per column
// chunk and feeds both (12 loads instead of 18 per 32 outputs).
template <int SW>
void Depthwise3x3(const WindowArgs* a) {
  const size_t cols = WindowScratchCols(a);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  __m512 wk[9];
  for (int t = 0; t < 9; ++t) wk[t] = _mm512_set1_ps(a->weights[t]);
  const size_t dh = a->dh, dw = a->dw;
  const auto finish = [a](__m512 acc, size_t oy, size_t ox, __mmask16 m) { FinishConv(a, acc, oy, ox, m); };
  size_t oy = 0;
  // Two output rows share input rows only when the second's window starts one dilation below: stride == dilation.
  const bool pair = a->sh == dh;
  RowFiller fill(a);
  for (; pair && oy + 2 <= a->oh; oy += 2) {
    fill.Through(oy + 1);
    const float* r0 = a->scratch + oy * a->sh * cols;
    for (size_t ox = 0; ox < a->ow; ox += 16) {
      const size_t n = a->ow - ox < 16 ? a->ow - ox : 16;
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (int ry = 0; ry < 4; ++ry) {
        const float* row = r0 + ry * dh * cols + ox * SW;
        for (int kx = 0; kx < 3; ++kx) {
          const __m512 v = Tap<SW>(row + kx * dw, SW, even, even);
          if (ry < 3) acc0 = _mm512_fmadd_ps(v, wk[ry * 3 + kx], acc0);
          if (ry > 0) acc1 = _mm512_fmadd_ps(v, wk[(ry - 1) * 3 + kx], acc1);
        }
      }
      finish(acc0, oy, ox, m);
      finish(acc1, oy + 1, ox, m);
    }
  }
  for (; oy < a->oh; ++oy) {
    fill.Through(oy);
    const float* r0 = a->scratch + oy * a->sh * cols;
    for (size_t ox = 0; ox < a->ow; ox += 16) {
      const size_t n = a->ow - ox < 16 ? a->ow - ox : 16;
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      __m512 acc = _mm512_setzero_ps();
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx)
          acc = _mm512_fmadd_ps(Tap<SW>(r0 + ky * dh * cols + ox * SW + kx * dw, SW, even, even), wk[ky * 3 + kx], acc);
      finish(acc, oy, ox, m);
    }
  }
}

void F32WindowAvx512(const WindowArgs* a) {
  if (a->op == kWindowConv && a->kh == 3 && a->kw == 3 && a->sw <= 2) {
    if (a->sw == 1) return Depthwise3x3<1>(a);
    return Depthwise3x3<2>(a);
  }
  if (a->sw == 1) return Window<1>(a);
  if (a->sw == 2) return Window<2>(a);
  return Window<0>(a);
}

float F32SumAvx512(const float* x, size_t n) {
  // Four independent accumulators hide the 4-cycle add latency.
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(x + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_loadu_ps(x + i + 48));
  }
  for (; i < n; i += 16) {
    const size_t r = n - i < 16 ? n - i : 16;
    s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << r) - 1), x + i));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

}  // namespace

F32WindowUkernel F32WindowUkernelAvx512() { return F32WindowAvx512; }
F32SumUkernel F32SumUkernelAvx512() { return F32SumAvx512; }

}  // namespace kernels
}  // namespace sonde
