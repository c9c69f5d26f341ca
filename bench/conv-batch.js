// node bench/conv-batch.js [threads=1] [reps=5]
// Per-image cost of single convolutions shaped like MobileNetV2 / ResNet-50 layers at batch 1 and 8:
// a batch-N run should cost at most N times a batch-1 run. Reports the median wall time and process
// CPU time per image (CPU time is less disturbed by a shared machine; run with SONDE_SPIN_US=0).
import { Tensor, kernels } from '../dist/index.js';

const threads = Number(process.argv[2] ?? 1), reps = Number(process.argv[3] ?? 5);
const layers = [
  // name, cin, cout, k, stride, hw, group
  ['mnv2 conv0 3x3s2 3->32 @224', 3, 32, 3, 2, 224, 1],
  ['mnv2 dw 32 @112', 32, 32, 3, 1, 112, 32],
  ['mnv2 1x1 32->16 @112', 32, 16, 1, 1, 112, 1],
  ['mnv2 1x1 16->96 @112', 16, 96, 1, 1, 112, 1],
  ['mnv2 dw 96 s2 @112', 96, 96, 3, 2, 112, 96],
  ['mnv2 1x1 96->24 @56', 96, 24, 1, 1, 56, 1],
  ['mnv2 1x1 64->384 @14', 64, 384, 1, 1, 14, 1],
  ['mnv2 1x1 960->160 @7', 960, 160, 1, 1, 7, 1],
  ['r50 3x3 64 @56', 64, 64, 3, 1, 56, 1],
  ['r50 1x1 256->64 @56', 256, 64, 1, 1, 56, 1],
  ['r50 3x3 256 @14', 256, 256, 3, 1, 14, 1],
  ['r50 1x1 1024->256 @14', 1024, 256, 1, 1, 14, 1],
  ['r50 3x3 512 @7', 512, 512, 3, 1, 7, 1],
];
const rnd = (n) => { const a = new Float32Array(n); for (let i = 0; i < n; i++) a[i] = Math.random() - 0.5; return a; };
const median = (t) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)];
const filter = process.argv[4];
for (const [name, cin, cout, k, s, hw, group] of layers) {
  if (filter && !name.includes(filter)) continue;
  const w = new Tensor('float32', rnd(cout * (cin / group) * k * k), [cout, cin / group, k, k]);
  const conv = await kernels.createConv2d(w, { strides: [s, s], pads: Array(4).fill((k - 1) >> 1), group,
    bias: new Tensor('float32', rnd(cout), [cout]), activation: 'relu6' });
  const res = {};
  for (const n of [1, 8]) {
    const x = new Tensor('float32', rnd(n * cin * hw * hw), [n, cin, hw, hw]);
    const dims = conv.outputShape(x.dims);
    const out = new Tensor('float32', new Float32Array(dims.reduce((a, b) => a * b)), dims);
    const inner = Math.max(1, Math.round(8 / n));
    for (let i = 0; i < 2; i++) await conv.run(x, { out, threads });
    const wall = [], cpu = [];
    for (let r = 0; r < reps; r++) {
      const c0 = process.cpuUsage(), t0 = performance.now();
      for (let i = 0; i < inner; i++) await conv.run(x, { out, threads });
      wall.push((performance.now() - t0) / inner / n);
      const c = process.cpuUsage(c0);
      cpu.push((c.user + c.system) / 1e3 / inner / n);
    }
    res[n] = { wall: median(wall), cpu: median(cpu) };
  }
  console.log(`${name.padEnd(30)} ${conv.path.padEnd(9)} per image ms: n1 wall ${res[1].wall.toFixed(3)} cpu ${res[1].cpu.toFixed(3)} | ` +
    `n8 wall ${res[8].wall.toFixed(3)} cpu ${res[8].cpu.toFixed(3)} | n8/n1 cpu ${(res[8].cpu / res[1].cpu).toFixed(2)}`);
  conv.dispose();
}
