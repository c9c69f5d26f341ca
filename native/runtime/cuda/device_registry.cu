#include <cuda_runtime_api.h>

#include <string>

#include "runtime/cuda_devices.h"

namespace sonde {

CudaStatus QueryCuda() {
  CudaStatus s;
  s.compiled = true;
  cudaRuntimeGetVersion(&s.runtime_version);
  // With no driver installed this returns cudaErrorInsufficientDriver (35) instead of crashing;
  // every error is reported as "no devices, because ...".
  cudaDriverGetVersion(&s.driver_version);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    s.reason = std::string("CUDA runtime: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
    if (err == cudaErrorInsufficientDriver && s.driver_version == 0)
      s.reason += " (no NVIDIA driver is installed)";
    cudaGetLastError();
    return s;
  }
  if (count == 0) {
    s.reason = "the NVIDIA driver reports no CUDA devices";
    return s;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    CudaDeviceInfo d;
    d.index = i;
    d.name = p.name;
    d.total_bytes = p.totalGlobalMem;
    d.cc_major = p.major;
    d.cc_minor = p.minor;
    d.multiprocessors = p.multiProcessorCount;
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
      d.free_bytes = free_b;
    else
      cudaGetLastError();
    s.devices.push_back(d);
  }
  if (s.devices.empty()) s.reason = "no CUDA device could be queried";
  return s;
}

}  // namespace sonde
