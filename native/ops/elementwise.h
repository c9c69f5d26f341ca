// Elementwise and reduction operators (float32): choose the microkernel table for a variant,
// compute broadcasting strides and row/column layouts, and split the work over the pool.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/elementwise/elementwise.h"
#include "runtime/cpu.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class ElementwiseVariant { kAuto, kReference, kScalar, kAvx2, kAvx512 };

// Returns false (and leaves *out unchanged) for an unknown name.
bool ParseElementwiseVariant(const std::string& name, ElementwiseVariant* out);
const char* ElementwiseVariantName(ElementwiseVariant v);
// Empty string if the variant can run on this CPU; otherwise why not.
std::string ElementwiseVariantUnavailable(ElementwiseVariant v);
// The kernel table of a variant; kAuto is the best for Cpu().level.
kernels::ElementwiseUkernels ElementwiseTable(ElementwiseVariant v);

using Dims = std::vector<size_t>;

// NumPy broadcasting: dims align from the right, a dim of 1 stretches. False if incompatible.
bool BroadcastDims(const Dims& a, const Dims& b, Dims* out);

// Where one operator call runs.
struct ElementwiseContext {
  ThreadPool* pool;
  unsigned max_threads;
  const CancelFlag* cancel;
  kernels::ElementwiseUkernels uk;
};

// Each Run* returns false if cancelled. Shapes are validated by the caller (the binding).

// y (shape BroadcastDims(a_dims, b_dims)) = a op b.
bool RunBinary(const ElementwiseContext& ctx, int32_t op, const float* a, const Dims& a_dims,
               const float* b, const Dims& b_dims, float* y);
bool RunUnary(const ElementwiseContext& ctx, int32_t op, size_t n, const float* x, float* y);
bool RunSoftmax(const ElementwiseContext& ctx, const float* x, const Dims& dims, size_t axis, float* y);
// Normalises each of `rows` contiguous rows of n.
bool RunLayerNorm(const ElementwiseContext& ctx, const float* x, size_t rows, size_t n,
                  const float* gamma, const float* beta, float eps, float* y);
bool RunRmsNorm(const ElementwiseContext& ctx, const float* x, size_t rows, size_t n,
                const float* gamma, float eps, float* y);
// y has dims with dims[axis] removed (or 1); dims[axis] >= 1.
bool RunArgmax(const ElementwiseContext& ctx, const float* x, const Dims& dims, size_t axis, int64_t* y);
// values/indices have dims with dims[axis] replaced by k; 1 <= k <= dims[axis].
bool RunTopK(const ElementwiseContext& ctx, const float* x, const Dims& dims, size_t axis, size_t k,
             bool largest, float* values, int64_t* indices);

enum class CastType : int32_t { kFloat32 = 0, kFloat16 = 1, kBfloat16 = 2 };
bool ParseCastType(const std::string& name, CastType* out);
// n elements from x (float or uint16_t bits, per `from`) to y (per `to`).
bool RunCast(const ElementwiseContext& ctx, CastType from, const void* x, CastType to, void* y, size_t n);

}  // namespace sonde
