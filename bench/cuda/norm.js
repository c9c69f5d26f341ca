// Norms and elementwise ops are memory-bound: GB/s moved (read + written) against the read ceiling.
import { GpuBuffer } from '../../dist/cuda/runtime.js';
import { randomBuffer, timeOp } from './common.js';

export async function* normCases(env) {
  const { id, emulated, measured } = env;
  const rows = emulated ? 4 : 8192, n = emulated ? 256 : 4096;
  const x = await randomBuffer(id, rows * n), w = await randomBuffer(id, n), y = GpuBuffer.alloc(id, rows * n * 4);
  const reps = emulated ? 1 : 50;
  const cases = [
    ['rms_norm', [x, w, y], { rows, n }, 8],
    ['softmax', [x, y], { rows, n }, 8],
    ['silu_mul', [x, x, y], { count: rows * n }, 12],
  ];
  for (const [op, buffers, params, bytesPerElem] of cases) {
    const ms = await timeOp(id, op, buffers, params, reps);
    const gbps = rows * n * bytesPerElem / ms / 1e6;
    yield { case: `${op} ${rows}x${n}`, ms, gbps, pctOfRead: 100 * gbps / measured.gbps };
  }
  for (const b of [x, w, y]) b.dispose();
}
