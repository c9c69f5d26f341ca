// What the CUDA runtime reports, gathered once per query. Any CUDA error (no driver, no device,
// driver too old) becomes zero devices plus a reason; nothing here can abort the process.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace sonde {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  size_t total_bytes = 0;
  size_t free_bytes = 0;
  int cc_major = 0, cc_minor = 0;
  int multiprocessors = 0;
};

struct CudaStatus {
  bool compiled = false;     // this binary was built with CUDA
  int runtime_version = 0;   // e.g. 13000
  int driver_version = 0;    // 0 when no driver is installed
  std::vector<CudaDeviceInfo> devices;
  std::string reason;        // why there are no devices (empty when there are some)
};

CudaStatus QueryCuda();

}  // namespace sonde
