// xoshiro128** (Blackman and Vigna), one step as lib/llm/sampling.ts's Rng.nextUint32: the draws of
// chained decode steps on the host (ops/chain_sampling.cc) and on a GPU (llm/cuda/llm.cu) from one
// definition, so both keep the TypeScript sampler's stream.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SONDE_XOSHIRO_FN __host__ __device__ inline
#else
#define SONDE_XOSHIRO_FN inline
#endif

namespace sonde {

SONDE_XOSHIRO_FN uint32_t XoshiroNext(uint32_t* s) {
  const uint32_t x = s[1] * 5u;
  const uint32_t result = ((x << 7) | (x >> 25)) * 9u;
  const uint32_t t = s[1] << 9;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = (s[3] << 11) | (s[3] >> 21);
  return result;
}

}  // namespace sonde

#undef SONDE_XOSHIRO_FN
