/**
 * The latency controller behind `batching.targetLatencyMs`. It knows nothing about clocks or
 * queues: the batcher tells it how long each batch size took to run and how long requests took end
 * to end, and asks it, at each scheduling decision, how many rows to put in the next batch and how
 * long a partial batch may wait. Being a pure function of what it was told, it is tested with
 * made-up timings.
 *
 * The rule, in three parts:
 * 1. Cost model: an EWMA of the run time per batch size. A size never run is predicted from its
 *    observed neighbours: linearly between two, and beyond the largest as that size's time scaled
 *    by rows (an upper bound where a batch costs a fixed overhead plus a per-row part).
 * 2. Batch size, from a ladder (powers of two, maxBatchSize, the preferred sizes): the oldest
 *    queued request finishes `waited + cost(rows)` after it arrived, so the next batch takes the
 *    largest size whose prediction keeps that under HEADROOM x target, skipping sizes that cost
 *    more than LARGER_TOLERANCE times a smaller size per row: a model whose cost per row grows
 *    with the batch (a CNN whose activations outgrow the cache) stays at small batches. When no
 *    size fits, the target is already missed for that request, and the batch takes the largest
 *    size not skipped, because clearing the backlog fastest is what brings the next requests
 *    back under the target. Sizes more than twice the largest one measured are not chosen, so the
 *    model is never trusted far beyond what it has seen; since beyond it the prediction keeps the
 *    per-row cost, the batcher explores upwards until a larger size measures clearly worse.
 *    Every PROBE_EVERY-th batch is one ladder size larger than the rule says (still within the
 *    budget where the rule's choice met it), so that an estimate spoiled by noise is measured again.
 * 3. Delay: a partial batch waits at most `maxDelayMs x scale`, and never so long that the
 *    oldest request could not still finish in time. `scale` halves whenever the p99 of the last
 *    LATENCY_WINDOW requests passes HIGH_WATER x target and recovers slowly below LOW_WATER x
 *    target: waiting for company is the first thing to give up when latency runs short.
 */

/** EWMA weight of the newest run time: recent enough to follow load, smooth enough to ignore a blip. */
const COST_ALPHA = 0.2;
/** Share of the target a plan aims at; the rest absorbs prediction error and timer lateness. */
const HEADROOM = 0.8;
const LATENCY_WINDOW = 256;
const HIGH_WATER = 0.9;
const LOW_WATER = 0.6;
/** A larger batch is taken unless it costs more than this times a smaller one's per row. */
const LARGER_TOLERANCE = 1.15;
/**
 * Every PROBE_EVERY-th batch tries the next ladder size above the choice: an estimate made under a
 * burst of load elsewhere would otherwise keep a size that looks too slow from ever running again.
 */
const PROBE_EVERY = 32;
/** Smallest delay scale: below this the delay is not worth a timer. */
const MIN_SCALE = 1 / 64;

export interface ControllerLimits {
  targetMs: number;
  maxBatchSize: number;
  maxDelayMs: number;
}

export class LatencyController {
  readonly limits: ControllerLimits;
  /** EWMA run time (ms) per batch size. */
  #cost = new Map<number, number>();
  #sizes: number[] = [];
  #seen = new Set<number>();
  #runs = 0;
  #probing = false;
  #latencies = new Float64Array(LATENCY_WINDOW);
  #latencyCount = 0;
  #top = new Float64Array(LATENCY_WINDOW - Math.ceil(0.99 * LATENCY_WINDOW) + 1);
  #scale = 1;

  /**
   * The batch sizes it chooses from, largest first: powers of two, maxBatchSize and the preferred
   * sizes. Few sizes keep few plans compiled (the session caches 16), and keep each size measured
   * often enough for its estimate to stay current.
   */
  readonly #ladder: number[];

  constructor(limits: ControllerLimits, preferred: readonly number[] = []) {
    this.limits = limits;
    const sizes = new Set([limits.maxBatchSize, ...preferred]);
    for (let p = 1; p < limits.maxBatchSize; p *= 2) sizes.add(p);
    this.#ladder = [...sizes].sort((a, b) => b - a);
  }

  /**
   * A batch of `rows` rows took `ms` to run natively. The first run of each size is not measured:
   * it includes compiling the session's plan for that shape, often many times the run itself,
   * and a size whose one measurement is inflated so would look too slow to be tried again.
   */
  observeRun(rows: number, ms: number): void {
    this.#probing = ++this.#runs % PROBE_EVERY === 0;
    if (!this.#seen.has(rows)) {
      this.#seen.add(rows);
      return;
    }
    const old = this.#cost.get(rows);
    if (old === undefined) {
      this.#cost.set(rows, ms);
      this.#sizes.push(rows);
      this.#sizes.sort((a, b) => a - b);
    } else {
      this.#cost.set(rows, old + COST_ALPHA * (ms - old));
    }
  }

  /** A request finished `ms` after it arrived; adjusts the delay scale. */
  observeLatency(ms: number): void {
    this.#latencies[this.#latencyCount++ % LATENCY_WINDOW] = ms;
    const p99 = this.recentP99();
    const target = this.limits.targetMs;
    if (p99 > HIGH_WATER * target) this.#scale = Math.max(MIN_SCALE, this.#scale / 2);
    else if (p99 < LOW_WATER * target) this.#scale = Math.min(1, this.#scale * 1.05);
  }

  /**
   * p99 of the last LATENCY_WINDOW end-to-end latencies (NaN before any). Called per request: the
   * k-th largest (k <= 3 for 256) in one pass, with no sort and no allocation.
   */
  recentP99(): number {
    const n = Math.min(this.#latencyCount, LATENCY_WINDOW);
    if (n === 0) return NaN;
    const k = n - (Math.ceil(0.99 * n) - 1);
    const top = this.#top;
    top.fill(-Infinity, 0, k);
    for (let i = 0; i < n; i++) {
      const v = this.#latencies[i]!;
      if (v <= top[k - 1]!) continue;
      let j = k - 1;
      while (j > 0 && top[j - 1]! < v) { top[j] = top[j - 1]!; j--; }
      top[j] = v;
    }
    return top[k - 1]!;
  }

  /** Predicted run time (ms) of a batch of `rows`; 0 before any run was measured. */
  predict(rows: number): number {
    const sizes = this.#sizes;
    if (sizes.length === 0) return 0;
    const exact = this.#cost.get(rows);
    if (exact !== undefined) return exact;
    const first = sizes[0]!;
    const last = sizes[sizes.length - 1]!;
    if (rows < first) return this.#cost.get(first)!;
    if (rows > last) return (this.#cost.get(last)! * rows) / last;
    let hi = 1;
    while (sizes[hi]! < rows) hi++;
    const a = sizes[hi - 1]!;
    const b = sizes[hi]!;
    const ca = this.#cost.get(a)!;
    const cb = this.#cost.get(b)!;
    return ca + ((cb - ca) * (rows - a)) / (b - a);
  }

  /**
   * How many rows the next batch should hold, given that its oldest request has waited
   * `oldestWaitMs` and `queuedRows` rows are waiting.
   */
  batchRows(oldestWaitMs: number, queuedRows: number): number {
    // Exploration starts at one row: a size below the smallest measured is never tried (its
    // prediction is the smallest's whole cost), so the smallest must be 1.
    if (this.#sizes.length === 0) return 1;
    const largest = this.#sizes[this.#sizes.length - 1]!;
    const cap = Math.min(this.limits.maxBatchSize, Math.max(1, 2 * largest));
    const upTo = Math.min(cap, Math.max(1, queuedRows));
    const budget = HEADROOM * this.limits.targetMs - oldestWaitMs;
    // Smallest first; a size counts unless it costs over LARGER_TOLERANCE times the cheapest
    // smaller size per row. Within that tolerance the larger wins: measured run times are noisy
    // (other processes, the batch running beside it), and a flat cost per row means fewer batches
    // for the same rows, each with its event-loop work that run times do not show.
    let fit = 0;
    let any = 0;
    let cheapest = Infinity;
    for (let i = this.#ladder.length - 1; i >= 0; i--) {
      const rows = this.#ladder[i]!;
      if (rows > upTo) break;
      const cost = this.predict(rows);
      const perRow = cost / rows;
      if (perRow <= cheapest * LARGER_TOLERANCE) {
        any = rows;
        if (cost <= budget) fit = rows;
      }
      cheapest = Math.min(cheapest, perRow);
    }
    const choice = fit || any;
    if (!this.#probing) return choice;
    // Probe the next ladder size up (within the budget when the choice met it).
    const up = this.#ladder.filter((r) => r > choice && r <= upTo).at(-1);
    return up !== undefined && (!fit || this.predict(up) <= budget) ? up : choice;
  }

  /**
   * How long (ms after its arrival) the oldest request of a partial batch may wait for more rows:
   * the scaled maxDelayMs, cut so that a full batch could still run within the target afterwards.
   */
  delayMs(): number {
    const scaled = this.limits.maxDelayMs * this.#scale;
    const slack = HEADROOM * this.limits.targetMs - this.predict(this.batchRows(0, this.limits.maxBatchSize));
    return Math.max(0, Math.min(scaled, slack));
  }

  /** The current delay scale in (0, 1] (for metrics and tests). */
  get delayScale(): number {
    return this.#scale;
  }
}
