import { describe, expect, it } from 'vitest';
import {
  AbortError, DeviceUnavailableError, InvalidArgumentError, Tensor, devices, kernels,
} from '../dist/index.js';
import { randomF32, randomTensor } from './helpers.js';

const simd = devices().cpu.simd;
type Variant = kernels.ElementwiseVariant;
const simdVariants: Variant[] = [...(simd !== 'scalar' ? ['avx2' as const] : []), ...(simd === 'avx512' ? ['avx512' as const] : [])];
const runnable: Variant[] = ['reference', 'scalar', 'auto', ...simdVariants];
// Variants checked against the reference variant: the scalar path and every SIMD level here.
const fast: Variant[] = ['scalar', ...simdVariants];

// Tile edges: the vector widths are 8 (avx2) and 16 (avx512) floats, and the reductions unroll by
// 2 to 4 vectors (up to 64 floats); each length sits below, at or above one of them.
const EDGES = [1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000];

const u = 2 ** -24;            // unit roundoff of float32
const SUB = 2 ** -149;         // smallest subnormal: the absolute grid of tiny results
const f32 = (v: number) => Math.fround(v);
const t32 = (data: ArrayLike<number>, dims: number[]) => new Tensor('float32', Float32Array.from(data), dims);

function expectClose(got: ArrayLike<number>, want: ArrayLike<number>, tol: (i: number) => number, label: string): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    const g = got[i]!, w = want[i]!;
    if (g === w) continue;
    if (Number.isNaN(w)) {
      if (!Number.isNaN(g)) throw new Error(`${label}[${i}] = ${g}, expected NaN`);
      continue;
    }
    if (!Number.isFinite(w)) {
      if (g !== w) throw new Error(`${label}[${i}] = ${g}, expected ${w}`);
      continue;
    }
    const err = Math.abs(g - w);
    if (!(err <= tol(i))) {
      throw new Error(`${label}[${i}] = ${g} but reference = ${w} (|err| ${err.toExponential(3)} > tol ${tol(i).toExponential(3)})`);
    }
  }
}

// ---- independent double-precision references ----

// erf by its Taylor series (|x| < 2.5: terms peak near 16, so ~1e-15 relative) and erfc by its
// continued fraction beyond (60 terms converge to ~1e-13 there). JS has no erf of its own.
function erfcPositive(x: number): number {
  let cf = 0;
  for (let k = 60; k >= 1; k--) cf = (k / 2) / (x + cf);
  return Math.exp(-x * x) / Math.sqrt(Math.PI) / (x + cf);
}
function erf(x: number): number {
  const ax = Math.abs(x);
  if (ax >= 2.5) return Math.sign(x) * (1 - erfcPositive(ax));
  let term = x, sum = x;
  for (let n = 1; n < 100; n++) {
    term *= (-x * x) / n;
    const t = term / (2 * n + 1);
    sum += t;
    if (Math.abs(t) < 1e-18 * Math.abs(sum)) break;
  }
  return (2 / Math.sqrt(Math.PI)) * sum;
}
function erfc(x: number): number {
  if (x >= 2.5) return erfcPositive(x);
  if (x <= -2.5) return 2 - erfcPositive(-x);
  return 1 - erf(x);
}
const clampNegInf = (x: number) => (x < -3.4028234663852886e38 ? -3.4028234663852886e38 : x);
const sigmoidRef = (x: number) => (x >= 0 ? 1 / (1 + Math.exp(-x)) : Math.exp(x) / (1 + Math.exp(x)));
const geluTanhArg = (x: number) => 2 * Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x);

type UnaryName = 'geluErf' | 'geluTanh' | 'silu' | 'sigmoid' | 'tanh' | 'exp' | 'relu';
const unaryRef: Record<UnaryName, (x: number) => number> = {
  geluErf: (x) => { x = clampNegInf(x); return 0.5 * x * erfc(-x / Math.SQRT2); },
  geluTanh: (x) => { x = clampNegInf(x); return x * sigmoidRef(geluTanhArg(x)); },
  silu: (x) => { x = clampNegInf(x); return x * sigmoidRef(x); },
  sigmoid: sigmoidRef,
  tanh: Math.tanh,
  exp: Math.exp,
  relu: (x) => (x < 0 ? 0 : x),
};

// Tolerances, from the accuracy stated in native/kernels/elementwise/elementwise.h (with about 2x
// margin). One ulp of y is at most 2u|y|; results in the subnormal range sit on a grid of SUB.
//   exp <= 1 ulp; tanh <= 1.1 ulp; sigmoid <= 2.1 ulp.
//   silu, gelu(tanh): (4 + |a|) u relative, a = the inner exp's argument (rounding a costs u|a| after
//     exponentiation), plus |x| SUB where exp(-|a|) itself is subnormal.
//   gelu(erf): 3u |x| absolute (1 + erf cancels in the far negative tail).
const unaryTol: Record<UnaryName, (x: number, y: number) => number> = {
  exp: (_x, y) => 4 * u * Math.abs(y) + SUB,
  tanh: (_x, y) => 5 * u * Math.abs(y) + SUB,
  sigmoid: (_x, y) => 9 * u * Math.abs(y) + SUB,
  silu: (x, y) => (10 + 2 * Math.abs(x)) * u * Math.abs(y) + 2 * Math.abs(x) * SUB + SUB,
  geluTanh: (x, y) => (10 + 3 * Math.abs(geluTanhArg(x))) * u * Math.abs(y) + 2 * Math.abs(x) * SUB + SUB,
  geluErf: (x, y) => 6 * u * Math.abs(x) + 2 * u * Math.abs(y) + SUB,
  relu: () => 0,
};

async function runUnary(name: UnaryName, x: Tensor<'float32'>, options: kernels.ElementwiseOptions = {}) {
  switch (name) {
    case 'geluErf': return kernels.gelu(x, { ...options, approximate: 'none' });
    case 'geluTanh': return kernels.gelu(x, { ...options, approximate: 'tanh' });
    default: return kernels[name](x, options);
  }
}

function strides(dims: number[]): number[] {
  const s = new Array<number>(dims.length).fill(1);
  for (let i = dims.length - 2; i >= 0; i--) s[i] = s[i + 1]! * dims[i + 1]!;
  return s;
}

function binaryRef(op: (a: number, b: number) => number, a: Float32Array, ad: number[], b: Float32Array, bd: number[], yd: number[]): number[] {
  const r = yd.length;
  const pa = [...Array(r - ad.length).fill(1), ...ad], pb = [...Array(r - bd.length).fill(1), ...bd];
  const sa = strides(pa), sb = strides(pb);
  const size = yd.reduce((p, d) => p * d, 1);
  const out: number[] = [];
  for (let i = 0; i < size; i++) {
    let rem = i, ia = 0, ib = 0;
    for (let d = r - 1; d >= 0; d--) {
      const idx = rem % yd[d]!;
      rem = Math.floor(rem / yd[d]!);
      if (pa[d] !== 1) ia += idx * sa[d]!;
      if (pb[d] !== 1) ib += idx * sb[d]!;
    }
    out.push(f32(op(a[ia]!, b[ib]!)));
  }
  return out;
}

/** Calls fn(slice offsets) for every slice along axis; returns [outer, n, inner]. */
function slices(dims: readonly number[], axis: number, fn: (idx: number[]) => void): void {
  const n = dims[axis]!;
  const inner = dims.slice(axis + 1).reduce((p, d) => p * d, 1);
  const outer = dims.slice(0, axis).reduce((p, d) => p * d, 1);
  for (let o = 0; o < outer; o++) {
    for (let i = 0; i < inner; i++) fn(Array.from({ length: n }, (_, j) => o * n * inner + j * inner + i));
  }
}

// Softmax: y_i = e^(x_i - m) / S. Each exp is within 2u relative of exact (1 ulp) once its
// argument is formed; forming x_i - m in float rounds it by u|x_i - m|, which exponentiation turns
// into a relative error of u|x_i - m|; S (n terms) adds at most n u relative whatever the order;
// the final scale 2u. Doubled for margin.
function expectSoftmax(got: Float32Array, x: Float32Array, dims: readonly number[], axis: number, label: string): void {
  const want = new Float64Array(x.length);
  const tol = new Float64Array(x.length);
  slices(dims, axis, (idx) => {
    let m = -Infinity;
    for (const i of idx) if (x[i]! > m) m = x[i]!;
    const hasNaN = idx.some((i) => Number.isNaN(x[i]!));
    let s = 0;
    for (const i of idx) s += Math.exp(x[i]! - m);
    for (const i of idx) {
      want[i] = hasNaN ? NaN : Math.exp(x[i]! - m) / s;
      tol[i] = 2 * want[i]! * (4 * u + u * Math.abs(x[i]! - m) + (idx.length + 4) * u) + SUB;
    }
  });
  expectClose(got, want, (i) => tol[i]!, label);
}

// Layer norm, worst-case float error whatever the summation order (n u per n-term sum):
// mean: d_mu <= n u mean|x|; variance: relative (n + 2) u (d_mu only enters to second order), so
// rstd is within ((n + 2)/2 + 3) u; then y = (x - mu) rstd gamma + beta adds a few roundings:
// |dy| <= |g| rstd (d_mu + u|x - mu|) + |g z| ((n + 2)/2 + 5) u + u|y|. Doubled for margin.
function expectLayerNorm(got: Float32Array, x: Float32Array, rows: number, n: number, eps: number,
  gamma: Float32Array | null, beta: Float32Array | null, label: string): void {
  const want = new Float64Array(x.length);
  const tol = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    let s = 0, sa = 0;
    for (let j = 0; j < n; j++) { s += x[r * n + j]!; sa += Math.abs(x[r * n + j]!); }
    const mu = s / n;
    let v = 0;
    for (let j = 0; j < n; j++) v += (x[r * n + j]! - mu) ** 2;
    const rstd = 1 / Math.sqrt(v / n + f32(eps));
    const dmu = n * u * (sa / n);
    for (let j = 0; j < n; j++) {
      const i = r * n + j;
      const g = gamma ? gamma[j]! : 1;
      const z = (x[i]! - mu) * rstd;
      want[i] = z * g + (beta ? beta[j]! : 0);
      tol[i] = 2 * (Math.abs(g) * rstd * (dmu + u * Math.abs(x[i]! - mu)) + Math.abs(g * z) * ((n + 2) / 2 + 5) * u + u * Math.abs(want[i]!)) + SUB;
    }
  }
  expectClose(got, want, (i) => tol[i]!, label);
}

// RMS norm: mean square relative (n + 1) u, so its rsqrt within ((n + 1)/2 + 3) u; two products.
function expectRmsNorm(got: Float32Array, x: Float32Array, rows: number, n: number, eps: number, gamma: Float32Array | null, label: string): void {
  const want = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let j = 0; j < n; j++) ss += x[r * n + j]! ** 2;
    const rr = 1 / Math.sqrt(ss / n + f32(eps));
    for (let j = 0; j < n; j++) want[r * n + j] = x[r * n + j]! * rr * (gamma ? gamma[j]! : 1);
  }
  expectClose(got, want, (i) => 2 * Math.abs(want[i]!) * ((n + 1) / 2 + 6) * u + SUB, label);
}

const bits = (x: number) => new Uint32Array(Float32Array.of(x).buffer)[0]!;
const fromBits = (b: number) => new Float32Array(Uint32Array.of(b >>> 0).buffer)[0]!;

/** Independent float32 -> 16-bit rounding: exact arithmetic on doubles, nearest even. */
function roundTo16(x: number, mantBits: number, minExp: number, maxFinite: number): number {
  if (Number.isNaN(x) || !Number.isFinite(x) || x === 0) return x;
  const ax = Math.abs(x);
  const e = Math.max(Math.floor(Math.log2(ax)), minExp);
  const q = 2 ** (e - mantBits);
  let m = ax / q;
  const fl = Math.floor(m);
  const frac = m - fl;
  m = frac > 0.5 || (frac === 0.5 && fl % 2 === 1) ? fl + 1 : fl;
  const r = m * q;
  return Math.sign(x) * (r > maxFinite ? Infinity : r);
}
const toF16 = (x: number) => roundTo16(x, 10, -14, 65504);
const toBf16 = (x: number) => roundTo16(x, 7, -126, 3.3895313892515355e38);
function f16Value(h: number): number {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15));
}
const bf16Value = (h: number) => fromBits(h << 16);

// =====================================================================================

describe('binary ops with broadcasting', () => {
  const ops = {
    add: (a: number, b: number) => a + b,
    sub: (a: number, b: number) => a - b,
    mul: (a: number, b: number) => a * b,
    div: (a: number, b: number) => a / b,
  } as const;
  // [a dims, b dims]: same shape at tile edges, scalar, row, column, 3-D both ways, rank mismatch.
  const cases: [number[], number[]][] = [
    ...EDGES.map((n) => [[n], [n]] as [number[], number[]]),
    [[37], [1]], [[1], [37]], [[5, 7], []], [[], []], [[3, 65], [65]], [[65], [3, 65]], [[17, 33], [17, 1]],
    [[17, 1], [1, 33]], [[2, 3, 4], [3, 1]], [[4, 1, 5], [1, 3, 1]], [[2, 1, 33], [2, 7, 1]], [[3, 0], [1]],
    [[1, 1, 1], [1]], [[2, 3, 17], [2, 3, 17]],
  ];
  describe.each(runnable)('variant %s', (variant) => {
    it.each(Object.keys(ops) as (keyof typeof ops)[])('%s is exactly rounded on every broadcast case', async (op) => {
      for (const [ad, bd] of cases) {
        const a = randomTensor(ad, 3 + ad.length);
        const b = randomTensor(bd, 7 + bd.length);
        const y = await kernels[op](a, b, { variant });
        const yd = kernels.broadcastShapes('t', ad, bd);
        expect(y.dims).toEqual(yd);
        // +, -, *, / of floats done in double and rounded once equal the float operation exactly.
        expect(Array.from(y.data)).toEqual(binaryRef(ops[op], a.data, ad, b.data, bd, yd));
      }
    });
  });

  it('hand-checked broadcasts, IEEE specials and NaN propagation', async () => {
    const col = t32([1, 2], [2, 1]);
    const row = t32([10, 20, 30], [3]);
    expect(Array.from((await kernels.add(col, row)).data)).toEqual([11, 21, 31, 12, 22, 32]);
    expect(Array.from((await kernels.sub(row, col)).data)).toEqual([9, 19, 29, 8, 18, 28]);
    const y = await kernels.div(t32([1, -1, 0, NaN, Infinity, 2], [6]), t32([0, 0, 0, 1, Infinity, NaN], [6]));
    expect(Array.from(y.data)).toEqual([Infinity, -Infinity, NaN, NaN, NaN, NaN]);
    expect(Array.from((await kernels.mul(t32([NaN, 3], [2]), t32([2], [1]))).data)).toEqual([NaN, 6]);
  });
});

describe('unary activations', () => {
  const names = Object.keys(unaryRef) as UnaryName[];
  const specials = [NaN, Infinity, -Infinity, 0, -0, 1e-40, -1e-40, 1e-8, -1e-8, 0.5, -0.5, 0.625, -0.625, 3, -3, 4.5,
    -4.5, 9, -9.6, 20, -20, 87, -87, 88.7, -88.7, 89, -89, 95, -95, 103.9, -103.9, 120, -120, 3e38, -3e38];
  const grid = Float32Array.from({ length: 4001 }, (_, i) => -100 + i * 0.05);
  describe.each(runnable)('variant %s', (variant) => {
    it.each(names)('%s matches the double-precision reference within its stated accuracy', async (name) => {
      for (const data of [Float32Array.from(specials), grid, randomF32(1000, 5).map((v) => v * 12)]) {
        const x = new Tensor('float32', data, [data.length]);
        const y = await runUnary(name, x, { variant });
        const want = Array.from(data, (v) => f32(unaryRef[name](v)));   // overflow to Inf as float32 does
        expectClose(y.data, want, (i) => unaryTol[name](data[i]!, want[i]!), `${variant} ${name}`);
      }
    });
  });

  it.each(fast)('%s agrees with the reference variant at every tile edge', async (variant) => {
    for (const name of names) {
      for (const n of EDGES) {
        const x = new Tensor('float32', randomF32(n, n).map((v) => v * 9), [n]);
        const got = await runUnary(name, x, { variant });
        const ref = await runUnary(name, x, { variant: 'reference' });
        // The reference is within half an ulp of exact, so the fast variant's own bound (which
        // has at least 2x margin) covers both.
        expectClose(got.data, ref.data, (i) => unaryTol[name](x.data[i]!, ref.data[i]!), `${variant} ${name} n=${n}`);
      }
    }
  });

  it('hand-checked values and limits', async () => {
    const x = t32([0, 1, -1, -Infinity, Infinity, NaN], [6]);
    expect(Array.from((await kernels.relu(x)).data)).toEqual([0, 1, 0, 0, Infinity, NaN]);
    const s = await kernels.sigmoid(x);
    expect(s.data[0]).toBe(0.5);
    expect(Array.from(s.data.slice(3))).toEqual([0, 1, NaN]);
    // silu and gelu tend to -0 at -Inf rather than -Inf * 0 = NaN.
    for (const y of [await kernels.silu(x), await kernels.gelu(x), await kernels.gelu(x, { approximate: 'tanh' })]) {
      expect(y.data[0]).toBe(0);
      expect(Object.is(y.data[3], -0)).toBe(true);
      expect(y.data[4]).toBe(Infinity);
      expect(y.data[5]).toBeNaN();
    }
    expect(Math.abs((await kernels.gelu(x)).data[1]! - 0.8413447460685429)).toBeLessThan(3e-7);
    expect(Array.from((await kernels.tanh(x)).data.slice(3))).toEqual([-1, 1, NaN]);
    expect(Array.from((await kernels.exp(t32([0, -Infinity, Infinity, -200, 100], [5]))).data)).toEqual([1, 0, Infinity, 0, Infinity]);
  });
});

describe('softmax', () => {
  describe.each(runnable)('variant %s', (variant) => {
    it('rows at every tile edge, with row counts that are not multiples of a vector', async () => {
      for (const n of EDGES) {
        for (const rows of [1, 3]) {
          const x = randomTensor([rows, n], n + rows);
          for (let i = 0; i < x.size; i++) x.data[i]! *= 8;
          expectSoftmax((await kernels.softmax(x, { variant })).data, x.data, [rows, n], 1, `${variant} [${rows}, ${n}]`);
        }
      }
    });

    it('each axis of a 3-D tensor, positive and negative', async () => {
      for (const dims of [[3, 4, 5], [2, 17, 33], [5, 1, 40], [2, 300, 3]]) {
        const x = randomTensor(dims, dims[1]!);
        for (let axis = -3; axis < 3; axis++) {
          const y = await kernels.softmax(x, { variant, axis });
          expectSoftmax(y.data, x.data, dims, (axis + 3) % 3, `${variant} [${dims}] axis ${axis}`);
        }
      }
    });

    it('large magnitudes, -Inf entries and NaN', async () => {
      const x = t32([1e4, 1e4 - 1, -1e4, 1e4, -Infinity, 0, 5, -Infinity, 2, NaN, 1, 3, 1e30, -1e30, 0, 1], [4, 4]);
      const y = await kernels.softmax(x, { variant });
      expectSoftmax(y.data, x.data, [4, 4], 1, variant);
      expect(y.data[4]).toBe(0);
      expect(y.data[7]).toBe(0);
      expect(Array.from(y.data.slice(8, 12)).every(Number.isNaN)).toBe(true);   // a NaN poisons its row only
      expect(y.data[12]).toBe(1);
      const big = new Tensor('float32', Float32Array.from({ length: 100 }, (_, i) => 1e4 + (i % 7)), [100]);
      expectSoftmax((await kernels.softmax(big, { variant })).data, big.data, [100], 0, `${variant} 1e4`);
    });
  });

  it.each(fast)('%s agrees with the reference variant on non-last axes at tile edges', async (variant) => {
    for (const inner of [1, 7, 16, 17, 33, 300]) {
      const x = randomTensor([2, 5, inner], inner);
      const ref = await kernels.softmax(x, { variant: 'reference', axis: 1 });
      const got = await kernels.softmax(x, { variant, axis: 1 });
      expectSoftmax(got.data, x.data, [2, 5, inner], 1, `${variant} inner ${inner}`);
      expectClose(got.data, ref.data, (i) => 2 * (20 * u) * ref.data[i]! + SUB, `${variant} vs reference`);
    }
  });

  it('hand-checked', async () => {
    expect(Array.from((await kernels.softmax(t32([0, 0, 0, 0], [4]))).data)).toEqual([0.25, 0.25, 0.25, 0.25]);
    const y = await kernels.softmax(t32([0, Math.log(3)], [2]));
    expect(y.data[0]).toBeCloseTo(0.25, 6);
    expect(y.data[1]).toBeCloseTo(0.75, 6);
  });
});

describe('layerNorm and rmsNorm', () => {
  describe.each(runnable)('variant %s', (variant) => {
    it('rows at every tile edge, with and without gamma/beta', async () => {
      for (const n of EDGES) {
        const x = randomTensor([3, n], n);
        for (let i = 0; i < x.size; i++) x.data[i] = x.data[i]! * 4 + 3;   // an offset mean tests the two-pass variance
        const gamma = randomTensor([n], n + 1);
        const beta = randomTensor([n], n + 2);
        expectLayerNorm((await kernels.layerNorm(x, { variant })).data, x.data, 3, n, 1e-5, null, null, `${variant} n=${n}`);
        expectLayerNorm((await kernels.layerNorm(x, { variant, gamma, beta, epsilon: 1e-3 })).data, x.data, 3, n, 1e-3,
          gamma.data, beta.data, `${variant} affine n=${n}`);
        expectRmsNorm((await kernels.rmsNorm(x, { variant })).data, x.data, 3, n, 1e-6, null, `${variant} rms n=${n}`);
        expectRmsNorm((await kernels.rmsNorm(x, { variant, gamma, epsilon: 0.5 })).data, x.data, 3, n, 0.5, gamma.data, `${variant} rms g n=${n}`);
      }
    });

    it('normalises over dims[axis:] (ONNX LayerNormalization), gamma shaped like them', async () => {
      const x = randomTensor([2, 3, 5], 11);
      for (const [axis, rows, n] of [[-1, 6, 5], [-2, 2, 15], [1, 2, 15], [0, 1, 30], [-3, 1, 30]] as const) {
        const normDims = x.dims.slice((axis + 3) % 3);
        const gamma = randomTensor(normDims, 12);
        const beta = randomTensor(normDims, 13);
        const y = await kernels.layerNorm(x, { variant, axis, gamma, beta });
        expect(y.dims).toEqual([2, 3, 5]);
        expectLayerNorm(y.data, x.data, rows, n, 1e-5, gamma.data, beta.data, `${variant} axis ${axis}`);
      }
    });
  });

  it.each(fast)('%s agrees with the reference variant at tile edges', async (variant) => {
    for (const n of EDGES) {
      const x = randomTensor([5, n], 3 * n);
      const ref = await kernels.layerNorm(x, { variant: 'reference' });
      const got = await kernels.layerNorm(x, { variant });
      expectLayerNorm(got.data, x.data, 5, n, 1e-5, null, null, `${variant} n=${n}`);
      expect(Math.max(...got.data.map((v, i) => Math.abs(v - ref.data[i]!)))).toBeLessThan(1e-4);
      const rref = await kernels.rmsNorm(x, { variant: 'reference' });
      expectRmsNorm((await kernels.rmsNorm(x, { variant })).data, x.data, 5, n, 1e-6, null, `${variant} rms n=${n}`);
      expectRmsNorm(rref.data, x.data, 5, n, 1e-6, null, `reference rms n=${n}`);
    }
  });

  it('hand-checked: constant rows, and NaN stays in its row', async () => {
    const y = await kernels.layerNorm(t32([1, 2, 3, 4, 7, 7, 7, 7, 1, NaN, 3, 4], [3, 4]), { epsilon: 0 });
    const s = Math.sqrt(1.25);
    expect(Array.from(y.data.slice(0, 4)).map((v) => Number(v.toFixed(5)))).toEqual([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s].map((v) => Number(v.toFixed(5))));
    expect(Array.from(y.data.slice(4, 8)).every(Number.isNaN)).toBe(true);   // 0 / sqrt(0 + 0)
    expect(Array.from(y.data.slice(8)).every(Number.isNaN)).toBe(true);
    const r = await kernels.rmsNorm(t32([3, 4], [1, 2]), { epsilon: 0, gamma: t32([2, 1], [2]) });
    expect(r.data[0]).toBeCloseTo((3 / Math.sqrt(12.5)) * 2, 6);
    expect(r.data[1]).toBeCloseTo(4 / Math.sqrt(12.5), 6);
  });
});

describe('argmax and topK', () => {
  it('argmax along each axis, first index on ties, NaN counts as largest, keepDims', async () => {
    const x = t32([1, 5, 5, 2, 9, 0, NaN, 1, 3, 3, 3, 3], [3, 4]);
    const last = await kernels.argmax(x);
    expect(last.dtype).toBe('int64');
    expect(last.dims).toEqual([3]);
    expect(Array.from(last.data)).toEqual([1n, 2n, 0n]);
    const first = await kernels.argmax(x, { axis: 0, keepDims: true });
    expect(first.dims).toEqual([1, 4]);
    expect(Array.from(first.data)).toEqual([1n, 0n, 1n, 2n]);
    const r = randomTensor([3, 7, 5], 4);
    for (let axis = 0; axis < 3; axis++) {
      const got = await kernels.argmax(r, { axis });
      const want: bigint[] = [];
      slices(r.dims, axis, (idx) => {
        let best = 0;
        idx.forEach((i, j) => { if (r.data[i]! > r.data[idx[best]!]!) best = j; });
        want.push(BigInt(best));
      });
      expect(Array.from(got.data)).toEqual(want);
    }
  });

  it('topK: sorted, stable among ties, largest and smallest, any axis', async () => {
    const x = t32([3, 1, 3, 2, 3, 1], [6]);
    const big = await kernels.topK(x, 4);
    expect(Array.from(big.values.data)).toEqual([3, 3, 3, 2]);
    expect(Array.from(big.indices.data)).toEqual([0n, 2n, 4n, 3n]);
    const small = await kernels.topK(x, 3, { largest: false });
    expect(Array.from(small.values.data)).toEqual([1, 1, 2]);
    expect(Array.from(small.indices.data)).toEqual([1n, 5n, 3n]);
    const nan = await kernels.topK(t32([1, NaN, Infinity, -Infinity], [4]), 4);
    expect(Array.from(nan.values.data)).toEqual([NaN, Infinity, 1, -Infinity]);
    const r = randomTensor([4, 33, 6], 9);
    for (let axis = 0; axis < 3; axis++) {
      for (const largest of [true, false]) {
        const k = Math.min(5, r.dims[axis]!);
        const { values, indices } = await kernels.topK(r, k, { axis, largest });
        expect(values.dims).toEqual(r.dims.map((d, i) => (i === axis ? k : d)));
        const want: number[][] = [];
        slices(r.dims, axis, (idx) => {
          const order = idx.map((i, j) => [r.data[i]!, j] as const).sort((p, q) => (largest ? q[0] - p[0] : p[0] - q[0]) || p[1] - q[1]);
          want.push(order.slice(0, k).map((o) => o[1]));
        });
        const got: number[][] = [];
        const gotValues: number[][] = [];
        slices(values.dims, axis, (idx) => {
          got.push(idx.map((i) => Number(indices.data[i])));
          gotValues.push(idx.map((i) => values.data[i]!));
        });
        expect(got).toEqual(want);
        // values are the inputs at those indices (slices of x and of the outputs come in the same order)
        const wantValues: number[][] = [];
        let s = 0;
        slices(r.dims, axis, (idx) => { wantValues.push(want[s++]!.map((j) => r.data[idx[j]!]!)); });
        expect(gotValues).toEqual(wantValues);
      }
    }
  });
});

describe('cast', () => {
  const specials = [NaN, -NaN, Infinity, -Infinity, 0, -0, 1, -1, 65504, 65519.99, 65520, -65520, 1e6, 3.4028234663852886e38,
    -3.4028234663852886e38, 2 ** -14, 2 ** -24, 2 ** -25, 1.5 * 2 ** -25, 2 ** -26, 1e-40, -1e-45, 2 ** -126, 2 ** -149,
    1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 3.3895e38, 3.3900e38, 0.1, -2.5e-3];
  const src = new Float32Array(specials);

  describe.each(runnable)('variant %s', (variant) => {
    it('float32 -> float16 and bfloat16: round to nearest even, specials kept', async () => {
      const x = new Tensor('float32', src, [src.length]);
      const h = await kernels.cast(x, 'float16', { variant });
      const b = await kernels.cast(x, 'bfloat16', { variant });
      expect(h.dtype).toBe('float16');
      expect(b.data).toBeInstanceOf(Uint16Array);
      for (let i = 0; i < src.length; i++) {
        expect(f16Value(h.data[i]!)).toEqual(toF16(src[i]!));
        expect(bf16Value(b.data[i]!)).toEqual(toBf16(src[i]!));
        if (!Number.isNaN(src[i]!)) {
          expect(h.data[i]! >> 15).toBe(bits(src[i]!) >>> 31);   // the sign of zero survives
        }
      }
      expect(h.data[specials.indexOf(65520)]).toBe(0x7c00);
      expect(h.data[specials.indexOf(2 ** -25)]).toBe(0);         // a tie rounds to even (0)
      expect(h.data[specials.indexOf(1.5 * 2 ** -25)]).toBe(1);
      expect(b.data[specials.indexOf(1 + 2 ** -8)]).toBe(0x3f80);  // tie -> even
      expect(b.data[specials.indexOf(1 + 3 * 2 ** -8)]).toBe(0x3f82);
    });

    it('16-bit -> float32 is exact for all 65536 patterns, and round trips', async () => {
      const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
      const fromH = await kernels.cast(new Tensor('float16', all), 'float32', { variant });
      const fromB = await kernels.cast(new Tensor('bfloat16', all), 'float32', { variant });
      for (let i = 0; i < 65536; i++) {
        expect(fromH.data[i]).toEqual(f16Value(i));
        expect(fromB.data[i]).toEqual(bf16Value(i));
      }
      const backH = await kernels.cast(fromH, 'float16', { variant });
      const backB = await kernels.cast(fromB, 'bfloat16', { variant });
      for (let i = 0; i < 65536; i++) {
        if (!Number.isNaN(fromH.data[i]!)) expect(backH.data[i]).toBe(i);
        if (!Number.isNaN(fromB.data[i]!)) expect(backB.data[i]).toBe(i);
      }
      const hb = await kernels.cast(new Tensor('float16', all), 'bfloat16', { variant });
      for (let i = 0; i < 65536; i += 97) expect(bf16Value(hb.data[i]!)).toEqual(toBf16(f16Value(i)));
    });
  });

  it.each(fast)('%s is bit-identical to the reference at tile edges (random bit patterns)', async (variant) => {
    for (const n of [...EDGES, 4099]) {
      const raw = new Uint32Array(n);
      let s = n;
      for (let i = 0; i < n; i++) { s = (Math.imul(s, 1103515245) + 12345) >>> 0; raw[i] = s ^ (s << 7); }
      const x = new Tensor('float32', new Float32Array(raw.buffer), [n]);
      for (const to of ['float16', 'bfloat16'] as const) {
        const ref = await kernels.cast(x, to, { variant: 'reference' });
        expect(Array.from((await kernels.cast(x, to, { variant })).data)).toEqual(Array.from(ref.data));
        const wide = await kernels.cast(ref, 'float32', { variant });
        const wref = await kernels.cast(ref, 'float32', { variant: 'reference' });
        expect(new Uint32Array(wide.data.buffer)).toEqual(new Uint32Array(wref.data.buffer));
      }
    }
  });
});

describe('threads', () => {
  // Large enough (> 32 K elements) that two threads really split the work.
  it('results are bit-identical for 1 and 2 threads', async () => {
    const x = randomTensor([96, 1000], 77);
    const row = randomTensor([1000], 78);
    const col = randomTensor([96, 1], 79);
    const gamma = randomTensor([1000], 80);
    const runs: ((threads: number) => Promise<ArrayLike<number | bigint>>)[] = [
      async (threads) => (await kernels.add(x, row, { threads })).data,
      async (threads) => (await kernels.mul(x, col, { threads })).data,
      async (threads) => (await kernels.div(x, x, { threads })).data,
      async (threads) => (await kernels.gelu(x, { threads })).data,
      async (threads) => (await kernels.softmax(x, { threads })).data,
      async (threads) => (await kernels.softmax(x, { threads, axis: 0 })).data,
      async (threads) => (await kernels.layerNorm(x, { threads, gamma })).data,
      async (threads) => (await kernels.rmsNorm(x, { threads, gamma })).data,
      async (threads) => (await kernels.argmax(x, { threads, axis: 0 })).data,
      async (threads) => (await kernels.topK(x, 10, { threads })).indices.data,
      async (threads) => (await kernels.cast(x, 'bfloat16', { threads })).data,
    ];
    for (const r of runs) expect(Array.from(await r(2))).toEqual(Array.from(await r(1)));
  });
});

describe('elementwise bad inputs', () => {
  const x = randomTensor([2, 3]);
  const i32 = new Tensor('int32', new Int32Array(6), [2, 3]);

  it('wrong dtype or not a tensor', async () => {
    await expect(kernels.add(i32 as never, x)).rejects.toThrow("add(a) must have dtype 'float32', got 'int32'");
    await expect(kernels.mul(x, new Float32Array(6) as never)).rejects.toThrow('mul(b) must be a Tensor, got Float32Array(6)');
    await expect(kernels.softmax(i32 as never)).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.gelu(null as never)).rejects.toThrow('gelu(x) must be a Tensor, got null');
    await expect(kernels.cast(i32 as never, 'float16')).rejects.toThrow("cast(x) must have dtype 'float32', 'float16' or 'bfloat16', got 'int32'");
    await expect(kernels.cast(x, 'int8' as never)).rejects.toThrow(/cast\(dtype\) must be one of 'float32', 'float16', 'bfloat16', got "int8"/);
  });

  it('non-broadcastable shapes name both shapes', async () => {
    await expect(kernels.sub(x, randomTensor([4]))).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.sub(x, randomTensor([4]))).rejects.toThrow('sub: shapes [2, 3] (a) and [4] (b) cannot be broadcast');
    await expect(kernels.div(randomTensor([2, 3, 4]), randomTensor([3, 1, 5]))).rejects.toThrow(/\[2, 3, 4\] \(a\) and \[3, 1, 5\] \(b\)/);
  });

  it('axis out of range', async () => {
    await expect(kernels.softmax(randomTensor([2, 3, 4]), { axis: 5 })).rejects.toThrow('softmax: options.axis must be an integer in [-3, 2], got 5');
    await expect(kernels.softmax(x, { axis: 1.5 })).rejects.toThrow(/options.axis must be an integer/);
    await expect(kernels.layerNorm(x, { axis: -3 })).rejects.toThrow('layerNorm: options.axis must be an integer in [-2, 1], got -3');
    await expect(kernels.argmax(x, { axis: 2 })).rejects.toThrow('argmax: options.axis must be an integer in [-2, 1], got 2');
    await expect(kernels.topK(x, 1, { axis: -3 })).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.softmax(new Tensor('float32', new Float32Array(1), []))).rejects.toThrow(/scalar/);
    await expect(kernels.argmax(randomTensor([2, 0]))).rejects.toThrow("argmax: x's axis 1 is empty");
  });

  it('k < 1 or k > dim', async () => {
    await expect(kernels.topK(x, 0)).rejects.toThrow('topK(k) must be an integer in [1, 3], got 0');
    await expect(kernels.topK(x, 4)).rejects.toThrow('topK(k) must be an integer in [1, 3], got 4');
    await expect(kernels.topK(x, 3, { axis: 0 })).rejects.toThrow('topK(k) must be an integer in [1, 2], got 3');
    await expect(kernels.topK(x, 1.5)).rejects.toThrow(InvalidArgumentError);
  });

  it('wrong gamma / beta shape, bad epsilon', async () => {
    await expect(kernels.layerNorm(x, { gamma: randomTensor([2]) })).rejects.toThrow(
      "layerNorm: options.gamma must have dims [3] (x's dims from axis 1), got [2]");
    await expect(kernels.layerNorm(x, { axis: 0, beta: randomTensor([3]) })).rejects.toThrow(
      "layerNorm: options.beta must have dims [2, 3] (x's dims from axis 0), got [3]");
    await expect(kernels.rmsNorm(x, { gamma: randomTensor([1, 3]) })).rejects.toThrow("rmsNorm: options.gamma must have dims [3] (x's last dim), got [1, 3]");
    await expect(kernels.layerNorm(x, { gamma: i32 as never })).rejects.toThrow(/options.gamma must have dtype 'float32'/);
    await expect(kernels.layerNorm(x, { epsilon: -1 })).rejects.toThrow('layerNorm: options.epsilon must be a finite number >= 0, got -1');
    await expect(kernels.rmsNorm(x, { epsilon: NaN })).rejects.toThrow(/options.epsilon must be a finite number/);
  });

  it('misspelled and invalid options', async () => {
    await expect(kernels.softmax(x, { axsi: 0 } as never)).rejects.toThrow("softmax: unknown option 'axsi'; did you mean 'axis'?");
    await expect(kernels.gelu(x, { approximation: 'tanh' } as never)).rejects.toThrow("did you mean 'approximate'?");
    await expect(kernels.gelu(x, { approximate: 'fast' as never })).rejects.toThrow("gelu: options.approximate must be one of 'none', 'tanh'");
    await expect(kernels.layerNorm(x, { epsilom: 1 } as never)).rejects.toThrow("did you mean 'epsilon'?");
    await expect(kernels.topK(x, 1, { largets: false } as never)).rejects.toThrow("did you mean 'largest'?");
    await expect(kernels.topK(x, 1, { largest: 'yes' as never })).rejects.toThrow('topK: options.largest must be a boolean, got "yes"');
    await expect(kernels.argmax(x, { keepdims: true } as never)).rejects.toThrow("did you mean 'keepDims'?");
    await expect(kernels.exp(x, { threads: 0 })).rejects.toThrow('exp: options.threads must be an integer in [1, 1024], got 0');
    await expect(kernels.relu(x, { variant: 'neon' as never })).rejects.toThrow(/relu: options.variant must be one of/);
    await expect(kernels.add(x, x, 3 as never)).rejects.toThrow('add: options must be an object, got 3');
    await expect(kernels.sigmoid(x, { signal: {} as never })).rejects.toThrow(/options.signal must be an AbortSignal/);
  });

  it.runIf(simd !== 'avx512')('a variant this CPU cannot run is DeviceUnavailableError', async () => {
    await expect(kernels.tanh(x, { variant: 'avx512' })).rejects.toThrow(DeviceUnavailableError);
  });

  it('an already aborted signal rejects with AbortError', async () => {
    const ac = new AbortController();
    ac.abort();
    for (const p of [kernels.add(x, x, { signal: ac.signal }), kernels.softmax(x, { signal: ac.signal }),
      kernels.topK(x, 1, { signal: ac.signal }), kernels.cast(x, 'float16', { signal: ac.signal })]) {
      const err = await p.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(AbortError);
    }
  });

  it('the binding\'s own checks reject what would read or write out of bounds, without crashing', async () => {
    const { native } = await import('../dist/binding.js');
    const n = native();
    const f = new Float32Array(6);
    const calls: (() => unknown)[] = [
      () => n.elementwiseBinary(0, f, [2, 3], f, [7], f, 'auto', 0),
      () => n.elementwiseBinary(0, f, [2, 3], new Float32Array(3), [3], new Float32Array(5), 'auto', 0),
      () => n.elementwiseBinary(9, f, [6], f, [6], f, 'auto', 0),
      () => n.elementwiseUnary(0, f, new Float32Array(7), 'auto', 0),
      () => n.softmax(f, [2, 3], 2, f, 'auto', 0),
      () => n.softmax(f, [2, 4], 1, f, 'auto', 0),
      () => n.layerNorm(f, 2, 3, new Float32Array(2), null, 1e-5, f, 'auto', 0),
      () => n.layerNorm(f, 3, 3, null, null, 1e-5, f, 'auto', 0),
      () => n.argmax(f, [2, 3], 1, new BigInt64Array(3), 0),
      () => n.topK(f, [2, 3], 1, 4, true, f, new BigInt64Array(6), 0),
      () => n.cast(f, 'float32', new Uint16Array(5), 'float16', 'auto', 0),
      () => n.cast(f, 'float32', new Float32Array(6), 'float16', 'auto', 0),
      () => n.cast(new Uint16Array(5), 'float16', f, 'float32', 'auto', 0),
      () => n.softmax(f, [2, -3] as never, 1, f, 'auto', 0),
    ];
    for (const call of calls) expect(call).toThrow(expect.objectContaining({ code: 'ERR_SONDE_INVALID_ARGUMENT' }));
  });
});
