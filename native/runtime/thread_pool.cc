#include "runtime/thread_pool.h"

#include "runtime/cpu.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <memory>
#include <cstdlib>
#include <string>
#include <thread>
#include <cstdio>
#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SONDE_PAUSE() _mm_pause()
#else
#define SONDE_PAUSE() std::this_thread::yield()
#endif

namespace sonde {

namespace {
std::chrono::microseconds SpinKnob(const char* name, long default_us) {
  const char* v = std::getenv(name);
  const long us = v ? std::strtol(v, nullptr, 10) : default_us;
  return std::chrono::microseconds(us < 0 ? 0 : us > 100000 ? 100000 : us);
}

// How long a worker waits spinning for work while a job is running (a helper between the steps of
// a run, a ParallelFor waiting for its helpers), before sleeping on the condition variable. The
// next step's ParallelFor arrives within microseconds, and waking a sleeping thread costs tens of
// microseconds, more on a VM whose idle vCPU must be woken by an IPI. SONDE_SPIN_US overrides it
// (0 disables spinning).
std::chrono::microseconds SpinTime() {
  static const std::chrono::microseconds t = SpinKnob("SONDE_SPIN_US", 100);
  return t;
}

// The longest the workers that took part in the last job (its thread and its loops' helpers) spin
// for the next one when no job is running. The next job comes from the JS thread after the
// completion has crossed to it and whatever the program does between calls; waking a sleeping
// worker then costs the JS thread a futex call and the job tens of microseconds (a one-Identity
// round trip measured 25 us with a spinning worker, 95-110 us without; the MLP's batch-1 run, 0.13
// ms of steps, took 0.23 ms after another runtime's call). How long they spin follows the recent
// gaps between calls (IdleSpinFor); workers the last job did not use do not spin: on a machine
// with more runnable threads than cores a spinning thread holds a core the JS thread or a helper
// needs.
// The helpers spin too since the next job would wake them again, from the JS thread: a futex wake
// of an idle vCPU cost the JS thread ~20 us a token of the demo model's generation (perf), and
// blocks of calls alternating in one process measured, helpers spinning against sleeping: demo
// generation 617-648 against 654-708 ms for 4000 tokens, the 90%-pruned MLP at batch 1 on two
// threads with onnxruntime-node between calls 93-107 against 96-148 us, the dense MLP 236-246
// against 250-264 us; MobileNetV2, the transformer (1 and 2 threads) and ResNet-50 unchanged, and
// onnxruntime-node's own calls between them no slower. SONDE_IDLE_SPIN_US overrides it.
std::chrono::microseconds IdleSpinTime() {
  static const std::chrono::microseconds t = SpinKnob("SONDE_IDLE_SPIN_US", 1000);
  return t;
}

// How long to spin for the next job: twice the longest of the recent gaps between a job's end and
// the next call that is within IdleSpinTime (calls jitter), at most IdleSpinTime and at least the
// shortest spin, 50 us. Calls further apart (a service between requests) find the worker asleep
// after little spinning, while the first call after a pause that is followed at once by another
// still finds it awake (sleeping at once let the woken worker preempt the JS thread on the loaded
// VM, running a whole job before the caller's next statement, an abort, could run). The longest of
// several gaps, not the last one: where calls alternate short and long gaps (two sessions run one
// after the other, then other work) the gap before a long one is short, and the worker fell asleep
// before the next call; and a gap of more than half the cap is still worth the cap. The 90%-pruned
// MLP at batch 1 on one thread, its run, a dense session's run, then 0.28 ms of other work: 104 ->
// 61 us a run (51 with the pause alone); the `sparse` suite's order (onnxruntime-node, then both
// sessions, then back) 121 -> 67 us; the dense MLP at batch 1 on two threads beside
// onnxruntime-node 0.84x the time.
std::chrono::microseconds IdleSpinFor(const std::atomic<int64_t>* gaps_ns, unsigned count) {
  const auto cap = IdleSpinTime();
  const auto least = std::min(cap, std::chrono::microseconds(50));
  const int64_t cap_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(cap).count();
  int64_t want_ns = 0;
  for (unsigned i = 0; i < count; ++i) {
    const int64_t gap = gaps_ns[i].load(std::memory_order_relaxed);
    if (gap <= cap_ns) want_ns = std::max(want_ns, std::min(cap_ns, 2 * gap));
  }
  return std::max(least, std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::nanoseconds(want_ns)));
}

unsigned PidSeed() {
#if defined(__linux__)
  return static_cast<unsigned>(getpid());
#else
  return 0;
#endif
}

// CPU time (ns) the CPUs in `cpus` have spent busy (user, nice, system, irq, softirq of their
// /proc/stat lines; not idle, iowait or time stolen by the hypervisor: other processes on other
// CPUs, or another container's on CPUs outside this process's mask, do not count), and this
// process's (getrusage). false where either cannot be read.
bool ReadCpuTimes(const std::vector<int>& cpus, int64_t* cpus_ns, int64_t* self_ns) {
#if defined(__linux__)
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return false;
  unsigned long long busy = 0;
  size_t found = 0;
  char line[512];
  while (std::fgets(line, sizeof(line), f)) {
    int cpu = -1;
    unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0;
    if (std::sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu", &cpu, &user, &nice, &system, &idle, &iowait,
                    &irq, &softirq) != 8)
      continue;  // the first, all-CPU line ("cpu  ...") and the lines after the CPUs'
    if (std::binary_search(cpus.begin(), cpus.end(), cpu)) {
      busy += user + nice + system + irq + softirq;
      ++found;
    }
  }
  std::fclose(f);
  rusage u;
  if (found == 0 || getrusage(RUSAGE_SELF, &u) != 0) return false;
  static const long tick = sysconf(_SC_CLK_TCK);
  if (tick <= 0) return false;
  *cpus_ns = static_cast<int64_t>(busy * (1000000000ull / tick));
  *self_ns = (static_cast<int64_t>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1000000 + u.ru_utime.tv_usec +
              u.ru_stime.tv_usec) * 1000;
  return true;
#else
  (void)cpus;
  (void)cpus_ns;
  (void)self_ns;
  return false;
#endif
}

// SONDE_PIN_THREADS: on/1/true, off/0/false, or auto (the default, also for anything else).
ThreadPool::PinMode PinModeFromEnv() {
  const char* v = std::getenv("SONDE_PIN_THREADS");
  if (!v) return ThreadPool::PinMode::kAuto;
  const std::string s(v);
  if (s == "on" || s == "1" || s == "true") return ThreadPool::PinMode::kOn;
  if (s == "off" || s == "0" || s == "false") return ThreadPool::PinMode::kOff;
  return ThreadPool::PinMode::kAuto;
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Spins until ready() (returns true), or until the spin time is up, or the idle spin time is up
// while !busy(); returns ready(). (Giving up once the thread finds itself descheduled was tried:
// on the loaded VM the next call then found the worker asleep, digits n1 t2 0.61x ORT against
// 1.38x.)
template <typename Ready, typename Busy>
bool SpinUntil(Ready ready, Busy busy, std::chrono::microseconds idle) {
  const auto spin = SpinTime();
  if (spin.count() == 0 && idle.count() == 0) return ready();
  const auto start = std::chrono::steady_clock::now();
  for (unsigned i = 0;; ++i) {
    if (ready()) return true;
    // A short burst of pause, then yield: on a machine with more runnable threads than cores (the
    // JS thread waiting to take this result, another process), a spinning worker must not hold the
    // core the JS thread needs.
    if (i < 64) {
      SONDE_PAUSE();
    } else {
      std::this_thread::yield();
    }
    if ((i & 15) == 15) {
      const auto elapsed = std::chrono::steady_clock::now() - start;
      if (elapsed >= std::max(spin, idle) || (elapsed >= idle && !busy())) return ready();
    }
  }
}

// This thread's involuntary context switches so far: another thread of this machine took its CPU
// while it was runnable (a yield that ran someone else counts; the hypervisor descheduling the
// vCPU does not). -1 where the count is not available.
int64_t InvoluntarySwitches() {
#if defined(__linux__)
  rusage u;
  if (getrusage(RUSAGE_THREAD, &u) == 0) return u.ru_nivcsw;
#endif
  return -1;
}
}  // namespace

ThreadPool::ThreadPool(unsigned threads) {
  std::lock_guard<std::mutex> lock(mu_);
  threads = std::max(1u, threads);
  target_ = threads;
  allowed_cpus_ = AllowedCpus();
  pin_mode_ = PinModeFromEnv();
  // Where pools of other worker_threads or other processes (a Node cluster) pin theirs too, worker 0
  // of each, the one most likely to run a one-thread job, should not always be on the first CPU.
  static std::atomic<unsigned> pools{0};
  pin_offset_ = allowed_cpus_.empty() ? 0 : (PidSeed() + pools.fetch_add(1)) % allowed_cpus_.size();
  StartThreadsLocked(threads);
  // The first submission's sample starts the first window; until it ends the CPUs count as quiet.
  ApplyAffinityLocked();
}

ThreadPool::~ThreadPool() { Shutdown(); }

void ThreadPool::StartThreadsLocked(unsigned count) {
  while (threads_.size() < count) {
    unsigned index = static_cast<unsigned>(threads_.size());
    threads_.emplace_back([this, index] { WorkerLoop(index); });
  }
  threads_count_.store(static_cast<unsigned>(threads_.size()));
}

void ThreadPool::Resize(unsigned threads) {
  threads = std::max(1u, threads);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    target_ = threads;
    StartThreadsLocked(threads);
    ApplyAffinityLocked();
  }
  cv_.notify_all();
}

void ThreadPool::SetPinMode(PinMode mode) {
  std::lock_guard<std::mutex> lock(mu_);
  pin_mode_ = mode;
  if (!stop_) ApplyAffinityLocked();
}

// Pinning, measured on the 2-vCPU Xeon VM (a Firecracker/KVM guest): a two-thread conv run right
// after another runtime's call (onnxruntime-node's, as the `conv` suite interleaves them) often
// took as long as on one thread, its helper never joining: the job's thread woke it with a futex,
// and the guest kernel, which sees the idle vCPU as preempted (vcpu_is_preempted), queued it on
// the job's own busy vCPU, where it waited for the next load balance. ResNet-50's 14x14 3x3 at
// batch 1: 1.2-1.4 ms floating against 0.76-0.79 pinned (one thread: 1.4); the `conv` suite's 59
// two-thread rows 1.15-1.24x faster (13 under onnxruntime-node's speed -> 0-1), one-thread rows
// 0.98-1.07x; in the `models` suite, which also interleaves onnxruntime-node, MobileNetV2 and the
// transformer at batch 1 on two threads 1.7x and 1.5x. Runs back to back, whose threads do not
// sleep between steps, moved by 0-4%.
void ThreadPool::ApplyAffinityLocked() {
#if defined(__linux__)
  if (stop_) return;
  const size_t cpus = allowed_cpus_.size();
  const bool pin = PinWantedLocked(NowNs());
  if (!pin && !pinned_.load()) return;
  cpu_set_t all;
  CPU_ZERO(&all);
  for (int c : allowed_cpus_) CPU_SET(c, &all);
  for (size_t i = 0; i < threads_.size(); ++i) {
    cpu_set_t set;
    if (pin) {
      CPU_ZERO(&set);
      CPU_SET(allowed_cpus_[(i + pin_offset_) % cpus], &set);
    } else {
      set = all;
    }
    // A cpuset changed under the process can refuse a CPU: that worker then stays where it may
    // run (AffinityNow reports where each thread may run; pinned_ records the attempt).
    pthread_setaffinity_np(threads_[i].native_handle(), sizeof(set), &set);
  }
  pinned_ = pin;
#endif
}

bool ThreadPool::PinWantedLocked(int64_t now) const {
  const size_t cpus = allowed_cpus_.size();
  const PinMode mode = pin_mode_.load();
  if (cpus < 2 || mode == PinMode::kOff) return false;
  if (mode == PinMode::kOn) return true;
  return target_.load() == cpus && !shared_.load(std::memory_order_relaxed) &&
         now >= contended_until_ns_.load(std::memory_order_relaxed);
}

// Pinned threads of two processes that share the CPUs collide: a one-thread job of each runs on
// its pool's thread of the moment, the same CPU half the time, where floating threads are spread by
// the scheduler (two processes each running the MLP at batch 1 on one thread on the 2-vCPU VM:
// 1720-2170 runs/s each pinned, 2570-2700 floating). So 'auto' pins only while the process's CPUs
// are otherwise nearly idle: other processes used at most a quarter of one over the last window
// (sampled from Submit at most every kShareSampleNs, ~20 us a sample); in a busier window the
// threads float, and they are pinned again after two quiet ones.
void ThreadPool::SampleMachineShare(int64_t now) {
  std::unique_lock<std::mutex> lock(share_mu_, std::try_to_lock);
  if (!lock.owns_lock()) return;
  share_sampled_ns_.store(now, std::memory_order_relaxed);
  int64_t machine = 0, self = 0;
  if (!ReadCpuTimes(allowed_cpus_, &machine, &self)) return;
  const int64_t window = now - share_window_start_ns_;
  const int64_t others = (machine - share_machine_ns_) - (self - share_self_ns_);
  const bool first = share_window_start_ns_ == 0;
  share_window_start_ns_ = now;
  share_machine_ns_ = machine;
  share_self_ns_ = self;
  if (first || window <= 0) return;
  const bool busy = others * 4 > window;
  quiet_windows_ = busy ? 0 : quiet_windows_ + 1;
  const bool shared = busy || (shared_.load(std::memory_order_relaxed) && quiet_windows_ < 2);
  if (shared == shared_.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> pool_lock(mu_);
  shared_.store(shared, std::memory_order_relaxed);
  ApplyAffinityLocked();
}

ThreadPool::Affinity ThreadPool::AffinityNow() {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = NowNs();
  // A contended window that ended since the last submission: pinned again now, as that would.
  if (!stop_ && PinWantedLocked(now) != pinned_.load()) ApplyAffinityLocked();
  Affinity a{pin_mode_.load(), pinned_.load(), shared_.load(), now < contended_until_ns_.load(), {}};
  a.cpus.resize(threads_.size());
#if defined(__linux__)
  for (size_t i = 0; i < threads_.size(); ++i) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (pthread_getaffinity_np(threads_[i].native_handle(), sizeof(set), &set) != 0) continue;
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) a.cpus[i].push_back(c);
  }
#endif
  return a;
}

bool ThreadPool::Submit(std::function<void()> job, std::function<void()> dropped, unsigned helpers) {
  bool parked;
  const int64_t last_end = last_job_end_ns_.load(std::memory_order_relaxed), now = NowNs();
  last_queued_ns_.store(now, std::memory_order_relaxed);
  if (last_end != 0) {
    const unsigned slot = gap_cursor_.fetch_add(1, std::memory_order_relaxed) % kGapHistory;
    recent_gaps_ns_[slot].store(std::max<int64_t>(0, now - last_end), std::memory_order_relaxed);
  }
  if (pin_mode_.load(std::memory_order_relaxed) == PinMode::kAuto &&
      now - share_sampled_ns_.load(std::memory_order_relaxed) >= kShareSampleNs)
    SampleMachineShare(now);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return false;
    queue_.push_back(Task{std::move(job), std::move(dropped)});
    queued_.store(queue_.size());
    // Pinned again once a contended window (NotePickup) has passed.
    if (!pinned_.load(std::memory_order_relaxed) && PinWantedLocked(now)) ApplyAffinityLocked();
    parked = threads_.size() > target_.load();
    // The job's helpers, woken with it: otherwise the first ParallelFor of a run that follows a
    // pause wakes them only then, after the job's own hand-off, and the run waits for both wake-ups
    // in turn. As many as the last job's loops asked for, and at least one: the first of two
    // sleepers to wake takes the job (digits n1 t2, whose steps hardly use a helper: 38-51 us
    // waking one, 16-19 waking two; 43-49 before any of this; t1 takes 13-18 us), while a stream of
    // runs whose steps take one thread on a many-core pool wakes one extra thread, not all of them.
    helpers = std::min({helpers, target_.load() > 1 ? target_.load() - 1 : 0u,
                        std::max(1u, last_helpers_.load(std::memory_order_relaxed))});
    if (helpers > 0) prewake_.store(helpers, std::memory_order_relaxed);
  }
  Notify(1 + helpers, parked);
  return true;
}

void ThreadPool::Notify(unsigned tasks, bool parked) {
  // A parked worker (index >= target) could take a notify_one and go back to sleep, leaving the
  // job queued with every active worker asleep: then wake everyone. Otherwise wake one sleeper per
  // task: waking them all costs each a futex wake-up and 100 us of spinning for nothing, and on a
  // machine with few cores that spinning takes time from the thread doing the work (a one-thread
  // run of a small model was measured waking both workers of a 2-core pool on every call).
  if (parked || tasks >= threads_count_.load(std::memory_order_relaxed)) {
    cv_.notify_all();
    return;
  }
  // Each spinning worker takes one queued task (or spins for a job's helpers); wake sleepers only
  // for the rest.
  const size_t queued = queued_.load() + prewake_.load(std::memory_order_relaxed), spinning = spinning_.load();
  const size_t unclaimed = queued > spinning ? queued - spinning : 0;
  for (size_t i = 0; i < std::min<size_t>(tasks, unclaimed); ++i) cv_.notify_one();
}

void ThreadPool::WaitForTask(unsigned index, bool after_job, bool prewoken) {
  auto ready = [&] {
    return stop_.load(std::memory_order_relaxed) ||
           (index < target_.load(std::memory_order_relaxed) && queued_.load(std::memory_order_relaxed) > 0);
  };
  // Counted before its first look at the queue and uncounted before it takes the lock to sleep:
  // a Submit that saw it counted pushed its task before this worker's locked check of the queue.
  spinning_.fetch_add(1);
  const auto busy = [&] { return running_jobs_.load(std::memory_order_relaxed) > 0; };
  if (prewoken) {
    // A worker woken for a job's helpers spins its whole spin time: the job may not have started yet.
    SpinUntil(ready, busy, SpinTime());
  } else if (!after_job || NowNs() < contended_until_ns_.load(std::memory_order_relaxed)) {
    // Not after a job of its own, or every core was busy lately (see below): no idle spin.
    SpinUntil(ready, busy, std::chrono::microseconds(0));
  } else {
    // Where every core is busy (CPU-bound processes beside this one), a worker spinning between
    // jobs is a runnable thread like theirs: the scheduler takes its CPU at a tick or a yield, and
    // when the next job comes it waits for its turn, a whole slice, where a sleeping worker is
    // mostly woken ahead of the others. The MLP at batch 1 on one thread, onnxruntime-node's run
    // between, two CPU hogs on the 2-vCPU VM: median 3.7 ms a run spinning (p90 3.7), 0.26-0.31
    // sleeping so (p90 2.0-2.4), 0.25-0.27 on the idle machine. Seen as jobs taken more than a
    // millisecond late (a slice; this process's own JS thread, polling on the worker's core,
    // yields it within microseconds: at 0.1 ms the demo's CNN on the idle machine fell into the
    // windows, 13 -> 43 us a run) by a worker that another thread of this machine preempted while
    // it spun (the hypervisor taking the vCPU is not counted), twice in a row: once happens on the
    // idle machine too (beside another runtime's threads, or the JS thread on the worker's core),
    // and a window then made the Identity round trip after it 9 -> 28 us. Then workers sleep
    // between jobs for a while, longer each time it happens again right after (contended_for_ns_).
    const int64_t switches = InvoluntarySwitches();
    if (SpinUntil(ready, busy, IdleSpinFor(recent_gaps_ns_, kGapHistory)) && switches >= 0) NotePickup(switches);
  }
  spinning_.fetch_sub(1);
}

void ThreadPool::NotePickup(int64_t switches_before) {
  const int64_t now = NowNs();
  // From when a task last entered the queue: a loop's helper tasks too (counted from the job's
  // submission, the helpers of a 25 ms ResNet-50 run looked 9-33 ms late).
  const bool late =
      now - last_queued_ns_.load(std::memory_order_relaxed) > kLatePickupNs && InvoluntarySwitches() != switches_before;
  if (!late) {
    late_in_a_row_.store(0, std::memory_order_relaxed);
    return;
  }
  if (late_in_a_row_.fetch_add(1, std::memory_order_relaxed) + 1 < 2) return;
  late_in_a_row_.store(0, std::memory_order_relaxed);
  const int64_t until = contended_until_ns_.load(std::memory_order_relaxed);
  int64_t window = contended_for_ns_.load(std::memory_order_relaxed);
  // Again within a window's length of the last one ending: contention persists.
  window = until != 0 && now - until < window ? std::min(2 * window, kContendedMaxNs) : kContendedMinNs;
  contended_for_ns_.store(window, std::memory_order_relaxed);
  // A pinned worker cannot leave a CPU that another process keeps busy, so for the window the
  // workers float, as they did before pinning (whose behaviour under contention was measured and
  // tuned), and the first job submitted after it pins them again. (The MLP at batch 1 on one thread
  // beside two CPU-bound processes: one pair of processes gave p90 3.3-3.6 ms pinned against 0.38
  // floating; alternating the modes every 250 ms in one process, both medians 0.31 ms.)
  // (The window and the affinity change together under the lock: getThreadAffinity() never sees
  // one without the other.)
  std::lock_guard<std::mutex> lock(mu_);
  contended_until_ns_.store(now + window, std::memory_order_relaxed);
  if (pinned_.load(std::memory_order_relaxed)) ApplyAffinityLocked();
}

void ThreadPool::WorkerLoop(unsigned index) {
  bool worked = false, prewoken = false;
  for (;;) {
    Task task;
    WaitForTask(index, worked, prewoken);
    prewoken = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stop_ || (index < target_ && (!queue_.empty() || prewake_.load(std::memory_order_relaxed) > 0));
      });
      if (stop_) return;
      if (queue_.empty()) {  // woken for a job's helpers: spin for its first ParallelFor
        prewake_.fetch_sub(1, std::memory_order_relaxed);
        prewoken = true;
        worked = false;
        continue;
      }
      task = std::move(queue_.front());
      queue_.pop_front();
      queued_.store(queue_.size());
    }
    worked = true;
    if (task.helper) {
      task.run();
      continue;
    }
    running_jobs_.fetch_add(1, std::memory_order_relaxed);
    task.run();
    running_jobs_.fetch_sub(1, std::memory_order_relaxed);
    last_helpers_.store(job_helpers_.exchange(0, std::memory_order_relaxed), std::memory_order_relaxed);
    last_job_end_ns_.store(NowNs(), std::memory_order_relaxed);
  }
}

namespace {
struct ForState {
  ForState(size_t n_, IndexFnRef fn_, const CancelFlag* c, bool homed_)
      : n(n_), fn(fn_), cancel(c), taken(homed_ ? new std::atomic<bool>[n_] : nullptr) {
    if (taken)
      for (size_t i = 0; i < n; ++i) taken[i].store(false, std::memory_order_relaxed);
  }
  size_t n;
  IndexFnRef fn;  // refers to the caller's callable, alive until done == n
  const CancelFlag* cancel;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  // ParallelForHomed: which indices have been claimed, and how many participants joined (the
  // caller is participant 0).
  std::unique_ptr<std::atomic<bool>[]> taken;
  std::atomic<unsigned> joined{1};
  std::atomic<bool> cancelled{false};
  std::mutex mu;
  std::condition_variable cv;
  // The first exception a task threw (bad_alloc in a task's scratch, say): later indices are
  // skipped and ParallelFor rethrows it on the calling thread, where the job's handler turns it
  // into a rejected Promise. An exception escaping a pool thread would terminate the process.
  std::exception_ptr error;
  std::atomic<bool> failed{false};
};

// Runs index i of s (claimed by the caller) and accounts for it.
void RunIndex(ForState& s, size_t i, const std::atomic<bool>& stop) {
  bool skip = stop.load(std::memory_order_relaxed) || s.failed.load(std::memory_order_relaxed) ||
              (s.cancel && s.cancel->load(std::memory_order_relaxed));
  if (skip) {
    s.cancelled = true;
  } else {
    try {
      s.fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(s.mu);
      if (!s.error) s.error = std::current_exception();
      s.failed = true;
    }
  }
  if (s.done.fetch_add(1) + 1 == s.n) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.cv.notify_all();
  }
}

// Runs indices until none are left; returns after accounting for every index it claimed. Homed
// loops (s.taken): participant p's own index first, then any unclaimed one after it.
void Drain(ForState& s, const std::atomic<bool>& stop, unsigned participant) {
  if (s.taken) {
    const auto claim = [&](size_t i) { return !s.taken[i].exchange(true, std::memory_order_relaxed); };
    if (participant < s.n && claim(participant)) RunIndex(s, participant, stop);
    for (size_t k = 1; k < s.n; ++k) {
      const size_t i = (participant + k) % s.n;
      if (claim(i)) RunIndex(s, i, stop);
    }
    return;
  }
  for (;;) {
    size_t i = s.next.fetch_add(1);
    if (i >= s.n) return;
    RunIndex(s, i, stop);
  }
}
}  // namespace

bool ThreadPool::ParallelForShared(size_t n, unsigned max_threads, IndexFnRef fn, const CancelFlag* cancel, bool homed) {
  unsigned helpers = static_cast<unsigned>(
      std::min<size_t>(n, std::min(max_threads, target_.load())));
  helpers = helpers > 0 ? helpers - 1 : 0;
  for (unsigned seen = job_helpers_.load(std::memory_order_relaxed);
       seen < helpers && !job_helpers_.compare_exchange_weak(seen, helpers, std::memory_order_relaxed);) {
  }
  // Shared with the helper tasks: one may start after this call has returned (the caller ran every
  // index itself) and must find its state alive, with nothing left to claim.
  auto state = std::make_shared<ForState>(n, fn, cancel, homed);
  bool parked = false;
  if (helpers > 0) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stop_) {
        // Helpers go to the front: finishing work already started beats starting new jobs.
        prewake_.store(0, std::memory_order_relaxed);
        last_queued_ns_.store(NowNs(), std::memory_order_relaxed);
        for (unsigned h = 0; h < helpers; ++h)
          queue_.push_front(Task{[state, this] { Drain(*state, stop_, state->joined.fetch_add(1, std::memory_order_relaxed)); },
                                 nullptr, true});
        queued_.store(queue_.size());
        parked = threads_.size() > target_.load();
      }
    }
    Notify(helpers, parked);
  }
  Drain(*state, stop_, 0);
  SpinUntil([&] { return state->done.load(std::memory_order_acquire) == state->n; }, [] { return true; }, SpinTime());
  {
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->done.load() == state->n; });
  }
  if (state->error) std::rethrow_exception(state->error);
  return !state->cancelled;
}

void ThreadPool::Shutdown() {
  std::deque<Task> dropped;
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ && threads_.empty()) return;
    stop_ = true;
    dropped.swap(queue_);
    queued_.store(0);
    threads.swap(threads_);
  }
  cv_.notify_all();
  for (auto& t : threads) t.join();
  for (auto& task : dropped)
    if (task.dropped) task.dropped();
}

}  // namespace sonde
