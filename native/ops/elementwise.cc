#include "ops/elementwise.h"
#include "runtime/enum_names.h"

#include <algorithm>
#include <cstring>

namespace sonde {

const EnumName<ElementwiseVariant> kElementwiseVariantNames[] = {
    {ElementwiseVariant::kAuto, "auto"},
    {ElementwiseVariant::kReference, "reference"},
    {ElementwiseVariant::kScalar, "scalar"},
    {ElementwiseVariant::kAvx2, "avx2"},
    {ElementwiseVariant::kAvx512, "avx512"},
};

bool ParseElementwiseVariant(const std::string& name, ElementwiseVariant* out) { return ParseEnumName(kElementwiseVariantNames, name, out); }

const char* ElementwiseVariantName(ElementwiseVariant v) { return EnumNameOf(kElementwiseVariantNames, v); }

std::string ElementwiseVariantUnavailable(ElementwiseVariant v) {
  IsaLevel need = IsaLevel::kScalar;
  if (v == ElementwiseVariant::kAvx2) need = IsaLevel::kAvx2;
  if (v == ElementwiseVariant::kAvx512) need = IsaLevel::kAvx512;
#if !(defined(__x86_64__) || defined(_M_X64))
  if (need != IsaLevel::kScalar) return std::string(ElementwiseVariantName(v)) + " kernels exist only on x86-64";
#endif
  if (!Cpu().Supports(need))
    return std::string("this CPU (or SONDE_ISA) allows at most '") + IsaName(Cpu().level) + "', not '" +
           ElementwiseVariantName(v) + "'";
  return "";
}

kernels::ElementwiseUkernels ElementwiseTable(ElementwiseVariant v) {
  if (v == ElementwiseVariant::kAuto) {
    switch (Cpu().level) {
      case IsaLevel::kAvx512: v = ElementwiseVariant::kAvx512; break;
      case IsaLevel::kAvx2: v = ElementwiseVariant::kAvx2; break;
      default: v = ElementwiseVariant::kScalar; break;
    }
  }
  if (v == ElementwiseVariant::kReference) return kernels::ElementwiseUkernelsReference();
#if defined(__x86_64__) || defined(_M_X64)
  if (v == ElementwiseVariant::kAvx512) return kernels::ElementwiseUkernelsAvx512();
  if (v == ElementwiseVariant::kAvx2) return kernels::ElementwiseUkernelsAvx2();
#endif
  return kernels::ElementwiseUkernelsScalar();
}

bool BroadcastDims(const Dims& a, const Dims& b, Dims* out) {
  const size_t rank = std::max(a.size(), b.size());
  Dims y(rank);
  for (size_t i = 0; i < rank; ++i) {
    const size_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    const size_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    if (da != db && da != 1 && db != 1) return false;
    y[i] = da == 1 ? db : da;
  }
  *out = std::move(y);
  return true;
}

namespace {

// 16 K floats (64 KiB in, 64 KiB out) per task: large enough that handing out a task (an atomic
// and a std::function call) is noise, small enough to stay in L2 and to balance two threads.
constexpr size_t kChunk = 16 * 1024;
// Below this many elements the whole call runs on the calling pool thread: waking a helper costs
// a few microseconds, as much as the work itself.
constexpr size_t kSerialBelow = 32 * 1024;

unsigned ThreadsFor(const ElementwiseContext& ctx, size_t elements) {
  return elements < kSerialBelow ? 1u : std::max(1u, ctx.max_threads);
}

size_t Product(const Dims& d, size_t begin, size_t end) {
  size_t p = 1;
  for (size_t i = begin; i < end; ++i) p *= d[i];
  return p;
}

// Rows of n elements, grouped so that one task covers about kChunk elements.
template <typename Fn>
bool ForRows(const ElementwiseContext& ctx, size_t rows, size_t n, Fn&& row_fn) {
  if (rows == 0 || n == 0) return true;
  const size_t per_task = std::max<size_t>(1, kChunk / n);
  const size_t tasks = (rows + per_task - 1) / per_task;
  return ctx.pool->ParallelFor(tasks, ThreadsFor(ctx, rows * n), [&](size_t t) {
    const size_t r1 = std::min(rows, (t + 1) * per_task);
    for (size_t r = t * per_task; r < r1; ++r) row_fn(r);
  }, ctx.cancel);
}

struct BroadcastDim {
  size_t size, stride_a, stride_b;
};

}  // namespace

bool RunBinary(const ElementwiseContext& ctx, int32_t op, const float* a, const Dims& a_dims,
               const float* b, const Dims& b_dims, float* y) {
  Dims y_dims;
  if (!BroadcastDims(a_dims, b_dims, &y_dims)) return true;  // the binding rejected this already
  const size_t rank = y_dims.size();
  const size_t total = Product(y_dims, 0, rank);
  if (total == 0) return true;
  // Strides of a and b in the output's index space (0 along broadcast dims), dims of 1 dropped,
  // then neighbours merged wherever both inputs walk them as one contiguous (or constant) range:
  // same-shape inputs become one dim, [M,N] + [N] becomes M rows against one row, [M,N] + [M,1]
  // M rows against one value each.
  std::vector<BroadcastDim> dims;
  size_t sa = 1, sb = 1;
  std::vector<BroadcastDim> rev;
  for (size_t i = rank; i-- > 0;) {
    const size_t da = i + a_dims.size() < rank ? 1 : a_dims[i + a_dims.size() - rank];
    const size_t db = i + b_dims.size() < rank ? 1 : b_dims[i + b_dims.size() - rank];
    if (y_dims[i] != 1) rev.push_back({y_dims[i], da == 1 ? 0 : sa, db == 1 ? 0 : sb});
    sa *= da;
    sb *= db;
  }
  for (size_t i = rev.size(); i-- > 0;) {
    const BroadcastDim& d = rev[i];
    if (!dims.empty() && dims.back().stride_a == d.stride_a * d.size && dims.back().stride_b == d.stride_b * d.size) {
      dims.back() = {dims.back().size * d.size, d.stride_a, d.stride_b};
    } else {
      dims.push_back(d);
    }
  }
  if (dims.empty()) dims.push_back({1, 1, 1});  // every dim is 1: one element
  const BroadcastDim inner = dims.back();
  dims.pop_back();
  const size_t rows = total / inner.size;
  const size_t n = inner.size;
  const size_t pieces = (n + kChunk - 1) / kChunk;
  const size_t rows_per_task = n >= kChunk ? 1 : kChunk / n;
  const size_t tasks = n >= kChunk ? rows * pieces : (rows + rows_per_task - 1) / rows_per_task;
  const kernels::ElementwiseUkernels& uk = ctx.uk;
  auto do_row = [&](size_t r, size_t begin, size_t end) {
    size_t off_a = 0, off_b = 0, rem = r;
    for (size_t d = dims.size(); d-- > 0;) {
      const size_t idx = rem % dims[d].size;
      rem /= dims[d].size;
      off_a += idx * dims[d].stride_a;
      off_b += idx * dims[d].stride_b;
    }
    float* yr = y + r * n + begin;
    const size_t len = end - begin;
    if (inner.stride_a != 0 && inner.stride_b != 0) uk.binary_vv(op, len, a + off_a + begin, b + off_b + begin, yr);
    else if (inner.stride_b == 0 && n > 1) uk.binary_vs(op, len, a + off_a + begin, b[off_b], yr);
    else if (inner.stride_a == 0 && n > 1) uk.binary_sv(op, len, a[off_a], b + off_b + begin, yr);
    else uk.binary_vv(op, len, a + off_a, b + off_b, yr);  // n == 1
  };
  return ctx.pool->ParallelFor(tasks, ThreadsFor(ctx, total), [&](size_t t) {
    if (n >= kChunk) {
      const size_t begin = (t % pieces) * kChunk;
      do_row(t / pieces, begin, std::min(n, begin + kChunk));
    } else {
      const size_t r1 = std::min(rows, (t + 1) * rows_per_task);
      for (size_t r = t * rows_per_task; r < r1; ++r) do_row(r, 0, n);
    }
  }, ctx.cancel);
}

bool RunUnary(const ElementwiseContext& ctx, int32_t op, size_t n, const float* x, float* y) {
  if (n == 0) return true;
  const size_t tasks = (n + kChunk - 1) / kChunk;
  return ctx.pool->ParallelFor(tasks, ThreadsFor(ctx, n), [&](size_t t) {
    const size_t begin = t * kChunk;
    ctx.uk.unary(op, std::min(kChunk, n - begin), x + begin, y + begin);
  }, ctx.cancel);
}

bool RunSoftmax(const ElementwiseContext& ctx, const float* x, const Dims& dims, size_t axis, float* y) {
  const size_t outer = Product(dims, 0, axis), n = dims[axis], inner = Product(dims, axis + 1, dims.size());
  if (outer == 0 || n == 0 || inner == 0) return true;
  if (inner == 1) return ForRows(ctx, outer, n, [&](size_t r) { ctx.uk.softmax_row(n, x + r * n, y + r * n); });
  // A non-last axis: blocks of columns, each block reduced down the axis with vector lanes across
  // columns. 256 columns x n rows keeps a block's 3 passes within L2 for n up to ~500.
  constexpr size_t kCols = 256;
  const size_t col_blocks = (inner + kCols - 1) / kCols;
  return ctx.pool->ParallelFor(outer * col_blocks, ThreadsFor(ctx, outer * n * inner), [&](size_t t) {
    const size_t o = t / col_blocks, c0 = (t % col_blocks) * kCols;
    const size_t base = o * n * inner + c0;
    ctx.uk.softmax_cols(n, std::min(kCols, inner - c0), inner, x + base, y + base);
  }, ctx.cancel);
}

bool RunLayerNorm(const ElementwiseContext& ctx, const float* x, size_t rows, size_t n,
                  const float* gamma, const float* beta, float eps, float* y) {
  return ForRows(ctx, rows, n, [&](size_t r) { ctx.uk.layernorm_row(n, x + r * n, gamma, beta, eps, y + r * n); });
}

bool RunRmsNorm(const ElementwiseContext& ctx, const float* x, size_t rows, size_t n, const float* gamma,
                float eps, float* y) {
  return ForRows(ctx, rows, n, [&](size_t r) { ctx.uk.rmsnorm_row(n, x + r * n, gamma, eps, y + r * n); });
}

bool RunArgmax(const ElementwiseContext& ctx, const float* x, const Dims& dims, size_t axis, int64_t* y) {
  const size_t outer = Product(dims, 0, axis), n = dims[axis], inner = Product(dims, axis + 1, dims.size());
  if (outer == 0 || inner == 0 || n == 0) return true;
  // One output per (outer, inner) pair; each task takes a run of them covering ~kChunk inputs.
  return ForRows(ctx, outer * inner, n, [&](size_t r) {
    const size_t o = r / inner, i = r % inner;
    y[r] = kernels::F32ArgmaxStrided(n, inner, x + o * n * inner + i);
  });
}

bool RunTopK(const ElementwiseContext& ctx, const float* x, const Dims& dims, size_t axis, size_t k,
             bool largest, float* values, int64_t* indices) {
  const size_t outer = Product(dims, 0, axis), n = dims[axis], inner = Product(dims, axis + 1, dims.size());
  if (outer == 0 || inner == 0 || n == 0 || k == 0) return true;
  const size_t slices = outer * inner;
  const size_t per_task = std::max<size_t>(1, kChunk / n);
  const size_t tasks = (slices + per_task - 1) / per_task;
  return ctx.pool->ParallelFor(tasks, ThreadsFor(ctx, slices * n), [&](size_t t) {
    std::vector<size_t> scratch(n);
    const size_t s1 = std::min(slices, (t + 1) * per_task);
    for (size_t s = t * per_task; s < s1; ++s) {
      const size_t o = s / inner, i = s % inner;
      const size_t out = o * k * inner + i;
      kernels::F32TopKStrided(n, inner, x + o * n * inner + i, k, largest, scratch.data(), values + out,
                              indices + out, inner);
    }
  }, ctx.cancel);
}

bool ParseCastType(const std::string& name, CastType* out) {
  if (name == "float32") *out = CastType::kFloat32;
  else if (name == "float16") *out = CastType::kFloat16;
  else if (name == "bfloat16") *out = CastType::kBfloat16;
  else return false;
  return true;
}

bool RunCast(const ElementwiseContext& ctx, CastType from, const void* x, CastType to, void* y, size_t n) {
  if (n == 0) return true;
  const kernels::ElementwiseUkernels& uk = ctx.uk;
  const size_t tasks = (n + kChunk - 1) / kChunk;
  return ctx.pool->ParallelFor(tasks, ThreadsFor(ctx, n), [&](size_t t) {
    const size_t begin = t * kChunk, len = std::min(kChunk, n - begin);
    const float* xf = static_cast<const float*>(x) + begin;
    const uint16_t* xh = static_cast<const uint16_t*>(x) + begin;
    float* yf = static_cast<float*>(y) + begin;
    uint16_t* yh = static_cast<uint16_t*>(y) + begin;
    if (from == to) {
      std::memcpy(to == CastType::kFloat32 ? static_cast<void*>(yf) : static_cast<void*>(yh),
                  from == CastType::kFloat32 ? static_cast<const void*>(xf) : static_cast<const void*>(xh),
                  len * (from == CastType::kFloat32 ? 4 : 2));
    } else if (from == CastType::kFloat32) {
      (to == CastType::kFloat16 ? uk.f32_to_f16 : uk.f32_to_bf16)(len, xf, yh);
    } else if (to == CastType::kFloat32) {
      (from == CastType::kFloat16 ? uk.f16_to_f32 : uk.bf16_to_f32)(len, xh, yf);
    } else {
      // float16 <-> bfloat16 through float32, which holds both exactly: one rounding in all.
      float buf[1024];
      for (size_t i = 0; i < len; i += 1024) {
        const size_t m = std::min<size_t>(1024, len - i);
        (from == CastType::kFloat16 ? uk.f16_to_f32 : uk.bf16_to_f32)(m, xh + i, buf);
        (to == CastType::kFloat16 ? uk.f32_to_f16 : uk.f32_to_bf16)(m, buf, yh + i);
      }
    }
  }, ctx.cancel);
}

}  // namespace sonde
