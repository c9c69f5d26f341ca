// ONNX sessions on the GPU: every operator the session compiler supports, on small graphs built
// here (and the embedded digits model), run on device 'cuda' must give the CPU session's outputs.
// Every block runs on the CUDA emulator ('cuda' routed there by SONDE_CUDA_DEVICE=emulated: the same
// kernel sources compiled for the CPU) and, on a machine with a GPU, again on cuda:0 (targets.ts).
//
// Tolerances: elementwise float ops differ by a few ulp (device erf/tanh/exp against the CPU's
// polynomial approximations); sums and dot products of length K in another order differ by at most
// (K + 2) u sum|terms| on each side, and the inputs here keep sum|terms| <= K; integer and bool
// results, indices and shapes must be exact.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { GraphBuilder, floatAttr } from '../../bench/graphs/builder.js';
import {
  AbortError, InvalidArgumentError, OutOfMemoryError, Session, Tensor, UnsupportedOperatorError,
} from '../../dist/index.js';
import { gpuDevice } from '../../dist/cuda/runtime.js';
import { modelPath, readTestSplit } from '../../models/digits.js';
import { gpuTargets, type GpuTarget } from './targets.js';

// The target whose block is running: the emulator always, cuda:0 when there is a GPU (targets.ts).
let target: GpuTarget;
// An explicit 'cuda' reaches the emulator through SONDE_CUDA_DEVICE=emulated (lib/device.ts), and
// cuda:0 without it; resolveDevice reads it as Session.load starts.
function route(): void {
  if (target.emulated) process.env.SONDE_CUDA_DEVICE = 'emulated';
  else delete process.env.SONDE_CUDA_DEVICE;
}
const U = 2 ** -24;

type DT = 'float32' | 'int64' | 'int32' | 'bool';

function rand(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

function f32(dims: number[], seed = 1, lo = -1, hi = 1): Tensor {
  const r = rand(seed);
  const n = dims.reduce((a, b) => a * b, 1);
  return new Tensor('float32', Float32Array.from({ length: n }, () => lo + (hi - lo) * r()), dims);
}
const i64 = (v: number[], dims = [v.length]) => new Tensor('int64', BigInt64Array.from(v.map(BigInt)), dims);
const i32 = (v: number[], dims = [v.length]) => new Tensor('int32', Int32Array.from(v), dims);
const bool = (v: number[], dims = [v.length]) => new Tensor('bool', Uint8Array.from(v), dims);
const tensorData = (t: Tensor) => ({ dtype: t.dtype, dims: [...t.dims], data: t.data });

interface Graph { bytes: Uint8Array; feeds: Record<string, Tensor> }

/** One node; inputs with init: true are initializers, the others graph inputs fed with t. */
function oneNode(op: string, inputs: { name: string; t?: Tensor; init?: boolean }[], attrs: Record<string, unknown> = {},
  { opset = 17, outDtypes = ['float32'] as DT[], domain = '' } = {}): Graph {
  const g = new GraphBuilder(op, { opset });
  const names = inputs.map(({ name, t, init }) => {
    if (!name) return '';
    if (init) return g.init(name, tensorData(t!));
    g.input(name, t!.dtype, [...t!.dims]);
    return name;
  });
  const outs = g.node(op, names, attrs, outDtypes.length, { name: `${op}_node`, domain });
  outs.forEach((o: string, i: number) => g.output(o, outDtypes[i]));
  const feeds: Record<string, Tensor> = {};
  for (const { name, t, init } of inputs) if (name && !init) feeds[name] = t!;
  return { bytes: g.toBytes(), feeds };
}

const sessions: Session[] = [];
afterAll(async () => {
  for (const s of sessions) s.dispose();
});

async function load(bytes: Uint8Array, device: 'cpu' | 'cuda', extra: Record<string, unknown> = {}): Promise<Session> {
  route();
  const s = await Session.load(bytes, { device, ...extra } as never);
  sessions.push(s);
  return s;
}

function expectClose(got: Tensor, want: Tensor, tol: { atol: number; rtol: number }, what: string): void {
  expect(got.dtype, `${what}: dtype`).toBe(want.dtype);
  expect([...got.dims], `${what}: dims`).toEqual([...want.dims]);
  if (want.dtype !== 'float32') {
    expect(Array.from(got.data as ArrayLike<number | bigint>, String), `${what}: values`)
      .toEqual(Array.from(want.data as ArrayLike<number | bigint>, String));
    return;
  }
  const g = got.data as Float32Array, w = want.data as Float32Array;
  for (let i = 0; i < w.length; i++) {
    const a = g[i]!, b = w[i]!;
    if (Number.isNaN(b)) {
      expect(Number.isNaN(a), `${what}[${i}]: want NaN, got ${a}`).toBe(true);
      continue;
    }
    if (!Number.isFinite(b)) {
      expect(a, `${what}[${i}]`).toBe(b);
      continue;
    }
    const err = Math.abs(a - b), bound = tol.atol + tol.rtol * Math.abs(b);
    if (!(err <= bound)) throw new Error(`${what}[${i}]: GPU ${a}, CPU ${b} (|diff| ${err} > ${bound})`);
  }
}

const EW = { atol: 1e-6, rtol: 16 * U };
const dot = (k: number) => ({ atol: 2 * (k + 2) * k * U, rtol: 8 * U });

/** Runs `graph` on the CPU and on the GPU and compares every output. */
async function sameOnGpu(graph: Graph, tol = EW, label = ''): Promise<Record<string, Tensor>> {
  const cpu = await load(graph.bytes, 'cpu');
  const gpu = await load(graph.bytes, 'cuda');
  expect(gpu.device.kind).toBe('cuda');
  const want = await cpu.run(graph.feeds);
  const got = await gpu.run(graph.feeds);
  expect(Object.keys(got).sort()).toEqual(Object.keys(want).sort());
  for (const name of Object.keys(want)) expectClose(got[name]!, want[name]!, tol, `${label} ${name}`);
  return got;
}

for (const t of gpuTargets()) {
  (t.skip ? describe.skip : describe)(`sessions on ${t.id}${t.skip ? ` (skipped: ${t.skip})` : ''}`, () => {
    beforeAll(() => {
      target = t;
    });
    describe('elementwise', () => {
      const x = f32([2, 3, 5], 3, -4, 4);
      const pos = f32([2, 3, 5], 4, 0.01, 9);
      const unary: [string, Tensor, Record<string, unknown>, number?][] = [
        ['Relu', x, {}], ['LeakyRelu', x, { alpha: 0.3 }], ['Sigmoid', x, {}], ['Tanh', x, {}],
        ['HardSigmoid', x, { alpha: 0.1, beta: 0.4 }], ['HardSwish', x, {}], ['Erf', x, {}], ['Exp', x, {}],
        ['Log', pos, {}], ['Sqrt', pos, {}], ['Neg', x, {}], ['Abs', x, {}],
        ['Clip', x, { min: floatAttr(-1.5), max: floatAttr(2) }, 10], ['Gelu', x, {}, 20], ['Gelu', x, { approximate: 'tanh' }, 20],
      ];
      for (const [op, t, attrs, opset] of unary) {
        it(`${op} ${JSON.stringify(attrs)}`, async () => {
          await sameOnGpu(oneNode(op, [{ name: 'x', t }], attrs, { opset: opset ?? 17 }), EW, op);
        });
      }

      it('Neg and Abs on int64 and int32, Not on bool (odd sizes 1 and 17)', async () => {
        const big = i64([-5, 0, 7, -9007199254740991, 3], [5]);
        await sameOnGpu(oneNode('Neg', [{ name: 'x', t: big }], {}, { outDtypes: ['int64'] }));
        await sameOnGpu(oneNode('Abs', [{ name: 'x', t: i32([-3, 4, -2147483647]) }], {}, { outDtypes: ['int32'] }));
        await sameOnGpu(oneNode('Not', [{ name: 'x', t: bool([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1]) }], {}, { outDtypes: ['bool'] }));
        await sameOnGpu(oneNode('Sigmoid', [{ name: 'x', t: f32([1], 9) }]));
      });

      const binary = ['Add', 'Sub', 'Mul', 'Div'] as const;
      for (const op of binary) {
        it(`${op} broadcasting [2,1,5] x [3,1] and a scalar`, async () => {
          await sameOnGpu(oneNode(op, [{ name: 'a', t: f32([2, 1, 5], 1) }, { name: 'b', t: f32([3, 1], 2, 0.5, 2) }]), EW, op);
          await sameOnGpu(oneNode(op, [{ name: 'a', t: f32([7], 1) }, { name: 'b', t: f32([], 2, 0.5, 2), init: true }]), EW, op);
        });
      }

      it('Pow, with x^2 and a broadcast exponent', async () => {
        await sameOnGpu(oneNode('Pow', [{ name: 'a', t: f32([3, 4], 1, 0.1, 3) }, { name: 'b', t: f32([4], 2, -2, 2) }]), EW);
        await sameOnGpu(oneNode('Pow', [{ name: 'a', t: f32([3, 4], 1) },
          { name: 'b', t: new Tensor('float32', Float32Array.of(2), []), init: true }]), EW);
      });

      it('integer arithmetic (int64 and int32, truncating division, wrap-around) and comparisons to bool', async () => {
        const a = i64([7, -7, 9, 0, -9223372036854775807, 5], [2, 3]);
        const b = i64([2, 3, -4], [3]);
        for (const op of ['Add', 'Sub', 'Mul', 'Div']) await sameOnGpu(oneNode(op, [{ name: 'a', t: a }, { name: 'b', t: b }], {}, { outDtypes: ['int64'] }));
        await sameOnGpu(oneNode('Pow', [{ name: 'a', t: i32([2, -3, 5, 0]) }, { name: 'b', t: i32([3, 3, 0, 2]) }], {}, { outDtypes: ['int32'] }));
        for (const op of ['Equal', 'Less', 'Greater']) {
          await sameOnGpu(oneNode(op, [{ name: 'a', t: a }, { name: 'b', t: b }], {}, { outDtypes: ['bool'] }));
          await sameOnGpu(oneNode(op, [{ name: 'a', t: f32([2, 3], 1) }, { name: 'b', t: f32([3], 1) }], {}, { outDtypes: ['bool'] }));
        }
      });

      it('integer division by zero is a run error naming the node, as on the CPU', async () => {
        const g = oneNode('Div', [{ name: 'a', t: i64([1, 2, 3]) }, { name: 'b', t: i64([1, 0, 1]) }], {}, { outDtypes: ['int64'] });
        const cpu = await load(g.bytes, 'cpu');
        const gpu = await load(g.bytes, 'cuda');
        const cpuErr = await cpu.run(g.feeds).catch((e: Error) => e);
        const gpuErr = await gpu.run(g.feeds).catch((e: Error) => e);
        expect(cpuErr).toBeInstanceOf(InvalidArgumentError);
        expect(gpuErr).toBeInstanceOf(InvalidArgumentError);
        expect((gpuErr as Error).message).toBe((cpuErr as Error).message);
        expect((gpuErr as Error).message).toMatch(/Div_node.*division by zero/);
      });
    });

    describe('nn', () => {
      it('Conv: 3x3 pads, stride 2, dilation, groups, depthwise, 1-D, bias and none (batch 1 and 3)', async () => {
        const cases: [number[], number[], Record<string, unknown>][] = [
          [[1, 3, 7, 6], [4, 3, 3, 3], { pads: [1, 1, 1, 1] }],
          [[3, 3, 7, 6], [5, 3, 3, 3], { pads: [1, 0, 1, 2], strides: [2, 2] }],
          [[1, 4, 9, 9], [4, 2, 3, 3], { group: 2, dilations: [2, 2], pads: [2, 2, 2, 2] }],
          [[3, 6, 5, 5], [6, 1, 3, 3], { group: 6, pads: [1, 1, 1, 1] }],
          [[2, 3, 11], [4, 3, 3], { pads: [1, 1] }],
          [[1, 5, 4, 4], [3, 5, 1, 1], {}],
          [[1, 3, 6, 6], [4, 3, 3, 3], { auto_pad: 'SAME_UPPER', strides: [2, 2] }],
        ];
        for (const [i, [xd, wd, attrs]] of cases.entries()) {
          const withBias = i % 2 === 0;
          const ins = [{ name: 'x', t: f32(xd, 10 + i) }, { name: 'w', t: f32(wd, 20 + i), init: true },
            ...(withBias ? [{ name: 'b', t: f32([wd[0]!], 30 + i), init: true }] : [])];
          const k = wd.slice(1).reduce((a, b) => a * b, 1);
          await sameOnGpu(oneNode('Conv', ins, { kernel_shape: wd.slice(2), ...attrs }), dot(k + 1), `Conv ${i}`);
        }
      });

      it('Conv + BatchNormalization + Relu + residual Add (folded and fused as on the CPU), and an unfolded BatchNormalization', async () => {
        const g = new GraphBuilder('cbr', { opset: 17 });
        g.input('x', 'float32', [3, 4, 5, 5]);
        const w = g.init('w', tensorData(f32([4, 4, 3, 3], 2)));
        const [c] = g.node('Conv', ['x', w], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] });
        const bn = ['s', 'b', 'm', 'v'].map((n, i) => g.init(n, tensorData(f32([4], 40 + i, i === 3 ? 0.5 : -1, i === 3 ? 2 : 1))));
        const [y] = g.node('BatchNormalization', [c, ...bn], {});
        const [r] = g.node('Relu', [y]);
        const [s] = g.node('Add', [r, 'x']);
        const [bn2] = g.node('BatchNormalization', ['x', ...bn], {});
        g.output(s, 'float32');
        g.output(bn2, 'float32');
        await sameOnGpu({ bytes: g.toBytes(), feeds: { x: f32([3, 4, 5, 5], 1) } }, dot(40), 'conv-bn');
      });

      it('Gemm (transA/transB, alpha/beta, C broadcast, runtime B) and MatMul (weights, batched, broadcast, 1-D)', async () => {
        await sameOnGpu(oneNode('Gemm', [{ name: 'a', t: f32([3, 5], 1) }, { name: 'b', t: f32([4, 5], 2), init: true },
          { name: 'c', t: f32([4], 3), init: true }], { transB: 1, alpha: floatAttr(0.5), beta: floatAttr(2) }), dot(6), 'Gemm');
        await sameOnGpu(oneNode('Gemm', [{ name: 'a', t: f32([5, 3], 1) }, { name: 'b', t: f32([5, 4], 2) },
          { name: 'c', t: f32([3, 1], 3) }], { transA: 1 }), dot(6), 'Gemm runtime B');
        await sameOnGpu(oneNode('MatMul', [{ name: 'a', t: f32([2, 3, 7], 1) }, { name: 'b', t: f32([7, 5], 2), init: true }]), dot(7), 'MatMul W');
        await sameOnGpu(oneNode('MatMul', [{ name: 'a', t: f32([2, 1, 3, 17], 1) }, { name: 'b', t: f32([3, 17, 5], 2) }]), dot(17), 'MatMul bcast');
        await sameOnGpu(oneNode('MatMul', [{ name: 'a', t: f32([6], 1) }, { name: 'b', t: f32([2, 6, 3], 2) }]), dot(6), 'MatMul 1-D');
        // Runtime operands across the 64 x 64 tile's edges (m, n above one tile, k not a multiple of 16).
        await sameOnGpu(oneNode('MatMul', [{ name: 'a', t: f32([2, 70, 33], 1) }, { name: 'b', t: f32([33, 67], 2) }]), dot(33), 'MatMul tiles');
        await sameOnGpu(oneNode('Gemm', [{ name: 'a', t: f32([65, 17], 1) }, { name: 'b', t: f32([66, 17], 2) }], { transB: 1 }), dot(17), 'Gemm transB tiles');
      });

      it('fused Gemm + bias + activation + residual (sonde.FusedGemm through the optimiser)', async () => {
        const g = new GraphBuilder('mlp', { opset: 17 });
        g.input('x', 'float32', ['batch', 6]);
        const w = g.init('w', tensorData(f32([6, 5], 2)));
        const b = g.init('b', tensorData(f32([5], 3)));
        const [m] = g.node('MatMul', ['x', w]);
        const [a] = g.node('Add', [m, b]);
        const [r] = g.node('Sigmoid', [a]);
        g.output(r, 'float32');
        for (const batch of [1, 3]) await sameOnGpu({ bytes: g.toBytes(), feeds: { x: f32([batch, 6], batch) } }, dot(7), `mlp ${batch}`);
      });

      it('MaxPool, AveragePool (pads, count_include_pad, ceil_mode), GlobalAveragePool', async () => {
        const x = f32([3, 2, 7, 6], 5);
        await sameOnGpu(oneNode('MaxPool', [{ name: 'x', t: x }], { kernel_shape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1] }));
        await sameOnGpu(oneNode('MaxPool', [{ name: 'x', t: x }], { kernel_shape: [2, 2], strides: [2, 2], ceil_mode: 1 }));
        await sameOnGpu(oneNode('AveragePool', [{ name: 'x', t: x }], { kernel_shape: [3, 2], pads: [1, 1, 1, 0], count_include_pad: 1 }), dot(6));
        await sameOnGpu(oneNode('AveragePool', [{ name: 'x', t: x }], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] }), dot(9));
        await sameOnGpu(oneNode('GlobalAveragePool', [{ name: 'x', t: x }]), dot(42));
      });

      it('Softmax and LogSoftmax along every axis (negative too, opset 11 flattening), LayerNormalization (axis -1 and 1, no bias)', async () => {
        const x = f32([2, 3, 4], 6, -3, 3);
        for (const axis of [-1, 0, 1]) {
          await sameOnGpu(oneNode('Softmax', [{ name: 'x', t: x }], { axis }), dot(4), `Softmax ${axis}`);
          await sameOnGpu(oneNode('LogSoftmax', [{ name: 'x', t: x }], { axis }), dot(4), `LogSoftmax ${axis}`);
        }
        await sameOnGpu(oneNode('Softmax', [{ name: 'x', t: x }], { axis: 1 }, { opset: 11 }), dot(12));
        await sameOnGpu(oneNode('LayerNormalization', [{ name: 'x', t: x }, { name: 's', t: f32([4], 2), init: true },
          { name: 'b', t: f32([4], 3), init: true }], { axis: -1, epsilon: floatAttr(1e-5) }), dot(8));
        await sameOnGpu(oneNode('LayerNormalization', [{ name: 'x', t: x }, { name: 's', t: f32([3, 4], 2), init: true }], { axis: 1 }), dot(24));
      });
    });

    describe('tensor and shape ops', () => {
      it('Transpose, Slice (negative steps and axes), Concat, Split, Expand, Flatten, Reshape, Squeeze, Unsqueeze, Identity, Dropout', async () => {
        const x = f32([2, 3, 4], 7);
        await sameOnGpu(oneNode('Transpose', [{ name: 'x', t: x }], { perm: [2, 0, 1] }));
        await sameOnGpu(oneNode('Slice', [{ name: 'x', t: x }, { name: 's', t: i64([-1, 3]), init: true }, { name: 'e', t: i64([-100, 0]), init: true },
          { name: 'a', t: i64([-1, 1]), init: true }, { name: 'p', t: i64([-2, -1]), init: true }]));
        await sameOnGpu(oneNode('Concat', [{ name: 'x', t: x }, { name: 'y', t: f32([2, 1, 4], 8) }], { axis: -2 }));
        await sameOnGpu(oneNode('Split', [{ name: 'x', t: x }, { name: 's', t: i64([1, 3]), init: true }], { axis: 2 }, { outDtypes: ['float32', 'float32'] }));
        await sameOnGpu(oneNode('Expand', [{ name: 'x', t: f32([3, 1], 2) }, { name: 's', t: i64([2, 1, 4]), init: true }]));
        await sameOnGpu(oneNode('Flatten', [{ name: 'x', t: x }], { axis: 2 }));
        await sameOnGpu(oneNode('Reshape', [{ name: 'x', t: x }, { name: 's', t: i64([0, -1]), init: true }]));
        await sameOnGpu(oneNode('Squeeze', [{ name: 'x', t: f32([2, 1, 3], 1) }, { name: 'a', t: i64([-2]), init: true }]));
        await sameOnGpu(oneNode('Unsqueeze', [{ name: 'x', t: x }, { name: 'a', t: i64([0, -1]), init: true }]));
        await sameOnGpu(oneNode('Identity', [{ name: 'x', t: x }]));
        await sameOnGpu(oneNode('Dropout', [{ name: 'x', t: x }]));
      });

      it('Gather (negative indices, int32 indices, an axis, an initializer table), and an index out of range', async () => {
        const table = f32([5, 3], 4);
        await sameOnGpu(oneNode('Gather', [{ name: 't', t: table, init: true }, { name: 'i', t: i64([4, -1, 0, 2], [2, 2]) }]));
        await sameOnGpu(oneNode('Gather', [{ name: 't', t: f32([2, 5, 3], 4) }, { name: 'i', t: i32([1, -5]) }], { axis: 1 }));
        const bad = oneNode('Gather', [{ name: 't', t: table, init: true }, { name: 'i', t: i64([1, 7]) }]);
        const cpu = await load(bad.bytes, 'cpu');
        const gpu = await load(bad.bytes, 'cuda');
        const cpuErr = await cpu.run(bad.feeds).catch((e: Error) => e);
        const gpuErr = await gpu.run(bad.feeds).catch((e: Error) => e);
        expect(gpuErr).toBeInstanceOf(InvalidArgumentError);
        expect((gpuErr as Error).message).toBe((cpuErr as Error).message);
        expect((gpuErr as Error).message).toMatch(/index 7 is out of range \[-5, 5\)/);
      });

      it('a large initializer (an embedding table) is uploaded once and shared by every plan', async () => {
        const rows = 100, width = 64;
        const g = new GraphBuilder('embed', { opset: 17 });
        g.input('ids', 'int64', ['n']);
        const [e] = g.node('Gather', [g.init('table', tensorData(f32([rows, width], 3))), 'ids'], { axis: 0 });
        g.output(e, 'float32');
        const s = await load(g.toBytes(), 'cuda');
        const cpu = await load(g.toBytes(), 'cpu');
        for (const ids of [[3, 99], [0, -1, 42]]) {
          const feeds = { ids: i64(ids) };
          expectClose(Object.values(await s.run(feeds))[0]!, Object.values(await cpu.run(feeds))[0]!, EW, `embed ${ids.length}`);
        }
        expect(s.cachedPlans).toBe(2);
        // One device copy of the table (plus two small arenas), not one per plan.
        expect(s.deviceBytes).toBeGreaterThanOrEqual(rows * width * 4);
        expect(s.deviceBytes).toBeLessThan(2 * rows * width * 4);
      });

      it('Where (broadcast, every element size), Cast (float <-> ints <-> bool, truncation)', async () => {
        const cond = bool([1, 0, 1], [3]);
        await sameOnGpu(oneNode('Where', [{ name: 'c', t: cond }, { name: 'x', t: f32([2, 3], 1) }, { name: 'y', t: f32([2, 1], 2) }]));
        await sameOnGpu(oneNode('Where', [{ name: 'c', t: cond }, { name: 'x', t: i64([1, 2, 3]) }, { name: 'y', t: i64([-1]) }], {}, { outDtypes: ['int64'] }));
        await sameOnGpu(oneNode('Where', [{ name: 'c', t: cond }, { name: 'x', t: bool([1, 1, 1]) }, { name: 'y', t: bool([0]) }], {}, { outDtypes: ['bool'] }));
        const v = new Tensor('float32', Float32Array.of(-2.7, -0.5, 0, 0.5, 3.9, 1e10, Number.NaN), [7]);
        const to = { int64: 7, int32: 6, bool: 9, float32: 1 } as const;
        for (const [name, code] of Object.entries(to)) {
          await sameOnGpu(oneNode('Cast', [{ name: 'x', t: v }], { to: code }, { outDtypes: [name as DT] }), EW, `Cast ${name}`);
        }
        await sameOnGpu(oneNode('Cast', [{ name: 'x', t: i64([-3, 0, 5]) }], { to: 1 }));
        await sameOnGpu(oneNode('Cast', [{ name: 'x', t: i64([-3, 0, 4294967301]) }], { to: 6 }, { outDtypes: ['int32'] }));
        await sameOnGpu(oneNode('Cast', [{ name: 'x', t: bool([1, 0]) }], { to: 1 }));
      });

      it('Pad (constant, reflect, edge, negative pads)', async () => {
        const x = f32([2, 3, 4], 3);
        for (const mode of ['constant', 'reflect', 'edge']) {
          await sameOnGpu(oneNode('Pad', [{ name: 'x', t: x }, { name: 'p', t: i64([0, 1, 2, 1, 2, 1]), init: true },
            { name: 'v', t: new Tensor('float32', Float32Array.of(0.25), []), init: true }], { mode }), EW, `Pad ${mode}`);
        }
        await sameOnGpu(oneNode('Pad', [{ name: 'x', t: x }, { name: 'p', t: i64([0, -1, 1, 0, 0, -2]), init: true }]));
      });

      it('ReduceSum/Mean/Max/Min (keepdims, negative axes, int64), ArgMax (last index), TopK (largest and smallest)', async () => {
        const x = f32([3, 4, 5], 2);
        for (const op of ['ReduceSum', 'ReduceMean', 'ReduceMax', 'ReduceMin']) {
          const opset = op === 'ReduceSum' ? 13 : 18;
          await sameOnGpu(oneNode(op, [{ name: 'x', t: x }, { name: 'a', t: i64([-1]), init: true }], { keepdims: 0 }, { opset }), dot(5), op);
          await sameOnGpu(oneNode(op, [{ name: 'x', t: x }, { name: 'a', t: i64([0, 2]), init: true }], {}, { opset }), dot(15), op);
        }
        await sameOnGpu(oneNode('ReduceSum', [{ name: 'x', t: i64([1, 2, 3, 4, 5, 6], [2, 3]) }, { name: 'a', t: i64([1]), init: true }], {},
          { opset: 13, outDtypes: ['int64'] }));
        const ties = new Tensor('float32', Float32Array.of(1, 3, 3, 0, 2, 2, 2, 1), [2, 4]);
        await sameOnGpu(oneNode('ArgMax', [{ name: 'x', t: ties }], { axis: -1 }, { outDtypes: ['int64'] }));
        await sameOnGpu(oneNode('ArgMax', [{ name: 'x', t: ties }], { axis: 1, select_last_index: 1, keepdims: 0 }, { outDtypes: ['int64'] }));
        await sameOnGpu(oneNode('ArgMax', [{ name: 'x', t: x }], { axis: 0 }, { outDtypes: ['int64'] }));
        for (const largest of [1, 0]) {
          await sameOnGpu(oneNode('TopK', [{ name: 'x', t: x }, { name: 'k', t: i64([3]), init: true }], { axis: 1, largest },
            { outDtypes: ['float32', 'int64'] }));
        }
      });

      it('int64 shape arithmetic: Shape -> Gather -> Mul -> Concat -> Reshape, ConstantOfShape, Range, Constant', async () => {
        const g = new GraphBuilder('shapes', { opset: 17 });
        g.input('x', 'float32', ['n', 3, 4]);
        const [shape] = g.node('Shape', ['x']);
        const idx = g.init('idx', tensorData(i64([1])));
        const [c] = g.node('Gather', [shape, idx], { axis: 0 });
        const four = g.init('four', tensorData(i64([4])));
        const [cw] = g.node('Mul', [c, four]);
        const [n] = g.node('Gather', [shape, g.init('zero', tensorData(i64([0])))], { axis: 0 });
        const [newShape] = g.node('Concat', [n, cw], { axis: 0 });
        const [flat] = g.node('Reshape', ['x', newShape]);
        const [ones] = g.node('ConstantOfShape', [newShape], { value: tensorData(new Tensor('float32', Float32Array.of(0.5), [1])) });
        const [sum] = g.node('Add', [flat, ones]);
        const [k] = g.node('Constant', [], { value: tensorData(new Tensor('float32', Float32Array.of(12), [])) });
        const [r] = g.node('Range', [g.init('s0', tensorData(new Tensor('float32', Float32Array.of(0), []))), k,
          g.init('d', tensorData(new Tensor('float32', Float32Array.of(1), [])))]);
        const [out] = g.node('Mul', [sum, r]);
        g.output(out, 'float32');
        for (const batch of [1, 3]) await sameOnGpu({ bytes: g.toBytes(), feeds: { x: f32([batch, 3, 4], batch) } }, EW, `shapes ${batch}`);
      });
    });

    describe('models', () => {
      it('digits.onnx on its test split, batch 1 and 3 (and the whole split in one batch)', async () => {
        const split = readTestSplit();
        const bytes = new Uint8Array(readFileSync(modelPath));
        const dimsOf = (b: number) => [b, 1, split.height, split.width];
        for (const batch of [1, 3, 16]) {
          const feeds = { image: new Tensor('float32', split.images.slice(0, batch * 64), dimsOf(batch)) };
          await sameOnGpu({ bytes, feeds }, { atol: 1e-4, rtol: 1e-4 }, `digits ${batch}`);
        }
      });

      it('digits.onnx with precision bf16 stays within bf16 rounding of the fp32 CPU run', async () => {
        const split = readTestSplit();
        const bytes = new Uint8Array(readFileSync(modelPath));
        const feeds = { image: new Tensor('float32', split.images.slice(0, 3 * 64), [3, 1, split.height, split.width]) };
        const cpu = await load(bytes, 'cpu');
        const gpu = await load(bytes, 'cuda', { precision: 'bf16' });
        const want = (await cpu.run(feeds)).logits!.data as Float32Array;
        const got = (await gpu.run(feeds)).logits!.data as Float32Array;
        const scale = Math.max(...Array.from(want, Math.abs));
        // bf16 keeps 8 bits of mantissa: a few layers of 2^-8 relative weight error.
        for (let i = 0; i < want.length; i++) expect(Math.abs(got[i]! - want[i]!)).toBeLessThan(0.05 * scale);
      });
    });

    describe('session behaviour', () => {
      const mlp = () => {
        const g = new GraphBuilder('mlp', { opset: 17 });
        g.input('x', 'float32', ['batch', 8]);
        const [h] = g.node('Gemm', ['x', g.init('w', tensorData(f32([8, 8], 3))), g.init('b', tensorData(f32([8], 4)))]);
        const [r] = g.node('Relu', [h]);
        const [y] = g.node('Gemm', [r, g.init('w2', tensorData(f32([8, 4], 5)))]);
        g.output(y, 'float32');
        return g.toBytes();
      };

      it('device says cuda; dispose frees the device memory it held', async () => {
        const before = gpuDevice(target.id).inUse;
        route();
        const s = await Session.load(mlp(), { device: 'cuda' });
        expect(s.device).toEqual({ kind: 'cuda', id: 'cuda:0' });
        await s.run({ x: f32([2, 8], 1) });
        await s.run({ x: f32([5, 8], 1) });
        expect(s.deviceBytes).toBeGreaterThanOrEqual((8 * 8 + 8 + 8 * 4) * 4);
        expect(gpuDevice(target.id).inUse).toBeGreaterThan(before);
        s.dispose();
        expect(gpuDevice(target.id).inUse).toBe(before);
      });

      it('concurrent runs of different inputs each get their own results', async () => {
        const cpu = await load(mlp(), 'cpu');
        const gpu = await load(mlp(), 'cuda');
        const feeds = [1, 2, 3, 4, 5].map((i) => ({ x: f32([i, 8], i) }));
        const [want, got] = await Promise.all([Promise.all(feeds.map((f) => cpu.run(f))), Promise.all(feeds.map((f) => gpu.run(f)))]);
        for (let i = 0; i < feeds.length; i++) expectClose(Object.values(got[i]!)[0]!, Object.values(want[i]!)[0]!, dot(9), `run ${i}`);
      });

      it('dynamic batching merges concurrent runs into one GPU run and splits the rows back', async () => {
        const cpu = await load(mlp(), 'cpu');
        const gpu = await load(mlp(), 'cuda', { batching: { maxBatchSize: 8, maxDelayMs: 20 } });
        const feeds = [1, 2, 1].map((rows, i) => ({ x: f32([rows, 8], 10 + i) }));
        const [want, got] = await Promise.all([Promise.all(feeds.map((f) => cpu.run(f))), Promise.all(feeds.map((f) => gpu.run(f)))]);
        for (let i = 0; i < feeds.length; i++) expectClose(Object.values(got[i]!)[0]!, Object.values(want[i]!)[0]!, dot(9), `batched ${i}`);
        expect(gpu.metrics().batchSize.count).toBeGreaterThan(0);
      });

      it('a GPU session in a worker_thread gives the main thread\'s results', async () => {
        const bytes = mlp();
        const x = f32([3, 8], 4);
        const code = `const { parentPort, workerData } = require('node:worker_threads');
          (async () => {
            if (workerData.emulated) process.env.SONDE_CUDA_DEVICE = 'emulated';
            else delete process.env.SONDE_CUDA_DEVICE;
            const { Session, Tensor } = await import(workerData.index);
            const s = await Session.load(workerData.bytes, { device: 'cuda' });
            const out = await s.run({ x: new Tensor('float32', workerData.x, [3, 8]) });
            parentPort.postMessage({ kind: s.device.kind, data: Object.values(out)[0].data });
            s.dispose();
          })().catch((e) => parentPort.postMessage({ error: String(e && e.stack || e) }));`;
        const worker = new Worker(code, { eval: true, workerData: { bytes, x: x.data, emulated: target.emulated,
          index: new URL('../../dist/index.js', import.meta.url).href } });
        const msg = await new Promise<{ kind?: string; data?: Float32Array; error?: string }>((resolve, reject) => {
          worker.once('message', resolve);
          worker.once('error', reject);
        });
        await worker.terminate();
        expect(msg.error).toBeUndefined();
        expect(msg.kind).toBe('cuda');
        const cpu = await load(bytes, 'cpu');
        const want = Object.values(await cpu.run({ x }))[0]!;
        expectClose(new Tensor('float32', msg.data!, [3, 4]), want, dot(9), 'worker');
      });

      it('abort: an aborted signal rejects with AbortError, and the session still runs', async () => {
        const gpu = await load(mlp(), 'cuda');
        const ac = new AbortController();
        ac.abort();
        await expect(gpu.run({ x: f32([2, 8], 1) }, { signal: ac.signal })).rejects.toBeInstanceOf(AbortError);
        const ac2 = new AbortController();
        const p = gpu.run({ x: f32([64, 8], 1) }, { signal: ac2.signal });
        ac2.abort();
        const r = await p.catch((e: Error) => e);
        // Either it finished before the abort was seen between steps, or it stopped with AbortError.
        if (r instanceof Error) expect(r).toBeInstanceOf(AbortError);
        const ok = await gpu.run({ x: f32([2, 8], 1) });
        expect(Object.values(ok)[0]!.dims).toEqual([2, 4]);
      });

      it('a run whose arena exceeds the device memory is OutOfMemoryError naming the device and the request', async () => {
        // x [1] expanded to more floats than the device holds, then summed to one value: the
        // intermediate lives in the run's arena, which cannot be allocated.
        const total = gpuDevice(target.id).totalMemory;
        const n = Math.ceil(total / 4) + (1 << 20);
        const g = new GraphBuilder('big', { opset: 17 });
        g.input('x', 'float32', [1]);
        const [big] = g.node('Expand', ['x', g.init('shape', tensorData(i64([n])))]);
        const [sum] = g.node('ReduceSum', [big], { keepdims: 0 });
        g.output(sum, 'float32');
        const s = await load(g.toBytes(), 'cuda');
        const before = gpuDevice(target.id).inUse;
        const err = await s.run({ x: new Tensor('float32', Float32Array.of(1), [1]) }).catch((e: Error) => e);
        expect(err).toBeInstanceOf(OutOfMemoryError);
        expect((err as Error).message).toMatch(new RegExp(`${target.id}.*arena|arena.*${target.id}`));
        expect(gpuDevice(target.id).inUse).toBe(before);
      });

      it('bad feeds give the same typed errors as on the CPU', async () => {
        const cpu = await load(mlp(), 'cpu');
        const gpu = await load(mlp(), 'cuda');
        const bad: unknown[] = [{}, { x: f32([2, 7], 1) }, { x: i64([1, 2]) }, { y: f32([1, 8], 1) }, { x: 3 }];
        for (const feeds of bad) {
          const a = await cpu.run(feeds as never).catch((e: Error) => e);
          const b = await gpu.run(feeds as never).catch((e: Error) => e);
          expect(b).toBeInstanceOf(InvalidArgumentError);
          expect((b as Error).message).toBe((a as Error).message);
        }
      });

      it('profile() reports one record per step with device times', async () => {
        const gpu = await load(mlp(), 'cuda');
        const prof = await gpu.profile({ x: f32([2, 8], 1) }, { runs: 2 });
        expect(prof.map((p) => p.op)).toContain('gpuGemm');
        for (const p of prof) expect(p.ms).toBeGreaterThanOrEqual(0);
        expect(prof.reduce((a, p) => a + p.share, 0)).toBeCloseTo(1, 5);
      });

      it('an op with no GPU path is an error at load naming it; fallback cpu runs the whole session on the CPU and says why', async () => {
        // A depthwise conv of stride 8: its GPU tile's input window needs more shared memory than any
        // device has (the CPU runs it).
        const g = oneNode('Conv', [{ name: 'x', t: f32([1, 2, 9, 9], 1) }, { name: 'w', t: f32([2, 1, 3, 3], 2), init: true }],
          { kernel_shape: [3, 3], group: 2, strides: [8, 8] });
        route();
        const err = await Session.load(g.bytes, { device: 'cuda' }).catch((e: Error) => e);
        expect(err).toBeInstanceOf(UnsupportedOperatorError);
        expect((err as Error).message).toMatch(/node 'Conv_node' \(Conv\): its depthwise window needs \d+ bytes of shared memory/);
        const s = await load(g.bytes, 'cuda', { fallback: 'cpu' });
        expect(s.device.kind).toBe('cpu');
        expect(s.device.reason).toMatch(/Conv_node/);
        const cpu = await load(g.bytes, 'cpu');
        expectClose(Object.values(await s.run(g.feeds))[0]!, Object.values(await cpu.run(g.feeds))[0]!, { atol: 0, rtol: 0 }, 'fallback');
      });
    });
  });
}
