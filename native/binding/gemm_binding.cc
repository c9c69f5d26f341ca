#include "binding/gemm_binding.h"

#include <new>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gemm_call.h"

namespace sonde {

namespace {

class GemmJob : public AsyncJob {
 public:
  GemmVariant variant = GemmVariant::kAuto;
  GemmArgs args;
  size_t k = 0, n = 0;
  const float* b = nullptr;  // unpacked B (when packed is null)
  std::shared_ptr<const PackedGemmWeights> packed;

  void Execute(Addon& addon) override {
    if (variant == GemmVariant::kReference) {
      addon.pool().ParallelFor(args.m, threads, [&](size_t i) {
        const kernels::GemmEpilogue ep = OffsetEpilogue(args.epilogue, i, 0);
        kernels::F32GemmReference(1, n, k, args.a + i * args.lda, args.lda, b, n, args.c + i * args.ldc,
                                  args.ldc, &ep);
      }, cancel.get());
      return;
    }
    std::shared_ptr<const PackedGemmWeights> w = packed;
    if (!w) w = PackedGemmWeights::Pack(b, k, n, n, variant);
    RunGemm(addon.pool(), threads, cancel.get(), args, *w);
  }
};

}  // namespace

// gemm(a, b | packed, out, options) -> Promise<void>, where options =
//   { m, k, n, lda, ldc, bias?, scale?, residual?, ldr?, activation, alpha, beta,
//     residualBeforeActivation, variant, threads, cancel? }
// a holds m rows of lda (>= k) floats, out m rows of ldc (>= n), residual m rows of ldr (>= n).
static Napi::Value Gemm(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto job = std::make_unique<GemmJob>();
  const GemmCall call = ParseGemmCall(addon, info, "gemm", job.get());
  if (info[1].IsObject() && info[1].As<Napi::Object>().InstanceOf(addon.Class("PackedGemmHandle").Value())) {
    auto* h = PackedGemmHandle::Unwrap(info[1].As<Napi::Object>());
    job->packed = h->weights();
    if (!job->packed) throw MakeError(env, codes::kDisposed, "gemm: the packed weights have been disposed");
    if (job->packed->k() != call.k || job->packed->n() != call.n)
      throw MakeError(env, codes::kInvalidArgument, "gemm: packed weights do not match k and n");
  } else {
    Napi::Float32Array b = F32Value(env, info[1], "gemm", "b");
    size_t kn;
    if (__builtin_mul_overflow(call.k, call.n, &kn) || b.ElementLength() != kn)
      throw MakeError(env, codes::kInvalidArgument, "gemm: b must hold k*n elements");
    job->b = b.Data();
  }
  job->Keep(info[1]);
  Napi::Value variant = info[3].As<Napi::Object>().Get("variant");
  if (!variant.IsString() || !ParseGemmVariant(variant.As<Napi::String>(), &job->variant))
    throw MakeError(env, codes::kInvalidArgument, "gemm: unknown variant");
  std::string why = GemmVariantUnavailable(job->variant);
  if (!why.empty()) throw MakeError(env, codes::kDeviceUnavailable, "gemm: variant unavailable: " + why);
  if (job->packed && job->variant != GemmVariant::kAuto && job->variant != job->packed->variant())
    throw MakeError(env, codes::kInvalidArgument,
                    std::string("gemm: weights were packed for '") + GemmVariantName(job->packed->variant()) +
                        "', not '" + GemmVariantName(job->variant) + "'");
  if (job->packed) job->variant = job->packed->variant();
  job->args.a = call.a;
  job->args.m = call.m;
  job->args.lda = call.lda;
  job->args.c = call.c;
  job->args.ldc = call.ldc;
  job->args.epilogue = call.epilogue;
  job->k = call.k;
  job->n = call.n;
  return addon.Start(env, std::move(job));
}

// packGemmWeights(b, k, n, variant) -> PackedGemmHandle (synchronous: packing is one pass over B)
static Napi::Value PackGemmWeights(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4) throw MakeError(env, codes::kInvalidArgument, "packGemmWeights: expected 4 arguments");
  Napi::Float32Array b = F32Value(env, info[0], "packGemmWeights", "b");
  size_t k = SizeValue(env, info[1], "packGemmWeights", "k"), n = SizeValue(env, info[2], "packGemmWeights", "n"), kn;
  if (__builtin_mul_overflow(k, n, &kn) || b.ElementLength() != kn)
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
