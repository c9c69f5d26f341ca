#include "kernels/transpose/transpose.h"

namespace sonde {
namespace kernels {
namespace {

// Blocks of 8 x 8: the 8 lines read and the 8 lines written stay in L1, so each line is fetched
// once instead of once per element.
void TransposeScalar(size_t rows, size_t cols, const uint32_t* x, ptrdiff_t ldx, uint32_t* y, ptrdiff_t ldy) {
  constexpr size_t kBlock = 8;
  for (size_t i0 = 0; i0 < rows; i0 += kBlock) {
    const size_t i1 = i0 + kBlock < rows ? i0 + kBlock : rows;
    for (size_t j0 = 0; j0 < cols; j0 += kBlock) {
      const size_t j1 = j0 + kBlock < cols ? j0 + kBlock : cols;
      for (size_t j = j0; j < j1; ++j) {
        uint32_t* yr = y + static_cast<ptrdiff_t>(j) * ldy;
        for (size_t i = i0; i < i1; ++i) yr[i] = x[static_cast<ptrdiff_t>(i) * ldx + static_cast<ptrdiff_t>(j)];
      }
    }
  }
}

}  // namespace

X32TransposeUkernel X32TransposeScalar() { return TransposeScalar; }

}  // namespace kernels
}  // namespace sonde
