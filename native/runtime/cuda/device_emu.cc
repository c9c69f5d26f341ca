// The emulated device: "device memory" is host memory from the same caching pool a GPU uses, with
// a fixed capacity so that out-of-memory paths are testable, and a stream runs everything at once
// on the calling thread.
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "runtime/cuda/device_pool.h"
#include "runtime/cuda/gpu.h"

namespace sonde {

namespace {

constexpr size_t kEmulatedCapacity = size_t(4) << 30;

class EmulatedStream : public GpuStream {
 public:
  void Upload(void* dst, const void* src, size_t n) override {
    if (n) std::memcpy(dst, src, n);
  }
  void Download(void* dst, const void* src, size_t n) override {
    if (n) std::memcpy(dst, src, n);
  }
  void Fill(void* dst, uint8_t v, size_t n) override {
    if (n) std::memset(dst, v, n);
  }
  void Synchronize() override {}
  void MarkStart() override { start_ = std::chrono::steady_clock::now(); }
  double MarkStopMs() override {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  }
  void* handle() override { return nullptr; }

 private:
  std::chrono::steady_clock::time_point start_;
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
