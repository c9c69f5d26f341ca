/**
 * Conv and Gemm/MatMul fused with what follows them (lib/session/fused.ts has the node forms):
 * a bias Add (MatMul), an activation, and a residual Add of a tensor with exactly the output's
 * shape, before or after the activation.
 */
import type { AttributeValue, OnnxNode } from '../../onnx/model.js';
import { SONDE_DOMAIN, type FusedActivation } from '../fused.js';
import { Tensor } from '../../tensor.js';
import { broadcastsToRow } from './fold-bn.js';
import { sizeOf, type WorkGraph } from './graph.js';
import { sameShape, type SymShape } from './shapes.js';

// ONNX Clip's bounds when one is not given are the float limits (not infinities): Clip(inf) = FLT_MAX.
const FLT_MAX = 3.4028234663852886e38;

interface Activation {
  activation: FusedActivation;
  alpha?: number;
  beta?: number;
  nodes: number[];
  out: string;
}

/** The activation reading `v` (its only reader, or the Sigmoid and Mul of a SiLU). */
function matchActivation(g: WorkGraph, v: string): Activation | undefined {
  if (!g.isInternal(v)) return undefined;
  const readers = g.consumers(v);
  if (readers.length === 2) {
    // SiLU: v * Sigmoid(v), the Mul reading v and the Sigmoid's output in either order.
    const [a, b] = readers.map((k) => g.nodes[k]!);
    const [sig, mul, sigIndex, mulIndex] = a!.opType === 'Sigmoid' ? [a!, b!, readers[0]!, readers[1]!] : [b!, a!, readers[1]!, readers[0]!];
    if (sig.opType !== 'Sigmoid' || mul.opType !== 'Mul' || sig.domain !== '' || mul.domain !== '') return undefined;
    const s = sig.outputs[0]!;
    const ins = mul.inputs;
    if (g.soleConsumer(s)?.index !== mulIndex || !((ins[0] === v && ins[1] === s) || (ins[0] === s && ins[1] === v))) return undefined;
    return { activation: 'silu', nodes: [sigIndex, mulIndex], out: mul.outputs[0]! };
  }
  const c = g.soleConsumer(v);
  if (!c || c.node.domain !== '' || c.node.inputs[0] !== v) return undefined;
  const node = c.node;
  const hit = (activation: FusedActivation, alpha?: number, beta?: number): Activation =>
    ({ activation, alpha, beta, nodes: [c.index], out: node.outputs[0]! });
  switch (node.opType) {
    case 'Relu': return hit('relu');
    case 'Sigmoid': return hit('sigmoid');
    case 'HardSwish': return hit('hardSwish');
    case 'LeakyRelu': return hit('leakyRelu', num(node.attributes.alpha, 0.01));
    case 'Gelu': {
      const approximate = node.attributes.approximate ?? 'none';
      return approximate === 'tanh' ? hit('geluTanh') : approximate === 'none' ? hit('gelu') : undefined;
    }
    case 'Clip': {
      if (g.opset < 11) return hit('clip', num(node.attributes.min, -FLT_MAX), num(node.attributes.max, FLT_MAX));
      const bound = (name: string | undefined, def: number): number | undefined => {
        if (!name) return def;
        const t = g.constant(name);
        return t && t.dtype === 'float32' && t.size === 1 ? (t.data as Float32Array)[0] : undefined;
      };
      const min = bound(node.inputs[1], -FLT_MAX);
      const max = bound(node.inputs[2], FLT_MAX);
      return min === undefined || max === undefined ? undefined : hit('clip', min, max);
    }
    default: return undefined;
  }
}

function num(a: AttributeValue | undefined, def: number): number {
  return typeof a === 'number' ? a : def;
}

interface Residual { node: number; r: string; out: string }

/** An Add reading `v` (only) and a tensor of exactly v's shape: nothing is broadcast. */
function matchResidual(g: WorkGraph, v: string, shapes: Map<string, SymShape>): Residual | undefined {
  const c = g.soleConsumer(v);
  if (!c || c.node.opType !== 'Add' || c.node.domain !== '' || c.node.inputs.length !== 2) return undefined;
  const [a, b] = c.node.inputs;
  const r = a === v ? b! : b === v ? a! : undefined;
  if (r === undefined || r === v || !sameShape(shapes.get(r), shapes.get(v))) return undefined;
  return { node: c.index, r, out: c.node.outputs[0]! };
}

interface Epilogue {
  nodes: number[];
  out: string;
  attrs: Record<string, AttributeValue>;
  residual?: string;
}

/** conv/gemm -> [act] -> [Add R]  or  -> Add R -> act; undefined when nothing follows. */
function matchEpilogue(g: WorkGraph, v: string, shapes: Map<string, SymShape>): Epilogue | undefined {
  const attrs = (act: Activation | undefined): Record<string, AttributeValue> => {
    const out: Record<string, AttributeValue> = { activation: act?.activation ?? 'none' };
    if (act?.alpha !== undefined) out.alpha = act.alpha;
    if (act?.beta !== undefined) out.beta = act.beta;
    return out;
  };
  const act = matchActivation(g, v);
  if (act) {
    const res = matchResidual(g, act.out, shapes);
    if (!res) return { nodes: act.nodes, out: act.out, attrs: attrs(act) };
    return { nodes: [...act.nodes, res.node], out: res.out, residual: res.r, attrs: { ...attrs(act), residual_before_activation: 0 } };
  }
  const res = matchResidual(g, v, shapes);
  if (!res) return undefined;
  const after = matchActivation(g, res.out);
  // The activation reads R too, so R must have been computed before it (it was, before the Add).
  if (!after) return { nodes: [res.node], out: res.out, residual: res.r, attrs: { ...attrs(undefined), residual_before_activation: 1 } };
  return { nodes: [res.node, ...after.nodes], out: after.out, residual: res.r, attrs: { ...attrs(after), residual_before_activation: 1 } };
}

export function fuseConvs(g: WorkGraph, shapes: Map<string, SymShape>): void {
  for (let i = 0; i < g.nodes.length; i++) {
    const conv = g.nodes[i];
    if (!conv || conv.domain !== '' || conv.opType !== 'Conv' || conv.outputs.length !== 1) continue;
    const w = g.constant(conv.inputs[1] ?? '');
    if (!w || w.dtype !== 'float32' || (conv.inputs[2] && !g.floatConstant(conv.inputs[2]))) continue;
    const ep = matchEpilogue(g, conv.outputs[0]!, shapes);
    if (!ep) continue;
    const inputs = [conv.inputs[0]!, conv.inputs[1]!, conv.inputs[2] ?? ''];
    if (ep.residual) inputs.push(ep.residual);
    else if (!inputs[2]) inputs.pop();
    const last = Math.max(i, ...ep.nodes);
    g.replace([i, ...ep.nodes].filter((k) => k !== last), last, {
      name: `${conv.name}/FusedConv`, opType: 'FusedConv', domain: SONDE_DOMAIN, inputs, outputs: [ep.out],
      attributes: { ...conv.attributes, ...ep.attrs },
    });
  }
}

/**
 * Gemm (transA = 0, constant B, C constant per column or absent) -> FusedGemm with alpha and beta
 * folded into new B and C; MatMul with a constant 2-D B followed by a bias Add and/or an epilogue
 * -> FusedGemm. A plain MatMul with nothing to fuse stays.
 */
export function fuseGemms(g: WorkGraph, shapes: Map<string, SymShape>): void {
  for (let i = 0; i < g.nodes.length; i++) {
    const node = g.nodes[i];
    if (!node || node.domain !== '' || node.outputs.length !== 1) continue;
    let fused: { b: string; c?: string; transB: number; nodes: number[]; out: string } | undefined;
    if (node.opType === 'Gemm') fused = gemmCore(g, node, i);
    else if (node.opType === 'MatMul') fused = matMulCore(g, node, i, shapes);
    if (!fused) continue;
    const ep = matchEpilogue(g, fused.out, shapes);
    if (!ep && node.opType === 'MatMul' && fused.nodes.length === 1) continue;
    const inputs = [node.inputs[0]!, fused.b, fused.c ?? ''];
    if (ep?.residual) inputs.push(ep.residual);
    else if (!fused.c) inputs.pop();
    const all = [...fused.nodes, ...(ep?.nodes ?? [])];
    const last = Math.max(...all);
    g.replace(all.filter((k) => k !== last), last, {
      name: `${node.name}/FusedGemm`, opType: 'FusedGemm', domain: SONDE_DOMAIN, inputs, outputs: [ep?.out ?? fused.out],
      attributes: { trans_b: fused.transB, ...(ep?.attrs ?? { activation: 'none' }) },
    });
  }
}

function gemmCore(g: WorkGraph, node: OnnxNode, i: number) {
  const bT = g.constant(node.inputs[1] ?? '');
  if (node.attributes.transA === 1 || !bT || bT.dtype !== 'float32' || bT.dims.length !== 2) return undefined;
  const transB = node.attributes.transB === 1 ? 1 : 0;
  const n = transB ? bT.dims[0]! : bT.dims[1]!;
  const alpha = num(node.attributes.alpha, 1);
  const beta = num(node.attributes.beta, 1);
  let c: string | undefined;
  if (node.inputs[2]) {
    const cT = g.constant(node.inputs[2]);
    if (!cT || cT.dtype !== 'float32' || !broadcastsToRow(cT.dims, n)) return undefined;
    const src = cT.data as Float32Array;
    const asRow = cT.dims.length <= 2 && sizeOf(cT.dims) === n && n > 1;
    if (beta === 1 && asRow) c = node.inputs[2];
    else c = g.addConstant(`${node.inputs[2]}_row`, new Tensor('float32', Float32Array.from({ length: n }, (_, k) => beta * src[src.length === 1 ? 0 : k]!), [n]));
  }
  let b = node.inputs[1]!;
  if (alpha !== 1) b = g.addConstant(`${b}_alpha`, new Tensor('float32', (bT.data as Float32Array).map((x) => alpha * x), bT.dims));
  return { b, c, transB, nodes: [i], out: node.outputs[0]! };
}

function matMulCore(g: WorkGraph, node: OnnxNode, i: number, shapes: Map<string, SymShape>) {
  const bT = g.constant(node.inputs[1] ?? '');
  if (!bT || bT.dtype !== 'float32' || bT.dims.length !== 2) return undefined;
  const n = bT.dims[1]!;
  const y = node.outputs[0]!;
  const add = g.soleConsumer(y);
  const biasName = add && add.node.opType === 'Add' && add.node.domain === '' && add.node.inputs.length === 2
    ? (add.node.inputs[0] === y ? add.node.inputs[1] : add.node.inputs[0]) : undefined;
  const bias = biasName && biasName !== y ? g.constant(biasName) : undefined;
  // The bias must not change the output's shape: one value per column, and no more dims than y.
  const rank = shapes.get(y)?.length ?? 1;
  if (!bias || bias.dtype !== 'float32' || !broadcastsToRow(bias.dims, n) || bias.dims.length > rank) {
    return { b: node.inputs[1]!, transB: 0, nodes: [i], out: y };
  }
  const src = bias.data as Float32Array;
  const c = bias.dims.length === 1 && src.length === n ? biasName! : g.addConstant(`${biasName}_row`, new Tensor('float32', Float32Array.from({ length: n }, (_, k) => src[src.length === 1 ? 0 : k]!), [n]));
  return { b: node.inputs[1]!, c, transB: 0, nodes: [i, add!.index], out: add!.node.outputs[0]! };
}
