/**
 * What the GPU language-model tests share (test/cuda/llm.test.ts, llm-pool.test.ts): the CPU
 * transformer evaluating the same GGUF is the reference. Fixtures are the tiny models of
 * test/llm-fixtures.ts, written once per process.
 *
 * Tolerance, per weight type: the two devices differ by a relative error delta per matrix product,
 * and P = 5 * layers + 1 products chain into a logit (llm-forward.test.ts's argument), so a logit
 * may differ by up to 2 P delta max|logit|:
 * - f32: fp32 on both sides, another summation order: delta = 130 * 2^-24 (K <= 128 terms);
 * - f16: the GPU's tensor-core GEMM (prefill rows) rounds the activations to f16, the CPU keeps
 *   them in fp32: delta = 2^-11; bf16 likewise: 2^-8;
 * - q8_0 / q4_0: both quantise activations per block of 32 by the same rule with exact int32 block
 *   sums; they differ only where an fp32 ulp upstream flips an activation's rounding to int8
 *   (about 1 in 10^5 elements, a step of amax / 127 each): delta = 2^-9 covers a few flips.
 * An f16 KV cache adds the keys' and values' rounding on both sides alike; the GPU's prefill also
 * rounds queries to f16 there (2^-11, covered by the f16 delta).
 */
import { afterAll, expect } from 'vitest';
import { join } from 'node:path';
import type { LlmEngine } from '../../lib/llm/engine.js';
import type { GgufTensorType } from '../../lib/llm/gguf.js';
import { loadTransformer } from '../../lib/llm/transformer.js';
import { loadGpuTransformer, type GpuTransformer } from '../../lib/llm/transformer-gpu.js';
import { fixtureDir, rng, writeFixture, type FixtureInfo, type FixtureOptions } from '../llm-fixtures.js';
import type { GpuTarget } from './targets.js';

const dir = fixtureDir('sonde-gpu-llm-');
const fixtures = new Map<string, Promise<FixtureInfo>>();
export function fixture(name: string, o: FixtureOptions): Promise<FixtureInfo> {
  let f = fixtures.get(name);
  if (!f) {
    f = writeFixture(join(dir, `${name}.gguf`), o);
    fixtures.set(name, f);
  }
  return f;
}

export const DELTA: Record<GgufTensorType, number> = { f32: 130 * 2 ** -24, f16: 2 ** -11, bf16: 2 ** -8, q8_0: 2 ** -9, q4_0: 2 ** -9 };

export function tokens(n: number, vocab: number, seed: number): Int32Array {
  const r = rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(r() * vocab));
}

/** Every row of got (rows x vocab) within 2 P delta max|want row| of want's. */
export function expectClose(got: Float32Array, want: Float32Array, vocab: number, layers: number, delta: number, what: string): void {
  expect(got.length, `${what}: logits length`).toBe(want.length);
  const products = 5 * layers + 1;
  for (let r = 0; r < want.length / vocab; r++) {
    let big = 0;
    for (let t = 0; t < vocab; t++) big = Math.max(big, Math.abs(want[r * vocab + t]!));
    const bound = 2 * products * delta * big + 1e-6;
    let worst = 0;
    for (let t = 0; t < vocab; t++) {
      const i = r * vocab + t;
      const err = Math.abs(got[i]! - want[i]!);
      worst = Math.max(worst, err);
      if (!(err <= bound)) expect.fail(`${what}: row ${r} token ${t}: GPU ${got[i]} CPU ${want[i]} (|diff| ${err} > bound ${bound})`);
    }
    expect(worst).toBeLessThanOrEqual(bound);
  }
}

/** The CPU and the GPU transformer of one file, both disposed after the enclosing describe block. */
export function enginePairs(t: GpuTarget): (info: FixtureInfo) => Promise<{ cpu: LlmEngine; gpu: GpuTransformer }> {
  const engines: LlmEngine[] = [];
  afterAll(() => engines.forEach((e) => e.dispose()));
  return async (info) => {
    const cpu = await loadTransformer(info.path);
    engines.push(cpu);
    const gpu = await loadGpuTransformer(info.path, { device: t.id });
    engines.push(gpu);
    return { cpu, gpu };
  };
}
