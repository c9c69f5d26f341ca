// Bindings of the elementwise family. lib/kernels/elementwise.ts validates everything first and
// names the user's parameter; the checks here are the cheap second line that guarantees no call
// through the binding can read or write out of bounds. Outputs are allocated in JS and written here.
#include <algorithm>
#include <climits>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "binding/addon.h"
#include "binding/families.h"
#include "ops/elementwise.h"

namespace sonde {

namespace {

[[noreturn]] void Invalid(Napi::Env env, const char* fn, const std::string& what) {
  throw MakeError(env, codes::kInvalidArgument, std::string(fn) + ": " + what);
}

template <typename T>
Napi::TypedArrayOf<T> ArrayArg(const Napi::CallbackInfo& info, size_t i, napi_typedarray_type type,
                               const char* fn, const char* name, const char* type_name) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    Invalid(info.Env(), fn, std::string(name) + (std::strchr("AEIOU", type_name[0]) ? " must be an " : " must be a ") + type_name);
  return v.As<Napi::TypedArrayOf<T>>();
}

Napi::Float32Array F32Arg(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name) {
  return ArrayArg<float>(info, i, napi_float32_array, fn, name, "Float32Array");
}

size_t SizeArg(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name) {
  Napi::Value v = info[i];
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    Invalid(info.Env(), fn, std::string(name) + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

// dims as a JS array of non-negative integers; *count gets their product (checked for overflow).
Dims DimsArg(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name, size_t* count) {
  Napi::Value v = info[i];
  if (!v.IsArray()) Invalid(info.Env(), fn, std::string(name) + " must be an array");
  Napi::Array arr = v.As<Napi::Array>();
  Dims dims(arr.Length());
  size_t total = 1;
  for (uint32_t d = 0; d < arr.Length(); ++d) {
    Napi::Value e = arr.Get(d);
    double x = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : -1;
    if (!(x >= 0 && x <= 9007199254740991.0) || x != static_cast<double>(static_cast<uint64_t>(x)))
      Invalid(info.Env(), fn, std::string(name) + " must hold non-negative integers");
    dims[d] = static_cast<size_t>(x);
    if (__builtin_mul_overflow(total, dims[d], &total)) Invalid(info.Env(), fn, std::string(name) + " overflows");
  }
  *count = total;
  return dims;
}

kernels::ElementwiseUkernels VariantArg(const Napi::CallbackInfo& info, size_t i, const char* fn) {
  ElementwiseVariant v;
  if (!info[i].IsString() || !ParseElementwiseVariant(info[i].As<Napi::String>(), &v)) Invalid(info.Env(), fn, "unknown variant");
  std::string why = ElementwiseVariantUnavailable(v);
  if (!why.empty()) throw MakeError(info.Env(), codes::kDeviceUnavailable, std::string(fn) + ": variant unavailable: " + why);
  return ElementwiseTable(v);
}

unsigned ThreadsArg(const Napi::CallbackInfo& info, size_t i) {
  return info[i].IsNumber() ? std::min<uint32_t>(1024, info[i].As<Napi::Number>().Uint32Value()) : 0;
}

// One job type for the whole family: the binding captures plain pointers and sizes into `run`, and
// Execute hands it the pool context. Every TypedArray it touches is Keep()-ed by the binding.
class ElementwiseJob : public AsyncJob {
 public:
  kernels::ElementwiseUkernels uk{};
  std::function<bool(const ElementwiseContext&)> run;
  void Execute(Addon& addon) override {
    ElementwiseContext ctx{&addon.pool(), threads, cancel.get(), uk};
    run(ctx);  // a cancelled run is reported by Start() from the cancel flag
  }
};

std::unique_ptr<ElementwiseJob> NewJob(const Napi::CallbackInfo& info, size_t expected, const char* fn) {
  if (info.Length() < expected) Invalid(info.Env(), fn, "expected " + std::to_string(expected) + " arguments");
  return std::make_unique<ElementwiseJob>();
}

void Finish(Addon& addon, const Napi::CallbackInfo& info, ElementwiseJob* job, size_t threads_at,
            std::initializer_list<size_t> kept) {
  job->threads = ThreadsArg(info, threads_at);
  for (size_t i : kept)
    if (!info[i].IsNull() && !info[i].IsUndefined()) job->Keep(info[i]);
  addon.AttachCancel(info, threads_at + 1, job);
}

}  // namespace

// elementwiseBinary(op, a, aDims, b, bDims, out, variant, threads, cancel?) -> Promise<void>
static Napi::Value ElementwiseBinary(Addon& addon, const Napi::CallbackInfo& info) {
  const char* fn = "elementwiseBinary";
  Napi::Env env = info.Env();
  auto job = NewJob(info, 8, fn);
  int32_t op = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : -1;
  if (op < kernels::kBinaryAdd || op > kernels::kBinaryDiv) Invalid(env, fn, "unknown op");
  size_t na, nb;
  Napi::Float32Array a = F32Arg(info, 1, fn, "a");
  Dims a_dims = DimsArg(info, 2, fn, "aDims", &na);
  Napi::Float32Array b = F32Arg(info, 3, fn, "b");
  Dims b_dims = DimsArg(info, 4, fn, "bDims", &nb);
  Napi::Float32Array out = F32Arg(info, 5, fn, "out");
  if (a.ElementLength() != na || b.ElementLength() != nb) Invalid(env, fn, "a and b must match their dims");
  Dims y_dims;
  if (!BroadcastDims(a_dims, b_dims, &y_dims)) Invalid(env, fn, "a and b do not broadcast");
  size_t ny = 1;
  // Broadcasting multiplies dims taken from both a and b, so the product can overflow even when
  // each input's own size did not.
  for (size_t d : y_dims)
    if (__builtin_mul_overflow(ny, d, &ny)) Invalid(env, fn, "the broadcast shape has too many elements");
  if (out.ElementLength() != ny) Invalid(env, fn, "out must hold the broadcast shape's elements");
  job->uk = VariantArg(info, 6, fn);
  const float *pa = a.Data(), *pb = b.Data();
  float* py = out.Data();
  job->run = [=](const ElementwiseContext& ctx) { return RunBinary(ctx, op, pa, a_dims, pb, b_dims, py); };
  Finish(addon, info, job.get(), 7, {1, 3, 5});
  return addon.Start(env, std::move(job));
}

// elementwiseUnary(op, x, out, variant, threads, cancel?) -> Promise<void>
static Napi::Value ElementwiseUnary(Addon& addon, const Napi::CallbackInfo& info) {
  const char* fn = "elementwiseUnary";
  Napi::Env env = info.Env();
  auto job = NewJob(info, 5, fn);
  int32_t op = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : -1;
  if (op < 0 || op >= kernels::kUnaryOpCount) Invalid(env, fn, "unknown op");
  Napi::Float32Array x = F32Arg(info, 1, fn, "x");
  Napi::Float32Array out = F32Arg(info, 2, fn, "out");
  if (out.ElementLength() != x.ElementLength()) Invalid(env, fn, "out must hold as many elements as x");
  job->uk = VariantArg(info, 3, fn);
  const size_t n = x.ElementLength();
  const float* px = x.Data();
  float* py = out.Data();
  job->run = [=](const ElementwiseContext& ctx) { return RunUnary(ctx, op, n, px, py); };
  Finish(addon, info, job.get(), 4, {1, 2});
  return addon.Start(env, std::move(job));
}

// softmax(x, dims, axis, out, variant, threads, cancel?) -> Promise<void>
static Napi::Value Softmax(Addon& addon, const Napi::CallbackInfo& info) {
  const char* fn = "softmax";
  Napi::Env env = info.Env();
  auto job = NewJob(info, 6, fn);
  size_t n;
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  Dims dims = DimsArg(info, 1, fn, "dims", &n);
  size_t axis = SizeArg(info, 2, fn, "axis");
  Napi::Float32Array out = F32Arg(info, 3, fn, "out");
  if (x.ElementLength() != n || out.ElementLength() != n) Invalid(env, fn, "x and out must match dims");
  if (axis >= dims.size()) Invalid(env, fn, "axis out of range");
  job->uk = VariantArg(info, 4, fn);
  const float* px = x.Data();
  float* py = out.Data();
  job->run = [=](const ElementwiseContext& ctx) { return RunSoftmax(ctx, px, dims, axis, py); };
  Finish(addon, info, job.get(), 5, {0, 3});
  return addon.Start(env, std::move(job));
}

// Optional Float32Array of exactly n elements (null/undefined: absent).
static const float* OptionalF32(const Napi::CallbackInfo& info, size_t i, size_t n, const char* fn, const char* name) {
  if (info[i].IsNull() || info[i].IsUndefined()) return nullptr;
  Napi::Float32Array a = F32Arg(info, i, fn, name);
  if (a.ElementLength() != n) Invalid(info.Env(), fn, std::string(name) + " must hold n elements");
  return a.Data();
}

// layerNorm(x, rows, n, gamma | null, beta | null, epsilon, out, variant, threads, cancel?)
// rmsNorm(x, rows, n, gamma | null, null, epsilon, out, variant, threads, cancel?)
template <bool Rms>
static Napi::Value Normalize(Addon& addon, const Napi::CallbackInfo& info) {
  const char* fn = Rms ? "rmsNorm" : "layerNorm";
  Napi::Env env = info.Env();
  auto job = NewJob(info, 9, fn);
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  size_t rows = SizeArg(info, 1, fn, "rows"), n = SizeArg(info, 2, fn, "n"), total;
  if (__builtin_mul_overflow(rows, n, &total) || x.ElementLength() != total) Invalid(env, fn, "x must hold rows*n elements");
  const float* gamma = OptionalF32(info, 3, n, fn, "gamma");
  const float* beta = Rms ? nullptr : OptionalF32(info, 4, n, fn, "beta");
  double eps = info[5].IsNumber() ? info[5].As<Napi::Number>().DoubleValue() : -1;
  if (!(eps >= 0 && eps <= 1e30)) Invalid(env, fn, "epsilon must be a finite non-negative number");
  Napi::Float32Array out = F32Arg(info, 6, fn, "out");
  if (out.ElementLength() != total) Invalid(env, fn, "out must hold rows*n elements");
  job->uk = VariantArg(info, 7, fn);
  const float* px = x.Data();
  float* py = out.Data();
  const float e = static_cast<float>(eps);
  job->run = [=](const ElementwiseContext& ctx) {
    return Rms ? RunRmsNorm(ctx, px, rows, n, gamma, e, py) : RunLayerNorm(ctx, px, rows, n, gamma, beta, e, py);
  };
  Finish(addon, info, job.get(), 8, {0, 3, 4, 6});
  return addon.Start(env, std::move(job));
}

// argmax(x, dims, axis, out: BigInt64Array, threads, cancel?) -> Promise<void>
static Napi::Value Argmax(Addon& addon, const Napi::CallbackInfo& info) {
  const char* fn = "argmax";
  Napi::Env env = info.Env();
  auto job = NewJob(info, 5, fn);
  size_t n;
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  Dims dims = DimsArg(info, 1, fn, "dims", &n);
  size_t axis = SizeArg(info, 2, fn, "axis");
  if (x.ElementLength() != n) Invalid(env, fn, "x must match dims");
  if (axis >= dims.size() || dims[axis] == 0) Invalid(env, fn, "axis out of range or empty");
  auto out = ArrayArg<int64_t>(info, 3, napi_bigint64_array, fn, "out", "BigInt64Array");
  if (out.ElementLength() != n / dims[axis]) Invalid(env, fn, "out must hold one element per reduced slice");
  job->uk = ElementwiseTable(ElementwiseVariant::kScalar);
  const float* px = x.Data();
  int64_t* py = out.Data();
  job->run = [=](const ElementwiseContext& ctx) { return RunArgmax(ctx, px, dims, axis, py); };
  Finish(addon, info, job.get(), 4, {0, 3});
  return addon.Start(env, std::move(job));
}

// topK(x, dims, axis, k, largest, values, indices, threads, cancel?) -> Promise<void>
static Napi::Value TopK(Addon& addon, const Napi::CallbackInfo& info) {
  const char* fn = "topK";
  Napi::Env env = info.Env();
  auto job = NewJob(info, 8, fn);
  size_t n;
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  Dims dims = DimsArg(info, 1, fn, "dims", &n);
  size_t axis = SizeArg(info, 2, fn, "axis"), k = SizeArg(info, 3, fn, "k");
  if (x.ElementLength() != n) Invalid(env, fn, "x must match dims");
  if (axis >= dims.size()) Invalid(env, fn, "axis out of range");
  if (k < 1 || k > dims[axis]) Invalid(env, fn, "k must be in [1, dims[axis]]");
  bool largest = info[4].ToBoolean();
  Napi::Float32Array values = F32Arg(info, 5, fn, "values");
  auto indices = ArrayArg<int64_t>(info, 6, napi_bigint64_array, fn, "indices", "BigInt64Array");
  const size_t m = n / dims[axis] * k;
  if (values.ElementLength() != m || indices.ElementLength() != m) Invalid(env, fn, "values and indices must hold k per slice");
  job->uk = ElementwiseTable(ElementwiseVariant::kScalar);
  const float* px = x.Data();
  float* pv = values.Data();
  int64_t* pi = indices.Data();
  job->run = [=](const ElementwiseContext& ctx) { return RunTopK(ctx, px, dims, axis, k, largest, pv, pi); };
  Finish(addon, info, job.get(), 7, {0, 5, 6});
  return addon.Start(env, std::move(job));
}

// cast(x, from, out, to, variant, threads, cancel?) -> Promise<void>; float32 data in a
// Float32Array, float16/bfloat16 bits in a Uint16Array.
static Napi::Value Cast(Addon& addon, const Napi::CallbackInfo& info) {
  const char* fn = "cast";
  Napi::Env env = info.Env();
  auto job = NewJob(info, 6, fn);
  CastType from, to;
  if (!info[1].IsString() || !ParseCastType(info[1].As<Napi::String>(), &from)) Invalid(env, fn, "unknown source dtype");
  if (!info[3].IsString() || !ParseCastType(info[3].As<Napi::String>(), &to)) Invalid(env, fn, "unknown target dtype");
  auto data_of = [&](size_t i, CastType t, const char* name, size_t* len) -> void* {
    if (t == CastType::kFloat32) {
      Napi::Float32Array a = F32Arg(info, i, fn, name);
      *len = a.ElementLength();
      return a.Data();
    }
    auto a = ArrayArg<uint16_t>(info, i, napi_uint16_array, fn, name, "Uint16Array");
    *len = a.ElementLength();
    return a.Data();
  };
  size_t nx, ny;
  const void* px = data_of(0, from, "x", &nx);
  void* py = data_of(2, to, "out", &ny);
  if (nx != ny) Invalid(env, fn, "out must hold as many elements as x");
  job->uk = VariantArg(info, 4, fn);
  job->run = [=](const ElementwiseContext& ctx) { return RunCast(ctx, from, px, to, py, nx); };
  Finish(addon, info, job.get(), 5, {0, 2});
  return addon.Start(env, std::move(job));
}

// Token sampling's two scans over one row of logits (lib/llm/sampling.ts), synchronous: a row of a
// 128k vocabulary takes the SIMD kernels 7-17 us on the JS thread, where the TypeScript loops they
// replace took 137 us (argmax) and 441 us (top-40), and a pool job would cost its hand-off again.
// sampleArgmax(x: Float32Array, variant) -> number
// sampleTopK(x: Float32Array, k, out: Int32Array, variant) -> number: the min(k, non-NaN count)
// best ids, best first, written to out[0..) (k <= out.length: no array is made per call).
// 'auto' is the common case: its table is looked up once, not parsed and copied per call.
const kernels::ElementwiseUkernels& SampleVariant(const Napi::CallbackInfo& info, size_t i, const char* fn,
                                                 kernels::ElementwiseUkernels* storage) {
  static const kernels::ElementwiseUkernels automatic = ElementwiseTable(ElementwiseVariant::kAuto);
  if (info[i].IsString() && info[i].As<Napi::String>().Utf8Value() == "auto") return automatic;
  *storage = VariantArg(info, i, fn);
  return *storage;
}

static Napi::Value SampleArgmaxBinding(Addon&, const Napi::CallbackInfo& info) {
  const char* fn = "sampleArgmax";
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  kernels::ElementwiseUkernels storage;
  const kernels::ElementwiseUkernels& uk = SampleVariant(info, 1, fn, &storage);
  if (x.ElementLength() == 0 || x.ElementLength() > static_cast<size_t>(INT32_MAX)) Invalid(info.Env(), fn, "x must hold 1 to 2^31 - 1 values");
  return Napi::Number::New(info.Env(), static_cast<double>(uk.sample_argmax(x.ElementLength(), x.Data())));
}

static Napi::Value SampleTopKBinding(Addon&, const Napi::CallbackInfo& info) {
  const char* fn = "sampleTopK";
  Napi::Env env = info.Env();
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  const size_t k = SizeArg(info, 1, fn, "k");
  auto out = ArrayArg<int32_t>(info, 2, napi_int32_array, fn, "out", "Int32Array");
  kernels::ElementwiseUkernels storage;
  const kernels::ElementwiseUkernels& uk = SampleVariant(info, 3, fn, &storage);
  const size_t n = x.ElementLength();
  if (n > static_cast<size_t>(INT32_MAX)) Invalid(env, fn, "x must hold at most 2^31 - 1 values");
  if (k < 1 || k > n) Invalid(env, fn, "k must be in [1, x.length]");
  if (out.ElementLength() < k) Invalid(env, fn, "out must hold k values");
  return Napi::Number::New(env, static_cast<double>(uk.sample_top_k(n, x.Data(), k, out.Data())));
}

// sampleExpSum(x: Float32Array, max: number, variant) -> number: top-p's normaliser, the sum of
// exp(x[i] - max) over the non-NaN x[i] (ElementwiseUkernels::sample_exp_sum).
static Napi::Value SampleExpSumBinding(Addon&, const Napi::CallbackInfo& info) {
  const char* fn = "sampleExpSum";
  Napi::Env env = info.Env();
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  if (info.Length() < 2 || !info[1].IsNumber()) Invalid(env, fn, "max must be a number");
  const float max = static_cast<float>(info[1].As<Napi::Number>().DoubleValue());
  kernels::ElementwiseUkernels storage;
  const kernels::ElementwiseUkernels& uk = SampleVariant(info, 2, fn, &storage);
  return Napi::Number::New(env, uk.sample_exp_sum(x.ElementLength(), x.Data(), max));
}

// sampleRank(x: Float32Array, out: Int32Array) -> number: every non-NaN id of x, larger value then
// lower id first, into out[0..) (out.length >= x.length); returns how many. One kernel (a radix
// sort, no variants): a 128k row in 1.3 ms where the TypeScript ranking took 12-13.
static Napi::Value SampleRankBinding(Addon&, const Napi::CallbackInfo& info) {
  const char* fn = "sampleRank";
  Napi::Env env = info.Env();
  Napi::Float32Array x = F32Arg(info, 0, fn, "x");
  auto out = ArrayArg<int32_t>(info, 1, napi_int32_array, fn, "out", "Int32Array");
  const size_t n = x.ElementLength();
  if (n > static_cast<size_t>(INT32_MAX)) Invalid(env, fn, "x must hold at most 2^31 - 1 values");
  if (out.ElementLength() < n) Invalid(env, fn, "out must hold x.length values");
  std::vector<uint32_t> scratch(3 * n);
  return Napi::Number::New(env, static_cast<double>(kernels::F32SampleRank(n, x.Data(), out.Data(), scratch.data())));
}

void RegisterElementwiseBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  addon.Export(env, exports, "sampleRank", SampleRankBinding);
  addon.Export(env, exports, "sampleArgmax", SampleArgmaxBinding);
  addon.Export(env, exports, "sampleTopK", SampleTopKBinding);
  addon.Export(env, exports, "sampleExpSum", SampleExpSumBinding);
  addon.Export(env, exports, "elementwiseBinary", ElementwiseBinary);
  addon.Export(env, exports, "elementwiseUnary", ElementwiseUnary);
  addon.Export(env, exports, "softmax", Softmax);
  addon.Export(env, exports, "layerNorm", Normalize<false>);
  addon.Export(env, exports, "rmsNorm", Normalize<true>);
  addon.Export(env, exports, "argmax", Argmax);
  addon.Export(env, exports, "topK", TopK);
  addon.Export(env, exports, "cast", Cast);
}

}  // namespace sonde
