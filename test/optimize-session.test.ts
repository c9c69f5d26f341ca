/**
 * Every optimisation level end to end: Session.load(bytes, { optimization }) runs the optimised graph
 * through the compiler and the native plan executor, and each level must give onnxruntime-node's
 * outputs for the original graph. The graphs are the patterns the optimiser rewrites (a ResNet
 * block, an MLP, GELU and LayerNorm decompositions, an Identity/Dropout chain) and one it must
 * leave alone (a BN whose conv output has a second reader). A graph whose ops the compiler's
 * registry does not have yet is reported as skipped, not passed.
 */
import { afterAll, describe, expect, it } from 'vitest';
import ort from 'onnxruntime-node';
import { Session, Tensor } from '../dist/index.js';
import { isSupported } from '../dist/session/ops/index.js';
import { GraphBuilder, floatAttr, float32Tensor, int64Tensor, randomTensor } from '../bench/graphs/builder.js';

type Builder = InstanceType<typeof GraphBuilder>;
const LEVELS = ['none', 'basic', 'all'] as const;

const supported = (b: Builder): boolean => b.nodes.every((n: { opType: string; domain: string }) => isSupported(n.domain, n.opType));

const sessions: Session[] = [];
afterAll(() => {
  for (const s of sessions) s.dispose();
});

const input = (dims: number[], seed = 7): Tensor => new Tensor('float32', randomTensor(dims, { seed }).data, dims);

/**
 * |sonde - ort| per output, relative to the output's scale. Both sum the same float32 products in
 * different orders; over these graphs' fan-ins (<= 72) and depths (<= 4 layers) that moves a result
 * by well under 1e-4 of its scale, while a wrong fold or fusion moves it by O(1).
 */
async function expectLevelsMatchOrt(b: Builder, feeds: Record<string, Tensor>): Promise<void> {
  const bytes = b.toBytes() as Uint8Array;
  const ref = await ort.InferenceSession.create(bytes, { graphOptimizationLevel: 'disabled', intraOpNumThreads: 1 });
  const ortFeeds = Object.fromEntries(Object.entries(feeds).map(([k, t]) => [k, new ort.Tensor('float32', t.data as Float32Array, [...t.dims])]));
  const want = await ref.run(ortFeeds);
  await ref.release();
  for (const optimization of LEVELS) {
    const s = await Session.load(bytes, { optimization, threads: 1 });
    sessions.push(s);
    const got = await s.run(feeds);
    for (const [name, w] of Object.entries(want)) {
      const wd = w.data as Float32Array;
      const gd = got[name]!.data as Float32Array;
      expect([...got[name]!.dims], `${optimization} ${name} dims`).toEqual([...w.dims]);
      const scale = wd.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      let worst = 0;
      for (let i = 0; i < wd.length; i++) worst = Math.max(worst, Math.abs(gd[i]! - wd[i]!));
      expect(worst, `optimization '${optimization}', output ${name}`).toBeLessThanOrEqual(1e-4 * Math.max(1, scale));
    }
  }
}

function bn(b: Builder, x: string, c: number, seed: number): string {
  const v = randomTensor([c], { seed: seed + 3 });
  for (let i = 0; i < c; i++) v.data[i] = Math.abs(v.data[i]) + 0.1;
  return b.node('BatchNormalization', [x, b.init(b.fresh('g'), randomTensor([c], { seed, scale: 2 })),
    b.init(b.fresh('b'), randomTensor([c], { seed: seed + 1 })), b.init(b.fresh('m'), randomTensor([c], { seed: seed + 2 })),
    b.init(b.fresh('v'), v)])[0];
}

function conv(b: Builder, x: string, cin: number, cout: number, seed: number, { k = 3, stride = 1, bias = true } = {}): string {
  const ins = [x, b.init(b.fresh('w'), randomTensor([cout, cin, k, k], { seed, scale: 0.5 }))];
  if (bias) ins.push(b.init(b.fresh('cb'), randomTensor([cout], { seed: seed + 100 })));
  const p = (k - 1) >> 1;
  return b.node('Conv', ins, { kernel_shape: [k, k], pads: [p, p, p, p], strides: [stride, stride] })[0];
}

function resnetBlock(): Builder {
  const b = new GraphBuilder('resnet', { opset: 13 });
  b.input('x', 'float32', ['N', 4, 6, 6]);
  const [a] = b.node('Relu', [bn(b, conv(b, 'x', 4, 4, 1, { bias: false }), 4, 10)]);
  const [s] = b.node('Add', [bn(b, conv(b, a, 4, 4, 2, { bias: false }), 4, 20), 'x']);
  const [a2] = b.node('Relu', [s]);
  const main = bn(b, conv(b, b.node('Clip', [conv(b, a2, 4, 8, 3, { stride: 2 }), b.init('lo', float32Tensor([0], [])), b.init('hi', float32Tensor([6], []))])[0], 8, 8, 4), 8, 30);
  const [s2] = b.node('Add', [bn(b, conv(b, a2, 4, 8, 5, { k: 1, stride: 2 }), 8, 40), main]);
  b.node('Relu', [s2], {}, ['y']);
  b.output('y', 'float32', ['N', 8, 3, 3]);
  return b;
}

function mlp(): Builder {
  const b = new GraphBuilder('mlp');
  b.input('x', 'float32', ['batch', 13]);
  const [h1] = b.node('Relu', [b.node('Add', [b.node('MatMul', ['x', b.init('w1', randomTensor([13, 17], { seed: 1 }))])[0], b.init('b1', randomTensor([17], { seed: 2 }))])[0]]);
  const [h2] = b.node('Gemm', [h1, b.init('w2', randomTensor([9, 17], { seed: 3 })), b.init('b2', randomTensor([1, 9], { seed: 4 }))],
    { transB: 1, alpha: floatAttr(0.75), beta: floatAttr(-1.5) });
  const [h3] = b.node('LeakyRelu', [h2], { alpha: floatAttr(0.1) });
  b.node('MatMul', [h3, b.init('w3', randomTensor([9, 5], { seed: 5 }))], {}, ['y']);
  b.output('y', 'float32', ['batch', 5]);
  return b;
}

function geluFfn(): Builder {
  const b = new GraphBuilder('ffn', { opset: 13 });
  b.input('x', 'float32', ['batch', 5, 6]);
  const [h] = b.node('Add', [b.node('MatMul', ['x', b.init('w1', randomTensor([6, 10], { seed: 1 }))])[0], b.init('b1', randomTensor([10], { seed: 2 }))]);
  const [e] = b.node('Add', [b.node('Erf', [b.node('Div', [h, b.init('s2', float32Tensor([1.4142135], []))])[0]])[0], b.init('one', float32Tensor([1], []))]);
  const [act] = b.node('Mul', [b.node('Mul', [h, e])[0], b.init('half', float32Tensor([0.5], []))]);
  const [o] = b.node('Add', [b.node('MatMul', [act, b.init('w2', randomTensor([10, 6], { seed: 3 }))])[0], b.init('b2', randomTensor([6], { seed: 4 }))]);
  b.node('Add', ['x', o], {}, ['y']);
  b.output('y', 'float32', ['batch', 5, 6]);
  return b;
}

function layerNorm(): Builder {
  const b = new GraphBuilder('ln', { opset: 13 });
  b.input('x', 'float32', ['batch', 4, 12]);
  const [m] = b.node('ReduceMean', ['x'], { axes: [-1] });
  const [d] = b.node('Sub', ['x', m]);
  const [v] = b.node('ReduceMean', [b.node('Pow', [d, b.init('two', float32Tensor([2], []))])[0]], { axes: [-1] });
  const [sd] = b.node('Sqrt', [b.node('Add', [v, b.init('eps', float32Tensor([1e-5], []))])[0]]);
  const [n] = b.node('Div', [d, sd]);
  const [s] = b.node('Mul', [n, b.init('gamma', randomTensor([12], { seed: 3 }))]);
  b.node('Add', [s, b.init('beta', randomTensor([12], { seed: 4 }))], {}, ['y']);
  b.output('y', 'float32', ['batch', 4, 12]);
  return b;
}

function dropoutChain(): Builder {
  const b = new GraphBuilder('chain', { opset: 13 });
  b.input('x', 'float32', ['batch', 6]);
  const [i1] = b.node('Identity', ['x']);
  const [s] = b.node('Sigmoid', [b.node('Dropout', [i1], {}, 2)[0]]);
  const [r] = b.node('Reshape', [s, b.init('shape', int64Tensor([0, 2, 3]))]);
  b.node('Identity', [b.node('Identity', [r])[0]], {}, ['y']);
  b.output('y', 'float32', ['batch', 2, 3]);
  return b;
}

/** x.view(x.size(0), -1) as PyTorch exports it (Shape -> Gather -> Unsqueeze -> Concat -> Reshape), then a Linear. */
function flattenHead(batch: number | string): Builder {
  const b = new GraphBuilder('head', { opset: 13 });
  b.input('x', 'float32', [batch, 2, 4, 4]);
  const [c] = b.node('Relu', [bn(b, conv(b, 'x', 2, 3, 1), 3, 60)]);
  const [n] = b.node('Gather', [b.node('Shape', [c])[0], b.node('Constant', [], { value: int64Tensor([0], []) })[0]], { axis: 0 });
  const [shape] = b.node('Concat', [b.node('Unsqueeze', [n, b.init('axes', int64Tensor([0]))])[0], b.node('Constant', [], { value: int64Tensor([-1]) })[0]], { axis: 0 });
  b.node('Gemm', [b.node('Reshape', [c, shape])[0], b.init('fc', randomTensor([5, 48], { seed: 2 })), b.init('fcb', randomTensor([5], { seed: 3 }))], { transB: 1 }, ['y']);
  b.output('y', 'float32', [batch, 5]);
  return b;
}

function bnTwoConsumers(): Builder {
  const b = new GraphBuilder('twoReaders');
  b.input('x', 'float32', [1, 3, 5, 5]);
  const c = conv(b, 'x', 3, 4, 3);
  const [r] = b.node('Relu', [bn(b, c, 4, 50)]);
  b.node('Add', [r, c], {}, ['y']);
  b.output('y', 'float32', [1, 4, 5, 5]);
  return b;
}

describe('optimisation levels end to end (Session vs onnxruntime-node)', () => {
  const cases: [string, () => Builder, Record<string, Tensor>][] = [
    ['a ResNet block (Conv+BN+Relu, ReLU6, residual Adds, projection shortcut)', resnetBlock, { x: input([2, 4, 6, 6]) }],
    ['an MLP (MatMul+bias+Relu, Gemm alpha/beta/transB + LeakyRelu)', mlp, { x: input([3, 13]) }],
    ['a transformer FFN with a decomposed GELU and a residual', geluFfn, { x: input([2, 5, 6]) }],
    ['a decomposed LayerNorm', layerNorm, { x: input([2, 4, 12]) }],
    ['an Identity/Dropout chain', dropoutChain, { x: input([3, 6]) }],
    ['a BN whose conv output has a second reader', bnTwoConsumers, { x: input([1, 3, 5, 5]) }],
    ['a PyTorch flatten chain on a static shape', () => flattenHead(2), { x: input([2, 2, 4, 4]) }],
    ['a PyTorch flatten chain on a symbolic batch', () => flattenHead('N'), { x: input([3, 2, 4, 4]) }],
  ];
  for (const [what, make, feeds] of cases) {
    it.skipIf(!supported(make()))(`every level gives onnxruntime's outputs: ${what}`, async () => {
      await expectLevelsMatchOrt(make(), feeds);
    });
  }
});
