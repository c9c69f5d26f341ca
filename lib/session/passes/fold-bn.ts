/**
 * BatchNormalization folded into the Conv, Gemm or MatMul that feeds it. In inference BN is
 * y = (x - mean) * s + beta with s = gamma / sqrt(var + eps) per channel (dim 1), which is affine
 * per output channel of the producer, so it moves into the producer's weights and bias:
 *   W'[c, ...] = W[c, ...] * s[c],   B'[c] = (B[c] - mean[c]) * s[c] + beta[c].
 * Computed in float64 and stored as new float32 initializers (the originals may be shared).
 * Only when the producer's output is read by the BN alone and is not a graph output.
 */
import type { OnnxNode } from '../../onnx/model.js';
import { Tensor } from '../../tensor.js';
import { float32From, sizeOf, type WorkGraph } from './graph.js';
import type { SymShape } from './shapes.js';

interface BnParams {
  scale: Float64Array; // gamma / sqrt(var + eps)
  shift: Float64Array; // beta - mean * scale
  mean: Float32Array;
  channels: number;
}

/** The BN at `node` as a per-channel affine map, when it is an inference BN over constants. */
function bnParams(g: WorkGraph, node: OnnxNode): BnParams | undefined {
  if (node.inputs.length < 5) return undefined;
  // Training mode (opset >= 14) or the running-stat outputs in use change what BN computes.
  if (node.attributes.training_mode === 1) return undefined;
  if (node.outputs.slice(1).some((o) => o && (g.consumers(o).length > 0 || !g.isInternal(o)))) return undefined;
  if (g.opset < 9 && node.attributes.spatial === 0) return undefined;
  const [gamma, beta, mean, variance] = node.inputs.slice(1, 5).map((v) => g.floatConstant(v));
  if (!gamma || !beta || !mean || !variance) return undefined;
  const channels = gamma.length;
  if (beta.length !== channels || mean.length !== channels || variance.length !== channels) return undefined;
  const eps = typeof node.attributes.epsilon === 'number' ? node.attributes.epsilon : 1e-5;
  const scale = new Float64Array(channels);
  const shift = new Float64Array(channels);
  for (let c = 0; c < channels; c++) {
    // eps is a float attribute: float32 in the file, as every runtime reads it.
    scale[c] = gamma[c]! / Math.sqrt(variance[c]! + Math.fround(eps));
    shift[c] = beta[c]! - mean[c]! * scale[c]!;
  }
  return { scale, shift, mean, channels };
}

/** B'[c] = B[c] * s[c] + shift[c], with B broadcast from one value or absent (0). */
function foldedBias(bias: Float32Array | undefined, bn: BnParams, biasScale = 1): Tensor<'float32'> {
  const out = new Float64Array(bn.channels);
  for (let c = 0; c < bn.channels; c++) {
    const b = bias ? bias[bias.length === 1 ? 0 : c]! * biasScale : 0;
    out[c] = b * bn.scale[c]! + bn.shift[c]!;
  }
  return float32From(out, [bn.channels]);
}

export function foldBatchNorms(g: WorkGraph, shapes: Map<string, SymShape>): void {
  for (let i = 0; i < g.nodes.length; i++) {
    const bnNode = g.nodes[i];
    if (!bnNode || bnNode.domain !== '' || bnNode.opType !== 'BatchNormalization') continue;
    const x = bnNode.inputs[0]!;
    const pIndex = g.producerIndex(x);
    if (pIndex === undefined || g.soleConsumer(x)?.index !== i) continue;
    const producer = g.nodes[pIndex]!;
    if (producer.domain !== '' || producer.outputs.length !== 1) continue;
    const bn = bnParams(g, bnNode);
    if (!bn) continue;
    let folded: OnnxNode | undefined;
    if (producer.opType === 'Conv') folded = foldIntoConv(g, producer, bn);
    else if (producer.opType === 'Gemm') folded = foldIntoGemm(g, producer, bn);
    else if (producer.opType === 'MatMul') folded = foldIntoMatMul(g, producer, bn, shapes);
    if (!folded) continue;
    g.replace([pIndex], i, { ...folded, outputs: [bnNode.outputs[0]!] });
  }
}

function foldIntoConv(g: WorkGraph, conv: OnnxNode, bn: BnParams): OnnxNode | undefined {
  const wT = g.constant(conv.inputs[1] ?? '');
  const bias = conv.inputs[2] ? g.floatConstant(conv.inputs[2]) : undefined;
  if (!wT || wT.dtype !== 'float32' || wT.dims.length < 3 || wT.dims[0] !== bn.channels) return undefined;
  if (conv.inputs[2] && (!bias || bias.length !== bn.channels)) return undefined;
  const w = wT.data as Float32Array;
  const per = w.length / bn.channels;
  const out = new Float32Array(w.length);
  for (let c = 0; c < bn.channels; c++) {
    const s = bn.scale[c]!;
    for (let k = c * per; k < (c + 1) * per; k++) out[k] = w[k]! * s;
  }
  const wName = g.addConstant(`${conv.inputs[1]}_bn`, new Tensor('float32', out, wT.dims));
  const bName = g.addConstant(`${conv.inputs[2] || `${conv.name}_bias`}_bn`, foldedBias(bias, bn));
  return { ...conv, name: `${conv.name}+bn`, inputs: [conv.inputs[0]!, wName, bName] };
}

/** Gemm output is [M, N]: BN's channel dim 1 is N, so the fold scales B's N columns (rows when transB). */
function foldIntoGemm(g: WorkGraph, gemm: OnnxNode, bn: BnParams): OnnxNode | undefined {
  const bT = g.constant(gemm.inputs[1] ?? '');
  if (!bT || bT.dtype !== 'float32' || bT.dims.length !== 2) return undefined;
  const transB = gemm.attributes.transB === 1;
  const n = transB ? bT.dims[0]! : bT.dims[1]!;
  if (n !== bn.channels) return undefined;
  const alpha = typeof gemm.attributes.alpha === 'number' ? gemm.attributes.alpha : 1;
  const beta = typeof gemm.attributes.beta === 'number' ? gemm.attributes.beta : 1;
  let c: Float32Array | undefined;
  if (gemm.inputs[2]) {
    const cT = g.constant(gemm.inputs[2]);
    // Only a C that is the same for every row folds into a per-channel bias.
    if (!cT || cT.dtype !== 'float32' || !broadcastsToRow(cT.dims, n)) return undefined;
    c = cT.data as Float32Array;
  }
  const w = scaleColumns(bT.data as Float32Array, bT.dims[0]!, bT.dims[1]!, bn.scale, transB, alpha);
  const wName = g.addConstant(`${gemm.inputs[1]}_bn`, new Tensor('float32', w, bT.dims));
  const cName = g.addConstant(`${gemm.inputs[2] || `${gemm.name}_bias`}_bn`, foldedBias(c, bn, beta));
  const attributes = { ...gemm.attributes, alpha: 1, beta: 1 };
  return { ...gemm, name: `${gemm.name}+bn`, inputs: [gemm.inputs[0]!, wName, cName], attributes };
}

/** MatMul [M, K] x [K, N] with BN over N: only when A is 2-D (BN's channel dim 1 is then N). */
function foldIntoMatMul(g: WorkGraph, mm: OnnxNode, bn: BnParams, shapes: Map<string, SymShape>): OnnxNode | undefined {
  const bT = g.constant(mm.inputs[1] ?? '');
  if (!bT || bT.dtype !== 'float32' || bT.dims.length !== 2 || bT.dims[1] !== bn.channels) return undefined;
  if (shapes.get(mm.inputs[0]!)?.length !== 2) return undefined;
  const w = scaleColumns(bT.data as Float32Array, bT.dims[0]!, bT.dims[1]!, bn.scale, false, 1);
  const wName = g.addConstant(`${mm.inputs[1]}_bn`, new Tensor('float32', w, bT.dims));
  const cName = g.addConstant(`${mm.name}_bias_bn`, foldedBias(undefined, bn));
  return { name: `${mm.name}+bn`, opType: 'Gemm', domain: '', inputs: [mm.inputs[0]!, wName, cName], outputs: mm.outputs, attributes: {} };
}

/** W * diag(s) over the output dim (columns of [K, N], rows of [N, K] when transposed), times alpha. */
function scaleColumns(w: Float32Array, rows: number, cols: number, s: Float64Array, transposed: boolean, alpha: number): Float32Array {
  const out = new Float32Array(w.length);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) out[r * cols + c] = alpha * w[r * cols + c]! * s[transposed ? r : c]!;
  }
  return out;
}

/** Whether a tensor of `dims` broadcasts to [n] along the last dim only (one value per column). */
export function broadcastsToRow(dims: readonly number[], n: number): boolean {
  const size = sizeOf(dims);
  if (size === 1) return true;
  return dims[dims.length - 1] === n && size === n;
}
