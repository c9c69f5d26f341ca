// GEMM on the GPU: TFLOP/s at 4096^3 per type against the datasheet peak (int8 against twice the
// bf16 peak, as the tensor cores run s8 at double rate) and against the measured mma.sync bf16
// ceiling, for Hopper's wgmma kernel and the mma.sync kernel side by side (and on LLM prefill shapes); decode GEMVs (m = 1) in GB/s of weights streamed against the measured read bandwidth.
import { GpuBuffer } from '../../dist/cuda/runtime.js';
import { gpuGemm, gpuGemmInt8, gpuPackGemmInt8 } from '../../dist/cuda/gemm.js';
import { randomBuffer } from './common.js';

// Random 16-bit values of magnitude [0.25, 1): f16 exponents 13..14, bf16 exponents 125..126.
function random16(count, type) {
  const out = new Uint16Array(count);
  for (let i = 0; i < count; i++) {
    const sign = Math.random() < 0.5 ? 0x8000 : 0;
    out[i] = type === 'f16'
      ? sign | ((13 + (Math.random() * 2 | 0)) << 10) | (Math.random() * 1024 | 0)
      : sign | ((125 + (Math.random() * 2 | 0)) << 7) | (Math.random() * 128 | 0);
  }
  return out;
}

async function time(run, reps) {
  await run(0);  // warm-up (and the first run's one-time costs)
  return run(reps);
}

export async function* gemmCases(env) {
  const { id, info, emulated, sheet, measured, quick } = env;
  // Hopper's wgmma kernel runs on cc 9.0 (and on the emulator); both tensor-core paths are timed
  // in the same run so their ratio is a fair one, mma first so that a failing wgmma launch (which
  // leaves the CUDA context unusable) cannot take the baseline with it.
  const hopper = emulated || Number(info.computeCapability) === 9;
  const size = emulated ? 64 : 4096;
  const reps = emulated ? 1 : 20;
  const flops = 2 * size ** 3;
  const tflops = (ms) => flops / ms / 1e9;
  const report = (name, ms, peak) => {
    const t = tflops(ms);
    return {
      case: `${name} ${size}x${size}x${size}`, ms, tflops: t, peakTflops: peak,
      pct: peak ? 100 * t / peak : undefined, pctOfMma: measured.mma ? 100 * t / measured.mma : undefined,
    };
  };
  const c = GpuBuffer.alloc(id, size * size * 4, 'gemm bench C');
  const a32 = await randomBuffer(id, size * size), b32 = await randomBuffer(id, size * size);
  let ms = await time((r) => gpuGemm(id, a32, b32, c, size, size, size, { reps: r }), reps);
  yield report('f32 simt', ms, sheet?.fp32);
  for (const type of ['f16', 'bf16']) {
    const a16 = await GpuBuffer.from(id, random16(size * size, type)), b16 = await GpuBuffer.from(id, random16(size * size, type));
    for (const kernel of hopper ? ['mma', 'wgmma'] : ['mma']) {
      ms = await time((r) => gpuGemm(id, a16, b16, c, size, size, size, { aType: type, bType: type, kernel, reps: r }), reps);
      yield report(`${type} ${kernel}`, ms, sheet?.bf16);
    }
    if (type === 'bf16') {
      ms = await time((r) => gpuGemm(id, a32, b16, c, size, size, size, { bType: type, reps: r }), reps);
      yield report('bf16 mma, f32 A', ms, sheet?.bf16);
    }
    a16.dispose();
    b16.dispose();
  }
  // LLM prefill shapes (bf16, 2048 tokens): attention projections, MLP up and down (llama 8B sizes).
  if (!emulated && !quick) {
    // Then wgmma alone over K at 4096x4096 (4 block tiles per SM): time = tiles x (fixed cost + K / 64 x
    // stage time) tells a per-tile cost (epilogue, pipeline refill) from a slow main loop, and 8192^2 x 4096
    // (16 tiles per SM, C larger than L2) shows what the tile order and the C stores cost.
    const sweep = hopper ? [[4096, 4096, 1024], [4096, 4096, 2048], [4096, 4096, 8192], [4096, 4096, 16384], [8192, 8192, 4096]] : [];
    for (const [m, n, k] of [[2048, 4096, 4096], [2048, 14336, 4096], [2048, 4096, 14336], [512, 4096, 4096], ...sweep]) {
      const swept = sweep.some(([sm, sn, sk]) => sm === m && sn === n && sk === k);
      const a16 = await GpuBuffer.from(id, random16(m * k, 'bf16')), b16 = await GpuBuffer.from(id, random16(k * n, 'bf16'));
      const out = GpuBuffer.alloc(id, m * n * 4, 'gemm bench C');
      for (const kernel of swept ? ['wgmma'] : hopper ? ['mma', 'wgmma'] : ['mma']) {
        ms = await time((r) => gpuGemm(id, a16, b16, out, m, n, k, { aType: 'bf16', bType: 'bf16', kernel, reps: r }), reps);
        const t = 2 * m * n * k / ms / 1e9;
        yield {
          case: `bf16 ${kernel} ${m}x${n}x${k}`, ms, tflops: t, peakTflops: sheet?.bf16,
          pct: sheet ? 100 * t / sheet.bf16 : undefined, pctOfMma: measured.mma ? 100 * t / measured.mma : undefined,
        };
      }
      for (const x of [a16, b16, out]) x.dispose();
    }
  }
  const w8 = await gpuPackGemmInt8(id, b32, size, size);
  ms = await time((r) => gpuGemmInt8(id, a32, w8, c, size, { reps: r }), reps);
  yield { ...report('int8 mma (with A quantisation)', ms, sheet ? 2 * sheet.bf16 : undefined), pctOfMma: undefined };
  w8.dispose();
  a32.dispose();
  b32.dispose();
  c.dispose();

  // Decode: one row of A against the weights; bytes = the weights (A and C are noise).
  const k = emulated ? 256 : 4096;
  for (const n of emulated ? [256] : [4096, 14336]) {
    const x = await randomBuffer(id, k), y = GpuBuffer.alloc(id, n * 4);
    const gemvReps = emulated ? 1 : 200;
    const gb = (bytes, ms) => bytes / ms / 1e6;
    const line = (name, bytes, ms) => ({
      case: `${name} gemv 1x${k}x${n}`, ms, gbps: gb(bytes, ms), peakGbps: sheet?.gbps,
      pct: sheet ? 100 * gb(bytes, ms) / sheet.gbps : undefined, pctOfRead: 100 * gb(bytes, ms) / measured.gbps,
    });
    for (const type of ['bf16', 'f16']) {
      const w = await GpuBuffer.from(id, random16(k * n, type));
      ms = await time((r) => gpuGemm(id, x, w, y, 1, n, k, { bType: type, reps: r }), gemvReps);
      yield line(type, k * n * 2, ms);
      w.dispose();
    }
    const w32 = await randomBuffer(id, k * n);
    ms = await time((r) => gpuGemm(id, x, w32, y, 1, n, k, { reps: r }), gemvReps);
    yield line('f32', k * n * 4, ms);
    const q = await gpuPackGemmInt8(id, w32, k, n);
    ms = await time((r) => gpuGemmInt8(id, x, q, y, 1, { reps: r }), gemvReps);
    yield line('int8', k * n + n * 8, ms);
    q.dispose();
    w32.dispose();
    x.dispose();
    y.dispose();
  }
}
