/**
 * The 'basic' passes: Identity/Dropout removal, constant folding, dead-node removal.
 */
import type { OnnxNode } from '../../onnx/model.js';
import { SondeError } from '../../errors.js';
import { Tensor as TensorClass, type Tensor } from '../../tensor.js';
import { sizeOf, type WorkGraph } from './graph.js';
import type { SymShape } from './shapes.js';

/** Folded outputs above this many elements stay computed at run time (memory over load speed). */
export const MAX_FOLDED_ELEMENTS = 16 * 1024 * 1024;

export type ConstantEvaluator = (node: OnnxNode, inputs: (Tensor | undefined)[], opset: number) => Tensor[] | undefined;

/**
 * Identity, and Dropout in inference (output = input), are removed by pointing their readers at
 * their input. When the output is a graph output its name must survive: the producer of the input
 * is renamed to produce it instead, unless the input is itself a graph input, initializer or
 * output, in which case the node stays.
 */
export function removeIdentities(g: WorkGraph): void {
  for (let i = 0; i < g.nodes.length; i++) {
    const node = g.nodes[i];
    if (!node || node.domain !== '' || !isPassThrough(node, g)) continue;
    const x = node.inputs[0];
    const y = node.outputs[0];
    if (!x || !y || g.subgraphRefs.has(y)) continue;
    if (!g.graphOutputs.has(y)) {
      for (const c of g.consumers(y)) renameInput(g.nodes[c]!, y, x);
      g.nodes[i] = null;
      g.reindex();
      continue;
    }
    const p = g.producerIndex(x);
    if (p === undefined || !g.isInternal(x)) continue;
    const producer = g.nodes[p]!;
    g.nodes[p] = { ...producer, outputs: producer.outputs.map((o) => (o === x ? y : o)) };
    for (const c of g.consumers(x)) if (c !== i) renameInput(g.nodes[c]!, x, y);
    g.nodes[i] = null;
    g.reindex();
  }
}

function isPassThrough(node: OnnxNode, g: WorkGraph): boolean {
  if (node.opType === 'Identity') return node.inputs.length === 1 && node.outputs.length === 1;
  if (node.opType !== 'Dropout') return false;
  // The mask output is real data (all ones in inference) that something reads: keep the node.
  const mask = node.outputs[1];
  if (mask && (g.consumers(mask).length > 0 || !g.isInternal(mask))) return false;
  // opset >= 12: training_mode, when given, must be a constant false.
  const training = node.inputs[2];
  if (training) {
    const t = g.constant(training);
    if (!t || t.size !== 1 || Number(t.data[0]) !== 0) return false;
  }
  return true;
}

function renameInput(node: OnnxNode, from: string, to: string): void {
  node.inputs = node.inputs.map((v) => (v === from ? to : v));
}

/** Ops whose result is not a function of their inputs: never folded. */
const NON_DETERMINISTIC = new Set(['RandomNormal', 'RandomUniform', 'RandomNormalLike', 'RandomUniformLike', 'Multinomial', 'Bernoulli']);

/**
 * Nodes whose inputs are all constants are computed now and become initializers. A node that
 * produces a graph output stays (the compiler then has no output without a producing step), and
 * so does one the evaluator declines or whose result would be too large to keep in memory.
 */
export function foldConstants(g: WorkGraph, evaluate: ConstantEvaluator, shapes: Map<string, SymShape>): boolean {
  let folded = false;
  for (let i = 0; i < g.nodes.length; i++) {
    const node = g.nodes[i];
    if (!node || node.domain !== '' || NON_DETERMINISTIC.has(node.opType)) continue;
    if (node.outputs.some((o) => o && !g.isInternal(o))) continue;
    if (node.opType === 'Shape') {
      // The input's shape is fixed by the model (the session rejects feeds that contradict it).
      const t = staticShape(node, shapes.get(node.inputs[0] ?? ''));
      if (!t) continue;
      g.inits.set(node.outputs[0]!, t);
      g.nodes[i] = null;
      g.reindex();
      folded = true;
      continue;
    }
    if (Object.values(node.attributes).some((a) => typeof a === 'object' && a !== null && 'nodes' in a)) continue;
    const inputs = node.inputs.map((v) => (v ? g.constant(v) : undefined));
    if (node.inputs.some((v, k) => v && !inputs[k])) continue;
    if (predictedSize(node, inputs) > MAX_FOLDED_ELEMENTS) continue;
    let results: Tensor[] | undefined;
    try {
      results = evaluate(node, inputs, g.opset);
    } catch (err) {
      // The model is wrong at this node; compiling reports that with the run's context.
      if (err instanceof SondeError) continue;
      throw err;
    }
    if (!results || results.length < node.outputs.filter(Boolean).length) continue;
    if (results.some((t) => t.size > MAX_FOLDED_ELEMENTS)) continue;
    node.outputs.forEach((o, k) => {
      if (o) g.inits.set(o, results![k]!);
    });
    g.nodes[i] = null;
    g.reindex();
    folded = true;
  }
  return folded;
}

/** Shape's output (with opset-15 start/end) when every dim of its input is a number. */
function staticShape(node: OnnxNode, shape: SymShape | undefined): Tensor | undefined {
  if (!shape || !shape.every((d) => typeof d === 'number')) return undefined;
  const rank = shape.length;
  const clamp = (v: number): number => Math.min(rank, Math.max(0, v < 0 ? v + rank : v));
  const start = clamp(typeof node.attributes.start === 'number' ? node.attributes.start : 0);
  const end = clamp(typeof node.attributes.end === 'number' ? node.attributes.end : rank);
  const dims = (shape as number[]).slice(start, Math.max(start, end));
  return new TensorClass('int64', BigInt64Array.from(dims, (d) => BigInt(d)), [dims.length]);
}

/**
 * Elements of the output of ops whose output can be far larger than their inputs, computed before
 * evaluating so a tiny model cannot make the load allocate gigabytes; 0 when it is not one of them.
 */
function predictedSize(node: OnnxNode, inputs: (Tensor | undefined)[]): number {
  const values = (t: Tensor | undefined): number[] => (t ? Array.from(t.data as ArrayLike<number | bigint>, Number) : []);
  switch (node.opType) {
    case 'ConstantOfShape': return sizeOf(values(inputs[0]));
    case 'Expand': {
      const a = inputs[0]?.dims ?? [];
      const b = values(inputs[1]);
      const rank = Math.max(a.length, b.length);
      let n = 1;
      for (let i = 0; i < rank; i++) n *= Math.max(a[a.length - rank + i] ?? 1, b[b.length - rank + i] ?? 1);
      return n;
    }
    case 'Tile': return (inputs[0]?.size ?? 0) * sizeOf(values(inputs[1]));
    case 'Range': {
      const [start, limit, delta] = [values(inputs[0])[0], values(inputs[1])[0], values(inputs[2])[0]];
      if (start === undefined || limit === undefined || !delta) return 0;
      return Math.max(0, Math.ceil((limit - start) / delta));
    }
    default: return 0;
  }
}

/** Removes nodes none of whose outputs reach a graph output (or a subgraph). */
export function removeDead(g: WorkGraph): void {
  g.compact();
  const needed = new Set<string>([...g.graphOutputs, ...g.subgraphRefs]);
  for (let i = g.nodes.length - 1; i >= 0; i--) {
    const node = g.nodes[i]!;
    if (!node.outputs.some((o) => o && needed.has(o))) {
      g.nodes[i] = null;
      continue;
    }
    for (const v of node.inputs) if (v) needed.add(v);
  }
  g.compact();
}
