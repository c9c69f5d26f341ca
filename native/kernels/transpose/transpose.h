// 32-bit 2-D transpose: y[j * ldy + i] = x[i * ldx + j] for i < rows, j < cols (strides in
// elements, either sign). Serves the strided copies of Transpose (ops/tensor_ops.cc) and the packing
// of a transposed B for batched MatMul (attention's K stored [n][k]). Bits are moved, never
// converted, so any 4-byte type goes through. Pure functions; only C headers here.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

typedef void (*X32TransposeUkernel)(size_t rows, size_t cols, const uint32_t* x, ptrdiff_t ldx, uint32_t* y,
                                    ptrdiff_t ldy);

X32TransposeUkernel X32TransposeScalar();
#if defined(__x86_64__) || defined(_M_X64)
// 8 x 8 blocks in AVX registers; the AVX-512 level runs it too (no 16 x 16 form yet).
X32TransposeUkernel X32TransposeAvx2();
#endif

}  // namespace kernels
}  // namespace sonde
