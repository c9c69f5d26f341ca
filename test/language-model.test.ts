/**
 * LanguageModel over a deterministic fake engine and a byte-level fake tokenizer: the generation
 * loop, stop handling, abort, serialisation, prefix reuse and validation, each checked against
 * what the fake model must produce (computed independently here). The end-to-end comparison with
 * llama.cpp on real GGUF fixtures is in language-model-llama.test.ts.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { AbortError, DisposedError, InvalidArgumentError, OutOfMemoryError, QueueFullError } from '../lib/errors.js';
import type { EvalOptions, KvPoolOptions, LlmEngine, LlmSequence, ModelConfig, StepBatch } from '../lib/llm/engine.js';
import type { GgufFile } from '../lib/llm/gguf.js';
import { LanguageModel, type ChatMessage, type LanguageModelTokenizer } from '../lib/llm/language-model.js';
import { Tokenizer } from '../lib/llm/tokenizer.js';
import { ReferenceKvPool } from './kv-reference.js';
import { bpeVocab } from './llm-fixtures.js';

/**
 * Whether fake engines offer a paged KV pool (the scheduler path of LanguageModel) or only
 * single sequences (the serialised path); every test of the first suite runs on both.
 */
let paged = false;

const BOS = 256;
const EOS = 257;
const IM_START = 258;
const IM_END = 259;
/** A word piece: one token of several characters, so a stop string can start inside an event. */
const WORD = 260;
/** '!' and the first byte of a 4-byte character: a token that ends inside a character. */
const BANG_LEAD = 261;
const VOCAB = 262;
const SPECIAL: Record<number, string> = { [BOS]: '<s>', [EOS]: '</s>', [IM_START]: '<|im_start|>', [IM_END]: '<|im_end|>' };

const utf8 = (s: string) => Array.from(new TextEncoder().encode(s));

/** Byte-level tokenizer: token b < 256 is byte b; four special tokens after them, then 'Bye.'. */
function fakeTokenizer(): LanguageModelTokenizer {
  const pieces = (tokens: ArrayLike<number>, special: boolean) => {
    const out: number[] = [];
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i]!;
      if (t < 256) out.push(t);
      else if (t === WORD) out.push(...utf8('Bye.'));
      else if (t === BANG_LEAD) out.push(0x21, 0xf0);
      else if (special) out.push(...utf8(SPECIAL[t]!));
    }
    return Uint8Array.from(out);
  };
  return {
    vocabSize: VOCAB,
    bos: BOS,
    addBos: true,
    encode(text, o = {}) {
      const out: number[] = o.addSpecial === false ? [] : [BOS];
      const parts = o.parseSpecial ? text.split(/(<\|im_start\|>|<\|im_end\|>)/) : [text];
      for (const p of parts) {
        if (p === '<|im_start|>') out.push(IM_START);
        else if (p === '<|im_end|>') out.push(IM_END);
        else out.push(...utf8(p));
      }
      return out;
    },
    decode: (tokens, o = {}) => new TextDecoder().decode(pieces(tokens, o.special ?? false)),
    tokenBytes: (t) => pieces([t], false),
    createDecoder() {
      const td = new TextDecoder();
      return { push: (t) => td.decode(pieces([t], false), { stream: true }), flush: () => td.decode() };
    },
    applyChatTemplate(messages: readonly ChatMessage[]) {
      return messages.map((m) => `<|im_start|>${m.role}\n${String(m.content)}<|im_end|>\n`).join('') + '<|im_start|>assistant\n';
    },
    isEog: (t) => t === EOS || t === IM_END,
  };
}

/** What the fake model says after any prompt, then EOS. */
const SCRIPT_TEXT = 'Hello, wörld! 😀 Bye.\n\nUser: more text that goes on';
const SCRIPT_TOKENS = [...utf8('Hello, wörld! 😀 '), WORD, ...utf8('\n\nUser: more text that goes on')];
const SCRIPT = [...SCRIPT_TOKENS, EOS];

function hash(tokens: readonly number[]): number {
  let h = 0x811c9dc5;
  for (const t of tokens) h = Math.imul(h ^ t, 0x01000193) >>> 0;
  return h;
}

/** The fake model continues the script from the longest tail of `prefix` that begins it. */
function nextScripted(prefix: readonly number[], script: readonly number[]): number {
  for (let n = Math.min(prefix.length, script.length - 1); n > 0; n--) {
    let ok = true;
    for (let i = 0; i < n && ok; i++) ok = prefix[prefix.length - n + i] === script[i];
    if (ok) return script[n]!;
  }
  return script[0]!;
}

/** Logits of the fake model: the scripted token at 8, plus noise in [0, 0.5) from the whole prefix. */
function fakeLogits(prefix: readonly number[], vocab = VOCAB, script: readonly number[] = SCRIPT): Float32Array {
  const out = new Float32Array(vocab);
  let h = hash(prefix);
  for (let v = 0; v < vocab; v++) {
    h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 0;
    out[v] = ((h >>> 8) / 2 ** 24) * 0.5;
  }
  out[nextScripted(prefix, script)]! += 8;
  return out;
}

interface FakeStats {
  evals: number[][]; inFlight: number; maxInFlight: number; disposed: boolean; seqDisposed: boolean;
  /** Called as an eval starts (a test aborts from here, deterministically mid-step). */
  onEval?: (tokens: readonly number[]) => void;
}

/** The reference pool over the fake model, recording each sequence's step tokens as an eval. */
class FakePool extends ReferenceKvPool {
  #stats: FakeStats;
  constructor(stats: FakeStats, options: KvPoolOptions, vocab: number, script: readonly number[], delayMs: number) {
    super({
      maxBlocks: options.maxBlocks, blockSize: options.blockSize ?? 16, vocab, delayMs, logits: (prefix) => fakeLogits(prefix, vocab, script),
      onStep: (batch) => { for (const q of batch.sequences) stats.onEval?.(Array.from(q.tokens)); },
    });
    this.#stats = stats;
  }

  override async step(batch: StepBatch, options?: { signal?: AbortSignal }): Promise<Float32Array> {
    const out = await super.step(batch, options);
    for (const q of batch.sequences) this.#stats.evals.push(Array.from(q.tokens));
    return out;
  }

  override dispose(): void {
    super.dispose();
    this.#stats.seqDisposed = true;
  }
}

function fakeEngine(contextLength = 64, delayMs = 0, vocab = VOCAB, script: readonly number[] = SCRIPT): { engine: LlmEngine; stats: FakeStats } {
  const stats: FakeStats = { evals: [], inFlight: 0, maxInFlight: 0, disposed: false, seqDisposed: false };
  const config: ModelConfig = {
    architecture: 'llama', vocabSize: vocab, contextLength, embeddingLength: 8, blockCount: 2, headCount: 2,
    headCountKv: 1, headDim: 4, feedForwardLength: 16, rmsEpsilon: 1e-5, ropeFreqBase: 10000, ropeScale: 1,
    ropeNeox: false, expertCount: 4, expertUsedCount: 2, expertFeedForwardLength: 16, sharedExpertFeedForwardLength: 0,
    parameterCount: 12345, activeParameterCount: 6789,
  };
  const file = {
    info: { name: 'fake', parameterCount: 12345, tensorTypes: { f32: 5, q8_0: 10 }, tensorBytes: { f32: 100, q8_0: 900 } },
  } as unknown as GgufFile;
  const engine: LlmEngine = {
    config,
    file,
    createSequence(contextSize: number): LlmSequence {
      const cache: number[] = [];
      return {
        get length() { return cache.length; },
        contextSize,
        async eval(tokens, o: EvalOptions = {}) {
          stats.inFlight++;
          stats.maxInFlight = Math.max(stats.maxInFlight, stats.inFlight);
          stats.onEval?.(Array.from(tokens));
          try {
            await new Promise((r) => setTimeout(r, delayMs));
            if (o.signal?.aborted) {
              // As a native step cancelled between tiles may: part of the tokens are in the cache.
              cache.push(...Array.from(tokens).slice(0, tokens.length >> 1));
              throw new AbortError();
            }
            if (cache.length + tokens.length > contextSize) throw new InvalidArgumentError('fake: context overflow');
            stats.evals.push(Array.from(tokens));
            const rows: Float32Array[] = [];
            for (const t of tokens) {
              cache.push(t);
              rows.push(fakeLogits(cache, vocab, script));
            }
            if (!o.allLogits) return rows[rows.length - 1]!;
            const all = new Float32Array(rows.length * vocab);
            rows.forEach((r, i) => all.set(r, i * vocab));
            return all;
          } finally {
            stats.inFlight--;
          }
        },
        truncate(n: number) {
          if (n > cache.length) throw new Error(`fake: truncate(${n}) beyond ${cache.length}`);
          cache.length = n;
        },
        dispose() { stats.seqDisposed = true; },
      };
    },
    dispose() { stats.disposed = true; },
  };
  if (paged) {
    engine.createKvPool = (o: KvPoolOptions) => {
      const pool = new FakePool(stats, o, vocab, script, delayMs);
      const step = pool.step.bind(pool);
      // Steps in flight, as the serialised path counts evals.
      pool.step = async (batch, opts) => {
        stats.inFlight++;
        stats.maxInFlight = Math.max(stats.maxInFlight, stats.inFlight);
        try { return await step(batch, opts); } finally { stats.inFlight--; }
      };
      return pool;
    };
  }
  return { engine, stats };
}

function model(o: { contextSize?: number; delayMs?: number } = {}) {
  const { engine, stats } = fakeEngine(64, o.delayMs ?? 0);
  const m = LanguageModel.fromEngine(engine, fakeTokenizer(), o.contextSize !== undefined ? { contextSize: o.contextSize } : undefined);
  return { m, stats };
}

async function collect(it: AsyncIterable<{ token: number; text: string }>) {
  const tokens: number[] = [];
  const texts: string[] = [];
  for await (const e of it) { tokens.push(e.token); texts.push(e.text); }
  return { tokens, texts, text: texts.join('') };
}

/** The fake model's greedy continuation of `prompt`, by direct evaluation. */
function greedyReference(prompt: number[], max = Infinity, context = Infinity): number[] {
  const seq = prompt.slice();
  const out: number[] = [];
  while (out.length < max) {
    const l = fakeLogits(seq);
    let best = 0;
    for (let v = 1; v < VOCAB; v++) if (l[v]! > l[best]!) best = v;
    if (best === EOS || best === IM_END) break;
    out.push(best);
    if (seq.length >= context) break;
    seq.push(best);
  }
  return out;
}

for (const withPool of [false, true]) describe(`LanguageModel (fake engine, ${withPool ? 'paged KV pool, continuous batching' : 'single sequence, serialised'})`, () => {
  beforeAll(() => { paged = withPool; });

  it('info comes from the engine config and file', () => {
    const { m } = model({ contextSize: 32 });
    expect(m.info).toMatchObject({
      architecture: 'llama', name: 'fake', parameterCount: 12345, activeParameterCount: 6789, contextLength: 64,
      contextSize: 32, vocabSize: VOCAB, expertCount: 4, expertUsedCount: 2, tensorTypes: { f32: 5, q8_0: 10 },
      quantizationTypes: ['q8_0', 'f32'],
    });
    expect(model().m.contextSize).toBe(64); // min(contextLength, 4096)
  });

  it('tokenize / detokenize go through the tokenizer, with checks', () => {
    const { m } = model();
    expect(m.tokenize('hé')).toEqual([BOS, 0x68, 0xc3, 0xa9]);
    expect(m.tokenize('a', { addSpecial: false })).toEqual([0x61]);
    expect(m.tokenize('<|im_end|>', { addSpecial: false, parseSpecial: true })).toEqual([IM_END]);
    expect(m.detokenize([BOS, 0x68, 0xc3, 0xa9])).toBe('hé');
    expect(m.detokenize([BOS, 0x61], { special: true })).toBe('<s>a');
    expect(() => m.detokenize([1, VOCAB])).toThrow(/tokens\[1\] must be a token id in \[0, 261\], got 262/);
    expect(() => m.detokenize([1.5])).toThrow(InvalidArgumentError);
    expect(() => m.tokenize(5 as never)).toThrow(/tokenize\(text\) must be a string/);
    expect(() => m.tokenize('a', { addSpecials: true } as never)).toThrow(/did you mean 'addSpecial'/);
  });

  it('greedy generation is the argmax continuation; EOS ends it and is not emitted', async () => {
    const { m } = model();
    const prompt = m.tokenize('Q: ');
    const r = await collect(m.generate(prompt));
    expect(r.tokens).toEqual(greedyReference(prompt));
    expect(r.tokens).toEqual(SCRIPT_TOKENS);
    expect(r.text).toBe(SCRIPT_TEXT);
    expect(await m.complete('Q: ')).toBe(SCRIPT_TEXT);
  });

  it('streams multi-byte characters whole: each event is valid text, joined it is the decode', async () => {
    const { m } = model();
    const r = await collect(m.generate('x', { maxTokens: 20 }));
    expect(r.text).toBe(fakeTokenizer().decode(r.tokens));
    for (const t of r.texts) expect(t).toBe(t.toWellFormed());
    const emoji = r.tokens.indexOf(0xf0);
    expect(r.texts.slice(emoji, emoji + 4)).toEqual(['', '', '', '😀']);
    // Ending inside the character: the incomplete bytes come out as U+FFFD, as decode() gives them.
    const cut = await collect(m.generate('x', { maxTokens: emoji + 2 }));
    expect(cut.text).toBe('Hello, wörld! \ufffd');
    expect(cut.text).toBe(fakeTokenizer().decode(cut.tokens));
    expect(cut.texts.at(-1)).toBe('\ufffd');
    // A token with a whole character and the start of another, then the end: the flush joins it.
    const m2 = LanguageModel.fromEngine(fakeEngine(64, 0, VOCAB, [0x61, BANG_LEAD, EOS]).engine, fakeTokenizer());
    const r2 = await collect(m2.generate('x'));
    expect(r2.tokens).toEqual([0x61, BANG_LEAD]);
    expect(r2.texts).toEqual(['a', '!\ufffd']);
  });

  it('maxTokens counts generated tokens; 0 generates nothing', async () => {
    const { m } = model();
    for (const n of [0, 1, 5, 13]) {
      const r = await collect(m.generate('p', { maxTokens: n }));
      expect(r.tokens).toEqual(SCRIPT_TOKENS.slice(0, n));
    }
  });

  it('stop strings end generation and are not emitted (across tokens, inside a character, first of several)', async () => {
    const { m } = model();
    expect(await m.complete('p', { stop: '\n\nUser' })).toBe('Hello, wörld! 😀 Bye.');
    expect(await m.complete('p', { stop: ['zzz', 'Bye', 'wörld'] })).toBe('Hello, ');
    expect(await m.complete('p', { stop: '😀' })).toBe('Hello, wörld! ');
    expect(await m.complete('p', { stop: 'H' })).toBe('');
    expect(await m.complete('p', { stop: 'not in it' })).toBe(SCRIPT_TEXT);
    // A held-back partial match that never completes is emitted at the end.
    expect(await m.complete('p', { stop: 'on and on' })).toBe(SCRIPT_TEXT);
    const r = await collect(m.generate('p', { stop: ', w' }));
    expect(r.text).toBe('Hello');
    expect(r.tokens).toEqual(utf8('Hello'));
  });

  it('the event a stop string starts in carries only the text before it', async () => {
    const { m } = model();
    const r = await collect(m.generate('p', { stop: 'e.\n' }));
    expect(r.text).toBe('Hello, wörld! 😀 By');
    expect(r.tokens.at(-1)).toBe(WORD);
    expect(r.texts.at(-1)).toBe('By');
    // Starting at the word's first character: the word is not emitted at all.
    const s = await collect(m.generate('p', { stop: 'Bye' }));
    expect(s.tokens.at(-1)).toBe(0x20);
    expect(s.text).toBe('Hello, wörld! 😀 ');
  });

  it('stop token ids end generation before the token', async () => {
    const { m } = model();
    expect(await m.complete('p', { stop: 0x21 })).toBe('Hello, wörld');
    expect(await m.complete('p', { stop: ['Bye', 0x2c] })).toBe('Hello');
    expect(() => m.generate('p', { stop: VOCAB })).toThrow(/options\.stop must be an integer in \[0, 261\]/);
    expect(() => m.generate('p', { stop: [''] })).toThrow(/options\.stop\[0\] must not be an empty string/);
    expect(() => m.generate('p', { stop: [{}] as never })).toThrow(/options\.stop\[0\] must be a string or a token id/);
  });

  it('a prompt longer than the context is an InvalidArgumentError naming both sizes', async () => {
    const { m } = model({ contextSize: 16 });
    const long = Array.from({ length: 17 }, () => 0x61);
    expect(() => m.generate(long)).toThrow(InvalidArgumentError);
    expect(() => m.generate(long)).toThrow(/17 tokens, longer than the context of 16 tokens/);
    await expect(m.logits(long)).rejects.toThrow(/17 tokens, longer than the context of 16/);
    // One that fits generates until the context is full.
    const r = await collect(m.generate(long.slice(0, 10)));
    expect(r.tokens).toEqual(greedyReference(long.slice(0, 10), Infinity, 16));
    expect(r.tokens.length).toBe(7); // positions 10..15 evaluated, the 7th token sampled from the last
  });

  it('logits(tokens) gives every position, from an empty cache', async () => {
    const { m, stats } = model();
    await m.complete('warm the cache', { maxTokens: 3 });
    const tokens = [BOS, 5, 7, 0x48, 0x65];
    const l = await m.logits(tokens);
    expect(l.length).toBe(tokens.length * VOCAB);
    for (let i = 0; i < tokens.length; i++) {
      expect(Array.from(l.subarray(i * VOCAB, (i + 1) * VOCAB))).toEqual(Array.from(fakeLogits(tokens.slice(0, i + 1))));
    }
    expect(stats.evals.at(-1)).toEqual(tokens);
    await expect(m.logits([])).rejects.toThrow(/tokens must not be empty/);
    await expect(m.logits([-1])).rejects.toThrow(/tokens\[0\] must be a token id/);
  });

  it('a prompt that extends the cached tokens evaluates only its new tokens, with the same results', async () => {
    const { m, stats } = model();
    const first = m.tokenize('Q: hi');
    const a = await collect(m.generate(first, { maxTokens: 4 }));
    const second = [...first, ...a.tokens.slice(0, 3), 0x21, 0x3f];
    stats.evals.length = 0;
    const b = await collect(m.generate(second, { maxTokens: 6 }));
    expect(stats.evals[0]).toEqual([0x21, 0x3f]);
    expect(b.tokens).toEqual(greedyReference(second, 6));
    // A different prompt does not reuse the diverging part.
    stats.evals.length = 0;
    const third = m.tokenize('Q: ho');
    const c = await collect(m.generate(third, { maxTokens: 2 }));
    expect(stats.evals[0]).toEqual([0x6f]);
    expect(c.tokens).toEqual(greedyReference(third, 2));
    // The same prompt again re-evaluates its last token only.
    stats.evals.length = 0;
    await collect(m.generate(third, { maxTokens: 1 }));
    expect(stats.evals[0]).toEqual([third.at(-1)]);
  });

  it('chat messages are rendered with the template and BOS added once', async () => {
    const { m, stats } = model();
    const messages = [{ role: 'user', content: 'hi' }];
    await collect(m.generate(messages, { maxTokens: 1 }));
    expect(stats.evals[0]).toEqual([BOS, IM_START, ...utf8('user\nhi'), IM_END, ...utf8('\n'), IM_START, ...utf8('assistant\n')]);
    expect(() => m.generate([{ content: 'x' }] as never)).toThrow(/prompt\[0\] must be a chat message/);
  });

  it('seeded sampling: same seed and options give the same tokens', async () => {
    const { m } = model();
    const opts = { temperature: 30, topK: 0, topP: 1, minP: 0, maxTokens: 24 };
    const a = await collect(m.generate('s', { ...opts, seed: 5 }));
    const b = await collect(m.generate('s', { ...opts, seed: 5 }));
    const c = await collect(m.generate('s', { ...opts, seed: 6 }));
    expect(a.tokens).toEqual(b.tokens);
    expect(a.tokens).not.toEqual(c.tokens);
    expect(a.tokens).not.toEqual(SCRIPT_TOKENS.slice(0, 24)); // T = 30 flattens the peak of 8
  });

  it('abort mid-generation ends the iterator with AbortError; the model stays usable', async () => {
    const { m, stats } = model({ delayMs: 2 });
    const ac = new AbortController();
    const seen: number[] = [];
    const run = async () => {
      for await (const e of m.generate('p', { signal: ac.signal })) {
        seen.push(e.token);
        if (seen.length === 3) ac.abort();
      }
    };
    await expect(run()).rejects.toThrow(AbortError);
    expect(seen.length).toBe(3);
    // Abort while a step is running in the engine.
    const ac2 = new AbortController();
    const it2 = m.generate('p', { signal: ac2.signal });
    await it2.next();
    const pending = it2.next();
    ac2.abort();
    await expect(pending).rejects.toMatchObject({ name: 'AbortError', code: 'ERR_SONDE_ABORTED' });
    // Abort during a prefill that leaves part of its tokens in the cache.
    const ac3 = new AbortController();
    stats.onEval = (tokens) => { if (tokens.length > 1) ac3.abort(); };
    const before = stats.evals.length;
    await expect(m.complete(m.tokenize('a longer prompt that is prefilled'), { signal: ac3.signal })).rejects.toThrow(AbortError);
    // The prefill step was cut, not completed (a decode step of the generation aborted above may
    // still finish meanwhile: a scheduler does not cancel decode steps).
    expect(stats.evals.slice(before).filter((e) => e.length > 1)).toEqual([]);
    stats.onEval = undefined;
    // Already aborted: rejects on the first next().
    await expect(m.complete('p', { signal: ac.signal })).rejects.toThrow(AbortError);
    // Usable, and the cache is consistent (the greedy continuation and logits are exact).
    const prompt = m.tokenize('p');
    expect((await collect(m.generate(prompt, { maxTokens: 8 }))).tokens).toEqual(greedyReference(prompt, 8));
    const l = await m.logits([BOS, 1, 2]);
    expect(Array.from(l.subarray(2 * VOCAB))).toEqual(Array.from(fakeLogits([BOS, 1, 2])));
  });

  it('concurrent generations are serialised and each is correct', async () => {
    const { m, stats } = model({ delayMs: 1 });
    const prompts = ['a', 'bb', 'Hello', 'ccc'].map((p) => m.tokenize(p));
    const results = await Promise.all(prompts.map((p) => collect(m.generate(p, { maxTokens: 6 }))));
    results.forEach((r, i) => expect(r.tokens).toEqual(greedyReference(prompts[i]!, 6)));
    expect(stats.maxInFlight).toBe(1);
    // A call waiting its turn can be aborted without disturbing the others.
    const ac = new AbortController();
    const first = collect(m.generate(prompts[0]!, { maxTokens: 5 }));
    const waiting = m.complete(prompts[1]!, { signal: ac.signal });
    const third = collect(m.generate(prompts[2]!, { maxTokens: 5 }));
    ac.abort();
    await expect(waiting).rejects.toThrow(AbortError);
    expect((await first).tokens).toEqual(greedyReference(prompts[0]!, 5));
    expect((await third).tokens).toEqual(greedyReference(prompts[2]!, 5));
  });

  it.runIf(withPool)('concurrent generations share batched steps, each exact; metrics count them', async () => {
    const { engine, stats } = fakeEngine(64, 1);
    const m = LanguageModel.fromEngine(engine, fakeTokenizer(), { name: 'fake-batched', kvCache: { maxBytes: 64 * 16 * 4, blockSize: 16 } });
    const prompts = ['a', 'bb', 'Hello', 'ccc'].map((p) => m.tokenize(p));
    const steps: number[] = [];
    stats.onEval = () => { steps.push(stats.evals.length); };
    const results = await Promise.all(prompts.map((p) => collect(m.generate(p, { maxTokens: 6 }))));
    results.forEach((r, i) => expect(r.tokens).toEqual(greedyReference(prompts[i]!, 6)));
    // One step carried all four decodes: four sequences' evals were recorded together.
    const perStep = new Map<number, number>();
    for (const at of steps) perStep.set(at, (perStep.get(at) ?? 0) + 1);
    expect(Math.max(...perStep.values())).toBe(4);
    // Same prompt again: served from the prefix cache.
    await m.complete(prompts[2]!, { maxTokens: 2 });
    const s = m.metrics();
    expect(s.model).toBe('fake-batched');
    expect(s.requests).toBe(5);
    expect(s.generatedTokens).toBe(4 * 6 + 2);
    expect(s.timeToFirstToken.count).toBe(5);
    expect(s.interTokenLatency.count).toBe(4 * 5 + 1);
    expect(s.prefix.queriedTokens).toBe(prompts.reduce((n, p) => n + p.length, 0) + prompts[2]!.length);
    expect(s.prefix.hitTokens).toBe(prompts[2]!.length - 1);
    expect(s.kv.blocks).toMatchObject({ total: 64, used: 0 });
    expect(s.kv.blocks.cached + s.kv.blocks.free).toBe(64);
    expect(s.kv.maxBytes).toBe(64 * 16 * 4);
    expect(s.kv.highWaterBytes).toBeLessThanOrEqual(s.kv.maxBytes);
    expect(s.running + s.waiting).toBe(0);
    // Expert load is the pool's (the reference pool routes each computed token to expert t % 4).
    const computed = stats.evals.flat();
    expect(s.expertLoad).toEqual([[0, 1, 2, 3].map((e) => computed.filter((t) => t % 4 === e).length)]);
    const text = (await import('../lib/metrics/index.js')).toPrometheus();
    expect(text).toMatch(/sonde_llm_time_to_first_token_seconds_count\{model="fake-batched"\} 5/);
    expect(text).toMatch(/sonde_llm_kv_blocks\{model="fake-batched",state="used"\} 0/);
    expect(text).toMatch(/sonde_llm_expert_tokens_total\{model="fake-batched",layer="0",expert="1"\} \d+/);
    m.dispose();
    expect(m.metrics().requests).toBe(5);
    expect((await import('../lib/metrics/index.js')).toPrometheus()).not.toMatch(/model="fake-batched"/);
  });

  it.runIf(withPool)('seeded sampling per request: concurrent generations equal the same ones alone', async () => {
    const { m } = model({ delayMs: 1 });
    const opts = (seed: number) => ({ temperature: 30, topK: 0, topP: 1, minP: 0, maxTokens: 16, seed });
    const prompts = ['s', 't', 'u', 'v'].map((p) => m.tokenize(p));
    const alone: number[][] = [];
    for (const [i, p] of prompts.entries()) alone.push((await collect(m.generate(p, opts(i)))).tokens);
    const together = await Promise.all(prompts.map((p, i) => collect(m.generate(p, opts(i)))));
    together.forEach((r, i) => expect(r.tokens).toEqual(alone[i]));
    expect(new Set(alone.map((a) => a.join())).size).toBe(4);
  });

  it.runIf(withPool)('serving options: QueueFullError, a prompt that never fits the cache, typed option errors', async () => {
    const { engine } = fakeEngine(64, 2);
    // 4 blocks of 4 positions: 16 tokens in all.
    const m = LanguageModel.fromEngine(engine, fakeTokenizer(), { maxConcurrency: 1, maxQueue: 1, kvCache: { maxBytes: 4 * 4 * 4, blockSize: 4 } });
    const a = collect(m.generate('p', { maxTokens: 3 }));
    const b = collect(m.generate('q', { maxTokens: 3 }));
    await new Promise((r) => setTimeout(r, 0));
    await expect(m.complete('r', { maxTokens: 3 })).rejects.toThrow(QueueFullError);
    expect((await a).tokens).toEqual(SCRIPT_TOKENS.slice(0, 3));
    expect((await b).tokens).toEqual(SCRIPT_TOKENS.slice(0, 3));
    await expect(m.complete(Array.from({ length: 16 }, () => 0x61))).rejects.toThrow(OutOfMemoryError);
    await expect(m.logits(Array.from({ length: 16 }, () => 0x61))).rejects.toThrow(/more than the whole cache holds \(4 blocks/);
    const bad: [unknown, RegExp][] = [
      [{ kvCache: { maxBytes: 0 } }, /options\.kvCache\.maxBytes must be an integer/],
      [{ kvCache: { maxBytes: 8 } }, /kvCache\.maxBytes 8 is smaller than one KV block/],
      [{ kvCache: { dtype: 'f8' } }, /options\.kvCache\.dtype/],
      [{ kvCache: { blocksize: 8 } }, /did you mean 'blockSize'/],
      [{ kvCache: { prefixCaching: 1 } }, /options\.kvCache\.prefixCaching must be a boolean/],
      [{ maxConcurrency: 0 }, /options\.maxConcurrency must be an integer/],
      [{ prefillBudget: 1.5 }, /options\.prefillBudget must be an integer/],
      [{ maxQueue: -1 }, /options\.maxQueue must be an integer/],
      [{ name: '' }, /options\.name must be a non-empty string/],
    ];
    for (const [o, msg] of bad) expect(() => LanguageModel.fromEngine(fakeEngine().engine, fakeTokenizer(), o as never), String(msg)).toThrow(msg);
  });

  it('leaving a for-await early lets the next call in', async () => {
    const { m } = model();
    for await (const e of m.generate('p')) { void e; break; }
    expect(await m.complete('p', { maxTokens: 2 })).toBe('He');
  });

  it('validates options with typed errors at the call', () => {
    const { m } = model();
    const bad: [unknown, unknown, RegExp][] = [
      ['p', { maxToken: 3 }, /unknown option 'maxToken'; did you mean 'maxTokens'/],
      ['p', { temprature: 1 }, /did you mean 'temperature'/],
      ['p', { temperature: -1 }, /options\.temperature must be a finite number >= 0/],
      ['p', { topP: 0 }, /options\.topP must be a finite number in \(0, 1\]/],
      ['p', { topP: 1.5 }, /options\.topP/],
      ['p', { minP: 2 }, /options\.minP/],
      ['p', { topK: -3 }, /options\.topK/],
      ['p', { seed: 0.5 }, /options\.seed must be an integer/],
      ['p', { maxTokens: -1 }, /options\.maxTokens must be an integer/],
      ['p', { signal: {} }, /options\.signal must be an AbortSignal/],
      ['p', { parseSpecial: 1 }, /options\.parseSpecial must be a boolean/],
      [42, undefined, /prompt must be a string, an array of token ids or an array of chat messages, got 42/],
      [[1, VOCAB], undefined, /prompt\[1\] must be a token id in \[0, 261\]/],
      [[], undefined, /the prompt has no tokens/],
    ];
    for (const [prompt, opts, msg] of bad) {
      expect(() => m.generate(prompt as never, opts as never), String(msg)).toThrow(InvalidArgumentError);
      expect(() => m.generate(prompt as never, opts as never)).toThrow(msg);
    }
    expect(() => LanguageModel.fromEngine(fakeEngine().engine, fakeTokenizer(), { contextSize: 0 })).toThrow(/options\.contextSize must be an integer in \[1,/);
  });

  it('dispose is idempotent, frees the engine after the running call, and later calls throw DisposedError', async () => {
    const { m, stats } = model({ delayMs: 1 });
    const it1 = m.generate('p', { maxTokens: 50 });
    expect((await it1.next()).value).toEqual({ token: 0x48, text: 'H' });
    m.dispose();
    m.dispose();
    expect(m.disposed).toBe(true);
    expect(stats.disposed).toBe(false); // the generation still holds the model
    await expect(it1.next()).rejects.toThrow(DisposedError);
    await new Promise((r) => setTimeout(r, 0));
    expect(stats.disposed && stats.seqDisposed).toBe(true);
    expect(() => m.generate('p')).toThrow(DisposedError);
    expect(() => m.tokenize('p')).toThrow(DisposedError);
    await expect(m.logits([1])).rejects.toThrow(DisposedError);
  });
});

describe('LanguageModel with the GGUF tokenizer (fake engine)', () => {
  const v = bpeVocab();
  const template = '{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}' +
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';
  const eos = v.tokens.indexOf('<|endoftext|>');
  const tokenizer = Tokenizer.fromGguf({
    'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': 'qwen2', 'tokenizer.ggml.tokens': v.tokens,
    'tokenizer.ggml.token_type': v.types, 'tokenizer.ggml.merges': v.merges, 'tokenizer.ggml.eos_token_id': eos,
    'tokenizer.ggml.bos_token_id': eos, 'tokenizer.ggml.add_bos_token': false, 'tokenizer.chat_template': template,
  });
  const text = 'Hello world, 日本語 and 😀 the end';
  const script = [...tokenizer.encode(text, { addSpecial: false }), tokenizer.tokenId('<|im_end|>')!];
  const make = () => LanguageModel.fromEngine(fakeEngine(128, 0, tokenizer.vocabSize, script).engine, tokenizer);

  it('streams the text of byte-level BPE tokens, multi-byte characters whole, and stops at <|im_end|>', async () => {
    expect(eos).toBeGreaterThan(0);
    const m = make();
    const r = await collect(m.generate('Q:'));
    expect(r.tokens).toEqual(script.slice(0, -1));
    expect(r.text).toBe(text);
    for (const t of r.texts) expect(t).toBe(t.toWellFormed());
    expect(await m.complete('Q:', { stop: '日本' })).toBe('Hello world, ');
    expect(await m.complete('Q:', { stop: 'nd 😀' })).toBe('Hello world, 日本語 a');
  });

  it('renders chat messages with the chat template, control tokens parsed, no BOS (add_bos_token false)', async () => {
    const m = make();
    const messages = [{ role: 'user', content: 'hello' }];
    const { engine, stats } = fakeEngine(128, 0, tokenizer.vocabSize, script);
    const m2 = LanguageModel.fromEngine(engine, tokenizer);
    await collect(m2.generate(messages, { maxTokens: 1 }));
    const want = tokenizer.encode('<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n', { addSpecial: false, parseSpecial: true });
    expect(stats.evals[0]).toEqual(want);
    expect(want.filter((t) => t === tokenizer.tokenId('<|im_start|>')).length).toBe(2);
    expect(await m.complete(messages)).toBe(text);
  });
});
