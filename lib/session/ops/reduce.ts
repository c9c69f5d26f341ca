/**
 * Reductions: ReduceSum/Mean/Max/Min, ArgMax, TopK. Each lowers to native steps over a
 * [outer, r, inner] view of its input; several reduced axes become one step per run of adjacent
 * reduced axes (size-1 dims are skipped when finding runs, so [2, 1, 3] reduced over axes 1 and 2
 * is one step), chained through temps.
 */
import { Tensor, type DType } from '../../tensor.js';
import type { ReduceKind } from '../plan.js';
import { evaluateByLowering } from './host.js';
import { planDType, type OpContext, type OpDef, type OutputInfo } from './types.js';
import { knownInput, normAxes, normAxis, readInts, requireInput, sizeOf, unsupported } from './util.js';

interface ReducePlan {
  /** Normalised reduced axes; empty with noop = the output is the input. */
  axes: number[];
  keepdims: boolean;
}

/**
 * Axes of a Reduce*: an attribute before `inputFrom` (ReduceSum 13, the others 18), the optional
 * second input from then on, where an absent or empty axes input reduces everything unless
 * noop_with_empty_axes is set.
 */
function reducePlan(ctx: OpContext, inputFrom: number): ReducePlan {
  const rank = requireInput(ctx, 0, 'data').shape.length;
  const keepdims = ctx.attrs.int('keepdims', 1) !== 0;
  let given: number[] | undefined;
  if (ctx.opset < inputFrom) {
    given = ctx.attrs.has('axes') ? ctx.attrs.ints('axes') : undefined;
  } else if (ctx.inputs[1]) {
    given = readInts(ctx, knownInput(ctx, 1, 'axes'), 'axes');
  }
  if (given === undefined || given.length === 0) {
    const noop = ctx.opset >= inputFrom && ctx.attrs.int('noop_with_empty_axes', 0) !== 0;
    return { axes: noop ? [] : Array.from({ length: rank }, (_, i) => i), keepdims };
  }
  return { axes: normAxes(ctx, given, rank), keepdims };
}

function reducedShape(shape: number[], axes: number[], keepdims: boolean): number[] {
  return keepdims ? shape.map((d, i) => (axes.includes(i) ? 1 : d)) : shape.filter((_, i) => !axes.includes(i));
}

function reduceOp(kind: ReduceKind, inputFrom: number): OpDef {
  const def: OpDef = {
    infer(ctx) {
      const x = requireInput(ctx, 0, 'data');
      const { axes, keepdims } = reducePlan(ctx, inputFrom);
      return [{ dtype: x.dtype, shape: reducedShape(x.shape, axes, keepdims) }];
    },
    evaluate: (ctx, outputs) => evaluateByLowering(def, ctx, outputs),
    lower(ctx, outputs, e) {
      const x = requireInput(ctx, 0, 'data');
      const out = outputs[0]!;
      const { axes } = reducePlan(ctx, inputFrom);
      if (x.dtype !== 'float32' && !(x.dtype === 'int64' && kind !== 'mean')) {
        unsupported(ctx, `${ctx.node.opType} of ${x.dtype} is not supported (float32${kind !== 'mean' ? ' and int64' : ''} are)`);
      }
      const count = sizeOf(out.shape);
      if (count === 0) return;
      if (axes.some((a) => x.shape[a] === 0)) {
        // An empty reduction: the identity of the operation, as ONNX (opset 18) defines it.
        if (kind === 'mean') ctx.fail(`ReduceMean over an empty set (axis of size 0 in [${x.shape.join(', ')}])`, { input: true });
        if (x.dtype === 'int64' && kind !== 'sum') {
          // INT64_MIN/MAX are not all doubles, so a fill value could not carry them: broadcast a constant.
          const limit = new Tensor('int64', BigInt64Array.of(kind === 'max' ? -(2n ** 63n) : 2n ** 63n - 1n), []);
          e.emit({ op: 'copy', x: e.ref(e.constant(limit)), y: e.ref(e.output(0)), dims: [count], xStrides: [0], yStrides: [1], elemBytes: 8 });
          return;
        }
        const value = kind === 'sum' ? 0 : kind === 'max' ? -Infinity : Infinity;
        e.emit({ op: 'fill', y: e.ref(e.output(0)), dtype: planDType(x.dtype), count, value });
        return;
      }
      // Runs of [dim, reduced], size-1 dims dropped and neighbours of the same kind merged.
      const runs: { d: number; reduced: boolean }[] = [];
      x.shape.forEach((d, i) => {
        if (d === 1) return;
        const reduced = axes.includes(i);
        const last = runs[runs.length - 1];
        if (last && last.reduced === reduced) last.d *= d;
        else runs.push({ d, reduced });
      });
      let steps = runs.filter((r) => r.reduced).length;
      if (steps === 0) {
        e.alias(0, 0);
        return;
      }
      let src = e.input(0);
      while (steps > 0) {
        const at = runs.findIndex((r) => r.reduced);
        const outer = sizeOf(runs.slice(0, at).map((r) => r.d));
        const inner = sizeOf(runs.slice(at + 1).map((r) => r.d));
        const dst = steps === 1 ? e.output(0) : e.temp(x.dtype, [outer * inner]);
        e.emit({ op: 'reduce', kind, dtype: planDType(x.dtype), x: e.ref(src), y: e.ref(dst), outer, r: runs[at]!.d, inner });
        runs.splice(at, 1);
        // The kept runs either side of the one just reduced are now adjacent.
        if (at > 0 && at < runs.length && !runs[at - 1]!.reduced && !runs[at]!.reduced) {
          runs[at - 1]!.d *= runs[at]!.d;
          runs.splice(at, 1);
        }
        src = dst;
        steps--;
      }
    },
  };
  return def;
}

function argAxis(ctx: OpContext, def: number): { axis: number; shape: number[] } {
  const shape = requireInput(ctx, 0, 'data').shape;
  return { axis: normAxis(ctx, ctx.attrs.int('axis', def), shape.length), shape };
}

function floatOnly(ctx: OpContext, dtype: DType): void {
  if (dtype !== 'float32') unsupported(ctx, `${ctx.node.opType} of ${dtype} is not supported (float32 is)`);
}

const ArgMax: OpDef = {
  infer(ctx) {
    const { axis, shape } = argAxis(ctx, 0);
    if (shape[axis] === 0) ctx.fail(`ArgMax over an empty axis ${axis} of [${shape.join(', ')}]`, { input: true });
    return [{ dtype: 'int64', shape: reducedShape(shape, [axis], ctx.attrs.int('keepdims', 1) !== 0) }];
  },
  evaluate: (ctx, outputs) => evaluateByLowering(ArgMax, ctx, outputs),
  lower(ctx, outputs, e) {
    floatOnly(ctx, requireInput(ctx, 0, 'data').dtype);
    const { axis, shape } = argAxis(ctx, 0);
    if (sizeOf(outputs[0]!.shape) === 0) return;
    e.emit({
      op: 'argmax', x: e.ref(e.input(0)), y: e.ref(e.output(0)), outer: sizeOf(shape.slice(0, axis)), r: shape[axis]!,
      inner: sizeOf(shape.slice(axis + 1)), selectLastIndex: ctx.opset >= 12 && ctx.attrs.int('select_last_index', 0) !== 0,
    });
  },
};

function topK(ctx: OpContext): { axis: number; shape: number[]; k: number } {
  const { axis, shape } = argAxis(ctx, -1);
  let k: number;
  if (ctx.opset < 10) k = ctx.attrs.int('k');
  else {
    const kv = readInts(ctx, knownInput(ctx, 1, 'K'), 'K');
    if (kv.length !== 1) ctx.fail(`K must hold one value, it has ${kv.length}`);
    k = kv[0]!;
  }
  if (k < 0 || k > shape[axis]!) ctx.fail(`k = ${k} is out of range for axis ${axis} of size ${shape[axis]}`, { input: true });
  return { axis, shape, k };
}

const TopK: OpDef = {
  infer(ctx) {
    const x = requireInput(ctx, 0, 'X');
    const { axis, shape, k } = topK(ctx);
    const out = [...shape];
    out[axis] = k;
    return [{ dtype: x.dtype, shape: out }, { dtype: 'int64', shape: [...out] }];
  },
  evaluate: (ctx, outputs) => evaluateByLowering(TopK, ctx, outputs),
  lower(ctx, outputs, e) {
    floatOnly(ctx, requireInput(ctx, 0, 'X').dtype);
    const { axis, shape, k } = topK(ctx);
    if (sizeOf(outputs[0]!.shape) === 0) return;
    // sorted = 0 allows any order; the native step always sorts, which satisfies it.
    e.emit({
      op: 'topk', x: e.ref(e.input(0)), values: e.ref(e.output(0)), indices: e.ref(e.output(1)),
      outer: sizeOf(shape.slice(0, axis)), r: shape[axis]!, inner: sizeOf(shape.slice(axis + 1)), k,
      largest: ctx.opset < 11 || ctx.attrs.int('largest', 1) !== 0,
    });
  },
};

export const REDUCE_OPS: Record<string, OpDef> = {
  ReduceSum: reduceOp('sum', 13),
  ReduceMean: reduceOp('mean', 18),
  ReduceMax: reduceOp('max', 18),
  ReduceMin: reduceOp('min', 18),
  ArgMax,
  TopK,
};
