// Scalar quantised-weight dot products (the portable fallback and the 'scalar' variant), the
// activation quantiser shared by every variant (one definition, so SIMD and reference see the same
// int8 activations), dequantisation and the exact reference.
#include <float.h>
#include <math.h>
#include <string.h>

#include "kernels/gemm/lowp-gemm.h"
#include "kernels/quant/quant.h"

namespace sonde {
namespace kernels {

namespace {

// Threshold of the precision definition: below it a block's activations count as zero.
const float kTinyAmax = 7.52316384526264e-37f;  // 2^-120

template <int32_t T>
float WeightAt(const uint8_t* w, size_t i) {
  if (T == kQuantF32) {
    float v;
    memcpy(&v, w + 4 * i, 4);
    return v;
  }
  if (T == kQuantF16) return LowpF16ToF32(QuantLoadU16(w + 2 * i));
  return LowpBf16ToF32(QuantLoadU16(w + 2 * i));
}

template <int32_t T>
void FloatDot(size_t mr, size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  for (size_t i = 0; i < mr; ++i) {
    const float* x = a->x + i * a->ldx;
    float acc = 0.0f;
    for (size_t p = 0; p < k; ++p) acc += x[p] * WeightAt<T>(w, p);
    y[i * ldy] = acc;
  }
}

// Decodes block b of a q8_0 / q4_0 row to 32 int8 values and its fp32 scale.
template <int32_t T>
float DecodeBlock(const uint8_t* w, size_t b, int8_t* q) {
  if (T == kQuantQ8_0) {
    const uint8_t* blk = w + b * kQ8_0BlockBytes;
    memcpy(q, blk + 2, 32);
    return LowpF16ToF32(QuantLoadU16(blk));
  }
  const uint8_t* blk = w + b * kQ4_0BlockBytes;
  for (size_t j = 0; j < 16; ++j) {
    q[j] = static_cast<int8_t>((blk[2 + j] & 0x0F) - 8);
    q[j + 16] = static_cast<int8_t>((blk[2 + j] >> 4) - 8);
  }
  return LowpF16ToF32(QuantLoadU16(blk));
}

template <int32_t T>
void BlockDot(size_t mr, size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy) {
  float acc[kQuantMaxMr] = {0, 0, 0, 0};
  int8_t wq[32];
  for (size_t b = 0; b < k / kQuantBlock; ++b) {
    const float dw = DecodeBlock<T>(w, b, wq);
    for (size_t i = 0; i < mr; ++i) {
      const int8_t* xq = a->q + i * a->q_stride + b * kQuantBlock;
      int32_t isum = 0;
      for (size_t j = 0; j < 32; ++j) isum += static_cast<int32_t>(wq[j]) * xq[j];
      acc[i] += (dw * a->d[i * a->d_stride + b]) * static_cast<float>(isum);
    }
  }
  for (size_t i = 0; i < mr; ++i) y[i * ldy] = acc[i];
}

}  // namespace

QuantDotUkernelInfo QuantDotUkernelScalar(int32_t type) {
  switch (type) {
    case kQuantF32: return {FloatDot<kQuantF32>, kQuantActF32, 0, "f32_dot_1xk__scalar"};
    case kQuantF16: return {FloatDot<kQuantF16>, kQuantActF32, 0, "f16_dot_1xk__scalar"};
    case kQuantBf16: return {FloatDot<kQuantBf16>, kQuantActF32, 0, "bf16_dot_1xk__scalar"};
    case kQuantQ8_0: return {BlockDot<kQuantQ8_0>, kQuantActQ8, 0, "q8_0_qs8_dot_1xk__scalar"};
    case kQuantQ4_0: return {BlockDot<kQuantQ4_0>, kQuantActQ8, 0, "q4_0_qs8_dot_1xk__scalar"};
    default: return {nullptr, 0, 0, "?"};
  }
}

void QuantizeActivationRow(const float* x, size_t k, int8_t* q, float* d, int32_t* sums) {
  const size_t nb = k / kQuantBlock, nb_pad = (nb + 1) & ~static_cast<size_t>(1);
  for (size_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQuantBlock;
    int8_t* qb = q + b * kQuantBlock;
    float amax = 0.0f;
    bool finite = true;
    for (size_t j = 0; j < kQuantBlock; ++j) {
      const float v = fabsf(xb[j]);
      if (!(v <= FLT_MAX)) finite = false;  // NaN or Inf
      amax = v > amax ? v : amax;
    }
    int32_t s = 0;
    if (!finite || amax < kTinyAmax) {
      memset(qb, 0, kQuantBlock);
      d[b] = finite ? 0.0f : NAN;
    } else {
      const float id = 127.0f / amax;
      d[b] = amax / 127.0f;
      for (size_t j = 0; j < kQuantBlock; ++j) {
        // rint under the default rounding mode: nearest, ties to even (roundss with SSE4.1).
        const int32_t v = static_cast<int32_t>(nearbyintf(xb[j] * id));
        qb[j] = static_cast<int8_t>(v);
        s += v;
      }
    }
    if (sums) sums[b] = s;
  }
  for (size_t b = nb; b < nb_pad; ++b) {
    memset(q + b * kQuantBlock, 0, kQuantBlock);
    d[b] = 0.0f;
    if (sums) sums[b] = 0;
  }
}

void DequantizeRow(int32_t type, const uint8_t* w, size_t k, float* out) {
  int8_t q[32];
  switch (type) {
    case kQuantF32: memcpy(out, w, k * 4); return;
    case kQuantF16: for (size_t i = 0; i < k; ++i) out[i] = WeightAt<kQuantF16>(w, i); return;
    case kQuantBf16: for (size_t i = 0; i < k; ++i) out[i] = WeightAt<kQuantBf16>(w, i); return;
    case kQuantQ8_0:
      for (size_t b = 0; b < k / 32; ++b) {
        const float dw = DecodeBlock<kQuantQ8_0>(w, b, q);
        for (size_t j = 0; j < 32; ++j) out[b * 32 + j] = dw * q[j];  // |q| <= 128: exact in fp32
      }
      return;
    case kQuantQ4_0:
      for (size_t b = 0; b < k / 32; ++b) {
        const float dw = DecodeBlock<kQuantQ4_0>(w, b, q);
        for (size_t j = 0; j < 32; ++j) out[b * 32 + j] = dw * q[j];
      }
      return;
    default: return;
  }
}

void RepackQ8_0x32Group(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, uint8_t* out) {
  const size_t nb = k / kQuantBlock;
  // Row by row: the group's source rows are one contiguous run, read in order (32 rows side by
  // side would be 32 short streams), while the scattered 4-byte writes stay within the group's
  // 32 * row_bytes bytes, a few tens of KiB that stay in L1/L2.
  for (size_t r = 0; r < kQ8_0x32Rows; ++r) {
    const uint8_t* row = w + r * row_bytes;
    for (size_t b = 0; b < nb; ++b) {
      uint8_t* dst = out + b * kQ8_0x32BlockBytes;
      const uint8_t* blk = row + b * kQ8_0BlockBytes;
      if (r < nr) {
        memcpy(dst + 2 * r, blk, 2);
      } else {
        dst[2 * r] = dst[2 * r + 1] = 0;
      }
      for (size_t g = 0; g < 8; ++g) {
        // Flipping the sign bit of each byte is + 128: the unsigned operand of vpdpbusd.
        uint32_t v = 0;
        if (r < nr) memcpy(&v, blk + 2 + 4 * g, 4);
        v ^= 0x80808080u;
        memcpy(dst + 64 + g * 128 + 4 * r, &v, 4);
      }
    }
  }
}

double QuantDotReference(int32_t type, const uint8_t* w, size_t k, const float* x, const int8_t* q, const float* d) {
  double acc = 0.0;
  if (type == kQuantF32 || type == kQuantF16 || type == kQuantBf16) {
    for (size_t p = 0; p < k; ++p) {
      const float wv = type == kQuantF32 ? WeightAt<kQuantF32>(w, p)
                       : type == kQuantF16 ? WeightAt<kQuantF16>(w, p) : WeightAt<kQuantBf16>(w, p);
      acc += static_cast<double>(x[p]) * wv;
    }
    return acc;
  }
  // Dequantise both sides (exact in double) and take the double dot: sum_b dw dx isum_b.
  int8_t wq[32];
  for (size_t b = 0; b < k / kQuantBlock; ++b) {
    const float dw = type == kQuantQ8_0 ? DecodeBlock<kQuantQ8_0>(w, b, wq) : DecodeBlock<kQuantQ4_0>(w, b, wq);
    int64_t isum = 0;
    for (size_t j = 0; j < 32; ++j) isum += static_cast<int64_t>(wq[j]) * q[b * kQuantBlock + j];
    acc += static_cast<double>(dw) * static_cast<double>(d[b]) * static_cast<double>(isum);
  }
  return acc;
}

}  // namespace kernels
}  // namespace sonde
