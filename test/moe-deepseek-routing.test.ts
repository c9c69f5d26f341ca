/**
 * DeepSeekMoE routing (sonde.kernels.moeRoute with groups / selection bias / renormalisation /
 * scale) against a naive float64 reference written here from llama.cpp's build_moe_ffn rules:
 * scores = softmax over all experts or sigmoid; keys = scores + bias; with groups, a group's score
 * is the sum of its two best keys and only the best groupsUsed groups stay; the k best keys are
 * chosen (ties to the lower index, for groups and experts alike); weights = the unbiased scores of
 * the chosen, divided by max(sum, 2^-14) if renormalised, times the scale.
 *
 * The router is the identity-like f32 matrix whose column 0 holds the wanted logits and x is the
 * unit vector e_0, so the kernel sees exactly the logits a case writes (ties included).
 */
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, Tensor, kernels } from '../lib/index.js';
import { rng } from './llm-fixtures.js';

interface Route { k: number; scoring: 'softmax' | 'sigmoid'; bias?: Float32Array; norm?: boolean; scale?: number; groups?: number; groupsUsed?: number }

function naive(logits: Float32Array, r: Route): { ids: number[]; w: number[] } {
  const e = logits.length;
  let p: number[];
  if (r.scoring === 'softmax') {
    const mx = Math.max(...logits);
    const ex = Array.from(logits, (v) => Math.exp(v - mx));
    const s = ex.reduce((a, b) => a + b, 0);
    p = ex.map((v) => v / s);
  } else {
    p = Array.from(logits, (v) => 1 / (1 + Math.exp(-v)));
  }
  const keys = p.map((v, i) => v + (r.bias ? r.bias[i]! : 0));
  const byKeyThenIndex = (a: number, b: number) => (keys[b]! - keys[a]!) || (a - b);
  if ((r.groups ?? 1) > 1) {
    const g = r.groups!, per = e / g;
    const score = Array.from({ length: g }, (_, j) => {
      const inGroup = Array.from({ length: per }, (_, t) => j * per + t).sort(byKeyThenIndex);
      return inGroup.slice(0, 2).reduce((a, i) => a + keys[i]!, 0);
    });
    const kept = new Set(Array.from({ length: g }, (_, j) => j).sort((a, b) => (score[b]! - score[a]!) || (a - b)).slice(0, r.groupsUsed));
    for (let i = 0; i < e; i++) if (!kept.has(Math.floor(i / per))) keys[i] = -Infinity;
  }
  const ids = Array.from({ length: e }, (_, i) => i).sort(byKeyThenIndex).slice(0, r.k);
  let w = ids.map((i) => p[i]!);
  if (r.norm) {
    const s = w.reduce((a, b) => a + b, 0);
    w = w.map((v) => v / Math.max(s, 6.103515625e-5));
  }
  return { ids, w: w.map((v) => v * (r.scale ?? 1)) };
}

/** Routes each row of `logits` ([tokens][experts]) through the kernel. */
async function kernel(rows: Float32Array[], r: Route) {
  const e = rows[0]!.length, tokens = rows.length;
  // router [e x tokens]: x_t = e_t picks column t, so token t's logits are column t.
  const router = new Float32Array(e * tokens);
  rows.forEach((row, t) => row.forEach((v, i) => { router[i * tokens + t] = v; }));
  const x = new Float32Array(tokens * tokens);
  for (let t = 0; t < tokens; t++) x[t * tokens + t] = 1;
  return kernels.moeRoute(new Tensor('float32', x, [tokens, tokens]), {
    router: kernels.quantizeWeights(new Tensor('float32', router, [e, tokens]), 'f32'),
    k: r.k, scoring: r.scoring, renormalize: r.norm ?? false, weightScale: r.scale ?? 1,
    ...(r.bias ? { selectionBias: r.bias } : {}), ...(r.groups ? { groups: r.groups, groupsUsed: r.groupsUsed } : {}),
  });
}

async function check(rows: Float32Array[], r: Route): Promise<void> {
  const got = await kernel(rows, r);
  rows.forEach((row, t) => {
    const want = naive(row, r);
    expect(Array.from(got.experts.data.subarray(t * r.k, (t + 1) * r.k)), `token ${t}`).toEqual(want.ids);
    for (let j = 0; j < r.k; j++) {
      expect(Math.abs(got.weights.data[t * r.k + j]! - want.w[j]!)).toBeLessThanOrEqual(1e-6 * (1 + Math.abs(want.w[j]!)));
    }
  });
}

function randomRows(tokens: number, e: number, seed: number, spread = 4): Float32Array[] {
  const r = rng(seed);
  return Array.from({ length: tokens }, () => Float32Array.from({ length: e }, () => (r() * 2 - 1) * spread));
}

describe('DeepSeekMoE routing against a naive reference', () => {
  it.each([
    ['V2: softmax, 4 groups of 4, 2 used, k 4, scale 2.5', { k: 4, scoring: 'softmax', groups: 4, groupsUsed: 2, scale: 2.5 }],
    ['V2: softmax, 8 groups of 2, 3 used, k 6, normalised', { k: 6, scoring: 'softmax', groups: 8, groupsUsed: 3, norm: true }],
    ['V3: sigmoid, bias, 4 groups, 2 used, k 4, norm, scale 2.5', { k: 4, scoring: 'sigmoid', groups: 4, groupsUsed: 2, norm: true, scale: 2.5, bias: 'random' }],
    ['V3: sigmoid, bias, no groups, k 3', { k: 3, scoring: 'sigmoid', norm: true, bias: 'random' }],
    ['groups of one expert (group score = its one key)', { k: 3, scoring: 'softmax', groups: 16, groupsUsed: 5 }],
  ] as const)('%s', async (_name, spec) => {
    const bias = 'bias' in spec ? Float32Array.from(randomRows(1, 16, 77, 0.5)[0]!) : undefined;
    await check(randomRows(41, 16, 5), { ...spec, bias } as Route);
  });

  it('ties go to the lower expert and the lower group', async () => {
    // All equal: groups 0 and 1 kept, experts 0..3 in order.
    await check([new Float32Array(16).fill(0.5)], { k: 4, scoring: 'softmax', groups: 4, groupsUsed: 2 });
    // Groups 1 and 3 tie on score above the others: group 1 wins the one slot; inside it 4 and 5 tie.
    const row = new Float32Array(16).fill(-3);
    row[4] = row[5] = row[12] = row[13] = 1;
    const got = await kernel([row], { k: 2, scoring: 'sigmoid', groups: 4, groupsUsed: 1 });
    expect(Array.from(got.experts.data)).toEqual([4, 5]);
    await check([row], { k: 2, scoring: 'sigmoid', groups: 4, groupsUsed: 1 });
  });

  it('the best expert loses when its group is not chosen (group score is the sum of two)', async () => {
    // Group 0: one strong expert; group 1: two good ones whose sum beats it.
    const row = Float32Array.from([2, -9, 1.6, 1.6]);
    const got = await kernel([row], { k: 1, scoring: 'softmax', groups: 2, groupsUsed: 1 });
    expect(Array.from(got.experts.data)).toEqual([2]);
    await check([row], { k: 1, scoring: 'softmax', groups: 2, groupsUsed: 1 });
  });

  it('chosen groups may contribute no expert', async () => {
    // 3 of 4 groups kept, k = 2: both experts come from group 2; groups 0 and 1 are kept but unused.
    const row = Float32Array.from([0.5, 0.4, 0.45, 0.44, 3, 2.9, -5, -5]);
    const got = await kernel([row], { k: 2, scoring: 'sigmoid', groups: 4, groupsUsed: 3 });
    expect(Array.from(got.experts.data)).toEqual([4, 5]);
    await check([row], { k: 2, scoring: 'sigmoid', groups: 4, groupsUsed: 3 });
  });

  it('a bias changes the choice but not the weights', async () => {
    const row = Float32Array.from([2, 1, 0, -1, -2, -3]);
    const plain = await kernel([row], { k: 2, scoring: 'sigmoid' });
    expect(Array.from(plain.experts.data)).toEqual([0, 1]);
    const bias = Float32Array.from([0, 0, 0, 0, 0, 5]);
    const biased = await kernel([row], { k: 2, scoring: 'sigmoid', bias });
    expect(Array.from(biased.experts.data)).toEqual([5, 0]);
    // Expert 5's weight is its unbiased score sigmoid(-3), expert 0's unchanged.
    expect(biased.weights.data[0]).toBeCloseTo(1 / (1 + Math.exp(3)), 6);
    expect(biased.weights.data[1]).toBeCloseTo(plain.weights.data[0]!, 6);
    expect(biased.scores.data[5]).toBeCloseTo(1 / (1 + Math.exp(3)), 6);
    await check([row], { k: 2, scoring: 'sigmoid', bias, norm: true, scale: 2.5 });
  });

  it('bad group settings are typed errors naming the field', async () => {
    const rows = randomRows(2, 12, 1);
    await expect(kernel(rows, { k: 2, scoring: 'softmax', groups: 5, groupsUsed: 1 })).rejects.toThrow(/layer\.groups = 5 does not divide the 12 experts/);
    await expect(kernel(rows, { k: 2, scoring: 'softmax', groups: 4, groupsUsed: 5 })).rejects.toThrow(/layer\.groupsUsed/);
    await expect(kernel(rows, { k: 7, scoring: 'softmax', groups: 4, groupsUsed: 2 })).rejects.toThrow(/layer\.k = 7 experts do not fit in groupsUsed = 2 groups of 3/);
    await expect(kernel(rows, { k: 2, scoring: 'softmax', groups: 4, groupsUsed: 5 })).rejects.toBeInstanceOf(InvalidArgumentError);
  });
});
