// onnxruntime-node (MLAS) as an independent reference for kernels.gemm: a different library with its
// own packing, blocking and summation order, so agreement here is not the reference kernel agreeing
// with itself. The models are the gemm bench suite's anchor (bench/anchors/onnxruntime.js), which
// this also checks: a wrong anchor would make every bench ratio meaningless.
import { afterAll, describe, expect, it } from 'vitest';
import { devices, kernels } from '../dist/index.js';
import { prepareWith, type OrtGemm } from '../bench/anchors/onnxruntime.js';
import { randomTensor } from './helpers.js';

const simd = devices().cpu.simd;
const variants: kernels.GemmVariant[] = ['reference', 'scalar', 'auto',
  ...(simd !== 'scalar' ? ['avx2' as const] : []), ...(simd === 'avx512' ? ['avx512' as const] : [])];

// Odd sizes off every tile edge (MR 4/6/12, NR 8/16/32, K block 256), plus a single element.
const shapes: [number, number, number][] = [[1, 1, 1], [17, 33, 65], [64, 300, 100], [1, 1000, 37], [13, 257, 33]];
const epilogues = [
  { name: 'plain', bias: false, relu: false },
  { name: 'bias', bias: true, relu: false },
  { name: 'bias+relu', bias: true, relu: true },
] as const;

/**
 * Both sides are float32 dot products in different orders, each within (k + 2)·u·Σ|a·b| (+ |bias|)
 * of the exact value (u = 2^-24), so they may differ by twice that. ReLU only shrinks differences.
 */
function expectCloseToOrt(got: Float32Array, want: Float32Array, a: Float32Array, b: Float32Array,
  m: number, k: number, n: number, bias: Float32Array | null): void {
  expect(got.length).toBe(want.length);
  const u = 2 ** -24;
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let mag = bias ? Math.abs(bias[j]!) : 0;
      for (let p = 0; p < k; p++) mag += Math.abs(a[i * k + p]! * b[p * n + j]!);
      const bound = 2 * (k + 2) * u * mag + 1e-30;
      const err = Math.abs(got[i * n + j]! - want[i * n + j]!);
      if (!(err <= bound)) {
        throw new Error(`C[${i}, ${j}] = ${got[i * n + j]} but onnxruntime-node = ${want[i * n + j]} (|err| ${err.toExponential(3)} > bound ${bound.toExponential(3)}) for m=${m} k=${k} n=${n}`);
      }
    }
  }
}

const sessions: OrtGemm[] = [];
afterAll(async () => {
  for (const s of sessions) await s.release();
});

describe('kernels.gemm against onnxruntime-node', () => {
  describe.each(epilogues)('$name', ({ bias: withBias, relu }) => {
    it.each(shapes)('%i x %i x %i, every variant and packed weights', async (m, k, n) => {
      const a = randomTensor([m, k], m * 31 + k);
      const b = randomTensor([k, n], n * 17 + k);
      const bias = withBias ? randomTensor([n], n + 3) : undefined;
      const ort = await prepareWith(m, k, n, b.data, { threads: 1, bias: bias?.data ?? null, relu });
      sessions.push(ort);
      const want = await ort.run(a.data);
      expect(want.length).toBe(m * n);
      const opts = { ...(bias ? { bias } : {}), ...(relu ? { activation: 'relu' as const } : {}) };
      for (const variant of variants) {
        const c = await kernels.gemm(a, b, { ...opts, variant });
        expect(c.dims).toEqual([m, n]);
        expectCloseToOrt(c.data, want, a.data, b.data, m, k, n, bias?.data ?? null);
      }
      const w = kernels.packGemmWeights(b);
      expectCloseToOrt((await kernels.gemm(a, w, { ...opts, threads: 2 })).data, want, a.data, b.data, m, k, n, bias?.data ?? null);
      w.dispose();
      if (relu) expect(Math.min(...want)).toBe(0);
    });
  });

  it('the anchor at 2 threads agrees with itself at 1 (the bench times it at both)', async () => {
    const [m, k, n] = [40, 129, 70];
    const a = randomTensor([m, k], 7);
    const b = randomTensor([k, n], 8);
    const one = await prepareWith(m, k, n, b.data, { threads: 1 });
    const two = await prepareWith(m, k, n, b.data, { threads: 2 });
    sessions.push(one, two);
    expectCloseToOrt(await two.run(a.data), await one.run(a.data), a.data, b.data, m, k, n, null);
    expectCloseToOrt((await kernels.gemm(a, b)).data, await two.run(a.data), a.data, b.data, m, k, n, null);
  });

  it('the bound is tight enough to catch one dropped term', async () => {
    const [m, k, n] = [17, 33, 65];
    const a = randomTensor([m, k], 11);
    const b = randomTensor([k, n], 12);
    const ort = await prepareWith(m, k, n, b.data, { threads: 1 });
    sessions.push(ort);
    // sonde over the first k - 1 terms: A without its last column, B without its last row.
    const a1 = randomTensor([m, k - 1]);
    for (let i = 0; i < m; i++) a1.data.set(a.data.subarray(i * k, i * k + k - 1), i * (k - 1));
    const b1 = randomTensor([k - 1, n]);
    b1.data.set(b.data.subarray(0, (k - 1) * n));
    const short = await kernels.gemm(a1, b1);
    const want = await ort.run(a.data);
    expect(() => expectCloseToOrt(short.data, want, a.data, b.data, m, k, n, null)).toThrow(/onnxruntime-node/);
  });
});
