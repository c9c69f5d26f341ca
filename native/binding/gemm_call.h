// Unmarshalling shared by every GEMM-shaped binding (fp32 and low-precision GEMM, and later SpMM and
// convolutions on the GEMM): fn(a, weights, out, options) with the options object of
// lib/binding.ts NativeGemmOptions. Second line of validation only: lib/ checks everything first
// and names the user's parameter; these checks guarantee that no call through the binding can
// read or write out of bounds.
#pragma once
#include <napi.h>

#include <cstddef>

#include "binding/addon.h"
#include "kernels/gemm/gemm.h"

namespace sonde {

Napi::Float32Array F32Value(Napi::Env env, Napi::Value v, const char* where, const char* name);
size_t SizeValue(Napi::Env env, Napi::Value v, const char* where, const char* name);
// Elements a rows x cols matrix with leading dimension ld spans (0 when empty); false when ld <
// cols or the span overflows.
bool SpanOf(size_t rows, size_t cols, size_t ld, size_t* out);

struct GemmCall {
  size_t m = 0, k = 0, n = 0, lda = 0, ldc = 0;
  const float* a = nullptr;
  float* c = nullptr;
  kernels::GemmEpilogue epilogue{nullptr, nullptr, nullptr, 0, kernels::kActNone, 0, 0.0f, 0.0f};
};

// Reads m, k, n, lda, ldc, the epilogue (bias, scale, residual + ldr, activation, alpha, beta,
// residualBeforeActivation), threads and cancel from info[3]; checks a = info[0] and out = info[2];
// keeps every array it reads alive through `job` and sets job->threads and job->cancel. The
// weights (info[1]) and the variant are the caller's.
GemmCall ParseGemmCall(Addon& addon, const Napi::CallbackInfo& info, const char* where, AsyncJob* job);

}  // namespace sonde
