/**
 * Sessions on a GPU: the weights of a conv or GEMM layer kept for the device (float32, or bf16 for
 * precision 'bf16'), uploaded once at load and shared by every plan of the session; and the load-time
 * check of what has no GPU path.
 */
import type { NativeGpuBuffer } from '../binding.js';
import { GpuBuffer, type GpuDeviceId } from '../cuda/runtime.js';
import { InternalError } from '../errors.js';
import type { OnnxGraph } from '../onnx/model.js';
import { makeAttrs, nodeWhere } from './attrs.js';
import type { Prepared } from './ops/types.js';

/** float32 to bf16 bits, rounded to nearest even (as the CPU's bf16 packing); NaN stays a quiet NaN. */
export function toBf16(x: Float32Array): Uint16Array {
  const bits = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const b = bits[i]!;
    if ((b & 0x7f800000) === 0x7f800000 && (b & 0x007fffff) !== 0) {
      out[i] = (b >>> 16) | 0x40;
      continue;
    }
    out[i] = ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
  }
  return out;
}

/** One layer's device weights (and bias): created at prepare, uploaded by Session.load, disposed with the session. */
export class GpuLayer implements Prepared {
  readonly bf16: boolean;
  readonly name: string;
  #host?: { weights: Float32Array | Uint16Array; bias?: Float32Array };
  #weights?: GpuBuffer;
  #bias?: GpuBuffer;

  constructor(name: string, weights: Float32Array, bf16: boolean, bias?: Float32Array) {
    this.name = name;
    this.bf16 = bf16;
    this.#host = { weights: bf16 ? toBf16(weights) : weights, ...(bias ? { bias } : {}) };
  }

  /** Copies the weights to the device once; the host copy is dropped (the graph keeps the initializer). */
  async upload(device: GpuDeviceId): Promise<void> {
    const host = this.#host;
    if (!host) return;
    this.#weights = await GpuBuffer.from(device, host.weights, `the weights of ${this.name}`);
    if (host.bias) this.#bias = await GpuBuffer.from(device, host.bias, `the bias of ${this.name}`);
    this.#host = undefined;
  }

  weights(): NativeGpuBuffer {
    if (!this.#weights) throw new InternalError(`${this.name}: device weights used before upload`);
    return this.#weights.handle(this.name);
  }

  bias(): NativeGpuBuffer {
    if (!this.#bias) throw new InternalError(`${this.name}: device bias used before upload`);
    return this.#bias.handle(this.name);
  }

  get deviceBytes(): number {
    return (this.#weights?.bytes ?? 0) + (this.#bias?.bytes ?? 0);
  }

  dispose(): void {
    this.#weights?.dispose();
    this.#bias?.dispose();
    this.#weights = undefined;
    this.#bias = undefined;
    this.#host = undefined;
  }
}

/**
 * The shared memory (bytes) the GPU depthwise conv's tile needs: its 32 x 32 output tile's input
 * window plus the weights (DepthwiseShared in native/kernels/conv/cuda/conv.cu; keep in step).
 */
function depthwiseSharedBytes(kernel: number[], strides: number[], dilations: number[]): number {
  const [kh, kw] = kernel.length === 1 ? [1, kernel[0]!] : [kernel[0]!, kernel[1]!];
  const [sh, sw] = strides.length === 1 ? [1, strides[0]!] : [strides[0]!, strides[1]!];
  const [dh, dw] = dilations.length === 1 ? [1, dilations[0]!] : [dilations[0]!, dilations[1]!];
  const th = 31 * sh + (kh - 1) * dh + 1, tw = 31 * sw + (kw - 1) * dw + 1;
  return 4 * (th * tw + kh * kw);
}

/**
 * Nodes the GPU cannot run although the CPU can, as "node 'name' (OpType): why": depthwise
 * convolutions whose window (kernel, stride, dilation) needs more shared memory per block than the
 * device has (sharedPerBlock, at least the 48 KiB every device gives). Every other operator the
 * session compiler supports has a GPU path.
 */
export function gpuUnsupported(graph: OnnxGraph, sharedPerBlock: number): string[] {
  const out: string[] = [];
  const limit = Math.max(sharedPerBlock, 48 * 1024);
  for (const node of graph.nodes) {
    if (node.opType !== 'Conv' || node.domain !== '') continue;
    const w = node.inputs[1] ? graph.initializers.get(node.inputs[1]) : undefined;
    // One input channel per group: the depthwise kernel.
    if (!w || w.dims.length < 3 || w.dims[1] !== 1) continue;
    const attrs = makeAttrs(node);
    const kernel = w.dims.slice(2) as number[];
    const need = depthwiseSharedBytes(kernel, attrs.ints('strides', kernel.map(() => 1)), attrs.ints('dilations', kernel.map(() => 1)));
    if (need > limit) out.push(`${nodeWhere(node)}: its depthwise window needs ${need} bytes of shared memory per block, the device has ${limit}`);
  }
  return out;
}
