#include "ops/gemv_skip.h"

#include <algorithm>
#include <vector>

#include "kernels/sparse/gemv-skip.h"

namespace sonde {

namespace {

bool Fits(const kernels::F32GemvSkipUkernelInfo& uk, size_t nr) {
  if (!uk.fn || nr == 0 || nr % uk.nr_multiple != 0 || nr > uk.max_nr) return false;
  const size_t v = nr / uk.nr_multiple;
  return v == 1 || v == 2 || v == 4 || v == 8;  // the vector counts the SIMD kernels unroll for
}

kernels::F32GemvSkipUkernelInfo Ukernel(const PackedGemmWeights& w) {
  const size_t nr = w.ukernel().nr;
#if defined(__x86_64__) || defined(_M_X64)
  // The packed panels were laid out for w.variant(), which the CPU supports.
  if (w.variant() == GemmVariant::kAvx512) {
    const auto uk = kernels::F32GemvSkipUkernelAvx512();
    if (Fits(uk, nr)) return uk;
  }
  if (w.variant() == GemmVariant::kAvx512 || w.variant() == GemmVariant::kAvx2) {
    const auto uk = kernels::F32GemvSkipUkernelAvx2();
    if (Fits(uk, nr)) return uk;
  }
#endif
  return kernels::F32GemvSkipUkernelScalar();
}

bool Trivial(const kernels::GemmEpilogue& e) {
  return !e.scale && !e.bias && !e.residual && e.activation == kernels::kActNone;
}

}  // namespace

const char* GemvSkipUkernelName(const PackedGemmWeights& w) { return Ukernel(w).name; }

GemvSkipResult RunGemvSkipZeros(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const GemmArgs& args,
                                const PackedGemmWeights& w) {
  const size_t k = w.k(), n = w.n(), nr = w.ukernel().nr;
  const auto uk = Ukernel(w);
  if (args.m != 1 || k == 0 || n == 0 || nr > uk.max_nr) return GemvSkipResult::kDense;
  // The non-zero k, kept per calling thread (the plan's runner): a run allocates nothing once warm.
  thread_local std::vector<uint32_t> ks;
  ks.resize(k);
  size_t nks = 0;
  const float* x = args.a;
  // Branch-free compaction: the index is always written, the count advances only for non-zeros.
  for (size_t i = 0; i < k; ++i) {
    ks[nks] = static_cast<uint32_t>(i);
    nks += x[i] != 0.0f;
  }
  // A dense GEMV streams K*N floats at full read bandwidth; the skipping one reads nks rows of NR
  // floats per panel at scattered k, which the prefetchers cannot run ahead of. The two cross over
  // near half the rows (see kGemvSkipMaxDensity), so above the threshold the dense path runs.
  if (static_cast<double>(nks) > kGemvSkipMaxDensity * static_cast<double>(k)) return GemvSkipResult::kDense;
  const size_t panels = (n + nr - 1) / nr;
  const unsigned threads = std::max(1u, std::min(max_threads, pool.size()));
  // A few panel ranges per thread: equal work per panel, so contiguous ranges balance.
  const size_t chunks = std::min(panels, static_cast<size_t>(4) * threads);
  const size_t per = (panels + chunks - 1) / chunks;
  const kernels::GemmEpilogue& e = args.epilogue;
  const bool trivial = Trivial(e);
  const uint32_t* kp = ks.data();
  const bool ok = pool.ParallelFor(chunks, threads, [&](size_t t) {
    const size_t p1 = std::min(panels, (t + 1) * per);
    for (size_t p = t * per; p < p1; ++p) {
      const size_t n0 = p * nr, nc = std::min(nr, n - n0);
      const kernels::GemmEpilogue ep = OffsetEpilogue(e, 0, n0);
      uk.fn(nr, nc, x, kp, nks, w.panel(p), args.c + n0, trivial ? nullptr : &ep);
    }
  }, cancel);
  return ok ? GemvSkipResult::kRan : GemvSkipResult::kCancelled;
}

}  // namespace sonde
