import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { kernels, Tensor } from '../dist/index.js';
import { expectGemmClose, randomTensor } from './helpers.js';

describe('output buffer pool', () => {
  it('large outputs are pooled, correct, and independent of each other', async () => {
    const a = randomTensor([200, 100], 1);
    const b = randomTensor([100, 300], 2);
    const c1 = await kernels.gemm(a, b);
    const c2 = await kernels.gemm(a, b, { activation: 'relu' });
    expect(c1.data.byteLength).toBe(200 * 300 * 4);
    expect(c1.data.buffer).not.toBe(c2.data.buffer);
    expectGemmClose(c1.data, a.data, b.data, 200, 100, 300);
    expectGemmClose(c2.data, a.data, b.data, 200, 100, 300, undefined, true);
    // Outputs are ordinary typed arrays: writable, sliceable, and survive their producer.
    c1.data[0] = 42;
    expect(c1.data.slice(0, 1)[0]).toBe(42);
    expect(new Tensor('float32', c1.data, [300, 200]).size).toBe(60000);
  });

  it('memory comes back to the pool when V8 collects the output, is reported to V8 while alive, and is reused', () => {
    const script = `
      import { kernels, Tensor, reportedExternalMemory } from './dist/index.js';
      import { native } from './dist/binding.js';
      const a = new Tensor('float32', new Float32Array(256 * 256).fill(1), [256, 256]);
      const w = kernels.packGemmWeights(a);
      const stats = () => native().bufferPoolStats().cachedBytes;
      // Finalizers of external ArrayBuffers run after gc() returns, in later tasks, and a loaded
      // machine can delay them well past a few quiet readings: collect until \`done\` holds, or
      // until the pool and V8's external total have been still for 20 readings.
      const settle = async (done = () => false) => {
        let prev = -1, still = 0;
        for (let i = 0; i < 1000 && still < 20; i++) {
          globalThis.gc();
          await new Promise((r) => setTimeout(r, 5));
          if (done()) return;
          const now = stats() * 1e15 + reportedExternalMemory();
          still = now === prev ? still + 1 : 0;
          prev = now;
        }
      };
      await settle();
      const ext0 = reportedExternalMemory();
      let outs = [];
      for (let i = 0; i < 8; i++) outs.push(await kernels.gemm(a, w));
      const ext1 = reportedExternalMemory();
      const cached0 = stats();
      outs = null;
      const bytes = 256 * 256 * 4;
      await settle(() => stats() - cached0 >= 6 * bytes && ext1 - reportedExternalMemory() >= 6 * bytes);
      const cached1 = stats();
      const ext2 = reportedExternalMemory();
      const c = await kernels.gemm(a, w);
      const cached2 = stats();
      console.log(JSON.stringify({ grew: ext1 - ext0, cached0, cached1, back: ext1 - ext2, cached2, v: c.data[5] }));`;
    const out = execFileSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], { timeout: 30_000 });
    const r = JSON.parse(out.toString());
    const bytes = 256 * 256 * 4;
    expect(r.grew).toBeGreaterThanOrEqual(8 * bytes);        // reported while alive
    // Returned on collection (V8 may keep the most recent result reachable a while longer).
    expect(r.cached1 - r.cached0).toBeGreaterThanOrEqual(6 * bytes);
    expect(r.back).toBeGreaterThanOrEqual(6 * bytes);        // and no longer reported
    expect(r.cached1 - r.cached2).toBeGreaterThanOrEqual(bytes);      // the next output reuses one
    expect(r.v).toBe(256);
  });
});
