// The emulated device: "device memory" is host memory from the same caching pool a GPU uses, with
// a fixed capacity so that out-of-memory paths are testable, and a stream runs everything at once
// on the calling thread.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "runtime/cuda/device_pool.h"
#include "runtime/cuda/gpu.h"

namespace sonde {

namespace {

constexpr size_t kEmulatedCapacity = size_t(4) << 30;

class EmulatedGraph : public GpuGraph {
 public:
  explicit EmulatedGraph(std::vector<std::function<void()>> work) : work_(std::move(work)) {}
  void Replay(GpuStream& stream) override {
    if (stream.capturing()) throw GpuError(GpuErrc::kInvalidArgument, "graph replay while the stream is capturing");
    for (auto& w : work_) w();
  }

 private:
  std::vector<std::function<void()>> work_;
};

class EmulatedStream : public GpuStream {
 public:
  void Upload(void* dst, const void* src, size_t n) override {
    NotCapturing("upload");
    if (n) std::memcpy(dst, src, n);
  }
  void Download(void* dst, const void* src, size_t n) override {
    NotCapturing("download");
    if (n) std::memcpy(dst, src, n);
  }
  void Fill(void* dst, uint8_t v, size_t n) override {
    if (capturing_) {
      if (n) recorded_.push_back([dst, v, n] { std::memset(dst, v, n); });
      return;
    }
    if (n) std::memset(dst, v, n);
  }
  void Synchronize() override { NotCapturing("synchronize"); }
  void MarkStart() override {
    NotCapturing("timing mark");
    start_ = std::chrono::steady_clock::now();
  }
  double MarkStopMs() override {
    NotCapturing("timing mark");
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  }
  void* handle() override { return nullptr; }
  ~EmulatedStream() override { AbortCapture(); }
  void BeginCapture() override {
    if (capturing_) throw GpuError(GpuErrc::kInvalidArgument, "BeginCapture while already capturing");
    recorded_.clear();
    capturing_ = true;
    SetThreadCapturing(true);
  }
  std::unique_ptr<GpuGraph> EndCapture() override {
    if (!capturing_) throw GpuError(GpuErrc::kInvalidArgument, "EndCapture without BeginCapture");
    capturing_ = false;
    SetThreadCapturing(false);
    return std::make_unique<EmulatedGraph>(std::move(recorded_));
  }
  void AbortCapture() noexcept override {
    if (!capturing_) return;
    capturing_ = false;
    recorded_.clear();
    SetThreadCapturing(false);
  }
  bool capturing() const override { return capturing_; }
  void Record(std::function<void()> work) override {
    if (!capturing_) throw GpuError(GpuErrc::kInvalidArgument, "Record outside a capture");
    recorded_.push_back(std::move(work));
  }

 private:
  void NotCapturing(const char* what) const {
    if (capturing_) throw GpuError(GpuErrc::kInvalidArgument, std::string(what) + " while the stream is capturing a graph");
  }
  std::chrono::steady_clock::time_point start_;
  bool capturing_ = false;
  std::vector<std::function<void()>> recorded_;
};

class EmulatedDevice : public GpuDevice {
 public:
  EmulatedDevice()
      : pool_([](size_t n) { return std::aligned_alloc(256, n); }, [](void* p) { std::free(p); }, kEmulatedCapacity) {
    info_.id = "emulated";
    info_.name = "sonde CUDA emulator (CPU, for tests)";
    info_.emulated = true;
    info_.total_bytes = kEmulatedCapacity;
    // Reported as an sm_80 part so ops take their tensor-core paths, whose mma the emulator models.
    info_.cc_major = 8;
    info_.cc_minor = 0;
    info_.multiprocessors = 4;
    info_.shared_per_block = 227 * 1024;
  }
  const GpuDeviceInfo& info() const override { return info_; }
  void* Alloc(size_t bytes, const std::string& what) override {
    CheckNotCapturing(what);
    void* p = pool_.Alloc(bytes);
    if (!p)
      throw GpuError(GpuErrc::kOutOfMemory, "emulated device: out of memory allocating " + FormatBytes(bytes) + " for " +
                                                what + " (" + FormatBytes(kEmulatedCapacity - pool_.in_use()) +
                                                " free of " + FormatBytes(kEmulatedCapacity) + ")");
    return p;
  }
  void Free(void* p) override { pool_.Free(p); }
  size_t bytes_in_use() const override { return pool_.in_use(); }
  size_t bytes_cached() const override { return pool_.cached(); }
  void Trim() override { pool_.Trim(); }
  std::shared_ptr<GpuStream> AcquireStream() override { return std::make_shared<EmulatedStream>(); }

 private:
  GpuDeviceInfo info_;
  CachingAllocator pool_;
};

}  // namespace

std::shared_ptr<GpuDevice> OpenEmulatedDevice() { return std::make_shared<EmulatedDevice>(); }

}  // namespace sonde
