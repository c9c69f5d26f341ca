// Dynamic batching (issue #7): batched outputs equal unbatched ones and a scalar reference for every
// request (mixed row counts), keyed queues for different shapes, abort while queued and while
// running, a bad request among good ones (validation and a data-dependent native error), queue
// full, dispose with queued and running requests, load-time errors, and the latency controller
// on made-up timings. Every test has a timeout far below the runner's 60 s.
import { describe, expect, it } from 'vitest';
import {
  AbortError, DisposedError, InvalidArgumentError, QueueFullError, Session, Tensor, reportedExternalMemory,
} from '../dist/index.js';
import { LatencyController } from '../dist/batching/controller.js';
import { GraphBuilder, float32Tensor } from '../bench/graphs/builder.js';
import { uniform } from './session-ort.js';

const T = 15_000;
const IN = 7;
const OUT = 5;
const W = uniform([IN, OUT], 11, -0.5, 0.5).data;
const B = uniform([OUT], 12, -0.5, 0.5).data;

/** relu(x W + b): x ['N', 7] -> ['N', 5]. */
function dense() {
  const g = new GraphBuilder('dense', { opset: 17 });
  g.input('x', 'float32', ['N', IN]);
  const [mm] = g.node('MatMul', ['x', g.init('w', { dtype: 'float32', dims: [IN, OUT], data: W })]);
  const [add] = g.node('Add', [mm, g.init('b', { dtype: 'float32', dims: [OUT], data: B })]);
  const [y] = g.node('Relu', [add]);
  g.output(y, 'float32', ['N', OUT]);
  return g.toBytes();
}

/** The scalar reference of dense() in double precision. */
function denseRef(x: Float32Array, rows: number): Float64Array {
  const y = new Float64Array(rows * OUT);
  for (let r = 0; r < rows; r++) {
    for (let j = 0; j < OUT; j++) {
      let s = B[j]!;
      for (let k = 0; k < IN; k++) s += x[r * IN + k]! * W[k * OUT + j]!;
      y[r * OUT + j] = Math.max(0, s);
    }
  }
  return y;
}

function expectClose(got: ArrayLike<number>, want: ArrayLike<number>, tol: number) {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    if (!(Math.abs(got[i]! - want[i]!) <= tol)) throw new Error(`[${i}] ${got[i]} vs ${want[i]} (tol ${tol})`);
  }
}

// A 7-term float32 dot product: |error| <= 9 u sum|terms| < 9 * 2^-24 * 7 * 0.5 + bias rounding.
const TOL = 4e-6;

/** y = x * 2 on ['N', 'C'] inputs: an exact op for shape-keying tests. */
function scale() {
  const g = new GraphBuilder('scale', { opset: 17 });
  g.input('x', 'float32', ['N', 'C']);
  const [y] = g.node('Mul', ['x', g.init('two', float32Tensor([2]))]);
  g.output(y, 'float32', ['N', 'C']);
  return g.toBytes();
}

/** Gather rows of a [10, 3] table by runtime int64 indices ['N']: an index error depends on data. */
const TABLE = Float32Array.from({ length: 30 }, (_, i) => i * 0.5 - 3);
function lookup() {
  const g = new GraphBuilder('lookup', { opset: 17 });
  g.input('ids', 'int64', ['N']);
  const [y] = g.node('Gather', [g.init('table', { dtype: 'float32', dims: [10, 3], data: TABLE }), 'ids'], { axis: 0 });
  g.output(y, 'float32', ['N', 3]);
  return g.toBytes();
}

/** A chain of 30 [N,128]x[128,128] MatMuls: long enough that an abort lands mid-run. */
function chain() {
  const g = new GraphBuilder('chain', { opset: 17 });
  g.input('x', 'float32', ['N', 128]);
  let v = 'x';
  const w = g.init('w', { dtype: 'float32', dims: [128, 128], data: uniform([128, 128], 3, -0.09, 0.09).data });
  for (let i = 0; i < 30; i++) [v] = g.node('MatMul', [v, w]).map(String) as [string];
  g.output(v, 'float32', ['N', 128]);
  return g.toBytes();
}

const x = (rows: number, seed: number) => uniform([rows, IN], seed);

describe('Session batching', () => {
  it('batched outputs equal unbatched ones and the reference, for 1, 3 and 5 rows in one batch', { timeout: T }, async () => {
    const bytes = dense();
    const plain = await Session.load(bytes);
    const s = await Session.load(bytes, { batching: { maxBatchSize: 16, maxDelayMs: 50 }, name: 'batch-mixed' });
    const feeds = [1, 3, 5, 1, 2].map((rows, i) => x(rows, 100 + i));
    const got = await Promise.all(feeds.map((f) => s.run({ x: f })));
    for (let i = 0; i < feeds.length; i++) {
      const rows = feeds[i]!.dims[0]!;
      const out = got[i]!.y ?? got[i]![Object.keys(got[i]!)[0]!]!;
      expect(out.dims).toEqual([rows, OUT]);
      const alone = (await plain.run({ x: feeds[i]! }))[s.outputs[0]!.name]!;
      expectClose(out.data as Float32Array, alone.data as Float32Array, TOL);
      expectClose(out.data as Float32Array, denseRef(feeds[i]!.data, rows), TOL);
    }
    const m = s.metrics();
    // All five arrived within the delay and fit in 16 rows: one native run of 12 rows.
    expect(m.batches).toBe(1);
    expect(m.batchSize.max).toBe(12);
    expect(m.requests).toBe(5);
    expect(m.queueTime.count).toBe(5);
    // Each caller owns its result: writing into one leaves the others as they were.
    const first = got[1]![s.outputs[0]!.name]!.data as Float32Array;
    const before = Array.from(got[2]![s.outputs[0]!.name]!.data as Float32Array);
    first.fill(123);
    expect(first.buffer).not.toBe((got[2]![s.outputs[0]!.name]!.data as Float32Array).buffer);
    expect(Array.from(got[2]![s.outputs[0]!.name]!.data as Float32Array)).toEqual(before);
    s.dispose();
    plain.dispose();
  });

  it('rows beyond maxBatchSize and a steady stream split into several batches, all answered', { timeout: T }, async () => {
    const s = await Session.load(dense(), { batching: { maxBatchSize: 4, maxDelayMs: 5 } });
    const feeds = [3, 2, 6, 1, 1, 4, 2].map((rows, i) => x(rows, 200 + i));
    const got = await Promise.all(feeds.map((f) => s.run({ x: f })));
    got.forEach((r, i) => expectClose(r[s.outputs[0]!.name]!.data as Float32Array, denseRef(feeds[i]!.data, feeds[i]!.dims[0]!), TOL));
    const m = s.metrics();
    // The 6-row request runs alone; no batch exceeds 4 rows otherwise.
    expect(m.batchSize.max).toBe(6);
    expect(m.batches).toBeGreaterThanOrEqual(5);
    s.dispose();
  });

  it('batches reuse their input buffers: row counts that change between batches answer right, and native memory does not grow per batch', { timeout: T }, async () => {
    // y[n] = sum of row n of x ['N', 16384]: 64 KiB a row, so a batch's input comes from the native
    // buffer pool (reported to V8), and integer rows make every sum exact.
    const C = 16384;
    const g = new GraphBuilder('rowsum', { opset: 17 });
    g.input('x', 'float32', ['N', C]);
    const [y] = g.node('ReduceSum', ['x', g.init('axes', { dtype: 'int64', dims: [1], data: new BigInt64Array([1n]) })], { keepdims: 0 });
    g.output(y, 'float32', ['N']);
    const s = await Session.load(g.toBytes(), { batching: { maxBatchSize: 8, maxDelayMs: 20 } });
    const row = (v: number) => new Float32Array(C).fill(v);
    let memory = 0;
    const rounds = [[3, 1, 2], [1, 1], [2, 2, 2, 2], [1], [4, 3], [1, 2], [2, 1, 1], [3, 3], [1, 1, 1], [2, 2]];
    for (const [round, sizes] of rounds.entries()) {
      const feeds = sizes.map((rows, i) => {
        const data = new Float32Array(rows * C);
        for (let r = 0; r < rows; r++) data.set(row(round * 10 + i + r), r * C);
        return new Tensor('float32', data, [rows, C]);
      });
      const got = await Promise.all(feeds.map((f) => s.run({ x: f })));
      got.forEach((out, i) => expect(Array.from(out[s.outputs[0]!.name]!.data as Float32Array), `round ${round} request ${i}`)
        .toEqual(Array.from({ length: sizes[i]! }, (_, r) => (round * 10 + i + r) * C)));
      // From the third batch on, every batch's input is a buffer an earlier batch used: without
      // reuse, each would add its 64-512 KiB until a collection.
      if (round === 2) memory = reportedExternalMemory();
      if (round > 2) expect(reportedExternalMemory(), `round ${round}`).toBeLessThanOrEqual(memory);
    }
    expect(s.metrics().batches).toBeGreaterThanOrEqual(8);
    s.dispose();
  });

  it('requests with different shapes in flight at once go to separate batches', { timeout: T }, async () => {
    const s = await Session.load(scale(), { batching: { maxBatchSize: 32, maxDelayMs: 30 } });
    const dims = [[1, 4], [2, 6], [3, 4], [1, 6], [2, 4]];
    const feeds = dims.map((d, i) => uniform(d, 300 + i));
    const got = await Promise.all(feeds.map((f) => s.run({ x: f })));
    got.forEach((r, i) => {
      const out = r[s.outputs[0]!.name]!;
      expect(out.dims).toEqual(dims[i]);
      expect(Array.from(out.data as Float32Array)).toEqual(Array.from(feeds[i]!.data, (v) => v * 2));
    });
    const m = s.metrics();
    expect(m.batches).toBe(2);
    expect(m.batchSize.max).toBe(6); // the C = 4 batch: 1 + 3 + 2 rows
    s.dispose();
  });

  it('abort while queued removes the request; its batch-mates still run', { timeout: T }, async () => {
    const s = await Session.load(dense(), { batching: { maxBatchSize: 8, maxDelayMs: 100 } });
    const ac = new AbortController();
    const a = s.run({ x: x(2, 1) });
    const b = s.run({ x: x(1, 2) }, { signal: ac.signal });
    const c = s.run({ x: x(3, 3) });
    ac.abort();
    await expect(b).rejects.toBeInstanceOf(AbortError);
    expect(s.metrics().queued).toBe(2);
    const [ra, rc] = await Promise.all([a, c]);
    expectClose(ra[s.outputs[0]!.name]!.data as Float32Array, denseRef(x(2, 1).data, 2), TOL);
    expectClose(rc[s.outputs[0]!.name]!.data as Float32Array, denseRef(x(3, 3).data, 3), TOL);
    const m = s.metrics();
    expect(m.batches).toBe(1);
    expect(m.batchSize.max).toBe(5);
    expect(m.errors).toEqual({ ERR_SONDE_ABORTED: 1 });
    s.dispose();
  });

  it('abort during the run rejects that caller at once; the others get their rows, and a batch nobody wants stops', { timeout: T }, async () => {
    const bytes = chain();
    const plain = await Session.load(bytes);
    const s = await Session.load(bytes, { batching: { maxBatchSize: 2, maxDelayMs: 1000 } });
    const out = s.outputs[0]!.name;
    const xa = uniform([1, 128], 1);
    const xb = uniform([1, 128], 2);
    const ac = new AbortController();
    const a = s.run({ x: xa }, { signal: ac.signal });
    const b = s.run({ x: xb }); // fills the batch: it is running when run() returns
    expect(s.metrics().queued).toBe(0);
    ac.abort();
    await expect(a).rejects.toBeInstanceOf(AbortError);
    const want = (await plain.run({ x: xb }))[out]!.data as Float32Array;
    const got = (await b)[out]!.data as Float32Array;
    const scaleOf = Math.max(...Array.from(want, Math.abs));
    expectClose(got, want, scaleOf * 1e-4);

    // Both callers abort: the native run is cancelled and the session stays usable.
    const ac2 = new AbortController();
    const c = s.run({ x: xa }, { signal: ac2.signal });
    const d = s.run({ x: xb }, { signal: ac2.signal });
    ac2.abort();
    await expect(c).rejects.toBeInstanceOf(AbortError);
    await expect(d).rejects.toBeInstanceOf(AbortError);
    const again = await Promise.all([s.run({ x: xb }), s.run({ x: xb })]);
    for (const r of again) expectClose(r[out]!.data as Float32Array, want, scaleOf * 1e-4);
    s.dispose();
    plain.dispose();
  });

  it('a bad request rejects alone: invalid feeds before queueing, a data-dependent native error by re-running singly', { timeout: T }, async () => {
    const s = await Session.load(lookup(), { batching: { maxBatchSize: 16, maxDelayMs: 30 }, name: 'batch-bad' });
    const ids = (...v: number[]) => new Tensor('int64', BigInt64Array.from(v.map(BigInt)), [v.length]);
    const reqs = [ids(1), ids(2, 3), ids(99), ids(4, -1)];
    const wrongDtype = s.run({ ids: new Tensor('float32', new Float32Array(1), [1]) as never });
    const results = await Promise.allSettled([...reqs.map((f) => s.run({ ids: f })), wrongDtype]);
    const rowsOf = (...k: number[]) => k.flatMap((i) => Array.from(TABLE.subarray((i < 0 ? i + 10 : i) * 3, (i < 0 ? i + 10 : i) * 3 + 3)));
    const value = (i: number) => {
      const r = results[i]!;
      if (r.status !== 'fulfilled') throw new Error(`request ${i} rejected: ${String(r.reason)}`);
      return Array.from(r.value[s.outputs[0]!.name]!.data as Float32Array);
    };
    expect(value(0)).toEqual(rowsOf(1));
    expect(value(1)).toEqual(rowsOf(2, 3));
    expect(value(3)).toEqual(rowsOf(4, -1));
    const bad = results[2]!;
    expect(bad.status).toBe('rejected');
    expect((bad as PromiseRejectedResult).reason).toBeInstanceOf(InvalidArgumentError);
    expect(String((bad as PromiseRejectedResult).reason.message)).toMatch(/index 99 is out of range/);
    const invalid = results[4]!;
    expect((invalid as PromiseRejectedResult).reason).toBeInstanceOf(InvalidArgumentError);
    expect(String((invalid as PromiseRejectedResult).reason.message)).toMatch(/dtype 'int64'/);
    const m = s.metrics();
    expect(m.requests).toBe(5);
    expect(m.errors).toEqual({ ERR_SONDE_INVALID_ARGUMENT: 2 });
    // One failed batch of 6 rows, then four single runs.
    expect(m.batches).toBe(5);
    s.dispose();
  });

  it('a full queue rejects with QueueFullError at once; the queued requests still complete', { timeout: T }, async () => {
    const s = await Session.load(dense(), { batching: { maxBatchSize: 8, maxDelayMs: 40, maxQueue: 2 } });
    const a = s.run({ x: x(1, 1) });
    const b = s.run({ x: x(1, 2) });
    // "At once": the rejection settles before the queued requests, which wait out the 40 ms delay.
    let queuedSettled = false;
    void Promise.allSettled([a, b]).then(() => { queuedSettled = true; });
    await expect(s.run({ x: x(1, 3) })).rejects.toBeInstanceOf(QueueFullError);
    expect(queuedSettled).toBe(false);
    const [ra, rb] = await Promise.all([a, b]);
    expectClose(ra[s.outputs[0]!.name]!.data as Float32Array, denseRef(x(1, 1).data, 1), TOL);
    expectClose(rb[s.outputs[0]!.name]!.data as Float32Array, denseRef(x(1, 2).data, 1), TOL);
    expect(s.metrics().errors).toEqual({ ERR_SONDE_QUEUE_FULL: 1 });
    s.dispose();
  });

  it('dispose rejects queued requests with DisposedError and lets the running batch finish', { timeout: T }, async () => {
    const s = await Session.load(dense(), { batching: { maxBatchSize: 1, maxDelayMs: 10_000, maxConcurrentBatches: 1 } });
    const running = s.run({ x: x(1, 1) }); // a full batch of one: running at once
    const queued = [s.run({ x: x(1, 2) }), s.run({ x: x(1, 3) })];
    expect(s.metrics().queued).toBe(2);
    s.dispose();
    for (const q of queued) await expect(q).rejects.toBeInstanceOf(DisposedError);
    expectClose((await running)[s.outputs[0]!.name]!.data as Float32Array, denseRef(x(1, 1).data, 1), TOL);
    await expect(s.run({ x: x(1, 4) })).rejects.toBeInstanceOf(DisposedError);
  });

  it('load errors: no batchable dim, an output without it, bad options', { timeout: T }, async () => {
    const fixed = new GraphBuilder('fixed', { opset: 17 });
    fixed.input('x', 'float32', [2, 3]);
    fixed.node('Relu', ['x'], {}, ['y']);
    fixed.output('y', 'float32', [2, 3]);
    await expect(Session.load(fixed.toBytes(), { batching: { maxBatchSize: 4, maxDelayMs: 1 } }))
      .rejects.toThrow(/options\.batching needs a batch dim .* no dim is symbolic at the same position .*'x' \[2, 3\]/);

    const noBatchOut = new GraphBuilder('reduce', { opset: 17 });
    noBatchOut.input('x', 'float32', ['N', 3]);
    noBatchOut.node('ReduceSum', ['x'], { keepdims: 0 }, ['y']);
    noBatchOut.output('y', 'float32', []);
    await expect(Session.load(noBatchOut.toBytes(), { batching: { maxBatchSize: 4, maxDelayMs: 1 } }))
      .rejects.toThrow(/output 'y' \[\] does not carry the batch dim 'N'/);

    // The batch dim need not be dim 0: 'N' at position 1 of every input.
    const second = new GraphBuilder('second', { opset: 17 });
    second.input('x', 'float32', [2, 'N']);
    second.node('Relu', ['x'], {}, ['y']);
    second.output('y', 'float32', [2, 'N']);
    const s = await Session.load(second.toBytes(), { batching: { maxBatchSize: 8, maxDelayMs: 20 } });
    const f1 = uniform([2, 1], 1);
    const f3 = uniform([2, 3], 2);
    const [r1, r3] = await Promise.all([s.run({ x: f1 }), s.run({ x: f3 })]);
    expect(Array.from(r1.y!.data as Float32Array)).toEqual(Array.from(f1.data, (v) => Math.max(0, v)));
    expect(Array.from(r3.y!.data as Float32Array)).toEqual(Array.from(f3.data, (v) => Math.max(0, v)));
    expect(s.metrics().batches).toBe(1);
    s.dispose();

    const bytes = dense();
    const bad: [unknown, RegExp][] = [
      [{ maxBatchSize: 0, maxDelayMs: 1 }, /options\.batching\.maxBatchSize must be an integer in \[1, /],
      [{ maxBatchSize: 4 }, /options\.batching\.maxDelayMs is required/],
      [{ maxBatchSize: 4, maxDelayMs: -1 }, /maxDelayMs must be a finite number >= 0, got -1/],
      [{ maxBatchSize: 4, maxDelay: 1 }, /unknown option 'maxDelay'; did you mean 'maxDelayMs'\?/],
      [{ maxBatchSize: 4, maxDelayMs: 1, preferredBatchSizes: [2, 8] }, /preferredBatchSizes\[1\] must be an integer in \[1, 4\], got 8/],
      [{ maxBatchSize: 4, maxDelayMs: 1, maxQueue: 0 }, /maxQueue must be an integer/],
      [{ maxBatchSize: 4, maxDelayMs: 1, targetLatencyMs: 0 }, /targetLatencyMs must be a finite number > 0/],
      [{ maxBatchSize: 4, maxDelayMs: 1, maxConcurrentBatches: 0 }, /maxConcurrentBatches must be an integer in \[1, 64\], got 0/],
      [true, /options\.batching must be an object/],
    ];
    for (const [batching, msg] of bad) {
      await expect(Session.load(bytes, { batching: batching as never })).rejects.toThrow(InvalidArgumentError);
      await expect(Session.load(bytes, { batching: batching as never })).rejects.toThrow(msg);
    }
    await expect(Session.load(bytes, { name: '' })).rejects.toThrow(/options\.name must be a non-empty string/);
  });

  it('preferred sizes dispatch before the delay', { timeout: T }, async () => {
    const s = await Session.load(dense(), { batching: { maxBatchSize: 16, maxDelayMs: 5000, preferredBatchSizes: [4] } });
    const t0 = performance.now();
    const got = await Promise.all([1, 3].map((rows, i) => s.run({ x: x(rows, 50 + i) })));
    expect(performance.now() - t0).toBeLessThan(4000);
    expectClose(got[1]![s.outputs[0]!.name]!.data as Float32Array, denseRef(x(3, 51).data, 3), TOL);
    expect(s.metrics().batchSize.max).toBe(4);
    s.dispose();
  });
});

describe('LatencyController', () => {
  it('predicts run time per batch size from an EWMA, interpolating and scaling beyond what it saw', () => {
    const c = new LatencyController({ targetMs: 20, maxBatchSize: 64, maxDelayMs: 4 });
    expect(c.predict(8)).toBe(0);
    c.observeRun(1, 1000); // its plan compiles: not measured
    expect(c.predict(1)).toBe(0);
    c.observeRun(1, 2);
    c.observeRun(8, 1000); // its plan compiles: not measured
    c.observeRun(8, 4);
    expect(c.predict(1)).toBe(2);
    expect(c.predict(8)).toBe(4);
    expect(c.predict(4)).toBeCloseTo(2 + (2 * 3) / 7, 12);
    expect(c.predict(16)).toBe(8); // 4 ms for 8 rows, scaled by rows
    c.observeRun(8, 9); // EWMA: 4 + 0.2 * (9 - 4)
    expect(c.predict(8)).toBeCloseTo(5, 12);
  });

  it('takes the largest ladder size that keeps the oldest request under 0.8 x target, and the largest once late', () => {
    const c = new LatencyController({ targetMs: 20, maxBatchSize: 64, maxDelayMs: 4 }, [12]);
    // Cost 1 ms + 0.25 ms per row, measured at 1 and 32 rows.
    c.observeRun(1, 1000); // its plan compiles: not measured
    c.observeRun(1, 1.25);
    c.observeRun(32, 1000); // its plan compiles: not measured
    c.observeRun(32, 9);
    // Budget 16 ms - 2 ms waited = 14 ms: up to 32 rows cost(b) = 1.25 + (b - 1) * 0.25, beyond it
    // 9 ms scaled by rows: 49 rows fit, but the ladder (64, 32, 16, 12, 8, 4, 2, 1) has 32 below it.
    expect(c.batchRows(2, 64)).toBe(32);
    // Never more than the queue holds: 10 queued, the ladder's 8.
    expect(c.batchRows(2, 10)).toBe(8);
    // Waited 10 ms: budget 6 ms: 1.25 + (b - 1) * 0.25 <= 6 -> b <= 20: 16.
    expect(c.batchRows(10, 64)).toBe(16);
    // Waited 11.5 ms: budget 4.5 ms -> b <= 14: the preferred 12.
    expect(c.batchRows(11.5, 64)).toBe(12);
    // Already past the budget: every row it may take (at most twice the largest size measured).
    expect(c.batchRows(30, 64)).toBe(64);
    const fresh = new LatencyController({ targetMs: 20, maxBatchSize: 64, maxDelayMs: 4 });
    expect(fresh.batchRows(0, 64)).toBe(1); // nothing measured yet: one row
    fresh.observeRun(4, 1000); // its plan compiles: not measured
    fresh.observeRun(4, 1);
    expect(fresh.batchRows(0, 64)).toBe(8); // explores at most 2x the largest size seen
  });

  it('skips sizes that cost over 15% more per row than a smaller one', () => {
    // MobileNetV2 on sonde's conv kernels at 2 threads: per-row time grows with the batch.
    const c = new LatencyController({ targetMs: 1000, maxBatchSize: 64, maxDelayMs: 5 });
    c.observeRun(1, 1000); // its plan compiles: not measured
    c.observeRun(1, 12.7);
    c.observeRun(2, 1000); // its plan compiles: not measured
    c.observeRun(2, 31.3);
    c.observeRun(4, 1000); // its plan compiles: not measured
    c.observeRun(4, 77.2);
    expect(c.batchRows(0, 64)).toBe(1);
    expect(c.batchRows(5000, 64)).toBe(1); // late: still the fastest way through the backlog
    // Every 32nd run probes the next size up, once: 6 runs so far, 26 more at one row.
    for (let i = 0; i < 25; i++) c.observeRun(1, 12.7);
    expect(c.batchRows(0, 64)).toBe(1);
    c.observeRun(1, 12.7);
    expect(c.batchRows(0, 64)).toBe(2);
    c.observeRun(2, 25); // EWMA 31.3 + 0.2 (25 - 31.3) = 30.04 ms: 15.02 per row, 1.18x one row's
    expect(c.predict(2)).toBeCloseTo(30.04, 10);
    expect(c.batchRows(0, 64)).toBe(1);
    c.observeRun(2, 10); // 30.04 + 0.2 (10 - 30.04) = 26.03 ms: 13.02 per row, within 15%: two rows
    expect(c.batchRows(0, 64)).toBe(2);
    // Cost per row falling then rising: the minimum in between wins.
    const d = new LatencyController({ targetMs: 1000, maxBatchSize: 64, maxDelayMs: 5 });
    d.observeRun(1, 1000); // its plan compiles: not measured
    d.observeRun(1, 10);
    d.observeRun(8, 1000); // its plan compiles: not measured
    d.observeRun(8, 16);
    d.observeRun(16, 1000); // its plan compiles: not measured
    d.observeRun(16, 64);
    expect(d.batchRows(0, 64)).toBe(8);
  });

  it('the recent p99 is that of the last 256 latencies', () => {
    const c = new LatencyController({ targetMs: 20, maxBatchSize: 64, maxDelayMs: 8 });
    expect(c.recentP99()).toBeNaN();
    const all: number[] = [];
    for (let i = 0; i < 600; i++) {
      const v = ((i * 7919) % 1009) / 10;
      all.push(v);
      c.observeLatency(v);
      const window = all.slice(-256).sort((a, b) => a - b);
      expect(c.recentP99()).toBe(window[Math.ceil(0.99 * window.length) - 1]);
    }
  });

  it('halves the delay when the recent p99 nears the target and recovers slowly when well under it', () => {
    const c = new LatencyController({ targetMs: 20, maxBatchSize: 64, maxDelayMs: 8 });
    c.observeRun(1, 1000); // its plan compiles: not measured
    c.observeRun(1, 1);
    c.observeRun(64, 1000); // its plan compiles: not measured
    c.observeRun(64, 4);
    expect(c.delayMs()).toBe(8);
    c.observeLatency(19); // p99 19 > 0.9 x 20
    expect(c.delayScale).toBe(0.5);
    expect(c.delayMs()).toBe(4);
    c.observeLatency(5);
    expect(c.delayScale).toBe(0.25); // the 19 ms is still the window's p99
    // Once the one slow request is no longer in the top 1% (from 100 requests on), 5% per request.
    for (let i = 0; i < 300; i++) c.observeLatency(5);
    expect(c.delayScale).toBe(1);
    // A delay never leaves too little time for a full batch: 16 - cost(64) = 12 here, so 8 stands;
    // with a 10 ms target it is 8 - 4 = 4.
    const tight = new LatencyController({ targetMs: 10, maxBatchSize: 64, maxDelayMs: 8 });
    tight.observeRun(1, 1000); // its plan compiles: not measured
    tight.observeRun(1, 1);
    tight.observeRun(64, 1000); // its plan compiles: not measured
    tight.observeRun(64, 4);
    expect(tight.delayMs()).toBe(4);
  });
});
