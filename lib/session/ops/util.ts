/**
 * Helpers shared by the operator tables of the graph compiler: axis normalisation, strides and
 * broadcasting, merging the dims of strided copies, reading shape-arithmetic tensors, and typed
 * attribute access. Everything here works on concrete shapes (plans are compiled per input shape).
 */
import { UnsupportedOperatorError } from '../../errors.js';
import { nodeWhere } from '../attrs.js';
import { Tensor, type DType } from '../../tensor.js';
import type { CValue, Emitter, OpContext, OpDef, ValueId } from './types.js';

export function sizeOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Row-major strides (elements) of a contiguous tensor of `shape`. */
export function stridesOf(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i]!;
  }
  return s;
}

/** ONNX axis in [-rank, rank) -> [0, rank); anything else fails naming the node and attribute. */
export function normAxis(ctx: OpContext, axis: number, rank: number, what = 'axis'): number {
  if (!Number.isInteger(axis) || axis < -rank || axis >= rank) {
    ctx.fail(`${what} ${axis} is out of range for rank ${rank} (expected [${-rank}, ${rank - 1}])`);
  }
  return axis < 0 ? axis + rank : axis;
}

/** Normalised, duplicate-free axes (in the order given). */
export function normAxes(ctx: OpContext, axes: readonly number[], rank: number, what = 'axes'): number[] {
  const out = axes.map((a) => normAxis(ctx, a, rank, what));
  if (new Set(out).size !== out.length) ctx.fail(`${what} [${axes.join(', ')}] names an axis twice`);
  return out;
}

/** Largest integer a JS number holds exactly (2^53 - 1): beyond it sizes and indices would be rounded. */
const SAFE = Number.MAX_SAFE_INTEGER;

/**
 * The values of an int64/int32 tensor as numbers. A value beyond 2^53 fails (it cannot be a real
 * size or index) unless `clamp` is set: Slice's starts/ends use INT64_MAX/MIN as "to the end",
 * which clamping preserves.
 */
export function readInts(ctx: OpContext, t: Tensor, what: string, options: { clamp?: boolean } = {}): number[] {
  if (t.dtype !== 'int64' && t.dtype !== 'int32') ctx.fail(`${what} must be an int64 or int32 tensor, got ${t.dtype}`);
  const out = new Array<number>(t.size);
  for (let i = 0; i < t.size; i++) {
    const v = t.data[i]!;
    if (typeof v === 'bigint') {
      if (v > BigInt(SAFE) || v < BigInt(-SAFE)) {
        if (!options.clamp) ctx.fail(`${what}[${i}] = ${v} is beyond the range sonde handles (|value| <= 2^53 - 1)`);
        out[i] = v > 0n ? SAFE : -SAFE;
      } else {
        out[i] = Number(v);
      }
    } else {
      out[i] = v as number;
    }
  }
  return out;
}

/** Numbers from an ONNX ints attribute, clamped like readInts({ clamp: true }). */
export function clampInts(values: readonly number[]): number[] {
  return values.map((v) => Math.max(-SAFE, Math.min(SAFE, v)));
}

/** The first element of a numeric tensor as a number (a scalar input such as Pad's constant_value). */
export function scalarOf(ctx: OpContext, t: Tensor, what: string): number {
  if (t.size !== 1) ctx.fail(`${what} must hold one value, it has ${t.size}`);
  const v = t.data[0]!;
  if (t.dtype === 'float16' || t.dtype === 'bfloat16') unsupported(ctx, `${what} of type ${t.dtype} is not supported`);
  return typeof v === 'bigint' ? Number(v) : (v as number);
}

/** An int64 (or int32) tensor holding `values`. */
export function intTensor(values: readonly number[], dims: readonly number[] = [values.length], dtype: 'int64' | 'int32' = 'int64'): Tensor {
  if (dtype === 'int32') return new Tensor('int32', Int32Array.from(values), dims);
  return new Tensor('int64', BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

/** ONNX multidirectional (numpy) broadcasting of several shapes. */
export function broadcastShapes(ctx: OpContext, shapes: readonly (readonly number[])[]): number[] {
  const rank = Math.max(0, ...shapes.map((s) => s.length));
  const out = new Array<number>(rank).fill(1);
  for (let i = 0; i < rank; i++) {
    for (const s of shapes) {
      const d = s[s.length - rank + i] ?? 1;
      if (d === 1) continue;
      if (out[i] === 1) out[i] = d;
      else if (out[i] !== d) {
        ctx.fail(`shapes ${shapes.map((x) => `[${x.join(', ')}]`).join(', ')} cannot be broadcast together (dim ${i - rank}: ${out[i]} vs ${d})`, { input: true });
      }
    }
  }
  return out;
}

/** Strides that read a contiguous tensor of `shape` as `outShape` (0 along broadcast dims). */
export function broadcastStrides(shape: readonly number[], outShape: readonly number[]): number[] {
  const own = stridesOf(shape);
  const lead = outShape.length - shape.length;
  return outShape.map((_, i) => (i < lead || shape[i - lead] === 1 ? 0 : own[i - lead]!));
}

/**
 * Merges the dims of a strided walk so native steps loop over as few dims as possible: size-1
 * dims are dropped and a dim folds into the next when every operand steps over it exactly as over
 * the next one's whole extent. Returns undefined when the walk is empty (a 0 dim); a walk of one
 * element comes back as dims [1].
 */
export function mergeDims(dims: readonly number[], strides: readonly (readonly number[])[]): { dims: number[]; strides: number[][] } | undefined {
  if (dims.some((d) => d === 0)) return undefined;
  const outDims: number[] = [];
  const outStrides: number[][] = strides.map(() => []);
  for (let i = 0; i < dims.length; i++) {
    const d = dims[i]!;
    if (d === 1) continue;
    const last = outDims.length - 1;
    if (last >= 0 && strides.every((s, k) => outStrides[k]![last] === s[i]! * d)) {
      outDims[last]! *= d;
      strides.forEach((s, k) => { outStrides[k]![last] = s[i]!; });
    } else {
      outDims.push(d);
      strides.forEach((s, k) => outStrides[k]!.push(s[i]!));
    }
  }
  if (outDims.length === 0) return { dims: [1], strides: strides.map(() => [1]) };
  return { dims: outDims, strides: outStrides };
}

/** mergeDims for a step that is emitted even when empty: an empty walk is dims [0]. */
export function mergeAxes(dims: readonly number[], strides: readonly (readonly number[])[]): { dims: number[]; strides: number[][] } {
  return mergeDims(dims, strides) ?? { dims: [0], strides: strides.map(() => [0]) };
}

/** The known value of input i, or an UnsupportedOperatorError saying it must be known at plan time. */
export function knownInput(ctx: OpContext, i: number, what: string): Tensor {
  const v = ctx.inputs[i];
  if (!v) ctx.fail(`input ${i} (${what}) is missing`);
  if (!v.value) unsupported(ctx, `${what} must be known when the plan is built (an initializer, a Constant or a value computed from shapes); here it is computed at run time`);
  return v.value;
}

/** Input i, which must be present. */
export function requireInput(ctx: OpContext, i: number, what: string): CValue {
  const v = ctx.inputs[i];
  if (!v) ctx.fail(`input ${i} (${what}) is missing`);
  return v;
}

export function unsupported(ctx: OpContext, message: string): never {
  throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: ${message}`);
}

/** ONNX TensorProto.DataType codes of the dtypes sonde has. */
export const ONNX_DTYPE_CODE: Record<number, DType> = {
  1: 'float32', 2: 'uint8', 3: 'int8', 6: 'int32', 7: 'int64', 9: 'bool', 10: 'float16', 16: 'bfloat16',
};

/** Rank limit of native strided steps (kMaxRank of native/ops/tensor_ops.h). */
export const MAX_STEP_RANK = 8;

/**
 * Calls `emitOne` for a strided walk of at most MAX_STEP_RANK dims: a walk that stays deeper after
 * merging is split along its leading dims into several walks at shifted offsets.
 */
export function splitRank(dims: readonly number[], strides: readonly (readonly number[])[], offsets: readonly number[],
  emitOne: (dims: number[], strides: number[][], offsets: number[]) => void): void {
  if (dims.length <= MAX_STEP_RANK) {
    emitOne([...dims], strides.map((s) => [...s]), [...offsets]);
    return;
  }
  for (let i = 0; i < dims[0]!; i++) {
    splitRank(dims.slice(1), strides.map((s) => s.slice(1)), offsets.map((o, k) => o + i * strides[k]![0]!), emitOne);
  }
}

/** Emits the 'copy' steps of y[yOffset + yStrides . j] = x[xOffset + xStrides . j] over `dims` (nothing if empty). */
export function emitCopy(e: Emitter, x: ValueId, xOffset: number, y: ValueId, yOffset: number, dims: readonly number[],
  xStrides: readonly number[], yStrides: readonly number[], elemBytes: number): void {
  const m = mergeDims(dims, [xStrides, yStrides]);
  if (!m) return;
  splitRank(m.dims, m.strides, [xOffset, yOffset], (d, [xs, ys], [xo, yo]) => {
    e.emit({ op: 'copy', x: e.ref(x, xo), y: e.ref(y, yo), dims: d, xStrides: xs!, yStrides: ys!, elemBytes });
  });
}

