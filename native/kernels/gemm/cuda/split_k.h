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

// Least K tiles per split from an A/B switch (SONDE_GPU_CONV_SPLIT, SONDE_GPU_GEMM_SPLIT): unset,
// `fallback`; 0 turns the automatic split off. Callers read it once (a static), not per launch.
inline int KSplitMinTiles(const char* env, int fallback) {
  const char* v = std::getenv(env);
  return v && *v ? std::max(0, std::atoi(v)) : fallback;
}

// The automatic count for `k_tiles` K tiles, each split keeping at least `min_tiles` (0: no split).
inline int64_t AutoKSplits(int64_t blocks, int64_t slots, int64_t k_tiles, int min_tiles) {
  if (min_tiles <= 0 || k_tiles <= 0) return 1;
  return AutoKSplits(blocks, slots, std::min<int64_t>(k_tiles / min_tiles, 4096));
}

// A K split as the kernels run it: `splits` blocks of `tiles_per_split` K tiles (none empty).
struct KSplit {
  int splits = 1, tiles_per_split = 1;
  bool residual_in_sums = false;  // the output starts as the residual; the epilogue after adds none
};

// `want` splits of k_tiles, given the residual: one added before the activation is where the sums
// start (residual_in_sums; in the output itself it is already there), while one in the output with
// any other epilogue would be lost to the zeroing, so that never splits.
inline KSplit MakeKSplit(int64_t want, int64_t k_tiles, bool residual_in_sums, bool residual_is_output) {
  KSplit k;
  k.residual_in_sums = residual_in_sums;
  if (k_tiles <= 0 || (residual_is_output && !residual_in_sums)) want = 1;
  want = std::max<int64_t>(1, std::min(want, std::max<int64_t>(k_tiles, 1)));
  k.tiles_per_split = static_cast<int>(std::max<int64_t>((k_tiles + want - 1) / want, 1));
  k.splits = k_tiles > 0 ? static_cast<int>((k_tiles + k.tiles_per_split - 1) / k.tiles_per_split) : 1;
  return k;
}

}  // namespace SONDE_GPU_NS
}  // namespace sonde
