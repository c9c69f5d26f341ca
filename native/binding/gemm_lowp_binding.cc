// Bindings of the low-precision-weight GEMM (ops/gemm_lowp.h): packGemmWeightsLowp() and
// gemmLowp(). The options object of gemmLowp is the one gemm() takes (lib/binding.ts:
// NativeGemmOptions), so lib/kernels/gemm.ts routes either way with the same validation.
#include <napi.h>

#include <memory>
#include <new>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/shared_handle.h"
#include "binding/gemm_call.h"
#include "ops/gemm_lowp.h"

namespace sonde {

namespace {

}  // namespace

void Describe(Napi::Object& o, const PackedLowpGemmWeights& w) {
  o.Set("k", static_cast<double>(w.k()));
  o.Set("n", static_cast<double>(w.n()));
  o.Set("bytes", static_cast<double>(w.bytes()));
  o.Set("precision", GemmPrecisionName(w.precision()));
  o.Set("variant", LowpGemmVariantName(w.variant()));
  o.Set("ukernel", w.ukernel().name);
  o.Set("activations", w.ActivationForm());
}

// JS handle (shared with running jobs; see shared_handle.h).
using PackedLowpGemmHandle = SharedHandle<PackedLowpGemmWeights>;

namespace {

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
  if (!PackedLowpGemmHandle::Is(addon, "PackedLowpGemmHandle", info[1]))
    throw MakeError(env, codes::kInvalidArgument, "gemm: b must be low-precision packed weights");
  job->packed = PackedLowpGemmHandle::Get(info[1]);
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
  return PackedLowpGemmHandle::Wrap(env, addon, "PackedLowpGemmHandle", std::move(w));
}

}  // namespace

void RegisterGemmLowpBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  PackedLowpGemmHandle::Register(env, addon, "PackedLowpGemmHandle");
  addon.Export(env, exports, "gemmLowp", GemmLowp);
  addon.Export(env, exports, "packGemmWeightsLowp", PackGemmWeightsLowp);
}

}  // namespace sonde
