// Chats end to end on the real engine's paged KV pool, with generated GGUFs (test/llm-fixtures.ts):
// the second turn computes only the tokens after the chat's cache (model.metrics().promptTokens),
// replies equal greedy decoding of the whole rendered conversation by the single-sequence engine
// path, two chats share the system prompt's blocks (prefix hit tokens), and a saved chat restored
// into a fresh model holds byte-identical KV blocks and replies the same, while corrupted and
// foreign files are refused. Skipped while the engine has no createKvPool.
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, ModelFormatError } from '../lib/errors.js';
import { commonPrefixLength, renderChat } from '../lib/llm/chat.js';
import { decodeKvState } from '../lib/llm/kv/state.js';
import type { LlmEngine } from '../lib/llm/engine.js';
import { LanguageModel } from '../lib/llm/language-model.js';
import { Tokenizer } from '../lib/llm/tokenizer.js';
import { loadTransformer } from '../lib/llm/transformer.js';
import { argmax } from './kv-reference.js';
import { fixtureDir, writeFixture, type FixtureOptions } from './llm-fixtures.js';

const CHATML = '{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}'
  + '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';
const SYSTEM = 'You are the one in the west, and the sea is in the east. Be brief.';
const CASES: [string, FixtureOptions][] = [
  ['qwen2 f32', { kind: 'qwen2', type: 'f32', seed: 31 }],
  ['qwen2moe q8_0', { kind: 'qwen2moe', type: 'q8_0', seed: 32 }],
];
const dir = fixtureDir('sonde-chat-engine-');
let pooled = false;
beforeAll(async () => {
  for (const [label, o] of CASES) await writeFixture(join(dir, `${label.replace(/\W+/g, '-')}.gguf`), { ...o, metadata: { 'tokenizer.chat_template': CHATML } });
  await writeFixture(join(dir, 'other.gguf'), { kind: 'qwen2', type: 'f32', seed: 33, metadata: { 'tokenizer.chat_template': CHATML } });
  const e = await loadTransformer(join(dir, 'other.gguf'));
  pooled = typeof e.createKvPool === 'function';
  e.dispose();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const N = 8;
const OPTIONS = { temperature: 0, maxTokens: N } as const;
const LOAD = { contextSize: 256, kvCache: { maxBytes: 64 << 20, blockSize: 8 } } as const;

/** Greedy tokens by the single-sequence path (its own contiguous cache), one eval per token. */
async function greedySequence(engine: LlmEngine, tokenizer: Tokenizer, prompt: number[], n: number): Promise<number[]> {
  const seq = engine.createSequence(256);
  try {
    let logits = await seq.eval(prompt);
    const out: number[] = [];
    for (;;) {
      const t = argmax(logits);
      if (tokenizer.isEog(t)) return out;
      out.push(t);
      if (out.length === n) return out;
      logits = await seq.eval([t]);
    }
  } finally {
    seq.dispose();
  }
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

describe.each(CASES)('%s', (label) => {
  const path = () => join(dir, `${label.replace(/\W+/g, '-')}.gguf`);
  let reference: LlmEngine;
  let tokenizer: Tokenizer;
  beforeAll(async () => {
    reference = await loadTransformer(path());
    tokenizer = Tokenizer.fromGguf(reference.file.metadata);
  });
  afterAll(() => reference?.dispose());

  it('turns compute only what follows the cache, and reply as greedy decoding of the rendered conversation', async (ctx) => {
    if (!pooled) ctx.skip();
    const model = await LanguageModel.load(path(), LOAD);
    try {
      const chat = model.chat({ system: SYSTEM, ...OPTIONS });
      const m1 = [{ role: 'system', content: SYSTEM }, { role: 'user', content: 'hello' }];
      const prompt1 = renderChat(tokenizer, m1);
      const r1 = await tokensOf(chat.send('hello'));
      expect(r1.tokens).toEqual(await greedySequence(reference, tokenizer, prompt1, N));
      expect(r1.tokens).toHaveLength(N);
      // What the cache holds: the prompt and the reply tokens fed back (all but a last one that ended it).
      const fed = chat.cachedTokens - prompt1.length;
      expect(fed === r1.tokens.length || fed === r1.tokens.length - 1).toBe(true);
      const cache = [...prompt1, ...r1.tokens.slice(0, fed)];
      const before = model.metrics().promptTokens;
      const r2 = await tokensOf(chat.send('and then?'));
      const prompt2 = renderChat(tokenizer, [...m1, { role: 'assistant', content: r1.text }, { role: 'user', content: 'and then?' }]);
      const reused = Math.min(commonPrefixLength(cache, prompt2), prompt2.length - 1);
      expect(reused).toBeGreaterThanOrEqual(prompt1.length);
      expect(model.metrics().promptTokens - before).toBe(prompt2.length - reused);
      expect(r2.tokens).toEqual(await greedySequence(reference, tokenizer, prompt2, N));
      expect(r2.tokens).toHaveLength(N);
      expect((await tokensOf(model.generate(prompt2, OPTIONS))).tokens).toEqual(r2.tokens);
      chat.dispose();
      expect(model.metrics().kv.blocks.used).toBe(0);
    } finally {
      model.dispose();
    }
  });

  it('two chats with the same system prompt share its blocks', async (ctx) => {
    if (!pooled) ctx.skip();
    const model = await LanguageModel.load(path(), LOAD);
    try {
      const a = model.chat({ system: SYSTEM, ...OPTIONS });
      const b = model.chat({ system: SYSTEM, ...OPTIONS });
      await tokensOf(a.send('hello'));
      const hits = model.metrics().prefix.hitTokens;
      const rb = await tokensOf(b.send('the sea'));
      const pa = renderChat(tokenizer, [{ role: 'system', content: SYSTEM }, { role: 'user', content: 'hello' }]);
      const pb = renderChat(tokenizer, [{ role: 'system', content: SYSTEM }, { role: 'user', content: 'the sea' }]);
      const shared = Math.floor(commonPrefixLength(pa, pb) / 8) * 8;
      expect(shared).toBeGreaterThanOrEqual(16);
      expect(model.metrics().prefix.hitTokens - hits).toBeGreaterThanOrEqual(shared);
      expect(rb.tokens).toEqual(await greedySequence(reference, tokenizer, pb, N));
      a.dispose();
      b.dispose();
    } finally {
      model.dispose();
    }
  });

  it.each(['f32', 'f16'] as const)('a saved chat (%s KV) restores into a fresh model with the same KV bytes and the same next reply', async (dtype, ctx) => {
    if (!pooled) ctx.skip();
    const file = join(dir, `${label.replace(/\W+/g, '-')}-${dtype}.kv`);
    const options = { ...LOAD, kvCache: { ...LOAD.kvCache, dtype } };
    const a = await LanguageModel.load(path(), options);
    const b = await LanguageModel.load(path(), options);
    try {
      const chat = a.chat({ system: SYSTEM, ...OPTIONS });
      await tokensOf(chat.send('hello'));
      await tokensOf(chat.send('the sea'));
      await chat.save(file);
      const restored = await b.restoreChat(file);
      expect(restored.messages).toEqual(chat.messages);
      const again = join(dir, 'again.kv');
      await restored.save(again);
      expect(readFileSync(again)).toEqual(readFileSync(file));
      const cached = restored.cachedTokens;
      const before = b.metrics().promptTokens;
      const x = await tokensOf(chat.send('and the west'));
      const y = await tokensOf(restored.send('and the west'));
      expect(y.tokens).toEqual(x.tokens);
      const prompt = renderChat(tokenizer, restored.messages.slice(0, -1));
      const held = Array.from(decodeKvState(readFileSync(file)).tokens);
      expect(held.length).toBe(cached);
      // The fresh model computes only what follows the restored cache: nothing else is cached there.
      expect(b.metrics().promptTokens - before).toBe(prompt.length - Math.min(commonPrefixLength(held, prompt), prompt.length - 1));
      expect(y.tokens).toEqual(await greedySequence(reference, tokenizer, prompt, N));
      chat.dispose();
      restored.dispose();
    } finally {
      a.dispose();
      b.dispose();
    }
  });

  it('a corrupted state file and another model\'s are refused with typed errors', async (ctx) => {
    if (!pooled) ctx.skip();
    const file = join(dir, `${label.replace(/\W+/g, '-')}-refuse.kv`);
    const a = await LanguageModel.load(path(), LOAD);
    const other = await LanguageModel.load(join(dir, 'other.gguf'), LOAD);
    const half = await LanguageModel.load(path(), { ...LOAD, kvCache: { ...LOAD.kvCache, dtype: 'f16' } });
    try {
      const chat = a.chat({ ...OPTIONS });
      await tokensOf(chat.send('hello'));
      await chat.save(file);
      const bytes = readFileSync(file);
      bytes[bytes.length - 100]! ^= 1;
      const corrupt = join(dir, 'corrupt.kv');
      writeFileSync(corrupt, bytes);
      await expect(a.restoreChat(corrupt)).rejects.toThrow(ModelFormatError);
      await expect(other.restoreChat(file)).rejects.toThrow(InvalidArgumentError);
      await expect(other.restoreChat(file)).rejects.toThrow(/saved by another model/);
      await expect(half.restoreChat(file)).rejects.toThrow(/KV dtype 'f32', this model's pool stores 'f16'/);
      chat.dispose();
      expect(a.metrics().kv.blocks.used).toBe(0);
      expect(other.metrics().kv.blocks.used).toBe(0);
    } finally {
      a.dispose();
      other.dispose();
      half.dispose();
    }
  });
});
