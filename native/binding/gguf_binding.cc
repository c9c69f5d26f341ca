// GGUF binding: ggufOpen(path) maps and validates the file on the pool (formats/gguf.h), then
// converts the header to plain JS values on the JS thread. The handle keeps the mapping; dispose()
// drops this reference, and the file is unmapped once no running job holds it either.
//
// The mapping is not reported to V8 as external memory: its pages are file-backed and clean, the
// kernel reclaims them under memory pressure without swapping, and counting a multi-GB model would
// make V8 run full garbage collections that cannot free any of it.
#include "binding/gguf_binding.h"

#include <cstring>
#include <new>
#include <string>

#include "binding/addon.h"
#include "binding/families.h"

namespace sonde {

namespace {

class GgufHandle : public Napi::ObjectWrap<GgufHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "GgufHandle", {InstanceMethod("dispose", &GgufHandle::Dispose)});
  }
  explicit GgufHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GgufHandle>(info) {}
  std::shared_ptr<const GgufFile> file;

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    file.reset();
    return info.Env().Undefined();
  }
};

// Largest integer a double holds exactly; 64-bit values beyond it become BigInts.
constexpr uint64_t kMaxSafe = 9007199254740991ull;

// Converts the (validated) value of type t at *pos and advances *pos past it.
Napi::Value ToJs(Napi::Env env, const uint8_t* base, uint64_t* pos, GgufValueType t) {
  const uint8_t* p = base + *pos;
  switch (t) {
    case GgufValueType::kUint8: *pos += 1; return Napi::Number::New(env, p[0]);
    case GgufValueType::kInt8: *pos += 1; return Napi::Number::New(env, static_cast<int8_t>(p[0]));
    case GgufValueType::kBool: *pos += 1; return Napi::Boolean::New(env, p[0] != 0);
    case GgufValueType::kUint16: { uint16_t v; memcpy(&v, p, 2); *pos += 2; return Napi::Number::New(env, v); }
    case GgufValueType::kInt16: { int16_t v; memcpy(&v, p, 2); *pos += 2; return Napi::Number::New(env, v); }
    case GgufValueType::kUint32: { uint32_t v; memcpy(&v, p, 4); *pos += 4; return Napi::Number::New(env, v); }
    case GgufValueType::kInt32: { int32_t v; memcpy(&v, p, 4); *pos += 4; return Napi::Number::New(env, v); }
    case GgufValueType::kFloat32: { float v; memcpy(&v, p, 4); *pos += 4; return Napi::Number::New(env, v); }
    case GgufValueType::kFloat64: { double v; memcpy(&v, p, 8); *pos += 8; return Napi::Number::New(env, v); }
    case GgufValueType::kUint64: {
      const uint64_t v = GgufLoadU64(p);
      *pos += 8;
      if (v <= kMaxSafe) return Napi::Number::New(env, static_cast<double>(v));
      return Napi::BigInt::New(env, v);
    }
    case GgufValueType::kInt64: {
      int64_t v;
      memcpy(&v, p, 8);
      *pos += 8;
      if (v <= static_cast<int64_t>(kMaxSafe) && v >= -static_cast<int64_t>(kMaxSafe)) return Napi::Number::New(env, static_cast<double>(v));
      return Napi::BigInt::New(env, v);
    }
    case GgufValueType::kString: {
      const uint64_t len = GgufLoadU64(p);
      *pos += 8 + len;
      return Napi::String::New(env, reinterpret_cast<const char*>(p + 8), len);
    }
    case GgufValueType::kArray: {
      const GgufValueType e = static_cast<GgufValueType>(GgufLoadU32(p));
      const uint64_t count = GgufLoadU64(p + 4);
      *pos += 12;
      Napi::Array a = Napi::Array::New(env, count);
      for (uint64_t i = 0; i < count; ++i) a.Set(static_cast<uint32_t>(i), ToJs(env, base, pos, e));
      return a;
    }
  }
  return env.Undefined();
}

// "uint32", "array<string>", "array<array<int32>>" (nested: the first element's type; "array<array>"
// when the outer array is empty).
std::string TypeString(const uint8_t* base, uint64_t pos, GgufValueType t) {
  if (t != GgufValueType::kArray) return GgufValueTypeName(t);
  const GgufValueType e = static_cast<GgufValueType>(GgufLoadU32(base + pos));
  const uint64_t count = GgufLoadU64(base + pos + 4);
  if (e == GgufValueType::kArray && count > 0) return "array<" + TypeString(base, pos + 12, e) + ">";
  return std::string("array<") + GgufValueTypeName(e) + ">";
}

class GgufOpenJob : public AsyncJob {
 public:
  std::string path;
  std::shared_ptr<const GgufFile> file;
  void Execute(Addon&) override {
    std::string error;
    bool format_error = false;
    file = GgufFile::Open(path, &error, &format_error);
    if (!file) Fail(format_error ? codes::kModelFormat : codes::kInvalidArgument, "gguf.read(path): " + error);
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    Napi::Object handle = ctor->New({});
    GgufHandle::Unwrap(handle)->file = file;
    o.Set("handle", handle);
    o.Set("version", file->version());
    o.Set("alignment", static_cast<double>(file->alignment()));
    o.Set("dataOffset", static_cast<double>(file->data_offset()));
    o.Set("fileSize", static_cast<double>(file->file_size()));
    Napi::Object md = Napi::Object::New(env), types = Napi::Object::New(env);
    for (const GgufKv& kv : file->kvs()) {
      uint64_t pos = kv.value_offset;
      md.Set(kv.key, ToJs(env, file->bytes(), &pos, kv.type));
      types.Set(kv.key, TypeString(file->bytes(), kv.value_offset, kv.type));
    }
    o.Set("metadata", md);
    o.Set("metadataTypes", types);
    Napi::Array ts = Napi::Array::New(env, file->tensors().size());
    for (size_t i = 0; i < file->tensors().size(); ++i) {
      const GgufTensorInfo& ti = file->tensors()[i];
      Napi::Object t = Napi::Object::New(env);
      t.Set("name", ti.name);
      Napi::Array dims = Napi::Array::New(env, ti.n_dims);
      for (uint32_t d = 0; d < ti.n_dims; ++d) dims.Set(d, static_cast<double>(ti.dims[d]));
      t.Set("dims", dims);
      t.Set("typeId", ti.type);
      t.Set("type", GgmlTypeInfo(ti.type)->name);
      t.Set("offset", static_cast<double>(ti.offset));
      t.Set("bytes", static_cast<double>(ti.bytes));
      t.Set("elements", static_cast<double>(ti.elements));
      ts.Set(static_cast<uint32_t>(i), t);
    }
    o.Set("tensors", ts);
    return o;
  }
  Napi::FunctionReference* ctor = nullptr;
};

Napi::Value GgufOpen(Addon& addon, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString())
    throw MakeError(env, codes::kInvalidArgument, "gguf.read(path): path must be a string");
  auto job = std::make_unique<GgufOpenJob>();
  job->path = info[0].As<Napi::String>();
  job->ctor = &addon.Class("GgufHandle");
  job->threads = 1;  // reads the file's header on one thread
  return addon.Start(env, std::move(job));
}

}  // namespace

bool IsGgufHandle(Addon& addon, Napi::Value v) {
  return v.IsObject() && v.As<Napi::Object>().InstanceOf(addon.Class("GgufHandle").Value());
}

std::shared_ptr<const GgufFile> UnwrapGgufHandle(Addon& addon, Napi::Value v, const char* where) {
  if (!IsGgufHandle(addon, v))
    throw MakeError(v.Env(), codes::kInvalidArgument, std::string(where) + ": expected a GGUF file handle");
  std::shared_ptr<const GgufFile> f = GgufHandle::Unwrap(v.As<Napi::Object>())->file;
  if (!f) throw MakeError(v.Env(), codes::kDisposed, std::string(where) + ": the GGUF file has been disposed");
  return f;
}

void RegisterGgufBindings(Napi::Env env, Napi::Object exports, Addon& addon) {
  addon.Class("GgufHandle") = Napi::Persistent(GgufHandle::Define(env));
  addon.Export(env, exports, "ggufOpen", GgufOpen);
}

}  // namespace sonde
