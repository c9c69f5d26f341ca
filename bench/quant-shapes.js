// node bench/quant-shapes.js [decode] [prefill] [threshold] [--quick]
// kernels.quantMatmul on the per-matrix shapes of the issue-8 model (hidden 1024, 16 heads, 4 KV
// heads, experts of FFN 1408, a 32000-token vocabulary), F16 and Q8_0, 1 and 2 threads:
// - decode (M = 1): GB/s of the weights read, over copies beyond the last-level cache, against the
//   read bandwidth the `peak` suite measures (same process), and the per-call overhead of the JS
//   API (a 1 x 32 x 32 product) so kernel time can be told apart from call cost;
// - prefill (M = 512): GFLOP/s of the blocked GEMM against the row-dot (GEMV) kernels, interleaved,
//   so the ratio is measured on the same machine state;
// - threshold: ms of both algorithms for small M, to place the GEMM threshold.
import { Tensor, getThreads, kernels } from '../dist/index.js';
import { native } from '../dist/binding.js';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const parts = args.filter((a) => !a.startsWith('--'));
const want = (p) => parts.length === 0 || parts.includes(p);
const threadCounts = [...new Set([1, Math.min(2, getThreads())])];

const rand = (len) => {
  const a = new Float32Array(len);
  for (let i = 0; i < len; i++) a[i] = Math.random() * 2 - 1;
  return a;
};

async function median(fn, { minRounds = quick ? 3 : 7, minMs = quick ? 150 : 500 } = {}) {
  await fn();
  const t = [];
  const start = performance.now();
  while (t.length < minRounds || performance.now() - start < minMs) {
    const t0 = performance.now();
    await fn();
    t.push(performance.now() - t0);
    if (t.length >= 400) break;
  }
  return t.sort((a, b) => a - b)[Math.floor(t.length / 2)];
}

/** ms of each function, interleaved round by round (same machine state for both). */
async function interleaved(fns, rounds = quick ? 3 : 7) {
  for (const f of fns) await f();
  const times = fns.map(() => []);
  for (let r = 0; r < rounds; r++) {
    for (const i of (r % 2 ? [...fns.keys()].reverse() : [...fns.keys()])) {
      const t0 = performance.now();
      await fns[i]();
      times[i].push(performance.now() - t0);
    }
  }
  return times.map((t) => t.sort((a, b) => a - b)[Math.floor(t.length / 2)]);
}

const SHAPES = [
  ['attn qkv 1024->1536', 1536, 1024],
  ['attn-ish 1024->3072', 3072, 1024],
  ['expert gate/up 1024->1408', 1408, 1024],
  ['expert down 1408->1024', 1024, 1408],
  ['vocab 1024->32000', 32000, 1024],
];
const TYPES = ['q8_0', 'f16'];

if (want('decode')) {
  const bw = {};
  for (const t of threadCounts) {
    const r = await native().readBandwidth(quick ? 128 << 20 : 512 << 20, t);
    bw[t] = r.bytes / r.seconds / 1e9;
  }
  const tiny = kernels.quantizeWeights(new Tensor('float32', rand(32 * 32), [32, 32]), 'q8_0');
  const tx = new Tensor('float32', rand(32), [1, 32]);
  const overhead = await median(() => kernels.quantMatmul(tx, tiny, { threads: 1 }));
  console.log(`read bandwidth: ${threadCounts.map((t) => `t${t} ${bw[t].toFixed(1)} GB/s`).join(', ')}; per-call overhead ${(overhead * 1000).toFixed(1)} us`);
  for (const [name, n, k] of SHAPES) {
    const wf = new Tensor('float32', rand(n * k), [n, k]);
    const x = new Tensor('float32', rand(k), [1, k]);
    for (const type of TYPES) {
      const w0 = kernels.quantizeWeights(wf, type);
      const copies = Math.max(1, Math.ceil((256 << 20) / w0.bytes));
      const ws = [w0, ...Array.from({ length: copies - 1 }, () => new kernels.QuantizedWeights(type, n, k, w0.data.slice()))];
      for (const t of threadCounts) {
        let c = 0;
        const ms = await median(() => kernels.quantMatmul(x, ws[c++ % ws.length], { threads: t }));
        const gbps = w0.bytes / ms / 1e6;
        const kernelGbps = w0.bytes / Math.max(1e-6, ms - overhead) / 1e6;
        console.log(`decode ${type} ${name} t${t}: ${(ms * 1000).toFixed(0)} us, ${gbps.toFixed(1)} GB/s (${(100 * gbps / bw[t]).toFixed(0)}% of read bw; less the call overhead ${kernelGbps.toFixed(1)} GB/s, ${(100 * kernelGbps / bw[t]).toFixed(0)}%)`);
      }
    }
  }
}

if (want('prefill')) {
  const m = 512;
  for (const [name, n, k] of SHAPES) {
    if (n > 4096 && quick) continue;
    const wf = new Tensor('float32', rand(n * k), [n, k]);
    const x = new Tensor('float32', rand(m * k), [m, k]);
    for (const type of TYPES) {
      const w = kernels.quantizeWeights(wf, type);
      for (const t of threadCounts) {
        const [gemv, gemm] = await interleaved([
          () => kernels.quantMatmul(x, w, { threads: t, algorithm: 'gemv' }),
          () => kernels.quantMatmul(x, w, { threads: t, algorithm: 'auto' }),
        ]);
        const gf = (ms) => (2 * m * n * k / ms / 1e6).toFixed(1);
        console.log(`prefill ${type} M=${m} ${name} t${t}: gemv ${gemv.toFixed(1)} ms ${gf(gemv)} GFLOP/s, auto ${gemm.toFixed(1)} ms ${gf(gemm)} GFLOP/s, x${(gemv / gemm).toFixed(2)}`);
      }
    }
  }
}

if (want('threshold')) {
  const [n, k] = [1408, 1024];
  const wf = new Tensor('float32', rand(n * k), [n, k]);
  for (const type of TYPES) {
    const w = kernels.quantizeWeights(wf, type);
    for (const m of [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]) {
      const x = new Tensor('float32', rand(m * k), [m, k]);
      const [gemv, gemm] = await interleaved([
        () => kernels.quantMatmul(x, w, { threads: 1, algorithm: 'gemv' }),
        () => kernels.quantMatmul(x, w, { threads: 1, algorithm: 'gemm' }),
      ], quick ? 5 : 15);
      console.log(`threshold ${type} ${n}x${k} M=${m} t1: gemv ${(gemv * 1000).toFixed(0)} us, gemm ${(gemm * 1000).toFixed(0)} us, gemv/gemm ${(gemv / gemm).toFixed(2)}`);
    }
  }
}
