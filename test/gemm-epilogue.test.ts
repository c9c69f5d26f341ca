import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, Tensor, devices, kernels } from '../dist/index.js';
import { randomTensor } from './helpers.js';

const simd = devices().cpu.simd;
const variants: kernels.GemmVariant[] = ['reference', 'scalar',
  ...(simd !== 'scalar' ? ['avx2' as const] : []), ...(simd === 'avx512' ? ['avx512' as const] : [])];

/** erf in double: Taylor series below 3, continued fraction of erfc above (both ~1e-15). */
function erf(x: number): number {
  const ax = Math.abs(x);
  if (Number.isNaN(x)) return NaN;
  if (ax < 3) {
    let term = x;
    let sum = x;
    for (let n = 1; n < 80; n++) {
      term *= (-x * x) / n;
      sum += term / (2 * n + 1);
    }
    return (2 / Math.sqrt(Math.PI)) * sum;
  }
  if (ax > 10) return Math.sign(x);
  let f = ax;
  for (let n = 60; n >= 1; n--) f = ax + n / 2 / f;
  const erfc = Math.exp(-ax * ax) / Math.sqrt(Math.PI) / f;
  return Math.sign(x) * (1 - erfc);
}

type Act = kernels.GemmActivation;
// Double-precision activations and their Lipschitz constants (max |d act / dv|).
const acts: Record<Act, { f: (v: number) => number; lip: number; opts?: Partial<kernels.GemmOptions> }> = {
  none: { f: (v) => v, lip: 1 },
  relu: { f: (v) => (v < 0 ? 0 : v), lip: 1 },
  relu6: { f: (v) => Math.min(Math.max(v, 0), 6), lip: 1 },
  clip: { f: (v) => Math.min(Math.max(v, -0.5), 0.75), lip: 1, opts: { clipMin: -0.5, clipMax: 0.75 } },
  silu: { f: (v) => v / (1 + Math.exp(-v)), lip: 1.1 },
  gelu: { f: (v) => 0.5 * v * (1 + erf(v / Math.SQRT2)), lip: 1.13 },
  geluTanh: { f: (v) => 0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v ** 3))), lip: 1.13 },
  sigmoid: { f: (v) => 1 / (1 + Math.exp(-v)), lip: 0.25 },
  leakyRelu: { f: (v) => (v < 0 ? 0.2 * v : v), lip: 1, opts: { alpha: 0.2 } },
  hardSwish: { f: (v) => (v * Math.min(Math.max(v + 3, 0), 6)) / 6, lip: 1.5 },
};

interface Case { m: number; k: number; n: number; scale: boolean; bias: boolean; residual: 'none' | 'before' | 'after' }

/**
 * Bound per element: the GEMM sum has |err| <= (k+2) u sum|a b|; scale multiplies it, each later
 * float op adds u of its result, the activation multiplies by its Lipschitz constant, and the
 * SIMD activations add their approximation error (erf: 1.5e-7 absolute, scaled by |v|/2 in GELU;
 * exp-based ones: a few ulp, covered by 4u |act(v)|).
 */
function check(c: Case, act: Act, got: Float32Array, a: Float32Array, b: Float32Array, s?: Float32Array,
  bias?: Float32Array, r?: Float32Array, ldr = c.n, ldc = c.n): void {
  const u = 2 ** -24;
  const { f, lip } = acts[act];
  for (let i = 0; i < c.m; i++) {
    for (let j = 0; j < c.n; j++) {
      let acc = 0;
      let mag = 0;
      for (let p = 0; p < c.k; p++) {
        const t = a[i * c.k + p]! * b[p * c.n + j]!;
        acc += t;
        mag += Math.abs(t);
      }
      const sc = s ? s[j]! : 1;
      let v = acc * sc + (bias ? bias[j]! : 0);
      let err = (c.k + 2) * u * mag * Math.abs(sc) + 2 * u * Math.abs(v);
      const rv = r ? r[i * ldr + j]! : 0;
      if (c.residual === 'before') { v += rv; err += u * Math.abs(v); }
      let want = f(v);
      err = lip * err + 4 * u * Math.abs(want) + 1e-7 * Math.abs(v);
      if (c.residual === 'after') { want += rv; err += u * Math.abs(want); }
      const g = got[i * ldc + j]!;
      if (!(Math.abs(g - want) <= err + 1e-30)) {
        throw new Error(`${act} ${JSON.stringify(c)}: C[${i},${j}] = ${g}, want ${want} (|err| ${Math.abs(g - want).toExponential(3)} > ${err.toExponential(3)})`);
      }
    }
  }
}

const cases: Case[] = [
  { m: 13, k: 37, n: 33, scale: true, bias: true, residual: 'none' },
  { m: 1, k: 1, n: 1, scale: true, bias: true, residual: 'after' },
  { m: 7, k: 300, n: 17, scale: false, bias: true, residual: 'before' },
  { m: 25, k: 8, n: 65, scale: true, bias: false, residual: 'after' },
  { m: 12, k: 1, n: 32, scale: false, bias: false, residual: 'before' },
];

describe.each(variants)('gemm epilogues, variant %s', (variant) => {
  it.each(Object.keys(acts) as Act[])('%s with scale, bias and residual', async (act) => {
    for (const c of cases) {
      // Scaled so that pre-activation values cover the interesting ranges (|v| up to ~8).
      const a = randomTensor([c.m, c.k], c.m + c.k);
      for (let i = 0; i < a.size; i++) a.data[i]! *= 3 / Math.sqrt(c.k);
      const b = randomTensor([c.k, c.n], c.n + 1);
      const scale = c.scale ? randomTensor([c.n], 7) : undefined;
      const bias = c.bias ? randomTensor([c.n], 8) : undefined;
      const residual = c.residual !== 'none' ? randomTensor([c.m, c.n + 3], 9) : undefined;
      const out = await kernels.gemm(a, b, {
        variant, activation: act, scale, bias, residual, residualBeforeActivation: c.residual === 'before',
        ...acts[act].opts,
      });
      check(c, act, out.data, a.data, b.data, scale?.data, bias?.data, residual?.data, c.n + 3);
    }
  });

  it('propagates NaN and Inf as IEEE says', async () => {
    const a = new Tensor('float32', new Float32Array([NaN, 1, Infinity, 1, -Infinity, 1, 1, 1]), [4, 2]);
    const b = new Tensor('float32', new Float32Array([1, 2, 0, 1]), [2, 2]);
    const plain = await kernels.gemm(a, b, { variant });
    expect(Array.from(plain.data)).toEqual([NaN, NaN, Infinity, Infinity, -Infinity, -Infinity, 1, 3]);
    const relu = await kernels.gemm(a, b, { variant, activation: 'relu' });
    expect(Array.from(relu.data)).toEqual([NaN, NaN, Infinity, Infinity, 0, 0, 1, 3]);
    const sig = await kernels.gemm(a, b, { variant, activation: 'sigmoid' });
    expect(sig.data[0]).toBeNaN();
    expect(sig.data[2]).toBe(1);
    expect(sig.data[4]).toBe(0);
    const clip = await kernels.gemm(a, b, { variant, activation: 'relu6' });
    expect(Array.from(clip.data)).toEqual([NaN, NaN, 6, 6, 0, 0, 1, 3]);
    // Inf * 0 inside the sum is NaN.
    const z = new Tensor('float32', new Float32Array([Infinity, 0]), [1, 2]);
    const bz = new Tensor('float32', new Float32Array([0, 1, 1, 1]), [2, 2]);
    expect(Array.from((await kernels.gemm(z, bz, { variant })).data)).toEqual([NaN, Infinity]);
  });
});

describe('leading dimensions', () => {
  it.each(variants)('%s: a with lda > k, out with ldc > n (other columns untouched)', async (variant) => {
    const [m, k, n, lda, ldc] = [9, 20, 35, 27, 40];
    const a = randomTensor([m, lda], 1);
    const b = randomTensor([k, n], 2);
    const out = new Tensor('float32', new Float32Array(m * ldc).fill(-7), [m, ldc]);
    const res = await kernels.gemm(a, b, { variant, k, out, bias: randomTensor([n], 3), activation: 'relu' });
    expect(res).toBe(out);
    const dense = new Float32Array(m * k);
    for (let i = 0; i < m; i++) dense.set(a.data.subarray(i * lda, i * lda + k), i * k);
    const want = await kernels.gemm(new Tensor('float32', dense, [m, k]), b, { variant: 'reference', bias: randomTensor([n], 3), activation: 'relu' });
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < ldc; j++) {
        if (j < n) expect(Math.abs(out.data[i * ldc + j]! - want.data[i * n + j]!)).toBeLessThan(1e-4);
        else expect(out.data[i * ldc + j]).toBe(-7);
      }
    }
  });

  it('bad leading dimensions and epilogue operands are typed errors', async () => {
    const a = randomTensor([4, 6]);
    const b = randomTensor([6, 5]);
    await expect(kernels.gemm(a, b, { k: 7 })).rejects.toThrow("gemm: options.k (7) exceeds a's row length (6); a's leading dimension must be at least K");
    await expect(kernels.gemm(a, b, { k: 5 })).rejects.toThrow(/shape mismatch: a is \[4, 6\] using k = 5 but b is \[6, 5\]/);
    await expect(kernels.gemm(a, b, { out: randomTensor([4, 4]) })).rejects.toThrow('gemm: options.out must have dims [4, ldc] with ldc >= 5, got [4, 4]');
    await expect(kernels.gemm(a, b, { out: randomTensor([3, 5]) })).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.gemm(a, b, { residual: randomTensor([4, 4]) })).rejects.toThrow(/options.residual must have dims \[4, ldr\] with ldr >= 5/);
    await expect(kernels.gemm(a, b, { scale: randomTensor([6]) })).rejects.toThrow('gemm: options.scale must have dims [5], got [6]');
    await expect(kernels.gemm(a, b, { activation: 'clip', clipMin: 0 })).rejects.toThrow(/needs options.clipMin and options.clipMax/);
    await expect(kernels.gemm(a, b, { activation: 'clip', clipMin: 2, clipMax: 1 })).rejects.toThrow(/must not exceed/);
    await expect(kernels.gemm(a, b, { activation: 'relu', alpha: 0.1 })).rejects.toThrow("options.alpha has no effect with activation 'relu'");
    await expect(kernels.gemm(a, b, { activation: 'leakyRelu', alpha: NaN })).rejects.toThrow(/options.alpha must be a number/);
    const out = new Tensor('float32', a.data, [4, 6]);
    await expect(kernels.gemm(a, randomTensor([6, 6]), { out })).rejects.toThrow('options.out must not share memory with a');
    const w = kernels.packGemmWeights(randomTensor([5, 5]));
    await expect(kernels.gemm(a, w)).rejects.toThrow(/shape mismatch: a is \[4, 6\] but b \(packed weights\) is \[5, 5\]/);
    w.dispose();
  });
});
