// Bindings of the GPU plan executor (runtime/gpu_plan.h): createGpuPlan(device, spec) ->
// GpuPlanHandle and gpuPlanRun(plan, inputs, outputs, cancel?, timings?) -> Promise<void>. The spec
// is read exactly as the CPU's (ReadPlanSpec); a step with no GPU path or an inconsistent spec is a
// compiler bug (ERR_SONDE_INTERNAL naming the step); device failures keep their typed codes
// (out of memory naming the device and the request).
#include <napi.h>

#include <memory>
#include <string>
#include <vector>

#include "binding/addon.h"
#include "binding/plan_spec.h"
#include "binding/shared_handle.h"
#include "runtime/gpu_plan.h"

namespace sonde {

void Describe(Napi::Object& o, const GpuPlan& p) {
  o.Set("steps", static_cast<double>(p.steps().size()));
  o.Set("arenaBytes", static_cast<double>(p.arena_bytes()));
  o.Set("bytes", static_cast<double>(p.bytes()));
  o.Set("deviceBytes", static_cast<double>(p.device_bytes()));
  o.Set("device", p.device_info().id);
}

namespace {

using GpuPlanHandle = SharedHandle<GpuPlan>;
constexpr const char* kGpuPlanClass = "GpuPlanHandle";

// createGpuPlan(device, spec) -> GpuPlanHandle (synchronous, like createPlan: validation, then the
// consts uploaded once).
Napi::Value CreateGpuPlan(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString())
    throw MakeError(env, codes::kInvalidArgument, "createGpuPlan: expected (device, spec)");
  const std::string id = info[0].As<Napi::String>();
  PlanSpecParts p = ReadPlanSpec(env, addon, info[1]);
  std::unique_ptr<GpuPlan> plan;
  std::string error;
  try {
    std::shared_ptr<GpuDevice> device = OpenGpuDevice(id);
    plan = GpuPlan::Create(std::move(device), std::move(p.buffers), std::move(p.steps), p.arena_bytes,
                           std::move(p.input_bytes), std::move(p.output_bytes), &error);
  } catch (const GpuError& e) {
    throw MakeError(env, GpuErrorCode(e.code), std::string("createGpuPlan: ") + e.what());
  }
  if (!plan) throw MakeError(env, codes::kInternal, "createGpuPlan: " + error);
  return GpuPlanHandle::Wrap(env, addon, kGpuPlanClass, std::shared_ptr<const GpuPlan>(std::move(plan)));
}

class GpuPlanJob : public AsyncJob {
 public:
  std::shared_ptr<const GpuPlan> plan;
  std::vector<const void*> inputs;
  std::vector<void*> outputs;
  double* timings = nullptr;
  void Execute(Addon&) override {
    std::string error;
    try {
      if (!plan->Run(cancel.get(), inputs.data(), outputs.data(), timings, &error) && !cancel->load())
        Fail(codes::kInvalidArgument, std::move(error));
    } catch (const GpuError& e) {
      Fail(GpuErrorCode(e.code), e.what());
    }
  }
};

// gpuPlanRun(plan, inputs, outputs, cancel?, timings?) -> Promise<void>
Napi::Value GpuPlanRun(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3) throw MakeError(env, codes::kInvalidArgument, "gpuPlanRun: expected (plan, inputs, outputs)");
  if (!GpuPlanHandle::Is(addon, kGpuPlanClass, info[0]))
    throw MakeError(env, codes::kInvalidArgument, "gpuPlanRun: plan must be a GpuPlanHandle");
  auto job = std::make_unique<GpuPlanJob>();
  job->plan = GpuPlanHandle::Get(info[0]);
  if (!job->plan) throw MakeError(env, codes::kDisposed, "gpuPlanRun: the plan has been disposed");
  job->inputs = ReadPlanViews<const void*>(env, info[1], job->plan->input_bytes(), job->plan->input_align(), "inputs", job.get());
  job->outputs = ReadPlanViews<void*>(env, info[2], job->plan->output_bytes(), job->plan->output_align(), "outputs", job.get());
  if (info.Length() > 4 && !info[4].IsUndefined() && !info[4].IsNull()) {
    if (!info[4].IsTypedArray() || info[4].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
        info[4].As<Napi::Float64Array>().ElementLength() != job->plan->steps().size())
      throw MakeError(env, codes::kInvalidArgument, "gpuPlanRun: timings must be a Float64Array with one slot per step (" +
                                                        std::to_string(job->plan->steps().size()) + ")");
    job->timings = info[4].As<Napi::Float64Array>().Data();
    job->Keep(info[4]);
  }
  job->Keep(info[0]);
  // One pool thread: the work is on the device, the thread only launches and waits.
  job->threads = 1;
  addon.AttachCancel(info, 3, job.get());
  return addon.Start(env, std::move(job));
}

}  // namespace

void RegisterGpuPlanBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  GpuPlanHandle::Register(env, addon, kGpuPlanClass);
  addon.Export(env, exports, "createGpuPlan", CreateGpuPlan);
  addon.Export(env, exports, "gpuPlanRun", GpuPlanRun);
}

}  // namespace sonde
