import { describe, expect, it } from 'vitest';
import { DTYPES, InvalidArgumentError, SondeError, Tensor } from '../dist/index.js';

describe('Tensor', () => {
  it('holds dtype, dims and data without copying', () => {
    const data = new Float32Array([1, 2, 3, 4, 5, 6]);
    const t = new Tensor('float32', data, [2, 3]);
    expect(t.dtype).toBe('float32');
    expect(t.dims).toEqual([2, 3]);
    expect(t.size).toBe(6);
    expect(t.data).toBe(data);
    expect(Object.isFrozen(t.dims)).toBe(true);
  });

  it('defaults dims to [data.length] and allows zero-sized dims', () => {
    expect(new Tensor('int32', new Int32Array(5)).dims).toEqual([5]);
    expect(new Tensor('float32', new Float32Array(0), [3, 0]).size).toBe(0);
    expect(new Tensor('float32', new Float32Array(1), []).size).toBe(1);
  });

  it('accepts the storage array of every dtype', () => {
    const arrays = {
      float32: new Float32Array(2), float16: new Uint16Array(2), bfloat16: new Uint16Array(2), int8: new Int8Array(2),
      uint8: new Uint8Array(2), int32: new Int32Array(2), int64: new BigInt64Array(2), bool: new Uint8Array(2),
    } as const;
    expect(DTYPES.sort()).toEqual(Object.keys(arrays).sort());
    for (const [dtype, data] of Object.entries(arrays)) {
      expect(new Tensor(dtype as never, data as never, [2]).dtype).toBe(dtype);
    }
  });

  it('rejects an unknown dtype', () => {
    expect(() => new Tensor('float64' as never, new Float64Array(1) as never)).toThrow(InvalidArgumentError);
    expect(() => new Tensor('float64' as never, new Float64Array(1) as never)).toThrow(/Tensor.dtype must be one of/);
  });

  it('rejects data of the wrong array type for the dtype', () => {
    expect(() => new Tensor('float32', new Int32Array(2) as never)).toThrow(/Tensor.data must be a Float32Array for dtype 'float32', got Int32Array\(2\)/);
    expect(() => new Tensor('int64', new Int32Array(2) as never)).toThrow(/BigInt64Array/);
  });

  it('rejects non-TypedArray data', () => {
    expect(() => new Tensor('float32', [1, 2, 3] as never)).toThrow(/Tensor.data must be a Float32Array .* got Array\(3\)/);
    expect(() => new Tensor('float32', 'abc' as never)).toThrow(InvalidArgumentError);
    expect(() => new Tensor('float32', null as never)).toThrow(InvalidArgumentError);
  });

  it('rejects data backed by a resizable or growable buffer', () => {
    const resizable = new (ArrayBuffer as unknown as new (n: number, o: object) => ArrayBuffer)(16, { maxByteLength: 64 });
    expect(() => new Tensor('float32', new Float32Array(resizable), [4])).toThrow(/must not be backed by a resizable or growable buffer/);
    const growable = new (SharedArrayBuffer as unknown as new (n: number, o: object) => SharedArrayBuffer)(16, { maxByteLength: 64 });
    expect(() => new Tensor('float32', new Float32Array(growable) as never, [4])).toThrow(InvalidArgumentError);
    // A fixed-size SharedArrayBuffer is fine.
    expect(new Tensor('float32', new Float32Array(new SharedArrayBuffer(16)) as never, [4]).size).toBe(4);
  });

  it('rejects non-integer and negative dims, naming the index', () => {
    const d = new Float32Array(6);
    expect(() => new Tensor('float32', d, [2, 3, -1])).toThrow('Tensor.dims[2] must be a non-negative integer, got -1');
    expect(() => new Tensor('float32', d, [2.5, 3])).toThrow('Tensor.dims[0] must be a non-negative integer, got 2.5');
    expect(() => new Tensor('float32', d, [2, NaN])).toThrow('Tensor.dims[1] must be a non-negative integer, got NaN');
    expect(() => new Tensor('float32', d, [2, '3'] as never)).toThrow('Tensor.dims[1] must be a non-negative integer, got "3"');
    expect(() => new Tensor('float32', d, 6 as never)).toThrow(/Tensor.dims must be an array/);
  });

  it('rejects data whose length does not match dims', () => {
    expect(() => new Tensor('float32', new Float32Array(5), [2, 3])).toThrow(
      'Tensor.data has 5 elements but Tensor.dims [2, 3] needs 6');
  });

  it('errors are SondeErrors with a stable code', () => {
    try {
      new Tensor('float32', new Float32Array(5), [2, 3]);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(SondeError);
      expect((e as SondeError).code).toBe('ERR_SONDE_INVALID_ARGUMENT');
      expect((e as Error).name).toBe('InvalidArgumentError');
    }
  });

  it('reshape shares data and checks the element count', () => {
    const t = new Tensor('float32', new Float32Array(6), [6]);
    const r = t.reshape([3, 2]);
    expect(r.data).toBe(t.data);
    expect(r.dims).toEqual([3, 2]);
    expect(() => t.reshape([4, 2])).toThrow(/has 8 elements, the tensor has 6/);
  });

  it('zeros makes the right storage', () => {
    const z = Tensor.zeros('int64', [2, 2]);
    expect(z.data).toBeInstanceOf(BigInt64Array);
    expect(z.size).toBe(4);
    expect(() => Tensor.zeros('float32', [-1])).toThrow('Tensor.dims[0] must be a non-negative integer, got -1');
  });
});
