// Low-precision-weight GEMM operator: bf16, fp16 or int8 weights packed once (per-load work), fp32
// activations and output, the fp32 epilogue of kernels/gemm/gemm.h. Kept apart from ops/gemm.{h,cc}
// (the fp32 operator) so the two evolve independently; it shares only GemmEpilogue and the pool.
//
// Numerics (the 'reference' variant computes each definition with exact double/integer sums):
// - bf16, variants avx512bf16 and amx: A is rounded to bf16 (nearest even) as well, like oneDNN's and ONNX
//   Runtime's bf16 matmul; products are exact in fp32, sums are fp32 (vdpbf16ps also flushes
//   denormals to zero). Other variants widen the bf16 weights to fp32 and keep A in fp32 (more
//   exact: only the weights are rounded).
// - fp16: weights rounded to IEEE half (nearest even; beyond +-65504 they become +-Inf), A fp32.
// - int8: weights quantised symmetrically per output column, q = rint(b / s_j) in [-127, 127] with
//   s_j = max_k |b[k][j]| / 127 (a zero column has s_j = 0); weights must be finite. A is quantised
//   per row at run time to u8 with a zero point: lo = min(0, min a), hi = max(0, max a),
//   s = hi/255 - lo/255, z = rint(-lo / s), u = clamp(rint(a * (1/s)) + z, 0, 255). Then
//   C = (sum u*q - z * sum_k q) * s * s_j, exactly in s32 (K <= 66311), then the epilogue. A row
//   holding NaN or +-Inf gets s = NaN, so its whole output row is NaN (as its fp32 product would be
//   NaN or Inf).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/gemm/gemm.h"
#include "kernels/gemm/lowp-gemm.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class GemmPrecision { kFp32, kBf16, kFp16, kInt8 };
enum class LowpGemmVariant { kAuto, kReference, kScalar, kAvx2, kAvx512, kAvx512Bf16, kAvx512Vnni, kAmx };

bool ParseGemmPrecision(const std::string& name, GemmPrecision* out);
const char* GemmPrecisionName(GemmPrecision p);
bool ParseLowpGemmVariant(const std::string& name, LowpGemmVariant* out);
const char* LowpGemmVariantName(LowpGemmVariant v);

// Why variant v cannot run low precision p here (empty if it can). *not_for_precision is set when
// the pair makes no sense on any CPU (e.g. avx512vnni for bf16) rather than this CPU lacking an ISA.
std::string LowpGemmVariantUnavailable(GemmPrecision p, LowpGemmVariant v, bool* not_for_precision);
// kAuto -> the fastest variant for p on this CPU (amx, else avx512bf16 / avx512vnni where present).
LowpGemmVariant ResolveLowpGemmVariant(GemmPrecision p, LowpGemmVariant v);

// Weights packed for one low-precision microkernel. Immutable after creation: one packed matrix
// serves any number of concurrent runs.
class PackedLowpGemmWeights {
 public:
  // b: K x N fp32, leading dimension ldb. p is kBf16, kFp16 or kInt8; v a resolved-or-auto,
  // runnable, non-reference variant. Returns null with *error set for bad data (NaN/Inf in int8
  // weights, K above the int8 limit). Throws std::bad_alloc.
  static std::unique_ptr<PackedLowpGemmWeights> Pack(const float* b, size_t k, size_t n, size_t ldb,
                                                     GemmPrecision p, LowpGemmVariant v, std::string* error);
  ~PackedLowpGemmWeights();
  size_t k() const { return k_; }
  size_t n() const { return n_; }
  size_t bytes() const { return bytes_; }
  GemmPrecision precision() const { return precision_; }
  LowpGemmVariant variant() const { return variant_; }
  const kernels::LowpGemmUkernelInfo& ukernel() const { return ukernel_; }
  const void* panel(size_t p) const { return data_ + p * panel_bytes_; }
  const float* w_scale() const { return w_scale_; }   // int8: n_panels * NR (zero past N)
  const int32_t* w_sum() const { return w_sum_; }     // int8: per-column sums of q
  // The stored (rounded / quantised) weight at (kk, j): fp32 value for bf16/fp16, q for int8.
  float ValueAt(size_t kk, size_t j) const;
  int8_t QuantAt(size_t kk, size_t j) const;
  // "bf16" | "fp32" | "u8": what the kernel does to A.
  const char* ActivationForm() const;

 private:
  PackedLowpGemmWeights() = default;
  size_t k_ = 0, n_ = 0, bytes_ = 0, panel_bytes_ = 0;
  GemmPrecision precision_ = GemmPrecision::kBf16;
  LowpGemmVariant variant_ = LowpGemmVariant::kScalar;
  kernels::LowpGemmUkernelInfo ukernel_{};
  unsigned char* data_ = nullptr;
  float* w_scale_ = nullptr;
  int32_t* w_sum_ = nullptr;
};

struct LowpGemmArgs {
  const float* a = nullptr;
  size_t m = 0, lda = 0;
  float* c = nullptr;
  size_t ldc = 0;
  kernels::GemmEpilogue epilogue{nullptr, nullptr, nullptr, 0, kernels::kActNone, 0, 0.0f, 0.0f};
};

// Prepares A (bf16 pairs / u8 quantisation) and runs the tile grid on the calling pool thread plus
// up to max_threads-1 helpers; reference = the exact scalar definition. Returns false if cancelled.
bool RunLowpGemm(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const LowpGemmArgs& args,
                 const PackedLowpGemmWeights& w, bool reference);

}  // namespace sonde
