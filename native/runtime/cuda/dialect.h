// The dialect every GPU kernel and op source is written in: CUDA C++ as nvcc takes it, plus the few
// helpers below that differ between a real GPU and the emulator. A source that includes this and
// nothing CUDA-specific besides compiles in both modes:
//   nvcc (real devices)            -> namespace sonde::cuda, SONDE_GPU_EMULATED 0
//   host compiler + emu/emu.h      -> namespace sonde::emu,  SONDE_GPU_EMULATED 1
// Write kernel code inside `namespace sonde { namespace SONDE_GPU_NS {`, launch with Launch()
// (not <<<>>>), take dynamic shared memory with SONDE_DYNAMIC_SHARED, use the conversion and mma
// helpers here instead of cuda_fp16.h / inline PTX, and register host entry points with SONDE_GPU_OP.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "runtime/cuda/gpu.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SONDE_GPU_NS cuda
#define SONDE_GPU_EMULATED 0
#define SONDE_DYNAMIC_SHARED(T, name)                                    \
  extern __shared__ __align__(16) unsigned char sonde_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(sonde_dynamic_shared_)
#else
#include "runtime/cuda/emu/emu.h"
#define SONDE_GPU_NS emu
#define SONDE_GPU_EMULATED 1
#define SONDE_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::sonde::emu::detail::DynamicShared())
#endif

// Full unrolling of constant-trip loops over register arrays: without it nvcc may keep such an array
// in local memory. The host compiler does not know the pragma, so the emulator gets none.
#if SONDE_GPU_EMULATED
#define SONDE_UNROLL
#else
#define SONDE_UNROLL _Pragma("unroll")
#endif

namespace sonde {
namespace SONDE_GPU_NS {

// Registers fn under `name` for this mode at static initialisation.
struct GpuOpRegistrar {
  GpuOpRegistrar(const char* name, GpuOpFn fn) { RegisterGpuOp(name, SONDE_GPU_EMULATED != 0, fn); }
};
#define SONDE_GPU_OP_CAT2(a, b) a##b
#define SONDE_GPU_OP_CAT(a, b) SONDE_GPU_OP_CAT2(a, b)
#define SONDE_GPU_OP(name, fn) static const GpuOpRegistrar SONDE_GPU_OP_CAT(sonde_gpu_op_, __LINE__)(name, fn)

// Runs kernel on grid x block with `shared` bytes of dynamic shared memory, in stream order. The
// arguments convert to the kernel's parameter types here, as <<<>>> would convert them. A bad
// configuration or launch failure is GpuError(kKernel); errors inside the kernel surface at the
// stream's Synchronize() on a GPU and here at once on the emulator.
//
// LaunchDependent is Launch as a programmatic dependent launch (Hopper's PDL) where the device and
// the kernel's code allow it: the grid may start while the stream's previous kernel still runs, as
// soon as every block of that one has called GridDependentsLaunch (or exited). Such a kernel must
// call GridDependencyWait before it reads anything an earlier kernel wrote or writes anything one
// reads; before that it may only read what no kernel of the stream writes (weights). A kernel whose
// code was compiled for a PTX target below 9.0 (where the wait does not exist) is launched plainly.
template <typename... P, typename... A>
void LaunchKernel(bool dependent, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, GpuStream& stream,
                  A&&... args);
template <typename... P, typename... A>
void Launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, GpuStream& stream, A&&... args) {
  LaunchKernel(false, kernel, grid, block, shared, stream, std::forward<A>(args)...);
}
template <typename... P, typename... A>
void LaunchDependent(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, GpuStream& stream, A&&... args) {
  LaunchKernel(true, kernel, grid, block, shared, stream, std::forward<A>(args)...);
}

// PDL on real devices: off with SONDE_GPU_PDL=0 (an A/B switch), or for the rest of the process
// once a driver refused a dependent launch (RefusePdl; the launch is then retried plainly).
bool PdlEnabled();
void RefusePdl();
// Whether the kernel's code was compiled for a PTX target of 9.0 or later (where the wait exists),
// looked up once per kernel.
bool KernelWaits(const void* kernel);

template <typename... P, typename... A>
void LaunchKernel(bool dependent, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, GpuStream& stream,
                  A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "Launch: argument count differs from the kernel's");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
#if SONDE_GPU_EMULATED
  (void)dependent;  // blocks run one grid after another here
  auto run = [kernel, grid, block, shared](std::tuple<std::decay_t<P>...>& args) {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{kernel, &args};
    const std::string error = detail::RunGrid(grid, block, shared, [](void* p) {
      Ctx* c = static_cast<Ctx*>(p);
      std::apply(c->kernel, *c->params);
    }, &ctx);
    if (!error.empty()) throw GpuError(GpuErrc::kKernel, "emulated kernel: " + error);
  };
  if (stream.capturing()) {
    // Each replay gets the captured arguments afresh, as a CUDA graph's kernel node does.
    stream.Record([run, params]() {
      std::tuple<std::decay_t<P>...> args = params;
      run(args);
    });
    return;
  }
  run(params);
#else
  void* pointers[sizeof...(P) + 1] = {};
  std::apply([&](auto&... p) {
    size_t i = 0;
    ((pointers[i++] = static_cast<void*>(&p)), ...);
  }, params);
  cudaError_t e = cudaSuccess;
  if (shared > 48 * 1024)
    e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(shared));
  if (dependent && e == cudaSuccess) dependent = PdlEnabled() && KernelWaits(reinterpret_cast<const void*>(kernel));
  if (e == cudaSuccess && dependent) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared;
    config.stream = static_cast<cudaStream_t>(stream.handle());
    config.attrs = attr;
    config.numAttrs = 1;
    e = cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(kernel), pointers);
    // A configuration error, not a fault: retried as a plain launch, and if that one goes, this
    // driver or device takes no programmatic launches and none is tried again.
    if (e == cudaErrorNotSupported || e == cudaErrorInvalidValue) {
      cudaGetLastError();
      e = cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, pointers, shared,
                           static_cast<cudaStream_t>(stream.handle()));
      if (e == cudaSuccess) RefusePdl();
    }
  } else if (e == cudaSuccess) {
    e = cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, pointers, shared,
                         static_cast<cudaStream_t>(stream.handle()));
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw GpuError(GpuErrc::kKernel, std::string("kernel launch: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
#endif
}

inline unsigned CeilDiv(size_t a, size_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// ---- fp16 / bf16 as raw 16-bit values (storage type uint16_t in every kernel) ----
#if SONDE_GPU_EMULATED
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  return __uint_as_float(bits);
}
inline uint16_t FloatToHalf(float f) {  // round to nearest even, as __float2half_rn
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (ax >= 0x477ff000u) return sign | 0x7c00;  // rounds to infinity
  if (ax < 0x38800000u) {                      // subnormal or zero in half
    const float a = __uint_as_float(ax) * 16777216.0f;  // scale by 2^24: the subnormal's integer
    const uint32_t q = static_cast<uint32_t>(std::nearbyint(a));
    return sign | static_cast<uint16_t>(q);
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - (112u << 23)) >> 13);
}
inline float Bf16ToFloat(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
inline uint16_t FloatToBf16(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
#else
__device__ __forceinline__ float HalfToFloat(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t FloatToHalf(float f) { return __half_as_ushort(__float2half_rn(f)); }
__device__ __forceinline__ float Bf16ToFloat(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
__device__ __forceinline__ uint16_t FloatToBf16(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
#endif

// ---- float storage types and vector access ----
// Float tensors are stored as f32, f16 or bf16 (codes shared with lib/cuda); Stored<code>::T is the
// storage type, Get widens to fp32 and Put rounds to nearest even.
enum FloatStorage : int { kStoreF32 = 0, kStoreF16 = 1, kStoreBf16 = 2 };
template <int kCode>
struct Stored;
template <>
struct Stored<kStoreF32> {
  using T = float;
  __device__ __forceinline__ static float Get(float v) { return v; }
  __device__ __forceinline__ static float Put(float v) { return v; }
};
template <>
struct Stored<kStoreF16> {
  using T = uint16_t;
  __device__ __forceinline__ static float Get(uint16_t v) { return HalfToFloat(v); }
  __device__ __forceinline__ static uint16_t Put(float v) { return FloatToHalf(v); }
};
template <>
struct Stored<kStoreBf16> {
  using T = uint16_t;
  __device__ __forceinline__ static float Get(uint16_t v) { return Bf16ToFloat(v); }
  __device__ __forceinline__ static uint16_t Put(float v) { return FloatToBf16(v); }
};

// One access of sizeof(V) bytes at p (aligned to it): a plain wide access on the GPU; the emulator's
// host compiler goes through memcpy, since reading 8- or 16-bit data through a wider type breaks
// C++'s aliasing rules there.
template <typename V>
__device__ __forceinline__ V LoadVec(const void* p) {
#if SONDE_GPU_EMULATED
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
#else
  return *reinterpret_cast<const V*>(p);
#endif
}
template <typename V>
__device__ __forceinline__ void StoreVec(void* p, const V& v) {
#if SONDE_GPU_EMULATED
  std::memcpy(p, &v, sizeof v);
#else
  *reinterpret_cast<V*>(p) = v;
#endif
}

// ---- warp-level tensor-core products (mma.sync), D += A * B per warp ----
// Fragments as the PTX ISA lays them out ("Matrix fragments for mma.m16n8k16" and "m16n8k32"),
// with g = lane / 4 and t = lane % 4:
//   m16n8k16 f16/bf16  A 16x16 row-major: a[r] holds elements (row, col), r=0: (g, 2t..2t+1),
//     r=1: (g+8, 2t..), r=2: (g, 2t+8..), r=3: (g+8, 2t+8..), low half first;
//     B 16x8 (k x n): b[0] = (k=2t..2t+1, n=g), b[1] = (k=2t+8.., n=g);
//     C/D 16x8 fp32: d[0..1] = (g, 2t..2t+1), d[2..3] = (g+8, 2t..).
//   m16n8k32 s8        A 16x32: a[0] = (g, 4t..4t+3), a[1] = (g+8, 4t..), a[2] = (g, 4t+16..),
//     a[3] = (g+8, 4t+16..); B 32x8: b[0] = (k=4t..4t+3, n=g), b[1] = (k=4t+16.., n=g); D int32 as above.
// The emulator gathers the warp's fragments and computes exactly these products, so a kernel that
// loads fragments in another layout fails its emulated test as it would fail on the GPU.
#if SONDE_GPU_EMULATED
namespace detail {
template <int K, typename Acc, typename Elem>
inline void EmulatedMma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Frag {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const unsigned char* slots = emu::detail::WarpExchange(0xffffffffu, &mine, sizeof mine);
  constexpr int kPer = K / 8;  // elements per 32-bit register: 2 (16-bit) or 4 (8-bit)
  constexpr int kBits = 32 / kPer;
  Acc A[16][K], B[K][8];
  for (int lane = 0; lane < 32; ++lane) {
    Frag f;
    std::memcpy(&f, slots + lane * emu::detail::kLaneSlotBytes, sizeof f);
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int e = 0; e < kPer; ++e) {
        const int row = g + (r & 1) * 8, col = t * kPer + e + (r >> 1) * (K / 2);
        A[row][col] = Elem::Get(f.a[r] >> (kBits * e));
      }
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < kPer; ++e) B[t * kPer + e + r * (K / 2)][g] = Elem::Get(f.b[r] >> (kBits * e));
  }
  const int lane = static_cast<int>(emu::detail::LaneId()), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >> 1) * 8, col = t * 2 + (i & 1);
    Acc s = d[i];
    for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
    d[i] = s;
  }
}
struct Bf16Elem {
  static float Get(uint32_t v) { return Bf16ToFloat(static_cast<uint16_t>(v)); }
};
struct F16Elem {
  static float Get(uint32_t v) { return HalfToFloat(static_cast<uint16_t>(v)); }
};
struct S8Elem {
  static int32_t Get(uint32_t v) { return static_cast<int8_t>(v & 0xff); }
};
}  // namespace detail
inline void MmaBf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  detail::EmulatedMma<16, float, detail::Bf16Elem>(d, a, b);
}
inline void MmaF16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  detail::EmulatedMma<16, float, detail::F16Elem>(d, a, b);
}
inline void MmaS8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  detail::EmulatedMma<32, int32_t, detail::S8Elem>(d, a, b);
}
#else
// sm_80 and newer; GPU ops pick a SIMT kernel below compute capability 8.0.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}
__device__ __forceinline__ void MmaF16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}
__device__ __forceinline__ void MmaS8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}
#endif

// ---- ldmatrix: a warp loads four 8x8 16-bit matrices from shared memory (sm_75 and newer) ----
// Lanes 8i..8i+7 point at the 8 rows of matrix i (16 contiguous bytes each, 16-byte aligned).
// LdMatrixX4: lane l gets in r[i] matrix i's row l/4, columns 2(l%4) and 2(l%4)+1 (low half first),
//   an m16n8k16 A register (or 4 bytes of an m16n8k32 s8 A row).
// LdMatrixX4Trans: r[i] holds column l/4, rows 2(l%4) and 2(l%4)+1: the B register of m16n8k16
//   read from a k-major tile (B row-major [k][n] in shared memory).
#if SONDE_GPU_EMULATED
namespace detail {
template <bool kTrans>
inline void EmulatedLdMatrixX4(uint32_t (&r)[4], const void* row) {
  const unsigned char* slots = emu::detail::WarpExchange(0xffffffffu, &row, sizeof row);
  const unsigned lane = emu::detail::LaneId();
  const auto elem = [&](unsigned src, unsigned col) {
    const unsigned char* p;
    std::memcpy(&p, slots + src * emu::detail::kLaneSlotBytes, sizeof p);
    uint16_t v;
    std::memcpy(&v, p + 2 * col, 2);
    return uint32_t(v);
  };
  for (unsigned i = 0; i < 4; ++i) {
    if (kTrans) r[i] = elem(8 * i + 2 * (lane % 4), lane / 4) | elem(8 * i + 2 * (lane % 4) + 1, lane / 4) << 16;
    else r[i] = elem(8 * i + lane / 4, 2 * (lane % 4)) | elem(8 * i + lane / 4, 2 * (lane % 4) + 1) << 16;
  }
}
}  // namespace detail
inline void LdMatrixX4(uint32_t (&r)[4], const void* row) { detail::EmulatedLdMatrixX4<false>(r, row); }
inline void LdMatrixX4Trans(uint32_t (&r)[4], const void* row) { detail::EmulatedLdMatrixX4<true>(r, row); }
#else
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
#endif

// ---- cp.async: 16-byte global -> shared copies that bypass registers (sm_80 and newer) ----
// CpAsync16 copies `src_bytes` (0..16) bytes from src and zero-fills the rest of the 16 at dst
// (both 16-byte aligned; src must be a valid address even when src_bytes is 0). Copies complete in
// commit-group order: CpAsyncWait<N> returns once at most N of this thread's committed groups are
// pending; a __syncthreads after it publishes the data to the block. The emulator copies at once,
// so it cannot catch a missing wait.
#if SONDE_GPU_EMULATED
inline void CpAsync16(void* dst, const void* src, int src_bytes) {
  unsigned char* d = static_cast<unsigned char*>(dst);
  std::memcpy(d, src, static_cast<size_t>(src_bytes));
  std::memset(d + src_bytes, 0, static_cast<size_t>(16 - src_bytes));
}
inline void CpAsyncCommit() {}
template <int N>
inline void CpAsyncWait() {}
#else
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(dst))), "l"(src), "r"(src_bytes) : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void CpAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// Programmatic dependent launch (see LaunchDependent). The emulator runs kernels one after another,
// so both are no-ops there; so they are in code for targets below 9.0.
// PrefetchL2 asks for the 128-byte line at p in L2 (a hint: nothing on the emulator).
// GridDependencyStart is the prologue of a kernel launched dependent that has nothing to do before
// the wait: wait for the previous kernel, then let the next one launch (never before the wait, or
// a chain of launched grids, each waiting on the one before, could fill the SMs that the running
// one needs).
//
// GridDependencyStart(early) with early set lets the next kernel launch first, then waits: for a
// short kernel whose successor has work that needs nothing of it (a GEMV sending its first weight
// lines toward L2), so that work overlaps this kernel and the one before it instead of starting
// after both. Safe where the rule above fears a pile-up: the successor launches only once every
// block of this grid has started (none can be kept off the SMs by it), and it goes no further than
// the successor's own wait, which releases only when this grid, and so everything before, is done.
#if SONDE_GPU_EMULATED
inline void GridDependencyWait() {}
inline void GridDependentsLaunch() {}
inline void GridDependencyStart() {}
inline void GridDependencyStart(bool) {}
inline void PrefetchL2(const void*) {}
#else
__device__ __forceinline__ void PrefetchL2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void GridDependentsLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void GridDependencyStart() {
  GridDependencyWait();
  GridDependentsLaunch();
}
__device__ __forceinline__ void GridDependencyStart(bool early) {
  if (early) {
    GridDependentsLaunch();
    GridDependencyWait();
  } else {
    GridDependencyStart();
  }
}
#endif

// Compute capability of the device an op runs on, as one number (80 for 8.0).
inline int ComputeCapability(const GpuDeviceInfo& d) { return d.cc_major * 10 + d.cc_minor; }

}  // namespace SONDE_GPU_NS
}  // namespace sonde
