import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, ModelFormatError, Tensor, gguf, kernels } from '../dist/index.js';
import { randomF32 } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'sonde-gguf-'));
let files = 0;
const tmp = (name = 'f') => join(dir, `${name}-${files++}.gguf`);
const opened: gguf.GgufFile[] = [];
afterAll(() => { for (const f of opened) f.dispose(); });
async function readBack(path: string): Promise<gguf.GgufFile> {
  const f = await gguf.read(path);
  opened.push(f);
  return f;
}

/** IEEE half bits -> value, straight from the format's definition (independent of lib/). */
function half(h: number): number {
  const e = (h >> 10) & 31;
  const m = h & 1023;
  const s = h & 0x8000 ? -1 : 1;
  return e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
}

// Every GGUF value type, with values at the edges of each range.
const everyType: Record<string, [gguf.GgufValueType, gguf.GgufValue]> = {
  u8: ['uint8', 255], i8: ['int8', -128], u16: ['uint16', 65535], i16: ['int16', -32768],
  u32: ['uint32', 4294967295], i32: ['int32', -2147483648], f32: ['float32', 0.1 + 0.2], f64: ['float64', Math.PI],
  boolT: ['bool', true], boolF: ['bool', false], str: ['string', 'héllo, 世界 🦙'], empty: ['string', ''],
  u64small: ['uint64', 12345], u64big: ['uint64', 2n ** 64n - 1n], i64neg: ['int64', -(2n ** 63n)], i64safe: ['int64', -9007199254740991],
  au8: ['array<uint8>', [0, 1, 255]], ai8: ['array<int8>', [-128, 127]], au16: ['array<uint16>', [65535]],
  ai16: ['array<int16>', [-1, 2]], au32: ['array<uint32>', [4294967295, 0]], ai32: ['array<int32>', [-5, 7]],
  af32: ['array<float32>', [1.5, -2.25]], af64: ['array<float64>', [Math.E]], abool: ['array<bool>', [true, false]],
  astr: ['array<string>', ['a', '', 'ü']], au64: ['array<uint64>', [1, 2n ** 63n]], ai64: ['array<int64>', [-1, -(2n ** 62n)]],
  nested: ['array<array<int32>>', [[1, 2], [], [3]]], nestedStr: ['array<array<string>>', [['x'], ['y', 'z']]],
  aempty: ['array<float32>', []],
};

describe('gguf.write / gguf.read', () => {
  it('round-trips every metadata type, with the stored type', async () => {
    const path = tmp('meta');
    const metadata: Record<string, unknown> = {};
    for (const [k, [t, v]] of Object.entries(everyType)) metadata[k] = gguf.typed(t, v);
    await gguf.write(path, { metadata });
    const f = await readBack(path);
    expect(f.version).toBe(3);
    for (const [k, [t, v]] of Object.entries(everyType)) {
      expect(f.metadataTypes[k], k).toBe(t);
      // float32 values come back rounded to float32; 64-bit ones as numbers when safe.
      const want = t === 'float32' ? Math.fround(v as number) : t === 'array<float32>' ? (v as number[]).map(Math.fround)
        : t === 'uint64' && typeof v === 'bigint' && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
      const wantArr = t === 'array<uint64>' || t === 'array<int64>'
        ? (v as (number | bigint)[]).map((e) => (typeof e === 'bigint' && e <= 2n ** 53n && e >= -(2n ** 53n) ? Number(e) : e)) : want;
      expect(f.metadata[k], k).toEqual(wantArr);
    }
  });

  it('typed arrays round-trip (views at an offset included), as their own type or converted', async () => {
    const path = tmp('typed');
    const base = new ArrayBuffer(64);
    new Uint8Array(base).forEach((_, i, a) => { a[i] = (i * 37 + 11) & 255; });
    const kinds = [Int8Array, Uint8Array, Int16Array, Uint16Array, Int32Array, Uint32Array, Float32Array, Float64Array,
      BigInt64Array, BigUint64Array] as const;
    // A view 8 bytes into a shared buffer: the written bytes are the view's, not the buffer's start.
    const views = kinds.map((K) => new K(base, 8, 48 / K.BYTES_PER_ELEMENT));
    const metadata: Record<string, unknown> = Object.fromEntries(views.map((v, i) => [`v${i}`, v]));
    metadata.f64as32 = gguf.typed('array<float32>', new Float64Array([0.1, -2.5]));
    await gguf.write(path, { metadata });
    const f = await readBack(path);
    views.forEach((v, i) => {
      const want = Array.from(v as ArrayLike<number | bigint>, (e) => typeof e === 'bigint' && e <= 2n ** 53n && e >= -(2n ** 53n) ? Number(e) : e);
      const got = Array.from(f.metadata[`v${i}`] as ArrayLike<number | bigint>);
      // NaN patterns among the float views compare by Object.is inside toEqual.
      expect(got, kinds[i]!.name).toEqual(want);
    });
    expect(f.metadata.f64as32).toEqual([Math.fround(0.1), -2.5]);
  });

  it('infers plain value types and keeps the order of keys', async () => {
    const path = tmp('infer');
    await gguf.write(path, {
      metadata: { a: 'x', b: true, c: 7, d: -7, e: 2 ** 40, f: 0.5, g: [1, 2], h: [0.5], i: ['s'], j: new Float32Array([1]),
        k: 5n, l: new Uint8Array([9]), m: [[1], [2]] },
    });
    const f = await readBack(path);
    expect(Object.keys(f.metadata)).toEqual(['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm']);
    expect(f.metadataTypes).toEqual({ a: 'string', b: 'bool', c: 'uint32', d: 'int32', e: 'int64', f: 'float32',
      g: 'array<int32>', h: 'array<float32>', i: 'array<string>', j: 'array<float32>', k: 'int64', l: 'array<uint8>',
      m: 'array<array<int32>>' });
    expect(f.metadata.e).toBe(2 ** 40);
    expect(f.metadata.m).toEqual([[1], [2]]);
  });

  it('rejects values that do not fit their type, naming the key', async () => {
    await expect(gguf.write(tmp(), { metadata: { k: gguf.typed('uint8', 256) } })).rejects.toThrow(/metadata\['k'\].*uint8/);
    await expect(gguf.write(tmp(), { metadata: { k: gguf.typed('int32', 1.5) } })).rejects.toThrow(InvalidArgumentError);
    await expect(gguf.write(tmp(), { metadata: { k: [1, 'a'] } })).rejects.toThrow(/one type/);
    await expect(gguf.write(tmp(), { metadata: { k: { a: 1 } } })).rejects.toThrow(InvalidArgumentError);
    expect(() => gguf.typed('uint128' as gguf.GgufValueType, 1)).toThrow(/unknown GGUF type/);
    await expect(gguf.write(tmp(), { tensors: [{ name: 't', dims: [31, 1], type: 'q8_0', data: new Float32Array(31) }] }))
      .rejects.toThrow(/multiple of 32/);
    await expect(gguf.write(tmp(), { tensors: [{ name: 'x'.repeat(64), dims: [1], type: 'f32', data: new Float32Array(1) }] }))
      .rejects.toThrow(/below 64 bytes/);
  });

  it('round-trips tensors of every type, aligned, with the data where the infos say', async () => {
    const path = tmp('tensors');
    const k = 64;
    const n = 3;
    const x = randomF32(k * n, 7).map((v, i) => v * (1 + (i % 5)));
    const types: gguf.GgufTensorType[] = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'];
    await gguf.write(path, {
      metadata: { 'general.alignment': gguf.typed('uint32', 64) },
      tensors: [...types.map((type) => ({ name: `w.${type}`, dims: [k, n], type, data: x })),
        { name: 'vec', dims: [5], type: 'f32' as const, data: new Float32Array([1, 2, 3, 4, 5]) },
        { name: 'raw', dims: [k, n], type: 'q4_0' as const, data: kernels.quantizeWeights(new Tensor('float32', x, [n, k]), 'q4_0').data }],
    });
    const f = await readBack(path);
    expect(f.alignment).toBe(64);
    expect(f.dataOffset % 64).toBe(0);
    const bytes = readFileSync(path);
    for (const type of types) {
      const t = f.tensor(`w.${type}`)!;
      expect(t.type).toBe(type);
      expect(t.dims).toEqual([k, n]);
      expect(t.offset % 64).toBe(0);
      // The bytes in the file are the encoder's, and dequantising them gives back the encoded values.
      const q = kernels.quantizeWeights(new Tensor('float32', x, [n, k]), type);
      expect(t.bytes).toBe(q.bytes);
      expect(new Uint8Array(bytes.buffer, bytes.byteOffset + f.dataOffset + t.offset, t.bytes)).toEqual(q.data);
      const fromFile = await kernels.dequantize(t);
      const fromMemory = await kernels.dequantize(q);
      expect(fromFile.dims).toEqual([n, k]);
      expect(fromFile.data).toEqual(fromMemory.data);
      if (type === 'f32') expect(fromFile.data).toEqual(x);
      // Rounding / quantisation error of each type: f16 2^-11 relative, bf16 2^-8, q8_0 d/2 + the f16
      // rounding of d (q is taken from the fp32 d, so d16 q - d q <= 127 d 2^-11), q4_0 one step
      // d = amax/8 (the clamp at 15 costs up to a step) plus 8 d 2^-11.
      const rel = { f32: 0, f16: 2 ** -11, bf16: 2 ** -8, q8_0: 0, q4_0: 0 }[type];
      for (let i = 0; i < x.length; i++) {
        const amax = Math.max(...Array.from(x.subarray(i - (i % 32), i - (i % 32) + 32), Math.abs));
        const bound = type === 'q8_0' ? amax / 127 * (0.5 + 127 * 2 ** -11) + 1e-7 : type === 'q4_0' ? amax / 8 * 1.01 : rel * Math.abs(x[i]!);
        expect(Math.abs(fromFile.data[i]! - x[i]!), `${type}[${i}]`).toBeLessThanOrEqual(bound);
      }
    }
    expect((await kernels.dequantize(f.tensor('raw')!)).data).toEqual((await kernels.dequantize(f.tensor('w.q4_0')!)).data);
    expect(f.tensor('vec')!.dims).toEqual([5]);
    expect(f.info.parameterCount).toBe(6 * k * n + 5);
    expect(f.info.tensorTypes).toEqual({ f32: 2, f16: 1, bf16: 1, q8_0: 1, q4_0: 2 });
  });

  it('hand-checked q8_0 block: d = amax/127 as f16, q = round half away from zero', async () => {
    // x_j = j - 16: amax = 16, d = 16/127 = 0.12598.. -> f16 2^-3 * (1 + 8/1024) = 0x3008,
    // id = 127/16 = 7.9375 exactly, q_j = round((j - 16) * 7.9375); j = 8 and 24 are the halves -63.5
    // and 63.5, which ggml's roundf takes away from zero.
    const x = Float32Array.from({ length: 32 }, (_, j) => j - 16);
    const path = tmp('q8');
    await gguf.write(path, { tensors: [{ name: 'b', dims: [32], type: 'q8_0', data: x }] });
    const f = await readBack(path);
    const bytes = new Uint8Array(readFileSync(path).subarray(f.dataOffset, f.dataOffset + 34));
    expect(bytes[0]).toBe(0x08);
    expect(bytes[1]).toBe(0x30);
    const q = Array.from(new Int8Array(bytes.buffer, bytes.byteOffset + 2, 32));
    const want = x.map((v) => { const t = v * 7.9375; return Math.sign(t) * Math.floor(Math.abs(t) + 0.5); });
    expect(q).toEqual(Array.from(want));
    expect(q[0]).toBe(-127);
    expect(q[8]).toBe(-64);
    expect(q[24]).toBe(64);
    expect(q[31]).toBe(119);
    const deq = await kernels.dequantize(kernels.quantizeWeights(new Tensor('float32', x, [1, 32]), 'q8_0'));
    expect(Array.from(deq.data)).toEqual(q.map((v) => v * half(0x3008)));
  });

  it('hand-checked q4_0 block: d = (signed max) / -8, nibbles low = 0..15, high = 16..31', async () => {
    // x_j = j - 16: the largest magnitude is x_0 = -16, so d = 2 (f16 0x4000), id = 0.5 and
    // q_j = min(15, trunc((j - 16) / 2 + 8.5)).
    const x = Float32Array.from({ length: 32 }, (_, j) => j - 16);
    const q = [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 15];
    const w = kernels.quantizeWeights(new Tensor('float32', x, [1, 32]), 'q4_0');
    expect(w.data[0]).toBe(0x00);
    expect(w.data[1]).toBe(0x40);
    for (let j = 0; j < 16; j++) expect(w.data[2 + j], `byte ${j}`).toBe(q[j]! | (q[j + 16]! << 4));
    const deq = await kernels.dequantize(w);
    expect(Array.from(deq.data)).toEqual(q.map((v) => (v - 8) * 2));
    // Ties of magnitude: the first one sets the sign of d. x_0 = 3, x_1 = -3: d = 3 / -8 = -0.375,
    // so x_0 -> trunc(-8 + 8.5) = 0 and x_1 -> min(15, trunc(8 + 8.5)) = 15.
    const y = new Float32Array(32);
    y[0] = 3;
    y[1] = -3;
    const w2 = kernels.quantizeWeights(new Tensor('float32', y, [1, 32]), 'q4_0');
    expect(half(w2.data[0]! | (w2.data[1]! << 8))).toBe(-0.375);
    expect(w2.data[2]! & 15).toBe(0);
    expect(w2.data[3]! & 15).toBe(15);
    expect(w2.data[4]! & 15).toBe(8);
  });

  it('reads version 2 files (same layout as v3 for little-endian files)', async () => {
    const path = tmp('v2');
    await gguf.write(path, { metadata: { a: 1 }, tensors: [{ name: 't', dims: [2], type: 'f32', data: new Float32Array([1, 2]) }] });
    const b = readFileSync(path);
    b.writeUInt32LE(2, 4);
    writeFileSync(path, b);
    const f = await readBack(path);
    expect(f.version).toBe(2);
    expect((await kernels.dequantize(f.tensor('t')!)).data).toEqual(new Float32Array([1, 2]));
  });

  it('summarises llama-family keys in info', async () => {
    const path = tmp('info');
    await gguf.write(path, {
      metadata: { 'general.architecture': 'llama', 'general.name': 'tiny', 'llama.context_length': 4096,
        'llama.embedding_length': 1024, 'llama.block_count': 12, 'llama.feed_forward_length': 1408,
        'llama.attention.head_count': 16, 'llama.attention.head_count_kv': 4, 'llama.expert_count': 8,
        'llama.expert_used_count': 2 },
      tensors: [{ name: 'a', dims: [32, 2], type: 'q8_0', data: new Float32Array(64) }],
    });
    const f = await readBack(path);
    expect(f.info).toEqual({ architecture: 'llama', name: 'tiny', parameterCount: 64, tensorTypes: { q8_0: 1 },
      tensorBytes: { q8_0: 68 }, contextLength: 4096, embeddingLength: 1024, blockCount: 12, feedForwardLength: 1408,
      headCount: 16, headCountKv: 4, expertCount: 8, expertUsedCount: 2 });
  });
});

describe('gguf.read on bad input: a typed error, the process alive', () => {
  // A small valid file: header (24 bytes), key 'k' = string 'value', one f32 tensor 'w' [4].
  async function valid(): Promise<Buffer> {
    const path = tmp('valid');
    await gguf.write(path, { metadata: { k: 'value' }, tensors: [{ name: 'w', dims: [4], type: 'f32', data: new Float32Array([1, 2, 3, 4]) }] });
    return readFileSync(path);
  }
  // Layout of valid(): 0 magic, 4 version, 8 n_tensors, 16 n_kv, 24 key len, 32 'k', 33 type,
  // 37 value len, 45 'value', 50 tensor name len, 58 'w', 59 n_dims, 63 ne0, 71 type, 75 offset,
  // 83 end of infos; data at 96.
  async function expectFormatError(bytes: Buffer | Uint8Array, pattern: RegExp): Promise<void> {
    const path = tmp('bad');
    writeFileSync(path, bytes);
    const err = await gguf.read(path).then(() => undefined, (e: unknown) => e);
    expect(err, 'should reject').toBeInstanceOf(ModelFormatError);
    expect((err as Error).message).toMatch(pattern);
  }

  it('the fixture has the layout the offsets below assume', async () => {
    const b = await valid();
    expect(b.length).toBe(96 + 32);
    expect(b.toString('latin1', 45, 50)).toBe('value');
    expect(b.readUInt32LE(71)).toBe(0);
  });

  it('not a GGUF file', async () => {
    await expectFormatError(Buffer.from('PK\x03\x04 this is a zip file, not a model'), /not a GGUF file: magic/);
    await expectFormatError(Buffer.alloc(0), /truncated GGUF file: header \(magic\)/);
  });

  it('unsupported versions', async () => {
    for (const v of [1, 4, 0x03000000]) {
      const b = await valid();
      b.writeUInt32LE(v, 4);
      await expectFormatError(b, v === 0x03000000 ? /big-endian/ : new RegExp(`unsupported GGUF version ${v}`));
    }
  });

  it('truncated at each section, naming it and the offset', async () => {
    const b = await valid();
    await expectFormatError(b.subarray(0, 12), /header \(tensor count\)/);
    await expectFormatError(b.subarray(0, 20), /header \(metadata count\)/);
    await expectFormatError(b.subarray(0, 47), /metadata key #0 \('k'\) string value needs 5 bytes at offset 45/);
    await expectFormatError(b.subarray(0, 66), /tensor info #0 \('w'\) dims/);
    await expectFormatError(b.subarray(0, 80), /tensor info #0 \('w'\) data offset/);
    await expectFormatError(b.subarray(0, 90), /tensor data section/);
    await expectFormatError(b.subarray(0, 96 + 15), /tensor 'w' data needs bytes \[96, 112\)/);
  });

  it('absurd counts are rejected before anything is allocated', async () => {
    let b = await valid();
    b.writeBigUInt64LE(2n ** 60n, 16);
    await expectFormatError(b, /metadata count 1152921504606846976 cannot fit/);
    b = await valid();
    b.writeBigUInt64LE(2n ** 60n, 8);
    await expectFormatError(b, /tensor count .* cannot fit/);
    b = await valid();
    b.writeBigUInt64LE(2n ** 62n, 37);  // the string value's length
    await expectFormatError(b, /string value needs 4611686018427387904 bytes/);
    // An array whose count cannot fit: key 'k' retyped as array<uint32> of 2^40 elements.
    b = await valid();
    b.writeUInt32LE(9, 33);
    b.writeUInt32LE(4, 37);
    b.writeBigUInt64LE(2n ** 40n, 41);
    await expectFormatError(b, /array count 1099511627776 of uint32 cannot fit/);
    // One that fits the file but would not fit the JS heap as an array: refused, not fatal.
    const big = join(dir, 'bigarray.gguf');
    await gguf.write(big, { metadata: { k: new Uint8Array(2 ** 26 + 1) } });
    const err = await gguf.read(big).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(ModelFormatError);
    expect((err as Error).message).toMatch(/array of 67108865 elements \(sonde reads at most 67108864\)/);
  });

  it('unknown types, too many dims, misaligned or duplicate entries', async () => {
    let b = await valid();
    b.writeUInt32LE(31, 71);  // a removed ggml type id
    await expectFormatError(b, /unknown tensor type id 31/);
    b = await valid();
    b.writeUInt32LE(99, 33);
    await expectFormatError(b, /unknown value type 99/);
    b = await valid();
    b.writeUInt32LE(5, 59);
    await expectFormatError(b, /has 5 dimensions \(at most 4\)/);
    b = await valid();
    b.writeBigUInt64LE(4n, 75);
    await expectFormatError(b, /not a multiple of the alignment 32/);
    b = await valid();
    b.writeUInt32LE(8, 71);  // q8_0 with ne0 = 4
    await expectFormatError(b, /not a multiple of its block size 32/);
  });

  it('random corruption never crashes: every read resolves or rejects with ModelFormatError', async () => {
    const base = await valid();
    let seed = 12345;
    const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed; };
    for (let trial = 0; trial < 300; trial++) {
      const b = Buffer.from(base);
      for (let flips = 1 + (rnd() % 4); flips > 0; flips--) b[rnd() % 96] = rnd() & 255;
      const path = join(dir, 'fuzz.gguf');
      writeFileSync(path, b.subarray(0, trial % 3 === 0 ? rnd() % b.length : b.length));
      try {
        (await gguf.read(path)).dispose();
      } catch (e) {
        expect(e).toBeInstanceOf(ModelFormatError);
      }
    }
  });

  it('tensor data given as functions is produced in tensor order and written like eager data', async () => {
    const x = randomF32(32 * 3);
    const y = randomF32(5);
    const eager = tmp('eager');
    await gguf.write(eager, { tensors: [{ name: 'x', dims: [32, 3], type: 'q8_0', data: x }, { name: 'y', dims: [5], type: 'f16', data: y }] });
    const calls: string[] = [];
    const lazy = tmp('lazy');
    await gguf.write(lazy, { tensors: [
      { name: 'x', dims: [32, 3], type: 'q8_0', data: () => { calls.push('x'); return x; } },
      { name: 'y', dims: [5], type: 'f16', data: () => { calls.push('y'); return y; } },
    ] });
    expect(calls).toEqual(['x', 'y']);
    expect(readFileSync(lazy).equals(readFileSync(eager))).toBe(true);
    // A function that produces the wrong size fails the write and leaves no partial file behind.
    const bad = tmp('lazy-bad');
    await expect(gguf.write(bad, { tensors: [
      { name: 'x', dims: [32, 3], type: 'q8_0', data: () => x },
      { name: 'y', dims: [5], type: 'f16', data: () => randomF32(4) },
    ] })).rejects.toThrow(/tensors\[1\]\.data has 4 values, dims \[5\] need 5/);
    expect(existsSync(bad)).toBe(false);
    await expect(gguf.write(bad, { tensors: [{ name: 'z', dims: [2], type: 'f32', data: (() => 'no') as never }] }))
      .rejects.toThrow(InvalidArgumentError);
  });

  it('a missing file or a bad path is an InvalidArgumentError', async () => {
    await expect(gguf.read(join(dir, 'nope.gguf'))).rejects.toThrow(InvalidArgumentError);
    await expect(gguf.read(dir)).rejects.toThrow(/not a regular file/);
    await expect(gguf.read('' as string)).rejects.toThrow(InvalidArgumentError);
  });

  it('use after dispose is a DisposedError; dispose is idempotent', async () => {
    const path = tmp('dispose');
    await gguf.write(path, { tensors: [{ name: 'w', dims: [32, 2], type: 'q8_0', data: randomF32(64) }] });
    const f = await gguf.read(path);
    const t = f.tensor('w')!;
    const x = new Tensor('float32', randomF32(32), [1, 32]);
    // A run in flight keeps the mapping alive past dispose().
    const pending = kernels.quantMatmul(x, t);
    f.dispose();
    f.dispose();
    expect((await pending).dims).toEqual([1, 2]);
    expect(() => f.tensor('w')).toThrow(DisposedError);
    await expect(kernels.quantMatmul(x, t)).rejects.toThrow(DisposedError);
    await expect(kernels.dequantize(t)).rejects.toThrow(DisposedError);
  });
});
