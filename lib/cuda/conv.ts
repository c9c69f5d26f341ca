/**
 * Conv2d and pooling on a GPU (native/kernels/conv/cuda/conv.cu), float32 NCHW over device-resident
 * GpuBuffers. createGpuConv2d validates as the CPU createConv2d does, folds a BatchNormalization into
 * the weights and bias here on the host (in double, as the CPU does), and uploads them once (bf16
 * weights are converted on the device); run() then launches one kernel with the bias, activation and
 * optional residual fused into its epilogue.
 */
import { InvalidArgumentError } from '../errors.js';
import {
  ACTIVATION_CODE, checkConvSpec, checkInts, checkWindow, outputSize, type Conv2dOptions, type Window,
} from '../kernels/conv.js';
import { NativeResource } from '../lifetime.js';
import type { Tensor } from '../tensor.js';
import { checkInt, checkOptions, describe } from '../validate.js';
import { checkGpuBuffer, gpuConvert } from './kernels.js';
import { GpuBuffer, runGpuOp, type GpuDeviceId, type GpuRunOptions } from './runtime.js';

export interface GpuConv2dOptions extends Omit<Conv2dOptions, 'variant' | 'precision'> {
  /**
   * 'fp32' (default): SIMT float32. 'bf16': weights and activations rounded to bf16 (nearest even),
   * products accumulated in fp32: tensor cores (mma.sync) on compute capability >= 8.0.
   */
  precision?: 'fp32' | 'bf16';
  /**
   * true: the SIMT kernel even where tensor cores would run (to compare the two; devices below 8.0
   * always run it). false: tensor cores wherever they can, also on grids too small to fill the
   * device, where the default (undefined) takes the SIMT kernel with bf16 operands (faster there).
   */
  simt?: boolean;
}
const CREATE_OPTIONS = ['bias', 'bn', 'strides', 'pads', 'autoPad', 'dilations', 'group', 'activation', 'clipMin',
  'clipMax', 'alpha', 'precision', 'simt'] as const;

export interface GpuConv2dRunOptions extends GpuRunOptions {
  /** float32 of the output's dims, added in the epilogue (after the activation unless residualBeforeActivation). */
  residual?: GpuBuffer;
  residualBeforeActivation?: boolean;
}

export type GpuPoolWindow = Pick<GpuConv2dOptions, 'strides' | 'pads' | 'autoPad' | 'dilations'> & {
  /** [kH, kW] (required). */
  kernelShape: readonly number[];
};
export interface GpuAveragePoolWindow extends GpuPoolWindow {
  /** Divide by kH*kW (true) or by the taps inside the input (false, the default, as ONNX). */
  countIncludePad?: boolean;
}

/** The window's explicit pads [top, left, bottom, right] for an input of h x w (autoPad resolved as the CPU does). */
function resolvedPads(win: Window, h: number, w: number): [number, number, number, number] {
  if (win.autoPad === 'VALID') return [0, 0, 0, 0];
  if (win.autoPad === 'NOTSET') return [...win.pads];
  const out = [0, 0, 0, 0];
  for (const [axis, size] of [[0, h], [1, w]] as const) {
    const ext = (win.kernel[axis] - 1) * win.dilations[axis] + 1;
    const o = Math.ceil(size / win.strides[axis]);
    const total = Math.max((o - 1) * win.strides[axis] + ext - size, 0);
    const begin = win.autoPad === 'SAME_UPPER' ? Math.floor(total / 2) : total - Math.floor(total / 2);
    out[axis] = begin;
    out[axis + 2] = total - begin;
  }
  return out as [number, number, number, number];
}

/** The op's window parameters for an input of h x w. */
function windowParams(win: Window, h: number, w: number): Record<string, number> {
  const [pt, pl, pb, pr] = resolvedPads(win, h, w);
  return { kh: win.kernel[0], kw: win.kernel[1], sh: win.strides[0], sw: win.strides[1], dh: win.dilations[0],
    dw: win.dilations[1], pt, pl, pb, pr };
}

function checkDims4(where: string, dims: unknown): [number, number, number, number] {
  if (!Array.isArray(dims) || dims.length !== 4) throw new InvalidArgumentError(`${where} must be 4 dims [N, C, H, W], got ${describe(dims)}`);
  return dims.map((d, i) => checkInt(`${where}[${i}]`, d, i < 2 ? (i === 0 ? 0 : 1) : 1, 2 ** 31 - 1)) as [number, number, number, number];
}

/** A convolution with its weights (BN folded) in device memory. dispose() frees them. */
export class GpuConv2d extends NativeResource {
  readonly device: GpuDeviceId;
  readonly outChannels: number;
  readonly inChannels: number;
  readonly kernelShape: readonly [number, number];
  readonly group: number;
  readonly precision: 'fp32' | 'bf16';
  /** 'depthwise' (one input channel per group: the direct kernel) or 'implicit-gemm'. */
  readonly path: 'depthwise' | 'implicit-gemm';
  readonly #weights: GpuBuffer;
  readonly #bias: GpuBuffer;
  readonly #window: Window;
  readonly #params: Record<string, number>;

  /** @internal use createGpuConv2d() */
  constructor(device: GpuDeviceId, weights: GpuBuffer, bias: GpuBuffer, shape: { cOut: number; cIn: number; group: number },
    window: Window, params: Record<string, number>, precision: 'fp32' | 'bf16') {
    super();
    this.device = device;
    this.#weights = weights;
    this.#bias = bias;
    this.#window = window;
    this.#params = params;
    this.outChannels = shape.cOut;
    this.inChannels = shape.cIn;
    this.group = shape.group;
    this.kernelShape = Object.freeze([window.kernel[0], window.kernel[1]] as const);
    this.precision = precision;
    this.path = shape.cIn === shape.group ? 'depthwise' : 'implicit-gemm';
  }

  /** The output dims for an input of dims [N, C, H, W]. */
  outputShape(dims: readonly number[], where = 'GpuConv2d.outputShape'): [number, number, number, number] {
    const [n, c, h, w] = checkDims4(`${where}: dims`, dims);
    if (c !== this.inChannels) {
      throw new InvalidArgumentError(`${where}: x has ${c} channels (dims[1]) but the weights expect ${this.inChannels}`);
    }
    const [oh, ow] = outputSize(where, this.#window, h, w);
    return [n, this.outChannels, oh, ow];
  }

  /**
   * y [N, C_out, OH, OW] = epilogue(conv(x [dims])). Resolves to ms per run when options.reps > 0.
   * y must not overlap x or the residual.
   */
  async run(x: GpuBuffer, dims: readonly number[], y: GpuBuffer, options: GpuConv2dRunOptions = {}): Promise<number> {
    const where = 'GpuConv2d.run';
    this.checkAlive(where);
    const opts = checkOptions<GpuConv2dRunOptions>(where, options, ['residual', 'residualBeforeActivation', 'reps']);
    const out = this.outputShape(dims, where);
    const [n, c, h, w] = dims as [number, number, number, number];
    checkGpuBuffer(where, 'x', x, this.device, n * c * h * w * 4);
    const yBytes = out.reduce((a, b) => a * b, 1) * 4;
    checkGpuBuffer(where, 'y', y, this.device, yBytes);
    if (y === x) throw new InvalidArgumentError(`${where}: y must not be x`);
    const buffers = [x, this.#weights, this.#bias, y];
    if (opts.residual !== undefined) {
      checkGpuBuffer(where, 'options.residual', opts.residual, this.device, yBytes);
      if (opts.residual === y) throw new InvalidArgumentError(`${where}: y must not be options.residual`);
      buffers.push(opts.residual);
    }
    if (opts.residualBeforeActivation !== undefined && typeof opts.residualBeforeActivation !== 'boolean') {
      throw new InvalidArgumentError(`${where}: options.residualBeforeActivation must be a boolean, got ${describe(opts.residualBeforeActivation)}`);
    }
    return runGpuOp(this.device, 'conv2d', buffers, {
      ...this.#params, ...windowParams(this.#window, h, w), n, h, w, residual: opts.residual ? 1 : 0,
      residualBeforeActivation: opts.residualBeforeActivation ? 1 : 0,
    }, { reps: opts.reps });
  }

  protected release(): void {
    this.#weights.dispose();
    this.#bias.dispose();
  }
}

/**
 * Creates a GPU Conv2d from weights [C_out, C_in/group, kH, kW]: validates (as createConv2d), folds
 * options.bn into the weights and bias, and uploads them.
 */
export async function createGpuConv2d(device: GpuDeviceId, weights: Tensor<'float32'>, options?: GpuConv2dOptions): Promise<GpuConv2d> {
  const where = 'createGpuConv2d';
  const opts = checkOptions<GpuConv2dOptions>(where, options, CREATE_OPTIONS);
  // The conv kernels put groups on a grid dimension, which holds at most 65535.
  const { cOut, cg, kh, kw, group, win, bias, bn, activation, alpha, beta, precision } = checkConvSpec(where, weights, opts, 65535);
  if (opts.simt !== undefined && typeof opts.simt !== 'boolean') {
    throw new InvalidArgumentError(`${where}: options.simt must be a boolean, got ${describe(opts.simt)}`);
  }
  // Fold in double: s = gamma / sqrt(var + eps); w' = w s; b' = (b - mean) s + beta (ops/conv.cc's formula).
  const k = cg * kh * kw;
  const w = new Float32Array(weights.data);
  const b = new Float32Array(cOut);
  if (bias) b.set(bias);
  if (bn) {
    for (let co = 0; co < cOut; co++) {
      const s = bn.scale[co]! / Math.sqrt(bn.variance[co]! + bn.epsilon);
      for (let i = co * k; i < (co + 1) * k; i++) w[i] = weights.data[i]! * s;
      b[co] = ((bias ? bias[co]! : 0) - bn.mean[co]!) * s + bn.bias[co]!;
    }
  }
  const f32 = await GpuBuffer.from(device, w, 'the conv weights');
  let wb = f32;
  try {
    if (precision === 'bf16') {
      wb = GpuBuffer.alloc(device, w.length * 2, 'the conv weights (bf16)');
      await gpuConvert(device, 'f32-bf16', f32, wb, w.length);
      f32.dispose();
    }
    const bb = await GpuBuffer.from(device, b, 'the conv bias');
    return new GpuConv2d(device, wb, bb, { cOut, cIn: cg * group, group }, win, {
      cIn: cg * group, cOut, groups: group, activation: ACTIVATION_CODE[activation], alpha, beta,
      bf16: precision === 'bf16' ? 1 : 0, simt: opts.simt === undefined ? 0 : opts.simt ? 1 : 2,
    }, precision);
  } catch (err) {
    f32.dispose();
    wb.dispose();
    throw err;
  }
}

const POOL_WINDOW = ['kernelShape', 'strides', 'pads', 'autoPad', 'dilations'] as const;

function poolWindow(where: string, options: unknown, average: boolean): { win: Window; countIncludePad: boolean } {
  const opts = checkOptions<GpuAveragePoolWindow>(where, options, average ? [...POOL_WINDOW, 'countIncludePad'] : POOL_WINDOW);
  if (opts.kernelShape === undefined) throw new InvalidArgumentError(`${where}: options.kernelShape is required`);
  const kernel = checkInts(`${where}: options.kernelShape`, opts.kernelShape, 2, 1, [1, 1]);
  if (opts.countIncludePad !== undefined && typeof opts.countIncludePad !== 'boolean') {
    throw new InvalidArgumentError(`${where}: options.countIncludePad must be a boolean, got ${describe(opts.countIncludePad)}`);
  }
  return { win: checkWindow(where, kernel, opts), countIncludePad: opts.countIncludePad === true };
}

/** The output dims of max / average pooling an input of dims [N, C, H, W] with this window. */
export function gpuPoolOutputShape(dims: readonly number[], window: GpuAveragePoolWindow): [number, number, number, number] {
  const where = 'gpuPoolOutputShape';
  const [n, c, h, w] = checkDims4(`${where}: dims`, dims);
  const [oh, ow] = outputSize(where, poolWindow(where, window, true).win, h, w);
  return [n, c, oh, ow];
}

async function pool(where: string, kind: 0 | 1, device: GpuDeviceId, x: GpuBuffer, dims: readonly number[], y: GpuBuffer,
  window: GpuAveragePoolWindow, options: GpuRunOptions): Promise<number> {
  const [n, c, h, w] = checkDims4(`${where}: dims`, dims);
  const { win, countIncludePad } = poolWindow(where, window, kind === 1);
  const [oh, ow] = outputSize(where, win, h, w);
  checkGpuBuffer(where, 'x', x, device, n * c * h * w * 4);
  checkGpuBuffer(where, 'y', y, device, n * c * oh * ow * 4);
  return runGpuOp(device, 'pool2d', [x, y], { kind, planes: n * c, h, w, ...windowParams(win, h, w), countIncludePad: countIncludePad ? 1 : 0 }, options);
}

/** Max pooling of NCHW planes (pads never win); y holds [N, C, OH, OW] (gpuPoolOutputShape). */
export function gpuMaxPool2d(device: GpuDeviceId, x: GpuBuffer, dims: readonly number[], y: GpuBuffer, window: GpuPoolWindow,
  options: GpuRunOptions = {}): Promise<number> {
  return pool('gpuMaxPool2d', 0, device, x, dims, y, window, options);
}

/** Average pooling of NCHW planes; countIncludePad as ONNX's count_include_pad (default false). */
export function gpuAveragePool2d(device: GpuDeviceId, x: GpuBuffer, dims: readonly number[], y: GpuBuffer,
  window: GpuAveragePoolWindow, options: GpuRunOptions = {}): Promise<number> {
  return pool('gpuAveragePool2d', 1, device, x, dims, y, window, options);
}

/** Mean of each H x W plane: y holds [N, C] (i.e. [N, C, 1, 1]). */
export async function gpuGlobalAveragePool(device: GpuDeviceId, x: GpuBuffer, dims: readonly number[], y: GpuBuffer,
  options: GpuRunOptions = {}): Promise<number> {
  const where = 'gpuGlobalAveragePool';
  const [n, c, h, w] = checkDims4(`${where}: dims`, dims);
  checkGpuBuffer(where, 'x', x, device, n * c * h * w * 4);
  checkGpuBuffer(where, 'y', y, device, n * c * 4);
  return runGpuOp(device, 'pool2d', [x, y], { kind: 2, planes: n * c, h, w }, options);
}
