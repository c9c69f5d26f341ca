// Bindings of the GPU backend (runtime/cuda/gpu.h): device buffers as shared handles, uploads and
// downloads, and one entry point that runs any registered op by name on a device. lib/cuda/
// validates first and names the user's parameter; the op re-checks every size it relies on.
#include <functional>
#include <string>
#include <vector>

#include "binding/addon.h"
#include "binding/families.h"
#include "binding/shared_handle.h"
#include "runtime/cuda/gpu.h"

namespace sonde {

using GpuBufferHandle = SharedHandle<GpuAllocation>;
constexpr const char* kGpuBufferClass = "GpuBuffer";

void Describe(Napi::Object& o, const GpuAllocation& a) {
  o.Set("bytes", static_cast<double>(a.bytes()));
  o.Set("device", a.device().info().id);
}

// Also used by the GPU plan binding (plan_gpu_binding.cc).
const char* GpuErrorCode(GpuErrc c) {
  switch (c) {
    case GpuErrc::kOutOfMemory: return codes::kOutOfMemory;
    case GpuErrc::kUnavailable: return codes::kDeviceUnavailable;
    case GpuErrc::kInvalidArgument: return codes::kInvalidArgument;
    case GpuErrc::kKernel: break;
  }
  return codes::kInternal;
}

namespace {

const char* CodeOf(GpuErrc c) { return GpuErrorCode(c); }

[[noreturn]] void Invalid(Napi::Env env, const std::string& what) { throw MakeError(env, codes::kInvalidArgument, what); }

std::shared_ptr<GpuDevice> DeviceArg(const Napi::CallbackInfo& info, size_t i) {
  if (!info[i].IsString()) Invalid(info.Env(), "device must be a string");
  try {
    return OpenGpuDevice(info[i].As<Napi::String>());
  } catch (const GpuError& e) {
    throw MakeError(info.Env(), CodeOf(e.code), e.what());
  }
}

std::shared_ptr<const GpuAllocation> BufferArg(Addon& addon, Napi::Env env, Napi::Value v, const std::string& what) {
  if (!GpuBufferHandle::Is(addon, kGpuBufferClass, v)) Invalid(env, what + " must be a GpuBuffer");
  std::shared_ptr<const GpuAllocation> a = GpuBufferHandle::Get(v);
  if (!a) throw MakeError(env, codes::kDisposed, what + " has been disposed");
  return a;
}

size_t SizeArg(Napi::Env env, Napi::Value v, const char* what) {
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    Invalid(env, std::string(what) + " must be a non-negative integer");
  return static_cast<size_t>(d);
}

// Every GPU call is one job: it takes a stream for its duration, so concurrent calls overlap.
class GpuJob : public AsyncJob {
 public:
  std::function<void(GpuStream&)> run;
  std::shared_ptr<GpuDevice> device;
  double result = 0;
  void Execute(Addon&) override {
    try {
      std::shared_ptr<GpuStream> stream = device->AcquireStream();
      run(*stream);
      stream->Synchronize();
    } catch (const GpuError& e) {
      Fail(CodeOf(e.code), e.what());
    }
  }
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, result); }
};

// gpuDevice(id) -> { id, name, emulated, totalMemory, computeCapability, multiprocessors,
// sharedPerBlock, inUse, cached }
Napi::Value GpuDeviceInfoFn(Addon&, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<GpuDevice> d = DeviceArg(info, 0);
  const GpuDeviceInfo& i = d->info();
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", i.id);
  o.Set("name", i.name);
  o.Set("emulated", i.emulated);
  o.Set("totalMemory", static_cast<double>(i.total_bytes));
  o.Set("computeCapability", std::to_string(i.cc_major) + "." + std::to_string(i.cc_minor));
  o.Set("multiprocessors", i.multiprocessors);
  o.Set("sharedPerBlock", static_cast<double>(i.shared_per_block));
  o.Set("inUse", static_cast<double>(d->bytes_in_use()));
  o.Set("cached", static_cast<double>(d->bytes_cached()));
  return o;
}

// gpuAlloc(id, bytes, what) -> GpuBuffer (contents undefined until written)
Napi::Value GpuAllocFn(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<GpuDevice> d = DeviceArg(info, 0);
  const size_t bytes = SizeArg(env, info[1], "bytes");
  const std::string what = info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : std::string("a buffer");
  std::shared_ptr<const GpuAllocation> a;
  try {
    a = std::make_shared<const GpuAllocation>(d, bytes, what);
  } catch (const GpuError& e) {
    throw MakeError(env, CodeOf(e.code), e.what());
  }
  return GpuBufferHandle::Wrap(env, addon, kGpuBufferClass, std::move(a));
}

// gpuCopy(buffer, offsetBytes, view, toDevice) -> Promise<void>: view's bytes to or from the buffer.
Napi::Value GpuCopyFn(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<const GpuAllocation> a = BufferArg(addon, env, info[0], "buffer");
  const size_t offset = SizeArg(env, info[1], "offset");
  if (!info[2].IsTypedArray()) Invalid(env, "data must be a TypedArray");
  Napi::TypedArray view = info[2].As<Napi::TypedArray>();
  const bool to_device = info[3].ToBoolean();
  const size_t n = view.ByteLength();
  if (offset > a->bytes() || n > a->bytes() - offset)
    Invalid(env, "the copy of " + std::to_string(n) + " bytes at offset " + std::to_string(offset) +
                     " does not fit the buffer of " + std::to_string(a->bytes()) + " bytes");
  char* host = static_cast<char*>(view.ArrayBuffer().Data()) + view.ByteOffset();
  char* dev = static_cast<char*>(a->data()) + offset;
  auto job = std::make_unique<GpuJob>();
  job->device = std::shared_ptr<GpuDevice>(a, &a->device());  // keeps the allocation (and its device) alive
  job->run = [a, host, dev, n, to_device](GpuStream& s) {
    if (to_device)
      s.Upload(dev, host, n);
    else
      s.Download(host, dev, n);
  };
  job->threads = 1;
  job->Keep(info[0]);
  job->Keep(info[2]);
  return addon.Start(env, std::move(job));
}

// gpuRun(id, op, buffers[], params{}, reps, graph) -> Promise<number>: runs op; with reps > 0 runs it
// reps more times between timing marks (graph: replays of one captured run) and resolves to the
// mean milliseconds per run.
Napi::Value GpuRunFn(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<GpuDevice> d = DeviceArg(info, 0);
  if (!info[1].IsString()) Invalid(env, "op must be a string");
  GpuOpCall call;
  call.op = info[1].As<Napi::String>();
  GpuOpFn fn = FindGpuOp(call.op, d->info().emulated);
  if (!fn) Invalid(env, "no GPU op named '" + call.op + "' for " + d->info().id);
  if (!info[2].IsArray()) Invalid(env, "buffers must be an array");
  Napi::Array arr = info[2].As<Napi::Array>();
  std::vector<std::shared_ptr<const GpuAllocation>> held;
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    std::shared_ptr<const GpuAllocation> a = BufferArg(addon, env, arr.Get(i), "buffers[" + std::to_string(i) + "]");
    if (&a->device() != d.get()) Invalid(env, "buffers[" + std::to_string(i) + "] lives on " + a->device().info().id);
    call.buffers.push_back({a->data(), a->bytes()});
    held.push_back(std::move(a));
  }
  if (!info[3].IsObject()) Invalid(env, "params must be an object");
  Napi::Object params = info[3].As<Napi::Object>();
  Napi::Array keys = params.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); ++i) {
    std::string k = keys.Get(i).As<Napi::String>();
    Napi::Value v = params.Get(k);
    if (!v.IsNumber() && !v.IsBoolean()) Invalid(env, "params." + k + " must be a number");
    call.params[k] = v.IsBoolean() ? (v.As<Napi::Boolean>().Value() ? 1.0 : 0.0) : v.As<Napi::Number>().DoubleValue();
  }
  const size_t reps = info.Length() > 4 && !info[4].IsUndefined() ? SizeArg(env, info[4], "reps") : 0;
  const bool graph = info.Length() > 5 && info[5].ToBoolean();
  auto job = std::make_unique<GpuJob>();
  job->device = d;
  GpuJob* raw = job.get();
  const GpuDeviceInfo* dev_info = &d->info();
  job->run = [fn, call = std::move(call), held = std::move(held), reps, graph, raw, dev_info](GpuStream& s) {
    fn(s, *dev_info, call);
    if (reps == 0) return;
    std::unique_ptr<GpuGraph> g;
    if (graph) g = CaptureGraph(s, [&] { fn(s, *dev_info, call); });
    s.MarkStart();
    for (size_t r = 0; r < reps; ++r) {
      if (g)
        g->Replay(s);
      else
        fn(s, *dev_info, call);
    }
    raw->result = s.MarkStopMs() / static_cast<double>(reps);
  };
  job->threads = 1;
  for (uint32_t i = 0; i < arr.Length(); ++i) job->Keep(arr.Get(i));
  return addon.Start(env, std::move(job));
}

// gpuOps(emulated) -> names of the registered ops of that mode.
Napi::Value GpuOpsFn(Addon&, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<std::string> names = GpuOpNames(info[0].ToBoolean());
  Napi::Array out = Napi::Array::New(env, names.size());
  for (size_t i = 0; i < names.size(); ++i) out.Set(static_cast<uint32_t>(i), names[i]);
  return out;
}

// gpuTrim(id): returns the device's cached blocks to the driver.
Napi::Value GpuTrimFn(Addon&, const Napi::CallbackInfo& info) {
  DeviceArg(info, 0)->Trim();
  return info.Env().Undefined();
}

}  // namespace

void RegisterGpuBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  GpuBufferHandle::Register(env, addon, kGpuBufferClass);
  addon.Export(env, exports, "gpuDevice", GpuDeviceInfoFn);
  addon.Export(env, exports, "gpuAlloc", GpuAllocFn);
  addon.Export(env, exports, "gpuCopy", GpuCopyFn);
  addon.Export(env, exports, "gpuRun", GpuRunFn);
  addon.Export(env, exports, "gpuOps", GpuOpsFn);
  addon.Export(env, exports, "gpuTrim", GpuTrimFn);
}

}  // namespace sonde
