#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 4;
constexpr size_t kNr = 8;

void F32Gemm4x8Scalar(size_t mr, size_t nr, size_t kc, const float* a, size_t lda, const float* w,
                      float* c, size_t ldc, bool accumulate, const GemmEpilogue* ep) {
  float acc[kMr][kNr] = {};
  for (size_t k = 0; k < kc; ++k) {
    const float* wk = w + k * kNr;
    for (size_t i = 0; i < mr; ++i) {
      float av = a[i * lda + k];
      for (size_t j = 0; j < kNr; ++j) acc[i][j] += av * wk[j];
    }
  }
  for (size_t i = 0; i < mr; ++i) {
    float* ci = c + i * ldc;
    for (size_t j = 0; j < nr; ++j) {
      float v = acc[i][j] + (accumulate ? ci[j] : 0.0f);
      ci[j] = ep ? GemmEpilogueScalar(v, i, j, ep) : v;
    }
  }
}

}  // namespace

F32GemmUkernelInfo F32GemmUkernelScalar() { return {F32Gemm4x8Scalar, kMr, kNr, "f32_gemm_4x8__scalar", nullptr, {}}; }

void F32GemmReference(size_t m, size_t n, size_t k, const float* a, size_t lda, const float* b,
                      size_t ldb, float* c, size_t ldc, const GemmEpilogue* ep) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (size_t p = 0; p < k; ++p) s += static_cast<double>(a[i * lda + p]) * b[p * ldb + j];
      c[i * ldc + j] = ep ? GemmEpilogueScalar(static_cast<float>(s), i, j, ep) : static_cast<float>(s);
    }
  }
}

}  // namespace kernels
}  // namespace sonde
