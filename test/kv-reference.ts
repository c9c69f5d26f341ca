/**
 * A reference KvPool in TypeScript, faithful to the contract of lib/llm/engine.ts: a block stores
 * the token id written at each of its slots (-1 = never written), and the logits of a row are a
 * deterministic function of the tokens read back through the sequence's block table for
 * positions [0, pos]. A wrong table, a missed copy-on-write or a write into a block another
 * sequence reads therefore changes some logits, and the tests that compare against a direct
 * evaluation fail.
 */
import { AbortError, DisposedError, InvalidArgumentError } from '../lib/errors.js';
import type { ChainResult, ChainSampling, KvDtype, KvPool, StepBatch } from '../lib/llm/engine.js';
import { Sampler } from '../lib/llm/sampling.js';

export type LogitsFn = (prefix: readonly number[]) => Float32Array;

function fnv(tokens: readonly number[]): number {
  let h = 0x811c9dc5;
  for (const t of tokens) h = Math.imul(h ^ (t + 1), 0x01000193) >>> 0;
  return h;
}

/**
 * Pseudo-random logits of a prefix over `vocab` tokens in [0, scale), with a clear winner (+spike)
 * so greedy decoding is decisive: the next token is a hash of the whole prefix (so any misread
 * position changes it). spike 0: a flat spread for sampling.
 */
export function hashLogits(vocab: number, spike = 4, scale = 1): LogitsFn {
  return (prefix) => {
    const out = new Float32Array(vocab);
    let h = fnv(prefix);
    for (let v = 0; v < vocab; v++) {
      h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 0;
      out[v] = ((h >>> 8) / 2 ** 24) * scale;
    }
    out[fnv(prefix) % vocab]! += spike;
    return out;
  };
}

export function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

/** Greedy tokens after `prompt`, evaluated directly (no cache): the reference for generations. */
export function greedyDirect(fn: LogitsFn, prompt: readonly number[], count: number): number[] {
  const seq = prompt.slice();
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    const t = argmax(fn(seq));
    out.push(t);
    seq.push(t);
  }
  return out;
}

export interface StepRecord {
  /** Per sequence: tokens written and where. */
  sequences: { start: number; tokens: number[]; table: number[]; logits: string }[];
  copies: number[];
}

export interface ReferencePoolOptions {
  blockSize?: number;
  maxBlocks: number;
  vocab: number;
  logits: LogitsFn;
  /**
   * Milliseconds a step takes (a timer, so other work interleaves), plus rowDelayMs per token. The
   * pool's `now` clock advances by exactly this per step, so costs measured on it do not depend on
   * how busy the machine is.
   */
  delayMs?: number;
  rowDelayMs?: number;
  /** Called as a step starts (a test aborts from here, deterministically mid-step). */
  onStep?: (batch: StepBatch) => void;
  /** Called with every block a step writes, before it writes (a test asserts ownership here). */
  onWrite?: (block: number) => void;
  /** Offer stepChain (chained decode steps), as the transformer engines' pools do. */
  chains?: boolean;
  /** Called as a chain starts. */
  onChain?: (batch: StepBatch, steps: number) => void;
}

export class ReferenceKvPool implements KvPool {
  readonly blockSize: number;
  readonly maxBlocks: number;
  readonly dtype: KvDtype = 'f32';
  /** One int per slot, as if K and V were one 4-byte value per position. */
  readonly blockBytes: number;
  readonly steps: StepRecord[] = [];
  inFlight = 0;
  maxInFlight = 0;
  disposed = false;
  #slots = new Map<number, Int32Array>();
  #highWater = 0;
  #experts = new Float64Array(4);
  #options: ReferencePoolOptions;
  #chain: Promise<unknown> = Promise.resolve();
  #clockMs = 0;
  /** A simulated clock (ms): the sum of the delays of the steps run so far. */
  readonly now = (): number => this.#clockMs;
  /**
   * With options.chains: KvPool.stepChain as this pool's steps one after another, each token the
   * argmax or, with sampling, a Sampler's draw from a generator in the given state.
   */
  readonly stepChain?: (batch: StepBatch, steps: number, options?: { signal?: AbortSignal; sampling?: ChainSampling }) => Promise<ChainResult>;
  /** The length of every chain run. */
  readonly chains: number[] = [];

  constructor(options: ReferencePoolOptions) {
    this.blockSize = options.blockSize ?? 16;
    this.maxBlocks = options.maxBlocks;
    this.blockBytes = this.blockSize * 4;
    this.#options = options;
    if (options.chains) {
      this.stepChain = (batch, steps, o = {}) => {
        const run = () => this.#runChain(batch, steps, o.signal, o.sampling);
        const result = this.#chain.then(run, run);
        this.#chain = result.catch(() => undefined);
        return result;
      };
    }
  }

  async #runChain(batch: StepBatch, steps: number, signal: AbortSignal | undefined, sampling: ChainSampling | undefined): Promise<ChainResult> {
    if (!(Number.isInteger(steps) && steps >= 1)) throw new InvalidArgumentError(`reference pool: steps ${steps}`);
    this.#options.onChain?.(batch, steps);
    const n = batch.sequences.length, vocab = this.#options.vocab;
    const out = new Int32Array(steps * n);
    const rngOut = sampling ? new Uint32Array(4 * steps * n) : undefined;
    // A sampler per sequence with the chain's parameters, its generator set to the given state.
    const samplers = sampling ? batch.sequences.map((_, i) => {
      const [temperature, topK, topP, minLogit] = Array.from(sampling.params.subarray(4 * i, 4 * i + 4));
      const s = new Sampler({ temperature, topK, topP, minP: minLogit === -Infinity ? 0 : Math.exp(minLogit!), seed: 0 });
      s.chainSampler(vocab)!.rng.set(sampling.rng.subarray(4 * i, 4 * i + 4));
      return s;
    }) : undefined;
    let sequences = batch.sequences;
    for (const q of sequences) {
      if (q.tokens.length !== 1 || q.logits !== 'last') throw new InvalidArgumentError('reference pool: a chain takes one decode token per sequence');
      if (q.blockTable.length * this.blockSize < q.start + steps) throw new InvalidArgumentError('reference pool: a chain\'s table does not cover its steps');
    }
    for (let j = 0; j < steps; j++) {
      if (j > 0 && signal?.aborted) throw new AbortError();
      const rows = await this.#run(j === 0 && batch.copies ? { sequences, copies: batch.copies } : { sequences }, signal);
      sequences = sequences.map((q, i) => {
        const row = rows.subarray(i * vocab, (i + 1) * vocab);
        const t = samplers ? samplers[i]!.sample(row) : argmax(row);
        out[j * n + i] = t;
        if (samplers) rngOut!.set(samplers[i]!.chainSampler(vocab)!.rng, 4 * (j * n + i));
        return { ...q, start: q.start + 1, tokens: Int32Array.of(t) };
      });
    }
    this.chains.push(steps);
    return rngOut ? { tokens: out, rng: rngOut } : { tokens: out };
  }

  get bytes(): number {
    return this.#slots.size * this.blockBytes;
  }

  get highWaterBytes(): number {
    return this.#highWater;
  }

  #block(id: number): Int32Array {
    if (!Number.isInteger(id) || id < 0 || id >= this.maxBlocks) throw new InvalidArgumentError(`reference pool: block id ${id} outside [0, ${this.maxBlocks})`);
    let b = this.#slots.get(id);
    if (!b) {
      b = new Int32Array(this.blockSize).fill(-1);
      this.#slots.set(id, b);
      this.#highWater = Math.max(this.#highWater, this.bytes);
    }
    return b;
  }

  step(batch: StepBatch, options: { signal?: AbortSignal } = {}): Promise<Float32Array> {
    // Steps on one pool run one after another, as the native pool's do.
    const run = () => this.#run(batch, options.signal);
    const result = this.#chain.then(run, run);
    this.#chain = result.catch(() => undefined);
    return result;
  }

  async #run(batch: StepBatch, signal: AbortSignal | undefined): Promise<Float32Array> {
    if (this.disposed) throw new DisposedError('reference pool: disposed');
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      this.#options.onStep?.(batch);
      const tokens = batch.sequences.reduce((n, q) => n + q.tokens.length, 0);
      const delay = (this.#options.delayMs ?? 0) + (this.#options.rowDelayMs ?? 0) * tokens;
      if (delay > 0) await new Promise((r) => setTimeout(r, delay));
      this.#clockMs += delay;
      if (signal?.aborted) throw new AbortError();
      const bs = this.blockSize;
      const copies = Array.from(batch.copies ?? []);
      for (let i = 0; i < copies.length; i += 2) this.#block(copies[i + 1]!).set(this.#block(copies[i]!));
      // Every write first, then every read: a block written by one sequence and read by another
      // in the same step shows up in the reader's logits.
      for (const s of batch.sequences) {
        if (s.tokens.length === 0) throw new InvalidArgumentError('reference pool: a sequence with no tokens');
        if (s.blockTable.length < Math.ceil((s.start + s.tokens.length) / bs)) {
          throw new InvalidArgumentError(`reference pool: table of ${s.blockTable.length} blocks for ${s.start + s.tokens.length} positions`);
        }
        for (let i = 0; i < s.tokens.length; i++) {
          const p = s.start + i;
          const id = s.blockTable[Math.floor(p / bs)]!;
          this.#options.onWrite?.(id);
          this.#block(id)[p % bs] = s.tokens[i]!;
        }
      }
      const rows: Float32Array[] = [];
      for (const s of batch.sequences) {
        const read = (p: number) => {
          const out: number[] = [];
          for (let q = 0; q <= p; q++) out.push(this.#block(s.blockTable[Math.floor(q / bs)]!)[q % bs]!);
          return out;
        };
        const end = s.start + s.tokens.length;
        if (s.logits === 'last') rows.push(this.#options.logits(read(end - 1)));
        if (s.logits === 'all') for (let p = s.start; p < end; p++) rows.push(this.#options.logits(read(p)));
        for (const t of s.tokens) this.#experts[t % 4]!++;
      }
      this.steps.push({
        sequences: batch.sequences.map((s) => ({ start: s.start, tokens: Array.from(s.tokens), table: Array.from(s.blockTable), logits: s.logits })),
        copies,
      });
      const out = new Float32Array(rows.length * this.#options.vocab);
      rows.forEach((r, i) => out.set(r, i * this.#options.vocab));
      return out;
    } finally {
      this.inFlight--;
    }
  }

  async readBlocks(ids: Int32Array): Promise<Uint8Array> {
    const out = new Int32Array(ids.length * this.blockSize);
    ids.forEach((id, i) => out.set(this.#block(id), i * this.blockSize));
    return new Uint8Array(out.buffer);
  }

  async writeBlocks(ids: Int32Array, bytes: Uint8Array): Promise<void> {
    const v = new Int32Array(bytes.slice().buffer);
    ids.forEach((id, i) => this.#block(id).set(v.subarray(i * this.blockSize, (i + 1) * this.blockSize)));
  }

  expertCounts(): Float64Array {
    return this.#experts.slice();
  }

  dispose(): void {
    this.disposed = true;
  }
}
