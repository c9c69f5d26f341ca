// Activation sparsity: a batch-1 Gemm whose input row is mostly zeros skips those weight rows
// (native/ops/gemv_skip.cc). Checked against a scalar loop written here, at zero fractions on both
// sides of the cut-over (so both the skipping and the dense path run), on panel-edge shapes (N not
// a multiple of any panel width, K = 1), with the fused bias + ReLU epilogue, under every ISA level
// this CPU has (SONDE_ISA in a child process, as test/isa.test.ts does).
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { devices } from '../dist/index.js';

const root = fileURLToPath(new URL('..', import.meta.url));

// Runs in a child process (so SONDE_ISA applies); prints the worst error / bound over all cases.
const script = `
import { Session, Tensor } from '${root}dist/index.js';
import { GraphBuilder, rng } from '${root}bench/graphs/builder.js';
let worst = 0, cases = 0;
for (const [k, n] of [[1, 1], [7, 17], [64, 33], [300, 100], [1024, 257]]) {
  const r = rng(k * 31 + n);
  const w = Float32Array.from({ length: k * n }, () => r() * 2 - 1);
  const b = Float32Array.from({ length: n }, () => r() - 0.5);
  const g = new GraphBuilder('fc', { opset: 13 });
  g.input('x', 'float32', [1, k]);
  const [y] = g.node('Gemm', ['x', g.init('w', { dtype: 'float32', dims: [k, n], data: w }), g.init('b', { dtype: 'float32', dims: [n], data: b })]);
  const [z] = g.node('Relu', [y]);
  g.output(z, 'float32', [1, n]);
  const s = await Session.load(g.toBytes(), { device: 'cpu', sparse: 'off' });
  // Zero fractions: all zero, one non-zero, 90% (skipping path), 60% (near the cut: either), 30% and none (dense path).
  for (const zeros of [1, -1, 0.9, 0.6, 0.3, 0]) {
    const x = Float32Array.from({ length: k }, () => r() * 2);
    if (zeros === -1) { x.fill(0); x[k >> 1] = 1.5; } else for (let i = 0; i < k; i++) if (r() < zeros) x[i] = 0;
    const got = (await s.run({ x: new Tensor('float32', x, [1, k]) }))[z].data;
    for (let j = 0; j < n; j++) {
      let acc = b[j], mag = Math.abs(b[j]);
      for (let i = 0; i < k; i++) { acc += x[i] * w[i * n + j]; mag += Math.abs(x[i] * w[i * n + j]); }
      const want = Math.max(0, acc);
      // fp32 sums of k terms: |err| <= k u sum|terms| (u = 2^-24), plus the bias add.
      const bound = (k + 2) * 2 ** -24 * mag + 1e-30;
      worst = Math.max(worst, Math.abs(got[j] - want) / bound);
    }
    cases++;
  }
  s.dispose();
}
console.log(JSON.stringify({ worst, cases }));
`;

const order = ['scalar', 'avx2', 'avx512'] as const;
const detected = devices().cpu.simdDetected;
const levels = order.filter((l) => order.indexOf(l) <= order.indexOf(detected));

describe.each(levels)('batch-1 Gemm skipping zero activations, SONDE_ISA=%s', (level) => {
  it('matches the scalar reference at every zero fraction and panel-edge shape', () => {
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, SONDE_ISA: level }, timeout: 60_000, encoding: 'utf8',
    });
    const { worst, cases } = JSON.parse(out.trim().split('\n').at(-1)!);
    expect(cases).toBe(30);
    expect(worst).toBeLessThanOrEqual(1);
  });
});
