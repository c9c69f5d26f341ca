// Session metrics (issue #7): session.metrics() counts what the test did, the process-wide
// Prometheus text has the documented names with the session label and parses, prom-client's
// Registry serves the same numbers through sonde.metrics.register(), and a disposed session's
// series leave the registry.
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { AbortError, InvalidArgumentError, Session, Tensor, metrics } from '../dist/index.js';
import { GraphBuilder, float32Tensor } from '../bench/graphs/builder.js';

function scale() {
  const g = new GraphBuilder('scale', { opset: 17 });
  g.input('x', 'float32', ['N', 3]);
  const [y] = g.node('Mul', ['x', g.init('two', float32Tensor([2]))]);
  g.output(y, 'float32', ['N', 3]);
  return g.toBytes();
}

const row = (rows: number) => new Tensor('float32', new Float32Array(rows * 3).fill(1), [rows, 3]);
const LINE = /^(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .*|[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN))$/;

/** Prometheus text as { 'name{labels}': value } (comments checked separately). */
function parse(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.trim().split('\n')) {
    if (line === '') continue;
    expect(line).toMatch(LINE);
    if (line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1).replace('+Inf', 'Infinity')));
  }
  return out;
}

describe('session metrics', () => {
  it('snapshot counts requests, errors by code, batches and batch sizes', { timeout: 15_000 }, async () => {
    const s = await Session.load(scale(), { name: 'metrics-a', batching: { maxBatchSize: 8, maxDelayMs: 30 } });
    await Promise.all([s.run({ x: row(1) }), s.run({ x: row(2) }), s.run({ x: row(3) })]);
    await s.run({ x: row(1) });
    await expect(s.run({ x: new Tensor('float32', new Float32Array(4), [1, 4]) })).rejects.toBeInstanceOf(InvalidArgumentError);
    const ac = new AbortController();
    ac.abort();
    await expect(s.run({ x: row(1) }, { signal: ac.signal })).rejects.toBeInstanceOf(AbortError);
    const m = s.metrics();
    expect(m.session).toBe('metrics-a');
    expect(m.requests).toBe(6);
    expect(m.errors).toEqual({ ERR_SONDE_INVALID_ARGUMENT: 1, ERR_SONDE_ABORTED: 1 });
    expect(m.batches).toBe(2);
    expect(m.batchSize.count).toBe(2);
    expect(m.batchSize.sum).toBe(7);
    expect(m.batchSize.max).toBe(6);
    expect(m.latency.count).toBe(6);
    expect(m.queueTime.count).toBe(4);
    expect(m.computeTime.count).toBe(2);
    expect(m.inFlight).toBe(0);
    expect(m.queued).toBe(0);
    // The first three waited for each other (up to 30 ms); latency bounds queue time plus compute.
    expect(m.latency.max).toBeGreaterThanOrEqual(m.queueTime.max);
    expect(m.latency.p50).toBeGreaterThan(0);
    expect(m.rates.requests).toBeCloseTo(6 / m.uptime, 0);
    expect(m.copyFraction).toBeGreaterThanOrEqual(0);
    expect(m.copyFraction).toBeLessThan(1);

    // Without batching the same counters run: one native run per request, no queue wait.
    const plain = await Session.load(scale(), { name: 'metrics-b' });
    await Promise.all([plain.run({ x: row(2) }), plain.run({ x: row(2) })]);
    const p = plain.metrics();
    expect([p.requests, p.batches, p.batchSize.sum, p.queueTime.max]).toEqual([2, 2, 4, 0]);

    const text = metrics.toPrometheus();
    const v = parse(text);
    expect(v.get('sonde_requests_total{session="metrics-a"}')).toBe(6);
    expect(v.get('sonde_request_errors_total{session="metrics-a",code="ERR_SONDE_INVALID_ARGUMENT"}')).toBe(1);
    expect(v.get('sonde_batches_total{session="metrics-a"}')).toBe(2);
    expect(v.get('sonde_request_duration_seconds_count{session="metrics-a"}')).toBe(6);
    expect(v.get('sonde_request_duration_seconds_bucket{session="metrics-a",le="+Inf"}')).toBe(6);
    expect(v.get('sonde_batch_size_sum{session="metrics-a"}')).toBe(7);
    expect(v.get('sonde_queue_duration_seconds_count{session="metrics-a"}')).toBe(4);
    expect(v.get('sonde_compute_duration_seconds_count{session="metrics-a"}')).toBe(2);
    expect(v.get('sonde_requests_in_flight{session="metrics-a"}')).toBe(0);
    expect(v.get('sonde_queue_length{session="metrics-a"}')).toBe(0);
    expect(v.get('sonde_requests_total{session="metrics-b"}')).toBe(2);
    for (const name of ['sonde_request_duration_seconds', 'sonde_queue_duration_seconds', 'sonde_compute_duration_seconds', 'sonde_batch_size']) {
      expect(text).toContain(`# TYPE ${name} histogram`);
    }
    expect(text).toContain('# TYPE sonde_requests_total counter');
    expect(text).toMatch(/^sonde_threads \d+$/m);
    expect(text).toMatch(/^sonde_native_memory_bytes \d+$/m);

    s.dispose();
    plain.dispose();
    expect(metrics.toPrometheus()).not.toContain('session="metrics-a"');
    // The snapshot outlives the series.
    expect(s.metrics().requests).toBe(6);
  });

  it('sonde.metrics.register hands the same numbers to a prom-client Registry', { timeout: 15_000 }, async () => {
    const reg = new Registry();
    const stop = metrics.register(reg);
    const s = await Session.load(scale(), { name: 'metrics-prom', batching: { maxBatchSize: 4, maxDelayMs: 5 } });
    await Promise.all([s.run({ x: row(1) }), s.run({ x: row(3) })]);
    const v = parse(await reg.metrics());
    expect(v.get('sonde_requests_total{session="metrics-prom"}')).toBe(2);
    expect(v.get('sonde_request_duration_seconds_count{session="metrics-prom"}')).toBe(2);
    expect(v.get('sonde_request_duration_seconds_bucket{session="metrics-prom",le="+Inf"}')).toBe(2);
    expect(v.get('sonde_batch_size_sum{session="metrics-prom"}')).toBe(4);
    expect([...v.keys()].some((k) => k.startsWith('sonde_threads'))).toBe(true);
    const json = await reg.getMetricsAsJSON();
    expect(json.find((m) => m.name === 'sonde_request_duration_seconds')?.type).toBe('histogram');
    // A family created after register() is picked up.
    metrics.registry.counter('sonde_test_late_total', 'A family added after register().').inc();
    expect(await reg.metrics()).toContain('sonde_test_late_total 1');
    stop();
    expect(() => metrics.register(reg)).toThrow(/cannot register 'sonde_threads'/);
    expect(() => metrics.register({})).toThrow(InvalidArgumentError);
    s.dispose();
  });
});
