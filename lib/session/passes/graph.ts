/**
 * The mutable working copy of an OnnxGraph that the optimisation passes rewrite. The input graph is
 * never touched: nodes are copied (their attribute objects and tensors are shared, read-only), and
 * the initializer map is a new Map in which passes only add or drop entries, never change a tensor.
 *
 * Removed nodes become null slots so a pass can keep iterating by index while it rewrites;
 * `compact()` drops them between passes. A fused node takes the slot of the LAST node of the
 * pattern it replaces: every input of the pattern is produced before its last node, so the order
 * stays topological without a re-sort.
 */
import type { AttributeValue, OnnxGraph, OnnxNode } from '../../onnx/model.js';
import { Tensor } from '../../tensor.js';

export class WorkGraph {
  nodes: (OnnxNode | null)[];
  readonly inits: Map<string, Tensor>;
  readonly graphInputs: Set<string>;
  readonly graphOutputs: Set<string>;
  /** Names read inside subgraph attributes (If/Loop bodies): never renamed, never treated as dead. */
  readonly subgraphRefs: Set<string>;
  /**
   * Initializers that are also graph inputs can be overridden by a feed (ONNX IR >= 4), so they are
   * not constants unless the caller says they cannot be fed.
   */
  private readonly overridable: Set<string>;
  private producerOf = new Map<string, number>();
  private consumerMap = new Map<string, number[]>();
  private readonly names = new Set<string>();

  constructor(readonly source: OnnxGraph, readonly opset: number, initializerInputsAreConstant: boolean) {
    this.nodes = source.nodes.map((n) => ({ ...n, inputs: [...n.inputs], outputs: [...n.outputs] }));
    this.inits = new Map(source.initializers);
    this.graphInputs = new Set(source.inputs.map((i) => i.name));
    this.graphOutputs = new Set(source.outputs.map((o) => o.name));
    this.subgraphRefs = new Set();
    for (const n of source.nodes) for (const a of Object.values(n.attributes)) collectSubgraphRefs(a, this.subgraphRefs);
    this.overridable = new Set(initializerInputsAreConstant ? [] : [...this.graphInputs].filter((n) => this.inits.has(n)));
    for (const n of [...this.graphInputs, ...this.graphOutputs, ...this.inits.keys(), ...source.valueInfo.keys()]) this.names.add(n);
    for (const n of this.nodes) for (const o of n!.outputs) this.names.add(o);
    this.reindex();
  }

  /** Rebuilds producer/consumer maps over the live nodes (slots keep their indices). */
  reindex(): void {
    this.producerOf = new Map();
    this.consumerMap = new Map();
    this.nodes.forEach((n, i) => {
      if (!n) return;
      for (const o of n.outputs) if (o) this.producerOf.set(o, i);
      for (const v of new Set(n.inputs)) {
        if (!v) continue;
        let list = this.consumerMap.get(v);
        if (!list) this.consumerMap.set(v, (list = []));
        list.push(i);
      }
    });
  }

  /** Drops removed slots; call between passes. */
  compact(): void {
    this.nodes = this.nodes.filter((n) => n !== null);
    this.reindex();
  }

  producer(v: string): OnnxNode | undefined {
    const i = this.producerOf.get(v);
    return i === undefined ? undefined : this.nodes[i] ?? undefined;
  }

  producerIndex(v: string): number | undefined {
    return this.producerOf.get(v);
  }

  /** Indices of the live nodes reading `v` (each node once). */
  consumers(v: string): number[] {
    return (this.consumerMap.get(v) ?? []).filter((i) => this.nodes[i]);
  }

  /** Whether `v` can disappear in a rewrite: no graph output, no subgraph reads it. */
  isInternal(v: string): boolean {
    return !this.graphOutputs.has(v) && !this.subgraphRefs.has(v);
  }

  /** The one node reading `v` when `v` is internal and read by exactly one node. */
  soleConsumer(v: string): { index: number; node: OnnxNode } | undefined {
    if (!this.isInternal(v)) return undefined;
    const c = this.consumers(v);
    if (c.length !== 1) return undefined;
    return { index: c[0]!, node: this.nodes[c[0]!]! };
  }

  /** The value of `v` when it is a constant of the graph (an initializer no feed can override). */
  constant(v: string): Tensor | undefined {
    if (!v || this.overridable.has(v)) return undefined;
    return this.inits.get(v);
  }

  /** A float32 constant's values, or undefined. */
  floatConstant(v: string): Float32Array | undefined {
    const t = this.constant(v);
    return t && t.dtype === 'float32' ? (t.data as Float32Array) : undefined;
  }

  /** The single number of a one-element float/int constant. */
  scalarConstant(v: string): number | undefined {
    const t = this.constant(v);
    if (!t || t.size !== 1) return undefined;
    switch (t.dtype) {
      case 'float32': case 'int32': case 'int8': case 'uint8': return Number(t.data[0]);
      case 'int64': return Number(t.data[0] as bigint);
      default: return undefined;
    }
  }

  /** A value name no other value in the graph has. */
  fresh(base: string): string {
    let name = base;
    for (let i = 1; this.names.has(name); i++) name = `${base}_${i}`;
    this.names.add(name);
    return name;
  }

  /** Adds a computed initializer under a fresh name derived from `base`. */
  addConstant(base: string, t: Tensor): string {
    const name = this.fresh(base);
    this.inits.set(name, t);
    return name;
  }

  /** Removes the nodes at `remove` and puts `replacement` in slot `at`; reindexes. */
  replace(remove: number[], at: number, replacement: OnnxNode): void {
    for (const i of remove) this.nodes[i] = null;
    this.nodes[at] = replacement;
    this.reindex();
  }

  /** The optimised graph: live nodes, only the initializers still read, same inputs/outputs. */
  toGraph(): OnnxGraph {
    this.compact();
    const used = new Set<string>([...this.graphOutputs, ...this.subgraphRefs]);
    for (const n of this.nodes) for (const v of n!.inputs) if (v) used.add(v);
    const initializers = new Map<string, Tensor>();
    for (const [name, t] of this.inits) {
      // An initializer behind a graph input stays: dropping it would make that input required.
      if (used.has(name) || this.graphInputs.has(name)) initializers.set(name, t);
    }
    return {
      name: this.source.name,
      inputs: this.source.inputs,
      outputs: this.source.outputs,
      initializers,
      nodes: this.nodes as OnnxNode[],
      valueInfo: this.source.valueInfo,
    };
  }
}

function collectSubgraphRefs(a: AttributeValue, into: Set<string>): void {
  const graphs = Array.isArray(a) ? [] : isGraph(a) ? [a] : [];
  for (const g of graphs) {
    const inner = new Set<string>([...g.initializers.keys(), ...g.inputs.map((i) => i.name)]);
    for (const n of g.nodes) for (const o of n.outputs) inner.add(o);
    for (const n of g.nodes) {
      for (const v of n.inputs) if (v && !inner.has(v)) into.add(v);
      for (const sub of Object.values(n.attributes)) collectSubgraphRefs(sub, into);
    }
    for (const o of g.outputs) if (!inner.has(o.name)) into.add(o.name);
  }
}

function isGraph(a: AttributeValue): a is OnnxGraph {
  return typeof a === 'object' && a !== null && !(a instanceof Tensor) && 'nodes' in a && 'initializers' in a;
}

/** Elements of a shape. */
export function sizeOf(dims: readonly number[]): number {
  return dims.reduce((a, b) => a * b, 1);
}

/** A float32 tensor from float64 values (folded weights are computed in float64, stored float32). */
export function float32From(values: ArrayLike<number>, dims: readonly number[]): Tensor<'float32'> {
  return new Tensor('float32', Float32Array.from(values as ArrayLike<number>), dims);
}

/** Whether `a` is within a relative `tol` of `ref`. */
export function near(a: number | undefined, ref: number, tol = 1e-6): boolean {
  return a !== undefined && Math.abs(a - ref) <= tol * Math.abs(ref);
}
