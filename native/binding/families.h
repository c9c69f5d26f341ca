// Each kernel family's binding file defines one Register function; Addon's constructor calls them
// all. A new family adds its declaration here and one call in addon.cc.
#pragma once
#include <napi.h>

namespace sonde {

class Addon;

void RegisterGemmBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterElementwiseBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterGemmLowpBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterConvBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterGgufBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterQuantBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterSparseBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterMoeBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterPlanBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterLlmBindings(Napi::Env env, Napi::Object exports, Addon& addon);
void RegisterGpuBindings(Napi::Env env, Napi::Object exports, Addon& addon);

}  // namespace sonde
