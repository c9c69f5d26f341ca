import { describe, expect, it } from 'vitest';
import { AbortError, DeviceUnavailableError, DisposedError, InvalidArgumentError, Tensor, devices, kernels, reportedExternalMemory } from '../dist/index.js';
import { randomTensor } from './helpers.js';

const simd = devices().cpu.simd;
// The bf16 kernels run where the CPU has AVX512_BF16 and SONDE_ISA leaves AVX-512 on.
const bf16Cpu = devices().cpu.simd === 'avx512' && devices().cpu.features.includes('avx512bf16');
// Intel AMX tiles (AMX-BF16, and the OS granting them): the blocked bf16 convs run there under 'auto'.
const amxCpu = bf16Cpu && devices().cpu.features.includes('amx_bf16');
const variants: kernels.ConvVariant[] = ['reference', 'scalar',
  ...(simd !== 'scalar' ? ['avx2' as const] : []), ...(simd === 'avx512' ? ['avx512' as const] : [])];
const u = 2 ** -24;

type Act = kernels.ConvActivation;
// Double-precision activations and their Lipschitz constants (max |d act / dv|).
const acts: Partial<Record<Act, { f: (v: number) => number; lip: number; opts?: Partial<kernels.Conv2dOptions> }>> = {
  none: { f: (v) => v, lip: 1 },
  relu: { f: (v) => (v < 0 ? 0 : v), lip: 1 },
  relu6: { f: (v) => Math.min(Math.max(v, 0), 6), lip: 1 },
  clip: { f: (v) => Math.min(Math.max(v, -0.5), 0.75), lip: 1, opts: { clipMin: -0.5, clipMax: 0.75 } },
  silu: { f: (v) => v / (1 + Math.exp(-v)), lip: 1.1 },
  sigmoid: { f: (v) => 1 / (1 + Math.exp(-v)), lip: 0.25 },
  leakyRelu: { f: (v) => (v < 0 ? 0.2 * v : v), lip: 1, opts: { alpha: 0.2 } },
  hardSwish: { f: (v) => (v * Math.min(Math.max(v + 3, 0), 6)) / 6, lip: 1.5 },
};

interface Geo {
  strides?: number[]; pads?: number[]; dilations?: number[]; group?: number; autoPad?: kernels.ConvAutoPad;
}

/** ONNX output size and begin pads, written independently of lib/ (for the reference). */
function resolve(h: number, k: number, s: number, d: number, p0: number, p1: number, autoPad: kernels.ConvAutoPad) {
  const ext = (k - 1) * d + 1;
  if (autoPad === 'SAME_UPPER' || autoPad === 'SAME_LOWER') {
    const o = Math.ceil(h / s);
    const total = Math.max(0, (o - 1) * s + ext - h);
    return { o, pad: autoPad === 'SAME_UPPER' ? Math.floor(total / 2) : total - Math.floor(total / 2) };
  }
  if (autoPad === 'VALID') return { o: Math.floor((h - ext) / s) + 1, pad: 0 };
  return { o: Math.floor((h + p0 + p1 - ext) / s) + 1, pad: p0 };
}

/**
 * Direct convolution in double: returns the pre-activation values v (bias included) and, per
 * output, sum |w x| + |bias| (the magnitude the float32 error bound scales with).
 */
function refConv(x: Tensor<'float32'>, w: Float32Array, wd: number[], g: Geo, bias?: Float32Array) {
  const [n, c, h, wi] = x.dims as number[];
  const [co, cg, kh, kw] = wd as [number, number, number, number];
  const [sh, sw] = g.strides ?? [1, 1];
  const [dh, dw] = g.dilations ?? [1, 1];
  const p = g.pads ?? [0, 0, 0, 0];
  const ap = g.autoPad ?? 'NOTSET';
  const ry = resolve(h!, kh, sh!, dh!, p[0]!, p[2]!, ap);
  const rx = resolve(wi!, kw, sw!, dw!, p[1]!, p[3]!, ap);
  const group = g.group ?? 1;
  const cog = co / group;
  const dims = [n!, co, ry.o, rx.o];
  const v = new Float64Array(n! * co * ry.o * rx.o);
  const mag = new Float64Array(v.length);
  let idx = 0;
  for (let b = 0; b < n!; b++) {
    for (let o = 0; o < co; o++) {
      const gi = Math.floor(o / cog);
      for (let oy = 0; oy < ry.o; oy++) {
        for (let ox = 0; ox < rx.o; ox++, idx++) {
          let s = bias ? bias[o]! : 0;
          let m = Math.abs(s);
          for (let ci = 0; ci < cg; ci++) {
            for (let ky = 0; ky < kh; ky++) {
              const iy = oy * sh! - ry.pad + ky * dh!;
              if (iy < 0 || iy >= h!) continue;
              for (let kx = 0; kx < kw; kx++) {
                const ix = ox * sw! - rx.pad + kx * dw!;
                if (ix < 0 || ix >= wi!) continue;
                const t = w[((o * cg + ci) * kh + ky) * kw + kx]! * x.data[((b * c! + gi * cg + ci) * h! + iy) * wi! + ix]!;
                s += t;
                m += Math.abs(t);
              }
            }
          }
          v[idx] = s;
          mag[idx] = m;
        }
      }
    }
  }
  return { v, mag, dims, k: cg * kh * kw };
}

/**
 * float32 bound per element, as in the GEMM tests: the sum has |err| <= (k + 3) u sum|w x| (one more
 * term for the bias), the activation multiplies it by its Lipschitz constant and adds its own few
 * ulp; a residual add adds u of the result. relMag adds a relative error per product (bf16 rounding).
 */
function expectConv(got: Tensor<'float32'>, ref: ReturnType<typeof refConv>, act: Act = 'none',
  residual?: { r: Float32Array; before: boolean }, relMag = 0): void {
  expect(got.dims).toEqual(ref.dims);
  const { f, lip } = acts[act]!;
  for (let i = 0; i < ref.v.length; i++) {
    let v = ref.v[i]!;
    let err = ((ref.k + 3) * u + relMag) * ref.mag[i]!;
    const r = residual ? residual.r[i]! : 0;
    if (residual?.before) { v += r; err += u * Math.abs(v); }
    let want = f(v);
    err = lip * err + 4 * u * Math.abs(want) + 1e-7 * Math.abs(v);
    if (residual && !residual.before) { want += r; err += u * Math.abs(want); }
    const g = got.data[i]!;
    if (!(Math.abs(g - want) <= err + 1e-30)) {
      throw new Error(`y[${i}] = ${g}, want ${want} (|err| ${Math.abs(g - want).toExponential(3)} > ${err.toExponential(3)}) act ${act}`);
    }
  }
}

interface Shape { name: string; x: number[]; w: number[]; g: Geo }
const shapes: Shape[] = [
  { name: '1x3x7x5 * 5x3x3x3 s2 p1 d2', x: [1, 3, 7, 5], w: [5, 3, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1], dilations: [2, 2] } },
  { name: '1x1 N=2, 19 -> 21 channels', x: [2, 19, 9, 11], w: [21, 19, 1, 1], g: {} },
  { name: '1x1 C_in = 300 (pointwise kernel, two K blocks)', x: [2, 300, 6, 7], w: [20, 300, 1, 1], g: { autoPad: 'SAME_UPPER' } },
  { name: '1x1 stride 2 with pads', x: [1, 5, 8, 7], w: [13, 5, 1, 1], g: { strides: [2, 2], pads: [0, 0, 0, 0] } },
  { name: '3x3 K = 360 (two K blocks), 400 pixels (two panel blocks)', x: [1, 40, 20, 20], w: [33, 40, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '5x5 SAME_UPPER stride 2', x: [1, 4, 11, 13], w: [7, 4, 5, 5], g: { strides: [2, 2], autoPad: 'SAME_UPPER' } },
  { name: '3x3 SAME_LOWER stride 2, asymmetric', x: [1, 3, 10, 9], w: [6, 3, 3, 2], g: { strides: [2, 1], autoPad: 'SAME_LOWER' } },
  { name: '3x3 stride 3 (gathered im2col), asymmetric pads', x: [1, 5, 17, 20], w: [9, 5, 3, 3], g: { strides: [3, 3], pads: [1, 2, 1, 0] } },
  // Convolutions under 1 MFLOP per thread run on one thread: this one (4.5 MFLOP) is large enough
  // to be split across two, rows first (80 channels > 49 pixels), so row blocks share one im2col.
  { name: '3x3 on 7x7, 80 output channels, N=2 (rows split: shared im2col)', x: [2, 32, 7, 7], w: [80, 32, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '1x1 N=2, 64 -> 48 channels on 16x16 (pointwise, split across threads)', x: [2, 64, 16, 16], w: [48, 64, 1, 1], g: {} },
  // Direct tiles prefetching a slice of the next 32-channel block's weights (64 KiB and more per
  // block); with weights beyond half of any L2 (2.6 MiB) and a small batch input, the tiles run
  // block by block over the batch instead of image by image (N=3: a batch the 2 threads divide
  // evenly runs a whole image per task instead, as the next case does).
  { name: '3x3 on 5x5, 512 -> 144 channels, N=3 (blocks outermost, next block prefetched)', x: [3, 512, 5, 5], w: [144, 512, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '3x3 on 12x11, 32 -> 48 channels, N=4 (a whole image per task on 2 threads)', x: [4, 32, 12, 11], w: [48, 32, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '1x1 on 7x7, 512 -> 80 channels, N=2 (next block prefetched)', x: [2, 512, 7, 7], w: [80, 512, 1, 1], g: {} },
  // fp32 1x1 stride 1 with at most 8 input blocks runs two 32-channel weight blocks per tile (up to 6
  // pixels x 64 channels); an item without a fourth 16-channel output block (the last of an odd
  // block count, or 33-48 channels) runs on the 32-channel tiles. Widths of 13 and 7: short segments.
  { name: '1x1 pair tiles, 64 -> 256 on 9x13', x: [1, 64, 9, 13], w: [256, 64, 1, 1], g: {} },
  { name: '1x1 pair tiles, 48 -> 80 (a pair, then one block of 16)', x: [2, 48, 6, 7], w: [80, 48, 1, 1], g: {} },
  { name: '1x1 pair tiles, 32 -> 100 (a pair, then blocks of 32 and 4)', x: [1, 32, 5, 13], w: [100, 32, 1, 1], g: {} },
  { name: '1x1 pair tiles, 128 -> 96 on 7x7', x: [1, 128, 7, 7], w: [96, 128, 1, 1], g: {} },
  // Up to 16 output channels (one vector) on rows of at most 8 pixels: row pairs of up to 16 pixels.
  { name: '3x3 on 8x8, 16 -> 16, N=3 (one-vector row pairs of 8 pixels)', x: [3, 16, 8, 8], w: [16, 16, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '3x3/2 on 16x15, 16 -> 10 (row pairs, stride 2, part of a vector)', x: [1, 16, 16, 15], w: [10, 16, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '3x3 on 8x8, 1 -> 16, N=2 (stem tiles, row pairs)', x: [2, 1, 8, 8], w: [16, 1, 3, 3], g: { pads: [1, 1, 1, 1] } },
  // Inputs larger than an L2 (8 and 4.6 MiB an image) and weights smaller than half of one: the
  // direct tiles run in bands of rows, every block over one band before the next (the last band
  // short); a 3x3's bands share their edge rows.
  { name: '1x1/2 on 64x64, 512 -> 80 channels (row bands)', x: [1, 512, 64, 64], w: [80, 512, 1, 1], g: { strides: [2, 2] } },
  { name: '3x3/2 on 95x95, 128 -> 40 channels (row bands sharing edge rows)', x: [1, 128, 95, 95], w: [40, 128, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '3x3 VALID, N=3', x: [3, 5, 6, 8], w: [4, 5, 3, 3], g: { autoPad: 'VALID' } },
  { name: 'grouped: 8 -> 12 channels, 2 groups', x: [1, 8, 9, 7], w: [12, 4, 3, 3], g: { group: 2, pads: [1, 0, 1, 2] } },
  { name: 'depthwise 3x3 s1 p1, 19 channels', x: [2, 19, 13, 21], w: [19, 1, 3, 3], g: { group: 19, pads: [1, 1, 1, 1] } },
  { name: 'depthwise 3x3 s2 p1', x: [1, 17, 15, 35], w: [17, 1, 3, 3], g: { group: 17, strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: 'depthwise 3x3 s2 d2 (row pairs share input rows)', x: [1, 5, 19, 23], w: [5, 1, 3, 3], g: { group: 5, strides: [2, 2], dilations: [2, 2], pads: [2, 1, 2, 2] } },
  { name: 'depthwise 5x5 s3 d2 SAME_UPPER', x: [1, 6, 17, 19], w: [6, 1, 5, 5], g: { group: 6, strides: [3, 3], dilations: [2, 2], autoPad: 'SAME_UPPER' } },
  { name: 'depthwise 5x5 s1 p2, 118 outputs a row', x: [1, 3, 9, 118], w: [3, 1, 5, 5], g: { group: 3, pads: [2, 2, 2, 2] } },
  // Output rows of at most 8 pixels (AVX-512) run on the blocked depthwise kernel through per-task
  // blocked copies of 16 channels (zero border, partial last block); wider ones on the window kernel.
  { name: 'depthwise 3x3 s1 on 7x7, 35 channels, N=2 (narrow rows: blocked copies)', x: [2, 35, 7, 7], w: [35, 1, 3, 3], g: { group: 35, pads: [1, 1, 1, 1] } },
  { name: 'depthwise 3x3 s2 on 13x11, 16 channels (narrow rows)', x: [1, 16, 13, 11], w: [16, 1, 3, 3], g: { group: 16, strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: 'depthwise 5x5 s1 on 6x8, asymmetric pads, 20 channels (narrow rows)', x: [1, 20, 6, 8], w: [20, 1, 5, 5], g: { group: 20, pads: [2, 1, 1, 3] } },
  { name: 'channel multiplier 2 (group = C_in)', x: [1, 3, 6, 6], w: [6, 1, 3, 3], g: { group: 3, pads: [1, 1, 1, 1] } },
];

/** A shape of the list by a fragment of its name. */
const S = (fragment: string): Shape => shapes.find((c) => c.name.includes(fragment))!;

describe.each(variants)('conv2d, variant %s', (variant) => {
  it.each(shapes)('$name', async ({ x: xd, w: wd, g }) => {
    const x = randomTensor(xd, 3);
    const w = randomTensor(wd, 4);
    const bias = randomTensor([wd[0]!], 5);
    const y = await kernels.conv2d(x, w, { ...g, bias, variant });
    expectConv(y, refConv(x, w.data, wd, g, bias.data));
  });

  it.each(Object.keys(acts) as Act[])('epilogue %s with residual before/after (dense and depthwise)', async (act) => {
    for (const s of [S('1x3x7x5'), S('K = 360'), S('C_in = 300'), S('depthwise 3x3 s1'), S('narrow rows: blocked')]) {
      const x = randomTensor(s.x, 6);
      const w = randomTensor(s.w, 7);
      for (let i = 0; i < w.size; i++) w.data[i]! *= 3 / Math.sqrt(s.w[1]! * s.w[2]! * s.w[3]!);
      const bias = randomTensor([s.w[0]!], 8);
      const conv = kernels.createConv2d(w, { ...s.g, bias, activation: act, variant, ...acts[act]!.opts });
      const ref = refConv(x, w.data, s.w, s.g, bias.data);
      expectConv(await conv.run(x), ref, act);
      const r = randomTensor(ref.dims, 9);
      for (const before of [false, true]) {
        expectConv(await conv.run(x, { residual: r, residualBeforeActivation: before }), ref, act, { r: r.data, before });
      }
      conv.dispose();
    }
  });

  it('BatchNormalization folded equals conv then BN (tiny variance, large epsilon)', async () => {
    for (const s of [S('1x3x7x5'), S('K = 360'), S('C_in = 300'), S('depthwise 3x3 s1')]) {
      const co = s.w[0]!;
      const x = randomTensor(s.x, 10);
      const w = randomTensor(s.w, 11);
      const bias = randomTensor([co], 12);
      const gamma = randomTensor([co], 13);
      const beta = randomTensor([co], 14);
      const mean = randomTensor([co], 15);
      for (const [variance, epsilon] of [[1e-6, 1e-5], [0.5, 10], [0, 1e-3]] as const) {
        const v = new Tensor('float32', new Float32Array(co).map((_, i) => variance * (1 + (i % 3))), [co]);
        const y = await kernels.conv2d(x, w, { ...s.g, bias, variant, activation: 'relu',
          bn: { scale: gamma, bias: beta, mean, variance: v, epsilon } });
        // Conv then BN in double; the folded kernel rounds w*s (u relative per product) and b'.
        const ref = refConv(x, w.data, s.w, s.g, bias.data);
        const hw = ref.dims[2]! * ref.dims[3]!;
        for (let i = 0; i < ref.v.length; i++) {
          const c = Math.floor(i / hw) % co;
          const sc = gamma.data[c]! / Math.sqrt(v.data[c]! + epsilon);
          const want = Math.max(0, (ref.v[i]! - mean.data[c]!) * sc + beta.data[c]!);
          const bound = (ref.k + 5) * u * ref.mag[i]! * Math.abs(sc) + 4 * u * (Math.abs((bias.data[c]! - mean.data[c]!) * sc) + Math.abs(beta.data[c]!) + Math.abs(want));
          if (!(Math.abs(y.data[i]! - want) <= bound)) {
            throw new Error(`var ${variance} eps ${epsilon}: y[${i}] = ${y.data[i]}, want ${want} (bound ${bound.toExponential(3)})`);
          }
        }
      }
    }
  });
});

// 1x1 convolutions whose batch input exceeds 2 MiB copy each task's block of B rows into a
// contiguous scratch before the pointwise kernel reads it (native/ops/conv.cc, RunPointwise):
// batches 1, 2, 3, 7, odd plane sizes (a partial last panel and panel block), several K blocks,
// groups, and the activation + residual epilogue, against the double reference.
describe('pointwise conv over a batch larger than L2 (packed B blocks)', () => {
  const big: Shape[] = [
    { name: 'N=1, 520 -> 19 on 33x31 (three K blocks)', x: [1, 520, 33, 31], w: [19, 520, 1, 1], g: {} },
    { name: 'N=2, 300 -> 25 on 33x29', x: [2, 300, 33, 29], w: [25, 300, 1, 1], g: {} },
    { name: 'N=3, 64 -> 26 on 57x55, 2 groups', x: [3, 64, 57, 55], w: [26, 32, 1, 1], g: { group: 2 } },
    { name: 'N=7, 40 -> 13 on 45x43', x: [7, 40, 45, 43], w: [13, 40, 1, 1], g: {} },
  ];
  // Both ops that run it: the GEMM path's (SONDE_CONV_DIRECT=0), and the direct path's on its
  // blocked weights (planes of 784+ pixels), whose channel blocks are partial for 520, 300 and 40.
  it.each(big.flatMap((s) => [{ ...s, path: 'gemm' }, { ...s, path: 'direct' }]))('$name on the $path path', async (s) => {
    expect(s.x.reduce((a, b) => a * b) * 4).toBeGreaterThan(2 ** 21);
    const x = randomTensor(s.x, 30);
    const w = randomTensor(s.w, 31);
    const bias = randomTensor([s.w[0]!], 32);
    process.env.SONDE_CONV_DIRECT = s.path === 'gemm' ? '0' : '1';
    let conv: kernels.Conv2d;
    try {
      conv = kernels.createConv2d(w, { ...s.g, bias, activation: 'relu6' });
    } finally {
      delete process.env.SONDE_CONV_DIRECT;
    }
    if (simd === 'avx512') {
      if (s.path === 'gemm' || s.g.group) expect(conv.ukernel).toContain('conv1x1');
      else expect(conv.path).toBe('direct');
    }
    const ref = refConv(x, w.data, s.w, s.g, bias.data);
    expectConv(await conv.run(x), ref, 'relu6');
    const r = randomTensor(ref.dims, 33);
    for (const threads of [1, 2]) {
      expectConv(await conv.run(x, { residual: r, residualBeforeActivation: false, threads }), ref, 'relu6', { r: r.data, before: false });
    }
    conv.dispose();
  });
});

/** fp32 -> bf16 -> fp32, round to nearest even (finite values). */
function bf16Round(v: number): number {
  const f = new Float32Array([v]);
  const b = new Uint32Array(f.buffer);
  b[0] = (b[0]! + 0x7fff + ((b[0]! >>> 16) & 1)) & 0xffff0000;
  return f[0]!;
}

describe('bf16 weights', () => {
  const bf16 = bf16Round;
  it.each([...variants.filter((v) => v !== 'reference'), ...(bf16Cpu ? ['avx512bf16' as const] : []), ...(amxCpu ? ['amx' as const] : [])])('%s: within the bf16 bound of the fp32 reference', async (variant) => {
    for (const s of [S('1x3x7x5'), S('1x1 N=2'), S('K = 360'), S('grouped'), S('depthwise 3x3 s1'), S('blocks outermost'), S('row bands)')]) {
      const x = randomTensor(s.x, 20);
      const w = randomTensor(s.w, 21);
      const bias = randomTensor([s.w[0]!], 22);
      const conv = kernels.createConv2d(w, { ...s.g, bias, precision: 'bf16', variant, activation: 'silu' });
      expect(conv.precision).toBe('bf16');
      // Weights rounded to bf16: |dw| <= 2^-9 |w|; the avx512bf16 kernel also rounds x: another
      // 2^-9, so each product is within (2^-8 + 2^-18) of exact, on top of the fp32 sum bound.
      const rel = conv.ukernel.includes('bf16') ? 2 ** -8 + 2 ** -18 : 2 ** -9;
      expectConv(await conv.run(x), refConv(x, w.data, s.w, s.g, bias.data), 'silu', undefined, rel);
      conv.dispose();
    }
  });

  it('reference variant equals the fp32 reference of the bf16-rounded weights', async () => {
    const s = S('1x3x7x5');
    const x = randomTensor(s.x, 23);
    const w = randomTensor(s.w, 24);
    const y = await kernels.conv2d(x, w, { ...s.g, precision: 'bf16', variant: 'reference' });
    expectConv(y, refConv(x, w.data.map(bf16), s.w, s.g));
    // And it is not the fp32 result: the rounding really happened.
    const y32 = await kernels.conv2d(x, w, { ...s.g, variant: 'reference' });
    expect(Array.from(y.data)).not.toEqual(Array.from(y32.data));
  });
});

describe('threads', () => {
  it('1 and 2 threads give identical results (dense, grouped, depthwise, pooling)', async () => {
    for (const s of [S('1x1 N=2'), S('split across threads'), S('K = 360'), S('shared im2col'), S('grouped'), S('depthwise 3x3 s1'), S('narrow rows: blocked'), S('one-vector row pairs'), S('image per task'), S('blocks outermost'), S('then one block of 16')]) {
      const x = randomTensor(s.x, 30);
      const conv = kernels.createConv2d(randomTensor(s.w, 31), { ...s.g, bias: randomTensor([s.w[0]!], 32), activation: 'relu' });
      const a = await conv.run(x, { threads: 1 });
      const b = await conv.run(x, { threads: 2 });
      expect(Array.from(b.data)).toEqual(Array.from(a.data));
      conv.dispose();
    }
    const x = randomTensor([2, 9, 33, 35], 33);
    const p1 = await kernels.maxPool2d(x, { kernelShape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1], threads: 1 });
    const p2 = await kernels.maxPool2d(x, { kernelShape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1], threads: 2 });
    expect(Array.from(p2.data)).toEqual(Array.from(p1.data));
  });
});

// The direct NCHW16c kernel (AVX-512; group 1, C_in a multiple of 16, stride 1 or 2, no dilation),
// forced on at creation with SONDE_CONV_DIRECT=1 so each shape below runs it whatever the automatic
// rule picks: output rows of every tile width 1..14 and rows split into several tiles (15 = 8 + 7,
// 29 = 10 + 10 + 9, 56 = 4 x 14), output-channel blocks of 32, of 16 (one vector) and partial ones,
// 1x1/3x3/5x5 and non-square kernels, stride 2 with odd sizes, asymmetric and SAME pads, batches.
function createDirect(w: Tensor<'float32'>, opts: kernels.Conv2dOptions): kernels.Conv2d {
  process.env.SONDE_CONV_DIRECT = '1';
  try {
    return kernels.createConv2d(w, opts);
  } finally {
    delete process.env.SONDE_CONV_DIRECT;
  }
}

const direct: Shape[] = [
  { name: '3x3 p1, 16 -> 5 on 1x1 (one pixel, one partial channel block)', x: [1, 16, 1, 1], w: [5, 16, 3, 3], g: { pads: [1, 1, 1, 1] } },
  ...Array.from({ length: 14 }, (_, i): Shape => ({
    name: `3x3 p1, 32 -> 40 on 3x${i + 1} (tile width ${i + 1})`, x: [1, 32, 3, i + 1], w: [40, 32, 3, 3], g: { pads: [1, 1, 1, 1] } })),
  { name: '1x1 N=2, 48 -> 33 on 15x29 (tiles 10+10+9, rows of 8+7)', x: [2, 48, 15, 29], w: [33, 48, 1, 1], g: {} },
  { name: '3x3 s2 p1, 32 -> 64 on 28x28', x: [1, 32, 28, 28], w: [64, 32, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '5x5 s2 asymmetric pads, 16 -> 20 on 13x17', x: [1, 16, 13, 17], w: [20, 16, 5, 5], g: { strides: [2, 2], pads: [2, 0, 1, 2] } },
  { name: '1x1 s2, 64 -> 48 on 14x14', x: [1, 64, 14, 14], w: [48, 64, 1, 1], g: { strides: [2, 2] } },
  { name: '3x3 SAME_UPPER s2, 16 -> 17 on 8x9, N=3', x: [3, 16, 8, 9], w: [17, 16, 3, 3], g: { strides: [2, 2], autoPad: 'SAME_UPPER' } },
  { name: '3x1 SAME_LOWER, 32 -> 96 on 56x7', x: [1, 32, 56, 7], w: [96, 32, 3, 1], g: { autoPad: 'SAME_LOWER' } },
  { name: '3x3 p1, 16 -> 16 on 56x56 (rows of 4 x 14 tiles)', x: [1, 16, 56, 56], w: [16, 16, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '3x3 VALID, 80 -> 50 on 9x10', x: [1, 80, 9, 10], w: [50, 80, 3, 3], g: { autoPad: 'VALID' } },
  // Whole input blocks under 14-pixel tiles of 32 channels (one row of 14, or row pairs of 7) run
  // the tiles' assembly loops: 1x1 and KxK, stride 1 and 2, a kernel of one tap row, and the
  // last tap row's prefetch of the next block.
  { name: '1x1, 48 -> 40 on 5x14 (assembly: 14-pixel tiles, three input blocks)', x: [1, 48, 5, 14], w: [40, 48, 1, 1], g: {} },
  { name: '1x1 N=2, 32 -> 48 on 6x7 (assembly: row pairs)', x: [2, 32, 6, 7], w: [48, 32, 1, 1], g: {} },
  { name: '1x1 s2, 32 -> 40 on 9x27 (assembly: stride-2 14-pixel tiles)', x: [1, 32, 9, 27], w: [40, 32, 1, 1], g: { strides: [2, 2] } },
  { name: '3x3 p1, 48 -> 64 on 6x7 (assembly: row pairs)', x: [1, 48, 6, 7], w: [64, 48, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '3x3 s2 p1, 32 -> 40 on 13x13 (assembly: stride-2 row pairs)', x: [1, 32, 13, 13], w: [40, 32, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '1x3, 32 -> 48 on 4x14 (assembly: one tap row)', x: [1, 32, 4, 14], w: [48, 32, 1, 3], g: { pads: [0, 1, 0, 1] } },
  // 1x1 stride 1 over at most 8 whole blocks to 64+ channels: pair tiles of 6 pixels.
  { name: '1x1 N=2, 32 -> 64 on 5x12 (pair tiles of 6)', x: [2, 32, 5, 12], w: [64, 32, 1, 1], g: {} },
  { name: '1x1, 128 -> 96 on 3x18 (pair tiles of 6, eight blocks, then one of 32)', x: [1, 128, 3, 18], w: [96, 128, 1, 1], g: {} },
  // One vector of output channels in row pairs of 8 pixels: the one-vector assembly form.
  { name: '3x3 p1 N=2, 32 -> 16 on 8x8 (assembly: one-vector row pairs)', x: [2, 32, 8, 8], w: [16, 32, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '1x1 s2, 16 -> 12 on 15x15 (assembly: one vector, stride 2)', x: [1, 16, 15, 15], w: [12, 16, 1, 1], g: { strides: [2, 2] } },
  { name: '3x3 s2 p1, 48 -> 16 on 15x16 (assembly: one vector, stride 2, three blocks)', x: [1, 48, 15, 16], w: [16, 48, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  // 1x1 stride 1 on a plane of >= 784 pixels runs the pointwise GEMM kernel on the blocked weights:
  // row tiles 12 + 12 + 8 of a block, a partial block (45 = 32 + 13), two K blocks (320 > 256).
  { name: '1x1 N=2, 320 -> 45 on 29x28 (pointwise kernel, blocked weights)', x: [2, 320, 29, 28], w: [45, 320, 1, 1], g: {} },
  { name: '1x1 SAME_UPPER, 16 -> 77 on 28x28 (pointwise kernel, blocked weights)', x: [1, 16, 28, 28], w: [77, 16, 1, 1], g: { autoPad: 'SAME_UPPER' } },
  // Input channels in a partial last block (zero weights on its missing lanes).
  { name: '1x1 N=2, 24 -> 144 on 9x11 (partial input block)', x: [2, 24, 9, 11], w: [144, 24, 1, 1], g: {} },
  { name: '3x3 s2 p1, 40 -> 24 on 13x12 (partial input block)', x: [1, 40, 13, 12], w: [24, 40, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '3x3 p1, 8 -> 33 on 5x6 (one half-filled input block)', x: [1, 8, 5, 6], w: [33, 8, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '1x1, 24 -> 40 on 30x29 (pointwise kernel, partial blocked weights)', x: [1, 24, 30, 29], w: [40, 24, 1, 1], g: {} },
];
const D = (fragment: string): Shape => direct.find((c) => c.name.includes(fragment))!;

/**
 * The direct tiles' fused epilogue (activation, residual before or after it) on shapes covering one
 * and two output vectors, both strides and a 1x1 on the pointwise kernel, against the double
 * reference (of the bf16-rounded x and weights for bf16); 2 threads equal 1 bit for bit.
 */
async function checkDirectEpilogue(act: Act, precision: 'fp32' | 'bf16', seed: number,
  variant?: kernels.ConvVariant): Promise<void> {
  const round = (t: Float32Array) => (precision === 'bf16' ? t.map(bf16Round) : t);
  for (const s of [D('tiles 10+10+9'), D('5x5 s2'), D('16 -> 5 on 1x1'), D('1x1 s2, 64'), D('320 -> 45'), D('three input blocks'), D('stride-2 row pairs'), D('one-vector row pairs)'), D('pair tiles of 6')]) {
    const x = randomTensor(s.x, seed);
    const w = randomTensor(s.w, seed + 1);
    for (let i = 0; i < w.size; i++) w.data[i]! *= 3 / Math.sqrt(s.w[1]! * s.w[2]! * s.w[3]!);
    const bias = randomTensor([s.w[0]!], seed + 2);
    const conv = createDirect(w, { ...s.g, bias, precision, activation: act, ...acts[act]!.opts, ...(variant ? { variant } : {}) });
    const ref = refConv(new Tensor('float32', round(x.data), x.dims), round(w.data), s.w, s.g, bias.data);
    expectConv(await conv.run(x), ref, act);
    const r = randomTensor(ref.dims, seed + 3);
    for (const before of [false, true]) {
      const y1 = await conv.run(x, { residual: r, residualBeforeActivation: before, threads: 1 });
      expectConv(y1, ref, act, { r: r.data, before });
      const y2 = await conv.run(x, { residual: r, residualBeforeActivation: before, threads: 2 });
      expect(Array.from(y2.data)).toEqual(Array.from(y1.data));
    }
    conv.dispose();
  }
}

// Stems: convs of at most 4 input channels (see "direct kernel on NCHW input" below).
const stem: Shape[] = [
  { name: '7x7 s2 p3, 3 -> 64 on 45x37 (stem, tiles 10+9, N=2)', x: [2, 3, 45, 37], w: [64, 3, 7, 7], g: { strides: [2, 2], pads: [3, 3, 3, 3] } },
  ...Array.from({ length: 14 }, (_, i): Shape => ({
    name: `3x3 s2 p1, 3 -> 40 on 5x${2 * i + 1} (tile width ${i + 1})`, x: [1, 3, 5, 2 * i + 1], w: [40, 3, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } })),
  { name: '3x3 p1, 1 -> 16 on 7x7 (row pairs, one output vector)', x: [1, 1, 7, 7], w: [16, 1, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '5x3 asymmetric pads, 2 -> 33 on 11x30 (tiles 10+10+10)', x: [1, 2, 11, 30], w: [33, 2, 5, 3], g: { pads: [2, 0, 1, 2] } },
  { name: '3x3 SAME_UPPER s2, 4 -> 7 on 9x8, N=3', x: [3, 4, 9, 8], w: [7, 4, 3, 3], g: { strides: [2, 2], autoPad: 'SAME_UPPER' } },
  { name: '1x1, 3 -> 20 on 29x28 (pointwise kernel, blocked weights)', x: [1, 3, 29, 28], w: [20, 3, 1, 1], g: {} },
  { name: '2x2 VALID s2, 3 -> 96 on 2x2 (one pixel)', x: [1, 3, 2, 2], w: [96, 3, 2, 2], g: { strides: [2, 2], autoPad: 'VALID' } },
  // The fp32 stem tiles' assembly forms: 14-pixel rows and row pairs of 7 (32 channels), row pairs
  // of 8 (16 channels), stride 1 and 2.
  { name: '7x7 s2 p3, 3 -> 64 on 9x55, N=2 (assembly: 14-pixel stem tiles)', x: [2, 3, 9, 55], w: [64, 3, 7, 7], g: { strides: [2, 2], pads: [3, 3, 3, 3] } },
  { name: '3x3 p1, 3 -> 32 on 4x14 (assembly: stride 1)', x: [1, 3, 4, 14], w: [32, 3, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '3x3 p1, 3 -> 40 on 6x7 (assembly: row pairs)', x: [1, 3, 6, 7], w: [40, 3, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '3x3 s2 p1, 3 -> 32 on 13x13 (assembly: stride-2 row pairs)', x: [1, 3, 13, 13], w: [32, 3, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '3x3 p1, 1 -> 16 on 8x8, N=2 (assembly: one-vector row pairs)', x: [2, 1, 8, 8], w: [16, 1, 3, 3], g: { pads: [1, 1, 1, 1] } },
  { name: '3x3 s2 p1, 2 -> 12 on 15x16 (assembly: one vector, stride 2)', x: [1, 2, 15, 16], w: [12, 2, 3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
];

describe.runIf(simd === 'avx512')('direct NCHW16c kernel', () => {
  it.each(direct)('$name', async (s) => {
    const x = randomTensor(s.x, 40);
    const w = randomTensor(s.w, 41);
    const bias = randomTensor([s.w[0]!], 42);
    const conv = createDirect(w, { ...s.g, bias });
    expect([conv.path, conv.ukernel]).toEqual(['direct', 'f32_conv_nchw16c_14x32__avx512']);
    expectConv(await conv.run(x), refConv(x, w.data, s.w, s.g, bias.data));
    conv.dispose();
  });

  it.each(Object.keys(acts) as Act[])('epilogue %s with residual before/after, 1 and 2 threads', (act) => checkDirectEpilogue(act, 'fp32', 43));

  // RunDirectTiles orders its items by what each layer reads from beyond L2 (native/ops/conv.cc), and
  // a task walks its items with a cursor: bands of rows over every block (an input larger than L2,
  // one thread; a short last band), one band per thread (two threads, one image), blocks outermost
  // (weights larger than half of L2, a batch the threads do not divide), and whole images per thread.
  it('every order of the direct tiles matches the reference', async () => {
    const cases = [
      { what: 'bands', x: [1, 256, 48, 48], w: [128, 256, 1, 1], g: { strides: [2, 2] }, threads: 1 },
      { what: 'a band per thread', x: [1, 256, 48, 48], w: [128, 256, 1, 1], g: { strides: [2, 2] }, threads: 2 },
      { what: 'blocks outermost', x: [3, 2048, 3, 3], w: [256, 2048, 1, 1], g: {}, threads: 2 },
      { what: 'images per thread', x: [2, 64, 20, 20], w: [96, 64, 3, 3], g: { pads: [1, 1, 1, 1] }, threads: 2 },
    ];
    for (const c of cases) {
      const x = randomTensor(c.x, 90);
      const w = randomTensor(c.w, 91);
      const bias = randomTensor([c.w[0]!], 92);
      const conv = createDirect(w, { ...c.g, bias, activation: 'relu' });
      expect(conv.path, c.what).toBe('direct');
      const ref = refConv(x, w.data, c.w, c.g, bias.data);
      expectConv(await conv.run(x, { threads: c.threads }), ref, 'relu');
      conv.dispose();
    }
  });

  it('BatchNormalization folded, without a bias', async () => {
    const s = D('3x3 s2 p1, 32 -> 64');
    const co = s.w[0]!;
    const x = randomTensor(s.x, 47);
    const w = randomTensor(s.w, 48);
    const [gamma, beta, mean] = [49, 50, 51].map((seed) => randomTensor([co], seed));
    const variance = new Tensor('float32', new Float32Array(co).map((_, i) => 0.25 + (i % 5)), [co]);
    const conv = createDirect(w, { ...s.g, bn: { scale: gamma!, bias: beta!, mean: mean!, variance } });
    expect(conv.path).toBe('direct');
    const y = await conv.run(x);
    const ref = refConv(x, w.data, s.w, s.g);
    const hw = ref.dims[2]! * ref.dims[3]!;
    for (let i = 0; i < ref.v.length; i++) {
      const c = Math.floor(i / hw) % co;
      const sc = gamma!.data[c]! / Math.sqrt(variance.data[c]! + 1e-5);
      const want = (ref.v[i]! - mean!.data[c]!) * sc + beta!.data[c]!;
      const bound = (ref.k + 5) * u * ref.mag[i]! * Math.abs(sc) + 4 * u * (Math.abs(mean!.data[c]! * sc) + Math.abs(beta!.data[c]!) + Math.abs(want));
      if (!(Math.abs(y.data[i]! - want) <= bound)) throw new Error(`y[${i}] = ${y.data[i]}, want ${want}`);
    }
    conv.dispose();
  });

  it('shapes it does not fit keep their path when forced', () => {
    // 7 input channels would fill 7 of a block's 16 lanes: too few for the direct path.
    for (const [wd, g] of [[[8, 7, 3, 3], {}], [[8, 32, 3, 3], { dilations: [2, 2] }], [[8, 32, 3, 3], { strides: [3, 3] }],
      [[8, 16, 3, 3], { group: 2 }], [[8, 5, 3, 3], {}], [[8, 3, 3, 3], { dilations: [2, 1] }], [[8, 3, 7, 7], { strides: [2, 1] }]] as const) {
      const conv = createDirect(randomTensor([...wd], 52), { ...g } as kernels.Conv2dOptions);
      expect(conv.path).toBe('gemm');
      conv.dispose();
    }
  });
});

// The bf16 direct kernel (vdpbf16ps; precision 'bf16' where the CPU has AVX512_BF16): the same shapes
// and epilogues as the fp32 tiles above. It rounds x and the weights to bf16 and then sums their
// exact products in fp32, so the reference is the double-accumulated conv of the rounded x and
// weights with the fp32 sum bound; the bias stays fp32.
// The AMX tiles (variant 'amx') read the same blocked bf16 input and packed weights: a tile dot
// product per pair of taps, a half-width one for an odd kernel width's last tap; the same bound.
const bf16DirectVariants = [...(bf16Cpu ? ['avx512bf16' as const] : []), ...(amxCpu ? ['amx' as const] : [])];
describe.runIf(simd === 'avx512' && bf16Cpu).each(bf16DirectVariants)('bf16 direct NCHW16c kernel, %s', (variant) => {
  const rounded = (t: Tensor<'float32'>) => t.data.map(bf16Round);
  const name = `bf16_conv_nchw16c_14x32__${variant}`;
  it.each(direct)('$name', async (s) => {
    const x = randomTensor(s.x, 70);
    const w = randomTensor(s.w, 71);
    const bias = randomTensor([s.w[0]!], 72);
    const conv = createDirect(w, { ...s.g, bias, precision: 'bf16', variant });
    expect([conv.path, conv.ukernel, conv.variant]).toEqual(['direct', name, variant]);
    expectConv(await conv.run(x), refConv(new Tensor('float32', rounded(x), x.dims), rounded(w), s.w, s.g, bias.data));
    conv.dispose();
  });

  it.each(Object.keys(acts) as Act[])('epilogue %s with residual before/after, 1 and 2 threads', (act) => checkDirectEpilogue(act, 'bf16', 73, variant));
});

describe.runIf(simd === 'avx512' && bf16Cpu)('bf16 direct kernels', () => {
  const rounded = (t: Tensor<'float32'>) => t.data.map(bf16Round);
  const auto = amxCpu ? 'amx' : 'avx512bf16';
  it('the automatic choice takes the blocked tiles for whole and partial input blocks, and the stem tiles for ResNet-50\'s stem', () => {
    for (const ci of [64, 24]) {
      const conv = kernels.createConv2d(randomTensor([64, ci, 3, 3], 77), { pads: [1, 1, 1, 1], precision: 'bf16' });
      expect([conv.path, conv.ukernel, conv.variant]).toEqual(['direct', `bf16_conv_nchw16c_14x32__${auto}`, auto]);
      conv.dispose();
    }
    // The stem (3 input channels): the avx512bf16 stem tiles, or under 'amx' the fp32 stem tiles on
    // the bf16-rounded weights.
    const stem = kernels.createConv2d(randomTensor([64, 3, 7, 7], 78), { strides: [2, 2], pads: [3, 3, 3, 3], precision: 'bf16' });
    expect([stem.path, stem.ukernel, stem.variant]).toEqual(
      ['direct', amxCpu ? 'f32_conv_nchw_14x32__avx512' : 'bf16_conv_nchw_14x32__avx512bf16', auto]);
    stem.dispose();
  });

  // Stems pair two taps of a row (kx = 2j, 2j + 1; an odd kw's last pair reads a zero column).
  it.each(stem)('stem tiles: $name', async (s) => {
    const x = randomTensor(s.x, 80);
    const w = randomTensor(s.w, 81);
    const bias = randomTensor([s.w[0]!], 82);
    const conv = createDirect(w, { ...s.g, bias, precision: 'bf16', variant: 'avx512bf16' });
    expect([conv.path, conv.ukernel]).toEqual(['direct', 'bf16_conv_nchw_14x32__avx512bf16']);
    expectConv(await conv.run(x), refConv(new Tensor('float32', rounded(x), x.dims), rounded(w), s.w, s.g, bias.data));
    conv.dispose();
  });

  // Under 'amx' the convs off the direct path (groups, dilation) take the fp32 GEMM on the
  // bf16-rounded weights: only the weights are rounded.
  it.runIf(amxCpu)('amx: grouped and dilated convs on the fp32 GEMM with bf16 weights', async () => {
    for (const [opts, wd, xd] of [
      [{ group: 4, pads: [1, 1, 1, 1] }, [32, 8, 3, 3], [1, 32, 9, 11]],
      [{ dilations: [2, 2], pads: [2, 2, 2, 2] }, [24, 16, 3, 3], [2, 16, 10, 7]],
    ] as const) {
      const w = randomTensor([...wd], 86);
      const x = randomTensor([...xd], 87);
      const conv = kernels.createConv2d(w, { ...opts, precision: 'bf16', variant: 'amx' } as kernels.Conv2dOptions);
      expect([conv.path, conv.variant]).toEqual(['gemm', 'amx']);
      expect(conv.ukernel).toMatch(/^f32_/);
      expectConv(await conv.run(x), refConv(x, rounded(w), [...wd], opts as never));
      conv.dispose();
    }
  });

  // Under 'amx' the stems keep x in fp32: only the weights are rounded.
  it.runIf(amxCpu).each(stem)('amx: fp32 stem tiles on bf16 weights: $name', async (s) => {
    const x = randomTensor(s.x, 83);
    const w = randomTensor(s.w, 84);
    const bias = randomTensor([s.w[0]!], 85);
    const conv = createDirect(w, { ...s.g, bias, precision: 'bf16', variant: 'amx' });
    expect([conv.path, conv.ukernel, conv.variant]).toEqual(['direct', 'f32_conv_nchw_14x32__avx512', 'amx']);
    expectConv(await conv.run(x), refConv(x, rounded(w), s.w, s.g, bias.data));
    conv.dispose();
  });
});

// The same direct tiles on a zero-padded NCHW copy for convs of at most 4 input channels (image
// stems: ResNet-50's 3 -> 64 7x7/2, MobileNetV2's 3 -> 32 3x3/2): one input channel per "block", so
// K walks channels x taps with no zero lanes. Tile widths 1..14 and split rows, row pairs (2 rows of
// <= 7 pixels), 1..4 input channels, one or two output vectors and partial blocks, stride 1 and 2
// with odd sizes and asymmetric / SAME pads, batches, against the double reference.

describe.runIf(simd === 'avx512')('direct kernel on NCHW input (few input channels)', () => {
  it.each(stem)('$name', async (s) => {
    const x = randomTensor(s.x, 60);
    const w = randomTensor(s.w, 61);
    const bias = randomTensor([s.w[0]!], 62);
    const conv = createDirect(w, { ...s.g, bias });
    expect([conv.path, conv.ukernel]).toEqual(['direct', 'f32_conv_nchw_14x32__avx512']);
    expectConv(await conv.run(x), refConv(x, w.data, s.w, s.g, bias.data));
    conv.dispose();
  });

  it('the automatic choice takes it for ResNet-50\'s stem', () => {
    const conv = kernels.createConv2d(randomTensor([64, 3, 7, 7], 63), { strides: [2, 2], pads: [3, 3, 3, 3] });
    expect([conv.path, conv.ukernel]).toEqual(['direct', 'f32_conv_nchw_14x32__avx512']);
    conv.dispose();
  });

  it.each(['relu', 'hardSwish'] as Act[])('epilogue %s with residual before/after, 1 and 2 threads', async (act) => {
    for (const s of [stem[0]!, stem[15]!, stem[17]!, stem.find((c) => c.name.includes('14-pixel stem tiles'))!, stem.find((c) => c.name.includes('one vector, stride 2'))!]) {
      const x = randomTensor(s.x, 64);
      const w = randomTensor(s.w, 65);
      const bias = randomTensor([s.w[0]!], 66);
      const conv = createDirect(w, { ...s.g, bias, activation: act, ...acts[act]!.opts });
      const ref = refConv(x, w.data, s.w, s.g, bias.data);
      expectConv(await conv.run(x), ref, act);
      const r = randomTensor(ref.dims, 67);
      for (const before of [false, true]) {
        const y1 = await conv.run(x, { residual: r, residualBeforeActivation: before, threads: 1 });
        expectConv(y1, ref, act, { r: r.data, before });
        const y2 = await conv.run(x, { residual: r, residualBeforeActivation: before, threads: 2 });
        expect(Array.from(y2.data)).toEqual(Array.from(y1.data));
      }
      conv.dispose();
    }
  });
});

/** Pooling reference in double (max pads are -inf; avg divides by kh*kw or the in-bounds taps). */
function refPool(x: Tensor<'float32'>, kind: 'max' | 'avg', k: number[], g: Geo, includePad = false) {
  const [n, c, h, w] = x.dims as number[];
  const [sh, sw] = g.strides ?? [1, 1];
  const [dh, dw] = g.dilations ?? [1, 1];
  const p = g.pads ?? [0, 0, 0, 0];
  const ry = resolve(h!, k[0]!, sh!, dh!, p[0]!, p[2]!, g.autoPad ?? 'NOTSET');
  const rx = resolve(w!, k[1]!, sw!, dw!, p[1]!, p[3]!, g.autoPad ?? 'NOTSET');
  const out = new Float64Array(n! * c! * ry.o * rx.o);
  let idx = 0;
  for (let pl = 0; pl < n! * c!; pl++) {
    for (let oy = 0; oy < ry.o; oy++) {
      for (let ox = 0; ox < rx.o; ox++, idx++) {
        let acc = kind === 'max' ? -Infinity : 0;
        let cnt = 0;
        for (let ky = 0; ky < k[0]!; ky++) {
          for (let kx = 0; kx < k[1]!; kx++) {
            const iy = oy * sh! - ry.pad + ky * dh!;
            const ix = ox * sw! - rx.pad + kx * dw!;
            if (iy < 0 || iy >= h! || ix < 0 || ix >= w!) continue;
            const v = x.data[(pl * h! + iy) * w! + ix]!;
            acc = kind === 'max' ? Math.max(acc, v) : acc + v;
            cnt++;
          }
        }
        out[idx] = kind === 'max' ? acc : acc / (includePad ? k[0]! * k[1]! : cnt);
      }
    }
  }
  return { out, dims: [n, c, ry.o, rx.o] };
}

const poolCases: { name: string; x: number[]; k: number[]; g: Geo }[] = [
  { name: '3x3 s2 p1 (ResNet stem)', x: [1, 5, 17, 19], k: [3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '2x2 s2', x: [2, 3, 8, 9], k: [2, 2], g: { strides: [2, 2] } },
  { name: '3x2 s1 asymmetric pads, dilation 2', x: [1, 4, 9, 40], k: [3, 2], g: { pads: [2, 0, 1, 1], dilations: [2, 2] } },
  { name: '3x3 s3 SAME_LOWER', x: [1, 3, 10, 11], k: [3, 3], g: { strides: [3, 3], autoPad: 'SAME_LOWER' } },
  { name: '5x5 s2 SAME_UPPER', x: [1, 2, 12, 13], k: [5, 5], g: { strides: [2, 2], autoPad: 'SAME_UPPER' } },
  // Rows of more than 64 outputs: the AVX-512 window kernel's groups of four vectors, then 1-3 more.
  { name: '3x3 s2 p1, 75 outputs a row', x: [1, 2, 7, 150], k: [3, 3], g: { strides: [2, 2], pads: [1, 1, 1, 1] } },
  { name: '2x2 s1, 139 outputs a row', x: [1, 2, 4, 140], k: [2, 2], g: {} },
  { name: '3x3 s3 SAME_LOWER, 67 outputs a row (gathered taps)', x: [1, 2, 10, 200], k: [3, 3], g: { strides: [3, 3], autoPad: 'SAME_LOWER' } },
];

describe.each(variants)('pooling, variant %s', (variant) => {
  it.each(poolCases)('$name: max, average (with and without pad counting)', async ({ x: xd, k, g }) => {
    const x = randomTensor(xd, 40);
    const mx = await kernels.maxPool2d(x, { kernelShape: k, ...g, variant });
    const rm = refPool(x, 'max', k, g);
    expect(mx.dims).toEqual(rm.dims);
    expect(Array.from(mx.data)).toEqual(Array.from(rm.out).map(Math.fround));
    for (const countIncludePad of [false, true]) {
      const av = await kernels.averagePool2d(x, { kernelShape: k, ...g, variant, countIncludePad });
      const ra = refPool(x, 'avg', k, g, countIncludePad);
      // Sum of <= k*k terms in float32, then one division or multiplication.
      const taps = k[0]! * k[1]!;
      for (let i = 0; i < ra.out.length; i++) {
        expect(Math.abs(av.data[i]! - ra.out[i]!)).toBeLessThanOrEqual((taps + 2) * u * 1 + 1e-30);
      }
    }
  });

  it('global average pool', async () => {
    const x = randomTensor([2, 7, 13, 11], 41);
    const y = await kernels.globalAveragePool(x, { variant });
    expect(y.dims).toEqual([2, 7, 1, 1]);
    for (let p = 0; p < 14; p++) {
      let s = 0;
      let m = 0;
      for (let i = 0; i < 143; i++) { s += x.data[p * 143 + i]!; m += Math.abs(x.data[p * 143 + i]!); }
      // float32 sums of ~143/4 terms per chain, then the combine and the division.
      expect(Math.abs(y.data[p]! - s / 143)).toBeLessThanOrEqual(((143 / 4 + 8) * u * m) / 143 + 2 * u * Math.abs(s / 143));
    }
  });
});

describe('bad input is a typed error naming the field', () => {
  const x = randomTensor([1, 6, 8, 8]);
  const w = randomTensor([4, 3, 3, 3]);
  it('weight channels vs input channels and group', async () => {
    await expect(kernels.conv2d(x, w)).rejects.toThrow(/x has 6 channels \(dims\[1\]\) but the weights expect 3/);
    await expect(kernels.conv2d(x, w, { group: 3 })).rejects.toThrow(/options.group \(3\) must divide the output channels/);
    await expect(kernels.conv2d(x, w, { group: 2 })).resolves.toBeInstanceOf(Tensor);
    await expect(kernels.conv2d(x, randomTensor([4, 3, 3]))).rejects.toThrow(/weights\) must be 4-D/);
    await expect(kernels.conv2d(randomTensor([6, 8, 8]), w)).rejects.toThrow(/x\) must be 4-D/);
  });
  it('strides, dilations, pads, output size', async () => {
    await expect(kernels.conv2d(x, w, { group: 2, strides: [0, 1] })).rejects.toThrow(/options.strides\[0\] must be an integer in \[1,/);
    await expect(kernels.conv2d(x, w, { group: 2, strides: [1, -2] })).rejects.toThrow(/options.strides\[1\]/);
    await expect(kernels.conv2d(x, w, { group: 2, dilations: [1, 0] })).rejects.toThrow(/options.dilations\[1\]/);
    await expect(kernels.conv2d(x, w, { group: 2, pads: [3, 0, 0, 0] })).rejects.toThrow(/options.pads\[0\] \(3\) must be smaller than the dilated kernel extent along H \(3\)/);
    await expect(kernels.conv2d(x, w, { group: 2, pads: [1, 1, 1] })).rejects.toThrow(/options.pads must be an array of 4/);
    await expect(kernels.conv2d(x, w, { group: 2, dilations: [5, 1] })).rejects.toThrow(/output height would be 0 <= 0 \(input H = 8, dilated kernel 11/);
    await expect(kernels.conv2d(randomTensor([1, 6, 8, 2]), w, { group: 2 })).rejects.toThrow(/output width would be 0 <= 0/);
    await expect(kernels.conv2d(x, w, { group: 2, autoPad: 'SAME' as kernels.ConvAutoPad })).rejects.toThrow(/options.autoPad must be one of/);
    await expect(kernels.conv2d(x, w, { group: 2, autoPad: 'VALID', pads: [1, 1, 1, 1] })).rejects.toThrow(/options.pads must not be given with options.autoPad/);
    await expect(kernels.conv2d(x, w, { group: 2, stride: [1, 1] } as never)).rejects.toThrow(/unknown option 'stride'; did you mean 'strides'/);
  });
  it('bias and bn arrays of the wrong length', async () => {
    const v4 = randomTensor([4]);
    await expect(kernels.conv2d(x, w, { group: 2, bias: randomTensor([5]) })).rejects.toThrow(/options.bias must have dims \[4\]/);
    await expect(kernels.conv2d(x, w, { group: 2, bn: { scale: v4, bias: v4, mean: randomTensor([3]), variance: v4 } }))
      .rejects.toThrow(/options.bn.mean must have dims \[4\] \(one per output channel\), got \[3\]/);
    await expect(kernels.conv2d(x, w, { group: 2, bn: { scale: v4, bias: v4, mean: v4 } as kernels.BatchNormOptions }))
      .rejects.toThrow(/options.bn.variance is required/);
    const neg = new Tensor('float32', new Float32Array([1, 1, -2, 1]), [4]);
    await expect(kernels.conv2d(x, w, { group: 2, bn: { scale: v4, bias: v4, mean: v4, variance: neg, epsilon: 1e-5 } }))
      .rejects.toThrow(/options.bn.variance\[2\] \+ epsilon must be > 0/);
  });
  it('residual shape, activation options, variant', async () => {
    const conv = kernels.createConv2d(w, { group: 2, pads: [1, 1, 1, 1] });
    await expect(conv.run(x, { residual: randomTensor([1, 4, 8, 7]) })).rejects.toThrow(/options.residual must have the output's dims \[1, 4, 8, 8\], got \[1, 4, 8, 7\]/);
    await expect(conv.run(x, { residual: randomTensor([1, 4, 8, 8]) })).resolves.toBeInstanceOf(Tensor);
    expect(() => kernels.createConv2d(w, { activation: 'clip', clipMin: 1 })).toThrow(/needs options.clipMin and options.clipMax/);
    expect(() => kernels.createConv2d(w, { activation: 'relu', alpha: 1 })).toThrow(/options.alpha has no effect/);
    expect(() => kernels.createConv2d(w, { variant: 'avx512bf16' })).toThrow(/needs options.precision 'bf16'/);
    expect(() => kernels.createConv2d(w, { variant: 'amx' })).toThrow(/options.variant 'amx' needs options.precision 'bf16'/);
    if (!amxCpu) {
      expect(() => kernels.createConv2d(w, { precision: 'bf16', variant: 'amx' })).toThrow(DeviceUnavailableError);
      expect(() => kernels.createConv2d(w, { precision: 'bf16', variant: 'amx' })).toThrow(/no AMX-BF16 tiles/);
    }
    expect(() => kernels.createConv2d(w, { precision: 'int8' as 'bf16' })).toThrow(InvalidArgumentError);
    conv.dispose();
  });
  it('dispose then run is a DisposedError; dispose is idempotent; memory is reported and released', async () => {
    const weights = randomTensor([64, 64, 3, 3]);  // (its ArrayBuffer counts as external memory too)
    const before = reportedExternalMemory();
    const conv = kernels.createConv2d(weights, { pads: [1, 1, 1, 1] });
    expect(conv.bytes).toBeGreaterThanOrEqual(64 * 64 * 9 * 4);
    expect(reportedExternalMemory() - before).toBe(conv.bytes);
    conv.dispose();
    conv.dispose();
    expect(reportedExternalMemory()).toBe(before);
    await expect(conv.run(randomTensor([1, 64, 4, 4]))).rejects.toThrow(DisposedError);
  });
  it('options.out is written and validated; an aborted signal rejects with AbortError', async () => {
    const conv = kernels.createConv2d(w, { group: 2, pads: [1, 1, 1, 1], bias: randomTensor([4], 2) });
    const want = await conv.run(x);
    const out = new Tensor('float32', new Float32Array(4 * 64).fill(NaN), [1, 4, 8, 8]);
    expect(await conv.run(x, { out })).toBe(out);
    expect(Array.from(out.data)).toEqual(Array.from(want.data));
    await expect(conv.run(x, { out: randomTensor([1, 4, 8, 9]) })).rejects.toThrow(/options.out must have the output's dims \[1, 4, 8, 8\]/);
    await expect(conv.run(x, { out: x.reshape([1, 4, 8, 12]).reshape([1, 4, 8, 12]) as Tensor<'float32'> })).rejects.toThrow(InvalidArgumentError);
    const ac = new AbortController();
    ac.abort();
    await expect(conv.run(x, { signal: ac.signal })).rejects.toThrow(AbortError);
    await expect(kernels.maxPool2d(x, { kernelShape: [2, 2], signal: ac.signal })).rejects.toThrow(AbortError);
    conv.dispose();
  });
  it('reports how it runs', () => {
    const dense = kernels.createConv2d(w, { group: 2, variant: 'reference' });
    expect([dense.path, dense.ukernel, dense.inChannels, dense.outChannels]).toEqual(['reference', 'f32_conv__reference', 6, 4]);
    const dw = kernels.createConv2d(randomTensor([6, 1, 3, 3]), { group: 6 });
    expect(dw.path).toBe('depthwise');
    expect(dw.outputShape([2, 6, 10, 9])).toEqual([2, 6, 8, 7]);
    dense.dispose();
    dw.dispose();
  });
  it('pooling options', async () => {
    await expect(kernels.maxPool2d(x, {} as kernels.PoolOptions)).rejects.toThrow(/options.kernelShape is required/);
    await expect(kernels.maxPool2d(x, { kernelShape: [3, 3], strides: [0, 1] })).rejects.toThrow(/options.strides\[0\]/);
    await expect(kernels.averagePool2d(x, { kernelShape: [2, 2], pads: [2, 0, 0, 0] })).rejects.toThrow(/options.pads\[0\] \(2\) must be smaller/);
    await expect(kernels.maxPool2d(x, { kernelShape: [9, 1] })).rejects.toThrow(/output height would be 0 <= 0/);
    await expect(kernels.maxPool2d(x, { kernelShape: [2, 2], countIncludePad: true } as kernels.PoolOptions)).rejects.toThrow(/unknown option 'countIncludePad'/);
  });
});
