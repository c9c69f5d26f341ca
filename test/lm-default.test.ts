/**
 * The embedded default language model, models/fortune-moe.gguf (trained by scripts/train-lm.py): it
 * loads, says what it is, and llama.cpp (node-llama-cpp) reads the same file to the same tokens and
 * the same greedy continuation; seeded sampling repeats; the router spreads tokens over the experts.
 */
import { statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { getLlama, type Llama, type LlamaModel } from 'node-llama-cpp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LanguageModel } from '../lib/llm/language-model.js';

const path = fileURLToPath(new URL('../models/fortune-moe.gguf', import.meta.url));
const LAYERS = 4;
const EXPERTS = 8;
const USED = 2;

let model: LanguageModel;
let llama: Llama;
let reference: LlamaModel;
beforeAll(async () => {
  model = await LanguageModel.load(path);
  llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never });
  reference = await llama.loadModel({ modelPath: path });
});
afterAll(async () => {
  model?.dispose();
  await reference?.dispose();
});

/** llama.cpp's greedy continuation of `prompt` (it stops at an end-of-generation token, not yielded). */
async function llamaGreedy(prompt: number[], n: number): Promise<number[]> {
  // f32 KV cache and no flash attention: the arithmetic sonde does. One thread: llama.cpp's spinning
  // workers crawl on a machine whose cores are busy.
  const ctx = await reference.createContext({
    contextSize: 128, sequences: 1, threads: 1, flashAttention: false,
    experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
  } as never);
  try {
    const out: number[] = [];
    for await (const t of ctx.getSequence().evaluate(prompt as never, { temperature: 0 } as never)) {
      out.push(t as number);
      if (out.length === n) break;
    }
    return out;
  } finally {
    await ctx.dispose();
  }
}

async function collect(it: AsyncIterable<{ token: number; text: string }>) {
  const tokens: number[] = [];
  let text = '';
  for await (const e of it) {
    tokens.push(e.token);
    text += e.text;
  }
  return { tokens, text };
}

describe('models/fortune-moe.gguf', () => {
  it('is small and describes a Mixtral-layout llama MoE of 8 experts, top 2, in Q8_0', () => {
    expect(statSync(path).size).toBeLessThan(8 << 20);
    const info = model.info;
    expect(info.architecture).toBe('llama');
    expect(info.expertCount).toBe(EXPERTS);
    expect(info.expertUsedCount).toBe(USED);
    expect(info.blockCount).toBe(LAYERS);
    expect(info.vocabSize).toBe(1024);
    expect(info.quantizationTypes[0]).toBe('q8_0');
    // Two of eight experts per token: far fewer active than stored parameters.
    expect(info.activeParameterCount).toBeLessThan(info.parameterCount / 2);
    expect(info.parameterCount).toBeGreaterThan(1_000_000);
  });

  it('tokenises as llama.cpp does, and any UTF-8 round-trips through byte fallback', () => {
    for (const text of ['The cat sat on the mat.', 'Q:\tWhy?\n\nA:  Because.', 'naïve café 日本語 😀', '   leading spaces']) {
      const tokens = model.tokenize(text, { addSpecial: false });
      expect(tokens).toEqual(Array.from(reference.tokenize(text)));
      expect(model.detokenize(tokens)).toBe(text);
    }
  });

  it('its greedy continuation of a prompt equals llama.cpp\'s', async () => {
    for (const prompt of ['The meaning of life is', 'Q: How many programmers does it take']) {
      const tokens = model.tokenize(prompt);
      const sonde = await collect(model.generate(tokens, { maxTokens: 32 }));
      // A trained model writes text, not an immediate end of text.
      expect(sonde.tokens.length).toBeGreaterThanOrEqual(8);
      expect(sonde.tokens).toEqual(await llamaGreedy(tokens, 32));
    }
  });

  it('sampling 32 tokens with a seed is deterministic', async () => {
    const options = { maxTokens: 32, temperature: 0.8, topK: 40, topP: 0.95, seed: 1234 };
    const a = await collect(model.generate('A fortune', options));
    const b = await collect(model.generate('A fortune', options));
    expect(a.tokens.length).toBeGreaterThan(0);
    expect(b).toEqual(a);
  });

  it('expertCounts: k experts per token in every layer, spread over several experts', async () => {
    const before = model.expertCounts()!;
    const prompt = model.tokenize('Real programmers don\'t comment their code. If it was hard to write, it should be hard to understand.');
    await model.logits(prompt);
    const after = model.expertCounts()!;
    expect(after.length).toBe(LAYERS * EXPERTS);
    for (let l = 0; l < LAYERS; l++) {
      let routed = 0;
      let used = 0;
      for (let e = 0; e < EXPERTS; e++) {
        const n = after[l * EXPERTS + e]! - before[l * EXPERTS + e]!;
        routed += n;
        if (n > 0) used++;
      }
      expect(routed).toBe(USED * prompt.length);
      // The load-balancing loss in training keeps the router from collapsing onto one pair.
      expect(used).toBeGreaterThanOrEqual(4);
    }
  });
});
