// Mixture-of-Experts feed-forward operator: y = MoE(x) for a batch of token rows, weights read in
// place as GGUF stores them (any type ops/quant_matmul.h reads: f32 | f16 | bf16 | q8_0 | q4_0).
//
// Semantics (those of llama.cpp's build_moe_ffn, so logits match it):
//   logits[e] = x . router[e]                              (router: n_experts rows of d_model)
//   p = softmax(logits) over ALL experts            (kSoftmax: Mixtral, qwen2moe)
//     | sigmoid(logits) element-wise                (kSigmoid: DeepSeek-V3 style)
//   the k experts with the largest p (+ selection_bias, if given; the bias only chooses, the
//   weights stay p) are chosen; ties go to the lower expert index; with groups > 1 (DeepSeek's
//   group-limited routing) only among the groups_used groups (of n_experts / groups consecutive
//   experts) whose two largest keys sum highest (llama.cpp's rule for V2 and V3 alike);
//   w_j = p[chosen_j]; if renormalize: w_j /= max(sum_j w_j, 2^-14) (Mixtral: true; qwen2moe: false,
//   unless the model sets norm_topk_prob); then w_j *= weight_scale;
//   y = sum_j w_j * down_e(silu(gate_e . x) * (up_e . x))   e = chosen_j (SwiGLU)
//   + if shared_d_ff > 0: s * down_s(silu(gate_s . x) * (up_s . x)) with
//     s = sigmoid(x . shared_gate_inp) when shared_gate_inp is given (qwen2moe), else s = 1.
// Each matmul follows the precision definition of kernels/quant/quant.h (block weight types
// quantise the activations to int8 per block of 32 first, as llama.cpp does).
//
// capacity_factor > 0 (batched prefill only; 0 = off, results exact): each expert takes at most
//   capacity = ceil(capacity_factor * tokens * k / n_experts) token rows, in token order. A token
//   past its chosen expert's capacity is DROPPED TO THE RESIDUAL for that expert: that expert's
//   contribution to the token is zero, and the token's other weights are not renormalised.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ops/quant_matmul.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class MoeScoring : int32_t { kSoftmax = 0, kSigmoid = 1 };

// One stacked expert tensor as GGUF stores ffn_{gate,up,down}_exps: n_experts matrices, each of
// `rows` rows of `cols` elements of `type`, expert e at data + e * expert_stride bytes.
// gate/up: rows = d_ff, cols = d_model; down: rows = d_model, cols = d_ff.
struct MoeExpertWeights {
  const uint8_t* data = nullptr;
  int32_t type = kernels::kQuantF32;
  size_t expert_stride = 0;  // bytes; QuantRowBytes(type, cols) * rows when densely stacked
};

// One plain (non-stacked) matrix: rows of cols elements of type, rows contiguous.
struct MoeMatrix {
  const uint8_t* data = nullptr;
  int32_t type = kernels::kQuantF32;
};

struct MoeLayer {
  size_t d_model = 0, d_ff = 0, n_experts = 0, k = 0;  // block types need d_model, d_ff % 32 == 0
  MoeMatrix router;                                     // n_experts x d_model (ffn_gate_inp)
  MoeExpertWeights gate, up, down;                      // ffn_gate_exps, ffn_up_exps, ffn_down_exps
  MoeScoring scoring = MoeScoring::kSoftmax;
  bool renormalize = false;
  float weight_scale = 1.0f;
  const float* selection_bias = nullptr;  // optional, n_experts floats (exp_probs_b)
  size_t groups = 0, groups_used = 0;      // groups <= 1: no group limit
  // Shared expert (qwen2moe: ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp). shared_d_ff = 0: none.
  size_t shared_d_ff = 0;
  MoeMatrix shared_gate, shared_up;  // shared_d_ff x d_model
  MoeMatrix shared_down;             // d_model x shared_d_ff
  MoeMatrix shared_gate_inp;         // 1 x d_model, optional (data null: scale 1)
  float capacity_factor = 0.0f;
  QuantVariant variant = QuantVariant::kAuto;  // matmul kernels (kReference: exact double sums)
};

// The routing result of one token: k expert indices and their final weights (after renormalize and
// weight_scale), in descending score order.
// Returns false when cancelled. Throws std::bad_alloc.
bool RunMoeRoute(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& layer, const float* x,
                 size_t tokens, int32_t* expert_ids /* tokens x k */, float* expert_weights /* tokens x k */,
                 float* scores /* optional, tokens x n_experts: p before selection */);

// One row-chunk of one matrix product of a single token: y[0, n) = x . W[0, n)^T, x's activations
// already quantised (row row0 of *acts).
struct MoeGemvPiece {
  const float* x;
  size_t k;
  const uint8_t* w;
  int32_t type;
  size_t n;
  float* y;
  const QuantMatmulScratch* acts;
  size_t row0;
};

// RunMoe's work buffers. A caller that runs many layers and steps (a transformer's forward pass)
// keeps one per sequence or batch and passes it to every RunMoe call, so that once the buffers
// have grown to the largest batch, a decode step allocates nothing. Not shared between concurrent
// calls.
struct MoeScratch {
  std::vector<int32_t> ids;
  std::vector<float> weights, logits, scores, keys;
  std::vector<size_t> routed, rows, offset, fill, wide, narrow;
  std::vector<int64_t> row_of;
  std::vector<float> xg, hg, hu, yo, h, out, so, sg, su, sgate;
  std::vector<MoeGemvPiece> pieces;
  std::vector<char> ok;
  // Activations quantised once per weight type (indexed by kernels::QuantWeightType) for a single
  // token's gate/up chunks, its down inputs, and the shared expert's down input.
  QuantMatmulScratch x_acts[kernels::kQuantTypeCount], h_acts, shared_h_acts;
  // One per expert (batched prefill runs small experts side by side, each on its own thread), plus
  // the router's and the shared expert's.
  std::vector<QuantMatmulScratch> expert_acts;
  QuantMatmulScratch acts;
};

// Checks a layer's sizes and types; empty when valid, else what is wrong.
std::string ValidateMoeLayer(const MoeLayer& layer);

// y[tokens x d_model] = MoE(x[tokens x d_model]) (written, not accumulated; y must not overlap x).
// expert_counts (optional, n_experts): += tokens routed to each expert (before any capacity drop).
// dropped (optional): += (token, expert) pairs dropped by the capacity limit.
// Returns false with *error set on invalid layer ("cancelled" when cancel was set); never throws.
// threads: at most this many pool threads (0: the whole pool).
// Single token: the GEMVs of its k experts (and the shared expert) run as two phases of row chunks
// over all threads (gate/up, then down). Batches: token rows are grouped by expert, and the
// experts' GEMMs run over the threads by work (big groups split over N, small ones side by side).
// scratch: null for buffers of this call only.
bool RunMoe(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& layer, const float* x,
            size_t tokens, float* y, uint64_t* expert_counts, std::string* error, uint64_t* dropped = nullptr);
bool RunMoe(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& layer, const float* x,
            size_t tokens, float* y, uint64_t* expert_counts, std::string* error, uint64_t* dropped,
            MoeScratch* scratch);

}  // namespace sonde
