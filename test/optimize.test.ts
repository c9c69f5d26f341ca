/**
 * The load-time optimiser (lib/session/optimize.ts). Each graph is built with the bench graph
 * builder, parsed, optimised, and checked twice:
 *  - structure: which nodes remain, which fused nodes exist and with which attributes;
 *  - numerics: the optimised graph is written back to ONNX, each sonde.Fused* node spelled out in
 *    standard ops as lib/session/fused.ts defines it (GELU as onnxruntime's own com.microsoft Gelu /
 *    FastGelu), and run by onnxruntime-node next to the original graph on the same input. Folded BN
 *    weights are also compared with a float64 computation written here.
 */
import { describe, expect, it } from 'vitest';
import ort from 'onnxruntime-node';
import { InvalidArgumentError, Tensor } from '../dist/index.js';
import { parseModel, type OnnxGraph, type OnnxNode } from '../dist/onnx/model.js';
import { optimize } from '../dist/session/optimize.js';
import { GraphBuilder, floatAttr, randomTensor, float32Tensor, int64Tensor } from '../bench/graphs/builder.js';

type Level = 'none' | 'basic' | 'all';
type Builder = InstanceType<typeof GraphBuilder>;

function load(b: Builder): { graph: OnnxGraph; opset: number; bytes: Uint8Array } {
  const bytes = b.toBytes() as Uint8Array;
  const model = parseModel(bytes);
  return { graph: model.graph, opset: model.opset, bytes };
}

const ops = (g: OnnxGraph): string[] => g.nodes.map((n) => (n.domain ? `${n.domain}.${n.opType}` : n.opType));
const only = (g: OnnxGraph, opType: string): OnnxNode[] => g.nodes.filter((n) => n.opType === opType);

/** Every node reads only graph inputs, initializers or outputs of nodes before it. */
function expectTopological(g: OnnxGraph): void {
  const known = new Set<string>([...g.inputs.map((i) => i.name), ...g.initializers.keys()]);
  for (const n of g.nodes) {
    for (const v of n.inputs) if (v) expect(known.has(v), `${n.name} reads ${v} before it exists`).toBe(true);
    for (const o of n.outputs) if (o) known.add(o);
  }
  for (const o of g.outputs) expect(known.has(o.name)).toBe(true);
}

// ---------------------------------------------------------------------------------------------
// The optimised graph back to ONNX, fused nodes spelled out.

const FLOAT_ATTRS = new Set(['epsilon', 'alpha', 'beta', 'min', 'max', 'ratio', 'momentum']);

function attrsOf(n: OnnxNode): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(n.attributes)) {
    if (v instanceof Tensor) out[k] = { dtype: v.dtype, dims: [...v.dims], data: v.data };
    else if (typeof v === 'number' && FLOAT_ATTRS.has(k)) out[k] = floatAttr(v);
    else out[k] = v;
  }
  return out;
}

function toOnnx(g: OnnxGraph, opset: number): Uint8Array {
  const b = new GraphBuilder('optimised', { opset, extraOpsets: { 'com.microsoft': 1 } });
  for (const i of g.inputs) b.input(i.name, i.dtype, i.shape);
  for (const [name, t] of g.initializers) b.init(name, { dtype: t.dtype, dims: [...t.dims], data: t.data });
  for (const n of g.nodes) {
    if (n.domain === 'sonde') spellOut(b, n, g, opset);
    // Standard Gelu exists from opset 20; before that onnxruntime has it as a contrib op.
    else if (n.opType === 'Gelu' && opset < 20) activation(b, n.inputs[0]!, { activation: n.attributes.approximate === 'tanh' ? 'geluTanh' : 'gelu' }, opset, n.outputs[0]!);
    else b.node(n.opType, n.inputs, attrsOf(n), n.outputs, { name: n.name, domain: n.domain });
  }
  for (const o of g.outputs) b.output(o.name, o.dtype, o.shape);
  return b.toBytes() as Uint8Array;
}

function activation(b: Builder, x: string, attrs: OnnxNode['attributes'], opset: number, out: string): void {
  const act = (attrs.activation as string | undefined) ?? 'none';
  const alpha = attrs.alpha as number;
  const beta = attrs.beta as number;
  switch (act) {
    case 'none': b.node('Identity', [x], {}, [out]); return;
    case 'relu': b.node('Relu', [x], {}, [out]); return;
    case 'sigmoid': b.node('Sigmoid', [x], {}, [out]); return;
    case 'leakyRelu': b.node('LeakyRelu', [x], { alpha: floatAttr(alpha) }, [out]); return;
    case 'hardSwish': b.node('HardSwish', [x], {}, [out]); return;
    case 'silu': b.node('Mul', [x, b.node('Sigmoid', [x])[0]], {}, [out]); return;
    case 'clip':
      if (opset < 11) b.node('Clip', [x], { min: floatAttr(alpha), max: floatAttr(beta) }, [out]);
      else b.node('Clip', [x, b.init(b.fresh('lo'), float32Tensor([alpha], [])), b.init(b.fresh('hi'), float32Tensor([beta], []))], {}, [out]);
      return;
    case 'gelu': b.node('Gelu', [x], {}, [out], { domain: 'com.microsoft' }); return;
    case 'geluTanh': b.node('FastGelu', [x], {}, [out], { domain: 'com.microsoft' }); return;
    default: throw new Error(`unknown activation ${act}`);
  }
}

/** sonde.FusedConv / sonde.FusedGemm as lib/session/fused.ts defines them, in standard ops. */
function spellOut(b: Builder, n: OnnxNode, g: OnnxGraph, opset: number): void {
  const [x, w, bias, r] = n.inputs;
  let y: string;
  if (n.opType === 'FusedConv') {
    const convAttrs = attrsOf(n);
    for (const k of ['activation', 'alpha', 'beta', 'residual_before_activation']) delete convAttrs[k];
    [y] = b.node('Conv', bias ? [x, w, bias] : [x, w], convAttrs);
  } else {
    let wName = w!;
    if (n.attributes.trans_b === 1) {
      const t = g.initializers.get(w!)!;
      const [rows, cols] = t.dims as [number, number];
      const src = t.data as Float32Array;
      const tr = new Float32Array(src.length);
      for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) tr[j * rows + i] = src[i * cols + j]!;
      wName = b.init(b.fresh('bt'), { dtype: 'float32', dims: [cols, rows], data: tr });
    }
    [y] = b.node('MatMul', [x, wName]);
    if (bias) [y] = b.node('Add', [y, bias]);
  }
  const before = r && n.attributes.residual_before_activation === 1;
  if (before) [y] = b.node('Add', [y, r]);
  const actOut = r && !before ? b.fresh('act') : n.outputs[0]!;
  activation(b, y!, n.attributes, opset, actOut);
  if (r && !before) b.node('Add', [actOut, r], {}, [n.outputs[0]!]);
}

// ---------------------------------------------------------------------------------------------

async function runOrt(bytes: Uint8Array, feeds: Record<string, Tensor>): Promise<Record<string, Float32Array>> {
  const session = await ort.InferenceSession.create(bytes, { graphOptimizationLevel: 'disabled', intraOpNumThreads: 1 });
  const ortFeeds: Record<string, ort.Tensor> = {};
  for (const [k, t] of Object.entries(feeds)) ortFeeds[k] = new ort.Tensor('float32', t.data as Float32Array, [...t.dims]);
  const out = await session.run(ortFeeds);
  await session.release();
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, v.data as Float32Array]));
}

/**
 * Runs the original and the optimised graph (every level) in onnxruntime and compares. Rewrites
 * only reassociate a few float32 operations per element (BN folded into weights rounds W*s once
 * instead of (W.x)*s), so the bound is a small multiple of float32 epsilon times the output scale.
 */
async function expectSameOutputs(b: Builder, feeds: Record<string, Tensor>, levels: Level[] = ['none', 'basic', 'all']): Promise<Record<Level, OnnxGraph>> {
  const { graph, opset, bytes } = load(b);
  const want = await runOrt(bytes, feeds);
  const graphs = {} as Record<Level, OnnxGraph>;
  for (const level of levels) {
    const opt = optimize(graph, level, opset);
    graphs[level] = opt;
    expectTopological(opt);
    expect(opt.inputs.map((i) => i.name)).toEqual(graph.inputs.map((i) => i.name));
    expect(opt.outputs.map((o) => o.name)).toEqual(graph.outputs.map((o) => o.name));
    const got = await runOrt(toOnnx(opt, opset), feeds);
    for (const [name, ref] of Object.entries(want)) {
      const out = got[name]!;
      expect(out.length, `${level} ${name}`).toBe(ref.length);
      const scale = ref.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      let worst = 0;
      for (let i = 0; i < ref.length; i++) worst = Math.max(worst, Math.abs(out[i]! - ref[i]!));
      expect(worst, `level '${level}', output ${name}`).toBeLessThanOrEqual(64 * 2 ** -24 * Math.max(scale, 1));
    }
  }
  return graphs;
}

const input = (dims: number[], seed = 7): Tensor => {
  const t = randomTensor(dims, { seed });
  return new Tensor('float32', t.data, dims);
};

/** A BatchNormalization over `c` channels with random statistics (positive variance). */
function bn(b: Builder, x: string, c: number, seed: number, eps?: number): string {
  const gamma = b.init(b.fresh('gamma'), randomTensor([c], { seed, scale: 2 }));
  const beta = b.init(b.fresh('beta'), randomTensor([c], { seed: seed + 1 }));
  const mean = b.init(b.fresh('mean'), randomTensor([c], { seed: seed + 2 }));
  const v = randomTensor([c], { seed: seed + 3 });
  for (let i = 0; i < c; i++) v.data[i] = Math.abs(v.data[i]) + 0.1;
  const variance = b.init(b.fresh('var'), v);
  return b.node('BatchNormalization', [x, gamma, beta, mean, variance], eps === undefined ? {} : { epsilon: floatAttr(eps) })[0];
}

function conv(b: Builder, x: string, cin: number, cout: number, seed: number, { k = 3, bias = true, stride = 1 } = {}): string {
  const w = b.init(b.fresh('w'), randomTensor([cout, cin, k, k], { seed, scale: 0.5 }));
  const ins = [x, w];
  if (bias) ins.push(b.init(b.fresh('b'), randomTensor([cout], { seed: seed + 100 })));
  const p = (k - 1) >> 1;
  return b.node('Conv', ins, { kernel_shape: [k, k], pads: [p, p, p, p], strides: [stride, stride] })[0];
}

// ---------------------------------------------------------------------------------------------

describe('optimize: levels and arguments', () => {
  it("rejects an unknown level with InvalidArgumentError naming the option", () => {
    const b = new GraphBuilder('g');
    b.input('x', 'float32', [2]);
    b.node('Relu', ['x'], {}, ['y']);
    b.output('y', 'float32', [2]);
    const { graph, opset } = load(b);
    expect(() => optimize(graph, 'fast' as Level, opset)).toThrow(InvalidArgumentError);
    expect(() => optimize(graph, 'fast' as Level, opset)).toThrow(/optimization must be one of 'none', 'basic', 'all'/);
  });

  it("'none' keeps every node, including Identity and dead ones", () => {
    const b = new GraphBuilder('g');
    b.input('x', 'float32', [2]);
    const [i] = b.node('Identity', ['x']);
    b.node('Neg', ['x']); // dead
    b.node('Relu', [i], {}, ['y']);
    b.output('y', 'float32', [2]);
    const { graph, opset } = load(b);
    expect(ops(optimize(graph, 'none', opset))).toEqual(ops(graph));
  });
});

describe('optimize: basic', () => {
  it('removes an Identity/Dropout chain, keeping the graph output name', async () => {
    for (const opset of [11, 13]) {
      const b = new GraphBuilder('chain', { opset });
      b.input('x', 'float32', [2, 5]);
      const [a] = b.node('Identity', ['x']);
      const [r] = b.node('Sigmoid', [a]);
      const [d] = b.node('Dropout', [r], opset < 12 ? { ratio: floatAttr(0.3) } : {}, 2); // mask unused
      const [i2] = b.node('Identity', [d]);
      b.node('Identity', [i2], {}, ['y']);
      b.output('y', 'float32', [2, 5]);
      const g = await expectSameOutputs(b, { x: input([2, 5]) });
      expect(ops(g.basic)).toEqual(['Sigmoid']);
      expect(g.basic.nodes[0]!.inputs).toEqual(['x']);
      expect(g.basic.nodes[0]!.outputs).toEqual(['y']);
      expect(ops(g.all)).toEqual(['Sigmoid']);
      expect(ops(g.none)).toEqual(['Identity', 'Sigmoid', 'Dropout', 'Identity', 'Identity']);
    }
  });

  it('keeps an Identity from a graph input to a graph output, and a Dropout whose mask is read', async () => {
    const b = new GraphBuilder('keep', { opset: 11 });
    b.input('x', 'float32', [3]);
    b.node('Identity', ['x'], {}, ['y']);
    const [, mask] = b.node('Dropout', ['x'], {}, 2);
    b.node('Cast', [mask], { to: 1 }, ['m']);
    b.output('y', 'float32', [3]);
    b.output('m', 'float32', [3]);
    const g = await expectSameOutputs(b, { x: input([3]) });
    expect(ops(g.all)).toEqual(['Identity', 'Dropout', 'Cast']);
  });

  it('keeps a Dropout in training mode', () => {
    const b = new GraphBuilder('train', { opset: 13 });
    b.input('x', 'float32', [3]);
    const ratio = b.init('ratio', float32Tensor([0.5], []));
    const train = b.init('train', { dtype: 'bool', dims: [], data: new Uint8Array([1]) });
    const [d] = b.node('Dropout', ['x', ratio, train]);
    b.node('Relu', [d], {}, ['y']);
    b.output('y', 'float32', [3]);
    const { graph, opset } = load(b);
    expect(ops(optimize(graph, 'basic', opset))).toEqual(['Dropout', 'Relu']);
  });

  it('removes dead nodes and the initializers only they read; never touches the input graph', async () => {
    const b = new GraphBuilder('dead');
    b.input('x', 'float32', [4]);
    const w = b.init('w', randomTensor([4], { seed: 3 }));
    const unused = b.init('unused', randomTensor([4], { seed: 4 }));
    const [dead1] = b.node('Mul', ['x', unused]);
    b.node('Relu', [dead1]);
    b.node('Add', ['x', w], {}, ['y']);
    b.output('y', 'float32', [4]);
    const { graph, opset } = load(b);
    const before = new Map([...graph.initializers].map(([k, t]) => [k, Float32Array.from(t.data as Float32Array)]));
    const nodesBefore = graph.nodes.map((n) => ({ ...n, inputs: [...n.inputs], outputs: [...n.outputs] }));
    const g = await expectSameOutputs(b, { x: input([4]) });
    expect(ops(g.basic)).toEqual(['Add']);
    expect([...g.basic.initializers.keys()]).toEqual(['w']);
    for (const level of ['basic', 'all'] as const) optimize(graph, level, opset);
    expect(graph.nodes).toEqual(nodesBefore);
    for (const [k, data] of before) expect(graph.initializers.get(k)!.data).toEqual(data);
  });

  it('takes an initializer listed as a graph input as a constant unless told it can be fed', () => {
    const b = new GraphBuilder('override');
    b.input('x', 'float32', [3]);
    b.input('w', 'float32', [3]);
    b.init('w', randomTensor([3], { seed: 9 }));
    const [wr] = b.node('Relu', ['w']);
    b.node('Mul', ['x', wr], {}, ['y']);
    b.output('y', 'float32', [3]);
    const { graph, opset } = load(b);
    for (const level of ['basic', 'all'] as const) {
      const fed = optimize(graph, level, opset, { initializerInputsAreConstant: false });
      expect(ops(fed)).toEqual(['Relu', 'Mul']);
      expect(fed.initializers.has('w')).toBe(true);
      const constant = optimize(graph, level, opset);
      expect(ops(constant)).toEqual(['Mul']);
      const folded = constant.initializers.get(constant.nodes[0]!.inputs[1]!)!.data as Float32Array;
      const w = graph.initializers.get('w')!.data as Float32Array;
      expect(Array.from(folded)).toEqual(Array.from(w, (v) => Math.max(v, 0)));
      // Still there: the session lists inputs without an initializer as the model's inputs.
      expect(constant.initializers.has('w')).toBe(true);
    }
  });
});

describe('optimize: constant folding', () => {
  it('folds nodes whose inputs are all constants into new initializers', async () => {
    const b = new GraphBuilder('fold');
    b.input('x', 'float32', [2, 3]);
    const a = b.init('a', randomTensor([2, 3], { seed: 1 }));
    const c = b.init('c', randomTensor([3], { seed: 2 }));
    const [s] = b.node('Add', [b.node('Mul', [a, a])[0], c]);
    const [r] = b.node('Relu', [b.node('Neg', [s])[0]]);
    b.node('Add', ['x', r], {}, ['y']);
    b.output('y', 'float32', [2, 3]);
    const g = await expectSameOutputs(b, { x: input([2, 3]) });
    expect(ops(g.basic)).toEqual(['Add']);
    expect([...g.basic.initializers.keys()]).toEqual([r]);
    const av = load(b).graph.initializers.get('a')!.data as Float32Array;
    const cv = load(b).graph.initializers.get('c')!.data as Float32Array;
    const want = Array.from(av, (v, i) => Math.max(0, -Math.fround(Math.fround(v * v) + cv[i % 3]!)));
    expect(Array.from(g.basic.initializers.get(r)!.data as Float32Array)).toEqual(want);
  });

  it('leaves a node whose folded output would be over 16 M elements', () => {
    const b = new GraphBuilder('big');
    b.input('x', 'float32', [1]);
    const [big] = b.node('Add', [b.init('col', randomTensor([4097, 1], { seed: 1 })), b.init('row', randomTensor([1, 4096], { seed: 2 }))]);
    b.node('Add', [big, 'x'], {}, ['y']);
    b.output('y', 'float32', [4097, 4096]);
    const { graph, opset } = load(b);
    expect(ops(optimize(graph, 'basic', opset))).toEqual(['Add', 'Add']);
  });
});

describe('optimize: Shape of a static shape', () => {
  it('folds Shape (with opset-15 start/end) of a tensor whose shape inference proves static', async () => {
    const b = new GraphBuilder('shape', { opset: 15 });
    b.input('x', 'float32', [2, 3, 6, 6]);
    const [p] = b.node('MaxPool', ['x'], { kernel_shape: [3, 3], strides: [2, 2], ceil_mode: 1 });
    const [c] = b.node('Conv', [p, b.init('w', randomTensor([4, 3, 2, 2], { seed: 2 }))], { auto_pad: 'SAME_UPPER', strides: [2, 1] });
    const [s] = b.node('Shape', [c], { start: 1, end: -1 });
    const [t] = b.node('Transpose', [c], { perm: [0, 2, 3, 1] });
    b.node('Shape', [t], {}, ['whole']); // a graph output: stays a node
    b.node('Reshape', [t, b.node('Shape', [b.node('Flatten', [t], { axis: 3 })[0]])[0]], {}, ['flat']);
    b.node('Cast', [s], { to: 1 }, ['y']);
    b.output('y', 'float32', [2]);
    b.output('whole', 'int64', [4]);
    b.output('flat', 'float32', [12, 4]);
    const { graph, opset } = load(b);
    const g = optimize(graph, 'basic', opset);
    expect(ops(g).sort()).toEqual(['Cast', 'Conv', 'MaxPool', 'Reshape', 'Shape', 'Transpose']);
    const cast = only(g, 'Cast')[0]!;
    // MaxPool with ceil_mode: 6 -> 3; SAME_UPPER conv with strides [2, 1]: 3x3 -> 2x3, 4 channels.
    expect(Array.from(g.initializers.get(cast.inputs[0]!)!.data as BigInt64Array)).toEqual([4n, 2n]);
    expect(Array.from(g.initializers.get(only(g, 'Reshape')[0]!.inputs[1]!)!.data as BigInt64Array)).toEqual([12n, 4n]);
    const want = await runOrt(b.toBytes() as Uint8Array, { x: input([2, 3, 6, 6]) });
    const got = await runOrt(toOnnx(g, opset), { x: input([2, 3, 6, 6]) });
    for (const k of ['y', 'flat']) expect(got[k]).toEqual(want[k]);
  });

  it('keeps Shape of a tensor with a symbolic dim', () => {
    const b = new GraphBuilder('dyn', { opset: 13 });
    b.input('x', 'float32', ['N', 3]);
    b.node('Reshape', ['x', b.node('Shape', [b.node('Relu', ['x'])[0]])[0]], {}, ['y']);
    b.output('y', 'float32', ['N', 3]);
    const { graph, opset } = load(b);
    expect(ops(optimize(graph, 'all', opset))).toEqual(['Relu', 'Shape', 'Reshape']);
  });
});

describe('optimize: BatchNormalization folding', () => {
  it('folds BN into a Conv: W and B match a float64 computation, the originals are untouched', async () => {
    for (const withBias of [true, false]) {
      const b = new GraphBuilder('convbn');
      b.input('x', 'float32', [1, 3, 7, 5]);
      const c = conv(b, 'x', 3, 5, 11, { bias: withBias });
      b.node('Identity', [bn(b, c, 5, 20, 1e-3)], {}, ['y']);
      b.output('y', 'float32', [1, 5, 7, 5]);
      const { graph } = load(b);
      const g = await expectSameOutputs(b, { x: input([1, 3, 7, 5]) });
      expect(ops(g.all)).toEqual(['Conv']);
      const conv0 = graph.nodes.find((n) => n.opType === 'Conv')!;
      const bnNode = graph.nodes.find((n) => n.opType === 'BatchNormalization')!;
      const [gamma, beta, mean, variance] = bnNode.inputs.slice(1).map((v) => graph.initializers.get(v)!.data as Float32Array);
      const w = graph.initializers.get(conv0.inputs[1]!)!.data as Float32Array;
      const bias = withBias ? graph.initializers.get(conv0.inputs[2]!)!.data as Float32Array : new Float32Array(5);
      const folded = g.all.nodes[0]!;
      expect(folded.outputs).toEqual(['y']);
      expect(folded.inputs[1]).not.toBe(conv0.inputs[1]);
      const w2 = g.all.initializers.get(folded.inputs[1]!)!;
      const b2 = g.all.initializers.get(folded.inputs[2]!)!;
      expect(w2.dims).toEqual([5, 3, 3, 3]);
      const eps = Math.fround(1e-3);
      for (let o = 0; o < 5; o++) {
        const s = gamma[o]! / Math.sqrt(variance[o]! + eps);
        expect(b2.data[o]).toBe(Math.fround((bias[o]! - mean[o]!) * s + beta[o]!));
        for (let k = 0; k < 27; k++) expect(w2.data[o * 27 + k]).toBe(Math.fround(w[o * 27 + k]! * s));
      }
      // The input graph's weights are what they were.
      expect(graph.initializers.get(conv0.inputs[1]!)!.data).toBe(w);
    }
  });

  it('folds BN into a Gemm (alpha, beta, transB) and a 2-D MatMul', async () => {
    const b = new GraphBuilder('gemmbn');
    b.input('x', 'float32', [3, 6]);
    const w = b.init('w', randomTensor([4, 6], { seed: 5 }));
    const c = b.init('c', randomTensor([1, 4], { seed: 6 }));
    const [h] = b.node('Gemm', ['x', w, c], { alpha: floatAttr(0.5), beta: floatAttr(2), transB: 1 });
    const [h2] = b.node('Relu', [bn(b, h, 4, 30)]);
    const w2 = b.init('w2', randomTensor([4, 3], { seed: 8 }));
    const [m] = b.node('MatMul', [h2, w2]);
    b.node('Sigmoid', [bn(b, m, 3, 40)], {}, ['y']);
    b.output('y', 'float32', [3, 3]);
    const g = await expectSameOutputs(b, { x: input([3, 6]) });
    expect(ops(g.basic)).toContain('BatchNormalization');
    expect(ops(g.all)).toEqual(['sonde.FusedGemm', 'sonde.FusedGemm']);
    expect(g.all.nodes.map((n) => n.attributes.activation)).toEqual(['relu', 'sigmoid']);
    expect(g.all.nodes[0]!.attributes.trans_b).toBe(1);
  });

  it('does not fold a BN whose Conv output is read by another node too', async () => {
    const b = new GraphBuilder('twoReaders');
    b.input('x', 'float32', [1, 2, 5, 5]);
    const c = conv(b, 'x', 2, 4, 3);
    const [r] = b.node('Relu', [bn(b, c, 4, 50)]);
    b.node('Add', [r, c], {}, ['y']);
    b.output('y', 'float32', [1, 4, 5, 5]);
    const g = await expectSameOutputs(b, { x: input([1, 2, 5, 5]) });
    expect(ops(g.all)).toEqual(['Conv', 'BatchNormalization', 'Relu', 'Add']);
  });

  it('folds a BN whose output has two readers, but fuses no activation into it', async () => {
    const b = new GraphBuilder('bnTwoReaders');
    b.input('x', 'float32', [1, 2, 5, 5]);
    const y = bn(b, conv(b, 'x', 2, 4, 3), 4, 60);
    b.node('Relu', [y], {}, ['r']);
    b.node('Sigmoid', [y], {}, ['s']);
    b.output('r', 'float32', [1, 4, 5, 5]);
    b.output('s', 'float32', [1, 4, 5, 5]);
    const g = await expectSameOutputs(b, { x: input([1, 2, 5, 5]) });
    expect(ops(g.all)).toEqual(['Conv', 'Relu', 'Sigmoid']);
  });
});

describe('optimize: conv fusion', () => {
  it('fuses a ResNet basic block: Conv+BN+Relu, Conv+BN+Add(shortcut)+Relu', async () => {
    const b = new GraphBuilder('resnet', { opset: 13 });
    b.input('x', 'float32', ['N', 4, 6, 6]);
    const [a] = b.node('Relu', [bn(b, conv(b, 'x', 4, 4, 1, { bias: false }), 4, 70)]);
    const c2 = bn(b, conv(b, a, 4, 4, 2, { bias: false }), 4, 80);
    const [s] = b.node('Add', [c2, 'x']);
    // Second block: a strided conv with a projection shortcut (1x1, stride 2).
    const [a2] = b.node('Relu', [s]);
    const main = bn(b, conv(b, a2, 4, 8, 3, { stride: 2 }), 8, 90);
    const proj = bn(b, conv(b, a2, 4, 8, 4, { k: 1, stride: 2, bias: false }), 8, 95);
    const [s2] = b.node('Add', [proj, main]);
    b.node('Relu', [s2], {}, ['y']);
    b.output('y', 'float32', ['N', 8, 3, 3]);
    const g = await expectSameOutputs(b, { x: input([2, 4, 6, 6]) });
    // Of the two convs meeting at the second Add, one takes the Add (the other's output is its R);
    // the other, with BN folded, has nothing left to fuse.
    expect(ops(g.all).sort()).toEqual(['Conv', 'sonde.FusedConv', 'sonde.FusedConv', 'sonde.FusedConv']);
    const fused = only(g.all, 'FusedConv');
    const [f1, f2, f3] = fused as [OnnxNode, OnnxNode, OnnxNode];
    expect(f1.attributes).toMatchObject({ activation: 'relu', kernel_shape: [3, 3] });
    expect(f1.inputs).toHaveLength(3); // BN folding made a bias
    expect(f2.attributes).toMatchObject({ activation: 'relu', residual_before_activation: 1 });
    expect(f2.inputs[3]).toBe('x');
    expect(f3.attributes).toMatchObject({ activation: 'relu', residual_before_activation: 1 });
    expect(f3.inputs[3]).toBe(only(g.all, 'Conv')[0]!.outputs[0]);
    expect(f3.outputs).toEqual(['y']);
    expect(ops(g.basic).filter((o) => o === 'BatchNormalization')).toHaveLength(4);
  });

  it('fuses Conv -> Relu -> Add as residual after the activation, and a linear-bottleneck Add', async () => {
    const b = new GraphBuilder('after');
    b.input('x', 'float32', [1, 3, 5, 4]);
    const [r] = b.node('Relu', [conv(b, 'x', 3, 3, 1)]);
    const [s] = b.node('Add', ['x', r]);
    const lin = bn(b, conv(b, s, 3, 3, 2, { k: 1 }), 3, 10);
    b.node('Add', [s, lin], {}, ['y']);
    b.output('y', 'float32', [1, 3, 5, 4]);
    const g = await expectSameOutputs(b, { x: input([1, 3, 5, 4]) });
    expect(ops(g.all)).toEqual(['sonde.FusedConv', 'sonde.FusedConv']);
    expect(g.all.nodes[0]!.attributes).toMatchObject({ activation: 'relu', residual_before_activation: 0 });
    expect(g.all.nodes[0]!.inputs[3]).toBe('x');
    expect(g.all.nodes[1]!.attributes).toMatchObject({ activation: 'none' });
    expect(g.all.nodes[1]!.inputs[3]).toBe(g.all.nodes[0]!.outputs[0]);
  });

  it('fuses each activation: ReLU6 (Clip inputs and attributes), LeakyRelu, Sigmoid, SiLU, HardSwish', async () => {
    const cases: [number, (b: Builder, x: string) => string, Record<string, unknown>][] = [
      [13, (b, x) => b.node('Clip', [x, b.init('lo', float32Tensor([0], [])), b.init('hi', float32Tensor([6], []))])[0], { activation: 'clip', alpha: 0, beta: 6 }],
      [13, (b, x) => b.node('Clip', [x, '', b.init('hi', float32Tensor([0.25], []))])[0], { activation: 'clip', beta: 0.25 }],
      [9, (b, x) => b.node('Clip', [x], { min: floatAttr(-0.5), max: floatAttr(0.5) })[0], { activation: 'clip', alpha: -0.5, beta: 0.5 }],
      [13, (b, x) => b.node('LeakyRelu', [x], { alpha: floatAttr(0.2) })[0], { activation: 'leakyRelu' }],
      [13, (b, x) => b.node('LeakyRelu', [x])[0], { activation: 'leakyRelu' }],
      [13, (b, x) => b.node('Sigmoid', [x])[0], { activation: 'sigmoid' }],
      [13, (b, x) => b.node('Mul', [b.node('Sigmoid', [x])[0], x])[0], { activation: 'silu' }],
      [14, (b, x) => b.node('HardSwish', [x])[0], { activation: 'hardSwish' }],
    ];
    for (const [opset, act, want] of cases) {
      const b = new GraphBuilder('act', { opset });
      b.input('x', 'float32', [1, 2, 4, 3]);
      b.node('Identity', [act(b, bn(b, conv(b, 'x', 2, 3, 5), 3, 6))], {}, ['y']);
      b.output('y', 'float32', [1, 3, 4, 3]);
      const g = await expectSameOutputs(b, { x: input([1, 2, 4, 3]) });
      expect(ops(g.all)).toEqual(['sonde.FusedConv']);
      expect(g.all.nodes[0]!.attributes).toMatchObject(want);
      expect(g.all.nodes[0]!.outputs).toEqual(['y']);
    }
  });

  it('does not fuse away a Conv whose output is also a graph output', async () => {
    const b = new GraphBuilder('visible');
    b.input('x', 'float32', [1, 2, 4, 4]);
    const c = conv(b, 'x', 2, 2, 1);
    b.node('Relu', [c], {}, ['y']);
    b.output(c, 'float32', [1, 2, 4, 4]);
    b.output('y', 'float32', [1, 2, 4, 4]);
    const g = await expectSameOutputs(b, { x: input([1, 2, 4, 4]) });
    expect(ops(g.all)).toEqual(['Conv', 'Relu']);
  });

  it('does not take an Add whose other operand broadcasts as a residual', async () => {
    const b = new GraphBuilder('bcast');
    b.input('x', 'float32', [1, 2, 4, 4]);
    b.input('z', 'float32', [1, 3, 1, 1]);
    b.input('w', 'float32', ['N', 3, 4, 4]); // batch symbolic: same rank, not provably the same shape
    const [s] = b.node('Add', [conv(b, 'x', 2, 3, 1), 'z']);
    const [r] = b.node('Relu', [s]);
    b.node('Add', [conv(b, r, 3, 3, 2), 'w'], {}, ['y']);
    b.output('y', 'float32', ['N', 3, 4, 4]);
    const g = await expectSameOutputs(b, { x: input([1, 2, 4, 4]), z: input([1, 3, 1, 1], 3), w: input([1, 3, 4, 4], 4) });
    expect(ops(g.all)).toEqual(['Conv', 'Add', 'Relu', 'Conv', 'Add']);
  });
});

describe('optimize: GEMM fusion', () => {
  it('fuses an MLP: MatMul + bias + Relu, Gemm with alpha/beta/transB, and a plain MatMul stays', async () => {
    const b = new GraphBuilder('mlp');
    b.input('x', 'float32', ['batch', 7]);
    const [m1] = b.node('MatMul', ['x', b.init('w1', randomTensor([7, 9], { seed: 1 }))]);
    const [h1] = b.node('Relu', [b.node('Add', [b.init('b1', randomTensor([9], { seed: 2 })), m1])[0]]);
    const [h2] = b.node('Gemm', [h1, b.init('w2', randomTensor([5, 9], { seed: 3 })), b.init('b2', randomTensor([5], { seed: 4 }))],
      { transB: 1, alpha: floatAttr(0.75), beta: floatAttr(-1.5) });
    const [h3] = b.node('Gemm', [h2, b.init('w3', randomTensor([5, 4], { seed: 5 }))]);
    b.node('MatMul', [h3, b.init('w4', randomTensor([4, 2], { seed: 6 }))], {}, ['y']);
    b.output('y', 'float32', ['batch', 2]);
    const g = await expectSameOutputs(b, { x: input([3, 7]) });
    expect(ops(g.all)).toEqual(['sonde.FusedGemm', 'sonde.FusedGemm', 'sonde.FusedGemm', 'MatMul']);
    const [f1, f2, f3] = g.all.nodes as [OnnxNode, OnnxNode, OnnxNode];
    expect(f1.inputs).toEqual(['x', 'w1', 'b1']);
    expect(f1.attributes).toMatchObject({ activation: 'relu', trans_b: 0 });
    expect(f2.attributes).toMatchObject({ activation: 'none', trans_b: 1 });
    expect(f2.inputs[1]).not.toBe('w2'); // alpha folded into a new B
    const c2 = g.all.initializers.get(f2.inputs[2]!)!;
    const b2 = load(b).graph.initializers.get('b2')!.data as Float32Array;
    expect(Array.from(c2.data as Float32Array)).toEqual(Array.from(b2, (v) => Math.fround(-1.5 * v)));
    expect(f3.inputs).toEqual([h2, 'w3']);
  });

  it('fuses a transformer FFN: 3-D MatMul + bias + GELU (erf) and a residual Add', async () => {
    const b = new GraphBuilder('ffn');
    b.input('x', 'float32', ['batch', 5, 6]);
    const [m] = b.node('MatMul', ['x', b.init('w1', randomTensor([6, 8], { seed: 1 }))]);
    const [h] = b.node('Add', [m, b.init('b1', randomTensor([1, 8], { seed: 2 }))]);
    const [d] = b.node('Div', [h, b.init('sqrt2', float32Tensor([1.4142135], []))]);
    const [e] = b.node('Add', [b.node('Erf', [d])[0], b.init('one', float32Tensor([1], []))]);
    const [p] = b.node('Mul', [h, e]);
    const [act] = b.node('Mul', [p, b.init('half', float32Tensor([0.5], []))]);
    const [m2] = b.node('MatMul', [act, b.init('w2', randomTensor([8, 6], { seed: 3 }))]);
    const [o] = b.node('Add', [m2, b.init('b2', randomTensor([6], { seed: 4 }))]);
    b.node('Add', ['x', o], {}, ['y']);
    b.output('y', 'float32', ['batch', 5, 6]);
    const g = await expectSameOutputs(b, { x: input([2, 5, 6]) });
    expect(ops(g.all)).toEqual(['sonde.FusedGemm', 'sonde.FusedGemm']);
    expect(g.all.nodes[0]!.attributes).toMatchObject({ activation: 'gelu' });
    expect(g.all.initializers.get(g.all.nodes[0]!.inputs[2]!)!.dims).toEqual([8]);
    expect(g.all.nodes[1]!.inputs).toEqual([g.all.nodes[0]!.outputs[0], 'w2', 'b2', 'x']);
    expect(g.all.nodes[1]!.attributes).toMatchObject({ activation: 'none', residual_before_activation: 1 });
  });

  it('keeps the bias Add apart when it would change the shape (a [1, N] bias on a 1-D MatMul)', async () => {
    const b = new GraphBuilder('vec');
    b.input('x', 'float32', [4]);
    const [m] = b.node('MatMul', ['x', b.init('w', randomTensor([4, 3], { seed: 1 }))]);
    b.node('Add', [m, b.init('b', randomTensor([1, 3], { seed: 2 }))], {}, ['y']);
    b.output('y', 'float32', [1, 3]);
    const g = await expectSameOutputs(b, { x: input([4]) });
    expect(ops(g.all)).toEqual(['MatMul', 'Add']);
  });
});

describe('optimize: decomposed patterns', () => {
  function layerNorm(b: Builder, x: string, d: number, { opset, square, affine }: { opset: number; square: 'pow' | 'mul'; affine: boolean }): string {
    const mean = (v: string) => (opset >= 18
      ? b.node('ReduceMean', [v, b.init(b.fresh('axes'), int64Tensor([-1]))])[0]
      : b.node('ReduceMean', [v], { axes: [-1] })[0]);
    const [dev] = b.node('Sub', [x, mean(x)]);
    const [sq] = square === 'pow' ? b.node('Pow', [dev, b.init(b.fresh('two'), float32Tensor([2], []))]) : b.node('Mul', [dev, dev]);
    const [ve] = b.node('Add', [mean(sq), b.init(b.fresh('eps'), float32Tensor([1e-5], []))]);
    let [y] = b.node('Div', [dev, b.node('Sqrt', [ve])[0]]);
    if (affine) {
      [y] = b.node('Mul', [y, b.init(b.fresh('gamma'), randomTensor([d], { seed: 3 }))]);
      [y] = b.node('Add', [b.init(b.fresh('beta'), randomTensor([d], { seed: 4 })), y]);
    }
    return y!;
  }

  it('recognises LayerNormalization (Pow or Mul, attribute or input axes, with or without affine)', async () => {
    for (const [opset, square, affine] of [[17, 'pow', true], [18, 'mul', true], [17, 'mul', false]] as const) {
      const b = new GraphBuilder('ln', { opset });
      b.input('x', 'float32', ['batch', 3, 10]);
      b.node('Relu', [layerNorm(b, 'x', 10, { opset, square, affine })], {}, ['y']);
      b.output('y', 'float32', ['batch', 3, 10]);
      const g = await expectSameOutputs(b, { x: input([2, 3, 10]) });
      expect(ops(g.all)).toEqual(['LayerNormalization', 'Relu']);
      const ln = g.all.nodes[0]!;
      expect(ln.attributes.axis).toBe(-1);
      expect(ln.attributes.epsilon).toBe(Math.fround(1e-5));
      expect(ln.inputs).toHaveLength(affine ? 3 : 2);
    }
  });

  it('does not take a mean over another axis for a LayerNorm', async () => {
    const b = new GraphBuilder('notln', { opset: 17 });
    b.input('x', 'float32', [2, 4, 3]);
    const [m] = b.node('ReduceMean', ['x'], { axes: [1] });
    const [dev] = b.node('Sub', ['x', m]);
    const [v] = b.node('ReduceMean', [b.node('Mul', [dev, dev])[0]], { axes: [1] });
    const [s] = b.node('Sqrt', [b.node('Add', [v, b.init('eps', float32Tensor([1e-5], []))])[0]]);
    b.node('Div', [dev, s], {}, ['y']);
    b.output('y', 'float32', [2, 4, 3]);
    const g = await expectSameOutputs(b, { x: input([2, 4, 3]) });
    expect(ops(g.all)).not.toContain('LayerNormalization');
  });

  it('recognises GELU written in each association and as the tanh approximation', async () => {
    const erf = (b: Builder, x: string, viaMul: boolean): string => {
      const [a] = viaMul
        ? b.node('Mul', [b.init(b.fresh('r2'), float32Tensor([0.70710677], [])), x])
        : b.node('Div', [x, b.init(b.fresh('s2'), float32Tensor([1.4142], []))]);
      return b.node('Add', [b.init(b.fresh('one'), float32Tensor([1], [])), b.node('Erf', [a])[0]])[0];
    };
    const tanh = (b: Builder, x: string, cube: 'pow' | 'mul'): string => {
      const [c] = cube === 'pow'
        ? b.node('Pow', [x, b.init(b.fresh('three'), float32Tensor([3], []))])
        : b.node('Mul', [x, b.node('Mul', [x, x])[0]]);
      const [inner] = b.node('Add', [x, b.node('Mul', [b.init(b.fresh('k'), float32Tensor([0.044715], [])), c])[0]]);
      const [t] = b.node('Tanh', [b.node('Mul', [inner, b.init(b.fresh('s'), float32Tensor([Math.sqrt(2 / Math.PI)], []))])[0]]);
      return b.node('Add', [t, b.init(b.fresh('one'), float32Tensor([1], []))])[0];
    };
    const half = (b: Builder) => b.init(b.fresh('half'), float32Tensor([0.5], []));
    const forms: [string, (b: Builder, x: string) => string][] = [
      ['gelu', (b, x) => b.node('Mul', [b.node('Mul', [x, erf(b, x, false)])[0], half(b)])[0]],
      ['gelu', (b, x) => b.node('Mul', [x, b.node('Mul', [erf(b, x, true), half(b)])[0]])[0]],
      ['gelu', (b, x) => b.node('Mul', [b.node('Mul', [half(b), x])[0], erf(b, x, false)])[0]],
      ['geluTanh', (b, x) => b.node('Mul', [b.node('Mul', [half(b), x])[0], tanh(b, x, 'mul')])[0]],
      ['geluTanh', (b, x) => b.node('Mul', [b.node('Mul', [x, tanh(b, x, 'pow')])[0], half(b)])[0]],
    ];
    for (const [want, form] of forms) {
      const b = new GraphBuilder('gelu', { opset: 13 });
      b.input('x', 'float32', [3, 4]);
      const [s] = b.node('Sigmoid', ['x']);
      b.node('Neg', [form(b, s)], {}, ['y']);
      b.output('y', 'float32', [3, 4]);
      const xs = input([3, 4]);
      for (let i = 0; i < xs.size; i++) (xs.data as Float32Array)[i]! *= 4;
      const g = await expectSameOutputs(b, { x: xs });
      expect(ops(g.all)).toEqual(['Sigmoid', 'Gelu', 'Neg']);
      expect(g.all.nodes[1]!.attributes.approximate).toBe(want === 'gelu' ? 'none' : 'tanh');
      expect(g.all.nodes[1]!.inputs).toEqual([s]);
    }
  });

  it('leaves a GELU-like chain alone when an intermediate is read elsewhere', async () => {
    const b = new GraphBuilder('gelushared', { opset: 13 });
    b.input('x', 'float32', [5]);
    const [d] = b.node('Div', ['x', b.init('s2', float32Tensor([Math.SQRT2], []))]);
    const [e] = b.node('Erf', [d]);
    const [c] = b.node('Add', [e, b.init('one', float32Tensor([1], []))]);
    const [p] = b.node('Mul', ['x', c]);
    b.node('Mul', [p, b.init('half', float32Tensor([0.5], []))], {}, ['y']);
    b.node('Neg', [e], {}, ['z']);
    b.output('y', 'float32', [5]);
    b.output('z', 'float32', [5]);
    const g = await expectSameOutputs(b, { x: input([5]) });
    expect(ops(g.all)).not.toContain('Gelu');
  });
});
