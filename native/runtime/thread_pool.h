// sonde's own compute pool, one per Node environment (main thread or worker_thread), so that long
// native calls never occupy the JS thread or libuv's four-thread pool.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
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

class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs job on a worker. `dropped` runs instead (on the calling thread of Shutdown) if the pool
  // shuts down before the job starts. Returns false if the pool is already shut down.
  bool Submit(std::function<void()> job, std::function<void()> dropped);

  // Calls fn(i) for every i in [0, n), on up to max_threads threads including the caller, and
  // returns when all calls have finished. Indices are handed out one at a time, so uneven tasks
  // balance themselves. Stops handing out indices once the pool shuts down or *cancel is set;
  // returns false in that case.
  bool ParallelFor(size_t n, unsigned max_threads, const std::function<void(size_t)>& fn,
                   const CancelFlag* cancel = nullptr);

  // Number of workers that take work. Shrinking parks the extra threads (they finish their
  // current task first); growing wakes parked threads or starts new ones.
  void Resize(unsigned threads);
  unsigned size() const { return target_.load(); }

  // Drops queued jobs, cancels running ParallelFor loops, joins every thread. Idempotent.
  void Shutdown();
  bool stopping() const { return stop_.load(); }

 private:
  struct Task {
    std::function<void()> run;
    std::function<void()> dropped;
  };
  void WorkerLoop(unsigned index);
  void StartThreadsLocked(unsigned count);
  // Wakes sleeping workers for `tasks` new queue entries; parked: some threads are parked (see .cc).
  void Notify(unsigned tasks, bool parked);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::vector<std::thread> threads_;
  std::atomic<unsigned> target_{0};
  std::atomic<unsigned> threads_count_{0};  // threads_.size(), readable without the lock
  std::atomic<bool> stop_{false};
  std::atomic<size_t> queued_{0};  // queue_.size(), readable without the lock while spinning
};

}  // namespace sonde
