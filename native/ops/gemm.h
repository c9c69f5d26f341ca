// GEMM operator: chooses the microkernel for an ISA, packs weights once, partitions a run over the
// pool. C[M x N] = act(A[M x K] * B[K x N] + bias).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/gemm/gemm.h"
#include "runtime/cpu.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class GemmVariant { kAuto, kReference, kScalar, kAvx2, kAvx512 };

// Returns false (and leaves *out unchanged) for an unknown name.
bool ParseGemmVariant(const std::string& name, GemmVariant* out);
// Empty string if the variant can run on this CPU; otherwise why not.
std::string GemmVariantUnavailable(GemmVariant v);
// The microkernel used for a (resolved, non-reference) variant.
kernels::F32GemmUkernelInfo GemmUkernel(GemmVariant v);
GemmVariant ResolveGemmVariant(GemmVariant v);  // kAuto -> best for this CPU
const char* GemmVariantName(GemmVariant v);

// Weights packed for one microkernel's panel width. Immutable after creation, so one packed matrix
// may serve any number of concurrent runs.
class PackedGemmWeights {
 public:
  static std::unique_ptr<PackedGemmWeights> Pack(const float* b, size_t k, size_t n, size_t ldb,
                                                 GemmVariant variant);
  ~PackedGemmWeights();
  size_t k() const { return k_; }
  size_t n() const { return n_; }
  size_t bytes() const { return bytes_; }
  GemmVariant variant() const { return variant_; }
  const kernels::F32GemmUkernelInfo& ukernel() const { return ukernel_; }
  const float* panel(size_t p) const { return data_ + p * k_ * ukernel_.nr; }

 private:
  PackedGemmWeights() = default;
  size_t k_ = 0, n_ = 0, bytes_ = 0;
  GemmVariant variant_ = GemmVariant::kScalar;
  kernels::F32GemmUkernelInfo ukernel_{};
  float* data_ = nullptr;
};

struct GemmArgs {
  const float* a = nullptr;
  size_t m = 0, lda = 0;
  float* c = nullptr;
  size_t ldc = 0;
  // Pointers at row 0 / column 0 (scale, bias: length n; residual: m rows of ldr); RunGemm offsets
  // them per tile. All null and kActNone: plain C = A*B.
  kernels::GemmEpilogue epilogue{nullptr, nullptr, nullptr, 0, kernels::kActNone, 0, 0.0f, 0.0f};
};

// The epilogue of the tile at (m0, n0).
inline kernels::GemmEpilogue OffsetEpilogue(const kernels::GemmEpilogue& e, size_t m0, size_t n0) {
  kernels::GemmEpilogue t = e;
  if (t.scale) t.scale += n0;
  if (t.bias) t.bias += n0;
  if (t.residual) t.residual += m0 * t.ldr + n0;
  return t;
}

// Runs on the calling pool thread plus up to max_threads-1 helpers. Returns false if cancelled.
bool RunGemm(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const GemmArgs& args,
             const PackedGemmWeights& w);

}  // namespace sonde
