// Bindings of the low-precision-weight GEMM (ops/gemm_lowp.h): packGemmWeightsLowp() and
// gemmLowp(). The options object of gemmLowp is the one gemm() takes (lib/binding.ts:
// NativeGemmOptions), so lib/kernels/gemm.ts routes either way with the same validation.
#include <napi.h>

#include <memory>
#include <new>

#include "binding/addon.h"
#include "binding/families.h"
#include "ops/gemm_lowp.h"

namespace sonde {

namespace {

// Second line of validation: lib/ checks everything first and names the user's parameter; these
// checks only guarantee that no call through the binding can read or write out of bounds.
Napi::Float32Array F32Value(Napi::Env env, Napi::Value v, const char* where, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": " + name + " must be a Float32Array");
  return v.As<Napi::Float32Array>();
}

size_t SizeValue(Napi::Env env, Napi::Value v, const char* where, const char* name) {
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": " + name + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

// Elements a rows x cols matrix with leading dimension ld spans (0 when empty).
bool SpanOf(size_t rows, size_t cols, size_t ld, size_t* out) {
  if (rows == 0 || cols == 0) { *out = 0; return true; }
  size_t t;
  if (ld < cols || __builtin_mul_overflow(rows - 1, ld, &t) || __builtin_add_overflow(t, cols, out)) return false;
  return true;
}

// JS handle of packed low-precision weights; running jobs share them, so dispose() during a run
// frees them when that run finishes.
class PackedLowpGemmHandle : public Napi::ObjectWrap<PackedLowpGemmHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "PackedLowpGemmHandle", {
        InstanceMethod("dispose", &PackedLowpGemmHandle::Dispose),
        InstanceMethod("info", &PackedLowpGemmHandle::Info),
    });
  }
  explicit PackedLowpGemmHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PackedLowpGemmHandle>(info) {}
  ~PackedLowpGemmHandle() override {
    int64_t total;  // a GC finalizer, possibly at teardown: the C call cannot throw
    if (reported_bytes_) napi_adjust_external_memory(Env(), -reported_bytes_, &total);
  }
  void Adopt(Napi::Env env, std::shared_ptr<const PackedLowpGemmWeights> w) {
    weights_ = std::move(w);
    reported_bytes_ = static_cast<int64_t>(weights_->bytes());
    Napi::MemoryManagement::AdjustExternalMemory(env, reported_bytes_);
  }
  std::shared_ptr<const PackedLowpGemmWeights> weights() const { return weights_; }

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    weights_.reset();
    if (reported_bytes_) Napi::MemoryManagement::AdjustExternalMemory(info.Env(), -reported_bytes_);
    reported_bytes_ = 0;
    return info.Env().Undefined();
  }
  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("disposed", !weights_);
    if (weights_) {
      o.Set("k", static_cast<double>(weights_->k()));
      o.Set("n", static_cast<double>(weights_->n()));
      o.Set("bytes", static_cast<double>(weights_->bytes()));
      o.Set("precision", GemmPrecisionName(weights_->precision()));
      o.Set("variant", LowpGemmVariantName(weights_->variant()));
      o.Set("ukernel", weights_->ukernel().name);
      o.Set("activations", weights_->ActivationForm());
    }
    return o;
  }
  std::shared_ptr<const PackedLowpGemmWeights> weights_;
  int64_t reported_bytes_ = 0;
};

class GemmLowpJob : public AsyncJob {
 public:
  LowpGemmArgs args;
  bool reference = false;
  std::shared_ptr<const PackedLowpGemmWeights> packed;
  void Execute(Addon& addon) override { RunLowpGemm(addon.pool(), threads, cancel.get(), args, *packed, reference); }
};

// gemmLowp(a, packedLowp, out, options) -> Promise<void>; options as gemm() (NativeGemmOptions).
Napi::Value GemmLowp(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "gemm";
  if (info.Length() < 4 || !info[3].IsObject())
    throw MakeError(env, codes::kInvalidArgument, "gemm: expected (a, packed, out, options)");
  Napi::Object o = info[3].As<Napi::Object>();
  auto job = std::make_unique<GemmLowpJob>();
  const size_t m = SizeValue(env, o.Get("m"), where, "m"), k = SizeValue(env, o.Get("k"), where, "k"),
               n = SizeValue(env, o.Get("n"), where, "n");
  const size_t lda = SizeValue(env, o.Get("lda"), where, "lda"), ldc = SizeValue(env, o.Get("ldc"), where, "ldc");
  size_t span;
  Napi::Float32Array a = F32Value(env, info[0], where, "a");
  if (!SpanOf(m, k, lda, &span) || a.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, "gemm: a must hold m rows of lda >= k elements");
  if (!info[1].IsObject() || !info[1].As<Napi::Object>().InstanceOf(addon.Class("PackedLowpGemmHandle").Value()))
    throw MakeError(env, codes::kInvalidArgument, "gemm: b must be low-precision packed weights");
  job->packed = PackedLowpGemmHandle::Unwrap(info[1].As<Napi::Object>())->weights();
  if (!job->packed) throw MakeError(env, codes::kDisposed, "gemm: the packed weights have been disposed");
  if (job->packed->k() != k || job->packed->n() != n)
    throw MakeError(env, codes::kInvalidArgument, "gemm: packed weights do not match k and n");
  Napi::Float32Array out = F32Value(env, info[2], where, "out");
  if (!SpanOf(m, n, ldc, &span) || out.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, "gemm: out must hold m rows of ldc >= n elements");
  job->Keep(info[0]);
  job->Keep(info[1]);
  job->Keep(info[2]);
  kernels::GemmEpilogue& ep = job->args.epilogue;
  auto column_vector = [&](const char* key) -> const float* {
    Napi::Value v = o.Get(key);
    if (v.IsUndefined() || v.IsNull()) return nullptr;
    Napi::Float32Array t = F32Value(env, v, where, key);
    if (t.ElementLength() != n) throw MakeError(env, codes::kInvalidArgument, std::string("gemm: ") + key + " must hold n elements");
    job->Keep(v);
    return t.Data();
  };
  ep.bias = column_vector("bias");
  ep.scale = column_vector("scale");
  Napi::Value rv = o.Get("residual");
  if (!rv.IsUndefined() && !rv.IsNull()) {
    Napi::Float32Array r = F32Value(env, rv, where, "residual");
    ep.ldr = SizeValue(env, o.Get("ldr"), where, "ldr");
    if (!SpanOf(m, n, ep.ldr, &span) || r.ElementLength() < span)
      throw MakeError(env, codes::kInvalidArgument, "gemm: residual must hold m rows of ldr >= n elements");
    ep.residual = r.Data();
    job->Keep(rv);
  }
  ep.residual_before_activation = o.Get("residualBeforeActivation").ToBoolean().Value() ? 1 : 0;
  Napi::Value act = o.Get("activation");
  ep.activation = act.IsNumber() ? act.As<Napi::Number>().Int32Value() : -1;
  if (ep.activation < 0 || ep.activation >= kernels::kActCount)
    throw MakeError(env, codes::kInvalidArgument, "gemm: unknown activation");
  Napi::Value alpha = o.Get("alpha"), beta = o.Get("beta");
  ep.alpha = alpha.IsNumber() ? alpha.As<Napi::Number>().FloatValue() : 0.0f;
  ep.beta = beta.IsNumber() ? beta.As<Napi::Number>().FloatValue() : 0.0f;
  Napi::Value variant = o.Get("variant");
  LowpGemmVariant v;
  if (!variant.IsString() || !ParseLowpGemmVariant(variant.As<Napi::String>(), &v))
    throw MakeError(env, codes::kInvalidArgument, "gemm: unknown variant");
  if (v != LowpGemmVariant::kAuto && v != LowpGemmVariant::kReference && v != job->packed->variant())
    throw MakeError(env, codes::kInvalidArgument,
                    std::string("gemm: weights were packed for '") + LowpGemmVariantName(job->packed->variant()) +
                        "', not '" + LowpGemmVariantName(v) + "'");
  job->reference = v == LowpGemmVariant::kReference;
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  job->args.a = a.Data();
  job->args.m = m;
  job->args.lda = lda;
  job->args.c = out.Data();
  job->args.ldc = ldc;
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

// packGemmWeightsLowp(b, k, n, precision, variant) -> PackedLowpGemmHandle (synchronous: one pass
// over B).
Napi::Value PackGemmWeightsLowp(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "packGemmWeights";
  if (info.Length() < 5) throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: expected 5 arguments");
  Napi::Float32Array b = F32Value(env, info[0], where, "b");
  const size_t k = SizeValue(env, info[1], where, "k"), n = SizeValue(env, info[2], where, "n");
  size_t kn;
  if (__builtin_mul_overflow(k, n, &kn) || b.ElementLength() != kn)
    throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: b must hold k*n elements");
  GemmPrecision p;
  if (!info[3].IsString() || !ParseGemmPrecision(info[3].As<Napi::String>(), &p) || p == GemmPrecision::kFp32)
    throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: unknown low precision");
  LowpGemmVariant v;
  if (!info[4].IsString() || !ParseLowpGemmVariant(info[4].As<Napi::String>(), &v) || v == LowpGemmVariant::kReference)
    throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: unknown variant");
  bool not_for_precision;
  const std::string why = LowpGemmVariantUnavailable(p, v, &not_for_precision);
  if (!why.empty())
    throw MakeError(env, not_for_precision ? codes::kInvalidArgument : codes::kDeviceUnavailable,
                    "packGemmWeights: options.variant: " + why);
  std::shared_ptr<const PackedLowpGemmWeights> w;
  std::string error;
  try {
    w = PackedLowpGemmWeights::Pack(b.Data(), k, n, n, p, v, &error);
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "packGemmWeights: out of host memory");
  }
  if (!w) throw MakeError(env, codes::kInvalidArgument, "packGemmWeights(b): " + error);
  Napi::Object obj = addon.Class("PackedLowpGemmHandle").New({});
  PackedLowpGemmHandle::Unwrap(obj)->Adopt(env, std::move(w));
  return obj;
}

}  // namespace

void RegisterGemmLowpBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  addon.Class("PackedLowpGemmHandle") = Napi::Persistent(PackedLowpGemmHandle::Define(env));
  addon.Export(env, exports, "gemmLowp", GemmLowp);
  addon.Export(env, exports, "packGemmWeightsLowp", PackGemmWeightsLowp);
}

}  // namespace sonde
