/** Shape helpers shared by the compiler's ops: numpy broadcasting, strides, axes. */
import type { OpContext } from './types.js';

export function sizeOf(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Row-major strides (elements) of a contiguous tensor. */
export function contiguousStrides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) { s[i] = acc; acc *= shape[i]!; }
  return s;
}

/** ONNX multidirectional (numpy) broadcasting of any number of shapes. */
export function broadcastShapes(ctx: OpContext, shapes: readonly (readonly number[])[]): number[] {
  const rank = Math.max(0, ...shapes.map((s) => s.length));
  const out = new Array<number>(rank).fill(1);
  for (const s of shapes) {
    for (let i = 0; i < s.length; i++) {
      const o = rank - s.length + i;
      const d = s[i]!;
      if (d === out[o] || d === 1) continue;
      if (out[o] === 1) { out[o] = d; continue; }
      ctx.fail(`shapes ${shapes.map((x) => `[${x.join(', ')}]`).join(' and ')} cannot be broadcast (axis ${o}: ${out[o]} vs ${d})`, { input: true });
    }
  }
  return out;
}

/** Strides (elements) to read `shape` broadcast to `outShape`: 0 on broadcast axes. */
export function broadcastStrides(shape: readonly number[], outShape: readonly number[]): number[] {
  const own = contiguousStrides(shape);
  return outShape.map((d, o) => {
    const i = o - (outShape.length - shape.length);
    if (i < 0) return 0;
    return shape[i] === 1 && d !== 1 ? 0 : own[i]!;
  });
}

/**
 * Merges adjacent axes that every operand walks as one (contiguous for all, or broadcast for all),
 * and drops size-1 axes, so a plain elementwise add becomes one flat loop. Never returns rank 0.
 */
export function mergeAxes(dims: readonly number[], strides: readonly (readonly number[])[]): { dims: number[]; strides: number[][] } {
  const keep = dims.map((d, i) => i).filter((i) => dims[i] !== 1);
  let outDims: number[] = [];
  let outStrides: number[][] = strides.map(() => []);
  for (const i of keep) {
    const d = dims[i]!;
    const last = outDims.length - 1;
    if (last >= 0 && strides.every((s, k) => outStrides[k]![last] === s[i]! * d)) {
      outDims[last] = outDims[last]! * d;
      strides.forEach((s, k) => { outStrides[k]![last] = s[i]!; });
    } else {
      outDims.push(d);
      strides.forEach((s, k) => outStrides[k]!.push(s[i]!));
    }
  }
  if (outDims.length === 0) {
    outDims = [1];
    outStrides = strides.map(() => [0]);
  }
  return { dims: outDims, strides: outStrides };
}

/** A possibly negative axis in [-rank, rank) as [0, rank), or a ModelFormatError naming the node. */
export function normAxis(ctx: OpContext, axis: number, rank: number, what = 'axis'): number {
  if (axis < -rank || axis >= rank) ctx.fail(`${what} ${axis} is out of range for rank ${rank}`);
  return axis < 0 ? axis + rank : axis;
}
