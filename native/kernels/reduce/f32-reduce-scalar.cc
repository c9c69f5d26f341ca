#include <math.h>

#include "kernels/reduce/reduce.h"

namespace sonde {
namespace kernels {
namespace {

// Eight partials: independent dependency chains, so the adds pipeline.
float MaxScalar(size_t n, const float* x) {
  float m[8];
  bool nan = false;
  for (float& v : m) v = -INFINITY;
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t l = 0; l < 8; ++l) {
      const float v = x[i + l];
      m[l] = v > m[l] ? v : m[l];
      nan |= v != v;
    }
  for (; i < n; ++i) {
    m[0] = x[i] > m[0] ? x[i] : m[0];
    nan |= x[i] != x[i];
  }
  float best = m[0];
  for (size_t l = 1; l < 8; ++l) best = m[l] > best ? m[l] : best;
  return nan ? NAN : best;
}

float SumScalar(size_t n, const float* x) {
  float s[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t l = 0; l < 8; ++l) s[l] += x[i + l];
  for (; i < n; ++i) s[0] += x[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

float DotScalar(size_t n, const float* x, const float* y) {
  float s[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t l = 0; l < 8; ++l) s[l] += x[i + l] * y[i + l];
  for (; i < n; ++i) s[0] += x[i] * y[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

void AxpyScalar(size_t n, float a, const float* x, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

ReduceUkernels ReduceUkernelsScalar() { return {"scalar", MaxScalar, SumScalar, DotScalar, AxpyScalar}; }

}  // namespace kernels
}  // namespace sonde
