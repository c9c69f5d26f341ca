// Graph capture (native/runtime/cuda/gpu.h: GpuGraph): replays run the captured launches with the
// captured arguments against the buffers' current contents, as a CUDA graph does. An op whose
// output aliases its input accumulates once per execution, so the result counts the executions.
import { expect, it } from 'vitest';
import { InvalidArgumentError } from '../../dist/index.js';
import { runGpuOp } from '../../dist/cuda/runtime.js';
import { describeGpu, gpuBuffers } from './targets.js';

describeGpu('GPU graph capture', (t) => {
  const { up } = gpuBuffers(t);
  const ADD = 0;

  it('replays a captured op: y = y + b runs once directly and once per replay', async () => {
    const count = 1000;
    for (const graph of [false, true]) {
      const y = await up(new Float32Array(count));
      const b = await up(Float32Array.from({ length: count }, (_, i) => i % 7));
      const ms = await runGpuOp(t.id, 'binary', [y, b, y], { op: ADD, count, bCount: count }, { reps: 4, graph });
      expect(ms).toBeGreaterThanOrEqual(0);
      const got = await y.read(new Float32Array(count));
      expect(Array.from(got), `graph ${graph}`).toEqual(Array.from({ length: count }, (_, i) => 5 * (i % 7)));
    }
  });

  it('a replayed softmax equals the reference', async () => {
    const rows = 2, n = 33;
    const x = await up(Float32Array.from({ length: rows * n }, (_, i) => (i % 5) - 2));
    const y = await up(new Float32Array(rows * n));
    await runGpuOp(t.id, 'softmax', [x, y], { rows, n }, { reps: 2, graph: true });
    const got = await y.read(new Float32Array(rows * n));
    for (let r = 0; r < rows; r++) {
      const row = Array.from({ length: n }, (_, j) => (((r * n + j) % 5) - 2));
      const m = Math.max(...row), e = row.map((v) => Math.exp(v - m)), s = e.reduce((a, c) => a + c, 0);
      for (let j = 0; j < n; j++) expect(got[r * n + j]).toBeCloseTo(e[j]! / s, 6);
    }
  });

  it('rejects a non-boolean graph option', async () => {
    const y = await up(new Float32Array(4));
    await expect(runGpuOp(t.id, 'binary', [y, y, y], { op: ADD, count: 4, bCount: 4 }, { reps: 1, graph: 1 as unknown as boolean }))
      .rejects.toThrow(InvalidArgumentError);
  });
});
