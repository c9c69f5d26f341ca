/**
 * sonde.kernels.gemm: C = act(A·B + bias), float32, row-major. A is [M, K]; B is [K, N] or weights
 * packed once with packGemmWeights (packing is per-load work; reuse the packed weights every run).
 * Packed weights may be stored in bf16, fp16 or int8 (options.precision); A and C stay float32.
 */
import {
  native, type NativeGemmLowPrecision, type NativeGemmOptions, type NativeGemmLowpVariant, type NativeGemmVariant, type NativePackedGemm, type NativePackedGemmLowp,
} from '../binding.js';
import { InvalidArgumentError, callNative, fromNative } from '../errors.js';
import { waitKernel } from '../wait.js';
import { NativeResource, withSignal } from '../lifetime.js';
import { allocOutput } from '../buffers.js';
import { SparseWeights, spmm } from './sparse.js';
import { Tensor, checkTensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';

/**
 * Which kernel runs: 'auto' is the widest SIMD level this CPU allows; 'reference' is the plain
 * scalar triple loop (double accumulation) that every fast variant is tested against.
 * 'avx512bf16' (bf16 weights) and 'avx512vnni' (int8 weights) exist for low-precision weights only,
 * as does 'amx' (bf16 and int8 weights, on CPUs with Intel AMX tiles: 'auto' picks it there).
 */
export type GemmVariant = NativeGemmLowpVariant;
/**
 * How packed weights are stored. 'fp32' as given; 'bf16' / 'fp16' rounded to nearest even;
 * 'int8' quantised symmetrically per output column (A is then quantised per row at run time).
 */
export type GemmPrecision = 'fp32' | NativeGemmLowPrecision;
export type GemmActivation =
  | 'none' | 'relu' | 'relu6' | 'clip' | 'silu' | 'gelu' | 'geluTanh' | 'sigmoid' | 'leakyRelu' | 'hardSwish';

const VARIANTS: readonly GemmVariant[] = ['auto', 'reference', 'scalar', 'avx2', 'avx512'];
const PRECISIONS: readonly GemmPrecision[] = ['fp32', 'bf16', 'fp16', 'int8'];
// The packing variants of each low precision (native/ops/gemm_lowp.cc has a kernel for each).
const LOWP_VARIANTS: Record<NativeGemmLowPrecision, readonly GemmVariant[]> = {
  bf16: ['auto', 'scalar', 'avx2', 'avx512', 'avx512bf16', 'amx'],
  fp16: ['auto', 'scalar', 'avx2', 'avx512'],
  int8: ['auto', 'scalar', 'avx2', 'avx512', 'avx512vnni', 'amx'],
};
/** int8: |sum of K products u8 x s8| <= K * 255 * 127 must fit the s32 accumulators. */
const INT8_MAX_K = 66311;
// Codes of GemmActivation in native/kernels/gemm/gemm.h.
/** Activation codes of native/kernels/gemm/gemm.h, shared by every epilogue (CPU and GPU, GEMM and conv). */
export const ACTIVATION_CODE: Record<GemmActivation, number> = {
  none: 0, relu: 1, relu6: 2, clip: 2, silu: 3, gelu: 4, geluTanh: 5, sigmoid: 6, leakyRelu: 7, hardSwish: 8,
};
const ACTIVATIONS = Object.keys(ACTIVATION_CODE) as GemmActivation[];

/**
 * Epilogue, applied while the output tile is in registers:
 *   v = (A·B)[i, j] * scale[j] + bias[j]
 *   C[i, j] = residualBeforeActivation ? act(v + residual[i, j]) : act(v) + residual[i, j]
 */
export interface GemmOptions {
  /** Per-column bias, float32 [N]. */
  bias?: Tensor<'float32'>;
  /** Per-column scale, float32 [N] (with bias: a folded BatchNormalization). */
  scale?: Tensor<'float32'>;
  /** Added to the output: float32 [M, ldr] with ldr >= N (the first N columns are used). */
  residual?: Tensor<'float32'>;
  /** Add the residual before the activation (ResNet's add-then-ReLU) instead of after. */
  residualBeforeActivation?: boolean;
  activation?: GemmActivation;
  /** Bounds for activation 'clip' (both required). */
  clipMin?: number;
  clipMax?: number;
  /** Negative slope for 'leakyRelu' (default 0.01). */
  alpha?: number;
  /**
   * Columns of A to use when a's rows are longer (a is [M, lda] with lda >= k): the leading
   * dimension is a's row length. Default: a's row length.
   */
  k?: number;
  /** Write into this float32 [M, ldc] tensor (ldc >= N; columns past N are left untouched) instead of a new one. */
  out?: Tensor<'float32'>;
  /** At most this many pool threads (default: the whole pool). */
  threads?: number;
  variant?: GemmVariant;
  signal?: AbortSignal;
}
export const GEMM_OPTIONS = ['bias', 'scale', 'residual', 'residualBeforeActivation', 'activation', 'clipMin', 'clipMax',
  'alpha', 'k', 'out', 'threads', 'variant', 'signal'] as const;

export interface PackGemmOptions {
  /** Storage of the packed weights (default 'fp32'). */
  precision?: GemmPrecision;
  variant?: Exclude<GemmVariant, 'reference'>;
}

/** B packed into a microkernel's panel layout. Holds native memory: dispose() it when done. */
export class PackedGemmWeights extends NativeResource {
  readonly k: number;
  readonly n: number;
  /** Native bytes held (reported to V8 as external memory). */
  readonly bytes: number;
  /** The kernel variant the layout was packed for. */
  readonly variant: Exclude<GemmVariant, 'auto' | 'reference'>;
  /** The microkernel's name, e.g. f32_gemm_12x32__avx512. */
  readonly ukernel: string;
  /** How the weights are stored. */
  readonly precision: GemmPrecision;
  /**
   * What the kernel does to A: 'fp32' (used as given), 'bf16' (rounded to bf16: the avx512bf16 and
   * amx kernels) or 'u8' (quantised per row: int8 weights).
   */
  readonly activations: 'fp32' | 'bf16' | 'u8';
  #handle: NativePackedGemm | NativePackedGemmLowp;

  /** @internal use packGemmWeights() */
  constructor(handle: NativePackedGemm | NativePackedGemmLowp) {
    super();
    this.#handle = handle;
    const info = handle.info() as ReturnType<NativePackedGemmLowp['info']>;
    this.k = info.k!;
    this.n = info.n!;
    this.bytes = info.bytes!;
    this.variant = info.variant as PackedGemmWeights['variant'];
    this.ukernel = info.ukernel!;
    this.precision = info.precision ?? 'fp32';
    this.activations = info.activations ?? 'fp32';
  }

  /** @internal */
  handle(where: string): NativePackedGemm | NativePackedGemmLowp {
    this.checkAlive(where);
    return this.#handle;
  }

  protected release(): void {
    // Runs still using these weights keep them alive natively until they finish.
    this.#handle.dispose();
  }
}

/** @internal */
export function check2d(where: string, t: Tensor<'float32'>): [number, number] {
  if (t.dims.length !== 2) throw new InvalidArgumentError(`${where} must be 2-D [rows, cols], got dims [${t.dims.join(', ')}]`);
  return [t.dims[0]!, t.dims[1]!];
}

/**
 * Packs B ([K, N] float32) for the GEMM microkernel of `variant` (default: this CPU's best), stored
 * in `precision` (default 'fp32'). int8 needs finite weights and K <= 66311.
 */
export function packGemmWeights(b: Tensor<'float32'>, options?: PackGemmOptions): PackedGemmWeights {
  const where = 'packGemmWeights';
  const opts = checkOptions<PackGemmOptions>(where, options, ['precision', 'variant']);
  checkTensor(`${where}(b)`, b, 'float32');
  const [k, n] = check2d(`${where}(b)`, b);
  const precision = checkOneOf(`${where}: options.precision`, opts.precision ?? 'fp32', PRECISIONS);
  const allowed = precision === 'fp32' ? VARIANTS.filter((v) => v !== 'reference') : LOWP_VARIANTS[precision];
  const variant = checkOneOf(`${where}: options.variant${precision === 'fp32' ? '' : ` (precision '${precision}')`}`,
    opts.variant ?? 'auto', allowed);
  if (precision === 'int8' && k > INT8_MAX_K) {
    throw new InvalidArgumentError(`${where}(b) has ${k} rows; int8 weights allow K <= ${INT8_MAX_K} (s32 sums must not overflow)`);
  }
  const site = new Error();
  try {
    if (precision !== 'fp32') {
      return new PackedGemmWeights(native().packGemmWeightsLowp(b.data, k, n, precision, variant as Exclude<GemmVariant, 'reference'>));
    }
    return new PackedGemmWeights(native().packGemmWeights(b.data, k, n, variant as Exclude<NativeGemmVariant, 'reference'>));
  } catch (err) {
    throw fromNative(err, site);
  }
}

/** A number option: NaN and non-numbers are errors; with finite, so are the infinities. */
export function checkNumber(where: string, v: unknown, finite = false): number {
  if (typeof v !== 'number' || Number.isNaN(v) || (finite && !Number.isFinite(v))) {
    throw new InvalidArgumentError(`${where} must be a ${finite ? 'finite ' : ''}number, got ${describe(v)}`);
  }
  return v;
}

/** An epilogue's activation options. */
export interface ActivationOptions {
  activation?: GemmActivation;
  clipMin?: number;
  clipMax?: number;
  alpha?: number;
}

/**
 * The activation of an epilogue with its parameters: alpha/beta are clip's bounds (relu6: 0 and 6)
 * and alpha is leakyRelu's slope (default 0.01); a parameter the activation does not use is an
 * error. finite: the kernels that run it take no infinite bounds (the GPU's).
 */
export function checkActivation(where: string, opts: ActivationOptions, finite = false): { activation: GemmActivation; code: number; alpha: number; beta: number } {
  const activation = checkOneOf(`${where}: options.activation`, opts.activation ?? 'none', ACTIVATIONS);
  let alpha = 0;
  let beta = 0;
  if (activation === 'clip') {
    if (opts.clipMin === undefined || opts.clipMax === undefined) {
      throw new InvalidArgumentError(`${where}: activation 'clip' needs options.clipMin and options.clipMax`);
    }
    alpha = checkNumber(`${where}: options.clipMin`, opts.clipMin, finite);
    beta = checkNumber(`${where}: options.clipMax`, opts.clipMax, finite);
    if (alpha > beta) throw new InvalidArgumentError(`${where}: options.clipMin (${alpha}) must not exceed options.clipMax (${beta})`);
  } else if (activation === 'relu6') {
    [alpha, beta] = [0, 6];
  } else if (activation === 'leakyRelu') {
    alpha = opts.alpha === undefined ? 0.01 : checkNumber(`${where}: options.alpha`, opts.alpha, finite);
  }
  for (const [key, used] of [['clipMin', activation === 'clip'], ['clipMax', activation === 'clip'], ['alpha', activation === 'leakyRelu']] as const) {
    if (opts[key] !== undefined && !used) {
      throw new InvalidArgumentError(`${where}: options.${key} has no effect with activation '${activation}'`);
    }
  }
  return { activation, code: ACTIVATION_CODE[activation], alpha, beta };
}

function checkColumnVector(where: string, t: unknown, n: number): Float32Array {
  const v = checkTensor(where, t, 'float32');
  if (v.dims.length !== 1 || v.size !== n) {
    throw new InvalidArgumentError(`${where} must have dims [${n}], got [${v.dims.join(', ')}]`);
  }
  return v.data;
}

/** @internal What gemm and spmm check alike: everything in GemmOptions once the weights' K and N are known. */
export interface GemmCall {
  m: number; k: number; lda: number; ldc: number; out: Tensor<'float32'>; variant: GemmVariant;
  native: Omit<NativeGemmOptions, 'variant'>;
  signal: AbortSignal | undefined;
}

/** @internal */
export function checkGemmCall(where: string, a: Tensor<'float32'>, b: unknown, kb: number, n: number,
  opts: Partial<GemmOptions>, variants: readonly GemmVariant[], bNote: string): GemmCall {
  const [m, lda] = check2d(`${where}(a)`, a);
  let k = lda;
  if (opts.k !== undefined) {
    k = checkInt(`${where}: options.k`, opts.k, 0);
    if (k > lda) {
      throw new InvalidArgumentError(`${where}: options.k (${k}) exceeds a's row length (${lda}); a's leading dimension must be at least K`);
    }
  }
  if (kb !== k) {
    throw new InvalidArgumentError(
      `${where}: shape mismatch: a is [${m}, ${lda}]${opts.k !== undefined ? ` using k = ${k}` : ''} but b${bNote} is [${kb}, ${n}] (a's columns must equal b's rows)`);
  }
  const bias = opts.bias === undefined ? undefined : checkColumnVector(`${where}: options.bias`, opts.bias, n);
  const scale = opts.scale === undefined ? undefined : checkColumnVector(`${where}: options.scale`, opts.scale, n);
  let residual: Float32Array | undefined;
  let ldr = 0;
  if (opts.residual !== undefined) {
    const r = checkTensor(`${where}: options.residual`, opts.residual, 'float32');
    if (r.dims.length !== 2 || r.dims[0] !== m || r.dims[1]! < n) {
      throw new InvalidArgumentError(`${where}: options.residual must have dims [${m}, ldr] with ldr >= ${n}, got [${r.dims.join(', ')}]`);
    }
    residual = r.data;
    ldr = r.dims[1]!;
  }
  const { activation, alpha, beta } = checkActivation(where, opts);
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', variants);
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  let out: Tensor<'float32'>;
  if (opts.out !== undefined) {
    out = checkTensor(`${where}: options.out`, opts.out, 'float32');
    if (out.dims.length !== 2 || out.dims[0] !== m || out.dims[1]! < n) {
      throw new InvalidArgumentError(`${where}: options.out must have dims [${m}, ldc] with ldc >= ${n}, got [${out.dims.join(', ')}]`);
    }
    for (const [name, t] of [['a', a], ['b', b], ['options.residual', opts.residual], ['options.bias', opts.bias], ['options.scale', opts.scale]] as const) {
      if (t instanceof Tensor && t.data.buffer === out.data.buffer) {
        throw new InvalidArgumentError(`${where}: options.out must not share memory with ${name}`);
      }
    }
  } else {
    out = new Tensor('float32', allocOutput(Float32Array, m * n), [m, n]);
  }
  const ldc = out.dims[1]!;
  return {
    m, k, lda, ldc, out, variant, signal,
    native: {
      m, k, n, lda, ldc, bias, scale, residual, ldr, activation: ACTIVATION_CODE[activation], alpha, beta,
      residualBeforeActivation: opts.residualBeforeActivation === true, threads,
    },
  };
}

/**
 * C = epilogue(A·B) on sonde's thread pool (see GemmOptions). With SparseWeights, this is spmm(). Resolves to a new [M, N] float32
 * tensor, or to options.out when given.
 */
export async function gemm(a: Tensor<'float32'>, b: Tensor<'float32'> | PackedGemmWeights | SparseWeights, options?: GemmOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'gemm';
  const opts = checkOptions<GemmOptions>(where, options, GEMM_OPTIONS);
  if (b instanceof SparseWeights) return spmm(a, b, opts);
  checkTensor(`${where}(a)`, a, 'float32');
  check2d(`${where}(a)`, a);
  let bArg: Float32Array | NativePackedGemm | NativePackedGemmLowp;
  let kb: number;
  let n: number;
  if (b instanceof PackedGemmWeights) {
    bArg = b.handle(`${where}(b)`);
    kb = b.k;
    n = b.n;
  } else if (b instanceof Tensor) {
    checkTensor(`${where}(b)`, b, 'float32');
    [kb, n] = check2d(`${where}(b)`, b);
    bArg = b.data;
  } else {
    throw new InvalidArgumentError(`${where}(b) must be a Tensor, PackedGemmWeights or SparseWeights, got ${describe(b)}`);
  }
  const lowp = b instanceof PackedGemmWeights && b.precision !== 'fp32' ? b : undefined;
  // Low-precision weights run the kernel they were packed for ('auto'), or the exact reference.
  const call = checkGemmCall(where, a, b, kb, n, opts, lowp ? ['auto', 'reference', lowp.variant] : VARIANTS,
    b instanceof PackedGemmWeights ? ' (packed weights)' : '');
  const { out, variant, signal } = call;
  if (lowp) {
    await callNative(
      () => withSignal(signal, (token) =>
        waitKernel(native().gemmLowp(a.data, bArg as NativePackedGemmLowp, out.data, {
          ...call.native, variant, cancel: token,
        }), call.native.threads, `gemm ${lowp.precision} ${variant} ${call.native.m}x${kb}x${n} t${call.native.threads}`)),
      site,
    );
    return out;
  }
  await callNative(
    () => withSignal(signal, (token) =>
      waitKernel(native().gemm(a.data, bArg as NativePackedGemm | Float32Array, out.data, {
        ...call.native, variant: variant as NativeGemmVariant, cancel: token,
      }), call.native.threads, `gemm ${variant} ${call.native.m}x${kb}x${n} t${call.native.threads}`)),
    site,
  );
  return out;
}
