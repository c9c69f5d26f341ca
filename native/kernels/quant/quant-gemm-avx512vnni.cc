// AVX-512 VNNI blocked GEMM of q8_0 / q4_0 weights (layouts and precision: quant.h).
//
// Tile: 4 activation rows x 32 weight rows (two zmm of 16 rows). Per block and row group the
// kernel holds 8 fp32 accumulators and 8 int32 block sums: 16 of the 32 zmm, with room for the
// weights, the broadcast activations, the scales and the corrections, so nothing spills. Each
// group of 4 bytes of a row's activations is broadcast from memory (a load-port uop, no shuffle)
// and feeds two vpdpbusd; the weights, packed so that one 64-byte load holds the same 4-byte group
// of 16 rows, feed 4 rows' vpdpbusd. Packing moves the decode (q4_0 nibbles, fp16 scales) and the
// per-row correction of the unsigned activations out of the inner loop: it runs once per panel per
// call, against M / 4 microkernel calls that reuse it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <string.h>

#include "kernels/quant/quant-transpose-avx512.h"
#include "kernels/quant/quant.h"

namespace sonde {
namespace kernels {
namespace {

const size_t kMr = 4;

// vpdpbusd(acc, u8, s8) through inline asm, as in kernels/gemm/qs8-gemm-avx512vnni.cc: GCC 12
// spills the intrinsic's tied accumulator.
inline __m512i Dpbusd(__m512i acc, __m512i a_u8, __m512i b_s8) {
  __asm__("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a_u8), [b] "v"(b_s8));
  return acc;
}

// Block b of a weight row (blk points at it) as 32 unsigned bytes in element order: q8_0 w + 128,
// q4_0 the raw nibble (w + 8).
template <int32_t T>
inline __m256i RowBlockU8(const uint8_t* blk) {
  if (T == kQuantQ8_0)
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)), _mm256_set1_epi8(static_cast<char>(0x80)));
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m), _mm_and_si128(qs, m));
}

// Two rows' pair partials folded once: lane L of the result holds, per 128-bit lane,
// [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
inline __m512i Fold32(__m512i a, __m512i b) { return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b)); }
inline __m512i Fold64(__m512i c, __m512i d) { return _mm512_add_epi32(_mm512_unpacklo_epi64(c, d), _mm512_unpackhi_epi64(c, d)); }

// The GEMM's arithmetic for few activation rows, without packing. Each row's blocks b and b+1 fill
// one zmm (lanes 0-7 and 8-15 after vpdpbusd: partial sums of 4 products each); a tree of unpacks
// and adds over the 16 rows (44 single-uop ops per 32 row-blocks: the AVX2 vphaddd tree costs about
// twice that) leaves each block's exact integer sums with lane r = row r, and the same cvt / mul /
// FMA chain as GemmMr follows, block by block. Rows past nr re-read row nr - 1 (valid memory) and
// are not stored.
template <int32_t T, size_t MR>
void Gemv16Mr(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, const QuantActs* a, float* y, size_t ldy) {
  const size_t block_bytes = T == kQuantQ8_0 ? kQ8_0BlockBytes : kQ4_0BlockBytes;
  const uint8_t* rows[kQuantGemvRows];
  alignas(64) int32_t offsets[kQuantGemvRows];
  for (size_t r = 0; r < kQuantGemvRows; ++r) {
    const size_t rr = r < nr ? r : nr - 1;
    rows[r] = w + rr * row_bytes;
    offsets[r] = static_cast<int32_t>(rr * row_bytes);
  }
  const __m512i offs = _mm512_load_si512(offsets);
  __m512 acc[MR];
  for (size_t i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const size_t nb = k / kQuantBlock;
  // The next 16 rows (contiguous after these), fetched as one sequential stream while these run:
  // walking 16 rows side by side is 16 short streams, more than the hardware prefetchers follow
  // (measured: 5 GB/s from DRAM without this).
  const uint8_t* next = w + kQuantGemvRows * row_bytes;
  const size_t lines_per_block = (kQuantGemvRows * block_bytes + 63) / 64;
  for (size_t b = 0; b < nb; b += 2) {
    const bool two = b + 1 < nb;
    const size_t off = b * block_bytes;
    for (size_t l = 0; l < 2 * lines_per_block; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(next + (b * lines_per_block + l) * 64), _MM_HINT_T0);
    // The 16 rows' fp16 scales: one gather of 4 bytes at each block start, the low half kept.
    const __m512 dw0 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(offs, w + off, 1)));
    const __m512 dw1 = two ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(offs, w + off + block_bytes, 1)))
                           : _mm512_setzero_ps();
    for (size_t i = 0; i < MR; ++i) {
      // Blocks b and b+1 of the activations (zero padded to an even block count).
      const __m512i xq = _mm512_loadu_si512(a->q + i * a->q_stride + b * kQuantBlock);
      __m512i u[8];
      for (size_t j = 0; j < 8; ++j) {
        __m512i pr[2];
        for (size_t h = 0; h < 2; ++h) {
          const uint8_t* blk = rows[2 * j + h] + off;
          const __m256i lo = RowBlockU8<T>(blk);
          const __m256i hi = two ? RowBlockU8<T>(blk + block_bytes) : _mm256_setzero_si256();
          pr[h] = Dpbusd(_mm512_setzero_si512(), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), xq);
        }
        u[j] = Fold32(pr[0], pr[1]);
      }
      // v[j], 128-bit lane L: rows 4j .. 4j+3, each the sum over lane L's 4 elements.
      __m512i v[4];
      for (size_t j = 0; j < 4; ++j) v[j] = Fold64(u[2 * j], u[2 * j + 1]);
      // Lanes 0-1 are block b, 2-3 block b+1: [rows 0-3 b, rows 0-3 b+1, rows 4-7 b, rows 4-7 b+1].
      const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[0], v[1], 0x88), _mm512_shuffle_i32x4(v[0], v[1], 0xDD));
      const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2], v[3], 0x88), _mm512_shuffle_i32x4(v[2], v[3], 0xDD));
      const int32_t* corr = a->corr + i * a->corr_stride + b;
      const float* dx = a->d + i * a->d_stride + b;
      const __m512i i0 = _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, 0x88), _mm512_set1_epi32(corr[0]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(dw0, _mm512_set1_ps(dx[0])), acc[i]);
      if (two) {
        const __m512i i1 = _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, 0xDD), _mm512_set1_epi32(corr[1]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(dw1, _mm512_set1_ps(dx[1])), acc[i]);
      }
    }
  }
  const __mmask16 m = nr >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nr) - 1);
  for (size_t i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy, m, acc[i]);
}

template <int32_t T>
void Gemv16(size_t mr, size_t nr, size_t k, const uint8_t* w, size_t row_bytes, const QuantActs* a, float* y, size_t ldy) {
  switch (mr) {
    case 1: return Gemv16Mr<T, 1>(nr, k, w, row_bytes, a, y, ldy);
    case 2: return Gemv16Mr<T, 2>(nr, k, w, row_bytes, a, y, ldy);
    case 3: return Gemv16Mr<T, 3>(nr, k, w, row_bytes, a, y, ldy);
    case 4: return Gemv16Mr<T, 4>(nr, k, w, row_bytes, a, y, ldy);
    case 5: return Gemv16Mr<T, 5>(nr, k, w, row_bytes, a, y, ldy);
    case 6: return Gemv16Mr<T, 6>(nr, k, w, row_bytes, a, y, ldy);
    case 7: return Gemv16Mr<T, 7>(nr, k, w, row_bytes, a, y, ldy);
    case 8: return Gemv16Mr<T, 8>(nr, k, w, row_bytes, a, y, ldy);
    default: return;
  }
}

// Block b of a weight row (blk points at it) as 32 signed bytes in element order.
template <int32_t T>
inline __m256i RowBlockS8(const uint8_t* blk) {
  if (T == kQuantQ8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  return _mm256_sub_epi8(RowBlockU8<T>(blk), _mm256_set1_epi8(8));
}

// Packs 16 rows x 2 blocks per 16 x 16 dword transpose: row i's blocks b and b+1 (32 bytes each,
// 8 groups of 4) fill the two halves of one zmm; after the transpose, vector c holds group c % 8 of
// block b + c / 8 for the 16 rows, which is the panel's layout. The weight sums of the correction
// come from the transposed groups (vpdpbusd with ones), the scales from one gather per 16 rows and
// block (32 scalar fp16 loads and conversions per block cost more than the transposes).
// A decode step packs every weight of the model once per step, straight from DRAM: reading 32 rows
// side by side is 32 short streams, more than the hardware prefetchers follow (measured on the
// dense serving model's FFN, 2048 x 512 q8_0, one thread, weights not cached: 8 GB/s, against
// 27 GB/s for the 16-row dot kernel that prefetches), so the next 32 rows (contiguous after these)
// are prefetched as one sequential stream while these are packed.
template <int32_t T>
void PackBlocks(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, uint8_t* panel) {
  const size_t block_bytes = T == kQuantQ8_0 ? kQ8_0BlockBytes : kQ4_0BlockBytes;
  const size_t nb = k / kQuantBlock;
  const __m512i ones = _mm512_set1_epi8(1);
  alignas(64) int32_t offsets[kQuantGemmNr];
  for (size_t r = 0; r < kQuantGemmNr; ++r) offsets[r] = static_cast<int32_t>(r * row_bytes);
  const __mmask16 valid[2] = {nr >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nr) - 1),
                              nr >= 32 ? static_cast<__mmask16>(0xFFFF)
                                       : nr <= 16 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << (nr - 16)) - 1)};
  const uint8_t* next = w + kQuantGemmNr * row_bytes;
  // Lines of the next panel per block (32 rows x block_bytes), rounded up so the stream runs ahead.
  const size_t lines_per_block = (kQuantGemmNr * block_bytes + 63) / 64;
  for (size_t b = 0; b < nb; b += 2) {
    const bool two = b + 1 < nb;
    for (size_t l = 0; l < 2 * lines_per_block; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(next + (b * lines_per_block + l) * 64), _MM_HINT_T0);
    for (size_t half = 0; half < 2; ++half) {
      __m512 r[16];
      for (size_t i = 0; i < 16; ++i) {
        const size_t row = half * 16 + i;
        if (row >= nr) {
          r[i] = _mm512_setzero_ps();
          continue;
        }
        const uint8_t* blk = w + row * row_bytes + b * block_bytes;
        const __m256i lo = RowBlockS8<T>(blk);
        const __m256i hi = two ? RowBlockS8<T>(blk + block_bytes) : _mm256_setzero_si256();
        r[i] = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
      }
      Transpose16(r);
      const __m512i offs = _mm512_load_si512(offsets + half * 16);
      for (size_t blk = 0; blk < (two ? 2u : 1u); ++blk) {
        uint8_t* dst = panel + (b + blk) * kQuantGemmBlockPanelBytes;
        __m512i sum = _mm512_setzero_si512();
        for (size_t g = 0; g < 8; ++g) {
          const __m512i v = _mm512_castps_si512(r[blk * 8 + g]);
          _mm512_store_si512(dst + g * 128 + half * 64, v);
          sum = Dpbusd(sum, ones, v);
        }
        // The activations enter as x + 128: sum (x + 128) w = sum x w + 128 sum w.
        _mm512_store_si512(dst + 1152 + half * 64, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
        // The 16 rows' fp16 scales: 4 bytes at each block start (rows past nr masked off: 0), the low
        // half kept.
        const uint8_t* base = w + (b + blk) * block_bytes;
        const __m512i d16 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid[half], offs, base, 1);
        _mm512_store_ps(dst + 1024 + half * 64, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d16)));
      }
    }
  }
}

template <size_t MR>
void GemmMr(size_t nr, size_t k, const uint8_t* panel, const QuantActs* a, float* y, size_t ldy) {
  __m512 acc0[MR], acc1[MR];
  for (size_t i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  const size_t nb = k / kQuantBlock;
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kQuantGemmBlockPanelBytes;
    const __m512i c0 = _mm512_load_si512(pb + 1152), c1 = _mm512_load_si512(pb + 1216);
    __m512i s0[MR], s1[MR];
    for (size_t i = 0; i < MR; ++i) {
      s0[i] = c0;
      s1[i] = c1;
    }
    const uint8_t* xb = reinterpret_cast<const uint8_t*>(a->q) + b * kQuantBlock;
    for (size_t g = 0; g < 8; ++g) {
      const __m512i w0 = _mm512_load_si512(pb + g * 128), w1 = _mm512_load_si512(pb + g * 128 + 64);
      for (size_t i = 0; i < MR; ++i) {
        int32_t x4;
        memcpy(&x4, xb + i * a->q_stride + 4 * g, 4);
        const __m512i xv = _mm512_set1_epi32(x4);
        s0[i] = Dpbusd(s0[i], xv, w0);
        s1[i] = Dpbusd(s1[i], xv, w1);
      }
    }
    const __m512 dw0 = _mm512_load_ps(reinterpret_cast<const float*>(pb + 1024));
    const __m512 dw1 = _mm512_load_ps(reinterpret_cast<const float*>(pb + 1088));
    for (size_t i = 0; i < MR; ++i) {
      const __m512 dx = _mm512_set1_ps(a->d[i * a->d_stride + b]);
      acc0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[i]), _mm512_mul_ps(dw0, dx), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[i]), _mm512_mul_ps(dw1, dx), acc1[i]);
    }
  }
  StoreTile32<MR>(nr, acc0, acc1, y, ldy);
}

void Gemm(size_t mr, size_t nr, size_t k, const uint8_t* panel, const QuantActs* a, float* y, size_t ldy) {
  switch (mr) {
    case 4: return GemmMr<4>(nr, k, panel, a, y, ldy);
    case 3: return GemmMr<3>(nr, k, panel, a, y, ldy);
    case 2: return GemmMr<2>(nr, k, panel, a, y, ldy);
    case 1: return GemmMr<1>(nr, k, panel, a, y, ldy);
    default: return;
  }
}

}  // namespace

QuantGemmUkernelInfo QuantGemmUkernelAvx512Vnni(int32_t type) {
  switch (type) {
    case kQuantQ8_0:
      return {PackBlocks<kQuantQ8_0>, Gemm, kMr, kQuantActU8, "q8_0_qu8_gemm_4x32__avx512vnni", Gemv16<kQuantQ8_0>, 128};
    case kQuantQ4_0:
      return {PackBlocks<kQuantQ4_0>, Gemm, kMr, kQuantActU8, "q4_0_qu8_gemm_4x32__avx512vnni", Gemv16<kQuantQ4_0>, 8};
    default: return {nullptr, nullptr, 0, 0, "?"};
  }
}

}  // namespace kernels
}  // namespace sonde
