// Shared by the A/B scripts (model-ab.js, bf16-ab.js, bf16-blocked-ab.js, models-direct.js): timing
// several callables interleaved run by run, and loading a session under environment switches.

/** Every order of 0 .. n-1 (n! of them). */
export function permutations(n) {
  if (n <= 1) return [[0].slice(0, n)];
  return permutations(n - 1).flatMap((p) => Array.from({ length: n }, (_, at) => [...p.slice(0, at), n - 1, ...p.slice(at)]));
}

/**
 * Runs fns interleaved (one warm-up call each first) for at least `seconds` and `minRounds`, in
 * whole cycles through every order of them: a run right after another pool's pays for that pool's
 * threads still spinning on the two vCPUs, and a fixed order put that cost on one side (two
 * identical builds read 1.3x apart at 2 threads with the order only reversed each round).
 * Returns each fn's times (ms).
 */
export async function interleave(fns, { seconds = 12, minRounds = 12, maxRounds = 2000 } = {}) {
  for (const f of fns) await f();
  const orders = permutations(fns.length);
  const times = fns.map(() => []);
  const start = performance.now();
  for (let r = 0; r < maxRounds && (r < minRounds || r % orders.length !== 0 || performance.now() - start < seconds * 1000); r++) {
    for (const i of orders[r % orders.length]) {
      const t0 = performance.now();
      await fns[i]();
      times[i].push(performance.now() - t0);
    }
  }
  return times;
}

export const median = (t) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)];

/** load() with the environment switches set (native code reads them at load or first run), then unset. */
export async function withEnv(env, load) {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  Object.assign(process.env, env);
  try {
    return await load();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}
