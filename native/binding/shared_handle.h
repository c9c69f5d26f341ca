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
    h->reported_bytes_ = static_cast<int64_t>(h->value_->bytes());
    Napi::MemoryManagement::AdjustExternalMemory(env, h->reported_bytes_);
    return obj;
  }

  static bool Is(Addon& addon, const char* name, Napi::Value v) {
    return v.IsObject() && v.As<Napi::Object>().InstanceOf(addon.Class(name).Value());
  }

  // Brings V8's accounting of a handle checked with Is() up to its object's bytes() now, for an
  // object that grows once after its handle was made (a language model's repacked weights).
  static void ReportBytes(Napi::Env env, Napi::Value v) {
    SharedHandle* h = SharedHandle::Unwrap(v.As<Napi::Object>());
    if (!h->value_) return;
    const int64_t now = static_cast<int64_t>(h->value_->bytes());
    if (now != h->reported_bytes_) Napi::MemoryManagement::AdjustExternalMemory(env, now - h->reported_bytes_);
    h->reported_bytes_ = now;
  }

  // The object behind a handle checked with Is(); null once disposed.
  static std::shared_ptr<const T> Get(Napi::Value v) { return SharedHandle::Unwrap(v.As<Napi::Object>())->value_; }

  explicit SharedHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SharedHandle<T>>(info) {}

  ~SharedHandle() override {
    // A GC finalizer, possibly during environment teardown: the C call cannot throw.
    int64_t total;
    if (reported_bytes_) napi_adjust_external_memory(this->Env(), -reported_bytes_, &total);
  }

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    value_.reset();
    if (reported_bytes_) Napi::MemoryManagement::AdjustExternalMemory(info.Env(), -reported_bytes_);
    reported_bytes_ = 0;
    return info.Env().Undefined();
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("disposed", !value_);
    if (value_) Describe(o, *value_);
    return o;
  }

  std::shared_ptr<const T> value_;
  int64_t reported_bytes_ = 0;
};

}  // namespace sonde
