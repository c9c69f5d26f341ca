// Conv2d (ResNet-50 and MobileNetV2 layers at batch 8, and the convs at batch 1), pooling and SpMM on the GPU. Convs and SpMM report TFLOP/s
// against the measured ceilings (SIMT FMA for fp32, mma.sync for bf16) and the datasheet; pooling
// reports GB/s against the measured read bandwidth; sparse cases also give dense-equivalent TFLOP/s.
import { Tensor } from '../../dist/index.js';
import { GpuBuffer } from '../../dist/cuda/runtime.js';
import { createGpuConv2d, gpuGlobalAveragePool, gpuMaxPool2d, gpuPoolOutputShape } from '../../dist/cuda/conv.js';
import { gpuSpmm, gpuToSparse } from '../../dist/cuda/sparse.js';
import { randomBuffer } from './common.js';

function randomTensor(dims, scale = 1) {
  const size = dims.reduce((a, b) => a * b, 1);
  const a = new Float32Array(size);
  for (let i = 0; i < size; i++) a[i] = (Math.random() * 2 - 1) * scale;
  return new Tensor('float32', a, dims);
}

// [name, cIn, H (= W), cOut, k, stride, depthwise]: ResNet-50's stem and one conv of each stage's
// bottleneck (1x1s at both ends of the grid sizes), then MobileNetV2's expand (pointwise), depthwise
// and project convs at its widest and smallest planes.
const RESNET50 = [
  ['conv1 7x7/2', 3, 224, 64, 7, 2],
  ['layer1 1x1 64->256', 64, 56, 256, 1, 1],
  ['layer1 3x3', 64, 56, 64, 3, 1],
  ['layer2 3x3', 128, 28, 128, 3, 1],
  ['layer3 1x1 256->1024', 256, 14, 1024, 1, 1],
  ['layer4 3x3', 512, 7, 512, 3, 1],
  ['layer4 1x1 512->2048', 512, 7, 2048, 1, 1],
  ['mbv2 expand 1x1 24->144', 24, 56, 144, 1, 1],
  ['mbv2 depthwise 3x3 144', 144, 56, 144, 3, 1, true],
  ['mbv2 depthwise 3x3/2 144', 144, 56, 144, 3, 2, true],
  ['mbv2 project 1x1 960->160', 960, 7, 160, 1, 1],
  ['mbv2 depthwise 3x3 960', 960, 7, 960, 3, 1, true],
];

async function time(fn, reps) {
  await fn(0);
  return fn(reps);
}

export async function* convCases(env) {
  const { id, emulated, measured, sheet } = env;
  const batch = emulated ? 1 : 8, reps = emulated ? 1 : 20;
  const pct = (v, peak) => (peak ? 100 * v / peak : undefined);
  // Batch 8, then batch 1 (a service's single request: the grids that leave SMs idle).
  for (const [b, layers, pools] of emulated ? [[1, RESNET50, true]] : [[batch, RESNET50, true], [1, RESNET50.filter((l) => !l[6]), false]]) {
    yield* layerCases(env, b, layers, pools, reps, pct);
  }
  yield* poolAndSparseCases(env, batch, reps, pct);
}

async function* layerCases(env, batch, layers, pools, reps, pct) {
  const { id, emulated, measured, sheet } = env;
  for (const [name, cIn, hw0, cOut, k, stride, depthwise] of layers) {
    // The emulator runs the same layer shapes shrunk (channels / 16, planes / 8) to check the suite.
    const c = emulated ? Math.max(3, cIn >> 4) : cIn;
    const co = depthwise ? c : emulated ? Math.max(4, cOut >> 4) : cOut, group = depthwise ? c : 1;
    const hw = emulated ? Math.max(7, hw0 >> 3) : hw0;
    const dims = [batch, c, hw, hw];
    const x = await randomBuffer(id, dims.reduce((a, b) => a * b, 1));
    const pad = (k - 1) >> 1;
    for (const precision of ['fp32', 'bf16']) {
      if (precision === 'bf16' && !measured.mma) continue;
      const conv = await createGpuConv2d(id, randomTensor([co, c / group, k, k], 0.1), {
        strides: [stride, stride], pads: [pad, pad, pad, pad], activation: 'relu', bias: randomTensor([co]), precision, group,
      });
      const out = conv.outputShape(dims);
      const outSize = out.reduce((a, b) => a * b, 1);
      const y = GpuBuffer.alloc(id, outSize * 4);
      const ms = await time((r) => conv.run(x, dims, y, { reps: r }), reps);
      const tflops = 2 * outSize * (c / group) * k * k / ms / 1e9;
      const ceiling = precision === 'bf16' ? measured.mma : measured.fp32;
      // Depthwise convs are memory-bound: their GB/s (input and output once) against the read ceiling.
      const gbps = depthwise ? (dims.reduce((a, b) => a * b, 1) + outSize) * 4 / ms / 1e6 : undefined;
      yield {
        case: `conv ${name} ${precision} ${dims.join('x')} -> ${out.join('x')}`, ms, tflops,
        pctOfMeasured: depthwise ? undefined : pct(tflops, ceiling),
        pctOfDatasheet: depthwise ? undefined : pct(tflops, precision === 'bf16' ? sheet?.bf16 : sheet?.fp32),
        gbps, pctOfRead: depthwise ? pct(gbps, measured.gbps) : undefined,
      };
      y.dispose();
      conv.dispose();
    }
    if (pools && name.startsWith('conv1')) {
      // The stem's max pool 3x3/2 on its output: memory-bound.
      const pdims = [batch, co, (hw + 1) >> 1, (hw + 1) >> 1];
      const px = await randomBuffer(id, pdims.reduce((a, b) => a * b, 1));
      const win = { kernelShape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1] };
      const pout = gpuPoolOutputShape(pdims, win);
      const py = GpuBuffer.alloc(id, pout.reduce((a, b) => a * b, 1) * 4);
      const ms = await time((r) => gpuMaxPool2d(id, px, pdims, py, win, { reps: r }), reps);
      const gbps = (pdims.reduce((a, b) => a * b, 1) + pout.reduce((a, b) => a * b, 1)) * 4 / ms / 1e6;
      yield { case: `maxpool 3x3/2 ${pdims.join('x')}`, ms, gbps, pctOfRead: pct(gbps, measured.gbps) };
      px.dispose();
      py.dispose();
    }
    x.dispose();
  }
}

async function* poolAndSparseCases(env, batch, reps, pct) {
  const { id, emulated, measured } = env;
  {
    const gdims = emulated ? [1, 64, 7, 7] : [batch, 2048, 7, 7];
    const planes = gdims[0] * gdims[1];
    const gx = await randomBuffer(id, planes * 49), gy = GpuBuffer.alloc(id, planes * 4);
    const ms = await time((r) => gpuGlobalAveragePool(id, gx, gdims, gy, { reps: r }), reps);
    const gbps = planes * 50 * 4 / ms / 1e6;
    yield { case: `global average pool ${gdims.join('x')}`, ms, gbps, pctOfRead: pct(gbps, measured.gbps) };
    gx.dispose();
    gy.dispose();
  }
  // SpMM: 90%-sparse weights [K, N] = 4096 x 4096 times activations [M, K], M = 64 (and SpMV, M = 1).
  const kn = emulated ? 256 : 4096;
  const dense = randomTensor([kn, kn]);
  for (let i = 0; i < dense.data.length; i++) if (Math.random() >= 0.1) dense.data[i] = 0;
  // Block-pruned weights for BSR: whole 1 x 32 blocks kept with probability 0.1.
  const blocked = randomTensor([kn, kn]);
  for (let r = 0; r < kn; r++) {
    for (let p = 0; p < kn; p += 32) {
      if (Math.random() >= 0.1) blocked.data.fill(0, r * kn + p, r * kn + p + 32);
    }
  }
  for (const [format, weights] of [['csr', await gpuToSparse(id, dense)], ['bsr 1x32', await gpuToSparse(id, blocked, { format: 'bsr', blockShape: [1, 32] })]]) {
    for (const m of [64, 1]) {
      const a = await randomBuffer(id, m * kn), c = GpuBuffer.alloc(id, m * kn * 4);
      const ms = await time((r) => gpuSpmm(id, a, m, weights, c, { activation: 'relu', reps: r }), reps);
      const stored = format === 'csr' ? weights.nnz : weights.units * 32;
      const tflops = 2 * stored * m / ms / 1e9;
      // Bytes the kernel must move at least: the weights (value + index) once, a and c once.
      const bytes = (format === 'csr' ? weights.nnz * 8 : weights.units * (32 * 4 + 4)) + (m * kn * 2) * 4;
      yield {
        case: `spmm ${format} ${kn}x${kn} ${(100 * (1 - weights.nnz / (kn * kn))).toFixed(0)}% sparse, M=${m}`, ms, tflops,
        denseEquivTflops: 2 * kn * kn * m / ms / 1e9, gbps: bytes / ms / 1e6, pctOfRead: pct(bytes / ms / 1e6, measured.gbps),
      };
      a.dispose();
      c.dispose();
    }
    weights.dispose();
  }
}
