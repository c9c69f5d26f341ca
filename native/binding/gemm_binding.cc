#include "binding/gemm_binding.h"

#include <new>

#include "binding/addon.h"
#include "binding/families.h"

namespace sonde {

namespace {

// Second line of validation: lib/ checks everything first and names the user's parameter; these
// checks only guarantee that no call through the binding can read or write out of bounds.
Napi::Float32Array F32Value(Napi::Env env, Napi::Value v, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw MakeError(env, codes::kInvalidArgument, std::string("gemm: ") + name + " must be a Float32Array");
  return v.As<Napi::Float32Array>();
}

Napi::Float32Array F32Arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  return F32Value(info.Env(), info[i], name);
}

size_t SizeValue(Napi::Env env, Napi::Value v, const char* name) {
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    throw MakeError(env, codes::kInvalidArgument, std::string("gemm: ") + name + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

size_t SizeArg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  return SizeValue(info.Env(), info[i], name);
}

bool MulOverflows(size_t a, size_t b, size_t* out) { return __builtin_mul_overflow(a, b, out); }

// Elements a rows x cols matrix with leading dimension ld spans (0 when empty).
bool SpanOf(size_t rows, size_t cols, size_t ld, size_t* out) {
  if (rows == 0 || cols == 0) { *out = 0; return true; }
  size_t t;
  if (ld < cols || MulOverflows(rows - 1, ld, &t) || __builtin_add_overflow(t, cols, out)) return false;
  return true;
}

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
  if (info.Length() < 4 || !info[3].IsObject())
    throw MakeError(env, codes::kInvalidArgument, "gemm: expected (a, b, out, options)");
  Napi::Object o = info[3].As<Napi::Object>();
  auto job = std::make_unique<GemmJob>();
  const size_t m = SizeValue(env, o.Get("m"), "m"), k = SizeValue(env, o.Get("k"), "k"),
               n = SizeValue(env, o.Get("n"), "n");
  const size_t lda = SizeValue(env, o.Get("lda"), "lda"), ldc = SizeValue(env, o.Get("ldc"), "ldc");
  size_t span, kn;
  Napi::Float32Array a = F32Arg(info, 0, "a");
  if (!SpanOf(m, k, lda, &span) || a.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, "gemm: a must hold m rows of lda >= k elements");
  if (info[1].IsObject() && info[1].As<Napi::Object>().InstanceOf(addon.Class("PackedGemmHandle").Value())) {
    auto* h = PackedGemmHandle::Unwrap(info[1].As<Napi::Object>());
    job->packed = h->weights();
    if (!job->packed) throw MakeError(env, codes::kDisposed, "gemm: the packed weights have been disposed");
    if (job->packed->k() != k || job->packed->n() != n)
      throw MakeError(env, codes::kInvalidArgument, "gemm: packed weights do not match k and n");
  } else {
    Napi::Float32Array b = F32Arg(info, 1, "b");
    if (MulOverflows(k, n, &kn) || b.ElementLength() != kn)
      throw MakeError(env, codes::kInvalidArgument, "gemm: b must hold k*n elements");
    job->b = b.Data();
  }
  Napi::Float32Array out = F32Arg(info, 2, "out");
  if (!SpanOf(m, n, ldc, &span) || out.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, "gemm: out must hold m rows of ldc >= n elements");
  job->Keep(info[0]);
  job->Keep(info[1]);
  job->Keep(info[2]);
  kernels::GemmEpilogue& ep = job->args.epilogue;
  auto column_vector = [&](const char* key) -> const float* {
    Napi::Value v = o.Get(key);
    if (v.IsUndefined() || v.IsNull()) return nullptr;
    Napi::Float32Array t = F32Value(env, v, key);
    if (t.ElementLength() != n) throw MakeError(env, codes::kInvalidArgument, std::string("gemm: ") + key + " must hold n elements");
    job->Keep(v);
    return t.Data();
  };
  ep.bias = column_vector("bias");
  ep.scale = column_vector("scale");
  Napi::Value rv = o.Get("residual");
  if (!rv.IsUndefined() && !rv.IsNull()) {
    Napi::Float32Array r = F32Value(env, rv, "residual");
    ep.ldr = SizeValue(env, o.Get("ldr"), "ldr");
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
  if (!variant.IsString() || !ParseGemmVariant(variant.As<Napi::String>(), &job->variant))
    throw MakeError(env, codes::kInvalidArgument, "gemm: unknown variant");
  std::string why = GemmVariantUnavailable(job->variant);
  if (!why.empty()) throw MakeError(env, codes::kDeviceUnavailable, "gemm: variant unavailable: " + why);
  if (job->packed && job->variant != GemmVariant::kAuto && job->variant != job->packed->variant())
    throw MakeError(env, codes::kInvalidArgument,
                    std::string("gemm: weights were packed for '") + GemmVariantName(job->packed->variant()) +
                        "', not '" + GemmVariantName(job->variant) + "'");
  if (job->packed) job->variant = job->packed->variant();
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  job->args.a = a.Data();
  job->args.m = m;
  job->args.lda = lda;
  job->args.c = out.Data();
  job->args.ldc = ldc;
  job->k = k;
  job->n = n;
  addon.AttachCancel(o.Get("cancel"), job.get());
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
