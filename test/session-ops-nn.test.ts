// Each nn and elementwise op of the session compiler against onnxruntime-node, on one-node graphs
// built here, across attribute edge cases. Tolerances: elementwise ops are a few ulp apart (both
// libraries use polynomial approximations of exp/tanh/erf); reductions of length K differ by at most
// the classic (K + 2) u sum|terms| bound on each side, and inputs in [-1, 1) make sum|terms| <= K.
import { describe, it } from 'vitest';
import { Tensor } from '../dist/index.js';
import { GraphBuilder, floatAttr } from '../bench/graphs/builder.js';
import { U, expectMatchesOrt, uniform } from './session-ort.js';

const dotTol = (k: number) => ({ atol: 2 * (k + 2) * k * U, rtol: 4 * U });

function oneNode(opType: string, inputs: { name: string; t: Tensor; init?: boolean }[], attrs: Record<string, unknown> = {},
  { opset = 17, outputs = 1, outDtypes = ['float32'] as string[] } = {}) {
  const g = new GraphBuilder(opType, { opset });
  const names = inputs.map(({ name, t, init }) => {
    if (name === '') return '';
    if (init) return g.init(name, { dtype: t.dtype, dims: [...t.dims], data: t.data });
    g.input(name, t.dtype, [...t.dims]);
    return name;
  });
  const outs = g.node(opType, names, attrs, outputs);
  outs.forEach((o: string, i: number) => g.output(o, outDtypes[i] ?? 'float32'));
  const feeds: Record<string, Tensor> = {};
  for (const { name, t, init } of inputs) if (name && !init) feeds[name] = t;
  return { bytes: g.toBytes(), feeds };
}

describe('unary ops against onnxruntime-node', () => {
  const x = uniform([3, 7, 5], 3, -4, 4);
  const pos = uniform([3, 7, 5], 4, 0.01, 9);
  const cases: [string, Tensor, Record<string, unknown>, number?][] = [
    ['Relu', x, {}], ['LeakyRelu', x, {}], ['LeakyRelu', x, { alpha: 0.3 }], ['Sigmoid', x, {}], ['Tanh', x, {}],
    ['HardSigmoid', x, {}], ['HardSigmoid', x, { alpha: 0.1, beta: 0.4 }], ['HardSwish', x, {}], ['Erf', x, {}],
    ['Exp', x, {}], ['Log', pos, {}], ['Sqrt', pos, {}], ['Neg', x, {}], ['Abs', x, {}],
    ['Clip', x, { min: floatAttr(-1.5), max: floatAttr(2) }, 10], ['Clip', x, { min: floatAttr(0) }, 7],
    ['Gelu', x, {}, 20], ['Gelu', x, { approximate: 'tanh' }, 20],
  ];
  for (const [op, t, attrs, opset] of cases) {
    it(`${op} ${JSON.stringify(attrs)}`, async () => {
      const { bytes, feeds } = oneNode(op, [{ name: 'x', t }], attrs, { opset: opset ?? 17 });
      await expectMatchesOrt(bytes, feeds, { atol: 4e-7, rtol: 16 * U, label: op });
    });
  }

  it('Clip (opset 13) with min/max inputs, each optional', async () => {
    for (const [lo, hi] of [[-0.5, 1.25], [undefined, 0.5], [-2, undefined]] as const) {
      const ins = [{ name: 'x', t: x },
        { name: lo === undefined ? '' : 'lo', t: new Tensor('float32', Float32Array.of(lo ?? 0), []), init: true },
        ...(hi === undefined ? [] : [{ name: 'hi', t: new Tensor('float32', Float32Array.of(hi), []), init: true }])];
      const { bytes, feeds } = oneNode('Clip', ins, {}, { opset: 13 });
      await expectMatchesOrt(bytes, feeds, { label: `Clip ${lo} ${hi}` });
    }
  });

  it('Not on bool, and odd sizes (1 and 17 elements)', async () => {
    const b = new Tensor('bool', Uint8Array.from([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1]), [17]);
    const n = oneNode('Not', [{ name: 'b', t: b }], {}, { outDtypes: ['bool'] });
    await expectMatchesOrt(n.bytes, n.feeds);
    const one = oneNode('Sigmoid', [{ name: 'x', t: uniform([1], 9) }]);
    await expectMatchesOrt(one.bytes, one.feeds, { atol: 1e-7, rtol: 8 * U });
  });
});

describe('binary ops with broadcasting against onnxruntime-node', () => {
  const shapes: [number[], number[]][] = [
    [[2, 3, 4], [2, 3, 4]], [[2, 3, 4], [4]], [[4], [2, 3, 4]], [[3, 1], [2, 1, 5]], [[2, 1, 5], [3, 1]],
    [[1], [2, 3]], [[], [3]], [[5, 1, 1, 3], [1, 4, 2, 1]], [[17], [1]],
  ];
  for (const op of ['Add', 'Sub', 'Mul', 'Div', 'Pow', 'Equal', 'Less', 'Greater']) {
    it(`${op} over ${shapes.length} shape pairs`, async () => {
      for (const [sa, sb] of shapes) {
        const lo = op === 'Pow' || op === 'Div' ? 0.5 : -2;
        const a = uniform(sa, 11, lo, 2);
        // Equal needs equal values somewhere: b reuses a's first values where it can.
        const b = op === 'Equal' ? new Tensor('float32', Float32Array.from({ length: uniform(sb).size }, (_, i) => (i % 2 ? a.data[i % a.size]! : 0.25)), sb) : uniform(sb, 12, lo, 2);
        const cmp = ['Equal', 'Less', 'Greater'].includes(op);
        const { bytes, feeds } = oneNode(op, [{ name: 'a', t: a }, { name: 'b', t: b }], {}, { outDtypes: [cmp ? 'bool' : 'float32'] });
        await expectMatchesOrt(bytes, feeds, { atol: 1e-7, rtol: op === 'Pow' ? 16 * U : 2 * U, label: `${op} [${sa}] [${sb}]` });
      }
    });
  }

  it('int64 Add and Mul at run time, and a constant operand', async () => {
    const a = new Tensor('int64', BigInt64Array.from([1n, -2n, 3n, 40n, 5n, -6n]), [2, 3]);
    for (const op of ['Add', 'Mul', 'Sub']) {
      const { bytes, feeds } = oneNode(op, [{ name: 'a', t: a }, { name: 'c', t: new Tensor('int64', BigInt64Array.from([7n, -1n, 2n]), [3]), init: true }],
        {}, { outDtypes: ['int64'] });
      await expectMatchesOrt(bytes, feeds, { atol: 0, rtol: 0, label: op });
    }
  });
});

describe('Conv against onnxruntime-node', () => {
  const cases: { x: number[]; w: number[]; attrs?: Record<string, unknown>; bias?: boolean }[] = [
    { x: [1, 3, 8, 8], w: [4, 3, 3, 3], attrs: { pads: [1, 1, 1, 1] }, bias: true },
    { x: [2, 3, 9, 7], w: [5, 3, 3, 3], attrs: { strides: [2, 2] } },
    { x: [1, 2, 11, 9], w: [3, 2, 3, 2], attrs: { dilations: [2, 3], pads: [2, 1, 0, 1] }, bias: true },
    { x: [1, 4, 7, 7], w: [6, 2, 3, 3], attrs: { group: 2, pads: [1, 1, 1, 1] }, bias: true },
    { x: [1, 5, 6, 6], w: [5, 1, 3, 3], attrs: { group: 5, auto_pad: 'SAME_UPPER', strides: [2, 2] } },
    { x: [1, 3, 7, 6], w: [2, 3, 2, 3], attrs: { auto_pad: 'SAME_LOWER' }, bias: true },
    { x: [1, 3, 7, 6], w: [2, 3, 3, 3], attrs: { auto_pad: 'VALID', strides: [1, 2] } },
    { x: [3, 17, 5, 5], w: [9, 17, 1, 1], bias: true },
    { x: [1, 1, 1, 1], w: [1, 1, 1, 1] },
    { x: [2, 3, 13], w: [4, 3, 3], attrs: { pads: [1, 2], strides: [2] }, bias: true },
  ];
  for (const c of cases) {
    it(`x [${c.x}] w [${c.w}] ${JSON.stringify(c.attrs ?? {})}${c.bias ? ' + bias' : ''}`, async () => {
      const ins = [{ name: 'x', t: uniform(c.x, 21) }, { name: 'w', t: uniform(c.w, 22), init: true },
        ...(c.bias ? [{ name: 'b', t: uniform([c.w[0]!], 23), init: true }] : [])];
      const { bytes, feeds } = oneNode('Conv', ins, c.attrs ?? {});
      const k = c.w.slice(1).reduce((a, b) => a * b, 1) + 1;
      await expectMatchesOrt(bytes, feeds, dotTol(k));
    });
  }

  it("precision 'bf16' stays within bf16 weight rounding of onnxruntime-node's fp32", async () => {
    const { bytes, feeds } = oneNode('Conv', [{ name: 'x', t: uniform([1, 8, 6, 6], 31) }, { name: 'w', t: uniform([8, 8, 3, 3], 32), init: true }],
      { pads: [1, 1, 1, 1] });
    // Each weight moves by at most 2^-9 relative (bf16 keeps 8 significant bits; rounding, half an ulp),
    // so each output by at most 2^-9 sum|terms| <= 2^-9 K (+ the fp32 bound).
    const k = 72;
    await expectMatchesOrt(bytes, feeds, { atol: 2 ** -9 * k + dotTol(k).atol, rtol: 0, options: { precision: 'bf16' } });
  });
});

describe('Gemm and MatMul against onnxruntime-node', () => {
  const M = 5;
  const K = 7;
  const N = 9;
  const cases: { attrs: Record<string, unknown>; c?: number[]; bRuntime?: boolean }[] = [
    { attrs: {} }, { attrs: { transB: 1 } }, { attrs: { transA: 1 } }, { attrs: { transA: 1, transB: 1 }, c: [N] },
    { attrs: { alpha: 0.5, beta: floatAttr(2) }, c: [N] }, { attrs: { beta: 0.5 }, c: [1, N] }, { attrs: {}, c: [M, 1] },
    { attrs: { alpha: 1.5 }, c: [M, N] }, { attrs: {}, c: [] }, { attrs: { transB: 1, alpha: floatAttr(2), beta: floatAttr(3) }, c: [N], bRuntime: true },
    { attrs: { transA: 1 }, c: [M, N], bRuntime: true },
  ];
  for (const c of cases) {
    it(`Gemm ${JSON.stringify(c.attrs, (k, v) => (v && typeof v === 'object' && 'v' in v ? v.v : v))} C [${c.c ?? 'none'}]${c.bRuntime ? ', B at run time' : ''}`, async () => {
      const a = uniform(c.attrs.transA ? [K, M] : [M, K], 41);
      const b = uniform(c.attrs.transB ? [N, K] : [K, N], 42);
      const ins = [{ name: 'a', t: a }, { name: 'b', t: b, init: !c.bRuntime },
        ...(c.c ? [{ name: 'c', t: uniform(c.c, 43), init: true }] : [])];
      const { bytes, feeds } = oneNode('Gemm', ins, c.attrs, { opset: 13 });
      await expectMatchesOrt(bytes, feeds, { atol: 8 * dotTol(K + 1).atol, rtol: 8 * U });
    });
  }

  const mm: { a: number[]; b: number[]; init?: boolean }[] = [
    { a: [3, 4, 6], b: [6, 5], init: true }, { a: [6], b: [6, 5], init: true }, { a: [1, 6], b: [6, 1], init: true },
    { a: [2, 1, 3, 4], b: [5, 4, 6] }, { a: [4], b: [2, 4, 3] }, { a: [2, 3, 4], b: [4] }, { a: [7], b: [7] },
    { a: [3, 2, 5], b: [3, 5, 4] }, { a: [1, 17], b: [17, 33] },
  ];
  for (const c of mm) {
    it(`MatMul [${c.a}] x [${c.b}]${c.init ? ' (B an initializer)' : ''}`, async () => {
      const { bytes, feeds } = oneNode('MatMul', [{ name: 'a', t: uniform(c.a, 51) }, { name: 'b', t: uniform(c.b, 52), init: c.init }]);
      const k = c.a[c.a.length - 1]!;
      await expectMatchesOrt(bytes, feeds, dotTol(k));
    });
  }
});

describe('pooling against onnxruntime-node', () => {
  const cases: [string, number[], Record<string, unknown>][] = [
    ['MaxPool', [1, 3, 8, 8], { kernel_shape: [2, 2], strides: [2, 2] }],
    ['MaxPool', [2, 2, 7, 9], { kernel_shape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1] }],
    ['MaxPool', [1, 2, 7, 7], { kernel_shape: [2, 2], strides: [2, 2], ceil_mode: 1 }],
    ['MaxPool', [1, 2, 9, 9], { kernel_shape: [3, 3], dilations: [2, 2] }],
    ['MaxPool', [1, 2, 7, 6], { kernel_shape: [3, 3], strides: [2, 2], auto_pad: 'SAME_UPPER' }],
    ['MaxPool', [1, 2, 7, 6], { kernel_shape: [2, 2], strides: [2, 2], auto_pad: 'SAME_LOWER' }],
    ['MaxPool', [2, 3, 11], { kernel_shape: [3], strides: [2], pads: [1, 1] }],
    ['AveragePool', [1, 3, 8, 8], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] }],
    ['AveragePool', [1, 3, 8, 8], { kernel_shape: [3, 3], pads: [1, 1, 1, 1], count_include_pad: 1 }],
    ['AveragePool', [1, 2, 7, 7], { kernel_shape: [2, 2], strides: [2, 2], ceil_mode: 1 }],
    ['AveragePool', [1, 2, 5, 6], { kernel_shape: [2, 3], auto_pad: 'VALID', strides: [1, 2] }],
  ];
  for (const [op, dims, attrs] of cases) {
    it(`${op} [${dims}] ${JSON.stringify(attrs)}`, async () => {
      const { bytes, feeds } = oneNode(op, [{ name: 'x', t: uniform(dims, 61) }], attrs, { opset: op === 'MaxPool' ? 12 : 17 });
      await expectMatchesOrt(bytes, feeds, { atol: 1e-6, rtol: 4 * U });
    });
  }

  it('GlobalAveragePool over 4-D and 3-D inputs', async () => {
    for (const dims of [[2, 5, 7, 3], [1, 3, 9], [1, 1, 1, 1]]) {
      const { bytes, feeds } = oneNode('GlobalAveragePool', [{ name: 'x', t: uniform(dims, 62) }]);
      await expectMatchesOrt(bytes, feeds, { atol: 1e-6, rtol: 4 * U });
    }
  });
});

describe('normalisation and softmax against onnxruntime-node', () => {
  for (const [op, opset, axis] of [['Softmax', 11, undefined], ['Softmax', 11, 2], ['Softmax', 11, -1], ['Softmax', 13, undefined],
    ['Softmax', 13, 1], ['Softmax', 13, -3], ['LogSoftmax', 11, 1], ['LogSoftmax', 13, -2], ['LogSoftmax', 13, 0]] as const) {
    it(`${op} opset ${opset} axis ${axis ?? 'default'}`, async () => {
      const { bytes, feeds } = oneNode(op, [{ name: 'x', t: uniform([2, 3, 4, 5], 71, -3, 3) }], axis === undefined ? {} : { axis }, { opset });
      await expectMatchesOrt(bytes, feeds, { atol: 2e-6, rtol: 32 * U });
    });
  }

  it('BatchNormalization (not folded) on 4-D and 2-D inputs', async () => {
    for (const dims of [[2, 3, 4, 5], [4, 3]]) {
      const c = 3;
      const ins = [{ name: 'x', t: uniform(dims, 81) }, { name: 's', t: uniform([c], 82), init: true }, { name: 'b', t: uniform([c], 83), init: true },
        { name: 'm', t: uniform([c], 84), init: true }, { name: 'v', t: uniform([c], 85, 0.1, 2), init: true }];
      const { bytes, feeds } = oneNode('BatchNormalization', ins, { epsilon: floatAttr(1e-3) }, { opset: 15 });
      await expectMatchesOrt(bytes, feeds, { atol: 1e-6, rtol: 8 * U });
    }
  });

  it('LayerNormalization: last axis, axis 1, without bias', async () => {
    for (const [axis, withBias] of [[-1, true], [1, true], [-1, false]] as const) {
      const dims = [2, 3, 8];
      const norm = dims.slice(axis < 0 ? dims.length + axis : axis);
      const ins = [{ name: 'x', t: uniform(dims, 91, -2, 3) }, { name: 's', t: uniform(norm, 92), init: true },
        ...(withBias ? [{ name: 'b', t: uniform(norm, 93), init: true }] : [])];
      const { bytes, feeds } = oneNode('LayerNormalization', ins, { axis, epsilon: floatAttr(1e-5) }, { opset: 17 });
      await expectMatchesOrt(bytes, feeds, { atol: 4e-6, rtol: 32 * U, label: `axis ${axis}` });
    }
  });
});

