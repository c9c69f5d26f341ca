// The token choice of chained decode steps on the CPU (KvPool.stepChain, lib/llm/engine.ts): the
// host twin of kernels/llm/cuda/llm.cu's llm_chain_next. A step's logits row gives the argmax, or
// with parameters lib/llm/sampling.ts's Sampler draw for 0 < top-k <= 64 without penalties: the
// same top-k kernel the Sampler calls (ElementwiseUkernels::sample_top_k), then z, top-p, min-p,
// temperature and the xoshiro128** draw in float64 in the Sampler's order. Only exp may differ in
// its last bit from V8's Math.exp, which would change a draw about once in 1e15.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/elementwise/elementwise.h"

namespace sonde {

// The most candidates a chain samples from (lib/llm/sampling.ts: CHAIN_TOP_K).
constexpr size_t kChainTopK = 64;

// The next token for `row` (vocab logits). p: the sequence's 4 parameters as ops/kv_pool.h's
// KvChain lays them out (temperature (<= 0: the argmax), top-k, top-p, log(min-p) or -inf), or
// null for the argmax; rng: its 4-word xoshiro128** state, advanced by the draw (untouched by the
// argmax or a single candidate). ids: scratch, grown to top-k entries.
int32_t ChooseChainToken(const kernels::ElementwiseUkernels& uk, const float* row, size_t vocab, const double* p,
                         uint32_t* rng, std::vector<int32_t>& ids);

}  // namespace sonde
