#include "ops/chain_sampling.h"

#include <algorithm>
#include <cmath>

#include "kernels/llm/xoshiro.h"

namespace sonde {

int32_t ChooseChainToken(const kernels::ElementwiseUkernels& uk, const float* row, size_t vocab, const double* p,
                         uint32_t* rng, std::vector<int32_t>& ids) {
  const auto argmax = [&] { return static_cast<int32_t>(uk.sample_argmax(vocab, row)); };
  if (!p || !(p[0] > 0) || vocab <= 1) return argmax();
  const double temperature = p[0], top_p = p[2], min_logit = p[3];
  const size_t k = std::min({static_cast<size_t>(p[1]), vocab, kChainTopK});
  if (ids.size() < k) ids.resize(k);
  const size_t n = uk.sample_top_k(vocab, row, k, ids.data());
  if (n == 0 || !std::isfinite(row[ids[0]])) return argmax();
  const double max = row[ids[0]];
  double z = 0;
  for (size_t i = 0; i < n; ++i) z += std::exp(static_cast<double>(row[ids[i]]) - max);
  size_t kept = n;
  if (top_p < 1) {
    double cum = 0;
    for (size_t i = 0; i < n; ++i) {
      cum += std::exp(static_cast<double>(row[ids[i]]) - max) / z;
      if (cum >= top_p) {
        kept = i + 1;
        break;
      }
    }
  }
  if (min_logit > -INFINITY) {
    size_t i = 1;
    while (i < kept && static_cast<double>(row[ids[i]]) - max >= min_logit) ++i;
    kept = i;
  }
  if (kept == 1) return ids[0];
  double probs[kChainTopK], sum = 0;
  for (size_t i = 0; i < kept; ++i) {
    const double e = std::exp((static_cast<double>(row[ids[i]]) - max) / temperature);
    sum += probs[i] = e > 0 ? e : 0;
  }
  const double r = static_cast<double>(XoshiroNext(rng)) / 4294967296.0;
  double cum = 0;
  for (size_t i = 0; i < kept; ++i) {
    cum += probs[i] / sum;
    if (r < cum) return ids[i];
  }
  return ids[kept - 1];
}

}  // namespace sonde
