/**
 * Per-language-model metrics (issue #9, item 5), on the design of session.ts: every LanguageModel
 * records into the process-wide registry under its `model` label, and `model.metrics()` returns
 * the plain-object snapshot. Families are declared once here, at import, so an exporter attached
 * before any model loads already knows every name. Counters and gauges are plain fields read at
 * scrape time; the KV-cache and expert figures are read live from the model's pool.
 */
import type { Histogram, HistogramSnapshot } from './histogram.js';
import { metrics as registry, type Labels } from './registry.js';

/** What a model's serving core reports when asked (the scheduler's pool and block manager). */
export interface LlmMetricsSource {
  running: number;
  waiting: number;
  blocks: { total: number; used: number; cached: number; free: number; hitTokens: number; queriedTokens: number; evictions: number };
  blockSize: number;
  bytes: number;
  highWaterBytes: number;
  maxBytes: number;
  /** [layer * experts + expert] tokens routed, or undefined for dense models. */
  expertCounts: Float64Array | undefined;
  experts: number;
}

const L = ['model'] as const;
const live = new Set<LlmMetrics>();
const each = (f: (m: LlmMetrics, s: LlmMetricsSource) => void) => {
  for (const m of live) { const s = m.read(); if (s) f(m, s); }
};
registry.counter('sonde_llm_requests_total', 'generate/complete/logits calls of a LanguageModel that settled.', L,
  (set) => { for (const m of live) set(m.labels, m.counts.requests); });
registry.counter('sonde_llm_generated_tokens_total', 'Tokens sampled by generations.', L,
  (set) => { for (const m of live) set(m.labels, m.counts.generated); });
registry.counter('sonde_llm_prompt_tokens_total', 'Prompt tokens computed (prefix-cache hits excluded).', L,
  (set) => { for (const m of live) set(m.labels, m.counts.promptTokens); });
registry.counter('sonde_llm_steps_total', 'Batched forward steps (one native call each).', L,
  (set) => { for (const m of live) set(m.labels, m.counts.steps); });
const ttft = registry.histogram('sonde_llm_time_to_first_token_seconds', 'From a generate call to its first sampled token, queueing included.', L);
const itl = registry.histogram('sonde_llm_inter_token_latency_seconds', 'Between two sampled tokens of one generation.', L);
const stepDuration = registry.histogram('sonde_llm_step_duration_seconds', 'Duration of one batched forward step.', L);
const stepRows = registry.histogram('sonde_llm_step_tokens', 'Tokens (decode and prompt) per batched step.', L, { min: 1, max: 1 << 20 });
registry.gauge('sonde_llm_sequences_running', 'Sequences being prefilled or decoded.', L,
  (set) => each((m, s) => set(m.labels, s.running)));
registry.gauge('sonde_llm_sequences_waiting', 'Requests queued for admission.', L,
  (set) => each((m, s) => set(m.labels, s.waiting)));
registry.gauge('sonde_llm_kv_blocks', 'KV-cache blocks by state: used (referenced), cached (reusable, evictable), free.', ['model', 'state'],
  (set) => each((m, s) => {
    set({ model: m.name, state: 'used' }, s.blocks.used);
    set({ model: m.name, state: 'cached' }, s.blocks.cached);
    set({ model: m.name, state: 'free' }, s.blocks.free);
  }));
registry.gauge('sonde_llm_kv_bytes', 'Native memory held by the KV-cache pool.', L,
  (set) => each((m, s) => set(m.labels, s.bytes)));
registry.gauge('sonde_llm_kv_high_water_bytes', 'Most native memory the KV-cache pool has held.', L,
  (set) => each((m, s) => set(m.labels, s.highWaterBytes)));
registry.counter('sonde_llm_prefix_hit_tokens_total', 'Prompt tokens served from the prefix cache.', L,
  (set) => each((m, s) => set(m.labels, s.blocks.hitTokens)));
registry.counter('sonde_llm_prefix_queried_tokens_total', 'Prompt tokens looked up in the prefix cache.', L,
  (set) => each((m, s) => set(m.labels, s.blocks.queriedTokens)));
registry.counter('sonde_llm_kv_evictions_total', 'Cached KV blocks evicted to make space.', L,
  (set) => each((m, s) => set(m.labels, s.blocks.evictions)));
registry.counter('sonde_llm_expert_tokens_total', 'Tokens routed to each expert of each MoE layer (expert load).', ['model', 'layer', 'expert'],
  (set) => each((m, s) => {
    const c = s.expertCounts;
    if (!c || s.experts === 0) return;
    for (let i = 0; i < c.length; i++) set({ model: m.name, layer: String(Math.floor(i / s.experts)), expert: String(i % s.experts) }, c[i]!);
  }));

export interface LanguageModelMetricsSnapshot {
  /** The `model` label of this model's series. */
  model: string;
  /** Seconds since the model loaded. */
  uptime: number;
  requests: number;
  generatedTokens: number;
  /** Prompt tokens computed (those served from the prefix cache are not). */
  promptTokens: number;
  steps: number;
  /** Seconds from a generate call to its first token, and between tokens of one generation. */
  timeToFirstToken: HistogramSnapshot;
  interTokenLatency: HistogramSnapshot;
  stepTime: HistogramSnapshot;
  /** Tokens per step. */
  stepTokens: HistogramSnapshot;
  /**
   * Generated tokens per second of step time (the serving throughput while busy; idle time is not
   * counted), and per second since load.
   */
  tokensPerSecond: { busy: number; sinceLoad: number };
  running: number;
  waiting: number;
  kv: { blocks: { total: number; used: number; cached: number; free: number }; blockSize: number; bytes: number; highWaterBytes: number; maxBytes: number };
  prefix: { hitTokens: number; queriedTokens: number; hitRate: number };
  evictions: number;
  /** MoE models: tokens routed per [layer][expert]. */
  expertLoad?: number[][];
}

export class LlmMetrics {
  readonly name: string;
  readonly labels: Labels;
  readonly #start = performance.now();
  readonly counts = { requests: 0, generated: 0, promptTokens: 0, steps: 0, stepSeconds: 0 };
  readonly #ttft: Histogram;
  readonly #itl: Histogram;
  readonly #step: Histogram;
  readonly #stepRows: Histogram;
  #source: () => LlmMetricsSource | undefined;
  #last: LlmMetricsSource | undefined;

  constructor(name: string, source: () => LlmMetricsSource | undefined) {
    this.name = name;
    this.labels = { model: name };
    this.#source = source;
    this.#ttft = ttft.get(this.labels);
    this.#itl = itl.get(this.labels);
    this.#step = stepDuration.get(this.labels);
    this.#stepRows = stepRows.get(this.labels);
    live.add(this);
  }

  /** The live figures (the last ones read, once the model is disposed). */
  read(): LlmMetricsSource | undefined {
    if (live.has(this)) this.#last = this.#source() ?? this.#last;
    return this.#last;
  }

  requestSettled(): void {
    this.counts.requests++;
  }

  stepped(rows: number, promptRows: number, seconds: number): void {
    const c = this.counts;
    c.steps++;
    c.promptTokens += promptRows;
    c.stepSeconds += seconds;
    this.#step.record(seconds);
    this.#stepRows.record(rows);
  }

  firstToken(seconds: number): void {
    this.counts.generated++;
    this.#ttft.record(seconds);
  }

  interToken(seconds: number): void {
    this.counts.generated++;
    this.#itl.record(seconds);
  }

  /** The model was disposed: its series leave the registry (the snapshot keeps the last figures). */
  close(): void {
    this.read();
    if (!live.delete(this)) return;
    registry.removeSeries(this.labels);
  }

  snapshot(): LanguageModelMetricsSnapshot {
    const c = this.counts;
    const uptime = (performance.now() - this.#start) / 1000;
    const s = this.read();
    const b = s?.blocks ?? { total: 0, used: 0, cached: 0, free: 0, hitTokens: 0, queriedTokens: 0, evictions: 0 };
    const out: LanguageModelMetricsSnapshot = {
      model: this.name, uptime, requests: c.requests, generatedTokens: c.generated, promptTokens: c.promptTokens, steps: c.steps,
      timeToFirstToken: this.#ttft.snapshot(), interTokenLatency: this.#itl.snapshot(), stepTime: this.#step.snapshot(), stepTokens: this.#stepRows.snapshot(),
      tokensPerSecond: { busy: c.stepSeconds > 0 ? c.generated / c.stepSeconds : 0, sinceLoad: c.generated / uptime },
      running: s?.running ?? 0, waiting: s?.waiting ?? 0,
      kv: {
        blocks: { total: b.total, used: b.used, cached: b.cached, free: b.free }, blockSize: s?.blockSize ?? 0,
        bytes: s?.bytes ?? 0, highWaterBytes: s?.highWaterBytes ?? 0, maxBytes: s?.maxBytes ?? 0,
      },
      prefix: { hitTokens: b.hitTokens, queriedTokens: b.queriedTokens, hitRate: b.queriedTokens > 0 ? b.hitTokens / b.queriedTokens : 0 },
      evictions: b.evictions,
    };
    const e = s?.expertCounts;
    if (e && s.experts > 0) {
      out.expertLoad = [];
      for (let l = 0; l < e.length / s.experts; l++) out.expertLoad.push(Array.from(e.subarray(l * s.experts, (l + 1) * s.experts)));
    }
    return out;
  }
}
