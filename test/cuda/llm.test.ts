/**
 * Language models on the GPU (lib/llm/transformer-gpu.ts, native/ops/llm_gpu.cc): the same GGUF
 * evaluated by the CPU transformer is the reference, on the CUDA emulator here and on cuda:0 where
 * a GPU exists (test/cuda/targets.ts): logits of every architecture and weight type. Pools, KV
 * state, lifetime and LanguageModel routing are llm-pool.test.ts's.
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
import { execFile } from 'node:child_process';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { typed, type GgufTensorType } from '../../lib/llm/gguf.js';
import type { FixtureOptions } from '../llm-fixtures.js';
import { loadGpuTransformer } from '../../lib/llm/transformer-gpu.js';
import { DELTA, enginePairs, expectClose, fixture, tokens } from './llm-helpers.js';
import { describeGpu } from './targets.js';

describeGpu('language model on the GPU', (t) => {
  const both = enginePairs(t);

  // Prompts of 17 tokens: every product of the prefill is a GEMM (the quantised GEMV takes up to 16
  // rows, and its 8-row form costs the emulator a second a launch); decode rows take the GEMVs.
  describe('logits equal the CPU transformer\'s: a 17-token prefill, then 2 decode steps', () => {
    // llama f32 is llm-pool.test.ts's batched case.
    const cases: [FixtureOptions['kind'], GgufTensorType][] = [
      ['llama', 'f16'], ['llama', 'bf16'], ['llama', 'q8_0'], ['llama', 'q4_0'],
      // qwen2: q/k/v biases (fused in the GEMM's epilogue for float weights, an add after the
      // quantised product) and NeoX RoPE.
      ['qwen2', 'f32'], ['qwen2', 'q8_0'],
    ];
    it.each(cases)('%s %s', async (kind, type) => {
      const info = await fixture(`${kind}-${type}`, { kind, type, seed: 7 });
      const { cpu, gpu } = await both(info);
      expect(gpu.gpu).toBe(t.id);
      expect(gpu.deviceBytes).toBeGreaterThan(0);
      const v = info.vocabSize, toks = tokens(19, v, 3);
      const a = cpu.createSequence(32), b = gpu.createSequence(32);
      try {
        expectClose(await b.eval(toks.subarray(0, 17), { allLogits: true }), await a.eval(toks.subarray(0, 17), { allLogits: true }),
          v, info.layers, DELTA[type], 'prefill');
        for (let i = 17; i < 19; i++) {
          expectClose(await b.eval([toks[i]!]), await a.eval([toks[i]!]), v, info.layers, DELTA[type], `decode at ${i}`);
        }
        expect(b.length).toBe(19);
      } finally {
        a.dispose();
        b.dispose();
      }
    }, 120_000);
  });

  it('SONDE_GPU_LLM_PROFILE=1 prints, at exit, each op of a step with its median time; =step, whole steps', async () => {
    const info = await fixture('llama-q8_0', { kind: 'llama', type: 'q8_0', seed: 7 });
    const module = pathToFileURL(resolve('dist/llm/transformer-gpu.js')).href;
    const script = `import { loadGpuTransformer } from ${JSON.stringify(module)};
      const m = await loadGpuTransformer(${JSON.stringify(info.path)}, { device: ${JSON.stringify(t.id)} });
      const s = m.createSequence(32);
      await s.eval([1, 2, 3, 4]);
      for (const tok of [5, 6, 7]) await s.eval([tok]);
      s.dispose();
      m.dispose();`;
    const profiled = (mode: string) => new Promise<{ code: number | null; stderr: string }>((done) => {
      execFile(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, SONDE_GPU_LLM_PROFILE: mode } },
        (err, _stdout, stderr) => done({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stderr }));
    });
    // step: whole steps as they run unprofiled, their device time and the native step's wall time.
    const steps = await profiled('step');
    expect(steps.code, steps.stderr).toBe(0);
    expect(steps.stderr).toMatch(/sonde gpu llm profile: decode, 3 steps: device [0-9.]+ ms, native step [0-9.]+ ms \(medians\)/);
    expect(steps.stderr).toMatch(/sonde gpu llm profile: prefill, 1 steps: device [0-9.]+ ms, native step [0-9.]+ ms/);
    expect(steps.stderr).not.toContain('quant_matmul');
    const run = await profiled('1');
    expect(run.code, run.stderr).toBe(0);
    // 3 decode steps and 1 prefill step; a q8_0 llama's decode runs the quantised GEMVs, the
    // attention decode kernel and the fused RoPE + KV store, each layer's once per step.
    expect(run.stderr).toMatch(/sonde gpu llm profile: decode, 3 steps, [0-9.]+ ms of ops per step/);
    expect(run.stderr).toMatch(/sonde gpu llm profile: prefill, 1 steps/);
    for (const op of ['quant_matmul n=', 'paged_attention_decode', 'llm_rope_store', 'llm_silu_mul', 'llm_add_rms_norm']) {
      expect(run.stderr, op).toContain(op);
    }
    expect(run.stderr).toMatch(/llm_rope_store x2\.000 \(median/);  // two layers
  }, 120_000);

  it('a layer whose gate and up differ in type runs them apart, the next joined', async () => {
    // Layer 0's up in f16, the rest q8_0: its FFN is two products and a packed SwiGLU, layer 1's
    // one joined product read in place (ops/llm_gpu.cc: GpuLlmLayer::gate_up).
    const info = await fixture('llama-mixed-ffn', { kind: 'llama', type: 'q8_0', seed: 9, tensorTypes: { 'blk.0.ffn_up.weight': 'f16' } });
    const { cpu, gpu } = await both(info);
    const v = info.vocabSize, toks = tokens(19, v, 5);
    const a = cpu.createSequence(32), b = gpu.createSequence(32);
    try {
      expectClose(await b.eval(toks.subarray(0, 17), { allLogits: true }), await a.eval(toks.subarray(0, 17), { allLogits: true }),
        v, info.layers, DELTA.q8_0, 'prefill');
      for (let i = 17; i < 19; i++) expectClose(await b.eval([toks[i]!]), await a.eval([toks[i]!]), v, info.layers, DELTA.q8_0, `decode at ${i}`);
    } finally {
      a.dispose();
      b.dispose();
    }
  }, 120_000);

  describe('mixture-of-experts models: logits and expert counts equal the CPU\'s', () => {
    // Experts run in f32 on the GPU when they fit (every GGUF type converts exactly); f32 and f16
    // files keep the CPU's activations in fp32 too, so routing sees the same scores up to fp32
    // rounding. 'bf16 experts': SONDE_GPU_EXPERTS=bf16 pins the storage large models get (the
    // router stays f32; expert weights and, in the tensor-core GEMM, activations round to bf16).
    const cases = [['mixtral', 'f16', 'f32'], ['qwen2moe', 'f32', 'f32'], ['mixtral', 'f32', 'bf16']] as const;
    it.each(cases)('%s %s, %s experts', async (kind, type, experts) => {
      const info = await fixture(`${kind}-${type}`, { kind, type, seed: 7 });
      process.env['SONDE_GPU_EXPERTS'] = experts;
      let pair;
      try {
        pair = await both(info);
      } finally {
        delete process.env['SONDE_GPU_EXPERTS'];
      }
      const { cpu, gpu } = pair;
      if (experts === 'bf16') {
        // The stacked experts take half the bytes of f32 ones: 2 bytes less per weight.
        process.env['SONDE_GPU_EXPERTS'] = 'f32';
        let wide;
        try {
          wide = await loadGpuTransformer(info.path, { device: t.id });
        } finally {
          delete process.env['SONDE_GPU_EXPERTS'];
        }
        const weights = info.layers * info.experts * 3 * info.embedding * gpu.config.expertFeedForwardLength;
        expect(wide.deviceBytes - gpu.deviceBytes).toBe(2 * weights);
        wide.dispose();
      }
      const delta = experts === 'bf16' ? DELTA.bf16 : DELTA[type];
      const v = info.vocabSize, toks = tokens(14, v, 5);
      const a = cpu.createSequence(32), b = gpu.createSequence(32);
      try {
        expectClose(await b.eval(toks.subarray(0, 12), { allLogits: true }), await a.eval(toks.subarray(0, 12), { allLogits: true }),
          v, info.layers, delta, 'prefill');
        for (let i = 12; i < 14; i++) expectClose(await b.eval([toks[i]!]), await a.eval([toks[i]!]), v, info.layers, delta, `decode at ${i}`);
        const want = a.expertCounts!(), got = b.expertCounts!();
        expect(got).toEqual(want);
        let sum = 0;
        for (let e = 0; e < info.experts; e++) sum += got![e]!;
        expect(sum).toBe(14 * info.expertsUsed);
      } finally {
        a.dispose();
        b.dispose();
      }
    }, 120_000);
  });

  describe('deepseek2 (multi-head latent attention, DeepSeekMoE routing): logits and expert counts equal the CPU\'s', () => {
    // The options of llm-deepseek.test.ts's cases, combined: q LoRA or not, split or joined kv_b,
    // YaRN, sigmoid gating with a selection bias and group-limited routing, odd sizes.
    const base: FixtureOptions = { kind: 'deepseek2', embedding: 64, layers: 3, heads: 4, experts: 8, expertsUsed: 2, expertFeedForward: 32, feedForward: 96 };
    const cases: [string, Partial<FixtureOptions>][] = [
      ['q LoRA, split kv_b, YaRN factor 8', {
        mla: { qLoraRank: 24, kvB: 'split' },
        metadata: { 'deepseek2.rope.scaling.type': 'yarn', 'deepseek2.rope.scaling.factor': typed('float32', 8), 'deepseek2.rope.scaling.original_context_length': 32 },
      }],
      ['joined kv_b, sigmoid gating, exp_probs_b, weights norm and scale, 4 groups of which 3 used', {
        mla: { kvB: 'joined' }, routing: { gatingFunc: 2, probsBias: true, weightsNorm: true, weightsScale: 1.5, groups: 4, groupsUsed: 3 },
      }],
      ['odd sizes: rope 6, nope 10, value 12, kv rank 20, all layers MoE, 1 shared', {
        heads: 3, mla: { ropeDim: 6, keyNope: 10, valueLength: 12, kvLoraRank: 20, qLoraRank: 0 }, routing: { denseLead: 0, sharedCount: 1 },
      }],
    ];
    it.each(cases)('%s', async (name, o) => {
      const info = await fixture(`ds-${name.replace(/[^a-z0-9]+/gi, '-')}`, { ...base, ...o, type: 'f32', seed: 11 });
      const { cpu, gpu } = await both(info);
      expect(gpu.config.architecture).toBe('deepseek2');
      const v = info.vocabSize, toks = tokens(13, v, 17);
      const a = cpu.createSequence(32, { kvSpan: 8 } as never), b = gpu.createSequence(32, { kvSpan: 8 } as never);
      try {
        expectClose(await b.eval(toks.subarray(0, 11), { allLogits: true }), await a.eval(toks.subarray(0, 11), { allLogits: true }),
          v, info.layers, DELTA.f32, 'prefill');
        for (let i = 11; i < 13; i++) expectClose(await b.eval([toks[i]!]), await a.eval([toks[i]!]), v, info.layers, DELTA.f32, `decode at ${i}`);
        expect(b.expertCounts!()).toEqual(a.expertCounts!());
      } finally {
        a.dispose();
        b.dispose();
      }
    }, 120_000);
  });

  it('head size 64 with an f16 KV cache (the tensor-core prefill), tied output, linear RoPE scaling, one KV head', async () => {
    const info = await fixture('hd64', {
      kind: 'llama', type: 'f16', embedding: 128, heads: 2, kvHeads: 1, feedForward: 96, layers: 1, tied: true, ropeScale: 2, seed: 5,
    });
    const { cpu, gpu } = await both(info);
    const v = info.vocabSize, toks = tokens(20, v, 9);
    const pa = cpu.createKvPool({ blockSize: 8, maxBlocks: 4, dtype: 'f16' });
    const pb = gpu.createKvPool({ blockSize: 8, maxBlocks: 4, dtype: 'f16' });
    try {
      const table = Int32Array.of(0, 1, 2);
      const step = (start: number, n: number) => ({ sequences: [{ blockTable: table, start, tokens: toks.subarray(start, start + n), logits: 'all' as const }] });
      expectClose(await pb.step(step(0, 17)), await pa.step(step(0, 17)), v, info.layers, DELTA.f16, 'prefill');
      expectClose(await pb.step(step(17, 1)), await pa.step(step(17, 1)), v, info.layers, DELTA.f16, 'decode');
    } finally {
      pa.dispose();
      pb.dispose();
    }
  }, 120_000);
});
