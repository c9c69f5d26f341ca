#include "binding/gemm_binding.h"
#include "binding/shared_handle.h"

#include <new>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gemm_call.h"

namespace sonde {

void Describe(Napi::Object& o, const PackedGemmWeights& w) {
  o.Set("k", static_cast<double>(w.k()));
  o.Set("n", static_cast<double>(w.n()));
  o.Set("bytes", static_cast<double>(w.bytes()));
  o.Set("variant", GemmVariantName(w.variant()));
  o.Set("ukernel", w.ukernel().name);
}


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
  if (PackedGemmHandle::Is(addon, kPackedGemmClass, info[1])) {
    job->packed = PackedGemmHandle::Get(info[1]);
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
  return PackedGemmHandle::Wrap(env, addon, kPackedGemmClass, std::move(w));
}

void RegisterGemmBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  PackedGemmHandle::Register(env, addon, kPackedGemmClass);
  addon.Export(env, exports, "gemm", Gemm);
  addon.Export(env, exports, "packGemmWeights", PackGemmWeights);
}

}  // namespace sonde
