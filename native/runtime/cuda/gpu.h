// The GPU backend's mode-independent surface: devices, streams, device memory and the op registry.
// Everything here is plain C++ (no CUDA headers), so the binding and the CPU-only build use it.
//
// Every GPU op and kernel source (native/kernels/<family>/cuda/*.cu) is compiled twice: by nvcc for
// real devices (namespace sonde::cuda) when CUDA is built, and always by the host compiler against
// the CUDA emulator (namespace sonde::emu, runtime/cuda/emu/). Both register their ops here under
// the same name, so a test runs the same kernel source on the emulated device and on a GPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace sonde {

enum class GpuErrc { kOutOfMemory, kUnavailable, kInvalidArgument, kKernel };

// What every GPU failure becomes: the binding maps code to the typed JS error.
class GpuError : public std::runtime_error {
 public:
  GpuError(GpuErrc code, const std::string& message) : std::runtime_error(message), code(code) {}
  GpuErrc code;
};

struct GpuDeviceInfo {
  std::string id;    // "cuda:0", or "emulated"
  std::string name;  // the driver's name, or a description of the emulator
  bool emulated = false;
  size_t total_bytes = 0;
  int cc_major = 0, cc_minor = 0;
  int multiprocessors = 0;
  size_t shared_per_block = 0;  // opt-in maximum of dynamic shared memory per block
};

class GpuStream;

// Stream work recorded once and replayed with one call (a CUDA graph on a GPU): a decode step's
// hundreds of kernel launches then cost the host one launch. A replay runs the recorded kernels
// with the recorded arguments, so what changes between replays lives in device buffers the caller
// writes (Upload) before Replay().
class GpuGraph {
 public:
  virtual ~GpuGraph() = default;
  virtual void Replay(GpuStream& stream) = 0;
};

// One in-order queue of work on a device. Uploads copy the host bytes before returning (through
// pinned staging on a GPU), so the caller may reuse its buffer at once; downloads land in host
// memory at Synchronize(), which also reports any asynchronous kernel failure as a GpuError.
class GpuStream {
 public:
  virtual ~GpuStream() = default;
  virtual void Upload(void* device_dst, const void* host_src, size_t bytes) = 0;
  virtual void Download(void* host_dst, const void* device_src, size_t bytes) = 0;
  virtual void Fill(void* device_dst, uint8_t value, size_t bytes) = 0;
  virtual void Synchronize() = 0;
  // Timing with events on a GPU, wall time on the emulator: milliseconds between the two marks.
  virtual void MarkStart() = 0;
  virtual double MarkStopMs() = 0;
  // The native queue (cudaStream_t) for kernels launched on it; nullptr on the emulator.
  virtual void* handle() = 0;

  // Between BeginCapture() and EndCapture() the stream records kernel launches and fills instead of
  // running them. Uploads, downloads, timing marks and Synchronize() are errors while capturing (their
  // host side would not be replayed), and so is device allocation: ops run under capture must use
  // buffers allocated before it, which must outlive the graph. Use CaptureGraph() below, which ends
  // a capture that failed part-way.
  virtual void BeginCapture() = 0;
  virtual std::unique_ptr<GpuGraph> EndCapture() = 0;
  // Drops a capture in progress (nothing recorded is kept); a no-op when not capturing.
  virtual void AbortCapture() noexcept = 0;
  virtual bool capturing() const = 0;
  // The emulator's capture: Launch() hands it the launch to replay (a GPU records through the driver).
  virtual void Record(std::function<void()> work) {
    throw GpuError(GpuErrc::kInvalidArgument, "this stream records launches through the driver");
  }
};

class GpuDevice {
 public:
  virtual ~GpuDevice() = default;
  virtual const GpuDeviceInfo& info() const = 0;
  // Device memory from a caching pool (cudaMalloc underneath, never managed memory). Running out
  // is GpuError(kOutOfMemory) naming the device, the request (`what`) and the free memory.
  virtual void* Alloc(size_t bytes, const std::string& what) = 0;
  virtual void Free(void* p) = 0;
  virtual size_t bytes_in_use() const = 0;
  virtual size_t bytes_cached() const = 0;
  virtual void Trim() = 0;  // returns cached blocks to the driver
  // A stream for one in-flight run; it returns to the device's pool when the pointer dies.
  virtual std::shared_ptr<GpuStream> AcquireStream() = 0;
};

// Device memory owned by a shared_ptr, so that a buffer disposed from JS while a run still uses
// it is freed only when the run lets go.
class GpuAllocation {
 public:
  GpuAllocation(std::shared_ptr<GpuDevice> device, size_t bytes, const std::string& what)
      : device_(std::move(device)), bytes_(bytes), ptr_(device_->Alloc(bytes, what)) {}
  ~GpuAllocation() { device_->Free(ptr_); }
  GpuAllocation(const GpuAllocation&) = delete;
  GpuAllocation& operator=(const GpuAllocation&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  GpuDevice& device() const { return *device_; }

 private:
  std::shared_ptr<GpuDevice> device_;
  size_t bytes_;
  void* ptr_;
};

// One call of a registered op: device buffers by position, numbers by name. Ops check every size
// they rely on through these accessors (the binding's second line of defence after lib/cuda).
struct GpuBufferArg {
  void* data = nullptr;
  size_t bytes = 0;
};

class GpuOpCall {
 public:
  std::string op;
  std::vector<GpuBufferArg> buffers;
  std::map<std::string, double> params;

  // An integer parameter in [lo, hi] (by default a non-negative int32, so that products of two
  // fit in 64 bits); anything else is kInvalidArgument naming op and parameter.
  int64_t Int(const char* name, int64_t lo = 0, int64_t hi = INT32_MAX) const;
  double Num(const char* name) const;
  int64_t IntOr(const char* name, int64_t fallback, int64_t lo = 0, int64_t hi = INT32_MAX) const;
  // The product of sizes, kInvalidArgument when it overflows.
  size_t Count(std::initializer_list<int64_t> dims) const;
  double NumOr(const char* name, double fallback) const;
  bool Has(const char* name) const { return params.count(name) != 0; }
  // Buffer i as T*, holding at least `count` elements of T; `what` names it in errors.
  template <typename T>
  T* Buffer(size_t i, size_t count, const char* what) const {
    return static_cast<T*>(CheckedBuffer(i, count, sizeof(T), what));
  }
  [[noreturn]] void Invalid(const std::string& what) const;

 private:
  void* CheckedBuffer(size_t i, size_t count, size_t elem_bytes, const char* what) const;
};

using GpuOpFn = void (*)(GpuStream& stream, const GpuDeviceInfo& device, const GpuOpCall& call);

// Registered at static initialisation by SONDE_GPU_OP (runtime/cuda/dialect.h), once per mode.
void RegisterGpuOp(const char* name, bool emulated, GpuOpFn fn);
// nullptr when no op of that name exists for the mode.
GpuOpFn FindGpuOp(const std::string& name, bool emulated);
std::vector<std::string> GpuOpNames(bool emulated);

// The device with that id ("cuda:N" or "emulated"), created on first use and kept for the
// process; a missing GPU is GpuError(kUnavailable) with the reason.
std::shared_ptr<GpuDevice> OpenGpuDevice(const std::string& id);

// Implemented in runtime/cuda/device_hw.cu when CUDA is compiled, else reports why not.
std::shared_ptr<GpuDevice> OpenHardwareDevice(int index);
std::shared_ptr<GpuDevice> OpenEmulatedDevice();

// Records body()'s work on stream as a graph; if body throws, the capture is dropped and the error
// rethrown, leaving the stream usable.
std::unique_ptr<GpuGraph> CaptureGraph(GpuStream& stream, const std::function<void()>& body);

// Whether a stream is capturing a graph on this thread: device allocation is then an error (the
// graph would keep using a block the pool hands to someone else once the op frees it). Streams set
// it in BeginCapture/EndCapture; devices check it in Alloc.
void SetThreadCapturing(bool on);
void CheckNotCapturing(const std::string& what);

// "1.50 GiB": sizes in error messages.
std::string FormatBytes(size_t bytes);

// An A/B switch read from the environment: on unless the variable is "0".
bool EnvSwitchOn(const char* name);
// SONDE_GPU_GRAPHS=0 launches every op separately instead of capturing runs and decode steps as
// graphs (sessions and language models alike; an A/B switch, and the way back if a driver
// misbehaves with graphs). Read once.
bool GpuGraphsEnabled();
// SONDE_GPU_PDL_EARLY=0 keeps the short kernels that precede a weight-streaming product (the
// decode's residual add + norm, SwiGLU, the attention's combine) from letting it launch before
// their own wait (dialect.h: GridDependencyStart(early)); an A/B switch. Read once.
bool GpuEarlyDependents();

}  // namespace sonde
