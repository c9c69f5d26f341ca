// What the CPU and GPU plan bindings share (plan_binding.cc): reading a PlanSpec of
// lib/session/plan.ts into the executors' structs, and checking a run's input/output views.
#pragma once
#include <napi.h>

#include <cstddef>
#include <vector>

#include "binding/addon.h"
#include "runtime/cuda/gpu.h"
#include "runtime/plan.h"

namespace sonde {

struct PlanSpecParts {
  std::vector<PlanBufferDesc> buffers;
  std::vector<PlanStep> steps;
  size_t arena_bytes = 0;
  std::vector<size_t> input_bytes, output_bytes;
};

// Throws ERR_SONDE_INTERNAL naming the step or buffer for a malformed spec (a compiler bug).
PlanSpecParts ReadPlanSpec(Napi::Env env, Addon& addon, Napi::Value spec);

// The bytes of an ArrayBufferView (a TypedArray or a DataView); false for anything else.
bool ViewBytes(Napi::Value v, unsigned char** data, size_t* bytes);

// Checks views[i] against the plan's byte counts and alignments, keeps each view alive through the
// job and returns its data pointers; a bad one throws ERR_INVALID_ARGUMENT naming it.
template <typename Ptr>
std::vector<Ptr> ReadPlanViews(Napi::Env env, Napi::Value v, const std::vector<size_t>& expected,
                               const std::vector<size_t>& align, const char* what, AsyncJob* job);

// createGpuPlan / gpuPlanRun (plan_gpu_binding.cc), registered with the CPU plan's bindings.
void RegisterGpuPlanBindings(Napi::Env env, Napi::Object exports, Addon& addon);
// The typed error code of a GPU failure (gpu_binding.cc).
const char* GpuErrorCode(GpuErrc c);

}  // namespace sonde
