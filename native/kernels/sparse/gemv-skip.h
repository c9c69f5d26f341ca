// f32 GEMV that skips the weight rows of zero activations (activation sparsity): for a batch-1 row
// x after a ReLU most x[k] are 0, and row k of the weights contributes nothing, so only the rows of
// the non-zero k are read. Works on the dense GEMM's packed panels (NR columns, K rows of NR floats
// each): row k of a panel is NR contiguous floats, so skipping rows skips whole cache lines, and
// no second copy of the weights is needed.
//
// c[0..nc) = epilogue(sum over p < nks of x[ks[p]] * panel[ks[p] * nr + 0..nc)), ks = the non-zero
// k of x, ascending (so a sum runs in the dense kernel's k order, minus the zero terms).
//
// Pure functions: no allocation, no threads, no globals.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {

// nr: the panel width (a multiple of the kernel's vector width for the SIMD variants); nc <= nr
// columns are written; ep may be null (plain sum).
typedef void (*F32GemvSkipUkernel)(size_t nr, size_t nc, const float* x, const uint32_t* ks, size_t nks,
                                   const float* panel, float* c, const GemmEpilogue* ep);

struct F32GemvSkipUkernelInfo {
  F32GemvSkipUkernel fn;
  uint32_t nr_multiple;  // panel widths it handles: multiples of this (the vector width)
  uint32_t max_nr;
  const char* name;
};

F32GemvSkipUkernelInfo F32GemvSkipUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
F32GemvSkipUkernelInfo F32GemvSkipUkernelAvx2();
F32GemvSkipUkernelInfo F32GemvSkipUkernelAvx512();
#endif

}  // namespace kernels
}  // namespace sonde
