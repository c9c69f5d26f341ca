/**
 * Small random GGUF language models for tests, written with sonde.gguf.write in llama.cpp's own
 * conventions, so node-llama-cpp loads the same file and serves as the reference. The layout
 * (kinds, vocabularies, weight scales) lives in bench/llm/models.js, shared with the benchmark
 * models; this file writes it with lib's writer and adds the llama.cpp reference helpers.
 */
import { mkdtempSync } from 'node:fs';
import type { Llama } from 'node-llama-cpp';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { typed, write, type GgufTensorType } from '../lib/llm/gguf.js';
import { loadTransformer } from '../lib/llm/transformer.js';
import { rng as rngOf } from '../bench/graphs/builder.js';
import { llmModelSpec, type LlmModelInfo, type LlmModelKind, type LlmModelOptions } from '../bench/llm/models.js';

export { bpeVocab, gpt2ByteSymbols, spmVocab } from '../bench/llm/models.js';
export type FixtureKind = LlmModelKind;
export type FixtureOptions = LlmModelOptions;
export interface FixtureInfo extends LlmModelInfo {
  path: string;
}

/** A fresh temporary directory for fixture files. */
export function fixtureDir(prefix = 'sonde-llm-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** Deterministic uniform [0, 1) (mulberry32), the generator the graph builder uses too. */
export { rng } from '../bench/graphs/builder.js';

/**
 * Per-element relative error of a weight type's products against llama.cpp's (f32: accumulated
 * rounding over ~130 terms; block types: their activations quantised to 8 bits).
 */
export const DELTA: Record<GgufTensorType, number> = { f32: 130 * 2 ** -24, f16: 2 ** -11, bf16: 2 ** -8, q8_0: 8e-3, q4_0: 8e-3 };

/** n seeded token ids in [0, vocab), none of them in `avoid` (e.g. EOS). */
export function tokenSequence(n: number, vocab: number, seed: number, avoid: number[]): number[] {
  const r = rngOf(seed);
  const out: number[] = [];
  while (out.length < n) {
    const t = Math.floor(r() * vocab);
    if (!avoid.includes(t)) out.push(t);
  }
  return out;
}

/** Writes one model and returns what a test needs to know about it. */
export async function writeFixture(path: string, o: FixtureOptions): Promise<FixtureInfo> {
  const { spec, info } = llmModelSpec(o, typed);
  await write(path, spec);
  return { path, ...info };
}

/** Log-probabilities of every next token after every position, from llama.cpp. */
export async function llamaCppLogProbs(llama: Llama, path: string, tokens: number[], vocab: number,
  options: { threads?: number } = {}): Promise<Float64Array[]> {
  const model = await llama.loadModel({ modelPath: path });
  try {
    const ctx = await model.createContext({
      contextSize: 128, batchSize: 128, ...(options.threads ? { threads: options.threads } : {}), flashAttention: false,
      experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
    } as never);
    try {
      const seq = ctx.getSequence();
      const res = await seq.controlledEvaluate(tokens.map((t) => [t, { generateNext: { probabilities: true } }] as never));
      return tokens.map((_, i) => {
        const probs = res[i]?.next.probabilities;
        if (!probs) throw new Error(`llama.cpp returned no probabilities for position ${i}`);
        const lp = new Float64Array(vocab).fill(Number.NaN);
        for (const [tok, p] of probs) if (p > 0) lp[tok as number] = Math.log(p);
        return lp;
      });
    } finally {
      await ctx.dispose();
    }
  } finally {
    await model.dispose();
  }
}

/** log softmax of one row of logits, in float64. */
export function logSoftmax(row: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  let s = 0;
  for (const v of row) s += Math.exp(v - max);
  const lse = max + Math.log(s);
  return Float64Array.from(row, (v) => v - lse);
}

/**
 * Greedy continuations of `prompt` (n tokens) by llama.cpp and by sonde's engine on one sequence,
 * for the tests that require them to be identical.
 */
export async function greedyBoth(llama: Llama, path: string, prompt: number[], n: number): Promise<{ want: number[]; got: number[] }> {
  const model = await llama.loadModel({ modelPath: path });
  const want: number[] = [];
  try {
    const ctx = await model.createContext({
      // One thread: llama.cpp's workers spin between tokens, which on a shared 2-core machine
      // costs seconds per token.
      contextSize: 64, threads: 1, flashAttention: false, experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
    } as never);
    const seq = ctx.getSequence();
    const greedy = { generateNext: { token: true, options: { temperature: 0 } } };
    let res = await seq.controlledEvaluate(prompt.map((t, i) => (i === prompt.length - 1 ? [t, greedy] : t)) as never);
    for (let i = 0; i < n; i++) {
      const next = res[res.length - 1]!.next.token!;
      want.push(next);
      res = await seq.controlledEvaluate([[next, greedy]] as never);
    }
    await ctx.dispose();
  } finally {
    await model.dispose();
  }
  const engine = await loadTransformer(path);
  const got: number[] = [];
  try {
    const seq = engine.createSequence(64);
    let logits = await seq.eval(prompt);
    for (let i = 0; i < n; i++) {
      let best = 0;
      for (let t = 1; t < logits.length; t++) if (logits[t]! > logits[best]!) best = t;
      got.push(best);
      logits = await seq.eval([best]);
    }
  } finally {
    engine.dispose();
  }
  return { want, got };
}
