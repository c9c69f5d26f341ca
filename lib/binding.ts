/**
 * The one typed contract for everything the .node exports, and the loader. Nothing outside lib/
 * sees these raw functions; public classes wrap them.
 */
import { createRequire } from 'node:module';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NativeLoadError } from './errors.js';
import type { PlanSpec } from './session/plan.js';

export interface NativeCpuInfo {
  model: string;
  arch: string;
  cores: number;
  simd: 'scalar' | 'avx2' | 'avx512';
  simdDetected: 'scalar' | 'avx2' | 'avx512';
  features: string[];
  bf16: boolean;
  vnni: boolean;
  caches: { l1d: number; l2: number; l3: number };
}

export interface NativeCudaDevice {
  index: number;
  name: string;
  totalMemory: number;
  freeMemory: number;
  computeCapability: string;
  multiprocessors: number;
}

export interface NativeCudaInfo {
  compiled: boolean;
  runtimeVersion: number;
  driverVersion: number;
  devices: NativeCudaDevice[];
  reason?: string;
}

export interface NativeGpuDeviceInfo {
  id: string;
  name: string;
  emulated: boolean;
  totalMemory: number;
  computeCapability: string;
  multiprocessors: number;
  sharedPerBlock: number;
  /** Bytes of the device's pool held by live buffers, and cached for reuse. */
  inUse: number;
  cached: number;
}

/** Device memory (native/binding/gpu_binding.cc). */
export interface NativeGpuBuffer {
  dispose(): void;
  info(): { disposed: boolean; bytes?: number; device?: string };
}

export interface NativePackedGemm {
  dispose(): void;
  info(): { disposed: boolean; k?: number; n?: number; bytes?: number; variant?: string; ukernel?: string };
}

/** Low-precision packed weights (native/binding/gemm_lowp_binding.cc). */
export interface NativePackedGemmLowp {
  dispose(): void;
  info(): {
    disposed: boolean; k?: number; n?: number; bytes?: number; precision?: NativeGemmLowPrecision;
    variant?: NativeGemmLowpVariant; ukernel?: string; activations?: 'fp32' | 'bf16' | 'u8';
  };
}

/** Sparse weights (native/binding/sparse_binding.cc). */
export interface NativeSparseWeights {
  dispose(): void;
  info(): {
    disposed: boolean; format?: 'csr' | 'bsr'; k?: number; n?: number; nnz?: number; bytes?: number;
    blockWidth?: number; blocks?: number; ukernel?: string;
    /** CSR: the microkernel of column-major (NCHW) spmm steps. */
    columnsUkernel?: string;
  };
}

export type NativeGemmLowPrecision = 'bf16' | 'fp16' | 'int8';
export type NativeGemmLowpVariant = NativeGemmVariant | 'avx512bf16' | 'avx512vnni' | 'amx';

export interface NativeCancelToken {
  cancel(): void;
}

export interface NativeGemmOptions {
  m: number; k: number; n: number; lda: number; ldc: number;
  bias?: Float32Array; scale?: Float32Array; residual?: Float32Array; ldr?: number;
  /** GemmActivation code (native/kernels/gemm/gemm.h). */
  activation: number; alpha: number; beta: number; residualBeforeActivation: boolean;
  variant: NativeGemmVariant; threads: number; cancel?: NativeCancelToken;
}

export type NativeGemmVariant = 'auto' | 'reference' | 'scalar' | 'avx2' | 'avx512';
export type NativeConvVariant = NativeGemmVariant | 'avx512bf16' | 'amx';

/** Window of a conv or pooling: kernel [kh, kw], strides, dilations, pads [t, l, b, r], autoPad 0 NOTSET, 1 SAME_UPPER, 2 SAME_LOWER, 3 VALID. */
export interface NativeWindow {
  kernel: [number, number]; strides: [number, number]; dilations: [number, number];
  pads: [number, number, number, number]; autoPad: number;
}

export interface NativeConvCreateOptions extends NativeWindow {
  cOut: number; cIn: number; group: number;
  bias?: Float32Array; bnScale?: Float32Array; bnBias?: Float32Array; bnMean?: Float32Array; bnVariance?: Float32Array;
  bnEpsilon: number;
  /** GemmActivation code (native/kernels/gemm/gemm.h). */
  activation: number; alpha: number; beta: number;
  precision: 'fp32' | 'bf16'; variant: NativeConvVariant;
}

/** A created convolution (native/binding/conv_binding.cc). */
export interface NativeConvHandle {
  dispose(): void;
  info(): { disposed: boolean; bytes?: number; path?: 'gemm' | 'direct' | 'depthwise' | 'reference'; ukernel?: string;
    variant?: Exclude<NativeConvVariant, 'auto'>; precision?: 'fp32' | 'bf16';
    /**
     * Plan steps may give it NCHW16c operands (PlanBlocked): 'x' a blocked x (y either), 'xy' x and y
     * both, 'y' an NCHW x (a stem) with a blocked y (or an NCHW one).
     */
    blocked?: 'x' | 'xy' | 'y';
    /** It also reads and writes bf16 blocked operands (PlanBlocked.bf16): the bf16 direct path. */
    blockedBf16?: boolean };
}
export type NativeElementwiseVariant = 'auto' | 'reference' | 'scalar' | 'avx2' | 'avx512';
export type NativeCastType = 'float32' | 'float16' | 'bfloat16';

/** A mapped GGUF file (native/binding/gguf_binding.cc). */
export interface NativeGgufHandle {
  dispose(): void;
}

export interface NativeGgufOpenResult {
  handle: NativeGgufHandle;
  version: number;
  alignment: number;
  dataOffset: number;
  fileSize: number;
  metadata: Record<string, unknown>;
  metadataTypes: Record<string, string>;
  tensors: { name: string; dims: number[]; typeId: number; type: string; offset: number; bytes: number; elements: number }[];
}

/** A compiled graph plan (native/binding/plan_binding.cc; contract in lib/session/plan.ts). */
export interface NativePlan {
  dispose(): void;
  /** skipZeroRuns[i]: runs in which step i (a batch-1 gemm) skipped zero activations; -1 for other steps. */
  info(): { disposed: boolean; steps?: number; arenaBytes?: number; bytes?: number; skipZeroRuns?: number[] };
}

/** A compiled graph plan on a GPU (native/binding/plan_gpu_binding.cc; contract in lib/session/plan.ts). */
export interface NativeGpuPlan {
  dispose(): void;
  /** deviceBytes: device memory the plan holds while idle (its consts and pooled run arenas). */
  info(): { disposed: boolean; steps?: number; arenaBytes?: number; bytes?: number; deviceBytes?: number; device?: string };
}

export type NativeQuantType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_0';

/** The native transformer (native/binding/llm_binding.cc): immutable, shared by its sequences. */
export interface NativeLlmModel {
  dispose(): void;
  info(): { disposed: boolean; bytes?: number; layers?: number };
}

/** The transformer's weights in device memory (native/binding/llm_gpu_binding.cc). */
export interface NativeGpuLlmModel {
  dispose(): void;
  info(): { disposed: boolean; bytes?: number; layers?: number; device?: string };
}

/**
 * A paged KV pool of one model (native/ops/kv_pool.h): blocks of blockSize positions holding K and V
 * of every layer and KV head; chunks of blocks are allocated as ids are first used and reported to V8.
 */
export interface NativeKvPool {
  dispose(): void;
  /** expertCounts (MoE models): tokens routed to each expert by this pool's steps, [layer * expertCount + expert]. */
  info(): {
    disposed: boolean; bytes?: number; highWaterBytes?: number; blockBytes?: number; chunkBlocks?: number;
    allocatedBlocks?: number; expertCounts?: Float64Array;
    /** The step arena's bytes (absent while a step runs); reportedBytes: what V8 was last told (blocks + arena). */
    arenaBytes?: number; reportedBytes?: number;
  };
}
export type NativeQuantVariant = 'auto' | 'reference' | 'scalar' | 'avx2' | 'avx512' | 'avx512vnni';
export interface NativeMoeWeights { ref: Uint8Array | NativeGgufHandle; index: number; type: NativeQuantType }
export interface NativeMoeSpec {
  dModel: number; nExperts: number; k: number; router: NativeMoeWeights; scoring: 'softmax' | 'sigmoid';
  renormalize: boolean; weightScale: number; selectionBias?: Float32Array; variant: NativeQuantVariant; threads: number;
  /** Group-limited routing (native/ops/moe.h); absent or 1: none. */
  groups?: number; groupsUsed?: number;
  cancel?: NativeCancelToken;
}

export interface NativeBinding {
  readonly version: string;
  readonly CancelToken: new () => NativeCancelToken;
  setThreads(threads: number): void;
  getThreads(): number;
  setThreadAffinity(mode: string): void;
  getThreadAffinity(): { mode: 'auto' | 'on' | 'off'; pinned: boolean; machineBusy: boolean; contended: boolean; cpus: number[][] };
  /** Pool threads held by the jobs in flight in the whole process (every worker_thread's pool). */
  busyThreads(): number;
  /** How long (us) the longest-waiting job of this environment not yet taken by a pool thread has waited; 0: none. */
  startWaitUs(): number;
  /** sched_yield() on the calling thread. */
  yieldCpu(): void;
  /** The time on the pool (ms) of the job this environment settled last. */
  lastJobMs(): number;
  /** V8's total of external memory in this isolate (every addon's reports and ArrayBuffers). */
  externalMemory(): number;
  /** The native memory sonde reports to V8 in this environment (handles and output buffers). */
  nativeMemory(): number;
  /** Tests: run counts of `loops` consecutive homed ParallelFor loops of n indices (see addon.cc). */
  homedProbe(n: number, loops: number, throwAt: number): Int32Array;
  /** An ArrayBuffer of `bytes` from the output BufferPool (contents unspecified). */
  allocBuffer(bytes: number): ArrayBuffer;
  bufferPoolStats(): { cachedBytes: number };
  cpuInfo(): NativeCpuInfo;
  cudaInfo(): NativeCudaInfo;
  /** Writes the GEMM (with its epilogue) into out; see native/binding/gemm_binding.cc. */
  gemm(a: Float32Array, b: Float32Array | NativePackedGemm, out: Float32Array, options: NativeGemmOptions): Promise<void>;
  packGemmWeights(b: Float32Array, k: number, n: number, variant: Exclude<NativeGemmVariant, 'reference'>): NativePackedGemm;
  /** out (the broadcast shape, row-major) = a op b; op: 0 add, 1 sub, 2 mul, 3 div. */
  elementwiseBinary(
    op: number, a: Float32Array, aDims: readonly number[], b: Float32Array, bDims: readonly number[],
    out: Float32Array, variant: NativeElementwiseVariant, threads: number, cancel?: NativeCancelToken,
  ): Promise<void>;
  /** op: 0 gelu (erf), 1 gelu (tanh), 2 silu, 3 sigmoid, 4 tanh, 5 exp, 6 relu. */
  elementwiseUnary(op: number, x: Float32Array, out: Float32Array, variant: NativeElementwiseVariant, threads: number,
    cancel?: NativeCancelToken): Promise<void>;
  /** axis in [0, dims.length). */
  softmax(x: Float32Array, dims: readonly number[], axis: number, out: Float32Array, variant: NativeElementwiseVariant,
    threads: number, cancel?: NativeCancelToken): Promise<void>;
  /** Normalises each of `rows` contiguous rows of n; gamma and beta hold n. */
  layerNorm(x: Float32Array, rows: number, n: number, gamma: Float32Array | null, beta: Float32Array | null,
    epsilon: number, out: Float32Array, variant: NativeElementwiseVariant, threads: number,
    cancel?: NativeCancelToken): Promise<void>;
  rmsNorm(x: Float32Array, rows: number, n: number, gamma: Float32Array | null, beta: null, epsilon: number,
    out: Float32Array, variant: NativeElementwiseVariant, threads: number, cancel?: NativeCancelToken): Promise<void>;
  /** out holds one index per slice along axis (dims[axis] >= 1). */
  argmax(x: Float32Array, dims: readonly number[], axis: number, out: BigInt64Array, threads: number,
    cancel?: NativeCancelToken): Promise<void>;
  /** values/indices have dims with dims[axis] replaced by k. */
  topK(x: Float32Array, dims: readonly number[], axis: number, k: number, largest: boolean, values: Float32Array,
    indices: BigInt64Array, threads: number, cancel?: NativeCancelToken): Promise<void>;
  /**
   * Token sampling (llm/sampling.ts), synchronous: the first index of the largest value of x (NaN
   * never wins; 0 when none exceeds -Infinity). x holds at least one value.
   */
  sampleArgmax(x: Float32Array, variant: NativeElementwiseVariant): number;
  /**
   * Writes the min(k, non-NaN count) best ids of x (larger value then lower id first) to out[0..)
   * and returns how many; 1 <= k <= x.length, k <= out.length.
   */
  sampleTopK(x: Float32Array, k: number, out: Int32Array, variant: NativeElementwiseVariant): number;
  /** Sum of exp(x[i] - max) over the non-NaN x[i], in double (top-p's normaliser). */
  sampleExpSum(x: Float32Array, max: number, variant: NativeElementwiseVariant): number;
  /** Every non-NaN id of x, larger value then lower id first, into out[0..) (out.length >= x.length); returns how many. */
  sampleRank(x: Float32Array, out: Int32Array): number;
  /** float32 as Float32Array, float16/bfloat16 as raw bits in a Uint16Array. */
  cast(x: Float32Array | Uint16Array, from: NativeCastType, out: Float32Array | Uint16Array, to: NativeCastType,
    variant: NativeElementwiseVariant, threads: number, cancel?: NativeCancelToken): Promise<void>;
  /** gemm() with low-precision packed weights; same options (variant: 'auto', 'reference' or the packed one). */
  gemmLowp(a: Float32Array, b: NativePackedGemmLowp, out: Float32Array, options: Omit<NativeGemmOptions, 'variant'> & { variant: NativeGemmLowpVariant }): Promise<void>;
  /** Packs (and rounds / quantises) B once for a low-precision kernel. */
  packGemmWeightsLowp(b: Float32Array, k: number, n: number, precision: NativeGemmLowPrecision,
    variant: Exclude<NativeGemmLowpVariant, 'reference'>): NativePackedGemmLowp;
  /** Validates, folds BN into and packs the weights ([cOut, cIn/group, kh, kw]) once. */
  createConv(weights: Float32Array, options: NativeConvCreateOptions): NativeConvHandle;
  /** out ([N, cOut, OH, OW]) = the convolution of x ([N, C, H, W]) with its fused epilogue. */
  convRun(handle: NativeConvHandle, x: Float32Array, dims: readonly number[], out: Float32Array,
    options: { residual?: Float32Array; residualBeforeActivation: boolean; threads: number; cancel?: NativeCancelToken }): Promise<void>;
  /** kind 0 max, 1 average, 2 global average (window fields ignored) over NCHW planes. */
  pool2d(kind: 0 | 1 | 2, x: Float32Array, dims: readonly number[], out: Float32Array,
    options: NativeWindow & { countIncludePad: boolean; variant: NativeConvVariant; threads: number; cancel?: NativeCancelToken }): Promise<void>;
  /** Maps and validates a GGUF file on the pool; rejects with ERR_SONDE_MODEL_FORMAT. */
  ggufOpen(path: string): Promise<NativeGgufOpenResult>;
  /** out[m, n] = x[m, k] . W^T; W is n rows of k `type` values: bytes, or tensor `index` of a GGUF handle. */
  quantMatmul(x: Float32Array, weights: Uint8Array | NativeGgufHandle, index: number, out: Float32Array,
    options: { m: number; k: number; n: number; type: NativeQuantType; variant: NativeQuantVariant; threads: number;
      algorithm?: 'auto' | 'gemv' | 'gemm' | 'repacked'; cancel?: NativeCancelToken }): Promise<void>;
  /** out[n, k] = W dequantised. */
  quantDequantize(weights: Uint8Array | NativeGgufHandle, index: number, out: Float32Array,
    options: { k: number; n: number; type: NativeQuantType; threads: number; cancel?: NativeCancelToken }): Promise<void>;
  /** y = MoE(x) (native/ops/moe.h); x and out are [tokens, dModel]; stacked expert weights hold nExperts * rows rows. */
  moe(x: Float32Array, out: Float32Array, spec: NativeMoeSpec & {
    tokens: number; dFf: number; gate: NativeMoeWeights; up: NativeMoeWeights; down: NativeMoeWeights;
    shared?: { dFf: number; gate: NativeMoeWeights; up: NativeMoeWeights; down: NativeMoeWeights; gateInput?: NativeMoeWeights };
    capacityFactor: number;
  }): Promise<{ expertCounts: number[]; dropped: number }>;
  /** Routing only: ids/weights [tokens, k] (descending score), scores [tokens, nExperts]. */
  moeRoute(x: Float32Array, ids: Int32Array, weights: Float32Array, scores: Float32Array,
    spec: NativeMoeSpec & { tokens: number }): Promise<void>;
  /** Dense B [k, n] to sparse; blockWidth 0 = the default for this CPU. */
  toSparse(b: Float32Array, k: number, n: number, format: 'csr' | 'bsr' | 'auto', blockWidth: number): NativeSparseWeights;
  /** CSR of W = B^T: rows = n, cols = k. */
  sparseFromCsr(rows: number, cols: number, rowPtr: Uint32Array, colIdx: Uint32Array, values: Float32Array): NativeSparseWeights;
  /**
   * gemm() with sparse weights: same options. columns: A, C and the residual stored column-major
   * (a: k rows of lda >= m; out, residual: n rows of ldc, ldr >= m; CSR weights only), the layout a
   * 1x1 conv's NCHW images have; scale/bias stay per output column.
   */
  spmm(a: Float32Array, w: NativeSparseWeights, out: Float32Array, options: NativeGemmOptions & { columns?: boolean }): Promise<void>;
  /**
   * Validates a PlanSpec (every ref and strided walk in bounds, every handle live) and builds the
   * immutable native plan; throws ERR_SONDE_INTERNAL naming the step if the spec is inconsistent,
   * ERR_SONDE_DISPOSED if a step's conv or GEMM handle has been disposed. Const data is copied once
   * here; the plan holds its own references to the handles, so disposing them later is safe.
   */
  createPlan(spec: PlanSpec): NativePlan;
  /**
   * Runs every step in order on the pool; checks cancel between steps (rejects ERR_SONDE_ABORTED).
   * inputs[i] / outputs[i] must have spec.inputBytes[i] / outputBytes[i] bytes. A data-dependent
   * step failure rejects ERR_SONDE_INVALID_ARGUMENT with "node '<name>': <why>". timings, when
   * given (length = steps), receives each step's wall time in nanoseconds. Resolves to the run's
   * time on the pool (ms, from the pool thread taking it to its end).
   */
  planRun(plan: NativePlan, inputs: ArrayBufferView[], outputs: ArrayBufferView[], threads: number,
    cancel?: NativeCancelToken, timings?: Float64Array): Promise<number>;
  /**
   * createPlan for a GPU ('cuda:N' or 'emulated'): the same checks, then every step bound to a
   * registered GPU op and the consts uploaded once. A CPU-only step (conv/gemm/spmm on CPU handles,
   * reorder) or a missing op is ERR_SONDE_INTERNAL naming the step; out of device memory is
   * ERR_SONDE_OUT_OF_MEMORY naming the device and the request.
   */
  createGpuPlan(device: string, spec: PlanSpec): NativeGpuPlan;
  /**
   * Uploads inputs, runs every step on one stream of the plan's device, downloads outputs. Cancel
   * is checked between steps; data-dependent failures reject ERR_SONDE_INVALID_ARGUMENT with
   * "node '<name>': <why>", as planRun. timings receives each step's device time in nanoseconds.
   */
  gpuPlanRun(plan: NativeGpuPlan, inputs: ArrayBufferView[], outputs: ArrayBufferView[], cancel?: NativeCancelToken,
    timings?: Float64Array): Promise<void>;
  /**
   * Builds the transformer over a mapped GGUF: config is lib/llm/arch.ts's ModelConfig, indices its
   * tensor table (lib/llm/arch.ts: tensorIndexTable). Throws ERR_SONDE_MODEL_FORMAT naming a
   * missing / mistyped / misshapen tensor, ERR_SONDE_UNSUPPORTED_OPERATOR for what is not wired.
   */
  llmModelCreate(gguf: NativeGgufHandle, config: object, indices: Int32Array): NativeLlmModel;
  /**
   * The model's load work that needs the pool, once (q8_0 weights repacked for the avx512vnni
   * kernels); a step runs it first otherwise. threads: at most this many pool threads (0: all).
   */
  llmModelPrepare(model: NativeLlmModel, threads: number): Promise<void>;
  /**
   * A KV pool for the model; reserveBlocks blocks are allocated at once (a private sequence's whole
   * cache), the rest as steps first use them. Throws ERR_SONDE_INVALID_ARGUMENT for sizes out of
   * range, ERR_SONDE_OUT_OF_MEMORY when the reserve cannot be allocated.
   */
  kvPoolCreate(model: NativeLlmModel, blockSize: number, maxBlocks: number, dtype: 'f32' | 'f16', reserveBlocks: number): NativeKvPool;
  /**
   * One batched step (lib/llm/engine.ts: KvPool.step). meta: per sequence [tableLength, start,
   * tokenCount, logits (0 none, 1 last, 2 all)]; tokens and tables: every sequence's, concatenated;
   * copies: [src, dst] pairs done first; logits: [rows requested x vocab]. Rejects
   * ERR_SONDE_INVALID_ARGUMENT (naming the sequence and field) before any work, ERR_SONDE_ABORTED
   * when cancelled.
   */
  kvPoolStep(model: NativeLlmModel, pool: NativeKvPool, tokens: Int32Array, meta: Int32Array, tables: Int32Array,
    copies: Int32Array, logits: Float32Array, threads: number, cancel?: NativeCancelToken): Promise<void>;
  /**
   * `steps` chained decode steps in one job (KvPool.stepChain): as llmGpuKvPoolStepChain, each
   * token chosen on the pool's thread (ops/chain_sampling.h) between RunSteps.
   */
  kvPoolStepChain(model: NativeLlmModel, pool: NativeKvPool, tokens: Int32Array, meta: Int32Array, tables: Int32Array,
    copies: Int32Array, steps: number, chosen: Int32Array, params: Float64Array | null, rng: Uint32Array | null,
    rngOut: Uint32Array | null, threads: number, cancel?: NativeCancelToken): Promise<void>;
  /** Copies blocks ids[i] to out[i * blockBytes ...]. */
  kvPoolRead(pool: NativeKvPool, ids: Int32Array, out: Uint8Array): Promise<void>;
  /** Copies bytes[i * blockBytes ...] into blocks ids[i] (ids distinct). */
  kvPoolWrite(pool: NativeKvPool, ids: Int32Array, bytes: Uint8Array): Promise<void>;
  /**
   * Kernel test entry: the normalised attention output of query q against n rows of K/V (f32:
   * Float32Array, f16: Uint16Array of IEEE halves), folded span rows per call of the chosen kernel.
   */
  kvAttention(q: Float32Array, k: Float32Array | Uint16Array, v: Float32Array | Uint16Array, headDim: number, n: number,
    span: number, dtype: 'f32' | 'f16', variant: 'scalar' | 'avx2' | 'avx512'): Promise<Float32Array>;
  /**
   * The transformer on a GPU (native/ops/llm_gpu.h): uploads the weights of a model llmModelCreate
   * validated (which the caller may dispose afterwards). Rejects ERR_SONDE_OUT_OF_MEMORY naming the
   * device and the tensor, ERR_SONDE_UNSUPPORTED_OPERATOR for what the GPU path does not run.
   */
  llmGpuModelCreate(model: NativeLlmModel, device: string, cancel?: NativeCancelToken): Promise<NativeGpuLlmModel>;
  /** kvPoolCreate's GPU twin: blocks in device memory, in the CPU pool's layout. */
  llmGpuKvPoolCreate(model: NativeGpuLlmModel, blockSize: number, maxBlocks: number, dtype: 'f32' | 'f16', reserveBlocks: number): NativeKvPool;
  /** kvPoolStep's GPU twin (no threads: the step runs on the device). */
  llmGpuKvPoolStep(model: NativeGpuLlmModel, pool: NativeKvPool, tokens: Int32Array, meta: Int32Array, tables: Int32Array,
    copies: Int32Array, logits: Float32Array, cancel?: NativeCancelToken): Promise<void>;
  /**
   * `steps` chained decode steps (ops/llm_gpu.h: StepChain): every sequence one token with its
   * logits wanted, tables covering start + steps; chosen receives steps x sequences ids; with params
   * ([seq][4] f64) and rng ([seq][4]) they are drawn as sampling.ts's Sampler does, rngOut receiving
   * the states after each step ([step][seq][4]); without (nulls), the argmax.
   */
  llmGpuKvPoolStepChain(model: NativeGpuLlmModel, pool: NativeKvPool, tokens: Int32Array, meta: Int32Array, tables: Int32Array,
    copies: Int32Array, steps: number, chosen: Int32Array, params: Float64Array | null, rng: Uint32Array | null,
    rngOut: Uint32Array | null, cancel?: NativeCancelToken): Promise<void>;
  llmGpuKvPoolRead(pool: NativeKvPool, ids: Int32Array, out: Uint8Array): Promise<void>;
  llmGpuKvPoolWrite(pool: NativeKvPool, ids: Int32Array, bytes: Uint8Array): Promise<void>;
  /** A GPU device (runtime/cuda/gpu.h): 'cuda:N' or 'emulated'; throws ERR_SONDE_DEVICE_UNAVAILABLE. */
  gpuDevice(id: string): NativeGpuDeviceInfo;
  /** Device memory from the device's caching pool; throws ERR_SONDE_OUT_OF_MEMORY naming `what`. */
  gpuAlloc(id: string, bytes: number, what: string): NativeGpuBuffer;
  /** Copies data's bytes to (toDevice) or from the buffer at offset. */
  gpuCopy(buffer: NativeGpuBuffer, offset: number, data: ArrayBufferView, toDevice: boolean): Promise<number>;
  /** Runs a registered GPU op; with reps > 0 also times reps more runs and resolves to ms per run. */
  gpuRun(id: string, op: string, buffers: NativeGpuBuffer[], params: Record<string, number | boolean>, reps?: number,
    graph?: boolean): Promise<number>;
  /** Registered op names of the emulated or the real-device build. */
  gpuOps(emulated: boolean): string[];
  gpuTrim(id: string): void;
  peakFma(simd: 'scalar' | 'avx2' | 'avx512', threads: number, seconds: number): Promise<{ flops: number; seconds: number; threads: number; simd: string }>;
  readBandwidth(bytes: number, threads: number): Promise<{ bytes: number; seconds: number; threads: number }>;
}

/** The package root: this file is lib/binding.ts in the source tree and dist/binding.js when built. */
export const packageRoot = fileURLToPath(new URL('..', import.meta.url));

function cpuBaselineProblem(): string | undefined {
  // The binary targets x86-64-v2. Loading it on an older CPU would die with SIGILL inside the
  // loader, so check /proc/cpuinfo first and fail with an error instead.
  if (process.platform !== 'linux' || process.arch !== 'x64') return undefined;
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    const flags = /^flags\s*:(.*)$/m.exec(info)?.[1]?.split(/\s+/) ?? [];
    const missing = ['sse4_2', 'popcnt', 'ssse3'].filter((f) => !flags.includes(f));
    return missing.length ? `this CPU lacks ${missing.join(', ')}, which sonde's x86-64-v2 baseline needs` : undefined;
  } catch {
    return undefined;
  }
}

function describeCandidates(root: string): string[] {
  const tried = [join(root, 'build', 'Release', 'sonde.node'), join(root, 'build', 'Debug', 'sonde.node')];
  const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  if (existsSync(dir)) for (const f of readdirSync(dir)) tried.push(join(dir, f));
  else tried.push(`${dir}${'/'}*.node (folder missing)`);
  return tried;
}

function load(): NativeBinding {
  const problem = cpuBaselineProblem();
  if (problem) throw new NativeLoadError(`sonde cannot run here: ${problem}.`);
  const require = createRequire(import.meta.url);
  // SONDE_NATIVE_BINARY: an addon file to load instead of the usual search (another build of the
  // same version, e.g. CI's CPU-only build/nocuda/sonde.node).
  const explicit = process.env['SONDE_NATIVE_BINARY'];
  if (explicit) {
    try {
      return require(explicit) as NativeBinding;
    } catch (err) {
      throw new NativeLoadError(`sonde: SONDE_NATIVE_BINARY=${explicit} could not be loaded: ${(err as Error).message}`, { cause: err });
    }
  }
  try {
    const nodeGypBuild = require('node-gyp-build') as (dir: string) => unknown;
    return nodeGypBuild(packageRoot) as NativeBinding;
  } catch (err) {
    const libc = process.platform === 'linux'
      ? ((process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header?.glibcVersionRuntime
        ? 'glibc' : 'musl')
      : '';
    const tried = describeCandidates(packageRoot).map((p) => `  - ${p}`).join('\n');
    throw new NativeLoadError(
      `sonde: no native binary could be loaded for ${process.platform}-${process.arch}${libc ? ` (${libc})` : ''}, ` +
        `Node ${process.version}, N-API ${process.versions.napi}.\n` +
        `Tried:\n${tried}\n` +
        `Cause: ${(err as Error).message}\n` +
        'Prebuilt binaries cover linux-x64 with glibc >= 2.34. Elsewhere, build from source: ' +
        'install cmake (>= 3.20) and a C++17 compiler, then run `npm rebuild sonde`.',
      { cause: err },
    );
  }
}

let cached: NativeBinding | undefined;

/** The loaded addon (loaded on first use, once per thread). */
export function native(): NativeBinding {
  return (cached ??= load());
}
