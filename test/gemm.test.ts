import { describe, expect, it } from 'vitest';
import {
  AbortError, DeviceUnavailableError, DisposedError, InvalidArgumentError, Tensor, devices, kernels,
  reportedExternalMemory,
} from '../dist/index.js';
import { expectGemmClose, randomTensor } from './helpers.js';

const simd = devices().cpu.simd;
const runnable: kernels.GemmVariant[] = ['reference', 'scalar', 'auto',
  ...(simd !== 'scalar' ? ['avx2' as const] : []), ...(simd === 'avx512' ? ['avx512' as const] : [])];

// Tile edges of every variant: MR is 4 (scalar), 6 (avx2), 12 (avx512); NR is 8, 16, 32; the K
// block is 1024 and a task starts from 192 rows. Each shape sits below, at or above one of those.
const shapes: [number, number, number][] = [
  [1, 1, 1], [17, 33, 65], [257, 3, 129], [1, 1000, 37], [12, 256, 32], [13, 257, 33], [11, 255, 31],
  [6, 16, 16], [7, 17, 15], [5, 512, 8], [24, 300, 96], [3, 1, 200], [100, 64, 1],
  // M = 1 runs the AVX-512 matrix-vector tile (4 k-phases): K below, at and off a multiple of 4,
  // N off the 16-lane halves, and an MLP layer split across threads.
  [1, 3, 17], [1, 4, 16], [1, 6, 33], [1, 257, 48], [1, 1023, 15], [1, 784, 1024],
  // K blocks (accumulating into C, the epilogue on the last): at, one above and two-and-a-bit;
  // row tiles crossing the 192-row task blocks, with a 1-row tail; 8 rows (the prefetching tile).
  [25, 1024, 33], [13, 1025, 31], [5, 2049, 40], [193, 1100, 17], [385, 40, 33], [8, 1500, 70],
];
// M x K x N, lda. AVX-512 packs A in runs of 4 k where rows are a multiple of 4 KiB apart and, on
// one thread here, a task has 2+ row tiles and 8+ panels: a 1-row tail tile (the packed
// matrix-vector row) with a last K block of 5; K = 3 (one zero-padded run); a 1-row tail with K = 5;
// a 2-row tail with tasks of 8 panels and a last of 5 (read in place in the same run).
const packedAShapes: [number, number, number, number][] = [
  [37, 1029, 1000, 2048], [100, 3, 1000, 1024], [13, 5, 1000, 1024], [26, 258, 900, 1024]];

/** The first k columns of each of a's rows, as a dense [m, k] array (the reference's input). */
function denseRows(a: Float32Array, m: number, k: number, lda: number): Float32Array {
  const dense = new Float32Array(m * k);
  for (let i = 0; i < m; i++) dense.set(a.subarray(i * lda, i * lda + k), i * k);
  return dense;
}

describe('kernels.gemm', () => {
  describe.each(runnable)('variant %s', (variant) => {
    it.each(shapes)('%i x %i x %i matches the reference', async (m, k, n) => {
      const a = randomTensor([m, k], m * 7 + k);
      const b = randomTensor([k, n], n * 13 + k);
      const c = await kernels.gemm(a, b, { variant });
      expect(c.dims).toEqual([m, n]);
      expectGemmClose(c.data, a.data, b.data, m, k, n);
    });

    it.each(packedAShapes)('%i x %i x %i, lda %i, on one thread (packed A) matches the reference', async (m, k, n, lda) => {
      const a = randomTensor([m, lda], m * 5 + k);
      const b = randomTensor([k, n], n * 11 + k);
      const bias = randomTensor([n], 14);
      const c = await kernels.gemm(a, b, { variant, threads: 1, k, bias, activation: 'relu' });
      expectGemmClose(c.data, denseRows(a.data, m, k, lda), b.data, m, k, n, bias.data, true);
    });

    it('gives identical results on 1 and 2 threads whether A is packed or read in place', async () => {
      // 37 x 1100 x 1000 with lda 2048: one thread packs A (tasks of 8 panels), two threads read it
      // in place (tasks of 4 panels), each over two K blocks.
      const [m, k, n, lda] = [37, 1100, 1000, 2048];
      const a = randomTensor([m, lda], 15);
      const b = randomTensor([k, n], 16);
      const one = await kernels.gemm(a, b, { variant, threads: 1, k });
      const two = await kernels.gemm(a, b, { variant, threads: 2, k });
      expect(Array.from(two.data)).toEqual(Array.from(one.data));
      expectGemmClose(one.data, denseRows(a.data, m, k, lda), b.data, m, k, n);
    });

    it('fuses bias and relu', async () => {
      const [m, k, n] = [29, 70, 45];
      const a = randomTensor([m, k], 3);
      const b = randomTensor([k, n], 4);
      const bias = randomTensor([n], 5);
      const c = await kernels.gemm(a, b, { variant, bias, activation: 'relu' });
      expectGemmClose(c.data, a.data, b.data, m, k, n, bias.data, true);
      expect(Math.min(...c.data)).toBe(0);
    });

    it('fuses bias and relu at M = 1 (and in the 1-row tail tile of M = 13)', async () => {
      for (const [m, k, n] of [[1, 70, 45], [13, 261, 45]] as const) {
        const a = randomTensor([m, k], 6);
        const b = randomTensor([k, n], 7);
        const bias = randomTensor([n], 8);
        const c = await kernels.gemm(a, b, { variant, bias, activation: 'relu' });
        expectGemmClose(c.data, a.data, b.data, m, k, n, bias.data, true);
      }
    });

    it('runs on one thread and on many', async () => {
      const a = randomTensor([40, 50], 9);
      const b = randomTensor([50, 70], 10);
      const one = await kernels.gemm(a, b, { variant, threads: 1 });
      const many = await kernels.gemm(a, b, { variant, threads: 8 });
      expect(Array.from(many.data)).toEqual(Array.from(one.data));
    });

    it('gives identical results on 1 and 2 threads across K blocks and row blocks', async () => {
      // 3 K blocks and 3 row blocks of tasks, so the task grid differs between the two runs while
      // each output's summation order must not.
      for (const [m, k, n] of [[400, 2100, 70], [1, 2100, 300], [8, 1030, 130]] as const) {
        const a = randomTensor([m, k], 11 + m);
        const b = randomTensor([k, n], 12 + n);
        const bias = randomTensor([n], 13);
        const one = await kernels.gemm(a, b, { variant, threads: 1, bias, activation: 'relu' });
        const two = await kernels.gemm(a, b, { variant, threads: 2, bias, activation: 'relu' });
        expect(Array.from(two.data)).toEqual(Array.from(one.data));
        if (variant !== 'reference') expectGemmClose(one.data, a.data, b.data, m, k, n, bias.data, true);
      }
    });
  });

  it('handles empty products: M = 0, N = 0, and K = 0 (C = act(bias))', async () => {
    expect((await kernels.gemm(randomTensor([0, 4]), randomTensor([4, 3]))).dims).toEqual([0, 3]);
    expect((await kernels.gemm(randomTensor([2, 4]), randomTensor([4, 0]))).dims).toEqual([2, 0]);
    const bias = new Tensor('float32', new Float32Array([1, -2, 3]), [3]);
    const c = await kernels.gemm(randomTensor([2, 0]), randomTensor([0, 3]), { bias, activation: 'relu' });
    expect(Array.from(c.data)).toEqual([1, 0, 3, 1, 0, 3]);
  });

  it('hand-checked 2x2', async () => {
    const a = new Tensor('float32', new Float32Array([1, 2, 3, 4]), [2, 2]);
    const b = new Tensor('float32', new Float32Array([5, 6, 7, 8]), [2, 2]);
    expect(Array.from((await kernels.gemm(a, b)).data)).toEqual([19, 22, 43, 50]);
  });

  it('leaves its inputs untouched', async () => {
    const a = randomTensor([9, 10], 1);
    const b = randomTensor([10, 11], 2);
    const a0 = a.data.slice();
    const b0 = b.data.slice();
    await kernels.gemm(a, b, { bias: randomTensor([11], 3), activation: 'relu' });
    expect(a.data).toEqual(a0);
    expect(b.data).toEqual(b0);
  });
});

describe('packed weights', () => {
  it('packs once and serves many runs, concurrently', async () => {
    const b = randomTensor([70, 90], 21);
    const w = kernels.packGemmWeights(b);
    expect(w.k).toBe(70);
    expect(w.n).toBe(90);
    expect(w.bytes).toBeGreaterThanOrEqual(70 * 90 * 4);
    expect(w.ukernel).toMatch(/^f32_gemm_\d+x\d+__/);
    const as = [1, 5, 33].map((m, i) => randomTensor([m, 70], 30 + i));
    const cs = await Promise.all(as.map((a) => kernels.gemm(a, w)));
    cs.forEach((c, i) => expectGemmClose(c.data, as[i]!.data, b.data, as[i]!.dims[0]!, 70, 90));
    w.dispose();
  });

  it.each(runnable.filter((v) => v !== 'reference'))('packs for variant %s', async (variant) => {
    const b = randomTensor([33, 65], 2);
    const a = randomTensor([17, 33], 1);
    const w = kernels.packGemmWeights(b, { variant: variant as never });
    expect(w.variant).toBe(variant === 'auto' ? simd : variant);
    expectGemmClose((await kernels.gemm(a, w)).data, a.data, b.data, 17, 33, 65);
    w.dispose();
  });

  it('dispose is idempotent, and use after dispose is DisposedError', async () => {
    const w = kernels.packGemmWeights(randomTensor([4, 4]));
    w.dispose();
    w.dispose();
    expect(w.disposed).toBe(true);
    await expect(kernels.gemm(randomTensor([2, 4]), w)).rejects.toThrow(DisposedError);
    await expect(kernels.gemm(randomTensor([2, 4]), w)).rejects.toThrow(/PackedGemmWeights has been disposed/);
  });

  it('await using disposes', async () => {
    let ref: kernels.PackedGemmWeights | undefined;
    {
      await using w = kernels.packGemmWeights(randomTensor([4, 4]));
      ref = w;
      expect(w.disposed).toBe(false);
    }
    expect(ref.disposed).toBe(true);
  });

  it('dispose during a run lets the run finish correctly', async () => {
    const b = randomTensor([300, 300], 5);
    const a = randomTensor([300, 300], 6);
    const w = kernels.packGemmWeights(b);
    const p = kernels.gemm(a, w, { threads: 1 });
    w.dispose();
    expectGemmClose((await p).data, a.data, b.data, 300, 300, 300);
  });

  it('reports its native memory to V8, and gives it back on dispose', async () => {
    // V8's counter includes ArrayBuffers, so make the inputs before reading it.
    const bs = Array.from({ length: 8 }, (_, i) => randomTensor([512, 512], i + 1));
    const before = reportedExternalMemory();
    const ws = bs.map((b) => kernels.packGemmWeights(b));
    const held = ws.reduce((s, w) => s + w.bytes, 0);
    expect(held).toBeGreaterThanOrEqual(8 * 512 * 512 * 4);
    expect(reportedExternalMemory() - before).toBe(held);
    for (const w of ws) w.dispose();
    expect(reportedExternalMemory()).toBe(before);
  });
});

describe('gemm bad inputs', () => {
  const a = randomTensor([3, 4]);
  const b = randomTensor([4, 5]);

  it('shape mismatch', async () => {
    await expect(kernels.gemm(a, randomTensor([5, 5]))).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.gemm(a, randomTensor([5, 5]))).rejects.toThrow(/shape mismatch: a is \[3, 4\] but b is \[5, 5\]/);
    const w = kernels.packGemmWeights(randomTensor([6, 5]));
    await expect(kernels.gemm(a, w)).rejects.toThrow(/shape mismatch/);
    w.dispose();
  });

  it('wrong dtype and rank', async () => {
    await expect(kernels.gemm(new Tensor('int32', new Int32Array(12), [3, 4]) as never, b)).rejects.toThrow(
      "gemm(a) must have dtype 'float32', got 'int32'");
    await expect(kernels.gemm(randomTensor([12]), b)).rejects.toThrow('gemm(a) must be 2-D [rows, cols], got dims [12]');
    await expect(kernels.gemm(a, randomTensor([2, 2, 5]))).rejects.toThrow(/gemm\(b\) must be 2-D/);
  });

  it('non-tensors', async () => {
    await expect(kernels.gemm(new Float32Array(12) as never, b)).rejects.toThrow('gemm(a) must be a Tensor, got Float32Array(12)');
    await expect(kernels.gemm(a, [1, 2] as never)).rejects.toThrow(/gemm\(b\) must be a Tensor, PackedGemmWeights or SparseWeights, got Array\(2\)/);
  });

  it('bad options, with a suggestion for misspellings', async () => {
    await expect(kernels.gemm(a, b, { activaton: 'relu' } as never)).rejects.toThrow("unknown option 'activaton'; did you mean 'activation'?");
    await expect(kernels.gemm(a, b, { activation: 'swish' as never })).rejects.toThrow(/options.activation must be one of 'none', 'relu'/);
    await expect(kernels.gemm(a, b, { threads: 0 })).rejects.toThrow(/options.threads must be an integer in \[1, 1024\], got 0/);
    await expect(kernels.gemm(a, b, { threads: 1.5 })).rejects.toThrow(InvalidArgumentError);
    await expect(kernels.gemm(a, b, { variant: 'avx1024' as never })).rejects.toThrow(/options.variant must be one of/);
    await expect(kernels.gemm(a, b, { bias: randomTensor([4]) })).rejects.toThrow('gemm: options.bias must have dims [5], got [4]');
    await expect(kernels.gemm(a, b, { signal: {} as never })).rejects.toThrow(/options.signal must be an AbortSignal/);
    await expect(kernels.gemm(a, b, 5 as never)).rejects.toThrow(/options must be an object/);
    expect(() => kernels.packGemmWeights(b, { variant: 'reference' as never })).toThrow(/options.variant must be one of/);
  });

  it.runIf(simd !== 'avx512')('a variant this CPU cannot run is DeviceUnavailableError', async () => {
    await expect(kernels.gemm(a, b, { variant: 'avx512' })).rejects.toThrow(DeviceUnavailableError);
  });

  it('native errors carry the caller\'s stack', async () => {
    const w = kernels.packGemmWeights(b);
    w.dispose();
    const err = await kernels.gemm(a, w).catch((e: Error) => e);
    expect(err.stack).toContain('gemm.test.ts');
  });
});

describe('cancellation', () => {
  it('an already aborted signal rejects with AbortError without running', async () => {
    const ac = new AbortController();
    ac.abort();
    const err = await kernels.gemm(randomTensor([3, 4]), randomTensor([4, 5]), { signal: ac.signal }).catch((e) => e);
    expect(err).toBeInstanceOf(AbortError);
    expect(err.name).toBe('AbortError');
  });

  it('aborting a long run stops it early with AbortError', async () => {
    const a = randomTensor([600, 600], 1);
    const b = randomTensor([600, 600], 2);
    const fullRun = async () => {
      const t0 = performance.now();
      await kernels.gemm(a, b, { variant: 'reference' });
      return performance.now() - t0;
    };
    const before = await fullRun();
    const ac = new AbortController();
    const t1 = performance.now();
    const p = kernels.gemm(a, b, { variant: 'reference', signal: ac.signal });
    setTimeout(() => ac.abort(), before / 20);
    await expect(p).rejects.toThrow(AbortError);
    const aborted = performance.now() - t1;
    // The slower of the full runs either side, so that a machine that got busier in between does
    // not make the aborted run look slow.
    const full = Math.max(before, await fullRun());
    expect(aborted).toBeLessThan(full * 0.8);
  });
});
