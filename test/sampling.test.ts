import { describe, expect, it } from 'vitest';
import { native, type NativeElementwiseVariant } from '../lib/binding.js';
import { devices } from '../lib/device.js';
import { InvalidArgumentError } from '../lib/errors.js';
import { Rng, Sampler, argmax, argmaxLoop, expSum, expSumLoop, topK, topKLoop } from '../lib/llm/sampling.js';
import { randomF32 } from './helpers.js';


const plain = { topK: 0, topP: 1, minP: 0, temperature: 1, seed: 1 };
const logitsOf = (probs: number[]) => Float32Array.from(probs, Math.log);

/** Reference ranking: a full sort, larger first, lower id first on ties. */
function ranked(values: ArrayLike<number>): number[] {
  return Array.from({ length: values.length }, (_, i) => i).sort((a, b) => values[b]! - values[a]! || a - b);
}

function softmax(values: number[]): number[] {
  const m = Math.max(...values);
  const e = values.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

describe('greedy', () => {
  it('is the argmax (first on ties) at every size, whatever the other options', () => {
    for (const n of [1, 2, 7, 33, 1000]) {
      const logits = randomF32(n, n);
      const want = ranked(logits)[0]!;
      const s = new Sampler({ temperature: 0, topK: 3, topP: 0.5, minP: 0.5, seed: 9 });
      for (let i = 0; i < 5; i++) expect(s.sample(logits)).toBe(want);
    }
    expect(argmax(Float32Array.of(1, 3, 3, 2))).toBe(1);
    expect(argmax(Float32Array.of(NaN, -1, NaN))).toBe(1);
  });
  it('top-k 1 is greedy at any temperature', () => {
    const logits = randomF32(501, 3);
    const s = new Sampler({ ...plain, topK: 1, temperature: 5 });
    for (let i = 0; i < 20; i++) expect(s.sample(logits)).toBe(ranked(logits)[0]);
  });
});

describe('top-k', () => {
  it('selects the same tokens, in rank order, as a full sort (ties, edges of k)', () => {
    for (const n of [1, 5, 64, 257, 3001]) {
      const v = randomF32(n, n + 1).map((x) => Math.round(x * 20) / 20); // many ties
      v[n >> 1] = -Infinity;
      v[n - 1] = Infinity;
      if (n > 2) v[1] = -0; // ranks equal to +0, as in a comparison
      const want = ranked(v);
      for (const k of [1, 2, 5, 40, n - 1, n, n + 3]) {
        if (k < 1) continue;
        expect(Array.from(topK(v, k)), `n=${n} k=${k}`).toEqual(want.slice(0, Math.min(k, n)));
      }
    }
  });
  it('renormalises the k kept tokens', () => {
    const p = [0.1, 0.4, 0.05, 0.3, 0.15];
    const c = new Sampler({ ...plain, topK: 2 }).candidates(logitsOf(p));
    expect(Array.from(c.tokens)).toEqual([1, 3]);
    expect(c.probs[0]).toBeCloseTo(0.4 / 0.7, 6);
    expect(c.probs[1]).toBeCloseTo(0.3 / 0.7, 6);
  });
});

describe('top-p', () => {
  const p = [0.15, 0.05, 0.5, 0.1, 0.2];
  it('keeps exactly the tokens whose cumulative probability first reaches p (hand-checked)', () => {
    const kept = (topP: number) => Array.from(new Sampler({ ...plain, topP }).candidates(logitsOf(p)).tokens);
    expect(kept(0.3)).toEqual([2]); // 0.5 >= 0.3
    expect(kept(0.5)).toEqual([2]);
    expect(kept(0.69)).toEqual([2, 4]); // 0.7
    expect(kept(0.71)).toEqual([2, 4, 0]); // 0.85
    expect(kept(0.9)).toEqual([2, 4, 0, 3]); // 0.95
    expect(kept(0.96)).toEqual([2, 4, 0, 3, 1]);
    expect(kept(1).sort()).toEqual([0, 1, 2, 3, 4]);
    expect(kept(1e-9)).toEqual([2]); // at least one token
  });
  it('matches a scalar reference on large vocabularies (the widening search)', () => {
    for (const [n, scale] of [[1000, 8], [40000, 30], [40000, 2]] as const) {
      const logits = randomF32(n, n).map((x) => x * scale);
      const probs = softmax(Array.from(logits));
      const order = ranked(logits);
      for (const topP of [0.1, 0.5, 0.9, 0.99]) {
        let cum = 0;
        let keep = n;
        for (let i = 0; i < n; i++) {
          cum += probs[order[i]!]!;
          if (cum >= topP) { keep = i + 1; break; }
        }
        const c = new Sampler({ ...plain, topP }).candidates(logits);
        expect(Array.from(c.tokens), `n=${n} scale=${scale} p=${topP}`).toEqual(order.slice(0, keep));
      }
    }
  });
  it('sees the distribution after top-k, before temperature (llama.cpp order)', () => {
    // After top-3 the normalised probabilities are 0.5/0.85, 0.2/0.85, 0.15/0.85 = .588, .235, .176.
    const c = new Sampler({ ...plain, topK: 3, topP: 0.8 }).candidates(logitsOf(p));
    expect(Array.from(c.tokens)).toEqual([2, 4]); // 0.588 < 0.8 <= 0.824
    // A high temperature flattens the survivors but does not let more through.
    const hot = new Sampler({ ...plain, topK: 3, topP: 0.8, temperature: 100 }).candidates(logitsOf(p));
    expect(Array.from(hot.tokens)).toEqual([2, 4]);
    expect(hot.probs[0]).toBeCloseTo(0.5 ** 0.01 / (0.5 ** 0.01 + 0.2 ** 0.01), 9);
  });
});

describe('min-p', () => {
  const p = [0.06, 0.3, 0.04, 0.4, 0.2];
  it('keeps the tokens with probability >= minP * max (hand-checked)', () => {
    const kept = (minP: number) => Array.from(new Sampler({ ...plain, minP }).candidates(logitsOf(p)).tokens);
    expect(kept(0.2)).toEqual([3, 1, 4]); // threshold 0.08
    expect(kept(0.14)).toEqual([3, 1, 4, 0]); // 0.056
    expect(kept(0.09)).toEqual([3, 1, 4, 0, 2]); // 0.036
    expect(kept(0.76)).toEqual([3]); // 0.304
    expect(kept(1)).toEqual([3]);
  });
  it('with top-p keeps the intersection of both prefixes', () => {
    const s = new Sampler({ ...plain, minP: 0.14, topP: 0.75 }); // top-p alone: 0.4, 0.3, 0.2
    expect(Array.from(s.candidates(logitsOf(p)).tokens)).toEqual([3, 1, 4]);
    const t = new Sampler({ ...plain, minP: 0.6, topP: 0.95 }); // min-p alone: 0.4, 0.3
    expect(Array.from(t.candidates(logitsOf(p)).tokens)).toEqual([3, 1]);
  });
  it('on a large vocabulary matches a scalar reference', () => {
    const logits = randomF32(30001, 5).map((x) => x * 12);
    const probs = softmax(Array.from(logits));
    const max = Math.max(...probs);
    const want = ranked(logits).filter((i) => probs[i]! >= 0.01 * max);
    const c = new Sampler({ ...plain, minP: 0.01 }).candidates(logits);
    expect(Array.from(c.tokens)).toEqual(want);
    const sum = want.reduce((a, i) => a + probs[i]!, 0);
    for (let i = 0; i < want.length; i++) expect(c.probs[i]).toBeCloseTo(probs[want[i]!]! / sum, 9);
  });
});

describe('repetition penalty', () => {
  const logits = Float32Array.of(2, -1, 0.5, 0, 3, 1.5);
  const history = [0, 1, 3, 0, 5];
  const probsAfter = (opts: object, h = history) => new Sampler({ ...plain, ...opts }).candidates(logits, h);
  const expectDist = (opts: object, want: number[], h = history) => {
    const c = probsAfter(opts, h);
    const soft = softmax(want);
    const got = new Array<number>(want.length).fill(0);
    c.tokens.forEach((t, i) => { got[t] = c.probs[i]!; });
    for (let i = 0; i < want.length; i++) expect(got[i], `token ${i}`).toBeCloseTo(soft[i]!, 9);
  };
  it('divides positive logits and multiplies negative ones over the window (hand values)', () => {
    // window = whole history: 0 (2 -> 1), 1 (-1 -> -2), 3 (0 -> 0), 5 (1.5 -> 0.75); each once.
    expectDist({ repeatPenalty: 2 }, [1, -2, 0.5, 0, 3, 0.75]);
    // last 2 tokens: 0 and 5 only.
    expectDist({ repeatPenalty: 2, repeatLastN: 2 }, [1, -1, 0.5, 0, 3, 0.75]);
    expectDist({ repeatPenalty: 2, repeatLastN: 0 }, [2, -1, 0.5, 0, 3, 1.5]);
    expectDist({ repeatPenalty: 2, repeatLastN: -1 }, [1, -2, 0.5, 0, 3, 0.75]);
    // frequency per occurrence (token 0 twice), presence once.
    expectDist({ frequencyPenalty: 0.5, presencePenalty: 0.25 }, [0.75, -1.75, 0.5, -0.75, 3, 0.75]);
  });
  it('changes the greedy choice and leaves the caller\'s logits alone', () => {
    const l = Float32Array.of(3, 2.5, -1);
    expect(new Sampler({ temperature: 0, repeatPenalty: 1.5 }).sample(l, [0])).toBe(1); // 3 / 1.5 = 2 < 2.5
    expect(new Sampler({ temperature: 0, repeatPenalty: 1.1 }).sample(l, [0])).toBe(0); // 2.73 > 2.5
    expect(Array.from(l)).toEqual([3, 2.5, -1]);
  });
});

describe('seeded draws', () => {
  const logits = randomF32(3000, 11).map((x) => x * 3);
  const draw = (seed: number, n = 200) => {
    const s = new Sampler({ temperature: 0.9, topK: 0, topP: 0.98, minP: 0, seed });
    return Array.from({ length: n }, () => s.sample(logits));
  };
  it('same seed and options give the same tokens; another seed others', () => {
    expect(draw(1234)).toEqual(draw(1234));
    expect(draw(2 ** 40 + 7)).toEqual(draw(2 ** 40 + 7));
    expect(draw(1234)).not.toEqual(draw(1235));
    expect(draw(7)).not.toEqual(draw(7 + 2 ** 32)); // the high half of the seed counts
  });
  it('the generator is uniform in [0, 1)', () => {
    const r = new Rng(99);
    const bins = new Array<number>(16).fill(0);
    const n = 64000;
    for (let i = 0; i < n; i++) {
      const x = r.next();
      expect(x >= 0 && x < 1).toBe(true);
      bins[Math.floor(x * 16)]!++;
    }
    const e = n / 16;
    const chi2 = bins.reduce((a, o) => a + (o - e) ** 2 / e, 0);
    expect(chi2).toBeLessThan(37.7); // df 15, p = 0.001
  });
  it('temperature draws follow softmax(logits / T) (chi-square, fixed seed)', () => {
    const l = Float32Array.of(1.2, -0.3, 0.4, 2.0, 0.9, -1.5, 0.0);
    for (const T of [0.5, 1, 2.5]) {
      const want = softmax(Array.from(l, (x) => x / T));
      const s = new Sampler({ ...plain, temperature: T, seed: 42 });
      const n = 30000;
      const counts = new Array<number>(l.length).fill(0);
      for (let i = 0; i < n; i++) counts[s.sample(l)]!++;
      const chi2 = counts.reduce((a, o, i) => a + (o - n * want[i]!) ** 2 / (n * want[i]!), 0);
      expect(chi2, `T=${T} counts ${counts}`).toBeLessThan(22.46); // df 6, p = 0.001
    }
  });
  it('a wrong distribution fails the same check (the test can fail)', () => {
    const l = Float32Array.of(1.2, -0.3, 0.4, 2.0, 0.9, -1.5, 0.0);
    const wrong = softmax(Array.from(l, (x) => x / 1.2));
    const s = new Sampler({ ...plain, temperature: 1, seed: 42 });
    const n = 30000;
    const counts = new Array<number>(l.length).fill(0);
    for (let i = 0; i < n; i++) counts[s.sample(l)]!++;
    const chi2 = counts.reduce((a, o, i) => a + (o - n * wrong[i]!) ** 2 / (n * wrong[i]!), 0);
    expect(chi2).toBeGreaterThan(22.46);
  });
});

describe('NaN logits', () => {
  it('are never drawn and do not disturb the others\' probabilities', () => {
    const l = Float32Array.of(1, NaN, 0.5, NaN, -1);
    const want = softmax([1, 0.5, -1]);
    for (const opts of [{ ...plain }, { ...plain, topK: 4 }, { ...plain, topP: 0.999 }, { ...plain, minP: 0.01 }]) {
      const c = new Sampler(opts).candidates(l);
      const got = new Map<number, number>();
      c.tokens.forEach((t, i) => got.set(t, c.probs[i]!));
      expect(got.get(0), JSON.stringify(opts)).toBeCloseTo(want[0]!, 9);
      expect(got.get(2)).toBeCloseTo(want[1]!, 9);
      expect(got.get(4)).toBeCloseTo(want[2]!, 9);
      expect(got.get(1) ?? 0).toBe(0);
      expect(got.get(3) ?? 0).toBe(0);
    }
    const s = new Sampler({ ...plain, seed: 3 });
    for (let i = 0; i < 200; i++) expect([0, 2, 4]).toContain(s.sample(l));
  });
});

describe('validation', () => {
  const bad: [object, RegExp][] = [
    [{ temperature: -0.1 }, /options\.temperature must be a finite number >= 0, got -0\.1/],
    [{ temperature: NaN }, /options\.temperature .* got NaN/],
    [{ temperature: '1' }, /options\.temperature .* got "1"/],
    [{ topP: 0 }, /options\.topP must be a finite number in \(0, 1\], got 0/],
    [{ topP: 1.01 }, /options\.topP .* got 1\.01/],
    [{ topP: -0.5 }, /options\.topP/],
    [{ minP: -0.01 }, /options\.minP must be a finite number in \[0, 1\]/],
    [{ minP: 1.5 }, /options\.minP/],
    [{ topK: -1 }, /options\.topK must be an integer in \[0,/],
    [{ topK: 2.5 }, /options\.topK .* got 2\.5/],
    [{ seed: 1.5 }, /options\.seed must be an integer .* got 1\.5/],
    [{ seed: -1 }, /options\.seed/],
    [{ seed: 2 ** 53 }, /options\.seed/],
    [{ repeatPenalty: 0 }, /options\.repeatPenalty must be a finite number > 0/],
    [{ repeatLastN: -2 }, /options\.repeatLastN/],
    [{ frequencyPenalty: Infinity }, /options\.frequencyPenalty/],
    [{ temprature: 1 }, /unknown option 'temprature'; did you mean 'temperature'\?/],
    [{ top_p: 0.5 }, /unknown option 'top_p'; did you mean 'topP'\?/],
  ];
  for (const [opts, msg] of bad) {
    it(`rejects ${JSON.stringify(opts)}`, () => {
      expect(() => new Sampler(opts as never)).toThrow(InvalidArgumentError);
      expect(() => new Sampler(opts as never)).toThrow(msg);
    });
  }
  it('rejects options that are not an object', () => {
    expect(() => new Sampler(5 as never)).toThrow(InvalidArgumentError);
  });
});

// The native scans sampling runs on a Float32Array of 256 logits or more (elementwise family,
// sample_argmax / sample_top_k): every variant against the TypeScript loops, on lengths at and
// around the 8- and 16-lane edges, with ties, NaN, infinities and signed zeros, rows that keep
// replacing the heap's root (ascending) or never do (descending), and rows without a winner.
describe('native sampling kernels', () => {
  const simd = devices().cpu.simd;
  const variants: NativeElementwiseVariant[] = ['reference', 'scalar', 'auto',
    ...(simd !== 'scalar' ? ['avx2' as const] : []), ...(simd === 'avx512' ? ['avx512' as const] : [])];
  const rows = (n: number): [string, Float32Array][] => {
    const tied = randomF32(n, n + 7).map((x) => Math.round(x * 8) / 8);
    const odd = randomF32(n, n + 11);
    for (let i = 0; i < n; i += 5) odd[i] = NaN;
    if (n > 3) { odd[1] = Infinity; odd[2] = -Infinity; odd[3] = -0; }
    if (n > 20) { odd[n - 1] = Infinity; odd[17] = 0; }
    return [['tied', tied], ['odd', odd], ['ascending', Float32Array.from({ length: n }, (_, i) => i / 4)],
      ['descending', Float32Array.from({ length: n }, (_, i) => -i)], ['constant', new Float32Array(n).fill(2)],
      ['all NaN', new Float32Array(n).fill(NaN)], ['all -Infinity', new Float32Array(n).fill(-Infinity)]];
  };
  it('argmax and top-k give the TypeScript loops\' results on every variant', () => {
    for (const n of [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 255, 256, 4099, 128256]) {
      for (const [name, x] of rows(n)) {
        const want = argmaxLoop(x);
        for (const v of variants) expect(native().sampleArgmax(x, v), `argmax ${name} n=${n} ${v}`).toBe(want);
        for (const k of [1, 2, 8, 40, n - 1, n]) {
          if (k < 1 || k > n || (n > 4099 && k > 40)) continue;
          const top = Array.from(topKLoop(x, k));
          for (const v of variants) {
            const out = new Int32Array(k + 1).fill(-7);
            const kept = native().sampleTopK(x, k, out, v);
            expect(Array.from(out.subarray(0, kept)), `top-${k} ${name} n=${n} ${v}`).toEqual(top);
            expect(out[k], 'nothing written past k').toBe(-7);
          }
        }
      }
    }
  });
  it('the native full ranking (top-p without top-k) gives the TypeScript ranking', () => {
    for (const n of [1, 2, 7, 255, 256, 4099, 128256]) {
      for (const [name, x] of rows(n)) {
        const want = Array.from(topKLoop(x, n));
        const out = new Int32Array(n + 1).fill(-7);
        const kept = native().sampleRank(x, out);
        expect(Array.from(out.subarray(0, kept)), `rank ${name} n=${n}`).toEqual(want);
        expect(out[n], 'nothing written past x.length').toBe(-7);
      }
    }
    const x = randomF32(9000, 5).map((v) => Math.round(v * 16) / 16);
    expect(Array.from(topK(x, 3000))).toEqual(ranked(x).slice(0, 3000));  // past the heap: the ranking
    const o = { ...plain, topK: 0, topP: 0.9, temperature: 0.7 };
    for (const seed of [1, 2, 3]) {
      // The chain over a whole row ranked natively picks what the TypeScript ranking picks.
      const c = new Sampler({ ...o, seed }).candidates(x);
      const ids = ranked(x);
      expect(Array.from(c.tokens)).toEqual(ids.slice(0, c.tokens.length));
    }
  });
  // Each term is a float exp within a few ulp of the double one (<= 2^-21 relative, the difference
  // x - max rounded to float adding |x - max| * 2^-24), summed in double: the sum within 2^-20 of the
  // double loop's, relatively, for rows whose terms that matter lie within ~16 of the max.
  it('the exp sum (top-p\'s normaliser) gives the TypeScript loop\'s within float exp rounding on every variant', () => {
    for (const n of [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 255, 256, 4099, 128256]) {
      for (const [name, x] of rows(n)) {
        const finite = Array.from(x).filter((v) => Number.isFinite(v));
        const max = x[argmaxLoop(x)]!;
        for (const m of [max, finite.length ? Math.max(...finite.slice(0, 64)) : 0]) {
          const want = expSumLoop(x, m);
          for (const v of variants) {
            const got = native().sampleExpSum(x, m, v);
            if (Number.isNaN(want)) continue;
            if (want === 0 || !Number.isFinite(want)) expect(got, `${name} n=${n} ${v}`).toBe(want);
            else expect(Math.abs(got / want - 1), `${name} n=${n} max ${m} ${v}: ${got} vs ${want}`).toBeLessThan(2 ** -20);
          }
        }
      }
    }
    // Typical logits: 128k values around 0, a max of ~25.
    const logits = randomF32(128256, 9).map((v) => v * 8);
    logits[777] = 25;
    const want = expSumLoop(logits, 25);
    expect(Math.abs(expSum(logits, 25) / want - 1)).toBeLessThan(2 ** -20);
    expect(expSum(Array.from(logits.subarray(0, 300)), 25)).toBe(expSumLoop(logits.subarray(0, 300), 25));  // plain arrays: the loop
    expect(() => native().sampleExpSum(Array.from(logits) as never, 0, 'auto')).toThrow(/sampleExpSum: x must be a Float32Array/);
    expect(() => native().sampleExpSum(logits, 'x' as never, 'auto')).toThrow(/sampleExpSum: max must be a number/);
  });
  it('argmax and topK take the kernels from 256 Float32Array logits on, with the same results', () => {
    const x = randomF32(5000, 3).map((v) => Math.round(v * 4) / 4);
    expect(argmax(x)).toBe(argmaxLoop(x));
    expect(Array.from(topK(x, 40))).toEqual(Array.from(topKLoop(x, 40)));
    expect(Array.from(topK(x, 5000))).toEqual(ranked(x));
    expect(argmax(Array.from(x))).toBe(argmaxLoop(x));  // plain arrays: the loop
  });
  it('rejects bad input with typed errors naming it', () => {
    const x = randomF32(64, 1);
    expect(() => native().sampleArgmax(new Float32Array(0), 'auto')).toThrow(/sampleArgmax: x must hold 1 to 2\^31 - 1 values/);
    expect(() => native().sampleArgmax(Array.from(x) as never, 'auto')).toThrow(/sampleArgmax: x must be a Float32Array/);
    const out = new Int32Array(64);
    expect(() => native().sampleTopK(x, 0, out, 'auto')).toThrow(/sampleTopK: k must be in \[1, x.length\]/);
    expect(() => native().sampleTopK(x, 65, new Int32Array(65), 'auto')).toThrow(/sampleTopK: k must be in \[1, x.length\]/);
    expect(() => native().sampleTopK(x, 2.5, out, 'auto')).toThrow(/sampleTopK: k must be a non-negative integer/);
    expect(() => native().sampleTopK(x, 8, new Int32Array(7), 'auto')).toThrow(/sampleTopK: out must hold k values/);
    expect(() => native().sampleTopK(x, 8, new Float32Array(8) as never, 'auto')).toThrow(/sampleTopK: out must be an Int32Array/);
    expect(() => native().sampleTopK(x, 4, out, 'fast' as never)).toThrow(/sampleTopK: unknown variant/);
    expect(() => native().sampleRank(x, new Int32Array(63))).toThrow(/sampleRank: out must hold x.length values/);
    expect(() => native().sampleRank(x, new Uint32Array(64) as never)).toThrow(/sampleRank: out must be an Int32Array/);
    expect(() => native().sampleRank(Array.from(x) as never, out)).toThrow(/sampleRank: x must be a Float32Array/);
    if (simd !== 'avx512') expect(() => native().sampleTopK(x, 4, out, 'avx512')).toThrow(/sampleTopK: variant unavailable/);
  });
});
