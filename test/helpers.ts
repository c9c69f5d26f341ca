import { Tensor } from '../dist/index.js';

/** Deterministic uniform [-1, 1) values (xorshift), so failures reproduce. */
export function randomF32(len: number, seed = 1): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(len);
  for (let i = 0; i < len; i++) {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

export function randomTensor(dims: number[], seed = 1): Tensor<'float32'> {
  return new Tensor('float32', randomF32(dims.reduce((a, b) => a * b, 1), seed), dims);
}

/**
 * Independent JS reference (double accumulation, row-major) and the check against it. The bound
 * per element is the classic one for a float32 dot product in any summation order:
 * |err| <= (k + 2) * u * sum_p |a_ip * b_pj| (+ |bias|), with u = 2^-24 the unit roundoff. A kernel
 * that drops, repeats or misplaces a single term exceeds it.
 */
export function expectGemmClose(got: Float32Array, a: Float32Array, b: Float32Array, m: number, k: number,
  n: number, bias?: Float32Array, relu = false): void {
  const u = 2 ** -24;
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = bias ? bias[j]! : 0;
      let mag = bias ? Math.abs(bias[j]!) : 0;
      for (let p = 0; p < k; p++) {
        const t = a[i * k + p]! * b[p * n + j]!;
        s += t;
        mag += Math.abs(t);
      }
      const want = relu && s < 0 ? 0 : s;
      const bound = (k + 2) * u * mag + 1e-30;
      const err = Math.abs(got[i * n + j]! - want);
      if (!(err <= bound)) {
        throw new Error(`C[${i}, ${j}] = ${got[i * n + j]} but reference = ${want} (|err| ${err.toExponential(3)} > bound ${bound.toExponential(3)}) for m=${m} k=${k} n=${n}`);
      }
    }
  }
}

export function maxAbsDiff(x: ArrayLike<number>, y: ArrayLike<number>): number {
  let d = 0;
  for (let i = 0; i < x.length; i++) d = Math.max(d, Math.abs(x[i]! - y[i]!));
  return d;
}
