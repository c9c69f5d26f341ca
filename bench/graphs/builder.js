// A small builder of ONNX models on onnx-proto, for tests (operators and whole graphs against
// onnxruntime-node) and for the `models` bench suite, which generates its graphs instead of
// committing large files.
//
//   const g = new GraphBuilder('mlp', { opset: 17 });
//   g.input('x', 'float32', ['batch', 784]);
//   const w = g.init('w', randomTensor([784, 10]));
//   const [y] = g.node('MatMul', ['x', w]);
//   g.output(y, 'float32');
//   const bytes = g.toBytes();
//
// Attributes: an integer number is an INT, any other number a FLOAT; force the type with
// floatAttr(1) / intsAttr([..]) / floatsAttr([..]); an array of integers is INTS; a string is a
// STRING; { dtype, dims, data } is a TENSOR.
import onnxProto from 'onnx-proto';

const { onnx } = onnxProto; // CommonJS: the namespace is on the default export
const DT = onnx.TensorProto.DataType;
const AT = onnx.AttributeProto.AttributeType;

export const ONNX_DTYPE = {
  float32: DT.FLOAT, int64: DT.INT64, int32: DT.INT32, bool: DT.BOOL, uint8: DT.UINT8, int8: DT.INT8,
  float16: DT.FLOAT16, bfloat16: DT.BFLOAT16, float64: DT.DOUBLE,
};

// IR version for each opset (onnx/helper.py's VERSION_TABLE): the lowest that carries it.
function irVersionFor(opset) {
  if (opset <= 8) return 3;
  if (opset <= 9) return 4;
  if (opset <= 10) return 5;
  if (opset <= 11) return 6;
  if (opset <= 14) return 7;
  if (opset <= 18) return 8;
  if (opset <= 20) return 9;
  return 10;
}

const FORCED = Symbol('forcedAttr');
export const floatAttr = (v) => ({ [FORCED]: AT.FLOAT, v });
export const floatsAttr = (v) => ({ [FORCED]: AT.FLOATS, v });
export const intsAttr = (v) => ({ [FORCED]: AT.INTS, v });

function bytesOf(data) {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** A TensorProto from { dtype, dims, data } (data: the dtype's typed array; bool as Uint8Array). */
export function tensorProto(name, t) {
  const dataType = ONNX_DTYPE[t.dtype];
  if (dataType === undefined) throw new Error(`unknown dtype ${t.dtype}`);
  return { name, dataType, dims: t.dims, rawData: bytesOf(t.data) };
}

function attribute(name, value) {
  if (value && value[FORCED] !== undefined) {
    const type = value[FORCED];
    if (type === AT.FLOAT) return { name, type, f: value.v };
    if (type === AT.FLOATS) return { name, type, floats: value.v };
    return { name, type, ints: value.v };
  }
  if (typeof value === 'number') {
    return Number.isInteger(value) ? { name, type: AT.INT, i: value } : { name, type: AT.FLOAT, f: value };
  }
  if (typeof value === 'string') return { name, type: AT.STRING, s: new TextEncoder().encode(value) };
  if (Array.isArray(value)) {
    if (value.every((v) => typeof v === 'string')) return { name, type: AT.STRINGS, strings: value.map((s) => new TextEncoder().encode(s)) };
    return value.every(Number.isInteger) ? { name, type: AT.INTS, ints: value } : { name, type: AT.FLOATS, floats: value };
  }
  if (value && value.dtype && value.dims && value.data) return { name, type: AT.TENSOR, t: tensorProto('', value) };
  throw new Error(`attribute ${name}: cannot encode ${String(value)}`);
}

function valueInfo(name, dtype, dims) {
  const tensorType = { elemType: ONNX_DTYPE[dtype] ?? DT.FLOAT };
  if (dims) tensorType.shape = { dim: dims.map((d) => (typeof d === 'string' ? { dimParam: d } : d === null ? {} : { dimValue: d })) };
  return { name, type: { tensorType } };
}

export class GraphBuilder {
  constructor(name = 'graph', { opset = 17, irVersion, producer = 'sonde-builder', extraOpsets = {} } = {}) {
    this.name = name;
    this.opset = opset;
    this.irVersion = irVersion ?? irVersionFor(opset);
    this.producer = producer;
    this.extraOpsets = extraOpsets;
    this.inputs = [];
    this.outputs = [];
    this.initializers = [];
    this.nodes = [];
    this.counter = 0;
  }

  /** A fresh value name with `prefix`. */
  fresh(prefix = 'v') {
    return `${prefix}_${this.counter++}`;
  }

  /** dims: numbers, strings (symbolic) or null (unknown); omit for unknown rank. */
  input(name, dtype = 'float32', dims) {
    this.inputs.push(valueInfo(name, dtype, dims));
    return name;
  }

  output(name, dtype = 'float32', dims) {
    this.outputs.push(valueInfo(name, dtype, dims));
    return name;
  }

  /** An initializer { dtype, dims, data }; returns its name. */
  init(name, t) {
    this.initializers.push(tensorProto(name, t));
    return name;
  }

  /**
   * Adds a node; `outputs` is a list of names or a count of fresh names. Returns the output names.
   * options: { name, domain }.
   */
  node(opType, inputs, attrs = {}, outputs = 1, { name, domain = '' } = {}) {
    const outs = typeof outputs === 'number' ? Array.from({ length: outputs }, () => this.fresh(opType.toLowerCase())) : outputs;
    this.nodes.push({
      opType, domain, name: name ?? `${opType}_${this.nodes.length}`, input: inputs, output: outs,
      attribute: Object.entries(attrs).filter(([, v]) => v !== undefined).map(([k, v]) => attribute(k, v)),
    });
    return outs;
  }

  toProto() {
    return onnx.ModelProto.create({
      irVersion: this.irVersion,
      producerName: this.producer,
      opsetImport: [{ domain: '', version: this.opset }, ...Object.entries(this.extraOpsets).map(([domain, version]) => ({ domain, version }))],
      graph: { name: this.name, node: this.nodes, initializer: this.initializers, input: this.inputs, output: this.outputs },
    });
  }

  toBytes() {
    return onnx.ModelProto.encode(this.toProto()).finish();
  }
}

/** A deterministic generator (mulberry32), so generated models and inputs are reproducible. */
export function rng(seed = 1) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** float32 tensor of `dims`, uniform in [-scale, scale). */
export function randomTensor(dims, { scale = 1, seed = 1, random } = {}) {
  const r = random ?? rng(seed);
  const n = dims.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = (r() * 2 - 1) * scale;
  return { dtype: 'float32', dims, data };
}

export function int64Tensor(values, dims = [values.length]) {
  return { dtype: 'int64', dims, data: BigInt64Array.from(values.map((v) => BigInt(v))) };
}

export function float32Tensor(values, dims = [values.length]) {
  return { dtype: 'float32', dims, data: Float32Array.from(values) };
}
