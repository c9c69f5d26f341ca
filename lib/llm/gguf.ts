/**
 * sonde.gguf: read and write GGUF files (the llama.cpp model format, versions 2 and 3).
 *
 * read(path) memory-maps the file in native code and validates every length and offset against the
 * file size before anything is returned (a malformed file is a ModelFormatError that says what was
 * wrong and at which offset). Tensor data stays in the mapping: nothing is copied into the JS heap,
 * and the tensors of a GgufFile can be passed straight to kernels.quantMatmul().
 *
 * Metadata values: integers up to 32 bits, floats and bools are numbers / booleans; uint64 and
 * int64 are numbers when |v| <= Number.MAX_SAFE_INTEGER and bigints beyond; strings are decoded as
 * UTF-8 (invalid sequences become U+FFFD); arrays are plain arrays (nested ones too).
 * `metadataTypes[key]` gives the stored type ('uint32', 'array<string>', 'array<array<int32>>').
 *
 * write(path, { metadata, tensors }) writes a v3 file: metadata of any GGUF type (inferred, or given
 * with gguf.typed()) and tensors of type f32, f16, bf16, q8_0 or q4_0, quantised from float32 with
 * ggml's reference formulas (lib/llm/quants.ts), each aligned to general.alignment (default 32).
 */
import { open, rm } from 'node:fs/promises';
import { native, type NativeGgufHandle, type NativeGgufOpenResult } from '../binding.js';
import { InvalidArgumentError, callNative } from '../errors.js';
import { NativeResource } from '../lifetime.js';
import { describe } from '../validate.js';
import { encode, encodedBytes, type EncodableType } from './quants.js';

export type GgufScalarType =
  | 'uint8' | 'int8' | 'uint16' | 'int16' | 'uint32' | 'int32' | 'uint64' | 'int64'
  | 'float32' | 'float64' | 'bool' | 'string';
/** A scalar type name or `array<T>` with T any type name (arrays nest). */
export type GgufValueType = GgufScalarType | `array<${string}>`;
export type GgufValue = number | bigint | boolean | string | GgufValue[];

/** The tensor types sonde's writer encodes and its kernels read. */
export type GgufTensorType = EncodableType;
export const GGUF_TENSOR_TYPES: readonly GgufTensorType[] = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'];

/** One tensor of a mapped file. Pass it to kernels.quantMatmul() as the weights (zero-copy). */
export class GgufTensor {
  readonly name: string;
  /** GGUF order: ne0 (the contiguous dimension) first. A weight matrix of N rows of K is [K, N]. */
  readonly dims: readonly number[];
  /** ggml's type name: 'f32', 'f16', 'bf16', 'q8_0', 'q4_0', 'q4_K', ... */
  readonly type: string;
  readonly typeId: number;
  /** Offset in the data section (the file offset is file.dataOffset + offset). */
  readonly offset: number;
  readonly bytes: number;
  readonly elements: number;
  readonly file: GgufFile;
  readonly #index: number;

  /** @internal */
  constructor(file: GgufFile, index: number, t: NativeGgufOpenResult['tensors'][number]) {
    this.file = file;
    this.#index = index;
    this.name = t.name;
    this.dims = Object.freeze([...t.dims]);
    this.type = t.type;
    this.typeId = t.typeId;
    this.offset = t.offset;
    this.bytes = t.bytes;
    this.elements = t.elements;
  }

  /** @internal the native handle and this tensor's index in it. */
  nativeRef(where: string): [NativeGgufHandle, number] {
    return [this.file.handle(where), this.#index];
  }
}

export interface GgufInfo {
  /** general.architecture ('llama', 'qwen2', 'qwen2moe', ...), if present. */
  architecture?: string;
  name?: string;
  /** Sum of the element counts of all tensors. */
  parameterCount: number;
  /** Tensor count per ggml type, e.g. { q8_0: 169, f32: 65 }. */
  tensorTypes: Record<string, number>;
  /** Bytes of tensor data per ggml type. */
  tensorBytes: Record<string, number>;
  /** `<arch>.*` keys of the llama family, when present. */
  contextLength?: number;
  embeddingLength?: number;
  blockCount?: number;
  feedForwardLength?: number;
  headCount?: number;
  headCountKv?: number;
  expertCount?: number;
  expertUsedCount?: number;
}

/** A memory-mapped GGUF file. dispose() unmaps it (a kernel still running on it keeps it mapped until it finishes). */
export class GgufFile extends NativeResource {
  readonly path: string;
  readonly version: number;
  readonly metadata: Readonly<Record<string, GgufValue>>;
  readonly metadataTypes: Readonly<Record<string, GgufValueType>>;
  readonly tensors: readonly GgufTensor[];
  readonly alignment: number;
  /** File offset of the tensor data section. */
  readonly dataOffset: number;
  readonly fileSize: number;
  /**
   * Bytes mapped (the whole file). Not reported to V8 as external memory: the pages are file-backed
   * and clean, so the kernel reclaims them under pressure without swap, and counting a multi-GB
   * model would make V8 run full collections that cannot free any of it.
   */
  readonly mappedBytes: number;
  readonly info: GgufInfo;
  #handle: NativeGgufHandle;
  #byName = new Map<string, GgufTensor>();

  /** @internal use gguf.read() */
  constructor(path: string, r: NativeGgufOpenResult) {
    super();
    this.path = path;
    this.#handle = r.handle;
    this.version = r.version;
    this.metadata = r.metadata as Record<string, GgufValue>;
    this.metadataTypes = r.metadataTypes as Record<string, GgufValueType>;
    this.alignment = r.alignment;
    this.dataOffset = r.dataOffset;
    this.fileSize = r.fileSize;
    this.mappedBytes = r.fileSize;
    this.tensors = Object.freeze(r.tensors.map((t, i) => new GgufTensor(this, i, t)));
    for (const t of this.tensors) this.#byName.set(t.name, t);
    this.info = summarise(this.metadata, this.tensors);
  }

  /** The tensor named `name`, or undefined. */
  tensor(name: string): GgufTensor | undefined {
    this.checkAlive('GgufFile.tensor');
    return this.#byName.get(name);
  }

  /** @internal */
  handle(where: string): NativeGgufHandle {
    this.checkAlive(where);
    return this.#handle;
  }

  protected release(): void {
    this.#handle.dispose();
  }
}

function num(v: GgufValue | undefined): number | undefined {
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  return undefined;
}

function summarise(md: Readonly<Record<string, GgufValue>>, tensors: readonly GgufTensor[]): GgufInfo {
  const arch = typeof md['general.architecture'] === 'string' ? md['general.architecture'] : undefined;
  const tensorTypes: Record<string, number> = {};
  const tensorBytes: Record<string, number> = {};
  let parameterCount = 0;
  for (const t of tensors) {
    parameterCount += t.elements;
    tensorTypes[t.type] = (tensorTypes[t.type] ?? 0) + 1;
    tensorBytes[t.type] = (tensorBytes[t.type] ?? 0) + t.bytes;
  }
  const info: GgufInfo = { architecture: arch, parameterCount, tensorTypes, tensorBytes };
  if (typeof md['general.name'] === 'string') info.name = md['general.name'];
  if (arch) {
    const keys: [keyof GgufInfo, string][] = [
      ['contextLength', 'context_length'], ['embeddingLength', 'embedding_length'], ['blockCount', 'block_count'],
      ['feedForwardLength', 'feed_forward_length'], ['headCount', 'attention.head_count'],
      ['headCountKv', 'attention.head_count_kv'], ['expertCount', 'expert_count'], ['expertUsedCount', 'expert_used_count'],
    ];
    for (const [field, key] of keys) {
      const v = num(md[`${arch}.${key}`]);
      if (v !== undefined) (info as unknown as Record<string, number>)[field] = v;
    }
  }
  return info;
}

/** Maps and validates a GGUF file (v2 or v3). Rejects with ModelFormatError for a malformed file. */
export async function read(path: string): Promise<GgufFile> {
  const site = new Error();
  if (typeof path !== 'string' || path.length === 0) {
    throw new InvalidArgumentError(`gguf.read(path): path must be a non-empty string, got ${describe(path)}`);
  }
  const r = await callNative(() => native().ggufOpen(path), site);
  return new GgufFile(path, r);
}

// ---------------------------------------------------------------------------------------------
// Writer

const SCALAR_IDS: Record<GgufScalarType, number> = {
  uint8: 0, int8: 1, uint16: 2, int16: 3, uint32: 4, int32: 5, float32: 6, bool: 7, string: 8,
  uint64: 10, int64: 11, float64: 12,
};
const ARRAY_ID = 9;
const GGML_TYPE_IDS: Record<GgufTensorType, number> = { f32: 0, f16: 1, q4_0: 2, q8_0: 8, bf16: 30 };
const INT_RANGES: Partial<Record<GgufScalarType, [number, number]>> = {
  uint8: [0, 255], int8: [-128, 127], uint16: [0, 65535], int16: [-32768, 32767],
  uint32: [0, 4294967295], int32: [-2147483648, 2147483647],
};

/** A metadata value with an explicit GGUF type (plain values have their type inferred). */
export class GgufTypedValue {
  constructor(readonly type: GgufValueType, readonly value: unknown) {}
}

/** `gguf.typed('uint64', 5n)`, `gguf.typed('array<int32>', [1, 2])`: store value as that GGUF type. */
export function typed(type: GgufValueType, value: unknown): GgufTypedValue {
  parseType('gguf.typed(type)', type);
  return new GgufTypedValue(type, value);
}

type ParsedType = { scalar: GgufScalarType } | { array: ParsedType };

function parseType(where: string, t: unknown): ParsedType {
  if (typeof t !== 'string') throw new InvalidArgumentError(`${where} must be a GGUF type name, got ${describe(t)}`);
  if (t in SCALAR_IDS) return { scalar: t as GgufScalarType };
  const m = /^array<(.+)>$/.exec(t);
  if (m) return { array: parseType(where, m[1]) };
  throw new InvalidArgumentError(`${where}: unknown GGUF type ${describe(t)} (scalars: ${Object.keys(SCALAR_IDS).join(', ')}; arrays: array<T>)`);
}

function typeName(t: ParsedType): string {
  return 'scalar' in t ? t.scalar : `array<${typeName(t.array)}>`;
}

/**
 * Type of a plain value: string -> string, boolean -> bool, bigint -> int64 (uint64 if >= 2^63),
 * integer number -> uint32 if in [0, 2^32), int32 if in [-2^31, 0), else int64; other numbers ->
 * float32 (GGUF's usual float). Typed arrays map to arrays of their element type; a plain array
 * takes the type of its elements (integers: int32 if all fit, else uint32 or int64; any fraction:
 * float32), nested arrays recursively; an empty array is array<int32>.
 */
function inferType(where: string, v: unknown): ParsedType {
  if (v instanceof GgufTypedValue) return parseType(where, v.type);
  if (typeof v === 'string') return { scalar: 'string' };
  if (typeof v === 'boolean') return { scalar: 'bool' };
  if (typeof v === 'bigint') return { scalar: v >= 2n ** 63n ? 'uint64' : 'int64' };
  if (typeof v === 'number') {
    if (Number.isInteger(v)) {
      if (v >= 0 && v <= 4294967295) return { scalar: 'uint32' };
      if (v >= -2147483648 && v < 0) return { scalar: 'int32' };
      if (Number.isSafeInteger(v)) return { scalar: 'int64' };
    }
    return { scalar: 'float32' };
  }
  if (v instanceof Float32Array) return { array: { scalar: 'float32' } };
  if (v instanceof Float64Array) return { array: { scalar: 'float64' } };
  if (v instanceof Int8Array) return { array: { scalar: 'int8' } };
  if (v instanceof Uint8Array) return { array: { scalar: 'uint8' } };
  if (v instanceof Int16Array) return { array: { scalar: 'int16' } };
  if (v instanceof Uint16Array) return { array: { scalar: 'uint16' } };
  if (v instanceof Int32Array) return { array: { scalar: 'int32' } };
  if (v instanceof Uint32Array) return { array: { scalar: 'uint32' } };
  if (v instanceof BigInt64Array) return { array: { scalar: 'int64' } };
  if (v instanceof BigUint64Array) return { array: { scalar: 'uint64' } };
  if (Array.isArray(v)) {
    if (v.length === 0) return { array: { scalar: 'int32' } };
    if (v.every((e) => typeof e === 'number')) {
      const nums = v as number[];
      if (nums.every((e) => Number.isInteger(e) && e >= -2147483648 && e <= 2147483647)) return { array: { scalar: 'int32' } };
      if (nums.every((e) => Number.isInteger(e) && e >= 0 && e <= 4294967295)) return { array: { scalar: 'uint32' } };
      if (nums.every((e) => Number.isSafeInteger(e))) return { array: { scalar: 'int64' } };
      return { array: { scalar: 'float32' } };
    }
    const first = inferType(`${where}[0]`, v[0]);
    const name = typeName(first);
    v.forEach((e, i) => {
      const t = typeName(inferType(`${where}[${i}]`, e));
      if (t !== name) {
        throw new InvalidArgumentError(`${where}[${i}] is ${t} but ${where}[0] is ${name}: GGUF arrays hold one type (use gguf.typed())`);
      }
    });
    return { array: first };
  }
  throw new InvalidArgumentError(`${where} cannot be stored in GGUF, got ${describe(v)}`);
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const SAME_TYPED_ARRAY: Partial<Record<string, abstract new (...args: never[]) => unknown>> = {
  float32: Float32Array, float64: Float64Array, int8: Int8Array, uint8: Uint8Array, int16: Int16Array,
  uint16: Uint16Array, int32: Int32Array, uint32: Uint32Array, int64: BigInt64Array, uint64: BigUint64Array,
};

/** Growable little-endian byte buffer for the header. */
class Bytes {
  buf = new Uint8Array(4096);
  view = new DataView(this.buf.buffer);
  length = 0;
  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.length + n) cap *= 2;
    const next = new Uint8Array(cap);
    next.set(this.buf.subarray(0, this.length));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(v: number) { this.reserve(1); this.view.setUint8(this.length, v); this.length += 1; }
  i8(v: number) { this.reserve(1); this.view.setInt8(this.length, v); this.length += 1; }
  u16(v: number) { this.reserve(2); this.view.setUint16(this.length, v, true); this.length += 2; }
  i16(v: number) { this.reserve(2); this.view.setInt16(this.length, v, true); this.length += 2; }
  u32(v: number) { this.reserve(4); this.view.setUint32(this.length, v, true); this.length += 4; }
  i32(v: number) { this.reserve(4); this.view.setInt32(this.length, v, true); this.length += 4; }
  f32(v: number) { this.reserve(4); this.view.setFloat32(this.length, v, true); this.length += 4; }
  f64(v: number) { this.reserve(8); this.view.setFloat64(this.length, v, true); this.length += 8; }
  u64(v: bigint) { this.reserve(8); this.view.setBigUint64(this.length, v, true); this.length += 8; }
  i64(v: bigint) { this.reserve(8); this.view.setBigInt64(this.length, v, true); this.length += 8; }
  raw(b: Uint8Array) { this.reserve(b.length); this.buf.set(b, this.length); this.length += b.length; }
  str(s: string) { const b = Buffer.from(s, 'utf8'); this.u64(BigInt(b.length)); this.raw(b); }
  bytes(): Uint8Array { return this.buf.subarray(0, this.length); }
}

function encodeValue(out: Bytes, where: string, t: ParsedType, v: unknown): void {
  if ('array' in t) {
    if (!Array.isArray(v) && !(ArrayBuffer.isView(v) && !(v instanceof DataView))) {
      throw new InvalidArgumentError(`${where} must be an array for type ${typeName(t)}, got ${describe(v)}`);
    }
    const items = v as ArrayLike<unknown>;
    out.u32('array' in t.array ? ARRAY_ID : SCALAR_IDS[t.array.scalar]);
    out.u64(BigInt(items.length));
    // A typed array of the element type is already the file's bytes (GGUF is little-endian, as
    // is every host sonde builds for): one copy instead of a checked write per element, which
    // took seconds for arrays of millions.
    const same = 'scalar' in t.array ? SAME_TYPED_ARRAY[t.array.scalar] : undefined;
    if (same && v instanceof same && LITTLE_ENDIAN) {
      const view = v as unknown as ArrayBufferView;
      out.raw(new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
      return;
    }
    for (let i = 0; i < items.length; i++) encodeValue(out, `${where}[${i}]`, t.array, items[i]);
    return;
  }
  const s = t.scalar;
  const bad = () => new InvalidArgumentError(`${where} cannot be stored as ${s}, got ${describe(v)}`);
  switch (s) {
    case 'string': if (typeof v !== 'string') throw bad(); out.str(v); return;
    case 'bool': if (typeof v !== 'boolean') throw bad(); out.u8(v ? 1 : 0); return;
    case 'float32': if (typeof v !== 'number') throw bad(); out.f32(v); return;
    case 'float64': if (typeof v !== 'number') throw bad(); out.f64(v); return;
    case 'uint64': case 'int64': {
      let b: bigint;
      if (typeof v === 'bigint') b = v;
      else if (typeof v === 'number' && Number.isSafeInteger(v)) b = BigInt(v);
      else throw bad();
      if (s === 'uint64' ? b < 0n || b >= 2n ** 64n : b < -(2n ** 63n) || b >= 2n ** 63n) throw bad();
      if (s === 'uint64') out.u64(b); else out.i64(b);
      return;
    }
    default: {
      const [lo, hi] = INT_RANGES[s]!;
      if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi) throw bad();
      ({ uint8: () => out.u8(v), int8: () => out.i8(v), uint16: () => out.u16(v), int16: () => out.i16(v),
        uint32: () => out.u32(v), int32: () => out.i32(v) } as Record<string, () => void>)[s]!();
    }
  }
}

export interface GgufWriteTensor {
  /** Below 64 bytes of UTF-8 (ggml's GGML_MAX_NAME). */
  name: string;
  /** GGUF order: ne0 (contiguous) first; 1 to 4 dims. A matrix of N rows of K is [K, N]. */
  dims: readonly number[];
  type: GgufTensorType;
  /**
   * float32 values (encoded, quantised for q8_0 / q4_0), or the already encoded bytes of `type`
   * (e.g. kernels.quantizeWeights(...).data); or a function returning either, called when the
   * tensor is written (in tensor order, once), so a large model is generated one tensor at a time
   * instead of being held whole in the JS heap.
   */
  data: GgufTensorData | (() => GgufTensorData);
}

export type GgufTensorData = Float32Array | Uint8Array;

export interface GgufWriteSpec {
  metadata?: Record<string, unknown>;
  tensors?: readonly GgufWriteTensor[];
}

/** Writes a GGUF v3 file. Metadata values are inferred (see inferType) or given with gguf.typed(). */
export async function write(path: string, spec: GgufWriteSpec): Promise<void> {
  const where = 'gguf.write';
  if (typeof path !== 'string' || path.length === 0) {
    throw new InvalidArgumentError(`${where}(path) must be a non-empty string, got ${describe(path)}`);
  }
  if (spec === null || typeof spec !== 'object') throw new InvalidArgumentError(`${where}(spec) must be an object, got ${describe(spec)}`);
  for (const key of Object.keys(spec)) {
    if (key !== 'metadata' && key !== 'tensors') throw new InvalidArgumentError(`${where}: unknown spec field '${key}' (known: metadata, tensors)`);
  }
  const metadata = spec.metadata ?? {};
  const tensors: readonly GgufWriteTensor[] = spec.tensors ?? [];
  if (metadata === null || typeof metadata !== 'object') throw new InvalidArgumentError(`${where}: spec.metadata must be an object`);
  if (!Array.isArray(tensors as unknown)) throw new InvalidArgumentError(`${where}: spec.tensors must be an array`);

  let alignment = 32;
  const head = new Bytes();
  head.raw(new Uint8Array([0x47, 0x47, 0x55, 0x46]));  // "GGUF"
  head.u32(3);
  head.u64(BigInt(tensors.length));
  const keys = Object.keys(metadata);
  head.u64(BigInt(keys.length));
  for (const key of keys) {
    const w = `${where}: metadata['${key}']`;
    const raw = metadata[key];
    const t = inferType(w, raw);
    const value = raw instanceof GgufTypedValue ? raw.value : raw;
    if (key === 'general.alignment') {
      if (typeName(t) !== 'uint32' || typeof value !== 'number' || value <= 0 || (value & (value - 1)) !== 0) {
        throw new InvalidArgumentError(`${w} must be a uint32 power of two, got ${describe(value)}`);
      }
      alignment = value;
    }
    head.str(key);
    head.u32('array' in t ? ARRAY_ID : SCALAR_IDS[t.scalar]);
    encodeValue(head, w, t, value);
  }
  const blobs: (() => Uint8Array)[] = [];
  const names = new Set<string>();
  let offset = 0;
  tensors.forEach((t, i) => {
    const w = `${where}: tensors[${i}]`;
    if (t === null || typeof t !== 'object') throw new InvalidArgumentError(`${w} must be an object`);
    if (typeof t.name !== 'string' || Buffer.byteLength(t.name) >= 64) {
      throw new InvalidArgumentError(`${w}.name must be a string below 64 bytes, got ${describe(t.name)}`);
    }
    if (names.has(t.name)) throw new InvalidArgumentError(`${w}.name '${t.name}' is used twice`);
    names.add(t.name);
    if (!GGUF_TENSOR_TYPES.includes(t.type)) {
      throw new InvalidArgumentError(`${w}.type must be one of ${GGUF_TENSOR_TYPES.join(', ')}, got ${describe(t.type)}`);
    }
    if (!Array.isArray(t.dims as unknown) || t.dims.length < 1 || t.dims.length > 4 ||
        !t.dims.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new InvalidArgumentError(`${w}.dims must be 1 to 4 non-negative integers, got ${describe(t.dims)}`);
    }
    const elements = t.dims.reduce((a, b) => a * b, 1);
    if (!Number.isSafeInteger(elements)) throw new InvalidArgumentError(`${w}.dims [${t.dims.join(', ')}] have too many elements`);
    if ((t.type === 'q8_0' || t.type === 'q4_0') && t.dims[0]! % 32 !== 0) {
      throw new InvalidArgumentError(`${w}: ${t.type} needs dims[0] (ne0 = ${t.dims[0]}) to be a multiple of 32`);
    }
    const size = encodedBytes(t.type, elements);
    head.str(t.name);
    head.u32(t.dims.length);
    for (const d of t.dims) head.u64(BigInt(d));
    head.u32(GGML_TYPE_IDS[t.type]);
    head.u64(BigInt(offset));
    // Eager data is checked now, before the file is opened; produced data when it is produced.
    const data = t.data;
    const encodeData = (d: unknown) => encodeTensorData(w, t.type, t.dims, elements, d);
    if (typeof data === 'function') {
      blobs.push(() => encodeData(data()));
    } else {
      const blob = encodeData(data);
      blobs.push(() => blob);
    }
    offset += Math.ceil(size / alignment) * alignment;
  });
  const pad = (n: number) => new Uint8Array((alignment - (n % alignment)) % alignment);
  const fh = await open(path, 'w');
  try {
    const header = head.bytes();
    await fh.write(header);
    await fh.write(pad(header.length));
    for (const blob of blobs) {
      const b = blob();
      await fh.write(b);
      await fh.write(pad(b.length));
    }
  } catch (err) {
    // A tensor whose produced data was invalid: no truncated file is left behind.
    await fh.close();
    await rm(path, { force: true });
    throw err;
  }
  await fh.close();
}

function encodeTensorData(w: string, type: GgufTensorType, dims: readonly number[], elements: number, data: unknown): Uint8Array {
  if (data instanceof Float32Array) {
    if (data.length !== elements) throw new InvalidArgumentError(`${w}.data has ${data.length} values, dims [${dims.join(', ')}] need ${elements}`);
    return encode(type, data);
  }
  if (data instanceof Uint8Array) {
    const need = encodedBytes(type, elements);
    if (data.length !== need) throw new InvalidArgumentError(`${w}.data has ${data.length} bytes, ${elements} ${type} values need ${need}`);
    return data;
  }
  throw new InvalidArgumentError(`${w}.data must be a Float32Array, the encoded Uint8Array or a function returning one, got ${describe(data)}`);
}
