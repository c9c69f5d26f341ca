// Bindings of the quantised-weight operator (ops/quant_matmul.h): quantMatmul() and
// quantDequantize(). Weights are either a Uint8Array in GGUF row layout (kernels.quantizeWeights)
// or a tensor of a mapped GGUF file (handle + tensor index): the job holds the file, so disposing it
// during a run unmaps only when the run is over.
#include <napi.h>

#include <memory>
#include <new>
#include <string>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gguf_binding.h"
#include "binding/quant_weights.h"
#include "ops/quant_matmul.h"

namespace sonde {

namespace {

size_t SizeValue(Napi::Env env, Napi::Value v, const std::string& where, const char* name) {
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    throw MakeError(env, codes::kInvalidArgument, where + ": " + name + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

Napi::Float32Array F32Value(Napi::Env env, Napi::Value v, const std::string& where, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw MakeError(env, codes::kInvalidArgument, where + ": " + name + " must be a Float32Array");
  return v.As<Napi::Float32Array>();
}

int32_t TypeValue(Napi::Env env, Napi::Value v, const std::string& where, size_t k) {
  int32_t type;
  if (!v.IsString() || !ParseQuantType(v.As<Napi::String>(), &type))
    throw MakeError(env, codes::kInvalidArgument, where + ": unknown weight type");
  if ((type == kernels::kQuantQ8_0 || type == kernels::kQuantQ4_0) && k % kernels::kQuantBlock != 0)
    throw MakeError(env, codes::kInvalidArgument, where + ": K must be a multiple of 32 for " + QuantTypeName(type));
  return type;
}

class QuantMatmulJob : public AsyncJob {
 public:
  QuantMatmulArgs args;
  QuantVariant variant = QuantVariant::kScalar;
  std::shared_ptr<const GgufFile> file;
  void Execute(Addon& addon) override { RunQuantMatmul(addon.pool(), threads, cancel.get(), args, variant); }
};

// quantMatmul(x, weights, tensorIndex, out, { m, k, n, type, variant, algorithm?, threads, cancel }) -> Promise<void>
Napi::Value QuantMatmul(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string where = "quantMatmul";
  if (info.Length() < 5 || !info[4].IsObject())
    throw MakeError(env, codes::kInvalidArgument, "quantMatmul: expected (x, weights, tensorIndex, out, options)");
  Napi::Object o = info[4].As<Napi::Object>();
  auto job = std::make_unique<QuantMatmulJob>();
  QuantMatmulArgs& a = job->args;
  a.m = SizeValue(env, o.Get("m"), where, "m");
  a.k = SizeValue(env, o.Get("k"), where, "k");
  a.n = SizeValue(env, o.Get("n"), where, "n");
  a.type = TypeValue(env, o.Get("type"), where, a.k);
  size_t mk, mn;
  Napi::Float32Array x = F32Value(env, info[0], where, "x");
  if (__builtin_mul_overflow(a.m, a.k, &mk) || x.ElementLength() != mk)
    throw MakeError(env, codes::kInvalidArgument, "quantMatmul: x must hold m * k elements");
  Napi::Float32Array out = F32Value(env, info[3], where, "out");
  if (__builtin_mul_overflow(a.m, a.n, &mn) || out.ElementLength() != mn)
    throw MakeError(env, codes::kInvalidArgument, "quantMatmul: out must hold m * n elements");
  WeightsRef w = ResolveWeights(addon, env, where, info[1], info[2], a.type, a.k, a.n);
  Napi::Value variant = o.Get("variant");
  QuantVariant v;
  if (!variant.IsString() || !ParseQuantVariant(variant.As<Napi::String>(), &v))
    throw MakeError(env, codes::kInvalidArgument, "quantMatmul: unknown variant");
  bool not_for_type;
  const std::string why = QuantVariantUnavailable(a.type, v, &not_for_type);
  if (!why.empty())
    throw MakeError(env, not_for_type ? codes::kInvalidArgument : codes::kDeviceUnavailable, "quantMatmul: options.variant: " + why);
  job->variant = ResolveQuantVariant(a.type, v);
  Napi::Value algorithm = o.Get("algorithm");
  if (!algorithm.IsUndefined() && (!algorithm.IsString() || !ParseQuantAlgorithm(algorithm.As<Napi::String>(), &a.algorithm)))
    throw MakeError(env, codes::kInvalidArgument, "quantMatmul: options.algorithm must be 'auto', 'gemv', 'gemm' or 'repacked'");
  if (a.algorithm == QuantAlgorithm::kRepacked && (a.type != kernels::kQuantQ8_0 || job->variant != QuantVariant::kAvx512Vnni))
    throw MakeError(env, codes::kInvalidArgument, std::string("quantMatmul: options.algorithm 'repacked' has a kernel for q8_0 weights at variant 'avx512vnni' only, got ") +
                                                      QuantTypeName(a.type) + " at '" + QuantVariantName(job->variant) + "'");
  if (a.algorithm == QuantAlgorithm::kGemm && !QuantGemmUkernel(a.type, job->variant).pack)
    throw MakeError(env, codes::kInvalidArgument, std::string("quantMatmul: options.algorithm 'gemm' has no kernel for ") +
                                                      QuantTypeName(a.type) + " weights at variant '" +
                                                      QuantVariantName(job->variant) +
                                                      "' (avx512 runs f32, f16 and bf16; avx512vnni q8_0 and q4_0)");
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  a.x = x.Data();
  a.ldx = a.k;
  a.w = w.data;
  a.y = out.Data();
  a.ldy = a.n;
  job->file = std::move(w.file);
  job->Keep(info[0]);
  job->Keep(info[1]);
  job->Keep(info[3]);
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

class DequantizeJob : public AsyncJob {
 public:
  const uint8_t* w = nullptr;
  int32_t type = 0;
  size_t n = 0, k = 0;
  float* out = nullptr;
  std::shared_ptr<const GgufFile> file;
  void Execute(Addon& addon) override { RunDequantize(addon.pool(), threads, cancel.get(), w, type, n, k, out); }
};

// quantDequantize(weights, tensorIndex, out, { k, n, type, threads, cancel }) -> Promise<void>
Napi::Value QuantDequantize(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string where = "dequantize";
  if (info.Length() < 4 || !info[3].IsObject())
    throw MakeError(env, codes::kInvalidArgument, "dequantize: expected (weights, tensorIndex, out, options)");
  Napi::Object o = info[3].As<Napi::Object>();
  auto job = std::make_unique<DequantizeJob>();
  job->k = SizeValue(env, o.Get("k"), where, "k");
  job->n = SizeValue(env, o.Get("n"), where, "n");
  job->type = TypeValue(env, o.Get("type"), where, job->k);
  WeightsRef w = ResolveWeights(addon, env, where, info[0], info[1], job->type, job->k, job->n);
  Napi::Float32Array out = F32Value(env, info[2], where, "out");
  if (out.ElementLength() != job->n * job->k)  // n * k checked for overflow above
    throw MakeError(env, codes::kInvalidArgument, "dequantize: out must hold n * k elements");
  job->w = w.data;
  job->file = std::move(w.file);
  job->out = out.Data();
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  job->Keep(info[0]);
  job->Keep(info[2]);
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

}  // namespace

// Second line of validation (lib/ checks first and names the user's parameter): after this, the
// kernel can read n rows of k elements of `type` from the returned pointer.
WeightsRef ResolveWeights(Addon& addon, Napi::Env env, const std::string& where, Napi::Value w, Napi::Value index,
                          int32_t type, size_t k, size_t n) {
  WeightsRef r;
  size_t nk;
  if (__builtin_mul_overflow(n, k, &nk)) throw MakeError(env, codes::kInvalidArgument, where + ": n * k overflows");
  // Up to 4 bytes per element (f32): n * k not overflowing does not make the byte count safe.
  size_t need;
  if (__builtin_mul_overflow(kernels::QuantRowBytes(type, k), n, &need))
    throw MakeError(env, codes::kInvalidArgument, where + ": the weights' byte size overflows");
  if (IsGgufHandle(addon, w)) {
    r.file = UnwrapGgufHandle(addon, w, where.c_str());
    const size_t i = SizeValue(env, index, where, "tensor index");
    if (i >= r.file->tensors().size()) throw MakeError(env, codes::kInvalidArgument, where + ": tensor index out of range");
    const GgufTensorInfo& ti = r.file->tensors()[i];
    int32_t t;
    if (!QuantTypeFromGgml(ti.type, &t) || t != type)
      throw MakeError(env, codes::kInvalidArgument, where + ": tensor '" + ti.name + "' is of type " + GgmlTypeInfo(ti.type)->name +
                                                        ", not " + QuantTypeName(type));
    if (ti.dims[0] != k || ti.elements != nk || ti.bytes != need)
      throw MakeError(env, codes::kInvalidArgument, where + ": tensor '" + ti.name + "' is not " + std::to_string(n) + " rows of " +
                                                        std::to_string(k));
    r.data = r.file->TensorData(i);
    return r;
  }
  if (!w.IsTypedArray() || w.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw MakeError(env, codes::kInvalidArgument, where + ": weights must be a Uint8Array or a GGUF tensor");
  Napi::Uint8Array u = w.As<Napi::Uint8Array>();
  if (u.ByteLength() != need)
    throw MakeError(env, codes::kInvalidArgument, where + ": weights must hold " + std::to_string(need) + " bytes (" +
                                                      std::to_string(n) + " rows of " + std::to_string(k) + " " +
                                                      QuantTypeName(type) + ")");
  r.data = u.Data();
  return r;
}


void RegisterQuantBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  addon.Export(env, exports, "quantMatmul", QuantMatmul);
  addon.Export(env, exports, "quantDequantize", QuantDequantize);
}

}  // namespace sonde
