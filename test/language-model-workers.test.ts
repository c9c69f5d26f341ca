// LanguageModel in worker_threads (the package as built to dist/, as a worker imports it): workers
// generate what the main thread generates, and terminating one mid-generation leaves the rest working.
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { LanguageModel } from '../dist/index.js';
import { fixtureDir, writeFixture } from './llm-fixtures.js';

const script = new URL('./fixtures/worker-lm.mjs', import.meta.url);

function runWorker(data: object): { worker: Worker; result: Promise<{ tokens: number[] }> } {
  const worker = new Worker(script, { workerData: data });
  const result = new Promise<{ tokens: number[] }>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`worker exited with ${code}`)));
  });
  return { worker, result };
}

describe('LanguageModel in worker_threads', () => {
  it('workers generate what the main thread does; terminating them mid-generation is safe', async () => {
    const path = join(fixtureDir('sonde-lmw-'), 'w.gguf');
    await writeFixture(path, { kind: 'qwen2', type: 'q8_0', seed: 31 });
    await using model = await LanguageModel.load(path, { contextSize: 128 });
    const prompt = model.tokenize('Once upon a time');
    const generate = async () => {
      const out: number[] = [];
      for await (const e of model.generate(prompt, { maxTokens: 24, temperature: 0 })) out.push(e.token);
      return out;
    };
    const want = await generate();
    expect(want.length).toBeGreaterThan(0);
    const runs = [0, 1].map(() => runWorker({ path, prompt, maxTokens: 24, repeat: 2 }));
    for (const r of runs) expect((await r.result).tokens).toEqual(want);
    await Promise.all(runs.map((r) => r.worker.terminate()));
    for (let i = 0; i < 4; i++) {
      const r = runWorker({ path, prompt, maxTokens: 100, repeat: 1000 });
      r.result.catch(() => {});
      await new Promise((res) => setTimeout(res, 50 + ((i * 37) % 120)));
      await r.worker.terminate();
    }
    expect(await generate()).toEqual(want);
  });
});
