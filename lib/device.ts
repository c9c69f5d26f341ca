/** Devices: what this process can compute on, and the one function that resolves a device spec. */
import { native } from './binding.js';
import { DeviceUnavailableError, InvalidArgumentError, UnsupportedOperatorError } from './errors.js';
import { describe } from './validate.js';

export type DeviceSpec = 'auto' | 'cpu' | 'cuda' | `cuda:${number}`;

export interface CpuDevice {
  kind: 'cpu';
  id: 'cpu';
  model: string;
  arch: string;
  cores: number;
  /** SIMD level sonde's kernels use (lowered by the SONDE_ISA environment variable). */
  simd: 'scalar' | 'avx2' | 'avx512';
  /** Highest level the CPU and OS support. */
  simdDetected: 'scalar' | 'avx2' | 'avx512';
  features: string[];
  caches: { l1d: number; l2: number; l3: number };
}

export interface CudaDevice {
  kind: 'cuda';
  id: `cuda:${number}`;
  index: number;
  name: string;
  totalMemory: number;
  freeMemory: number;
  computeCapability: string;
  multiprocessors: number;
}

export interface CudaStatus {
  /** This binary was built with CUDA. */
  compiled: boolean;
  runtimeVersion: number;
  /** 0 when no NVIDIA driver is installed. */
  driverVersion: number;
  devices: CudaDevice[];
  /** Why there are no usable devices; absent when there are some. */
  reason?: string;
}

export interface Devices {
  cpu: CpuDevice;
  cuda: CudaStatus;
}

/** The CPU and the CUDA status of this process. */
export function devices(): Devices {
  const b = native();
  const c = b.cpuInfo();
  const cu = b.cudaInfo();
  return {
    cpu: { kind: 'cpu', id: 'cpu', model: c.model, arch: c.arch, cores: c.cores, simd: c.simd,
      simdDetected: c.simdDetected, features: c.features, caches: c.caches },
    cuda: {
      compiled: cu.compiled,
      runtimeVersion: cu.runtimeVersion,
      driverVersion: cu.driverVersion,
      devices: cu.devices.map((d) => ({ kind: 'cuda' as const, id: `cuda:${d.index}` as const, ...d })),
      ...(cu.reason !== undefined ? { reason: cu.reason } : {}),
    },
  };
}

/**
 * Where work runs. `gpu` is the device id of the GPU runtime (lib/cuda/runtime.ts): 'cuda:N', or
 * 'emulated' when SONDE_CUDA_DEVICE=emulated routed an explicit 'cuda' to the CUDA emulator.
 */
export type ResolvedDevice = { kind: 'cpu' } | { kind: 'cuda'; index: number; gpu: 'emulated' | `cuda:${number}` };

/**
 * SONDE_CUDA_DEVICE=emulated (a test hook): an explicit 'cuda' / 'cuda:0' runs on the CUDA
 * emulator, which executes the same kernel sources on the CPU, slowly, so that the GPU executors of
 * sessions and language models are tested on machines without a GPU. 'auto' never picks it.
 */
function emulatedCuda(): boolean {
  return process.env['SONDE_CUDA_DEVICE'] === 'emulated';
}

/**
 * Resolves a device spec. 'auto' is the first CUDA device when there is one, else the CPU;
 * 'cuda' / 'cuda:N' without that device throw DeviceUnavailableError with the reason.
 */
export function resolveDevice(spec: unknown, where = 'device'): ResolvedDevice {
  if (spec === undefined || spec === 'auto') {
    const cu = native().cudaInfo();
    if (cu.devices.length === 0) return { kind: 'cpu' };
    const index = cu.devices[0]!.index;
    return { kind: 'cuda', index, gpu: `cuda:${index}` };
  }
  if (spec === 'cpu') return { kind: 'cpu' };
  if (typeof spec !== 'string') {
    throw new InvalidArgumentError(`${where} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got ${describe(spec)}`);
  }
  const m = /^cuda(?::(\d+))?$/.exec(spec);
  if (!m) {
    const hint = /^(gpu|nvidia|cuda:.*)$/i.test(spec) ? " (use 'cuda' or 'cuda:N' with N a device index)" : '';
    throw new InvalidArgumentError(`${where} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got ${describe(spec)}${hint}`);
  }
  const index = m[1] === undefined ? 0 : Number(m[1]);
  if (emulatedCuda()) {
    if (index !== 0) throw new DeviceUnavailableError(`${where} '${spec}' is unavailable: SONDE_CUDA_DEVICE=emulated provides cuda:0 only`);
    return { kind: 'cuda', index: 0, gpu: 'emulated' };
  }
  const cu = native().cudaInfo();
  if (cu.devices.length === 0) {
    throw new DeviceUnavailableError(`${where} '${spec}' is unavailable: ${cu.reason ?? 'no CUDA devices'}`);
  }
  if (!cu.devices.some((d) => d.index === index)) {
    throw new DeviceUnavailableError(
      `${where} '${spec}' is unavailable: there ${cu.devices.length === 1 ? 'is 1 CUDA device' : `are ${cu.devices.length} CUDA devices`} (cuda:0..cuda:${cu.devices.length - 1})`,
    );
  }
  return { kind: 'cuda', index, gpu: `cuda:${index}` };
}

/** Where a session or model computes, and why there when the caller did not pick it. */
export interface Placement {
  kind: 'cpu' | 'cuda';
  id: 'cpu' | `cuda:${number}`;
  reason?: string;
}

/**
 * Places work none of whose operators (`unsupported`, by name) has a CUDA path yet. Without a GPU
 * it runs on the CPU ('cuda' already failed in resolveDevice); with one, 'auto' and
 * fallback: 'cpu' run it on the CPU and say why, and an explicit 'cuda' / 'cuda:N' is an
 * UnsupportedOperatorError naming the operators, so no caller believes it runs on the GPU.
 */
export function placeWithoutCuda(where: string, spec: unknown, device: ResolvedDevice, unsupported: readonly string[],
  fallback: 'none' | 'cpu'): Placement {
  if (device.kind === 'cpu') {
    if (spec === 'cpu') return { kind: 'cpu', id: 'cpu' };
    return { kind: 'cpu', id: 'cpu', reason: `no CUDA device: ${native().cudaInfo().reason ?? 'none found'}` };
  }
  const ops = unsupported.length > 12 ? `${unsupported.slice(0, 12).join(', ')}, ...` : unsupported.join(', ');
  if (spec === undefined || spec === 'auto' || fallback === 'cpu') {
    return { kind: 'cpu', id: 'cpu', reason: `these operators have no CUDA kernel in this version: ${ops}` };
  }
  throw new UnsupportedOperatorError(`${where}: options.device '${String(spec)}': these operators have no CUDA kernel in ` +
    `this version: ${ops}; use device 'cpu' or 'auto', or fallback: 'cpu' to run them on the CPU`);
}
