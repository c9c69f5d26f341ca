/**
 * Hands sonde's metrics to a prom-client Registry (prom-client is an optional peer dependency and
 * is never imported here: any object with prom-client's `registerMetric` works). Each sonde
 * family becomes one collector whose `get()` reads the live values at scrape time, so nothing is
 * copied between scrapes and the two never drift apart.
 */
import { InvalidArgumentError } from '../errors.js';
import { describe } from '../validate.js';
import type { MetricsRegistry } from './registry.js';

/** The part of prom-client's Registry this uses. */
export interface PromRegistryLike {
  registerMetric(metric: unknown): void;
}

interface PromValue {
  value: number;
  labels: Record<string, string | number>;
  metricName?: string;
}

/** prom-client's collector shape: what its Registry calls at scrape time. */
interface PromCollector {
  name: string;
  help: string;
  type: 'counter' | 'gauge' | 'histogram';
  aggregator: 'sum';
  get(): Promise<{ name: string; help: string; type: string; aggregator: 'sum'; values: PromValue[] }>;
  reset(): void;
}

function collector(source: MetricsRegistry, name: string): PromCollector {
  const first = source.collect().find((f) => f.name === name)!;
  const c: PromCollector = {
    name, help: first.help, type: first.type, aggregator: 'sum',
    async get() {
      const f = source.collect().find((x) => x.name === name);
      const values: PromValue[] = [];
      for (const s of f?.series ?? []) {
        if (!s.histogram) {
          values.push({ value: s.value, labels: { ...s.labels } });
          continue;
        }
        for (const b of s.histogram.buckets()) {
          values.push({ value: b.count, labels: { ...s.labels, le: b.le === Infinity ? '+Inf' : b.le }, metricName: `${name}_bucket` });
        }
        values.push({ value: s.histogram.sum, labels: { ...s.labels }, metricName: `${name}_sum` });
        values.push({ value: s.histogram.count, labels: { ...s.labels }, metricName: `${name}_count` });
      }
      // prom-client rewrites `name` of counters for OpenMetrics output; report what it holds now.
      return { name: c.name, help: c.help, type: c.type, aggregator: 'sum', values };
    },
    // Counters and histograms here are owned by sessions; a Registry reset leaves them as they are.
    reset() {},
  };
  return c;
}

/**
 * Registers every metric of `source` (the process-wide registry by default) with `promRegistry`,
 * including families that appear later. Returns a function that stops adding new ones.
 */
export function registerWith(promRegistry: unknown, source: MetricsRegistry): () => void {
  if (!promRegistry || typeof (promRegistry as PromRegistryLike).registerMetric !== 'function') {
    throw new InvalidArgumentError(`metrics.register(registry): registry must be a prom-client Registry (an object with registerMetric()), got ${describe(promRegistry)}`);
  }
  const target = promRegistry as PromRegistryLike;
  const add = (name: string) => {
    try {
      target.registerMetric(collector(source, name));
    } catch (err) {
      throw new InvalidArgumentError(`metrics.register(registry): cannot register '${name}': ${(err as Error).message}`, { cause: err });
    }
  };
  for (const f of source.collect()) add(f.name);
  return source.onFamily(add);
}
