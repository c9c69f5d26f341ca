// node bench/quant-ab.js <before.node> [after.node] [--quick] [--prefill] [--moe]
// Two builds of the addon in one process (e.g. main's build/Release/sonde.node copied aside, and this
// tree's), timed call by call in alternation on the issue-8 matrix shapes, so that the ratio is
// measured under the same machine load: decode (M = 1, weights rotated over copies beyond the
// last-level cache: GB/s against the read bandwidth) and, with --prefill, M = 512 (GFLOP/s).
// The raw native quantMatmul is called, so both sides pay the same (small) call cost.
// --moe: instead, one MoE layer of the issue-8 model (d 1024, 8 experts of FFN 1408, top-2) through
// the native moe(): 1 token (decode) and 512 tokens (prefill).
import { createRequire } from 'node:module';
import { resolve } from 'node:path';
import { Tensor, kernels } from '../dist/index.js';

const require = createRequire(import.meta.url);
const args = process.argv.slice(2);
const quick = args.includes('--quick');
const prefill = args.includes('--prefill');
const paths = args.filter((a) => !a.startsWith('--'));
if (paths.length < 1) {
  console.error('usage: node bench/quant-ab.js <before.node> [after.node] [--quick] [--prefill]');
  process.exit(2);
}
const before = require(resolve(paths[0]));
const after = require(resolve(paths[1] ?? 'build/Release/sonde.node'));

const rand = (len) => {
  const a = new Float32Array(len);
  for (let i = 0; i < len; i++) a[i] = Math.random() * 2 - 1;
  return a;
};

async function alternate(fns, minMs) {
  for (const f of fns) await f();
  const times = fns.map(() => []);
  const start = performance.now();
  for (let r = 0; r < 2000 && (r < 9 || performance.now() - start < minMs); r++) {
    for (const i of (r % 2 ? [...fns.keys()].reverse() : [...fns.keys()])) {
      const t0 = performance.now();
      await fns[i]();
      times[i].push(performance.now() - t0);
    }
  }
  return times.map((t) => t.sort((a, b) => a - b)[Math.floor(t.length / 2)]);
}

const SHAPES = [
  ['attn 1024->1536', 1536, 1024],
  ['attn-ish 1024->3072', 3072, 1024],
  ['expert 1024->1408', 1408, 1024],
  ['expert 1408->1024', 1024, 1408],
  ['vocab 1024->32000', 32000, 1024],
];

if (args.includes('--moe')) {
  const [d, ff, experts, k] = [1024, 1408, 8, 2];
  for (const type of ['q8_0', 'f16']) {
    const q = (rows, cols, scale) => kernels.quantizeWeights(new Tensor('float32', rand(rows * cols).map((v) => v * scale), [rows, cols]), type).data;
    const stack = (rows, cols, scale) => {
      const parts = Array.from({ length: experts }, () => q(rows, cols, scale));
      const all = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
      parts.forEach((p, i) => all.set(p, i * p.length));
      return { ref: all, index: 0, type };
    };
    const spec = {
      dModel: d, nExperts: experts, k, dFf: ff, scoring: 'softmax', renormalize: true, weightScale: 1, variant: 'auto',
      router: { ref: q(experts, d, 1 / 32), index: 0, type }, gate: stack(ff, d, 1 / 32), up: stack(ff, d, 1 / 32),
      down: stack(d, ff, 1 / 38), capacityFactor: 0,
    };
    for (const tokens of [1, 512]) {
      const x = rand(tokens * d);
      const out = new Float32Array(tokens * d);
      for (const threads of [1, 2]) {
        const call = (lib) => lib.moe(x, out, { ...spec, tokens, threads });
        const [msA, msB] = await alternate([() => call(before), () => call(after)], quick ? 300 : 1000);
        console.log(`moe ${type} tokens=${tokens} t${threads}: before ${msA.toFixed(3)} ms, after ${msB.toFixed(3)} ms, after/before speed x${(msA / msB).toFixed(2)}`);
      }
    }
  }
  process.exit(0);
}

for (const t of [1, 2]) {
  const r = await after.readBandwidth(quick ? 128 << 20 : 512 << 20, t);
  console.log(`read bandwidth t${t}: ${(r.bytes / r.seconds / 1e9).toFixed(1)} GB/s`);
}
for (const [name, n, k] of SHAPES) {
  const wf = new Tensor('float32', rand(n * k), [n, k]);
  for (const type of ['q8_0', 'f16']) {
    const w0 = kernels.quantizeWeights(wf, type).data;
    const m = prefill ? 512 : 1;
    const copies = prefill ? 1 : Math.max(1, Math.ceil((256 << 20) / w0.length));
    const ws = [w0, ...Array.from({ length: copies - 1 }, () => w0.slice())];
    const x = rand(m * k);
    const out = new Float32Array(m * n);
    for (const threads of [1, 2]) {
      let ca = 0;
      let cb = 0;
      const call = (lib, w) => lib.quantMatmul(x, w, 0, out, { m, k, n, type, variant: 'auto', threads });
      const [msA, msB] = await alternate([() => call(before, ws[ca++ % ws.length]), () => call(after, ws[cb++ % ws.length])],
        quick ? 200 : 800);
      const unit = prefill ? (ms) => `${(2 * m * n * k / ms / 1e6).toFixed(1)} GFLOP/s` : (ms) => `${(w0.length / ms / 1e6).toFixed(1)} GB/s`;
      console.log(`${prefill ? 'prefill M=512' : 'decode'} ${type} ${name} t${threads}: before ${(msA * 1000).toFixed(0)} us ${unit(msA)}, after ${(msB * 1000).toFixed(0)} us ${unit(msB)}, after/before speed x${(msA / msB).toFixed(2)}`);
    }
  }
}
