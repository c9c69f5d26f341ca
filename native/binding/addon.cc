#include "binding/addon.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "binding/families.h"
#include "kernels/peak/peak.h"
#include "runtime/cpu.h"
#include "runtime/cuda_devices.h"

#ifndef SONDE_VERSION
#define SONDE_VERSION "0.1.0"
#endif

namespace sonde {

Napi::Error MakeError(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

Addon::Addon(Napi::Env env, Napi::Object exports) {
  pool_ = std::make_shared<ThreadPool>(Cpu().cores);
  {
    // Cap on idle output memory kept for reuse; SONDE_BUFFER_CACHE_MB overrides (0: never keep).
    const char* v = std::getenv("SONDE_BUFFER_CACHE_MB");
    long mb = v ? std::strtol(v, nullptr, 10) : 256;
    buffers_ = std::make_shared<BufferPool>(static_cast<size_t>(mb < 0 ? 0 : mb) << 20);
  }
  tsfn_ = CompletionTsfn::New(env, "sonde.complete", 0, 1, this);
  // Idle addon must not keep the process alive; Start() refs while jobs are in flight.
  tsfn_.Unref(env);
  // Runs before the TSFN is torn down (hooks run in reverse order of registration): cancel running
  // work and join the pool while completions can still be delivered or freed. It holds the pool,
  // not `this`: if initialisation is interrupted (a worker terminated while loading the addon),
  // this object can be destroyed before the hook runs.
  std::shared_ptr<ThreadPool> pool = pool_;
  env.AddCleanupHook([pool] { pool->Shutdown(); });
  cancel_ctor_ = Napi::Persistent(CancelToken::Define(env));

  DefineAddon(exports, {
      InstanceMethod("setThreads", &Addon::SetThreads),
      InstanceMethod("getThreads", &Addon::GetThreads),
      InstanceMethod("setThreadAffinity", &Addon::SetThreadAffinity),
      InstanceMethod("getThreadAffinity", &Addon::GetThreadAffinity),
      InstanceMethod("busyThreads", &Addon::BusyThreads),
      InstanceMethod("startWaitUs", &Addon::StartWaitUs),
      InstanceMethod("yieldCpu", &Addon::YieldCpu),
      InstanceMethod("lastJobMs", &Addon::LastJobMs),
      InstanceMethod("cpuInfo", &Addon::CpuInfo),
      InstanceMethod("cudaInfo", &Addon::CudaInfo),
      InstanceMethod("peakFma", &Addon::PeakFma),
      InstanceMethod("readBandwidth", &Addon::ReadBandwidth),
      InstanceMethod("externalMemory", &Addon::ExternalMemory),
      InstanceMethod("nativeMemory", &Addon::NativeMemory),
      InstanceMethod("homedProbe", &Addon::HomedProbe),
      InstanceMethod("allocBuffer", &Addon::AllocBuffer),
      InstanceMethod("bufferPoolStats", &Addon::BufferPoolStats),
      InstanceValue("version", Napi::String::New(env, SONDE_VERSION)),
      InstanceValue("CancelToken", cancel_ctor_.Value()),
  });
  RegisterGemmBindings(env, exports, *this);
  RegisterElementwiseBindings(env, exports, *this);
  RegisterGemmLowpBindings(env, exports, *this);
  RegisterConvBindings(env, exports, *this);
  RegisterGgufBindings(env, exports, *this);
  RegisterQuantBindings(env, exports, *this);
  RegisterSparseBindings(env, exports, *this);
  RegisterLlmBindings(env, exports, *this);
  RegisterGpuBindings(env, exports, *this);
  RegisterMoeBindings(env, exports, *this);
  // After the conv and GEMM families: plan steps hold their handle classes.
  RegisterPlanBindings(env, exports, *this);
}

void Addon::Export(Napi::Env env, Napi::Object exports, const char* name, BindingFn fn) {
  Addon* self = this;
  exports.Set(name, Napi::Function::New(env, [self, fn](const Napi::CallbackInfo& info) { return fn(*self, info); }, name));
}

Addon::~Addon() { Teardown(); }

void Addon::Teardown() {
  if (torn_down_) return;
  torn_down_ = true;
  // Cancels running ParallelFor loops and joins; jobs never started are handed back as cancelled.
  pool_->Shutdown();
}

namespace {

// Bounds the wait of Addon::Start; SONDE_RUN_WAIT_US overrides it (0: never wait).
int64_t RunWaitCapNs() {
  static const int64_t ns = [] {
    const char* v = std::getenv("SONDE_RUN_WAIT_US");
    const long us = v ? std::strtol(v, nullptr, 10) : 20;
    return static_cast<int64_t>(us < 0 ? 0 : us > 1000 ? 1000 : us) * 1000;
  }();
  return ns;
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// SONDE_HANDOFF_PROFILE=1, a diagnostic printed to stderr at exit: per job, the time from Start
// (the binding call) to the pool thread's Execute, Execute itself, and from its end to the
// settling on the JS thread (through the TSFN's event-loop wake-up, or Start's wait), medians,
// 90th percentiles and means over the jobs settled; and, for a job started while none was in
// flight, the time since the last one settled (the caller's JavaScript and the binding's
// unmarshalling between calls, as in a loop of awaited steps). What a call costs beside its work.
class HandoffProfile {
 public:
  static HandoffProfile* Active() {
    static HandoffProfile* p = []() -> HandoffProfile* {
      const char* v = std::getenv("SONDE_HANDOFF_PROFILE");
      return v && std::strcmp(v, "1") == 0 ? new HandoffProfile() : nullptr;  // lives to the exit handler
    }();
    return p;
  }
  // From the JS threads of every environment (worker threads load the addon too), so under a lock.
  void Gap(int64_t ns) {
    std::lock_guard<std::mutex> lock(mu_);
    gap_.push_back(ns);
  }
  void Record(int64_t start, int64_t exec0, int64_t exec1, int64_t settle) {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(exec0 - start);
    exec_.push_back(exec1 - exec0);
    done_.push_back(settle - exec1);
  }

 private:
  HandoffProfile() {
    std::atexit([] { Active()->Print(); });
  }
  static void Line(const char* what, std::vector<int64_t>& v) {
    if (v.empty()) return;
    std::sort(v.begin(), v.end());
    double sum = 0;
    for (int64_t x : v) sum += static_cast<double>(x);
    std::fprintf(stderr, "  %-40s median %8.1f us, p90 %8.1f us, mean %8.1f us\n", what, v[v.size() / 2] / 1e3,
                 v[v.size() * 9 / 10] / 1e3, sum / static_cast<double>(v.size()) / 1e3);
  }
  void Print() {
    std::lock_guard<std::mutex> lock(mu_);
    if (queue_.empty()) return;
    std::fprintf(stderr, "sonde handoff profile: %zu jobs\n", queue_.size());
    Line("Start -> Execute (pool hand-off)", queue_);
    Line("Execute", exec_);
    Line("Execute end -> settled (completion)", done_);
    Line("settled -> next Start, none in flight", gap_);
  }
  std::mutex mu_;
  std::vector<int64_t> queue_, exec_, done_, gap_;
};

}  // namespace

int64_t Addon::RunWaitNs(int64_t expected_ns) const {
  // Twice the expected time leaves room for the hand-off and for jitter; a job expected to take
  // longer than half the cap is not waited for at all (the event loop would be held too long).
  const int64_t cap = RunWaitCapNs();
  if (expected_ns < 0 || 2 * expected_ns > cap) return 0;
  return cap;
}

namespace {
// Pool threads held by the jobs in flight, in every environment of the process (each worker_thread
// has its own pool): what the JS side's polling wait checks for a free core (lib/wait.ts).
std::atomic<int64_t> g_busy_threads{0};
}  // namespace

Napi::Value Addon::Start(Napi::Env env, std::unique_ptr<AsyncJob> job, int64_t wait_ns) {
  job->deferred_ = std::make_unique<Napi::Promise::Deferred>(env);
  Napi::Promise promise = job->deferred_->Promise();
  if (job->threads == 0) job->threads = pool_->size();
  const int64_t held = std::min<int64_t>(job->threads, pool_->size());
  g_busy_threads.fetch_add(held, std::memory_order_relaxed);
  // Waiting pays only when a worker is spinning to take the job at once: a sleeping one takes
  // tens of microseconds to wake. A job settled here resumes its awaiting caller in a microtask,
  // without a turn of the event loop, so a loop of `await session.run()` on a tiny model would
  // hold timers and I/O off for as long as it ran: after kMaxSettledInline such jobs in a row, the
  // next one completes through the event loop again.
  const bool wait = wait_ns > 0 && settled_inline_ < kMaxSettledInline && pool_->HasSpinningWorker();
  if (wait) job->handoff_.store(AsyncJob::kJsWaiting, std::memory_order_relaxed);
  AsyncJob* raw = job.release();
  CompletionTsfn tsfn = tsfn_;
  const bool timed = HandoffProfile::Active() != nullptr;
  if (timed) {
    raw->t_start_ = NowNs();
    if (in_flight_ == 0 && last_settle_ns_) HandoffProfile::Active()->Gap(raw->t_start_ - last_settle_ns_);
  }
  auto run = [this, raw, tsfn, timed, held]() mutable {
    JobTaken();
    raw->started_.store(true, std::memory_order_relaxed);
    raw->t_exec0_ = NowNs();
    try {
      raw->Execute(*this);
    } catch (const std::bad_alloc&) {
      raw->Fail(codes::kOutOfMemory, "sonde: out of host memory");
    } catch (const std::exception& e) {
      raw->Fail(codes::kInternal, std::string("sonde: internal error: ") + e.what());
    }
    if (raw->cancel->load() && !raw->error_code_) raw->Fail(codes::kAborted, "The operation was aborted");
    raw->t_exec1_ = NowNs();
    g_busy_threads.fetch_sub(held, std::memory_order_relaxed);
    // The JS thread still waiting owns the job from here on: nothing below may touch it.
    if (raw->handoff_.exchange(AsyncJob::kDone, std::memory_order_acq_rel) == AsyncJob::kJsWaiting) return;
    if (tsfn.NonBlockingCall(raw) != napi_ok) {
      // The environment is being torn down: nothing can be settled; drop JS references unreleased.
      for (auto& r : raw->kept_) r.SuppressDestruct();
      raw->deferred_.release();
      delete raw;
    }
  };
  // Called by Shutdown for a job that never started; `this` may be gone by then.
  auto dropped = [raw, tsfn, held]() mutable {
    g_busy_threads.fetch_sub(held, std::memory_order_relaxed);
    raw->Fail(codes::kAborted, "sonde: the thread pool shut down before the job started");
    if (raw->handoff_.exchange(AsyncJob::kDone, std::memory_order_acq_rel) == AsyncJob::kJsWaiting) return;
    if (tsfn.NonBlockingCall(raw) != napi_ok) {
      for (auto& r : raw->kept_) r.SuppressDestruct();
      raw->deferred_.release();
      delete raw;
    }
  };
  JobSubmitted();
  if (!pool_->Submit(run, dropped, static_cast<unsigned>(held > 1 ? held - 1 : 0))) {
    JobTaken();
    g_busy_threads.fetch_sub(held, std::memory_order_relaxed);
    Napi::Error err = MakeError(env, codes::kDisposed, "sonde: the thread pool has shut down");
    raw->deferred_->Reject(err.Value());
    delete raw;
    return promise;
  }
  if (in_flight_++ == 0) tsfn_.Ref(env);
  if (wait && WaitForJob(raw, wait_ns)) {
    ++settled_inline_;
    Settle(env, raw);
  }
  return promise;
}

// The JS thread waits for a job of a few microseconds instead of going back to the event loop to
// sleep in epoll until the TSFN's eventfd wakes it: on the 2-vCPU VM that sleep and wake-up (two
// epoll calls, the eventfd read, the context switches and the TSFN's lock, which the pool thread
// holds while it writes the eventfd) were most of a one-Identity round trip of ~20 us, the job
// itself ~1 us. The event loop is held at most wait_ns (SONDE_RUN_WAIT_US, 20 us by default), no
// compute runs here, and the Promise still settles in a later microtask. Returns true when the job
// finished and this thread owns it; false when the pool thread will settle it through the TSFN.
bool Addon::WaitForJob(AsyncJob* job, int64_t wait_ns) {
  // A spinning worker takes the job within a microsecond or two; one that has not started it by
  // then has yielded its core to another process (on a loaded machine for a scheduler slice,
  // milliseconds) or taken other work, and waiting on would only hold the event loop.
  constexpr int64_t kStartNs = 5000;
  const auto start = std::chrono::steady_clock::now();
  for (unsigned i = 1;; ++i) {
    if (job->handoff_.load(std::memory_order_acquire) == AsyncJob::kDone) return true;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_ia32_pause();
#endif
    if ((i & 31) == 0) {
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited >= std::chrono::nanoseconds(wait_ns) ||
          (waited >= std::chrono::nanoseconds(kStartNs) && !job->started_.load(std::memory_order_relaxed))) {
        int expected = AsyncJob::kJsWaiting;
        // Lost the race: the job finished just now, and its thread left it to this one.
        return !job->handoff_.compare_exchange_strong(expected, AsyncJob::kJsGaveUp, std::memory_order_acq_rel);
      }
      // Where the pool thread shares this vCPU (more runnable threads than cores), it must get it.
      std::this_thread::yield();
    }
  }
}

void Addon::Complete(Napi::Env env, Napi::Function, Addon* self, AsyncJob* job) {
  if (env == nullptr) {
    // The TSFN is being finalized with this completion still queued.
    for (auto& r : job->kept_) r.SuppressDestruct();
    job->deferred_.release();
    delete job;
    return;
  }
  self->settled_inline_ = 0;
  self->Settle(env, job);
}

void Addon::Settle(Napi::Env env, AsyncJob* job) {
  std::unique_ptr<AsyncJob> owned(job);
  if (job->t_exec1_) last_job_ms_ = job->exec_ms();
  if (job->t_start_ && job->t_exec1_) {
    last_settle_ns_ = NowNs();
    HandoffProfile::Active()->Record(job->t_start_, job->t_exec0_, job->t_exec1_, last_settle_ns_);
  }
  if (in_flight_ > 0 && --in_flight_ == 0) tsfn_.Unref(env);
  // This runs from the event loop with no JS caller to catch a C++ exception; while a worker is
  // terminating, N-API calls fail (and node-addon-api throws), so nothing may escape from here.
  try {
    Napi::HandleScope scope(env);
    if (job->error_code_) {
      job->deferred_->Reject(MakeError(env, job->error_code_, job->error_message_).Value());
      return;
    }
    try {
      job->deferred_->Resolve(job->Result(env));
    } catch (const Napi::Error& e) {
      job->deferred_->Reject(e.Value());
    }
  } catch (...) {
    for (auto& r : job->kept_) r.SuppressDestruct();
    job->deferred_.release();
  }
}

Napi::Function CancelToken::Define(Napi::Env env) {
  return DefineClass(env, "CancelToken", {InstanceMethod("cancel", &CancelToken::Cancel)});
}

void Addon::AttachCancel(const Napi::CallbackInfo& info, size_t i, AsyncJob* job) {
  if (info.Length() > i) AttachCancel(info[i], job);
}

void Addon::AttachCancel(Napi::Value token, AsyncJob* job) {
  if (token.IsUndefined() || token.IsNull()) return;
  if (!token.IsObject() || !token.As<Napi::Object>().InstanceOf(cancel_ctor_.Value()))
    throw MakeError(token.Env(), codes::kInvalidArgument, "cancel token must be a CancelToken");
  job->cancel = CancelToken::Unwrap(token.As<Napi::Object>())->flag;
}

Napi::Value Addon::SetThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber())
    throw MakeError(env, codes::kInvalidArgument, "setThreads(threads): threads must be a number");
  int64_t n = info[0].As<Napi::Number>().Int64Value();
  if (n < 1 || n > 1024)
    throw MakeError(env, codes::kInvalidArgument, "setThreads(threads): threads must be in [1, 1024]");
  pool_->Resize(static_cast<unsigned>(n));
  return env.Undefined();
}

void ReportExternal(napi_env env, const ReportedTotal& total, int64_t delta) noexcept {
  if (!delta) return;
  if (total) total->fetch_add(delta, std::memory_order_relaxed);
  int64_t v8_total;
  if (env) napi_adjust_external_memory(env, delta, &v8_total);
}

// V8's running total of external memory in this isolate (every addon's reports and every
// ArrayBuffer's backing store); adjusting by 0 reads it.
Napi::Value Addon::ExternalMemory(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(Napi::MemoryManagement::AdjustExternalMemory(info.Env(), 0)));
}

// What sonde itself reports to V8 in this environment (see ReportedTotal).
Napi::Value Addon::NativeMemory(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(reported_total_->load(std::memory_order_relaxed)));
}

// homedProbe(n, loops, throwAt) -> Int32Array of loops * n: how many times each index of each of
// `loops` consecutive ParallelForHomed(n) loops on the whole pool ran, the JS thread taking part as
// participant 0 (every entry must be 1); throwAt >= 0: the last loop's fn throws at that index,
// which must come back as an error. For the tests: what a plan's homed steps rely on.
Napi::Value Addon::HomedProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto arg = [&](size_t i) { return info.Length() > i && info[i].IsNumber() ? info[i].As<Napi::Number>().Int64Value() : -1; };
  const int64_t n = arg(0), loops = arg(1), throw_at = arg(2);
  if (n < 1 || n > 4096 || loops < 1 || loops > 100000 || n * loops > (int64_t{1} << 22))
    throw MakeError(env, codes::kInvalidArgument,
                    "homedProbe(n, loops, throwAt): n in [1, 4096], loops in [1, 100000], n * loops at most 2^22");
  std::vector<std::atomic<int32_t>> counts(static_cast<size_t>(n * loops));
  for (auto& c : counts) c.store(0, std::memory_order_relaxed);
  try {
    for (int64_t l = 0; l < loops; ++l) {
      pool_->ParallelForHomed(static_cast<size_t>(n), pool_->size(), [&](size_t i) {
        if (l == loops - 1 && static_cast<int64_t>(i) == throw_at) throw std::runtime_error("homedProbe: thrown");
        counts[static_cast<size_t>(l * n) + i].fetch_add(1, std::memory_order_relaxed);
      });
    }
  } catch (const std::runtime_error& e) {
    throw MakeError(env, codes::kInternal, e.what());
  }
  Napi::Int32Array out = Napi::Int32Array::New(env, counts.size());
  for (size_t i = 0; i < counts.size(); ++i) out[i] = counts[i].load(std::memory_order_relaxed);
  return out;
}

namespace {
struct LentBuffer {
  std::shared_ptr<BufferPool> pool;
  ReportedTotal reported;
  size_t capacity;
};
}  // namespace

// allocBuffer(bytes) -> ArrayBuffer of exactly `bytes` (contents unspecified) whose memory comes
// from, and returns to, this environment's BufferPool. Its size class is reported to V8 while the
// ArrayBuffer lives, so collection keeps pace with output allocation.
Napi::Value Addon::AllocBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double d = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 1 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    throw MakeError(env, codes::kInvalidArgument, "allocBuffer(bytes): bytes must be a positive integer");
  size_t capacity = 0;
  void* p = buffers_->Acquire(static_cast<size_t>(d), &capacity);
  if (!p) throw MakeError(env, codes::kOutOfMemory, "sonde: out of host memory allocating an output of " +
                                                        std::to_string(static_cast<size_t>(d)) + " bytes");
  auto* lent = new LentBuffer{buffers_, reported_total_, capacity};
  napi_value ab;
  napi_status st = napi_create_external_arraybuffer(
      env, p, static_cast<size_t>(d),
      [](napi_env fenv, void* data, void* hint) {
        auto* l = static_cast<LentBuffer*>(hint);
        ReportExternal(fenv, l->reported, -static_cast<int64_t>(l->capacity));
        l->pool->Release(data, l->capacity);
        delete l;
      },
      lent, &ab);
  if (st != napi_ok) {
    buffers_->Release(p, capacity);
    delete lent;
    throw MakeError(env, codes::kInternal, "sonde: could not create an external ArrayBuffer");
  }
  ReportExternal(env, reported_total_, static_cast<int64_t>(capacity));
  return Napi::Value(env, ab);
}

Napi::Value Addon::BufferPoolStats(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("cachedBytes", static_cast<double>(buffers_->cached_bytes()));
  return o;
}

Napi::Value Addon::GetThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), pool_->size());
}

namespace {
constexpr const char* kPinModeNames[] = {"auto", "on", "off"};
}  // namespace

Napi::Value Addon::SetThreadAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string mode = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  for (int m = 0; m < 3; ++m) {
    if (mode == kPinModeNames[m]) {
      pool_->SetPinMode(static_cast<ThreadPool::PinMode>(m));
      return env.Undefined();
    }
  }
  throw MakeError(env, codes::kInvalidArgument, "setThreadAffinity(mode): mode must be 'auto', 'on' or 'off'");
}

// { mode, pinned, machineBusy, contended, cpus: the CPUs each worker may run on, as the OS reports them }
Napi::Value Addon::GetThreadAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
  const ThreadPool::Affinity a = pool_->AffinityNow();
  out.Set("mode", kPinModeNames[static_cast<int>(a.mode)]);
  out.Set("pinned", a.pinned);
  out.Set("machineBusy", a.machine_busy);
  out.Set("contended", a.contended);
  const std::vector<std::vector<int>>& cpus = a.cpus;
  Napi::Array list = Napi::Array::New(env, cpus.size());
  for (size_t i = 0; i < cpus.size(); ++i) {
    Napi::Array one = Napi::Array::New(env, cpus[i].size());
    for (size_t j = 0; j < cpus[i].size(); ++j) one.Set(static_cast<uint32_t>(j), cpus[i][j]);
    list.Set(static_cast<uint32_t>(i), one);
  }
  out.Set("cpus", list);
  return out;
}

Napi::Value Addon::BusyThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(g_busy_threads.load(std::memory_order_relaxed)));
}

Napi::Value Addon::LastJobMs(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), last_job_ms_); }

Napi::Value Addon::YieldCpu(const Napi::CallbackInfo& info) {
  std::this_thread::yield();
  return info.Env().Undefined();
}

void Addon::JobSubmitted() {
  if (unstarted_.fetch_add(1, std::memory_order_relaxed) == 0) unstarted_since_ns_.store(NowNs(), std::memory_order_relaxed);
}

void Addon::JobTaken() {
  if (unstarted_.fetch_sub(1, std::memory_order_relaxed) > 1) unstarted_since_ns_.store(NowNs(), std::memory_order_relaxed);
}

Napi::Value Addon::StartWaitUs(const Napi::CallbackInfo& info) {
  if (unstarted_.load(std::memory_order_relaxed) <= 0) return Napi::Number::New(info.Env(), 0);
  const int64_t since = unstarted_since_ns_.load(std::memory_order_relaxed);
  return Napi::Number::New(info.Env(), static_cast<double>(std::max<int64_t>(0, NowNs() - since)) / 1000.0);
}

Napi::Value Addon::CpuInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CpuFeatures& c = Cpu();
  Napi::Object o = Napi::Object::New(env);
  o.Set("model", c.model);
  o.Set("arch", c.arch);
  o.Set("cores", c.cores);
  o.Set("simd", IsaName(c.level));
  o.Set("simdDetected", IsaName(c.detected));
  Napi::Array feats = Napi::Array::New(env);
  auto names = c.FeatureNames();
  for (size_t i = 0; i < names.size(); ++i) feats.Set(static_cast<uint32_t>(i), names[i]);
  o.Set("features", feats);
  o.Set("bf16", c.HasBf16());
  o.Set("vnni", c.HasVnni());
  Napi::Object caches = Napi::Object::New(env);
  caches.Set("l1d", static_cast<double>(c.l1d_bytes));
  caches.Set("l2", static_cast<double>(c.l2_bytes));
  caches.Set("l3", static_cast<double>(c.l3_bytes));
  o.Set("caches", caches);
  return o;
}

Napi::Value Addon::CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CudaStatus s = QueryCuda();
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", s.compiled);
  o.Set("runtimeVersion", s.runtime_version);
  o.Set("driverVersion", s.driver_version);
  Napi::Array devs = Napi::Array::New(env);
  for (size_t i = 0; i < s.devices.size(); ++i) {
    const auto& d = s.devices[i];
    Napi::Object dv = Napi::Object::New(env);
    dv.Set("index", d.index);
    dv.Set("name", d.name);
    dv.Set("totalMemory", static_cast<double>(d.total_bytes));
    dv.Set("freeMemory", static_cast<double>(d.free_bytes));
    dv.Set("computeCapability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
    dv.Set("multiprocessors", d.multiprocessors);
    devs.Set(static_cast<uint32_t>(i), dv);
  }
  o.Set("devices", devs);
  if (!s.reason.empty()) o.Set("reason", s.reason);
  return o;
}

// ---- peak probes (bench harness) ----

namespace {

class PeakFmaJob : public AsyncJob {
 public:
  IsaLevel isa = IsaLevel::kScalar;
  double seconds = 0.2;
  double flops = 0, elapsed = 0;
  void Execute(Addon& addon) override {
    using Clock = std::chrono::steady_clock;
    const unsigned nt = threads;
    std::vector<double> per(nt, 0.0);
    std::vector<float> sinks(nt * 16, 0.0f);
    auto t0 = Clock::now();
    addon.pool().ParallelFor(nt, nt, [&](size_t t) {
      auto start = Clock::now();
      double done = 0;
      while (std::chrono::duration<double>(Clock::now() - start).count() < seconds) {
        constexpr uint64_t kIters = 1u << 16;
#if defined(__x86_64__) || defined(_M_X64)
        if (isa == IsaLevel::kAvx512) done += kernels::F32FmaPeakAvx512(kIters, &sinks[t * 16]);
        else if (isa == IsaLevel::kAvx2) done += kernels::F32FmaPeakAvx2(kIters, &sinks[t * 16]);
        else
#endif
          done += kernels::F32FmaPeakScalar(kIters, &sinks[t * 16]);
      }
      per[t] = done;
    }, cancel.get());
    elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    for (double d : per) flops += d;
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    o.Set("flops", flops);
    o.Set("seconds", elapsed);
    o.Set("threads", threads);
    o.Set("simd", IsaName(isa));
    return o;
  }
};

class ReadBandwidthJob : public AsyncJob {
 public:
  size_t bytes = 0;
  int passes = 3;
  double best_seconds = 0;
  void Execute(Addon& addon) override {
    size_t n = bytes / sizeof(float) / 64 * 64;
    float* buf = static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(64, n * sizeof(float))));
    if (!buf) throw std::bad_alloc();
    const unsigned nt = threads;
    const size_t chunk = (n / nt) / 64 * 64;
    addon.pool().ParallelFor(nt, nt, [&](size_t t) {
      size_t begin = t * chunk, end = t + 1 == nt ? n : begin + chunk;
      for (size_t i = begin; i < end; ++i) buf[i] = static_cast<float>(i & 7);
    });
    std::vector<float> sums(nt);
    best_seconds = 1e30;
    for (int p = 0; p < passes && !cancel->load(); ++p) {
      auto t0 = std::chrono::steady_clock::now();
      addon.pool().ParallelFor(nt, nt, [&](size_t t) {
        size_t begin = t * chunk, end = t + 1 == nt ? n : begin + chunk;
#if defined(__x86_64__) || defined(_M_X64)
        if (Cpu().Supports(IsaLevel::kAvx2)) sums[t] = kernels::F32ReadSumAvx2(buf + begin, end - begin);
        else
#endif
          sums[t] = kernels::F32ReadSumScalar(buf + begin, end - begin);
      });
      best_seconds = std::min(best_seconds,
                              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    bytes = n * sizeof(float);
    std::free(buf);
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    o.Set("bytes", static_cast<double>(bytes));
    o.Set("seconds", best_seconds);
    o.Set("threads", threads);
    return o;
  }
};

unsigned ThreadsArg(const Napi::Value& v, const char* what) {
  if (v.IsUndefined() || v.IsNull()) return 0;
  if (!v.IsNumber()) throw MakeError(v.Env(), codes::kInvalidArgument, std::string(what) + " must be a number");
  int64_t n = v.As<Napi::Number>().Int64Value();
  if (n < 0 || n > 1024) throw MakeError(v.Env(), codes::kInvalidArgument, std::string(what) + " must be in [0, 1024]");
  return static_cast<unsigned>(n);
}

}  // namespace

Napi::Value Addon::PeakFma(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto job = std::make_unique<PeakFmaJob>();
  if (info.Length() < 1 || !info[0].IsString() || !ParseIsa(info[0].As<Napi::String>(), &job->isa))
    throw MakeError(env, codes::kInvalidArgument, "peakFma(simd): simd must be 'scalar', 'avx2' or 'avx512'");
  if (!Cpu().Supports(job->isa))
    throw MakeError(env, codes::kInvalidArgument, std::string("peakFma: this CPU cannot run ") + IsaName(job->isa));
  job->threads = ThreadsArg(info[1], "peakFma(threads)");
  if (info.Length() > 2 && info[2].IsNumber()) job->seconds = std::clamp(info[2].As<Napi::Number>().DoubleValue(), 0.01, 10.0);
  return Start(env, std::move(job));
}

Napi::Value Addon::ReadBandwidth(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto job = std::make_unique<ReadBandwidthJob>();
  if (info.Length() < 1 || !info[0].IsNumber())
    throw MakeError(env, codes::kInvalidArgument, "readBandwidth(bytes): bytes must be a number");
  double b = info[0].As<Napi::Number>().DoubleValue();
  if (!(b >= 4096 && b <= 16.0 * (1ull << 30)))
    throw MakeError(env, codes::kInvalidArgument, "readBandwidth(bytes): bytes must be in [4 KiB, 16 GiB]");
  job->bytes = static_cast<size_t>(b);
  job->threads = ThreadsArg(info[1], "readBandwidth(threads)");
  return Start(env, std::move(job));
}

}  // namespace sonde

static Napi::Object InitSonde(Napi::Env env, Napi::Object exports) {
  return sonde::Addon::Init(env, exports);
}

NODE_API_MODULE(sonde_addon, InitSonde)
