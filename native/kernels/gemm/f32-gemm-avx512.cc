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

// The full packed-A tile's k loop, whole groups of kPackK k values, in assembly. As intrinsics
// (GCC 12) the loop recomputed the group's address every k (its integer ops competing with the FMAs
// for ports 0 and 5) and unrolled it spilled accumulators: 195-207 GFLOP/s on one Xeon core with A
// and W in L1/L2 (81-86% of the FMA peak) where this loop, one group per iteration with constant
// offsets and two pointer increments, runs at 231-234 (96-97%), in a standalone driver of the
// microkernel. The FMAs are those of the intrinsic loop in the same order (acc += a_ik * w_k per
// output, k ascending), so the results are identical bit for bit.
// Accumulators: row r's two vectors in zmm r and zmm s (s = 12 + r).
#define SONDE_G12_FMA(r, s, j)                                                \
  "vbroadcastss " #r "*16+" #j "*4(%[a]), %%zmm31\n\t"                       \
  "vfmadd231ps %%zmm29, %%zmm31, %%zmm" #r "\n\t"                            \
  "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #s "\n\t"
#define SONDE_G12_STEP(j, fetch)                                              \
  "vmovaps " #j "*128(%[w]), %%zmm29\n\t"                                    \
  "vmovaps " #j "*128+64(%[w]), %%zmm30\n\t"                                 \
  fetch                                                                       \
  SONDE_G12_FMA(0, 12, j) SONDE_G12_FMA(1, 13, j) SONDE_G12_FMA(2, 14, j)     \
  SONDE_G12_FMA(3, 15, j) SONDE_G12_FMA(4, 16, j) SONDE_G12_FMA(5, 17, j)     \
  SONDE_G12_FMA(6, 18, j) SONDE_G12_FMA(7, 19, j) SONDE_G12_FMA(8, 20, j)     \
  SONDE_G12_FMA(9, 21, j) SONDE_G12_FMA(10, 22, j) SONDE_G12_FMA(11, 23, j)
// W kPrefetchRows (64) rows of 128 bytes ahead, as the intrinsic loop's kFetchW.
#define SONDE_G12_FETCH(j) "prefetcht0 8192+" #j "*128(%[w])\n\tprefetcht0 8192+" #j "*128+64(%[w])\n\t"
#define SONDE_G12_ACC(op, r, s) op " " #r "*64(%[acc0]), %%zmm" #r "\n\t" op " " #r "*64(%[acc1]), %%zmm" #s "\n\t"
#define SONDE_G12_ACCS(op)                                                                         \
  SONDE_G12_ACC(op, 0, 12) SONDE_G12_ACC(op, 1, 13) SONDE_G12_ACC(op, 2, 14) SONDE_G12_ACC(op, 3, 15) \
  SONDE_G12_ACC(op, 4, 16) SONDE_G12_ACC(op, 5, 17) SONDE_G12_ACC(op, 6, 18) SONDE_G12_ACC(op, 7, 19) \
  SONDE_G12_ACC(op, 8, 20) SONDE_G12_ACC(op, 9, 21) SONDE_G12_ACC(op, 10, 22) SONDE_G12_ACC(op, 11, 23)
// Stores go the other way (register to memory): AT&T's operand order makes that the same text.
#define SONDE_G12_STORE(r, s) "vmovaps %%zmm" #r ", " #r "*64(%[acc0])\n\tvmovaps %%zmm" #s ", " #r "*64(%[acc1])\n\t"
#define SONDE_G12_LOOP(f0, f1, f2, f3)                                        \
  SONDE_G12_ACCS("vmovaps")                                                   \
  "1:\n\t"                                                                   \
  SONDE_G12_STEP(0, f0) SONDE_G12_STEP(1, f1) SONDE_G12_STEP(2, f2) SONDE_G12_STEP(3, f3) \
  "add $192, %[a]\n\t"                                                       \
  "add $512, %[w]\n\t"                                                       \
  "dec %[n]\n\t"                                                             \
  "jnz 1b\n\t"                                                               \
  SONDE_G12_STORE(0, 12) SONDE_G12_STORE(1, 13) SONDE_G12_STORE(2, 14) SONDE_G12_STORE(3, 15) \
  SONDE_G12_STORE(4, 16) SONDE_G12_STORE(5, 17) SONDE_G12_STORE(6, 18) SONDE_G12_STORE(7, 19) \
  SONDE_G12_STORE(8, 20) SONDE_G12_STORE(9, 21) SONDE_G12_STORE(10, 22) SONDE_G12_STORE(11, 23)
// GCC allows 30 operands, fewer than 24 accumulators read and written: they pass through memory
// (acc0/acc1, 64-byte aligned arrays), a load and a store per accumulator per call.
#define SONDE_G12_CLOBBERS                                                                          \
  "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11", \
  "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18", "zmm19", "zmm20", "zmm21",         \
  "zmm22", "zmm23", "zmm29", "zmm30", "zmm31", "cc", "memory"

template <bool kFetchW>
inline void PackedGroups12(size_t groups, const float* a, const float* w, __m512* acc0, __m512* acc1) {
  static_assert(kMr == 12 && kNr == 32 && kPackK == 4 && kPrefetchRows * kNr * sizeof(float) == 8192,
                "the assembly's offsets");
  if (groups == 0) return;
  if constexpr (kFetchW) {
    asm volatile(SONDE_G12_LOOP(SONDE_G12_FETCH(0), SONDE_G12_FETCH(1), SONDE_G12_FETCH(2), SONDE_G12_FETCH(3))
                 : [a] "+r"(a), [w] "+r"(w), [n] "+r"(groups)
                 : [acc0] "r"(acc0), [acc1] "r"(acc1)
                 : SONDE_G12_CLOBBERS);
  } else {
    asm volatile(SONDE_G12_LOOP("", "", "", "")
                 : [a] "+r"(a), [w] "+r"(w), [n] "+r"(groups)
                 : [acc0] "r"(acc0), [acc1] "r"(acc1)
                 : SONDE_G12_CLOBBERS);
  }
}
#undef SONDE_G12_CLOBBERS
#undef SONDE_G12_LOOP
#undef SONDE_G12_STORE
#undef SONDE_G12_ACCS
#undef SONDE_G12_ACC
#undef SONDE_G12_FETCH
#undef SONDE_G12_STEP
#undef SONDE_G12_FMA

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
    size_t k = 0;
    if constexpr (MR == kMr) {
      PackedGroups12<kFetchW>(kc / kPackK, a, w, acc0, acc1);
      k = kc / kPackK * kPackK;
    }
    // One k per iteration, the group's address recomputed each time: unrolling a whole group made
    // GCC 12 hold its 8 W vectors at once and spill accumulators.
    for (; k < kc; ++k) {
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
