// AMX low-precision GEMM, 32x32 tile (bf16 weights with bf16 activations via tdpbf16ps; int8
// weights with u8 activations via tdpbusd). Eight 1 KiB tile registers, all 16 rows x 64 bytes:
// tmm0-3 the four 16x16 fp32/s32 blocks of C, tmm4-5 two 16-row slices of A (32 k of bf16, 64 k of
// u8), tmm6-7 two 16-column slices of W. Each k step is four tile loads and four dot products of
// 16x16x32 (bf16) or 16x16x64 (int8) multiply-adds, 8-16x the work of a zmm instruction.
//
// The packed weights are the avx512bf16 / avx512vnni layouts unchanged (per pair or quad of k, 32
// uint32 lanes): a slice of 16 columns is one tile of 64-byte rows 128 bytes apart. The operator
// pads what the tile loads read: the panel's k to a multiple of the tile row's k (zero pairs or
// quads), A's rows to that length (zeros) and A's row count to a multiple of 32 (rows past mr are
// read and their results dropped: a row of C depends only on its row of A), and stores A tile-major
// (a_tiled: per k step the 32 rows' 64 bytes, 2 KiB in a row). So there is no tail code here.
//
// Numerics: tdpbusd sums u8 x s8 exactly in s32 (the VNNI kernel's integers, bit for bit), then
// the same dequantisation; tdpbf16ps adds exact bf16 products in fp32 with denormals flushed to
// zero, in its own order (like vdpbf16ps, whose order differs).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/gemm/amx.h"
#include "kernels/gemm/lowp-avx512.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kMr = 32;
constexpr size_t kNr = 32;
constexpr size_t kTileBytes = 64;      // bytes of a tile row
constexpr size_t kWRowBytes = kNr * 4;  // bytes between two pairs / quads of a panel
// k per tile row (64 bytes) of A: 32 bf16 or 64 u8; also the ukernel's k_align.
template <bool kInt8>
constexpr size_t kKStep = kInt8 ? 64 : 32;

inline void ConfigureTiles() {
  amx::Configure(amx::kGemmKey, [] {
    amx::TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = kTileBytes;
      cfg.rows[t] = 16;
    }
    return cfg;
  });
}

// C tiles to a row-major 32x32 buffer (s32 or fp32 bits), for the AVX-512 epilogue.
template <bool kTwoRowSlices>
inline void StoreC(void* buf) {
  char* b = static_cast<char*>(buf);
  _tile_stored(0, b, kNr * 4);
  _tile_stored(1, b + 64, kNr * 4);
  if (kTwoRowSlices) {
    _tile_stored(2, b + 16 * kNr * 4, kNr * 4);
    _tile_stored(3, b + 16 * kNr * 4 + 64, kNr * 4);
  }
}

// The k loop; kInt8 picks the dot product. steps: the padded k / kKStep<kInt8>.
template <bool kInt8, bool kTwoRowSlices>
inline void Accumulate(size_t steps, const char* a, const char* w) {
  _tile_zero(0);
  _tile_zero(1);
  if (kTwoRowSlices) {
    _tile_zero(2);
    _tile_zero(3);
  }
  constexpr size_t kStepBytes = kMr * kTileBytes;  // one k step of the block's 32 rows
  const char* a1 = a + 16 * kTileBytes;
  for (size_t s = 0; s < steps; ++s) {
    const char* ws = w + s * 16 * kWRowBytes;
    _tile_loadd(4, a + s * kStepBytes, kTileBytes);
    _tile_loadd(6, ws, kWRowBytes);
    _tile_loadd(7, ws + 64, kWRowBytes);
    if (kInt8) {
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (kTwoRowSlices) {
      _tile_loadd(5, a1 + s * kStepBytes, kTileBytes);
      if (kInt8) {
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      } else {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
}

template <bool kInt8>
void Gemm32x32Amx(size_t mr, size_t nr, size_t k, const void* a_, size_t, const void* w_, float* c, size_t ldc,
                  const LowpGemmQuant* q, const GemmEpilogue* ep) {
  ConfigureTiles();
  const char* a = static_cast<const char*>(a_);
  const char* w = static_cast<const char*>(w_);
  const size_t steps = (k + kKStep<kInt8> - 1) / kKStep<kInt8>;
  alignas(64) int32_t acc[kMr * kNr];
  if (mr > 16) {
    Accumulate<kInt8, true>(steps, a, w);
    StoreC<true>(acc);
  } else {
    Accumulate<kInt8, false>(steps, a, w);
    StoreC<false>(acc);
  }
  const __mmask16 m0 = avx512::LowpMask(nr, 0), m1 = avx512::LowpMask(nr, 16);
  avx512::ColumnTerms t0{}, t1{};
  if (ep) {
    t0 = avx512::LoadColumnTerms(ep, 0, m0);
    t1 = avx512::LoadColumnTerms(ep, 16, m1);
  }
  if (kInt8) {
    const avx512::Qs8ColumnTerms q0 = avx512::LoadQs8ColumnTerms(q, 0, m0), q1 = avx512::LoadQs8ColumnTerms(q, 16, m1);
    for (size_t i = 0; i < mr; ++i) {
      const int32_t* row = acc + i * kNr;
      avx512::LowpStore(avx512::Qs8Dequantize(_mm512_load_si512(row), q0, q, i), t0, c + i * ldc, i, 0, m0, ep);
      avx512::LowpStore(avx512::Qs8Dequantize(_mm512_load_si512(row + 16), q1, q, i), t1, c + i * ldc, i, 16, m1, ep);
    }
  } else {
    for (size_t i = 0; i < mr; ++i) {
      const float* row = reinterpret_cast<const float*>(acc + i * kNr);
      avx512::LowpStore(_mm512_load_ps(row), t0, c + i * ldc, i, 0, m0, ep);
      avx512::LowpStore(_mm512_load_ps(row + 16), t1, c + i * ldc, i, 16, m1, ep);
    }
  }
}

}  // namespace

LowpGemmUkernelInfo Bf16GemmUkernelAmx() {
  return {Gemm32x32Amx<false>, kMr, kNr, kLowpABf16Pairs, "bf16_gemm_32x32__amx", kKStep<false>, true};
}

LowpGemmUkernelInfo Qs8GemmUkernelAmx() {
  return {Gemm32x32Amx<true>, kMr, kNr, kLowpAU8Quads, "qs8_gemm_32x32__amx", kKStep<true>, true};
}

}  // namespace kernels
}  // namespace sonde
