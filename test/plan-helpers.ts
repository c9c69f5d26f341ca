// What the tests of plan passes share: scaled random conv weights, and a session run (with its
// profile) under environment switches that are read when the session loads and builds its plan.
import { Session, type Tensor } from '../dist/index.js';
import type { SessionOptions } from '../dist/index.js';
import { uniform } from './session-ort.js';

/** Weights ~ U(-1, 1) / sqrt(fan-in), so activations stay O(1) through a chain of convs. */
export function convWeights(dims: number[], seed: number): { dtype: 'float32'; dims: number[]; data: Float32Array } {
  const t = uniform(dims, seed);
  const s = 1 / Math.sqrt(dims.slice(1).reduce((a, b) => a * b, 1));
  return { dtype: 'float32', dims, data: (t.data as Float32Array).map((v) => v * s) };
}

/** Loads `bytes` on the CPU (1 thread unless options say), runs `feeds` once and profiles one run, with `env` set meanwhile. */
export async function runWithEnv(bytes: Uint8Array, feeds: Record<string, Tensor>, env: Record<string, string>, options: SessionOptions = {}) {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  Object.assign(process.env, env);
  try {
    const s = await Session.load(bytes, { device: 'cpu', threads: 1, ...options });
    try {
      const out = await s.run(feeds);
      const prof = await s.profile(feeds, { runs: 1 });
      return { out, prof };
    } finally {
      s.dispose();
    }
  } finally {
    for (const [k, v] of Object.entries(saved)) { if (v === undefined) delete process.env[k]; else process.env[k] = v; }
  }
}
