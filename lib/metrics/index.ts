/** sonde.metrics: the process-wide registry (per JS thread) and the building blocks. */
import { metrics as processRegistry, type MetricSnapshot } from './registry.js';

export { Histogram } from './histogram.js';
export type { HistogramOptions, HistogramSnapshot } from './histogram.js';
export { MetricsRegistry } from './registry.js';
export type { Labels, CounterHandle, GaugeHandle, HistogramHandle, MetricSnapshot } from './registry.js';

/** The registry sonde's sessions and models record into. */
export const registry = processRegistry;

/** Every metric of the process-wide registry as plain numbers (histograms with p50/p90/p99). */
export function snapshot(): MetricSnapshot[] {
  return processRegistry.snapshot();
}

/** The process-wide registry in the Prometheus text exposition format (serve it at /metrics). */
export function toPrometheus(): string {
  return processRegistry.toPrometheus();
}
