import { describe, expect, it } from 'vitest';
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ModelFormatError, Tensor, UnsupportedOperatorError } from '../dist/index.js';
import { checkSupported, parseModel } from '../dist/onnx/model.js';

const require = createRequire(import.meta.url);
const { onnx } = require('onnx-proto');
const AT = onnx.AttributeProto.AttributeType;
const FLOAT = 1;
const INT64 = 7;

const vi = (name: string, dims: (number | string)[], elemType = FLOAT) => ({
  name, type: { tensorType: { elemType, shape: { dim: dims.map((d) => (typeof d === 'string' ? { dimParam: d } : { dimValue: d })) } } },
});
const model = (graph: object, opset = 17) =>
  onnx.ModelProto.encode({ irVersion: 8, producerName: 'test', opsetImport: [{ domain: '', version: opset }], graph }).finish() as Uint8Array;

function mlp() {
  const w = Float32Array.from({ length: 12 }, (_, i) => i * 0.5);
  const rawBytes = new Uint8Array(w.buffer);
  // raw_data placed at an odd offset inside its buffer, as it is inside a real file.
  const unaligned = new Uint8Array(rawBytes.length + 1).subarray(1);
  unaligned.set(rawBytes);
  return {
    name: 'mlp',
    // Deliberately out of order: Relu before the Gemm that feeds it.
    node: [
      { opType: 'Relu', name: 'act', input: ['h'], output: ['y'] },
      { opType: 'Gemm', name: 'fc', input: ['x', 'W', 'b'], output: ['h'], attribute: [
        { name: 'alpha', type: AT.FLOAT, f: 1.5 }, { name: 'transB', type: AT.INT, i: 1 },
        { name: 'tag', type: AT.STRING, s: new TextEncoder().encode('dense') },
        { name: 'ints', type: AT.INTS, ints: [1, -2, '9223372036854775807'] },
        { name: 'floats', type: AT.FLOATS, floats: [0.5, 2] },
        { name: 'strs', type: AT.STRINGS, strings: [new TextEncoder().encode('a'), new TextEncoder().encode('é')] },
        { name: 'value', type: AT.TENSOR, t: { dataType: INT64, dims: [2], int64Data: [3, -4] } },
      ] },
    ],
    initializer: [
      { name: 'W', dataType: FLOAT, dims: [3, 4], rawData: unaligned },
      { name: 'b', dataType: FLOAT, dims: [3], floatData: [1, 2, 3] },
    ],
    input: [vi('x', ['batch', 4])],
    output: [vi('y', ['batch', 3])],
  };
}

describe('parseModel', () => {
  it('converts a model: tensors, attributes of every kind, symbolic dims, topological order', () => {
    const m = parseModel(model(mlp()), { source: 'mlp.onnx' });
    expect(m.opset).toBe(17);
    expect(m.irVersion).toBe(8);
    expect(m.graph.nodes.map((n) => n.name)).toEqual(['fc', 'act']);
    expect(m.graph.inputs[0]).toEqual({ name: 'x', dtype: 'float32', shape: ['batch', 4] });
    const W = m.graph.initializers.get('W')!;
    expect(W).toBeInstanceOf(Tensor);
    expect(W.dims).toEqual([3, 4]);
    expect(Array.from(W.data as Float32Array)).toEqual(Array.from({ length: 12 }, (_, i) => i * 0.5));
    expect(Array.from(m.graph.initializers.get('b')!.data as Float32Array)).toEqual([1, 2, 3]);
    const a = m.graph.nodes[0]!.attributes;
    expect(a.alpha).toBe(1.5);
    expect(a.transB).toBe(1);
    expect(a.tag).toBe('dense');
    expect(a.ints).toEqual([1, -2, 9223372036854775807]);
    expect(a.floats).toEqual([0.5, 2]);
    expect(a.strs).toEqual(['a', 'é']);
    const v = a.value as Tensor;
    expect(v.dtype).toBe('int64');
    expect(Array.from(v.data as BigInt64Array)).toEqual([3n, -4n]);
  });

  it('reads subgraphs that use values of the enclosing graph', () => {
    const sub = { name: 'then', node: [{ opType: 'Identity', input: ['x'], output: ['t'] }], output: [vi('t', [1])] };
    const g = {
      name: 'if', node: [{ opType: 'If', name: 'branch', input: ['c'], output: ['y'], attribute: [
        { name: 'then_branch', type: AT.GRAPH, g: sub }, { name: 'else_branch', type: AT.GRAPH, g: sub }] }],
      input: [vi('c', [], 9), vi('x', [1])], output: [vi('y', [1])],
    };
    const m = parseModel(model(g));
    const then = m.graph.nodes[0]!.attributes.then_branch as { nodes: { opType: string }[] };
    expect(then.nodes[0]!.opType).toBe('Identity');
  });

  it('loads external data from the model folder, with offset and length', () => {
    const dir = mkdtempSync(join(tmpdir(), 'sonde-onnx-'));
    try {
      const vals = new Float32Array([7, 8, 9, 10]);
      const file = new Uint8Array(8 + 16);
      file.set(new Uint8Array(vals.buffer), 8);
      writeFileSync(join(dir, 'weights.bin'), file);
      const ext = (location: string, extra: object[] = []) => model({
        name: 'ext', node: [{ opType: 'Identity', input: ['W'], output: ['y'] }], output: [vi('y', [4])],
        initializer: [{ name: 'W', dataType: FLOAT, dims: [4], dataLocation: 1,
          externalData: [{ key: 'location', value: location }, ...extra] }],
      });
      const m = parseModel(ext('weights.bin', [{ key: 'offset', value: '8' }, { key: 'length', value: '16' }]), { baseDir: dir });
      expect(Array.from(m.graph.initializers.get('W')!.data as Float32Array)).toEqual([7, 8, 9, 10]);
      expect(() => parseModel(ext('missing.bin'), { baseDir: dir })).toThrow(/external file 'missing.bin', which does not exist/);
      expect(() => parseModel(ext('../escape.bin'), { baseDir: dir })).toThrow(/outside the model's folder/);
      expect(() => parseModel(ext('weights.bin', [{ key: 'offset', value: '20' }, { key: 'length', value: '16' }]), { baseDir: dir }))
        .toThrow(/which has 24 bytes/);
      expect(() => parseModel(ext('weights.bin'))).toThrow(/load the model from its path/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('parseModel bad input', () => {
  const bad = (bytes: Uint8Array) => () => parseModel(bytes, { source: 'm.onnx' });

  it('random and truncated bytes', () => {
    let seed = 7;
    const random = Uint8Array.from({ length: 4096 }, () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 255);
    expect(bad(random)).toThrow(ModelFormatError);
    const good = model(mlp());
    for (const cut of [1, 10, good.length >> 1, good.length - 3]) {
      expect(bad(good.subarray(0, cut))).toThrow(ModelFormatError);
    }
  });

  it('a valid protobuf that is not a model', () => {
    const tensor = onnx.TensorProto.encode({ name: 'x', dataType: FLOAT, dims: [2], floatData: [1, 2] }).finish();
    expect(bad(tensor)).toThrow(ModelFormatError);
    expect(bad(new Uint8Array())).toThrow(/no graph/);
  });

  it('a missing initializer', () => {
    const g = mlp();
    g.initializer = g.initializer.filter((t) => t.name !== 'b');
    expect(bad(model(g))).toThrow("m.onnx: node 'fc' (Gemm) reads 'b', which is not a graph input, an initializer or any node's output (a missing initializer?)");
  });

  it('a cycle', () => {
    const g = { name: 'cyc', node: [
      { opType: 'Relu', name: 'a', input: ['v2'], output: ['v1'] },
      { opType: 'Relu', name: 'b', input: ['v1'], output: ['v2'] },
      { opType: 'Relu', name: 'c', input: ['x'], output: ['y'] },
    ], input: [vi('x', [1])], output: [vi('y', [1])] };
    expect(bad(model(g))).toThrow("m.onnx: the graph has a cycle through nodes 'a', 'b'");
  });

  it('opsets outside 7..21', () => {
    expect(bad(model(mlp(), 22))).toThrow('m.onnx uses ONNX opset 22, newer than the newest sonde supports (21)');
    expect(bad(model(mlp(), 6))).toThrow(/opset 6; sonde supports opsets 7 to 21/);
  });

  it('tensor data that contradicts its dims, and unsupported data types', () => {
    const g = mlp();
    g.initializer[1] = { name: 'b', dataType: FLOAT, dims: [4], floatData: [1, 2, 3] };
    expect(bad(model(g))).toThrow("m.onnx: initializer 'b' has 3 values, but dims [4] need 4");
    g.initializer[1] = { name: 'b', dataType: 11, dims: [1], doubleData: [1] } as never;
    expect(bad(model(g))).toThrow("m.onnx: initializer 'b' has data type DOUBLE, which sonde does not support");
  });

  it('a value produced twice, and an output nobody produces', () => {
    const g = { name: 'dup', node: [
      { opType: 'Relu', name: 'a', input: ['x'], output: ['y'] },
      { opType: 'Relu', name: 'b', input: ['x'], output: ['y'] },
    ], input: [vi('x', [1])], output: [vi('y', [1])] };
    expect(bad(model(g))).toThrow("value 'y' is produced by both node 'a' and node 'b'");
    const g2 = { name: 'noout', node: [{ opType: 'Relu', input: ['x'], output: ['z'] }], input: [vi('x', [1])], output: [vi('y', [1])] };
    expect(bad(model(g2))).toThrow("graph output 'y' is not produced by any node");
  });
});

describe('checkSupported', () => {
  it('lists every unsupported node in one error', () => {
    const g = { name: 'u', node: [
      { opType: 'Relu', name: 'r', input: ['x'], output: ['a'] },
      { opType: 'FancyOp', name: 'f1', input: ['a'], output: ['b'] },
      { opType: 'Custom', domain: 'com.example', name: 'c1', input: ['b'], output: ['y'] },
    ], input: [vi('x', [1])], output: [vi('y', [1])] };
    const m = parseModel(model(g));
    const supported = (domain: string, op: string) => domain === '' && op === 'Relu';
    expect(() => checkSupported(m.graph, supported)).toThrow(UnsupportedOperatorError);
    expect(() => checkSupported(m.graph, supported)).toThrow(
      "the model uses 2 nodes sonde does not support: FancyOp (node 'f1'), com.example.Custom (node 'c1')");
    expect(() => checkSupported(m.graph, () => true)).not.toThrow();
  });
});

describe('onnx-proto loading', () => {
  it('importing sonde does not load onnx-proto; the first model parsed does', async () => {
    const { spawnSync } = await import('node:child_process');
    const script = `import { createRequire } from 'node:module';
      import { Session } from './dist/index.js';
      const loaded = () => Object.keys(createRequire(import.meta.url).cache).some((k) => k.includes('/onnx-proto/'));
      const before = loaded();
      const bytes = ${JSON.stringify(Array.from(model({ node: [{ opType: 'Relu', input: ['x'], output: ['y'] }], input: [vi('x', [2])], output: [vi('y', [2])] })))};
      const s = await Session.load(new Uint8Array(bytes));
      console.log(JSON.stringify({ before, after: loaded() }));
      s.dispose();`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
    expect(JSON.parse(r.stdout.trim() || 'null'), r.stderr).toEqual({ before: false, after: true });
  });
});
