/**
 * LanguageModel end to end on generated GGUF models (test/llm-fixtures.ts) against llama.cpp
 * (node-llama-cpp): greedy generations of 32 tokens are identical; stop strings, maxTokens, abort
 * and a prompt longer than the context on the real engine.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { getLlama, type Llama } from 'node-llama-cpp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AbortError, DeviceUnavailableError, InvalidArgumentError, ModelFormatError } from '../lib/errors.js';
import { read } from '../lib/llm/gguf.js';
import { LanguageModel } from '../lib/llm/language-model.js';
import { Tokenizer } from '../lib/llm/tokenizer.js';
import { fixtureDir, llamaCppLogProbs, logSoftmax, tokenSequence, writeFixture, type FixtureOptions } from './llm-fixtures.js';

const dir = fixtureDir('sonde-lm-');
let llama: Llama;
beforeAll(async () => { llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never }); });

interface Penalties { penalty: number; lastN: number; frequencyPenalty: number; presencePenalty: number }

/** llama.cpp's greedy continuation (it stops at an end-of-generation token and does not yield it). */
async function llamaGreedy(path: string, prompt: number[], n: number, penalties?: Penalties): Promise<number[]> {
  const model = await llama.loadModel({ modelPath: path });
  // f32 KV cache and no flash attention: the arithmetic sonde does. One thread: llama.cpp's
  // spinning workers crawl on a machine whose cores are busy.
  const ctx = await model.createContext({
    contextSize: 256, sequences: 1, threads: 1, flashAttention: false,
    experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
  } as never);
  try {
    const out: number[] = [];
    // The penalised window is the last lastN tokens of prompt + output, as sonde's repeatLastN.
    const history = prompt.slice();
    const repeatPenalty = penalties && {
      punishTokens: () => history.slice(-penalties.lastN), maxPunishTokens: penalties.lastN, penalty: penalties.penalty,
      frequencyPenalty: penalties.frequencyPenalty, presencePenalty: penalties.presencePenalty,
    };
    for await (const t of ctx.getSequence().evaluate(prompt as never, { temperature: 0, ...(repeatPenalty ? { repeatPenalty } : {}) } as never)) {
      history.push(t as number);
      out.push(t as number);
      if (out.length === n) break;
    }
    return out;
  } finally {
    await ctx.dispose();
    await model.dispose();
  }
}

async function tokensOf(it: AsyncIterable<{ token: number; text: string }>) {
  const tokens: number[] = [];
  let text = '';
  for await (const e of it) { tokens.push(e.token); text += e.text; }
  return { tokens, text };
}

const CASES: [string, FixtureOptions][] = [
  ['llama f32 (SentencePiece)', { kind: 'llama', type: 'f32', seed: 11 }],
  ['qwen2 q8_0 (byte-level BPE)', { kind: 'qwen2', type: 'q8_0', seed: 12 }],
  ['llama f16', { kind: 'llama', type: 'f16', seed: 13 }],
  ['qwen2 q4_0', { kind: 'qwen2', type: 'q4_0', seed: 14 }],
  // Quantised MoE is left out here: a Mixtral q8_0 fixture (seed 17) gives sonde and llama.cpp
  // log-probabilities 0.8 apart on some prompts (a discrete routing difference; f32 agrees), which
  // is a forward-pass question for test/llm-forward.test.ts, not one of the generation loop.
  ['mixtral f32 (4 experts, top 2)', { kind: 'mixtral', type: 'f32', seed: 15 }],
  ['qwen2moe f16 (shared expert)', { kind: 'qwen2moe', type: 'f16', seed: 16 }],
];

describe.each(CASES)('%s', (label, fixture) => {
  const path = join(dir, `${label.replace(/\W+/g, '-')}.gguf`);
  let model: LanguageModel;
  let tokenizer: Tokenizer;
  let info: Awaited<ReturnType<typeof writeFixture>>;
  beforeAll(async () => {
    info = await writeFixture(path, fixture);
    model = await LanguageModel.load(path, { contextSize: 128 });
    const file = await read(path);
    tokenizer = Tokenizer.fromGguf(file.metadata);
    file.dispose();
  });
  afterAll(() => model?.dispose());

  it('info describes the file', () => {
    expect(model.info).toMatchObject({
      architecture: info.architecture, contextSize: 128, vocabSize: info.vocabSize, embeddingLength: info.embedding,
      blockCount: info.layers, headCount: info.heads, headCountKv: info.kvHeads, expertCount: info.experts,
    });
    expect(model.info.quantizationTypes[0]).toBe(fixture.type);
    expect(model.info.activeParameterCount).toBeLessThanOrEqual(model.info.parameterCount);
  });

  it('greedy generation of 32 tokens equals llama.cpp\'s', async () => {
    for (const text of ['Once upon a time', 'the cat sat on the']) {
      const prompt = model.tokenize(text);
      const want = await llamaGreedy(path, prompt, 32);
      const got = await tokensOf(model.generate(prompt, { maxTokens: 32, temperature: 0 }));
      expect(got.tokens, text).toEqual(want);
      // Streamed pieces: no leading-space strip or space clean-up, as llama.cpp's token_to_piece.
      expect(got.text).toBe(tokenizer.decode(got.tokens, { cleanUpSpaces: false, stripLeadingSpace: false }));
    }
  });

  it('greedy generation with repetition, frequency and presence penalties equals llama.cpp\'s', async () => {
    const prompt = model.tokenize('the cat sat on the');
    const plain = (await tokensOf(model.generate(prompt, { maxTokens: 32, temperature: 0 }))).tokens;
    for (const p of [{ penalty: 1.5, lastN: 16, frequencyPenalty: 0, presencePenalty: 0 },
      { penalty: 1.2, lastN: 64, frequencyPenalty: 0.3, presencePenalty: 0.2 },
      { penalty: 1, lastN: 64, frequencyPenalty: 1, presencePenalty: 0 }]) {
      const want = await llamaGreedy(path, prompt, 32, p);
      const got = await tokensOf(model.generate(prompt, {
        maxTokens: 32, temperature: 0, repeatPenalty: p.penalty, repeatLastN: p.lastN,
        frequencyPenalty: p.frequencyPenalty, presencePenalty: p.presencePenalty,
      }));
      expect(got.tokens, JSON.stringify(p)).toEqual(want);
      expect(got.tokens).not.toEqual(plain); // the penalties changed the outcome
    }
  });

  it('sampling with a seed is reproducible', async () => {
    const prompt = model.tokenize('Once upon a time');
    const opts = { maxTokens: 24, temperature: 1.5, topK: 0, topP: 1, minP: 0 };
    const a = (await tokensOf(model.generate(prompt, { ...opts, seed: 77 }))).tokens;
    const b = (await tokensOf(model.generate(prompt, { ...opts, seed: 77 }))).tokens;
    const c = (await tokensOf(model.generate(prompt, { ...opts, seed: 78 }))).tokens;
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    for (const t of a) expect(t >= 0 && t < model.info.vocabSize).toBe(true);
  });

  it('maxTokens, stop strings, stop tokens', async () => {
    const prompt = model.tokenize('Once upon a time');
    const full = await tokensOf(model.generate(prompt, { maxTokens: 32, temperature: 0 }));
    for (const n of [1, 7]) {
      expect((await tokensOf(model.generate(prompt, { maxTokens: n, temperature: 0 }))).tokens).toEqual(full.tokens.slice(0, n));
    }
    // A stop string taken from the middle of the generated text.
    const mid = Math.floor(full.text.length / 2);
    const stop = full.text.slice(mid, mid + 3);
    if (stop.length === 3) {
      const cut = await model.complete(prompt, { maxTokens: 32, temperature: 0, stop });
      expect(cut).toBe(full.text.slice(0, full.text.indexOf(stop)));
    }
    const at = 5;
    const byToken = await tokensOf(model.generate(prompt, { maxTokens: 32, temperature: 0, stop: full.tokens[at]! }));
    expect(byToken.tokens).toEqual(full.tokens.slice(0, full.tokens.indexOf(full.tokens[at]!)));
  });

  it('abort mid-generation ends with AbortError and the model stays usable', async () => {
    const prompt = model.tokenize('the cat sat on the');
    const want = await tokensOf(model.generate(prompt, { maxTokens: 16, temperature: 0 }));
    const ac = new AbortController();
    let n = 0;
    const run = async () => {
      for await (const e of model.generate(model.tokenize('Once upon'), { maxTokens: 64, temperature: 0, signal: ac.signal })) {
        void e;
        if (++n === 3) ac.abort();
      }
    };
    await expect(run()).rejects.toThrow(AbortError);
    expect(n).toBe(3);
    expect((await tokensOf(model.generate(prompt, { maxTokens: 16, temperature: 0 }))).tokens).toEqual(want.tokens);
  });

  it('expert counts: every evaluated token goes to k experts in every layer (dense: none)', async () => {
    const before = model.expertCounts()?.slice();
    if (info.experts === 0) {
      expect(before).toBeUndefined();
      return;
    }
    expect(before!.length).toBe(info.layers * info.experts);
    const tokens = model.tokenize('the cat sat on the mat');
    await model.logits(tokens);
    const after = model.expertCounts()!;
    const sum = (a: Float64Array) => a.reduce((s, v) => s + v, 0);
    expect(sum(after) - sum(before!)).toBe(tokens.length * info.layers * info.expertsUsed);
    for (let l = 0; l < info.layers; l++) {
      let layer = 0;
      for (let e = 0; e < info.experts; e++) layer += after[l * info.experts + e]! - before![l * info.experts + e]!;
      expect(layer).toBe(tokens.length * info.expertsUsed);
    }
  });

  it('logits rows agree with the greedy choices', async () => {
    const prompt = model.tokenize('Once upon a time');
    const gen = (await tokensOf(model.generate(prompt, { maxTokens: 8, temperature: 0 }))).tokens;
    const all = [...prompt, ...gen];
    const l = await model.logits(all);
    const v = model.info.vocabSize;
    for (let i = 0; i < gen.length - 1; i++) {
      const row = l.subarray((prompt.length + i) * v, (prompt.length + i + 1) * v);
      let best = 0;
      for (let j = 1; j < v; j++) if (row[j]! > row[best]!) best = j;
      expect(best).toBe(gen[i + 1]);
    }
  });
});

describe('chat messages', () => {
  it('are rendered with tokenizer.chat_template (control tokens parsed) and generate like llama.cpp on those tokens', async () => {
    const path = join(dir, 'chat.gguf');
    const template = '{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}' +
      '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';
    await writeFixture(path, { kind: 'qwen2', seed: 21, metadata: { 'tokenizer.chat_template': template } });
    const model = await LanguageModel.load(path, { contextSize: 128 });
    try {
      const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'hello world' }];
      const rendered = '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n';
      const tokens = model.tokenize(rendered, { addSpecial: false, parseSpecial: true });
      const imStart = model.tokenize('<|im_start|>', { addSpecial: false, parseSpecial: true });
      expect(imStart.length).toBe(1);
      expect(tokens.filter((t) => t === imStart[0]).length).toBe(3);
      const got = await tokensOf(model.generate(messages, { maxTokens: 16, temperature: 0 }));
      expect(got.tokens).toEqual(await llamaGreedy(path, tokens, 16));
    } finally {
      model.dispose();
    }
  });
});

describe('LanguageModel.load', () => {
  // RoPE positions past the trained range are out of the model's distribution, but computable, and
  // llama.cpp runs them when asked: a contextSize beyond the trained length is the user's call.
  // (Before, the pool's steps refused positions past the trained length: generation failed there.)
  it('a contextSize past the trained context length runs there, as llama.cpp does', async () => {
    const path = join(dir, 'short-trained.gguf');
    const info = await writeFixture(path, { kind: 'llama', type: 'f32', contextLength: 32, seed: 4 });
    const tokens = tokenSequence(60, info.vocabSize, 5, [info.eosId]);
    const model = await LanguageModel.load(path, { contextSize: 64 });
    try {
      expect(model.info.contextLength).toBe(32);
      expect(model.contextSize).toBe(64);
      const logits = await model.logits(tokens);
      const want = await llamaCppLogProbs(llama, path, tokens, info.vocabSize, { threads: 1 });
      let worst = 0;
      for (let i = 0; i < tokens.length; i++) {
        const got = logSoftmax(logits.subarray(i * info.vocabSize, (i + 1) * info.vocabSize));
        for (let t = 0; t < info.vocabSize; t++) if (want[i]![t]! > -20) worst = Math.max(worst, Math.abs(got[t]! - want[i]![t]!));
      }
      expect(worst).toBeLessThan(1e-3);
      // Generation runs past position 32 to the end of the context.
      const out = (await tokensOf(model.generate(tokens.slice(0, 20), { temperature: 0, stop: [], maxTokens: 40 }))).tokens;
      expect(out.length).toBeGreaterThan(12);
    } finally {
      model.dispose();
    }
  });

  it('a prompt longer than the context is an InvalidArgumentError naming both sizes', async () => {
    const path = join(dir, 'small-context.gguf');
    await writeFixture(path, { kind: 'llama', seed: 3 });
    const model = await LanguageModel.load(path, { contextSize: 16 });
    try {
      const long = Array.from({ length: 17 }, (_, i) => 3 + 0x61 + (i % 26)); // byte tokens of a..z
      expect(() => model.generate(long)).toThrow(InvalidArgumentError);
      expect(() => model.generate(long)).toThrow(/17 tokens, longer than the context of 16 tokens/);
      // One that fits generates until the context is full.
      const fits = (await tokensOf(model.generate(long.slice(0, 12), { temperature: 0, stop: [] }))).tokens;
      expect(fits.length).toBeLessThanOrEqual(5);
    } finally {
      model.dispose();
    }
  });

  it('rejects bad arguments with typed errors', async () => {
    await expect(LanguageModel.load(42 as never)).rejects.toThrow(/path must be a non-empty string/);
    await expect(LanguageModel.load('x.gguf', { contextSise: 5 } as never)).rejects.toThrow(/did you mean 'contextSize'/);
    await expect(LanguageModel.load('x.gguf', { contextSize: 0 })).rejects.toThrow(/options\.contextSize must be an integer/);
    await expect(LanguageModel.load('x.gguf', { threads: 0 })).rejects.toThrow(/options\.threads must be an integer/);
    await expect(LanguageModel.load('x.gguf', { device: 'gpu' as never })).rejects.toThrow(/options\.device must be/);
    // No CUDA device, or one that language models do not use yet: either way the device is unavailable.
    const path = join(dir, 'device.gguf');
    await writeFixture(path, { kind: 'llama', seed: 4 });
    await expect(LanguageModel.load(path, { device: 'cuda' })).rejects.toThrow(DeviceUnavailableError);
    const cpu = await LanguageModel.load(path, { device: 'cpu' });
    cpu.dispose();
    const notGguf = join(dir, 'not.gguf');
    writeFileSync(notGguf, 'this is not a model');
    await expect(LanguageModel.load(notGguf)).rejects.toThrow(ModelFormatError);
    await expect(LanguageModel.load(join(dir, 'missing.gguf'))).rejects.toThrow(/missing\.gguf/);
    // A vocabulary that does not match the embedding.
    const short = join(dir, 'short-vocab.gguf');
    await writeFixture(short, { kind: 'llama', seed: 5 });
    const f = await read(short);
    const tokens = (f.metadata['tokenizer.ggml.tokens'] as string[]).slice(0, -1);
    f.dispose();
    await writeFixture(short, {
      kind: 'llama', seed: 5, metadata: {
        'tokenizer.ggml.tokens': tokens,
        'tokenizer.ggml.scores': tokens.map(() => 0),
        'tokenizer.ggml.token_type': tokens.map((_, i) => (i === 0 ? 2 : i < 3 ? 3 : 1)),
      },
    });
    await expect(LanguageModel.load(short)).rejects.toThrow(/the tokenizer has \d+ tokens but the model.s embedding has \d+ rows/);
    // A layer count far beyond the file's tensors is an error, not a heap exhausted listing them.
    const deep = join(dir, 'deep.gguf');
    await writeFixture(deep, { kind: 'llama', seed: 6, metadata: { 'llama.block_count': 3670020 } });
    await expect(LanguageModel.load(deep)).rejects.toThrow(/'llama.block_count' is 3670020, but the file holds only \d+ tensors/);
  });

  it('random corruption of the header and metadata: every load and generation resolves or rejects with a typed error', async () => {
    const path = join(dir, 'fuzz-base.gguf');
    await writeFixture(path, { kind: 'llama', seed: 7 });
    const base = readFileSync(path);
    let seed = 2024;
    const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed; };
    const outcomes = { ran: 0, rejected: 0 };
    for (let trial = 0; trial < 120; trial++) {
      const b = Buffer.from(base);
      const span = trial % 2 ? 512 : Math.min(b.length, 16384);
      for (let flips = 1 + (rnd() % 4); flips > 0; flips--) b[rnd() % span] = rnd() & 255;
      const fuzz = join(dir, 'fuzz.gguf');
      writeFileSync(fuzz, trial % 5 === 4 ? b.subarray(0, rnd() % b.length) : b);
      try {
        const model = await LanguageModel.load(fuzz, trial % 3 ? { contextSize: 32 } : {});
        try {
          await tokensOf(model.generate([3 + 0x61, 3 + 0x62], { maxTokens: 2, temperature: 0 }));
        } finally {
          model.dispose();
        }
        outcomes.ran++;
      } catch (e) {
        expect([ModelFormatError, InvalidArgumentError].some((c) => e instanceof c), String(e)).toBe(true);
        outcomes.rejected++;
      }
    }
    // Both outcomes occur: the corruption reaches the checks, and not every flip is fatal.
    expect(outcomes.ran).toBeGreaterThan(0);
    expect(outcomes.rejected).toBeGreaterThan(0);
  });
});

