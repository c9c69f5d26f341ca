// CPU feature detection, read once: CPUID for what the core implements and XCR0 for what the OS
// saves on context switch (AVX-512 registers are unusable if the kernel does not save them).
#pragma once
#include <string>
#include <vector>

namespace sonde {

enum class IsaLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct CpuFeatures {
  bool sse42 = false, popcnt = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avx512vbmi = false, avxvnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false, os_avx512 = false;
  // XCR0 enables the tile state and Linux granted this process its use (arch_prctl
  // ARCH_REQ_XCOMP_PERM, asked once at detection): without the grant a tile instruction is SIGILL.
  bool os_amx = false;
  // vgatherdps beats one scalar load per element: Intel cores (a 16-bit-index SpMV, 1024x1024 at
  // 90%, on the Xeon: 20 us gathering, 35 us with scalar loads), not AMD Zen 4/5 (42 against 35 us
  // there). From the CPUID vendor.
  bool fast_gather = false;
  // Highest level whose kernels this process may run (detected, then lowered by SONDE_ISA).
  IsaLevel level = IsaLevel::kScalar;
  IsaLevel detected = IsaLevel::kScalar;
  std::string model;
  std::string arch;
  unsigned cores = 1;
  size_t l1d_bytes = 32 * 1024, l2_bytes = 512 * 1024, l3_bytes = 8 * 1024 * 1024;

  bool Supports(IsaLevel l) const { return static_cast<int>(l) <= static_cast<int>(level); }
  bool HasBf16() const { return level == IsaLevel::kAvx512 && avx512bf16; }
  bool HasVnni() const { return level == IsaLevel::kAvx512 && avx512vnni; }
  // AMX kernels keep their epilogue in AVX-512 (bf16 stores included), so they need that level and
  // AVX512_BF16 (every AMX CPU has it) as well as the tiles.
  bool HasAmxBf16() const { return HasBf16() && os_amx && amx_tile && amx_bf16; }
  bool HasAmxInt8() const { return HasBf16() && os_amx && amx_tile && amx_int8; }
  std::vector<std::string> FeatureNames() const;
};

const CpuFeatures& Cpu();

// The CPUs this process may run on (its affinity mask: taskset, a container's cpuset), ascending;
// empty where the OS cannot say. CpuFeatures::cores counts them; the thread pool pins to them.
std::vector<int> AllowedCpus();
const char* IsaName(IsaLevel l);
// Parses "scalar" | "avx2" | "avx512"; returns false for anything else.
bool ParseIsa(const std::string& s, IsaLevel* out);

}  // namespace sonde
