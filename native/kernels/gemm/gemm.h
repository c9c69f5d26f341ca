// f32 GEMM microkernels: C[mr x nr] (+)= A[mr x kc] * W[kc x nr], W pre-packed in panels of NR
// columns (panel p holds rows k = 0..K-1 of columns p*NR .. p*NR+NR-1, zero-padded, contiguous).
// Pure functions: no allocation, no threads, no globals. Only C headers here, because this file is
// included by ISA-specific translation units.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

enum GemmActivation : int32_t {
  kActNone = 0,
  kActRelu = 1,
  kActClip = 2,       // min(max(v, alpha), beta); ReLU6 is Clip(0, 6)
  kActSilu = 3,       // v * sigmoid(v)
  kActGeluErf = 4,    // 0.5 v (1 + erf(v / sqrt 2))
  kActGeluTanh = 5,   // 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
  kActSigmoid = 6,
  kActLeakyRelu = 7,  // v >= 0 ? v : alpha v
  kActHardSwish = 8,  // v * min(max(v + 3, 0), 6) / 6
  kActCount = 9,
};

// Applied once per output element on the last K block, while the tile is still in registers:
//   v = acc * scale[j] + bias[j]
//   v = residual_before_activation ? act(v + r[i][j]) : act(v) + r[i][j]
// Pointers are offset to the tile's first row/column; any of them may be null. scale and bias
// together are a folded BatchNormalization; residual_before_activation is ResNet's add-then-ReLU.
struct GemmEpilogue {
  const float* scale;
  const float* bias;
  const float* residual;
  size_t ldr;
  int32_t activation;  // GemmActivation
  int32_t residual_before_activation;
  float alpha, beta;   // Clip bounds; LeakyRelu slope in alpha
};

// Scalar form of the activations: the reference every SIMD epilogue is tested against. Written so
// that NaN propagates (comparisons are arranged so a NaN input is returned, not a bound).
static inline float GemmActivateScalar(float v, const GemmEpilogue* ep) {
  switch (ep->activation) {
    case kActRelu: return v < 0.0f ? 0.0f : v;
    case kActClip: return v < ep->alpha ? ep->alpha : (v > ep->beta ? ep->beta : v);
    case kActSilu: return v / (1.0f + expf(-v));
    case kActGeluErf: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case kActGeluTanh: {
      float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + tanhf(u));
    }
    case kActSigmoid: return 1.0f / (1.0f + expf(-v));
    case kActLeakyRelu: return v < 0.0f ? ep->alpha * v : v;
    case kActHardSwish: {
      float t = v + 3.0f;
      t = t < 0.0f ? 0.0f : (t > 6.0f ? 6.0f : t);
      return v * t * (1.0f / 6.0f);
    }
    default: return v;
  }
}

// The whole epilogue on one element (row i, column j of the tile).
static inline float GemmEpilogueScalar(float acc, size_t i, size_t j, const GemmEpilogue* ep) {
  float v = ep->scale ? acc * ep->scale[j] : acc;
  if (ep->bias) v += ep->bias[j];
  const float r = ep->residual ? ep->residual[i * ep->ldr + j] : 0.0f;
  if (ep->residual && ep->residual_before_activation) v += r;
  v = GemmActivateScalar(v, ep);
  if (ep->residual && !ep->residual_before_activation) v += r;
  return v;
}

// accumulate: add to C (a later K block) instead of overwriting it.
// epilogue: null except on the last K block.
typedef void (*F32GemmUkernel)(size_t mr, size_t nr, size_t kc, const float* a, size_t lda,
                               const float* w, float* c, size_t ldc, bool accumulate,
                               const GemmEpilogue* epilogue);

// A microkernel that reads A packed by its own pack function instead of in place: pack(a, lda,
// rows, kc, ap) writes rows (<= mr) rows of A[rows x kc] as ceil(kc / k_group) groups of mr * k_group
// floats, group g holding row i's values k = g*k_group .. g*k_group + k_group - 1 at
// ap[g*mr*k_group + i*k_group ..] (zero past kc; rows past `rows` are left unwritten and never read).
// fn/fn_cold_w then take that ap in place of (a, lda) and give results identical to the unpacked
// forms. Worth it where one packed row tile serves several panels and its rows, lda apart, would
// otherwise crowd one L1 set (ops/gemm.cc says when).
typedef void (*F32GemmPackA)(const float* a, size_t lda, size_t rows, size_t kc, float* ap);
typedef void (*F32GemmPackedAUkernel)(size_t mr, size_t nr, size_t kc, const float* ap, const float* w,
                                      float* c, size_t ldc, bool accumulate, const GemmEpilogue* epilogue);
struct F32GemmPackedA {
  F32GemmPackA pack;  // null: the variant has no packed-A form
  uint32_t k_group;
  F32GemmPackedAUkernel fn;
  F32GemmPackedAUkernel fn_cold_w;
};

struct F32GemmUkernelInfo {
  F32GemmUkernel fn;
  uint32_t mr;  // rows per call (max)
  uint32_t nr;  // panel width, fixed by the packing
  const char* name;
  // Same contract and result as fn, for a call whose W slice is not in cache yet (the first row
  // tile over a panel's K block, which reads it from L3 or DRAM): fetches W ahead of use. Null
  // where fn already does, or where it does not pay.
  F32GemmUkernel fn_cold_w;
  F32GemmPackedA packed_a;
};

// One per ISA; each variant's file defines its own. Unavailable ISAs are not linked on other archs.
F32GemmUkernelInfo F32GemmUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
F32GemmUkernelInfo F32GemmUkernelAvx2();
F32GemmUkernelInfo F32GemmUkernelAvx512();
#endif

// The independent reference: a plain triple loop on unpacked, row-major B (K x N, leading dim ldb),
// accumulating in double, then the scalar epilogue (ep may be null). Slow on purpose; tests and the
// `reference` variant use it.
void F32GemmReference(size_t m, size_t n, size_t k, const float* a, size_t lda, const float* b,
                      size_t ldb, float* c, size_t ldc, const GemmEpilogue* ep);

}  // namespace kernels
}  // namespace sonde
