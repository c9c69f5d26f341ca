/**
 * LayerNormalization and GELU recognised from the decompositions exporters write (PyTorch before
 * opset 17 / 20), replaced by the standard ops, which the compiler lowers to one step each.
 * Every intermediate of a pattern must be read only inside the pattern and not be a graph output.
 */
import type { OnnxNode } from '../../onnx/model.js';
import { Tensor } from '../../tensor.js';
import { near, type WorkGraph } from './graph.js';
import type { SymShape } from './shapes.js';

interface Hit { index: number; node: OnnxNode }

/** The sole consumer of `v` if it is an `opType` node of the default domain. */
function next(g: WorkGraph, v: string, opType: string): Hit | undefined {
  const c = g.soleConsumer(v);
  return c && c.node.opType === opType && c.node.domain === '' ? c : undefined;
}

/** For a binary node reading `v`, its other operand (undefined when both are `v`). */
function other(node: OnnxNode, v: string): string | undefined {
  if (node.inputs.length !== 2) return undefined;
  if (node.inputs[0] === v && node.inputs[1] !== v) return node.inputs[1];
  if (node.inputs[1] === v && node.inputs[0] !== v) return node.inputs[0];
  return undefined;
}

function producerHit(g: WorkGraph, v: string, opType: string): Hit | undefined {
  const index = g.producerIndex(v);
  if (index === undefined) return undefined;
  const node = g.nodes[index];
  return node && node.opType === opType && node.domain === '' ? { index, node } : undefined;
}

// ---------------------------------------------------------------------------------------------
// LayerNormalization:
//   m = ReduceMean(x, [-1]); d = Sub(x, m); q = Pow(d, 2) | Mul(d, d); v = ReduceMean(q, [-1])
//   e = Add(v, eps); s = Sqrt(e); n = Div(d, s); [n = Mul(n, gamma)]; [n = Add(n, beta)]

function reducesLastAxis(g: WorkGraph, node: OnnxNode, rank: number): boolean {
  if ((node.attributes.keepdims ?? 1) !== 1) return false;
  let axes: number[] | undefined;
  if (node.inputs[1]) {
    const t = g.constant(node.inputs[1]);
    if (!t || t.dtype !== 'int64') return false;
    axes = Array.from(t.data as BigInt64Array, Number);
  } else {
    axes = node.attributes.axes as number[] | undefined;
  }
  return !!axes && axes.length === 1 && (axes[0] === -1 || axes[0] === rank - 1);
}

/** A per-feature constant over the last dim `d` as a [d] float32 tensor, else undefined. */
function perFeature(g: WorkGraph, v: string | undefined, d: number, rank: number): Tensor<'float32'> | undefined {
  const t = v ? g.constant(v) : undefined;
  if (!t || t.dtype !== 'float32' || t.dims.length > rank) return undefined;
  const last = t.dims[t.dims.length - 1] ?? 1;
  if (t.dims.slice(0, -1).some((k) => k !== 1) || (last !== d && last !== 1)) return undefined;
  const src = t.data as Float32Array;
  return new Tensor('float32', last === d ? src : new Float32Array(d).fill(src[0]!), [d]);
}

export function recogniseLayerNorms(g: WorkGraph, shapes: Map<string, SymShape>): void {
  for (let i = 0; i < g.nodes.length; i++) {
    const mean = g.nodes[i];
    if (!mean || mean.opType !== 'ReduceMean' || mean.domain !== '') continue;
    const x = mean.inputs[0]!;
    const xs = shapes.get(x);
    const d = xs?.[xs.length - 1];
    if (!xs || typeof d !== 'number' || !reducesLastAxis(g, mean, xs.length)) continue;
    const sub = next(g, mean.outputs[0]!, 'Sub');
    if (!sub || sub.node.inputs[0] !== x || sub.node.inputs[1] !== mean.outputs[0]) continue;
    const dev = sub.node.outputs[0]!;
    if (!g.isInternal(dev)) continue;
    const readers = g.consumers(dev).map((k) => ({ index: k, node: g.nodes[k]! }));
    if (readers.length !== 2) continue;
    const sq = readers.find((r) => (r.node.opType === 'Pow' && r.node.inputs[0] === dev && g.scalarConstant(r.node.inputs[1]!) === 2)
      || (r.node.opType === 'Mul' && r.node.inputs[0] === dev && r.node.inputs[1] === dev));
    const div = readers.find((r) => r.node.opType === 'Div' && r.node.inputs[0] === dev);
    if (!sq || !div || sq.node.domain !== '' || div.node.domain !== '') continue;
    const variance = next(g, sq.node.outputs[0]!, 'ReduceMean');
    if (!variance || !reducesLastAxis(g, variance.node, xs.length)) continue;
    const addEps = next(g, variance.node.outputs[0]!, 'Add');
    const epsName = addEps && other(addEps.node, variance.node.outputs[0]!);
    const eps = epsName ? g.scalarConstant(epsName) : undefined;
    if (!addEps || eps === undefined || g.constant(epsName!)?.dtype !== 'float32') continue;
    const sqrt = next(g, addEps.node.outputs[0]!, 'Sqrt');
    if (!sqrt || g.soleConsumer(sqrt.node.outputs[0]!)?.index !== div.index || div.node.inputs[1] !== sqrt.node.outputs[0]) continue;
    const used = [i, sub.index, sq.index, variance.index, addEps.index, sqrt.index, div.index];
    let out = div.node.outputs[0]!;
    let scale: Tensor<'float32'> | undefined;
    let bias: Tensor<'float32'> | undefined;
    const mul = next(g, out, 'Mul');
    const gamma = mul && perFeature(g, other(mul.node, out), d, xs.length);
    if (mul && gamma) {
      scale = gamma;
      used.push(mul.index);
      out = mul.node.outputs[0]!;
    }
    const add = next(g, out, 'Add');
    const beta = add && perFeature(g, other(add.node, out), d, xs.length);
    if (add && beta) {
      bias = beta;
      used.push(add.index);
      out = add.node.outputs[0]!;
    }
    const last = Math.max(...used);
    const scaleName = g.addConstant(`${mean.name}_ln_scale`, scale ?? new Tensor('float32', new Float32Array(d).fill(1), [d]));
    const inputs = [x, scaleName];
    if (bias) inputs.push(g.addConstant(`${mean.name}_ln_bias`, bias));
    g.replace(used.filter((k) => k !== last), last, {
      name: `${mean.name}/LayerNormalization`, opType: 'LayerNormalization', domain: '', inputs, outputs: [out],
      attributes: { axis: -1, epsilon: eps },
    });
  }
}

// ---------------------------------------------------------------------------------------------
// GELU: 0.5 * x * (1 + Erf(x / sqrt(2)))  or  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3))).
// The product of x, (1 + ...) and 0.5 may be associated in any order.

const SQRT2 = Math.SQRT2;
const SQRT_2_OVER_PI = Math.sqrt(2 / Math.PI);
const TANH_KAPPA = 0.044715;
// Exporters write these constants rounded (1.4142, 0.7071); the recognised op uses the exact ones.
const LOOSE = 1e-3;

function constOperand(g: WorkGraph, node: OnnxNode, v: string, ref: number, tol: number): boolean {
  const o = other(node, v);
  return o !== undefined && near(g.scalarConstant(o), ref, tol);
}

/** x where `v` = x / sqrt(2) or x * (1 / sqrt(2)). */
function erfArgument(g: WorkGraph, v: string): { x: string; index: number } | undefined {
  const p = g.producerIndex(v);
  const node = p === undefined ? undefined : g.nodes[p];
  if (!node || node.domain !== '' || !g.soleConsumer(v)) return undefined;
  if (node.opType === 'Div' && near(g.scalarConstant(node.inputs[1]!), SQRT2, LOOSE)) return { x: node.inputs[0]!, index: p! };
  if (node.opType === 'Mul') {
    for (const k of [0, 1]) {
      if (near(g.scalarConstant(node.inputs[1 - k]!), 1 / SQRT2, LOOSE)) return { x: node.inputs[k]!, index: p! };
    }
  }
  return undefined;
}

/** The nodes computing x^3 as Pow(x, 3), Mul(x, Mul(x, x)) or Mul(Mul(x, x), x). */
function cubeOf(g: WorkGraph, v: string, x: string): number[] | undefined {
  const p = g.producerIndex(v);
  const node = p === undefined ? undefined : g.nodes[p];
  if (!node || node.domain !== '') return undefined;
  if (node.opType === 'Pow') return node.inputs[0] === x && g.scalarConstant(node.inputs[1]!) === 3 ? [p!] : undefined;
  if (node.opType !== 'Mul') return undefined;
  const sq = other(node, x);
  if (sq === undefined || !g.soleConsumer(sq)) return undefined;
  const s = producerHit(g, sq, 'Mul');
  return s && s.node.inputs[0] === x && s.node.inputs[1] === x ? [p!, s.index] : undefined;
}

/** x and the nodes of sqrt(2/pi) * (x + 0.044715 * x^3) ending at `v`. */
function tanhArgument(g: WorkGraph, v: string): { x: string; nodes: number[] } | undefined {
  const outer = producerHit(g, v, 'Mul');
  if (!outer || !g.soleConsumer(v)) return undefined;
  for (const k of [0, 1]) {
    if (!near(g.scalarConstant(outer.node.inputs[1 - k]!), SQRT_2_OVER_PI, LOOSE)) continue;
    const sumName = outer.node.inputs[k]!;
    const sum = producerHit(g, sumName, 'Add');
    if (!sum || !g.soleConsumer(sumName)) continue;
    for (const j of [0, 1]) {
      const x = sum.node.inputs[j]!;
      const termName = sum.node.inputs[1 - j]!;
      const term = producerHit(g, termName, 'Mul');
      if (!term || !g.soleConsumer(termName)) continue;
      for (const t of [0, 1]) {
        if (!near(g.scalarConstant(term.node.inputs[1 - t]!), TANH_KAPPA, LOOSE)) continue;
        const cubeName = term.node.inputs[t]!;
        const cube = g.soleConsumer(cubeName) ? cubeOf(g, cubeName, x) : undefined;
        if (cube) return { x, nodes: [outer.index, sum.index, term.index, ...cube] };
      }
    }
  }
  return undefined;
}

/** From c = 1 + f(x): the nodes of 0.5 * x * c in any association, and the output. */
function halfProduct(g: WorkGraph, c: string, x: string): { nodes: number[]; out: string } | undefined {
  const m1 = next(g, c, 'Mul');
  if (!m1) return undefined;
  const o1 = other(m1.node, c);
  if (o1 === undefined) return undefined;
  const out1 = m1.node.outputs[0]!;
  if (o1 === x || near(g.scalarConstant(o1), 0.5)) {
    // (x * c) * 0.5  or  (c * 0.5) * x
    const m2 = next(g, out1, 'Mul');
    const o2 = m2 && other(m2.node, out1);
    if (!m2 || o2 === undefined) return undefined;
    const ok = o1 === x ? near(g.scalarConstant(o2), 0.5) : o2 === x;
    return ok ? { nodes: [m1.index, m2.index], out: m2.node.outputs[0]! } : undefined;
  }
  // (x * 0.5) * c
  const h = producerHit(g, o1, 'Mul');
  if (!h || !g.soleConsumer(o1) || other(h.node, x) === undefined || !near(g.scalarConstant(other(h.node, x)!), 0.5)) return undefined;
  return { nodes: [h.index, m1.index], out: out1 };
}

export function recogniseGelus(g: WorkGraph): void {
  for (let i = 0; i < g.nodes.length; i++) {
    const f = g.nodes[i];
    if (!f || f.domain !== '' || (f.opType !== 'Erf' && f.opType !== 'Tanh')) continue;
    let x: string;
    let front: number[];
    if (f.opType === 'Erf') {
      const arg = erfArgument(g, f.inputs[0]!);
      if (!arg) continue;
      x = arg.x;
      front = [arg.index];
    } else {
      const arg = tanhArgument(g, f.inputs[0]!);
      if (!arg) continue;
      x = arg.x;
      front = arg.nodes;
    }
    const plusOne = next(g, f.outputs[0]!, 'Add');
    if (!plusOne || !constOperand(g, plusOne.node, f.outputs[0]!, 1, 1e-6)) continue;
    const tail = halfProduct(g, plusOne.node.outputs[0]!, x);
    if (!tail) continue;
    const used = [...front, i, plusOne.index, ...tail.nodes];
    const last = Math.max(...used);
    g.replace(used.filter((k) => k !== last), last, {
      name: `${f.name}/Gelu`, opType: 'Gelu', domain: '', inputs: [x], outputs: [tail.out],
      attributes: { approximate: f.opType === 'Erf' ? 'none' : 'tanh' },
    });
  }
}
