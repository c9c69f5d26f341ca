/**
 * sonde.kernels convolution family (float32, NCHW): Conv2d created once (BatchNormalization folded
 * into the weights and bias, weights packed; a bf16 storage option) and run many times with the
 * bias, activation and an optional residual add fused into the kernel's epilogue; max / average /
 * global average pooling. Every run happens on sonde's thread pool and resolves to a new tensor.
 */
import { native, type NativeConvHandle, type NativeConvVariant, type NativeWindow } from '../binding.js';
import { InvalidArgumentError, callNative, fromNative } from '../errors.js';
import { waitKernel } from '../wait.js';
import { NativeResource, withSignal } from '../lifetime.js';
import { ACTIVATION_CODE, checkActivation, checkNumber, type GemmActivation } from './gemm.js';
import { Tensor, checkTensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';

/**
 * Which kernels run: 'auto' is the fastest for this CPU (for bf16 weights: 'amx' on CPUs with Intel
 * AMX tiles, else 'avx512bf16' where the CPU has it; 'amx' runs the channel-blocked direct convs on
 * the tiles, image stems and the convs off the direct path (groups, dilation) on the fp32 kernels
 * with bf16-rounded weights); 'reference' is the direct double-accumulating loop every variant is
 * tested against.
 */
export type ConvVariant = NativeConvVariant;
export type ConvAutoPad = 'NOTSET' | 'SAME_UPPER' | 'SAME_LOWER' | 'VALID';
export type ConvActivation = GemmActivation;

const VARIANTS: readonly ConvVariant[] = ['auto', 'reference', 'scalar', 'avx2', 'avx512', 'avx512bf16', 'amx'];
/** The variants of bf16 weights only. */
const BF16_VARIANTS: readonly ConvVariant[] = ['avx512bf16', 'amx'];
const AUTO_PADS: readonly ConvAutoPad[] = ['NOTSET', 'SAME_UPPER', 'SAME_LOWER', 'VALID'];
// Codes of GemmActivation in native/kernels/gemm/gemm.h (the conv epilogue is the GEMM's). Exported,
// with the window and option checks below, for the GPU conv (lib/cuda/conv.ts).
export { ACTIVATION_CODE, checkNumber };

/** Folded into the weights at creation: y = (conv(x) + bias - mean) * scale / sqrt(variance + epsilon) + bias. */
export interface BatchNormOptions {
  scale: Tensor<'float32'>;
  bias: Tensor<'float32'>;
  mean: Tensor<'float32'>;
  variance: Tensor<'float32'>;
  /** Default 1e-5 (ONNX's). */
  epsilon?: number;
}

export interface Conv2dOptions {
  /** float32 [C_out]. */
  bias?: Tensor<'float32'>;
  /** A BatchNormalization after the conv, folded into its weights and bias. */
  bn?: BatchNormOptions;
  /** [strideH, strideW], default [1, 1]. */
  strides?: readonly number[];
  /** [top, left, bottom, right] (ONNX order: begins then ends), default zeros. Ignored unless autoPad is 'NOTSET'. */
  pads?: readonly number[];
  autoPad?: ConvAutoPad;
  /** [dilationH, dilationW], default [1, 1]. */
  dilations?: readonly number[];
  /** Channel groups (default 1); group = C_in = C_out is a depthwise convolution. */
  group?: number;
  activation?: ConvActivation;
  /** Bounds for 'clip' (both required). */
  clipMin?: number;
  clipMax?: number;
  /** Negative slope of 'leakyRelu' (default 0.01). */
  alpha?: number;
  /**
   * Weight storage: 'fp32' (default) or 'bf16' (rounded to nearest even; fp32 accumulation). With
   * the 'avx512bf16' and 'amx' kernels the activations are rounded to bf16 too, like bf16 GEMMs elsewhere.
   */
  precision?: 'fp32' | 'bf16';
  variant?: ConvVariant;
}
const CREATE_OPTIONS = ['bias', 'bn', 'strides', 'pads', 'autoPad', 'dilations', 'group', 'activation', 'clipMin',
  'clipMax', 'alpha', 'precision', 'variant'] as const;

export interface Conv2dRunOptions {
  /** float32 of the output's shape, added in the epilogue (after the activation unless residualBeforeActivation). */
  residual?: Tensor<'float32'>;
  /** Add the residual before the activation (ResNet's add-then-ReLU). */
  residualBeforeActivation?: boolean;
  /**
   * Write into this float32 tensor of the output's dims instead of a new one (reusing it saves the
   * allocation and page faults of a fresh output on every run).
   */
  out?: Tensor<'float32'>;
  /** At most this many pool threads (default: the whole pool). */
  threads?: number;
  signal?: AbortSignal;
}
const RUN_OPTIONS = ['residual', 'residualBeforeActivation', 'out', 'threads', 'signal'] as const;

export interface Window {
  kernel: [number, number];
  strides: [number, number];
  dilations: [number, number];
  pads: [number, number, number, number];
  autoPad: ConvAutoPad;
}

export function checkInts(where: string, v: unknown, len: number, min: number, dflt: number[]): number[] {
  if (v === undefined) return dflt;
  if (!Array.isArray(v) || v.length !== len) {
    throw new InvalidArgumentError(`${where} must be an array of ${len} integers, got ${describe(v)}`);
  }
  return v.map((x, i) => checkInt(`${where}[${i}]`, x, min, 2 ** 31 - 1));
}

export function checkWindow(where: string, kernel: number[], opts: { strides?: unknown; pads?: unknown; autoPad?: unknown; dilations?: unknown }): Window {
  const autoPad = checkOneOf(`${where}: options.autoPad`, opts.autoPad ?? 'NOTSET', AUTO_PADS);
  const strides = checkInts(`${where}: options.strides`, opts.strides, 2, 1, [1, 1]);
  const dilations = checkInts(`${where}: options.dilations`, opts.dilations, 2, 1, [1, 1]);
  const pads = checkInts(`${where}: options.pads`, opts.pads, 4, 0, [0, 0, 0, 0]);
  if (autoPad !== 'NOTSET' && opts.pads !== undefined && pads.some((p) => p !== 0)) {
    throw new InvalidArgumentError(`${where}: options.pads must not be given with options.autoPad '${autoPad}'`);
  }
  for (let i = 0; i < 4; i++) {
    const ext = (kernel[i % 2]! - 1) * dilations[i % 2]! + 1;
    if (pads[i]! >= ext) {
      throw new InvalidArgumentError(
        `${where}: options.pads[${i}] (${pads[i]}) must be smaller than the dilated kernel extent along ${i % 2 ? 'W' : 'H'} (${ext})`);
    }
  }
  return { kernel: kernel as [number, number], strides: strides as [number, number], dilations: dilations as [number, number],
    pads: pads as [number, number, number, number], autoPad };
}

/** Output [OH, OW] for an input of h x w (ONNX rules), or a typed error naming the axis. */
export function outputSize(where: string, win: Window, h: number, w: number): [number, number] {
  const out: number[] = [];
  for (const [axis, size] of [[0, h], [1, w]] as const) {
    const ext = (win.kernel[axis] - 1) * win.dilations[axis] + 1;
    const s = win.strides[axis];
    let o: number;
    if (win.autoPad === 'SAME_UPPER' || win.autoPad === 'SAME_LOWER') {
      o = Math.ceil(size / s);
    } else {
      const padded = size + (win.autoPad === 'VALID' ? 0 : win.pads[axis] + win.pads[axis + 2]!);
      o = padded < ext ? 0 : Math.floor((padded - ext) / s) + 1;
    }
    if (o <= 0) {
      throw new InvalidArgumentError(
        `${where}: output ${axis ? 'width' : 'height'} would be ${o} <= 0 (input ${axis ? 'W' : 'H'} = ${size}, ` +
          `dilated kernel ${ext}, pads ${win.autoPad === 'NOTSET' ? `${win.pads[axis]} + ${win.pads[axis + 2]}` : win.autoPad})`);
    }
    out.push(o);
  }
  return out as [number, number];
}

function nativeWindow(win: Window): NativeWindow {
  return { kernel: win.kernel, strides: win.strides, dilations: win.dilations, pads: win.pads, autoPad: AUTO_PADS.indexOf(win.autoPad) };
}

function check4d(where: string, t: Tensor<'float32'>): [number, number, number, number] {
  if (t.dims.length !== 4) throw new InvalidArgumentError(`${where} must be 4-D [N, C, H, W], got dims [${t.dims.join(', ')}]`);
  return t.dims as unknown as [number, number, number, number];
}

export function checkChannelVector(where: string, t: unknown, n: number): Float32Array {
  const v = checkTensor(where, t, 'float32');
  if (v.dims.length !== 1 || v.size !== n) {
    throw new InvalidArgumentError(`${where} must have dims [${n}] (one per output channel), got [${v.dims.join(', ')}]`);
  }
  return v.data;
}

/** Conv2d objects made so far: each names its kernel calls' measured times (waitKernel) by its number. */
let convCount = 0;

/** A convolution created once: weights folded and packed in native memory. dispose() it when done. */
export class Conv2d extends NativeResource {
  readonly outChannels: number;
  /** Channels the input must have: weights.dims[1] * group. */
  readonly inChannels: number;
  readonly kernelShape: readonly [number, number];
  readonly group: number;
  /** Native bytes held (reported to V8 as external memory). */
  readonly bytes: number;
  /**
   * How it runs: 'gemm' (im2col panels + GEMM microkernel), 'direct' (channel-blocked NCHW16c direct
   * kernel), 'depthwise' (window kernel) or 'reference'.
   */
  readonly path: 'gemm' | 'direct' | 'depthwise' | 'reference';
  readonly ukernel: string;
  readonly variant: Exclude<ConvVariant, 'auto'>;
  readonly precision: 'fp32' | 'bf16';
  #handle: NativeConvHandle;
  /** Names this conv in the keys of kernel calls' measured times (waitKernel). */
  readonly #key = `conv ${++convCount}`;
  #window: Window;

  /** @internal use createConv2d() */
  constructor(handle: NativeConvHandle, outChannels: number, inChannels: number, group: number, window: Window) {
    super();
    this.#handle = handle;
    this.#window = window;
    this.outChannels = outChannels;
    this.inChannels = inChannels;
    this.group = group;
    this.kernelShape = Object.freeze([window.kernel[0], window.kernel[1]] as const);
    const info = handle.info();
    this.bytes = info.bytes!;
    this.path = info.path!;
    this.ukernel = info.ukernel!;
    this.variant = info.variant!;
    this.precision = info.precision!;
  }

  /** The output dims for an input of dims [N, C, H, W]. */
  outputShape(dims: readonly number[], where = 'Conv2d.outputShape'): [number, number, number, number] {
    if (dims.length !== 4) throw new InvalidArgumentError(`${where}: x must be 4-D [N, C, H, W], got dims [${dims.join(', ')}]`);
    const [n, c, h, w] = dims as [number, number, number, number];
    if (c !== this.inChannels) {
      throw new InvalidArgumentError(
        `${where}: x has ${c} channels (dims[1]) but the weights expect ${this.inChannels} (weights.dims[1] = ${this.inChannels / this.group} x group ${this.group})`);
    }
    const [oh, ow] = outputSize(where, this.#window, h, w);
    return [n, this.outChannels, oh, ow];
  }

  /** Runs the convolution (with its fused epilogue) on x [N, C_in, H, W]; resolves to [N, C_out, OH, OW]. */
  async run(x: Tensor<'float32'>, options?: Conv2dRunOptions): Promise<Tensor<'float32'>> {
    const site = new Error();
    const where = 'Conv2d.run';
    this.checkAlive(where);
    const opts = checkOptions<Conv2dRunOptions>(where, options, RUN_OPTIONS);
    checkTensor(`${where}(x)`, x, 'float32');
    check4d(`${where}(x)`, x);
    const dims = this.outputShape(x.dims, where);
    let residual: Float32Array | undefined;
    if (opts.residual !== undefined) {
      const r = checkTensor(`${where}: options.residual`, opts.residual, 'float32');
      if (r.dims.length !== 4 || r.dims.some((d, i) => d !== dims[i])) {
        throw new InvalidArgumentError(`${where}: options.residual must have the output's dims [${dims.join(', ')}], got [${r.dims.join(', ')}]`);
      }
      residual = r.data;
    }
    if (opts.residualBeforeActivation !== undefined && typeof opts.residualBeforeActivation !== 'boolean') {
      throw new InvalidArgumentError(`${where}: options.residualBeforeActivation must be a boolean, got ${describe(opts.residualBeforeActivation)}`);
    }
    const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
    const signal = checkSignal(`${where}: options.signal`, opts.signal);
    let out: Tensor<'float32'>;
    if (opts.out !== undefined) {
      out = checkTensor(`${where}: options.out`, opts.out, 'float32');
      if (out.dims.length !== 4 || out.dims.some((d, i) => d !== dims[i])) {
        throw new InvalidArgumentError(`${where}: options.out must have the output's dims [${dims.join(', ')}], got [${out.dims.join(', ')}]`);
      }
      for (const [name, t] of [['x', x], ['options.residual', opts.residual]] as const) {
        if (t instanceof Tensor && t.data.buffer === out.data.buffer) {
          throw new InvalidArgumentError(`${where}: options.out must not share memory with ${name}`);
        }
      }
    } else {
      out = new Tensor('float32', new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
    }
    const handle = this.#handle;
    await callNative(() => withSignal(signal, (token) => waitKernel(native().convRun(handle, x.data, x.dims, out.data, {
      residual, residualBeforeActivation: opts.residualBeforeActivation === true, threads, cancel: token,
    }), threads, `${this.#key} ${x.dims.join('x')} t${threads}`)), site);
    return out;
  }

  protected release(): void {
    // A run in flight keeps the native op alive until it finishes.
    this.#handle.dispose();
  }
}

/**
 * Creates a Conv2d from weights [C_out, C_in/group, kH, kW]: validates, folds options.bn into the
 * weights and bias, and packs once (per-load work).
 */
/** A conv's creation options, validated: what createConv2d and the GPU's createGpuConv2d both take. */
export interface ConvSpec {
  cOut: number;
  /** Input channels per group. */
  cg: number;
  kh: number;
  kw: number;
  group: number;
  win: Window;
  bias: Float32Array | undefined;
  bn: { scale: Float32Array; bias: Float32Array; mean: Float32Array; variance: Float32Array; epsilon: number } | undefined;
  activation: ConvActivation;
  /** Clip bounds, or LeakyRelu's slope in alpha. */
  alpha: number;
  beta: number;
  precision: 'fp32' | 'bf16';
}

/**
 * Validates weights [C_out, C_in/group, kH, kW] and the creation options shared by every conv
 * (window, bias, BatchNorm, activation, precision); each error names the parameter. maxGroup: the
 * most groups the kernels take.
 */
export function checkConvSpec(where: string, weights: Tensor<'float32'>,
  opts: Partial<Omit<Conv2dOptions, 'variant'>>, maxGroup = 2 ** 31 - 1): ConvSpec {
  checkTensor(`${where}(weights)`, weights, 'float32');
  if (weights.dims.length !== 4) {
    throw new InvalidArgumentError(`${where}(weights) must be 4-D [C_out, C_in/group, kH, kW], got dims [${weights.dims.join(', ')}]`);
  }
  const [cOut, cg, kh, kw] = weights.dims as unknown as [number, number, number, number];
  for (const [i, d] of weights.dims.entries()) {
    if (d < 1) throw new InvalidArgumentError(`${where}(weights).dims[${i}] must be >= 1, got ${d}`);
  }
  const group = opts.group === undefined ? 1 : checkInt(`${where}: options.group`, opts.group, 1, maxGroup);
  if (cOut % group !== 0) {
    throw new InvalidArgumentError(`${where}: options.group (${group}) must divide the output channels (weights.dims[0] = ${cOut})`);
  }
  const win = checkWindow(where, [kh, kw], opts);
  const bias = opts.bias === undefined ? undefined : checkChannelVector(`${where}: options.bias`, opts.bias, cOut);
  let bn: ConvSpec['bn'];
  if (opts.bn !== undefined) {
    const b = checkOptions<BatchNormOptions>(`${where}: options.bn`, opts.bn, ['scale', 'bias', 'mean', 'variance', 'epsilon']);
    const vec = (k: 'scale' | 'bias' | 'mean' | 'variance') => {
      if (b[k] === undefined) throw new InvalidArgumentError(`${where}: options.bn.${k} is required`);
      return checkChannelVector(`${where}: options.bn.${k}`, b[k], cOut);
    };
    const epsilon = b.epsilon === undefined ? 1e-5 : checkNumber(`${where}: options.bn.epsilon`, b.epsilon);
    if (!(epsilon >= 0) || !Number.isFinite(epsilon)) throw new InvalidArgumentError(`${where}: options.bn.epsilon must be a finite number >= 0, got ${epsilon}`);
    bn = { scale: vec('scale'), bias: vec('bias'), mean: vec('mean'), variance: vec('variance'), epsilon };
    for (let i = 0; i < cOut; i++) {
      if (!(bn.variance[i]! + epsilon > 0)) {
        throw new InvalidArgumentError(`${where}: options.bn.variance[${i}] + epsilon must be > 0, got ${bn.variance[i]} + ${epsilon}`);
      }
    }
  }
  const { activation, alpha, beta } = checkActivation(where, opts);
  const precision = checkOneOf(`${where}: options.precision`, opts.precision ?? 'fp32', ['fp32', 'bf16'] as const);
  return { cOut, cg, kh, kw, group, win, bias, bn, activation, alpha, beta, precision };
}

export function createConv2d(weights: Tensor<'float32'>, options?: Conv2dOptions): Conv2d {
  const where = 'createConv2d';
  const site = new Error();
  const opts = checkOptions<Conv2dOptions>(where, options, CREATE_OPTIONS);
  const { cOut, cg, group, win, bias, bn, activation, alpha, beta, precision } = checkConvSpec(where, weights, opts);
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS);
  if (BF16_VARIANTS.includes(variant) && precision !== 'bf16') {
    throw new InvalidArgumentError(`${where}: options.variant '${variant}' needs options.precision 'bf16'`);
  }
  try {
    const handle = native().createConv(weights.data, {
      cOut, cIn: cg * group, group, ...nativeWindow(win), bias, bnScale: bn?.scale, bnBias: bn?.bias, bnMean: bn?.mean,
      bnVariance: bn?.variance, bnEpsilon: bn?.epsilon ?? 1e-5, activation: ACTIVATION_CODE[activation], alpha, beta,
      precision, variant,
    });
    return new Conv2d(handle, cOut, cg * group, group, win);
  } catch (err) {
    throw fromNative(err, site);
  }
}

/** One-shot convolution: createConv2d(weights, options), run(x, options), dispose. */
export async function conv2d(x: Tensor<'float32'>, weights: Tensor<'float32'>,
  options?: Conv2dOptions & Conv2dRunOptions): Promise<Tensor<'float32'>> {
  const opts = checkOptions<Conv2dOptions & Conv2dRunOptions>('conv2d', options, [...CREATE_OPTIONS, ...RUN_OPTIONS]);
  const create: Record<string, unknown> = {};
  const run: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(opts)) ((RUN_OPTIONS as readonly string[]).includes(k) ? run : create)[k] = v;
  const conv = createConv2d(weights, create as Conv2dOptions);
  try {
    return await conv.run(x, run as Conv2dRunOptions);
  } finally {
    conv.dispose();
  }
}

export interface PoolOptions {
  /** [kH, kW] (required). */
  kernelShape: readonly number[];
  strides?: readonly number[];
  pads?: readonly number[];
  autoPad?: ConvAutoPad;
  dilations?: readonly number[];
  threads?: number;
  variant?: ConvVariant;
  signal?: AbortSignal;
}
export interface AveragePoolOptions extends PoolOptions {
  /** Divide by kH*kW (true) or by the taps inside the input (false, the default, as ONNX). */
  countIncludePad?: boolean;
}
const POOL_OPTIONS = ['kernelShape', 'strides', 'pads', 'autoPad', 'dilations', 'threads', 'variant', 'signal'] as const;

async function pool(where: string, kind: 0 | 1, x: Tensor<'float32'>, options: AveragePoolOptions | undefined, site: Error): Promise<Tensor<'float32'>> {
  const opts = checkOptions<AveragePoolOptions>(where, options, kind === 1 ? [...POOL_OPTIONS, 'countIncludePad'] : POOL_OPTIONS);
  checkTensor(`${where}(x)`, x, 'float32');
  const [n, c, h, w] = check4d(`${where}(x)`, x);
  if (opts.kernelShape === undefined) throw new InvalidArgumentError(`${where}: options.kernelShape is required`);
  const kernel = checkInts(`${where}: options.kernelShape`, opts.kernelShape, 2, 1, [1, 1]);
  const win = checkWindow(where, kernel, opts);
  const [oh, ow] = outputSize(where, win, h, w);
  if (opts.countIncludePad !== undefined && typeof opts.countIncludePad !== 'boolean') {
    throw new InvalidArgumentError(`${where}: options.countIncludePad must be a boolean, got ${describe(opts.countIncludePad)}`);
  }
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS.filter((v) => !BF16_VARIANTS.includes(v)));
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  const out = new Float32Array(n * c * oh * ow);
  await callNative(() => withSignal(signal, (token) => native().pool2d(kind, x.data, x.dims, out, {
    ...nativeWindow(win), countIncludePad: opts.countIncludePad === true, variant, threads, cancel: token,
  })), site);
  return new Tensor('float32', out, [n, c, oh, ow]);
}

/** Max pooling over NCHW planes (pads are -infinity); resolves to [N, C, OH, OW]. */
export function maxPool2d(x: Tensor<'float32'>, options: PoolOptions): Promise<Tensor<'float32'>> {
  return pool('maxPool2d', 0, x, options, new Error());
}

/** Average pooling over NCHW planes; countIncludePad as ONNX's count_include_pad (default false). */
export function averagePool2d(x: Tensor<'float32'>, options: AveragePoolOptions): Promise<Tensor<'float32'>> {
  return pool('averagePool2d', 1, x, options, new Error());
}

/** Mean of each H x W plane; resolves to [N, C, 1, 1]. */
export async function globalAveragePool(x: Tensor<'float32'>,
  options?: Pick<PoolOptions, 'threads' | 'variant' | 'signal'>): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'globalAveragePool';
  const opts = checkOptions<PoolOptions>(where, options, ['threads', 'variant', 'signal']);
  checkTensor(`${where}(x)`, x, 'float32');
  const [n, c, h, w] = check4d(`${where}(x)`, x);
  if (h < 1 || w < 1) throw new InvalidArgumentError(`${where}(x) must have H and W >= 1, got dims [${x.dims.join(', ')}]`);
  const variant = checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS.filter((v) => !BF16_VARIANTS.includes(v)));
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  const out = new Float32Array(n * c);
  await callNative(() => withSignal(signal, (token) => native().pool2d(2, x.data, x.dims, out, {
    kernel: [1, 1], strides: [1, 1], dilations: [1, 1], pads: [0, 0, 0, 0], autoPad: 0, countIncludePad: false,
    variant, threads, cancel: token,
  })), site);
  return new Tensor('float32', out, [n, c, 1, 1]);
}
