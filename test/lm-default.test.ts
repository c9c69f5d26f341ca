/**
 * The embedded default language model, models/fortune-moe.gguf (trained by scripts/train-lm.py): it
 * loads, says what it is, and llama.cpp (node-llama-cpp) reads the same file to the same tokens, the
 * same greedy continuations and the same log-probabilities (within the bound of Q8_0 arithmetic);
 * seeded sampling repeats; the router spreads tokens over the experts.
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
    // Prompts whose greedy paths are decisive: where the top two logits of a step are closer than
    // the two runtimes' arithmetic differs (Q8_0 activations, see below), either choice is right
    // and equality would test rounding, not the model. 'The best way to' ends in end-of-text after
    // a few tokens, so both must also stop at the same place.
    for (const prompt of ['Q: How many programmers does it take', 'The best way to']) {
      const tokens = model.tokenize(prompt);
      const sonde = await collect(model.generate(tokens, { maxTokens: 32 }));
      expect(sonde.tokens.length).toBeGreaterThanOrEqual(4);
      const rows = await model.logits(tokens.concat(sonde.tokens));
      const V = model.info.vocabSize;
      for (let i = tokens.length - 1; i < tokens.length + sonde.tokens.length - 1; i++) {
        const sorted = Array.from(rows.subarray(i * V, (i + 1) * V)).sort((a, b) => b - a);
        expect(sorted[0]! - sorted[1]!, `top-2 logit gap at position ${i}`).toBeGreaterThan(0.1);
      }
      expect(sonde.tokens).toEqual(await llamaGreedy(tokens, 32));
    }
  });

  it('log-probabilities at every position of a fortune are llama.cpp\'s within the Q8_0 bound', async () => {
    const tokens = model.tokenize('Real programmers don\'t comment their code.  If it was hard to write, it should be hard to understand.\n\t\t-- Anonymous');
    const V = model.info.vocabSize;
    const ctx = await reference.createContext({
      contextSize: 128, batchSize: 128, flashAttention: false, threads: 1,
      experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
    } as never);
    let want: { next: { probabilities?: Map<number, number> } }[];
    try {
      want = await ctx.getSequence().controlledEvaluate(tokens.map((t) => [t, { generateNext: { probabilities: true } }] as never)) as never;
    } finally {
      await ctx.dispose();
    }
    const got = await model.logits(tokens);
    // test/llm-forward.test.ts derives the per-product error: both runtimes quantise activations to
    // int8 per block of 32, ggml rounding the block scale to f16 (relative delta = 8e-3 per product),
    // and P = 5 products per layer + the output carry it to the logits. Its bound adds the P errors
    // linearly (2 P delta S, S the row's logit spread: ~4.5 nats here, looser than a row shifted by one
    // position differs); the products' errors are independent, so they add like a random walk:
    // 2 sqrt(P) delta S (~0.95 nats here; measured worst 0.05; rows one position apart differ by 3.5
    // or more). A token whose k-th and (k+1)-th router scores are closer than the error may go to
    // another expert in one runtime; up to 2 such positions may exceed the bound.
    const bound = (row: Float32Array) => 2 * Math.sqrt(5 * LAYERS + 1) * 8e-3 * (Math.max(...row) - Math.min(...row));
    const over: number[] = [];
    for (let i = 0; i < tokens.length; i++) {
      const row = got.subarray(i * V, (i + 1) * V);
      const max = Math.max(...row);
      let sum = 0;
      for (const v of row) sum += Math.exp(v - max);
      const lse = max + Math.log(sum);
      const probs = want[i]!.next.probabilities!;
      expect(probs.size).toBeGreaterThan(V / 2);
      let worst = 0;
      for (const [t, p] of probs) if (p > 0) worst = Math.max(worst, Math.abs(row[t]! - lse - Math.log(p)));
      if (worst > bound(row)) over.push(i);
    }
    expect(over.length, `positions over the bound: ${over.join(', ')}`).toBeLessThanOrEqual(2);
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
