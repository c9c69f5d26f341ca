// Generic tensor operators of graph plans (runtime/plan.h): the data movement, broadcasting
// arithmetic, reductions and casts an ONNX graph needs between its heavy ops (conv, gemm). They
// take plain pointers and validated sizes (the plan checked every extent at creation), run on the
// pool when the work is large enough to pay for it, and return false only when cancelled, or with
// *error set for a data-dependent failure (an index out of range, an integer division by zero).
//
// Dims/strides are in elements; rank <= kMaxRank after the caller merged adjacent dims.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/thread_pool.h"

namespace sonde {

constexpr size_t kMaxRank = 8;

enum class ElemType : int32_t { kFloat32 = 0, kInt64 = 1, kInt32 = 2, kBool = 3, kUint8 = 4, kInt8 = 5 };
size_t ElemBytes(ElemType t);

// A strided view: dims (shared by the step) and per-operand strides.
struct Strided {
  size_t rank = 0;
  size_t dims[kMaxRank] = {};
  ptrdiff_t strides[kMaxRank] = {};
};

struct TensorOpContext {
  ThreadPool* pool;
  unsigned max_threads;
  const CancelFlag* cancel;
};

enum class UnaryKind : int32_t {
  kRelu, kLeakyRelu, kClip, kSigmoid, kTanh, kHardSigmoid, kHardSwish, kErf, kGelu, kGeluTanh, kSilu,
  kExp, kLog, kSqrt, kNeg, kAbs, kReciprocal, kNot, kIdentity,
};
enum class BinaryKind : int32_t { kAdd, kSub, kMul, kDiv, kPow, kEqual, kLess, kGreater, kAnd, kOr };
enum class ReduceKind : int32_t { kSum, kMean, kMax, kMin };
enum class PadMode : int32_t { kConstant, kReflect, kEdge };

// y[i] = f(x[i]); float32 for all kinds (SIMD where elementwise kernels have one), neg/abs also for
// int64/int32, not for bool. alpha/beta: LeakyRelu alpha, Clip [alpha, beta], HardSigmoid alpha, beta.
bool RunUnaryOp(const TensorOpContext& ctx, UnaryKind kind, ElemType t, const void* x, void* y, size_t count,
                float alpha, float beta, std::string* error);

// y (contiguous over `shape.dims`) = a op b, a/b through a_strides/b_strides. t: the inputs' type;
// comparisons write bool. Integer division truncates; a zero divisor sets *error.
bool RunBinaryOp(const TensorOpContext& ctx, BinaryKind kind, ElemType t, const void* a, const ptrdiff_t* a_strides,
                 const void* b, const ptrdiff_t* b_strides, void* y, const size_t* dims, size_t rank,
                 std::string* error);

// out (contiguous) = cond ? x : y, each through its strides.
bool RunWhere(const TensorOpContext& ctx, const uint8_t* cond, const ptrdiff_t* cond_strides, const void* x,
              const ptrdiff_t* x_strides, const void* y, const ptrdiff_t* y_strides, void* out, const size_t* dims,
              size_t rank, size_t elem_bytes);

// y[y_strides . j] = x[x_strides . j] for every j < dims.
bool RunStridedCopy(const TensorOpContext& ctx, const void* x, const ptrdiff_t* x_strides, void* y,
                    const ptrdiff_t* y_strides, const size_t* dims, size_t rank, size_t elem_bytes);

// y[0..count) = value converted to t.
void RunFill(ElemType t, void* y, size_t count, double value);

// y [outer][n_indices][inner] = data [outer][axis_len][inner] at the indices (int64 or int32,
// negative counts from the end). An index outside [-axis_len, axis_len) sets *error.
bool RunGather(const TensorOpContext& ctx, const void* data, const void* indices, bool indices_int64, void* y,
               size_t outer, size_t axis_len, size_t inner, size_t n_indices, size_t elem_bytes, std::string* error);

// y [outer][inner] = reduce of x [outer][r][inner] over r (float32; sum/max/min also int64).
bool RunReduce(const TensorOpContext& ctx, ReduceKind kind, ElemType t, const void* x, void* y, size_t outer, size_t r,
               size_t inner);

// y [outer][channels][inner] = x * scale[c] + shift[c].
bool RunChannelAffine(const TensorOpContext& ctx, const float* x, const float* scale, const float* shift, float* y,
                      size_t outer, size_t channels, size_t inner);

// ONNX Cast between the ElemTypes: float -> integer truncates toward zero (NaN -> 0), -> bool is != 0.
bool RunCastOp(const TensorOpContext& ctx, ElemType from, const void* x, ElemType to, void* y, size_t count);

// y = x padded by begin/end per axis (negative = crop); y dims = in_dims + begin + end.
bool RunPad(const TensorOpContext& ctx, ElemType t, const void* x, const size_t* in_dims, size_t rank,
            const ptrdiff_t* begin, const ptrdiff_t* end, PadMode mode, double value, void* y);

// For each batch index i (batch dims `batch_dims`, strides in elements, 0 = broadcast):
// c[i] [m][n] = a[i] [m][k] . b[i] ([k][n], or [n][k] when trans_b). c is contiguous.
bool RunBatchedMatMul(const TensorOpContext& ctx, const float* a, const ptrdiff_t* a_batch_strides, const float* b,
                      const ptrdiff_t* b_batch_strides, float* c, const size_t* batch_dims, size_t batch_rank, size_t m,
                      size_t k, size_t n, bool trans_b);

// y = log_softmax(x) over the middle axis of [outer][axis][inner] (x - max - log sum exp(x - max)).
bool RunLogSoftmax(const TensorOpContext& ctx, const float* x, float* y, size_t outer, size_t axis, size_t inner);

// y (int64) [outer][inner] = index of the max of x [outer][r][inner] over r; NaN counts as the
// largest (as onnxruntime); ties go to the first index, or the last when select_last.
bool RunArgMaxOp(const TensorOpContext& ctx, const float* x, int64_t* y, size_t outer, size_t r, size_t inner,
                 bool select_last);

}  // namespace sonde
