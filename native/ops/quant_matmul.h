// Quantised-weight matrix product operator: y[M x N] = x[M x K] . W^T with W stored as GGUF stores
// it (N rows of K elements of type f32 | f16 | bf16 | q8_0 | q4_0; see kernels/quant/quant.h for
// the layouts and the precision definition). W is used where it lies (a GGUF mapping or a
// TypedArray): no packing, so a model's weights are read straight from the page cache.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/quant/quant.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class QuantVariant { kAuto, kReference, kScalar, kAvx2, kAvx512, kAvx512Vnni };

bool ParseQuantVariant(const std::string& name, QuantVariant* out);
const char* QuantVariantName(QuantVariant v);
// Maps a ggml type id (formats/gguf.h) to a kernel weight type; false if no kernel reads it.
bool QuantTypeFromGgml(uint32_t ggml_type, int32_t* out);
bool ParseQuantType(const std::string& name, int32_t* out);  // "f32" | "f16" | "bf16" | "q8_0" | "q4_0"
const char* QuantTypeName(int32_t type);
// Why variant v cannot run type here (empty if it can); *not_for_type when no CPU could (avx512vnni
// for a float type) rather than this CPU lacking the ISA.
std::string QuantVariantUnavailable(int32_t type, QuantVariant v, bool* not_for_type);
// kAuto -> the fastest variant for type on this CPU.
QuantVariant ResolveQuantVariant(int32_t type, QuantVariant v);
// The microkernel of a resolved, runnable, non-reference variant.
kernels::QuantDotUkernelInfo QuantUkernel(int32_t type, QuantVariant v);

// kGemv: every activation row dotted against every weight row (kQuantMaxMr rows share a decoded
// weight block); kGemm: weights packed per panel once, tiles of activation rows over the panel
// (kernels/quant/quant.h); kAuto: kGemm from kQuantGemmMinRows rows where a GEMM kernel exists.
// kRepacked (q8_0 at avx512vnni): the weights repacked to q8_0x32 for this call, then its kernel,
// as a language model runs its q8_0 tensors after repacking them at load (for tests and
// benchmarks). Weights of type kQuantQ8_0x32 take that kernel whatever the algorithm.
enum class QuantAlgorithm { kAuto, kGemv, kGemm, kRepacked };

bool ParseQuantAlgorithm(const std::string& name, QuantAlgorithm* out);
// The blocked GEMM kernels of a resolved variant for type (pack null: none).
kernels::QuantGemmUkernelInfo QuantGemmUkernel(int32_t type, QuantVariant v);

struct QuantMatmulArgs {
  const float* x = nullptr;
  size_t m = 0, k = 0, ldx = 0;
  const uint8_t* w = nullptr;  // N rows of QuantRowBytes(type, k) bytes
  size_t n = 0;
  int32_t type = kernels::kQuantF32;
  float* y = nullptr;
  size_t ldy = 0;
  QuantAlgorithm algorithm = QuantAlgorithm::kAuto;
};

// Activations in the q8 form (kernels/quant/quant.h: QuantActs). A caller that runs many products
// (a transformer's decode loop) keeps one and passes it in, so that a step allocates nothing once
// the buffers have grown to the largest M.
struct QuantMatmulScratch {
  int32_t form = 0;         // kernels::QuantActForm the activations were quantised to
  int32_t corr_offset = 0;  // kQuantActQ8Corr: the weight type's offset
  size_t rows = 0, k = 0;   // activation rows and their length
  size_t nb_pad = 0, q_stride = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sums, corr;
};

// Quantises the activations (block types), then splits the N output rows over the calling pool
// thread plus up to max_threads-1 helpers. v: resolved (not kAuto). Returns false if cancelled.
// scratch: null for a buffer set of this call only. Throws std::bad_alloc for the activation buffers.
bool RunQuantMatmul(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs& args,
                    QuantVariant v, QuantMatmulScratch* scratch = nullptr);

// The two halves of RunQuantMatmul, for callers that run several products on the same activations
// (an MoE layer's gate and up chunks): QuantizeActivations puts args' activations (x, m, k, ldx)
// into scratch in the form that args.type, args.algorithm and v need (nothing for float types);
// RunQuantMatmulQuantized then reads rows [row0, row0 + args.m) of it for args.x's rows, for any
// weights of the same type and k (args.m may be less than the quantised rows).
bool QuantizeActivations(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs& args,
                         QuantVariant v, QuantMatmulScratch* scratch);
bool RunQuantMatmulQuantized(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel,
                             const QuantMatmulArgs& args, QuantVariant v, const QuantMatmulScratch& scratch,
                             size_t row0 = 0);

// Several products of the same activations (x, m, k, ldx) and weight type, at most 8 (a layer's q,
// k and v projections, an FFN's gate and up): the activations quantised once and every product's
// tasks (row-dot or GEMM) in one ParallelFor, so that a decode step hands work to the pool once
// instead of once per product. Each y is what RunQuantMatmul would write. Products that differ in
// their activations or type run one after another.
bool RunQuantMatmuls(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs* args,
                     size_t count, QuantVariant v, QuantMatmulScratch* scratch = nullptr);

// n rows of k q8_0 weights (row layout at w) repacked into the q8_0x32 layout at out
// (kernels::QuantQ8_0x32Bytes(n, k) bytes, 64-byte aligned), one task per run of groups.
bool RepackQ8_0x32(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const uint8_t* w, size_t n, size_t k,
                   uint8_t* out);

// out[N x K] = the dequantised weights (exact).
bool RunDequantize(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const uint8_t* w, int32_t type,
                   size_t n, size_t k, float* out);

}  // namespace sonde
