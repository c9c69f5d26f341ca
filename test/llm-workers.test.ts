import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { loadTransformer } from '../dist/llm/transformer.js';
import { fixtureDir, writeFixture } from './llm-fixtures.js';

const script = new URL('./fixtures/worker-llm.mjs', import.meta.url);

function runWorker(data: object): { worker: Worker; result: Promise<{ logits: number[] }> } {
  const worker = new Worker(script, { workerData: data });
  const result = new Promise<{ logits: number[] }>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`worker exited with ${code}`)));
  });
  return { worker, result };
}

describe('the transformer in worker_threads', () => {
  it('workers compute the main thread\'s logits; terminating them mid-eval is safe', async () => {
    const info = await writeFixture(join(fixtureDir(), 'w.gguf'), { kind: 'qwen2moe', type: 'q4_0', seed: 8 });
    const tokens = Array.from({ length: 24 }, (_, i) => (i * 37) % info.vocabSize);
    const engine = await loadTransformer(info.path);
    const want = Array.from(await engine.createSequence(tokens.length).eval(tokens, { allLogits: true }));
    const runs = [0, 1].map(() => runWorker({ path: info.path, tokens, repeat: 2 }));
    for (const r of runs) expect((await r.result).logits).toEqual(want);
    await Promise.all(runs.map((r) => r.worker.terminate()));
    for (let i = 0; i < 6; i++) {
      const r = runWorker({ path: info.path, tokens, repeat: 100000 });
      r.result.catch(() => {});
      await new Promise((res) => setTimeout(res, 30 + ((i * 37) % 120)));
      await r.worker.terminate();
    }
    expect(Array.from(await engine.createSequence(tokens.length).eval(tokens, { allLogits: true }))).toEqual(want);
    engine.dispose();
  }, 60_000);
});
