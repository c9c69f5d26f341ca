#include "runtime/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <cstdlib>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SONDE_PAUSE() _mm_pause()
#else
#define SONDE_PAUSE() std::this_thread::yield()
#endif

namespace sonde {

namespace {
// How long an idle worker (and a ParallelFor waiting for its helpers) spins before sleeping on the
// condition variable. Waking a sleeping thread costs tens of microseconds, more on a VM whose idle
// vCPU must be woken by an IPI; back-to-back calls and the helpers of a ParallelFor arrive well
// within this window. SONDE_SPIN_US overrides it (0 disables spinning).
std::chrono::microseconds SpinTime() {
  static const std::chrono::microseconds t = [] {
    const char* v = std::getenv("SONDE_SPIN_US");
    long us = v ? std::strtol(v, nullptr, 10) : 100;
    return std::chrono::microseconds(us < 0 ? 0 : us > 100000 ? 100000 : us);
  }();
  return t;
}

// Spins until ready() or the spin time is up; returns ready().
template <typename Ready>
bool SpinUntil(Ready ready) {
  const auto spin = SpinTime();
  if (spin.count() == 0) return ready();
  const auto until = std::chrono::steady_clock::now() + spin;
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
    if ((i & 15) == 15 && std::chrono::steady_clock::now() >= until) return ready();
  }
}
}  // namespace

ThreadPool::ThreadPool(unsigned threads) {
  std::lock_guard<std::mutex> lock(mu_);
  threads = std::max(1u, threads);
  target_ = threads;
  StartThreadsLocked(threads);
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
  }
  cv_.notify_all();
}

bool ThreadPool::Submit(std::function<void()> job, std::function<void()> dropped) {
  bool parked;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return false;
    queue_.push_back(Task{std::move(job), std::move(dropped)});
    queued_.store(queue_.size());
    parked = threads_.size() > target_.load();
  }
  Notify(1, parked);
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
  for (unsigned i = 0; i < tasks; ++i) cv_.notify_one();
}

void ThreadPool::WorkerLoop(unsigned index) {
  for (;;) {
    Task task;
    SpinUntil([&] { return stop_.load(std::memory_order_relaxed) ||
                           (index < target_.load(std::memory_order_relaxed) && queued_.load(std::memory_order_relaxed) > 0); });
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || (index < target_ && !queue_.empty()); });
      if (stop_) return;
      task = std::move(queue_.front());
      queue_.pop_front();
      queued_.store(queue_.size());
    }
    task.run();
  }
}

namespace {
struct ForState {
  explicit ForState(size_t n_, const std::function<void(size_t)>& fn_, const CancelFlag* c)
      : n(n_), fn(fn_), cancel(c) {}
  size_t n;
  const std::function<void(size_t)>& fn;  // lives on the caller's stack until done == n
  const CancelFlag* cancel;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  std::atomic<bool> cancelled{false};
  std::mutex mu;
  std::condition_variable cv;
  // The first exception a task threw (bad_alloc in a task's scratch, say): later indices are
  // skipped and ParallelFor rethrows it on the calling thread, where the job's handler turns it
  // into a rejected Promise. An exception escaping a pool thread would terminate the process.
  std::exception_ptr error;
  std::atomic<bool> failed{false};
};

// Runs indices until none are left; returns after accounting for every index it claimed.
void Drain(ForState& s, const std::atomic<bool>& stop) {
  for (;;) {
    size_t i = s.next.fetch_add(1);
    if (i >= s.n) return;
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
}
}  // namespace

bool ThreadPool::ParallelFor(size_t n, unsigned max_threads, const std::function<void(size_t)>& fn,
                             const CancelFlag* cancel) {
  if (n == 0) return true;
  unsigned helpers = static_cast<unsigned>(
      std::min<size_t>(n, std::min(max_threads, target_.load())));
  helpers = helpers > 0 ? helpers - 1 : 0;
  auto state = std::make_shared<ForState>(n, fn, cancel);
  bool parked = false;
  if (helpers > 0) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stop_) {
        // Helpers go to the front: finishing work already started beats starting new jobs.
        for (unsigned h = 0; h < helpers; ++h)
          queue_.push_front(Task{[state, this] { Drain(*state, stop_); }, nullptr});
        queued_.store(queue_.size());
        parked = threads_.size() > target_.load();
      }
    }
    Notify(helpers, parked);
  }
  Drain(*state, stop_);
  SpinUntil([&] { return state->done.load(std::memory_order_acquire) == state->n; });
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
