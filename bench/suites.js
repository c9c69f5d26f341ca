import { Tensor, devices, getThreads, kernels } from '../dist/index.js';
import { native } from '../dist/binding.js';

const rand = (len) => {
  const a = new Float32Array(len);
  for (let i = 0; i < len; i++) a[i] = Math.random() * 2 - 1;
  return a;
};

/** Median of `reps` timed calls after a warm-up, in ms. */
async function timeIt(fn, { reps = 10, minMs = 200 } = {}) {
  await fn();
  const times = [];
  const start = performance.now();
  while (times.length < reps || performance.now() - start < minMs) {
    const t0 = performance.now();
    await fn();
    times.push(performance.now() - t0);
    if (times.length >= 200) break;
  }
  times.sort((x, y) => x - y);
  return times[Math.floor(times.length / 2)];
}

/** FP32 FMA peak (GFLOP/s) of the SIMD level in use, at 1 and N threads; cached per run. */
async function peak(ctx, threads) {
  const key = `peak${threads}`;
  if (!ctx.cache.has(key)) {
    const r = await native().peakFma(devices().cpu.simd, threads, ctx.quick ? 0.1 : 0.3);
    ctx.cache.set(key, r.flops / r.seconds / 1e9);
  }
  return ctx.cache.get(key);
}

async function* peakSuite(ctx) {
  const n = getThreads();
  const simds = ['scalar', 'avx2', 'avx512'].filter((s) => ['scalar', 'avx2', 'avx512'].indexOf(s) <= ['scalar', 'avx2', 'avx512'].indexOf(devices().cpu.simd));
  for (const simd of simds) {
    for (const t of [1, n]) {
      const r = await native().peakFma(simd, t, ctx.quick ? 0.1 : 0.3);
      yield { case: `fp32 fma ${simd} t${t}`, gflops: r.flops / r.seconds / 1e9, threads: t };
    }
  }
  for (const t of [1, n]) {
    const r = await native().readBandwidth(ctx.quick ? 128 << 20 : 512 << 20, t);
    yield { case: `memory read ${(r.bytes / 2 ** 20).toFixed(0)} MiB t${t}`, gbps: r.bytes / r.seconds / 1e9, threads: t };
  }
}

async function* gemmSuite(ctx) {
  const n = getThreads();
  const shapes = ctx.quick
    ? [[1, 1024, 1024], [128, 512, 512]]
    : [[1, 4096, 4096], [1, 1024, 1024], [16, 1024, 1024], [128, 768, 768], [512, 1024, 1024], [1024, 1024, 1024], [3136, 64, 64], [196, 2304, 256]];
  for (const [m, k, nn] of shapes) {
    const a = new Tensor('float32', rand(m * k), [m, k]);
    const b = new Tensor('float32', rand(k * nn), [k, nn]);
    const w = kernels.packGemmWeights(b);
    for (const t of [1, n]) {
      const ms = await timeIt(() => kernels.gemm(a, w, { threads: t }));
      const gflops = (2 * m * k * nn) / ms / 1e6;
      const pk = await peak(ctx, t);
      yield { case: `f32 ${m}x${k}x${nn} t${t}`, ms, gflops, pctPeak: (100 * gflops) / pk,
        gbps: ((m * k + k * nn + m * nn) * 4) / ms / 1e6, ukernel: w.ukernel };
    }
    w.dispose();
  }
}

export const suites = { peak: peakSuite, gemm: gemmSuite };
