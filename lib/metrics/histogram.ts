/**
 * Latency histogram with log-spaced buckets: constant memory, O(1) record, quantiles with a
 * bounded relative error, and cumulative buckets that map directly onto a Prometheus histogram.
 */
import { InvalidArgumentError } from '../errors.js';

/** Bucket bounds grow by this factor: a quantile is off by at most half of it (~4.4%). */
const GROWTH = 2 ** (1 / 8);

export interface HistogramOptions {
  /** Smallest value resolved (values below share the first bucket). Default 1e-6 (1 µs in seconds). */
  min?: number;
  /** Largest value resolved (values above share the overflow bucket). Default 1e4. */
  max?: number;
}

export interface HistogramSnapshot {
  count: number;
  sum: number;
  min: number;
  max: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
}

export class Histogram {
  readonly bounds: Float64Array;   // upper bounds; bucket i holds values in (bounds[i-1], bounds[i]]
  readonly counts: Float64Array;   // one more than bounds: the last is the overflow bucket
  count = 0;
  sum = 0;
  min = Infinity;
  max = -Infinity;

  constructor(options: HistogramOptions = {}) {
    const min = options.min ?? 1e-6;
    const max = options.max ?? 1e4;
    if (!(min > 0 && max > min && Number.isFinite(max))) {
      throw new InvalidArgumentError(`Histogram: need 0 < min < max < Infinity, got min ${min}, max ${max}`);
    }
    const n = Math.ceil(Math.log(max / min) / Math.log(GROWTH)) + 1;
    this.bounds = new Float64Array(n);
    for (let i = 0; i < n; i++) this.bounds[i] = min * GROWTH ** i;
    this.counts = new Float64Array(n + 1);
  }

  /** Records one value (NaN is ignored: a timing cannot be NaN unless something upstream broke). */
  record(v: number): void {
    if (Number.isNaN(v)) return;
    const b = this.bounds;
    let i: number;
    if (v <= b[0]!) i = 0;
    else if (v > b[b.length - 1]!) i = b.length;
    else {
      i = Math.ceil(Math.log(v / b[0]!) / Math.log(GROWTH));
      // Guard the float rounding of the log at bucket edges.
      if (i > 0 && v <= b[i - 1]!) i--;
      else if (v > b[i]!) i++;
    }
    this.counts[i]!++;
    this.count++;
    this.sum += v;
    if (v < this.min) this.min = v;
    if (v > this.max) this.max = v;
  }

  /**
   * The q-quantile (0 <= q <= 1), interpolated inside its bucket and clamped to the observed
   * [min, max]; NaN when empty.
   */
  quantile(q: number): number {
    if (!(q >= 0 && q <= 1)) throw new InvalidArgumentError(`Histogram.quantile(q): q must be in [0, 1], got ${q}`);
    if (this.count === 0) return NaN;
    const rank = q * this.count;
    let seen = 0;
    for (let i = 0; i < this.counts.length; i++) {
      const c = this.counts[i]!;
      if (c === 0) continue;
      if (seen + c >= rank) {
        const lo = i === 0 ? this.min : this.bounds[i - 1]!;
        const hi = i < this.bounds.length ? this.bounds[i]! : this.max;
        const v = lo + (hi - lo) * ((rank - seen) / c);
        return Math.min(this.max, Math.max(this.min, v));
      }
      seen += c;
    }
    return this.max;
  }

  snapshot(): HistogramSnapshot {
    const empty = this.count === 0;
    return {
      count: this.count, sum: this.sum,
      min: empty ? NaN : this.min, max: empty ? NaN : this.max, mean: empty ? NaN : this.sum / this.count,
      p50: this.quantile(0.5), p90: this.quantile(0.9), p99: this.quantile(0.99),
    };
  }

  /**
   * Cumulative counts at every `step`-th bucket bound (step 8: each doubling), ending with +Inf:
   * exact counts, since the bounds are the histogram's own. Trailing bounds past the largest
   * observation are omitted (they would repeat the total).
   */
  buckets(step = 8): { le: number; count: number }[] {
    const out: { le: number; count: number }[] = [];
    let total = 0;
    for (let i = 0; i < this.bounds.length; i++) {
      total += this.counts[i]!;
      if ((i + 1) % step === 0) {
        out.push({ le: this.bounds[i]!, count: total });
        if (this.bounds[i]! >= this.max) break;
      }
    }
    out.push({ le: Infinity, count: this.count });
    return out;
  }

  reset(): void {
    this.counts.fill(0);
    this.count = 0;
    this.sum = 0;
    this.min = Infinity;
    this.max = -Infinity;
  }
}
