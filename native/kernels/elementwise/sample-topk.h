// The size-k heap behind the sampling top-k kernels (ElementwiseUkernels::sample_top_k): every
// variant feeds it the same candidates in increasing id order, so their results are identical. Its
// root is the worst kept token; ids arrive in increasing order, so a newcomer ranks before the root
// only with a strictly larger value (on a tie the root's lower id wins): a SIMD scan compares whole
// vectors against Root() and hands over only the lanes that beat it. Pure, header-only.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

class SampleTopKHeap {
 public:
  // ids: room for k entries, k >= 1.
  SampleTopKHeap(int32_t* ids, const float* x, size_t k) : ids_(ids), x_(x), k_(k) {}
  bool Full() const { return size_ == k_; }
  // The value a newcomer must exceed once Full().
  float Root() const { return x_[ids_[0]]; }
  // Offers id (x[id] not NaN; ids in increasing order).
  void Offer(int32_t id) {
    if (size_ < k_) {
      size_t i = size_++;
      ids_[i] = id;
      while (i > 0) {
        const size_t p = (i - 1) / 2;
        if (!Worse(ids_[i], ids_[p])) break;
        Swap(i, p);
        i = p;
      }
    } else if (x_[id] > Root()) {
      ids_[0] = id;
      SiftDown(0, size_);
    }
  }
  // Offers x[i..n) one by one (NaN skipped) until the heap is full; returns where it stopped.
  size_t Fill(size_t i, size_t n) {
    for (; i < n && !Full(); ++i)
      if (x_[i] == x_[i]) Offer(static_cast<int32_t>(i));
    return i;
  }
  // Offers x[i..n) one by one (NaN skipped).
  void OfferRange(size_t i, size_t n) {
    for (; i < n; ++i)
      if (x_[i] == x_[i]) Offer(static_cast<int32_t>(i));
  }
  // Sorts the kept ids into rank order (best first); returns how many there are.
  size_t Finish() {
    for (size_t n = size_; n > 1; --n) {
      Swap(0, n - 1);
      SiftDown(0, n - 1);
    }
    return size_;
  }

 private:
  // a ranks after b: smaller value, or equal value and higher id.
  bool Worse(int32_t a, int32_t b) const { return x_[a] < x_[b] || (x_[a] == x_[b] && a > b); }
  void Swap(size_t i, size_t j) {
    const int32_t t = ids_[i];
    ids_[i] = ids_[j];
    ids_[j] = t;
  }
  void SiftDown(size_t i, size_t n) {
    for (;;) {
      const size_t l = 2 * i + 1;
      if (l >= n) return;
      size_t w = l;
      if (l + 1 < n && Worse(ids_[l + 1], ids_[l])) w = l + 1;
      if (!Worse(ids_[w], ids_[i])) return;
      Swap(i, w);
      i = w;
    }
  }
  int32_t* ids_;
  const float* x_;
  size_t k_, size_ = 0;
};

}  // namespace kernels
}  // namespace sonde
