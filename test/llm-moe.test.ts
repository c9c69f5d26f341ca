/**
 * MoE layers of the native transformer (ops/moe.h wired into ops/llm) against llama.cpp
 * (node-llama-cpp) on generated Mixtral-layout and qwen2moe GGUFs.
 *
 * Tolerance: as test/llm-forward.test.ts derives it (delta per matrix product and type, errors
 * adding up along the P products of the residual path, |d logprob| <= 2 P delta S for a row whose
 * logits spread over S). An MoE layer's path has q/k/v -> o, then each chosen expert's gate/up ->
 * down (and the shared expert's), i.e. the same 5 products per layer as a dense one: the router
 * is f32 in these files (as llama.cpp's converters keep it) and its weights enter as a product with
 * the expert outputs, so it adds its (K + 2) u to the expert path, inside the per-product delta.
 * The expert choice itself is a discontinuity: were two routing scores within the error of each
 * other, the two implementations could pick different experts, and that position would be far off
 * (not a drift). The random f32 routers of these fixtures leave score gaps well above delta on
 * these sequences; a failure at a single position with the others well inside is that case.
 */
import { join } from 'node:path';
import { getLlama, type Llama } from 'node-llama-cpp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GgufTensorType } from '../lib/llm/gguf.js';
import { loadTransformer } from '../lib/llm/transformer.js';
import { fixtureDir, llamaCppLogProbs, logSoftmax, tokenSequence, writeFixture, type FixtureInfo } from './llm-fixtures.js';

const dir = fixtureDir('sonde-llm-moe-');
let llama: Llama;

beforeAll(async () => {
  llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never });
}, 60_000);

afterAll(async () => {
  await llama?.dispose();
});

const DELTA: Record<GgufTensorType, number> = { f32: 1e-4, f16: 2 ** -11, bf16: 2 ** -8, q8_0: 8e-3, q4_0: 8e-3 };

function expectLogProbsClose(got: Float32Array[], want: Float64Array[], info: FixtureInfo, type: GgufTensorType): void {
  const products = 5 * info.layers + 1;
  for (let i = 0; i < got.length; i++) {
    const lp = logSoftmax(got[i]!);
    let lo = Infinity, hi = -Infinity;
    for (const v of got[i]!) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    const bound = 2 * products * DELTA[type] * (hi - lo);
    let compared = 0;
    for (let t = 0; t < info.vocabSize; t++) {
      const w = want[i]![t]!;
      if (Number.isNaN(w)) continue;  // below llama.cpp's probability floor
      compared++;
      const err = Math.abs(lp[t]! - w);
      if (err > bound) expect.fail(`position ${i} token ${t}: sonde ${lp[t]} llama.cpp ${w} (|diff| ${err} > bound ${bound})`);
    }
    expect(compared).toBeGreaterThan(info.vocabSize / 2);
  }
}

// The Mixtral-layout and qwen2moe fixtures at their default expert counts (4 experts, top-2) in
// every type are in test/llm-forward.test.ts; these are the routing edge cases.
describe('MoE routing edge cases: logits equal llama.cpp', () => {
  it.each([
    ['mixtral', 8, 1, 'f32'], ['mixtral', 3, 3, 'f32'], ['qwen2moe', 8, 1, 'q8_0'], ['qwen2moe', 6, 6, 'f16'],
  ] as const)('%s: %i experts, %i used, %s', async (kind, experts, expertsUsed, type) => {
    const info = await writeFixture(join(dir, `${kind}-${experts}-${expertsUsed}.gguf`), { kind, type, experts, expertsUsed, seed: 9 });
    const tokens = tokenSequence(40, info.vocabSize, 3, [info.eosId]);
    const want = await llamaCppLogProbs(llama, info.path, tokens, info.vocabSize);
    const engine = await loadTransformer(info.path);
    try {
      const seq = engine.createSequence(64);
      const all = await seq.eval(tokens, { allLogits: true });
      const v = info.vocabSize;
      expectLogProbsClose(tokens.map((_, i) => all.subarray(i * v, (i + 1) * v)), want, info, type);
      // Expert load: every token goes to k experts in every layer; with k = E, to all of them.
      const counts = seq.expertCounts!()!;
      expect(counts.length).toBe(info.layers * experts);
      for (let l = 0; l < info.layers; l++) {
        const row = Array.from(counts.subarray(l * experts, (l + 1) * experts));
        expect(row.reduce((a, b) => a + b, 0)).toBe(tokens.length * expertsUsed);
        if (expertsUsed === experts) expect(row).toEqual(new Array(experts).fill(tokens.length));
      }
      seq.dispose();
    } finally {
      engine.dispose();
    }
  }, 60_000);
});
