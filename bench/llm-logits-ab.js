// node bench/llm-logits-ab.js [vocab=128000] [tokens=200] [rounds=8]
// What reusing one logits array across decode steps buys (KvPool.stepInto, which the continuous
// batching scheduler uses): greedy decode through the Scheduler on a one-layer qwen2 model whose
// vocabulary is padded to `vocab` (the logits row then dominates what a step allocates), with the
// pool as it is against the same pool without stepInto (a fresh rows x vocab array per step), in
// interleaved rounds. Prints the median microseconds per token of each and their ratio.
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as gguf from '../dist/llm/gguf.js';
import { Scheduler } from '../dist/llm/kv/scheduler.js';
import { loadTransformer } from '../dist/llm/transformer.js';
import { llmModelSpec } from './llm/models.js';

const count = (i, dflt) => {
  const v = Number(process.argv[i] ?? dflt);
  if (!Number.isInteger(v) || v < 1) {
    console.error(`llm-logits-ab: argument ${i - 1} must be a whole number >= 1, got '${process.argv[i]}'`);
    process.exit(2);
  }
  return v;
};
const vocab = count(2, 128000), tokens = count(3, 200), rounds = count(4, 8);
const dir = join(fileURLToPath(new URL('.', import.meta.url)), '.cache');
mkdirSync(dir, { recursive: true });
const path = join(dir, `logits-ab-${vocab}.gguf`);
if (!existsSync(path)) {
  const { spec } = llmModelSpec({ kind: 'qwen2', type: 'f32', embedding: 64, heads: 4, kvHeads: 2, feedForward: 128, layers: 1,
    contextLength: 4096, seed: 3, extraSpecialTokens: Array.from({ length: vocab }, (_, i) => `<|pad${i}|>`) }, gguf.typed);
  await gguf.write(path, spec);
}
const engine = await loadTransformer(path, { threads: 1 });
const V = engine.config.vocabSize;
const pool = engine.createKvPool({ blockSize: 16, maxBlocks: Math.ceil((tokens + 16) / 16) + 1 });
// The same pool without stepInto: the scheduler then takes a new logits array from step(). Methods
// are bound to the pool (its private fields need the real `this`).
const fresh = new Proxy(pool, {
  get: (p, key) => (key === 'stepInto' ? undefined : typeof p[key] === 'function' ? p[key].bind(p) : p[key]),
});
const argmax = (l) => { let b = 0; for (let i = 1; i < l.length; i++) if (l[i] > l[b]) b = i; return b; };
async function decode(p) {
  const sched = new Scheduler(p, { contextSize: 4096, vocabSize: V, prefixCaching: false });
  const t0 = performance.now();
  let n = 0;
  await sched.submit({ tokens: [1, 2, 3], logits: 'last', onLogits: (l) => (++n < tokens ? argmax(l) : undefined) });
  const us = (performance.now() - t0) / n * 1000;
  sched.dispose();
  return us;
}
await decode(pool);
await decode(fresh);
const reused = [], each = [];
for (let r = 0; r < rounds; r++) {
  for (const [p, out] of r % 2 ? [[fresh, each], [pool, reused]] : [[pool, reused], [fresh, each]]) out.push(await decode(p));
}
const med = (v) => v.slice().sort((a, b) => a - b)[v.length >> 1];
console.log(`vocab ${V}, ${tokens} tokens x ${rounds} rounds: reused logits ${med(reused).toFixed(1)} us/token, a new array per step ${med(each).toFixed(1)} us/token, reused/new ${(med(reused) / med(each)).toFixed(3)}`);
pool.dispose();
engine.dispose();
