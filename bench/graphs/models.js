// Generated benchmark models: ResNet-50, MobileNetV2, a 3-layer MLP and a 2-layer transformer
// encoder, laid out as PyTorch exports them (BatchNormalization kept, ReLU6 as Clip, LayerNorm and
// GELU decomposed), with deterministic random weights. Too large to commit (ResNet-50 is ~100 MB),
// so modelPath() generates each on first use into bench/.cache/ (gitignored), keyed by a hash of the
// generator's parameters.
//
// Weight scales keep activations O(1) through the whole network (He-uniform before ReLU, Xavier
// elsewhere; BN statistics random but near what the convolutions produce), so a comparison of two
// runtimes' outputs measures arithmetic differences instead of overflow, underflow or saturation.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import onnxProto from 'onnx-proto';
import { GraphBuilder, float32Tensor, floatAttr, int64Tensor, randomTensor, rng } from './builder.js';

// Bump when a generator changes the graphs it emits for the same parameters, so stale cache files
// are not reused.
const GENERATOR_VERSION = 1;

/** Uniform [-scale, scale) weights drawn from the model's one stream, so every tensor differs. */
function weights(random, dims, scale) {
  return randomTensor(dims, { scale, random });
}

/** Uniform [lo, hi) vector of length n. */
function uniformVector(random, n, lo, hi) {
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = lo + (hi - lo) * random();
  return { dtype: 'float32', dims: [n], data };
}

// He-uniform: variance 2 / fan_in, which keeps E[x^2] constant through conv + ReLU.
const heScale = (fanIn) => Math.sqrt(6 / fanIn);
// Xavier-uniform: variance 2 / (fan_in + fan_out), for layers not followed by a ReLU.
const xavierScale = (fanIn, fanOut) => Math.sqrt(6 / (fanIn + fanOut));

/** Conv (no bias, as before a BN in torchvision) then BatchNormalization with random statistics. */
function convBn(g, random, x, cin, cout, k, { stride = 1, group = 1, gamma = [0.5, 1.5] } = {}) {
  const fanIn = (cin / group) * k * k;
  const w = g.init(g.fresh('conv_w'), weights(random, [cout, cin / group, k, k], heScale(fanIn)));
  const pad = Math.floor(k / 2);
  const [c] = g.node('Conv', [x, w], { dilations: [1, 1], group, kernel_shape: [k, k], pads: [pad, pad, pad, pad], strides: [stride, stride] });
  // Running statistics as a trained net would have them: a variance near the conv output's (about
  // 1 to 2 here) and a small mean, perturbed per channel so BN is far from the identity.
  const scale = g.init(g.fresh('bn_gamma'), uniformVector(random, cout, gamma[0], gamma[1]));
  const bias = g.init(g.fresh('bn_beta'), uniformVector(random, cout, -0.25, 0.25));
  const mean = g.init(g.fresh('bn_mean'), uniformVector(random, cout, -0.3, 0.3));
  const variance = g.init(g.fresh('bn_var'), uniformVector(random, cout, 0.6, 2));
  const [y] = g.node('BatchNormalization', [c, scale, bias, mean, variance], { epsilon: floatAttr(1e-5), momentum: floatAttr(0.9) });
  return y;
}

const relu = (g, x) => g.node('Relu', [x])[0];

/** Declares `value` (a last node's output, consumed by no node) the graph output 'output'. */
function outputAs(g, value, dims) {
  for (const n of g.nodes) n.output = n.output.map((o) => (o === value ? 'output' : o));
  g.output('output', 'float32', dims);
}

/** A PyTorch Linear: Gemm with W as [out, in] (transB = 1) and a bias. */
function linear(g, random, x, fin, fout, scale) {
  const w = g.init(g.fresh('fc_w'), weights(random, [fout, fin], scale));
  const b = g.init(g.fresh('fc_b'), uniformVector(random, fout, -0.1, 0.1));
  return g.node('Gemm', [x, w, b], { alpha: floatAttr(1), beta: floatAttr(1), transB: 1 })[0];
}

/** A global-average-pooled [N, C, 1, 1] flattened to [N, C], then the classifier. */
function head(g, random, x, channels, classes) {
  const [p] = g.node('GlobalAveragePool', [x]);
  const [f] = g.node('Flatten', [p], { axis: 1 });
  return linear(g, random, f, channels, classes, xavierScale(channels, classes));
}

// (bottleneck width, blocks, stride of the first block) of ResNet-50's four stages.
const RESNET50_STAGES = [[64, 3, 1], [128, 4, 2], [256, 6, 2], [512, 3, 2]];

/**
 * torchvision's resnet50 (v1.5: the stride on the 3x3 conv of each bottleneck) on [batch, 3, 224,
 * 224] -> [batch, 1000], opset 13. `batch` is a number or a symbolic name.
 */
export function resnet50({ batch = 'N', seed = 50, opset = 13 } = {}) {
  const random = rng(seed);
  const g = new GraphBuilder('resnet50', { opset, producer: 'sonde-bench-models' });
  let x = g.input('input', 'float32', [batch, 3, 224, 224]);
  x = relu(g, convBn(g, random, x, 3, 64, 7, { stride: 2 }));
  [x] = g.node('MaxPool', [x], { ceil_mode: 0, kernel_shape: [3, 3], pads: [1, 1, 1, 1], strides: [2, 2] });
  let cin = 64;
  for (const [width, blocks, firstStride] of RESNET50_STAGES) {
    for (let b = 0; b < blocks; b++) {
      const stride = b === 0 ? firstStride : 1;
      const cout = width * 4;
      let o = relu(g, convBn(g, random, x, cin, width, 1));
      o = relu(g, convBn(g, random, o, width, width, 3, { stride }));
      // A smaller gamma on the block's last BN keeps the residual sum from growing block after
      // block (trained ResNets end up the same way; torchvision can even zero-initialise it).
      o = convBn(g, random, o, width, cout, 1, { gamma: [0.2, 0.6] });
      const shortcut = b === 0 ? convBn(g, random, x, cin, cout, 1, { stride }) : x;
      [x] = g.node('Add', [o, shortcut]);
      x = relu(g, x);
      cin = cout;
    }
  }
  outputAs(g, head(g, random, x, 2048, 1000), [batch, 1000]);
  return g.toBytes();
}

// (expansion t, output channels c, repeats n, first stride s): torchvision's table.
const MOBILENETV2_BLOCKS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]];

/**
 * torchvision's mobilenet_v2 on [batch, 3, 224, 224] -> [batch, 1000], opset 13: inverted residual
 * blocks (1x1 expand, 3x3 depthwise, 1x1 project), ReLU6 exported as Clip with min/max inputs,
 * BN kept, residual Add where stride is 1 and the width is unchanged, a 1280-channel last conv.
 */
export function mobilenetv2({ batch = 'N', seed = 2, opset = 13 } = {}) {
  const random = rng(seed);
  const g = new GraphBuilder('mobilenetv2', { opset, producer: 'sonde-bench-models' });
  const lo = g.init('relu6_min', float32Tensor([0], []));
  const hi = g.init('relu6_max', float32Tensor([6], []));
  const relu6 = (x) => g.node('Clip', [x, lo, hi])[0];
  let x = g.input('input', 'float32', [batch, 3, 224, 224]);
  x = relu6(convBn(g, random, x, 3, 32, 3, { stride: 2 }));
  let cin = 32;
  for (const [t, c, n, s] of MOBILENETV2_BLOCKS) {
    for (let i = 0; i < n; i++) {
      const stride = i === 0 ? s : 1;
      const hidden = cin * t;
      let o = x;
      if (t !== 1) o = relu6(convBn(g, random, o, cin, hidden, 1));
      o = relu6(convBn(g, random, o, hidden, hidden, 3, { stride, group: hidden }));
      o = convBn(g, random, o, hidden, c, 1, { gamma: [0.3, 0.8] });
      if (stride === 1 && cin === c) [o] = g.node('Add', [x, o]);
      x = o;
      cin = c;
    }
  }
  x = relu6(convBn(g, random, x, cin, 1280, 1));
  outputAs(g, head(g, random, x, 1280, 1000), [batch, 1000]);
  return g.toBytes();
}

/** 784-1024-1024-10, Gemm + Relu as PyTorch exports nn.Linear / nn.ReLU; opset 13. */
export function mlp({ batch = 'N', seed = 3, opset = 13, sizes = [784, 1024, 1024, 10] } = {}) {
  const random = rng(seed);
  const g = new GraphBuilder('mlp', { opset, producer: 'sonde-bench-models' });
  let x = g.input('input', 'float32', [batch, sizes[0]]);
  for (let i = 1; i < sizes.length; i++) {
    const last = i === sizes.length - 1;
    x = linear(g, random, x, sizes[i - 1], sizes[i], last ? xavierScale(sizes[i - 1], sizes[i]) : heScale(sizes[i - 1]));
    if (!last) x = relu(g, x);
  }
  outputAs(g, x, [batch, sizes.at(-1)]);
  return g.toBytes();
}

/**
 * A post-norm transformer encoder (nn.TransformerEncoderLayer with GELU) on [batch, tokens, dModel],
 * opset 17, as PyTorch exports it: per layer Q/K/V MatMul + Add, Reshape + Transpose to heads,
 * scaled QK^T, Softmax, attention-weighted V, back to [batch, tokens, dModel], output projection,
 * residual, LayerNorm, FFN with GELU as its Erf formula, residual, LayerNorm. The layers differ the
 * way real exports do, so that both forms reach the runtime: even layers compute the head shape at
 * run time (Shape -> Gather -> Unsqueeze -> Concat), divide the scores by sqrt(d_head) and spell
 * LayerNorm out (ReduceMean, Sub, Pow, Sqrt, Div: the opset < 17 export); odd layers use a constant
 * shape with 0 for the batch, multiply by 1/sqrt(d_head) and use LayerNormalization (opset 17).
 */
export function transformerEncoder({ batch = 'N', seed = 4, layers = 2, dModel = 256, heads = 4, tokens = 128, ffn = 1024 } = {}) {
  if (dModel % heads !== 0) throw new Error(`dModel ${dModel} is not a multiple of heads ${heads}`);
  const dHead = dModel / heads;
  const random = rng(seed);
  const g = new GraphBuilder('transformer_encoder', { opset: 17, producer: 'sonde-bench-models' });
  const c = (name, t) => g.init(g.fresh(name), t);
  const scalar = (v) => c('const', float32Tensor([v], []));
  const proj = (x, fin, fout) => {
    const w = c('w', weights(random, [fin, fout], xavierScale(fin, fout)));
    const b = c('b', uniformVector(random, fout, -0.1, 0.1));
    const [m] = g.node('MatMul', [x, w]);
    return g.node('Add', [m, b])[0];
  };
  const layerNorm = (x, decomposed) => {
    const gamma = c('ln_gamma', uniformVector(random, dModel, 0.5, 1.5));
    const beta = c('ln_beta', uniformVector(random, dModel, -0.2, 0.2));
    if (!decomposed) return g.node('LayerNormalization', [x, gamma, beta], { axis: -1, epsilon: floatAttr(1e-5) })[0];
    const [mean] = g.node('ReduceMean', [x], { axes: [-1], keepdims: 1 });
    const [d] = g.node('Sub', [x, mean]);
    const [sq] = g.node('Pow', [d, scalar(2)]);
    const [v] = g.node('ReduceMean', [sq], { axes: [-1], keepdims: 1 });
    const [ve] = g.node('Add', [v, scalar(1e-5)]);
    const [s] = g.node('Sqrt', [ve]);
    const [n] = g.node('Div', [d, s]);
    const [m] = g.node('Mul', [n, gamma]);
    return g.node('Add', [m, beta])[0];
  };
  const gelu = (x) => {
    const [d] = g.node('Div', [x, scalar(Math.SQRT2)]);
    const [e] = g.node('Erf', [d]);
    const [a] = g.node('Add', [e, scalar(1)]);
    const [m] = g.node('Mul', [x, a]);
    return g.node('Mul', [m, scalar(0.5)])[0];
  };

  let x = g.input('input', 'float32', [batch, tokens, dModel]);
  for (let l = 0; l < layers; l++) {
    const exportStyle = l % 2 === 0;
    let headShape;
    if (exportStyle) {
      const [shape] = g.node('Shape', [x]);
      const [n] = g.node('Gather', [shape, c('idx', int64Tensor([0], []))], { axis: 0 });
      const [n1] = g.node('Unsqueeze', [n, c('axes', int64Tensor([0]))]);
      [headShape] = g.node('Concat', [n1, c('shape_tail', int64Tensor([-1, heads, dHead]))], { axis: 0 });
    } else {
      headShape = c('head_shape', int64Tensor([0, -1, heads, dHead]));
    }
    const toHeads = (t, perm) => {
      const [r] = g.node('Reshape', [t, headShape]);
      return g.node('Transpose', [r], { perm })[0];
    };
    const q = toHeads(proj(x, dModel, dModel), [0, 2, 1, 3]); // [B, H, T, dh]
    const kT = toHeads(proj(x, dModel, dModel), [0, 2, 3, 1]); // [B, H, dh, T]
    const v = toHeads(proj(x, dModel, dModel), [0, 2, 1, 3]);
    const [scores] = g.node('MatMul', [q, kT]);
    const [scaled] = exportStyle ? g.node('Div', [scores, scalar(Math.sqrt(dHead))]) : g.node('Mul', [scores, scalar(1 / Math.sqrt(dHead))]);
    const [p] = g.node('Softmax', [scaled], { axis: -1 });
    const [ctx] = g.node('MatMul', [p, v]);
    const [ctxT] = g.node('Transpose', [ctx], { perm: [0, 2, 1, 3] });
    const [merged] = g.node('Reshape', [ctxT, c('merge_shape', int64Tensor([0, 0, dModel]))]);
    const [res1] = g.node('Add', [x, proj(merged, dModel, dModel)]);
    const h = layerNorm(res1, exportStyle);
    const f = proj(gelu(proj(h, dModel, ffn)), ffn, dModel);
    const [res2] = g.node('Add', [h, f]);
    x = layerNorm(res2, exportStyle);
  }
  outputAs(g, x, [batch, tokens, dModel]);
  return g.toBytes();
}

// Reduction lengths (the K of every dot product or mean) of each model's layers, from the same
// tables the generators walk; roundingTolerance() derives the fp32 comparison bound from them.
function resnet50Reductions() {
  const ks = [3 * 7 * 7];
  let cin = 64;
  for (const [width, blocks] of RESNET50_STAGES) {
    for (let b = 0; b < blocks; b++) {
      ks.push(cin, 9 * width, width);
      if (b === 0) ks.push(cin);
      cin = width * 4;
    }
  }
  return [...ks, 7 * 7, 2048];
}
function mobilenetv2Reductions() {
  const ks = [27];
  let cin = 32;
  for (const [t, c, n] of MOBILENETV2_BLOCKS) {
    for (let i = 0; i < n; i++) {
      if (t !== 1) ks.push(cin);
      ks.push(9, cin * t);
      cin = c;
    }
  }
  return [...ks, cin, 7 * 7, 1280];
}
function transformerReductions({ layers = 2, dModel = 256, heads = 4, tokens = 128, ffn = 1024 } = {}) {
  // Per layer: Q, K, V projections, QK^T (d_head), PV (tokens), output projection, two LayerNorms
  // (mean and variance over d_model each), FFN in and out.
  const layer = [dModel, dModel, dModel, dModel / heads, tokens, dModel, dModel, dModel, dModel, ffn, dModel, dModel];
  return Array.from({ length: layers }, () => layer).flat();
}

/**
 * The generated models by name: generator, input dims and output dims at a batch, and the reduction
 * lengths of its layers. Every model has one input 'input' and one output 'output'.
 */
export const MODELS = {
  resnet50: { generate: resnet50, inputDims: (b) => [b, 3, 224, 224], outputDims: (b) => [b, 1000], reductions: resnet50Reductions },
  mobilenetv2: { generate: mobilenetv2, inputDims: (b) => [b, 3, 224, 224], outputDims: (b) => [b, 1000], reductions: mobilenetv2Reductions },
  mlp: { generate: mlp, inputDims: (b, { sizes = [784, 1024, 1024, 10] } = {}) => [b, sizes[0]], outputDims: (b, { sizes = [784, 1024, 1024, 10] } = {}) => [b, sizes.at(-1)],
    reductions: ({ sizes = [784, 1024, 1024, 10] } = {}) => sizes.slice(0, -1) },
  transformer: { generate: transformerEncoder, inputDims: (b, { tokens = 128, dModel = 256 } = {}) => [b, tokens, dModel],
    outputDims: (b, { tokens = 128, dModel = 256 } = {}) => [b, tokens, dModel], reductions: transformerReductions },
};

/**
 * The largest |a - b| / max|reference output| expected between two correct fp32 implementations
 * of model `name` (different summation orders, BN folded or not, fused epilogues). Model: a float32
 * dot product or mean of K terms in any order carries a rounding error of about sqrt(K)·u relative
 * to the size of its terms when the roundings are independent (u = 2^-24); every layer's error
 * reaches the output with gain about 1 (the weights are scaled to keep activations O(1)), so the
 * layers' errors add up to at most u·Σ sqrt(K_l) of the activation scale, for which max|output|
 * stands in. The factor 4 covers the tails: the worst of thousands of outputs is a ~4σ event.
 * For scale: onnxruntime-node with optimisation 'all' against 'disabled' differs by 3e-7 relative
 * on ResNet-50, and this gives 3.6e-4 there, while a wrong operator moves outputs by 1e-2 or more.
 */
export function roundingTolerance(name, params = {}) {
  const u = 2 ** -24;
  return 4 * u * MODELS[name].reductions(params).reduce((s, k) => s + Math.sqrt(k), 0);
}

const CACHE_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '.cache');

/**
 * The path of the generated model `name` with generator options `params`, generating it on first
 * use. Written to a temporary name and renamed, so a test and a bench generating the same model at
 * once never read a half-written file.
 */
export function modelPath(name, params = {}) {
  const spec = MODELS[name];
  if (!spec) throw new Error(`unknown model '${name}' (have ${Object.keys(MODELS).join(', ')})`);
  const key = createHash('sha256').update(JSON.stringify({ name, params, version: GENERATOR_VERSION })).digest('hex').slice(0, 16);
  const path = join(CACHE_DIR, `${name}-${key}.onnx`);
  if (!existsSync(path)) {
    mkdirSync(CACHE_DIR, { recursive: true });
    const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
    writeFileSync(tmp, spec.generate(params));
    renameSync(tmp, path);
  }
  return path;
}

/** The bytes of modelPath(name, params). */
export function modelBytes(name, params = {}) {
  return new Uint8Array(readFileSync(modelPath(name, params)));
}

/**
 * A deterministic input for `name` (generated with `params`) at `batch`: uniform [-1, 1) (a
 * normalised image, embeddings).
 */
export function modelInput(name, batch, seed = 7, params = {}) {
  const dims = MODELS[name].inputDims(batch, params);
  return randomTensor(dims, { seed: seed + batch });
}

/**
 * max |got - want| / max |want| (Infinity where got has a NaN or infinity): the measure that
 * roundingTolerance() bounds.
 */
export function relativeDifference(got, want) {
  if (got.length !== want.length) throw new Error(`lengths differ: ${got.length} vs ${want.length}`);
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i] - want[i]);
    if (!Number.isFinite(got[i])) return Infinity;
    if (d > diff) diff = d;
    scale = Math.max(scale, Math.abs(want[i]));
  }
  return diff / scale;
}

/** Rounds float32 values to the nearest bfloat16 (ties to even), kept as float32. */
export function roundToBf16(values) {
  const out = new Float32Array(values);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i];
    if ((b & 0x7f800000) === 0x7f800000) continue; // inf and NaN stay as they are
    bits[i] = ((b + 0x7fff + ((b >>> 16) & 1)) & 0xffff0000) >>> 0;
  }
  return out;
}

/**
 * A float32 model that computes what a bf16 runtime computes ('bf16 weights with fp32
 * accumulation'), to measure the bound a bf16 session's outputs must meet without needing one:
 * every BatchNormalization that follows a Conv folded into it (as a runtime folds before packing),
 * every Conv / Gemm weight (and MatMul weight initializer) rounded to bf16, and, the worst case (the
 * AVX512-BF16 and AMX kernels round activations too), every such op's data input rounded to bf16
 * by a Cast to bfloat16 and back.
 */
export function emulateBf16(bytes) {
  const { onnx } = onnxProto;
  const model = onnx.ModelProto.decode(bytes);
  const graph = model.graph;
  const inits = new Map(graph.initializer.map((t) => [t.name, t]));
  const floats = (t) => new Float32Array(t.rawData.slice().buffer);
  const setFloats = (t, data) => { t.rawData = new Uint8Array(data.buffer); };
  const consumers = (name) => graph.node.filter((n) => n.input.includes(name));
  const removed = new Set();
  for (const conv of graph.node.filter((n) => n.opType === 'Conv')) {
    const [bn] = consumers(conv.output[0]);
    if (!bn || bn.opType !== 'BatchNormalization' || consumers(conv.output[0]).length !== 1) continue;
    const [scale, beta, mean, variance] = bn.input.slice(1).map((n) => floats(inits.get(n)));
    const eps = bn.attribute.find((a) => a.name === 'epsilon')?.f ?? 1e-5;
    const wT = inits.get(conv.input[1]);
    const w = floats(wT);
    const cout = Number(wT.dims[0]);
    const per = w.length / cout;
    const bias = new Float32Array(cout);
    for (let c = 0; c < cout; c++) {
      const s = scale[c] / Math.sqrt(variance[c] + eps);
      for (let i = 0; i < per; i++) w[c * per + i] *= s;
      bias[c] = beta[c] - mean[c] * s;
    }
    setFloats(wT, w);
    const biasName = `${conv.input[1]}_folded_bias`;
    graph.initializer.push({ name: biasName, dataType: onnx.TensorProto.DataType.FLOAT, dims: [cout], rawData: new Uint8Array(bias.buffer) });
    conv.input = [conv.input[0], conv.input[1], biasName];
    conv.output = [bn.output[0]];
    removed.add(bn);
  }
  graph.node = graph.node.filter((n) => !removed.has(n));
  const nodes = [];
  for (const n of graph.node) {
    // A MatMul whose B is a weight runs as a GEMM on packed bf16 weights too.
    if (n.opType === 'Conv' || n.opType === 'Gemm' || (n.opType === 'MatMul' && inits.has(n.input[1]))) {
      const wT = inits.get(n.input[1]);
      setFloats(wT, roundToBf16(floats(wT)));
      const half = `${n.input[0]}_${n.name}_bf16`;
      const back = `${half}_f32`;
      nodes.push({ opType: 'Cast', name: `${n.name}_to_bf16`, input: [n.input[0]], output: [half], attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: onnx.TensorProto.DataType.BFLOAT16 }] });
      nodes.push({ opType: 'Cast', name: `${n.name}_to_f32`, input: [half], output: [back], attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: onnx.TensorProto.DataType.FLOAT }] });
      n.input = [back, ...n.input.slice(1)];
    }
    nodes.push(n);
  }
  graph.node = nodes;
  return onnx.ModelProto.encode(model).finish();
}

/**
 * The bound on relativeDifference() between ResNet-50 in bf16 (weights, and at worst activations,
 * rounded to bf16; fp32 accumulation) and in fp32. Measured with emulateBf16() in onnxruntime-node
 * (batch 1 and 2, three inputs each): 3.1e-3 to 3.7e-3 of max|output|, about 2 bf16 half-ulps
 * (2^-9 = 2e-3): 53 layers of independent roundings largely cancel. The bound allows 4x that.
 */
export const BF16_RESNET50_BOUND = 1.5e-2;

/**
 * The same bound for the transformer encoder (its six weight MatMuls per layer on bf16 weights,
 * activations rounded at worst): emulateBf16() in onnxruntime-node measured 2.0e-3 to 2.8e-3 of
 * max|output| (batch 1, 2 and 8); 4x that.
 */
export const BF16_TRANSFORMER_BOUND = 1.2e-2;
