// What the language model's GPU binding (llm_gpu_binding.cc) shares with its CPU one
// (llm_binding.cc): the CPU model handle, which validated the file, and a step's unmarshalling.
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "binding/addon.h"
#include "ops/kv_pool.h"
#include "ops/llm.h"

namespace sonde {

// The model behind an llmModelCreate handle; throws a JS error (invalid or disposed).
std::shared_ptr<const LlmModel> UnwrapLlmModel(Addon& addon, Napi::Value v, const char* where);

// A step as lib/llm/transformer.ts packs it (tokens, meta [tableLength, start, tokenCount, logits]
// per sequence, tables, copies); throws ERR_SONDE_INVALID_ARGUMENT for inconsistent metadata.
void UnpackKvStep(Napi::Env env, Napi::Int32Array tokens, Napi::Int32Array meta, Napi::Int32Array tables,
                  Napi::Int32Array copies, KvStep* st);

// kvPoolRead/Write's arguments on a CPU or GPU pool: (pool, ids: Int32Array, bytes: Uint8Array), every
// id in [0, max_blocks), no id twice when writing, bytes of exactly ids.length blocks. Throws
// ERR_SONDE_INVALID_ARGUMENT naming the argument; returns the ids and the largest (-1 when none).
int64_t CheckBlockTransfer(const Napi::CallbackInfo& info, const char* where, size_t max_blocks, size_t block_bytes,
                           bool write, std::vector<int32_t>* ids);

// A chained step's own arguments (kvPoolStepChain, llmGpuKvPoolStepChain) from info[first]:
// (steps, chosen: Int32Array of steps x sequences, params: Float64Array of sequences x 4 | null,
// rng: Uint32Array of sequences x 4 | null, rngOut: Uint32Array of steps x sequences x 4 | null),
// checked against the step (every sequence one decode token whose logits are wanted) and the
// vocabulary; params as lib/llm/transformer.ts checks them (ops/chain_sampling.h). The typed
// arrays stay the caller's to keep alive. ChainSteps reads steps alone (the step's validation
// needs it first), and UnpackChainArgs takes what it read.
size_t ChainSteps(const Napi::CallbackInfo& info, size_t first, const char* where);
KvChain UnpackChainArgs(const Napi::CallbackInfo& info, size_t first, const char* where, const KvStep& step, size_t vocab,
                        size_t steps);

// Registered by RegisterLlmBindings.
void RegisterLlmGpuBindings(Napi::Env env, Napi::Object exports, Addon& addon);

}  // namespace sonde
