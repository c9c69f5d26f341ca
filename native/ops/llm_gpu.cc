#include "ops/llm_gpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "kernels/quant/quant.h"

namespace sonde {

namespace {

constexpr int kQ8 = kernels::kQuantQ8_0, kQ4 = kernels::kQuantQ4_0;
bool BlockQuantised(int32_t type) { return type == kQ8 || type == kQ4; }

// The GEMM op's element codes (gemm/cuda/gemm.cu: DType).
int GemmType(int32_t type) { return type == kernels::kQuantF16 ? 1 : type == kernels::kQuantBf16 ? 2 : 0; }

// Splits of a decode attention's workspace per (row, head): flash-decoding splits a long context
// over SMs (attention/cuda/decode.cu sizes them to ~8 blocks per SM and no shorter than 256
// positions), so 32 cover 8k positions of one sequence at full split count; longer ones get longer
// splits, not more.
constexpr size_t kDecodeSplits = 32;

// KV pools grow to at least this many bytes at a time (ops/kv_pool.cc's chunk), and double.
constexpr size_t kPoolChunkBytes = size_t{2} << 20;

GpuBufferArg Arg(const void* p, size_t bytes) { return GpuBufferArg{const_cast<void*>(p), bytes}; }
GpuBufferArg Arg(const std::shared_ptr<GpuAllocation>& a) { return Arg(a->data(), a->bytes()); }

}  // namespace

struct GpuLlmModel::Ops {
  GpuOpFn embed, add, bias, gather, copy_blocks, copy, rms_norm, silu_mul, quant_pack, quant_matmul, gemm, rope, kv_store,
      decode, prefill, moe, gated_add, mla_decode, rms_norm_rows, head_matmul, copy_rows, add_rms_norm, rope_store, chain_next;
};

namespace {

GpuOpFn Find(const std::string& name, bool emulated) {
  GpuOpFn fn = FindGpuOp(name, emulated);
  if (!fn) throw GpuError(GpuErrc::kUnavailable, "the GPU op '" + name + "' is not in this build");
  return fn;
}

// SONDE_GPU_LLM_PROFILE, a diagnostic (the GPU's counterpart of ops/step_profile.h, which times
// the CPU step's phases on its thread; here the time is the device's), printed to stderr at exit:
// - 1: steps launch op by op (no graphs) and each op is timed alone by device events around it, so
//   a table of where a step's device time goes (per op and shape, per decode or prefill step).
//   Timing serialises host and device, so the sum exceeds a graphed step by the launch gaps a
//   graph hides; the difference is that overhead.
// - step: steps run as they do without the profile (decode as graphs); per kind of step the
//   median device time of its launches (events before the first and after the last, so a graph's
//   launch latency is in it; no busy kernel ahead, which would lengthen the step) and the median
//   wall time of the native step (the upload, the launches, the logits' download and the wait for
//   them), beside which the caller's time per step shows what the binding and the event loop add.
class GpuStepProfile {
 public:
  static GpuStepProfile* Active() {
    static GpuStepProfile* p = []() -> GpuStepProfile* {
      const char* v = std::getenv("SONDE_GPU_LLM_PROFILE");
      if (v && std::strcmp(v, "1") == 0) return new GpuStepProfile(true);  // lives to the exit handler
      if (v && std::strcmp(v, "step") == 0) return new GpuStepProfile(false);
      return nullptr;
    }();
    return p;
  }
  // Op by op (1), or whole steps (step).
  bool ops() const { return ops_mode_; }
  void BeginStep(bool decode, const std::shared_ptr<GpuDevice>& device) {
    mode_ = decode ? "decode" : "prefill";
    std::lock_guard<std::mutex> lock(mu_);
    ++steps_[mode_];
    if (ops_mode_ && !device->info().emulated && (!busy_out_ || busy_device_ != device.get())) {
      busy_out_ = std::make_shared<GpuAllocation>(device, 4, "the step profile's busy kernel");
      busy_device_ = device.get();
    }
  }
  void Time(const GpuLlmCall& c, GpuStream& s, const GpuDeviceInfo& d) {
    // A GPU kept busy (~30 us of one block's FMAs) while the host records the start event and
    // launches the op, so the op starts right after the start event: its time, not the launch's.
    if (busy_out_) {
      static const GpuOpFn busy = FindGpuOp("probe_fma", false);
      GpuOpCall spin;
      spin.op = "probe_fma";
      spin.buffers = {GpuBufferArg{busy_out_->data(), busy_out_->bytes()}};
      spin.params = {{"blocks", 1}, {"iters", 4096}};
      if (busy) busy(s, d, spin);
    }
    s.MarkStart();
    c.fn(s, d, c.call);
    const double ms = s.MarkStopMs();
    std::string key = c.call.op;
    for (const char* p : {"n", "k", "reuse", "quantize"})
      if (c.call.Has(p)) key += std::string(" ") + p + "=" + std::to_string(static_cast<int64_t>(c.call.params.at(p)));
    std::lock_guard<std::mutex> lock(mu_);
    ops_[mode_][key].push_back(ms);
  }
  // step mode: a step's device time (< 0: none measured) and its native wall time.
  void StepTimes(double device_ms, double wall_ms) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& t = step_times_[mode_];
    if (device_ms >= 0) t.first.push_back(device_ms);
    t.second.push_back(wall_ms);
  }

 private:
  explicit GpuStepProfile(bool ops) : ops_mode_(ops) {
    std::atexit([] { Active()->Print(); });
  }
  void Print() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [mode, times] : step_times_) {
      std::vector<double>& device = times.first;
      std::vector<double>& wall = times.second;
      std::sort(device.begin(), device.end());
      std::sort(wall.begin(), wall.end());
      std::fprintf(stderr, "sonde gpu llm profile: %s, %zu steps: device %.4f ms, native step %.4f ms (medians)\n", mode.c_str(),
                   wall.size(), device.empty() ? 0.0 : device[device.size() / 2], wall[wall.size() / 2]);
    }
    // Per op its median time (the first step of a kind also loads each kernel's module, lazily,
    // which a mean would spread over the steps) times its calls per step.
    for (auto& [mode, ops] : ops_) {
      const double steps = static_cast<double>(steps_[mode]);
      std::vector<std::pair<double, std::string>> rows;
      double total = 0;
      for (auto& [key, times] : ops) {
        std::sort(times.begin(), times.end());
        const double per_step = static_cast<double>(times.size()) / steps, ms = times[times.size() / 2] * per_step;
        total += ms;
        rows.emplace_back(ms, key + " x" + std::to_string(per_step).substr(0, 5) + " (median " +
                                  std::to_string(times[times.size() / 2] * 1e3).substr(0, 6) + " us, max " +
                                  std::to_string(times.back() * 1e3).substr(0, 8) + " us)");
      }
      std::fprintf(stderr, "sonde gpu llm profile: %s, %.0f steps, %.4f ms of ops per step (medians)\n", mode.c_str(), steps, total);
      std::sort(rows.rbegin(), rows.rend());
      for (const auto& [ms, key] : rows) std::fprintf(stderr, "  %9.4f ms/step %5.1f%%  %s\n", ms, 100 * ms / total, key.c_str());
    }
  }
  std::mutex mu_;
  std::shared_ptr<GpuAllocation> busy_out_;
  const GpuDevice* busy_device_ = nullptr;
  // The kind of step this thread runs (a step's ops launch on its thread; pools may step
  // concurrently on others).
  static thread_local const char* mode_;
  std::map<std::string, double> steps_;
  std::map<std::string, std::map<std::string, std::vector<double>>> ops_;
  const bool ops_mode_;
  // step mode, per kind of step: device ms of its launches, wall ms of the native step.
  std::map<std::string, std::pair<std::vector<double>, std::vector<double>>> step_times_;
};

thread_local const char* GpuStepProfile::mode_ = "decode";

GpuLlmCall Call(GpuOpFn fn, const char* name, std::vector<GpuBufferArg> buffers, std::map<std::string, double> params) {
  GpuLlmCall c;
  c.fn = fn;
  c.call.op = name;
  c.call.buffers = std::move(buffers);
  c.call.params = std::move(params);
  return c;
}

// rows x cols of T (GGUF: n rows of k) into cols x rows (the GEMM's [k][n]), in tiles so that
// both sides stream through the cache. The mapping gives no alignment: elements are copied bytewise.
template <typename T>
void Transpose(const uint8_t* src, size_t rows, size_t cols, T* dst) {
  constexpr size_t kTile = 64;
  for (size_t r0 = 0; r0 < rows; r0 += kTile)
    for (size_t c0 = 0; c0 < cols; c0 += kTile) {
      const size_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (size_t r = r0; r < r1; ++r)
        for (size_t c = c0; c < c1; ++c) std::memcpy(dst + c * rows + r, src + (r * cols + c) * sizeof(T), sizeof(T));
    }
}

struct Uploader {
  std::shared_ptr<GpuDevice> device;
  GpuStream& stream;
  const GpuLlmModel::Ops& ops;
  size_t* bytes;

  std::shared_ptr<GpuAllocation> Alloc(size_t n, const std::string& what) {
    auto a = std::make_shared<GpuAllocation>(device, std::max<size_t>(n, 1), what);
    *bytes += a->bytes();
    return a;
  }
  std::shared_ptr<GpuAllocation> Bytes(const void* host, size_t n, const std::string& what) {
    auto a = Alloc(n, what);
    stream.Upload(a->data(), host, n);
    return a;
  }
  std::shared_ptr<GpuAllocation> Vector(const float* v, size_t n, const std::string& what) {
    return v ? Bytes(v, n * sizeof(float), what) : nullptr;
  }
  // Views (one per head, each n rows of k) in f32, stacked: MLA's per-head up-projections.
  std::shared_ptr<GpuAllocation> Heads(const std::vector<LlmMatrix>& views, const std::string& what) {
    const size_t per = views[0].n * views[0].k;
    std::vector<float> host(views.size() * per);
    for (size_t h = 0; h < views.size(); ++h)
      for (size_t r = 0; r < views[h].n; ++r)
        kernels::DequantizeRow(views[h].type, views[h].data + r * views[h].row_bytes, views[h].k, host.data() + h * per + r * views[h].k);
    auto a = Bytes(host.data(), host.size() * sizeof(float), "language model weight " + what);
    stream.Synchronize();
    return a;
  }
  // Every row of m in f32 (or rounded to bf16), as the file's rows (n rows of k): stacked experts
  // for the MoE op.
  std::shared_ptr<GpuAllocation> Dequantised(const LlmMatrix& m, const std::string& what, bool bf16 = false) {
    std::vector<float> host(m.n * m.k);
    for (size_t r = 0; r < m.n; ++r) kernels::DequantizeRow(m.type, m.data + r * m.row_bytes, m.k, host.data() + r * m.k);
    std::shared_ptr<GpuAllocation> a;
    if (bf16) {
      std::vector<uint16_t> half(host.size());
      for (size_t i = 0; i < host.size(); ++i) half[i] = ToBf16(host[i]);
      a = Bytes(half.data(), half.size() * sizeof(uint16_t), "language model weight " + what);
    } else {
      a = Bytes(host.data(), host.size() * sizeof(float), "language model weight " + what);
    }
    stream.Synchronize();
    return a;
  }
  // Round to nearest even, NaN kept quiet (the dialect's FloatToBf16 on the host).
  static uint16_t ToBf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
  GpuLlmMatrix Matrix(const LlmMatrix& m, const std::string& what) {
    GpuLlmMatrix g;
    g.type = m.type;
    g.k = m.k;
    g.n = m.n;
    const size_t raw_bytes = m.n * m.row_bytes;
    if (BlockQuantised(m.type)) {
      const size_t nb = m.k / kernels::kQuantBlock;
      g.data = Alloc(m.n * nb * ((m.type == kQ8 ? 32 : 16) + 2), "language model weight " + what);
      // The GGUF rows only for the repack: freed once it has run.
      GpuAllocation raw(device, std::max<size_t>(raw_bytes, 1), "language model weight " + what + " (GGUF rows, for repacking)");
      stream.Upload(raw.data(), m.data, raw_bytes);
      GpuOpCall pack;
      pack.op = "quant_pack";
      pack.buffers = {Arg(raw.data(), raw.bytes()), Arg(g.data)};
      pack.params = {{"type", m.type}, {"n", static_cast<double>(m.n)}, {"k", static_cast<double>(m.k)}};
      ops.quant_pack(stream, device->info(), pack);
      stream.Synchronize();
      return g;
    }
    const size_t elem = m.type == kernels::kQuantF32 ? 4 : 2;
    std::vector<uint8_t> host(m.n * m.k * elem);
    if (elem == 4) Transpose(m.data, m.n, m.k, reinterpret_cast<uint32_t*>(host.data()));
    else Transpose(m.data, m.n, m.k, reinterpret_cast<uint16_t*>(host.data()));
    g.data = Bytes(host.data(), host.size(), "language model weight " + what);
    // The upload copied the host bytes (gpu.h), but its staging must not outlive this buffer's
    // reuse by a later, larger transpose on a real device: synchronise per matrix.
    stream.Synchronize();
    return g;
  }
  // Matrices of one type and k, their rows stacked in the order given, as one matrix (Matrix
  // synchronises, so the joined host rows may die on return).
  GpuLlmMatrix Joined(std::initializer_list<const LlmMatrix*> parts, const std::string& what) {
    LlmMatrix joined = **parts.begin();
    joined.n = 0;
    for (const LlmMatrix* m : parts) joined.n += m->n;
    std::vector<uint8_t> rows(joined.n * joined.row_bytes);
    size_t at = 0;
    for (const LlmMatrix* m : parts) {
      std::memcpy(rows.data() + at, m->data, m->n * m->row_bytes);
      at += m->n * m->row_bytes;
    }
    joined.data = rows.data();
    return Matrix(joined, what);
  }
};

// SONDE_GPU_JOIN_FFN=0 uploads gate and up apart (an A/B switch for the joined FFN product).
bool JoinFfn() {
  static const bool on = EnvSwitchOn("SONDE_GPU_JOIN_FFN");
  return on;
}

// A/B switches, each on unless set to 0: SONDE_GPU_ATTN_QUANTISE (the decode attention writes
// its output quantised for a q8_0 / q4_0 o product, which then skips its quantiser launch),
// SONDE_GPU_NORM_IN_ADD (the output norm in the last residual add when every row of the step
// wants logits, in order: no gather, no separate norm, no quantiser before the vocabulary product).
bool AttentionQuantises() {
  static const bool on = EnvSwitchOn("SONDE_GPU_ATTN_QUANTISE");
  return on;
}
bool NormInAdd() {
  static const bool on = EnvSwitchOn("SONDE_GPU_NORM_IN_ADD");
  return on;
}

}  // namespace

void GpuLlmCall::Run(GpuStream& s, const GpuDeviceInfo& d) const {
  GpuStepProfile* p = GpuStepProfile::Active();
  if (p && p->ops() && !s.capturing())
    p->Time(*this, s, d);
  else
    fn(s, d, call);
}

std::string GpuLlmModel::Unsupported(const LlmModel& m) {
  const LlmConfig& c = m.cfg_;
  // The MLA decode kernel's widest cached row (attention/cuda/decode.cu: kMaxHeadDim).
  if (c.kv_lora > 0 && c.kv_lora + c.rope_dim > 576)
    return "latent attention rows of " + std::to_string(c.kv_lora + c.rope_dim) + " (the GPU attention takes up to 576)";
  // The MoE op's routing keeps a token's scores in shared memory (moe/cuda/moe.cu: kMaxExperts).
  if (c.experts > 1024) return "mixture-of-experts layers of " + std::to_string(c.experts) + " experts (the GPU routes up to 1024)";
  // The prefill kernel's limit (attention/cuda/prefill.cu).
  if (c.kv_lora == 0 && c.head_dim > 256) return "head dimension " + std::to_string(c.head_dim) + " (the GPU attention takes up to 256)";
  return {};
}

std::shared_ptr<const GpuLlmModel> GpuLlmModel::Create(const LlmModel& cpu, std::shared_ptr<GpuDevice> device,
                                                       const CancelFlag* cancel) {
  const std::string why = Unsupported(cpu);
  if (!why.empty()) throw GpuError(GpuErrc::kInvalidArgument, "the GPU transformer does not run " + why);
  const bool emu = device->info().emulated;
  auto ops = std::make_shared<Ops>();
  ops->embed = Find("llm_embed", emu);
  ops->add = Find("llm_add", emu);
  ops->bias = Find("llm_bias", emu);
  ops->gather = Find("llm_gather_rows", emu);
  ops->copy_blocks = Find("llm_copy_blocks", emu);
  ops->copy = Find("llm_copy", emu);
  ops->chain_next = Find("llm_chain_next", emu);
  ops->rms_norm = Find("rms_norm", emu);
  ops->silu_mul = Find("llm_silu_mul", emu);
  ops->quant_pack = Find("quant_pack", emu);
  ops->quant_matmul = Find("quant_matmul", emu);
  ops->gemm = Find("gemm", emu);
  ops->rope = Find("rope", emu);
  ops->kv_store = Find("kv_store", emu);
  ops->decode = Find("paged_attention_decode", emu);
  ops->prefill = Find("paged_attention_prefill", emu);
  ops->moe = Find("moe", emu);
  ops->gated_add = Find("llm_gated_add", emu);
  ops->mla_decode = Find("mla_attention_decode", emu);
  ops->rms_norm_rows = Find("llm_rms_norm_rows", emu);
  ops->head_matmul = Find("llm_head_matmul", emu);
  ops->copy_rows = Find("llm_copy_rows", emu);
  ops->add_rms_norm = Find("llm_add_rms_norm", emu);
  ops->rope_store = Find("llm_rope_store", emu);

  std::shared_ptr<GpuLlmModel> g(new GpuLlmModel());
  g->cfg_ = cpu.cfg_;
  g->device_ = device;
  g->ops_ = ops;
  const LlmConfig& c = g->cfg_;
  std::shared_ptr<GpuStream> stream = device->AcquireStream();
  Uploader up{device, *stream, *ops, &g->bytes_};
  const LlmMatrix& E = cpu.embd_;
  g->embd_type_ = E.type;
  g->embd_ = up.Bytes(E.data, E.n * E.row_bytes, "language model weight token_embd.weight");
  g->output_norm_ = up.Vector(cpu.output_norm_, c.embd, "language model weight output_norm.weight");
  g->output_ = up.Matrix(cpu.output_, cpu.output_.data == E.data ? "token_embd.weight (as the output)" : "output.weight");
  g->layers_.resize(c.layers);
  const size_t qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim;
  // The GPU's grouped expert GEMMs read f32 or bf16. f32 holds every GGUF type exactly, but is 4x a
  // q8_0 file's experts (7x q4_0's): bf16 (2^-9 relative per weight, activations rounded to bf16
  // by the tensor-core GEMM) when f32 experts would take more than 40% of the device.
  // SONDE_GPU_EXPERTS=f32|bf16 at load pins one (an A/B switch, and the tests' way to the bf16 path).
  if (c.experts > 0) {
    size_t elems = 0;
    for (size_t l = 0; l < c.layers; ++l)
      if (cpu.layers_[l].moe_ffn) elems += 3 * c.experts * c.expert_ff * c.embd;
    g->experts_bf16_ = static_cast<double>(elems) * 4 > 0.4 * static_cast<double>(device->info().total_bytes);
    if (const char* e = std::getenv("SONDE_GPU_EXPERTS"); e && *e) {
      if (std::strcmp(e, "bf16") == 0) g->experts_bf16_ = true;
      else if (std::strcmp(e, "f32") == 0) g->experts_bf16_ = false;
    }
  }
  for (size_t l = 0; l < c.layers; ++l) {
    if (cancel && cancel->load()) return nullptr;
    const LlmLayer& L = cpu.layers_[l];
    GpuLlmLayer& G = g->layers_[l];
    const std::string b = "blk." + std::to_string(l) + ".";
    G.attn_norm = up.Vector(L.attn_norm, c.embd, "language model weight " + b + "attn_norm.weight");
    G.ffn_norm = up.Vector(L.ffn_norm, c.embd, "language model weight " + b + "ffn_norm.weight");
    G.o = up.Matrix(L.o, b + "attn_output.weight");
    if (c.kv_lora > 0) {
      if (c.q_lora > 0) {
        G.q_a = up.Matrix(L.q_a, b + "attn_q_a.weight");
        G.q_a_norm = up.Vector(L.q_a_norm, c.q_lora, "language model weight " + b + "attn_q_a_norm.weight");
        G.q_b = up.Matrix(L.q_b, b + "attn_q_b.weight");
      } else {
        G.q = up.Matrix(L.q, b + "attn_q.weight");
      }
      G.kv_a = up.Matrix(L.kv_a, b + "attn_kv_a_mqa.weight");
      G.kv_a_norm = up.Vector(L.kv_a_norm, c.kv_lora, "language model weight " + b + "attn_kv_a_norm.weight");
      G.uk = up.Heads(L.uk, b + "attn_k_b.weight (absorbed, per head)");
      G.uv = up.Heads(L.uv, b + "attn_v_b.weight (per head)");
    } else {
      if (L.q.type == L.k.type && L.k.type == L.v.type) {
        G.qkv = up.Joined({&L.q, &L.k, &L.v}, b + "attn_q/k/v.weight (joined)");
        if (L.q_bias || L.k_bias || L.v_bias) {
          std::vector<float> bias(qd + 2 * kvd, 0.f);
          if (L.q_bias) std::copy(L.q_bias, L.q_bias + qd, bias.begin());
          if (L.k_bias) std::copy(L.k_bias, L.k_bias + kvd, bias.begin() + qd);
          if (L.v_bias) std::copy(L.v_bias, L.v_bias + kvd, bias.begin() + qd + kvd);
          G.qkv_bias = up.Vector(bias.data(), bias.size(), "language model weight " + b + "attn_q/k/v.bias (joined)");
          stream->Synchronize();  // the host vector dies here
        }
      } else {
        G.q_bias = up.Vector(L.q_bias, qd, "language model weight " + b + "attn_q.bias");
        G.k_bias = up.Vector(L.k_bias, kvd, "language model weight " + b + "attn_k.bias");
        G.v_bias = up.Vector(L.v_bias, kvd, "language model weight " + b + "attn_v.bias");
        G.q = up.Matrix(L.q, b + "attn_q.weight");
        G.k = up.Matrix(L.k, b + "attn_k.weight");
        G.v = up.Matrix(L.v, b + "attn_v.weight");
      }
    }
    if (!L.moe_ffn) {
      if (L.gate.type == L.up.type && JoinFfn()) {
        G.gate_up = up.Joined({&L.gate, &L.up}, b + "ffn_gate/up.weight (joined)");
      } else {
        G.gate = up.Matrix(L.gate, b + "ffn_gate.weight");
        G.up = up.Matrix(L.up, b + "ffn_up.weight");
      }
      G.down = up.Matrix(L.down, b + "ffn_down.weight");
      continue;
    }
    G.moe = true;
    G.router = up.Dequantised(L.gate_inp, b + "ffn_gate_inp.weight");
    G.gate_exps = up.Dequantised(L.gate_exps, b + "ffn_gate_exps.weight", g->experts_bf16_);
    G.up_exps = up.Dequantised(L.up_exps, b + "ffn_up_exps.weight", g->experts_bf16_);
    G.down_exps = up.Dequantised(L.down_exps, b + "ffn_down_exps.weight", g->experts_bf16_);
    G.exp_probs_b = up.Vector(L.exp_probs_b, c.experts, "language model weight " + b + "exp_probs_b.bias");
    if (c.shared_ff) {
      G.gate_shexp = up.Matrix(L.gate_shexp, b + "ffn_gate_shexp.weight");
      G.up_shexp = up.Matrix(L.up_shexp, b + "ffn_up_shexp.weight");
      G.down_shexp = up.Matrix(L.down_shexp, b + "ffn_down_shexp.weight");
      G.gate_inp_shexp = up.Vector(L.gate_inp_shexp, c.embd, "language model weight " + b + "ffn_gate_inp_shexp.weight");
    }
  }
  stream->Synchronize();
  return g;
}

// ---------------------------------------------------------------------------------------------
// The step arena: activations of up to `rows` rows, the step's integers, and the calls over them.

struct GpuLlmArena {
  size_t rows = 0, seqs = 0, tables = 0, pairs = 0, out = 0;
  std::shared_ptr<GpuAllocation> act, ints, logits;
  float *x = nullptr, *xn = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *att = nullptr, *gate = nullptr,
        *up = nullptr, *h = nullptr, *xo = nullptr, *ws = nullptr, *moe_out = nullptr, *so = nullptr, *sg = nullptr,
        *su = nullptr, *sh = nullptr, *qa = nullptr, *qabs = nullptr, *lat = nullptr, *qkv = nullptr;
  uint8_t* qscratch = nullptr;
  uint8_t* moe_ws = nullptr;
  size_t qscratch_bytes = 0, ws_bytes = 0, moe_ws_bytes = 0;
  // MoE: tokens per expert of each layer in this step ([layer][expert] int32), and its download.
  std::shared_ptr<GpuAllocation> counts;
  std::vector<int32_t> counts_host;
  // Chained steps (StepChain): the tokens chosen [step][sequence], and when they are sampled the
  // parameters [sequence][4] (f64), the generators' states [sequence][4] and their state after each
  // step [step][sequence][4]; each grown as needed.
  std::shared_ptr<GpuAllocation> chosen, chain_params, chain_rng, chain_rng_out;
  int32_t *tokens = nullptr, *pos = nullptr, *row_seq = nullptr, *meta = nullptr, *lens = nullptr, *out_rows = nullptr, *pairs_dev = nullptr,
          *tables_dev = nullptr;
  std::vector<int32_t> host;  // the ints' staging, uploaded in one copy

  // Calls, rebuilt whenever the buffers move.
  struct Product {
    GpuLlmCall mm;
    GpuLlmCall bias;  // quantised weights with a bias (qwen2): added after the product
    bool has_bias = false;
  };
  struct Layer {
    GpuLlmCall attn_norm, rope_q, rope_k, store, decode, prefill, add_attn, add_ffn, silu;
    Product q, k, v, o, gate, up, down, qkv;  // gate: the joined gate/up product where joined_ffn
    bool joined_ffn = false;
    // The decode attention writes o's input quantised (o skips its quantiser in decode steps).
    bool attn_quantises = false;
    GpuLlmCall moe, shared_silu, shared_add, add_moe;
    // The last layer's final add also computing the output norm (as add_rms_norm), for steps whose
    // every row wants logits in order: the gather and the separate norm then do not run.
    GpuLlmCall add_ffn_out, add_moe_out;
    Product shared_gate, shared_up, shared_down;
    bool moe_ffn = false, shared = false;
    // MLA: q LoRA (q_a, its norm, q_b) or q, kv_a and the latent's norm, RoPE of both rope parts,
    // the absorbed query (uk and the copied rope part), attention, and the value up-projection.
    GpuLlmCall q_a_norm, kv_norm, absorb, copy_rope, mla, uv;
    Product q_a, q_b, kv_a;
  };
  std::vector<Layer> layers;
  GpuLlmCall embed, copy_blocks, gather, out_norm;
  Product output;
  // Decode steps as graphs (runtime/cuda/gpu.h): the launches from the embedding to the logits,
  // captured once per shape and replayed, so a step costs the host one launch instead of a dozen per
  // layer. A graph holds the buffers' addresses and the sizes passed to its kernels, so its key is
  // everything those depend on; they are dropped whenever Fit moves the buffers.
  struct GraphKey {
    size_t rows, seqs, out, width, max_len;
    const uint8_t* kv;
    size_t kv_blocks;
    bool in_order;
    bool operator==(const GraphKey& o) const {
      return rows == o.rows && seqs == o.seqs && out == o.out && width == o.width && max_len == o.max_len && kv == o.kv &&
             kv_blocks == o.kv_blocks && in_order == o.in_order;
    }
  };
  std::vector<std::pair<GraphKey, std::unique_ptr<GpuGraph>>> graphs;  // most recent last
  bool capturable = true;  // cleared when a capture failed: steps then launch one by one
  size_t Bytes() const {
    return (act ? act->bytes() : 0) + (ints ? ints->bytes() : 0) + (logits ? logits->bytes() : 0) +
           (counts ? counts->bytes() : 0) + (chosen ? chosen->bytes() : 0) +
           (chain_params ? chain_params->bytes() + chain_rng->bytes() + chain_rng_out->bytes() : 0);
  }
};

namespace {

size_t RowClass(size_t rows) {
  size_t c = 1;
  while (c < rows) c <<= 1;
  return c;
}

// y (rows x w.n) = x (rows x w.k) . W^T over the arena's buffers; `reuse`: the quantised x of the
// previous product on the same x is still in the scratch.
GpuLlmArena::Product Product(const GpuLlmModel::Ops& ops, const GpuLlmArena& a, const GpuLlmMatrix& w,
                             const std::shared_ptr<GpuAllocation>& bias, const float* x, float* y, size_t out_rows,
                             bool reuse) {
  GpuLlmArena::Product p;
  const size_t x_bytes = a.rows * w.k * sizeof(float), y_bytes = out_rows * w.n * sizeof(float);
  if (BlockQuantised(w.type)) {
    p.mm = Call(ops.quant_matmul, "quant_matmul", {Arg(x, x_bytes), Arg(w.data), Arg(y, y_bytes), Arg(a.qscratch, a.qscratch_bytes)},
                {{"type", w.type}, {"n", static_cast<double>(w.n)}, {"k", static_cast<double>(w.k)}, {"m", 0},
                 {"reuse", reuse ? 1 : 0}});
    if (bias) {
      p.has_bias = true;
      p.bias = Call(ops.bias, "llm_bias", {Arg(y, y_bytes), Arg(bias)}, {{"rows", 0}, {"n", static_cast<double>(w.n)}});
    }
  } else {
    std::vector<GpuBufferArg> buffers{Arg(x, x_bytes), Arg(w.data), Arg(y, y_bytes)};
    if (bias) buffers.push_back(Arg(bias));
    p.mm = Call(ops.gemm, "gemm", std::move(buffers),
                {{"m", 0}, {"n", static_cast<double>(w.n)}, {"k", static_cast<double>(w.k)}, {"bType", GemmType(w.type)},
                 {"hasBias", bias ? 1 : 0}});
  }
  return p;
}

void RunProduct(GpuLlmArena::Product& p, size_t rows, GpuStream& s, const GpuDeviceInfo& d) {
  if (!p.mm.fn) throw GpuError(GpuErrc::kKernel, "internal error: a product of the GPU transformer was not prepared");
  p.mm.call.params["m"] = static_cast<double>(rows);
  p.mm.Run(s, d);
  if (p.has_bias) {
    p.bias.call.params["rows"] = static_cast<double>(rows);
    p.bias.Run(s, d);
  }
}

// Whether a product quantises its activations (so that the next one over the same x may reuse them).
bool Quantises(const GpuLlmMatrix& w) { return BlockQuantised(w.type); }

}  // namespace

// ---------------------------------------------------------------------------------------------

GpuKvPool::GpuKvPool(std::shared_ptr<const GpuLlmModel> model, size_t block_size, size_t max_blocks, KvDtype dtype)
    : model_(std::move(model)), block_size_(block_size), max_blocks_(max_blocks), dtype_(dtype),
      arena_(std::make_unique<GpuLlmArena>()) {
  const KvCacheShape shape = KvCacheShapeOf(model_->config());
  block_bytes_ = model_->config().layers * shape.streams * block_size * shape.row_width * (dtype == KvDtype::kF16 ? 2 : 4);
  expert_counts_.assign(model_->config().layers * model_->config().experts, 0);
}

GpuKvPool::~GpuKvPool() = default;

size_t GpuKvPool::HeldBytes() const { return bytes() + arena_->Bytes(); }

void GpuKvPool::Reserve(size_t last, GpuStream& s) {
  if (last >= max_blocks_) last = max_blocks_ - 1;
  if (last < capacity_) return;
  const size_t chunk = std::max<size_t>(1, kPoolChunkBytes / block_bytes_);
  size_t want = std::min(max_blocks_, std::max({last + 1, 2 * capacity_, chunk}));
  GpuDevice& dev = model_->device();
  std::shared_ptr<GpuAllocation> fresh;
  const auto what = [&](size_t blocks) {
    return "KV cache of " + std::to_string(blocks) + " blocks of " + std::to_string(block_bytes_) + " bytes";
  };
  try {
    fresh = std::make_shared<GpuAllocation>(model_->device_ptr(), want * block_bytes_, what(want));
  } catch (const GpuError& e) {
    // Doubling is only to grow rarely: the blocks the step needs may still fit.
    if (e.code != GpuErrc::kOutOfMemory || want == last + 1) throw;
    want = last + 1;
    fresh = std::make_shared<GpuAllocation>(model_->device_ptr(), want * block_bytes_, what(want));
  }
  if (capacity_) {
    GpuOpCall copy;
    copy.op = "llm_copy";
    copy.buffers = {Arg(blocks_->data(), capacity_ * block_bytes_), Arg(fresh->data(), capacity_ * block_bytes_)};
    copy.params = {{"bytes", static_cast<double>(capacity_ * block_bytes_)}};
    model_->ops_->copy(s, dev.info(), copy);
  }
  // Zeros, as the CPU pool's calloc: a block read before it is written gives no stale bytes.
  s.Fill(static_cast<uint8_t*>(fresh->data()) + capacity_ * block_bytes_, 0, (want - capacity_) * block_bytes_);
  // The old blocks are released only once the copy has read them.
  s.Synchronize();
  blocks_ = std::move(fresh);
  capacity_ = want;
  high_water_ = std::max(high_water_, bytes());
}

void GpuKvPool::ReadBlocks(const std::vector<int32_t>& ids, uint8_t* out, GpuStream& s) const {
  for (size_t i = 0; i < ids.size(); ++i)
    s.Download(out + i * block_bytes_, data() + static_cast<size_t>(ids[i]) * block_bytes_, block_bytes_);
}

void GpuKvPool::WriteBlocks(const std::vector<int32_t>& ids, const uint8_t* bytes, GpuStream& s) {
  for (size_t i = 0; i < ids.size(); ++i)
    s.Upload(data() + static_cast<size_t>(ids[i]) * block_bytes_, bytes + i * block_bytes_, block_bytes_);
}

// ---------------------------------------------------------------------------------------------

namespace {

// Sizes the arena for a step (growing by powers of two, as LlmArena) and rebuilds the calls when
// its buffers move.
void Fit(const GpuLlmModel& m, const GpuLlmModel::Ops& ops, const std::vector<GpuLlmLayer>& layers,
         const GpuLlmMatrix& output, const std::shared_ptr<GpuAllocation>& embd, int32_t embd_type,
         const std::shared_ptr<GpuAllocation>& output_norm, GpuLlmArena& a, size_t rows, size_t seqs, size_t tables,
         size_t pairs, size_t out) {
  const LlmConfig& c = m.config();
  bool moved = false;
  if (rows > a.rows || seqs > a.seqs || tables > a.tables || pairs > a.pairs) {
    const size_t r = std::max(a.rows, RowClass(rows)), sq = std::max(a.seqs, RowClass(seqs));
    const size_t tb = std::max(a.tables, RowClass(tables)), pr = std::max(a.pairs, RowClass(std::max<size_t>(pairs, 1)));
    const size_t d = c.embd, qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim, ff = c.ff, sff = c.shared_ff;
    const size_t kmax = std::max({d, qd, ff, sff});
    // Every region 256-byte aligned (16-byte vector access, and the GEMM's aligned paths).
    const auto round = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
    const size_t f = sizeof(float), moe_rows = c.experts ? r : 0, moe_pairs = moe_rows * c.experts_used;
    // MLA: queries of k_nope + rope_dim per head, absorbed queries of the cached row (head_dim) per
    // head, latents of kv_lora per head, values of v_dim per head.
    const bool mla = c.kv_lora > 0;
    const size_t qw = mla ? c.heads * std::max(c.head_dim, c.k_nope + c.rope_dim) : qd;
    const size_t aw = mla ? c.heads * std::max(c.head_dim, c.v_dim) : qd;
    const size_t mla_rows = mla ? r : 0;
    // gate holds the joined gate/up product's rows (2 * ff) where a layer has one; up is used only
    // by layers whose gate and up are apart.
    bool joined = false, apart = false;
    for (const GpuLlmLayer& G : layers)
      if (!G.moe) (G.gate_up.data ? joined : apart) = true;
    const size_t sizes[] = {r * d * f,        r * d * f,        r * qw * f,       r * kvd * f, r * kvd * f, r * aw * f,
                            r * (joined ? 2 : 1) * ff * f, apart ? r * ff * f : 0, r * ff * f,       r * d * f,   r * c.heads * (c.head_dim + 2) * kDecodeSplits * f,
                            moe_rows * d * f, moe_rows * d * f, moe_rows * sff * f, moe_rows * sff * f, moe_rows * sff * f,
                            mla_rows * c.q_lora * f, mla_rows * c.heads * c.head_dim * f, mla_rows * c.heads * c.kv_lora * f,
                            mla ? 0 : r * (qd + 2 * kvd) * f,
                            r * kmax + r * (kmax / kernels::kQuantBlock) * 4};
    constexpr size_t kScratch = 20;
    // The MoE op's workspace as moe.cu's MoeOp takes it (each piece rounded to 256 bytes).
    const size_t te = moe_rows * c.experts * f;
    const size_t moe_pieces[] = {te, te, moe_pairs * 4, moe_pairs * 4, (c.experts + 1) * 4, moe_pairs * 4, moe_pairs * 4,
                                 moe_pairs * c.expert_ff * f, moe_pairs * d * f};
    size_t moe_ws = 0;
    if (c.experts)
      for (size_t piece : moe_pieces) moe_ws += round(piece);
    size_t total = round(moe_ws);
    for (size_t s : sizes) total += round(s);
    a.act.reset();
    a.act = std::make_shared<GpuAllocation>(m.device_ptr(), total, "language model activations of " + std::to_string(r) + " rows");
    uint8_t* p = static_cast<uint8_t*>(a.act->data());
    float** floats[] = {&a.x, &a.xn, &a.q, &a.k, &a.v, &a.att, &a.gate, &a.up, &a.h, &a.xo, &a.ws,
                        &a.moe_out, &a.so, &a.sg, &a.su, &a.sh, &a.qa, &a.qabs, &a.lat, &a.qkv};
    static_assert(sizeof(floats) / sizeof(floats[0]) == kScratch, "one size per buffer, then the scratch");
    size_t i = 0;
    for (float** fp : floats) {
      *fp = reinterpret_cast<float*>(p);
      p += round(sizes[i++]);
    }
    a.ws_bytes = sizes[10];
    a.qscratch = p;
    a.qscratch_bytes = sizes[kScratch];
    p += round(sizes[kScratch]);
    a.moe_ws = p;
    a.moe_ws_bytes = moe_ws;
    const size_t ints = 6 * r + 4 * sq + tb + 2 * pr + 64;
    a.ints.reset();
    a.ints = std::make_shared<GpuAllocation>(m.device_ptr(), ints * sizeof(int32_t), "language model step tables");
    int32_t* n = static_cast<int32_t*>(a.ints->data());
    a.tokens = n;
    a.pos = a.tokens + r;
    a.row_seq = a.pos + r;
    a.out_rows = a.row_seq + r;
    a.meta = a.out_rows + r;  // 3 per sequence
    a.lens = a.meta + 3 * sq;  // per sequence, or per row for MLA (each row its own sequence)
    a.pairs_dev = a.lens + std::max(sq, r);
    a.tables_dev = a.pairs_dev + 2 * pr;
    a.host.resize(ints);
    a.rows = r, a.seqs = sq, a.tables = tb, a.pairs = pr;
    if (c.experts && !a.counts) {
      a.counts = std::make_shared<GpuAllocation>(m.device_ptr(), c.layers * c.experts * sizeof(int32_t),
                                                 "language model expert counts");
      a.counts_host.assign(c.layers * c.experts, 0);
    }
    moved = true;
  }
  if (out > a.out) {
    a.logits.reset();
    a.out = RowClass(out);
    a.logits = std::make_shared<GpuAllocation>(m.device_ptr(), a.out * c.vocab * sizeof(float),
                                               "language model logits of " + std::to_string(a.out) + " rows");
    moved = true;
  }
  if (!moved) return;
  a.graphs.clear();
  const size_t r = a.rows, d = c.embd, qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim, ff = c.ff;
  const size_t f = sizeof(float), sq = a.seqs, tb = a.tables;
  const double hd = static_cast<double>(c.head_dim);
  const double scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  a.embed = Call(ops.embed, "llm_embed", {Arg(embd), Arg(a.tokens, r * 4), Arg(a.x, r * d * f)},
                 {{"type", embd_type}, {"d", static_cast<double>(d)}, {"rows", 0}, {"vocab", static_cast<double>(c.vocab)}});
  a.copy_blocks = Call(ops.copy_blocks, "llm_copy_blocks", {GpuBufferArg{}, Arg(a.pairs_dev, a.pairs * 8)},
                       {{"pairs", 0}, {"blockBytes", 0}, {"blocks", 1}});
  a.layers.resize(layers.size());
  // Layer l's attention input comes quantised from the previous layer's last add (not layer 0's:
  // the embedding goes through a plain norm; not MLA's, whose first products differ).
  const auto QuantisedIn = [&](size_t l) {
    return l > 0 && c.kv_lora == 0 && Quantises(layers[l].qkv.data ? layers[l].qkv : layers[l].q);
  };
  const auto FfnQuantised = [&](const GpuLlmLayer& G) {
    return G.moe ? c.shared_ff > 0 && Quantises(G.gate_shexp) : Quantises(G.gate_up.data ? G.gate_up : G.gate);
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    const GpuLlmLayer& G = layers[l];
    GpuLlmArena::Layer& C = a.layers[l];
    const double layer = static_cast<double>(l), nl = static_cast<double>(c.layers);
    C.attn_norm = Call(ops.rms_norm, "rms_norm", {Arg(a.x, r * d * f), Arg(G.attn_norm), Arg(a.xn, r * d * f)},
                       {{"rows", 0}, {"n", static_cast<double>(d)}, {"eps", c.eps}});
    const std::map<std::string, double> rope{{"rows", 0}, {"dims", hd}, {"base", c.rope_base},
                                             {"freqScale", 1.0f / c.rope_scale}, {"neox", c.neox ? 1 : 0}};
    const std::map<std::string, double> pool{{"blockSize", 0},  {"numBlocks", 1}, {"layers", nl}, {"layer", layer},
                                             {"dtype", 0},      {"seqs", 0},      {"width", 1},   {"headDim", hd},
                                             {"kvHeads", static_cast<double>(c.kv_heads)}};
    if (c.kv_lora > 0) {
      // MLA, absorbed for every row (ops/llm.cc's span form): the cache holds per position the
      // normalised latent and the roped key part; each head's query goes into latent space
      // through uk, every row attends as its own sequence of positions [0, pos] (the MLA decode
      // kernel), and the latent sums come back through uv.
      const size_t heads = c.heads, lr = c.kv_lora, rd = c.rope_dim, nope = c.k_nope, qk = nope + rd, row = c.head_dim;
      const bool yarn = c.yarn_ext_factor != 0.f;
      std::map<std::string, double> mla_rope{{"rows", 0}, {"dims", static_cast<double>(rd)}, {"base", c.rope_base},
                                             {"freqScale", 1.0f / c.rope_scale}, {"neox", c.neox ? 1 : 0}, {"yarn", yarn ? 1 : 0},
                                             {"extFactor", c.yarn_ext_factor}, {"corrLow", c.yarn_corr_low},
                                             {"corrHigh", c.yarn_corr_high}, {"magnitude", c.yarn_magnitude}};
      if (c.q_lora > 0) {
        C.q_a = Product(ops, a, G.q_a, nullptr, a.xn, a.qa, r, false);
        C.kv_a = Product(ops, a, G.kv_a, nullptr, a.xn, a.k, r, Quantises(G.q_a) && Quantises(G.kv_a));
        C.q_a_norm = Call(ops.rms_norm_rows, "llm_rms_norm_rows", {Arg(a.qa, r * c.q_lora * f), Arg(G.q_a_norm), Arg(a.qa, r * c.q_lora * f)},
                          {{"rows", 0}, {"n", static_cast<double>(c.q_lora)}, {"eps", c.eps}});
        C.q_b = Product(ops, a, G.q_b, nullptr, a.qa, a.q, r, false);
      } else {
        C.q = Product(ops, a, G.q, nullptr, a.xn, a.q, r, false);
        C.kv_a = Product(ops, a, G.kv_a, nullptr, a.xn, a.k, r, Quantises(G.q) && Quantises(G.kv_a));
      }
      C.kv_norm = Call(ops.rms_norm_rows, "llm_rms_norm_rows", {Arg(a.k, r * row * f), Arg(G.kv_a_norm), Arg(a.k, r * row * f)},
                       {{"rows", 0}, {"n", static_cast<double>(lr)}, {"ldx", static_cast<double>(row)}, {"ldy", static_cast<double>(row)},
                        {"eps", c.eps}});
      C.rope_k = Call(ops.rope, "rope", {Arg(a.k, r * row * f), Arg(a.pos, r * 4)}, mla_rope);
      C.rope_k.call.params["heads"] = 1;
      C.rope_k.call.params["offset"] = static_cast<double>(lr);
      C.rope_k.call.params["rowStride"] = static_cast<double>(row);
      C.rope_q = Call(ops.rope, "rope", {Arg(a.q, r * heads * qk * f), Arg(a.pos, r * 4)}, mla_rope);
      C.rope_q.call.params["heads"] = static_cast<double>(heads);
      C.rope_q.call.params["offset"] = static_cast<double>(nope);
      C.rope_q.call.params["headStride"] = static_cast<double>(qk);
      C.rope_q.call.params["rowStride"] = static_cast<double>(heads * qk);
      C.store = Call(ops.kv_store, "kv_store",
                     {Arg(a.k, r * row * f), Arg(a.k, r * row * f), GpuBufferArg{}, Arg(a.tables_dev, tb * 4), Arg(a.meta, sq * 12)}, pool);
      C.store.call.params["mla"] = 1;
      const double ldq = static_cast<double>(heads * qk), ldabs = static_cast<double>(heads * row);
      C.absorb = Call(ops.head_matmul, "llm_head_matmul", {Arg(a.q, r * heads * qk * f), Arg(G.uk), Arg(a.qabs, r * heads * row * f)},
                      {{"rows", 0}, {"heads", static_cast<double>(heads)}, {"k", static_cast<double>(nope)}, {"n", static_cast<double>(lr)},
                       {"ldx", ldq}, {"hx", static_cast<double>(qk)}, {"ldy", ldabs}, {"hy", static_cast<double>(row)}});
      C.copy_rope = Call(ops.copy_rows, "llm_copy_rows", {Arg(a.q, r * heads * qk * f), Arg(a.qabs, r * heads * row * f)},
                         {{"rows", 0}, {"heads", static_cast<double>(heads)}, {"count", static_cast<double>(rd)}, {"ldx", ldq},
                          {"hx", static_cast<double>(qk)}, {"ox", static_cast<double>(nope)}, {"ldy", ldabs},
                          {"hy", static_cast<double>(row)}, {"oy", static_cast<double>(lr)}});
      C.mla = Call(ops.mla_decode, "mla_attention_decode",
                   {Arg(a.qabs, r * heads * row * f), GpuBufferArg{}, Arg(a.tables_dev, tb * 4), Arg(a.lens, std::max(sq, r) * 4),
                    Arg(a.lat, r * heads * lr * f), Arg(a.ws, a.ws_bytes)},
                   pool);
      C.mla.call.params["heads"] = static_cast<double>(heads);
      C.mla.call.params["kvLora"] = static_cast<double>(lr);
      C.mla.call.params["ropeDim"] = static_cast<double>(rd);
      C.mla.call.params["scale"] = c.kq_scale;
      C.uv = Call(ops.head_matmul, "llm_head_matmul", {Arg(a.lat, r * heads * lr * f), Arg(G.uv), Arg(a.att, r * heads * c.v_dim * f)},
                  {{"rows", 0}, {"heads", static_cast<double>(heads)}, {"k", static_cast<double>(lr)}, {"n", static_cast<double>(c.v_dim)},
                   {"ldx", static_cast<double>(heads * lr)}, {"hx", static_cast<double>(lr)},
                   {"ldy", static_cast<double>(heads * c.v_dim)}, {"hy", static_cast<double>(c.v_dim)}});
    } else {
      // RoPE of q and k and the K/V rows into the pool, one launch (llm.cu: llm_rope_store), from
      // the joined product's rows or the three products' outputs; the roped q is packed in a.q.
      if (G.qkv.data) {
        const size_t w = qd + 2 * kvd, bytes = r * w * f;
        C.qkv = Product(ops, a, G.qkv, G.qkv_bias, a.xn, a.qkv, r, QuantisedIn(l));
        C.store = Call(ops.rope_store, "llm_rope_store",
                       {Arg(a.qkv, bytes), Arg(a.qkv + qd, bytes - qd * f), Arg(a.qkv + qd + kvd, bytes - (qd + kvd) * f),
                        Arg(a.pos, r * 4), Arg(a.row_seq, r * 4), GpuBufferArg{}, Arg(a.tables_dev, tb * 4), Arg(a.q, r * qd * f)},
                       pool);
        for (const char* ld : {"ldq", "ldk", "ldv"}) C.store.call.params[ld] = static_cast<double>(w);
      } else {
        C.q = Product(ops, a, G.q, G.q_bias, a.xn, a.q, r, QuantisedIn(l));
        C.k = Product(ops, a, G.k, G.k_bias, a.xn, a.k, r, Quantises(G.q) && Quantises(G.k));
        C.v = Product(ops, a, G.v, G.v_bias, a.xn, a.v, r, Quantises(G.k) && Quantises(G.v));
        C.store = Call(ops.rope_store, "llm_rope_store",
                       {Arg(a.q, r * qd * f), Arg(a.k, r * kvd * f), Arg(a.v, r * kvd * f), Arg(a.pos, r * 4), Arg(a.row_seq, r * 4),
                        GpuBufferArg{}, Arg(a.tables_dev, tb * 4)},
                       pool);
      }
      for (const auto& [key, value] : rope) C.store.call.params[key] = value;
      C.store.call.params["heads"] = static_cast<double>(c.heads);
      // With a block-quantised o, the attention's combine also writes its output quantised into
      // the scratch (the QKV product that read it is done).
      C.attn_quantises = AttentionQuantises() && Quantises(G.o) && c.head_dim % kernels::kQuantBlock == 0;
      C.decode = Call(ops.decode, "paged_attention_decode",
                      {Arg(a.q, r * qd * f), GpuBufferArg{}, Arg(a.tables_dev, tb * 4), Arg(a.lens, sq * 4), Arg(a.att, r * qd * f),
                       Arg(a.ws, a.ws_bytes), Arg(a.qscratch, a.qscratch_bytes)}, pool);
      C.decode.call.params["quantize"] = C.attn_quantises ? 1 : 0;
      C.decode.call.params["heads"] = static_cast<double>(c.heads);
      C.decode.call.params["scale"] = scale;
      C.prefill = Call(ops.prefill, "paged_attention_prefill",
                       {Arg(a.q, r * qd * f), GpuBufferArg{}, Arg(a.tables_dev, tb * 4), Arg(a.meta, sq * 12), Arg(a.att, r * qd * f)},
                       pool);
      C.prefill.call.params["heads"] = static_cast<double>(c.heads);
      C.prefill.call.params["scale"] = scale;
    }
    C.o = Product(ops, a, G.o, nullptr, a.att, a.xn, r, false);
    // Each residual add also computes the norm that reads its result next: the FFN's, and the
    // next layer's attention norm (the last layer's add is plain: the output norm reads only the
    // requested rows).
    // With a block-quantised product next, the norm also writes its output quantised into the
    // products' scratch, and that product (with those after it over the same rows) skips the
    // quantiser: FfnQuantised is the FFN's first product, QuantisedIn(l + 1) the next layer's q.
    const bool ffn_q = FfnQuantised(G);
    C.add_attn = Call(ops.add_rms_norm, "llm_add_rms_norm",
                      {Arg(a.x, r * d * f), Arg(a.xn, r * d * f), Arg(G.ffn_norm), Arg(a.xn, r * d * f), Arg(a.qscratch, a.qscratch_bytes)},
                      {{"rows", 0}, {"n", static_cast<double>(d)}, {"eps", c.eps}, {"quantize", ffn_q ? 1 : 0}});
    const auto add_into = [&](float* from) {
      if (l + 1 < layers.size())
        return Call(ops.add_rms_norm, "llm_add_rms_norm",
                    {Arg(a.x, r * d * f), Arg(from, r * d * f), Arg(layers[l + 1].attn_norm), Arg(a.xn, r * d * f),
                     Arg(a.qscratch, a.qscratch_bytes)},
                    {{"rows", 0}, {"n", static_cast<double>(d)}, {"eps", c.eps}, {"quantize", QuantisedIn(l + 1) ? 1 : 0}});
      return Call(ops.add, "llm_add", {Arg(a.x, r * d * f), Arg(from, r * d * f)}, {{"count", 0}});
    };
    const auto add_out = [&](float* from) {
      return Call(ops.add_rms_norm, "llm_add_rms_norm",
                  {Arg(a.x, r * d * f), Arg(from, r * d * f), Arg(output_norm), Arg(a.xn, r * d * f), Arg(a.qscratch, a.qscratch_bytes)},
                  {{"rows", 0}, {"n", static_cast<double>(d)}, {"eps", c.eps}, {"quantize", Quantises(output) ? 1 : 0}});
    };
    C.add_ffn = add_into(a.xn);
    if (l + 1 == layers.size()) C.add_ffn_out = add_out(a.xn);
    C.moe_ffn = G.moe;
    if (G.moe) {
      const size_t e = c.experts, eff = c.expert_ff, sff = c.shared_ff;
      // llama.cpp's build_moe_ffn: Mixtral renormalises the k weights, qwen2moe does not, deepseek2
      // as its expert_weights_norm says (ops/llm.cc).
      const bool renormalize = c.arch == LlmArch::kLlama || (c.arch == LlmArch::kDeepseek2 && c.weights_norm);
      const size_t groups = std::max<size_t>(1, c.expert_groups);
      std::vector<GpuBufferArg> moe_buffers{Arg(a.xn, r * d * f), Arg(G.router), Arg(G.gate_exps), Arg(G.up_exps),
                                            Arg(G.down_exps), Arg(a.moe_out, r * d * f),
                                            Arg(static_cast<int32_t*>(a.counts->data()) + l * e, e * 4), Arg(a.moe_ws, a.moe_ws_bytes)};
      if (G.exp_probs_b) moe_buffers.push_back(Arg(G.exp_probs_b));
      C.moe = Call(ops.moe, "moe", std::move(moe_buffers),
                   {{"tokens", 0}, {"experts", static_cast<double>(e)}, {"k", static_cast<double>(c.experts_used)},
                    {"scoring", c.gating == MoeScoring::kSigmoid ? 1 : 0}, {"renormalize", renormalize ? 1 : 0},
                    {"scale", c.weights_scale}, {"groups", static_cast<double>(groups)},
                    {"groupsUsed", static_cast<double>(groups > 1 ? c.expert_groups_used : 1)}, {"bias", G.exp_probs_b ? 1 : 0},
                    {"dModel", static_cast<double>(d)}, {"dFf", static_cast<double>(eff)},
                    {"weightType", m.experts_bf16() ? 1 : 0}, {"routerType", 0}});
      C.add_moe = add_into(a.moe_out);
      if (l + 1 == layers.size()) C.add_moe_out = add_out(a.moe_out);
      C.shared = sff > 0;
      if (C.shared) {
        C.shared_gate = Product(ops, a, G.gate_shexp, nullptr, a.xn, a.sg, r, ffn_q);
        C.shared_up = Product(ops, a, G.up_shexp, nullptr, a.xn, a.su, r, Quantises(G.gate_shexp) && Quantises(G.up_shexp));
        C.shared_silu = Call(ops.silu_mul, "llm_silu_mul",
                             {Arg(a.sg, r * sff * f), Arg(a.su, r * sff * f), Arg(a.sh, r * sff * f), Arg(a.qscratch, a.qscratch_bytes)},
                             {{"rows", 0}, {"n", static_cast<double>(sff)}, {"quantize", Quantises(G.down_shexp) ? 1 : 0}});
        C.shared_down = Product(ops, a, G.down_shexp, nullptr, a.sh, a.so, r, Quantises(G.down_shexp));
        C.shared_add = Call(ops.gated_add, "llm_gated_add",
                            {Arg(a.moe_out, r * d * f), Arg(a.xn, r * d * f),
                             G.gate_inp_shexp ? Arg(G.gate_inp_shexp) : GpuBufferArg{}, Arg(a.so, r * d * f)},
                            {{"rows", 0}, {"n", static_cast<double>(d)}, {"gated", G.gate_inp_shexp ? 1 : 0}});
      }
      continue;
    }
    C.joined_ffn = G.gate_up.data != nullptr;
    if (C.joined_ffn) {
      C.gate = Product(ops, a, G.gate_up, nullptr, a.xn, a.gate, r, ffn_q);
      C.silu = Call(ops.silu_mul, "llm_silu_mul",
                    {Arg(a.gate, r * 2 * ff * f), Arg(a.gate + ff, (2 * r - 1) * ff * f), Arg(a.h, r * ff * f),
                     Arg(a.qscratch, a.qscratch_bytes)},
                    {{"rows", 0}, {"n", static_cast<double>(ff)}, {"ld", static_cast<double>(2 * ff)},
                     {"quantize", Quantises(G.down) ? 1 : 0}});
    } else {
      C.gate = Product(ops, a, G.gate, nullptr, a.xn, a.gate, r, ffn_q);
      C.up = Product(ops, a, G.up, nullptr, a.xn, a.up, r, Quantises(G.gate) && Quantises(G.up));
      C.silu = Call(ops.silu_mul, "llm_silu_mul",
                    {Arg(a.gate, r * ff * f), Arg(a.up, r * ff * f), Arg(a.h, r * ff * f), Arg(a.qscratch, a.qscratch_bytes)},
                    {{"rows", 0}, {"n", static_cast<double>(ff)}, {"quantize", Quantises(G.down) ? 1 : 0}});
    }
    C.down = Product(ops, a, G.down, nullptr, a.h, a.xn, r, Quantises(G.down));
  }
  a.gather = Call(ops.gather, "llm_gather_rows", {Arg(a.x, r * d * f), Arg(a.out_rows, r * 4), Arg(a.xo, r * d * f)},
                  {{"rows", 0}, {"n", static_cast<double>(d)}, {"xRows", 0}});
  a.out_norm = Call(ops.rms_norm, "rms_norm", {Arg(a.xo, r * d * f), Arg(output_norm), Arg(a.xn, r * d * f)},
                    {{"rows", 0}, {"n", static_cast<double>(d)}, {"eps", c.eps}});
  a.output = Product(ops, a, output, nullptr, a.xn, static_cast<float*>(a.logits ? a.logits->data() : nullptr), a.out, false);
}

// Decode graphs are keyed by the table width and the longest context, which grow by one block and
// one position per step: rounded up to this many positions, one graph serves that many steps (the
// attention kernels take each sequence's true length from its device-side length).
constexpr size_t kGraphPositions = 256;

// The pool's buffer and shape, and the step's sequence count and table width, in a pool op's call.
void BindPool(GpuLlmCall& c, size_t pool_index, const GpuKvPool& kv, size_t seqs, size_t width) {
  c.call.buffers[pool_index] = Arg(kv.data(), kv.bytes());
  std::map<std::string, double>& p = c.call.params;
  p["blockSize"] = static_cast<double>(kv.block_size());
  p["numBlocks"] = static_cast<double>(kv.allocated_blocks());
  p["dtype"] = kv.dtype() == KvDtype::kF16 ? 1 : 0;
  p["seqs"] = static_cast<double>(seqs);
  p["width"] = static_cast<double>(width);
}

}  // namespace

bool GpuLlmModel::Step(GpuKvPool& kv, const KvStep& step, float* logits, const CancelFlag* cancel) const {
  return Run(kv, step, logits, nullptr, cancel);
}

bool GpuLlmModel::StepChain(GpuKvPool& kv, const KvStep& step, const KvChain& chain, const CancelFlag* cancel) const {
  return Run(kv, step, nullptr, &chain, cancel);
}

bool GpuLlmModel::Run(GpuKvPool& kv, const KvStep& step, float* logits, const KvChain* chain, const CancelFlag* cancel) const {
  const size_t steps = chain ? chain->steps : 1;
  int32_t* const chosen = chain ? chain->chosen : nullptr;
  std::shared_ptr<GpuStream> sp = device_->AcquireStream();
  GpuStream& s = *sp;
  const GpuDeviceInfo& dev = device_->info();
  const LlmConfig& c = cfg_;
  const size_t bs = kv.block_size();
  // A chain writes `steps` positions per sequence, from its start on.
  const int64_t last = KvStepLastBlock(bs, steps > 1 ? KvChainView(step, steps) : step);
  if (last >= 0) kv.Reserve(static_cast<size_t>(last), s);
  const size_t n = step.tokens.size(), seqs = step.seqs.size(), pairs = step.copies.size() / 2, out = step.out_rows.size();
  // Every row wants logits, in order (decode): the last add computes the output norm itself.
  bool in_order = out == n && n > 0 && NormInAdd();
  for (size_t i = 0; in_order && i < out; ++i) in_order = step.out_rows[i] == i;
  size_t width = 1, max_tokens = 0, max_len = 1;
  bool decode = true;
  for (const KvStepSequence& q : step.seqs) {
    width = std::max(width, q.table_length);
    max_tokens = std::max(max_tokens, q.tokens);
    max_len = std::max(max_len, q.start + q.tokens + steps - 1);
    decode = decode && q.tokens == 1;
  }
  // Chained steps feed each sequence's chosen token to its next step on the device: one decode row
  // and one logits row per sequence, in order (the binding checks it).
  if (chosen && !(decode && out == n && n == seqs)) throw GpuError(GpuErrc::kInvalidArgument, "chained steps take decode rows only");
  // MLA attends each row as its own sequence of positions [0, pos]: a table and a length per row,
  // after the sequences' tables (which kv_store writes through).
  const bool mla = c.kv_lora > 0;
  GpuStepProfile* profile = GpuStepProfile::Active();
  if (profile) profile->BeginStep(decode, device_);
  const bool graphed = decode && n > 0 && GpuGraphsEnabled() && !(profile && profile->ops());
  const bool timed = profile && !profile->ops() && steps == 1;  // the step profile: whole steps
  const auto wall0 = std::chrono::steady_clock::now();
  double device_ms = -1;
  if (graphed) {
    const size_t unit = std::max<size_t>(1, kGraphPositions / bs);
    width = (width + unit - 1) / unit * unit;
    max_len = std::min((max_len + kGraphPositions - 1) / kGraphPositions * kGraphPositions, width * bs);
  }
  GpuLlmArena& a = kv.arena();
  Fit(*this, *ops_, layers_, output_, embd_, embd_type_, output_norm_, a, std::max<size_t>(n, 1), std::max<size_t>(seqs, 1),
      (std::max<size_t>(seqs, 1) + (mla ? n : 0)) * width, pairs, out);

  // The step's integers, laid out as the arena's regions, in one upload.
  std::vector<int32_t>& h = a.host;
  int32_t* base = static_cast<int32_t*>(a.ints->data());
  const auto at = [&](const int32_t* dev_ptr) { return h.data() + (dev_ptr - base); };
  std::copy(step.tokens.begin(), step.tokens.end(), at(a.tokens));
  for (size_t i = 0; i < out; ++i) at(a.out_rows)[i] = static_cast<int32_t>(step.out_rows[i]);
  std::copy(step.copies.begin(), step.copies.end(), at(a.pairs_dev));
  int32_t* tables = at(a.tables_dev);
  for (size_t si = 0; si < seqs; ++si) {
    const KvStepSequence& q = step.seqs[si];
    for (size_t i = 0; i < q.tokens; ++i) {
      at(a.pos)[q.row0 + i] = static_cast<int32_t>(q.start + i);
      at(a.row_seq)[q.row0 + i] = static_cast<int32_t>(si);
    }
    int32_t* m = at(a.meta) + 3 * si;
    m[0] = static_cast<int32_t>(q.start);
    m[1] = static_cast<int32_t>(q.tokens);
    m[2] = static_cast<int32_t>(q.row0);
    at(a.lens)[si] = static_cast<int32_t>(q.start + q.tokens);
    // Entries past a sequence's table are never read (its positions end before them); 0 keeps
    // them a valid id all the same.
    std::fill(tables + si * width, tables + (si + 1) * width, 0);
    std::copy(step.tables.begin() + static_cast<std::ptrdiff_t>(q.table_offset),
              step.tables.begin() + static_cast<std::ptrdiff_t>(q.table_offset + q.table_length), tables + si * width);
  }
  int32_t* row_tables = tables + seqs * width;
  if (mla) {
    for (size_t si = 0; si < seqs; ++si) {
      const KvStepSequence& q = step.seqs[si];
      for (size_t i = 0; i < q.tokens; ++i) {
        std::copy(tables + si * width, tables + (si + 1) * width, row_tables + (q.row0 + i) * width);
        at(a.lens)[q.row0 + i] = static_cast<int32_t>(q.start + i + 1);
      }
    }
  }
  const size_t used = static_cast<size_t>((row_tables + (mla ? n * width : 0)) - h.data());
  s.Upload(base, h.data(), used * sizeof(int32_t));

  if (pairs) {
    a.copy_blocks.call.buffers[0] = Arg(kv.data(), kv.bytes());
    a.copy_blocks.call.params["pairs"] = static_cast<double>(pairs);
    a.copy_blocks.call.params["blockBytes"] = static_cast<double>(kv.block_bytes());
    a.copy_blocks.call.params["blocks"] = static_cast<double>(kv.allocated_blocks());
    a.copy_blocks.Run(s, dev);
  }
  if (n == 0) {
    s.Synchronize();
    return true;
  }
  const double rows = static_cast<double>(n);
  const size_t d = c.embd;
  // Every launch from the embedding to the logits; false when cancelled between layers (never
  // while capturing: a replay is checked before it starts).
  const auto body = [&](bool capturing) -> bool {
  a.embed.call.params["rows"] = rows;
  a.embed.Run(s, dev);
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (!capturing && cancel && cancel->load()) return false;
    GpuLlmArena::Layer& C = a.layers[l];
    if (l == 0) {  // later layers' attention norms ran with the previous layer's last add
      C.attn_norm.call.params["rows"] = rows;
      C.attn_norm.Run(s, dev);
    }
    if (mla) {
      if (c.q_lora > 0) {
        RunProduct(C.q_a, n, s, dev);
        RunProduct(C.kv_a, n, s, dev);
        C.q_a_norm.call.params["rows"] = rows;
        C.q_a_norm.Run(s, dev);
        RunProduct(C.q_b, n, s, dev);
      } else {
        RunProduct(C.q, n, s, dev);
        RunProduct(C.kv_a, n, s, dev);
      }
      for (GpuLlmCall* call : {&C.kv_norm, &C.rope_k, &C.rope_q}) {
        call->call.params["rows"] = rows;
        call->Run(s, dev);
      }
      // Every row's cache entry is in its block before any row attends.
      BindPool(C.store, 2, kv, seqs, width);
      C.store.call.params["rows"] = rows;
      C.store.call.params["maxTokens"] = static_cast<double>(max_tokens);
      C.store.Run(s, dev);
      C.absorb.call.params["rows"] = rows;
      C.absorb.Run(s, dev);
      C.copy_rope.call.params["rows"] = rows;
      C.copy_rope.Run(s, dev);
      BindPool(C.mla, 1, kv, n, width);
      C.mla.call.buffers[2] = Arg(a.tables_dev + seqs * width, n * width * sizeof(int32_t));
      C.mla.call.params["maxLen"] = static_cast<double>(max_len);
      C.mla.Run(s, dev);
      C.uv.call.params["rows"] = rows;
      C.uv.Run(s, dev);
    } else {
      if (layers_[l].qkv.data) {
        RunProduct(C.qkv, n, s, dev);
      } else {
        RunProduct(C.q, n, s, dev);
        RunProduct(C.k, n, s, dev);
        RunProduct(C.v, n, s, dev);
      }
      // Every row's K/V is in its block before any row attends (a sequence's later rows read its
      // earlier rows of this step).
      BindPool(C.store, 5, kv, seqs, width);
      C.store.call.params["rows"] = rows;
      C.store.Run(s, dev);
      if (decode) {
        BindPool(C.decode, 1, kv, seqs, width);
        C.decode.call.params["maxLen"] = static_cast<double>(max_len);
        C.decode.Run(s, dev);
      } else {
        BindPool(C.prefill, 1, kv, seqs, width);
        C.prefill.call.params["rows"] = rows;
        C.prefill.call.params["maxTokens"] = static_cast<double>(max_tokens);
        C.prefill.Run(s, dev);
      }
    }
    if (C.attn_quantises) C.o.mm.call.params["reuse"] = decode ? 1 : 0;
    RunProduct(C.o, n, s, dev);
    C.add_attn.call.params["rows"] = rows;
    C.add_attn.Run(s, dev);
    if (C.moe_ffn) {
      C.moe.call.params["tokens"] = rows;
      C.moe.Run(s, dev);
      if (C.shared) {
        RunProduct(C.shared_gate, n, s, dev);
        RunProduct(C.shared_up, n, s, dev);
        C.shared_silu.call.params["rows"] = rows;
        C.shared_silu.Run(s, dev);
        RunProduct(C.shared_down, n, s, dev);
        C.shared_add.call.params["rows"] = rows;
        C.shared_add.Run(s, dev);
      }
      GpuLlmCall& add_moe = in_order && l + 1 == layers_.size() ? C.add_moe_out : C.add_moe;
      add_moe.call.params["rows"] = rows;
      add_moe.call.params["count"] = static_cast<double>(n * d);
      add_moe.Run(s, dev);
      continue;
    }
    RunProduct(C.gate, n, s, dev);
    if (!C.joined_ffn) RunProduct(C.up, n, s, dev);
    C.silu.call.params["rows"] = rows;
    C.silu.Run(s, dev);
    RunProduct(C.down, n, s, dev);
    GpuLlmCall& add_ffn = in_order && l + 1 == layers_.size() ? C.add_ffn_out : C.add_ffn;
    add_ffn.call.params["rows"] = rows;
    add_ffn.call.params["count"] = static_cast<double>(n * d);
    add_ffn.Run(s, dev);
  }
  // Only the requested rows reach the output norm and the vocabulary product.
  if (out > 0) {
    if (!in_order) {
      a.gather.call.params["rows"] = static_cast<double>(out);
      a.gather.call.params["xRows"] = rows;
      a.gather.Run(s, dev);
      a.out_norm.call.params["rows"] = static_cast<double>(out);
      a.out_norm.Run(s, dev);
    }
    if (Quantises(output_)) a.output.mm.call.params["reuse"] = in_order ? 1 : 0;
    RunProduct(a.output, out, s, dev);
  }
  return true;
  };

  GpuGraph* graph = nullptr;
  if (graphed && a.capturable) {
    const GpuLlmArena::GraphKey key{n, seqs, out, width, max_len, kv.data(), kv.allocated_blocks(), in_order};
    auto found = std::find_if(a.graphs.begin(), a.graphs.end(), [&](const auto& g) { return g.first == key; });
    if (found != a.graphs.end()) {
      graph = found->second.get();
    } else {
      try {
        std::unique_ptr<GpuGraph> g = CaptureGraph(s, [&] { body(true); });
        // A few shapes at a time (batch sizes in flight); the oldest goes first.
        constexpr size_t kMaxGraphs = 8;
        if (a.graphs.size() >= kMaxGraphs) a.graphs.erase(a.graphs.begin());
        a.graphs.emplace_back(key, std::move(g));
        graph = a.graphs.back().second.get();
      } catch (const GpuError&) {
        a.capturable = false;  // launched one by one below, where a real failure rethrows
      }
    }
  }
  // A buffer of the arena's holding at least `bytes` (grown by powers of two).
  const auto fit = [&](std::shared_ptr<GpuAllocation>& buf, size_t bytes, const char* what) {
    if (!buf || buf->bytes() < bytes) buf = std::make_shared<GpuAllocation>(device_, RowClass(bytes), what);
  };
  GpuLlmCall next;
  const bool sampled = chain && chain->params;
  if (chosen) {
    fit(a.chosen, steps * seqs * sizeof(int32_t), "chosen tokens of chained steps");
    std::vector<GpuBufferArg> bufs = {Arg(a.logits), Arg(a.tokens, seqs * 4), Arg(a.pos, seqs * 4), Arg(a.meta, 3 * seqs * 4),
                                      Arg(a.lens, seqs * 4), Arg(a.chosen)};
    if (sampled) {
      fit(a.chain_params, seqs * 4 * sizeof(double), "sampling parameters of chained steps");
      fit(a.chain_rng, seqs * 4 * sizeof(uint32_t), "random states of chained steps");
      fit(a.chain_rng_out, steps * seqs * 4 * sizeof(uint32_t), "random states after each chained step");
      s.Upload(a.chain_params->data(), chain->params, seqs * 4 * sizeof(double));
      s.Upload(a.chain_rng->data(), chain->rng, seqs * 4 * sizeof(uint32_t));
      bufs.insert(bufs.end(), {Arg(a.chain_params), Arg(a.chain_rng), Arg(a.chain_rng_out)});
    }
    next = Call(ops_->chain_next, "llm_chain_next", std::move(bufs),
                {{"seqs", static_cast<double>(seqs)}, {"vocab", static_cast<double>(c.vocab)}, {"step", 0}, {"sample", sampled ? 1 : 0}});
  }
  // MoE counts are per step: a chain takes each step's before the next overwrites them.
  const auto take_counts = [&] {
    s.Download(a.counts_host.data(), a.counts->data(), a.counts_host.size() * sizeof(int32_t));
    s.Synchronize();
    // Dense leading layers route nothing (the op never ran for them: their counts stay 0).
    std::vector<uint64_t>& counts = kv.expert_counts();
    for (size_t l = 0; l < layers_.size(); ++l)
      if (layers_[l].moe)
        for (size_t e = 0; e < c.experts; ++e) counts[l * c.experts + e] += static_cast<uint64_t>(a.counts_host[l * c.experts + e]);
  };
  // The steps queue back to back; the host waits only for MoE counts, at the end, and after every
  // kChainQueue steps, so that a long chain's cancellation stops it within that many steps (checked
  // as they are queued, which runs far ahead of the device otherwise).
  constexpr size_t kChainQueue = 64;
  for (size_t j = 0; j < steps; ++j) {
    if (j > 0 && j % kChainQueue == 0) s.Synchronize();
    if (graph) {
      if (cancel && cancel->load()) {
        s.Synchronize();
        return false;
      }
      if (timed) s.MarkStart();
      graph->Replay(s);
      if (timed) device_ms = s.MarkStopMs();
    } else {
      if (timed) s.MarkStart();
      if (!body(false)) {
        s.Synchronize();
        return false;
      }
      if (timed) device_ms = s.MarkStopMs();
    }
    if (chosen) {
      next.call.params["step"] = static_cast<double>(j);
      next.Run(s, dev);
    }
    if (c.experts && j + 1 < steps) take_counts();
  }
  if (logits && out > 0) s.Download(logits, a.logits->data(), out * c.vocab * sizeof(float));
  if (chosen) s.Download(chosen, a.chosen->data(), steps * seqs * sizeof(int32_t));
  if (sampled) s.Download(chain->rng_out, a.chain_rng_out->data(), steps * seqs * 4 * sizeof(uint32_t));
  if (c.experts) take_counts();
  s.Synchronize();
  if (timed)
    profile->StepTimes(device_ms, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - wall0).count());
  return true;
}

}  // namespace sonde
