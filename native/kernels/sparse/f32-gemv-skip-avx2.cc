// AVX2 GEMV over non-zero activations: NR/8 ymm accumulators (2 for the AVX2 GEMM's 16-wide
// panels), one broadcast of x[k] and NR/8 FMAs per non-zero row; two rows in flight so the loads
// of the next row overlap the FMAs of this one.
#include <immintrin.h>

#include "kernels/sparse/gemv-skip.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMaxNr = 64;

template <size_t NV>
void Rows(size_t nr, const float* x, const uint32_t* ks, size_t nks, const float* panel, float* out) {
  __m256 acc0[NV], acc1[NV];
  for (size_t v = 0; v < NV; ++v) acc0[v] = acc1[v] = _mm256_setzero_ps();
  size_t p = 0;
  for (; p + 2 <= nks; p += 2) {
    const __m256 x0 = _mm256_broadcast_ss(x + ks[p]), x1 = _mm256_broadcast_ss(x + ks[p + 1]);
    const float* r0 = panel + static_cast<size_t>(ks[p]) * nr;
    const float* r1 = panel + static_cast<size_t>(ks[p + 1]) * nr;
    for (size_t v = 0; v < NV; ++v) {
      acc0[v] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(r0 + 8 * v), acc0[v]);
      acc1[v] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(r1 + 8 * v), acc1[v]);
    }
  }
  if (p < nks) {
    const __m256 x0 = _mm256_broadcast_ss(x + ks[p]);
    const float* r0 = panel + static_cast<size_t>(ks[p]) * nr;
    for (size_t v = 0; v < NV; ++v) acc0[v] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(r0 + 8 * v), acc0[v]);
  }
  for (size_t v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_add_ps(acc0[v], acc1[v]));
}

void F32GemvSkipAvx2(size_t nr, size_t nc, const float* x, const uint32_t* ks, size_t nks, const float* panel, float* c,
                     const GemmEpilogue* ep) {
  alignas(32) float acc[kMaxNr];
  switch (nr / 8) {
    case 1: Rows<1>(nr, x, ks, nks, panel, acc); break;
    case 2: Rows<2>(nr, x, ks, nks, panel, acc); break;
    case 4: Rows<4>(nr, x, ks, nks, panel, acc); break;
    default: Rows<8>(nr, x, ks, nks, panel, acc); break;
  }
  // The epilogue is per output column, NR of them per K non-zero rows: scalar costs nothing here.
  for (size_t j = 0; j < nc; ++j) c[j] = ep ? GemmEpilogueScalar(acc[j], 0, j, ep) : acc[j];
}

}  // namespace

F32GemvSkipUkernelInfo F32GemvSkipUkernelAvx2() { return {F32GemvSkipAvx2, 8, kMaxNr, "f32_gemv_skipzero__avx2"}; }

}  // namespace kernels
}  // namespace sonde
