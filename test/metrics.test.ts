import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, Tensor, kernels, metrics, reportedExternalMemory } from '../dist/index.js';

describe('Histogram', () => {
  it('quantiles are within the bucket error of the exact ones', () => {
    const h = new metrics.Histogram();
    const xs: number[] = [];
    let s = 12345;
    for (let i = 0; i < 20000; i++) {
      s = (s * 1103515245 + 12345) >>> 0;
      // Log-uniform from 10 us to 1 s, like latencies.
      const v = 1e-5 * 10 ** (5 * (s / 2 ** 32));
      xs.push(v);
      h.record(v);
    }
    xs.sort((a, b) => a - b);
    for (const q of [0.5, 0.9, 0.99]) {
      const exact = xs[Math.ceil(q * xs.length) - 1]!;
      // Buckets grow by 2^(1/8) (9%); interpolation keeps the estimate inside the exact value's bucket.
      expect(Math.abs(h.quantile(q) / exact - 1)).toBeLessThan(0.0905);
    }
    const snap = h.snapshot();
    expect(snap.count).toBe(20000);
    expect(snap.min).toBe(xs[0]);
    expect(snap.max).toBe(xs[xs.length - 1]);
    expect(snap.mean).toBeCloseTo(xs.reduce((a, b) => a + b, 0) / xs.length, 12);
  });

  it('hand-checked small cases, empty, constant, and out-of-range values', () => {
    const h = new metrics.Histogram();
    expect(h.snapshot().p50).toBeNaN();
    h.record(0.002);
    expect(h.quantile(0)).toBe(0.002);
    expect(h.quantile(1)).toBe(0.002);
    expect(h.quantile(0.5)).toBe(0.002);
    h.record(1e9); // above max: overflow bucket, still counted, max exact
    h.record(0);   // below min
    h.record(NaN); // ignored
    expect(h.count).toBe(3);
    expect(h.quantile(1)).toBe(1e9);
    expect(h.quantile(0)).toBe(0);
    const b = h.buckets();
    expect(b[b.length - 1]).toEqual({ le: Infinity, count: 3 });
    // Cumulative and non-decreasing.
    for (let i = 1; i < b.length; i++) expect(b[i]!.count).toBeGreaterThanOrEqual(b[i - 1]!.count);
    h.reset();
    expect(h.count).toBe(0);
    expect(() => h.quantile(1.5)).toThrow(InvalidArgumentError);
    expect(() => new metrics.Histogram({ min: 0 })).toThrow(/0 < min < max/);
  });
});

describe('MetricsRegistry', () => {
  it('counts, gauges and histograms as plain objects and as Prometheus text', () => {
    const r = new metrics.MetricsRegistry();
    const req = r.counter('sonde_requests_total', 'Requests.', ['session', 'outcome']);
    const lat = r.histogram('sonde_request_duration_seconds', 'End-to-end latency.', ['session']);
    const q = r.gauge('sonde_queue_length', 'Queued requests.', ['session']);
    req.inc({ session: 'a', outcome: 'ok' });
    req.inc({ session: 'a', outcome: 'ok' }, 2);
    req.inc({ session: 'b "x"\n', outcome: 'error' });
    for (const v of [0.001, 0.002, 0.004, 0.5]) lat.observe({ session: 'a' }, v);
    q.set({ session: 'a' }, 7);
    const snap = r.snapshot();
    const byName = Object.fromEntries(snap.map((m) => [m.name, m]));
    expect(byName.sonde_requests_total!.series.find((s) => s.labels.session === 'a')!.value).toBe(3);
    expect(byName.sonde_request_duration_seconds!.series[0]!.histogram!.count).toBe(4);
    expect(byName.sonde_queue_length!.series[0]!.value).toBe(7);

    const text = r.toPrometheus();
    // Every line is a comment or `name{labels} value` with a valid float.
    for (const line of text.trim().split('\n')) {
      expect(line).toMatch(/^(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .*|[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN))$/);
    }
    expect(text).toContain('# TYPE sonde_request_duration_seconds histogram');
    expect(text).toContain('sonde_requests_total{session="a",outcome="ok"} 3');
    expect(text).toContain('sonde_requests_total{session="b \\"x\\"\\n",outcome="error"} 1');
    expect(text).toContain('sonde_request_duration_seconds_bucket{session="a",le="+Inf"} 4');
    expect(text).toContain('sonde_request_duration_seconds_count{session="a"} 4');
    expect(text).toMatch(/sonde_request_duration_seconds_sum\{session="a"\} 0\.507/);
    // The bucket holding 0.004 already counts the three small ones.
    const buckets = [...text.matchAll(/_bucket\{session="a",le="([^"]+)"\} (\d+)/g)].map((m) => [Number(m[1] === '+Inf' ? Infinity : m[1]), Number(m[2])]);
    expect(buckets.find(([le]) => le! >= 0.004 && le! < 0.5)![1]).toBe(3);

    r.removeSeries({ session: 'a' });
    expect(r.toPrometheus()).not.toContain('session="a"');
  });

  it('rejects bad names, labels and increments', () => {
    const r = new metrics.MetricsRegistry();
    expect(() => r.counter('bad-name', 'x')).toThrow(InvalidArgumentError);
    expect(() => r.counter('ok', 'x', ['__reserved'])).toThrow(/invalid label name/);
    expect(() => r.histogram('h', 'x', ['le'])).toThrow(/invalid label name/);
    const c = r.counter('c_total', 'x', ['a']);
    expect(() => c.inc({ b: '1' } as never)).toThrow('metric c_total takes labels [a], got {b}');
    expect(() => c.inc({ a: '1' }, -1)).toThrow(/must be >= 0/);
    expect(() => r.gauge('c_total', 'x', ['a'])).toThrow(/already registered as a counter/);
  });

  it('the process-wide registry reports the runtime gauges', () => {
    const text = metrics.toPrometheus();
    expect(text).toMatch(/^sonde_threads \d+$/m);
    expect(text).toMatch(/^sonde_native_memory_bytes \d+$/m);
    expect(metrics.snapshot().some((m) => m.name === 'sonde_output_pool_cached_bytes')).toBe(true);
  });

  it('the native memory gauge counts what sonde holds, not the ArrayBuffers JS allocates', async () => {
    const gauge = () => Number(/^sonde_native_memory_bytes (\d+)$/m.exec(metrics.toPrometheus())![1]);
    const before = reportedExternalMemory();
    expect(gauge()).toBe(before);
    // V8's own total (native().externalMemory()) counts this array, and falls whenever a
    // collection frees others, so a test of sonde's reports cannot read it; sonde's own does not.
    const plain = new Float32Array(1 << 20);
    expect(reportedExternalMemory()).toBe(before);
    // Packed weights are sonde's: reported while the handle lives, released by dispose().
    const w = kernels.packGemmWeights(new Tensor('float32', new Float32Array(256 * 256).fill(0.5), [256, 256]));
    expect(reportedExternalMemory() - before).toBe(w.bytes);
    expect(gauge()).toBe(before + w.bytes);
    w.dispose();
    expect(reportedExternalMemory()).toBe(before);
    expect(plain.length).toBe(1 << 20);
  });
});
