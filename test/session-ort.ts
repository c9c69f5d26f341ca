// Shared by the session tests: run one model in sonde and in onnxruntime-node and compare.
import ort from 'onnxruntime-node';
import { expect } from 'vitest';
import { Session, Tensor } from '../dist/index.js';
import type { SessionOptions } from '../dist/index.js';

export type Feeds = Record<string, Tensor>;

/** The unit roundoff of float32. */
export const U = 2 ** -24;

export async function ortRun(bytes: Uint8Array, feeds: Feeds): Promise<Record<string, { data: ArrayLike<number | bigint>; dims: readonly number[]; type: string }>> {
  const s = await ort.InferenceSession.create(bytes, { intraOpNumThreads: 1, interOpNumThreads: 1, graphOptimizationLevel: 'disabled' });
  try {
    const f: Record<string, ort.Tensor> = {};
    for (const [k, t] of Object.entries(feeds)) f[k] = new ort.Tensor(t.dtype as 'float32', t.data as Float32Array, t.dims as number[]);
    return await s.run(f) as never;
  } finally {
    await s.release();
  }
}

/**
 * Runs `bytes` in both and checks every output: same dims and dtype, and per element
 * |sonde - ort| <= tol(|ort|) where `tol` is derived by the caller from the op's rounding
 * (atol + rtol * |want|).
 */
export async function expectMatchesOrt(bytes: Uint8Array, feeds: Feeds, { atol = 1e-6, rtol = 4 * U, options = {} as SessionOptions, label = '' } = {}): Promise<Record<string, Tensor>> {
  const session = await Session.load(bytes, { optimization: 'none', ...options });
  let got: Record<string, Tensor>;
  try {
    got = await session.run(feeds);
  } finally {
    session.dispose();
  }
  const want = await ortRun(bytes, feeds);
  expect(Object.keys(got).sort(), label).toEqual(Object.keys(want).sort());
  for (const [name, w] of Object.entries(want)) {
    const g = got[name]!;
    expect([...g.dims], `${label} ${name} dims`).toEqual([...w.dims]);
    const gd = g.data as ArrayLike<number | bigint>;
    expect(gd.length).toBe(w.data.length);
    for (let i = 0; i < gd.length; i++) {
      const a = Number(gd[i]);
      const b = Number(w.data[i]);
      if (Number.isNaN(b)) { expect(Number.isNaN(a), `${label} ${name}[${i}]`).toBe(true); continue; }
      const err = Math.abs(a - b);
      if (!(err <= atol + rtol * Math.abs(b))) {
        throw new Error(`${label} ${name}[${i}]: sonde ${a}, onnxruntime-node ${b} (|err| ${err.toExponential(3)} > ${(atol + rtol * Math.abs(b)).toExponential(3)})`);
      }
    }
  }
  return got;
}

/** Deterministic uniform values in [lo, hi). */
export function uniform(dims: number[], seed = 1, lo = -1, hi = 1): Tensor<'float32'> {
  let s = seed >>> 0 || 1;
  const n = dims.reduce((a, b) => a * b, 1);
  const d = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    d[i] = lo + (hi - lo) * (s / 2 ** 32);
  }
  return new Tensor('float32', d, dims);
}
