// AVX-512 VNNI int8 GEMM, 12x32 tile: each vpdpbusd multiplies 16 lanes x 4 k of u8 activations
// (one broadcast quad) by s8 weights and adds the four products into s32, exactly (no int16
// saturation as with vpmaddubsw). 24 zmm accumulators + 2 weight vectors + 1 broadcast = 27 of 32
// registers; 24 independent chains cover its 5-cycle latency at up to two issues per cycle.
// The dequantisation (zero-point compensation with precomputed column sums, per-row times
// per-column scale) runs once per tile, then the fp32 epilogue.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/gemm/lowp-avx512.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 12;
constexpr size_t kNr = 32;

// vpdpbusd through inline asm: with _mm512_dpbusd_epi32, GCC 12 copies every accumulator to a
// scratch register and stores it to the stack on each k step (the builtin's tied operand defeats
// its register allocation), halving the speed. "+v" keeps the accumulator in one zmm.
static inline __m512i Dpbusd(__m512i acc, __m512i a_u8, __m512i w_s8) {
  __asm__("vpdpbusd %[w], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a_u8), [w] "v"(w_s8));
  return acc;
}

template <size_t MR>
void Tile(size_t nr, size_t k, const uint8_t* a, size_t a_stride, const int32_t* w, float* c, size_t ldc,
          const LowpGemmQuant* q, const GemmEpilogue* ep) {
  __m512i acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_si512();
    acc1[i] = _mm512_setzero_si512();
  }
  const size_t quads = (k + 3) / 4;
  for (size_t p = 0; p < quads; ++p) {
    const __m512i w0 = _mm512_load_si512(w + p * kNr);
    const __m512i w1 = _mm512_load_si512(w + p * kNr + 16);
#pragma GCC unroll 16
    for (size_t i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(a + i * a_stride)[p]);
      acc0[i] = Dpbusd(acc0[i], av, w0);
      acc1[i] = Dpbusd(acc1[i], av, w1);
    }
  }
  const __mmask16 m0 = avx512::LowpMask(nr, 0), m1 = avx512::LowpMask(nr, 16);
  const avx512::Qs8ColumnTerms q0 = avx512::LoadQs8ColumnTerms(q, 0, m0), q1 = avx512::LoadQs8ColumnTerms(q, 16, m1);
  avx512::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx512::LoadColumnTerms(ep, 0, m0);
    t1 = avx512::LoadColumnTerms(ep, 16, m1);
  }
#pragma GCC unroll 16
  for (size_t i = 0; i < MR; ++i) {
    avx512::LowpStore(avx512::Qs8Dequantize(acc0[i], q0, q, i), t0, c + i * ldc, i, 0, m0, ep);
    avx512::LowpStore(avx512::Qs8Dequantize(acc1[i], q1, q, i), t1, c + i * ldc, i, 16, m1, ep);
  }
}

void Qs8Gemm12x32Avx512Vnni(size_t mr, size_t nr, size_t k, const void* a_, size_t a_stride, const void* w_,
                            float* c, size_t ldc, const LowpGemmQuant* q, const GemmEpilogue* ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_);
  const int32_t* w = static_cast<const int32_t*>(w_);
  switch (mr) {
    case 12: return Tile<12>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 11: return Tile<11>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 10: return Tile<10>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 9: return Tile<9>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 8: return Tile<8>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 7: return Tile<7>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 6: return Tile<6>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 5: return Tile<5>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 4: return Tile<4>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 3: return Tile<3>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 2: return Tile<2>(nr, k, a, a_stride, w, c, ldc, q, ep);
    case 1: return Tile<1>(nr, k, a, a_stride, w, c, ldc, q, ep);
    default: return;
  }
}

}  // namespace

LowpGemmUkernelInfo Qs8GemmUkernelAvx512Vnni() {
  return {Qs8Gemm12x32Avx512Vnni, kMr, kNr, kLowpAU8Quads, "qs8_gemm_12x32__avx512vnni"};
}

}  // namespace kernels
}  // namespace sonde
