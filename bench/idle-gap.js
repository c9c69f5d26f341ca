// What a pause before a call costs: sonde's GEMM back to back, after an idle gap (a timer: every
// core may go idle) and after a busy gap (the JS thread spinning, sonde's workers asleep), the
// modes taking turns round by round in one process.
//   node bench/idle-gap.js [M K N] [threads] [gap ms] [rounds]
// On the 2-vCPU Xeon VM (one thread, 14 ms gaps): 256^3 0.21 ms back to back, 0.46 after an idle
// gap and 0.39 after a busy one; 1024^3 about 5% slower after either; 2048^3 unchanged (96 ms).
// Back to back the worker spins between calls (SONDE_IDLE_SPIN_US); with no spinning at all
// (SONDE_SPIN_US=0 SONDE_IDLE_SPIN_US=0) back to back is as slow as after a gap (0.34 ms): the cost is
// the worker's vCPU coming back from idle. With the whole process on one CPU (taskset -c 0, a pool
// of one) 256^3 after an idle gap took 0.26 ms, but handing the job to the pinned worker of the JS
// thread's CPU (a prototype of the pool) did not help (0.40-0.43 ms). It is why the gemm suite also
// reports each side alone, call after call (its steadyPct columns).
import { native } from '../dist/binding.js';

const args = process.argv.slice(2).map(Number);
const [m, k, n] = args.length >= 3 ? args : [256, 256, 256];
const threads = args[3] ?? 1, gap = args[4] ?? 14, rounds = args[5] ?? 60;
const s = native();
const rand = (len) => Float32Array.from({ length: len }, () => Math.random() * 2 - 1);
const a = rand(m * k), c = new Float32Array(m * n);
const w = s.packGemmWeights(rand(k * n), k, n, 'auto');
const opts = { m, k, n, lda: k, ldc: n, activation: 0, alpha: 0, beta: 0, residualBeforeActivation: false, threads, variant: 'auto' };
for (let i = 0; i < 5; i++) await s.gemm(a, w, c, opts);
const modes = {
  'back to back': async () => {},
  'after idle gap': () => new Promise((r) => setTimeout(r, gap)),
  'after busy gap': async () => { const end = performance.now() + gap; while (performance.now() < end); },
};
const times = Object.fromEntries(Object.keys(modes).map((x) => [x, []]));
for (let r = 0; r < rounds; r++) {
  for (const [name, before] of Object.entries(modes)) {
    await before();
    const t0 = performance.now();
    await s.gemm(a, w, c, opts);
    times[name].push(performance.now() - t0);
  }
}
w.dispose();
const gflops = (ms) => (2 * m * k * n) / ms / 1e6;
console.log(`${m}x${k}x${n} on ${threads} thread(s), ${gap} ms gaps, ${rounds} rounds`);
for (const [name, ts] of Object.entries(times)) {
  ts.sort((x, y) => x - y);
  const med = ts[ts.length >> 1];
  console.log(`${name.padEnd(16)} median ${med.toFixed(3)} ms (${gflops(med).toFixed(1)} GFLOP/s), best ${ts[0].toFixed(3)}`);
}
