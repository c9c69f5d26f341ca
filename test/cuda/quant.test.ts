// GPU q8_0 / q4_0 matrix products against the CPU quant kernels: the exact 'reference' variant
// (double sums of the shared precision definition) within the fp32 error bound of that definition,
// and, where the CPU has AVX512-VNNI, its blocked GEMM bit for bit (both GPU GEMMs sum each output
// as the same fp32 chain over the blocks in order). Shapes walk the tile edges: k of 1 block and odd
// block counts (the mma GEMM stages 2 blocks, the GEMV lanes take every 32nd), n around the GEMV's
// 4 rows per block and the GEMMs' 64 / 128 weight rows per tile, m 1..9 and around 64 rows.
import { afterAll, expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, Tensor, devices, kernels } from '../../dist/index.js';
import { GpuBuffer, runGpuOp } from '../../dist/cuda/runtime.js';
import {
  GpuQuantWeights, gpuQuantMatmul, gpuQuantPackedBytes, gpuQuantScratchBytes, type GpuQuantAlgorithm, type GpuQuantType,
} from '../../dist/cuda/quant.js';
import { randomF32 } from '../helpers.js';
import { describeGpu } from './targets.js';

const cpu = devices().cpu;
const hasVnni = cpu.simd === 'avx512' && cpu.features.includes('avx512vnni');
const TYPES: GpuQuantType[] = ['q8_0', 'q4_0'];
const u = 2 ** -24;

interface Case { m: number; n: number; k: number; algorithm: GpuQuantAlgorithm; simt?: boolean }
// k up to many rounds of a warp's 32 x 4 blocks; n past 16384, where one row takes the GEMV with
// four blocks in flight per lane instead of two.
const GEMV: Case[] = [
  { m: 1, n: 1, k: 32, algorithm: 'auto' }, { m: 1, n: 5, k: 96, algorithm: 'auto' },
  { m: 2, n: 4, k: 32 * 33, algorithm: 'auto' }, { m: 3, n: 7, k: 64, algorithm: 'auto' },
  { m: 8, n: 9, k: 160, algorithm: 'auto' }, { m: 9, n: 3, k: 96, algorithm: 'gemv' },
  { m: 1, n: 3, k: 32 * 1100, algorithm: 'auto' }, { m: 2, n: 5, k: 32 * 530, algorithm: 'gemv' },
  { m: 1, n: 16390, k: 32, algorithm: 'auto' },
];
const GEMM_SHAPES: [number, number, number][] = [[1, 1, 32], [9, 3, 96], [17, 129, 96], [65, 127, 64], [64, 128, 32], [63, 65, 160]];
const GEMM: Case[] = GEMM_SHAPES.flatMap(([m, n, k]) => [false, true].map((simt) => ({ m, n, k, algorithm: 'gemm' as const, simt })));

/**
 * |error| bound of the precision definition: (8 nb + 4) u sum_b |dw dx| sum_j |qw_j qx_j|, with
 * |dx qx_j| <= |x_j| + dx / 2 bounding the quantised activations from the float ones.
 */
function bounds(x: Float32Array, w: Float32Array, m: number, n: number, k: number): Float64Array {
  const nb = k / 32;
  const xa = new Float64Array(m * k);
  for (let i = 0; i < m; i++) {
    for (let b = 0; b < nb; b++) {
      let amax = 0;
      for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[i * k + b * 32 + j]!));
      for (let j = 0; j < 32; j++) xa[i * k + b * 32 + j] = Math.abs(x[i * k + b * 32 + j]!) + amax / 254;
    }
  }
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let r = 0; r < n; r++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += xa[i * k + p]! * Math.abs(w[r * k + p]!);
      out[i * n + r] = (8 * nb + 4) * u * s;
    }
  }
  return out;
}

describeGpu('GPU q8_0 / q4_0 matmul', (t) => {
  const held: { dispose(): void }[] = [];
  const keep = <T extends { dispose(): void }>(b: T): T => {
    held.push(b);
    return b;
  };
  afterAll(() => held.forEach((b) => b.dispose()));

  async function check(type: GpuQuantType, c: Case, seed: number, edit?: (x: Float32Array) => void): Promise<void> {
    const { m, n, k } = c;
    const what = `${type} ${c.algorithm}${c.simt ? ' simt' : ''} ${m}x${n}x${k}`;
    const x = randomF32(m * k, seed).map((v) => v * 4);
    edit?.(x);
    const qw = kernels.quantizeWeights(new Tensor('float32', randomF32(n * k, seed + 1), [n, k]), type);
    const wf = (await kernels.dequantize(qw)).data as Float32Array;
    const want = (await kernels.quantMatmul(new Tensor('float32', x, [m, k]), qw, { variant: 'reference' })).data as Float32Array;
    const bound = bounds(x, wf, m, n, k);
    const weights = keep(await GpuQuantWeights.upload(t.id, qw));
    expect(weights.bytes).toBe(gpuQuantPackedBytes(type, n, k));
    const xb = keep(await GpuBuffer.from(t.id, x));
    const yb = keep(GpuBuffer.alloc(t.id, m * n * 4));
    await yb.write(new Float32Array(m * n).fill(-12345));  // a missed store cannot pass as a stale right answer
    await gpuQuantMatmul(xb, weights, yb, m, { algorithm: c.algorithm, simt: c.simt });
    const got = await yb.read(new Float32Array(m * n));
    for (let i = 0; i < m * n; i++) {
      const g = got[i]!, wv = want[i]!;
      if (Number.isNaN(wv)) expect(g, `${what} [${i}] (a non-finite block)`).toBeNaN();
      else if (!(Math.abs(g - wv) <= bound[i]!)) expect(g, `${what} [${Math.floor(i / n)}, ${i % n}] within ${bound[i]}`).toBe(wv);
    }
    if (c.algorithm === 'gemm' && hasVnni) {
      const vnni = await kernels.quantMatmul(new Tensor('float32', x, [m, k]), qw, { variant: 'avx512vnni', algorithm: 'gemm' });
      expect(Array.from(got), `${what} against the CPU's blocked GEMM`).toEqual(Array.from(vnni.data as Float32Array));
    }
  }

  for (const type of TYPES) {
    it(`${type} GEMV, m = 1..9, k from 1 block to 1100`, async () => {
      for (const [i, c] of GEMV.entries()) await check(type, c, 10 + i);
    });
    it(`${type} GEMM on int8 tensor cores and SIMT dp4a, tile edges`, async () => {
      for (const [i, c] of GEMM.entries()) await check(type, c, 40 + i);
    });
    it(`${type}: zero, tiny and non-finite activation blocks behave as on the CPU`, async () => {
      const edit = (x: Float32Array) => {
        x.fill(0, 0, 32);                           // row 0, block 0: all zero (dx = 0)
        x.fill(1e-37, 32, 64);                      // row 0, block 1: below 2^-120, counts as zero
        x[96 + 40] = Infinity;                      // row 1, block 1: its row's outputs are NaN
        x[2 * 96 + 3] = NaN;                        // row 2, block 0
      };
      for (const c of [{ m: 3, n: 5, k: 96, algorithm: 'gemv' as const },
        { m: 3, n: 5, k: 96, algorithm: 'gemm' as const }, { m: 3, n: 5, k: 96, algorithm: 'gemm' as const, simt: true }]) {
        await check(type, c, 70, edit);
      }
    });
  }

  // One activation row also runs on the streaming GEMVs (quant.cu: persistent warps over ranges of
  // rows, each step of 1 / 2 / 4 blocks per lane loaded one ahead into registers, or 1 / 2 blocks
  // S - 1 steps ahead into shared memory by cp.async). Their lanes sum the same blocks in the same
  // order, so every variant must give the warp-per-rows GEMV's bits. gemvWarps caps the
  // grid so that small shapes reach several rows per warp, a last warp with fewer rows, idle warps
  // of a block, and row ends inside a step (k of 70 and 129 blocks; steps of 32, 64, 128 blocks);
  // a row of 4700 blocks leaves no room for x beside the cp.async rings (the fallback).
  it('the streaming GEMV variants give the warp-per-rows GEMV bit for bit', async () => {
    const shapes: [number, number, number][] = [[1, 32, 0], [5, 64, 64], [9, 96, 4], [37, 32 * 70, 5], [130, 32 * 129, 12], [40, 32 * 33, 0], [2, 32 * 4700, 0]];
    for (const type of TYPES) {
      for (const [i, [n, k, gemvWarps]] of shapes.entries()) {
        const qw = kernels.quantizeWeights(new Tensor('float32', randomF32(n * k, 90 + i), [n, k]), type);
        const weights = keep(await GpuQuantWeights.upload(t.id, qw));
        const x = keep(await GpuBuffer.from(t.id, randomF32(k, 120 + i).map((v) => v * 3)));
        const y = keep(GpuBuffer.alloc(t.id, n * 4));
        const scratch = keep(GpuBuffer.alloc(t.id, gpuQuantScratchBytes(1, k)));
        const run = async (gemv: number): Promise<number[]> => {
          await y.write(new Float32Array(n).fill(-12345));
          await runGpuOp(t.id, 'quant_matmul', [x, weights.buffer('test'), y, scratch],
            { type: type === 'q8_0' ? 3 : 4, m: 1, n, k, algorithm: 1, gemv, gemvWarps });
          return Array.from(await y.read(new Float32Array(n)));
        };
        const rows = await run(1);
        expect(rows.includes(-12345), `${type} ${n}x${k}: every output written`).toBe(false);
        for (const gemv of [2, 3, 4]) expect(await run(gemv), `${type} ${n}x${k} gemv ${gemv} (warps <= ${gemvWarps})`).toEqual(rows);
      }
    }
  });

  it('a caller-owned scratch gives the same result and can be reused for the same x; m = 0 is a no-op', async () => {
    const [m, n, k] = [12, 6, 64];
    const qw = kernels.quantizeWeights(new Tensor('float32', randomF32(n * k, 3), [n, k]), 'q4_0');
    const weights = keep(await GpuQuantWeights.upload(t.id, qw));
    const xb = keep(await GpuBuffer.from(t.id, randomF32(m * k, 4)));
    const [y1, y2] = [keep(GpuBuffer.alloc(t.id, m * n * 4)), keep(GpuBuffer.alloc(t.id, m * n * 4))];
    const scratch = keep(GpuBuffer.alloc(t.id, gpuQuantScratchBytes(m, k)));
    await gpuQuantMatmul(xb, weights, y1, m);
    await gpuQuantMatmul(xb, weights, y2, m, { scratch });
    expect(Array.from(await y2.read(new Float32Array(m * n)))).toEqual(Array.from(await y1.read(new Float32Array(m * n))));
    // Q, K and V share their input: a second matrix reuses the quantised x left in the scratch, so
    // changing x in between must not change its result.
    const qw2 = kernels.quantizeWeights(new Tensor('float32', randomF32(n * k, 5), [n, k]), 'q4_0');
    const weights2 = keep(await GpuQuantWeights.upload(t.id, qw2));
    for (const algorithm of ['gemv', 'gemm'] as const) {
      await gpuQuantMatmul(xb, weights, y2, m, { scratch, algorithm });
      await gpuQuantMatmul(xb, weights2, y1, m, { algorithm });
      const fresh = await y1.read(new Float32Array(m * n));
      await xb.write(new Float32Array(m * k));
      await gpuQuantMatmul(xb, weights2, y1, m, { scratch, algorithm, reuseScratch: true });
      expect(Array.from(await y1.read(new Float32Array(m * n))), algorithm).toEqual(Array.from(fresh));
      expect(fresh.some((v) => v !== 0)).toBe(true);
      await xb.write(randomF32(m * k, 4));
    }
    await expect(gpuQuantMatmul(xb, weights, y1, 0)).resolves.toBe(0);
    // y may be x (the quantiser reads x before the product writes y): the same bits as apart.
    const sq = kernels.quantizeWeights(new Tensor('float32', randomF32(k * k, 6), [k, k]), 'q8_0');
    const square = keep(await GpuQuantWeights.upload(t.id, sq));
    for (const rows of [1, 12]) {
      const apart = keep(GpuBuffer.alloc(t.id, rows * k * 4)), inPlace = keep(await GpuBuffer.from(t.id, randomF32(rows * k, 7)));
      await gpuQuantMatmul(inPlace, square, apart, rows);
      await gpuQuantMatmul(inPlace, square, inPlace, rows);
      expect(Array.from(await inPlace.read(new Float32Array(rows * k))), `m = ${rows}`).toEqual(Array.from(await apart.read(new Float32Array(rows * k))));
    }
  });

  it('rejects bad input with typed errors naming the parameter', async () => {
    const qw = kernels.quantizeWeights(new Tensor('float32', randomF32(4 * 64, 5), [4, 64]), 'q8_0');
    const up = (w: unknown) => GpuQuantWeights.upload(t.id, w as kernels.QuantizedWeights);
    await expect(up({ ...qw, type: 'q5_0', data: qw.data, n: 4, k: 64 })).rejects.toThrow(/upload: weights: type must be one of 'q8_0', 'q4_0'/);
    await expect(up({ type: 'q8_0', n: 4, k: 48, data: qw.data })).rejects.toThrow(/k must be a multiple of 32/);
    await expect(up({ type: 'q8_0', n: 4, k: 64, data: qw.data.subarray(1) })).rejects.toThrow(/weights.data holds 271 bytes, not 4 rows of 64 q8_0 \(272 bytes\)/);
    await expect(up({ type: 'q8_0', n: -1, k: 64, data: qw.data })).rejects.toThrow(InvalidArgumentError);
    await expect(up(null)).rejects.toThrow(/weights must be \{ type, n, k, data \}/);
    await expect(up({ type: 'q8_0', n: 4, k: 64, data: [1, 2] })).rejects.toThrow(/weights.data must be a Uint8Array/);

    const weights = keep(await GpuQuantWeights.upload(t.id, qw));
    const x = keep(GpuBuffer.alloc(t.id, 2 * 64 * 4)), y = keep(GpuBuffer.alloc(t.id, 2 * 4 * 4));
    await expect(gpuQuantMatmul(x, weights, y, 3)).rejects.toThrow(/gpuQuantMatmul: x holds 512 bytes, needs 768/);
    await expect(gpuQuantMatmul(x, weights, keep(GpuBuffer.alloc(t.id, 31)), 2)).rejects.toThrow(/gpuQuantMatmul: y holds 31 bytes, needs 32/);
    await expect(gpuQuantMatmul(x, weights, y, 2, { scratch: keep(GpuBuffer.alloc(t.id, 100)) })).rejects.toThrow(/options.scratch holds 100 bytes, needs 144/);
    await expect(gpuQuantMatmul(x, weights, y, -1)).rejects.toThrow(/gpuQuantMatmul: m must be an integer/);
    await expect(gpuQuantMatmul(x, weights, y, 1.5)).rejects.toThrow(/gpuQuantMatmul: m must be an integer/);
    await expect(gpuQuantMatmul(x, weights, y, 2, { algorithm: 'gemmm' as GpuQuantAlgorithm })).rejects.toThrow(/options.algorithm must be one of .*did you mean 'gemm'/);
    await expect(gpuQuantMatmul(x, weights, y, 2, { simt: 1 as unknown as boolean })).rejects.toThrow(/options.simt must be a boolean/);
    await expect(gpuQuantMatmul(x, weights, y, 2, { reuseScratch: true })).rejects.toThrow(/options.reuseScratch needs options.scratch/);
    await expect(gpuQuantMatmul(x, weights, y, 2, { reuseScratch: 'yes' as never })).rejects.toThrow(/options.reuseScratch must be a boolean/);
    await expect(gpuQuantMatmul(x, weights, y, 2, { smit: true } as never)).rejects.toThrow(/unknown option 'smit'; did you mean 'simt'/);
    await expect(gpuQuantMatmul(x, qw as never, y, 2)).rejects.toThrow(/weights must be GpuQuantWeights/);
    await expect(gpuQuantMatmul(x, weights, y, 2, { scratch: x })).rejects.toThrow(/gpuQuantMatmul: options.scratch and x are the same buffer; options.scratch is written and needs its own/);
    const big = keep(GpuBuffer.alloc(t.id, 512));
    await expect(gpuQuantMatmul(x, weights, big, 2, { scratch: big })).rejects.toThrow(/options.scratch and y are the same buffer/);
    await expect(gpuQuantMatmul(new Float32Array(4) as never, weights, y, 1)).rejects.toThrow(/x must be a GpuBuffer/);

    // The native ops check again when called directly.
    const packed = keep(GpuBuffer.alloc(t.id, gpuQuantPackedBytes('q8_0', 4, 64)));
    const scratch = keep(GpuBuffer.alloc(t.id, gpuQuantScratchBytes(2, 64)));
    const params = { type: 3, m: 2, n: 4, k: 64 };
    await expect(runGpuOp(t.id, 'quant_matmul', [x, packed, y, scratch], { ...params, k: 48 })).rejects.toThrow(/quant_matmul: k \(48\) must be a multiple of 32/);
    await expect(runGpuOp(t.id, 'quant_matmul', [x, packed, y, scratch], { ...params, type: 2 })).rejects.toThrow(/'type' must be an integer in \[3, 4\]/);
    await expect(runGpuOp(t.id, 'quant_matmul', [x, packed, y, scratch], { ...params, n: 5 })).rejects.toThrow(/packed weights \(buffer 1\) holds 272 bytes/);
    await expect(runGpuOp(t.id, 'quant_matmul', [x, packed, y], params)).rejects.toThrow(/scratch \(buffer 3\) is missing/);
    await expect(runGpuOp(t.id, 'quant_matmul', [x, packed, y, scratch], { ...params, algorithm: 3 })).rejects.toThrow(/'algorithm' must be an integer in \[0, 2\]/);
    await expect(runGpuOp(t.id, 'quant_matmul', [x, packed, y, scratch], { ...params, gemv: 5 })).rejects.toThrow(/'gemv' must be an integer in \[0, 4\]/);
    await expect(runGpuOp(t.id, 'quant_matmul', [x, packed, y, scratch], { ...params, gemvWarps: -1 })).rejects.toThrow(/'gemvWarps' must be an integer/);
    await expect(runGpuOp(t.id, 'quant_pack', [packed, packed], { type: 3, n: 5, k: 64 })).rejects.toThrow(/quant_pack: raw weights \(buffer 0\) holds 272 bytes/);

    const gone = await GpuQuantWeights.upload(t.id, qw);
    gone.dispose();
    gone.dispose();  // idempotent
    await expect(gpuQuantMatmul(x, gone, y, 2)).rejects.toThrow(DisposedError);
    const goneX = GpuBuffer.alloc(t.id, 2 * 64 * 4);
    goneX.dispose();
    await expect(gpuQuantMatmul(goneX, weights, y, 2)).rejects.toThrow(DisposedError);
  });
});
