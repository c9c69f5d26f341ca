// Real CUDA devices: a caching pool over cudaMalloc, and streams whose host copies go through two
// pinned staging chunks, so copying the next chunk on the CPU overlaps the DMA of the previous one
// and kernels already queued on the stream.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "runtime/cuda/device_pool.h"
#include "runtime/cuda/gpu.h"

namespace sonde {

namespace {

std::string CudaMessage(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw GpuError(e == cudaErrorMemoryAllocation ? GpuErrc::kOutOfMemory : GpuErrc::kKernel,
                   std::string(what) + ": " + CudaMessage(e));
  }
}

constexpr size_t kStagingChunk = size_t(8) << 20;

// The driver's answer to the last cudaMalloc of the caching pool on this thread.
thread_local cudaError_t last_alloc_error = cudaSuccess;

class HardwareGraph : public GpuGraph {
 public:
  HardwareGraph(int device, cudaGraphExec_t exec) : device_(device), exec_(exec) {}
  ~HardwareGraph() override {
    cudaSetDevice(device_);
    cudaGraphExecDestroy(exec_);
    cudaGetLastError();
  }
  void Replay(GpuStream& stream) override {
    if (stream.capturing()) throw GpuError(GpuErrc::kInvalidArgument, "graph replay while the stream is capturing");
    Check(cudaGraphLaunch(exec_, static_cast<cudaStream_t>(stream.handle())), "cudaGraphLaunch");
  }

 private:
  int device_;
  cudaGraphExec_t exec_;
};

class HardwareStream : public GpuStream {
 public:
  explicit HardwareStream(int device) : device_(device) {
    Check(cudaSetDevice(device_), "cudaSetDevice");
    Check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    Check(cudaEventCreate(&start_), "cudaEventCreate");
    Check(cudaEventCreate(&stop_), "cudaEventCreate");
    for (Slot& s : slots_) {
      Check(cudaMallocHost(&s.staging, kStagingChunk), "cudaMallocHost (pinned staging)");
      Check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreate");
    }
  }
  ~HardwareStream() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    for (Slot& s : slots_) {
      cudaFreeHost(s.staging);
      cudaEventDestroy(s.done);
    }
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
    cudaStreamDestroy(stream_);
    cudaGetLastError();
  }

  void Upload(void* dst, const void* src, size_t n) override {
    NotCapturing("upload");
    for (size_t off = 0; off < n; off += kStagingChunk) {
      const size_t len = std::min(kStagingChunk, n - off);
      Slot& s = NextSlot();
      std::memcpy(s.staging, static_cast<const char*>(src) + off, len);
      Check(cudaMemcpyAsync(static_cast<char*>(dst) + off, s.staging, len, cudaMemcpyHostToDevice, stream_),
            "upload (cudaMemcpyAsync)");
      Check(cudaEventRecord(s.done, stream_), "cudaEventRecord");
      s.busy = true;
    }
  }
  void Download(void* dst, const void* src, size_t n) override {
    NotCapturing("download");
    for (size_t off = 0; off < n; off += kStagingChunk) {
      const size_t len = std::min(kStagingChunk, n - off);
      Slot& s = NextSlot();
      Check(cudaMemcpyAsync(s.staging, static_cast<const char*>(src) + off, len, cudaMemcpyDeviceToHost, stream_),
            "download (cudaMemcpyAsync)");
      Check(cudaEventRecord(s.done, stream_), "cudaEventRecord");
      s.busy = true;
      s.out = static_cast<char*>(dst) + off;
      s.out_bytes = len;
    }
  }
  void Fill(void* dst, uint8_t v, size_t n) override {
    Check(cudaMemsetAsync(dst, v, n, stream_), "cudaMemsetAsync");
  }
  void Synchronize() override {
    NotCapturing("synchronize");
    Check(cudaStreamSynchronize(stream_), "stream");
    for (Slot& s : slots_) Drain(s);
  }
  void MarkStart() override {
    NotCapturing("timing mark");
    Check(cudaEventRecord(start_, stream_), "cudaEventRecord");
  }
  double MarkStopMs() override {
    NotCapturing("timing mark");
    Check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
    Check(cudaEventSynchronize(stop_), "stream");
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return ms;
  }
  void* handle() override { return stream_; }
  void BeginCapture() override {
    NotCapturing("BeginCapture");
    // Thread-local mode: an unsafe call on this thread (cudaMalloc, a synchronising copy) fails
    // the capture instead of silently running outside the graph.
    Check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    capturing_ = true;
    SetThreadCapturing(true);
  }
  std::unique_ptr<GpuGraph> EndCapture() override {
    if (!capturing_) throw GpuError(GpuErrc::kInvalidArgument, "EndCapture without BeginCapture");
    capturing_ = false;
    SetThreadCapturing(false);
    cudaGraph_t graph = nullptr;
    Check(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    Check(e, "cudaGraphInstantiate");
    return std::make_unique<HardwareGraph>(device_, exec);
  }
  void AbortCapture() noexcept override {
    if (!capturing_) return;
    capturing_ = false;
    SetThreadCapturing(false);
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
    cudaGetLastError();
  }
  bool capturing() const override { return capturing_; }
  void Bind() { Check(cudaSetDevice(device_), "cudaSetDevice"); }
  // Before the stream goes back to the pool: a run that failed part-way may have left downloads
  // queued into host buffers that are gone now; wait for the stream and drop them.
  void Abandon() {
    cudaSetDevice(device_);
    AbortCapture();
    cudaStreamSynchronize(stream_);
    cudaGetLastError();
    for (Slot& s : slots_) {
      s.busy = false;
      s.out = nullptr;
    }
  }

 private:
  struct Slot {
    char* staging = nullptr;
    cudaEvent_t done = nullptr;
    bool busy = false;
    char* out = nullptr;  // a download waiting to be copied out of staging
    size_t out_bytes = 0;
  };
  Slot& NextSlot() {
    Slot& s = slots_[next_];
    next_ ^= 1;
    Drain(s);
    return s;
  }
  void Drain(Slot& s) {
    if (!s.busy) return;
    Check(cudaEventSynchronize(s.done), "stream");
    s.busy = false;
    if (s.out) std::memcpy(s.out, s.staging, s.out_bytes);
    s.out = nullptr;
  }

  void NotCapturing(const char* what) const {
    if (capturing_) throw GpuError(GpuErrc::kInvalidArgument, std::string(what) + " while the stream is capturing a graph");
  }

  int device_;
  bool capturing_ = false;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  Slot slots_[2];
  int next_ = 0;
};

class HardwareDevice : public GpuDevice, public std::enable_shared_from_this<HardwareDevice> {
 public:
  explicit HardwareDevice(int index)
      : index_(index),
        pool_(
            [index](size_t n) -> void* {
              void* p = nullptr;
              cudaError_t e = cudaSetDevice(index);
              if (e == cudaSuccess) e = cudaMalloc(&p, n);
              last_alloc_error = e;
              if (e != cudaSuccess) {
                cudaGetLastError();
                return nullptr;
              }
              return p;
            },
            [index](void* p) {
              cudaSetDevice(index);
              cudaFree(p);
            }) {
    cudaDeviceProp p;
    Check(cudaGetDeviceProperties(&p, index), "cudaGetDeviceProperties");
    info_.id = "cuda:" + std::to_string(index);
    info_.name = p.name;
    info_.total_bytes = p.totalGlobalMem;
    info_.cc_major = p.major;
    info_.cc_minor = p.minor;
    info_.multiprocessors = p.multiProcessorCount;
    info_.shared_per_block = p.sharedMemPerBlockOptin;
  }
  const GpuDeviceInfo& info() const override { return info_; }
  void* Alloc(size_t bytes, const std::string& what) override {
    CheckNotCapturing(what);
    last_alloc_error = cudaSuccess;
    void* p = pool_.Alloc(bytes);
    if (!p && last_alloc_error != cudaSuccess && last_alloc_error != cudaErrorMemoryAllocation) {
      // Not a full device: most often an earlier kernel fault that left the context unusable
      // (every later call fails with it), which an out-of-memory error would misname.
      throw GpuError(GpuErrc::kKernel, info_.id + " (" + info_.name + "): cannot allocate " + FormatBytes(bytes) + " for " +
                                           what + ": " + CudaMessage(last_alloc_error));
    }
    if (!p) {
      size_t free_b = 0, total_b = 0;
      cudaSetDevice(index_);
      cudaMemGetInfo(&free_b, &total_b);
      cudaGetLastError();
      throw GpuError(GpuErrc::kOutOfMemory, info_.id + " (" + info_.name + "): out of memory allocating " +
                                                FormatBytes(bytes) + " for " + what + " (" + FormatBytes(free_b) +
                                                " free of " + FormatBytes(total_b) + ")");
    }
    return p;
  }
  void Free(void* p) override { pool_.Free(p); }
  size_t bytes_in_use() const override { return pool_.in_use(); }
  size_t bytes_cached() const override { return pool_.cached(); }
  void Trim() override { pool_.Trim(); }
  std::shared_ptr<GpuStream> AcquireStream() override {
    std::unique_ptr<HardwareStream> s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        s = std::move(idle_.back());
        idle_.pop_back();
      }
    }
    if (s)
      s->Bind();
    else
      s = std::make_unique<HardwareStream>(index_);
    std::shared_ptr<HardwareDevice> self = shared_from_this();
    return std::shared_ptr<GpuStream>(s.release(), [self](GpuStream* g) {
      auto* h = static_cast<HardwareStream*>(g);
      h->Abandon();
      std::lock_guard<std::mutex> lock(self->mu_);
      self->idle_.emplace_back(h);
    });
  }

 private:
  int index_;
  GpuDeviceInfo info_;
  CachingAllocator pool_;
  std::mutex mu_;
  std::vector<std::unique_ptr<HardwareStream>> idle_;
};

}  // namespace

std::shared_ptr<GpuDevice> OpenHardwareDevice(int index) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw GpuError(GpuErrc::kUnavailable, "cuda:" + std::to_string(index) + " is unavailable: " + CudaMessage(e));
  }
  if (index < 0 || index >= count)
    throw GpuError(GpuErrc::kUnavailable, "cuda:" + std::to_string(index) + " is unavailable: there " +
                                              (count == 1 ? "is 1 CUDA device" : "are " + std::to_string(count) + " CUDA devices"));
  return std::make_shared<HardwareDevice>(index);
}

namespace cuda {
// runtime/cuda/dialect.h: LaunchDependent. SONDE_GPU_PDL=0 launches every kernel plainly.
namespace {
std::atomic<bool> pdl_refused{false};
}  // namespace
bool PdlEnabled() {
  static const bool on = EnvSwitchOn("SONDE_GPU_PDL");
  return on && !pdl_refused.load(std::memory_order_relaxed);
}
void RefusePdl() { pdl_refused.store(true, std::memory_order_relaxed); }
bool KernelWaits(const void* kernel) {
  static std::mutex mu;
  static std::map<const void*, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(kernel);
  if (it != known.end()) return it->second;
  cudaFuncAttributes attr{};
  const bool waits = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90;
  cudaGetLastError();
  known.emplace(kernel, waits);
  return waits;
}
}  // namespace cuda

}  // namespace sonde
