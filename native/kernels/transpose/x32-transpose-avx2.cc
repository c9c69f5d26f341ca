#include <immintrin.h>

#include "kernels/transpose/transpose.h"

namespace sonde {
namespace kernels {
namespace {

// One 8 x 8 block: 8 row loads, 24 shuffles (unpack, shufps, vperm2f128), 8 column stores.
inline void Block8x8(const uint32_t* x, ptrdiff_t ldx, uint32_t* y, ptrdiff_t ldy) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(x + i * ldx));
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  float* yf = reinterpret_cast<float*>(y);
  _mm256_storeu_ps(yf + 0 * ldy, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(yf + 1 * ldy, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(yf + 2 * ldy, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(yf + 3 * ldy, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(yf + 4 * ldy, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(yf + 5 * ldy, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(yf + 6 * ldy, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(yf + 7 * ldy, _mm256_permute2f128_ps(u3, u7, 0x31));
}

void TransposeAvx2(size_t rows, size_t cols, const uint32_t* x, ptrdiff_t ldx, uint32_t* y, ptrdiff_t ldy) {
  const size_t rows8 = rows & ~size_t{7}, cols8 = cols & ~size_t{7};
  for (size_t i0 = 0; i0 < rows8; i0 += 8)
    for (size_t j0 = 0; j0 < cols8; j0 += 8)
      Block8x8(x + static_cast<ptrdiff_t>(i0) * ldx + static_cast<ptrdiff_t>(j0), ldx,
               y + static_cast<ptrdiff_t>(j0) * ldy + static_cast<ptrdiff_t>(i0), ldy);
  // The edges: columns past the last full block (all rows), rows past it (full-block columns).
  for (size_t j = cols8; j < cols; ++j)
    for (size_t i = 0; i < rows; ++i) y[static_cast<ptrdiff_t>(j) * ldy + static_cast<ptrdiff_t>(i)] = x[static_cast<ptrdiff_t>(i) * ldx + static_cast<ptrdiff_t>(j)];
  for (size_t j = 0; j < cols8; ++j)
    for (size_t i = rows8; i < rows; ++i) y[static_cast<ptrdiff_t>(j) * ldy + static_cast<ptrdiff_t>(i)] = x[static_cast<ptrdiff_t>(i) * ldx + static_cast<ptrdiff_t>(j)];
}

}  // namespace

X32TransposeUkernel X32TransposeAvx2() { return TransposeAvx2; }

}  // namespace kernels
}  // namespace sonde
