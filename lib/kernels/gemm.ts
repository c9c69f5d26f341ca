/**
 * sonde.kernels.gemm: C = act(A·B + bias), float32, row-major. A is [M, K]; B is [K, N] or weights
 * packed once with packGemmWeights (packing is per-load work; reuse the packed weights every run).
 */
import { native, type NativeGemmVariant, type NativePackedGemm } from '../binding.js';
import { InvalidArgumentError, callNative, fromNative } from '../errors.js';
import { NativeResource, withSignal } from '../lifetime.js';
import { Tensor, checkTensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';

/**
 * Which kernel runs: 'auto' is the widest SIMD level this CPU allows; 'reference' is the plain
 * scalar triple loop (double accumulation) that every fast variant is tested against.
 */
export type GemmVariant = NativeGemmVariant;
export type GemmActivation = 'none' | 'relu';

const VARIANTS: readonly GemmVariant[] = ['auto', 'reference', 'scalar', 'avx2', 'avx512'];
const ACTIVATIONS: readonly GemmActivation[] = ['none', 'relu'];
const ACTIVATION_CODE: Record<GemmActivation, number> = { none: 0, relu: 1 };

export interface GemmOptions {
  /** Per-column bias, float32 of shape [N]. */
  bias?: Tensor<'float32'>;
  activation?: GemmActivation;
  /** At most this many pool threads (default: the whole pool). */
  threads?: number;
  variant?: GemmVariant;
  signal?: AbortSignal;
}
const GEMM_OPTIONS = ['bias', 'activation', 'threads', 'variant', 'signal'] as const;

export interface PackGemmOptions {
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
  #handle: NativePackedGemm;

  /** @internal use packGemmWeights() */
  constructor(handle: NativePackedGemm) {
    super();
    this.#handle = handle;
    const info = handle.info();
    this.k = info.k!;
    this.n = info.n!;
    this.bytes = info.bytes!;
    this.variant = info.variant as PackedGemmWeights['variant'];
    this.ukernel = info.ukernel!;
  }

  /** @internal */
  handle(where: string): NativePackedGemm {
    this.checkAlive(where);
    return this.#handle;
  }

  protected release(): void {
    // Runs still using these weights keep them alive natively until they finish.
    this.#handle.dispose();
  }
}

function check2d(where: string, t: Tensor<'float32'>): [number, number] {
  if (t.dims.length !== 2) throw new InvalidArgumentError(`${where} must be 2-D [rows, cols], got dims [${t.dims.join(', ')}]`);
  return [t.dims[0]!, t.dims[1]!];
}

/** Packs B ([K, N] float32) for the GEMM microkernel of `variant` (default: this CPU's best). */
export function packGemmWeights(b: Tensor<'float32'>, options?: PackGemmOptions): PackedGemmWeights {
  const where = 'packGemmWeights';
  const opts = checkOptions<PackGemmOptions>(where, options, ['variant']);
  checkTensor(`${where}(b)`, b, 'float32');
  const [k, n] = check2d(`${where}(b)`, b);
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS.filter((v) => v !== 'reference'));
  const site = new Error();
  try {
    return new PackedGemmWeights(native().packGemmWeights(b.data, k, n, variant as PackGemmOptions['variant'] & string));
  } catch (err) {
    throw fromNative(err, site);
  }
}

/** C = act(A·B + bias) on sonde's thread pool. Resolves to a new [M, N] float32 tensor. */
export async function gemm(a: Tensor<'float32'>, b: Tensor<'float32'> | PackedGemmWeights, options?: GemmOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'gemm';
  const opts = checkOptions<GemmOptions>(where, options, GEMM_OPTIONS);
  checkTensor(`${where}(a)`, a, 'float32');
  const [m, k] = check2d(`${where}(a)`, a);
  let bArg: Float32Array | NativePackedGemm;
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
    throw new InvalidArgumentError(`${where}(b) must be a Tensor or PackedGemmWeights, got ${describe(b)}`);
  }
  if (kb !== k) {
    throw new InvalidArgumentError(`${where}: shape mismatch: a is [${m}, ${k}] but b is [${kb}, ${n}] (a's columns must equal b's rows)`);
  }
  let bias: Float32Array | null = null;
  if (opts.bias !== undefined) {
    checkTensor(`${where}: options.bias`, opts.bias, 'float32');
    if (opts.bias.size !== n || opts.bias.dims.length !== 1) {
      throw new InvalidArgumentError(`${where}: options.bias must have dims [${n}], got [${opts.bias.dims.join(', ')}]`);
    }
    bias = opts.bias.data;
  }
  const activation = checkOneOf(`${where}: options.activation`, opts.activation ?? 'none', ACTIVATIONS);
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS);
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  const out = new Float32Array(m * n);
  await callNative(
    () => withSignal(signal, (token) =>
      native().gemm(a.data, m, k, bArg, n, bias, ACTIVATION_CODE[activation], variant, threads, out, token)),
    site,
  );
  return new Tensor('float32', out, [m, n]);
}
