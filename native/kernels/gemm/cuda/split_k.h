// K split across blocks for GEMM-shaped GPU kernels (the GEMM's and the conv's implicit GEMM) whose
// output tiles alone fill the device badly: each split adds its partial sums into the output with
// atomics, so the output starts as zeros (or as a residual added before the activation), and one
// pass applies the epilogue after.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

// Splits for a grid of `blocks` on `slots` (SMs times the blocks a kernel keeps resident), at most
// `most`. A kernel's time goes with the blocks per slot times the K each block runs, so the count
// minimises ceil(blocks * s / slots) / s: the smallest s within 5% of the best, taken only where
// that beats one split by 20% (the zeroing, the atomics and the epilogue pass cost the rest;
// measured on an H200: a 1x1 conv of 224 SIMT blocks and K = 512 ran 0.79x with 2 splits, where a
// 3x3 of 196 blocks and K = 1152 ran 1.29x).
inline int64_t AutoKSplits(int64_t blocks, int64_t slots, int64_t most) {
  const auto cost = [&](int64_t s) { return double((blocks * s + slots - 1) / slots) / double(s); };
  double best = cost(1);
  for (int64_t s = 2; s <= most; ++s) best = std::min(best, cost(s));
  if (best > 0.8 * cost(1)) return 1;
  for (int64_t s = 2; s <= most; ++s)
    if (cost(s) <= 1.05 * best) return s;
  return 1;
}

// The automatic count for `k_tiles` K tiles, each split keeping at least `min_tiles`, unless the
// A/B switch `env` (SONDE_GPU_CONV_SPLIT, SONDE_GPU_GEMM_SPLIT) says otherwise: 0 turns the split
// off, N > 0 sets min_tiles.
inline int64_t AutoKSplits(int64_t blocks, int64_t slots, int64_t k_tiles, int min_tiles, const char* env) {
  const char* v = std::getenv(env);
  if (v && *v) min_tiles = std::atoi(v);
  if (min_tiles <= 0 || k_tiles <= 0) return 1;
  return AutoKSplits(blocks, slots, std::min<int64_t>(k_tiles / min_tiles, 4096));
}

}  // namespace SONDE_GPU_NS
}  // namespace sonde
