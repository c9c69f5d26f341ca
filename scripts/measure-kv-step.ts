/**
 * Decode of 8 sequences in one KvPool step vs the same 8 tokens as 8 single-sequence steps, on a
 * generated dense llama (hidden 512, 8 layers, Q8_0), interleaved round by round so that the load
 * of a shared machine hits both alike. Prints tokens/s of each and their ratio.
 *
 *   npx vitest run --config scripts/measure-kv-step.config.ts
 */
import { join } from 'node:path';
import { it } from 'vitest';
import { loadTransformer } from '../lib/llm/transformer.js';
import { fixtureDir, writeFixture } from '../test/llm-fixtures.js';

it('kv step: 8 sequences batched vs 8 single steps', async () => {
  const kind = (process.env.KIND ?? 'llama') as 'llama' | 'mixtral';
  const info = await writeFixture(join(fixtureDir('sonde-kv-measure-'), 'm.gguf'), {
    kind, type: (process.env.TYPE ?? 'q8_0') as 'q8_0', embedding: 512, layers: 8, heads: 8, kvHeads: 4, feedForward: 1408,
    experts: 8, expertsUsed: 2, expertFeedForward: 704, contextLength: 1024, seed: 3,
  });
  const threads = Number(process.env.THREADS ?? 2);
  const engine = await loadTransformer(info.path, { threads });
  const pool = engine.createKvPool({ blockSize: 16, maxBlocks: 8 * 8 });
  const S = 8, prompt = 64;
  const tables = Array.from({ length: S }, (_, s) => Int32Array.from({ length: 8 }, (_, i) => s * 8 + i));
  const lengths = new Array<number>(S).fill(prompt);
  await pool.step({
    sequences: tables.map((t, s) => ({ blockTable: t, start: 0, tokens: Int32Array.from({ length: prompt }, (_, i) => (i * 7 + s) % info.vocabSize), logits: 'none' as const })),
  });
  const rounds = Number(process.env.ROUNDS ?? 12);
  let batchedMs = 0, singleMs = 0;
  for (let r = 0; r < rounds; r++) {
    // Each round writes one position per sequence in each mode; both modes overwrite the same
    // positions (the logits are not used), so the context length stays fixed across rounds.
    const tok = (s: number) => Int32Array.of((r * 13 + s) % info.vocabSize);
    let t = performance.now();
    await pool.step({ sequences: tables.map((bt, s) => ({ blockTable: bt, start: lengths[s]!, tokens: tok(s), logits: 'last' as const })) });
    batchedMs += performance.now() - t;
    t = performance.now();
    for (let s = 0; s < S; s++) {
      await pool.step({ sequences: [{ blockTable: tables[s]!, start: lengths[s]!, tokens: tok(s), logits: 'last' }] });
    }
    singleMs += performance.now() - t;
  }
  const batched = (rounds * S) / (batchedMs / 1000), single = (rounds * S) / (singleMs / 1000);
  console.log(`${kind} hidden 512 x 8 layers ${process.env.TYPE ?? 'q8_0'}, ${threads} threads: 8 in one step ${batched.toFixed(1)} tok/s, 8 single steps ${single.toFixed(1)} tok/s, ratio ${(batched / single).toFixed(2)}`);
  engine.dispose();
}, 600_000);
