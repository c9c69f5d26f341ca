// Bindings of the native transformer (ops/llm.h), wrapped by lib/llm/transformer.ts:
//   llmModelCreate(gguf, config, tensorIndices) -> LlmModelHandle     (sync: checks shapes only)
//   llmSequenceCreate(model, capacity, kvSpan?) -> LlmSequenceHandle  (the KV cache, reported to V8)
//   llmEval(model, seq, tokens, logits, allLogits, threads, cancel?) -> Promise<void>
// A job holds the model (and with it the mapping) and the sequence, so disposing either while an
// eval runs frees them when it finishes.
#include <napi.h>

#include <memory>
#include <new>
#include <string>
#include <vector>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gguf_binding.h"
#include "binding/shared_handle.h"
#include "ops/llm.h"

namespace sonde {

void Describe(Napi::Object& o, const LlmModel& m) {
  o.Set("bytes", static_cast<double>(m.bytes()));
  o.Set("layers", static_cast<double>(m.config().layers));
}

namespace {

using LlmModelHandle = SharedHandle<LlmModel>;
constexpr const char* kModelClass = "LlmModelHandle";

class LlmSequenceHandle : public Napi::ObjectWrap<LlmSequenceHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "LlmSequenceHandle", {
        InstanceMethod("dispose", &LlmSequenceHandle::Dispose),
        InstanceMethod("length", &LlmSequenceHandle::Length),
        InstanceMethod("truncate", &LlmSequenceHandle::Truncate),
        InstanceMethod("info", &LlmSequenceHandle::Info),
    });
  }
  explicit LlmSequenceHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LlmSequenceHandle>(info) {}
  ~LlmSequenceHandle() override {
    int64_t total;
    if (reported_) napi_adjust_external_memory(Env(), -reported_, &total);
  }
  void Set(Napi::Env env, std::shared_ptr<LlmSequence> s, const LlmModel* model) {
    seq = std::move(s);
    owner = model;
    reported_ = static_cast<int64_t>(seq->bytes());
    Napi::MemoryManagement::AdjustExternalMemory(env, reported_);
  }
  std::shared_ptr<LlmSequence> seq;
  const LlmModel* owner = nullptr;  // the model whose shapes the cache has

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    seq.reset();
    if (reported_) Napi::MemoryManagement::AdjustExternalMemory(info.Env(), -reported_);
    reported_ = 0;
    return info.Env().Undefined();
  }
  Napi::Value Length(const Napi::CallbackInfo& info) {
    if (!seq) throw MakeError(info.Env(), codes::kDisposed, "sequence: disposed");
    return Napi::Number::New(info.Env(), static_cast<double>(seq->length()));
  }
  Napi::Value Truncate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!seq) throw MakeError(env, codes::kDisposed, "sequence.truncate: the sequence has been disposed");
    if (seq->busy.load()) throw MakeError(env, codes::kInvalidArgument, "sequence.truncate: an eval is running on it");
    const double n = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
    if (!(n >= 0) || n != static_cast<double>(static_cast<size_t>(n)))
      throw MakeError(env, codes::kInvalidArgument, "sequence.truncate(length): length must be a non-negative integer");
    seq->Truncate(static_cast<size_t>(n));
    return env.Undefined();
  }
  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("disposed", !seq);
    if (seq) {
      o.Set("bytes", static_cast<double>(seq->bytes()));
      o.Set("capacity", static_cast<double>(seq->capacity()));
      o.Set("length", static_cast<double>(seq->length()));
      const std::vector<uint64_t>& counts = seq->expert_counts();
      if (!counts.empty()) {
        Napi::Float64Array a = Napi::Float64Array::New(info.Env(), counts.size());
        for (size_t i = 0; i < counts.size(); ++i) a[i] = static_cast<double>(counts[i]);
        o.Set("expertCounts", a);
      }
    }
    return o;
  }
  int64_t reported_ = 0;
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

std::shared_ptr<const LlmModel> UnwrapModel(Addon& addon, Napi::Value v, const char* where) {
  if (!LlmModelHandle::Is(addon, kModelClass, v))
    throw MakeError(v.Env(), codes::kInvalidArgument, std::string(where) + ": expected a model handle");
  std::shared_ptr<const LlmModel> m = LlmModelHandle::Get(v);
  if (!m) throw MakeError(v.Env(), codes::kDisposed, std::string(where) + ": the model has been disposed");
  return m;
}

Napi::Value LlmSequenceCreate(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<const LlmModel> model = UnwrapModel(addon, info[0], "llmSequenceCreate");
  const double cap = info.Length() > 1 && info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : -1;
  if (!(cap >= 1 && cap <= 16777216) || cap != static_cast<double>(static_cast<size_t>(cap)))
    throw MakeError(env, codes::kInvalidArgument, "llmSequenceCreate: contextSize must be an integer in [1, 2^24]");
  const double span = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : 0;
  if (!(span >= 0 && span <= cap) || span != static_cast<double>(static_cast<size_t>(span)))
    throw MakeError(env, codes::kInvalidArgument, "llmSequenceCreate: kvSpan must be an integer in [0, contextSize]");
  std::shared_ptr<LlmSequence> seq;
  try {
    seq = std::make_shared<LlmSequence>(model->config(), static_cast<size_t>(cap), static_cast<size_t>(span));
  } catch (const std::bad_alloc&) {
    const LlmConfig& c = model->config();
    throw MakeError(env, codes::kOutOfMemory, "llmSequenceCreate: cannot allocate the KV cache of " +
                                                  std::to_string(2.0 * c.layers * c.kv_heads * c.head_dim * 4 * cap / 1048576) + " MiB");
  }
  Napi::Object obj = addon.Class("LlmSequenceHandle").New({});
  LlmSequenceHandle::Unwrap(obj)->Set(env, std::move(seq), model.get());
  return obj;
}

class EvalJob : public AsyncJob {
 public:
  std::shared_ptr<const LlmModel> model;
  std::shared_ptr<LlmSequence> seq;
  std::vector<int32_t> tokens;
  float* logits = nullptr;
  bool all = false;
  void Execute(Addon& addon) override {
    struct Release {
      LlmSequence* s;
      ~Release() { s->busy.store(false); }
    } release{seq.get()};
    if (!Forward(*model, *seq, tokens.data(), tokens.size(), logits, all, addon.pool(), threads, cancel.get()))
      Fail(codes::kAborted, "llmEval: aborted");
  }
};

Napi::Value LlmEval(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "llmEval";
  if (info.Length() < 6) throw MakeError(env, codes::kInvalidArgument, "llmEval: expected (model, seq, tokens, logits, allLogits, threads, cancel?)");
  auto job = std::make_unique<EvalJob>();
  job->model = UnwrapModel(addon, info[0], where);
  if (!info[1].IsObject() || !info[1].As<Napi::Object>().InstanceOf(addon.Class("LlmSequenceHandle").Value()))
    throw MakeError(env, codes::kInvalidArgument, "llmEval: expected a sequence handle");
  LlmSequenceHandle* sh = LlmSequenceHandle::Unwrap(info[1].As<Napi::Object>());
  if (!sh->seq) throw MakeError(env, codes::kDisposed, "llmEval: the sequence has been disposed");
  if (sh->owner != job->model.get()) throw MakeError(env, codes::kInvalidArgument, "llmEval: the sequence belongs to another model");
  job->seq = sh->seq;
  const LlmConfig& c = job->model->config();
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw MakeError(env, codes::kInvalidArgument, "llmEval: tokens must be an Int32Array");
  Napi::Int32Array t = info[2].As<Napi::Int32Array>();
  const size_t n = t.ElementLength();
  if (n == 0) throw MakeError(env, codes::kInvalidArgument, "llmEval: tokens must not be empty");
  for (size_t i = 0; i < n; ++i)
    if (t[i] < 0 || static_cast<size_t>(t[i]) >= c.vocab)
      throw MakeError(env, codes::kInvalidArgument, "llmEval: token id " + std::to_string(t[i]) + " at index " + std::to_string(i) +
                                                        " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");
  if (job->seq->length() + n > job->seq->capacity())
    throw MakeError(env, codes::kInvalidArgument, "llmEval: " + std::to_string(n) + " tokens after the " +
                                                      std::to_string(job->seq->length()) + " in the sequence exceed its context size " +
                                                      std::to_string(job->seq->capacity()));
  job->tokens.assign(t.Data(), t.Data() + n);
  job->all = info[4].ToBoolean();
  if (!info[3].IsTypedArray() || info[3].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw MakeError(env, codes::kInvalidArgument, "llmEval: logits must be a Float32Array");
  Napi::Float32Array out = info[3].As<Napi::Float32Array>();
  const size_t need = (job->all ? n : 1) * c.vocab;
  if (out.ElementLength() != need)
    throw MakeError(env, codes::kInvalidArgument, "llmEval: logits must hold " + std::to_string(need) + " floats");
  job->logits = out.Data();
  job->threads = info[5].IsNumber() ? info[5].As<Napi::Number>().Uint32Value() : 0;
  if (info.Length() > 6) addon.AttachCancel(info[6], job.get());
  bool expected = false;
  if (!job->seq->busy.compare_exchange_strong(expected, true))
    throw MakeError(env, codes::kInvalidArgument, "llmEval: another eval is running on this sequence");
  job->Keep(info[3]);
  return addon.Start(env, std::move(job));
}

}  // namespace

void RegisterLlmBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  LlmModelHandle::Register(env, addon, kModelClass);
  addon.Class("LlmSequenceHandle") = Napi::Persistent(LlmSequenceHandle::Define(env));
  addon.Export(env, exports, "llmModelCreate", LlmModelCreate);
  addon.Export(env, exports, "llmSequenceCreate", LlmSequenceCreate);
  addon.Export(env, exports, "llmEval", LlmEval);
}

}  // namespace sonde
