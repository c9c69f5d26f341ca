// Activation sparsity for batch-1 GEMMs: when the one row of A is mostly zeros (a ReLU's output),
// compute C = epilogue(A * B) from the packed weights' rows of the non-zero k only.
#pragma once
#include <cstddef>

#include "ops/gemm.h"

namespace sonde {

// Fraction of non-zero activations at or below which the skipping GEMV runs. Above it the dense
// GEMV's streaming reads win over the skipping kernel's jumps (see RunGemvSkipZeros in the .cc).
constexpr double kGemvSkipMaxDensity = 0.5;

enum class GemvSkipResult { kDense, kRan, kCancelled };

// For args.m == 1: counts the non-zero activations (one pass over K) and, when their fraction is at
// most kGemvSkipMaxDensity, runs the skipping GEMV on the pool and returns kRan (or kCancelled).
// kDense: nothing was written; the caller runs the dense GEMM.
GemvSkipResult RunGemvSkipZeros(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const GemmArgs& args,
                                const PackedGemmWeights& w);

// The kernel RunGemvSkipZeros uses for these weights, e.g. f32_gemv_skipzero__avx2.
const char* GemvSkipUkernelName(const PackedGemmWeights& w);

}  // namespace sonde
