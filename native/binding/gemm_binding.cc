#include "binding/gemm_binding.h"

#include <new>

#include "binding/addon.h"
#include "binding/families.h"

namespace sonde {

namespace {

// Second line of validation: lib/ checks everything first and names the user's parameter; these
// checks only guarantee that no call through the binding can read or write out of bounds.
Napi::Float32Array F32Arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw MakeError(info.Env(), codes::kInvalidArgument, std::string("gemm: ") + name + " must be a Float32Array");
  return v.As<Napi::Float32Array>();
}

size_t SizeArg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    throw MakeError(info.Env(), codes::kInvalidArgument, std::string("gemm: ") + name + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

bool MulOverflows(size_t a, size_t b, size_t* out) { return __builtin_mul_overflow(a, b, out); }

class GemmJob : public AsyncJob {
 public:
  GemmVariant variant = GemmVariant::kAuto;
  GemmArgs args;
  size_t k = 0, n = 0;
  const float* b = nullptr;  // unpacked B (when packed is null)
  std::shared_ptr<const PackedGemmWeights> packed;

  void Execute(Addon& addon) override {
    if (variant == GemmVariant::kReference) {
      const float* a = args.a;
      addon.pool().ParallelFor(args.m, threads, [&](size_t i) {
        kernels::F32GemmReference(1, n, k, a + i * args.lda, args.lda, b, n, args.c + i * args.ldc,
                                  args.ldc, args.bias, args.activation);
      }, cancel.get());
      return;
    }
    std::shared_ptr<const PackedGemmWeights> w = packed;
    if (!w) w = PackedGemmWeights::Pack(b, k, n, n, variant);
    RunGemm(addon.pool(), threads, cancel.get(), args, *w);
  }
};

}  // namespace

// gemm(a, m, k, b | packed, n, bias | null, activation, variant, threads, out, cancelToken?)
//   -> Promise<void>
static Napi::Value Gemm(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 10) throw MakeError(env, codes::kInvalidArgument, "gemm: expected 10 arguments");
  auto job = std::make_unique<GemmJob>();
  Napi::Float32Array a = F32Arg(info, 0, "a");
  size_t m = SizeArg(info, 1, "m"), k = SizeArg(info, 2, "k"), n = SizeArg(info, 4, "n");
  size_t mk, kn, mn;
  if (MulOverflows(m, k, &mk) || MulOverflows(k, n, &kn) || MulOverflows(m, n, &mn))
    throw MakeError(env, codes::kInvalidArgument, "gemm: m*k, k*n or m*n overflows");
  if (a.ElementLength() != mk) throw MakeError(env, codes::kInvalidArgument, "gemm: a must hold m*k elements");
  if (info[3].IsObject() && info[3].As<Napi::Object>().InstanceOf(addon.Class("PackedGemmHandle").Value())) {
    auto* h = PackedGemmHandle::Unwrap(info[3].As<Napi::Object>());
    job->packed = h->weights();
    if (!job->packed) throw MakeError(env, codes::kDisposed, "gemm: the packed weights have been disposed");
    if (job->packed->k() != k || job->packed->n() != n)
      throw MakeError(env, codes::kInvalidArgument, "gemm: packed weights do not match k and n");
  } else {
    Napi::Float32Array b = F32Arg(info, 3, "b");
    if (b.ElementLength() != kn) throw MakeError(env, codes::kInvalidArgument, "gemm: b must hold k*n elements");
    job->b = b.Data();
  }
  job->Keep(info[0]);
  job->Keep(info[3]);
  if (!info[5].IsNull() && !info[5].IsUndefined()) {
    Napi::Float32Array bias = F32Arg(info, 5, "bias");
    if (bias.ElementLength() != n) throw MakeError(env, codes::kInvalidArgument, "gemm: bias must hold n elements");
    job->args.bias = bias.Data();
    job->Keep(info[5]);
  }
  int32_t act = info[6].IsNumber() ? info[6].As<Napi::Number>().Int32Value() : -1;
  if (act != kernels::kActNone && act != kernels::kActRelu)
    throw MakeError(env, codes::kInvalidArgument, "gemm: unknown activation");
  if (!info[7].IsString() || !ParseGemmVariant(info[7].As<Napi::String>(), &job->variant))
    throw MakeError(env, codes::kInvalidArgument, "gemm: unknown variant");
  std::string why = GemmVariantUnavailable(job->variant);
  if (!why.empty()) throw MakeError(env, codes::kDeviceUnavailable, "gemm: variant unavailable: " + why);
  if (job->packed && job->variant != GemmVariant::kAuto && job->variant != job->packed->variant())
    throw MakeError(env, codes::kInvalidArgument,
                    std::string("gemm: weights were packed for '") + GemmVariantName(job->packed->variant()) +
                        "', not '" + GemmVariantName(job->variant) + "'");
  if (job->packed) job->variant = job->packed->variant();
  job->threads = info[8].IsNumber() ? info[8].As<Napi::Number>().Uint32Value() : 0;
  Napi::Float32Array out = F32Arg(info, 9, "out");
  if (out.ElementLength() != mn) throw MakeError(env, codes::kInvalidArgument, "gemm: out must hold m*n elements");
  job->Keep(info[9]);
  addon.AttachCancel(info, 10, job.get());
  job->args.a = a.Data();
  job->args.m = m;
  job->args.lda = k;
  job->args.c = out.Data();
  job->args.ldc = n;
  job->args.activation = act;
  job->k = k;
  job->n = n;
  return addon.Start(env, std::move(job));
}

// packGemmWeights(b, k, n, variant) -> PackedGemmHandle (synchronous: packing is one pass over B)
static Napi::Value PackGemmWeights(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4) throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: expected 4 arguments");
  Napi::Float32Array b = F32Arg(info, 0, "b");
  size_t k = SizeArg(info, 1, "k"), n = SizeArg(info, 2, "n"), kn;
  if (MulOverflows(k, n, &kn) || b.ElementLength() != kn)
    throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: b must hold k*n elements");
  GemmVariant variant;
  if (!info[3].IsString() || !ParseGemmVariant(info[3].As<Napi::String>(), &variant) ||
      variant == GemmVariant::kReference)
    throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: unknown variant");
  std::string why = GemmVariantUnavailable(variant);
  if (!why.empty()) throw MakeError(env, codes::kDeviceUnavailable, "packGemmWeights: variant unavailable: " + why);
  std::shared_ptr<const PackedGemmWeights> w;
  try {
    w = PackedGemmWeights::Pack(b.Data(), k, n, n, variant);
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "packGemmWeights: out of host memory");
  }
  Napi::Object obj = addon.Class("PackedGemmHandle").New({});
  PackedGemmHandle::Unwrap(obj)->Adopt(env, std::move(w));
  return obj;
}

void RegisterGemmBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  addon.Class("PackedGemmHandle") = Napi::Persistent(PackedGemmHandle::Define(env));
  addon.Export(env, exports, "gemm", Gemm);
  addon.Export(env, exports, "packGemmWeights", PackGemmWeights);
}

Napi::Function PackedGemmHandle::Define(Napi::Env env) {
  return DefineClass(env, "PackedGemmHandle", {
      InstanceMethod("dispose", &PackedGemmHandle::Dispose),
      InstanceMethod("info", &PackedGemmHandle::Info),
  });
}

PackedGemmHandle::PackedGemmHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PackedGemmHandle>(info) {}

PackedGemmHandle::~PackedGemmHandle() {
  // A GC finalizer, possibly during environment teardown: use the C call, which cannot throw.
  int64_t total;
  if (reported_bytes_) napi_adjust_external_memory(Env(), -reported_bytes_, &total);
}

void PackedGemmHandle::Adopt(Napi::Env env, std::shared_ptr<const PackedGemmWeights> w) {
  weights_ = std::move(w);
  reported_bytes_ = static_cast<int64_t>(weights_->bytes());
  Napi::MemoryManagement::AdjustExternalMemory(env, reported_bytes_);
}

void PackedGemmHandle::Release(Napi::Env env) {
  weights_.reset();
  if (reported_bytes_) Napi::MemoryManagement::AdjustExternalMemory(env, -reported_bytes_);
  reported_bytes_ = 0;
}

Napi::Value PackedGemmHandle::Dispose(const Napi::CallbackInfo& info) {
  Release(info.Env());
  return info.Env().Undefined();
}

Napi::Value PackedGemmHandle::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("disposed", !weights_);
  if (weights_) {
    o.Set("k", static_cast<double>(weights_->k()));
    o.Set("n", static_cast<double>(weights_->n()));
    o.Set("bytes", static_cast<double>(weights_->bytes()));
    o.Set("variant", GemmVariantName(weights_->variant()));
    o.Set("ukernel", weights_->ukernel().name);
  }
  return o;
}

}  // namespace sonde
