// Activation sparsity for batch-1 GEMMs: when the one row of A is mostly zeros (a ReLU's output),
// compute C = epilogue(A * B) from the packed weights' rows of the non-zero k only.
#pragma once
#include <cstddef>

#include "ops/gemm.h"

namespace sonde {

// Fraction of non-zero activations at or below which the skipping GEMV runs. Measured on 4096 ->
// 1024 at batch 1 (bench `sparse`, 2-core EPYC, AVX-512, weights streaming from memory), skipping
// against the dense GEMV: 90% zeros 3.3x, 80% 2.1x, 70% 1.7x, 60% 1.3x, 50% 0.94x. A row of NR
// floats is two cache lines, so half the rows cost about the full stream; 0.4 keeps a clear margin.
constexpr double kGemvSkipMaxDensity = 0.4;

enum class GemvSkipResult { kDense, kRan, kCancelled };

// For args.m == 1: counts the non-zero activations (one pass over K) and, when their fraction is at
// most kGemvSkipMaxDensity, runs the skipping GEMV on the pool and returns kRan (or kCancelled).
// kDense: nothing was written; the caller runs the dense GEMM.
GemvSkipResult RunGemvSkipZeros(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const GemmArgs& args,
                                const PackedGemmWeights& w);

// The kernel RunGemvSkipZeros uses for these weights, e.g. f32_gemv_skipzero__avx2.
const char* GemvSkipUkernelName(const PackedGemmWeights& w);

}  // namespace sonde
