// Scalar GEMV over non-zero activations (float sums in k order; the SIMD variants keep two partial
// sums, so they agree with it to rounding).
#include "kernels/sparse/gemv-skip.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMaxNr = 64;

void F32GemvSkipScalar(size_t nr, size_t nc, const float* x, const uint32_t* ks, size_t nks, const float* panel,
                       float* c, const GemmEpilogue* ep) {
  float acc[kMaxNr] = {};
  for (size_t p = 0; p < nks; ++p) {
    const float xk = x[ks[p]];
    const float* row = panel + static_cast<size_t>(ks[p]) * nr;
    for (size_t j = 0; j < nc; ++j) acc[j] += xk * row[j];
  }
  for (size_t j = 0; j < nc; ++j) c[j] = ep ? GemmEpilogueScalar(acc[j], 0, j, ep) : acc[j];
}

}  // namespace

F32GemvSkipUkernelInfo F32GemvSkipUkernelScalar() { return {F32GemvSkipScalar, 1, kMaxNr, "f32_gemv_skipzero__scalar"}; }

}  // namespace kernels
}  // namespace sonde
