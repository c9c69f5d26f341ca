/**
 * q8_0 weights repacked at load for the avx512vnni kernels (native/kernels/quant/quant.h: the
 * q8_0x32 layout) against the same file run in the GGUF row layout (SONDE_Q8_REPACK=0, read when
 * the model loads). Both layouts' kernels take each block's exact int32 sum and the same fp32
 * scale-and-FMA chain over the blocks, so every logit must be the same bits: on a prefill (the
 * row layout's blocked GEMM), token-by-token decode (its 16-row kernel), steps of several decode
 * rows (M = 2..7, both of its kernels), for dense, Mixtral-layout and qwen2moe (shared expert)
 * models, with a vocabulary that is not a multiple of 32 rows (a padded last group) and tied
 * embeddings (the output product repacked, the embedding lookup on the file's rows).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { native, type NativeLlmModel } from '../lib/binding.js';
import type { LlmEngine } from '../lib/llm/engine.js';
import { read } from '../lib/llm/gguf.js';
import { loadTransformer, transformerFromFile } from '../lib/llm/transformer.js';
import { reportedExternalMemory } from '../lib/runtime.js';
import { fixtureDir, rng, writeFixture, type FixtureOptions } from './llm-fixtures.js';

const dir = fixtureDir('sonde-llm-q8-repack-');
const cpu = native().cpuInfo();
const hasVnni = cpu.simd === 'avx512' && cpu.features.includes('avx512vnni');

async function load(path: string, repack: boolean): Promise<LlmEngine> {
  if (!repack) process.env.SONDE_Q8_REPACK = '0';
  try {
    return await loadTransformer(path, { threads: 2 });
  } finally {
    delete process.env.SONDE_Q8_REPACK;
  }
}

function tokens(n: number, vocab: number, seed: number): Int32Array {
  const r = rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(r() * vocab));
}

/** Every logit the three evaluation paths give, in one array per path. */
async function run(engine: LlmEngine, toks: Int32Array): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  const prefill = engine.createSequence(64);
  out.push((await prefill.eval(Array.from(toks), { allLogits: true })).slice());
  prefill.dispose();
  const decode = engine.createSequence(64);
  for (const t of toks.subarray(0, 12)) out.push((await decode.eval([t])).slice());
  decode.dispose();
  // Steps of 2..7 sequences: a prompt each, then decode rows side by side (M = the sequences).
  const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 64 });
  try {
    for (let seqs = 2; seqs <= 7; seqs++) {
      const sequences = Array.from({ length: seqs }, (_, s) => ({
        blockTable: Int32Array.from([2 * s, 2 * s + 1]), start: 0, tokens: toks.subarray(s, s + 5), logits: 'last' as const,
      }));
      out.push((await pool.step({ sequences })).slice());
      for (let i = 0; i < 3; i++) {
        out.push((await pool.step({
          sequences: sequences.map((q, s) => ({ ...q, start: 5 + i, tokens: toks.subarray(20 + s + i, 21 + s + i) })),
        })).slice());
      }
    }
  } finally {
    pool.dispose();
  }
  return out;
}

describe.skipIf(!hasVnni)('q8_0 repacked at load gives the row layout\'s logits bit for bit', () => {
  const cases: [string, FixtureOptions][] = [
    ['llama, tied embeddings, vocabulary not a multiple of 32', { kind: 'llama', type: 'q8_0', tied: true, seed: 41 }],
    ['mixtral, expert rows of 96 (3 groups)', { kind: 'mixtral', type: 'q8_0', expertFeedForward: 96, seed: 42 }],
    ['qwen2moe (shared expert, q/k/v bias)', { kind: 'qwen2moe', type: 'q8_0', seed: 43 }],
  ];
  it.each(cases)('%s', async (name, o) => {
    const info = await writeFixture(join(dir, `${o.kind}.gguf`), o);
    const toks = tokens(40, info.vocabSize, 44);
    const rows = await load(info.path, false);
    const packed = await load(info.path, true);
    try {
      const want = await run(rows, toks);
      const got = await run(packed, toks);
      expect(got.length).toBe(want.length);
      for (let i = 0; i < want.length; i++) {
        const a = new Uint32Array(got[i]!.buffer), b = new Uint32Array(want[i]!.buffer);
        let diff = -1;
        for (let j = 0; j < b.length && diff < 0; j++) if (a[j] !== b[j]) diff = j;
        if (diff >= 0) expect.fail(`${name}: output ${i}, logit ${diff}: ${got[i]![diff]} vs ${want[i]![diff]}`);
      }
      // The repacked copy is the model's own memory now (whole groups of 32 rows, in 2 MiB pages).
      const bytes = (e: LlmEngine) => (e as unknown as { nativeModel(w: string): NativeLlmModel }).nativeModel('test').info().bytes!;
      expect(bytes(packed)).toBeGreaterThan(bytes(rows));
    } finally {
      rows.dispose();
      packed.dispose();
    }
  }, 60_000);

  it('a transformer built synchronously repacks in its first step, reports the copy to V8 at the next, and gives the same logits', async () => {
    const info = await writeFixture(join(dir, 'lazy.gguf'), { kind: 'mixtral', type: 'q8_0', seed: 45 });
    const toks = Array.from(tokens(9, info.vocabSize, 46));
    const prepared = await load(info.path, true);
    const file = await read(info.path);
    const lazy = transformerFromFile(file, { threads: 2 });
    try {
      const bytes = (e: LlmEngine) => (e as unknown as { nativeModel(w: string): NativeLlmModel }).nativeModel('test').info().bytes!;
      const before = bytes(lazy);
      const seq = lazy.createSequence(16);
      const want = prepared.createSequence(16);
      const first = await seq.eval(toks.slice(0, 8), { allLogits: true });
      expect(bytes(lazy)).toBe(bytes(prepared));
      expect(bytes(lazy)).toBeGreaterThan(before);
      const reported = reportedExternalMemory();
      const next = await seq.eval(toks.slice(8));
      // The step that found the model grown reported the difference, beside the KV pool's step
      // arena grown in the first step (tens of KiB here).
      const delta = reportedExternalMemory() - reported;
      expect(delta).toBeGreaterThanOrEqual(bytes(lazy) - before);
      expect(delta).toBeLessThan(bytes(lazy) - before + (256 << 10));
      expect(first).toEqual(await want.eval(toks.slice(0, 8), { allLogits: true }));
      expect(next).toEqual(await want.eval(toks.slice(8)));
      seq.dispose();
      want.dispose();
    } finally {
      lazy.dispose();
      file.dispose();
      prepared.dispose();
    }
  }, 60_000);
});
