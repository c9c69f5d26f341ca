// The JS handle of an immutable native object that running jobs share (packed weights, a created
// operator): it holds one shared_ptr and reports the object's bytes to V8. dispose() drops the
// handle's reference and the V8 accounting at once; a run in flight keeps the object alive until it
// finishes. T must have bytes(); `void Describe(Napi::Object&, const T&)`, found by argument-
// dependent lookup, fills info() of a live handle.
#pragma once
#include <napi.h>

#include <memory>

#include "binding/addon.h"

namespace sonde {

// V8's (and the environment's ReportedTotal's) accounting of the native memory one JS object
// holds, as the amount changes.
class ReportedMemory {
 public:
  // Tells V8 the object holds `now` bytes.
  void Set(Napi::Env env, int64_t now) {
    if (!total_) total_ = env.GetInstanceData<Addon>()->reported_total();
    if (now != bytes_) ReportExternal(env, total_, now - bytes_);
    bytes_ = now;
  }
  void Release(Napi::Env env) { Set(env, 0); }
  // For destructors (GC finalizers, possibly during environment teardown): cannot throw.
  void ReleaseInFinalizer(napi_env env) {
    if (bytes_) ReportExternal(env, total_, -bytes_);
    bytes_ = 0;
  }
  int64_t bytes() const { return bytes_; }

 private:
  int64_t bytes_ = 0;
  ReportedTotal total_;  // set by the first Set, from the JS thread's addon
};

template <typename T>
class SharedHandle : public Napi::ObjectWrap<SharedHandle<T>> {
 public:
  // Defines the JS class `name` and keeps its constructor in the addon.
  static void Register(Napi::Env env, Addon& addon, const char* name) {
    addon.Class(name) = Napi::Persistent(SharedHandle::DefineClass(env, name, {
        SharedHandle::InstanceMethod("dispose", &SharedHandle::Dispose),
        SharedHandle::InstanceMethod("info", &SharedHandle::Info),
    }));
  }

  // A new handle of class `name` owning `value`.
  static Napi::Object Wrap(Napi::Env env, Addon& addon, const char* name, std::shared_ptr<const T> value) {
    Napi::Object obj = addon.Class(name).New({});
    SharedHandle* h = SharedHandle::Unwrap(obj);
    h->value_ = std::move(value);
    h->reported_.Set(env, static_cast<int64_t>(h->value_->bytes()));
    return obj;
  }

  static bool Is(Addon& addon, const char* name, Napi::Value v) {
    return v.IsObject() && v.As<Napi::Object>().InstanceOf(addon.Class(name).Value());
  }

  // Brings V8's accounting of a handle checked with Is() up to its object's bytes() now, for an
  // object that grows once after its handle was made (a language model's repacked weights).
  static void ReportBytes(Napi::Env env, Napi::Value v) {
    SharedHandle* h = SharedHandle::Unwrap(v.As<Napi::Object>());
    if (h->value_) h->reported_.Set(env, static_cast<int64_t>(h->value_->bytes()));
  }

  // The object behind a handle checked with Is(); null once disposed.
  static std::shared_ptr<const T> Get(Napi::Value v) { return SharedHandle::Unwrap(v.As<Napi::Object>())->value_; }

  explicit SharedHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SharedHandle<T>>(info) {}

  ~SharedHandle() override { reported_.ReleaseInFinalizer(this->Env()); }

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    value_.reset();
    reported_.Release(info.Env());
    return info.Env().Undefined();
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("disposed", !value_);
    if (value_) Describe(o, *value_);
    return o;
  }

  std::shared_ptr<const T> value_;
  ReportedMemory reported_;
};

}  // namespace sonde
