/**
 * Where the GPU kernel tests run: always on the CUDA emulator (the same kernel source compiled for
 * the CPU), and on cuda:0 when this machine has a GPU. SONDE_TEST_CUDA=1 demands the GPU: its
 * absence then fails instead of skipping. The emulator does not depend on the CPU's SIMD level, so
 * CI's SONDE_ISA=avx2/scalar passes skip it (it ran in the default pass).
 */
import { afterAll, describe } from 'vitest';
import { devices } from '../../dist/index.js';
import { GpuBuffer, type GpuDeviceId } from '../../dist/cuda/runtime.js';

export interface GpuTarget {
  id: GpuDeviceId;
  emulated: boolean;
  /** Why this target does not run here; undefined when it runs. */
  skip?: string;
}

export function gpuTargets(): GpuTarget[] {
  const targets: GpuTarget[] = [{
    id: 'emulated',
    emulated: true,
    skip: process.env.SONDE_TEST_CUDA === 'only' ? 'SONDE_TEST_CUDA=only'
      : process.env.SONDE_ISA ? `the CUDA emulator does not depend on SONDE_ISA=${process.env.SONDE_ISA}` : undefined,
  }];
  const cuda = devices().cuda;
  if (cuda.devices.length > 0) {
    targets.push({ id: 'cuda:0', emulated: false });
  } else if (process.env.SONDE_TEST_CUDA === '1' || process.env.SONDE_TEST_CUDA === 'only') {
    throw new Error(`SONDE_TEST_CUDA=1 but there is no CUDA device: ${cuda.reason ?? 'unknown reason'}`);
  } else {
    targets.push({ id: 'cuda:0', emulated: false, skip: `no CUDA device: ${cuda.reason ?? 'unknown reason'}` });
  }
  return targets;
}

/** describe() per target; a target that cannot run is a skipped block whose name says why. */
export function describeGpu(name: string, body: (t: GpuTarget) => void): void {
  for (const t of gpuTargets()) {
    if (t.skip) describe.skip(`${name} on ${t.id} (skipped: ${t.skip})`, () => body(t));
    else describe(`${name} on ${t.id}`, () => body(t));
  }
}

/**
 * Device buffers for one describeGpu block: up() copies data to the device, alloc() leaves the
 * contents undefined; every buffer is disposed after the block.
 */
export function gpuBuffers(t: GpuTarget): { up(data: ArrayBufferView): Promise<GpuBuffer>; alloc(bytes: number): GpuBuffer } {
  const held: GpuBuffer[] = [];
  afterAll(() => held.forEach((b) => b.dispose()));
  const keep = (b: GpuBuffer) => {
    held.push(b);
    return b;
  };
  return {
    up: async (data) => keep(await GpuBuffer.from(t.id, data)),
    alloc: (bytes) => keep(GpuBuffer.alloc(t.id, bytes)),
  };
}
