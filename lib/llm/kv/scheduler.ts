/**
 * Continuous batching over one paged KV pool (issue #9). Every step is ONE KvPool.step call that
 * carries the decode token of every running sequence plus up to `prefillBudget` prompt tokens
 * (chunked prefill: a long prompt is spread over several steps, so the running decodes keep their
 * pace). Sequences join and leave at step boundaries; block ownership is the BlockManager's.
 *
 * A request is a prompt plus a callback: after the prompt, and after every token fed back, the
 * scheduler hands the callback that position's logits (synchronously, between steps) and the
 * callback returns the next token to feed, or undefined to end. Sampling thus stays with the
 * caller (lib/llm/sampling.ts), and a slow consumer never stalls a step.
 *
 * Rules:
 * - Prompt chunks beside running decodes are sized so that a step takes at most about twice a
 *   decode-only step (PREFILL_STALL): the scheduler keeps the median of recent decode steps'
 *   times (one step in WINDOW + 1 carries decodes only, to keep it current) and the cost of a
 *   prompt token beside them pooled over recent chunks, and gives prompts `prefillBudget` tokens only when
 *   nothing is decoding. So a long prompt arriving among running generations stretches their
 *   inter-token latency by at most ~2x instead of by a whole 512-token prefill. The chunk has no
 *   floor above one token: where a prompt token costs more than a decode step (an MoE model on
 *   two threads: ~17 ms against ~70 ms for 7 decodes), a fixed 16-token floor made every step
 *   ~5x a decode step. A median decode step rather than a mean: a preempted step on a shared
 *   machine is 2-4x the typical one, and a mean pulled up by it would size the chunks for a
 *   slower machine.
 * - Admission is first come, first served, up to `maxConcurrency` running sequences, and only
 *   when the pool can hold the rest of the prompt and one more token beside what the running
 *   prompts still need; otherwise the request waits (at most `maxQueue` wait; beyond that
 *   QueueFullError at once). A request that could never fit (its prompt and one generated token
 *   need more blocks than the whole pool, or the prompt is longer than the context) fails at once.
 * - A new prompt starts from the longest cached prefix (BlockManager.open), always computing at
 *   least its last token (whose logits it needs). Requests for every prompt row ('all') compute
 *   from position 0.
 * - When a running decode needs a block and none is free or cached, the newest running sequence
 *   is preempted: its blocks are released (its published blocks stay cached, so it resumes cheaply)
 *   and it is queued again at the head, to recompute what it had. A sequence alone that fills the
 *   whole pool fails with OutOfMemoryError.
 * - An aborted request leaves at the next step boundary (a waiting one at once), its unshared
 *   blocks freed; a step whose sequences are all aborted is cancelled. A failed step fails the
 *   requests in it and publishes none of their unfinished blocks.
 * - dispose() rejects waiting requests and ends running ones with DisposedError; whenIdle() tells
 *   when the last step has returned (the pool may be disposed then).
 *
 * Retained sequences (for chats, lib/llm/chat.ts): a request with `retain: true` ends with its
 * blocks still referenced, as a RetainedSequence holding the tokens in its cache. A later request
 * with `continueFrom: retained` starts from those blocks (the longest common prefix of its prompt
 * and the retained tokens) instead of a cache lookup, so nothing it relies on can be evicted.
 * The new request takes its own references when submitted: release() the old handle right after
 * submitting (or keep it to branch the conversation; a shared last block is then copied on write).
 */
import { AbortError, DisposedError, InternalError, InvalidArgumentError, OutOfMemoryError, QueueFullError } from '../../errors.js';
import type { ChainSampling, KvPool, StepSequence } from '../engine.js';
import type { ChainSampler } from '../sampling.js';
import { BlockManager, type BlockStats, type SequenceBlocks } from './blocks.js';

// The most logits (floats) kept for reuse across steps: 64 MB, e.g. 128 decoding sequences of a
// 128k vocabulary. A larger step (a long prompt that wants every row) gets an array of its own.
const MAX_REUSED_LOGITS = 16 * 1024 * 1024;

export interface SchedulerOptions {
  /** Tokens one sequence may hold (prompt and generated). */
  contextSize: number;
  /** Rows of a logits vector (the pool's model). */
  vocabSize: number;
  /** Most sequences running at once (default 16). */
  maxConcurrency?: number;
  /**
   * Prompt tokens per step, over all prefilling sequences (default 512). While other sequences
   * decode, a step carries fewer: as many as keep it within about twice a decode step's time.
   */
  prefillBudget?: number;
  /** Most requests waiting for admission (default Infinity). */
  maxQueue?: number;
  /** Reuse cached prefixes across requests (default true). */
  prefixCaching?: boolean;
  /**
   * How long a chain of decode steps may run (seconds; default 0.01; 0: no chains), where the pool
   * chains steps (KvPool.stepChain) and every running request's tokens can be chosen on the device
   * (SequenceRequest.chain). The environment variable SONDE_LLM_CHAIN_MS overrides the default (an
   * A/B switch).
   */
  chainSeconds?: number;
  /**
   * The clock (milliseconds) that step costs are measured with (default performance.now). Chunk
   * sizes follow measured costs, so a test gives a simulated clock to make them reproducible.
   */
  now?: () => number;
}

export interface SequenceRequest {
  /** The whole prompt (token ids; at least one). */
  tokens: readonly number[];
  /**
   * 'last': the prompt's last row goes to onLogits, which drives the decoding. 'all': every prompt
   * row is computed (from position 0, no reuse) and returned in the result; there is no decoding.
   */
  logits: 'last' | 'all';
  /**
   * Receives the logits (vocabSize values, a view valid only during the call) after the prompt and after each
   * token it returned, and `length`, the tokens now in the sequence's cache. Returns the next token
   * to feed, or undefined to end. A token is not fed when the cache is full (length ===
   * contextSize): the request ends instead. Throwing ends the request with that error.
   */
  onLogits?: (logits: Float32Array, length: number) => number | undefined;
  signal?: AbortSignal;
  /**
   * Set when a device can choose the request's next tokens as onLogits would: the argmax, or the
   * draw of a Sampler without penalties (`sampler`, sampling.ts's ChainSampler; its generator state
   * is kept in step with the tokens taken). On a pool that chains steps on its device
   * (KvPool.stepChain), the scheduler then lets the pool choose and feed the tokens, several steps
   * per call, and tells them here instead of calling onLogits (which still receives the prompt's
   * logits).
   */
  chain?: {
    sampler: ChainSampler;
    /**
     * The token chosen from the logits after the cache reached `length` tokens: what onLogits
     * would have returned. Returns whether to feed it (false ends the request, as onLogits
     * returning undefined). Throwing ends the request with that error.
     */
    onToken(token: number, length: number): boolean;
    /** The most tokens the request may still take (Infinity: no limit); chains go no further. */
    remaining(): number;
  };
  /** End with the blocks still referenced, as `result.retained` (see the header). */
  retain?: boolean;
  /** Start from a retained sequence's blocks rather than from a cache lookup. */
  continueFrom?: RetainedSequence;
}

export interface SequenceResult {
  /** 'all' requests: [tokens.length x vocabSize]. */
  logits?: Float32Array;
  retained?: RetainedSequence;
}

/** What the scheduler reports as it runs (metrics). */
export interface SchedulerObserver {
  /** One step: its rows (tokens), how many were prompt tokens, sequences, and its duration. */
  stepped(rows: number, promptRows: number, sequences: number, seconds: number): void;
  /** Seconds from submit to the first logits handed to onLogits (time to first token). */
  firstToken(seconds: number): void;
  /** Seconds between two onLogits calls of one sequence (inter-token latency). */
  interToken(seconds: number): void;
}

/** A finished sequence whose blocks are kept for a later request (see the header). */
export class RetainedSequence {
  readonly #scheduler: Scheduler;
  /** @internal */
  readonly blocks: SequenceBlocks;

  /** @internal */
  constructor(scheduler: Scheduler, blocks: SequenceBlocks) {
    this.#scheduler = scheduler;
    this.blocks = blocks;
  }

  /** The token ids the cache holds for it. */
  get tokens(): readonly number[] {
    return this.blocks.tokens;
  }

  get released(): boolean {
    return this.blocks.released;
  }

  /** Drops its blocks' references (published ones stay cached). Idempotent. */
  release(): void {
    this.#scheduler.releaseRetained(this);
  }
}

interface Entry {
  readonly req: SequenceRequest;
  readonly resolve: (r: SequenceResult) => void;
  readonly reject: (err: unknown) => void;
  readonly submitted: number;
  seq: SequenceBlocks | undefined;
  /** Tokens to write after seq.length: the rest of the prompt, or the token to decode. */
  pending: number[];
  /** Whether `pending` is prompt (chunked under the budget) rather than one decode token. */
  prefill: boolean;
  /** Preempted and queued again: its lookup is not a new request's. */
  resumed: boolean;
  rows: Float32Array | undefined;
  lastLogitsAt: number;
  order: number;
  aborted: boolean;
  done: boolean;
  detach: () => void;
}

interface Item {
  entry: Entry;
  start: number;
  tokens: number[];
  logits: StepSequence['logits'];
}

/** The next call: one step of `items`, or a chain of `steps` decode steps (steps > 1). */
interface Plan {
  items: Item[];
  steps: number;
}

/**
 * A chain of decode steps (KvPool.stepChain) lasts about this long by default (from the
 * recent decode steps' median): long enough that the host's round trip per step (~0.1-0.2 ms
 * through the event loop on a GPU) is paid once for many steps, short enough that a new request
 * waits little for admission and an aborted one little to leave.
 */
const CHAIN_SECONDS = 0.01;

function defaultChainSeconds(): number {
  const ms = Number(process.env.SONDE_LLM_CHAIN_MS);
  return process.env.SONDE_LLM_CHAIN_MS !== undefined && ms >= 0 ? ms / 1000 : CHAIN_SECONDS;
}
/** The most steps in one chain. */
const MAX_CHAIN = 64;

/** A prompt chunk beside running decodes may add this many decode-step times to a step. */
const PREFILL_STALL = 1;
/**
 * Prompt tokens per step beside running decodes while a prompt token's cost is not measured yet:
 * few, since the probe step stalls every running stream (64 tokens of a 50 M model were ~9 decode
 * steps once decode steps got cheap, the p99 of the streams' inter-token latency), yet at least
 * MEASURE_MIN_MIXED so that it is measured; later chunks grow from it at most twofold a step.
 */
const PROBE_CHUNK = 8;
/**
 * Fewest prompt tokens of a step that measures a prompt token's cost: alone, a step's fixed cost
 * dominates fewer; beside decodes, a step's noise (see #measure).
 */
const MEASURE_MIN_ALONE = 16;
const MEASURE_MIN_MIXED = 4;
/** Recent steps that size the chunks: enough to outvote a few preempted steps. */
const WINDOW = 16;

/** The last WINDOW (value, weight) pairs pushed, with their median and pooled sums. */
class Recent {
  #values: number[] = [];
  #weights: number[] = [];
  #next = 0;

  push(value: number, weight = 1): void {
    this.#values[this.#next] = value;
    this.#weights[this.#next] = weight;
    this.#next = (this.#next + 1) % WINDOW;
  }

  get empty(): boolean {
    return this.#values.length === 0;
  }

  median(): number {
    const sorted = [...this.#values].sort((a, b) => a - b);
    return sorted[sorted.length >> 1] ?? 0;
  }

  /** Sum of the values over sum of the weights. */
  pooled(): number {
    const w = this.#weights.reduce((a, b) => a + b, 0);
    return w > 0 ? this.#values.reduce((a, b) => a + b, 0) / w : 0;
  }
}

const abortError = (signal: AbortSignal | undefined) => new AbortError(undefined, signal ? { cause: signal.reason } : undefined);

export class Scheduler {
  readonly pool: KvPool;
  readonly blocks: BlockManager;
  readonly contextSize: number;
  readonly vocabSize: number;
  readonly maxConcurrency: number;
  readonly prefillBudget: number;
  readonly maxQueue: number;
  readonly chainSeconds: number;
  observer: SchedulerObserver | undefined;
  #waiting: Entry[] = [];
  #running: Entry[] = [];
  #inStep: Entry[] = [];
  #stepAbort: AbortController | undefined;
  // The logits of every step (KvPool.stepInto), grown to the largest step.
  #logits = new Float32Array(0);
  #looping = false;
  #idle: (() => void)[] = [];
  readonly #now: () => number;
  #order = 0;
  #disposed = false;
  #retained = new Set<RetainedSequence>();
  /** Seconds of recent decode-only steps; recent prompt chunks' seconds beyond their decodes, by tokens. */
  #decodeSteps = new Recent();
  #chunksMixed = new Recent();
  #chunksAlone = new Recent();
  /**
   * Steps with decodes and prompt rows since the last decode-only one. After WINDOW of them a step
   * carries decodes only: a decode step's cost drifts (the machine's load, which sequences run),
   * and measured only before a long prompt arrived it would stay stale for the whole prompt, with
   * the drift counted as prompt cost (chunks of one token, each step still ~2x a decode step).
   */
  #mixedSteps = 0;
  /** The last chunk size given beside decodes (0 before the first). */
  #lastChunk = 0;

  constructor(pool: KvPool, options: SchedulerOptions) {
    const int = (name: string, v: number | undefined, fallback: number, min: number) => {
      if (v === undefined) return fallback;
      if (!(v === Infinity || (Number.isInteger(v) && v >= min))) throw new InvalidArgumentError(`Scheduler: options.${name} must be an integer >= ${min}, got ${v}`);
      return v;
    };
    this.pool = pool;
    this.contextSize = int('contextSize', options.contextSize, 0, 1);
    this.vocabSize = int('vocabSize', options.vocabSize, 0, 1);
    this.maxConcurrency = int('maxConcurrency', options.maxConcurrency, 16, 1);
    this.prefillBudget = int('prefillBudget', options.prefillBudget, 512, 1);
    this.maxQueue = int('maxQueue', options.maxQueue, Infinity, 0);
    const chain = options.chainSeconds ?? defaultChainSeconds();
    if (!(chain >= 0)) throw new InvalidArgumentError(`Scheduler: options.chainSeconds must be a number >= 0, got ${chain}`);
    this.chainSeconds = chain;
    this.#now = options.now ?? (() => performance.now());
    this.blocks = new BlockManager({ blockSize: pool.blockSize, maxBlocks: pool.maxBlocks, prefixCaching: options.prefixCaching ?? true });
  }

  get running(): number {
    return this.#running.length;
  }

  get waiting(): number {
    return this.#waiting.length;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  stats(): BlockStats {
    return this.blocks.stats();
  }

  /** Queues a request; settles when it ends (see SequenceRequest). */
  submit(req: SequenceRequest): Promise<SequenceResult> {
    const where = 'Scheduler.submit';
    if (this.#disposed) return Promise.reject(new DisposedError(`${where}: the model has been disposed`));
    const n = req.tokens.length;
    if (n === 0) return Promise.reject(new InvalidArgumentError(`${where}: the prompt has no tokens`));
    if (n > this.contextSize) {
      return Promise.reject(new InvalidArgumentError(`${where}: the prompt is ${n} tokens, longer than the context of ${this.contextSize} tokens`));
    }
    const need = this.blocks.blocksFor(Math.min(n + 1, this.contextSize));
    if (need > this.blocks.maxBlocks) {
      return Promise.reject(new OutOfMemoryError(`${where}: the prompt of ${n} tokens and one generated token need ${need} KV blocks of ${this.blocks.blockSize} positions, more than the whole cache holds (${this.blocks.maxBlocks} blocks; raise kvCache.maxBytes)`));
    }
    if (req.continueFrom?.released) return Promise.reject(new InvalidArgumentError(`${where}: continueFrom has been released`));
    if (req.continueFrom && !this.#retained.has(req.continueFrom)) {
      return Promise.reject(new InvalidArgumentError(`${where}: continueFrom was retained by another model`));
    }
    if (req.signal?.aborted) return Promise.reject(abortError(req.signal));
    if (this.#waiting.length >= this.maxQueue) {
      return Promise.reject(new QueueFullError(`${where}: ${this.#waiting.length} requests are waiting, the most allowed (maxQueue ${this.maxQueue})`));
    }
    return new Promise<SequenceResult>((resolve, reject) => {
      const entry: Entry = {
        req, resolve, reject, submitted: this.#now(), seq: undefined, pending: req.tokens.slice(), prefill: true,
        resumed: false, rows: undefined, lastLogitsAt: 0, order: 0, aborted: false, done: false, detach: () => {},
      };
      if (req.logits === 'all') entry.rows = new Float32Array(n * this.vocabSize);
      const from = req.continueFrom;
      if (from) {
        // The references are taken now, so the caller may release its handle at once.
        let common = 0;
        const limit = req.logits === 'all' ? 0 : Math.min(from.tokens.length, n - 1);
        while (common < limit && from.tokens[common] === req.tokens[common]) common++;
        entry.seq = this.blocks.fork(from.blocks, common);
        entry.pending = req.tokens.slice(common);
      }
      const signal = req.signal;
      if (signal) {
        const onAbort = () => this.#abort(entry);
        signal.addEventListener('abort', onAbort, { once: true });
        entry.detach = () => signal.removeEventListener('abort', onAbort);
      }
      this.#waiting.push(entry);
      this.#kick();
    });
  }

  /** Resolves when no step is running (at once if none is). */
  whenIdle(): Promise<void> {
    if (!this.#looping) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  /**
   * Rejects waiting requests and ends running ones with DisposedError, cancelling the step in
   * flight; releases retained sequences. Idempotent. The pool is the caller's to dispose, after
   * whenIdle().
   */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    const err = () => new DisposedError('the model was disposed while this request was queued or running');
    for (const e of this.#waiting.splice(0)) this.#end(e, err(), false);
    for (const e of this.#running.slice()) {
      if (this.#inStep.includes(e)) this.#settle(e, err()); // its blocks go when the step returns
      else this.#end(e, err(), false);
    }
    this.#stepAbort?.abort();
    for (const r of this.#retained) this.releaseRetained(r);
  }

  /**
   * A retained sequence holding `tokens` in fresh blocks that `write` fills (a saved chat state,
   * lib/llm/kv/state.ts) before any step can read them. Its full blocks are published like any
   * computed ones. OutOfMemoryError when the pool cannot spare the blocks now.
   */
  async restoreRetained(tokens: readonly number[], write: (table: Int32Array) => Promise<void>): Promise<RetainedSequence> {
    const where = 'Scheduler.restoreRetained';
    if (this.#disposed) throw new DisposedError(`${where}: the model has been disposed`);
    if (tokens.length > this.contextSize) throw new InvalidArgumentError(`${where}: ${tokens.length} tokens, more than the context of ${this.contextSize}`);
    const seq = this.blocks.open([], 0, false);
    if (!this.blocks.reserve(seq, tokens.length)) {
      this.blocks.release(seq, false);
      throw new OutOfMemoryError(`${where}: ${this.blocks.blocksFor(tokens.length)} KV blocks are needed, ${this.blocks.available} can be had now (raise kvCache.maxBytes)`);
    }
    try {
      await write(seq.table(tokens.length, this.blocks.blockSize));
      if (this.#disposed) throw new DisposedError(`${where}: the model has been disposed`);
    } catch (err) {
      this.blocks.release(seq, false);
      this.#kick();
      throw err;
    }
    this.blocks.append(seq, tokens);
    const kept = new RetainedSequence(this, seq);
    this.#retained.add(kept);
    return kept;
  }

  /** @internal (RetainedSequence.release) */
  releaseRetained(r: RetainedSequence): void {
    if (!this.#retained.delete(r)) return;
    this.blocks.release(r.blocks, true);
    this.#kick();
  }

  #abort(e: Entry): void {
    if (e.done) return;
    const w = this.#waiting.indexOf(e);
    if (w >= 0) {
      this.#waiting.splice(w, 1);
      this.#end(e, abortError(e.req.signal), true);
      this.#kick();
      return;
    }
    e.aborted = true;
    // A step that now computes only for aborted requests is not worth finishing.
    if (this.#inStep.length > 0 && this.#inStep.every((x) => x.aborted || x.done)) this.#stepAbort?.abort();
    this.#kick();
  }

  /** Settles the request once (later calls are no-ops). */
  #settle(e: Entry, outcome: Error | SequenceResult): void {
    if (e.done) return;
    e.done = true;
    e.detach();
    if (outcome instanceof Error) e.reject(outcome);
    else e.resolve(outcome);
  }

  /** Removes `e` from the running list, releases its blocks (unless retained) and settles it. */
  #end(e: Entry, outcome: Error | SequenceResult, publish: boolean, retain = false): void {
    const r = this.#running.indexOf(e);
    if (r >= 0) this.#running.splice(r, 1);
    const seq = e.seq;
    e.seq = undefined;
    if (seq && retain && !(outcome instanceof Error) && !this.#disposed) {
      const kept = new RetainedSequence(this, seq);
      this.#retained.add(kept);
      this.#settle(e, { ...outcome, retained: kept });
      return;
    }
    if (seq) this.blocks.release(seq, publish);
    this.#settle(e, outcome);
  }

  #kick(): void {
    if (this.#looping) return;
    this.#looping = true;
    void this.#loop();
  }

  async #loop(): Promise<void> {
    let steps = 0;
    try {
      for (;;) {
        const plan = this.#plan();
        if (plan.items.length === 0) break;
        await (plan.steps > 1 ? this.#stepChain(plan.items, plan.steps) : this.#step(plan.items));
        // A native step completes through the event loop, so timers and I/O run between steps
        // anyway; a pool whose steps resolve in microtasks would starve them, so give the loop a
        // turn now and then (a turn every step costs a single stream of a small model ~25%).
        if (++steps % 32 === 0) await new Promise<void>((r) => setImmediate(r));
      }
    } catch (err) {
      // A bug in planning: fail everything rather than leave requests hanging.
      const e = err instanceof Error ? err : new InternalError(String(err));
      for (const x of [...this.#waiting.splice(0), ...this.#running.slice()]) this.#end(x, e, false);
    } finally {
      this.#looping = false;
      for (const r of this.#idle.splice(0)) r();
    }
  }

  /** The next call's items; empty when there is nothing to compute. */
  #plan(): Plan {
    if (this.#disposed) {
      for (const e of this.#running.slice()) this.#end(e, new DisposedError('the model was disposed'), false);
      return { items: [], steps: 1 };
    }
    for (const e of this.#running.slice()) if (e.aborted) this.#end(e, abortError(e.req.signal), true);
    for (;;) {
      this.#admit();
      const chain = this.#planChain();
      if (chain) return chain;
      const items = this.#planDecodes();
      let budget = items.length === 0 ? this.prefillBudget : this.#mixedSteps >= WINDOW ? 0 : this.#chunkBesideDecodes();
      for (const e of this.#running) {
        if (!e.prefill || budget === 0) continue;
        const n = Math.min(e.pending.length, budget, this.blocks.capacity(e.seq!), this.contextSize - e.seq!.length);
        if (n <= 0 || !this.blocks.reserve(e.seq!, n)) continue;
        budget -= n;
        const last = n === e.pending.length;
        items.push({ entry: e, start: e.seq!.length, tokens: e.pending.slice(0, n), logits: e.req.logits === 'all' ? 'all' : last ? 'last' : 'none' });
      }
      if (items.length > 0 || this.#running.length === 0) return { items, steps: 1 };
      // Prompts stuck for want of blocks, nothing decoding: make room, or give up on a lone one.
      if (this.#running.length > 1) {
        this.#preempt(this.#newest());
      } else {
        const e = this.#running[0]!;
        this.#end(e, new OutOfMemoryError(`the KV cache is full (${this.blocks.maxBlocks} blocks, ${this.blocks.stats().used} in use); raise kvCache.maxBytes`), true);
      }
    }
  }

  /**
   * A chain of decode steps when the pool chains them, every running sequence's tokens can be
   * chosen natively, and nothing waits for admission but for a free slot (maxConcurrency: a chain
   * then delays a finished request's successor by at most its length, where steps one by one would
   * slow every running request; one waiting for blocks is not kept from those a chain reserves):
   * as many steps as chainSeconds of recent decode steps (none before one is measured), within
   * each sequence's remaining tokens and context, and with the blocks for all of them reserved
   * (else undefined: a plain step, which may preempt).
   */
  #planChain(): Plan | undefined {
    if (!this.pool.stepChain || this.chainSeconds === 0 || this.#running.length === 0 || this.#decodeSteps.empty ||
        (this.#waiting.length > 0 && this.#running.length < this.maxConcurrency)) return undefined;
    let steps = Math.min(MAX_CHAIN, Math.floor(this.chainSeconds / this.#decodeSteps.median()));
    for (const e of this.#running) {
      if (e.prefill || !e.req.chain || e.aborted || e.done) return undefined;
      steps = Math.min(steps, e.req.chain.remaining(), this.contextSize - e.seq!.length);
    }
    if (!(steps >= 2)) return undefined;
    for (const e of this.#running) if (!this.blocks.reserve(e.seq!, steps)) return undefined;
    return { items: this.#running.map((e) => ({ entry: e, start: e.seq!.length, tokens: e.pending.slice(), logits: 'last' as const })), steps };
  }

  /** One block slot for every decoding sequence, preempting the newest when the pool is full. */
  #planDecodes(): Item[] {
    const items: Item[] = [];
    for (const e of this.#running.slice()) {
      if (e.prefill || !this.#running.includes(e)) continue;
      let ok = this.blocks.reserve(e.seq!, 1);
      while (!ok) {
        const victim = this.#newest();
        if (victim === e && this.#running.length === 1) {
          this.#end(e, new OutOfMemoryError(`a sequence of ${e.seq!.length} tokens fills the KV cache (${this.blocks.maxBlocks} blocks); raise kvCache.maxBytes`), true);
          break;
        }
        this.#preempt(victim);
        if (victim === e) break;
        ok = this.blocks.reserve(e.seq!, 1);
      }
      if (ok) items.push({ entry: e, start: e.seq!.length, tokens: e.pending.slice(), logits: 'last' });
    }
    return items;
  }

  /** Prompt tokens a step with running decodes may carry (see PREFILL_STALL); at least one. */
  #chunkBesideDecodes(): number {
    const decode = this.#decodeSteps.median();
    const perToken = this.#chunksMixed.empty ? this.#chunksAlone.pooled() : this.#chunksMixed.pooled();
    if (decode === 0 || perToken === 0) return (this.#lastChunk = Math.min(this.prefillBudget, PROBE_CHUNK));
    // At most double the last chunk: a chunk whose cost hid in a step's noise reads as nearly free
    // tokens, and the next chunk should test that before a whole budget stalls the decodes on it.
    const grown = this.#lastChunk > 0 ? 2 * this.#lastChunk : this.prefillBudget;
    const n = Math.min(this.prefillBudget, grown, Math.max(1, Math.floor((PREFILL_STALL * decode) / perToken)));
    return (this.#lastChunk = n);
  }

  /**
   * Feeds the step costs a step of `decodes` decode rows and `promptRows` prompt tokens. A prompt
   * token beside decodes costs less than one in a long chunk alone (it shares the decodes' weight
   * reads), so chunks are sized from chunks beside decodes once there are some, and from chunks
   * alone until then (smaller chunks: the safe side). Costs are pooled (recent chunks' time beyond
   * their decodes over their tokens), and chunks of fewer than MEASURE_MIN_MIXED tokens are not
   * measured: a step's noise (hundreds of ms when preempted on a loaded machine) divided by one
   * or two tokens made one slow step look like a costly token, shrank the next chunks, and so fed
   * on itself down to one-token chunks. The decodes a chunk rode with are subtracted at their
   * median: a preempted mixed step then reads as dearer tokens (smaller chunks), where a mean
   * pulled up by one preempted decode step would read a typical mixed step as free tokens.
   */
  #measure(decodes: number, promptRows: number, seconds: number): void {
    if (promptRows === 0) {
      if (decodes > 0) this.#decodeSteps.push(seconds);
      this.#mixedSteps = 0;
      return;
    }
    if (decodes === 0) {
      if (promptRows >= MEASURE_MIN_ALONE) this.#chunksAlone.push(seconds, promptRows);
      return;
    }
    this.#mixedSteps++;
    if (promptRows < MEASURE_MIN_MIXED || this.#decodeSteps.empty) return;
    // A step is never cheaper than its decodes, but noise can make it look so.
    this.#chunksMixed.push(Math.max(seconds - this.#decodeSteps.median(), seconds * 0.1), promptRows);
  }

  #newest(): Entry {
    let n = this.#running[0]!;
    for (const e of this.#running) if (e.order > n.order) n = e;
    return n;
  }

  /** Releases `e`'s blocks (its published ones stay cached) and queues it again at the head. */
  #preempt(e: Entry): void {
    const seq = e.seq!;
    this.#running.splice(this.#running.indexOf(e), 1);
    e.pending = [...seq.tokens, ...e.pending];
    this.blocks.release(seq, true);
    e.seq = undefined;
    e.prefill = true;
    e.resumed = true;
    this.#waiting.unshift(e);
  }

  #admit(): void {
    while (this.#waiting.length > 0 && this.#running.length < this.maxConcurrency) {
      const e = this.#waiting[0]!;
      const looked = !e.seq;
      if (looked) {
        const all = e.req.logits === 'all';
        e.seq = this.blocks.open(e.pending, all ? 0 : e.pending.length - 1, false);
        e.pending = e.pending.slice(e.seq.length);
      }
      const want = (x: Entry) => this.blocks.blocksToGrow(x.seq!, Math.min(x.pending.length + 1, this.contextSize - x.seq!.length));
      let committed = 0;
      for (const r of this.#running) if (r.prefill) committed += want(r);
      if (want(e) + committed > this.blocks.available) {
        // Waiting must not pin cached blocks that running sequences may need to evict; the
        // lookup is made again at the next try. (A continuation keeps its retained blocks.)
        if (looked) {
          const seq = e.seq!;
          e.pending = [...seq.tokens, ...e.pending];
          this.blocks.release(seq, false);
          e.seq = undefined;
        }
        return;
      }
      if (looked && !e.resumed) this.blocks.recordLookup(e.req.tokens.length, e.seq!.length);
      this.#waiting.shift();
      e.order = ++this.#order;
      e.prefill = true;
      this.#running.push(e);
    }
  }

  async #step(items: Item[]): Promise<void> {
    const bs = this.blocks.blockSize;
    const copies = this.blocks.takeCopies();
    const sequences: StepSequence[] = items.map((it) => ({
      blockTable: it.entry.seq!.table(it.start + it.tokens.length, bs),
      start: it.start,
      tokens: Int32Array.from(it.tokens),
      logits: it.logits,
    }));
    // Only a step with prompt rows is worth cancelling (on dispose, or when all its requests
    // abort): a decode step is short, and a signal costs a native cancel token per step.
    const ac = items.some((it) => it.entry.prefill) ? new AbortController() : undefined;
    const wantRows = items.reduce((n, it) => n + (it.logits === 'none' ? 0 : it.logits === 'last' ? 1 : it.tokens.length), 0);
    const t0 = this.#now();
    const out = await this.#call(items, ac, () => {
      const batch = copies ? { sequences, copies } : { sequences }, opts = ac ? { signal: ac.signal } : undefined;
      const need = wantRows * this.vocabSize;
      if (this.pool.stepInto && need <= MAX_REUSED_LOGITS) {
        // One logits buffer for every step: each step's rows are read (sampled, or copied into a
        // request's own array) before the next step starts.
        if (this.#logits.length < need) this.#logits = new Float32Array(Math.min(MAX_REUSED_LOGITS, Math.max(need, 2 * this.#logits.length)));
        return this.pool.stepInto(batch, this.#logits, opts);
      }
      return this.pool.step(batch, opts);
    });
    if (!out) return;
    const now = this.#now();
    let promptRows = 0;
    for (const it of items) if (it.entry.prefill) promptRows += it.tokens.length;
    const rows = items.reduce((n, it) => n + it.tokens.length, 0);
    this.#measure(rows - promptRows, promptRows, (now - t0) / 1000);
    this.observer?.stepped(rows, promptRows, items.length, (now - t0) / 1000);
    const V = this.vocabSize;
    if (out.length !== wantRows * V) {
      const err = new InternalError(`KvPool.step returned ${out.length} logits, expected ${wantRows} rows of ${V}`);
      for (const it of items) this.#end(it.entry, err, false);
      return;
    }
    let row = 0;
    for (const it of items) {
      const e = it.entry;
      const n = it.logits === 'none' ? 0 : it.logits === 'last' ? 1 : it.tokens.length;
      const logits = out.subarray(row * V, (row + n) * V);
      row += n;
      if (!e.seq) continue; // disposed during the step
      this.blocks.append(e.seq, it.tokens);
      e.pending.splice(0, it.tokens.length);
      if (e.done || e.aborted) {
        if (e.done) this.#end(e, new DisposedError('the model was disposed'), true);
        continue; // an aborted one leaves at the next boundary, its cache valid
      }
      if (e.req.logits === 'all') {
        e.rows!.set(logits, it.start * V);
        if (e.pending.length === 0) this.#end(e, { logits: e.rows! }, true);
        continue;
      }
      if (n === 0) continue;
      e.prefill = false;
      let next: number | undefined;
      try {
        next = e.req.onLogits?.(logits, e.seq.length);
      } catch (err) {
        this.#end(e, err as Error, true);
        continue;
      }
      if (e.lastLogitsAt === 0) this.observer?.firstToken((now - e.submitted) / 1000);
      else this.observer?.interToken((now - e.lastLogitsAt) / 1000);
      e.lastLogitsAt = now;
      if (next === undefined || e.seq.length >= this.contextSize) this.#end(e, {}, true, e.req.retain === true);
      else e.pending = [next];
    }
  }

  /**
   * One pool call for `items` (a step or a chain), cancellable through `ac` (dispose, or every
   * request in it aborted); either way its block copies' sources are released after it. Undefined
   * when it failed: its requests have ended then, none of their unfinished blocks published.
   */
  async #call<T>(items: Item[], ac: AbortController | undefined, run: () => Promise<T>): Promise<T | undefined> {
    this.#stepAbort = ac;
    this.#inStep = items.map((it) => it.entry);
    try {
      const out = await run();
      this.blocks.endStep();
      return out;
    } catch (err) {
      this.blocks.endStep();
      for (const it of items) {
        const e = it.entry;
        const why = this.#disposed ? new DisposedError('the model was disposed') : e.aborted ? abortError(e.req.signal) : err as Error;
        this.#end(e, why, false);
      }
      return undefined;
    } finally {
      this.#stepAbort = undefined;
      this.#inStep = [];
    }
  }

  /**
   * `steps` decode steps of every item in one KvPool.stepChain call (#planChain). Each sequence
   * then takes the chosen tokens one by one, as a plain step's onLogits would have, up to where its
   * request ends, and its sampler's generator takes the state it had after that token's draw;
   * positions the chain wrote past the end are beyond the sequence's length, i.e. unwritten as
   * far as the cache is concerned.
   */
  async #stepChain(items: Item[], steps: number): Promise<void> {
    const bs = this.blocks.blockSize;
    const copies = this.blocks.takeCopies();
    const sequences: StepSequence[] = items.map((it) => ({
      blockTable: it.entry.seq!.table(it.start + steps, bs), start: it.start, tokens: Int32Array.from(it.tokens), logits: 'last',
    }));
    // Cancelled between its steps on dispose, or when every request in it aborts.
    const ac = new AbortController();
    const t0 = this.#now();
    // Draw parameters only when some request samples: an all-greedy chain takes each argmax.
    const n = items.length;
    let sampling: ChainSampling | undefined;
    if (items.some((it) => it.entry.req.chain!.sampler.params[0] > 0)) {
      sampling = { params: new Float64Array(4 * n), rng: new Uint32Array(4 * n) };
      items.forEach((it, s) => {
        const c = it.entry.req.chain!.sampler;
        sampling!.params.set(c.params, 4 * s);
        sampling!.rng.set(c.rng, 4 * s);
      });
    }
    const result = await this.#call(items, ac, () =>
      this.pool.stepChain!(copies ? { sequences, copies } : { sequences }, steps, sampling ? { signal: ac.signal, sampling } : { signal: ac.signal }));
    if (!result) return;
    const chosen = result.tokens;
    const now = this.#now();
    const seconds = (now - t0) / 1000;
    this.#measure(n, 0, seconds / steps);
    for (let j = 0; j < steps; j++) this.observer?.stepped(n, 0, n, seconds / steps);
    if (chosen.length !== steps * n || (sampling && result.rng?.length !== 4 * steps * n)) {
      const err = new InternalError(`KvPool.stepChain returned ${chosen.length} tokens, expected ${steps} steps of ${n}`);
      for (const it of items) this.#end(it.entry, err, false);
      return;
    }
    for (let s = 0; s < n; s++) {
      const e = items[s]!.entry;
      if (!e.seq) continue; // disposed during the chain
      let fed = items[s]!.tokens[0]!;
      if (e.done || e.aborted) {
        // Its cache holds every step's token: keep them (an aborted request leaves at the next boundary).
        for (let j = 0; j < steps; j++) this.blocks.append(e.seq, [j === 0 ? fed : chosen[(j - 1) * n + s]!]);
        e.pending = [];
        if (e.done) this.#end(e, new DisposedError('the model was disposed'), true);
        continue;
      }
      const gap = (now - e.lastLogitsAt) / 1000 / steps;
      e.lastLogitsAt = now;
      const chain = e.req.chain!;
      for (let j = 0; j < steps; j++) {
        this.blocks.append(e.seq, [fed]);
        const token = chosen[j * n + s]!;
        // The generator as it was after this token's draw, whether or not the request goes on.
        if (result.rng) chain.sampler.rng.set(result.rng.subarray(4 * (j * n + s), 4 * (j * n + s) + 4));
        let more: boolean;
        try {
          more = chain.onToken(token, e.seq.length);
        } catch (err) {
          this.#end(e, err as Error, true);
          break;
        }
        this.observer?.interToken(gap);
        if (!more || e.seq.length >= this.contextSize) {
          this.#end(e, {}, true, e.req.retain === true);
          break;
        }
        fed = token;
        e.pending = [token];
      }
    }
  }
}
