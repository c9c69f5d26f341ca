/**
 * Mixture-of-Experts dispatch (native/ops/moe.h): a router GEMM, softmax or sigmoid scores, top-k
 * selection, then each expert's SwiGLU feed-forward (gate/up/down) on the token rows routed to it,
 * weighted and summed back, plus an optional shared expert (qwen2moe). Weights are read as GGUF
 * stores them (f32, f16, bf16, q8_0, q4_0): a mapped GgufTensor (stacked ffn_*_exps tensors of GGUF
 * dims [cols, rows, nExperts]) or QuantizedWeights (one per expert for stacked weights).
 *
 * Semantics are llama.cpp's: softmax over all experts, the k largest chosen (ties to the lower
 * index), weights = the chosen scores, renormalised to sum 1 if `renormalize` (Mixtral: true,
 * qwen2moe: false), times `weightScale`. `selectionBias` only changes which experts are chosen.
 * Each matmul follows quantMatmul's precision definition.
 *
 * capacityFactor (batched prefill; off by default, results exact): each expert takes at most
 * ceil(capacityFactor * tokens * k / nExperts) token rows, in token order; a token past the
 * capacity of one of its experts gets nothing from that expert (dropped to the residual), and its
 * other weights are not renormalised.
 */
import { native, type NativeMoeWeights, type NativeQuantType } from '../binding.js';
import { InvalidArgumentError, callNative } from '../errors.js';
import { withSignal } from '../lifetime.js';
import { GgufTensor, GGUF_TENSOR_TYPES } from '../llm/gguf.js';
import { Tensor, checkTensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';
import { QuantizedWeights, type QuantVariant } from './quant.js';

export type MoeScoring = 'softmax' | 'sigmoid';
/** One matrix: `rows` rows of `cols` values. */
export type MoeMatrix = GgufTensor | QuantizedWeights;
/** Stacked experts: a GGUF tensor [cols, rows, nExperts], or one QuantizedWeights per expert. */
export type MoeExperts = GgufTensor | readonly QuantizedWeights[];

export interface MoeRouterSpec {
  /** nExperts rows of dModel (ffn_gate_inp). */
  router: MoeMatrix;
  /** Experts per token, in [1, nExperts]. */
  k: number;
  /** Default 'softmax'. */
  scoring?: MoeScoring;
  /** Divide the k weights by their sum (Mixtral). Default false (qwen2moe). */
  renormalize?: boolean;
  /** Multiplies the final weights. Default 1. */
  weightScale?: number;
  /** Added to the scores for selection only (DeepSeek-V3's exp_probs_b), nExperts values. */
  selectionBias?: Float32Array;
  /**
   * Group-limited routing (DeepSeek): the experts form `groups` groups of nExperts / groups
   * consecutive experts; only the `groupsUsed` groups whose two best selection keys (score + bias)
   * sum highest are chosen from, as llama.cpp does for V2 and V3. Default 1 (no limit).
   */
  groups?: number;
  groupsUsed?: number;
}

export interface MoeSharedExpert {
  /** dFfShared rows of dModel. */
  gate: MoeMatrix;
  up: MoeMatrix;
  /** dModel rows of dFfShared. */
  down: MoeMatrix;
  /** 1 row of dModel: the output is scaled by sigmoid(x · gateInput) (qwen2moe). Absent: scale 1. */
  gateInput?: MoeMatrix;
}

export interface MoeLayerSpec extends MoeRouterSpec {
  /** dFf rows of dModel per expert (ffn_gate_exps). */
  gate: MoeExperts;
  /** dFf rows of dModel per expert (ffn_up_exps). */
  up: MoeExperts;
  /** dModel rows of dFf per expert (ffn_down_exps). */
  down: MoeExperts;
  shared?: MoeSharedExpert;
}

export interface MoeRunOptions {
  /** Matmul kernels for every tensor ('avx512vnni' runs float tensors on 'avx512'). Default 'auto'. */
  variant?: QuantVariant;
  threads?: number;
  signal?: AbortSignal;
}

export interface MoeOptions extends MoeRunOptions {
  /** > 0: cap each expert at ceil(capacityFactor * tokens * k / nExperts) rows. Default 0 (off). */
  capacityFactor?: number;
}

export interface MoeResult {
  /** [tokens, dModel] (or [dModel] for a 1-D x): written, the residual is not added. */
  output: Tensor<'float32'>;
  /** Expert load: tokens routed to each expert (before any capacity drop). */
  expertCounts: number[];
  /** (token, expert) pairs dropped by the capacity limit. */
  dropped: number;
}

export interface MoeRouteResult {
  /** [tokens, k] chosen experts, in descending score order. */
  experts: Tensor<'int32'>;
  /** [tokens, k] their final weights. */
  weights: Tensor<'float32'>;
  /** [tokens, nExperts] softmax or sigmoid scores (before the selection bias). */
  scores: Tensor<'float32'>;
  /** Tokens routed to each expert. */
  expertCounts: number[];
}

const VARIANTS: readonly QuantVariant[] = ['auto', 'reference', 'scalar', 'avx2', 'avx512', 'avx512vnni'];
const MAX_EXPERTS = 1 << 24;

interface Mat {
  w: NativeMoeWeights;
  type: NativeQuantType;
  rows: number;
  cols: number;
  what: string;
}

function matrix(where: string, name: string, m: unknown): Mat {
  if (m instanceof QuantizedWeights) {
    return { w: { ref: m.data, index: 0, type: m.type }, type: m.type, rows: m.n, cols: m.k, what: `[${m.n}, ${m.k}] ${m.type}` };
  }
  if (m instanceof GgufTensor) {
    const [handle, index] = m.nativeRef(`${where}(${name})`);
    if (!(GGUF_TENSOR_TYPES as readonly string[]).includes(m.type)) {
      throw new InvalidArgumentError(`${where}: ${name}: tensor '${m.name}' is of type ${m.type}; the kernels read ${GGUF_TENSOR_TYPES.join(', ')}`);
    }
    if (m.dims.length < 1 || m.dims.slice(2).some((d) => d !== 1)) {
      throw new InvalidArgumentError(`${where}: ${name}: tensor '${m.name}' has dims [${m.dims.join(', ')}]; a matrix is [cols, rows]`);
    }
    const type = m.type as NativeQuantType;
    return { w: { ref: handle, index, type }, type, rows: m.dims[1] ?? 1, cols: m.dims[0]!, what: `tensor '${m.name}' [${m.dims.join(', ')}]` };
  }
  throw new InvalidArgumentError(`${where}: ${name} must be a GgufTensor or QuantizedWeights, got ${describe(m)}`);
}

interface Stack {
  w: NativeMoeWeights;
  type: NativeQuantType;
  experts: number;
  rows: number;
  cols: number;
}

// The operator reads one stacked buffer, as GGUF stores the experts. Stacking copies every expert,
// so the result is kept per array (and rebuilt if its elements are replaced): a layer passed again
// and again, as in a decode loop, is copied once. QuantizedWeights are treated as immutable (as
// quantizeWeights makes them); writing into one's bytes after a call is not seen by the next.
const stacks = new WeakMap<readonly QuantizedWeights[], { items: QuantizedWeights[]; data: Uint8Array }>();

function stacked(list: readonly QuantizedWeights[], bytes: number): Uint8Array {
  const hit = stacks.get(list);
  if (hit && hit.items.length === list.length && hit.items.every((q, e) => q === list[e])) {
    return hit.data;
  }
  const data = new Uint8Array(bytes);
  let at = 0;
  for (const q of list) {
    data.set(q.data, at);
    at += q.data.byteLength;
  }
  stacks.set(list, { items: [...list], data });
  return data;
}

function experts(where: string, name: string, s: unknown): Stack {
  if (s instanceof GgufTensor) {
    const [handle, index] = s.nativeRef(`${where}(${name})`);
    if (!(GGUF_TENSOR_TYPES as readonly string[]).includes(s.type)) {
      throw new InvalidArgumentError(`${where}: ${name}: tensor '${s.name}' is of type ${s.type}; the kernels read ${GGUF_TENSOR_TYPES.join(', ')}`);
    }
    if (s.dims.length !== 3) {
      throw new InvalidArgumentError(`${where}: ${name}: tensor '${s.name}' has dims [${s.dims.join(', ')}]; stacked experts are [cols, rows, nExperts]`);
    }
    const type = s.type as NativeQuantType;
    return { w: { ref: handle, index, type }, type, experts: s.dims[2]!, rows: s.dims[1]!, cols: s.dims[0]! };
  }
  if (Array.isArray(s)) {
    if (s.length === 0) throw new InvalidArgumentError(`${where}: ${name} must hold at least one expert`);
    const first = s[0];
    if (!(first instanceof QuantizedWeights)) {
      throw new InvalidArgumentError(`${where}: ${name}[0] must be QuantizedWeights, got ${describe(first)}`);
    }
    let bytes = 0;
    for (let e = 0; e < s.length; e++) {
      const q = s[e] as unknown;
      if (!(q instanceof QuantizedWeights)) throw new InvalidArgumentError(`${where}: ${name}[${e}] must be QuantizedWeights, got ${describe(q)}`);
      if (q.type !== first.type || q.n !== first.n || q.k !== first.k) {
        throw new InvalidArgumentError(`${where}: ${name}[${e}] is [${q.n}, ${q.k}] ${q.type}, but ${name}[0] is [${first.n}, ${first.k}] ${first.type}; every expert must match`);
      }
      bytes += q.data.byteLength;
    }
    const data = stacked(s as readonly QuantizedWeights[], bytes);
    return { w: { ref: data, index: 0, type: first.type }, type: first.type, experts: s.length, rows: first.n, cols: first.k };
  }
  throw new InvalidArgumentError(`${where}: ${name} must be a GgufTensor [cols, rows, nExperts] or an array of QuantizedWeights, got ${describe(s)}`);
}

function checkShape(where: string, name: string, got: { rows: number; cols: number }, rows: number, cols: number, what: string): void {
  if (got.rows !== rows || got.cols !== cols) {
    throw new InvalidArgumentError(`${where}: ${name} must be ${rows} rows of ${cols} (${what}), got ${got.rows} rows of ${got.cols}`);
  }
}

function blockCheck(where: string, name: string, type: NativeQuantType, cols: number): void {
  if ((type === 'q8_0' || type === 'q4_0') && cols % 32 !== 0) {
    throw new InvalidArgumentError(`${where}: ${name} is ${type}, whose rows need a multiple of 32 values; got ${cols}`);
  }
}

function xArg(where: string, x: unknown): { tokens: number; dModel: number; t: Tensor<'float32'> } {
  const t = checkTensor(`${where}(x)`, x, 'float32');
  if (t.dims.length !== 1 && t.dims.length !== 2) {
    throw new InvalidArgumentError(`${where}(x) must be [dModel] or [tokens, dModel], got dims [${t.dims.join(', ')}]`);
  }
  return { tokens: t.dims.length === 2 ? t.dims[0]! : 1, dModel: t.dims[t.dims.length - 1]!, t };
}

function routerSpec(where: string, layer: unknown, dModel: number) {
  if (typeof layer !== 'object' || layer === null) throw new InvalidArgumentError(`${where}(layer) must be an object, got ${describe(layer)}`);
  const l = layer as MoeLayerSpec;
  const router = matrix(where, 'layer.router', l.router);
  const nExperts = router.rows;
  if (nExperts < 1 || nExperts > MAX_EXPERTS) throw new InvalidArgumentError(`${where}: layer.router must have 1 to ${MAX_EXPERTS} rows (experts), got ${nExperts}`);
  if (router.cols !== dModel) {
    throw new InvalidArgumentError(`${where}: shape mismatch: x has dModel = ${dModel} but layer.router is ${router.what} (${router.cols} per row)`);
  }
  blockCheck(where, 'layer.router', router.type, dModel);
  const k = checkInt(`${where}: layer.k`, l.k, 1, nExperts);
  const scoring = checkOneOf(`${where}: layer.scoring`, l.scoring ?? 'softmax', ['softmax', 'sigmoid'] as const);
  if (l.renormalize !== undefined && typeof l.renormalize !== 'boolean') {
    throw new InvalidArgumentError(`${where}: layer.renormalize must be a boolean, got ${describe(l.renormalize)}`);
  }
  const weightScale = l.weightScale ?? 1;
  if (typeof weightScale !== 'number' || !Number.isFinite(weightScale)) {
    throw new InvalidArgumentError(`${where}: layer.weightScale must be a finite number, got ${describe(l.weightScale)}`);
  }
  let selectionBias: Float32Array | undefined;
  if (l.selectionBias !== undefined) {
    if (!(l.selectionBias instanceof Float32Array) || l.selectionBias.length !== nExperts) {
      throw new InvalidArgumentError(`${where}: layer.selectionBias must be a Float32Array of nExperts = ${nExperts} values, got ${describe(l.selectionBias)}`);
    }
    selectionBias = l.selectionBias;
  }
  const groups = l.groups === undefined ? 1 : checkInt(`${where}: layer.groups`, l.groups, 1, nExperts);
  if (nExperts % groups !== 0) {
    throw new InvalidArgumentError(`${where}: layer.groups = ${groups} does not divide the ${nExperts} experts`);
  }
  const groupsUsed = l.groupsUsed === undefined ? groups : checkInt(`${where}: layer.groupsUsed`, l.groupsUsed, 1, groups);
  if (k > groupsUsed * (nExperts / groups)) {
    throw new InvalidArgumentError(`${where}: layer.k = ${k} experts do not fit in groupsUsed = ${groupsUsed} groups of ${nExperts / groups}`);
  }
  return { router, nExperts, k, scoring, renormalize: l.renormalize ?? false, weightScale, selectionBias, groups, groupsUsed };
}

function runOptions(where: string, opts: Partial<MoeOptions>) {
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS);
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  return { variant, threads, signal };
}

/** Routes each token: the chosen experts, their weights and all scores. */
export async function moeRoute(x: Tensor<'float32'>, layer: MoeRouterSpec, options?: MoeRunOptions): Promise<MoeRouteResult> {
  const site = new Error();
  const where = 'moeRoute';
  const opts = checkOptions<MoeRunOptions>(where, options, ['variant', 'threads', 'signal']);
  const { tokens, dModel, t } = xArg(where, x);
  const r = routerSpec(where, layer, dModel);
  const { variant, threads, signal } = runOptions(where, opts);
  const ids = new Int32Array(tokens * r.k);
  const weights = new Float32Array(tokens * r.k);
  const scores = new Float32Array(tokens * r.nExperts);
  await callNative(() => withSignal(signal, (token) => native().moeRoute(t.data, ids, weights, scores, {
    tokens, dModel, nExperts: r.nExperts, k: r.k, router: r.router.w, scoring: r.scoring, renormalize: r.renormalize,
    weightScale: r.weightScale, selectionBias: r.selectionBias, groups: r.groups, groupsUsed: r.groupsUsed, variant, threads,
    cancel: token,
  })), site);
  const expertCounts = new Array<number>(r.nExperts).fill(0);
  for (const e of ids) expertCounts[e]! += 1;
  return {
    experts: new Tensor('int32', ids, [tokens, r.k]),
    weights: new Tensor('float32', weights, [tokens, r.k]),
    scores: new Tensor('float32', scores, [tokens, r.nExperts]),
    expertCounts,
  };
}

/** y = MoE(x) for x [tokens, dModel] (or [dModel]); resolves with y and the expert load. */
export async function moe(x: Tensor<'float32'>, layer: MoeLayerSpec, options?: MoeOptions): Promise<MoeResult> {
  const site = new Error();
  const where = 'moe';
  const opts = checkOptions<MoeOptions>(where, options, ['capacityFactor', 'variant', 'threads', 'signal']);
  const { tokens, dModel, t } = xArg(where, x);
  const r = routerSpec(where, layer, dModel);
  const gate = experts(where, 'layer.gate', layer.gate);
  const up = experts(where, 'layer.up', layer.up);
  const down = experts(where, 'layer.down', layer.down);
  const dFf = gate.rows;
  for (const [name, s] of [['layer.gate', gate], ['layer.up', up], ['layer.down', down]] as const) {
    if (s.experts !== r.nExperts) {
      throw new InvalidArgumentError(`${where}: ${name} holds ${s.experts} experts but layer.router has ${r.nExperts} rows (experts)`);
    }
  }
  if (dFf < 1) throw new InvalidArgumentError(`${where}: layer.gate must have at least one row`);
  checkShape(where, 'layer.gate (per expert)', gate, dFf, dModel, 'dFf x dModel');
  checkShape(where, 'layer.up (per expert)', up, dFf, dModel, 'dFf x dModel, as layer.gate');
  checkShape(where, 'layer.down (per expert)', down, dModel, dFf, 'dModel x dFf');
  blockCheck(where, 'layer.gate', gate.type, dModel);
  blockCheck(where, 'layer.up', up.type, dModel);
  blockCheck(where, 'layer.down', down.type, dFf);
  let shared: { dFf: number; gate: NativeMoeWeights; up: NativeMoeWeights; down: NativeMoeWeights; gateInput?: NativeMoeWeights } | undefined;
  if (layer.shared !== undefined) {
    const s = layer.shared;
    if (typeof s !== 'object' || s === null) throw new InvalidArgumentError(`${where}: layer.shared must be an object, got ${describe(s)}`);
    const sg = matrix(where, 'layer.shared.gate', s.gate);
    const su = matrix(where, 'layer.shared.up', s.up);
    const sd = matrix(where, 'layer.shared.down', s.down);
    const sf = sg.rows;
    checkShape(where, 'layer.shared.gate', sg, sf, dModel, 'dFfShared x dModel');
    checkShape(where, 'layer.shared.up', su, sf, dModel, 'dFfShared x dModel, as layer.shared.gate');
    checkShape(where, 'layer.shared.down', sd, dModel, sf, 'dModel x dFfShared');
    blockCheck(where, 'layer.shared.gate', sg.type, dModel);
    blockCheck(where, 'layer.shared.up', su.type, dModel);
    blockCheck(where, 'layer.shared.down', sd.type, sf);
    shared = { dFf: sf, gate: sg.w, up: su.w, down: sd.w };
    if (s.gateInput !== undefined) {
      const gi = matrix(where, 'layer.shared.gateInput', s.gateInput);
      checkShape(where, 'layer.shared.gateInput', gi, 1, dModel, '1 x dModel');
      blockCheck(where, 'layer.shared.gateInput', gi.type, dModel);
      shared.gateInput = gi.w;
    }
  }
  const capacityFactor = opts.capacityFactor ?? 0;
  if (typeof capacityFactor !== 'number' || !Number.isFinite(capacityFactor) || capacityFactor < 0) {
    throw new InvalidArgumentError(`${where}: options.capacityFactor must be a finite number >= 0 (0 = off), got ${describe(opts.capacityFactor)}`);
  }
  const { variant, threads, signal } = runOptions(where, opts);
  const out = new Float32Array(tokens * dModel);
  const res = await callNative(() => withSignal(signal, (token) => native().moe(t.data, out, {
    tokens, dModel, dFf, nExperts: r.nExperts, k: r.k, router: r.router.w, gate: gate.w, up: up.w, down: down.w,
    scoring: r.scoring, renormalize: r.renormalize, weightScale: r.weightScale, selectionBias: r.selectionBias,
    groups: r.groups, groupsUsed: r.groupsUsed, shared,
    capacityFactor, variant, threads, cancel: token,
  })), site);
  return { output: new Tensor('float32', out, x.dims.length === 2 ? [tokens, dModel] : [dModel]), expertCounts: res.expertCounts, dropped: res.dropped };
}

