// The graph compiler without the native executor: plan specs (steps, strides, buffers), the memory
// planner's invariants, plan-time evaluation against scalar loops written here, and typed errors.
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, ModelFormatError, UnsupportedOperatorError } from '../dist/index.js';
import { parseModel } from '../dist/onnx/model.js';
import { ARENA_ALIGN, compilePlan, evaluateConstantNode, planArena } from '../dist/session/compile.js';
import type { PlanInput } from '../dist/session/compile.js';
import type { PlanSpec, PlanStep } from '../dist/session/plan.js';
import { GraphBuilder, int64Tensor, randomTensor } from '../bench/graphs/builder.js';

function compile(g: GraphBuilder, inputs: PlanInput[]) {
  const m = parseModel(g.toBytes());
  return compilePlan(m.graph, inputs, { opset: m.opset });
}

/** Every ref of a step, with the field name. */
function refsOf(step: PlanStep): [string, { buffer: number; offset: number }][] {
  return Object.entries(step).filter(([, v]) => v && typeof v === 'object' && 'buffer' in v) as never;
}

const WRITES = new Set(['y', 'c', 'out', 'values', 'indices']);

/** Invariants every spec must satisfy: inputs never written; arena ranges aligned, in bounds and disjoint while live. */
function checkSpec(spec: PlanSpec): void {
  const live = new Map<number, [number, number]>();
  spec.steps.forEach((s, i) => {
    for (const [field, r] of refsOf(s)) {
      const b = spec.buffers[r.buffer];
      expect(b, `step ${i} ${field}`).toBeDefined();
      if (WRITES.has(field) && !(s.op === 'gather' && field === 'indices')) {
        expect(b!.kind, `step ${i} (${s.op}) writes ${field} into a read-only buffer`).not.toMatch(/input|const/);
      }
      const l = live.get(r.buffer);
      live.set(r.buffer, l ? [Math.min(l[0], i), Math.max(l[1], i)] : [i, i]);
    }
  });
  const arena = spec.buffers.map((b, i) => [b, i] as const).filter(([b]) => b.kind === 'arena');
  for (const [b] of arena) {
    if (b.kind !== 'arena') continue;
    expect(b.offset % ARENA_ALIGN).toBe(0);
    expect(b.offset + b.bytes).toBeLessThanOrEqual(spec.arenaBytes);
  }
  for (const [b1, i1] of arena) {
    for (const [b2, i2] of arena) {
      if (i1 >= i2 || b1.kind !== 'arena' || b2.kind !== 'arena') continue;
      const [l1, l2] = [live.get(i1)!, live.get(i2)!];
      const timeOverlap = l1[0] <= l2[1] && l2[0] <= l1[1];
      const memOverlap = b1.offset < b2.offset + b2.bytes && b2.offset < b1.offset + b1.bytes;
      expect(timeOverlap && memOverlap, `arena buffers ${i1} and ${i2} overlap while both live`).toBe(false);
    }
  }
}

describe('memory planner', () => {
  it('packs random lifetimes without overlap, 64-byte aligned, and reuses dead ranges', () => {
    let seed = 7;
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    for (let trial = 0; trial < 50; trial++) {
      const items = Array.from({ length: 1 + Math.floor(rand() * 30) }, () => {
        const first = Math.floor(rand() * 40);
        return { bytes: Math.floor(rand() * 5000), first, last: first + Math.floor(rand() * 10) };
      });
      const { offsets, total } = planArena(items);
      let peak = 0;
      for (let t = 0; t < 60; t++) {
        peak = Math.max(peak, items.filter((x) => x.first <= t && t <= x.last).reduce((a, x) => a + Math.ceil(Math.max(x.bytes, 1) / 64) * 64, 0));
      }
      expect(total).toBeGreaterThanOrEqual(peak);
      items.forEach((a, i) => {
        expect(offsets[i]! % 64).toBe(0);
        expect(offsets[i]! + a.bytes).toBeLessThanOrEqual(total);
        items.forEach((b, j) => {
          if (j <= i) return;
          const time = a.first <= b.last && b.first <= a.last;
          const mem = offsets[i]! < offsets[j]! + Math.max(b.bytes, 1) && offsets[j]! < offsets[i]! + Math.max(a.bytes, 1);
          expect(time && mem).toBe(false);
        });
      });
    }
  });

  it('a chain of four elementwise ops needs two arena ranges, not three', () => {
    const g = new GraphBuilder('chain', { opset: 17 });
    g.input('x', 'float32', ['n', 100]);
    const [a] = g.node('Relu', ['x']);
    const [b] = g.node('Sigmoid', [a]);
    const [c] = g.node('Tanh', [b]);
    const [d] = g.node('Exp', [c]);
    g.output(d, 'float32');
    const { spec, outputs } = compile(g, [{ name: 'x', dtype: 'float32', shape: [3, 100] }]);
    checkSpec(spec);
    expect(spec.steps.map((s) => s.op === 'unary' && s.kind)).toEqual(['relu', 'sigmoid', 'tanh', 'exp']);
    expect(spec.steps[0]!.node).toBe('Relu_0');
    // 1200 bytes rounds to 1216; the relu and tanh outputs share a range, sigmoid's is the other.
    expect(spec.arenaBytes).toBe(2 * 1216);
    const last = spec.steps[3] as Extract<PlanStep, { op: 'unary' }>;
    expect(spec.buffers[last.y.buffer]).toEqual({ kind: 'output', index: 0, bytes: 1200 });
    expect(spec.inputBytes).toEqual([1200]);
    expect(spec.outputBytes).toEqual([1200]);
    expect(outputs).toEqual([{ name: d, dtype: 'float32', shape: [3, 100], index: 0 }]);
  });

  it('an output that is an input, or already another output, gets a copy; a plan-time output comes back from TS', () => {
    const g = new GraphBuilder('outs', { opset: 17 });
    g.input('x', 'float32', [2, 3]);
    const [r] = g.node('Relu', ['x']);
    const [k] = g.node('Add', [g.init('s', int64Tensor([2, 3])), g.init('t', int64Tensor([5]))]);
    g.output(r);
    g.output('x');
    g.output(k, 'int64');
    const m = parseModel(g.toBytes());
    // The same value listed twice is one node output read by two graph outputs.
    m.graph.outputs.push({ name: r, dtype: 'float32' });
    const { spec, outputs } = compilePlan(m.graph, [{ name: 'x', dtype: 'float32', shape: [2, 3] }], { opset: 17 });
    checkSpec(spec);
    expect(outputs.map((o) => o.index)).toEqual([0, 1, undefined, 2]);
    expect(Array.from(outputs[2]!.constant!.data as BigInt64Array)).toEqual([7n, 8n]);
    const copies = spec.steps.filter((s) => s.op === 'copy') as Extract<PlanStep, { op: 'copy' }>[];
    expect(copies).toHaveLength(2);
    expect(spec.buffers[copies[0]!.x.buffer]!.kind).toBe('input');
    expect(spec.buffers[copies[0]!.y.buffer]).toEqual({ kind: 'output', index: 1, bytes: 24 });
    expect(spec.buffers[copies[1]!.x.buffer]).toEqual({ kind: 'output', index: 0, bytes: 24 });
    expect(spec.buffers[copies[1]!.y.buffer]).toEqual({ kind: 'output', index: 2, bytes: 24 });
    expect(spec.outputBytes).toEqual([24, 24, 24]);
  });

  it('one const buffer per distinct tensor, even when read twice', () => {
    const g = new GraphBuilder('consts', { opset: 17 });
    g.input('x', 'float32', [4]);
    const w = g.init('w', randomTensor([4]));
    const [a] = g.node('Mul', ['x', w]);
    const [b] = g.node('Add', [a, w]);
    g.output(b);
    const { spec } = compile(g, [{ name: 'x', dtype: 'float32', shape: [4] }]);
    checkSpec(spec);
    expect(spec.buffers.filter((x) => x.kind === 'const')).toHaveLength(1);
  });
});

describe('lowering', () => {
  it('binary broadcast strides, merged where every operand is contiguous', () => {
    const g = new GraphBuilder('bin', { opset: 17 });
    g.input('a', 'float32', [2, 3, 4]);
    g.input('b', 'float32', [3, 1]);
    g.input('c', 'float32', [2, 3, 4]);
    const [y] = g.node('Add', ['a', 'b']);
    const [z] = g.node('Mul', ['c', y]);
    const [q] = g.node('Less', ['a', z]);
    g.output(q, 'bool');
    const { spec, outputs } = compile(g, [
      { name: 'a', dtype: 'float32', shape: [2, 3, 4] }, { name: 'b', dtype: 'float32', shape: [3, 1] },
      { name: 'c', dtype: 'float32', shape: [2, 3, 4] }]);
    checkSpec(spec);
    const [add, mul, less] = spec.steps as Extract<PlanStep, { op: 'binary' }>[];
    expect([add!.dims, add!.aStrides, add!.bStrides]).toEqual([[2, 3, 4], [12, 4, 1], [0, 1, 0]]);
    expect([mul!.dims, mul!.aStrides, mul!.bStrides]).toEqual([[24], [1], [1]]);
    expect(less!.kind).toBe('less');
    expect(less!.dtype).toBe('float32');
    expect(outputs[0]!.dtype).toBe('bool');
    expect(spec.outputBytes).toEqual([24]);
  });

  it('MatMul of runtime tensors: broadcast batch strides and 1-D operands', () => {
    const g = new GraphBuilder('mm', { opset: 17 });
    g.input('a', 'float32', [2, 1, 3, 4]);
    g.input('b', 'float32', [5, 4, 6]);
    g.input('v', 'float32', [6]);
    const [y] = g.node('MatMul', ['a', 'b']);
    const [z] = g.node('MatMul', [y, 'v']);
    g.output(z);
    const { spec, outputs } = compile(g, [
      { name: 'a', dtype: 'float32', shape: [2, 1, 3, 4] }, { name: 'b', dtype: 'float32', shape: [5, 4, 6] },
      { name: 'v', dtype: 'float32', shape: [6] }]);
    checkSpec(spec);
    const [m1, m2] = spec.steps as Extract<PlanStep, { op: 'matmul' }>[];
    expect([m1!.batchDims, m1!.aBatchStrides, m1!.bBatchStrides, m1!.m, m1!.k, m1!.n]).toEqual([[2, 5], [12, 0], [0, 24], 3, 4, 6]);
    // [2, 5, 3, 6] . [6] -> [2, 5, 3]: the batch merges into one axis of 10 with v shared.
    expect([m2!.batchDims, m2!.aBatchStrides, m2!.bBatchStrides, m2!.m, m2!.k, m2!.n]).toEqual([[10], [18], [0], 3, 6, 1]);
    expect(outputs[0]!.shape).toEqual([2, 5, 3]);
  });

  it('Softmax: opset 11 flattens at axis (default 1), opset 13 normalises one axis (default -1)', () => {
    for (const [opset, axis, want] of [
      [11, undefined, [2, 60, 1]], [11, -1, [24, 5, 1]], [11, 2, [6, 20, 1]],
      [13, undefined, [24, 5, 1]], [13, 1, [2, 3, 20]], [13, -3, [2, 3, 20]], [13, -4, [1, 2, 60]],
    ] as const) {
      const g = new GraphBuilder('sm', { opset });
      g.input('x', 'float32', [2, 3, 4, 5]);
      const [y] = g.node('LogSoftmax', ['x'], { axis });
      g.output(y);
      const { spec } = compile(g, [{ name: 'x', dtype: 'float32', shape: [2, 3, 4, 5] }]);
      const s = spec.steps[0] as Extract<PlanStep, { op: 'softmax' }>;
      expect([s.outer, s.axis, s.inner], `opset ${opset} axis ${axis}`).toEqual(want);
      expect(s.log).toBe(true);
    }
  });

  it('BatchNormalization becomes channelAffine with scale/shift folded in double', () => {
    const g = new GraphBuilder('bn', { opset: 15 });
    g.input('x', 'float32', [2, 3, 4]);
    const p = (n: string, v: number[]) => g.init(n, { dtype: 'float32', dims: [3], data: Float32Array.from(v) });
    const [y] = g.node('BatchNormalization', ['x', p('s', [1, 2, -1]), p('b', [0.5, 0, 1]), p('m', [1, -1, 0]), p('v', [3, 0.25, 1])], { epsilon: 1e-3 });
    g.output(y);
    const { spec } = compile(g, [{ name: 'x', dtype: 'float32', shape: [2, 3, 4] }]);
    const s = spec.steps[0] as Extract<PlanStep, { op: 'channelAffine' }>;
    expect([s.outer, s.channels, s.inner]).toEqual([2, 3, 4]);
    const scale = (spec.buffers[s.scale.buffer] as { data: Float32Array }).data;
    const shift = (spec.buffers[s.shift.buffer] as { data: Float32Array }).data;
    const want = [[1, 0.5, 1, 3], [2, 0, -1, 0.25], [-1, 1, 0, 1]].map(([sc, b, m, v]) => {
      const k = sc! / Math.sqrt(v! + 1e-3);
      return [Math.fround(k), Math.fround(b! - m! * k)];
    });
    expect(Array.from(scale)).toEqual(want.map((w) => w[0]));
    expect(Array.from(shift)).toEqual(want.map((w) => w[1]));
  });

  it('pooling resolves SAME pads and ceil_mode as onnxruntime', () => {
    const cases = [
      { attrs: { kernel_shape: [2, 2], strides: [2, 2], auto_pad: 'SAME_UPPER' }, out: [4, 4], pads: [0, 0, 1, 1] },
      { attrs: { kernel_shape: [2, 2], strides: [2, 2], auto_pad: 'SAME_LOWER' }, out: [4, 4], pads: [1, 1, 0, 0] },
      { attrs: { kernel_shape: [3, 3], strides: [2, 2], auto_pad: 'SAME_UPPER' }, out: [4, 4], pads: [1, 1, 1, 1] },
      { attrs: { kernel_shape: [2, 2], strides: [2, 2], ceil_mode: 1 }, out: [4, 4], pads: [0, 0, 1, 1] },
      { attrs: { kernel_shape: [3, 2], strides: [1, 2], pads: [1, 0, 1, 0] }, out: [7, 3], pads: [1, 0, 1, 0] },
    ];
    for (const c of cases) {
      const g = new GraphBuilder('pool', { opset: 17 });
      g.input('x', 'float32', [1, 2, 7, 7]);
      const [y] = g.node('MaxPool', ['x'], c.attrs);
      g.output(y);
      const { spec, outputs } = compile(g, [{ name: 'x', dtype: 'float32', shape: [1, 2, 7, 7] }]);
      const s = spec.steps[0] as Extract<PlanStep, { op: 'pool' }>;
      expect(outputs[0]!.shape.slice(2), JSON.stringify(c.attrs)).toEqual(c.out);
      expect(s.pads, JSON.stringify(c.attrs)).toEqual(c.pads);
      expect(s.planes).toBe(2);
    }
  });
});

describe('plan-time evaluation', () => {
  it('int64 shape arithmetic with broadcasting matches a scalar loop (division truncates toward zero)', () => {
    const a = [7, -7, 9, 100, -3, 5];
    const b = [2, 3];
    for (const op of ['Add', 'Sub', 'Mul', 'Div', 'Equal', 'Less', 'Greater'] as const) {
      const node = { name: 'n', opType: op, domain: '', inputs: ['a', 'b'], outputs: ['y'], attributes: {} };
      const ta = { dtype: 'int64', dims: [3, 2], data: BigInt64Array.from(a.map(BigInt)), size: 6 };
      const tb = { dtype: 'int64', dims: [2], data: BigInt64Array.from(b.map(BigInt)), size: 2 };
      const [y] = evaluateConstantNode(node, [ta, tb] as never, 17)!;
      const f = { Add: (x: number, z: number) => x + z, Sub: (x: number, z: number) => x - z, Mul: (x: number, z: number) => x * z,
        Div: (x: number, z: number) => Math.trunc(x / z), Equal: (x: number, z: number) => +(x === z),
        Less: (x: number, z: number) => +(x < z), Greater: (x: number, z: number) => +(x > z) }[op];
      const want = a.map((x, i) => f(x, b[i % 2]!));
      expect(Array.from(y!.data as ArrayLike<number | bigint>, Number), op).toEqual(want);
      expect(y!.dims).toEqual([3, 2]);
      expect(y!.dtype).toBe(['Equal', 'Less', 'Greater'].includes(op) ? 'bool' : 'int64');
    }
  });

  it('integer division by zero at plan time is an error naming the node', () => {
    const node = { name: 'div0', opType: 'Div', domain: '', inputs: ['a', 'b'], outputs: ['y'], attributes: {} };
    const t = (v: number[]) => ({ dtype: 'int64', dims: [v.length], data: BigInt64Array.from(v.map(BigInt)), size: v.length });
    expect(() => evaluateConstantNode(node, [t([1, 2]), t([1, 0])] as never, 17)).toThrow(/div0.*division by zero/);
  });

  it('ops without a TS evaluation (Conv, Erf) say so with undefined', () => {
    const node = { name: 'e', opType: 'Erf', domain: '', inputs: ['a'], outputs: ['y'], attributes: {} };
    const t = { dtype: 'float32', dims: [1], data: Float32Array.of(0.5), size: 1 };
    expect(evaluateConstantNode(node, [t] as never, 17)).toBeUndefined();
  });
});

describe('compile errors', () => {
  it('incompatible broadcast is an InvalidArgumentError naming the node', () => {
    const g = new GraphBuilder('bad', { opset: 17 });
    g.input('a', 'float32', ['n', 3]);
    g.input('b', 'float32', [4]);
    const [y] = g.node('Add', ['a', 'b'], {}, 1, { name: 'the_add' });
    g.output(y);
    expect(() => compile(g, [{ name: 'a', dtype: 'float32', shape: [2, 3] }, { name: 'b', dtype: 'float32', shape: [4] }]))
      .toThrow(InvalidArgumentError);
    expect(() => compile(g, [{ name: 'a', dtype: 'float32', shape: [2, 3] }, { name: 'b', dtype: 'float32', shape: [4] }]))
      .toThrow(/node 'the_add' \(Add\).*cannot be broadcast/);
  });

  it('a bad attribute type and an out-of-range axis are ModelFormatErrors naming the node', () => {
    const g = new GraphBuilder('bad', { opset: 17 });
    g.input('x', 'float32', [2, 3]);
    const [y] = g.node('Softmax', ['x'], { axis: 2 }, 1, { name: 'sm' });
    g.output(y);
    expect(() => compile(g, [{ name: 'x', dtype: 'float32', shape: [2, 3] }])).toThrow(ModelFormatError);
    expect(() => compile(g, [{ name: 'x', dtype: 'float32', shape: [2, 3] }])).toThrow(/node 'sm'.*axis 2 is out of range/);
    const h = new GraphBuilder('bad2', { opset: 17 });
    h.input('x', 'float32', [2, 3]);
    const [z] = h.node('LeakyRelu', ['x'], { alpha: 'big' }, 1, { name: 'lr' });
    h.output(z);
    expect(() => compile(h, [{ name: 'x', dtype: 'float32', shape: [2, 3] }])).toThrow(/node 'lr'.*'alpha' must be a float/);
  });

  it('an op outside the registry is an UnsupportedOperatorError', () => {
    const g = new GraphBuilder('bad', { opset: 17 });
    g.input('x', 'float32', [2]);
    const [y] = g.node('Celu', ['x']);
    g.output(y);
    expect(() => compile(g, [{ name: 'x', dtype: 'float32', shape: [2] }])).toThrow(UnsupportedOperatorError);
  });

  it('dtype mismatch in a binary op is a ModelFormatError', () => {
    const g = new GraphBuilder('bad', { opset: 17 });
    g.input('x', 'float32', [2]);
    g.input('i', 'int64', [2]);
    const [y] = g.node('Add', ['x', 'i']);
    g.output(y);
    expect(() => compile(g, [{ name: 'x', dtype: 'float32', shape: [2] }, { name: 'i', dtype: 'int64', shape: [2] }]))
      .toThrow(/different dtypes/);
  });
});
