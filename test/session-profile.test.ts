// Session.profile: per-step records whose names come from the graph's nodes, whose shares sum to 1
// and whose times add up to about a run's time; its own typed errors; the session still usable after.
import { describe, expect, it } from 'vitest';
import { AbortError, DisposedError, InvalidArgumentError, Session, Tensor } from '../dist/index.js';
import { GraphBuilder } from '../bench/graphs/builder.js';
import { uniform } from './session-ort.js';

/** conv -> bn -> relu -> maxpool -> conv + residual -> flatten -> gemm (+ relu) -> softmax. */
function cnn() {
  const g = new GraphBuilder('cnn', { opset: 13 });
  g.input('image', 'float32', ['batch', 3, 12, 12]);
  const t = (name: string, dims: number[], seed: number, lo = -0.5, hi = 0.5) =>
    g.init(name, { dtype: 'float32', dims, data: uniform(dims, seed, lo, hi).data });
  const [c1] = g.node('Conv', ['image', t('w1', [8, 3, 3, 3], 1), t('b1', [8], 2)], { pads: [1, 1, 1, 1] });
  const [bn] = g.node('BatchNormalization', [c1, t('s', [8], 3), t('o', [8], 4), t('m', [8], 5), t('v', [8], 6, 0.5, 1.5)]);
  const [r] = g.node('Relu', [bn]);
  const [p] = g.node('MaxPool', [r], { kernel_shape: [2, 2], strides: [2, 2] });
  const [c2] = g.node('Conv', [p, t('w2', [8, 8, 3, 3], 7)], { pads: [1, 1, 1, 1] });
  const [sum] = g.node('Add', [c2, p]);
  const [flat] = g.node('Flatten', [sum]);
  const [fc] = g.node('Gemm', [flat, t('wf', [288, 10], 8), t('bf', [10], 9)]);
  const [fr] = g.node('Relu', [fc]);
  const [prob] = g.node('Softmax', [fr], { axis: 1 });
  g.output(prob, 'float32', ['batch', 10]);
  return { bytes: g.toBytes(), nodes: g.nodes.map((n: { name: string }) => n.name) as string[] };
}

const image = (batch: number) => new Tensor('float32', uniform([batch, 3, 12, 12], 11).data, [batch, 3, 12, 12]);

describe('Session.profile', () => {
  it('reports every step of the plan, named after graph nodes, with shares summing to 1', async () => {
    const { bytes, nodes } = cnn();
    for (const optimization of ['none', 'all'] as const) {
      const s = await Session.load(bytes, { device: 'cpu', optimization, threads: 1 });
      const prof = await s.profile({ image: image(2) }, { runs: 3 });
      expect(prof.length).toBeGreaterThan(0);
      // Without optimisation every step names a node of the model; the optimiser names a fused node
      // after the one it replaced ('Conv_0+bn/FusedConv').
      const original = (name: string) => nodes.find((n) => name === n || name.startsWith(`${n}+`) || name.startsWith(`${n}/`));
      for (const r of prof) {
        if (optimization === 'none') expect(nodes).toContain(r.node);
        else expect(original(r.node)).toBeDefined();
        expect(typeof r.kernel).toBe('string');
        expect(r.kernel.length).toBeGreaterThan(0);
        expect(r.ms).toBeGreaterThanOrEqual(0);
        expect(r.share).toBeGreaterThanOrEqual(0);
        expect(r.share).toBeLessThanOrEqual(1);
      }
      expect(prof.reduce((a, r) => a + r.share, 0)).toBeCloseTo(1, 9);
      const convs = prof.filter((r) => r.op === 'conv');
      expect(convs.map((r) => original(r.node))).toEqual(['Conv_0', 'Conv_4']);
      // The conv path and its microkernel, e.g. 'gemm/f32_gemm_12x32__avx512' ('direct/...' for the
      // 3-channel first conv on AVX-512).
      for (const c of convs) expect(c.kernel).toMatch(/^(gemm|direct|depthwise|reference)\/\S+$/);
      const gemm = prof.find((r) => r.op === 'gemm');
      expect(original(gemm!.node)).toBe('Gemm_7');
      if (optimization === 'all') {
        // BatchNormalization, Relu and the residual Add are fused into the convs; Relu into the Gemm.
        expect(prof.map((r) => original(r.node))).not.toContain('BatchNormalization_1');
        expect(prof.map((r) => original(r.node))).not.toContain('Add_5');
        expect(gemm?.kernel).toMatch(/\+relu$/);
      } else {
        expect(prof.map((r) => r.node)).toContain('BatchNormalization_1');
        expect(prof.find((r) => r.node === 'Add_5')?.op).toBe('binary');
      }
      s.dispose();
    }
  });

  it('step times add up to about the time of a run', async () => {
    // 40 chained 64x64 MatMuls: long enough per run that the clock's resolution is negligible.
    const g = new GraphBuilder('chain', { opset: 17 });
    g.input('x', 'float32', [64, 64]);
    let v = 'x';
    for (let i = 0; i < 40; i++) [v] = g.node('MatMul', [v, 'x']).map(String) as [string];
    g.output(v);
    const s = await Session.load(g.toBytes(), { device: 'cpu', threads: 1 });
    const x = new Tensor('float32', uniform([64, 64], 3, -0.1, 0.1).data, [64, 64]);
    const runs = 20;
    const t0 = performance.now();
    const prof = await s.profile({ x }, { runs });
    const perRun = (performance.now() - t0) / runs;
    expect(prof.length).toBe(40);
    expect(prof.every((r) => r.op === 'matmul')).toBe(true);
    const stepSum = prof.reduce((a, r) => a + r.ms, 0);
    expect(stepSum).toBeGreaterThan(0);
    // Steps are timed inside the native run, so they cannot take longer than the whole profile call.
    expect(stepSum).toBeLessThanOrEqual(perRun * 1.05);
    s.dispose();
  });

  it('gives typed errors for bad options and feeds, and the session stays usable', async () => {
    const { bytes } = cnn();
    const s = await Session.load(bytes, { device: 'cpu', threads: 1 });
    await expect(s.profile({ image: image(1) }, { runs: 0 })).rejects.toThrow(InvalidArgumentError);
    await expect(s.profile({ image: image(1) }, { runs: 1.5 })).rejects.toThrow(/runs/);
    await expect(s.profile({ image: image(1) }, { run: 3 } as never)).rejects.toThrow(/did you mean 'runs'/);
    await expect(s.profile({ imag: image(1) } as never)).rejects.toThrow(InvalidArgumentError);
    await expect(s.profile({ image: new Tensor('float32', new Float32Array(4), [1, 4]) })).rejects.toThrow(/rank/);
    const ac = new AbortController();
    ac.abort();
    await expect(s.profile({ image: image(1) }, { signal: ac.signal })).rejects.toThrow(AbortError);
    const ok = await s.profile({ image: image(1) }, { runs: 1 });
    expect(ok.length).toBeGreaterThan(0);
    const out = await s.run({ image: image(1) });
    expect(out[Object.keys(out)[0]!]!.dims).toEqual([1, 10]);
    s.dispose();
    await expect(s.profile({ image: image(1) })).rejects.toThrow(DisposedError);
  });

  it('a run error raised natively still names the caller in its stack (no stack captured up front)', async () => {
    const g = new GraphBuilder('gather', { opset: 13 });
    g.input('data', 'float32', [4]);
    g.input('idx', 'int64', [1]);
    const [y] = g.node('Gather', ['data', 'idx']);
    g.output(y, 'float32', [1]);
    const s = await Session.load(g.toBytes(), { device: 'cpu', threads: 1 });
    const data = new Tensor('float32', Float32Array.from([1, 2, 3, 4]), [4]);
    // V8's async stack traces name the awaiting callers.
    async function callerOfRun() {
      return await s.run({ data, idx: new Tensor('int64', BigInt64Array.from([7n]), [1]) });
    }
    const err = await callerOfRun().then(() => undefined, (e: unknown) => e as Error);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect(err!.message).toMatch(/Gather_0.*7/);
    expect(err!.stack).toContain('callerOfRun');
    const ok = await s.run({ data, idx: new Tensor('int64', BigInt64Array.from([-1n]), [1]) });
    expect(Array.from(ok[y as string]!.data as Float32Array)).toEqual([4]);
    s.dispose();
  });
});
