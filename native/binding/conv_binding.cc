// Bindings of the convolution family (ops/conv.h): createConv() -> ConvHandle (validated, folded and
// packed once; native memory reported to V8), convRun(), pool2d(), globalAveragePool().
// lib/kernels/conv.ts validates first and names the user's parameter; the checks here are the
// second line: nothing passed through the binding can make a kernel read or write out of bounds.
#include <napi.h>

#include <memory>
#include <new>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/shared_handle.h"
#include "ops/conv.h"

namespace sonde {

namespace {

Napi::Error Invalid(Napi::Env env, const char* where, const std::string& msg) {
  return MakeError(env, codes::kInvalidArgument, std::string(where) + ": " + msg);
}

Napi::Float32Array F32Value(Napi::Env env, Napi::Value v, const char* where, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Invalid(env, where, std::string(name) + " must be a Float32Array");
  return v.As<Napi::Float32Array>();
}

// Sizes are capped at 2^31 per value so that products of a few of them cannot overflow size_t
// before the explicit overflow checks below.
size_t SizeValue(Napi::Env env, Napi::Value v, const char* where, const char* name, size_t min = 0) {
  const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= static_cast<double>(min) && d <= 2147483647.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    throw Invalid(env, where, std::string(name) + " must be an integer in [" + std::to_string(min) + ", 2^31)");
  return static_cast<size_t>(d);
}

size_t Product(Napi::Env env, const char* where, std::initializer_list<size_t> xs) {
  size_t p = 1;
  for (size_t x : xs)
    if (__builtin_mul_overflow(p, x, &p)) throw Invalid(env, where, "tensor too large");
  return p;
}

// { kernel: [kh, kw], strides: [2], dilations: [2], pads: [t, l, b, r], autoPad: 0..3 }
WindowGeometry WindowValue(Napi::Env env, Napi::Object o, const char* where) {
  auto pair = [&](const char* key, size_t min) -> std::pair<size_t, size_t> {
    Napi::Value v = o.Get(key);
    if (!v.IsArray() || v.As<Napi::Array>().Length() != 2) throw Invalid(env, where, std::string(key) + " must be an array of 2");
    Napi::Array a = v.As<Napi::Array>();
    return {SizeValue(env, a.Get(0u), where, key, min), SizeValue(env, a.Get(1u), where, key, min)};
  };
  WindowGeometry g;
  std::tie(g.kh, g.kw) = pair("kernel", 1);
  std::tie(g.sh, g.sw) = pair("strides", 1);
  std::tie(g.dh, g.dw) = pair("dilations", 1);
  Napi::Value pv = o.Get("pads");
  if (!pv.IsArray() || pv.As<Napi::Array>().Length() != 4) throw Invalid(env, where, "pads must be an array of 4");
  Napi::Array pa = pv.As<Napi::Array>();
  g.pad_t = SizeValue(env, pa.Get(0u), where, "pads");
  g.pad_l = SizeValue(env, pa.Get(1u), where, "pads");
  g.pad_b = SizeValue(env, pa.Get(2u), where, "pads");
  g.pad_r = SizeValue(env, pa.Get(3u), where, "pads");
  const size_t ap = SizeValue(env, o.Get("autoPad"), where, "autoPad");
  if (ap > 3) throw Invalid(env, where, "autoPad must be 0..3");
  g.auto_pad = static_cast<ConvAutoPad>(ap);
  return g;
}

ConvVariant VariantValue(Napi::Env env, Napi::Value v, const char* where, ConvPrecision p) {
  ConvVariant variant;
  if (!v.IsString() || !ParseConvVariant(v.As<Napi::String>(), &variant)) throw Invalid(env, where, "unknown variant");
  const std::string why = ConvVariantUnavailable(variant, p);
  if (!why.empty()) throw MakeError(env, codes::kDeviceUnavailable, std::string(where) + ": variant unavailable: " + why);
  return variant;
}

}  // namespace

void Describe(Napi::Object& o, const ConvOp& w) {
  o.Set("bytes", static_cast<double>(w.bytes()));
  o.Set("path", w.path());
  o.Set("ukernel", w.ukernel());
  o.Set("variant", ConvVariantName(w.variant()));
  o.Set("precision", w.precision() == ConvPrecision::kBf16 ? "bf16" : "fp32");
  // Blocked (NCHW16c) operands in plans: 'x' = a blocked x with a blocked or NCHW y, 'xy' = both blocked.
  // 'y' = an NCHW x (a stem) with a blocked or NCHW y.
  if (w.blocked()) o.Set("blocked", w.blocked_needs_blocked_y() ? "xy" : "x");
  else if (w.blocked_y_from_nchw()) o.Set("blocked", "y");
  // It also reads and writes bf16 blocked operands (PlanBlocked.bf16).
  if (w.blocked_bf16()) o.Set("blockedBf16", true);
}

// JS handle (shared with running jobs; see shared_handle.h).
using ConvHandle = SharedHandle<ConvOp>;

namespace {

// createConv(weights, options) where options = { cOut, cIn, group, kernel, strides, dilations, pads,
// autoPad, bias?, bnScale?, bnBias?, bnMean?, bnVariance?, bnEpsilon, activation, alpha, beta,
// precision: 'fp32' | 'bf16', variant }. Synchronous: folding and packing are one pass over the weights.
Napi::Value CreateConv(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "createConv";
  if (info.Length() < 2 || !info[1].IsObject()) throw Invalid(env, where, "expected (weights, options)");
  Napi::Object o = info[1].As<Napi::Object>();
  ConvSpec spec;
  spec.c_out = SizeValue(env, o.Get("cOut"), where, "cOut", 1);
  spec.c_in = SizeValue(env, o.Get("cIn"), where, "cIn", 1);
  spec.group = SizeValue(env, o.Get("group"), where, "group", 1);
  spec.window = WindowValue(env, o, where);
  if (spec.c_in % spec.group || spec.c_out % spec.group) throw Invalid(env, where, "cIn and cOut must be multiples of group");
  Napi::Float32Array w = F32Value(env, info[0], where, "weights");
  if (w.ElementLength() != Product(env, where, {spec.c_out, spec.c_in / spec.group, spec.window.kh, spec.window.kw}))
    throw Invalid(env, where, "weights must hold cOut * cIn/group * kh * kw elements");
  auto vec = [&](const char* key) -> const float* {
    Napi::Value v = o.Get(key);
    if (v.IsUndefined() || v.IsNull()) return nullptr;
    Napi::Float32Array t = F32Value(env, v, where, key);
    if (t.ElementLength() != spec.c_out) throw Invalid(env, where, std::string(key) + " must hold cOut elements");
    return t.Data();
  };
  const float* bias = vec("bias");
  BatchNormParams bn;
  bn.scale = vec("bnScale");
  bn.bias = vec("bnBias");
  bn.mean = vec("bnMean");
  bn.variance = vec("bnVariance");
  const int have = !!bn.scale + !!bn.bias + !!bn.mean + !!bn.variance;
  if (have != 0 && have != 4) throw Invalid(env, where, "bn needs scale, bias, mean and variance");
  Napi::Value eps = o.Get("bnEpsilon");
  bn.epsilon = eps.IsNumber() ? eps.As<Napi::Number>().DoubleValue() : 1e-5;
  Napi::Value act = o.Get("activation");
  spec.activation = act.IsNumber() ? act.As<Napi::Number>().Int32Value() : -1;
  if (spec.activation < 0 || spec.activation >= kernels::kActCount) throw Invalid(env, where, "unknown activation");
  Napi::Value alpha = o.Get("alpha"), beta = o.Get("beta");
  spec.alpha = alpha.IsNumber() ? alpha.As<Napi::Number>().FloatValue() : 0.0f;
  spec.beta = beta.IsNumber() ? beta.As<Napi::Number>().FloatValue() : 0.0f;
  Napi::Value pr = o.Get("precision");
  const std::string prs = pr.IsString() ? pr.As<Napi::String>().Utf8Value() : "";
  if (prs != "fp32" && prs != "bf16") throw Invalid(env, where, "precision must be 'fp32' or 'bf16'");
  const ConvPrecision precision = prs == "bf16" ? ConvPrecision::kBf16 : ConvPrecision::kFp32;
  const ConvVariant variant = VariantValue(env, o.Get("variant"), where, precision);
  std::string error;
  std::shared_ptr<const ConvOp> op;
  try {
    op = ConvOp::Create(w.Data(), bias, have ? &bn : nullptr, spec, precision, variant, &error);
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "createConv: out of host memory");
  }
  if (!op) throw Invalid(env, where, error);
  return ConvHandle::Wrap(env, addon, "ConvHandle", std::move(op));
}

class ConvJob : public AsyncJob {
 public:
  std::shared_ptr<const ConvOp> op;
  const float* x = nullptr;
  float* y = nullptr;
  const float* residual = nullptr;
  bool residual_before = false;
  size_t n = 0, h = 0, w = 0;
  void Execute(Addon& addon) override {
    std::string error;
    if (!op->Run(addon.pool(), threads, cancel.get(), x, n, h, w, y, residual, residual_before, &error) &&
        !cancel->load())
      Fail(codes::kInvalidArgument, "conv2d: " + error);
  }
};

struct Dims4 {
  size_t n, c, h, w;
};

Dims4 DimsValue(Napi::Env env, Napi::Value v, const char* where) {
  if (!v.IsArray() || v.As<Napi::Array>().Length() != 4) throw Invalid(env, where, "dims must be [N, C, H, W]");
  Napi::Array a = v.As<Napi::Array>();
  return {SizeValue(env, a.Get(0u), where, "dims"), SizeValue(env, a.Get(1u), where, "dims"),
          SizeValue(env, a.Get(2u), where, "dims"), SizeValue(env, a.Get(3u), where, "dims")};
}

// convRun(handle, x, xDims, out, { residual?, residualBeforeActivation, threads, cancel? }) -> Promise<void>
Napi::Value ConvRun(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "conv2d";
  if (info.Length() < 5 || !info[4].IsObject()) throw Invalid(env, where, "expected (handle, x, dims, out, options)");
  if (!ConvHandle::Is(addon, "ConvHandle", info[0]))
    throw Invalid(env, where, "handle must be a ConvHandle");
  auto job = std::make_unique<ConvJob>();
  job->op = ConvHandle::Get(info[0]);
  if (!job->op) throw MakeError(env, codes::kDisposed, "conv2d: the convolution has been disposed");
  const ConvSpec& spec = job->op->spec();
  const Dims4 d = DimsValue(env, info[2], where);
  if (d.c != spec.c_in) throw Invalid(env, where, "x has " + std::to_string(d.c) + " channels, the weights expect " + std::to_string(spec.c_in));
  WindowShape s;
  const std::string e = ResolveWindow(spec.window, d.h, d.w, &s);
  if (!e.empty()) throw Invalid(env, where, e);
  Napi::Float32Array x = F32Value(env, info[1], where, "x");
  if (x.ElementLength() != Product(env, where, {d.n, d.c, d.h, d.w})) throw Invalid(env, where, "x must hold N*C*H*W elements");
  const size_t out_len = Product(env, where, {d.n, spec.c_out, s.oh, s.ow});
  Napi::Float32Array out = F32Value(env, info[3], where, "out");
  if (out.ElementLength() != out_len) throw Invalid(env, where, "out must hold N*C_out*OH*OW elements");
  Napi::Object o = info[4].As<Napi::Object>();
  Napi::Value rv = o.Get("residual");
  if (!rv.IsUndefined() && !rv.IsNull()) {
    Napi::Float32Array r = F32Value(env, rv, where, "residual");
    if (r.ElementLength() != out_len) throw Invalid(env, where, "residual must have the output's shape");
    job->residual = r.Data();
    job->Keep(rv);
  }
  job->residual_before = o.Get("residualBeforeActivation").ToBoolean().Value();
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  job->x = x.Data();
  job->y = out.Data();
  job->n = d.n;
  job->h = d.h;
  job->w = d.w;
  job->Keep(info[1]);
  job->Keep(info[3]);
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

class PoolJob : public AsyncJob {
 public:
  int kind = 0;  // 0 max, 1 average, 2 global average
  const float* x = nullptr;
  float* y = nullptr;
  size_t planes = 0, h = 0, w = 0;
  WindowGeometry g;
  bool count_include_pad = false;
  ConvVariant variant = ConvVariant::kAuto;
  void Execute(Addon& addon) override {
    std::string error;
    const bool ok = kind == 2
        ? RunGlobalAveragePool(addon.pool(), threads, cancel.get(), x, planes, h * w, variant, y, &error)
        : RunPool(addon.pool(), threads, cancel.get(), kind == 0 ? PoolKind::kMax : PoolKind::kAverage, x, planes, h,
                  w, g, count_include_pad, variant, y, &error);
    if (!ok && !cancel->load()) Fail(codes::kInvalidArgument, "pool: " + error);
  }
};

// pool2d(kind, x, xDims, out, { kernel, strides, dilations, pads, autoPad, countIncludePad, variant,
// threads, cancel? }); kind 0 max, 1 average, 2 global average (window fields ignored).
Napi::Value Pool2d(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "pool2d";
  if (info.Length() < 5 || !info[4].IsObject()) throw Invalid(env, where, "expected (kind, x, dims, out, options)");
  auto job = std::make_unique<PoolJob>();
  job->kind = static_cast<int>(SizeValue(env, info[0], where, "kind"));
  if (job->kind > 2) throw Invalid(env, where, "kind must be 0, 1 or 2");
  Napi::Object o = info[4].As<Napi::Object>();
  const Dims4 d = DimsValue(env, info[2], where);
  Napi::Float32Array x = F32Value(env, info[1], where, "x");
  if (x.ElementLength() != Product(env, where, {d.n, d.c, d.h, d.w})) throw Invalid(env, where, "x must hold N*C*H*W elements");
  size_t out_len;
  if (job->kind == 2) {
    if (d.h == 0 || d.w == 0) throw Invalid(env, where, "H and W must be >= 1");
    out_len = d.n * d.c;
  } else {
    job->g = WindowValue(env, o, where);
    WindowShape s;
    const std::string e = ResolveWindow(job->g, d.h, d.w, &s);
    if (!e.empty()) throw Invalid(env, where, e);
    out_len = Product(env, where, {d.n, d.c, s.oh, s.ow});
  }
  Napi::Float32Array out = F32Value(env, info[3], where, "out");
  if (out.ElementLength() != out_len) throw Invalid(env, where, "out has the wrong length");
  job->count_include_pad = o.Get("countIncludePad").ToBoolean().Value();
  job->variant = VariantValue(env, o.Get("variant"), where, ConvPrecision::kFp32);
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  job->x = x.Data();
  job->y = out.Data();
  job->planes = d.n * d.c;
  job->h = d.h;
  job->w = d.w;
  job->Keep(info[1]);
  job->Keep(info[3]);
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

}  // namespace

void RegisterConvBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  ConvHandle::Register(env, addon, "ConvHandle");
  addon.Export(env, exports, "createConv", CreateConv);
  addon.Export(env, exports, "convRun", ConvRun);
  addon.Export(env, exports, "pool2d", Pool2d);
}

}  // namespace sonde
