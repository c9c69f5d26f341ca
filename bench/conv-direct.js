// node bench/conv-direct.js [threads=1] [filter] [batch=1]
// The direct NCHW16c path against the im2col + GEMM path and onnxruntime-node on the ResNet-50 and
// MobileNetV2 convolutions it can run (C_in a multiple of 16, or the 3-channel stems on the NCHW
// input variant; stride 1 or 2), bias + ReLU fused,
// interleaved call by call in one process (SONDE_CONV_DIRECT forces the path at creation). Prints
// median ms of each and the ratios of the medians and, in brackets, of the best calls (less
// disturbed on a loaded machine); checks the two sonde paths agree first.
import { Tensor, kernels } from '../dist/index.js';
import * as onnxruntime from './anchors/onnxruntime.js';

const threads = Number(process.argv[2] ?? 1);
const filter = process.argv[3] ?? '';
const n = Number(process.argv[4] ?? 1);
// [name, C_in, H (= W), C_out, k, stride]
const shapes = [
  ['r50 conv1 7x7/2 3-64', 3, 224, 64, 7, 2], ['mv2 conv 3x3/2 3-32', 3, 224, 32, 3, 2],
  ['r50 56 1x1 64-64', 64, 56, 64, 1, 1], ['r50 56 3x3 64', 64, 56, 64, 3, 1], ['r50 56 1x1 64-256', 64, 56, 256, 1, 1],
  ['r50 56 1x1 256-64', 256, 56, 64, 1, 1], ['r50 56 1x1 256-128', 256, 56, 128, 1, 1], ['r50 56 3x3/2 128', 128, 56, 128, 3, 2],
  ['r50 56 1x1/2 256-512', 256, 56, 512, 1, 2], ['r50 28 3x3 128', 128, 28, 128, 3, 1], ['r50 28 1x1 128-512', 128, 28, 512, 1, 1],
  ['r50 28 1x1 512-128', 512, 28, 128, 1, 1], ['r50 28 1x1 512-256', 512, 28, 256, 1, 1], ['r50 28 3x3/2 256', 256, 28, 256, 3, 2],
  ['r50 28 1x1/2 512-1024', 512, 28, 1024, 1, 2], ['r50 14 3x3 256', 256, 14, 256, 3, 1], ['r50 14 1x1 256-1024', 256, 14, 1024, 1, 1],
  ['r50 14 1x1 1024-256', 1024, 14, 256, 1, 1], ['r50 14 1x1 1024-512', 1024, 14, 512, 1, 1], ['r50 14 3x3/2 512', 512, 14, 512, 3, 2],
  ['r50 14 1x1/2 1024-2048', 1024, 14, 2048, 1, 2], ['r50 7 3x3 512', 512, 7, 512, 3, 1], ['r50 7 1x1 512-2048', 512, 7, 2048, 1, 1],
  ['r50 7 1x1 2048-512', 2048, 7, 512, 1, 1],
  ['mv2 112 1x1 32-16', 32, 112, 16, 1, 1], ['mv2 112 1x1 16-96', 16, 112, 96, 1, 1], ['mv2 56 1x1 96-24', 96, 56, 24, 1, 1],
  ['mv2 56 1x1 144-24', 144, 56, 24, 1, 1], ['mv2 28 1x1 144-32', 144, 28, 32, 1, 1], ['mv2 28 1x1 32-192', 32, 28, 192, 1, 1],
  ['mv2 28 1x1 192-32', 192, 28, 32, 1, 1], ['mv2 14 1x1 192-64', 192, 14, 64, 1, 1], ['mv2 14 1x1 64-384', 64, 14, 384, 1, 1],
  ['mv2 14 1x1 384-64', 384, 14, 64, 1, 1], ['mv2 14 1x1 384-96', 384, 14, 96, 1, 1], ['mv2 14 1x1 96-576', 96, 14, 576, 1, 1],
  ['mv2 14 1x1 576-96', 576, 14, 96, 1, 1], ['mv2 7 1x1 576-160', 576, 7, 160, 1, 1], ['mv2 7 1x1 160-960', 160, 7, 960, 1, 1],
  ['mv2 7 1x1 960-160', 960, 7, 160, 1, 1], ['mv2 7 1x1 960-320', 960, 7, 320, 1, 1], ['mv2 7 1x1 320-1280', 320, 7, 1280, 1, 1],
];
const rand = (len) => Float32Array.from({ length: len }, () => Math.random() * 2 - 1);
const median = (t) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)];

function create(direct, w, wDims, b, geo) {
  process.env.SONDE_CONV_DIRECT = direct ? '1' : '0';
  try {
    return kernels.createConv2d(new Tensor('float32', w, wDims), { ...geo, bias: new Tensor('float32', b, [wDims[0]]), activation: 'relu' });
  } finally {
    delete process.env.SONDE_CONV_DIRECT;
  }
}

console.log(`threads ${threads}, batch ${n}; ratio = other ms / direct ms`);
console.log('case | direct ms | gemm ms | ort ms | vs gemm (best) | vs ort (best) | direct GFLOP/s (best)');
for (const [name, cin, hw, cout, k, stride] of shapes) {
  if (!name.includes(filter)) continue;
  const pad = Math.floor(k / 2);
  const xDims = [n, cin, hw, hw], wDims = [cout, cin, k, k];
  const w = rand(cout * cin * k * k), b = rand(cout), x = rand(n * cin * hw * hw);
  const geo = { strides: [stride, stride], pads: [pad, pad, pad, pad] };
  const direct = create(true, w, wDims, b, geo), gemm = create(false, w, wDims, b, geo);
  if (direct.path !== 'direct') { console.log(`${name}: direct path not taken (${direct.path})`); continue; }
  const X = new Tensor('float32', x, xDims);
  const want = (await gemm.run(X, { threads })).data, got = (await direct.run(X, { threads })).data;
  const kk = cin * k * k, bound = 2 * (kk + 2) * 2 ** -24 * (kk + 1);
  for (let i = 0; i < got.length; i++) {
    if (!(Math.abs(got[i] - want[i]) <= bound)) throw new Error(`${name}: direct y[${i}] = ${got[i]}, gemm ${want[i]}`);
  }
  const ort = await onnxruntime.prepareConv(xDims, wDims, w, b, { threads, relu: true, ...geo });
  const dims = direct.outputShape(xDims);
  const outA = new Tensor('float32', new Float32Array(got.length), dims), outB = new Tensor('float32', new Float32Array(got.length), dims);
  const fns = [() => direct.run(X, { threads, out: outA }), () => gemm.run(X, { threads, out: outB }), () => ort.run(x)];
  for (const f of fns) await f();
  const times = fns.map(() => []);
  const start = performance.now();
  for (let r = 0; r < 200 && (r < 9 || performance.now() - start < 600); r++) {
    for (const i of r % 2 ? [2, 1, 0] : [0, 1, 2]) {
      const t0 = performance.now();
      await fns[i]();
      times[i].push(performance.now() - t0);
    }
  }
  const [d, g, o] = times.map(median);
  const [db, gb, ob] = times.map((t) => Math.min(...t));
  const flops = 2 * n * cout * dims[2] * dims[3] * kk;
  console.log(`${name} | ${d.toFixed(3)} | ${g.toFixed(3)} | ${o.toFixed(3)} | ${(g / d).toFixed(2)} (${(gb / db).toFixed(2)}) | ` +
    `${(o / d).toFixed(2)} (${(ob / db).toFixed(2)}) | ${(flops / d / 1e6).toFixed(0)} (${(flops / db / 1e6).toFixed(0)})`);
  direct.dispose();
  gemm.dispose();
  await ort.release();
}
