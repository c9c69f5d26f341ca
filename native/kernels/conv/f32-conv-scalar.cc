// Scalar conv-family kernels: the reference convolution and the portable window / sum kernels that
// run where no SIMD variant applies. The window kernel here is the semantic twin of the AVX-512
// one (same padded-plane walk, same max expression), so both give identical max/avg results.
#include <math.h>
#include <string.h>

#include "kernels/conv/conv.h"

namespace sonde {
namespace kernels {
namespace {

void FillPadded(const WindowArgs* a, float pad) {
  const size_t rows = WindowScratchRows(a), cols = WindowScratchCols(a);
  for (size_t r = 0; r < rows; ++r) {
    float* dst = a->scratch + r * cols;
    const size_t iy = r - a->pad_t;  // wraps for r < pad_t: then >= ih
    if (r < a->pad_t || iy >= a->ih) {
      for (size_t c = 0; c < cols; ++c) dst[c] = pad;
      continue;
    }
    for (size_t c = 0; c < a->pad_l; ++c) dst[c] = pad;
    memcpy(dst + a->pad_l, a->in + iy * a->iw, a->iw * sizeof(float));
    for (size_t c = a->pad_l + a->iw; c < cols; ++c) dst[c] = pad;
  }
}

void F32WindowScalar(const WindowArgs* a) {
  FillPadded(a, a->op == kWindowMax ? -INFINITY : 0.0f);
  const size_t cols = WindowScratchCols(a);
  const float inv_taps = 1.0f / static_cast<float>(a->kh * a->kw);
  for (size_t oy = 0; oy < a->oh; ++oy) {
    for (size_t ox = 0; ox < a->ow; ++ox) {
      float acc = a->op == kWindowMax ? -INFINITY : 0.0f;
      for (size_t ky = 0; ky < a->kh; ++ky) {
        const float* row = a->scratch + (oy * a->sh + ky * a->dh) * cols + ox * a->sw;
        for (size_t kx = 0; kx < a->kw; ++kx) {
          const float v = row[kx * a->dw];
          if (a->op == kWindowConv) acc += v * a->weights[ky * a->kw + kx];
          else if (a->op == kWindowMax) acc = v > acc ? v : acc;  // = _mm512_max_ps(v, acc)
          else acc += v;
        }
      }
      float r = acc;
      if (a->op == kWindowAvg) {
        r = a->row_count ? acc / (a->row_count[oy] * a->col_count[ox]) : acc * inv_taps;
      } else if (a->op == kWindowConv) {
        r = acc + a->bias;
        if (a->ep) {
          const GemmEpilogue* ep = a->ep;
          const float res = ep->residual ? ep->residual[oy * a->ow + ox] : 0.0f;
          if (ep->residual && ep->residual_before_activation) r += res;
          r = GemmActivateScalar(r, ep);
          if (ep->residual && !ep->residual_before_activation) r += res;
        }
      }
      a->out[oy * a->ow + ox] = r;
    }
  }
}

float F32SumScalar(const float* x, size_t n) {
  // Four partial sums, like the SIMD variant's independent chains, then pairwise: the error bound
  // is ~(n/4 + 2) u sum|x| either way.
  float s[4] = {0, 0, 0, 0};
  size_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (size_t l = 0; l < 4; ++l) s[l] += x[i + l];
  for (; i < n; ++i) s[0] += x[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Row k of cols(X) for pixels j0 .. j0+ncols-1 into dst[0 .. nr).
void FillRow(const Im2colArgs* c, size_t k, size_t j0, size_t ncols, size_t nr, float* dst) {
  if (k >= c->kg) {
    const float v = k < c->kg + c->bias_rows ? 1.0f : 0.0f;
    for (size_t l = 0; l < ncols; ++l) dst[l] = v;
  } else {
    const size_t taps = c->kh * c->kw;
    const size_t ch = k / taps, r = k % taps, ky = r / c->kw, kx = r % c->kw;
    const float* plane = c->x + ch * c->h * c->w;
    size_t j = j0, l = 0;
    while (l < ncols) {
      const size_t oy = j / c->ow, ox = j % c->ow;
      const size_t len = c->ow - ox < ncols - l ? c->ow - ox : ncols - l;
      const ptrdiff_t iy = static_cast<ptrdiff_t>(oy * c->sh + ky * c->dh) - static_cast<ptrdiff_t>(c->pad_t);
      float* d = dst + l;
      if (iy < 0 || iy >= static_cast<ptrdiff_t>(c->h)) {
        for (size_t t = 0; t < len; ++t) d[t] = 0.0f;
      } else {
        const float* src = plane + iy * c->w;
        const ptrdiff_t ix0 = static_cast<ptrdiff_t>(ox * c->sw + kx * c->dw) - static_cast<ptrdiff_t>(c->pad_l);
        const ptrdiff_t W = static_cast<ptrdiff_t>(c->w), sw = static_cast<ptrdiff_t>(c->sw);
        for (size_t t = 0; t < len; ++t) {
          const ptrdiff_t ix = ix0 + static_cast<ptrdiff_t>(t) * sw;
          d[t] = ix >= 0 && ix < W ? src[ix] : 0.0f;
        }
      }
      l += len;
      j += len;
    }
  }
  for (size_t l = ncols; l < nr; ++l) dst[l] = 0.0f;
}

void F32Im2colScalar(const Im2colArgs* a, size_t k0, size_t kc, size_t j0, size_t ncols, size_t nr, float* panel) {
  for (size_t k = 0; k < kc; ++k) FillRow(a, k0 + k, j0, ncols, nr, panel + k * nr);
}

void F32PackNchwcRowScalar(const float* src, size_t plane, size_t w, float* dst, size_t channels) {
  for (size_t ix = 0; ix < w; ++ix)
    for (size_t l = 0; l < kNchwcBlock; ++l) dst[ix * kNchwcBlock + l] = l < channels ? src[l * plane + ix] : 0.0f;
}

void F32UnpackNchwcRowScalar(const float* src, size_t w, float* dst, size_t plane, size_t channels) {
  for (size_t l = 0; l < channels; ++l)
    for (size_t ix = 0; ix < w; ++ix) dst[l * plane + ix] = src[ix * kNchwcBlock + l];
}

}  // namespace

F32Im2colUkernel F32Im2colUkernelScalar() { return F32Im2colScalar; }
F32PackNchwcRowUkernel F32PackNchwcRowUkernelScalar() { return F32PackNchwcRowScalar; }
F32UnpackNchwcRowUkernel F32UnpackNchwcRowUkernelScalar() { return F32UnpackNchwcRowScalar; }

F32WindowUkernel F32WindowUkernelScalar() { return F32WindowScalar; }
F32SumUkernel F32SumUkernelScalar() { return F32SumScalar; }

void F32ConvReference(const ConvRefArgs* a, size_t b, size_t co) {
  const size_t cg = a->c_in / a->group, cog = a->c_out / a->group, g = co / cog;
  const float* wrow = a->weights + co * a->ldw;
  for (size_t oy = 0; oy < a->oh; ++oy) {
    for (size_t ox = 0; ox < a->ow; ++ox) {
      double s = a->bias ? a->bias[co] : 0.0;
      for (size_t c = 0; c < cg; ++c) {
        const float* plane = a->x + ((b * a->c_in) + g * cg + c) * a->h * a->w;
        for (size_t ky = 0; ky < a->kh; ++ky) {
          const long iy = static_cast<long>(oy * a->sh + ky * a->dh) - static_cast<long>(a->pad_t);
          if (iy < 0 || iy >= static_cast<long>(a->h)) continue;
          for (size_t kx = 0; kx < a->kw; ++kx) {
            const long ix = static_cast<long>(ox * a->sw + kx * a->dw) - static_cast<long>(a->pad_l);
            if (ix < 0 || ix >= static_cast<long>(a->w)) continue;
            s += static_cast<double>(wrow[(c * a->kh + ky) * a->kw + kx]) * plane[iy * a->w + ix];
          }
        }
      }
      const size_t idx = ((b * a->c_out + co) * a->oh + oy) * a->ow + ox;
      float v = static_cast<float>(s);
      if (a->ep) {
        const float r = a->residual ? a->residual[idx] : 0.0f;
        if (a->residual && a->ep->residual_before_activation) v += r;
        v = GemmActivateScalar(v, a->ep);
        if (a->residual && !a->ep->residual_before_activation) v += r;
      }
      a->y[idx] = v;
    }
  }
}

}  // namespace kernels
}  // namespace sonde
