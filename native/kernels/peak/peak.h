// Machine-peak probes for the bench harness: FMA throughput per ISA and streaming read bandwidth.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

// Each runs `iters` rounds of independent FMA chains and returns the flops done (2 per lane per FMA).
// `sink` receives a value derived from the registers so the work cannot be removed.
double F32FmaPeakScalar(uint64_t iters, float* sink);
#if defined(__x86_64__) || defined(_M_X64)
double F32FmaPeakAvx2(uint64_t iters, float* sink);
double F32FmaPeakAvx512(uint64_t iters, float* sink);
// Sums n floats (n a multiple of 64, p 64-byte aligned) with wide loads; returns the sum.
float F32ReadSumAvx2(const float* p, size_t n);
#endif
float F32ReadSumScalar(const float* p, size_t n);

}  // namespace kernels
}  // namespace sonde
