#include "ops/kv_pool.h"

#include <algorithm>
#include <cstdlib>
#include <new>

#include "ops/llm.h"

namespace sonde {

namespace {

// Chunks of whole blocks up to this many bytes (one block when a block is larger): a pool of small
// blocks (a test model's few KiB) grows in few allocations, while a real model's blocks (hundreds
// of KiB) come a few per chunk, so the memory held tracks the highest block used closely.
constexpr size_t kChunkBytes = size_t{2} << 20;

}  // namespace

KvCacheShape KvCacheShapeOf(const LlmConfig& c) {
  KvCacheShape s;
  if (c.kv_lora > 0) {
    s.streams = 1;
    s.row_width = c.kv_lora + c.rope_dim;
    s.kv_heads = 1;
    s.values_in_keys = true;
  } else {
    s.streams = 2 * c.kv_heads;
    s.row_width = c.head_dim;
    s.kv_heads = c.kv_heads;
  }
  return s;
}

KvPool::KvPool(const LlmConfig& c, size_t block_size, size_t max_blocks, KvDtype dtype)
    : block_size_(block_size), max_blocks_(max_blocks), shape_(KvCacheShapeOf(c)), dtype_(dtype) {
  stream_bytes_ = block_size * shape_.row_width * elem_bytes();
  block_bytes_ = c.layers * shape_.streams * stream_bytes_;
  chunk_blocks_ = std::max<size_t>(1, std::min(max_blocks, kChunkBytes / block_bytes_));
  chunks_.assign((max_blocks + chunk_blocks_ - 1) / chunk_blocks_, nullptr);
  expert_counts_.assign(c.layers * c.experts, 0);
}

KvPool::~KvPool() {
  for (uint8_t* p : chunks_) std::free(p);
}

namespace {

template <typename T>
size_t Held(const std::vector<T>& v) { return v.capacity() * sizeof(T); }

size_t Held(const QuantMatmulScratch& s) { return Held(s.q) + Held(s.d) + Held(s.sums) + Held(s.corr); }

template <typename... V>
size_t HeldAll(const V&... v) { return (Held(v) + ... + 0); }

}  // namespace

size_t LlmArena::Bytes() const {
  size_t b = HeldAll(x, xn, q, k, v, att, gate, up, moe_out, q_lora, q_abs, latent, mla_c, mla_kv, mla_acc, rope, row_pos,
                     row_seq, qscratch);
  for (const QuantMatmulScratch& s : head_scratch) b += Held(s);
  b += HeldAll(moe.ids, moe.weights, moe.logits, moe.scores, moe.keys, moe.routed, moe.rows, moe.offset, moe.fill,
               moe.wide, moe.narrow, moe.row_of, moe.xg, moe.hg, moe.hu, moe.yo, moe.h, moe.out, moe.so, moe.sg,
               moe.su, moe.sgate, moe.pieces, moe.ok, moe.h_acts, moe.shared_h_acts, moe.acts);
  for (const QuantMatmulScratch& s : moe.x_acts) b += Held(s);
  for (const QuantMatmulScratch& s : moe.expert_acts) b += Held(s);
  return b;
}

size_t KvPool::Reserve(size_t last) {
  if (last >= max_blocks_) last = max_blocks_ - 1;
  size_t added = 0;
  while (allocated_ <= last) {
    const size_t chunk = allocated_ / chunk_blocks_;
    const size_t blocks = std::min(chunk_blocks_, max_blocks_ - chunk * chunk_blocks_);
    // calloc: fresh pages come zeroed from the OS without being touched, and a block read before
    // it was written (readBlocks of a new id) gives zeros, not another allocation's bytes.
    uint8_t* p = static_cast<uint8_t*>(std::calloc(blocks, block_bytes_));
    if (!p) throw std::bad_alloc();
    chunks_[chunk] = p;
    allocated_ += blocks;
    bytes_ += blocks * block_bytes_;
    added += blocks * block_bytes_;
  }
  high_water_ = std::max(high_water_, bytes_);
  return added;
}

std::string ValidateKvStep(const KvPool& pool, size_t vocab, const KvStep& step) {
  return ValidateKvStep(pool.block_size(), pool.max_blocks(), vocab, step);
}

std::string ValidateKvStep(size_t bs, size_t max, size_t vocab, const KvStep& step) {
  size_t row = 0;
  for (size_t s = 0; s < step.seqs.size(); ++s) {
    const KvStepSequence& q = step.seqs[s];
    const std::string at = "sequences[" + std::to_string(s) + "]";
    if (q.tokens == 0) return at + ".tokens must not be empty";
    if (q.row0 != row || q.table_offset + q.table_length > step.tables.size() || row + q.tokens > step.tokens.size())
      return at + ": inconsistent step layout";
    for (size_t i = 0; i < q.table_length; ++i) {
      const int32_t b = step.tables[q.table_offset + i];
      if (b < 0 || static_cast<size_t>(b) >= max)
        return at + ".blockTable[" + std::to_string(i) + "]: block id " + std::to_string(b) + " is outside [0, " +
               std::to_string(max) + ")";
    }
    if (q.start + q.tokens > q.table_length * bs)
      return at + ".blockTable: " + std::to_string(q.table_length) + " blocks of " + std::to_string(bs) +
             " positions do not cover start + tokens.length = " + std::to_string(q.start + q.tokens);
    if (q.start + q.tokens > kKvMaxPositions)
      return at + ": positions up to " + std::to_string(q.start + q.tokens) + " exceed " + std::to_string(kKvMaxPositions);
    for (size_t i = 0; i < q.tokens; ++i) {
      const int32_t t = step.tokens[row + i];
      if (t < 0 || static_cast<size_t>(t) >= vocab)
        return at + ".tokens[" + std::to_string(i) + "]: token id " + std::to_string(t) +
               " is outside the vocabulary [0, " + std::to_string(vocab) + ")";
    }
    row += q.tokens;
  }
  if (row != step.tokens.size()) return "step: token count does not match the sequences";
  // A block this step writes must be used by no other table entry of the step: two writers, or a
  // writer and a reader, of one block on different threads would race (copy-on-write is the
  // caller's job; this keeps a mistake in it from becoming a data race). Written entries are few (a
  // block or two per sequence): sorted, then every read entry is looked up among them.
  struct Use {
    int32_t block;
    uint32_t seq, entry;
    bool operator<(const Use& o) const { return block < o.block; }
  };
  auto conflict = [](const Use& w, const Use& o) {
    return "sequences[" + std::to_string(w.seq) + "].blockTable[" + std::to_string(w.entry) + "]: block " +
           std::to_string(w.block) + " is written by this step and also used at sequences[" + std::to_string(o.seq) +
           "].blockTable[" + std::to_string(o.entry) + "] (copy it first)";
  };
  std::vector<Use> written;
  for (size_t s = 0; s < step.seqs.size(); ++s) {
    const KvStepSequence& q = step.seqs[s];
    for (size_t i = q.start / bs; i < (q.start + q.tokens + bs - 1) / bs; ++i)
      written.push_back({step.tables[q.table_offset + i], static_cast<uint32_t>(s), static_cast<uint32_t>(i)});
  }
  std::stable_sort(written.begin(), written.end());
  for (size_t i = 1; i < written.size(); ++i)
    if (written[i - 1].block == written[i].block) return conflict(written[i - 1], written[i]);
  for (size_t s = 0; s < step.seqs.size() && !written.empty(); ++s) {
    const KvStepSequence& q = step.seqs[s];
    for (size_t i = 0; i < q.start / bs; ++i) {
      const Use read{step.tables[q.table_offset + i], static_cast<uint32_t>(s), static_cast<uint32_t>(i)};
      auto w = std::lower_bound(written.begin(), written.end(), read);
      if (w != written.end() && w->block == read.block) return conflict(*w, read);
    }
  }
  if (step.copies.size() % 2) return "copies must hold [src, dst] pairs";
  for (size_t i = 0; i < step.copies.size(); ++i) {
    const int32_t b = step.copies[i];
    if (b < 0 || static_cast<size_t>(b) >= max)
      return "copies[" + std::to_string(i) + "]: block id " + std::to_string(b) + " is outside [0, " + std::to_string(max) + ")";
  }
  for (size_t i = 1; i < step.copies.size(); i += 2)
    for (size_t j = 0; j < step.copies.size(); ++j)
      if (j != i && step.copies[j] == step.copies[i])
        return "copies[" + std::to_string(i) + "]: destination block " + std::to_string(step.copies[i]) +
               (j % 2 ? " is the destination of another copy" : " is also a copy source");
  for (uint32_t r : step.out_rows)
    if (r >= step.tokens.size()) return "step: logits row out of range";
  return {};
}

int64_t KvStepLastBlock(const KvPool& pool, const KvStep& step) { return KvStepLastBlock(pool.block_size(), step); }

KvStep KvChainView(const KvStep& step, size_t steps) {
  KvStep whole = step;
  whole.tokens.clear();
  whole.out_rows.clear();
  size_t row = 0;
  for (KvStepSequence& q : whole.seqs) {
    whole.tokens.insert(whole.tokens.end(), step.tokens.begin() + static_cast<std::ptrdiff_t>(q.row0),
                        step.tokens.begin() + static_cast<std::ptrdiff_t>(q.row0 + q.tokens));
    whole.tokens.resize(whole.tokens.size() + steps - 1, 0);
    q.row0 = row;
    q.tokens += steps - 1;
    row += q.tokens;
  }
  return whole;
}

int64_t KvStepLastBlock(size_t bs, const KvStep& step) {
  int64_t last = -1;
  for (const KvStepSequence& q : step.seqs) {
    const size_t used = std::min(q.table_length, (q.start + q.tokens + bs - 1) / bs);
    for (size_t i = 0; i < used; ++i) last = std::max<int64_t>(last, step.tables[q.table_offset + i]);
  }
  for (int32_t b : step.copies) last = std::max<int64_t>(last, b);
  return last;
}

}  // namespace sonde
