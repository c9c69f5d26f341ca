// The plan's generic tensor ops on a GPU: every case of test/tensor-ops.test.ts (scalar references
// written there, edge shapes, negative strides, error messages) run through createGpuPlan /
// gpuPlanRun, i.e. native/kernels/tensor/cuda/tensor.cu, on cuda:0 when this machine has a GPU and
// on the CUDA emulator otherwise (the SIMD-level block of that file is CPU-only and skipped).
import { describe, it } from 'vitest';
import { gpuTargets } from './targets.js';

const targets = gpuTargets();
const target = targets.find((t) => !t.skip && !t.emulated) ?? targets.find((t) => !t.skip);
if (target) {
  (globalThis as { SONDE_PLAN_DEVICE?: string }).SONDE_PLAN_DEVICE = target.id;
  await import('../tensor-ops.test.js');
} else {
  describe.skip(`tensor ops on a GPU plan (skipped: ${targets.map((t) => `${t.id}: ${t.skip}`).join('; ')})`, () => {
    it('runs where a GPU target does', () => {});
  });
}
