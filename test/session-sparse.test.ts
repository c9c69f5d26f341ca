// Sessions on pruned weights: sparse 'auto', 'off' and 'force' against onnxruntime-node on the same
// pruned model (the independent reference), on a pruned MLP, the digits model and a ResNet-style
// block; a sparse_initializer model against its dense twin in onnxruntime-node; the option's
// validation and what Session.sparseLayers reports.
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, Session, Tensor, prune } from '../dist/index.js';
import type { SessionOptions } from '../dist/index.js';
import { mlp } from '../bench/graphs/models.js';
import { GraphBuilder, randomTensor, rng } from '../bench/graphs/builder.js';
import { countCorrect, modelPath as digitsPath, readTestSplit } from '../models/digits.js';
import { ortRun, uniform } from './session-ort.js';
import { DIRECT_MIN_OW, SAFETY, useSparse, type SparseChoice } from '../dist/session/sparse.js';

type Feeds = Record<string, Tensor>;

/**
 * sonde with `options` vs onnxruntime-node. The sparse kernels sum the non-zero products in another
 * order than a dense GEMM, so the bound is the fp32 dot-product bound: K * u * sum |w x|, bounded
 * here by a relative 1e-4 of the output's scale plus 1e-5.
 */
async function expectAgrees(bytes: Uint8Array, feeds: Feeds, options: SessionOptions, label: string): Promise<Session> {
  const session = await Session.load(bytes, { device: 'cpu', ...options });
  const got = await session.run(feeds);
  const want = await ortRun(bytes, feeds);
  for (const [name, w] of Object.entries(want)) {
    const g = got[name]!.data as Float32Array;
    const wd = w.data as Float32Array;
    let scale = 0;
    for (const v of wd) scale = Math.max(scale, Math.abs(v));
    for (let i = 0; i < wd.length; i++) {
      const err = Math.abs(g[i]! - wd[i]!);
      if (!(err <= 1e-5 + 1e-4 * scale)) throw new Error(`${label} ${name}[${i}]: sonde ${g[i]}, onnxruntime-node ${wd[i]}`);
    }
  }
  return session;
}

describe('sparse sessions: pruned MLP', () => {
  it('auto, off and force agree with onnxruntime-node at batch 1 and 32; force runs every layer sparse, off none', async () => {
    const { bytes, report } = await prune(mlp({ sizes: [200, 384, 384, 10], seed: 11 }), { sparsity: 0.9 });
    expect(report.prunedLayers).toBe(2);
    for (const batch of [1, 32]) {
      const feeds = { input: uniform([batch, 200], batch, 0, 1) };
      const off = await expectAgrees(bytes, feeds, { sparse: 'off' }, `off b${batch}`);
      expect(off.sparseLayers).toEqual([]);
      off.dispose();
      const force = await expectAgrees(bytes, feeds, { sparse: 'force' }, `force b${batch}`);
      // Every Gemm has sparse weights in 'force', the dense first layer too.
      expect(force.sparseLayers.length).toBe(3);
      for (const l of force.sparseLayers) expect(l.kernel[batch]).toBe('sparse');
      force.dispose();
      const auto = await expectAgrees(bytes, feeds, {}, `auto b${batch}`);
      // Only the pruned layers qualify; each was timed and got a decision for this batch.
      expect(auto.sparseLayers.map((l) => l.sparsity >= 0.5)).toEqual([true, true]);
      for (const l of auto.sparseLayers) {
        expect(l.timings!.map((t) => t.m)).toEqual([1, 8, 64]);
        for (const t of l.timings!) expect(t.denseMs > 0 && t.sparseMs > 0).toBe(true);
        expect(['dense', 'sparse']).toContain(l.kernel[batch]);
      }
      auto.dispose();
    }
  });

  it('a 1x16-block-pruned MLP (BSR weights) agrees in all three modes', async () => {
    const { bytes } = await prune(mlp({ sizes: [96, 160, 48, 10], seed: 12 }), { sparsity: 0.8, structure: 'block', keepFirstLayerDense: false });
    const feeds = { input: uniform([5, 96], 2, 0, 1) };
    for (const sparse of ['off', 'auto', 'force'] as const) {
      const s = await expectAgrees(bytes, feeds, { sparse }, `block ${sparse}`);
      if (sparse === 'force') expect(s.sparseLayers.map((l) => l.format)).toEqual(['bsr', 'bsr', 'bsr']);
      s.dispose();
    }
  });
});

describe('sparse sessions: digits and a ResNet-style block', () => {
  it('the pruned digits model classifies the test split identically in auto, off and force', async () => {
    const { bytes } = await prune(digitsPath, { sparsity: 0.7 });
    const split = readTestSplit();
    const feeds = { input: new Tensor('float32', split.images, [split.n, 1, split.height, split.width]) };
    const name = (await Session.load(bytes, { device: 'cpu' })).inputs[0]!.name;
    const results: Float32Array[] = [];
    for (const sparse of ['off', 'auto', 'force'] as const) {
      const s = await expectAgrees(bytes, { [name]: feeds.input }, { sparse }, `digits ${sparse}`);
      results.push((await s.run({ [name]: feeds.input }))[s.outputs[0]!.name]!.data as Float32Array);
      s.dispose();
    }
    const correct = results.map((r) => countCorrect(r, split.labels));
    expect(correct[1]).toBe(correct[0]);
    expect(correct[2]).toBe(correct[0]);
  });

  it('a pruned residual block (1x1 convs, BN, ReLU, residual Add, Gemm head) agrees in all three modes', async () => {
    const r = rng(21);
    const g = new GraphBuilder('resblock', { opset: 13 });
    let x = g.input('x', 'float32', ['N', 16, 7, 7]);
    const conv = (inp: string, cin: number, cout: number, k: number, name: string) => g.node('Conv',
      [inp, g.init(`${name}.w`, randomTensor([cout, cin, k, k], { random: r, scale: Math.sqrt(2 / (cin * k * k)) })),
        g.init(`${name}.b`, randomTensor([cout], { random: r, scale: 0.1 }))], k > 1 ? { pads: [1, 1, 1, 1] } : {}, 1, { name })[0]!;
    const skip = x;
    let y = g.node('Relu', [conv(x, 16, 32, 1, 'reduce')])[0]!;
    y = g.node('Relu', [conv(y, 32, 32, 3, 'mid')])[0]!;
    y = conv(y, 32, 16, 1, 'expand');
    x = g.node('Relu', [g.node('Add', [y, skip])[0]!])[0]!;
    x = g.node('Flatten', [g.node('GlobalAveragePool', [x])[0]!])[0]!;
    const [out] = g.node('Gemm', [x, g.init('fc.w', randomTensor([10, 16], { random: r, scale: 0.3 })), g.init('fc.b', randomTensor([10], { random: r }))],
      { transB: 1 }, 1, { name: 'fc' });
    g.output(out!, 'float32', ['N', 10]);
    const { bytes } = await prune(g.toBytes(), { sparsity: 0.85 });
    for (const batch of [1, 3]) {
      const feeds = { x: uniform([batch, 16, 7, 7], 5 + batch) };
      for (const sparse of ['off', 'auto', 'force'] as const) {
        const s = await expectAgrees(bytes, feeds, { sparse }, `resblock ${sparse} b${batch}`);
        if (sparse === 'force') {
          // The two 1x1 convs (one with the residual Add fused in, read and written in place on NCHW), the
          // 3x3 conv (per-image im2col panels: pad, copy, SpMM) and the Gemm run on SpMM.
          const names = s.sparseLayers.map((l) => l.layer).join(' ');
          for (const layer of [/reduce/, /mid/, /expand/, /fc/]) expect(names).toMatch(layer);
          for (const l of s.sparseLayers) expect(Object.values(l.kernel)).toEqual(['sparse']);
          const prof = await s.profile(feeds, { runs: 1 });
          const spmm = prof.filter((r) => r.op === 'spmm');
          for (const layer of [/reduce/, /mid/, /expand/, /fc/]) expect(spmm.some((r) => layer.test(r.node))).toBe(true);
          // Convs with CSR weights run the column-major (NCHW in place) kernel; BSR ones (the row kernel
          // after layout copies) and the Gemm the row-major one.
          const format = new Map(s.sparseLayers.map((l) => [l.layer, l.format]));
          for (const r of spmm) {
            expect([r.node, /columns/.test(r.kernel)]).toEqual([r.node, format.get(r.node) === 'csr' && !/fc/.test(r.node)]);
          }
          expect(spmm.filter((r) => /columns/.test(r.kernel)).length).toBeGreaterThanOrEqual(2);
          expect(prof.some((r) => r.op === 'conv')).toBe(false);
        }
        s.dispose();
      }
    }
  });
});

describe('sparse sessions: KxK convolutions, direct or on im2col panels', () => {
  it('3x3, 5x3, strided, dilated, unpadded and asymmetric-padded convs, strided 1x1s and residuals agree with onnxruntime-node in force, each in its form', async () => {
    const r = rng(33);
    // [cIn, cOut, kernel, attrs, input h x w, residual]: odd sizes so the output planes are not whole vectors.
    const cases: [number, number, [number, number], Record<string, number[]>, [number, number], boolean][] = [
      [5, 7, [3, 3], { pads: [1, 1, 1, 1] }, [9, 11], false],
      [3, 17, [3, 3], { pads: [1, 1, 1, 1], strides: [2, 2] }, [13, 10], false],
      [4, 9, [5, 3], { pads: [2, 0, 1, 1] }, [7, 6], false],
      [6, 5, [3, 3], { dilations: [2, 2], pads: [2, 2, 2, 2] }, [8, 9], false],
      [8, 16, [3, 3], {}, [6, 19], false],
      [9, 11, [1, 1], { strides: [2, 2] }, [9, 9], false],
      [2, 3, [3, 3], { pads: [1, 1, 1, 1] }, [1, 1], false],
      // Output rows of at least DIRECT_MIN_OW: a row of 1 vector + 13, row stride 2, dilation, 150
      // wide (two blocks of positions per row), unpadded.
      [5, 7, [3, 3], { pads: [1, 1, 1, 1] }, [6, 29], false],
      [3, 6, [3, 3], { pads: [1, 1, 1, 1], strides: [2, 1] }, [9, 40], false],
      [4, 5, [3, 3], { dilations: [2, 2], pads: [2, 2, 2, 2] }, [5, 30], false],
      [2, 9, [5, 3], { pads: [2, 0, 1, 1] }, [4, 150], false],
      [3, 4, [3, 3], {}, [5, 26], false],
      // Strided, on the phased image: wide rows, a dilation that reads one phase, stride 3 (nine
      // phases), stride 2 down the image only and narrow, odd padded sizes.
      [4, 6, [3, 3], { pads: [1, 1, 1, 1], strides: [2, 2] }, [7, 50], false],
      [3, 5, [3, 3], { dilations: [2, 2], pads: [2, 2, 2, 2], strides: [2, 2] }, [9, 11], false],
      [2, 4, [3, 3], { pads: [1, 1, 1, 1], strides: [3, 3] }, [10, 11], false],
      [3, 5, [3, 2], { pads: [1, 0, 1, 1], strides: [2, 1] }, [8, 9], false],
      // A residual (Conv + Add + Relu, fused): narrow convs go to im2col, wide rows stay direct.
      [4, 6, [3, 3], { pads: [1, 1, 1, 1] }, [7, 9], true],
      [4, 6, [3, 3], { pads: [1, 1, 1, 1], strides: [2, 2] }, [9, 9], true],
      [3, 5, [3, 3], { pads: [1, 1, 1, 1] }, [4, 30], true],
      // A strided 1x1 with a residual (ResNet's downsample): its panel is the subsampled batch, in one step.
      [6, 8, [1, 1], { strides: [2, 2] }, [9, 10], true],
    ];
    for (const [ci, [cin, cout, [kh, kw], attrs, [h, w], withResidual]] of cases.entries()) {
      const g = new GraphBuilder(`kxk${ci}`, { opset: 13 });
      const x = g.input('x', 'float32', ['N', cin, h, w]);
      const pads = attrs.pads ?? [0, 0, 0, 0], dil = attrs.dilations ?? [1, 1], strides = attrs.strides ?? [1, 1];
      const oh = Math.floor((h + pads[0]! + pads[2]! - (kh - 1) * dil[0]! - 1) / strides[0]!) + 1;
      const ow = Math.floor((w + pads[1]! + pads[3]! - (kw - 1) * dil[1]! - 1) / strides[1]!) + 1;
      const [y] = g.node('Conv', [x, g.init('c.w', randomTensor([cout, cin, kh, kw], { random: r, scale: Math.sqrt(2 / (cin * kh * kw)) })),
        g.init('c.b', randomTensor([cout], { random: r, scale: 0.1 }))], attrs, 1, { name: 'c' });
      const res = withResidual ? g.input('r', 'float32', ['N', cout, oh, ow]) : undefined;
      const [sum] = res ? g.node('Add', [y!, res]) : [y];
      const [z] = g.node('Relu', [sum!]);
      g.output(z!, 'float32', ['N', cout, '?', '?'] as never);
      const { bytes } = await prune(g.toBytes(), { sparsity: 0.6, keepFirstLayerDense: false });
      // The rule: rows of at least DIRECT_MIN_OW unstrided along them one output row per call, others
      // as one long row (then a copy drops the positions across row ends) unless a residual is fused,
      // which sends them to the im2col panel. A strided long row reads a phased image (a fill and a
      // copy per phase a tap reads).
      const wide = ow < DIRECT_MIN_OW || strides[1]! > 1;
      const mode = !wide ? 'rows' : !withResidual ? 'wide' : 'im2col';
      const phased = mode === 'wide' && (strides[0]! > 1 || strides[1]! > 1);
      const phases = new Set<number>();
      for (let ky = 0; ky < kh; ky++) for (let kx = 0; kx < kw; kx++) phases.add(((ky * dil[0]!) % strides[0]!) * 10 + ((kx * dil[1]!) % strides[1]!));
      // The direct forms take the whole batch in one pass (one spmm step, one fill and copy per
      // phase, one copy out), and so does a 1x1's subsampled panel; a KxK im2col goes image by image
      // (a pad, a panel copy and an spmm each).
      const padded = pads.some((q) => q > 0);
      for (const batch of [1, 2]) {
        const feeds = { x: uniform([batch, cin, h, w], ci + batch), ...(res ? { r: uniform([batch, cout, oh, ow], ci + 7) } : {}) };
        const s = await expectAgrees(bytes, feeds, { sparse: 'force' }, `kxk case ${ci} b${batch}`);
        expect(s.sparseLayers.map((l) => Object.values(l.kernel))).toEqual([['sparse']]);
        const prof = await s.profile(feeds, { runs: 1 });
        const spmm = prof.filter((q) => q.op === 'spmm');
        const perImage = mode === 'im2col' && kh * kw > 1 ? batch : 1;
        expect(spmm.length).toBe(perImage);
        for (const q of spmm) expect([ci, q.kernel.includes('+direct')]).toEqual([ci, mode !== 'im2col']);
        const count = (op: string) => prof.filter((q) => q.op === op).length;
        const copies = mode === 'im2col' ? perImage : (phased ? phases.size : 0) + (mode === 'wide' ? 1 : 0);
        expect([ci, count('copy'), count('fill'), count('pad')]).toEqual([ci, copies, phased ? 1 : 0, padded && !phased ? perImage : 0]);
        if (batch === 2) {
          // Two threads take an image each (the batch divides): the bits of one thread.
          const one = await Session.load(bytes, { device: 'cpu', sparse: 'force', threads: 1 });
          const two = await Session.load(bytes, { device: 'cpu', sparse: 'force', threads: 2 });
          const [a, b2] = [(await one.run(feeds))[z!]!.data, (await two.run(feeds))[z!]!.data] as Float32Array[];
          expect([ci, Buffer.from(a!.buffer, a!.byteOffset, a!.byteLength).equals(Buffer.from(b2!.buffer, b2!.byteOffset, b2!.byteLength))]).toEqual([ci, true]);
          one.dispose();
          two.dispose();
        }
        s.dispose();
      }
    }
  });
});

describe('sparse sessions: sparse_initializer and options', () => {
  it('a model with sparse_initializers matches its dense twin in onnxruntime-node, in every mode', async () => {
    const source = mlp({ sizes: [64, 128, 10], seed: 13 });
    const dense = await prune(source, { sparsity: 0.75, keepFirstLayerDense: false });
    const sparse = await prune(source, { sparsity: 0.75, keepFirstLayerDense: false, storage: 'sparse' });
    const feeds = { input: uniform([4, 64], 9, 0, 1) };
    const want = Object.values(await ortRun(dense.bytes, feeds))[0]!.data as Float32Array;
    for (const mode of ['off', 'auto', 'force'] as const) {
      const s = await Session.load(sparse.bytes, { device: 'cpu', sparse: mode });
      const got = Object.values(await s.run(feeds))[0]!.data as Float32Array;
      s.dispose();
      for (let i = 0; i < want.length; i++) expect(Math.abs(got[i]! - want[i]!), `${mode} [${i}]`).toBeLessThanOrEqual(1e-5 + 1e-4 * Math.abs(want[i]!));
    }
  });

  it('bad sparse options are InvalidArgumentErrors; bf16 sessions stay dense', async () => {
    const bytes = (await prune(mlp({ sizes: [32, 48, 10], seed: 14 }), { sparsity: 0.9, keepFirstLayerDense: false })).bytes;
    await expect(Session.load(bytes, { device: 'cpu', sparse: 'yes' as never })).rejects.toThrow(InvalidArgumentError);
    await expect(Session.load(bytes, { device: 'cpu', sparse: 'forced' as never })).rejects.toThrow(/options.sparse must be one of 'auto', 'off', 'force'.*did you mean 'force'/);
    const s = await Session.load(bytes, { device: 'cpu', sparse: 'force', precision: 'bf16' });
    expect(s.sparseLayers).toEqual([]);
    s.dispose();
    expect(() => s.sparseLayers).toThrow(/disposed/);
  });
});

describe('sparse sessions: profile()', () => {
  it('records the sparse kernel and sparsity per layer, and how often batch-1 steps skipped zero activations', async () => {
    const { bytes } = await prune(mlp({ sizes: [256, 384, 10], seed: 15 }), { sparsity: 0.9 });
    const force = await Session.load(bytes, { device: 'cpu', sparse: 'force' });
    const prof = await force.profile({ input: uniform([4, 256], 1, 0, 1) }, { runs: 3 });
    const spmm = prof.filter((r) => r.op === 'spmm');
    expect(spmm.length).toBe(2);
    for (const r of spmm) expect(r.kernel).toMatch(/^f32_spmm_/);
    expect(spmm.map((r) => r.sparsity! > 0.85)).toEqual([false, true]); // the first layer was kept dense by prune()
    expect(prof.reduce((a, r) => a + r.share, 0)).toBeCloseTo(1, 6);

    const off = await Session.load(bytes, { device: 'cpu', sparse: 'off' });
    const mostlyZero = uniform([1, 256], 2, 0, 1);
    (mostlyZero.data as Float32Array).forEach((_, i, d) => { if (i % 10 !== 0) d[i] = 0; });
    const first = (p: Awaited<ReturnType<Session['profile']>>) => p.find((r) => r.op === 'gemm')!;
    const sparseRow = await off.profile({ input: mostlyZero }, { runs: 4 });
    expect(first(sparseRow).activationSkip).toBe(1);
    expect(first(sparseRow).sparsity).toBeUndefined();
    const denseRow = await off.profile({ input: uniform([1, 256], 3, 0.5, 1) }, { runs: 4 });
    expect(first(denseRow).activationSkip).toBe(0);
    // Not a batch-1 step: no activationSkip field.
    expect(first(await off.profile({ input: uniform([2, 256], 3) }, { runs: 1 })).activationSkip).toBeUndefined();

    // A batch-1 spmm step keeps the dense weights for mostly-zero rows: the same zero-skipping GEMV
    // as 'off' (bit-identical), and the SpMV for a row without zeros.
    const firstSpmm = (p: Awaited<ReturnType<Session['profile']>>) => p.find((r) => r.op === 'spmm')!;
    expect(firstSpmm(await force.profile({ input: mostlyZero }, { runs: 4 })).activationSkip).toBe(1);
    expect(firstSpmm(await force.profile({ input: uniform([1, 256], 3, 0.5, 1) }, { runs: 4 })).activationSkip).toBe(0);
    const one = (await prune(mlp({ sizes: [256, 384], seed: 15 }), { sparsity: 0.9, keepFirstLayerDense: false })).bytes;
    const layer1 = await Session.load(one, { device: 'cpu', sparse: 'force' });
    const layer1Off = await Session.load(one, { device: 'cpu', sparse: 'off' });
    const out = async (x: Session) => (await x.run({ input: mostlyZero }))[x.outputs[0]!.name]!.data as Float32Array;
    const [a, b] = [await out(layer1), await out(layer1Off)];
    expect(Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))).toBe(true);
    layer1.dispose();
    layer1Off.dispose();
    force.dispose();
    off.dispose();
  });
});

describe("sparse 'auto': the per-plan choice from load-time timings", () => {
  const choice = (timings: SparseChoice['timings'], mode: SparseChoice['mode'] = 'auto') =>
    ({ weights: null as never, k: 8, n: 8, mode, format: 'csr', sparsity: 0.9, timings, chosen: new Map() }) as SparseChoice;
  const t = [
    { m: 1, denseNs: 100, sparseNs: 95 },
    { m: 8, denseNs: 200, sparseNs: 200 },
    { m: 64, denseNs: 1000, sparseNs: 500 },
  ];
  it('picks sparse only when it measured at least 1 - SAFETY faster, interpolating between and extrapolating past the timed M', () => {
    expect(SAFETY).toBe(0.9);
    const c = choice(t);
    // M = 1: sparse 95 against dense 100: within 10%, dense.
    expect(useSparse(c, 1)).toBe(false);
    expect(useSparse(choice([{ m: 1, denseNs: 100, sparseNs: 80 }, t[1]!, t[2]!]), 1)).toBe(true);
    // M = 8: equal times: dense (a tie must not flip to sparse).
    expect(useSparse(c, 8)).toBe(false);
    // M = 36: halfway, dense 600 vs sparse 350.
    expect(useSparse(c, 36)).toBe(true);
    // M = 2: interpolated, dense 114.3 vs sparse 110: 0.96, dense.
    expect(useSparse(c, 2)).toBe(false);
    // Past the last timing both scale linearly: the ratio of M = 64 holds.
    expect(useSparse(c, 4096)).toBe(true);
    expect(Object.fromEntries(c.chosen)).toEqual({ 1: 'dense', 8: 'dense', 36: 'sparse', 2: 'dense', 4096: 'sparse' });
    // Within 10%: dense.
    expect(useSparse(choice([{ m: 1, denseNs: 100, sparseNs: 91 }]), 1)).toBe(false);
  });

  it("'force' is always sparse, no timings and no sparse weights are always dense", () => {
    expect(useSparse(choice(undefined, 'force'), 1)).toBe(true);
    expect(useSparse(choice(undefined), 64)).toBe(false);
    expect(useSparse(undefined, 64)).toBe(false);
  });
});
