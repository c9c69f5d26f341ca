// The transformer of ops/llm.h on a GPU (real, or the CUDA emulator): the same forward pass, op by
// op, composed of the registered GPU ops (runtime/cuda/gpu.h) of the kernel families: quant
// (q8_0/q4_0 products), gemm (f32/f16/bf16 products), norm (RMSNorm, SwiGLU), attention (RoPE,
// kv_store, paged decode and prefill) and llm (embedding, residual adds, biases, block copies).
//
// A GpuLlmModel is built from a validated LlmModel (LlmModel::Create checks every tensor, so the
// checks live in one place) and uploads every weight once, in the layout its op reads: q8_0/q4_0
// repacked by quant_pack, float matrices transposed to the GEMM's row-major [k][n], norm weights and
// biases as they are. The CPU model is not needed afterwards. A GpuKvPool holds the blocks in one
// device allocation in the CPU pool's layout (ops/kv_pool.h), so readBlocks gives the same bytes
// on either device; it grows by reallocation (a copy on the device) as block ids are first used,
// never past max_blocks. A step uploads its token ids, positions and block tables in one copy,
// launches every layer's ops on one stream and downloads only the requested logits rows.
//
// Forms: dense layers as ops/llm.cc runs them (qwen2's biases fused in the float GEMM's epilogue,
// added after a quantised product); MoE layers through moe/cuda/moe.cu's one-call op (routing,
// grouped expert GEMMs, combine) plus the shared experts; MLA (deepseek2) absorbed for every row,
// each row attending as its own sequence through the MLA decode kernel (the decompressed prefill
// form of the CPU is not mirrored: the same result, more work on long prompts). Launches are few
// per layer, since a decode step is a few microseconds of work per kernel: a residual add also
// computes the RMSNorm that reads its result next, norms and SwiGLU also write their output
// quantised for the q8_0/q4_0 product that reads it (which then skips its quantiser), and one
// kernel ropes q and k and stores K/V (kernels/llm/cuda/llm.cu).
//
// Every device failure is a GpuError (kOutOfMemory names the device and what was allocated).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ops/kv_pool.h"
#include "ops/llm.h"
#include "runtime/cuda/gpu.h"
#include "runtime/thread_pool.h"

namespace sonde {

// A registered op and one prebuilt call of it: buffers and the parameters fixed at build time are
// set once, a step sets only the sizes that vary (rows, sequences).
struct GpuLlmCall {
  GpuOpFn fn = nullptr;
  GpuOpCall call;
  void Run(GpuStream& s, const GpuDeviceInfo& d) const;
};

// A weight matrix of n rows of k in device memory, as its product op reads it.
struct GpuLlmMatrix {
  std::shared_ptr<GpuAllocation> data;
  int32_t type = 0;  // kernels::QuantWeightType
  size_t k = 0, n = 0;
};

struct GpuLlmLayer {
  std::shared_ptr<GpuAllocation> attn_norm, ffn_norm, q_bias, k_bias, v_bias;
  GpuLlmMatrix q, k, v, o, gate, up, down;
  // q, k and v of one type joined into one matrix (their rows in that order) and their biases:
  // one product for all three, whose k and v alone would be too small to fill a GPU at decode.
  // Empty (qkv.data null) when the types differ; q, k, v are then uploaded apart.
  GpuLlmMatrix qkv;
  std::shared_ptr<GpuAllocation> qkv_bias;
  // gate and up of one type joined the same way (gate's rows, then up's): one product reads the
  // FFN's input once and fills the GPU with twice the rows; SwiGLU reads its output in place.
  // Empty when the types differ (or SONDE_GPU_JOIN_FFN=0, an A/B switch).
  GpuLlmMatrix gate_up;
  // MoE FFN (moe/cuda/moe.cu's one-call op): the router in f32 and the stacked experts in f32 or
  // bf16 (GpuLlmModel::experts_bf16), and the shared experts in their own type with qwen2moe's
  // sigmoid gate (a vector of embd).
  bool moe = false;
  std::shared_ptr<GpuAllocation> router, gate_exps, up_exps, down_exps, gate_inp_shexp, exp_probs_b;
  GpuLlmMatrix gate_shexp, up_shexp, down_shexp;
  // MLA (deepseek2): the q LoRA (q_a, its norm, q_b) or q, kv_a and the latent's norm, and per head
  // the absorbed key up-projection uk ([heads][kv_lora][k_nope]) and the value up-projection uv
  // ([heads][v_dim][kv_lora]) in f32 for llm_head_matmul.
  GpuLlmMatrix q_a, q_b, kv_a;
  std::shared_ptr<GpuAllocation> q_a_norm, kv_a_norm, uk, uv;
};

class GpuKvPool;

class GpuLlmModel {
 public:
  // What this GPU path cannot run of a valid model ("" when it runs all of it), e.g.
  // "architecture qwen2moe". The caller places such a model elsewhere.
  static std::string Unsupported(const LlmModel& cpu);
  // Uploads every weight. Throws GpuError (kOutOfMemory naming the tensor) and, when `cancel` is
  // set midway, returns null.
  static std::shared_ptr<const GpuLlmModel> Create(const LlmModel& cpu, std::shared_ptr<GpuDevice> device,
                                                   const CancelFlag* cancel);
  const LlmConfig& config() const { return cfg_; }
  GpuDevice& device() const { return *device_; }
  const std::shared_ptr<GpuDevice>& device_ptr() const { return device_; }
  // Device bytes of the weights.
  size_t bytes() const { return bytes_; }
  // The stacked experts are bf16 on the device (else f32): see Create.
  bool experts_bf16() const { return experts_bf16_; }

  // One batched step (ops/llm.h: RunStep) on the device; the step passed ValidateKvStep for this
  // pool. logits: host memory for step.out_rows.size() x vocab floats. Returns false when cancelled
  // (checked between layers; the positions being written then hold unspecified values). Throws
  // GpuError.
  bool Step(GpuKvPool& kv, const KvStep& step, float* logits, const CancelFlag* cancel) const;
  // chain.steps decode steps of every sequence of `step` (ops/kv_pool.h: KvChain; tables covering
  // start + steps positions), each step's token chosen from the previous step's logits on the device
  // (kernels/llm/cuda's llm_chain_next) and fed to the next step there: the host queues the steps
  // and waits for them in groups. Returns false when cancelled between steps.
  bool StepChain(GpuKvPool& kv, const KvStep& step, const KvChain& chain, const CancelFlag* cancel) const;

  struct Ops;  // the registered ops a step runs, looked up once (llm_gpu.cc)

 private:
  GpuLlmModel() = default;
  friend class GpuKvPool;
  bool Run(GpuKvPool& kv, const KvStep& step, float* logits, const KvChain* chain, const CancelFlag* cancel) const;
  LlmConfig cfg_;
  std::shared_ptr<GpuDevice> device_;
  size_t bytes_ = 0;
  bool experts_bf16_ = false;
  int32_t embd_type_ = 0;
  std::shared_ptr<GpuAllocation> embd_;  // the GGUF rows, for the lookup
  std::shared_ptr<GpuAllocation> output_norm_;
  GpuLlmMatrix output_;
  std::vector<GpuLlmLayer> layers_;
  std::shared_ptr<const Ops> ops_;  // the registered ops, looked up once
};

// The device arena of one pool's steps (grown to the largest row count seen, as LlmArena) and
// the prebuilt calls over it.
struct GpuLlmArena;

class GpuKvPool {
 public:
  // No block memory yet (Reserve allocates).
  GpuKvPool(std::shared_ptr<const GpuLlmModel> model, size_t block_size, size_t max_blocks, KvDtype dtype);
  ~GpuKvPool();
  GpuKvPool(const GpuKvPool&) = delete;
  GpuKvPool& operator=(const GpuKvPool&) = delete;

  size_t block_size() const { return block_size_; }
  size_t max_blocks() const { return max_blocks_; }
  KvDtype dtype() const { return dtype_; }
  size_t block_bytes() const { return block_bytes_; }
  size_t allocated_blocks() const { return capacity_; }
  size_t bytes() const { return capacity_ * block_bytes_; }
  size_t high_water_bytes() const { return high_water_; }
  // Block memory plus the step arena, in device memory.
  size_t HeldBytes() const;
  const GpuLlmModel& model() const { return *model_; }

  // Makes blocks [0, last] exist (new ones zeroed), growing the allocation to at least twice its
  // size (capped at max_blocks) and copying the held blocks over. Throws GpuError (kOutOfMemory).
  void Reserve(size_t last, GpuStream& stream);
  // Raw block bytes, as the CPU pool lays them out; the caller synchronises the stream.
  void ReadBlocks(const std::vector<int32_t>& ids, uint8_t* out, GpuStream& stream) const;
  void WriteBlocks(const std::vector<int32_t>& ids, const uint8_t* bytes, GpuStream& stream);

  uint8_t* data() const { return blocks_ ? static_cast<uint8_t*>(blocks_->data()) : nullptr; }
  GpuLlmArena& arena() { return *arena_; }
  // Tokens routed to each expert by this pool's steps, [layer][expert] (MoE models).
  std::vector<uint64_t>& expert_counts() { return expert_counts_; }
  const std::vector<uint64_t>& expert_counts() const { return expert_counts_; }

  // Set while a job (step, read, write) runs on the pool: the binding refuses a second one.
  std::atomic<bool> busy{false};

 private:
  std::shared_ptr<const GpuLlmModel> model_;
  size_t block_size_, max_blocks_, block_bytes_;
  KvDtype dtype_;
  std::shared_ptr<GpuAllocation> blocks_;
  size_t capacity_ = 0, high_water_ = 0;
  std::unique_ptr<GpuLlmArena> arena_;
  std::vector<uint64_t> expert_counts_;
};

}  // namespace sonde
