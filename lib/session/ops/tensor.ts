/**
 * Tensor and shape operators: data movement (Transpose, Slice, Concat, Split, Gather, Expand, Pad,
 * Where, Cast), views (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout: aliases of their
 * input) and the producers of shape arithmetic (Shape, Constant, ConstantOfShape, Range).
 *
 * Every op lowers to plan steps; `evaluate` runs that same lowering on the host (./host.ts) when
 * all inputs are known, which is how PyTorch's Shape -> Gather -> Unsqueeze -> Concat -> Reshape
 * chains fold away at plan time. Values that decide output shapes (Reshape's shape, Slice's
 * starts, Expand's shape, TopK's k...) must therefore be known when the plan is built; a graph
 * that computes them from run-time data fails with UnsupportedOperatorError naming the node.
 */
import { Tensor, type DType } from '../../tensor.js';
import type { PlanRef } from '../plan.js';
import { evaluateByLowering } from './host.js';
import { ELEM_BYTES, planDType, type Emitter, type OpContext, type OpDef, type OutputInfo } from './types.js';
import {
  broadcastShapes, broadcastStrides, clampInts, emitCopy, intTensor, knownInput, mergeDims, MAX_STEP_RANK, normAxes,
  normAxis, ONNX_DTYPE_CODE, readInts, requireInput, scalarOf, sizeOf, splitRank, stridesOf, unsupported,
} from './util.js';

/** An op whose plan-time evaluation is its own lowering run on the host. */
function hostEvaluated(def: Omit<OpDef, 'evaluate'>): OpDef {
  const full: OpDef = { ...def, evaluate: (ctx, outputs) => evaluateByLowering(full, ctx, outputs) };
  return full;
}

const same = (ctx: OpContext, shape: number[]): OutputInfo[] => [{ dtype: requireInput(ctx, 0, 'data').dtype, shape }];

function aliasLower(_ctx: OpContext, _outputs: OutputInfo[], e: Emitter): void {
  e.alias(0, 0);
}

/** Plan dtype of a value the native steps will move, or UnsupportedOperatorError (float16/bfloat16). */
function movable(ctx: OpContext, dtype: DType): void {
  if (dtype === 'float16' || dtype === 'bfloat16') unsupported(ctx, `${dtype} tensors are not supported at run time yet`);
}

/** The axes of Squeeze/Unsqueeze/Reduce*: an attribute before `inputFrom`, input 1 from then on. */
function axesArg(ctx: OpContext, inputFrom: number, inputIndex = 1): number[] | undefined {
  if (ctx.opset < inputFrom) return ctx.attrs.has('axes') ? ctx.attrs.ints('axes') : undefined;
  if (!ctx.inputs[inputIndex]) return undefined;
  return readInts(ctx, knownInput(ctx, inputIndex, 'axes'), 'axes');
}

// ---------------------------------------------------------------------------------------------
// Views

const Identity = hostEvaluated({
  infer: (ctx) => same(ctx, requireInput(ctx, 0, 'input').shape),
  lower: aliasLower,
});

const Dropout = hostEvaluated({
  infer(ctx) {
    const x = requireInput(ctx, 0, 'data');
    if (ctx.opset >= 12 && ctx.inputs[2]) {
      const training = knownInput(ctx, 2, 'training_mode');
      if (scalarOf(ctx, training, 'training_mode') !== 0) unsupported(ctx, 'training_mode = true (sonde runs inference only)');
    }
    const outs: OutputInfo[] = [{ dtype: x.dtype, shape: x.shape }];
    // The mask is bool from opset 10; before that it has the data's type.
    if (ctx.node.outputs.length > 1) outs.push({ dtype: ctx.opset >= 10 ? 'bool' : x.dtype, shape: x.shape });
    return outs;
  },
  lower(ctx, outputs, e) {
    e.alias(0, 0);
    const mask = outputs[1];
    if (mask && ctx.node.outputs[1]) {
      movable(ctx, mask.dtype);
      e.emit({ op: 'fill', y: e.ref(e.output(1)), dtype: planDType(mask.dtype), count: sizeOf(mask.shape), value: 1 });
    }
  },
});

const Flatten = hostEvaluated({
  infer(ctx) {
    const shape = requireInput(ctx, 0, 'input').shape;
    const axis = ctx.attrs.int('axis', 1);
    if (axis < -shape.length || axis > shape.length) ctx.fail(`axis ${axis} is out of range for rank ${shape.length} (expected [${-shape.length}, ${shape.length}])`);
    const a = axis < 0 ? axis + shape.length : axis;
    return same(ctx, [sizeOf(shape.slice(0, a)), sizeOf(shape.slice(a))]);
  },
  lower: aliasLower,
});

const Reshape = hostEvaluated({
  infer(ctx) {
    const inShape = requireInput(ctx, 0, 'data').shape;
    const want = readInts(ctx, knownInput(ctx, 1, 'shape'), 'shape');
    const allowZero = ctx.opset >= 14 && ctx.attrs.int('allowzero', 0) === 1;
    let inferAt = -1;
    const out = want.map((d, i) => {
      if (d === -1) {
        if (inferAt >= 0) ctx.fail(`shape [${want.join(', ')}] has more than one -1`);
        inferAt = i;
        return 1;
      }
      if (d === 0 && !allowZero) {
        if (i >= inShape.length) ctx.fail(`shape [${want.join(', ')}]: 0 at index ${i} copies a dim the input [${inShape.join(', ')}] does not have`, { input: true });
        return inShape[i]!;
      }
      if (d < 0) ctx.fail(`shape [${want.join(', ')}] has an invalid dim ${d}`);
      return d;
    });
    const total = sizeOf(inShape);
    if (inferAt >= 0) {
      const rest = sizeOf(out);
      if (rest === 0 || total % rest !== 0) {
        ctx.fail(`cannot reshape [${inShape.join(', ')}] (${total} elements) to [${want.join(', ')}]`, { input: true });
      }
      out[inferAt] = total / rest;
    }
    if (sizeOf(out) !== total) ctx.fail(`cannot reshape [${inShape.join(', ')}] (${total} elements) to [${want.join(', ')}]`, { input: true });
    return same(ctx, out);
  },
  lower: aliasLower,
});

const Squeeze = hostEvaluated({
  infer(ctx) {
    const shape = requireInput(ctx, 0, 'data').shape;
    const given = axesArg(ctx, 13);
    const axes = given === undefined ? shape.flatMap((d, i) => (d === 1 ? [i] : [])) : normAxes(ctx, given, shape.length);
    for (const a of axes) if (shape[a] !== 1) ctx.fail(`cannot squeeze axis ${a} of [${shape.join(', ')}]: its size is not 1`, { input: true });
    return same(ctx, shape.filter((_, i) => !axes.includes(i)));
  },
  lower: aliasLower,
});

const Unsqueeze = hostEvaluated({
  infer(ctx) {
    const shape = requireInput(ctx, 0, 'data').shape;
    const given = axesArg(ctx, 13);
    if (given === undefined) return ctx.fail('axes are required');
    const rank = shape.length + given.length;
    const axes = normAxes(ctx, given, rank);
    const out: number[] = [];
    let k = 0;
    for (let i = 0; i < rank; i++) out.push(axes.includes(i) ? 1 : shape[k++]!);
    return same(ctx, out);
  },
  lower: aliasLower,
});

// ---------------------------------------------------------------------------------------------
// Data movement

function transposePerm(ctx: OpContext, rank: number): number[] {
  const perm = ctx.attrs.ints('perm', Array.from({ length: rank }, (_, i) => rank - 1 - i));
  if (perm.length !== rank || [...perm].sort((a, b) => a - b).some((p, i) => p !== i)) {
    ctx.fail(`perm [${perm.join(', ')}] is not a permutation of the ${rank} axes`);
  }
  return perm;
}

const Transpose = hostEvaluated({
  infer(ctx) {
    const shape = requireInput(ctx, 0, 'data').shape;
    return same(ctx, transposePerm(ctx, shape.length).map((p) => shape[p]!));
  },
  lower(ctx, outputs, e) {
    const x = requireInput(ctx, 0, 'data');
    const perm = transposePerm(ctx, x.shape.length);
    const inStrides = stridesOf(x.shape);
    const out = outputs[0]!;
    emitCopy(e, e.input(0), 0, e.output(0), 0, out.shape, perm.map((p) => inStrides[p]!), stridesOf(out.shape), ELEM_BYTES[x.dtype]);
  },
});

interface SliceView { shape: number[]; offset: number; strides: number[] }

/** ONNX Slice with clamping: the output shape and the strided view of the input it reads. */
function sliceView(ctx: OpContext): SliceView {
  const shape = requireInput(ctx, 0, 'data').shape;
  let starts: number[];
  let ends: number[];
  let axes: number[] | undefined;
  let steps: number[] | undefined;
  if (ctx.opset < 10) {
    starts = clampInts(ctx.attrs.ints('starts'));
    ends = clampInts(ctx.attrs.ints('ends'));
    axes = ctx.attrs.has('axes') ? ctx.attrs.ints('axes') : undefined;
  } else {
    starts = readInts(ctx, knownInput(ctx, 1, 'starts'), 'starts', { clamp: true });
    ends = readInts(ctx, knownInput(ctx, 2, 'ends'), 'ends', { clamp: true });
    if (ctx.inputs[3]) axes = readInts(ctx, knownInput(ctx, 3, 'axes'), 'axes');
    if (ctx.inputs[4]) steps = readInts(ctx, knownInput(ctx, 4, 'steps'), 'steps', { clamp: true });
  }
  const n = starts.length;
  if (ends.length !== n || (axes && axes.length !== n) || (steps && steps.length !== n)) {
    ctx.fail(`starts, ends, axes and steps must have the same length (got ${n}, ${ends.length}, ${axes?.length ?? '-'}, ${steps?.length ?? '-'})`);
  }
  const ax = normAxes(ctx, axes ?? Array.from({ length: n }, (_, i) => i), shape.length);
  const inStrides = stridesOf(shape);
  const out = { shape: [...shape], offset: 0, strides: [...inStrides] };
  ax.forEach((a, i) => {
    const d = shape[a]!;
    const step = steps ? steps[i]! : 1;
    if (step === 0) ctx.fail(`steps[${i}] is 0`);
    let start = starts[i]!;
    let end = ends[i]!;
    if (start < 0) start += d;
    if (end < 0) end += d;
    let len: number;
    if (step > 0) {
      start = Math.min(Math.max(start, 0), d);
      end = Math.min(Math.max(end, 0), d);
      len = Math.max(0, Math.ceil((end - start) / step));
    } else {
      start = Math.min(Math.max(start, 0), d - 1);
      end = Math.min(Math.max(end, -1), d - 1);
      len = Math.max(0, Math.ceil((start - end) / -step));
    }
    out.shape[a] = len;
    if (len > 0) out.offset += start * inStrides[a]!;
    out.strides[a] = inStrides[a]! * step;
  });
  return out;
}

const Slice = hostEvaluated({
  infer: (ctx) => same(ctx, sliceView(ctx).shape),
  lower(ctx, outputs, e) {
    const v = sliceView(ctx);
    emitCopy(e, e.input(0), v.offset, e.output(0), 0, v.shape, v.strides, stridesOf(v.shape), ELEM_BYTES[outputs[0]!.dtype]);
  },
});

function concatAxis(ctx: OpContext): number {
  const first = requireInput(ctx, 0, 'inputs[0]');
  return normAxis(ctx, ctx.attrs.int('axis'), first.shape.length);
}

const Concat = hostEvaluated({
  infer(ctx) {
    if (ctx.inputs.length === 0) ctx.fail('needs at least one input');
    const first = requireInput(ctx, 0, 'inputs[0]');
    const axis = concatAxis(ctx);
    const out = [...first.shape];
    out[axis] = 0;
    ctx.inputs.forEach((v, i) => {
      if (!v) return ctx.fail(`input ${i} is missing`);
      if (v.dtype !== first.dtype) ctx.fail(`input ${i} is ${v.dtype}, input 0 is ${first.dtype}`);
      if (v.shape.length !== first.shape.length || v.shape.some((d, k) => k !== axis && d !== first.shape[k])) {
        ctx.fail(`input ${i} [${v.shape.join(', ')}] does not match input 0 [${first.shape.join(', ')}] outside axis ${axis}`, { input: true });
      }
      out[axis]! += v.shape[axis]!;
    });
    return same(ctx, out);
  },
  lower(ctx, outputs, e) {
    const axis = concatAxis(ctx);
    const out = outputs[0]!;
    const outStrides = stridesOf(out.shape);
    let at = 0;
    ctx.inputs.forEach((v, i) => {
      emitCopy(e, e.input(i), 0, e.output(0), at * outStrides[axis]!, v!.shape, stridesOf(v!.shape), outStrides, ELEM_BYTES[out.dtype]);
      at += v!.shape[axis]!;
    });
  },
});

function splitSizes(ctx: OpContext): { axis: number; sizes: number[] } {
  const shape = requireInput(ctx, 0, 'input').shape;
  const axis = normAxis(ctx, ctx.attrs.int('axis', 0), shape.length);
  const d = shape[axis]!;
  const count = ctx.node.outputs.length;
  let sizes: number[] | undefined;
  if (ctx.opset < 13) {
    if (ctx.attrs.has('split')) sizes = ctx.attrs.ints('split');
  } else if (ctx.inputs[1]) {
    sizes = readInts(ctx, knownInput(ctx, 1, 'split'), 'split');
  }
  if (sizes) {
    if (sizes.length !== count) ctx.fail(`split [${sizes.join(', ')}] has ${sizes.length} parts for ${count} outputs`);
    if (sizes.some((s) => s < 0) || sizes.reduce((a, b) => a + b, 0) !== d) {
      ctx.fail(`split [${sizes.join(', ')}] does not add up to dim ${axis} (${d}) of [${shape.join(', ')}]`, { input: true });
    }
  } else if (ctx.opset >= 18 && ctx.attrs.has('num_outputs')) {
    const n = ctx.attrs.int('num_outputs');
    if (n !== count || n < 1) ctx.fail(`num_outputs ${n} does not match the node's ${count} outputs`);
    // Opset 18: parts of ceil(d / n), the last one smaller.
    const part = Math.ceil(d / n);
    sizes = Array.from({ length: n }, (_, i) => Math.max(0, Math.min(part, d - i * part)));
  } else {
    if (d % count !== 0) ctx.fail(`dim ${axis} (${d}) of [${shape.join(', ')}] does not split evenly into ${count} outputs`, { input: true });
    sizes = new Array<number>(count).fill(d / count);
  }
  return { axis, sizes };
}

const Split = hostEvaluated({
  infer(ctx) {
    const x = requireInput(ctx, 0, 'input');
    const { axis, sizes } = splitSizes(ctx);
    return sizes.map((s) => {
      const shape = [...x.shape];
      shape[axis] = s;
      return { dtype: x.dtype, shape };
    });
  },
  lower(ctx, outputs, e) {
    const x = requireInput(ctx, 0, 'input');
    const { axis, sizes } = splitSizes(ctx);
    const inStrides = stridesOf(x.shape);
    let at = 0;
    sizes.forEach((s, i) => {
      const out = outputs[i]!;
      if (ctx.node.outputs[i]) emitCopy(e, e.input(0), at * inStrides[axis]!, e.output(i), 0, out.shape, inStrides, stridesOf(out.shape), ELEM_BYTES[x.dtype]);
      at += s;
    });
  },
});

const Gather = hostEvaluated({
  infer(ctx) {
    const data = requireInput(ctx, 0, 'data');
    const indices = requireInput(ctx, 1, 'indices');
    if (indices.dtype !== 'int64' && indices.dtype !== 'int32') ctx.fail(`indices must be int64 or int32, got ${indices.dtype}`);
    const axis = normAxis(ctx, ctx.attrs.int('axis', 0), data.shape.length);
    return same(ctx, [...data.shape.slice(0, axis), ...indices.shape, ...data.shape.slice(axis + 1)]);
  },
  lower(ctx, outputs, e) {
    const data = requireInput(ctx, 0, 'data');
    const indices = requireInput(ctx, 1, 'indices');
    const axis = normAxis(ctx, ctx.attrs.int('axis', 0), data.shape.length);
    const outer = sizeOf(data.shape.slice(0, axis));
    const axisLen = data.shape[axis]!;
    const inner = sizeOf(data.shape.slice(axis + 1));
    const n = sizeOf(indices.shape);
    const elemBytes = ELEM_BYTES[data.dtype];
    if (sizeOf(outputs[0]!.shape) === 0) return;
    if (indices.value) {
      const idx = readInts(ctx, indices.value, 'indices').map((k) => {
        if (k < -axisLen || k >= axisLen) ctx.fail(`index ${k} is out of range [${-axisLen}, ${axisLen}) for axis ${axis}`, { input: true });
        return k < 0 ? k + axisLen : k;
      });
      // Known indices forming one ascending run (a slice of the axis, the common case of
      // Gather on a Shape) are a strided copy; the gather step is for anything else.
      if (idx.every((k, j) => k === idx[0]! + j)) {
        emitCopy(e, e.input(0), idx[0]! * inner, e.output(0), 0, [outer, n * inner], [axisLen * inner, 1], [n * inner, 1], elemBytes);
        return;
      }
    }
    e.emit({
      op: 'gather', data: e.ref(e.input(0)), indices: e.ref(e.input(1)), indicesDtype: indices.dtype as 'int64' | 'int32',
      y: e.ref(e.output(0)), outer, axisLen, inner, nIndices: n, elemBytes,
    });
  },
});

const Expand = hostEvaluated({
  infer(ctx) {
    const x = requireInput(ctx, 0, 'input');
    const shape = readInts(ctx, knownInput(ctx, 1, 'shape'), 'shape');
    if (shape.some((d) => d < 0)) ctx.fail(`shape [${shape.join(', ')}] has a negative dim`);
    return same(ctx, broadcastShapes(ctx, [x.shape, shape]));
  },
  lower(ctx, outputs, e) {
    const x = requireInput(ctx, 0, 'input');
    const out = outputs[0]!;
    emitCopy(e, e.input(0), 0, e.output(0), 0, out.shape, broadcastStrides(x.shape, out.shape), stridesOf(out.shape), ELEM_BYTES[x.dtype]);
  },
});

const Where = hostEvaluated({
  infer(ctx) {
    const c = requireInput(ctx, 0, 'condition');
    const x = requireInput(ctx, 1, 'X');
    const y = requireInput(ctx, 2, 'Y');
    if (c.dtype !== 'bool') ctx.fail(`condition must be bool, got ${c.dtype}`);
    if (x.dtype !== y.dtype) ctx.fail(`X is ${x.dtype} but Y is ${y.dtype}`);
    return [{ dtype: x.dtype, shape: broadcastShapes(ctx, [c.shape, x.shape, y.shape]) }];
  },
  lower(ctx, outputs, e) {
    const out = outputs[0]!;
    movable(ctx, out.dtype);
    const shapes = [0, 1, 2].map((i) => requireInput(ctx, i, 'input').shape);
    const strides = [...shapes.map((s) => broadcastStrides(s, out.shape)), stridesOf(out.shape)];
    const m = mergeDims(out.shape, strides);
    if (!m) return;
    const [c, x, y, o] = [e.input(0), e.input(1), e.input(2), e.output(0)];
    splitRank(m.dims, m.strides, [0, 0, 0, 0], (dims, [cs, xs, ys], [co, xo, yo, oo]) => {
      e.emit({
        op: 'where', cond: e.ref(c, co), x: e.ref(x, xo), y: e.ref(y, yo), out: e.ref(o, oo), dims,
        condStrides: cs!, xStrides: xs!, yStrides: ys!, elemBytes: ELEM_BYTES[out.dtype],
      });
    });
  },
});

function castTarget(ctx: OpContext): DType {
  const to = ctx.attrs.int('to');
  const dtype = ONNX_DTYPE_CODE[to];
  if (!dtype) unsupported(ctx, `cast to ONNX data type ${to} is not supported`);
  return dtype;
}

const Cast = hostEvaluated({
  infer: (ctx) => [{ dtype: castTarget(ctx), shape: requireInput(ctx, 0, 'input').shape }],
  lower(ctx, outputs, e) {
    const x = requireInput(ctx, 0, 'input');
    const to = outputs[0]!.dtype;
    if (to === x.dtype) {
      e.alias(0, 0);
      return;
    }
    for (const d of [x.dtype, to]) if (d === 'float16' || d === 'bfloat16') unsupported(ctx, `casts from or to ${d} are not supported yet`);
    const count = sizeOf(x.shape);
    if (count === 0) return;
    e.emit({ op: 'cast', x: e.ref(e.input(0)), y: e.ref(e.output(0)), from: planDType(x.dtype), to: planDType(to), count });
  },
});

interface PadArgs { begin: number[]; end: number[]; mode: 'constant' | 'reflect' | 'edge'; value: number }

function padArgs(ctx: OpContext): PadArgs {
  const shape = requireInput(ctx, 0, 'data').shape;
  const rank = shape.length;
  const mode = ctx.attrs.string('mode', 'constant');
  if (mode !== 'constant' && mode !== 'reflect' && mode !== 'edge') unsupported(ctx, `mode '${mode}' is not supported (constant, reflect, edge are)`);
  let pads: number[];
  let value = 0;
  let axes = Array.from({ length: rank }, (_, i) => i);
  if (ctx.opset < 11) {
    pads = ctx.attrs.ints('pads');
    value = ctx.attrs.float('value', 0);
  } else {
    pads = readInts(ctx, knownInput(ctx, 1, 'pads'), 'pads');
    if (ctx.inputs[2]) value = scalarOf(ctx, knownInput(ctx, 2, 'constant_value'), 'constant_value');
    if (ctx.opset >= 18 && ctx.inputs[3]) axes = normAxes(ctx, readInts(ctx, knownInput(ctx, 3, 'axes'), 'axes'), rank);
  }
  if (pads.length !== 2 * axes.length) ctx.fail(`pads has ${pads.length} values, expected ${2 * axes.length} (begin and end for each of ${axes.length} axes)`);
  const begin = new Array<number>(rank).fill(0);
  const end = new Array<number>(rank).fill(0);
  axes.forEach((a, i) => {
    begin[a] = pads[i]!;
    end[a] = pads[i + axes.length]!;
  });
  shape.forEach((d, a) => {
    const b = begin[a]!;
    const e = end[a]!;
    // What is left of the axis after negative pads crop it; reflection and edges come from there
    // (onnxruntime rejects a reflect pad beyond it, as the native step does).
    const kept = d + Math.min(b, 0) + Math.min(e, 0);
    const grow = Math.max(b, e, 0);
    if (kept < 0 || d + b + e < 0) ctx.fail(`pads [${pads.join(', ')}] crop more than dim ${a} (${d}) holds`, { input: true });
    if (mode === 'reflect' && grow > 0 && grow >= kept) {
      ctx.fail(`reflect pads [${pads.join(', ')}] must be smaller than dim ${a} (${kept} after cropping)`, { input: true });
    }
    if (mode === 'edge' && grow > 0 && kept === 0) ctx.fail(`edge padding of an empty dim ${a}`, { input: true });
  });
  return { begin, end, mode, value };
}

const Pad = hostEvaluated({
  infer(ctx) {
    const shape = requireInput(ctx, 0, 'data').shape;
    const { begin, end } = padArgs(ctx);
    return same(ctx, shape.map((d, a) => d + begin[a]! + end[a]!));
  },
  lower(ctx, outputs, e) {
    const x = requireInput(ctx, 0, 'data');
    movable(ctx, x.dtype);
    const { begin, end, mode, value } = padArgs(ctx);
    const out = outputs[0]!;
    if (sizeOf(out.shape) === 0) return;
    if (sizeOf(x.shape) === 0) {
      // Nothing to read: every output element is the pad value (only constant mode gets here).
      e.emit({ op: 'fill', y: e.ref(e.output(0)), dtype: planDType(x.dtype), count: sizeOf(out.shape), value });
      return;
    }
    if (x.shape.length > MAX_STEP_RANK) unsupported(ctx, `rank ${x.shape.length} is above the ${MAX_STEP_RANK} dims native Pad handles`);
    e.emit({ op: 'pad', x: e.ref(e.input(0)), y: e.ref(e.output(0)), dtype: planDType(x.dtype), inDims: [...x.shape], begin, end, mode, value });
  },
});

// ---------------------------------------------------------------------------------------------
// Producers of known values

/** Emits y = a known tensor, for when the compiler lowers a node whose value it already has. */
function emitKnown(e: Emitter, t: Tensor): void {
  if (t.size === 0) return;
  const src: PlanRef = e.ref(e.constant(t));
  e.emit({ op: 'copy', x: src, y: e.ref(e.output(0)), dims: [t.size], xStrides: [1], yStrides: [1], elemBytes: ELEM_BYTES[t.dtype] });
}

function shapeValue(ctx: OpContext): Tensor {
  const shape = requireInput(ctx, 0, 'data').shape;
  const rank = shape.length;
  // Opset 15: start/end select a range of dims, clamped to [0, rank].
  const clamp = (v: number) => Math.min(Math.max(v < 0 ? v + rank : v, 0), rank);
  const start = ctx.opset >= 15 ? clamp(ctx.attrs.int('start', 0)) : 0;
  const end = ctx.opset >= 15 && ctx.attrs.has('end') ? clamp(ctx.attrs.int('end')) : rank;
  return intTensor(shape.slice(start, Math.max(start, end)));
}

/**
 * Shape needs only its input's shape, which is always concrete in a plan; the compiler may call
 * its evaluate even when the input's data is a run-time value (OpDef.shapeOnly).
 */
const Shape: OpDef = {
  shapeOnly: true,
  infer: (ctx) => [{ dtype: 'int64', shape: shapeValue(ctx).dims as number[] }],
  evaluate: (ctx) => [shapeValue(ctx)],
  lower: (ctx, _outputs, e) => emitKnown(e, shapeValue(ctx)),
};

function constantValue(ctx: OpContext): Tensor {
  const a = ctx.attrs;
  const t = a.tensor('value');
  if (t) return t;
  if (a.has('value_float')) return new Tensor('float32', Float32Array.of(a.float('value_float')), []);
  if (a.has('value_floats')) return new Tensor('float32', Float32Array.from(a.floats('value_floats')));
  if (a.has('value_int')) return intTensor([a.int('value_int')], []);
  if (a.has('value_ints')) return intTensor(a.ints('value_ints'));
  for (const name of ['sparse_value', 'value_string', 'value_strings']) {
    if (a.has(name)) unsupported(ctx, `a Constant with '${name}' is not supported`);
  }
  ctx.fail('has no value attribute');
}

const Constant: OpDef = {
  infer(ctx) {
    const t = constantValue(ctx);
    return [{ dtype: t.dtype, shape: [...t.dims] }];
  },
  evaluate: (ctx) => [constantValue(ctx)],
  lower(ctx, _outputs, e) {
    const t = constantValue(ctx);
    movable(ctx, t.dtype);
    emitKnown(e, t);
  },
};

function constantOfShapeFill(ctx: OpContext): { dtype: DType; value: number | bigint } {
  const t = ctx.attrs.tensor('value');
  if (!t) return { dtype: 'float32', value: 0 };
  if (t.size !== 1) ctx.fail(`value must hold one element, it has ${t.size}`);
  return { dtype: t.dtype, value: t.data[0]! };
}

const ConstantOfShape: OpDef = {
  infer(ctx) {
    const shape = readInts(ctx, knownInput(ctx, 0, 'shape'), 'shape');
    if (shape.some((d) => d < 0)) ctx.fail(`shape [${shape.join(', ')}] has a negative dim`);
    return [{ dtype: constantOfShapeFill(ctx).dtype, shape }];
  },
  evaluate(ctx, outputs) {
    const { dtype, value } = constantOfShapeFill(ctx);
    const t = Tensor.zeros(dtype, outputs[0]!.shape);
    (t.data as { fill(v: number | bigint): unknown }).fill(value);
    return [t];
  },
  lower(ctx, outputs, e) {
    const { dtype, value } = constantOfShapeFill(ctx);
    movable(ctx, dtype);
    const count = sizeOf(outputs[0]!.shape);
    if (count === 0) return;
    if (typeof value === 'bigint' && (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(-Number.MAX_SAFE_INTEGER))) {
      emitKnown(e, ConstantOfShape.evaluate!(ctx, outputs)![0]!);
      return;
    }
    e.emit({ op: 'fill', y: e.ref(e.output(0)), dtype: planDType(dtype), count, value: Number(value) });
  },
};

function rangeValue(ctx: OpContext): Tensor {
  const ts = [0, 1, 2].map((i) => knownInput(ctx, i, ['start', 'limit', 'delta'][i]!));
  const dtype = ts[0]!.dtype;
  if (ts.some((t) => t.dtype !== dtype)) ctx.fail(`start, limit and delta must have one type, got ${ts.map((t) => t.dtype).join(', ')}`);
  if (ts.some((t) => t.size !== 1)) ctx.fail('start, limit and delta must be scalars');
  if (dtype === 'int64') {
    const [start, limit, delta] = ts.map((t) => t.data[0] as bigint) as [bigint, bigint, bigint];
    if (delta === 0n) ctx.fail('delta is 0');
    const span = limit - start;
    // ceil((limit - start) / delta) in integers, rounding toward +infinity.
    let n = span / delta;
    if (n * delta !== span && (span > 0n) === (delta > 0n)) n += 1n;
    const count = n > 0n ? Number(n) : 0;
    if (count > 1 << 28) ctx.fail(`Range of ${count} elements is too large`);
    return new Tensor('int64', BigInt64Array.from({ length: count }, (_, i) => start + BigInt(i) * delta), [count]);
  }
  if (dtype !== 'float32' && dtype !== 'int32') unsupported(ctx, `Range of ${dtype} is not supported`);
  const [start, limit, delta] = ts.map((t, i) => scalarOf(ctx, t, ['start', 'limit', 'delta'][i]!)) as [number, number, number];
  if (delta === 0) ctx.fail('delta is 0');
  const count = Math.max(0, Math.ceil((limit - start) / delta));
  if (!Number.isFinite(count) || count > 1 << 28) ctx.fail(`Range of ${count} elements is too large`);
  if (dtype === 'int32') return new Tensor('int32', Int32Array.from({ length: count }, (_, i) => start + i * delta), [count]);
  // onnxruntime accumulates in float32 (value += delta), which this reproduces exactly.
  const data = new Float32Array(count);
  let v = Math.fround(start);
  for (let i = 0; i < count; i++) {
    data[i] = v;
    v = Math.fround(v + Math.fround(delta));
  }
  return new Tensor('float32', data, [count]);
}

const Range: OpDef = {
  infer(ctx) {
    const t = rangeValue(ctx);
    return [{ dtype: t.dtype, shape: [...t.dims] }];
  },
  evaluate: (ctx) => [rangeValue(ctx)],
  lower: (ctx, _outputs, e) => emitKnown(e, rangeValue(ctx)),
};

export const TENSOR_OPS: Record<string, OpDef> = {
  Identity, Dropout, Flatten, Reshape, Squeeze, Unsqueeze,
  Transpose, Slice, Concat, Split, Gather, Expand, Where, Cast, Pad,
  Shape, Constant, ConstantOfShape, Range,
};
