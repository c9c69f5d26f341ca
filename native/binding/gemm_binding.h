#pragma once
#include <napi.h>

#include "binding/shared_handle.h"
#include "ops/gemm.h"

namespace sonde {

// Fills info() of a live packed-weights handle.
void Describe(Napi::Object& o, const PackedGemmWeights& w);

// JS handle of packed fp32 GEMM weights (shared with running jobs; see shared_handle.h).
using PackedGemmHandle = SharedHandle<PackedGemmWeights>;
constexpr const char* kPackedGemmClass = "PackedGemmHandle";

}  // namespace sonde
