// GPU SpMM (CSR with nnz-balanced warps and its M = 1 SpMV path; BSR 1 x 8/16/32) against the CPU
// sparse kernels (sonde.kernels.spmm over sparseFromCsr / toSparse weights of the same matrix), on
// weights with empty output columns, a fully dense one, N and K off the block and warp sizes, and M
// around the CSR kernel's 32-row lanes and 64-row tiles and the BSR kernel's 8-row tiles, with every epilogue.
import { expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, Tensor, kernels } from '../../dist/index.js';
import { runGpuOp } from '../../dist/cuda/runtime.js';
import { balancedChunks, gpuSparseFromCsr, gpuSpmm, gpuToSparse, type GpuSpmmOptions } from '../../dist/cuda/sparse.js';
import { randomF32 } from '../helpers.js';

type GemmActivation = NonNullable<GpuSpmmOptions['activation']>;
import { describeGpu, gpuBuffers } from './targets.js';

const U = 2 ** -24;

/** B [K, N] with ~density non-zeros; columns `empty` all zero and column `dense` all non-zero. */
function prunedWeights(k: number, n: number, density: number, seed: number, empty: number[], dense: number[]): Float32Array {
  const b = randomF32(k * n, seed), keep = randomF32(k * n, seed + 1);
  for (let i = 0; i < k * n; i++) {
    const j = i % n;
    if (empty.includes(j) || (!dense.includes(j) && (keep[i]! + 1) / 2 >= density)) b[i] = 0;
    else if (b[i] === 0) b[i] = 0.5;
  }
  return b;
}

function csrOf(b: Float32Array, k: number, n: number) {
  const rowPtr = new Int32Array(n + 1), colIdx: number[] = [], values: number[] = [];
  for (let j = 0; j < n; j++) {
    for (let kk = 0; kk < k; kk++) if (b[kk * n + j] !== 0) { colIdx.push(kk); values.push(b[kk * n + j]!); }
    rowPtr[j + 1] = colIdx.length;
  }
  return { rows: n, cols: k, rowPtr, colIdx: Int32Array.from(colIdx), values: Float32Array.from(values) };
}

describeGpu('GPU SpMM', (t) => {
  const { up, alloc } = gpuBuffers(t);

  const EPILOGUES: { name: string; activation: GemmActivation; bias?: boolean; scale?: boolean; residual?: 'after' | 'before'; clip?: [number, number]; alpha?: number }[] = [
    { name: 'plain', activation: 'none' },
    { name: 'bias + relu', activation: 'relu', bias: true },
    { name: 'scale + bias + relu6 + residual before', activation: 'relu6', bias: true, scale: true, residual: 'before' },
    { name: 'silu + residual after', activation: 'silu', residual: 'after' },
    { name: 'gelu', activation: 'gelu', bias: true },
    { name: 'geluTanh', activation: 'geluTanh' },
    { name: 'sigmoid', activation: 'sigmoid', scale: true },
    { name: 'leakyRelu', activation: 'leakyRelu', alpha: 0.3 },
    { name: 'hardSwish', activation: 'hardSwish', bias: true },
    { name: 'clip', activation: 'clip', clip: [-0.3, 0.4] },
  ];

  // [K, N, density, empty output columns, dense output columns]
  const MATRICES: [number, number, number, number[], number[]][] = [
    [37, 41, 0.3, [0, 3, 40], [10]],
    [64, 33, 0.1, [5], [32]],
    [20, 300, 0.05, [], [7]],  // many short rows: chunks of several rows per warp
    [1, 9, 0.5, [2], [0]],
  ];

  for (const format of ['csr', 'bsr8', 'bsr16', 'bsr32'] as const) {
    it(`${format} matches the CPU spmm on every shape and epilogue`, async () => {
      let seed = 100;
      for (const [k, n, density, empty, dense] of MATRICES) {
        const bData = prunedWeights(k, n, density, seed++, empty, dense);
        const b = new Tensor('float32', bData, [k, n]);
        const bw = format === 'csr' ? 0 : Number(format.slice(3));
        const gpuW = format === 'csr' ? await gpuSparseFromCsr(t.id, csrOf(bData, k, n)) : await gpuToSparse(t.id, b, { format: 'bsr', blockShape: [1, bw as 8] });
        const cpuW = format === 'csr' ? kernels.sparseFromCsr(csrOf(bData, k, n)) : kernels.toSparse(b, { format: 'bsr', blockShape: [1, bw as 8] });
        expect(gpuW.nnz).toBe(cpuW.nnz);
        if (format !== 'csr') expect(gpuW.units).toBe(cpuW.blocks);
        // CSR: around its 32 lanes and 64-row tiles, every epilogue at one M (the epilogue code is
        // shared, so BSR runs the three that cover scale, bias, residual and its leading dimension
        // around its 8-row tiles: the emulator's time goes with threads x blocks).
        for (const m of format === 'csr' ? [1, 2, 31, 33, 65] : [1, 7, 9]) {
          for (const [e, ep] of EPILOGUES.entries()) {
            if ((m !== 33 || format !== 'csr') && e > 2) continue;
            // a with lda = k + 3, c with ldc = n + 2, the residual with ldr = n + 1: leading dimensions honoured.
            const lda = k + 3, ldc = n + 2, ldr = n + 1;
            const aData = randomF32(m * lda, seed++);
            const aDense = new Tensor('float32', aData, [m, lda]);
            const bias = ep.bias ? new Tensor('float32', randomF32(n, seed++), [n]) : undefined;
            const scale = ep.scale ? new Tensor('float32', randomF32(n, seed++), [n]) : undefined;
            const residual = ep.residual ? new Tensor('float32', randomF32(m * ldr, seed++), [m, ldr]) : undefined;
            const cpuOpts = {
              k, activation: ep.activation, bias, scale, residual, residualBeforeActivation: ep.residual === 'before',
              clipMin: ep.clip?.[0], clipMax: ep.clip?.[1], alpha: ep.alpha,
            };
            const want = await kernels.spmm(aDense, cpuW, cpuOpts);
            const c = alloc(m * ldc * 4);
            await c.write(new Float32Array(m * ldc).fill(NaN));
            const opts: GpuSpmmOptions = {
              lda, ldc, ldr, activation: ep.activation, residualBeforeActivation: ep.residual === 'before',
              bias: bias && await up(bias.data), scale: scale && await up(scale.data), residual: residual && await up(residual.data),
              clipMin: ep.clip?.[0], clipMax: ep.clip?.[1], alpha: ep.alpha,
            };
            await gpuSpmm(t.id, await up(aData), m, gpuW, c, opts);
            const got = await c.read(new Float32Array(m * ldc));
            for (let i = 0; i < m; i++) {
              for (let j = 0; j < ldc; j++) {
                const g = got[i * ldc + j]!;
                const what = `${format} ${k}x${n} m=${m} ${ep.name} [${i}, ${j}]`;
                if (j >= n) { expect(g, `${what}: past n is left alone`).toBeNaN(); continue; }
                let mag = 0;
                for (let kk = 0; kk < k; kk++) mag += Math.abs(aData[i * lda + kk]! * bData[kk * n + j]!);
                mag = mag * (scale ? Math.abs(scale.data[j]!) : 1) + (bias ? Math.abs(bias.data[j]!) : 0) + (residual ? Math.abs(residual.data[i * ldr + j]!) : 0);
                const w = want.data[i * n + j]!;
                const bound = 4 * (k + 2) * U * mag + 2e-6 * (1 + Math.abs(w));
                if (!(Math.abs(g - w) <= bound)) expect(g, `${what} (bound ${bound})`).toBe(w);
              }
            }
          }
        }
        gpuW.dispose();
        cpuW.dispose();
      }
    });
  }

  it('chunks rows by non-zero count', () => {
    // Rows of 3, 0, 200 (alone: above the target), 1 x 100, 70.
    const lens = [3, 0, 200, ...Array(100).fill(1), 70];
    const rowPtr = new Uint32Array(lens.length + 1);
    lens.forEach((l, i) => { rowPtr[i + 1] = rowPtr[i]! + l; });
    const chunks = balancedChunks(rowPtr, lens.length);
    expect(chunks[0]).toBe(0);
    expect(chunks[chunks.length - 1]).toBe(lens.length);
    for (let c = 0; c + 1 < chunks.length; c++) {
      const [r0, r1] = [chunks[c]!, chunks[c + 1]!];
      expect(r1).toBeGreaterThan(r0);
      // A chunk holds at most the target (64 here) unless it is a single long row.
      if (r1 - r0 > 1) expect(rowPtr[r1]! - rowPtr[r0]!).toBeLessThanOrEqual(64);
    }
    expect(Array.from(chunks.slice(0, 4))).toEqual([0, 2, 3, 67]);
  });

  it('rejects bad input with typed errors naming the parameter', async () => {
    const csr = { rows: 2, cols: 3, rowPtr: new Int32Array([0, 1, 2]), colIdx: new Int32Array([0, 2]), values: new Float32Array([1, 2]) };
    await expect(gpuSparseFromCsr(t.id, { ...csr, rowPtr: new Int32Array([0, 2, 1]) })).rejects.toThrow(/rowPtr must be non-decreasing/);
    await expect(gpuSparseFromCsr(t.id, { ...csr, rowPtr: new Int32Array([1, 1, 2]) })).rejects.toThrow(/rowPtr\[0\] must be 0/);
    await expect(gpuSparseFromCsr(t.id, { ...csr, colIdx: new Int32Array([0, 3]) })).rejects.toThrow(/colIdx\[1\] = 3 \(row 1\) is out of range/);
    await expect(gpuSparseFromCsr(t.id, { ...csr, rowPtr: new Int32Array([0, 2, 2]), colIdx: new Int32Array([2, 1]) })).rejects.toThrow(/strictly increasing/);
    await expect(gpuSparseFromCsr(t.id, { ...csr, values: new Float32Array([1]) })).rejects.toThrow(/same length/);
    await expect(gpuSparseFromCsr(t.id, { ...csr, rowPtr: [0, 1, 2] as unknown as Int32Array })).rejects.toThrow(/csr.rowPtr must be an Int32Array/);
    const dense = new Tensor('float32', new Float32Array([1, 0, 0, 2, 0, 3]), [2, 3]);
    await expect(gpuToSparse(t.id, dense, { format: 'coo' as 'csr' })).rejects.toThrow(/options.format/);
    await expect(gpuToSparse(t.id, dense, { format: 'bsr', blockShape: [1, 12] as unknown as [1, 8] })).rejects.toThrow(/blockShape must be/);
    await expect(gpuToSparse(t.id, dense, { blockShape: [1, 8] })).rejects.toThrow(/no effect with format 'csr'/);
    await expect(gpuToSparse(t.id, new Tensor('float32', new Float32Array(3), [3]))).rejects.toThrow(/must be 2-D/);
    const w = await gpuToSparse(t.id, dense);
    const a = alloc(2 * 2 * 4), c = alloc(2 * 3 * 4);
    await expect(gpuSpmm(t.id, a, 3, w, c)).rejects.toThrow(/gpuSpmm: a holds 16 bytes, needs 24/);
    await expect(gpuSpmm(t.id, a, 2, w, alloc(8))).rejects.toThrow(/gpuSpmm: c holds 8 bytes, needs 24/);
    await expect(gpuSpmm(t.id, a, -1, w, c)).rejects.toThrow(/gpuSpmm: m/);
    await expect(gpuSpmm(t.id, a, 2, w, c, { lda: 1 })).rejects.toThrow(/options.lda/);
    await expect(gpuSpmm(t.id, a, 2, w, c, { activation: 'clip' })).rejects.toThrow(/needs options.clipMin/);
    await expect(gpuSpmm(t.id, a, 2, w, c, { activation: 'tanh' as 'relu' })).rejects.toThrow(/options.activation/);
    await expect(gpuSpmm(t.id, a, 2, w, c, { bias: alloc(4) })).rejects.toThrow(/options.bias holds 4 bytes, needs 12/);
    await expect(gpuSpmm(t.id, a, 2, w, c, { residual: alloc(4) })).rejects.toThrow(/options.residual holds 4 bytes/);
    await expect(gpuSpmm(t.id, a, 2, w, c, { ldc: 2 })).rejects.toThrow(/options.ldc/);
    await expect(gpuSpmm(t.id, a, 2, w, a)).rejects.toThrow(/c must not be a|c holds/);
    await expect(gpuSpmm(t.id, a, 2, {} as typeof w, c)).rejects.toThrow(/must be GpuSparseWeights/);
    await expect(gpuSpmm(t.id, a, 2, w, c, { bogus: 1 } as GpuSpmmOptions)).rejects.toThrow(InvalidArgumentError);
    // The native ops check again when called directly.
    await expect(runGpuOp(t.id, 'spmm_bsr', [a, a, a, a, c], { m: 2, k: 2, n: 3, bw: 12, blocks: 0 })).rejects.toThrow(/bw must be 8, 16 or 32/);
    await expect(runGpuOp(t.id, 'spmm_bsr', [a, a, a, a, c, a], { m: 2, k: 2, n: 3, bw: 8, blocks: 0 })).rejects.toThrow(/expected 5 buffers, got 6/);
    await expect(runGpuOp(t.id, 'spmm_csr', [a, a, a, a, a, c, a], { m: 2, k: 2, n: 3, nnz: 9, chunks: 1 })).rejects.toThrow(/colIdx \(buffer 2\) holds 16 bytes/);
    await expect(runGpuOp(t.id, 'spmm_csr', [a, a, a, a, a, c, a], { m: 2, k: 2, n: 3, nnz: 0, chunks: 1, lda: 1 })).rejects.toThrow(/lda/);
    w.dispose();
    await expect(gpuSpmm(t.id, a, 2, w, c)).rejects.toThrow(DisposedError);
  });
});
