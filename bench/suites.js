import { availableParallelism } from 'node:os';
import * as sonde from '../dist/index.js';
import { Tensor, devices, getThreads, kernels } from '../dist/index.js';
import { native } from '../dist/binding.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { GraphBuilder } from './graphs/builder.js';
import { BF16_RESNET50_BOUND, BF16_TRANSFORMER_BOUND, modelBytes, modelInput, relativeDifference, roundingTolerance } from './graphs/models.js';
import { llmSuite, servingSuite } from './llm/suites.js';
import { cudaSuite } from './cuda/suite.js';

const rand = (len) => {
  const a = new Float32Array(len);
  for (let i = 0; i < len; i++) a[i] = Math.random() * 2 - 1;
  return a;
};

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

/** Memory read bandwidth (GB/s) at `threads`, measured like the `peak` suite; cached per run. */
export async function readBandwidth(ctx, threads) {
  const key = `bw${threads}`;
  if (!ctx.cache.has(key)) {
    const r = await native().readBandwidth(ctx.quick ? 128 << 20 : 512 << 20, threads);
    ctx.cache.set(key, r.bytes / r.seconds / 1e9);
  }
  return ctx.cache.get(key);
}

/**
 * Medians (ms) of the functions in `fns`, timed in interleaved rounds after one warm-up call each:
 * a sonde call, then the anchor's, then sonde again, ... so that both sides see the same machine
 * state on this shared, noisy host. What ran just before a call matters (the other runtime's run
 * evicts this one's weights from L2 and lets its threads fall asleep), so each function must follow
 * each of the others (and itself) about equally often: two functions flip order every round
 * (A B, B A: each follows both equally); three or more run in a fresh seeded shuffle each round.
 * Flipping the whole order instead biases them: with [plain, fused, ortPlain, ortFused], sonde's
 * fused call followed ORT's in every other round and its plain call never did, which read as a
 * fused epilogue 12-13% slower than the plain GEMM (512x64x512, two threads) where shuffled rounds
 * measure 0.998-1.005. Stops after `minRounds` rounds once `minMs` has passed, or at `maxMs` (but
 * never before 3 rounds).
 */
async function timeInterleaved(fns, { minRounds = 5, maxRounds = 200, minMs = 300, maxMs = 3000 } = {}) {
  // Three untimed rounds: a fresh session's first runs fault in its arena and each pool thread's
  // scratch (ResNet-50 bf16, 1 thread: 91, 37, then 23-24 ms), and the slow suites time few rounds.
  for (let w = 0; w < 3; w++) for (const f of fns) await f();
  const times = fns.map(() => []);
  const forward = fns.map((_, i) => i);
  const backward = [...forward].reverse();
  let seed = 0x9e3779b9;
  const shuffled = () => {
    const order = [...forward];
    for (let i = order.length - 1; i > 0; i--) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      const j = Math.floor((seed / 2 ** 32) * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    return order;
  };
  const start = performance.now();
  for (let r = 0; r < maxRounds; r++) {
    const elapsed = performance.now() - start;
    if ((r >= minRounds && elapsed >= minMs) || (r >= 3 && elapsed >= maxMs)) break;
    for (const i of fns.length > 2 ? shuffled() : r % 2 ? backward : forward) {
      const t0 = performance.now();
      await fns[i]();
      times[i].push(performance.now() - t0);
    }
  }
  return times.map((t) => t.sort((x, y) => x - y)[Math.floor(t.length / 2)]);
}

/**
 * Checks that sonde and the anchor computed the same thing, so a ratio never compares different
 * work. On up to 256 sampled elements the two f32 results (different summation orders) may each be
 * off the exact value by (k + 2)·u·Σ|a·b| (+ |bias|), hence twice that between them.
 */
function checkAgainstAnchor(what, got, want, a, b, m, k, n, bias) {
  const u = 2 ** -24;
  const samples = Math.min(256, m * n);
  for (let s = 0; s < samples; s++) {
    const idx = samples === m * n ? s : Math.floor(Math.random() * m * n);
    const i = Math.floor(idx / n);
    const j = idx % n;
    let mag = bias ? Math.abs(bias[j]) : 0;
    for (let p = 0; p < k; p++) mag += Math.abs(a[i * k + p] * b[p * n + j]);
    const err = Math.abs(got[idx] - want[idx]);
    if (!(err <= 2 * (k + 2) * u * mag + 1e-30)) {
      throw new Error(`${what}: sonde C[${i}, ${j}] = ${got[idx]} but onnxruntime-node = ${want[idx]}`);
    }
  }
}

/**
 * One GEMM shape, sonde against onnxruntime-node with the same weights, threads and epilogue.
 * Both sides pack B once (packGemmWeights / ORT's prepacking of initializers); a run takes A and
 * allocates C, on each side. With `copies` > 1 each side holds that many weight matrices and each
 * call uses the next one, so weights come from memory rather than from the last call's cache, as
 * in a network whose layers together are far larger than the cache.
 */
async function gemmPair(ctx, m, k, n, threads, { bias = false, relu = false, a = rand(m * k), weights, copies = 1 } = {}) {
  const sides = [];
  for (let c = 0; c < copies; c++) {
    // ORT's pool threads spin after each run by default; measured here, one keeps most of a core
    // busy for tens of ms, which is the core sonde's next interleaved run needs. Off unless --ort-spin.
    const ort = await onnxruntime.prepare(m, k, n, { threads, bias, relu, weights: c === 0 ? weights : undefined, spin: ctx.ortSpin });
    const w = kernels.packGemmWeights(new Tensor('float32', ort.weights.b, [k, n]));
    const opts = { threads, ...(bias ? { bias: new Tensor('float32', ort.weights.bias, [n]) } : {}), ...(relu ? { activation: 'relu' } : {}) };
    sides.push({ ort, w, opts });
  }
  const A = new Tensor('float32', a, [m, k]);
  const { ort, w, opts } = sides[0];
  checkAgainstAnchor(`${m}x${k}x${n}`, (await kernels.gemm(A, w, opts)).data, await ort.run(a), a, ort.weights.b, m, k, n, ort.weights.bias);
  let si = 0;
  let oi = 0;
  return {
    sonde: () => {
      const s = sides[si++ % copies];
      return kernels.gemm(A, s.w, s.opts);
    },
    anchor: () => sides[oi++ % copies].ort.run(a),
    a, weights: ort.weights,
    async release() {
      for (const s of sides) {
        s.w.dispose();
        await s.ort.release();
      }
    },
  };
}

/** How many copies of a `bytes` weight matrix together overflow the last-level cache (4x, >= 64 MiB). */
function copiesBeyondCache(bytes) {
  const llc = devices().cpu.caches?.l3 || 32 << 20;
  return Math.max(1, Math.ceil(Math.max(4 * llc, 64 << 20) / bytes));
}

/**
 * sonde's f32 GEMM against onnxruntime-node (MLAS), measured pair by pair in this process. Cases are
 * named by M x K x N (A is [M, K], the weights B are [K, N]). ratio = onnxruntime ms / sonde ms:
 * above 1, sonde is faster.
 */
async function* gemmSuite(ctx) {
  const pool = getThreads();
  const threadCounts = [...new Set([1, Math.min(2, pool)])];
  const timing = ctx.quick ? { minRounds: 3, minMs: 100, maxMs: 1000 } : { minRounds: 5, minMs: 1000, maxMs: 5000 };
  const gflops = (m, k, n, ms) => (2 * m * k * n) / ms / 1e6;

  // Square problems: the compute-bound end, at 1 and 2 threads. Besides the interleaved pair (the
  // ratio), each side alone call after call (steadyPct, ortSteadyPct: % of the peak), as the peak
  // suite measures the FMA peak and as BLAS results are usually quoted. Interleaved, each sonde call
  // follows ORT's, which runs on the JS thread while sonde's worker idles on the other core, and
  // on this VM an idle core's first milliseconds run slow (bench/idle-gap.js: 256^3 on one thread
  // 0.21 ms back to back, 0.44 ms after a 14 ms idle gap; 1024^3 about 6% slower).
  const squares = ctx.quick ? [256] : [256, 512, 1024, 2048];
  for (const s of squares) {
    for (const t of threadCounts) {
      const p = await gemmPair(ctx, s, s, s, t);
      const [ms, ortMs] = await timeInterleaved([p.sonde, p.anchor], timing);
      const [steadyMs] = await timeInterleaved([p.sonde], timing);
      const [ortSteadyMs] = await timeInterleaved([p.anchor], timing);
      await p.release();
      const g = gflops(s, s, s, ms);
      const pk = await peak(ctx, t);
      yield { case: `f32 ${s}x${s}x${s} t${t}`, ms, gflops: g, pctPeak: (100 * g) / pk,
        steadyPct: (100 * gflops(s, s, s, steadyMs)) / pk, ortSteadyPct: (100 * gflops(s, s, s, ortSteadyMs)) / pk,
        ortMs, ortGflops: gflops(s, s, s, ortMs), ratio: ortMs / ms, vs: 'onnxruntime-node' };
    }
  }

  // Layer shapes of real models (M = batch or tokens) on the whole pool. At M = 1 the product is a
  // matrix-vector product bound by streaming the K*N weights, so also report GB/s of weights read
  // and % of the measured (DRAM) read bandwidth. A single 8-16 MiB matrix would stay in cache from
  // one call to the next (over 100% of DRAM bandwidth was seen), so calls cycle through copies.
  const layers = ctx.quick ? [[1, 1024, 4096]] : [1, 8, 64].flatMap((m) => [[4096, 1024], [1024, 4096], [1000, 2048]].map(([n, k]) => [m, k, n]));
  const t = pool;
  for (const [m, k, n] of layers) {
    const p = await gemmPair(ctx, m, k, n, t, { copies: copiesBeyondCache(k * n * 4) });
    const [ms, ortMs] = await timeInterleaved([p.sonde, p.anchor], timing);
    await p.release();
    const g = gflops(m, k, n, ms);
    const row = { case: `f32 ${m}x${k}x${n} t${t}`, ms, gflops: g, pctPeak: (100 * g) / (await peak(ctx, t)) };
    if (m === 1) {
      row.gbps = (k * n * 4) / ms / 1e6;
      row.pctBw = (100 * row.gbps) / (await readBandwidth(ctx, t));
    }
    yield { ...row, ortMs, ortGflops: gflops(m, k, n, ortMs), ratio: ortMs / ms, vs: 'onnxruntime-node' };
  }

  // The fused epilogue: GEMM + bias + ReLU against the plain GEMM of the same shape, on both sides
  // (ORT fuses Gemm + Relu into FusedGemm). fusedOverPlain near 1 means the epilogue is free.
  const fused = ctx.quick ? [[64, 256, 256]] : [[64, 1024, 4096], [512, 64, 512]];
  for (const [m, k, n] of fused) {
    const plain = await gemmPair(ctx, m, k, n, t);
    // Same A and B on both, so the only difference is the epilogue.
    const fusedP = await gemmPair(ctx, m, k, n, t, { bias: true, relu: true, a: plain.a, weights: plain.weights });
    const [plainMs, ms, ortPlainMs, ortMs] = await timeInterleaved([plain.sonde, fusedP.sonde, plain.anchor, fusedP.anchor], timing);
    await plain.release();
    await fusedP.release();
    yield { case: `f32 ${m}x${k}x${n} +bias+relu t${t}`, ms, gflops: gflops(m, k, n, ms), plainMs,
      fusedOverPlain: ms / plainMs, ortMs, ortFusedOverPlain: ortMs / ortPlainMs, ratio: ortMs / ms, vs: 'onnxruntime-node' };
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
  // Each precision on the kernel 'auto' picks; where that is the AMX tile kernel, the AVX-512 kernel
  // of the same weights too, so the tiles' gain is measured in the same run.
  const features = devices().cpu.features;
  const variants = [['fp32'], ['bf16'], ['int8'], ['fp16'],
    ...(features.includes('amx_bf16') ? [['bf16', 'avx512bf16']] : []),
    ...(features.includes('amx_int8') ? [['int8', 'avx512vnni']] : [])];
  for (const [m, k, nn] of shapes) {
    const a = new Tensor('float32', rand(m * k), [m, k]);
    const b = new Tensor('float32', rand(k * nn), [k, nn]);
    const ws = variants.map(([precision, variant]) => kernels.packGemmWeights(b, { precision, variant }));
    for (const t of [1, n]) {
      // All precisions interleaved call by call, so each ratio to fp32 is measured under the same
      // machine conditions.
      const times = await timeInterleaved(ws.map((w) => () => kernels.gemm(a, w, { threads: t })),
        { minMs: ctx.quick ? 200 : 600, maxMs: ctx.quick ? 1500 : 5000 });
      for (let i = 0; i < ws.length; i++) {
        const w = ws[i];
        const ms = times[i];
        const label = variants[i][1] ? `${variants[i][0]} ${variants[i][1]}` : variants[i][0];
        yield { case: `${label} ${m}x${k}x${nn} t${t}`, ms, gflops: (2 * m * k * nn) / ms / 1e6,
          gbps: w.bytes / ms / 1e6, vs: 'fp32', ratio: times[0] / ms, ukernel: w.ukernel };
      }
    }
    for (const w of ws) w.dispose();
  }
}


// Distinct convolutions of ResNet-50 (v1.5: stride on the 3x3) and MobileNetV2 at 224x224, as
// [name, C_in, H (= W), C_out, k, stride, group]; pads are k/2 (SAME for odd kernels).
const RESNET50 = [
  ['r50 conv1 7x7/2', 3, 224, 64, 7, 2, 1],
  ['r50 56 1x1 64-64', 64, 56, 64, 1, 1, 1],
  ['r50 56 3x3 64', 64, 56, 64, 3, 1, 1],
  ['r50 56 1x1 64-256', 64, 56, 256, 1, 1, 1],
  ['r50 56 1x1 256-64', 256, 56, 64, 1, 1, 1],
  ['r50 56 1x1 256-128', 256, 56, 128, 1, 1, 1],
  ['r50 56 3x3/2 128', 128, 56, 128, 3, 2, 1],
  ['r50 56 1x1/2 256-512', 256, 56, 512, 1, 2, 1],
  ['r50 28 3x3 128', 128, 28, 128, 3, 1, 1],
  ['r50 28 1x1 128-512', 128, 28, 512, 1, 1, 1],
  ['r50 28 1x1 512-128', 512, 28, 128, 1, 1, 1],
  ['r50 28 1x1 512-256', 512, 28, 256, 1, 1, 1],
  ['r50 28 3x3/2 256', 256, 28, 256, 3, 2, 1],
  ['r50 28 1x1/2 512-1024', 512, 28, 1024, 1, 2, 1],
  ['r50 14 3x3 256', 256, 14, 256, 3, 1, 1],
  ['r50 14 1x1 256-1024', 256, 14, 1024, 1, 1, 1],
  ['r50 14 1x1 1024-256', 1024, 14, 256, 1, 1, 1],
  ['r50 14 1x1 1024-512', 1024, 14, 512, 1, 1, 1],
  ['r50 14 3x3/2 512', 512, 14, 512, 3, 2, 1],
  ['r50 14 1x1/2 1024-2048', 1024, 14, 2048, 1, 2, 1],
  ['r50 7 3x3 512', 512, 7, 512, 3, 1, 1],
  ['r50 7 1x1 512-2048', 512, 7, 2048, 1, 1, 1],
  ['r50 7 1x1 2048-512', 2048, 7, 512, 1, 1, 1],
];
const MOBILENETV2 = [
  ['mv2 conv 3x3/2 3-32', 3, 224, 32, 3, 2, 1],
  ['mv2 112 dw 32', 32, 112, 32, 3, 1, 32],
  ['mv2 112 1x1 32-16', 32, 112, 16, 1, 1, 1],
  ['mv2 112 1x1 16-96', 16, 112, 96, 1, 1, 1],
  ['mv2 112 dw/2 96', 96, 112, 96, 3, 2, 96],
  ['mv2 56 1x1 96-24', 96, 56, 24, 1, 1, 1],
  ['mv2 56 1x1 24-144', 24, 56, 144, 1, 1, 1],
  ['mv2 56 dw 144', 144, 56, 144, 3, 1, 144],
  ['mv2 56 1x1 144-24', 144, 56, 24, 1, 1, 1],
  ['mv2 56 dw/2 144', 144, 56, 144, 3, 2, 144],
  ['mv2 28 1x1 144-32', 144, 28, 32, 1, 1, 1],
  ['mv2 28 1x1 32-192', 32, 28, 192, 1, 1, 1],
  ['mv2 28 dw 192', 192, 28, 192, 3, 1, 192],
  ['mv2 28 1x1 192-32', 192, 28, 32, 1, 1, 1],
  ['mv2 28 dw/2 192', 192, 28, 192, 3, 2, 192],
  ['mv2 14 1x1 192-64', 192, 14, 64, 1, 1, 1],
  ['mv2 14 1x1 64-384', 64, 14, 384, 1, 1, 1],
  ['mv2 14 dw 384', 384, 14, 384, 3, 1, 384],
  ['mv2 14 1x1 384-64', 384, 14, 64, 1, 1, 1],
  ['mv2 14 1x1 384-96', 384, 14, 96, 1, 1, 1],
  ['mv2 14 1x1 96-576', 96, 14, 576, 1, 1, 1],
  ['mv2 14 dw 576', 576, 14, 576, 3, 1, 576],
  ['mv2 14 1x1 576-96', 576, 14, 96, 1, 1, 1],
  ['mv2 14 dw/2 576', 576, 14, 576, 3, 2, 576],
  ['mv2 7 1x1 576-160', 576, 7, 160, 1, 1, 1],
  ['mv2 7 1x1 160-960', 160, 7, 960, 1, 1, 1],
  ['mv2 7 dw 960', 960, 7, 960, 3, 1, 960],
  ['mv2 7 1x1 960-160', 960, 7, 160, 1, 1, 1],
  ['mv2 7 1x1 960-320', 960, 7, 320, 1, 1, 1],
  ['mv2 7 1x1 320-1280', 320, 7, 1280, 1, 1, 1],
];

/**
 * One conv shape, sonde (createConv2d with bias + ReLU fused) against onnxruntime-node's one-node
 * Conv + Relu graph with the same weights and threads; checks both computed the same thing.
 */
async function convPair(ctx, n, cin, hw, cout, k, stride, group, threads) {
  const pad = Math.floor(k / 2);
  const xDims = [n, cin, hw, hw];
  const wDims = [cout, cin / group, k, k];
  const w = rand(wDims.reduce((a, b) => a * b, 1));
  const b = rand(cout);
  const x = rand(xDims.reduce((a, b2) => a * b2, 1));
  const geo = { strides: [stride, stride], pads: [pad, pad, pad, pad], group };
  const ort = await onnxruntime.prepareConv(xDims, wDims, w, b, { threads, relu: true, spin: ctx.ortSpin, ...geo });
  const conv = kernels.createConv2d(new Tensor('float32', w, wDims), { ...geo, bias: new Tensor('float32', b, [cout]), activation: 'relu' });
  const X = new Tensor('float32', x, xDims);
  const got = (await conv.run(X, { threads })).data;
  const want = await ort.run(x);
  // Both sides are float32 sums of K = cin/group*k*k products of values in [-1, 1); each is within
  // (K + 2) u K of the exact value, hence twice that between them.
  const kk = (cin / group) * k * k;
  const bound = 2 * (kk + 2) * 2 ** -24 * (kk + 1);
  for (let s = 0; s < 256; s++) {
    const i = Math.floor(Math.random() * got.length);
    if (!(Math.abs(got[i] - want[i]) <= bound)) throw new Error(`conv ${xDims} * ${wDims}: sonde y[${i}] = ${got[i]}, onnxruntime-node ${want[i]}`);
  }
  const [, , oh, ow] = ort.outDims;
  // The output tensor is reused, as a planned runtime does (a fresh 0.8-3 MiB output per call costs
  // page faults that were measured at over half of a 56x56 conv's time on this VM); ORT reuses its
  // arena for the same reason.
  const out = new Tensor('float32', new Float32Array(got.length), ort.outDims);
  return {
    sonde: () => conv.run(X, { threads, out }),
    anchor: () => ort.run(x),
    flops: 2 * n * cout * oh * ow * kk,
    // Depthwise is memory bound: bytes of input read and output written.
    bytes: 4 * (x.length + n * cout * oh * ow),
    conv, X,
    async release() { conv.dispose(); await ort.release(); },
  };
}

/**
 * The distinct convolutions of ResNet-50 and MobileNetV2 at 224x224 (batch 1; batch 8 for a few),
 * fused bias + ReLU, against onnxruntime-node's Conv + Relu in the same run (ratio = ort ms / sonde
 * ms), with GFLOP/s and % of the FMA peak; depthwise also GB/s. Then fusion: conv + BN + ReLU fused
 * at creation against the same conv followed by separate BN (mul, add) and ReLU passes.
 */
async function* convSuite(ctx) {
  const pool = getThreads();
  const threadCounts = [...new Set([1, Math.min(2, pool)])];
  const timing = ctx.quick ? { minRounds: 3, minMs: 60, maxMs: 400 } : { minRounds: 9, minMs: 400, maxMs: 2000 };
  const pick = (list, names) => list.filter((s) => names.includes(s[0]));
  const cases = ctx.quick
    ? [...pick(RESNET50, ['r50 56 3x3 64', 'r50 56 1x1 64-256', 'r50 7 3x3 512']), ...pick(MOBILENETV2, ['mv2 56 dw 144'])].map((s) => [1, ...s])
    : [...RESNET50, ...MOBILENETV2].map((s) => [1, ...s]);
  if (!ctx.quick) {
    cases.push(...[...pick(RESNET50, ['r50 56 3x3 64', 'r50 56 1x1 64-256', 'r50 14 3x3 256', 'r50 7 1x1 512-2048']),
      ...pick(MOBILENETV2, ['mv2 56 dw 144', 'mv2 14 1x1 96-576'])].map((s) => [8, ...s]));
  }
  for (const [n, name, cin, hw, cout, k, stride, group] of cases) {
    for (const t of threadCounts) {
      const p = await convPair(ctx, n, cin, hw, cout, k, stride, group, t);
      const [ms, ortMs] = await timeInterleaved([p.sonde, p.anchor], timing);
      const path = p.conv.path;
      await p.release();
      const g = p.flops / ms / 1e6;
      const row = { case: `${name} n${n} t${t}`, ms, gflops: g, pctPeak: (100 * g) / (await peak(ctx, t)) };
      if (group > 1) row.gbps = p.bytes / ms / 1e6;
      yield { ...row, ortMs, ratio: ortMs / ms, path, vs: 'onnxruntime-node' };
    }
  }

  // Fusion pays: the same 56x56x64 conv with BN and ReLU folded/fused, against conv then BN as
  // separate broadcast mul and add passes, then a ReLU pass (sonde's own elementwise ops).
  for (const [name, cin, hw, cout, k] of [['r50 56 3x3 64', 64, 56, 64, 3], ['r50 56 1x1 64-64', 64, 56, 64, 1]]) {
    const t = pool;
    const pad = Math.floor(k / 2);
    const w = new Tensor('float32', rand(cout * cin * k * k), [cout, cin, k, k]);
    const x = new Tensor('float32', rand(cin * hw * hw), [1, cin, hw, hw]);
    const v = (f) => new Tensor('float32', rand(cout).map(f), [cout]);
    const bn = { scale: v((a) => a), bias: v((a) => a), mean: v((a) => a), variance: v((a) => a + 1.5), epsilon: 1e-5 };
    const fused = kernels.createConv2d(w, { pads: [pad, pad, pad, pad], bn, activation: 'relu' });
    const plain = kernels.createConv2d(w, { pads: [pad, pad, pad, pad] });
    const s = new Tensor('float32', bn.scale.data.map((g, i) => g / Math.sqrt(bn.variance.data[i] + bn.epsilon)), [1, cout, 1, 1]);
    const sh = new Tensor('float32', bn.bias.data.map((b, i) => b - bn.mean.data[i] * s.data[i]), [1, cout, 1, 1]);
    // Both sides allocate their outputs (the elementwise ops have no out option), so the comparison
    // is like for like.
    const separate = async () => kernels.relu(await kernels.add(await kernels.mul(await plain.run(x, { threads: t }), s, { threads: t }), sh, { threads: t }), { threads: t });
    const [ms, sepMs] = await timeInterleaved([() => fused.run(x, { threads: t }), separate], timing);
    fused.dispose();
    plain.dispose();
    yield { case: `${name} +bn+relu fused t${t}`, ms, separateMs: sepMs, vs: 'conv, bn, relu passes', ratio: sepMs / ms };
  }
}

/**
 * Quantised-weight GEMV (M = 1, the decode step of a language model) over GGUF-layout weights of
 * type f32 / f16 / q8_0 / q4_0, at 1 and 2 threads. Decode is bound by streaming the weights, so
 * each row reports GB/s of weight bytes read and % of the `peak` suite's read bandwidth at the same
 * thread count. Calls cycle through copies of the weights that together exceed the last-level cache
 * (as the gemm suite's model shapes do), so every call reads DRAM. (N, K): a 4096-wide model's
 * q/k/v/o or up projection, its down projection, and Mixtral's expert FFN (14336 x 4096; 235 MB in
 * f32, one copy already exceeds the cache; --quick uses a quarter of it).
 */
async function* quantSuite(ctx) {
  const pool = getThreads();
  const threadCounts = [...new Set([1, Math.min(2, pool)])];
  const timing = ctx.quick ? { minRounds: 3, minMs: 100, maxMs: 1000 } : { minRounds: 5, minMs: 500, maxMs: 3000 };
  const shapes = ctx.quick ? [[4096, 1024], [3584, 4096]] : [[4096, 1024], [1024, 4096], [14336, 4096]];
  for (const [n, k] of shapes) {
    const wf = new Tensor('float32', rand(n * k), [n, k]);
    const x = new Tensor('float32', rand(k), [1, k]);
    for (const type of ['f32', 'f16', 'q8_0', 'q4_0']) {
      const w0 = kernels.quantizeWeights(wf, type);
      const copies = copiesBeyondCache(w0.bytes);
      const ws = [w0, ...Array.from({ length: copies - 1 }, () => new kernels.QuantizedWeights(type, n, k, w0.data.slice()))];
      for (const t of threadCounts) {
        let c = 0;
        const [ms] = await timeInterleaved([() => kernels.quantMatmul(x, ws[c++ % ws.length], { threads: t })], timing);
        const gbps = w0.bytes / ms / 1e6;
        yield { case: `${type} gemv n=${n} k=${k} t${t}`, ms, gbps, pctBw: (100 * gbps) / (await readBandwidth(ctx, t)),
          mib: w0.bytes / 2 ** 20, copies, gflops: (2 * n * k) / ms / 1e6 };
      }
    }
  }
}

/**
 * MoE dispatch (kernels.moe) on one layer of the issue's Mixtral-layout model: hidden 1024, 8
 * experts of FFN 1408, top-2, softmax + renormalisation. Decode (1 token): GB/s of the weights it
 * must read (router + k experts' gate/up/down) and the % of this machine's read bandwidth, over
 * enough copies of the layer to defeat the last-level cache. Prefill (512 tokens): GFLOP/s of the
 * real work (2 * tokens * k * 3 * d * ff) and the expert load (largest group / mean group).
 */
async function* moeSuite(ctx) {
  const pool = getThreads();
  const threadCounts = [...new Set([1, Math.min(2, pool)])];
  const timing = ctx.quick ? { minRounds: 3, minMs: 100, maxMs: 1000 } : { minRounds: 5, minMs: 500, maxMs: 3000 };
  const d = 1024, ff = 1408, experts = 8, k = 2;
  for (const type of ['f16', 'q8_0']) {
    const q = (rows, cols, scale) => kernels.quantizeWeights(new Tensor('float32', rand(rows * cols).map((v) => v * scale), [rows, cols]), type);
    const layer0 = {
      router: q(experts, d, 1 / 32), k, renormalize: true,
      gate: Array.from({ length: experts }, () => q(ff, d, 1 / 32)),
      up: Array.from({ length: experts }, () => q(ff, d, 1 / 32)),
      down: Array.from({ length: experts }, () => q(d, ff, 1 / 38)),
    };
    const expertBytes = layer0.gate[0].bytes + layer0.up[0].bytes + layer0.down[0].bytes;
    const decodeBytes = layer0.router.bytes + k * expertBytes;
    // One x routes to the same k experts every call: the copies must put those beyond the cache.
    const copies = copiesBeyondCache(decodeBytes);
    const clone = (w) => new kernels.QuantizedWeights(w.type, w.n, w.k, w.data.slice());
    const layers = [layer0, ...Array.from({ length: copies - 1 }, () => ({
      ...layer0, router: clone(layer0.router), gate: layer0.gate.map(clone), up: layer0.up.map(clone), down: layer0.down.map(clone),
    }))];
    const x1 = new Tensor('float32', rand(d), [1, d]);
    // First use of a copy stacks its experts and touches fresh pages (slow on this VM): not timed.
    for (const l of layers) await kernels.moe(x1, l);
    for (const t of threadCounts) {
      let c = 0;
      const [ms] = await timeInterleaved([() => kernels.moe(x1, layers[c++ % layers.length], { threads: t })], timing);
      const gbps = decodeBytes / ms / 1e6;
      yield { case: `${type} decode d=${d} ff=${ff} E=${experts} k=${k} t${t}`, ms, gbps,
        pctBw: (100 * gbps) / (await readBandwidth(ctx, t)), mib: decodeBytes / 2 ** 20, copies };
    }
    const tokens = ctx.quick ? 128 : 512;
    const xp = new Tensor('float32', rand(tokens * d), [tokens, d]);
    for (const t of threadCounts) {
      let load = 0;
      const [ms] = await timeInterleaved([async () => {
        const r = await kernels.moe(xp, layer0, { threads: t });
        load = Math.max(...r.expertCounts) / ((tokens * k) / experts);
      }], timing);
      yield { case: `${type} prefill tokens=${tokens} d=${d} ff=${ff} E=${experts} k=${k} t${t}`, ms,
        gflops: (2 * tokens * k * 3 * d * ff) / ms / 1e6, maxLoad: Number(load.toFixed(2)) };
    }
  }
}

/** Dense [k, n] weights with a random `sparsity` fraction of explicit zeros (in runs of `block` output columns). */
function prunedWeights(k, n, sparsity, block = 1) {
  const b = rand(k * n);
  for (let p = 0; p < k; p++) {
    for (let j0 = 0; j0 < n; j0 += block) {
      if (Math.random() < sparsity) b.fill(0, p * n + j0, p * n + Math.min(n, j0 + block));
    }
  }
  return new Tensor('float32', b, [k, n]);
}

/**
 * SpMM on pruned weights against sonde's dense GEMM on the same weights (zeros included), timed
 * interleaved call by call in this run: one timing group per (weights, M, threads) holds the dense
 * GEMM and every sparsity. Cases are named N x K (weights as an nn.Linear / 1x1 conv: N outputs, K
 * inputs). gflops counts the real work (2·nnz·M), denseEqGflops the dense work (2·N·K·M);
 * ratio = dense ms / sparse ms. Unstructured (random) pruning, CSR; then block-pruned weights in
 * BSR 1x8 / 1x16 / 1x32 against CSR on the same weights (the block-shape choice of ops/spmm.cc).
 */
async function* sparseSuite(ctx) {
  const pool = getThreads();
  const threadCounts = ctx.quick ? [1] : [...new Set([1, Math.min(2, pool)])];
  const timing = ctx.quick ? { minRounds: 3, minMs: 80, maxMs: 600 } : { minRounds: 5, minMs: 250, maxMs: 1500 };
  const shapes = ctx.quick ? [[1024, 1024], [256, 64]] : [[1024, 1024], [256, 64], [64, 256], [512, 128], [1024, 256], [2048, 512]];
  const ms_ = ctx.quick ? [1, 64] : [1, 8, 64, 256];
  const sparsities = ctx.quick ? [0.9] : [0.5, 0.7, 0.8, 0.9, 0.95];
  for (const [n, k] of shapes) {
    const cases = sparsities.map((s) => {
      const b = prunedWeights(k, n, s);
      return { s, b, dense: kernels.packGemmWeights(b), w: kernels.toSparse(b, { format: 'csr' }) };
    });
    for (const m of ms_) {
      const a = new Tensor('float32', rand(m * k), [m, k]);
      // One output for every call: a fresh [m, n] result per call costs an allocation and page
      // faults that are no part of either kernel (a tenth of a 90%-sparse M = 64 SpMM).
      const out = new Tensor('float32', new Float32Array(m * n), [m, n]);
      for (const t of threadCounts) {
        // The dense GEMM of the 90% weights (any would do: dense work does not depend on zeros).
        const ref = cases.find((c) => c.s === 0.9) ?? cases[0];
        const fns = [() => kernels.gemm(a, ref.dense, { threads: t, out }), ...cases.map((c) => () => kernels.spmm(a, c.w, { threads: t, out }))];
        const [denseMs, ...times] = await timeInterleaved(fns, timing);
        for (let i = 0; i < cases.length; i++) {
          const { s, w } = cases[i];
          const ms = times[i];
          yield { case: `csr ${Math.round(s * 100)}% ${n}x${k} m${m} t${t}`, ms, gflops: (2 * w.nnz * m) / ms / 1e6,
            denseEqGflops: (2 * n * k * m) / ms / 1e6, denseMs, ratio: denseMs / ms, vs: 'sonde dense gemm', ukernel: w.ukernel };
        }
      }
    }
    for (const c of cases) { c.dense.dispose(); c.w.dispose(); }
  }
  // Block shape: 90% block-pruned weights (1 x 16 runs of output columns zeroed together), every
  // BSR width and CSR on the same weights, with the dense GEMM.
  const [n, k, m] = [1024, 1024, 64];
  const b = prunedWeights(k, n, 0.9, 16);
  const a = new Tensor('float32', rand(m * k), [m, k]);
  const out = new Tensor('float32', new Float32Array(m * n), [m, n]);
  const dense = kernels.packGemmWeights(b);
  const ws = [
    ['csr', kernels.toSparse(b, { format: 'csr' })],
    ...[8, 16, 32].map((bw) => [`bsr1x${bw}`, kernels.toSparse(b, { format: 'bsr', blockShape: [1, bw] })]),
  ];
  for (const t of threadCounts) {
    const [denseMs, ...times] = await timeInterleaved([() => kernels.gemm(a, dense, { threads: t, out }),
      ...ws.map(([, w]) => () => kernels.spmm(a, w, { threads: t, out }))], timing);
    for (let i = 0; i < ws.length; i++) {
      const [name, w] = ws[i];
      yield { case: `${name} block-pruned 90% ${n}x${k} m${m} t${t}`, ms: times[i], gflops: (2 * w.nnz * m) / times[i] / 1e6,
        denseEqGflops: (2 * n * k * m) / times[i] / 1e6, denseMs, ratio: denseMs / times[i], vs: 'sonde dense gemm', ukernel: w.ukernel };
    }
  }
  dense.dispose();
  for (const [, w] of ws) w.dispose();
  yield* prunedModels(ctx, timing, threadCounts);
  yield* activationSparsity(ctx, timing, threadCounts);
}

/**
 * Activation sparsity: the second layer of a ReLU FFN (K = 4096 hidden -> N = 1024) at batch 1 in
 * a Session, fed a row with 90% (and 50%, 30%) zeros against the same row with no zeros (the dense
 * GEMV), interleaved; ratio = dense ms / ms. The weights stream from memory: calls cycle through
 * enough copies of the layer to exceed the cache, as a decode step's weights do.
 */
export async function* activationSparsity(ctx, timing, threadCounts) {
  const [k, n] = [4096, 1024];
  const copies = copiesBeyondCache(k * n * 4);
  const sessions = [];
  for (let c = 0; c < copies; c++) {
    const g = new GraphBuilder('ffn2', { opset: 13 });
    g.input('x', 'float32', [1, k]);
    const [y] = g.node('MatMul', ['x', g.init('w', { dtype: 'float32', dims: [k, n], data: rand(k * n) })]);
    g.output(y, 'float32', [1, n]);
    sessions.push(g.toBytes());
  }
  for (const t of threadCounts) {
    const ss = await Promise.all(sessions.map((b) => sonde.Session.load(b, { device: 'cpu', threads: t, sparse: 'off' })));
    const row = (zeros) => {
      const x = new Float32Array(k);
      for (let i = 0; i < k; i++) x[i] = Math.random() < zeros ? 0 : Math.random() + 0.1;
      return { x: new Tensor('float32', x, [1, k]) };
    };
    const zeroFractions = [0.9, 0.8, 0.7, 0.6, 0.5];
    const feeds = [0, ...zeroFractions].map(row);
    let i = 0;
    const next = () => ss[i++ % ss.length];
    const [denseMs, ...times] = await timeInterleaved(feeds.map((f) => () => next().run(f)), timing);
    for (const [j, zeros] of zeroFractions.entries()) {
      const ms = times[j];
      yield { case: `activation-sparse gemv ${Math.round(zeros * 100)}% zeros ${k}->${n} m1 t${t}`, ms, denseMs, ratio: denseMs / ms,
        denseGBs: (k * n * 4) / denseMs / 1e6, vs: 'same layer, dense row' };
    }
    for (const s of ss) s.dispose();
  }
}

/**
 * Whole pruned models: the generated ResNet-50 (first conv kept dense) and 784-1024-1024-10 MLP
 * (every layer), magnitude-pruned to 90% per layer with sonde.prune(), in a sonde Session with sparse 'auto' and
 * 'off' and in onnxruntime-node on the same pruned bytes, timed interleaved in this run after
 * checking both sonde outputs against ORT's. ratio = ORT ms / sonde 'auto' ms; offRatio = sonde
 * 'off' ms / 'auto' ms (what the sparse kernels bought).
 */
export async function* prunedModels(ctx, timing, threadCounts) {
  const plan = ctx.quick ? [['mlp', [1, 32]]] : [['mlp', [1, 32]], ['resnet50', [1, 8]]];
  for (const [name, batches] of plan) {
    // ResNet-50 keeps its first conv dense (9k weights on the raw image); the MLP's first layer is
    // its largest, so it is pruned too.
    const { bytes, report } = await sonde.prune(modelBytes(name), { sparsity: 0.9, keepFirstLayerDense: name !== 'mlp' });
    for (const t of threadCounts) {
      const ort = await onnxruntime.prepareModel(bytes, { threads: t, spin: ctx.ortSpin });
      const auto = await sonde.Session.load(bytes, { device: 'cpu', threads: t });
      const off = await sonde.Session.load(bytes, { device: 'cpu', threads: t, sparse: 'off' });
      for (const b of batches) {
        const x = modelInput(name, b);
        const feed = { input: new Tensor('float32', x.data, x.dims) };
        const want = (await ort.run({ input: x })).output.data;
        for (const [label, s] of [['auto', auto], ['off', off]]) {
          const d = relativeDifference((await s.run(feed)).output.data, want);
          if (!(d <= 4 * roundingTolerance(name))) throw new Error(`pruned ${name} ${label} n${b}: differs from onnxruntime-node by ${d.toExponential(2)}`);
        }
        const [ortMs, ms, offMs] = await timeInterleaved([() => ort.run({ input: x }), () => auto.run(feed), () => off.run(feed)], timing);
        // Layers the 'auto' session runs sparse in some plan so far (a plan per batch size).
        const sparseLayers = auto.sparseLayers.filter((l) => Object.values(l.kernel).includes('sparse')).length;
        yield { case: `pruned 90% ${name} n${b} t${t}`, ms, ortMs, offMs, ratio: ortMs / ms, offRatio: offMs / ms, vs: 'onnxruntime-node',
          sparsity: report.overallSparsity, sparseLayers: `${sparseLayers}/${auto.sparseLayers.length}` };
      }
      auto.dispose();
      off.dispose();
      await ort.release();
    }
  }
}

/**
 * Lags of a setInterval(1 ms) timer (ms late per tick) while `step` runs back to back for `ms`.
 * A runtime that computes on the JS thread delays every tick by a whole run.
 */
async function timerLag(step, ms) {
  const lags = [];
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    lags.push(Math.max(0, now - last - 1));
    last = now;
  }, 1);
  const end = performance.now() + ms;
  while (performance.now() < end) await step();
  clearInterval(timer);
  lags.sort((a, b) => a - b);
  return { p99: lags[Math.min(lags.length - 1, Math.floor(lags.length * 0.99))] ?? NaN, max: lags.at(-1) ?? NaN, ticks: lags.length };
}

/**
 * Whole generated models (bench/graphs/models.js: ResNet-50, MobileNetV2, the 784-1024-1024-10
 * MLP, a 2-layer transformer encoder) in a sonde Session (fp32) against an onnxruntime-node
 * InferenceSession (graph optimisation 'all', sequential, intraOpNumThreads = threads) on the same
 * bytes, timed pair by pair in this process; ratio = ort ms / sonde ms (above 1, sonde is faster).
 * Before timing, sonde's outputs are checked against ORT's (roundingTolerance), so a ratio never
 * compares different work. Then ResNet-50 and the transformer with precision 'bf16' against ORT
 * fp32, the round trip of a one-Identity graph (per-run overhead), and event-loop timer lag while
 * ResNet-50 runs in a loop.
 * Without a Session in this build (dist/index.js exports none), ORT's side alone is reported.
 */
async function* modelsSuite(ctx) {
  const Session = sonde.Session;
  const note = Session ? undefined : 'sonde Session not in this build';
  const pool = getThreads();
  const threadCounts = [...new Set([1, Math.min(2, pool)])];
  const batches = ctx.quick ? [1] : [1, 8];
  const timing = ctx.quick ? { minRounds: 3, minMs: 50, maxMs: 800 } : { minRounds: 5, minMs: 1000, maxMs: 8000 };
  const feedOf = (x) => ({ input: new Tensor('float32', x.data, x.dims) });
  const check = (what, got, want, bound) => {
    const d = relativeDifference(got, want);
    if (!(d <= bound)) throw new Error(`${what}: sonde differs from onnxruntime-node by ${d.toExponential(2)} of max|output| (bound ${bound.toExponential(2)})`);
  };

  for (const name of ['resnet50', 'mobilenetv2', 'mlp', 'transformer']) {
    const bytes = modelBytes(name);
    for (const t of threadCounts) {
      const ort = await onnxruntime.prepareModel(bytes, { threads: t, spin: ctx.ortSpin });
      const fp32 = Session ? await Session.load(bytes, { device: 'cpu', threads: t }) : null;
      // bf16 rows for the models whose bound is measured (bench/graphs/models.js).
      const bf16Bound = { resnet50: BF16_RESNET50_BOUND, transformer: BF16_TRANSFORMER_BOUND }[name];
      const bf16 = Session && bf16Bound ? await Session.load(bytes, { device: 'cpu', threads: t, precision: 'bf16' }) : null;
      for (const b of batches) {
        const x = modelInput(name, b);
        const feed = feedOf(x);
        const ortRun = () => ort.run({ input: x });
        const want = (await ortRun()).output.data;
        const fns = [ortRun];
        // A model sonde refuses (a SondeError: an unsupported operator or form) is reported in the
        // row and ORT's side still timed; wrong outputs are not an error to report but a bug, and
        // stop the suite.
        let error = note;
        try {
          if (fp32) {
            check(`${name} n${b} t${t}`, (await fp32.run(feed)).output.data, want, roundingTolerance(name));
            fns.push(() => fp32.run(feed));
          }
          if (bf16) {
            check(`${name} bf16 n${b} t${t}`, (await bf16.run(feed)).output.data, want, bf16Bound);
            fns.push(() => bf16.run(feed));
          }
        } catch (e) {
          if (!(e instanceof sonde.SondeError)) throw e;
          error = `${e.name}: ${e.message}`;
          fns.length = 1;
        }
        const [ortMs, ms, bf16Ms] = await timeInterleaved(fns, timing);
        yield { case: `${name} n${b} t${t}`, ms, ortMs, ratio: ms ? ortMs / ms : undefined, vs: 'onnxruntime-node', note: error };
        if (bf16Ms) yield { case: `${name} bf16 n${b} t${t}`, ms: bf16Ms, ortMs, ratio: ortMs / bf16Ms, fp32Ms: ms, vs: 'onnxruntime-node fp32' };
      }
      fp32?.dispose();
      bf16?.dispose();
      await ort.release();
    }
  }

  // Per-run overhead: one Identity on 16 floats, so what is timed is the call itself.
  const g = new GraphBuilder('identity', { opset: 13 });
  g.input('x', 'float32', [1, 16]);
  g.node('Identity', ['x'], {}, ['y']);
  g.output('y', 'float32', [1, 16]);
  const idBytes = g.toBytes();
  const x16 = { data: new Float32Array(16).fill(0.5), dims: [1, 16] };
  const ortId = await onnxruntime.prepareModel(idBytes, { threads: 1, spin: ctx.ortSpin });
  const sondeId = Session ? await Session.load(idBytes, { device: 'cpu', threads: 1 }) : null;
  const idFeed = { x: new Tensor('float32', x16.data, x16.dims) };
  const idFns = [() => ortId.run({ x: x16 }), ...(sondeId ? [() => sondeId.run(idFeed)] : [])];
  // Twenty calls each first, as bench/overhead.js does, so that the two tools take this number the
  // same way (the pool sizes its idle spin from the last gap between calls).
  const idTiming = { minRounds: 50, maxRounds: ctx.quick ? 300 : 5000, minMs: ctx.quick ? 50 : 1000, maxMs: ctx.quick ? 300 : 3000 };
  for (let i = 0; i < 19; i++) for (const f of idFns) await f();
  const [ortIdMs, idMs] = await timeInterleaved(idFns, idTiming);
  // Also sonde's calls back to back (no ORT call between): the number bench/overhead.js reports as
  // 'alone'. On a shared 2-vCPU VM the two differ mostly by load (see README, Models).
  const [aloneMs] = sondeId ? await timeInterleaved([() => sondeId.run(idFeed)], idTiming) : [];
  yield { case: 'identity [1,16] round trip t1', us: idMs && idMs * 1e3, ortUs: ortIdMs * 1e3, ratio: idMs ? ortIdMs / idMs : undefined,
    aloneUs: aloneMs && aloneMs * 1e3, vs: 'onnxruntime-node', note };
  sondeId?.dispose();
  await ortId.release();

  // Every core busy with other work: as many CPU-bound processes as cores beside this one, the MLP
  // at batch 1 on one thread, ORT's run and sonde's alternating; medians and 90th percentiles. A
  // pool that spins between runs waits a scheduler slice for its core (see thread_pool.cc).
  if (Session) {
    const { spawn } = await import('node:child_process');
    const hogs = Array.from({ length: availableParallelism() }, () => spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }));
    try {
      const mBytes = modelBytes('mlp');
      const xm = modelInput('mlp', 1);
      const ortM = await onnxruntime.prepareModel(mBytes, { threads: 1, spin: ctx.ortSpin });
      const sm = await Session.load(mBytes, { device: 'cpu', threads: 1 });
      const mFeed = feedOf(xm);
      const st = [], ot = [];
      const end = performance.now() + (ctx.quick ? 1000 : 4000);
      await new Promise((r) => setTimeout(r, 200));
      while (performance.now() < end) {
        let t0 = performance.now();
        await ortM.run({ input: xm });
        ot.push(performance.now() - t0);
        t0 = performance.now();
        await sm.run(mFeed);
        st.push(performance.now() - t0);
      }
      const q = (a, p) => [...a].sort((u, v) => u - v)[Math.min(a.length - 1, Math.floor(a.length * p))];
      yield { case: `mlp n1 t1, every core busy (${hogs.length} CPU-bound processes)`, ms: q(st, 0.5), p90Ms: q(st, 0.9), ortMs: q(ot, 0.5),
        ortP90Ms: q(ot, 0.9), ratio: q(ot, 0.5) / q(st, 0.5), vs: 'onnxruntime-node' };
      sm.dispose();
      await ortM.release();
    } finally {
      for (const h of hogs) h.kill();
    }
  }

  // Responsiveness: a 1 ms timer's lag while ResNet-50 (batch 1, whole pool) runs back to back.
  const rBytes = modelBytes('resnet50');
  const x = modelInput('resnet50', 1);
  const lagMs = ctx.quick ? 500 : 3000;
  const ort = await onnxruntime.prepareModel(rBytes, { threads: pool, spin: ctx.ortSpin });
  const ortLag = await timerLag(() => ort.run({ input: x }), lagMs);
  await ort.release();
  let lag = { p99: undefined, max: undefined };
  if (Session) {
    const s = await Session.load(rBytes, { device: 'cpu', threads: pool });
    const feed = feedOf(x);
    lag = await timerLag(() => s.run(feed), lagMs);
    s.dispose();
  }
  yield { case: `event-loop lag, resnet50 n1 t${pool}`, p99Ms: lag.p99, maxMs: lag.max, ortP99Ms: ortLag.p99, ortMaxMs: ortLag.max, vs: 'onnxruntime-node', note };
}


/**
 * Closed-loop load: `callers` concurrent callers, each sending the next request as soon as its
 * previous one answers, for `ms`. Appends end-to-end latencies (ms) and 1 ms timer lags (ms) to
 * `into` and adds the requests answered and the elapsed time.
 */
async function closedLoop(session, feedOf, callers, ms, into) {
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    into.lags.push(Math.max(0, now - last - 1));
    last = now;
  }, 1);
  const start = performance.now();
  const end = start + ms;
  await Promise.all(Array.from({ length: callers }, async (_, i) => {
    const feed = feedOf(i);
    while (performance.now() < end) {
      const t0 = performance.now();
      await session.run(feed);
      into.lat.push(performance.now() - t0);
    }
  }));
  into.elapsed += performance.now() - start;
  clearInterval(timer);
}

export const quantile = (xs, p) => {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)] ?? NaN;
};

/**
 * Dynamic batching (issue #7): 64 closed-loop callers sending batch-1 requests to the MLP
 * 784-1024-1024-10 and to MobileNetV2, 2 threads, with batching off, on (fixed maxBatchSize and
 * maxDelayMs), and on with targetLatencyMs. The three run in turns (rounds of one slice each), so
 * that a burst of load from elsewhere on a shared machine hits all three alike. Each row reports
 * throughput, p50/p99 end-to-end latency, the mean batch size, the share of batch time spent
 * copying rows in and out (copyPct), the 1 ms timer's lag p99, and the checks of the issue:
 * `speedup` (throughput against batching off), `p99BoundMs` (maxDelayMs + 2x the batch run time's
 * p99) and `targetMs`. Every batched output is first checked against an unbatched run.
 */
async function* batchingSuite(ctx) {
  const Session = sonde.Session;
  const threads = Math.min(2, getThreads());
  const callers = 64;
  const rounds = ctx.quick ? 3 : 6;
  const cases = [
    // MobileNetV2's batch is capped at 8: sonde's conv kernels cost more per row at larger batches
    // (activations outgrow the cache), so a 64-row batch would only show that, 4 s at a time.
    { name: 'mlp', maxBatchSize: 64, maxDelayMs: 2, sliceMs: ctx.quick ? 500 : 2000, targetMs: 25 },
    { name: 'mobilenetv2', maxBatchSize: 8, maxDelayMs: 5, sliceMs: ctx.quick ? 1300 : 5000, targetMs: 2000 },
  ];
  for (const c of cases) {
    const bytes = modelBytes(c.name);
    // One distinct row per caller, so a mix-up of rows between callers changes an answer.
    const inputs = Array.from({ length: callers }, (_, i) => modelInput(c.name, 1, 1000 + i));
    const feedOf = (i) => ({ input: new Tensor('float32', inputs[i].data, inputs[i].dims) });
    const fixed = { maxBatchSize: c.maxBatchSize, maxDelayMs: c.maxDelayMs };
    const variants = [
      { label: 'batching off', options: {} },
      { label: 'batching on', options: { batching: fixed } },
      // Within reach at this load: 64 requests in flight need at least 64x the best cost per row.
      { label: `target ${c.targetMs} ms`, options: { batching: { ...fixed, targetLatencyMs: c.targetMs } } },
    ];
    for (const [k, v] of variants.entries()) {
      v.session = await Session.load(bytes, { device: 'cpu', threads, name: `${c.name}-${k}`, ...v.options });
      v.stats = { lat: [], lags: [], elapsed: 0 };
    }
    const want = [];
    for (let i = 0; i < 8; i++) want.push((await variants[0].session.run(feedOf(i))).output.data);
    for (const v of variants.slice(1)) {
      const got = await Promise.all(want.map((_, i) => v.session.run(feedOf(i))));
      got.forEach((g, i) => {
        const d = relativeDifference(g.output.data, want[i]);
        if (!(d <= roundingTolerance(c.name))) throw new Error(`${c.name} ${v.label}: request ${i}'s batched output differs from its unbatched one by ${d.toExponential(2)}`);
      });
      v.before = v.session.metrics();
    }
    for (let r = 0; r < rounds; r++) {
      for (const v of r % 2 ? [...variants].reverse() : variants) await closedLoop(v.session, feedOf, callers, c.sliceMs, v.stats);
    }
    const offRps = (variants[0].stats.lat.length * 1000) / variants[0].stats.elapsed;
    for (const v of variants) {
      const st = v.stats;
      const rps = (st.lat.length * 1000) / st.elapsed;
      const row = { case: `${c.name} b1 x${callers} t${threads} ${v.label}`, rps, p50Ms: quantile(st.lat, 0.5), p99Ms: quantile(st.lat, 0.99), lagP99Ms: quantile(st.lags, 0.99) };
      if (v.before) {
        const m = v.session.metrics();
        row.meanBatch = (m.batchSize.sum - v.before.batchSize.sum) / (m.batches - v.before.batches);
        row.copyPct = m.copyFraction * 100;
        row.speedup = rps / offRps;
        if (v.options.batching.targetLatencyMs) row.targetMs = v.options.batching.targetLatencyMs;
        else row.p99BoundMs = c.maxDelayMs + 2 * m.computeTime.p99 * 1e3;
      }
      v.session.dispose();
      yield row;
    }
  }
}

export const suites = { peak: peakSuite, gemm: gemmSuite, gemmLowp: gemmLowpSuite, conv: convSuite, quant: quantSuite, moe: moeSuite, sparse: sparseSuite, models: modelsSuite, batching: batchingSuite, llm: llmSuite, serving: servingSuite, cuda: cudaSuite };
