// The paged KV cache of a language model (issue #9): one pool per model holds the keys and values
// of every sequence in blocks of block_size positions; a sequence is a table of block ids in
// position order. Which block belongs to whom, sharing, hashing and eviction are decided in TS
// (lib/llm/kv/); the pool is storage, and RunStep (ops/llm.h) is the batched forward that reads and
// writes it.
//
// Block layout: [layer][stream][position][row_width] of fp32 or IEEE half, where what a layer
// caches per position is the architecture's (KvCacheShape): K and V of each KV head as separate
// streams (llama, qwen2: 2 * kv_heads streams of head_dim), or one row that is both key and value
// (deepseek2's MLA latent cache: the normalised kv_lora_rank latent, then the roped key part, read
// as key in full and as value in its first kv_lora_rank elements). Attention of one (layer, stream)
// reads the block's position rows contiguously (row_width elements apart), which is the stride the
// span kernels take.
//
// Memory: chunks of chunk_blocks blocks are allocated as block ids are first used (on the JS
// thread, between steps: the binding reports them to V8), never past max_blocks; the chunk table is
// sized once, so a step reading allocated blocks never sees it move.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ops/moe.h"
#include "ops/quant_matmul.h"

namespace sonde {

enum class KvDtype : int32_t { kF32 = 0, kF16 = 1 };

struct LlmConfig;

// What one layer caches per position: `streams` rows of `row_width` elements. kv_heads: heads
// whose key (and value) rows are addressed; values_in_keys: a head's value row is its key row (the
// MLA latent) instead of a separate stream after the kv_heads key streams.
struct KvCacheShape {
  size_t streams = 0, row_width = 0, kv_heads = 0;
  bool values_in_keys = false;
};
KvCacheShape KvCacheShapeOf(const LlmConfig& config);

// Scratch of the forward pass over a step's rows, grown to the largest row count seen (rounded up
// to a power of two, so a server's varying batch sizes settle after a few steps) and then reused:
// a step allocates nothing once its shape class has been seen.
struct LlmArena {
  size_t rows = 0, out_rows = 0;
  std::vector<float> x, xn, q, k, v, att, gate, up, moe_out;
  std::vector<float> q_lora, q_abs, latent;  // MLA: the q LoRA rows, absorbed queries, latent outputs
  std::vector<QuantMatmulScratch> head_scratch;  // MLA: one per head for the per-head products
  std::vector<float> mla_c, mla_kv, mla_acc;  // MLA decompressed form: latents, per-head K/V, sums
  std::vector<uint32_t> row_pos;  // each row's position in its sequence
  std::vector<uint32_t> row_seq;  // each row's sequence index in the step
  std::vector<float> rope;        // per row: RoPE's cos and sin per pair at its position (head_dim floats)
  QuantMatmulScratch qscratch;
  MoeScratch moe;  // RunMoe's buffers, so a MoE decode step allocates nothing either

  // Bytes held (capacities), for reporting to V8: a long prompt's step grows this to tens of MB.
  size_t Bytes() const;
};

// The most positions a sequence may reach (lib/llm/transformer.ts: MAX_POSITIONS). Past the
// model's trained context length is allowed (its RoPE positions are then out of distribution, as
// llama.cpp allows); nothing native depends on that length.
constexpr size_t kKvMaxPositions = size_t{1} << 24;

// One step (lib/llm/engine.ts: StepBatch), as plain data for a pool thread.
struct KvStepSequence {
  size_t table_offset = 0, table_length = 0;  // into KvStep::tables
  size_t start = 0, tokens = 0, row0 = 0;      // row0: first row of this sequence in the step
};

struct KvStep {
  std::vector<int32_t> tokens;      // every sequence's new tokens, concatenated
  std::vector<int32_t> tables;      // every sequence's block table, concatenated
  std::vector<KvStepSequence> seqs;
  std::vector<int32_t> copies;      // [src, dst] pairs, done first
  std::vector<uint32_t> out_rows;   // rows whose logits are returned, ascending
};

class KvPool {
 public:
  // No block memory yet (Reserve allocates). Throws std::bad_alloc for the chunk table.
  KvPool(const LlmConfig& config, size_t block_size, size_t max_blocks, KvDtype dtype);
  ~KvPool();
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  size_t block_size() const { return block_size_; }
  size_t max_blocks() const { return max_blocks_; }
  KvDtype dtype() const { return dtype_; }
  size_t elem_bytes() const { return dtype_ == KvDtype::kF16 ? 2 : 4; }
  size_t block_bytes() const { return block_bytes_; }
  size_t chunk_blocks() const { return chunk_blocks_; }
  // Blocks [0, allocated_blocks()) have memory.
  size_t allocated_blocks() const { return allocated_; }
  size_t bytes() const { return bytes_; }
  // Block memory plus the step arena: what the binding reports to V8.
  size_t HeldBytes() const { return bytes_ + arena_.Bytes(); }
  size_t high_water_bytes() const { return high_water_; }

  // Allocates the chunks that hold blocks [0, last] (zeroed). Returns the bytes added. JS thread,
  // never while a step runs. Throws std::bad_alloc (what was allocated before stays).
  size_t Reserve(size_t last);

  uint8_t* Block(size_t id) const { return chunks_[id / chunk_blocks_] + (id % chunk_blocks_) * block_bytes_; }
  // Byte offsets inside a block of (layer, kv_head)'s key and value rows.
  size_t KeyOffset(size_t layer, size_t kv_head) const { return (layer * shape_.streams + kv_head) * stream_bytes_; }
  size_t ValueOffset(size_t layer, size_t kv_head) const {
    return shape_.values_in_keys ? KeyOffset(layer, kv_head)
                                 : (layer * shape_.streams + shape_.kv_heads + kv_head) * stream_bytes_;
  }
  const KvCacheShape& shape() const { return shape_; }

  // Tokens routed to each expert by this pool's steps, [layer][expert] (MoE models).
  std::vector<uint64_t>& expert_counts() { return expert_counts_; }
  const std::vector<uint64_t>& expert_counts() const { return expert_counts_; }
  LlmArena& arena() { return arena_; }

  // Set while a job (step, read, write) runs on the pool: the binding refuses a second one.
  std::atomic<bool> busy{false};

 private:
  size_t block_size_, max_blocks_, stream_bytes_, block_bytes_, chunk_blocks_;
  KvCacheShape shape_;
  KvDtype dtype_;
  std::vector<uint8_t*> chunks_;
  size_t allocated_ = 0, bytes_ = 0, high_water_ = 0;
  std::vector<uint64_t> expert_counts_;
  LlmArena arena_;
};

// The C++ second line behind lib/llm/transformer.ts's checks: empty when the step may run on this
// pool, else what is wrong, naming the sequence index and field. vocab: the model's.
std::string ValidateKvStep(const KvPool& pool, size_t vocab, const KvStep& step);
// The same for any pool of block_size positions and max_blocks blocks (the GPU's, ops/llm_gpu.h).
std::string ValidateKvStep(size_t block_size, size_t max_blocks, size_t vocab, const KvStep& step);

// Highest block id the step touches (tables up to the last written position, copies), or -1.
int64_t KvStepLastBlock(const KvPool& pool, const KvStep& step);
int64_t KvStepLastBlock(size_t block_size, const KvStep& step);
// The one step that a chain of `steps` decode steps of `step` amounts to (KvPool.stepChain): each
// sequence writing positions [start, start + steps), with placeholder ids for the tokens the chain
// chooses. Validating it and reserving its blocks covers the whole chain.
KvStep KvChainView(const KvStep& step, size_t steps);

// A chain of decode steps (KvPool.stepChain) on top of its first step (one decode token per
// sequence, every logits row wanted): how many steps, where the chosen ids go ([step][seq], step
// j's being the token after position start + j), and how they are chosen: the argmax, or with
// params ([seq][4] f64: temperature (<= 0: argmax), top-k, top-p, log(min-p) or -inf) the draw of
// lib/llm/sampling.ts's Sampler from the xoshiro128** states rng ([seq][4], not modified), rng_out
// ([step][seq][4]) receiving each state after that step's draw. All host memory.
struct KvChain {
  size_t steps = 1;
  int32_t* chosen = nullptr;
  const double* params = nullptr;
  const uint32_t* rng = nullptr;
  uint32_t* rng_out = nullptr;
};

}  // namespace sonde
