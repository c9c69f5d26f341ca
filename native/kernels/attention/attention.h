// Causal attention of one query row against a span of cached keys/values, in fp32, as an online
// (streaming) softmax: a row is processed span by span, carrying (max, sum, acc) between spans, so
// the caller can hand over K/V in whatever pieces the cache stores them (one contiguous span per
// sequence today; pages when the cache is paged) and no score buffer of context length is needed.
//
// After all spans: out = acc / sum. Precision: scores are fp32 dot products of head_dim terms; each
// span rescales acc by exp(old_max - new_max) <= 1, so nothing overflows, and the result differs
// from a two-pass softmax by a few ulps per span.
// Only C headers here: ISA-specific translation units include this file.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

struct AttentionState {
  float max;   // running max of the scaled scores (-inf before the first span)
  float sum;   // sum of exp(score - max)
  float* acc;  // head_dim floats: sum of exp(score - max) * v
};

// For t < n: s_t = scale * dot(q, k + t * stride); folds the span into *st.
// k, v: n rows of head_dim floats, `stride` floats apart. n may be 0 (nothing folded).
typedef void (*AttentionSpanUkernel)(const float* q, size_t head_dim, const float* k, const float* v, size_t stride,
                                     size_t n, float scale, AttentionState* st);

struct AttentionUkernels {
  const char* name;
  AttentionSpanUkernel span;
};

AttentionUkernels AttentionUkernelsScalar();
#if defined(__x86_64__) || defined(_M_X64)
AttentionUkernels AttentionUkernelsAvx2();
AttentionUkernels AttentionUkernelsAvx512();
#endif

// The same fold over K/V stored as IEEE half (a paged KV pool of dtype f16, ops/kv_pool.h): each
// element is widened to fp32 exactly, then the arithmetic is the fp32 kernel's, so the f16 kernels
// of every ISA agree with the scalar one as closely as the fp32 ones do.
typedef void (*AttentionSpanF16Ukernel)(const float* q, size_t head_dim, const uint16_t* k, const uint16_t* v,
                                        size_t stride, size_t n, float scale, AttentionState* st);

struct AttentionF16Ukernels {
  const char* name;
  AttentionSpanF16Ukernel span;
};

AttentionF16Ukernels AttentionF16UkernelsScalar();
#if defined(__x86_64__) || defined(_M_X64)
AttentionF16Ukernels AttentionF16UkernelsAvx2();
AttentionF16Ukernels AttentionF16UkernelsAvx512();
#endif

}  // namespace kernels
}  // namespace sonde
