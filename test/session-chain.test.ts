// Fused inverted-residual blocks (lib/session/chain.ts, native ConvChain): a plan's 1x1 expand,
// depthwise and 1x1 project convs on blocked activations run as one step in strips of output rows.
// Every pixel goes through the same tiles in the same order as the three conv steps, so a chained
// plan must equal the same session's plan with the pass off (SONDE_CONV_CHAIN=0) bit for bit, at
// every strip height (SONDE_CHAIN_STRIP_KB, down to one row a strip), thread count and batch;
// onnxruntime-node is the independent reference.
import { describe, expect, it } from 'vitest';
import { devices } from '../dist/index.js';
import { native } from '../lib/binding.js';
import { InternalError, fromNative } from '../lib/errors.js';
import type { PlanSpec } from '../lib/session/plan.js';
import { GraphBuilder } from '../bench/graphs/builder.js';
import { ortRun, uniform, U } from './session-ort.js';
import { convWeights, runWithEnv } from './plan-helpers.js';

const simd = devices().cpu.simd;

const weights = convWeights;

class Net {
  g = new GraphBuilder('chain', { opset: 17 });
  seed = 300;
  lo = this.g.init('relu6_lo', { dtype: 'float32', dims: [], data: new Float32Array([0]) });
  hi = this.g.init('relu6_hi', { dtype: 'float32', dims: [], data: new Float32Array([6]) });
  conv(x: string, cIn: number, cOut: number, k: number, { stride = 1, group = 1, act = 'relu6', residual }:
    { stride?: number; group?: number; act?: 'relu6' | 'relu' | 'none'; residual?: string } = {}): string {
    const w = this.g.init(this.g.fresh('w'), weights([cOut, cIn / group, k, k], this.seed++));
    const b = this.g.init(this.g.fresh('b'), weights([cOut], this.seed++));
    const p = (k - 1) >> 1;
    let [y] = this.g.node('Conv', [x, w, b], { kernel_shape: [k, k], strides: [stride, stride], pads: [p, p, p, p], group });
    if (act === 'relu6') [y] = this.g.node('Clip', [y!, this.lo, this.hi]);
    if (act === 'relu') [y] = this.g.node('Relu', [y!]);
    if (residual) [y] = this.g.node('Add', [y!, residual]);
    return y!;
  }
  /** MobileNetV2's block: [1x1 expand + ReLU6], depthwise 3x3 + ReLU6, 1x1 project (+ x). */
  block(x: string, cIn: number, cOut: number, t: number, stride: number): string {
    const c = cIn * t;
    const e = t === 1 ? x : this.conv(x, cIn, c, 1);
    const d = this.conv(e, c, c, 3, { stride, group: c });
    return this.conv(d, c, cOut, 1, { act: 'none', residual: stride === 1 && cIn === cOut ? x : undefined });
  }
}

/**
 * A MobileNetV2-like graph on odd sizes: a stride-2 stem, a block without expansion, a stride-2
 * block whose output is also a graph output (pinned to NCHW, so that block stays three conv
 * steps), a block with a residual, and one whose output is narrow enough (<= 7 columns) for the
 * two-row tiles, into a global average pool.
 */
function mobileLike(h: number, w: number) {
  const n = new Net();
  const x = n.g.input('x', 'float32', ['N', 3, h, w]);
  const s = n.conv(x, 3, 16, 3, { stride: 2 });
  const a = n.block(s, 16, 24, 1, 1);
  const b = n.block(a, 24, 24, 6, 2);
  const c = n.block(b, 24, 24, 6, 1);
  const d = n.block(c, 24, 48, 4, 1);
  n.g.node('GlobalAveragePool', [d], {}, ['pooled']);
  n.g.node('Identity', [b], {}, ['middle']);
  for (const o of ['pooled', 'middle']) n.g.output(o, 'float32');
  return n.g.toBytes();
}

// SONDE_CONV_CHAIN and SONDE_CHAIN_STRIP_KB are read when the plan is built (the first run).
const runWith = runWithEnv;

function expectClose(got: ArrayLike<number>, want: ArrayLike<number>, tol: number, what: string) {
  expect(got.length, what).toBe(want.length);
  for (let i = 0; i < got.length; i++) {
    const err = Math.abs(got[i]! - want[i]!);
    if (!(err <= tol + tol * Math.abs(want[i]!))) throw new Error(`${what}[${i}]: got ${got[i]}, want ${want[i]} (|err| ${err.toExponential(3)})`);
  }
}

// Against onnxruntime-node: each conv's sum of at most K = 144 terms (a 1x1 of 144 channels) is
// within gamma_K ~ K U of sum |w x|, O(1) with the scaled weights; nine convs deep.
const ORT_TOL = 9 * 144 * U;

describe.runIf(simd === 'avx512')('fused inverted-residual blocks (convChain)', () => {
  for (const [h, w, batch, threads] of [[29, 27, 1, 1], [29, 27, 1, 2], [25, 31, 3, 2], [17, 13, 2, 2], [33, 30, 2, 1]] as const) {
    it(`MobileNetV2-like graph ${h}x${w}, batch ${batch}, ${threads} thread(s): equals the unfused plan at every strip height, and onnxruntime-node`, async () => {
      const bytes = mobileLike(h, w);
      const feeds = { x: uniform([batch, 3, h, w], 11 + h + batch) };
      const off = await runWith(bytes, feeds, { SONDE_CONV_CHAIN: '0' }, { threads });
      expect(off.prof.some((r) => r.op === 'convChain')).toBe(false);
      // 1 KiB: one output row a strip (each strip's first expanded rows are the last strip's);
      // 24 KiB: a few rows; the default: the whole image in one strip at these sizes.
      for (const kb of ['1', '24', '0']) {
        const on = await runWith(bytes, feeds, { SONDE_CHAIN_STRIP_KB: kb }, { threads });
        // Blocks a (no expansion), c (residual) and d are fused; b writes a pinned graph output.
        const chains = on.prof.filter((r) => r.op === 'convChain');
        expect(chains.map((r) => r.kernel.split('+').length), `strip ${kb} KiB`).toEqual([2, 3, 3]);
        expect(chains.every((r) => r.kernel.startsWith('chain/'))).toBe(true);
        expect(on.prof.filter((r) => r.op === 'conv')).toHaveLength(4);
        for (const name of ['pooled', 'middle']) expect(on.out[name]!.data, `${name}, strip ${kb} KiB`).toEqual(off.out[name]!.data);
      }
      const want = await ortRun(bytes, feeds);
      for (const name of ['pooled', 'middle']) {
        expect([...off.out[name]!.dims]).toEqual([...want[name]!.dims]);
        expectClose(off.out[name]!.data as Float32Array, want[name]!.data as Float32Array, ORT_TOL, name);
      }
    });
  }

  it('a depthwise output read by two steps, or a bf16 session, is not fused', async () => {
    const n = new Net();
    const x = n.g.input('x', 'float32', [1, 16, 12, 12]);
    const e = n.conv(x, 16, 64, 1);
    const d = n.conv(e, 64, 64, 3, { group: 64 });
    const p = n.conv(d, 64, 16, 1, { act: 'none' });
    const [gap] = n.g.node('GlobalAveragePool', [d]);
    n.g.node('GlobalAveragePool', [p], {}, ['pooled']);
    n.g.node('Identity', [gap!], {}, ['side']);
    for (const o of ['pooled', 'side']) n.g.output(o, 'float32');
    const bytes = n.g.toBytes();
    const feeds = { x: uniform([1, 16, 12, 12], 5) };
    const got = await runWith(bytes, feeds, {});
    expect(got.prof.some((r) => r.op === 'convChain')).toBe(false);
    const want = await ortRun(bytes, feeds);
    expectClose(got.out.pooled!.data as Float32Array, want.pooled!.data as Float32Array, ORT_TOL, 'pooled');
    if (devices().cpu.features.includes('avx512bf16')) {
      const bf16 = await runWith(mobileLike(17, 13), { x: uniform([1, 3, 17, 13], 2) }, {}, { precision: 'bf16' });
      expect(bf16.prof.some((r) => r.op === 'convChain')).toBe(false);
    }
  });

  it('the native plan checks a chain: handles, channels, layouts', () => {
    const opts = (cIn: number, cOut: number, k: number, group: number) => ({
      cOut, cIn, group, kernel: [k, k], strides: [1, 1], dilations: [1, 1], pads: k === 3 ? [1, 1, 1, 1] : [0, 0, 0, 0],
      autoPad: 0, bnEpsilon: 1e-5, activation: 0, alpha: 0, beta: 0, precision: 'fp32', variant: 'auto',
    });
    const expand = native().createConv(weights([32, 16, 1, 1], 1).data, opts(16, 32, 1, 1));
    const dw = native().createConv(weights([32, 1, 3, 3], 2).data, opts(32, 32, 3, 32));
    const project = native().createConv(weights([16, 32, 1, 1], 3).data, opts(32, 16, 1, 1));
    const other = native().createConv(weights([16, 16, 1, 1], 4).data, opts(16, 16, 1, 1));
    try {
      const l = (pads: number[]) => ({ h: 5, w: 5, pads });
      const bytes = 16 * 5 * 5 * 4;
      const spec = (step: Record<string, unknown>): PlanSpec => ({
        buffers: [{ kind: 'input', index: 0, bytes }, { kind: 'output', index: 0, bytes }],
        steps: [{ node: 'chain', op: 'convChain', expand, depthwise: dw, project, x: { buffer: 0, offset: 0 },
          y: { buffer: 1, offset: 0 }, residualBeforeActivation: false, n: 1, h: 5, w: 5, xBlocked: l([0, 0, 0, 0]),
          yBlocked: l([0, 0, 0, 0]), ...step } as never],
        arenaBytes: 0, inputBytes: [bytes], outputBytes: [bytes],
      });
      const create = (s: PlanSpec) => {
        try {
          native().createPlan(s).dispose();
        } catch (err) {
          throw fromNative(err);
        }
      };
      create(spec({}));
      expect(() => create(spec({ project: other }))).toThrow(/projection's input channels/);
      expect(() => create(spec({ expand: dw }))).toThrow(/expansion must be a 1x1/);
      expect(() => create(spec({ depthwise: expand }))).toThrow(/depthwise conv must run on blocked/);
      expect(() => create(spec({ yBlocked: l([0, 0, 1, 0]) }))).toThrow(InternalError);
      expect(() => create(spec({ yBlocked: { h: 4, w: 5, pads: [0, 0, 0, 0] } }))).toThrow(/y's blocked layout/);
      // Without the expansion, the depthwise conv reads x in place: its border must be the padding.
      expect(() => create(spec({ expand: undefined, depthwise: native().createConv(weights([16, 1, 3, 3], 5).data, opts(16, 16, 3, 16)),
        project: other }))).toThrow(/border/);
      expect(() => create(spec({ residual: { buffer: 0, offset: 0 } }))).toThrow(/residual must be blocked/);
    } finally {
      for (const h of [expand, dw, project, other]) h.dispose();
    }
  });
});
