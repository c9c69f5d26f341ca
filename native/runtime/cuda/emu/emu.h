// The CUDA execution model on the CPU, for tests: kernel source written for nvcc compiles against
// this header with the host compiler and runs here. Each block's threads are fibers on one OS
// thread, switched only at synchronisation points; __syncthreads is a barrier over the block, warp
// shuffles, votes and mma are exchanges over the 32 lanes of a warp (consecutive linear thread
// ids), and __shared__ variables are static thread_local, which makes them per block because a
// block's fibers share their OS thread and blocks run one after another.
//
// What it cannot show: timing, memory-ordering races between threads (a fiber runs until it
// synchronises, so a missing __syncthreads can pass here that fails on a GPU), bank conflicts and
// coalescing. It does catch barrier deadlocks, divergent warp syncs and launch-configuration errors.
// Only emulated-mode translation units include this (runtime/cuda/dialect.h picks it).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define __grid_constant__

namespace sonde {
namespace emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Set by the scheduler before it resumes a fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

// Synchronisation points: each may switch to another fiber, so they are out of line.
void __syncthreads();
int __syncthreads_count(int predicate);
int __syncthreads_and(int predicate);
int __syncthreads_or(int predicate);
void __syncwarp(unsigned mask = 0xffffffffu);
unsigned __ballot_sync(unsigned mask, int predicate);
int __any_sync(unsigned mask, int predicate);
int __all_sync(unsigned mask, int predicate);
[[noreturn]] void __trap();
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace detail {
constexpr size_t kLaneSlotBytes = 64;
// Every lane of `mask` deposits `bytes` of data (at most kLaneSlotBytes) and waits for the others;
// returns the warp's 32 slots, kLaneSlotBytes apart, valid until this lane's next exchange.
const unsigned char* WarpExchange(unsigned mask, const void* data, size_t bytes);
unsigned LaneId();
// The launch's dynamic shared memory (per OS thread, so per block), 1024-byte aligned as the
// largest swizzle pattern of the tensor copies and wgmma descriptors (runtime/cuda/dialect_sm90.h) needs.
unsigned char* DynamicShared();
// Parks the calling thread until ready(arg) holds: the emulated form of a spin-wait on memory that
// other threads (or the emulated copy engine) change, such as an mbarrier phase. The scheduler
// re-checks ready after every sweep; a kernel in which nobody can make it true is reported stuck,
// with `what` naming the wait.
void WaitUntil(bool (*ready)(const void* arg), const void* arg, const char* what);
// Runs body() once per thread of every block; returns an empty string or what went wrong.
std::string RunGrid(dim3 grid, dim3 block, size_t dynamic_shared, void (*body)(void*), void* ctx);
}  // namespace detail

// Out-of-segment sources read the lane's own value, as the PTX shfl instruction does.
template <typename T>
T ShflFrom(unsigned mask, T v, unsigned (*source)(unsigned lane, unsigned base, unsigned width, int arg), int arg,
           int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= detail::kLaneSlotBytes, "shuffle type");
  const unsigned char* slots = detail::WarpExchange(mask, &v, sizeof(T));
  const unsigned lane = detail::LaneId(), w = static_cast<unsigned>(width);
  const unsigned src = source(lane, lane & ~(w - 1), w, arg);
  T out;
  std::memcpy(&out, slots + detail::kLaneSlotBytes * src, sizeof(T));
  return out;
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ShflFrom(mask, v, [](unsigned, unsigned base, unsigned w, int a) { return base + (static_cast<unsigned>(a) & (w - 1)); },
                  src_lane, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ShflFrom(mask, v, [](unsigned lane, unsigned base, unsigned w, int a) {
    const unsigned s = lane ^ static_cast<unsigned>(a);
    return s >= base && s < base + w ? s : lane;
  }, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ShflFrom(mask, v, [](unsigned lane, unsigned base, unsigned w, int a) {
    const unsigned s = lane + static_cast<unsigned>(a);
    return s < base + w ? s : lane;
  }, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ShflFrom(mask, v, [](unsigned lane, unsigned base, unsigned, int a) {
    return lane >= base + static_cast<unsigned>(a) ? lane - static_cast<unsigned>(a) : lane;
  }, static_cast<int>(delta), width);
}

// Atomics are real atomics: nothing stops a later emulator from running blocks on several threads.
template <typename T>
T atomicAdd(T* p, T v) {
  if constexpr (std::is_floating_point<T>::value) {
    T old, desired;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
      desired = old + v;
    } while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  }
}
template <typename T>
T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicCAS(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
template <typename T>
T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}

// The device math and bit intrinsics kernels use, with the host's (more exact) results.
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
// Four signed byte products summed into c (sm_61+ dp4a).
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i)
    c += static_cast<int8_t>(static_cast<unsigned>(a) >> (8 * i)) * static_cast<int8_t>(static_cast<unsigned>(b) >> (8 * i));
  return c;
}

}  // namespace emu
}  // namespace sonde
