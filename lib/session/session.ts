/**
 * Session: an ONNX model loaded, optimised and prepared once (weights folded and packed into native
 * handles), then run many times. Each distinct set of input shapes is compiled once into a native
 * plan (lib/session/compile.ts) and cached; a run is one native call on sonde's pool. On a CUDA
 * device the conv/GEMM weights and large initializers are uploaded once at load (lib/session/gpu.ts),
 * each plan is a GPU plan (native/runtime/gpu_plan.h), and a run uploads the inputs, runs every step
 * on one stream and downloads the outputs.
 */
import { readFile } from 'node:fs/promises';
import { basename, dirname, extname, resolve } from 'node:path';
import { native, type NativeCancelToken, type NativeConvHandle, type NativeGpuPlan, type NativePlan } from '../binding.js';
import { allocOutput } from '../buffers.js';
import { placeWithoutCuda, resolveDevice, type Placement } from '../device.js';
import { Batcher, checkBatchingOptions, findBatchLayout, type BatchingOptions } from '../batching/batcher.js';
import { AbortError, DisposedError, InvalidArgumentError, ModelFormatError, SondeError, callNative, fromNative } from '../errors.js';
import { SessionMetrics, type SessionMetricsSnapshot } from '../metrics/session.js';
import { NativeResource, withSignal } from '../lifetime.js';
import { checkSupported, parseModel, type Dim, type OnnxGraph, type OnnxNode } from '../onnx/model.js';
import { Tensor, type DType } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe, suggest } from '../validate.js';
import { compilePlan, opFor, type CompiledPlan, type PlanInput } from './compile.js';
import { SONDE_DOMAIN } from './fused.js';
import { isSupported } from './ops/index.js';
import type { Prepared } from './ops/types.js';
import type { PlanStep } from './plan.js';
import { optimize, type OptimizationLevel } from './optimize.js';
import type { SparseMode, SparsePrepared } from './sparse.js';
import { gpuUnsupported, type GpuLayer } from './gpu.js';
import { GpuBuffer, gpuDevice, type GpuDeviceId } from '../cuda/runtime.js';
import { fullPollBudget, pollBudget, trackRun, type WaitMode } from '../wait.js';

export type { OptimizationLevel, BatchingOptions, SessionMetricsSnapshot, WaitMode };

export interface SessionOptions {
  /**
   * 'auto' (default: the first CUDA device when there is one, else the CPU), 'cpu', 'cuda' or
   * 'cuda:N'. On a CUDA device the weights are uploaded once at load and every run computes there
   * (inputs uploaded, outputs downloaded). A node with no GPU path is an UnsupportedOperatorError at
   * load naming it, unless fallback is 'cpu' (or the device was 'auto'): then the whole session
   * runs on the CPU and Session.device.reason says why.
   */
  device?: 'auto' | 'cpu' | 'cuda' | `cuda:${number}`;
  /** What runs operators a CUDA device has no kernel for: 'none' (default: an error at load) or 'cpu'. */
  fallback?: 'none' | 'cpu';
  /** At most this many pool threads per run (default: the whole pool). */
  threads?: number;
  /** Load-time graph optimisation (default 'all'). */
  optimization?: OptimizationLevel;
  /** 'fp32' (default) or 'bf16': GEMM and conv weights stored in bf16, accumulation in fp32. */
  precision?: 'fp32' | 'bf16';
  /**
   * Dynamic batching: concurrent run() calls that differ only in the batch dim share one native
   * run. Needs a model whose inputs all have a symbolic batch dim (see README, "Batching").
   */
  batching?: BatchingOptions;
  /** The `session` label of this session's metrics (default: the model file's name and a number). */
  name?: string;
  /**
   * Sparse kernels for pruned weights (Gemm, MatMul with initializer weights, 1x1 Conv): 'auto' (default)
   * times the dense and sparse kernels of every layer with at least 50% zero weights at load and
   * runs it sparse only where that measured faster for the plan's row count; 'force' runs every
   * such layer sparse whatever its sparsity; 'off' never. fp32 only (bf16 sessions stay dense).
   * Session.sparseLayers says what was chosen; Session.profile() records carry each layer's sparsity.
   */
  sparse?: SparseMode;
  /**
   * How the JS thread waits for a run (CPU sessions): 'auto' (default) keeps the event loop polling
   * instead of sleeping while a run measured under 1 ms is in flight and the compute pool leaves a
   * core free, which saves the wake-up of an idle core (~30 us on a VM); 'poll' does it for runs of
   * any length; 'sleep' never. Polling never blocks the loop, but holds its core for the run, and
   * stops while the runs in flight hold every core.
   */
  wait?: WaitMode;
}
const LOAD_OPTIONS = ['device', 'fallback', 'threads', 'optimization', 'precision', 'batching', 'name', 'sparse', 'wait'] as const;

let sessionCount = 0;

/** One layer that has sparse weights, from Session.sparseLayers. */
export interface SparseLayerInfo {
  /** The ONNX node (after fusion: the fused node's name). */
  layer: string;
  /** [k, n] of the weights as a GEMM's B (a 1x1 Conv: [cIn, cOut]). */
  shape: [number, number];
  /** Fraction of zero weights. */
  sparsity: number;
  /** The sparse storage built at load. */
  format: 'csr' | 'bsr';
  /** 'auto': the load-time timings (best of 3, ms) of the dense and sparse kernels at these row counts. */
  timings?: { m: number; denseMs: number; sparseMs: number }[];
  /** The kernel each compiled plan runs, by row count M (a Gemm: the batch; a 1x1 Conv: N * H * W). */
  kernel: Record<number, 'dense' | 'sparse'>;
}

export interface SessionRunOptions {
  /** Aborting rejects the run with AbortError; a run in progress stops at the next operator. */
  signal?: AbortSignal;
}
const RUN_OPTIONS = ['signal'] as const;

export interface SessionProfileOptions {
  /** Runs to aggregate (default 10); every step's time is averaged over them. */
  runs?: number;
  /** Aborting rejects with AbortError; a run in progress stops at the next operator. */
  signal?: AbortSignal;
}
const PROFILE_OPTIONS = ['runs', 'signal'] as const;

/** One plan step's share of a run, from Session.profile(). */
export interface StepProfile {
  /** The ONNX node the step came from (a fused node keeps the name of the node it replaced). */
  node: string;
  /** The plan step kind: 'conv', 'gemm', 'matmul', 'binary', 'copy', ... (lib/session/plan.ts). */
  op: PlanStep['op'];
  /** What computes it: the conv path and microkernel, the GEMM microkernel, or the op's kind. */
  kernel: string;
  /** Mean wall time of the step per run, in milliseconds. */
  ms: number;
  /** ms over the sum of every step's ms (the shares sum to 1). */
  share: number;
  /**
   * Fraction of zero weights, on the steps of a layer that has sparse weights (SessionOptions.sparse):
   * its 'spmm' step when it runs sparse, its 'gemm' / 'conv' step when the session kept it dense.
   */
  sparsity?: number;
  /**
   * Batch-1 'gemm' steps: the fraction of the profiled runs in which the input row was at most 40%
   * non-zero and the step read only the weight rows of the non-zero activations.
   */
  activationSkip?: number;
  /**
   * Conv steps whose output took the storage of its residual (the step was the residual's last use,
   * both in the same channel-blocked layout): each tile reads the residual where it then writes.
   */
  residualInPlace?: boolean;
}

/** A model input or output: symbolic dims are strings ('?' where the model leaves a dim unnamed). */
export interface ValueMetadata {
  name: string;
  /** Absent where the model does not declare it. */
  dtype?: DType;
  /** Absent for an unknown rank. */
  shape?: (number | string)[];
}

/** Plans kept per session; a workload with more distinct input shapes recompiles the oldest. */
const PLAN_CACHE_SIZE = 16;

interface CachedPlan {
  compiled: CompiledPlan;
  /** Absent when every output is known at plan time (nothing to run natively). */
  plan?: NativePlan | NativeGpuPlan;
  /** Each output's element count, in compiled.outputs order (so a run does not recompute it). */
  outputSizes: number[];
}

interface InputSpec {
  name: string;
  dtype?: DType;
  dims?: Dim[];
}

type ArrayCtor = { new (n: number): ArrayBufferView; new (b: ArrayBuffer, o: number, n: number): ArrayBufferView; BYTES_PER_ELEMENT: number };
const ARRAY_CTOR: Record<DType, ArrayCtor> = {
  float32: Float32Array, float16: Uint16Array, bfloat16: Uint16Array, int8: Int8Array, uint8: Uint8Array, int32: Int32Array,
  int64: BigInt64Array, bool: Uint8Array,
};

function metadata(name: string, dtype: DType | undefined, dims: Dim[] | undefined): ValueMetadata {
  return {
    name,
    ...(dtype ? { dtype } : {}),
    ...(dims ? { shape: dims.map((d) => (d === null ? '?' : d)) } : {}),
  };
}

function sameFeeds(dims: readonly (readonly number[])[], dtypes: readonly DType[], tensors: readonly Tensor[]): boolean {
  if (dims.length !== tensors.length) return false;
  for (let i = 0; i < dims.length; ++i) {
    if (dtypes[i] !== tensors[i]!.dtype) return false;
    const a = dims[i]!, b = tensors[i]!.dims;
    if (a.length !== b.length) return false;
    for (let j = 0; j < a.length; ++j) if (a[j] !== b[j]) return false;
  }
  return true;
}

/** The microkernel of a depthwise conv on blocked activations (its handle names its NCHW one). */
const BLOCKED_DEPTHWISE_UKERNEL = 'f32_dwconv_nchw16c_4px__avx512';

/** What computes a step, for profiles: handles name their microkernel; other steps their kind. */
function kernelOf(step: PlanStep): string {
  switch (step.op) {
    case 'conv': {
      const info = step.handle.info();
      const blocked = (step.xBlocked ? (step.yBlocked ? '+nchw16c-in-out' : '+nchw16c-in') : step.yBlocked ? '+nchw16c-out' : '') +
        (step.xBlocked?.bf16 ? '+bf16-in' : '') + (step.yBlocked?.bf16 ? '+bf16-out' : '');
      // The handle names its NCHW kernel; a depthwise conv in a blocked run uses its blocked one.
      const ukernel = step.xBlocked && info.path === 'depthwise' ? BLOCKED_DEPTHWISE_UKERNEL : info.ukernel ?? '?';
      return `${info.path ?? '?'}/${ukernel}${blocked}`;
    }
    case 'convChain': {
      const pointwise = (h: NativeConvHandle) => h.info().ukernel ?? '?';
      return `chain/${step.expand ? `${pointwise(step.expand)}+` : ''}${BLOCKED_DEPTHWISE_UKERNEL}+${pointwise(step.project)}`;
    }
    case 'reorder': return step.toBlocked ? 'reorder-to-nchw16c' : 'reorder-to-nchw';
    case 'gemm': {
      const info = step.weights.info();
      return `${info.ukernel ?? info.variant ?? '?'}${step.activation !== 'none' ? `+${step.activation}` : ''}`;
    }
    case 'spmm': {
      const info = step.weights.info();
      const columns = step.aStrides !== undefined && step.aStrides[2] !== 1;
      return `${(columns ? info.columnsUkernel : info.ukernel) ?? info.format ?? '?'}${step.taps ? '+direct' : ''}${step.activation !== 'none' ? `+${step.activation}` : ''}`;
    }
    case 'matmul': return `matmul${step.transB ? ' transB' : ''} ${step.m}x${step.k}x${step.n}`;
    case 'unary': return `${step.kind} ${step.dtype}`;
    case 'binary': return `${step.kind} ${step.dtype}`;
    case 'reduce': return `${step.kind} ${step.dtype}`;
    case 'pool': return `${step.kind === 0 ? 'max' : 'average'}${step.xBlocked ? '+nchw16c-in-out' : ''}`;
    case 'softmax': return step.log ? 'logSoftmax' : 'softmax';
    case 'cast': return `${step.from}->${step.to}`;
    case 'pad': return step.mode;
    case 'gpuConv': return `gpu conv ${step.kernel.join('x')}${step.group > 1 ? ` group ${step.group}` : ''}${step.bf16 ? ' bf16' : ''}${step.activation !== 'none' ? `+${step.activation}` : ''}`;
    case 'gpuGemm': return `gpu gemm ${step.m}x${step.k}x${step.n}${step.bf16 ? ' bf16' : ''}${step.activation !== 'none' ? `+${step.activation}` : ''}`;
    case 'copy': return `copy rank ${step.dims.length}`;
    default: return step.op;
  }
}

/** Below this, an initializer a step reads is copied into each plan: one allocation per tiny tensor would cost more. */
const DEVICE_CONSTANT_MIN_BYTES = 16 * 1024;

/**
 * GPU sessions: uploads the initializers that plan steps may read as data (a Gather's table, a
 * LayerNorm's scale...), so that every plan shares one device copy. Weights a GPU layer already holds
 * (a conv's or GEMM's input 1, a conv's bias) are not uploaded twice.
 */
async function uploadConstants(graph: OnnxGraph, prepared: Map<OnnxNode, Prepared>, device: GpuDeviceId,
  out: Map<Tensor, GpuBuffer>): Promise<void> {
  const wanted = new Set<string>();
  for (const node of graph.nodes) {
    const layer = (prepared.get(node) as { gpu?: GpuLayer } | undefined)?.gpu !== undefined;
    const conv = node.opType === 'Conv' || node.opType === 'FusedConv';
    node.inputs.forEach((name, i) => {
      if (name && !(layer && (i === 1 || (conv && i === 2)))) wanted.add(name);
    });
  }
  for (const name of wanted) {
    const t = graph.initializers.get(name);
    if (!t || t.dtype === 'float16' || t.dtype === 'bfloat16' || t.data.byteLength < DEVICE_CONSTANT_MIN_BYTES) continue;
    out.set(t, await GpuBuffer.from(device, t.data, `the initializer '${name}'`));
  }
}

export class Session extends NativeResource {
  /** The model's runtime inputs (initializers listed as graph inputs are constants, not inputs). */
  readonly inputs: readonly ValueMetadata[];
  readonly outputs: readonly ValueMetadata[];
  #graph: OnnxGraph;
  #opset: number;
  #inputs: InputSpec[];
  #prepared: Map<OnnxNode, Prepared>;
  #plans = new Map<string, CachedPlan>();
  /**
   * The plan used last with the dims and dtypes of the feeds it ran (copied): a steady stream of one
   * shape finds its plan without building the cache key string, and feeds that match it in every
   * name, dtype and dim skip the general feed checks (#sameAsLast). Always the most recent entry of
   * #plans.
   */
  #lastPlan?: { dims: number[][]; dtypes: DType[]; entry: CachedPlan };
  #threads: number;
  #wait: WaitMode = 'auto';
  /** Smoothed time of recent native runs on the pool (ms; NaN before the first), for the wait mode. */
  #recentRunMs = NaN;
  #metrics: SessionMetrics;
  #batcher?: Batcher;
  /** Where the model's batch dim is (for the batch-size metric), if it has one. */
  #batchAxis?: number;
  #placement: Placement = { kind: 'cpu', id: 'cpu' };
  /** The GPU runtime's device when the session runs there. */
  #gpu?: GpuDeviceId;
  /** GPU sessions: large initializers that steps read, uploaded once at load and shared by every plan. */
  #deviceConstants = new Map<Tensor, GpuBuffer>();

  /** Where runs compute, with the reason when options.device did not choose it ('auto', fallback). */
  get device(): Placement {
    return { ...this.#placement };
  }

  private constructor(graph: OnnxGraph, opset: number, prepared: Map<OnnxNode, Prepared>, threads: number, name: string) {
    super();
    this.#metrics = new SessionMetrics(name);
    this.#graph = graph;
    this.#opset = opset;
    this.#prepared = prepared;
    this.#threads = threads;
    this.#inputs = graph.inputs.filter((i) => !graph.initializers.has(i.name)).map((i) => ({ name: i.name, dtype: i.dtype, dims: i.shape }));
    this.inputs = Object.freeze(this.#inputs.map((i) => Object.freeze(metadata(i.name, i.dtype, i.dims))));
    this.outputs = Object.freeze(graph.outputs.map((o) => Object.freeze(metadata(o.name, o.dtype, o.shape))));
  }

  /**
   * Loads an ONNX model from a file path (external data is read from its folder) or from bytes,
   * optimises it and prepares every weight once.
   */
  static async load(pathOrBytes: string | Uint8Array, options?: SessionOptions): Promise<Session> {
    const where = 'Session.load';
    const opts = checkOptions<SessionOptions>(where, options, LOAD_OPTIONS);
    const device = resolveDevice(opts.device ?? 'auto', `${where}: options.device`);
    const fallback = checkOneOf(`${where}: options.fallback`, opts.fallback ?? 'none', ['none', 'cpu'] as const);
    const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
    const level = checkOneOf(`${where}: options.optimization`, opts.optimization ?? 'all', ['none', 'basic', 'all'] as const);
    const precision = checkOneOf(`${where}: options.precision`, opts.precision ?? 'fp32', ['fp32', 'bf16'] as const);
    const batching = opts.batching === undefined ? undefined : checkBatchingOptions(`${where}: options.batching`, opts.batching);
    const wait = checkOneOf(`${where}: options.wait`, opts.wait ?? 'auto', ['auto', 'poll', 'sleep'] as const);
    if (opts.name !== undefined && (typeof opts.name !== 'string' || opts.name.length === 0)) {
      throw new InvalidArgumentError(`${where}: options.name must be a non-empty string, got ${describe(opts.name)}`);
    }
    const sparse = checkOneOf(`${where}: options.sparse`, opts.sparse ?? 'auto', ['auto', 'off', 'force'] as const);
    let bytes: Uint8Array;
    let source: string;
    let baseDir: string | undefined;
    if (typeof pathOrBytes === 'string') {
      source = pathOrBytes;
      baseDir = dirname(resolve(pathOrBytes));
      try {
        bytes = await readFile(pathOrBytes);
      } catch (err) {
        throw new InvalidArgumentError(`${where}: cannot read model file '${pathOrBytes}': ${(err as Error).message}`, { cause: err });
      }
    } else if (pathOrBytes instanceof Uint8Array) {
      bytes = pathOrBytes;
      source = 'the model bytes';
    } else {
      throw new InvalidArgumentError(`${where}: pathOrBytes must be a file path or a Uint8Array, got ${describe(pathOrBytes)}`);
    }
    const model = parseModel(bytes, { baseDir, source });
    const own = model.graph.nodes.filter((n) => n.domain === SONDE_DOMAIN);
    if (own.length > 0) {
      throw new ModelFormatError(`${source}: nodes in domain '${SONDE_DOMAIN}' are reserved for sonde's optimiser: ` +
        own.slice(0, 10).map((n) => `${n.opType} (node '${n.name}')`).join(', '));
    }
    checkSupported(model.graph, isSupported);
    let placement: Placement;
    let gpu: GpuDeviceId | undefined;
    if (device.kind === 'cuda') {
      const missing = gpuUnsupported(model.graph, gpuDevice(device.gpu).sharedPerBlock);
      if (missing.length === 0) {
        placement = { kind: 'cuda', id: `cuda:${device.index}` };
        gpu = device.gpu;
      } else {
        placement = placeWithoutCuda(where, opts.device, device, missing, fallback);
      }
    } else {
      placement = placeWithoutCuda(where, opts.device, device, [], fallback);
    }
    const graph = optimize(model.graph, level, model.opset);
    const layout = findBatchLayout(
      graph.inputs.filter((i) => !graph.initializers.has(i.name)).map((i) => ({ name: i.name, ...(i.shape ? { dims: i.shape } : {}) })),
      graph.outputs.map((o) => ({ name: o.name, ...(o.shape ? { dims: o.shape } : {}) })));
    if (batching && typeof layout === 'string') {
      throw new InvalidArgumentError(`${where}: options.batching needs a batch dim in every input and output of ${source}, but ${layout}`);
    }
    const prepared = new Map<OnnxNode, Prepared>();
    const deviceConstants = new Map<Tensor, GpuBuffer>();
    try {
      for (const node of graph.nodes) {
        const def = opFor(node.domain, node.opType);
        if (!def?.prepare) continue;
        const ins = node.inputs.map((name) => (name ? graph.initializers.get(name) : undefined));
        // On the GPU the dense kernels run every layer: there are no GPU sparse steps in plans yet.
        const p = def.prepare(node, ins, gpu ? { precision, sparse: 'off', target: 'gpu' } : { precision, sparse }, model.opset);
        if (p) prepared.set(node, p);
      }
      if (gpu) {
        for (const p of prepared.values()) await (p as { gpu?: GpuLayer }).gpu?.upload(gpu);
        await uploadConstants(graph, prepared, gpu, deviceConstants);
      } else if (sparse === 'auto') {
        for (const p of prepared.values()) await (p as SparsePrepared).calibrate?.(threads);
      }
    } catch (err) {
      for (const p of prepared.values()) p.dispose();
      for (const b of deviceConstants.values()) b.dispose();
      throw err;
    }
    sessionCount++;
    const name = opts.name ?? `${typeof pathOrBytes === 'string' ? basename(pathOrBytes, extname(pathOrBytes)) : 'session'}-${sessionCount}`;
    const session = new Session(graph, model.opset, prepared, threads, name);
    session.#wait = wait;
    if (typeof layout !== 'string') session.#batchAxis = layout.axis;
    session.#placement = placement;
    if (gpu) session.#gpu = gpu;
    session.#deviceConstants = deviceConstants;
    if (batching && typeof layout !== 'string') {
      session.#batcher = new Batcher(layout, batching, session.outputs.map((o) => o.name),
        (tensors, signal) => session.#execute(tensors, signal), session.#metrics);
    }
    return session;
  }

  /**
   * Runs the model on `feeds` (one Tensor per input, by name); resolves to one Tensor per output.
   * With batching, the call may share a native run with others and resolves to its own rows.
   */
  async run(feeds: Record<string, Tensor>, options?: SessionRunOptions): Promise<Record<string, Tensor>> {
    const arrived = performance.now();
    this.#metrics.requestStarted();
    // One async function from the caller to the native Promise: each one between them would add its
    // own promise and microtask turns to a round trip of a few microseconds.
    try {
      const where = 'Session.run';
      this.checkAlive(where);
      const opts = checkOptions<SessionRunOptions>(where, options, RUN_OPTIONS);
      const signal = checkSignal(`${where}: options.signal`, opts.signal);
      const same = this.#sameAsLast(feeds);
      const tensors = same ?? this.#checkFeeds(where, feeds);
      if (signal?.aborted) throw new AbortError(undefined, { cause: signal.reason });
      const rows = this.#batcher?.rowsOf(tensors);
      let out: Record<string, Tensor>;
      if (this.#batcher && rows !== undefined) {
        out = await this.#batcher.submit(tensors, rows, signal, arrived);
      } else {
        // No stack is captured up front for native errors: fromNative makes the error after the
        // await, where V8's async stack trace already names the awaiting callers, while a
        // `new Error()` here cost ~6 us per call, a quarter of a small model's round trip.
        this.#metrics.dequeued(0);
        const t0 = performance.now();
        try {
          const entry = same ? this.#lastPlan!.entry : this.#plan(tensors);
          const allocated = this.#allocOutputs(entry);
          out = allocated.results;
          const plan = entry.plan;
          if (plan) {
            const inputs = tensors.map((t) => t.data);
            try {
              await (signal
                ? withSignal(signal, (token) => this.#launch(plan, inputs, allocated.outs, token))
                : this.#launch(plan, inputs, allocated.outs));
            } catch (err) {
              throw fromNative(err);
            }
          }
        } finally {
          const axis = this.#batchAxis;
          this.#metrics.ran(axis === undefined ? 1 : (tensors[0]?.dims[axis] ?? 1), (performance.now() - t0) / 1000);
        }
      }
      this.#metrics.requestSettled((performance.now() - arrived) / 1000);
      return out;
    } catch (err) {
      this.#metrics.requestSettled((performance.now() - arrived) / 1000, err instanceof SondeError ? err.code : 'ERR_OTHER');
      throw err;
    }
  }

  /** A snapshot of this session's metrics (latencies in seconds; see README, "Metrics"). */
  metrics(): SessionMetricsSnapshot {
    return this.#metrics.snapshot();
  }

  /** One native run of a plan on the session's device. */
  #launch(plan: NativePlan | NativeGpuPlan, inputs: ArrayBufferView[], outs: ArrayBufferView[], token?: NativeCancelToken,
    timings?: Float64Array): Promise<unknown> {
    if (this.#gpu) return native().gpuPlanRun(plan as NativeGpuPlan, inputs, outs, token, timings);
    if (this.#wait === 'sleep') return native().planRun(plan as NativePlan, inputs, outs, this.#threads, token, timings);
    const pool = native().getThreads();
    const threads = this.#threads === 0 ? pool : Math.min(this.#threads, pool);
    const run = native().planRun(plan as NativePlan, inputs, outs, this.#threads, token, timings);
    // Smoothed from the run's own time, not the call's wall time: that includes the wake-ups a poll
    // saves, so a run that polled would measure shorter than one that slept and decide the next wait.
    trackRun(run, pollBudget(this.#wait, threads, this.#recentRunMs), (ok, ms) => {
      if (ok && typeof ms === 'number') this.#recentRunMs = Number.isNaN(this.#recentRunMs) ? ms : 0.8 * this.#recentRunMs + 0.2 * ms;
    }, fullPollBudget(this.#wait, this.#recentRunMs));
    return run;
  }

  /** One native run of validated tensors (the batcher's runs). */
  async #execute(tensors: Tensor[], signal: AbortSignal | undefined): Promise<Record<string, Tensor>> {
    const entry = this.#plan(tensors);
    const { results, outs } = this.#allocOutputs(entry);
    const plan = entry.plan;
    if (plan) {
      const inputs = tensors.map((t) => t.data);
      try {
        await (signal
          ? withSignal(signal, (token) => this.#launch(plan, inputs, outs, token))
          : this.#launch(plan, inputs, outs));
      } catch (err) {
        throw fromNative(err);
      }
    }
    return results;
  }

  /**
   * Runs the model `runs` times on `feeds` and reports where the time goes: one record per plan step
   * (in execution order) with its mean wall time per run and its share of the steps' total. Steps
   * are timed natively between steps, so a step's time includes waking the pool for it. On a GPU a
   * step's time is its device time between stream events (each timed step waits for the last).
   */
  async profile(feeds: Record<string, Tensor>, options?: SessionProfileOptions): Promise<StepProfile[]> {
    const site = new Error();
    const where = 'Session.profile';
    this.checkAlive(where);
    const opts = checkOptions<SessionProfileOptions>(where, options, PROFILE_OPTIONS);
    const runs = opts.runs === undefined ? 10 : checkInt(`${where}: options.runs`, opts.runs, 1, 100000);
    const signal = checkSignal(`${where}: options.signal`, opts.signal);
    const tensors = this.#checkFeeds(where, feeds);
    if (signal?.aborted) throw new AbortError(undefined, { cause: signal.reason });
    const entry = this.#plan(tensors);
    const plan = entry.plan;
    const steps = entry.compiled.spec.steps;
    const total = new Float64Array(steps.length);
    const skipsBefore = (plan as NativePlan | undefined)?.info().skipZeroRuns;
    if (plan && steps.length > 0) {
      const timings = new Float64Array(steps.length);
      const { outs } = this.#allocOutputs(entry);
      const inputs = tensors.map((t) => t.data);
      for (let r = 0; r < runs; ++r) {
        this.checkAlive(where);
        await callNative(() => withSignal(signal, (token) => this.#launch(plan, inputs, outs, token, timings)), site);
        for (let i = 0; i < steps.length; ++i) total[i]! += timings[i]!;
      }
    }
    const sum = total.reduce((a, b) => a + b, 0);
    const skipsAfter = (plan as NativePlan | undefined)?.info().skipZeroRuns;
    const sparsity = new Map<string, number>();
    for (const [node, p] of this.#prepared) {
      const s = (p as SparsePrepared).sparse;
      if (s) sparsity.set(node.name, s.sparsity);
    }
    return steps.map((step, i) => {
      const rec: StepProfile = { node: step.node, op: step.op, kernel: kernelOf(step), ms: total[i]! / runs / 1e6, share: sum > 0 ? total[i]! / sum : 0 };
      const sp = (step.op === 'spmm' || step.op === 'gemm' || step.op === 'conv') ? sparsity.get(step.node) : undefined;
      if (sp !== undefined) rec.sparsity = sp;
      if (step.op === 'conv' && step.residual && step.residual.buffer === step.y.buffer) rec.residualInPlace = true;
      // Concurrent runs of the same plan also count: the fraction is capped at 1.
      if (skipsBefore && skipsAfter && skipsAfter[i]! >= 0) rec.activationSkip = Math.min(1, (skipsAfter[i]! - skipsBefore[i]!) / runs);
      return rec;
    });
  }

  /** Output tensors for one run: plan-time constants copied, the rest allocated for the plan to fill. */
  #allocOutputs(entry: CachedPlan): { results: Record<string, Tensor>; outs: ArrayBufferView[] } {
    const results: Record<string, Tensor> = {};
    const outs: ArrayBufferView[] = [];
    const outputs = entry.compiled.outputs;
    for (let i = 0; i < outputs.length; ++i) {
      const o = outputs[i]!;
      if (o.constant) {
        // A copy: the plan's constant must not change if the caller writes into a result.
        results[o.name] = new Tensor(o.dtype, o.constant.data.slice() as never, o.shape);
        continue;
      }
      const data = allocOutput(ARRAY_CTOR[o.dtype], entry.outputSizes[i]!);
      outs[o.index!] = data;
      results[o.name] = new Tensor(o.dtype, data as never, o.shape);
    }
    return { results, outs };
  }

  /**
   * The feeds in input order when they are exactly the last run's kind: own properties named as the
   * inputs and nothing else, Tensors of the same dtypes and dims. Such feeds passed every check of
   * #checkFeeds then and would pass them again, and the last plan is theirs; anything else
   * (undefined) goes through #checkFeeds, which names what is wrong.
   */
  #sameAsLast(feeds: unknown): Tensor[] | undefined {
    const last = this.#lastPlan;
    if (!last || feeds === null || typeof feeds !== 'object') return undefined;
    const specs = this.#inputs;
    const tensors: Tensor[] = new Array(specs.length);
    for (let i = 0; i < specs.length; ++i) {
      const name = specs[i]!.name;
      if (!Object.hasOwn(feeds, name)) return undefined;
      const t = (feeds as Record<string, unknown>)[name];
      if (!(t instanceof Tensor) || t.dtype !== last.dtypes[i] || t.data.length !== t.size) return undefined;
      const want = last.dims[i]!, got = t.dims;
      if (got.length !== want.length) return undefined;
      for (let j = 0; j < want.length; ++j) if (got[j] !== want[j]) return undefined;
      tensors[i] = t;
    }
    // Own keys that are all input names and as many: no unknown name slipped in.
    if (Object.keys(feeds).length !== specs.length) return undefined;
    return tensors;
  }

  /** Feeds in input order, each checked against the model's declared dtype and dims. */
  #checkFeeds(where: string, feeds: unknown): Tensor[] {
    if (feeds === null || typeof feeds !== 'object' || Array.isArray(feeds) || feeds instanceof Tensor) {
      throw new InvalidArgumentError(`${where}: feeds must be an object mapping input names to Tensors, got ${describe(feeds)}`);
    }
    const names = this.#inputs.map((i) => i.name);
    for (const key of Object.keys(feeds)) {
      if (!names.includes(key)) {
        const s = suggest(key, names);
        throw new InvalidArgumentError(`${where}: feeds['${key}'] is not an input of the model${s ? `; did you mean '${s}'?` : ''} (inputs: ${names.join(', ')})`);
      }
    }
    const missing = names.filter((n) => (feeds as Record<string, unknown>)[n] === undefined);
    if (missing.length) throw new InvalidArgumentError(`${where}: missing input${missing.length > 1 ? 's' : ''} ${missing.map((n) => `'${n}'`).join(', ')}`);
    const bound = new Map<string, { value: number; input: string }>();
    return this.#inputs.map((spec) => {
      const t = (feeds as Record<string, unknown>)[spec.name];
      const what = `${where}: feeds['${spec.name}']`;
      if (!(t instanceof Tensor)) throw new InvalidArgumentError(`${what} must be a Tensor, got ${describe(t)}`);
      if (spec.dtype && t.dtype !== spec.dtype) throw new InvalidArgumentError(`${what} must have dtype '${spec.dtype}', got '${t.dtype}'`);
      if (t.data.length !== t.size) throw new InvalidArgumentError(`${what} has ${t.data.length} elements of data for dims [${t.dims.join(', ')}]`);
      if (spec.dims) {
        if (t.dims.length !== spec.dims.length) {
          throw new InvalidArgumentError(`${what} must have rank ${spec.dims.length} ([${spec.dims.map((d) => d ?? '?').join(', ')}]), got dims [${t.dims.join(', ')}]`);
        }
        spec.dims.forEach((d, i) => {
          const got = t.dims[i]!;
          if (typeof d === 'number' && d !== got) {
            throw new InvalidArgumentError(`${what}: dims[${i}] must be ${d}, got ${got} (dims [${t.dims.join(', ')}])`);
          }
          if (typeof d === 'string') {
            const b = bound.get(d);
            if (b && b.value !== got) {
              throw new InvalidArgumentError(`${what}: dims[${i}] ('${d}') is ${got}, but input '${b.input}' set '${d}' to ${b.value}`);
            }
            if (!b) bound.set(d, { value: got, input: spec.name });
          }
        });
      }
      return t;
    });
  }

  /** The plan for these input dtypes and shapes: cached (most recently used last) or compiled now. */
  #plan(tensors: Tensor[]): CachedPlan {
    const last = this.#lastPlan;
    if (last && sameFeeds(last.dims, last.dtypes, tensors)) return last.entry;
    // The dtype too: an input whose dtype the model leaves open compiles one plan per dtype.
    const key = tensors.map((t) => `${t.dtype}:${t.dims.join('x')}`).join('|');
    const hit = this.#plans.get(key);
    if (hit) {
      this.#plans.delete(key);
      this.#plans.set(key, hit);
      this.#lastPlan = { dims: tensors.map((t) => [...t.dims]), dtypes: tensors.map((t) => t.dtype), entry: hit };
      return hit;
    }
    const inputs: PlanInput[] = this.#inputs.map((spec, i) => ({ name: spec.name, dtype: tensors[i]!.dtype, shape: [...tensors[i]!.dims] }));
    const gpu = this.#gpu;
    const constants = this.#deviceConstants;
    const compiled = compilePlan(this.#graph, inputs, {
      opset: this.#opset, prepared: this.#prepared, target: gpu ? 'gpu' : 'cpu',
      ...(gpu ? { deviceConstant: (t: Tensor) => constants.get(t)?.handle('Session.run') } : {}),
    });
    let plan: NativePlan | NativeGpuPlan | undefined;
    if (compiled.spec.steps.length > 0 || compiled.spec.outputBytes.length > 0) {
      try {
        plan = gpu ? native().createGpuPlan(gpu, compiled.spec) : native().createPlan(compiled.spec);
      } catch (err) {
        throw fromNative(err);
      }
    }
    const outputSizes = compiled.outputs.map((o) => o.shape.reduce((a, b) => a * b, 1));
    const entry: CachedPlan = { compiled, outputSizes, ...(plan ? { plan } : {}) };
    this.#plans.set(key, entry);
    this.#lastPlan = { dims: tensors.map((t) => [...t.dims]), dtypes: tensors.map((t) => t.dtype), entry };
    if (this.#plans.size > PLAN_CACHE_SIZE) {
      const [oldKey, old] = this.#plans.entries().next().value as [string, CachedPlan];
      this.#plans.delete(oldKey);
      // A run still using it holds the native plan until it finishes.
      old.plan?.dispose();
    }
    return entry;
  }

  /** Every layer that has sparse weights (empty with sparse: 'off' or when no layer is sparse enough). */
  get sparseLayers(): SparseLayerInfo[] {
    this.checkAlive('Session.sparseLayers');
    const out: SparseLayerInfo[] = [];
    for (const [node, p] of this.#prepared) {
      const s = (p as SparsePrepared).sparse;
      if (!s) continue;
      out.push({
        layer: node.name, shape: [s.k, s.n], sparsity: s.sparsity, format: s.format,
        ...(s.timings ? { timings: s.timings.map((t) => ({ m: t.m, denseMs: t.denseNs / 1e6, sparseMs: t.sparseNs / 1e6 })) } : {}),
        kernel: Object.fromEntries(s.chosen),
      });
    }
    return out;
  }

  /**
   * Device memory the session holds on its GPU, in bytes (0 on the CPU): the weights uploaded at
   * load, each cached plan's constants and its pooled run arenas. dispose() frees all of it.
   */
  get deviceBytes(): number {
    this.checkAlive('Session.deviceBytes');
    if (!this.#gpu) return 0;
    let total = 0;
    for (const p of this.#prepared.values()) total += (p as { gpu?: GpuLayer }).gpu?.deviceBytes ?? 0;
    for (const b of this.#deviceConstants.values()) total += b.bytes;
    for (const e of this.#plans.values()) total += (e.plan as NativeGpuPlan | undefined)?.info().deviceBytes ?? 0;
    return total;
  }

  /** Plans compiled so far (one per distinct set of input shapes, at most 16 kept). */
  get cachedPlans(): number {
    return this.#plans.size;
  }

  protected release(): void {
    this.#batcher?.close(() => new DisposedError('Session.run: the session was disposed while this request was queued'));
    this.#metrics.close();
    for (const e of this.#plans.values()) e.plan?.dispose();
    this.#plans.clear();
    this.#lastPlan = undefined;
    for (const p of this.#prepared.values()) p.dispose();
    this.#prepared.clear();
    for (const b of this.#deviceConstants.values()) b.dispose();
    this.#deviceConstants.clear();
  }
}
