// The generated bench models (bench/graphs/models.js) as onnxruntime-node sees them, and sonde's
// Session against onnxruntime-node on each of them at every optimisation level and in bf16.
// onnxruntime-node is the independent reference: a different runtime with its own kernels,
// fusions and summation orders.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import * as sonde from '../dist/index.js';
import { Tensor } from '../dist/index.js';
import { prepareModel, type OrtModel } from '../bench/anchors/onnxruntime.js';
import {
  BF16_RESNET50_BOUND, BF16_TRANSFORMER_BOUND, MODELS, emulateBf16, mlp, modelBytes, modelInput, relativeDifference, roundToBf16,
  roundingTolerance, type ModelName,
} from '../bench/graphs/models.js';

/** The models with a measured bf16 bound (bench/graphs/models.js). */
const BF16_MODELS: [ModelName, number][] = [['resnet50', BF16_RESNET50_BOUND], ['transformer', BF16_TRANSFORMER_BOUND]];

const NAMES = Object.keys(MODELS) as ModelName[];

function expectFiniteAndLive(data: Float32Array, what: string): void {
  let maxAbs = 0;
  let sum = 0;
  let sq = 0;
  for (const v of data) {
    if (!Number.isFinite(v)) throw new Error(`${what}: non-finite output ${v}`);
    maxAbs = Math.max(maxAbs, Math.abs(v));
    sum += v;
    sq += v * v;
  }
  const mean = sum / data.length;
  // Activations O(1): neither blown up nor collapsed to a constant, so a comparison against a
  // relative bound means something.
  expect(maxAbs, `${what}: max|output|`).toBeGreaterThan(0.5);
  expect(maxAbs, `${what}: max|output|`).toBeLessThan(100);
  expect(Math.sqrt(sq / data.length - mean * mean), `${what}: output std`).toBeGreaterThan(0.1);
}

describe('generated models in onnxruntime-node', () => {
  const sessions = new Map<ModelName, OrtModel>();
  afterAll(async () => {
    for (const s of sessions.values()) await s.release();
  });

  for (const name of NAMES) {
    it(`${name}: loads, one input 'input' and one output 'output', runs at batch 1 with finite O(1) outputs`, async () => {
      const ort = await prepareModel(modelBytes(name), { threads: 2 });
      sessions.set(name, ort);
      expect(ort.inputNames).toEqual(['input']);
      expect(ort.outputNames).toEqual(['output']);
      const out = (await ort.run({ input: modelInput(name, 1) })).output!;
      expect(out.dims).toEqual(MODELS[name].outputDims(1));
      expectFiniteAndLive(out.data, name);
    });

    it(`${name}: onnxruntime-node's own spread (optimisation 'disabled' vs 'all') is far inside roundingTolerance`, async () => {
      const unoptimised = await prepareModel(modelBytes(name), { threads: 2, optimization: 'disabled' });
      try {
        const x = modelInput(name, 1);
        const want = (await sessions.get(name)!.run({ input: x })).output!.data;
        const got = (await unoptimised.run({ input: x })).output!.data;
        // Two correct fp32 runtimes, one folding BN and fusing, one not: measured 3e-7 relative at
        // most. A bound within 10x of that would make sonde's comparison flaky.
        expect(relativeDifference(got, want)).toBeLessThan(roundingTolerance(name) / 10);
      } finally {
        await unoptimised.release();
      }
    });
  }

  it('the batch dimension is symbolic: a batch-2 run gives batch 1 its own result (mlp, transformer)', async () => {
    for (const name of ['mlp', 'transformer'] as const) {
      const ort = sessions.get(name) ?? await prepareModel(modelBytes(name), { threads: 2 });
      sessions.set(name, ort);
      const x1 = modelInput(name, 1);
      const x2 = modelInput(name, 2);
      x2.data.set(x1.data, x1.data.length); // row 1 of the batch-2 input is the batch-1 input
      const y1 = (await ort.run({ input: x1 })).output!;
      const y2 = (await ort.run({ input: x2 })).output!;
      expect(y2.dims).toEqual(MODELS[name].outputDims(2));
      expect(relativeDifference(y2.data.subarray(y1.data.length), y1.data)).toBeLessThan(roundingTolerance(name));
      // ...and row 0 is a different input, so a different result.
      expect(relativeDifference(y2.data.subarray(0, y1.data.length), y1.data)).toBeGreaterThan(0.05);
    }
  });

  it('generation is deterministic in its seed', () => {
    expect(Buffer.from(mlp({ batch: 'N', seed: 9 })).equals(Buffer.from(mlp({ batch: 'N', seed: 9 })))).toBe(true);
    expect(Buffer.from(mlp({ batch: 'N', seed: 9 })).equals(Buffer.from(mlp({ batch: 'N', seed: 10 })))).toBe(false);
  });

  it('roundToBf16 rounds to nearest, ties to even (hand-checked)', () => {
    // bf16 keeps 8 significant bits: the spacing at 1 is 2^-7.
    const got = roundToBf16(Float32Array.of(1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -3.14159, 0, -0, Infinity, 65504));
    expect(Array.from(got)).toEqual([1, 1 + 2 ** -6, 1 + 2 ** -7, -3.140625, 0, -0, Infinity, 65536]);
    expect(Number.isNaN(roundToBf16(Float32Array.of(NaN))[0])).toBe(true);
  });

  it.each(BF16_MODELS)('%s emulated in bf16 stays within its bf16 bound (%s) of fp32, and beyond the fp32 tolerance', async (name, bound) => {
    const fp32 = sessions.get(name) ?? await prepareModel(modelBytes(name), { threads: 2 });
    sessions.set(name, fp32);
    const bf16 = await prepareModel(emulateBf16(modelBytes(name)), { threads: 2 });
    try {
      for (const batch of [1, 2]) {
        const x = modelInput(name, batch);
        const d = relativeDifference((await bf16.run({ input: x })).output!.data, (await fp32.run({ input: x })).output!.data);
        // Measured 3.1e-3 to 3.7e-3 (ResNet-50), 2.0e-3 to 2.8e-3 (transformer); the fp32 bounds
        // (3.6e-4 for ResNet-50) would reject these, so the two bounds tell fp32 and bf16 apart.
        expect(d).toBeLessThan(bound / 2);
        expect(d).toBeGreaterThan(roundingTolerance(name));
      }
    } finally {
      await bf16.release();
    }
  });
});

// The Session API (issue #5) as this test uses it; lib/session/session.ts is written on another
// branch. Until it is merged these cases are skipped; once the source exists they must run, and a
// Session missing from the package's exports fails them.
interface SessionLike {
  run(feeds: Record<string, Tensor>): Promise<Record<string, Tensor>>;
  dispose(): void;
}
interface SessionClass {
  load(bytes: Uint8Array | string, options?: { threads?: number; optimization?: 'none' | 'basic' | 'all'; precision?: 'fp32' | 'bf16' }): Promise<SessionLike>;
}
const sessionLanded = existsSync(new URL('../lib/session/session.ts', import.meta.url));

describe.skipIf(!sessionLanded)('sonde Session against onnxruntime-node on the generated models', () => {
  const Session = (sonde as unknown as { Session?: SessionClass }).Session;
  const refs = new Map<ModelName, OrtModel>();

  beforeAll(() => {
    if (!Session) throw new Error('lib/session/session.ts exists but dist/index.js exports no Session');
  });
  afterAll(async () => {
    for (const r of refs.values()) await r.release();
  });

  async function reference(name: ModelName, batch: number): Promise<{ feed: Record<string, Tensor>; want: { data: Float32Array; dims: number[] } }> {
    if (!refs.has(name)) refs.set(name, await prepareModel(modelBytes(name), { threads: 2 }));
    const x = modelInput(name, batch);
    const want = (await refs.get(name)!.run({ input: x })).output!;
    return { feed: { input: new Tensor('float32', x.data, x.dims) }, want };
  }

  for (const name of NAMES) {
    for (const optimization of ['none', 'basic', 'all'] as const) {
      it(`${name}, optimization '${optimization}': batch 1 and 2 match onnxruntime-node within roundingTolerance`, async () => {
        const session = await Session!.load(modelBytes(name), { threads: 2, optimization });
        try {
          for (const batch of [1, 2]) {
            const { feed, want } = await reference(name, batch);
            const out = (await session.run(feed)).output!;
            expect(out.dims).toEqual(want.dims);
            const d = relativeDifference(out.data as Float32Array, want.data);
            expect(d, `${name} batch ${batch}: |sonde - ort| / max|ort|`).toBeLessThanOrEqual(roundingTolerance(name));
          }
        } finally {
          session.dispose();
        }
      });
    }
  }

  // The bounds: measured with emulateBf16 in onnxruntime-node (weights and activations rounded to
  // bf16, fp32 accumulation), times 4 (bench/graphs/models.js). The transformer's weight MatMuls
  // run as GEMMs on bf16 weights (AMX tiles where the CPU has them, else avx512bf16, else widened).
  it.each(BF16_MODELS)('%s with precision \'bf16\' is within its bf16 bound (%s) of onnxruntime-node fp32', async (name, bound) => {
    const bytes = modelBytes(name);
    const bf16 = await Session!.load(bytes, { threads: 2, precision: 'bf16' });
    const fp32 = await Session!.load(bytes, { threads: 2 });
    try {
      for (const batch of [1, 2]) {
        const { feed, want } = await reference(name, batch);
        const got = (await bf16.run(feed)).output!.data as Float32Array;
        expect(relativeDifference(got, want.data), `batch ${batch}`).toBeLessThanOrEqual(bound);
        // The option took effect: the same plan in fp32 gives different bits.
        expect(relativeDifference(got, (await fp32.run(feed)).output!.data as Float32Array)).toBeGreaterThan(0);
      }
    } finally {
      bf16.dispose();
      fp32.dispose();
    }
  });
});
