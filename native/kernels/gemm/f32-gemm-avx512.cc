// AVX-512 f32 GEMM, 12x32 tile: 24 zmm accumulators + 2 for the W row + 1 broadcast of A = 27 of
// the 32 registers, enough independent FMA chains to cover FMA latency on two pipes.
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h for _mm512_setzero_ps/masked loads.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/gemm/epilogue-avx512.h"
#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 12;
constexpr size_t kNr = 32;
constexpr size_t kPrefetchRows = 64;
constexpr size_t kPackK = 4;  // k values per row run in packed A

// kFetchW: prefetch W kPrefetchRows ahead. Always for 8 rows or fewer (too little work per W row
// to hide DRAM latency behind FMAs); for more rows only on a cold W slice (fn_cold_w), because the
// later tiles over the same slice find it in L2 and the prefetches would only take load slots.
// kPackedA: a is in the layout of PackA (lda unused), so the 12 broadcasts of a k step read one
// 48-byte run of a single stream instead of 12 rows lda apart; the FMA order per output is the same,
// so both forms give identical results.
template <size_t MR, bool kFetchW, bool kPackedA = false>
void Tile(size_t nr, size_t kc, const float* a, size_t lda, const float* w, float* c, size_t ldc,
          bool accumulate, const GemmEpilogue* ep) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  if constexpr (kPackedA) {
    // One k per iteration, the group's address recomputed each time: unrolling a whole group made
    // GCC 12 hold its 8 W vectors at once and spill accumulators.
    for (size_t k = 0; k < kc; ++k) {
      if (kFetchW) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchRows) * kNr), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchRows) * kNr + 16), _MM_HINT_T0);
      }
      const float* ag = a + (k / kPackK) * kPackK * kMr + k % kPackK;
      const __m512 w0 = _mm512_load_ps(w + k * kNr);
      const __m512 w1 = _mm512_load_ps(w + k * kNr + 16);
#pragma GCC unroll 16
      for (size_t i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(ag[i * kPackK]);
        acc0[i] = _mm512_fmadd_ps(av, w0, acc0[i]);
        acc1[i] = _mm512_fmadd_ps(av, w1, acc1[i]);
      }
    }
  }
  for (size_t k = 0; k < (kPackedA ? 0 : kc); ++k) {
    // 64 rows ahead (8 KiB, ~500 cycles at 8 rows) rather than 16: 8x1024x4096 with W from DRAM
    // went from 62-63 to 69-72 GFLOP/s on one thread (32 rows: 68-70). Past the slice's end this
    // fetches what the next call reads.
    if (kFetchW || MR <= 8) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchRows) * kNr), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchRows) * kNr + 16), _MM_HINT_T0);
    }
    const __m512 w0 = _mm512_load_ps(w + k * kNr);
    const __m512 w1 = _mm512_load_ps(w + k * kNr + 16);
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
      acc0[i] = _mm512_fmadd_ps(av, w0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(av, w1, acc1[i]);
    }
  }
  const __mmask16 m0 = nr >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : static_cast<__mmask16>((1u << (nr - 16)) - 1);
  avx512::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx512::LoadColumnTerms(ep, 0, m0);
    t1 = avx512::LoadColumnTerms(ep, 16, m1);
  }
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    __m512 v0 = acc0[i], v1 = acc1[i];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ci));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, ci + 16));
    }
    if (ep) {
      v0 = avx512::ApplyEpilogue(v0, t0, ep, i, 0, m0);
      v1 = avx512::ApplyEpilogue(v1, t1, ep, i, 16, m1);
    }
    _mm512_mask_storeu_ps(ci, m0, v0);
    _mm512_mask_storeu_ps(ci + 16, m1, v1);
  }
}

// One row (a matrix-vector product: M = 1 decode, an MLP at batch 1): Tile<1> chains every FMA on
// two accumulators, so it runs at one FMA per half FMA latency (4 cycles) however fast W arrives.
// Four k-phases of two accumulators each give 8 independent chains, enough to keep up with W
// streaming from L2/L3; their sum is taken once at the end.
// kPackedA: a is one row packed by PackA (its k values in runs of kPackK, kPackK * kMr apart), summed
// in the same order as the unpacked row, so a 1-row tail tile gives the same bits either way.
template <bool kPackedA = false>
void Row(size_t nr, size_t kc, const float* a, const float* w, float* c, bool accumulate, const GemmEpilogue* ep) {
  constexpr size_t kChains = 4;
  static_assert(!kPackedA || kChains == kPackK, "a k-phase per packed run");
  auto at = [a](size_t k) { return kPackedA ? a[(k / kPackK) * kPackK * kMr + k % kPackK] : a[k]; };
  __m512 acc0[kChains], acc1[kChains];
  for (size_t j = 0; j < kChains; ++j) {
    acc0[j] = _mm512_setzero_ps();
    acc1[j] = _mm512_setzero_ps();
  }
  size_t k = 0;
  for (; k + kChains <= kc; k += kChains) {
    // W is streamed once: fetch a few rows (cache lines) ahead of use.
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + 16) * kNr), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + 16) * kNr + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + 18) * kNr), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + 18) * kNr + 16), _MM_HINT_T0);
#pragma GCC unroll 4
    for (size_t j = 0; j < kChains; ++j) {
      const __m512 av = _mm512_set1_ps(at(k + j));
      acc0[j] = _mm512_fmadd_ps(av, _mm512_load_ps(w + (k + j) * kNr), acc0[j]);
      acc1[j] = _mm512_fmadd_ps(av, _mm512_load_ps(w + (k + j) * kNr + 16), acc1[j]);
    }
  }
  for (; k < kc; ++k) {
    const __m512 av = _mm512_set1_ps(at(k));
    acc0[0] = _mm512_fmadd_ps(av, _mm512_load_ps(w + k * kNr), acc0[0]);
    acc1[0] = _mm512_fmadd_ps(av, _mm512_load_ps(w + k * kNr + 16), acc1[0]);
  }
  __m512 v0 = _mm512_add_ps(_mm512_add_ps(acc0[0], acc0[1]), _mm512_add_ps(acc0[2], acc0[3]));
  __m512 v1 = _mm512_add_ps(_mm512_add_ps(acc1[0], acc1[1]), _mm512_add_ps(acc1[2], acc1[3]));
  const __mmask16 m0 = nr >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : static_cast<__mmask16>((1u << (nr - 16)) - 1);
  if (accumulate) {
    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
  }
  if (ep) {
    v0 = avx512::ApplyEpilogue(v0, avx512::LoadColumnTerms(ep, 0, m0), ep, 0, 0, m0);
    v1 = avx512::ApplyEpilogue(v1, avx512::LoadColumnTerms(ep, 16, m1), ep, 0, 16, m1);
  }
  _mm512_mask_storeu_ps(c, m0, v0);
  _mm512_mask_storeu_ps(c + 16, m1, v1);
}

// Rows of A for the packed-A tiles: groups of kPackK k values, each group holding every row's run of
// kPackK values in turn (the last group zero-filled past kc). Runs of 16 bytes are all the packing
// moves, so it costs little more than a copy, and the tile then reads A as one sequential stream.
void PackA(const float* a, size_t lda, size_t rows, size_t kc, float* ap) {
  size_t k = 0;
  for (; k + kPackK <= kc; k += kPackK) {
    float* g = ap + k * kMr;
    for (size_t i = 0; i < rows; ++i) _mm_storeu_ps(g + i * kPackK, _mm_loadu_ps(a + i * lda + k));
  }
  if (k < kc) {
    float* g = ap + k * kMr;
    for (size_t i = 0; i < rows; ++i)
      for (size_t j = 0; j < kPackK; ++j) g[i * kPackK + j] = k + j < kc ? a[i * lda + k + j] : 0.0f;
  }
}

template <bool kFetchW>
void F32Gemm12x32PackedAAvx512(size_t mr, size_t nr, size_t kc, const float* ap, const float* w, float* c,
                               size_t ldc, bool accumulate, const GemmEpilogue* ep) {
  switch (mr) {
    case 12: return Tile<12, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 11: return Tile<11, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 10: return Tile<10, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 9: return Tile<9, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 8: return Tile<8, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 7: return Tile<7, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 6: return Tile<6, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 5: return Tile<5, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 4: return Tile<4, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 3: return Tile<3, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 2: return Tile<2, kFetchW, true>(nr, kc, ap, 0, w, c, ldc, accumulate, ep);
    case 1: return Row<true>(nr, kc, ap, w, c, accumulate, ep);
    default: return;
  }
}

template <bool kFetchW>
void F32Gemm12x32Avx512(size_t mr, size_t nr, size_t kc, const float* a, size_t lda, const float* w,
                        float* c, size_t ldc, bool accumulate, const GemmEpilogue* ep) {
  switch (mr) {
    case 12: return Tile<12, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 11: return Tile<11, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 10: return Tile<10, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 9: return Tile<9, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 8: return Tile<8, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 7: return Tile<7, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 6: return Tile<6, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 5: return Tile<5, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 4: return Tile<4, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 3: return Tile<3, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 2: return Tile<2, kFetchW>(nr, kc, a, lda, w, c, ldc, accumulate, ep);
    case 1: return Row<false>(nr, kc, a, w, c, accumulate, ep);
    default: return;
  }
}

}  // namespace

F32GemmUkernelInfo F32GemmUkernelAvx512() {
  return {F32Gemm12x32Avx512<false>, kMr, kNr, "f32_gemm_12x32__avx512", F32Gemm12x32Avx512<true>,
          {PackA, kPackK, F32Gemm12x32PackedAAvx512<false>, F32Gemm12x32PackedAAvx512<true>}};
}

}  // namespace kernels
}  // namespace sonde
