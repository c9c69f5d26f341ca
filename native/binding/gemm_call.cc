#include "binding/gemm_call.h"

#include <string>

namespace sonde {

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

bool SpanOf(size_t rows, size_t cols, size_t ld, size_t* out) {
  if (rows == 0 || cols == 0) {
    *out = 0;
    return true;
  }
  size_t t;
  if (ld < cols || __builtin_mul_overflow(rows - 1, ld, &t) || __builtin_add_overflow(t, cols, out)) return false;
  return true;
}

GemmCall ParseGemmCall(Addon& addon, const Napi::CallbackInfo& info, const char* where, AsyncJob* job) {
  Napi::Env env = info.Env();
  const std::string w(where);
  if (info.Length() < 4 || !info[3].IsObject())
    throw MakeError(env, codes::kInvalidArgument, w + ": expected (a, weights, out, options)");
  Napi::Object o = info[3].As<Napi::Object>();
  GemmCall call;
  call.m = SizeValue(env, o.Get("m"), where, "m");
  call.k = SizeValue(env, o.Get("k"), where, "k");
  call.n = SizeValue(env, o.Get("n"), where, "n");
  call.lda = SizeValue(env, o.Get("lda"), where, "lda");
  call.ldc = SizeValue(env, o.Get("ldc"), where, "ldc");
  size_t span;
  Napi::Float32Array a = F32Value(env, info[0], where, "a");
  if (!SpanOf(call.m, call.k, call.lda, &span) || a.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, w + ": a must hold m rows of lda >= k elements");
  Napi::Float32Array out = F32Value(env, info[2], where, "out");
  if (!SpanOf(call.m, call.n, call.ldc, &span) || out.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, w + ": out must hold m rows of ldc >= n elements");
  job->Keep(info[0]);
  job->Keep(info[2]);
  call.a = a.Data();
  call.c = out.Data();

  kernels::GemmEpilogue& ep = call.epilogue;
  auto column_vector = [&](const char* key) -> const float* {
    Napi::Value v = o.Get(key);
    if (v.IsUndefined() || v.IsNull()) return nullptr;
    Napi::Float32Array t = F32Value(env, v, where, key);
    if (t.ElementLength() != call.n) throw MakeError(env, codes::kInvalidArgument, w + ": " + key + " must hold n elements");
    job->Keep(v);
    return t.Data();
  };
  ep.bias = column_vector("bias");
  ep.scale = column_vector("scale");
  Napi::Value rv = o.Get("residual");
  if (!rv.IsUndefined() && !rv.IsNull()) {
    Napi::Float32Array r = F32Value(env, rv, where, "residual");
    ep.ldr = SizeValue(env, o.Get("ldr"), where, "ldr");
    if (!SpanOf(call.m, call.n, ep.ldr, &span) || r.ElementLength() < span)
      throw MakeError(env, codes::kInvalidArgument, w + ": residual must hold m rows of ldr >= n elements");
    ep.residual = r.Data();
    job->Keep(rv);
  }
  ep.residual_before_activation = o.Get("residualBeforeActivation").ToBoolean().Value() ? 1 : 0;
  Napi::Value act = o.Get("activation");
  ep.activation = act.IsNumber() ? act.As<Napi::Number>().Int32Value() : -1;
  if (ep.activation < 0 || ep.activation >= kernels::kActCount)
    throw MakeError(env, codes::kInvalidArgument, w + ": unknown activation");
  Napi::Value alpha = o.Get("alpha"), beta = o.Get("beta");
  ep.alpha = alpha.IsNumber() ? alpha.As<Napi::Number>().FloatValue() : 0.0f;
  ep.beta = beta.IsNumber() ? beta.As<Napi::Number>().FloatValue() : 0.0f;
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  addon.AttachCancel(o.Get("cancel"), job);
  return call;
}

}  // namespace sonde
