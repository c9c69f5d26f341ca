// The plan-level NCHW16c layout pass (lib/session/layout.ts) and the blocked conv entry points it
// uses (native/ops/conv.cc RunBlocked, reorder steps, blocked GlobalAveragePool). A direct conv
// computes the same sums in the same order whether its input and output are blocked or NCHW, so a
// blocked plan must equal the same session's plan with the pass off (SONDE_CONV_BLOCKED=0) bit for
// bit on conv outputs; onnxruntime-node is the independent reference for everything.
import { describe, expect, it } from 'vitest';
import { Tensor, devices } from '../dist/index.js';
import type { SessionOptions } from '../dist/index.js';
import { native } from '../lib/binding.js';
import { InternalError, fromNative } from '../lib/errors.js';
import type { PlanSpec } from '../lib/session/plan.js';
import { GraphBuilder } from '../bench/graphs/builder.js';
import { ortRun, uniform, U } from './session-ort.js';
import { convWeights, runWithEnv } from './plan-helpers.js';

const simd = devices().cpu.simd;

const weights = convWeights;

class Net {
  g = new GraphBuilder('nchwc', { opset: 17 });
  seed = 100;
  conv(x: string, cIn: number, cOut: number, k: number, stride = 1, { relu = true, residual }: { relu?: boolean; residual?: string } = {}): string {
    const w = this.g.init(this.g.fresh('w'), weights([cOut, cIn, k, k], this.seed++));
    const b = this.g.init(this.g.fresh('b'), weights([cOut], this.seed++));
    const p = (k - 1) >> 1;
    let [y] = this.g.node('Conv', [x, w, b], { kernel_shape: [k, k], strides: [stride, stride], pads: [p, p, p, p] });
    if (residual) [y] = this.g.node('Add', [y!, residual]);
    if (relu) [y] = this.g.node('Relu', [y!]);
    return y!;
  }
}

/**
 * A ResNet-like graph on odd sizes: bottleneck (3x3 32->16, 3x3 16->48, 1x1 48->32 + input), a
 * stride-2 stage with a 1x1/2 downsample residual, a MaxPool branch, a global average pool head,
 * and a middle conv output as a graph output (pinned to NCHW).
 */
function resnetLike(c: number, h: number, w: number) {
  const n = new Net();
  const x = n.g.input('x', 'float32', ['N', c, h, w]);
  const a = n.conv(x, c, 16, 3);
  const b = n.conv(a, 16, 48, 3);
  const e = n.conv(b, 48, c, 1, 1, { residual: x });
  const f = n.conv(e, c, 32, 3, 2);
  const down = n.conv(e, c, 48, 1, 2, { relu: false });
  const i = n.conv(f, 32, 48, 1, 1, { residual: down });
  const [pool] = n.g.node('GlobalAveragePool', [i]);
  const [mp] = n.g.node('MaxPool', [e], { kernel_shape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1] });
  const k = n.conv(mp!, c, 16, 3);
  n.g.node('Identity', [pool!], {}, ['pooled']);
  n.g.node('Identity', [b], {}, ['middle']);
  n.g.node('Identity', [k], {}, ['branch']);
  for (const o of ['pooled', 'middle', 'branch']) n.g.output(o, 'float32');
  return n.g.toBytes();
}

/** runWithEnv, with the plans keeping their conv steps: inverted-residual blocks fused into
 * convChain steps have their own tests (session-chain.test.ts), against exactly these unfused plans. */
function runWith(bytes: Uint8Array, feeds: Record<string, Tensor>, env: Record<string, string>, options: SessionOptions = {}) {
  return runWithEnv(bytes, feeds, { SONDE_CONV_CHAIN: '0', ...env }, options);
}

/** |got - want| <= atol + rtol |want| elementwise. */
function expectClose(got: ArrayLike<number>, want: ArrayLike<number | bigint>, atol: number, rtol: number, what: string) {
  expect(got.length, what).toBe(want.length);
  for (let i = 0; i < got.length; i++) {
    const w = Number(want[i]);
    const err = Math.abs(got[i]! - w);
    if (!(err <= atol + rtol * Math.abs(w))) throw new Error(`${what}[${i}]: got ${got[i]}, want ${w} (|err| ${err.toExponential(3)})`);
  }
}

// Against onnxruntime-node: each conv's sum of K <= 48 * 9 terms is within gamma_K ~ K U of
// sum |w x| (O(1) with the scaled weights); five convs deep, the difference stays below ~5 * 432 U
// of the activations' scale, ~1.3e-4.
const ORT_TOL = 5 * 432 * U;

describe.runIf(simd === 'avx512')('NCHW16c runs of direct convs in a plan', () => {
  for (const [c, h, w, batch, threads] of [[32, 13, 11, 1, 1], [32, 13, 11, 3, 2], [16, 7, 9, 2, 1], [48, 15, 15, 1, 2], [64, 9, 10, 2, 2]] as const) {
    it(`ResNet-like graph, ${c} channels, ${h}x${w}, batch ${batch}, ${threads} thread(s): equals the NCHW plan and onnxruntime-node`, async () => {
      const bytes = resnetLike(c, h, w);
      const feeds = { x: uniform([batch, c, h, w], 7 + c + h) };
      // Row groups split across threads zero their own border rows and columns: same result.
      const on = await runWith(bytes, feeds, {}, { threads });
      const off = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED: '0' });
      // The pass ran: the input and the pinned middle output are reordered once each; the chain's
      // convs and the MaxPool read and write blocked; none of that without the pass.
      const kernels = (p: typeof on.prof) => p.map((r) => r.kernel);
      expect(kernels(on.prof).filter((k) => k.startsWith('reorder'))).toEqual(['reorder-to-nchw16c', 'reorder-to-nchw16c']);
      expect(kernels(on.prof)).toContain('max+nchw16c-in-out');
      expect(kernels(on.prof).filter((k) => k.startsWith('direct/') && k.endsWith('+nchw16c-in-out'))).toHaveLength(5);
      // b (the pinned middle output) and k (the branch output) read blocked and write NCHW.
      expect(kernels(on.prof).filter((k) => k.endsWith('+nchw16c-in'))).toHaveLength(2);
      expect(kernels(off.prof).some((k) => k.includes('nchw16c') && !k.includes('f32_conv_nchw16c'))).toBe(false);
      expect(kernels(off.prof).filter((k) => k.startsWith('direct/')).length).toBe(7);
      // Same kernel, same order of every sum: bit-identical conv outputs.
      for (const name of ['middle', 'branch']) expect(on.out[name]!.data, name).toEqual(off.out[name]!.data);
      // The pooled head sums lanes in another order than the NCHW pool: within hw U of the mean's scale.
      const hw = Math.ceil(h / 2) * Math.ceil(w / 2);
      expectClose(on.out.pooled!.data as Float32Array, off.out.pooled!.data as Float32Array, 2 * hw * U * 4, 0, 'pooled');
      const want = await ortRun(bytes, feeds);
      for (const name of ['pooled', 'middle', 'branch']) {
        expect([...on.out[name]!.dims]).toEqual([...want[name]!.dims]);
        expectClose(on.out[name]!.data as Float32Array, want[name]!.data as Float32Array, ORT_TOL, ORT_TOL, name);
      }
    });
  }

  // precision 'bf16' on AVX512_BF16: the bf16 direct kernel takes every conv with whole input blocks
  // (the 16-channel-in ones too), converting its blocked fp32 input to bf16 per run. Blocked or NCHW,
  // the conversion sees the same values and the tiles sum in the same order: bit-identical again.
  // Against onnxruntime-node's fp32: each conv rounds x and w to bf16 (up to 2^-8 relative per
  // product of a sum of O(1) magnitude), five convs deep; measured at most 3.2e-3 (atol + rtol).
  it.runIf(devices().cpu.features.includes('avx512bf16'))('precision bf16: the bf16 direct kernel in blocked runs equals the NCHW plan and stays within the bf16 bound of onnxruntime-node', async () => {
    const BF16_TOL = 4 * 2 ** -8;
    for (const [c, h, w, batch, threads] of [[32, 13, 11, 2, 1], [48, 15, 15, 1, 2]] as const) {
      const bytes = resnetLike(c, h, w);
      const feeds = { x: uniform([batch, c, h, w], 3 + c + h) };
      const on = await runWith(bytes, feeds, {}, { threads, precision: 'bf16' });
      const off = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED: '0' }, { precision: 'bf16' });
      // Values only bf16 convs read as x are held in bf16: a (read by b) and f (read by i); e (also a
      // MaxPool's input) and down (a residual) stay float32.
      const held = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED_BF16: '0' }, { threads, precision: 'bf16' });
      const convs = (p: typeof on.prof) => p.filter((r) => r.op === 'conv').map((r) => r.kernel);
      // 'auto' takes the AMX tiles where the CPU has them.
      const bf16Conv = `direct/bf16_conv_nchw16c_14x32__${devices().cpu.features.includes('amx_bf16') ? 'amx' : 'avx512bf16'}`;
      expect(convs(on.prof).filter((k) => k.startsWith(`${bf16Conv}+nchw16c-in-out`))).toHaveLength(5);
      expect(convs(on.prof).filter((k) => k.endsWith('+bf16-out'))).toHaveLength(2);
      expect(convs(on.prof).filter((k) => k.includes('+bf16-in'))).toHaveLength(2);
      expect(convs(held.prof).some((k) => k.includes('+bf16'))).toBe(false);
      expect(convs(off.prof)).toEqual(Array(7).fill(bf16Conv));
      // Rounded where it is made or where it is read: the same bits.
      for (const name of ['middle', 'branch', 'pooled']) expect(on.out[name]!.data, name).toEqual(held.out[name]!.data);
      for (const name of ['middle', 'branch']) expect(on.out[name]!.data, name).toEqual(off.out[name]!.data);
      const want = await ortRun(bytes, feeds);
      for (const name of ['pooled', 'middle', 'branch']) {
        expectClose(on.out[name]!.data as Float32Array, want[name]!.data as Float32Array, BF16_TOL, BF16_TOL, name);
      }
      // And it is not fp32: the rounding happened.
      const fp32 = await runWith(bytes, feeds, {}, { threads });
      expect(fp32.out.middle!.data).not.toEqual(on.out.middle!.data);
    }
  });

  it('1x1 convs on planes of 28x28 and more (the NCHW plan runs them on the pointwise GEMM) match onnxruntime-node', async () => {
    const n = new Net();
    const x = n.g.input('x', 'float32', [1, 16, 29, 30]);
    const a = n.conv(x, 16, 32, 1);
    const b = n.conv(a, 32, 16, 3);
    const d = n.conv(b, 16, 32, 1, 1, { residual: a });
    const [pool] = n.g.node('GlobalAveragePool', [d], {}, ['pooled']);
    n.g.output(pool!, 'float32');
    const bytes = n.g.toBytes();
    const feeds = { x: uniform([1, 16, 29, 30], 3) };
    const on = await runWith(bytes, feeds, {});
    expect(on.prof.filter((r) => r.kernel.startsWith('reorder')).map((r) => r.kernel)).toEqual(['reorder-to-nchw16c']);
    const want = await ortRun(bytes, feeds);
    expectClose(on.out.pooled!.data as Float32Array, want.pooled!.data as Float32Array, ORT_TOL, ORT_TOL, 'pooled');
  });

  it('MobileNetV2-like blocks (1x1 expand, depthwise 3x3 stride 1 and 2, 1x1 project + residual) run blocked and match onnxruntime-node', async () => {
    const n = new Net();
    const g = n.g;
    const x = g.input('x', 'float32', ['N', 32, 15, 13]);
    const dw = (v: string, c: number, stride: number) => {
      const w = g.init(g.fresh('w'), weights([c, 1, 3, 3], n.seed++));
      const b = g.init(g.fresh('b'), weights([c], n.seed++));
      const [y] = g.node('Conv', [v, w, b], { kernel_shape: [3, 3], strides: [stride, stride], pads: [1, 1, 1, 1], group: c });
      return g.node('Relu', [y!])[0]!;
    };
    const e1 = n.conv(x, 32, 96, 1);
    const p1 = n.conv(dw(e1, 96, 1), 96, 32, 1, 1, { relu: false, residual: x });
    const e2 = n.conv(p1, 32, 96, 1);
    const p2 = n.conv(dw(e2, 96, 2), 96, 48, 1, 1, { relu: false });
    g.node('GlobalAveragePool', [p2], {}, ['pooled']);
    g.output('pooled', 'float32');
    const bytes = g.toBytes();
    for (const batch of [1, 2]) {
      const feeds = { x: uniform([batch, 32, 15, 13], 40 + batch) };
      const on = await runWith(bytes, feeds, {});
      const kernels = on.prof.filter((r) => r.op === 'conv').map((r) => r.kernel.replace(/\/.*\+/, '/+'));
      // Every conv but the first expand (its x is the graph input: one reorder) reads and writes blocked.
      expect(kernels).toEqual(['direct/+nchw16c-in-out', 'depthwise/+nchw16c-in-out', 'direct/+nchw16c-in-out',
        'direct/+nchw16c-in-out', 'depthwise/+nchw16c-in-out', 'direct/+nchw16c-in-out']);
      expect(on.prof.filter((r) => r.op === 'reorder')).toHaveLength(1);
      const want = await ortRun(bytes, feeds);
      expectClose(on.out.pooled!.data as Float32Array, want.pooled!.data as Float32Array, ORT_TOL, ORT_TOL, `pooled n${batch}`);
      const off = await runWith(bytes, feeds, { SONDE_CONV_DIRECT: '0' });
      expect(off.prof.some((r) => r.op === 'reorder' || r.kernel.includes('+nchw16c'))).toBe(false);
    }
  });

  it('a batch the threads divide runs a whole image per task (direct and depthwise convs): the bits of one thread', async () => {
    const n = new Net();
    const g = n.g;
    const x = g.input('x', 'float32', ['N', 32, 31, 29]);
    const w = g.init(g.fresh('w'), weights([96, 1, 3, 3], n.seed++));
    const e = n.conv(x, 32, 96, 1);
    const [d] = g.node('Conv', [e, w], { kernel_shape: [3, 3], pads: [1, 1, 1, 1], group: 96 });
    const p = n.conv(g.node('Relu', [d!])[0]!, 96, 32, 1, 1, { relu: false, residual: x });
    g.node('GlobalAveragePool', [p], {}, ['pooled']);
    g.output('pooled', 'float32');
    const bytes = g.toBytes();
    for (const batch of [2, 3, 4]) {
      const feeds = { x: uniform([batch, 32, 31, 29], 60 + batch) };
      const one = await runWith(bytes, feeds, {}, { threads: 1 });
      const two = await runWith(bytes, feeds, {}, { threads: 2 });
      expect(two.prof.filter((r) => r.op === 'conv').map((r) => r.kernel.replace(/\/.*\+/, '/+')))
        .toEqual(['direct/+nchw16c-in-out', 'depthwise/+nchw16c-in-out', 'direct/+nchw16c-in-out']);
      expect(Array.from(two.out.pooled!.data as Float32Array), `batch ${batch}`).toEqual(Array.from(one.out.pooled!.data as Float32Array));
    }
  });

  it('channel counts that are not whole blocks (24, 72, 40) run blocked in padded blocks and equal the NCHW plan', async () => {
    const n = new Net();
    const g = n.g;
    const x = g.input('x', 'float32', ['N', 24, 13, 11]);
    const w = g.init(g.fresh('w'), weights([72, 1, 3, 3], n.seed++));
    const b = g.init(g.fresh('b'), weights([72], n.seed++));
    const e = n.conv(x, 24, 72, 1);
    const [d] = g.node('Conv', [e, w, b], { kernel_shape: [3, 3], strides: [1, 1], pads: [1, 1, 1, 1], group: 72 });
    const p = n.conv(g.node('Relu', [d!])[0]!, 72, 24, 1, 1, { relu: false, residual: x });
    const q = n.conv(p, 24, 40, 3, 2);
    const r = n.conv(q, 40, 40, 3);
    g.node('GlobalAveragePool', [r], {}, ['pooled']);
    g.output('pooled', 'float32');
    const t = n.conv(r, 40, 24, 1);
    g.node('Identity', [t], {}, ['t']);
    g.output('t', 'float32');
    const bytes = g.toBytes();
    for (const [batch, threads] of [[1, 1], [3, 2]] as const) {
      const feeds = { x: uniform([batch, 24, 13, 11], 50 + batch) };
      const on = await runWith(bytes, feeds, {}, { threads });
      const off = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED: '0' });
      const convs = on.prof.filter((s) => s.op === 'conv').map((s) => s.kernel.replace(/\/.*\+/, '/+'));
      // x is reordered once; everything up to t is blocked in and out; t (a graph output) writes
      // NCHW; the pool of 40 channels reads an NCHW copy of r (the blocked pool takes whole blocks).
      expect(convs).toEqual(['direct/+nchw16c-in-out', 'depthwise/+nchw16c-in-out', 'direct/+nchw16c-in-out',
        'direct/+nchw16c-in-out', 'direct/+nchw16c-in-out', 'direct/+nchw16c-in']);
      expect(on.prof.filter((s) => s.op === 'reorder').map((s) => s.kernel)).toEqual(['reorder-to-nchw16c', 'reorder-to-nchw']);
      // The NCHW plan runs the depthwise conv on the window kernel (another order of the taps' sums).
      for (const name of ['t', 'pooled']) expectClose(on.out[name]!.data as Float32Array, off.out[name]!.data as Float32Array, ORT_TOL, ORT_TOL, name);
      const want = await ortRun(bytes, feeds);
      for (const name of ['t', 'pooled']) expectClose(on.out[name]!.data as Float32Array, want[name]!.data as Float32Array, ORT_TOL, ORT_TOL, name);
      // In bf16 the partial blocks run the bf16 tiles, p (read only by q) and q (only by r) held in
      // bf16: the same bits as converting them in their readers, within bf16 rounding of ORT's fp32.
      if (!devices().cpu.features.includes('avx512bf16')) continue;
      const bf = await runWith(bytes, feeds, {}, { threads, precision: 'bf16' });
      const conv = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED_BF16: '0' }, { threads, precision: 'bf16' });
      expect(bf.prof.filter((s) => s.kernel.includes('+bf16-out'))).toHaveLength(2);
      for (const name of ['t', 'pooled']) {
        expect(bf.out[name]!.data).toEqual(conv.out[name]!.data);
        expectClose(bf.out[name]!.data as Float32Array, want[name]!.data as Float32Array, 4 * 2 ** -8, 4 * 2 ** -8, `${name} bf16`);
      }
    }
  });

  // A partial block's lanes past its channels must hold finite values: a bf16 pair (an odd channel
  // count) multiplies the last real channel's neighbour by a zero weight, and 0 * Inf is NaN. With
  // an Inf in the input, the blocked plan must give the NCHW plan's results, NaN for NaN.
  it.runIf(devices().cpu.features.includes('avx512bf16'))('an Inf in the input gives the same results blocked as NCHW with partial blocks of an odd channel count (bf16 pairs)', async () => {
    // Positive weights: the sums that reach the Inf are +Inf (not Inf - Inf) unless a NaN gets in.
    const g = new GraphBuilder('inf', { opset: 17 });
    const positive = (dims: number[], seed: number) => {
      const t = weights(dims, seed);
      return { ...t, data: t.data.map(Math.abs) };
    };
    const x = g.input('x', 'float32', [1, 16, 7, 6]);
    const [a] = g.node('Conv', [x, g.init('wa', positive([25, 16, 3, 3], 82))], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] });
    g.node('Conv', [a!, g.init('wb', positive([16, 25, 3, 3], 83))], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] }, ['y']);
    g.output('y', 'float32');
    const bytes = g.toBytes();
    const feeds = { x: uniform([1, 16, 7, 6], 81) };
    (feeds.x.data as Float32Array)[3 * 42 + 20] = Infinity;
    const want = await ortRun(bytes, feeds);
    const on = await runWith(bytes, feeds, {}, { precision: 'bf16' });
    const off = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED: '0' }, { precision: 'bf16' });
    expect(on.prof.some((r) => r.kernel.includes('+nchw16c-in'))).toBe(true);
    // ORT's +Inf outputs are +Inf in the NCHW plan, and the blocked plan's bits are the NCHW plan's.
    const infs = Array.from(want.y!.data as Float32Array).flatMap((v, i) => (v === Infinity ? [i] : []));
    expect(infs.length).toBeGreaterThan(0);
    for (const i of infs) expect(off.out.y!.data[i]).toBe(Infinity);
    expect(on.out.y!.data).toEqual(off.out.y!.data);
  });

  it('a stem (3 input channels, NCHW x) writes its y blocked for the run after it: no reorder at all', async () => {
    const n = new Net();
    const g = n.g;
    const x = g.input('x', 'float32', ['N', 3, 23, 21]);
    const stem = n.conv(x, 3, 32, 3, 2);
    const w = g.init(g.fresh('w'), weights([32, 1, 3, 3], n.seed++));
    const b = g.init(g.fresh('b'), weights([32], n.seed++));
    const [d] = g.node('Conv', [stem, w, b], { kernel_shape: [3, 3], strides: [1, 1], pads: [1, 1, 1, 1], group: 32 });
    const p = n.conv(g.node('Relu', [d!])[0]!, 32, 16, 1, 1, { relu: false });
    const q = n.conv(p, 16, 48, 3);
    g.node('GlobalAveragePool', [q], {}, ['pooled']);
    g.output('pooled', 'float32');
    const bytes = g.toBytes();
    for (const [batch, threads] of [[1, 1], [2, 2]] as const) {
      const feeds = { x: uniform([batch, 3, 23, 21], 60 + batch) };
      const on = await runWith(bytes, feeds, {}, { threads });
      expect(on.prof.filter((s) => s.op === 'conv').map((s) => s.kernel)).toEqual([
        'direct/f32_conv_nchw_14x32__avx512+nchw16c-out', 'depthwise/f32_dwconv_nchw16c_4px__avx512+nchw16c-in-out',
        'direct/f32_conv_nchw16c_14x32__avx512+nchw16c-in-out', 'direct/f32_conv_nchw16c_14x32__avx512+nchw16c-in-out']);
      expect(on.prof.some((s) => s.op === 'reorder')).toBe(false);
      const want = await ortRun(bytes, feeds);
      for (const name of ['pooled']) expectClose(on.out[name]!.data as Float32Array, want[name]!.data as Float32Array, ORT_TOL, ORT_TOL, name);
    }
  });

  it('max and average pools between convs run blocked, bit for bit the NCHW pools', async () => {
    const cases: [string, Record<string, unknown>][] = [
      ['MaxPool', { kernel_shape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1] }],
      ['MaxPool', { kernel_shape: [2, 3], strides: [1, 2], pads: [0, 2, 1, 0] }],
      ['AveragePool', { kernel_shape: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1], count_include_pad: 0 }],
      ['AveragePool', { kernel_shape: [3, 2], strides: [1, 1], pads: [1, 0, 2, 1], count_include_pad: 1 }],
    ];
    for (const [op, attrs] of cases) {
      const n = new Net();
      const x = n.g.input('x', 'float32', ['N', 16, 11, 13]);
      const a = n.conv(x, 16, 32, 3);
      const [p] = n.g.node(op, [a], attrs);
      const b = n.conv(p!, 32, 16, 3);
      n.g.node('GlobalAveragePool', [b], {}, ['pooled']);
      n.g.node('Identity', [b], {}, ['b']);
      for (const o of ['pooled', 'b']) n.g.output(o, 'float32');
      const bytes = n.g.toBytes();
      for (const [batch, threads] of [[1, 1], [2, 2]] as const) {
        const feeds = { x: uniform([batch, 16, 11, 13], 70 + batch) };
        const on = await runWith(bytes, feeds, {}, { threads });
        const off = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED: '0' });
        const what = `${op} ${JSON.stringify(attrs)} n${batch}`;
        expect(on.prof.map((r) => r.kernel), what).toContain(`${op === 'MaxPool' ? 'max' : 'average'}+nchw16c-in-out`);
        expect(on.prof.filter((r) => r.op === 'reorder'), what).toHaveLength(1);
        expect(on.out.b!.data, what).toEqual(off.out.b!.data);
        const want = await ortRun(bytes, feeds);
        expectClose(on.out.b!.data as Float32Array, want.b!.data as Float32Array, ORT_TOL, ORT_TOL, what);
      }
    }
  });

  it('a conv output read only as the residual of a conv with an NCHW y stays NCHW (no reorder back)', async () => {
    const n = new Net();
    const x = n.g.input('x', 'float32', [1, 32, 9, 11]);
    const a = n.conv(x, 32, 32, 3, 1, { relu: false });
    const y = n.conv(x, 32, 32, 1, 1, { residual: a });
    n.g.node('Identity', [y], {}, ['y']);
    n.g.output('y', 'float32');
    const bytes = n.g.toBytes();
    const feeds = { x: uniform([1, 32, 9, 11], 9) };
    const on = await runWith(bytes, feeds, {});
    expect(on.prof.filter((r) => r.op === 'conv').map((r) => r.kernel)).toEqual(Array(2).fill('direct/f32_conv_nchw16c_14x32__avx512'));
    expect(on.prof.some((r) => r.op === 'reorder')).toBe(false);
    const want = await ortRun(bytes, feeds);
    expectClose(on.out.y!.data as Float32Array, want.y!.data as Float32Array, ORT_TOL, ORT_TOL, 'y');
  });

  it('a blocked conv whose residual dies there writes its y over the residual; not when the residual lives on or is also its x', async () => {
    const n = new Net();
    const x = n.g.input('x', 'float32', [2, 16, 13, 11]);
    // 1x1 convs only, so every blocked value has the same (border-free) layout and only liveness
    // and operands decide.
    const a = n.conv(x, 16, 32, 1);
    const b = n.conv(a, 32, 32, 1, 1, { residual: a }); // a is b's x too: other tiles still read it
    const c = n.conv(b, 32, 32, 1);
    const d = n.conv(c, 32, 32, 1, 1, { residual: b }); // b is read again by f
    const f = n.conv(b, 32, 48, 1, 1, { residual: n.conv(d, 32, 48, 1) }); // that residual dies at f
    const y = n.conv(f, 48, 16, 1);
    n.g.node('Identity', [y], {}, ['y']);
    n.g.output('y', 'float32');
    const bytes = n.g.toBytes();
    const feeds = { x: uniform([2, 16, 13, 11], 19) };
    for (const threads of [1, 2]) {
      const on = await runWith(bytes, feeds, {}, { threads });
      const convs = on.prof.filter((r) => r.op === 'conv');
      expect(convs.map((r) => r.kernel.endsWith('+nchw16c-in-out'))).toEqual([true, true, true, true, true, true, false]);
      // The residual-fused convs are b, d and f; only f's residual storage is free for its y.
      expect(convs.map((r) => r.residualInPlace === true)).toEqual([false, false, false, false, false, true, false]);
      // In place or not, the same sums: bit for bit the NCHW plan, and onnxruntime-node's values.
      const off = await runWith(bytes, feeds, { SONDE_CONV_BLOCKED: '0' }, { threads });
      expect(off.prof.some((r) => r.residualInPlace)).toBe(false);
      expect(on.out.y!.data).toEqual(off.out.y!.data);
      const want = await ortRun(bytes, feeds);
      expectClose(on.out.y!.data as Float32Array, want.y!.data as Float32Array, ORT_TOL, ORT_TOL, 'y');
    }
  });

  it('SONDE_CONV_DIRECT=0 turns the blocked runs off with the direct path', async () => {
    const bytes = resnetLike(32, 9, 9);
    const feeds = { x: uniform([1, 32, 9, 9], 5) };
    const off = await runWith(bytes, feeds, { SONDE_CONV_DIRECT: '0' });
    expect(off.prof.some((r) => r.op === 'reorder' || r.kernel.includes('nchw16c'))).toBe(false);
    const want = await ortRun(bytes, feeds);
    for (const name of ['pooled', 'middle', 'branch']) {
      expectClose(off.out[name]!.data as Float32Array, want[name]!.data as Float32Array, ORT_TOL, ORT_TOL, name);
    }
  });

  it('blocked entry points in a hand-written plan: reorder, conv with blocked x, y and residual, blocked pool, conv to NCHW', async () => {
    // 48 channels = a 32-channel output block and a 16-channel one; 5x7 with a 1-pixel border; then
    // a stride-2 conv reading that border as its padding. The arena under the blocked y is filled
    // with 7s first, so a border the conv fails to zero shows up in the second conv.
    const n = 2, c = 48, h = 5, w = 7, c2 = 32, oh2 = 3, ow2 = 4;
    const w1 = weights([c, c, 3, 3], 21).data, b1 = weights([c], 22).data;
    const w2 = weights([c2, c, 3, 3], 23).data, b2 = weights([c2], 24).data;
    const mk = (wt: Float32Array, bias: Float32Array, cOut: number, stride: number, activation: number) => native().createConv(wt, {
      cOut, cIn: c, group: 1, kernel: [3, 3], strides: [stride, stride], dilations: [1, 1], pads: [1, 1, 1, 1],
      autoPad: 0, bias, bnEpsilon: 1e-5, activation, alpha: 0, beta: 0, precision: 'fp32', variant: 'auto',
    });
    const conv1 = mk(w1, b1, c, 1, 1), conv2 = mk(w2, b2, c2, 2, 0);
    try {
      expect([conv1.info().path, conv2.info().path]).toEqual(['direct', 'direct']);
      const x = uniform([n, c, h, w], 31).data as Float32Array, r = uniform([n, c, h, w], 32).data as Float32Array;
      const xl = { h, w, pads: [1, 1, 1, 1] as [number, number, number, number] };
      const rl = { h, w, pads: [0, 0, 0, 0] as [number, number, number, number] };
      const yl = { h, w, pads: [1, 1, 2, 1] as [number, number, number, number] };
      const nchw = n * c * h * w * 4, xb = n * c * 7 * 9 * 4, rb = nchw, yb = n * c * 8 * 9 * 4;
      const up = (v: number) => Math.ceil(v / 64) * 64;
      const ref = (buffer: number) => ({ buffer, offset: 0 });
      const spec: PlanSpec = {
        buffers: [{ kind: 'input', index: 0, bytes: nchw }, { kind: 'input', index: 1, bytes: nchw },
          { kind: 'arena', offset: 0, bytes: xb }, { kind: 'arena', offset: up(xb), bytes: rb },
          { kind: 'arena', offset: up(xb) + up(rb), bytes: yb },
          { kind: 'output', index: 0, bytes: nchw }, { kind: 'output', index: 1, bytes: n * c * 4 },
          { kind: 'output', index: 2, bytes: n * c2 * oh2 * ow2 * 4 }],
        steps: [
          { node: 'fill', op: 'fill', y: ref(4), dtype: 'float32', count: yb / 4, value: 7 },
          { node: 'rx', op: 'reorder', x: ref(0), y: ref(2), n, c, layout: xl, toBlocked: true },
          { node: 'rr', op: 'reorder', x: ref(1), y: ref(3), n, c, layout: rl, toBlocked: true },
          { node: 'conv1', op: 'conv', handle: conv1, x: ref(2), y: ref(4), residual: ref(3), residualBeforeActivation: true,
            n, h, w, xBlocked: xl, yBlocked: yl, residualBlocked: rl },
          { node: 'back', op: 'reorder', x: ref(4), y: ref(5), n, c, layout: yl, toBlocked: false },
          { node: 'gap', op: 'globalAveragePool', x: ref(4), y: ref(6), planes: n * c, hw: h * w, xBlocked: yl },
          { node: 'conv2', op: 'conv', handle: conv2, x: ref(4), y: ref(7), residualBeforeActivation: false, n, h, w, xBlocked: yl },
        ],
        arenaBytes: up(xb) + up(rb) + yb, inputBytes: [nchw, nchw], outputBytes: [nchw, n * c * 4, n * c2 * oh2 * ow2 * 4],
      };
      const plan = native().createPlan(spec);
      const y1 = new Float32Array(n * c * h * w), pooled = new Float32Array(n * c), y2 = new Float32Array(n * c2 * oh2 * ow2);
      try {
        await native().planRun(plan, [x, r], [y1, pooled, y2], 1);
      } finally {
        plan.dispose();
      }
      // Scalar references in double, padding read as zero.
      const conv = (src: ArrayLike<number>, wt: Float32Array, bias: Float32Array, cOut: number, stride: number, oh: number, ow: number,
        res: Float32Array | undefined, relu: boolean) => {
        const out = new Float64Array(n * cOut * oh * ow);
        for (let b = 0; b < n; b++) for (let co = 0; co < cOut; co++) for (let oy = 0; oy < oh; oy++) for (let ox = 0; ox < ow; ox++) {
          let acc = bias[co]!;
          for (let ci = 0; ci < c; ci++) for (let ky = 0; ky < 3; ky++) for (let kx = 0; kx < 3; kx++) {
            const iy = oy * stride + ky - 1, ix = ox * stride + kx - 1;
            if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
            acc += wt[((co * c + ci) * 3 + ky) * 3 + kx]! * src[((b * c + ci) * h + iy) * w + ix]!;
          }
          const at = ((b * cOut + co) * oh + oy) * ow + ox;
          if (res) acc += res[at]!;
          out[at] = relu ? Math.max(0, acc) : acc;
        }
        return out;
      };
      const want1 = conv(x, w1, b1, c, 1, h, w, r, true);
      // K = 48 * 9 = 432 terms of O(1 / sqrt(K)) each: float32 sums within ~K U of sum |terms| <= ~sqrt(K).
      const tol = 432 * U * Math.sqrt(432) * 2;
      expectClose(y1, want1, tol, 0, 'conv1');
      const wantPool = Array.from({ length: n * c }, (_, p) => want1.slice(p * h * w, (p + 1) * h * w).reduce((a, v) => a + v, 0) / (h * w));
      expectClose(pooled, wantPool, tol, 0, 'pooled');
      expectClose(y2, conv(y1, w2, b2, c2, 2, oh2, ow2, undefined, false), tol * 4, 0, 'conv2');
    } finally {
      conv1.dispose();
      conv2.dispose();
    }
  });

  it('blocked depthwise in a hand-written plan: stride 1 with a blocked residual and ReLU, then stride 2 reading its border', async () => {
    // 48 channels (three blocks), 5x7: rows of 7 and 4 pixels run the 4-pixel pass and the tail.
    const n = 2, c = 48, h = 5, w = 7, oh2 = 3, ow2 = 4;
    const w1 = weights([c, 1, 3, 3], 51).data, b1 = weights([c], 52).data;
    const w2 = weights([c, 1, 3, 3], 53).data, b2 = weights([c], 54).data;
    const mk = (wt: Float32Array, bias: Float32Array, stride: number, activation: number) => native().createConv(wt, {
      cOut: c, cIn: c, group: c, kernel: [3, 3], strides: [stride, stride], dilations: [1, 1], pads: [1, 1, 1, 1],
      autoPad: 0, bias, bnEpsilon: 1e-5, activation, alpha: 0, beta: 0, precision: 'fp32', variant: 'auto',
    });
    const dw1 = mk(w1, b1, 1, 1), dw2 = mk(w2, b2, 2, 0);
    try {
      expect([dw1.info().blocked, dw2.info().blocked]).toEqual(['xy', 'xy']);
      const x = uniform([n, c, h, w], 61).data as Float32Array, r = uniform([n, c, h, w], 62).data as Float32Array;
      const P = (t: number, l: number, b: number, rr: number) => [t, l, b, rr] as [number, number, number, number];
      const xl = { h, w, pads: P(1, 1, 1, 1) }, rl = { h, w, pads: P(0, 0, 0, 0) }, yl = { h, w, pads: P(1, 1, 1, 1) };
      const y2l = { h: oh2, w: ow2, pads: P(0, 0, 0, 0) };
      const nchw = n * c * h * w * 4, xb = n * c * 7 * 9 * 4, yb = xb, y2 = n * c * oh2 * ow2 * 4;
      const up = (v: number) => Math.ceil(v / 64) * 64;
      const ref = (buffer: number) => ({ buffer, offset: 0 });
      const at = [0, up(xb), up(xb) + up(nchw), up(xb) + up(nchw) + up(yb)];
      const spec: PlanSpec = {
        buffers: [{ kind: 'input', index: 0, bytes: nchw }, { kind: 'input', index: 1, bytes: nchw },
          { kind: 'arena', offset: at[0]!, bytes: xb }, { kind: 'arena', offset: at[1]!, bytes: nchw },
          { kind: 'arena', offset: at[2]!, bytes: yb }, { kind: 'arena', offset: at[3]!, bytes: y2 },
          { kind: 'output', index: 0, bytes: nchw }, { kind: 'output', index: 1, bytes: y2 }],
        steps: [
          { node: 'fill', op: 'fill', y: ref(4), dtype: 'float32', count: yb / 4, value: 7 },
          { node: 'rx', op: 'reorder', x: ref(0), y: ref(2), n, c, layout: xl, toBlocked: true },
          { node: 'rr', op: 'reorder', x: ref(1), y: ref(3), n, c, layout: rl, toBlocked: true },
          { node: 'dw1', op: 'conv', handle: dw1, x: ref(2), y: ref(4), residual: ref(3), residualBeforeActivation: false,
            n, h, w, xBlocked: xl, yBlocked: yl, residualBlocked: rl },
          { node: 'dw2', op: 'conv', handle: dw2, x: ref(4), y: ref(5), residualBeforeActivation: false, n, h, w,
            xBlocked: yl, yBlocked: y2l },
          { node: 'back1', op: 'reorder', x: ref(4), y: ref(6), n, c, layout: yl, toBlocked: false },
          { node: 'back2', op: 'reorder', x: ref(5), y: ref(7), n, c, layout: y2l, toBlocked: false },
        ],
        arenaBytes: at[3]! + y2, inputBytes: [nchw, nchw], outputBytes: [nchw, y2],
      };
      // A depthwise conv never reads blocked into an NCHW y.
      expect(() => native().createPlan({ ...spec, steps: [{ ...spec.steps[4]!, yBlocked: undefined } as never] })).toThrow(/needs a blocked y/);
      const plan = native().createPlan(spec);
      const got1 = new Float32Array(nchw / 4), got2 = new Float32Array(y2 / 4);
      try {
        await native().planRun(plan, [x, r], [got1, got2], 2);
      } finally {
        plan.dispose();
      }
      const dw = (src: ArrayLike<number>, wt: Float32Array, bias: Float32Array, stride: number, oh: number, ow: number,
        res: Float32Array | undefined, relu: boolean) => {
        const out = new Float64Array(n * c * oh * ow);
        for (let p = 0; p < n * c; p++) for (let oy = 0; oy < oh; oy++) for (let ox = 0; ox < ow; ox++) {
          let acc = bias[p % c]!;
          for (let ky = 0; ky < 3; ky++) for (let kx = 0; kx < 3; kx++) {
            const iy = oy * stride + ky - 1, ix = ox * stride + kx - 1;
            if (iy >= 0 && iy < h && ix >= 0 && ix < w) acc += wt[(p % c) * 9 + ky * 3 + kx]! * src[(p * h + iy) * w + ix]!;
          }
          if (relu) acc = Math.max(0, acc);
          const i = (p * oh + oy) * ow + ox;
          out[i] = res ? acc + res[i]! : acc;
        }
        return out;
      };
      // About 10 roundings (nine FMAs, the residual add), each within U of a partial sum bounded by
      // the terms' magnitudes: weights and bias below 1/3, dw1's inputs and residual below 1 (sum
      // <= 4.4), dw2's inputs below 4.4 (sum <= 13.6).
      expectClose(got1, dw(x, w1, b1, 1, h, w, r, true), 10 * 4.4 * U, 0, 'dw1');
      expectClose(got2, dw(got1, w2, b2, 2, oh2, ow2, undefined, false), 10 * 13.6 * U, 0, 'dw2');
    } finally {
      dw1.dispose();
      dw2.dispose();
    }
  });

  it('the native plan rejects a blocked x whose border does not cover the padding, and a blocked residual with an NCHW y', () => {
    const conv = native().createConv(weights([16, 16, 3, 3], 1).data, {
      cOut: 16, cIn: 16, group: 1, kernel: [3, 3], strides: [1, 1], dilations: [1, 1], pads: [1, 1, 1, 1],
      autoPad: 0, bnEpsilon: 1e-5, activation: 0, alpha: 0, beta: 0, precision: 'fp32', variant: 'auto',
    });
    try {
      expect(conv.info().path).toBe('direct');
      const spec = (step: Record<string, unknown>): PlanSpec => ({
        buffers: [{ kind: 'input', index: 0, bytes: 16 * 7 * 7 * 4 }, { kind: 'output', index: 0, bytes: 16 * 5 * 5 * 4 },
          { kind: 'input', index: 1, bytes: 16 * 5 * 5 * 4 }],
        steps: [{ node: 'c', op: 'conv', handle: conv, x: { buffer: 0, offset: 0 }, y: { buffer: 1, offset: 0 },
          residualBeforeActivation: false, n: 1, h: 5, w: 5, ...step } as never],
        arenaBytes: 0, inputBytes: [16 * 7 * 7 * 4, 16 * 5 * 5 * 4], outputBytes: [16 * 5 * 5 * 4],
      });
      const create = (s: PlanSpec) => {
        try {
          native().createPlan(s).dispose();
        } catch (err) {
          throw fromNative(err);
        }
      };
      create(spec({ xBlocked: { h: 5, w: 5, pads: [1, 1, 1, 1] } }));
      expect(() => create(spec({ xBlocked: { h: 5, w: 5, pads: [0, 1, 1, 1] } }))).toThrow(InternalError);
      expect(() => create(spec({ xBlocked: { h: 5, w: 5, pads: [1, 1, 1, 1] }, residual: { buffer: 2, offset: 0 },
        residualBlocked: { h: 5, w: 5, pads: [0, 0, 0, 0] } }))).toThrow(/blocked exactly when y is/);
      expect(() => create(spec({ yBlocked: { h: 5, w: 5, pads: [0, 0, 0, 0] } }))).toThrow(/needs a blocked x/);
      // A blocked pool: x and y both blocked, whole 16-channel blocks, float32, no dilation.
      const pool = (step: Record<string, unknown>, xBytes = 16 * 7 * 7 * 4, yBytes = 16 * 5 * 5 * 4): PlanSpec => ({
        buffers: [{ kind: 'input', index: 0, bytes: xBytes }, { kind: 'output', index: 0, bytes: yBytes }],
        steps: [{ node: 'p', op: 'pool', kind: 0, x: { buffer: 0, offset: 0 }, y: { buffer: 1, offset: 0 }, planes: 16, h: 5, w: 5,
          kernel: [3, 3], strides: [1, 1], dilations: [1, 1], pads: [1, 1, 1, 1], countIncludePad: false, ...step } as never],
        arenaBytes: 0, inputBytes: [xBytes], outputBytes: [yBytes],
      });
      const l55 = (pads: number[]) => ({ h: 5, w: 5, pads });
      create(pool({ xBlocked: l55([1, 1, 1, 1]), yBlocked: l55([0, 0, 0, 0]) }));
      expect(() => create(pool({ xBlocked: l55([1, 1, 1, 1]) }))).toThrow(/both be blocked or both NCHW/);
      expect(() => create(pool({ xBlocked: l55([1, 1, 1, 1]), yBlocked: l55([0, 0, 0, 0]), planes: 8 }, 8 * 7 * 7 * 4, 8 * 5 * 5 * 4)))
        .toThrow(/whole blocks of 16/);
      expect(() => create(pool({ xBlocked: l55([1, 1, 1, 1]), yBlocked: l55([0, 0, 0, 0]), dilations: [2, 2] }, 16 * 7 * 7 * 4, 16 * 3 * 3 * 4)))
        .toThrow(/no dilation|not the output size/);
      expect(() => create(pool({ xBlocked: l55([1, 1, 1, 1]), yBlocked: { h: 4, w: 5, pads: [0, 0, 0, 0] } }))).toThrow(/not the output size/);
      expect(() => create(pool({ xBlocked: { ...l55([1, 1, 1, 1]), bf16: true }, yBlocked: l55([0, 0, 0, 0]) }))).toThrow(/float32/);
      expect(() => create(pool({ xBlocked: l55([1, 1, 1, 1]), yBlocked: l55([0, 0, 0, 0]) }, 16 * 6 * 6 * 4))).toThrow(InternalError);
      // Only a stem takes an NCHW x with a blocked y; its y layout must be the output size.
      const stem = native().createConv(weights([16, 3, 3, 3], 2).data, {
        cOut: 16, cIn: 3, group: 1, kernel: [3, 3], strides: [1, 1], dilations: [1, 1], pads: [1, 1, 1, 1],
        autoPad: 0, bnEpsilon: 1e-5, activation: 0, alpha: 0, beta: 0, precision: 'fp32', variant: 'auto',
      });
      try {
        expect(stem.info().blocked).toBe('y');
        const stemSpec = (yBlocked: unknown, yBytes: number): PlanSpec => ({
          buffers: [{ kind: 'input', index: 0, bytes: 3 * 5 * 5 * 4 }, { kind: 'output', index: 0, bytes: yBytes }],
          steps: [{ node: 's', op: 'conv', handle: stem, x: { buffer: 0, offset: 0 }, y: { buffer: 1, offset: 0 },
            residualBeforeActivation: false, n: 1, h: 5, w: 5, yBlocked } as never],
          arenaBytes: 0, inputBytes: [3 * 5 * 5 * 4], outputBytes: [yBytes],
        });
        create(stemSpec({ h: 5, w: 5, pads: [1, 1, 1, 1] }, 16 * 7 * 7 * 4));
        expect(() => create(stemSpec({ h: 4, w: 5, pads: [1, 1, 1, 1] }, 16 * 6 * 7 * 4))).toThrow(/not the output size/);
        expect(() => create(stemSpec({ h: 5, w: 5, pads: [1, 1, 1, 1] }, 16 * 5 * 5 * 4))).toThrow(InternalError);
        expect(() => create(stemSpec({ h: 5, w: 5, pads: [1, 1, 1, 1], bf16: true }, 16 * 7 * 7 * 2))).toThrow(/bf16 direct path/);
      } finally {
        stem.dispose();
      }
    } finally {
      conv.dispose();
    }
  });
});

describe.runIf(simd === 'avx512' && devices().cpu.features.includes('avx512bf16'))('bf16 blocked operands in the native plan', () => {
  it('only the bf16 direct path takes them, never as a residual, a reorder or a pool input; their buffers hold 2 bytes an element', () => {
    const mk = (precision: 'fp32' | 'bf16') => native().createConv(weights([16, 16, 3, 3], 1).data, {
      cOut: 16, cIn: 16, group: 1, kernel: [3, 3], strides: [1, 1], dilations: [1, 1], pads: [1, 1, 1, 1],
      autoPad: 0, bnEpsilon: 1e-5, activation: 0, alpha: 0, beta: 0, precision, variant: 'auto',
    });
    const bf16 = mk('bf16'), fp32 = mk('fp32');
    try {
      expect([bf16.info().blockedBf16, fp32.info().blockedBf16]).toEqual([true, undefined]);
      const x = 16 * 7 * 7, y = 16 * 7 * 7;  // elements of a 5x5 interior with a 1-pixel border
      const spec = (handle: unknown, xBytes: number, yBytes: number, step: Record<string, unknown>, extra: PlanSpec['steps'] = []): PlanSpec => ({
        buffers: [{ kind: 'input', index: 0, bytes: xBytes }, { kind: 'output', index: 0, bytes: yBytes },
          { kind: 'input', index: 1, bytes: y * 4 }, { kind: 'output', index: 1, bytes: 16 * 4 }],
        steps: [{ node: 'c', op: 'conv', handle, x: { buffer: 0, offset: 0 }, y: { buffer: 1, offset: 0 },
          residualBeforeActivation: false, n: 1, h: 5, w: 5, ...step } as never, ...extra],
        arenaBytes: 0, inputBytes: [xBytes, y * 4], outputBytes: [yBytes, 16 * 4],
      });
      const create = (s: PlanSpec) => {
        try {
          native().createPlan(s).dispose();
        } catch (err) {
          throw fromNative(err);
        }
      };
      const l = (bf: boolean) => ({ h: 5, w: 5, pads: [1, 1, 1, 1], ...(bf ? { bf16: true } : {}) });
      create(spec(bf16, x * 2, y * 2, { xBlocked: l(true), yBlocked: l(true) }));
      create(spec(bf16, x * 2, y * 4, { xBlocked: l(true), yBlocked: l(false) }));
      create(spec(bf16, x * 4, y * 2, { xBlocked: l(false), yBlocked: l(true) }));
      // A float32 layout needs 4 bytes an element.
      expect(() => create(spec(bf16, x * 2, y * 4, { xBlocked: l(false) }))).toThrow(InternalError);
      expect(() => create(spec(fp32, x * 2, y * 4, { xBlocked: l(true) }))).toThrow(/bf16 blocked operands need the bf16 direct path/);
      expect(() => create(spec(fp32, x * 4, y * 2, { xBlocked: l(false), yBlocked: l(true) }))).toThrow(/bf16 direct path/);
      expect(() => create(spec(bf16, x * 2, y * 4, { xBlocked: l(true), yBlocked: l(false), residual: { buffer: 2, offset: 0 },
        residualBlocked: l(true) }))).toThrow(/residual must be float32/);
      expect(() => create(spec(bf16, x * 2, y * 2, { xBlocked: l(true), yBlocked: l(true) },
        [{ node: 'r', op: 'reorder', x: { buffer: 1, offset: 0 }, y: { buffer: 2, offset: 0 }, n: 1, c: 16, layout: l(true), toBlocked: false } as never])))
        .toThrow(/reorders are float32/);
      expect(() => create(spec(bf16, x * 2, y * 2, { xBlocked: l(true), yBlocked: l(true) },
        [{ node: 'g', op: 'globalAveragePool', x: { buffer: 1, offset: 0 }, y: { buffer: 3, offset: 0 }, planes: 16, hw: 25, xBlocked: l(true) } as never])))
        .toThrow(/blocked x must be float32/);
      expect(() => create(spec(bf16, x * 2, y * 2, { xBlocked: { ...l(true), bf16: 1 }, yBlocked: l(true) }))).toThrow(/bf16 must be a boolean/);
    } finally {
      bf16.dispose();
      fp32.dispose();
    }
  });
});

describe.runIf(simd !== 'avx512')('without AVX-512 (no direct path)', () => {
  it('plans keep NCHW: no reorder steps, no blocked convs, outputs match onnxruntime-node', async () => {
    const bytes = resnetLike(32, 9, 9);
    const feeds = { x: uniform([1, 32, 9, 9], 5) };
    const got = await runWith(bytes, feeds, {});
    expect(got.prof.some((r) => r.op === 'reorder' || r.kernel.includes('nchw16c'))).toBe(false);
    const want = await ortRun(bytes, feeds);
    for (const name of ['pooled', 'middle', 'branch']) {
      expectClose(got.out[name]!.data as Float32Array, want[name]!.data as Float32Array, ORT_TOL, ORT_TOL, name);
    }
  });
});
