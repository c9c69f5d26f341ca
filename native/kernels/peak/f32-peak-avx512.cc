// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h for _mm512_setzero_ps/masked loads.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/peak/peak.h"

namespace sonde {
namespace kernels {

double F32FmaPeakAvx512(uint64_t iters, float* sink) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_set1_ps(static_cast<float>(j));
  const __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
  for (uint64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(acc[j], x, y);
  }
  __m512 s = acc[0];
  for (int j = 1; j < 16; ++j) s = _mm512_add_ps(s, acc[j]);
  float out[16];
  _mm512_storeu_ps(out, s);
  *sink = out[0] + out[15];
  return static_cast<double>(iters) * 16 * 16 * 2;
}

}  // namespace kernels
}  // namespace sonde
