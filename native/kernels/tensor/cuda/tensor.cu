// Generic tensor ops on the GPU: the plan step kinds of lib/session/plan.ts that no kernel family
// covers (strided copy, unary, broadcasting binary, where, fill, cast, gather, pad, reduce, argmax,
// topk, softmax along an axis, layer norm with optional affine, channel affine, batched matmul), so
// that a whole ONNX session runs on the device (runtime/gpu_plan.h). Semantics follow the CPU ops
// (ops/tensor_ops.cc) so that a GPU session's outputs equal a CPU session's.
//
// Operands that are walked through strides are passed as whole buffers plus an element offset
// ("xOff"), so that the op can check a walk with negative strides (Slice with a negative step)
// against the buffer's bounds; every other operand starts at its buffer's first byte.
// Failures the data decides (integer division by zero, a Gather index out of range) are written to
// an error record (buffer "error": 3 x uint64, zero before the run) by the first thread that finds
// one, as [code, kind, value]; the executor reads it once after the run and names the step.
#include <cmath>
#include <type_traits>

#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

constexpr int kMaxRank = 8;
constexpr unsigned kThreads = 256;

// Element types, as ElemType of ops/tensor_ops.h.
enum : int { kF32 = 0, kI64 = 1, kI32 = 2, kBool = 3, kU8 = 4, kI8 = 5 };
// As UnaryKind / BinaryKind / ReduceKind / PadMode of ops/tensor_ops.h.
enum : int {
  kRelu, kLeakyRelu, kClip, kSigmoid, kTanh, kHardSigmoid, kHardSwish, kErf, kGelu, kGeluTanh, kSilu,
  kExp, kLog, kSqrt, kNeg, kAbs, kReciprocal, kNot, kIdentity, kUnaryCount
};
enum : int { kAdd, kSub, kMul, kDiv, kPow, kEqual, kLess, kGreater, kAnd, kOr, kBinaryCount };
enum : int { kSum, kMean, kMax, kMin };
enum : int { kPadConstant, kPadReflect, kPadEdge };
// Error record kinds (the executor turns them into the CPU's messages).
enum : int { kErrDivZero = 1, kErrPowZeroNeg = 2, kErrIndex = 3 };

// Up to 4 operands walked over the same dims (row-major linear index -> element offsets).
struct Walk {
  int rank;
  int64_t dims[kMaxRank];
  int64_t strides[4][kMaxRank];
};

// I: the index type of the division chain; 32-bit whenever the walk has fewer than 2^32 elements,
// because a 64-bit integer division is a long instruction sequence on a GPU.
template <typename I>
__device__ __forceinline__ void Offsets(const Walk& w, int operands, I i, int64_t* off) {
  for (int o = 0; o < operands; ++o) off[o] = 0;
  for (int d = w.rank - 1; d >= 0; --d) {
    const I len = static_cast<I>(w.dims[d]);
    const int64_t j = static_cast<int64_t>(i % len);
    i /= len;
    for (int o = 0; o < operands; ++o) off[o] += j * w.strides[o][d];
  }
}

__device__ __forceinline__ void Report(unsigned long long* err, unsigned long long code, int kind, long long value) {
  if (atomicCAS(err, 0ull, code) == 0ull) {
    err[1] = static_cast<unsigned long long>(kind);
    err[2] = static_cast<unsigned long long>(value);
  }
}

// Grid for a grid-stride loop: enough blocks to fill the device, no more than the work needs.
dim3 StrideGrid(const GpuDeviceInfo& d, size_t count, unsigned threads = kThreads) {
  const size_t want = (count + threads - 1) / threads, cap = size_t(d.multiprocessors > 0 ? d.multiprocessors : 1) * 16;
  return dim3(static_cast<unsigned>(want < cap ? (want ? want : 1) : cap));
}

size_t ElemBytes(int t) { return t == kF32 || t == kI32 ? 4 : t == kI64 ? 8 : 1; }

constexpr int64_t kMaxIndex = INT64_C(1) << 50;

// Reads dims "d0".. (rank "rank") into w.
void ReadDims(const GpuOpCall& c, Walk* w) {
  w->rank = static_cast<int>(c.Int("rank", 0, kMaxRank));
  static const char* names[kMaxRank] = {"d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"};
  for (int i = 0; i < w->rank; ++i) w->dims[i] = c.Int(names[i], 0, kMaxIndex);
}

// Reads operand o's strides "<p>0".. into w and returns its base pointer, offset by "<p>Off"
// elements, after checking that the walk stays inside buffer `buf`.
char* ReadOperand(const GpuOpCall& c, Walk* w, int o, const char* p, size_t buf, size_t elem, const char* what) {
  const std::string prefix(p);
  int64_t lo = c.IntOr((prefix + "Off").c_str(), 0, 0, kMaxIndex), hi = lo;
  bool empty = false;
  for (int i = 0; i < w->rank; ++i) {
    const int64_t s = c.Int((prefix + std::to_string(i)).c_str(), -kMaxIndex, kMaxIndex);
    w->strides[o][i] = s;
    if (w->dims[i] == 0) empty = true;
    const int64_t span = (w->dims[i] > 0 ? w->dims[i] - 1 : 0) * s;
    (span < 0 ? lo : hi) += span;
  }
  const int64_t off = c.IntOr((prefix + "Off").c_str(), 0, 0, kMaxIndex);
  if (empty) return static_cast<char*>(c.Buffer<char>(buf, 0, what));
  if (lo < 0) c.Invalid(std::string(what) + " walks before its buffer's start");
  char* base = c.Buffer<char>(buf, c.Count({hi + 1, static_cast<int64_t>(elem)}), what);
  return base + off * static_cast<int64_t>(elem);
}

size_t WalkCount(const Walk& w) {
  size_t n = 1;
  for (int i = 0; i < w.rank; ++i) n *= static_cast<size_t>(w.dims[i]);
  return n;
}

// ------------------------------------------------------------------------------------ copy ----

template <typename T, typename I>
__global__ void CopyKernel(const T* __restrict__ x, T* __restrict__ y, Walk w, I count) {
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += I(gridDim.x) * blockDim.x) {
    int64_t off[2];
    Offsets<I>(w, 2, i, off);
    y[off[1]] = x[off[0]];
  }
}

// buffers: x, y. params: rank, d*, x* / y* strides, xOff, yOff, elemBytes.
void CopyOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  Walk w{};
  ReadDims(c, &w);
  const int eb = static_cast<int>(c.Int("elemBytes", 1, 8));
  if (eb != 1 && eb != 2 && eb != 4 && eb != 8) c.Invalid("elemBytes must be 1, 2, 4 or 8");
  const char* x = ReadOperand(c, &w, 0, "x", 0, eb, "x");
  char* y = ReadOperand(c, &w, 1, "y", 1, eb, "y");
  const size_t count = WalkCount(w);
  if (!count) return;
  const dim3 grid = StrideGrid(d, count);
  auto run = [&](auto elem, auto index) {
    using T = decltype(elem);
    using I = decltype(index);
    Launch(CopyKernel<T, I>, grid, dim3(kThreads), 0, s, reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), w, static_cast<I>(count));
  };
  auto by_index = [&](auto elem) {
    if (count <= UINT32_MAX - kThreads * grid.x) run(elem, uint32_t{});
    else run(elem, uint64_t{});
  };
  switch (eb) {
    case 1: by_index(uint8_t{}); break;
    case 2: by_index(uint16_t{}); break;
    case 4: by_index(uint32_t{}); break;
    default: by_index(uint64_t{}); break;
  }
}

// ----------------------------------------------------------------------------------- unary ----

__device__ __forceinline__ float UnaryF(int kind, float v, float alpha, float beta) {
  switch (kind) {
    case kRelu: return v < 0.0f ? 0.0f : v;
    case kLeakyRelu: return v < 0.0f ? alpha * v : v;
    case kClip: return v < alpha ? alpha : (v > beta ? beta : v);
    case kSigmoid: return 1.0f / (1.0f + expf(-v));
    case kTanh: return tanhf(v);
    case kHardSigmoid: {
      const float t = alpha * v + beta;
      return t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
    }
    case kHardSwish: {
      const float t = v * (1.0f / 6.0f) + 0.5f;
      return v * (t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t));
    }
    case kErf: return erff(v);
    case kGelu: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case kGeluTanh: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case kSilu: return v / (1.0f + expf(-v));
    case kExp: return expf(v);
    case kLog: return logf(v);
    case kSqrt: return sqrtf(v);
    case kNeg: return -v;
    case kAbs: return fabsf(v);
    case kReciprocal: return 1.0f / v;
    case kNot: return v == 0.0f ? 1.0f : 0.0f;
    default: return v;
  }
}

// Two's complement wrap (never signed overflow), as the CPU's integer ops.
template <typename T>
__device__ __forceinline__ T UnaryI(int kind, T v) {
  using U = typename std::make_unsigned<T>::type;
  const T neg = static_cast<T>(U(0) - static_cast<U>(v));
  if (kind == kNeg) return neg;
  if (kind == kAbs) return v < 0 ? neg : v;
  if (kind == kRelu) return v < 0 ? T(0) : v;
  return v;
}

template <typename T>
__global__ void UnaryKernel(int kind, const T* __restrict__ x, T* __restrict__ y, uint64_t count, float alpha, float beta) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same<T, float>::value) y[i] = UnaryF(kind, x[i], alpha, beta);
    else if constexpr (std::is_same<T, uint8_t>::value) y[i] = x[i] == 0 ? 1 : 0;
    else y[i] = UnaryI<T>(kind, x[i]);
  }
}

// buffers: x, y. params: kind, dtype, count, alpha, beta.
void UnaryOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, kUnaryCount - 1)), t = static_cast<int>(c.Int("dtype", 0, 5));
  const size_t count = c.Count({c.Int("count", 0, kMaxIndex)});
  const bool int_kind = kind == kNeg || kind == kAbs || kind == kRelu;
  const bool ok = kind == kNot ? t == kBool : t == kF32 || (int_kind && (t == kI64 || t == kI32));
  if (!ok) c.Invalid("this unary kind does not take this dtype");
  const float alpha = static_cast<float>(c.NumOr("alpha", 0)), beta = static_cast<float>(c.NumOr("beta", 0));
  const size_t eb = ElemBytes(t);
  void* x = c.Buffer<char>(0, count * eb, "x");
  void* y = c.Buffer<char>(1, count * eb, "y");
  if (!count) return;
  const dim3 grid = StrideGrid(d, count);
  if (t == kF32) Launch(UnaryKernel<float>, grid, dim3(kThreads), 0, s, kind, static_cast<const float*>(x), static_cast<float*>(y), count, alpha, beta);
  else if (t == kI64) Launch(UnaryKernel<int64_t>, grid, dim3(kThreads), 0, s, kind, static_cast<const int64_t*>(x), static_cast<int64_t*>(y), count, alpha, beta);
  else if (t == kI32) Launch(UnaryKernel<int32_t>, grid, dim3(kThreads), 0, s, kind, static_cast<const int32_t*>(x), static_cast<int32_t*>(y), count, alpha, beta);
  else Launch(UnaryKernel<uint8_t>, grid, dim3(kThreads), 0, s, kind, static_cast<const uint8_t*>(x), static_cast<uint8_t*>(y), count, alpha, beta);
}

// ---------------------------------------------------------------------------------- binary ----

// Integer power by squaring; a negative exponent truncates 1 / a^-b toward zero (as the CPU).
template <typename T>
__device__ __forceinline__ T IntPow(T a, T b, bool* zero_neg) {
  using U = typename std::make_unsigned<T>::type;
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

template <typename T>
__device__ __forceinline__ T Arith(int kind, T a, T b, int* fault) {
  if constexpr (std::is_same<T, float>::value) {
    switch (kind) {
      case kAdd: return a + b;
      case kSub: return a - b;
      case kMul: return a * b;
      case kDiv: return a / b;
      // x^2: the one rounding of x * x, as the CPU. Otherwise in double, rounded once: the device's
      // powf may be 4 ulp off where the CPU's is within one.
      default: return b == 2.0f ? a * a : static_cast<float>(pow(static_cast<double>(a), static_cast<double>(b)));
    }
  } else {
    using U = typename std::make_unsigned<T>::type;
    switch (kind) {
      case kAdd: return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
      case kSub: return static_cast<T>(static_cast<U>(a) - static_cast<U>(b));
      case kMul: return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
      case kDiv:
        if (b == 0) {
          *fault = kErrDivZero;
          return 0;
        }
        if (b == T(-1)) return static_cast<T>(U(0) - static_cast<U>(a));  // MIN / -1 wraps to MIN
        return static_cast<T>(a / b);
      default: {
        if constexpr (std::is_signed<T>::value) {
          bool zero_neg = false;
          const T v = IntPow<T>(a, b, &zero_neg);
          if (zero_neg) *fault = kErrPowZeroNeg;
          return v;
        } else {
          return 0;  // bool takes and / or only (checked by the op)
        }
      }
    }
  }
}

template <typename T, typename I>
__global__ void BinaryKernel(int kind, const T* __restrict__ a, const T* __restrict__ b, void* __restrict__ y, Walk w,
                             I count, unsigned long long* err, unsigned long long code) {
  const bool compare = kind >= kEqual;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += I(gridDim.x) * blockDim.x) {
    int64_t off[2];
    Offsets<I>(w, 2, i, off);
    const T av = a[off[0]], bv = b[off[1]];
    if (compare) {
      bool r;
      switch (kind) {
        case kEqual: r = av == bv; break;
        case kLess: r = av < bv; break;
        case kGreater: r = av > bv; break;
        case kAnd: r = av != T(0) && bv != T(0); break;
        default: r = av != T(0) || bv != T(0); break;
      }
      static_cast<uint8_t*>(y)[i] = r ? 1 : 0;
    } else {
      int fault = 0;
      static_cast<T*>(y)[i] = Arith<T>(kind, av, bv, &fault);
      if (fault) Report(err, code, fault, 0);
    }
  }
}

// buffers: a, b, y (contiguous over dims), error. params: kind, dtype, rank, d*, a*/b* strides,
// aOff, bOff, code (the error record's value for this step).
void BinaryOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, kBinaryCount - 1)), t = static_cast<int>(c.Int("dtype", 0, 5));
  const bool logical = kind == kAnd || kind == kOr, compare = kind >= kEqual;
  if (logical ? t != kBool : !(t == kF32 || t == kI64 || t == kI32)) c.Invalid("this binary kind does not take this dtype");
  Walk w{};
  ReadDims(c, &w);
  const size_t eb = ElemBytes(t);
  const char* a = ReadOperand(c, &w, 0, "a", 0, eb, "a");
  const char* b = ReadOperand(c, &w, 1, "b", 1, eb, "b");
  const size_t count = WalkCount(w);
  void* y = c.Buffer<char>(2, count * (compare ? 1 : eb), "y");
  auto* err = c.Buffer<unsigned long long>(3, 3, "error");
  const auto code = static_cast<unsigned long long>(c.Int("code", 1));
  if (!count) return;
  const dim3 grid = StrideGrid(d, count);
  auto run = [&](auto elem, auto index) {
    using T = decltype(elem);
    using I = decltype(index);
    Launch(BinaryKernel<T, I>, grid, dim3(kThreads), 0, s, kind, reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b), y, w,
           static_cast<I>(count), err, code);
  };
  auto by_index = [&](auto elem) {
    if (count <= UINT32_MAX - kThreads * grid.x) run(elem, uint32_t{});
    else run(elem, uint64_t{});
  };
  switch (t) {
    case kF32: by_index(float{}); break;
    case kI64: by_index(int64_t{}); break;
    case kI32: by_index(int32_t{}); break;
    default: by_index(uint8_t{}); break;
  }
}

// ----------------------------------------------------------------------------------- where ----

template <typename T>
__global__ void WhereKernel(const uint8_t* __restrict__ cond, const T* __restrict__ x, const T* __restrict__ y,
                            T* __restrict__ out, Walk w, uint64_t count) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    int64_t off[3];
    Offsets<uint64_t>(w, 3, i, off);
    out[i] = cond[off[0]] ? x[off[1]] : y[off[2]];
  }
}

// buffers: cond, x, y, out. params: rank, d*, c*/x*/y* strides, cOff, xOff, yOff, elemBytes.
void WhereOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  Walk w{};
  ReadDims(c, &w);
  const int eb = static_cast<int>(c.Int("elemBytes", 1, 8));
  if (eb != 1 && eb != 2 && eb != 4 && eb != 8) c.Invalid("elemBytes must be 1, 2, 4 or 8");
  const auto* cond = reinterpret_cast<const uint8_t*>(ReadOperand(c, &w, 0, "c", 0, 1, "cond"));
  const char* x = ReadOperand(c, &w, 1, "x", 1, eb, "x");
  const char* y = ReadOperand(c, &w, 2, "y", 2, eb, "y");
  const size_t count = WalkCount(w);
  char* out = c.Buffer<char>(3, count * eb, "out");
  if (!count) return;
  const dim3 grid = StrideGrid(d, count);
  switch (eb) {
    case 1: Launch(WhereKernel<uint8_t>, grid, dim3(kThreads), 0, s, cond, reinterpret_cast<const uint8_t*>(x), reinterpret_cast<const uint8_t*>(y), reinterpret_cast<uint8_t*>(out), w, count); break;
    case 2: Launch(WhereKernel<uint16_t>, grid, dim3(kThreads), 0, s, cond, reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(y), reinterpret_cast<uint16_t*>(out), w, count); break;
    case 4: Launch(WhereKernel<uint32_t>, grid, dim3(kThreads), 0, s, cond, reinterpret_cast<const uint32_t*>(x), reinterpret_cast<const uint32_t*>(y), reinterpret_cast<uint32_t*>(out), w, count); break;
    default: Launch(WhereKernel<uint64_t>, grid, dim3(kThreads), 0, s, cond, reinterpret_cast<const uint64_t*>(x), reinterpret_cast<const uint64_t*>(y), reinterpret_cast<uint64_t*>(out), w, count); break;
  }
}

// ------------------------------------------------------------------------------ fill, cast ----

// ONNX Cast of a float to an integer: truncation, NaN -> 0, saturation at the range (as the CPU).
template <typename T>
__device__ __forceinline__ T FloatToInt(double v, double lo, double hi) {
  if (v != v) return 0;
  v = trunc(v);
  if (v <= lo) return static_cast<T>(lo);
  if (v >= hi) return static_cast<T>(hi);
  return static_cast<T>(v);
}
__device__ __forceinline__ int64_t ToI64(double v) {
  if (v != v) return 0;
  v = trunc(v);
  if (v <= -9223372036854775808.0) return INT64_MIN;
  if (v >= 9223372036854775807.0) return INT64_MAX;
  return static_cast<int64_t>(v);
}

// Stores v (a float or an integer widened to int64 / double) as type t at y[i].
__device__ __forceinline__ void StoreAs(int t, void* y, uint64_t i, double v, bool from_float) {
  switch (t) {
    case kF32: static_cast<float*>(y)[i] = static_cast<float>(v); break;
    case kI64: static_cast<int64_t*>(y)[i] = ToI64(v); break;
    case kI32: static_cast<int32_t*>(y)[i] = FloatToInt<int32_t>(v, -2147483648.0, 2147483647.0); break;
    case kBool: static_cast<uint8_t*>(y)[i] = v != 0.0 ? 1 : 0; break;
    case kU8: static_cast<uint8_t*>(y)[i] = from_float ? static_cast<uint8_t>(static_cast<uint32_t>(FloatToInt<int32_t>(v, -2147483648.0, 2147483647.0)))
                                                       : FloatToInt<uint8_t>(v, 0.0, 255.0); break;
    default: static_cast<int8_t*>(y)[i] = from_float ? static_cast<int8_t>(static_cast<uint32_t>(FloatToInt<int32_t>(v, -2147483648.0, 2147483647.0)))
                                                     : FloatToInt<int8_t>(v, -128.0, 127.0); break;
  }
}

__global__ void FillKernel(int t, void* __restrict__ y, uint64_t count, double value) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x)
    StoreAs(t, y, i, value, false);
}

// buffers: y. params: dtype, count, value.
void FillOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int t = static_cast<int>(c.Int("dtype", 0, 5));
  const size_t count = c.Count({c.Int("count", 0, kMaxIndex)});
  void* y = c.Buffer<char>(0, count * ElemBytes(t), "y");
  if (count) Launch(FillKernel, StrideGrid(d, count), dim3(kThreads), 0, s, t, y, count, c.Num("value"));
}

template <typename From>
__global__ void CastKernel(const From* __restrict__ x, int to, void* __restrict__ y, uint64_t count) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    const From v = x[i];
    if (to == kBool) {
      static_cast<uint8_t*>(y)[i] = v != From(0) ? 1 : 0;  // NaN != 0: true
    } else if constexpr (std::is_same<From, float>::value) {
      StoreAs(to, y, i, static_cast<double>(v), true);
    } else if (to == kF32) {
      static_cast<float*>(y)[i] = static_cast<float>(v);
    } else {
      // Integer to integer: two's complement wrap, as C and onnxruntime convert.
      const uint64_t u = static_cast<uint64_t>(static_cast<int64_t>(v));
      switch (to) {
        case kI64: static_cast<int64_t*>(y)[i] = static_cast<int64_t>(u); break;
        case kI32: static_cast<int32_t*>(y)[i] = static_cast<int32_t>(static_cast<uint32_t>(u)); break;
        case kU8: static_cast<uint8_t*>(y)[i] = static_cast<uint8_t>(u); break;
        default: static_cast<int8_t*>(y)[i] = static_cast<int8_t>(static_cast<uint8_t>(u)); break;
      }
    }
  }
}

// buffers: x, y. params: from, to, count.
void CastOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int from = static_cast<int>(c.Int("from", 0, 5)), to = static_cast<int>(c.Int("to", 0, 5));
  const size_t count = c.Count({c.Int("count", 0, kMaxIndex)});
  const void* x = c.Buffer<char>(0, count * ElemBytes(from), "x");
  void* y = c.Buffer<char>(1, count * ElemBytes(to), "y");
  if (!count) return;
  const dim3 grid = StrideGrid(d, count);
  switch (from) {
    case kF32: Launch(CastKernel<float>, grid, dim3(kThreads), 0, s, static_cast<const float*>(x), to, y, count); break;
    case kI64: Launch(CastKernel<int64_t>, grid, dim3(kThreads), 0, s, static_cast<const int64_t*>(x), to, y, count); break;
    case kI32: Launch(CastKernel<int32_t>, grid, dim3(kThreads), 0, s, static_cast<const int32_t*>(x), to, y, count); break;
    case kI8: Launch(CastKernel<int8_t>, grid, dim3(kThreads), 0, s, static_cast<const int8_t*>(x), to, y, count); break;
    default: Launch(CastKernel<uint8_t>, grid, dim3(kThreads), 0, s, static_cast<const uint8_t*>(x), to, y, count); break;
  }
}

// ---------------------------------------------------------------------------------- gather ----

template <typename T, typename I>
__global__ void GatherKernel(const T* __restrict__ data, const I* __restrict__ idx, T* __restrict__ y, uint64_t outer,
                             int64_t axis_len, uint64_t inner, uint64_t n_idx, unsigned long long* err,
                             unsigned long long code) {
  const uint64_t count = outer * n_idx * inner;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t j = i % inner, t = i / inner, k = t % n_idx, o = t / n_idx;
    int64_t v = static_cast<int64_t>(idx[k]);
    if (v < -axis_len || v >= axis_len) {
      Report(err, code, kErrIndex, v);
      continue;
    }
    if (v < 0) v += axis_len;
    y[i] = data[(o * static_cast<uint64_t>(axis_len) + static_cast<uint64_t>(v)) * inner + j];
  }
}

template <typename T>
void LaunchGather(GpuStream& s, dim3 grid, const void* data, const void* idx, bool i64, void* y, uint64_t outer,
                  int64_t len, uint64_t inner, uint64_t n, unsigned long long* err, unsigned long long code) {
  if (i64) Launch(GatherKernel<T, int64_t>, grid, dim3(kThreads), 0, s, static_cast<const T*>(data), static_cast<const int64_t*>(idx), static_cast<T*>(y), outer, len, inner, n, err, code);
  else Launch(GatherKernel<T, int32_t>, grid, dim3(kThreads), 0, s, static_cast<const T*>(data), static_cast<const int32_t*>(idx), static_cast<T*>(y), outer, len, inner, n, err, code);
}

// buffers: data [outer, axisLen, inner], indices [nIndices], y [outer, nIndices, inner], error.
// params: outer, axisLen, inner, nIndices, elemBytes, indices64, code.
void GatherOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t outer = c.Int("outer", 0, kMaxIndex), len = c.Int("axisLen", 0, kMaxIndex), inner = c.Int("inner", 0, kMaxIndex);
  const int64_t n = c.Int("nIndices", 0, kMaxIndex);
  const int eb = static_cast<int>(c.Int("elemBytes", 1, 8));
  if (eb != 1 && eb != 2 && eb != 4 && eb != 8) c.Invalid("elemBytes must be 1, 2, 4 or 8");
  const bool i64 = c.Int("indices64", 0, 1) != 0;
  const void* data = c.Buffer<char>(0, c.Count({outer, len, inner, eb}), "data");
  const void* idx = c.Buffer<char>(1, c.Count({n, i64 ? 8 : 4}), "indices");
  void* y = c.Buffer<char>(2, c.Count({outer, n, inner, eb}), "y");
  auto* err = c.Buffer<unsigned long long>(3, 3, "error");
  const auto code = static_cast<unsigned long long>(c.Int("code", 1));
  const size_t count = c.Count({outer, n, inner});
  if (!count) return;
  const dim3 grid = StrideGrid(d, count);
  switch (eb) {
    case 1: LaunchGather<uint8_t>(s, grid, data, idx, i64, y, outer, len, inner, n, err, code); break;
    case 2: LaunchGather<uint16_t>(s, grid, data, idx, i64, y, outer, len, inner, n, err, code); break;
    case 4: LaunchGather<uint32_t>(s, grid, data, idx, i64, y, outer, len, inner, n, err, code); break;
    default: LaunchGather<uint64_t>(s, grid, data, idx, i64, y, outer, len, inner, n, err, code); break;
  }
}

// ------------------------------------------------------------------------------------- pad ----

struct PadGeometry {
  int rank;
  int mode;
  int64_t in_dims[kMaxRank], out_dims[kMaxRank], begin[kMaxRank];
};

__device__ __forceinline__ int64_t PadSource(int64_t src, int64_t len, int mode) {
  if (src >= 0 && src < len) return src;
  if (mode == kPadConstant || len == 0) return -1;
  if (mode == kPadEdge) return src < 0 ? 0 : len - 1;
  if (len == 1) return 0;
  const int64_t period = 2 * (len - 1);  // NumPy 'reflect': the edge element is not repeated
  int64_t m = src % period;
  if (m < 0) m += period;
  return m < len ? m : period - m;
}

template <typename T>
__global__ void PadKernel(const T* __restrict__ x, T* __restrict__ y, PadGeometry g, uint64_t count, T fill) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    uint64_t rem = i;
    int64_t src = 0, stride = 1;
    bool constant = false;
    for (int d = g.rank - 1; d >= 0; --d) {
      const int64_t o = static_cast<int64_t>(rem % static_cast<uint64_t>(g.out_dims[d]));
      rem /= static_cast<uint64_t>(g.out_dims[d]);
      const int64_t si = PadSource(o - g.begin[d], g.in_dims[d], g.mode);
      if (si < 0) constant = true;
      src += si * stride;
      stride *= g.in_dims[d];
    }
    y[i] = constant ? fill : x[src];
  }
}

template <typename T>
T PadValue(int t, double v) {
  if (t == kF32) {
    const float f = static_cast<float>(v);
    T out;
    std::memcpy(&out, &f, sizeof(out) < sizeof(f) ? sizeof(out) : sizeof(f));
    return out;
  }
  if (t == kBool) return static_cast<T>(v != 0.0 ? 1 : 0);
  if (v != v) return 0;
  return static_cast<T>(static_cast<int64_t>(std::trunc(v)));
}

// buffers: x (contiguous inDims), y. params: dtype, rank, in0.., b0.. (begin), e0.. (end), mode, value.
void PadOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int t = static_cast<int>(c.Int("dtype", 0, 5));
  PadGeometry g{};
  g.rank = static_cast<int>(c.Int("rank", 0, kMaxRank));
  g.mode = static_cast<int>(c.Int("mode", 0, 2));
  size_t in_count = 1, out_count = 1;
  for (int i = 0; i < g.rank; ++i) {
    const std::string k = std::to_string(i);
    g.in_dims[i] = c.Int(("in" + k).c_str(), 0, kMaxIndex);
    g.begin[i] = c.Int(("b" + k).c_str(), -kMaxIndex, kMaxIndex);
    const int64_t od = g.in_dims[i] + g.begin[i] + c.Int(("e" + k).c_str(), -kMaxIndex, kMaxIndex);
    g.out_dims[i] = od > 0 ? od : 0;
    in_count = c.Count({static_cast<int64_t>(in_count), g.in_dims[i]});
    out_count = c.Count({static_cast<int64_t>(out_count), g.out_dims[i]});
  }
  const size_t eb = ElemBytes(t);
  const void* x = c.Buffer<char>(0, in_count * eb, "x");
  void* y = c.Buffer<char>(1, out_count * eb, "y");
  if (!out_count) return;
  // An empty input can only be padded with the constant: edge/reflect have no source element.
  if (!in_count && g.mode != kPadConstant) c.Invalid("edge and reflect padding need a non-empty input");
  const double v = c.NumOr("value", 0);
  const dim3 grid = StrideGrid(d, out_count);
  switch (eb) {
    case 1: Launch(PadKernel<uint8_t>, grid, dim3(kThreads), 0, s, static_cast<const uint8_t*>(x), static_cast<uint8_t*>(y), g, out_count, PadValue<uint8_t>(t, v)); break;
    case 4:
      if (t == kF32) {
        const float f = static_cast<float>(v);
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        Launch(PadKernel<uint32_t>, grid, dim3(kThreads), 0, s, static_cast<const uint32_t*>(x), static_cast<uint32_t*>(y), g, out_count, bits);
      } else {
        Launch(PadKernel<uint32_t>, grid, dim3(kThreads), 0, s, static_cast<const uint32_t*>(x), static_cast<uint32_t*>(y), g, out_count,
               static_cast<uint32_t>(static_cast<int32_t>(v != v ? 0 : std::trunc(v))));
      }
      break;
    default:
      Launch(PadKernel<uint64_t>, grid, dim3(kThreads), 0, s, static_cast<const uint64_t*>(x), static_cast<uint64_t*>(y), g, out_count,
             static_cast<uint64_t>(static_cast<int64_t>(v != v ? 0 : std::trunc(v))));
      break;
  }
}

// ------------------------------------------------------------- reduce, argmax, topk (axis) ----
// x is [outer, r, inner]; one thread per (outer, inner) position walks r with stride inner, so
// neighbouring threads read neighbouring elements (coalesced) whenever inner > 1. Rows (inner = 1)
// go to one warp each.

template <typename T>
__device__ __forceinline__ T ReduceStep(int kind, T acc, T v) {
  if (kind == kSum || kind == kMean) {
    if constexpr (std::is_integral<T>::value) return static_cast<T>(static_cast<uint64_t>(acc) + static_cast<uint64_t>(v));
    else return acc + v;
  }
  if constexpr (std::is_floating_point<T>::value) {
    // NaN propagates, as NumPy's max / min.
    if (kind == kMax) return (v > acc || v != v) ? v : acc;
    return (v < acc || v != v) ? v : acc;
  } else {
    if (kind == kMax) return v > acc ? v : acc;
    return v < acc ? v : acc;
  }
}

template <typename T>
__device__ __forceinline__ T ReduceInit(int kind) {
  if constexpr (std::is_floating_point<T>::value) {
    if (kind == kMax) return -INFINITY;
    if (kind == kMin) return INFINITY;
  } else {
    // Two's complement limits spelt out: numeric_limits is host-only in device code.
    constexpr T kHi = static_cast<T>(~(static_cast<typename std::make_unsigned<T>::type>(1) << (sizeof(T) * 8 - 1)));
    if (kind == kMax) return static_cast<T>(-kHi - 1);
    if (kind == kMin) return kHi;
  }
  return T(0);
}

template <typename T>
__device__ __forceinline__ T ReduceFinish(int kind, T v, uint64_t r) {
  if (kind != kMean) return v;
  if constexpr (std::is_floating_point<T>::value) return v / static_cast<T>(r);
  else return r ? static_cast<T>(v / static_cast<T>(r)) : T(0);
}

template <typename T>
__device__ __forceinline__ T WarpReduce(int kind, T v) {
  for (int o = 16; o > 0; o >>= 1) v = ReduceStep<T>(kind, v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__global__ void ReduceColumnsKernel(int kind, const T* __restrict__ x, T* __restrict__ y, uint64_t outer, uint64_t r,
                                    uint64_t inner) {
  const uint64_t count = outer * inner;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    const T* p = x + (i / inner) * r * inner + i % inner;
    T acc = ReduceInit<T>(kind);
    for (uint64_t k = 0; k < r; ++k) acc = ReduceStep<T>(kind, acc, p[k * inner]);
    y[i] = ReduceFinish<T>(kind, acc, r);
  }
}

template <typename T>
__global__ void ReduceRowsKernel(int kind, const T* __restrict__ x, T* __restrict__ y, uint64_t rows, uint64_t r) {
  const unsigned lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (uint64_t row = uint64_t(blockIdx.x) * warps + threadIdx.x / 32; row < rows; row += uint64_t(gridDim.x) * warps) {
    const T* p = x + row * r;
    T acc = ReduceInit<T>(kind);
    for (uint64_t k = lane; k < r; k += 32) acc = ReduceStep<T>(kind, acc, p[k]);
    acc = WarpReduce<T>(kind, acc);
    if (lane == 0) y[row] = ReduceFinish<T>(kind, acc, r);
  }
}

// buffers: x, y. params: kind, dtype (float32 / int64 / int32), outer, r, inner.
void ReduceOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int kind = static_cast<int>(c.Int("kind", 0, 3)), t = static_cast<int>(c.Int("dtype", 0, 2));
  const int64_t outer = c.Int("outer", 0, kMaxIndex), r = c.Int("r", 0, kMaxIndex), inner = c.Int("inner", 0, kMaxIndex);
  const size_t eb = ElemBytes(t);
  const void* x = c.Buffer<char>(0, c.Count({outer, r, inner, static_cast<int64_t>(eb)}), "x");
  void* y = c.Buffer<char>(1, c.Count({outer, inner, static_cast<int64_t>(eb)}), "y");
  const size_t count = c.Count({outer, inner});
  if (!count) return;
  // Whole warps step through the row loop together (the shuffles need every lane), so the grid is
  // rounded to warps and the loop bound is the same for a warp's lanes.
  const dim3 rows_grid = StrideGrid(d, count * 32);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (inner == 1) Launch(ReduceRowsKernel<T>, rows_grid, dim3(kThreads), 0, s, kind, static_cast<const T*>(x), static_cast<T*>(y), uint64_t(outer), uint64_t(r));
    else Launch(ReduceColumnsKernel<T>, StrideGrid(d, count), dim3(kThreads), 0, s, kind, static_cast<const T*>(x), static_cast<T*>(y), uint64_t(outer), uint64_t(r), uint64_t(inner));
  };
  if (t == kF32) run(float{});
  else if (t == kI64) run(int64_t{});
  else run(int32_t{});
}

__global__ void ArgMaxKernel(const float* __restrict__ x, int64_t* __restrict__ y, uint64_t outer, uint64_t r, uint64_t inner,
                             int select_last) {
  const uint64_t count = outer * inner;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    const float* p = x + (i / inner) * r * inner + i % inner;
    // The max with NaN winning (as the CPU's max), then the first (or last) position holding it.
    float best = -INFINITY;
    for (uint64_t k = 0; k < r; ++k) {
      const float v = p[k * inner];
      if (v > best || v != v) best = v;
      if (best != best) break;
    }
    const bool nan = best != best;
    int64_t found = 0;
    for (uint64_t k = 0; k < r; ++k) {
      const uint64_t kk = select_last ? r - 1 - k : k;
      const float v = p[kk * inner];
      if (nan ? v != v : v == best) {
        found = static_cast<int64_t>(kk);
        break;
      }
    }
    y[i] = found;
  }
}

// buffers: x (float32), y (int64). params: outer, r, inner, selectLastIndex.
void ArgMaxOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t outer = c.Int("outer", 0, kMaxIndex), r = c.Int("r", 0, kMaxIndex), inner = c.Int("inner", 0, kMaxIndex);
  const float* x = c.Buffer<float>(0, c.Count({outer, r, inner}), "x");
  int64_t* y = c.Buffer<int64_t>(1, c.Count({outer, inner}), "y");
  const size_t count = c.Count({outer, inner});
  if (count)
    Launch(ArgMaxKernel, StrideGrid(d, count), dim3(kThreads), 0, s, x, y, uint64_t(outer), uint64_t(r), uint64_t(inner),
           static_cast<int>(c.IntOr("selectLastIndex", 0, 0, 1)));
}

// Selection by repeated scans: the j-th output is the best element not yet taken, where "better"
// is the larger (smaller) value and then the lower index, as a stable sort orders ties. O(k * r)
// per slice, no scratch: TopK in the models sonde runs takes k of a few from r of at most thousands.
__device__ __forceinline__ bool Before(float a, int64_t ia, float b, int64_t ib, bool largest) {
  // NaN orders above everything for largest (below for smallest), as the CPU's comparator.
  const bool an = a != a, bn = b != b;
  if (an || bn) {
    if (an && bn) return ia < ib;
    return largest ? an : bn;
  }
  if (a != b) return largest ? a > b : a < b;
  return ia < ib;
}

__global__ void TopKKernel(const float* __restrict__ x, float* __restrict__ values, int64_t* __restrict__ indices,
                           uint64_t outer, uint64_t r, uint64_t inner, uint64_t k, int largest) {
  const uint64_t count = outer * inner;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t o = i / inner, j = i % inner;
    const float* p = x + o * r * inner + j;
    float prev = 0.0f;
    int64_t prev_i = -1;
    for (uint64_t t = 0; t < k; ++t) {
      float best = 0.0f;
      int64_t best_i = -1;
      for (uint64_t q = 0; q < r; ++q) {
        const float v = p[q * inner];
        const int64_t qi = static_cast<int64_t>(q);
        // Only elements after the previous pick in the order are candidates.
        if (prev_i >= 0 && !Before(prev, prev_i, v, qi, largest != 0)) continue;
        if (best_i < 0 || Before(v, qi, best, best_i, largest != 0)) {
          best = v;
          best_i = qi;
        }
      }
      const uint64_t out = (o * k + t) * inner + j;
      values[out] = best;
      indices[out] = best_i;
      prev = best;
      prev_i = best_i;
    }
  }
}

// buffers: x, values, indices. params: outer, r, inner, k, largest.
void TopKOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t outer = c.Int("outer", 0, kMaxIndex), r = c.Int("r", 0, kMaxIndex), inner = c.Int("inner", 0, kMaxIndex);
  const int64_t k = c.Int("k", 0, kMaxIndex);
  if (k > r) c.Invalid("k must be <= r");
  const float* x = c.Buffer<float>(0, c.Count({outer, r, inner}), "x");
  float* values = c.Buffer<float>(1, c.Count({outer, k, inner}), "values");
  int64_t* indices = c.Buffer<int64_t>(2, c.Count({outer, k, inner}), "indices");
  const size_t count = c.Count({outer, inner});
  if (count && k)
    Launch(TopKKernel, StrideGrid(d, count), dim3(kThreads), 0, s, x, values, indices, uint64_t(outer), uint64_t(r),
           uint64_t(inner), uint64_t(k), static_cast<int>(c.Int("largest", 0, 1)));
}

// ------------------------------------------------------------------ softmax, norms, affine ----

// Softmax (or log-softmax) down columns: one thread per (outer, inner), three passes over axis.
__global__ void SoftmaxColumnsKernel(const float* __restrict__ x, float* __restrict__ y, uint64_t outer, uint64_t axis,
                                     uint64_t inner, int log_softmax) {
  const uint64_t count = outer * inner;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t base = (i / inner) * axis * inner + i % inner;
    float mx = -INFINITY;
    for (uint64_t k = 0; k < axis; ++k) mx = fmaxf(mx, x[base + k * inner]);
    float sum = 0.0f;
    for (uint64_t k = 0; k < axis; ++k) sum += expf(x[base + k * inner] - mx);
    if (log_softmax) {
      const float lse = logf(sum);
      for (uint64_t k = 0; k < axis; ++k) y[base + k * inner] = (x[base + k * inner] - mx) - lse;
    } else {
      const float inv = 1.0f / sum;
      for (uint64_t k = 0; k < axis; ++k) y[base + k * inner] = expf(x[base + k * inner] - mx) * inv;
    }
  }
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Contiguous rows (inner = 1): one warp per row.
__global__ void SoftmaxRowsKernel(const float* __restrict__ x, float* __restrict__ y, uint64_t rows, uint64_t n, int log_softmax) {
  const unsigned lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (uint64_t row = uint64_t(blockIdx.x) * warps + threadIdx.x / 32; row < rows; row += uint64_t(gridDim.x) * warps) {
    const float* xr = x + row * n;
    float* yr = y + row * n;
    float mx = -INFINITY;
    for (uint64_t k = lane; k < n; k += 32) mx = fmaxf(mx, xr[k]);
    mx = WarpMax(mx);
    float sum = 0.0f;
    for (uint64_t k = lane; k < n; k += 32) sum += expf(xr[k] - mx);
    sum = WarpSum(sum);
    if (log_softmax) {
      const float lse = logf(sum);
      for (uint64_t k = lane; k < n; k += 32) yr[k] = (xr[k] - mx) - lse;
    } else {
      const float inv = 1.0f / sum;
      for (uint64_t k = lane; k < n; k += 32) yr[k] = expf(xr[k] - mx) * inv;
    }
  }
}

// buffers: x, y. params: outer, axis, inner, log.
void AxisSoftmaxOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t outer = c.Int("outer", 0, kMaxIndex), axis = c.Int("axis", 0, kMaxIndex), inner = c.Int("inner", 0, kMaxIndex);
  const int log_softmax = static_cast<int>(c.IntOr("log", 0, 0, 1));
  const size_t count = c.Count({outer, axis, inner});
  const float* x = c.Buffer<float>(0, count, "x");
  float* y = c.Buffer<float>(1, count, "y");
  if (!count) return;
  const size_t slices = c.Count({outer, inner});
  if (inner == 1) Launch(SoftmaxRowsKernel, StrideGrid(d, slices * 32), dim3(kThreads), 0, s, x, y, uint64_t(outer), uint64_t(axis), log_softmax);
  else Launch(SoftmaxColumnsKernel, StrideGrid(d, slices), dim3(kThreads), 0, s, x, y, uint64_t(outer), uint64_t(axis), uint64_t(inner), log_softmax);
}

// Two passes (mean, then centred squares), as the CPU's layer norm; one warp per row.
__global__ void LayerNormRowsKernel(const float* __restrict__ x, const float* __restrict__ scale, const float* __restrict__ bias,
                                    float* __restrict__ y, uint64_t rows, uint64_t n, float eps) {
  const unsigned lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (uint64_t row = uint64_t(blockIdx.x) * warps + threadIdx.x / 32; row < rows; row += uint64_t(gridDim.x) * warps) {
    const float* xr = x + row * n;
    float* yr = y + row * n;
    float sum = 0.0f;
    for (uint64_t k = lane; k < n; k += 32) sum += xr[k];
    const float mean = WarpSum(sum) / static_cast<float>(n);
    float var = 0.0f;
    for (uint64_t k = lane; k < n; k += 32) {
      const float dv = xr[k] - mean;
      var += dv * dv;
    }
    const float inv = 1.0f / sqrtf(WarpSum(var) / static_cast<float>(n) + eps);
    for (uint64_t k = lane; k < n; k += 32) {
      float v = (xr[k] - mean) * inv;
      if (scale) v *= scale[k];
      if (bias) v += bias[k];
      yr[k] = v;
    }
  }
}

// buffers: x, y, then scale and bias as flagged. params: rows, cols, epsilon, hasScale, hasBias.
void LayerNormOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, kMaxIndex), cols = c.Int("cols", 0, kMaxIndex);
  const size_t count = c.Count({rows, cols});
  const float* x = c.Buffer<float>(0, count, "x");
  float* y = c.Buffer<float>(1, count, "y");
  size_t next = 2;
  const float* scale = c.IntOr("hasScale", 0, 0, 1) ? c.Buffer<float>(next++, cols, "scale") : nullptr;
  const float* bias = c.IntOr("hasBias", 0, 0, 1) ? c.Buffer<float>(next++, cols, "bias") : nullptr;
  if (!count) return;
  Launch(LayerNormRowsKernel, StrideGrid(d, size_t(rows) * 32), dim3(kThreads), 0, s, x, scale, bias, y, uint64_t(rows),
         uint64_t(cols), static_cast<float>(c.Num("epsilon")));
}

// x * s rounded on its own before + h, as the CPU computes it: nvcc would otherwise contract the two
// into one FMA (one rounding), and the affine results would no longer equal the CPU's bit for bit.
__device__ __forceinline__ float MulRounded(float a, float b) {
#if SONDE_GPU_EMULATED
  return a * b;
#else
  return __fmul_rn(a, b);
#endif
}

__global__ void ChannelAffineKernel(const float* __restrict__ x, const float* __restrict__ scale, const float* __restrict__ shift,
                                    float* __restrict__ y, uint64_t count, uint64_t channels, uint64_t inner) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t ch = (i / inner) % channels;
    y[i] = MulRounded(x[i], scale[ch]) + shift[ch];
  }
}

// buffers: x, scale, shift, y. params: outer, channels, inner.
void ChannelAffineOp(GpuStream& s, const GpuDeviceInfo& d, const GpuOpCall& c) {
  const int64_t outer = c.Int("outer", 0, kMaxIndex), ch = c.Int("channels", 0, kMaxIndex), inner = c.Int("inner", 0, kMaxIndex);
  const size_t count = c.Count({outer, ch, inner});
  const float* x = c.Buffer<float>(0, count, "x");
  const float* scale = c.Buffer<float>(1, ch, "scale");
  const float* shift = c.Buffer<float>(2, ch, "shift");
  float* y = c.Buffer<float>(3, count, "y");
  if (count) Launch(ChannelAffineKernel, StrideGrid(d, count), dim3(kThreads), 0, s, x, scale, shift, y, count, uint64_t(ch), uint64_t(inner));
}

// ---------------------------------------------------------------------------- batched matmul ----
// c[i] [m, n] = a[i] [m, k] . b[i] [k, n] (transB: b[i] stored [n, k]) for every index i of the
// broadcast batch dims, a/b at their batch strides (0 where broadcast). fp32 SIMT: the runtime-operand
// MatMuls of an attention block (scores, context), where the weights-times-activations GEMMs go to
// the gemm family. A block computes a 64 x 64 tile of c, each thread a 4 x 4 patch in registers, so
// every shared-memory value loaded feeds four FMAs; K advances in slices of 16 staged through shared
// memory with loads that run along the operands' contiguous dimension.

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kPatch = 4, kMatMulThreads = 256;

struct MatMulShape {
  int rank;
  int64_t dims[kMaxRank];
  int64_t a_strides[kMaxRank], b_strides[kMaxRank];
  uint64_t batch, m, n, k;
  int trans_b;
};

__global__ void __launch_bounds__(kMatMulThreads) MatMulKernel(const float* __restrict__ a, const float* __restrict__ b,
                                                              float* __restrict__ c, MatMulShape sh) {
  // +4: the column reads of a thread's patch fall in different banks across a warp's rows.
  __shared__ float as[kTileK][kTileM + 4];
  __shared__ float bs[kTileK][kTileN + 4];
  const unsigned tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const uint64_t row0 = uint64_t(blockIdx.y) * kTileM, col0 = uint64_t(blockIdx.x) * kTileN;
  for (uint64_t batch = blockIdx.z; batch < sh.batch; batch += gridDim.z) {
    int64_t ao = 0, bo = 0;
    uint64_t rem = batch;
    for (int d = sh.rank - 1; d >= 0; --d) {
      const int64_t j = static_cast<int64_t>(rem % static_cast<uint64_t>(sh.dims[d]));
      rem /= static_cast<uint64_t>(sh.dims[d]);
      ao += j * sh.a_strides[d];
      bo += j * sh.b_strides[d];
    }
    const float* ab = a + ao;
    const float* bb = b + bo;
    float acc[kPatch][kPatch];
    SONDE_UNROLL
    for (int i = 0; i < kPatch; ++i) {
      SONDE_UNROLL
      for (int j = 0; j < kPatch; ++j) acc[i][j] = 0.0f;
    }
    for (uint64_t k0 = 0; k0 < sh.k; k0 += kTileK) {
      // A tile: 64 rows x 16 k, a row's 16 k values read by 16 neighbouring threads.
      SONDE_UNROLL
      for (int l = 0; l < kTileM * kTileK / kMatMulThreads; ++l) {
        const unsigned e = tid + l * kMatMulThreads, r = e / kTileK, kk = e % kTileK;
        const uint64_t gr = row0 + r, gk = k0 + kk;
        as[kk][r] = gr < sh.m && gk < sh.k ? ab[gr * sh.k + gk] : 0.0f;
      }
      SONDE_UNROLL
      for (int l = 0; l < kTileN * kTileK / kMatMulThreads; ++l) {
        const unsigned e = tid + l * kMatMulThreads;
        // B [k, n] is read along n; transposed B [n, k] along k.
        const unsigned kk = sh.trans_b ? e % kTileK : e / kTileN, nn = sh.trans_b ? e / kTileK : e % kTileN;
        const uint64_t gk = k0 + kk, gc = col0 + nn;
        float v = 0.0f;
        if (gk < sh.k && gc < sh.n) v = sh.trans_b ? bb[gc * sh.k + gk] : bb[gk * sh.n + gc];
        bs[kk][nn] = v;
      }
      __syncthreads();
      SONDE_UNROLL
      for (int kk = 0; kk < kTileK; ++kk) {
        float af[kPatch], bf[kPatch];
        SONDE_UNROLL
        for (int i = 0; i < kPatch; ++i) af[i] = as[kk][ty * kPatch + i];
        SONDE_UNROLL
        for (int j = 0; j < kPatch; ++j) bf[j] = bs[kk][tx * kPatch + j];
        SONDE_UNROLL
        for (int i = 0; i < kPatch; ++i) {
          SONDE_UNROLL
          for (int j = 0; j < kPatch; ++j) acc[i][j] += af[i] * bf[j];
        }
      }
      __syncthreads();
    }
    float* cb = c + batch * sh.m * sh.n;
    SONDE_UNROLL
    for (int i = 0; i < kPatch; ++i) {
      const uint64_t r = row0 + ty * kPatch + i;
      if (r >= sh.m) continue;
      SONDE_UNROLL
      for (int j = 0; j < kPatch; ++j) {
        const uint64_t col = col0 + tx * kPatch + j;
        if (col < sh.n) cb[r * sh.n + col] = acc[i][j];
      }
    }
  }
}

// buffers: a, b, c. params: rank, d*, a* / b* batch strides, aOff, bOff, m, k, n, transB.
void MatMulOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  Walk w{};
  ReadDims(c, &w);
  MatMulShape sh{};
  sh.m = c.Int("m", 0, kMaxIndex);
  sh.k = c.Int("k", 0, kMaxIndex);
  sh.n = c.Int("n", 0, kMaxIndex);
  sh.trans_b = static_cast<int>(c.Int("transB", 0, 1));
  if (w.rank > kMaxRank - 2) c.Invalid("at most 6 batch dims");
  int64_t a_strides[kMaxRank], b_strides[kMaxRank];
  for (int i = 0; i < w.rank; ++i) {
    a_strides[i] = c.Int(("a" + std::to_string(i)).c_str(), -kMaxIndex, kMaxIndex);
    b_strides[i] = c.Int(("b" + std::to_string(i)).c_str(), -kMaxIndex, kMaxIndex);
  }
  // Each operand's lowest and highest element over the batch walk plus its own matrix.
  auto operand = [&](const int64_t* strides, const char* off_name, size_t buf, int64_t rows, int64_t cols,
                     const char* what) -> const float* {
    const int64_t off = c.IntOr(off_name, 0, 0, kMaxIndex);
    int64_t lo = off, hi = off;
    bool empty = rows == 0 || cols == 0;
    for (int i = 0; i < w.rank; ++i) {
      if (w.dims[i] == 0) empty = true;
      const int64_t span = (w.dims[i] > 0 ? w.dims[i] - 1 : 0) * strides[i];
      (span < 0 ? lo : hi) += span;
    }
    if (empty) return c.Buffer<float>(buf, 0, what);
    hi += (rows - 1) * cols + cols - 1;
    if (lo < 0) c.Invalid(std::string(what) + " walks before its buffer's start");
    return c.Buffer<float>(buf, c.Count({hi + 1}), what) + off;
  };
  const float* a = operand(a_strides, "aOff", 0, sh.m, sh.k, "a");
  const float* b = sh.trans_b ? operand(b_strides, "bOff", 1, sh.n, sh.k, "b") : operand(b_strides, "bOff", 1, sh.k, sh.n, "b");
  sh.rank = w.rank;
  sh.batch = 1;
  for (int i = 0; i < w.rank; ++i) {
    sh.dims[i] = w.dims[i];
    sh.a_strides[i] = a_strides[i];
    sh.b_strides[i] = b_strides[i];
    sh.batch *= static_cast<uint64_t>(w.dims[i]);
  }
  float* out = c.Buffer<float>(2, c.Count({static_cast<int64_t>(sh.batch), static_cast<int64_t>(sh.m), static_cast<int64_t>(sh.n)}), "c");
  if (!sh.batch || !sh.m || !sh.n) return;
  const dim3 grid(CeilDiv(sh.n, kTileN), CeilDiv(sh.m, kTileM), static_cast<unsigned>(sh.batch < 65535 ? sh.batch : 65535));
  if (grid.y > 65535) c.Invalid("m is too large (over 65535 tiles of 64 rows)");
  Launch(MatMulKernel, grid, dim3(kMatMulThreads), 0, s, a, b, out, sh);
}

}  // namespace

SONDE_GPU_OP("tensor_copy", CopyOp);
SONDE_GPU_OP("tensor_unary", UnaryOp);
SONDE_GPU_OP("tensor_binary", BinaryOp);
SONDE_GPU_OP("tensor_where", WhereOp);
SONDE_GPU_OP("tensor_fill", FillOp);
SONDE_GPU_OP("tensor_cast", CastOp);
SONDE_GPU_OP("tensor_gather", GatherOp);
SONDE_GPU_OP("tensor_pad", PadOp);
SONDE_GPU_OP("tensor_reduce", ReduceOp);
SONDE_GPU_OP("tensor_argmax", ArgMaxOp);
SONDE_GPU_OP("tensor_topk", TopKOp);
SONDE_GPU_OP("tensor_softmax", AxisSoftmaxOp);
SONDE_GPU_OP("tensor_layer_norm", LayerNormOp);
SONDE_GPU_OP("tensor_channel_affine", ChannelAffineOp);
SONDE_GPU_OP("tensor_matmul", MatMulOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
