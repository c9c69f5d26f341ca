// sonde's own compute pool, one per Node environment (main thread or worker_thread), so that long
// native calls never occupy the JS thread or libuv's four-thread pool.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <chrono>

namespace sonde {

// Set by the owner of a job to ask its ParallelFor loops to stop handing out work.
using CancelFlag = std::atomic<bool>;

// How many threads a step of `work` units should use, at most max_threads: one more thread only for
// every `min_per_thread` units. Handing a task to a helper and waiting for it costs microseconds
// (more when it has gone to sleep), so a step of a few microseconds runs faster alone on the
// calling thread than split (the digits CNN's 8x8 convolutions, the last layer of an MLP).
inline unsigned ThreadsForWork(unsigned max_threads, double work, double min_per_thread) {
  const double useful = work / min_per_thread;
  if (useful < 2.0) return 1;
  return useful < static_cast<double>(max_threads) ? static_cast<unsigned>(useful) : (max_threads > 0 ? max_threads : 1);
}

// Whether a batched op's tasks are whole images: when the threads divide the batch evenly, each
// image's work then runs on one core, whose L2 keeps its input rows and output lines, instead of
// pieces of every image going to whichever thread is free. Direct convs, batch 8 on 2 threads
// (Xeon): ResNet-50 0.96x, MobileNetV2 0.97x the time, batch 2 and 4 0.96x; an uneven split (3
// images on 2 threads) was 1.21x slower, hence only when they divide. Sparse convs (RunSpmmColumns):
// pruned ResNet-50 at batch 8 on 2 threads 0.89x.
inline bool WholeImageTasks(unsigned threads, size_t images) { return threads > 1 && images % threads == 0; }

// A non-owning reference to a callable taking an index: what ParallelFor hands its helpers. Unlike
// a std::function it never allocates (a lambda capturing more than two pointers would), and the
// callable lives on the caller's stack until every index has run.
class IndexFnRef {
 public:
  // Not a template over IndexFnRef itself, which would wrap a reference to a copy's source.
  template <typename Fn, typename = std::enable_if_t<!std::is_same_v<std::decay_t<Fn>, IndexFnRef>>>
  explicit IndexFnRef(Fn& fn)
      : obj_(const_cast<void*>(static_cast<const void*>(&fn))),
        call_([](void* o, size_t i) { (*static_cast<Fn*>(o))(i); }) {}
  void operator()(size_t i) const { call_(obj_, i); }

 private:
  void* obj_;
  void (*call_)(void*, size_t);
};

class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs job on a worker. `dropped` runs instead (on the calling thread of Shutdown) if the pool
  // shuts down before the job starts. Returns false if the pool is already shut down. `helpers`:
  // workers the job's ParallelFor loops may use beside it: as many as the last job's loops asked
  // for (at least one) are woken now if asleep, to spin for them, so that their wake-up overlaps
  // the job's hand-off instead of following its first loop (and the first of two sleepers to wake
  // takes the job).
  bool Submit(std::function<void()> job, std::function<void()> dropped, unsigned helpers = 0);

  // Calls fn(i) for every i in [0, n), on up to max_threads threads including the caller, and
  // returns when all calls have finished. Indices are handed out one at a time, so uneven tasks
  // balance themselves. Stops handing out indices once the pool shuts down or *cancel is set;
  // returns false in that case. An exception from fn skips the remaining indices and is rethrown
  // here, on the calling thread.
  //
  // A loop that gets one thread (one index, max_threads 1, a one-thread pool) runs inline: no
  // shared state, no lock, no helper task. Most steps of a small model are such loops (the ops
  // choose one thread below a few microseconds of work), and the bookkeeping of the shared path
  // was a measurable part of their time.
  template <typename Fn>
  bool ParallelFor(size_t n, unsigned max_threads, Fn&& fn, const CancelFlag* cancel = nullptr) {
    if (n == 0) return true;
    if (n == 1 || max_threads <= 1 || target_.load(std::memory_order_relaxed) <= 1) {
      for (size_t i = 0; i < n; ++i) {
        if (stop_.load(std::memory_order_relaxed) || (cancel && cancel->load(std::memory_order_relaxed))) return false;
        fn(i);
      }
      return true;
    }
    return ParallelForShared(n, max_threads, IndexFnRef(fn), cancel);
  }

  // As ParallelFor, but index i goes first to participant i (the calling thread is 0, helpers 1,
  // 2, ... in the order they join it), and a participant takes another's index only once its own
  // is done or taken. With n = threads, loops over the same data split the same way give each
  // thread the same part every time, which then stays in its core's caches from one loop to the
  // next (a batch's images across the steps of a plan), where indices handed out in turn sent an
  // image to whichever thread came first, often the other core. A late helper's index is run by
  // whoever is free, so nothing waits for it.
  template <typename Fn>
  bool ParallelForHomed(size_t n, unsigned max_threads, Fn&& fn, const CancelFlag* cancel = nullptr) {
    if (n == 0) return true;
    if (n == 1 || max_threads <= 1 || target_.load(std::memory_order_relaxed) <= 1)
      return ParallelFor(n, max_threads, std::forward<Fn>(fn), cancel);
    return ParallelForShared(n, max_threads, IndexFnRef(fn), cancel, true);
  }

  // Number of workers that take work. Shrinking parks the extra threads (they finish their
  // current task first); growing wakes parked threads or starts new ones.
  void Resize(unsigned threads);
  unsigned size() const { return target_.load(); }

  // Whether each worker runs on one CPU of the process's affinity mask (worker i on the (i + k)-th
  // allowed CPU, round robin, k from the process id and a count of the process's pools) or may run
  // on any of them. kOn always pins; kAuto pins while the pool has exactly one worker per allowed
  // CPU (two or more), other processes leave those CPUs nearly idle (SampleMachineShare) and no
  // contended window is open (NotePickup); kOff never pins. Why pin at all: on a KVM guest an idle
  // vCPU counts as preempted, so the scheduler places a woken helper beside the thread that woke it
  // on a busy vCPU rather than on the idle one, and the helper waits there until the next load
  // balance (milliseconds); see the .cc. Linux only (elsewhere nothing is pinned). The initial
  // mode comes from SONDE_PIN_THREADS (auto, on, off).
  enum class PinMode { kAuto, kOn, kOff };
  void SetPinMode(PinMode mode);
  struct Affinity {
    PinMode mode;
    bool pinned;
    bool machine_busy;  // other processes kept the CPUs busy lately: 'auto' does not pin
    bool contended;     // in a contended window (NotePickup): the threads float
    std::vector<std::vector<int>> cpus;  // each worker's CPUs as the OS reports them (empty: unknown)
  };
  Affinity AffinityNow();

  // Drops queued jobs, cancels running ParallelFor loops, joins every thread. Idempotent.
  void Shutdown();
  bool stopping() const { return stop_.load(); }
  // Whether a worker is spinning for work now: a job submitted next may start within a microsecond
  // instead of after a futex wake-up (a hint: the worker may take other work, give up, or have
  // yielded its core to another process).
  bool HasSpinningWorker() const { return spinning_.load(std::memory_order_relaxed) > 0; }

 private:
  struct Task {
    std::function<void()> run;
    std::function<void()> dropped;
    bool helper = false;  // a ParallelFor helper (part of a running job), not a job of its own
  };
  bool ParallelForShared(size_t n, unsigned max_threads, IndexFnRef fn, const CancelFlag* cancel, bool homed = false);
  // Waits (spinning, then sleeping) until worker `index` has a task to take or the pool stops;
  // after_job: it ran a job or a job's helper task last, and may spin for the next one while no job
  // runs (see the .cc).
  void WaitForTask(unsigned index, bool after_job, bool prewoken);
  // After an idle spin that ended with a task to take: starts a window without idle spinning when
  // this and the last such pickup were late and preempted (switches_before: InvoluntarySwitches()
  // as the spin began).
  void NotePickup(int64_t switches_before);
  void WorkerLoop(unsigned index);
  void StartThreadsLocked(unsigned count);
  // Sets every worker's affinity for the current pin mode and size (a pinned pool's workers go
  // back to the whole allowed set when it stops being pinned).
  void ApplyAffinityLocked();
  // Whether the workers should be pinned now: always with kOn; with kAuto by the size, while other
  // processes leave the CPUs idle (SampleMachineShare) and not during a contended window (NotePickup).
  bool PinWantedLocked(int64_t now_ns) const;
  // Measures the CPU time other processes used since the last sample (Submit, every
  // kShareSampleNs at most) and pins or floats the workers when that changes what 'auto' wants.
  void SampleMachineShare(int64_t now_ns);
  // Wakes sleeping workers for `tasks` new queue entries; parked: some threads are parked (see .cc).
  void Notify(unsigned tasks, bool parked);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::vector<std::thread> threads_;
  std::atomic<unsigned> target_{0};
  std::atomic<unsigned> threads_count_{0};  // threads_.size(), readable without the lock
  std::atomic<bool> stop_{false};
  // The process's allowed CPUs when the pool was made (sched_getaffinity), in ascending order.
  std::vector<int> allowed_cpus_;
  size_t pin_offset_ = 0;  // worker i pinned to allowed_cpus_[(i + pin_offset_) % size]
  std::atomic<PinMode> pin_mode_{PinMode::kAuto};
  std::atomic<bool> pinned_{false};
  // Whether other processes kept the machine's CPUs busy lately (SampleMachineShare): 'auto' then
  // does not pin. The sampler's state is guarded by share_mu_.
  static constexpr int64_t kShareSampleNs = 250'000'000;
  std::atomic<bool> shared_{false};
  std::atomic<int64_t> share_sampled_ns_{0};
  std::mutex share_mu_;
  int64_t share_window_start_ns_ = 0, share_machine_ns_ = 0, share_self_ns_ = 0;
  unsigned quiet_windows_ = 0;
  std::atomic<size_t> queued_{0};  // queue_.size(), readable without the lock while spinning
  // Jobs (Submit) running now. While one runs, idle workers stay awake for its next ParallelFor;
  // with none, they go to sleep after a short spin.
  std::atomic<unsigned> running_jobs_{0};
  // Workers spinning for a task: Notify skips the futex wake-up (microseconds on the submitting
  // thread, often the JS thread) when one of them will take it anyway.
  std::atomic<unsigned> spinning_{0};
  // Sleeping workers Submit woke for its job's helpers, not yet up (each takes one on waking to an
  // empty queue, and spins for the job's first ParallelFor).
  std::atomic<unsigned> prewake_{0};
  // Helpers the ParallelFor loops asked for since the last job ended (the most of any loop), and
  // that count as of the last job's end: a job is expected to want what the last one did (a model
  // whose steps all run on one thread wakes none).
  std::atomic<unsigned> job_helpers_{0};
  std::atomic<unsigned> last_helpers_{0};
  // When the last job ended (steady clock ns; 0 before any), and the gaps from a job's end to the
  // next Submit of the last kGapHistory jobs, round robin (max before any): how long it is worth
  // spinning for the next job (IdleSpinFor).
  static constexpr unsigned kGapHistory = 4;
  std::atomic<int64_t> last_job_end_ns_{0};
  std::atomic<int64_t> recent_gaps_ns_[kGapHistory] = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
  std::atomic<unsigned> gap_cursor_{0};
  // When a task (a job, or a loop's helper task) last entered the queue (steady clock ns), and
  // until when workers do not spin between jobs because every core was busy (WaitForTask): a
  // window of kContendedMinNs, doubled up to kContendedMaxNs while contention persists; two jobs in
  // a row taken more than kLatePickupNs after they were queued by preempted spinning workers start
  // one (NotePickup).
  static constexpr int64_t kLatePickupNs = 1'000'000;
  static constexpr int64_t kContendedMinNs = 20'000'000, kContendedMaxNs = 1'000'000'000;
  std::atomic<int64_t> last_queued_ns_{0};
  std::atomic<int64_t> contended_until_ns_{0};
  std::atomic<int64_t> contended_for_ns_{kContendedMinNs};
  std::atomic<unsigned> late_in_a_row_{0};
};

}  // namespace sonde
