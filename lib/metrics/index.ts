/** sonde.metrics: the process-wide registry (per JS thread) and the building blocks. */
import { registerWith } from './prometheus.js';
import { metrics as processRegistry, type MetricSnapshot } from './registry.js';
// Declares the per-session families before any exporter attaches.
import './session.js';
import './llm.js';

export { Histogram } from './histogram.js';
export type { HistogramOptions, HistogramSnapshot } from './histogram.js';
export { MetricsRegistry } from './registry.js';
export type { Labels, CounterHandle, GaugeHandle, HistogramHandle, MetricSnapshot, CollectedFamily } from './registry.js';
export type { SessionMetricsSnapshot } from './session.js';
export type { LanguageModelMetricsSnapshot } from './llm.js';
export type { PromRegistryLike } from './prometheus.js';

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

/**
 * Hands sonde's metrics to a prom-client Registry (`import { register } from 'prom-client'`, or a
 * `new Registry()`): every sonde_* family, including families created later, read live at each
 * scrape. Returns a function that stops registering families created later.
 */
export function register(promRegistry: unknown): () => void {
  return registerWith(promRegistry, processRegistry);
}
