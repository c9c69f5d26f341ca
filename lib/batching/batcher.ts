/**
 * The dynamic batcher behind `SessionOptions.batching`: concurrent Session.run calls whose inputs
 * agree on everything but the batch dim are concatenated along it, run as one native plan run, and
 * each caller gets a copy of its own rows of every output.
 *
 * Scheduling is event-loop code (one timer at most), compute stays native; at most
 * maxConcurrentBatches batches per session run at a time, and the rows that arrive meanwhile form
 * the next batch. A batch is
 * dispatched when its rows reach the batch limit, when a preferred size can be formed, or when
 * its oldest request has waited the delay (Triton's rules); with `targetLatencyMs` the limit and
 * delay come from a LatencyController instead of the fixed options.
 *
 * Failure policy: a request is validated before it is queued, so a malformed one rejects alone.
 * When a batch's native run fails for another reason (a data-dependent error such as a Gather
 * index out of range in one request's rows), each of its requests is re-run alone, so only the
 * request that causes the error gets it. Outputs are copied, not viewed: a view would share one
 * ArrayBuffer between callers, and any caller could then overwrite another's rows through `.buffer`.
 */
import { allocOutput } from '../buffers.js';
import { AbortError, DisposedError, InvalidArgumentError, QueueFullError } from '../errors.js';
import type { SessionMetrics } from '../metrics/session.js';
import type { Dim } from '../onnx/model.js';
import { Tensor } from '../tensor.js';
import { checkInt, checkOptions, describe } from '../validate.js';
import { LatencyController } from './controller.js';

export interface BatchingOptions {
  /** Most rows (sum of the requests' batch dims) in one native run. */
  maxBatchSize: number;
  /** Longest a request waits for batch-mates before a partial batch runs (ms, may be 0). */
  maxDelayMs: number;
  /** Batch sizes to dispatch at once when the queued rows can form one (largest first). */
  preferredBatchSizes?: number[];
  /** Most requests waiting (not yet running); beyond it run() rejects with QueueFullError. Default: no limit. */
  maxQueue?: number;
  /** Adapt batch size and delay to keep the p99 end-to-end latency under this (ms). */
  targetLatencyMs?: number;
  /**
   * Batches running at once (default 2): while one computes, the next can start, so the pool is
   * not idle between batches, and a model whose best batch is small keeps both of a 2-thread
   * pool's threads busy as unbatched concurrent runs would.
   */
  maxConcurrentBatches?: number;
}
const BATCHING_OPTIONS = ['maxBatchSize', 'maxDelayMs', 'preferredBatchSizes', 'maxQueue', 'targetLatencyMs', 'maxConcurrentBatches'] as const;

function checkPositive(where: string, value: unknown, allowZero: boolean): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || (!allowZero && value === 0)) {
    throw new InvalidArgumentError(`${where} must be a finite number ${allowZero ? '>= 0' : '> 0'}, got ${describe(value)}`);
  }
  return value;
}

export type CheckedBatchingOptions = Required<Omit<BatchingOptions, 'targetLatencyMs'>> & { targetLatencyMs?: number };

export function checkBatchingOptions(where: string, value: unknown): CheckedBatchingOptions {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new InvalidArgumentError(`${where} must be an object ({ maxBatchSize, maxDelayMs, ... }), got ${describe(value)}`);
  }
  const o = checkOptions<BatchingOptions>(where, value, BATCHING_OPTIONS);
  if (o.maxBatchSize === undefined) throw new InvalidArgumentError(`${where}.maxBatchSize is required`);
  if (o.maxDelayMs === undefined) throw new InvalidArgumentError(`${where}.maxDelayMs is required`);
  const maxBatchSize = checkInt(`${where}.maxBatchSize`, o.maxBatchSize, 1, 1 << 20);
  const maxDelayMs = checkPositive(`${where}.maxDelayMs`, o.maxDelayMs, true);
  let preferred: number[] = [];
  if (o.preferredBatchSizes !== undefined) {
    if (!Array.isArray(o.preferredBatchSizes)) {
      throw new InvalidArgumentError(`${where}.preferredBatchSizes must be an array of integers, got ${describe(o.preferredBatchSizes)}`);
    }
    preferred = o.preferredBatchSizes.map((s, i) => checkInt(`${where}.preferredBatchSizes[${i}]`, s, 1, maxBatchSize));
  }
  const maxQueue = o.maxQueue === undefined ? Infinity : checkInt(`${where}.maxQueue`, o.maxQueue, 1);
  const maxConcurrentBatches = o.maxConcurrentBatches === undefined ? 2 : checkInt(`${where}.maxConcurrentBatches`, o.maxConcurrentBatches, 1, 64);
  const out: CheckedBatchingOptions = { maxBatchSize, maxDelayMs, preferredBatchSizes: [...new Set(preferred)].sort((a, b) => a - b), maxQueue, maxConcurrentBatches };
  if (o.targetLatencyMs !== undefined) out.targetLatencyMs = checkPositive(`${where}.targetLatencyMs`, o.targetLatencyMs, false);
  return out;
}

/** Where the batch dim is: the same position in every input, and per output (found at load). */
export interface BatchLayout {
  axis: number;
  /** The dim's name in the model, or null where the model leaves it unnamed. */
  symbol: string | null;
  /** Batch-dim position per output (in output order). */
  outputAxes: number[];
}

/**
 * The batch dim of a model with these declared inputs and outputs, or the reason there is none.
 * Dim 0 when it is symbolic (the same name) in every input; otherwise a symbolic dim found at one
 * same position in every input.
 */
export function findBatchLayout(inputs: { name: string; dims?: Dim[] }[], outputs: { name: string; dims?: Dim[] }[]): BatchLayout | string {
  if (inputs.length === 0) return 'the model has no runtime inputs';
  const unranked = inputs.find((i) => !i.dims || i.dims.length === 0);
  if (unranked) return `input '${unranked.name}' has ${unranked.dims ? 'rank 0' : 'no declared shape'}, so it has no batch dim`;
  const at = (axis: number): string | null | undefined => {
    const first = inputs[0]!.dims![axis];
    if (typeof first === 'number' || first === undefined) return undefined;
    for (const i of inputs) {
      const d = i.dims![axis];
      if (d !== first) return undefined;
    }
    return first;
  };
  let axis = -1;
  let symbol: string | null = null;
  const zero = at(0);
  if (zero !== undefined) {
    axis = 0;
    symbol = zero;
  } else {
    const rank = Math.min(...inputs.map((i) => i.dims!.length));
    for (let a = 1; a < rank; a++) {
      const s = at(a);
      if (typeof s === 'string') { axis = a; symbol = s; break; }
    }
  }
  if (axis < 0) {
    const shapes = inputs.map((i) => `'${i.name}' [${i.dims!.map((d) => d ?? '?').join(', ')}]`).join(', ');
    return `no dim is symbolic at the same position with the same name in every input (${shapes})`;
  }
  const outputAxes: number[] = [];
  for (const o of outputs) {
    const shape = `output '${o.name}' [${(o.dims ?? []).map((d) => d ?? '?').join(', ')}]`;
    if (!o.dims) outputAxes.push(axis);
    else if (symbol !== null && o.dims.includes(symbol)) outputAxes.push(o.dims.indexOf(symbol));
    else if (symbol === null && o.dims[axis] === null) outputAxes.push(axis);
    else return `${shape} does not carry the batch dim ${symbol === null ? `(unnamed, position ${axis} of the inputs)` : `'${symbol}'`}`;
  }
  return { axis, symbol, outputAxes };
}

/** The Session side the batcher drives: one native run of validated tensors. */
export type BatchRunner = (tensors: Tensor[], signal: AbortSignal | undefined) => Promise<Record<string, Tensor>>;

interface Request {
  tensors: Tensor[];
  rows: number;
  arrived: number;
  signal?: AbortSignal;
  onAbort?: () => void;
  state: 'queued' | 'running' | 'settled';
  batch?: Batch;
  resolve(value: Record<string, Tensor>): void;
  reject(err: unknown): void;
}

interface Queue {
  key: string;
  requests: Request[];
  rows: number;
}

interface Batch {
  live: number;
  abort: AbortController;
}

const now = () => performance.now();

function sizeOf(dims: readonly number[], from: number, to: number): number {
  let n = 1;
  for (let i = from; i < to; i++) n *= dims[i]!;
  return n;
}

/** The TypedArray surface the copies use (every dtype's storage array has it). */
interface Rows {
  readonly length: number;
  set(src: Rows, offset?: number): void;
  subarray(begin: number, end: number): Rows;
  slice(begin: number, end: number): Rows;
}
type ArrayCtor = { new (n: number): Rows; BYTES_PER_ELEMENT: number; new (b: ArrayBuffer, o: number, n: number): Rows };

/** Input shapes (per-row element counts and types) whose spare batch buffers a batcher keeps. */
const SPARE_SHAPES = 8;

export class Batcher {
  readonly #layout: BatchLayout;
  readonly #opts: CheckedBatchingOptions;
  readonly #run: BatchRunner;
  readonly #metrics: SessionMetrics;
  readonly #outputNames: readonly string[];
  readonly controller?: LatencyController;
  #queues = new Map<string, Queue>();
  #queued = 0;
  #running = 0;
  #closed = false;
  #timer: { timeout?: ReturnType<typeof setTimeout>; immediate?: ReturnType<typeof setImmediate> } | undefined;
  #timerAt = Infinity;
  // Input buffers of finished batches, kept for the next ones by element type and elements per
  // row, each with room for maxBatchSize rows. A fresh buffer per batch (MobileNetV2's 8 rows: 4.8
  // MB) grew V8's external memory count by that much each time, which made it run a full collection
  // every ~140 ms, 4-9 ms each on the JS thread beside two busy pool threads: timer lag p99 4.5-6.3
  // ms against 2.1 unbatched.
  #spare = new Map<string, Rows[]>();

  constructor(layout: BatchLayout, opts: CheckedBatchingOptions, outputNames: readonly string[], run: BatchRunner, metrics: SessionMetrics) {
    this.#layout = layout;
    this.#opts = opts;
    this.#outputNames = outputNames;
    this.#run = run;
    this.#metrics = metrics;
    if (opts.targetLatencyMs !== undefined) {
      this.controller = new LatencyController({ targetMs: opts.targetLatencyMs, maxBatchSize: opts.maxBatchSize, maxDelayMs: opts.maxDelayMs }, opts.preferredBatchSizes);
    }
  }

  /**
   * Rows of this request along the batch dim, or undefined where it cannot share a batch (inputs
   * disagree on an unnamed batch dim, or it has no rows).
   */
  rowsOf(tensors: Tensor[]): number | undefined {
    const rows = tensors[0]!.dims[this.#layout.axis]!;
    if (rows === 0 || tensors.some((t) => t.dims[this.#layout.axis] !== rows)) return undefined;
    return rows;
  }

  /** Queues validated tensors (rowsOf() defined); settles with this request's own outputs. */
  submit(tensors: Tensor[], rows: number, signal: AbortSignal | undefined, arrived: number): Promise<Record<string, Tensor>> {
    if (this.#queued >= this.#opts.maxQueue) {
      return Promise.reject(new QueueFullError(`Session.run: the batching queue is full (${this.#queued} requests waiting, options.batching.maxQueue = ${this.#opts.maxQueue})`));
    }
    const axis = this.#layout.axis;
    const key = tensors.map((t) => `${t.dtype}:${t.dims.map((d, i) => (i === axis ? '*' : d)).join('x')}`).join('|');
    return new Promise((resolve, reject) => {
      const req: Request = { tensors, rows, arrived, state: 'queued', resolve, reject, ...(signal ? { signal } : {}) };
      if (signal) {
        req.onAbort = () => this.#aborted(req);
        signal.addEventListener('abort', req.onAbort, { once: true });
      }
      let q = this.#queues.get(key);
      if (!q) {
        q = { key, requests: [], rows: 0 };
        this.#queues.set(key, q);
      }
      q.requests.push(req);
      q.rows += rows;
      this.#queued++;
      this.#metrics.queueChanged(this.#queued);
      this.#pump();
    });
  }

  /** Rejects every queued request with `error()`; a batch already running finishes. */
  close(error: () => Error): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#spare.clear();
    this.#clearTimer();
    for (const q of this.#queues.values()) for (const r of q.requests) this.#settle(r, error());
    this.#queues.clear();
    this.#queued = 0;
    this.#metrics.queueChanged(0);
  }

  get queued(): number {
    return this.#queued;
  }

  #settle(req: Request, err: unknown, value?: Record<string, Tensor>): void {
    if (req.state === 'settled') return;
    req.state = 'settled';
    if (req.onAbort) req.signal!.removeEventListener('abort', req.onAbort);
    if (err === undefined) {
      this.controller?.observeLatency(now() - req.arrived);
      req.resolve(value!);
    } else {
      req.reject(err);
    }
  }

  #aborted(req: Request): void {
    const err = new AbortError(undefined, { cause: req.signal!.reason });
    if (req.state === 'queued') {
      for (const [key, q] of this.#queues) {
        const i = q.requests.indexOf(req);
        if (i < 0) continue;
        q.requests.splice(i, 1);
        q.rows -= req.rows;
        if (q.requests.length === 0) this.#queues.delete(key);
        this.#queued--;
        this.#metrics.queueChanged(this.#queued);
        break;
      }
      this.#settle(req, err);
      // The head may have changed: the timer must follow the new oldest request.
      this.#pump();
    } else if (req.state === 'running') {
      // Its batch-mates still want their rows; the native run stops only when nobody does.
      this.#settle(req, err);
      const b = req.batch!;
      if (--b.live === 0) b.abort.abort(err);
    }
  }

  /** The requests the next batch of `q` takes now, or undefined when it should wait. */
  #select(q: Queue, limit: number, expired: boolean): number {
    const preferred = this.#opts.preferredBatchSizes;
    let sum = 0;
    let n = 0;
    let bestPreferred = 0;
    for (const r of q.requests) {
      if (n > 0 && sum + r.rows > limit) break;
      sum += r.rows;
      n++;
      if (preferred.includes(sum)) bestPreferred = n;
    }
    if (bestPreferred > 0) return bestPreferred;
    const full = sum >= limit || n < q.requests.length;
    return full || expired ? n : 0;
  }

  /**
   * Dispatches the batch that is due, if any, or arms the timer for the next one. A full or
   * preferred batch goes at once; one that is due only by its delay goes from a timer callback
   * (`fromTimer`), never from submit() or a completion. So requests made in the same turn of the
   * event loop (callers answered by the last batch asking again) join one batch, even with
   * maxDelayMs 0, instead of the first of them running alone.
   */
  #pump(fromTimer = false): void {
    if (this.#running >= this.#opts.maxConcurrentBatches || this.#closed) return;
    const t = now();
    let pick: { q: Queue; n: number } | undefined;
    let nextAt = Infinity;
    for (const q of this.#queues.values()) {
      const head = q.requests[0]!;
      const wait = t - head.arrived;
      // The limit is not capped at the rows queued now: a batch at its limit goes at once, and
      // a partial one waits for the delay to grow.
      const limit = this.controller ? this.controller.batchRows(wait, this.#opts.maxBatchSize) : this.#opts.maxBatchSize;
      const delay = this.controller ? this.controller.delayMs() : this.#opts.maxDelayMs;
      const n = this.#select(q, limit, fromTimer && wait >= delay);
      if (n > 0) {
        if (!pick || head.arrived < pick.q.requests[0]!.arrived) pick = { q, n };
      } else {
        nextAt = Math.min(nextAt, head.arrived + delay);
      }
    }
    if (pick) {
      void this.#dispatch(pick.q, pick.n);
      // Another batch may be due too, and may run beside it.
      this.#pump(fromTimer);
      return;
    }
    if (this.#timer && nextAt >= this.#timerAt && nextAt !== Infinity) return;
    this.#clearTimer();
    if (nextAt === Infinity) return;
    this.#timerAt = nextAt;
    const fire = () => {
      this.#timer = undefined;
      this.#timerAt = Infinity;
      this.#pump(true);
    };
    // Already due: after this turn's I/O and microtasks (setTimeout(0) would wait a whole 1 ms).
    this.#timer = nextAt <= t ? { immediate: setImmediate(fire) } : { timeout: setTimeout(fire, nextAt - t) };
  }

  #clearTimer(): void {
    if (this.#timer?.immediate) clearImmediate(this.#timer.immediate);
    if (this.#timer?.timeout) clearTimeout(this.#timer.timeout);
    this.#timer = undefined;
    this.#timerAt = Infinity;
  }

  async #dispatch(q: Queue, n: number): Promise<void> {
    const reqs = q.requests.splice(0, n);
    const t0 = now();
    for (const r of reqs) {
      q.rows -= r.rows;
      r.state = 'running';
      this.#metrics.dequeued((t0 - r.arrived) / 1000);
    }
    if (q.requests.length === 0) this.#queues.delete(q.key);
    this.#queued -= n;
    this.#metrics.queueChanged(this.#queued);
    this.#running++;
    try {
      await this.#runBatch(reqs, t0);
    } finally {
      this.#running--;
      this.#pump();
    }
  }

  async #runBatch(reqs: Request[], t0: number): Promise<void> {
    const batch: Batch = { live: reqs.length, abort: new AbortController() };
    for (const r of reqs) r.batch = batch;
    const rows = reqs.reduce((s, r) => s + r.rows, 0);
    let copyMs = 0;
    let outputs: Record<string, Tensor>;
    const used: [string, Rows][] = [];
    try {
      let tensors = reqs[0]!.tensors;
      if (reqs.length > 1) {
        const c0 = now();
        tensors = this.#concat(reqs, rows, used);
        copyMs += now() - c0;
      }
      outputs = await this.#run(tensors, batch.abort.signal);
    } catch (err) {
      // The run has settled: nothing reads its inputs any more.
      this.#giveBack(used);
      this.#ran(rows, t0, copyMs);
      if (batch.abort.signal.aborted) return; // every request already rejected with its own AbortError
      const live = reqs.filter((r) => r.state === 'running');
      if (live.length > 1 && !this.#closed && !(err instanceof DisposedError)) return this.#runAlone(live);
      for (const r of live) this.#settle(r, err);
      return;
    }
    if (reqs.length === 1) {
      this.#ran(rows, t0, copyMs);
      this.#settle(reqs[0]!, undefined, outputs);
      return;
    }
    const c0 = now();
    const split = this.#split(reqs, rows, outputs);
    copyMs += now() - c0;
    // After the split: an output may be a view of an input (an Identity), and the split copies it.
    this.#giveBack(used);
    this.#ran(rows, t0, copyMs);
    if (!split) return this.#runAlone(reqs.filter((r) => r.state === 'running'));
    reqs.forEach((r, i) => this.#settle(r, undefined, split[i]));
  }

  #ran(rows: number, t0: number, copyMs: number): void {
    const ms = now() - t0;
    this.#metrics.ran(rows, ms / 1000, copyMs / 1000);
    this.controller?.observeRun(rows, ms);
  }

  /** Runs each request by itself, so that an error caused by one request's data reaches it alone. */
  async #runAlone(reqs: Request[]): Promise<void> {
    for (const r of reqs) {
      if (r.state !== 'running') continue;
      // Disposed meanwhile: the session's plans and weights are gone.
      if (this.#closed) {
        this.#settle(r, new DisposedError('Session.run: the session was disposed before this request could run'));
        continue;
      }
      const t0 = now();
      try {
        const out = await this.#run(r.tensors, r.signal);
        this.#ran(r.rows, t0, 0);
        this.#settle(r, undefined, out);
      } catch (err) {
        this.#ran(r.rows, t0, 0);
        this.#settle(r, err);
      }
    }
  }

  /**
   * The requests' inputs concatenated along the batch dim (one memcpy per request per outer index),
   * in spare buffers where there are; the buffers taken are added to `used`.
   */
  #concat(reqs: Request[], rows: number, used: [string, Rows][]): Tensor[] {
    const axis = this.#layout.axis;
    return reqs[0]!.tensors.map((first, i) => {
      const dims = [...first.dims];
      dims[axis] = rows;
      const outer = sizeOf(dims, 0, axis);
      const inner = sizeOf(dims, axis + 1, dims.length);
      const ctor = first.data.constructor as unknown as ArrayCtor;
      const key = `${first.dtype}:${outer * inner}`;
      const spare = this.#spare.get(key);
      let buf = spare?.pop();
      if (spare) {
        // Most recently used last: a shape not seen for the last SPARE_SHAPES others is dropped.
        this.#spare.delete(key);
        this.#spare.set(key, spare);
      }
      if (!buf || buf.length < outer * rows * inner) {
        buf = allocOutput(ctor as never, outer * inner * Math.max(rows, this.#opts.maxBatchSize)) as unknown as Rows;
      }
      used.push([key, buf]);
      const data = buf.subarray(0, outer * rows * inner);
      let offset = 0;
      for (const r of reqs) {
        const src = r.tensors[i]!.data as unknown as Rows;
        const block = r.rows * inner;
        if (outer === 1) data.set(src, offset * inner);
        else for (let o = 0; o < outer; o++) data.set(src.subarray(o * block, (o + 1) * block), (o * rows + offset) * inner);
        offset += r.rows;
      }
      return new Tensor(first.dtype, data as never, dims);
    });
  }

  /** Keeps a finished batch's input buffers for the next batches (as many as can run at once). */
  #giveBack(used: [string, Rows][]): void {
    if (this.#closed) return;
    for (const [key, buf] of used) {
      let list = this.#spare.get(key);
      if (!list) {
        this.#spare.set(key, (list = []));
        // Input shapes that vary (sequence lengths, image sizes) must not pile up buffers.
        if (this.#spare.size > SPARE_SHAPES) this.#spare.delete(this.#spare.keys().next().value!);
      }
      if (list.length < this.#opts.maxConcurrentBatches) list.push(buf);
    }
  }

  /** Each request's rows of every output (copies), or undefined when an output lacks the batch dim. */
  #split(reqs: Request[], rows: number, outputs: Record<string, Tensor>): Record<string, Tensor>[] | undefined {
    const per: Record<string, Tensor>[] = reqs.map(() => ({}));
    for (let k = 0; k < this.#outputNames.length; k++) {
      const name = this.#outputNames[k]!;
      const out = outputs[name]!;
      const axis = this.#layout.outputAxes[k]!;
      if (out.dims[axis] !== rows) return undefined;
      const outer = sizeOf(out.dims, 0, axis);
      const inner = sizeOf(out.dims, axis + 1, out.dims.length);
      const src = out.data as unknown as Rows;
      const ctor = out.data.constructor as unknown as ArrayCtor;
      let offset = 0;
      reqs.forEach((r, j) => {
        const dims = [...out.dims];
        dims[axis] = r.rows;
        const block = r.rows * inner;
        let data: Rows;
        if (outer === 1) {
          data = src.slice(offset * inner, offset * inner + block);
        } else {
          data = new ctor(outer * block);
          for (let o = 0; o < outer; o++) data.set(src.subarray((o * rows + offset) * inner, (o * rows + offset) * inner + block), o * block);
        }
        per[j]![name] = new Tensor(out.dtype, data as never, dims);
        offset += r.rows;
      });
    }
    return per;
  }
}
