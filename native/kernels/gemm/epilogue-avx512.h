// AVX-512 GEMM epilogue: the activations of GemmEpilogue on one zmm of a tile row, for inclusion by
// *-avx512*.cc files only (static inline, so no copy compiled for AVX-512 can be shared with
// baseline code). The transcendental parts come from kernels/math/vmath-avx512.h, the same code
// the elementwise ops use, so a fused activation equals the standalone one; their accuracy is
// stated there (exp <= 1 ulp, sigmoid <= 2.1 ulp, erf-GELU absolute error <= 3u|x|).
// Bounds are ordered (max(lo, v), min(hi, v)) so that a NaN input propagates, as IEEE asks.
#pragma once
#include <immintrin.h>

#include "kernels/gemm/gemm.h"
#include "kernels/math/vmath-avx512.h"

namespace sonde {
namespace kernels {
namespace avx512 {

// The activations with transcendental parts, out of line: their cost dwarfs a call, and inlining
// them into every unrolled store of a tile bloats it.
__attribute__((noinline)) static __m512 ActivateTranscendental(__m512 v, const GemmEpilogue* ep) {
  switch (ep->activation) {
    case kActSilu: return _mm512_mul_ps(v, Sigmoid(v));
    case kActGeluErf: {
      const __m512 e = Erf(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    }
    case kActGeluTanh: {
      const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                     _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), Tanh(u)));
    }
    case kActSigmoid: return Sigmoid(v);
    default: return v;
  }
}

// Inlined into the tiles' stores with its cheap cases (a well-predicted branch and a few
// instructions): GCC kept the whole switch out of line, a call per stored vector, about as long as
// a 1x1 conv tile's multiply-adds at K = 32.
__attribute__((always_inline)) static inline __m512 Activate(__m512 v, const GemmEpilogue* ep) {
  switch (ep->activation) {
    case kActNone: return v;
    case kActRelu: return _mm512_max_ps(_mm512_setzero_ps(), v);
    case kActClip:
      return _mm512_min_ps(_mm512_set1_ps(ep->beta), _mm512_max_ps(_mm512_set1_ps(ep->alpha), v));
    case kActLeakyRelu: {
      const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
      return _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(ep->alpha));
    }
    case kActHardSwish: {
      __m512 t = _mm512_add_ps(v, _mm512_set1_ps(3.0f));
      t = _mm512_min_ps(_mm512_set1_ps(6.0f), _mm512_max_ps(_mm512_setzero_ps(), t));
      return _mm512_mul_ps(v, _mm512_mul_ps(t, _mm512_set1_ps(1.0f / 6.0f)));
    }
    default: return ActivateTranscendental(v, ep);
  }
}

// Per-column operands of the epilogue for one 16-lane slice of a tile, loaded once per tile.
struct ColumnTerms {
  __m512 scale, bias;
  bool has_scale;
};

static inline ColumnTerms LoadColumnTerms(const GemmEpilogue* ep, size_t col, __mmask16 m) {
  ColumnTerms t;
  t.has_scale = ep->scale != nullptr;
  t.scale = t.has_scale ? _mm512_maskz_loadu_ps(m, ep->scale + col) : _mm512_set1_ps(1.0f);
  t.bias = ep->bias ? _mm512_maskz_loadu_ps(m, ep->bias + col) : _mm512_setzero_ps();
  return t;
}

// acc is row i, columns [col, col + 16) of the tile (lanes outside m are ignored by the store).
static inline __m512 ApplyEpilogue(__m512 acc, const ColumnTerms& t, const GemmEpilogue* ep, size_t i,
                                   size_t col, __mmask16 m) {
  __m512 v = t.has_scale ? _mm512_fmadd_ps(acc, t.scale, t.bias) : _mm512_add_ps(acc, t.bias);
  if (ep->residual) {
    const __m512 r = _mm512_maskz_loadu_ps(m, ep->residual + i * ep->ldr + col);
    if (ep->residual_before_activation) return Activate(_mm512_add_ps(v, r), ep);
    return _mm512_add_ps(Activate(v, ep), r);
  }
  return Activate(v, ep);
}

}  // namespace avx512
}  // namespace kernels
}  // namespace sonde
