// AVX2 f32 SpMM: the AVX-512 kernels' structure with 8-wide vectors (8x8 register transposes).
// CSR: 8 output columns per call, up to 64 rows of At (8 ymm accumulators of the 16 registers);
// BSR 1x8 / 1x16 / 1x32 with 12 ymm accumulators (12 rows x 1, 6 x 2, 3 x 4 vectors) + block vectors + one broadcast.
#include <immintrin.h>

#include "kernels/gemm/epilogue-avx2.h"
#include "kernels/sparse/spmm.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kNg = 8;
constexpr size_t kMaxMv = 8;

inline __m256i LaneMask(size_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// As the AVX-512 kernel: U*MV >= 8 independent FMA chains (two FMA pipes at 4 cycles latency).
template <size_t MV, size_t U, typename Index>
inline void CsrColumn(const float* at, size_t ldat, uint32_t p, uint32_t p1, const Index* col_idx,
                      const float* values, float* out) {
  __m256 acc[U][MV];
#pragma GCC unroll 32
  for (size_t u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) acc[u][v] = _mm256_setzero_ps();
  for (; p + U <= p1; p += U) {
#pragma GCC unroll 8
    for (size_t u = 0; u < U; ++u) {
      const __m256 w = _mm256_set1_ps(values[p + u]);
      const float* ak = at + static_cast<size_t>(col_idx[p + u]) * ldat;
#pragma GCC unroll 8
      for (size_t v = 0; v < MV; ++v) acc[u][v] = _mm256_fmadd_ps(w, _mm256_load_ps(ak + 8 * v), acc[u][v]);
    }
  }
  for (; p < p1; ++p) {
    const __m256 w = _mm256_set1_ps(values[p]);
    const float* ak = at + static_cast<size_t>(col_idx[p]) * ldat;
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) acc[0][v] = _mm256_fmadd_ps(w, _mm256_load_ps(ak + 8 * v), acc[0][v]);
  }
#pragma GCC unroll 8
  for (size_t v = 0; v < MV; ++v) {
    PairwiseSumU<U, MV>(acc, v, [](auto a, auto b) { return _mm256_add_ps(a, b); });
    _mm256_store_ps(out + 8 * v, acc[0][v]);
  }
}

// r[j] = row j of an 8x8 block in, column j out: unpacks, shuffles and 128-bit lane swaps (24
// shuffles against the 64 scalar loads and stores of an element-wise transpose).
inline void Transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
#pragma GCC unroll 4
  for (size_t i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 2
  for (size_t i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (size_t q = 0; q < 4; ++q) {
    r[q] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x20);
    r[q + 4] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x31);
  }
}

template <size_t MV, typename Index>
void CsrGroup(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr, const Index* col_idx,
              const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
  constexpr size_t kU = MV >= 8 ? 1 : 8 / MV;
  constexpr size_t kRows = MV * 8;
  alignas(32) float tile[kNg * kRows];
  for (size_t j = 0; j < nc; ++j)
    CsrColumn<MV, kU, Index>(at, ldat, row_ptr[j], row_ptr[j + 1], col_idx, values, tile + j * kRows);
  const __m256i mask = LaneMask(nc);
  avx2::ColumnTerms t{};
  if (ep) t = avx2::LoadColumnTerms(ep, 0, mask);
  for (size_t v = 0; v * 8 < m; ++v) {
    __m256 r[8];
#pragma GCC unroll 8
    for (size_t j = 0; j < 8; ++j) r[j] = j < nc ? _mm256_load_ps(tile + j * kRows + 8 * v) : _mm256_setzero_ps();
    Transpose8x8(r);
    const size_t rows = m - 8 * v < 8 ? m - 8 * v : 8;
#pragma GCC unroll 8
    for (size_t i = 0; i < 8; ++i) {
      if (i >= rows) break;
      __m256 x = r[i];
      if (ep) x = avx2::ApplyEpilogue(x, t, ep, 8 * v + i, 0, mask);
      _mm256_maskstore_ps(c + (8 * v + i) * ldc, mask, x);
    }
  }
}

// At = A^T through 8x8 register transposes (see the AVX-512 pack for why not element-wise).
void F32TransposePack8Avx2(size_t m, size_t k, const float* a, size_t lda, float* at, size_t ldat) {
  for (size_t i0 = 0; i0 < ldat; i0 += 8) {
    const size_t rows = i0 >= m ? 0 : (m - i0 < 8 ? m - i0 : 8);
    for (size_t k0 = 0; k0 < k; k0 += 8) {
      const size_t cols = k - k0 < 8 ? k - k0 : 8;
      const __m256i cm = LaneMask(cols);
      __m256 r[8];
#pragma GCC unroll 8
      for (size_t i = 0; i < 8; ++i)
        r[i] = i < rows ? _mm256_maskload_ps(a + (i0 + i) * lda + k0, cm) : _mm256_setzero_ps();
      Transpose8x8(r);
#pragma GCC unroll 8
      for (size_t j = 0; j < 8; ++j) {
        if (j >= cols) break;
        _mm256_storeu_ps(at + (k0 + j) * ldat + i0, r[j]);
      }
    }
  }
}

template <typename Index>
void F32SpmmCsr8x64Avx2(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                        const Index* col_idx, const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
#define SONDE_CSR_GROUP(MV) \
  CsrGroup<MV, Index>(m, nc, at, ldat, row_ptr, col_idx, values, c, ldc, ep)
  switch ((m + 7) / 8) {
    case 1: return SONDE_CSR_GROUP(1);
    case 2: return SONDE_CSR_GROUP(2);
    case 3: return SONDE_CSR_GROUP(3);
    case 4: return SONDE_CSR_GROUP(4);
    case 5: return SONDE_CSR_GROUP(5);
    case 6: return SONDE_CSR_GROUP(6);
    case 7: return SONDE_CSR_GROUP(7);
    case 8: return SONDE_CSR_GROUP(8);
    default: return;
  }
#undef SONDE_CSR_GROUP
}

// The columns layout (see spmm.h): one output column's MV vectors of rows in registers over its
// non-zeros, as CsrColumn, but read from the caller's At (unaligned loads, the last vector masked so
// nothing past m is touched) and stored straight to the column's row of C^T with a broadcast
// bias/scale: no tile, no transpose, no pack.
template <size_t MV>
void CsrColumnsGroup(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                     const uint32_t* col_idx, const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
  constexpr size_t kU = MV >= 8 ? 1 : 8 / MV;
  const __m256i tail = LaneMask(m - 8 * (MV - 1));
  const __m256i all = _mm256_set1_epi32(-1);
  auto load = [&](const float* ak, size_t v) {
    return v + 1 < MV ? _mm256_loadu_ps(ak + 8 * v) : _mm256_maskload_ps(ak + 8 * v, tail);
  };
  for (size_t j = 0; j < nc; ++j) {
    PrefetchColumnsAhead(j, nc, m, c, ldc, ep);
    __m256 acc[kU][MV];
#pragma GCC unroll 32
    for (size_t u = 0; u < kU; ++u)
#pragma GCC unroll 8
      for (size_t v = 0; v < MV; ++v) acc[u][v] = _mm256_setzero_ps();
    uint32_t p = row_ptr[j];
    const uint32_t p1 = row_ptr[j + 1];
    for (; p + kU <= p1; p += kU) {
#pragma GCC unroll 8
      for (size_t u = 0; u < kU; ++u) {
        const __m256 w = _mm256_set1_ps(values[p + u]);
        const float* ak = at + static_cast<size_t>(col_idx[p + u]) * ldat;
#pragma GCC unroll 8
        for (size_t v = 0; v < MV; ++v) acc[u][v] = _mm256_fmadd_ps(w, load(ak, v), acc[u][v]);
      }
    }
    for (; p < p1; ++p) {
      const __m256 w = _mm256_set1_ps(values[p]);
      const float* ak = at + static_cast<size_t>(col_idx[p]) * ldat;
#pragma GCC unroll 8
      for (size_t v = 0; v < MV; ++v) acc[0][v] = _mm256_fmadd_ps(w, load(ak, v), acc[0][v]);
    }
    avx2::ColumnTerms t{};
    if (ep) {
      t.has_scale = ep->scale != nullptr;
      t.scale = _mm256_set1_ps(t.has_scale ? ep->scale[j] : 1.0f);
      t.bias = _mm256_set1_ps(ep->bias ? ep->bias[j] : 0.0f);
    }
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) {
      PairwiseSumU<kU, MV>(acc, v, [](auto a, auto b) { return _mm256_add_ps(a, b); });
      const __m256i mk = v + 1 < MV ? all : tail;
      __m256 x = acc[0][v];
      // ApplyEpilogue's residual is at i * ldr + col: column j's row of C^T, rows from 8v.
      if (ep) x = avx2::ApplyEpilogue(x, t, ep, j, 8 * v, mk);
      _mm256_maskstore_ps(c + j * ldc + 8 * v, mk, x);
    }
  }
}

void F32SpmmCsrColumns64Avx2(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                             const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                             const GemmEpilogue* ep) {
#define SONDE_CSR_COLUMNS(MV) \
  CsrColumnsGroup<MV>(m, nc, at, ldat, row_ptr, col_idx, values, c, ldc, ep)
  switch ((m + 7) / 8) {
    case 1: return SONDE_CSR_COLUMNS(1);
    case 2: return SONDE_CSR_COLUMNS(2);
    case 3: return SONDE_CSR_COLUMNS(3);
    case 4: return SONDE_CSR_COLUMNS(4);
    case 5: return SONDE_CSR_COLUMNS(5);
    case 6: return SONDE_CSR_COLUMNS(6);
    case 7: return SONDE_CSR_COLUMNS(7);
    case 8: return SONDE_CSR_COLUMNS(8);
    default: return;
  }
#undef SONDE_CSR_COLUMNS
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void F32SpmvCsr8Avx2(size_t nc, const float* x, const uint32_t* row_ptr, const uint32_t* col_idx,
                     const float* values, float* c, const GemmEpilogue* ep) {
  alignas(32) float sums[kNg];
  for (size_t j = 0; j < nc; ++j) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    size_t p = row_ptr[j];
    const size_t p1 = row_ptr[j + 1];
    for (; p + 16 <= p1; p += 16) {
      const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_idx + p));
      const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_idx + p + 8));
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + p), _mm256_i32gather_ps(x, i0, 4), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + p + 8), _mm256_i32gather_ps(x, i1, 4), acc1);
    }
    for (; p + 8 <= p1; p += 8) {
      const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_idx + p));
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + p), _mm256_i32gather_ps(x, i0, 4), acc0);
    }
    if (p < p1) {
      const __m256i mk = LaneMask(p1 - p);
      const __m256i i0 = _mm256_maskload_epi32(reinterpret_cast<const int*>(col_idx + p), mk);
      const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, i0, _mm256_castsi256_ps(mk), 4);
      acc1 = _mm256_fmadd_ps(_mm256_maskload_ps(values + p, mk), g, acc1);
    }
    sums[j] = HorizontalSum(_mm256_add_ps(acc0, acc1));
  }
  const __m256i mask = LaneMask(nc);
  __m256 v = _mm256_maskload_ps(sums, mask);
  if (ep) v = avx2::ApplyEpilogue(v, avx2::LoadColumnTerms(ep, 0, mask), ep, 0, 0, mask);
  _mm256_maskstore_ps(c, mask, v);
}

void F32SpmvCsr8x16bitAvx2(size_t nc, const float* x, const uint32_t* row_ptr, const uint16_t* col_idx,
                           const float* values, float* c, const GemmEpilogue* ep) {
  alignas(32) float sums[kNg];
  for (size_t j = 0; j < nc; ++j) sums[j] = F32SpmvRow16(x, row_ptr[j], row_ptr[j + 1], col_idx, values);
  const __m256i mask = LaneMask(nc);
  __m256 v = _mm256_maskload_ps(sums, mask);
  if (ep) v = avx2::ApplyEpilogue(v, avx2::LoadColumnTerms(ep, 0, mask), ep, 0, 0, mask);
  _mm256_maskstore_ps(c, mask, v);
}

template <size_t MR, size_t NV>
void BsrTile(size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k, const float* bv, float* c,
             size_t ldc, const GemmEpilogue* ep) {
  constexpr size_t kBw = 8 * NV;
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (size_t v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (size_t b = 0; b < blocks; ++b) {
    const size_t k = block_k[b];
    __m256 w[NV];
#pragma GCC unroll 4
    for (size_t v = 0; v < NV; ++v) w[v] = _mm256_load_ps(bv + b * kBw + 8 * v);
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
#pragma GCC unroll 4
      for (size_t v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, w[v], acc[i][v]);
    }
  }
  __m256i mk[NV];
  avx2::ColumnTerms t[NV];
#pragma GCC unroll 4
  for (size_t v = 0; v < NV; ++v) {
    const size_t lo = 8 * v;
    mk[v] = LaneMask(nc > lo ? nc - lo : 0);
    if (ep) t[v] = avx2::LoadColumnTerms(ep, lo, mk[v]);
  }
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (size_t v = 0; v < NV; ++v) {
      __m256 x = acc[i][v];
      if (ep) x = avx2::ApplyEpilogue(x, t[v], ep, i, 8 * v, mk[v]);
      _mm256_maskstore_ps(c + i * ldc + 8 * v, mk[v], x);
    }
  }
}

template <size_t NV, size_t MR>
void BsrDispatch(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                 const float* bv, float* c, size_t ldc, const GemmEpilogue* ep) {
  if (mr == MR) return BsrTile<MR, NV>(nc, a, lda, blocks, block_k, bv, c, ldc, ep);
  if constexpr (MR > 1) BsrDispatch<NV, MR - 1>(mr, nc, a, lda, blocks, block_k, bv, c, ldc, ep);
}

void F32SpmmBsr1x8Avx2(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                       const float* bv, float* c, size_t ldc, const GemmEpilogue* ep) {
  BsrDispatch<1, 12>(mr, nc, a, lda, blocks, block_k, bv, c, ldc, ep);
}
void F32SpmmBsr1x16Avx2(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                        const float* bv, float* c, size_t ldc, const GemmEpilogue* ep) {
  BsrDispatch<2, 6>(mr, nc, a, lda, blocks, block_k, bv, c, ldc, ep);
}
void F32SpmmBsr1x32Avx2(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                        const float* bv, float* c, size_t ldc, const GemmEpilogue* ep) {
  BsrDispatch<4, 3>(mr, nc, a, lda, blocks, block_k, bv, c, ldc, ep);
}

}  // namespace

F32SpmmCsrUkernelInfo F32SpmmCsrUkernelAvx2() {
  return {F32SpmmCsr8x64Avx2<uint32_t>, F32SpmvCsr8Avx2, F32SpmvCsr8x16bitAvx2, F32TransposePack8Avx2,
          kNg, kMaxMv * 8, 8, "f32_spmm_csr_8x64__avx2", F32SpmmCsrColumns64Avx2, "f32_spmm_csr_columns_64__avx2", nullptr,
          F32SpmmCsr8x64Avx2<uint16_t>, nullptr, nullptr, 0};
}

F32SpmmBsrUkernelInfo F32SpmmBsrUkernelAvx2(uint32_t bw) {
  if (bw == 8) return {F32SpmmBsr1x8Avx2, 12, 8, "f32_spmm_bsr1x8_12x8__avx2"};
  if (bw == 16) return {F32SpmmBsr1x16Avx2, 6, 16, "f32_spmm_bsr1x16_6x16__avx2"};
  if (bw == 32) return {F32SpmmBsr1x32Avx2, 3, 32, "f32_spmm_bsr1x32_3x32__avx2"};
  return {nullptr, 0, bw, ""};
}

}  // namespace kernels
}  // namespace sonde
