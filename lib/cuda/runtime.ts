/**
 * The GPU backend's TS surface (native/runtime/cuda/gpu.h): device memory as GpuBuffer, copies,
 * and running a registered op on a device. A device is 'cuda:N' or 'emulated', the CUDA emulator
 * that runs the same kernel source on the CPU (for tests; see native/runtime/cuda/emu/emu.h).
 * Ops are named and take buffers by position and sizes by name; lib/cuda/kernels.ts wraps each
 * with validation that names the caller's parameter.
 */
import { native, type NativeGpuBuffer, type NativeGpuDeviceInfo } from '../binding.js';
import { DisposedError, InvalidArgumentError, callNative, fromNative } from '../errors.js';
import { NativeResource } from '../lifetime.js';
import { checkInt, describe } from '../validate.js';

export type GpuDeviceId = 'emulated' | `cuda:${number}`;
export type GpuDeviceInfo = NativeGpuDeviceInfo;

function checkDevice(where: string, id: unknown): GpuDeviceId {
  if (id !== 'emulated' && !(typeof id === 'string' && /^cuda:\d{1,4}$/.test(id)))
    throw new InvalidArgumentError(`${where} must be 'cuda:N' or 'emulated', got ${describe(id)}`);
  return id as GpuDeviceId;
}

/** The device's description and pool usage; DeviceUnavailableError (with the reason) if absent. */
export function gpuDevice(id: GpuDeviceId): GpuDeviceInfo {
  checkDevice('gpuDevice: id', id);
  try {
    return native().gpuDevice(id);
  } catch (err) {
    throw fromNative(err);
  }
}

type View = ArrayBufferView;

/** Device memory. Contents are undefined until written; dispose() frees it (runs in flight keep it until they end). */
export class GpuBuffer extends NativeResource {
  readonly device: GpuDeviceId;
  readonly bytes: number;
  readonly #handle: NativeGpuBuffer;

  private constructor(device: GpuDeviceId, bytes: number, handle: NativeGpuBuffer) {
    super();
    this.device = device;
    this.bytes = bytes;
    this.#handle = handle;
  }

  /** `what` names the buffer in an out-of-memory error. */
  static alloc(device: GpuDeviceId, bytes: number, what = 'a buffer'): GpuBuffer {
    checkDevice('GpuBuffer.alloc: device', device);
    checkInt('GpuBuffer.alloc: bytes', bytes, 0);
    try {
      return new GpuBuffer(device, bytes, native().gpuAlloc(device, bytes, what));
    } catch (err) {
      throw fromNative(err);
    }
  }

  /** A buffer holding a copy of data's bytes. */
  static async from(device: GpuDeviceId, data: View, what = 'a buffer'): Promise<GpuBuffer> {
    checkView('GpuBuffer.from: data', data);
    const b = GpuBuffer.alloc(device, data.byteLength, what);
    try {
      await b.write(data);
    } catch (err) {
      b.dispose();
      throw err;
    }
    return b;
  }

  /** Copies data's bytes into the buffer at offset (bytes). */
  async write(data: View, offset = 0): Promise<void> {
    this.#copy('GpuBuffer.write', data, offset);
    await callNative(() => native().gpuCopy(this.#handle, offset, data, true));
  }

  /** Copies the buffer's bytes at offset into `into` (all of it) and returns it. */
  async read<T extends View>(into: T, offset = 0): Promise<T> {
    this.#copy('GpuBuffer.read', into, offset);
    await callNative(() => native().gpuCopy(this.#handle, offset, into, false));
    return into;
  }

  #copy(where: string, data: View, offset: number): void {
    this.checkAlive(where);
    checkView(`${where}: data`, data);
    checkInt(`${where}: offset`, offset, 0);
    if (offset + data.byteLength > this.bytes)
      throw new InvalidArgumentError(`${where}: ${data.byteLength} bytes at offset ${offset} do not fit the buffer of ${this.bytes} bytes`);
  }

  /** @internal */
  handle(where: string): NativeGpuBuffer {
    if (this.disposed) throw new DisposedError(`${where}: the GpuBuffer has been disposed`);
    return this.#handle;
  }

  protected release(): void {
    this.#handle.dispose();
  }
}

function checkView(where: string, v: unknown): asserts v is View {
  if (!ArrayBuffer.isView(v) || v instanceof DataView) throw new InvalidArgumentError(`${where} must be a TypedArray, got ${describe(v)}`);
}

export interface GpuRunOptions {
  /** After the run, time this many more runs with device events; the result is ms per run. */
  reps?: number;
  /**
   * Time replays of one captured run (a CUDA graph on a GPU) instead of separate launches: what the
   * kernels cost without the host's launch overhead. The op must not allocate device memory.
   */
  graph?: boolean;
}

/**
 * Runs a registered op: buffers by position, sizes and flags by name (see the op's source in
 * native/kernels/<family>/cuda/). Resolves to ms per run when options.reps > 0, else 0.
 */
export async function runGpuOp(device: GpuDeviceId, op: string, buffers: readonly GpuBuffer[],
  params: Record<string, number | boolean>, options: GpuRunOptions = {}): Promise<number> {
  checkDevice(`${op}: device`, device);
  const handles = buffers.map((b, i) => {
    if (!(b instanceof GpuBuffer)) throw new InvalidArgumentError(`${op}: buffer ${i} must be a GpuBuffer, got ${describe(b)}`);
    if (b.device !== device) throw new InvalidArgumentError(`${op}: buffer ${i} lives on ${b.device}, not ${device}`);
    return b.handle(op);
  });
  const reps = options.reps === undefined ? 0 : checkInt(`${op}: options.reps`, options.reps, 0, 1e6);
  if (options.graph !== undefined && typeof options.graph !== 'boolean') {
    throw new InvalidArgumentError(`${op}: options.graph must be a boolean, got ${describe(options.graph)}`);
  }
  const graph = options.graph ?? false;
  return callNative(() => native().gpuRun(device, op, handles, params, reps, graph));
}

/** Names of the ops this binary registered for the emulator or for real devices. */
export function gpuOpNames(emulated: boolean): string[] {
  return native().gpuOps(emulated);
}
