/**
 * Typed wrappers of the GPU ops, one per kernel, over device-resident GpuBuffers. Each validates
 * shapes against the buffers' sizes and names the caller's parameter; the native op checks again.
 * Row ops take `rows` contiguous rows of `n` float32 values.
 */
import { InvalidArgumentError } from '../errors.js';
import { checkInt, describe } from '../validate.js';
import { GpuBuffer, runGpuOp, type GpuDeviceId, type GpuRunOptions } from './runtime.js';

export interface GpuKernelOptions extends GpuRunOptions {}

/** Throws unless buffer (named `name`) is a live GpuBuffer on device holding at least `bytes`. */
export function checkGpuBuffer(where: string, name: string, b: unknown, device: GpuDeviceId, bytes: number): GpuBuffer {
  if (!(b instanceof GpuBuffer)) throw new InvalidArgumentError(`${where}: ${name} must be a GpuBuffer, got ${describe(b)}`);
  if (b.device !== device) throw new InvalidArgumentError(`${where}: ${name} lives on ${b.device}, not ${device}`);
  if (b.bytes < bytes) throw new InvalidArgumentError(`${where}: ${name} holds ${b.bytes} bytes, needs ${bytes}`);
  return b;
}

/**
 * An op's outputs must be buffers of their own: one that is also another of its inputs or outputs
 * would be overwritten while the kernel still reads it, and the result silently wrong.
 */
export function checkWrittenApart(where: string, written: Record<string, GpuBuffer | undefined>,
  read: Record<string, GpuBuffer | undefined>): void {
  const all = [...Object.entries(written), ...Object.entries(read)];
  for (const [i, [name, b]] of Object.entries(written).entries()) {
    if (b === undefined) continue;
    for (const [j, [other, c]] of all.entries()) {
      if (j !== i && c === b) throw new InvalidArgumentError(`${where}: ${name} and ${other} are the same buffer; ${name} is written and needs its own`);
    }
  }
}

function rowShape(where: string, rows: unknown, n: unknown): [number, number] {
  return [checkInt(`${where}: rows`, rows, 0, 2 ** 31 - 1), checkInt(`${where}: n`, n, 1, 2 ** 31 - 1)];
}

/** y = x / sqrt(mean(x^2) + eps) * weight, per row. */
export async function gpuRmsNorm(device: GpuDeviceId, x: GpuBuffer, weight: GpuBuffer, y: GpuBuffer, rows: number, n: number,
  eps = 1e-6, options: GpuKernelOptions = {}): Promise<number> {
  const w = 'gpuRmsNorm';
  [rows, n] = rowShape(w, rows, n);
  checkGpuBuffer(w, 'x', x, device, rows * n * 4);
  checkGpuBuffer(w, 'weight', weight, device, n * 4);
  checkGpuBuffer(w, 'y', y, device, rows * n * 4);
  return runGpuOp(device, 'rms_norm', [x, weight, y], { rows, n, eps }, options);
}

/** y = (x - mean) / sqrt(var + eps) * gamma + beta, per row. */
export async function gpuLayerNorm(device: GpuDeviceId, x: GpuBuffer, gamma: GpuBuffer, beta: GpuBuffer, y: GpuBuffer,
  rows: number, n: number, eps = 1e-5, options: GpuKernelOptions = {}): Promise<number> {
  const w = 'gpuLayerNorm';
  [rows, n] = rowShape(w, rows, n);
  checkGpuBuffer(w, 'x', x, device, rows * n * 4);
  checkGpuBuffer(w, 'gamma', gamma, device, n * 4);
  checkGpuBuffer(w, 'beta', beta, device, n * 4);
  checkGpuBuffer(w, 'y', y, device, rows * n * 4);
  return runGpuOp(device, 'layer_norm', [x, gamma, beta, y], { rows, n, eps }, options);
}

/** Numerically stable softmax of each row. */
export async function gpuSoftmax(device: GpuDeviceId, x: GpuBuffer, y: GpuBuffer, rows: number, n: number,
  options: GpuKernelOptions = {}): Promise<number> {
  const w = 'gpuSoftmax';
  [rows, n] = rowShape(w, rows, n);
  checkGpuBuffer(w, 'x', x, device, rows * n * 4);
  checkGpuBuffer(w, 'y', y, device, rows * n * 4);
  return runGpuOp(device, 'softmax', [x, y], { rows, n }, options);
}

export const GPU_UNARY = { relu: 0, sigmoid: 1, tanh: 2, exp: 3, silu: 4, gelu: 5, geluTanh: 6 } as const;
export type GpuUnaryOp = keyof typeof GPU_UNARY;

export async function gpuUnary(device: GpuDeviceId, op: GpuUnaryOp, x: GpuBuffer, y: GpuBuffer, count: number,
  options: GpuKernelOptions = {}): Promise<number> {
  const w = 'gpuUnary';
  if (!Object.hasOwn(GPU_UNARY, op)) throw new InvalidArgumentError(`${w}: op must be one of ${Object.keys(GPU_UNARY).join(', ')}, got ${describe(op)}`);
  count = checkInt(`${w}: count`, count, 0);
  checkGpuBuffer(w, 'x', x, device, count * 4);
  checkGpuBuffer(w, 'y', y, device, count * 4);
  return runGpuOp(device, 'unary', [x, y], { op: GPU_UNARY[op], count }, options);
}

export const GPU_BINARY = { add: 0, sub: 1, mul: 2, div: 3 } as const;
export type GpuBinaryOp = keyof typeof GPU_BINARY;

/** y[i] = a[i] op b[i % bCount]: the same shape (bCount = count) or b repeated per row (a bias). */
export async function gpuBinary(device: GpuDeviceId, op: GpuBinaryOp, a: GpuBuffer, b: GpuBuffer, y: GpuBuffer, count: number,
  bCount = count, options: GpuKernelOptions = {}): Promise<number> {
  const w = 'gpuBinary';
  if (!Object.hasOwn(GPU_BINARY, op)) throw new InvalidArgumentError(`${w}: op must be one of ${Object.keys(GPU_BINARY).join(', ')}, got ${describe(op)}`);
  count = checkInt(`${w}: count`, count, 0);
  bCount = checkInt(`${w}: bCount`, bCount, 1);
  if (count % bCount !== 0) throw new InvalidArgumentError(`${w}: count (${count}) must be a multiple of bCount (${bCount})`);
  checkGpuBuffer(w, 'a', a, device, count * 4);
  checkGpuBuffer(w, 'b', b, device, bCount * 4);
  checkGpuBuffer(w, 'y', y, device, count * 4);
  return runGpuOp(device, 'binary', [a, b, y], { op: GPU_BINARY[op], count, bCount }, options);
}

/** y = silu(gate) * up (SwiGLU). */
export async function gpuSiluMul(device: GpuDeviceId, gate: GpuBuffer, up: GpuBuffer, y: GpuBuffer, count: number,
  options: GpuKernelOptions = {}): Promise<number> {
  const w = 'gpuSiluMul';
  count = checkInt(`${w}: count`, count, 0);
  for (const [name, b] of [['gate', gate], ['up', up], ['y', y]] as const) checkGpuBuffer(w, name, b, device, count * 4);
  return runGpuOp(device, 'silu_mul', [gate, up, y], { count }, options);
}

const CONVERT = { 'f32-f16': 0, 'f16-f32': 1, 'f32-bf16': 2, 'bf16-f32': 3 } as const;
export type GpuConversion = keyof typeof CONVERT;

/** float32 <-> float16 / bfloat16 (16-bit values as raw bits), rounding to nearest even. */
export async function gpuConvert(device: GpuDeviceId, kind: GpuConversion, x: GpuBuffer, y: GpuBuffer, count: number,
  options: GpuKernelOptions = {}): Promise<number> {
  const w = 'gpuConvert';
  if (!Object.hasOwn(CONVERT, kind)) throw new InvalidArgumentError(`${w}: kind must be one of ${Object.keys(CONVERT).join(', ')}, got ${describe(kind)}`);
  count = checkInt(`${w}: count`, count, 0);
  const fromF32 = kind.startsWith('f32');
  checkGpuBuffer(w, 'x', x, device, count * (fromF32 ? 4 : 2));
  checkGpuBuffer(w, 'y', y, device, count * (fromF32 ? 2 : 4));
  // Elements of different widths: y[i] lands on bytes of x[i / 2] or x[2 i], another thread's.
  checkWrittenApart(w, { y }, { x });
  return runGpuOp(device, 'convert', [x, y], { kind: CONVERT[kind], count }, options);
}
