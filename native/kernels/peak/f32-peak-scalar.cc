#include "kernels/peak/peak.h"

namespace sonde {
namespace kernels {

double F32FmaPeakScalar(uint64_t iters, float* sink) {
  float acc[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  const float x = 0.999999f, y = 1e-7f;
  for (uint64_t i = 0; i < iters; ++i)
    for (int j = 0; j < 8; ++j) acc[j] = acc[j] * x + y;
  float s = 0;
  for (float v : acc) s += v;
  *sink = s;
  return static_cast<double>(iters) * 8 * 2;
}

float F32ReadSumScalar(const float* p, size_t n) {
  float s[4] = {0, 0, 0, 0};
  for (size_t i = 0; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += p[i + j];
  return s[0] + s[1] + s[2] + s[3];
}

}  // namespace kernels
}  // namespace sonde
