import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { devices } from '../dist/index.js';

const order = ['scalar', 'avx2', 'avx512'] as const;
const detected = devices().cpu.simdDetected;

// SONDE_ISA lowers the dispatch level at load, so the whole process (auto variant included) runs
// the narrower kernels; this is how users pin a level and how each path is exercised end to end.
describe.each(order.filter((l) => order.indexOf(l) <= order.indexOf(detected)))('SONDE_ISA=%s', (level) => {
  it('sets the level in use, and auto uses it correctly', () => {
    const script = `import { devices, kernels, Tensor } from './dist/index.js';
      const m = 37, k = 300, n = 53;
      const a = new Tensor('float32', Float32Array.from({ length: m * k }, (_, i) => Math.cos(i)), [m, k]);
      const b = new Tensor('float32', Float32Array.from({ length: k * n }, (_, i) => Math.sin(i)), [k, n]);
      const w = kernels.packGemmWeights(b);
      const c = await kernels.gemm(a, w);
      const r = await kernels.gemm(a, b, { variant: 'reference' });
      let e = 0; for (let i = 0; i < c.size; i++) e = Math.max(e, Math.abs(c.data[i] - r.data[i]));
      let wider = 'none';
      try { await kernels.gemm(a, b, { variant: 'avx512' }); wider = 'ran'; } catch (err) { wider = err.name; }
      console.log(JSON.stringify({ simd: devices().cpu.simd, variant: w.variant, e, wider }));`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, SONDE_ISA: level }, timeout: 30_000,
    });
    const r = JSON.parse(out.toString());
    expect(r.simd).toBe(level);
    expect(r.variant).toBe(level);
    expect(r.e).toBeLessThan(1e-3);
    expect(r.wider).toBe(level === 'avx512' ? 'ran' : 'DeviceUnavailableError');
  });
});
