/**
 * Language models on the GPU beyond single-sequence logits (test/cuda/llm.test.ts has those):
 * batched steps of several sequences, block copies, KV blocks read and written across devices,
 * prefix reuse, abort, device memory freed by dispose, out-of-memory, and LanguageModel placed on
 * 'cuda' (greedy tokens equal to the CPU's; what the GPU path does not run falls back by the
 * placement rules). The CPU transformer is the reference; tolerances as llm-helpers.ts derives.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AbortError, DisposedError, InvalidArgumentError, OutOfMemoryError, UnsupportedOperatorError } from '../../lib/errors.js';
import type { KvPool, LlmEngine } from '../../lib/llm/engine.js';
import { LanguageModel } from '../../lib/llm/language-model.js';
import { loadGpuTransformer } from '../../lib/llm/transformer-gpu.js';
import { gpuDevice } from '../../lib/cuda/runtime.js';
import { native } from '../../lib/binding.js';
import { describeChains } from '../llm-chain-cases.js';
import { DELTA, enginePairs, expectClose, fixture, tokens } from './llm-helpers.js';
import { describeGpu } from './targets.js';

describeGpu('language model on the GPU: pools, state, lifetime, routing', (t) => {
  const both = enginePairs(t);
  const engines: LlmEngine[] = [];
  afterAll(() => engines.forEach((e) => e.dispose()));

  it('batched steps of sequences of different lengths, block copies, and KV blocks that read back as the CPU\'s', async () => {
    const info = await fixture('llama-f32', { kind: 'llama', type: 'f32', seed: 7 });
    const { cpu, gpu } = await both(info);
    const v = info.vocabSize, bs = 4;
    const pools: [KvPool, KvPool] = [cpu.createKvPool({ blockSize: bs, maxBlocks: 16 }), gpu.createKvPool({ blockSize: bs, maxBlocks: 16 })];
    try {
      const a = tokens(6, v, 11), b = tokens(11, v, 12), c = tokens(1, v, 13);
      const ta = Int32Array.of(3, 0), tb = Int32Array.of(5, 1, 7), tc = Int32Array.of(2);
      const run = async (p: KvPool) => {
        const prefill = await p.step({ sequences: [
          { blockTable: ta, start: 0, tokens: a.subarray(0, 5), logits: 'last' },
          { blockTable: tb, start: 0, tokens: b, logits: 'all' },
          { blockTable: tc, start: 0, tokens: c, logits: 'none' },
        ] });
        // Decode rows of two sequences, one of which forks: b's table shares its full blocks with
        // a copy of its last, partly written block (copy-on-write before the step writes it).
        const fork = Int32Array.of(5, 1, 9);
        const decode = await p.step({
          sequences: [
            { blockTable: ta, start: 5, tokens: a.subarray(5, 6), logits: 'last' },
            { blockTable: fork, start: 11, tokens: Int32Array.of(4), logits: 'last' },
            { blockTable: tc, start: 1, tokens: Int32Array.of(8), logits: 'last' },
          ],
          copies: Int32Array.of(7, 9),
        });
        const blocks = await p.readBlocks(Int32Array.of(3, 0, 5, 1, 7, 9, 2));
        return { prefill, decode, blocks };
      };
      const want = await run(pools[0]), got = await run(pools[1]);
      expect(got.prefill.length).toBe((1 + 11) * v);
      expectClose(got.prefill, want.prefill, v, info.layers, DELTA.f32, 'batched prefill');
      expectClose(got.decode, want.decode, v, info.layers, DELTA.f32, 'batched decode with a copied block');
      expect(pools[1].blockBytes).toBe(pools[0].blockBytes);
      const w = new Float32Array(want.blocks.buffer), g = new Float32Array(got.blocks.buffer);
      expect(g.length).toBe(w.length);
      let worst = 0;
      for (let i = 0; i < w.length; i++) worst = Math.max(worst, Math.abs(g[i]! - w[i]!) / (1 + Math.abs(w[i]!)));
      expect(worst).toBeLessThan(1e-4);
      // Unwritten positions of written blocks are zeros on both (fresh blocks are zeroed).
      expect(g[g.length - 1]).toBe(0);
    } finally {
      pools.forEach((p) => p.dispose());
    }
  }, 120_000);

  describeChains('GPU', async (info) => (await both(info)).gpu, fixture);

  it('KV blocks written from the CPU pool\'s bytes continue the CPU\'s sequence; readBlocks/writeBlocks round trip', async () => {
    const info = await fixture('qwen2-q8_0', { kind: 'qwen2', type: 'q8_0', seed: 7 });
    const { cpu, gpu } = await both(info);
    const v = info.vocabSize, bs = 8;
    const pa = cpu.createKvPool({ blockSize: bs, maxBlocks: 4 }), pb = gpu.createKvPool({ blockSize: bs, maxBlocks: 4 });
    const pc = gpu.createKvPool({ blockSize: bs, maxBlocks: 8 });
    try {
      const toks = tokens(13, v, 21), table = Int32Array.of(0, 1);
      await pa.step({ sequences: [{ blockTable: table, start: 0, tokens: toks.subarray(0, 12), logits: 'none' }] });
      const saved = await pa.readBlocks(table);
      // The CPU's blocks [0, 1] as the GPU pool's [1, 0].
      await pb.writeBlocks(Int32Array.of(1, 0), saved);
      const next = (p: KvPool, tb: Int32Array) => p.step({ sequences: [{ blockTable: tb, start: 12, tokens: toks.subarray(12), logits: 'last' }] });
      const want = await next(pa, table);
      expectClose(await next(pb, Int32Array.of(1, 0)), want, v, info.layers, DELTA.q8_0, 'continued from CPU blocks');
      // The GPU's own blocks, read back and written into other ids of another pool, continue alike.
      const mine = await pb.readBlocks(Int32Array.of(1, 0));
      await pc.writeBlocks(Int32Array.of(6, 3), mine);
      expect(await pc.readBlocks(Int32Array.of(6, 3))).toEqual(mine);
      // Bad block lists are typed errors, as on the CPU pool, and leave the blocks as they were.
      await expect(pc.writeBlocks(Int32Array.of(6, 6), mine)).rejects.toThrow(/ids\[1\] repeats block 6/);
      await expect(pc.readBlocks(Int32Array.of(8))).rejects.toThrow(/ids\[0\] = 8 is outside \[0, 8\)/);
      await expect(pc.writeBlocks(Int32Array.of(6), mine)).rejects.toThrow(/bytes must hold/);
      expect(await pc.readBlocks(Int32Array.of(6, 3))).toEqual(mine);
      const again = await next(pc, Int32Array.of(6, 3));
      expectClose(again, want, v, info.layers, DELTA.q8_0, 'continued from GPU blocks');
    } finally {
      pa.dispose();
      pb.dispose();
      pc.dispose();
    }
  }, 120_000);

  it('prefix reuse: truncate and re-evaluate a tail', async () => {
    const info = await fixture('qwen2-f32', { kind: 'qwen2', type: 'f32', seed: 7 });
    const { cpu, gpu } = await both(info);
    const v = info.vocabSize, toks = tokens(14, v, 31);
    const a = cpu.createSequence(32, { kvSpan: 4 } as never), b = gpu.createSequence(32, { kvSpan: 4 } as never);
    try {
      await a.eval(toks);
      await b.eval(toks);
      a.truncate(6);
      b.truncate(6);
      expect(b.length).toBe(6);
      const tail = Int32Array.from(toks.subarray(6)).reverse();
      expectClose(await b.eval(tail, { allLogits: true }), await a.eval(tail, { allLogits: true }), v, info.layers, DELTA.f32, 'tail');
    } finally {
      a.dispose();
      b.dispose();
    }
  }, 120_000);

  it('abort: a step aborted while it runs, or before it starts, rejects with AbortError and the pool stays usable', async () => {
    const info = await fixture('llama-q4_0', { kind: 'llama', type: 'q4_0', seed: 7 });
    const { cpu, gpu } = await both(info);
    const v = info.vocabSize, toks = tokens(40, v, 41);
    const pool = gpu.createKvPool({ blockSize: 16, maxBlocks: 4 });
    try {
      const ac = new AbortController();
      ac.abort();
      await expect(pool.step({ sequences: [{ blockTable: Int32Array.of(0, 1, 2), start: 0, tokens: toks, logits: 'last' }] }, { signal: ac.signal }))
        .rejects.toBeInstanceOf(AbortError);
      const late = new AbortController();
      const running = pool.step({ sequences: [{ blockTable: Int32Array.of(0, 1, 2), start: 0, tokens: toks, logits: 'last' }] }, { signal: late.signal });
      // A few microtasks: the native step has started (the pool's chain runs it in the first), and
      // its completion cannot have come back yet (that takes a turn of the event loop), so the
      // abort lands while it runs however fast the device is: on the emulator between layers, on
      // a GPU possibly after the last launch, where the result is dropped.
      for (let i = 0; i < 3; i++) await Promise.resolve();
      late.abort();
      await expect(running).rejects.toBeInstanceOf(AbortError);
      const ref = cpu.createSequence(64);
      try {
        const want = await ref.eval(toks.subarray(0, 5));
        const got = await pool.step({ sequences: [{ blockTable: Int32Array.of(0), start: 0, tokens: toks.subarray(0, 5), logits: 'last' }] });
        expectClose(got, want, v, info.layers, DELTA.q4_0, 'after the abort');
      } finally {
        ref.dispose();
      }
    } finally {
      pool.dispose();
    }
  }, 120_000);

  it('dispose frees the device memory of the weights, the pools and their arenas', async () => {
    const info = await fixture('llama-f16', { kind: 'llama', type: 'f16', seed: 7 });
    const before = gpuDevice(t.id).inUse;
    const gpu = await loadGpuTransformer(info.path, { device: t.id });
    const weights = gpu.deviceBytes;
    expect(gpuDevice(t.id).inUse - before).toBeGreaterThanOrEqual(weights);
    const pool = gpu.createKvPool({ blockSize: 16, maxBlocks: 8 });
    await pool.step({ sequences: [{ blockTable: Int32Array.of(0), start: 0, tokens: tokens(5, info.vocabSize, 1), logits: 'last' }] });
    expect(pool.bytes).toBeGreaterThan(0);
    expect(pool.bytes).toBeLessThanOrEqual(8 * pool.blockBytes);
    expect(gpuDevice(t.id).inUse - before).toBeGreaterThan(weights + pool.bytes);
    gpu.dispose();
    expect(() => pool.bytes).toThrow(DisposedError);
    expect(gpuDevice(t.id).inUse).toBe(before);
    gpu.dispose();
  }, 120_000);

  it('a KV pool beyond the device\'s memory is an OutOfMemoryError naming the device and the KV cache', async () => {
    const info = await fixture('llama-f32', { kind: 'llama', type: 'f32', seed: 7 });
    const gpu = await loadGpuTransformer(info.path, { device: t.id });
    engines.push(gpu);
    const probe = gpu.createKvPool({ blockSize: 1024, maxBlocks: 1 });
    const blockBytes = probe.blockBytes;
    probe.dispose();
    const total = gpuDevice(t.id).totalMemory;
    const maxBlocks = Math.ceil((2 * total) / blockBytes);
    const pool = gpu.createKvPool({ blockSize: 1024, maxBlocks });
    try {
      const step = pool.step({ sequences: [{ blockTable: Int32Array.of(maxBlocks - 1), start: 0, tokens: Int32Array.of(1), logits: 'last' }] });
      await expect(step).rejects.toBeInstanceOf(OutOfMemoryError);
      await expect(step).rejects.toThrow(new RegExp(`${t.id === 'emulated' ? 'emulat' : 'cuda'}.*KV cache|KV cache.*${t.id === 'emulated' ? 'emulat' : 'cuda'}`, 'i'));
      // Still usable within what fits.
      const ok = await pool.step({ sequences: [{ blockTable: Int32Array.of(0), start: 0, tokens: Int32Array.of(1), logits: 'last' }] });
      expect(ok.length).toBe(info.vocabSize);
    } finally {
      pool.dispose();
    }
  }, 120_000);

  it('options are checked: device names the parameter', async () => {
    const info = await fixture('llama-f32', { kind: 'llama', type: 'f32', seed: 7 });
    await expect(loadGpuTransformer(info.path, { device: 'gpu0' as never })).rejects.toThrow(InvalidArgumentError);
    await expect(loadGpuTransformer(info.path, { device: 'gpu0' as never })).rejects.toThrow(/options\.device/);
    await expect(loadGpuTransformer(info.path, undefined as never)).rejects.toThrow(/options\.device is required/);
  });

  describe('LanguageModel with device \'cuda\'', () => {
    const saved = process.env['SONDE_CUDA_DEVICE'];
    beforeAll(() => {
      if (t.emulated) process.env['SONDE_CUDA_DEVICE'] = 'emulated';
      else delete process.env['SONDE_CUDA_DEVICE'];
    });
    afterAll(() => {
      if (saved === undefined) delete process.env['SONDE_CUDA_DEVICE'];
      else process.env['SONDE_CUDA_DEVICE'] = saved;
    });

    it.each(['q8_0'] as const)('runs on the GPU and greedy generate() gives the CPU\'s tokens (llama %s)', async (type) => {
      const info = await fixture(`llama-${type}`, { kind: 'llama', type, seed: 7 });
      const onCpu = await LanguageModel.load(info.path, { device: 'cpu', contextSize: 64 });
      const onGpu = await LanguageModel.load(info.path, { device: 'cuda', contextSize: 64, kvCache: { maxBytes: 1 << 20 } });
      try {
        expect(onGpu.device).toEqual({ kind: 'cuda', id: 'cuda:0' });
        const mem = onGpu.memory();
        expect(mem.device).toBe('cuda:0');
        expect(mem.weightBytes).toBeGreaterThan(0);
        expect(onCpu.memory().weightBytes).toBe(0);
        const run = async (m: LanguageModel) => {
          const out: number[] = [];
          for await (const g of m.generate('the cat', { maxTokens: 6, temperature: 0 })) out.push(g.token);
          return out;
        };
        const want = await run(onCpu);
        expect(want.length).toBeGreaterThan(0);
        expect(await run(onGpu)).toEqual(want);
        expect(onGpu.memory().kvCacheBytes).toBeGreaterThan(0);
      } finally {
        onCpu.dispose();
        onGpu.dispose();
      }
    }, 120_000);

    it('generate() chains decode steps on the device (KvPool.stepChain): greedy, the CPU\'s tokens; sampled, the same tokens with chains and without', async () => {
      const info = await fixture('llama-q8_0', { kind: 'llama', type: 'q8_0', seed: 7 });
      const n = native() as unknown as Record<string, (...a: unknown[]) => unknown>;
      const original = n['llmGpuKvPoolStepChain']!;
      let chains = 0;
      n['llmGpuKvPoolStepChain'] = (...a: unknown[]) => { chains++; return original(...a); };
      const savedChain = process.env['SONDE_LLM_CHAIN_MS'];
      const load = async (chainMs: string) => {
        process.env['SONDE_LLM_CHAIN_MS'] = chainMs;
        try {
          return await LanguageModel.load(info.path, { device: 'cuda', contextSize: 64, kvCache: { maxBytes: 1 << 20 } });
        } finally {
          if (savedChain === undefined) delete process.env['SONDE_LLM_CHAIN_MS'];
          else process.env['SONDE_LLM_CHAIN_MS'] = savedChain;
        }
      };
      const onCpu = await LanguageModel.load(info.path, { device: 'cpu', contextSize: 64 });
      // Chains as long as the request allows (a minute of steps), and none.
      const [long, off] = [await load('60000'), await load('0')];
      try {
        const run = async (m: LanguageModel, options: { temperature?: number; repeatPenalty?: number; seed?: number } = {}) => {
          const out: number[] = [];
          for await (const g of m.generate('the cat sat', { maxTokens: 12, ...options })) out.push(g.token);
          return out;
        };
        const want = await run(onCpu);
        expect(want.length).toBeGreaterThan(2);
        expect(await run(off)).toEqual(want);
        expect(chains).toBe(0);
        expect(await run(long)).toEqual(want);
        expect(chains).toBeGreaterThan(0);
        // Sampled: drawn on the device in chains, the same tokens as drawn on the host.
        let calls = chains;
        const sampled = await run(off, { temperature: 1.3, seed: 5 });
        expect(chains).toBe(calls);
        expect(await run(long, { temperature: 1.3, seed: 5 })).toEqual(sampled);
        expect(chains).toBeGreaterThan(calls);
        // Penalties need the logits on the host: no chain.
        calls = chains;
        const penalised = await run(onCpu, { repeatPenalty: 1.3 });
        expect(await run(long, { repeatPenalty: 1.3 })).toEqual(penalised);
        expect(chains).toBe(calls);
      } finally {
        n['llmGpuKvPoolStepChain'] = original;
        onCpu.dispose();
        long.dispose();
        off.dispose();
      }
    }, 120_000);

    it('a model the GPU path does not run (head size 288): \'cuda\' names what, fallback \'cpu\' runs it on the CPU and says why', async () => {
      const info = await fixture('hd288', { kind: 'llama', type: 'f32', embedding: 288, heads: 1, kvHeads: 1, feedForward: 64, layers: 1, seed: 7 });
      await expect(LanguageModel.load(info.path, { device: 'cuda' })).rejects.toThrow(UnsupportedOperatorError);
      await expect(LanguageModel.load(info.path, { device: 'cuda' })).rejects.toThrow(/head dimension 288/);
      const m = await LanguageModel.load(info.path, { device: 'cuda', fallback: 'cpu', contextSize: 32 });
      try {
        expect(m.device.kind).toBe('cpu');
        expect(m.device.reason).toMatch(/head dimension 288/);
      } finally {
        m.dispose();
      }
    }, 120_000);
  });
});
