// Bindings of the compiled-plan executor (runtime/plan.h): createPlan(spec) -> PlanHandle and
// planRun(plan, inputs, outputs, threads, cancel?, timings?) -> Promise<number>. The spec is the
// PlanSpec of lib/session/plan.ts, built by the graph compiler: an inconsistent spec is a compiler
// bug, so it throws ERR_SONDE_INTERNAL naming the step; every string enum is mapped here, once.
#include <napi.h>

#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gemm_binding.h"
#include "binding/plan_spec.h"
#include "binding/shared_handle.h"
#include "runtime/enum_names.h"
#include "runtime/plan.h"

namespace sonde {

// Defined beside their handles (conv_binding.cc, gemm_lowp_binding.cc).
void Describe(Napi::Object& o, const ConvOp& w);
void Describe(Napi::Object& o, const PackedLowpGemmWeights& w);
void Describe(Napi::Object& o, const SparseWeights& w);

void Describe(Napi::Object& o, const Plan& p) {
  o.Set("steps", static_cast<double>(p.steps().size()));
  o.Set("arenaBytes", static_cast<double>(p.arena_bytes()));
  o.Set("bytes", static_cast<double>(p.bytes()));
  // Per step: runs so far in which a batch-1 gemm skipped zero activations (-1: not such a step).
  Napi::Array skips = Napi::Array::New(o.Env(), p.steps().size());
  for (size_t i = 0; i < p.steps().size(); ++i) {
    const auto& c = p.steps()[i].skip_runs;
    skips.Set(static_cast<uint32_t>(i), c ? static_cast<double>(c->load(std::memory_order_relaxed)) : -1.0);
  }
  o.Set("skipZeroRuns", skips);
}

using PlanHandle = SharedHandle<Plan>;
using ConvHandle = SharedHandle<ConvOp>;
using PackedLowpGemmHandle = SharedHandle<PackedLowpGemmWeights>;
using SparseWeightsHandle = SharedHandle<SparseWeights>;

namespace {

constexpr const char* kPlanClass = "PlanHandle";

constexpr EnumName<ElemType> kDTypes[] = {
    {ElemType::kFloat32, "float32"}, {ElemType::kInt64, "int64"}, {ElemType::kInt32, "int32"},
    {ElemType::kBool, "bool"},       {ElemType::kUint8, "uint8"}, {ElemType::kInt8, "int8"},
};
constexpr EnumName<UnaryKind> kUnaryKinds[] = {
    {UnaryKind::kRelu, "relu"},       {UnaryKind::kLeakyRelu, "leakyRelu"},
    {UnaryKind::kClip, "clip"},       {UnaryKind::kSigmoid, "sigmoid"},
    {UnaryKind::kTanh, "tanh"},       {UnaryKind::kHardSigmoid, "hardSigmoid"},
    {UnaryKind::kHardSwish, "hardSwish"}, {UnaryKind::kErf, "erf"},
    {UnaryKind::kGelu, "gelu"},       {UnaryKind::kGeluTanh, "geluTanh"},
    {UnaryKind::kSilu, "silu"},       {UnaryKind::kExp, "exp"},
    {UnaryKind::kLog, "log"},         {UnaryKind::kSqrt, "sqrt"},
    {UnaryKind::kNeg, "neg"},         {UnaryKind::kAbs, "abs"},
    {UnaryKind::kReciprocal, "reciprocal"}, {UnaryKind::kNot, "not"},
    {UnaryKind::kIdentity, "identity"},
};
constexpr EnumName<BinaryKind> kBinaryKinds[] = {
    {BinaryKind::kAdd, "add"},     {BinaryKind::kSub, "sub"},     {BinaryKind::kMul, "mul"},
    {BinaryKind::kDiv, "div"},     {BinaryKind::kPow, "pow"},     {BinaryKind::kEqual, "equal"},
    {BinaryKind::kLess, "less"},   {BinaryKind::kGreater, "greater"}, {BinaryKind::kAnd, "and"},
    {BinaryKind::kOr, "or"},
};
constexpr EnumName<ReduceKind> kReduceKinds[] = {
    {ReduceKind::kSum, "sum"}, {ReduceKind::kMean, "mean"}, {ReduceKind::kMax, "max"}, {ReduceKind::kMin, "min"},
};
constexpr EnumName<PadMode> kPadModes[] = {
    {PadMode::kConstant, "constant"}, {PadMode::kReflect, "reflect"}, {PadMode::kEdge, "edge"},
};
constexpr EnumName<int32_t> kActivations[] = {
    {kernels::kActNone, "none"},        {kernels::kActRelu, "relu"},         {kernels::kActClip, "clip"},
    {kernels::kActSilu, "silu"},        {kernels::kActGeluErf, "gelu"},      {kernels::kActGeluTanh, "geluTanh"},
    {kernels::kActSigmoid, "sigmoid"},  {kernels::kActLeakyRelu, "leakyRelu"}, {kernels::kActHardSwish, "hardSwish"},
};

// Reads one part of a PlanSpec; every failure throws ERR_SONDE_INTERNAL prefixed with `where`.
class SpecReader {
 public:
  SpecReader(Napi::Env env, Addon& addon) : env_(env), addon_(addon) {}

  void At(std::string where) { where_ = std::move(where); }
  [[noreturn]] void Fail(const std::string& why) const {
    throw MakeError(env_, codes::kInternal, "createPlan: " + where_ + why);
  }
  [[noreturn]] void Disposed(const char* what) const {
    throw MakeError(env_, codes::kDisposed, "createPlan: " + where_ + what + " has been disposed");
  }
  Addon& addon() const { return addon_; }

  Napi::Object Object(Napi::Value v, const char* what) const {
    if (!v.IsObject()) Fail(std::string(what) + " must be an object");
    return v.As<Napi::Object>();
  }
  Napi::Array Array(Napi::Object o, const char* key) const {
    Napi::Value v = o.Get(key);
    if (!v.IsArray()) Fail(std::string(key) + " must be an array");
    return v.As<Napi::Array>();
  }
  // Integers up to 2^53 (exact in a double); the plan checks every product for overflow.
  int64_t Int(Napi::Value v, const char* key, int64_t min) const {
    const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
    if (!(d >= static_cast<double>(min) && d <= 9007199254740992.0) || d != static_cast<double>(static_cast<int64_t>(d)))
      Fail(std::string(key) + " must be an integer >= " + std::to_string(min));
    return static_cast<int64_t>(d);
  }
  size_t Size(Napi::Object o, const char* key) const { return static_cast<size_t>(Int(o.Get(key), key, 0)); }
  double Number(Napi::Object o, const char* key) const {
    Napi::Value v = o.Get(key);
    if (!v.IsNumber()) Fail(std::string(key) + " must be a number");
    return v.As<Napi::Number>().DoubleValue();
  }
  bool Bool(Napi::Object o, const char* key, bool optional = false) const {
    Napi::Value v = o.Get(key);
    if (optional && (v.IsUndefined() || v.IsNull())) return false;
    if (!v.IsBoolean()) Fail(std::string(key) + " must be a boolean");
    return v.As<Napi::Boolean>().Value();
  }
  template <typename E, size_t N>
  E Enum(Napi::Object o, const char* key, const EnumName<E> (&table)[N]) const {
    Napi::Value v = o.Get(key);
    E out{};
    if (!v.IsString() || !ParseEnumName(table, v.As<Napi::String>().Utf8Value(), &out))
      Fail(std::string(key) + " has an unknown value");
    return out;
  }
  PlanRef Ref(Napi::Object o, const char* key, bool optional = false) const {
    Napi::Value v = o.Get(key);
    PlanRef r;
    if (optional && (v.IsUndefined() || v.IsNull())) return r;
    Napi::Object ro = Object(v, key);
    const int64_t buffer = Int(ro.Get("buffer"), key, 0);
    if (buffer >= static_cast<int64_t>(kNoBuffer)) Fail(std::string(key) + ".buffer is too large");
    r.buffer = static_cast<uint32_t>(buffer);
    r.offset = static_cast<size_t>(Int(ro.Get("offset"), key, 0));
    return r;
  }
  // An array of at most kMaxRank sizes into dims; returns its length.
  size_t Sizes(Napi::Object o, const char* key, size_t* dims) const {
    Napi::Array a = Array(o, key);
    if (a.Length() > kMaxRank) Fail(std::string(key) + " has more than " + std::to_string(kMaxRank) + " entries");
    for (uint32_t i = 0; i < a.Length(); ++i) dims[i] = static_cast<size_t>(Int(a.Get(i), key, 0));
    return a.Length();
  }
  // Signed entries (strides, pads), exactly `rank` of them.
  void Signed(Napi::Object o, const char* key, size_t rank, ptrdiff_t* out) const {
    Napi::Array a = Array(o, key);
    if (a.Length() != rank) Fail(std::string(key) + " must have " + std::to_string(rank) + " entries");
    for (uint32_t i = 0; i < a.Length(); ++i) out[i] = static_cast<ptrdiff_t>(Int(a.Get(i), key, -9007199254740992LL));
  }
  // Fixed-length positive pairs/quads of a pooling window.
  void Fixed(Napi::Object o, const char* key, size_t n, size_t min, size_t* out) const {
    Napi::Array a = Array(o, key);
    if (a.Length() != n) Fail(std::string(key) + " must have " + std::to_string(n) + " entries");
    for (uint32_t i = 0; i < n; ++i) out[i] = static_cast<size_t>(Int(a.Get(i), key, static_cast<int64_t>(min)));
  }
  // kernel, strides, dilations (each [h, w], >= 1) and pads ([top, left, bottom, right]).
  void Window(Napi::Object o, WindowGeometry* g) const {
    size_t v[4];
    Fixed(o, "kernel", 2, 1, v);
    g->kh = v[0], g->kw = v[1];
    Fixed(o, "strides", 2, 1, v);
    g->sh = v[0], g->sw = v[1];
    Fixed(o, "dilations", 2, 1, v);
    g->dh = v[0], g->dw = v[1];
    Fixed(o, "pads", 4, 0, v);
    g->pad_t = v[0], g->pad_l = v[1], g->pad_b = v[2], g->pad_r = v[3];
  }

 private:
  Napi::Env env_;
  Addon& addon_;
  std::string where_;
};

using StepReader = void (*)(const SpecReader& r, Napi::Object o, PlanStep& s);

// An optional PlanBlocked { h, w, pads: [t, l, b, r], bf16? }; absent leaves the layout NCHW.
void ReadBlocked(const SpecReader& r, Napi::Object o, const char* key, BlockedLayout* l) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return;
  Napi::Object b = r.Object(v, key);
  l->h = static_cast<size_t>(r.Int(b.Get("h"), key, 1));
  l->w = static_cast<size_t>(r.Int(b.Get("w"), key, 1));
  size_t pads[4];
  r.Fixed(b, "pads", 4, 0, pads);
  l->pad_t = pads[0], l->pad_l = pads[1], l->pad_b = pads[2], l->pad_r = pads[3];
  l->bf16 = r.Bool(b, "bf16", true);
}

// The operands and sizes every conv step (CPU or GPU weights) carries.
void ReadConvOperands(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.in[1] = r.Ref(o, "residual", true);
  s.out[0] = r.Ref(o, "y");
  s.flag = r.Bool(o, "residualBeforeActivation");
  s.n = r.Size(o, "n");
  s.h = r.Size(o, "h");
  s.w = r.Size(o, "w");
}

void ReadConv(const SpecReader& r, Napi::Object o, PlanStep& s) {
  Napi::Value h = o.Get("handle");
  if (!ConvHandle::Is(r.addon(), "ConvHandle", h)) r.Fail("handle must be a ConvHandle");
  s.conv = ConvHandle::Get(h);
  if (!s.conv) r.Disposed("the conv handle");
  ReadConvOperands(r, o, s);
  ReadBlocked(r, o, "xBlocked", &s.blocked[0]);
  ReadBlocked(r, o, "residualBlocked", &s.blocked[1]);
  ReadBlocked(r, o, "yBlocked", &s.blocked[2]);
}

// convChain: { expand?, depthwise, project } conv handles, the conv step's operands and layouts.
void ReadConvChain(const SpecReader& r, Napi::Object o, PlanStep& s) {
  auto chain = std::make_shared<ConvChain>();
  const auto handle = [&](const char* name, bool optional) -> std::shared_ptr<const ConvOp> {
    Napi::Value h = o.Get(name);
    if (optional && h.IsUndefined()) return nullptr;
    if (!ConvHandle::Is(r.addon(), "ConvHandle", h)) r.Fail(std::string(name) + " must be a ConvHandle");
    std::shared_ptr<const ConvOp> op = ConvHandle::Get(h);
    if (!op) r.Disposed((std::string("the ") + name + " conv handle").c_str());
    return op;
  };
  chain->expand = handle("expand", true);
  chain->depthwise = handle("depthwise", false);
  chain->project = handle("project", false);
  s.chain = std::move(chain);
  ReadConvOperands(r, o, s);
  ReadBlocked(r, o, "xBlocked", &s.blocked[0]);
  ReadBlocked(r, o, "residualBlocked", &s.blocked[1]);
  ReadBlocked(r, o, "yBlocked", &s.blocked[2]);
}

void ReadReorder(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.n = r.Size(o, "n");
  s.count = r.Size(o, "c");
  s.flag = r.Bool(o, "toBlocked");
  ReadBlocked(r, o, "layout", &s.blocked[0]);
  if (!s.blocked[0].present()) r.Fail("layout is required");
}

// The operands, sizes and epilogue every GEMM-shaped step (dense or sparse weights) carries.
void ReadGemmShaped(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "a");
  s.in[1] = r.Ref(o, "bias", true);
  s.in[2] = r.Ref(o, "residual", true);
  s.out[0] = r.Ref(o, "c");
  s.m = r.Size(o, "m");
  s.k = r.Size(o, "k");
  s.n = r.Size(o, "n");
  s.flag = r.Bool(o, "residualBeforeActivation");
  s.kind = r.Enum(o, "activation", kActivations);
  s.alpha = static_cast<float>(r.Number(o, "alpha"));
  s.beta = static_cast<float>(r.Number(o, "beta"));
}

void ReadGemm(const SpecReader& r, Napi::Object o, PlanStep& s) {
  Napi::Value w = o.Get("weights");
  if (PackedGemmHandle::Is(r.addon(), kPackedGemmClass, w)) {
    s.gemm = PackedGemmHandle::Get(w);
    if (!s.gemm) r.Disposed("the gemm weights handle");
  } else if (PackedLowpGemmHandle::Is(r.addon(), "PackedLowpGemmHandle", w)) {
    s.gemm_lowp = PackedLowpGemmHandle::Get(w);
    if (!s.gemm_lowp) r.Disposed("the gemm weights handle");
  } else {
    r.Fail("weights must be packed GEMM weights");
  }
  ReadGemmShaped(r, o, s);
}

void ReadSpmm(const SpecReader& r, Napi::Object o, PlanStep& s) {
  Napi::Value w = o.Get("weights");
  if (!SparseWeightsHandle::Is(r.addon(), "SparseWeightsHandle", w)) r.Fail("weights must be sparse weights");
  s.sparse = SparseWeightsHandle::Get(w);
  if (!s.sparse) r.Disposed("the sparse weights handle");
  Napi::Value dense = o.Get("skipWeights");
  if (!dense.IsUndefined()) {
    if (!PackedGemmHandle::Is(r.addon(), kPackedGemmClass, dense)) r.Fail("skipWeights must be packed fp32 GEMM weights");
    s.gemm = PackedGemmHandle::Get(dense);
    if (!s.gemm) r.Disposed("the skipWeights handle");
  }
  ReadGemmShaped(r, o, s);
  // The operand layout: batch and [batch, row, col] strides of a and of c (and the residual);
  // absent, one row-major product. Plan::Create checks the combination.
  Napi::Value batch = o.Get("batch");
  s.outer = batch.IsUndefined() ? 1 : r.Size(o, "batch");
  if (o.Get("aStrides").IsUndefined()) {
    s.strides[0][0] = static_cast<ptrdiff_t>(s.m * s.k);
    s.strides[0][1] = static_cast<ptrdiff_t>(s.k);
    s.strides[0][2] = 1;
  } else {
    r.Signed(o, "aStrides", 3, s.strides[0]);
  }
  Napi::Value taps = o.Get("taps");
  if (!taps.IsUndefined()) {
    const Napi::Object t = r.Object(taps, "taps");
    PlanStep::SpmmTaps& g = s.taps;
    g.present = true;
    g.c_in = r.Size(t, "cIn");
    g.hp = r.Size(t, "hp");
    g.wp = r.Size(t, "wp");
    g.kh = r.Size(t, "kh");
    g.kw = r.Size(t, "kw");
    g.sh = r.Size(t, "sh");
    g.sw = t.Get("sw").IsUndefined() ? 1 : r.Size(t, "sw");
    g.phased = r.Bool(t, "phased", true);
    g.dh = r.Size(t, "dh");
    g.dw = r.Size(t, "dw");
    g.oh = r.Size(t, "oh");
    g.ow = r.Size(t, "ow");
  }
  if (o.Get("cStrides").IsUndefined()) {
    s.strides[1][0] = static_cast<ptrdiff_t>(s.m * s.n);
    s.strides[1][1] = static_cast<ptrdiff_t>(s.n);
    s.strides[1][2] = 1;
  } else {
    r.Signed(o, "cStrides", 3, s.strides[1]);
  }
}

void ReadMatMul(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "a");
  s.in[1] = r.Ref(o, "b");
  s.out[0] = r.Ref(o, "c");
  s.shape.rank = r.Sizes(o, "batchDims", s.shape.dims);
  r.Signed(o, "aBatchStrides", s.shape.rank, s.strides[0]);
  r.Signed(o, "bBatchStrides", s.shape.rank, s.strides[1]);
  s.m = r.Size(o, "m");
  s.k = r.Size(o, "k");
  s.n = r.Size(o, "n");
  s.flag = r.Bool(o, "transB");
}

void ReadUnary(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.kind = static_cast<int32_t>(r.Enum(o, "kind", kUnaryKinds));
  s.dtype = r.Enum(o, "dtype", kDTypes);
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.count = r.Size(o, "count");
  s.alpha = static_cast<float>(r.Number(o, "alpha"));
  s.beta = static_cast<float>(r.Number(o, "beta"));
}

// dims plus one stride row per name in `strides`.
void ReadStridedShape(const SpecReader& r, Napi::Object o, PlanStep& s, std::initializer_list<const char*> strides) {
  s.shape.rank = r.Sizes(o, "dims", s.shape.dims);
  size_t row = 0;
  for (const char* key : strides) r.Signed(o, key, s.shape.rank, s.strides[row++]);
}

void ReadBinary(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.kind = static_cast<int32_t>(r.Enum(o, "kind", kBinaryKinds));
  s.dtype = r.Enum(o, "dtype", kDTypes);
  s.in[0] = r.Ref(o, "a");
  s.in[1] = r.Ref(o, "b");
  s.out[0] = r.Ref(o, "y");
  ReadStridedShape(r, o, s, {"aStrides", "bStrides"});
}

void ReadWhere(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "cond");
  s.in[1] = r.Ref(o, "x");
  s.in[2] = r.Ref(o, "y");
  s.out[0] = r.Ref(o, "out");
  ReadStridedShape(r, o, s, {"condStrides", "xStrides", "yStrides"});
  s.elem_bytes = r.Size(o, "elemBytes");
}

void ReadCopy(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  ReadStridedShape(r, o, s, {"xStrides", "yStrides"});
  s.elem_bytes = r.Size(o, "elemBytes");
}

void ReadFill(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.out[0] = r.Ref(o, "y");
  s.dtype = r.Enum(o, "dtype", kDTypes);
  s.count = r.Size(o, "count");
  s.value = r.Number(o, "value");
}

void ReadGather(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "data");
  s.in[1] = r.Ref(o, "indices");
  s.dtype_to = r.Enum(o, "indicesDtype", kDTypes);
  s.out[0] = r.Ref(o, "y");
  s.outer = r.Size(o, "outer");
  s.mid = r.Size(o, "axisLen");
  s.inner = r.Size(o, "inner");
  s.count = r.Size(o, "nIndices");
  s.elem_bytes = r.Size(o, "elemBytes");
}

void ReadPool(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.kind = static_cast<int32_t>(r.Size(o, "kind"));
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.outer = r.Size(o, "planes");
  s.h = r.Size(o, "h");
  s.w = r.Size(o, "w");
  r.Window(o, &s.window);
  s.flag = r.Bool(o, "countIncludePad");
  ReadBlocked(r, o, "xBlocked", &s.blocked[0]);
  ReadBlocked(r, o, "yBlocked", &s.blocked[2]);
}

void ReadGlobalAveragePool(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.outer = r.Size(o, "planes");
  s.inner = r.Size(o, "hw");
  ReadBlocked(r, o, "xBlocked", &s.blocked[0]);
}

void ReadSoftmax(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.outer = r.Size(o, "outer");
  s.mid = r.Size(o, "axis");
  s.inner = r.Size(o, "inner");
  if (r.Bool(o, "log")) s.op = PlanOp::kLogSoftmax;
}

void ReadLayerNorm(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.in[1] = r.Ref(o, "scale", true);
  s.in[2] = r.Ref(o, "bias", true);
  s.out[0] = r.Ref(o, "y");
  s.outer = r.Size(o, "rows");
  s.inner = r.Size(o, "cols");
  s.epsilon = static_cast<float>(r.Number(o, "epsilon"));
}

void ReadChannelAffine(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.in[1] = r.Ref(o, "scale");
  s.in[2] = r.Ref(o, "shift");
  s.out[0] = r.Ref(o, "y");
  s.outer = r.Size(o, "outer");
  s.mid = r.Size(o, "channels");
  s.inner = r.Size(o, "inner");
}

void ReadReduceShape(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.outer = r.Size(o, "outer");
  s.mid = r.Size(o, "r");
  s.inner = r.Size(o, "inner");
}

void ReadReduce(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.kind = static_cast<int32_t>(r.Enum(o, "kind", kReduceKinds));
  s.dtype = r.Enum(o, "dtype", kDTypes);
  ReadReduceShape(r, o, s);
}

void ReadArgMax(const SpecReader& r, Napi::Object o, PlanStep& s) {
  ReadReduceShape(r, o, s);
  s.flag = r.Bool(o, "selectLastIndex");
}

void ReadTopK(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "values");
  s.out[1] = r.Ref(o, "indices");
  s.outer = r.Size(o, "outer");
  s.mid = r.Size(o, "r");
  s.inner = r.Size(o, "inner");
  s.k = r.Size(o, "k");
  s.flag = r.Bool(o, "largest");
}

void ReadCast(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.dtype = r.Enum(o, "from", kDTypes);
  s.dtype_to = r.Enum(o, "to", kDTypes);
  s.count = r.Size(o, "count");
}

void ReadPad(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.in[0] = r.Ref(o, "x");
  s.out[0] = r.Ref(o, "y");
  s.dtype = r.Enum(o, "dtype", kDTypes);
  s.shape.rank = r.Sizes(o, "inDims", s.shape.dims);
  r.Signed(o, "begin", s.shape.rank, s.pad_begin);
  r.Signed(o, "end", s.shape.rank, s.pad_end);
  s.kind = static_cast<int32_t>(r.Enum(o, "mode", kPadModes));
  s.value = r.Number(o, "value");
}

// Device weights of a GPU step: a GpuBuffer handle of lib/cuda/runtime.ts.
std::shared_ptr<const GpuAllocation> ReadGpuBuffer(const SpecReader& r, Napi::Object o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!SharedHandle<GpuAllocation>::Is(r.addon(), "GpuBuffer", v)) r.Fail(std::string(key) + " must be a GpuBuffer");
  std::shared_ptr<const GpuAllocation> a = SharedHandle<GpuAllocation>::Get(v);
  if (!a) r.Disposed(key);
  return a;
}

void ReadGpuConv(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.gpu_weights = ReadGpuBuffer(r, o, "weights");
  s.gpu_bias = ReadGpuBuffer(r, o, "bias");
  s.bf16 = r.Bool(o, "bf16");
  ReadConvOperands(r, o, s);
  s.c_in = r.Size(o, "cIn");
  s.c_out = r.Size(o, "cOut");
  s.groups = static_cast<size_t>(r.Int(o.Get("group"), "group", 1));
  r.Window(o, &s.window);
  s.kind = r.Enum(o, "activation", kActivations);
  s.alpha = static_cast<float>(r.Number(o, "alpha"));
  s.beta = static_cast<float>(r.Number(o, "beta"));
}

void ReadGpuGemm(const SpecReader& r, Napi::Object o, PlanStep& s) {
  s.gpu_weights = ReadGpuBuffer(r, o, "weights");
  s.bf16 = r.Bool(o, "bf16");
  ReadGemmShaped(r, o, s);
}

struct StepForm {
  const char* name;
  PlanOp op;
  StepReader read;
};

constexpr StepForm kStepForms[] = {
    {"conv", PlanOp::kConv, ReadConv},
    {"gemm", PlanOp::kGemm, ReadGemm},
    {"matmul", PlanOp::kMatMul, ReadMatMul},
    {"unary", PlanOp::kUnary, ReadUnary},
    {"binary", PlanOp::kBinary, ReadBinary},
    {"where", PlanOp::kWhere, ReadWhere},
    {"copy", PlanOp::kCopy, ReadCopy},
    {"fill", PlanOp::kFill, ReadFill},
    {"gather", PlanOp::kGather, ReadGather},
    {"pool", PlanOp::kPool, ReadPool},
    {"globalAveragePool", PlanOp::kGlobalAveragePool, ReadGlobalAveragePool},
    {"softmax", PlanOp::kSoftmax, ReadSoftmax},
    {"layerNorm", PlanOp::kLayerNorm, ReadLayerNorm},
    {"channelAffine", PlanOp::kChannelAffine, ReadChannelAffine},
    {"reduce", PlanOp::kReduce, ReadReduce},
    {"argmax", PlanOp::kArgMax, ReadArgMax},
    {"topk", PlanOp::kTopK, ReadTopK},
    {"cast", PlanOp::kCast, ReadCast},
    {"pad", PlanOp::kPad, ReadPad},
    {"spmm", PlanOp::kSpmm, ReadSpmm},
    {"reorder", PlanOp::kReorder, ReadReorder},
    {"convChain", PlanOp::kConvChain, ReadConvChain},
    {"gpuConv", PlanOp::kGpuConv, ReadGpuConv},
    {"gpuGemm", PlanOp::kGpuGemm, ReadGpuGemm},
};

PlanStep ReadStep(SpecReader& r, Napi::Value v, size_t index) {
  r.At("step " + std::to_string(index) + ": ");
  Napi::Object o = r.Object(v, "step");
  PlanStep s;
  Napi::Value node = o.Get("node");
  if (!node.IsString()) r.Fail("node must be a string");
  s.node = node.As<Napi::String>().Utf8Value();
  r.At("step " + std::to_string(index) + " (node '" + s.node + "'): ");
  Napi::Value op = o.Get("op");
  const std::string name = op.IsString() ? op.As<Napi::String>().Utf8Value() : "";
  for (const StepForm& f : kStepForms) {
    if (name == f.name) {
      s.op = f.op;
      f.read(r, o, s);
      return s;
    }
  }
  r.Fail("unknown op '" + name + "'");
}

// The plan keeps its own copy of const data: made once here, so JS cannot change a const under a
// running plan and no run copies it.
PlanBufferDesc ReadBuffer(SpecReader& r, Napi::Value v, size_t index) {
  r.At("buffer " + std::to_string(index) + ": ");
  Napi::Object o = r.Object(v, "buffer");
  PlanBufferDesc b;
  Napi::Value kind = o.Get("kind");
  const std::string k = kind.IsString() ? kind.As<Napi::String>().Utf8Value() : "";
  b.bytes = r.Size(o, "bytes");
  if (k == "input" || k == "output") {
    b.kind = k == "input" ? PlanBufferKind::kInput : PlanBufferKind::kOutput;
    b.index = r.Size(o, "index");
  } else if (k == "arena") {
    b.kind = PlanBufferKind::kArena;
    b.offset = r.Size(o, "offset");
  } else if (k == "const") {
    b.kind = PlanBufferKind::kConst;
    Napi::Value d = o.Get("data");
    if (!d.IsTypedArray()) r.Fail("const data must be a typed array");
    Napi::TypedArray t = d.As<Napi::TypedArray>();
    if (t.ByteLength() < b.bytes) r.Fail("const data holds " + std::to_string(t.ByteLength()) + " bytes, not " + std::to_string(b.bytes));
    const auto* src = static_cast<const unsigned char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
    b.data = std::make_shared<const std::vector<unsigned char>>(src, src + b.bytes);
  } else if (k == "device") {
    b.kind = PlanBufferKind::kDevice;
    b.device = ReadGpuBuffer(r, o, "buffer");
  } else {
    r.Fail("kind must be 'input', 'output', 'arena', 'const' or 'device'");
  }
  return b;
}

std::vector<size_t> ReadByteCounts(SpecReader& r, Napi::Object spec, const char* key) {
  r.At("");
  Napi::Array a = r.Array(spec, key);
  std::vector<size_t> out(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) out[i] = static_cast<size_t>(r.Int(a.Get(i), key, 0));
  return out;
}

}  // namespace

PlanSpecParts ReadPlanSpec(Napi::Env env, Addon& addon, Napi::Value value) {
  SpecReader r(env, addon);
  Napi::Object spec = r.Object(value, "spec");
  PlanSpecParts p;
  p.input_bytes = ReadByteCounts(r, spec, "inputBytes");
  p.output_bytes = ReadByteCounts(r, spec, "outputBytes");
  p.arena_bytes = r.Size(spec, "arenaBytes");
  Napi::Array bs = r.Array(spec, "buffers"), ss = r.Array(spec, "steps");
  try {
    p.buffers.reserve(bs.Length());
    for (uint32_t i = 0; i < bs.Length(); ++i) p.buffers.push_back(ReadBuffer(r, bs.Get(i), i));
    p.steps.reserve(ss.Length());
    for (uint32_t i = 0; i < ss.Length(); ++i) p.steps.push_back(ReadStep(r, ss.Get(i), i));
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "createPlan: out of host memory");
  }
  return p;
}

namespace {

// createPlan(spec) -> PlanHandle (synchronous: validation and the const copies are one pass).
Napi::Value CreatePlan(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PlanSpecParts p = ReadPlanSpec(env, addon, info.Length() > 0 ? info[0] : env.Undefined());
  std::unique_ptr<Plan> plan;
  std::string error;
  try {
    plan = Plan::Create(std::move(p.buffers), std::move(p.steps), p.arena_bytes, std::move(p.input_bytes),
                        std::move(p.output_bytes), &error);
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "createPlan: out of host memory");
  }
  if (!plan) throw MakeError(env, codes::kInternal, "createPlan: " + error);
  return PlanHandle::Wrap(env, addon, kPlanClass, std::shared_ptr<const Plan>(std::move(plan)));
}

class PlanJob : public AsyncJob {
 public:
  std::shared_ptr<const Plan> plan;
  std::vector<const void*> inputs;
  std::vector<void*> outputs;
  double* timings = nullptr;
  void Execute(Addon& addon) override {
    std::string error;
    if (!plan->Run(addon.pool(), threads, cancel.get(), inputs.data(), outputs.data(), timings, &error) &&
        !cancel->load())
      Fail(codes::kInvalidArgument, std::move(error));
  }
  // The run's time on the pool (no hand-off or completion).
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, exec_ms()); }
};

}  // namespace

bool ViewBytes(Napi::Value v, unsigned char** data, size_t* bytes) {
  if (v.IsTypedArray()) {
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    *data = static_cast<unsigned char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
    *bytes = t.ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    Napi::DataView d = v.As<Napi::DataView>();
    *data = static_cast<unsigned char*>(d.ArrayBuffer().Data()) + d.ByteOffset();
    *bytes = d.ByteLength();
    return true;
  }
  return false;
}

template <typename Ptr>
std::vector<Ptr> ReadPlanViews(Napi::Env env, Napi::Value v, const std::vector<size_t>& expected,
                               const std::vector<size_t>& align, const char* what, AsyncJob* job) {
  if (!v.IsArray()) throw MakeError(env, codes::kInvalidArgument, std::string("planRun: ") + what + " must be an array");
  Napi::Array a = v.As<Napi::Array>();
  if (a.Length() != expected.size())
    throw MakeError(env, codes::kInvalidArgument, std::string("planRun: the plan takes ") + std::to_string(expected.size()) +
                                                      " " + what + ", got " + std::to_string(a.Length()));
  std::vector<Ptr> out(expected.size());
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    unsigned char* data;
    size_t bytes;
    // Only built for an error: this runs for every view of every run.
    auto name = [&] { return std::string(what) + "[" + std::to_string(i) + "]"; };
    if (!ViewBytes(e, &data, &bytes))
      throw MakeError(env, codes::kInvalidArgument, "planRun: " + name() + " must be a TypedArray or DataView");
    if (bytes != expected[i])
      throw MakeError(env, codes::kInvalidArgument, "planRun: " + name() + " has " + std::to_string(bytes) +
                                                        " bytes, the plan expects " + std::to_string(expected[i]));
    if (reinterpret_cast<uintptr_t>(data) % align[i])
      throw MakeError(env, codes::kInvalidArgument, "planRun: " + name() + " must start at a multiple of " +
                                                        std::to_string(align[i]) + " bytes (its byteOffset)");
    out[i] = data;
    job->Keep(e);
  }
  return out;
}
// The two forms the CPU and GPU run bindings use.
template std::vector<const void*> ReadPlanViews<const void*>(Napi::Env, Napi::Value, const std::vector<size_t>&,
                                                             const std::vector<size_t>&, const char*, AsyncJob*);
template std::vector<void*> ReadPlanViews<void*>(Napi::Env, Napi::Value, const std::vector<size_t>&,
                                                 const std::vector<size_t>&, const char*, AsyncJob*);

namespace {

// planRun(plan, inputs, outputs, threads, cancel?, timings?) -> Promise<number> (the run's ms on the pool)
Napi::Value PlanRun(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4) throw MakeError(env, codes::kInvalidArgument, "planRun: expected (plan, inputs, outputs, threads)");
  if (!PlanHandle::Is(addon, kPlanClass, info[0]))
    throw MakeError(env, codes::kInvalidArgument, "planRun: plan must be a PlanHandle");
  auto job = std::make_unique<PlanJob>();
  job->plan = PlanHandle::Get(info[0]);
  if (!job->plan) throw MakeError(env, codes::kDisposed, "planRun: the plan has been disposed");
  job->inputs = ReadPlanViews<const void*>(env, info[1], job->plan->input_bytes(), job->plan->input_align(), "inputs", job.get());
  job->outputs = ReadPlanViews<void*>(env, info[2], job->plan->output_bytes(), job->plan->output_align(), "outputs",
                                          job.get());
  const double threads = info[3].IsNumber() ? info[3].As<Napi::Number>().DoubleValue() : -1;
  if (!(threads >= 0 && threads <= 1024) || threads != static_cast<double>(static_cast<unsigned>(threads)))
    throw MakeError(env, codes::kInvalidArgument, "planRun: threads must be an integer in [0, 1024]");
  job->threads = static_cast<unsigned>(threads);
  if (info.Length() > 5 && !info[5].IsUndefined() && !info[5].IsNull()) {
    if (!info[5].IsTypedArray() || info[5].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
        info[5].As<Napi::Float64Array>().ElementLength() != job->plan->steps().size())
      throw MakeError(env, codes::kInvalidArgument, "planRun: timings must be a Float64Array with one slot per step (" +
                                                        std::to_string(job->plan->steps().size()) + ")");
    job->timings = info[5].As<Napi::Float64Array>().Data();
    job->Keep(info[5]);
  }
  job->Keep(info[0]);
  addon.AttachCancel(info, 4, job.get());
  // A plan whose last run took a few microseconds (a tiny model, a graph of shape ops) is waited
  // for on this thread rather than completed through the event loop (Addon::Start).
  const int64_t wait_ns = addon.RunWaitNs(job->plan->last_run_ns());
  return addon.Start(env, std::move(job), wait_ns);
}

}  // namespace

void RegisterPlanBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  PlanHandle::Register(env, addon, kPlanClass);
  addon.Export(env, exports, "createPlan", CreatePlan);
  addon.Export(env, exports, "planRun", PlanRun);
  RegisterGpuPlanBindings(env, exports, addon);
}

}  // namespace sonde
