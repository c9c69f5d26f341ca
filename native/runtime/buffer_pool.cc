#include "runtime/buffer_pool.h"

#include <cmath>
#include <cstdlib>

namespace sonde {

size_t BufferPool::SizeClass(size_t bytes) {
  size_t c = 4096;
  // Steps of 2^(1/4): 4096, 4871, 5793, 6889, 8192, ... rounded up to 64 bytes.
  static const double kStep[4] = {1.0, 1.189207115, 1.414213562, 1.681792831};
  for (size_t base = 4096;; base *= 2) {
    for (double s : kStep) {
      c = (static_cast<size_t>(std::ceil(base * s)) + 63) / 64 * 64;
      if (c >= bytes) return c;
    }
    if (base > (static_cast<size_t>(1) << 60)) return bytes;
  }
}

void* BufferPool::Acquire(size_t bytes, size_t* capacity) {
  const size_t cls = SizeClass(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(cls);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= cls;
      *capacity = cls;
      return p;
    }
  }
  void* p = std::aligned_alloc(64, cls);
  *capacity = p ? cls : 0;
  return p;
}

void BufferPool::Release(void* p, size_t capacity) {
  if (!p) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cached_ + capacity <= max_cached_) {
      free_[capacity].push_back(p);
      cached_ += capacity;
      return;
    }
  }
  std::free(p);
}

size_t BufferPool::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_;
}

BufferPool::~BufferPool() {
  for (auto& [cls, blocks] : free_)
    for (void* p : blocks) std::free(p);
}

}  // namespace sonde
