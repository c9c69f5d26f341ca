#include "runtime/cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#if defined(__linux__)
#include <sched.h>
#endif
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define SONDE_X86 1
#endif
#if defined(SONDE_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sonde {
namespace {

#ifdef SONDE_X86
void Cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
// xgetbv is read with inline asm so this file needs no -mxsave.
unsigned long long Xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux (5.16+) hands out the 8 KiB tile data state only on request, once per process (every thread
// then has it). It refuses where a thread's signal stack is too small for the larger frame, or on
// older kernels: AMX stays off then.
bool RequestAmxPermission() {
#ifdef __linux__
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

size_t ReadCacheSize(int index) {
  std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
  std::string s;
  if (!(f >> s) || s.empty()) return 0;
  size_t mult = 1;
  char last = s.back();
  if (last == 'K') mult = 1024, s.pop_back();
  else if (last == 'M') mult = 1024 * 1024, s.pop_back();
  return static_cast<size_t>(std::strtoull(s.c_str(), nullptr, 10)) * mult;
}

CpuFeatures Detect() {
  CpuFeatures f;
  // The CPUs this process may run on (taskset, a container's cpuset), as Node's
  // os.availableParallelism() counts them: the pool's default size, and what lib/wait.ts compares
  // the busy threads with.
  const size_t allowed = AllowedCpus().size();
  f.cores = allowed > 0 ? static_cast<unsigned>(allowed) : std::max(1u, std::thread::hardware_concurrency());
#ifdef SONDE_X86
  f.arch = "x86_64";
  unsigned r[4];
  Cpuid(0, 0, r);
  unsigned max_leaf = r[0];
  // Vendor string in EBX, EDX, ECX: "GenuineIntel".
  f.fast_gather = r[1] == 0x756e6547u && r[3] == 0x49656e69u && r[2] == 0x6c65746eu;
  Cpuid(1, 0, r);
  f.sse42 = r[2] & (1u << 20);
  f.popcnt = r[2] & (1u << 23);
  f.fma = r[2] & (1u << 12);
  f.f16c = r[2] & (1u << 29);
  bool osxsave = r[2] & (1u << 27);
  f.avx = r[2] & (1u << 28);
  bool os_tiles = false;
  if (osxsave) {
    unsigned long long xcr0 = Xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
    f.os_avx512 = (xcr0 & 0xe6) == 0xe6;       // plus opmask, ZMM_Hi256, Hi16_ZMM
    os_tiles = (xcr0 & 0x60000) == 0x60000;    // XTILECFG and XTILEDATA
  }
  if (max_leaf >= 7) {
    Cpuid(7, 0, r);
    f.avx2 = r[1] & (1u << 5);
    f.avx512f = r[1] & (1u << 16);
    f.avx512dq = r[1] & (1u << 17);
    f.avx512bw = r[1] & (1u << 30);
    f.avx512vl = r[1] & (1u << 31);
    f.avx512vbmi = r[2] & (1u << 1);
    f.avx512vnni = r[2] & (1u << 11);
    f.amx_bf16 = r[3] & (1u << 22);
    f.amx_tile = r[3] & (1u << 24);
    f.amx_int8 = r[3] & (1u << 25);
    Cpuid(7, 1, r);
    f.avxvnni = r[0] & (1u << 4);
    f.avx512bf16 = r[0] & (1u << 5);
  }
  Cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {0};
    for (unsigned i = 0; i < 3; ++i) {
      Cpuid(0x80000002u + i, 0, r);
      std::memcpy(brand + 16 * i, r, 16);
    }
    f.model = brand;
    size_t a = f.model.find_first_not_of(' ');
    size_t b = f.model.find_last_not_of(' ');
    f.model = a == std::string::npos ? "" : f.model.substr(a, b - a + 1);
  }
  if (f.os_avx && f.avx && f.avx2 && f.fma && f.f16c) f.detected = IsaLevel::kAvx2;
  if (f.detected == IsaLevel::kAvx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl &&
      f.avx512dq)
    f.detected = IsaLevel::kAvx512;
  f.os_amx = os_tiles && f.amx_tile && RequestAmxPermission();
#else
#if defined(__aarch64__)
  f.arch = "aarch64";
#else
  f.arch = "unknown";
#endif
#endif
  if (f.model.empty()) {
    std::ifstream info("/proc/cpuinfo");
    std::string line;
    while (std::getline(info, line)) {
      if (line.rfind("model name", 0) == 0 || line.rfind("Model", 0) == 0) {
        size_t c = line.find(':');
        if (c != std::string::npos) f.model = line.substr(c + 2);
        break;
      }
    }
  }
  if (size_t s = ReadCacheSize(0)) f.l1d_bytes = s;
  if (size_t s = ReadCacheSize(2)) f.l2_bytes = s;
  if (size_t s = ReadCacheSize(3)) f.l3_bytes = s;
  f.level = f.detected;
  // SONDE_ISA lowers (never raises) the level, to test or compare the narrower kernels.
  if (const char* env = std::getenv("SONDE_ISA")) {
    IsaLevel want;
    if (ParseIsa(env, &want) && static_cast<int>(want) < static_cast<int>(f.level)) f.level = want;
  }
  return f;
}

}  // namespace

const CpuFeatures& Cpu() {
  static const CpuFeatures features = Detect();
  return features;
}

const char* IsaName(IsaLevel l) {
  switch (l) {
    case IsaLevel::kAvx512: return "avx512";
    case IsaLevel::kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool ParseIsa(const std::string& s, IsaLevel* out) {
  if (s == "scalar") *out = IsaLevel::kScalar;
  else if (s == "avx2") *out = IsaLevel::kAvx2;
  else if (s == "avx512") *out = IsaLevel::kAvx512;
  else return false;
  return true;
}

std::vector<std::string> CpuFeatures::FeatureNames() const {
  std::vector<std::string> v;
  auto add = [&](bool b, const char* n) { if (b) v.emplace_back(n); };
  add(sse42, "sse4.2"); add(popcnt, "popcnt"); add(avx && os_avx, "avx"); add(avx2 && os_avx, "avx2");
  add(fma && os_avx, "fma"); add(f16c && os_avx, "f16c");
  bool z = os_avx512;
  add(avx512f && z, "avx512f"); add(avx512bw && z, "avx512bw"); add(avx512vl && z, "avx512vl");
  add(avx512dq && z, "avx512dq"); add(avx512vnni && z, "avx512vnni");
  add(avx512bf16 && z, "avx512bf16"); add(avx512vbmi && z, "avx512vbmi"); add(avxvnni && os_avx, "avxvnni");
  add(amx_tile && os_amx, "amx_tile"); add(amx_bf16 && amx_tile && os_amx, "amx_bf16");
  add(amx_int8 && amx_tile && os_amx, "amx_int8");
  return v;
}

std::vector<int> AllowedCpus() {
  std::vector<int> cpus;
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
#endif
  return cpus;
}

}  // namespace sonde
