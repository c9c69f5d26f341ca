// Bindings of the MoE operator (ops/moe.h): moe() and moeRoute(). Each weight arrives as
// { ref: Uint8Array | GgufHandle, index, type }; a stacked expert tensor is n_experts * rows rows of
// cols (GGUF stores ffn_*_exps that way), so the quant family's weight check applies unchanged.
#include <napi.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/quant_weights.h"
#include "ops/moe.h"

namespace sonde {

namespace {

size_t Size(Napi::Env env, Napi::Value v, const std::string& name) {
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 9007199254740991.0) || d != std::floor(d))
    throw MakeError(env, codes::kInvalidArgument, "moe: " + name + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

float Float(Napi::Env env, Napi::Value v, const std::string& name) {
  if (!v.IsNumber()) throw MakeError(env, codes::kInvalidArgument, "moe: " + name + " must be a number");
  return static_cast<float>(v.As<Napi::Number>().DoubleValue());
}

class MoeJobBase : public AsyncJob {
 public:
  MoeLayer layer;
  std::vector<std::shared_ptr<const GgufFile>> files;  // mappings the weights point into
  std::vector<float> bias;

  // Resolves spec[name] = { ref, index, type } as `rows` rows of `cols`; keeps the JS value alive.
  const uint8_t* Weights(Addon& addon, Napi::Env env, Napi::Object spec, const char* name, size_t rows, size_t cols,
                         int32_t* type) {
    Napi::Value v = spec.Get(name);
    if (!v.IsObject()) throw MakeError(env, codes::kInvalidArgument, std::string("moe: ") + name + " must be a weights object");
    Napi::Object w = v.As<Napi::Object>();
    Napi::Value t = w.Get("type");
    if (!t.IsString() || !ParseQuantType(t.As<Napi::String>(), type))
      throw MakeError(env, codes::kInvalidArgument, std::string("moe: ") + name + ".type is not a weight type");
    if ((*type == kernels::kQuantQ8_0 || *type == kernels::kQuantQ4_0) && cols % kernels::kQuantBlock != 0)
      throw MakeError(env, codes::kInvalidArgument, std::string("moe: ") + name + ": " + QuantTypeName(*type) +
                                                        " needs rows of a multiple of 32 elements, got " + std::to_string(cols));
    WeightsRef r = ResolveWeights(addon, env, std::string("moe: ") + name, w.Get("ref"), w.Get("index"), *type, cols, rows);
    if (r.file) files.push_back(std::move(r.file));
    Keep(w.Get("ref"));
    return r.data;
  }

  // The fields both calls share: sizes, router, scoring, variant, threads.
  void ParseCommon(Addon& addon, Napi::Env env, Napi::Object o) {
    MoeLayer& l = layer;
    l.d_model = Size(env, o.Get("dModel"), "dModel");
    l.n_experts = Size(env, o.Get("nExperts"), "nExperts");
    l.k = Size(env, o.Get("k"), "k");
    if (l.d_model == 0 || l.n_experts == 0 || l.n_experts > (1u << 24))
      throw MakeError(env, codes::kInvalidArgument, "moe: dModel and nExperts must be positive (nExperts <= 2^24)");
    if (l.k == 0 || l.k > l.n_experts) throw MakeError(env, codes::kInvalidArgument, "moe: k must be in [1, nExperts]");
    l.router.data = Weights(addon, env, o, "router", l.n_experts, l.d_model, &l.router.type);
    Napi::Value scoring = o.Get("scoring");
    const std::string s = scoring.IsString() ? scoring.As<Napi::String>().Utf8Value() : "";
    if (s == "softmax") l.scoring = MoeScoring::kSoftmax;
    else if (s == "sigmoid") l.scoring = MoeScoring::kSigmoid;
    else throw MakeError(env, codes::kInvalidArgument, "moe: scoring must be 'softmax' or 'sigmoid'");
    l.renormalize = o.Get("renormalize").ToBoolean();
    l.weight_scale = Float(env, o.Get("weightScale"), "weightScale");
    if (!std::isfinite(l.weight_scale)) throw MakeError(env, codes::kInvalidArgument, "moe: weightScale must be finite");
    Napi::Value b = o.Get("selectionBias");
    if (!b.IsUndefined() && !b.IsNull()) {
      if (!b.IsTypedArray() || b.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array ||
          b.As<Napi::Float32Array>().ElementLength() != l.n_experts)
        throw MakeError(env, codes::kInvalidArgument, "moe: selectionBias must be a Float32Array of nExperts values");
      Napi::Float32Array fb = b.As<Napi::Float32Array>();
      bias.assign(fb.Data(), fb.Data() + l.n_experts);  // copied: the job owns what it reads
      l.selection_bias = bias.data();
    }
    if (!o.Get("groups").IsUndefined()) {
      l.groups = Size(env, o.Get("groups"), "groups");
      l.groups_used = Size(env, o.Get("groupsUsed"), "groupsUsed");
      if (l.groups > 1 && (l.n_experts % l.groups != 0 || l.groups_used == 0 || l.groups_used > l.groups ||
                           l.k > l.groups_used * (l.n_experts / l.groups)))
        throw MakeError(env, codes::kInvalidArgument, "moe: groups must divide nExperts, groupsUsed be in [1, groups], and k fit in groupsUsed groups");
    }
    Napi::Value variant = o.Get("variant");
    if (!variant.IsString() || !ParseQuantVariant(variant.As<Napi::String>(), &l.variant))
      throw MakeError(env, codes::kInvalidArgument, "moe: unknown variant");
    // The CPU check is the same for every tensor; only avx512vnni depends on the type, and the
    // operator runs float tensors on plain avx512 under it.
    bool not_for_type;
    const bool vnni_float = l.variant == QuantVariant::kAvx512Vnni &&
                            l.router.type != kernels::kQuantQ8_0 && l.router.type != kernels::kQuantQ4_0;
    const std::string why = QuantVariantUnavailable(l.router.type, vnni_float ? QuantVariant::kAvx512 : l.variant, &not_for_type);
    if (!why.empty())
      throw MakeError(env, not_for_type ? codes::kInvalidArgument : codes::kDeviceUnavailable, "moe: variant: " + why);
    Napi::Value t = o.Get("threads");
    threads = t.IsNumber() ? t.As<Napi::Number>().Uint32Value() : 0;
  }
};

class MoeJob : public MoeJobBase {
 public:
  const float* x = nullptr;
  float* y = nullptr;
  size_t tokens = 0;
  std::vector<uint64_t> counts;
  uint64_t dropped = 0;

  void Execute(Addon& addon) override {
    counts.assign(layer.n_experts, 0);
    std::string error;
    // The layer was validated when the call was made, so what is left is memory or cancellation.
    if (!RunMoe(addon.pool(), threads, cancel.get(), layer, x, tokens, y, counts.data(), &error, &dropped) &&
        !cancel->load())
      Fail(error.find("out of memory") != std::string::npos ? codes::kOutOfMemory : codes::kInternal, "moe: " + error);
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    Napi::Array c = Napi::Array::New(env, counts.size());
    for (size_t e = 0; e < counts.size(); ++e) c.Set(static_cast<uint32_t>(e), static_cast<double>(counts[e]));
    o.Set("expertCounts", c);
    o.Set("dropped", static_cast<double>(dropped));
    return o;
  }
};

Napi::Float32Array F32(Napi::Env env, Napi::Value v, const char* name, size_t elements) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array ||
      v.As<Napi::Float32Array>().ElementLength() != elements)
    throw MakeError(env, codes::kInvalidArgument, std::string("moe: ") + name + " must be a Float32Array of " +
                                                      std::to_string(elements) + " elements");
  return v.As<Napi::Float32Array>();
}

size_t Mul(Napi::Env env, size_t a, size_t b) {
  size_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw MakeError(env, codes::kInvalidArgument, "moe: sizes overflow");
  return r;
}

// moe(x, out, spec) -> Promise<{ expertCounts: number[], dropped: number }>
// spec: { tokens, dModel, dFf, nExperts, k, router, gate, up, down, scoring, renormalize,
//         weightScale, selectionBias?, shared?: { dFf, gate, up, down, gateInput? },
//         capacityFactor, variant, threads, cancel }
Napi::Value Moe(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[2].IsObject())
    throw MakeError(env, codes::kInvalidArgument, "moe: expected (x, out, spec)");
  Napi::Object o = info[2].As<Napi::Object>();
  auto job = std::make_unique<MoeJob>();
  MoeLayer& l = job->layer;
  job->ParseCommon(addon, env, o);
  l.d_ff = Size(env, o.Get("dFf"), "dFf");
  if (l.d_ff == 0) throw MakeError(env, codes::kInvalidArgument, "moe: dFf must be positive");
  job->tokens = Size(env, o.Get("tokens"), "tokens");
  const size_t ff_rows = Mul(env, l.d_ff, l.n_experts), model_rows = Mul(env, l.d_model, l.n_experts);
  l.gate.data = job->Weights(addon, env, o, "gate", ff_rows, l.d_model, &l.gate.type);
  l.up.data = job->Weights(addon, env, o, "up", ff_rows, l.d_model, &l.up.type);
  l.down.data = job->Weights(addon, env, o, "down", model_rows, l.d_ff, &l.down.type);
  l.gate.expert_stride = kernels::QuantRowBytes(l.gate.type, l.d_model) * l.d_ff;
  l.up.expert_stride = kernels::QuantRowBytes(l.up.type, l.d_model) * l.d_ff;
  l.down.expert_stride = kernels::QuantRowBytes(l.down.type, l.d_ff) * l.d_model;
  Napi::Value shared = o.Get("shared");
  if (shared.IsObject()) {
    Napi::Object so = shared.As<Napi::Object>();
    l.shared_d_ff = Size(env, so.Get("dFf"), "shared.dFf");
    if (l.shared_d_ff == 0) throw MakeError(env, codes::kInvalidArgument, "moe: shared.dFf must be positive");
    l.shared_gate.data = job->Weights(addon, env, so, "gate", l.shared_d_ff, l.d_model, &l.shared_gate.type);
    l.shared_up.data = job->Weights(addon, env, so, "up", l.shared_d_ff, l.d_model, &l.shared_up.type);
    l.shared_down.data = job->Weights(addon, env, so, "down", l.d_model, l.shared_d_ff, &l.shared_down.type);
    if (so.Get("gateInput").IsObject())
      l.shared_gate_inp.data = job->Weights(addon, env, so, "gateInput", 1, l.d_model, &l.shared_gate_inp.type);
  }
  l.capacity_factor = Float(env, o.Get("capacityFactor"), "capacityFactor");
  const std::string why = ValidateMoeLayer(l);
  if (!why.empty()) throw MakeError(env, codes::kInvalidArgument, "moe: " + why);
  const size_t elements = Mul(env, job->tokens, l.d_model);
  Napi::Float32Array x = F32(env, info[0], "x", elements);
  Napi::Float32Array out = F32(env, info[1], "out", elements);
  if (x.ArrayBuffer() == out.ArrayBuffer()) throw MakeError(env, codes::kInvalidArgument, "moe: out must not share x's buffer");
  job->x = x.Data();
  job->y = out.Data();
  job->Keep(info[0]);
  job->Keep(info[1]);
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

class MoeRouteJob : public MoeJobBase {
 public:
  const float* x = nullptr;
  size_t tokens = 0;
  int32_t* ids = nullptr;
  float* weights = nullptr;
  float* scores = nullptr;
  void Execute(Addon& addon) override {
    RunMoeRoute(addon.pool(), threads, cancel.get(), layer, x, tokens, ids, weights, scores);
  }
};

// moeRoute(x, ids, weights, scores, spec) -> Promise<void>; spec as moe's without the experts.
Napi::Value MoeRoute(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 5 || !info[4].IsObject())
    throw MakeError(env, codes::kInvalidArgument, "moeRoute: expected (x, ids, weights, scores, spec)");
  Napi::Object o = info[4].As<Napi::Object>();
  auto job = std::make_unique<MoeRouteJob>();
  job->ParseCommon(addon, env, o);
  const MoeLayer& l = job->layer;
  job->tokens = Size(env, o.Get("tokens"), "tokens");
  Napi::Float32Array x = F32(env, info[0], "x", Mul(env, job->tokens, l.d_model));
  const size_t tk = Mul(env, job->tokens, l.k);
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array ||
      info[1].As<Napi::Int32Array>().ElementLength() != tk)
    throw MakeError(env, codes::kInvalidArgument, "moeRoute: ids must be an Int32Array of tokens * k elements");
  Napi::Float32Array w = F32(env, info[2], "weights", tk);
  Napi::Float32Array s = F32(env, info[3], "scores", Mul(env, job->tokens, l.n_experts));
  job->x = x.Data();
  job->ids = info[1].As<Napi::Int32Array>().Data();
  job->weights = w.Data();
  job->scores = s.Data();
  for (size_t i = 0; i < 4; ++i) job->Keep(info[i]);
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

}  // namespace

void RegisterMoeBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  addon.Export(env, exports, "moe", Moe);
  addon.Export(env, exports, "moeRoute", MoeRoute);
}

}  // namespace sonde
