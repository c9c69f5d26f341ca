// The GPU transformer's fused row ops (kernels/llm/cuda/llm.cu) on their own, against references
// written here: the residual add + RMSNorm (register-cached and looping kernels) and SwiGLU over a
// joined gate/up product, each also writing its output quantised as quant_matmul's activations.
// The quantised bytes are checked exactly against the q8 rule applied here to the op's own fp32
// output (per block of 32: d = amax / 127, q = rint(v * (127 / amax)) in fp32; a block with a NaN
// or an infinity gets d = NaN and zeros, one below 2^-120 is zero).
import { expect, it } from 'vitest';
import { runGpuOp } from '../../dist/cuda/runtime.js';
import { randomF32 } from '../helpers.js';
import { checkQuantised } from './q8-rule.js';
import { describeGpu, gpuBuffers } from './targets.js';

const f32 = Math.fround;

describeGpu('GPU transformer row ops', (t) => {
  const { up, alloc } = gpuBuffers(t);

  it('llm_add_rms_norm: x += a, y = rmsnorm(x) * w, and y quantised, on every kernel', async () => {
    // Rows of the register-cached kernel (n % 4 == 0, up to 4 x 256 x 8 float4s per row: one,
    // two, four and eight per thread, a warp only partly in the row) and of the looping one (odd n,
    // longer rows); quantised where n % 32 == 0.
    for (const [rows, n] of [[1, 4096], [2, 96], [3, 8192], [1, 2048], [1, 8224], [2, 100], [2, 33], [1, 1024]] as const) {
      const count = rows * n;
      const x = randomF32(count, n).map((v) => v * 2), a = randomF32(count, n + 1), w = randomF32(n, n + 2);
      if (n === 4096) {  // a block with an infinity, one of zeros, one of tiny values
        x[40] = Infinity;
        for (let i = 64; i < 96; i++) x[i] = a[i] = 0;
        for (let i = 96; i < 128; i++) { x[i] = 1e-39; a[i] = 0; }
      }
      const quantize = n % 32 === 0;
      const [xb, ab, wb, yb, sb] = [await up(x), await up(a), await up(w), alloc(count * 4), alloc(count + Math.ceil(count / 32) * 4)];
      await runGpuOp(t.id, 'llm_add_rms_norm', [xb, ab, wb, yb, sb], { rows, n, eps: 1e-6, quantize: quantize ? 1 : 0 });
      const gx = await xb.read(new Float32Array(count)), gy = await yb.read(new Float32Array(count));
      for (let i = 0; i < count; i++) if (gx[i] !== f32(x[i]! + a[i]!)) expect(gx[i], `x[${i}] of ${rows}x${n}`).toBe(f32(x[i]! + a[i]!));
      for (let r = 0; r < rows; r++) {
        const row = gx.subarray(r * n, (r + 1) * n);
        const scale = 1 / Math.sqrt(row.reduce((s, v) => s + v * v, 0) / n + 1e-6);
        for (let i = 0; i < n; i++) {
          const want = row[i]! * scale * w[i]!, got = gy[r * n + i]!;
          if (!Number.isFinite(scale)) continue;  // the row with an infinity: no finite reference
          if (!(Math.abs(got - want) <= 2e-5 * Math.max(1, Math.abs(want)))) expect(got, `y[${r * n + i}] of ${rows}x${n}`).toBe(want);
        }
      }
      if (quantize) checkQuantised(gy, await sb.read(new Uint8Array(count + count / 32 * 4)), count, `${rows}x${n}`);
    }
  });

  it('llm_silu_mul reads gate and up rows ld apart (a joined gate/up product) and quantises', async () => {
    for (const [rows, n, ld] of [[3, 64, 128], [1, 96, 192], [2, 32, 32]] as const) {
      const joined = randomF32((rows - 1) * ld + 2 * n, rows + n).map((v) => v * 4);
      const count = rows * n;
      const [gb, yb, sb] = [await up(joined), alloc(count * 4), alloc(count + count / 32 * 4)];
      // up is the same buffer from element n on: an offset view is not an op argument, so the
      // test lays the joined rows out with up at column n of each row and passes a second copy
      // shifted by n.
      const upBuf = await up(joined.slice(n));
      await runGpuOp(t.id, 'llm_silu_mul', [gb, upBuf, yb, sb], { rows, n, ld, quantize: 1 });
      const gy = await yb.read(new Float32Array(count));
      for (let r = 0; r < rows; r++) {
        for (let i = 0; i < n; i++) {
          const g = joined[r * ld + i]!, u = joined[r * ld + n + i]!;
          const want = g / (1 + Math.exp(-g)) * u, got = gy[r * n + i]!;
          if (!(Math.abs(got - want) <= 1e-5 * Math.max(1, Math.abs(want)))) expect(got, `y[${r}][${i}] of ld ${ld}`).toBe(want);
        }
      }
      checkQuantised(gy, await sb.read(new Uint8Array(count + count / 32 * 4)), count, `silu ${rows}x${n}/${ld}`);
    }
  });

  it('llm_silu_mul rejects an ld below n and inputs too small for rows ld apart', async () => {
    const b = alloc(64 * 4);
    await expect(runGpuOp(t.id, 'llm_silu_mul', [b, b, b], { rows: 1, n: 32, ld: 16 })).rejects.toThrow(/ld/);
    await expect(runGpuOp(t.id, 'llm_silu_mul', [b, b, b], { rows: 2, n: 32, ld: 64 })).rejects.toThrow(/gate/);
  });
});
