import { describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import { Tensor, kernels } from '../dist/index.js';

const script = new URL('./fixtures/worker-gemm.mjs', import.meta.url);
const fill = (len: number, s: number) => Float32Array.from({ length: len }, (_, i) => Math.sin(i * 0.37 + s));

function runWorker(data: object): { worker: Worker; running: Promise<void>; result: Promise<{ sum: number; threads: number }> } {
  const worker = new Worker(script, { workerData: data });
  let markRunning: () => void = () => {};
  const running = new Promise<void>((r) => { markRunning = r; });
  const result = new Promise<{ sum: number; threads: number }>((resolve, reject) => {
    worker.on('message', (m: { running?: boolean; sum: number; threads: number }) => (m.running ? markRunning() : resolve(m)));
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`worker exited with ${code}`)));
  });
  return { worker, running, result };
}

async function mainSum(m: number, k: number, n: number, seed: number): Promise<number> {
  const a = new Tensor('float32', fill(m * k, seed), [m, k]);
  const b = new Tensor('float32', fill(k * n, seed + 1), [k, n]);
  const c = await kernels.gemm(a, b, { activation: 'relu' });
  return c.data.reduce((s, v) => s + v, 0);
}

describe('worker_threads', () => {
  it('several workers use sonde at once, each with its own pool', async () => {
    const jobs = [0, 1, 2, 3].map((i) => ({ m: 20 + i, k: 64, n: 48, seed: i, repeat: 4 }));
    const runs = jobs.map((j) => runWorker(j));
    const results = await Promise.all(runs.map((r) => r.result));
    for (let i = 0; i < jobs.length; i++) {
      const j = jobs[i]!;
      expect(results[i]!.sum).toBe(await mainSum(j.m, j.k, j.n, j.seed));
      expect(results[i]!.threads).toBeGreaterThanOrEqual(1);
    }
    await Promise.all(runs.map((r) => r.worker.terminate()));
  });

  it('terminating a worker in the middle of a GEMM leaves the process and other workers working', async () => {
    const victim = runWorker({ m: 700, k: 700, n: 700, seed: 9, repeat: 1000 });
    victim.result.catch(() => {});
    const other = runWorker({ m: 30, k: 50, n: 40, seed: 5, repeat: 20 });
    // Terminate once the victim is inside its GEMM loop (not still loading, on a busy machine).
    await victim.running;
    await new Promise((r) => setTimeout(r, 100));
    const code = await victim.worker.terminate();
    expect(code).toBe(1);
    expect((await other.result).sum).toBe(await mainSum(30, 50, 40, 5));
    await other.worker.terminate();
    // A fresh worker after the termination still works.
    const again = runWorker({ m: 8, k: 9, n: 10, seed: 2, repeat: 2 });
    expect((await again.result).sum).toBe(await mainSum(8, 9, 10, 2));
    await again.worker.terminate();
  });

  it('workers terminated at random points (loading, running, idle) never crash or hang the process', async () => {
    for (let i = 0; i < 25; i++) {
      const r = runWorker({ m: 200 + i, k: 200, n: 200, seed: i, repeat: 1000 });
      r.result.catch(() => {});
      await new Promise((res) => setTimeout(res, (i * 37) % 150));
      await r.worker.terminate();
    }
    expect(await mainSum(8, 9, 10, 2)).toBeTypeOf('number');
  });
});
