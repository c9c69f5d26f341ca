/**
 * The block manager and the continuous-batching scheduler (lib/llm/kv) against the reference pool
 * of kv-reference.ts, whose logits are a function of the tokens read back through each block
 * table: every generation is compared with a direct evaluation of the same prompt.
 */
import { describe, expect, it } from 'vitest';
import { AbortError, DisposedError, InvalidArgumentError, OutOfMemoryError, QueueFullError } from '../lib/errors.js';
import { BlockManager } from '../lib/llm/kv/blocks.js';
import { Scheduler, type SchedulerOptions, type SequenceRequest } from '../lib/llm/kv/scheduler.js';
import { Sampler, type ChainSampler } from '../lib/llm/sampling.js';
import { ReferenceKvPool, argmax, greedyDirect, hashLogits, type ReferencePoolOptions } from './kv-reference.js';

const VOCAB = 50;
const fn = hashLogits(VOCAB);

/** A scheduler over a reference pool that checks copy-on-write: no step writes a shared or published block. */
function withCheck(pool: Partial<ReferencePoolOptions> = {}, options: Partial<SchedulerOptions> = {}) {
  let sched: Scheduler | undefined;
  const p = new ReferenceKvPool({
    maxBlocks: 64, blockSize: 4, vocab: VOCAB, logits: fn, ...pool,
    onWrite: (id) => {
      const refs = sched!.blocks.refCount(id);
      if (refs !== 1 || sched!.blocks.isPublished(id)) throw new Error(`wrote block ${id}: ${refs} references, published ${sched!.blocks.isPublished(id)}`);
    },
  });
  sched = new Scheduler(p, { contextSize: 256, vocabSize: VOCAB, now: p.now, ...options });
  return { pool: p, sched };
}

/**
 * Greedy generation of `count` tokens through the scheduler. `chained`: the request also lets a
 * pool that chains steps choose its tokens (SequenceRequest.greedy), stopping after `count` or at
 * the first token `stopAt` accepts (which is kept, as a stop token's step is).
 */
function gen(s: Scheduler, prompt: number[], count: number, extra: Partial<SequenceRequest> = {}, chained = false,
  stopAt?: (t: number) => boolean) {
  const out: number[] = [];
  const take = (t: number) => {
    out.push(t);
    return out.length < count && !stopAt?.(t);
  };
  const done = s.submit({
    tokens: prompt, logits: 'last', ...extra,
    onLogits: (l) => {
      const t = argmax(l);
      return take(t) ? t : undefined;
    },
    ...(chained ? { chain: { sampler: greedyChain(), onToken: (t: number) => take(t), remaining: () => count - out.length } } : {}),
  });
  return { out, done: done.then((r) => ({ tokens: out, result: r })) };
}

const greedyChain = (): ChainSampler => ({ params: [0, 0, 1, -Infinity], rng: new Uint32Array(4) });

/**
 * Generation with a Sampler through the scheduler, its draws on the device where a chain runs
 * them (SequenceRequest.chain with sampler.chainSampler): `count` tokens or up to `stopAt`.
 */
function genSampled(s: Scheduler, prompt: number[], count: number, sampler: Sampler, stopAt?: (t: number) => boolean) {
  const out: number[] = [];
  const take = (t: number) => {
    out.push(t);
    return out.length < count && !stopAt?.(t);
  };
  const chainSampler = sampler.chainSampler(s.vocabSize);
  const done = s.submit({
    tokens: prompt, logits: 'last',
    onLogits: (l) => {
      const t = sampler.sample(l);
      return take(t) ? t : undefined;
    },
    ...(chainSampler ? { chain: { sampler: chainSampler, onToken: take, remaining: () => count - out.length } } : {}),
  });
  return { out, done: done.then(() => out) };
}

/** greedyDirect up to and including the first token `stopAt` accepts. */
function directUntil(p: number[], count: number, stopAt: (t: number) => boolean): number[] {
  const all = greedyDirect(fn, p, count);
  const i = all.findIndex(stopAt);
  return i < 0 ? all : all.slice(0, i + 1);
}

const prompt = (seed: number, n: number) => Array.from({ length: n }, (_, i) => (seed * 7 + i * 13 + ((seed * i) % 5)) % VOCAB);

function expectNoLeaks(s: Scheduler) {
  const st = s.stats();
  expect(st.used).toBe(0);
  expect(st.used + st.cached + st.free).toBe(st.total);
}

describe('BlockManager', () => {
  it('matches exact block chains only, partial blocks by copy, and counts hits', () => {
    const m = new BlockManager({ blockSize: 4, maxBlocks: 8 });
    const a = m.open([1, 2, 3, 4, 5, 6, 7, 8, 9], 8);
    expect(a.length).toBe(0);
    expect(m.reserve(a, 9)).toBe(true);
    m.append(a, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    m.release(a, true); // publishes [1..4], [5..8] and the partial [9]
    expect(m.stats()).toMatchObject({ used: 0, cached: 3, free: 5, queriedTokens: 9, hitTokens: 0 });
    // Same first block, different second: one block reused; a diverging block is not.
    const b = m.open([1, 2, 3, 4, 5, 6, 0, 0, 0], 8);
    expect(b.tokens).toEqual([1, 2, 3, 4, 5, 6]);
    // The second block is shared from the cache: the next write copies it.
    expect(m.blocksToGrow(b, 1)).toBe(1);
    expect(m.reserve(b, 3)).toBe(true);
    const copies = Array.from(m.takeCopies()!);
    expect(copies.length).toBe(2);
    expect(m.isPublished(copies[0]!)).toBe(true);
    expect(m.isPublished(copies[1]!)).toBe(false);
    expect(b.blocks[1]).toBe(copies[1]);
    m.endStep();
    m.append(b, [0, 0, 0]);
    m.release(b, true);
    // Only exact keys: [1,2,3,5] matches nothing of the first block beyond its 3 common tokens.
    const c = m.open([1, 2, 3, 5, 6], 4);
    expect(c.tokens).toEqual([1, 2, 3]);
    m.release(c, false);
    expectStats(m);
  });

  it('evicts least recently released leaves first and never leaves a hole in a chain', () => {
    const m = new BlockManager({ blockSize: 2, maxBlocks: 4 });
    const fill = (tokens: number[]) => {
      const s = m.open(tokens, tokens.length - 1);
      expect(m.reserve(s, tokens.length - s.length)).toBe(true);
      m.endStep();
      m.append(s, tokens.slice(s.length));
      m.release(s, true);
    };
    fill([1, 1, 2, 2]); // blocks A=[1,1], B=[2,2] under A
    fill([3, 3, 4, 4]); // C, D
    expect(m.stats()).toMatchObject({ cached: 4, free: 0 });
    fill([5, 5]); // needs one block: evicts B (the oldest leaf), not A
    expect(m.stats().evictions).toBe(1);
    expect(m.open([1, 1, 2, 2, 9], 4).length).toBe(2);
  });

  it('fork shares blocks and truncate drops the tail; the kept partial block is copied on the next write', () => {
    const m = new BlockManager({ blockSize: 4, maxBlocks: 8 });
    const a = m.open([], 0);
    expect(m.reserve(a, 10)).toBe(true);
    m.append(a, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    const b = m.fork(a, 6);
    expect(b.blocks).toEqual(a.blocks.slice(0, 2));
    expect(b.tokens).toEqual([1, 2, 3, 4, 5, 6]);
    expect(m.refCount(a.blocks[1]!)).toBe(2);
    expect(m.reserve(b, 1)).toBe(true); // shared second block: copied
    expect(Array.from(m.takeCopies()!)).toEqual([a.blocks[1], b.blocks[1]]);
    m.endStep();
    m.truncate(a, 5);
    expect(a.blocks.length).toBe(2);
    expect(m.stats().used).toBe(3); // the shared first block, a's second, b's copy of it (a's third was dropped)
    expect(m.reserve(a, 3)).toBe(true); // a's second block is published (full): copied
    expect(m.takeCopies()!.length).toBe(2);
    m.endStep();
    expect(() => m.truncate(a, 9)).toThrow(/outside \[0, 5\]/);
    expect(() => m.fork(a, 6)).toThrow(/outside \[0, 5\]/);
    m.release(a, false);
    m.release(b, false);
    expect(() => m.fork(a)).toThrow(/released/);
    expectStats(m);
  });

  it('rejects bad sizes', () => {
    expect(() => new BlockManager({ blockSize: 0, maxBlocks: 4 })).toThrow(InvalidArgumentError);
    expect(() => new BlockManager({ blockSize: 4, maxBlocks: 1.5 })).toThrow(/maxBlocks/);
  });
});

function expectStats(m: BlockManager) {
  const st = m.stats();
  expect(st.used).toBe(0);
  expect(st.used + st.cached + st.free).toBe(st.total);
}

describe('Scheduler over the reference pool', () => {
  it('a generation equals the direct evaluation; prefix caching on and off give the same tokens', async () => {
    for (const prefixCaching of [true, false]) {
      const { sched, pool } = withCheck({}, { prefixCaching });
      const base = prompt(1, 13);
      const prompts = [base, [...base, 3, 4, 5], [...base.slice(0, 6), 9, 9], base];
      for (const p of prompts) {
        const r = await gen(sched, p, 9).done;
        expect(r.tokens).toEqual(greedyDirect(fn, p, 9));
      }
      const computed = pool.steps.reduce((n, st) => n + st.sequences.reduce((k, q) => k + q.tokens.length, 0), 0);
      const st = sched.stats();
      if (prefixCaching) {
        // The second prompt reuses the first's 13 + 8 cached tokens but computes its own 3.
        expect(st.hitTokens).toBeGreaterThanOrEqual(13 + 6 + 12);
        expect(computed).toBeLessThan(13 + 16 + 8 + 13 + 4 * 8);
      } else {
        expect(st.hitTokens).toBe(0);
        expect(computed).toBe(13 + 16 + 8 + 13 + 4 * 8);
      }
      expectNoLeaks(sched);
    }
  });

  it('never writes a shared or published block (copy-on-write inside a block, forks of retained sequences)', async () => {
    const { sched, pool } = withCheck({ blockSize: 8 });
    const p = prompt(2, 11);
    await gen(sched, p, 4).done; // leaves [p, 3 generated] cached: one full block and a partial one
    // Diverging inside the partial block, and extending it: both copy it.
    const q1 = [...p.slice(0, 10), 7, 7];
    const q2 = [...p, 1, 2, 3];
    const [r1, r2] = await Promise.all([gen(sched, q1, 6).done, gen(sched, q2, 6).done]);
    expect(r1.tokens).toEqual(greedyDirect(fn, q1, 6));
    expect(r2.tokens).toEqual(greedyDirect(fn, q2, 6));
    expect(pool.steps.some((s) => s.copies.length > 0)).toBe(true);
    // Retained: two continuations from one retained sequence share its last block.
    const a = await gen(sched, prompt(3, 5), 3, { retain: true }).done;
    const kept = a.result.retained!;
    expect(kept.tokens).toEqual([...prompt(3, 5), ...a.tokens.slice(0, 2)]);
    const c1 = [...kept.tokens, a.tokens[2]!, 4];
    const c2 = [...kept.tokens, 11];
    const [x, y] = await Promise.all([gen(sched, c1, 5, { continueFrom: kept }).done, gen(sched, c2, 5, { continueFrom: kept }).done]);
    kept.release();
    kept.release();
    expect(x.tokens).toEqual(greedyDirect(fn, c1, 5));
    expect(y.tokens).toEqual(greedyDirect(fn, c2, 5));
    await expect(sched.submit({ tokens: [1], logits: 'last', continueFrom: kept })).rejects.toThrow(/continueFrom has been released/);
    const other = withCheck().sched;
    const foreign = (await gen(other, [1, 2], 2, { retain: true }).done).result.retained!;
    await expect(sched.submit({ tokens: [1, 2, 3], logits: 'last', continueFrom: foreign })).rejects.toThrow(/retained by another model/);
    foreign.release();
    expectNoLeaks(sched);
  });

  it('eviction under a small cap keeps results exact', async () => {
    const { sched } = withCheck({ maxBlocks: 12, blockSize: 4 });
    const common = prompt(9, 8);
    for (let round = 0; round < 3; round++) {
      for (let k = 0; k < 6; k++) {
        const p = [...common, ...prompt(k, 1 + k)];
        const r = await gen(sched, p, 6).done;
        expect(r.tokens).toEqual(greedyDirect(fn, p, 6));
      }
    }
    const st = sched.stats();
    expect(st.evictions).toBeGreaterThan(0);
    expect(st.hitTokens).toBeGreaterThan(0);
    expectNoLeaks(sched);
  });

  it('8 concurrent generations are batched and each equals the same generation alone', async () => {
    const { sched, pool } = withCheck({ delayMs: 1 }, { prefillBudget: 16 });
    const prompts = Array.from({ length: 8 }, (_, i) => prompt(i + 10, 5 + 3 * i));
    // Long enough generations that the first still decode when the last prompt's chunks are in.
    const rs = await Promise.all(prompts.map((p, i) => gen(sched, p, 30 + i).done));
    rs.forEach((r, i) => expect(r.tokens).toEqual(greedyDirect(fn, prompts[i]!, 30 + i)));
    expect(Math.max(...pool.steps.map((s) => s.sequences.length))).toBe(8);
    expect(pool.maxInFlight).toBe(1);
    // Chunked prefill: no step carries more than 16 prompt tokens beside its decodes.
    for (const st of pool.steps) {
      const prefill = st.sequences.filter((q) => q.tokens.length > 1 || q.logits !== 'last').reduce((n, q) => n + q.tokens.length, 0);
      expect(prefill).toBeLessThanOrEqual(16);
    }
    expectNoLeaks(sched);
  });

  it('with KvPool.stepInto, one reused logits array serves every step: the same tokens and "all" rows', async () => {
    // A pool whose stepInto poisons the array before writing a step's rows into its front (as the
    // native one does): a logits row the scheduler held on to from an earlier step would read NaN.
    const { sched, pool } = withCheck({ delayMs: 1 }, { prefillBudget: 16 });
    const intos: Float32Array[] = [];
    pool.stepInto = async (batch, into, options) => {
      const got = await pool.step(batch, options);
      intos.push(into);
      into.fill(Number.NaN);
      if (got.length > into.length) return got;
      into.set(got);
      return into.subarray(0, got.length);
    };
    const prompts = Array.from({ length: 6 }, (_, i) => prompt(i + 30, 4 + 3 * i));
    const all = prompt(9, 11);
    const [rs, whole] = await Promise.all([Promise.all(prompts.map((p, i) => gen(sched, p, 12 + i).done)), sched.submit({ tokens: all, logits: 'all' })]);
    rs.forEach((r, i) => expect(r.tokens).toEqual(greedyDirect(fn, prompts[i]!, 12 + i)));
    for (let i = 0; i < all.length; i++) {
      expect(Array.from(whole.logits!.subarray(i * VOCAB, (i + 1) * VOCAB))).toEqual(Array.from(fn(all.slice(0, i + 1))));
    }
    expect(intos.length).toBe(pool.steps.length);
    // Grown (doubling) while the batch fills, then the same array for every later step.
    expect(new Set(intos).size).toBeLessThanOrEqual(6);
    expect(new Set(intos.slice(intos.length >> 1)).size).toBe(1);
    expectNoLeaks(sched);
  });

  it('a long prompt arriving during decodes is chunked: the decodes run in every step', async () => {
    const { sched, pool } = withCheck({ maxBlocks: 128, delayMs: 1 }, { prefillBudget: 8 });
    const short = [gen(sched, prompt(1, 3), 40), gen(sched, prompt(2, 4), 40)];
    while (short[1]!.out.length < 2) await new Promise((r) => setTimeout(r, 1));
    const longPrompt = prompt(5, 70);
    const long = gen(sched, longPrompt, 3);
    const before = pool.steps.length;
    const rs = await Promise.all([...short.map((g) => g.done), long.done]);
    expect(rs[2]!.tokens).toEqual(greedyDirect(fn, longPrompt, 3));
    const during = pool.steps.slice(before).filter((st) => st.sequences.some((q) => q.tokens.length > 1 && q.start < 70));
    expect(during.length).toBeGreaterThanOrEqual(70 / 8 - 1);
    for (const st of during) expect(st.sequences.filter((q) => q.tokens.length === 1).length).toBe(2);
    expectNoLeaks(sched);
  });

  it('beside running decodes, prompt chunks are sized to keep a step within about twice a decode step', async () => {
    // A step costs 8 ms plus 0.1 ms per token: 2 decodes ~8 ms, a 512-token chunk ~60 ms.
    const { sched, pool } = withCheck({ maxBlocks: 512, delayMs: 8, rowDelayMs: 0.1 }, { prefillBudget: 512, contextSize: 1024 });
    const decodes = [gen(sched, prompt(1, 3), 60), gen(sched, prompt(2, 4), 60)];
    while (decodes[1]!.out.length < 5) await new Promise((r) => setTimeout(r, 1));
    const longPrompt = prompt(5, 600);
    const long = gen(sched, longPrompt, 2);
    const from = pool.steps.length;
    const rs = await Promise.all([...decodes.map((g) => g.done), long.done]);
    expect(rs[2]!.tokens).toEqual(greedyDirect(fn, longPrompt, 2));
    const chunks = pool.steps.slice(from)
      .filter((st) => st.sequences.some((q) => q.tokens.length === 1) && st.sequences.some((q) => q.tokens.length > 1))
      .map((st) => st.sequences.find((q) => q.tokens.length > 1)!.tokens.length);
    // The first chunk probes (8 tokens); then at most twice the last, up to ~ 8 ms / 0.1 ms = 80
    // tokens, never the whole budget.
    expect(chunks[0]).toBe(8);
    for (let i = 1; i < chunks.length; i++) expect(chunks[i]).toBeLessThanOrEqual(2 * chunks[i - 1]!);
    expect(chunks.length).toBeGreaterThanOrEqual(5);
    expect(Math.max(...chunks)).toBeLessThan(200);
    // Alone, a prompt takes the whole budget per step.
    const before = pool.steps.length;
    await gen(sched, prompt(6, 600), 1).done;
    expect(pool.steps[before]!.sequences[0]!.tokens.length).toBe(512);
    expectNoLeaks(sched);
  });

  it('a prompt token dearer than a decode step gets chunks below 16 tokens, and decode-only steps keep the decode cost current', async () => {
    // A step costs 4 ms plus 2 ms per token: 2 decodes ~8 ms, a token ~2 ms: chunks of ~4 tokens.
    const { sched, pool } = withCheck({ maxBlocks: 512, delayMs: 4, rowDelayMs: 2 }, { prefillBudget: 512, contextSize: 1024 });
    const decodes = [gen(sched, prompt(1, 3), 400), gen(sched, prompt(2, 4), 400)];
    while (decodes[1]!.out.length < 5) await new Promise((r) => setTimeout(r, 1));
    const longPrompt = prompt(5, 200);
    const long = gen(sched, longPrompt, 2);
    const from = pool.steps.length;
    const rs = await long.done;
    expect(rs.tokens).toEqual(greedyDirect(fn, longPrompt, 2));
    // A step lists the decodes first, then the prompt chunk: [decode, decode, chunk] while mixed.
    const steps = pool.steps.slice(from).map((st) => ({
      decodes: Math.min(2, st.sequences.length), chunk: st.sequences.length === 3 ? st.sequences[2]!.tokens.length : 0,
    }));
    const mixed = steps.filter((st) => st.chunk > 0 && st.decodes === 2);
    // The first chunk probes (8 tokens); the others stay well below the 16 of a fixed floor.
    expect(mixed[0]!.chunk).toBe(8);
    expect(Math.max(...mixed.slice(1).map((st) => st.chunk))).toBeLessThan(16);
    // A decode-only step at least every 17 steps re-measures the decodes.
    let run = 0;
    let decodeOnly = 0;
    for (const st of steps) {
      run = st.chunk > 0 && st.decodes === 2 ? run + 1 : 0;
      if (st.chunk === 0 && st.decodes === 2) decodeOnly++;
      expect(run).toBeLessThanOrEqual(17);
    }
    expect(decodeOnly).toBeGreaterThanOrEqual(2);
    for (const g of decodes) await g.done;
    expectNoLeaks(sched);
  });

  it('aborts while waiting, while prefilling and while decoding; the others are unaffected', async () => {
    const { sched } = withCheck({ delayMs: 1 }, { maxConcurrency: 2, prefillBudget: 4 });
    const acWait = new AbortController();
    const acPrefill = new AbortController();
    const acDecode = new AbortController();
    const good = gen(sched, prompt(1, 6), 20);
    const decoding = gen(sched, prompt(2, 3), 50, { signal: acDecode.signal });
    const waiting = gen(sched, prompt(3, 5), 5, { signal: acWait.signal });
    const waitingGood = gen(sched, prompt(4, 5), 5);
    acWait.abort();
    await expect(waiting.done).rejects.toThrow(AbortError);
    // Decoding: abort after a few tokens.
    while (decoding.out.length < 3) await new Promise((r) => setTimeout(r, 1));
    acDecode.abort('stop');
    await expect(decoding.done).rejects.toMatchObject({ name: 'AbortError', cause: 'stop' });
    // Prefilling: a 40-token prompt at 4 tokens per step, aborted after its first chunk.
    const prefilling = gen(sched, prompt(5, 40), 5, { signal: acPrefill.signal });
    while (sched.running < 2 || sched.waiting > 0) await new Promise((r) => setTimeout(r, 1));
    acPrefill.abort();
    await expect(prefilling.done).rejects.toThrow(AbortError);
    expect(prefilling.out.length).toBe(0);
    expect((await good.done).tokens).toEqual(greedyDirect(fn, prompt(1, 6), 20));
    expect((await waitingGood.done).tokens).toEqual(greedyDirect(fn, prompt(4, 5), 5));
    // Already aborted: at once.
    await expect(sched.submit({ tokens: [1], logits: 'last', signal: acWait.signal })).rejects.toThrow(AbortError);
    await sched.whenIdle();
    expectNoLeaks(sched);
  });

  it('a bad request among good ones fails alone with a typed error', async () => {
    const { sched } = withCheck({ maxBlocks: 8, blockSize: 4 }, { contextSize: 20 });
    const goods = [gen(sched, prompt(1, 5), 6), gen(sched, prompt(2, 7), 6)];
    const tooLong = sched.submit({ tokens: prompt(3, 21), logits: 'last' });
    const neverFits = new Scheduler(new ReferenceKvPool({ maxBlocks: 2, blockSize: 4, vocab: VOCAB, logits: fn }), { contextSize: 64, vocabSize: VOCAB })
      .submit({ tokens: prompt(3, 8), logits: 'last' });
    const throwing = sched.submit({ tokens: prompt(4, 4), logits: 'last', onLogits: () => { throw new RangeError('consumer bug'); } });
    await expect(tooLong).rejects.toThrow(InvalidArgumentError);
    await expect(tooLong).rejects.toThrow(/21 tokens, longer than the context of 20/);
    await expect(neverFits).rejects.toThrow(OutOfMemoryError);
    await expect(neverFits).rejects.toThrow(/need 3 KV blocks .* more than the whole cache holds \(2 blocks/);
    await expect(throwing).rejects.toThrow(RangeError);
    await expect(sched.submit({ tokens: [], logits: 'last' })).rejects.toThrow(/no tokens/);
    const rs = await Promise.all(goods.map((g) => g.done));
    expect(rs[0]!.tokens).toEqual(greedyDirect(fn, prompt(1, 5), 6));
    expect(rs[1]!.tokens).toEqual(greedyDirect(fn, prompt(2, 7), 6));
    // A generation ends when its context is full (20 tokens: 13 generated after 7, the last unfed).
    const full = await gen(sched, prompt(5, 7), 100).done;
    expect(full.tokens).toEqual(greedyDirect(fn, prompt(5, 7), 14));
    expectNoLeaks(sched);
  });

  it('QueueFullError at once when maxQueue requests wait', async () => {
    const { sched } = withCheck({ delayMs: 1 }, { maxConcurrency: 1, maxQueue: 2 });
    const a = gen(sched, prompt(1, 3), 5);
    const b = gen(sched, prompt(2, 3), 5);
    const c = gen(sched, prompt(3, 3), 5);
    const d = sched.submit({ tokens: prompt(4, 3), logits: 'last' });
    await expect(d).rejects.toThrow(QueueFullError);
    await expect(d).rejects.toThrow(/2 requests are waiting/);
    for (const [i, g] of [a, b, c].entries()) expect((await g.done).tokens).toEqual(greedyDirect(fn, prompt(i + 1, 3), 5));
  });

  it('preempts the newest sequence when the pool is full, and both still finish exactly', async () => {
    // 10 blocks of 4: two sequences of 5 + 30 tokens need 18 blocks together.
    const { sched, pool } = withCheck({ maxBlocks: 10, blockSize: 4 }, { prefillBudget: 64 });
    const p1 = prompt(1, 5);
    const p2 = prompt(2, 5);
    const [r1, r2] = await Promise.all([gen(sched, p1, 30).done, gen(sched, p2, 30).done]);
    expect(r1.tokens).toEqual(greedyDirect(fn, p1, 30));
    expect(r2.tokens).toEqual(greedyDirect(fn, p2, 30));
    // The preempted one was prefilled again, after its cached blocks: a prompt row run past position 5.
    const prefills = pool.steps.flatMap((s) => s.sequences).filter((q) => q.tokens.length > 1);
    expect(prefills.some((q) => q.start + q.tokens.length > 5)).toBe(true);
    expect(pool.highWaterBytes).toBeLessThanOrEqual(10 * pool.blockBytes);
    expectNoLeaks(sched);
    // A sequence alone that outgrows the whole pool fails with OutOfMemoryError, blocks returned.
    await expect(gen(sched, p1, 60).done).rejects.toThrow(OutOfMemoryError);
    expectNoLeaks(sched);
  });

  it('logits "all" gives every prompt row from position 0, chunked or not', async () => {
    const { sched } = withCheck({}, { prefillBudget: 5 });
    const p = prompt(7, 13);
    await gen(sched, p, 3).done; // cached: must not be reused for 'all'
    const r = await sched.submit({ tokens: p, logits: 'all' });
    for (let i = 0; i < p.length; i++) {
      expect(Array.from(r.logits!.subarray(i * VOCAB, (i + 1) * VOCAB))).toEqual(Array.from(fn(p.slice(0, i + 1))));
    }
    expectNoLeaks(sched);
  });

  it.each([['plain steps', false], ['greedy chains (KvPool.stepChain)', true]])('a mixed load (shared prefixes, aborts at random steps, a small pool) stays exact and leaks nothing: %s', async (_, chains) => {
    let seed = 12345;
    const rand = (n: number) => { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; return (seed >>> 8) % n; };
    const { sched, pool } = withCheck({ maxBlocks: 16, blockSize: 4, chains }, { prefillBudget: 6, maxConcurrency: 5 });
    const roots = [prompt(1, 10), prompt(2, 7), prompt(3, 13)];
    const jobs = Array.from({ length: 40 }, () => {
      const root = roots[rand(3)]!;
      const p = [...root.slice(0, 1 + rand(root.length)), ...prompt(rand(50), 1 + rand(6))];
      const n = 1 + rand(12);
      const ac = new AbortController();
      const abortAfter = rand(4) === 0 ? rand(8) : -1;
      const g = gen(sched, p, n, { signal: ac.signal }, chains);
      if (abortAfter >= 0) {
        const at = pool.steps.length + abortAfter;
        const poll = setInterval(() => { if (pool.steps.length >= at) { ac.abort(); clearInterval(poll); } }, 0);
        void g.done.finally(() => clearInterval(poll)).catch(() => {});
      }
      return { p, n, g, aborted: () => ac.signal.aborted };
    });
    let exact = 0;
    for (const j of jobs) {
      try {
        const r = await j.g.done;
        expect(r.tokens).toEqual(greedyDirect(fn, j.p, j.n));
        exact++;
      } catch (err) {
        expect(err).toBeInstanceOf(AbortError);
        expect(j.aborted()).toBe(true);
      }
    }
    expect(exact).toBeGreaterThan(20);
    if (chains) expect(pool.chains.length).toBeGreaterThan(0);
    const st = sched.stats();
    expect(st.evictions).toBeGreaterThan(0);
    expect(st.hitTokens).toBeGreaterThan(0);
    await sched.whenIdle();
    expectNoLeaks(sched);
  });

  it('dispose rejects waiting requests, ends running ones, and frees every block', async () => {
    const { sched, pool } = withCheck({ delayMs: 2 }, { maxConcurrency: 2 });
    const kept = (await gen(sched, prompt(4, 6), 2, { retain: true }).done).result.retained!;
    const running = [gen(sched, prompt(1, 4), 50), gen(sched, prompt(2, 4), 50)];
    const waiting = gen(sched, prompt(3, 4), 5);
    while (running[0]!.out.length < 2) await new Promise((r) => setTimeout(r, 1));
    expect(sched.stats().used).toBeGreaterThan(0);
    sched.dispose();
    sched.dispose();
    await Promise.all([...running, waiting].map((g) => expect(g.done).rejects.toThrow(DisposedError)));
    await sched.whenIdle();
    expect(pool.inFlight).toBe(0);
    expect(kept.released).toBe(true);
    expectNoLeaks(sched);
    await expect(sched.submit({ tokens: [1], logits: 'last' })).rejects.toThrow(DisposedError);
  });
});

describe('Scheduler: chained steps (KvPool.stepChain)', () => {
  const decodeRows = (pool: { steps: { sequences: { tokens: number[]; start: number }[] }[] }) =>
    pool.steps.reduce((n, st) => n + st.sequences.filter((q) => q.tokens.length === 1 && q.start > 0).length, 0);

  it('chains of about CHAIN_SECONDS of steps; each generation equals the direct evaluation and computes no row past its last token', async () => {
    // 1 ms steps: chains of up to 10.
    const { sched, pool } = withCheck({ delayMs: 1, chains: true });
    const prompts = Array.from({ length: 4 }, (_, i) => prompt(i + 30, 5 + i));
    const counts = [25, 31, 40, 17];
    const rs = await Promise.all(prompts.map((p, i) => gen(sched, p, counts[i]!, {}, true).done));
    rs.forEach((r, i) => expect(r.tokens).toEqual(greedyDirect(fn, prompts[i]!, counts[i]!)));
    expect(pool.chains.length).toBeGreaterThan(0);
    expect(Math.max(...pool.chains)).toBe(10);
    // Every token but each request's last was fed once: chains stop at the remaining count.
    expect(decodeRows(pool)).toBe(counts.reduce((n, c) => n + c - 1, 0));
    expectNoLeaks(sched);
  });

  it('a request that stops inside a chain keeps exactly its tokens: retained, continued and cached prefixes stay exact', async () => {
    const { sched, pool } = withCheck({ blockSize: 4, chains: true });
    const stop = (t: number) => t % 7 === 3;
    const p = prompt(5, 6);
    // A first plain step measures the decode cost; a free step (delay 0) then chains up to 64.
    const a = await gen(sched, p, 200, { retain: true }, true, stop).done;
    const want = directUntil(p, 200, stop);
    expect(want.length).toBeGreaterThan(3);
    expect(want.length).toBeLessThan(60);
    expect(a.tokens).toEqual(want);
    expect(pool.chains.length).toBeGreaterThan(0);
    // The chain ran past the stop, but the cache holds the prompt and the fed tokens only.
    const kept = a.result.retained!;
    expect(kept.tokens).toEqual([...p, ...want.slice(0, -1)]);
    const next = [...kept.tokens, want[want.length - 1]!, 11, 12];
    const c = await gen(sched, next, 9, { continueFrom: kept }, true).done;
    kept.release();
    expect(c.tokens).toEqual(greedyDirect(fn, next, 9));
    // A fresh request over the same text reuses the published blocks and still matches.
    const d = await gen(sched, next, 5, {}, true).done;
    expect(d.tokens).toEqual(greedyDirect(fn, next, 5));
    expect(sched.stats().hitTokens).toBeGreaterThan(kept.tokens.length - 4);
    expectNoLeaks(sched);
  });

  it('a full context ends the request as plain steps do', async () => {
    const runs = [];
    for (const chains of [false, true]) {
      const { sched, pool } = withCheck({ chains }, { contextSize: 40 });
      const r = await gen(sched, prompt(8, 10), 100, {}, true).done;
      runs.push(r.tokens);
      if (chains) expect(pool.chains.length).toBeGreaterThan(0);
      expectNoLeaks(sched);
    }
    expect(runs[1]).toEqual(runs[0]);
    expect(runs[0]!.length).toBe(31);
    expect(runs[0]).toEqual(greedyDirect(fn, prompt(8, 10), 31));
  });

  it('sampled requests chain too: the same tokens as plain steps, and a sampler reused after a stop inside a chain draws on in step', async () => {
    const options = [
      { temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05, seed: 1 },
      { temperature: 1.5, topK: 64, topP: 1, minP: 0, seed: 2 },
      { temperature: 0.3, topK: 5, topP: 0.5, minP: 0, seed: 3 },
      { temperature: 0, seed: 4 },
    ];
    const stop = (t: number) => t % 23 === 5;
    const runs: number[][][] = [];
    // Logits without hashLogits' spike, over 100 ids: every setting keeps several candidates.
    const vocab = 100, logits = hashLogits(vocab, 0, 3);
    for (const chains of [false, true]) {
      const pool = new ReferenceKvPool({ maxBlocks: 64, blockSize: 4, vocab, logits, delayMs: 1, chains });
      const sched = new Scheduler(pool, { contextSize: 256, vocabSize: vocab, now: pool.now });
      const samplers = options.map((o) => new Sampler(o));
      // Concurrent, then each sampler again after its first generation (which may stop mid-chain).
      const first = await Promise.all(samplers.map((sm, i) => genSampled(sched, prompt(i + 40, 6), 30, sm, stop).done));
      const second = await Promise.all(samplers.map((sm, i) => genSampled(sched, prompt(i + 50, 4), 20, sm).done));
      runs.push([...first, ...second]);
      if (chains) expect(pool.chains.length).toBeGreaterThan(0);
      expectNoLeaks(sched);
    }
    expect(runs[1]).toEqual(runs[0]);
    expect(runs[0]!.slice(0, 4).some((r) => r.length < 30)).toBe(true);
    // The sampled settings drew from several candidates: not one token repeated.
    for (const r of runs[0]!.slice(0, 3)) expect(new Set(r).size).toBeGreaterThan(3);
    // Samplers the device cannot run (penalties, top-k off or above 64) are not chained.
    expect(new Sampler({ temperature: 0.8, repeatPenalty: 1.1 }).chainSampler(VOCAB)).toBeUndefined();
    expect(new Sampler({ temperature: 0.8, topK: 0 }).chainSampler(1000)).toBeUndefined();
    expect(new Sampler({ temperature: 0.8, topK: 65 }).chainSampler(1000)).toBeUndefined();
    expect(new Sampler({ temperature: 0.8, topK: 50 }).chainSampler(50)).toBeUndefined();
  });

  it('no chain while a request without a device chooser runs; requests arriving during a chain join after it', async () => {
    const { sched, pool } = withCheck({ delayMs: 1, chains: true });
    const sampled = gen(sched, prompt(1, 5), 30);
    const greedy = gen(sched, prompt(2, 5), 20, {}, true);
    await Promise.all([sampled.done, greedy.done]);
    expect(pool.chains).toEqual([]);
    expect(greedy.out).toEqual(greedyDirect(fn, prompt(2, 5), 20));
    const first = gen(sched, prompt(3, 5), 60, {}, true);
    while (pool.chains.length === 0) await new Promise((r) => setTimeout(r, 1));
    const late = gen(sched, prompt(4, 7), 25, {}, true);
    const [r1, r2] = await Promise.all([first.done, late.done]);
    expect(r1.tokens).toEqual(greedyDirect(fn, prompt(3, 5), 60));
    expect(r2.tokens).toEqual(greedyDirect(fn, prompt(4, 7), 25));
    // The late one's prompt ran beside the first's decodes, then both chained.
    expect(pool.steps.some((st) => st.sequences.length === 2 && st.sequences.some((q) => q.tokens.length === 7))).toBe(true);
    expect(pool.chains.length).toBeGreaterThan(1);
    expectNoLeaks(sched);
  });

  it('requests waiting for a free slot (maxConcurrency) do not stop the chains; each takes a slot as one ends', async () => {
    const waitingAtChains: number[] = [];
    const { sched, pool } = withCheck({ delayMs: 1, chains: true, onChain: () => waitingAtChains.push(sched.waiting) }, { maxConcurrency: 2 });
    const prompts = [prompt(60, 5), prompt(61, 6), prompt(62, 7), prompt(63, 4)];
    const counts = [30, 12, 25, 18];
    const rs = await Promise.all(prompts.map((p, i) => gen(sched, p, counts[i]!, {}, true).done));
    rs.forEach((r, i) => expect(r.tokens).toEqual(greedyDirect(fn, prompts[i]!, counts[i]!)));
    // Chains ran while requests waited, and never more than two sequences ran at once.
    expect(waitingAtChains.filter((w) => w > 0).length).toBeGreaterThan(1);
    expect(Math.max(...pool.steps.map((st) => st.sequences.length))).toBeLessThanOrEqual(2);
    expectNoLeaks(sched);
  });

  it('abort during a chain, onToken throwing, a full pool (preemption) and dispose: as plain steps', async () => {
    {
      const { sched, pool } = withCheck({ delayMs: 1, chains: true });
      const ac = new AbortController();
      const aborted = gen(sched, prompt(1, 5), 80, { signal: ac.signal }, true);
      const good = gen(sched, prompt(2, 5), 40, {}, true);
      while (pool.chains.length === 0) await new Promise((r) => setTimeout(r, 1));
      ac.abort();
      await expect(aborted.done).rejects.toThrow(AbortError);
      expect((await good.done).tokens).toEqual(greedyDirect(fn, prompt(2, 5), 40));
      const bad = sched.submit({
        tokens: prompt(3, 5), logits: 'last', onLogits: (l) => argmax(l),
        chain: { sampler: greedyChain(), onToken: () => { throw new InvalidArgumentError('consumer failed'); }, remaining: () => Infinity },
      });
      const beside = gen(sched, prompt(4, 5), 30, {}, true);
      await expect(bad).rejects.toThrow(/consumer failed/);
      expect((await beside.done).tokens).toEqual(greedyDirect(fn, prompt(4, 5), 30));
      await sched.whenIdle();
      expectNoLeaks(sched);
    }
    {
      // 10 blocks of 4: two sequences of 5 + 30 tokens need 18 blocks together.
      const { sched, pool } = withCheck({ maxBlocks: 10, blockSize: 4, chains: true }, { prefillBudget: 64 });
      const [r1, r2] = await Promise.all([gen(sched, prompt(1, 5), 30, {}, true).done, gen(sched, prompt(2, 5), 30, {}, true).done]);
      expect(r1.tokens).toEqual(greedyDirect(fn, prompt(1, 5), 30));
      expect(r2.tokens).toEqual(greedyDirect(fn, prompt(2, 5), 30));
      expect(pool.chains.length).toBeGreaterThan(0);
      expect(pool.highWaterBytes).toBeLessThanOrEqual(10 * pool.blockBytes);
      expectNoLeaks(sched);
    }
    {
      const { sched, pool } = withCheck({ delayMs: 2, chains: true });
      const running = [gen(sched, prompt(1, 4), 500, {}, true), gen(sched, prompt(2, 4), 500, {}, true)];
      while (pool.chains.length === 0) await new Promise((r) => setTimeout(r, 1));
      sched.dispose();
      await Promise.all(running.map((g) => expect(g.done).rejects.toThrow(DisposedError)));
      await sched.whenIdle();
      expect(pool.inFlight).toBe(0);
      expectNoLeaks(sched);
    }
  });
});
