#include <math.h>

#include "kernels/norm/norm.h"

namespace sonde {
namespace kernels {

void RmsNormRow(const float* x, const float* w, size_t n, float eps, float* y) {
  double ss = 0;
  for (size_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float scale = 1.0f / sqrtf(static_cast<float>(ss / static_cast<double>(n)) + eps);
  for (size_t i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

void RopeRow(float* x, size_t heads, size_t hd, int64_t pos, float base, float freq_scale, bool neox) {
  const size_t half = hd / 2;
  const float theta_scale = powf(base, -2.0f / static_cast<float>(hd));
  // A pair's angle is the same in every head: cos and sin once per row, not once per head (they
  // were most of a batched decode step's RoPE time: 12 heads x 32 pairs of libm calls per row and
  // layer). Chunks of pairs keep the table on the stack for any head size.
  const size_t kChunk = 64;
  float cs[kChunk], sn[kChunk];
  float theta = static_cast<float>(pos) * freq_scale;
  for (size_t j0 = 0; j0 < half; j0 += kChunk) {
    const size_t j1 = j0 + kChunk < half ? j0 + kChunk : half;
    for (size_t j = j0; j < j1; ++j) {
      cs[j - j0] = cosf(theta);
      sn[j - j0] = sinf(theta);
      theta *= theta_scale;
    }
    for (size_t h = 0; h < heads; ++h) {
      float* r = x + h * hd;
      for (size_t j = j0; j < j1; ++j) {
        const float c = cs[j - j0], s = sn[j - j0];
        float* a = neox ? r + j : r + 2 * j;
        float* b = neox ? r + j + half : r + 2 * j + 1;
        const float x0 = *a, x1 = *b;
        *a = x0 * c - x1 * s;
        *b = x0 * s + x1 * c;
      }
    }
  }
}

void RopeAngles(size_t hd, int64_t pos, float base, float freq_scale, float* cs) {
  const float theta_scale = powf(base, -2.0f / static_cast<float>(hd));
  float theta = static_cast<float>(pos) * freq_scale;
  for (size_t j = 0; j < hd / 2; ++j) {
    cs[2 * j] = cosf(theta);
    cs[2 * j + 1] = sinf(theta);
    theta *= theta_scale;
  }
}

void RopeRowAngles(float* x, size_t heads, size_t hd, const float* cs, bool neox) {
  const size_t half = hd / 2;
  for (size_t h = 0; h < heads; ++h) {
    float* r = x + h * hd;
    for (size_t j = 0; j < half; ++j) {
      const float c = cs[2 * j], s = cs[2 * j + 1];
      float* a = neox ? r + j : r + 2 * j;
      float* b = neox ? r + j + half : r + 2 * j + 1;
      const float x0 = *a, x1 = *b;
      *a = x0 * c - x1 * s;
      *b = x0 * s + x1 * c;
    }
  }
}

void RopeRowYarn(float* x, size_t heads, size_t hd, int64_t pos, float base, float freq_scale, float ext_factor,
                 float corr_low, float corr_high, float magnitude, bool neox) {
  const size_t half = hd / 2;
  const float theta_scale = powf(base, -2.0f / static_cast<float>(hd));
  const float m = ext_factor != 0.0f ? magnitude * (1.0f + 0.1f * logf(1.0f / freq_scale)) : magnitude;
  const float span = corr_high - corr_low > 0.001f ? corr_high - corr_low : 0.001f;
  for (size_t h = 0; h < heads; ++h) {
    float* r = x + h * hd;
    float extrap = static_cast<float>(pos);
    for (size_t j = 0; j < half; ++j) {
      const float interp = freq_scale * extrap;
      float theta = interp;
      if (ext_factor != 0.0f) {
        const float y = (static_cast<float>(j) - corr_low) / span;
        const float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * ext_factor;
        theta = interp * (1.0f - mix) + extrap * mix;
      }
      const float c = cosf(theta) * m, s = sinf(theta) * m;
      float* a = neox ? r + j : r + 2 * j;
      float* b = neox ? r + j + half : r + 2 * j + 1;
      const float x0 = *a, x1 = *b;
      *a = x0 * c - x1 * s;
      *b = x0 * s + x1 * c;
      extrap *= theta_scale;
    }
  }
}

void SwigluRow(const float* gate, const float* up, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

}  // namespace kernels
}  // namespace sonde
