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

/**
 * Low-precision weights against the fp32 kernel, pair by pair in the same run: square shapes report
 * GFLOP/s and the speed-up over fp32; M=1 decode shapes (N, K) report GB/s of packed weights read
 * (decode is bound by weight bandwidth, which bf16 halves and int8 quarters).
 */
async function* gemmLowpSuite(ctx) {
  const n = getThreads();
  const square = ctx.quick ? [512, 1024] : [1024, 2048];
  const decode = [[4096, 1024]];
  const shapes = [...square.map((s) => [s, s, s]), ...decode.map(([nn, k]) => [1, k, nn])];
  for (const [m, k, nn] of shapes) {
    const a = new Tensor('float32', rand(m * k), [m, k]);
    const b = new Tensor('float32', rand(k * nn), [k, nn]);
    const f32 = kernels.packGemmWeights(b);
    const reps = m === 1 ? { reps: 50, minMs: 200 } : { reps: ctx.quick ? 3 : 7, minMs: 200 };
    for (const t of [1, n]) {
      const msF32 = await timeIt(() => kernels.gemm(a, f32, { threads: t }), reps);
      for (const precision of ['fp32', 'bf16', 'int8', 'fp16']) {
        const w = precision === 'fp32' ? f32 : kernels.packGemmWeights(b, { precision });
        const ms = precision === 'fp32' ? msF32 : await timeIt(() => kernels.gemm(a, w, { threads: t }), reps);
        yield { case: `${precision} ${m}x${k}x${nn} t${t}`, ms, gflops: (2 * m * k * nn) / ms / 1e6,
          gbps: w.bytes / ms / 1e6, vs: 'fp32', ratio: msF32 / ms, ukernel: w.ukernel };
        if (w !== f32) w.dispose();
      }
    }
    f32.dispose();
  }
}

export const suites = { peak: peakSuite, gemm: gemmSuite, gemmLowp: gemmLowpSuite };
