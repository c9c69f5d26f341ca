// Chats on a LanguageModel (lib/llm/chat.ts over the scheduler's retained sequences), on a
// generated GGUF's tokenizer and identity with test/kv-reference.ts's pool: its logits are a
// function of the token ids read back through each block table, so a wrong table, a block
// restored with the wrong bytes or a shared block overwritten changes the greedy tokens. The
// reference for every reply is a direct evaluation of the whole rendered conversation.
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, ModelFormatError } from '../lib/errors.js';
import { configFromGguf } from '../lib/llm/arch.js';
import { renderChat } from '../lib/llm/chat.js';
import type { LlmEngine } from '../lib/llm/engine.js';
import { read } from '../lib/llm/gguf.js';
import { LanguageModel } from '../lib/llm/language-model.js';
import { Tokenizer } from '../lib/llm/tokenizer.js';
import { argmax, hashLogits, ReferenceKvPool, type LogitsFn } from './kv-reference.js';
import { fixtureDir, writeFixture } from './llm-fixtures.js';

const CHATML = '{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}'
  + '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';
const SYSTEM = 'You are the one in the west, and the sea is in the east.';

const dir = fixtureDir('sonde-chat-');
let pathA: string;
let pathB: string;
let pathC: string;
// Like templates that drop an earlier reply's reasoning: an assistant turn that is not the last
// message renders as a fixed summary.
const SUMMARY = '{% for m in messages %}<|im_start|>{{ m.role }}\n'
  + "{% if m.role == 'assistant' and not loop.last %}(replied){% else %}{{ m.content }}{% endif %}"
  + '<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';
beforeAll(async () => {
  pathA = join(dir, 'a.gguf');
  pathB = join(dir, 'b.gguf');
  pathC = join(dir, 'c.gguf');
  await writeFixture(pathC, { kind: 'qwen2', seed: 5, metadata: { 'tokenizer.chat_template': SUMMARY } });
  await writeFixture(pathA, { kind: 'qwen2', seed: 5, metadata: { 'tokenizer.chat_template': CHATML } });
  await writeFixture(pathB, { kind: 'qwen2', seed: 6, metadata: { 'tokenizer.chat_template': CHATML } });
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function fnv(tokens: readonly number[]): number {
  let h = 0x811c9dc5;
  for (const t of tokens) h = Math.imul(h ^ (t + 7), 0x01000193) >>> 0;
  return h;
}

/**
 * hashLogits with the winner moved to one of `words` (whole-word tokens): the replies then decode
 * to text that tokenises back to the same tokens, so the next turn can reuse all of them.
 */
function wordLogits(vocab: number, words: readonly number[]): LogitsFn {
  const base = hashLogits(vocab);
  return (prefix) => {
    const out = base(prefix);
    out[words[fnv(prefix) % words.length]!]! += 8;
    return out;
  };
}

interface Loaded {
  model: LanguageModel;
  tokenizer: Tokenizer;
  logits: LogitsFn;
  pool(): ReferenceKvPool;
}

async function load(path: string, o: { blockSize?: number; maxBlocks?: number; contextSize?: number; paged?: boolean } = {}): Promise<Loaded> {
  const file = await read(path);
  const config = configFromGguf(file);
  const tokenizer = Tokenizer.fromGguf(file.metadata);
  const words = [' the', ' is', ' a', ' w', ' o', ' b'].map((w) => tokenizer.encode(w, { addSpecial: false })).filter((t) => t.length === 1).map((t) => t[0]!);
  expect(words.length).toBeGreaterThanOrEqual(3);
  const logits = wordLogits(config.vocabSize, words);
  const pools: ReferenceKvPool[] = [];
  const engine: LlmEngine = {
    config,
    file,
    // The single-sequence path, a contiguous cache over the same logits function.
    createSequence(contextSize) {
      const cache: number[] = [];
      return {
        get length() { return cache.length; },
        contextSize,
        async eval(tokens, e = {}) {
          const rows: Float32Array[] = [];
          for (const t of tokens) {
            cache.push(t);
            rows.push(logits(cache));
          }
          if (!e.allLogits) return rows[rows.length - 1]!;
          const all = new Float32Array(rows.length * config.vocabSize);
          rows.forEach((r, i) => all.set(r, i * config.vocabSize));
          return all;
        },
        truncate(n) { cache.length = n; },
        dispose() {},
      };
    },
    createKvPool(p) {
      const pool = new ReferenceKvPool({ maxBlocks: p.maxBlocks, blockSize: p.blockSize ?? 16, vocab: config.vocabSize, logits });
      pools.push(pool);
      return pool;
    },
    dispose() { file.dispose(); },
  };
  // An engine from before the paged pool (LanguageModel still serves it on one sequence).
  if (o.paged === false) delete (engine as Partial<LlmEngine>).createKvPool;
  const blockSize = o.blockSize ?? 4;
  // The reference pool stores one int per position: blockSize * 4 bytes a block.
  const model = LanguageModel.fromEngine(engine, tokenizer, {
    contextSize: o.contextSize ?? 256, kvCache: { maxBytes: (o.maxBlocks ?? 256) * blockSize * 4, blockSize },
  });
  return { model, tokenizer, logits, pool: () => pools[pools.length - 1]! };
}

/** Greedy tokens after `prompt`, evaluated directly from the logits function. */
function greedy(fn: LogitsFn, prompt: readonly number[], count: number): number[] {
  const seq = prompt.slice();
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    const t = argmax(fn(seq));
    out.push(t);
    seq.push(t);
  }
  return out;
}

async function tokensOf(it: AsyncIterable<{ token: number; text: string }>): Promise<{ tokens: number[]; text: string }> {
  const tokens: number[] = [];
  let text = '';
  for await (const e of it) {
    tokens.push(e.token);
    text += e.text;
  }
  return { tokens, text };
}

const GREEDY = { temperature: 0, maxTokens: 6 } as const;

describe('chat turns', () => {
  it('the second turn computes only the tokens after the first turn\'s cache; each reply equals greedy decoding of the rendered conversation', async () => {
    const { model, tokenizer, logits } = await load(pathA);
    try {
      const chat = model.chat({ system: SYSTEM, ...GREEDY });
      const m1 = [{ role: 'system', content: SYSTEM }, { role: 'user', content: 'hello' }];
      const prompt1 = renderChat(tokenizer, m1);
      const r1 = await tokensOf(chat.send('hello'));
      expect(r1.tokens).toEqual(greedy(logits, prompt1, 6));
      expect(chat.messages).toEqual([...m1, { role: 'assistant', content: r1.text }]);
      // The cache: the prompt and every reply token but the last (sampled, never fed back).
      expect(chat.cachedTokens).toBe(prompt1.length + 5);

      const before = model.metrics().promptTokens;
      const reply2 = chat.send('and then?');
      const r2 = await tokensOf(reply2);
      const prompt2 = renderChat(tokenizer, [...m1, { role: 'assistant', content: r1.text }, { role: 'user', content: 'and then?' }]);
      expect(prompt2.slice(0, prompt1.length + 5)).toEqual([...prompt1, ...r1.tokens.slice(0, 5)]);
      expect(model.metrics().promptTokens - before).toBe(prompt2.length - (prompt1.length + 5));
      expect(r2.tokens).toEqual(greedy(logits, prompt2, 6));
      // The same as generate() on the whole rendered conversation.
      expect((await tokensOf(model.generate(prompt2, GREEDY))).tokens).toEqual(r2.tokens);
      expect(chat.messages.map((m) => m.role)).toEqual(['system', 'user', 'assistant', 'user', 'assistant']);
      chat.dispose();
      expect(model.metrics().kv.blocks.used).toBe(0);
    } finally {
      model.dispose();
    }
  });

  it('a template that re-renders an earlier turn differently: recomputed from the first difference, reply still exact', async () => {
    const { model, tokenizer, logits } = await load(pathC);
    try {
      const chat = model.chat({ ...GREEDY });
      const r1 = await tokensOf(chat.send('hello'));
      const prompt1 = renderChat(tokenizer, [{ role: 'user', content: 'hello' }]);
      const before = model.metrics().promptTokens;
      const r2 = await tokensOf(chat.send('and then?'));
      // The template summarises an earlier reply: everything after the first prompt differs.
      const prompt2 = renderChat(tokenizer, [{ role: 'user', content: 'hello' }, { role: 'assistant', content: r1.text }, { role: 'user', content: 'and then?' }]);
      expect(prompt2.slice(0, prompt1.length)).toEqual(prompt1);
      expect(prompt2[prompt1.length]).not.toBe(r1.tokens[0]);
      expect(model.metrics().promptTokens - before).toBe(prompt2.length - prompt1.length);
      expect(r2.tokens).toEqual(greedy(logits, prompt2, 6));
      chat.dispose();
      expect(model.metrics().kv.blocks.used).toBe(0);
    } finally {
      model.dispose();
    }
  });

  it('two chats with the same system prompt share its blocks', async () => {
    const { model, tokenizer, pool } = await load(pathA);
    try {
      const a = model.chat({ system: SYSTEM, ...GREEDY });
      const b = model.chat({ system: SYSTEM, ...GREEDY });
      await tokensOf(a.send('hello'));
      const stepsBefore = pool().steps.length;
      const hitsBefore = model.metrics().prefix.hitTokens;
      await tokensOf(b.send('the sea'));
      const system = renderChat(tokenizer, [{ role: 'system', content: SYSTEM }, { role: 'user', content: 'hello' }]);
      const other = renderChat(tokenizer, [{ role: 'system', content: SYSTEM }, { role: 'user', content: 'the sea' }]);
      let common = 0;
      while (system[common] === other[common]) common++;
      const shared = Math.floor(common / 4);
      expect(shared).toBeGreaterThanOrEqual(3);
      // b's first step starts after the shared full blocks, and reads them through a's block ids.
      const first = pool().steps[stepsBefore]!.sequences[0]!;
      const aTable = pool().steps[0]!.sequences[0]!.table;
      expect(first.start).toBeGreaterThanOrEqual(shared * 4);
      expect(first.table.slice(0, shared)).toEqual(aTable.slice(0, shared));
      expect(model.metrics().prefix.hitTokens - hitsBefore).toBeGreaterThanOrEqual(shared * 4);
      a.dispose();
      b.dispose();
      expect(model.metrics().kv.blocks.used).toBe(0);
    } finally {
      model.dispose();
    }
  });
});

describe('chat context overflow', () => {
  it("'error' names the sizes and leaves the conversation as it was", async () => {
    const { model } = await load(pathA, { contextSize: 48 });
    try {
      const chat = model.chat({ contextOverflow: 'error', temperature: 0, maxTokens: 4 });
      await tokensOf(chat.send('hi'));
      const messages = chat.messages;
      const cached = chat.cachedTokens;
      await expect(tokensOf(chat.send('the sea is in the west and the sea is in the east'))).rejects.toThrow(/more than the context of 48 tokens/);
      expect(chat.messages).toEqual(messages);
      expect(chat.cachedTokens).toBe(cached);
      chat.dispose();
    } finally {
      model.dispose();
    }
  });

  it("'drop-oldest' drops whole turns, keeps the system message, and replies exactly", async () => {
    const { model, tokenizer, logits } = await load(pathA, { contextSize: 64 });
    try {
      const chat = model.chat({ system: 'Be brief.', contextOverflow: 'drop-oldest', temperature: 0, maxTokens: 4 });
      for (const m of ['hello', 'the sea', 'and the west']) await tokensOf(chat.send(m));
      const r = await tokensOf(chat.send('in the east'));
      const messages = chat.messages;
      expect(messages[0]).toEqual({ role: 'system', content: 'Be brief.' });
      expect(messages.length).toBeLessThan(9);
      expect(messages.slice(-2).map((m) => m.role)).toEqual(['user', 'assistant']);
      expect(messages[1]!.role).toBe('user');
      const prompt = renderChat(tokenizer, messages.slice(0, -1));
      expect(prompt.length + 4).toBeLessThanOrEqual(64);
      expect(r.tokens).toEqual(greedy(logits, prompt, 4));
      chat.dispose();
    } finally {
      model.dispose();
    }
  });
});

describe('chat lifetime', () => {
  it('an aborted reply leaves messages and cache as before; an early close keeps what was read', async () => {
    const { model, tokenizer, logits } = await load(pathA);
    try {
      const chat = model.chat({ temperature: 0, maxTokens: 6 });
      await tokensOf(chat.send('hello'));
      const messages = chat.messages;
      const cached = chat.cachedTokens;
      const ac = new AbortController();
      const it = chat.send('the sea', { signal: ac.signal });
      await it.next();
      ac.abort();
      await expect(tokensOf(it)).rejects.toThrow(/aborted/);
      expect(chat.messages).toEqual(messages);
      expect(chat.cachedTokens).toBe(cached);
      // Early close: the reply is the text read.
      let read = '';
      for await (const e of chat.send('the sea')) {
        read += e.text;
        break;
      }
      expect(chat.messages.slice(-1)).toEqual([{ role: 'assistant', content: read }]);
      // And the chat goes on exactly.
      const r = await tokensOf(chat.send('in'));
      expect(r.tokens).toEqual(greedy(logits, renderChat(tokenizer, chat.messages.slice(0, -1)), 6));
      chat.dispose();
      expect(model.metrics().kv.blocks.used).toBe(0);
    } finally {
      model.dispose();
    }
  });

  it('one reply at a time; text() gives the whole reply; disposed chats and models throw', async () => {
    const { model } = await load(pathA);
    try {
      const chat = model.chat({ temperature: 0, maxTokens: 5 });
      const first = chat.send('hello');
      const e = await first.next();
      expect(() => chat.send('again')).toThrow(/previous reply is still streaming/);
      const all = await first.text();
      expect(all.startsWith((e.value as { text: string }).text)).toBe(true);
      expect(chat.messages.slice(-1)).toEqual([{ role: 'assistant', content: all }]);
      expect(await chat.send('more').text()).toBe(chat.messages.slice(-1)[0]!.content);
      expect(() => chat.send(42 as never)).toThrow(InvalidArgumentError);
      expect(() => chat.send('x', { temprature: 1 } as never)).toThrow(/did you mean 'temperature'/);
      expect(() => chat.send('x', { maxTokens: -1 })).toThrow(/options.maxTokens must be an integer/);
      expect(() => chat.send('x', { replyReserve: 1e9 })).toThrow(/options.replyReserve must be an integer/);
      expect(() => chat.send('x', { signal: 'no' as never })).toThrow(/options.signal must be an AbortSignal/);
      expect(() => model.chat({ contextOverflow: 'drop' as never })).toThrow(/contextOverflow must be one of 'error', 'drop-oldest'/);
      expect(() => model.chat({ topP: 2 })).toThrow(/topP/);
      chat.dispose();
      chat.dispose();
      expect(() => chat.send('x')).toThrow(DisposedError);
      const serial = await load(pathA, { paged: false });
      expect(await serial.model.complete([0x61], { temperature: 0, maxTokens: 3 })).toBe(await model.complete([0x61], { temperature: 0, maxTokens: 3 }));
      expect(() => serial.model.chat()).toThrow(/chats need an engine with a paged KV pool/);
      await expect(serial.model.restoreChat('x.kv')).rejects.toThrow(InvalidArgumentError);
      serial.model.dispose();
      const live = model.chat();
      model.dispose();
      expect(() => model.chat()).toThrow(DisposedError);
      await expect(tokensOf(live.send('x'))).rejects.toThrow(DisposedError);
    } finally {
      model.dispose();
    }
  });
});

describe('chat save and restore', () => {
  it('a restored chat holds the same KV bytes and replies as the saved one would, computing only the new message', async () => {
    const a = await load(pathA);
    const b = await load(pathA);
    const file = join(dir, 'chat.kv');
    try {
      const chat = a.model.chat({ system: SYSTEM, temperature: 0, maxTokens: 6 });
      await tokensOf(chat.send('hello'));
      await tokensOf(chat.send('the sea'));
      await chat.save(file);
      const restored = await b.model.restoreChat(file);
      expect(restored.messages).toEqual(chat.messages);
      expect(restored.cachedTokens).toBe(chat.cachedTokens);
      // Saved again, the restored chat writes the same bytes: same identity, tokens, messages and blocks.
      const again = join(dir, 'chat-again.kv');
      await restored.save(again);
      expect(readFileSync(again)).toEqual(readFileSync(file));
      // A fresh model: nothing cached but what the file brought; the next turn computes only its new tokens.
      const cached = restored.cachedTokens;
      const before = b.model.metrics().promptTokens;
      const x = await tokensOf(chat.send('and the west'));
      const y = await tokensOf(restored.send('and the west'));
      expect(y.tokens).toEqual(x.tokens);
      const prompt = renderChat(b.tokenizer, restored.messages.slice(0, -1));
      expect(y.tokens).toEqual(greedy(b.logits, prompt, 6));
      expect(b.model.metrics().promptTokens - before).toBe(prompt.length - cached);
      restored.dispose();
      chat.dispose();
      expect(b.model.metrics().kv.blocks.used).toBe(0);
    } finally {
      a.model.dispose();
      b.model.dispose();
    }
  });

  it('a chat saved before its first turn restores to its system message and an empty cache', async () => {
    const { model, tokenizer, logits } = await load(pathA);
    const file = join(dir, 'empty.kv');
    try {
      const chat = model.chat({ system: SYSTEM, temperature: 0, maxTokens: 3 });
      await chat.save(file);
      const back = await model.restoreChat(file, { maxTokens: 5 });
      expect(back.messages).toEqual([{ role: 'system', content: SYSTEM }]);
      expect(back.cachedTokens).toBe(0);
      // The saved options come back, the ones given to restoreChat win.
      const r = await tokensOf(back.send('hello'));
      expect(r.tokens).toEqual(greedy(logits, renderChat(tokenizer, [{ role: 'system', content: SYSTEM }, { role: 'user', content: 'hello' }]), 5));
      await expect(chat.save('')).rejects.toThrow(/path must be a non-empty string/);
      await expect(model.restoreChat(file, { contextOverflow: 'never' as never })).rejects.toThrow(/contextOverflow/);
      chat.dispose();
      back.dispose();
    } finally {
      model.dispose();
    }
  });

  it('refuses a corrupted file, a truncated one, another model\'s and another block size, leaking no blocks', async () => {
    const a = await load(pathA);
    const other = await load(pathB);
    const blocks8 = await load(pathA, { blockSize: 8 });
    const file = join(dir, 'refuse.kv');
    try {
      const chat = a.model.chat({ temperature: 0, maxTokens: 4 });
      await tokensOf(chat.send('hello'));
      await chat.save(file);
      const used = [a, other, blocks8].map((m) => m.model.metrics().kv.blocks.used);
      const good = readFileSync(file);
      const corrupt = join(dir, 'corrupt.kv');
      const bad = Buffer.from(good);
      bad[Math.floor(bad.length / 2)]! ^= 0x10;
      writeFileSync(corrupt, bad);
      await expect(a.model.restoreChat(corrupt)).rejects.toThrow(ModelFormatError);
      await expect(a.model.restoreChat(corrupt)).rejects.toThrow(/checksum mismatch/);
      const truncated = join(dir, 'truncated.kv');
      writeFileSync(truncated, good.subarray(0, good.length - 1));
      await expect(a.model.restoreChat(truncated)).rejects.toThrow(/truncated/);
      await expect(other.model.restoreChat(file)).rejects.toThrow(InvalidArgumentError);
      await expect(other.model.restoreChat(file)).rejects.toThrow(/saved by another model/);
      await expect(blocks8.model.restoreChat(file)).rejects.toThrow(/block size 4, this model's pool uses 8/);
      await expect(a.model.restoreChat(join(dir, 'missing.kv'))).rejects.toThrow(InvalidArgumentError);
      expect([a, other, blocks8].map((m) => m.model.metrics().kv.blocks.used)).toEqual(used);
      chat.dispose();
      expect(a.model.metrics().kv.blocks.used).toBe(0);
    } finally {
      a.model.dispose();
      other.model.dispose();
      blocks8.model.dispose();
    }
  });
});
