// GPU Conv2d (implicit GEMM: SIMT fp32, SIMT and mma.sync bf16; the depthwise direct kernel) and
// pooling against the CPU kernels (sonde.kernels.conv2d / maxPool2d / averagePool2d /
// globalAveragePool, themselves tested against scalar loops), on the tile edges of the GPU kernels:
// 64 x 64 (SIMT, mma) and 64 x 128 (mma) blocks, the pipelined mma kernel's 128 x 128 blocks and
// K splits, K steps of 16 (SIMT) and 32 (mma), 32 x 32 depthwise tiles, plus odd planes, batch 1 and 3, every window feature and every epilogue.
import { expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, Tensor, kernels } from '../../dist/index.js';
import { runGpuOp } from '../../dist/cuda/runtime.js';
import {
  createGpuConv2d, gpuAveragePool2d, gpuGlobalAveragePool, gpuMaxPool2d, gpuPoolOutputShape, type GpuConv2dOptions,
} from '../../dist/cuda/conv.js';
import { randomF32 } from '../helpers.js';
import { describeGpu, gpuBuffers } from './targets.js';

interface ConvCase {
  name: string;
  x: [number, number, number, number];
  cOut: number;
  k: [number, number];
  opts: GpuConv2dOptions;
  residual?: 'after' | 'before';
}

const CASES: ConvCase[] = [
  { name: '1x1, batch 1', x: [1, 3, 5, 7], cOut: 4, k: [1, 1], opts: {} },
  { name: '1x1, K = 33 (a K step plus one), 65 channels (a channel tile plus one)', x: [1, 33, 3, 5], cOut: 65, k: [1, 1], opts: { activation: 'relu6' } },
  { name: '3x3 stride 2 pad 1, batch 3, 63 channels', x: [3, 5, 9, 11], cOut: 63, k: [3, 3], opts: { strides: [2, 2], pads: [1, 1, 1, 1], activation: 'relu' }, residual: 'before' },
  { name: '3x3 dilation 2, 65 pixels (a pixel tile plus one)', x: [1, 4, 9, 9], cOut: 7, k: [3, 3], opts: { dilations: [2, 2], pads: [1, 0, 1, 1], activation: 'silu' }, residual: 'after' },
  { name: '3x3, 130 channels (the 128-channel mma tile plus two), batch 2', x: [2, 9, 20, 26], cOut: 130, k: [3, 3], opts: { pads: [1, 1, 1, 1], activation: 'relu' }, residual: 'after' },
  { name: '3x5 groups 2, asymmetric stride and pads', x: [1, 6, 12, 13], cOut: 8, k: [3, 5], opts: { group: 2, strides: [1, 2], pads: [1, 2, 0, 1], activation: 'hardSwish' } },
  { name: 'SAME_UPPER, K = 16 (one SIMT step), 64 pixels', x: [1, 16, 8, 8], cOut: 16, k: [1, 1], opts: { autoPad: 'SAME_UPPER', activation: 'sigmoid' } },
  { name: 'SAME_LOWER 4x4 stride 2, K = 32 (one mma step)', x: [2, 2, 7, 10], cOut: 5, k: [4, 4], opts: { autoPad: 'SAME_LOWER', strides: [2, 2], activation: 'leakyRelu', alpha: 0.2 } },
  { name: 'depthwise 3x3, batch 3, odd plane', x: [3, 6, 7, 9], cOut: 6, k: [3, 3], opts: { group: 6, pads: [1, 1, 1, 1], activation: 'clip', clipMin: -0.25, clipMax: 0.5 }, residual: 'after' },
  { name: 'depthwise 5x5 dilation 2 on a 33 x 34 plane (a 32 x 32 tile plus one or two)', x: [1, 3, 33, 34], cOut: 3, k: [5, 5], opts: { group: 3, dilations: [2, 2], pads: [4, 4, 4, 4], activation: 'relu' } },
  { name: 'depthwise stride 2 with channel multiplier 2', x: [1, 4, 9, 8], cOut: 8, k: [3, 3], opts: { group: 4, strides: [2, 2], pads: [1, 1, 1, 1], activation: 'geluTanh' } },
  { name: '7x7 stride 2 stem, 65 output columns', x: [1, 3, 20, 130], cOut: 9, k: [7, 7], opts: { strides: [2, 2], pads: [3, 3, 3, 3], activation: 'gelu' } },
  // K % 8 == 0: the pipelined mma kernel, 128 x 128 blocks (over 64 channels) or 256 x 64, K tiles
  // of 32, A copied by cp.async for unpadded stride-1 1x1s over planes of 4k pixels, gathered otherwise.
  { name: 'pipelined copied A: 1x1, K = 24 (under one K tile), 129 channels, batch 3, 6x6', x: [3, 24, 6, 6], cOut: 129, k: [1, 1], opts: { activation: 'relu' }, residual: 'after' },
  { name: 'pipelined copied A: 1x1, K = 40, 132 pixels (a pixel tile plus 4)', x: [1, 40, 12, 11], cOut: 7, k: [1, 1], opts: { activation: 'hardSwish' }, residual: 'before' },
  { name: 'pipelined gathered A: 1x1 on a 5x5 plane (25 pixels, not 4k), K = 8', x: [2, 8, 5, 5], cOut: 3, k: [1, 1], opts: {} },
  { name: 'pipelined gathered A: 1x1 stride 2 (a downsample), K = 16', x: [1, 16, 9, 9], cOut: 17, k: [1, 1], opts: { strides: [2, 2] } },
  { name: 'pipelined gathered A: 3x3 pad 1, K = 72 (2 tiles + 8), batch 3, 300 pixels', x: [3, 8, 10, 10], cOut: 20, k: [3, 3], opts: { pads: [1, 1, 1, 1], activation: 'silu' }, residual: 'before' },
  { name: 'pipelined gathered A, 128 x 128 blocks: 3x3 pad 1, 72 channels, batch 2', x: [2, 8, 7, 9], cOut: 72, k: [3, 3], opts: { pads: [1, 1, 1, 1], activation: 'geluTanh' }, residual: 'after' },
  { name: 'pipelined gathered A: 3x3 groups 2 of 8 channels, dilation 2', x: [1, 16, 9, 8], cOut: 12, k: [3, 3], opts: { group: 2, dilations: [2, 2], pads: [2, 2, 2, 1], activation: 'clip', clipMin: -0.5, clipMax: 0.75 } },
  { name: 'pipelined, K = 576 (18 K tiles: split K on a one-block grid), 3x3 stride 2', x: [1, 64, 9, 9], cOut: 16, k: [3, 3], opts: { strides: [2, 2], pads: [1, 1, 1, 1], activation: 'leakyRelu', alpha: 0.1 }, residual: 'after' },
];

const U = 2 ** -24;

function roundBf16(x: Float32Array): Float32Array {
  const out = new Float32Array(x);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) bits[i] = ((bits[i]! + 0x7fff + ((bits[i]! >>> 16) & 1)) & 0xffff0000) >>> 0;
  return out;
}

/** got vs want within (K + 2) u * sum|terms| (any summation order), scaled by 4 for the epilogue's own rounding. */
function expectConvClose(got: Float32Array, want: Float32Array, mag: Float32Array, k: number, what: string): void {
  expect(got.length, what).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    const w = want[i]!, g = got[i]!;
    const bound = 4 * (k + 2) * U * mag[i]! + 2e-6 * (1 + Math.abs(w));
    if (!(Math.abs(g - w) <= bound)) expect(g, `${what}[${i}] (bound ${bound})`).toBe(w);
  }
}

describeGpu('GPU conv2d and pooling', (t) => {
  const { up, alloc } = gpuBuffers(t);

  // bf16: tensor cores forced (simt: false), the SIMT kernel forced, and the default's choice
  // between them (the SIMT kernel where the tensor-core grid is small).
  for (const [mode, extra] of [['fp32', {}], ['bf16 mma', { precision: 'bf16', simt: false }], ['bf16 simt', { precision: 'bf16', simt: true }],
    ['bf16 auto', { precision: 'bf16' }]] as const) {
    it(`conv2d ${mode} matches the CPU conv on every case`, async () => {
      let seed = 11;
      for (const c of CASES) {
        const [n, cIn, h, w] = c.x;
        const group = c.opts.group ?? 1;
        const wDims = [c.cOut, cIn / group, c.k[0], c.k[1]];
        const kk = wDims[1]! * wDims[2]! * wDims[3]!;
        let xData = randomF32(n * cIn * h * w, seed++);
        let wData = randomF32(wDims.reduce((a, b) => a * b, 1), seed++);
        const bias = new Tensor('float32', randomF32(c.cOut, seed++), [c.cOut]);
        if (mode !== 'fp32') [xData, wData] = [roundBf16(xData), roundBf16(wData)];
        const x = new Tensor('float32', xData, c.x);
        const weights = new Tensor('float32', wData, wDims);
        const conv = await createGpuConv2d(t.id, weights, { ...c.opts, ...extra, bias });
        const outDims = conv.outputShape(c.x);
        const size = outDims.reduce((a, b) => a * b, 1);
        const residual = c.residual ? new Tensor('float32', randomF32(size, seed++), outDims) : undefined;
        const want = await kernels.conv2d(x, weights, {
          ...c.opts, bias, residual, residualBeforeActivation: c.residual === 'before',
        });
        expect(want.dims, c.name).toEqual(outDims);
        const absX = new Tensor('float32', xData.map(Math.abs), c.x), absW = new Tensor('float32', wData.map(Math.abs), wDims);
        const mag = (await kernels.conv2d(absX, absW, { ...c.opts, activation: 'none', clipMin: undefined, clipMax: undefined, alpha: undefined })).data;
        for (let i = 0; i < mag.length; i++) mag[i] += Math.abs(bias.data[Math.floor(i / (outDims[2] * outDims[3])) % c.cOut]!) + (residual ? Math.abs(residual.data[i]!) : 0);
        const y = alloc(size * 4);
        await y.write(new Float32Array(size).fill(NaN));  // every output must be written
        await conv.run(await up(xData), c.x, y, {
          residual: residual ? await up(residual.data) : undefined, residualBeforeActivation: c.residual === 'before',
        });
        expect(conv.path, c.name).toBe(cIn === group ? 'depthwise' : 'implicit-gemm');
        expectConvClose(await y.read(new Float32Array(size)), want.data, mag, kk, `${mode} ${c.name}`);
        conv.dispose();
      }
    });
  }

  // Every path that splits K (the pipelined mma kernel, and SIMT in fp32 and bf16), with every way
  // the residual can meet the split sums: added before the activation (y then starts as it, or
  // already holds it in place), or after (y starts at zero; in place it cannot split).
  for (const [mode, flags] of [['fp32 simt', { bf16: 0 }], ['bf16 simt', { bf16: 1, simt: 1 }], ['bf16 mma', { bf16: 1, simt: 2 }]] as const) {
    it(`${mode} with K split every way (splitK), bias and residual applied once after the sums`, async () => {
      for (const [xDims, cOut, k, pad] of [[[2, 32, 6, 7], 10, 3, 1], [[1, 256, 4, 4], 130, 1, 0], [[1, 40, 3, 3], 70, 3, 1]] as const) {
        const [n, cIn, h, w] = xDims;
        const kk = cIn * k * k;
        const xData = roundBf16(randomF32(n * cIn * h * w, 21)), wData = roundBf16(randomF32(cOut * kk, 22));
        const bias = new Tensor('float32', randomF32(cOut, 23), [cOut]);
        const x = new Tensor('float32', xData, [...xDims]), weights = new Tensor('float32', wData, [cOut, cIn, k, k]);
        const pads = [pad, pad, pad, pad];
        const size = n * cOut * h * w;
        const residual = new Tensor('float32', randomF32(size, 24), [n, cOut, h, w]);
        const mag = (await kernels.conv2d(new Tensor('float32', xData.map(Math.abs), [...xDims]), new Tensor('float32', wData.map(Math.abs), [cOut, cIn, k, k]), { pads })).data;
        for (let i = 0; i < size; i++) mag[i] += Math.abs(bias.data[Math.floor(i / (h * w)) % cOut]!) + Math.abs(residual.data[i]!);
        const wBits = flags.bf16 ? new Uint16Array(new Uint32Array(wData.buffer).map((v) => v >>> 16)) : wData;
        const bufs = [await up(xData), await up(wBits), await up(bias.data), alloc(size * 4), await up(residual.data)] as const;
        for (const before of [true, false]) {
          const want = await kernels.conv2d(x, weights, { pads, bias, residual, residualBeforeActivation: before, activation: 'relu' });
          const p = {
            n, cIn, h, w, cOut, groups: 1, kh: k, kw: k, sh: 1, sw: 1, dh: 1, dw: 1, pt: pad, pl: pad, pb: pad, pr: pad, ...flags,
            residual: 1, residualBeforeActivation: before ? 1 : 0, activation: 1,
          };
          for (const inPlace of [false, true]) {
            for (const splitK of [1, 2, 3, 4, 9, 50]) {
              const what = `splitK ${splitK} on ${xDims}, residual ${before ? 'before' : 'after'} the activation${inPlace ? ', in place' : ''}`;
              await bufs[3].write(inPlace ? residual.data : new Float32Array(size).fill(NaN));
              await runGpuOp(t.id, 'conv2d', inPlace ? [...bufs.slice(0, 4), bufs[3]] : [...bufs], { ...p, splitK });
              expectConvClose(await bufs[3].read(new Float32Array(size)), want.data, mag, kk, what);
            }
          }
        }
      }
    });
  }

  it('folds BatchNormalization as the CPU does', async () => {
    for (const [xDims, cOut, k, group] of [[[2, 6, 9, 7], 10, 3, 1], [[1, 5, 6, 6], 5, 3, 5]] as const) {
      const wDims = [cOut, xDims[1] / group, k, k];
      const x = new Tensor('float32', randomF32(xDims.reduce((a, b) => a * b, 1), 3), [...xDims]);
      const weights = new Tensor('float32', randomF32(wDims.reduce((a, b) => a * b, 1), 4), wDims);
      const vec = (seed: number, f: (v: number) => number) => new Tensor('float32', randomF32(cOut, seed).map(f), [cOut]);
      const bn = { scale: vec(5, (v) => v * 2), bias: vec(6, (v) => v), mean: vec(7, (v) => v * 0.5), variance: vec(8, (v) => v + 1.5), epsilon: 1e-3 };
      const bias = vec(9, (v) => v);
      const opts = { bn, bias, group, pads: [1, 1, 1, 1], activation: 'relu' as const };
      const want = await kernels.conv2d(x, weights, opts);
      const conv = await createGpuConv2d(t.id, weights, opts);
      const y = alloc(want.size * 4);
      await conv.run(await up(x.data), xDims, y);
      const got = await y.read(new Float32Array(want.size));
      for (let i = 0; i < want.size; i++) expect(Math.abs(got[i]! - want.data[i]!), `bn[${i}]`).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(want.data[i]!)));
      conv.dispose();
    }
  });

  it('max / average / global average pooling match the CPU', async () => {
    const windows = [
      { kernelShape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1] },
      { kernelShape: [2, 3], strides: [1, 2], pads: [1, 0, 0, 2], dilations: [2, 1] },
      { kernelShape: [3, 2], autoPad: 'SAME_UPPER' as const, strides: [2, 2] },
      { kernelShape: [3, 3], autoPad: 'SAME_LOWER' as const, strides: [2, 1] },
      { kernelShape: [1, 1] },
      { kernelShape: [7, 7] },
    ];
    for (const dims of [[1, 1, 7, 7], [3, 5, 9, 11], [2, 3, 14, 13]]) {
      const size = dims.reduce((a, b) => a * b, 1);
      const xData = randomF32(size, dims[3]!).map((v) => v * 4);
      const x = new Tensor('float32', xData, dims);
      const xb = await up(xData);
      for (const win of windows) {
        if (win.kernelShape[0]! > dims[2]! && !win.autoPad) continue;
        const outDims = gpuPoolOutputShape(dims, win);
        const y = alloc(outDims.reduce((a, b) => a * b, 1) * 4);
        const want = await kernels.maxPool2d(x, win);
        expect(want.dims).toEqual(outDims);
        await gpuMaxPool2d(t.id, xb, dims, y, win);
        expect(Array.from(await y.read(new Float32Array(want.size))), `max ${JSON.stringify(win)} on ${dims}`).toEqual(Array.from(want.data));
        for (const countIncludePad of [false, true]) {
          const avg = await kernels.averagePool2d(x, { ...win, countIncludePad });
          await gpuAveragePool2d(t.id, xb, dims, y, { ...win, countIncludePad });
          const got = await y.read(new Float32Array(avg.size));
          for (let i = 0; i < avg.size; i++) {
            expect(Math.abs(got[i]! - avg.data[i]!), `avg ${countIncludePad} ${JSON.stringify(win)}[${i}]`).toBeLessThanOrEqual(1e-6 * (1 + Math.abs(avg.data[i]!)));
          }
        }
      }
      const gap = await kernels.globalAveragePool(x);
      const y = alloc(dims[0]! * dims[1]! * 4);
      await gpuGlobalAveragePool(t.id, xb, dims, y);
      const got = await y.read(new Float32Array(gap.size));
      for (let i = 0; i < gap.size; i++) expect(Math.abs(got[i]! - gap.data[i]!), `gap[${i}]`).toBeLessThanOrEqual(1e-6 * (1 + Math.abs(gap.data[i]!)));
    }
  });

  it('rejects bad input with typed errors naming the parameter', async () => {
    const w = new Tensor('float32', randomF32(4 * 2 * 3 * 3, 1), [4, 2, 3, 3]);
    await expect(createGpuConv2d(t.id, new Tensor('float32', new Float32Array(4), [2, 2]))).rejects.toThrow(/createGpuConv2d\(weights\) must be 4-D/);
    await expect(createGpuConv2d(t.id, w, { group: 3 })).rejects.toThrow(/options.group \(3\) must divide the output channels/);
    await expect(createGpuConv2d(t.id, w, { activation: 'tanh' as 'relu' })).rejects.toThrow(/options.activation/);
    await expect(createGpuConv2d(t.id, w, { activation: 'clip' })).rejects.toThrow(/needs options.clipMin and options.clipMax/);
    await expect(createGpuConv2d(t.id, w, { alpha: 0.1 })).rejects.toThrow(/options.alpha has no effect/);
    await expect(createGpuConv2d(t.id, w, { precision: 'fp16' as 'bf16' })).rejects.toThrow(/options.precision/);
    await expect(createGpuConv2d(t.id, w, { simt: 1 as unknown as boolean })).rejects.toThrow(/options.simt must be a boolean/);
    await expect(createGpuConv2d(t.id, w, { pads: [3, 0, 0, 0] })).rejects.toThrow(/options.pads\[0\] \(3\) must be smaller/);
    await expect(createGpuConv2d(t.id, w, { stride: [2, 2] } as GpuConv2dOptions)).rejects.toThrow(InvalidArgumentError);
    await expect(createGpuConv2d(t.id, w, { bias: new Tensor('float32', new Float32Array(3), [3]) })).rejects.toThrow(/options.bias must have dims \[4\]/);
    await expect(createGpuConv2d(t.id, w, {
      bn: { scale: new Tensor('float32', new Float32Array(4), [4]), bias: new Tensor('float32', new Float32Array(4), [4]),
        mean: new Tensor('float32', new Float32Array(4), [4]), variance: new Tensor('float32', new Float32Array(4).fill(-1), [4]) },
    })).rejects.toThrow(/options.bn.variance\[0\] \+ epsilon must be > 0/);
    const conv = await createGpuConv2d(t.id, w);
    const x = alloc(2 * 5 * 5 * 4), y = alloc(4 * 3 * 3 * 4);
    await expect(conv.run(x, [1, 3, 5, 5], y)).rejects.toThrow(/x has 3 channels \(dims\[1\]\) but the weights expect 2/);
    await expect(conv.run(x, [1, 2, 5], y)).rejects.toThrow(/dims must be 4 dims/);
    await expect(conv.run(x, [2, 2, 5, 5], y)).rejects.toThrow(/GpuConv2d.run: x holds 200 bytes, needs 400/);
    await expect(conv.run(x, [1, 2, 6, 5], y)).rejects.toThrow(/GpuConv2d.run: x holds/);
    await expect(conv.run(alloc(2 * 5 * 6 * 4), [1, 2, 5, 6], y)).rejects.toThrow(/y holds 144 bytes, needs 192/);
    await expect(conv.run(x, [1, 2, 2, 5], y)).rejects.toThrow(/output height would be 0/);
    await expect(conv.run(x, [1, 2, 5, 5], y, { residual: alloc(8) })).rejects.toThrow(/options.residual holds 8 bytes/);
    await expect(conv.run(x, [1, 2, 5, 5], x)).rejects.toThrow(/y must not be x|y holds/);
    await expect(conv.run(x, [1, 2, 5, 5], y, { residualBeforeActivation: 'yes' as unknown as boolean })).rejects.toThrow(/must be a boolean/);
    const gone = alloc(2 * 5 * 5 * 4);
    gone.dispose();
    await expect(conv.run(gone, [1, 2, 5, 5], y)).rejects.toThrow(DisposedError);
    conv.dispose();
    conv.dispose();  // idempotent
    await expect(conv.run(x, [1, 2, 5, 5], y)).rejects.toThrow(DisposedError);
    await expect(gpuMaxPool2d(t.id, x, [1, 2, 5, 5], y, {} as { kernelShape: number[] })).rejects.toThrow(/options.kernelShape is required/);
    await expect(gpuMaxPool2d(t.id, x, [1, 2, 5, 5], y, { kernelShape: [3, 3], countIncludePad: true } as { kernelShape: number[] })).rejects.toThrow(/countIncludePad/);
    await expect(gpuAveragePool2d(t.id, x, [1, 2, 5, 5], alloc(4), { kernelShape: [3, 3] })).rejects.toThrow(/gpuAveragePool2d: y holds 4 bytes, needs 72/);
    await expect(gpuGlobalAveragePool(t.id, x, [1, 2, 5, 5], alloc(4))).rejects.toThrow(/gpuGlobalAveragePool: y holds 4 bytes, needs 8/);
    // The native ops check again when called directly.
    const p = { n: 1, cIn: 2, h: 5, w: 5, cOut: 4, groups: 1, kh: 3, kw: 3, sh: 1, sw: 1, dh: 1, dw: 1, pt: 0, pl: 0, pb: 0, pr: 0 };
    const wb = alloc(4 * 18 * 4), bb = alloc(16);
    await expect(runGpuOp(t.id, 'conv2d', [x, wb, bb, y], { ...p, n: 2 })).rejects.toThrow(/conv2d: x \(buffer 0\) holds 200 bytes/);
    await expect(runGpuOp(t.id, 'conv2d', [x, wb, bb, y], { ...p, groups: 3 })).rejects.toThrow(/groups must divide cIn and cOut/);
    await expect(runGpuOp(t.id, 'conv2d', [x, wb, bb, y], { ...p, pt: 3 })).rejects.toThrow(/pads must be smaller/);
    await expect(runGpuOp(t.id, 'conv2d', [x, wb, bb, y], { ...p, residual: 1 })).rejects.toThrow(/residual/);
    await expect(runGpuOp(t.id, 'conv2d', [x, wb, bb, y], { ...p, activation: 9 })).rejects.toThrow(/activation/);
    await expect(runGpuOp(t.id, 'pool2d', [x, y], { kind: 3, planes: 2, h: 5, w: 5 })).rejects.toThrow(/kind/);
  });
});
