import { describe, expect, it } from 'vitest';
import {
  DisposedError, InvalidArgumentError, Tensor, devices, kernels, reportedExternalMemory,
} from '../dist/index.js';
import { native } from '../dist/binding.js';
import { randomF32, randomTensor } from './helpers.js';

const simd = devices().cpu.simd;
const variants: kernels.GemmVariant[] = ['reference', 'scalar',
  ...(simd !== 'scalar' ? ['avx2' as const] : []), ...(simd === 'avx512' ? ['avx512' as const] : [])];
const formats = ['csr', 'bsr'] as const;

/**
 * Dense [k, n] weights with (about) the given fraction of explicit zeros, deterministic. `block`
 * zeroes whole 1 x block runs of output columns instead (block-pruned weights, for BSR).
 */
function prunedWeights(k: number, n: number, sparsity: number, seed: number, block = 1): Tensor<'float32'> {
  const b = randomF32(k * n, seed);
  const keep = randomF32(k * n, seed + 1000);
  for (let p = 0; p < k; p++) {
    for (let j = 0; j < n; j++) {
      const gate = keep[p * n + Math.floor(j / block) * block]!;
      if ((gate + 1) / 2 < sparsity) b[p * n + j] = 0;
    }
  }
  if (sparsity >= 1) b.fill(0);
  return new Tensor('float32', b, [k, n]);
}

/** Double-precision activations and their Lipschitz constants (as in gemm-epilogue.test.ts). */
const acts: Record<kernels.GemmActivation, { f: (v: number) => number; lip: number; opts?: Partial<kernels.GemmOptions> }> = {
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

/** erf in double: Taylor series below 3, continued fraction of erfc above (both ~1e-15). */
function erf(x: number): number {
  const ax = Math.abs(x);
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
  return Math.sign(x) * (1 - Math.exp(-ax * ax) / Math.sqrt(Math.PI) / f);
}

interface Epi { act: kernels.GemmActivation; scale?: Float32Array; bias?: Float32Array; residual?: Float32Array; before?: boolean }

/**
 * Exact (double) value and error bound of one output. The sparse sum adds only the column's
 * non-zero products, in some order with FMA: |err| <= (nnz_col + 2)·u·Σ|a·w| (u = 2^-24; zeros
 * add no error, so the bound is the dense one with k replaced by the non-zeros). Then, as for the
 * GEMM: scale multiplies it, each later float op adds u of its result, the activation multiplies by
 * its Lipschitz constant and the SIMD activations add their approximation error (4u|act| + 1e-7|v|).
 * A dropped, repeated or misplaced non-zero is far outside it (unless that product is 0).
 */
function expected(a: Float32Array, b: Float32Array, m: number, k: number, n: number, i: number, j: number, e: Epi) {
  const u = 2 ** -24;
  let acc = 0;
  let mag = 0;
  let nnz = 0;
  for (let p = 0; p < k; p++) {
    const w = b[p * n + j]!;
    if (w === 0) continue;
    nnz++;
    acc += a[i * k + p]! * w;
    mag += Math.abs(a[i * k + p]! * w);
  }
  const sc = e.scale ? e.scale[j]! : 1;
  let v = acc * sc + (e.bias ? e.bias[j]! : 0);
  let err = (nnz + 2) * u * mag * Math.abs(sc) + 2 * u * Math.abs(v);
  const r = e.residual ? e.residual[i * n + j]! : 0;
  if (e.residual && e.before) { v += r; err += u * Math.abs(v); }
  const { f, lip } = acts[e.act];
  let want = f(v);
  err = lip * err + 4 * u * Math.abs(want) + 1e-7 * Math.abs(v);
  if (e.residual && !e.before) { want += r; err += u * Math.abs(want); }
  return { want, err: err + 1e-30 };
}

/** Checks against the JS reference and against gemm's 'reference' kernel on the dense weights (each within its bound of the exact value, so within twice of each other). */
function check(what: string, got: Float32Array, dense: Float32Array, a: Float32Array, b: Float32Array, m: number, k: number, n: number, e: Epi): void {
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      const { want, err } = expected(a, b, m, k, n, i, j, e);
      const g = got[i * n + j]!;
      if (!(Math.abs(g - want) <= err)) {
        throw new Error(`${what}: C[${i},${j}] = ${g}, want ${want} (|err| ${Math.abs(g - want).toExponential(3)} > ${err.toExponential(3)})`);
      }
      if (!(Math.abs(g - dense[i * n + j]!) <= 2 * err)) {
        throw new Error(`${what}: C[${i},${j}] = ${g}, gemm reference ${dense[i * n + j]}`);
      }
    }
  }
}

async function run(variant: kernels.GemmVariant, format: 'csr' | 'bsr', m: number, k: number, n: number, b: Tensor<'float32'>,
  e: Epi, seed = 1, blockShape?: [number, number]): Promise<void> {
  const a = randomTensor([m, k], seed);
  for (let i = 0; i < a.size; i++) a.data[i]! *= 3 / Math.sqrt(Math.max(1, k));
  const opts: kernels.GemmOptions = {
    activation: e.act, ...acts[e.act].opts,
    ...(e.scale ? { scale: new Tensor('float32', e.scale, [n]) } : {}),
    ...(e.bias ? { bias: new Tensor('float32', e.bias, [n]) } : {}),
    ...(e.residual ? { residual: new Tensor('float32', e.residual, [m, n]), residualBeforeActivation: e.before === true } : {}),
  };
  const w = kernels.toSparse(b, { format, ...(blockShape ? { blockShape } : {}) });
  try {
    expect(w.format).toBe(format);
    const got = await kernels.spmm(a, w, { ...opts, variant });
    const dense = await kernels.gemm(a, b, { ...opts, variant: 'reference' });
    check(`${variant} ${format} ${m}x${k}x${n} ${e.act}`, got.data, dense.data, a.data, b.data, m, k, n, e);
  } finally {
    w.dispose();
  }
}

// Tile edges: M around the vector width and the 64/128-row blocks, and every count of M vectors per
// CSR call (1..8 of 8 or 16 rows: each is its own instantiation with its own accumulator split);
// K and N not multiples of 8/16/32. M = 16 / 17 / 33: the 16x16 register transposes of the AVX-512
// CSR kernel (full, one row over, a slab of one row); 128 / 129 / 257: one M block of the AVX-512
// kernel, then two and three equal blocks; K = 70, 131: At packed in 64-column chunks of 16x16 tiles.
const shapes: [number, number, number][] = [
  [1, 37, 45], [2, 16, 33], [7, 70, 17], [13, 37, 45], [20, 11, 21], [40, 16, 33], [64, 9, 50], [1, 1, 1],
  [100, 12, 18], [130, 20, 19], [65, 33, 8], [16, 21, 16], [17, 131, 31], [33, 19, 47], [128, 20, 19],
  [129, 17, 40], [257, 5, 33],
];
const sparsities = [0, 0.5, 0.99, 1];

describe.each(variants)('spmm %s', (variant) => {
  it.each(formats)('%s: every sparsity on tile-edge shapes (plain and bias)', async (format) => {
    for (const [m, k, n] of shapes) {
      for (const s of sparsities) {
        const b = prunedWeights(k, n, s, m * 31 + k + n, format === 'bsr' ? 8 : 1);
        await run(variant, format, m, k, n, b, { act: 'none' });
        await run(variant, format, m, k, n, b, { act: 'none', bias: randomF32(n, 5) }, 2);
      }
    }
  });

  it.each(formats)('%s: every epilogue family (scale, bias, residual before/after, each activation)', async (format) => {
    for (const [m, k, n] of [[1, 37, 45], [13, 70, 33], [64, 24, 17]] as const) {
      const b = prunedWeights(k, n, 0.7, k + n, format === 'bsr' ? 4 : 1);
      for (const act of Object.keys(acts) as kernels.GemmActivation[]) {
        for (const before of [false, true]) {
          await run(variant, format, m, k, n, b, { act, scale: randomF32(n, 3), bias: randomF32(n, 4), residual: randomF32(m * n, 6), before });
        }
      }
    }
  });

  it('bsr block widths 8, 16, 32', async () => {
    for (const bw of [8, 16, 32]) {
      for (const [m, k, n] of [[1, 30, 70], [17, 30, 70], [13, 5, 100]] as const) {
        const b = prunedWeights(k, n, 0.6, bw + m, bw);
        await run(variant, 'bsr', m, k, n, b, { act: 'relu', bias: randomF32(n, 9) }, 3, [1, bw]);
      }
    }
  });

  it.each(formats)('%s: all-zero rows, an all-zero matrix and a single non-zero', async (format) => {
    const [k, n] = [40, 37];
    const b = prunedWeights(k, n, 0.5, 11);
    for (const j of [0, 5, 16, 36]) for (let p = 0; p < k; p++) b.data[p * n + j] = 0;  // all-zero output columns (rows of W)
    for (let j = 0; j < n; j++) b.data[3 * n + j] = 0;  // an all-zero row of B
    const single = new Tensor('float32', new Float32Array(k * n), [k, n]);
    single.data[17 * n + 29] = -1.5;
    for (const m of [1, 7, 64]) {
      await run(variant, format, m, k, n, b, { act: 'sigmoid', bias: randomF32(n, 2) });
      await run(variant, format, m, k, n, new Tensor('float32', new Float32Array(k * n), [k, n]), { act: 'relu', bias: randomF32(n, 3) });
      await run(variant, format, m, k, n, single, { act: 'none' });
    }
    const wz = kernels.toSparse(new Tensor('float32', new Float32Array(k * n), [k, n]), { format });
    expect(wz.nnz).toBe(0);
    expect(wz.sparsity).toBe(1);
    const out = await kernels.spmm(randomTensor([3, k]), wz, { variant });
    expect(Array.from(out.data).every((x) => x === 0)).toBe(true);
    wz.dispose();
    const ws = kernels.toSparse(single, { format });
    expect(ws.nnz).toBe(1);
    ws.dispose();
  });

  it('csr SpMV and SpMM: 16-bit column indices up to K = 65536, 32-bit above', async () => {
    // The last column index 65535 is the largest a 16-bit index holds; K = 65537 keeps 32-bit indices.
    for (const k of [65536, 65537]) {
      const n = 3;
      const b = prunedWeights(k, n, 0.995, k);
      for (let j = 0; j < n; j++) b.data[(k - 1) * n + j] = 0.5 + j;  // non-zeros at the last k
      const w = kernels.toSparse(b, { format: 'csr' });
      expect(w.bytes).toBe(4 * (n + 1 + 2 * w.nnz) + (k <= 65536 ? 2 * w.nnz : 0));
      w.dispose();
      // 64: the parts of M that two threads take (F32SpmmCsrPartUkernel), over either index width.
      for (const m of [1, 3, 20, 64]) await run(variant, 'csr', m, k, n, b, { act: 'relu', bias: randomF32(n, 7) });
    }
  });

  it('csr SpMV: the gathering and the scalar-load 16-bit kernels (SONDE_SPMV_GATHER) on rows around 16 and 32 non-zeros', async () => {
    // Dense weights (sparsity 0) so every output column has exactly K non-zeros: K = 1, 15-17, 31-33,
    // 47, 65 cover the 32-wide loop, the 16-wide one and the masked tail; N = 17 a group and one more.
    try {
      for (const gather of ['0', '1']) {
        process.env.SONDE_SPMV_GATHER = gather;
        for (const k of [1, 15, 16, 17, 31, 32, 33, 47, 65]) {
          const b = prunedWeights(k, 17, 0, k * 7 + 1);
          await run(variant, 'csr', 1, k, 17, b, { act: 'relu', bias: randomF32(17, 3) });
          await run(variant, 'csr', 1, k, 17, prunedWeights(k, 17, 0.7, k * 5 + 2), { act: 'none', scale: randomF32(17, 4) });
        }
      }
    } finally {
      delete process.env.SONDE_SPMV_GATHER;
    }
  });

  it('csr columns layout (A, C, residual column-major, as NCHW 1x1 convs): tile edges, sparsities, epilogues, strides', async () => {
    // GemmActivation codes (native/kernels/gemm/gemm.h) for the activations tried here.
    const codes: [kernels.GemmActivation, number, number, number][] = [
      ['none', 0, 0, 0], ['relu', 1, 0, 0], ['clip', 2, -0.5, 0.75], ['silu', 3, 0, 0], ['sigmoid', 6, 0, 0], ['hardSwish', 8, 0, 0]];
    // M around the 8/16-lane vectors (a masked last vector), every vector count per call, the
    // 64/128-row call limits and the equal row blocks past them; 49 and 196: 7x7 and 14x14 planes;
    // 1100: nine blocks, which two threads take as two contiguous runs (the others split columns).
    const colShapes: [number, number, number][] = [
      [1, 37, 45], [7, 70, 17], [8, 16, 9], [9, 16, 9], [15, 21, 16], [16, 5, 8], [17, 131, 31], [33, 19, 47],
      [49, 64, 33], [63, 12, 18], [64, 9, 50], [65, 33, 8], [127, 20, 19], [128, 20, 19], [129, 17, 40], [196, 20, 19], [257, 5, 33],
      [1100, 20, 19]];
    const nat = native();
    let c = 0;
    for (const [m, k, n] of colShapes) {
      for (const s of sparsities) {
        const [name, code, alpha, beta] = codes[c++ % codes.length]!;
        const b = prunedWeights(k, n, s, m * 17 + k + n);
        const a = randomF32(m * k, m + k);
        for (let i = 0; i < a.length; i++) a[i]! *= 3 / Math.sqrt(k);
        const e: Epi = { act: name, bias: randomF32(n, 4), scale: c % 2 ? randomF32(n, 3) : undefined,
          residual: c % 3 ? randomF32(m * n, 6) : undefined, before: c % 4 === 0 };
        // Leading dimensions past m (odd, so rows are unaligned); pads of out are a sentinel that must survive.
        const lda = m + 3, ldc = m + 5, ldr = m + 2;
        const at = new Float32Array(k * lda).fill(Number.NaN);
        for (let i = 0; i < m; i++) for (let p = 0; p < k; p++) at[p * lda + i] = a[i * k + p]!;
        const rt = new Float32Array(n * ldr).fill(Number.NaN);
        if (e.residual) for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) rt[j * ldr + i] = e.residual[i * n + j]!;
        const w = kernels.toSparse(b, { format: 'csr' });
        try {
          const out = new Float32Array(n * ldc).fill(-7);
          await nat.spmm(at, w.handle('t'), out, {
            m, k, n, lda, ldc, bias: e.bias, ...(e.scale ? { scale: e.scale } : {}), ...(e.residual ? { residual: rt, ldr } : {}),
            activation: code, alpha, beta, residualBeforeActivation: e.before === true, variant, threads: 2, columns: true,
          });
          for (let j = 0; j < n; j++) {
            for (let i = 0; i < ldc; i++) {
              const g = out[j * ldc + i]!;
              if (i >= m) {
                if (g !== -7) throw new Error(`${variant} columns ${m}x${k}x${n}: wrote C^T[${j}][${i}] past m`);
                continue;
              }
              const { want, err } = expected(a, b.data, m, k, n, i, j, e);
              if (!(Math.abs(g - want) <= err)) {
                throw new Error(`${variant} columns ${m}x${k}x${n} s=${s} ${name}: C[${i},${j}] = ${g}, want ${want} (> ${err.toExponential(3)})`);
              }
            }
          }
        } finally {
          w.dispose();
        }
      }
    }
  });

  it.each(formats)('%s: 1 and 2 threads give identical results', async (format) => {
    const [k, n] = [300, 203];
    const b = prunedWeights(k, n, 0.8, 21, format === 'bsr' ? 16 : 1);
    const w = kernels.toSparse(b, { format });
    // 64-128: one block of rows, on two threads in two parts (4+4 vectors of 16 rows, 3+2, 4+3), each
    // summed with the whole block's accumulator chains; 150: two blocks of rows (a block per thread);
    // 300: three (packed once, the columns split on two threads, one thread still by blocks); 1100:
    // nine (by blocks again).
    for (const m of [1, 7, 64, 80, 100, 128, 150, 300, 1100]) {
      const a = randomTensor([m, k], m);
      const o1 = await kernels.spmm(a, w, { variant, threads: 1, bias: randomTensor([n], 2), activation: 'gelu' });
      const o2 = await kernels.spmm(a, w, { variant, threads: 2, bias: randomTensor([n], 2), activation: 'gelu' });
      expect(Buffer.from(o2.data.buffer, o2.data.byteOffset, o2.data.byteLength)
        .equals(Buffer.from(o1.data.buffer, o1.data.byteOffset, o1.data.byteLength))).toBe(true);
    }
    w.dispose();
  });
});

describe('sparse weights', () => {
  it('toSparse reports format, nnz, sparsity, shape, bytes; auto picks bsr for block-pruned weights', () => {
    const b = prunedWeights(64, 96, 0.9, 3);
    let nz = 0;
    for (const x of b.data) if (x !== 0) nz++;
    const w = kernels.toSparse(b);
    expect(w.format).toBe('csr');
    expect(w.nnz).toBe(nz);
    expect(w.sparsity).toBeCloseTo(1 - nz / (64 * 96), 12);
    expect(w.shape).toEqual([64, 96]);
    expect(w.bytes).toBe(4 * (97 + 2 * nz) + 2 * nz);  // + 16-bit indices for the SpMV path (K <= 65536)
    w.dispose();
    const bw = simd === 'avx512' ? 16 : 8;
    const blocky = kernels.toSparse(prunedWeights(64, 96, 0.9, 3, bw));
    expect(blocky.format).toBe('bsr');
    expect(blocky.blockShape).toEqual([1, bw]);
    expect(blocky.blocks! * bw).toBeGreaterThanOrEqual(blocky.nnz);
    blocky.dispose();
  });

  it('sparseFromCsr (W = Bᵀ rows) matches toSparse and the dense GEMM', async () => {
    const [k, n, m] = [50, 23, 9];
    const b = prunedWeights(k, n, 0.8, 8);
    const rowPtr = [0];
    const colIdx: number[] = [];
    const values: number[] = [];
    for (let j = 0; j < n; j++) {
      for (let p = 0; p < k; p++) {
        if (b.data[p * n + j] !== 0) { colIdx.push(p); values.push(b.data[p * n + j]!); }
      }
      rowPtr.push(colIdx.length);
    }
    const w = kernels.sparseFromCsr({ rows: n, cols: k, rowPtr: new Int32Array(rowPtr), colIdx: new Uint32Array(colIdx), values: new Float32Array(values) });
    expect(w.shape).toEqual([k, n]);
    expect(w.nnz).toBe(values.length);
    const a = randomTensor([m, k], 4);
    const got = await kernels.gemm(a, w, { bias: randomTensor([n], 1) });  // gemm routes sparse weights to spmm
    const dense = await kernels.gemm(a, b, { bias: randomTensor([n], 1), variant: 'reference' });
    check('sparseFromCsr', got.data, dense.data, a.data, b.data, m, k, n, { act: 'none', bias: randomTensor([n], 1).data });
    w.dispose();
  });

  it('memory is reported to V8; dispose is idempotent; use after dispose is DisposedError; await using', async () => {
    const dense = prunedWeights(256, 256, 0.5, 1);  // (its ArrayBuffer counts as external memory too)
    const before = reportedExternalMemory();
    const w = kernels.toSparse(dense, { format: 'csr' });
    expect(reportedExternalMemory() - before).toBe(w.bytes);
    w.dispose();
    w.dispose();
    expect(reportedExternalMemory()).toBe(before);
    expect(w.disposed).toBe(true);
    await expect(kernels.spmm(randomTensor([2, 256]), w)).rejects.toThrow(DisposedError);
    await expect(kernels.spmm(randomTensor([2, 256]), w)).rejects.toThrow('spmm(weights): SparseWeights has been disposed');
    let held: kernels.SparseWeights | undefined;
    {
      await using w2 = kernels.toSparse(prunedWeights(8, 8, 0.5, 1));
      held = w2;
      expect(w2.disposed).toBe(false);
    }
    expect(held.disposed).toBe(true);
  });

  it('dispose during a run: the run finishes with its weights', async () => {
    const w = kernels.toSparse(prunedWeights(512, 512, 0.5, 1));
    const p = kernels.spmm(randomTensor([64, 512]), w);
    w.dispose();
    expect((await p).dims).toEqual([64, 512]);
  });
});

describe('sparse bad inputs', () => {
  const b = prunedWeights(6, 5, 0.5, 1);
  const csr = () => ({ rows: 2, cols: 4, rowPtr: new Int32Array([0, 2, 3]), colIdx: new Int32Array([0, 3, 1]), values: new Float32Array([1, 2, 3]) });
  const bad = (over: Record<string, unknown>) => () => kernels.sparseFromCsr({ ...csr(), ...over } as never);

  it('toSparse', () => {
    expect(() => kernels.toSparse([1, 2] as never)).toThrow(InvalidArgumentError);
    expect(() => kernels.toSparse(new Tensor('int32', new Int32Array(4), [2, 2]) as never)).toThrow(/toSparse\(weights\).*float32/);
    expect(() => kernels.toSparse(randomTensor([6]))).toThrow('toSparse(weights) must be 2-D [rows, cols], got dims [6]');
    expect(() => kernels.toSparse(b, { format: 'coo' as never })).toThrow("toSparse: options.format must be one of 'csr', 'bsr', 'auto', got \"coo\"");
    expect(() => kernels.toSparse(b, { format: 'bsr', blockShape: [4, 1] })).toThrow('toSparse: options.blockShape must be [1, 8], [1, 16] or [1, 32], got [4, 1]');
    expect(() => kernels.toSparse(b, { format: 'csr', blockShape: [1, 16] })).toThrow("toSparse: options.blockShape has no effect with format 'csr'");
    expect(() => kernels.toSparse(b, { formt: 'csr' } as never)).toThrow("toSparse: unknown option 'formt'; did you mean 'format'?");
  });

  it('sparseFromCsr: each malformed field named', () => {
    expect(() => kernels.sparseFromCsr(csr())).not.toThrow();
    expect(bad({ rowPtr: new Int32Array([0, 2]) })).toThrow('sparseFromCsr: csr.rowPtr must have rows + 1 = 3 entries, got 2');
    expect(bad({ rowPtr: new Int32Array([1, 2, 3]) })).toThrow('sparseFromCsr: csr.rowPtr[0] must be 0, got 1');
    expect(bad({ rowPtr: new Int32Array([0, 3, 2]), colIdx: new Int32Array([0, 1, 3]) })).toThrow('sparseFromCsr: csr.rowPtr must be non-decreasing, but rowPtr[2] = 2 < rowPtr[1] = 3');
    expect(bad({ rowPtr: new Int32Array([0, -1, 3]) })).toThrow('sparseFromCsr: csr.rowPtr must be non-decreasing, but rowPtr[2] = 3 < rowPtr[1] = -1'.replace('rowPtr[2] = 3 < rowPtr[1] = -1', 'rowPtr[1] = -1 < rowPtr[0] = 0'));
    expect(bad({ rowPtr: new Int32Array([0, 2, 4]) })).toThrow('sparseFromCsr: csr.rowPtr[2] (the non-zero count) is 4 but csr.colIdx and csr.values hold 3');
    expect(bad({ values: new Float32Array([1, 2]) })).toThrow('sparseFromCsr: csr.colIdx and csr.values must have the same length, got 3 and 2');
    expect(bad({ colIdx: new Int32Array([0, 4, 1]) })).toThrow('sparseFromCsr: csr.colIdx[1] = 4 (row 0) is out of range [0, 4)');
    expect(bad({ colIdx: new Int32Array([0, -2, 1]) })).toThrow('sparseFromCsr: csr.colIdx[1] = -2 (row 0) is out of range [0, 4)');
    expect(bad({ colIdx: new Int32Array([3, 0, 1]) })).toThrow('sparseFromCsr: csr.colIdx must be strictly increasing within a row, but row 0 has colIdx[0] = 3 then colIdx[1] = 0');
    expect(bad({ colIdx: new Int32Array([2, 2, 1]) })).toThrow(/strictly increasing/);
    expect(bad({ colIdx: [0, 3, 1] })).toThrow('sparseFromCsr: csr.colIdx must be an Int32Array or Uint32Array, got Array(3)');
    expect(bad({ values: new Float64Array(3) })).toThrow('sparseFromCsr: csr.values must be a Float32Array, got Float64Array(3)');
    expect(bad({ rows: -1 })).toThrow(/sparseFromCsr: csr.rows must be an integer/);
    expect(bad({ nnz: 3 })).toThrow("sparseFromCsr(csr): unknown option 'nnz'");
    expect(() => kernels.sparseFromCsr(null as never)).toThrow(InvalidArgumentError);
  });

  it('the native second line rejects what TS would (no crash on direct binding calls)', () => {
    const n = native();
    const u = (xs: number[]) => new Uint32Array(xs);
    expect(() => n.sparseFromCsr(2, 4, u([0, 2, 3]), u([0, 9, 1]), new Float32Array(3))).toThrow('sparseFromCsr: colIdx holds an index out of range [0, cols)');
    expect(() => n.sparseFromCsr(2, 4, u([0, 2, 3]), u([1, 0, 1]), new Float32Array(3))).toThrow(/strictly increasing/);
    expect(() => n.sparseFromCsr(2, 4, u([0, 3, 2]), u([0, 1, 2]), new Float32Array(3))).toThrow('sparseFromCsr: rowPtr must be non-decreasing');
    expect(() => n.sparseFromCsr(2, 4, u([0, 2, 9]), u([0, 1, 2]), new Float32Array(3))).toThrow(/rowPtr\[rows\] must equal/);
    expect(() => n.sparseFromCsr(2, 4, u([0, 2]), u([0, 1]), new Float32Array(2))).toThrow('sparseFromCsr: rowPtr must hold rows + 1 entries');
    expect(() => n.sparseFromCsr(2, 4, u([0, 2, 3]), u([0, 1, 2]), new Float32Array(2))).toThrow(/same length/);
    expect(() => n.sparseFromCsr(0, 4, u([]), u([]), new Float32Array(0))).toThrow(/rows \+ 1/);
    const w = kernels.toSparse(b);
    const h = w.handle('t');
    const opts = { m: 2, k: 6, n: 5, lda: 6, ldc: 5, activation: 0, alpha: 0, beta: 0, residualBeforeActivation: false, variant: 'auto' as const, threads: 0 };
    expect(() => n.spmm(new Float32Array(11), h, new Float32Array(10), opts)).toThrow('spmm: a must hold m rows of lda >= k elements');
    expect(() => n.spmm(new Float32Array(12), h, new Float32Array(9), opts)).toThrow('spmm: out must hold m rows of ldc >= n elements');
    expect(() => n.spmm(new Float32Array(12), h, new Float32Array(10), { ...opts, k: 5, lda: 5 })).toThrow('spmm: sparse weights do not match k and n');
    expect(() => n.spmm(new Float32Array(12), {} as never, new Float32Array(10), opts)).toThrow('spmm: weights must be sparse weights');
    // columns: A is k rows of lda >= m, C n rows of ldc >= m; BSR weights are refused.
    const col = { ...opts, lda: 2, ldc: 2, columns: true };
    expect(() => n.spmm(new Float32Array(11), h, new Float32Array(10), col)).toThrow('spmm: a must hold k rows of lda >= m elements');
    expect(() => n.spmm(new Float32Array(12), h, new Float32Array(9), col)).toThrow('spmm: out must hold n rows of ldc >= m elements');
    expect(() => n.spmm(new Float32Array(12), h, new Float32Array(10), { ...col, ldc: 1 })).toThrow('spmm: out must hold n rows of ldc >= m elements');
    const bsr = kernels.toSparse(b, { format: 'bsr' });
    expect(() => n.spmm(new Float32Array(12), bsr.handle('t'), new Float32Array(10), col)).toThrow('spmm: columns needs CSR weights');
    bsr.dispose();
    w.dispose();
  });

  it('spmm', async () => {
    const w = kernels.toSparse(b);
    const a = randomTensor([4, 6]);
    await expect(kernels.spmm(randomTensor([4, 5]), w)).rejects.toThrow('spmm: shape mismatch: a is [4, 5] but b (sparse weights) is [6, 5] (a\'s columns must equal b\'s rows)');
    await expect(kernels.spmm(new Tensor('int32', new Int32Array(24), [4, 6]) as never, w)).rejects.toThrow(/spmm\(a\).*float32/);
    await expect(kernels.spmm(a, b as never)).rejects.toThrow('spmm(weights) must be SparseWeights (from toSparse or sparseFromCsr), got Tensor');
    await expect(kernels.spmm(a, w, { variant: 'avx1024' as never })).rejects.toThrow(/spmm: options.variant must be one of/);
    await expect(kernels.spmm(a, w, { bias: randomTensor([6]) })).rejects.toThrow('spmm: options.bias must have dims [5], got [6]');
    await expect(kernels.spmm(a, w, { residual: randomTensor([4, 4]) })).rejects.toThrow('spmm: options.residual must have dims [4, ldr] with ldr >= 5, got [4, 4]');
    await expect(kernels.spmm(a, w, { out: randomTensor([4, 4]) })).rejects.toThrow('spmm: options.out must have dims [4, ldc] with ldc >= 5, got [4, 4]');
    await expect(kernels.spmm(a, w, { activaton: 'relu' } as never)).rejects.toThrow("spmm: unknown option 'activaton'; did you mean 'activation'?");
    const ac = new AbortController();
    ac.abort();
    await expect(kernels.spmm(a, w, { signal: ac.signal })).rejects.toThrow(/aborted/);
    // k and out with leading dimensions work as in gemm.
    const wide = randomTensor([4, 9]);
    const out = new Tensor('float32', new Float32Array(4 * 7).fill(-3), [4, 7]);
    await kernels.spmm(wide, w, { k: 6, out });
    for (let i = 0; i < 4; i++) {
      for (let j = 5; j < 7; j++) expect(out.data[i * 7 + j]).toBe(-3);
      for (let j = 0; j < 5; j++) {
        let s = 0;
        for (let p = 0; p < 6; p++) s += wide.data[i * 9 + p]! * b.data[p * 5 + j]!;
        expect(Math.abs(out.data[i * 7 + j]! - s)).toBeLessThan(1e-5);
      }
    }
    w.dispose();
  });
});
