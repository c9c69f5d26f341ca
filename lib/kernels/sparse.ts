/**
 * Sparse weights and SpMM: C = epilogue(A·B) with B stored sparse, built once at load.
 *
 * Orientation: as in gemm, A is [M, K] and the weights B are [K, N]. Stored forms (see
 * native/kernels/sparse/spmm.h):
 * - 'csr': CSR of W = Bᵀ ([N, K], one row per output column, column indices = k). This is the
 *   layout of a PyTorch nn.Linear weight ([out, in]), so `sparseFromCsr` takes a pruned Linear
 *   weight's CSR as is. The kernel packs A transposed per run so that every non-zero multiplies a
 *   vector of M activations; M = 1 (decode) gathers instead.
 * - 'bsr': 1 x W blocks over B (W = 8, 16 or 32 consecutive output columns sharing one k): for
 *   block-pruned weights; the dense GEMM tile with the K loop over non-zero blocks only.
 */
import { native, type NativeGemmVariant, type NativeSparseWeights } from '../binding.js';
import { InvalidArgumentError, callNative, fromNative } from '../errors.js';
import { waitKernel } from '../wait.js';
import { NativeResource, withSignal } from '../lifetime.js';
import { Tensor, checkTensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, describe } from '../validate.js';
import { GEMM_OPTIONS, check2d, checkGemmCall, type GemmOptions, type GemmVariant } from './gemm.js';

export type SparseFormat = 'csr' | 'bsr';
export interface ToSparseOptions {
  /**
   * 'auto' (default): BSR when the weights' non-zeros fill at least half of the 1 x W blocks they
   * touch (block-pruned weights), else CSR (unstructured pruning).
   */
  format?: SparseFormat | 'auto';
  /** BSR block shape [1, W], W in 8, 16, 32 (default: one SIMD vector: 16 with AVX-512, else 8). */
  blockShape?: readonly [number, number];
}

/** CSR of W = Bᵀ: `rows` = N output columns, `cols` = K inputs (nn.Linear's [out, in]). */
export interface CsrInput {
  rows: number;
  cols: number;
  /** rows + 1 non-decreasing offsets, rowPtr[0] = 0, rowPtr[rows] = number of non-zeros. */
  rowPtr: Int32Array | Uint32Array;
  /** Column (k) of each non-zero, strictly increasing within a row, in [0, cols). */
  colIdx: Int32Array | Uint32Array;
  values: Float32Array;
}

const FORMATS = ['csr', 'bsr', 'auto'] as const;
const BLOCK_WIDTHS = [8, 16, 32];
const VARIANTS: readonly GemmVariant[] = ['auto', 'reference', 'scalar', 'avx2', 'avx512'];
const MAX_K = 2 ** 31 - 1;

/** Sparse weights in native memory (reported to V8). dispose() when done; runs in flight keep them alive. */
export class SparseWeights extends NativeResource {
  readonly format: SparseFormat;
  /** [K, N]: the dense weights' shape (gemm's B). */
  readonly shape: readonly [number, number];
  readonly k: number;
  readonly n: number;
  /** Non-zero weights (BSR: not counting the zeros stored inside blocks). */
  readonly nnz: number;
  /** 1 - nnz / (K·N). */
  readonly sparsity: number;
  /** Native bytes held. */
  readonly bytes: number;
  /** BSR only: [1, W]. */
  readonly blockShape: readonly [number, number] | undefined;
  /** BSR only: stored blocks. */
  readonly blocks: number | undefined;
  /** The microkernel 'auto' runs, e.g. f32_spmm_csr_16x128__avx512. */
  readonly ukernel: string;
  #handle: NativeSparseWeights;

  /** @internal use toSparse() / sparseFromCsr() */
  constructor(handle: NativeSparseWeights) {
    super();
    this.#handle = handle;
    const info = handle.info();
    this.format = info.format!;
    this.k = info.k!;
    this.n = info.n!;
    this.shape = [this.k, this.n];
    this.nnz = info.nnz!;
    this.sparsity = this.k * this.n === 0 ? 1 : 1 - this.nnz / (this.k * this.n);
    this.bytes = info.bytes!;
    this.blockShape = this.format === 'bsr' ? [1, info.blockWidth!] : undefined;
    this.blocks = this.format === 'bsr' ? info.blocks! : undefined;
    this.ukernel = info.ukernel!;
  }

  /** @internal */
  handle(where: string): NativeSparseWeights {
    this.checkAlive(where);
    return this.#handle;
  }

  protected release(): void {
    this.#handle.dispose();
  }
}

/**
 * Converts dense weights B ([K, N] float32, pruned to explicit zeros) into sparse weights. Zeros
 * (+0 and -0) are dropped; NaN and Inf are kept. One pass over B: do it once at load.
 */
export function toSparse(weights: Tensor<'float32'>, options?: ToSparseOptions): SparseWeights {
  const where = 'toSparse';
  const opts = checkOptions<ToSparseOptions>(where, options, ['format', 'blockShape']);
  checkTensor(`${where}(weights)`, weights, 'float32');
  const [k, n] = check2d(`${where}(weights)`, weights);
  if (k > MAX_K) throw new InvalidArgumentError(`${where}(weights) has ${k} rows; at most ${MAX_K} are supported`);
  const format = checkOneOf(`${where}: options.format`, opts.format ?? 'auto', FORMATS);
  let blockWidth = 0;
  if (opts.blockShape !== undefined) {
    const bs = opts.blockShape as unknown;
    if (format === 'csr') throw new InvalidArgumentError(`${where}: options.blockShape has no effect with format 'csr'`);
    if (!Array.isArray(bs) || bs.length !== 2 || bs[0] !== 1 || !BLOCK_WIDTHS.includes(bs[1] as number)) {
      throw new InvalidArgumentError(
        `${where}: options.blockShape must be [1, 8], [1, 16] or [1, 32], got ${Array.isArray(bs) ? `[${bs.map(describe).join(', ')}]` : describe(bs)}`);
    }
    blockWidth = bs[1] as number;
  }
  const site = new Error();
  try {
    return new SparseWeights(native().toSparse(weights.data, k, n, format, blockWidth));
  } catch (err) {
    throw fromNative(err, site);
  }
}

function checkIndexArray(where: string, v: unknown): Uint32Array {
  if (v instanceof Uint32Array) return v;
  if (v instanceof Int32Array) return new Uint32Array(v.buffer, v.byteOffset, v.length);
  throw new InvalidArgumentError(`${where} must be an Int32Array or Uint32Array, got ${describe(v)}`);
}

/**
 * Sparse weights from a CSR matrix given directly (see CsrInput: the rows are output columns).
 * Every array is checked; a malformed one is an InvalidArgumentError naming the field.
 */
export function sparseFromCsr(csr: CsrInput): SparseWeights {
  const where = 'sparseFromCsr';
  if (csr === null || typeof csr !== 'object' || Array.isArray(csr)) {
    throw new InvalidArgumentError(`${where}(csr) must be an object { rows, cols, rowPtr, colIdx, values }, got ${describe(csr)}`);
  }
  const c = checkOptions<CsrInput>(`${where}(csr)`, csr, ['rows', 'cols', 'rowPtr', 'colIdx', 'values']);
  const rows = checkInt(`${where}: csr.rows`, c.rows, 0, 2 ** 32 - 2);
  const cols = checkInt(`${where}: csr.cols`, c.cols, 0, MAX_K);
  // Int32Array input: a negative entry reads as >= 2^31 through the Uint32Array view, and is then
  // reported as out of range / not monotone with its signed value below.
  const signedRp = c.rowPtr instanceof Int32Array;
  const signedCi = c.colIdx instanceof Int32Array;
  const rowPtr = checkIndexArray(`${where}: csr.rowPtr`, c.rowPtr);
  const colIdx = checkIndexArray(`${where}: csr.colIdx`, c.colIdx);
  if (!(c.values instanceof Float32Array)) {
    throw new InvalidArgumentError(`${where}: csr.values must be a Float32Array, got ${describe(c.values)}`);
  }
  const values = c.values;
  const rv = (i: number) => (signedRp ? (rowPtr[i]! | 0) : rowPtr[i]!);
  const cv = (i: number) => (signedCi ? (colIdx[i]! | 0) : colIdx[i]!);
  if (rowPtr.length !== rows + 1) {
    throw new InvalidArgumentError(`${where}: csr.rowPtr must have rows + 1 = ${rows + 1} entries, got ${rowPtr.length}`);
  }
  if (colIdx.length !== values.length) {
    throw new InvalidArgumentError(`${where}: csr.colIdx and csr.values must have the same length, got ${colIdx.length} and ${values.length}`);
  }
  if (rv(0) !== 0) throw new InvalidArgumentError(`${where}: csr.rowPtr[0] must be 0, got ${rv(0)}`);
  for (let r = 0; r < rows; r++) {
    if (rv(r + 1) < rv(r)) {
      throw new InvalidArgumentError(`${where}: csr.rowPtr must be non-decreasing, but rowPtr[${r + 1}] = ${rv(r + 1)} < rowPtr[${r}] = ${rv(r)}`);
    }
  }
  if (rv(rows) !== values.length) {
    throw new InvalidArgumentError(
      `${where}: csr.rowPtr[${rows}] (the non-zero count) is ${rv(rows)} but csr.colIdx and csr.values hold ${values.length}`);
  }
  for (let r = 0; r < rows; r++) {
    for (let p = rv(r); p < rv(r + 1); p++) {
      const col = cv(p);
      if (col < 0 || col >= cols) {
        throw new InvalidArgumentError(`${where}: csr.colIdx[${p}] = ${col} (row ${r}) is out of range [0, ${cols})`);
      }
      if (p > rv(r) && col <= cv(p - 1)) {
        throw new InvalidArgumentError(
          `${where}: csr.colIdx must be strictly increasing within a row, but row ${r} has colIdx[${p - 1}] = ${cv(p - 1)} then colIdx[${p}] = ${col}`);
      }
    }
  }
  const site = new Error();
  try {
    return new SparseWeights(native().sparseFromCsr(rows, cols, rowPtr, colIdx, values));
  } catch (err) {
    throw fromNative(err, site);
  }
}

/**
 * C = epilogue(A·B) with sparse B, on sonde's thread pool; the options (epilogue, k, out, threads,
 * variant, signal) are gemm's. Resolves to a new [M, N] float32 tensor, or to options.out.
 */
export async function spmm(a: Tensor<'float32'>, weights: SparseWeights, options?: GemmOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'spmm';
  const opts = checkOptions<GemmOptions>(where, options, GEMM_OPTIONS);
  checkTensor(`${where}(a)`, a, 'float32');
  check2d(`${where}(a)`, a);
  if (!(weights instanceof SparseWeights)) {
    throw new InvalidArgumentError(`${where}(weights) must be SparseWeights (from toSparse or sparseFromCsr), got ${describe(weights)}`);
  }
  const handle = weights.handle(`${where}(weights)`);
  const call = checkGemmCall(where, a, weights, weights.k, weights.n, opts, VARIANTS, ' (sparse weights)');
  const { out, variant, signal } = call;
  await callNative(
    () => withSignal(signal, (token) =>
      waitKernel(native().spmm(a.data, handle, out.data, {
        ...call.native, variant: variant as NativeGemmVariant, cancel: token,
      }), call.native.threads, `spmm ${variant} ${call.native.m}x${weights.k}x${weights.n} ${weights.nnz} t${call.native.threads}`)),
    site,
  );
  return out;
}
