/**
 * The per-shape graph compiler: walks the (optimised, topologically sorted) graph once for a set of
 * concrete input shapes, infers every value's dtype and shape, evaluates in TS what is known at
 * plan time (shape arithmetic, small constants), lowers the rest to native plan steps, then gives
 * every value storage (memory planner) and assembles the PlanSpec that native().createPlan builds.
 */
import type { OnnxGraph, OnnxNode } from '../onnx/model.js';
import { makeAttrs, nodeWhere } from './attrs.js';
import { InternalError, InvalidArgumentError, ModelFormatError, UnsupportedOperatorError } from '../errors.js';
import { Tensor, type DType } from '../tensor.js';
import type { PlanBlocked, PlanBuffer, PlanRef, PlanSpec, PlanStep } from './plan.js';
import type { NativeGpuBuffer } from '../binding.js';
import {
  ELEM_BYTES, type CValue, type Emitter, type OpContext, type OpDef, type OutputInfo, type ValueId,
} from './ops/types.js';
import { SONDE_DOMAIN } from './fused.js';
import { OPS, SONDE_OPS } from './ops/index.js';
import { blockConvRuns, blockedPassEnabled } from './layout.js';
import { chainInvertedResiduals, chainPassEnabled } from './chain.js';

/** Arena offsets are multiples of this: a cache line, and the widest SIMD load (AVX-512). */
export const ARENA_ALIGN = 64;

export interface CompiledOutput {
  name: string;
  dtype: DType;
  shape: number[];
  /** Index into planRun's outputs; absent when the output is known at plan time (`constant`). */
  index?: number;
  /** The value, when it was computed at plan time (it is returned from TS, never from the plan). */
  constant?: Tensor;
}

export interface CompiledPlan {
  spec: PlanSpec;
  outputs: CompiledOutput[];
}

export interface CompileOptions {
  opset: number;
  /** What each node's load-time prepare returned (keyed by the node object of `graph`). */
  prepared?: Map<OnnxNode, unknown>;
  /**
   * 'gpu': a plan for native().createGpuPlan, without the CPU-only passes (NCHW16c layout); its convs
   * and GEMMs lower to gpuConv / gpuGemm because their prepare ran for the GPU. Default 'cpu'.
   */
  target?: 'cpu' | 'gpu';
  /** GPU plans: the device copy of a constant tensor when the session holds one (else it becomes plan data). */
  deviceConstant?: (t: Tensor) => NativeGpuBuffer | undefined;
}

export { makeAttrs, nodeWhere };

/** The op table of a node's domain, or undefined for an unknown domain. */
export function opFor(domain: string, opType: string): OpDef | undefined {
  const table = domain === '' ? OPS : domain === SONDE_DOMAIN ? SONDE_OPS : undefined;
  return table && Object.prototype.hasOwnProperty.call(table, opType) ? table[opType] : undefined;
}

function makeContext(node: OnnxNode, opset: number, inputs: (CValue | undefined)[], prepared: unknown): OpContext {
  return {
    node, opset, inputs, attrs: makeAttrs(node), prepared,
    fail(message, options) {
      const text = `${nodeWhere(node)}: ${message}`;
      throw options?.input ? new InvalidArgumentError(text) : new ModelFormatError(text);
    },
  };
}

/**
 * Infer + evaluate one node on tensors known ahead of time (the optimiser's constant folding).
 * Undefined when the op has no TS evaluation or declines (too large, unsupported dtype).
 */
export function evaluateConstantNode(node: OnnxNode, inputs: (Tensor | undefined)[], opset: number): Tensor[] | undefined {
  const def = opFor(node.domain, node.opType);
  if (!def?.evaluate) return undefined;
  const cvals = inputs.map((t) => (t ? { dtype: t.dtype, shape: [...t.dims], value: t } : undefined));
  const ctx = makeContext(node, opset, cvals, undefined);
  const infos = def.infer(ctx);
  return def.evaluate(ctx, infos);
}

// ---------------------------------------------------------------------------------------------
// Plan values: what the emitter hands out and the memory planner places.

type PValueKind = 'input' | 'node' | 'temp' | 'const';

interface PValue {
  id: ValueId;
  kind: PValueKind;
  dtype: DType;
  bytes: number;
  /** Graph input index ('input'), or the const tensor ('const'). */
  inputIndex?: number;
  tensor?: Tensor;
  /** This value is another's bytes (Reshape, Identity...): the root owns the storage. */
  aliasOf?: ValueId;
  /** First and last step that touch the value (or any alias of it); -1 = never touched. */
  first: number;
  last: number;
  /** Set when a graph output is stored here. */
  outputIndex?: number;
  name: string;
}

interface ValueState {
  info: OutputInfo;
  value?: Tensor;
  /** Plan value once some step or alias needs it. */
  pid?: ValueId;
}

function sizeOf(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function sameBlocked(a: PlanBlocked, b: PlanBlocked): boolean {
  return a.h === b.h && a.w === b.w && !!a.bf16 === !!b.bf16 && a.pads.every((v, i) => v === b.pads[i]);
}

/** Packs [start, end] lifetime intervals into offsets: largest first, best-fit gap among overlapping ones. */
export function planArena(items: { bytes: number; first: number; last: number }[]): { offsets: number[]; total: number } {
  const order = items.map((_, i) => i).sort((a, b) => items[b]!.bytes - items[a]!.bytes || items[a]!.first - items[b]!.first);
  const offsets = new Array<number>(items.length).fill(0);
  const placed: number[] = [];
  let total = 0;
  const align = (x: number) => Math.ceil(x / ARENA_ALIGN) * ARENA_ALIGN;
  for (const i of order) {
    const it = items[i]!;
    const size = align(Math.max(it.bytes, 1));
    const busy = placed
      .filter((j) => items[j]!.first <= it.last && it.first <= items[j]!.last)
      .map((j) => [offsets[j]!, offsets[j]! + align(Math.max(items[j]!.bytes, 1))] as const)
      .sort((a, b) => a[0] - b[0]);
    let best = -1;
    let bestGap = Infinity;
    let cursor = 0;
    for (const [s, e] of busy) {
      if (s - cursor >= size && s - cursor < bestGap) { best = cursor; bestGap = s - cursor; }
      cursor = Math.max(cursor, e);
    }
    offsets[i] = best >= 0 ? best : cursor;
    placed.push(i);
    total = Math.max(total, offsets[i]! + size);
  }
  return { offsets, total };
}

export interface PlanInput {
  name: string;
  dtype: DType;
  shape: number[];
}

/**
 * Compiles `graph` for concrete input shapes. `inputs` lists the graph's runtime inputs in
 * planRun order (initializers excluded).
 */
export function compilePlan(graph: OnnxGraph, inputs: PlanInput[], options: CompileOptions): CompiledPlan {
  const { opset } = options;
  const values = new Map<string, ValueState>();
  const pvalues: PValue[] = [];
  const steps: PlanStep[] = [];
  const refs: { ref: PlanRef; id: ValueId }[] = [];
  const constIds = new Map<Tensor, ValueId>();

  const newPValue = (p: Omit<PValue, 'id' | 'first' | 'last'>): ValueId => {
    const id = pvalues.length;
    pvalues.push({ ...p, id, first: -1, last: -1 });
    return id;
  };
  const constantId = (t: Tensor, name: string): ValueId => {
    let id = constIds.get(t);
    if (id === undefined) {
      if (t.dtype === 'float16' || t.dtype === 'bfloat16') {
        throw new UnsupportedOperatorError(`${name}: ${t.dtype} tensors cannot be used at run time; sonde computes in float32`);
      }
      id = newPValue({ kind: 'const', dtype: t.dtype, bytes: t.size * ELEM_BYTES[t.dtype], tensor: t, name });
      constIds.set(t, id);
    }
    return id;
  };

  inputs.forEach((inp, index) => {
    const st: ValueState = { info: { dtype: inp.dtype, shape: [...inp.shape] } };
    st.pid = newPValue({ kind: 'input', dtype: inp.dtype, bytes: sizeOf(inp.shape) * ELEM_BYTES[inp.dtype], inputIndex: index, name: inp.name });
    values.set(inp.name, st);
  });
  for (const [name, t] of graph.initializers) {
    if (!values.has(name)) values.set(name, { info: { dtype: t.dtype, shape: [...t.dims] }, value: t });
  }

  for (const node of graph.nodes) {
    const def = opFor(node.domain, node.opType);
    if (!def) throw new UnsupportedOperatorError(`${nodeWhere(node)} is not supported`);
    const ins: (ValueState | undefined)[] = node.inputs.map((name) => {
      if (!name) return undefined;
      const st = values.get(name);
      if (!st) throw new ModelFormatError(`${nodeWhere(node)} reads '${name}', which no earlier node produced`);
      return st;
    });
    const cins = ins.map((s): CValue | undefined => (s ? { dtype: s.info.dtype, shape: s.info.shape, ...(s.value ? { value: s.value } : {}) } : undefined));
    const ctx = makeContext(node, opset, cins, options.prepared?.get(node));
    const infos = def.infer(ctx);
    // An optional output the op does not produce (MaxPool's Indices...) must not be asked for.
    for (let i = infos.length; i < node.outputs.length; i++) {
      if (node.outputs[i]) throw new UnsupportedOperatorError(`${nodeWhere(node)}: output ${i} ('${node.outputs[i]}') is not supported`);
    }
    const allKnown = ins.every((s) => s === undefined || s.value !== undefined);
    // Shape-only ops (Shape) fold from concrete shapes even when their input's data is a run-time value.
    const evaluated = (allKnown || def.shapeOnly) && def.evaluate ? def.evaluate(ctx, infos) : undefined;
    if (evaluated) {
      node.outputs.forEach((name, i) => {
        if (!name) return;
        const t = evaluated[i];
        if (!t) throw new InternalError(`${nodeWhere(node)}: evaluation returned no output ${i}`);
        values.set(name, { info: { dtype: t.dtype, shape: [...t.dims] }, value: t });
      });
      continue;
    }
    const outStates: ValueState[] = node.outputs.map((name, i) => {
      const info = infos[i];
      const st: ValueState = { info: info ?? { dtype: 'float32', shape: [] } };
      if (name) values.set(name, st);
      return st;
    });
    const nodeStepStart = steps.length;
    const temps: ValueId[] = [];
    const emitter: Emitter = {
      input(i) {
        const st = ins[i];
        if (!st) return ctx.fail(`input ${i} is required`);
        if (st.pid === undefined) {
          if (!st.value) throw new InternalError(`${nodeWhere(node)}: input ${i} has neither storage nor a value`);
          st.pid = constantId(st.value, `${nodeWhere(node)} input ${i} ('${node.inputs[i]}')`);
        }
        return st.pid;
      },
      output(i) {
        const st = outStates[i];
        if (!st) throw new InternalError(`${nodeWhere(node)}: output ${i} does not exist`);
        if (st.pid === undefined) {
          const bytes = sizeOf(st.info.shape) * ELEM_BYTES[st.info.dtype];
          st.pid = newPValue({ kind: 'node', dtype: st.info.dtype, bytes, name: node.outputs[i] || `${node.name}:${i}` });
        }
        return st.pid;
      },
      temp(dtype, shape) {
        const id = newPValue({ kind: 'temp', dtype, bytes: sizeOf(shape) * ELEM_BYTES[dtype], name: `${node.name}:temp` });
        temps.push(id);
        return id;
      },
      constant(t) {
        return constantId(t, `${nodeWhere(node)} constant`);
      },
      ref(id, offset = 0) {
        if (!pvalues[id]) throw new InternalError(`${nodeWhere(node)}: ref to unknown value ${id}`);
        const r: PlanRef = { buffer: id, offset };
        refs.push({ ref: r, id });
        return r;
      },
      emit(step) {
        steps.push({ ...step, node: node.name } as PlanStep);
      },
      alias(output, input) {
        const src = emitter.input(input);
        const st = outStates[output];
        if (!st) throw new InternalError(`${nodeWhere(node)}: output ${output} does not exist`);
        const srcBytes = pvalues[src]!.bytes;
        const bytes = sizeOf(st.info.shape) * ELEM_BYTES[st.info.dtype];
        if (bytes !== srcBytes) throw new InternalError(`${nodeWhere(node)}: alias of ${srcBytes} bytes as ${bytes}`);
        let root = src;
        while (pvalues[root]!.aliasOf !== undefined) root = pvalues[root]!.aliasOf!;
        st.pid = newPValue({ kind: 'node', dtype: st.info.dtype, bytes, aliasOf: root, name: node.outputs[output] || `${node.name}:${output}` });
      },
    };
    def.lower(ctx, infos, emitter);
    // An empty output has nothing to compute, so a lowering may emit no step for it; it still
    // needs (zero bytes of) storage to be read or returned. A non-empty output left unclaimed stays
    // an error where it is read.
    infos.forEach((info, i) => { if (node.outputs[i] && sizeOf(info.shape) === 0) emitter.output(i); });
    // Temps live from the node's first step to its last, never beyond.
    for (const t of temps) {
      pvalues[t]!.first = nodeStepStart;
      pvalues[t]!.last = Math.max(nodeStepStart, steps.length - 1);
    }
  }

  // Graph outputs: plan-time constants come back from TS; everything else gets an output buffer.
  const outputs: CompiledOutput[] = [];
  const outputPids: ValueId[] = [];
  const copies: { from: ValueId; to: ValueId; elemBytes: number; count: number; name: string }[] = [];
  for (const o of graph.outputs) {
    const st = values.get(o.name);
    if (!st) throw new ModelFormatError(`graph output '${o.name}' is not produced by any node`);
    const { dtype, shape } = st.info;
    if (st.value && st.pid === undefined) {
      outputs.push({ name: o.name, dtype, shape: [...shape], constant: st.value });
      continue;
    }
    if (st.pid === undefined) throw new InternalError(`graph output '${o.name}' has no storage`);
    let root = st.pid;
    while (pvalues[root]!.aliasOf !== undefined) root = pvalues[root]!.aliasOf!;
    const index = outputPids.length;
    const rv = pvalues[root]!;
    let pid: ValueId;
    // An input or constant is never written; storage already holding another output cannot hold two.
    if (rv.kind === 'node' && rv.outputIndex === undefined) {
      rv.outputIndex = index;
      pid = root;
    } else {
      const bytes = sizeOf(shape) * ELEM_BYTES[dtype];
      pid = newPValue({ kind: 'node', dtype, bytes, outputIndex: index, name: o.name });
      copies.push({ from: st.pid, to: pid, elemBytes: ELEM_BYTES[dtype], count: sizeOf(shape), name: o.name });
    }
    outputPids.push(pid);
    outputs.push({ name: o.name, dtype, shape: [...shape], index });
  }
  for (const c of copies) {
    if (c.count === 0) continue;
    const x: PlanRef = { buffer: c.from, offset: 0 };
    const y: PlanRef = { buffer: c.to, offset: 0 };
    refs.push({ ref: x, id: c.from }, { ref: y, id: c.to });
    steps.push({ op: 'copy', node: `output '${c.name}'`, x, y, dims: [c.count], xStrides: [1], yStrides: [1], elemBytes: c.elemBytes });
  }

  const rootOf = (id: ValueId): ValueId => {
    let r = id;
    while (pvalues[r]!.aliasOf !== undefined) r = pvalues[r]!.aliasOf!;
    return r;
  };

  // Runs of direct convs in NCHW16c (lib/session/layout.ts): may insert reorder steps, re-point
  // refs and grow blocked values, so it runs before liveness and storage.
  if (options.target !== 'gpu' && blockedPassEnabled()) {
    const idOfRef = new Map<PlanRef, ValueId>(refs.map((r) => [r.ref, r.id]));
    const aliased = new Set<ValueId>();
    for (const p of pvalues) if (p.aliasOf !== undefined) aliased.add(rootOf(p.id));
    const blockedSteps = blockConvRuns({
      steps,
      valueOf: (ref) => idOfRef.get(ref),
      rootOf,
      pinned: (root) => {
        const p = pvalues[root]!;
        return p.kind !== 'node' || p.outputIndex !== undefined || aliased.has(root) || p.dtype !== 'float32';
      },
      bytes: (id) => pvalues[id]!.bytes,
      name: (id) => pvalues[id]!.name,
      newValue: (bytes, name) => newPValue({ kind: 'node', dtype: 'float32', bytes, name }),
      resize: (root, bytes) => { pvalues[root]!.bytes = bytes; },
      ref: (id) => {
        const r: PlanRef = { buffer: id, offset: 0 };
        refs.push({ ref: r, id });
        return r;
      },
    });
    steps.splice(0, steps.length, ...blockedSteps);
    if (chainPassEnabled()) {
      // The layout pass made refs of its own (blocked copies, reorders): map them too.
      const idNow = new Map<PlanRef, ValueId>(refs.map((r) => [r.ref, r.id]));
      const chained = chainInvertedResiduals({ steps, valueOf: (ref) => idNow.get(ref), rootOf });
      steps.splice(0, steps.length, ...chained);
    }
  }

  // Liveness: every ref marks its root live at that step.
  const refStep = new Map<PlanRef, number>();
  steps.forEach((s, i) => {
    for (const v of Object.values(s)) if (v && typeof v === 'object' && 'buffer' in v && 'offset' in v) refStep.set(v as PlanRef, i);
  });
  for (const { ref, id } of refs) {
    const i = refStep.get(ref);
    if (i === undefined) continue;
    const r = pvalues[rootOf(id)]!;
    r.first = r.first < 0 ? i : Math.min(r.first, i);
    r.last = Math.max(r.last, i);
  }

  // A direct conv's blocked output may take its residual's storage when that step is the residual's
  // last use: each tile reads the residual at exactly the positions it then writes, after its last
  // FMA, so no tile reads what another wrote. Then the output's lines are already in cache when
  // stored, not each fetched for ownership beside the residual's (a 1x1 128 -> 512 conv at 28x28,
  // batch 8: 0.89x time). Not the GEMM paths: they accumulate into y over K blocks before the
  // residual is read.
  const idOf = new Map(refs.map((r) => [r.ref, r.id]));
  const free = (p: PValue) => p.kind === 'node' && p.outputIndex === undefined && p.aliasOf === undefined;
  steps.forEach((s, i) => {
    if (s.op !== 'conv' || !s.residual || !s.yBlocked || !s.residualBlocked || !sameBlocked(s.yBlocked, s.residualBlocked)) return;
    const resId = idOf.get(s.residual), yId = idOf.get(s.y), xId = idOf.get(s.x);
    if (resId === undefined || yId === undefined || xId === undefined) return;
    const r = pvalues[rootOf(resId)]!, y = pvalues[rootOf(yId)]!;
    if (r.id === y.id || rootOf(xId) === r.id) return;
    if (!free(r) || !free(y) || r.last !== i || y.first !== i || r.bytes !== y.bytes || r.dtype !== y.dtype) return;
    y.aliasOf = r.id;
    r.last = y.last;
  });

  // Storage: one buffer per input, output, constant; one arena range per live intermediate root.
  const buffers: PlanBuffer[] = [];
  const bufferOf = new Map<ValueId, number>();
  const inputBytes = inputs.map((_, i) => pvalues.find((p) => p.kind === 'input' && p.inputIndex === i)!.bytes);
  const outputBytes = outputPids.map((id) => pvalues[id]!.bytes);
  const arenaIds: ValueId[] = [];
  for (const p of pvalues) {
    if (p.aliasOf !== undefined) continue;
    if (p.kind === 'input') {
      bufferOf.set(p.id, buffers.push({ kind: 'input', index: p.inputIndex!, bytes: p.bytes }) - 1);
    } else if (p.outputIndex !== undefined) {
      bufferOf.set(p.id, buffers.push({ kind: 'output', index: p.outputIndex, bytes: p.bytes }) - 1);
    } else if (p.kind === 'const') {
      if (p.first < 0) continue;
      const device = options.deviceConstant?.(p.tensor!);
      bufferOf.set(p.id, buffers.push(device ? { kind: 'device', buffer: device, bytes: p.bytes }
        : { kind: 'const', data: p.tensor!.data as Float32Array, bytes: p.bytes }) - 1);
    } else if (p.first >= 0) {
      arenaIds.push(p.id);
    }
  }
  const arena = planArena(arenaIds.map((id) => pvalues[id]!));
  arenaIds.forEach((id, i) => {
    bufferOf.set(id, buffers.push({ kind: 'arena', offset: arena.offsets[i]!, bytes: pvalues[id]!.bytes }) - 1);
  });
  for (const { ref, id } of refs) {
    // A ref the layout pass replaced is in no step any more.
    if (!refStep.has(ref)) continue;
    const b = bufferOf.get(rootOf(id));
    if (b === undefined) throw new InternalError(`value '${pvalues[id]!.name}' is referenced but has no storage`);
    ref.buffer = b;
  }
  return { spec: { buffers, steps, arenaBytes: arena.total, inputBytes, outputBytes }, outputs };
}
