// GPU GEMM (native/kernels/gemm/cuda/gemm.cu) against the CPU GEMM (sonde.kernels.gemm, itself tested
// against scalar loops): fp32 / fp16 / bf16 through every kernel (mma, register-staged or, for
// 16-bit A with 16-byte rows, cp.async-pipelined; simt; gemv; and Hopper's wgmma on the emulator
// and on cc 9.0 GPUs) on shapes one below, at and above each tile (128 rows
// and columns, 256 wgmma columns; K tiles of 32 (mma), 64 (wgmma, 4 stages), 8 (simt), 64-row
// groups x 4 (gemv); 16-byte vectors), every epilogue, leading dimensions that allow or forbid
// vector loads; int8 against the CPU int8 precision (same quantisation, so the same integer sums).
// 16-bit values are produced by the CPU casts (kernels.cast), so both sides see identical inputs.
import { expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, Tensor, kernels } from '../../dist/index.js';
import type { GemmActivation } from '../../dist/kernels/gemm.js';
import { GpuBuffer, gpuDevice, runGpuOp } from '../../dist/cuda/runtime.js';
import {
  gpuGemm, gpuGemmInt8, gpuPackGemmInt8, type GpuGemmKernel, type GpuGemmOptions, type GpuGemmType,
} from '../../dist/cuda/gemm.js';
import { randomF32 } from '../helpers.js';
import { describeGpu, gpuBuffers } from './targets.js';

const SENTINEL = 12345.5;

interface Epi {
  bias?: boolean;
  scale?: boolean;
  residual?: boolean;
  residualBeforeActivation?: boolean;
  activation?: GemmActivation;
  clipMin?: number;
  clipMax?: number;
  alpha?: number;
}

interface Case {
  m: number; n: number; k: number;
  aType?: GpuGemmType; bType?: GpuGemmType; kernel?: GpuGemmKernel;
  lda?: number; ldb?: number; ldc?: number; ldr?: number;
  ep?: Epi;
  splitK?: number;
  simtTile?: 64 | 128;
}

async function roundTo(type: GpuGemmType, x: Float32Array): Promise<{ bits: Uint16Array; values: Float32Array }> {
  const t = type === 'f16' ? 'float16' : 'bfloat16';
  const bits = (await kernels.cast(new Tensor('float32', x, [x.length]), t)).data as Uint16Array;
  const values = (await kernels.cast(new Tensor(t, bits, [x.length]), 'float32')).data as Float32Array;
  return { bits, values };
}

describeGpu('GPU GEMM', (t) => {
  const { up } = gpuBuffers(t);

  interface Prepared {
    a: Float32Array; aBuf: GpuBuffer; bDense: Float32Array; bRaw: Float32Array;
    bias?: Float32Array; scale?: Float32Array; residual?: Float32Array;
    opts: GpuGemmOptions; cpuOpts: NonNullable<Parameters<typeof kernels.gemm>[2]>; lda: number; ldb: number; ldc: number; ldr: number;
  }

  // Inputs, their device copies and the epilogue in both APIs' forms. a holds what the kernel
  // multiplies (16-bit A or an fp32 A the mma kernel rounds: rounded as the GPU does).
  async function prepare(c: Case, seed: number, roundAFor?: GpuGemmType): Promise<Prepared> {
    const { m, n, k } = c;
    const lda = c.lda ?? Math.max(k, 1), ldb = c.ldb ?? n, ldc = c.ldc ?? n, ldr = c.ldr ?? n;
    let a = randomF32(m * lda, seed);
    const bRaw = randomF32(k * ldb, seed + 1);
    let aBuf: GpuBuffer;
    const aType = c.aType ?? 'f32';
    if (aType !== 'f32') {
      const r = await roundTo(aType, a);
      a = r.values;
      aBuf = await up(r.bits);
    } else {
      aBuf = await up(a);
      if (roundAFor) a = (await roundTo(roundAFor, a)).values;
    }
    const ep = c.ep ?? {};
    const bias = ep.bias ? randomF32(n, seed + 2) : undefined;
    const scale = ep.scale ? randomF32(n, seed + 3).map((v) => v * 2) : undefined;
    const residual = ep.residual ? randomF32(m * ldr, seed + 4) : undefined;
    const opts: GpuGemmOptions = {
      bType: c.bType ?? 'f32', aType, kernel: c.kernel ?? 'auto', lda, ldb, ldc, splitK: c.splitK, simtTile: c.simtTile,
      activation: ep.activation, clipMin: ep.clipMin, clipMax: ep.clipMax, alpha: ep.alpha,
    };
    const cpuOpts: NonNullable<Parameters<typeof kernels.gemm>[2]> = {
      k, activation: ep.activation, clipMin: ep.clipMin, clipMax: ep.clipMax, alpha: ep.alpha,
    };
    if (bias) opts.bias = await up(bias), cpuOpts.bias = new Tensor('float32', bias, [n]);
    if (scale) opts.scale = await up(scale), cpuOpts.scale = new Tensor('float32', scale, [n]);
    if (residual) {
      opts.residual = await up(residual);
      opts.ldr = ldr;
      opts.residualBeforeActivation = ep.residualBeforeActivation;
      cpuOpts.residual = new Tensor('float32', residual, [m, ldr]);
      cpuOpts.residualBeforeActivation = ep.residualBeforeActivation;
    }
    for (const key of ['activation', 'clipMin', 'clipMax', 'alpha', 'splitK', 'simtTile'] as const) {
      if (opts[key] === undefined) delete opts[key];
      if (cpuOpts[key] === undefined) delete cpuOpts[key];
    }
    const bDense = new Float32Array(k * n);
    for (let p = 0; p < k; p++) for (let j = 0; j < n; j++) bDense[p * n + j] = bRaw[p * ldb + j]!;
    return { a, aBuf, bDense, bRaw, bias, scale, residual, opts, cpuOpts, lda, ldb, ldc, ldr };
  }

  async function runC(m: number, n: number, ldc: number, run: (c: GpuBuffer) => Promise<unknown>): Promise<Float32Array> {
    const cBuf = await up(new Float32Array(Math.max(m * ldc, 1)).fill(SENTINEL));
    await run(cBuf);
    const got = await cBuf.read(new Float32Array(Math.max(m * ldc, 1)));
    for (let i = 0; i < m; i++) {
      for (let j = n; j < ldc; j++) if (got[i * ldc + j] !== SENTINEL) expect(got[i * ldc + j], `C[${i}, ${j}] past n was written`).toBe(SENTINEL);
    }
    return got;
  }

  // |error| allowed per element: fp32 sums in any order ((k + 2) u per term's magnitude, with
  // tensor cores' internal fp32 rounding allowed a factor 4), carried through the epilogue
  // (activations' slopes are at most ~1.13), plus the epilogue functions' own few ulp.
  function compare(got: Float32Array, want: Float32Array, p: Prepared, c: Case, what: string, units: number): void {
    const { m, n, k } = c;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let mag = 0;
        for (let q = 0; q < k; q++) mag += Math.abs(p.a[i * p.lda + q]! * p.bDense[q * n + j]!);
        if (p.scale) mag *= Math.abs(p.scale[j]!);
        mag += Math.abs(p.bias?.[j] ?? 0) + Math.abs(p.residual?.[i * p.ldr + j] ?? 0);
        const w = want[i * n + j]!, g = got[i * p.ldc + j]!;
        const bound = 1.2 * (k + 2) * units * 2 ** -24 * mag + 4e-7 * Math.max(1, Math.abs(w));
        if (!(Math.abs(g - w) <= bound)) expect(g, `${what}: C[${i}, ${j}] (bound ${bound.toExponential(2)})`).toBe(w);
      }
    }
  }

  async function check(c: Case, seed: number): Promise<void> {
    const bType = c.bType ?? 'f32';
    const mmaRounds = c.kernel === 'mma' && (c.aType ?? 'f32') === 'f32' ? bType : undefined;
    const p = await prepare(c, seed, mmaRounds);
    let bDense = p.bDense, bBuf: GpuBuffer;
    if (bType !== 'f32') {
      const r = await roundTo(bType, p.bRaw);
      bBuf = await up(r.bits);
      bDense = (await roundTo(bType, p.bDense)).values;
    } else {
      bBuf = await up(p.bRaw);
    }
    p.bDense = bDense;
    const { m, n, k } = c;
    const want = (await kernels.gemm(new Tensor('float32', p.a, [m, p.lda]), new Tensor('float32', bDense, [k, n]), p.cpuOpts)).data;
    const got = await runC(m, n, p.ldc, (cb) => gpuGemm(t.id, p.aBuf, bBuf, cb, m, n, k, p.opts));
    compare(got, want, p, c, `${JSON.stringify(c)}`, c.kernel === 'mma' || c.kernel === 'wgmma' ? 4 : 1);
  }

  // Rows and columns around the 128 tile, K around the kernels' K tiles and 16-byte vectors. (The
// emulator pays for every warp shuffle and barrier with fiber switches, so the GEMV and int8 cases,
// whose reductions and per-row quantisation are made of them, keep few blocks.)
  const TILE_SHAPES: [number, number, number][] = [
    [1, 1, 1], [5, 13, 7], [17, 9, 9], [129, 130, 33], [127, 128, 64], [130, 127, 31],
  ];
  const TYPES: [GpuGemmType, GpuGemmType][] = [['f32', 'f32'], ['f32', 'f16'], ['f16', 'f16'], ['f32', 'bf16'], ['bf16', 'bf16']];

  it('simt tiles (128 and 64 square): every type pair on tile-edge shapes, with and without vector loads', async () => {
    let seed = 1;
    for (const simtTile of [128, 64] as const) {
      const shapes: [number, number, number][] = simtTile === 128 ? TILE_SHAPES : [[1, 1, 1], [63, 65, 9], [65, 63, 17], [64, 64, 8]];
      for (const [aType, bType] of TYPES) {
        for (const [m, n, k] of shapes) await check({ m, n, k, aType, bType, kernel: 'simt', simtTile, ep: { bias: true, activation: 'relu' } }, seed++);
        // Odd leading dimensions: no 16-byte loads or stores anywhere.
        await check({ m: 33, n: 35, k: 19, aType, bType, kernel: 'simt', simtTile, lda: 21, ldb: 37, ldc: 39 }, seed++);
      }
    }
  });

  it('simt with K split every way (splitK): every epilogue applied once after the sums, c past n untouched', async () => {
    let seed = 900;
    for (const [m, n, k] of [[129, 130, 33], [5, 13, 70], [17, 9, 200]] as const) {
      for (const splitK of [1, 2, 3, 5, 50]) {
        for (const simtTile of [128, 64] as const) {
          await check({ m, n, k, kernel: 'simt', splitK, simtTile, ldc: n + 3, ep: { bias: true, activation: 'relu' } }, seed++);
        }
        for (const residualBeforeActivation of [false, true]) {
          await check({ m, n, k, kernel: 'simt', splitK, ldr: n + 1,
            ep: { bias: true, residual: true, residualBeforeActivation, activation: 'silu' } }, seed++);
        }
        await check({ m, n, k, kernel: 'simt', splitK, bType: 'bf16', ep: { scale: true, residual: true, residualBeforeActivation: true, activation: 'relu' } }, seed++);
      }
    }
    // The residual in c itself: before the activation the sums start on it; after it c cannot split.
    const [m, n, k] = [33, 20, 96];
    const a = randomF32(m * k, 950), b = randomF32(k * n, 951), r = randomF32(m * n, 952), bias = randomF32(n, 953);
    const [aBuf, bBuf, biasBuf] = [await up(a), await up(b), await up(bias)];
    for (const residualBeforeActivation of [true, false]) {
      const want = (await kernels.gemm(new Tensor('float32', a, [m, k]), new Tensor('float32', b, [k, n]), {
        k, bias: new Tensor('float32', bias, [n]), residual: new Tensor('float32', r, [m, n]), residualBeforeActivation, activation: 'relu',
      })).data;
      for (const splitK of [1, 4, 12]) {
        const c = await up(r);
        await gpuGemm(t.id, aBuf, bBuf, c, m, n, k, { kernel: 'simt', splitK, bias: biasBuf, residual: c, residualBeforeActivation, activation: 'relu' });
        const got = await c.read(new Float32Array(m * n));
        for (let i = 0; i < m * n; i++) {
          if (!(Math.abs(got[i]! - want[i]!) <= 1e-4 * (1 + Math.abs(want[i]!)))) {
            expect(got[i], `in place, residual ${residualBeforeActivation ? 'before' : 'after'}, splitK ${splitK}: C[${i}]`).toBe(want[i]);
          }
        }
      }
    }
    const c = await up(new Float32Array(2));
    await expect(gpuGemm(t.id, c, c, c, 1, 1, 1, { splitK: 0 })).rejects.toThrow(/options.splitK must be an integer in \[1, 65535\]/);
    await expect(gpuGemm(t.id, c, c, c, 1, 1, 1, { simtTile: 32 as 64 })).rejects.toThrow(/options.simtTile must be 64 or 128, got 32/);
    await expect(runGpuOp(t.id, 'gemm', [c, c, c], { m: 1, n: 1, k: 1, bType: 0, simtTile: 100 })).rejects.toThrow(/simtTile must be 64 or 128/);
  });

  it("auto takes 'simt' for 16-bit weights where the mma tiles would leave over half the SMs idle, 'mma' otherwise", async () => {
    const sms = Math.max(gpuDevice(t.id).multiprocessors, 1);
    for (const [m, n, k] of [[20, 24, 40], [129, 130, 33], [300, 260, 16]] as const) {
      const a = await up(randomF32(m * k, 970)), b = await up((await roundTo('bf16', randomF32(k * n, 971))).bits);
      const run = async (kernel: GpuGemmKernel) => {
        const c = await up(new Float32Array(m * n));
        await gpuGemm(t.id, a, b, c, m, n, k, { bType: 'bf16', kernel });
        return c.read(new Float32Array(m * n));
      };
      const starves = 2 * Math.ceil(n / 128) * Math.ceil(m / 128) < sms;
      expect(Array.from(await run('auto')), `${m}x${n}x${k} on ${sms} SMs`).toEqual(Array.from(await run(starves ? 'simt' : 'mma')));
    }
  });

  it('mma (tensor-core) tiles: fp16 and bf16 on tile-edge shapes, fp32 A rounded to B\'s type', async () => {
    let seed = 100;
    for (const [aType, bType] of TYPES.filter(([, b]) => b !== 'f32')) {
      for (const [m, n, k] of TILE_SHAPES) await check({ m, n, k, aType, bType, kernel: 'mma', ep: { bias: true, activation: 'relu' } }, seed++);
      await check({ m: 33, n: 35, k: 47, aType, bType, kernel: 'mma', lda: 49, ldb: 37, ldc: 39 }, seed++);
      await check({ m: 20, n: 24, k: 40, aType, bType, kernel: 'mma', lda: 48, ldb: 32, ldc: 28 }, seed++);
    }
  });

  // The emulator runs the Hopper kernel whatever the cc it reports; a GPU only when it is cc 9.0.
  const wgmmaRuns = () => t.emulated || Number(gpuDevice(t.id).computeCapability) === 9;
  const pad8 = (x: number) => Math.ceil(Math.max(x, 1) / 8) * 8;

  it('wgmma (Hopper) tiles: fp16 and bf16 around the 128x256 tile, K around 64 and past the 4-stage ring', async () => {
    if (!wgmmaRuns()) {
      await expect(check({ m: 9, n: 8, k: 8, aType: 'bf16', bType: 'bf16', kernel: 'wgmma' }, 1))
        .rejects.toThrow(/'wgmma' needs a compute capability 9.0 GPU/);
      return;
    }
    let seed = 600;
    // K = 520: 9 K tiles, so stages are refilled twice (barrier phases 0, 1, 0). M = 1100: 9 row
    // tiles, a full group of 8 and a group of 1 in the block order.
    const shapes: [number, number, number][] = [[1, 1, 1], [5, 13, 7], [127, 255, 64], [129, 257, 65], [64, 300, 520], [1100, 300, 70]];
    for (const type of ['bf16', 'f16'] as const) {
      for (const [m, n, k] of shapes) {
        await check({ m, n, k, aType: type, bType: type, kernel: 'wgmma', lda: pad8(k), ldb: pad8(n), ep: { bias: true, activation: 'relu' } }, seed++);
      }
      // Row strides past the data (the copies' bounds are the matrix, not the stride), odd ldc.
      await check({ m: 33, n: 35, k: 47, aType: type, bType: type, kernel: 'wgmma', lda: 56, ldb: 40, ldc: 39 }, seed++);
      await check({ m: 21, n: 19, k: 24, aType: type, bType: type, kernel: 'wgmma', lda: 24, ldb: 24, ldr: 23,
        ep: { bias: true, scale: true, residual: true, activation: 'gelu' } }, seed++);
    }
    // k = 0: the epilogue of zero, and no tensor copy of an empty matrix.
    const bias = await up(new Float32Array([1, -2, 3]));
    const c = await up(new Float32Array(6).fill(SENTINEL));
    const dummy = await up(new Uint16Array(64));
    await gpuGemm(t.id, dummy, dummy, c, 2, 3, 0, { aType: 'bf16', bType: 'bf16', kernel: 'wgmma', lda: 8, ldb: 8, bias, activation: 'relu' });
    expect(Array.from(await c.read(new Float32Array(6)))).toEqual([1, 0, 3, 1, 0, 3]);
    // Copies need 16-byte rows.
    await expect(gpuGemm(t.id, dummy, dummy, c, 2, 3, 4, { aType: 'bf16', bType: 'bf16', kernel: 'wgmma', ldb: 8 }))
      .rejects.toThrow(/'wgmma' needs a and b 16-byte aligned with lda and ldb multiples of 8/);
  });

  it('mma with 16-bit A and 16-byte rows: the cp.async pipeline, K past its 4-stage ring', async () => {
    let seed = 700;
    for (const type of ['bf16', 'f16'] as const) {
      for (const [m, n, k] of [[5, 13, 7], [129, 130, 33], [127, 128, 64], [64, 200, 300]] as const) {
        await check({ m, n, k, aType: type, bType: type, kernel: 'mma', lda: pad8(k), ldb: pad8(n), ep: { bias: true, activation: 'silu' } }, seed++);
      }
    }
  });

  it('gemv (m <= 8 by default) on column and K edges, and row groups past 8 when forced', async () => {
    let seed = 200;
    for (const [aType, bType] of TYPES) {
      // m = 1 runs 1024 threads per column run (16 or 32 columns) for up to 4 runs (the emulator's
      // SMs), 512 for up to 8, 256 beyond; K past several batches of loads (rows = threads / 4 * 4).
      for (const [m, n, k] of [[1, 1, 1], [1, 33, 257], [1, 40, 2500], [1, 120, 2500], [1, 200, 2500], [1, 300, 1300],
        [3, 31, 255], [8, 17, 300]] as const) {
        await check({ m, n, k, aType, bType, ep: { bias: true, activation: 'silu' } }, seed++);  // 'auto' picks gemv
      }
      await check({ m: 10, n: 40, k: 70, aType, bType, kernel: 'gemv' }, seed++);
      await check({ m: 2, n: 35, k: 33, aType, bType, kernel: 'gemv', lda: 35, ldb: 37, ldc: 41 }, seed++);
    }
  });

  it('every epilogue on every kernel: scale, bias, residual before or after each activation', async () => {
    const acts: Epi[] = [
      { activation: 'none' }, { activation: 'relu' }, { activation: 'relu6' }, { activation: 'clip', clipMin: -0.3, clipMax: 0.4 },
      { activation: 'silu' }, { activation: 'gelu' }, { activation: 'geluTanh' }, { activation: 'sigmoid' },
      { activation: 'leakyRelu', alpha: 0.2 }, { activation: 'hardSwish' },
    ];
    let seed = 300;
    for (const [kernel, bType, m] of [['simt', 'f32', 21], ['mma', 'bf16', 21], ['gemv', 'f16', 3]] as const) {
      for (const act of acts) {
        for (const residualBeforeActivation of [false, true]) {
          await check({ m, n: 19, k: 24, bType, kernel, ldr: 23,
            ep: { ...act, bias: true, scale: true, residual: true, residualBeforeActivation } }, seed++);
        }
      }
      await check({ m, n: 19, k: 24, bType, kernel, ep: { scale: true } }, seed++);
      await check({ m, n: 19, k: 24, bType, kernel, ep: { residual: true } }, seed++);
    }
  });

  it('k = 0 gives the epilogue of zero; m = 0 or n = 0 writes nothing', async () => {
    const bias = await up(new Float32Array([1, -2, 3]));
    for (const kernel of ['simt', 'mma', 'gemv'] as const) {
      const c = await up(new Float32Array(6).fill(SENTINEL));
      const dummy = await up(new Uint16Array(8));
      await gpuGemm(t.id, dummy, dummy, c, 2, 3, 0, { bType: 'bf16', kernel, bias, activation: 'relu' });
      expect(Array.from(await c.read(new Float32Array(6)))).toEqual([1, 0, 3, 1, 0, 3]);
      await gpuGemm(t.id, dummy, dummy, c, 0, 3, 2, { bType: 'bf16', kernel });
      await gpuGemm(t.id, dummy, dummy, c, 2, 0, 2, { bType: 'bf16', kernel });
      expect(Array.from(await c.read(new Float32Array(6)))).toEqual([1, 0, 3, 1, 0, 3]);
    }
  });

  it('int8: the same quantisation and integer sums as the CPU int8 GEMM, on every kernel and epilogue', async () => {
    let seed = 400;
    // K around the 16-byte quad rows, the 64-byte mma K tile and the gemv's batches of quads (for
    // m = 1 1024, 512 or 256 on up to 4, 8 or more 16-column runs; 256 for m > 1), past 2 batches.
    const shapes: [number, number, number, GpuGemmKernel][] = [
      [1, 1, 1, 'auto'], [3, 17, 15, 'auto'], [8, 33, 65, 'auto'], [1, 20, 1100, 'auto'], [1, 20, 9000, 'auto'],
      [1, 70, 4200, 'auto'], [1, 150, 2100, 'auto'],
      [1, 1, 1, 'mma'], [9, 17, 16, 'mma'], [129, 127, 65, 'mma'], [17, 130, 64, 'mma'], [20, 129, 17, 'mma'],
      [10, 21, 63, 'simt'], [9, 23, 257, 'gemv'],
    ];
    const eps: Epi[] = [{}, { bias: true, activation: 'relu' }, { bias: true, scale: true, residual: true, activation: 'gelu' },
      { bias: true, residual: true, residualBeforeActivation: true, activation: 'clip', clipMin: -1, clipMax: 2 }];
    let e = 0;
    for (const [m, n, k, kernel] of shapes) {
      const ep = eps[e++ % eps.length]!;
      const lda = kernel === 'simt' ? k + 3 : k, ldc = kernel === 'gemv' ? n + 1 : n;
      const p = await prepare({ m, n, k, lda, ldc, ep }, seed++);
      // A zero row, a constant row and a row of one sign: the quantiser's special cases.
      if (m >= 3) {
        p.a.fill(0, 0, lda);
        p.a.fill(0.75, lda, 2 * lda);
        for (let q = 0; q < k; q++) p.a[2 * lda + q] = Math.abs(p.a[2 * lda + q]!) * 3;
        await p.aBuf.write(p.a);
      }
      const bBuf = await up(p.bRaw);
      const weights = await gpuPackGemmInt8(t.id, bBuf, k, n, { ldb: p.ldb });
      const packed = kernels.packGemmWeights(new Tensor('float32', p.bDense, [k, n]), { precision: 'int8' });
      try {
        const want = (await kernels.gemm(new Tensor('float32', p.a, [m, lda]), packed, p.cpuOpts)).data;
        const { bType: _b, aType: _a, ldb: _l, ...rest } = p.opts;
        const got = await runC(m, n, ldc, (cb) => gpuGemmInt8(t.id, p.aBuf, weights, cb, m, { ...rest, kernel }));
        for (let i = 0; i < m; i++) {
          for (let j = 0; j < n; j++) {
            let mag = 0;
            for (let q = 0; q < k; q++) mag += Math.abs(p.a[i * lda + q]! * p.bDense[q * n + j]!);
            mag = mag * Math.abs(p.scale?.[j] ?? 1) + Math.abs(p.bias?.[j] ?? 0) + Math.abs(p.residual?.[i * n + j] ?? 0);
            // One quantisation step of one product already exceeds this: only float rounding may differ.
            const bound = 2e-6 * mag + 1e-7;
            const w = want[i * n + j]!, g = got[i * ldc + j]!;
            if (!(Math.abs(g - w) <= bound)) expect(g, `int8 ${m}x${n}x${k} ${kernel}: C[${i}, ${j}]`).toBe(w);
          }
        }
      } finally {
        weights.dispose();
        packed.dispose();
      }
    }
  });

  it('rejects bad input with typed errors naming the parameter', async () => {
    const small = await up(new Float32Array(4));
    const big = await up(new Float32Array(64));
    const w = 'gpuGemm';
    await expect(gpuGemm(t.id, small, big, big, 2, 4, 4)).rejects.toThrow(InvalidArgumentError);
    await expect(gpuGemm(t.id, small, big, big, 2, 4, 4)).rejects.toThrow(`${w}: a holds 16 bytes, needs 32`);
    await expect(gpuGemm(t.id, big, small, big, 2, 4, 4)).rejects.toThrow(`${w}: b holds 16 bytes, needs 64`);
    await expect(gpuGemm(t.id, big, big, small, 2, 4, 4)).rejects.toThrow(`${w}: c holds 16 bytes, needs 32`);
    await expect(gpuGemm(t.id, big, big, big, -1, 4, 4)).rejects.toThrow(/gpuGemm: m must be an integer/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4.5, 4)).rejects.toThrow(/gpuGemm: n must be an integer/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { lda: 3 })).rejects.toThrow(/options.lda must be an integer in \[4,/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { ldc: 2 })).rejects.toThrow(/options.ldc/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { bType: 'f8' as GpuGemmType })).rejects.toThrow(/options.bType must be one of/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { bType: 'bf16', aType: 'f16' })).rejects.toThrow(/options.aType must be 'f32' or bType/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { kernel: 'mma' })).rejects.toThrow(/'mma' needs bType 'f16' or 'bf16'/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { kernel: 'fast' as GpuGemmKernel })).rejects.toThrow(/options.kernel must be one of/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { kernel: 'wgmma', bType: 'bf16' })).rejects.toThrow(/'wgmma' needs aType and bType both 'f16' or both 'bf16', got 'f32' and 'bf16'/);
    await expect(runGpuOp(t.id, 'gemm', [big, big, big], { m: 2, n: 4, k: 4, aType: 0, bType: 2, kernel: 4 })).rejects.toThrow(/kernel 'wgmma' needs A and B both fp16 or both bf16/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { activation: 'tanh' as GemmActivation })).rejects.toThrow(/options.activation must be one of/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { activation: 'clip', clipMin: 0 })).rejects.toThrow(/needs options.clipMin and options.clipMax/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { activation: 'clip', clipMin: 1, clipMax: 0 })).rejects.toThrow(/must not exceed/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { alpha: 0.1 })).rejects.toThrow(/options.alpha has no effect with activation 'none'/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { ldr: 4 })).rejects.toThrow(/options.ldr has no effect without options.residual/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { bias: small, scale: small, residual: small })).rejects.toThrow(/options.residual holds 16 bytes, needs 32/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { bias: 'x' as unknown as GpuBuffer })).rejects.toThrow(/options.bias must be a GpuBuffer/);
    await expect(gpuGemm(t.id, big, big, big, 2, 4, 4, { acitvation: 'relu' } as GpuGemmOptions)).rejects.toThrow(/unknown option 'acitvation'; did you mean 'activation'/);
    // c is written: it must not be a, b, the bias or the scale (read while c is written); the
    // residual may be c itself (each element is read before it is written).
    await expect(gpuGemm(t.id, big, small, big, 2, 4, 1)).rejects.toThrow(/gpuGemm: c and a are the same buffer; c is written and needs its own/);
    await expect(gpuGemm(t.id, small, big, big, 1, 4, 4)).rejects.toThrow(/gpuGemm: c and b are the same buffer/);
    await expect(gpuGemm(t.id, small, small, big, 1, 4, 1, { bias: big })).rejects.toThrow(/gpuGemm: c and options.bias are the same buffer/);
    {
      // C = A B + C through residual = c: A [2 x 3], B [3 x 4].
      const a = Float32Array.from([1, 2, 3, 4, 5, 6]), bm = Float32Array.from([1, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0]);
      const c0 = Float32Array.from([10, 20, 30, 40, 50, 60, 70, 80]);
      const cb = await up(c0);
      await gpuGemm(t.id, await up(a), await up(bm), cb, 2, 4, 3, { residual: cb });
      const want = new Float32Array(8);
      for (let i = 0; i < 2; i++) for (let j = 0; j < 4; j++) {
        let s = c0[i * 4 + j]!;
        for (let q = 0; q < 3; q++) s += a[i * 3 + q]! * bm[q * 4 + j]!;
        want[i * 4 + j] = s;
      }
      expect(Array.from(await cb.read(new Float32Array(8)))).toEqual(Array.from(want));
    }
    const gone = await GpuBuffer.from(t.id, new Float32Array(64));
    gone.dispose();
    await expect(gpuGemm(t.id, gone, big, await up(new Float32Array(8)), 2, 4, 4)).rejects.toThrow(DisposedError);
    // The native op checks again when called directly.
    await expect(runGpuOp(t.id, 'gemm', [small, big, big], { m: 2, n: 4, k: 4, bType: 0 })).rejects.toThrow(/gemm: a \(buffer 0\) holds 16 bytes/);
    await expect(runGpuOp(t.id, 'gemm', [big, big, big], { m: 2, n: 4, k: 4, bType: 3 })).rejects.toThrow(/'bType'/);
    await expect(runGpuOp(t.id, 'gemm', [big, big, big], { m: 2, n: 4, k: 4, bType: 2, aType: 1 })).rejects.toThrow(/aType must be f32 or the same type as bType/);
    await expect(runGpuOp(t.id, 'gemm', [big, big, big], { m: 2, n: 4, k: 4, bType: 0, kernel: 1 })).rejects.toThrow(/kernel 'mma' needs fp16 or bf16 weights/);
    await expect(runGpuOp(t.id, 'gemm', [big, big, big], { m: 2, n: 4, k: 4, bType: 0, hasBias: 1 })).rejects.toThrow(/bias \(buffer 3\) is missing/);
    await expect(runGpuOp(t.id, 'gemm', [big, big, big], { m: 2, n: 4, k: 4, bType: 0, activation: 2, alpha: 1, beta: 0 })).rejects.toThrow(/clip needs alpha <= beta/);
  });

  it('int8 rejects bad input: non-finite weights, K beyond the s32 bound, disposed weights', async () => {
    const b = new Float32Array(12).fill(0.5);
    b[6] = NaN;  // row 1, column 2
    const bBuf = await up(b);
    await expect(gpuPackGemmInt8(t.id, bBuf, 3, 4)).rejects.toThrow(/column 2 of b holds NaN or Inf/);
    await expect(gpuPackGemmInt8(t.id, bBuf, 66312, 4)).rejects.toThrow(/gpuPackGemmInt8: k must be an integer in \[0, 66311\]/);
    await expect(gpuPackGemmInt8(t.id, bBuf, 4, 4)).rejects.toThrow(/gpuPackGemmInt8: b holds 48 bytes, needs 64/);
    await expect(runGpuOp(t.id, 'gemm_pack_s8', [bBuf, bBuf, bBuf, bBuf], { k: 3, n: 4 })).rejects.toThrow(/gemm_pack_s8: q \(buffer 1\) holds 48 bytes/);
    b[6] = 0.25;
    await bBuf.write(b);
    const weights = await gpuPackGemmInt8(t.id, bBuf, 3, 4);
    const a = await up(new Float32Array(6));
    const c = await up(new Float32Array(8));
    await expect(gpuGemmInt8(t.id, a, weights, c, 3)).rejects.toThrow(/gpuGemmInt8: a holds 24 bytes, needs 36/);
    await expect(gpuGemmInt8(t.id, a, {} as never, c, 2)).rejects.toThrow(/weights must be GpuInt8Weights/);
    await expect(gpuGemmInt8(t.id, a, weights, c, 2, { kernel: 'x' as GpuGemmKernel })).rejects.toThrow(/options.kernel must be one of/);
    await expect(gpuGemmInt8(t.id, a, weights, c, 2, { kernel: 'wgmma' })).rejects.toThrow(/'wgmma' is for fp16\/bf16 weights/);
    await expect(gpuGemmInt8(t.id, c, weights, c, 2)).rejects.toThrow(/gpuGemmInt8: c and a are the same buffer; c is written and needs its own/);
    await expect(gpuGemmInt8(t.id, a, weights, weights.scale, 1)).rejects.toThrow(/gpuGemmInt8: c and weights.scale are the same buffer/);
    weights.dispose();
    weights.dispose();
    await expect(gpuGemmInt8(t.id, a, weights, c, 2)).rejects.toThrow(DisposedError);
  });
});
