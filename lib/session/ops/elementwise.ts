/**
 * Elementwise ops: unary activations and math, and binary ops with numpy broadcasting. Each lowers
 * to one 'unary' or 'binary' plan step; each evaluates in TS on small plan-time values (shape
 * arithmetic in int64, small float constants) so the optimiser can fold them.
 */
import { Tensor, type DType } from '../../tensor.js';
import type { BinaryKind, UnaryKind } from '../plan.js';
import { broadcastShapes, broadcastStrides, stridesOf, mergeAxes, sizeOf } from './util.js';
import { planDType, type OpContext, type OpDef, type OutputInfo } from './types.js';

/** Above this many elements TS evaluation would stall the load; the value is computed by the plan instead. */
export const EVAL_MAX_ELEMENTS = 1 << 16;

const FLOAT: readonly DType[] = ['float32'];
const SIGNED: readonly DType[] = ['float32', 'int64', 'int32'];

function checkDType(ctx: OpContext, i: number, allowed: readonly DType[]): DType {
  const v = ctx.inputs[i];
  if (!v) return ctx.fail(`input ${i} is required`);
  if (!allowed.includes(v.dtype)) {
    ctx.fail(`input ${i} has dtype ${v.dtype}; sonde supports ${allowed.join(', ')} here`);
  }
  return v.dtype;
}

/** Reads element i of any plan-time tensor as a number (int64 through Number: shape values are small). */
function num(t: Tensor, i: number): number {
  const v = (t.data as ArrayLike<number | bigint>)[i]!;
  return typeof v === 'bigint' ? Number(v) : v;
}

/** The plan-time value of input i as one number, or a failure naming what is needed. */
export function scalarInput(ctx: OpContext, i: number, what: string): number | undefined {
  const v = ctx.inputs[i];
  if (!v) return undefined;
  if (!v.value) ctx.fail(`${what} (input ${i}) must be known at load time (an initializer or a constant)`);
  if (v.value!.size !== 1) ctx.fail(`${what} (input ${i}) must hold one value, got dims [${v.value!.dims.join(', ')}]`);
  return num(v.value!, 0);
}

function makeTensor(dtype: DType, values: ArrayLike<number>, dims: readonly number[]): Tensor {
  switch (dtype) {
    case 'float32': return new Tensor('float32', Float32Array.from(values), dims);
    case 'int64': return new Tensor('int64', BigInt64Array.from(Array.from(values, (v) => BigInt(Math.trunc(v)))), dims);
    case 'int32': return new Tensor('int32', Int32Array.from(values), dims);
    case 'bool': return new Tensor('bool', Uint8Array.from(values, (v) => (v ? 1 : 0)), dims);
    case 'uint8': return new Tensor('uint8', Uint8Array.from(values), dims);
    case 'int8': return new Tensor('int8', Int8Array.from(values), dims);
    default: throw new Error(`no TS storage for ${dtype}`);
  }
}

// ------------------------------------------------------------------------------------------------
// Unary

interface UnarySpec {
  kind: UnaryKind;
  dtypes: readonly DType[];
  /** Activation parameters (LeakyRelu alpha, Clip bounds, HardSigmoid alpha/beta). */
  params?(ctx: OpContext): { alpha: number; beta: number };
  /** Plain JS of the same function, for plan-time evaluation; absent: never evaluated. */
  f?(x: number, alpha: number, beta: number): number;
}

function unaryOp(spec: UnarySpec): OpDef {
  return {
    infer(ctx) {
      const dtype = checkDType(ctx, 0, spec.dtypes);
      spec.params?.(ctx);
      return [{ dtype, shape: [...ctx.inputs[0]!.shape] }];
    },
    evaluate(ctx, outs) {
      const x = ctx.inputs[0]!.value!;
      if (!spec.f || x.size > EVAL_MAX_ELEMENTS) return undefined;
      const { alpha, beta } = spec.params?.(ctx) ?? { alpha: 0, beta: 0 };
      const out = new Array<number>(x.size);
      for (let i = 0; i < x.size; i++) out[i] = spec.f(num(x, i), alpha, beta);
      return [makeTensor(outs[0]!.dtype, out, outs[0]!.shape)];
    },
    lower(ctx, outs, e) {
      const { alpha, beta } = spec.params?.(ctx) ?? { alpha: 0, beta: 0 };
      const count = sizeOf(outs[0]!.shape);
      if (count === 0) return;
      e.emit({ op: 'unary', kind: spec.kind, dtype: planDType(outs[0]!.dtype), x: e.ref(e.input(0)), y: e.ref(e.output(0)),
        count, alpha, beta });
    },
  };
}

function clipParams(ctx: OpContext): { alpha: number; beta: number } {
  if (ctx.opset < 11) {
    return { alpha: ctx.attrs.float('min', -3.4028234663852886e38), beta: ctx.attrs.float('max', 3.4028234663852886e38) };
  }
  const lo = scalarInput(ctx, 1, 'min');
  const hi = scalarInput(ctx, 2, 'max');
  return { alpha: lo ?? -Infinity, beta: hi ?? Infinity };
}

const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));

export const UNARY_OPS: Record<string, OpDef> = {
  Relu: unaryOp({ kind: 'relu', dtypes: FLOAT, f: (x) => (x < 0 ? 0 : x) }),
  LeakyRelu: unaryOp({ kind: 'leakyRelu', dtypes: FLOAT, params: (c) => ({ alpha: c.attrs.float('alpha', 0.01), beta: 0 }),
    f: (x, a) => (x < 0 ? a * x : x) }),
  Clip: unaryOp({ kind: 'clip', dtypes: FLOAT, params: clipParams, f: (x, a, b) => Math.min(Math.max(x, a), b) }),
  Sigmoid: unaryOp({ kind: 'sigmoid', dtypes: FLOAT, f: sigmoid }),
  Tanh: unaryOp({ kind: 'tanh', dtypes: FLOAT, f: Math.tanh }),
  HardSigmoid: unaryOp({ kind: 'hardSigmoid', dtypes: FLOAT,
    params: (c) => ({ alpha: c.attrs.float('alpha', 0.2), beta: c.attrs.float('beta', 0.5) }),
    f: (x, a, b) => Math.max(0, Math.min(1, a * x + b)) }),
  HardSwish: unaryOp({ kind: 'hardSwish', dtypes: FLOAT, f: (x) => x * Math.max(0, Math.min(1, x / 6 + 0.5)) }),
  // No erf in JS Math: Erf is only ever computed by the plan.
  Erf: unaryOp({ kind: 'erf', dtypes: FLOAT }),
  Exp: unaryOp({ kind: 'exp', dtypes: FLOAT, f: Math.exp }),
  Log: unaryOp({ kind: 'log', dtypes: FLOAT, f: Math.log }),
  Sqrt: unaryOp({ kind: 'sqrt', dtypes: FLOAT, f: Math.sqrt }),
  Neg: unaryOp({ kind: 'neg', dtypes: SIGNED, f: (x) => -x }),
  Abs: unaryOp({ kind: 'abs', dtypes: SIGNED, f: Math.abs }),
  Not: unaryOp({ kind: 'not', dtypes: ['bool'], f: (x) => (x ? 0 : 1) }),
};

// ------------------------------------------------------------------------------------------------
// Binary

interface BinarySpec {
  kind: BinaryKind;
  dtypes: readonly DType[];
  compare?: boolean;
  f(a: number, b: number): number;
  /** Exact int64 arithmetic for shape values (products of dims exceed nothing, but keep them exact). */
  fi?(a: bigint, b: bigint): bigint;
}

function binaryOp(spec: BinarySpec): OpDef {
  const infer = (ctx: OpContext): OutputInfo[] => {
    const da = checkDType(ctx, 0, spec.dtypes);
    const db = checkDType(ctx, 1, spec.dtypes);
    // Pow may take an exponent of another type (opset 12); the plan step needs one dtype, so a
    // plan-time exponent is converted and a runtime one is refused.
    if (da !== db && !(spec.kind === 'pow' && ctx.inputs[1]!.value)) {
      ctx.fail(`inputs have different dtypes (${da} and ${db})`);
    }
    const shape = broadcastShapes(ctx, [ctx.inputs[0]!.shape, ctx.inputs[1]!.shape]);
    return [{ dtype: spec.compare ? 'bool' : da, shape }];
  };
  return {
    infer,
    evaluate(ctx, outs) {
      const a = ctx.inputs[0]!.value!;
      const b = ctx.inputs[1]!.value!;
      const shape = outs[0]!.shape;
      const count = sizeOf(shape);
      if (count > EVAL_MAX_ELEMENTS) return undefined;
      const sa = broadcastStrides(a.dims, shape);
      const sb = broadcastStrides(b.dims, shape);
      const idx = new Array<number>(shape.length).fill(0);
      const exact = a.dtype === 'int64' && b.dtype === 'int64' && spec.fi;
      const outBig = exact && !spec.compare ? new BigInt64Array(count) : undefined;
      const out = new Array<number>(count);
      for (let i = 0; i < count; i++) {
        let ia = 0;
        let ib = 0;
        for (let d = 0; d < shape.length; d++) { ia += idx[d]! * sa[d]!; ib += idx[d]! * sb[d]!; }
        if (exact) {
          const x = (a.data as BigInt64Array)[ia]!;
          const y = (b.data as BigInt64Array)[ib]!;
          if (spec.kind === 'div' && y === 0n) ctx.fail('integer division by zero');
          if (outBig) outBig[i] = spec.fi!(x, y);
          else out[i] = spec.fi!(x, y) ? 1 : 0;
        } else {
          let r = spec.f(num(a, ia), num(b, ib));
          if (a.dtype === 'int32' && !spec.compare) {
            if (spec.kind === 'div' && num(b, ib) === 0) ctx.fail('integer division by zero');
            r = Math.trunc(r) | 0;
          }
          out[i] = r;
        }
        for (let d = shape.length - 1; d >= 0; d--) {
          if (++idx[d]! < shape[d]!) break;
          idx[d] = 0;
        }
      }
      if (outBig) return [new Tensor('int64', outBig, shape)];
      return [makeTensor(outs[0]!.dtype, out, shape)];
    },
    lower(ctx, outs, e) {
      const shape = outs[0]!.shape;
      if (sizeOf(shape) === 0) return;
      const ia = ctx.inputs[0]!;
      const ib = ctx.inputs[1]!;
      let bId: number;
      if (ib.dtype !== ia.dtype) {
        const t = ib.value!;
        bId = e.constant(makeTensor(ia.dtype, Array.from({ length: t.size }, (_, i) => num(t, i)), t.dims));
      } else {
        bId = e.input(1);
      }
      const merged = mergeAxes(shape, [broadcastStrides(ia.shape, shape), broadcastStrides(ib.shape, shape), stridesOf(shape)]);
      if (merged.dims.length > 8) ctx.fail(`broadcasting over ${merged.dims.length} non-mergeable axes; sonde supports 8`);
      e.emit({ op: 'binary', kind: spec.kind, dtype: planDType(ia.dtype), a: e.ref(e.input(0)), b: e.ref(bId), y: e.ref(e.output(0)),
        dims: merged.dims, aStrides: merged.strides[0]!, bStrides: merged.strides[1]! });
    },
  };
}

const truncDiv = (a: bigint, b: bigint) => a / b;

export const BINARY_OPS: Record<string, OpDef> = {
  Add: binaryOp({ kind: 'add', dtypes: SIGNED, f: (a, b) => a + b, fi: (a, b) => a + b }),
  Sub: binaryOp({ kind: 'sub', dtypes: SIGNED, f: (a, b) => a - b, fi: (a, b) => a - b }),
  Mul: binaryOp({ kind: 'mul', dtypes: SIGNED, f: (a, b) => a * b, fi: (a, b) => a * b }),
  Div: binaryOp({ kind: 'div', dtypes: SIGNED, f: (a, b) => a / b, fi: truncDiv }),
  Pow: binaryOp({ kind: 'pow', dtypes: SIGNED, f: (a, b) => a ** b }),
  Equal: binaryOp({ kind: 'equal', dtypes: SIGNED, compare: true, f: (a, b) => (a === b ? 1 : 0), fi: (a, b) => (a === b ? 1n : 0n) }),
  Less: binaryOp({ kind: 'less', dtypes: SIGNED, compare: true, f: (a, b) => (a < b ? 1 : 0), fi: (a, b) => (a < b ? 1n : 0n) }),
  Greater: binaryOp({ kind: 'greater', dtypes: SIGNED, compare: true, f: (a, b) => (a > b ? 1 : 0), fi: (a, b) => (a > b ? 1n : 0n) }),
};

export const ELEMENTWISE_OPS: Record<string, OpDef> = { ...UNARY_OPS, ...BINARY_OPS };
