// Focused SpMM timing (issue 6): sonde's dense GEMM against SpMM on the same pruned weights,
// interleaved call by call, preallocated outputs, min and median of each. Short on purpose: the
// machine is shared. node bench/sparse-focus.js [m ...] [--sparsity 0.9] [--threads 1] [--variant avx2,avx512]
import { Tensor, kernels } from '../dist/index.js';

const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(`--${name}`); return i >= 0 ? args.splice(i, 2)[1] : dflt; };
const sparsity = Number(opt('sparsity', '0.9'));
const threads = Number(opt('threads', '1'));
const variants = opt('variant', 'auto').split(',');
const shape = opt('shape', '1024x1024').split('x').map(Number);
const ms = args.length ? args.map(Number) : [1, 8, 32, 64, 256];
const [n, k] = shape;

let seed = 7;
const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed / 2 ** 32; };
const b = new Float32Array(k * n).map(() => (rnd() < sparsity ? 0 : rnd() - 0.5));
const B = new Tensor('float32', b, [k, n]);
const dense = kernels.packGemmWeights(B);
const w = kernels.toSparse(B, { format: 'csr' });

for (const m of ms) {
  const a = new Tensor('float32', new Float32Array(m * k).map(() => rnd()), [m, k]);
  const out = new Tensor('float32', new Float32Array(m * n), [m, n]);
  const fns = [['dense', () => kernels.gemm(a, dense, { threads, out })],
    ...variants.map((v) => [`spmm ${v}`, () => kernels.spmm(a, w, { threads, out, variant: v })])];
  const times = fns.map(() => []);
  for (const [, f] of fns) await f();
  const t0 = performance.now();
  for (let r = 0; r < 400 && performance.now() - t0 < 1500; r++) {
    for (let i = 0; i < fns.length; i++) {
      const s = performance.now();
      await fns[i][1]();
      times[i].push(performance.now() - s);
    }
  }
  const stat = times.map((t) => { t.sort((x, y) => x - y); return { min: t[0], med: t[t.length >> 1] }; });
  const line = fns.map(([name], i) => `${name} ${stat[i].min.toFixed(3)}/${stat[i].med.toFixed(3)}` +
    (i ? ` (x${(stat[0].min / stat[i].min).toFixed(2)}/${(stat[0].med / stat[i].med).toFixed(2)})` : '')).join('  ');
  console.log(`${n}x${k} ${Math.round(sparsity * 100)}% m${m} t${threads} min/med ms: ${line}`);
}
dense.dispose();
w.dispose();
