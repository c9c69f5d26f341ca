// f32 row kernels for the generic tensor ops (ops/tensor_ops.cc): the max and the sum of one
// contiguous row (ReduceMax/Sum/Mean over the last axis, log-softmax, argmax), and the dot product
// and axpy that a batched MatMul with very few rows runs instead of packing B. Compilers do not
// vectorise a float max or a float sum without -ffast-math (NaN, signed-zero and reassociation
// rules), so the SIMD forms are written out per ISA. Pure functions. Only C headers here (included
// by ISA-specific units).
#pragma once
#include <stddef.h>

namespace sonde {
namespace kernels {

struct ReduceUkernels {
  const char* name;
  // max of x[0..n): NaN if any element is NaN, -Inf when n == 0.
  float (*max_f32)(size_t n, const float* x);
  // sum of x[0..n), in any order (partial sums per lane), 0 when n == 0.
  float (*sum_f32)(size_t n, const float* x);
  // sum of x[i] * y[i], in any order.
  float (*dot_f32)(size_t n, const float* x, const float* y);
  // y[i] += a * x[i] (fused where the ISA has FMA).
  void (*axpy_f32)(size_t n, float a, const float* x, float* y);
};

ReduceUkernels ReduceUkernelsScalar();
#if defined(__x86_64__) || defined(_M_X64)
ReduceUkernels ReduceUkernelsAvx2();
ReduceUkernels ReduceUkernelsAvx512();
#endif

}  // namespace kernels
}  // namespace sonde
