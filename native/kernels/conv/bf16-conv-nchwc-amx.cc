// AMX direct convolution on a bf16 channel-blocked input: the avx512bf16 tile's inputs, weights and
// store (see Bf16NchwcConvUkernelAvx512Bf16 in conv.h), with the multiply-adds on the tiles. A tile
// register holds the P pixels of one output row as rows and 32 k as columns, so each tile dot
// product is P pixels x 16 output channels x 32 k:
// - k is a pair of taps (kx, kx + 1) of one input-channel block: a pixel's 16 channels at tap kx
//   and at kx + 1 are adjacent in the blocked row (at any stride), 64 bytes, and the pixels' rows
//   are sw x 16 channels apart (overlapping at stride 1, which tile loads allow);
// - the packed weights' [kx][8 pairs][32 outputs] are the matching B tile as they are: 16 rows of
//   pairs (tap kx's 8, then tap kx + 1's), 64 bytes for 16 outputs, 128 bytes apart;
// - an odd kernel width's last tap goes through tiles of half that k (32-byte rows of A, 8 rows of
//   B), so nothing past the kernel is read or multiplied.
// Tile registers: tmm0/1 C (outputs 0-15 / 16-31, fp32), tmm2 A, tmm3/4 B; tmm5 A and tmm6/7 B of
// the lone tap. A and C have P rows, so no pixel past the tile is read.
// Two output rows (P <= 7 each) run one after the other. Numerics: the avx512bf16 tile's (exact
// bf16 products added in fp32, denormals flushed), in the tile unit's order.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/conv/conv.h"
#include "kernels/conv/nchwc-avx512.h"
#include "kernels/gemm/amx.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kB = kNchwcBlock;       // input channels per block
constexpr size_t kPairs = kB / 2;        // bf16 pairs per block
constexpr size_t kOcb = kNchwcOutBlock;  // output channels per weight block
constexpr size_t kWRowBytes = kOcb * 4;  // bytes between two pairs of the packed weights

void Configure(size_t pixels) {
  amx::Configure(static_cast<uint32_t>(amx::kConvKeyBase + pixels), [pixels] {
    amx::TileConfig cfg;
    const uint8_t p = static_cast<uint8_t>(pixels);
    cfg.rows[0] = cfg.rows[1] = p;  // C: pixels x 16 fp32
    cfg.colsb[0] = cfg.colsb[1] = 64;
    cfg.rows[2] = p;                // A: pixels x (2 taps x 16 channels)
    cfg.colsb[2] = 64;
    cfg.rows[3] = cfg.rows[4] = 16;  // B: 16 pairs x 16 outputs
    cfg.colsb[3] = cfg.colsb[4] = 64;
    cfg.rows[5] = p;                 // A of a lone tap: pixels x 16 channels
    cfg.colsb[5] = 32;
    cfg.rows[6] = cfg.rows[7] = 8;   // B of a lone tap: 8 pairs x 16 outputs
    cfg.colsb[6] = cfg.colsb[7] = 64;
    return cfg;
  });
}

// One output row oy of P pixels into out[P][32] (fp32; outputs 16-31 only with NV = 2). prefetch:
// this row issues the tile's prefetch of the next block's weights (NchwcConvArgs::pf), a*pf_step
// bytes per tap as it walks the taps.
template <size_t NV>
void Row(const NchwcConvArgs* a, size_t oy, size_t ox0, float* out, bool prefetch) {
  _tile_zero(0);
  if (NV > 1) _tile_zero(1);
  // In uint16 elements.
  const size_t row = a->wp * kB, plane = a->hp * row;
  const size_t a_stride = a->sw * kB * sizeof(uint16_t);
  const size_t tap_pairs = a->kw / 2;
  const bool lone = a->kw & 1;
  const char* w = static_cast<const char*>(a->w);
  const uint16_t* xb = static_cast<const uint16_t*>(a->x) + oy * a->sh * row + ox0 * a->sw * kB;
  const char* pf = prefetch ? a->pf : nullptr;
  const char* const pf_end = pf ? pf + a->pf_bytes : nullptr;
  const size_t pf_row = a->pf_step * a->kw;
  for (size_t cb = 0; cb < a->c_blocks; ++cb, xb += plane) {
    for (size_t ky = 0; ky < a->kh; ++ky) {
      avx512::PrefetchWeightSlice(pf, pf_end, pf_row);
      const uint16_t* xt = xb + ky * row;
      for (size_t j = 0; j < tap_pairs; ++j, w += 2 * kPairs * kWRowBytes) {
        _tile_loadd(2, xt + 2 * j * kB, a_stride);
        _tile_loadd(3, w, kWRowBytes);
        _tile_dpbf16ps(0, 2, 3);
        if (NV > 1) {
          _tile_loadd(4, w + 64, kWRowBytes);
          _tile_dpbf16ps(1, 2, 4);
        }
      }
      if (lone) {
        _tile_loadd(5, xt + (a->kw - 1) * kB, a_stride);
        _tile_loadd(6, w, kWRowBytes);
        _tile_dpbf16ps(0, 5, 6);
        if (NV > 1) {
          _tile_loadd(7, w + 64, kWRowBytes);
          _tile_dpbf16ps(1, 5, 7);
        }
        w += kPairs * kWRowBytes;
      }
    }
  }
  _tile_stored(0, out, kOcb * sizeof(float));
  if (NV > 1) _tile_stored(1, out + 16, kOcb * sizeof(float));
}

template <size_t NV, size_t P, size_t R>
void Tile(const NchwcConvArgs* a, size_t oy, size_t ox0) {
  Configure(P);
  alignas(64) float out[R * P][kOcb];
  for (size_t r = 0; r < R; ++r) Row<NV>(a, oy + r, ox0, out[r * P], r == 0);
  __m512 acc[NV][R * P];
#pragma GCC unroll 16
  for (size_t p = 0; p < R * P; ++p)
    for (size_t v = 0; v < NV; ++v) acc[v][p] = _mm512_load_ps(out[p] + v * 16);
  if (a->y_bf16) avx512::StoreNchwcTile<NV, P, R, true>(a, oy, ox0, acc);
  else avx512::StoreNchwcTile<NV, P, R>(a, oy, ox0, acc);
}

typedef void (*TileFn)(const NchwcConvArgs*, size_t, size_t);

#define SONDE_AMX_ROW(NV)                                                                                  \
  {&Tile<NV, 1, 1>, &Tile<NV, 2, 1>, &Tile<NV, 3, 1>, &Tile<NV, 4, 1>, &Tile<NV, 5, 1>, &Tile<NV, 6, 1>,    \
   &Tile<NV, 7, 1>, &Tile<NV, 8, 1>, &Tile<NV, 9, 1>, &Tile<NV, 10, 1>, &Tile<NV, 11, 1>, &Tile<NV, 12, 1>, \
   &Tile<NV, 13, 1>, &Tile<NV, 14, 1>}
#define SONDE_AMX_ROW_PAIR(NV) \
  {&Tile<NV, 1, 2>, &Tile<NV, 2, 2>, &Tile<NV, 3, 2>, &Tile<NV, 4, 2>, &Tile<NV, 5, 2>, &Tile<NV, 6, 2>, &Tile<NV, 7, 2>}
static_assert(kNchwcMaxPixels == 14, "the tables below list 14 tile widths (7 for row pairs)");
// [vectors of output channels - 1][pixels - 1]
constexpr TileFn kTiles[2][kNchwcMaxPixels] = {SONDE_AMX_ROW(1), SONDE_AMX_ROW(2)};
constexpr TileFn kRowPairTiles[2][kNchwcMaxPixels / 2] = {SONDE_AMX_ROW_PAIR(1), SONDE_AMX_ROW_PAIR(2)};
#undef SONDE_AMX_ROW
#undef SONDE_AMX_ROW_PAIR

void Bf16DirectConvAmx(const NchwcConvArgs* a, size_t oy, size_t ox0, size_t np, size_t rows) {
  const size_t nv = a->oc_valid > 16 ? 1 : 0;
  if (rows == 2) kRowPairTiles[nv][np - 1](a, oy, ox0);
  else kTiles[nv][np - 1](a, oy, ox0);
}

}  // namespace

F32NchwcConvUkernel Bf16NchwcConvUkernelAmx() { return Bf16DirectConvAmx; }

}  // namespace kernels
}  // namespace sonde
