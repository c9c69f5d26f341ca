// AVX2 + FMA + F16C elementwise kernels: 8 floats per ymm, tails done with VMASKMOV (floats) or a
// bounce buffer (16-bit conversions), so a tail element goes through the same arithmetic as a full
// vector's and results do not depend on where a row is split across threads.
#include <float.h>
#include <immintrin.h>
#include <math.h>

#include "kernels/elementwise/elementwise.h"
#include "kernels/elementwise/sample-topk.h"
#include "kernels/math/vmath-avx2.h"

namespace sonde {
namespace kernels {
namespace {

using namespace avx2;  // NOLINT: the vector math shared with the GEMM epilogue

constexpr size_t kLanes = 8;

inline __m256i LaneMask(size_t n) {  // lanes [0, n) set, n in [0, 8]
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}
inline __m256i TailMask(size_t left) { return LaneMask(left >= kLanes ? kLanes : left); }

template <int32_t Op>
inline __m256 UnaryOne(__m256 x) {
  if (Op == kUnaryExp) return Exp(x);
  if (Op == kUnaryRelu) return _mm256_max_ps(_mm256_setzero_ps(), x);
  if (Op == kUnaryTanh) return Tanh(x);
  if (Op == kUnarySigmoid) return Sigmoid(x);
  // -Inf clamps to -FLT_MAX so that these give their limit -0 rather than -Inf * 0 = NaN.
  x = ClampLo(-FLT_MAX, x);
  if (Op == kUnarySilu) return _mm256_mul_ps(x, Sigmoid(x));
  if (Op == kUnaryGeluTanh) {
    const __m256 x2 = _mm256_mul_ps(x, x);
    const __m256 c = Set(0.79788456080286536f);
    const __m256 z = _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_mul_ps(c, Set(0.044715f)), x2, c));
    return _mm256_mul_ps(x, Sigmoid(_mm256_add_ps(z, z)));
  }
  const __m256 hx = _mm256_mul_ps(Set(0.5f), x);
  // hx * (1 + erf), not fma(hx, erf, hx): at x = -FLT_MAX that would cancel to +0, not -0.
  return _mm256_mul_ps(hx, _mm256_add_ps(Set(1.0f), Erf(_mm256_mul_ps(x, Set(0.70710678118654752f)))));
}

template <int32_t Op>
void UnaryLoop(size_t n, const float* x, float* y) {
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) _mm256_storeu_ps(y + i, UnaryOne<Op>(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i m = LaneMask(n - i);
    _mm256_maskstore_ps(y + i, m, UnaryOne<Op>(_mm256_maskload_ps(x + i, m)));
  }
}

void Unary(int32_t op, size_t n, const float* x, float* y) {
  switch (op) {
    case kUnaryGeluErf: return UnaryLoop<kUnaryGeluErf>(n, x, y);
    case kUnaryGeluTanh: return UnaryLoop<kUnaryGeluTanh>(n, x, y);
    case kUnarySilu: return UnaryLoop<kUnarySilu>(n, x, y);
    case kUnarySigmoid: return UnaryLoop<kUnarySigmoid>(n, x, y);
    case kUnaryTanh: return UnaryLoop<kUnaryTanh>(n, x, y);
    case kUnaryExp: return UnaryLoop<kUnaryExp>(n, x, y);
    case kUnaryRelu: return UnaryLoop<kUnaryRelu>(n, x, y);
    default: return;
  }
}

template <int32_t Op>
inline __m256 Apply(__m256 a, __m256 b) {
  if (Op == kBinaryAdd) return _mm256_add_ps(a, b);
  if (Op == kBinarySub) return _mm256_sub_ps(a, b);
  if (Op == kBinaryMul) return _mm256_mul_ps(a, b);
  return _mm256_div_ps(a, b);
}

template <int32_t Op, bool RowA, bool RowB>
void BinaryLoop(size_t n, const float* a, const float* b, float* y) {
  const __m256 va = RowA ? _mm256_setzero_ps() : Set(*a);
  const __m256 vb = RowB ? _mm256_setzero_ps() : Set(*b);
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    _mm256_storeu_ps(y + i, Apply<Op>(RowA ? _mm256_loadu_ps(a + i) : va, RowB ? _mm256_loadu_ps(b + i) : vb));
  }
  if (i < n) {
    const __m256i m = LaneMask(n - i);
    _mm256_maskstore_ps(y + i, m, Apply<Op>(RowA ? _mm256_maskload_ps(a + i, m) : va,
                                            RowB ? _mm256_maskload_ps(b + i, m) : vb));
  }
}

template <bool RowA, bool RowB>
void Binary(int32_t op, size_t n, const float* a, const float* b, float* y) {
  switch (op) {
    case kBinaryAdd: return BinaryLoop<kBinaryAdd, RowA, RowB>(n, a, b, y);
    case kBinarySub: return BinaryLoop<kBinarySub, RowA, RowB>(n, a, b, y);
    case kBinaryMul: return BinaryLoop<kBinaryMul, RowA, RowB>(n, a, b, y);
    case kBinaryDiv: return BinaryLoop<kBinaryDiv, RowA, RowB>(n, a, b, y);
    default: return;
  }
}

void BinaryVV(int32_t op, size_t n, const float* a, const float* b, float* y) { Binary<true, true>(op, n, a, b, y); }
void BinaryVS(int32_t op, size_t n, const float* a, float b, float* y) { Binary<true, false>(op, n, a, &b, y); }
void BinarySV(int32_t op, size_t n, float a, const float* b, float* y) { Binary<false, true>(op, n, &a, b, y); }

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Keeps the running max when the new value is NaN (see the AVX-512 kernel).
inline __m256 MaxSkipNan(__m256 m, __m256 v) { return _mm256_max_ps(v, m); }

// Loads lanes [0, left) and fills the rest with `fill`.
inline __m256 LoadFill(const float* p, size_t left, __m256 fill) {
  if (left >= kLanes) return _mm256_loadu_ps(p);
  const __m256i m = LaneMask(left);
  return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}

void SoftmaxRow(size_t n, const float* x, float* y) {
  const __m256 ninf = Set(-INFINITY);
  __m256 vm0 = ninf, vm1 = ninf;
  size_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    vm0 = MaxSkipNan(vm0, _mm256_loadu_ps(x + i));
    vm1 = MaxSkipNan(vm1, _mm256_loadu_ps(x + i + kLanes));
  }
  for (; i < n; i += kLanes) vm0 = MaxSkipNan(vm0, LoadFill(x + i, n - i, ninf));
  const __m256 vmax = Set(HorizontalMax(MaxSkipNan(vm0, vm1)));
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (i = 0; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const __m256 e0 = Exp(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
    const __m256 e1 = Exp(_mm256_sub_ps(_mm256_loadu_ps(x + i + kLanes), vmax));
    _mm256_storeu_ps(y + i, e0);
    _mm256_storeu_ps(y + i + kLanes, e1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
  }
  for (; i < n; i += kLanes) {
    const __m256i m = TailMask(n - i);
    const __m256 e = Exp(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), vmax));
    _mm256_maskstore_ps(y + i, m, e);
    s0 = _mm256_add_ps(s0, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
  }
  const __m256 inv = Set(1.0f / HorizontalSum(_mm256_add_ps(s0, s1)));
  for (i = 0; i < n; i += kLanes) {
    const __m256i m = TailMask(n - i);
    _mm256_maskstore_ps(y + i, m, _mm256_mul_ps(_mm256_maskload_ps(y + i, m), inv));
  }
}

void SoftmaxCols(size_t rows, size_t cols, size_t stride, const float* x, float* y) {
  for (size_t c = 0; c < cols; c += kLanes) {
    const __m256i m = TailMask(cols - c);
    __m256 vm = Set(-INFINITY);
    for (size_t r = 0; r < rows; ++r) vm = MaxSkipNan(vm, _mm256_maskload_ps(x + r * stride + c, m));
    __m256 s = _mm256_setzero_ps();
    for (size_t r = 0; r < rows; ++r) {
      const __m256 e = Exp(_mm256_sub_ps(_mm256_maskload_ps(x + r * stride + c, m), vm));
      _mm256_maskstore_ps(y + r * stride + c, m, e);
      s = _mm256_add_ps(s, e);
    }
    const __m256 inv = _mm256_div_ps(Set(1.0f), s);
    for (size_t r = 0; r < rows; ++r) {
      float* yr = y + r * stride + c;
      _mm256_maskstore_ps(yr, m, _mm256_mul_ps(_mm256_maskload_ps(yr, m), inv));
    }
  }
}

// Sum of x, or of (x - shift)^2, in four accumulators (32 floats in flight for the 4-cycle add).
template <bool Square>
inline float RowSum(size_t n, const float* x, float shift) {
  const __m256 sh = Set(shift);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  auto term = [&](__m256 v, __m256 acc) {
    return Square ? _mm256_fmadd_ps(_mm256_sub_ps(v, sh), _mm256_sub_ps(v, sh), acc) : _mm256_add_ps(acc, v);
  };
  size_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    s0 = term(_mm256_loadu_ps(x + i), s0);
    s1 = term(_mm256_loadu_ps(x + i + kLanes), s1);
    s2 = term(_mm256_loadu_ps(x + i + 2 * kLanes), s2);
    s3 = term(_mm256_loadu_ps(x + i + 3 * kLanes), s3);
  }
  // Masked-off lanes hold `shift` (Square) or 0, so they add nothing.
  for (; i < n; i += kLanes) s0 = term(LoadFill(x + i, n - i, Square ? sh : _mm256_setzero_ps()), s0);
  return HorizontalSum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

void LayerNormRow(size_t n, const float* x, const float* gamma, const float* beta, float eps, float* y) {
  const float mean = RowSum<false>(n, x, 0.0f) / static_cast<float>(n);
  const float var = RowSum<true>(n, x, mean) / static_cast<float>(n);
  const __m256 rstd = Set(1.0f / sqrtf(var + eps));
  const __m256 vmean = Set(mean);
  for (size_t i = 0; i < n; i += kLanes) {
    const __m256i m = TailMask(n - i);
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), vmean), rstd);
    if (gamma) v = _mm256_mul_ps(v, _mm256_maskload_ps(gamma + i, m));
    if (beta) v = _mm256_add_ps(v, _mm256_maskload_ps(beta + i, m));
    _mm256_maskstore_ps(y + i, m, v);
  }
}

void RmsNormRow(size_t n, const float* x, const float* gamma, float eps, float* y) {
  const __m256 r = Set(1.0f / sqrtf(RowSum<true>(n, x, 0.0f) / static_cast<float>(n) + eps));
  for (size_t i = 0; i < n; i += kLanes) {
    const __m256i m = TailMask(n - i);
    __m256 v = _mm256_mul_ps(_mm256_maskload_ps(x + i, m), r);
    if (gamma) v = _mm256_mul_ps(v, _mm256_maskload_ps(gamma + i, m));
    _mm256_maskstore_ps(y + i, m, v);
  }
}

// 8 packed results in the low 16 bits of each 32-bit lane -> 8 uint16 (values fit, so the
// unsigned-saturating pack is exact; the permute undoes its per-128-bit-lane order).
inline __m128i Narrow(__m256i v) {
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
  return _mm256_castsi256_si128(p);
}

inline __m128i F32ToBf16Vec(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return Narrow(_mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), nan)));
}

inline __m128i F32ToF16Vec(__m256 x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m256 Bf16ToF32Vec(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 F16ToF32Vec(__m128i h) { return _mm256_cvtph_ps(h); }

// The last partial vector goes through a stack buffer: there is no 16-bit masked load/store below
// AVX-512BW.
template <__m128i (*Convert)(__m256)>
void FromF32(size_t n, const float* x, uint16_t* y) {
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), Convert(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(16) uint16_t buf[kLanes];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), Convert(_mm256_maskload_ps(x + i, LaneMask(n - i))));
    for (size_t j = 0; i + j < n; ++j) y[i + j] = buf[j];
  }
}

template <__m256 (*Convert)(__m128i)>
void ToF32(size_t n, const uint16_t* x, float* y) {
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) _mm256_storeu_ps(y + i, Convert(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  if (i < n) {
    alignas(16) uint16_t buf[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (size_t j = 0; i + j < n; ++j) buf[j] = x[i + j];
    _mm256_maskstore_ps(y + i, LaneMask(n - i), Convert(_mm_load_si128(reinterpret_cast<const __m128i*>(buf))));
  }
}

// As the AVX-512 form: per lane the first index of its largest value, then the lowest index of the
// largest over the 8 lanes.
size_t SampleArgmax(size_t n, const float* x) {
  __m256 best = _mm256_set1_ps(-INFINITY);
  __m256i at = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, gt);
    at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), gt));
    idx = _mm256_add_epi32(idx, step);
  }
  alignas(32) float lane_best[8];
  alignas(32) int32_t lane_at[8];
  _mm256_store_ps(lane_best, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_at), at);
  size_t found = 0;
  float m = -INFINITY;
  for (int l = 0; l < 8; ++l)
    if (lane_best[l] > m || (lane_best[l] == m && static_cast<size_t>(lane_at[l]) < found)) m = lane_best[l], found = static_cast<size_t>(lane_at[l]);
  for (; i < n; ++i)
    if (x[i] > m) m = x[i], found = i;
  return found;
}

// Once the heap is full, 8 values at a time against its root: only the lanes above it are offered.
// As the AVX-512 kernel: 8 float exps a step, widened to double; NaN lanes zeroed; the tail
// scalar, in the same float arithmetic.
double SampleExpSum(size_t n, const float* x, float max) {
  const __m256 vmax = _mm256_set1_ps(max);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // NaN differences (a NaN value, or Inf - Inf) count 0, as the reference's e > 0 test skips them.
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vmax);
    const __m256 e = _mm256_and_ps(_mm256_cmp_ps(d, d, _CMP_ORD_Q), Exp(d));
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  double z = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  if (i < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (size_t j = i; j < n; ++j) tail[j - i] = x[j];
    const __m256 d = _mm256_sub_ps(_mm256_load_ps(tail), vmax);
    const __m256 e = _mm256_and_ps(_mm256_cmp_ps(d, d, _CMP_ORD_Q), Exp(d));
    alignas(32) float out[8];
    _mm256_store_ps(out, e);
    for (size_t j = 0; j < n - i; ++j) z += static_cast<double>(out[j]);
  }
  return z;
}

size_t SampleTopK(size_t n, const float* x, size_t k, int32_t* ids) {
  SampleTopKHeap heap(ids, x, k);
  size_t i = heap.Fill(0, n);
  for (; i + 8 <= n; i += 8) {
    for (int gt = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(heap.Root()), _CMP_GT_OQ)); gt;
         gt &= gt - 1)
      heap.Offer(static_cast<int32_t>(i + static_cast<size_t>(__builtin_ctz(static_cast<unsigned>(gt)))));
  }
  heap.OfferRange(i, n);
  return heap.Finish();
}

}  // namespace

ElementwiseUkernels ElementwiseUkernelsAvx2() {
  return {"f32_elementwise__avx2", BinaryVV, BinaryVS, BinarySV, Unary, SoftmaxRow, SoftmaxCols,
          LayerNormRow, RmsNormRow, FromF32<F32ToBf16Vec>, ToF32<Bf16ToF32Vec>, FromF32<F32ToF16Vec>,
          ToF32<F16ToF32Vec>, SampleArgmax, SampleTopK, SampleExpSum};
}

}  // namespace kernels
}  // namespace sonde
