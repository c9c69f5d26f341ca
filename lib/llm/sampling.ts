/**
 * Token sampling over a Float32Array of logits: a few passes over one vocabulary row, in
 * TypeScript but for the two scans over the whole row (argmax, top-k), which from 256 logits on
 * are synchronous calls of native SIMD kernels (NATIVE_FROM below: at a 128k vocabulary the loops
 * took 0.14-0.45 ms of the event loop per token; no pool job, whose hand-off would cost as much).
 *
 * The chain is llama.cpp's default order (common_params_sampling.samplers), restricted to the
 * samplers sonde implements:
 *   penalties -> top-k -> top-p -> min-p -> temperature -> draw
 * so top-k, top-p and min-p judge the distribution *before* temperature, exactly as llama.cpp
 * does; temperature then only reshapes the surviving candidates. `temperature: 0` is greedy: the
 * argmax of the penalised logits (the first one on ties), as llama.cpp's temperature sampler keeps
 * only the maximum when t <= 0.
 *
 * - Repetition penalty (llama.cpp semantics): every distinct token among the last `repeatLastN`
 *   tokens of the history gets its logit divided by `repeatPenalty` when positive and multiplied
 *   when negative or zero; `frequencyPenalty * count + presencePenalty` is then subtracted.
 * - top-k keeps the k largest logits (0 = off), found by a size-k heap, not a sort of the vocabulary.
 * - top-p sorts the candidates by probability and keeps the shortest prefix whose cumulative
 *   probability reaches p (at least one token; p = 1 is off).
 * - min-p keeps the tokens whose probability is at least minP times the largest (0 = off).
 * Ties between equal logits are broken towards the lower token id, so results never depend on
 * the order a sort happened to leave.
 *
 * Random numbers: xoshiro128** (Blackman and Vigna), its 128-bit state filled from the seed by
 * splitmix32 over the seed's low and high 32-bit halves; a draw is the top 32 bits of one output as
 * a float in [0, 1). Same seed, options, history and logits give the same tokens on every platform
 * (only integer arithmetic via Math.imul and float64 sums in a fixed order are involved). Without a
 * seed, one is taken from crypto.getRandomValues.
 */
import { native } from '../binding.js';
import { InvalidArgumentError } from '../errors.js';
import { checkInt, checkOptions, describe } from '../validate.js';

export interface SamplingOptions {
  /** 0 = greedy (default 0, as node-llama-cpp). Must be >= 0. */
  temperature?: number;
  /** Keep the k most likely tokens; 0 = off. Default 40 (llama.cpp's). */
  topK?: number;
  /** Nucleus sampling threshold in (0, 1]; 1 = off. Default 0.95 (llama.cpp's). */
  topP?: number;
  /** Minimum probability relative to the most likely token, in [0, 1]; 0 = off. Default 0.05 (llama.cpp's). */
  minP?: number;
  /** > 0; 1 = off (default). */
  repeatPenalty?: number;
  /** How many of the latest tokens (prompt included) the penalties look at; -1 = all. Default 64. */
  repeatLastN?: number;
  /** Subtracted per occurrence in the window (default 0). */
  frequencyPenalty?: number;
  /** Subtracted once if present in the window (default 0). */
  presencePenalty?: number;
  /** Integer in [0, 2^53); same seed, options and logits give the same tokens. Default: random. */
  seed?: number;
}

export const SAMPLING_OPTIONS: readonly (keyof SamplingOptions)[] = [
  'temperature', 'topK', 'topP', 'minP', 'repeatPenalty', 'repeatLastN', 'frequencyPenalty', 'presencePenalty', 'seed',
];

export type ResolvedSampling = Required<SamplingOptions>;

function checkNumber(where: string, value: unknown, ok: (v: number) => boolean, range: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || !ok(value)) {
    throw new InvalidArgumentError(`${where} must be a finite number${range ? ` ${range}` : ''}, got ${describe(value)}`);
  }
  return value;
}

function randomSeed(): number {
  const w = crypto.getRandomValues(new Uint32Array(2));
  return (w[0]! & 0x1fffff) * 2 ** 32 + w[1]!;
}

/**
 * Validates sampling options (each error names the option) and fills in the defaults. `known`
 * lets a caller accept its own options in the same object (misspellings are checked against all).
 */
export function resolveSampling(where: string, options: unknown, known: readonly string[] = SAMPLING_OPTIONS): ResolvedSampling {
  const o = checkOptions<SamplingOptions>(where, options, known);
  return {
    temperature: o.temperature === undefined ? 0 : checkNumber(`${where}: options.temperature`, o.temperature, (v) => v >= 0, '>= 0'),
    topK: o.topK === undefined ? 40 : checkInt(`${where}: options.topK`, o.topK, 0),
    topP: o.topP === undefined ? 0.95 : checkNumber(`${where}: options.topP`, o.topP, (v) => v > 0 && v <= 1, 'in (0, 1]'),
    minP: o.minP === undefined ? 0.05 : checkNumber(`${where}: options.minP`, o.minP, (v) => v >= 0 && v <= 1, 'in [0, 1]'),
    repeatPenalty: o.repeatPenalty === undefined ? 1 : checkNumber(`${where}: options.repeatPenalty`, o.repeatPenalty, (v) => v > 0, '> 0'),
    repeatLastN: o.repeatLastN === undefined ? 64 : checkInt(`${where}: options.repeatLastN`, o.repeatLastN, -1),
    frequencyPenalty: o.frequencyPenalty === undefined ? 0 : checkNumber(`${where}: options.frequencyPenalty`, o.frequencyPenalty, () => true, ''),
    presencePenalty: o.presencePenalty === undefined ? 0 : checkNumber(`${where}: options.presencePenalty`, o.presencePenalty, () => true, ''),
    seed: o.seed === undefined ? randomSeed() : checkInt(`${where}: options.seed`, o.seed, 0),
  };
}

function splitmix32(state: { s: number }): number {
  let z = (state.s = (state.s + 0x9e3779b9) | 0);
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

/** xoshiro128** seeded through splitmix32; next() is uniform in [0, 1) with 32 random bits. */
export class Rng {
  #s = new Uint32Array(4);

  constructor(seed: number) {
    checkInt('Rng: seed', seed, 0);
    const lo = { s: seed >>> 0 };
    const hi = { s: Math.floor(seed / 2 ** 32) ^ 0x6a09e667 };
    this.#s[0] = splitmix32(lo);
    this.#s[1] = splitmix32(hi);
    this.#s[2] = splitmix32(lo);
    this.#s[3] = splitmix32(hi);
    // xoshiro's one bad state; splitmix32 of distinct counters never yields four zeros, but be sure.
    if ((this.#s[0] | this.#s[1] | this.#s[2] | this.#s[3]) === 0) this.#s[0] = 1;
  }

  nextUint32(): number {
    const s = this.#s;
    const x = Math.imul(s[1]!, 5);
    const result = Math.imul((x << 7) | (x >>> 25), 9) >>> 0;
    const t = s[1]! << 9;
    s[2]! ^= s[0]!;
    s[3]! ^= s[1]!;
    s[1]! ^= s[2]!;
    s[0]! ^= s[3]!;
    s[2]! ^= t;
    s[3] = (s[3]! << 11) | (s[3]! >>> 21);
    return result;
  }

  next(): number {
    return this.nextUint32() / 2 ** 32;
  }

  /** The generator's state (4 words), live: a device that draws for it writes its state back here. */
  get state(): Uint32Array {
    return this.#s;
  }
}

/** The most top-k candidates a device chain samples from (kernels/llm/cuda/llm.cu: kChainTopK). */
export const CHAIN_TOP_K = 64;

/**
 * How a pool that chains decode steps on its device (KvPool.stepChain) draws a sequence's tokens
 * as Sampler.sample would: params = [temperature, topK, topP, log(minP) or -Infinity]
 * (temperature 0: the argmax), rng = the sampler's live generator state.
 */
export interface ChainSampler {
  params: readonly [number, number, number, number];
  rng: Uint32Array;
}

/** The distribution a draw is taken from: tokens by decreasing probability (ties: lower id first). */
export interface Candidates {
  tokens: Int32Array;
  probs: Float64Array;
}

// From this many logits on, a Float32Array's argmax and top-k run on the native SIMD kernels
// (elementwise family: sample_argmax / sample_top_k, synchronous calls). Measured here (AVX-512,
// steady state, by run): top-40 of 1024 logits 8.8-10.0 -> 2.0-2.7 us, of 128k 441 -> 8-17 us;
// argmax of 1024 1.1-1.3 -> 0.2-0.4 us, of 128k 137 -> 8 us; at 256 about even (the call's fixed
// cost). The loops here stay the reference the kernels are tested against.
const NATIVE_FROM = 256;

/**
 * Sum of exp(v - max) over the values (NaN skipped, a term that underflows counts 0): top-p's
 * normaliser over a whole row. A Float32Array row from NATIVE_FROM on takes the native kernel
 * (float exp, double sum: 128k logits in tens of microseconds, where this loop takes ~1.7 ms).
 */
export function expSum(values: ArrayLike<number>, max: number): number {
  if (values instanceof Float32Array && values.length >= NATIVE_FROM) return native().sampleExpSum(values, max, 'auto');
  return expSumLoop(values, max);
}

/** expSum's TypeScript loop (the reference for the native kernels). */
export function expSumLoop(values: ArrayLike<number>, max: number): number {
  let z = 0;
  for (let i = 0; i < values.length; i++) {
    const e = Math.exp(values[i]! - max);
    if (e > 0) z += e;
  }
  return z;
}

/** Index of the largest value; the first one on ties; NaN never wins. */
export function argmax(values: ArrayLike<number>): number {
  if (values instanceof Float32Array && values.length >= NATIVE_FROM) return native().sampleArgmax(values, 'auto');
  return argmaxLoop(values);
}

/** argmax's TypeScript loop (the reference for the native kernels). */
export function argmaxLoop(values: ArrayLike<number>): number {
  let best = 0;
  let bestV = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i]!;
    if (v > bestV) { bestV = v; best = i; }
  }
  return best;
}

/** a ranks before b: larger value, or equal value and lower id. */
function before(values: ArrayLike<number>, a: number, b: number): boolean {
  const va = values[a]!;
  const vb = values[b]!;
  return va > vb || (va === vb && a < b);
}

/**
 * The `k` best token ids among `pool` (all ids when null) in rank order. A min-heap of size k
 * (its root is the worst kept token) makes this O(n log k); most tokens are rejected by one
 * comparison with the root.
 */
export function topK(values: ArrayLike<number>, k: number, pool: Int32Array | null = null): Int32Array {
  if (!pool && values instanceof Float32Array && values.length >= NATIVE_FROM && k >= 1) {
    if (k <= HEAP_MAX_K) {
      k = Math.min(k, values.length);
      if (topKIds.length < k) topKIds = new Int32Array(Math.max(k, 64));
      return topKIds.slice(0, native().sampleTopK(values, k, topKIds, 'auto'));
    }
    // Past a heap's reach (top-p without top-k ranks the whole row): the native radix ranking,
    // 128k logits in ~1 ms where rankPacked's sort takes ~13.
    const ranked = new Int32Array(values.length);
    return ranked.subarray(0, Math.min(k, native().sampleRank(values, ranked)));
  }
  return topKLoop(values, k, pool);
}

// The kernel's output, reused (each result is a copy of its first ids).
let topKIds = new Int32Array(64);

/** topK's TypeScript forms (the reference for the native kernel). */
export function topKLoop(values: ArrayLike<number>, k: number, pool: Int32Array | null = null): Int32Array {
  const n = pool ? pool.length : values.length;
  k = Math.min(k, n);
  if (k > HEAP_MAX_K && values.length <= MAX_PACKED_ID + 1) return rankPacked(values, k, pool);
  const heap = new Int32Array(k);
  let size = 0;
  const worse = (a: number, b: number) => before(values, b, a);
  const siftDown = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      if (l >= size) return;
      let w = l;
      if (l + 1 < size && worse(heap[l + 1]!, heap[l]!)) w = l + 1;
      if (!worse(heap[w]!, heap[i]!)) return;
      const t = heap[i]!; heap[i] = heap[w]!; heap[w] = t;
      i = w;
    }
  };
  for (let j = 0; j < n && k > 0; j++) {
    const id = pool ? pool[j]! : j;
    const v = values[id]!;
    if (Number.isNaN(v)) continue;
    if (size < k) {
      let i = size++;
      heap[i] = id;
      while (i > 0) {
        const p = (i - 1) >> 1;
        if (!worse(heap[i]!, heap[p]!)) break;
        const t = heap[i]!; heap[i] = heap[p]!; heap[p] = t;
        i = p;
      }
    } else if (before(values, id, heap[0]!)) {
      heap[0] = id;
      siftDown(0);
    }
  }
  // Pop the worst to the back, leaving the array in rank order.
  const total = size;
  while (size > 1) {
    const t = heap[0]!; heap[0] = heap[size - 1]!; heap[size - 1] = t;
    size--;
    siftDown(0);
  }
  return total === k ? heap : heap.subarray(0, total);
}

// Past a few thousand kept tokens a heap's comparisons (a JS call each) lose to one native sort.
const HEAP_MAX_K = 2048;
const ID_BITS = 21;
const MAX_PACKED_ID = 2 ** ID_BITS - 1;
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/**
 * Ranks by sorting float64 keys natively (no comparator): the float32 value's bits made
 * order-preserving (32 bits) above the inverted id (21 bits) are an exact 53-bit integer, so
 * ascending keys are ascending (value, -id); the best are read from the end.
 */
function rankPacked(values: ArrayLike<number>, k: number, pool: Int32Array | null): Int32Array {
  const n = pool ? pool.length : values.length;
  const keys = new Float64Array(n);
  let m = 0;
  for (let j = 0; j < n; j++) {
    const id = pool ? pool[j]! : j;
    const v = values[id]!;
    if (Number.isNaN(v)) continue;
    f32[0] = v + 0; // -0 ranks equal to +0, as in the heap's comparisons
    const bits = u32[0]!;
    const ordered = (bits & 0x80000000 ? ~bits : bits | 0x80000000) >>> 0;
    keys[m++] = ordered * 2 ** ID_BITS + (MAX_PACKED_ID - id);
  }
  const sorted = keys.subarray(0, m).sort();
  const out = new Int32Array(Math.min(k, m));
  for (let i = 0; i < out.length; i++) out[i] = MAX_PACKED_ID - (sorted[m - 1 - i]! % 2 ** ID_BITS);
  return out;
}

/**
 * Applies the repetition, frequency and presence penalties to `logits` in place and returns what
 * restores it (null when nothing changed): the penalised entries are at most repeatLastN, while a
 * copy of a 128k row cost 50-70 us a token.
 */
function penalize(logits: Float32Array, history: ArrayLike<number>, o: Pick<ResolvedSampling,
  'repeatPenalty' | 'repeatLastN' | 'frequencyPenalty' | 'presencePenalty'>): (() => void) | null {
  if (o.repeatPenalty === 1 && o.frequencyPenalty === 0 && o.presencePenalty === 0) return null;
  const start = o.repeatLastN < 0 ? 0 : Math.max(0, history.length - o.repeatLastN);
  if (start >= history.length) return null;
  const counts = new Map<number, number>();
  for (let i = start; i < history.length; i++) {
    const t = history[i]!;
    if (t >= 0 && t < logits.length) counts.set(t, (counts.get(t) ?? 0) + 1);
  }
  const ids = new Int32Array(counts.size), saved = new Float32Array(counts.size);
  let j = 0;
  for (const [t, c] of counts) {
    ids[j] = t;
    saved[j++] = logits[t]!;
    let l = logits[t]!;
    l = l <= 0 ? l * o.repeatPenalty : l / o.repeatPenalty;
    logits[t] = l - c * o.frequencyPenalty - o.presencePenalty;
  }
  return () => {
    for (let i = 0; i < ids.length; i++) logits[ids[i]!] = saved[i]!;
  };
}

/** Stateful sampler: the options of one generation and its random stream. */
export class Sampler {
  readonly options: ResolvedSampling;
  #rng: Rng;

  constructor(options?: SamplingOptions, where = 'Sampler') {
    this.options = resolveSampling(where, options);
    this.#rng = new Rng(this.options.seed);
  }

  /**
   * What a device needs to draw this sampler's tokens itself (KvPool.stepChain) from a vocabulary
   * of `vocab`, or undefined where it cannot: penalties (they read the history), or temperature > 0
   * with top-k off or above CHAIN_TOP_K (the chain then ranks more than a device block holds).
   */
  chainSampler(vocab: number): ChainSampler | undefined {
    const o = this.options;
    if (o.repeatPenalty !== 1 || o.frequencyPenalty !== 0 || o.presencePenalty !== 0) return undefined;
    if (o.temperature <= 0 || vocab <= 1) return { params: [0, 0, 1, -Infinity], rng: this.#rng.state };
    if (!(o.topK > 0 && o.topK < vocab && o.topK <= CHAIN_TOP_K)) return undefined;
    return { params: [o.temperature, o.topK, o.topP, o.minP > 0 ? Math.log(o.minP) : -Infinity], rng: this.#rng.state };
  }

  /** The candidates the chain leaves and their probabilities after temperature. */
  candidates(logits: Float32Array, history: ArrayLike<number> = []): Candidates {
    // Penalised in place for the chain and restored before returning: the caller's row is unchanged.
    const restore = penalize(logits, history, this.options);
    try {
      return this.#chain(logits);
    } finally {
      restore?.();
    }
  }

  #chain(values: Float32Array): Candidates {
    const o = this.options;
    const vocab = values.length;
    if (o.temperature <= 0 || vocab <= 1) {
      return { tokens: Int32Array.of(argmax(values)), probs: Float64Array.of(1) };
    }
    let sorted: Int32Array | null; // candidates in rank order, or null for "every token, by id"
    let max: number;
    let z = 0; // softmax normaliser over the set top-p sees (after top-k)
    const minLogit = o.minP > 0 ? Math.log(o.minP) : -Infinity;
    if (o.topK > 0 && o.topK < vocab) {
      sorted = topK(values, o.topK);
      max = values[sorted[0]!]!;
      for (const id of sorted) z += Math.exp(values[id]! - max);
    } else {
      max = values[argmax(values)]!;
      // NaN logits (a broken model) count as impossible rather than poisoning every sum. Only
      // top-p reads z (a pass of exp over the whole row).
      if (o.topP < 1) z = expSum(values, max);
      if (o.minP > 0) {
        // min-p and top-p both keep a prefix of the ranking, so the result is their intersection
        // whatever the order: cut by min-p first (one pass) and sort only what survives.
        const pool: number[] = [];
        for (let i = 0; i < vocab; i++) if (values[i]! - max >= minLogit) pool.push(i);
        sorted = topK(values, pool.length, Int32Array.from(pool));
      } else if (o.topP < 1) {
        // The nucleus is usually small: rank a few hundred first; if it is not inside, rank all
        // (one native sort, cheaper than widening in steps).
        for (let m = Math.min(256, vocab); ; m = m * 8 > HEAP_MAX_K ? vocab : m * 8) {
          sorted = topK(values, m);
          let cum = 0;
          for (const id of sorted) cum += Math.exp(values[id]! - max);
          if (cum >= o.topP * z || m === vocab) break;
        }
      } else {
        sorted = null;
      }
    }
    if (!Number.isFinite(max)) return { tokens: Int32Array.of(argmax(values)), probs: Float64Array.of(1) };
    let kept = sorted ? sorted.length : vocab;
    if (sorted && o.topP < 1) {
      let cum = 0;
      for (let i = 0; i < sorted.length; i++) {
        cum += Math.exp(values[sorted[i]!]! - max) / z;
        if (cum >= o.topP) { kept = i + 1; break; }
      }
    }
    if (sorted && o.minP > 0) {
      let i = 1;
      while (i < kept && values[sorted[i]!]! - max >= minLogit) i++;
      kept = i;
    }
    let tokens: Int32Array;
    if (sorted) {
      tokens = sorted.slice(0, kept);
    } else {
      tokens = new Int32Array(vocab);
      for (let i = 0; i < vocab; i++) tokens[i] = i;
    }
    const probs = new Float64Array(kept);
    let sum = 0;
    for (let i = 0; i < kept; i++) {
      const e = Math.exp((values[tokens[i]!]! - max) / o.temperature);
      sum += probs[i] = e > 0 ? e : 0;
    }
    for (let i = 0; i < kept; i++) probs[i]! /= sum;
    return { tokens, probs };
  }

  /** Picks the next token for `logits` given the tokens so far (`history`, for the penalties). */
  sample(logits: Float32Array, history: ArrayLike<number> = []): number {
    const { tokens, probs } = this.candidates(logits, history);
    if (tokens.length === 1) return tokens[0]!;
    const r = this.#rng.next();
    let cum = 0;
    for (let i = 0; i < tokens.length; i++) {
      cum += probs[i]!;
      if (r < cum) return tokens[i]!;
    }
    return tokens[tokens.length - 1]!;
  }
}
