/**
 * Metrics as plain objects and as Prometheus text. Sessions and models record into a registry
 * (`metrics` is the process-wide one, per JS thread); `snapshot()` returns numbers with
 * p50/p90/p99, `toPrometheus()` the text exposition format (0.0.4), with names and units by
 * Prometheus conventions (`_seconds`, `_bytes`, `_total`).
 */
import { native } from '../binding.js';
import { InvalidArgumentError } from '../errors.js';
import { Histogram, type HistogramOptions, type HistogramSnapshot } from './histogram.js';

export type Labels = Readonly<Record<string, string>>;
type Kind = 'counter' | 'gauge' | 'histogram';

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

interface Family {
  name: string;
  help: string;
  kind: Kind;
  labelNames: readonly string[];
  series: Map<string, { labels: Labels; value: number; histogram?: Histogram }>;
  collect?: () => void;
  histogramOptions?: HistogramOptions;
}

/** A family's live series (histograms as the objects themselves), as `collect()` returns them. */
export interface CollectedFamily {
  name: string;
  help: string;
  type: Kind;
  series: { labels: Labels; value: number; histogram?: Histogram }[];
}

export interface CounterHandle { inc(labels?: Labels, by?: number): void }
export interface GaugeHandle { set(labels: Labels | undefined, value: number): void }
export interface HistogramHandle { observe(labels: Labels | undefined, value: number): void; get(labels?: Labels): Histogram }

export interface MetricSnapshot {
  name: string;
  help: string;
  type: Kind;
  series: { labels: Labels; value?: number; histogram?: HistogramSnapshot }[];
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function formatNumber(v: number): string {
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  if (Number.isNaN(v)) return 'NaN';
  return String(v);
}

export class MetricsRegistry {
  #families = new Map<string, Family>();
  #listeners = new Set<(name: string) => void>();

  /**
   * `collect`, if given, runs before every snapshot or exposition and sets the totals kept
   * elsewhere (a hot path then counts in a plain field instead of a labelled series lookup).
   */
  counter(name: string, help: string, labelNames: readonly string[] = [], collect?: (set: GaugeHandle['set']) => void): CounterHandle {
    const f = this.#family(name, help, 'counter', labelNames);
    if (collect) f.collect = () => collect((labels, value) => { this.#series(f, labels ?? {}).value = value; });
    return {
      inc: (labels = {}, by = 1) => {
        if (!(by >= 0)) throw new InvalidArgumentError(`counter ${name}: increment must be >= 0, got ${by}`);
        this.#series(f, labels).value += by;
      },
    };
  }

  /** `collect`, if given, runs before every snapshot or exposition (for values read on demand). */
  gauge(name: string, help: string, labelNames: readonly string[] = [], collect?: (set: GaugeHandle['set']) => void): GaugeHandle {
    const f = this.#family(name, help, 'gauge', labelNames);
    const set: GaugeHandle['set'] = (labels, value) => { this.#series(f, labels ?? {}).value = value; };
    if (collect) f.collect = () => collect(set);
    return { set };
  }

  /** `options` sets the resolved range of every series (default 1 µs to 1e4 s, for latencies). */
  histogram(name: string, help: string, labelNames: readonly string[] = [], options?: HistogramOptions): HistogramHandle {
    const f = this.#family(name, help, 'histogram', labelNames);
    if (options) f.histogramOptions = options;
    const get = (labels: Labels = {}) => {
      const s = this.#series(f, labels);
      return (s.histogram ??= new Histogram(f.histogramOptions));
    };
    return { observe: (labels, value) => get(labels ?? {}).record(value), get };
  }

  /** Forgets the series whose labels include all of `match` (e.g. a disposed session's). */
  removeSeries(match: Labels): void {
    for (const f of this.#families.values()) {
      for (const [key, s] of f.series) {
        if (Object.entries(match).every(([k, v]) => s.labels[k] === v)) f.series.delete(key);
      }
    }
  }

  /** Every family's live series after running the gauges' collect callbacks (for exporters). */
  collect(): CollectedFamily[] {
    return [...this.#families.values()].map((f) => {
      f.collect?.();
      return { name: f.name, help: f.help, type: f.kind, series: [...f.series.values()] };
    });
  }

  /** Calls `listener` with the name of every family registered from now on; returns an unsubscribe. */
  onFamily(listener: (name: string) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  snapshot(): MetricSnapshot[] {
    return [...this.#families.values()].map((f) => {
      f.collect?.();
      return {
        name: f.name, help: f.help, type: f.kind,
        series: [...f.series.values()].map((s) =>
          (s.histogram ? { labels: s.labels, histogram: s.histogram.snapshot() } : { labels: s.labels, value: s.value })),
      };
    });
  }

  toPrometheus(): string {
    const lines: string[] = [];
    for (const f of this.#families.values()) {
      f.collect?.();
      lines.push(`# HELP ${f.name} ${f.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`);
      lines.push(`# TYPE ${f.name} ${f.kind}`);
      for (const s of f.series.values()) {
        const base = Object.entries(s.labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
        const fmt = (extra: string[] = []) => {
          const all = [...base, ...extra];
          return all.length ? `{${all.join(',')}}` : '';
        };
        if (s.histogram) {
          for (const b of s.histogram.buckets()) lines.push(`${f.name}_bucket${fmt([`le="${formatNumber(b.le)}"`])} ${b.count}`);
          lines.push(`${f.name}_sum${fmt()} ${formatNumber(s.histogram.sum)}`);
          lines.push(`${f.name}_count${fmt()} ${s.histogram.count}`);
        } else {
          lines.push(`${f.name}${fmt()} ${formatNumber(s.value)}`);
        }
      }
    }
    return `${lines.join('\n')}\n`;
  }

  #family(name: string, help: string, kind: Kind, labelNames: readonly string[]): Family {
    if (typeof name !== 'string' || !METRIC_NAME.test(name)) {
      throw new InvalidArgumentError(`metric name must match ${METRIC_NAME}, got ${JSON.stringify(name)}`);
    }
    for (const l of labelNames) {
      if (!LABEL_NAME.test(l) || l.startsWith('__') || l === 'le') {
        throw new InvalidArgumentError(`metric ${name}: invalid label name ${JSON.stringify(l)}`);
      }
    }
    const existing = this.#families.get(name);
    if (existing) {
      if (existing.kind !== kind || existing.labelNames.join() !== labelNames.join()) {
        throw new InvalidArgumentError(`metric ${name} is already registered as a ${existing.kind} with labels [${existing.labelNames.join(', ')}]`);
      }
      return existing;
    }
    const f: Family = { name, help, kind, labelNames: [...labelNames], series: new Map() };
    this.#families.set(name, f);
    for (const l of this.#listeners) l(name);
    return f;
  }

  #series(f: Family, labels: Labels) {
    const keys = Object.keys(labels);
    if (keys.length !== f.labelNames.length || !f.labelNames.every((l) => typeof labels[l] === 'string')) {
      throw new InvalidArgumentError(`metric ${f.name} takes labels [${f.labelNames.join(', ')}], got {${keys.join(', ')}}`);
    }
    const key = f.labelNames.map((l) => labels[l]).join('\u0000');
    let s = f.series.get(key);
    if (!s) {
      s = { labels: Object.fromEntries(f.labelNames.map((l) => [l, labels[l]!])), value: 0 };
      f.series.set(key, s);
    }
    return s;
  }
}

/** The process-wide registry (one per JS thread), with sonde's runtime gauges. */
export const metrics = new MetricsRegistry();
metrics.gauge('sonde_threads', 'Size of the compute thread pool of this thread\'s Node environment.', [],
  (set) => set(undefined, native().getThreads()));
metrics.gauge('sonde_native_memory_bytes',
  'Native memory sonde holds in this thread\'s environment (weights, models, KV caches, output buffers), as reported to V8.', [],
  (set) => set(undefined, native().nativeMemory()));
metrics.gauge('sonde_output_pool_cached_bytes', 'Idle output buffer memory kept for reuse.', [],
  (set) => set(undefined, native().bufferPoolStats().cachedBytes));
