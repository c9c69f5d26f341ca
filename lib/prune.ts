/**
 * Magnitude pruning of an ONNX model's weights: the smallest weights (or 1 x W blocks of them) of
 * each Conv / Gemm / MatMul layer become zeros, which sessions then run on sparse kernels. This is
 * pruning without retraining: accuracy drops with sparsity (README: "Pruning"), so the report
 * gives, per layer, how much of the weights' norm was removed, the number that predicts the damage.
 *
 * The rewrite works on the decoded ModelProto so that everything else in the file (metadata, other
 * initializers, opsets, subgraphs) is written back unchanged; only the pruned weights are replaced.
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { InvalidArgumentError, ModelFormatError } from './errors.js';
import { loadOnnxProto, parseModel, type OnnxNode } from './onnx/model.js';
import { checkInt, checkOneOf, checkOptions, describe } from './validate.js';

const onnx = (): ProtoNamespace => loadOnnxProto() as ProtoNamespace;

export type PruneStructure = 'unstructured' | 'block';
/** A layer selector: a string is the exact node name or weight (initializer) name; a RegExp is tested on both. */
export type LayerPattern = string | RegExp;

export interface PruneOptions {
  /** Fraction of each pruned layer's weights set to zero, in [0, 1). Give this or `threshold`. */
  sparsity?: number;
  /** Zero every weight with |w| < threshold (for 'block': every block whose RMS is below it). */
  threshold?: number;
  /**
   * 'unstructured' (default): individual weights, the most accurate at a given sparsity.
   * 'block': 1 x blockSize blocks of consecutive output channels that share one input position,
   * the blocks sonde's BSR kernels skip whole (faster than unstructured at the same sparsity, less
   * accurate).
   */
  structure?: PruneStructure;
  /** Block width for 'block' (8, 16 or 32; default 16: one AVX-512 vector, two AVX2 ones). */
  blockSize?: number;
  /** Only these layers are pruned (default: all prunable layers). */
  include?: readonly LayerPattern[];
  /** These layers are never pruned. */
  exclude?: readonly LayerPattern[];
  /**
   * Keep the first prunable layer (in graph order) dense. Default true: it sees the raw input, has
   * few weights (so little to gain) and is where pruning costs the most accuracy.
   */
  keepFirstLayerDense?: boolean;
  /**
   * How pruned weights are stored: 'dense' (default) keeps the initializer's shape with explicit
   * zeros (any ONNX runtime reads it); 'sparse' writes a sparse_initializer (values + int64
   * indices): smaller files above ~67% sparsity; onnxruntime and sonde load both.
   */
  storage?: 'dense' | 'sparse';
  /** Called after each layer, e.g. to draw a progress bar. */
  onProgress?: (progress: { done: number; total: number; layer: string }) => void;
}

export interface PrunedLayer {
  /** The ONNX node name. */
  layer: string;
  opType: 'Conv' | 'Gemm' | 'MatMul';
  /** The weight initializer's name. */
  weight: string;
  shape: number[];
  /** Weights in the layer. */
  size: number;
  /** Fraction of zeros in the weights after pruning (also counts zeros that were already there). */
  sparsity: number;
  /** ||removed|| / ||w||: the L2 norm of the weights set to zero, relative to the layer's. */
  normRemoved: number;
  pruned: boolean;
  /** Why a prunable layer was left alone (excluded, not included, first layer, shared weight). */
  skipped?: string;
}

export interface PruneReport {
  layers: PrunedLayer[];
  /** Zeros / weights over the pruned layers. */
  sparsity: number;
  /** Zeros / weights over every prunable layer, pruned or not. */
  overallSparsity: number;
  prunedLayers: number;
}

export interface PruneResult {
  /** The pruned model, an ONNX ModelProto. */
  bytes: Uint8Array;
  report: PruneReport;
}

const OPTIONS = ['sparsity', 'threshold', 'structure', 'blockSize', 'include', 'exclude', 'keepFirstLayerDense', 'storage', 'onProgress'];
const BLOCK_SIZES = [8, 16, 32];

interface Candidate {
  node: OnnxNode;
  opType: 'Conv' | 'Gemm' | 'MatMul';
  weight: string;
  /** The axis whose consecutive entries form a block: the output-channel axis. */
  blockAxis: number;
}

/**
 * Prunes a model's Conv, Gemm and MatMul weights by magnitude. Resolves to the new model's bytes
 * and a per-layer report; the input (bytes or file) is never modified.
 */
export async function prune(model: string | Uint8Array, options: PruneOptions): Promise<PruneResult> {
  const where = 'prune';
  if (options === undefined) throw new InvalidArgumentError(`${where}: options must give sparsity or threshold`);
  const opts = checkOptions<PruneOptions>(where, options, OPTIONS);
  if ((opts.sparsity === undefined) === (opts.threshold === undefined)) {
    throw new InvalidArgumentError(`${where}: give exactly one of options.sparsity and options.threshold, got ${
      opts.sparsity === undefined ? 'neither' : 'both'}`);
  }
  if (opts.sparsity !== undefined && (typeof opts.sparsity !== 'number' || !(opts.sparsity >= 0 && opts.sparsity < 1))) {
    throw new InvalidArgumentError(`${where}: options.sparsity must be a number in [0, 1), got ${describe(opts.sparsity)}`);
  }
  if (opts.threshold !== undefined && (typeof opts.threshold !== 'number' || !Number.isFinite(opts.threshold) || opts.threshold < 0)) {
    throw new InvalidArgumentError(`${where}: options.threshold must be a finite number >= 0, got ${describe(opts.threshold)}`);
  }
  const structure = checkOneOf(`${where}: options.structure`, opts.structure ?? 'unstructured', ['unstructured', 'block'] as const);
  let blockSize = 1;
  if (structure === 'block') {
    blockSize = checkInt(`${where}: options.blockSize`, opts.blockSize ?? 16, 1, 1024);
    if (!BLOCK_SIZES.includes(blockSize)) throw new InvalidArgumentError(`${where}: options.blockSize must be 8, 16 or 32, got ${blockSize}`);
  } else if (opts.blockSize !== undefined) {
    throw new InvalidArgumentError(`${where}: options.blockSize needs structure 'block'`);
  }
  const include = checkPatterns(`${where}: options.include`, opts.include);
  const exclude = checkPatterns(`${where}: options.exclude`, opts.exclude) ?? [];
  if (opts.keepFirstLayerDense !== undefined && typeof opts.keepFirstLayerDense !== 'boolean') {
    throw new InvalidArgumentError(`${where}: options.keepFirstLayerDense must be a boolean, got ${describe(opts.keepFirstLayerDense)}`);
  }
  const keepFirst = opts.keepFirstLayerDense ?? true;
  const storage = checkOneOf(`${where}: options.storage`, opts.storage ?? 'dense', ['dense', 'sparse'] as const);
  if (opts.onProgress !== undefined && typeof opts.onProgress !== 'function') {
    throw new InvalidArgumentError(`${where}: options.onProgress must be a function, got ${describe(opts.onProgress)}`);
  }

  let bytes: Uint8Array;
  let source: string;
  let baseDir: string | undefined;
  if (typeof model === 'string') {
    source = model;
    baseDir = dirname(resolve(model));
    try {
      bytes = await readFile(model);
    } catch (err) {
      throw new InvalidArgumentError(`${where}: cannot read model file '${model}': ${(err as Error).message}`, { cause: err });
    }
  } else if (model instanceof Uint8Array) {
    bytes = model;
    source = 'the model bytes';
  } else {
    throw new InvalidArgumentError(`${where}: model must be a file path or a Uint8Array, got ${describe(model)}`);
  }
  // parseModel validates the whole file (typed errors for anything malformed) and gives every
  // weight dense, whatever its storage (raw, typed fields, external file, sparse initializer).
  const parsed = parseModel(bytes, { baseDir, source });
  const graph = parsed.graph;

  const candidates: Candidate[] = [];
  // Which (node, input slot) reads each initializer: a weight also read elsewhere (a Gemm's bias, a
  // Reshape) must keep its values, so it is not pruned.
  const uses = new Map<string, { node: OnnxNode; slot: number }[]>();
  for (const node of graph.nodes) {
    node.inputs.forEach((name, slot) => {
      if (!name || !graph.initializers.has(name)) return;
      if (!uses.has(name)) uses.set(name, []);
      uses.get(name)!.push({ node, slot });
    });
  }
  const isWeightSlot = (node: OnnxNode, slot: number) => slot === 1 && node.domain === '' &&
    (node.opType === 'Conv' || node.opType === 'Gemm' || node.opType === 'MatMul');
  for (const node of graph.nodes) {
    if (node.domain !== '' || (node.opType !== 'Conv' && node.opType !== 'Gemm' && node.opType !== 'MatMul')) continue;
    const weight = node.inputs[1];
    const w = weight ? graph.initializers.get(weight) : undefined;
    if (!weight || !w || w.dtype !== 'float32') continue;
    // A MatMul whose first input is the initializer has its weights on the left: not a layer.
    if (node.opType === 'MatMul' && (w.dims.length !== 2 || graph.initializers.has(node.inputs[0] ?? ''))) continue;
    if (node.opType === 'Gemm' && w.dims.length !== 2) continue;
    if (node.opType === 'Conv' && w.dims.length < 3) continue;
    const blockAxis = node.opType === 'Conv' ? 0 : node.opType === 'Gemm' && node.attributes.transB === 1 ? 0 : 1;
    candidates.push({ node, opType: node.opType, weight, blockAxis });
  }
  if (candidates.length === 0) {
    throw new InvalidArgumentError(`${where}: ${source} has no prunable layer (a Conv, Gemm or MatMul with float32 initializer weights)`);
  }

  const layers: PrunedLayer[] = [];
  const done = new Map<string, PrunedLayer>();
  const replaced = new Map<string, Float32Array>();
  const toPrune: { c: Candidate; entry: PrunedLayer }[] = [];
  candidates.forEach((c, i) => {
    const w = graph.initializers.get(c.weight)!;
    const entry: PrunedLayer = {
      layer: c.node.name, opType: c.opType, weight: c.weight, shape: [...w.dims], size: w.size,
      sparsity: zeroFraction(w.data as Float32Array), normRemoved: 0, pruned: false,
    };
    layers.push(entry);
    const matches = (p: LayerPattern) => (typeof p === 'string' ? p === c.node.name || p === c.weight : p.test(c.node.name) || p.test(c.weight));
    if (done.has(c.weight)) entry.skipped = `shares weight '${c.weight}' with layer '${done.get(c.weight)!.layer}'`;
    else if (uses.get(c.weight)!.some((u) => !isWeightSlot(u.node, u.slot))) entry.skipped = `weight '${c.weight}' is also read as a non-weight input`;
    else if (keepFirst && i === 0) entry.skipped = 'first layer kept dense (keepFirstLayerDense)';
    else if (include && !include.some(matches)) entry.skipped = 'not in options.include';
    else if (exclude.some(matches)) entry.skipped = 'in options.exclude';
    else toPrune.push({ c, entry });
    done.set(c.weight, entry);
  });
  if (toPrune.length === 0) {
    throw new InvalidArgumentError(`${where}: the options leave no layer to prune (${layers.map((l) => `'${l.layer}': ${l.skipped}`).join('; ')})`);
  }

  for (let i = 0; i < toPrune.length; i++) {
    const { c, entry } = toPrune[i]!;
    const w = graph.initializers.get(c.weight)!;
    const data = Float32Array.from(w.data as Float32Array);
    const { removedSq, totalSq } = structure === 'block'
      ? pruneBlocks(data, w.dims, c.blockAxis, blockSize, opts.sparsity, opts.threshold)
      : pruneWeights(data, opts.sparsity, opts.threshold);
    replaced.set(c.weight, data);
    entry.pruned = true;
    entry.sparsity = zeroFraction(data);
    entry.normRemoved = totalSq > 0 ? Math.sqrt(removedSq / totalSq) : 0;
    opts.onProgress?.({ done: i + 1, total: toPrune.length, layer: c.node.name });
    // Large models take seconds; giving the event loop a turn per layer keeps a service responsive.
    await new Promise<void>((r) => setImmediate(r));
  }

  const proto = onnx().ModelProto.decode(bytes);
  const g = proto.graph!;
  g.initializer = (g.initializer ?? []).filter((t) => !replaced.has(t.name ?? ''));
  g.sparseInitializer = (g.sparseInitializer ?? []).filter((st) => !replaced.has(st.values?.name ?? ''));
  // Weights stored in external files are written inline: the pruned model goes wherever the caller
  // writes it, where paths relative to the original model's folder would no longer resolve.
  for (const t of g.initializer) {
    if (t.dataLocation !== EXTERNAL) continue;
    const dense = graph.initializers.get(t.name ?? '')!;
    const d = dense.data as unknown as ArrayBufferView;
    t.rawData = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
    t.dataLocation = 0;
    t.externalData = [];
    t.floatData = [];
    t.int32Data = [];
    t.int64Data = [];
  }
  for (const [name, data] of replaced) {
    const dims = [...graph.initializers.get(name)!.dims];
    if (storage === 'dense') {
      g.initializer.push({ name, dataType: FLOAT, dims, rawData: bytesOf(data) });
    } else {
      g.sparseInitializer.push(sparseProto(name, data, dims));
    }
  }
  let out: Uint8Array;
  try {
    out = onnx().ModelProto.encode(proto).finish();
  } catch (err) {
    throw new ModelFormatError(`${where}: could not encode the pruned model: ${(err as Error).message}`, { cause: err });
  }

  let zeros = 0, size = 0, allZeros = 0, allSize = 0;
  for (const l of layers) {
    if (l.skipped?.startsWith('shares weight')) continue;
    allZeros += l.sparsity * l.size;
    allSize += l.size;
    if (l.pruned) { zeros += l.sparsity * l.size; size += l.size; }
  }
  return {
    bytes: out,
    report: { layers, sparsity: size ? zeros / size : 0, overallSparsity: allSize ? allZeros / allSize : 0, prunedLayers: toPrune.length },
  };
}

function checkPatterns(where: string, v: unknown): LayerPattern[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v)) throw new InvalidArgumentError(`${where} must be an array of strings or RegExps, got ${describe(v)}`);
  v.forEach((p, i) => {
    if (typeof p !== 'string' && !(p instanceof RegExp)) throw new InvalidArgumentError(`${where}[${i}] must be a string or a RegExp, got ${describe(p)}`);
  });
  return v as LayerPattern[];
}

function zeroFraction(d: Float32Array): number {
  let z = 0;
  for (let i = 0; i < d.length; i++) if (d[i] === 0) z++;
  return d.length ? z / d.length : 0;
}

/**
 * Zeros exactly round(sparsity * n) weights, the smallest by magnitude (ties broken by position so
 * the count is exact), or every |w| < threshold. Returns squared norms for the report.
 */
function pruneWeights(d: Float32Array, sparsity: number | undefined, threshold: number | undefined): { removedSq: number; totalSq: number } {
  let totalSq = 0;
  for (let i = 0; i < d.length; i++) totalSq += d[i]! * d[i]!;
  let removedSq = 0;
  const zero = (i: number) => { removedSq += d[i]! * d[i]!; d[i] = 0; };
  if (threshold !== undefined) {
    for (let i = 0; i < d.length; i++) if (Math.abs(d[i]!) < threshold) zero(i);
    return { removedSq, totalSq };
  }
  const k = Math.round(sparsity! * d.length);
  if (k === 0) return { removedSq, totalSq };
  const mags = new Float32Array(d.length);
  // NaN ranks above every number, so NaN weights are never pruned before finite ones.
  for (let i = 0; i < d.length; i++) mags[i] = Number.isNaN(d[i]!) ? Infinity : Math.abs(d[i]!);
  const cut = selectKth(mags, k - 1);
  let count = 0;
  for (let i = 0; i < d.length; i++) if (Math.abs(d[i]!) < cut) { zero(i); count++; }
  for (let i = 0; i < d.length && count < k; i++) if (Math.abs(d[i]!) === cut) { zero(i); count++; }
  return { removedSq, totalSq };
}

/**
 * The value that would sit at index `k` if `a` were sorted ascending (a is reordered): Hoare's
 * quickselect with a median-of-three pivot, O(n) on average where a sort is O(n log n); a
 * ResNet-50 layer has up to 2.4M weights.
 */
export function selectKth(a: Float32Array, k: number): number {
  let lo = 0, hi = a.length - 1;
  while (hi > lo) {
    const mid = (lo + hi) >>> 1;
    // Median of three as the pivot, so sorted or constant runs do not degrade to O(n^2).
    const x = a[lo]!, y = a[mid]!, z = a[hi]!;
    const pivot = x < y ? (y < z ? y : x < z ? z : x) : (x < z ? x : y < z ? z : y);
    let i = lo, j = hi;
    while (i <= j) {
      while (a[i]! < pivot) i++;
      while (a[j]! > pivot) j--;
      if (i <= j) {
        const t = a[i]!; a[i] = a[j]!; a[j] = t;
        i++; j--;
      }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else return a[k]!;
  }
  return a[k]!;
}

/**
 * Block pruning: a block is up to `width` consecutive entries along `axis` (the output channels)
 * at one position of the other axes, scored by its mean square. Blocks go smallest first until the
 * zeroed count is nearest round(sparsity * n); with a threshold, blocks whose RMS < threshold.
 */
function pruneBlocks(d: Float32Array, dims: readonly number[], axis: number, width: number, sparsity: number | undefined,
  threshold: number | undefined): { removedSq: number; totalSq: number } {
  const outer = dims.slice(0, axis).reduce((a, b) => a * b, 1);
  const len = dims[axis]!;
  const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
  const perLine = Math.ceil(len / width);
  const nBlocks = outer * perLine * inner;
  const score = new Float64Array(nBlocks);
  const count = new Uint32Array(nBlocks);
  // Block b = (o, j, i): entries (o, j*width .. j*width+width-1, i).
  const each = (b: number, f: (idx: number) => void) => {
    const i = b % inner, oj = (b - i) / inner, j = oj % perLine, o = (oj - j) / perLine;
    const end = Math.min(len, (j + 1) * width);
    for (let c = j * width; c < end; c++) f((o * len + c) * inner + i);
  };
  let totalSq = 0;
  for (let b = 0; b < nBlocks; b++) {
    let s = 0, n = 0;
    each(b, (idx) => { s += d[idx]! * d[idx]!; n++; });
    totalSq += s;
    score[b] = s / n;
    count[b] = n;
  }
  let removedSq = 0;
  const zero = (b: number) => each(b, (idx) => { removedSq += d[idx]! * d[idx]!; d[idx] = 0; });
  if (threshold !== undefined) {
    for (let b = 0; b < nBlocks; b++) if (Math.sqrt(score[b]!) < threshold) zero(b);
    return { removedSq, totalSq };
  }
  const target = Math.round(sparsity! * d.length);
  const order = Array.from({ length: nBlocks }, (_, b) => b).sort((x, y) => score[x]! - score[y]! || x - y);
  let zeroed = 0;
  for (const b of order) {
    // Stop where one more block would land farther from the target than stopping here.
    if (zeroed + count[b]! / 2 > target) break;
    zero(b);
    zeroed += count[b]!;
  }
  return { removedSq, totalSq };
}

function bytesOf(d: Float32Array): Uint8Array {
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
}

function sparseProto(name: string, d: Float32Array, dims: number[]): ProtoSparseTensor {
  let nnz = 0;
  for (let i = 0; i < d.length; i++) if (d[i] !== 0) nnz++;
  const values = new Float32Array(nnz);
  const indices = new BigInt64Array(nnz);
  for (let i = 0, p = 0; i < d.length; i++) {
    if (d[i] !== 0) { values[p] = d[i]!; indices[p++] = BigInt(i); }
  }
  return {
    values: { name, dataType: FLOAT, dims: [nnz], rawData: bytesOf(values) },
    indices: { name: `${name}_indices`, dataType: INT64, dims: [nnz], rawData: new Uint8Array(indices.buffer) },
    dims,
  };
}

const FLOAT = 1;
const INT64 = 7;
const EXTERNAL = 1; // TensorProto.DataLocation

// The parts of onnx-proto's generated types this file writes.
interface ProtoTensorOut {
  name?: string | null; dataType?: number | null; dims?: unknown[] | null; rawData?: Uint8Array | null; dataLocation?: number | null;
  externalData?: unknown[] | null; floatData?: number[] | null; int32Data?: number[] | null; int64Data?: unknown[] | null;
}
interface ProtoSparseTensor { values?: ProtoTensorOut | null; indices?: ProtoTensorOut | null; dims?: unknown[] | null }
interface ProtoGraphOut { initializer?: ProtoTensorOut[] | null; sparseInitializer?: ProtoSparseTensor[] | null }
interface ProtoNamespace {
  ModelProto: { decode(b: Uint8Array): { graph?: ProtoGraphOut | null }; encode(m: object): { finish(): Uint8Array } };
}
