// Per-environment state of the addon and the one mechanism for long calls: a job runs Execute() on
// sonde's pool (plain C++ data, no N-API), then settles its Promise on the JS thread.
#pragma once
#include <napi.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/buffer_pool.h"
#include "runtime/thread_pool.h"

namespace sonde {

// Stable codes; lib/errors.ts maps each to an error class.
namespace codes {
constexpr const char* kInvalidArgument = "ERR_SONDE_INVALID_ARGUMENT";
constexpr const char* kDeviceUnavailable = "ERR_SONDE_DEVICE_UNAVAILABLE";
constexpr const char* kModelFormat = "ERR_SONDE_MODEL_FORMAT";
constexpr const char* kOutOfMemory = "ERR_SONDE_OUT_OF_MEMORY";
constexpr const char* kDisposed = "ERR_SONDE_DISPOSED";
constexpr const char* kAborted = "ERR_SONDE_ABORTED";
constexpr const char* kUnsupportedOperator = "ERR_SONDE_UNSUPPORTED_OPERATOR";
constexpr const char* kInternal = "ERR_SONDE_INTERNAL";
}  // namespace codes

Napi::Error MakeError(Napi::Env env, const char* code, const std::string& message);

class Addon;

class AsyncJob {
 public:
  virtual ~AsyncJob() = default;
  // Pool thread. Report failure with Fail(); C++ exceptions are caught and reported too.
  virtual void Execute(Addon& addon) = 0;
  // JS thread, only when Execute succeeded.
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }

  void Fail(const char* code, std::string message) {
    error_code_ = code;
    error_message_ = std::move(message);
  }
  // Its time on the pool (ms, Execute's start to end): for Result, which runs after it.
  double exec_ms() const { return static_cast<double>(t_exec1_ - t_exec0_) / 1e6; }
  // Keeps a JS value (an input TypedArray, a handle) alive until the job settles; a job holds JS
  // references only this way, so that a job dropped at teardown releases none (see Complete).
  void Keep(Napi::Value v) { kept_.push_back(Napi::Persistent(v)); }
  // The i-th value kept, for Result.
  Napi::Value Kept(size_t i) const { return kept_[i].Value(); }
  // Shared with a JS CancelToken (AbortSignal), which may outlive the job or die before it.
  std::shared_ptr<CancelFlag> cancel = std::make_shared<CancelFlag>(false);
  unsigned threads = 0;  // max threads for this job; 0 = the whole pool

 private:
  friend class Addon;
  // Who settles the job (see Addon::Start): the pool thread exchanges in kDone when it finishes;
  // if the JS thread was waiting (kJsWaiting) it settles the job, else the completion goes through
  // the TSFN. The JS thread that stops waiting first exchanges in kJsGaveUp.
  enum Handoff : int { kTsfn = 0, kJsWaiting = 1, kDone = 2, kJsGaveUp = 3 };
  std::atomic<int> handoff_{kTsfn};
  std::atomic<bool> started_{false};  // set by the pool thread as Execute begins
  // Steady-clock ns at Execute's begin and end (always), and at Start (SONDE_HANDOFF_PROFILE only).
  int64_t t_start_ = 0, t_exec0_ = 0, t_exec1_ = 0;
  const char* error_code_ = nullptr;
  std::string error_message_;
  std::vector<Napi::Reference<Napi::Value>> kept_;
  std::unique_ptr<Napi::Promise::Deferred> deferred_;
};

// The native memory sonde reports to V8 in one environment (what its handles and lent output
// buffers hold), kept apart from V8's total, which also counts every ArrayBuffer JS allocates and
// falls whenever a collection frees some. Shared with finalizers, which can run after the Addon.
using ReportedTotal = std::shared_ptr<std::atomic<int64_t>>;
// Tells V8 that `delta` more bytes are held, and adds them to `total`. Safe in finalizers.
void ReportExternal(napi_env env, const ReportedTotal& total, int64_t delta) noexcept;

// A binding function of one kernel family: unmarshal, validate cheaply, Start() a job.
using BindingFn = Napi::Value (*)(Addon& addon, const Napi::CallbackInfo& info);

class Addon : public Napi::Addon<Addon> {
 public:
  Addon(Napi::Env env, Napi::Object exports);
  ~Addon();

  ThreadPool& pool() { return *pool_; }
  const ReportedTotal& reported_total() const { return reported_total_; }
  // Starts job on the pool and returns its Promise. wait_ns > 0: the job is expected to take only
  // microseconds, and if a pool worker is spinning to take it at once, this thread waits up to
  // wait_ns for it and settles the Promise itself (see the .cc); otherwise, or past that, the job
  // settles through the event loop as usual.
  Napi::Value Start(Napi::Env env, std::unique_ptr<AsyncJob> job, int64_t wait_ns = 0);
  // Adds exports[name] calling fn with this addon. Families register through binding/families.h.
  void Export(Napi::Env env, Napi::Object exports, const char* name, BindingFn fn);
  // Keeps a class constructor for the environment's lifetime (for InstanceOf checks and New).
  Napi::FunctionReference& Class(const std::string& name) { return classes_[name]; }
  // Links job->cancel to the CancelToken passed as info[i], if any.
  void AttachCancel(const Napi::CallbackInfo& info, size_t i, AsyncJob* job);
  void AttachCancel(Napi::Value token, AsyncJob* job);
  // What Start's wait_ns should be for a job expected to take expected_ns (-1: unknown): 0 (do not
  // wait) unless it is a few microseconds.
  int64_t RunWaitNs(int64_t expected_ns) const;

 private:
  static void Complete(Napi::Env env, Napi::Function, Addon* self, AsyncJob* job);
  bool WaitForJob(AsyncJob* job, int64_t wait_ns);
  void Settle(Napi::Env env, AsyncJob* job);
  void Teardown();

  Napi::Value SetThreads(const Napi::CallbackInfo& info);
  Napi::Value GetThreads(const Napi::CallbackInfo& info);
  Napi::Value SetThreadAffinity(const Napi::CallbackInfo& info);
  Napi::Value GetThreadAffinity(const Napi::CallbackInfo& info);
  // Pool threads held by the jobs in flight in the whole process (all environments).
  Napi::Value BusyThreads(const Napi::CallbackInfo& info);
  // How long this environment's longest-waiting job not yet taken by a pool thread has waited (us;
  // 0: none).
  Napi::Value StartWaitUs(const Napi::CallbackInfo& info);
  Napi::Value YieldCpu(const Napi::CallbackInfo& info);
  // The time on the pool (ms, Execute's start to end) of the job this environment settled last.
  Napi::Value LastJobMs(const Napi::CallbackInfo& info);
  Napi::Value ExternalMemory(const Napi::CallbackInfo& info);
  Napi::Value NativeMemory(const Napi::CallbackInfo& info);
  // Tests of ThreadPool::ParallelForHomed (see the .cc).
  Napi::Value HomedProbe(const Napi::CallbackInfo& info);
  Napi::Value AllocBuffer(const Napi::CallbackInfo& info);
  Napi::Value BufferPoolStats(const Napi::CallbackInfo& info);
  Napi::Value CpuInfo(const Napi::CallbackInfo& info);
  Napi::Value CudaInfo(const Napi::CallbackInfo& info);
  Napi::Value PeakFma(const Napi::CallbackInfo& info);
  Napi::Value ReadBandwidth(const Napi::CallbackInfo& info);

  using CompletionTsfn = Napi::TypedThreadSafeFunction<Addon, AsyncJob, Complete>;
  // Shared with the environment cleanup hook, which may run after this object is gone.
  std::shared_ptr<ThreadPool> pool_;
  // Shared with the finalizers of the ArrayBuffers it lends, which can run after this object dies.
  std::shared_ptr<BufferPool> buffers_;
  ReportedTotal reported_total_ = std::make_shared<std::atomic<int64_t>>(0);
  CompletionTsfn tsfn_;
  size_t in_flight_ = 0;
  // Jobs settled by Start's wait since a completion last came through the event loop (the TSFN).
  static constexpr unsigned kMaxSettledInline = 8;
  unsigned settled_inline_ = 0;
  // Jobs of this environment submitted to its pool and not yet taken by a pool thread, and since
  // when the oldest has waited (approximately: reset as each starts while others wait). The JS
  // side's polling wait yields its core once a job has waited a few microseconds to start
  // (lib/wait.ts): the kernel may have queued the woken pool thread behind the polling JS thread on
  // its own core. A job dropped at shutdown is not uncounted (the environment is going away).
  std::atomic<int64_t> unstarted_{0};
  std::atomic<int64_t> unstarted_since_ns_{0};
  void JobSubmitted();
  void JobTaken();
  double last_job_ms_ = 0;  // see LastJobMs
  // SONDE_HANDOFF_PROFILE: when this environment's last job settled (addon.cc), steady-clock ns.
  int64_t last_settle_ns_ = 0;
  bool torn_down_ = false;
  Napi::FunctionReference cancel_ctor_;
  std::map<std::string, Napi::FunctionReference> classes_;
};

// JS side of cancellation: lib/ creates one per call that has an AbortSignal and calls cancel()
// when the signal fires; running ParallelFor loops stop handing out work.
class CancelToken : public Napi::ObjectWrap<CancelToken> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit CancelToken(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CancelToken>(info) {}
  std::shared_ptr<CancelFlag> flag = std::make_shared<CancelFlag>(false);

 private:
  Napi::Value Cancel(const Napi::CallbackInfo& info) {
    flag->store(true);
    return info.Env().Undefined();
  }
};

}  // namespace sonde
