// sonde.prune(): magnitude pruning checked against the definition (scalar loops over the weights
// decoded independently with onnx-proto), outputs run in onnxruntime-node, sparse_initializer
// loading (sonde vs the dense twin in onnxruntime-node), and every bad input.
import { describe, expect, it } from 'vitest';
import { createRequire } from 'node:module';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { InvalidArgumentError, ModelFormatError, Session, Tensor, prune } from '../dist/index.js';
import { parseModel } from '../dist/onnx/model.js';
import { GraphBuilder, randomTensor, rng } from '../bench/graphs/builder.js';
import { mlp } from '../bench/graphs/models.js';
import { modelPath as digitsPath } from '../models/digits.js';
import { ortRun, uniform } from './session-ort.js';

const require = createRequire(import.meta.url);
const { onnx } = require('onnx-proto');

/** Every float32 weight of a model, dense, decoded here (not through sonde's parser). */
function weightsOf(bytes: Uint8Array): Map<string, { dims: number[]; data: Float32Array }> {
  const m = onnx.ModelProto.decode(bytes);
  const out = new Map<string, { dims: number[]; data: Float32Array }>();
  const raw = (t: { rawData: Uint8Array; floatData: number[] }) => {
    if (t.rawData?.length) return new Float32Array(Uint8Array.from(t.rawData).buffer);
    return Float32Array.from(t.floatData);
  };
  for (const t of m.graph.initializer) if (t.dataType === 1) out.set(t.name, { dims: t.dims.map(Number), data: raw(t) });
  for (const st of m.graph.sparseInitializer) {
    const dims = st.dims.map(Number);
    const dense = new Float32Array(dims.reduce((a: number, b: number) => a * b, 1));
    const vals = raw(st.values);
    const idx = new BigInt64Array(Uint8Array.from(st.indices.rawData).buffer);
    idx.forEach((p, i) => { dense[Number(p)] = vals[i]!; });
    out.set(st.values.name, { dims, data: dense });
  }
  return out;
}

const zeros = (d: Float32Array) => d.reduce((n, v) => n + (v === 0 ? 1 : 0), 0);

function smallMlp(sizes = [37, 70, 33, 10], seed = 5) {
  return mlp({ sizes, seed });
}

/** Conv -> Relu -> Conv(1x1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(transB) -> MatMul: one of each prunable form. */
function convNet(seed = 9) {
  const r = rng(seed);
  const g = new GraphBuilder('convnet', { opset: 13 });
  let x = g.input('x', 'float32', ['N', 3, 9, 7]);
  [x] = g.node('Conv', [x, g.init('c1.w', randomTensor([20, 3, 3, 3], { random: r, scale: 0.3 }))], { pads: [1, 1, 1, 1] }, 1, { name: 'conv1' });
  [x] = g.node('Relu', [x]);
  [x] = g.node('Conv', [x, g.init('c2.w', randomTensor([40, 20, 1, 1], { random: r, scale: 0.3 })), g.init('c2.b', randomTensor([40], { random: r }))],
    {}, 1, { name: 'conv2' });
  [x] = g.node('Relu', [x]);
  [x] = g.node('GlobalAveragePool', [x]);
  [x] = g.node('Flatten', [x]);
  [x] = g.node('Gemm', [x, g.init('fc.w', randomTensor([24, 40], { random: r, scale: 0.3 })), g.init('fc.b', randomTensor([24], { random: r }))],
    { transB: 1 }, 1, { name: 'fc' });
  [x] = g.node('MatMul', [x, g.init('head.w', randomTensor([24, 5], { random: r, scale: 0.3 }))], {}, 1, { name: 'head' });
  g.output(x, 'float32', ['N', 5]);
  return g.toBytes();
}

describe('prune: unstructured', () => {
  it('zeros exactly round(s * n) of each layer\'s smallest weights, keeps the first layer, and reports norms', async () => {
    const bytes = smallMlp();
    const before = weightsOf(bytes);
    for (const sparsity of [0, 0.5, 0.9, 0.99]) {
      const { bytes: out, report } = await prune(bytes, { sparsity });
      const after = weightsOf(out);
      expect(report.layers.map((l) => l.opType)).toEqual(['Gemm', 'Gemm', 'Gemm']);
      expect(report.layers[0]!.pruned).toBe(false);
      expect(report.layers[0]!.skipped).toMatch(/first layer/);
      expect(after.get(report.layers[0]!.weight)!.data).toEqual(before.get(report.layers[0]!.weight)!.data);
      for (const l of report.layers.slice(1)) {
        const w = before.get(l.weight)!.data;
        const p = after.get(l.weight)!.data;
        expect(zeros(p), `${l.layer} at ${sparsity}`).toBe(Math.round(sparsity * w.length));
        expect(l.sparsity).toBeCloseTo(Math.round(sparsity * w.length) / w.length, 12);
        let maxPruned = 0, minKept = Infinity, removed = 0, total = 0;
        for (let i = 0; i < w.length; i++) {
          total += w[i]! * w[i]!;
          if (p[i] === 0) { maxPruned = Math.max(maxPruned, Math.abs(w[i]!)); removed += w[i]! * w[i]!; }
          else { expect(p[i]).toBe(w[i]); minKept = Math.min(minKept, Math.abs(w[i]!)); }
        }
        expect(maxPruned).toBeLessThanOrEqual(minKept);
        expect(l.normRemoved).toBeCloseTo(Math.sqrt(removed / total), 6);
      }
      expect(report.prunedLayers).toBe(2);
    }
  });

  it('threshold zeros every |w| < t and nothing else; keepFirstLayerDense: false prunes the first layer too', async () => {
    const bytes = smallMlp();
    const before = weightsOf(bytes);
    const { bytes: out, report } = await prune(bytes, { threshold: 0.05, keepFirstLayerDense: false });
    const after = weightsOf(out);
    expect(report.prunedLayers).toBe(3);
    for (const l of report.layers) {
      const w = before.get(l.weight)!.data;
      const p = after.get(l.weight)!.data;
      for (let i = 0; i < w.length; i++) expect(p[i]).toBe(Math.abs(w[i]!) < 0.05 ? 0 : w[i]);
    }
  });

  it('prunes Conv, 1x1 Conv, Gemm(transB) and MatMul weights; include / exclude by node or weight name and RegExp', async () => {
    const bytes = convNet();
    const all = await prune(bytes, { sparsity: 0.7 });
    expect(all.report.layers.map((l) => [l.layer, l.opType, l.pruned])).toEqual([
      ['conv1', 'Conv', false], ['conv2', 'Conv', true], ['fc', 'Gemm', true], ['head', 'MatMul', true]]);
    const onlyFc = await prune(bytes, { sparsity: 0.7, include: ['fc.w'] });
    expect(onlyFc.report.layers.map((l) => l.pruned)).toEqual([false, false, true, false]);
    const noConv = await prune(bytes, { sparsity: 0.7, exclude: [/^conv/], keepFirstLayerDense: false });
    expect(noConv.report.layers.map((l) => l.pruned)).toEqual([false, false, true, true]);
    // Biases are not weights: untouched.
    const w = weightsOf(all.bytes);
    expect(w.get('c2.b')!.data).toEqual(weightsOf(bytes).get('c2.b')!.data);
  });

  it('reports progress once per pruned layer', async () => {
    const seen: string[] = [];
    await prune(convNet(), { sparsity: 0.5, onProgress: (p) => seen.push(`${p.done}/${p.total} ${p.layer}`) });
    expect(seen).toEqual(['1/3 conv2', '2/3 fc', '3/3 head']);
  });

  it('reads a model from a path (the digits model) and leaves the file unchanged', async () => {
    const original = readFileSync(digitsPath);
    const { report } = await prune(digitsPath, { sparsity: 0.5 });
    expect(report.layers.filter((l) => l.pruned).length).toBe(report.layers.length - 1);
    expect(readFileSync(digitsPath)).toEqual(original);
  });
});

describe('prune: external data', () => {
  it('writes weights that were in an external file inline, so the output loads anywhere', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sonde-prune-ext-'));
    try {
      const proto = onnx.ModelProto.decode(convNet());
      const parts: Buffer[] = [];
      let offset = 0;
      for (const init of proto.graph.initializer) {
        const raw = Buffer.from(init.rawData);
        parts.push(raw);
        init.rawData = new Uint8Array();
        init.dataLocation = 1;
        init.externalData = [{ key: 'location', value: 'w.bin' }, { key: 'offset', value: String(offset) }, { key: 'length', value: String(raw.length) }];
        offset += raw.length;
      }
      writeFileSync(join(dir, 'w.bin'), Buffer.concat(parts));
      writeFileSync(join(dir, 'm.onnx'), onnx.ModelProto.encode(proto).finish());
      const { bytes } = await prune(join(dir, 'm.onnx'), { sparsity: 0.6 });
      const out = onnx.ModelProto.decode(bytes);
      for (const t of out.graph.initializer) expect(t.dataLocation ?? 0, t.name).toBe(0);
      const want = weightsOf(convNet());
      const got = weightsOf(bytes);
      expect(got.get('c2.b')!.data).toEqual(want.get('c2.b')!.data);
      expect(got.get('c1.w')!.data).toEqual(want.get('c1.w')!.data);
      expect(zeros(got.get('fc.w')!.data)).toBe(Math.round(0.6 * 24 * 40));
      // From bytes, with no folder to resolve files against: onnxruntime-node runs it.
      const feeds = { x: uniform([1, 3, 9, 7], 4) };
      expect(Object.values(await ortRun(bytes, feeds))[0]!.data.length).toBe(5);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('prune: block', () => {
  it('zeros whole 1 x W blocks along the output channels, near the asked sparsity', async () => {
    const bytes = convNet();
    for (const blockSize of [8, 16]) {
      const { bytes: out, report } = await prune(bytes, { sparsity: 0.75, structure: 'block', blockSize, keepFirstLayerDense: false });
      const after = weightsOf(out);
      for (const l of report.layers) {
        const p = after.get(l.weight)!.data;
        // Output axis: 0 for Conv and Gemm(transB), 1 for MatMul.
        const axis = l.opType === 'MatMul' ? 1 : 0;
        const len = l.shape[axis]!;
        const inner = l.shape.slice(axis + 1).reduce((a, b) => a * b, 1);
        const outer = l.shape.slice(0, axis).reduce((a, b) => a * b, 1);
        for (let o = 0; o < outer; o++) {
          for (let i = 0; i < inner; i++) {
            for (let c0 = 0; c0 < len; c0 += blockSize) {
              const vals = [];
              for (let c = c0; c < Math.min(len, c0 + blockSize); c++) vals.push(p[(o * len + c) * inner + i]!);
              const z = vals.filter((v) => v === 0).length;
              expect(z === 0 || z === vals.length, `${l.layer} block (${o}, ${c0}, ${i})`).toBe(true);
            }
          }
        }
        // Within half a block of the target (plus ragged tail blocks).
        expect(Math.abs(zeros(p) - 0.75 * p.length)).toBeLessThanOrEqual(blockSize);
      }
    }
  });
});

describe('prune: outputs in onnxruntime-node, sparse_initializer storage', () => {
  it('pruned models (dense and sparse storage) run in onnxruntime-node with the same results; sonde loads the sparse one', async () => {
    const bytes = convNet();
    const dense = await prune(bytes, { sparsity: 0.8 });
    const sparse = await prune(bytes, { sparsity: 0.8, storage: 'sparse' });
    expect(onnx.ModelProto.decode(sparse.bytes).graph.sparseInitializer.length).toBe(3);
    expect(sparse.bytes.length).toBeLessThan(dense.bytes.length);
    // The asked sparsity per layer, read back from the file onnxruntime runs.
    const w = weightsOf(sparse.bytes);
    for (const name of ['c2.w', 'fc.w', 'head.w']) {
      const d = w.get(name)!.data;
      expect(zeros(d), name).toBe(Math.round(0.8 * d.length));
    }
    const feeds = { x: uniform([2, 3, 9, 7], 3) };
    const a = await ortRun(dense.bytes, feeds);
    const b = await ortRun(sparse.bytes, feeds);
    const original = await ortRun(bytes, feeds);
    const key = Object.keys(a)[0]!;
    expect(Array.from(b[key]!.data as Float32Array)).toEqual(Array.from(a[key]!.data as Float32Array));
    // Pruning changed the function (else the test above proves nothing).
    expect(Array.from(original[key]!.data as Float32Array)).not.toEqual(Array.from(a[key]!.data as Float32Array));
    const session = await Session.load(sparse.bytes, { device: 'cpu' });
    try {
      const got = (await session.run(feeds))[key]!.data as Float32Array;
      const want = a[key]!.data as Float32Array;
      for (let i = 0; i < want.length; i++) expect(Math.abs(got[i]! - want[i]!)).toBeLessThanOrEqual(1e-5 + 1e-5 * Math.abs(want[i]!));
    } finally {
      session.dispose();
    }
  });
});

// A Gemm whose weight is a sparse_initializer built here by hand.
function sparseModel(st: object, dims = [4, 3]) {
  return onnx.ModelProto.encode({
    irVersion: 8, producerName: 'test', opsetImport: [{ domain: '', version: 13 }],
    graph: {
      name: 'g',
      node: [{ opType: 'MatMul', name: 'mm', input: ['x', 'w'], output: ['y'] }],
      sparseInitializer: [st],
      input: [{ name: 'x', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 2 }, { dimValue: dims[0] }] } } } }],
      output: [{ name: 'y', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 2 }, { dimValue: dims[1] }] } } } }],
    },
  }).finish() as Uint8Array;
}
const values = (v: number[]) => ({ name: 'w', dataType: 1, dims: [v.length], floatData: v });
const indices = (v: number[], dims = [v.length]) => ({ name: 'w_i', dataType: 7, dims, int64Data: v });

describe('sparse_initializer loading', () => {
  it('linear and coordinate indices give the dense tensor', () => {
    const lin = parseModel(sparseModel({ values: values([1, 2, 3]), indices: indices([0, 5, 11]), dims: [4, 3] }));
    expect(Array.from(lin.graph.initializers.get('w')!.data as Float32Array)).toEqual([1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 3]);
    const coo = parseModel(sparseModel({ values: values([1, 2, 3]), indices: indices([0, 0, 1, 2, 3, 2], [3, 2]), dims: [4, 3] }));
    expect(Array.from(coo.graph.initializers.get('w')!.data as Float32Array)).toEqual([1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 3]);
    const empty = parseModel(sparseModel({ values: values([]), dims: [4, 3] }));
    expect(Array.from(empty.graph.initializers.get('w')!.data as Float32Array)).toEqual(new Array(12).fill(0));
  });

  it('bad sparse initializers are ModelFormatErrors naming the problem, also through Session.load', async () => {
    const cases: [object, RegExp][] = [
      [{ values: values([1, 2]), indices: indices([0, 12]), dims: [4, 3] }, /index 1 is 12, out of range \[0, 12\)/],
      [{ values: values([1, 2]), indices: indices([0, -1]), dims: [4, 3] }, /out of range/],
      [{ values: values([1, 2]), indices: indices([5, 3]), dims: [4, 3] }, /sorted and distinct.*index 1 \(position 3\) follows position 5/],
      [{ values: values([1, 2]), indices: indices([5, 5]), dims: [4, 3] }, /sorted and distinct/],
      [{ values: values([1, 2, 3]), indices: indices([0, 5]), dims: [4, 3] }, /indices .* must have dims \[3\] or \[3, 2\].*got \[2\]/],
      [{ values: values([1, 2]), indices: indices([0, 0, 4, 0], [2, 2]), dims: [4, 3] }, /coordinate 4 on axis 0, out of range \[0, 4\)/],
      [{ values: values([1, 2]), indices: indices([1, 0, 0, 2], [2, 2]), dims: [4, 3] }, /sorted/],
      [{ values: values([1, 2]), dims: [4, 3] }, /no indices/],
      [{ values: { ...values([1]), dims: [1, 1] }, indices: indices([0]), dims: [4, 3] }, /must be 1-D/],
      [{ values: values([1]), indices: { name: 'i', dataType: 1, dims: [1], floatData: [0] }, dims: [4, 3] }, /must be int64/],
      [{ indices: indices([0]), dims: [4, 3] }, /no name|no values/],
    ];
    for (const [st, msg] of cases) {
      const bytes = sparseModel(st);
      expect(() => parseModel(bytes), String(msg)).toThrow(ModelFormatError);
      expect(() => parseModel(bytes), String(msg)).toThrow(msg);
      await expect(Session.load(bytes, { device: 'cpu' })).rejects.toThrow(ModelFormatError);
    }
  });
});

describe('prune: bad input', () => {
  it('every invalid option is an InvalidArgumentError naming it', async () => {
    const bytes = smallMlp();
    const bad: [unknown, RegExp][] = [
      [undefined, /sparsity or threshold/],
      [{}, /exactly one of .*neither/],
      [{ sparsity: 0.5, threshold: 0.1 }, /exactly one of .*both/],
      [{ sparsity: 1 }, /sparsity must be a number in \[0, 1\), got 1/],
      [{ sparsity: -0.1 }, /sparsity must be a number in \[0, 1\)/],
      [{ sparsity: NaN }, /sparsity must be/],
      [{ sparsity: '0.5' }, /sparsity must be/],
      [{ threshold: -1 }, /threshold must be a finite number >= 0/],
      [{ threshold: Infinity }, /threshold must be/],
      [{ sparsity: 0.5, structure: 'blocks' }, /structure must be one of .*did you mean 'block'/],
      [{ sparsity: 0.5, structure: 'block', blockSize: 12 }, /blockSize must be 8, 16 or 32/],
      [{ sparsity: 0.5, blockSize: 16 }, /blockSize needs structure 'block'/],
      [{ sparsity: 0.5, include: 'fc' }, /include must be an array/],
      [{ sparsity: 0.5, exclude: [3] }, /exclude\[0\] must be a string or a RegExp/],
      [{ sparsity: 0.5, keepFirstLayerDense: 1 }, /keepFirstLayerDense must be a boolean/],
      [{ sparsity: 0.5, storage: 'csr' }, /storage must be one of/],
      [{ sparsity: 0.5, onProgress: true }, /onProgress must be a function/],
      [{ sparsity: 0.5, sparsty: 1 }, /unknown option 'sparsty'; did you mean 'sparsity'/],
      [{ sparsity: 0.5, include: ['nothing'] }, /leave no layer to prune/],
    ];
    for (const [opts, msg] of bad) {
      await expect(prune(bytes, opts as never), String(msg)).rejects.toThrow(InvalidArgumentError);
      await expect(prune(bytes, opts as never), String(msg)).rejects.toThrow(msg);
    }
    await expect(prune(42 as never, { sparsity: 0.5 })).rejects.toThrow(/model must be a file path or a Uint8Array/);
    await expect(prune('/nonexistent/model.onnx', { sparsity: 0.5 })).rejects.toThrow(InvalidArgumentError);
    await expect(prune(new Uint8Array([1, 2, 3, 4, 5]), { sparsity: 0.5 })).rejects.toThrow(ModelFormatError);
  });

  it('a model with no prunable layer is an InvalidArgumentError', async () => {
    const g = new GraphBuilder('relu', { opset: 13 });
    const x = g.input('x', 'float32', [2, 3]);
    const [y] = g.node('Relu', [x]);
    g.output(y!, 'float32', [2, 3]);
    await expect(prune(g.toBytes(), { sparsity: 0.5 })).rejects.toThrow(/has no prunable layer/);
    // MatMul of two runtime inputs: nothing to prune either.
    const h = new GraphBuilder('mm', { opset: 13 });
    const a = h.input('a', 'float32', [2, 3]);
    const b = h.input('b', 'float32', [3, 2]);
    const [c] = h.node('MatMul', [a, b]);
    h.output(c!, 'float32', [2, 2]);
    await expect(prune(h.toBytes(), { sparsity: 0.5 })).rejects.toThrow(InvalidArgumentError);
  });
});

void Tensor;
