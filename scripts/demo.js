// npm run demo: what this machine offers, then a GEMM run off the event loop, checked against the
// reference kernel.
import { devices, kernels, Tensor } from '../dist/index.js';

const d = devices();
console.log('CPU :', `${d.cpu.model} (${d.cpu.arch}), ${d.cpu.cores} cores, SIMD ${d.cpu.simd}`);
console.log('      features:', d.cpu.features.join(' '));
if (d.cuda.devices.length) {
  for (const g of d.cuda.devices) console.log(`CUDA: ${g.id} ${g.name}, sm ${g.computeCapability}, ${(g.totalMemory / 2 ** 30).toFixed(1)} GiB`);
} else {
  console.log('CUDA:', d.cuda.compiled ? 'compiled in; no device:' : 'not compiled in:', d.cuda.reason);
}

const [m, k, n] = [512, 1024, 1024];
const rand = (len) => Float32Array.from({ length: len }, () => Math.random() * 2 - 1);
const a = new Tensor('float32', rand(m * k), [m, k]);
const b = new Tensor('float32', rand(k * n), [k, n]);
const bias = new Tensor('float32', rand(n), [n]);
const packed = kernels.packGemmWeights(b);
let ticks = 0;
const timer = setInterval(() => ticks++, 1);
const reps = 20;
const t0 = performance.now();
let c;
for (let i = 0; i < reps; i++) c = await kernels.gemm(a, packed, { bias, activation: 'relu' });
const ms = (performance.now() - t0) / reps;
clearInterval(timer);
const ref = await kernels.gemm(a, b, { bias, activation: 'relu', variant: 'reference' });
let maxErr = 0;
for (let i = 0; i < c.size; i++) maxErr = Math.max(maxErr, Math.abs(c.data[i] - ref.data[i]));
console.log(`GEMM: ${m}x${k}x${n} f32 + bias + relu with ${packed.ukernel}: ${ms.toFixed(2)} ms, ` +
  `${((2 * m * n * k) / ms / 1e6).toFixed(1)} GFLOP/s; max |error| vs reference ${maxErr.toExponential(2)}; ` +
  `event loop ticked ${ticks} times meanwhile`);
packed.dispose();
if (!(maxErr < 1e-3)) {
  console.error('GEMM result does not match the reference');
  process.exit(1);
}

// The same layer with weights stored in low precision: speed and error against the fp32 result.
const fp32 = await kernels.gemm(a, b, { bias });
let norm = 0;
for (const v of fp32.data) norm = Math.max(norm, Math.abs(v));
for (const precision of ['fp32', 'bf16', 'fp16', 'int8']) {
  const w = kernels.packGemmWeights(b, { precision });
  await kernels.gemm(a, w, { bias });
  const t = performance.now();
  let out;
  for (let i = 0; i < reps; i++) out = await kernels.gemm(a, w, { bias });
  const msP = (performance.now() - t) / reps;
  let err = 0;
  for (let i = 0; i < out.size; i++) err = Math.max(err, Math.abs(out.data[i] - fp32.data[i]));
  console.log(`  ${precision.padEnd(5)} weights (${(w.bytes / 2 ** 20).toFixed(1)} MiB, ${w.ukernel}): ${msP.toFixed(2)} ms, ` +
    `${((2 * m * n * k) / msP / 1e6).toFixed(1)} GFLOP/s, max |error| vs fp32 ${(err / norm).toExponential(1)} of max |C|`);
  w.dispose();
}
