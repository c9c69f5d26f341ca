// Bindings of the low-precision-weight GEMM (ops/gemm_lowp.h): packGemmWeightsLowp() and
// gemmLowp(). The options object of gemmLowp is the one gemm() takes (lib/binding.ts:
// NativeGemmOptions), so lib/kernels/gemm.ts routes either way with the same validation.
#include <napi.h>

#include <memory>
#include <new>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gemm_call.h"
#include "ops/gemm_lowp.h"

namespace sonde {

namespace {

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
  Napi::Object o = info.Length() > 3 && info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(env);
  auto job = std::make_unique<GemmLowpJob>();
  const GemmCall call = ParseGemmCall(addon, info, where, job.get());
  if (!info[1].IsObject() || !info[1].As<Napi::Object>().InstanceOf(addon.Class("PackedLowpGemmHandle").Value()))
    throw MakeError(env, codes::kInvalidArgument, "gemm: b must be low-precision packed weights");
  job->packed = PackedLowpGemmHandle::Unwrap(info[1].As<Napi::Object>())->weights();
  if (!job->packed) throw MakeError(env, codes::kDisposed, "gemm: the packed weights have been disposed");
  if (job->packed->k() != call.k || job->packed->n() != call.n)
    throw MakeError(env, codes::kInvalidArgument, "gemm: packed weights do not match k and n");
  job->Keep(info[1]);
  job->args.epilogue = call.epilogue;
  Napi::Value variant = o.Get("variant");
  LowpGemmVariant v;
  if (!variant.IsString() || !ParseLowpGemmVariant(variant.As<Napi::String>(), &v))
    throw MakeError(env, codes::kInvalidArgument, "gemm: unknown variant");
  if (v != LowpGemmVariant::kAuto && v != LowpGemmVariant::kReference && v != job->packed->variant())
    throw MakeError(env, codes::kInvalidArgument,
                    std::string("gemm: weights were packed for '") + LowpGemmVariantName(job->packed->variant()) +
                        "', not '" + LowpGemmVariantName(v) + "'");
  job->reference = v == LowpGemmVariant::kReference;
  job->args.a = call.a;
  job->args.m = call.m;
  job->args.lda = call.lda;
  job->args.c = call.c;
  job->args.ldc = call.ldc;
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
