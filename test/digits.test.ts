// The embedded default model end to end: models/digits.onnx (a residual CNN, scripts/train-digits.py)
// on its held-out split, against what torch recorded in models/digits.json and against
// onnxruntime-node, an independent runtime. The Session half awaits lib/session (Session.load/run):
// until it lands, it fails on the first expectation, saying so.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import ort from 'onnxruntime-node';
import * as sonde from '../dist/index.js';
import { parseModel } from '../dist/onnx/model.js';
import { countCorrect, modelPath, readReport, readTestSplit } from '../models/digits.js';

const report = readReport();
const split = readTestSplit();
const PIXELS = split.height * split.width;
const CLASSES = 10;
const dims = (batch: number) => [batch, 1, split.height, split.width];

// Reference logits: onnxruntime-node over the whole split in one batch.
let ortLogits: Float32Array;
beforeAll(async () => {
  const session = await ort.InferenceSession.create(modelPath);
  try {
    const out = await session.run({ image: new ort.Tensor('float32', split.images, dims(split.n)) });
    ortLogits = Float32Array.from(out.logits!.data as Float32Array);
  } finally {
    await session.release();
  }
});

describe('digits model files', () => {
  it('the split matches the recorded sizes and holds every class', () => {
    expect(split.n).toBe(report.test_size);
    expect([split.height, split.width]).toEqual([8, 8]);
    const perClass = new Array<number>(CLASSES).fill(0);
    for (const label of split.labels) perClass[label]!++;
    // Stratified 20% of ~180 images per class.
    for (const count of perClass) expect(count).toBeGreaterThanOrEqual(30);
    for (const v of split.images) expect(v >= 0 && v <= 1).toBe(true);
  });

  it('the model is what the demo and Session expect: BatchNormalization kept, dynamic batch', () => {
    const model = parseModel(readFileSync(modelPath), { source: modelPath });
    expect(model.opset).toBeGreaterThanOrEqual(13);
    expect(model.opset).toBeLessThanOrEqual(17);
    const { inputs, outputs, nodes } = model.graph;
    expect(inputs.map((v) => [v.name, v.dtype, v.shape])).toEqual([['image', 'float32', ['batch', 1, 8, 8]]]);
    expect(outputs.map((v) => [v.name, v.dtype, v.shape])).toEqual([['logits', 'float32', ['batch', CLASSES]]]);
    const counts: Record<string, number> = {};
    for (const n of nodes) counts[n.opType] = (counts[n.opType] ?? 0) + 1;
    expect(counts).toEqual(report.onnx_ops);
    expect(counts.BatchNormalization).toBeGreaterThan(0);
    expect(counts.Add).toBeGreaterThan(0);
  });
});

describe('digits model on onnxruntime-node', () => {
  it('classifies the split exactly as torch recorded', () => {
    expect(ortLogits.length).toBe(split.n * CLASSES);
    expect(countCorrect(ortLogits, split.labels)).toBe(report.test_correct);
  });

  it('gives the same logits at batch 1 and at an odd batch (dynamic batch axis)', async () => {
    const session = await ort.InferenceSession.create(modelPath);
    try {
      for (const [start, batch] of [[0, 1], [359, 1], [5, 37]] as const) {
        const x = split.images.slice(start * PIXELS, (start + batch) * PIXELS);
        const out = (await session.run({ image: new ort.Tensor('float32', x, dims(batch)) })).logits!.data as Float32Array;
        const want = ortLogits.subarray(start * CLASSES, (start + batch) * CLASSES);
        for (let i = 0; i < want.length; i++) expect(Math.abs(out[i]! - want[i]!)).toBeLessThan(1e-5);
      }
    } finally {
      await session.release();
    }
  });
});

describe('digits model on sonde Session (awaits lib/session)', () => {
  // Agreement within 1e-4 of max |logit| cannot change a prediction: torch's smallest top-1 margin
  // on this split is recorded, and it is far larger than twice that.
  const REL_TOL = 1e-4;
  const sessions: { dispose(): void }[] = [];
  afterAll(() => {
    for (const s of sessions) s.dispose();
  });

  function expectLogitsClose(got: ArrayLike<number>, want: Float32Array, what: string): void {
    expect(got.length, what).toBe(want.length);
    let scale = 0;
    for (const v of ortLogits) scale = Math.max(scale, Math.abs(v));
    for (let i = 0; i < want.length; i++) {
      const err = Math.abs(got[i]! - want[i]!);
      if (!(err <= REL_TOL * scale)) {
        throw new Error(`${what}: logit [${Math.floor(i / CLASSES)}, ${i % CLASSES}] = ${got[i]} but onnxruntime-node = ${want[i]} (|err| ${err.toExponential(3)} > ${REL_TOL} x max |logit| ${scale.toFixed(3)})`);
      }
    }
  }

  it('the recorded margin makes the tolerance meaningful', () => {
    expect(report.min_top1_margin_relative).toBeGreaterThan(2 * REL_TOL);
  });

  it.each(['none', 'basic', 'all'] as const)('optimization %s: same accuracy as torch, logits match onnxruntime-node', async (optimization) => {
    expect(typeof sonde.Session, 'sonde exports Session (lib/session has landed)').toBe('function');
    const session = await sonde.Session.load(modelPath, { optimization });
    sessions.push(session);
    expect(session.inputs.map((v) => v.name)).toEqual(['image']);
    expect(session.outputs.map((v) => v.name)).toEqual(['logits']);

    // Whole split in one batch, in batches of 64 (the last one partial: 360 = 5 x 64 + 40), and a
    // few images at batch 1 and at an odd batch.
    const whole = (await session.run({ image: new sonde.Tensor('float32', split.images, dims(split.n)) })).logits!.data;
    expectLogitsClose(whole, ortLogits, `batch ${split.n}`);
    expect(countCorrect(whole, split.labels)).toBe(report.test_correct);

    const batched = new Float32Array(split.n * CLASSES);
    for (let start = 0; start < split.n; start += 64) {
      const batch = Math.min(64, split.n - start);
      const x = split.images.slice(start * PIXELS, (start + batch) * PIXELS);
      batched.set((await session.run({ image: new sonde.Tensor('float32', x, dims(batch)) })).logits!.data as Float32Array, start * CLASSES);
    }
    expectLogitsClose(batched, ortLogits, 'batches of 64');
    expect(countCorrect(batched, split.labels)).toBe(report.test_correct);

    for (const [start, batch] of [[0, 1], [359, 1], [5, 37]] as const) {
      const x = split.images.slice(start * PIXELS, (start + batch) * PIXELS);
      const out = (await session.run({ image: new sonde.Tensor('float32', x, dims(batch)) })).logits!.data;
      expectLogitsClose(out, ortLogits.subarray(start * CLASSES, (start + batch) * CLASSES), `batch ${batch} from image ${start}`);
    }
  });
});
