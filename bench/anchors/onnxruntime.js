// onnxruntime-node as the anchor of the gemm suite (and the independent reference of
// test/gemm-ort.test.ts). Each prepare() builds a one-node ONNX model in memory with onnx-proto and
// opens an InferenceSession on it, so what is timed is what a user of onnxruntime-node gets for a
// dense layer: MLAS kernels, graph optimisation 'all', and B as an initializer, which ORT prepacks
// once at session creation exactly as sonde packs weights once with packGemmWeights.
import ort from 'onnxruntime-node';
import onnxProto from 'onnx-proto';

const { onnx } = onnxProto; // onnx-proto is CommonJS: its namespace is on the default export
const FLOAT = onnx.TensorProto.DataType.FLOAT;
// Opset 17 needs IR version 8 (ONNX 1.12).
const OPSET = 17;
const IR_VERSION = 8;

/** onnxruntime-node's own version, for reports. */
export const version = ort.env.versions?.node ?? 'unknown';

function valueInfo(name, dims) {
  return { name, type: { tensorType: { elemType: FLOAT, shape: { dim: dims.map((d) => ({ dimValue: d })) } } } };
}

function initializer(name, dims, data) {
  // raw_data is little-endian IEEE floats: a view of the Float32Array's bytes (x86 and arm are LE).
  return { name, dataType: FLOAT, dims, rawData: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/**
 * The serialized model for Y = act(A·B + bias), A: [m, k] input, B: [k, n] and bias: [n]
 * initializers. Plain GEMM is a MatMul; with a bias it is a Gemm (C broadcast over rows), and ReLU
 * is a separate Relu node, which ORT's optimiser fuses into FusedGemm as a user's exported model
 * would get it. Returns the bytes of a ModelProto.
 */
export function gemmModel(m, k, n, bData, { biasData = null, relu = false } = {}) {
  if (bData.length !== k * n) throw new Error(`B has ${bData.length} values, expected k*n = ${k * n}`);
  if (biasData && biasData.length !== n) throw new Error(`bias has ${biasData.length} values, expected n = ${n}`);
  const nodes = [];
  const inits = [initializer('B', [k, n], bData)];
  const mm = relu ? 'G' : 'Y';
  if (biasData) {
    inits.push(initializer('bias', [n], biasData));
    nodes.push({ opType: 'Gemm', input: ['A', 'B', 'bias'], output: [mm], name: 'gemm' });
  } else {
    nodes.push({ opType: 'MatMul', input: ['A', 'B'], output: [mm], name: 'matmul' });
  }
  if (relu) nodes.push({ opType: 'Relu', input: [mm], output: ['Y'], name: 'relu' });
  const model = onnx.ModelProto.create({
    irVersion: IR_VERSION,
    producerName: 'sonde-bench',
    opsetImport: [{ domain: '', version: OPSET }],
    graph: {
      name: 'gemm',
      node: nodes,
      initializer: inits,
      input: [valueInfo('A', [m, k])],
      output: [valueInfo('Y', [m, n])],
    },
  });
  return onnx.ModelProto.encode(model).finish();
}

/**
 * Opens a session for act(A·B + bias) on `threads` threads. `b` ([k*n], row-major) and `bias`
 * ([n]) are the weights; the returned run(aData) takes A ([m*k]) and resolves to C ([m*n]).
 */
export async function prepareWith(m, k, n, b, { threads = 1, bias = null, relu = false, spin = true } = {}) {
  const bytes = gemmModel(m, k, n, b, { biasData: bias, relu });
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ['cpu'],
    // intraOpNumThreads counts the calling thread: 1 means no pool, like sonde's threads: 1.
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
    // ORT's pool threads spin after a run by default; that is what users get, but it holds a core
    // while whatever comes next runs, so the gemm suite turns it off (bench/run.js --ort-spin).
    ...(spin ? {} : { extra: { session: { intra_op: { allow_spinning: '0' } } } }),
    logSeverityLevel: 3,
  });
  let released = false;
  return {
    async run(aData) {
      if (aData.length !== m * k) throw new Error(`A has ${aData.length} values, expected m*k = ${m * k}`);
      const out = await session.run({ A: new ort.Tensor('float32', aData, [m, k]) });
      return out.Y.data;
    },
    async release() {
      if (released) return;
      released = true;
      await session.release();
    },
  };
}

/**
 * The suite's entry point: random weights (uniform [-1, 1)) made here, as prepare(m, k, n, opts)
 * in the brief of the gemm suite; `weights` exposes them so the caller can give sonde the same.
 */
export async function prepare(m, k, n, { threads = 1, bias = false, relu = false, spin = true, weights } = {}) {
  const b = weights?.b ?? randomF32(k * n);
  const biasData = bias ? (weights?.bias ?? randomF32(n)) : null;
  const p = await prepareWith(m, k, n, b, { threads, bias: biasData, relu, spin });
  return { ...p, weights: { b, bias: biasData } };
}

function randomF32(len) {
  const a = new Float32Array(len);
  for (let i = 0; i < len; i++) a[i] = Math.random() * 2 - 1;
  return a;
}

const INTS = onnx.AttributeProto.AttributeType.INTS;
const INT = onnx.AttributeProto.AttributeType.INT;

/**
 * The serialized model for Y = [Relu](Conv(X, W, B)) with NCHW X of `xDims`, W [cOut, cIn/group, kh,
 * kw] and B [cOut] as initializers (ORT prepacks them into its blocked NCHWc layout at session
 * creation and fuses Conv + Relu, as for a user's exported CNN).
 */
export function convModel(xDims, wDims, wData, bData, { strides = [1, 1], pads = [0, 0, 0, 0], dilations = [1, 1], group = 1, relu = false } = {}) {
  const [n, , h, w] = xDims;
  const oh = Math.floor((h + pads[0] + pads[2] - ((wDims[2] - 1) * dilations[0] + 1)) / strides[0]) + 1;
  const ow = Math.floor((w + pads[1] + pads[3] - ((wDims[3] - 1) * dilations[1] + 1)) / strides[1]) + 1;
  const nodes = [{
    opType: 'Conv', input: ['X', 'W', 'B'], output: [relu ? 'C' : 'Y'], name: 'conv',
    attribute: [
      { name: 'kernel_shape', type: INTS, ints: [wDims[2], wDims[3]] },
      { name: 'strides', type: INTS, ints: strides },
      { name: 'pads', type: INTS, ints: pads },
      { name: 'dilations', type: INTS, ints: dilations },
      { name: 'group', type: INT, i: group },
    ],
  }];
  if (relu) nodes.push({ opType: 'Relu', input: ['C'], output: ['Y'], name: 'relu' });
  const model = onnx.ModelProto.create({
    irVersion: IR_VERSION,
    producerName: 'sonde-bench',
    opsetImport: [{ domain: '', version: OPSET }],
    graph: {
      name: 'conv',
      node: nodes,
      initializer: [initializer('W', wDims, wData), initializer('B', [wDims[0]], bData)],
      input: [valueInfo('X', xDims)],
      output: [valueInfo('Y', [n, wDims[0], oh, ow])],
    },
  });
  return { bytes: onnx.ModelProto.encode(model).finish(), outDims: [n, wDims[0], oh, ow] };
}

/** A session for convModel on `threads` threads; run(xData) resolves to Y's data. */
export async function prepareConv(xDims, wDims, wData, bData, { threads = 1, spin = true, ...geo } = {}) {
  const { bytes, outDims } = convModel(xDims, wDims, wData, bData, geo);
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ['cpu'],
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
    ...(spin ? {} : { extra: { session: { intra_op: { allow_spinning: '0' } } } }),
    logSeverityLevel: 3,
  });
  let released = false;
  return {
    outDims,
    async run(xData) {
      const out = await session.run({ X: new ort.Tensor('float32', xData, xDims) });
      return out.Y.data;
    },
    async release() {
      if (released) return;
      released = true;
      await session.release();
    },
  };
}

/**
 * A session on a whole model (ONNX bytes) as a user of onnxruntime-node opens it: CPU, `threads`
 * intra-op threads, sequential, the given graph optimisation level ('all' unless told). run(feeds)
 * takes { name: { data, dims } } float32 inputs and resolves to { name: { data, dims } }.
 */
export async function prepareModel(bytes, { threads = 1, spin = true, optimization = 'all' } = {}) {
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ['cpu'],
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: optimization,
    ...(spin ? {} : { extra: { session: { intra_op: { allow_spinning: '0' } } } }),
    logSeverityLevel: 3,
  });
  let released = false;
  return {
    inputNames: session.inputNames,
    outputNames: session.outputNames,
    async run(feeds) {
      const ortFeeds = {};
      for (const [name, t] of Object.entries(feeds)) ortFeeds[name] = new ort.Tensor('float32', t.data, t.dims);
      const out = await session.run(ortFeeds);
      const result = {};
      for (const [name, t] of Object.entries(out)) result[name] = { data: t.data, dims: t.dims.map(Number) };
      return result;
    },
    async release() {
      if (released) return;
      released = true;
      await session.release();
    },
  };
}
