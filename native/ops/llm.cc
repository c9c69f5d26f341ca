#include "ops/llm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include <chrono>
#include <cstdio>

#include <sys/mman.h>
#include <unistd.h>

#include "kernels/attention/attention.h"
#include "kernels/gemm/lowp-gemm.h"
#include "kernels/norm/norm.h"
#include "ops/kv_pool.h"
#include "ops/step_profile.h"
#include "runtime/cpu.h"

namespace sonde {

namespace {

std::string Dims(const GgufTensorInfo& t) {
  std::string s = "[";
  for (uint32_t i = 0; i < t.n_dims; ++i) s += (i ? ", " : "") + std::to_string(t.dims[i]);
  return s + "]";
}

// Checks tensor `slot` of the index table and returns it, or null with *error set. want: GGUF dims.
const GgufTensorInfo* Find(const GgufFile& f, int32_t index, const std::string& what, std::vector<uint64_t> want,
                           std::string* error) {
  if (index < 0 || static_cast<size_t>(index) >= f.tensors().size()) {
    *error = "tensor '" + what + "' is missing";
    return nullptr;
  }
  const GgufTensorInfo& t = f.tensors()[index];
  bool same = t.n_dims >= want.size();
  for (size_t i = 0; same && i < 4; ++i) same = t.dims[i] == (i < want.size() ? want[i] : 1);
  if (!same) {
    std::string w = "[";
    for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
    *error = "tensor '" + t.name + "' has shape " + Dims(t) + ", expected " + w + "]";
    return nullptr;
  }
  return &t;
}

bool Matrix(const GgufFile& f, int32_t index, const std::string& what, uint64_t k, uint64_t n, uint64_t experts,
            QuantVariant variant, LlmMatrix* m, std::string* error) {
  std::vector<uint64_t> want{k, n};
  if (experts) want.push_back(experts);
  const GgufTensorInfo* t = Find(f, index, what, want, error);
  if (!t) return false;
  int32_t type;
  if (!QuantTypeFromGgml(t->type, &type)) {
    *error = "tensor '" + t->name + "' is of type " + GgmlTypeInfo(t->type)->name +
             "; sonde reads f32, f16, bf16, q8_0 and q4_0";
    return false;
  }
  if ((type == kernels::kQuantQ8_0 || type == kernels::kQuantQ4_0) && k % kernels::kQuantBlock != 0) {
    *error = "tensor '" + t->name + "' of type " + QuantTypeName(type) + " needs ne0 to be a multiple of 32";
    return false;
  }
  m->data = f.TensorData(static_cast<size_t>(index));
  m->type = type;
  m->variant = ResolveQuantVariant(type, variant);
  m->k = k;
  m->n = n * (experts ? experts : 1);
  m->row_bytes = kernels::QuantRowBytes(type, k);
  return true;
}

bool Vector(const GgufFile& f, int32_t index, const std::string& what, uint64_t n, const float** out,
            std::string* error) {
  const GgufTensorInfo* t = Find(f, index, what, {n}, error);
  if (!t) return false;
  if (t->type != kGgmlF32) {
    *error = "tensor '" + t->name + "' is of type " + GgmlTypeInfo(t->type)->name + "; norm weights and biases must be f32";
    return false;
  }
  // The data section is aligned to at least 8 bytes (general.alignment is a power of two >= 8 in
  // every writer), but a float read must not assume it: copy-free reads need 4-byte alignment.
  const uint8_t* p = f.TensorData(static_cast<size_t>(index));
  if (reinterpret_cast<uintptr_t>(p) % alignof(float) != 0) {
    *error = "tensor '" + t->name + "' is not 4-byte aligned in the file";
    return false;
  }
  *out = reinterpret_cast<const float*>(p);
  return true;
}

// An f32 matrix of n rows of k owned by the model.
LlmMatrix F32Matrix(const float* data, size_t k, size_t n, QuantVariant variant) {
  LlmMatrix w;
  w.data = reinterpret_cast<const uint8_t*>(data);
  w.type = kernels::kQuantF32;
  w.variant = ResolveQuantVariant(kernels::kQuantF32, variant);
  w.k = k;
  w.n = n;
  w.row_bytes = kernels::QuantRowBytes(kernels::kQuantF32, k);
  return w;
}

kernels::AttentionSpanUkernel AttentionKernel(QuantVariant v) {
#if defined(__x86_64__) || defined(_M_X64)
  if (v == QuantVariant::kAuto) {
    if (Cpu().Supports(IsaLevel::kAvx512)) return kernels::AttentionUkernelsAvx512().span;
    if (Cpu().Supports(IsaLevel::kAvx2)) return kernels::AttentionUkernelsAvx2().span;
  }
  if (v == QuantVariant::kAvx512 || v == QuantVariant::kAvx512Vnni) return kernels::AttentionUkernelsAvx512().span;
  if (v == QuantVariant::kAvx2) return kernels::AttentionUkernelsAvx2().span;
#endif
  return kernels::AttentionUkernelsScalar().span;
}

kernels::AttentionSpanF16Ukernel AttentionF16Kernel(QuantVariant v) {
#if defined(__x86_64__) || defined(_M_X64)
  if (v == QuantVariant::kAuto) {
    if (Cpu().Supports(IsaLevel::kAvx512)) return kernels::AttentionF16UkernelsAvx512().span;
    if (Cpu().Supports(IsaLevel::kAvx2)) return kernels::AttentionF16UkernelsAvx2().span;
  }
  if (v == QuantVariant::kAvx512 || v == QuantVariant::kAvx512Vnni) return kernels::AttentionF16UkernelsAvx512().span;
  if (v == QuantVariant::kAvx2) return kernels::AttentionF16UkernelsAvx2().span;
#endif
  return kernels::AttentionF16UkernelsScalar().span;
}

}  // namespace

std::shared_ptr<const LlmModel> LlmModel::Create(std::shared_ptr<const GgufFile> file, const LlmConfig& c,
                                                 const std::vector<int32_t>& idx, std::string* error,
                                                 bool* unsupported) {
  *unsupported = false;
  if (c.embd == 0 || c.layers == 0 || c.heads == 0 || c.kv_heads == 0 || c.head_dim == 0 || c.vocab == 0 ||
      c.heads % c.kv_heads != 0 || c.ff == 0) {
    *error = "inconsistent model configuration (a zero size, or head_count not a multiple of head_count_kv)";
    return nullptr;
  }
  if (c.head_dim % 2 != 0 || c.head_dim > 1024) {
    *error = "head dimension " + std::to_string(c.head_dim) + " is not even or above 1024";
    return nullptr;
  }
  if (idx.size() != kLlmGlobalSlots + c.layers * kLlmLayerSlots) {
    *error = "tensor index table has " + std::to_string(idx.size()) + " entries, expected " +
             std::to_string(kLlmGlobalSlots + c.layers * kLlmLayerSlots);
    return nullptr;
  }
  const bool moe = c.experts > 0;
  if (moe && (c.experts_used == 0 || c.experts_used > c.experts || c.expert_ff == 0)) {
    *error = "inconsistent expert configuration";
    return nullptr;
  }
  std::shared_ptr<LlmModel> m(new LlmModel());
  m->file_ = file;
  m->cfg_ = c;
  if (const char* e = std::getenv("SONDE_Q8_REPACK"); e && std::strcmp(e, "0") == 0) m->repack_q8_ = false;
  m->attend_ = AttentionKernel(c.variant);
  m->attend_f16_ = AttentionF16Kernel(c.variant);
  const GgufFile& f = *file;
  const size_t d = c.embd, qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim;
  if (!Matrix(f, idx[kSlotTokenEmbd], "token_embd.weight", d, c.vocab, 0, c.variant, &m->embd_, error)) return nullptr;
  if (!Vector(f, idx[kSlotOutputNorm], "output_norm.weight", d, &m->output_norm_, error)) return nullptr;
  if (idx[kSlotOutput] < 0) m->output_ = m->embd_;  // tied embeddings
  else if (!Matrix(f, idx[kSlotOutput], "output.weight", d, c.vocab, 0, c.variant, &m->output_, error)) return nullptr;
  m->layers_.resize(c.layers);
  const bool mla = c.kv_lora > 0;
  if (mla) {
    if (c.arch != LlmArch::kDeepseek2 || c.rope_dim == 0 || c.rope_dim % 2 != 0 || c.k_nope == 0 || c.v_dim == 0 ||
        c.kv_heads != 1 || c.head_dim != c.kv_lora + c.rope_dim || !(c.kq_scale > 0)) {
      *error = "inconsistent multi-head latent attention configuration (kv_lora_rank " + std::to_string(c.kv_lora) +
               ", rope dims " + std::to_string(c.rope_dim) + ", key/value head sizes " + std::to_string(c.k_nope + c.rope_dim) +
               "/" + std::to_string(c.v_dim) + ")";
      return nullptr;
    }
    // SONDE_MLA_PREFILL pins one form for steps with prompt chunks (read at load, so that a
    // benchmark or a test can load the same file both ways in one process); decode steps attend
    // absorbed regardless.
    if (const char* e = std::getenv("SONDE_MLA_PREFILL"); e && *e) {
      if (std::strcmp(e, "absorbed") == 0) m->mla_form_ = MlaForm::kAbsorbed;
      else if (std::strcmp(e, "decompressed") == 0) m->mla_form_ = MlaForm::kDecompressed;
    }
    // Room for the transposed key halves of attn_kv_b or attn_k_b tensors (whichever orientation
    // the file lacks), sized once: views into it must not move.
    for (size_t l = 0; l < c.layers; ++l) {
      if (idx[kLlmGlobalSlots + l * kLlmLayerSlots + kSlotKB] < 0) {
        if (m->owned_.empty()) m->owned_.resize(c.layers * c.heads * c.kv_lora * c.k_nope);
      } else if (m->mla_form_ != MlaForm::kAbsorbed && m->owned_wk_.empty()) {
        m->owned_wk_.resize(c.layers * c.heads * c.kv_lora * c.k_nope);
      }
    }
  } else if (c.arch == LlmArch::kDeepseek2) {
    *error = "a deepseek2 model needs attention.kv_lora_rank > 0";
    return nullptr;
  }
  for (size_t l = 0; l < c.layers; ++l) {
    const int32_t* s = idx.data() + kLlmGlobalSlots + l * kLlmLayerSlots;
    const std::string b = "blk." + std::to_string(l) + ".";
    LlmLayer& L = m->layers_[l];
    if (mla) {
      const size_t h = c.heads, qk = c.k_nope + c.rope_dim, r = c.kv_lora;
      if (!Vector(f, s[kSlotAttnNorm], b + "attn_norm.weight", d, &L.attn_norm, error) ||
          !Matrix(f, s[kSlotKvAMqa], b + "attn_kv_a_mqa.weight", d, r + c.rope_dim, 0, c.variant, &L.kv_a, error) ||
          !Vector(f, s[kSlotKvANorm], b + "attn_kv_a_norm.weight", r, &L.kv_a_norm, error) ||
          !Matrix(f, s[kSlotO], b + "attn_output.weight", h * c.v_dim, d, 0, c.variant, &L.o, error) ||
          !Vector(f, s[kSlotFfnNorm], b + "ffn_norm.weight", d, &L.ffn_norm, error))
        return nullptr;
      if (c.q_lora > 0) {
        if (!Matrix(f, s[kSlotQA], b + "attn_q_a.weight", d, c.q_lora, 0, c.variant, &L.q_a, error) ||
            !Vector(f, s[kSlotQANorm], b + "attn_q_a_norm.weight", c.q_lora, &L.q_a_norm, error) ||
            !Matrix(f, s[kSlotQB], b + "attn_q_b.weight", c.q_lora, h * qk, 0, c.variant, &L.q_b, error))
          return nullptr;
      } else if (!Matrix(f, s[kSlotQ], b + "attn_q.weight", d, h * qk, 0, c.variant, &L.q, error)) {
        return nullptr;
      }
      auto view = [](const LlmMatrix& w, size_t row0, size_t rows) {
        LlmMatrix v = w;
        v.data = w.data + row0 * w.row_bytes;
        v.n = rows;
        return v;
      };
      L.uk.resize(h);
      L.uv.resize(h);
      if (s[kSlotKB] >= 0 || s[kSlotVB] >= 0) {
        LlmMatrix kb, vb;
        if (!Matrix(f, s[kSlotKB], b + "attn_k_b.weight", c.k_nope, r, h, c.variant, &kb, error) ||
            !Matrix(f, s[kSlotVB], b + "attn_v_b.weight", r, c.v_dim, h, c.variant, &vb, error))
          return nullptr;
        for (size_t i = 0; i < h; ++i) {
          L.uk[i] = view(kb, i * r, r);
          L.uv[i] = view(vb, i * c.v_dim, c.v_dim);
        }
        if (m->mla_form_ != MlaForm::kAbsorbed) {
          // attn_k_b holds head i as r rows of k_nope (the absorbed orientation); decompression
          // multiplies latents by its transpose, kept in f32 (exact for every weight type).
          float* own = m->owned_wk_.data() + l * h * r * c.k_nope;
          std::vector<float> row(c.k_nope);
          L.wk.resize(h);
          for (size_t i = 0; i < h; ++i) {
            for (size_t t = 0; t < r; ++t) {
              kernels::DequantizeRow(kb.type, kb.data + (i * r + t) * kb.row_bytes, c.k_nope, row.data());
              for (size_t j = 0; j < c.k_nope; ++j) own[(i * c.k_nope + j) * r + t] = row[j];
            }
            L.wk[i] = F32Matrix(own + i * c.k_nope * r, r, c.k_nope, c.variant);
          }
        }
      } else {
        LlmMatrix kvb;
        const size_t per = c.k_nope + c.v_dim;
        if (!Matrix(f, s[kSlotKvB], b + "attn_kv_b.weight", r, h * per, 0, c.variant, &kvb, error)) return nullptr;
        // Head i's key rows are k_nope rows of r; the absorbed form multiplies q_nope by their
        // transpose, so they are stored transposed (r rows of k_nope) in f32.
        float* own = m->owned_.data() + l * h * r * c.k_nope;
        std::vector<float> row(r);
        for (size_t i = 0; i < h; ++i) {
          for (size_t j = 0; j < c.k_nope; ++j) {
            kernels::DequantizeRow(kvb.type, kvb.data + (i * per + j) * kvb.row_bytes, r, row.data());
            for (size_t t = 0; t < r; ++t) own[(i * r + t) * c.k_nope + j] = row[t];
          }
          L.uk[i] = F32Matrix(own + i * r * c.k_nope, c.k_nope, r, c.variant);
          L.uv[i] = view(kvb, i * per + c.k_nope, c.v_dim);
        }
        // The file's key rows (k_nope of r per head) are the decompression orientation already.
        if (m->mla_form_ != MlaForm::kAbsorbed) {
          L.wk.resize(h);
          for (size_t i = 0; i < h; ++i) L.wk[i] = view(kvb, i * per, c.k_nope);
        }
      }
    } else {
      if (!Vector(f, s[kSlotAttnNorm], b + "attn_norm.weight", d, &L.attn_norm, error) ||
          !Matrix(f, s[kSlotQ], b + "attn_q.weight", d, qd, 0, c.variant, &L.q, error) ||
          !Matrix(f, s[kSlotK], b + "attn_k.weight", d, kvd, 0, c.variant, &L.k, error) ||
          !Matrix(f, s[kSlotV], b + "attn_v.weight", d, kvd, 0, c.variant, &L.v, error) ||
          !Matrix(f, s[kSlotO], b + "attn_output.weight", qd, d, 0, c.variant, &L.o, error) ||
          !Vector(f, s[kSlotFfnNorm], b + "ffn_norm.weight", d, &L.ffn_norm, error))
        return nullptr;
      if (s[kSlotQBias] >= 0 && !Vector(f, s[kSlotQBias], b + "attn_q.bias", qd, &L.q_bias, error)) return nullptr;
      if (s[kSlotKBias] >= 0 && !Vector(f, s[kSlotKBias], b + "attn_k.bias", kvd, &L.k_bias, error)) return nullptr;
      if (s[kSlotVBias] >= 0 && !Vector(f, s[kSlotVBias], b + "attn_v.bias", kvd, &L.v_bias, error)) return nullptr;
    }
    L.moe_ffn = moe && l >= c.dense_lead;
    if (!L.moe_ffn) {
      if (!Matrix(f, s[kSlotGate], b + "ffn_gate.weight", d, c.ff, 0, c.variant, &L.gate, error) ||
          !Matrix(f, s[kSlotUp], b + "ffn_up.weight", d, c.ff, 0, c.variant, &L.up, error) ||
          !Matrix(f, s[kSlotDown], b + "ffn_down.weight", c.ff, d, 0, c.variant, &L.down, error))
        return nullptr;
      continue;
    }
    const size_t e = c.experts, eff = c.expert_ff;
    if (!Matrix(f, s[kSlotGateInp], b + "ffn_gate_inp.weight", d, e, 0, c.variant, &L.gate_inp, error) ||
        !Matrix(f, s[kSlotGateExps], b + "ffn_gate_exps.weight", d, eff, e, c.variant, &L.gate_exps, error) ||
        !Matrix(f, s[kSlotUpExps], b + "ffn_up_exps.weight", d, eff, e, c.variant, &L.up_exps, error) ||
        !Matrix(f, s[kSlotDownExps], b + "ffn_down_exps.weight", eff, d, e, c.variant, &L.down_exps, error))
      return nullptr;
    if (s[kSlotExpProbsB] >= 0 && !Vector(f, s[kSlotExpProbsB], b + "exp_probs_b.bias", e, &L.exp_probs_b, error))
      return nullptr;
    if (c.shared_ff) {
      // deepseek2's shared experts are ungated; qwen2moe's has a sigmoid gate.
      if ((c.arch != LlmArch::kDeepseek2 &&
           !Vector(f, s[kSlotGateInpShexp], b + "ffn_gate_inp_shexp.weight", d, &L.gate_inp_shexp, error)) ||
          !Matrix(f, s[kSlotGateShexp], b + "ffn_gate_shexp.weight", d, c.shared_ff, 0, c.variant, &L.gate_shexp, error) ||
          !Matrix(f, s[kSlotUpShexp], b + "ffn_up_shexp.weight", d, c.shared_ff, 0, c.variant, &L.up_shexp, error) ||
          !Matrix(f, s[kSlotDownShexp], b + "ffn_down_shexp.weight", c.shared_ff, d, 0, c.variant, &L.down_shexp, error))
        return nullptr;
    }
    MoeLayer& M = L.moe;
    M.d_model = d;
    M.d_ff = eff;
    M.n_experts = e;
    M.k = c.experts_used;
    M.router = {L.gate_inp.data, L.gate_inp.type};
    M.gate = {L.gate_exps.data, L.gate_exps.type, L.gate_exps.row_bytes * eff};
    M.up = {L.up_exps.data, L.up_exps.type, L.up_exps.row_bytes * eff};
    M.down = {L.down_exps.data, L.down_exps.type, L.down_exps.row_bytes * d};
    M.scoring = c.gating;
    // llama.cpp's build_moe_ffn: Mixtral renormalises the k weights, qwen2moe does not, deepseek2
    // as its expert_weights_norm says.
    M.renormalize = c.arch == LlmArch::kLlama || (c.arch == LlmArch::kDeepseek2 && c.weights_norm);
    M.weight_scale = c.weights_scale;
    M.selection_bias = L.exp_probs_b;
    M.groups = c.expert_groups;
    M.groups_used = c.expert_groups_used;
    if (c.shared_ff) {
      M.shared_d_ff = c.shared_ff;
      M.shared_gate = {L.gate_shexp.data, L.gate_shexp.type};
      M.shared_up = {L.up_shexp.data, L.up_shexp.type};
      M.shared_down = {L.down_shexp.data, L.down_shexp.type};
      if (L.gate_inp_shexp) M.shared_gate_inp = {reinterpret_cast<const uint8_t*>(L.gate_inp_shexp), kernels::kQuantF32};
    }
    M.variant = c.variant;
    const std::string why = ValidateMoeLayer(M);
    if (!why.empty()) {
      *error = b + "ffn: " + why;
      return nullptr;
    }
  }
  return m;
}

LlmModel::~LlmModel() {
  if (repacked_) munmap(repacked_, repacked_map_bytes_);
}

void LlmModel::Prepare(ThreadPool& pool, unsigned threads) const {
  // The model is immutable to every reader: they all pass here first, and call_once orders the
  // repack's writes before any of their reads.
  std::call_once(prepared_, [&] { const_cast<LlmModel*>(this)->RepackQ8(pool, threads); });
}

void LlmModel::RepackQ8(ThreadPool& pool, unsigned threads) {
  if (!repack_q8_) return;
  struct Item {
    LlmMatrix* w;
    size_t offset;
  };
  std::vector<Item> items;
  size_t total = 0;
  // rows_per: the rows of one matrix of a stack, whose every expert must start on a group of 32.
  auto want = [&](LlmMatrix& w, size_t rows_per) {
    if (!w.data || w.type != kernels::kQuantQ8_0 || w.variant != QuantVariant::kAvx512Vnni) return;
    if (rows_per != w.n && rows_per % kernels::kQ8_0x32Rows != 0) return;
    items.push_back({&w, total});
    total += kernels::QuantQ8_0x32Bytes(w.n, w.k);
  };
  const LlmConfig& c = cfg_;
  for (LlmLayer& L : layers_) {
    // Not the MLA up-projections (per-head views whose rows need not fall on groups).
    for (LlmMatrix* w : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down, &L.q_a, &L.q_b, &L.kv_a, &L.gate_shexp,
                         &L.up_shexp, &L.down_shexp})
      want(*w, w->n);
    want(L.gate_exps, c.expert_ff);
    want(L.up_exps, c.expert_ff);
    want(L.down_exps, c.embd);
  }
  // Tied embeddings: the output product gets the copy, the embedding lookup keeps the rows.
  want(output_, output_.n);
  if (items.empty()) return;
  const size_t huge = 2u << 20;
  const size_t map_bytes = (total + huge - 1) / huge * huge;
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0 = Clock::now();
  void* p = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
#ifdef MADV_HUGEPAGE
  madvise(p, map_bytes, MADV_HUGEPAGE);
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  // The pages up front, in parallel slices: a VM backs fresh guest memory slowly (first touch of
  // never-used pages ran at 0.1-0.4 GB/s here), and the faults of several threads overlap.
  const size_t slice = 16 * huge, slices = (map_bytes + slice - 1) / slice;
  pool.ParallelFor(slices, threads, [&](size_t i) {
    madvise(static_cast<uint8_t*>(p) + i * slice, std::min(slice, map_bytes - i * slice), MADV_POPULATE_WRITE);
  });
  const Clock::time_point t1 = Clock::now();
  uint8_t* base = static_cast<uint8_t*>(p);
  // Tasks of about 1 MiB of source over all the matrices: few hand-offs, each task's source one
  // run read with pread into the thread's staging buffer (GgufFile::ReadAt: several times faster
  // than faulting the mapped pages in on this kind of VM), its destination in the task's own groups.
  struct Task {
    size_t item, g0, g1;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < items.size(); ++i) {
    const LlmMatrix& w = *items[i].w;
    const size_t groups = (w.n + kernels::kQ8_0x32Rows - 1) / kernels::kQ8_0x32Rows;
    const size_t per = std::max<size_t>(1, (1u << 20) / (kernels::kQ8_0x32Rows * w.row_bytes));
    for (size_t g = 0; g < groups; g += per) tasks.push_back({i, g, std::min(groups, g + per)});
  }
  const GgufFile& f = *file_;
  const bool done = pool.ParallelFor(tasks.size(), threads, [&](size_t t) {
    thread_local std::vector<uint8_t> staging;
    const Task& task = tasks[t];
    const LlmMatrix& w = *items[task.item].w;
    const size_t rb = w.row_bytes, r0 = task.g0 * kernels::kQ8_0x32Rows;
    const size_t rows = std::min(w.n, task.g1 * kernels::kQ8_0x32Rows) - r0;
    const uint8_t* src = w.data + r0 * rb;
    try {
      if (staging.size() < rows * rb) staging.resize(rows * rb);
      if (f.ReadAt(static_cast<uint64_t>(src - f.bytes()), rows * rb, staging.data())) src = staging.data();
    } catch (const std::bad_alloc&) {
      // Read through the mapping instead.
    }
    uint8_t* dst = base + items[task.item].offset + r0 * rb;
    for (size_t r = 0; r < rows; r += kernels::kQ8_0x32Rows)
      kernels::RepackQ8_0x32Group(std::min(kernels::kQ8_0x32Rows, rows - r), w.k, src + r * rb, rb, dst + r * rb);
  });
  if (!done) {
    // The pool stopped (its environment is going away) before every group was written: keep the
    // file's rows.
    munmap(p, map_bytes);
    return;
  }
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (const Item& it : items) {
    LlmMatrix& w = *it.w;
    // The file's pages of this matrix leave the process if a failed read made the repack fault
    // them in (the page cache keeps them; whatever still reads them, such as tied embeddings,
    // faults them back).
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(w.data) + page - 1) & ~(page - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(w.data) + w.n * w.row_bytes) & ~(page - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
    w.data = base + it.offset;
    w.type = kernels::kQuantQ8_0x32;
  }
  for (LlmLayer& L : layers_) {
    if (!L.moe_ffn) continue;
    MoeLayer& M = L.moe;
    M.gate.data = L.gate_exps.data;
    M.gate.type = L.gate_exps.type;
    M.up.data = L.up_exps.data;
    M.up.type = L.up_exps.type;
    M.down.data = L.down_exps.data;
    M.down.type = L.down_exps.type;
    if (M.shared_d_ff) {
      M.shared_gate = {L.gate_shexp.data, L.gate_shexp.type};
      M.shared_up = {L.up_shexp.data, L.up_shexp.type};
      M.shared_down = {L.down_shexp.data, L.down_shexp.type};
    }
  }
  repacked_ = p;
  repacked_map_bytes_ = map_bytes;
  repacked_bytes_ = map_bytes;
  if (const char* e = std::getenv("SONDE_LLM_PROFILE"); e && *e && std::strcmp(e, "0") != 0) {
    const auto ms = [](Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
    std::fprintf(stderr, "q8_0 repack: %zu matrices, %.1f MB; memory %.0f ms, repack %.0f ms\n", items.size(), total / 1e6,
                 ms(t1 - t0), ms(Clock::now() - t1));
  }
}

namespace {

// The product y rows (ldy apart) = x rows (ldx apart) . W^T as RunQuantMatmul takes it.
QuantMatmulArgs ArgsOf(const LlmMatrix& w, const float* x, size_t ldx, size_t m, float* y, size_t ldy) {
  QuantMatmulArgs a;
  a.x = x;
  a.m = m;
  a.k = w.k;
  a.ldx = ldx;
  a.w = w.data;
  a.n = w.n;
  a.type = w.type;
  a.y = y;
  a.ldy = ldy;
  return a;
}

void AddBias(const float* bias, size_t m, size_t n, float* y) {
  if (!bias) return;
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
}

// y[m x n] = x[m x k] . W^T (+ bias), on the pool.
bool MatMul(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const LlmMatrix& w, const float* x, size_t m,
            float* y, QuantMatmulScratch* scratch, const float* bias = nullptr) {
  if (!RunQuantMatmul(pool, threads, cancel, ArgsOf(w, x, w.k, m, y, w.n), w.variant, scratch)) return false;
  AddBias(bias, m, w.n, y);
  return true;
}

// y rows (ldy apart) = x rows (ldx apart) . W^T: one head's slice of a row-major batch.
bool MatMulRows(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const LlmMatrix& w, const float* x,
                size_t ldx, size_t m, float* y, size_t ldy, QuantMatmulScratch* scratch) {
  return RunQuantMatmul(pool, threads, cancel, ArgsOf(w, x, ldx, m, y, ldy), w.variant, scratch);
}

// y[i] = x . W[i]^T for up to 3 matrices over the same rows, in one pool hand-off where their
// variants agree (RunQuantMatmuls: the activations are quantised once), else one by one.
bool MatMuls(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t m,
             const LlmMatrix* const* w, float* const* y, size_t count, QuantMatmulScratch* scratch) {
  bool same = true;
  for (size_t i = 1; i < count; ++i) same = same && w[i]->variant == w[0]->variant && w[i]->k == w[0]->k;
  if (!same) {
    for (size_t i = 0; i < count; ++i)
      if (!MatMul(pool, threads, cancel, *w[i], x, m, y[i], scratch)) return false;
    return true;
  }
  QuantMatmulArgs a[3];
  for (size_t i = 0; i < count; ++i) a[i] = ArgsOf(*w[i], x, w[i]->k, m, y[i], w[i]->n);
  return RunQuantMatmuls(pool, threads, cancel, a, count, w[0]->variant, scratch);
}

// MLA's query (or q LoRA) and kv_a projections of the same normalised rows.
bool MatMulPair(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t m, const LlmMatrix& w0,
                float* y0, const LlmMatrix& w1, float* y1, QuantMatmulScratch* scratch) {
  const LlmMatrix* w[2] = {&w0, &w1};
  float* y[2] = {y0, y1};
  return MatMuls(pool, threads, cancel, x, m, w, y, 2, scratch);
}

// The q, k and v projections of xn (plus their biases, qwen2).
bool QkvMatMul(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const LlmLayer& L, const float* xn, size_t m,
               float* q, float* k, float* v, QuantMatmulScratch* scratch) {
  const LlmMatrix* w[3] = {&L.q, &L.k, &L.v};
  float* y[3] = {q, k, v};
  if (!MatMuls(pool, threads, cancel, xn, m, w, y, 3, scratch)) return false;
  AddBias(L.q_bias, m, L.q.n, q);
  AddBias(L.k_bias, m, L.k.n, k);
  AddBias(L.v_bias, m, L.v.n, v);
  return true;
}

// The FFN's gate and up products of xn.
bool GateUpMatMul(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const LlmLayer& L, const float* xn,
                  size_t m, float* gate, float* up, QuantMatmulScratch* scratch) {
  const LlmMatrix* w[2] = {&L.gate, &L.up};
  float* y[2] = {gate, up};
  return MatMuls(pool, threads, cancel, xn, m, w, y, 2, scratch);
}

template <typename T>
void Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// The arena's row count for a step of `rows`: the next power of two (see LlmArena).
size_t RowClass(size_t rows) {
  size_t c = 1;
  while (c < rows) c <<= 1;
  return c;
}

void StoreRow(const float* src, size_t n, KvDtype dtype, uint8_t* dst) {
  if (dtype == KvDtype::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  uint16_t* h = reinterpret_cast<uint16_t*>(dst);
  for (size_t j = 0; j < n; ++j) h[j] = kernels::LowpF32ToF16(src[j]);
}

}  // namespace

bool RunStep(const LlmModel& model, KvPool& kv, const KvStep& step, float* logits, ThreadPool& pool, unsigned threads,
             const CancelFlag* cancel) {
  model.Prepare(pool, threads);
  const size_t bs = kv.block_size(), eb = kv.elem_bytes();
  const KvDtype dtype = kv.dtype();
  // Copy-on-write first: a sequence may be about to write into a block's copy.
  if (!step.copies.empty() &&
      !pool.ParallelFor(step.copies.size() / 2, threads, [&](size_t i) {
        std::memcpy(kv.Block(static_cast<size_t>(step.copies[2 * i + 1])), kv.Block(static_cast<size_t>(step.copies[2 * i])),
                    kv.block_bytes());
      }, cancel))
    return false;
  const size_t n = step.tokens.size();
  if (n == 0) return true;
  const LlmConfig& c = model.cfg_;
  const bool mla = c.kv_lora > 0;
  const size_t d = c.embd, hd = c.head_dim, kvd = c.kv_heads * hd;
  // MLA: q holds per head k_nope + rope_dim, att per head v_dim; the cache row (hd) is the latent
  // plus the rope key part.
  const size_t qk = mla ? c.k_nope + c.rope_dim : hd;
  const size_t qd = c.heads * qk, ad = mla ? c.heads * c.v_dim : qd;
  const size_t group = c.heads / c.kv_heads;
  const float scale = mla ? c.kq_scale : 1.0f / std::sqrt(static_cast<float>(hd));
  const float freq_scale = 1.0f / c.rope_scale;
  const kernels::AttentionSpanUkernel attend = model.attend_;
  const kernels::AttentionSpanF16Ukernel attend_f16 = model.attend_f16_;

  LlmArena& a = kv.arena();
  if (a.rows < n) {
    const size_t r = RowClass(n);
    Grow(a.x, r * d);
    Grow(a.xn, r * d);
    Grow(a.q, r * qd);
    Grow(a.k, r * kvd);
    Grow(a.att, r * ad);
    if (mla) {
      Grow(a.q_lora, r * c.q_lora);
      Grow(a.q_abs, r * c.heads * hd);
      Grow(a.latent, r * c.heads * hd);
    } else {
      Grow(a.v, r * kvd);
    }
    if (!c.experts || c.dense_lead > 0) {
      Grow(a.gate, r * c.ff);
      Grow(a.up, r * c.ff);
    }
    if (c.experts) Grow(a.moe_out, r * d);
    Grow(a.row_pos, r);
    Grow(a.row_seq, r);
    if (!mla) Grow(a.rope, r * hd);
    a.rows = r;
  }
  for (size_t s = 0; s < step.seqs.size(); ++s) {
    const KvStepSequence& q = step.seqs[s];
    for (size_t i = 0; i < q.tokens; ++i) {
      a.row_pos[q.row0 + i] = static_cast<uint32_t>(q.start + i);
      a.row_seq[q.row0 + i] = static_cast<uint32_t>(s);
    }
  }
  float* x = a.x.data();
  float* xn = a.xn.data();
  float* q = a.q.data();
  float* k = a.k.data();
  float* v = a.v.data();
  float* att = a.att.data();
  float* gate = a.gate.data();
  float* up = a.up.data();
  const uint32_t* row_pos = a.row_pos.data();
  const uint32_t* row_seq = a.row_seq.data();
  QuantMatmulScratch* qs = &a.qscratch;
  // The block holding position p of sequence s.
  auto block_of = [&](size_t s, size_t p) {
    const KvStepSequence& sq = step.seqs[s];
    return kv.Block(static_cast<size_t>(step.tables[sq.table_offset + p / bs]));
  };

  struct ProfileScope {
    StepProfile* p;
    ~ProfileScope() { StepProfileEnd(p); }
  } prof{StepProfileBegin(n)};
  auto bytes = [](const LlmMatrix& w) { return static_cast<double>(w.row_bytes * w.n); };
  const LlmMatrix& E = model.embd_;
  for (size_t i = 0; i < n; ++i)
    kernels::DequantizeRow(E.type, E.data + static_cast<size_t>(step.tokens[i]) * E.row_bytes, d, x + i * d);
  StepProfileMark(prof.p, kPhaseEmbed);

  // Row-wise work (norms, RoPE, SwiGLU) is a few flops per weight byte of the products around it;
  // it runs on the pool only when there are rows enough to share. A single row (a decode step of one
  // sequence) calls fn directly, without wrapping it in the pool's std::function.
  // A batch of decode rows (8 streams: 8 x 512 floats a norm) is a few microseconds too, less than
  // handing half of it to a helper (48 such loops a step of the dense model, each waiting for its
  // helper: on a loaded machine for one that was descheduled), so rows share the pool only from
  // some 16k elements of the model's width per thread.
  auto rows = [&](size_t count, const auto& fn) {
    if (count == 1) {
      fn(0);
      return !(cancel && cancel->load());
    }
    const unsigned most = threads ? threads : pool.size();  // 0: the whole pool
    return pool.ParallelFor(count, ThreadsForWork(most, static_cast<double>(count * d), 16384.0), fn, cancel);
  };

  // Each row's RoPE angles, once for all its layers and heads.
  float* rope = a.rope.data();
  if (!mla && !rows(n, [&](size_t i) {
        kernels::RopeAngles(hd, static_cast<int64_t>(row_pos[i]), c.rope_base, freq_scale, rope + i * hd);
      }))
    return false;
  StepProfileMark(prof.p, kPhaseRope);

  // MLA's form for this step. Steps of one row per sequence (decode) attend absorbed, row by row,
  // with the span kernel. Steps with prompt chunks attend with products, in one of two forms:
  // absorbed (queries in latent space against the cached latents: (kv_lora + rope)-wide scores
  // and latent sums, every head against the same keys) or decompressed (the cached latents
  // up-projected to per-head keys and values: qk-wide scores and v_dim-wide sums, but every cached
  // position of the step's sequences up-projected, not just the new rows; the rows' own
  // up-projections cost the same in both). Decompressed pays on long chunks, absorbed on short
  // chunks after a long cached prefix (measured in the bench `llm` suite's mla prefill and ttft
  // cases); the products' multiply-adds decide.
  enum class MlaStepForm { kSpan, kAbsorbed, kDecompressed } mla_step = MlaStepForm::kSpan;
  if (mla && n > step.seqs.size()) {
    const double up = static_cast<double>(c.heads) * c.kv_lora * (c.k_nope + c.v_dim);
    double extra_positions = 0, pairs = 0;
    for (const KvStepSequence& sq : step.seqs) {
      extra_positions += static_cast<double>(sq.start);
      pairs += static_cast<double>(sq.tokens) * (2.0 * sq.start + sq.tokens + 1) / 2;
    }
    const double absorbed = pairs * c.heads * 2.0 * static_cast<double>(hd);
    const double decompressed = extra_positions * up + pairs * c.heads * static_cast<double>(qk + c.v_dim);
    const bool dec = model.mla_form_ == LlmModel::MlaForm::kDecompressed ||
                     (model.mla_form_ == LlmModel::MlaForm::kAuto && decompressed < absorbed);
    mla_step = dec ? MlaStepForm::kDecompressed : MlaStepForm::kAbsorbed;
  }
  const bool mla_decompress = mla_step == MlaStepForm::kDecompressed;
  // A decode step's per-head up-projections and span attention over a short context are well
  // under a millisecond of work (about 1 M multiply-adds), less than what handing half of it to a
  // helper thread costs on a busy machine: then the step's thread does them alone.
  unsigned span_threads = threads;
  if (mla && mla_step == MlaStepForm::kSpan) {
    double work = static_cast<double>(n) * c.heads * c.kv_lora * (c.k_nope + c.v_dim);
    for (size_t i = 0; i < n; ++i) work += (static_cast<double>(a.row_pos[i]) + 1) * c.heads * 2.0 * hd;
    if (work < 1e6) span_threads = 1;
  }

  // Multi-head latent attention of layer l (deepseek2). The span form, absorbed, per row: the
  // cache holds per position only the normalised latent c (kv_lora) and the roped key part k_r;
  // head h's score is (W_uk[h]^T q_nope) . c + q_rope . k_r, so q_nope is taken into latent space
  // once per row instead of every cached latent being expanded to per-head keys, and the softmax-
  // weighted sum of latents goes through W_uv[h] once per row. The absorbed query and the cache
  // row line up element for element ([latent | rope]), so the span kernels run unchanged with the
  // row as key and as value (the value's trailing rope_dim sums are computed and ignored). Steps
  // with prompt chunks run one of the two product forms instead (mla_step above).
  auto mla_attention = [&](const LlmLayer& L, size_t l) -> bool {
    const size_t r = c.kv_lora, rd = c.rope_dim, nope = c.k_nope, heads = c.heads;
    auto rope = [&](float* v, int64_t pos) {
      if (c.yarn_ext_factor != 0.f)
        kernels::RopeRowYarn(v, 1, rd, pos, c.rope_base, freq_scale, c.yarn_ext_factor, c.yarn_corr_low, c.yarn_corr_high,
                             c.yarn_magnitude, c.neox);
      else
        kernels::RopeRow(v, 1, rd, pos, c.rope_base, freq_scale, c.neox);
    };
    // The per-head up-projections (W_uk, W_uv) are small (kv_lora x k_nope each): one task per head
    // on one thread each, instead of 2 x heads products each spread over the pool, whose
    // hand-outs cost more than the products at decode.
    if (a.head_scratch.size() < heads) a.head_scratch.resize(heads);
    auto per_head = [&](const std::vector<LlmMatrix>& w, const float* in, size_t in_step, size_t ldx, float* out,
                        size_t out_step, size_t ldy) {
      return pool.ParallelFor(heads, span_threads, [&](size_t h) {
        MatMulRows(pool, 1, cancel, w[h], in + h * in_step, ldx, n, out + h * out_step, ldy, &a.head_scratch[h]);
      }, cancel) && !(cancel && cancel->load());
    };
    float* qa = a.q_lora.data();
    float* qabs = a.q_abs.data();
    float* lat = a.latent.data();
    if (c.q_lora > 0) {
      if (!MatMulPair(pool, threads, cancel, xn, n, L.q_a, qa, L.kv_a, k, qs) ||
          !rows(n, [&](size_t i) { kernels::RmsNormRow(qa + i * c.q_lora, L.q_a_norm, c.q_lora, c.eps, qa + i * c.q_lora); }) ||
          !MatMul(pool, threads, cancel, L.q_b, qa, n, q, qs))
        return false;
    } else if (!MatMulPair(pool, threads, cancel, xn, n, L.q, q, L.kv_a, k, qs)) {
      return false;
    }
    // Every row's cache entry is in its block before any row attends (a sequence's later rows
    // read its earlier rows of this step).
    if (!rows(n, [&](size_t i) {
          const size_t pos = row_pos[i];
          float* kr = k + i * hd;
          kernels::RmsNormRow(kr, L.kv_a_norm, r, c.eps, kr);
          rope(kr + r, static_cast<int64_t>(pos));
          for (size_t h = 0; h < heads; ++h) {
            float* qh = q + i * qd + h * qk;
            rope(qh + nope, static_cast<int64_t>(pos));
            std::memcpy(qabs + (i * heads + h) * hd + r, qh + nope, rd * sizeof(float));
          }
          StoreRow(kr, hd, dtype, block_of(row_seq[i], pos) + kv.KeyOffset(l, 0) + (pos % bs) * hd * eb);
        }))
      return false;
    const size_t off = kv.KeyOffset(l, 0);
    // Sequence s's cached rows [0, end) (this step's included) into a.mla_c, in f32.
    auto gather = [&](size_t s, size_t end) {
      Grow(a.mla_c, end * hd);
      float* cl = a.mla_c.data();
      for (size_t p = 0; p < end; p += bs) {
        const uint8_t* src = block_of(s, p) + off;
        const size_t span = std::min(bs, end - p);
        if (dtype == KvDtype::kF32) {
          std::memcpy(cl + p * hd, src, span * hd * sizeof(float));
        } else {
          const uint16_t* h16 = reinterpret_cast<const uint16_t*>(src);
          for (size_t j = 0; j < span * hd; ++j) cl[p * hd + j] = kernels::LowpF16ToF32(h16[j]);
        }
      }
      return cl;
    };
    if (mla_step == MlaStepForm::kAbsorbed) {
      // Per sequence and block of kRowBlock rows, all heads at once (they share the keys): scores
      // = Q_abs . C^T over the cache rows [latent | rope] the block's last row sees, a causal
      // softmax in place, then the latent sums^T = C_lat^T . P^T (P's rows are the products'
      // contiguous weight rows; the transposed latents are activations, read end apart).
      constexpr size_t kRowBlock = 16;
      if (!per_head(L.uk, q, qk, qd, qabs, hd, heads * hd)) return false;
      for (size_t s = 0; s < step.seqs.size(); ++s) {
        const KvStepSequence& sq = step.seqs[s];
        const size_t end = sq.start + sq.tokens, mb = kRowBlock * heads;
        const float* cl = gather(s, end);
        Grow(a.mla_kv, r * end + mb * end + r * mb);
        Grow(a.mla_acc, mb);
        float* ct = a.mla_kv.data();  // r x end
        float* sc = ct + r * end;     // mb x keys
        float* ot = sc + mb * end;    // r x mb
        float* inv = a.mla_acc.data();
        for (size_t p = 0; p < end; ++p)
          for (size_t j = 0; j < r; ++j) ct[j * end + p] = cl[p * hd + j];
        for (size_t b0 = 0; b0 < sq.tokens; b0 += kRowBlock) {
          const size_t nb = std::min(kRowBlock, sq.tokens - b0), keys = sq.start + b0 + nb, m = nb * heads;
          float* qb = qabs + (sq.row0 + b0) * heads * hd;
          if (!MatMulRows(pool, threads, cancel, F32Matrix(cl, hd, keys, c.variant), qb, hd, m, sc, keys, qs) ||
              !rows(m, [&](size_t t) {
                float* row = sc + t * keys;
                const size_t see = sq.start + b0 + t / heads + 1;
                float mx = -INFINITY;
                for (size_t p = 0; p < see; ++p) mx = std::max(mx, row[p] * scale);
                float sum = 0.f;
                for (size_t p = 0; p < see; ++p) sum += row[p] = std::exp(row[p] * scale - mx);
                std::fill(row + see, row + keys, 0.f);
                inv[t] = 1.0f / sum;
              }) ||
              !MatMulRows(pool, threads, cancel, F32Matrix(sc, keys, m, c.variant), ct, end, r, ot, m, qs))
            return false;
          float* out = lat + (sq.row0 + b0) * heads * hd;
          for (size_t t = 0; t < m; ++t)
            for (size_t j = 0; j < r; ++j) out[t * hd + j] = ot[j * m + t] * inv[t];
        }
      }
      return per_head(L.uv, lat, hd, heads * hd, att, c.v_dim, ad);
    }
    if (mla_decompress) {
      // Per sequence and head: the cached latents (this step's rows included) up-projected to
      // keys [k_nope | rope] (end x qk) and values (end x v_dim, then transposed), and attention
      // as two products per block of kRowBlock rows over the keys its last row sees: scores =
      // Q . K^T, a causal softmax in place, then out^T = V^T . P^T (P's rows are the products'
      // contiguous weight rows; the transposed value rows are activations, read end apart).
      // Blocks keep the causal waste (scores past a row's position, zeroed) under one block per
      // row; products, not the span kernel's row-at-a-time dots, because a prefill's rows share
      // every key.
      constexpr size_t kRowBlock = 64;
      for (size_t s = 0; s < step.seqs.size(); ++s) {
        const KvStepSequence& sq = step.seqs[s];
        const size_t end = sq.start + sq.tokens, vd = c.v_dim;
        const size_t per = end * qk + 2 * end * vd + kRowBlock * end + vd * kRowBlock;
        const float* cl = gather(s, end);
        Grow(a.mla_kv, heads * per);
        if (!pool.ParallelFor(heads, threads, [&](size_t h) {
              float* kh = a.mla_kv.data() + h * per;  // end x qk
              float* vh = kh + end * qk;               // end x vd
              float* vt = vh + end * vd;               // vd x end
              float* sc = vt + vd * end;               // kRowBlock x keys
              float* ot = sc + kRowBlock * end;        // vd x kRowBlock
              QuantMatmulScratch* hs = &a.head_scratch[h];
              if (!MatMulRows(pool, 1, cancel, L.wk[h], cl, hd, end, kh, qk, hs) ||
                  !MatMulRows(pool, 1, cancel, L.uv[h], cl, hd, end, vh, vd, hs))
                return;
              for (size_t p = 0; p < end; ++p) {
                std::memcpy(kh + p * qk + nope, cl + p * hd + r, rd * sizeof(float));
                for (size_t j = 0; j < vd; ++j) vt[j * end + p] = vh[p * vd + j];
              }
              float inv[kRowBlock];
              for (size_t b0 = 0; b0 < sq.tokens; b0 += kRowBlock) {
                const size_t nb = std::min(kRowBlock, sq.tokens - b0), keys = sq.start + b0 + nb;
                if (!MatMulRows(pool, 1, cancel, F32Matrix(kh, qk, keys, c.variant), q + (sq.row0 + b0) * qd + h * qk, qd, nb,
                                sc, keys, hs))
                  return;
                for (size_t i = 0; i < nb; ++i) {
                  float* row = sc + i * keys;
                  const size_t see = sq.start + b0 + i + 1;
                  float mx = -INFINITY;
                  for (size_t p = 0; p < see; ++p) mx = std::max(mx, row[p] * scale);
                  float sum = 0.f;
                  for (size_t p = 0; p < see; ++p) sum += row[p] = std::exp(row[p] * scale - mx);
                  std::fill(row + see, row + keys, 0.f);
                  inv[i] = 1.0f / sum;
                }
                if (!MatMulRows(pool, 1, cancel, F32Matrix(sc, keys, nb, c.variant), vt, end, vd, ot, nb, hs)) return;
                for (size_t i = 0; i < nb; ++i) {
                  float* out = att + (sq.row0 + b0 + i) * ad + h * vd;
                  for (size_t j = 0; j < vd; ++j) out[j] = ot[j * nb + i] * inv[i];
                }
              }
            }, cancel) ||
            (cancel && cancel->load()))
          return false;
      }
      return true;
    }
    if (!per_head(L.uk, q, qk, qd, qabs, hd, heads * hd)) return false;
    if (!pool.ParallelFor(n * heads, span_threads, [&](size_t task) {
          const size_t i = task / heads, s = row_seq[i], end = static_cast<size_t>(row_pos[i]) + 1;
          const float* qrow = qabs + task * hd;
          float* out = lat + task * hd;
          std::fill(out, out + hd, 0.f);
          kernels::AttentionState st{-INFINITY, 0.f, out};
          for (size_t p = 0; p < end; p += bs) {
            const uint8_t* block = block_of(s, p) + off;
            const size_t span = std::min(bs, end - p);
            if (dtype == KvDtype::kF32)
              attend(qrow, hd, reinterpret_cast<const float*>(block), reinterpret_cast<const float*>(block), hd, span, scale, &st);
            else
              attend_f16(qrow, hd, reinterpret_cast<const uint16_t*>(block), reinterpret_cast<const uint16_t*>(block), hd, span,
                         scale, &st);
          }
          const float inv = 1.0f / st.sum;
          for (size_t j = 0; j < r; ++j) out[j] *= inv;
        }, cancel))
      return false;
    return per_head(L.uv, lat, hd, heads * hd, att, c.v_dim, ad);
  };

  for (size_t l = 0; l < c.layers; ++l) {
    const LlmLayer& L = model.layers_[l];
    if (!rows(n, [&](size_t i) { kernels::RmsNormRow(x + i * d, L.attn_norm, d, c.eps, xn + i * d); })) return false;
    StepProfileMark(prof.p, kPhaseNorm);
    if (mla) {
      if (!mla_attention(L, l)) return false;
      StepProfileMark(prof.p, kPhaseAttention);
    } else {
      if (!QkvMatMul(pool, threads, cancel, L, xn, n, q, k, v, qs)) return false;
      StepProfileMark(prof.p, kPhaseQkv, bytes(L.q) + bytes(L.k) + bytes(L.v));
      // Every row's K/V is in its block before any row attends: a sequence's later rows read its
      // earlier rows of this step.
      if (!rows(n, [&](size_t i) {
            const size_t pos = row_pos[i];
            kernels::RopeRowAngles(q + i * qd, c.heads, hd, rope + i * hd, c.neox);
            kernels::RopeRowAngles(k + i * kvd, c.kv_heads, hd, rope + i * hd, c.neox);
            uint8_t* block = block_of(row_seq[i], pos);
            const size_t off = (pos % bs) * hd * eb;
            for (size_t h = 0; h < c.kv_heads; ++h) {
              StoreRow(k + i * kvd + h * hd, hd, dtype, block + kv.KeyOffset(l, h) + off);
              StoreRow(v + i * kvd + h * hd, hd, dtype, block + kv.ValueOffset(l, h) + off);
            }
          }))
        return false;
      StepProfileMark(prof.p, kPhaseRope);
      // One task per (row, head): causal, so a row at position p sees its sequence's [0, p], folded
      // block by block through the sequence's table. A decode step over a short context is a few
      // microseconds of work, less than a helper's hand-off: then the step's thread does it alone.
      // A (position, head) pair costs some 20-30 ns here, so from 1024 of them (a batch of 8
      // sequences 16 tokens in, with 8 heads) a helper pays off; at 4096 the dense serving model's
      // 8-stream decode ran its attention on one of the two cores (a fifth of the step).
      const size_t kAttendedPerHelper = 1024;
      size_t attended = 0;
      for (size_t i = 0; i < n && attended < kAttendedPerHelper; ++i) attended += static_cast<size_t>(row_pos[i]) + 1;
      if (!pool.ParallelFor(n * c.heads, attended * c.heads < kAttendedPerHelper ? 1 : threads, [&](size_t task) {
            const size_t i = task / c.heads, h = task % c.heads, kvh = h / group;
            const size_t s = row_seq[i], end = static_cast<size_t>(row_pos[i]) + 1;
            const float* qrow = q + i * qd + h * hd;
            float* out = att + i * qd + h * hd;
            std::fill(out, out + hd, 0.f);
            kernels::AttentionState st{-INFINITY, 0.f, out};
            const size_t koff = kv.KeyOffset(l, kvh), voff = kv.ValueOffset(l, kvh);
            for (size_t p = 0; p < end; p += bs) {
              const uint8_t* block = block_of(s, p);
              const size_t span = std::min(bs, end - p);
              if (dtype == KvDtype::kF32)
                attend(qrow, hd, reinterpret_cast<const float*>(block + koff), reinterpret_cast<const float*>(block + voff), hd,
                       span, scale, &st);
              else
                attend_f16(qrow, hd, reinterpret_cast<const uint16_t*>(block + koff),
                           reinterpret_cast<const uint16_t*>(block + voff), hd, span, scale, &st);
            }
            const float inv = 1.0f / st.sum;
            for (size_t j = 0; j < hd; ++j) out[j] *= inv;
          }, cancel))
        return false;
      StepProfileMark(prof.p, kPhaseAttention);
    }
    // The projection's output goes to xn (free now), then joins the residual stream.
    if (!MatMul(pool, threads, cancel, L.o, att, n, xn, qs)) return false;
    StepProfileMark(prof.p, kPhaseAttnOut, bytes(L.o));
    for (size_t i = 0; i < n * d; ++i) x[i] += xn[i];

    if (!rows(n, [&](size_t i) { kernels::RmsNormRow(x + i * d, L.ffn_norm, d, c.eps, xn + i * d); })) return false;
    StepProfileMark(prof.p, kPhaseNorm);
    if (L.moe_ffn) {
      std::string error;
      float* y = a.moe_out.data();
      if (!RunMoe(pool, threads, cancel, L.moe, xn, n, y, kv.expert_counts().data() + l * c.experts, &error, nullptr,
                  &a.moe)) {
        if (cancel && cancel->load()) return false;
        throw std::runtime_error("blk." + std::to_string(l) + " MoE: " + error);
      }
      StepProfileMark(prof.p, kPhaseExpertsSum);
      for (size_t i = 0; i < n * d; ++i) x[i] += y[i];
      StepProfileMark(prof.p, kPhaseNorm);
      continue;
    }
    if (!GateUpMatMul(pool, threads, cancel, L, xn, n, gate, up, qs)) return false;
    if (!rows(n, [&](size_t i) { kernels::SwigluRow(gate + i * c.ff, up + i * c.ff, c.ff, gate + i * c.ff); })) return false;
    if (!MatMul(pool, threads, cancel, L.down, gate, n, xn, qs)) return false;
    StepProfileMark(prof.p, kPhaseFfn, bytes(L.gate) + bytes(L.up) + bytes(L.down));
    for (size_t i = 0; i < n * d; ++i) x[i] += xn[i];
    StepProfileMark(prof.p, kPhaseNorm);
  }

  // Only the requested rows reach the output norm and the vocabulary product (the largest matrix
  // of a small model): a prefill chunk asks for one row, or none.
  const size_t out_rows = step.out_rows.size();
  if (out_rows == 0) return true;
  if (!rows(out_rows, [&](size_t r) { kernels::RmsNormRow(x + step.out_rows[r] * d, model.output_norm_, d, c.eps, xn + r * d); }))
    return false;
  const bool ok = MatMul(pool, threads, cancel, model.output_, xn, out_rows, logits, qs);
  StepProfileMark(prof.p, kPhaseOutput, bytes(model.output_));
  return ok;
}

}  // namespace sonde
