// f32 elementwise and row-reduction microkernels: binary arithmetic, unary activations, softmax,
// layer/RMS normalisation and float32 <-> bfloat16/float16 conversion. One table of function
// pointers per ISA; the operator (ops/elementwise.cc) picks a table once per call and handles
// shapes, broadcasting strides and threads. Pure functions: no allocation, no threads, no globals.
// Only C headers here, because this file is included by ISA-specific translation units.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

enum BinaryOp : int32_t { kBinaryAdd = 0, kBinarySub = 1, kBinaryMul = 2, kBinaryDiv = 3 };

enum UnaryOp : int32_t {
  kUnaryGeluErf = 0,   // x/2 * (1 + erf(x/sqrt 2))
  kUnaryGeluTanh = 1,  // x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
  kUnarySilu = 2,      // x * sigmoid(x)
  kUnarySigmoid = 3,
  kUnaryTanh = 4,
  kUnaryExp = 5,
  kUnaryRelu = 6,
};
constexpr int32_t kUnaryOpCount = 7;

// Accuracy of the SIMD approximations, in units of u = 2^-24 (measured against double precision
// on a 0.0007 grid over [-110, 110] and a 1e-7 grid over [-1e-3, 1e-3]; test/elementwise checks
// the same bounds):
//   exp <= 1 ulp, tanh <= 1.1 ulp, sigmoid <= 2.1 ulp (relative, wherever the result is normal).
//   silu, gelu (tanh form): relative error <= 4u + u * |a|, where a is the argument of the inner
//     exp (x, resp. 2 * 0.798 (x + 0.044715 x^3)): rounding a in float costs u * |a| relative
//     after exponentiation, for any float implementation. Where exp(-|a|) is subnormal (|a| > 87),
//     add |x| * 2^-149 absolute.
//   gelu (erf form): absolute error <= 3u * |x|; 1 + erf(x / sqrt 2) cancels for x < -3, so the
//     relative error grows in that tail, as it does for every float erf-based gelu.
// The scalar variant uses libm (expf, tanhf, erff, each <= 2 ulp) in the same formulas; the
// reference computes in double and rounds once.

struct ElementwiseUkernels {
  const char* name;
  // y[i] = a[i] op b[i]; y may alias a or b.
  void (*binary_vv)(int32_t op, size_t n, const float* a, const float* b, float* y);
  // y[i] = a[i] op b (a row against one broadcast value)
  void (*binary_vs)(int32_t op, size_t n, const float* a, float b, float* y);
  // y[i] = a op b[i]
  void (*binary_sv)(int32_t op, size_t n, float a, const float* b, float* y);
  void (*unary)(int32_t op, size_t n, const float* x, float* y);
  // Softmax of one contiguous row of n.
  void (*softmax_row)(size_t n, const float* x, float* y);
  // Softmax down each of `cols` columns of a [rows x stride] block (a softmax over a non-last
  // axis): vectorised across columns, so no transpose is needed.
  void (*softmax_cols)(size_t rows, size_t cols, size_t stride, const float* x, float* y);
  // y = (x - mean) / sqrt(var + eps) * gamma + beta over one row; gamma/beta may be null.
  void (*layernorm_row)(size_t n, const float* x, const float* gamma, const float* beta, float eps,
                        float* y);
  // y = x / sqrt(mean(x^2) + eps) * gamma over one row; gamma may be null.
  void (*rmsnorm_row)(size_t n, const float* x, const float* gamma, float eps, float* y);
  // Narrowing rounds to nearest even; NaN stays NaN (quietened, top payload bits kept), +-Inf stays
  // +-Inf, subnormals are kept (no flush to zero), float16 overflow gives +-Inf. Widening is exact
  // (a float16 signalling NaN comes out quietened, as F16C's VCVTPH2PS does). Every variant gives
  // the same bits.
  void (*f32_to_bf16)(size_t n, const float* x, uint16_t* y);
  void (*bf16_to_f32)(size_t n, const uint16_t* x, float* y);
  void (*f32_to_f16)(size_t n, const float* x, uint16_t* y);
  void (*f16_to_f32)(size_t n, const uint16_t* x, float* y);
  // Token sampling over one row of logits (lib/llm/sampling.ts, whose TypeScript forms are the
  // reference): the index of the first largest value, NaN never winning (0 when no value exceeds
  // -Inf; unlike F32ArgmaxStrided below, the ONNX operator's NaN-is-largest convention).
  size_t (*sample_argmax)(size_t n, const float* x);
  // The min(k, non-NaN count) best ids (larger value first, lower id first among equals, NaN
  // skipped) into ids[0..) in rank order; returns how many. k >= 1; ids has room for k.
  size_t (*sample_top_k)(size_t n, const float* x, size_t k, int32_t* ids);
  // Top-p's normaliser: the sum of exp(x[i] - max) over the non-NaN x[i] (a term that underflows
  // counts 0), summed in double; with max the row's largest value every term is at most 1.
  double (*sample_exp_sum)(size_t n, const float* x, float max);
};

// The independent reference: scalar, double-precision transcendental functions and accumulation,
// one rounding at the end. Slow on purpose; tests and the `reference` variant use it.
ElementwiseUkernels ElementwiseUkernelsReference();
// Portable scalar code (float arithmetic, libm): the production path where no SIMD variant runs.
ElementwiseUkernels ElementwiseUkernelsScalar();
#if defined(__x86_64__) || defined(_M_X64)
ElementwiseUkernels ElementwiseUkernelsAvx2();
ElementwiseUkernels ElementwiseUkernelsAvx512();
#endif

// Token sampling's full ranking (lib/llm/sampling.ts, top-p over a whole vocabulary): the ids of
// the non-NaN values of x[0..n) by larger value first, lower id first among equals (-0 equal to
// +0), into ids; returns how many. A stable LSD radix sort on the values' order-preserving bits:
// O(n), no comparisons. scratch holds 3 * n words.
size_t F32SampleRank(size_t n, const float* x, int32_t* ids, uint32_t* scratch);

// Index of the largest of x[0], x[stride], ..., x[(n-1)*stride] (n >= 1). NaN counts as larger
// than every number (NumPy's convention); the first index wins ties.
int64_t F32ArgmaxStrided(size_t n, size_t stride, const float* x);

// The k largest (or smallest) of n strided values, sorted, the lower index first among equals;
// NaN sorts above +Inf. Writes values[j * out_stride] and indices[j * out_stride] for j < k.
// scratch holds n entries.
void F32TopKStrided(size_t n, size_t stride, const float* x, size_t k, bool largest,
                    size_t* scratch, float* values, int64_t* indices, size_t out_stride);

}  // namespace kernels
}  // namespace sonde
