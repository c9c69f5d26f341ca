// AVX-512 VNNI q8_0 / q4_0 dot products: one vpdpbusd per pair of blocks and activation row (see
// quant-avx512.h). Float weight types have no VNNI kernel (the avx512 ones serve them).
#include "kernels/quant/quant-avx512.h"

namespace sonde {
namespace kernels {

QuantDotUkernelInfo QuantDotUkernelAvx512Vnni(int32_t type) {
  switch (type) {
    case kQuantQ8_0: return {BlockDot<kQuantQ8_0, true>, kQuantActQ8Corr, 128, "q8_0_qs8_dot_4xk__avx512vnni"};
    case kQuantQ4_0: return {BlockDot<kQuantQ4_0, true>, kQuantActQ8Corr, 8, "q4_0_qs8_dot_4xk__avx512vnni"};
    default: return {nullptr, 0, 0, "?"};
  }
}

}  // namespace kernels
}  // namespace sonde
