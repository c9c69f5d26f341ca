import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  AbortError, DeviceUnavailableError, InvalidArgumentError, Tensor, devices, gguf, kernels,
} from '../dist/index.js';
import { randomF32 } from './helpers.js';

const cpu = devices().cpu;
const levels: kernels.QuantVariant[] = ['scalar', ...(cpu.simd !== 'scalar' ? ['avx2' as const] : []),
  ...(cpu.simd === 'avx512' ? ['avx512' as const] : [])];
const hasVnni = cpu.simd === 'avx512' && cpu.features.includes('avx512vnni');
const TYPES: kernels.QuantType[] = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'];
const isBlock = (t: kernels.QuantType) => t === 'q8_0' || t === 'q4_0';
const variantsOf = (t: kernels.QuantType): kernels.QuantVariant[] => [...levels, ...(isBlock(t) && hasVnni ? ['avx512vnni' as const] : [])];
const u = 2 ** -24;

function half(h: number): number {
  const e = (h >> 10) & 31;
  const m = h & 1023;
  const s = h & 0x8000 ? -1 : 1;
  return e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
}

/** rint: nearest, ties to even. */
function rne(v: number): number {
  const r = Math.round(v);
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * The activation quantiser of the precision definition (native/kernels/quant/quant.h), in float32
 * arithmetic: per block of 32, dx = amax / 127, q = rint(x * (127 / amax)).
 */
function quantizeActs(x: Float32Array): { q: Int8Array; d: Float32Array } {
  const nb = x.length / 32;
  const q = new Int8Array(x.length);
  const d = new Float32Array(nb);
  for (let b = 0; b < nb; b++) {
    let amax = 0;
    let finite = true;
    for (let j = 0; j < 32; j++) {
      const a = Math.abs(x[b * 32 + j]!);
      if (!(a <= 3.4028234663852886e38)) finite = false;
      amax = Math.max(amax, a);
    }
    if (!finite) { d[b] = NaN; continue; }
    if (amax < 2 ** -120) continue;
    const id = Math.fround(127 / amax);
    d[b] = Math.fround(amax / 127);
    for (let j = 0; j < 32; j++) q[b * 32 + j] = rne(Math.fround(x[b * 32 + j]! * id));
  }
  return { q, d };
}

/** Block scales and int8 values of q8_0 / q4_0 weights, decoded from the bytes by the spec. */
function decodeBlocks(w: kernels.QuantizedWeights): { d: Float64Array; q: Int8Array } {
  const nbTotal = (w.n * w.k) / 32;
  const d = new Float64Array(nbTotal);
  const q = new Int8Array(w.n * w.k);
  const size = w.type === 'q8_0' ? 34 : 18;
  for (let b = 0; b < nbTotal; b++) {
    const o = b * size;
    d[b] = half(w.data[o]! | (w.data[o + 1]! << 8));
    for (let j = 0; j < 32; j++) {
      q[b * 32 + j] = w.type === 'q8_0' ? (w.data[o + 2 + j]! << 24) >> 24
        : (j < 16 ? w.data[o + 2 + j]! & 15 : w.data[o + 2 + j - 16]! >> 4) - 8;
    }
  }
  return { d, q };
}

/**
 * Independent JS value of each output and the error bound of the fast kernels:
 * - float types: sum x w in double; fp32 sums in any order are off by at most (K + 2) u sum |x w|.
 * - block types: sum_b dw dx isum_b in double. The SIMD kernels keep each block's integer sum in up
 *   to 8 int32 lanes (exact), multiply every lane by fp32(dw dx) (rounding the scale and each
 *   product: 2u) and add all 8 nb lane products in fp32 ((8 nb - 1) u in any order), so
 *   |err| <= (8 nb + 4) u sum_b |dw dx| sum_j |qw_j qx_j| bounds them all.
 */
function expected(x: Float32Array, m: number, w: kernels.QuantizedWeights, wdeq: Float32Array): { want: Float64Array; bound: Float64Array } {
  const { n, k } = w;
  const want = new Float64Array(m * n);
  const bound = new Float64Array(m * n);
  if (!isBlock(w.type)) {
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0;
        let mag = 0;
        for (let p = 0; p < k; p++) { const t = x[i * k + p]! * wdeq[j * k + p]!; s += t; mag += Math.abs(t); }
        want[i * n + j] = s;
        bound[i * n + j] = (k + 2) * u * mag;
      }
    }
    return { want, bound };
  }
  const wb = decodeBlocks(w);
  const nb = k / 32;
  for (let i = 0; i < m; i++) {
    const a = quantizeActs(x.subarray(i * k, (i + 1) * k));
    for (let j = 0; j < n; j++) {
      let s = 0;
      let mag = 0;
      for (let b = 0; b < nb; b++) {
        let isum = 0;
        let iabs = 0;
        for (let t = 0; t < 32; t++) {
          const p = wb.q[j * k + b * 32 + t]! * a.q[b * 32 + t]!;
          isum += p;
          iabs += Math.abs(p);
        }
        const scale = wb.d[j * nb + b]! * a.d[b]!;
        s += scale * isum;
        mag += Math.abs(scale) * iabs;
      }
      want[i * n + j] = s;
      bound[i * n + j] = (8 * nb + 4) * u * mag;
    }
  }
  return { want, bound };
}

function expectWithin(what: string, got: Float32Array, want: Float64Array, bound: Float64Array): void {
  for (let i = 0; i < got.length; i++) {
    const err = Math.abs(got[i]! - want[i]!);
    if (!(err <= bound[i]! + 1e-30)) {
      throw new Error(`${what}: y[${i}] = ${got[i]}, want ${want[i]} (|err| ${err.toExponential(3)} > bound ${bound[i]!.toExponential(3)})`);
    }
  }
}

// K: one block, two, an odd count (the zmm kernels take blocks in pairs), and 129 blocks (odd, not
// a multiple of any unroll). N not a multiple of anything; M = 1 (GEMV), 2 and 7 (a group of 4
// activation rows plus a partial group of 3).
const KS = [32, 64, 96, 4128];
const NS = [1, 5, 33];
const MS = [1, 2, 7];

describe('kernels.quantMatmul', () => {
  describe.each(TYPES)('%s weights', (type) => {
    it.each(KS)('K = %i: every variant within the derived bound of the exact value; reference within 1 ulp', async (k) => {
      for (const n of NS) {
        // Rows with different magnitudes so the block scales differ.
        const wf = randomF32(n * k, k + n).map((v, i) => v * (1 + (Math.floor(i / 32) % 7)));
        const w = kernels.quantizeWeights(new Tensor('float32', wf, [n, k]), type);
        const wdeq = (await kernels.dequantize(w)).data;
        for (const m of MS) {
          const x = randomF32(m * k, 3 * k + m).map((v, i) => v * 2 ** ((i % 5) - 2));
          const xt = new Tensor('float32', x, [m, k]);
          const { want, bound } = expected(x, m, w, wdeq);
          const ref = await kernels.quantMatmul(xt, w, { variant: 'reference' });
          expect(ref.dims).toEqual([m, n]);
          // The reference is the double sum rounded once to fp32.
          expectWithin(`${type} reference m=${m} n=${n} k=${k}`, ref.data, want, want.map((v) => Math.abs(v) * u * 1.0001 + 1e-30));
          for (const variant of variantsOf(type)) {
            const y = await kernels.quantMatmul(xt, w, { variant });
            expectWithin(`${type} ${variant} m=${m} n=${n} k=${k}`, y.data, want, bound);
          }
        }
      }
    });

    it('results are identical on 1 and 2 threads, from a GGUF tensor and from memory', async () => {
      const [n, k, m] = [67, 4128, 3];
      const wf = randomF32(n * k, 99);
      const w = kernels.quantizeWeights(new Tensor('float32', wf, [n, k]), type);
      const path = join(mkdtempSync(join(tmpdir(), 'sonde-quant-')), 'w.gguf');
      await gguf.write(path, { tensors: [{ name: 'w', dims: [k, n], type, data: w.data }] });
      await using f = await gguf.read(path);
      const x = new Tensor('float32', randomF32(m * k, 5), [m, k]);
      for (const variant of ['reference', ...variantsOf(type)] as kernels.QuantVariant[]) {
        const y1 = await kernels.quantMatmul(x, w, { variant, threads: 1 });
        const y2 = await kernels.quantMatmul(x, w, { variant, threads: 2 });
        const yf = await kernels.quantMatmul(x, f.tensor('w')!, { variant, threads: 2 });
        expect(y2.data, variant).toEqual(y1.data);
        expect(yf.data, variant).toEqual(y1.data);
      }
      // A 1-D x is one row, and gives a 1-D y.
      const v = await kernels.quantMatmul(new Tensor('float32', x.data.slice(0, k), [k]), w);
      expect(v.dims).toEqual([n]);
      expect(v.data).toEqual((await kernels.quantMatmul(new Tensor('float32', x.data.slice(0, k), [1, k]), w)).data);
    });
  });

  it('M = 1 (the decode rows kernel): float types at K off its 16- and 64-element steps, N off the rows per task, 1 and 2 threads', async () => {
    // K: below one 16-lane step, one step plus one, one short of / at / past the 64-element unroll,
    // and a long row with a masked tail. N = 33 at K = 1056 splits into tasks of 5 rows on 2 threads.
    for (const type of ['f32', 'f16', 'bf16'] as const) {
      for (const k of [5, 17, 63, 64, 65, 127, 1056]) {
        for (const n of [1, 3, 33]) {
          const wf = randomF32(n * k, 5 * k + n).map((v, i) => v * (1 + (i % 3)));
          const w = kernels.quantizeWeights(new Tensor('float32', wf, [n, k]), type);
          const wdeq = (await kernels.dequantize(w)).data;
          const x = randomF32(k, 7 * k + n).map((v, i) => v * 2 ** ((i % 5) - 2));
          const { want, bound } = expected(x, 1, w, wdeq);
          for (const variant of variantsOf(type)) {
            for (const threads of [1, 2]) {
              const y = await kernels.quantMatmul(new Tensor('float32', x, [1, k]), w, { variant, threads });
              expectWithin(`${type} ${variant} t${threads} m=1 n=${n} k=${k}`, y.data, want, bound);
            }
          }
        }
      }
    }
  });

  it('auto is the fastest variant: the same bits as avx512vnni (block types) or the widest SIMD level', async () => {
    const x = new Tensor('float32', randomF32(2 * 256, 1), [2, 256]);
    for (const type of TYPES) {
      const w = kernels.quantizeWeights(new Tensor('float32', randomF32(9 * 256, 2), [9, 256]), type);
      const fastest = isBlock(type) && hasVnni ? 'avx512vnni' : levels[levels.length - 1]!;
      expect((await kernels.quantMatmul(x, w)).data).toEqual((await kernels.quantMatmul(x, w, { variant: fastest })).data);
    }
  });

  it('a block of activations holding NaN or Inf gives NaN rows (block types), in every variant', async () => {
    const k = 96;
    const x = randomF32(2 * k, 4);
    x[40] = NaN;  // row 0, block 1
    x[k + 70] = Infinity;  // row 1, block 2
    for (const type of ['q8_0', 'q4_0'] as const) {
      const w = kernels.quantizeWeights(new Tensor('float32', randomF32(3 * k, 5), [3, k]), type);
      for (const variant of ['reference', ...variantsOf(type)] as kernels.QuantVariant[]) {
        const y = await kernels.quantMatmul(new Tensor('float32', x, [2, k]), w, { variant });
        expect(Array.from(y.data).every(Number.isNaN), `${type} ${variant}`).toBe(true);
      }
    }
  });

  it('activations below 2^-120 in a block count as zero (the precision definition)', async () => {
    const k = 64;
    const x = new Float32Array(k).fill(1e-38);
    x.fill(1, 32);
    const w = kernels.quantizeWeights(new Tensor('float32', new Float32Array(k).fill(1), [1, k]), 'q8_0');
    const zeroed = x.slice();
    zeroed.fill(0, 0, 32);
    for (const variant of ['reference', ...variantsOf('q8_0')] as kernels.QuantVariant[]) {
      const y = await kernels.quantMatmul(new Tensor('float32', x, [1, k]), w, { variant });
      expect(y.data, variant).toEqual((await kernels.quantMatmul(new Tensor('float32', zeroed, [1, k]), w, { variant })).data);
      expect(y.data[0], variant).toBeCloseTo(32, 2);
    }
  });
});

// The blocked GEMM: avx512 for the float types, avx512vnni for the block types. Shapes walk its
// tile edges: M = 1, below / at / above the 4-row (vnni) and 12-row (float) tiles and several
// tiles plus a remainder; N below / at / above the 32-row panel and several panels plus a
// remainder; K of one block (32), an odd block count, and for the float types K not a multiple of
// the 16-wide pack.
const gemmVariant = (t: kernels.QuantType): kernels.QuantVariant | undefined =>
  isBlock(t) ? (hasVnni ? 'avx512vnni' : undefined) : (cpu.simd === 'avx512' ? 'avx512' : undefined);

describe('kernels.quantMatmul algorithm gemm', () => {
  const gemmTypes = TYPES.filter((t) => gemmVariant(t) !== undefined);
  for (const type of gemmTypes) it(`${type}: within the derived bound of the exact value on tile-edge shapes`, async () => {
    const variant = gemmVariant(type)!;
    const ks = isBlock(type) ? [32, 96, 1056] : [5, 17, 32, 96, 1056];
    for (const k of ks) {
      for (const n of [1, 31, 32, 33, 70]) {
        const wf = randomF32(n * k, k + n).map((v, i) => v * (1 + (Math.floor(i / 32) % 7)));
        const w = kernels.quantizeWeights(new Tensor('float32', wf, [n, k]), type);
        const wdeq = (await kernels.dequantize(w)).data;
        for (const m of [...Array.from({ length: 17 }, (_, i) => i + 1), 29]) {
          const x = randomF32(m * k, 3 * k + m).map((v, i) => v * 2 ** ((i % 5) - 2));
          const xt = new Tensor('float32', x, [m, k]);
          const { want, bound } = expected(x, m, w, wdeq);
          const y = await kernels.quantMatmul(xt, w, { variant, algorithm: 'gemm' });
          expectWithin(`${type} gemm m=${m} n=${n} k=${k}`, y.data, want, bound);
        }
      }
    }
  });

  it.skipIf(gemmTypes.length === 0)('auto takes the GEMM from 6 rows: the same bits as gemm there and as gemv below; threads do not change a bit', async () => {
    const [n, k] = [100, 320];
    for (const type of gemmTypes) {
      const w = kernels.quantizeWeights(new Tensor('float32', randomF32(n * k, 7), [n, k]), type);
      for (const m of [5, 6, 8, 40]) {
        const x = new Tensor('float32', randomF32(m * k, 8 + m), [m, k]);
        const auto = await kernels.quantMatmul(x, w);
        const gemv = await kernels.quantMatmul(x, w, { algorithm: 'gemv' });
        const gemm = await kernels.quantMatmul(x, w, { algorithm: 'gemm', threads: 1 });
        expect(auto.data, `${type} m=${m}`).toEqual(m >= 6 ? gemm.data : gemv.data);
        // 4 panels over 2 threads: the rows are split too, each output still one kernel call.
        expect((await kernels.quantMatmul(x, w, { algorithm: 'gemm', threads: 2 })).data, `${type} m=${m} t2`).toEqual(gemm.data);
      }
    }
  });

  it.skipIf(!hasVnni)('block types: a row gives the same bits alone (16-row dot kernel) and in a GEMM of any M', async () => {
    // Batch invariance: a prefill equals its token-by-token decode, a sequence decoded alone equals
    // it decoded in a batch. N = 47: two groups of 16 rows and a partial one, one panel and a half.
    const [n, k] = [47, 288];
    for (const type of ['q8_0', 'q4_0'] as const) {
      const w = kernels.quantizeWeights(new Tensor('float32', randomF32(n * k, 21), [n, k]), type);
      const m = 19;
      const x = randomF32(m * k, 22);
      const gemm = await kernels.quantMatmul(new Tensor('float32', x, [m, k]), w, { algorithm: 'gemm' });
      const gemv = await kernels.quantMatmul(new Tensor('float32', x, [m, k]), w, { algorithm: 'gemv' });
      expect(gemv.data, `${type} gemv M = ${m}`).toEqual(gemm.data);
      for (const i of [0, 7, 18]) {
        const one = await kernels.quantMatmul(new Tensor('float32', x.slice(i * k, (i + 1) * k), [1, k]), w);
        expect(one.data, `${type} row ${i}`).toEqual(gemm.data.subarray(i * n, (i + 1) * n));
      }
    }
  });

  it.skipIf(!hasVnni)('block types: a decode batch over many panels (tasks of several panels, a partial last one) gives the 16-row kernel\'s bits on 1 and 2 threads', async () => {
    // N = 1100: 35 panels of 32 rows, the last of 12; on 2 threads tasks of 4 consecutive panels
    // (the packing prefetches the panel after its own), on 1 thread of 8.
    const [n, k] = [1100, 96];
    for (const type of ['q8_0', 'q4_0'] as const) {
      const w = kernels.quantizeWeights(new Tensor('float32', randomF32(n * k, 23), [n, k]), type);
      for (const m of [6, 8, 16]) {
        const x = new Tensor('float32', randomF32(m * k, 24 + m), [m, k]);
        const gemv = await kernels.quantMatmul(x, w, { algorithm: 'gemv' });
        for (const threads of [1, 2]) {
          const gemm = await kernels.quantMatmul(x, w, { algorithm: 'gemm', threads });
          expect(gemm.data, `${type} m=${m} t${threads}`).toEqual(gemv.data);
        }
      }
    }
  });

  it.skipIf(!hasVnni)('q8_0 repacked (the layout language models load q8_0 into): within the derived bound on tile-edge shapes, the bits of gemm and gemv, 1 and 2 threads', async () => {
    // K: one block, an odd block count, 33 blocks. N below / at / above a group of 32 rows and two
    // groups plus a remainder (a padded last group). M: 1 (decode), tiles of 4 rows and remainders.
    for (const k of [32, 96, 1056]) {
      for (const n of [1, 31, 32, 33, 70]) {
        const wf = randomF32(n * k, k + n).map((v, i) => v * (1 + (Math.floor(i / 32) % 7)));
        const w = kernels.quantizeWeights(new Tensor('float32', wf, [n, k]), 'q8_0');
        const wdeq = (await kernels.dequantize(w)).data;
        for (const m of [1, 2, 3, 4, 5, 6, 7, 9, 17]) {
          const x = randomF32(m * k, 3 * k + m).map((v, i) => v * 2 ** ((i % 5) - 2));
          const xt = new Tensor('float32', x, [m, k]);
          const { want, bound } = expected(x, m, w, wdeq);
          const y = await kernels.quantMatmul(xt, w, { algorithm: 'repacked', threads: 1 });
          expectWithin(`q8_0 repacked m=${m} n=${n} k=${k}`, y.data, want, bound);
          expect(y.data, `m=${m} n=${n} k=${k} vs gemm`).toEqual((await kernels.quantMatmul(xt, w, { algorithm: 'gemm' })).data);
          expect(y.data, `m=${m} n=${n} k=${k} vs gemv`).toEqual((await kernels.quantMatmul(xt, w, { algorithm: 'gemv' })).data);
          expect((await kernels.quantMatmul(xt, w, { algorithm: 'repacked', threads: 2 })).data, `m=${m} n=${n} k=${k} t2`).toEqual(y.data);
        }
      }
    }
    // A block of activations holding NaN gives NaN rows, the others none.
    const k = 96;
    const x = randomF32(5 * k, 4);
    x[k + 40] = NaN;  // row 1, block 1
    const w = kernels.quantizeWeights(new Tensor('float32', randomF32(33 * k, 5), [33, k]), 'q8_0');
    const y = await kernels.quantMatmul(new Tensor('float32', x, [5, k]), w, { algorithm: 'repacked' });
    for (let i = 0; i < 5; i++) expect(Array.from(y.data.subarray(i * 33, (i + 1) * 33)).every(Number.isNaN), `row ${i}`).toBe(i === 1);
  });

  it.skipIf(!hasVnni)('a block of activations holding NaN or Inf gives NaN rows', async () => {
    const k = 96;
    const x = randomF32(9 * k, 4);
    x[40] = NaN;  // row 0, block 1
    x[k + 70] = Infinity;  // row 1, block 2
    for (const type of ['q8_0', 'q4_0'] as const) {
      const w = kernels.quantizeWeights(new Tensor('float32', randomF32(33 * k, 5), [33, k]), type);
      const y = await kernels.quantMatmul(new Tensor('float32', x, [9, k]), w, { algorithm: 'gemm' });
      expect(Array.from(y.data.subarray(0, 66)).every(Number.isNaN), type).toBe(true);
      expect(Array.from(y.data.subarray(66)).some(Number.isNaN), type).toBe(false);
    }
  });
});

describe('quantMatmul / quantizeWeights / dequantize: bad input is a typed error', () => {
  const w = kernels.quantizeWeights(new Tensor('float32', randomF32(4 * 64), [4, 64]), 'q8_0');
  const wf = kernels.quantizeWeights(new Tensor('float32', randomF32(4 * 64), [4, 64]), 'f32');
  const x = new Tensor('float32', randomF32(64), [1, 64]);

  it('K not a multiple of 32 for q8_0 / q4_0', () => {
    for (const t of ['q8_0', 'q4_0'] as const) {
      expect(() => kernels.quantizeWeights(new Tensor('float32', new Float32Array(2 * 48), [2, 48]), t)).toThrow(/multiple of 32/);
    }
    // Any K works for the float types.
    expect(kernels.quantizeWeights(new Tensor('float32', new Float32Array(2 * 5), [2, 5]), 'f16').bytes).toBe(20);
  });

  it('shape mismatch between x and W', async () => {
    await expect(kernels.quantMatmul(new Tensor('float32', randomF32(96), [1, 96]), w)).rejects.toThrow(/shape mismatch.*K = 96.*K = 64/);
    await expect(kernels.quantMatmul(new Tensor('float32', randomF32(64), [1, 1, 64]), w)).rejects.toThrow(InvalidArgumentError);
  });

  it('invalid arguments name the parameter', async () => {
    await expect(kernels.quantMatmul(x, w, { variant: 'avx9' as kernels.QuantVariant })).rejects.toThrow(/options.variant/);
    await expect(kernels.quantMatmul(x, wf, { variant: 'avx512vnni' })).rejects.toThrow(/q8_0 and q4_0 only/);
    await expect(kernels.quantMatmul(x, w, { thread: 1 } as never)).rejects.toThrow(/did you mean 'threads'/);
    await expect(kernels.quantMatmul(x, w, { threads: 0 })).rejects.toThrow(/options.threads/);
    await expect(kernels.quantMatmul(x, w, { algorithm: 'blocked' as never })).rejects.toThrow(/options.algorithm/);
    await expect(kernels.quantMatmul(x, w, { algorithm: 'gemm', variant: 'scalar' })).rejects.toThrow(/options.algorithm 'gemm' has no kernel for q8_0 weights at variant 'scalar'/);
    await expect(kernels.quantMatmul(x, wf, { algorithm: 'gemm', variant: 'avx2' })).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.quantMatmul(x, wf, { algorithm: 'repacked' })).rejects.toThrow(/options.algorithm 'repacked' has a kernel for q8_0 weights at variant 'avx512vnni' only, got f32/);
    await expect(kernels.quantMatmul(x, w, { algorithm: 'repacked', variant: 'avx2' })).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.quantMatmul(x, new Float32Array(4) as never)).rejects.toThrow(/GgufTensor or QuantizedWeights/);
    await expect(kernels.quantMatmul(new Tensor('float16', new Uint16Array(64), [1, 64]) as never, w)).rejects.toThrow(/dtype 'float32'/);
    expect(() => kernels.quantizeWeights(new Tensor('float32', new Float32Array(64), [64]), 'q8_0')).toThrow(/2-D/);
    expect(() => kernels.quantizeWeights(new Tensor('float32', new Float32Array(64), [2, 32]), 'q5_0' as never)).toThrow(/quantizeWeights\(type\)/);
    // Tampered weights cannot make the kernel read past their bytes.
    const bad = new kernels.QuantizedWeights('q8_0', 4, 64, w.data.subarray(0, 10));
    await expect(kernels.quantMatmul(x, bad)).rejects.toThrow(/holds 10 bytes/);
  });

  it('a variant this CPU lacks is a DeviceUnavailableError, not a crash', async () => {
    const missing = (['avx2', 'avx512', 'avx512vnni'] as const).filter((v) => !variantsOf('q8_0').includes(v));
    for (const v of missing) await expect(kernels.quantMatmul(x, w, { variant: v })).rejects.toThrow(DeviceUnavailableError);
  });

  it('an aborted signal rejects with AbortError', async () => {
    const c = new AbortController();
    c.abort();
    await expect(kernels.quantMatmul(x, w, { signal: c.signal })).rejects.toThrow(AbortError);
  });
});
