// Mode-independent parts of the GPU backend: the op registry, argument checks of an op call, and
// the process-wide table of opened devices.
#include "runtime/cuda/gpu.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <mutex>

#include "runtime/cuda_devices.h"

namespace sonde {

namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, GpuOpFn> ops[2];  // [emulated]
};
Registry& Ops() {
  static Registry* r = new Registry;  // never destroyed: registrations run before main, lookups until exit
  return *r;
}

}  // namespace

void RegisterGpuOp(const char* name, bool emulated, GpuOpFn fn) {
  Registry& r = Ops();
  std::lock_guard<std::mutex> lock(r.mu);
  r.ops[emulated][name] = fn;
}

GpuOpFn FindGpuOp(const std::string& name, bool emulated) {
  Registry& r = Ops();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.ops[emulated].find(name);
  return it == r.ops[emulated].end() ? nullptr : it->second;
}

std::vector<std::string> GpuOpNames(bool emulated) {
  Registry& r = Ops();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> names;
  for (const auto& [name, fn] : r.ops[emulated]) names.push_back(name);
  return names;
}

void GpuOpCall::Invalid(const std::string& what) const {
  throw GpuError(GpuErrc::kInvalidArgument, op + ": " + what);
}

double GpuOpCall::Num(const char* name) const {
  auto it = params.find(name);
  if (it == params.end()) Invalid(std::string("parameter '") + name + "' is missing");
  if (!std::isfinite(it->second)) Invalid(std::string("parameter '") + name + "' must be finite");
  return it->second;
}

double GpuOpCall::NumOr(const char* name, double fallback) const { return Has(name) ? Num(name) : fallback; }

int64_t GpuOpCall::Int(const char* name, int64_t lo, int64_t hi) const {
  const double v = Num(name);
  if (v != std::floor(v) || v < static_cast<double>(lo) || v > static_cast<double>(hi))
    Invalid(std::string("parameter '") + name + "' must be an integer in [" + std::to_string(lo) + ", " +
            std::to_string(hi) + "], got " + std::to_string(v));
  return static_cast<int64_t>(v);
}

int64_t GpuOpCall::IntOr(const char* name, int64_t fallback, int64_t lo, int64_t hi) const {
  return Has(name) ? Int(name, lo, hi) : fallback;
}

size_t GpuOpCall::Count(std::initializer_list<int64_t> dims) const {
  size_t n = 1;
  for (int64_t d : dims)
    if (d < 0 || __builtin_mul_overflow(n, static_cast<size_t>(d), &n)) Invalid("the sizes' product overflows");
  return n;
}

void* GpuOpCall::CheckedBuffer(size_t i, size_t count, size_t elem_bytes, const char* what) const {
  if (i >= buffers.size()) Invalid(std::string(what) + " (buffer " + std::to_string(i) + ") is missing");
  size_t need;
  if (__builtin_mul_overflow(count, elem_bytes, &need) || buffers[i].bytes < need)
    Invalid(std::string(what) + " (buffer " + std::to_string(i) + ") holds " + std::to_string(buffers[i].bytes) +
            " bytes, the op needs " + std::to_string(count) + " x " + std::to_string(elem_bytes));
  return buffers[i].data;
}

bool EnvSwitchOn(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::strcmp(v, "0") == 0);
}

bool GpuEarlyDependents() {
  static const bool on = EnvSwitchOn("SONDE_GPU_PDL_EARLY");
  return on;
}

bool GpuGraphsEnabled() {
  static const bool on = EnvSwitchOn("SONDE_GPU_GRAPHS");
  return on;
}

std::string FormatBytes(size_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1024.0 * 1024 * 1024));
  else if (b >= 1024.0 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1024.0 * 1024));
  else if (b >= 1024.0)
    std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024.0);
  else
    std::snprintf(buf, sizeof buf, "%zu bytes", bytes);
  return buf;
}

std::shared_ptr<GpuDevice> OpenGpuDevice(const std::string& id) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<GpuDevice>>* open = new std::map<std::string, std::shared_ptr<GpuDevice>>;
  std::lock_guard<std::mutex> lock(mu);
  auto it = open->find(id);
  if (it != open->end()) return it->second;
  std::shared_ptr<GpuDevice> d;
  if (id == "emulated") {
    d = OpenEmulatedDevice();
  } else if (id.rfind("cuda:", 0) == 0 && id.size() > 5 && id.find_first_not_of("0123456789", 5) == std::string::npos &&
             id.size() < 10) {
    d = OpenHardwareDevice(std::stoi(id.substr(5)));
  } else {
    throw GpuError(GpuErrc::kInvalidArgument, "unknown GPU device id '" + id + "' (expected 'cuda:N' or 'emulated')");
  }
  (*open)[id] = d;
  return d;
}

namespace {
thread_local bool thread_capturing = false;
}

void SetThreadCapturing(bool on) { thread_capturing = on; }

void CheckNotCapturing(const std::string& what) {
  if (thread_capturing)
    throw GpuError(GpuErrc::kInvalidArgument, "device allocation for " + what +
                                                  " during a graph capture (ops under capture must use buffers allocated before it)");
}

std::unique_ptr<GpuGraph> CaptureGraph(GpuStream& stream, const std::function<void()>& body) {
  stream.BeginCapture();
  try {
    body();
  } catch (...) {
    stream.AbortCapture();
    throw;
  }
  return stream.EndCapture();
}

#ifndef SONDE_WITH_CUDA
std::shared_ptr<GpuDevice> OpenHardwareDevice(int index) {
  throw GpuError(GpuErrc::kUnavailable, "cuda:" + std::to_string(index) + " is unavailable: " + QueryCuda().reason);
}
#endif

}  // namespace sonde
