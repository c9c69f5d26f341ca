import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { Tensor, gguf, kernels } from '../dist/index.js';
import { randomF32 } from './helpers.js';

const script = new URL('./fixtures/worker-quant.mjs', import.meta.url);

function runWorker(data: object): { worker: Worker; result: Promise<{ sum: number }> } {
  const worker = new Worker(script, { workerData: data });
  const result = new Promise<{ sum: number }>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`worker exited with ${code}`)));
  });
  return { worker, result };
}

describe('GGUF mappings and quant kernels in worker_threads', () => {
  it('workers map the same file and compute what the main thread computes; terminating them mid-run is safe', async () => {
    const [k, n] = [1024, 512];
    const path = join(mkdtempSync(join(tmpdir(), 'sonde-ggufw-')), 'w.gguf');
    await gguf.write(path, { tensors: [{ name: 'w', dims: [k, n], type: 'q4_0', data: randomF32(k * n, 3) }] });
    await using f = await gguf.read(path);
    const x = new Tensor('float32', Float32Array.from({ length: k }, (_, i) => Math.cos(i)), [1, k]);
    const want = (await kernels.quantMatmul(x, f.tensor('w')!)).data.reduce((s, v) => s + v, 0);
    const runs = [0, 1].map(() => runWorker({ path, k, repeat: 3 }));
    for (const r of runs) expect((await r.result).sum).toBe(want);
    await Promise.all(runs.map((r) => r.worker.terminate()));
    for (let i = 0; i < 8; i++) {
      const r = runWorker({ path, k, repeat: 100000 });
      r.result.catch(() => {});
      await new Promise((res) => setTimeout(res, 20 + ((i * 37) % 120)));
      await r.worker.terminate();
    }
    expect((await kernels.quantMatmul(x, f.tensor('w')!)).data.reduce((s, v) => s + v, 0)).toBe(want);
  });
});
