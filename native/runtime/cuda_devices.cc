#include "runtime/cuda_devices.h"

#ifndef SONDE_WITH_CUDA
namespace sonde {
CudaStatus QueryCuda() {
  CudaStatus s;
  s.compiled = false;
  s.reason = "this sonde binary was built without CUDA (nvcc was not found or SONDE_CUDA=0)";
  return s;
}
}  // namespace sonde
#endif
