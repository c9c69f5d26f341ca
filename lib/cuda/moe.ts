/**
 * Mixture-of-Experts dispatch on the GPU (native/kernels/moe/cuda/moe.cu), over device-resident
 * GpuBuffers: gpuMoe runs a whole layer in one native call (router GEMM, routing, dispatch,
 * grouped gate/up and down GEMMs, weighted combine); the step functions run one stage each, for
 * tests and for callers that fuse their own pipeline.
 *
 * Semantics are sonde.kernels.moe's (llama.cpp's): softmax or sigmoid scores, the k best of
 * score + selectionBias (ties to the lower index, NaN last), optional group-limited routing,
 * weights renormalised if asked, times weightScale; capacityFactor keeps the earliest tokens.
 * Weights: float32 or bfloat16 (raw bits), each expert row-major [rows, cols] as GGUF stacks them
 * (gate/up [nExperts, dFf, dModel], down [nExperts, dModel, dFf], router [nExperts, dModel]).
 * Precision: the 'simt' and 'gemv' kernels (GpuMoeKernel) compute fp32 products of the weights
 * as stored; 'tensor' (bf16 weights, cc >= 8.0) rounds the activations to bf16, fp32 sums. The
 * router GEMM picks its kernel by the same rule as 'auto'.
 * Results are deterministic: no float atomics (see moe.cu).
 */
import { InvalidArgumentError } from '../errors.js';
import { checkInt, checkOneOf, checkOptions, describe } from '../validate.js';
import { checkGpuBuffer, checkWrittenApart } from './kernels.js';
import { GpuBuffer, runGpuOp, type GpuDeviceId, type GpuRunOptions } from './runtime.js';

export type GpuMoeWeightType = 'f32' | 'bf16';
export type GpuMoeScoring = 'softmax' | 'sigmoid';

/** The routing's configuration (kernels.MoeRouterSpec without the router matrix). */
export interface GpuMoeRouting {
  nExperts: number;
  k: number;
  /** Default 'softmax'. */
  scoring?: GpuMoeScoring;
  /** Divide the k weights by their sum (Mixtral). Default false. */
  renormalize?: boolean;
  /** Default 1. */
  weightScale?: number;
  /** nExperts float32 values added to the scores for selection only (DeepSeek-V3). */
  selectionBias?: GpuBuffer;
  /** Group-limited routing: `groups` groups of nExperts / groups experts, `groupsUsed` kept. */
  groups?: number;
  groupsUsed?: number;
}

/** The experts' weights of one layer. */
export interface GpuMoeExperts {
  nExperts: number;
  dModel: number;
  dFf: number;
  weightType: GpuMoeWeightType;
  /** [nExperts, dFf, dModel] */
  gate: GpuBuffer;
  /** [nExperts, dFf, dModel] */
  up: GpuBuffer;
  /** [nExperts, dModel, dFf] */
  down: GpuBuffer;
}

export interface GpuMoeLayer extends GpuMoeRouting, GpuMoeExperts {
  /** [nExperts, dModel] */
  router: GpuBuffer;
  /** Default 'f32'. */
  routerType?: GpuMoeWeightType;
}

/**
 * The expert GEMMs' kernel. 'auto' (default): 'gemv' while the experts average at most 8 rows
 * (decode, small batches), else 'tensor' for bf16 weights on compute capability >= 8.0, else
 * 'simt'. 'tensor': 64 x 64 tiles on tensor cores (bf16 weights only; activations rounded to bf16).
 * 'simt': 64 x 64 tiles in fp32. 'gemv': a warp per output column, fp32.
 */
export type GpuMoeKernel = 'auto' | 'tensor' | 'simt' | 'gemv';
const KERNEL_CODE = { auto: 0, tensor: 1, simt: 2, gemv: 3 } as const;
const KERNELS = Object.keys(KERNEL_CODE) as GpuMoeKernel[];

export interface GpuMoeKernelOptions extends GpuRunOptions {
  kernel?: GpuMoeKernel;
}

export interface GpuMoeOptions extends GpuMoeKernelOptions {
  /** > 0: each expert takes at most ceil(capacityFactor * tokens * k / nExperts) rows. Default 0 (off). */
  capacityFactor?: number;
  /** A buffer of at least gpuMoeWorkspaceBytes() to reuse across calls; default: one per call. */
  workspace?: GpuBuffer;
}

export interface GpuMoeResult {
  /** Tokens routed to each expert (before any capacity drop). */
  expertCounts: number[];
  /** (token, expert) pairs dropped by the capacity limit. */
  dropped: number;
  /** ms per run when options.reps > 0, else 0. */
  ms: number;
}

/** Experts a routing warp can hold (moe.cu's kMaxExperts). */
export const GPU_MOE_MAX_EXPERTS = 1024;
const MAX_DIM = 2 ** 21;
const WEIGHT_TYPES = ['f32', 'bf16'] as const;
const WEIGHT_CODE = { f32: 0, bf16: 1 } as const;
const BYTES = { f32: 4, bf16: 2 } as const;

function kernelCode(where: string, kernel: unknown, weightType: GpuMoeWeightType): number {
  const k = checkOneOf(`${where}: options.kernel`, kernel ?? 'auto', KERNELS);
  if (k === 'tensor' && weightType !== 'bf16') throw new InvalidArgumentError(`${where}: options.kernel 'tensor' needs bf16 weights, got ${weightType}`);
  return KERNEL_CODE[k];
}

function runOpts(opts: GpuRunOptions): GpuRunOptions {
  return opts.reps === undefined ? {} : { reps: opts.reps };
}

function experts(where: string, e: unknown) {
  if (typeof e !== 'object' || e === null) throw new InvalidArgumentError(`${where}: the layer must be an object, got ${describe(e)}`);
  const l = e as GpuMoeExperts;
  const nExperts = checkInt(`${where}: nExperts`, l.nExperts, 1, GPU_MOE_MAX_EXPERTS);
  const dModel = checkInt(`${where}: dModel`, l.dModel, 1, MAX_DIM);
  const dFf = checkInt(`${where}: dFf`, l.dFf, 1, MAX_DIM);
  const weightType = checkOneOf(`${where}: weightType`, l.weightType, WEIGHT_TYPES);
  return { nExperts, dModel, dFf, weightType, expertBytes: dModel * dFf * BYTES[weightType] };
}

function routing(where: string, device: GpuDeviceId, r: unknown) {
  if (typeof r !== 'object' || r === null) throw new InvalidArgumentError(`${where}: the routing must be an object, got ${describe(r)}`);
  const l = r as GpuMoeRouting;
  const nExperts = checkInt(`${where}: nExperts`, l.nExperts, 1, GPU_MOE_MAX_EXPERTS);
  const k = checkInt(`${where}: k`, l.k, 1, nExperts);
  const scoring = checkOneOf(`${where}: scoring`, l.scoring ?? 'softmax', ['softmax', 'sigmoid'] as const);
  if (l.renormalize !== undefined && typeof l.renormalize !== 'boolean') {
    throw new InvalidArgumentError(`${where}: renormalize must be a boolean, got ${describe(l.renormalize)}`);
  }
  const weightScale = l.weightScale ?? 1;
  if (typeof weightScale !== 'number' || !Number.isFinite(weightScale)) {
    throw new InvalidArgumentError(`${where}: weightScale must be a finite number, got ${describe(l.weightScale)}`);
  }
  const groups = l.groups === undefined ? 1 : checkInt(`${where}: groups`, l.groups, 1, nExperts);
  if (nExperts % groups !== 0) throw new InvalidArgumentError(`${where}: groups = ${groups} does not divide the ${nExperts} experts`);
  const groupsUsed = l.groupsUsed === undefined ? groups : checkInt(`${where}: groupsUsed`, l.groupsUsed, 1, groups);
  if (k > groupsUsed * (nExperts / groups)) {
    throw new InvalidArgumentError(`${where}: k = ${k} experts do not fit in groupsUsed = ${groupsUsed} groups of ${nExperts / groups}`);
  }
  const bias = l.selectionBias === undefined ? undefined : checkGpuBuffer(where, 'selectionBias', l.selectionBias, device, nExperts * 4);
  const params = {
    experts: nExperts, k, scoring: scoring === 'sigmoid' ? 1 : 0, renormalize: l.renormalize ? 1 : 0, scale: weightScale,
    groups, groupsUsed, bias: bias ? 1 : 0,
  };
  return { nExperts, k, bias, params };
}

function pairsOf(where: string, tokens: number, k: number): number {
  if (tokens * k > 2 ** 31 - 1) throw new InvalidArgumentError(`${where}: tokens * k = ${tokens * k} must be below 2^31`);
  return tokens * k;
}

const align256 = (n: number) => Math.ceil(n / 256) * 256;

/** Bytes of the scratch gpuMoe needs for `tokens` tokens (moe.cu's MoeOp lays it out the same way). */
export function gpuMoeWorkspaceBytes(tokens: number, layer: { nExperts: number; k: number; dModel: number; dFf: number }): number {
  const where = 'gpuMoeWorkspaceBytes';
  tokens = checkInt(`${where}: tokens`, tokens, 0, 2 ** 31 - 1);
  const e = checkInt(`${where}: nExperts`, layer?.nExperts, 1, GPU_MOE_MAX_EXPERTS);
  const k = checkInt(`${where}: k`, layer.k, 1, e);
  const d = checkInt(`${where}: dModel`, layer.dModel, 1, MAX_DIM), f = checkInt(`${where}: dFf`, layer.dFf, 1, MAX_DIM);
  const pairs = pairsOf(where, tokens, k);
  return 2 * align256(tokens * e * 4) + 2 * align256(pairs * 4) + align256((e + 1) * 4) + 2 * align256(pairs * 4) +
    align256(pairs * f * 4) + align256(pairs * d * 4);
}

/**
 * Routes `tokens` rows of router logits ([tokens, nExperts] float32): scores [tokens, nExperts],
 * ids [tokens, k] int32 (descending key order) and weights [tokens, k] float32 are written.
 */
export async function gpuMoeRoute(device: GpuDeviceId, logits: GpuBuffer, tokens: number, spec: GpuMoeRouting,
  out: { scores: GpuBuffer; ids: GpuBuffer; weights: GpuBuffer }, options: GpuRunOptions = {}): Promise<number> {
  const w = 'gpuMoeRoute';
  const opts = checkOptions<GpuRunOptions>(w, options, ['reps']);
  tokens = checkInt(`${w}: tokens`, tokens, 0, 2 ** 31 - 1);
  const r = routing(w, device, spec);
  const pairs = pairsOf(w, tokens, r.k);
  checkGpuBuffer(w, 'logits', logits, device, tokens * r.nExperts * 4);
  if (typeof out !== 'object' || out === null) throw new InvalidArgumentError(`${w}: out must be { scores, ids, weights }, got ${describe(out)}`);
  checkGpuBuffer(w, 'out.scores', out.scores, device, tokens * r.nExperts * 4);
  checkGpuBuffer(w, 'out.ids', out.ids, device, pairs * 4);
  checkGpuBuffer(w, 'out.weights', out.weights, device, pairs * 4);
  checkWrittenApart(w, { 'out.scores': out.scores, 'out.ids': out.ids, 'out.weights': out.weights }, { logits, selectionBias: r.bias });
  const buffers = [logits, out.scores, out.ids, out.weights, ...(r.bias ? [r.bias] : [])];
  return runGpuOp(device, 'moe_route', buffers, { tokens, ...r.params }, runOpts(opts));
}

export interface GpuMoeDispatchOutputs {
  /** [nExperts] int32: pairs routed to each expert (before the capacity). */
  counts: GpuBuffer;
  /** [nExperts + 1] int32: each expert's first permuted row; the last is the rows in use. */
  offsets: GpuBuffer;
  /** [tokens, k] int32: each pair's permuted row, -1 when the capacity dropped it. */
  rowOf: GpuBuffer;
  /** [tokens * k] int32: the token each permuted row reads (rows in token order within an expert). */
  rowToken: GpuBuffer;
}

/** Counts, scans and permutes the [tokens, k] expert ids. capacity: rows per expert, 0 = no limit. */
export async function gpuMoeDispatch(device: GpuDeviceId, ids: GpuBuffer, tokens: number, nExperts: number, k: number,
  out: GpuMoeDispatchOutputs, options: GpuRunOptions & { capacity?: number } = {}): Promise<number> {
  const w = 'gpuMoeDispatch';
  const opts = checkOptions<GpuRunOptions & { capacity?: number }>(w, options, ['reps', 'capacity']);
  tokens = checkInt(`${w}: tokens`, tokens, 0, 2 ** 31 - 1);
  nExperts = checkInt(`${w}: nExperts`, nExperts, 1, GPU_MOE_MAX_EXPERTS);
  k = checkInt(`${w}: k`, k, 1, nExperts);
  const capacity = opts.capacity === undefined ? 0 : checkInt(`${w}: options.capacity`, opts.capacity, 0, 2 ** 31 - 1);
  const pairs = pairsOf(w, tokens, k);
  checkGpuBuffer(w, 'ids', ids, device, pairs * 4);
  if (typeof out !== 'object' || out === null) throw new InvalidArgumentError(`${w}: out must be { counts, offsets, rowOf, rowToken }, got ${describe(out)}`);
  checkGpuBuffer(w, 'out.counts', out.counts, device, nExperts * 4);
  checkGpuBuffer(w, 'out.offsets', out.offsets, device, (nExperts + 1) * 4);
  checkGpuBuffer(w, 'out.rowOf', out.rowOf, device, pairs * 4);
  checkGpuBuffer(w, 'out.rowToken', out.rowToken, device, pairs * 4);
  checkWrittenApart(w, { 'out.counts': out.counts, 'out.offsets': out.offsets, 'out.rowOf': out.rowOf, 'out.rowToken': out.rowToken }, { ids });
  return runGpuOp(device, 'moe_dispatch', [ids, out.counts, out.offsets, out.rowOf, out.rowToken],
    { tokens, experts: nExperts, k, capacity }, runOpts(opts));
}

/**
 * h[r] = silu(x[rowToken[r]] gate_e^T) * (x[rowToken[r]] up_e^T) for each expert e's rows
 * offsets[e] .. offsets[e + 1] (of `rows` allocated rows): one grouped GEMM launch.
 */
export async function gpuMoeGateUp(device: GpuDeviceId, x: GpuBuffer, tokens: number, rowToken: GpuBuffer, offsets: GpuBuffer,
  rows: number, layer: GpuMoeExperts, h: GpuBuffer, options: GpuMoeKernelOptions = {}): Promise<number> {
  const w = 'gpuMoeGateUp';
  const opts = checkOptions<GpuMoeKernelOptions>(w, options, ['reps', 'kernel']);
  const e = experts(w, layer);
  const kernel = kernelCode(w, opts.kernel, e.weightType);
  tokens = checkInt(`${w}: tokens`, tokens, 0, 2 ** 31 - 1);
  rows = checkInt(`${w}: rows`, rows, 0, 2 ** 31 - 1);
  checkGpuBuffer(w, 'x', x, device, tokens * e.dModel * 4);
  checkGpuBuffer(w, 'rowToken', rowToken, device, rows * 4);
  checkGpuBuffer(w, 'offsets', offsets, device, (e.nExperts + 1) * 4);
  checkGpuBuffer(w, 'layer.gate', layer.gate, device, e.nExperts * e.expertBytes);
  checkGpuBuffer(w, 'layer.up', layer.up, device, e.nExperts * e.expertBytes);
  checkGpuBuffer(w, 'h', h, device, rows * e.dFf * 4);
  checkWrittenApart(w, { h }, { x, rowToken, offsets, 'layer.gate': layer.gate, 'layer.up': layer.up });
  return runGpuOp(device, 'moe_gate_up', [x, rowToken, offsets, layer.gate, layer.up, h], {
    tokens, rows, experts: e.nExperts, dModel: e.dModel, dFf: e.dFf, weightType: WEIGHT_CODE[e.weightType], kernel,
  }, runOpts(opts));
}

/** yo[r] = h[r] down_e^T for each expert e's rows: one grouped GEMM launch. */
export async function gpuMoeDown(device: GpuDeviceId, h: GpuBuffer, offsets: GpuBuffer, rows: number, layer: GpuMoeExperts,
  yo: GpuBuffer, options: GpuMoeKernelOptions = {}): Promise<number> {
  const w = 'gpuMoeDown';
  const opts = checkOptions<GpuMoeKernelOptions>(w, options, ['reps', 'kernel']);
  const e = experts(w, layer);
  const kernel = kernelCode(w, opts.kernel, e.weightType);
  rows = checkInt(`${w}: rows`, rows, 0, 2 ** 31 - 1);
  checkGpuBuffer(w, 'h', h, device, rows * e.dFf * 4);
  checkGpuBuffer(w, 'offsets', offsets, device, (e.nExperts + 1) * 4);
  checkGpuBuffer(w, 'layer.down', layer.down, device, e.nExperts * e.expertBytes);
  checkGpuBuffer(w, 'yo', yo, device, rows * e.dModel * 4);
  checkWrittenApart(w, { yo }, { h, offsets, 'layer.down': layer.down });
  return runGpuOp(device, 'moe_down', [h, offsets, layer.down, yo], {
    rows, experts: e.nExperts, dModel: e.dModel, dFf: e.dFf, weightType: WEIGHT_CODE[e.weightType], kernel,
  }, runOpts(opts));
}

/** y[t] = sum_j weights[t, j] * yo[rowOf[t, j]] (slot order; rowOf -1 adds nothing). */
export async function gpuMoeCombine(device: GpuDeviceId, yo: GpuBuffer, rows: number, rowOf: GpuBuffer, weights: GpuBuffer,
  tokens: number, k: number, dModel: number, y: GpuBuffer, options: GpuRunOptions = {}): Promise<number> {
  const w = 'gpuMoeCombine';
  const opts = checkOptions<GpuRunOptions>(w, options, ['reps']);
  rows = checkInt(`${w}: rows`, rows, 0, 2 ** 31 - 1);
  tokens = checkInt(`${w}: tokens`, tokens, 0, 2 ** 31 - 1);
  k = checkInt(`${w}: k`, k, 1, GPU_MOE_MAX_EXPERTS);
  dModel = checkInt(`${w}: dModel`, dModel, 1, MAX_DIM);
  const pairs = pairsOf(w, tokens, k);
  checkGpuBuffer(w, 'yo', yo, device, rows * dModel * 4);
  checkGpuBuffer(w, 'rowOf', rowOf, device, pairs * 4);
  checkGpuBuffer(w, 'weights', weights, device, pairs * 4);
  checkGpuBuffer(w, 'y', y, device, tokens * dModel * 4);
  checkWrittenApart(w, { y }, { yo, rowOf, weights });
  return runGpuOp(device, 'moe_combine', [yo, rowOf, weights, y], { rows, tokens, k, dModel }, runOpts(opts));
}

/** y = MoE(x) for x [tokens, dModel] float32, in one native call; resolves with the expert load. */
export async function gpuMoe(device: GpuDeviceId, x: GpuBuffer, tokens: number, layer: GpuMoeLayer, y: GpuBuffer,
  options: GpuMoeOptions = {}): Promise<GpuMoeResult> {
  const w = 'gpuMoe';
  const opts = checkOptions<GpuMoeOptions>(w, options, ['reps', 'kernel', 'capacityFactor', 'workspace']);
  tokens = checkInt(`${w}: tokens`, tokens, 0, 2 ** 31 - 1);
  const r = routing(w, device, layer);
  const e = experts(w, layer);
  const kernel = kernelCode(w, opts.kernel, e.weightType);
  const routerType = checkOneOf(`${w}: routerType`, layer.routerType ?? 'f32', WEIGHT_TYPES);
  pairsOf(w, tokens, r.k);
  checkGpuBuffer(w, 'x', x, device, tokens * e.dModel * 4);
  checkGpuBuffer(w, 'layer.router', layer.router, device, e.nExperts * e.dModel * BYTES[routerType]);
  checkGpuBuffer(w, 'layer.gate', layer.gate, device, e.nExperts * e.expertBytes);
  checkGpuBuffer(w, 'layer.up', layer.up, device, e.nExperts * e.expertBytes);
  checkGpuBuffer(w, 'layer.down', layer.down, device, e.nExperts * e.expertBytes);
  checkGpuBuffer(w, 'y', y, device, tokens * e.dModel * 4);
  const capacityFactor = opts.capacityFactor ?? 0;
  if (typeof capacityFactor !== 'number' || !Number.isFinite(capacityFactor) || capacityFactor < 0) {
    throw new InvalidArgumentError(`${w}: options.capacityFactor must be a finite number >= 0 (0 = off), got ${describe(opts.capacityFactor)}`);
  }
  // As kernels.moe: ceil(factor * tokens * k / nExperts) rows, at most every token.
  const capacity = capacityFactor > 0 ? Math.min(tokens, Math.ceil(capacityFactor * tokens * r.k / e.nExperts)) : 0;
  const bytes = gpuMoeWorkspaceBytes(tokens, { nExperts: e.nExperts, k: r.k, dModel: e.dModel, dFf: e.dFf });
  // y may be x (it is written last, after every read of x) but nothing else the op reads.
  checkWrittenApart(w, { y: y === x ? undefined : y, 'options.workspace': opts.workspace },
    { x, 'layer.router': layer.router, 'layer.gate': layer.gate, 'layer.up': layer.up, 'layer.down': layer.down, 'layer.selectionBias': r.bias });
  const workspace = opts.workspace === undefined ? GpuBuffer.alloc(device, bytes, 'the MoE workspace')
    : checkGpuBuffer(w, 'options.workspace', opts.workspace, device, bytes);
  const counts = GpuBuffer.alloc(device, e.nExperts * 4, 'the MoE expert counts');
  try {
    const buffers = [x, layer.router, layer.gate, layer.up, layer.down, y, counts, workspace, ...(r.bias ? [r.bias] : [])];
    const ms = await runGpuOp(device, 'moe', buffers, {
      tokens, ...r.params, dModel: e.dModel, dFf: e.dFf, weightType: WEIGHT_CODE[e.weightType],
      routerType: WEIGHT_CODE[routerType], kernel, capacity,
    }, runOpts(opts));
    const expertCounts = Array.from(await counts.read(new Int32Array(e.nExperts)));
    const dropped = capacity > 0 ? expertCounts.reduce((s, c) => s + Math.max(0, c - capacity), 0) : 0;
    return { expertCounts, dropped, ms };
  } finally {
    counts.dispose();
    if (workspace !== opts.workspace) workspace.dispose();
  }
}
