// GPU norms, softmax and elementwise ops against independent references: double-precision loops
// written here, and the CPU kernels' float16/bfloat16 casts (themselves tested against scalar code).
import { expect, it } from 'vitest';
import { DeviceUnavailableError, DisposedError, InvalidArgumentError, OutOfMemoryError, Tensor, kernels } from '../../dist/index.js';
import { GpuBuffer, gpuDevice, runGpuOp } from '../../dist/cuda/runtime.js';
import {
  gpuBinary, gpuConvert, gpuLayerNorm, gpuRmsNorm, gpuSiluMul, gpuSoftmax, gpuUnary, type GpuUnaryOp,
} from '../../dist/cuda/kernels.js';
import { randomF32 } from '../helpers.js';
import { describeGpu, gpuBuffers } from './targets.js';

// Row lengths around the warp (32) and block (256) sizes, the register-cached kernels' limits
// (n % 4 == 0 up to 4 x 256 x 8 = 8192) and beyond them.
const SHAPES: [number, number][] = [[1, 1], [3, 31], [2, 32], [2, 33], [1, 255], [2, 256], [2, 257], [3, 1000],
  [1, 1028], [1, 4096], [1, 8192], [1, 8196]];

function expectClose(got: Float32Array, want: Float64Array | number[], rel: number, what: string): void {
  for (let i = 0; i < want.length; i++) {
    const w = want[i]!, g = got[i]!;
    if (!(Math.abs(g - w) <= rel * Math.max(1, Math.abs(w)))) expect(g, `${what}[${i}]`).toBe(w);
  }
}

describeGpu('GPU norms and elementwise', (t) => {
  const { up, alloc } = gpuBuffers(t);

  it('rms_norm, layer_norm and softmax per row', async () => {
    for (const [rows, n] of SHAPES) {
      const x = randomF32(rows * n, rows * 100 + n).map((v) => v * 3);
      const w = randomF32(n, 7), beta = randomF32(n, 8);
      const [xb, wb, bb, yb] = [await up(x), await up(w), await up(beta), alloc(rows * n * 4)];
      const rms = new Float64Array(rows * n), ln = new Float64Array(rows * n), sm = new Float64Array(rows * n);
      for (let r = 0; r < rows; r++) {
        const row = Array.from(x.subarray(r * n, (r + 1) * n));
        const ms = row.reduce((s, v) => s + v * v, 0) / n;
        const mean = row.reduce((s, v) => s + v, 0) / n;
        const vr = row.reduce((s, v) => s + (v - mean) ** 2, 0) / n;
        const mx = Math.max(...row);
        const se = row.reduce((s, v) => s + Math.exp(v - mx), 0);
        for (let i = 0; i < n; i++) {
          rms[r * n + i] = row[i]! / Math.sqrt(ms + 1e-6) * w[i]!;
          ln[r * n + i] = (row[i]! - mean) / Math.sqrt(vr + 1e-5) * w[i]! + beta[i]!;
          sm[r * n + i] = Math.exp(row[i]! - mx) / se;
        }
      }
      await gpuRmsNorm(t.id, xb, wb, yb, rows, n);
      expectClose(await yb.read(new Float32Array(rows * n)), rms, 2e-5, `rms ${rows}x${n}`);
      await gpuLayerNorm(t.id, xb, wb, bb, yb, rows, n);
      expectClose(await yb.read(new Float32Array(rows * n)), ln, 2e-5, `layer ${rows}x${n}`);
      await gpuSoftmax(t.id, xb, yb, rows, n);
      expectClose(await yb.read(new Float32Array(rows * n)), sm, 2e-6, `softmax ${rows}x${n}`);
      if (n % 4 === 0) {  // the looping kernels on rows the cached ones would take
        await runGpuOp(t.id, 'rms_norm', [xb, wb, yb], { rows, n, eps: 1e-6, looping: true });
        expectClose(await yb.read(new Float32Array(rows * n)), rms, 2e-5, `rms looping ${rows}x${n}`);
        await runGpuOp(t.id, 'softmax', [xb, yb], { rows, n, looping: true });
        expectClose(await yb.read(new Float32Array(rows * n)), sm, 2e-6, `softmax looping ${rows}x${n}`);
      }
    }
  });

  it('unary activations, binary ops with a row broadcast, silu * up', async () => {
    const count = 1000;
    const x = randomF32(count, 3).map((v) => v * 6), b = randomF32(count, 4);
    const [xb, bb, yb] = [await up(x), await up(b), alloc(count * 4)];
    const erf = (z: number) => {  // Abramowitz-Stegun 7.1.26 is too coarse; use the series/continued fraction
      let sum = 0, term = z, n = 0;
      if (Math.abs(z) > 4) return Math.sign(z);
      while (Math.abs(term) > 1e-17) { sum += term / (2 * n + 1); n++; term *= -z * z / n; }
      return (2 / Math.sqrt(Math.PI)) * sum;
    };
    const refs: Record<GpuUnaryOp, (v: number) => number> = {
      relu: (v) => Math.max(v, 0), sigmoid: (v) => 1 / (1 + Math.exp(-v)), tanh: Math.tanh, exp: Math.exp,
      silu: (v) => v / (1 + Math.exp(-v)), gelu: (v) => 0.5 * v * (1 + erf(v / Math.SQRT2)),
      geluTanh: (v) => 0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v ** 3))),
    };
    for (const [op, f] of Object.entries(refs) as [GpuUnaryOp, (v: number) => number][]) {
      await gpuUnary(t.id, op, xb, yb, count);
      expectClose(await yb.read(new Float32Array(count)), Array.from(x, f), 1e-5, op);
    }
    for (const [op, f] of [['add', (u: number, v: number) => u + v], ['sub', (u: number, v: number) => u - v],
      ['mul', (u: number, v: number) => u * v], ['div', (u: number, v: number) => u / v]] as const) {
      for (const bCount of [count, 40, 1]) {
        await gpuBinary(t.id, op, xb, bb, yb, count, bCount);
        expectClose(await yb.read(new Float32Array(count)), Array.from(x, (v, i) => f(v, b[i % bCount]!)), 1e-6, `${op}/${bCount}`);
      }
    }
    await gpuSiluMul(t.id, xb, bb, yb, count);
    expectClose(await yb.read(new Float32Array(count)), Array.from(x, (v, i) => v / (1 + Math.exp(-v)) * b[i]!), 1e-5, 'silu_mul');
  });

  it('float32 <-> float16 / bfloat16 round to nearest even, as the CPU casts do', async () => {
    // Ties, subnormals, overflow to infinity, NaN and signed zero among random values.
    const special = [0, -0, 1, -1, 65504, 65520, 1e6, -1e6, 2 ** -24, 2 ** -25, 3 * 2 ** -25, 6e-8, 1 + 2 ** -11,
      1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, NaN, Infinity, -Infinity];
    const x = new Float32Array([...special, ...randomF32(500, 9).map((v) => v * 1000)]);
    const count = x.length;
    const [xb, hb, yb] = [await up(x), alloc(count * 2), alloc(count * 4)];
    for (const type of ['float16', 'bfloat16'] as const) {
      const cpu = await kernels.cast(new Tensor('float32', x, [count]), type);
      const want = cpu.data as Uint16Array;
      await gpuConvert(t.id, type === 'float16' ? 'f32-f16' : 'f32-bf16', xb, hb, count);
      const got = await hb.read(new Uint16Array(count));
      for (let i = 0; i < count; i++) {
        const isNan = Number.isNaN(x[i]!);
        if (isNan) expect(type === 'float16' ? (got[i]! & 0x7c00) === 0x7c00 && (got[i]! & 0x3ff) !== 0 : (got[i]! & 0x7f80) === 0x7f80 && (got[i]! & 0x7f) !== 0, `${type} NaN`).toBe(true);
        else expect(got[i], `${type} of ${x[i]}`).toBe(want[i]);
      }
      await gpuConvert(t.id, type === 'float16' ? 'f16-f32' : 'bf16-f32', hb, yb, count);
      const back = await yb.read(new Float32Array(count));
      const cpuBack = (await kernels.cast(new Tensor(type, want, [count]), 'float32')).data as Float32Array;
      for (let i = 0; i < count; i++) if (!Number.isNaN(x[i]!)) expect(back[i], `${type} -> f32 of ${x[i]}`).toBe(cpuBack[i]);
    }
  });

  it('rejects bad input with typed errors naming the parameter', async () => {
    const small = alloc(16);
    await expect(gpuRmsNorm(t.id, small, small, small, 2, 4)).rejects.toThrow(InvalidArgumentError);
    await expect(gpuRmsNorm(t.id, small, small, small, 2, 4)).rejects.toThrow(/gpuRmsNorm: x holds 16 bytes, needs 32/);
    await expect(gpuRmsNorm(t.id, small, small, small, -1, 4)).rejects.toThrow(/gpuRmsNorm: rows/);
    await expect(gpuRmsNorm(t.id, small, small, small, 1, 0)).rejects.toThrow(/gpuRmsNorm: n/);
    await expect(gpuBinary(t.id, 'add', small, small, small, 4, 3)).rejects.toThrow(/multiple of bCount/);
    await expect(gpuUnary(t.id, 'nope' as GpuUnaryOp, small, small, 4)).rejects.toThrow(/op must be one of/);
    await expect(gpuConvert(t.id, 'f32-f16', small, small, 4)).rejects.toThrow(/gpuConvert: y and x are the same buffer; y is written and needs its own/);
    // The native op checks again when called directly with inconsistent sizes.
    await expect(runGpuOp(t.id, 'rms_norm', [small, small, small], { rows: 2, n: 4 })).rejects.toThrow(/rms_norm: x \(buffer 0\) holds 16 bytes/);
    await expect(runGpuOp(t.id, 'rms_norm', [small, small, small], { rows: 1.5, n: 4 })).rejects.toThrow(/'rows' must be an integer/);
    await expect(runGpuOp(t.id, 'no_such_op', [], {})).rejects.toThrow(/no GPU op named 'no_such_op'/);
    const gone = alloc(16);
    gone.dispose();
    await expect(gpuSoftmax(t.id, gone, small, 1, 4)).rejects.toThrow(DisposedError);
    await expect(gone.read(new Float32Array(4))).rejects.toThrow(DisposedError);
    await expect(small.write(new Float32Array(5))).rejects.toThrow(/20 bytes at offset 0 do not fit the buffer of 16 bytes/);
    // Writes and reads at an offset land where asked and leave the rest alone.
    await small.write(new Float32Array([1, 2, 3, 4]));
    await small.write(new Float32Array([9]), 8);
    expect(Array.from(await small.read(new Float32Array(4)))).toEqual([1, 2, 9, 4]);
  });

  if (t.emulated) {
    it('out of device memory is an OutOfMemoryError naming the request; the pool is reused', async () => {
      const info = gpuDevice(t.id);
      expect(() => GpuBuffer.alloc(t.id, info.totalMemory + 1, 'the test tensor')).toThrow(OutOfMemoryError);
      expect(() => GpuBuffer.alloc(t.id, info.totalMemory + 1, 'the test tensor')).toThrow(/emulated device: out of memory allocating 4\.00 GiB for the test tensor/);
      const before = gpuDevice(t.id).inUse;
      const b = GpuBuffer.alloc(t.id, 3 << 20);
      expect(gpuDevice(t.id).inUse).toBe(before + (4 << 20));  // 2 MiB rounding above 1 MiB
      b.dispose();
      expect(gpuDevice(t.id).inUse).toBe(before);
      expect(gpuDevice(t.id).cached).toBeGreaterThanOrEqual(4 << 20);
    });
  }
});

it("'cuda:N' beyond the devices present is a DeviceUnavailableError with the reason", () => {
  expect(() => GpuBuffer.alloc('cuda:7', 16)).toThrow(DeviceUnavailableError);
  expect(() => gpuDevice('cuda:7')).toThrow(/cuda:7 is unavailable/);
  expect(() => GpuBuffer.alloc('gpu' as 'emulated', 16)).toThrow(InvalidArgumentError);
});
