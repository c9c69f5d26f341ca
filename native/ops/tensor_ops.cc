#include "ops/tensor_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "kernels/elementwise/elementwise.h"
#include "kernels/gemm/gemm.h"
#include "kernels/reduce/reduce.h"
#include "kernels/transpose/transpose.h"
#include "ops/elementwise.h"
#include "ops/gemm.h"
#include "runtime/cpu.h"

namespace sonde {

size_t ElemBytes(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return 4;
    case ElemType::kInt64: return 8;
    case ElemType::kInt32: return 4;
    case ElemType::kBool: return 1;
    case ElemType::kUint8: return 1;
    case ElemType::kInt8: return 1;
  }
  return 1;
}

namespace {

// Below this many elements a call runs on the calling pool thread: waking a helper costs a few
// microseconds, as much as the work itself.
constexpr size_t kSerialBelow = 64 * 1024;
// Elements per task once split: large enough that handing out a task is noise, small enough to
// balance the threads and keep a task's working set in L2.
constexpr size_t kTaskElems = 16 * 1024;

// Runs fn(begin, end) over [0, units) in tasks of about kTaskElems elements (unit_elems each),
// on the pool when the whole is large. False if cancelled.
template <typename Fn>
bool ForRanges(const TensorOpContext& ctx, size_t units, size_t unit_elems, Fn&& fn) {
  if (units == 0) return true;
  unit_elems = std::max<size_t>(1, unit_elems);
  const size_t total = units * unit_elems;
  if (total < kSerialBelow || ctx.max_threads <= 1 || !ctx.pool) {
    if (ctx.cancel && ctx.cancel->load(std::memory_order_relaxed)) return false;
    fn(size_t{0}, units);
    return true;
  }
  const size_t per_task = std::max<size_t>(1, kTaskElems / unit_elems);
  const size_t tasks = (units + per_task - 1) / per_task;
  return ctx.pool->ParallelFor(tasks, ctx.max_threads, [&](size_t t) {
    const size_t begin = t * per_task;
    fn(begin, std::min(units, begin + per_task));
  }, ctx.cancel);
}

// Dims of one strided walk over up to 4 operands, merged where every operand's strides allow it
// and with size-1 dims dropped, so that the innermost loop is as long as possible.
struct Walk {
  size_t rank = 0;
  size_t dims[kMaxRank] = {};
  ptrdiff_t strides[4][kMaxRank] = {};
};

Walk MergeWalk(const size_t* dims, size_t rank, const ptrdiff_t* const* strides, size_t operands) {
  Walk w;
  for (size_t d = 0; d < rank; ++d) {
    if (dims[d] == 1) continue;
    if (w.rank > 0) {
      bool merge = true;
      const size_t last = w.rank - 1;
      for (size_t o = 0; o < operands; ++o)
        if (w.strides[o][last] != strides[o][d] * static_cast<ptrdiff_t>(dims[d])) merge = false;
      if (merge) {
        w.dims[last] *= dims[d];
        for (size_t o = 0; o < operands; ++o) w.strides[o][last] = strides[o][d];
        continue;
      }
    }
    w.dims[w.rank] = dims[d];
    for (size_t o = 0; o < operands; ++o) w.strides[o][w.rank] = strides[o][d];
    ++w.rank;
  }
  if (w.rank == 0) {
    // A single element (or every dim 1): one inner run of length 1.
    w.rank = 1;
    w.dims[0] = 1;
    for (size_t o = 0; o < operands; ++o) w.strides[o][0] = 0;
  }
  return w;
}

size_t Product(const size_t* dims, size_t n) {
  size_t p = 1;
  for (size_t i = 0; i < n; ++i) p *= dims[i];
  return p;
}

// Element offsets of row `row` (an index over dims[0..rank-1), row-major) for each operand.
inline void RowOffsets(const Walk& w, size_t row, size_t operands, ptrdiff_t* off) {
  for (size_t o = 0; o < operands; ++o) off[o] = 0;
  for (size_t d = w.rank - 1; d-- > 0;) {
    const size_t i = row % w.dims[d];
    row /= w.dims[d];
    for (size_t o = 0; o < operands; ++o) off[o] += static_cast<ptrdiff_t>(i) * w.strides[o][d];
  }
}

// Advances a row-major index over dims[0..rank-1) by one, updating the operands' offsets.
inline void NextRow(const Walk& w, size_t* idx, size_t operands, ptrdiff_t* off) {
  for (size_t d = w.rank - 1; d-- > 0;) {
    for (size_t o = 0; o < operands; ++o) off[o] += w.strides[o][d];
    if (++idx[d] < w.dims[d]) return;
    for (size_t o = 0; o < operands; ++o) off[o] -= static_cast<ptrdiff_t>(w.dims[d]) * w.strides[o][d];
    idx[d] = 0;
  }
}

// Calls row_fn(offsets, n) for every inner row in [row0, row1), where n = the innermost dim.
template <typename Fn>
void WalkRows(const Walk& w, size_t operands, size_t row0, size_t row1, Fn&& row_fn) {
  ptrdiff_t off[4];
  size_t idx[kMaxRank] = {};
  RowOffsets(w, row0, operands, off);
  size_t r = row0;
  for (size_t d = w.rank - 1; d-- > 0;) {
    idx[d] = r % w.dims[d];
    r /= w.dims[d];
  }
  for (size_t row = row0; row < row1; ++row) {
    row_fn(off);
    NextRow(w, idx, operands, off);
  }
}

// The row-reduction kernels for the dispatch level (Cpu().level, fixed for the process).
const kernels::ReduceUkernels& ReduceTable() {
  static const kernels::ReduceUkernels table = [] {
#if defined(__x86_64__) || defined(_M_X64)
    if (Cpu().Supports(IsaLevel::kAvx512)) return kernels::ReduceUkernelsAvx512();
    if (Cpu().Supports(IsaLevel::kAvx2)) return kernels::ReduceUkernelsAvx2();
#endif
    return kernels::ReduceUkernelsScalar();
  }();
  return table;
}

kernels::X32TransposeUkernel TransposeKernel() {
  static const kernels::X32TransposeUkernel fn = [] {
#if defined(__x86_64__) || defined(_M_X64)
    if (Cpu().Supports(IsaLevel::kAvx2)) return kernels::X32TransposeAvx2();
#endif
    return kernels::X32TransposeScalar();
  }();
  return fn;
}

bool Cancelled(const TensorOpContext& ctx) { return ctx.cancel && ctx.cancel->load(std::memory_order_relaxed); }

// ---------------------------------------------------------------------------------------------
// Unary

template <typename T>
T WrapNeg(T v) {
  using U = std::make_unsigned_t<T>;
  return static_cast<T>(U(0) - static_cast<U>(v));
}

float UnaryScalar(UnaryKind kind, float v, float alpha, float beta) {
  switch (kind) {
    case UnaryKind::kRelu: return v < 0.0f ? 0.0f : v;
    case UnaryKind::kLeakyRelu: return v < 0.0f ? alpha * v : v;
    case UnaryKind::kClip: return v < alpha ? alpha : (v > beta ? beta : v);
    case UnaryKind::kSigmoid: return 1.0f / (1.0f + std::exp(-v));
    case UnaryKind::kTanh: return std::tanh(v);
    case UnaryKind::kHardSigmoid: {
      const float t = alpha * v + beta;
      return t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
    }
    case UnaryKind::kHardSwish: {
      // ONNX HardSwish: x * max(0, min(1, x / 6 + 1 / 2)).
      const float t = v * (1.0f / 6.0f) + 0.5f;
      return v * (t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t));
    }
    case UnaryKind::kErf: return std::erf(v);
    case UnaryKind::kGelu: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case UnaryKind::kGeluTanh: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + std::tanh(u));
    }
    case UnaryKind::kSilu: return v / (1.0f + std::exp(-v));
    case UnaryKind::kExp: return std::exp(v);
    case UnaryKind::kLog: return std::log(v);
    case UnaryKind::kSqrt: return std::sqrt(v);
    case UnaryKind::kNeg: return -v;
    case UnaryKind::kAbs: return std::fabs(v);
    case UnaryKind::kReciprocal: return 1.0f / v;
    case UnaryKind::kNot: return v == 0.0f ? 1.0f : 0.0f;
    case UnaryKind::kIdentity: return v;
  }
  return v;
}

// The kinds the elementwise family has SIMD kernels for; -1 where it has none.
int32_t ElementwiseUnaryOp(UnaryKind kind) {
  switch (kind) {
    case UnaryKind::kGelu: return kernels::kUnaryGeluErf;
    case UnaryKind::kGeluTanh: return kernels::kUnaryGeluTanh;
    case UnaryKind::kSilu: return kernels::kUnarySilu;
    case UnaryKind::kSigmoid: return kernels::kUnarySigmoid;
    case UnaryKind::kTanh: return kernels::kUnaryTanh;
    case UnaryKind::kExp: return kernels::kUnaryExp;
    case UnaryKind::kRelu: return kernels::kUnaryRelu;
    default: return -1;
  }
}

template <UnaryKind K>
void UnaryLoop(const float* x, float* y, size_t n, float alpha, float beta) {
  for (size_t i = 0; i < n; ++i) y[i] = UnaryScalar(K, x[i], alpha, beta);
}

void UnaryF32(UnaryKind kind, const float* x, float* y, size_t n, float alpha, float beta) {
  // One instantiation per kind so that the switch is outside the loop and the simple kinds vectorise.
  switch (kind) {
#define SONDE_UNARY_CASE(K) \
  case UnaryKind::K: UnaryLoop<UnaryKind::K>(x, y, n, alpha, beta); return;
    SONDE_UNARY_CASE(kRelu)
    SONDE_UNARY_CASE(kLeakyRelu)
    SONDE_UNARY_CASE(kClip)
    SONDE_UNARY_CASE(kSigmoid)
    SONDE_UNARY_CASE(kTanh)
    SONDE_UNARY_CASE(kHardSigmoid)
    SONDE_UNARY_CASE(kHardSwish)
    SONDE_UNARY_CASE(kErf)
    SONDE_UNARY_CASE(kGelu)
    SONDE_UNARY_CASE(kGeluTanh)
    SONDE_UNARY_CASE(kSilu)
    SONDE_UNARY_CASE(kExp)
    SONDE_UNARY_CASE(kLog)
    SONDE_UNARY_CASE(kSqrt)
    SONDE_UNARY_CASE(kNeg)
    SONDE_UNARY_CASE(kAbs)
    SONDE_UNARY_CASE(kReciprocal)
    SONDE_UNARY_CASE(kNot)
    SONDE_UNARY_CASE(kIdentity)
#undef SONDE_UNARY_CASE
  }
}

template <typename T>
void UnaryInt(UnaryKind kind, const T* x, T* y, size_t n) {
  if (kind == UnaryKind::kNeg) {
    for (size_t i = 0; i < n; ++i) y[i] = WrapNeg(x[i]);
  } else if (kind == UnaryKind::kAbs) {
    for (size_t i = 0; i < n; ++i) y[i] = x[i] < 0 ? WrapNeg(x[i]) : x[i];
  } else if (kind == UnaryKind::kRelu) {
    for (size_t i = 0; i < n; ++i) y[i] = x[i] < 0 ? T(0) : x[i];
  }
}

const char* ElemTypeName(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return "float32";
    case ElemType::kInt64: return "int64";
    case ElemType::kInt32: return "int32";
    case ElemType::kBool: return "bool";
    case ElemType::kUint8: return "uint8";
    case ElemType::kInt8: return "int8";
  }
  return "?";
}

}  // namespace

bool RunUnaryOp(const TensorOpContext& ctx, UnaryKind kind, ElemType t, const void* x, void* y, size_t count,
                float alpha, float beta, std::string* error) {
  if (count == 0) return true;
  if (kind == UnaryKind::kIdentity) {
    const size_t bytes = ElemBytes(t);
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) {
      if (x != y) std::memmove(static_cast<char*>(y) + b * bytes, static_cast<const char*>(x) + b * bytes, (e - b) * bytes);
    });
  }
  if (t == ElemType::kFloat32) {
    const float* xf = static_cast<const float*>(x);
    float* yf = static_cast<float*>(y);
    const int32_t op = ElementwiseUnaryOp(kind);
    if (op >= 0) {
      ElementwiseContext ectx{ctx.pool, ctx.max_threads, ctx.cancel, ElementwiseTable(ElementwiseVariant::kAuto)};
      if (count < kSerialBelow) {
        if (Cancelled(ctx)) return false;
        ectx.uk.unary(op, count, xf, yf);
        return true;
      }
      return RunUnary(ectx, op, count, xf, yf);
    }
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) { UnaryF32(kind, xf + b, yf + b, e - b, alpha, beta); });
  }
  if (kind == UnaryKind::kNot && (t == ElemType::kBool || t == ElemType::kUint8)) {
    const uint8_t* xb = static_cast<const uint8_t*>(x);
    uint8_t* yb = static_cast<uint8_t*>(y);
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) yb[i] = xb[i] == 0 ? 1 : 0;
    });
  }
  const bool int_kind = kind == UnaryKind::kNeg || kind == UnaryKind::kAbs || kind == UnaryKind::kRelu;
  if (int_kind && t == ElemType::kInt64) {
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) {
      UnaryInt(kind, static_cast<const int64_t*>(x) + b, static_cast<int64_t*>(y) + b, e - b);
    });
  }
  if (int_kind && t == ElemType::kInt32) {
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) {
      UnaryInt(kind, static_cast<const int32_t*>(x) + b, static_cast<int32_t*>(y) + b, e - b);
    });
  }
  if (int_kind && t == ElemType::kInt8) {
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) {
      UnaryInt(kind, static_cast<const int8_t*>(x) + b, static_cast<int8_t*>(y) + b, e - b);
    });
  }
  // createPlan rejects these; this is the cheap second line.
  static const char* const kUnaryNames[] = {"relu", "leakyRelu", "clip", "sigmoid", "tanh", "hardSigmoid", "hardSwish",
                                            "erf", "gelu", "geluTanh", "silu", "exp", "log", "sqrt", "neg", "abs",
                                            "reciprocal", "not", "identity"};
  const size_t k = static_cast<size_t>(kind);
  if (error)
    *error = std::string("unary '") + (k < sizeof(kUnaryNames) / sizeof(kUnaryNames[0]) ? kUnaryNames[k] : "?") +
             "' does not take " + ElemTypeName(t);
  return false;
}

// ---------------------------------------------------------------------------------------------
// Binary

namespace {

template <typename T>
struct IsFloat : std::is_floating_point<T> {};

// Integer power, exact by squaring; a negative exponent truncates 1 / a^-b toward zero.
template <typename T>
T IntPow(T a, T b, bool* zero_neg) {
  using U = std::make_unsigned_t<T>;
  if (b < 0) {
    if (a == 1) return 1;
    if (a == -1) return (b & 1) ? T(-1) : T(1);
    if (a == 0) *zero_neg = true;
    return 0;
  }
  U base = static_cast<U>(a), result = 1;
  uint64_t e = static_cast<uint64_t>(b);
  while (e) {
    if (e & 1) result = static_cast<U>(result * base);
    base = static_cast<U>(base * base);
    e >>= 1;
  }
  return static_cast<T>(result);
}

// Failures an integer kernel found, reported after the loop (keeps the loops branch-light).
struct IntFaults {
  bool div_zero = false;
  bool pow_zero_neg = false;
};

template <BinaryKind K, typename T, typename Out>
inline Out BinaryScalar(T a, T b, IntFaults* f) {
  if constexpr (K == BinaryKind::kEqual) return a == b ? 1 : 0;
  if constexpr (K == BinaryKind::kLess) return a < b ? 1 : 0;
  if constexpr (K == BinaryKind::kGreater) return a > b ? 1 : 0;
  if constexpr (K == BinaryKind::kAnd) return static_cast<Out>((a != T(0)) && (b != T(0)));
  if constexpr (K == BinaryKind::kOr) return static_cast<Out>((a != T(0)) || (b != T(0)));
  if constexpr (IsFloat<T>::value) {
    if constexpr (K == BinaryKind::kAdd) return a + b;
    if constexpr (K == BinaryKind::kSub) return a - b;
    if constexpr (K == BinaryKind::kMul) return a * b;
    if constexpr (K == BinaryKind::kDiv) return a / b;
    if constexpr (K == BinaryKind::kPow) return std::pow(a, b);
  } else {
    // Wrapping arithmetic (two's complement), never signed overflow.
    using U = std::make_unsigned_t<T>;
    if constexpr (K == BinaryKind::kAdd) return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
    if constexpr (K == BinaryKind::kSub) return static_cast<T>(static_cast<U>(a) - static_cast<U>(b));
    if constexpr (K == BinaryKind::kMul) return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
    if constexpr (K == BinaryKind::kDiv) {
      if (b == 0) {
        f->div_zero = true;
        return 0;
      }
      if (std::is_signed<T>::value && b == T(-1)) return WrapNeg(a);  // MIN / -1 wraps to MIN
      return static_cast<T>(a / b);
    }
    if constexpr (K == BinaryKind::kPow) {
      if constexpr (std::is_signed<T>::value) {
        return IntPow(a, b, &f->pow_zero_neg);
      } else {
        bool unused = false;
        return static_cast<T>(IntPow<int64_t>(static_cast<int64_t>(a), static_cast<int64_t>(b), &unused));
      }
    }
  }
  return Out{};
}

// One inner row: y[j] = a[j * as] op b[j * bs]. The unit/zero-stride cases are separate loops so
// that the compiler vectorises them (the bias/residual/scale case: as = 1, bs = 1 or 0).
template <BinaryKind K, typename T, typename Out>
void BinaryRow(const T* a, ptrdiff_t as, const T* b, ptrdiff_t bs, Out* y, size_t n, IntFaults* f) {
  if (as == 1 && bs == 1) {
    for (size_t j = 0; j < n; ++j) y[j] = BinaryScalar<K, T, Out>(a[j], b[j], f);
  } else if (as == 1 && bs == 0) {
    const T bv = *b;
    if constexpr (K == BinaryKind::kPow && std::is_same<T, float>::value) {
      // x^2 (decomposed LayerNorm's variance): powf's correctly rounded square is the one
      // rounding of x * x, at a fraction of the cost.
      if (bv == 2.0f) {
        for (size_t j = 0; j < n; ++j) y[j] = a[j] * a[j];
        return;
      }
    }
    for (size_t j = 0; j < n; ++j) y[j] = BinaryScalar<K, T, Out>(a[j], bv, f);
  } else if (as == 0 && bs == 1) {
    const T av = *a;
    for (size_t j = 0; j < n; ++j) y[j] = BinaryScalar<K, T, Out>(av, b[j], f);
  } else {
    for (size_t j = 0; j < n; ++j) y[j] = BinaryScalar<K, T, Out>(a[j * as], b[j * bs], f);
  }
}

constexpr bool IsComparison(BinaryKind k) {
  return k == BinaryKind::kEqual || k == BinaryKind::kLess || k == BinaryKind::kGreater || k == BinaryKind::kAnd ||
         k == BinaryKind::kOr;
}

template <BinaryKind K, typename T>
bool BinaryTyped(const TensorOpContext& ctx, const T* a, const ptrdiff_t* a_strides, const T* b,
                 const ptrdiff_t* b_strides, void* y, const size_t* dims, size_t rank, std::string* error) {
  using Out = std::conditional_t<IsComparison(K), uint8_t, T>;
  const size_t total = Product(dims, rank);
  if (total == 0) return true;
  // y is contiguous: its strides are the row-major ones.
  ptrdiff_t y_strides[kMaxRank];
  {
    ptrdiff_t s = 1;
    for (size_t d = rank; d-- > 0;) {
      y_strides[d] = s;
      s *= static_cast<ptrdiff_t>(dims[d]);
    }
  }
  const ptrdiff_t* strides[3] = {a_strides, b_strides, y_strides};
  const Walk w = MergeWalk(dims, rank, strides, 3);
  const size_t inner = w.dims[w.rank - 1];
  const size_t rows = total / inner;
  const ptrdiff_t as = w.strides[0][w.rank - 1], bs = w.strides[1][w.rank - 1];
  Out* yo = static_cast<Out*>(y);
  std::atomic<bool> div_zero{false}, pow_zero_neg{false};
  const bool ok = ForRanges(ctx, rows, inner, [&](size_t r0, size_t r1) {
    IntFaults f;
    WalkRows(w, 3, r0, r1, [&](const ptrdiff_t* off) {
      BinaryRow<K, T, Out>(a + off[0], as, b + off[1], bs, yo + off[2], inner, &f);
    });
    if (f.div_zero) div_zero = true;
    if (f.pow_zero_neg) pow_zero_neg = true;
  });
  if (!ok) return false;
  if (div_zero) {
    if (error) *error = "integer division by zero";
    return false;
  }
  if (pow_zero_neg) {
    if (error) *error = "integer 0 raised to a negative power";
    return false;
  }
  return true;
}

// float add/sub/mul/div on the elementwise family's SIMD row kernels where the inner strides are
// 1/1, 1/0 or 0/1 (bias, residual, scale); false if the layout is not one of those.
bool BinaryF32Simd(const TensorOpContext& ctx, BinaryKind kind, const float* a, const ptrdiff_t* a_strides,
                   const float* b, const ptrdiff_t* b_strides, float* y, const size_t* dims, size_t rank, bool* ok) {
  int32_t op;
  switch (kind) {
    case BinaryKind::kAdd: op = kernels::kBinaryAdd; break;
    case BinaryKind::kSub: op = kernels::kBinarySub; break;
    case BinaryKind::kMul: op = kernels::kBinaryMul; break;
    case BinaryKind::kDiv: op = kernels::kBinaryDiv; break;
    default: return false;
  }
  ptrdiff_t y_strides[kMaxRank];
  ptrdiff_t s = 1;
  for (size_t d = rank; d-- > 0;) {
    y_strides[d] = s;
    s *= static_cast<ptrdiff_t>(dims[d]);
  }
  const ptrdiff_t* strides[3] = {a_strides, b_strides, y_strides};
  const Walk w = MergeWalk(dims, rank, strides, 3);
  const size_t inner = w.dims[w.rank - 1];
  const ptrdiff_t as = w.strides[0][w.rank - 1], bs = w.strides[1][w.rank - 1];
  const bool vv = as == 1 && bs == 1, vs = as == 1 && bs == 0, sv = as == 0 && bs == 1;
  // Short rows spend their time in the walk, not the arithmetic: the templated loop does as well.
  if (!(vv || vs || sv) || inner < 16) return false;
  const kernels::ElementwiseUkernels uk = ElementwiseTable(ElementwiseVariant::kAuto);
  const size_t rows = Product(dims, rank) / inner;
  *ok = ForRanges(ctx, rows, inner, [&](size_t r0, size_t r1) {
    WalkRows(w, 3, r0, r1, [&](const ptrdiff_t* off) {
      const float* ap = a + off[0];
      const float* bp = b + off[1];
      float* yp = y + off[2];
      if (vv) uk.binary_vv(op, inner, ap, bp, yp);
      else if (vs) uk.binary_vs(op, inner, ap, *bp, yp);
      else uk.binary_sv(op, inner, *ap, bp, yp);
    });
  });
  return true;
}

template <typename T>
bool BinaryDispatchKind(const TensorOpContext& ctx, BinaryKind kind, const void* a, const ptrdiff_t* a_strides,
                        const void* b, const ptrdiff_t* b_strides, void* y, const size_t* dims, size_t rank,
                        std::string* error) {
  const T* at = static_cast<const T*>(a);
  const T* bt = static_cast<const T*>(b);
  switch (kind) {
#define SONDE_BINARY_CASE(K) \
  case BinaryKind::K: return BinaryTyped<BinaryKind::K, T>(ctx, at, a_strides, bt, b_strides, y, dims, rank, error);
    SONDE_BINARY_CASE(kAdd)
    SONDE_BINARY_CASE(kSub)
    SONDE_BINARY_CASE(kMul)
    SONDE_BINARY_CASE(kDiv)
    SONDE_BINARY_CASE(kPow)
    SONDE_BINARY_CASE(kEqual)
    SONDE_BINARY_CASE(kLess)
    SONDE_BINARY_CASE(kGreater)
    SONDE_BINARY_CASE(kAnd)
    SONDE_BINARY_CASE(kOr)
#undef SONDE_BINARY_CASE
  }
  if (error) *error = "unknown binary operator";
  return false;
}

}  // namespace

bool RunBinaryOp(const TensorOpContext& ctx, BinaryKind kind, ElemType t, const void* a, const ptrdiff_t* a_strides,
                 const void* b, const ptrdiff_t* b_strides, void* y, const size_t* dims, size_t rank,
                 std::string* error) {
  switch (t) {
    case ElemType::kFloat32: {
      bool ok = true;
      if (BinaryF32Simd(ctx, kind, static_cast<const float*>(a), a_strides, static_cast<const float*>(b), b_strides,
                        static_cast<float*>(y), dims, rank, &ok))
        return ok;
      return BinaryDispatchKind<float>(ctx, kind, a, a_strides, b, b_strides, y, dims, rank, error);
    }
    case ElemType::kInt64: return BinaryDispatchKind<int64_t>(ctx, kind, a, a_strides, b, b_strides, y, dims, rank, error);
    case ElemType::kInt32: return BinaryDispatchKind<int32_t>(ctx, kind, a, a_strides, b, b_strides, y, dims, rank, error);
    case ElemType::kBool:
    case ElemType::kUint8: return BinaryDispatchKind<uint8_t>(ctx, kind, a, a_strides, b, b_strides, y, dims, rank, error);
    case ElemType::kInt8: return BinaryDispatchKind<int8_t>(ctx, kind, a, a_strides, b, b_strides, y, dims, rank, error);
  }
  if (error) *error = "unknown element type";
  return false;
}

// ---------------------------------------------------------------------------------------------
// Where, strided copy, fill

namespace {

template <typename T>
void CopyRow(const char* x, ptrdiff_t xs, char* y, ptrdiff_t ys, size_t n) {
  const T* xt = reinterpret_cast<const T*>(x);
  T* yt = reinterpret_cast<T*>(y);
  if (xs == 1 && ys == 1) {
    std::memcpy(yt, xt, n * sizeof(T));
  } else if (xs == 0) {
    const T v = *xt;
    for (size_t j = 0; j < n; ++j) yt[j * ys] = v;
  } else {
    for (size_t j = 0; j < n; ++j) yt[j * ys] = xt[j * xs];
  }
}

// Copies one element of `bytes` (a power of two up to 8, or any size via memcpy).
inline void CopyElem(const char* x, char* y, size_t bytes) {
  switch (bytes) {
    case 1: *y = *x; return;
    case 2: std::memcpy(y, x, 2); return;
    case 4: std::memcpy(y, x, 4); return;
    case 8: std::memcpy(y, x, 8); return;
    default: std::memcpy(y, x, bytes);
  }
}

template <typename T>
void WhereRow(const uint8_t* c, ptrdiff_t cs, const T* x, ptrdiff_t xs, const T* y, ptrdiff_t ys, T* out, size_t n) {
  if (cs == 1 && xs == 1 && ys == 1) {
    for (size_t j = 0; j < n; ++j) out[j] = c[j] ? x[j] : y[j];
  } else {
    for (size_t j = 0; j < n; ++j) out[j] = c[j * cs] ? x[j * xs] : y[j * ys];
  }
}

// Rows [0, a_len) of one plane of a transpose: y[a * ya + b] = x[a + b * xb]. Column blocks of
// kTile keep the kTile x lines being read and the a_len (<= 16) y segments being written in L1, so
// each line is fetched once instead of once per element. 8 measured ahead of 16 (1024^2 floats,
// one thread: 14.5 vs 11.8 GB/s; row by row: 1.8 GB/s), before 4-byte elements moved to the
// transpose kernel; 1-, 2- and 8-byte elements still come here.
template <typename T>
void TransposeRows(const T* x, ptrdiff_t xb, T* y, ptrdiff_t ya, size_t a_len, size_t b_len) {
  constexpr size_t kTile = 8;
  for (size_t b0 = 0; b0 < b_len; b0 += kTile) {
    const size_t b1 = std::min(b_len, b0 + kTile);
    for (size_t a = 0; a < a_len; ++a) {
      T* yr = y + static_cast<ptrdiff_t>(a) * ya;
      const T* xa = x + a;
      for (size_t b = b0; b < b1; ++b) yr[b] = xa[static_cast<ptrdiff_t>(b) * xb];
    }
  }
}

// A strided copy whose x is contiguous along dim a_dim but not along the innermost (y's contiguous)
// dim: moves a_dim next to the innermost and copies each [a x inner] plane in tiles.
bool TransposeCopy(const TensorOpContext& ctx, const Walk& w, size_t a_dim, const char* x, char* y, size_t elem_bytes) {
  constexpr size_t kTile = 16;
  // planes: every dim but a_dim and the innermost, in order, then a_dim (its "inner" for RowOffsets).
  Walk planes;
  for (size_t d = 0; d + 1 < w.rank; ++d) {
    if (d == a_dim) continue;
    planes.dims[planes.rank] = w.dims[d];
    for (size_t o = 0; o < 2; ++o) planes.strides[o][planes.rank] = w.strides[o][d];
    ++planes.rank;
  }
  planes.dims[planes.rank] = w.dims[a_dim];
  for (size_t o = 0; o < 2; ++o) planes.strides[o][planes.rank] = w.strides[o][a_dim];
  ++planes.rank;
  const size_t a_len = w.dims[a_dim], b_len = w.dims[w.rank - 1];
  const ptrdiff_t ya = w.strides[1][a_dim], xb = w.strides[0][w.rank - 1];
  const size_t n_planes = Product(planes.dims, planes.rank - 1);
  const size_t a_tiles = (a_len + kTile - 1) / kTile;
  const ptrdiff_t eb = static_cast<ptrdiff_t>(elem_bytes);
  const kernels::X32TransposeUkernel transpose32 = TransposeKernel();
  return ForRanges(ctx, n_planes * a_tiles, kTile * b_len, [&](size_t u0, size_t u1) {
    for (size_t t = u0; t < u1; ++t) {
      ptrdiff_t off[2];
      RowOffsets(planes, t / a_tiles, 2, off);
      const size_t a0 = (t % a_tiles) * kTile, rows = std::min(kTile, a_len - a0);
      const char* xp = x + (off[0] + static_cast<ptrdiff_t>(a0)) * eb;
      char* yp = y + (off[1] + static_cast<ptrdiff_t>(a0) * ya) * eb;
      switch (elem_bytes) {
        case 1: TransposeRows(reinterpret_cast<const uint8_t*>(xp), xb, reinterpret_cast<uint8_t*>(yp), ya, rows, b_len); break;
        case 2: TransposeRows(reinterpret_cast<const uint16_t*>(xp), xb, reinterpret_cast<uint16_t*>(yp), ya, rows, b_len); break;
        case 4:
          transpose32(b_len, rows, reinterpret_cast<const uint32_t*>(xp), xb, reinterpret_cast<uint32_t*>(yp), ya);
          break;
        default: TransposeRows(reinterpret_cast<const uint64_t*>(xp), xb, reinterpret_cast<uint64_t*>(yp), ya, rows, b_len); break;
      }
    }
  });
}

}  // namespace

bool RunWhere(const TensorOpContext& ctx, const uint8_t* cond, const ptrdiff_t* cond_strides, const void* x,
              const ptrdiff_t* x_strides, const void* y, const ptrdiff_t* y_strides, void* out, const size_t* dims,
              size_t rank, size_t elem_bytes) {
  const size_t total = Product(dims, rank);
  if (total == 0) return true;
  ptrdiff_t out_strides[kMaxRank];
  ptrdiff_t s = 1;
  for (size_t d = rank; d-- > 0;) {
    out_strides[d] = s;
    s *= static_cast<ptrdiff_t>(dims[d]);
  }
  const ptrdiff_t* strides[4] = {cond_strides, x_strides, y_strides, out_strides};
  const Walk w = MergeWalk(dims, rank, strides, 4);
  const size_t inner = w.dims[w.rank - 1];
  const ptrdiff_t cs = w.strides[0][w.rank - 1], xs = w.strides[1][w.rank - 1], ys = w.strides[2][w.rank - 1];
  const char* xc = static_cast<const char*>(x);
  const char* yc = static_cast<const char*>(y);
  char* oc = static_cast<char*>(out);
  const ptrdiff_t eb = static_cast<ptrdiff_t>(elem_bytes);
  return ForRanges(ctx, total / inner, inner, [&](size_t r0, size_t r1) {
    WalkRows(w, 4, r0, r1, [&](const ptrdiff_t* off) {
      const uint8_t* c = cond + off[0];
      const char* xp = xc + off[1] * eb;
      const char* yp = yc + off[2] * eb;
      char* op = oc + off[3] * eb;
      switch (elem_bytes) {
        case 1: WhereRow(c, cs, reinterpret_cast<const uint8_t*>(xp), xs, reinterpret_cast<const uint8_t*>(yp), ys,
                         reinterpret_cast<uint8_t*>(op), inner); break;
        case 2: WhereRow(c, cs, reinterpret_cast<const uint16_t*>(xp), xs, reinterpret_cast<const uint16_t*>(yp), ys,
                         reinterpret_cast<uint16_t*>(op), inner); break;
        case 4: WhereRow(c, cs, reinterpret_cast<const uint32_t*>(xp), xs, reinterpret_cast<const uint32_t*>(yp), ys,
                         reinterpret_cast<uint32_t*>(op), inner); break;
        case 8: WhereRow(c, cs, reinterpret_cast<const uint64_t*>(xp), xs, reinterpret_cast<const uint64_t*>(yp), ys,
                         reinterpret_cast<uint64_t*>(op), inner); break;
        default:
          for (size_t j = 0; j < inner; ++j)
            CopyElem(c[j * cs] ? xp + j * xs * eb : yp + j * ys * eb, op + j * eb, elem_bytes);
      }
    });
  });
}

bool RunStridedCopy(const TensorOpContext& ctx, const void* x, const ptrdiff_t* x_strides, void* y,
                    const ptrdiff_t* y_strides, const size_t* dims, size_t rank, size_t elem_bytes) {
  const size_t total = Product(dims, rank);
  if (total == 0) return true;
  // Output-order walk: y's dims merge first (typically contiguous), and x's contiguous inner run,
  // if it has one, becomes a memcpy.
  const ptrdiff_t* strides[2] = {x_strides, y_strides};
  const Walk w = MergeWalk(dims, rank, strides, 2);
  const size_t inner = w.dims[w.rank - 1];
  const ptrdiff_t xs = w.strides[0][w.rank - 1], ys = w.strides[1][w.rank - 1];
  const char* xc = static_cast<const char*>(x);
  char* yc = static_cast<char*>(y);
  const ptrdiff_t eb = static_cast<ptrdiff_t>(elem_bytes);
  // A zero y stride writes one element several times; splitting such a walk would race.
  bool y_broadcast = false;
  for (size_t d = 0; d < w.rank; ++d) y_broadcast = y_broadcast || w.strides[1][d] == 0;
  if (!y_broadcast && xs != 1 && ys == 1 && inner >= 4 && w.rank >= 2 &&
      (elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8)) {
    for (size_t d = w.rank - 1; d-- > 0;) {
      if (w.strides[0][d] == 1 && w.dims[d] >= 4) return TransposeCopy(ctx, w, d, xc, yc, elem_bytes);
    }
  }
  auto body = [&](size_t r0, size_t r1) {
    WalkRows(w, 2, r0, r1, [&](const ptrdiff_t* off) {
      const char* xp = xc + off[0] * eb;
      char* yp = yc + off[1] * eb;
      if (xs == 1 && ys == 1) {
        std::memcpy(yp, xp, inner * elem_bytes);
        return;
      }
      switch (elem_bytes) {
        case 1: CopyRow<uint8_t>(xp, xs, yp, ys, inner); break;
        case 2: CopyRow<uint16_t>(xp, xs, yp, ys, inner); break;
        case 4: CopyRow<uint32_t>(xp, xs, yp, ys, inner); break;
        case 8: CopyRow<uint64_t>(xp, xs, yp, ys, inner); break;
        default:
          for (size_t j = 0; j < inner; ++j) CopyElem(xp + j * xs * eb, yp + j * ys * eb, elem_bytes);
      }
    });
  };
  if (y_broadcast) {
    if (Cancelled(ctx)) return false;
    body(0, total / inner);
    return true;
  }
  return ForRanges(ctx, total / inner, inner, body);
}

namespace {
template <typename T>
void FillTyped(void* y, size_t count, T v) {
  T* yt = static_cast<T*>(y);
  std::fill(yt, yt + count, v);
}

// ONNX Cast of one float to an integer type: truncation toward zero, NaN -> 0, and saturation at
// the type's range (out-of-range is undefined in ONNX; saturating avoids C++ undefined behaviour).
template <typename T>
T FloatToInt(double v) {
  if (std::isnan(v)) return 0;
  v = std::trunc(v);
  if (v <= static_cast<double>(std::numeric_limits<T>::min())) return std::numeric_limits<T>::min();
  if (v >= static_cast<double>(std::numeric_limits<T>::max())) return std::numeric_limits<T>::max();
  return static_cast<T>(v);
}
}  // namespace

void RunFill(ElemType t, void* y, size_t count, double value) {
  switch (t) {
    case ElemType::kFloat32: FillTyped<float>(y, count, static_cast<float>(value)); return;
    case ElemType::kInt64: FillTyped<int64_t>(y, count, FloatToInt<int64_t>(value)); return;
    case ElemType::kInt32: FillTyped<int32_t>(y, count, FloatToInt<int32_t>(value)); return;
    case ElemType::kBool: FillTyped<uint8_t>(y, count, value != 0.0 ? 1 : 0); return;
    case ElemType::kUint8: FillTyped<uint8_t>(y, count, FloatToInt<uint8_t>(value)); return;
    case ElemType::kInt8: FillTyped<int8_t>(y, count, FloatToInt<int8_t>(value)); return;
  }
}

// ---------------------------------------------------------------------------------------------
// Gather

bool RunGather(const TensorOpContext& ctx, const void* data, const void* indices, bool indices_int64, void* y,
               size_t outer, size_t axis_len, size_t inner, size_t n_indices, size_t elem_bytes, std::string* error) {
  const int64_t len = static_cast<int64_t>(axis_len);
  // Every index is checked before any is used, so a bad one cannot read out of bounds.
  std::vector<size_t> rows(n_indices);
  for (size_t i = 0; i < n_indices; ++i) {
    const int64_t v = indices_int64 ? static_cast<const int64_t*>(indices)[i]
                                    : static_cast<const int32_t*>(indices)[i];
    if (v < -len || v >= len) {
      if (error)
        *error = "index " + std::to_string(v) + " is out of range [" + std::to_string(-len) + ", " +
                 std::to_string(len) + ")";
      return false;
    }
    rows[i] = static_cast<size_t>(v < 0 ? v + len : v);
  }
  const size_t row_bytes = inner * elem_bytes;
  const char* d = static_cast<const char*>(data);
  char* yc = static_cast<char*>(y);
  return ForRanges(ctx, outer * n_indices, inner, [&](size_t b, size_t e) {
    for (size_t t = b; t < e; ++t) {
      const size_t o = t / n_indices, i = t % n_indices;
      std::memcpy(yc + t * row_bytes, d + (o * axis_len + rows[i]) * row_bytes, row_bytes);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Reduce

namespace {

template <ReduceKind K, typename T>
inline T ReduceStep(T acc, T v) {
  if constexpr (K == ReduceKind::kSum || K == ReduceKind::kMean) {
    if constexpr (std::is_integral<T>::value)
      return static_cast<T>(static_cast<uint64_t>(acc) + static_cast<uint64_t>(v));
    else
      return acc + v;
  } else if constexpr (K == ReduceKind::kMax) {
    // NaN propagates (as NumPy's max): once acc is NaN it stays, and a NaN v replaces acc.
    if constexpr (std::is_floating_point<T>::value) return (v > acc || v != v) ? v : acc;
    else return v > acc ? v : acc;
  } else {
    if constexpr (std::is_floating_point<T>::value) return (v < acc || v != v) ? v : acc;
    else return v < acc ? v : acc;
  }
}

template <ReduceKind K, typename T>
constexpr T ReduceInit() {
  if constexpr (K == ReduceKind::kMax)
    return std::is_floating_point<T>::value ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::lowest();
  if constexpr (K == ReduceKind::kMin)
    return std::is_floating_point<T>::value ? std::numeric_limits<T>::infinity() : std::numeric_limits<T>::max();
  return T(0);
}

// One contiguous row of r (inner == 1): eight independent accumulators so the adds pipeline (and
// vectorise) without reassociating a single chain.
template <ReduceKind K, typename T>
T ReduceRow(const T* x, size_t r) {
  T acc[8];
  for (auto& a : acc) a = ReduceInit<K, T>();
  size_t i = 0;
  for (; i + 8 <= r; i += 8)
    for (size_t l = 0; l < 8; ++l) acc[l] = ReduceStep<K, T>(acc[l], x[i + l]);
  for (; i < r; ++i) acc[0] = ReduceStep<K, T>(acc[0], x[i]);
  T v = acc[0];
  for (size_t l = 1; l < 8; ++l) v = ReduceStep<K, T>(v, acc[l]);
  return v;
}

template <ReduceKind K, typename T>
bool ReduceTyped(const TensorOpContext& ctx, const T* x, T* y, size_t outer, size_t r, size_t inner) {
  if (outer == 0 || inner == 0) return true;
  auto finish = [&](T v) -> T {
    if constexpr (K == ReduceKind::kMean) {
      if constexpr (std::is_floating_point<T>::value) return v / static_cast<T>(r);
      else return r ? static_cast<T>(v / static_cast<T>(r)) : T(0);
    }
    return v;
  };
  if (inner == 1) {
    if constexpr (std::is_same<T, float>::value && K != ReduceKind::kMin) {
      const kernels::ReduceUkernels& uk = ReduceTable();
      auto row = K == ReduceKind::kMax ? uk.max_f32 : uk.sum_f32;
      return ForRanges(ctx, outer, r, [&](size_t b, size_t e) {
        for (size_t o = b; o < e; ++o) y[o] = finish(row(r, x + o * r));
      });
    }
    return ForRanges(ctx, outer, r, [&](size_t b, size_t e) {
      for (size_t o = b; o < e; ++o) y[o] = finish(ReduceRow<K, T>(x + o * r, r));
    });
  }
  // Down columns: accumulate whole rows of `inner` into y, contiguous and vectorisable. Tasks are
  // (outer, inner block) pairs so a single outer with wide inner still splits.
  constexpr size_t kBlock = 1024;
  const size_t blocks = (inner + kBlock - 1) / kBlock;
  return ForRanges(ctx, outer * blocks, r * std::min(inner, kBlock), [&](size_t b, size_t e) {
    for (size_t t = b; t < e; ++t) {
      const size_t o = t / blocks, j0 = (t % blocks) * kBlock, n = std::min(kBlock, inner - j0);
      T* yo = y + o * inner + j0;
      const T* xo = x + o * r * inner + j0;
      for (size_t j = 0; j < n; ++j) yo[j] = ReduceInit<K, T>();
      for (size_t i = 0; i < r; ++i) {
        const T* row = xo + i * inner;
        for (size_t j = 0; j < n; ++j) yo[j] = ReduceStep<K, T>(yo[j], row[j]);
      }
      for (size_t j = 0; j < n; ++j) yo[j] = finish(yo[j]);
    }
  });
}

template <typename T>
bool ReduceDispatch(const TensorOpContext& ctx, ReduceKind kind, const void* x, void* y, size_t outer, size_t r,
                    size_t inner) {
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  switch (kind) {
    case ReduceKind::kSum: return ReduceTyped<ReduceKind::kSum, T>(ctx, xt, yt, outer, r, inner);
    case ReduceKind::kMean: return ReduceTyped<ReduceKind::kMean, T>(ctx, xt, yt, outer, r, inner);
    case ReduceKind::kMax: return ReduceTyped<ReduceKind::kMax, T>(ctx, xt, yt, outer, r, inner);
    case ReduceKind::kMin: return ReduceTyped<ReduceKind::kMin, T>(ctx, xt, yt, outer, r, inner);
  }
  return true;
}

}  // namespace

bool RunReduce(const TensorOpContext& ctx, ReduceKind kind, ElemType t, const void* x, void* y, size_t outer, size_t r,
               size_t inner) {
  switch (t) {
    case ElemType::kInt64: return ReduceDispatch<int64_t>(ctx, kind, x, y, outer, r, inner);
    case ElemType::kInt32: return ReduceDispatch<int32_t>(ctx, kind, x, y, outer, r, inner);
    default: return ReduceDispatch<float>(ctx, kind, x, y, outer, r, inner);
  }
}

// ---------------------------------------------------------------------------------------------
// Channel affine

bool RunChannelAffine(const TensorOpContext& ctx, const float* x, const float* scale, const float* shift, float* y,
                      size_t outer, size_t channels, size_t inner) {
  if (inner == 0) return true;
  return ForRanges(ctx, outer * channels, inner, [&](size_t b, size_t e) {
    for (size_t t = b; t < e; ++t) {
      const float s = scale[t % channels], h = shift[t % channels];
      const float* xp = x + t * inner;
      float* yp = y + t * inner;
      for (size_t j = 0; j < inner; ++j) yp[j] = xp[j] * s + h;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Cast

namespace {

template <typename To>
To CastFromFloat(float v) {
  if constexpr (std::is_same<To, float>::value) {
    return v;
  } else if constexpr (std::is_same<To, int8_t>::value || std::is_same<To, uint8_t>::value) {
    // Narrow integers: truncate to int32 (as a hardware float->int conversion does), then keep the
    // low bits, so -1.5 -> 255 as uint8, the value onnxruntime gives on x86.
    return static_cast<To>(static_cast<uint32_t>(FloatToInt<int32_t>(v)));
  } else {
    return FloatToInt<To>(v);
  }
}

template <typename From, typename To>
void CastLoop(const From* x, To* y, size_t n, bool to_bool) {
  if (to_bool) {
    for (size_t i = 0; i < n; ++i) y[i] = static_cast<To>(x[i] != From(0) ? 1 : 0);  // NaN != 0: true
    return;
  }
  if constexpr (std::is_same<From, float>::value) {
    for (size_t i = 0; i < n; ++i) y[i] = CastFromFloat<To>(x[i]);
  } else if constexpr (std::is_same<To, float>::value) {
    for (size_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
  } else {
    // Integer to integer: two's complement wrap, as C and onnxruntime convert.
    using U = std::make_unsigned_t<To>;
    for (size_t i = 0; i < n; ++i) y[i] = static_cast<To>(static_cast<U>(x[i]));
  }
}

template <typename From>
bool CastFrom(const TensorOpContext& ctx, const From* x, ElemType to, void* y, size_t count) {
  const bool to_bool = to == ElemType::kBool;
  auto run = [&](auto* yt) {
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) { CastLoop(x + b, yt + b, e - b, to_bool); });
  };
  switch (to) {
    case ElemType::kFloat32: return run(static_cast<float*>(y));
    case ElemType::kInt64: return run(static_cast<int64_t*>(y));
    case ElemType::kInt32: return run(static_cast<int32_t*>(y));
    case ElemType::kBool:
    case ElemType::kUint8: return run(static_cast<uint8_t*>(y));
    case ElemType::kInt8: return run(static_cast<int8_t*>(y));
  }
  return true;
}

}  // namespace

bool RunCastOp(const TensorOpContext& ctx, ElemType from, const void* x, ElemType to, void* y, size_t count) {
  if (count == 0) return true;
  if (from == to || (from == ElemType::kBool && to == ElemType::kUint8)) {
    const size_t bytes = ElemBytes(from);
    return ForRanges(ctx, count, 1, [&](size_t b, size_t e) {
      std::memcpy(static_cast<char*>(y) + b * bytes, static_cast<const char*>(x) + b * bytes, (e - b) * bytes);
    });
  }
  switch (from) {
    case ElemType::kFloat32: return CastFrom(ctx, static_cast<const float*>(x), to, y, count);
    case ElemType::kInt64: return CastFrom(ctx, static_cast<const int64_t*>(x), to, y, count);
    case ElemType::kInt32: return CastFrom(ctx, static_cast<const int32_t*>(x), to, y, count);
    case ElemType::kBool:
    case ElemType::kUint8: return CastFrom(ctx, static_cast<const uint8_t*>(x), to, y, count);
    case ElemType::kInt8: return CastFrom(ctx, static_cast<const int8_t*>(x), to, y, count);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Pad

namespace {

// Source index along one axis for output position o (src = o - begin before mapping), or -1 where
// the output takes the constant value. Reflect and edge map off the original edges; createPlan keeps
// every pad smaller than the axis left after cropping, so that is the same as ONNX's crop-then-pad.
inline ptrdiff_t PadSource(ptrdiff_t src, ptrdiff_t len, PadMode mode) {
  if (src >= 0 && src < len) return src;
  if (mode == PadMode::kConstant || len == 0) return -1;
  if (mode == PadMode::kEdge) return src < 0 ? 0 : len - 1;
  // reflect (NumPy 'reflect': the edge element is not repeated), period 2 (len - 1).
  if (len == 1) return 0;
  const ptrdiff_t period = 2 * (len - 1);
  ptrdiff_t m = src % period;
  if (m < 0) m += period;
  return m < len ? m : period - m;
}

}  // namespace

bool RunPad(const TensorOpContext& ctx, ElemType t, const void* x, const size_t* in_dims, size_t rank,
            const ptrdiff_t* begin, const ptrdiff_t* end, PadMode mode, double value, void* y) {
  const size_t eb = ElemBytes(t);
  size_t out_dims[kMaxRank];
  ptrdiff_t in_strides[kMaxRank];
  ptrdiff_t s = 1;
  for (size_t d = rank; d-- > 0;) {
    const ptrdiff_t od = static_cast<ptrdiff_t>(in_dims[d]) + begin[d] + end[d];
    out_dims[d] = od > 0 ? static_cast<size_t>(od) : 0;
    in_strides[d] = s;
    s *= static_cast<ptrdiff_t>(in_dims[d]);
  }
  const size_t total = Product(out_dims, rank);
  if (total == 0) return true;
  // The constant, encoded once in the element type.
  alignas(8) unsigned char fill_value[8];
  RunFill(t, fill_value, 1, value);
  if (rank == 0) {
    std::memcpy(y, x, eb);
    return true;
  }
  const size_t inner_out = out_dims[rank - 1];
  const ptrdiff_t inner_in = static_cast<ptrdiff_t>(in_dims[rank - 1]);
  const size_t rows = total / inner_out;
  const char* xc = static_cast<const char*>(x);
  char* yc = static_cast<char*>(y);
  // The innermost axis's map is the same for every row: output positions [lo, hi) copy one
  // contiguous source run; the positions outside it are mapped one by one.
  const ptrdiff_t b_last = begin[rank - 1];
  const ptrdiff_t lo = std::min<ptrdiff_t>(static_cast<ptrdiff_t>(inner_out), std::max<ptrdiff_t>(0, b_last));
  const ptrdiff_t hi = std::max<ptrdiff_t>(lo, std::min<ptrdiff_t>(static_cast<ptrdiff_t>(inner_out), b_last + inner_in));
  std::vector<ptrdiff_t> edge_src;
  edge_src.reserve(static_cast<size_t>(lo) + inner_out - static_cast<size_t>(hi));
  for (ptrdiff_t o = 0; o < lo; ++o) edge_src.push_back(PadSource(o - b_last, inner_in, mode));
  for (ptrdiff_t o = hi; o < static_cast<ptrdiff_t>(inner_out); ++o) edge_src.push_back(PadSource(o - b_last, inner_in, mode));
  return ForRanges(ctx, rows, inner_out, [&](size_t r0, size_t r1) {
    for (size_t row = r0; row < r1; ++row) {
      char* yrow = yc + row * inner_out * eb;
      // Source row offset, or a constant row when any outer axis falls in a constant pad.
      ptrdiff_t src_off = 0;
      bool constant_row = false;
      size_t rem = row;
      for (size_t d = rank - 1; d-- > 0;) {
        const ptrdiff_t o = static_cast<ptrdiff_t>(rem % out_dims[d]);
        rem /= out_dims[d];
        const ptrdiff_t si = PadSource(o - begin[d], static_cast<ptrdiff_t>(in_dims[d]), mode);
        if (si < 0) {
          constant_row = true;
          break;
        }
        src_off += si * in_strides[d];
      }
      if (constant_row || (inner_in == 0)) {
        for (size_t j = 0; j < inner_out; ++j) std::memcpy(yrow + j * eb, fill_value, eb);
        continue;
      }
      const char* xrow = xc + src_off * static_cast<ptrdiff_t>(eb);
      if (hi > lo) std::memcpy(yrow + lo * eb, xrow + (lo - b_last) * static_cast<ptrdiff_t>(eb), (hi - lo) * eb);
      size_t k = 0;
      auto put = [&](ptrdiff_t o) {
        const ptrdiff_t si = edge_src[k++];
        std::memcpy(yrow + o * eb, si < 0 ? reinterpret_cast<const char*>(fill_value) : xrow + si * static_cast<ptrdiff_t>(eb), eb);
      };
      for (ptrdiff_t o = 0; o < lo; ++o) put(o);
      for (ptrdiff_t o = hi; o < static_cast<ptrdiff_t>(inner_out); ++o) put(o);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Batched MatMul

namespace {

struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(size_t n) {
    const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// Packed copies of B a batched MatMul holds at once (16 MiB): beyond it, batches go in groups.
constexpr size_t kMaxPackFloats = size_t{4} << 20;

// Up to this many rows a batched MatMul skips packing B (see RunBatchedMatMul). Measured at
// 12 x m x 256 x 256, one AVX-512 thread, direct vs packed: B row-major m = 1: ~70 vs ~140 us,
// m = 2: 190 vs 148 us; trans_b m = 2: 108 vs 135 us, m = 3: 198 vs 143 us.
constexpr size_t kDirectMatMulRows = 1;
constexpr size_t kDirectMatMulRowsTransB = 2;

// Packs columns [n0, n0 + cols) of b (k x n row-major, or n x k when trans_b) into one GEMM panel
// of width nr (ops/gemm.h's layout: row kk of the panel holds the panel's nr columns, zero-padded).
void PackPanel(const float* b, size_t k, size_t n, bool trans_b, size_t n0, size_t cols, size_t nr, float* dst) {
  if (!trans_b) {
    for (size_t kk = 0; kk < k; ++kk) {
      std::memcpy(dst + kk * nr, b + kk * n + n0, cols * sizeof(float));
      std::memset(dst + kk * nr + cols, 0, (nr - cols) * sizeof(float));
    }
    return;
  }
  // b[i] is [n][k]: each panel column is a contiguous row of b; write it down the panel.
  if (cols < nr)
    for (size_t kk = 0; kk < k; ++kk) std::memset(dst + kk * nr + cols, 0, (nr - cols) * sizeof(float));
  TransposeKernel()(cols, k, reinterpret_cast<const uint32_t*>(b + n0 * k), static_cast<ptrdiff_t>(k),
                    reinterpret_cast<uint32_t*>(dst), static_cast<ptrdiff_t>(nr));
}

}  // namespace

bool RunBatchedMatMul(const TensorOpContext& ctx, const float* a, const ptrdiff_t* a_batch_strides, const float* b,
                      const ptrdiff_t* b_batch_strides, float* c, const size_t* batch_dims, size_t batch_rank, size_t m,
                      size_t k, size_t n, bool trans_b) {
  const size_t batches = Product(batch_dims, batch_rank);
  if (batches == 0 || m == 0 || n == 0) return true;
  if (k == 0) {
    std::memset(c, 0, batches * m * n * sizeof(float));
    return true;
  }
  const kernels::F32GemmUkernelInfo uk = GemmUkernel(ResolveGemmVariant(GemmVariant::kAuto));
  const size_t mr = uk.mr, nr = uk.nr;
  const size_t panels = (n + nr - 1) / nr;
  const size_t panel_floats = k * nr;

  // b is packed once per distinct b[i]: batch dims where b's stride is 0 share a packed copy.
  size_t b_count = 1;
  for (size_t d = 0; d < batch_rank; ++d)
    if (b_batch_strides[d] != 0) b_count *= batch_dims[d];
  auto a_offset = [&](size_t i) {
    ptrdiff_t off = 0;
    for (size_t d = batch_rank; d-- > 0;) {
      off += static_cast<ptrdiff_t>(i % batch_dims[d]) * a_batch_strides[d];
      i /= batch_dims[d];
    }
    return off;
  };
  // (offset of b[i], index of its packed copy)
  auto b_index = [&](size_t i, ptrdiff_t* off) {
    ptrdiff_t o = 0;
    size_t packed = 0, scale = 1;
    for (size_t d = batch_rank; d-- > 0;) {
      const size_t idx = i % batch_dims[d];
      i /= batch_dims[d];
      if (b_batch_strides[d] != 0) {
        o += static_cast<ptrdiff_t>(idx) * b_batch_strides[d];
        packed += idx * scale;
        scale *= batch_dims[d];
      }
    }
    *off = o;
    return packed;
  };
  // A few rows: packing B (k x n copies) costs as much as the product itself, so each output row is
  // built straight from B, as axpys over B's rows, or dot products with them when trans_b.
  if (m <= (trans_b ? kDirectMatMulRowsTransB : kDirectMatMulRows)) {
    const kernels::ReduceUkernels& red = ReduceTable();
    constexpr size_t kCols = 256;
    const size_t col_blocks = (n + kCols - 1) / kCols;
    return ForRanges(ctx, batches * col_blocks, m * k * std::min(n, kCols), [&](size_t t0, size_t t1) {
      for (size_t t = t0; t < t1; ++t) {
        const size_t i = t / col_blocks, j0 = (t % col_blocks) * kCols, cols = std::min(kCols, n - j0);
        ptrdiff_t boff;
        b_index(i, &boff);
        const float* ai = a + a_offset(i);
        const float* bi = b + boff;
        for (size_t r = 0; r < m; ++r) {
          float* crow = c + (i * m + r) * n + j0;
          const float* arow = ai + r * k;
          if (trans_b) {
            for (size_t j = 0; j < cols; ++j) crow[j] = red.dot_f32(k, arow, bi + (j0 + j) * k);
          } else {
            std::memset(crow, 0, cols * sizeof(float));
            for (size_t p = 0; p < k; ++p) red.axpy_f32(cols, arow[p], bi + p * n + j0, crow);
          }
        }
      }
    });
  }

  // Tasks: (batch, row block, panel block). Row blocks of ~64 rows keep a W panel in cache across
  // the row tiles that reuse it.
  const size_t m_tiles = (m + mr - 1) / mr;
  const size_t mb = std::max<size_t>(1, std::min(m_tiles, 64 / mr));
  const size_t m_blocks = (m_tiles + mb - 1) / mb;
  const size_t nb = std::max<size_t>(1, std::min(panels, size_t{4}));
  const size_t n_blocks = (panels + nb - 1) / nb;
  const size_t per_task_flops = mb * mr * nb * nr * k;
  const size_t per_b_floats = panels * panel_floats;

  // Packs slot s from b + slot_offset(s) for s < slots, then multiplies batches [i0, i1), batch i
  // against slot slot_of(i).
  auto run = [&](float* packed, size_t slots, auto&& slot_offset, size_t i0, size_t i1, auto&& slot_of) {
    const bool pack_ok = ForRanges(ctx, slots * panels, panel_floats, [&](size_t t0, size_t t1) {
      for (size_t t = t0; t < t1; ++t) {
        const size_t si = t / panels, p = t % panels;
        const size_t n0 = p * nr;
        PackPanel(b + slot_offset(si), k, n, trans_b, n0, std::min(nr, n - n0), nr, packed + si * per_b_floats + p * panel_floats);
      }
    });
    if (!pack_ok) return false;
    return ForRanges(ctx, (i1 - i0) * m_blocks * n_blocks, per_task_flops / 16, [&](size_t t0, size_t t1) {
      for (size_t t = t0; t < t1; ++t) {
        const size_t i = i0 + t / (m_blocks * n_blocks);
        const size_t rest = t % (m_blocks * n_blocks);
        const size_t mbi = rest / n_blocks, nbi = rest % n_blocks;
        const float* ai = a + a_offset(i);
        const float* wb = packed + slot_of(i) * per_b_floats;
        float* ci = c + i * m * n;
        const size_t tile0 = mbi * mb, tile1 = std::min(m_tiles, tile0 + mb);
        const size_t p0 = nbi * nb, p1 = std::min(panels, p0 + nb);
        for (size_t p = p0; p < p1; ++p) {
          const size_t n0 = p * nr;
          const float* wp = wb + p * panel_floats;
          for (size_t ti = tile0; ti < tile1; ++ti) {
            const size_t m0 = ti * mr;
            uk.fn(std::min(mr, m - m0), std::min(nr, n - n0), k, ai + m0 * k, k, wp, ci + m0 * n + n0, n, false,
                  nullptr);
          }
        }
      }
    });
  };

  if (b_count * per_b_floats <= std::max(per_b_floats, kMaxPackFloats)) {
    // Every distinct b[i] packed once, then all batches at once.
    std::vector<ptrdiff_t> b_offsets(b_count, 0);
    for (size_t i = 0; i < batches; ++i) {
      ptrdiff_t off;
      const size_t slot = b_index(i, &off);  // before reading off: `x[f()] = off` reads off first
      b_offsets[slot] = off;
    }
    AlignedFloats packed(b_count * per_b_floats);
    return run(packed.p, b_count, [&](size_t s) { return b_offsets[s]; }, 0, batches, [&](size_t i) {
      ptrdiff_t off;
      return b_index(i, &off);
    });
  }
  // Too many to hold packed at once: groups of batches, each packing its own b[i] (a b shared by
  // several groups is packed again: k x n copies against m x k x n multiply-adds).
  const size_t group = std::max<size_t>(1, kMaxPackFloats / per_b_floats);
  AlignedFloats packed(group * per_b_floats);
  for (size_t i0 = 0; i0 < batches; i0 += group) {
    const size_t i1 = std::min(batches, i0 + group);
    auto offset_of_slot = [&](size_t s) {
      ptrdiff_t off;
      b_index(i0 + s, &off);
      return off;
    };
    if (!run(packed.p, i1 - i0, offset_of_slot, i0, i1, [&](size_t i) { return i - i0; })) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Log-softmax

bool RunLogSoftmax(const TensorOpContext& ctx, const float* x, float* y, size_t outer, size_t axis, size_t inner) {
  if (outer == 0 || axis == 0 || inner == 0) return true;
  const kernels::ElementwiseUkernels uk = ElementwiseTable(ElementwiseVariant::kAuto);
  const kernels::ReduceUkernels& red = ReduceTable();
  // exp of a chunk at a time into a stack buffer, through the SIMD exp kernel.
  constexpr size_t kChunk = 256;
  if (inner == 1) {
    return ForRanges(ctx, outer, axis, [&](size_t b, size_t e) {
      float tmp[kChunk];
      for (size_t o = b; o < e; ++o) {
        const float* xr = x + o * axis;
        float* yr = y + o * axis;
        const float mx = red.max_f32(axis, xr);
        double sum = 0.0;
        for (size_t i0 = 0; i0 < axis; i0 += kChunk) {
          const size_t len = std::min(kChunk, axis - i0);
          for (size_t i = 0; i < len; ++i) tmp[i] = xr[i0 + i] - mx;
          uk.unary(kernels::kUnaryExp, len, tmp, tmp);
          sum += red.sum_f32(len, tmp);
        }
        // (x - max) - lse, not x - (max + lse): with a huge max the sum would swallow lse.
        const float lse = static_cast<float>(std::log(sum));
        for (size_t i = 0; i < axis; ++i) yr[i] = (xr[i] - mx) - lse;
      }
    });
  }
  // Down columns, a block of inner positions at a time.
  const size_t blocks = (inner + kChunk - 1) / kChunk;
  return ForRanges(ctx, outer * blocks, axis * std::min(inner, kChunk), [&](size_t b, size_t e) {
    float mx[kChunk], sum[kChunk], tmp[kChunk];  // sum becomes log sum exp once summed
    for (size_t t = b; t < e; ++t) {
      const size_t o = t / blocks, j0 = (t % blocks) * kChunk, n = std::min(kChunk, inner - j0);
      const float* xo = x + o * axis * inner + j0;
      float* yo = y + o * axis * inner + j0;
      for (size_t j = 0; j < n; ++j) mx[j] = -std::numeric_limits<float>::infinity();
      for (size_t i = 0; i < axis; ++i)
        for (size_t j = 0; j < n; ++j) mx[j] = xo[i * inner + j] > mx[j] ? xo[i * inner + j] : mx[j];
      for (size_t j = 0; j < n; ++j) sum[j] = 0.0f;
      for (size_t i = 0; i < axis; ++i) {
        for (size_t j = 0; j < n; ++j) tmp[j] = xo[i * inner + j] - mx[j];
        uk.unary(kernels::kUnaryExp, n, tmp, tmp);
        for (size_t j = 0; j < n; ++j) sum[j] += tmp[j];
      }
      for (size_t j = 0; j < n; ++j) sum[j] = std::log(sum[j]);
      for (size_t i = 0; i < axis; ++i)
        for (size_t j = 0; j < n; ++j) yo[i * inner + j] = (xo[i * inner + j] - mx[j]) - sum[j];
    }
  });
}

// ---------------------------------------------------------------------------------------------
// ArgMax

namespace {
// Whether v replaces best: NaN is the largest value; among equals (NaN among NaN too) the first
// wins, or the last when select_last.
inline bool ArgMaxTakes(float v, float best, bool select_last) {
  const bool v_nan = v != v, best_nan = best != best;
  if (best_nan) return select_last && v_nan;
  if (v_nan) return true;
  return select_last ? v >= best : v > best;
}
}  // namespace

bool RunArgMaxOp(const TensorOpContext& ctx, const float* x, int64_t* y, size_t outer, size_t r, size_t inner,
                 bool select_last) {
  if (outer == 0 || inner == 0) return true;
  if (r == 0) {
    std::fill(y, y + outer * inner, int64_t{0});
    return true;
  }
  if (inner == 1) {
    // Two passes over a row that stays in cache: the max (branch-free, vectorisable, NaN noted
    // apart), then the first or last position holding it. The one-pass compare-and-branch loop
    // mispredicts on every new maximum.
    const kernels::ReduceUkernels& red = ReduceTable();
    return ForRanges(ctx, outer, r, [&](size_t b, size_t e) {
      for (size_t o = b; o < e; ++o) {
        const float* xr = x + o * r;
        const float best = red.max_f32(r, xr);
        const bool nan = best != best;
        auto hit = [&](float v) { return nan ? v != v : v == best; };
        int64_t found = 0;
        if (select_last) {
          for (size_t j = r; j-- > 0;)
            if (hit(xr[j])) {
              found = static_cast<int64_t>(j);
              break;
            }
        } else {
          for (size_t j = 0; j < r; ++j)
            if (hit(xr[j])) {
              found = static_cast<int64_t>(j);
              break;
            }
        }
        y[o] = found;
      }
    });
  }
  constexpr size_t kBlock = 256;
  const size_t blocks = (inner + kBlock - 1) / kBlock;
  return ForRanges(ctx, outer * blocks, r * std::min(inner, kBlock), [&](size_t b, size_t e) {
    float best[kBlock];
    for (size_t t = b; t < e; ++t) {
      const size_t o = t / blocks, j0 = (t % blocks) * kBlock, n = std::min(kBlock, inner - j0);
      const float* xo = x + o * r * inner + j0;
      int64_t* yo = y + o * inner + j0;
      for (size_t j = 0; j < n; ++j) {
        best[j] = xo[j];
        yo[j] = 0;
      }
      for (size_t i = 1; i < r; ++i)
        for (size_t j = 0; j < n; ++j)
          if (ArgMaxTakes(xo[i * inner + j], best[j], select_last)) {
            best[j] = xo[i * inner + j];
            yo[j] = static_cast<int64_t>(i);
          }
    }
  });
}

}  // namespace sonde
