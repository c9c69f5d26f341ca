// The native plan executor (native/runtime/plan.cc, binding native/binding/plan_binding.cc) driven by
// hand-written PlanSpecs; every result is checked against a loop written here.
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { native, packageRoot, type NativeCancelToken, type NativePlan } from '../lib/binding.js';
import { AbortError, DisposedError, InternalError, InvalidArgumentError, callNative, fromNative } from '../lib/errors.js';
import type { PlanBuffer, PlanRef, PlanSpec, PlanStep } from '../lib/session/plan.js';
import { randomF32 as rand } from './helpers.js';

type View = Float32Array | BigInt64Array | Int32Array | Uint8Array | Int8Array;


const input = (index: number, bytes: number): PlanBuffer => ({ kind: 'input', index, bytes });
const output = (index: number, bytes: number): PlanBuffer => ({ kind: 'output', index, bytes });
const arena = (offset: number, bytes: number): PlanBuffer => ({ kind: 'arena', offset, bytes });
const constant = (data: View): PlanBuffer => ({ kind: 'const', data, bytes: data.byteLength });
const ref = (buffer: number, offset = 0): PlanRef => ({ buffer, offset });

/** A spec whose inputBytes/outputBytes are those of its input/output buffers. */
function makeSpec(buffers: PlanBuffer[], steps: PlanStep[], arenaBytes = 0): PlanSpec {
  const sizes = (kind: 'input' | 'output') => {
    const out: number[] = [];
    for (const b of buffers) if (b.kind === kind) out[b.index] = Math.max(out[b.index] ?? 0, b.bytes);
    return out;
  };
  return { buffers, steps, arenaBytes, inputBytes: sizes('input'), outputBytes: sizes('output') };
}

function create(spec: PlanSpec): NativePlan {
  const site = new Error();
  try {
    return native().createPlan(spec);
  } catch (err) {
    throw fromNative(err, site);
  }
}

function run(plan: NativePlan, inputs: ArrayBufferView[], outputs: ArrayBufferView[],
  opts: { cancel?: NativeCancelToken; timings?: Float64Array; threads?: number } = {}): Promise<void> {
  return callNative(() => native().planRun(plan, inputs, outputs, opts.threads ?? 0, opts.cancel, opts.timings), new Error());
}

/** Creates, runs once and disposes. */
async function runOnce(spec: PlanSpec, inputs: ArrayBufferView[], outputs: ArrayBufferView[]): Promise<void> {
  const plan = create(spec);
  try {
    await run(plan, inputs, outputs);
  } finally {
    plan.dispose();
  }
}

function expectClose(got: ArrayLike<number>, want: ArrayLike<number>, tol: number): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    if (!(Math.abs(got[i] - want[i]) <= tol * Math.max(1, Math.abs(want[i])))) {
      throw new Error(`element ${i}: got ${got[i]}, want ${want[i]}`);
    }
  }
}

/** Every multi-index of dims, last axis fastest. */
function* indices(dims: number[]): Generator<number[]> {
  const n = dims.reduce((a, b) => a * b, 1);
  const j = dims.map(() => 0);
  for (let c = 0; c < n; c++) {
    yield j.slice();
    for (let a = dims.length - 1; a >= 0; a--) {
      if (++j[a] < dims[a]) break;
      j[a] = 0;
    }
  }
}
const dot = (j: number[], s: number[]) => j.reduce((acc, v, i) => acc + v * s[i], 0);
const contiguous = (dims: number[]) => dims.map((_, i) => dims.slice(i + 1).reduce((a, b) => a * b, 1));

/** Direct NCHW convolution in double (pads [t, l, b, r], stride 1, no dilation), then ReLU. */
function convRef(x: Float32Array, n: number, cIn: number, h: number, w: number, wt: Float32Array, bias: Float32Array,
  cOut: number, k: number, pad: number): Float64Array {
  const oh = h + 2 * pad - k + 1, ow = w + 2 * pad - k + 1;
  const y = new Float64Array(n * cOut * oh * ow);
  for (let b = 0; b < n; b++) for (let co = 0; co < cOut; co++) for (let i = 0; i < oh; i++) for (let j = 0; j < ow; j++) {
    let s = bias[co];
    for (let ci = 0; ci < cIn; ci++) for (let u = 0; u < k; u++) for (let v = 0; v < k; v++) {
      const yy = i + u - pad, xx = j + v - pad;
      if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
      s += x[((b * cIn + ci) * h + yy) * w + xx] * wt[((co * cIn + ci) * k + u) * k + v];
    }
    y[((b * cOut + co) * oh + i) * ow + j] = Math.max(0, s);
  }
  return y;
}

function gemmRef(a: ArrayLike<number>, b: Float32Array, m: number, k: number, n: number, bias?: Float32Array,
  relu = false): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) {
    let s = bias ? bias[j] : 0;
    for (let p = 0; p < k; p++) s += a[i * k + p] * b[p * n + j];
    c[i * n + j] = relu ? Math.max(0, s) : s;
  }
  return c;
}

// conv (3 -> 4 channels, 3x3, pad 1, ReLU) into the arena, then gemm over its [4 x 25] view with a
// const bias and ReLU into the output.
const CONV = { n: 1, cIn: 3, h: 5, w: 5, cOut: 4, k: 3 };
const GEMM_N = 6;
function convGemmFixture() {
  const wt = rand(CONV.cOut * CONV.cIn * 9, 11), cb = rand(CONV.cOut, 12);
  const conv = native().createConv(wt, {
    cOut: CONV.cOut, cIn: CONV.cIn, group: 1, kernel: [3, 3], strides: [1, 1], dilations: [1, 1], pads: [1, 1, 1, 1],
    autoPad: 0, bias: cb, bnEpsilon: 1e-5, activation: 1, alpha: 0, beta: 0, precision: 'fp32', variant: 'auto',
  });
  const gk = CONV.cOut * CONV.h * CONV.w / 4, gm = 4;
  const gb = rand(gk * GEMM_N, 13), gbias = rand(GEMM_N, 14);
  const packed = native().packGemmWeights(gb, gk, GEMM_N, 'auto');
  const xBytes = CONV.n * CONV.cIn * CONV.h * CONV.w * 4, yBytes = gm * GEMM_N * 4;
  const spec = makeSpec(
    [input(0, xBytes), arena(0, CONV.cOut * CONV.h * CONV.w * 4), constant(gbias), output(0, yBytes)],
    [
      { node: 'Conv_0', op: 'conv', handle: conv, x: ref(0), y: ref(1), residualBeforeActivation: false, n: 1, h: 5, w: 5 },
      { node: 'Gemm_1', op: 'gemm', weights: packed, a: ref(1), c: ref(3), m: gm, k: gk, n: GEMM_N, bias: ref(2),
        residualBeforeActivation: false, activation: 'relu', alpha: 0, beta: 0 },
    ],
    CONV.cOut * CONV.h * CONV.w * 4);
  const reference = (x: Float32Array) => gemmRef(convRef(x, 1, CONV.cIn, CONV.h, CONV.w, wt, cb, CONV.cOut, 3, 1),
    gb, gm, gk, GEMM_N, gbias, true);
  return { conv, packed, spec, reference, xLen: xBytes / 4, yLen: yBytes / 4 };
}

describe('plan steps', () => {
  it('conv then gemm (packed fp32 weights, const bias, ReLU epilogues)', async () => {
    const f = convGemmFixture();
    const x = rand(f.xLen, 5), y = new Float32Array(f.yLen);
    await runOnce(f.spec, [x], [y]);
    expectClose(y, f.reference(x), 1e-4);
    f.conv.dispose();
    f.packed.dispose();
  });

  it('gemm with low-precision (bf16) weights and a residual', async () => {
    const m = 3, k = 17, n = 5;
    const b = rand(k * n, 21), a = rand(m * k, 22), res = rand(m * n, 23);
    const w = native().packGemmWeightsLowp(b, k, n, 'bf16', 'auto');
    const y = new Float32Array(m * n);
    await runOnce(makeSpec([input(0, m * k * 4), input(1, m * n * 4), output(0, m * n * 4)], [
      { node: 'G', op: 'gemm', weights: w, a: ref(0), c: ref(2), residual: ref(1), m, k, n, residualBeforeActivation: false,
        activation: 'none', alpha: 0, beta: 0 },
    ]), [a, res], [y]);
    const want = gemmRef(a, b, m, k, n).map((v, i) => v + res[i]);
    // bf16 weights keep 8 significant bits: |err| <= 2^-8 * sum |a b| <= 2^-8 * k.
    expectClose(y, want, 2 ** -8 * k);
    w.dispose();
  });

  it('copy: a transpose and a negative-stride slice', async () => {
    const x = new BigInt64Array(24).map((_, i) => BigInt(i * 7 - 30));
    const t = new BigInt64Array(24);
    // y [4, 2, 3] = transpose(x [2, 3, 4], perm [2, 0, 1]).
    const f = rand(21, 3), s = new Float32Array(12);
    await runOnce(makeSpec([input(0, 192), input(1, 84), output(0, 192), output(1, 48)], [
      { node: 'T', op: 'copy', x: ref(0), y: ref(2), dims: [4, 2, 3], xStrides: [1, 12, 4], yStrides: [6, 3, 1], elemBytes: 8 },
      // x [3, 7][:, 6::-2] -> [3, 4]
      { node: 'S', op: 'copy', x: ref(1, 6), y: ref(3), dims: [3, 4], xStrides: [7, -2], yStrides: [4, 1], elemBytes: 4 },
    ]), [x, f], [t, s]);
    for (const [a, b, c] of indices([4, 2, 3])) expect(t[a * 6 + b * 3 + c]).toBe(x[b * 12 + c * 4 + a]);
    for (const [i, j] of indices([3, 4])) expect(s[i * 4 + j]).toBe(f[i * 7 + 6 - 2 * j]);
  });

  it('binary with broadcast strides (float add, int32 truncating div, comparison to bool)', async () => {
    const a = rand(15, 31), b = rand(4, 32);
    const ai = new Int32Array([-7, 7, -8, 9, 100]), bi = new Int32Array([2, -3, 5]);
    const y = new Float32Array(60), yi = new Int32Array(15), yb = new Uint8Array(60);
    await runOnce(makeSpec([input(0, 60), input(1, 16), input(2, 20), input(3, 12), output(0, 240), output(1, 60), output(2, 60)], [
      // a [3, 1, 5] + b [4, 1] -> [3, 4, 5]
      { node: 'Add', op: 'binary', kind: 'add', dtype: 'float32', a: ref(0), b: ref(1), y: ref(4), dims: [3, 4, 5],
        aStrides: [5, 0, 1], bStrides: [0, 1, 0] },
      // ai [1, 5] / bi [3, 1] -> [3, 5]
      { node: 'Div', op: 'binary', kind: 'div', dtype: 'int32', a: ref(2), b: ref(3), y: ref(5), dims: [3, 5],
        aStrides: [0, 1], bStrides: [1, 0] },
      { node: 'Less', op: 'binary', kind: 'less', dtype: 'float32', a: ref(0), b: ref(1), y: ref(6), dims: [3, 4, 5],
        aStrides: [5, 0, 1], bStrides: [0, 1, 0] },
    ]), [a, b, ai, bi], [y, yi, yb]);
    for (const [i, j, k] of indices([3, 4, 5])) {
      expect(y[i * 20 + j * 5 + k]).toBe(Math.fround(a[i * 5 + k] + b[j]));
      expect(yb[i * 20 + j * 5 + k]).toBe(a[i * 5 + k] < b[j] ? 1 : 0);
    }
    for (const [i, j] of indices([3, 5])) expect(yi[i * 5 + j]).toBe(Math.trunc(ai[j] / bi[i]));
  });

  it('integer division by zero rejects naming the node, and the plan runs again after', async () => {
    const plan = create(makeSpec([input(0, 8), input(1, 8), output(0, 8)], [
      { node: 'Div_7', op: 'binary', kind: 'div', dtype: 'int32', a: ref(0), b: ref(1), y: ref(2), dims: [2],
        aStrides: [1], bStrides: [1] },
    ]));
    const y = new Int32Array(2);
    await expect(run(plan, [new Int32Array([4, 5]), new Int32Array([2, 0])], [y])).rejects.toThrow(InvalidArgumentError);
    await expect(run(plan, [new Int32Array([4, 5]), new Int32Array([2, 0])], [y])).rejects.toThrow(/node 'Div_7'/);
    await run(plan, [new Int32Array([4, -9]), new Int32Array([2, 2])], [y]);
    expect([...y]).toEqual([2, -4]);
    // Back to back, a run this short may settle on the calling thread (Addon::Start): failures and
    // results alternate there as they do through the event loop.
    for (let i = 0; i < 50; i++) {
      await expect(run(plan, [new Int32Array([4, 5]), new Int32Array([2, 0])], [y])).rejects.toThrow(/node 'Div_7'/);
      await run(plan, [new Int32Array([i, -9]), new Int32Array([2, 2])], [y]);
      expect([...y]).toEqual([Math.trunc(i / 2), -4]);
    }
    plan.dispose();
  });

  it('gather with negative int64 indices; an out-of-range index is a run error', async () => {
    const data = rand(30, 41), idx = new BigInt64Array([-1n, 0n, 4n, 2n]);
    const y = new Float32Array(24);
    const spec = makeSpec([input(0, 120), input(1, 32), output(0, 96)], [
      { node: 'Gather_12', op: 'gather', data: ref(0), indices: ref(1), indicesDtype: 'int64', y: ref(2), outer: 2, axisLen: 5,
        inner: 3, nIndices: 4, elemBytes: 4 },
    ]);
    const plan = create(spec);
    await run(plan, [data, idx], [y]);
    for (const [o, i, c] of indices([2, 4, 3])) {
      const k = Number(idx[i] < 0n ? idx[i] + 5n : idx[i]);
      expect(y[(o * 4 + i) * 3 + c]).toBe(data[(o * 5 + k) * 3 + c]);
    }
    await expect(run(plan, [data, new BigInt64Array([0n, 5n, 1n, 1n])], [y])).rejects.toThrow(/node 'Gather_12'/);
    plan.dispose();
  });

  it('softmax and log-softmax over a middle and a last axis', async () => {
    const x = rand(42, 51).map((v) => v * 8);
    const ys = [0, 1, 2, 3].map(() => new Float32Array(42));
    const steps: PlanStep[] = [];
    const shapes = [[2, 7, 3], [6, 7, 1]];
    for (let s = 0; s < 4; s++) {
      const [outer, axis, inner] = shapes[s % 2];
      steps.push({ node: `S${s}`, op: 'softmax', x: ref(0), y: ref(1 + s), outer, axis, inner, log: s >= 2 });
    }
    await runOnce(makeSpec([input(0, 168), output(0, 168), output(1, 168), output(2, 168), output(3, 168)], steps), [x], ys);
    for (let s = 0; s < 4; s++) {
      const [outer, axis, inner] = shapes[s % 2];
      const want = new Float64Array(42);
      for (let o = 0; o < outer; o++) for (let i = 0; i < inner; i++) {
        let mx = -Infinity, sum = 0;
        for (let a = 0; a < axis; a++) mx = Math.max(mx, x[(o * axis + a) * inner + i]);
        for (let a = 0; a < axis; a++) sum += Math.exp(x[(o * axis + a) * inner + i] - mx);
        for (let a = 0; a < axis; a++) {
          const v = x[(o * axis + a) * inner + i] - mx;
          want[(o * axis + a) * inner + i] = s >= 2 ? v - Math.log(sum) : Math.exp(v) / sum;
        }
      }
      expectClose(ys[s], want, 1e-5);
    }
  });

  it('layerNorm with and without scale/bias', async () => {
    const rows = 3, cols = 17, x = rand(rows * cols, 61), scale = rand(cols, 62), bias = rand(cols, 63);
    const y1 = new Float32Array(rows * cols), y2 = new Float32Array(rows * cols);
    await runOnce(makeSpec([input(0, 204), constant(scale), constant(bias), output(0, 204), output(1, 204)], [
      { node: 'LN', op: 'layerNorm', x: ref(0), y: ref(3), scale: ref(1), bias: ref(2), rows, cols, epsilon: 1e-5 },
      { node: 'LN2', op: 'layerNorm', x: ref(0), y: ref(4), rows, cols, epsilon: 1e-3 },
    ]), [x], [y1, y2]);
    for (let r = 0; r < rows; r++) {
      const row = Array.from(x.subarray(r * cols, (r + 1) * cols));
      const mean = row.reduce((a, b) => a + b, 0) / cols;
      const v = row.reduce((a, b) => a + (b - mean) ** 2, 0) / cols;
      for (let c = 0; c < cols; c++) {
        const z = (row[c] - mean) / Math.sqrt(v + 1e-5);
        expect(Math.abs(y1[r * cols + c] - (z * scale[c] + bias[c]))).toBeLessThan(1e-5);
        expect(Math.abs(y2[r * cols + c] - (row[c] - mean) / Math.sqrt(v + 1e-3))).toBeLessThan(1e-5);
      }
    }
  });

  it('reduce sum/mean/max/min (float32) and sum (int64)', async () => {
    const x = rand(30, 71), xi = new BigInt64Array(30).map((_, i) => BigInt(i * i - 200));
    const kinds = ['sum', 'mean', 'max', 'min'] as const;
    const ys = kinds.map(() => new Float32Array(6)), yi = new BigInt64Array(6);
    const steps: PlanStep[] = kinds.map((kind, s) => ({ node: `R${s}`, op: 'reduce', kind, dtype: 'float32', x: ref(0),
      y: ref(2 + s), outer: 2, r: 5, inner: 3 }));
    steps.push({ node: 'RI', op: 'reduce', kind: 'sum', dtype: 'int64', x: ref(1), y: ref(6), outer: 2, r: 5, inner: 3 });
    await runOnce(makeSpec([input(0, 120), input(1, 240), ...kinds.map((_, s) => output(s, 24)), output(4, 48)], steps),
      [x, xi], [...ys, yi]);
    for (const [o, i] of indices([2, 3])) {
      const col = [0, 1, 2, 3, 4].map((r) => x[(o * 5 + r) * 3 + i]);
      const sum = col.reduce((a, b) => a + b, 0);
      expect(Math.abs(ys[0][o * 3 + i] - sum)).toBeLessThan(1e-6);
      expect(Math.abs(ys[1][o * 3 + i] - sum / 5)).toBeLessThan(1e-6);
      expect(ys[2][o * 3 + i]).toBe(Math.max(...col));
      expect(ys[3][o * 3 + i]).toBe(Math.min(...col));
      expect(yi[o * 3 + i]).toBe([0, 1, 2, 3, 4].reduce((a, r) => a + xi[(o * 5 + r) * 3 + i], 0n));
    }
  });

  it('where with broadcast cond, x and a scalar y', async () => {
    const cond = new Uint8Array([1, 0, 1]), x = rand(4, 81), yv = new Float32Array([42]);
    const out = new Float32Array(12);
    await runOnce(makeSpec([input(0, 3), input(1, 16), constant(yv), output(0, 48)], [
      { node: 'W', op: 'where', cond: ref(0), x: ref(1), y: ref(2), out: ref(3), dims: [3, 4], condStrides: [1, 0],
        xStrides: [0, 1], yStrides: [0, 0], elemBytes: 4 },
    ]), [cond, x], [out]);
    for (const [i, j] of indices([3, 4])) expect(out[i * 4 + j]).toBe(cond[i] ? x[j] : 42);
  });

  it('cast float32 -> int32 (truncating) / bool and int64 -> float32', async () => {
    const x = new Float32Array([-2.7, -0.5, 0, 0.5, 3.9, 1e3, -0]), xi = new BigInt64Array([-3n, 0n, 1n << 40n]);
    const yi = new Int32Array(7), yb = new Uint8Array(7), yf = new Float32Array(3);
    await runOnce(makeSpec([input(0, 28), input(1, 24), output(0, 28), output(1, 7), output(2, 12)], [
      { node: 'C1', op: 'cast', x: ref(0), y: ref(2), from: 'float32', to: 'int32', count: 7 },
      { node: 'C2', op: 'cast', x: ref(0), y: ref(3), from: 'float32', to: 'bool', count: 7 },
      { node: 'C3', op: 'cast', x: ref(1), y: ref(4), from: 'int64', to: 'float32', count: 3 },
    ]), [x, xi], [yi, yb, yf]);
    expect([...yi]).toEqual([...x].map((v) => Math.trunc(v) | 0));
    expect([...yb]).toEqual([...x].map((v) => (v !== 0 ? 1 : 0)));
    expect([...yf]).toEqual([-3, 0, 2 ** 40]);
  });

  it('pad: constant, reflect, edge and a negative (cropping) pad', async () => {
    const x = rand(6, 91), r = rand(5, 92);
    const yc = new Float32Array(3 * 5), yr = new Float32Array(8), ye = new Float32Array(8), yn = new Float32Array(4);
    await runOnce(makeSpec([input(0, 24), input(1, 20), output(0, 60), output(1, 32), output(2, 32), output(3, 16)], [
      { node: 'P1', op: 'pad', x: ref(0), y: ref(2), dtype: 'float32', inDims: [2, 3], begin: [1, 0], end: [0, 2],
        mode: 'constant', value: 9 },
      { node: 'P2', op: 'pad', x: ref(1), y: ref(3), dtype: 'float32', inDims: [5], begin: [2], end: [1], mode: 'reflect', value: 0 },
      { node: 'P3', op: 'pad', x: ref(1), y: ref(4), dtype: 'float32', inDims: [5], begin: [2], end: [1], mode: 'edge', value: 0 },
      { node: 'P4', op: 'pad', x: ref(0), y: ref(5), dtype: 'float32', inDims: [2, 3], begin: [0, -1], end: [0, 0],
        mode: 'constant', value: 0 },
    ]), [x, r], [yc, yr, ye, yn]);
    for (const [i, j] of indices([3, 5])) expect(yc[i * 5 + j]).toBe(i >= 1 && j < 3 ? x[(i - 1) * 3 + j] : 9);
    const reflect = (i: number) => (i < 0 ? -i : i >= 5 ? 8 - i : i);
    for (let i = 0; i < 8; i++) {
      expect(yr[i]).toBe(r[reflect(i - 2)]);
      expect(ye[i]).toBe(r[Math.min(4, Math.max(0, i - 2))]);
    }
    expect([...yn]).toEqual([x[1], x[2], x[4], x[5]]);
  });

  it('batched matmul with broadcast batch strides, and transB', async () => {
    const m = 3, k = 4, n = 5;
    const a = rand(2 * m * k, 101), b = rand(3 * k * n, 102), bt = rand(n * k, 103);
    const c = new Float32Array(6 * m * n), ct = new Float32Array(2 * m * n);
    await runOnce(makeSpec([input(0, a.byteLength), input(1, b.byteLength), input(2, bt.byteLength),
      output(0, c.byteLength), output(1, ct.byteLength)], [
      // a [2, 1, m, k] x b [1, 3, k, n] -> c [2, 3, m, n]
      { node: 'MM', op: 'matmul', a: ref(0), b: ref(1), c: ref(3), batchDims: [2, 3], aBatchStrides: [m * k, 0],
        bBatchStrides: [0, k * n], m, k, n, transB: false },
      { node: 'MMT', op: 'matmul', a: ref(0), b: ref(2), c: ref(4), batchDims: [2], aBatchStrides: [m * k],
        bBatchStrides: [0], m, k, n, transB: true },
    ]), [a, b, bt], [c, ct]);
    for (const [i, j] of indices([2, 3])) {
      const want = gemmRef(a.subarray(i * m * k), b.subarray(j * k * n), m, k, n);
      expectClose(c.subarray((i * 3 + j) * m * n, (i * 3 + j + 1) * m * n), want, 1e-5);
    }
    const btT = new Float32Array(k * n);
    for (const [p, q] of indices([n, k])) btT[q * n + p] = bt[p * k + q];
    for (let i = 0; i < 2; i++) expectClose(ct.subarray(i * m * n, (i + 1) * m * n), gemmRef(a.subarray(i * m * k), btT, m, k, n), 1e-5);
  });

  it('fill (float32 and int64), unary (sigmoid, int32 neg) and channelAffine', async () => {
    const yf = new Float32Array(7), yi = new BigInt64Array(3), x = rand(9, 111), xi = new Int32Array([3, -4, 0]);
    const ys = new Float32Array(9), yn = new Int32Array(3), ya = new Float32Array(12);
    const xa = rand(12, 112), scale = new Float32Array([2, -1, 0.5]), shift = new Float32Array([1, 2, 3]);
    await runOnce(makeSpec([input(0, 36), input(1, 12), input(2, 48), constant(scale), constant(shift),
      output(0, 28), output(1, 24), output(2, 36), output(3, 12), output(4, 48)], [
      { node: 'F1', op: 'fill', y: ref(5), dtype: 'float32', count: 7, value: 2.5 },
      { node: 'F2', op: 'fill', y: ref(6), dtype: 'int64', count: 3, value: -3 },
      { node: 'U1', op: 'unary', kind: 'sigmoid', dtype: 'float32', x: ref(0), y: ref(7), count: 9, alpha: 0, beta: 0 },
      { node: 'U2', op: 'unary', kind: 'neg', dtype: 'int32', x: ref(1), y: ref(8), count: 3, alpha: 0, beta: 0 },
      { node: 'CA', op: 'channelAffine', x: ref(2), y: ref(9), scale: ref(3), shift: ref(4), outer: 2, channels: 3, inner: 2 },
    ]), [x, xi, xa], [yf, yi, ys, yn, ya]);
    expect([...yf]).toEqual(new Array(7).fill(2.5));
    expect([...yi]).toEqual([-3n, -3n, -3n]);
    expectClose(ys, [...x].map((v) => 1 / (1 + Math.exp(-v))), 1e-6);
    expect([...yn]).toEqual([-3, 4, 0]);
    for (const [o, c, i] of indices([2, 3, 2])) {
      const at = (o * 3 + c) * 2 + i;
      expect(Math.abs(ya[at] - (xa[at] * scale[c] + shift[c]))).toBeLessThan(1e-6);
    }
  });

  it('pool (max 2x2 stride 2) and globalAveragePool', async () => {
    const x = rand(2 * 5 * 5, 121), ym = new Float32Array(2 * 2 * 2), yg = new Float32Array(2);
    await runOnce(makeSpec([input(0, 200), output(0, 32), output(1, 8)], [
      { node: 'MP', op: 'pool', kind: 0, x: ref(0), y: ref(1), planes: 2, h: 5, w: 5, kernel: [2, 2], strides: [2, 2],
        dilations: [1, 1], pads: [0, 0, 0, 0], countIncludePad: false },
      { node: 'GAP', op: 'globalAveragePool', x: ref(0), y: ref(2), planes: 2, hw: 25 },
    ]), [x], [ym, yg]);
    for (const [p, i, j] of indices([2, 2, 2])) {
      const at = (u: number, v: number) => x[p * 25 + (2 * i + u) * 5 + 2 * j + v];
      expect(ym[(p * 2 + i) * 2 + j]).toBe(Math.max(at(0, 0), at(0, 1), at(1, 0), at(1, 1)));
    }
    for (let p = 0; p < 2; p++) expect(Math.abs(yg[p] - x.subarray(p * 25, p * 25 + 25).reduce((a, b) => a + b, 0) / 25)).toBeLessThan(1e-6);
  });

  it('argmax (first and last of ties) and topk (largest and smallest)', async () => {
    // x [2, 6, 3] with ties on the max in column 0.
    const x = rand(36, 131);
    for (let o = 0; o < 2; o++) { x[(o * 6 + 1) * 3] = 5; x[(o * 6 + 4) * 3] = 5; }
    const af = new BigInt64Array(6), al = new BigInt64Array(6);
    const tv = new Float32Array(18), ti = new BigInt64Array(18), sv = new Float32Array(18), si = new BigInt64Array(18);
    await runOnce(makeSpec([input(0, 144), output(0, 48), output(1, 48), output(2, 72), output(3, 144), output(4, 72), output(5, 144)], [
      { node: 'AF', op: 'argmax', x: ref(0), y: ref(1), outer: 2, r: 6, inner: 3, selectLastIndex: false },
      { node: 'AL', op: 'argmax', x: ref(0), y: ref(2), outer: 2, r: 6, inner: 3, selectLastIndex: true },
      { node: 'TK', op: 'topk', x: ref(0), values: ref(3), indices: ref(4), outer: 2, r: 6, inner: 3, k: 3, largest: true },
      { node: 'TS', op: 'topk', x: ref(0), values: ref(5), indices: ref(6), outer: 2, r: 6, inner: 3, k: 3, largest: false },
    ]), [x], [af, al, tv, ti, sv, si]);
    for (const [o, i] of indices([2, 3])) {
      const col = [0, 1, 2, 3, 4, 5].map((r) => x[(o * 6 + r) * 3 + i]);
      const mx = Math.max(...col);
      expect(af[o * 3 + i]).toBe(BigInt(col.indexOf(mx)));
      expect(al[o * 3 + i]).toBe(BigInt(col.lastIndexOf(mx)));
      if (i === 0) continue;  // ties: their order in topk is not part of the check
      const order = [0, 1, 2, 3, 4, 5].sort((p, q) => col[q] - col[p]);
      for (let t = 0; t < 3; t++) {
        expect(ti[(o * 3 + t) * 3 + i]).toBe(BigInt(order[t]));
        expect(tv[(o * 3 + t) * 3 + i]).toBe(col[order[t]]);
        expect(si[(o * 3 + t) * 3 + i]).toBe(BigInt(order[5 - t]));
        expect(sv[(o * 3 + t) * 3 + i]).toBe(col[order[5 - t]]);
      }
    }
  });
});

describe('plan runs', () => {
  it('two arena buffers share an offset range at disjoint lifetimes; repeated runs reuse the arena', async () => {
    const n = 37, x = rand(n, 141);
    const two = new Float32Array([2]), three = new Float32Array([3]);
    const y1 = new Float32Array(n), y2 = new Float32Array(n);
    // A = x * 2 (arena [0, 148)); y1 = A + x; B = x * 3 over the same bytes once A is dead; y2 = B - x.
    const bin = (node: string, kind: 'add' | 'sub' | 'mul', a: PlanRef, b: PlanRef, y: PlanRef, bStride: number): PlanStep =>
      ({ node, op: 'binary', kind, dtype: 'float32', a, b, y, dims: [n], aStrides: [1], bStrides: [bStride] });
    const plan = create(makeSpec([input(0, n * 4), arena(0, n * 4), arena(0, n * 4), constant(two), constant(three),
      output(0, n * 4), output(1, n * 4)], [
      bin('A', 'mul', ref(0), ref(3), ref(1), 0),
      bin('Y1', 'add', ref(1), ref(0), ref(5), 1),
      bin('B', 'mul', ref(0), ref(4), ref(2), 0),
      bin('Y2', 'sub', ref(2), ref(0), ref(6), 1),
    ], 192));
    // skipZeroRuns: -1 for every step that is not a batch-1 gemm (none here).
    expect(plan.info()).toEqual({ disposed: false, steps: 4, arenaBytes: 192, bytes: 192 + 8, skipZeroRuns: [-1, -1, -1, -1] });
    for (let rep = 0; rep < 3; rep++) {
      y1.fill(0); y2.fill(0);
      await run(plan, [x], [y1, y2]);
      for (let i = 0; i < n; i++) {
        expect(y1[i]).toBe(Math.fround(Math.fround(x[i] * 2) + x[i]));
        expect(y2[i]).toBe(Math.fround(Math.fround(x[i] * 3) - x[i]));
      }
    }
    plan.dispose();
    expect(plan.info().disposed).toBe(true);
  });

  it('20 concurrent runs of one plan each get their own arena and a correct result', async () => {
    const f = convGemmFixture();
    const plan = create(f.spec);
    const xs = Array.from({ length: 20 }, (_, i) => rand(f.xLen, 1000 + (i % 4)));
    const ys = xs.map(() => new Float32Array(f.yLen));
    await Promise.all(xs.map((x, i) => run(plan, [x], [ys[i]], { threads: 1 + (i % 2) })));
    for (let i = 0; i < 20; i++) {
      expectClose(ys[i], f.reference(xs[i]), 1e-4);
      // Same input, same plan: bit-identical, whatever ran beside it.
      expect(Buffer.from(ys[i].buffer).equals(Buffer.from(ys[i % 4].buffer))).toBe(true);
    }
    plan.dispose();
    f.conv.dispose();
    f.packed.dispose();
  });

  it('concurrent runs never see each other\'s arena', async () => {
    // Each run parks its input in the arena, spends a while on a matmul, then reads the arena back:
    // a run sharing another's arena would return the other's input.
    const n = 4096, d = 96;
    const plan = create(makeSpec([input(0, n * 4), input(1, d * d * 4), arena(0, n * 4), arena(n * 4, d * d * 4),
      output(0, n * 4)], [
      { node: 'Park', op: 'copy', x: ref(0), y: ref(2), dims: [n], xStrides: [1], yStrides: [1], elemBytes: 4 },
      ...Array.from({ length: 4 }, (_, s): PlanStep => ({ node: `Busy${s}`, op: 'matmul', a: ref(1), b: ref(1), c: ref(3),
        batchDims: [], aBatchStrides: [], bBatchStrides: [], m: d, k: d, n: d, transB: false })),
      { node: 'Back', op: 'copy', x: ref(2), y: ref(4), dims: [n], xStrides: [1], yStrides: [1], elemBytes: 4 },
    ], n * 4 + d * d * 4));
    const m = rand(d * d, 7);
    const xs = Array.from({ length: 20 }, (_, i) => rand(n, 2000 + i)), ys = xs.map(() => new Float32Array(n));
    await Promise.all(xs.map((x, i) => run(plan, [x, m], [ys[i]], { threads: 1 })));
    for (let i = 0; i < 20; i++) expect(Buffer.from(ys[i].buffer).equals(Buffer.from(xs[i].buffer))).toBe(true);
    plan.dispose();
  });

  it('timings receive each step\'s wall time', async () => {
    const f = convGemmFixture();
    const plan = create(f.spec);
    const timings = new Float64Array(2);
    await run(plan, [rand(f.xLen, 3)], [new Float32Array(f.yLen)], { timings });
    expect(timings[0]).toBeGreaterThan(0);
    expect(timings[1]).toBeGreaterThan(0);
    await expect(run(plan, [rand(f.xLen, 3)], [new Float32Array(f.yLen)], { timings: new Float64Array(3) }))
      .rejects.toThrow(InvalidArgumentError);
    plan.dispose();
    f.conv.dispose();
    f.packed.dispose();
  });

  it('cancel before and during a run rejects with AbortError; the plan still runs after', async () => {
    // 1600 steps of a 128^3 matmul (0.1 s with AVX-512, more elsewhere): long enough that a cancel
    // 5 ms in lands in the middle even when a loaded machine fires the timer late.
    const d = 128, steps: PlanStep[] = [];
    for (let s = 0; s < 1600; s++) {
      steps.push({ node: `MM${s}`, op: 'matmul', a: ref(0), b: ref(0), c: ref(1), batchDims: [], aBatchStrides: [],
        bBatchStrides: [], m: d, k: d, n: d, transB: false });
    }
    const plan = create(makeSpec([input(0, d * d * 4), output(0, d * d * 4)], steps));
    const a = rand(d * d, 151), c = new Float32Array(d * d);
    const before = new (native().CancelToken)();
    before.cancel();
    await expect(run(plan, [a], [c], { cancel: before })).rejects.toThrow(AbortError);
    const during = new (native().CancelToken)();
    let cancelledAt = Infinity;
    const p = run(plan, [a], [c], { cancel: during });
    setTimeout(() => { cancelledAt = performance.now(); during.cancel(); }, 5);
    await expect(p).rejects.toThrow(AbortError);
    expect(performance.now() - cancelledAt).toBeLessThan(1500);
    await run(plan, [a], [c], { cancel: new (native().CancelToken)() });
    expectClose(c, gemmRef(a, a, d, d, d), 1e-4);
    plan.dispose();
  });
});

describe('plan validation', () => {
  const copy = (x: PlanRef, y: PlanRef, dims: number[], xStrides: number[]): PlanStep =>
    ({ node: 'Copy_3', op: 'copy', x, y, dims, xStrides, yStrides: contiguous(dims), elemBytes: 4 });

  it('rejects an out-of-range ref, a walk below the buffer, and a step writing an input (InternalError)', () => {
    const bufs = [input(0, 40), output(0, 40)];
    expect(() => create(makeSpec(bufs, [copy(ref(0, 1), ref(1), [10], [1])]))).toThrow(InternalError);
    expect(() => create(makeSpec(bufs, [copy(ref(0, 1), ref(1), [10], [1])]))).toThrow(/node 'Copy_3'.*x reaches/);
    expect(() => create(makeSpec(bufs, [copy(ref(0, 3), ref(1), [5], [-1])]))).toThrow(/x reaches elements \[-1/);
    expect(() => create(makeSpec(bufs, [copy(ref(5), ref(1), [10], [1])]))).toThrow(/buffer 5 of 2/);
    expect(() => create(makeSpec(bufs, [copy(ref(1), ref(0), [10], [1])]))).toThrow(/writes buffer 0, which is an input/);
    expect(() => create(makeSpec([constant(new Float32Array(10)), output(0, 40)], [copy(ref(1), ref(0), [10], [1])])))
      .toThrow(/a const/);
    // The same walks in range are accepted.
    create(makeSpec(bufs, [copy(ref(0, 9), ref(1), [10], [-1])])).dispose();
  });

  it('rejects inconsistent buffers and malformed steps', () => {
    expect(() => create(makeSpec([arena(32, 8)], [], 64))).toThrow(/not a multiple of 64/);
    expect(() => create(makeSpec([arena(0, 128)], [], 64))).toThrow(/outside the arena/);
    expect(() => create({ ...makeSpec([input(0, 40)], []), inputBytes: [8] })).toThrow(/input 0 has 8/);
    expect(() => create(makeSpec([input(0, 8)], [{ node: 'X', op: 'nope' } as unknown as PlanStep]))).toThrow(/unknown op 'nope'/);
    expect(() => create(makeSpec([input(0, 8), output(0, 8)], [
      { node: 'U', op: 'unary', kind: 'not', dtype: 'float32', x: ref(0), y: ref(1), count: 2, alpha: 0, beta: 0 }])))
      .toThrow(InternalError);
    expect(() => create(makeSpec([input(0, 40), output(0, 40)], [
      { node: 'T', op: 'topk', x: ref(0), values: ref(1), indices: ref(1), outer: 1, r: 2, inner: 1, k: 3, largest: true }])))
      .toThrow(/k = 3 exceeds/);
  });

  it('rejects a disposed conv handle (DisposedError) and a run of a disposed plan', async () => {
    const f = convGemmFixture();
    const plan = create(f.spec);
    f.conv.dispose();
    expect(() => create(f.spec)).toThrow(DisposedError);
    // The plan holds its own reference: it keeps running after the handle is disposed.
    const x = rand(f.xLen, 8), y = new Float32Array(f.yLen);
    await run(plan, [x], [y]);
    expectClose(y, f.reference(x), 1e-4);
    plan.dispose();
    plan.dispose();
    await expect(run(plan, [x], [y])).rejects.toThrow(DisposedError);
    f.packed.dispose();
  });

  it('spmm step layouts: batch with column-major (NCHW) or strided row-major operands and a residual; bad layouts rejected', async () => {
    const [batch, m, k, n] = [2, 13, 19, 11];
    const b = rand(k * n, 31).map((v, i) => (i % 4 ? 0 : v));
    const bias = rand(n, 32);
    const csr = native().toSparse(b, k, n, 'csr', 0);
    const bsr = native().toSparse(b, k, n, 'bsr', 8);
    // A[b][i][q] and R[b][i][j] in the test's own row-major form; the step reads them through strides.
    const A = rand(batch * m * k, 33), R = rand(batch * m * n, 34);
    const want = new Float32Array(batch * m * n);
    for (let t = 0; t < batch; t++) for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) {
      let acc = bias[j]!;
      for (let q = 0; q < k; q++) acc += A[(t * m + i) * k + q]! * b[q * n + j]!;
      want[(t * m + i) * n + j] = Math.max(0, acc + R[(t * m + i) * n + j]!);
    }
    const step = (weights: unknown, aStrides: number[], cStrides: number[], aLen: number, cLen: number) => makeSpec(
      [input(0, aLen * 4), input(1, cLen * 4), output(0, cLen * 4), { kind: 'const', data: bias, bytes: n * 4 }],
      [{ node: 'S', op: 'spmm', weights: weights as never, a: ref(0), c: ref(2), residual: ref(1), m, k, n, bias: ref(3),
        residualBeforeActivation: true, activation: 'relu', alpha: 0, beta: 0, batch,
        aStrides: aStrides as [number, number, number], cStrides: cStrides as [number, number, number] }]);
    // Column-major, as NCHW images [k, m] and [n, m] (with ldc = m + 2 between output rows).
    const ldc = m + 2;
    const at = new Float32Array(batch * k * m), rt = new Float32Array(batch * n * ldc), ct = new Float32Array(batch * n * ldc).fill(-9);
    for (let t = 0; t < batch; t++) for (let i = 0; i < m; i++) {
      for (let q = 0; q < k; q++) at[t * k * m + q * m + i] = A[(t * m + i) * k + q]!;
      for (let j = 0; j < n; j++) rt[t * n * ldc + j * ldc + i] = R[(t * m + i) * n + j]!;
    }
    await runOnce(step(csr, [k * m, 1, m], [n * ldc, 1, ldc], at.length, ct.length), [at, rt], [ct]);
    const got = new Float32Array(batch * m * n);
    for (let t = 0; t < batch; t++) for (let j = 0; j < n; j++) for (let i = 0; i < ldc; i++) {
      if (i < m) got[(t * m + i) * n + j] = ct[t * n * ldc + j * ldc + i]!;
      else expect(ct[t * n * ldc + j * ldc + i]).toBe(-9);
    }
    expectClose(got, want, 1e-5);
    // Row-major with a batch and a padded ldc, on both formats.
    const ldr = n + 3;
    for (const w of [csr, bsr]) {
      const rr = new Float32Array(batch * m * ldr), cr = new Float32Array(batch * m * ldr);
      for (let t = 0; t < batch; t++) for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) rr[(t * m + i) * ldr + j] = R[(t * m + i) * n + j]!;
      await runOnce(step(w, [m * k, k, 1], [m * ldr, ldr, 1], A.length, cr.length), [A, rr], [cr]);
      const g = new Float32Array(batch * m * n);
      for (let t = 0; t < batch; t++) for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) g[(t * m + i) * n + j] = cr[(t * m + i) * ldr + j]!;
      expectClose(g, want, 1e-5);
    }
    expect(() => create(step(bsr, [k * m, 1, m], [n * m, 1, m], at.length, batch * n * m))).toThrow(/column-major a and c need CSR weights/);
    expect(() => create(step(csr, [k * m, 1, m], [m * n, n, 1], at.length, batch * n * m))).toThrow(/both be row-major .* or both column-major/);
    expect(() => create(step(csr, [k * m, -1, m], [n * m, 1, m], at.length, batch * n * m))).toThrow(/must not be negative/);
    expect(() => create(step(csr, [k * m, 1, m], [n * m, 1, m - 1], at.length, batch * n * m))).toThrow(/cStrides\[2\] >= m/);
    expect(() => create(step(csr, [k * m, 1, m], [n * m - 1, 1, m], at.length, batch * n * m))).toThrow(/cStrides\[0\] overlaps/);
    expect(() => create(step(csr, [k * m, 1, m], [n * m, 1, m], at.length - 1, batch * n * m))).toThrow(/a reaches elements/);
    csr.dispose();
    bsr.dispose();
  });

  it('spmm step with taps (a direct KxK conv on padded or phased images): output widths around the vector edges, row strides, dilations, a batch with a residual; bad taps rejected', async () => {
    // [cIn, cOut, kh, kw, sh, dh, dw, hp, wp]: ow = wp - (kw - 1) * dw, oh = (hp - 1 - (kh - 1) * dh) / sh + 1.
    const cases = [[3, 19, 3, 3, 1, 1, 1, 6, 19], [2, 5, 3, 2, 2, 2, 2, 11, 20], [2, 7, 1, 3, 1, 1, 1, 2, 132], [4, 16, 3, 3, 1, 1, 1, 5, 18],
      [1, 3, 2, 2, 1, 1, 1, 3, 33]] as const;
    for (const [ci, [cIn, cOut, kh, kw, sh, dh, dw, hp, wp]] of cases.entries()) {
      const batch = 2, k = cIn * kh * kw;
      const ow = wp - (kw - 1) * dw, oh = Math.floor((hp - 1 - (kh - 1) * dh) / sh) + 1, m = oh * ow;
      const b = rand(k * cOut, 40 + ci).map((v, i) => (i % 5 < 2 ? v : 0));  // [k, cOut]: B as gemm's
      const bias = rand(cOut, 50 + ci);
      const w = native().toSparse(b, k, cOut, 'csr', 0);
      const image = cIn * hp * wp;
      const x = rand(batch * image, 60 + ci), res = rand(batch * cOut * m, 70 + ci);
      const want = new Float32Array(batch * cOut * m), plain = new Float32Array(batch * cOut * m);
      for (let t = 0; t < batch; t++) for (let j = 0; j < cOut; j++) for (let oy = 0; oy < oh; oy++) for (let ox = 0; ox < ow; ox++) {
        let acc = bias[j]!;
        for (let c = 0; c < cIn; c++) for (let ky = 0; ky < kh; ky++) for (let kx = 0; kx < kw; kx++)
          acc += b[((c * kh + ky) * kw + kx) * cOut + j]! * x[t * image + c * hp * wp + (oy * sh + ky * dh) * wp + ox + kx * dw]!;
        const o = (t * cOut + j) * m + oy * ow + ox;
        want[o] = Math.max(0, acc + res[o]!);
        plain[o] = Math.max(0, acc);
      }
      const taps = { cIn, hp, wp, kh, kw, sh, dh, dw, oh, ow };
      const spec = (over: Record<string, unknown> = {}, aBytes = x.byteLength) => makeSpec(
        [input(0, aBytes), input(1, res.byteLength), output(0, want.byteLength), { kind: 'const', data: bias, bytes: cOut * 4 }],
        [{ node: 'S', op: 'spmm', weights: w, a: ref(0), c: ref(2), residual: ref(1), m, k, n: cOut, bias: ref(3),
          residualBeforeActivation: true, activation: 'relu', alpha: 0, beta: 0, batch, aStrides: [image, 1, 1], cStrides: [cOut * m, 1, m],
          taps, ...over } as PlanStep]);
      const got = new Float32Array(want.length);
      await runOnce(spec(), [x, res], [got]);
      expectClose(got, want, 1e-5);
      if (sh === 1) {
        // All oh rows as one row of (oh - 1) * wp + ow positions: output row oy at oy * wp, the
        // positions between rows (across the image's row ends) computed and discarded.
        const long = (oh - 1) * wp + ow;
        const wide = new Float32Array(batch * cOut * long);
        await runOnce(makeSpec([input(0, x.byteLength), output(0, wide.byteLength), { kind: 'const', data: bias, bytes: cOut * 4 }],
          [{ node: 'S', op: 'spmm', weights: w, a: ref(0), c: ref(1), m: long, k, n: cOut, bias: ref(2), residualBeforeActivation: false,
            activation: 'relu', alpha: 0, beta: 0, batch, aStrides: [image, 1, 1], cStrides: [cOut * long, 1, long], taps: { ...taps, oh: 1, ow: long } }]),
        [x], [wide]);
        const rows = new Float32Array(plain.length);
        for (let q = 0; q < batch * cOut; q++) for (let oy = 0; oy < oh; oy++) for (let ox = 0; ox < ow; ox++) rows[q * m + oy * ow + ox] = wide[q * long + oy * wp + ox]!;
        expectClose(rows, plain, 1e-5);
      }
      for (const sw of [1, 2]) {
        // The phased layout (strides folded into the image): phase (ry, rx) holds rows ry, ry + sh, ...
        // and columns rx, rx + sw, ... of each padded plane; output column ox reads padded column ox * sw + kx * dw.
        const hq = Math.ceil(hp / sh), wq = Math.ceil(wp / sw), plane = sh * sw * hq * wq;
        const pw = Math.floor((wp - 1 - (kw - 1) * dw) / sw) + 1, pm = oh * pw;
        const xph = new Float32Array(batch * cIn * plane);
        for (let t = 0; t < batch * cIn; t++) for (let yy = 0; yy < hp; yy++) for (let xx = 0; xx < wp; xx++)
          xph[t * plane + ((yy % sh) * sw + (xx % sw)) * hq * wq + Math.floor(yy / sh) * wq + Math.floor(xx / sw)] = x[t * hp * wp + yy * wp + xx]!;
        const wantP = new Float32Array(batch * cOut * pm);
        for (let t = 0; t < batch; t++) for (let j = 0; j < cOut; j++) for (let oy = 0; oy < oh; oy++) for (let ox = 0; ox < pw; ox++) {
          let acc = bias[j]!;
          for (let c = 0; c < cIn; c++) for (let ky = 0; ky < kh; ky++) for (let kx = 0; kx < kw; kx++)
            acc += b[((c * kh + ky) * kw + kx) * cOut + j]! * x[t * image + c * hp * wp + (oy * sh + ky * dh) * wp + ox * sw + kx * dw]!;
          wantP[(t * cOut + j) * pm + oy * pw + ox] = Math.max(0, acc);
        }
        const gotP = new Float32Array(wantP.length);
        await runOnce(makeSpec([input(0, xph.byteLength), output(0, gotP.byteLength), { kind: 'const', data: bias, bytes: cOut * 4 }],
          [{ node: 'S', op: 'spmm', weights: w, a: ref(0), c: ref(1), m: pm, k, n: cOut, bias: ref(2), residualBeforeActivation: false,
            activation: 'relu', alpha: 0, beta: 0, batch, aStrides: [cIn * plane, 1, 1], cStrides: [cOut * pm, 1, pm],
            taps: { ...taps, ow: pw, sw, phased: true } }]), [xph], [gotP]);
        expectClose(gotP, wantP, 1e-5);
      }
      if (ci > 0) { w.dispose(); continue; }
      expect(() => create(spec({ taps: { ...taps, sw: 2 } }))).toThrow(/sw > 1\) needs the phased layout/);
      expect(() => create(spec({ taps: { ...taps, kw: kw + 1 } }))).toThrow(/cIn \* kh \* kw must equal k/);
      expect(() => create(spec({ taps: { ...taps, oh: oh - 1 } }))).toThrow(/oh \* ow must equal m/);
      expect(() => create(spec({ taps: { ...taps, hp: hp - 1 } }))).toThrow(/reaches past the padded image/);
      const long = hp * wp - 2 * wp - 1;  // one row reading one element past the image
      expect(() => create(spec({ taps: { ...taps, oh: 1, ow: long }, m: long, cStrides: [cOut * long, 1, long] }))).toThrow(/reaches past the padded image/);
      expect(() => create(spec({ taps: { ...taps, sh: 0 } }))).toThrow(/non-zero/);
      expect(() => create(spec({ taps: { ...taps, kh: 0, kw: kw * kh } }))).toThrow(/non-zero/);  // taps given: kh = 0 is no "no taps"
      expect(() => create(spec({ taps: { ...taps, dw: wp } }))).toThrow(/kernel reaches past the padded image/);
      // Sizes near 2^53 must fail, not wrap into a window that passes the bounds check.
      expect(() => create(spec({ taps: { ...taps, sh: 2 ** 52 } }))).toThrow(/sizes overflow|reaches past/);
      expect(() => create(spec({ taps: { ...taps, hp: 2 ** 40, wp: 2 ** 30 } }))).toThrow(/sizes overflow|exceeds 2\^32/);
      expect(() => create(spec({ taps: { ...taps, sh: 2, sw: 2 ** 52, phased: true } }))).toThrow(/sizes overflow|reaches past|exceeds 2\^32/);
      expect(() => create(spec({ aStrides: [m * k, k, 1], cStrides: [m * cOut, cOut, 1] }))).toThrow(/writes column-major c/);
      expect(() => create(spec({}, x.byteLength - 4))).toThrow(/a reaches elements/);
      const bsr = native().toSparse(b, k, cOut, 'bsr', 8);
      expect(() => create(spec({ weights: bsr }))).toThrow(/needs? CSR weights/);
      bsr.dispose();
      w.dispose();
    }
  });

  it('spmm step: runs sparse weights with bias + ReLU against a scalar loop; rejects mismatched k/n, gemm weights, a disposed handle', async () => {
    const [m, k, n] = [3, 37, 21];
    const b = rand(k * n, 21).map((v, i) => (i % 3 ? 0 : v));
    const bias = rand(n, 22);
    const w = native().toSparse(b, k, n, 'csr', 0);
    const spec = (kk: number, nn: number, weights: unknown = w) => makeSpec([input(0, m * k * 4), output(0, m * n * 4),
      { kind: 'const', data: bias, bytes: n * 4 }], [{ node: 'S', op: 'spmm', weights: weights as never, a: ref(0), c: ref(1), m, k: kk, n: nn,
      bias: ref(2), residualBeforeActivation: false, activation: 'relu', alpha: 0, beta: 0 }]);
    const a = rand(m * k, 23);
    const c = new Float32Array(m * n);
    await runOnce(spec(k, n), [a], [c]);
    const want = new Float32Array(m * n);
    for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) {
      let acc = bias[j]!;
      for (let q = 0; q < k; q++) acc += a[i * k + q]! * b[q * n + j]!;
      want[i * n + j] = Math.max(0, acc);
    }
    expectClose(c, want, 1e-5);
    expect(() => create(spec(k + 1, n))).toThrow(/sparse weights are 37 x 21, the step says k = 38/);
    const packed = native().packGemmWeights(b, k, n, 'auto');
    expect(() => create(spec(k, n, packed))).toThrow(/weights must be sparse weights/);
    // skipWeights: the layer's dense weights for batch-1 rows, so m = 1 and the same k x n only.
    const withSkip = (mm: number, skip: unknown) => makeSpec([input(0, mm * k * 4), output(0, mm * n * 4)],
      [{ node: 'S', op: 'spmm', weights: w, a: ref(0), c: ref(1), m: mm, k, n, residualBeforeActivation: false, activation: 'none',
        alpha: 0, beta: 0, skipWeights: skip as never }]);
    const x1 = rand(k, 24).map((v, i) => (i % 10 ? 0 : v));  // 90% zeros: the skipping GEMV runs
    const [viaSkip, viaSpmv] = [new Float32Array(n), new Float32Array(n)];
    await runOnce(withSkip(1, packed), [x1], [viaSkip]);
    await runOnce(withSkip(1, undefined), [x1], [viaSpmv]);
    const want1 = new Float32Array(n).map((_, j) => { let acc = 0; for (let q = 0; q < k; q++) acc += x1[q]! * b[q * n + j]!; return acc; });
    expectClose(viaSkip, want1, 1e-5);
    expectClose(viaSpmv, want1, 1e-5);
    expect(() => create(withSkip(2, packed))).toThrow(/skipWeights must be the layer's k x n weights, for m = 1 only/);
    const other = native().packGemmWeights(rand((k + 1) * n, 25), k + 1, n, 'auto');
    expect(() => create(withSkip(1, other))).toThrow(/skipWeights must be the layer's k x n weights/);
    expect(() => create(withSkip(1, w))).toThrow(/skipWeights must be packed fp32 GEMM weights/);
    other.dispose();
    packed.dispose();
    w.dispose();
    expect(() => create(spec(k, n))).toThrow(DisposedError);
  });

  it('rejects wrong input counts, byte lengths and views (InvalidArgumentError)', async () => {
    const plan = create(makeSpec([input(0, 40), output(0, 40)], [copy(ref(0), ref(1), [10], [1])]));
    const y = new Float32Array(10);
    await expect(run(plan, [], [y])).rejects.toThrow(/takes 1 inputs, got 0/);
    await expect(run(plan, [new Float32Array(9)], [y])).rejects.toThrow(/inputs\[0\] has 36 bytes, the plan expects 40/);
    await expect(run(plan, [new Float32Array(10)], [new Float32Array(11)])).rejects.toThrow(InvalidArgumentError);
    await expect(run(plan, [[1, 2] as unknown as Float32Array], [y])).rejects.toThrow(/must be a TypedArray/);
    // Steps read input 0 as float32: a view that does not start on a 4-byte boundary is refused.
    await expect(run(plan, [new Uint8Array(41).subarray(1)], [y])).rejects.toThrow(/multiple of 4 bytes/);
    // A DataView over the right bytes is an ArrayBufferView too.
    const x = rand(10, 9);
    await run(plan, [new DataView(x.buffer)], [y]);
    expect([...y]).toEqual([...x]);
    plan.dispose();
  });
});

describe('plan in worker_threads', () => {
  // A worker loads the addon itself and runs `steps` 128^3 matmuls of an input with itself.
  const workerCode = `
    const { parentPort, workerData } = require('node:worker_threads');
    const b = require(require.resolve('node-gyp-build', { paths: [workerData.root] }))(workerData.root);
    const d = 128, steps = [];
    for (let s = 0; s < workerData.steps; s++) steps.push({ node: 'MM' + s, op: 'matmul', a: { buffer: 0, offset: 0 },
      b: { buffer: 0, offset: 0 }, c: { buffer: 1, offset: 0 }, batchDims: [], aBatchStrides: [], bBatchStrides: [],
      m: d, k: d, n: d, transB: false });
    const plan = b.createPlan({ buffers: [{ kind: 'input', index: 0, bytes: d * d * 4 }, { kind: 'output', index: 0, bytes: d * d * 4 }],
      steps, arenaBytes: 0, inputBytes: [d * d * 4], outputBytes: [d * d * 4] });
    const c = new Float32Array(d * d);
    parentPort.postMessage({ running: true });
    b.planRun(plan, [workerData.a], [c], 0).then(() => parentPort.postMessage({ c }));
  `;
  const start = (a: Float32Array, steps: number) => {
    const worker = new Worker(workerCode, { eval: true, workerData: { root: packageRoot, a, steps } });
    const running = new Promise<void>((resolve) => worker.on('message', (m: { running?: boolean }) => m.running && resolve()));
    const result = new Promise<Float32Array>((resolve, reject) => {
      worker.on('message', (m: { c?: Float32Array }) => m.c && resolve(m.c));
      worker.once('error', reject);
    });
    return { worker, running, result };
  };

  it('runs in a worker, and terminating a worker mid-run leaves other runs working', async () => {
    const d = 128, a = rand(d * d, 161);
    const victim = start(a, 20000);
    victim.result.catch(() => {});
    const other = start(a, 2);
    await victim.running;
    await new Promise((r) => setTimeout(r, 50));
    expect(await victim.worker.terminate()).toBe(1);
    expectClose(await other.result, gemmRef(a, a, d, d, d), 1e-4);
    await other.worker.terminate();
  });
});
