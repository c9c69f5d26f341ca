/**
 * How an ONNX operator is compiled. The compiler (lib/session/compile.ts) walks the optimised graph
 * once per set of input shapes. For each node it calls the op's `infer` (output dtypes and concrete
 * shapes), then either `evaluate` (every input is known at plan time — an initializer, a Constant,
 * a Shape of a concrete tensor — and the op can be computed in TS: shape arithmetic, small
 * constants) or `lower` (emit native plan steps, lib/session/plan.ts). After all nodes are lowered,
 * the memory planner gives every value a buffer and rewrites the steps' refs.
 *
 * Ops are registered in lib/session/ops/index.ts as `Record<opType, OpDef>` per domain.
 */
import type { OnnxNode, AttributeValue } from '../../onnx/model.js';
import type { DType, Tensor } from '../../tensor.js';
import type { PlanDType, PlanRef, PlanStep } from '../plan.js';

/** A value during compilation: dtype, concrete shape, and its data when known at plan time. */
export interface CValue {
  dtype: DType;
  shape: number[];
  /** Known at plan time (initializer, Constant, folded). */
  value?: Tensor;
}

export interface OutputInfo {
  dtype: DType;
  shape: number[];
}

/** What an op sees of its node while compiling. */
export interface OpContext {
  node: OnnxNode;
  /** Default-domain opset of the model (attribute vs input forms differ across opsets). */
  opset: number;
  /** One per node input; undefined where the input is absent ('' or beyond the list). */
  inputs: (CValue | undefined)[];
  attrs: Attrs;
  /** What load-time `prepare` returned for this node (native handles), if the op has prepare. */
  prepared?: unknown;
  /** A ModelFormatError (or InvalidArgumentError when `input` is true) naming the node. */
  fail(message: string, options?: { input?: boolean }): never;
}

/** Typed attribute access with ONNX defaults; a wrong attribute type is a ModelFormatError. */
export interface Attrs {
  has(name: string): boolean;
  int(name: string, def?: number): number;
  float(name: string, def?: number): number;
  string(name: string, def?: string): string;
  ints(name: string, def?: number[]): number[];
  floats(name: string, def?: number[]): number[];
  tensor(name: string): Tensor | undefined;
  raw(name: string): AttributeValue | undefined;
}

/** Id of a value in the plan being built (input, output, intermediate, temp or const). */
export type ValueId = number;

/** The emitting side of lowering; refs are placeholders the memory planner rewrites. */
export interface Emitter {
  /** The value of node input i (must be present). */
  input(i: number): ValueId;
  /** The value of node output i (its dtype/shape are what infer returned). */
  output(i: number): ValueId;
  /** Scratch live only within this node's steps. */
  temp(dtype: DType, shape: number[]): ValueId;
  /** A plan constant (an initializer or data computed at compile/load time). */
  constant(t: Tensor): ValueId;
  /** A ref to value `id` at element `offset` (for steps' PlanRef fields). */
  ref(id: ValueId, offset?: number): PlanRef;
  /** Appends a step; `node` is filled in. */
  emit(step: DistributiveOmit<PlanStep, 'node'>): void;
  /** Output i is input j reinterpreted (same bytes, new shape): Reshape, Flatten, Squeeze, Identity... */
  alias(output: number, input: number): void;
}

export type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

/** Session options an op's load-time preparation depends on. */
export interface PrepareOptions {
  precision: 'fp32' | 'bf16';
  /** SessionOptions.sparse. */
  sparse: 'auto' | 'off' | 'force';
  /**
   * 'gpu': conv and GEMM weights are kept for the device (lib/session/gpu.ts GpuLayer, uploaded by
   * Session.load) instead of packed into CPU handles, and nothing is made sparse. Default 'cpu'.
   */
  target?: 'cpu' | 'gpu';
}

export interface OpDef {
  /** Output dtypes and shapes; throws via ctx.fail on inconsistent inputs or attributes. */
  infer(ctx: OpContext): OutputInfo[];
  /**
   * Set when `evaluate` needs only the inputs' shapes (Shape): the compiler calls it even when an
   * input's data is a run-time value, so shape arithmetic downstream stays known at plan time.
   */
  shapeOnly?: boolean;
  /** TS computation when every present input has a known value; undefined = cannot (lower instead). */
  evaluate?(ctx: OpContext, outputs: OutputInfo[]): Tensor[] | undefined;
  lower(ctx: OpContext, outputs: OutputInfo[], e: Emitter): void;
  /**
   * Load-time, once per node (weights folded and packed into native handles). `inputs` holds the
   * initializers among the node's inputs (undefined for runtime inputs). The result is passed to
   * every compile as ctx.prepared and disposed with the session via `dispose`.
   */
  prepare?(node: OnnxNode, inputs: (Tensor | undefined)[], options: PrepareOptions, opset: number): Prepared | undefined;
}

export interface Prepared {
  dispose(): void;
}

/** The PlanDType of a tensor dtype; float16/bfloat16 values never reach a plan. */
export function planDType(d: DType): PlanDType {
  switch (d) {
    case 'float32': case 'int64': case 'int32': case 'bool': case 'uint8': case 'int8': return d;
    default: throw new Error(`no plan dtype for ${d}`);
  }
}

export const ELEM_BYTES: Record<DType, number> = {
  float32: 4, float16: 2, bfloat16: 2, int8: 1, uint8: 1, int32: 4, int64: 8, bool: 1,
};
