/**
 * Per-session metrics: what every Session records into the process-wide registry under its
 * `session` label, and the plain-object snapshot `session.metrics()` returns. The families are
 * declared once here, at import, so an exporter attached before any session loads (see
 * prometheus.ts) already knows every name.
 */
import type { SondeErrorCode } from '../errors.js';
import type { Histogram, HistogramSnapshot } from './histogram.js';
import { metrics as registry, type Labels } from './registry.js';

const L = ['session'] as const;
/** Sessions whose series are exported: counters and gauges are read from them at scrape time. */
const live = new Set<SessionMetrics>();
registry.counter('sonde_requests_total', 'Session.run calls that settled (resolved or rejected).', L,
  (set) => { for (const m of live) set(m.labels, m.counts.requests); });
registry.counter('sonde_request_errors_total', 'Session.run calls that rejected, by error code.', ['session', 'code'],
  (set) => { for (const m of live) for (const [code, n] of m.counts.errors) set({ session: m.name, code }, n); });
registry.counter('sonde_batches_total', 'Native plan runs (one per batch when batching, else one per request).', L,
  (set) => { for (const m of live) set(m.labels, m.counts.batches); });
const requestDuration = registry.histogram('sonde_request_duration_seconds',
  'End-to-end latency of Session.run: from the call to its settlement, queueing included.', L);
const queueDuration = registry.histogram('sonde_queue_duration_seconds',
  'Time a request waited in the batching queue before its batch started (0 without batching).', L);
const computeDuration = registry.histogram('sonde_compute_duration_seconds',
  'Duration of one native plan run (a whole batch), including the copies into and out of it.', L);
// Bucket bounds double from 1 row: batch sizes are small integers, not latencies.
const batchSize = registry.histogram('sonde_batch_size', 'Rows (sum of the requests\' batch dims) per native run.', L, { min: 1, max: 1 << 20 });
registry.gauge('sonde_requests_in_flight', 'Session.run calls accepted and not yet settled (queued or running).', L,
  (set) => { for (const m of live) set(m.labels, m.counts.inFlight); });
registry.gauge('sonde_queue_length', 'Requests waiting in the batching queue.', L,
  (set) => { for (const m of live) set(m.labels, m.counts.queued); });

export interface SessionMetricsSnapshot {
  /** The `session` label of this session's series. */
  session: string;
  /** Seconds since the session loaded. */
  uptime: number;
  requests: number;
  /** Rejections by error code. */
  errors: Partial<Record<SondeErrorCode | 'ERR_OTHER', number>>;
  batches: number;
  inFlight: number;
  queued: number;
  /** End-to-end latency, queue wait and native run time, in seconds. */
  latency: HistogramSnapshot;
  queueTime: HistogramSnapshot;
  computeTime: HistogramSnapshot;
  /** Rows per native run. */
  batchSize: HistogramSnapshot;
  /** Per second since load. */
  rates: { requests: number; errors: number; batches: number };
  /**
   * Share of the batches' run time spent concatenating request rows into the batch input and
   * copying outputs back (0 without batching).
   */
  copyFraction: number;
}

export class SessionMetrics {
  readonly name: string;
  readonly labels: Labels;
  readonly #start = performance.now();
  /** Plain fields on the hot path; the registry reads them when it is scraped. */
  readonly counts = { requests: 0, errors: new Map<string, number>(), batches: 0, inFlight: 0, queued: 0 };
  #copySeconds = 0;
  #computeSeconds = 0;
  // Held directly so that a snapshot after dispose (when the series leave the registry) still works.
  readonly #latency: Histogram;
  readonly #queue: Histogram;
  readonly #compute: Histogram;
  readonly #batchSize: Histogram;

  constructor(name: string) {
    this.name = name;
    this.labels = { session: name };
    this.#latency = requestDuration.get(this.labels);
    this.#queue = queueDuration.get(this.labels);
    this.#compute = computeDuration.get(this.labels);
    this.#batchSize = batchSize.get(this.labels);
    live.add(this);
  }

  requestStarted(): void {
    this.counts.inFlight++;
  }

  /** A request settled `seconds` after its call; `code` is its error's code when it rejected. */
  requestSettled(seconds: number, code?: string): void {
    const c = this.counts;
    c.inFlight--;
    c.requests++;
    this.#latency.record(seconds);
    if (code !== undefined) c.errors.set(code, (c.errors.get(code) ?? 0) + 1);
  }

  queueChanged(queued: number): void {
    this.counts.queued = queued;
  }

  dequeued(waitSeconds: number): void {
    this.#queue.record(waitSeconds);
  }

  /** A native run of `rows` rows took `seconds`, of which `copySeconds` went to batch copies. */
  ran(rows: number, seconds: number, copySeconds = 0): void {
    this.counts.batches++;
    this.#batchSize.record(rows);
    this.#compute.record(seconds);
    this.#computeSeconds += seconds;
    this.#copySeconds += copySeconds;
  }

  /** The session was disposed: its series leave the registry (runs still in flight are not exported). */
  close(): void {
    if (!live.delete(this)) return;
    registry.removeSeries(this.labels);
  }

  snapshot(): SessionMetricsSnapshot {
    const c = this.counts;
    const uptime = (performance.now() - this.#start) / 1000;
    const errors = Object.fromEntries(c.errors) as SessionMetricsSnapshot['errors'];
    const errorCount = [...c.errors.values()].reduce((a, b) => a + b, 0);
    return {
      session: this.name, uptime, requests: c.requests, errors, batches: c.batches, inFlight: c.inFlight, queued: c.queued,
      latency: this.#latency.snapshot(), queueTime: this.#queue.snapshot(), computeTime: this.#compute.snapshot(),
      batchSize: this.#batchSize.snapshot(),
      rates: { requests: c.requests / uptime, errors: errorCount / uptime, batches: c.batches / uptime },
      copyFraction: this.#computeSeconds > 0 ? this.#copySeconds / this.#computeSeconds : 0,
    };
  }
}
