// Scalar low-precision-weight GEMM: the portable fallback (and the aarch64 path) for every packed
// precision, 4x8 tiles like f32_gemm_4x8__scalar. bf16 weights are widened to fp32 and A stays fp32.
#include "kernels/gemm/lowp-gemm.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 4;
constexpr size_t kNr = 8;

inline void Store(size_t mr, size_t nr, float (*acc)[kNr], float* c, size_t ldc, const GemmEpilogue* ep) {
  for (size_t i = 0; i < mr; ++i)
    for (size_t j = 0; j < nr; ++j) c[i * ldc + j] = ep ? GemmEpilogueScalar(acc[i][j], i, j, ep) : acc[i][j];
}

void Bf16Gemm4x8Scalar(size_t mr, size_t nr, size_t k, const void* a_, size_t a_stride, const void* w_,
                       float* c, size_t ldc, const LowpGemmQuant*, const GemmEpilogue* ep) {
  const char* a = static_cast<const char*>(a_);
  const uint32_t* w = static_cast<const uint32_t*>(w_);
  float acc[kMr][kNr] = {};
  for (size_t p = 0; p < (k + 1) / 2; ++p) {
    const uint32_t* wp = w + p * kNr;
    const bool odd_tail = 2 * p + 1 == k;  // the high halves are zero padding, A has no k+1
    for (size_t i = 0; i < mr; ++i) {
      const float* ai = reinterpret_cast<const float*>(a + i * a_stride);
      const float a0 = ai[2 * p], a1 = odd_tail ? 0.0f : ai[2 * p + 1];
      for (size_t j = 0; j < kNr; ++j) {
        acc[i][j] += a0 * LowpBf16ToF32(static_cast<uint16_t>(wp[j]));
        acc[i][j] += a1 * LowpBf16ToF32(static_cast<uint16_t>(wp[j] >> 16));
      }
    }
  }
  Store(mr, nr, acc, c, ldc, ep);
}

void F16Gemm4x8Scalar(size_t mr, size_t nr, size_t k, const void* a_, size_t a_stride, const void* w_,
                      float* c, size_t ldc, const LowpGemmQuant*, const GemmEpilogue* ep) {
  const char* a = static_cast<const char*>(a_);
  const uint16_t* w = static_cast<const uint16_t*>(w_);
  float acc[kMr][kNr] = {};
  for (size_t kk = 0; kk < k; ++kk) {
    float wf[kNr];
    for (size_t j = 0; j < kNr; ++j) wf[j] = LowpF16ToF32(w[kk * kNr + j]);
    for (size_t i = 0; i < mr; ++i) {
      const float av = reinterpret_cast<const float*>(a + i * a_stride)[kk];
      for (size_t j = 0; j < kNr; ++j) acc[i][j] += av * wf[j];
    }
  }
  Store(mr, nr, acc, c, ldc, ep);
}

void Qs8Gemm4x8Scalar(size_t mr, size_t nr, size_t k, const void* a_, size_t a_stride, const void* w_,
                      float* c, size_t ldc, const LowpGemmQuant* q, const GemmEpilogue* ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_);
  const int8_t* w = static_cast<const int8_t*>(w_);
  // Unsigned arithmetic: wraps like vpdpbusd, and cannot overflow (UB) for K past kQs8MaxK.
  uint32_t acc[kMr][kNr] = {};
  const size_t kq = (k + 3) / 4 * 4;
  for (size_t kk = 0; kk < kq; ++kk) {
    const int8_t* wk = w + (kk / 4) * kNr * 4 + (kk & 3);
    for (size_t i = 0; i < mr; ++i) {
      const uint32_t av = a[i * a_stride + kk];
      for (size_t j = 0; j < kNr; ++j) acc[i][j] += av * static_cast<uint32_t>(static_cast<int32_t>(wk[j * 4]));
    }
  }
  float out[kMr][kNr];
  for (size_t i = 0; i < mr; ++i) {
    for (size_t j = 0; j < kNr; ++j) {
      const int32_t s = static_cast<int32_t>(acc[i][j] - static_cast<uint32_t>(q->a_zero[i]) * static_cast<uint32_t>(j < nr ? q->w_sum[j] : 0));
      out[i][j] = static_cast<float>(s) * (q->a_scale[i] * (j < nr ? q->w_scale[j] : 0.0f));
    }
  }
  Store(mr, nr, out, c, ldc, ep);
}

}  // namespace

LowpGemmUkernelInfo Bf16GemmUkernelScalar() { return {Bf16Gemm4x8Scalar, kMr, kNr, kLowpAF32, "bf16_gemm_4x8__scalar"}; }
LowpGemmUkernelInfo F16GemmUkernelScalar() { return {F16Gemm4x8Scalar, kMr, kNr, kLowpAF32, "f16_gemm_4x8__scalar"}; }
LowpGemmUkernelInfo Qs8GemmUkernelScalar() { return {Qs8Gemm4x8Scalar, kMr, kNr, kLowpAU8Quads, "qs8_gemm_4x8__scalar"}; }

void Qs8GemmReference(size_t m, size_t n, size_t k, const uint8_t* a, size_t lda, const float* a_scale,
                      const int32_t* a_zero, const int8_t* b, size_t ldb, const float* w_scale, float* c,
                      size_t ldc, const GemmEpilogue* ep) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < n; ++j) {
      int64_t s = 0;
      for (size_t p = 0; p < k; ++p)
        s += (static_cast<int64_t>(a[i * lda + p]) - a_zero[i]) * static_cast<int64_t>(b[p * ldb + j]);
      const float v = static_cast<float>(static_cast<double>(s) * a_scale[i] * w_scale[j]);
      c[i * ldc + j] = ep ? GemmEpilogueScalar(v, i, j, ep) : v;
    }
  }
}

}  // namespace kernels
}  // namespace sonde
