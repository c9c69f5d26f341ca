/**
 * Plan-time evaluation by lowering: an op's `lower` runs against an Emitter whose values are
 * TypedArrays, and each step it emits executes at once in TS with the plan contract's semantics
 * (lib/session/plan.ts). Constant folding and shape arithmetic thus run the very steps the native
 * executor would run, so one lowering serves both, and the op tests (which compare folded values
 * with onnxruntime) check the lowering's offsets and strides too.
 *
 * Only the data-movement, cast, pad and reduction steps are implemented here; they are all the
 * tensor and reduce ops emit. A step of another kind is an internal error, never a wrong value.
 */
import { SondeError } from '../../errors.js';
import { Tensor, type DType, type TensorData } from '../../tensor.js';
import type { PlanRef, PlanStep } from '../plan.js';
import type { Emitter, OpContext, OpDef, OutputInfo, ValueId } from './types.js';
import { sizeOf, stridesOf } from './util.js';

type Elem = number | bigint;

function alloc(dtype: DType, shape: readonly number[]): Tensor {
  return Tensor.zeros(dtype, shape);
}

class HostEmitter implements Emitter {
  readonly values: Tensor[] = [];
  private readonly inputIds: (ValueId | undefined)[];
  private readonly outputIds: (ValueId | undefined)[];

  constructor(private readonly ctx: OpContext, private readonly outputs: OutputInfo[], data: (Tensor | undefined)[]) {
    this.inputIds = ctx.inputs.map((v, i) => {
      const t = v?.value ?? data[i];
      return t ? this.add(t) : undefined;
    });
    this.outputIds = outputs.map(() => undefined);
  }

  private add(t: Tensor): ValueId {
    this.values.push(t);
    return this.values.length - 1;
  }

  input(i: number): ValueId {
    const id = this.inputIds[i];
    if (id === undefined) throw internal(this.ctx, `lowering read input ${i}, which is absent`);
    return id;
  }

  output(i: number): ValueId {
    const info = this.outputs[i];
    if (!info) throw internal(this.ctx, `lowering wrote output ${i}, which the node does not have`);
    this.outputIds[i] ??= this.add(alloc(info.dtype, info.shape));
    return this.outputIds[i];
  }

  temp(dtype: DType, shape: number[]): ValueId {
    return this.add(alloc(dtype, shape));
  }

  constant(t: Tensor): ValueId {
    return this.add(t);
  }

  ref(id: ValueId, offset = 0): PlanRef {
    return { buffer: id, offset };
  }

  emit(step: Omit<PlanStep, 'node'>): void {
    runHostStep(this.ctx, step as PlanStep, this.values);
  }

  alias(output: number, input: number): void {
    const info = this.outputs[output]!;
    const src = this.values[this.input(input)]!;
    this.outputIds[output] = this.add(new Tensor(info.dtype, src.data, info.shape));
  }

  results(): Tensor[] {
    return this.outputs.map((_, i) => this.values[this.output(i)]!);
  }
}

function internal(ctx: OpContext, message: string): Error {
  return new SondeError('ERR_SONDE_INTERNAL', `node '${ctx.node.name}' (${ctx.node.opType}): ${message}`);
}

/**
 * Evaluates a node whose inputs are all known by running its lowering on the host. Returns
 * undefined when some present input is a run-time value.
 */
export function evaluateByLowering(def: OpDef, ctx: OpContext, outputs: OutputInfo[]): Tensor[] | undefined {
  if (ctx.inputs.some((v) => v !== undefined && v.value === undefined)) return undefined;
  return lowerOnHost(def, ctx, outputs, []);
}

/**
 * Runs a node's lowering on the host with `data[i]` standing in for input i where the compiler
 * sees a run-time value (ctx.inputs[i].value undefined): the path a plan takes for run-time
 * inputs, computed in TS. Tests use it to check lowerings without the native executor.
 */
export function lowerOnHost(def: OpDef, ctx: OpContext, outputs: OutputInfo[], data: (Tensor | undefined)[]): Tensor[] {
  const e = new HostEmitter(ctx, outputs, data);
  def.lower(ctx, outputs, e);
  return e.results();
}

/** Walks every index of `dims`, calling `f` with the element offset of each operand. */
function walk(dims: readonly number[], bases: readonly number[], strides: readonly (readonly number[])[], f: (offs: number[]) => void): void {
  const rank = dims.length;
  if (dims.some((d) => d === 0)) return;
  const idx = new Array<number>(rank).fill(0);
  const offs = [...bases];
  for (;;) {
    f(offs);
    let k = rank - 1;
    for (; k >= 0; k--) {
      idx[k]!++;
      for (let o = 0; o < offs.length; o++) offs[o]! += strides[o]![k]!;
      if (idx[k]! < dims[k]!) break;
      for (let o = 0; o < offs.length; o++) offs[o]! -= strides[o]![k]! * dims[k]!;
      idx[k] = 0;
    }
    if (k < 0) return;
  }
}

function toDType(v: Elem, to: DType): Elem {
  const n = typeof v === 'bigint' ? Number(v) : v;
  switch (to) {
    case 'float32': return n;
    // NaN != 0, so NaN casts to true (as C++ and onnxruntime).
    case 'bool': return n !== 0 ? 1 : 0;
    case 'int64':
      if (typeof v === 'bigint') return v;
      return Number.isFinite(n) ? BigInt(Math.trunc(n)) : 0n;
    default:
      // Typed-array stores wrap int32/int8/uint8 modulo 2^bits, as a C cast of the truncated value.
      return Number.isFinite(n) ? Math.trunc(n) : 0;
  }
}

function cmpGreater(a: Elem, b: Elem): boolean {
  // NaN counts as the largest, as in onnxruntime's ArgMax/TopK.
  if (typeof a === 'number' && Number.isNaN(a)) return !(typeof b === 'number' && Number.isNaN(b));
  if (typeof b === 'number' && Number.isNaN(b)) return false;
  return a > b;
}

function runHostStep(ctx: OpContext, step: PlanStep, values: Tensor[]): void {
  const arr = (r: PlanRef) => values[r.buffer]!.data as TensorData & Record<number, Elem>;
  switch (step.op) {
    case 'copy': {
      const x = arr(step.x);
      const y = arr(step.y);
      walk(step.dims, [step.x.offset, step.y.offset], [step.xStrides, step.yStrides], ([xo, yo]) => { y[yo!] = x[xo!]!; });
      return;
    }
    case 'fill': {
      const y = arr(step.y);
      const v = toDType(step.value, step.dtype);
      for (let i = 0; i < step.count; i++) y[step.y.offset + i] = v;
      return;
    }
    case 'cast': {
      const x = arr(step.x);
      const y = arr(step.y);
      for (let i = 0; i < step.count; i++) y[step.y.offset + i] = toDType(x[step.x.offset + i]!, step.to);
      return;
    }
    case 'where': {
      const c = arr(step.cond);
      const x = arr(step.x);
      const yv = arr(step.y);
      const out = arr(step.out);
      const outStrides = stridesOf(step.dims);
      walk(step.dims, [step.cond.offset, step.x.offset, step.y.offset, step.out.offset],
        [step.condStrides, step.xStrides, step.yStrides, outStrides], ([co, xo, yo, oo]) => {
          out[oo!] = c[co!] ? x[xo!]! : yv[yo!]!;
        });
      return;
    }
    case 'gather': {
      const data = arr(step.data);
      const ind = arr(step.indices);
      const y = arr(step.y);
      for (let j = 0; j < step.nIndices; j++) {
        let k = Number(ind[step.indices.offset + j]!);
        if (k < -step.axisLen || k >= step.axisLen) {
          throw ctxError(ctx, `index ${k} is out of range [${-step.axisLen}, ${step.axisLen})`);
        }
        if (k < 0) k += step.axisLen;
        for (let o = 0; o < step.outer; o++) {
          const src = step.data.offset + (o * step.axisLen + k) * step.inner;
          const dst = step.y.offset + (o * step.nIndices + j) * step.inner;
          for (let i = 0; i < step.inner; i++) y[dst + i] = data[src + i]!;
        }
      }
      return;
    }
    case 'pad': {
      const x = arr(step.x);
      const y = arr(step.y);
      const rank = step.inDims.length;
      const outDims = step.inDims.map((d, i) => d + step.begin[i]! + step.end[i]!);
      const inStrides = stridesOf(step.inDims);
      const fillValue = toDType(step.value, step.dtype);
      let dst = step.y.offset;
      const idx = new Array<number>(rank).fill(0);
      const total = sizeOf(outDims);
      for (let n = 0; n < total; n++) {
        let src = step.x.offset;
        let inside = true;
        for (let k = 0; k < rank; k++) {
          let i = idx[k]! - step.begin[k]!;
          const d = step.inDims[k]!;
          if (i < 0 || i >= d) {
            if (step.mode === 'constant') { inside = false; break; }
            if (step.mode === 'edge') i = i < 0 ? 0 : d - 1;
            else {
              const period = 2 * (d - 1);
              i = Math.abs(i) % (period || 1);
              if (i >= d) i = period - i;
            }
          }
          src += i * inStrides[k]!;
        }
        y[dst++] = inside ? x[src]! : fillValue;
        for (let k = rank - 1; k >= 0; k--) {
          if (++idx[k]! < outDims[k]!) break;
          idx[k] = 0;
        }
      }
      return;
    }
    case 'reduce': {
      const x = arr(step.x);
      const y = arr(step.y);
      const { outer, r, inner } = step;
      for (let o = 0; o < outer; o++) {
        for (let i = 0; i < inner; i++) {
          const base = step.x.offset + o * r * inner + i;
          let acc: Elem | undefined;
          for (let j = 0; j < r; j++) {
            const v = x[base + j * inner]!;
            if (acc === undefined) acc = v;
            else if (step.kind === 'sum' || step.kind === 'mean') acc = (acc as number) + (v as number);
            else if (step.kind === 'max') acc = cmpGreater(v, acc) ? v : acc;
            else acc = cmpGreater(acc, v) ? v : acc;
          }
          if (acc === undefined) throw ctxError(ctx, 'reduction over an empty axis');
          if (step.kind === 'mean') acc = typeof acc === 'bigint' ? acc / BigInt(r) : acc / r;
          y[step.y.offset + o * inner + i] = acc;
        }
      }
      return;
    }
    case 'argmax': {
      const x = arr(step.x);
      const y = arr(step.y);
      const { outer, r, inner } = step;
      for (let o = 0; o < outer; o++) {
        for (let i = 0; i < inner; i++) {
          const base = step.x.offset + o * r * inner + i;
          let best = 0;
          for (let j = 1; j < r; j++) {
            const v = x[base + j * inner]!;
            const b = x[base + best * inner]!;
            if (cmpGreater(v, b) || (step.selectLastIndex && !cmpGreater(b, v))) best = j;
          }
          y[step.y.offset + o * inner + i] = BigInt(best);
        }
      }
      return;
    }
    case 'topk': {
      const x = arr(step.x);
      const vals = arr(step.values);
      const inds = arr(step.indices);
      const { outer, r, inner, k } = step;
      for (let o = 0; o < outer; o++) {
        for (let i = 0; i < inner; i++) {
          const base = step.x.offset + o * r * inner + i;
          const order = Array.from({ length: r }, (_, j) => j);
          // Ties keep the lower index first, as onnxruntime does.
          order.sort((p, q) => {
            const a = x[base + p * inner]!;
            const b = x[base + q * inner]!;
            const first = step.largest ? cmpGreater(a, b) : cmpGreater(b, a);
            const second = step.largest ? cmpGreater(b, a) : cmpGreater(a, b);
            return first ? -1 : second ? 1 : p - q;
          });
          for (let j = 0; j < k; j++) {
            vals[step.values.offset + (o * k + j) * inner + i] = x[base + order[j]! * inner]!;
            inds[step.indices.offset + (o * k + j) * inner + i] = BigInt(order[j]!);
          }
        }
      }
      return;
    }
    default:
      throw internal(ctx, `plan-time evaluation of '${step.op}' steps is not implemented`);
  }
}

function ctxError(ctx: OpContext, message: string): Error {
  try {
    ctx.fail(message, { input: true });
  } catch (err) {
    return err as Error;
  }
}
