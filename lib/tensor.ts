/**
 * Tensor: a dtype, dims and a TypedArray. The TypedArray crosses into native code without a copy,
 * so a tensor passed to a running call must not be written to until the call settles.
 */
import { InvalidArgumentError } from './errors.js';
import { describe } from './validate.js';

export type DType = 'float32' | 'float16' | 'bfloat16' | 'int8' | 'uint8' | 'int32' | 'int64' | 'bool';

/** float16 and bfloat16 are stored as raw 16-bit patterns; bool as one byte (0 or 1) per element. */
export interface TypedArrayFor {
  float32: Float32Array;
  float16: Uint16Array;
  bfloat16: Uint16Array;
  int8: Int8Array;
  uint8: Uint8Array;
  int32: Int32Array;
  int64: BigInt64Array;
  bool: Uint8Array;
}

export type TensorData = TypedArrayFor[DType];

const arrayTypes: { [D in DType]: { name: string; ctor: new (n: number) => TypedArrayFor[D] } } = {
  float32: { name: 'Float32Array', ctor: Float32Array },
  float16: { name: 'Uint16Array', ctor: Uint16Array },
  bfloat16: { name: 'Uint16Array', ctor: Uint16Array },
  int8: { name: 'Int8Array', ctor: Int8Array },
  uint8: { name: 'Uint8Array', ctor: Uint8Array },
  int32: { name: 'Int32Array', ctor: Int32Array },
  int64: { name: 'BigInt64Array', ctor: BigInt64Array },
  bool: { name: 'Uint8Array', ctor: Uint8Array },
};

export const DTYPES = Object.keys(arrayTypes) as DType[];

/** Checks dims and returns the element count. `where` names the value in errors ("Tensor.dims"). */
export function checkDims(where: string, dims: unknown): number {
  if (!Array.isArray(dims)) throw new InvalidArgumentError(`${where} must be an array of integers, got ${describe(dims)}`);
  let size = 1;
  dims.forEach((d, i) => {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) {
      throw new InvalidArgumentError(`${where}[${i}] must be a non-negative integer, got ${describe(d)}`);
    }
    size *= d;
  });
  if (!Number.isSafeInteger(size)) throw new InvalidArgumentError(`${where} has too many elements (${dims.join('x')})`);
  return size;
}

export class Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly dims: readonly number[];
  readonly data: TypedArrayFor[D];
  readonly size: number;

  /**
   * @param dtype element type
   * @param data  TypedArray of the dtype's storage type (Float32Array for float32, Uint16Array for
   *              float16/bfloat16, BigInt64Array for int64, Uint8Array for bool, ...). Not copied.
   * @param dims  shape; defaults to [data.length]
   */
  constructor(dtype: D, data: TypedArrayFor[D], dims?: readonly number[]) {
    if (typeof dtype !== 'string' || !(dtype in arrayTypes)) {
      throw new InvalidArgumentError(`Tensor.dtype must be one of ${DTYPES.join(', ')}, got ${describe(dtype)}`);
    }
    const spec = arrayTypes[dtype];
    if (!(data instanceof spec.ctor)) {
      throw new InvalidArgumentError(`Tensor.data must be a ${spec.name} for dtype '${dtype}', got ${describe(data)}`);
    }
    // Native code holds a raw pointer into the buffer while a call runs; a buffer that can shrink
    // under it would turn that into a read or write past its end.
    const buf = data.buffer as ArrayBuffer & { resizable?: boolean; growable?: boolean };
    if (buf.resizable || buf.growable) {
      throw new InvalidArgumentError(`Tensor.data must not be backed by a resizable or growable buffer (native code keeps a pointer to it while a call runs)`);
    }
    const shape = dims === undefined ? [data.length] : dims;
    const size = checkDims('Tensor.dims', shape);
    if (size !== data.length) {
      throw new InvalidArgumentError(
        `Tensor.data has ${data.length} elements but Tensor.dims [${shape.join(', ')}] needs ${size}`,
      );
    }
    this.dtype = dtype;
    this.data = data;
    this.dims = Object.freeze([...shape]);
    this.size = size;
  }

  /** A tensor of zeros. */
  static zeros<D extends DType>(dtype: D, dims: readonly number[]): Tensor<D> {
    if (typeof dtype !== 'string' || !(dtype in arrayTypes)) {
      throw new InvalidArgumentError(`Tensor.dtype must be one of ${DTYPES.join(', ')}, got ${describe(dtype)}`);
    }
    const size = checkDims('Tensor.dims', dims);
    return new Tensor(dtype, new arrayTypes[dtype].ctor(size) as TypedArrayFor[D], dims);
  }

  /** Same data (not copied), new dims with the same element count. */
  reshape(dims: readonly number[]): Tensor<D> {
    const size = checkDims('reshape(dims)', dims);
    if (size !== this.size) {
      throw new InvalidArgumentError(`reshape(dims): [${dims.join(', ')}] has ${size} elements, the tensor has ${this.size}`);
    }
    return new Tensor(this.dtype, this.data, dims);
  }
}

/** Checks that `value` is a Tensor (of `dtype`, if given), naming `where` in the error. */
export function checkTensor<D extends DType>(where: string, value: unknown, dtype?: D): Tensor<D> {
  if (!(value instanceof Tensor)) throw new InvalidArgumentError(`${where} must be a Tensor, got ${describe(value)}`);
  if (dtype && value.dtype !== dtype) {
    throw new InvalidArgumentError(`${where} must have dtype '${dtype}', got '${value.dtype}'`);
  }
  return value as Tensor<D>;
}
