// AVX-512 GEMV over non-zero activations: NR/16 zmm accumulators (2 for the AVX-512 GEMM's
// 32-wide panels), two non-zero rows in flight.
#include <immintrin.h>

#include "kernels/sparse/gemv-skip.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMaxNr = 128;

template <size_t NV>
void Rows(size_t nr, const float* x, const uint32_t* ks, size_t nks, const float* panel, float* out) {
  __m512 acc0[NV], acc1[NV];
  for (size_t v = 0; v < NV; ++v) acc0[v] = acc1[v] = _mm512_setzero_ps();
  size_t p = 0;
  for (; p + 2 <= nks; p += 2) {
    const __m512 x0 = _mm512_set1_ps(x[ks[p]]), x1 = _mm512_set1_ps(x[ks[p + 1]]);
    const float* r0 = panel + static_cast<size_t>(ks[p]) * nr;
    const float* r1 = panel + static_cast<size_t>(ks[p + 1]) * nr;
    for (size_t v = 0; v < NV; ++v) {
      acc0[v] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(r0 + 16 * v), acc0[v]);
      acc1[v] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(r1 + 16 * v), acc1[v]);
    }
  }
  if (p < nks) {
    const __m512 x0 = _mm512_set1_ps(x[ks[p]]);
    const float* r0 = panel + static_cast<size_t>(ks[p]) * nr;
    for (size_t v = 0; v < NV; ++v) acc0[v] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(r0 + 16 * v), acc0[v]);
  }
  for (size_t v = 0; v < NV; ++v) _mm512_storeu_ps(out + 16 * v, _mm512_add_ps(acc0[v], acc1[v]));
}

void F32GemvSkipAvx512(size_t nr, size_t nc, const float* x, const uint32_t* ks, size_t nks, const float* panel,
                       float* c, const GemmEpilogue* ep) {
  alignas(64) float acc[kMaxNr];
  switch (nr / 16) {
    case 1: Rows<1>(nr, x, ks, nks, panel, acc); break;
    case 2: Rows<2>(nr, x, ks, nks, panel, acc); break;
    case 4: Rows<4>(nr, x, ks, nks, panel, acc); break;
    default: Rows<8>(nr, x, ks, nks, panel, acc); break;
  }
  for (size_t j = 0; j < nc; ++j) c[j] = ep ? GemmEpilogueScalar(acc[j], 0, j, ep) : acc[j];
}

}  // namespace

F32GemvSkipUkernelInfo F32GemvSkipUkernelAvx512() { return {F32GemvSkipAvx512, 16, kMaxNr, "f32_gemv_skipzero__avx512"}; }

}  // namespace kernels
}  // namespace sonde
