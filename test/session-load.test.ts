// Session.load on every malformed-model case of issue #5, each a typed error that says what was
// wrong (the process alive, later loads unaffected), and a model whose weights live in an external
// data file next to it (the >2 GB layout), checked against the same model with embedded weights.
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, ModelFormatError, Session, Tensor, UnsupportedOperatorError } from '../dist/index.js';
import { GraphBuilder, randomTensor } from '../bench/graphs/builder.js';

const require = createRequire(import.meta.url);
const { onnx } = require('onnx-proto');

function mlp(opset = 17) {
  const g = new GraphBuilder('mlp', { opset });
  g.input('x', 'float32', ['n', 8]);
  const [h] = g.node('MatMul', ['x', g.init('w1', randomTensor([8, 16], { seed: 3 }))]);
  const [r] = g.node('Relu', [h]);
  const [y] = g.node('MatMul', [r, g.init('w2', randomTensor([16, 4], { seed: 4 }))], {}, ['y']);
  g.output(y, 'float32', ['n', 4]);
  return g;
}

const x = new Tensor('float32', Float32Array.from({ length: 16 }, (_, i) => (i % 7) - 3), [2, 8]);

describe('Session.load: malformed models', () => {
  it('truncated bytes, random bytes and a protobuf that is not a model are ModelFormatErrors', async () => {
    const bytes = mlp().toBytes();
    for (const cut of [bytes.length - 1, Math.floor(bytes.length / 2), 7]) {
      await expect(Session.load(bytes.subarray(0, cut))).rejects.toBeInstanceOf(ModelFormatError);
    }
    let seed = 12345;
    const random = Uint8Array.from({ length: 4096 }, () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 24));
    await expect(Session.load(random)).rejects.toBeInstanceOf(ModelFormatError);
    const tensor = onnx.TensorProto.encode({ name: 't', dataType: 1, dims: [2], floatData: [1, 2] }).finish();
    await expect(Session.load(tensor)).rejects.toThrow(ModelFormatError);
    // The process and the loader are fine afterwards.
    const s = await Session.load(bytes);
    expect((await s.run({ x })).y!.dims).toEqual([2, 4]);
    s.dispose();
  });

  it('a missing initializer names the node and the value', async () => {
    const g = new GraphBuilder('m', { opset: 17 });
    g.input('x', 'float32', [2, 8]);
    const [y] = g.node('MatMul', ['x', 'w_missing'], {}, 1, { name: 'fc1' });
    g.output(y);
    const err = await Session.load(g.toBytes()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ModelFormatError);
    expect((err as Error).message).toMatch(/node 'fc1' \(MatMul\) reads 'w_missing'/);
  });

  it('a graph with a cycle names the nodes on it', async () => {
    const g = new GraphBuilder('cyc', { opset: 17 });
    g.input('x', 'float32', [4]);
    g.node('Add', ['x', 'b'], {}, ['a'], { name: 'n1' });
    g.node('Relu', ['a'], {}, ['b'], { name: 'n2' });
    g.output('b');
    await expect(Session.load(g.toBytes())).rejects.toThrow(/cycle through nodes 'n1', 'n2'/);
  });

  it('an opset newer than supported, and one older, say which opsets are supported', async () => {
    await expect(Session.load(mlp(22).toBytes())).rejects.toThrow(/opset 22, newer than the newest sonde supports \(21\)/);
    await expect(Session.load(mlp(6).toBytes())).rejects.toThrow(/opset 6; sonde supports opsets 7 to 21/);
  });

  it('every unsupported operator is listed in one error at load, never at run time', async () => {
    const g = new GraphBuilder('u', { opset: 17 });
    g.input('x', 'float32', [4]);
    const [a] = g.node('Relu', ['x']);
    const [b] = g.node('Einsum', [a, a], { equation: 'i,i->i' }, 1, { name: 'e1' });
    const [c] = g.node('Foo', [b], {}, 1, { name: 'f1', domain: 'com.example' });
    g.output(c);
    const err = await Session.load(g.toBytes()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UnsupportedOperatorError);
    expect((err as Error).message).toMatch(/2 nodes sonde does not support: Einsum \(node 'e1'\), com\.example\.Foo \(node 'f1'\)/);
  });
});

describe('Session.load: random corruption', () => {
  it('of the demo model: every load and run resolves or rejects with a typed error', async () => {
    const base = new Uint8Array(readFileSync(new URL('../models/digits.onnx', import.meta.url)));
    let seed = 77;
    const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed; };
    const outcomes = { ran: 0, rejected: 0 };
    for (let trial = 0; trial < 200; trial++) {
      const b = base.slice();
      // Flips anywhere, in the first 4 KiB, or in the last 2 KiB (names, attributes, shapes), or a
      // truncation.
      const mode = trial % 4;
      for (let flips = 1 + (rnd() % 6); flips > 0; flips--) {
        const at = mode === 1 ? rnd() % 4096 : mode === 2 ? b.length - 1 - (rnd() % 2048) : rnd() % b.length;
        b[at] = rnd() & 255;
      }
      try {
        const s = await Session.load(mode === 3 ? b.subarray(0, rnd() % b.length) : b);
        try {
          const input = s.inputs[0]!;
          const dims = (input.shape ?? []).map((d) => (typeof d === 'number' && d > 0 && d <= 4096 ? d : 1));
          await s.run({ [input.name]: new Tensor('float32', new Float32Array(dims.reduce((a, c) => a * c, 1)).fill(0.5), dims) });
        } finally {
          s.dispose();
        }
        outcomes.ran++;
      } catch (e) {
        expect([ModelFormatError, UnsupportedOperatorError, InvalidArgumentError].some((c) => e instanceof c), String(e)).toBe(true);
        outcomes.rejected++;
      }
    }
    expect(outcomes.ran).toBeGreaterThan(0);
    expect(outcomes.rejected).toBeGreaterThan(0);
  });
});

describe('Session.load: external data', () => {
  /** The mlp with w1 and w2 moved to `weights.bin` beside the model. */
  function externalModel(dir: string) {
    const proto = mlp().toProto();
    const parts: Uint8Array[] = [];
    let offset = 0;
    for (const init of proto.graph.initializer) {
      const raw = init.rawData as Uint8Array;
      parts.push(raw);
      init.rawData = new Uint8Array();
      init.dataLocation = 1;
      init.externalData = [
        { key: 'location', value: 'weights.bin' }, { key: 'offset', value: String(offset) }, { key: 'length', value: String(raw.length) },
      ];
      offset += raw.length;
    }
    writeFileSync(join(dir, 'weights.bin'), Buffer.concat(parts));
    const path = join(dir, 'model.onnx');
    writeFileSync(path, onnx.ModelProto.encode(proto).finish());
    return path;
  }

  it('loads weights from the file next to the model and matches the embedded model', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sonde-ext-'));
    const path = externalModel(dir);
    const ext = await Session.load(path);
    const embedded = await Session.load(mlp().toBytes());
    const a = (await ext.run({ x })).y!.data as Float32Array;
    const b = (await embedded.run({ x })).y!.data as Float32Array;
    expect(Array.from(a)).toEqual(Array.from(b));
    ext.dispose();
    embedded.dispose();
  });

  it('a missing external data file, or bytes, is a ModelFormatError naming the file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sonde-ext-'));
    const path = externalModel(dir);
    writeFileSync(join(dir, 'weights.bin'), new Uint8Array(10));
    await expect(Session.load(path)).rejects.toThrow(/'weights\.bin'.*which has 10 bytes/);
    const dir2 = mkdtempSync(join(tmpdir(), 'sonde-ext-'));
    const path2 = externalModel(dir2);
    const { rmSync } = await import('node:fs');
    rmSync(join(dir2, 'weights.bin'));
    const err = await Session.load(path2).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ModelFormatError);
    expect((err as Error).message).toMatch(/external file 'weights\.bin', which does not exist/);
    // From bytes there is no folder to look in: the error says to load from the path.
    const bytes = (await import('node:fs')).readFileSync(path2);
    await expect(Session.load(new Uint8Array(bytes))).rejects.toThrow(/load the model from its path/);
  });
});

describe('Session.run: an empty batch', () => {
  it('zero rows give zero-row outputs, alone and batched with other requests', async () => {
    const empty = new Tensor('float32', new Float32Array(0), [0, 8]);
    const s = await Session.load(mlp().toBytes());
    const out = await s.run({ x: empty });
    expect(out.y!.dims).toEqual([0, 4]);
    expect(out.y!.data.length).toBe(0);
    const b = await Session.load(mlp().toBytes(), { batching: { maxBatchSize: 8, maxDelayMs: 1 } });
    const [full, none] = await Promise.all([b.run({ x }), b.run({ x: empty })]);
    expect(Array.from(full.y!.data as Float32Array)).toEqual(Array.from((await s.run({ x })).y!.data as Float32Array));
    expect(none.y!.dims).toEqual([0, 4]);
    s.dispose();
    b.dispose();
  });
});
