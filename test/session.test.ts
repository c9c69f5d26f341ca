// The public Session: load, metadata, run against onnxruntime-node on a multi-node graph, plan
// caching across shapes, every load/run error of issue #5 as a typed error (and the session still
// usable after), abort before and during a run, concurrent runs, dispose.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  AbortError, DeviceUnavailableError, DisposedError, InvalidArgumentError, ModelFormatError, Session, Tensor,
  UnsupportedOperatorError, devices,
} from '../dist/index.js';
import { GraphBuilder, int64Tensor } from '../bench/graphs/builder.js';
import { U, expectMatchesOrt, ortRun, uniform } from './session-ort.js';

/** conv -> bn -> relu -> maxpool, + a residual conv branch, -> global average pool -> softmax. */
function cnn(opset = 13) {
  const g = new GraphBuilder('cnn', { opset });
  g.input('image', 'float32', ['batch', 3, 12, 12]);
  const t = (name: string, dims: number[], seed: number, lo = -0.5, hi = 0.5) => {
    const v = uniform(dims, seed, lo, hi);
    return g.init(name, { dtype: 'float32', dims, data: v.data });
  };
  const [c1] = g.node('Conv', ['image', t('w1', [8, 3, 3, 3], 1), t('b1', [8], 2)], { pads: [1, 1, 1, 1] });
  const [bn] = g.node('BatchNormalization', [c1, t('s', [8], 3), t('o', [8], 4), t('m', [8], 5), t('v', [8], 6, 0.5, 1.5)]);
  const [r] = g.node('Relu', [bn]);
  const [p] = g.node('MaxPool', [r], { kernel_shape: [2, 2], strides: [2, 2] });
  const [c2] = g.node('Conv', [p, t('w2', [8, 8, 3, 3], 7)], { pads: [1, 1, 1, 1] });
  const [sum] = g.node('Add', [c2, p]);
  const [gap] = g.node('GlobalAveragePool', [sum]);
  const [logits] = g.node('Mul', [gap, t('scale', [1], 8, 2, 3)]);
  const [prob] = g.node('Softmax', [logits], { axis: 1 });
  g.output(prob, 'float32', ['batch', 8, 1, 1]);
  g.output(sum, 'float32', ['batch', 8, 6, 6]);
  return g.toBytes();
}

function twoInputs() {
  const g = new GraphBuilder('two', { opset: 17 });
  g.input('a', 'float32', ['n', 4]);
  g.input('b', 'float32', ['n', 4]);
  g.input('ids', 'int64', [3]);
  const [y] = g.node('Add', ['a', 'b']);
  const [z] = g.node('Mul', ['ids', g.init('two', int64Tensor([2]))]);
  g.output(y, 'float32', ['n', 4]);
  g.output(z, 'int64', [3]);
  return g.toBytes();
}

/** 40 chained 96x96 MatMuls: long enough that an abort lands between steps. */
function longChain() {
  const g = new GraphBuilder('chain', { opset: 17 });
  g.input('x', 'float32', [96, 96]);
  let v = 'x';
  for (let i = 0; i < 40; i++) [v] = g.node('MatMul', [v, 'x']).map(String) as [string];
  g.output(v);
  return g.toBytes();
}

const ids = new Tensor('int64', BigInt64Array.from([1n, -4n, 9n]), [3]);

describe('Session', () => {
  it('exposes inputs and outputs with symbolic dims as strings', async () => {
    const s = await Session.load(twoInputs());
    expect(s.inputs).toEqual([
      { name: 'a', dtype: 'float32', shape: ['n', 4] }, { name: 'b', dtype: 'float32', shape: ['n', 4] },
      { name: 'ids', dtype: 'int64', shape: [3] }]);
    expect(s.outputs.map((o) => [o.name, o.dtype, o.shape])).toEqual([['add_0', 'float32', ['n', 4]], ['mul_1', 'int64', [3]]]);
    s.dispose();
  });

  it('a multi-node CNN matches onnxruntime-node at two batch sizes (two cached plans)', async () => {
    const bytes = cnn();
    const s = await Session.load(bytes, { optimization: 'none' });
    for (const batch of [1, 3, 1]) {
      const image = uniform([batch, 3, 12, 12], 100 + batch);
      const got = await s.run({ image });
      const want = await ortRun(bytes, { image });
      for (const name of Object.keys(want)) {
        const w = want[name]!.data as Float32Array;
        const gd = got[name]!.data as Float32Array;
        expect([...got[name]!.dims]).toEqual([...want[name]!.dims]);
        // Two convolutions of K <= 73 and a few elementwise ops on values of order 1.
        const tol = 4 * 75 * 75 * U;
        for (let i = 0; i < w.length; i++) expect(Math.abs(gd[i]! - w[i]!)).toBeLessThanOrEqual(tol);
      }
    }
    expect(s.cachedPlans).toBe(2);
    s.dispose();
  });

  it('loads from a file path', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sonde-session-'));
    const path = join(dir, 'two.onnx');
    writeFileSync(path, twoInputs());
    const s = await Session.load(path, { threads: 1 });
    const a = uniform([2, 4], 1);
    const b = uniform([2, 4], 2);
    const out = await s.run({ a, b, ids });
    expect(Array.from(out.add_0!.data as Float32Array)).toEqual(Array.from(a.data, (v, i) => Math.fround(v + b.data[i]!)));
    expect(Array.from(out.mul_1!.data as BigInt64Array)).toEqual([2n, -8n, 18n]);
    s.dispose();
  });

  it('a graph whose output is its input round-trips (a copy, not the caller\'s buffer)', async () => {
    const g = new GraphBuilder('pass', { opset: 17 });
    g.input('x', 'float32', ['n']);
    g.output('x', 'float32', ['n']);
    const s = await Session.load(g.toBytes());
    const x = uniform([5], 3);
    const out = await s.run({ x });
    expect(Array.from(out.x!.data as Float32Array)).toEqual(Array.from(x.data));
    expect(out.x!.data).not.toBe(x.data);
    s.dispose();
  });

  it('a one-Identity graph round-trips at every optimization level', async () => {
    const g = new GraphBuilder('identity', { opset: 17 });
    g.input('x', 'float32', ['n', 3]);
    const [y] = g.node('Identity', ['x']);
    g.output(y, 'float32', ['n', 3]);
    for (const optimization of ['none', 'basic', 'all'] as const) {
      const s = await Session.load(g.toBytes(), { optimization });
      for (const n of [1, 4]) {
        const x = uniform([n, 3], n);
        const out = await s.run({ x });
        expect(Array.from(out[y]!.data as Float32Array), optimization).toEqual(Array.from(x.data));
        expect(out[y]!.data.buffer).not.toBe(x.data.buffer);
      }
      s.dispose();
    }
  });

  it('an MLP (MatMul + bias + Relu, Gemm head) matches onnxruntime-node at every level, and bf16 within its bound', async () => {
    const g = new GraphBuilder('mlp', { opset: 17 });
    g.input('x', 'float32', ['batch', 32]);
    const t = (name: string, dims: number[], seed: number) => g.init(name, { dtype: 'float32', dims, data: uniform(dims, seed, -0.25, 0.25).data });
    const [h] = g.node('MatMul', ['x', t('w1', [32, 48], 1)]);
    const [hb] = g.node('Add', [h, t('b1', [48], 2)]);
    const [hr] = g.node('Relu', [hb]);
    const [y] = g.node('Gemm', [hr, t('w2', [10, 48], 3), t('b2', [10], 4)], { transB: 1 });
    const [p] = g.node('Softmax', [y], { axis: -1 });
    g.output(p, 'float32', ['batch', 10]);
    const bytes = g.toBytes();
    const x = uniform([3, 32], 9);
    // Hidden units: |terms| sum <= 32 * 0.25; the head sums 48 of those times 0.25: values stay O(1).
    const tol = { atol: 4 * 50 * 50 * U, rtol: 0 };
    for (const optimization of ['none', 'basic', 'all'] as const) {
      await expectMatchesOrt(bytes, { x }, { ...tol, options: { optimization } });
    }
    // bf16 weights: each weight within 2^-9 relative, so each layer's output within 2^-9 sum|terms|;
    // through a 1-Lipschitz Relu and a softmax (Lipschitz 1/2 in the max norm), a loose 2^-9 * 24 bound.
    await expectMatchesOrt(bytes, { x }, { atol: 2 ** -9 * 24, rtol: 0, options: { precision: 'bf16' } });
  });

  it('10 concurrent runs with different inputs each get their own result', async () => {
    const bytes = cnn();
    const s = await Session.load(bytes);
    const images = Array.from({ length: 10 }, (_, i) => uniform([1 + (i % 3), 3, 12, 12], 200 + i));
    const results = await Promise.all(images.map((image) => s.run({ image })));
    for (let i = 0; i < 10; i++) {
      const alone = await s.run({ image: images[i]! });
      for (const name of Object.keys(alone)) {
        expect(Array.from(results[i]![name]!.data as Float32Array)).toEqual(Array.from(alone[name]!.data as Float32Array));
      }
    }
    s.dispose();
  });

  it('keeps at most 16 plans, recompiling an evicted shape correctly', async () => {
    const s = await Session.load(twoInputs());
    for (const round of [0, 1]) {
      for (let n = 1; n <= 18; n++) {
        const a = uniform([n, 4], n + round);
        const b = uniform([n, 4], 50 + n);
        const out = await s.run({ a, b, ids });
        expect(Array.from(out.add_0!.data as Float32Array)).toEqual(Array.from(a.data, (v, i) => Math.fround(v + b.data[i]!)));
      }
      expect(s.cachedPlans).toBe(16);
    }
    s.dispose();
  });

  it('alternating shapes, repeated shapes and a shape that differs in one input only each run their own plan', async () => {
    // The last plan is found by comparing dims without the cache key: a change in any input's
    // dims, or back to a shape used before, must not reuse the last plan.
    const s = await Session.load(twoInputs());
    const rows = [1, 1, 3, 1, 3, 3, 2, 1, 2];
    for (const [i, n] of rows.entries()) {
      const a = uniform([n, 4], 10 + i);
      const b = uniform([n, 4], 40 + i);
      const out = await s.run({ a, b, ids });
      expect(out.add_0!.dims).toEqual([n, 4]);
      expect(Array.from(out.add_0!.data as Float32Array)).toEqual(Array.from(a.data, (v, j) => Math.fround(v + b.data[j]!)));
    }
    expect(s.cachedPlans).toBe(3);
    // Same a, b dims as the last run but a different 'n' between them is refused before any plan.
    await expect(s.run({ a: uniform([2, 4], 1), b: uniform([3, 4], 2), ids })).rejects.toThrow(InvalidArgumentError);
    const a = uniform([2, 4], 5);
    const out = await s.run({ a, b: a, ids });
    expect(Array.from(out.add_0!.data as Float32Array)).toEqual(Array.from(a.data, (v) => Math.fround(v + v)));
    s.dispose();
  });

  it('dispose() while runs are in flight lets them finish', async () => {
    const s = await Session.load(longChain());
    const x = uniform([96, 96], 7, -0.1, 0.1);
    const want = await s.run({ x });
    const runs = [s.run({ x }), s.run({ x })];
    s.dispose();
    for (const got of await Promise.all(runs)) {
      const name = Object.keys(want)[0]!;
      expect(Array.from(got[name]!.data as Float32Array)).toEqual(Array.from(want[name]!.data as Float32Array));
    }
    await expect(s.run({ x })).rejects.toBeInstanceOf(DisposedError);
  });

  it('optimization levels and options give the same outputs', async () => {
    const bytes = cnn(17);
    const image = uniform([2, 3, 12, 12], 5);
    for (const optimization of ['none', 'basic', 'all'] as const) {
      await expectMatchesOrt(bytes, { image }, { atol: 4 * 75 * 75 * U, rtol: 0, options: { optimization, threads: 2, device: 'cpu' } });
    }
  });
});

describe('Session errors', () => {
  it('feeds: unknown name (with a suggestion), missing input, wrong dtype, wrong rank, contradicting dims, non-Tensor; usable after', async () => {
    const s = await Session.load(twoInputs());
    const a = uniform([2, 4], 1);
    const b = uniform([2, 4], 2);
    await expect(s.run({ a, b, ids, idz: ids } as never)).rejects.toThrow(/feeds\['idz'\] is not an input.*did you mean 'ids'/);
    await expect(s.run({ a, ids } as never)).rejects.toThrow(/missing input 'b'/);
    await expect(s.run({ a, b, ids: new Tensor('int32', Int32Array.of(1, 2, 3)) })).rejects.toThrow(/feeds\['ids'\] must have dtype 'int64', got 'int32'/);
    await expect(s.run({ a: uniform([8], 1), b, ids })).rejects.toThrow(/feeds\['a'\] must have rank 2/);
    await expect(s.run({ a: uniform([2, 5], 1), b, ids })).rejects.toThrow(/feeds\['a'\]: dims\[1\] must be 4, got 5/);
    await expect(s.run({ a, b: uniform([3, 4], 2), ids })).rejects.toThrow(/feeds\['b'\]: dims\[0\] \('n'\) is 3, but input 'a' set 'n' to 2/);
    await expect(s.run({ a, b: b.data, ids } as never)).rejects.toThrow(/feeds\['b'\] must be a Tensor, got Float32Array/);
    await expect(s.run(null as never)).rejects.toThrow(InvalidArgumentError);
    await expect(s.run({ a, b, ids }, { sigal: undefined } as never)).rejects.toThrow(/unknown option 'sigal'; did you mean 'signal'/);
    for (const bad of [{ a, b, ids, idz: ids }, { a, ids }]) await expect(s.run(bad as never)).rejects.toBeInstanceOf(InvalidArgumentError);
    const ok = await s.run({ a, b, ids });
    expect(ok.add_0!.dims).toEqual([2, 4]);
    s.dispose();
    await expect(s.run({ a, b, ids })).rejects.toBeInstanceOf(DisposedError);
    s.dispose();
  });

  it('a Tensor whose data is shorter than its dims never reaches a run', () => {
    expect(() => new Tensor('float32', new Float32Array(3), [2, 2])).toThrow(InvalidArgumentError);
  });

  it('load: every unsupported node listed in one error; domain sonde rejected; bad bytes; missing file', async () => {
    const g = new GraphBuilder('unsup', { opset: 17 });
    g.input('x', 'float32', [4]);
    const [a] = g.node('Celu', ['x'], {}, 1, { name: 'c1' });
    const [b] = g.node('Relu', [a]);
    const [c] = g.node('Hardmax', [b], {}, 1, { name: 'h1' });
    g.output(c);
    const err = await Session.load(g.toBytes()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UnsupportedOperatorError);
    expect((err as Error).message).toMatch(/2 nodes.*Celu \(node 'c1'\).*Hardmax \(node 'h1'\)/);

    const h = new GraphBuilder('own', { opset: 17, extraOpsets: { sonde: 1 } });
    h.input('x', 'float32', [4]);
    const [y] = h.node('FusedGemm', ['x'], {}, 1, { name: 'f', domain: 'sonde' });
    h.output(y);
    await expect(Session.load(h.toBytes())).rejects.toThrow(/domain 'sonde' are reserved.*FusedGemm \(node 'f'\)/);
    await expect(Session.load(h.toBytes())).rejects.toBeInstanceOf(ModelFormatError);

    await expect(Session.load(Uint8Array.of(1, 2, 3, 250, 255))).rejects.toBeInstanceOf(ModelFormatError);
    await expect(Session.load('/nonexistent/model.onnx')).rejects.toThrow(/cannot read model file '\/nonexistent\/model.onnx'/);
    await expect(Session.load(42 as never)).rejects.toThrow(/pathOrBytes must be a file path or a Uint8Array, got 42/);
  });

  it('load options: misspellings suggest, bad values name the option', async () => {
    const bytes = twoInputs();
    await expect(Session.load(bytes, { optimisation: 'all' } as never)).rejects.toThrow(/unknown option 'optimisation'; did you mean 'optimization'/);
    await expect(Session.load(bytes, { optimization: 'max' } as never)).rejects.toThrow(/options.optimization must be one of/);
    await expect(Session.load(bytes, { threads: 0 })).rejects.toThrow(/options.threads must be an integer in \[1, 1024\]/);
    await expect(Session.load(bytes, { precision: 'fp16' } as never)).rejects.toThrow(/options.precision must be one of 'fp32', 'bf16'/);
    await expect(Session.load(bytes, { device: 'gpu' } as never)).rejects.toThrow(InvalidArgumentError);
    if (devices().cuda.devices.length === 0) {
      await expect(Session.load(bytes, { device: 'cuda' })).rejects.toBeInstanceOf(DeviceUnavailableError);
    }
  });

  it('a shape the model cannot take is an InvalidArgumentError naming the node; the session stays usable', async () => {
    const g = new GraphBuilder('conv', { opset: 17 });
    g.input('x', 'float32', [1, 2, 'h', 'w']);
    const [y] = g.node('Conv', ['x', g.init('w', { dtype: 'float32', dims: [1, 2, 3, 3], data: uniform([1, 2, 3, 3]).data })], {}, 1, { name: 'conv0' });
    g.output(y);
    const s = await Session.load(g.toBytes());
    await expect(s.run({ x: uniform([1, 2, 2, 5]) })).rejects.toThrow(/node 'conv0' \(Conv\): output height would be 0/);
    const ok = await s.run({ x: uniform([1, 2, 3, 5]) });
    expect(ok[y]!.dims).toEqual([1, 1, 1, 3]);
    s.dispose();
  });
});

describe('Session feeds like the last run\'s (the fast path)', () => {
  // After one good run, feeds with the same names, dtypes and dims skip the general checks. Every
  // feed that differs in any of those must still get the general path's error, and a good run
  // after each must compute its own feeds.
  const add = (a: Tensor, b: Tensor) => Array.from(a.data as Float32Array, (v, j) => Math.fround(v + (b.data as Float32Array)[j]!));

  it('rejects a changed dim, rank, dtype, an extra, missing or undefined feed, a non-Tensor, and an inherited feed', async () => {
    const s = await Session.load(twoInputs());
    const a = uniform([2, 4], 1);
    const b = uniform([2, 4], 2);
    expect(Array.from((await s.run({ a, b, ids })).add_0!.data as Float32Array)).toEqual(add(a, b));
    const bad: [unknown, RegExp][] = [
      [{ a, b: uniform([3, 4], 2), ids }, /feeds\['b'\]: dims\[0\] \('n'\) is 3, but input 'a' set 'n' to 2/],
      [{ a: uniform([2, 5], 1), b, ids }, /feeds\['a'\]: dims\[1\] must be 4, got 5/],
      [{ a: uniform([8], 1), b, ids }, /feeds\['a'\] must have rank 2/],
      [{ a, b, ids: new Tensor('int32', Int32Array.of(1, 2, 3)) }, /feeds\['ids'\] must have dtype 'int64', got 'int32'/],
      [{ a, b, ids, idz: ids }, /feeds\['idz'\] is not an input.*did you mean 'ids'/],
      [{ a, ids }, /missing input 'b'/],
      [{ a, b: undefined, ids }, /missing input 'b'/],
      [{ a, b: b.data, ids }, /feeds\['b'\] must be a Tensor, got Float32Array/],
      [b, /feeds must be an object mapping input names to Tensors/],
    ];
    for (const [feeds, why] of bad) {
      await expect(s.run(feeds as never)).rejects.toThrow(why);
      expect(Array.from((await s.run({ a, b, ids })).add_0!.data as Float32Array)).toEqual(add(a, b));
    }
    // An input found on the prototype with an unknown own key beside it: the unknown key is named.
    const inherited = Object.assign(Object.create({ b }), { a, ids, c: b });
    await expect(s.run(inherited)).rejects.toThrow(/feeds\['c'\] is not an input/);
    // A Tensor whose data no longer fits its dims (fields rewritten after construction).
    const shrunk = uniform([2, 4], 3);
    (shrunk as { data: Float32Array }).data = new Float32Array(4);
    await expect(s.run({ a, b: shrunk, ids })).rejects.toThrow(/feeds\['b'\] has 4 elements of data for dims \[2, 4\]/);
    // A new shape after the fast path: its own plan and its own result.
    const a3 = uniform([3, 4], 7), b3 = uniform([3, 4], 8);
    expect(Array.from((await s.run({ a: a3, b: b3, ids })).add_0!.data as Float32Array)).toEqual(add(a3, b3));
    const a2 = uniform([2, 4], 9);
    expect(Array.from((await s.run({ a: a2, b, ids })).add_0!.data as Float32Array)).toEqual(add(a2, b));
    expect(s.cachedPlans).toBe(2);
    s.dispose();
  });

  it('an aborted signal rejects feeds like the last run\'s; unknown options are still named', async () => {
    const s = await Session.load(twoInputs());
    const feeds = { a: uniform([2, 4], 1), b: uniform([2, 4], 2), ids };
    await s.run(feeds);
    const ctl = new AbortController();
    ctl.abort(new Error('stop'));
    const err = await s.run(feeds, { signal: ctl.signal }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AbortError);
    expect((err as AbortError).cause).toEqual(new Error('stop'));
    await expect(s.run(feeds, { sigal: ctl.signal } as never)).rejects.toThrow(/unknown option 'sigal'/);
    await expect(s.run(feeds, { signal: 'no' } as never)).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(Array.from((await s.run(feeds, { signal: new AbortController().signal })).add_0!.data as Float32Array))
      .toEqual(add(feeds.a, feeds.b));
    s.dispose();
    await expect(s.run(feeds)).rejects.toBeInstanceOf(DisposedError);
  });

  it('back-to-back runs of a one-Identity model each get their own result and let the event loop turn', async () => {
    // Runs of a few microseconds may settle on the calling thread (native/binding/addon.cc,
    // Addon::Start); at most 8 in a row may do so before one completes through the event loop.
    const g = new GraphBuilder('identity', { opset: 13 });
    g.input('x', 'float32', [1, 3]);
    g.node('Identity', ['x'], {}, ['y']);
    g.output('y', 'float32', [1, 3]);
    const s = await Session.load(g.toBytes(), { threads: 1 });
    let turns = 0;
    let stop = false;
    const tick = () => { turns++; if (!stop) setImmediate(tick); };
    setImmediate(tick);
    const runs = 900;
    let wrong = 0;
    for (let i = 0; i < runs; i++) {
      const x = new Tensor('float32', Float32Array.of(i, -i, i / 3), [1, 3]);
      const y = (await s.run({ x })).y!;
      if (y.data[0] !== x.data[0] || y.data[1] !== x.data[1] || y.data[2] !== x.data[2]) wrong++;
    }
    stop = true;
    expect(wrong).toBe(0);
    // Every 9th run at least completes through the event loop; two such completions can share
    // one turn (the completion queue is drained in one dispatch, and a loaded CI machine delays
    // the turn), hence a turn per 18 runs: the loop still turns all along.
    expect(turns).toBeGreaterThanOrEqual(Math.floor(runs / 18));
    s.dispose();
  });

  it('an input whose dtype the model leaves open runs one plan per dtype at the same dims', async () => {
    const g = new GraphBuilder('open-dtype', { opset: 13 });
    g.input('x', 'float32', [2, 3]);
    g.node('Identity', ['x'], {}, ['y']);
    g.output('y', 'float32', [2, 3]);
    // elemType 0: the model does not say which dtype x has.
    (g.inputs[0] as { type: { tensorType: { elemType: number } } }).type.tensorType.elemType = 0;
    const s = await Session.load(g.toBytes());
    expect(s.inputs[0]!.dtype).toBeUndefined();
    const f = new Tensor('float32', Float32Array.of(1.5, -2, 3, 4, 5, 6), [2, 3]);
    const i = new Tensor('int32', Int32Array.of(7, -8, 9, 10, 11, 12), [2, 3]);
    for (const t of [f, i, i, f, f, i]) {
      const y = (await s.run({ x: t })).y!;
      expect(y.dtype).toBe(t.dtype);
      expect(Array.from(y.data as Float32Array)).toEqual(Array.from(t.data as Float32Array));
    }
    expect(s.cachedPlans).toBe(2);
    s.dispose();
  });
});

describe('Session abort', () => {
  it('an already aborted signal rejects at once; the session stays usable', async () => {
    const s = await Session.load(twoInputs());
    const ctl = new AbortController();
    ctl.abort();
    const feeds = { a: uniform([2, 4], 1), b: uniform([2, 4], 2), ids };
    await expect(s.run(feeds, { signal: ctl.signal })).rejects.toBeInstanceOf(AbortError);
    expect((await s.run(feeds)).add_0!.dims).toEqual([2, 4]);
    s.dispose();
  });

  it('a signal fired during a run stops it between steps; the next run completes', async () => {
    const s = await Session.load(longChain());
    const x = uniform([96, 96], 7, -0.1, 0.1);
    await s.run({ x });
    const ctl = new AbortController();
    const run = s.run({ x }, { signal: ctl.signal });
    ctl.abort();
    await expect(run).rejects.toBeInstanceOf(AbortError);
    const again = await s.run({ x });
    expect(again[Object.keys(again)[0]!]!.dims).toEqual([96, 96]);
    s.dispose();
  });
});

