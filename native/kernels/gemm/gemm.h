// f32 GEMM microkernels: C[mr x nr] (+)= A[mr x kc] * W[kc x nr], W pre-packed in panels of NR
// columns (panel p holds rows k = 0..K-1 of columns p*NR .. p*NR+NR-1, zero-padded, contiguous).
// Pure functions: no allocation, no threads, no globals. Only C headers here, because this file is
// included by ISA-specific translation units.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

enum GemmActivation : int32_t {
  kActNone = 0,
  kActRelu = 1,
};

// Applied once per output element on the last K block, while the tile is still in registers.
struct GemmEpilogue {
  const float* bias;   // per-column, already offset to the tile's first column; may be null
  int32_t activation;  // GemmActivation
};

// accumulate: add to C (a later K block) instead of overwriting it.
// epilogue: null except on the last K block.
typedef void (*F32GemmUkernel)(size_t mr, size_t nr, size_t kc, const float* a, size_t lda,
                               const float* w, float* c, size_t ldc, bool accumulate,
                               const GemmEpilogue* epilogue);

struct F32GemmUkernelInfo {
  F32GemmUkernel fn;
  uint32_t mr;  // rows per call (max)
  uint32_t nr;  // panel width, fixed by the packing
  const char* name;
};

// One per ISA; each variant's file defines its own. Unavailable ISAs are not linked on other archs.
F32GemmUkernelInfo F32GemmUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
F32GemmUkernelInfo F32GemmUkernelAvx2();
F32GemmUkernelInfo F32GemmUkernelAvx512();
#endif

// The independent reference: a plain triple loop on unpacked, row-major B (K x N, leading dim ldb),
// accumulating in double. Slow on purpose; tests and the `reference` variant use it.
void F32GemmReference(size_t m, size_t n, size_t k, const float* a, size_t lda, const float* b,
                      size_t ldb, float* c, size_t ldc, const float* bias, int32_t activation);

}  // namespace kernels
}  // namespace sonde
