// Weights of the quantised-weight kernels as the bindings receive them: a Uint8Array in GGUF row
// layout, or a tensor of a mapped GGUF file (quant_binding.cc, moe_binding.cc).
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "formats/gguf.h"

namespace sonde {

class Addon;

struct WeightsRef {
  const uint8_t* data = nullptr;
  std::shared_ptr<const GgufFile> file;  // keeps a mapping alive while a job runs
};

// Second line of validation (lib/ checks first and names the user's parameter): after this, the
// kernel can read n rows of k elements of `type` from the returned pointer. Throws a JS error.
WeightsRef ResolveWeights(Addon& addon, Napi::Env env, const std::string& where, Napi::Value w, Napi::Value index,
                          int32_t type, size_t k, size_t n);

}  // namespace sonde
