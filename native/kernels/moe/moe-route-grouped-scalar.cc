// Group-limited routing (DeepSeek-V2/V3): the groups are chosen first, then the experts inside
// them. Done through MoeRouteToken with a bias that is the selection bias on the chosen groups
// and -inf elsewhere, so scoring, tie-breaking and weighting are the ungrouped router's exactly.
#include <math.h>

#include "kernels/moe/moe.h"

namespace sonde {
namespace kernels {

namespace {

// a ranks before b: larger, NaN last (as MoeRouteToken orders keys).
bool Better(float a, float b) {
  if (isnan(a)) return false;
  if (isnan(b)) return true;
  return a > b;
}

}  // namespace

void MoeRouteTokenGrouped(size_t n_experts, size_t k, size_t groups, size_t groups_used, const float* logits,
                          int32_t scoring, const float* bias, bool renormalize, float scale, float* probs, float* keys,
                          int32_t* ids, float* weights) {
  // The scores alone first (one expert, no bias): probs is all this call is for.
  MoeRouteToken(n_experts, 1, logits, scoring, nullptr, false, 1.0f, probs, ids, weights);
  const size_t per = n_experts / groups;
  // Group scores go in keys[g * per] (overwritten below): the first slot of each group.
  for (size_t g = 0; g < groups; ++g) {
    float best = -INFINITY, second = -INFINITY;
    bool seen = false;
    for (size_t e = g * per; e < (g + 1) * per; ++e) {
      const float key = bias ? probs[e] + bias[e] : probs[e];
      if (!seen || Better(key, best)) {
        second = best;
        best = key;
        seen = true;
      } else if (Better(key, second)) {
        second = key;
      }
    }
    keys[g * per] = per > 1 ? best + second : best;
  }
  // Mark the chosen groups: groups_used passes of "best unchosen group", ties to the lower index.
  // A chosen group's first slot is set to +inf so a later pass skips it (groups are tens at most).
  for (size_t pass = 0; pass < groups_used; ++pass) {
    size_t pick = groups;
    for (size_t g = 0; g < groups; ++g) {
      const float s = keys[g * per];
      if (s == INFINITY) continue;
      if (pick == groups || Better(s, keys[pick * per])) pick = g;
    }
    if (pick == groups) break;
    keys[pick * per] = INFINITY;
  }
  for (size_t g = 0; g < groups; ++g) {
    const bool chosen = keys[g * per] == INFINITY;
    for (size_t e = g * per; e < (g + 1) * per; ++e) keys[e] = chosen ? (bias ? bias[e] : 0.0f) : -INFINITY;
  }
  MoeRouteToken(n_experts, k, logits, scoring, keys, renormalize, scale, probs, ids, weights);
}

}  // namespace kernels
}  // namespace sonde
