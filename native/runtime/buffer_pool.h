// Recycles the large buffers sonde hands to JS as outputs. A fresh multi-megabyte ArrayBuffer costs
// an mmap, a page fault per 4 KiB and a zero fill: measured here, 86 us for 256 KiB and 1.35 ms for
// 4 MiB, more than the 256x256 GEMM that fills it. Outputs are instead external ArrayBuffers whose
// memory returns to this pool when V8 collects them, so steady-state runs reuse warm pages.
#pragma once
#include <cstddef>
#include <map>
#include <mutex>
#include <vector>

namespace sonde {

class BufferPool {
 public:
  explicit BufferPool(size_t max_cached_bytes) : max_cached_(max_cached_bytes) {}
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A 64-byte-aligned block of at least `bytes` (contents unspecified); *capacity receives its size
  // class, which Release must be given back. Returns null when the allocation fails.
  void* Acquire(size_t bytes, size_t* capacity);
  // Keeps the block for reuse, or frees it when the cache would exceed its cap.
  void Release(void* p, size_t capacity);
  size_t cached_bytes() const;

  // Size classes grow by 2^(1/4) from 4 KiB, so a block wastes at most ~19% of its size.
  static size_t SizeClass(size_t bytes);

 private:
  mutable std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  size_t max_cached_;
};

}  // namespace sonde
