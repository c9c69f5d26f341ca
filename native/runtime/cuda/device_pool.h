// The caching allocator behind both devices: cudaMalloc and cudaFree synchronise the whole device,
// so freed blocks are kept by rounded size and handed out again. Running short, it returns every
// cached block to the driver and tries once more before reporting out-of-memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace sonde {

class CachingAllocator {
 public:
  using RawAlloc = std::function<void*(size_t)>;  // nullptr when the device is out of memory
  using RawFree = std::function<void(void*)>;
  // capacity bounds what the pool holds from the driver (in use + cached); the emulated device
  // uses it to have a size, a GPU leaves it unbounded and lets cudaMalloc say no.
  CachingAllocator(RawAlloc alloc, RawFree free, size_t capacity = SIZE_MAX)
      : raw_alloc_(std::move(alloc)), raw_free_(std::move(free)), capacity_(capacity) {}
  ~CachingAllocator() { Trim(); }

  // Small blocks round to 512 bytes and large ones to 2 MiB, so repeated runs of one shape reuse
  // their blocks while a stream of distinct sizes does not fragment the cache into slivers.
  static size_t Rounded(size_t n) {
    const size_t unit = n < (size_t(1) << 20) ? 512 : (size_t(2) << 20);
    return n == 0 ? unit : (n + unit - 1) / unit * unit;
  }

  void* Alloc(size_t n) {
    const size_t r = Rounded(n);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(r);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= r;
      return Track(p, r);
    }
    void* p = Fits(r) ? raw_alloc_(r) : nullptr;
    if (!p && cached_ > 0) {
      TrimLocked();
      p = Fits(r) ? raw_alloc_(r) : nullptr;
    }
    return p ? Track(p, r) : nullptr;
  }

  void Free(void* p) {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;
    const size_t r = it->second;
    live_.erase(it);
    in_use_ -= r;
    cached_ += r;
    free_[r].push_back(p);
  }

  void Trim() {
    std::lock_guard<std::mutex> lock(mu_);
    TrimLocked();
  }
  size_t in_use() const {
    std::lock_guard<std::mutex> lock(mu_);
    return in_use_;
  }
  size_t cached() const {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  bool Fits(size_t r) const { return in_use_ + cached_ <= capacity_ && r <= capacity_ - in_use_ - cached_; }
  void* Track(void* p, size_t r) {
    live_[p] = r;
    in_use_ += r;
    return p;
  }
  void TrimLocked() {
    for (auto& [size, list] : free_)
      for (void* p : list) raw_free_(p);
    free_.clear();
    cached_ = 0;
  }

  RawAlloc raw_alloc_;
  RawFree raw_free_;
  mutable std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  size_t capacity_;
  size_t in_use_ = 0, cached_ = 0;
};

}  // namespace sonde
