// Mixture-of-Experts microkernels: the routing of one token (scores, top-k, weights) and the
// elementwise steps between the experts' GEMMs (SwiGLU, weighted scatter-add). The GEMMs
// themselves are the quant family's (ops/quant_matmul.h); ops/moe.cc plans groups and threads.
// Pure functions: no allocation, no threads, no globals. Only C headers here, because this file is
// included by ISA-specific translation units.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

enum MoeScoringKind : int32_t { kMoeSoftmax = 0, kMoeSigmoid = 1 };

struct MoeUkernels {
  const char* name;
  // h[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]; h may alias gate or up.
  void (*swiglu)(size_t n, const float* gate, const float* up, float* h);
  // y[i] += w * x[i]
  void (*scale_add)(size_t n, float w, const float* x, float* y);
};

// Scalar C++ (libm expf): the reference the SIMD variants are tested against.
MoeUkernels MoeUkernelsScalar();
#if defined(__x86_64__) || defined(_M_X64)
// exp from kernels/math (<= 1 ulp); silu's relative error is then <= 4u + u |gate| (as for the
// elementwise family's silu).
MoeUkernels MoeUkernelsAvx2();
MoeUkernels MoeUkernelsAvx512();
#endif

// Routes one token. logits: n_experts router outputs. probs (out, n_experts): softmax over all
// experts (max subtracted, sum in double) or element-wise sigmoid. Picks the k experts with the
// largest probs[e] + (bias ? bias[e] : 0), in descending order, ties to the lower index; a NaN key
// ranks below every number, so ids are always valid. weights[j] = probs[ids[j]], divided by
// max(sum, 2^-14) if renormalize (llama.cpp's clamp), then times scale.
// Scalar only: n_experts is tens to hundreds, O(n_experts * k) per token, next to GEMMs of
// d_model * d_ff per expert.
void MoeRouteToken(size_t n_experts, size_t k, const float* logits, int32_t scoring, const float* bias,
                   bool renormalize, float scale, float* probs, int32_t* ids, float* weights);

// MoeRouteToken limited to groups: experts are `groups` consecutive groups of n_experts / groups;
// a group's score is the sum of its two largest keys (its one key when a group has one expert),
// the groups_used best groups (ties to the lower group) stay, and the k experts are chosen among
// them as above. keys (scratch, n_experts floats). The caller checked groups divides n_experts,
// groups_used in [1, groups] and k <= groups_used * (n_experts / groups).
void MoeRouteTokenGrouped(size_t n_experts, size_t k, size_t groups, size_t groups_used, const float* logits,
                          int32_t scoring, const float* bias, bool renormalize, float scale, float* probs, float* keys,
                          int32_t* ids, float* weights);

}  // namespace kernels
}  // namespace sonde
