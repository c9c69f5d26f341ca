// The compiled-plan executor: an immutable, validated list of steps over buffers (contract:
// lib/session/plan.ts). A run is one native call that executes the steps in order on the pool,
// checking the cancel flag between steps. Everything that can be decided once (enum names, operand
// byte offsets, element sizes, extents) is decided in Create(), so a run does no string work and no
// allocation once its arena has been made.
#pragma once
#include <cstddef>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/elementwise/elementwise.h"
#include "ops/conv.h"
#include "ops/elementwise.h"
#include "ops/gemm.h"
#include "ops/gemm_lowp.h"
#include "ops/spmm.h"
#include "ops/tensor_ops.h"
#include "runtime/cuda/gpu.h"
#include "runtime/thread_pool.h"

namespace sonde {

// kDevice: GPU plans only, constant data already in device memory (an initializer a session uploaded
// once at load, shared by all its plans).
enum class PlanBufferKind : uint8_t { kInput, kOutput, kArena, kConst, kDevice };

struct PlanBufferDesc {
  PlanBufferKind kind = PlanBufferKind::kArena;
  size_t index = 0;   // input / output: the run's inputs[index] / outputs[index]
  size_t offset = 0;  // arena: byte offset, a multiple of 64
  size_t bytes = 0;
  // const: the plan's own copy (made once at creation; consts can be large, so never per run).
  std::shared_ptr<const std::vector<unsigned char>> data;
  std::shared_ptr<const GpuAllocation> device;  // kDevice
};

constexpr uint32_t kNoBuffer = UINT32_MAX;

// A buffer index and an element offset (in the operand's element type).
struct PlanRef {
  uint32_t buffer = kNoBuffer;
  size_t offset = 0;
  size_t byte_offset = 0;  // offset * element size, filled by Plan::Create
  bool present() const { return buffer != kNoBuffer; }
};

enum class PlanOp : uint8_t {
  kConv, kGemm, kMatMul, kUnary, kBinary, kWhere, kCopy, kFill, kGather, kPool, kGlobalAveragePool, kSoftmax,
  kLogSoftmax, kLayerNorm, kChannelAffine, kReduce, kArgMax, kTopK, kCast, kPad, kSpmm, kReorder, kConvChain,
  // GPU plans only (runtime/gpu_plan.h): conv and gemm on weights already in device memory.
  kGpuConv, kGpuGemm,
};

const char* PlanOpName(PlanOp op);

// One step. Operand slots by op (in = read, out = written; absent optional operands have no buffer):
//   conv          in: x, residual                 out: y
//   convChain     in: x, residual                 out: y     (blocked, all three)
//   gemm, spmm    in: a, bias, residual           out: c
//   matmul        in: a, b                        out: c
//   unary, cast, copy, pool, globalAveragePool, softmax, logSoftmax, reduce, argmax, pad
//                 in: x                           out: y
//   binary        in: a, b                        out: y
//   where         in: cond, x, y                  out: out
//   fill          -                               out: y
//   gather        in: data, indices               out: y
//   layerNorm     in: x, scale, bias              out: y
//   channelAffine in: x, scale, shift             out: y
//   topk          in: x                           out: values, indices
//   reorder       in: x                           out: y
//   gpuConv       in: x, residual                 out: y     (weights, bias: gpu_weights, gpu_bias)
//   gpuGemm       in: a, bias, residual           out: c     (weights: gpu_weights)
struct PlanStep {
  PlanOp op = PlanOp::kFill;
  std::string node;
  PlanRef in[3], out[2];

  // Sizes; which ones a step uses follows lib/session/plan.ts:
  //   conv: n, h, w; gemm/spmm/matmul: m, k, n; unary/fill/cast: count; gather: outer, mid = axisLen,
  //   inner, count = nIndices; pool: outer = planes, h, w; globalAveragePool: outer = planes,
  //   inner = hw; softmax, reduce, argmax, topk (k), channelAffine: outer, mid, inner;
  //   layerNorm: outer = rows, inner = cols; reorder: n, count = channels.
  size_t m = 0, k = 0, n = 0, h = 0, w = 0, count = 0, outer = 0, mid = 0, inner = 0;

  // binary/where/copy: dims and one stride row per strided operand (binary a, b; where cond, x, y;
  // copy x, y); matmul: batch dims and a, b batch strides; pad: the input dims, begin and end.
  Strided shape;
  ptrdiff_t strides[3][kMaxRank] = {};
  ptrdiff_t pad_begin[kMaxRank] = {}, pad_end[kMaxRank] = {};

  int32_t kind = 0;  // UnaryKind, BinaryKind, ReduceKind, PadMode, PoolKind, or a GemmActivation
  ElemType dtype = ElemType::kFloat32;     // operands' type; cast: from
  ElemType dtype_to = ElemType::kFloat32;  // cast: to; gather: the indices' type
  size_t elem_bytes = 4;                   // where, copy, gather
  float alpha = 0.0f, beta = 0.0f, epsilon = 0.0f;
  double value = 0.0;  // fill, pad
  // conv/gemm: residual before activation; matmul: transB; pool: countIncludePad; argmax:
  // selectLastIndex; topk: largest; reorder: to blocked.
  bool flag = false;
  // NCHW16c operands (absent: NCHW): conv x, residual, y; globalAveragePool x; reorder: the
  // blocked side in blocked[0].
  BlockedLayout blocked[3];
  WindowGeometry window;  // pool
  Dims dims3;             // softmax / topk: {outer, mid, inner} for the elementwise ops' Dims form

  std::shared_ptr<const ConvOp> conv;
  std::shared_ptr<const ConvChain> chain;  // convChain: n, h, w and blocked[] as a conv's
  // Derived (Plan::Create): the next conv step's first weights, which this conv prefetches at its end.
  WeightSpan next_weights;
  std::shared_ptr<const PackedGemmWeights> gemm;
  std::shared_ptr<const PackedLowpGemmWeights> gemm_lowp;
  std::shared_ptr<const SparseWeights> sparse;  // spmm
  // spmm as a direct KxK convolution (taps.present): `outer` images at strides[0][0]
  // apart, output rows of ow positions (m = oh * ow). Unphased: an image is c_in x hp x wp (padded),
  // and the A^T row of weight index (c, ky, kx) for output row oy is the image read from
  // (c, oy * sh + ky * dh, kx * dw) (sw = 1). Phased (strides folded into the layout): an image is
  // c_in x sh x sw x hq x wq, hq = ceil(hp / sh), wq = ceil(wp / sw), phase (ry, rx) holding padded
  // rows ry, ry + sh, ... and columns rx, rx + sw, ...; the row is read from phase
  // ((ky * dh) % sh, (kx * dw) % sw) at (oy + ky * dh / sh, kx * dw / sw). Either way ow positions
  // on, past the row's end into the next rows when ow is wider. Plan::Create fills row_stride and
  // tap_offsets (SpmmConvTapOffsets) for the plan's geometry.
  struct SpmmTaps {
    bool present = false;  // the step has taps
    size_t c_in = 0, hp = 0, wp = 0, kh = 0, kw = 0, sh = 1, sw = 1, dh = 1, dw = 1, oh = 0, ow = 0;
    bool phased = false;
    size_t row_stride = 0;  // derived: elements between output rows' first reads
  } taps;
  std::shared_ptr<const std::vector<uint32_t>> tap_offsets;
  // gpuConv / gpuGemm: weights in device memory, uploaded once at load and shared by every plan of
  // a session: conv [c_out, c_in / groups, kh, kw] (window), gemm [k, n]; float32, or bf16 when
  // bf16. gpuConv's bias holds c_out floats (zeros when the model has none).
  std::shared_ptr<const GpuAllocation> gpu_weights, gpu_bias;
  bool bf16 = false;
  size_t c_in = 0, c_out = 0, groups = 1;
  // gemm with m = 1: runs that took the zero-activation-skipping GEMV (for profiles; counted
  // relaxed, concurrent runs may interleave). Made by Plan::Create.
  std::shared_ptr<std::atomic<uint64_t>> skip_runs;
};

// The checks Plan::Create and GpuPlan::Create share: every buffer against the arena and the run's
// inputs and outputs, every step's operands against the buffers (filling the refs' byte offsets).
// input_align / output_align get the alignment each input / output needs. Returns "" or the first
// problem, naming the step (or buffer).
std::string ValidatePlanSpec(std::vector<PlanBufferDesc>& buffers, std::vector<PlanStep>& steps, size_t arena_bytes,
                             const std::vector<size_t>& input_bytes, const std::vector<size_t>& output_bytes,
                             std::vector<size_t>* input_align, std::vector<size_t>* output_align);

class Plan {
 public:
  // Validates everything a run relies on (every operand's strided extent inside its buffer, no
  // write to an input or const buffer, handles present, sizes consistent) and fills the derived
  // fields of the steps. Returns null with *error naming the step (or buffer) otherwise.
  static std::unique_ptr<Plan> Create(std::vector<PlanBufferDesc> buffers, std::vector<PlanStep> steps,
                                      size_t arena_bytes, std::vector<size_t> input_bytes,
                                      std::vector<size_t> output_bytes, std::string* error);
  ~Plan();

  // inputs/outputs: input_bytes().size() / output_bytes().size() pointers to buffers of those
  // lengths (the caller checks). timings: null or steps().size() slots for each step's wall time
  // in ns. Returns false when cancelled (*cancel set) or with *error = "node '<name>': <why>".
  bool Run(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const void* const* inputs,
           void* const* outputs, double* timings, std::string* error) const;

  const std::vector<PlanStep>& steps() const { return steps_; }
  const std::vector<size_t>& input_bytes() const { return input_bytes_; }
  const std::vector<size_t>& output_bytes() const { return output_bytes_; }
  // The alignment inputs[i] / outputs[i] need: the largest element size a step uses them with (the
  // element offsets keep every operand aligned once the base is).
  const std::vector<size_t>& input_align() const { return input_align_; }
  const std::vector<size_t>& output_align() const { return output_align_; }
  size_t arena_bytes() const { return arena_bytes_; }
  // Wall time of the last Run() to finish, in ns (-1 before any): how long the next is likely to take.
  int64_t last_run_ns() const { return last_run_ns_.load(std::memory_order_relaxed); }
  size_t const_bytes() const { return const_bytes_; }
  // What the plan holds while idle: its consts plus one arena.
  size_t bytes() const { return const_bytes_ + arena_bytes_; }

 private:
  struct Arena;
  Plan() = default;
  std::unique_ptr<Arena> AcquireArena() const;
  void ReleaseArena(std::unique_ptr<Arena> arena) const;
  bool RunStep(const PlanStep& s, const TensorOpContext& ctx, const ElementwiseContext& ew,
               unsigned char* const* bases, std::string* error) const;

  std::vector<PlanBufferDesc> buffers_;
  std::vector<PlanStep> steps_;
  std::vector<size_t> input_bytes_, output_bytes_, input_align_, output_align_;
  size_t arena_bytes_ = 0, const_bytes_ = 0;
  kernels::ElementwiseUkernels elementwise_uk_{};

  // Idle arenas: concurrent runs each take one; a few are kept so repeated runs do not reallocate.
  mutable std::mutex arenas_mu_;
  mutable std::vector<std::unique_ptr<Arena>> idle_arenas_;
  mutable std::atomic<int64_t> last_run_ns_{-1};
};

}  // namespace sonde
