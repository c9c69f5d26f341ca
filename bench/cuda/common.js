// Helpers the cuda suite's family files share.
import { GpuBuffer, runGpuOp } from '../../dist/cuda/runtime.js';

/** ms per run of op, after one warm-up run, timed with device events over `reps` runs. */
export async function timeOp(id, op, buffers, params, reps) {
  await runGpuOp(id, op, buffers, params);
  return runGpuOp(id, op, buffers, params, { reps });
}

/** A device buffer of `count` random float32 values in [-1, 1). */
export async function randomBuffer(id, count) {
  const a = new Float32Array(count);
  for (let i = 0; i < count; i++) a[i] = Math.random() * 2 - 1;
  return GpuBuffer.from(id, a);
}
