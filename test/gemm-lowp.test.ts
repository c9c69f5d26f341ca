import { describe, expect, it } from 'vitest';
import {
  DeviceUnavailableError, DisposedError, InvalidArgumentError, Tensor, devices, kernels, reportedExternalMemory,
} from '../dist/index.js';
import { randomTensor } from './helpers.js';

const cpu = devices().cpu;
const levels: kernels.GemmVariant[] = ['scalar', ...(cpu.simd !== 'scalar' ? ['avx2' as const] : []),
  ...(cpu.simd === 'avx512' ? ['avx512' as const] : [])];
const hasBf16 = cpu.simd === 'avx512' && cpu.features.includes('avx512bf16');
const hasVnni = cpu.simd === 'avx512' && cpu.features.includes('avx512vnni');
// Intel AMX (Sapphire Rapids and later): the tile kernels run only where the CPU and the OS allow them.
const hasAmxBf16 = cpu.simd === 'avx512' && cpu.features.includes('amx_bf16');
const hasAmxInt8 = cpu.simd === 'avx512' && cpu.features.includes('amx_int8');
type Lowp = 'bf16' | 'fp16' | 'int8';
const variantsOf: Record<Lowp, kernels.GemmVariant[]> = {
  bf16: [...levels, ...(hasBf16 ? ['avx512bf16' as const] : []), ...(hasAmxBf16 ? ['amx' as const] : [])],
  fp16: levels,
  int8: [...levels, ...(hasVnni ? ['avx512vnni' as const] : []), ...(hasAmxInt8 ? ['amx' as const] : [])],
};
const cases = (Object.keys(variantsOf) as Lowp[]).flatMap((p) => variantsOf[p].map((v) => [p, v] as const));

// Tile edges: MR is 4, 6, 8, 12 or 32 and NR 8, 16 or 32 depending on the kernel; bf16 pairs and
// int8 quads of K are zero-padded (to 32 / 64 k for the AMX tiles), so K = 1, 2, 3, 4, 5, odd K above
// a block and K one below / above a tile row are all here, as are M = 16 (one AMX row slice), 17, 31,
// 32 and 33.
const shapes: [number, number, number][] = [
  [1, 1, 1], [1, 7, 33], [13, 3, 65], [12, 32, 32], [25, 5, 17], [8, 258, 96], [9, 4, 31], [6, 2, 16],
  [4, 1, 8], [100, 65, 1], [17, 255, 40], [1, 300, 129], [7, 33, 15], [24, 129, 64],
  [16, 64, 16], [31, 63, 48], [32, 96, 32], [33, 127, 17], [64, 128, 64],
];

const u = 2 ** -24;

/** fp32 -> bf16 -> fp32, round to nearest even (the definition in native/kernels/gemm/lowp-gemm.h). */
function bf16Round(x: Float32Array): Float32Array {
  const out = new Float32Array(x.length);
  const bits = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const ob = new Uint32Array(out.buffer);
  for (let i = 0; i < x.length; i++) {
    const b = bits[i]!;
    ob[i] = (((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) << 16) >>> 0;
  }
  return out;
}

function dot(a: Float32Array, b: Float32Array, k: number, n: number, i: number, j: number): [number, number] {
  let s = 0;
  let mag = 0;
  for (let p = 0; p < k; p++) {
    const t = a[i * k + p]! * b[p * n + j]!;
    s += t;
    mag += Math.abs(t);
  }
  return [s, mag];
}

function fail(what: string, i: number, j: number, got: number, want: number, bound: number): never {
  throw new Error(`${what}: C[${i}, ${j}] = ${got}, want ${want} (|err| ${Math.abs(got - want).toExponential(3)} > bound ${bound.toExponential(3)})`);
}

/**
 * Error of a quantised/rounded product against the exact fp32-input product, per element:
 * - bf16: each weight is off by at most 2^-8 relative (RNE to 8 significant bits) and, when the
 *   kernel rounds A too, each activation as well: sum |a b| (2^-8 + 2^-8 + 2^-16) plus the f32 bound.
 * - fp16: 2^-11 relative per weight (11-bit mantissa; the test data stays in the normal range).
 * - int8: |b - s_j q| <= s_j / 2 and |a - s_a (u - z)| <= s_a (half a step, plus one step where the
 *   zero point's rounding pushes the top value past 255 and it is clamped), so the error is at most
 *   sum_k (|a| s_j / 2 + |b| s_a + s_a s_j / 2), plus the f32 bound.
 */
function expectWithinQuantisation(p: Lowp, activations: string, got: Float32Array, a: Float32Array, b: Float32Array,
  m: number, k: number, n: number): void {
  for (let i = 0; i < m; i++) {
    let lo = 0;
    let hi = 0;
    for (let q = 0; q < k; q++) { lo = Math.min(lo, a[i * k + q]!); hi = Math.max(hi, a[i * k + q]!); }
    const sa = hi / 255 - lo / 255;
    for (let j = 0; j < n; j++) {
      const [s, mag] = dot(a, b, k, n, i, j);
      let bound = (k + 4) * u * mag * 1.01;
      if (p === 'bf16') bound += mag * (activations === 'bf16' ? 2 ** -7 + 2 ** -16 : 2 ** -8);
      else if (p === 'fp16') bound += mag * 2 ** -11;
      else {
        let amax = 0;
        for (let q = 0; q < k; q++) amax = Math.max(amax, Math.abs(b[q * n + j]!));
        const sj = amax / 127;
        for (let q = 0; q < k; q++) bound += Math.abs(a[i * k + q]!) * sj / 2 + Math.abs(b[q * n + j]!) * sa + sa * sj / 2;
        bound *= 1.001;
      }
      const g = got[i * n + j]!;
      if (!(Math.abs(g - s) <= bound + 1e-30)) fail(`${p} vs the fp32 product`, i, j, g, s, bound);
    }
  }
}

describe('kernels.gemm with low-precision weights', () => {
  describe.each(cases)('%s %s', (precision, variant) => {
    it.each(shapes)('%i x %i x %i matches the reference', async (m, k, n) => {
      const a = randomTensor([m, k], m * 7 + k);
      const b = randomTensor([k, n], n * 13 + k);
      const w = kernels.packGemmWeights(b, { precision, variant: variant as never });
      expect(w.precision).toBe(precision);
      expect(w.variant).toBe(variant);
      const c = await kernels.gemm(a, w);
      expect(c.dims).toEqual([m, n]);
      if (precision === 'bf16') {
        // Independent JS reference from the rounded inputs; the f32 summation bound
        // (k + 2) u sum |a' b'| then covers any order of the fp32 (or vdpbf16ps) sums.
        const bq = bf16Round(b.data);
        const aq = w.activations === 'bf16' ? bf16Round(a.data) : a.data;
        for (let i = 0; i < m; i++) {
          for (let j = 0; j < n; j++) {
            const [s, mag] = dot(aq, bq, k, n, i, j);
            const bound = (k + 2) * u * mag + 1e-30;
            if (!(Math.abs(c.data[i * n + j]! - s) <= bound)) fail('bf16', i, j, c.data[i * n + j]!, s, bound);
          }
        }
      } else {
        // The native reference reads the same rounded / quantised weights and quantises A the same
        // way, then sums exactly (double; int64 for int8).
        const ref = await kernels.gemm(a, w, { variant: 'reference' });
        for (let i = 0; i < m; i++) {
          for (let j = 0; j < n; j++) {
            const got = c.data[i * n + j]!;
            const want = ref.data[i * n + j]!;
            // fp16: the f32 summation bound on the (1 + 2^-11)-close weights. int8: the integer sums
            // are exact; only int->float, the scale product and the final multiply round: 4u.
            const bound = precision === 'fp16'
              ? (k + 2) * u * dot(a.data, b.data, k, n, i, j)[1] * 1.001 + 1e-30
              : 4 * u * Math.abs(want) + 1e-30;
            if (!(Math.abs(got - want) <= bound)) fail(`${precision} vs reference`, i, j, got, want, bound);
          }
        }
      }
      expectWithinQuantisation(precision, w.activations, c.data, a.data, b.data, m, k, n);
      w.dispose();
    });

    it('results are identical on 1 and 2 threads', async () => {
      const a = randomTensor([50, 70], 9);
      const w = kernels.packGemmWeights(randomTensor([70, 90], 10), { precision, variant: variant as never });
      const one = await kernels.gemm(a, w, { threads: 1 });
      const two = await kernels.gemm(a, w, { threads: 2 });
      expect(Array.from(two.data)).toEqual(Array.from(one.data));
      w.dispose();
    });
  });

  // Each epilogue family at least once per precision (and per kernel): the epilogue runs on the
  // dequantised fp32 value, so it is compared with the reference's epilogue on the same value. Bound:
  // the product's bound times |scale| and the activation's Lipschitz constant (<= 1.5), plus a few
  // ulp of every later operation and the SIMD activations' approximation error (erf: 1.5e-7).
  const epilogues: [string, Partial<kernels.GemmOptions>, boolean][] = [
    ['scale + bias + silu', { activation: 'silu' }, false],
    ['bias + relu6, residual after', { activation: 'relu6' }, true],
    ['residual before gelu', { activation: 'gelu', residualBeforeActivation: true }, true],
    ['leakyRelu', { activation: 'leakyRelu', alpha: 0.1 }, false],
    ['sigmoid', { activation: 'sigmoid' }, false],
    ['hardSwish, no scale', { activation: 'hardSwish' }, false],
  ];
  describe.each(cases)('%s %s epilogues', (precision, variant) => {
    it.each(epilogues)('%s', async (_name, opts, withResidual) => {
      const [m, k, n] = [19, 45, 37];
      const a = randomTensor([m, k], 3);
      const b = randomTensor([k, n], 4);
      const bias = randomTensor([n], 5);
      const scale = randomTensor([n], 6);
      const residual = withResidual ? randomTensor([m, n + 3], 7) : undefined;
      const w = kernels.packGemmWeights(b, { precision, variant: variant as never });
      const o = { ...opts, bias, scale, ...(residual ? { residual } : {}) };
      const c = await kernels.gemm(a, w, o);
      const ref = await kernels.gemm(a, w, { ...o, variant: 'reference' });
      for (let i = 0; i < m; i++) {
        for (let j = 0; j < n; j++) {
          const [, mag] = dot(a.data, b.data, k, n, i, j);
          const prod = precision === 'int8' ? 4 * u * mag : (k + 2) * u * mag * 1.01;
          const r = residual ? Math.abs(residual.data[i * (n + 3) + j]!) : 0;
          const bound = 1.5 * (Math.abs(scale.data[j]!) * prod + 4 * u * (mag + Math.abs(bias.data[j]!) + r)) +
            8 * u * Math.abs(ref.data[i * n + j]!) + 4 * u * r + 2e-7 * (1 + mag);
          const got = c.data[i * n + j]!;
          const want = ref.data[i * n + j]!;
          if (!(Math.abs(got - want) <= bound)) fail(`${precision} ${variant} epilogue`, i, j, got, want, bound);
        }
      }
      w.dispose();
    });
  });

  // The AMX tiles read whole 32-row blocks of A and 32 / 64 k per tile row: the rows past M come from
  // the reused scratch of an earlier run, which must never reach a result.
  it.runIf(hasAmxBf16 || hasAmxInt8)('amx: rows of an earlier, larger run never reach a later result', async () => {
    for (const precision of ['bf16', 'int8'] as const) {
      if (precision === 'bf16' ? !hasAmxBf16 : !hasAmxInt8) continue;
      const w = kernels.packGemmWeights(randomTensor([70, 40], 3), { precision, variant: 'amx' });
      const big = new Tensor('float32', new Float32Array(64 * 70).fill(NaN), [64, 70]);
      const bad = await kernels.gemm(big, w, { threads: 1 });
      expect(Number.isNaN(bad.data[0])).toBe(true);
      const a = randomTensor([5, 70], 4);
      const got = await kernels.gemm(a, w, { threads: 1 });
      const ref = await kernels.gemm(a, w, { threads: 1, variant: 'reference' });
      for (let i = 0; i < got.data.length; i++) {
        expect(Number.isFinite(got.data[i])).toBe(true);
        expect(Math.abs(got.data[i]! - ref.data[i]!)).toBeLessThanOrEqual(1e-4 * (1 + Math.abs(ref.data[i]!)));
      }
      w.dispose();
    }
  });

  it('auto packs for the fastest kernel of this CPU', () => {
    const b = randomTensor([8, 8]);
    const bf = kernels.packGemmWeights(b, { precision: 'bf16' });
    expect(bf.variant).toBe(hasAmxBf16 ? 'amx' : hasBf16 ? 'avx512bf16' : cpu.simd);
    expect(bf.activations).toBe(hasBf16 || hasAmxBf16 ? 'bf16' : 'fp32');
    const q = kernels.packGemmWeights(b, { precision: 'int8' });
    expect(q.variant).toBe(hasAmxInt8 ? 'amx' : hasVnni ? 'avx512vnni' : cpu.simd);
    expect(q.activations).toBe('u8');
    expect(q.ukernel).toMatch(/^qs8_gemm_\d+x\d+__/);
    expect(kernels.packGemmWeights(b).precision).toBe('fp32');
    for (const w of [bf, q]) w.dispose();
  });

  it('hand-checked int8: exact for values on the quantisation grid', async () => {
    // Columns with max |b| = 127 have scale 1; rows of A spanning [0, 255] have scale 1 and zero point 0.
    const a = new Tensor('float32', new Float32Array([255, 0, 3, 0, 255, 51]), [2, 3]);
    const b = new Tensor('float32', new Float32Array([127, -127, -127, 2, 5, 0]), [3, 2]);
    for (const variant of variantsOf.int8) {
      const w = kernels.packGemmWeights(b, { precision: 'int8', variant: variant as never });
      expect(Array.from((await kernels.gemm(a, w)).data)).toEqual([255 * 127 + 15, -255 * 127, -255 * 127 + 255, 510]);
      w.dispose();
    }
    const w = kernels.packGemmWeights(b, { precision: 'int8' });
    w.dispose();
  });

  it('int8: a row of A holding NaN or Inf gives a NaN row; other rows are unaffected', async () => {
    const a = randomTensor([3, 10], 1);
    a.data[3] = NaN;
    a.data[25] = Infinity;
    const b = randomTensor([10, 5], 2);
    for (const variant of variantsOf.int8) {
      const w = kernels.packGemmWeights(b, { precision: 'int8', variant: variant as never });
      const c = await kernels.gemm(a, w);
      expect(Array.from(c.data.slice(0, 5)).every(Number.isNaN)).toBe(true);
      expect(Array.from(c.data.slice(5, 10)).every(Number.isFinite)).toBe(true);
      expect(Array.from(c.data.slice(10, 15)).every(Number.isNaN)).toBe(true);
      w.dispose();
    }
  });

  it('bf16 and fp16 weights keep NaN; fp16 overflows to Inf beyond 65504', async () => {
    const b = new Tensor('float32', new Float32Array([NaN, 70000, 1, 65504]), [1, 4]);
    const a = new Tensor('float32', new Float32Array([1]), [1, 1]);
    const h = kernels.packGemmWeights(b, { precision: 'fp16' });
    expect(Array.from((await kernels.gemm(a, h)).data)).toEqual([NaN, Infinity, 1, 65504]);
    const f = kernels.packGemmWeights(b, { precision: 'bf16' });
    const c = (await kernels.gemm(a, f)).data;
    expect(Number.isNaN(c[0])).toBe(true);
    expect(c[1]).toBe(70144); // 70000 rounded to an 8-bit mantissa
    for (const w of [h, f]) w.dispose();
  });

  it('K = 0 gives epilogue(0); M = 0 and N = 0 give empty results', async () => {
    const bias = new Tensor('float32', new Float32Array([1, -2, 3]), [3]);
    for (const precision of ['bf16', 'fp16', 'int8'] as const) {
      const w = kernels.packGemmWeights(randomTensor([0, 3]), { precision });
      expect(Array.from((await kernels.gemm(randomTensor([2, 0]), w, { bias, activation: 'relu' })).data)).toEqual([1, 0, 3, 1, 0, 3]);
      const e = kernels.packGemmWeights(randomTensor([4, 0]), { precision });
      expect((await kernels.gemm(randomTensor([2, 4]), e)).dims).toEqual([2, 0]);
      expect((await kernels.gemm(randomTensor([0, 0]), w)).dims).toEqual([0, 3]);
      w.dispose();
      e.dispose();
    }
  });

  it('takes k (leading dimension of A) and out with ldc > n', async () => {
    const a = randomTensor([5, 12], 3);
    const b = randomTensor([9, 7], 4);
    const w = kernels.packGemmWeights(b, { precision: 'int8' });
    const out = new Tensor('float32', new Float32Array(5 * 10).fill(42), [5, 10]);
    await kernels.gemm(a, w, { k: 9, out });
    const ref = await kernels.gemm(a, w, { k: 9, variant: 'reference' });
    for (let i = 0; i < 5; i++) {
      for (let j = 0; j < 10; j++) {
        if (j < 7) expect(Math.abs(out.data[i * 10 + j]! - ref.data[i * 7 + j]!)).toBeLessThanOrEqual(4 * u * Math.abs(ref.data[i * 7 + j]!) + 1e-30);
        else expect(out.data[i * 10 + j]).toBe(42);
      }
    }
    w.dispose();
  });

  it('reports its native memory: bf16 and fp16 half of fp32, int8 a quarter (plus scales and sums)', () => {
    const b = randomTensor([512, 512], 1);
    const before = reportedExternalMemory();
    const f32 = kernels.packGemmWeights(b, { variant: 'scalar' });
    const ws = (['bf16', 'fp16', 'int8'] as const).map((precision) => kernels.packGemmWeights(b, { precision, variant: 'scalar' }));
    expect(ws[0]!.bytes).toBe(f32.bytes / 2);
    expect(ws[1]!.bytes).toBe(f32.bytes / 2);
    expect(ws[2]!.bytes).toBeLessThan(f32.bytes / 4 + 8 * 512 + 256);
    expect(reportedExternalMemory() - before).toBe(f32.bytes + ws.reduce((s, w) => s + w.bytes, 0));
    for (const w of [f32, ...ws]) w.dispose();
    expect(reportedExternalMemory()).toBe(before);
  });
});

describe('low-precision bad inputs', () => {
  const b = randomTensor([4, 5]);

  it('unknown precision', () => {
    expect(() => kernels.packGemmWeights(b, { precision: 'int4' as never })).toThrow(InvalidArgumentError);
    expect(() => kernels.packGemmWeights(b, { precision: 'bf61' as never })).toThrow(
      /options.precision must be one of 'fp32', 'bf16', 'fp16', 'int8', got "bf61"; did you mean 'bf16'\?/);
    expect(() => kernels.packGemmWeights(b, { precison: 'bf16' } as never)).toThrow(/did you mean 'precision'/);
  });

  it('a variant that has no kernel for the precision', () => {
    expect(() => kernels.packGemmWeights(b, { precision: 'fp16', variant: 'avx512vnni' })).toThrow(InvalidArgumentError);
    expect(() => kernels.packGemmWeights(b, { precision: 'fp16', variant: 'avx512vnni' })).toThrow(
      /options.variant \(precision 'fp16'\) must be one of 'auto', 'scalar', 'avx2', 'avx512', got "avx512vnni"/);
    expect(() => kernels.packGemmWeights(b, { precision: 'bf16', variant: 'avx512vnni' })).toThrow(InvalidArgumentError);
    expect(() => kernels.packGemmWeights(b, { precision: 'int8', variant: 'avx512bf16' })).toThrow(InvalidArgumentError);
    expect(() => kernels.packGemmWeights(b, { variant: 'avx512bf16' })).toThrow(/options.variant must be one of 'auto', 'scalar'/);
    expect(() => kernels.packGemmWeights(b, { precision: 'int8', variant: 'reference' as never })).toThrow(InvalidArgumentError);
  });

  it.runIf(!hasBf16)('avx512bf16 on a CPU without it is DeviceUnavailableError', () => {
    expect(() => kernels.packGemmWeights(b, { precision: 'bf16', variant: 'avx512bf16' })).toThrow(DeviceUnavailableError);
  });

  it('amx has no fp16 kernel', () => {
    expect(() => kernels.packGemmWeights(b, { precision: 'fp16', variant: 'amx' as never })).toThrow(InvalidArgumentError);
  });

  it.runIf(!hasAmxBf16)('amx on a CPU without AMX tiles is DeviceUnavailableError', () => {
    expect(() => kernels.packGemmWeights(b, { precision: 'bf16', variant: 'amx' })).toThrow(DeviceUnavailableError);
    expect(() => kernels.packGemmWeights(b, { precision: 'bf16', variant: 'amx' })).toThrow(/cannot run 'amx'/);
  });

  it.runIf(!hasVnni)('avx512vnni on a CPU without it is DeviceUnavailableError', () => {
    expect(() => kernels.packGemmWeights(b, { precision: 'int8', variant: 'avx512vnni' })).toThrow(DeviceUnavailableError);
  });

  it('NaN or Inf in int8 weights is an InvalidArgumentError naming b and the element', () => {
    const bad = randomTensor([4, 5]);
    bad.data[1 * 5 + 2] = NaN;
    expect(() => kernels.packGemmWeights(bad, { precision: 'int8' })).toThrow(InvalidArgumentError);
    expect(() => kernels.packGemmWeights(bad, { precision: 'int8' })).toThrow(
      'packGemmWeights(b): int8 quantisation needs finite weights, but b[1, 2] is NaN');
    bad.data[1 * 5 + 2] = 0;
    bad.data[3 * 5 + 4] = -Infinity;
    expect(() => kernels.packGemmWeights(bad, { precision: 'int8', variant: 'scalar' })).toThrow(/b\[3, 4\] is infinite/);
  });

  it('int8 K above the s32 limit', () => {
    expect(() => kernels.packGemmWeights(randomTensor([66312, 1]), { precision: 'int8' })).toThrow(
      /has 66312 rows; int8 weights allow K <= 66311/);
  });

  it('wrong K or N', async () => {
    const w = kernels.packGemmWeights(b, { precision: 'bf16' });
    await expect(kernels.gemm(randomTensor([3, 5]), w)).rejects.toThrow(/shape mismatch: a is \[3, 5\] but b \(packed weights\) is \[4, 5\]/);
    await expect(kernels.gemm(randomTensor([3, 4]), w, { bias: randomTensor([4]) })).rejects.toThrow(
      'gemm: options.bias must have dims [5], got [4]');
    await expect(kernels.gemm(randomTensor([3, 4]), w, { out: randomTensor([3, 4]) })).rejects.toThrow(/options.out must have dims \[3, ldc\] with ldc >= 5/);
    w.dispose();
  });

  it('a run variant other than auto, reference or the packed one', async () => {
    const w = kernels.packGemmWeights(b, { precision: 'int8', variant: 'scalar' });
    await expect(kernels.gemm(randomTensor([3, 4]), w, { variant: 'avx2' })).rejects.toThrow(
      /options.variant must be one of 'auto', 'reference', 'scalar', got "avx2"/);
    w.dispose();
  });

  it('use after dispose', async () => {
    const w = kernels.packGemmWeights(b, { precision: 'fp16' });
    w.dispose();
    w.dispose();
    await expect(kernels.gemm(randomTensor([3, 4]), w)).rejects.toThrow(DisposedError);
  });
});
