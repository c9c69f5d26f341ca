#include "ops/step_profile.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>

namespace sonde {

namespace {

using Clock = std::chrono::steady_clock;

// The step thread's own CPU time: on a machine shared with other work, wall time counts the time
// the thread was descheduled, which says nothing about the phase.
double ThreadCpuNs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

const char* const kPhaseNames[kPhaseCount] = {"embed",       "norms+residual", "q/k/v",        "rope+kv store",
                                              "attention",   "attn output",    "router",       "experts gate/up",
                                              "swiglu+quant", "experts down",  "experts sum",  "dense ffn",
                                              "output"};

// 0: off; else how many steps of a kind are summed per report.
long ReportEvery() {
  static const long every = [] {
    const char* v = std::getenv("SONDE_LLM_PROFILE");
    const long n = v ? std::strtol(v, nullptr, 10) : 0;
    return n <= 0 ? 0L : n == 1 ? 64L : n;
  }();
  return every;
}

struct Sums {
  double ns[kPhaseCount] = {};
  double bytes[kPhaseCount] = {};
  double cpu_ns[kPhaseCount] = {};
  double total_ns = 0, total_cpu_ns = 0, rows = 0;
  long steps = 0;
};

}  // namespace

struct StepProfile {
  Sums kinds[2];  // decode (one row), prefill
  Sums* current = nullptr;
  Clock::time_point start, last;
  double cpu_start = 0, cpu_last = 0;
};

namespace {
thread_local StepProfile* tls_profile = nullptr;

void Report(const Sums& s, bool decode) {
  const double steps = static_cast<double>(s.steps);
  std::fprintf(stderr, "[sonde profile] %s: %ld steps, %.0f rows, %.3f ms/step (step thread's CPU time %.3f ms/step)\n",
               decode ? "decode" : "prefill", s.steps, s.rows, s.total_ns / steps / 1e6, s.total_cpu_ns / steps / 1e6);
  for (int i = 0; i < kPhaseCount; ++i) {
    if (s.ns[i] == 0) continue;
    const double gbps = s.bytes[i] > 0 ? s.bytes[i] / s.ns[i] : 0;
    std::fprintf(stderr, "[sonde profile]   %-16s %8.3f ms/step %5.1f%%  cpu %8.3f ms/step", kPhaseNames[i],
                 s.ns[i] / steps / 1e6, 100.0 * s.ns[i] / s.total_ns, s.cpu_ns[i] / steps / 1e6);
    if (gbps > 0)
      std::fprintf(stderr, "  %7.2f MB/step %6.2f GB/s wall %6.2f GB/s cpu", s.bytes[i] / steps / 1e6, gbps,
                   s.bytes[i] / s.cpu_ns[i]);
    std::fprintf(stderr, "\n");
  }
}
}  // namespace

StepProfile* StepProfileBegin(size_t rows) {
  if (ReportEvery() == 0) return nullptr;
  if (!tls_profile) tls_profile = new StepProfile();  // one per pool thread, for the process's life
  StepProfile* p = tls_profile;
  p->current = &p->kinds[rows == 1 ? 0 : 1];
  p->current->rows += static_cast<double>(rows);
  p->start = p->last = Clock::now();
  p->cpu_start = p->cpu_last = ThreadCpuNs();
  return p;
}

void StepProfileMark(StepProfile* p, StepPhase phase, double bytes) {
  if (!p || !p->current) return;
  const Clock::time_point now = Clock::now();
  p->current->ns[phase] += static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(now - p->last).count());
  p->current->bytes[phase] += bytes;
  p->last = now;
  const double cpu = ThreadCpuNs();
  p->current->cpu_ns[phase] += cpu - p->cpu_last;
  p->cpu_last = cpu;
}

void StepProfileEnd(StepProfile* p) {
  if (!p || !p->current) return;
  Sums& s = *p->current;
  s.total_ns += static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - p->start).count());
  s.total_cpu_ns += ThreadCpuNs() - p->cpu_start;
  const bool decode = p->current == &p->kinds[0];
  p->current = nullptr;
  if (++s.steps < ReportEvery() && decode) return;
  Report(s, decode);
  s = Sums();
}

StepProfile* StepProfileCurrent() { return tls_profile && tls_profile->current ? tls_profile : nullptr; }

}  // namespace sonde
