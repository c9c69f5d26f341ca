/**
 * Quantised-weight matrix products on a GPU (native/kernels/quant/cuda/quant.cu): y = x · Wᵀ for
 * W in GGUF q8_0 or q4_0 blocks, with the CPU kernels' precision definition (kernels.quantMatmul):
 * x is quantised per row and block of 32 to int8 with an fp32 scale, each block's integer dot
 * product is exact, and the blocks are summed in fp32.
 *
 * Upload repacks: the 34- and 18-byte GGUF blocks are unaligned, so GpuQuantWeights.upload() splits
 * them on the device into aligned arrays of quants and fp16 scales (gpuQuantPackedBytes() bytes),
 * which the kernels read with 16-byte loads. The bytes a product reads are the GGUF ones.
 *
 * Up to 16 activation rows run a GEMV that streams the weights (decode); more rows a tiled GEMM on
 * int8 tensor cores (mma.sync, compute capability 8.0 and up) or a SIMT dp4a GEMM below that.
 */
import { InvalidArgumentError } from '../errors.js';
import { NativeResource } from '../lifetime.js';
import { checkInt, checkOneOf, checkOptions, describe } from '../validate.js';
import { checkGpuBuffer, checkWrittenApart } from './kernels.js';
import { GpuBuffer, runGpuOp, type GpuDeviceId } from './runtime.js';

/** The weight types these kernels read, as the op's `type` (the CPU kernels' QuantWeightType). */
export const GPU_QUANT_TYPES = { q8_0: 3, q4_0: 4 } as const;
export type GpuQuantType = keyof typeof GPU_QUANT_TYPES;
const TYPES = Object.keys(GPU_QUANT_TYPES) as GpuQuantType[];
const BLOCK_BYTES: Record<GpuQuantType, number> = { q8_0: 34, q4_0: 18 };
const QUANT_BYTES: Record<GpuQuantType, number> = { q8_0: 32, q4_0: 16 };

/** Bytes of n rows of k values as the device keeps them: the quants, then one fp16 scale per block. */
export function gpuQuantPackedBytes(type: GpuQuantType, n: number, k: number): number {
  return (n * k / 32) * (QUANT_BYTES[type] + 2);
}

/** Bytes of the scratch a product of m rows of k values needs: the int8 activations and their scales. */
export function gpuQuantScratchBytes(m: number, k: number): number {
  return m * k + m * (k / 32) * 4;
}

/** GGUF-encoded weights in host memory: kernels.quantizeWeights() results have this shape. */
export interface QuantWeightBytes {
  readonly type: string;
  /** Output rows. */
  readonly n: number;
  /** Values per row (a multiple of 32). */
  readonly k: number;
  /** n rows of k / 32 GGUF blocks. */
  readonly data: Uint8Array;
}

function checkShape(where: string, type: unknown, n: unknown, k: unknown): [GpuQuantType, number, number] {
  const t = checkOneOf(`${where}: type`, type, TYPES);
  const rows = checkInt(`${where}: n`, n, 0, 2 ** 31 - 1);
  const cols = checkInt(`${where}: k`, k, 32, 2 ** 31 - 1);
  if (cols % 32 !== 0) throw new InvalidArgumentError(`${where}: k must be a multiple of 32 (the ${t} block), got ${cols}`);
  return [t, rows, cols];
}

/** Weights resident on a device in the packed layout; dispose() frees the device memory. */
export class GpuQuantWeights extends NativeResource {
  readonly #buffer: GpuBuffer;

  private constructor(
    readonly device: GpuDeviceId,
    readonly type: GpuQuantType,
    readonly n: number,
    readonly k: number,
    buffer: GpuBuffer,
  ) {
    super();
    this.#buffer = buffer;
  }

  /** Uploads GGUF blocks and repacks them on the device into the layout the kernels read. */
  static async upload(device: GpuDeviceId, weights: QuantWeightBytes): Promise<GpuQuantWeights> {
    const where = 'GpuQuantWeights.upload';
    if (weights === null || typeof weights !== 'object') throw new InvalidArgumentError(`${where}: weights must be { type, n, k, data }, got ${describe(weights)}`);
    const [type, n, k] = checkShape(`${where}: weights`, weights.type, weights.n, weights.k);
    if (!(weights.data instanceof Uint8Array)) throw new InvalidArgumentError(`${where}: weights.data must be a Uint8Array, got ${describe(weights.data)}`);
    const want = n * (k / 32) * BLOCK_BYTES[type];
    if (weights.data.byteLength !== want)
      throw new InvalidArgumentError(`${where}: weights.data holds ${weights.data.byteLength} bytes, not ${n} rows of ${k} ${type} (${want} bytes)`);
    const packed = GpuBuffer.alloc(device, gpuQuantPackedBytes(type, n, k), `[${n}, ${k}] ${type} weights`);
    try {
      const raw = await GpuBuffer.from(device, weights.data, `[${n}, ${k}] ${type} weights (GGUF staging)`);
      try {
        await runGpuOp(device, 'quant_pack', [raw, packed], { type: GPU_QUANT_TYPES[type], n, k });
      } finally {
        raw.dispose();
      }
    } catch (err) {
      packed.dispose();
      throw err;
    }
    return new GpuQuantWeights(device, type, n, k, packed);
  }

  get bytes(): number {
    return this.#buffer.bytes;
  }

  /** @internal */
  buffer(where: string): GpuBuffer {
    this.checkAlive(where);
    return this.#buffer;
  }

  protected release(): void {
    this.#buffer.dispose();
  }
}

export type GpuQuantAlgorithm = 'auto' | 'gemv' | 'gemm';
const ALGORITHMS: readonly GpuQuantAlgorithm[] = ['auto', 'gemv', 'gemm'];

export interface GpuQuantMatmulOptions {
  /** 'auto' (default): the GEMV up to 16 rows, the GEMM above. */
  algorithm?: GpuQuantAlgorithm;
  /** Run the SIMT (dp4a) GEMM even where int8 tensor cores exist (devices below 8.0 always do). */
  simt?: boolean;
  /** Device scratch of at least gpuQuantScratchBytes(m, k) bytes; without it one is taken per call. */
  scratch?: GpuBuffer;
  /**
   * options.scratch already holds this x quantised, by an earlier call with the same x, m and k (the
   * Q, K and V projections of one input): skip the quantiser. Default false.
   */
  reuseScratch?: boolean;
  /** Time this many more runs with device events; the result is ms per run. */
  reps?: number;
}

/**
 * y = x · Wᵀ: x is m rows of k float32, y m rows of n float32, on the weights' device. Resolves to
 * ms per run when options.reps > 0, else 0.
 */
export async function gpuQuantMatmul(x: GpuBuffer, weights: GpuQuantWeights, y: GpuBuffer, m: number,
  options: GpuQuantMatmulOptions = {}): Promise<number> {
  const where = 'gpuQuantMatmul';
  if (!(weights instanceof GpuQuantWeights)) throw new InvalidArgumentError(`${where}: weights must be GpuQuantWeights, got ${describe(weights)}`);
  const packed = weights.buffer(where);
  const { device, n, k, type } = weights;
  const opts = checkOptions<GpuQuantMatmulOptions>(where, options, ['algorithm', 'simt', 'scratch', 'reuseScratch', 'reps']);
  m = checkInt(`${where}: m`, m, 0, 2 ** 31 - 1);
  const algorithm = checkOneOf(`${where}: options.algorithm`, opts.algorithm ?? 'auto', ALGORITHMS);
  if (opts.simt !== undefined && typeof opts.simt !== 'boolean') throw new InvalidArgumentError(`${where}: options.simt must be a boolean, got ${describe(opts.simt)}`);
  if (opts.reuseScratch !== undefined && typeof opts.reuseScratch !== 'boolean') throw new InvalidArgumentError(`${where}: options.reuseScratch must be a boolean, got ${describe(opts.reuseScratch)}`);
  if (opts.reuseScratch && opts.scratch === undefined) throw new InvalidArgumentError(`${where}: options.reuseScratch needs options.scratch, the buffer an earlier call quantised x into`);
  checkGpuBuffer(where, 'x', x, device, m * k * 4);
  checkGpuBuffer(where, 'y', y, device, m * n * 4);
  // y may be x: x is read only by the quantiser, which runs before the product writes y.
  checkWrittenApart(where, { 'options.scratch': opts.scratch }, { x, y });
  const scratchBytes = gpuQuantScratchBytes(m, k);
  const scratch = opts.scratch === undefined ? GpuBuffer.alloc(device, scratchBytes, `${where} scratch`)
    : checkGpuBuffer(where, 'options.scratch', opts.scratch, device, scratchBytes);
  try {
    return await runGpuOp(device, 'quant_matmul', [x, packed, y, scratch],
      { type: GPU_QUANT_TYPES[type], m, n, k, algorithm: ALGORITHMS.indexOf(algorithm), simt: opts.simt ?? false,
        reuse: opts.reuseScratch ?? false },
      opts.reps === undefined ? {} : { reps: opts.reps });
  } finally {
    if (scratch !== opts.scratch) scratch.dispose();
  }
}
