// The native transformer of sonde's language models (llama, qwen2; MoE layers through ops/moe.h
// once wired). An LlmModel is immutable and shared by every sequence and running eval: the
// weights are read in place from the GGUF mapping it holds. An LlmSequence owns one sequence's KV
// cache and its scratch arena; Forward() appends tokens to it and computes their logits.
//
// Precision: activations and the KV cache are fp32; matrix products follow kernels/quant/quant.h
// (block-quantised weights see activations quantised to int8 per block of 32); attention softmax
// is fp32 (kernels/attention/attention.h).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "kernels/attention/attention.h"
#include "ops/moe.h"
#include "ops/quant_matmul.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class LlmArch : int32_t { kLlama = 0, kQwen2 = 1, kQwen2Moe = 2 };

// Hyperparameters as lib/llm/arch.ts read and validated them (ModelConfig).
struct LlmConfig {
  LlmArch arch = LlmArch::kLlama;
  size_t vocab = 0, context = 0, embd = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, ff = 0;
  float eps = 1e-5f, rope_base = 10000.f, rope_scale = 1.f;
  bool neox = false;
  size_t experts = 0, experts_used = 0, expert_ff = 0, shared_ff = 0;
  // Kernel level for every product and attention: kAuto = the fastest here; kScalar, kAvx2,
  // kAvx512 pin one (tests compare them; the caller checked the CPU runs it).
  QuantVariant variant = QuantVariant::kAuto;
};

// Tensor slots, in the order of the index table lib/llm/arch.ts builds (-1: absent): the global
// ones, then kLlmLayerSlots per layer.
enum LlmGlobalSlot : int32_t { kSlotTokenEmbd = 0, kSlotOutputNorm = 1, kSlotOutput = 2, kLlmGlobalSlots = 3 };
enum LlmLayerSlot : int32_t {
  kSlotAttnNorm = 0, kSlotQ, kSlotK, kSlotV, kSlotQBias, kSlotKBias, kSlotVBias, kSlotO, kSlotFfnNorm,
  kSlotGate, kSlotUp, kSlotDown, kSlotGateInp, kSlotGateExps, kSlotUpExps, kSlotDownExps,
  kSlotGateInpShexp, kSlotGateShexp, kSlotUpShexp, kSlotDownShexp, kLlmLayerSlots,
};

// A weight matrix of n rows of k elements (n * experts rows for stacked experts), read in place.
struct LlmMatrix {
  const uint8_t* data = nullptr;
  int32_t type = kernels::kQuantF32;
  QuantVariant variant = QuantVariant::kScalar;
  size_t k = 0, n = 0;
  size_t row_bytes = 0;
};

struct LlmLayer {
  const float* attn_norm = nullptr;
  LlmMatrix q, k, v, o;
  const float *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr;
  const float* ffn_norm = nullptr;
  LlmMatrix gate, up, down;  // dense FFN
  // MoE FFN: router (experts rows), stacked experts (expert e's rows at e * expert_ff), and
  // qwen2moe's shared expert with its sigmoid gate (a vector of embd).
  LlmMatrix gate_inp, gate_exps, up_exps, down_exps;
  const float* gate_inp_shexp = nullptr;
  LlmMatrix gate_shexp, up_shexp, down_shexp;
  MoeLayer moe;  // the above as ops/moe.h runs them (experts > 0)
};

class LlmModel;
class LlmSequence;
bool Forward(const LlmModel& model, LlmSequence& seq, const int32_t* tokens, size_t n, float* logits, bool all_logits,
             ThreadPool& pool, unsigned threads, const CancelFlag* cancel);

class LlmModel {
 public:
  // Null with *error set (a message naming the tensor) if a tensor is missing, of a type no kernel
  // reads, or of the wrong shape, or the configuration is inconsistent; *unsupported is set when
  // the model is valid but uses something not implemented (MoE layers before ops/moe is wired).
  static std::shared_ptr<const LlmModel> Create(std::shared_ptr<const GgufFile> file, const LlmConfig& config,
                                                const std::vector<int32_t>& indices, std::string* error,
                                                bool* unsupported);
  const LlmConfig& config() const { return cfg_; }
  // Bytes owned natively beyond the mapping (the mapping is the file's, not reported).
  size_t bytes() const { return sizeof(*this) + layers_.size() * sizeof(LlmLayer); }

 private:
  friend bool Forward(const LlmModel&, LlmSequence&, const int32_t*, size_t, float*, bool, ThreadPool&, unsigned,
                      const CancelFlag*);
  LlmModel() = default;
  std::shared_ptr<const GgufFile> file_;
  LlmConfig cfg_;
  LlmMatrix embd_, output_;
  const float* output_norm_ = nullptr;
  std::vector<LlmLayer> layers_;
  kernels::AttentionSpanUkernel attend_ = nullptr;
};

// One sequence: fp32 KV cache [layer][kv_head][pos][head_dim] (K and V separately) of `capacity`
// positions, plus the scratch arena of the evals on it (grown to the largest eval, then reused).
class LlmSequence {
 public:
  // span: positions attention reads per call of its kernel (0 = the whole cache); a paged cache
  // reads one page at a time, and a small span exercises that path today. Throws std::bad_alloc.
  LlmSequence(const LlmConfig& config, size_t capacity, size_t span = 0);
  size_t capacity() const { return capacity_; }
  size_t length() const { return length_; }
  void Truncate(size_t length) { if (length < length_) length_ = length; }
  size_t bytes() const { return (keys_.size() + values_.size()) * sizeof(float); }
  // Tokens routed to each expert, [layer][expert], summed over this sequence's evals (MoE models).
  const std::vector<uint64_t>& expert_counts() const { return expert_counts_; }
  // Set while an eval runs on it: truncate and a second eval are refused meanwhile.
  std::atomic<bool> busy{false};

  // The cache accessor attention reads through: the span of positions [pos, pos + n) of one
  // layer and KV head, contiguous in this cache (a paged cache hands out one span per page).
  const float* Keys(size_t layer, size_t kv_head, size_t pos) const { return keys_.data() + Offset(layer, kv_head, pos); }
  const float* Values(size_t layer, size_t kv_head, size_t pos) const { return values_.data() + Offset(layer, kv_head, pos); }
  size_t SpanEnd(size_t pos) const { return span_ ? std::min(capacity_, (pos / span_ + 1) * span_) : capacity_; }

 private:
  friend bool Forward(const LlmModel&, LlmSequence&, const int32_t*, size_t, float*, bool, ThreadPool&, unsigned,
                      const CancelFlag*);
  size_t Offset(size_t layer, size_t kv_head, size_t pos) const {
    return ((layer * kv_heads_ + kv_head) * capacity_ + pos) * head_dim_;
  }
  float* KeysMut(size_t layer, size_t kv_head, size_t pos) { return keys_.data() + Offset(layer, kv_head, pos); }
  float* ValuesMut(size_t layer, size_t kv_head, size_t pos) { return values_.data() + Offset(layer, kv_head, pos); }

  size_t capacity_, kv_heads_, head_dim_, span_;
  size_t length_ = 0;
  std::vector<float> keys_, values_;
  // Scratch arena, sized for the largest n seen.
  size_t arena_rows_ = 0;
  std::vector<float> x_, xn_, q_, k_, v_, att_, gate_, up_, moe_out_;
  std::vector<uint64_t> expert_counts_;
  QuantMatmulScratch qscratch_;
};

// Appends tokens[0..n) at positions [seq.length(), seq.length() + n) and writes their logits:
// [n x vocab] if all_logits, else the last row's [vocab]. Token ids and capacity are the caller's
// to check (the binding does). On cancel returns false and leaves the sequence's length unchanged.
bool Forward(const LlmModel& model, LlmSequence& seq, const int32_t* tokens, size_t n, float* logits, bool all_logits,
             ThreadPool& pool, unsigned threads, const CancelFlag* cancel);

}  // namespace sonde
