// AVX-512 f32 SpMM. CSR: 16 output columns per call (one zmm of C across a row in the epilogue),
// up to 128 rows of At per call (8 zmm accumulators); BSR 1x16 / 1x32: the dense GEMM's register
// tile with the K loop over the panel's non-zero blocks.
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h for _mm512_setzero_ps/masked loads,
// and a false -Wuninitialized for the unpack/shuffle intrinsics (their _mm512_undefined_ps pass-through).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/gemm/epilogue-avx512.h"
#include "kernels/sparse/spmm.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kNg = 16;
constexpr size_t kMaxMv = 8;  // 8 zmm = 128 rows of At per call

// The steps of a column's sum (CsrColumn, CsrColumnPair): non-zeros p .. p + U - 1, one to each of
// the U chains; the tail past the last whole step, all on chain 0; the chains summed pairwise and
// stored.
template <size_t MV, size_t U, typename Index>
inline void CsrStep(const float* at, size_t ldat, uint32_t p, const Index* col_idx, const float* values,
                    __m512 (&acc)[U][MV]) {
#pragma GCC unroll 8
  for (size_t u = 0; u < U; ++u) {
    const __m512 w = _mm512_set1_ps(values[p + u]);
    const float* ak = at + static_cast<size_t>(col_idx[p + u]) * ldat;
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) acc[u][v] = _mm512_fmadd_ps(w, _mm512_load_ps(ak + 16 * v), acc[u][v]);
  }
}
template <size_t MV, size_t U, typename Index>
inline void CsrTail(const float* at, size_t ldat, uint32_t p, uint32_t p1, const Index* col_idx, const float* values,
                    __m512 (&acc)[U][MV]) {
  for (; p < p1; ++p) {
    const __m512 w = _mm512_set1_ps(values[p]);
    const float* ak = at + static_cast<size_t>(col_idx[p]) * ldat;
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) acc[0][v] = _mm512_fmadd_ps(w, _mm512_load_ps(ak + 16 * v), acc[0][v]);
  }
}
template <size_t MV, size_t U>
inline void StoreChains(__m512 (&acc)[U][MV], float* out) {
#pragma GCC unroll 8
  for (size_t v = 0; v < MV; ++v) {
    PairwiseSumU<U, MV>(acc, v, [](auto a, auto b) { return _mm512_add_ps(a, b); });
    _mm512_store_ps(out + 16 * v, acc[0][v]);
  }
}

// One output column (one row of W) over MV*16 rows of At. Zen 4/5 and Skylake-X retire two
// 512-bit FMAs a cycle at 4 cycles latency, so 8 independent accumulator chains keep both pipes busy:
// U sets of MV take consecutive non-zeros (U*MV >= 8), summed pairwise at the end. With U*MV = 4
// (the first version) M = 64 ran at half the FMA rate, latency-bound.
template <size_t MV, size_t U, typename Index>
inline void CsrColumn(const float* at, size_t ldat, uint32_t p, uint32_t p1, const Index* col_idx,
                      const float* values, float* out) {
  __m512 acc[U][MV];
#pragma GCC unroll 32
  for (size_t u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) acc[u][v] = _mm512_setzero_ps();
  for (; p + U <= p1; p += U) CsrStep<MV, U>(at, ldat, p, col_idx, values, acc);
  CsrTail<MV, U>(at, ldat, p, p1, col_idx, values, acc);
  StoreChains<MV, U>(acc, out);
}

// Output columns j and j + 1 at once, each summed exactly as CsrColumn<MV, U> sums it (the same
// steps, tail and pairwise sum), so a column's sums are the same bits either way. A part of M's
// rows (RunSpmm's split of a small M over the threads) keeps the U of the whole M, and alone its
// U*MV chains would leave the FMA pipes idle (M = 64 in halves: 4 chains, latency-bound); the two
// columns' chains together make 2*U*MV.
template <size_t MV, size_t U, typename Index>
inline void CsrColumnPair(const float* at, size_t ldat, uint32_t p, uint32_t p1, uint32_t q, uint32_t q1,
                          const Index* col_idx, const float* values, float* out0, float* out1) {
  __m512 acc[U][MV], bcc[U][MV];
#pragma GCC unroll 32
  for (size_t u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) acc[u][v] = bcc[u][v] = _mm512_setzero_ps();
  for (; p + U <= p1 && q + U <= q1; p += U, q += U) {
    CsrStep<MV, U>(at, ldat, p, col_idx, values, acc);
    CsrStep<MV, U>(at, ldat, q, col_idx, values, bcc);
  }
  for (; p + U <= p1; p += U) CsrStep<MV, U>(at, ldat, p, col_idx, values, acc);
  for (; q + U <= q1; q += U) CsrStep<MV, U>(at, ldat, q, col_idx, values, bcc);
  CsrTail<MV, U>(at, ldat, p, p1, col_idx, values, acc);
  CsrTail<MV, U>(at, ldat, q, q1, col_idx, values, bcc);
  StoreChains<MV, U>(acc, out0);
  StoreChains<MV, U>(bcc, out1);
}

// r[j] = row j of a 16x16 block in, column j out: the unpack / 128-bit-lane shuffle network,
// 64 shuffles against the 256 scalar loads and stores of an element-wise transpose.
inline void Transpose16x16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (size_t i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (size_t i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (size_t q = 0; q < 4; ++q) {
    t[q] = _mm512_shuffle_f32x4(r[q], r[q + 4], 0x88);
    t[q + 4] = _mm512_shuffle_f32x4(r[q], r[q + 4], 0xdd);
    t[q + 8] = _mm512_shuffle_f32x4(r[q + 8], r[q + 12], 0x88);
    t[q + 12] = _mm512_shuffle_f32x4(r[q + 8], r[q + 12], 0xdd);
  }
#pragma GCC unroll 8
  for (size_t q = 0; q < 8; ++q) {
    r[q] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0x88);
    r[q + 8] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0xdd);
  }
}

// The group's sums land in tile[j][i] (column j of C, row i); each 16-row slab is transposed in
// registers to rows of C across the 16 columns, so the epilogue and the store work on rows of C like the GEMM's.
// U: the accumulator chains per column, UFor(the vectors of the whole M) (a part of M keeps its
// whole's, so results do not depend on how M was split); kPairs: columns two at a time (CsrColumnPair).
constexpr size_t UFor(size_t mv) { return mv >= 8 ? 1 : 8 / mv; }
template <size_t MV, size_t U, bool kPairs, typename Index>
void CsrGroup(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr, const Index* col_idx,
              const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
  constexpr size_t kRows = MV * 16;
  alignas(64) float tile[kNg * kRows];
  size_t j = 0;
  if constexpr (kPairs) {
    for (; j + 2 <= nc; j += 2)
      CsrColumnPair<MV, U, Index>(at, ldat, row_ptr[j], row_ptr[j + 1], row_ptr[j + 1], row_ptr[j + 2], col_idx, values,
                                  tile + j * kRows, tile + (j + 1) * kRows);
  }
  for (; j < nc; ++j)
    CsrColumn<MV, U, Index>(at, ldat, row_ptr[j], row_ptr[j + 1], col_idx, values, tile + j * kRows);
  const __mmask16 mask = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
  avx512::ColumnTerms t{};
  if (ep) t = avx512::LoadColumnTerms(ep, 0, mask);
  for (size_t v = 0; v * 16 < m; ++v) {
    __m512 r[16];
#pragma GCC unroll 16
    for (size_t j = 0; j < 16; ++j) r[j] = j < nc ? _mm512_load_ps(tile + j * kRows + 16 * v) : _mm512_setzero_ps();
    Transpose16x16(r);
    const size_t rows = m - 16 * v < 16 ? m - 16 * v : 16;
#pragma GCC unroll 16
    for (size_t i = 0; i < 16; ++i) {
      if (i >= rows) break;
      __m512 x = r[i];
      if (ep) x = avx512::ApplyEpilogue(x, t, ep, 16 * v + i, 0, mask);
      _mm512_mask_storeu_ps(c + (16 * v + i) * ldc, mask, x);
    }
  }
}

template <typename Index>
void F32SpmmCsr16x128Avx512(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
    const Index* col_idx, const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
#define SONDE_CSR_GROUP(MV) \
  CsrGroup<MV, UFor(MV), false, Index>(m, nc, at, ldat, row_ptr, col_idx, values, c, ldc, ep)
  switch ((m + 15) / 16) {
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

// A part of a small M (RunSpmm's split over the threads): rows [0, m) of At, summed with the chains
// of the whole M's `whole_m` rows, columns in pairs. Parts of at most 64 rows (halves of M <= 128).
template <typename Index>
void F32SpmmCsrPart64Avx512(size_t m, size_t whole_m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                            const Index* col_idx, const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
#define SONDE_CSR_PART(MV, U) \
  return CsrGroup<MV, U, true, Index>(m, nc, at, ldat, row_ptr, col_idx, values, c, ldc, ep)
  const size_t u = UFor((whole_m + 15) / 16);
  switch ((m + 15) / 16) {
    case 1:
      if (u == 8) SONDE_CSR_PART(1, 8);
      if (u == 4) SONDE_CSR_PART(1, 4);
      if (u == 2) SONDE_CSR_PART(1, 2);
      SONDE_CSR_PART(1, 1);
    case 2:
      if (u == 4) SONDE_CSR_PART(2, 4);
      if (u == 2) SONDE_CSR_PART(2, 2);
      SONDE_CSR_PART(2, 1);
    case 3:
      if (u == 2) SONDE_CSR_PART(3, 2);
      SONDE_CSR_PART(3, 1);
    case 4:
      if (u == 2) SONDE_CSR_PART(4, 2);
      SONDE_CSR_PART(4, 1);
    default: return;
  }
#undef SONDE_CSR_PART
}

// At = A^T through 16x16 register transposes: an element-wise copy writes each At row 4 bytes at a
// time at a stride of ldat floats, which at M = 256 (1 KiB stride, every store in the same few L1
// sets) cost as much as the SpMM itself.
void F32TransposePack16Avx512(size_t m, size_t k, const float* a, size_t lda, float* at, size_t ldat) {
  for (size_t i0 = 0; i0 < ldat; i0 += 16) {
    const size_t rows = i0 >= m ? 0 : (m - i0 < 16 ? m - i0 : 16);
    for (size_t k0 = 0; k0 < k; k0 += 16) {
      const size_t cols = k - k0 < 16 ? k - k0 : 16;
      const __mmask16 cm = static_cast<__mmask16>((1u << cols) - 1);
      __m512 r[16];
#pragma GCC unroll 16
      for (size_t i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, a + (i0 + i) * lda + k0) : _mm512_setzero_ps();
      Transpose16x16(r);
#pragma GCC unroll 16
      for (size_t j = 0; j < 16; ++j) {
        if (j >= cols) break;
        _mm512_storeu_ps(at + (k0 + j) * ldat + i0, r[j]);
      }
    }
  }
}

// The group's nc sums through the epilogue to c[0..nc).
inline void StoreSpmvSums(size_t nc, const float* sums, float* c, const GemmEpilogue* ep) {
  const __mmask16 mask = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
  __m512 v = _mm512_maskz_load_ps(mask, sums);
  if (ep) v = avx512::ApplyEpilogue(v, avx512::LoadColumnTerms(ep, 0, mask), ep, 0, 0, mask);
  _mm512_mask_storeu_ps(c, mask, v);
}

// 16 column indices from p (the first `mk` of them past the 32- and 16-wide loops), as 32-bit lanes.
inline __m512i LoadIndices(const uint32_t* col_idx, size_t p) { return _mm512_loadu_si512(col_idx + p); }
inline __m512i LoadIndices(const uint16_t* col_idx, size_t p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_idx + p)));
}
inline __m512i LoadIndices(const uint32_t* col_idx, size_t p, __mmask16 mk) { return _mm512_maskz_loadu_epi32(mk, col_idx + p); }
inline __m512i LoadIndices(const uint16_t* col_idx, size_t p, __mmask16 mk) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, col_idx + p));
}

// SpMV: x[k] gathered 16 non-zeros at a time; two accumulators so consecutive gathers overlap.
// Index: 32-bit, or 16-bit widened per 16 (the weights stay 6 bytes per non-zero).
template <typename Index>
void SpmvGather(size_t nc, const float* x, const uint32_t* row_ptr, const Index* col_idx, const float* values, float* c,
                const GemmEpilogue* ep) {
  alignas(64) float sums[kNg];
  for (size_t j = 0; j < nc; ++j) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    size_t p = row_ptr[j];
    const size_t p1 = row_ptr[j + 1];
    for (; p + 32 <= p1; p += 32) {
      PrefetchSpmvStream(values, col_idx, p);
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + p), _mm512_i32gather_ps(LoadIndices(col_idx, p), x, 4), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(values + p + 16), _mm512_i32gather_ps(LoadIndices(col_idx, p + 16), x, 4), acc1);
    }
    for (; p + 16 <= p1; p += 16)
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + p), _mm512_i32gather_ps(LoadIndices(col_idx, p), x, 4), acc0);
    if (p < p1) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (p1 - p)) - 1);
      const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, LoadIndices(col_idx, p, mk), x, 4);
      acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, values + p), g, acc1);
    }
    sums[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
  StoreSpmvSums(nc, sums, c, ep);
}

void F32SpmvCsr16Avx512(size_t nc, const float* x, const uint32_t* row_ptr, const uint32_t* col_idx,
                        const float* values, float* c, const GemmEpilogue* ep) {
  SpmvGather(nc, x, row_ptr, col_idx, values, c, ep);
}

void F32SpmvCsr16x16bitGatherAvx512(size_t nc, const float* x, const uint32_t* row_ptr, const uint16_t* col_idx,
                                    const float* values, float* c, const GemmEpilogue* ep) {
  SpmvGather(nc, x, row_ptr, col_idx, values, c, ep);
}

void F32SpmvCsr16x16bitAvx512(size_t nc, const float* x, const uint32_t* row_ptr, const uint16_t* col_idx,
                              const float* values, float* c, const GemmEpilogue* ep) {
  alignas(64) float sums[kNg];
  for (size_t j = 0; j < nc; ++j) sums[j] = F32SpmvRow16(x, row_ptr[j], row_ptr[j + 1], col_idx, values);
  StoreSpmvSums(nc, sums, c, ep);
}

// BSR 1 x (16 NV): MR rows of A, NV zmm per row; per block one aligned load of the block per
// vector and one broadcast of A[i][k] per row (MR*NV + NV + 1 <= 32 registers).
template <size_t MR, size_t NV>
void BsrTile(size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k, const float* bv, float* c,
             size_t ldc, const GemmEpilogue* ep) {
  constexpr size_t kBw = 16 * NV;
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (size_t v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (size_t b = 0; b < blocks; ++b) {
    const size_t k = block_k[b];
    __m512 w[NV];
#pragma GCC unroll 2
    for (size_t v = 0; v < NV; ++v) w[v] = _mm512_load_ps(bv + b * kBw + 16 * v);
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
#pragma GCC unroll 2
      for (size_t v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, w[v], acc[i][v]);
    }
  }
  __mmask16 mk[NV];
  avx512::ColumnTerms t[NV];
#pragma GCC unroll 2
  for (size_t v = 0; v < NV; ++v) {
    const size_t lo = 16 * v;
    mk[v] = nc >= lo + 16 ? 0xFFFF : nc <= lo ? 0 : static_cast<__mmask16>((1u << (nc - lo)) - 1);
    if (ep) t[v] = avx512::LoadColumnTerms(ep, lo, mk[v]);
  }
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (size_t v = 0; v < NV; ++v) {
      __m512 x = acc[i][v];
      if (ep) x = avx512::ApplyEpilogue(x, t[v], ep, i, 16 * v, mk[v]);
      _mm512_mask_storeu_ps(c + i * ldc + 16 * v, mk[v], x);
    }
  }
}

template <size_t NV, size_t MR>
void BsrDispatch(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                 const float* bv, float* c, size_t ldc, const GemmEpilogue* ep) {
  if (mr == MR) return BsrTile<MR, NV>(nc, a, lda, blocks, block_k, bv, c, ldc, ep);
  if constexpr (MR > 1) BsrDispatch<NV, MR - 1>(mr, nc, a, lda, blocks, block_k, bv, c, ldc, ep);
}

constexpr size_t kBsr16Mr = 16;  // 16 accumulators + block + broadcast
constexpr size_t kBsr32Mr = 12;  // 24 accumulators + 2 block vectors + broadcast, as the dense 12x32 tile

void F32SpmmBsr1x16Avx512(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                          const float* bv, float* c, size_t ldc, const GemmEpilogue* ep) {
  BsrDispatch<1, kBsr16Mr>(mr, nc, a, lda, blocks, block_k, bv, c, ldc, ep);
}
void F32SpmmBsr1x32Avx512(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                          const float* bv, float* c, size_t ldc, const GemmEpilogue* ep) {
  BsrDispatch<2, kBsr32Mr>(mr, nc, a, lda, blocks, block_k, bv, c, ldc, ep);
}

// The columns layout (see spmm.h and the AVX2 file): unaligned loads of the caller's At with the
// last vector masked (a k-mask costs nothing extra here), C^T rows stored directly.
template <size_t MV>
void CsrColumnsGroup(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                     const uint32_t* col_idx, const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
  constexpr size_t kU = MV >= 8 ? 1 : 8 / MV;
  const __mmask16 tail = static_cast<__mmask16>((1u << (m - 16 * (MV - 1))) - 1u);
  auto mask = [&](size_t v) { return v + 1 < MV ? static_cast<__mmask16>(0xFFFF) : tail; };
  for (size_t j = 0; j < nc; ++j) {
    PrefetchColumnsAhead(j, nc, m, c, ldc, ep);
    __m512 acc[kU][MV];
#pragma GCC unroll 32
    for (size_t u = 0; u < kU; ++u)
#pragma GCC unroll 8
      for (size_t v = 0; v < MV; ++v) acc[u][v] = _mm512_setzero_ps();
    uint32_t p = row_ptr[j];
    const uint32_t p1 = row_ptr[j + 1];
    for (; p + kU <= p1; p += kU) {
#pragma GCC unroll 8
      for (size_t u = 0; u < kU; ++u) {
        const __m512 w = _mm512_set1_ps(values[p + u]);
        const float* ak = at + static_cast<size_t>(col_idx[p + u]) * ldat;
#pragma GCC unroll 8
        for (size_t v = 0; v < MV; ++v)
          acc[u][v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask(v), ak + 16 * v), acc[u][v]);
      }
    }
    for (; p < p1; ++p) {
      const __m512 w = _mm512_set1_ps(values[p]);
      const float* ak = at + static_cast<size_t>(col_idx[p]) * ldat;
#pragma GCC unroll 8
      for (size_t v = 0; v < MV; ++v)
        acc[0][v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask(v), ak + 16 * v), acc[0][v]);
    }
    avx512::ColumnTerms t{};
    if (ep) {
      t.has_scale = ep->scale != nullptr;
      t.scale = _mm512_set1_ps(t.has_scale ? ep->scale[j] : 1.0f);
      t.bias = _mm512_set1_ps(ep->bias ? ep->bias[j] : 0.0f);
    }
#pragma GCC unroll 8
    for (size_t v = 0; v < MV; ++v) {
      PairwiseSumU<kU, MV>(acc, v, [](auto a, auto b) { return _mm512_add_ps(a, b); });
      __m512 x = acc[0][v];
      // ApplyEpilogue's residual is at i * ldr + col: column j's row of C^T, rows from 16v.
      if (ep) x = avx512::ApplyEpilogue(x, t, ep, j, 16 * v, mask(v));
      _mm512_mask_storeu_ps(c + j * ldc + 16 * v, mask(v), x);
    }
  }
}

void F32SpmmCsrColumns128Avx512(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                                const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                                const GemmEpilogue* ep) {
#define SONDE_CSR_COLUMNS(MV) \
  CsrColumnsGroup<MV>(m, nc, at, ldat, row_ptr, col_idx, values, c, ldc, ep)
  switch ((m + 15) / 16) {
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

}  // namespace

F32SpmmCsrUkernelInfo F32SpmmCsrUkernelAvx512() {
  return {F32SpmmCsr16x128Avx512<uint32_t>, F32SpmvCsr16Avx512, F32SpmvCsr16x16bitAvx512, F32TransposePack16Avx512,
          kNg, kMaxMv * 16, 16, "f32_spmm_csr_16x128__avx512", F32SpmmCsrColumns128Avx512,
          "f32_spmm_csr_columns_128__avx512", F32SpmvCsr16x16bitGatherAvx512, F32SpmmCsr16x128Avx512<uint16_t>,
          F32SpmmCsrPart64Avx512<uint32_t>, F32SpmmCsrPart64Avx512<uint16_t>, 64};
}

F32SpmmBsrUkernelInfo F32SpmmBsrUkernelAvx512(uint32_t bw) {
  if (bw == 16) return {F32SpmmBsr1x16Avx512, kBsr16Mr, 16, "f32_spmm_bsr1x16_16x16__avx512"};
  if (bw == 32) return {F32SpmmBsr1x32Avx512, kBsr32Mr, 32, "f32_spmm_bsr1x32_12x32__avx512"};
  return {nullptr, 0, bw, ""};
}

}  // namespace kernels
}  // namespace sonde
