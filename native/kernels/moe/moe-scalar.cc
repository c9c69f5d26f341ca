#include "kernels/moe/moe.h"

#include <math.h>

namespace sonde {
namespace kernels {

namespace {

void SwigluScalar(size_t n, const float* gate, const float* up, float* h) {
  for (size_t i = 0; i < n; ++i) {
    const float g = gate[i];
    h[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

void ScaleAddScalar(size_t n, float w, const float* x, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// a ranks before b: larger key, NaN last, ties to the lower index (a < b is the caller's order).
bool Before(float a, float b) {
  if (isnan(a)) return false;
  if (isnan(b)) return true;
  return a > b;
}

}  // namespace

MoeUkernels MoeUkernelsScalar() { return MoeUkernels{"scalar", SwigluScalar, ScaleAddScalar}; }

void MoeRouteToken(size_t n_experts, size_t k, const float* logits, int32_t scoring, const float* bias,
                   bool renormalize, float scale, float* probs, int32_t* ids, float* weights) {
  if (scoring == kMoeSigmoid) {
    for (size_t e = 0; e < n_experts; ++e) probs[e] = 1.0f / (1.0f + expf(-logits[e]));
  } else {
    // A NaN or infinite logit makes every score NaN here (inf - inf, or a NaN sum), as in
    // llama.cpp; selection below still yields valid ids and the NaN reaches the output.
    float mx = -INFINITY;
    for (size_t e = 0; e < n_experts; ++e)
      if (logits[e] > mx) mx = logits[e];
    double sum = 0;
    for (size_t e = 0; e < n_experts; ++e) {
      probs[e] = expf(logits[e] - mx);
      sum += probs[e];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (size_t e = 0; e < n_experts; ++e) probs[e] *= inv;
  }
  // Insertion into the k best so far: k is small (1..8 in practice).
  size_t filled = 0;
  for (size_t e = 0; e < n_experts; ++e) {
    const float key = bias ? probs[e] + bias[e] : probs[e];
    if (filled == k) {
      const size_t last = static_cast<size_t>(ids[k - 1]);
      if (!Before(key, bias ? probs[last] + bias[last] : probs[last])) continue;
    }
    size_t pos = filled < k ? filled : k - 1;
    while (pos > 0) {
      const size_t prev = static_cast<size_t>(ids[pos - 1]);
      if (!Before(key, bias ? probs[prev] + bias[prev] : probs[prev])) break;
      ids[pos] = ids[pos - 1];
      --pos;
    }
    ids[pos] = static_cast<int32_t>(e);
    if (filled < k) ++filled;
  }
  double sum = 0;
  for (size_t j = 0; j < k; ++j) {
    weights[j] = probs[ids[j]];
    sum += weights[j];
  }
  if (renormalize) {
    const float s = static_cast<float>(sum);
    const float denom = s > 6.103515625e-5f ? s : 6.103515625e-5f;
    for (size_t j = 0; j < k; ++j) weights[j] /= denom;
  }
  if (scale != 1.0f)
    for (size_t j = 0; j < k; ++j) weights[j] *= scale;
}

}  // namespace kernels
}  // namespace sonde
