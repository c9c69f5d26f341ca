#include "runtime/gpu_plan.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <utility>

namespace sonde {

namespace {

// As the CPU executor: enough for a few concurrent runs without holding many arenas idle.
constexpr size_t kMaxIdleStates = 4;
// The error record the tensor ops write (native/kernels/tensor/cuda/tensor.cu): code, kind, value.
constexpr size_t kErrorWords = 3;
enum : uint64_t { kErrDivZero = 1, kErrPowZeroNeg = 2, kErrIndex = 3 };
// Pool kinds of the conv family's pool2d op.
constexpr int kPoolGlobalAverage = 2;
// The gemm op's operand types.
constexpr int kGemmF32 = 0, kGemmBf16 = 2;

void SetDims(GpuOpCall& c, const char* prefix, const size_t* dims, size_t rank) {
  for (size_t i = 0; i < rank; ++i) c.params[prefix + std::to_string(i)] = static_cast<double>(dims[i]);
}
void SetStrides(GpuOpCall& c, const char* prefix, const ptrdiff_t* strides, size_t rank) {
  for (size_t i = 0; i < rank; ++i) c.params[prefix + std::to_string(i)] = static_cast<double>(strides[i]);
}

}  // namespace

struct GpuPlan::RunState {
  std::unique_ptr<GpuAllocation> arena, error;
  std::vector<std::unique_ptr<GpuAllocation>> inputs, outputs;
  std::vector<unsigned char*> bases;  // per plan buffer
  std::vector<GpuOpCall> calls;       // the plan's calls, buffers filled for this state
  size_t bytes = 0;
  // Every step of a run as one graph over this state's buffers (captured at its first untimed run):
  // one launch instead of one per step, which for a CNN of a hundred small layers is most of the
  // host's work per run.
  std::unique_ptr<GpuGraph> graph;
};

std::unique_ptr<GpuPlan> GpuPlan::Create(std::shared_ptr<GpuDevice> device, std::vector<PlanBufferDesc> buffers,
                                         std::vector<PlanStep> steps, size_t arena_bytes,
                                         std::vector<size_t> input_bytes, std::vector<size_t> output_bytes,
                                         std::string* error) {
  std::unique_ptr<GpuPlan> plan(new GpuPlan());
  *error = ValidatePlanSpec(buffers, steps, arena_bytes, input_bytes, output_bytes, &plan->input_align_, &plan->output_align_);
  if (!error->empty()) return nullptr;
  plan->device_ = std::move(device);
  plan->buffers_ = std::move(buffers);
  plan->steps_ = std::move(steps);
  plan->arena_bytes_ = arena_bytes;
  plan->input_bytes_ = std::move(input_bytes);
  plan->output_bytes_ = std::move(output_bytes);
  // Device data from another device would be read through a foreign pointer.
  for (size_t i = 0; i < plan->buffers_.size(); ++i) {
    const PlanBufferDesc& b = plan->buffers_[i];
    if (b.kind == PlanBufferKind::kDevice && &b.device->device() != plan->device_.get())
      return *error = "buffer " + std::to_string(i) + ": device data lives on " + b.device->device().info().id + ", not " +
                      plan->device_->info().id, nullptr;
  }
  for (size_t i = 0; i < plan->steps_.size(); ++i) {
    const PlanStep& s = plan->steps_[i];
    for (const auto* a : {s.gpu_weights.get(), s.gpu_bias.get()})
      if (a && &a->device() != plan->device_.get())
        return *error = "step " + std::to_string(i) + " (node '" + s.node + "'): its weights live on " + a->device().info().id +
                        ", not " + plan->device_->info().id, nullptr;
  }
  plan->calls_.resize(plan->steps_.size());
  for (size_t i = 0; i < plan->steps_.size(); ++i) {
    std::string why;
    if (!plan->BuildCall(i, plan->steps_[i], &plan->calls_[i], &why)) {
      *error = "step " + std::to_string(i) + " (" + PlanOpName(plan->steps_[i].op) + ", node '" + plan->steps_[i].node + "'): " + why;
      return nullptr;
    }
  }
  // Consts are uploaded once, here: runs only read them.
  plan->consts_.resize(plan->buffers_.size());
  std::shared_ptr<GpuStream> stream = plan->device_->AcquireStream();
  for (size_t i = 0; i < plan->buffers_.size(); ++i) {
    const PlanBufferDesc& b = plan->buffers_[i];
    if (b.kind != PlanBufferKind::kConst) continue;
    plan->consts_[i] = std::make_unique<GpuAllocation>(plan->device_, std::max<size_t>(b.bytes, 1), "a plan constant");
    if (b.bytes) stream->Upload(plan->consts_[i]->data(), b.data->data(), b.bytes);
    plan->const_bytes_ += b.bytes;
  }
  stream->Synchronize();
  // The host copies are not needed any more: the device holds the consts.
  for (PlanBufferDesc& b : plan->buffers_) b.data.reset();
  plan->idle_states_.reserve(kMaxIdleStates);
  return plan;
}

GpuPlan::~GpuPlan() = default;

bool GpuPlan::BuildCall(size_t index, const PlanStep& s, Call* out, std::string* error) const {
  GpuOpCall& c = out->call;
  auto at = [&](const PlanRef& r) { out->slots.push_back({Slot::kPlanBuffer, r.buffer, r.byte_offset, nullptr}); };
  // A strided operand: the whole buffer, its element offset as a param.
  auto whole = [&](const PlanRef& r, const char* off_name) {
    out->slots.push_back({Slot::kPlanBuffer, r.buffer, 0, nullptr});
    c.params[off_name] = static_cast<double>(r.offset);
  };
  auto fixed = [&](const GpuAllocation* a) { out->slots.push_back({Slot::kFixed, 0, 0, a}); };
  auto error_record = [&] {
    out->slots.push_back({Slot::kErrorRecord, 0, 0, nullptr});
    c.params["code"] = static_cast<double>(index + 1);
  };
  auto set = [&](const char* k, double v) { c.params[k] = v; };
  const size_t rank = s.shape.rank;
  switch (s.op) {
    case PlanOp::kGpuConv: {
      c.op = "conv2d";
      WindowShape ws;
      const std::string e = ResolveWindow(s.window, s.h, s.w, &ws);
      if (!e.empty()) return *error = e, false;
      // The conv op takes pads below the dilated kernel extent only (its tiles assume it).
      if (ws.pad_t >= (s.window.kh - 1) * s.window.dh + 1 || ws.pad_b >= (s.window.kh - 1) * s.window.dh + 1 ||
          ws.pad_l >= (s.window.kw - 1) * s.window.dw + 1 || ws.pad_r >= (s.window.kw - 1) * s.window.dw + 1)
        return *error = "pads as large as the kernel have no GPU path", false;
      at(s.in[0]);
      fixed(s.gpu_weights.get());
      fixed(s.gpu_bias.get());
      at(s.out[0]);
      if (s.in[1].present()) at(s.in[1]);
      set("n", s.n), set("cIn", s.c_in), set("h", s.h), set("w", s.w), set("cOut", s.c_out), set("groups", s.groups);
      set("kh", s.window.kh), set("kw", s.window.kw), set("sh", s.window.sh), set("sw", s.window.sw);
      set("dh", s.window.dh), set("dw", s.window.dw);
      set("pt", ws.pad_t), set("pl", ws.pad_l), set("pb", ws.pad_b), set("pr", ws.pad_r);
      set("bf16", s.bf16), set("residual", s.in[1].present()), set("residualBeforeActivation", s.flag);
      set("activation", s.kind), set("alpha", s.alpha), set("beta", s.beta);
      break;
    }
    case PlanOp::kGpuGemm:
      c.op = "gemm";
      at(s.in[0]);
      fixed(s.gpu_weights.get());
      at(s.out[0]);
      if (s.in[1].present()) at(s.in[1]);
      if (s.in[2].present()) at(s.in[2]);
      set("m", s.m), set("k", s.k), set("n", s.n), set("aType", kGemmF32), set("bType", s.bf16 ? kGemmBf16 : kGemmF32);
      set("hasBias", s.in[1].present()), set("hasResidual", s.in[2].present());
      set("residualBeforeActivation", s.flag), set("activation", s.kind), set("alpha", s.alpha), set("beta", s.beta);
      break;
    case PlanOp::kMatMul:
      c.op = "tensor_matmul";
      whole(s.in[0], "aOff");
      whole(s.in[1], "bOff");
      at(s.out[0]);
      set("rank", rank);
      SetDims(c, "d", s.shape.dims, rank);
      SetStrides(c, "a", s.strides[0], rank);
      SetStrides(c, "b", s.strides[1], rank);
      set("m", s.m), set("k", s.k), set("n", s.n), set("transB", s.flag);
      break;
    case PlanOp::kUnary:
      c.op = "tensor_unary";
      at(s.in[0]);
      at(s.out[0]);
      set("kind", s.kind), set("dtype", static_cast<int>(s.dtype)), set("count", s.count), set("alpha", s.alpha), set("beta", s.beta);
      break;
    case PlanOp::kBinary:
      c.op = "tensor_binary";
      whole(s.in[0], "aOff");
      whole(s.in[1], "bOff");
      at(s.out[0]);
      error_record();
      set("kind", s.kind), set("dtype", static_cast<int>(s.dtype)), set("rank", rank);
      SetDims(c, "d", s.shape.dims, rank);
      SetStrides(c, "a", s.strides[0], rank);
      SetStrides(c, "b", s.strides[1], rank);
      break;
    case PlanOp::kWhere:
      c.op = "tensor_where";
      whole(s.in[0], "cOff");
      whole(s.in[1], "xOff");
      whole(s.in[2], "yOff");
      at(s.out[0]);
      set("rank", rank), set("elemBytes", s.elem_bytes);
      SetDims(c, "d", s.shape.dims, rank);
      SetStrides(c, "c", s.strides[0], rank);
      SetStrides(c, "x", s.strides[1], rank);
      SetStrides(c, "y", s.strides[2], rank);
      break;
    case PlanOp::kCopy:
      c.op = "tensor_copy";
      whole(s.in[0], "xOff");
      whole(s.out[0], "yOff");
      set("rank", rank), set("elemBytes", s.elem_bytes);
      SetDims(c, "d", s.shape.dims, rank);
      SetStrides(c, "x", s.strides[0], rank);
      SetStrides(c, "y", s.strides[1], rank);
      break;
    case PlanOp::kFill:
      c.op = "tensor_fill";
      at(s.out[0]);
      set("dtype", static_cast<int>(s.dtype)), set("count", s.count), set("value", s.value);
      break;
    case PlanOp::kGather:
      c.op = "tensor_gather";
      at(s.in[0]);
      at(s.in[1]);
      at(s.out[0]);
      error_record();
      set("outer", s.outer), set("axisLen", s.mid), set("inner", s.inner), set("nIndices", s.count);
      set("elemBytes", s.elem_bytes), set("indices64", s.dtype_to == ElemType::kInt64);
      break;
    case PlanOp::kPool: {
      c.op = "pool2d";
      WindowShape ws;
      const std::string e = ResolveWindow(s.window, s.h, s.w, &ws);
      if (!e.empty()) return *error = e, false;
      if (ws.pad_t >= (s.window.kh - 1) * s.window.dh + 1 || ws.pad_b >= (s.window.kh - 1) * s.window.dh + 1 ||
          ws.pad_l >= (s.window.kw - 1) * s.window.dw + 1 || ws.pad_r >= (s.window.kw - 1) * s.window.dw + 1)
        return *error = "pads as large as the window have no GPU path", false;
      at(s.in[0]);
      at(s.out[0]);
      set("kind", s.kind), set("planes", s.outer), set("h", s.h), set("w", s.w);
      set("kh", s.window.kh), set("kw", s.window.kw), set("sh", s.window.sh), set("sw", s.window.sw);
      set("dh", s.window.dh), set("dw", s.window.dw);
      set("pt", ws.pad_t), set("pl", ws.pad_l), set("pb", ws.pad_b), set("pr", ws.pad_r), set("countIncludePad", s.flag);
      break;
    }
    case PlanOp::kGlobalAveragePool:
      if (s.blocked[0].present()) return *error = "blocked (NCHW16c) operands run on the CPU only", false;
      c.op = "pool2d";
      at(s.in[0]);
      at(s.out[0]);
      set("kind", kPoolGlobalAverage), set("planes", s.outer), set("h", s.inner), set("w", 1);
      break;
    case PlanOp::kSoftmax:
    case PlanOp::kLogSoftmax:
      c.op = "tensor_softmax";
      at(s.in[0]);
      at(s.out[0]);
      set("outer", s.outer), set("axis", s.mid), set("inner", s.inner), set("log", s.op == PlanOp::kLogSoftmax);
      break;
    case PlanOp::kLayerNorm:
      c.op = "tensor_layer_norm";
      at(s.in[0]);
      at(s.out[0]);
      if (s.in[1].present()) at(s.in[1]);
      if (s.in[2].present()) at(s.in[2]);
      set("rows", s.outer), set("cols", s.inner), set("epsilon", s.epsilon);
      set("hasScale", s.in[1].present()), set("hasBias", s.in[2].present());
      break;
    case PlanOp::kChannelAffine:
      c.op = "tensor_channel_affine";
      at(s.in[0]);
      at(s.in[1]);
      at(s.in[2]);
      at(s.out[0]);
      set("outer", s.outer), set("channels", s.mid), set("inner", s.inner);
      break;
    case PlanOp::kReduce:
      c.op = "tensor_reduce";
      at(s.in[0]);
      at(s.out[0]);
      set("kind", s.kind), set("dtype", static_cast<int>(s.dtype)), set("outer", s.outer), set("r", s.mid), set("inner", s.inner);
      break;
    case PlanOp::kArgMax:
      c.op = "tensor_argmax";
      at(s.in[0]);
      at(s.out[0]);
      set("outer", s.outer), set("r", s.mid), set("inner", s.inner), set("selectLastIndex", s.flag);
      break;
    case PlanOp::kTopK:
      c.op = "tensor_topk";
      at(s.in[0]);
      at(s.out[0]);
      at(s.out[1]);
      set("outer", s.outer), set("r", s.mid), set("inner", s.inner), set("k", s.k), set("largest", s.flag);
      break;
    case PlanOp::kCast:
      c.op = "tensor_cast";
      at(s.in[0]);
      at(s.out[0]);
      set("from", static_cast<int>(s.dtype)), set("to", static_cast<int>(s.dtype_to)), set("count", s.count);
      break;
    case PlanOp::kPad:
      c.op = "tensor_pad";
      at(s.in[0]);
      at(s.out[0]);
      set("dtype", static_cast<int>(s.dtype)), set("rank", rank), set("mode", s.kind), set("value", s.value);
      SetDims(c, "in", s.shape.dims, rank);
      SetStrides(c, "b", s.pad_begin, rank);
      SetStrides(c, "e", s.pad_end, rank);
      break;
    case PlanOp::kConv:
    case PlanOp::kGemm:
    case PlanOp::kSpmm:
    case PlanOp::kReorder:
    case PlanOp::kConvChain:
      return *error = "runs on a CPU plan only (its weights are packed for the CPU)", false;
  }
  out->fn = FindGpuOp(c.op, device_->info().emulated);
  if (!out->fn) return *error = "no GPU op '" + c.op + "' is registered for " + device_->info().id, false;
  c.buffers.resize(out->slots.size());
  for (size_t i = 0; i < out->slots.size(); ++i)
    if (out->slots[i].kind == Slot::kFixed) c.buffers[i] = {out->slots[i].fixed->data(), out->slots[i].fixed->bytes()};
  return true;
}

std::unique_ptr<GpuPlan::RunState> GpuPlan::AcquireState() const {
  {
    std::lock_guard<std::mutex> lock(states_mu_);
    if (!idle_states_.empty()) {
      std::unique_ptr<RunState> st = std::move(idle_states_.back());
      idle_states_.pop_back();
      return st;
    }
  }
  auto st = std::make_unique<RunState>();
  // Every allocation is at least one byte: a zero-byte operand still needs a distinct address.
  st->arena = std::make_unique<GpuAllocation>(device_, std::max<size_t>(arena_bytes_, 1), "a session run's arena");
  st->error = std::make_unique<GpuAllocation>(device_, kErrorWords * sizeof(uint64_t), "a session run's error record");
  st->bytes = st->arena->bytes() + st->error->bytes();
  for (size_t b : input_bytes_) {
    st->inputs.push_back(std::make_unique<GpuAllocation>(device_, std::max<size_t>(b, 1), "a session input"));
    st->bytes += st->inputs.back()->bytes();
  }
  for (size_t b : output_bytes_) {
    st->outputs.push_back(std::make_unique<GpuAllocation>(device_, std::max<size_t>(b, 1), "a session output"));
    st->bytes += st->outputs.back()->bytes();
  }
  st->bases.resize(buffers_.size());
  for (size_t i = 0; i < buffers_.size(); ++i) {
    const PlanBufferDesc& b = buffers_[i];
    unsigned char* base = nullptr;
    switch (b.kind) {
      case PlanBufferKind::kInput: base = static_cast<unsigned char*>(st->inputs[b.index]->data()); break;
      case PlanBufferKind::kOutput: base = static_cast<unsigned char*>(st->outputs[b.index]->data()); break;
      case PlanBufferKind::kArena: base = static_cast<unsigned char*>(st->arena->data()) + b.offset; break;
      case PlanBufferKind::kConst: base = static_cast<unsigned char*>(consts_[i]->data()); break;
      case PlanBufferKind::kDevice: base = static_cast<unsigned char*>(b.device->data()); break;
    }
    st->bases[i] = base;
  }
  st->calls.reserve(calls_.size());
  for (const Call& call : calls_) {
    GpuOpCall c = call.call;
    for (size_t i = 0; i < call.slots.size(); ++i) {
      const Slot& sl = call.slots[i];
      if (sl.kind == Slot::kPlanBuffer)
        c.buffers[i] = {st->bases[sl.buffer] + sl.byte_offset, buffers_[sl.buffer].bytes - sl.byte_offset};
      else if (sl.kind == Slot::kErrorRecord)
        c.buffers[i] = {st->error->data(), st->error->bytes()};
    }
    st->calls.push_back(std::move(c));
  }
  return st;
}

void GpuPlan::ReleaseState(std::unique_ptr<RunState> state) const {
  std::lock_guard<std::mutex> lock(states_mu_);
  if (idle_states_.size() < kMaxIdleStates) idle_states_.push_back(std::move(state));
}

size_t GpuPlan::device_bytes() const {
  std::lock_guard<std::mutex> lock(states_mu_);
  size_t total = const_bytes_;
  for (const auto& st : idle_states_) total += st->bytes;
  return total;
}

bool GpuPlan::Run(const CancelFlag* cancel, const void* const* inputs, void* const* outputs, double* timings,
                  std::string* error) const {
  const auto started = std::chrono::steady_clock::now();
  std::unique_ptr<RunState> st = AcquireState();
  // A state goes back to the pool only after a run that left its stream idle; on a device error
  // it is dropped (its memory freed) with the exception.
  std::shared_ptr<GpuStream> stream = device_->AcquireStream();
  const GpuDeviceInfo& info = device_->info();
  stream->Fill(st->error->data(), 0, st->error->bytes());
  for (size_t i = 0; i < input_bytes_.size(); ++i)
    if (input_bytes_[i]) stream->Upload(st->inputs[i]->data(), inputs[i], input_bytes_[i]);
  bool cancelled = false;
  // A profiled run times each step, so it launches them one by one; so does a run on a plan whose
  // capture failed once (an op that cannot be captured), and a cancelled run stops between steps.
  if (!st->graph && !timings && GpuGraphsEnabled() && capturable_.load(std::memory_order_relaxed)) {
    try {
      st->graph = CaptureGraph(*stream, [&] {
        for (size_t i = 0; i < calls_.size(); ++i) calls_[i].fn(*stream, info, st->calls[i]);
      });
    } catch (const GpuError&) {
      capturable_.store(false, std::memory_order_relaxed);  // ran directly below, where a real error rethrows
    }
  }
  if (st->graph && !timings) {
    if (cancel && cancel->load())
      cancelled = true;
    else
      st->graph->Replay(*stream);
  } else {
    for (size_t i = 0; i < calls_.size(); ++i) {
      if (cancel && cancel->load()) {
        cancelled = true;
        break;
      }
      if (timings) stream->MarkStart();
      calls_[i].fn(*stream, info, st->calls[i]);
      if (timings) timings[i] = stream->MarkStopMs() * 1e6;
    }
  }
  uint64_t record[kErrorWords] = {};
  if (!cancelled) {
    for (size_t i = 0; i < output_bytes_.size(); ++i)
      if (output_bytes_[i]) stream->Download(outputs[i], st->outputs[i]->data(), output_bytes_[i]);
    stream->Download(record, st->error->data(), sizeof(record));
  }
  stream->Synchronize();
  ReleaseState(std::move(st));
  last_run_ns_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count(),
                     std::memory_order_relaxed);
  if (cancelled) return false;
  if (record[0] != 0) {
    const size_t step = static_cast<size_t>(record[0] - 1);
    const PlanStep& s = steps_[step < steps_.size() ? step : 0];
    std::string why;
    switch (record[1]) {
      case kErrDivZero: why = "integer division by zero"; break;
      case kErrPowZeroNeg: why = "integer 0 raised to a negative power"; break;
      case kErrIndex: {
        const long long len = static_cast<long long>(s.mid);
        why = "index " + std::to_string(static_cast<long long>(record[2])) + " is out of range [" + std::to_string(-len) +
              ", " + std::to_string(len) + ")";
        break;
      }
      default: why = "the device reported an unknown failure"; break;
    }
    *error = "node '" + s.node + "': " + why;
    return false;
  }
  return true;
}

}  // namespace sonde
