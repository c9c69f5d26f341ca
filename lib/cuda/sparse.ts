/**
 * Sparse weights on a GPU and SpMM (native/kernels/sparse/cuda/spmm.cu): C [M, N] = epilogue(A [M, K] · B)
 * with B [K, N] stored sparse in the CPU's forms (lib/kernels/sparse.ts): 'csr' of W = Bᵀ (one row per
 * output column, nn.Linear's [out, in]) or 'bsr' of 1 x W blocks over B. Built once on the host and
 * uploaded; CSR rows are grouped here into chunks of about equal non-zero count (one warp each on
 * the device), so skewed rows do not serialise behind the longest one.
 */
import { InvalidArgumentError } from '../errors.js';
import type { CsrInput } from '../kernels/sparse.js';
import { NativeResource } from '../lifetime.js';
import { checkTensor, type Tensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, describe } from '../validate.js';
import { checkActivation, type GemmActivation } from '../kernels/gemm.js';
import { checkGpuBuffer } from './kernels.js';
import { GpuBuffer, runGpuOp, type GpuDeviceId, type GpuRunOptions } from './runtime.js';

export type GpuSparseFormat = 'csr' | 'bsr';
export interface GpuToSparseOptions {
  /** Default 'csr'. */
  format?: GpuSparseFormat;
  /** BSR block shape [1, W], W in 8, 16, 32 (default [1, 32]: one warp's lanes per block). */
  blockShape?: readonly [number, number];
}

// A chunk's target: enough chunks (one warp each) to fill a large GPU several times over, and at
// least this many non-zeros so that short rows share a warp instead of each paying its setup.
const CHUNKS_WANTED = 8192;
const MIN_CHUNK_NNZ = 64;

/** Row boundaries of chunks of consecutive rows holding about nnz / CHUNKS_WANTED non-zeros each. */
export function balancedChunks(rowPtr: Uint32Array, rows: number): Uint32Array {
  const nnz = rowPtr[rows]!;
  const target = Math.max(MIN_CHUNK_NNZ, Math.ceil(nnz / CHUNKS_WANTED));
  const bounds = [0];
  let start = 0;
  for (let r = 0; r < rows; r++) {
    // Close the chunk before a row that would take it past the target (a long row stands alone).
    if (r > start && rowPtr[r + 1]! - rowPtr[start]! > target) {
      bounds.push(r);
      start = r;
    }
  }
  if (rows > 0) bounds.push(rows);
  return Uint32Array.from(bounds);
}

/** Sparse weights in device memory. dispose() frees them. */
export class GpuSparseWeights extends NativeResource {
  readonly device: GpuDeviceId;
  readonly format: GpuSparseFormat;
  readonly k: number;
  readonly n: number;
  /** Non-zero weights (BSR: not counting the zeros stored inside blocks). */
  readonly nnz: number;
  /** BSR: the block width W; CSR: undefined. */
  readonly blockWidth: number | undefined;
  /** BSR: stored blocks; CSR: warp chunks. */
  readonly units: number;
  readonly #buffers: GpuBuffer[];

  /** @internal use gpuToSparse() / gpuSparseFromCsr() */
  constructor(device: GpuDeviceId, format: GpuSparseFormat, k: number, n: number, nnz: number, units: number,
    blockWidth: number | undefined, buffers: GpuBuffer[]) {
    super();
    this.device = device;
    this.format = format;
    this.k = k;
    this.n = n;
    this.nnz = nnz;
    this.units = units;
    this.blockWidth = blockWidth;
    this.#buffers = buffers;
  }

  /** @internal */
  buffers(where: string): GpuBuffer[] {
    this.checkAlive(where);
    return this.#buffers;
  }

  protected release(): void {
    for (const b of this.#buffers) b.dispose();
  }
}

async function upload(device: GpuDeviceId, arrays: [ArrayBufferView, string][]): Promise<GpuBuffer[]> {
  const out: GpuBuffer[] = [];
  try {
    // A zero-length array still gets a (1-element) buffer: ops index buffers by position.
    for (const [a, what] of arrays) out.push(a.byteLength ? await GpuBuffer.from(device, a, what) : GpuBuffer.alloc(device, 4, what));
  } catch (err) {
    for (const b of out) b.dispose();
    throw err;
  }
  return out;
}

async function csrWeights(device: GpuDeviceId, k: number, n: number, rowPtr: Uint32Array, colIdx: Uint32Array,
  values: Float32Array): Promise<GpuSparseWeights> {
  const chunks = balancedChunks(rowPtr, n);
  const buffers = await upload(device, [[rowPtr, 'the CSR row offsets'], [colIdx, 'the CSR column indices'],
    [values, 'the CSR values'], [chunks, 'the CSR row chunks']]);
  return new GpuSparseWeights(device, 'csr', k, n, values.length, chunks.length - 1, undefined, buffers);
}

/**
 * Converts dense weights B ([K, N] float32, pruned to explicit zeros) to sparse weights on device.
 * Zeros (+0 and -0) are dropped; NaN and Inf are kept.
 */
export async function gpuToSparse(device: GpuDeviceId, weights: Tensor<'float32'>, options?: GpuToSparseOptions): Promise<GpuSparseWeights> {
  const where = 'gpuToSparse';
  const opts = checkOptions<GpuToSparseOptions>(where, options, ['format', 'blockShape']);
  checkTensor(`${where}(weights)`, weights, 'float32');
  if (weights.dims.length !== 2 || weights.dims[0]! < 1 || weights.dims[1]! < 1) {
    throw new InvalidArgumentError(`${where}(weights) must be 2-D [K, N] with K, N >= 1, got dims [${weights.dims.join(', ')}]`);
  }
  const [k, n] = weights.dims as unknown as [number, number];
  if (k > 2 ** 31 - 1 || n > 2 ** 31 - 1) throw new InvalidArgumentError(`${where}(weights): K and N must be below 2^31`);
  const format = checkOneOf(`${where}: options.format`, opts.format ?? 'csr', ['csr', 'bsr'] as const);
  const b = weights.data;
  if (format === 'csr') {
    if (opts.blockShape !== undefined) throw new InvalidArgumentError(`${where}: options.blockShape has no effect with format 'csr'`);
    const rowPtr = new Uint32Array(n + 1);
    for (let i = 0; i < k * n; i++) if (b[i] !== 0) rowPtr[(i % n) + 1]!++;
    for (let j = 0; j < n; j++) rowPtr[j + 1]! += rowPtr[j]!;
    const nnz = rowPtr[n]!;
    const fill = rowPtr.slice(0, n);
    const colIdx = new Uint32Array(nnz), values = new Float32Array(nnz);
    for (let kk = 0; kk < k; kk++) {  // k ascending within each row, as CSR requires
      for (let j = 0; j < n; j++) {
        const v = b[kk * n + j]!;
        if (v !== 0) {
          const p = fill[j]!++;
          colIdx[p] = kk;
          values[p] = v;
        }
      }
    }
    return csrWeights(device, k, n, rowPtr, colIdx, values);
  }
  let bw = 32;
  if (opts.blockShape !== undefined) {
    const bs = opts.blockShape as unknown;
    if (!Array.isArray(bs) || bs.length !== 2 || bs[0] !== 1 || ![8, 16, 32].includes(bs[1] as number)) {
      throw new InvalidArgumentError(`${where}: options.blockShape must be [1, 8], [1, 16] or [1, 32], got ${describe(bs)}`);
    }
    bw = bs[1] as number;
  }
  const panels = Math.ceil(n / bw);
  const panelPtr = new Uint32Array(panels + 1);
  const ks: number[] = [], vals: number[] = [];
  let nnz = 0;
  for (let p = 0; p < panels; p++) {
    for (let kk = 0; kk < k; kk++) {
      let any = false;
      for (let j = p * bw; j < Math.min(n, (p + 1) * bw); j++) if (b[kk * n + j] !== 0) { any = true; nnz++; }
      if (!any) continue;
      ks.push(kk);
      for (let j = p * bw; j < (p + 1) * bw; j++) vals.push(j < n ? b[kk * n + j]! : 0);
    }
    panelPtr[p + 1] = ks.length;
  }
  const buffers = await upload(device, [[panelPtr, 'the BSR panel offsets'], [Uint32Array.from(ks), 'the BSR block rows'],
    [Float32Array.from(vals), 'the BSR values']]);
  return new GpuSparseWeights(device, 'bsr', k, n, nnz, ks.length, bw, buffers);
}

/** Sparse weights from a CSR matrix of W = Bᵀ (rows = N output columns, cols = K), checked field by field. */
export async function gpuSparseFromCsr(device: GpuDeviceId, csr: CsrInput): Promise<GpuSparseWeights> {
  const where = 'gpuSparseFromCsr';
  if (csr === null || typeof csr !== 'object' || Array.isArray(csr)) {
    throw new InvalidArgumentError(`${where}(csr) must be an object { rows, cols, rowPtr, colIdx, values }, got ${describe(csr)}`);
  }
  const c = checkOptions<CsrInput>(`${where}(csr)`, csr, ['rows', 'cols', 'rowPtr', 'colIdx', 'values']);
  const rows = checkInt(`${where}: csr.rows`, c.rows, 1, 2 ** 31 - 1);
  const cols = checkInt(`${where}: csr.cols`, c.cols, 1, 2 ** 31 - 1);
  const ints = (name: string, v: unknown): Int32Array | Uint32Array => {
    if (!(v instanceof Int32Array || v instanceof Uint32Array)) throw new InvalidArgumentError(`${where}: csr.${name} must be an Int32Array or Uint32Array, got ${describe(v)}`);
    return v;
  };
  const rp = ints('rowPtr', c.rowPtr), ci = ints('colIdx', c.colIdx);
  if (!(c.values instanceof Float32Array)) throw new InvalidArgumentError(`${where}: csr.values must be a Float32Array, got ${describe(c.values)}`);
  const values = c.values;
  if (rp.length !== rows + 1) throw new InvalidArgumentError(`${where}: csr.rowPtr must have rows + 1 = ${rows + 1} entries, got ${rp.length}`);
  if (ci.length !== values.length) throw new InvalidArgumentError(`${where}: csr.colIdx and csr.values must have the same length, got ${ci.length} and ${values.length}`);
  if (rp[0] !== 0) throw new InvalidArgumentError(`${where}: csr.rowPtr[0] must be 0, got ${rp[0]}`);
  for (let r = 0; r < rows; r++) {
    const p0 = rp[r]!, p1 = rp[r + 1]!;
    if (p1 < p0) throw new InvalidArgumentError(`${where}: csr.rowPtr must be non-decreasing, but rowPtr[${r + 1}] = ${p1} < rowPtr[${r}] = ${p0}`);
    if (p1 > values.length) throw new InvalidArgumentError(`${where}: csr.rowPtr[${r + 1}] = ${p1} exceeds the ${values.length} non-zeros`);
    for (let p = p0; p < p1; p++) {
      const col = ci[p]!;
      if (col < 0 || col >= cols) throw new InvalidArgumentError(`${where}: csr.colIdx[${p}] = ${col} (row ${r}) is out of range [0, ${cols})`);
      if (p > p0 && col <= ci[p - 1]!) {
        throw new InvalidArgumentError(`${where}: csr.colIdx must be strictly increasing within a row, but row ${r} has colIdx[${p - 1}] = ${ci[p - 1]} then colIdx[${p}] = ${col}`);
      }
    }
  }
  if (rp[rows] !== values.length) {
    throw new InvalidArgumentError(`${where}: csr.rowPtr[${rows}] (the non-zero count) is ${rp[rows]} but csr.colIdx and csr.values hold ${values.length}`);
  }
  return csrWeights(device, cols, rows, Uint32Array.from(rp), Uint32Array.from(ci), values);
}

export interface GpuSpmmOptions extends GpuRunOptions {
  /** Leading dimension (row length) of a, default k; of c, default n; of the residual, default n. */
  lda?: number;
  ldc?: number;
  ldr?: number;
  /** float32 [N] each: per-column bias and scale (a folded BatchNormalization). */
  bias?: GpuBuffer;
  scale?: GpuBuffer;
  /** float32 [M, ldr], added in the epilogue (after the activation unless residualBeforeActivation). */
  residual?: GpuBuffer;
  residualBeforeActivation?: boolean;
  activation?: GemmActivation;
  clipMin?: number;
  clipMax?: number;
  alpha?: number;
}
const SPMM_OPTIONS = ['lda', 'ldc', 'ldr', 'bias', 'scale', 'residual', 'residualBeforeActivation', 'activation', 'clipMin',
  'clipMax', 'alpha', 'reps'] as const;

/**
 * c [M, ldc] = epilogue(a [M, lda] · B) for sparse weights B; M = 1 runs the SpMV kernel.
 * Resolves to ms per run when options.reps > 0 (CSR with M > 1: the transpose of a included).
 */
export async function gpuSpmm(device: GpuDeviceId, a: GpuBuffer, m: number, weights: GpuSparseWeights, c: GpuBuffer,
  options: GpuSpmmOptions = {}): Promise<number> {
  const where = 'gpuSpmm';
  const opts = checkOptions<GpuSpmmOptions>(where, options, SPMM_OPTIONS);
  if (!(weights instanceof GpuSparseWeights)) {
    throw new InvalidArgumentError(`${where}(weights) must be GpuSparseWeights (from gpuToSparse or gpuSparseFromCsr), got ${describe(weights)}`);
  }
  const wbufs = weights.buffers(`${where}(weights)`);
  if (weights.device !== device) throw new InvalidArgumentError(`${where}(weights) live on ${weights.device}, not ${device}`);
  m = checkInt(`${where}: m`, m, 0, 2 ** 31 - 1);
  const { k, n } = weights;
  const lda = opts.lda === undefined ? k : checkInt(`${where}: options.lda`, opts.lda, k, 2 ** 31 - 1);
  const ldc = opts.ldc === undefined ? n : checkInt(`${where}: options.ldc`, opts.ldc, n, 2 ** 31 - 1);
  const ldr = opts.ldr === undefined ? n : checkInt(`${where}: options.ldr`, opts.ldr, n, 2 ** 31 - 1);
  const span = (ld: number, cols: number) => (m === 0 ? 0 : ((m - 1) * ld + cols) * 4);
  checkGpuBuffer(where, 'a', a, device, span(lda, k));
  checkGpuBuffer(where, 'c', c, device, span(ldc, n));
  if (c === a) throw new InvalidArgumentError(`${where}: c must not be a`);
  const { code: activation, alpha, beta } = checkActivation(where, opts, true);
  if (opts.residualBeforeActivation !== undefined && typeof opts.residualBeforeActivation !== 'boolean') {
    throw new InvalidArgumentError(`${where}: options.residualBeforeActivation must be a boolean, got ${describe(opts.residualBeforeActivation)}`);
  }
  const extra: GpuBuffer[] = [];
  if (opts.bias !== undefined) extra.push(checkGpuBuffer(where, 'options.bias', opts.bias, device, n * 4));
  if (opts.scale !== undefined) extra.push(checkGpuBuffer(where, 'options.scale', opts.scale, device, n * 4));
  if (opts.residual !== undefined) {
    extra.push(checkGpuBuffer(where, 'options.residual', opts.residual, device, span(ldr, n)));
    if (opts.residual === c) throw new InvalidArgumentError(`${where}: c must not be options.residual`);
  }
  const params = {
    m, k, n, lda, ldc, ldr, activation, alpha, beta,
    residualBeforeActivation: opts.residualBeforeActivation ? 1 : 0, hasBias: opts.bias ? 1 : 0,
    hasScale: opts.scale ? 1 : 0, hasResidual: opts.residual ? 1 : 0,
  };
  if (weights.format === 'bsr') {
    const [panelPtr, blockK, values] = wbufs as [GpuBuffer, GpuBuffer, GpuBuffer];
    return runGpuOp(device, 'spmm_bsr', [a, panelPtr, blockK, values, c, ...extra],
      { ...params, bw: weights.blockWidth!, blocks: weights.units }, { reps: opts.reps });
  }
  const [rowPtr, colIdx, values, chunks] = wbufs as [GpuBuffer, GpuBuffer, GpuBuffer, GpuBuffer];
  // At (a transposed) for M > 1; from the device's caching pool, so a repeated call costs no cudaMalloc.
  const scratch = GpuBuffer.alloc(device, m > 1 ? k * (m + (m & 1)) * 4 : 4, 'the SpMM transpose of a');
  try {
    return await runGpuOp(device, 'spmm_csr', [a, rowPtr, colIdx, values, chunks, c, scratch, ...extra],
      { ...params, nnz: weights.nnz, chunks: weights.units }, { reps: opts.reps });
  } finally {
    scratch.dispose();
  }
}
