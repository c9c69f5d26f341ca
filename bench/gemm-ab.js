// Focused fp32 GEMM A/B timing: this checkout's addon against another build of it (SONDE_BEFORE=path
// to an older sonde.node) and onnxruntime-node, all three in one process, call by call interleaved,
// because this shared machine's speed drifts by more than the changes being measured.
//   node bench/gemm-ab.js [MxKxN[@threads][*copies] ...]
// Default cases: the squares and model shapes of the `gemm` suite. Prints best/median GFLOP/s by wall
// time, the medians as % of the FMA peak (measured after each case's rounds) and the ratios of
// medians before/after and ORT/after (above 1: this build is faster). With
// the host loaded (load average above its 2 cores), wall time mostly measures the wait for a core,
// so each line also gives GFLOP/s per CPU-second of this process (process.cpuUsage: every thread,
// the pool's spin-waits included) and the ratio of those medians.
import { createRequire } from 'node:module';
import { loadavg } from 'node:os';
import { native } from '../dist/binding.js';
import { devices } from '../dist/index.js';
import * as onnxruntime from './anchors/onnxruntime.js';

const require = createRequire(import.meta.url);
const before = process.env.SONDE_BEFORE ? require(process.env.SONDE_BEFORE) : null;
const after = native();
const rounds = Number(process.env.ROUNDS ?? 30);

const rand = (len) => Float32Array.from({ length: len }, () => Math.random() * 2 - 1);
const defaults = ['256x256x256@1', '512x512x512@1', '1024x1024x1024@1', '1024x1024x1024@2', '2048x2048x2048@1', '2048x2048x2048@2',
  '1x1024x4096@2*8', '1x4096x1024@2*8', '1x2048x1000@2*8', '8x1024x4096@2*8', '8x4096x1024@2*8', '64x1024x4096@2*8', '64x4096x1024@2*8'];

function parse(spec) {
  const m = /^(\d+)x(\d+)x(\d+)(?:@(\d+))?(?:\*(\d+))?$/.exec(spec);
  if (!m) throw new Error(`case ${spec}: expected MxKxN[@threads][*copies]`);
  return { m: +m[1], k: +m[2], n: +m[3], threads: +(m[4] ?? 1), copies: +(m[5] ?? 1) };
}

function stats(ts) {
  const s = [...ts].sort((x, y) => x - y);
  return { best: s[0], median: s[Math.floor(s.length / 2)] };
}

// The load average says how far wall times can be trusted on this shared machine (above the core
// count, a call mostly waits for a core); printed before and after so a drift shows.
const load = () => loadavg().map((x) => x.toFixed(2)).join(' ');
console.log(`load average ${load()}`);
for (const spec of process.argv.length > 2 ? process.argv.slice(2) : defaults) {
  const { m, k, n, threads, copies } = parse(spec);
  const a = rand(m * k);
  const sides = [];
  for (let c = 0; c < copies; c++) {
    const ort = await onnxruntime.prepare(m, k, n, { threads, spin: false });
    sides.push({ ort, w: after.packGemmWeights(ort.weights.b, k, n, 'auto'), wb: before?.packGemmWeights(ort.weights.b, k, n, 'auto') });
  }
  const opts = { m, k, n, lda: k, ldc: n, activation: 0, alpha: 0, beta: 0, residualBeforeActivation: false, threads, variant: 'auto' };
  const outA = new Float32Array(m * n);
  const outB = new Float32Array(m * n);
  let ci = 0;
  const fns = {
    after: async () => { await after.gemm(a, sides[ci % copies].w, outA, opts); },
    ort: async () => { await sides[ci % copies].ort.run(a); },
  };
  if (before) fns.before = async () => { await before.gemm(a, sides[ci % copies].wb, outB, opts); };
  const names = Object.keys(fns);
  const times = Object.fromEntries(names.map((x) => [x, []]));
  const cpu = Object.fromEntries(names.map((x) => [x, []]));
  for (const x of names) await fns[x]();
  const ref = await sides[0].ort.run(a);
  await after.gemm(a, sides[0].w, outA, opts);
  let maxErr = 0;
  for (let i = 0; i < ref.length; i += 7) maxErr = Math.max(maxErr, Math.abs(ref[i] - outA[i]));
  for (let r = 0; r < rounds; r++) {
    const order = r % 2 ? [...names].reverse() : names;
    for (const x of order) {
      const c0 = process.cpuUsage();
      const t0 = performance.now();
      await fns[x]();
      times[x].push(performance.now() - t0);
      const c = process.cpuUsage(c0);
      cpu[x].push((c.user + c.system) / 1000);
    }
    ci++;
  }
  // The FMA peak at these threads, measured right after the rounds (best of 3 short runs, wall
  // time like the GEMM's), for the % of peak of the after/before medians.
  let peak = 0;
  for (let r = 0; r < 3; r++) {
    const p = await after.peakFma(devices().cpu.simd, threads, 0.05);
    peak = Math.max(peak, p.flops / p.seconds / 1e9);
  }
  const st = Object.fromEntries(names.map((x) => [x, stats(times[x])]));
  const gf = (ms) => ((2 * m * k * n) / ms / 1e6).toFixed(1);
  const gb = (ms) => ((k * n * 4) / ms / 1e6).toFixed(1);
  const line = [`${spec.padEnd(22)}`, `after ${gf(st.after.best)}/${gf(st.after.median)} GFLOP/s`];
  if (m === 1) line.push(`(${gb(st.after.best)}/${gb(st.after.median)} GB/s)`);
  const pct = (ms) => `${((100 * 2 * m * k * n) / ms / 1e6 / peak).toFixed(0)}%`;
  line.push(`(${pct(st.after.median)} of peak ${peak.toFixed(0)})`);
  if (before) line.push(`before ${gf(st.before.best)}/${gf(st.before.median)} (${pct(st.before.median)})`, `before/after ${(st.before.median / st.after.median).toFixed(2)}`);
  line.push(`ort ${gf(st.ort.best)}/${gf(st.ort.median)}`, `ort/after ${(st.ort.median / st.after.median).toFixed(2)}`);
  if (before) line.push(`ort/before ${(st.ort.median / st.before.median).toFixed(2)}`);
  const cm = Object.fromEntries(names.map((x) => [x, stats(cpu[x]).median]));
  line.push(`| per CPU-s: after ${gf(cm.after)}`);
  if (before) line.push(`before ${gf(cm.before)}`, `before/after ${(cm.before / cm.after).toFixed(2)}`);
  line.push(`ort ${gf(cm.ort)}`, `ort/after ${(cm.ort / cm.after).toFixed(2)}`);
  line.push(`maxdiff ${maxErr.toExponential(1)}`);
  console.log(line.join('  '));
  for (const s of sides) await s.ort.release();
}
console.log(`load average ${load()}`);
