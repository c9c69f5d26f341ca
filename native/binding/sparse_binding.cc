// Sparse weights (CSR / BSR) and SpMM. Follows gemm_binding.cc: lib/kernels/sparse.ts validates and
// names the user's parameters; the checks here only guarantee that nothing reads or writes out of
// bounds, whatever reaches the binding.
#include <napi.h>

#include <memory>
#include <new>
#include <stdexcept>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/gemm_call.h"
#include "binding/shared_handle.h"
#include "ops/spmm.h"

namespace sonde {

namespace {

}  // namespace

void Describe(Napi::Object& o, const SparseWeights& w) {
  o.Set("format", SparseFormatName(w.format()));
  o.Set("k", static_cast<double>(w.k()));
  o.Set("n", static_cast<double>(w.n()));
  o.Set("nnz", static_cast<double>(w.nnz()));
  o.Set("bytes", static_cast<double>(w.bytes()));
  o.Set("blockWidth", static_cast<double>(w.block_width()));
  o.Set("blocks", static_cast<double>(w.blocks()));
  o.Set("ukernel", SpmmUkernelName(w, GemmVariant::kAuto));
  if (w.format() == SparseFormat::kCsr) o.Set("columnsUkernel", SpmmColumnsUkernelName(GemmVariant::kAuto));
}

// JS handle (shared with running jobs; see shared_handle.h).
using SparseWeightsHandle = SharedHandle<SparseWeights>;

namespace {


Napi::Uint32Array U32Value(Napi::Env env, Napi::Value v, const char* where, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
    throw MakeError(env, codes::kInvalidArgument, std::string(where) + ": " + name + " must be a Uint32Array");
  return v.As<Napi::Uint32Array>();
}



Napi::Object Wrap(Addon& addon, Napi::Env env, std::shared_ptr<const SparseWeights> w) {
  return SparseWeightsHandle::Wrap(env, addon, "SparseWeightsHandle", std::move(w));
}

// toSparse(b, k, n, format, blockWidth) -> handle (synchronous: one pass over B at load).
Napi::Value ToSparse(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "toSparse";
  if (info.Length() < 5) throw MakeError(env, codes::kInvalidArgument, "toSparse: expected 5 arguments");
  Napi::Float32Array b = F32Value(env, info[0], where, "weights");
  const size_t k = SizeValue(env, info[1], where, "k"), n = SizeValue(env, info[2], where, "n");
  size_t kn;
  if (__builtin_mul_overflow(k, n, &kn) || b.ElementLength() != kn)
    throw MakeError(env, codes::kInvalidArgument, "toSparse: weights must hold k*n elements");
  std::string fmt = info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "";
  SparseFormat format;
  if (fmt == "csr") format = SparseFormat::kCsr;
  else if (fmt == "bsr") format = SparseFormat::kBsr;
  else if (fmt == "auto") format = SparseFormat::kAuto;
  else throw MakeError(env, codes::kInvalidArgument, "toSparse: unknown format");
  const size_t bw = SizeValue(env, info[4], where, "blockWidth");
  if (bw != 0 && !ValidBsrBlockWidth(static_cast<uint32_t>(bw)))
    throw MakeError(env, codes::kInvalidArgument, "toSparse: block width must be 8, 16 or 32");
  try {
    return Wrap(addon, env, SparseWeights::FromDense(b.Data(), k, n, n, format, static_cast<uint32_t>(bw)));
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "toSparse: out of host memory");
  } catch (const std::length_error& e) {
    throw MakeError(env, codes::kInvalidArgument, std::string("toSparse: weights too large: ") + e.what());
  }
}

// sparseFromCsr(rows, cols, rowPtr, colIdx, values) -> handle
Napi::Value SparseFromCsr(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "sparseFromCsr";
  if (info.Length() < 5) throw MakeError(env, codes::kInvalidArgument, "sparseFromCsr: expected 5 arguments");
  const size_t rows = SizeValue(env, info[0], where, "rows"), cols = SizeValue(env, info[1], where, "cols");
  Napi::Uint32Array rp = U32Value(env, info[2], where, "rowPtr");
  Napi::Uint32Array ci = U32Value(env, info[3], where, "colIdx");
  Napi::Float32Array vals = F32Value(env, info[4], where, "values");
  if (rp.ElementLength() == 0) throw MakeError(env, codes::kInvalidArgument, "sparseFromCsr: rowPtr must hold rows + 1 entries");
  std::string error;
  std::unique_ptr<SparseWeights> w;
  try {
    w = SparseWeights::FromCsr(rows, cols, rp.Data(), rp.ElementLength(), ci.Data(), ci.ElementLength(), vals.Data(),
                               vals.ElementLength(), &error);
  } catch (const std::bad_alloc&) {
    throw MakeError(env, codes::kOutOfMemory, "sparseFromCsr: out of host memory");
  }
  if (!w) throw MakeError(env, codes::kInvalidArgument, "sparseFromCsr: " + error);
  return Wrap(addon, env, std::move(w));
}

class SpmmJob : public AsyncJob {
 public:
  GemmVariant variant = GemmVariant::kAuto;
  GemmArgs args;
  bool columns = false;
  std::shared_ptr<const SparseWeights> weights;
  void Execute(Addon& addon) override {
    if (!columns) {
      RunSpmm(addon.pool(), threads, cancel.get(), args, *weights, variant);
      return;
    }
    SpmmColumnsArgs c;
    c.a = args.a;
    c.c = args.c;
    c.m = args.m;
    c.lda = args.lda;
    c.ldc = args.ldc;
    c.epilogue = args.epilogue;
    RunSpmmColumns(addon.pool(), threads, cancel.get(), c, *weights, variant);
  }
};

// spmm(a, handle, out, options) -> Promise<void>; options as gemm's (m, k, n, lda, ldc, bias?,
// scale?, residual?, ldr?, activation, alpha, beta, residualBeforeActivation, variant, threads, cancel?,
// columns?). columns: A, C and the residual column-major (a: k rows of lda >= m; out, residual: n
// rows of ldc, ldr >= m), CSR weights only: the kernels 1x1 convs on NCHW run.
Napi::Value Spmm(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* where = "spmm";
  if (info.Length() < 4 || !info[3].IsObject())
    throw MakeError(env, codes::kInvalidArgument, "spmm: expected (a, weights, out, options)");
  Napi::Object o = info[3].As<Napi::Object>();
  auto job = std::make_unique<SpmmJob>();
  const size_t m = SizeValue(env, o.Get("m"), where, "m"), k = SizeValue(env, o.Get("k"), where, "k"),
               n = SizeValue(env, o.Get("n"), where, "n");
  const size_t lda = SizeValue(env, o.Get("lda"), where, "lda"), ldc = SizeValue(env, o.Get("ldc"), where, "ldc");
  const bool columns = o.Get("columns").ToBoolean().Value();
  job->columns = columns;
  // (rows, cols) of A, C as stored: transposed in the columns layout.
  auto stored = [&](size_t r, size_t c, size_t ld, size_t* span) { return columns ? SpanOf(c, r, ld, span) : SpanOf(r, c, ld, span); };
  size_t span;
  Napi::Float32Array a = F32Value(env, info[0], where, "a");
  if (!stored(m, k, lda, &span) || a.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, columns ? "spmm: a must hold k rows of lda >= m elements"
                                                          : "spmm: a must hold m rows of lda >= k elements");
  if (!SparseWeightsHandle::Is(addon, "SparseWeightsHandle", info[1]))
    throw MakeError(env, codes::kInvalidArgument, "spmm: weights must be sparse weights");
  job->weights = SparseWeightsHandle::Get(info[1]);
  if (!job->weights) throw MakeError(env, codes::kDisposed, "spmm: the sparse weights have been disposed");
  if (job->weights->k() != k || job->weights->n() != n)
    throw MakeError(env, codes::kInvalidArgument, "spmm: sparse weights do not match k and n");
  if (columns && job->weights->format() != SparseFormat::kCsr)
    throw MakeError(env, codes::kInvalidArgument, "spmm: columns needs CSR weights");
  Napi::Float32Array out = F32Value(env, info[2], where, "out");
  if (!stored(m, n, ldc, &span) || out.ElementLength() < span)
    throw MakeError(env, codes::kInvalidArgument, columns ? "spmm: out must hold n rows of ldc >= m elements"
                                                          : "spmm: out must hold m rows of ldc >= n elements");
  job->Keep(info[0]);
  job->Keep(info[1]);
  job->Keep(info[2]);
  kernels::GemmEpilogue& ep = job->args.epilogue;
  auto column_vector = [&](const char* key) -> const float* {
    Napi::Value v = o.Get(key);
    if (v.IsUndefined() || v.IsNull()) return nullptr;
    Napi::Float32Array t = F32Value(env, v, where, key);
    if (t.ElementLength() != n) throw MakeError(env, codes::kInvalidArgument, std::string("spmm: ") + key + " must hold n elements");
    job->Keep(v);
    return t.Data();
  };
  ep.bias = column_vector("bias");
  ep.scale = column_vector("scale");
  Napi::Value rv = o.Get("residual");
  if (!rv.IsUndefined() && !rv.IsNull()) {
    Napi::Float32Array r = F32Value(env, rv, where, "residual");
    ep.ldr = SizeValue(env, o.Get("ldr"), where, "ldr");
    if (!stored(m, n, ep.ldr, &span) || r.ElementLength() < span)
      throw MakeError(env, codes::kInvalidArgument, columns ? "spmm: residual must hold n rows of ldr >= m elements"
                                                            : "spmm: residual must hold m rows of ldr >= n elements");
    ep.residual = r.Data();
    job->Keep(rv);
  }
  ep.residual_before_activation = o.Get("residualBeforeActivation").ToBoolean().Value() ? 1 : 0;
  Napi::Value act = o.Get("activation");
  ep.activation = act.IsNumber() ? act.As<Napi::Number>().Int32Value() : -1;
  if (ep.activation < 0 || ep.activation >= kernels::kActCount)
    throw MakeError(env, codes::kInvalidArgument, "spmm: unknown activation");
  Napi::Value alpha = o.Get("alpha"), beta = o.Get("beta");
  ep.alpha = alpha.IsNumber() ? alpha.As<Napi::Number>().FloatValue() : 0.0f;
  ep.beta = beta.IsNumber() ? beta.As<Napi::Number>().FloatValue() : 0.0f;
  Napi::Value variant = o.Get("variant");
  if (!variant.IsString() || !ParseGemmVariant(variant.As<Napi::String>(), &job->variant))
    throw MakeError(env, codes::kInvalidArgument, "spmm: unknown variant");
  std::string why = GemmVariantUnavailable(job->variant);
  if (!why.empty()) throw MakeError(env, codes::kDeviceUnavailable, "spmm: variant unavailable: " + why);
  Napi::Value threads = o.Get("threads");
  job->threads = threads.IsNumber() ? threads.As<Napi::Number>().Uint32Value() : 0;
  job->args.a = a.Data();
  job->args.m = m;
  job->args.lda = lda;
  job->args.c = out.Data();
  job->args.ldc = ldc;
  addon.AttachCancel(o.Get("cancel"), job.get());
  return addon.Start(env, std::move(job));
}

}  // namespace

void RegisterSparseBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  SparseWeightsHandle::Register(env, addon, "SparseWeightsHandle");
  addon.Export(env, exports, "toSparse", ToSparse);
  addon.Export(env, exports, "sparseFromCsr", SparseFromCsr);
  addon.Export(env, exports, "spmm", Spmm);
}

}  // namespace sonde
