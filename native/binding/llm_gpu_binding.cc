// Bindings of the GPU transformer (ops/llm_gpu.h), wrapped by lib/llm/transformer-gpu.ts. They
// mirror llm_binding.cc's pool functions, with the model's weights and the pool's blocks in device
// memory:
//   llmGpuModelCreate(model, device, cancel?) -> Promise<GpuLlmModelHandle>   (uploads every weight)
//   llmGpuKvPoolCreate(gpuModel, blockSize, maxBlocks, dtype, reserveBlocks) -> GpuKvPoolHandle
//   llmGpuKvPoolStep(gpuModel, pool, tokens, meta, tables, copies, logits, cancel?) -> Promise<void>
//   llmGpuKvPoolStepChain(gpuModel, pool, tokens, meta, tables, copies, steps, chosen, params, rng, rngOut,
//                         cancel?) -> Promise<void>
//   llmGpuKvPoolRead(pool, ids, out) / llmGpuKvPoolWrite(pool, ids, bytes) -> Promise<void>
// `model` is llmModelCreate's CPU handle: it validated the file, and the upload reads its views of
// the mapping. Device memory is reported to V8 like the CPU engine's native memory: the weights by
// the model handle, blocks and step arena by the pool handle after each job. Device errors become
// typed errors (GpuErrc as gpu_binding.cc maps it: out of memory names the device and the tensor).
#include <napi.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "binding/addon.h"
#include "binding/llm_binding.h"
#include "binding/shared_handle.h"
#include "ops/llm_gpu.h"

namespace sonde {

void Describe(Napi::Object& o, const GpuLlmModel& m) {
  o.Set("bytes", static_cast<double>(m.bytes()));
  o.Set("layers", static_cast<double>(m.config().layers));
  o.Set("device", m.device().info().id);
}

namespace {

using GpuModelHandle = SharedHandle<GpuLlmModel>;
constexpr const char* kGpuModelClass = "GpuLlmModelHandle";

const char* CodeOf(GpuErrc c) {
  switch (c) {
    case GpuErrc::kOutOfMemory: return codes::kOutOfMemory;
    case GpuErrc::kUnavailable: return codes::kDeviceUnavailable;
    case GpuErrc::kInvalidArgument: return codes::kInvalidArgument;
    case GpuErrc::kKernel: break;
  }
  return codes::kInternal;
}

class GpuKvPoolHandle : public Napi::ObjectWrap<GpuKvPoolHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "GpuKvPoolHandle", {
        InstanceMethod("dispose", &GpuKvPoolHandle::Dispose),
        InstanceMethod("info", &GpuKvPoolHandle::Info),
    });
  }
  explicit GpuKvPoolHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GpuKvPoolHandle>(info) {}
  ~GpuKvPoolHandle() override { reported_.ReleaseInFinalizer(Env()); }
  // Tells V8 what the pool holds now (blocks and arena): as a job starts and as it ends, never
  // while one runs (the job grows them).
  void Report(Napi::Env env) {
    if (!pool || pool->busy.load()) return;
    reported_.Set(env, static_cast<int64_t>(pool->HeldBytes()));
  }
  std::shared_ptr<GpuKvPool> pool;

 private:
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
      o.Set("allocatedBlocks", static_cast<double>(pool->allocated_blocks()));
      if (!pool->busy.load()) o.Set("arenaBytes", static_cast<double>(pool->HeldBytes() - pool->bytes()));
      o.Set("reportedBytes", static_cast<double>(reported_.bytes()));
      o.Set("device", pool->model().device().info().id);
      // Counts change only inside a step (after its last launch, on the pool's thread).
      const std::vector<uint64_t>& counts = pool->expert_counts();
      if (!counts.empty() && !pool->busy.load()) {
        Napi::Float64Array a = Napi::Float64Array::New(info.Env(), counts.size());
        for (size_t i = 0; i < counts.size(); ++i) a[i] = static_cast<double>(counts[i]);
        o.Set("expertCounts", a);
      }
    }
    return o;
  }
  ReportedMemory reported_;
};

double NumberArg(const Napi::CallbackInfo& info, size_t i) {
  return info.Length() > i && info[i].IsNumber() ? info[i].As<Napi::Number>().DoubleValue() : -1;
}

bool IsInteger(double d, double lo, double hi) {
  return d >= lo && d <= hi && d == static_cast<double>(static_cast<int64_t>(d));
}

bool IsInt32Array(Napi::Value v) {
  return v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_int32_array;
}

std::shared_ptr<const GpuLlmModel> UnwrapGpuModel(Addon& addon, Napi::Value v, const char* where) {
  if (!GpuModelHandle::Is(addon, kGpuModelClass, v))
    throw MakeError(v.Env(), codes::kInvalidArgument, std::string(where) + ": expected a GPU model handle");
  std::shared_ptr<const GpuLlmModel> m = GpuModelHandle::Get(v);
  if (!m) throw MakeError(v.Env(), codes::kDisposed, std::string(where) + ": the model has been disposed");
  return m;
}

GpuKvPoolHandle* UnwrapPool(Addon& addon, Napi::Value v, const char* where) {
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(addon.Class("GpuKvPoolHandle").Value()))
    throw MakeError(v.Env(), codes::kInvalidArgument, std::string(where) + ": expected a GPU KV pool handle");
  GpuKvPoolHandle* h = GpuKvPoolHandle::Unwrap(v.As<Napi::Object>());
  if (!h->pool) throw MakeError(v.Env(), codes::kDisposed, std::string(where) + ": the KV pool has been disposed");
  return h;
}

class CreateJob : public AsyncJob {
 public:
  std::shared_ptr<const LlmModel> cpu;
  std::shared_ptr<GpuDevice> device;
  std::shared_ptr<const GpuLlmModel> model;
  Addon* addon = nullptr;
  void Execute(Addon&) override {
    try {
      model = GpuLlmModel::Create(*cpu, device, cancel.get());
      if (!model) Fail(codes::kAborted, "llmGpuModelCreate: aborted");
    } catch (const GpuError& e) {
      Fail(CodeOf(e.code), std::string("llmGpuModelCreate: ") + e.what());
    }
    cpu.reset();
  }
  Napi::Value Result(Napi::Env env) override { return GpuModelHandle::Wrap(env, *addon, kGpuModelClass, std::move(model)); }
};

Napi::Value ModelCreate(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "llmGpuModelCreate";
  auto job = std::make_unique<CreateJob>();
  job->cpu = UnwrapLlmModel(addon, info[0], where);
  if (info.Length() < 2 || !info[1].IsString())
    throw MakeError(env, codes::kInvalidArgument, "llmGpuModelCreate: expected (model, device: string, cancel?)");
  const std::string why = GpuLlmModel::Unsupported(*job->cpu);
  if (!why.empty()) throw MakeError(env, codes::kUnsupportedOperator, std::string(where) + ": the GPU transformer does not run " + why);
  try {
    job->device = OpenGpuDevice(info[1].As<Napi::String>());
  } catch (const GpuError& e) {
    throw MakeError(env, CodeOf(e.code), std::string(where) + ": " + e.what());
  }
  job->addon = &addon;
  if (info.Length() > 2) addon.AttachCancel(info[2], job.get());
  job->threads = 1;  // launches from one host thread: no pool helpers to hold or wake
  return addon.Start(env, std::move(job));
}

Napi::Value PoolCreate(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "llmGpuKvPoolCreate";
  std::shared_ptr<const GpuLlmModel> model = UnwrapGpuModel(addon, info[0], where);
  const double block_size = NumberArg(info, 1), max_blocks = NumberArg(info, 2), reserve = NumberArg(info, 4);
  if (!IsInteger(block_size, 1, 16777216))
    throw MakeError(env, codes::kInvalidArgument, "llmGpuKvPoolCreate: blockSize must be an integer in [1, 2^24]");
  if (!IsInteger(max_blocks, 1, 2147483647))
    throw MakeError(env, codes::kInvalidArgument, "llmGpuKvPoolCreate: maxBlocks must be an integer in [1, 2^31 - 1]");
  if (!IsInteger(reserve, 0, max_blocks))
    throw MakeError(env, codes::kInvalidArgument, "llmGpuKvPoolCreate: reserveBlocks must be an integer in [0, maxBlocks]");
  const std::string dtype = info.Length() > 3 && info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "";
  if (dtype != "f32" && dtype != "f16")
    throw MakeError(env, codes::kInvalidArgument, "llmGpuKvPoolCreate: dtype must be 'f32' or 'f16'");
  const LlmConfig& c = model->config();
  const KvCacheShape shape = KvCacheShapeOf(c);
  const double block_bytes = 1.0 * c.layers * shape.streams * shape.row_width * block_size * (dtype == "f16" ? 2 : 4);
  if (block_bytes * max_blocks > 1125899906842624.0)
    throw MakeError(env, codes::kInvalidArgument, "llmGpuKvPoolCreate: maxBlocks * blockBytes is beyond any memory");
  auto handle = addon.Class("GpuKvPoolHandle").New({});
  GpuKvPoolHandle* h = GpuKvPoolHandle::Unwrap(handle);
  h->pool = std::make_shared<GpuKvPool>(model, static_cast<size_t>(block_size), static_cast<size_t>(max_blocks),
                                        dtype == "f16" ? KvDtype::kF16 : KvDtype::kF32);
  if (reserve > 0) {
    // A private sequence's whole cache, at once (its memory is known when it is created): one
    // allocation and its zero fill, short enough for the JS thread.
    try {
      std::shared_ptr<GpuStream> stream = model->device().AcquireStream();
      h->pool->Reserve(static_cast<size_t>(reserve) - 1, *stream);
    } catch (const GpuError& e) {
      throw MakeError(env, CodeOf(e.code), std::string(where) + ": " + e.what());
    }
  }
  h->Report(env);
  return handle;
}

// Marks the pool busy for one job; the job clears it when it ends, whichever way, and reports the
// pool's memory to V8 when it settles.
struct PoolJob : public AsyncJob {
  std::shared_ptr<GpuKvPool> pool;
  GpuKvPoolHandle* handle = nullptr;
  void Claim(Napi::Env env, const char* where) {
    bool expected = false;
    if (!pool->busy.compare_exchange_strong(expected, true))
      throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": another job is running on this KV pool");
  }
  struct Release {
    GpuKvPool* p;
    ~Release() { p->busy.store(false); }
  };
  // Runs fn with the pool claimed, turning device errors into this job's failure.
  template <typename Fn>
  void Guarded(const char* where, Fn&& fn) {
    Release release{pool.get()};
    try {
      fn();
    } catch (const GpuError& e) {
      Fail(CodeOf(e.code), std::string(where) + ": " + e.what());
    }
  }
  Napi::Value Result(Napi::Env env) override {
    // The handle is kept alive by Keep() (the job holds a reference to its JS object).
    if (handle && handle->pool == pool) handle->Report(env);
    return env.Undefined();
  }
};

class StepJob : public PoolJob {
 public:
  std::shared_ptr<const GpuLlmModel> model;
  KvStep step;
  float* logits = nullptr;
  // Chained steps (llmGpuKvPoolStepChain): how many, where their tokens go, how they are chosen.
  KvChain chain;
  const char* where = "llmGpuKvPoolStep";
  void Execute(Addon&) override {
    Guarded(where, [&] {
      const bool done = chain.chosen ? model->StepChain(*pool, step, chain, cancel.get()) : model->Step(*pool, step, logits, cancel.get());
      if (!done) Fail(codes::kAborted, std::string(where) + ": aborted");
    });
  }
};

// The arguments both step bindings share, (model, pool, tokens, meta, tables, copies, ...), into
// the job, checked as the CPU pool's step checks them; `steps` positions per sequence must fit.
GpuKvPoolHandle* PrepareStep(Addon& addon, const Napi::CallbackInfo& info, StepJob* job, size_t steps) {
  Napi::Env env = info.Env();
  const char* where = job->where;
  job->model = UnwrapGpuModel(addon, info[0], where);
  GpuKvPoolHandle* h = UnwrapPool(addon, info[1], where);
  if (&h->pool->model() != job->model.get())
    throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": the pool belongs to another model");
  job->pool = h->pool;
  job->handle = h;
  UnpackKvStep(env, info[2].As<Napi::Int32Array>(), info[3].As<Napi::Int32Array>(), info[4].As<Napi::Int32Array>(),
               info[5].As<Napi::Int32Array>(), &job->step);
  const KvStep& st = job->step;
  const LlmConfig& c = job->model->config();
  // A chain is validated as the one step that writes all of its positions.
  KvStep whole;
  const KvStep* checked = &st;
  if (steps > 1) {
    whole = KvChainView(st, steps);
    checked = &whole;
  }
  const std::string why = ValidateKvStep(job->pool->block_size(), job->pool->max_blocks(), c.vocab, *checked);
  if (!why.empty()) throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": " + why);
  return h;
}

Napi::Value StartStep(Addon& addon, const Napi::CallbackInfo& info, std::unique_ptr<StepJob> job, GpuKvPoolHandle* h,
                      size_t out_index, size_t cancel_index) {
  Napi::Env env = info.Env();
  if (info.Length() > cancel_index) addon.AttachCancel(info[cancel_index], job.get());
  h->Report(env);
  job->Claim(env, job->where);
  job->Keep(info[1]);
  job->Keep(info[out_index]);
  job->threads = 1;  // launches from one host thread: no pool helpers to hold or wake
  return addon.Start(env, std::move(job));
}

Napi::Value PoolStep(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 7 || !IsInt32Array(info[2]) || !IsInt32Array(info[3]) || !IsInt32Array(info[4]) ||
      !IsInt32Array(info[5]) || !info[6].IsTypedArray() || info[6].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw MakeError(env, codes::kInvalidArgument,
                    "llmGpuKvPoolStep: expected (model, pool, tokens, meta, tables, copies: Int32Array, logits: Float32Array, cancel?)");
  auto job = std::make_unique<StepJob>();
  GpuKvPoolHandle* h = PrepareStep(addon, info, job.get(), 1);
  const size_t vocab = job->model->config().vocab;
  Napi::Float32Array out = info[6].As<Napi::Float32Array>();
  if (out.ElementLength() != job->step.out_rows.size() * vocab)
    throw MakeError(env, codes::kInvalidArgument,
                    "llmGpuKvPoolStep: logits must hold " + std::to_string(job->step.out_rows.size() * vocab) + " floats");
  job->logits = out.Data();
  return StartStep(addon, info, std::move(job), h, 6, 7);
}

// (model, pool, tokens, meta, tables, copies, steps, chosen, params, rng, rngOut, cancel?):
// GpuLlmModel::StepChain; the chain's own arguments as UnpackChainArgs takes them.
Napi::Value PoolStepChain(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "llmGpuKvPoolStepChain";
  if (info.Length() < 11 || !IsInt32Array(info[2]) || !IsInt32Array(info[3]) || !IsInt32Array(info[4]) || !IsInt32Array(info[5]))
    throw MakeError(env, codes::kInvalidArgument,
                    std::string(where) + ": expected (model, pool, tokens, meta, tables, copies: Int32Array, steps: number, chosen: "
                                         "Int32Array, params: Float64Array | null, rng: Uint32Array | null, rngOut: Uint32Array | null, cancel?)");
  auto job = std::make_unique<StepJob>();
  job->where = where;
  const size_t steps = ChainSteps(info, 6, where);
  GpuKvPoolHandle* h = PrepareStep(addon, info, job.get(), steps);
  job->chain = UnpackChainArgs(info, 6, where, job->step, job->model->config().vocab, steps);
  if (job->chain.params)
    for (size_t i = 8; i <= 10; ++i) job->Keep(info[i]);
  return StartStep(addon, info, std::move(job), h, 7, 11);
}

class BlocksJob : public PoolJob {
 public:
  std::vector<int32_t> ids;
  uint8_t* bytes = nullptr;
  bool write = false;
  void Execute(Addon&) override {
    Guarded(write ? "llmGpuKvPoolWrite" : "llmGpuKvPoolRead", [&] {
      std::shared_ptr<GpuStream> stream = pool->model().device().AcquireStream();
      int64_t last = -1;
      for (int32_t id : ids) last = std::max<int64_t>(last, id);
      if (last >= 0) pool->Reserve(static_cast<size_t>(last), *stream);
      if (write) pool->WriteBlocks(ids, bytes, *stream);
      else pool->ReadBlocks(ids, bytes, *stream);
      stream->Synchronize();
    });
  }
};

Napi::Value PoolBlocks(Addon& addon, const Napi::CallbackInfo& info, bool write) {
  Napi::Env env = info.Env();
  const char* where = write ? "llmGpuKvPoolWrite" : "llmGpuKvPoolRead";
  GpuKvPoolHandle* h = UnwrapPool(addon, info[0], where);
  auto job = std::make_unique<BlocksJob>();
  job->pool = h->pool;
  job->handle = h;
  job->write = write;
  CheckBlockTransfer(info, where, job->pool->max_blocks(), job->pool->block_bytes(), write, &job->ids);
  job->bytes = info[2].As<Napi::Uint8Array>().Data();
  job->Claim(env, where);
  job->Keep(info[0]);
  job->Keep(info[2]);
  job->threads = 1;  // launches from one host thread: no pool helpers to hold or wake
  return addon.Start(env, std::move(job));
}

Napi::Value PoolRead(Addon& addon, const Napi::CallbackInfo& info) { return PoolBlocks(addon, info, false); }
Napi::Value PoolWrite(Addon& addon, const Napi::CallbackInfo& info) { return PoolBlocks(addon, info, true); }

}  // namespace

void RegisterLlmGpuBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  GpuModelHandle::Register(env, addon, kGpuModelClass);
  addon.Class("GpuKvPoolHandle") = Napi::Persistent(GpuKvPoolHandle::Define(env));
  addon.Export(env, exports, "llmGpuModelCreate", ModelCreate);
  addon.Export(env, exports, "llmGpuKvPoolCreate", PoolCreate);
  addon.Export(env, exports, "llmGpuKvPoolStep", PoolStep);
  addon.Export(env, exports, "llmGpuKvPoolStepChain", PoolStepChain);
  addon.Export(env, exports, "llmGpuKvPoolRead", PoolRead);
  addon.Export(env, exports, "llmGpuKvPoolWrite", PoolWrite);
}

}  // namespace sonde
