// The GEMM family's fused epilogue (kernels/gemm/gemm.h, GemmEpilogueScalar) for GPU kernels, applied
// to each output while it is still in a register: v = acc * scale[j] + bias[j], then the activation,
// with the residual added before or after it. Shared by the GEMM, conv and sparse GPU families; the
// codes are GemmActivation's so that lib/ passes the same numbers to the CPU and the GPU.
#pragma once
#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

enum GpuActivation : int {
  kGpuActNone = 0,
  kGpuActRelu = 1,
  kGpuActClip = 2,  // ReLU6 is Clip(0, 6)
  kGpuActSilu = 3,
  kGpuActGeluErf = 4,
  kGpuActGeluTanh = 5,
  kGpuActSigmoid = 6,
  kGpuActLeakyRelu = 7,
  kGpuActHardSwish = 8,
  kGpuActCount = 9,
};

// Plain pointers and numbers, passed to kernels by value. Any pointer may be null.
struct GpuEpilogue {
  const float* scale;     // per output channel / column
  const float* bias;      // per output channel / column
  const float* residual;  // laid out as the output (the kernel computes the index)
  int activation;
  int residual_before_activation;
  float alpha, beta;  // Clip bounds; LeakyRelu slope in alpha
};

// Comparisons arranged as the CPU's so that NaN propagates the same way. alpha: Clip's lower bound
// or LeakyRelu's slope; beta: Clip's upper bound.
__device__ __forceinline__ float ActivateCode(float v, int activation, float alpha, float beta) {
  switch (activation) {
    case kGpuActRelu: return v < 0.0f ? 0.0f : v;
    case kGpuActClip: return v < alpha ? alpha : (v > beta ? beta : v);
    case kGpuActSilu: return v / (1.0f + expf(-v));
    case kGpuActGeluErf: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case kGpuActGeluTanh: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case kGpuActSigmoid: return 1.0f / (1.0f + expf(-v));
    case kGpuActLeakyRelu: return v < 0.0f ? alpha * v : v;
    case kGpuActHardSwish: {
      float t = v + 3.0f;
      t = t < 0.0f ? 0.0f : (t > 6.0f ? 6.0f : t);
      return v * t * (1.0f / 6.0f);
    }
    default: return v;
  }
}

__device__ __forceinline__ float GpuActivate(float v, const GpuEpilogue& ep) {
  return ActivateCode(v, ep.activation, ep.alpha, ep.beta);
}

// channel: index into scale/bias; out_index: into residual (the output's own index).
__device__ __forceinline__ float GpuApplyEpilogue(float acc, size_t channel, size_t out_index, const GpuEpilogue& ep) {
  float v = ep.scale ? acc * ep.scale[channel] : acc;
  if (ep.bias) v += ep.bias[channel];
  const float r = ep.residual ? ep.residual[out_index] : 0.0f;
  if (ep.residual_before_activation) v += r;
  v = GpuActivate(v, ep);
  if (!ep.residual_before_activation) v += r;
  return v;
}

// Reads the epilogue's numbers from an op call; the caller fills the pointers. Names as in lib/cuda.
inline GpuEpilogue GpuEpilogueParams(const GpuOpCall& c) {
  GpuEpilogue ep{};
  ep.activation = static_cast<int>(c.IntOr("activation", 0, 0, kGpuActCount - 1));
  ep.residual_before_activation = static_cast<int>(c.IntOr("residualBeforeActivation", 0, 0, 1));
  ep.alpha = static_cast<float>(c.NumOr("alpha", 0.0));
  ep.beta = static_cast<float>(c.NumOr("beta", 0.0));
  return ep;
}

}  // namespace SONDE_GPU_NS
}  // namespace sonde
