/**
 * GPU attention over the paged KV block pool (native/kernels/attention/cuda/): decode (split-K;
 * tensor cores for 16-bit KV, the query heads of a KV group as the rows of an mma), causal prefill
 * (tensor cores for 16-bit KV), MLA's absorbed decode over the latent cache (each latent row read
 * once for every head), and RoPE. The pool is one device buffer of `numBlocks` blocks laid out as the CPU pool's
 * (native/ops/kv_pool.h): [layer][stream][position][row] per block, so blocks move between the two
 * byte for byte. Block tables and lengths come from the TS scheduler as host arrays: they are
 * validated here (naming the sequence and entry) and uploaded with the call.
 */
import { InvalidArgumentError } from '../errors.js';
import { checkInt, checkOneOf, checkOptions, describe } from '../validate.js';
import { checkGpuBuffer, checkWrittenApart } from './kernels.js';
import { GpuBuffer, runGpuOp, type GpuDeviceId, type GpuRunOptions } from './runtime.js';

export const GPU_KV_DTYPE = { f32: 0, f16: 1, bf16: 2 } as const;
/** KV element type: the CPU pool's f32 and f16 (IEEE half), or bf16 (GPU only). */
export type GpuKvDtype = keyof typeof GPU_KV_DTYPE;

/** Where the attended layer's rows are: the pool's geometry. */
export interface GpuKvPoolLayout {
  numBlocks: number;
  /** Positions per block. */
  blockSize: number;
  dtype: GpuKvDtype;
  /** Layers per block (default 1) and the layer attended (default 0). */
  layers?: number;
  layer?: number;
}

export interface GpuAttentionHeads {
  heads: number;
  /** KV heads; heads must be a multiple (GQA groups of heads / kvHeads). */
  kvHeads: number;
  headDim: number;
  /** Score scale; default 1 / sqrt(headDim). */
  scale?: number;
}

export interface GpuDecodeBuffers {
  /** float32 [seqs][heads][headDim] (MLA: absorbed queries, kvLora + ropeDim per head). */
  q: GpuBuffer;
  pool: GpuBuffer;
  /** float32 [seqs][heads][headDim] (MLA: kvLora per head). */
  out: GpuBuffer;
  /** Scratch for the split-K partials; allocated per call when absent. Its size bounds the split count. */
  workspace?: GpuBuffer;
  /**
   * out also quantised as the q8_0 / q4_0 products take their activations (a value width that is
   * a multiple of 32): int8 [seqs][heads * valueDim], then one float32 scale per 32 values.
   */
  quantized?: GpuBuffer;
}

export interface GpuDecodeSequences {
  /** Per sequence, its blocks in position order. */
  blockTables: readonly (readonly number[] | Int32Array)[];
  /** Per sequence, the positions attended: [0, seqLens[i]) (the new token's position + 1). */
  seqLens: readonly number[];
}

export interface GpuAttentionOptions extends GpuRunOptions {
  /** Decode: positions per split (default: chosen from the device's SM count). */
  splitLen?: number;
  /** Use the SIMT kernel even where the tensor-core one applies (decode and prefill). */
  simt?: boolean;
  /** Decode: positions per tensor-core tile, 32 or 64 (default: chosen from the device's shared memory). */
  tile?: 32 | 64;
}

const OPTION_KEYS = ['reps', 'splitLen', 'simt', 'tile'] as const;
const MAX_HEAD_DIM = 256, MAX_MLA_ROW = 576, MIN_SPLIT = 256;

interface PoolParams {
  numBlocks: number;
  blockSize: number;
  dtype: number;
  layers: number;
  layer: number;
  elemBytes: number;
}

function checkPool(w: string, p: GpuKvPoolLayout): PoolParams {
  if (p === null || typeof p !== 'object') throw new InvalidArgumentError(`${w}: the pool layout must be an object, got ${describe(p)}`);
  const dtype = checkOneOf(`${w}: dtype`, p.dtype, Object.keys(GPU_KV_DTYPE) as GpuKvDtype[]);
  const layers = checkInt(`${w}: layers`, p.layers ?? 1, 1, 4096);
  return {
    numBlocks: checkInt(`${w}: numBlocks`, p.numBlocks, 1, 2 ** 31 - 1),
    blockSize: checkInt(`${w}: blockSize`, p.blockSize, 1, 65536),
    dtype: GPU_KV_DTYPE[dtype],
    layers,
    layer: checkInt(`${w}: layer`, p.layer ?? 0, 0, layers - 1),
    elemBytes: dtype === 'f32' ? 4 : 2,
  };
}

function checkScale(w: string, scale: unknown, fallback: number): number {
  if (scale === undefined) return fallback;
  if (typeof scale !== 'number' || !Number.isFinite(scale)) throw new InvalidArgumentError(`${w}: scale must be a finite number, got ${describe(scale)}`);
  return scale;
}

/** The tables as one [seqs][width] Int32Array, every entry of sequence i checked against the pool. */
function packTables(w: string, tables: unknown, seqs: number, numBlocks: number): { data: Int32Array; width: number } {
  if (!Array.isArray(tables) || tables.length !== seqs)
    throw new InvalidArgumentError(`${w}: blockTables must be an array of ${seqs} block tables, got ${describe(tables)}`);
  let width = 1;
  for (let s = 0; s < seqs; s++) {
    const t = tables[s];
    if (!(Array.isArray(t) || t instanceof Int32Array)) throw new InvalidArgumentError(`${w}: blockTables[${s}] must be an array or Int32Array, got ${describe(t)}`);
    width = Math.max(width, t.length);
  }
  const data = new Int32Array(seqs * width);
  for (let s = 0; s < seqs; s++) {
    const t = tables[s] as readonly number[] | Int32Array;
    for (let i = 0; i < t.length; i++) {
      const b = t[i];
      if (typeof b !== 'number' || !Number.isInteger(b) || b < 0 || b >= numBlocks)
        throw new InvalidArgumentError(`${w}: blockTables[${s}][${i}]: block id ${describe(b)} is outside [0, ${numBlocks})`);
      data[s * width + i] = b;
    }
  }
  return { data, width };
}

async function withUploads<T>(device: GpuDeviceId, arrays: Int32Array[], body: (b: GpuBuffer[]) => Promise<T>): Promise<T> {
  const held: GpuBuffer[] = [];
  try {
    for (const a of arrays) held.push(await GpuBuffer.from(device, a.length ? a : new Int32Array(1), 'attention metadata'));
    return await body(held);
  } finally {
    for (const b of held) b.dispose();
  }
}

function poolBytes(p: PoolParams, streams: number, row: number): number {
  return p.numBlocks * p.layers * streams * p.blockSize * row * p.elemBytes;
}

interface DecodeShape {
  heads: number;
  keyDim: number;
  valueDim: number;
  streams: number;
  params: Record<string, number>;
}

async function decode(w: string, op: string, device: GpuDeviceId, buffers: GpuDecodeBuffers, shape: DecodeShape,
  pool: PoolParams, seqs: GpuDecodeSequences, options: GpuAttentionOptions): Promise<number> {
  const o = checkOptions<GpuAttentionOptions>(`${w}: options`, options, OPTION_KEYS);
  if (seqs === null || typeof seqs !== 'object') throw new InvalidArgumentError(`${w}: sequences must be an object, got ${describe(seqs)}`);
  if (!Array.isArray(seqs.seqLens)) throw new InvalidArgumentError(`${w}: seqLens must be an array, got ${describe(seqs.seqLens)}`);
  const n = seqs.seqLens.length;
  if (n > 65535) throw new InvalidArgumentError(`${w}: at most 65535 sequences per call, got ${n}`);
  const { data: tables, width } = packTables(w, seqs.blockTables, n, pool.numBlocks);
  const lens = new Int32Array(n);
  let maxLen = 1;
  for (let s = 0; s < n; s++) {
    const cap = seqs.blockTables[s]!.length * pool.blockSize;
    if (cap === 0) throw new InvalidArgumentError(`${w}: blockTables[${s}] is empty: a sequence attends at least one position`);
    lens[s] = checkInt(`${w}: seqLens[${s}]`, seqs.seqLens[s], 1, cap);
    maxLen = Math.max(maxLen, lens[s]!);
  }
  if (width * pool.blockSize > 2 ** 31 - 1) throw new InvalidArgumentError(`${w}: the longest block table (${width} blocks of ${pool.blockSize}) exceeds 2^31 positions`);
  const splitLen = o.splitLen === undefined ? undefined : checkInt(`${w}: options.splitLen`, o.splitLen, 1, 2 ** 31 - 1);
  if (o.simt !== undefined && typeof o.simt !== 'boolean') throw new InvalidArgumentError(`${w}: options.simt must be a boolean, got ${describe(o.simt)}`);
  if (o.tile !== undefined && o.tile !== 32 && o.tile !== 64) throw new InvalidArgumentError(`${w}: options.tile must be 32 or 64, got ${describe(o.tile)}`);
  checkGpuBuffer(w, 'q', buffers.q, device, n * shape.heads * shape.keyDim * 4);
  checkGpuBuffer(w, 'pool', buffers.pool, device, poolBytes(pool, shape.streams, shape.keyDim));
  checkGpuBuffer(w, 'out', buffers.out, device, n * shape.heads * shape.valueDim * 4);
  if (buffers.quantized !== undefined) {
    const rowWidth = shape.heads * shape.valueDim;
    if (shape.valueDim % 32) throw new InvalidArgumentError(`${w}: buffers.quantized needs a value width that is a multiple of 32, got ${shape.valueDim}`);
    checkGpuBuffer(w, 'quantized', buffers.quantized, device, n * rowWidth + (n * rowWidth / 32) * 4);
  }
  const splits = Math.ceil(maxLen / (splitLen ?? MIN_SPLIT));
  // The quantised output comes from the splits' combine, so it takes one partial even unsplit.
  const partials = buffers.quantized !== undefined ? Math.max(splits, 1) : splits > 1 ? splits : 0;
  const need = n * shape.heads * (shape.valueDim + 2) * 4 * partials;
  if (buffers.workspace !== undefined && splitLen !== undefined) checkGpuBuffer(w, 'workspace', buffers.workspace, device, need);
  else if (buffers.workspace !== undefined) checkGpuBuffer(w, 'workspace', buffers.workspace, device, 0);
  checkWrittenApart(w, { out: buffers.out, workspace: buffers.workspace, quantized: buffers.quantized },
    { q: buffers.q, pool: buffers.pool });
  const params = {
    ...shape.params, seqs: n, width, maxLen, numBlocks: pool.numBlocks, blockSize: pool.blockSize, dtype: pool.dtype,
    layers: pool.layers, layer: pool.layer, ...(splitLen !== undefined ? { splitLen } : {}),
    ...(o.simt ? { simt: 1 } : {}), ...(o.tile !== undefined ? { tile: o.tile } : {}),
  };
  const own = buffers.workspace === undefined && need > 0 ? GpuBuffer.alloc(device, need, 'the attention split-K workspace') : undefined;
  try {
    return await withUploads(device, [tables, lens], ([tb, lb]) => {
      const list = [buffers.q, buffers.pool, tb!, lb!, buffers.out];
      const ws = buffers.workspace ?? own;
      if (ws) list.push(ws);
      if (buffers.quantized) list.push(buffers.quantized);  // after the workspace: partials >= 1
      const all = buffers.quantized ? { ...params, quantize: 1 } : params;
      return runGpuOp(device, op, list, all, o.reps === undefined ? {} : { reps: o.reps });
    });
  } finally {
    own?.dispose();
  }
}

/**
 * Decode attention: for each sequence i, its heads' query rows q[i] attend to positions
 * [0, seqLens[i]) of its blocks (GQA: head h reads KV head h / (heads / kvHeads)); out[i] is the
 * softmax-weighted sum of the values. Resolves to ms per run when options.reps > 0, else 0.
 */
export async function gpuPagedAttentionDecode(device: GpuDeviceId, buffers: GpuDecodeBuffers,
  shape: GpuAttentionHeads & GpuKvPoolLayout, sequences: GpuDecodeSequences, options: GpuAttentionOptions = {}): Promise<number> {
  const w = 'gpuPagedAttentionDecode';
  const pool = checkPool(w, shape);
  const heads = checkInt(`${w}: heads`, shape.heads, 1, 65536), kvHeads = checkInt(`${w}: kvHeads`, shape.kvHeads, 1, 65535);
  if (heads % kvHeads) throw new InvalidArgumentError(`${w}: heads (${heads}) must be a multiple of kvHeads (${kvHeads})`);
  const headDim = checkInt(`${w}: headDim`, shape.headDim, 1, MAX_MLA_ROW);
  const scale = checkScale(w, shape.scale, 1 / Math.sqrt(headDim));
  return decode(w, 'paged_attention_decode', device, buffers,
    { heads, keyDim: headDim, valueDim: headDim, streams: 2 * kvHeads, params: { heads, kvHeads, headDim, scale } },
    pool, sequences, options);
}

export interface GpuMlaHeads {
  heads: number;
  /** Latent width (attention.kv_lora_rank) and rope key width per cached row. */
  kvLora: number;
  ropeDim: number;
  /** The model's score scale (deepseek2's kq_scale, YaRN-adjusted). */
  scale: number;
}

/**
 * MLA (deepseek2) decode in the absorbed form: per head, the query already taken into latent space
 * ([W_uk^T q_nope | roped q_rope], kvLora + ropeDim wide) attends to the one cached row per
 * position ([latent | rope key]) as key, and to its latent part as value; out is kvLora per head
 * (W_uv is applied after, as on the CPU).
 */
export async function gpuMlaAttentionDecode(device: GpuDeviceId, buffers: GpuDecodeBuffers, shape: GpuMlaHeads & GpuKvPoolLayout,
  sequences: GpuDecodeSequences, options: GpuAttentionOptions = {}): Promise<number> {
  const w = 'gpuMlaAttentionDecode';
  const pool = checkPool(w, shape);
  const heads = checkInt(`${w}: heads`, shape.heads, 1, 65536);
  const kvLora = checkInt(`${w}: kvLora`, shape.kvLora, 1, MAX_MLA_ROW), ropeDim = checkInt(`${w}: ropeDim`, shape.ropeDim, 0, MAX_MLA_ROW);
  if (kvLora + ropeDim > MAX_MLA_ROW) throw new InvalidArgumentError(`${w}: kvLora + ropeDim must be at most ${MAX_MLA_ROW}, got ${kvLora + ropeDim}`);
  if (typeof shape.scale !== 'number' || !Number.isFinite(shape.scale)) throw new InvalidArgumentError(`${w}: scale must be a finite number, got ${describe(shape.scale)}`);
  return decode(w, 'mla_attention_decode', device, buffers,
    { heads, keyDim: kvLora + ropeDim, valueDim: kvLora, streams: 1, params: { heads, kvLora, ropeDim, scale: shape.scale } },
    pool, sequences, options);
}

/** Sequences of new rows as [start, tokens, row0] triples, tables checked against the pool. */
function packSequences(w: string, sequences: unknown, pool: PoolParams):
  { tables: Int32Array; width: number; meta: Int32Array; rows: number; maxTokens: number } {
  if (!Array.isArray(sequences) || sequences.length > 65535) throw new InvalidArgumentError(`${w}: sequences must be an array of at most 65535, got ${describe(sequences)}`);
  const n = sequences.length;
  for (let s = 0; s < n; s++)
    if (sequences[s] === null || typeof sequences[s] !== 'object') throw new InvalidArgumentError(`${w}: sequences[${s}] must be an object, got ${describe(sequences[s])}`);
  const list = sequences as GpuPrefillSequence[];
  const { data: tables, width } = packTables(w, list.map((s) => s.blockTable), n, pool.numBlocks);
  const meta = new Int32Array(3 * n);
  let rows = 0, maxTokens = 0;
  for (let s = 0; s < n; s++) {
    const q = list[s]!;
    const start = checkInt(`${w}: sequences[${s}].start`, q.start, 0, 2 ** 31 - 1);
    const tokens = checkInt(`${w}: sequences[${s}].tokens`, q.tokens, 1, 2 ** 31 - 1);
    const cap = q.blockTable.length * pool.blockSize;
    if (start + tokens > cap)
      throw new InvalidArgumentError(`${w}: sequences[${s}].blockTable: ${q.blockTable.length} blocks of ${pool.blockSize} positions do not cover start + tokens = ${start + tokens}`);
    meta.set([start, tokens, rows], 3 * s);
    rows += tokens;
    maxTokens = Math.max(maxTokens, tokens);
  }
  if (rows > 2 ** 31 - 1) throw new InvalidArgumentError(`${w}: ${rows} rows exceed 2^31 - 1`);
  if (width * pool.blockSize > 2 ** 31 - 1) throw new InvalidArgumentError(`${w}: the longest block table (${width} blocks of ${pool.blockSize}) exceeds 2^31 positions`);
  return { tables, width, meta, rows, maxTokens };
}

export interface GpuPrefillSequence {
  /** Position of the sequence's first new row (its earlier positions are cached). */
  start: number;
  /** New rows; their K/V are already in the pool at positions [start, start + tokens). */
  tokens: number;
  blockTable: readonly number[] | Int32Array;
}

/**
 * Causal prefill attention: the sequences' new query rows, concatenated in q ([rows][heads][headDim],
 * rows = the sum of tokens), each attend to their sequence's positions [0, own position]. 16-bit
 * KV with headDim 64, 96 or 128 runs on tensor cores (compute capability 8.0+), the rest on SIMT.
 */
export async function gpuPagedAttentionPrefill(device: GpuDeviceId, buffers: { q: GpuBuffer; pool: GpuBuffer; out: GpuBuffer },
  shape: GpuAttentionHeads & GpuKvPoolLayout, sequences: readonly GpuPrefillSequence[], options: GpuAttentionOptions = {}): Promise<number> {
  const w = 'gpuPagedAttentionPrefill';
  const o = checkOptions<GpuAttentionOptions>(`${w}: options`, options, OPTION_KEYS);
  const pool = checkPool(w, shape);
  const heads = checkInt(`${w}: heads`, shape.heads, 1, 65535), kvHeads = checkInt(`${w}: kvHeads`, shape.kvHeads, 1, 65535);
  if (heads % kvHeads) throw new InvalidArgumentError(`${w}: heads (${heads}) must be a multiple of kvHeads (${kvHeads})`);
  const headDim = checkInt(`${w}: headDim`, shape.headDim, 1, MAX_HEAD_DIM);
  const scale = checkScale(w, shape.scale, 1 / Math.sqrt(headDim));
  const { tables, width, meta, rows, maxTokens } = packSequences(w, sequences, pool);
  checkGpuBuffer(w, 'q', buffers.q, device, rows * heads * headDim * 4);
  checkGpuBuffer(w, 'pool', buffers.pool, device, poolBytes(pool, 2 * kvHeads, headDim));
  checkGpuBuffer(w, 'out', buffers.out, device, rows * heads * headDim * 4);
  checkWrittenApart(w, { out: buffers.out }, { q: buffers.q, pool: buffers.pool });
  if (o.simt !== undefined && typeof o.simt !== 'boolean') throw new InvalidArgumentError(`${w}: options.simt must be a boolean, got ${describe(o.simt)}`);
  const params = {
    seqs: sequences.length, rows, maxTokens, heads, kvHeads, headDim, scale, width, numBlocks: pool.numBlocks, blockSize: pool.blockSize,
    dtype: pool.dtype, layers: pool.layers, layer: pool.layer, simt: o.simt ? 1 : 0,
  };
  return withUploads(device, [tables, meta], ([tb, mb]) =>
    runGpuOp(device, 'paged_attention_prefill', [buffers.q, buffers.pool, tb!, mb!, buffers.out], params,
      o.reps === undefined ? {} : { reps: o.reps }));
}

export interface GpuRopeShape {
  rows: number;
  heads: number;
  /** Rotated values per head (even). */
  dims: number;
  base?: number;
  freqScale?: number;
  /** Pairs (j, j + dims/2) instead of (2j, 2j+1). */
  neox?: boolean;
  /** Float32 elements between heads (default dims) and rows (default heads * headStride); offset of the first rotated value in a head. */
  headStride?: number;
  rowStride?: number;
  offset?: number;
  /** YaRN context extension (ggml's ext_factor, corr dims and attention factor), as deepseek2 uses. */
  yarn?: { extFactor: number; corrLow: number; corrHigh: number; magnitude: number };
}

/** Rotates x (float32) in place: head h of row r by its pairs' angles at positions[r]. */
export async function gpuRope(device: GpuDeviceId, x: GpuBuffer, positions: GpuBuffer, shape: GpuRopeShape,
  options: GpuRunOptions = {}): Promise<number> {
  const w = 'gpuRope';
  const rows = checkInt(`${w}: rows`, shape.rows, 0, 2 ** 31 - 1), heads = checkInt(`${w}: heads`, shape.heads, 1, 2 ** 20);
  const dims = checkInt(`${w}: dims`, shape.dims, 2, 65536);
  if (dims % 2) throw new InvalidArgumentError(`${w}: dims must be even, got ${dims}`);
  const headStride = checkInt(`${w}: headStride`, shape.headStride ?? dims, 0);
  const rowStride = checkInt(`${w}: rowStride`, shape.rowStride ?? heads * headStride, 0);
  const offset = checkInt(`${w}: offset`, shape.offset ?? 0, 0);
  const base = shape.base ?? 10000, freqScale = shape.freqScale ?? 1;
  if (typeof base !== 'number' || !(base > 0) || !Number.isFinite(base)) throw new InvalidArgumentError(`${w}: base must be a positive number, got ${describe(base)}`);
  if (typeof freqScale !== 'number' || !(freqScale > 0) || !Number.isFinite(freqScale)) throw new InvalidArgumentError(`${w}: freqScale must be a positive number, got ${describe(freqScale)}`);
  const extent = rows === 0 ? 0 : (rows - 1) * rowStride + (heads - 1) * headStride + offset + dims;
  checkGpuBuffer(w, 'x', x, device, extent * 4);
  checkGpuBuffer(w, 'positions', positions, device, rows * 4);
  checkWrittenApart(w, { x }, { positions });
  const params: Record<string, number> = { rows, heads, dims, headStride, rowStride, offset, base, freqScale, neox: shape.neox ? 1 : 0 };
  if (shape.yarn !== undefined) {
    for (const k of ['extFactor', 'corrLow', 'corrHigh', 'magnitude'] as const) {
      const v = shape.yarn[k];
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new InvalidArgumentError(`${w}: yarn.${k} must be a finite number, got ${describe(v)}`);
      params[k] = v;
    }
    params.yarn = 1;
  }
  return runGpuOp(device, 'rope', [x, positions], params, options);
}

/**
 * Writes the new rows' keys and values (float32 [rows][kvHeads][headDim], rows in the order of
 * `sequences`) into the pool at positions [start, start + tokens) of each sequence, converted to
 * the pool's dtype (round to nearest even). With mla, `k` holds the latent cache rows
 * ([latent | rope key], headDim wide, one per position) and `v` is not used.
 */
export async function gpuKvStore(device: GpuDeviceId, buffers: { k: GpuBuffer; v?: GpuBuffer; pool: GpuBuffer },
  shape: { kvHeads: number; headDim: number; mla?: boolean } & GpuKvPoolLayout, sequences: readonly GpuPrefillSequence[],
  options: GpuRunOptions = {}): Promise<number> {
  const w = 'gpuKvStore';
  const pool = checkPool(w, shape);
  const mla = shape.mla === true;
  const kvHeads = mla ? 1 : checkInt(`${w}: kvHeads`, shape.kvHeads, 1, 65535);
  const headDim = checkInt(`${w}: headDim`, shape.headDim, 1, 65536);
  const { tables, width, meta, rows, maxTokens } = packSequences(w, sequences, pool);
  checkGpuBuffer(w, 'k', buffers.k, device, rows * kvHeads * headDim * 4);
  if (!mla) checkGpuBuffer(w, 'v', buffers.v, device, rows * kvHeads * headDim * 4);
  checkGpuBuffer(w, 'pool', buffers.pool, device, poolBytes(pool, mla ? 1 : 2 * kvHeads, headDim));
  checkWrittenApart(w, { pool: buffers.pool }, { k: buffers.k, v: mla ? undefined : buffers.v });
  const params = {
    seqs: sequences.length, rows, maxTokens, kvHeads, headDim, width, numBlocks: pool.numBlocks, blockSize: pool.blockSize,
    dtype: pool.dtype, layers: pool.layers, layer: pool.layer, mla: mla ? 1 : 0,
  };
  return withUploads(device, [tables, meta], ([tb, mb]) =>
    runGpuOp(device, 'kv_store', [buffers.k, mla ? buffers.k : buffers.v!, buffers.pool, tb!, mb!], params, options));
}
