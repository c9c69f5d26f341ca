// Scalar elementwise kernels, in two precisions from one template: T = double is the reference
// (every intermediate in double, one rounding at the end), T = float is the portable production
// path. Also the exact bit-level conversions, argmax and top-k, which every ISA table shares.
#include <float.h>
#include <math.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "kernels/elementwise/elementwise.h"
#include "kernels/elementwise/sample-topk.h"

namespace sonde {
namespace kernels {
namespace {

inline float Exp(float x) { return expf(x); }
inline double Exp(double x) { return exp(x); }
inline float Tanh(float x) { return tanhf(x); }
inline double Tanh(double x) { return tanh(x); }

// -Inf is clamped to -FLT_MAX where an activation would otherwise form -Inf * 0 = NaN: silu and
// gelu tend to -0 there. The comparison leaves NaN untouched.
template <typename T>
inline T ClampNegInf(T x) { return x < -FLT_MAX ? static_cast<T>(-FLT_MAX) : x; }

template <typename T>
inline T GeluErf(T x);
template <>
inline float GeluErf(float x) {
  x = ClampNegInf(x);
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}
template <>
inline double GeluErf(double x) {
  // erfc keeps full relative accuracy in the negative tail, where 1 + erf cancels.
  x = ClampNegInf(x);
  return 0.5 * x * erfc(-x * 0.70710678118654752);
}

// exp(-|x|) never overflows: for x < 0, e / (1 + e) keeps full relative accuracy down to where e
// itself becomes subnormal, where 1 / (1 + exp(-x)) would already have given 0.
template <typename T>
inline T Sigmoid(T x) {
  const T e = Exp(-std::fabs(x));
  return (x >= 0 ? 1 : e) / (1 + e);
}

template <typename T>
inline T Silu(T x) {
  x = ClampNegInf(x);
  return x * Sigmoid(x);
}

// 0.5 (1 + tanh z) = sigmoid(2z): no cancellation in the negative tail.
template <typename T>
inline T GeluTanh(T x) {
  x = ClampNegInf(x);
  const T z = static_cast<T>(0.79788456080286536) * (x + static_cast<T>(0.044715) * x * x * x);
  return x * Sigmoid(2 * z);
}

// NaN stays NaN (the comparison is false), -0 stays -0, as with the SIMD max(0, x).
template <typename T>
inline T Relu(T x) { return x < 0 ? 0 : x; }

template <typename T, int32_t Op>
void UnaryLoop(size_t n, const float* x, float* y) {
  for (size_t i = 0; i < n; ++i) {
    const T v = x[i];
    T r;
    if (Op == kUnaryGeluErf) r = GeluErf(v);
    else if (Op == kUnaryGeluTanh) r = GeluTanh(v);
    else if (Op == kUnarySilu) r = Silu(v);
    else if (Op == kUnarySigmoid) r = Sigmoid(v);
    else if (Op == kUnaryTanh) r = Tanh(v);
    else if (Op == kUnaryExp) r = Exp(v);
    else r = Relu(v);
    y[i] = static_cast<float>(r);
  }
}

template <typename T>
void Unary(int32_t op, size_t n, const float* x, float* y) {
  switch (op) {
    case kUnaryGeluErf: return UnaryLoop<T, kUnaryGeluErf>(n, x, y);
    case kUnaryGeluTanh: return UnaryLoop<T, kUnaryGeluTanh>(n, x, y);
    case kUnarySilu: return UnaryLoop<T, kUnarySilu>(n, x, y);
    case kUnarySigmoid: return UnaryLoop<T, kUnarySigmoid>(n, x, y);
    case kUnaryTanh: return UnaryLoop<T, kUnaryTanh>(n, x, y);
    case kUnaryExp: return UnaryLoop<T, kUnaryExp>(n, x, y);
    case kUnaryRelu: return UnaryLoop<T, kUnaryRelu>(n, x, y);
    default: return;
  }
}

// Binary ops are one float operation each, exactly rounded, so one version serves both tables.
inline float Apply(int32_t op, float a, float b) {
  switch (op) {
    case kBinaryAdd: return a + b;
    case kBinarySub: return a - b;
    case kBinaryMul: return a * b;
    default: return a / b;
  }
}

void BinaryVV(int32_t op, size_t n, const float* a, const float* b, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = Apply(op, a[i], b[i]);
}
void BinaryVS(int32_t op, size_t n, const float* a, float b, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = Apply(op, a[i], b);
}
void BinarySV(int32_t op, size_t n, float a, const float* b, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = Apply(op, a, b[i]);
}

// Max that skips NaN: a NaN input makes its own exp term NaN, so the whole row still comes out
// NaN through the sum, whichever variant runs.
template <typename T>
inline T MaxSkipNan(T m, T v) { return v > m ? v : m; }

void SoftmaxRowReference(size_t n, const float* x, float* y) {
  double m = -INFINITY;
  for (size_t i = 0; i < n; ++i) m = MaxSkipNan<double>(m, x[i]);
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += exp(x[i] - m);
  for (size_t i = 0; i < n; ++i) y[i] = static_cast<float>(exp(x[i] - m) / s);
}

void SoftmaxRowScalar(size_t n, const float* x, float* y) {
  float m = -INFINITY;
  for (size_t i = 0; i < n; ++i) m = MaxSkipNan(m, x[i]);
  float s = 0;
  for (size_t i = 0; i < n; ++i) s += (y[i] = expf(x[i] - m));
  const float r = 1.0f / s;
  for (size_t i = 0; i < n; ++i) y[i] *= r;
}

template <typename T>
void SoftmaxCols(size_t rows, size_t cols, size_t stride, const float* x, float* y) {
  for (size_t c = 0; c < cols; ++c) {
    T m = -INFINITY;
    for (size_t r = 0; r < rows; ++r) m = MaxSkipNan<T>(m, x[r * stride + c]);
    T s = 0;
    for (size_t r = 0; r < rows; ++r) s += Exp(static_cast<T>(x[r * stride + c]) - m);
    for (size_t r = 0; r < rows; ++r)
      y[r * stride + c] = static_cast<float>(Exp(static_cast<T>(x[r * stride + c]) - m) / s);
  }
}

// Two passes (mean, then squared deviations): no cancellation, unlike E[x^2] - E[x]^2.
template <typename T>
void LayerNormRow(size_t n, const float* x, const float* gamma, const float* beta, float eps, float* y) {
  T s = 0;
  for (size_t i = 0; i < n; ++i) s += x[i];
  const T mean = s / static_cast<T>(n);
  T ss = 0;
  for (size_t i = 0; i < n; ++i) {
    const T d = x[i] - mean;
    ss += d * d;
  }
  const T rstd = 1 / std::sqrt(ss / static_cast<T>(n) + static_cast<T>(eps));
  for (size_t i = 0; i < n; ++i) {
    T v = (x[i] - mean) * rstd;
    if (gamma) v *= gamma[i];
    if (beta) v += beta[i];
    y[i] = static_cast<float>(v);
  }
}

template <typename T>
void RmsNormRow(size_t n, const float* x, const float* gamma, float eps, float* y) {
  T ss = 0;
  for (size_t i = 0; i < n; ++i) ss += static_cast<T>(x[i]) * x[i];
  const T r = 1 / std::sqrt(ss / static_cast<T>(n) + static_cast<T>(eps));
  for (size_t i = 0; i < n; ++i) {
    T v = x[i] * r;
    if (gamma) v *= gamma[i];
    y[i] = static_cast<float>(v);
  }
}

inline uint32_t Bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float FromBits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even on the 16 dropped bits. NaN is quietened (bit 6 of the result) so that a
// signalling NaN whose payload sits only in the dropped bits cannot become Inf.
uint16_t F32ToBf16One(float f) {
  const uint32_t u = Bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// F. Giesen's float_to_half_fast3_rtne: subnormal results are rounded by the FPU itself (adding a
// magic number puts the half's ulp at the float's ulp), normal results by integer rounding; both
// round to nearest even, and a carry out of the top binade gives Inf. NaN keeps its top 10 payload
// bits and is quietened, bit-for-bit what F16C's VCVTPS2PH produces.
uint16_t F32ToF16One(float f) {
  uint32_t u = Bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  uint32_t h;
  if (u >= 0x47800000u) {  // >= 65536 (rounds to Inf), Inf or NaN
    h = u > 0x7F800000u ? 0x7E00u | ((u >> 13) & 0x3FFu) : 0x7C00u;
  } else if (u < 0x38800000u) {  // below 2^-14: a float16 subnormal or zero
    const uint32_t magic = (127 - 15 + 23 - 10 + 1) << 23;
    h = Bits(FromBits(u) + FromBits(magic)) - magic;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + odd;
    h = u >> 13;
  }
  return static_cast<uint16_t>(h | sign);
}

float F16ToF32One(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t exp = u & (0x7C00u << 13);
  u += static_cast<uint32_t>(127 - 15) << 23;
  if (exp == (0x7C00u << 13)) {
    u += static_cast<uint32_t>(128 - 16) << 23;  // Inf / NaN
    if (h & 0x3FFu) u |= 0x00400000u;            // quiet a signalling NaN, as VCVTPH2PS does
  } else if (exp == 0) {
    u += 1u << 23;  // zero / subnormal: renormalise through an exact float subtraction
    u = Bits(FromBits(u) - FromBits(113u << 23));
  }
  return FromBits(u | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

void F32ToBf16(size_t n, const float* x, uint16_t* y) {
  for (size_t i = 0; i < n; ++i) y[i] = F32ToBf16One(x[i]);
}
void Bf16ToF32(size_t n, const uint16_t* x, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = FromBits(static_cast<uint32_t>(x[i]) << 16);
}
void F32ToF16(size_t n, const float* x, uint16_t* y) {
  for (size_t i = 0; i < n; ++i) y[i] = F32ToF16One(x[i]);
}
void F16ToF32(size_t n, const uint16_t* x, float* y) {
  for (size_t i = 0; i < n; ++i) y[i] = F16ToF32One(x[i]);
}

// NaN above every number, so that ordering is total (NaNs compare equal among themselves).
inline bool Greater(float p, float q) { return (isnan(p) && !isnan(q)) || p > q; }

size_t SampleArgmax(size_t n, const float* x) {
  size_t best = 0;
  float m = -INFINITY;
  for (size_t i = 0; i < n; ++i)
    if (x[i] > m) m = x[i], best = i;
  return best;
}

size_t SampleTopK(size_t n, const float* x, size_t k, int32_t* ids) {
  SampleTopKHeap heap(ids, x, k);
  heap.OfferRange(0, n);
  return heap.Finish();
}

// T: the precision of the difference and exp (double: the reference, as lib/llm/sampling.ts sums).
template <typename T>
double SampleExpSum(size_t n, const float* x, float max) {
  double z = 0;
  for (size_t i = 0; i < n; ++i) {
    const T e = std::exp(static_cast<T>(x[i]) - static_cast<T>(max));
    if (e > 0) z += static_cast<double>(e);  // NaN is not > 0
  }
  return z;
}

}  // namespace

ElementwiseUkernels ElementwiseUkernelsReference() {
  return {"f32_elementwise__reference", BinaryVV, BinaryVS, BinarySV, Unary<double>,
          SoftmaxRowReference, SoftmaxCols<double>, LayerNormRow<double>, RmsNormRow<double>,
          F32ToBf16, Bf16ToF32, F32ToF16, F16ToF32, SampleArgmax, SampleTopK, SampleExpSum<double>};
}

ElementwiseUkernels ElementwiseUkernelsScalar() {
  return {"f32_elementwise__scalar", BinaryVV, BinaryVS, BinarySV, Unary<float>,
          SoftmaxRowScalar, SoftmaxCols<float>, LayerNormRow<float>, RmsNormRow<float>,
          F32ToBf16, Bf16ToF32, F32ToF16, F16ToF32, SampleArgmax, SampleTopK, SampleExpSum<float>};
}

size_t F32SampleRank(size_t n, const float* x, int32_t* ids, uint32_t* scratch) {
  // Keys ascending = values descending: the value's bits made order-preserving, then inverted.
  // Candidates enter in increasing id, and every pass is stable, so equal keys keep that order.
  uint32_t* keys = scratch;
  uint32_t* keys2 = scratch + n;
  int32_t* ids2 = reinterpret_cast<int32_t*>(scratch + 2 * n);
  size_t m = 0;
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i] + 0.0f;  // -0 ranks with +0
    if (v != v) continue;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    keys[m] = ~((bits & 0x80000000u) ? ~bits : (bits | 0x80000000u));
    ids[m++] = static_cast<int32_t>(i);
  }
  // Four passes of 8 bits, the buffers swapping roles each pass: an even count, so the result
  // ends in ids (8-bit digits measured faster here than three of 11: fewer scatter targets).
  uint32_t* kin = keys;
  uint32_t* kout = keys2;
  int32_t* iin = ids;
  int32_t* iout = ids2;
  for (int shift = 0; shift < 32; shift += 8) {
    size_t count[257] = {};
    for (size_t i = 0; i < m; ++i) ++count[((kin[i] >> shift) & 0xFF) + 1];
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (size_t i = 0; i < m; ++i) {
      const size_t at = count[(kin[i] >> shift) & 0xFF]++;
      kout[at] = kin[i];
      iout[at] = iin[i];
    }
    std::swap(kin, kout);
    std::swap(iin, iout);
  }
  return m;
}

int64_t F32ArgmaxStrided(size_t n, size_t stride, const float* x) {
  size_t best = 0;
  float m = x[0];
  for (size_t i = 1; i < n; ++i) {
    const float v = x[i * stride];
    if (Greater(v, m)) {
      m = v;
      best = i;
    }
  }
  return static_cast<int64_t>(best);
}

void F32TopKStrided(size_t n, size_t stride, const float* x, size_t k, bool largest,
                    size_t* scratch, float* values, int64_t* indices, size_t out_stride) {
  for (size_t i = 0; i < n; ++i) scratch[i] = i;
  // The index breaks ties, which makes the order total: the result is deterministic and stable.
  auto first = [&](size_t a, size_t b) {
    const float va = x[a * stride], vb = x[b * stride];
    if (largest ? Greater(va, vb) : Greater(vb, va)) return true;
    if (largest ? Greater(vb, va) : Greater(va, vb)) return false;
    return a < b;
  };
  std::partial_sort(scratch, scratch + k, scratch + n, first);
  for (size_t j = 0; j < k; ++j) {
    values[j * out_stride] = x[scratch[j] * stride];
    indices[j * out_stride] = static_cast<int64_t>(scratch[j]);
  }
}

}  // namespace kernels
}  // namespace sonde
