// The native transformer of sonde's language models (llama, qwen2, qwen2moe, deepseek2; MoE layers through
// ops/moe.h). An LlmModel is immutable and shared by every pool and running step: the weights are
// read in place from the GGUF mapping it holds. K/V live in a paged pool (ops/kv_pool.h), which also
// owns the scratch arena of the steps on it; RunStep() is the one forward pass.
//
// Precision: activations are fp32, K/V fp32 or fp16 as the pool stores them; matrix products follow
// kernels/quant/quant.h (block-quantised weights see activations quantised to int8 per block of
// 32); attention softmax is fp32 (kernels/attention/attention.h).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "kernels/attention/attention.h"
#include "ops/moe.h"
#include "ops/quant_matmul.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class LlmArch : int32_t { kLlama = 0, kQwen2 = 1, kQwen2Moe = 2, kDeepseek2 = 3 };

// Hyperparameters as lib/llm/arch.ts read and validated them (ModelConfig).
struct LlmConfig {
  LlmArch arch = LlmArch::kLlama;
  size_t vocab = 0, context = 0, embd = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, ff = 0;
  float eps = 1e-5f, rope_base = 10000.f, rope_scale = 1.f;
  bool neox = false;
  size_t experts = 0, experts_used = 0, expert_ff = 0, shared_ff = 0;
  // Layers [0, dense_lead) of an MoE model are dense (deepseek2's leading_dense_block_count).
  size_t dense_lead = 0;
  // Routing (ops/moe.h): gating, the k weights' renormalisation and scale, group-limited choice
  // (expert_groups > 1: the best expert_groups_used groups by the sum of their two best keys).
  MoeScoring gating = MoeScoring::kSoftmax;
  bool weights_norm = false;
  float weights_scale = 1.f;
  size_t expert_groups = 0, expert_groups_used = 0;
  // Multi-head latent attention (deepseek2; kv_lora > 0): q through a LoRA of rank q_lora (0: one
  // projection), per head a k_nope + rope_dim query and a v_dim value; the cache holds per
  // position the kv_lora latent and the rope_dim roped key part (ops/kv_pool.h: KvCacheShape).
  // kq_scale: the attention's softmax scale (YaRN's mscale^2 / sqrt(k_nope + rope_dim)).
  size_t q_lora = 0, kv_lora = 0, rope_dim = 0, k_nope = 0, v_dim = 0;
  float kq_scale = 0.f;
  // YaRN RoPE (yarn_ext_factor != 0; rope_scale is then its factor): the correction range from
  // the original context length and beta_fast/beta_slow, and the magnitude given to the rotation
  // (kernels/norm/norm.h: RopeRowYarn).
  float yarn_ext_factor = 0.f, yarn_corr_low = 0.f, yarn_corr_high = 0.f, yarn_magnitude = 1.f;
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
  kSlotGateInpShexp, kSlotGateShexp, kSlotUpShexp, kSlotDownShexp,
  kSlotQA, kSlotQANorm, kSlotQB, kSlotKvAMqa, kSlotKvANorm, kSlotKvB, kSlotKB, kSlotVB, kSlotExpProbsB, kLlmLayerSlots,
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
  bool moe_ffn = false;
  // MLA: q_a/q_b (q LoRA) or q; kv_a (the latent and the rope key part); per head the absorbed key
  // up-projection (kv_lora rows of k_nope: q_nope -> latent space) and the value up-projection
  // (v_dim rows of kv_lora: latent -> value), views of attn_k_b/attn_v_b or of attn_kv_b.
  LlmMatrix q_a, q_b, kv_a;
  const float *q_a_norm = nullptr, *kv_a_norm = nullptr;
  std::vector<LlmMatrix> uk, uv;
  // MLA's decompressed form (prefill): per head the key up-projection in the other orientation,
  // k_nope rows of kv_lora (latent -> key); empty when SONDE_MLA_PREFILL pins the absorbed form.
  std::vector<LlmMatrix> wk;
  const float* exp_probs_b = nullptr;
};

class LlmModel;
class GpuLlmModel;
class KvPool;
struct KvStep;
bool RunStep(const LlmModel& model, KvPool& kv, const KvStep& step, float* logits, ThreadPool& pool, unsigned threads,
             const CancelFlag* cancel);

class LlmModel {
 public:
  // Null with *error set (a message naming the tensor) if a tensor is missing, of a type no kernel
  // reads, or of the wrong shape, or the configuration is inconsistent; *unsupported is set when
  // the model is valid but uses something not implemented.
  static std::shared_ptr<const LlmModel> Create(std::shared_ptr<const GgufFile> file, const LlmConfig& config,
                                                const std::vector<int32_t>& indices, std::string* error,
                                                bool* unsupported);
  const LlmConfig& config() const { return cfg_; }
  // Bytes owned natively beyond the mapping (the mapping is the file's, not reported).
  size_t bytes() const {
    return sizeof(*this) + layers_.size() * sizeof(LlmLayer) + (owned_.size() + owned_wk_.size()) * sizeof(float) +
           repacked_bytes_.load();
  }
  // The work of a load that needs the pool, once (thread safe; the first step calls it, and
  // lib/llm/transformer.ts runs it as the load's last, asynchronous part): the q8_0 matrices that
  // run at avx512vnni are repacked into the q8_0x32 layout (kernels/quant/quant.h), whose one
  // kernel streams full cache lines for a decode row and equals the row layout's bit for bit; the
  // mapped pages they came from are released. SONDE_Q8_REPACK=0 at load keeps the file's rows (an
  // A/B switch). A repack that cannot get its memory keeps the file's rows too.
  void Prepare(ThreadPool& pool, unsigned threads) const;
  ~LlmModel();
  // How an MLA step with prompt chunks attends (SONDE_MLA_PREFILL at load: 'absorbed',
  // 'decompressed', else chosen per step by cost, see RunStep).
  enum class MlaForm : int32_t { kAuto = 0, kAbsorbed = 1, kDecompressed = 2 };

 private:
  friend bool RunStep(const LlmModel&, KvPool&, const KvStep&, float*, ThreadPool&, unsigned, const CancelFlag*);
  // ops/llm_gpu.h uploads the weights this validated (before any Prepare: the file's rows).
  friend class GpuLlmModel;
  LlmModel() = default;
  std::shared_ptr<const GgufFile> file_;
  LlmConfig cfg_;
  LlmMatrix embd_, output_;
  const float* output_norm_ = nullptr;
  std::vector<LlmLayer> layers_;
  // The transposed key halves of a joined attn_kv_b (the absorbed form needs them row-major over
  // k_nope), in f32.
  std::vector<float> owned_;
  // The decompression key matrices of split attn_k_b tensors (transposed to k_nope rows of
  // kv_lora), in f32.
  std::vector<float> owned_wk_;
  MlaForm mla_form_ = MlaForm::kAuto;
  void RepackQ8(ThreadPool& pool, unsigned threads);
  bool repack_q8_ = true;
  mutable std::once_flag prepared_;
  // One anonymous mapping holding every repacked matrix (huge pages where the kernel gives them:
  // fewer faults while it fills, fewer TLB misses in the decode stream).
  void* repacked_ = nullptr;
  size_t repacked_map_bytes_ = 0;
  std::atomic<size_t> repacked_bytes_{0};
  kernels::AttentionSpanUkernel attend_ = nullptr;
  kernels::AttentionSpanF16Ukernel attend_f16_ = nullptr;
};

// One batched forward step on a paged pool (ops/kv_pool.h; lib/llm/engine.ts: KvPool.step): the
// block copies, then every sequence's new tokens as rows of one pass through the layers (each
// weight matrix is read once for all rows), RoPE at each row's own position, K/V written through
// each sequence's block table (rounded to fp16 in an f16 pool), attention per (row, head) reading
// its sequence's blocks in position order, causal. logits: [step.out_rows.size() x vocab], only
// those rows go through the output norm and the vocabulary product. The step must have passed
// ValidateKvStep and its blocks must be allocated (KvPool::Reserve). Returns false when cancelled
// (the positions being written then hold unspecified values). Throws std::bad_alloc while the arena
// grows, std::runtime_error if an MoE layer fails.
bool RunStep(const LlmModel& model, KvPool& kv, const KvStep& step, float* logits, ThreadPool& pool, unsigned threads,
             const CancelFlag* cancel);

}  // namespace sonde
