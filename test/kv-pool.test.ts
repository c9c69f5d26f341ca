/**
 * The paged KV pool and its batched step (lib/llm/engine.ts: KvPool; native/ops/kv_pool.*, RunStep
 * in native/ops/llm.cc). The reference for a step is each of its sequences evaluated alone, all its
 * tokens in one step of a fresh pool with the same block size; createSequence (whose logits
 * llm-forward.test.ts checks against llama.cpp) is the reference where the weights are f32.
 *
 * Tolerance of batched vs alone: with the same block size attention folds the same spans in the
 * same order, so a row's arithmetic differs only where a product over M rows runs another kernel
 * tile than over the reference's M: another fp32 summation order for f32/f16 weights (a few ulps
 * per product), none for block-quantised weights (exact int32 sums per block, then the same fp32
 * scaling per row). That is far below the 1e-4 * (1 + |logit|) used here (llm-forward's "evaluation
 * paths agree" bound). Against createSequence (one block of the whole context) the attention spans
 * differ too; that comparison uses f32 weights only: with int8 activations an ulp of difference
 * can flip the rounding of an activation (a step of amax / 127) or, in MoE layers, the choice of an
 * expert, which no small tolerance covers.
 * Block tables that differ only in which ids they name run identical arithmetic: exact equality.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { native } from '../lib/binding.js';
import { AbortError, DisposedError, InvalidArgumentError } from '../lib/errors.js';
import type { KvPool, LlmEngine, StepSequence } from '../lib/llm/engine.js';
import { loadTransformer } from '../lib/llm/transformer.js';
import { reportedExternalMemory } from '../lib/runtime.js';
import { describeChains } from './llm-chain-cases.js';
import { fixtureDir, logSoftmax, rng, writeFixture, type FixtureInfo, type FixtureOptions } from './llm-fixtures.js';

const dir = fixtureDir('sonde-kv-pool-');

async function fixture(name: string, o: FixtureOptions): Promise<FixtureInfo> {
  return writeFixture(join(dir, `${name}.gguf`), o);
}

function tokens(n: number, vocab: number, seed: number): Int32Array {
  const r = rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(r() * vocab));
}

function ids(...values: number[]): Int32Array {
  return Int32Array.from(values);
}

/**
 * Logits of every position of `toks` evaluated alone from an empty cache: in one step of a fresh
 * pool of `blockSize` (contiguous table), or without it through createSequence.
 */
async function alone(engine: LlmEngine, toks: Int32Array, blockSize?: number): Promise<Float32Array[]> {
  const v = engine.config.vocabSize;
  const split = (all: Float32Array) => Array.from(toks, (_, i) => all.subarray(i * v, (i + 1) * v));
  if (blockSize !== undefined) {
    const blocks = Math.ceil(toks.length / blockSize);
    const pool = engine.createKvPool({ blockSize, maxBlocks: blocks });
    try {
      const blockTable = Int32Array.from({ length: blocks }, (_, i) => i);
      return split(await pool.step({ sequences: [{ blockTable, start: 0, tokens: toks, logits: 'all' }] }));
    } finally {
      pool.dispose();
    }
  }
  const seq = engine.createSequence(toks.length);
  try {
    return split(await seq.eval(toks, { allLogits: true }));
  } finally {
    seq.dispose();
  }
}

function expectClose(got: Float32Array, want: Float32Array, what: string): void {
  expect(got.length).toBe(want.length);
  for (let t = 0; t < want.length; t++) {
    if (!(Math.abs(got[t]! - want[t]!) <= 1e-4 * (1 + Math.abs(want[t]!)))) expect.fail(`${what}: logit ${t}: ${got[t]} vs ${want[t]}`);
  }
}

function row(logits: Float32Array, r: number, vocab: number): Float32Array {
  return logits.subarray(r * vocab, (r + 1) * vocab);
}

describe('a step of several sequences equals each sequence alone', () => {
  it.each([['llama', 'f32'], ['qwen2', 'q8_0'], ['mixtral', 'q4_0'], ['qwen2moe', 'f16']] as const)('%s %s: mixed prefill and decode rows, none / last / all', async (kind, type) => {
    const info = await fixture(`mixed-${kind}-${type}`, { kind, type, seed: 31 });
    const engine = await loadTransformer(info.path, { threads: 2 });
    const V = info.vocabSize;
    try {
      const pool = engine.createKvPool({ blockSize: 16, maxBlocks: 32 });
      // Full token streams of four sequences; A and B get a first part in an earlier step.
      const a = tokens(21, V, 1), b = tokens(40, V, 2), c = tokens(33, V, 3), d = tokens(2, V, 4);
      const tables = { a: ids(0, 1), b: ids(2, 3, 4), c: ids(5, 6, 7), d: ids(8) };
      const first = await pool.step({
        sequences: [
          { blockTable: tables.a, start: 0, tokens: a.subarray(0, 20), logits: 'none' },
          { blockTable: tables.b, start: 0, tokens: b.subarray(0, 17), logits: 'last' },
        ],
      });
      expect(first.length).toBe(V);
      // A decodes one token (after 20), B prefills 23 more across a block edge, C prefills from
      // scratch, D prefills 2 and asks for nothing.
      const out = await pool.step({
        sequences: [
          { blockTable: tables.a, start: 20, tokens: a.subarray(20), logits: 'last' },
          { blockTable: tables.b, start: 17, tokens: b.subarray(17), logits: 'all' },
          { blockTable: tables.c, start: 0, tokens: c, logits: 'last' },
          { blockTable: tables.d, start: 0, tokens: d, logits: 'none' },
        ],
      });
      expect(out.length).toBe((1 + 23 + 1) * V);
      const [ra, rb, rc, rd] = await Promise.all([alone(engine, a, 16), alone(engine, b, 16), alone(engine, c, 16), alone(engine, d, 16)]);
      expectClose(row(first, 0, V), rb[16]!, 'B first step');
      expectClose(row(out, 0, V), ra[20]!, 'A decode');
      for (let i = 0; i < 23; i++) expectClose(row(out, 1 + i, V), rb[17 + i]!, `B row ${17 + i}`);
      expectClose(row(out, 24, V), rc[32]!, 'C last');
      // D's K/V were written although no logits came back: its next token sees them.
      const dn = tokens(3, V, 5);
      const next = await pool.step({ sequences: [{ blockTable: tables.d, start: 2, tokens: dn, logits: 'all' }] });
      const rd2 = await alone(engine, Int32Array.from([...d, ...dn]), 16);
      for (let i = 0; i < 3; i++) expectClose(row(next, i, V), rd2[2 + i]!, `D row ${2 + i}`);
      expect(rd.length).toBe(2);
      if (info.experts) {
        // Every token of every step went to k experts in each layer.
        const counts = pool.expertCounts()!;
        const total = 20 + 17 + 1 + 23 + 33 + 2 + 3;
        for (let l = 0; l < info.layers; l++) {
          let sum = 0;
          for (let e = 0; e < info.experts; e++) sum += counts[l * info.experts + e]!;
          expect(sum).toBe(total * info.expertsUsed);
        }
      } else {
        expect(pool.expertCounts()).toBeUndefined();
      }
    } finally {
      engine.dispose();
    }
  }, 60_000);

  it('8 sequences decoding together equal 8 single steps', async () => {
    const info = await fixture('eight', { kind: 'llama', type: 'q8_0', seed: 41 });
    const engine = await loadTransformer(info.path, { threads: 2 });
    const V = info.vocabSize;
    try {
      const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 64 });
      const prompts = Array.from({ length: 8 }, (_, s) => tokens(3 + 2 * s, V, 100 + s));
      const tables = prompts.map((_, s) => ids(4 * s, 4 * s + 1, 4 * s + 2, 4 * s + 3));
      await pool.step({ sequences: prompts.map((p, s) => ({ blockTable: tables[s]!, start: 0, tokens: p, logits: 'none' as const })) });
      const next = prompts.map((_, s) => (7 * s + 3) % V);
      const batched = await pool.step({
        sequences: prompts.map((p, s) => ({ blockTable: tables[s]!, start: p.length, tokens: ids(next[s]!), logits: 'last' as const })),
      });
      for (let s = 0; s < 8; s++) {
        const want = await alone(engine, Int32Array.from([...prompts[s]!, next[s]!]), 8);
        expectClose(row(batched, s, V), want[prompts[s]!.length]!, `sequence ${s}`);
      }
    } finally {
      engine.dispose();
    }
  }, 60_000);
});

describe('block tables', () => {
  let engine: LlmEngine;
  let info: FixtureInfo;
  beforeAll(async () => {
    info = await fixture('tables', { kind: 'qwen2', type: 'f32', seed: 51 });
    engine = await loadTransformer(info.path, { threads: 2 });
  });
  afterAll(() => engine?.dispose());

  it('scattered and reversed tables equal a contiguous one, bit for bit', async () => {
    const V = info.vocabSize;
    const toks = tokens(45, V, 52);
    const run = async (table: Int32Array) => {
      const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 24 });
      try {
        const pre = await pool.step({ sequences: [{ blockTable: table, start: 0, tokens: toks.subarray(0, 30), logits: 'all' }] });
        const post = await pool.step({ sequences: [{ blockTable: table, start: 30, tokens: toks.subarray(30), logits: 'all' }] });
        return [...pre, ...post];
      } finally {
        pool.dispose();
      }
    };
    const contiguous = await run(ids(0, 1, 2, 3, 4, 5));
    expect(await run(ids(5, 4, 3, 2, 1, 0))).toEqual(contiguous);
    expect(await run(ids(17, 3, 22, 9, 0, 11, 6))).toEqual(contiguous);
    const want = await alone(engine, toks);
    for (let i = 0; i < toks.length; i++) expectClose(Float32Array.from(contiguous.slice(i * V, (i + 1) * V)), want[i]!, `position ${i}`);
  });

  it('stepInto writes the logits into the given array (a view of its first rows), the same bits as step', async () => {
    const V = info.vocabSize;
    const toks = tokens(20, V, 57);
    const run = async (into?: Float32Array) => {
      const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 8 });
      try {
        const out: number[][] = [];
        const seq = (start: number, n: number, logits: StepSequence['logits']) => ({ sequences: [{ blockTable: ids(0, 1, 2), start, tokens: toks.subarray(start, start + n), logits }] });
        for (const [start, n, logits] of [[0, 12, 'all'], [12, 1, 'last'], [13, 1, 'last'], [14, 6, 'none']] as const) {
          const got = into ? await pool.stepInto!(seq(start, n, logits), into) : await pool.step(seq(start, n, logits));
          if (into && got.length <= into.length) expect(got.buffer, 'a view of the given array').toBe(into.buffer);
          out.push(Array.from(got));
        }
        return out;
      } finally {
        pool.dispose();
      }
    };
    const fresh = await run();
    expect(fresh[0]!.length).toBe(12 * V);
    // Room for 4 rows: the 12-row step gets an array of its own, the 1-row steps the view.
    const into = new Float32Array(4 * V).fill(Number.NaN);
    expect(await run(into)).toEqual(fresh);
    expect(Array.from(into.subarray(0, V))).toEqual(fresh[2]);  // the last step with logits wrote its row there
    const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 8 });
    try {
      await expect(pool.stepInto!({ sequences: [{ blockTable: ids(0), start: 0, tokens: toks.subarray(0, 1), logits: 'last' }] },
        [1, 2] as unknown as Float32Array)).rejects.toThrow(/KvPool.stepInto: into must be a Float32Array/);
    } finally {
      pool.dispose();
    }
  });

  it('two sequences read a shared prefix block in one step; a copied partial block continues a third', async () => {
    const V = info.vocabSize;
    const prefix = tokens(20, V, 53);
    const pool = engine.createKvPool({ blockSize: 16, maxBlocks: 16 });
    try {
      // Prefix: block 0 full (positions 0-15), block 1 holds 16-19.
      await pool.step({ sequences: [{ blockTable: ids(0, 1), start: 0, tokens: prefix, logits: 'none' }] });
      // X and Y share block 0 only and rewrite positions 16.. in their own blocks (recomputing the
      // tail of the prefix); Z shares block 0 and a copy of block 1 (copy-on-write), continuing at 20.
      const tailX = tokens(6, V, 54), tailY = tokens(3, V, 55), tailZ = tokens(5, V, 56);
      const out = await pool.step({
        copies: ids(1, 9),
        sequences: [
          { blockTable: ids(0, 2), start: 16, tokens: Int32Array.from([...prefix.subarray(16), ...tailX]), logits: 'last' },
          { blockTable: ids(0, 3), start: 16, tokens: Int32Array.from([...prefix.subarray(16), ...tailY]), logits: 'last' },
          { blockTable: ids(0, 9), start: 20, tokens: tailZ, logits: 'all' },
        ],
      });
      const want = async (tail: Int32Array) => alone(engine, Int32Array.from([...prefix, ...tail]));
      expectClose(row(out, 0, V), (await want(tailX))[25]!, 'X');
      expectClose(row(out, 1, V), (await want(tailY))[22]!, 'Y');
      const z = await want(tailZ);
      for (let i = 0; i < 5; i++) expectClose(row(out, 2 + i, V), z[20 + i]!, `Z ${i}`);
      // The copy's source was untouched by Z's writes: block 1 still continues the prefix alone.
      const again = await pool.step({ copies: ids(1, 10), sequences: [{ blockTable: ids(0, 10), start: 20, tokens: tailX, logits: 'last' }] });
      expectClose(again, (await want(tailX))[25]!, 'block 1 after Z');
    } finally {
      pool.dispose();
    }
  });

  it('copies duplicate blocks exactly (readBlocks of source and destination)', async () => {
    const pool = engine.createKvPool({ blockSize: 4, maxBlocks: 8 });
    try {
      await pool.step({ sequences: [{ blockTable: ids(0, 1, 2), start: 0, tokens: tokens(10, info.vocabSize, 57), logits: 'none' }] });
      await pool.step({ copies: ids(0, 5, 2, 6), sequences: [] });
      const [src, dst] = await Promise.all([pool.readBlocks(ids(0, 2)), pool.readBlocks(ids(5, 6))]);
      expect(src.length).toBe(2 * pool.blockBytes);
      expect(dst).toEqual(src);
      // Something was written (not two zero blocks compared).
      expect(src.some((x) => x !== 0)).toBe(true);
    } finally {
      pool.dispose();
    }
  });

  it('readBlocks / writeBlocks round trip: written blocks continue the sequence as the originals do', async () => {
    const V = info.vocabSize;
    const toks = tokens(24, V, 58);
    const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 16 });
    try {
      await pool.step({ sequences: [{ blockTable: ids(0, 1, 2), start: 0, tokens: toks.subarray(0, 20), logits: 'none' }] });
      const bytes = await pool.readBlocks(ids(0, 1, 2));
      expect(bytes.length).toBe(3 * pool.blockBytes);
      // Another pool of the same model and options: a restored state.
      const other = engine.createKvPool({ blockSize: 8, maxBlocks: 16 });
      await other.writeBlocks(ids(7, 3, 12), bytes);
      expect(await other.readBlocks(ids(7, 3, 12))).toEqual(bytes);
      const a = await pool.step({ sequences: [{ blockTable: ids(0, 1, 2), start: 20, tokens: toks.subarray(20), logits: 'all' }] });
      const b = await other.step({ sequences: [{ blockTable: ids(7, 3, 12), start: 20, tokens: toks.subarray(20), logits: 'all' }] });
      expect(b).toEqual(a);
      await expect(other.writeBlocks(ids(1), new Uint8Array(pool.blockBytes - 1))).rejects.toThrow(/1 blocks of \d+ bytes/);
      await expect(other.writeBlocks(ids(1, 1), new Uint8Array(2 * pool.blockBytes))).rejects.toThrow(/ids\[1\] repeats block 1/);
      await expect(other.readBlocks(ids(16))).rejects.toThrow(/ids\[0\] = 16 is outside \[0, 16\)/);
      other.dispose();
    } finally {
      pool.dispose();
    }
  });
});

describe('fp16 storage', () => {
  /** IEEE half bits to a number (exact). */
  function half(h: number): number {
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e === 0) return s * m * 2 ** -24;
    if (e === 31) return m ? NaN : s * Infinity;
    return s * (1 + m / 1024) * 2 ** (e - 15);
  }

  /** Attention in float64 from the decoded halves: the reference of every kernel. */
  function reference(q: Float32Array, k: ArrayLike<number>, v: ArrayLike<number>, hd: number, n: number): Float64Array {
    const s = new Float64Array(n);
    let max = -Infinity;
    for (let t = 0; t < n; t++) {
      let dot = 0;
      for (let j = 0; j < hd; j++) dot += q[j]! * k[t * hd + j]!;
      s[t] = dot / Math.sqrt(hd);
      max = Math.max(max, s[t]!);
    }
    const out = new Float64Array(hd);
    let sum = 0;
    for (let t = 0; t < n; t++) {
      const p = Math.exp(s[t]! - max);
      sum += p;
      for (let j = 0; j < hd; j++) out[j] = out[j]! + p * v[t * hd + j]!;
    }
    return out.map((x) => x / sum);
  }

  it('the f16 and f32 span kernels of every ISA match a float64 reference on tile-edge shapes', async () => {
    const r = rng(61);
    // Random halves in [2^-6, 4): sign, exponent 9..16, random mantissa.
    const randomHalf = () => (r() < 0.5 ? 0x8000 : 0) | ((9 + Math.floor(r() * 8)) << 10) | Math.floor(r() * 1024);
    let ran = 0;
    for (const hd of [1, 7, 8, 15, 16, 17, 24, 64, 130]) {
      for (const n of [1, 63, 64, 65, 130]) {
        const q = Float32Array.from({ length: hd }, () => r() * 2 - 1);
        const k16 = Uint16Array.from({ length: n * hd }, randomHalf), v16 = Uint16Array.from({ length: n * hd }, randomHalf);
        const k32 = Float32Array.from(k16, half), v32 = Float32Array.from(v16, half);
        const want = reference(q, k32, v32, hd, n);
        let vmax = 0;
        for (const x of v32) vmax = Math.max(vmax, Math.abs(x));
        // fp32 arithmetic vs float64: the scores carry up to hd * u * sum|q k| / sqrt(hd) <=
        // hd * u * 4 sqrt(hd) absolute error (|q| <= 1, |k| < 4), which moves each weight p by that
        // factor relative; the fold adds about n + hd roundings of u each. The output is a convex
        // combination of v rows: |err| <= (2 * 4 hd sqrt(hd) + 2 (n + hd)) u max|v|.
        const u = 2 ** -24;
        const tol = (8 * hd * Math.sqrt(hd) + 2 * (n + hd)) * u * vmax;
        for (const variant of ['scalar', 'avx2', 'avx512'] as const) {
          for (const span of new Set([n, 7, 16])) {
            if (span > n) continue;
            for (const dtype of ['f16', 'f32'] as const) {
              let got: Float32Array;
              try {
                got = dtype === 'f16'
                  ? await native().kvAttention(q, k16, v16, hd, n, span, 'f16', variant)
                  : await native().kvAttention(q, k32, v32, hd, n, span, 'f32', variant);
              } catch (err) {
                expect(err).toMatchObject({ code: 'ERR_SONDE_DEVICE_UNAVAILABLE' });
                continue;
              }
              ran++;
              for (let j = 0; j < hd; j++) {
                if (!(Math.abs(got[j]! - want[j]!) <= tol)) expect.fail(`${variant} ${dtype} hd ${hd} n ${n} span ${span}: out[${j}] ${got[j]} vs ${want[j]} (tol ${tol})`);
              }
            }
          }
        }
      }
    }
    expect(ran).toBeGreaterThan(0);
  });

  it('K and V are rounded to the nearest half when written (layer 0, whose inputs the f32 pool shares)', async () => {
    const info = await fixture('f16-round', { kind: 'qwen2', type: 'f32', seed: 64 });
    const engine = await loadTransformer(info.path, { threads: 2 });
    try {
      const toks = tokens(11, info.vocabSize, 65);
      const read = async (dtype: 'f32' | 'f16') => {
        const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 2, dtype });
        await pool.step({ sequences: [{ blockTable: ids(1, 0), start: 0, tokens: toks, logits: 'none' }] });
        const bytes = await pool.readBlocks(ids(1, 0));
        pool.dispose();
        return bytes;
      };
      const f32 = await read('f32'), f16 = await read('f16');
      const wide = new Float32Array(f32.buffer, f32.byteOffset, f32.length / 4);
      const narrow = new Uint16Array(f16.buffer, f16.byteOffset, f16.length / 2);
      // Per block: [layer][K, V][kv_head][position][head_dim]; layer 0 is the first 2 * kvHeads *
      // 8 * headDim elements, all positions of the block written (11 tokens over blocks 1 and 0).
      const perBlock = wide.length / 2, layer0 = 2 * info.kvHeads * 8 * info.headDim;
      let checked = 0;
      for (let b = 0; b < 2; b++) {
        for (let e = 0; e < layer0; e++) {
          const pos = b * 8 + Math.floor(e / info.headDim) % 8;
          if (pos >= toks.length) continue;
          const x = wide[b * perBlock + e]!, h = narrow[b * perBlock + e]!;
          const err = Math.abs(half(h) - x);
          // Nearest: neither neighbouring half is closer.
          for (const n of [h - 1, h + 1]) {
            if ((n & 0x7fff) < 0x7c00 && (n >> 15) === (h >> 15) && Math.abs(half(n) - x) < err) {
              expect.fail(`block ${b} element ${e}: ${x} stored as ${half(h)}, ${half(n)} is nearer`);
            }
          }
          if (x !== 0) checked++;
        }
      }
      expect(checked).toBeGreaterThan(layer0);
    } finally {
      engine.dispose();
    }
  });

  it('an f16 pool gives the f32 pool\'s log-probabilities within the rounding of K and V', async () => {
    const info = await fixture('f16', { kind: 'llama', type: 'f32', seed: 62 });
    const engine = await loadTransformer(info.path, { threads: 2 });
    const V = info.vocabSize;
    try {
      const toks = tokens(50, V, 63);
      const run = async (dtype: 'f32' | 'f16') => {
        const pool = engine.createKvPool({ blockSize: 16, maxBlocks: 4, dtype });
        expect(pool.dtype).toBe(dtype);
        const a = await pool.step({ sequences: [{ blockTable: ids(0, 1, 2, 3), start: 0, tokens: toks.subarray(0, 40), logits: 'all' }] });
        const b = await pool.step({ sequences: [{ blockTable: ids(0, 1, 2, 3), start: 40, tokens: toks.subarray(40), logits: 'all' }] });
        const blockBytes = pool.blockBytes;
        pool.dispose();
        return { logits: [...a, ...b], blockBytes };
      };
      const f32 = await run('f32'), f16 = await run('f16');
      expect(f16.blockBytes * 2).toBe(f32.blockBytes);
      // Rounding K and V to fp16 is a relative error of at most 2^-11 on each, i.e. on the two
      // products that feed attention in every layer; as in llm-forward.test.ts, the error of P such
      // products (P = 2 * layers) reaches the logits as at most P * delta relative, and a
      // log-probability moves by at most 2 P delta S (S: the row's logit spread).
      const P = 2 * info.layers, delta = 2 ** -11;
      let differs = false;
      for (let i = 0; i < toks.length; i++) {
        const a = Float32Array.from(f32.logits.slice(i * V, (i + 1) * V)), b = Float32Array.from(f16.logits.slice(i * V, (i + 1) * V));
        let lo = Infinity, hi = -Infinity;
        for (const x of a) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
        const la = logSoftmax(a), lb = logSoftmax(b);
        for (let t = 0; t < V; t++) {
          if (la[t] !== lb[t]) differs = true;
          if (!(Math.abs(la[t]! - lb[t]!) <= 2 * P * delta * (hi - lo))) expect.fail(`position ${i} token ${t}: ${lb[t]} vs ${la[t]}`);
        }
      }
      // The f16 path really rounded something.
      expect(differs).toBe(true);
    } finally {
      engine.dispose();
    }
  });
});

describe('memory', () => {
  let engine: LlmEngine;
  let info: FixtureInfo;
  beforeAll(async () => {
    info = await fixture('memory', { kind: 'llama', type: 'q8_0', seed: 71 });
    engine = await loadTransformer(info.path, { threads: 2 });
  });
  afterAll(() => engine?.dispose());

  // V8's external-memory counter also moves with every ArrayBuffer a step allocates (logits, the
  // packed tables), so what the pool reports is measured across calls that allocate none: creation
  // and dispose.
  it('blocks are allocated lazily as ids are first used, never past maxBlocks, and reported to V8', async () => {
    const maxBlocks = 3000;
    const pool = engine.createKvPool({ blockSize: 16, maxBlocks, dtype: 'f16' });
    // K and V of every layer and KV head, 16 positions of headDim halves.
    expect(pool.blockBytes).toBe(2 * info.layers * info.kvHeads * 16 * info.headDim * 2);
    const cap = maxBlocks * pool.blockBytes;
    expect(pool.bytes).toBe(0);
    const chunk = (pool as KvPool & { nativeInfo(): { chunkBlocks: number } }).nativeInfo().chunkBlocks;
    expect(chunk).toBeGreaterThan(1);
    expect(chunk).toBeLessThan(maxBlocks);
    let last = 0;
    for (const top of [0, 5, chunk + 3, 2 * chunk + 1, 2 * chunk - 1, maxBlocks - 1]) {
      await pool.step({ sequences: [{ blockTable: ids(top), start: 0, tokens: ids(1, 2), logits: 'none' }] });
      const bytes = pool.bytes;
      // Whole chunks up to the one holding the highest id used so far.
      const highest = Math.max(last, top);
      const want = Math.min(maxBlocks, (Math.floor(highest / chunk) + 1) * chunk) * pool.blockBytes;
      expect(bytes).toBe(want);
      expect(bytes).toBeLessThanOrEqual(cap);
      expect(pool.highWaterBytes).toBe(bytes);
      last = highest;
    }
    expect(pool.bytes).toBe(cap);
    // What V8 was told: the blocks and the step arena as of the last step's start.
    const reported = (pool as KvPool & { nativeInfo(): { reportedBytes: number } }).nativeInfo().reportedBytes;
    expect(reported).toBeGreaterThanOrEqual(cap);
    const held = reportedExternalMemory();
    pool.dispose();
    expect(held - reportedExternalMemory()).toBe(reported);
  });

  it("a step's scratch (the arena) is reported to V8 as the next job starts, and released with the pool", async () => {
    const pool = engine.createKvPool({ blockSize: 16, maxBlocks: 64 }) as KvPool & {
      nativeInfo(): { arenaBytes: number; reportedBytes: number; bytes: number };
    };
    const native = () => pool.nativeInfo();
    await pool.step({ sequences: [{ blockTable: ids(0), start: 0, tokens: ids(1, 2), logits: 'last' }] });
    const small = native().arenaBytes;
    // A 200-row prompt step: the arena holds at least its hidden rows (x, normed x, q) in fp32.
    await pool.step({ sequences: [{ blockTable: Int32Array.from({ length: 13 }, (_, i) => i), start: 0, tokens: tokens(200, info.vocabSize, 5), logits: 'last' }] });
    const big = native().arenaBytes;
    expect(big).toBeGreaterThanOrEqual(small + 3 * 200 * info.embedding * 4 - 3 * 2 * info.embedding * 4);
    // Reported as the next job starts (a step runs on a pool thread; V8 is told on the JS thread).
    await pool.step({ sequences: [{ blockTable: ids(0), start: 2, tokens: ids(1), logits: 'none' }] });
    const n = native();
    expect(n.reportedBytes).toBe(n.bytes + n.arenaBytes);
    const held = reportedExternalMemory();
    pool.dispose();
    expect(held - reportedExternalMemory()).toBe(n.reportedBytes);
  });

  it('a sequence allocates its whole cache at creation; the engine frees its pools on dispose', async () => {
    const e = await loadTransformer(info.path);
    const before = reportedExternalMemory();
    const seq = e.createSequence(100);
    // Nothing but the sequence's pool allocated between the two readings.
    expect(reportedExternalMemory() - before).toBe(2 * info.layers * info.kvHeads * 100 * info.headDim * 4);
    const pool = e.createKvPool({ maxBlocks: 8 });
    expect(pool.blockSize).toBe(16);
    expect(pool.dtype).toBe('f32');
    await pool.step({ sequences: [{ blockTable: ids(0), start: 0, tokens: ids(3), logits: 'last' }] });
    expect(pool.bytes).toBe(8 * pool.blockBytes);
    // The model's own bytes go with the engine too.
    const modelBytes = (e as unknown as { nativeModel(w: string): { info(): { bytes: number } } }).nativeModel('test').info().bytes;
    const reported = (pool as KvPool & { nativeInfo(): { reportedBytes: number } }).nativeInfo().reportedBytes;
    expect(reported).toBeGreaterThanOrEqual(8 * pool.blockBytes);
    const held = reportedExternalMemory();
    e.dispose();
    // The sequence's pool: created with its whole cache, and no step yet (no arena).
    expect(held - reportedExternalMemory()).toBe(modelBytes + 2 * info.layers * info.kvHeads * 100 * info.headDim * 4 + reported);
    expect(() => pool.bytes).toThrow(DisposedError);
    await expect(pool.step({ sequences: [] })).rejects.toThrow(DisposedError);
    expect(() => seq.length).toThrow(DisposedError);
  });
});

describe('bad input is a typed error naming the sequence and field; the pool stays usable', () => {
  let engine: LlmEngine;
  let info: FixtureInfo;
  let pool: KvPool;
  beforeAll(async () => {
    info = await fixture('errors', { kind: 'llama', type: 'q4_0', seed: 81, contextLength: 128 });
    engine = await loadTransformer(info.path, { threads: 2 });
    pool = engine.createKvPool({ blockSize: 4, maxBlocks: 10 });
  });
  afterAll(() => engine?.dispose());

  it('createKvPool options', () => {
    const bad: [unknown, RegExp][] = [
      [undefined, /maxBlocks is required/],
      [{}, /options.maxBlocks must be an integer in \[1, /],
      [{ maxBlocks: 0 }, /options.maxBlocks must be an integer/],
      [{ maxBlocks: 1.5 }, /options.maxBlocks must be an integer/],
      [{ maxBlocks: 4, blockSize: 0 }, /options.blockSize must be an integer in \[1, 65536\]/],
      [{ maxBlocks: 4, blockSize: 70000 }, /options.blockSize/],
      [{ maxBlocks: 4, dtype: 'bf16' }, /options.dtype must be one of 'f32', 'f16'/],
      [{ maxBlock: 4 }, /unknown option 'maxBlock'; did you mean 'maxBlocks'/],
      [{ maxBlocks: 2 ** 31 - 1, blockSize: 65536 }, /beyond any memory/],
      [{ maxBlocks: 4, contextSize: 0 }, /options.contextSize must be an integer in \[1, 16777216\]/],
      [{ maxBlocks: 4, contextSize: 2 ** 24 + 1 }, /options.contextSize must be an integer/],
      [{ maxBlocks: 4, contextSize: 1.5 }, /options.contextSize must be an integer/],
    ];
    for (const [o, re] of bad) {
      let err: unknown;
      try {
        engine.createKvPool(o as never);
      } catch (e) {
        err = e;
      }
      expect(err, String(re)).toBeInstanceOf(InvalidArgumentError);
      expect(String(err)).toMatch(re);
    }
  });

  it('contextSize: positions past the trained context length when asked, none past the pool\'s own', async () => {
    const ctx = engine.config.contextLength;
    const pool = engine.createKvPool({ blockSize: 64, maxBlocks: 8, contextSize: ctx + 64 });
    try {
      const table = ids(0, 1, 2, 3);
      await pool.step({ sequences: [{ blockTable: table, start: 0, tokens: Int32Array.from({ length: ctx }, (_, i) => i % 50), logits: 'none' }] });
      const past = await pool.step({ sequences: [{ blockTable: table, start: ctx, tokens: ids(7, 8, 9), logits: 'last' }] });
      expect(past.length).toBe(info.vocabSize);
      expect(past.every(Number.isFinite)).toBe(true);
      await expect(pool.step({ sequences: [{ blockTable: table, start: ctx + 63, tokens: ids(1, 2), logits: 'last' }] }))
        .rejects.toThrow(new RegExp(`start \\+ tokens.length = ${ctx + 65} exceeds the pool's context size ${ctx + 64}`));
    } finally {
      pool.dispose();
    }
  });

  it('every field of a step', async () => {
    const seq = (o: Partial<StepSequence>): StepSequence => ({ blockTable: ids(0, 1), start: 0, tokens: ids(1, 2), logits: 'last', ...o });
    const V = info.vocabSize;
    const bad: [unknown, RegExp][] = [
      [undefined, /batch must be an object/],
      [{}, /batch.sequences must be an array/],
      [{ sequences: [], extra: 1 }, /unknown option 'extra'/],
      [{ sequences: [seq({}), seq({ blockTable: ids(2, 10) })] }, /sequences\[1\].blockTable\[1\]: block id 10 is outside \[0, 10\)/],
      [{ sequences: [seq({ blockTable: ids(-1) })] }, /sequences\[0\].blockTable\[0\]: block id -1/],
      [{ sequences: [seq({ blockTable: [0, 1] as never })] }, /sequences\[0\].blockTable must be an Int32Array/],
      [{ sequences: [seq({ start: 7 })] }, /sequences\[0\].blockTable: 2 blocks of 4 positions do not cover start \+ tokens.length = 9/],
      [{ sequences: [seq({ start: 9 })] }, /sequences\[0\].blockTable: 2 blocks of 4 positions do not cover/],
      [{ sequences: [seq({ start: -1 })] }, /sequences\[0\].start must be an integer/],
      [{ sequences: [seq({ start: 0.5 })] }, /sequences\[0\].start must be an integer/],
      [{ sequences: [seq({ blockTable: Int32Array.from({ length: 40 }, (_, i) => i % 10), start: 127 })] }, /start \+ tokens.length = 129 exceeds the pool's context size 128/],
      [{ sequences: [seq({}), seq({ blockTable: ids(2), tokens: ids(3, V) })] }, new RegExp(`sequences\\[1\\].tokens\\[1\\]: token id ${V} is outside the vocabulary`)],
      [{ sequences: [seq({ tokens: ids(-4) })] }, /sequences\[0\].tokens\[0\]: token id -4/],
      [{ sequences: [seq({ tokens: ids() })] }, /sequences\[0\].tokens must not be empty/],
      [{ sequences: [seq({ tokens: [1, 2] as never })] }, /sequences\[0\].tokens must be an Int32Array/],
      [{ sequences: [seq({ logits: 'first' as never })] }, /sequences\[0\].logits must be one of 'none', 'last', 'all'/],
      [{ sequences: [seq({ blockTabel: ids(0) } as never)] }, /unknown option 'blockTabel'; did you mean 'blockTable'/],
      [{ sequences: [null] }, /sequences\[0\]/],
      // Two writers of one block, a writer and a reader, a table naming a block twice.
      [{ sequences: [seq({}), seq({ blockTable: ids(0, 2) })] }, /sequences\[0\].blockTable\[0\]: block 0 is written by this step and also used at batch.sequences\[1\].blockTable\[0\]/],
      [{ sequences: [seq({ blockTable: ids(3, 4), start: 4 }), seq({ blockTable: ids(4, 5), start: 4 })] }, /sequences\[0\].blockTable\[1\]: block 4 is written by this step and also used at batch.sequences\[1\].blockTable\[0\]/],
      [{ sequences: [seq({ blockTable: ids(6, 6), start: 3 })] }, /block 6 is written by this step and also used at batch.sequences\[0\].blockTable\[/],
      [{ sequences: [], copies: ids(1) }, /copies must hold \[src, dst\] pairs/],
      [{ sequences: [], copies: [1, 2] }, /copies must be an Int32Array/],
      [{ sequences: [], copies: ids(1, 10) }, /copies\[1\]: block id 10 is outside/],
      [{ sequences: [], copies: ids(-1, 2) }, /copies\[0\]: block id -1/],
      [{ sequences: [], copies: ids(1, 2, 3, 2) }, /copies\[1\]: destination block 2 is the destination of another copy/],
      [{ sequences: [], copies: ids(1, 2, 2, 3) }, /copies\[1\]: destination block 2 is also a copy source/],
      [{ sequences: [], copies: ids(4, 4) }, /copies\[1\]: destination block 4 is also a copy source/],
    ];
    for (const [batch, re] of bad) {
      const p = pool.step(batch as never);
      await expect(p, String(re)).rejects.toThrow(InvalidArgumentError);
      await expect(p).rejects.toThrow(re);
    }
    await expect(pool.step({ sequences: [] }, { signal: 'x' as never })).rejects.toThrow(/options.signal must be an AbortSignal/);
    await expect(pool.step({ sequences: [] }, { sginal: 1 } as never)).rejects.toThrow(/unknown option 'sginal'/);
    // Nothing of the above ran: the pool still computes what a fresh sequence does.
    const toks = ids(5, 6, 7, 8, 9);
    const got = await pool.step({ sequences: [{ blockTable: ids(0, 1), start: 0, tokens: toks, logits: 'last' }] });
    expectClose(got, (await alone(engine, toks))[4]!, 'after errors');
  });

  it('the native side repeats the checks (a second line behind TS)', async () => {
    const model = (engine as unknown as { nativeModel(w: string): never }).nativeModel('test');
    const np = native().kvPoolCreate(model, 4, 10, 'f32', 0);
    const logits = new Float32Array(info.vocabSize);
    const step = (tokens: number[], meta: number[], tables: number[], copies: number[] = [], out = logits) =>
      native().kvPoolStep(model, np, Int32Array.from(tokens), Int32Array.from(meta), Int32Array.from(tables), Int32Array.from(copies), out, 1);
    const bad: [() => Promise<void>, RegExp][] = [
      [() => step([1], [1, 0, 1, 1], [10]), /sequences\[0\].blockTable\[0\]: block id 10 is outside/],
      [() => step([1, 2], [1, 3, 2, 1], [0]), /sequences\[0\].blockTable: 1 blocks of 4 positions do not cover start \+ tokens.length = 5/],
      [() => step([info.vocabSize], [1, 0, 1, 1], [0]), /sequences\[0\].tokens\[0\]: token id/],
      [() => step([], [1, 0, 0, 1], [0], [], new Float32Array(0)), /sequences\[0\].tokens must not be empty/],
      [() => step([1], [1, 0, 1, 1], [0], [0, 0]), /destination block 0 is also a copy source/],
      [() => step([1, 2], [1, 0, 1, 1, 1, 0, 1, 1], [0, 0], [], new Float32Array(2 * info.vocabSize)), /block 0 is written by this step/],
      [() => step([1], [1, 0, 1, 1], [0], [], new Float32Array(3)), /logits must hold/],
      [() => step([1], [1, 0, 1, 5], [0]), /meta of sequences\[0\] is invalid/],
      [() => step([1], [2, 0, 1, 1], [0]), /tables must hold every sequence's table/],
    ];
    for (const [call, re] of bad) {
      let err: unknown;
      try {
        await call();
      } catch (e) {
        err = e;
      }
      expect(err, String(re)).toMatchObject({ code: 'ERR_SONDE_INVALID_ARGUMENT' });
      expect(String((err as Error).message)).toMatch(re);
    }
    expect(() => native().kvPoolCreate(model, 0, 10, 'f32', 0)).toThrow(/blockSize/);
    expect(() => native().kvPoolCreate(model, 4, 10, 'bf16' as never, 0)).toThrow(/dtype/);
    expect(() => native().kvPoolCreate(model, 4, 10, 'f32', 11)).toThrow(/reserveBlocks/);
    await step([1], [1, 0, 1, 1], [0]);
    np.dispose();
    np.dispose();
    expect(() => step([1], [1, 0, 1, 1], [0])).toThrow(/the KV pool has been disposed/);
  });
});

describe('abort and dispose', () => {
  it('a step aborted in flight rejects with AbortError and the pool computes correctly afterwards', async () => {
    // A step of 300 rows takes tens of milliseconds, so an abort issued right after it lands in flight.
    const info = await fixture('abort', { kind: 'llama', type: 'f32', embedding: 256, heads: 8, kvHeads: 4, feedForward: 512, layers: 4, seed: 91, contextLength: 512 });
    const engine = await loadTransformer(info.path, { threads: 2 });
    const V = info.vocabSize;
    try {
      const pool = engine.createKvPool({ blockSize: 16, maxBlocks: 40 });
      const table = Int32Array.from({ length: 20 }, (_, i) => i);
      const prompt = tokens(300, V, 92);
      const ac = new AbortController();
      const running = pool.step({ sequences: [{ blockTable: table, start: 0, tokens: prompt, logits: 'all' }] }, { signal: ac.signal });
      // Queued behind it, aborted before it starts.
      const ac2 = new AbortController();
      const queued = pool.step({ sequences: [{ blockTable: table, start: 0, tokens: prompt.subarray(0, 4), logits: 'last' }] }, { signal: ac2.signal });
      // Aborted at once, while the first is in flight: a timer could fire after a fast machine had
      // finished the step, and then it would rightly resolve.
      ac.abort();
      ac2.abort();
      await expect(running).rejects.toThrow(AbortError);
      await expect(queued).rejects.toThrow(AbortError);
      // The same step unaborted, now: it gives the reference's logits (nothing stale was kept).
      // (Rejecting at all shows the step stopped: one that had finished would have resolved. Its
      // duration is not compared: on a loaded machine that is noise.)
      const full = await pool.step({ sequences: [{ blockTable: table, start: 0, tokens: prompt, logits: 'last' }] });
      const seq = engine.createSequence(300);
      expectClose(full, await seq.eval(prompt), 'after abort');
    } finally {
      engine.dispose();
    }
  }, 60_000);

  it('a step error raised after its turn still names the caller in its stack (no stack captured up front)', async () => {
    const info = await fixture('stack', { kind: 'llama', type: 'q8_0', seed: 98 });
    const engine = await loadTransformer(info.path, { threads: 1 });
    try {
      const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 8 });
      const ac = new AbortController();
      // V8's async stack traces name the awaiting callers.
      async function callerOfStep() {
        return await pool.step({ sequences: [{ blockTable: ids(0, 1), start: 0, tokens: tokens(9, info.vocabSize, 99), logits: 'last' }] },
          { signal: ac.signal });
      }
      const running = callerOfStep();
      ac.abort();  // after the call's checks, before its turn: the abort is seen at the native call
      const err = await running.then(() => undefined, (e: unknown) => e as Error);
      expect(err).toBeInstanceOf(AbortError);
      expect(err!.stack).toContain('callerOfStep');
      // The pool's next step runs normally.
      const logits = await pool.step({ sequences: [{ blockTable: ids(0, 1), start: 0, tokens: tokens(9, info.vocabSize, 99), logits: 'last' }] });
      expect(logits.length).toBe(info.vocabSize);
      pool.dispose();
    } finally {
      engine.dispose();
    }
  });

  it('dispose is idempotent; a step running while its pool is disposed still settles', async () => {
    const info = await fixture('dispose', { kind: 'mixtral', type: 'q8_0', seed: 95 });
    const engine = await loadTransformer(info.path, { threads: 2 });
    try {
      const pool = engine.createKvPool({ blockSize: 8, maxBlocks: 8 });
      const running = pool.step({ sequences: [{ blockTable: ids(0, 1, 2, 3), start: 0, tokens: tokens(30, info.vocabSize, 96), logits: 'last' }] });
      pool.dispose();
      pool.dispose();
      // Disposed before its turn came: DisposedError, no crash.
      await expect(running).rejects.toThrow(DisposedError);
      await expect(pool.readBlocks(ids(0))).rejects.toThrow(DisposedError);
      await expect(pool.writeBlocks(ids(0), new Uint8Array(0))).rejects.toThrow(DisposedError);
      expect(() => pool.expertCounts()).toThrow(DisposedError);
      // Disposed while the native step runs: it finishes on its own reference to the blocks.
      const pool2 = engine.createKvPool({ blockSize: 8, maxBlocks: 8 });
      const p2 = pool2.step({ sequences: [{ blockTable: ids(0, 1, 2, 3), start: 0, tokens: tokens(30, info.vocabSize, 97), logits: 'last' }] });
      await Promise.resolve();
      await Promise.resolve();
      pool2.dispose();
      const settled = await p2.then((x) => x.length, (e: unknown) => e);
      expect(settled === info.vocabSize || settled instanceof DisposedError).toBe(true);
    } finally {
      engine.dispose();
    }
  }, 60_000);
});

describe('kvAttention (the kernel test entry)', () => {
  it('refuses mismatched sizes and names a level this CPU lacks', async () => {
    const q = new Float32Array(4), k = new Float32Array(4), v = new Float32Array(4);
    expect(() => native().kvAttention(q, k, v, 4, 2, 1, 'f32', 'scalar')).toThrow(/n \* headDim/);
    expect(() => native().kvAttention(q, k, v, 4, 1, 1, 'f16', 'scalar')).toThrow(/n \* headDim of the dtype/);
    expect(() => native().kvAttention(q, k, v, 4, 1, 2, 'f32', 'scalar')).toThrow(/expected/);
    expect(() => native().kvAttention(q, k, v, 4, 1, 1, 'f32', 'sse' as never)).toThrow(/variant must be/);
    // One key: the output is exactly that key's value row.
    const one = await native().kvAttention(q, k, Float32Array.from([1, -2, 3.5, 0.25]), 4, 1, 1, 'f32', 'scalar');
    expect(Array.from(one)).toEqual([1, -2, 3.5, 0.25]);
  });
});

{
  const engines: LlmEngine[] = [];
  afterAll(() => engines.forEach((e) => e.dispose()));
  describeChains('CPU', async (info) => {
    const engine = await loadTransformer(info.path, { threads: 2 });
    engines.push(engine);
    return engine;
  }, (name, o) => fixture(`chain-${name}`, o));
}
