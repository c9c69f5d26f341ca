/**
 * ONNX model files -> sonde's graph IR. Decoding is protobufjs (the onnx-proto package); this file
 * turns the messages into plain, validated structures: tensors as sonde Tensors, attributes as JS
 * values, nodes in topological order. Every malformed input is a ModelFormatError that says what
 * and where; nothing here assumes the file is well formed.
 */
import { readFileSync, statSync } from 'node:fs';
import { isAbsolute, join, normalize, relative, sep } from 'node:path';
import { createRequire } from 'node:module';
import { ModelFormatError, UnsupportedOperatorError } from '../errors.js';
import { Tensor, type DType } from '../tensor.js';

const require = createRequire(import.meta.url);
let onnxProto: unknown;
/**
 * onnx-proto's generated namespace `onnx` (a CommonJS package), loaded on first use: it takes about
 * 30 ms, nearly half of importing sonde, which language-model and kernel users never need.
 */
export function loadOnnxProto(): unknown {
  return (onnxProto ??= (require('onnx-proto') as { onnx: unknown }).onnx);
}
const onnx = (): OnnxNamespace => loadOnnxProto() as OnnxNamespace;

/** Default-domain opsets sonde understands. */
export const MIN_OPSET = 7;
export const MAX_OPSET = 21;

export type Dim = number | string | null;

export interface ValueInfo {
  name: string;
  /** Absent when the model does not say (or uses a type sonde has no dtype for). */
  dtype?: DType;
  /** Absent for unknown rank; a string is a symbolic dim (`dim_param`), null an unknown one. */
  shape?: Dim[];
}

export type AttributeValue = number | string | Tensor | OnnxGraph | number[] | string[] | Tensor[];

export interface OnnxNode {
  /** The node's name, or `<opType>#<index>` when the model leaves it empty. */
  name: string;
  opType: string;
  /** '' for the default ONNX domain (also written 'ai.onnx'). */
  domain: string;
  /** '' marks an absent optional input. */
  inputs: string[];
  outputs: string[];
  attributes: Record<string, AttributeValue>;
}

export interface OnnxGraph {
  name: string;
  inputs: ValueInfo[];
  outputs: ValueInfo[];
  initializers: Map<string, Tensor>;
  /** Topologically sorted: every node comes after the producers of its inputs. */
  nodes: OnnxNode[];
  valueInfo: Map<string, ValueInfo>;
}

export interface OnnxModel {
  irVersion: number;
  /** Opset of the default domain. */
  opset: number;
  opsets: Record<string, number>;
  producer: string;
  graph: OnnxGraph;
}

export interface ParseOptions {
  /** Folder that external-data paths are relative to (the model file's folder). */
  baseDir?: string;
  /** Where the bytes came from, for messages. */
  source?: string;
}

/** Decodes and validates an ONNX ModelProto. */
export function parseModel(bytes: Uint8Array, options: ParseOptions = {}): OnnxModel {
  const where = options.source ?? 'the model';
  let proto: ProtoModel;
  try {
    proto = onnx().ModelProto.decode(bytes);
  } catch (err) {
    throw new ModelFormatError(`${where} is not a valid ONNX file: protobuf decoding failed (${(err as Error).message})`, { cause: err });
  }
  if (!proto.graph) throw new ModelFormatError(`${where} is not an ONNX model: it has no graph`);
  const irVersion = toInt(proto.irVersion, 'ir_version', where);
  if (irVersion <= 0) throw new ModelFormatError(`${where} is not an ONNX model: ir_version is missing`);
  const opsets: Record<string, number> = {};
  for (const o of proto.opsetImport ?? []) opsets[normDomain(o.domain ?? '')] = toInt(o.version, 'opset_import.version', where);
  // IR version 3 models may omit opset_import for the default domain; ONNX reads that as opset 1.
  const opset = opsets[''] ?? 1;
  if (opset > MAX_OPSET) {
    throw new ModelFormatError(`${where} uses ONNX opset ${opset}, newer than the newest sonde supports (${MAX_OPSET})`);
  }
  if (opset < MIN_OPSET) {
    throw new ModelFormatError(`${where} uses ONNX opset ${opset}; sonde supports opsets ${MIN_OPSET} to ${MAX_OPSET} (convert it with onnx.version_converter)`);
  }
  const graph = convertGraph(proto.graph, { baseDir: options.baseDir, where }, new Set());
  return { irVersion, opset, opsets, producer: `${proto.producerName ?? ''} ${proto.producerVersion ?? ''}`.trim(), graph };
}

/**
 * Checks every node against `supported` and throws one UnsupportedOperatorError listing all the
 * unsupported nodes (op type, domain, node name), so a model fails at load, never at run time.
 */
export function checkSupported(graph: OnnxGraph, supported: (domain: string, opType: string) => boolean): void {
  const bad = graph.nodes.filter((n) => !supported(n.domain, n.opType));
  if (bad.length === 0) return;
  const list = bad.map((n) => `${n.domain ? `${n.domain}.` : ''}${n.opType} (node '${n.name}')`);
  throw new UnsupportedOperatorError(
    `the model uses ${bad.length} node${bad.length === 1 ? '' : 's'} sonde does not support: ${list.join(', ')}`);
}

// ---------------------------------------------------------------------------------------------

interface Ctx { baseDir?: string; where: string }

function normDomain(d: string): string {
  return d === 'ai.onnx' ? '' : d;
}

function toInt(v: LongLike | number | null | undefined, field: string, where: string): number {
  if (v === null || v === undefined) return 0;
  const n = typeof v === 'number' ? v : Number(v.toString());
  if (!Number.isFinite(n)) throw new ModelFormatError(`${where}: ${field} is not a number`);
  return n;
}

/** int64 -> number; beyond 2^53 the nearest double (INT64_MAX, used as "to the end", stays huge). */
function int64(v: LongLike | number): number {
  return typeof v === 'number' ? v : Number(v.toString());
}

const DTYPE_OF: Record<number, DType> = { 1: 'float32', 2: 'uint8', 3: 'int8', 6: 'int32', 7: 'int64', 9: 'bool', 10: 'float16', 16: 'bfloat16' };
const typeName = (t: number): string | undefined => Object.entries(onnx().TensorProto.DataType).find(([, v]) => v === t)?.[0];

function convertGraph(g: ProtoGraph, ctx: Ctx, outer: Set<string>): OnnxGraph {
  const where = ctx.where;
  const initializers = new Map<string, Tensor>();
  for (const t of g.initializer ?? []) {
    if (!t.name) throw new ModelFormatError(`${where}: an initializer has no name`);
    if (initializers.has(t.name)) throw new ModelFormatError(`${where}: initializer '${t.name}' is defined twice`);
    initializers.set(t.name, convertTensor(t, ctx, `initializer '${t.name}'`));
  }
  (g.sparseInitializer ?? []).forEach((st, i) => {
    const name = st.values?.name ?? '';
    if (!name) throw new ModelFormatError(`${where}: sparse initializer #${i} has no name (its values tensor names it)`);
    if (initializers.has(name)) throw new ModelFormatError(`${where}: initializer '${name}' is defined twice`);
    initializers.set(name, densifySparse(st, ctx, `sparse initializer '${name}'`));
  });
  const valueInfo = new Map<string, ValueInfo>();
  for (const vi of g.valueInfo ?? []) valueInfo.set(vi.name ?? '', convertValueInfo(vi));
  const inputs = (g.input ?? []).map(convertValueInfo);
  const outputs = (g.output ?? []).map(convertValueInfo);
  const nodes: OnnxNode[] = (g.node ?? []).map((n, i) => {
    const opType = n.opType ?? '';
    if (!opType) throw new ModelFormatError(`${where}: node #${i}${n.name ? ` '${n.name}'` : ''} has no op_type`);
    const node: OnnxNode = {
      name: n.name || `${opType}#${i}`,
      opType,
      domain: normDomain(n.domain ?? ''),
      inputs: [...(n.input ?? [])],
      outputs: [...(n.output ?? [])],
      attributes: {},
    };
    for (const a of n.attribute ?? []) {
      if (!a.name) throw new ModelFormatError(`${where}: node '${node.name}' has an attribute with no name`);
      node.attributes[a.name] = convertAttribute(a, ctx, `attribute '${a.name}' of node '${node.name}'`, outer, initializers, inputs);
    }
    return node;
  });
  return { name: g.name ?? '', inputs, outputs, initializers, nodes: topoSort(nodes, inputs, outputs, initializers, outer, where), valueInfo };
}

function convertValueInfo(vi: ProtoValueInfo): ValueInfo {
  const out: ValueInfo = { name: vi.name ?? '' };
  const tt = vi.type?.tensorType;
  if (tt) {
    const dt = DTYPE_OF[tt.elemType ?? 0];
    if (dt) out.dtype = dt;
    if (tt.shape) {
      // Dimension is a oneof: decoded messages carry only the field that was set as an own
      // property (the other reads its default through the prototype).
      out.shape = (tt.shape.dim ?? []).map((d): Dim => {
        if (d.dimParam) return d.dimParam;
        if (Object.prototype.hasOwnProperty.call(d, 'dimValue') && d.dimValue !== null && d.dimValue !== undefined) return int64(d.dimValue);
        return null;
      });
    }
  }
  return out;
}

function convertTensor(t: ProtoTensor, ctx: Ctx, what: string): Tensor {
  const where = ctx.where;
  const dims = (t.dims ?? []).map((d, i) => {
    const v = int64(d);
    if (!Number.isSafeInteger(v) || v < 0) throw new ModelFormatError(`${where}: ${what} has an invalid dims[${i}] = ${d}`);
    return v;
  });
  const size = dims.reduce((a, b) => a * b, 1);
  if (!Number.isSafeInteger(size)) throw new ModelFormatError(`${where}: ${what} is too large`);
  const dtype = DTYPE_OF[t.dataType ?? 0];
  if (!dtype) {
    throw new ModelFormatError(`${where}: ${what} has data type ${typeName(t.dataType ?? 0) ?? t.dataType}, which sonde does not support`);
  }
  const ctor = STORAGE[dtype];
  let raw: Uint8Array | undefined;
  if (t.dataLocation === 1) {
    raw = readExternal(t, ctx, what);
  } else if (t.rawData && t.rawData.length > 0) {
    raw = t.rawData;
  }
  let data: TensorStorage;
  if (raw) {
    const want = size * ctor.BYTES_PER_ELEMENT;
    if (raw.length !== want) {
      throw new ModelFormatError(`${where}: ${what} has ${raw.length} bytes of data, but dims [${dims.join(', ')}] of ${dtype} need ${want}`);
    }
    // A copy: raw_data may sit at any byte offset of the file, and typed arrays need alignment.
    const copy = new Uint8Array(want);
    copy.set(raw);
    data = new ctor(copy.buffer, 0, size) as TensorStorage;
  } else {
    const src = typedField(t, dtype);
    if (src.length !== size) {
      throw new ModelFormatError(`${where}: ${what} has ${src.length} values, but dims [${dims.join(', ')}] need ${size}`);
    }
    data = new ctor(size) as TensorStorage;
    for (let i = 0; i < size; i++) {
      (data as unknown as Record<number, number | bigint>)[i] = dtype === 'int64' ? BigInt((src[i] as LongLike | number).toString()) : Number(src[i]);
    }
  }
  return new Tensor(dtype, data as never, dims);
}

/**
 * A SparseTensorProto as the dense tensor it stands for. Sessions see weights dense with explicit
 * zeros and choose a sparse kernel per layer themselves, so a sparse initializer and its dense twin
 * compile the same. ONNX stores the non-zeros as `values` [nnz] plus `indices`, either [nnz]
 * linear positions or [nnz, rank] coordinates, in both cases sorted: that order is checked rather
 * than assumed, as onnxruntime checks it, because an out-of-order or repeated index would silently
 * overwrite a value.
 */
function densifySparse(st: ProtoSparseTensor, ctx: Ctx, what: string): Tensor {
  const where = ctx.where;
  if (!st.values) throw new ModelFormatError(`${where}: ${what} has no values tensor`);
  const dims = (st.dims ?? []).map((d, i) => {
    const v = int64(d);
    if (!Number.isSafeInteger(v) || v < 0) throw new ModelFormatError(`${where}: ${what} has an invalid dims[${i}] = ${d}`);
    return v;
  });
  const size = dims.reduce((a, b) => a * b, 1);
  if (!Number.isSafeInteger(size) || size > 2 ** 32) throw new ModelFormatError(`${where}: ${what} is too large`);
  const values = convertTensor(st.values, ctx, `the values of ${what}`);
  if (values.dims.length !== 1) {
    throw new ModelFormatError(`${where}: the values of ${what} must be 1-D [nnz], got dims [${values.dims.join(', ')}]`);
  }
  const nnz = values.dims[0]!;
  if (nnz > size) throw new ModelFormatError(`${where}: ${what} has ${nnz} values but its dims [${dims.join(', ')}] hold only ${size} elements`);
  const dense = new STORAGE[values.dtype](size) as TensorStorage;
  if (nnz > 0) {
    if (!st.indices) throw new ModelFormatError(`${where}: ${what} has ${nnz} values but no indices tensor`);
    const idx = convertTensor(st.indices, ctx, `the indices of ${what}`);
    if (idx.dtype !== 'int64' && idx.dtype !== 'int32') {
      throw new ModelFormatError(`${where}: the indices of ${what} must be int64 (or int32), got ${idx.dtype}`);
    }
    const rank = dims.length;
    const linear = idx.dims.length === 1;
    if (!(linear && idx.dims[0] === nnz) && !(idx.dims.length === 2 && idx.dims[0] === nnz && idx.dims[1] === rank)) {
      throw new ModelFormatError(
        `${where}: the indices of ${what} must have dims [${nnz}] or [${nnz}, ${rank}] to match its ${nnz} values, got [${idx.dims.join(', ')}]`);
    }
    const raw = idx.data as BigInt64Array | Int32Array;
    const at = (i: number) => Number(raw[i]!);
    const src = values.data as unknown as ArrayLike<number | bigint>;
    const dst = dense as unknown as Record<number, number | bigint>;
    let prev = -1;
    for (let i = 0; i < nnz; i++) {
      let pos: number;
      if (linear) {
        pos = at(i);
        if (!Number.isSafeInteger(pos) || pos < 0 || pos >= size) {
          throw new ModelFormatError(`${where}: ${what} index ${i} is ${raw[i]}, out of range [0, ${size}) for dims [${dims.join(', ')}]`);
        }
      } else {
        pos = 0;
        for (let a = 0; a < rank; a++) {
          const c = at(i * rank + a);
          if (!Number.isSafeInteger(c) || c < 0 || c >= dims[a]!) {
            throw new ModelFormatError(`${where}: ${what} index ${i} has coordinate ${raw[i * rank + a]} on axis ${a}, out of range [0, ${dims[a]})`);
          }
          pos = pos * dims[a]! + c;
        }
      }
      if (pos <= prev) {
        throw new ModelFormatError(
          `${where}: the indices of ${what} must be sorted and distinct, but index ${i} (position ${pos}) follows position ${prev}`);
      }
      prev = pos;
      dst[pos] = src[i]!;
    }
  }
  return new Tensor(values.dtype, dense as never, dims);
}

function typedField(t: ProtoTensor, dtype: DType): ArrayLike<number | LongLike> {
  switch (dtype) {
    case 'float32': return t.floatData ?? [];
    case 'int64': return t.int64Data ?? [];
    // int32_data carries int32, int8, uint8, bool, and the bits of float16 / bfloat16.
    default: return t.int32Data ?? [];
  }
}

function readExternal(t: ProtoTensor, ctx: Ctx, what: string): Uint8Array {
  const where = ctx.where;
  const kv: Record<string, string> = {};
  for (const e of t.externalData ?? []) kv[e.key ?? ''] = e.value ?? '';
  const location = kv.location;
  if (!location) throw new ModelFormatError(`${where}: ${what} is stored externally but names no location`);
  if (!ctx.baseDir) {
    throw new ModelFormatError(`${where}: ${what} is stored in external file '${location}'; load the model from its path so the file can be found`);
  }
  // The path must stay inside the model's folder (as onnxruntime requires), so a model file cannot
  // make sonde read arbitrary files.
  const full = normalize(join(ctx.baseDir, location));
  const rel = relative(ctx.baseDir, full);
  if (isAbsolute(location) || rel.startsWith('..') || rel.split(sep).includes('..')) {
    throw new ModelFormatError(`${where}: ${what} names external file '${location}' outside the model's folder`);
  }
  let size: number;
  try {
    size = statSync(full).size;
  } catch {
    throw new ModelFormatError(`${where}: ${what} is stored in external file '${location}', which does not exist in ${ctx.baseDir}`);
  }
  const offset = kv.offset ? Number(kv.offset) : 0;
  const length = kv.length ? Number(kv.length) : size - offset;
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new ModelFormatError(`${where}: ${what} reads bytes [${kv.offset ?? 0}, +${kv.length ?? 'rest'}) of '${location}', which has ${size} bytes`);
  }
  const buf = readFileSync(full);
  return new Uint8Array(buf.buffer, buf.byteOffset + offset, length);
}

function convertAttribute(a: ProtoAttribute, ctx: Ctx, what: string, outer: Set<string>, inits: Map<string, Tensor>,
  inputs: ValueInfo[]): AttributeValue {
  const T = onnx().AttributeProto.AttributeType;
  const dec = new TextDecoder('utf-8');
  switch (a.type) {
    case T.FLOAT: return a.f ?? 0;
    case T.INT: return int64(a.i ?? 0);
    case T.STRING: return dec.decode(a.s ?? new Uint8Array());
    case T.TENSOR:
      if (!a.t) throw new ModelFormatError(`${ctx.where}: ${what} is a TENSOR attribute with no tensor`);
      return convertTensor(a.t, ctx, what);
    case T.GRAPH: {
      if (!a.g) throw new ModelFormatError(`${ctx.where}: ${what} is a GRAPH attribute with no graph`);
      // A subgraph may read any value visible in the enclosing scope.
      const scope = new Set([...outer, ...inits.keys(), ...inputs.map((i) => i.name)]);
      return convertGraph(a.g, ctx, scope);
    }
    case T.FLOATS: return [...(a.floats ?? [])];
    case T.INTS: return (a.ints ?? []).map(int64);
    case T.STRINGS: return (a.strings ?? []).map((s) => dec.decode(s));
    case T.TENSORS: return (a.tensors ?? []).map((t, i) => convertTensor(t, ctx, `${what}[${i}]`));
    default:
      throw new ModelFormatError(`${ctx.where}: ${what} has attribute type ${a.type ?? 'UNDEFINED'}, which sonde does not support`);
  }
}

/** Kahn's algorithm; also checks that every input a node reads exists and that nothing is produced twice. */
function topoSort(nodes: OnnxNode[], inputs: ValueInfo[], outputs: ValueInfo[], inits: Map<string, Tensor>,
  outer: Set<string>, where: string): OnnxNode[] {
  const producer = new Map<string, number>();
  nodes.forEach((n, i) => {
    for (const o of n.outputs) {
      if (!o) continue;
      if (producer.has(o)) {
        throw new ModelFormatError(`${where}: value '${o}' is produced by both node '${nodes[producer.get(o)!]!.name}' and node '${n.name}'`);
      }
      producer.set(o, i);
    }
  });
  const available = new Set<string>([...outer, ...inits.keys(), ...inputs.map((i) => i.name)]);
  const indegree = new Array<number>(nodes.length).fill(0);
  const consumers = new Map<number, number[]>();
  nodes.forEach((n, i) => {
    for (const v of new Set(n.inputs)) {
      if (!v) continue;
      const p = producer.get(v);
      if (p === undefined) {
        if (!available.has(v)) {
          throw new ModelFormatError(
            `${where}: node '${n.name}' (${n.opType}) reads '${v}', which is not a graph input, an initializer or any node's output (a missing initializer?)`);
        }
        continue;
      }
      indegree[i]!++;
      if (!consumers.has(p)) consumers.set(p, []);
      consumers.get(p)!.push(i);
    }
  });
  const order: number[] = [];
  const ready = indegree.flatMap((d, i) => (d === 0 ? [i] : []));
  while (ready.length) {
    const i = ready.shift()!;
    order.push(i);
    for (const c of consumers.get(i) ?? []) if (--indegree[c]! === 0) ready.push(c);
  }
  if (order.length !== nodes.length) {
    const stuck = nodes.filter((_, i) => indegree[i]! > 0).map((n) => `'${n.name}'`);
    throw new ModelFormatError(`${where}: the graph has a cycle through nodes ${stuck.slice(0, 10).join(', ')}${stuck.length > 10 ? ', ...' : ''}`);
  }
  for (const o of outputs) {
    if (!producer.has(o.name) && !available.has(o.name)) {
      throw new ModelFormatError(`${where}: graph output '${o.name}' is not produced by any node`);
    }
  }
  return order.map((i) => nodes[i]!);
}

type TensorStorage = Float32Array | Uint8Array | Int8Array | Int32Array | BigInt64Array | Uint16Array;
const STORAGE: Record<DType, { new (n: number): TensorStorage; new (b: ArrayBuffer, o: number, n: number): TensorStorage; BYTES_PER_ELEMENT: number }> = {
  float32: Float32Array, uint8: Uint8Array, int8: Int8Array, int32: Int32Array, int64: BigInt64Array,
  bool: Uint8Array, float16: Uint16Array, bfloat16: Uint16Array,
};

// The parts of onnx-proto's generated types this file reads (its .d.ts types int64 as number|Long).
interface LongLike { toString(): string }
interface ProtoTensor {
  name?: string | null; dims?: (number | LongLike)[] | null; dataType?: number | null; rawData?: Uint8Array | null;
  floatData?: number[] | null; int32Data?: number[] | null; int64Data?: (number | LongLike)[] | null;
  dataLocation?: number | null; externalData?: { key?: string | null; value?: string | null }[] | null;
}
interface ProtoSparseTensor { values?: ProtoTensor | null; indices?: ProtoTensor | null; dims?: (number | LongLike)[] | null }
interface ProtoAttribute {
  name?: string | null; type?: number | null; f?: number | null; i?: number | LongLike | null; s?: Uint8Array | null;
  t?: ProtoTensor | null; g?: ProtoGraph | null; floats?: number[] | null; ints?: (number | LongLike)[] | null;
  strings?: Uint8Array[] | null; tensors?: ProtoTensor[] | null;
}
interface ProtoValueInfo {
  name?: string | null;
  type?: { tensorType?: { elemType?: number | null; shape?: { dim?: { dimValue?: number | LongLike | null; dimParam?: string | null }[] | null } | null } | null } | null;
}
interface ProtoGraph {
  name?: string | null; node?: { name?: string | null; opType?: string | null; domain?: string | null; input?: string[] | null;
    output?: string[] | null; attribute?: ProtoAttribute[] | null }[] | null;
  initializer?: ProtoTensor[] | null; sparseInitializer?: ProtoSparseTensor[] | null;
  input?: ProtoValueInfo[] | null; output?: ProtoValueInfo[] | null; valueInfo?: ProtoValueInfo[] | null;
}
interface ProtoModel {
  irVersion?: number | LongLike | null; opsetImport?: { domain?: string | null; version?: number | LongLike | null }[] | null;
  producerName?: string | null; producerVersion?: string | null; graph?: ProtoGraph | null;
}
interface OnnxNamespace {
  ModelProto: { decode(b: Uint8Array): ProtoModel; encode(m: object): { finish(): Uint8Array } };
  TensorProto: { DataType: Record<string, number> };
  AttributeProto: { AttributeType: Record<string, number> };
}
