// Language models on the GPU (lib/llm/transformer-gpu.ts): a synthetic llama-shaped model written
// to a temporary GGUF (embedding 4096, feed-forward 14336, 32 heads of 128 with 8 KV heads, 4
// layers: 0.93 GB in q8_0, 1.75 GB in f16), so that the weights dominate what a decode step reads.
// Decode is bound by reading every weight once per token: it reports tok/s of one sequence, the
// achieved GB/s (weight bytes per token / step time, the step as the API sees it: upload of the
// token and block table, every layer's launches, the logits row back) and that as % of the read
// bandwidth the suite measured (the target: 70%). Prefill reports tok/s of one 512-token
// prompt. `--emulated` runs a tiny model of the same kind, which checks the case and says nothing
// about speed.
//
// The weights are random encoded bytes, not quantised floats (gguf.write would quantise 0.9 B
// values in JS: minutes): q8_0 blocks of random int8 with a fixed fp16 scale, f16 values of random
// sign and mantissa at one exponent; both keep activations O(1) through the layers.
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as gguf from '../../dist/llm/gguf.js';
import { loadGpuTransformer } from '../../dist/llm/transformer-gpu.js';
import { llmModelSpec } from '../llm/models.js';

const BLOCK_BYTES = { q8_0: 34, q4_0: 18 };

// Encoded bytes of `count` weights: scale 2^-12 (q8_0: |w| < 0.031) or 2^-7 (f16: |w| in
// [0.0078, 0.0156)), so a product over 4096 inputs of O(1) activations stays O(1).
function randomWeights(type, count) {
  if (type === 'q8_0') {
    const blocks = count / 32, out = new Uint8Array(blocks * BLOCK_BYTES.q8_0);
    randomFillSync(out);
    for (let b = 0; b < blocks; b++) {
      out[b * 34] = 0x00;
      out[b * 34 + 1] = 0x0c;  // fp16 2^-12
    }
    return out;
  }
  const out = new Uint16Array(count);
  randomFillSync(out);
  for (let i = 0; i < count; i++) out[i] = (out[i] & 0x83ff) | (8 << 10);
  return new Uint8Array(out.buffer);
}

export async function writeModel(path, type, shape) {
  const { spec } = llmModelSpec({ kind: 'llama', type, seed: 1, wordsOnly: true, ...shape }, gguf.typed);
  const tensors = spec.tensors.map((t) => (t.type === type && t.dims.length === 2
    ? { ...t, data: () => randomWeights(type, t.dims[0] * t.dims[1]) }
    : t));
  await gguf.write(path, { metadata: spec.metadata, tensors });
}

/**
 * What one decode token reads: every matrix (the embedding row aside; tied or not, the output
 * matrix is read in full), in the file's bytes.
 */
export function decodeWeightBytes(engine) {
  let bytes = 0;
  for (const t of engine.file.tensors) if (t.dims.length === 2 && t.name !== 'token_embd.weight') bytes += t.bytes;
  if (!engine.file.tensors.some((t) => t.name === 'output.weight')) {
    bytes += engine.file.tensors.find((t) => t.name === 'token_embd.weight').bytes;
  }
  return bytes;
}

/**
 * One sequence decoding on `engine`: a KV pool of `dtype` blocks for `prompt` + `steps` tokens,
 * step(start, n) feeding tokens [start, start + n), and decodeWindows(count): one step after the
 * prompt, then `count` windows of `steps` one-token steps over the same positions (each rewrites the
 * cache entries the one before wrote), resolving to the windows' ms per step, sorted.
 */
export function decodeRig(engine, { prompt, steps, dtype }) {
  const vocab = engine.config.vocabSize, bs = 16;
  const blocks = Math.ceil((prompt + steps + 8) / bs);
  const table = Int32Array.from({ length: blocks }, (_, i) => i);
  const toks = Int32Array.from({ length: prompt + steps + 1 }, (_, i) => (i * 7919) % vocab);
  const pool = engine.createKvPool({ blockSize: bs, maxBlocks: blocks, dtype });
  const step = (start, n) => pool.step({ sequences: [{ blockTable: table, start, tokens: toks.subarray(start, start + n), logits: 'last' }] });
  return {
    step,
    async decodeWindows(count) {
      await step(prompt, 1);
      const times = [];
      for (let w = 0; w < count; w++) {
        const t0 = performance.now();
        for (let i = 1; i <= steps; i++) await step(prompt + i, 1);
        times.push((performance.now() - t0) / steps);
      }
      return times.sort((a, b) => a - b);
    },
    // The same windows as KvPool.stepChain chains of `chain` steps (generation on the GPU after the
    // first decode step has been measured): per-step time with the host's round trip paid once per
    // chain. The tokens are the model's argmax, or with `sampled` drawn as llama.cpp's default
    // sampler chain does (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), not toks'.
    async chainWindows(count, chain, sampled = false) {
      const sampling = sampled ? { params: Float64Array.of(0.8, 40, 0.95, Math.log(0.05)), rng: Uint32Array.of(1, 2, 3, 4) } : undefined;
      const times = [];
      for (let w = 0; w < count; w++) {
        const t0 = performance.now();
        for (let i = 1; i <= steps; i += chain) {
          await pool.stepChain({ sequences: [{ blockTable: table, start: prompt + i, tokens: toks.subarray(prompt + i, prompt + i + 1), logits: 'last' }] },
            Math.min(chain, steps - i + 1), sampling ? { sampling } : undefined);
        }
        times.push((performance.now() - t0) / steps);
      }
      return times.sort((a, b) => a - b);
    },
    dispose: () => pool.dispose(),
  };
}

export async function* llmCases(env) {
  const { id, emulated, measured, sheet } = env;
  const shape = emulated
    ? { embedding: 64, heads: 4, kvHeads: 2, feedForward: 128, layers: 2, contextLength: 256 }
    : { embedding: 4096, heads: 32, kvHeads: 8, feedForward: 14336, layers: Number(process.env.SONDE_BENCH_LLM_LAYERS ?? 4),
      contextLength: 4096 };
  // SONDE_BENCH_LLM_LAYERS / SONDE_BENCH_LLM_TYPES: a deeper model (the per-step fixed cost then
  // weighs less) or one weight type, e.g. to split a step's time into per-layer and fixed parts.
  const prompt = emulated ? 24 : 512, decodeSteps = emulated ? 4 : 64;
  // Decode is timed in windows of decodeSteps steps over the same positions (each rewrites the
  // cache entries the one before wrote) and the median window reported, with the fastest and
  // slowest: a single window of a ~0.5 ms step moved by ±5% from one process to the next.
  const windows = emulated ? 2 : 7;
  const dir = mkdtempSync(join(tmpdir(), 'sonde-bench-gpu-llm-'));
  try {
    for (const type of (process.env.SONDE_BENCH_LLM_TYPES ?? 'q8_0,f16').split(',')) {
      const path = join(dir, `llama-${type}.gguf`);
      await writeModel(path, type, shape);
      const engine = await loadGpuTransformer(path, { device: id });
      try {
        const weightBytes = decodeWeightBytes(engine);
        const name = `llama ${type} ${shape.embedding}x${shape.feedForward}x${shape.layers}L`;
        // The KV cache in f32 (the pools' default) and in f16 (what llama.cpp keeps by default; the
        // attention then runs on tensor cores). SONDE_BENCH_LLM_KV=f16 picks one.
        for (const dtype of (process.env.SONDE_BENCH_LLM_KV ?? 'f32,f16').split(',')) {
          const rig = decodeRig(engine, { prompt, steps: decodeSteps, dtype });
          try {
            await rig.step(0, prompt);  // warm-up: the arena, the pool's blocks
            const t0 = performance.now();
            await rig.step(0, prompt);
            const prefillMs = performance.now() - t0;
            yield { case: `${name} prefill ${prompt} tokens (${dtype} KV)`, ms: prefillMs, tokPerS: 1000 * prompt / prefillMs,
              weightGb: weightBytes / 1e9 };
            const times = await rig.decodeWindows(windows);
            const stepMs = times[windows >> 1];
            const gbps = weightBytes / stepMs / 1e6;
            yield {
              case: `${name} decode (1 sequence, ${prompt} cached, ${dtype} KV)`,
              ms: stepMs, minMs: times[0], maxMs: times[windows - 1], windows, tokPerS: 1000 / stepMs, gbps,
              pctOfRead: 100 * gbps / measured.gbps, pctOfPeak: sheet ? 100 * gbps / sheet.gbps : undefined,
            };
            // Generation's path: chains of 8 steps (a 1.5 ms step's chain at the scheduler's 10 ms),
            // greedy and sampled on the device.
            for (const sampled of [false, true]) {
              const chained = await rig.chainWindows(windows, 8, sampled);
              const chainMs = chained[windows >> 1], chainGbps = weightBytes / chainMs / 1e6;
              yield {
                case: `${name} decode chained 8 steps (stepChain, ${sampled ? 'sampled' : 'greedy'}, ${dtype} KV)`,
                ms: chainMs, minMs: chained[0], maxMs: chained[windows - 1], windows, tokPerS: 1000 / chainMs, gbps: chainGbps,
                pctOfRead: 100 * chainGbps / measured.gbps, pctOfPeak: sheet ? 100 * chainGbps / sheet.gbps : undefined,
              };
            }
          } finally {
            rig.dispose();
          }
        }
      } finally {
        engine.dispose();
        rmSync(path, { force: true });
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
