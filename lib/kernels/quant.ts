/**
 * Quantised-weight matrix products: y = x · Wᵀ with W stored as GGUF stores weights (N rows of K
 * contiguous values of type f32, f16, bf16, q8_0 or q4_0). The decode-time GEMV (M = 1) of a
 * language model, and small batches. W is a tensor of a mapped GgufFile (read where it lies, no
 * copy) or the result of quantizeWeights().
 *
 * Precision (native/kernels/quant/quant.h): float weight types use x as given and sum in fp32. For
 * q8_0 / q4_0, x is first quantised per row and block of 32 to int8 with an fp32 scale
 * (dx = max|x| / 127, q = rint(x · 127 / max|x|)), as llama.cpp does, and the integer block dot
 * products are exact; 'reference' computes the same definition with double sums.
 */
import { native, type NativeGgufHandle, type NativeQuantType, type NativeQuantVariant } from '../binding.js';
import { InvalidArgumentError, callNative } from '../errors.js';
import { waitKernel } from '../wait.js';
import { withSignal } from '../lifetime.js';
import { GgufTensor, GGUF_TENSOR_TYPES, type GgufTensorType } from '../llm/gguf.js';
import { encode, encodedBytes } from '../llm/quants.js';
import { Tensor, checkTensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';

export type QuantType = NativeQuantType;
/**
 * 'auto': avx512vnni for q8_0/q4_0 where the CPU has AVX512-VNNI, else the widest SIMD level;
 * 'reference': exact double sums of the precision definition; 'avx512vnni' exists for q8_0/q4_0.
 */
export type QuantVariant = NativeQuantVariant;
const VARIANTS: readonly QuantVariant[] = ['auto', 'reference', 'scalar', 'avx2', 'avx512', 'avx512vnni'];

/** Weights encoded in GGUF row layout in JS memory (no native resources: nothing to dispose). */
export class QuantizedWeights {
  /** @internal use quantizeWeights() */
  constructor(
    readonly type: QuantType,
    /** Output rows. */
    readonly n: number,
    /** Values per row. */
    readonly k: number,
    /** n rows of k values of `type` (q8_0 / q4_0: k / 32 blocks of 34 / 18 bytes per row). */
    readonly data: Uint8Array,
  ) {}

  get bytes(): number {
    return this.data.byteLength;
  }
}

/**
 * Encodes w ([N, K] float32, one output row per row) as `type` with ggml's reference formulas
 * (q8_0 and q4_0 need K to be a multiple of 32).
 */
export function quantizeWeights(w: Tensor<'float32'>, type: QuantType): QuantizedWeights {
  const where = 'quantizeWeights';
  checkTensor(`${where}(w)`, w, 'float32');
  if (w.dims.length !== 2) throw new InvalidArgumentError(`${where}(w) must be 2-D [N, K], got dims [${w.dims.join(', ')}]`);
  const t = checkOneOf(`${where}(type)`, type, GGUF_TENSOR_TYPES) as QuantType;
  const [n, k] = [w.dims[0]!, w.dims[1]!];
  if ((t === 'q8_0' || t === 'q4_0') && k % 32 !== 0) {
    throw new InvalidArgumentError(`${where}(w): ${t} needs K (w.dims[1] = ${k}) to be a multiple of 32`);
  }
  return new QuantizedWeights(t, n, k, encode(t, w.data));
}

interface WeightsArg {
  ref: Uint8Array | NativeGgufHandle;
  index: number;
  type: QuantType;
  n: number;
  k: number;
  what: string;
}

function weightsArg(where: string, w: unknown): WeightsArg {
  if (w instanceof QuantizedWeights) {
    if (w.data.byteLength !== encodedBytes(w.type as GgufTensorType, w.n * w.k)) {
      throw new InvalidArgumentError(`${where}(weights): data holds ${w.data.byteLength} bytes, not ${w.n} rows of ${w.k} ${w.type}`);
    }
    return { ref: w.data, index: 0, type: w.type, n: w.n, k: w.k, what: `[${w.n}, ${w.k}] ${w.type}` };
  }
  if (w instanceof GgufTensor) {
    const [handle, index] = w.nativeRef(`${where}(weights)`);
    if (!(GGUF_TENSOR_TYPES as readonly string[]).includes(w.type)) {
      throw new InvalidArgumentError(`${where}(weights): tensor '${w.name}' is of type ${w.type}; the kernels read ${GGUF_TENSOR_TYPES.join(', ')}`);
    }
    if (w.dims.length < 1 || w.dims.slice(2).some((d) => d !== 1)) {
      throw new InvalidArgumentError(`${where}(weights): tensor '${w.name}' has dims [${w.dims.join(', ')}]; a weight matrix is [K, N]`);
    }
    const k = w.dims[0]!;
    const n = w.dims[1] ?? 1;
    return { ref: handle, index, type: w.type as QuantType, n, k, what: `tensor '${w.name}' (GGUF dims [${k}, ${n}]: ${n} rows of ${k})` };
  }
  throw new InvalidArgumentError(`${where}(weights) must be a GgufTensor or QuantizedWeights, got ${describe(w)}`);
}

/**
 * 'gemv': each activation row dotted with each weight row (decode); 'gemm': weights packed per panel
 * of 32 rows, tiles of activation rows over it (prefill; kernels: avx512 for f32/f16/bf16,
 * avx512vnni for q8_0/q4_0); 'auto' (default): 'gemm' from 6 rows where it has a kernel;
 * 'repacked' (q8_0 at avx512vnni): the weights repacked for the call into the 32-row interleaved
 * layout a language model repacks its q8_0 tensors to at load, then its one kernel for every M
 * (the same bits as 'gemm' and 'gemv').
 */
const isBlockType = (t: QuantType): boolean => t === 'q8_0' || t === 'q4_0';

export type QuantAlgorithm = 'auto' | 'gemv' | 'gemm' | 'repacked';
const ALGORITHMS: readonly QuantAlgorithm[] = ['auto', 'gemv', 'gemm', 'repacked'];

export interface QuantMatmulOptions {
  variant?: QuantVariant;
  algorithm?: QuantAlgorithm;
  /** At most this many pool threads (default: the whole pool). */
  threads?: number;
  signal?: AbortSignal;
}

/**
 * y = x · Wᵀ on sonde's pool: x is [M, K] (or [K], then y is [N]) float32, W holds N rows of K.
 * Resolves to a new float32 tensor [M, N] (or [N]).
 */
export async function quantMatmul(x: Tensor<'float32'>, weights: GgufTensor | QuantizedWeights,
  options?: QuantMatmulOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'quantMatmul';
  const opts = checkOptions<QuantMatmulOptions>(where, options, ['variant', 'algorithm', 'threads', 'signal']);
  checkTensor(`${where}(x)`, x, 'float32');
  if (x.dims.length !== 1 && x.dims.length !== 2) {
    throw new InvalidArgumentError(`${where}(x) must be [K] or [M, K], got dims [${x.dims.join(', ')}]`);
  }
  const w = weightsArg(where, weights);
  const m = x.dims.length === 2 ? x.dims[0]! : 1;
  const k = x.dims[x.dims.length - 1]!;
  if (k !== w.k) {
    throw new InvalidArgumentError(`${where}: shape mismatch: x is [${x.dims.join(', ')}] (K = ${k}) but the weights are ${w.what} (K = ${w.k})`);
  }
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS);
  if (variant === 'avx512vnni' && w.type !== 'q8_0' && w.type !== 'q4_0') {
    throw new InvalidArgumentError(`${where}: options.variant 'avx512vnni' has kernels for q8_0 and q4_0 only, the weights are ${w.type}`);
  }
  const algorithm = checkOneOf(`${where}: options.algorithm`, opts.algorithm ?? 'auto', ALGORITHMS);
  if (algorithm === 'gemm' && variant !== 'auto' && variant !== (isBlockType(w.type) ? 'avx512vnni' : 'avx512')) {
    throw new InvalidArgumentError(`${where}: options.algorithm 'gemm' has no kernel for ${w.type} weights at variant '${variant}' (avx512 runs f32, f16 and bf16; avx512vnni q8_0 and q4_0)`);
  }
  if (algorithm === 'repacked' && (w.type !== 'q8_0' || (variant !== 'auto' && variant !== 'avx512vnni'))) {
    throw new InvalidArgumentError(`${where}: options.algorithm 'repacked' has a kernel for q8_0 weights at variant 'avx512vnni' only, got ${w.type} at '${variant}'`);
  }
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  const out = new Float32Array(m * w.n);
  await callNative(() => withSignal(signal, (token) =>
    waitKernel(native().quantMatmul(x.data, w.ref, w.index, out, { m, k, n: w.n, type: w.type, variant, algorithm, threads, cancel: token }),
      threads, `quantMatmul ${w.type} ${variant} ${algorithm} ${m}x${k}x${w.n} t${threads}`)), site);
  return new Tensor('float32', out, x.dims.length === 2 ? [m, w.n] : [w.n]);
}

/** The weights as float32 [N, K] (exact: every stored value is a float32). */
export async function dequantize(weights: GgufTensor | QuantizedWeights, options?: { threads?: number; signal?: AbortSignal }): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'dequantize';
  const opts = checkOptions<{ threads?: number; signal?: AbortSignal }>(where, options, ['threads', 'signal']);
  const w = weightsArg(where, weights);
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  const out = new Float32Array(w.n * w.k);
  await callNative(() => withSignal(signal, (token) =>
    native().quantDequantize(w.ref, w.index, out, { k: w.k, n: w.n, type: w.type, threads, cancel: token })), site);
  return new Tensor('float32', out, [w.n, w.k]);
}
