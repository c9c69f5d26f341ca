// Row kernels of the transformer block (ops/llm.cc): RMS normalisation, rotary position embedding
// and the SwiGLU gate. Scalar only: per token they touch O(d) values against the O(d^2) weight
// bytes of the matrix products around them, so they are far below 1% of a forward pass.
// Only C headers here.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

// y = x / sqrt(mean(x^2) + eps) * w (the mean summed in double, as ggml does). y may alias x.
void RmsNormRow(const float* x, const float* w, size_t n, float eps, float* y);

// Rotates head_dim-sized heads of x in place for position pos. Pair j (j < head_dim / 2) is
// (2j, 2j+1) in the normal (GPT-J) ordering and (j, j + head_dim/2) in NeoX's; its angle is
// pos * freq_scale * base^(-2j / head_dim), computed as ggml does: theta_0 = pos * freq_scale and
// theta_{j+1} = theta_j * base^(-2 / head_dim) in fp32, then cos/sin in fp32.
void RopeRow(float* x, size_t heads, size_t head_dim, int64_t pos, float base, float freq_scale, bool neox);

// RopeRow in two parts, for a position whose angles serve many heads and layers (a decode step
// rotates 12 layers x (q + k heads) at one position: the cosf/sinf, recomputed per head, were most
// of RoPE's time): cs[2j], cs[2j + 1] = the cos and sin RopeRow computes for pair j (head_dim / 2
// pairs), then RopeRowAngles rotates with them, equal to RopeRow bit for bit.
void RopeAngles(size_t head_dim, int64_t pos, float base, float freq_scale, float* cs);
void RopeRowAngles(float* x, size_t heads, size_t head_dim, const float* cs, bool neox);

// YaRN (as ggml's rope with ext_factor): pair j's angle blends the interpolated pos * freq_scale *
// t_j and the extrapolated pos * t_j (t_j = base^(-2j / head_dim), iterated in fp32) by
// ramp_j * ext_factor, ramp_j = 1 - clamp((j - corr_low) / max(0.001, corr_high - corr_low), 0, 1);
// cos and sin are multiplied by magnitude (times 1 + 0.1 ln(1 / freq_scale) when ext_factor != 0).
void RopeRowYarn(float* x, size_t heads, size_t head_dim, int64_t pos, float base, float freq_scale, float ext_factor,
                 float corr_low, float corr_high, float magnitude, bool neox);

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up.
void SwigluRow(const float* gate, const float* up, size_t n, float* out);

}  // namespace kernels
}  // namespace sonde
