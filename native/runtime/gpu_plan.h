// The compiled-plan executor on a GPU (contract: lib/session/plan.ts, as for the CPU's Plan). Plain
// C++ over runtime/cuda/gpu.h, so it is the same code for a real device and the emulator. Create()
// validates the plan with the CPU executor's checks (ValidatePlanSpec), uploads its consts once, and
// turns every step into a call of a registered GPU op (found once, by name, for the device's mode);
// the conv and gemm steps carry weights that the session uploaded at load. A run uploads the inputs,
// runs every step in order on one stream, downloads the outputs and synchronises once. The steps'
// launches are captured once per run state as a graph (runtime/cuda/gpu.h) that each run replays
// with one launch; a profiled run (per-step timings) and SONDE_GPU_GRAPHS=0 launch step by step,
// checking the cancel flag between launches (a replay checks it before). Concurrent runs each take
// their own device state (arena, input/output buffers, error record, graph) from a small pool.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/cuda/gpu.h"
#include "runtime/plan.h"

namespace sonde {

class GpuPlan {
 public:
  // Returns null with *error (naming the step) for an inconsistent plan or a step kind that has no
  // GPU path (CPU-only steps: conv/gemm/spmm on CPU handles, NCHW16c reorders). Device failures
  // (out of memory for the consts) throw GpuError.
  static std::unique_ptr<GpuPlan> Create(std::shared_ptr<GpuDevice> device, std::vector<PlanBufferDesc> buffers,
                                         std::vector<PlanStep> steps, size_t arena_bytes,
                                         std::vector<size_t> input_bytes, std::vector<size_t> output_bytes,
                                         std::string* error);
  ~GpuPlan();

  // inputs/outputs: host buffers of input_bytes() / output_bytes(). timings: null or one slot per
  // step for its device time in ns (stream events; each timed step waits for the one before).
  // Returns false when cancelled (*cancel set) or with *error = "node '<name>': <why>" for a failure
  // the data decided (integer division by zero, a Gather index out of range). Device failures
  // throw GpuError.
  bool Run(const CancelFlag* cancel, const void* const* inputs, void* const* outputs, double* timings,
           std::string* error) const;

  const std::vector<PlanStep>& steps() const { return steps_; }
  const std::vector<size_t>& input_bytes() const { return input_bytes_; }
  const std::vector<size_t>& output_bytes() const { return output_bytes_; }
  const std::vector<size_t>& input_align() const { return input_align_; }
  const std::vector<size_t>& output_align() const { return output_align_; }
  size_t arena_bytes() const { return arena_bytes_; }
  const GpuDeviceInfo& device_info() const { return device_->info(); }
  // Device memory the plan holds while idle: its consts plus the pooled run states.
  size_t device_bytes() const;
  int64_t last_run_ns() const { return last_run_ns_.load(std::memory_order_relaxed); }
  // Host memory the plan holds (for V8's accounting): its steps and calls; the data is on the device.
  size_t bytes() const { return steps_.size() * (sizeof(PlanStep) + sizeof(Call)); }

 private:
  // Where one operand of an op call comes from.
  struct Slot {
    enum Kind : uint8_t { kPlanBuffer, kFixed, kErrorRecord } kind = kPlanBuffer;
    uint32_t buffer = 0;     // kPlanBuffer: the plan buffer
    size_t byte_offset = 0;  // kPlanBuffer: into it
    const GpuAllocation* fixed = nullptr;
  };
  struct Call {
    GpuOpFn fn = nullptr;
    GpuOpCall call;  // params filled once; buffers per run from slots
    std::vector<Slot> slots;
  };
  struct RunState;

  GpuPlan() = default;
  std::unique_ptr<RunState> AcquireState() const;
  void ReleaseState(std::unique_ptr<RunState> state) const;
  bool BuildCall(size_t index, const PlanStep& s, Call* out, std::string* error) const;

  std::shared_ptr<GpuDevice> device_;
  std::vector<PlanBufferDesc> buffers_;
  std::vector<PlanStep> steps_;
  std::vector<Call> calls_;
  std::vector<std::unique_ptr<GpuAllocation>> consts_;  // per buffer (null unless kConst)
  std::vector<size_t> input_bytes_, output_bytes_, input_align_, output_align_;
  size_t arena_bytes_ = 0, const_bytes_ = 0;

  mutable std::mutex states_mu_;
  mutable std::vector<std::unique_ptr<RunState>> idle_states_;
  mutable std::atomic<int64_t> last_run_ns_{-1};
  // Cleared when capturing the steps as a graph failed: runs then launch them one by one.
  mutable std::atomic<bool> capturable_{true};
};

}  // namespace sonde
