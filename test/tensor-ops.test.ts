// The generic tensor ops of graph plans (native/ops/tensor_ops.cc), driven one step at a time
// through createPlan/planRun and compared with scalar references written here.
import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { native } from '../dist/binding.js';
import type { PlanDType, PlanRef, PlanSpec, PlanStep } from '../dist/session/plan.js';
import { randomF32 } from './helpers.js';

type Data = Float32Array | BigInt64Array | Int32Array | Uint8Array | Int8Array;

/**
 * Set (to 'emulated' or 'cuda:N') by test/cuda/tensor-ops.test.ts, which imports this file to run
 * every case on a GPU plan (native/kernels/tensor/cuda/tensor.cu) against the same references.
 */
const planDevice = (globalThis as { SONDE_PLAN_DEVICE?: string }).SONDE_PLAN_DEVICE;
type StepBody = PlanStep extends infer S ? (S extends PlanStep ? Omit<S, 'node'> : never) : never;

/**
 * Runs one step: consts[i] are buffer i (read-only), outs[j] are buffer consts.length + j (run
 * outputs). make() gets the refs and returns the step. Resolves with outs filled.
 */
async function runStep(consts: Data[], outs: Data[], make: (c: PlanRef[], o: PlanRef[]) => StepBody,
  threads = 2): Promise<void> {
  const spec: PlanSpec = {
    buffers: [
      ...consts.map((data) => ({ kind: 'const' as const, data, bytes: data.byteLength })),
      ...outs.map((d, index) => ({ kind: 'output' as const, index, bytes: d.byteLength })),
    ],
    steps: [{ node: 'op_under_test', ...make(consts.map((_, i) => ({ buffer: i, offset: 0 })),
      outs.map((_, j) => ({ buffer: consts.length + j, offset: 0 }))) } as PlanStep],
    arenaBytes: 0,
    inputBytes: [],
    outputBytes: outs.map((d) => d.byteLength),
  };
  if (planDevice) {
    const gpuPlan = native().createGpuPlan(planDevice, spec);
    try {
      await native().gpuPlanRun(gpuPlan, [], outs);
    } finally {
      gpuPlan.dispose();
    }
    return;
  }
  const plan = native().createPlan(spec);
  try {
    await native().planRun(plan, [], outs, threads);
  } finally {
    plan.dispose();
  }
}

const u = 2 ** -24;
const prod = (d: number[]) => d.reduce((a, b) => a * b, 1);
/** Row-major strides of dims. */
function contiguous(dims: number[]): number[] {
  const s = new Array<number>(dims.length);
  let acc = 1;
  for (let i = dims.length - 1; i >= 0; i--) { s[i] = acc; acc *= dims[i]!; }
  return s;
}
/** Strides of an operand of shape `small` broadcast to `dims` (aligned from the right). */
function broadcastStrides(small: number[], dims: number[]): number[] {
  const cs = contiguous(small);
  return dims.map((d, i) => {
    const j = i - (dims.length - small.length);
    return j < 0 || small[j] === 1 ? 0 : cs[j]!;
  });
}
/** Calls fn(index vector, flat position) for every index of dims in row-major order. */
function forEachIndex(dims: number[], fn: (idx: number[], flat: number) => void): void {
  const total = prod(dims);
  const idx = new Array<number>(dims.length).fill(0);
  for (let f = 0; f < total; f++) {
    fn(idx, f);
    for (let d = dims.length - 1; d >= 0; d--) { if (++idx[d]! < dims[d]!) break; idx[d] = 0; }
  }
}
const dot = (idx: number[], s: number[]) => idx.reduce((acc, v, i) => acc + v * s[i]!, 0);

function expectClose(got: ArrayLike<number>, want: ArrayLike<number>, rel: number, abs: number, what: string): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    const g = got[i]!, w = want[i]!;
    if (Number.isNaN(w)) { if (!Number.isNaN(g)) throw new Error(`${what}[${i}] = ${g}, want NaN`); continue; }
    if (g === w) continue;  // infinities
    if (!(Math.abs(g - w) <= rel * Math.abs(w) + abs)) throw new Error(`${what}[${i}] = ${g}, want ${w}`);
  }
}

/** Erf in double (Abramowitz & Stegun 7.1.26 is too coarse): Taylor series near 0, continued fraction beyond. */
function erf(x: number): number {
  const ax = Math.abs(x);
  if (ax < 2.5) {
    let term = ax, sum = ax;
    for (let n = 1; n < 80; n++) { term *= -ax * ax / n; sum += term / (2 * n + 1); }
    return Math.sign(x) * sum * 2 / Math.sqrt(Math.PI);
  }
  // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
  let f = ax;
  for (let n = 60; n >= 1; n--) f = ax + (n / 2) / f;
  return Math.sign(x) * (1 - Math.exp(-ax * ax) / Math.sqrt(Math.PI) / f);
}

describe('unary', () => {
  const ref: Record<string, (x: number, a: number, b: number) => number> = {
    relu: (x) => Math.max(x, 0),
    leakyRelu: (x, a) => (x < 0 ? a * x : x),
    clip: (x, a, b) => Math.min(Math.max(x, a), b),
    sigmoid: (x) => 1 / (1 + Math.exp(-x)),
    tanh: (x) => Math.tanh(x),
    hardSigmoid: (x, a, b) => Math.min(1, Math.max(0, a * x + b)),
    hardSwish: (x) => x * Math.min(1, Math.max(0, x / 6 + 0.5)),
    erf: (x) => erf(x),
    gelu: (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
    geluTanh: (x) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3))),
    silu: (x) => x / (1 + Math.exp(-x)),
    exp: (x) => Math.exp(x),
    log: (x) => Math.log(x),
    sqrt: (x) => Math.sqrt(x),
    neg: (x) => -x,
    abs: (x) => Math.abs(x),
    reciprocal: (x) => 1 / x,
    identity: (x) => x,
  };
  // One float rounding (or none) away from the double reference.
  const exact = new Set(['relu', 'leakyRelu', 'clip', 'neg', 'abs', 'identity', 'reciprocal', 'sqrt']);
  // 70001 elements cross the size at which the op splits over the pool.
  for (const [kind, f] of Object.entries(ref)) {
    it.each([1, 7, 37, 70001])(`${kind} float32, %i elements`, async (count) => {
      const x = randomF32(count, count + kind.length).map((v) => v * 6);
      if (count > 3) { x[0] = 0; x[1] = -0; x[2] = 1e-4; }
      if (kind === 'log' || kind === 'sqrt') for (let i = 0; i < count; i++) x[i] = Math.abs(x[i]!) + 1e-3;
      const alpha = kind === 'clip' ? -0.75 : kind === 'hardSigmoid' ? 0.2 : 0.1;
      const beta = kind === 'clip' ? 1.25 : 0.5;
      const y = new Float32Array(count);
      await runStep([x], [y], (c, o) => ({ op: 'unary', kind: kind as never, dtype: 'float32', x: c[0]!, y: o[0]!, count, alpha, beta }));
      const want = Array.from(x, (v) => f(v, Math.fround(alpha), Math.fround(beta)));
      // Transcendentals: the elementwise family's documented bounds (<= 4u + u|a| relative, gelu
      // 3u|x| absolute) with room for libm's 2 ulp in the scalar forms.
      if (exact.has(kind)) expectClose(y, want, 2 * u, 1e-30, kind);
      else expectClose(y, want, 16 * u, 16 * u * 6, kind);
    });
  }

  it('neg/abs on int64 and int32 (wrapping at the minimum), not on bool', async () => {
    const x64 = BigInt64Array.from([0n, 5n, -7n, 2n ** 62n, -(2n ** 63n), 1n]);
    for (const kind of ['neg', 'abs'] as const) {
      const y = new BigInt64Array(6);
      await runStep([x64], [y], (c, o) => ({ op: 'unary', kind, dtype: 'int64', x: c[0]!, y: o[0]!, count: 6, alpha: 0, beta: 0 }));
      expect(Array.from(y)).toEqual(Array.from(x64, (v) => BigInt.asIntN(64, kind === 'neg' ? -v : v < 0n ? -v : v)));
    }
    const x32 = Int32Array.from([0, 5, -7, 2 ** 30, -(2 ** 31), 1, -1]);
    for (const kind of ['neg', 'abs'] as const) {
      const y = new Int32Array(7);
      await runStep([x32], [y], (c, o) => ({ op: 'unary', kind, dtype: 'int32', x: c[0]!, y: o[0]!, count: 7, alpha: 0, beta: 0 }));
      expect(Array.from(y)).toEqual(Array.from(x32, (v) => (kind === 'neg' ? -v : Math.abs(v)) | 0));
    }
    const b = Uint8Array.from([0, 1, 1, 0, 0]);
    const nb = new Uint8Array(5);
    await runStep([b], [nb], (c, o) => ({ op: 'unary', kind: 'not', dtype: 'bool', x: c[0]!, y: o[0]!, count: 5, alpha: 0, beta: 0 }));
    expect(Array.from(nb)).toEqual([1, 0, 0, 1, 1]);
  });
});

describe('binary', () => {
  // [a shape, b shape]: broadcast of b in each position, of a, of both, and size-1 / odd dims.
  const shapes: [number[], number[]][] = [
    [[2, 3, 17], [2, 3, 17]],
    [[2, 3, 17], [17]],
    [[2, 3, 17], [3, 1]],
    [[2, 3, 17], [2, 1, 1]],
    [[1, 3, 1], [2, 3, 17]],
    [[2, 1, 17], [1, 3, 1]],
    [[1], [1]],
    [[5], [1]],
    [[1], [33]],
    [[300, 301], [301]],  // the bias case over the pool-splitting size
  ];
  const outDims = (a: number[], b: number[]) => {
    const r = Math.max(a.length, b.length);
    return Array.from({ length: r }, (_, i) => {
      const da = a[i - (r - a.length)] ?? 1, db = b[i - (r - b.length)] ?? 1;
      return da === 1 ? db : da;
    });
  };
  type Kind = 'add' | 'sub' | 'mul' | 'div' | 'pow' | 'equal' | 'less' | 'greater' | 'and' | 'or';
  const arith: Kind[] = ['add', 'sub', 'mul', 'div', 'pow'];
  const cmp: Kind[] = ['equal', 'less', 'greater'];

  function reference(kind: Kind, dtype: PlanDType, a: number | bigint, b: number | bigint): number | bigint {
    if (dtype === 'float32') {
      const x = a as number, y = b as number;
      const r = { add: x + y, sub: x - y, mul: x * y, div: x / y, pow: Math.pow(x, y), equal: +(x === y), less: +(x < y),
        greater: +(x > y), and: +(x !== 0 && y !== 0), or: +(x !== 0 || y !== 0) }[kind];
      return cmp.includes(kind) ? r : Math.fround(r);
    }
    if (dtype === 'bool') {
      const x = a as number, y = b as number;
      return kind === 'and' ? +(x !== 0 && y !== 0) : kind === 'or' ? +(x !== 0 || y !== 0) : kind === 'equal' ? +(x === y)
        : kind === 'less' ? +(x < y) : +(x > y);
    }
    const x = BigInt(a), y = BigInt(b);
    const bits = dtype === 'int64' ? 64 : 32;
    const wrap = (v: bigint) => BigInt.asIntN(bits, v);
    const r = {
      add: () => wrap(x + y), sub: () => wrap(x - y), mul: () => wrap(x * y), div: () => wrap(x / y),  // BigInt / truncates
      pow: () => wrap(x ** y), equal: () => BigInt(+(x === y)), less: () => BigInt(+(x < y)), greater: () => BigInt(+(x > y)),
      and: () => 0n, or: () => 0n,
    }[kind]();
    return dtype === 'int64' && !cmp.includes(kind) ? r : Number(r);
  }

  function makeData(dtype: PlanDType, n: number, seed: number, kind: Kind, isB: boolean): Data {
    const r = randomF32(n, seed);
    if (dtype === 'float32') {
      // pow: positive bases and small exponents keep results finite and the comparison meaningful.
      if (kind === 'pow') return Float32Array.from(r, (v) => (isB ? v * 3 : Math.abs(v) * 4 + 0.1));
      const f = Float32Array.from(r, (v) => v * 10);
      if (cmp.includes(kind) && n > 2) { f[0] = isB ? 1 : 1; f[1] = isB ? NaN : 2; }
      return f;
    }
    const ints = Array.from(r, (v) => {
      let t = Math.round(v * 20);
      if (kind === 'div' && isB && t === 0) t = 3;
      if (kind === 'pow') t = isB ? Math.round(Math.abs(v) * 5) : Math.round(v * 6);
      return t;
    });
    if (dtype === 'int64') return BigInt64Array.from(ints, (v) => BigInt(v));
    if (dtype === 'int32') return Int32Array.from(ints);
    return Uint8Array.from(ints, (v) => +(v > 0));
  }

  const cases: [Kind, PlanDType][] = [
    ...[...arith, ...cmp].flatMap((k) => (['float32', 'int64', 'int32'] as PlanDType[]).map((d) => [k, d] as [Kind, PlanDType])),
    ['and', 'bool'], ['or', 'bool'],
  ];
  for (const [kind, dtype] of cases) {
    it(`${kind} ${dtype} with broadcasting in each position`, async () => {
      for (const [as, bs] of shapes) {
        if (prod(as) * prod(bs) > 1e5 && dtype !== 'float32') continue;
        const dims = outDims(as, bs);
        const a = makeData(dtype, prod(as), 3 + as.length, kind, false);
        const b = makeData(dtype, prod(bs), 7 + bs.length, kind, true);
        const total = prod(dims);
        const outBool = cmp.includes(kind) || kind === 'and' || kind === 'or';
        const y: Data = outBool ? new Uint8Array(total) : dtype === 'float32' ? new Float32Array(total)
          : dtype === 'int64' ? new BigInt64Array(total) : new Int32Array(total);
        const aStrides = broadcastStrides(as, dims), bStrides = broadcastStrides(bs, dims);
        await runStep([a, b], [y], (c, o) => ({ op: 'binary', kind, dtype, a: c[0]!, b: c[1]!, y: o[0]!, dims, aStrides, bStrides }));
        const want: (number | bigint)[] = [];
        forEachIndex(dims, (idx) => want.push(reference(kind, dtype, a[dot(idx, aStrides)]!, b[dot(idx, bStrides)]!)));
        if (dtype === 'float32' && !outBool) expectClose(y as Float32Array, want as number[], kind === 'pow' ? 4 * u : 0, 0, `${kind} ${dims}`);
        else expect(Array.from(y as ArrayLike<number | bigint>)).toEqual(want);
      }
    });
  }

  it('pow by a broadcast 2 (the squaring fast path) is the rounded x * x, NaN and infinities included', async () => {
    const a = Float32Array.from([...randomF32(37, 12)].map((v) => v * 1e3).concat([0, -0, NaN, Infinity, -Infinity, 3e19, -1e-30]));
    const y = new Float32Array(a.length);
    await runStep([a, Float32Array.from([2])], [y], (c, o) => ({ op: 'binary', kind: 'pow', dtype: 'float32', a: c[0]!, b: c[1]!, y: o[0]!, dims: [a.length], aStrides: [1], bStrides: [0] }));
    expect(Array.from(y)).toEqual(Array.from(a, (v) => Math.fround(v ** 2)));
  });

  it('integer division truncates toward zero', async () => {
    const a = Int32Array.from([-7, 7, -7, 7, 0, -2147483648]);
    const b = Int32Array.from([2, 2, -2, -2, 5, -1]);
    const y = new Int32Array(6);
    await runStep([a, b], [y], (c, o) => ({ op: 'binary', kind: 'div', dtype: 'int32', a: c[0]!, b: c[1]!, y: o[0]!, dims: [6], aStrides: [1], bStrides: [1] }));
    expect(Array.from(y)).toEqual([-3, 3, 3, -3, 0, -2147483648]);
  });

  it('integer division by zero rejects naming the node, and the process carries on', async () => {
    for (const dtype of ['int64', 'int32'] as const) {
      const a = dtype === 'int64' ? BigInt64Array.from([1n, 2n, 3n]) : Int32Array.from([1, 2, 3]);
      const b = dtype === 'int64' ? BigInt64Array.from([1n, 0n, 3n]) : Int32Array.from([1, 0, 3]);
      const y = dtype === 'int64' ? new BigInt64Array(3) : new Int32Array(3);
      const err = await runStep([a, b], [y], (c, o) => ({ op: 'binary', kind: 'div', dtype, a: c[0]!, b: c[1]!, y: o[0]!, dims: [3], aStrides: [1], bStrides: [1] }))
        .catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ERR_SONDE_INVALID_ARGUMENT' });
      expect(String((err as Error).message)).toMatch(/op_under_test.*division by zero/);
    }
    const y = new Float32Array(2);
    await runStep([Float32Array.from([1, 2]), Float32Array.from([0, 4])], [y], (c, o) => ({ op: 'binary', kind: 'div', dtype: 'float32', a: c[0]!, b: c[1]!, y: o[0]!, dims: [2], aStrides: [1], bStrides: [1] }));
    expect(Array.from(y)).toEqual([Infinity, 0.5]);
  });
});

describe('where', () => {
  it.each([1, 4, 8])('elemBytes %i with broadcast cond, x and y', async (eb) => {
    const dims = [3, 5, 7];
    const cond = Uint8Array.from(randomF32(5 * 7, 2), (v) => +(v > 0));
    const condStrides = broadcastStrides([5, 7], dims), xStrides = broadcastStrides([3, 1, 7], dims), yStrides = broadcastStrides([1], dims);
    const make = (n: number, seed: number): Data => {
      const r = randomF32(n, seed);
      return eb === 1 ? Uint8Array.from(r, (v) => Math.abs(v) * 200) : eb === 4 ? r : BigInt64Array.from(r, (v) => BigInt(Math.round(v * 1e6)));
    };
    const x = make(3 * 7, 11), y = make(1, 13);
    const total = prod(dims);
    const out = eb === 1 ? new Uint8Array(total) : eb === 4 ? new Float32Array(total) : new BigInt64Array(total);
    await runStep([cond, x, y], [out], (c, o) => ({ op: 'where', cond: c[0]!, x: c[1]!, y: c[2]!, out: o[0]!, dims, condStrides, xStrides, yStrides, elemBytes: eb }));
    const want: (number | bigint)[] = [];
    forEachIndex(dims, (idx) => want.push(cond[dot(idx, condStrides)] ? x[dot(idx, xStrides)]! : y[dot(idx, yStrides)]!));
    expect(Array.from(out as ArrayLike<number | bigint>)).toEqual(want);
  });
});

describe('strided copy', () => {
  async function check(xData: Data, xOffset: number, dims: number[], xStrides: number[], eb: number): Promise<void> {
    const total = prod(dims);
    const yStrides = contiguous(dims);
    const y = eb === 1 ? new Uint8Array(total) : eb === 4 ? new Float32Array(total) : eb === 8 ? new BigInt64Array(total) : new Uint8Array(total * 2);
    const spec = (c: PlanRef[], o: PlanRef[]) => ({ op: 'copy' as const, x: { buffer: c[0]!.buffer, offset: xOffset }, y: o[0]!, dims, xStrides, yStrides, elemBytes: eb });
    await runStep([xData], [y], spec);
    if (eb === 2) {
      const xs = new Uint16Array(xData.buffer, xData.byteOffset, xData.byteLength / 2);
      const ys = new Uint16Array(y.buffer);
      const want: number[] = [];
      forEachIndex(dims, (idx) => want.push(xs[xOffset + dot(idx, xStrides)]!));
      expect(Array.from(ys)).toEqual(want);
      return;
    }
    const want: (number | bigint)[] = [];
    forEachIndex(dims, (idx) => want.push(xData[xOffset + dot(idx, xStrides)]!));
    expect(Array.from(y as ArrayLike<number | bigint>)).toEqual(want);
  }
  const perms: number[][] = [[0, 2, 1, 3], [3, 2, 1, 0], [0, 1, 3, 2], [1, 0, 2, 3]];
  for (const eb of [1, 2, 4, 8]) {
    it(`transposes (elemBytes ${eb})`, async () => {
      const src = [2, 3, 5, 7];
      const n = prod(src);
      const data: Data = eb === 8 ? BigInt64Array.from({ length: n }, (_, i) => BigInt(i) * 1000003n) : eb === 4 ? Float32Array.from({ length: n }, (_, i) => i + 0.5)
        : eb === 2 ? Uint8Array.from({ length: 2 * n }, (_, i) => (i * 7) & 255) : Uint8Array.from({ length: n }, (_, i) => (i * 13) & 255);
      const cs = contiguous(src);
      for (const p of perms) await check(data, 0, p.map((a) => src[a]!), p.map((a) => cs[a]!), eb);
    });
  }
  it('negative strides (reversed slices) and zero strides (expand)', async () => {
    const x = Float32Array.from({ length: 6 * 11 }, (_, i) => i);
    // x[::-1, ::-2] of a 6 x 11: start at the last element.
    await check(x, 6 * 11 - 1, [6, 6], [-11, -2], 4);
    // x[1:5, ::-1] expanded over a new leading axis of 3.
    await check(x, 11 + 10, [3, 4, 11], [0, 11, -1], 4);
    // A row broadcast down 5 rows, and a single element to a [4, 1, 3] block.
    await check(x, 0, [5, 11], [0, 1], 4);
    await check(x, 17, [4, 1, 3], [0, 0, 0], 4);
    await check(x, 0, [1], [1], 4);
  });
  it('tiled transposes at tile edges, with a reversed axis', async () => {
    for (const eb of [1, 4, 8]) {
      const n = 3 * 37 * 41;
      const x: Data = eb === 8 ? BigInt64Array.from({ length: n }, (_, i) => BigInt(i) - 5000n) : eb === 4 ? Float32Array.from({ length: n }, (_, i) => i)
        : Uint8Array.from({ length: n }, (_, i) => (i * 31) & 255);
      await check(x, 0, [3, 41, 37], [37 * 41, 1, 41], eb);          // [3, 37, 41] -> (0, 2, 1)
      await check(x, 36 * 41, [3, 17, 33], [37 * 41, 1, -41], eb);   // and the 37-axis read backwards
      await check(x, 0, [41, 5, 4], [1, 41, 5 * 41], eb);            // the last axis first
    }
  });
  it('attention-head transposes large enough to split over the pool', async () => {
    const src = [2, 128, 12, 64];  // [batch, seq, heads, headDim] -> [batch, heads, seq, headDim]
    const x = randomF32(prod(src), 5);
    const cs = contiguous(src);
    await check(x, 0, [2, 12, 128, 64], [cs[0]!, cs[2]!, cs[1]!, cs[3]!], 4);
    await check(x, 0, [2, 12, 64, 128], [cs[0]!, cs[2]!, cs[3]!, cs[1]!], 4);
  });
});

describe('fill and gather', () => {
  it('fill casts the value to the dtype', async () => {
    const f = new Float32Array(5), i = new BigInt64Array(3), b = new Uint8Array(2);
    await runStep([], [f], (_c, o) => ({ op: 'fill', y: o[0]!, dtype: 'float32', count: 5, value: -2.5 }));
    await runStep([], [i], (_c, o) => ({ op: 'fill', y: o[0]!, dtype: 'int64', count: 3, value: -7 }));
    await runStep([], [b], (_c, o) => ({ op: 'fill', y: o[0]!, dtype: 'bool', count: 2, value: 3 }));
    expect(Array.from(f)).toEqual([-2.5, -2.5, -2.5, -2.5, -2.5]);
    expect(Array.from(i)).toEqual([-7n, -7n, -7n]);
    expect(Array.from(b)).toEqual([1, 1]);
  });
  for (const indicesDtype of ['int64', 'int32'] as const) {
    it(`gathers with ${indicesDtype} indices, negative ones counted from the end`, async () => {
      const [outer, axisLen, inner] = [3, 5, 4];
      const data = Float32Array.from({ length: outer * axisLen * inner }, (_, i) => i);
      const idx = [-1, 0, 4, -5, 2];
      const ind = indicesDtype === 'int64' ? BigInt64Array.from(idx, BigInt) : Int32Array.from(idx);
      const y = new Float32Array(outer * idx.length * inner);
      await runStep([data, ind], [y], (c, o) => ({ op: 'gather', data: c[0]!, indices: c[1]!, indicesDtype, y: o[0]!, outer, axisLen, inner, nIndices: idx.length, elemBytes: 4 }));
      const want: number[] = [];
      for (let a = 0; a < outer; a++) for (const t of idx) for (let j = 0; j < inner; j++) want.push(data[(a * axisLen + (t < 0 ? t + axisLen : t)) * inner + j]!);
      expect(Array.from(y)).toEqual(want);
    });
  }
  it('an index out of range rejects naming it, and the process carries on', async () => {
    for (const bad of [5, -6, 2 ** 40]) {
      const data = new Float32Array(10);
      const y = new Float32Array(4);
      const err = await runStep([data, BigInt64Array.from([0n, BigInt(bad)])], [y], (c, o) => ({ op: 'gather', data: c[0]!, indices: c[1]!, indicesDtype: 'int64', y: o[0]!, outer: 1, axisLen: 5, inner: 2, nIndices: 2, elemBytes: 4 }))
        .catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ERR_SONDE_INVALID_ARGUMENT' });
      expect((err as Error).message).toContain(`index ${bad} is out of range [-5, 5)`);
    }
  });
});

describe('reduce', () => {
  const shapes: [number, number, number][] = [[3, 1, 4], [4, 7, 1], [2, 33, 17], [1, 1, 1], [5, 9, 1], [2, 300, 300], [700, 100, 1]];
  for (const kind of ['sum', 'mean', 'max', 'min'] as const) {
    it.each(shapes)(`${kind} float32 over [%i, %i, %i]`, async (outer, r, inner) => {
      const x = randomF32(outer * r * inner, r + inner);
      if (x.length > 5 && (kind === 'max' || kind === 'min')) x[3] = NaN;  // NaN propagates
      const y = new Float32Array(outer * inner);
      await runStep([x], [y], (c, o) => ({ op: 'reduce', kind, dtype: 'float32', x: c[0]!, y: o[0]!, outer, r, inner }));
      for (let a = 0; a < outer; a++) for (let j = 0; j < inner; j++) {
        let s = 0, mag = 0, mx = -Infinity, mn = Infinity, nan = false;
        for (let i = 0; i < r; i++) {
          const v = x[(a * r + i) * inner + j]!;
          s += v; mag += Math.abs(v); mx = Math.max(mx, v); mn = Math.min(mn, v); nan ||= Number.isNaN(v);
        }
        const got = y[a * inner + j]!;
        if (kind === 'max' || kind === 'min') {
          if (nan) expect(got).toBeNaN(); else expect(got).toBe(kind === 'max' ? mx : mn);
        } else {
          const want = kind === 'mean' ? s / r : s;
          const bound = (r + 1) * u * (kind === 'mean' ? mag / r : mag) + 1e-30;
          if (!(Math.abs(got - want) <= bound)) throw new Error(`${kind}[${a}, ${j}] = ${got}, want ${want}`);
        }
      }
    });
  }
  it.each(shapes.filter((s) => prod(s) < 1e5))('sum/max/min int64 over [%i, %i, %i]', async (outer, r, inner) => {
    const x = BigInt64Array.from(randomF32(outer * r * inner, 9), (v) => BigInt(Math.round(v * 1e12)));
    for (const kind of ['sum', 'max', 'min'] as const) {
      const y = new BigInt64Array(outer * inner);
      await runStep([x], [y], (c, o) => ({ op: 'reduce', kind, dtype: 'int64', x: c[0]!, y: o[0]!, outer, r, inner }));
      const want: bigint[] = [];
      for (let a = 0; a < outer; a++) for (let j = 0; j < inner; j++) {
        let acc = kind === 'sum' ? 0n : x[a * r * inner + j]!;
        for (let i = kind === 'sum' ? 0 : 1; i < r; i++) {
          const v = x[(a * r + i) * inner + j]!;
          acc = kind === 'sum' ? acc + v : kind === 'max' ? (v > acc ? v : acc) : (v < acc ? v : acc);
        }
        want.push(acc);
      }
      expect(Array.from(y)).toEqual(want);
    }
  });
});

describe('channelAffine', () => {
  it.each([[2, 3, 17], [1, 5, 1], [1, 1, 1], [4, 64, 300]])('[%i, %i, %i]', async (outer, channels, inner) => {
    const x = randomF32(outer * channels * inner, 3), scale = randomF32(channels, 4), shift = randomF32(channels, 5);
    const y = new Float32Array(x.length);
    await runStep([x, scale, shift], [y], (c, o) => ({ op: 'channelAffine', x: c[0]!, y: o[0]!, scale: c[1]!, shift: c[2]!, outer, channels, inner }));
    const want = Array.from(x, (v, i) => {
      const ch = Math.floor(i / inner) % channels;
      return Math.fround(Math.fround(v * scale[ch]!) + shift[ch]!);
    });
    expectClose(y, want, 0, 0, 'affine');
  });
});

describe('cast', () => {
  const floats = [0, -0, 1.5, -1.5, 2.7, -2.7, NaN, 100.9, -100.9, 127.5, -128.9, 200.5, 1e9, -3e9 / 4];
  const types: PlanDType[] = ['float32', 'int64', 'int32', 'bool', 'uint8', 'int8'];
  const make = (t: PlanDType, v: number[]): Data => {
    switch (t) {
      case 'float32': return Float32Array.from(v);
      case 'int64': return BigInt64Array.from(v, (x) => BigInt(Math.trunc(Number.isNaN(x) ? 0 : x)));
      case 'int32': return Int32Array.from(v, (x) => Math.trunc(x));
      case 'bool': return Uint8Array.from(v, (x) => +(x !== 0 && !Number.isNaN(x)));
      case 'uint8': return Uint8Array.from(v, (x) => Math.trunc(x) & 255);
      case 'int8': return Int8Array.from(v, (x) => (Math.trunc(x) << 24) >> 24);
    }
  };
  const alloc = (t: PlanDType, n: number): Data => (t === 'float32' ? new Float32Array(n) : t === 'int64' ? new BigInt64Array(n)
    : t === 'int32' ? new Int32Array(n) : t === 'int8' ? new Int8Array(n) : new Uint8Array(n));
  // The reference: truncate toward zero (NaN -> 0), then wrap to the width (in range for int32 and
  // int64 here); bool is x != 0, so NaN -> true.
  const convert = (v: number | bigint, to: PlanDType): number | bigint => {
    const n = typeof v === 'bigint' ? v : BigInt(Number.isNaN(v) ? 0 : Math.trunc(v));
    switch (to) {
      case 'float32': return Math.fround(Number(v));
      case 'int64': return BigInt.asIntN(64, n);
      case 'int32': return Number(BigInt.asIntN(32, n));
      case 'bool': return typeof v === 'bigint' ? +(v !== 0n) : +(v !== 0);
      case 'uint8': return Number(BigInt.asUintN(8, n));
      case 'int8': return Number(BigInt.asIntN(8, n));
    }
  };
  for (const from of types) for (const to of types) {
    it(`${from} -> ${to}`, async () => {
      const x = make(from, floats);
      const n = x.length;
      const y = alloc(to, n);
      await runStep([x], [y], (c, o) => ({ op: 'cast', x: c[0]!, y: o[0]!, from, to, count: n }));
      const want = Array.from(x as ArrayLike<number | bigint>, (v) => convert(v, to));
      expect(Array.from(y as ArrayLike<number | bigint>)).toEqual(want);
    });
  }
  it('a large float32 -> int64 cast over the pool', async () => {
    const x = Float32Array.from(randomF32(100_003, 8), (v) => v * 1e6);
    const y = new BigInt64Array(x.length);
    await runStep([x], [y], (c, o) => ({ op: 'cast', x: c[0]!, y: o[0]!, from: 'float32', to: 'int64', count: x.length }));
    expect(Array.from(y)).toEqual(Array.from(x, (v) => BigInt(Math.trunc(v))));
  });
});

describe('pad', () => {
  /** Index of output position o along an axis of len, or -1 for the constant (bounce for reflect). */
  function source(o: number, begin: number, len: number, mode: string): number {
    let i = o - begin;
    if (i >= 0 && i < len) return i;
    if (mode === 'constant') return -1;
    if (mode === 'edge') return i < 0 ? 0 : len - 1;
    if (len === 1) return 0;
    while (i < 0 || i >= len) { if (i < 0) i = -i; if (i >= len) i = 2 * (len - 1) - i; }
    return i;
  }
  it('hand-checked 1-d cases', async () => {
    const x = Float32Array.from([1, 2, 3]);
    const cases: [string, number, number, number[]][] = [
      ['reflect', 2, 2, [3, 2, 1, 2, 3, 2, 1]],
      ['edge', 2, 2, [1, 1, 1, 2, 3, 3, 3]],
      ['constant', 1, -1, [9, 1, 2]],
      ['reflect', -1, 1, [2, 3, 2]],
    ];
    for (const [mode, b, e, want] of cases) {
      const y = new Float32Array(want.length);
      await runStep([x], [y], (c, o) => ({ op: 'pad', x: c[0]!, y: o[0]!, dtype: 'float32', inDims: [3], begin: [b], end: [e], mode: mode as never, value: 9 }));
      expect(Array.from(y)).toEqual(want);
    }
  });
  const cases: [number[], number[], number[]][] = [
    [[3, 4], [1, 2], [2, 3]],
    [[3, 4], [1, -1], [-1, 3]],
    [[3, 6], [1, -1], [-1, 2]],
    [[2, 3, 5], [0, 2, -2], [1, -1, 4]],
    [[1, 1, 1], [0, 0, 3], [0, 0, 1]],
    [[4, 7], [-2, -3], [-1, -2]],
    [[2, 16, 64, 64], [0, 0, 3, 3], [0, 0, 3, 3]],  // a conv input pad over the pool
  ];
  for (const mode of ['constant', 'reflect', 'edge'] as const) {
    for (const dtype of ['float32', 'int64', 'uint8'] as const) {
      it(`${mode} ${dtype}, positive and negative pads`, async () => {
        for (const [inDims, begin, end] of cases) {
          if (dtype !== 'float32' && prod(inDims) > 1000) continue;
          // ONNX (and createPlan) require reflect pads smaller than the axis left after cropping,
          // so reflecting off the original edges (the reference) is the same as crop-then-pad.
          const kept = (a: number) => inDims[a]! + Math.min(0, begin[a]!) + Math.min(0, end[a]!);
          if (mode === 'reflect' && inDims.some((_, a) => Math.max(begin[a]!, end[a]!) >= kept(a))) continue;
          const outDims = inDims.map((d, i) => d + begin[i]! + end[i]!);
          const r = randomF32(prod(inDims), 6);
          const x: Data = dtype === 'float32' ? r : dtype === 'int64' ? BigInt64Array.from(r, (v) => BigInt(Math.round(v * 1e9))) : Uint8Array.from(r, (v) => Math.abs(v) * 250);
          const total = prod(outDims);
          const y: Data = dtype === 'float32' ? new Float32Array(total) : dtype === 'int64' ? new BigInt64Array(total) : new Uint8Array(total);
          await runStep([x], [y], (c, o) => ({ op: 'pad', x: c[0]!, y: o[0]!, dtype, inDims, begin, end, mode, value: 7 }));
          const cs = contiguous(inDims);
          const want: (number | bigint)[] = [];
          forEachIndex(outDims, (idx) => {
            const src = idx.map((o, a) => source(o, begin[a]!, inDims[a]!, mode));
            want.push(src.some((s) => s < 0) ? (dtype === 'int64' ? 7n : 7) : x[dot(src, cs)]!);
          });
          expect(Array.from(y as ArrayLike<number | bigint>)).toEqual(want);
        }
      });
    }
  }
});

describe('batched matmul', () => {
  function expectMatMul(c: Float32Array, a: Float32Array, b: Float32Array, batchDims: number[], aBatchStrides: number[],
    bBatchStrides: number[], m: number, k: number, n: number, transB: boolean): void {
    forEachIndex(batchDims, (idx, flat) => {
      const ao = dot(idx, aBatchStrides), bo = dot(idx, bBatchStrides);
      for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) {
        let s = 0, mag = 0;
        for (let p = 0; p < k; p++) {
          const t = a[ao + i * k + p]! * b[bo + (transB ? j * k + p : p * n + j)]!;
          s += t; mag += Math.abs(t);
        }
        const got = c[(flat * m + i) * n + j]!;
        // The float32 dot-product bound in any summation order (see helpers.expectGemmClose).
        if (!(Math.abs(got - s) <= (k + 2) * u * mag + 1e-30))
          throw new Error(`c[${flat}][${i}][${j}] = ${got}, want ${s} (m=${m} k=${k} n=${n} transB=${transB})`);
      }
    });
  }
  const sizes = [1, 7, 17, 33, 65];
  const mkn: [number, number, number][] = [];
  for (const m of sizes) for (const k of sizes) for (const n of sizes) if ((m + 2 * k + 3 * n) % 4 === 0 || m === k && k === n) mkn.push([m, k, n]);
  // Around the row counts where B stops being packed (1, 2 when transB), and long rows for the SIMD dot/axpy tails.
  mkn.push([2, 17, 65], [3, 65, 7], [4, 33, 17], [5, 7, 33], [1, 300, 259], [4, 259, 300]);
  for (const transB of [false, true]) {
    it(`tile-edge sizes, transB ${transB}`, async () => {
      for (const [m, k, n] of mkn) {
        const a = randomF32(m * k, m + k), b = randomF32(k * n, k + n);
        const c = new Float32Array(m * n);
        await runStep([a, b], [c], (ci, o) => ({ op: 'matmul', a: ci[0]!, b: ci[1]!, c: o[0]!, batchDims: [], aBatchStrides: [], bBatchStrides: [], m, k, n, transB }));
        expectMatMul(c, a, b, [], [], [], m, k, n, transB);
      }
    });
    it(`broadcast batch dims (a and b in turn), transB ${transB}`, async () => {
      for (const [m, k, n] of [[7, 17, 33], [1, 65, 7], [33, 1, 17]] as [number, number, number][]) {
        const batchDims = [2, 3];
        for (const [aB, bB] of [[[3 * m * k, m * k], [0, k * n]], [[0, m * k], [3 * k * n, k * n]], [[m * k, 0], [0, k * n]]]) {
          const a = randomF32(6 * m * k, 1), b = randomF32(6 * k * n, 2);
          const c = new Float32Array(6 * m * n);
          await runStep([a, b], [c], (ci, o) => ({ op: 'matmul', a: ci[0]!, b: ci[1]!, c: o[0]!, batchDims, aBatchStrides: aB!, bBatchStrides: bB!, m, k, n, transB }));
          expectMatMul(c, a, b, batchDims, aB!, bB!, m, k, n, transB);
        }
      }
    });
  }
  // The CPU packer's grouping; on the CUDA emulator these 40M multiply-adds alone take a minute.
  it.skipIf(planDevice === 'emulated')('more distinct b[i] than it packs at once (16 MiB) goes in groups, broadcast b repacked per group', async () => {
    const [m, k, n] = [2, 1024, 1024];
    const batchDims = [5, 2], aBatchStrides = [2 * m * k, m * k], bBatchStrides = [k * n, 0];
    const a = randomF32(10 * m * k, 4), b = randomF32(5 * k * n, 5);
    const c = new Float32Array(10 * m * n);
    await runStep([a, b], [c], (ci, o) => ({ op: 'matmul', a: ci[0]!, b: ci[1]!, c: o[0]!, batchDims, aBatchStrides, bBatchStrides, m, k, n, transB: false }));
    expectMatMul(c, a, b, batchDims, aBatchStrides, bBatchStrides, m, k, n, false);
  });
  it('attention shapes (Q.K^T and P.V over 12 heads) across the pool', async () => {
    const [heads, seq, d] = [12, 64, 64];
    const q = randomF32(heads * seq * d, 1), kk = randomF32(heads * seq * d, 2);
    const s = new Float32Array(heads * seq * seq);
    await runStep([q, kk], [s], (c, o) => ({ op: 'matmul', a: c[0]!, b: c[1]!, c: o[0]!, batchDims: [heads], aBatchStrides: [seq * d], bBatchStrides: [seq * d], m: seq, k: d, n: seq, transB: true }));
    expectMatMul(s, q, kk, [heads], [seq * d], [seq * d], seq, d, seq, true);
    const v = randomF32(heads * seq * d, 3);
    const out = new Float32Array(heads * seq * d);
    await runStep([s, v], [out], (c, o) => ({ op: 'matmul', a: c[0]!, b: c[1]!, c: o[0]!, batchDims: [heads], aBatchStrides: [seq * seq], bBatchStrides: [seq * d], m: seq, k: seq, n: d, transB: false }));
    expectMatMul(out, s, v, [heads], [seq * seq], [seq * d], seq, seq, d, false);
  });
});

describe('log-softmax', () => {
  function reference(x: Float32Array, outer: number, axis: number, inner: number): number[] {
    const y = new Array<number>(x.length);
    for (let o = 0; o < outer; o++) for (let j = 0; j < inner; j++) {
      let mx = -Infinity;
      for (let i = 0; i < axis; i++) mx = Math.max(mx, x[(o * axis + i) * inner + j]!);
      let s = 0;
      for (let i = 0; i < axis; i++) s += Math.exp(x[(o * axis + i) * inner + j]! - mx);
      for (let i = 0; i < axis; i++) y[(o * axis + i) * inner + j] = x[(o * axis + i) * inner + j]! - mx - Math.log(s);
    }
    return y;
  }
  it.each([[1, 1, 1], [3, 7, 1], [2, 33, 5], [4, 1, 3], [2, 1000, 1], [1, 5, 300], [64, 30, 40]])('[%i, %i, %i]', async (outer, axis, inner) => {
    const x = Float32Array.from(randomF32(outer * axis * inner, axis), (v) => v * 20);
    const y = new Float32Array(x.length);
    await runStep([x], [y], (c, o) => ({ op: 'softmax', x: c[0]!, y: o[0]!, outer, axis, inner, log: true }));
    // x - max is exact-ish; log(sum) adds a few u relative to itself, then one rounding of the difference.
    expectClose(y, reference(x, outer, axis, inner), 8 * u, 8 * u * (20 + Math.log(axis)), 'logSoftmax');
  });
  it('large values do not overflow', async () => {
    const x = Float32Array.from([1000, 1001, 1002, -1e30, 3e38, 3e38]);
    const y = new Float32Array(6);
    await runStep([x], [y], (c, o) => ({ op: 'softmax', x: c[0]!, y: o[0]!, outer: 2, axis: 3, inner: 1, log: true }));
    expectClose(y, reference(x, 2, 3, 1), 4 * u, 4 * u * 3, 'rows');
    expectClose(y.subarray(4), [-Math.LN2, -Math.LN2], 4 * u, 0, 'row 1');
  });
});

describe('argmax', () => {
  function reference(x: Float32Array, outer: number, r: number, inner: number, last: boolean): bigint[] {
    const out: bigint[] = [];
    for (let o = 0; o < outer; o++) for (let j = 0; j < inner; j++) {
      let best = 0;
      for (let i = 1; i < r; i++) {
        const v = x[(o * r + i) * inner + j]!, b = x[(o * r + best) * inner + j]!;
        const takes = Number.isNaN(b) ? last && Number.isNaN(v) : Number.isNaN(v) || (last ? v >= b : v > b);
        if (takes) best = i;
      }
      out.push(BigInt(best));
    }
    return out;
  }
  it('ties, select_last and NaN (the largest), hand-checked', async () => {
    const rows: [number[], number, number][] = [
      [[1, 3, 3, 2], 1, 2],
      [[1, NaN, 3, NaN], 1, 3],
      [[5], 0, 0],
      [[-Infinity, -Infinity], 0, 1],
      [[2, 2, 2], 0, 2],
    ];
    for (const [v, first, last] of rows) {
      for (const selectLastIndex of [false, true]) {
        const y = new BigInt64Array(1);
        await runStep([Float32Array.from(v)], [y], (c, o) => ({ op: 'argmax', x: c[0]!, y: o[0]!, outer: 1, r: v.length, inner: 1, selectLastIndex }));
        expect(y[0]).toBe(BigInt(selectLastIndex ? last : first));
      }
    }
  });
  it.each([[3, 7, 1], [2, 5, 33], [1, 1, 4], [200, 300, 1], [4, 65, 300]])('[%i, %i, %i] with ties and NaNs', async (outer, r, inner) => {
    // Few distinct values, so ties are common.
    const x = Float32Array.from(randomF32(outer * r * inner, r), (v) => Math.round(v * 3));
    for (let i = 5; i < x.length; i += 97) x[i] = NaN;
    for (const selectLastIndex of [false, true]) {
      const y = new BigInt64Array(outer * inner);
      await runStep([x], [y], (c, o) => ({ op: 'argmax', x: c[0]!, y: o[0]!, outer, r, inner, selectLastIndex }));
      expect(Array.from(y)).toEqual(reference(x, outer, r, inner, selectLastIndex));
    }
  });
});

// The row kernels (native/kernels/reduce: scalar, AVX2, AVX-512) and the transpose kernel
// (native/kernels/transpose: scalar, AVX2) behind reduce, log-softmax, argmax, copy and matmul; SONDE_ISA
// pins the level for a whole process, so each level runs in a child and is checked against the
// scalar one on every row length around the vector and unroll widths (8, 16, 32, 64).
describe.skipIf(planDevice !== undefined)('row reductions at each SIMD level match the scalar level', () => {
  const order = ['scalar', 'avx2', 'avx512'] as const;
  const detected = (native().cpuInfo() as { simdDetected?: string }).simdDetected ?? 'scalar';
  const levels = order.filter((l) => order.indexOf(l) <= order.indexOf(detected as typeof order[number]));
  const script = `import { native } from './dist/binding.js';
    const n = native();
    const out = {};
    for (let r = 1; r <= 70; r++) {
      const outer = 9;
      const x = new Float32Array(outer * r);
      for (let i = 0; i < x.length; i++) x[i] = Math.round(Math.sin(i * 7.1 + r) * 40) / 8;
      if (r % 5 === 0) x[r + (r >> 1)] = NaN;
      const bufs = (bytes) => [{ kind: 'const', data: x, bytes: x.byteLength }, { kind: 'output', index: 0, bytes }];
      const run = async (step, y) => {
        const plan = n.createPlan({ buffers: bufs(y.byteLength), steps: [{ node: 's', x: { buffer: 0, offset: 0 }, y: { buffer: 1, offset: 0 }, ...step }], arenaBytes: 0, inputBytes: [], outputBytes: [y.byteLength] });
        await n.planRun(plan, [], [y], 1);
        plan.dispose();
        return Array.from(y, (v) => (typeof v === 'bigint' ? Number(v) : Number.isNaN(v) ? 'NaN' : v));
      };
      out[r] = {
        max: await run({ op: 'reduce', kind: 'max', dtype: 'float32', outer, r, inner: 1 }, new Float32Array(outer)),
        sum: await run({ op: 'reduce', kind: 'sum', dtype: 'float32', outer, r, inner: 1 }, new Float32Array(outer)),
        argmax: await run({ op: 'argmax', outer, r, inner: 1, selectLastIndex: false }, new BigInt64Array(outer)),
        argmaxLast: await run({ op: 'argmax', outer, r, inner: 1, selectLastIndex: true }, new BigInt64Array(outer)),
        logSoftmax: await run({ op: 'softmax', outer, axis: r, inner: 1, log: true }, new Float32Array(outer * r)),
        // m = 1: the unpacked dot (transB) and axpy paths, x as both a [1, r] and b.
        dot: await run({ op: 'matmul', a: { buffer: 0, offset: 0 }, b: { buffer: 0, offset: 0 }, c: { buffer: 1, offset: 0 }, batchDims: [], aBatchStrides: [], bBatchStrides: [], m: 1, k: r, n: 3, transB: true }, new Float32Array(3)),
        // the transpose kernel: a [9, r] -> [r, 9] copy, and the packing of a transposed b (m = 3)
        transpose: await run({ op: 'copy', dims: [r, 9], xStrides: [1, r], yStrides: [9, 1], elemBytes: 4 }, new Float32Array(9 * r)),
        packedT: await run({ op: 'matmul', a: { buffer: 0, offset: 0 }, b: { buffer: 0, offset: 0 }, c: { buffer: 1, offset: 0 }, batchDims: [], aBatchStrides: [], bBatchStrides: [], m: 3, k: r, n: 9, transB: true }, new Float32Array(27)),
        axpy: await run({ op: 'matmul', a: { buffer: 0, offset: 0 }, b: { buffer: 0, offset: 0 }, c: { buffer: 1, offset: 0 }, batchDims: [], aBatchStrides: [], bBatchStrides: [], m: 1, k: r, n: 3, transB: false }, new Float32Array(3)),
      };
    }
    console.log(JSON.stringify(out));`;
  const runAt = (level: string) => JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', script], {
    env: { ...process.env, SONDE_ISA: level }, timeout: 60_000,
  }).toString()) as Record<string, Record<string, (number | string)[]>>;
  const scalar = levels.length > 1 ? runAt('scalar') : undefined;
  it.each(levels.filter((l) => l !== 'scalar'))('%s', (level) => {
    const got = runAt(level);
    for (const [r, ops] of Object.entries(scalar!)) {
      expect(got[r]!.max, `max r=${r}`).toEqual(ops.max);
      expect(got[r]!.argmax, `argmax r=${r}`).toEqual(ops.argmax);
      expect(got[r]!.argmaxLast, `argmax last r=${r}`).toEqual(ops.argmaxLast);
      // Sums of multiples of 1/8 (products: of 1/64) below 2^20 are exact in any order.
      expect(got[r]!.sum, `sum r=${r}`).toEqual(ops.sum);
      expect(got[r]!.dot, `dot r=${r}`).toEqual(ops.dot);
      expect(got[r]!.axpy, `axpy r=${r}`).toEqual(ops.axpy);
      expect(got[r]!.transpose, `transpose r=${r}`).toEqual(ops.transpose);
      expect(got[r]!.packedT, `packed transB r=${r}`).toEqual(ops.packedT);
      const ls = got[r]!.logSoftmax!, want = ops.logSoftmax!;
      for (let i = 0; i < want.length; i++) {
        if (want[i] === 'NaN') expect(ls[i]).toBe('NaN');
        else expect(Math.abs((ls[i] as number) - (want[i] as number))).toBeLessThanOrEqual(16 * u * (1 + Math.abs(want[i] as number)));
      }
    }
  });
});
