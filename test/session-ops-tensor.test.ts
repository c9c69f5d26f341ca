// The tensor, shape and reduction ops of the graph compiler against onnxruntime-node: each case is
// a one-node ONNX graph run in onnxruntime; sonde's infer + evaluate (all inputs known at plan
// time) and its lowering run on the host with the data inputs as run-time values (the steps a
// plan would execute) must both give onnxruntime's outputs.
import { describe, expect, it } from 'vitest';
import ort from 'onnxruntime-node';
import { GraphBuilder, randomTensor, int64Tensor, float32Tensor, floatAttr } from '../bench/graphs/builder.js';
import { InvalidArgumentError, ModelFormatError, Tensor, UnsupportedOperatorError } from '../dist/index.js';
import { parseModel } from '../dist/onnx/model.js';
import { TENSOR_OPS } from '../dist/session/ops/tensor.js';
import { REDUCE_OPS } from '../dist/session/ops/reduce.js';
import { lowerOnHost } from '../dist/session/ops/host.js';
import { attrsOf, mergeDims } from '../dist/session/ops/util.js';
import type { CValue, Emitter, OpContext, OpDef, OutputInfo } from '../lib/session/ops/types.js';
import type { PlanStep } from '../lib/session/plan.js';

type DT = 'float32' | 'int64' | 'int32' | 'bool' | 'uint8' | 'int8';
interface T { dtype: DT; dims: number[]; data: Float32Array | BigInt64Array | Int32Array | Uint8Array | Int8Array }
interface Case {
  name: string;
  op: string;
  opset?: number;
  /** null = an absent optional input ('' in the node). */
  inputs: (T | null)[];
  attrs?: Record<string, unknown>;
  outputs?: number;
  /** Inputs the compiler sees as run-time values in the lowering check (default [0]). */
  runtime?: number[];
  /** Relative tolerance for float outputs (0 = exact). */
  tol?: number;
}

const OPS: Record<string, OpDef> = { ...TENSOR_OPS, ...REDUCE_OPS };

const f32 = (dims: number[], seed = 1): T => randomTensor(dims, { seed }) as T;
const i64 = (values: number[], dims?: number[]): T => int64Tensor(values, dims) as T;
const i32 = (values: number[], dims = [values.length]): T => ({ dtype: 'int32', dims, data: Int32Array.from(values) });
const bool = (values: number[], dims = [values.length]): T => ({ dtype: 'bool', dims, data: Uint8Array.from(values) });
const fl = (values: number[], dims?: number[]): T => float32Tensor(values, dims) as T;
const iota = (dims: number[]): T => fl(Array.from({ length: dims.reduce((a, b) => a * b, 1) }, (_, i) => i), dims);

function build(c: Case, outDtypes?: string[]) {
  const opset = c.opset ?? 17;
  const g = new GraphBuilder('t', { opset });
  const names = c.inputs.map((t, i) => (t ? g.input(`in${i}`, t.dtype, t.dims) : ''));
  const outs = Array.from({ length: c.outputs ?? 1 }, (_, i) => `out${i}`);
  g.node(c.op, names, c.attrs ?? {}, outs, { name: `${c.op}_node` });
  outs.forEach((o, i) => g.output(o, outDtypes?.[i] ?? 'float32'));
  return g.toBytes() as Uint8Array;
}

function tensorOf(t: T): Tensor {
  return new Tensor(t.dtype, t.data as never, t.dims);
}

function context(c: Case, known: boolean): OpContext {
  const model = parseModel(build(c));
  const node = model.graph.nodes[0]!;
  const runtime = new Set(c.runtime ?? [0]);
  const inputs: (CValue | undefined)[] = c.inputs.map((t, i) => {
    if (!t) return undefined;
    return { dtype: t.dtype, shape: [...t.dims], value: known || !runtime.has(i) ? tensorOf(t) : undefined };
  });
  const fail = (message: string, options?: { input?: boolean }): never => {
    const msg = `node '${node.name}': ${message}`;
    throw options?.input ? new InvalidArgumentError(msg) : new ModelFormatError(msg);
  };
  return { node, opset: model.opset, inputs, attrs: attrsOf(node, fail), fail };
}

async function runOrt(c: Case, outDtypes: string[]) {
  const session = await ort.InferenceSession.create(build(c, outDtypes));
  const feeds: Record<string, ort.Tensor> = {};
  c.inputs.forEach((t, i) => { if (t) feeds[`in${i}`] = new ort.Tensor(t.dtype, t.data as never, t.dims); });
  const res = await session.run(feeds);
  return outDtypes.map((_, i) => res[`out${i}`]!);
}

function expectSame(got: Tensor, want: ort.Tensor, tol: number, what: string) {
  expect(got.dtype, `${what} dtype`).toBe(want.type);
  expect([...got.dims], `${what} dims`).toEqual([...want.dims]);
  const g = Array.from(got.data as ArrayLike<number | bigint>);
  const w = Array.from(want.data as ArrayLike<number | bigint>);
  expect(g.length).toBe(w.length);
  for (let i = 0; i < w.length; i++) {
    const a = g[i]!;
    const b = w[i]!;
    if (typeof b === 'bigint' || typeof a === 'bigint') {
      expect(BigInt(a), `${what}[${i}]`).toBe(BigInt(b));
    } else if (Number.isNaN(b)) {
      expect(Number.isNaN(a), `${what}[${i}] NaN`).toBe(true);
    } else if (tol === 0 || !Number.isFinite(b)) {
      expect(Number(a), `${what}[${i}]`).toBe(Number(b));
    } else {
      expect(Math.abs(Number(a) - b), `${what}[${i}] = ${a} vs ${b}`).toBeLessThanOrEqual(tol * (1 + Math.abs(b)));
    }
  }
}

async function check(c: Case) {
  const def = OPS[c.op]!;
  const ctx = context(c, true);
  const infos = def.infer(ctx);
  const want = await runOrt(c, infos.map((o) => o.dtype));
  const tol = c.tol ?? 0;
  infos.forEach((o, i) => {
    expect(o.dtype, `infer dtype ${i}`).toBe(want[i]!.type);
    expect(o.shape, `infer shape ${i}`).toEqual([...want[i]!.dims]);
  });
  const folded = def.evaluate!(ctx, infos)!;
  expect(folded).toBeDefined();
  folded.forEach((t, i) => expectSame(t, want[i]!, tol, `evaluate out${i}`));
  if (def.evaluate && c.runtime?.length !== 0 && !['Constant', 'Range', 'ConstantOfShape'].includes(c.op)) {
    const rctx = context(c, false);
    const rinfos = def.infer(rctx);
    const lowered = lowerOnHost(def, rctx, rinfos, c.inputs.map((t) => (t ? tensorOf(t) : undefined)));
    lowered.forEach((t, i) => expectSame(t, want[i]!, tol, `lowered out${i}`));
  }
}

const cases: Case[] = [
  // Views
  { name: 'Identity int64', op: 'Identity', inputs: [i64([3, -1, 7])] },
  { name: 'Dropout opset 7', op: 'Dropout', opset: 7, inputs: [f32([2, 3])] },
  { name: 'Dropout opset 13 with mask', op: 'Dropout', opset: 13, inputs: [f32([2, 3])], outputs: 2 },
  { name: 'Dropout opset 13 ratio given, training off', op: 'Dropout', opset: 13, inputs: [f32([5]), fl([0.3], []), bool([0], [])], outputs: 2 },
  { name: 'Flatten default axis', op: 'Flatten', inputs: [f32([2, 3, 4])] },
  { name: 'Flatten axis 0', op: 'Flatten', inputs: [f32([2, 3, 4])], attrs: { axis: 0 } },
  { name: 'Flatten axis -1', op: 'Flatten', inputs: [f32([2, 3, 4])], attrs: { axis: -1 } },
  { name: 'Flatten axis = rank', op: 'Flatten', inputs: [f32([2, 3, 4])], attrs: { axis: 3 } },
  { name: 'Reshape 0 and -1', op: 'Reshape', inputs: [f32([2, 3, 4]), i64([0, -1])] },
  { name: 'Reshape to scalar', op: 'Reshape', inputs: [f32([1, 1]), i64([])] },
  { name: 'Reshape allowzero', op: 'Reshape', opset: 14, inputs: [f32([0, 3]), i64([3, 0])], attrs: { allowzero: 1 } },
  { name: 'Squeeze all (attr form)', op: 'Squeeze', opset: 11, inputs: [f32([1, 3, 1, 2])] },
  { name: 'Squeeze axes attr negative', op: 'Squeeze', opset: 11, inputs: [f32([1, 3, 1, 2])], attrs: { axes: [-2] } },
  { name: 'Squeeze axes input', op: 'Squeeze', opset: 13, inputs: [f32([1, 3, 1, 2]), i64([0, -2])] },
  { name: 'Squeeze no axes input (13)', op: 'Squeeze', opset: 13, inputs: [f32([1, 3, 1])] },
  { name: 'Unsqueeze attr', op: 'Unsqueeze', opset: 11, inputs: [f32([3, 2])], attrs: { axes: [0, -1] } },
  { name: 'Unsqueeze input, scalar', op: 'Unsqueeze', opset: 13, inputs: [i64([5], []), i64([0])] },
  { name: 'Unsqueeze input, unsorted', op: 'Unsqueeze', opset: 13, inputs: [f32([3, 2]), i64([3, 1])] },
  // Transpose
  { name: 'Transpose default perm', op: 'Transpose', inputs: [f32([2, 3, 4])] },
  { name: 'Transpose perm 0 2 1', op: 'Transpose', inputs: [f32([2, 3, 5])], attrs: { perm: [0, 2, 1] } },
  { name: 'Transpose 4-d NCHW->NHWC', op: 'Transpose', inputs: [f32([2, 3, 1, 5])], attrs: { perm: [0, 2, 3, 1] } },
  { name: 'Transpose rank 9 (split steps)', op: 'Transpose', inputs: [f32([2, 2, 2, 2, 2, 2, 2, 2, 3])], attrs: { perm: [8, 0, 2, 4, 6, 1, 3, 5, 7] } },
  { name: 'Transpose int64', op: 'Transpose', inputs: [i64([1, 2, 3, 4, 5, 6], [2, 3])] },
  // Slice
  { name: 'Slice opset 9 attrs, INT64_MAX end', op: 'Slice', opset: 9, inputs: [f32([3, 4])], attrs: { starts: [1], ends: [9007199254740991 * 1024], axes: [1] } },
  { name: 'Slice opset 9 no axes', op: 'Slice', opset: 9, inputs: [f32([3, 4])], attrs: { starts: [-2, 0], ends: [3, -1] } },
  { name: 'Slice negative step', op: 'Slice', inputs: [f32([5, 4]), i64([-1]), i64([-1000]), i64([0]), i64([-1])], runtime: [0] },
  { name: 'Slice step 2 and -2', op: 'Slice', inputs: [f32([7, 6]), i64([1, 5]), i64([7, 0]), i64([0, 1]), i64([2, -2])] },
  { name: 'Slice empty', op: 'Slice', inputs: [f32([4, 3]), i64([3]), i64([1]), i64([0])] },
  { name: 'Slice axes absent, steps present', op: 'Slice', inputs: [f32([4, 3]), i64([1]), i64([3]), null, i64([1])] },
  { name: 'Slice int64 shape (huge end)', op: 'Slice', inputs: [i64([2, 3, 5, 7]), i64([1]), { dtype: 'int64', dims: [1], data: BigInt64Array.of(2n ** 63n - 1n) }] },
  // Concat / Split
  { name: 'Concat axis 1', op: 'Concat', inputs: [f32([2, 3], 1), f32([2, 1], 2), f32([2, 4], 3)], attrs: { axis: 1 }, runtime: [0, 1, 2] },
  { name: 'Concat axis -1 with an empty input', op: 'Concat', inputs: [f32([2, 2], 1), f32([2, 0], 2)], attrs: { axis: -1 }, runtime: [0, 1] },
  { name: 'Concat int64 shapes', op: 'Concat', inputs: [i64([1]), i64([-1, 4])], attrs: { axis: 0 } },
  { name: 'Split equal (attr form)', op: 'Split', opset: 11, inputs: [f32([6, 2])], outputs: 3 },
  { name: 'Split attr sizes axis -1', op: 'Split', opset: 11, inputs: [f32([2, 5])], attrs: { axis: -1, split: [2, 3] }, outputs: 2 },
  { name: 'Split input sizes', op: 'Split', opset: 13, inputs: [f32([2, 7]), i64([1, 0, 6])], attrs: { axis: 1 }, outputs: 3 },
  { name: 'Split num_outputs uneven', op: 'Split', opset: 18, inputs: [f32([7, 2])], attrs: { num_outputs: 3 }, outputs: 3 },
  // Gather
  { name: 'Gather axis 0 runtime indices', op: 'Gather', inputs: [f32([5, 3]), i64([4, 0, -1, 2], [2, 2])], runtime: [0, 1] },
  { name: 'Gather axis 1 known negative index', op: 'Gather', inputs: [f32([2, 5, 3]), i64([-2])], attrs: { axis: 1 } },
  { name: 'Gather scalar index (Shape[0] pattern)', op: 'Gather', inputs: [i64([2, 3, 4]), i64([1], [])] },
  { name: 'Gather contiguous run', op: 'Gather', inputs: [f32([6, 4]), i64([2, 3, 4])], attrs: { axis: -2 } },
  { name: 'Gather int32 indices', op: 'Gather', inputs: [f32([4, 3]), i32([3, 1, 3])], attrs: { axis: 0 }, runtime: [0, 1] },
  { name: 'Gather empty indices', op: 'Gather', inputs: [f32([4, 3]), i64([], [0])], attrs: { axis: 1 } },
  // Expand / Where
  { name: 'Expand 1 -> n and rank up', op: 'Expand', inputs: [f32([3, 1]), i64([2, 3, 4])] },
  { name: 'Expand with 1 in shape', op: 'Expand', inputs: [f32([2, 3]), i64([1, 1])] },
  { name: 'Expand int64 scalar', op: 'Expand', inputs: [i64([7], []), i64([3])] },
  { name: 'Where broadcast three ways', op: 'Where', inputs: [bool([1, 0, 1], [3, 1]), f32([1, 4], 2), f32([3, 4], 3)], runtime: [0, 1, 2] },
  { name: 'Where int64 scalars', op: 'Where', inputs: [bool([0, 1]), i64([5], []), i64([-1, -2])], runtime: [0, 1, 2] },
  // Cast
  { name: 'Cast float -> int64 truncates', op: 'Cast', inputs: [fl([1.7, -1.7, 0, 2.5e9, -0.2])], attrs: { to: 7 } },
  { name: 'Cast float -> bool', op: 'Cast', inputs: [fl([0, -0, 0.1, -3, NaN])], attrs: { to: 9 } },
  { name: 'Cast int64 -> float', op: 'Cast', inputs: [i64([3, -9, 123456789])], attrs: { to: 1 } },
  { name: 'Cast bool -> int32', op: 'Cast', inputs: [bool([1, 0, 1])], attrs: { to: 6 } },
  { name: 'Cast int32 -> int64', op: 'Cast', inputs: [i32([-5, 7])], attrs: { to: 7 } },
  { name: 'Cast same type', op: 'Cast', inputs: [f32([3])], attrs: { to: 1 } },
  // Pad
  { name: 'Pad constant opset 2 attrs', op: 'Pad', opset: 7, inputs: [f32([2, 3])], attrs: { pads: [1, 0, 0, 2], value: floatAttr(1.5) } },
  { name: 'Pad constant input value', op: 'Pad', opset: 13, inputs: [f32([2, 3]), i64([0, 1, 2, 1]), fl([-2], [])] },
  { name: 'Pad constant value absent', op: 'Pad', opset: 13, inputs: [f32([2, 3]), i64([1, 1, 0, 0])] },
  { name: 'Pad negative (crop)', op: 'Pad', opset: 13, inputs: [f32([4, 5]), i64([-1, 2, 0, -2])] },
  { name: 'Pad reflect', op: 'Pad', opset: 13, inputs: [iota([3, 4]), i64([2, 3, 1, 2])], attrs: { mode: 'reflect' } },
  { name: 'Pad edge', op: 'Pad', opset: 13, inputs: [iota([2, 3]), i64([1, 2, 2, 1])], attrs: { mode: 'edge' } },
  { name: 'Pad axes input (18)', op: 'Pad', opset: 18, inputs: [f32([2, 3, 2]), i64([1, 2]), null, i64([-2])] },
  { name: 'Pad int64', op: 'Pad', opset: 13, inputs: [i64([1, 2, 3]), i64([2, 1]), i64([9], [])] },
  // Shape and known values
  { name: 'Shape', op: 'Shape', inputs: [f32([2, 3, 4])] },
  { name: 'Shape start/end (15)', op: 'Shape', opset: 15, inputs: [f32([2, 3, 4, 5])], attrs: { start: 1, end: -1 } },
  { name: 'Shape start beyond rank', op: 'Shape', opset: 15, inputs: [f32([2, 3])], attrs: { start: -9 } },
  { name: 'Shape of scalar', op: 'Shape', inputs: [fl([1], [])] },
  { name: 'Constant tensor', op: 'Constant', inputs: [], attrs: { value: fl([1, 2, 3, 4], [2, 2]) } },
  { name: 'Constant value_ints', op: 'Constant', inputs: [], attrs: { value_ints: [3, -4] } },
  { name: 'Constant value_float', op: 'Constant', inputs: [], attrs: { value_float: 2.5 } },
  { name: 'ConstantOfShape default', op: 'ConstantOfShape', inputs: [i64([2, 3])] },
  { name: 'ConstantOfShape int64 value', op: 'ConstantOfShape', inputs: [i64([3])], attrs: { value: i64([-7], [1]) } },
  { name: 'ConstantOfShape empty shape', op: 'ConstantOfShape', inputs: [i64([])], attrs: { value: fl([4], [1]) } },
  { name: 'Range int64', op: 'Range', inputs: [i64([10], []), i64([-3], []), i64([-4], [])] },
  { name: 'Range int64 empty', op: 'Range', inputs: [i64([0], []), i64([5], []), i64([-1], [])] },
  { name: 'Range float', op: 'Range', inputs: [fl([0.1], []), fl([2.3], []), fl([0.3], [])] },
  { name: 'Range int32', op: 'Range', inputs: [i32([1], []), i32([8], []), i32([3], [])] },
  // Reductions
  { name: 'ReduceSum axes input keepdims', op: 'ReduceSum', opset: 13, inputs: [f32([2, 3, 4]), i64([-1, 0])], tol: 1e-6 },
  { name: 'ReduceSum attr form no keepdims', op: 'ReduceSum', opset: 11, inputs: [f32([2, 3, 4])], attrs: { axes: [1], keepdims: 0 }, tol: 1e-6 },
  { name: 'ReduceSum all (no axes)', op: 'ReduceSum', opset: 13, inputs: [f32([3, 5])], tol: 1e-6 },
  { name: 'ReduceSum noop_with_empty_axes', op: 'ReduceSum', opset: 13, inputs: [f32([3, 5]), i64([])], attrs: { noop_with_empty_axes: 1 } },
  { name: 'ReduceSum int64', op: 'ReduceSum', opset: 13, inputs: [i64([1, 2, 3, 4, 5, 6], [2, 3]), i64([1])], attrs: { keepdims: 0 } },
  { name: 'ReduceSum empty axis -> 0', op: 'ReduceSum', opset: 13, inputs: [fl([], [2, 0]), i64([1])] },
  { name: 'ReduceMean two separate axes', op: 'ReduceMean', opset: 11, inputs: [f32([2, 3, 4, 5])], attrs: { axes: [1, 3] }, tol: 1e-6 },
  { name: 'ReduceMean adjacent axes + size-1 gap', op: 'ReduceMean', opset: 18, inputs: [f32([2, 3, 1, 4]), i64([1, 2, 3])], attrs: { keepdims: 0 }, tol: 1e-6 },
  { name: 'ReduceMean over a size-1 axis', op: 'ReduceMean', opset: 18, inputs: [f32([3, 1, 2]), i64([1])] },
  { name: 'ReduceMax attr negative axis', op: 'ReduceMax', opset: 13, inputs: [f32([3, 4, 2])], attrs: { axes: [-2] } },
  { name: 'ReduceMax input form all axes', op: 'ReduceMax', opset: 18, inputs: [f32([3, 4, 2])], attrs: { keepdims: 0 } },
  { name: 'ReduceMax int64', op: 'ReduceMax', opset: 18, inputs: [i64([4, -9, 12, 0], [2, 2]), i64([0])] },
  { name: 'ReduceMin three axes', op: 'ReduceMin', opset: 18, inputs: [f32([2, 3, 4, 3]), i64([0, 2, 3])] },
  { name: 'ArgMax default', op: 'ArgMax', inputs: [f32([3, 4])] },
  { name: 'ArgMax axis -1 no keepdims', op: 'ArgMax', inputs: [f32([2, 3, 5])], attrs: { axis: -1, keepdims: 0 } },
  { name: 'ArgMax ties first', op: 'ArgMax', opset: 13, inputs: [fl([1, 3, 3, 0, 3], [5])] },
  { name: 'ArgMax ties select_last_index', op: 'ArgMax', opset: 13, inputs: [fl([1, 3, 3, 0, 3, 2, 2, 1], [2, 4])], attrs: { axis: 1, select_last_index: 1 } },
  { name: 'TopK k input axis -1', op: 'TopK', opset: 11, inputs: [f32([3, 6]), i64([3])], outputs: 2 },
  { name: 'TopK smallest axis 0', op: 'TopK', opset: 11, inputs: [f32([5, 2]), i64([2])], attrs: { axis: 0, largest: 0 }, outputs: 2 },
  { name: 'TopK ties keep lower index', op: 'TopK', opset: 11, inputs: [fl([2, 5, 2, 5, 1]), i64([4])], outputs: 2 },
  { name: 'TopK opset 9 k attr', op: 'TopK', opset: 9, inputs: [f32([2, 5])], attrs: { k: 2 }, outputs: 2 },
  { name: 'TopK k = 0', op: 'TopK', opset: 11, inputs: [f32([2, 5]), i64([0])], outputs: 2 },
];

describe('tensor and reduce ops against onnxruntime', () => {
  for (const c of cases) it(c.name, () => check(c));
});

/** An emitter that records steps (refs name values, not buffers) for checking lowerings' shape. */
function recorder(ctx: OpContext) {
  const steps: Omit<PlanStep, 'node'>[] = [];
  const aliases: [number, number][] = [];
  let next = 100;
  const e: Emitter = {
    input: (i) => i,
    output: (i) => 50 + i,
    temp: () => next++,
    constant: () => next++,
    ref: (id, offset = 0) => ({ buffer: id, offset }),
    emit: (s) => { steps.push(s); },
    alias: (o, i) => { aliases.push([o, i]); },
  };
  void ctx;
  return { e, steps, aliases };
}

function lowerRecorded(c: Case) {
  const ctx = context(c, false);
  const def = OPS[c.op]!;
  const infos: OutputInfo[] = def.infer(ctx);
  const r = recorder(ctx);
  def.lower(ctx, infos, r.e);
  return r;
}

describe('lowering shape', () => {
  it('Transpose merges dims that stay adjacent into one copy', () => {
    const { steps } = lowerRecorded({ name: '', op: 'Transpose', inputs: [f32([2, 3, 4])], attrs: { perm: [2, 0, 1] } });
    expect(steps).toEqual([{ op: 'copy', x: { buffer: 0, offset: 0 }, y: { buffer: 50, offset: 0 }, dims: [4, 6], xStrides: [1, 4], yStrides: [6, 1], elemBytes: 4 }]);
  });
  it('Concat is one copy per input at its offset', () => {
    const { steps } = lowerRecorded({ name: '', op: 'Concat', inputs: [f32([2, 3]), f32([2, 1])], attrs: { axis: 1 }, runtime: [0, 1] });
    expect(steps.map((s) => (s as { y: unknown }).y)).toEqual([{ buffer: 50, offset: 0 }, { buffer: 50, offset: 3 }]);
  });
  it('Gather with a known contiguous run is a copy; with run-time indices a gather', () => {
    expect(lowerRecorded({ name: '', op: 'Gather', inputs: [f32([6, 4]), i64([2, 3])] }).steps.map((s) => s.op)).toEqual(['copy']);
    expect(lowerRecorded({ name: '', op: 'Gather', inputs: [f32([6, 4]), i64([2, 3])], runtime: [0, 1] }).steps.map((s) => s.op)).toEqual(['gather']);
  });
  it('views alias their input', () => {
    for (const c of [
      { name: '', op: 'Reshape', inputs: [f32([2, 3]), i64([-1])] },
      { name: '', op: 'Squeeze', opset: 13, inputs: [f32([1, 3])] },
      { name: '', op: 'Flatten', inputs: [f32([2, 3, 4])] },
      { name: '', op: 'ReduceSum', opset: 13, inputs: [f32([3, 1]), i64([1])] },
    ] as Case[]) expect(lowerRecorded(c).aliases).toEqual([[0, 0]]);
  });
  it('ReduceMean over axes 1 and 3 is two reduce steps through a temp; adjacent axes one step', () => {
    const two = lowerRecorded({ name: '', op: 'ReduceMean', opset: 18, inputs: [f32([2, 3, 4, 5]), i64([1, 3])], runtime: [0] }).steps;
    expect(two.map((s) => [s.op, (s as { outer: number }).outer, (s as { r: number }).r, (s as { inner: number }).inner])).toEqual([
      ['reduce', 2, 3, 20], ['reduce', 8, 5, 1],
    ]);
    const one = lowerRecorded({ name: '', op: 'ReduceMean', opset: 18, inputs: [f32([2, 3, 1, 4]), i64([1, 2, 3])] }).steps;
    expect(one).toHaveLength(1);
    expect((one[0] as { r: number }).r).toBe(12);
  });
  it('mergeDims drops size-1 dims and merges contiguous runs', () => {
    expect(mergeDims([2, 1, 3, 4], [[12, 99, 4, 1], [12, 0, 4, 1]])).toEqual({ dims: [24], strides: [[1], [1]] });
    expect(mergeDims([1, 1], [[5, 3]])).toEqual({ dims: [1], strides: [[1]] });
    expect(mergeDims([3, 0], [[1, 1]])).toBeUndefined();
  });
});

describe('bad models and inputs are typed errors naming the node', () => {
  const throwsOn = (c: Case, cls: new (...a: never[]) => Error, re: RegExp, stage: 'infer' | 'lower' = 'infer') => {
    const ctx = context(c, false);
    const def = OPS[c.op]!;
    const run = () => {
      const infos = def.infer(ctx);
      if (stage === 'lower') def.lower(ctx, infos, recorder(ctx).e);
    };
    expect(run).toThrow(cls);
    expect(run).toThrow(re);
  };
  it('axis out of range', () => throwsOn({ name: '', op: 'Gather', inputs: [f32([2, 3]), i64([0])], attrs: { axis: -3 } }, ModelFormatError, /Gather_node.*axis -3 is out of range/));
  it('Reshape to a different size', () => throwsOn({ name: '', op: 'Reshape', inputs: [f32([2, 3]), i64([4, -1])] }, InvalidArgumentError, /Reshape_node.*cannot reshape \[2, 3\]/));
  it('Reshape with two -1', () => throwsOn({ name: '', op: 'Reshape', inputs: [f32([2, 3]), i64([-1, -1])] }, ModelFormatError, /more than one -1/));
  it('Slice starts computed at run time', () => throwsOn({ name: '', op: 'Slice', inputs: [f32([4]), i64([1]), i64([3])], runtime: [0, 1] }, UnsupportedOperatorError, /Slice_node.*starts must be known/));
  it('Slice step 0', () => throwsOn({ name: '', op: 'Slice', inputs: [f32([4]), i64([1]), i64([3]), i64([0]), i64([0])] }, ModelFormatError, /steps\[0\] is 0/));
  it('Squeeze of a dim that is not 1', () => throwsOn({ name: '', op: 'Squeeze', opset: 13, inputs: [f32([2, 3]), i64([1])] }, InvalidArgumentError, /cannot squeeze axis 1/));
  it('Unsqueeze with a repeated axis', () => throwsOn({ name: '', op: 'Unsqueeze', opset: 13, inputs: [f32([2]), i64([0, -3])] }, ModelFormatError, /names an axis twice/));
  it('Transpose with a bad perm', () => throwsOn({ name: '', op: 'Transpose', inputs: [f32([2, 3])], attrs: { perm: [0, 0] } }, ModelFormatError, /not a permutation/));
  it('Concat of mismatched shapes', () => throwsOn({ name: '', op: 'Concat', inputs: [f32([2, 3]), f32([3, 3])], attrs: { axis: 1 } }, InvalidArgumentError, /does not match input 0/));
  it('Split sizes that do not add up', () => throwsOn({ name: '', op: 'Split', opset: 13, inputs: [f32([5]), i64([2, 2])], outputs: 2 }, InvalidArgumentError, /does not add up/));
  it('Gather with a known index out of range', () => throwsOn({ name: '', op: 'Gather', inputs: [f32([3, 2]), i64([3])], runtime: [0] }, InvalidArgumentError, /index 3 is out of range \[-3, 3\)/, 'lower'));
  it('Gather with a run-time index out of range fails when the steps run', () => {
    const c: Case = { name: '', op: 'Gather', inputs: [f32([3, 2]), i64([0, -4])], runtime: [0, 1] };
    const ctx = context(c, false);
    const def = OPS.Gather!;
    expect(() => lowerOnHost(def, ctx, def.infer(ctx), c.inputs.map((t) => tensorOf(t!)))).toThrow(/Gather_node.*index -4 is out of range/);
  });
  it('Cast to float16 at run time', () => throwsOn({ name: '', op: 'Cast', inputs: [f32([2])], attrs: { to: 10 } }, UnsupportedOperatorError, /Cast_node.*float16/, 'lower'));
  it('Cast to double', () => throwsOn({ name: '', op: 'Cast', inputs: [f32([2])], attrs: { to: 11 } }, UnsupportedOperatorError, /data type 11/));
  it('Pad wrap mode', () => throwsOn({ name: '', op: 'Pad', opset: 19, inputs: [f32([2]), i64([1, 1])], attrs: { mode: 'wrap' } }, UnsupportedOperatorError, /mode 'wrap'/));
  it('Pad reflect wider than the dim', () => throwsOn({ name: '', op: 'Pad', opset: 13, inputs: [f32([2]), i64([2, 0])], attrs: { mode: 'reflect' } }, InvalidArgumentError, /reflect pads/));
  it('ReduceMean over an empty set', () => throwsOn({ name: '', op: 'ReduceMean', opset: 18, inputs: [fl([], [2, 0]), i64([1])] }, InvalidArgumentError, /ReduceMean_node.*empty set/, 'lower'));
  it('ReduceMean of int64 at run time', () => throwsOn({ name: '', op: 'ReduceMean', opset: 18, inputs: [i64([1, 2]), i64([0])] }, UnsupportedOperatorError, /ReduceMean of int64/, 'lower'));
  it('TopK with k beyond the axis', () => throwsOn({ name: '', op: 'TopK', opset: 11, inputs: [f32([2, 3]), i64([4])], outputs: 2 }, InvalidArgumentError, /k = 4 is out of range/));
  it('Dropout in training mode', () => throwsOn({ name: '', op: 'Dropout', opset: 13, inputs: [f32([2]), fl([0.5], []), bool([1], [])], outputs: 2 }, UnsupportedOperatorError, /training_mode/));
  it('Range with a zero delta', () => throwsOn({ name: '', op: 'Range', inputs: [i64([0], []), i64([5], []), i64([0], [])], runtime: [] }, ModelFormatError, /delta is 0/));
  it('an int64 shape value beyond 2^53', () => throwsOn({ name: '', op: 'Reshape', inputs: [f32([2]), { dtype: 'int64', dims: [1], data: BigInt64Array.of(2n ** 60n) }] }, ModelFormatError, /beyond the range/));
});

describe('Shape is evaluated from shapes alone', () => {
  it('gives the shape when the input is a run-time value', () => {
    const ctx = context({ name: '', op: 'Shape', inputs: [f32([4, 1, 3])] }, false);
    expect(TENSOR_OPS.Shape!.shapeOnly).toBe(true);
    const [t] = TENSOR_OPS.Shape!.evaluate!(ctx, TENSOR_OPS.Shape!.infer(ctx))!;
    expect(Array.from(t!.data as BigInt64Array)).toEqual([4n, 1n, 3n]);
  });
});
