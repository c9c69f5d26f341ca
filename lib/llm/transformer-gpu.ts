/**
 * The transformer on a GPU (native/ops/llm_gpu.h, binding native/binding/llm_gpu_binding.cc): the
 * same LlmEngine as lib/llm/transformer.ts (validation, packing, sequences and the per-pool step
 * chain are that file's), with the weights uploaded to device memory once at load and the KV
 * pools' blocks in device memory. A step crosses the bus with its token ids, positions and block
 * tables, and comes back with the requested logits rows only.
 */
import { native, type NativeCancelToken, type NativeGpuLlmModel, type NativeKvPool } from '../binding.js';
import { InvalidArgumentError, UnsupportedOperatorError, callNative, fromNative } from '../errors.js';
import { withSignal } from '../lifetime.js';
import { checkOptions, checkSignal, describe } from '../validate.js';
import { configFromGguf, tensorIndexTable } from './arch.js';
import type { ChainSampling, KvDtype, LlmEngine, ModelConfig } from './engine.js';
import { read, type GgufFile } from './gguf.js';
import { transformerWithBackend, type PackedStep, type TransformerBackend } from './transformer.js';

/** The GPU runtime's device id (lib/cuda/runtime.ts: GpuDeviceId). */
export type GpuTransformerDevice = 'emulated' | `cuda:${number}`;

export interface GpuTransformerOptions {
  device: GpuTransformerDevice;
  /** Aborts the weights' upload (between layers). */
  signal?: AbortSignal;
}

/** A transformer engine whose weights and pools are in device memory. */
export type GpuTransformer = LlmEngine & { readonly gpu: string | undefined; readonly deviceBytes: number };

const OPTION_KEYS = ['device', 'signal'] as const;
const ARCHITECTURES: ReadonlySet<string> = new Set(['llama', 'qwen2', 'qwen2moe', 'deepseek2']);
/** The GPU MoE routing's most experts (native/kernels/moe/cuda/moe.cu: kMaxExperts). */
const MAX_EXPERTS = 1024;
const TENSOR_TYPES: ReadonlySet<string> = new Set(['f32', 'f16', 'bf16', 'q8_0', 'q4_0']);
/** The GPU prefill attention's largest head (native/kernels/attention/cuda/prefill.cu). */
const MAX_HEAD_DIM = 256;
/** The GPU MLA attention's widest cached row, latent + rope key (native/kernels/attention/cuda/decode.cu). */
const MAX_MLA_ROW = 576;

/**
 * What of this model the GPU transformer does not run, one entry per reason ('architecture
 * qwen2moe', 'tensor type q4_1 (blk.0.attn_q.weight)'); empty when it runs all of it. LanguageModel
 * routes a model with any of these through placeWithoutCuda.
 */
export function gpuUnsupported(file: GgufFile, config: ModelConfig): string[] {
  const out: string[] = [];
  if (!ARCHITECTURES.has(config.architecture)) out.push(`architecture ${config.architecture}`);
  else if (config.expertCount > MAX_EXPERTS) out.push(`mixture-of-experts layers of ${config.expertCount} experts (the GPU routes up to ${MAX_EXPERTS})`);
  if (config.mla) {
    const row = config.mla.kvLoraRank + config.mla.ropeDim;
    if (row > MAX_MLA_ROW) out.push(`latent attention rows of ${row} (the GPU attention takes up to ${MAX_MLA_ROW})`);
  } else if (config.headDim > MAX_HEAD_DIM) {
    out.push(`head dimension ${config.headDim} (the GPU attention takes up to ${MAX_HEAD_DIM})`);
  }
  const seen = new Set<string>();
  for (const t of file.tensors) {
    if (!TENSOR_TYPES.has(t.type) && !seen.has(t.type)) {
      seen.add(t.type);
      out.push(`tensor type ${t.type} (${t.name})`);
    }
  }
  return out;
}

class GpuBackend implements TransformerBackend {
  readonly gpu: string;
  readonly deviceBytes: number;
  readonly #model: NativeGpuLlmModel;
  constructor(model: NativeGpuLlmModel, device: string) {
    this.#model = model;
    this.gpu = device;
    this.deviceBytes = model.info().bytes ?? 0;
  }
  get handle(): NativeGpuLlmModel { return this.#model; }
  createPool(blockSize: number, maxBlocks: number, dtype: KvDtype, reserve: number): NativeKvPool {
    return native().llmGpuKvPoolCreate(this.#model, blockSize, maxBlocks, dtype, reserve);
  }
  step(pool: NativeKvPool, p: PackedStep, logits: Float32Array, token: NativeCancelToken | undefined): Promise<void> {
    return native().llmGpuKvPoolStep(this.#model, pool, p.tokens, p.meta, p.tables, p.copies, logits, token);
  }
  stepChain(pool: NativeKvPool, p: PackedStep, steps: number, chosen: Int32Array, sampling: ChainSampling | undefined,
    rngOut: Uint32Array | undefined, token: NativeCancelToken | undefined): Promise<void> {
    return native().llmGpuKvPoolStepChain(this.#model, pool, p.tokens, p.meta, p.tables, p.copies, steps, chosen,
      sampling?.params ?? null, sampling?.rng ?? null, rngOut ?? null, token);
  }
  read(pool: NativeKvPool, ids: Int32Array, out: Uint8Array): Promise<void> { return native().llmGpuKvPoolRead(pool, ids, out); }
  write(pool: NativeKvPool, ids: Int32Array, bytes: Uint8Array): Promise<void> { return native().llmGpuKvPoolWrite(pool, ids, bytes); }
  prepare(): Promise<void> { return Promise.resolve(); }
  dispose(): void { this.#model.dispose(); }
}

function parseOptions(where: string, options: GpuTransformerOptions | undefined): { device: GpuTransformerDevice; signal?: AbortSignal } {
  if (options === undefined) throw new InvalidArgumentError(`${where}: options.device is required`);
  const o = checkOptions<GpuTransformerOptions>(where, options, OPTION_KEYS);
  const device = o.device;
  if (device !== 'emulated' && !(typeof device === 'string' && /^cuda:\d{1,4}$/.test(device))) {
    throw new InvalidArgumentError(`${where}: options.device must be 'cuda:N' or 'emulated', got ${describe(device)}`);
  }
  const signal = checkSignal(`${where}: options.signal`, o.signal);
  return signal ? { device, signal } : { device };
}

/**
 * Builds the GPU transformer over an open GGUF file. ownsFile: the engine's dispose() disposes the
 * file (else it stays the caller's, to dispose after the engine). Throws UnsupportedOperatorError
 * naming what the GPU path does not run (gpuUnsupported), OutOfMemoryError naming the device and
 * the tensor that did not fit.
 */
export async function gpuTransformerFromFile(file: GgufFile, options: GpuTransformerOptions, ownsFile = false): Promise<GpuTransformer> {
  const where = 'gpuTransformerFromFile(file, options)';
  const site = new Error();
  const o = parseOptions(where, options);
  const config = configFromGguf(file);
  const unsupported = gpuUnsupported(file, config);
  if (unsupported.length > 0) {
    throw new UnsupportedOperatorError(`${where}: the GPU transformer does not run ${unsupported.join(', ')}`);
  }
  const table = tensorIndexTable(file, config);
  // The CPU model validates every tensor (one set of checks for both devices); the upload reads its
  // views of the mapping, and it is not needed afterwards.
  let cpu;
  try {
    cpu = native().llmModelCreate(file.handle('gpuTransformerFromFile'), { ...config }, table);
  } catch (err) {
    throw fromNative(err, site);
  }
  let model: NativeGpuLlmModel;
  try {
    model = await callNative(() => withSignal(o.signal, (token) => native().llmGpuModelCreate(cpu, o.device, token)), site);
  } finally {
    cpu.dispose();
  }
  return transformerWithBackend(file, config, new GpuBackend(model, o.device), ownsFile);
}

/** Maps the GGUF at `path` and builds its GPU transformer; dispose() of the engine unmaps the file. */
export async function loadGpuTransformer(path: string, options: GpuTransformerOptions): Promise<GpuTransformer> {
  parseOptions('loadGpuTransformer(path, options)', options);
  const file = await read(path);
  try {
    return await gpuTransformerFromFile(file, options, true);
  } catch (err) {
    file.dispose();
    throw err;
  }
}
