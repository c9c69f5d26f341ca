// Software prefetches for the CPU microkernels: a read of the line at p into L1 (T0) or L2 (T1).
//
// asm volatile statements rather than __builtin_prefetch / _mm_prefetch: the compiler may delete a
// loop whose only effect is prefetching (a prefetch has no observable effect), and GCC 12 did so
// here without a word: the sparse columns kernels' output/residual lines (a loop over m), and the
// NCHWc conv tiles' residual lines (a loop of 28-56, removed since: made real, it was slower). An
// asm statement stays where it is written. Prefetches inside loops that also compute are kept
// either way (the GEMM's, the conv tiles' weight and input prefetches): scripts/check-prefetches.sh
// compiles each kernel file with _mm_prefetch redefined as asm and compares the prefetch counts.
// Pure inline functions, no includes (ISA files include this).
#pragma once

namespace sonde {
namespace kernels {

#if defined(__x86_64__) || defined(_M_X64)
static inline void PrefetchL1(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }
static inline void PrefetchL2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }
#else
static inline void PrefetchL1(const void* p) { __builtin_prefetch(p, 0, 3); }
static inline void PrefetchL2(const void* p) { __builtin_prefetch(p, 0, 2); }
#endif

}  // namespace kernels
}  // namespace sonde
