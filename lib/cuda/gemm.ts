/**
 * GEMM on a GPU (native/kernels/gemm/cuda/gemm.cu) over device-resident GpuBuffers:
 *   C[m, n] = epilogue(A[m, k] . B[k, n]), row-major with leading dimensions, fp32 accumulation, fp32 C,
 * with the CPU GEMM's epilogue (lib/kernels/gemm.ts GemmOptions): v = acc * scale[j] + bias[j], then
 * act(v + residual) or act(v) + residual. B is fp32, fp16 or bf16 (16-bit values as raw bits); A is
 * fp32 or B's type. The tensor-core kernel ('mma', fp16/bf16 B on compute capability >= 8.0) rounds
 * an fp32 A to B's type; 'simt' and 'gemv' use A as given; Hopper's 'wgmma' takes A of B's type.
 * int8: weights packed on the device with gpuPackGemmInt8 (s8 per output column), A quantised per
 * row at run time, both exactly as the CPU's int8 precision (packGemmWeights precision 'int8'), so
 * the integer sums agree with the CPU int8 path.
 */
import { DisposedError, InvalidArgumentError } from '../errors.js';
import { checkActivation, type GemmActivation } from '../kernels/gemm.js';
import { checkInt, checkOneOf, checkOptions, describe } from '../validate.js';
import { checkGpuBuffer, checkWrittenApart } from './kernels.js';
import { GpuBuffer, runGpuOp, type GpuDeviceId, type GpuRunOptions } from './runtime.js';

export type GpuGemmType = 'f32' | 'f16' | 'bf16';
/**
 * 'auto': 'gemv' for m <= 8; else 'wgmma' on Hopper (compute capability 9.0 with the build's sm_90a
 * code) when A and B are both fp16 or both bf16 with 16-byte aligned rows (lda, ldb multiples of 8)
 * and the environment does not set SONDE_GPU_WGMMA=0; else 'mma' for fp16/bf16 B on compute
 * capability >= 8.0, unless its 128x128 tiles would leave over half the SMs idle (then 'simt', whose
 * smaller tiles and K split fill the device; A stays fp32 there); else 'simt'. 'wgmma' forced elsewhere is an InvalidArgumentError (the emulator
 * runs it, for tests). int8 has no separate SIMT tile kernel: 'simt' and 'gemv' both run its dp4a
 * kernel; it has no 'wgmma' kernel.
 */
export type GpuGemmKernel = 'auto' | 'mma' | 'simt' | 'gemv' | 'wgmma';

// Codes shared with gemm.cu (DType, Choice) and native/kernels/gemm/gemm.h (activations).
const TYPE_CODE: Record<GpuGemmType, number> = { f32: 0, f16: 1, bf16: 2 };
const KERNEL_CODE: Record<GpuGemmKernel, number> = { auto: 0, mma: 1, simt: 2, gemv: 3, wgmma: 4 };
const TYPES = Object.keys(TYPE_CODE) as GpuGemmType[];
const KERNELS = Object.keys(KERNEL_CODE) as GpuGemmKernel[];
/** int8: |sum of K products (u8 - zero) x s8| <= K * 255 * 127 must fit the s32 sums (as on the CPU). */
const INT8_MAX_K = 66311;
const INT32_MAX = 2 ** 31 - 1;

/** The epilogue, as lib/kernels/gemm.ts GemmOptions has it, with device buffers. */
export interface GpuGemmEpilogue {
  /** Per-column bias, float32 [n]. */
  bias?: GpuBuffer;
  /** Per-column scale, float32 [n]. */
  scale?: GpuBuffer;
  /** Added to the output: float32 [m, ldr]. */
  residual?: GpuBuffer;
  /** Row stride of residual in elements (default n). */
  ldr?: number;
  /** Add the residual before the activation instead of after. */
  residualBeforeActivation?: boolean;
  activation?: GemmActivation;
  /** Bounds for activation 'clip' (both required). */
  clipMin?: number;
  clipMax?: number;
  /** Negative slope for 'leakyRelu' (default 0.01). */
  alpha?: number;
}

export interface GpuGemmOptions extends GpuGemmEpilogue, GpuRunOptions {
  /** Type of B (default 'f32'). */
  bType?: GpuGemmType;
  /** Type of A: 'f32' (default) or bType. */
  aType?: GpuGemmType;
  /** Row strides in elements (defaults k, n, n). */
  lda?: number;
  ldb?: number;
  ldc?: number;
  kernel?: GpuGemmKernel;
  /**
   * The SIMT kernel's K split: this many blocks per output tile, each adding its partial sums into c
   * (default: chosen where the tiles alone leave the device idle; 1: none). Other kernels ignore it.
   */
  splitK?: number;
  /** The SIMT kernel's block tile, 64 or 128 square (default: 64 where 128 would leave SMs idle). */
  simtTile?: 64 | 128;
}
const EPILOGUE_OPTIONS = ['bias', 'scale', 'residual', 'ldr', 'residualBeforeActivation', 'activation', 'clipMin', 'clipMax', 'alpha'] as const;
const GEMM_OPTIONS = [...EPILOGUE_OPTIONS, 'bType', 'aType', 'lda', 'ldb', 'ldc', 'kernel', 'splitK', 'simtTile', 'reps'] as const;

export interface GpuGemmInt8Options extends GpuGemmEpilogue, GpuRunOptions {
  lda?: number;
  ldc?: number;
  kernel?: GpuGemmKernel;
}
const INT8_OPTIONS = [...EPILOGUE_OPTIONS, 'lda', 'ldc', 'kernel', 'reps'] as const;

function span(rows: number, ld: number, cols: number, elemBytes: number): number {
  return rows > 0 && cols > 0 ? ((rows - 1) * ld + cols) * elemBytes : 0;
}

function checkLd(where: string, v: unknown, fallback: number, min: number): number {
  return v === undefined ? Math.max(fallback, 1) : checkInt(where, v, Math.max(min, 1), INT32_MAX);
}

/** Validates the epilogue; returns its buffers (in the op's order) and params. */
function epilogue(w: string, device: GpuDeviceId, o: Partial<GpuGemmEpilogue>, m: number, n: number):
  { buffers: GpuBuffer[]; params: Record<string, number> } {
  const buffers: GpuBuffer[] = [];
  const params: Record<string, number> = {};
  if (o.bias !== undefined) buffers.push(checkGpuBuffer(w, 'options.bias', o.bias, device, n * 4)), params.hasBias = 1;
  if (o.scale !== undefined) buffers.push(checkGpuBuffer(w, 'options.scale', o.scale, device, n * 4)), params.hasScale = 1;
  if (o.residual !== undefined) {
    const ldr = checkLd(`${w}: options.ldr`, o.ldr, n, n);
    buffers.push(checkGpuBuffer(w, 'options.residual', o.residual, device, span(m, ldr, n, 4)));
    params.hasResidual = 1;
    params.ldr = ldr;
    params.residualBeforeActivation = o.residualBeforeActivation === true ? 1 : 0;
  } else if (o.ldr !== undefined || o.residualBeforeActivation !== undefined) {
    throw new InvalidArgumentError(`${w}: options.${o.ldr !== undefined ? 'ldr' : 'residualBeforeActivation'} has no effect without options.residual`);
  }
  const { code, alpha, beta } = checkActivation(w, o, true);
  Object.assign(params, { activation: code, alpha, beta });
  return { buffers, params };
}

function shape(w: string, m: unknown, n: unknown, k: unknown, maxK = INT32_MAX): [number, number, number] {
  return [checkInt(`${w}: m`, m, 0, INT32_MAX), checkInt(`${w}: n`, n, 0, INT32_MAX), checkInt(`${w}: k`, k, 0, maxK)];
}

/**
 * C = epilogue(A . B) on the device (see the file's comment). a: [m, lda] of aType, b: [k, ldb] of
 * bType, c: float32 [m, ldc] (columns past n untouched). Resolves to ms per run with options.reps.
 */
export async function gpuGemm(device: GpuDeviceId, a: GpuBuffer, b: GpuBuffer, c: GpuBuffer, m: number, n: number, k: number,
  options?: GpuGemmOptions): Promise<number> {
  const w = 'gpuGemm';
  const o = checkOptions<GpuGemmOptions>(w, options, GEMM_OPTIONS);
  [m, n, k] = shape(w, m, n, k);
  const bType = checkOneOf(`${w}: options.bType`, o.bType ?? 'f32', TYPES);
  const aType = checkOneOf(`${w}: options.aType`, o.aType ?? 'f32', TYPES);
  if (aType !== 'f32' && aType !== bType) throw new InvalidArgumentError(`${w}: options.aType must be 'f32' or bType ('${bType}'), got '${aType}'`);
  const kernel = checkOneOf(`${w}: options.kernel`, o.kernel ?? 'auto', KERNELS);
  if (kernel === 'mma' && bType === 'f32') throw new InvalidArgumentError(`${w}: options.kernel 'mma' needs bType 'f16' or 'bf16'`);
  if (kernel === 'wgmma' && (bType === 'f32' || aType !== bType)) {
    throw new InvalidArgumentError(`${w}: options.kernel 'wgmma' needs aType and bType both 'f16' or both 'bf16', got '${aType}' and '${bType}'`);
  }
  const lda = checkLd(`${w}: options.lda`, o.lda, k, k), ldb = checkLd(`${w}: options.ldb`, o.ldb, n, n);
  const ldc = checkLd(`${w}: options.ldc`, o.ldc, n, n);
  const splitK = o.splitK === undefined ? 0 : checkInt(`${w}: options.splitK`, o.splitK, 1, 65535);
  if (o.simtTile !== undefined && o.simtTile !== 64 && o.simtTile !== 128) {
    throw new InvalidArgumentError(`${w}: options.simtTile must be 64 or 128, got ${describe(o.simtTile)}`);
  }
  const simtTile = o.simtTile ?? 0;
  checkGpuBuffer(w, 'a', a, device, span(m, lda, k, aType === 'f32' ? 4 : 2));
  checkGpuBuffer(w, 'b', b, device, span(k, ldb, n, bType === 'f32' ? 4 : 2));
  checkGpuBuffer(w, 'c', c, device, span(m, ldc, n, 4));
  const ep = epilogue(w, device, o, m, n);
  // The residual may be c itself: each element is read before it is written, by the same thread.
  checkWrittenApart(w, { c }, { a, b, 'options.bias': o.bias, 'options.scale': o.scale });
  return runGpuOp(device, 'gemm', [a, b, c, ...ep.buffers], {
    m, n, k, lda, ldb, ldc, aType: TYPE_CODE[aType], bType: TYPE_CODE[bType], kernel: KERNEL_CODE[kernel], splitK, simtTile, ...ep.params,
  }, { reps: o.reps });
}

/** int8 weights on a device: s8 per output column, from gpuPackGemmInt8. dispose() frees them. */
export class GpuInt8Weights {
  readonly k: number;
  readonly n: number;
  readonly device: GpuDeviceId;
  /** ceil(k / 16) * 4 rows of n int32, each 4 consecutive k of a column as s8. */
  readonly q: GpuBuffer;
  /** float32 [n]: column j's weights are q * scale[j]. */
  readonly scale: GpuBuffer;
  /** int32 [n]: the sum of column j's quantised weights. */
  readonly sum: GpuBuffer;

  /** @internal use gpuPackGemmInt8() */
  constructor(device: GpuDeviceId, k: number, n: number, q: GpuBuffer, scale: GpuBuffer, sum: GpuBuffer) {
    this.device = device;
    this.k = k;
    this.n = n;
    this.q = q;
    this.scale = scale;
    this.sum = sum;
  }

  get disposed(): boolean {
    return this.q.disposed;
  }

  dispose(): void {
    for (const b of [this.q, this.scale, this.sum]) b.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

function quadRows(k: number): number {
  return Math.ceil(k / 16) * 4;
}

/**
 * Quantises B (float32 [k, ldb] on the device) to int8 weights as packGemmWeights(b, { precision:
 * 'int8' }) does: scale[j] = max|b[:, j]| / 127, q = round-half-even(b / scale). Non-finite weights and
 * k > 66311 are InvalidArgumentError.
 */
export async function gpuPackGemmInt8(device: GpuDeviceId, b: GpuBuffer, k: number, n: number,
  options?: { ldb?: number }): Promise<GpuInt8Weights> {
  const w = 'gpuPackGemmInt8';
  const o = checkOptions<{ ldb?: number }>(w, options, ['ldb']);
  k = checkInt(`${w}: k`, k, 0, INT8_MAX_K);
  n = checkInt(`${w}: n`, n, 0, INT32_MAX);
  const ldb = checkLd(`${w}: options.ldb`, o.ldb, n, n);
  checkGpuBuffer(w, 'b', b, device, span(k, ldb, n, 4));
  const made: GpuBuffer[] = [];
  try {
    for (const [bytes, what] of [[quadRows(k) * n * 4, 'int8 weights'], [n * 4, 'int8 weight scales'], [n * 4, 'int8 weight sums']] as const) {
      made.push(GpuBuffer.alloc(device, Math.max(bytes, 4), what));
    }
    const [q, scale, sum] = made as [GpuBuffer, GpuBuffer, GpuBuffer];
    await runGpuOp(device, 'gemm_pack_s8', [b, q, scale, sum], { k, n, ldb });
    return new GpuInt8Weights(device, k, n, q, scale, sum);
  } catch (err) {
    made.forEach((x) => x.dispose());
    throw err;
  }
}

/**
 * C = epilogue(A . W) with int8 weights: A (float32 [m, lda]) is quantised per row to u8 on the
 * device (a scratch buffer per call), the products summed exactly in int32 and dequantised.
 */
export async function gpuGemmInt8(device: GpuDeviceId, a: GpuBuffer, weights: GpuInt8Weights, c: GpuBuffer, m: number,
  options?: GpuGemmInt8Options): Promise<number> {
  const w = 'gpuGemmInt8';
  const o = checkOptions<GpuGemmInt8Options>(w, options, INT8_OPTIONS);
  if (!(weights instanceof GpuInt8Weights)) throw new InvalidArgumentError(`${w}: weights must be GpuInt8Weights (from gpuPackGemmInt8), got ${describe(weights)}`);
  if (weights.disposed) throw new DisposedError(`${w}: the weights have been disposed`);
  if (weights.device !== device) throw new InvalidArgumentError(`${w}: weights live on ${weights.device}, not ${device}`);
  const { k, n } = weights;
  m = checkInt(`${w}: m`, m, 0, INT32_MAX);
  const kernel = checkOneOf(`${w}: options.kernel`, o.kernel ?? 'auto', KERNELS);
  if (kernel === 'wgmma') throw new InvalidArgumentError(`${w}: options.kernel 'wgmma' is for fp16/bf16 weights (gpuGemm), not int8`);
  const lda = checkLd(`${w}: options.lda`, o.lda, k, k), ldc = checkLd(`${w}: options.ldc`, o.ldc, n, n);
  checkGpuBuffer(w, 'a', a, device, span(m, lda, k, 4));
  checkGpuBuffer(w, 'c', c, device, span(m, ldc, n, 4));
  const ep = epilogue(w, device, o, m, n);
  checkWrittenApart(w, { c }, { a, 'weights.q': weights.q, 'weights.scale': weights.scale, 'weights.sum': weights.sum,
    'options.bias': o.bias, 'options.scale': o.scale });
  const scratch = GpuBuffer.alloc(device, Math.max(m * (quadRows(k) * 4 + 8), 16), 'int8 GEMM scratch (quantised A)');
  try {
    return await runGpuOp(device, 'gemm_s8', [a, weights.q, weights.scale, weights.sum, c, scratch, ...ep.buffers], {
      m, n, k, lda, ldc, kernel: KERNEL_CODE[kernel], ...ep.params,
    }, { reps: o.reps });
  } finally {
    scratch.dispose();
  }
}
