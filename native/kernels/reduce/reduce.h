// f32 row reductions for the generic tensor ops (ops/tensor_ops.cc): the max and the sum of one
// contiguous row, used by ReduceMax/Sum/Mean over the last axis, log-softmax and argmax. Compilers
// do not vectorise a float max without -ffast-math (NaN and signed-zero rules), so the SIMD forms
// are written out per ISA. Pure functions. Only C headers here (included by ISA-specific units).
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
};

ReduceUkernels ReduceUkernelsScalar();
#if defined(__x86_64__) || defined(_M_X64)
ReduceUkernels ReduceUkernelsAvx2();
ReduceUkernels ReduceUkernelsAvx512();
#endif

}  // namespace kernels
}  // namespace sonde
