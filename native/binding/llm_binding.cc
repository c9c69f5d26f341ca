// Bindings of the native transformer (ops/llm.h) and its paged KV pool (ops/kv_pool.h), wrapped by
// lib/llm/transformer.ts:
//   llmModelCreate(gguf, config, tensorIndices) -> LlmModelHandle      (sync: checks shapes only)
//   llmModelPrepare(model, threads) -> Promise<void>                  (the load's pool work: repacking)
//   kvPoolCreate(model, blockSize, maxBlocks, dtype, reserveBlocks) -> KvPoolHandle
//   kvPoolStep(model, pool, tokens, meta, tables, copies, logits, threads, cancel?) -> Promise<void>
//   kvPoolStepChain(model, pool, tokens, meta, tables, copies, steps, chosen, params, rng, rngOut, threads,
//                   cancel?) -> Promise<void>
//   kvPoolRead(pool, ids, out) / kvPoolWrite(pool, ids, bytes) -> Promise<void>
//   kvAttention(q, k, v, headDim, n, span, dtype, variant) -> Promise<Float32Array>  (kernel tests)
// A job holds the model (and with it the mapping) and the pool, so disposing either while a step
// runs frees them when it finishes. Chunks of the pool are allocated here, on the JS thread, before
// a job starts (so they can be reported to V8); a job only reads and writes allocated blocks.
#include <napi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gguf_binding.h"
#include "binding/llm_binding.h"
#include "binding/shared_handle.h"
#include "kernels/attention/attention.h"
#include "ops/chain_sampling.h"
#include "ops/elementwise.h"
#include "ops/kv_pool.h"
#include "ops/llm.h"
#include "runtime/cpu.h"

namespace sonde {

void Describe(Napi::Object& o, const LlmModel& m) {
  o.Set("bytes", static_cast<double>(m.bytes()));
  o.Set("layers", static_cast<double>(m.config().layers));
}


size_t ChainSteps(const Napi::CallbackInfo& info, size_t first, const char* where) {
  const double steps = info.Length() > first && info[first].IsNumber() ? info[first].As<Napi::Number>().DoubleValue() : 0;
  if (!(steps >= 1 && steps <= 65536 && steps == static_cast<double>(static_cast<int64_t>(steps))))
    throw MakeError(info.Env(), codes::kInvalidArgument, std::string(where) + ": steps must be an integer in [1, 65536]");
  return static_cast<size_t>(steps);
}

KvChain UnpackChainArgs(const Napi::CallbackInfo& info, size_t first, const char* where, const KvStep& st, size_t vocab,
                        size_t steps) {
  Napi::Env env = info.Env();
  const auto typed = [&](size_t i, napi_typedarray_type type) {
    return info.Length() > i && info[i].IsTypedArray() && info[i].As<Napi::TypedArray>().TypedArrayType() == type;
  };
  const bool sampled = typed(first + 2, napi_float64_array);
  if (!typed(first + 1, napi_int32_array) ||
      (sampled ? !typed(first + 3, napi_uint32_array) || !typed(first + 4, napi_uint32_array)
               : info.Length() <= first + 4 || !info[first + 2].IsNull() || !info[first + 3].IsNull() || !info[first + 4].IsNull()))
    throw MakeError(env, codes::kInvalidArgument,
                    std::string(where) + ": expected (..., steps: number, chosen: Int32Array, params: Float64Array | null, rng: "
                                         "Uint32Array | null, rngOut: Uint32Array | null, ...)");
  KvChain a;
  a.steps = steps;
  const size_t seqs = st.seqs.size();
  for (size_t i = 0; i < seqs; ++i)
    if (st.seqs[i].tokens != 1 || st.out_rows.size() != seqs || st.out_rows[i] != i)
      throw MakeError(env, codes::kInvalidArgument,
                      std::string(where) + ": sequences[" + std::to_string(i) + "] must be one decode token whose logits are wanted ('last')");
  const auto sized = [&](size_t i, size_t want, const char* name) {
    const size_t got = info[i].As<Napi::TypedArray>().ElementLength();
    if (got != want)
      throw MakeError(env, codes::kInvalidArgument,
                      std::string(where) + ": " + name + " must hold " + std::to_string(want) + " values, got " + std::to_string(got));
  };
  sized(first + 1, a.steps * seqs, "chosen (steps x sequences)");
  a.chosen = info[first + 1].As<Napi::Int32Array>().Data();
  if (!sampled) return a;
  sized(first + 2, seqs * 4, "params (sequences x 4)");
  sized(first + 3, seqs * 4, "rng (sequences x 4)");
  sized(first + 4, a.steps * seqs * 4, "rngOut (steps x sequences x 4)");
  const double* p = info[first + 2].As<Napi::Float64Array>().Data();
  for (size_t i = 0; i < seqs; ++i) {
    const double t = p[4 * i], k = p[4 * i + 1], top_p = p[4 * i + 2], min_logit = p[4 * i + 3];
    const std::string at = std::string(where) + ": params of sequences[" + std::to_string(i) + "]";
    if (!std::isfinite(t)) throw MakeError(env, codes::kInvalidArgument, at + ": temperature must be finite");
    if (t <= 0) continue;  // argmax
    if (!(k >= 1 && k <= static_cast<double>(kChainTopK) && k < static_cast<double>(vocab) &&
          k == static_cast<double>(static_cast<int64_t>(k))))
      throw MakeError(env, codes::kInvalidArgument, at + ": top-k must be an integer in [1, 64] below the vocabulary");
    if (!(top_p > 0 && top_p <= 1)) throw MakeError(env, codes::kInvalidArgument, at + ": top-p must be in (0, 1]");
    if (!(min_logit <= 0)) throw MakeError(env, codes::kInvalidArgument, at + ": log(min-p) must be <= 0 or -Infinity");
  }
  a.params = p;
  a.rng = info[first + 3].As<Napi::Uint32Array>().Data();
  a.rng_out = info[first + 4].As<Napi::Uint32Array>().Data();
  return a;
}

void UnpackKvStep(Napi::Env env, Napi::Int32Array tokens, Napi::Int32Array meta, Napi::Int32Array tables, Napi::Int32Array copies,
                  KvStep* st) {
  // meta: per sequence [tableLength, start, tokenCount, logits (0 none, 1 last, 2 all)].
  if (meta.ElementLength() % 4) throw MakeError(env, codes::kInvalidArgument, "kvPoolStep: meta must hold 4 values per sequence");
  st->tokens.assign(tokens.Data(), tokens.Data() + tokens.ElementLength());
  st->tables.assign(tables.Data(), tables.Data() + tables.ElementLength());
  st->copies.assign(copies.Data(), copies.Data() + copies.ElementLength());
  const size_t seqs = meta.ElementLength() / 4;
  st->seqs.resize(seqs);
  size_t table = 0, row = 0;
  for (size_t s = 0; s < seqs; ++s) {
    const int32_t* m = meta.Data() + 4 * s;
    if (m[0] < 0 || m[1] < 0 || m[2] < 0 || m[3] < 0 || m[3] > 2)
      throw MakeError(env, codes::kInvalidArgument, "kvPoolStep: meta of sequences[" + std::to_string(s) + "] is invalid");
    KvStepSequence& q = st->seqs[s];
    q.table_offset = table;
    q.table_length = static_cast<size_t>(m[0]);
    q.start = static_cast<size_t>(m[1]);
    q.tokens = static_cast<size_t>(m[2]);
    q.row0 = row;
    table += q.table_length;
    row += q.tokens;
    if (m[3] == 1 && q.tokens) st->out_rows.push_back(static_cast<uint32_t>(row - 1));
    if (m[3] == 2)
      for (size_t i = q.row0; i < row; ++i) st->out_rows.push_back(static_cast<uint32_t>(i));
  }
  if (table != st->tables.size()) throw MakeError(env, codes::kInvalidArgument, "kvPoolStep: tables must hold every sequence's table");
}

namespace {

using LlmModelHandle = SharedHandle<LlmModel>;
constexpr const char* kModelClass = "LlmModelHandle";

class KvPoolHandle : public Napi::ObjectWrap<KvPoolHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "KvPoolHandle", {
        InstanceMethod("dispose", &KvPoolHandle::Dispose),
        InstanceMethod("info", &KvPoolHandle::Info),
    });
  }
  explicit KvPoolHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<KvPoolHandle>(info) {}
  ~KvPoolHandle() override { reported_.ReleaseInFinalizer(Env()); }
  // Allocates the chunks up to block `last` and reports what the pool holds, its step arena
  // included: called as every job starts, so the arena's growth in earlier steps is reported too
  // (a job never runs while this reads the arena). Throws an OutOfMemory error.
  void Reserve(Napi::Env env, int64_t last, const char* where) {
    try {
      if (last >= 0) pool->Reserve(static_cast<size_t>(last));
    } catch (const std::bad_alloc&) {
      Report(env);
      throw MakeError(env, codes::kOutOfMemory, std::string(where) + ": cannot allocate KV blocks up to id " +
                                                    std::to_string(last) + " (" + std::to_string(pool->bytes()) +
                                                    " bytes held)");
    }
    Report(env);
  }
  std::shared_ptr<KvPool> pool;
  const LlmModel* owner = nullptr;  // the model whose shapes the blocks have

 private:
  void Report(Napi::Env env) {
    reported_.Set(env, static_cast<int64_t>(pool->HeldBytes()));
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    pool.reset();
    reported_.Release(info.Env());
    return info.Env().Undefined();
  }
  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("disposed", !pool);
    if (pool) {
      o.Set("bytes", static_cast<double>(pool->bytes()));
      o.Set("highWaterBytes", static_cast<double>(pool->high_water_bytes()));
      o.Set("blockBytes", static_cast<double>(pool->block_bytes()));
      o.Set("chunkBlocks", static_cast<double>(pool->chunk_blocks()));
      o.Set("allocatedBlocks", static_cast<double>(pool->allocated_blocks()));
      // The arena only at rest: a running step may be growing it.
      if (!pool->busy.load()) o.Set("arenaBytes", static_cast<double>(pool->arena().Bytes()));
      o.Set("reportedBytes", static_cast<double>(reported_.bytes()));
      const std::vector<uint64_t>& counts = pool->expert_counts();
      if (!counts.empty()) {
        Napi::Float64Array a = Napi::Float64Array::New(info.Env(), counts.size());
        for (size_t i = 0; i < counts.size(); ++i) a[i] = static_cast<double>(counts[i]);
        o.Set("expertCounts", a);
      }
    }
    return o;
  }
  ReportedMemory reported_;
};

size_t SizeField(Napi::Env env, Napi::Object o, const char* name) {
  Napi::Value v = o.Get(name);
  const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 4294967295.0) || d != static_cast<double>(static_cast<size_t>(d)))
    throw MakeError(env, codes::kInvalidArgument, std::string("llmModelCreate: config.") + name + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

float FloatField(Napi::Env env, Napi::Object o, const char* name) {
  Napi::Value v = o.Get(name);
  if (!v.IsNumber()) throw MakeError(env, codes::kInvalidArgument, std::string("llmModelCreate: config.") + name + " must be a number");
  return v.As<Napi::Number>().FloatValue();
}

Napi::Value LlmModelCreate(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[1].IsObject() || !info[2].IsTypedArray() ||
      info[2].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw MakeError(env, codes::kInvalidArgument, "llmModelCreate: expected (gguf, config, tensorIndices: Int32Array)");
  std::shared_ptr<const GgufFile> file = UnwrapGgufHandle(addon, info[0], "llmModelCreate");
  Napi::Object o = info[1].As<Napi::Object>();
  LlmConfig c;
  const std::string arch = o.Get("architecture").ToString();
  if (arch == "llama") c.arch = LlmArch::kLlama;
  else if (arch == "qwen2") c.arch = LlmArch::kQwen2;
  else if (arch == "qwen2moe") c.arch = LlmArch::kQwen2Moe;
  else if (arch == "deepseek2") c.arch = LlmArch::kDeepseek2;
  else throw MakeError(env, codes::kUnsupportedOperator, "llmModelCreate: unsupported architecture '" + arch + "'");
  c.vocab = SizeField(env, o, "vocabSize");
  c.context = SizeField(env, o, "contextLength");
  c.embd = SizeField(env, o, "embeddingLength");
  c.layers = SizeField(env, o, "blockCount");
  c.heads = SizeField(env, o, "headCount");
  c.kv_heads = SizeField(env, o, "headCountKv");
  c.head_dim = SizeField(env, o, "headDim");
  c.ff = SizeField(env, o, "feedForwardLength");
  c.eps = FloatField(env, o, "rmsEpsilon");
  c.rope_base = FloatField(env, o, "ropeFreqBase");
  c.rope_scale = FloatField(env, o, "ropeScale");
  c.neox = o.Get("ropeNeox").ToBoolean();
  c.experts = SizeField(env, o, "expertCount");
  c.experts_used = SizeField(env, o, "expertUsedCount");
  c.expert_ff = SizeField(env, o, "expertFeedForwardLength");
  c.shared_ff = SizeField(env, o, "sharedExpertFeedForwardLength");
  // deepseek2's routing and attention (lib/llm/engine.ts: ModelConfig.routing, .mla); absent for
  // the other architectures.
  Napi::Value routing = o.Get("routing");
  if (routing.IsObject()) {
    Napi::Object ro = routing.As<Napi::Object>();
    const std::string gating = ro.Get("gating").ToString();
    if (gating == "softmax") c.gating = MoeScoring::kSoftmax;
    else if (gating == "sigmoid") c.gating = MoeScoring::kSigmoid;
    else throw MakeError(env, codes::kInvalidArgument, "llmModelCreate: config.routing.gating must be 'softmax' or 'sigmoid'");
    c.weights_norm = ro.Get("weightsNorm").ToBoolean();
    c.weights_scale = FloatField(env, ro, "weightsScale");
    c.expert_groups = SizeField(env, ro, "groupCount");
    c.expert_groups_used = SizeField(env, ro, "groupUsedCount");
    c.dense_lead = SizeField(env, ro, "leadingDenseBlockCount");
  }
  Napi::Value mla = o.Get("mla");
  if (mla.IsObject()) {
    Napi::Object mo = mla.As<Napi::Object>();
    c.q_lora = SizeField(env, mo, "qLoraRank");
    c.kv_lora = SizeField(env, mo, "kvLoraRank");
    c.rope_dim = SizeField(env, mo, "ropeDim");
    c.k_nope = SizeField(env, mo, "keyNopeLength");
    c.v_dim = SizeField(env, mo, "valueLength");
    c.kq_scale = FloatField(env, mo, "attentionScale");
  }
  Napi::Value yarn = o.Get("ropeYarn");
  if (yarn.IsObject()) {
    // ggml_rope_yarn_corr_dims, in fp32 as ggml computes them.
    Napi::Object yo = yarn.As<Napi::Object>();
    const float n_dims = static_cast<float>(c.kv_lora > 0 ? c.rope_dim : c.head_dim);
    const float orig = static_cast<float>(SizeField(env, yo, "originalContextLength"));
    const float beta_fast = FloatField(env, yo, "betaFast"), beta_slow = FloatField(env, yo, "betaSlow");
    const float pi2 = 2.0f * 3.14159265358979323846f;
    const float start = std::floor(n_dims * std::log(orig / (beta_fast * pi2)) / (2.0f * std::log(c.rope_base)));
    const float end = std::ceil(n_dims * std::log(orig / (beta_slow * pi2)) / (2.0f * std::log(c.rope_base)));
    c.yarn_ext_factor = 1.0f;
    c.yarn_corr_low = std::max(0.0f, start);
    c.yarn_corr_high = std::min(n_dims - 1.0f, end);
    c.yarn_magnitude = FloatField(env, yo, "magnitude");
  }
  Napi::Value variant = o.Get("variant");
  if (!variant.IsUndefined()) {
    const std::string name = variant.ToString();
    if ((name != "auto" && name != "scalar" && name != "avx2" && name != "avx512") || !ParseQuantVariant(name, &c.variant))
      throw MakeError(env, codes::kInvalidArgument, "llmModelCreate: variant must be 'auto', 'scalar', 'avx2' or 'avx512'");
    bool not_for_type;
    const std::string why = QuantVariantUnavailable(kernels::kQuantF32, c.variant, &not_for_type);
    if (!why.empty()) throw MakeError(env, codes::kDeviceUnavailable, "llmModelCreate: variant: " + why);
  }
  if (!(c.eps > 0) || !(c.rope_base > 0) || !(c.rope_scale > 0))
    throw MakeError(env, codes::kInvalidArgument, "llmModelCreate: rmsEpsilon, ropeFreqBase and ropeScale must be positive");
  Napi::Int32Array idx = info[2].As<Napi::Int32Array>();
  std::vector<int32_t> indices(idx.Data(), idx.Data() + idx.ElementLength());
  std::string error;
  bool unsupported = false;
  std::shared_ptr<const LlmModel> model = LlmModel::Create(file, c, indices, &error, &unsupported);
  if (!model) throw MakeError(env, unsupported ? codes::kUnsupportedOperator : codes::kModelFormat, error);
  return LlmModelHandle::Wrap(env, addon, kModelClass, std::move(model));
}

}  // namespace

std::shared_ptr<const LlmModel> UnwrapLlmModel(Addon& addon, Napi::Value v, const char* where) {
  if (!LlmModelHandle::Is(addon, kModelClass, v))
    throw MakeError(v.Env(), codes::kInvalidArgument, std::string(where) + ": expected a model handle");
  std::shared_ptr<const LlmModel> m = LlmModelHandle::Get(v);
  if (!m) throw MakeError(v.Env(), codes::kDisposed, std::string(where) + ": the model has been disposed");
  return m;
}

namespace {

std::shared_ptr<const LlmModel> UnwrapModel(Addon& addon, Napi::Value v, const char* where) {
  return UnwrapLlmModel(addon, v, where);
}

bool IsInt32Array(Napi::Value v) {
  return v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_int32_array;
}

double NumberArg(const Napi::CallbackInfo& info, size_t i) {
  return info.Length() > i && info[i].IsNumber() ? info[i].As<Napi::Number>().DoubleValue() : -1;
}

bool IsInteger(double d, double lo, double hi) {
  return d >= lo && d <= hi && d == static_cast<double>(static_cast<int64_t>(d));
}

Napi::Value KvPoolCreate(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "kvPoolCreate";
  std::shared_ptr<const LlmModel> model = UnwrapModel(addon, info[0], where);
  const double block_size = NumberArg(info, 1), max_blocks = NumberArg(info, 2), reserve = NumberArg(info, 4);
  if (!IsInteger(block_size, 1, 16777216))
    throw MakeError(env, codes::kInvalidArgument, "kvPoolCreate: blockSize must be an integer in [1, 2^24]");
  if (!IsInteger(max_blocks, 1, 2147483647))
    throw MakeError(env, codes::kInvalidArgument, "kvPoolCreate: maxBlocks must be an integer in [1, 2^31 - 1]");
  if (!IsInteger(reserve, 0, max_blocks))
    throw MakeError(env, codes::kInvalidArgument, "kvPoolCreate: reserveBlocks must be an integer in [0, maxBlocks]");
  const std::string dtype = info.Length() > 3 && info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "";
  if (dtype != "f32" && dtype != "f16") throw MakeError(env, codes::kInvalidArgument, "kvPoolCreate: dtype must be 'f32' or 'f16'");
  const LlmConfig& c = model->config();
  const KvCacheShape shape = KvCacheShapeOf(c);
  const double block_bytes = 1.0 * c.layers * shape.streams * shape.row_width * block_size * (dtype == "f16" ? 2 : 4);
  // 2^50 bytes: beyond any machine, and far below where size_t arithmetic on it could wrap.
  if (block_bytes * max_blocks > 1125899906842624.0)
    throw MakeError(env, codes::kInvalidArgument, "kvPoolCreate: maxBlocks * blockBytes is beyond any memory");
  auto handle = addon.Class("KvPoolHandle").New({});
  KvPoolHandle* h = KvPoolHandle::Unwrap(handle);
  try {
    h->pool = std::make_shared<KvPool>(c, static_cast<size_t>(block_size), static_cast<size_t>(max_blocks),
                                       dtype == "f16" ? KvDtype::kF16 : KvDtype::kF32);
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "kvPoolCreate: cannot allocate the block table");
  }
  h->owner = model.get();
  h->Reserve(env, static_cast<int64_t>(reserve) - 1, where);
  return handle;
}

class PrepareJob : public AsyncJob {
 public:
  std::shared_ptr<const LlmModel> model;  // kept: the model's handle, Kept(0)
  void Execute(Addon& addon) override { model->Prepare(addon.pool(), threads); }
  Napi::Value Result(Napi::Env env) override {
    // The repacked weights are the model's own memory now.
    LlmModelHandle::ReportBytes(env, Kept(0));
    return env.Undefined();
  }
};

Napi::Value LlmModelPrepare(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto job = std::make_unique<PrepareJob>();
  job->model = UnwrapModel(addon, info[0], "llmModelPrepare");
  job->Keep(info[0]);
  const double threads = NumberArg(info, 1);
  if (!IsInteger(threads, 0, 1024)) throw MakeError(env, codes::kInvalidArgument, "llmModelPrepare: threads must be an integer in [0, 1024]");
  job->threads = static_cast<unsigned>(threads);
  return addon.Start(env, std::move(job));
}

KvPoolHandle* UnwrapPool(Addon& addon, Napi::Value v, const char* where) {
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(addon.Class("KvPoolHandle").Value()))
    throw MakeError(v.Env(), codes::kInvalidArgument, std::string(where) + ": expected a KV pool handle");
  KvPoolHandle* h = KvPoolHandle::Unwrap(v.As<Napi::Object>());
  if (!h->pool) throw MakeError(v.Env(), codes::kDisposed, std::string(where) + ": the KV pool has been disposed");
  return h;
}

// Marks the pool busy for one job; the job clears it when it ends, whichever way.
struct PoolJob : public AsyncJob {
  std::shared_ptr<KvPool> pool;
  void Claim(Napi::Env env, const char* where) {
    bool expected = false;
    if (!pool->busy.compare_exchange_strong(expected, true))
      throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": another job is running on this KV pool");
  }
  struct Release {
    KvPool* p;
    ~Release() { p->busy.store(false); }
  };
};

class StepJob : public PoolJob {
 public:
  std::shared_ptr<const LlmModel> model;
  KvStep step;
  float* logits = nullptr;
  void Execute(Addon& addon) override {
    Release release{pool.get()};
    if (!RunStep(*model, *pool, step, logits, addon.pool(), threads, cancel.get())) Fail(codes::kAborted, "kvPoolStep: aborted");
  }
};

// The start both step bindings share: (model, pool, tokens, meta, tables, copies, ...) unwrapped
// into the job's model, pool and step.
template <typename Job>
KvPoolHandle* UnpackPoolStep(Addon& addon, const Napi::CallbackInfo& info, const char* where, Job* job) {
  Napi::Env env = info.Env();
  job->model = UnwrapModel(addon, info[0], where);
  // A model created without llmModelPrepare repacks in its first step: report it at the next.
  LlmModelHandle::ReportBytes(env, info[0]);
  KvPoolHandle* h = UnwrapPool(addon, info[1], where);
  if (h->owner != job->model.get()) throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": the pool belongs to another model");
  job->pool = h->pool;
  UnpackKvStep(env, info[2].As<Napi::Int32Array>(), info[3].As<Napi::Int32Array>(), info[4].As<Napi::Int32Array>(),
               info[5].As<Napi::Int32Array>(), &job->step);
  return h;
}

// The end they share: threads and cancel at info[threads_index..], the pool claimed, the blocks
// the step writes (`written`, the whole chain's for one) allocated, releasing the claim if that
// fails, and the output at info[out_index] kept alive.
Napi::Value StartPoolStep(Addon& addon, const Napi::CallbackInfo& info, const char* where, std::unique_ptr<PoolJob> job,
                          KvPoolHandle* h, const KvStep& written, size_t threads_index, size_t out_index) {
  Napi::Env env = info.Env();
  job->threads = info[threads_index].IsNumber() ? info[threads_index].As<Napi::Number>().Uint32Value() : 0;
  if (info.Length() > threads_index + 1) addon.AttachCancel(info[threads_index + 1], job.get());
  job->Claim(env, where);
  try {
    h->Reserve(env, KvStepLastBlock(*job->pool, written), where);
  } catch (...) {
    job->pool->busy.store(false);
    throw;
  }
  job->Keep(info[out_index]);
  return addon.Start(env, std::move(job));
}

Napi::Value KvPoolStep(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "kvPoolStep";
  if (info.Length() < 8 || !IsInt32Array(info[2]) || !IsInt32Array(info[3]) || !IsInt32Array(info[4]) ||
      !IsInt32Array(info[5]) || !info[6].IsTypedArray() || info[6].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw MakeError(env, codes::kInvalidArgument,
                    "kvPoolStep: expected (model, pool, tokens, meta, tables, copies: Int32Array, logits: Float32Array, threads, cancel?)");
  auto job = std::make_unique<StepJob>();
  KvPoolHandle* h = UnpackPoolStep(addon, info, where, job.get());
  const KvStep& st = job->step;
  const LlmConfig& c = job->model->config();
  const std::string why = ValidateKvStep(*job->pool, c.vocab, st);
  if (!why.empty()) throw MakeError(env, codes::kInvalidArgument, "kvPoolStep: " + why);
  Napi::Float32Array out = info[6].As<Napi::Float32Array>();
  if (out.ElementLength() != st.out_rows.size() * c.vocab)
    throw MakeError(env, codes::kInvalidArgument, "kvPoolStep: logits must hold " + std::to_string(st.out_rows.size() * c.vocab) + " floats");
  job->logits = out.Data();
  return StartPoolStep(addon, info, where, std::move(job), h, st, 7, 6);
}

// Chained decode steps on the CPU (KvPool.stepChain): RunStep, then every sequence's next token
// chosen from its logits row here (ops/chain_sampling.h) and fed to the next step, so the JS thread
// is not woken per token: a small model's step is a few tens of microseconds, about what the
// completion through the event loop and the scheduler cost per token.
class ChainJob : public PoolJob {
 public:
  std::shared_ptr<const LlmModel> model;
  KvStep step;
  KvChain chain;
  void Execute(Addon& addon) override {
    Release release{pool.get()};
    const size_t seqs = step.seqs.size(), vocab = model->config().vocab;
    std::vector<float> logits(seqs * vocab);
    std::vector<uint32_t> rng(chain.rng ? chain.rng : nullptr, chain.rng ? chain.rng + 4 * seqs : nullptr);
    static const kernels::ElementwiseUkernels uk = ElementwiseTable(ElementwiseVariant::kAuto);
    std::vector<int32_t> ids;
    for (size_t j = 0; j < chain.steps; ++j) {
      if (!RunStep(*model, *pool, step, logits.data(), addon.pool(), threads, cancel.get())) {
        Fail(codes::kAborted, "kvPoolStepChain: aborted");
        return;
      }
      for (size_t s = 0; s < seqs; ++s) {
        const int32_t t = ChooseChainToken(uk, logits.data() + s * vocab, vocab, chain.params ? chain.params + 4 * s : nullptr,
                                           rng.empty() ? nullptr : rng.data() + 4 * s, ids);
        chain.chosen[j * seqs + s] = t;
        if (chain.rng_out) std::copy(rng.begin() + 4 * s, rng.begin() + 4 * s + 4, chain.rng_out + 4 * (j * seqs + s));
        step.tokens[step.seqs[s].row0] = t;
        step.seqs[s].start += 1;
      }
    }
  }
};

// (model, pool, tokens, meta, tables, copies, steps, chosen, params, rng, rngOut, threads, cancel?)
Napi::Value KvPoolStepChain(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "kvPoolStepChain";
  if (info.Length() < 12 || !IsInt32Array(info[2]) || !IsInt32Array(info[3]) || !IsInt32Array(info[4]) || !IsInt32Array(info[5]))
    throw MakeError(env, codes::kInvalidArgument,
                    "kvPoolStepChain: expected (model, pool, tokens, meta, tables, copies: Int32Array, steps: number, chosen: "
                    "Int32Array, params: Float64Array | null, rng: Uint32Array | null, rngOut: Uint32Array | null, threads, cancel?)");
  auto job = std::make_unique<ChainJob>();
  KvPoolHandle* h = UnpackPoolStep(addon, info, where, job.get());
  const size_t steps = ChainSteps(info, 6, where);
  // Validated, and its blocks reserved, as the one step that writes every position of the chain.
  const KvStep whole = KvChainView(job->step, steps);
  const LlmConfig& c = job->model->config();
  const std::string why = ValidateKvStep(*job->pool, c.vocab, whole);
  if (!why.empty()) throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": " + why);
  job->chain = UnpackChainArgs(info, 6, where, job->step, c.vocab, steps);
  if (job->chain.params)
    for (size_t i = 8; i <= 10; ++i) job->Keep(info[i]);
  return StartPoolStep(addon, info, where, std::move(job), h, whole, 11, 7);
}

class BlocksJob : public PoolJob {
 public:
  std::vector<int32_t> ids;
  uint8_t* bytes = nullptr;
  bool write = false;
  void Execute(Addon& addon) override {
    Release release{pool.get()};
    const size_t bb = pool->block_bytes();
    addon.pool().ParallelFor(ids.size(), threads, [&](size_t i) {
      uint8_t* block = pool->Block(static_cast<size_t>(ids[i]));
      if (write) std::memcpy(block, bytes + i * bb, bb);
      else std::memcpy(bytes + i * bb, block, bb);
    }, cancel.get());
  }
};

}  // namespace

int64_t CheckBlockTransfer(const Napi::CallbackInfo& info, const char* where, size_t max_blocks, size_t block_bytes,
                           bool write, std::vector<int32_t>* ids_out) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !IsInt32Array(info[1]) || !info[2].IsTypedArray() ||
      info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": expected (pool, ids: Int32Array, bytes: Uint8Array)");
  Napi::Int32Array ids = info[1].As<Napi::Int32Array>();
  Napi::Uint8Array bytes = info[2].As<Napi::Uint8Array>();
  int64_t last = -1;
  for (size_t i = 0; i < ids.ElementLength(); ++i) {
    if (ids[i] < 0 || static_cast<size_t>(ids[i]) >= max_blocks)
      throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": ids[" + std::to_string(i) + "] = " +
                                                        std::to_string(ids[i]) + " is outside [0, " + std::to_string(max_blocks) + ")");
    last = std::max<int64_t>(last, ids[i]);
  }
  if (write) {
    // Linear in the ids (a save of a long context names thousands of blocks).
    std::unordered_map<int32_t, size_t> first;
    for (size_t i = 0; i < ids.ElementLength(); ++i)
      if (!first.emplace(ids[i], i).second)
        throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": ids[" + std::to_string(i) + "] repeats block " +
                                                          std::to_string(ids[i]));
  }
  const size_t need = ids.ElementLength() * block_bytes;
  if (bytes.ElementLength() != need)
    throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": bytes must hold " + std::to_string(need) +
                                                      " bytes (" + std::to_string(ids.ElementLength()) + " blocks), got " +
                                                      std::to_string(bytes.ElementLength()));
  ids_out->assign(ids.Data(), ids.Data() + ids.ElementLength());
  return last;
}

namespace {

// kvPoolRead(pool, ids, out: Uint8Array) / kvPoolWrite(pool, ids, bytes: Uint8Array).
Napi::Value KvPoolBlocks(Addon& addon, const Napi::CallbackInfo& info, bool write) {
  Napi::Env env = info.Env();
  const char* where = write ? "kvPoolWrite" : "kvPoolRead";
  KvPoolHandle* h = UnwrapPool(addon, info[0], where);
  auto job = std::make_unique<BlocksJob>();
  job->pool = h->pool;
  job->write = write;
  const int64_t last = CheckBlockTransfer(info, where, job->pool->max_blocks(), job->pool->block_bytes(), write, &job->ids);
  job->bytes = info[2].As<Napi::Uint8Array>().Data();
  job->Claim(env, where);
  try {
    h->Reserve(env, last, where);
  } catch (...) {
    job->pool->busy.store(false);
    throw;
  }
  job->Keep(info[2]);
  return addon.Start(env, std::move(job));
}

Napi::Value KvPoolRead(Addon& addon, const Napi::CallbackInfo& info) { return KvPoolBlocks(addon, info, false); }
Napi::Value KvPoolWrite(Addon& addon, const Napi::CallbackInfo& info) { return KvPoolBlocks(addon, info, true); }

// One query row against n cached rows of K/V (fp32 or IEEE half), folded `span` rows per kernel
// call as a paged cache hands them over; out = the normalised attention output. For kernel tests.
class AttentionJob : public AsyncJob {
 public:
  std::vector<float> q, out;
  std::vector<uint8_t> k, v;
  size_t hd = 0, n = 0, span = 0;
  bool f16 = false;
  kernels::AttentionSpanUkernel f32_kernel = nullptr;
  kernels::AttentionSpanF16Ukernel f16_kernel = nullptr;
  void Execute(Addon&) override {
    out.assign(hd, 0.f);
    kernels::AttentionState st{-INFINITY, 0.f, out.data()};
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (size_t p = 0; p < n; p += span) {
      const size_t c = std::min(span, n - p);
      if (f16)
        f16_kernel(q.data(), hd, reinterpret_cast<const uint16_t*>(k.data()) + p * hd,
                   reinterpret_cast<const uint16_t*>(v.data()) + p * hd, hd, c, scale, &st);
      else
        f32_kernel(q.data(), hd, reinterpret_cast<const float*>(k.data()) + p * hd,
                   reinterpret_cast<const float*>(v.data()) + p * hd, hd, c, scale, &st);
    }
    for (float& o : out) o /= st.sum;
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Float32Array a = Napi::Float32Array::New(env, out.size());
    std::copy(out.begin(), out.end(), a.Data());
    return a;
  }
};

Napi::Value KvAttention(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const double hd = NumberArg(info, 3), n = NumberArg(info, 4), span = NumberArg(info, 5);
  const std::string dtype = info.Length() > 6 && info[6].IsString() ? info[6].As<Napi::String>().Utf8Value() : "";
  const std::string variant = info.Length() > 7 && info[7].IsString() ? info[7].As<Napi::String>().Utf8Value() : "";
  if (!IsInteger(hd, 1, 1024) || !IsInteger(n, 1, 1 << 20) || !IsInteger(span, 1, n) || (dtype != "f32" && dtype != "f16") ||
      !info[0].IsTypedArray() || !info[1].IsTypedArray() || !info[2].IsTypedArray())
    throw MakeError(env, codes::kInvalidArgument, "kvAttention: expected (q, k, v, headDim, n, span, 'f32' | 'f16', variant)");
  auto job = std::make_unique<AttentionJob>();
  job->hd = static_cast<size_t>(hd);
  job->n = static_cast<size_t>(n);
  job->span = static_cast<size_t>(span);
  job->f16 = dtype == "f16";
  const napi_typedarray_type want = job->f16 ? napi_uint16_array : napi_float32_array;
  Napi::TypedArray q = info[0].As<Napi::TypedArray>(), k = info[1].As<Napi::TypedArray>(), v = info[2].As<Napi::TypedArray>();
  if (q.TypedArrayType() != napi_float32_array || q.ElementLength() != job->hd || k.TypedArrayType() != want ||
      v.TypedArrayType() != want || k.ElementLength() != job->n * job->hd || v.ElementLength() != job->n * job->hd)
    throw MakeError(env, codes::kInvalidArgument, "kvAttention: q must be a Float32Array of headDim, k and v n * headDim of the dtype");
  const float* qd = reinterpret_cast<const float*>(static_cast<const uint8_t*>(q.ArrayBuffer().Data()) + q.ByteOffset());
  job->q.assign(qd, qd + job->hd);
  const uint8_t* kd = static_cast<const uint8_t*>(k.ArrayBuffer().Data()) + k.ByteOffset();
  const uint8_t* vd = static_cast<const uint8_t*>(v.ArrayBuffer().Data()) + v.ByteOffset();
  job->k.assign(kd, kd + k.ByteLength());
  job->v.assign(vd, vd + v.ByteLength());
  if (variant == "scalar") {
    job->f32_kernel = kernels::AttentionUkernelsScalar().span;
    job->f16_kernel = kernels::AttentionF16UkernelsScalar().span;
  }
#if defined(__x86_64__) || defined(_M_X64)
  else if (variant == "avx2" && Cpu().Supports(IsaLevel::kAvx2)) {
    job->f32_kernel = kernels::AttentionUkernelsAvx2().span;
    job->f16_kernel = kernels::AttentionF16UkernelsAvx2().span;
  } else if (variant == "avx512" && Cpu().Supports(IsaLevel::kAvx512)) {
    job->f32_kernel = kernels::AttentionUkernelsAvx512().span;
    job->f16_kernel = kernels::AttentionF16UkernelsAvx512().span;
  }
#endif
  else if (variant == "avx2" || variant == "avx512")
    throw MakeError(env, codes::kDeviceUnavailable, "kvAttention: this CPU does not run the " + variant + " kernels");
  else
    throw MakeError(env, codes::kInvalidArgument, "kvAttention: variant must be 'scalar', 'avx2' or 'avx512'");
  return addon.Start(env, std::move(job));
}

}  // namespace

void RegisterLlmBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  LlmModelHandle::Register(env, addon, kModelClass);
  addon.Class("KvPoolHandle") = Napi::Persistent(KvPoolHandle::Define(env));
  addon.Export(env, exports, "llmModelCreate", LlmModelCreate);
  addon.Export(env, exports, "llmModelPrepare", LlmModelPrepare);
  addon.Export(env, exports, "kvPoolCreate", KvPoolCreate);
  addon.Export(env, exports, "kvPoolStep", KvPoolStep);
  addon.Export(env, exports, "kvPoolStepChain", KvPoolStepChain);
  addon.Export(env, exports, "kvPoolRead", KvPoolRead);
  addon.Export(env, exports, "kvPoolWrite", KvPoolWrite);
  addon.Export(env, exports, "kvAttention", KvAttention);
  RegisterLlmGpuBindings(env, exports, addon);
}

}  // namespace sonde
