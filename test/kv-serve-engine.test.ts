/**
 * The serving core (lib/llm/kv) on the real engine's paged KV pool, with generated GGUF models:
 * greedy generations through the scheduler, alone, batched with others, with prefix caching on
 * and off and under a small cap, each equal to the single-sequence engine path
 * (LlmEngine.createSequence) evaluated token by token; prompt logits within a float tolerance.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { LlmEngine } from '../lib/llm/engine.js';
import { Scheduler, type SchedulerOptions } from '../lib/llm/kv/scheduler.js';
import { LanguageModel } from '../lib/llm/language-model.js';
import { loadTransformer } from '../lib/llm/transformer.js';
import { argmax } from './kv-reference.js';
import { fixtureDir, writeFixture, type FixtureOptions } from './llm-fixtures.js';

const dir = fixtureDir('sonde-kv-serve-');
const CASES: [string, FixtureOptions][] = [
  ['llama f32', { kind: 'llama', type: 'f32', seed: 11 }],
  ['mixtral q8_0 (4 experts, top 2)', { kind: 'mixtral', type: 'q8_0', seed: 15 }],
  // Latent (MLA) cache blocks: one row of kv_lora_rank + rope dims per layer and position.
  ['deepseek2 f32 (latent cache, grouped routing)', { kind: 'deepseek2', type: 'f32', seed: 13, routing: { groups: 4, groupsUsed: 2 } }],
  ['deepseek2 f16 (q LoRA, joined kv_b, sigmoid + bias)', {
    kind: 'deepseek2', type: 'f16', seed: 17, mla: { qLoraRank: 16, kvB: 'joined' }, routing: { gatingFunc: 2, probsBias: true, weightsNorm: true },
  }],
];

/** Greedy tokens by the single-sequence path, one eval per token. */
async function greedySequence(engine: LlmEngine, prompt: number[], n: number): Promise<number[]> {
  const seq = engine.createSequence(256);
  try {
    let logits = await seq.eval(prompt);
    const out: number[] = [];
    for (;;) {
      const t = argmax(logits);
      out.push(t);
      if (out.length === n) return out;
      logits = await seq.eval([t]);
    }
  } finally {
    seq.dispose();
  }
}

function greedyScheduled(s: Scheduler, prompt: number[], n: number): Promise<number[]> {
  const out: number[] = [];
  return s.submit({
    tokens: prompt, logits: 'last',
    onLogits: (l) => { out.push(argmax(l)); return out.length < n ? out.at(-1) : undefined; },
  }).then(() => out);
}

const hasPool = async (path: string) => {
  const e = await loadTransformer(path);
  const ok = typeof e.createKvPool === 'function';
  e.dispose();
  return ok;
};

describe.each(CASES)('%s', (label, fixture) => {
  const path = join(dir, `${label.replace(/\W+/g, '-')}.gguf`);
  let engine: LlmEngine;
  let pooled = false;
  const prefix = Array.from({ length: 40 }, (_, i) => 3 + ((i * 17) % 90));
  const prompts = Array.from({ length: 8 }, (_, k) => [...prefix.slice(0, 8 + 4 * k), 5 + k, 7 + 2 * k]);
  const want: number[][] = [];
  const N = 12;

  beforeAll(async () => {
    await writeFixture(path, fixture);
    pooled = await hasPool(path);
    engine = await loadTransformer(path, { threads: 1 });
    for (const p of prompts) want.push(await greedySequence(engine, p, N));
  });
  afterAll(() => engine?.dispose());

  const scheduler = (o: Partial<SchedulerOptions> = {}, maxBlocks = 64) =>
    new Scheduler(engine.createKvPool!({ maxBlocks, blockSize: 16 }), { contextSize: 256, vocabSize: engine.config.vocabSize, ...o });

  it('greedy alone, with prefix caching on and off, equals the single-sequence path', async (ctx) => {
    if (!pooled) ctx.skip();
    for (const prefixCaching of [false, true]) {
      const s = scheduler({ prefixCaching });
      for (let k = 0; k < prompts.length; k++) expect(await greedyScheduled(s, prompts[k]!, N), `prompt ${k}`).toEqual(want[k]);
      const st = s.stats();
      if (prefixCaching) expect(st.hitTokens).toBeGreaterThan(0);
      expect(st.used).toBe(0);
      s.pool.dispose();
    }
  });

  it('8 concurrent greedy generations equal each alone; a small cap evicts and stays exact', async (ctx) => {
    if (!pooled) ctx.skip();
    const s = scheduler({ prefillBudget: 32 });
    const got = await Promise.all(prompts.map((p) => greedyScheduled(s, p, N)));
    got.forEach((g, k) => expect(g, `prompt ${k}`).toEqual(want[k]));
    expect(s.stats().used).toBe(0);
    s.pool.dispose();
    // 6 blocks of 16: two or three sequences at a time, with preemption and eviction.
    const small = scheduler({ prefillBudget: 16 }, 6);
    const again = await Promise.all(prompts.map((p) => greedyScheduled(small, p, N)));
    again.forEach((g, k) => expect(g, `prompt ${k} under the cap`).toEqual(want[k]));
    expect(small.stats().evictions).toBeGreaterThan(0);
    expect(small.stats().used).toBe(0);
    expect(small.pool.highWaterBytes).toBeLessThanOrEqual(6 * small.pool.blockBytes);
    small.pool.dispose();
  });

  it('prompt logits ("all", chunked) equal the single-sequence path within a float tolerance', async (ctx) => {
    if (!pooled) ctx.skip();
    const s = scheduler({ prefillBudget: 7 });
    const p = prompts[7]!;
    const got = (await s.submit({ tokens: p, logits: 'all' })).logits!;
    const seq = engine.createSequence(256);
    const ref = await seq.eval(p, { allLogits: true });
    seq.dispose();
    let scale = 0;
    for (const v of ref) scale = Math.max(scale, Math.abs(v));
    let diff = 0;
    for (let i = 0; i < ref.length; i++) diff = Math.max(diff, Math.abs(got[i]! - ref[i]!));
    // Different row batching changes only the order of fp32 sums: a few ulps of the largest logit.
    expect(diff).toBeLessThan(scale * 1e-4);
    s.pool.dispose();
  });

  it('LanguageModel over the pool: concurrent calls batched, metrics with prefix hits and expert load', async (ctx) => {
    if (!pooled) ctx.skip();
    const m = await LanguageModel.load(path, { threads: 1, contextSize: 256, kvCache: { maxBytes: 1 << 24 } });
    try {
      const got = await Promise.all(prompts.map((p) => (async () => {
        const out: number[] = [];
        for await (const e of m.generate(p, { maxTokens: N, stop: [] })) out.push(e.token);
        return out;
      })()));
      got.forEach((g, k) => expect(g, `prompt ${k}`).toEqual(want[k]!.slice(0, g.length)));
      const s = m.metrics();
      expect(s.requests).toBe(8);
      expect(s.timeToFirstToken.count).toBe(8);
      expect(s.prefix.hitTokens).toBeGreaterThanOrEqual(0);
      expect(s.kv.blocks.used).toBe(0);
      expect(s.kv.highWaterBytes).toBeLessThanOrEqual(1 << 24);
      if (fixture.kind === 'mixtral' || fixture.kind === 'deepseek2') expect(s.expertLoad!.flat().reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
      else expect(s.expertLoad).toBeUndefined();
    } finally {
      m.dispose();
    }
  });
});
