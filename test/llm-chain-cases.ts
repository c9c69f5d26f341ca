/**
 * KvPool.stepChain on any transformer engine (the CPU's in test/kv-pool.test.ts, the GPU's in
 * test/cuda/llm-pool.test.ts): chained decode steps against single steps whose next token is chosen
 * on the host, by the argmax or by sampling.ts's Sampler, and the chain's bad inputs.
 */
import { describe, expect, it } from 'vitest';
import { AbortError, DisposedError, InvalidArgumentError } from '../lib/errors.js';
import type { ChainSampling, KvPool, LlmEngine } from '../lib/llm/engine.js';
import { Sampler, argmaxLoop as argmax } from '../lib/llm/sampling.js';
import { rng, type FixtureInfo, type FixtureOptions } from './llm-fixtures.js';

function tokens(n: number, vocab: number, seed: number): Int32Array {
  const r = rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(r() * vocab));
}

export function describeChains(label: string, load: (info: FixtureInfo) => Promise<LlmEngine>,
  fixture: (name: string, o: FixtureOptions) => Promise<FixtureInfo>): void {
  // A chain must choose what argmax over each single step's logits chooses: the same kernels run
  // either way (on a GPU the decode attention's split layout follows the graph's 256-position
  // rounding of the longest context, which no chain here crosses), so the tokens, the blocks
  // written and MoE expert counts are equal bit for bit.
  describe(`stepChain (${label}): chained decode steps choose what single steps with the choice on the host choose`, () => {
    const cases: [string, FixtureOptions][] = [
      ['llama q8_0', { kind: 'llama', type: 'q8_0', seed: 7 }],
      ['qwen2 f32', { kind: 'qwen2', type: 'f32', seed: 7 }],
      ['qwen2moe q8_0 (expert counts per step)', { kind: 'qwen2moe', type: 'q8_0', seed: 7 }],
      ['deepseek2 f32 (MLA)', { kind: 'deepseek2', type: 'f32', seed: 7 }],
    ];
    it.each(cases)('%s', async (name, o) => {
      const info = await fixture(`greedy-${name.split(' ').slice(0, 2).join('-')}`, o);
      const engine = await load(info);
      const v = info.vocabSize, bs = 4, steps = 6;
      const pools = [engine.createKvPool({ blockSize: bs, maxBlocks: 32 }), engine.createKvPool({ blockSize: bs, maxBlocks: 32 })];
      try {
        const prompts = [tokens(5, v, 21), tokens(2, v, 22), tokens(8, v, 23)];
        const tables = [Int32Array.of(0, 1, 2, 3), Int32Array.of(4, 5), Int32Array.of(6, 7, 8, 9)];
        const firsts: number[][] = [];
        for (const p of pools) {
          const logits = await p.step({ sequences: prompts.map((t, i) => ({ blockTable: tables[i]!, start: 0, tokens: t, logits: 'last' as const })) });
          firsts.push(prompts.map((_, i) => argmax(logits.subarray(i * v, (i + 1) * v))));
        }
        expect(firsts[1]).toEqual(firsts[0]);
        // Single steps, argmax on the host.
        const single: number[][] = [];
        let next = firsts[0]!;
        for (let j = 0; j < steps; j++) {
          const logits = await pools[0]!.step({ sequences: prompts.map((t, i) => ({
            blockTable: tables[i]!, start: t.length + j, tokens: Int32Array.of(next[i]!), logits: 'last' as const })) });
          next = prompts.map((_, i) => argmax(logits.subarray(i * v, (i + 1) * v)));
          single.push(next);
        }
        const counts0 = pools[0]!.expertCounts();
        // One chain.
        const chosen = (await pools[1]!.stepChain!({ sequences: prompts.map((t, i) => ({
          blockTable: tables[i]!, start: t.length, tokens: Int32Array.of(firsts[1]![i]!), logits: 'last' as const })) }, steps)).tokens;
        expect(chosen.length).toBe(steps * prompts.length);
        expect(Array.from({ length: steps }, (_, j) => Array.from(chosen.subarray(j * 3, j * 3 + 3)))).toEqual(single);
        const ids = Int32Array.from({ length: 10 }, (_, i) => i);
        const [b0, b1] = [await pools[0]!.readBlocks(ids), await pools[1]!.readBlocks(ids)];
        expect(Buffer.from(b1).equals(Buffer.from(b0)), 'the blocks the chain wrote').toBe(true);
        if (counts0) expect(Array.from(pools[1]!.expertCounts()!)).toEqual(Array.from(counts0));
      } finally {
        pools.forEach((p) => p.dispose());
      }
    }, 240_000);

    // The device's draws against sampling.ts's Sampler over single steps' logits (teacher-forced
    // with the device's own tokens, so each step's logits are the chain's): the same tokens and
    // generator states, kept-one cases (no draw) included. Both compute the chain in float64 in one
    // order; only exp() may differ in its last bit between the two, which would change a draw once
    // in about 1e15.
    it('sampled chains draw what Sampler.sample draws from the same logits (top-k, top-p, min-p, temperature)', async () => {
      const info = await fixture('llama-q8_0', { kind: 'llama', type: 'q8_0', seed: 7 });
      const engine = await load(info);
      const v = info.vocabSize, bs = 4, steps = 8;
      const settings = [
        { temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05, seed: 11 },
        { temperature: 1.7, topK: 64, topP: 1, minP: 0, seed: 12 },
        { temperature: 0.5, topK: 1, seed: 13 },
        { temperature: 1.2, topK: 7, topP: 0.6, minP: 0.2, seed: 14 },
        { temperature: 1, topK: 64, topP: 0.5, minP: 0, seed: 16 },
        { temperature: 0, seed: 15 },
      ];
      const chainPool = engine.createKvPool({ blockSize: bs, maxBlocks: 64 }), stepPool = engine.createKvPool({ blockSize: bs, maxBlocks: 64 });
      try {
        const prompts = settings.map((_, i) => tokens(3 + i, v, 40 + i));
        const tables = settings.map((_, i) => Int32Array.from({ length: 5 }, (_, j) => 5 * i + j));
        const seqs = (starts: number[], toks: number[]) => prompts.map((_, i) => ({ blockTable: tables[i]!, start: starts[i]!, tokens: Int32Array.of(toks[i]!), logits: 'last' as const }));
        const device = settings.map((o) => new Sampler(o)), host = settings.map((o) => new Sampler(o));
        for (const p of [chainPool, stepPool]) await p.step({ sequences: prompts.map((t, i) => ({ blockTable: tables[i]!, start: 0, tokens: t.subarray(0, t.length - 1), logits: 'none' as const })) });
        const last = prompts.map((t) => t[t.length - 1]!), starts = prompts.map((t) => t.length - 1);
        const chainers = device.map((sm) => sm.chainSampler(v)!);
        const sampling = { params: new Float64Array(4 * settings.length), rng: new Uint32Array(4 * settings.length) };
        chainers.forEach((c, i) => { sampling.params.set(c.params, 4 * i); sampling.rng.set(c.rng, 4 * i); });
        const result = await chainPool.stepChain!({ sequences: seqs(starts, last) }, steps, { sampling });
        expect(result.rng!.length).toBe(4 * steps * settings.length);
        let fed = last, draws = 0;
        for (let j = 0; j < steps; j++) {
          const logits = await stepPool.step({ sequences: seqs(starts.map((s) => s + j), fed) });
          const want = host.map((sm, i) => {
            const before = Array.from(sm.chainSampler(v)!.rng);
            const t = sm.sample(logits.subarray(i * v, (i + 1) * v));
            if (Array.from(sm.chainSampler(v)!.rng).join() !== before.join()) draws++;
            return t;
          });
          expect(Array.from(result.tokens.subarray(j * settings.length, (j + 1) * settings.length)), `step ${j}`).toEqual(want);
          host.forEach((sm, i) => expect(Array.from(result.rng!.subarray(4 * (j * settings.length + i), 4 * (j * settings.length + i) + 4)),
            `step ${j} sequence ${i}'s generator`).toEqual(Array.from(sm.chainSampler(v)!.rng)));
          fed = want;
        }
        expect(draws).toBeGreaterThan(steps);
        // Sampled tokens vary (not one token repeated), and the greedy one is the argmax.
        expect(new Set(Array.from({ length: steps }, (_, j) => result.tokens[j * settings.length + 1])).size).toBeGreaterThan(2);
      } finally {
        chainPool.dispose();
        stepPool.dispose();
      }
    }, 240_000);

    it('bad input: each error names what is wrong, and the pool stays usable', async () => {
      const info = await fixture('llama-f32', { kind: 'llama', type: 'f32', seed: 7 });
      const engine = await load(info);
      const v = info.vocabSize;
      const pool = engine.createKvPool({ blockSize: 4, maxBlocks: 16 });
      try {
        const seq = (o: Partial<{ blockTable: Int32Array; start: number; tokens: Int32Array; logits: 'none' | 'last' | 'all' }> = {}) =>
          ({ blockTable: Int32Array.of(0, 1), start: 2, tokens: Int32Array.of(3), logits: 'last' as const, ...o });
        const greedy = (batch: Parameters<NonNullable<KvPool['stepChain']>>[0], steps: number, o?: { signal?: AbortSignal; sampling?: ChainSampling }) =>
          pool.stepChain!(batch, steps, o);
        await expect(greedy({ sequences: [seq()] }, 0)).rejects.toThrow(/steps must be an integer/);
        await expect(greedy({ sequences: [seq()] }, 2.5)).rejects.toThrow(/steps must be an integer/);
        await expect(greedy({ sequences: [seq()] }, '3' as unknown as number)).rejects.toThrow(InvalidArgumentError);
        await expect(greedy({ sequences: [seq({ tokens: Int32Array.of(3, 4) })] }, 2)).rejects.toThrow(/one decode token whose logits are wanted/);
        await expect(greedy({ sequences: [seq({ logits: 'none' })] }, 2)).rejects.toThrow(/logits 'none'/);
        await expect(greedy({ sequences: [seq({ tokens: Int32Array.of(3, 4) })] }, 1)).rejects.toThrow(/one decode token whose logits are wanted/);
        await expect(greedy({ sequences: [seq()] }, 7)).rejects.toThrow(/2 blocks of 4 positions do not cover start \+ steps = 9/);
        const context = engine.config.contextLength;
        await expect(greedy({ sequences: [seq({ blockTable: Int32Array.from({ length: 16 }, (_, i) => i), start: context - 2 })] }, 3))
          .rejects.toThrow(/exceeds the pool's context size/);
        // Two sequences whose chains write one block.
        await expect(greedy({ sequences: [seq(), seq({ blockTable: Int32Array.of(2, 1), start: 3 })] }, 3)).rejects.toThrow(/block 1 is written by this step/);
        await expect(greedy({ sequences: [seq({ tokens: Int32Array.of(v) })] }, 2)).rejects.toThrow(/outside the vocabulary/);
        const sampling = (p: number[], rng = new Uint32Array(4)) => ({ params: Float64Array.from(p), rng });
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: sampling([0.8, 40, 1]) })).rejects.toThrow(/params must be a Float64Array of 4 values per sequence/);
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: sampling([0.8, 40, 1, 0], new Uint32Array(3)) })).rejects.toThrow(/rng must be a Uint32Array/);
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: sampling([NaN, 40, 1, 0]) })).rejects.toThrow(/temperature must be finite/);
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: sampling([0.8, 65, 1, 0]) })).rejects.toThrow(/topK must be an integer in \[1, 64\]/);
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: sampling([0.8, 2.5, 1, 0]) })).rejects.toThrow(/topK must be an integer/);
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: sampling([0.8, 40, 0, 0]) })).rejects.toThrow(/topP must be in \(0, 1\]/);
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: sampling([0.8, 40, 1, 0.5]) })).rejects.toThrow(/log\(minP\) must be <= 0/);
        await expect(greedy({ sequences: [seq()] }, 2, { sampling: { params: new Float64Array(4), rng: new Uint32Array(4), seed: 1 } as never }))
          .rejects.toThrow(/seed/);
        const ac = new AbortController();
        ac.abort();
        await expect(greedy({ sequences: [seq()] }, 2, { signal: ac.signal })).rejects.toThrow(AbortError);
        // Still usable: a prefill and a chain.
        await pool.step({ sequences: [{ blockTable: Int32Array.of(0, 1), start: 0, tokens: Int32Array.of(1, 2), logits: 'last' }] });
        expect((await greedy({ sequences: [seq()] }, 3)).tokens.length).toBe(3);
      } finally {
        pool.dispose();
      }
      await expect(pool.stepChain!({ sequences: [] }, 1)).rejects.toThrow(DisposedError);
    }, 120_000);

    // A chain runs as one native job: aborting it must stop it between steps (on a GPU the steps
    // are queued ahead of the device, and the host waits on them in groups so that it can), and an
    // empty batch is no work.
    it('a long chain aborted while it runs rejects with AbortError; an empty one resolves; the pool stays usable', async () => {
      const info = await fixture('llama-f32', { kind: 'llama', type: 'f32', seed: 7 });
      const engine = await load(info);
      const steps = 60000;
      const pool = engine.createKvPool({ blockSize: 4096, maxBlocks: 16, contextSize: steps + 8 });
      try {
        const table = Int32Array.from({ length: 16 }, (_, i) => i);
        await pool.step({ sequences: [{ blockTable: table, start: 0, tokens: Int32Array.of(1, 2, 3), logits: 'none' }] });
        const ac = new AbortController();
        const started = performance.now();
        const run = pool.stepChain!({ sequences: [{ blockTable: table, start: 3, tokens: Int32Array.of(4), logits: 'last' }] }, steps, { signal: ac.signal });
        setTimeout(() => ac.abort(), 20);
        await expect(run).rejects.toThrow(AbortError);
        const took = performance.now() - started;
        expect((await pool.stepChain!({ sequences: [] }, 3)).tokens.length).toBe(0);
        expect((await pool.stepChain!({ sequences: [{ blockTable: table, start: 3, tokens: Int32Array.of(4), logits: 'last' }] }, 2)).tokens.length).toBe(2);
        // Stopped well before its steps would have ended (each takes a step's time).
        const one = performance.now();
        await pool.stepChain!({ sequences: [{ blockTable: table, start: 3, tokens: Int32Array.of(4), logits: 'last' }] }, 8);
        const perStep = (performance.now() - one) / 8;
        expect(took).toBeLessThan(Math.max(perStep * steps / 4, 1000));
      } finally {
        pool.dispose();
      }
    }, 240_000);
  });
}
