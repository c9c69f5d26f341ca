// Intel AMX tile configuration shared by the *-amx.cc kernels (for inclusion by them only). The
// configuration is per thread and loading it costs more than a small tile's work, so each thread
// keeps the one it loaded last, under a key naming its shape: a kernel loads its own only when the
// thread last ran another. sonde's pool threads run only sonde's code, so nothing else changes it
// behind the key's back.
#pragma once
#include <immintrin.h>
#include <stdint.h>

namespace sonde {
namespace kernels {
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile register
  uint8_t rows[16] = {};
};

inline thread_local uint32_t loaded_key = 0;  // 0: none loaded on this thread

// Loads cfg unless the thread's configuration is already the one named key (nonzero).
template <typename MakeConfig>
inline void Configure(uint32_t key, MakeConfig make) {
  if (loaded_key == key) return;
  const TileConfig cfg = make();
  _tile_loadconfig(&cfg);
  loaded_key = key;
}

// Keys of the kernels' configurations.
constexpr uint32_t kGemmKey = 1;
constexpr uint32_t kConvKeyBase = 0x100;  // + pixels per tile

}  // namespace amx
}  // namespace kernels
}  // namespace sonde
