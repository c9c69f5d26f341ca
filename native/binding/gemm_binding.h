#pragma once
#include <napi.h>

#include <memory>

#include "ops/gemm.h"

namespace sonde {

// JS handle of packed GEMM weights. The weights are shared with running jobs, so dispose() during
// a run frees them only when that run finishes.
class PackedGemmHandle : public Napi::ObjectWrap<PackedGemmHandle> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit PackedGemmHandle(const Napi::CallbackInfo& info);
  ~PackedGemmHandle() override;
  void Adopt(Napi::Env env, std::shared_ptr<const PackedGemmWeights> w);
  std::shared_ptr<const PackedGemmWeights> weights() const { return weights_; }

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  void Release(Napi::Env env);
  std::shared_ptr<const PackedGemmWeights> weights_;
  int64_t reported_bytes_ = 0;
};

}  // namespace sonde
