// Paged attention: decode is bound by the KV bytes it reads (GB/s against the measured read
// ceiling), prefill by the tensor cores (TFLOP/s of the causal QK^T and PV products against the
// bf16 peak). Llama-3-8B's attention shape (32 query heads, 8 KV heads of 128, f16 KV in blocks of
// 16 positions) and deepseek-v2-lite's MLA latent cache (16 heads, 512 + 64), one layer's pool.
import { GpuBuffer } from '../../dist/cuda/runtime.js';
import { timeOp } from './common.js';

const KV = { f32: 0, f16: 1, bf16: 2 };

function uploadInts(id, values) {
  return GpuBuffer.from(id, Int32Array.from(values), 'bench metadata');
}

/** `bytes` of 16-bit values that are finite, positive and varied as f16 (0.125..0.25) and as bf16 alike. */
async function randomPool(id, bytes) {
  const b = GpuBuffer.alloc(id, bytes, 'the bench KV pool');
  const chunk = new Uint16Array(Math.min(bytes / 2, 1 << 22));
  for (let i = 0; i < chunk.length; i++) chunk[i] = 0x3000 + ((i * 2654435761) >>> 22);
  for (let at = 0; at < bytes; at += chunk.byteLength) await b.write(chunk.subarray(0, Math.min(chunk.length, (bytes - at) / 2)), at);
  return b;
}

export async function* attentionCases(env) {
  const { id, emulated, measured, sheet } = env;
  const heads = emulated ? 4 : 32, kvHeads = emulated ? 2 : 8, headDim = 128, blockSize = 16;
  const reps = emulated ? 1 : 20;

  // ---- decode ----
  // [seqs, context, dtype, simt]: the SIMT kernel on one shape as the anchor of the tensor-core one.
  // f32 is the CPU pool's default KV type: the SIMT kernel staged through shared memory.
  const decodeCases = emulated ? [[2, 64, 'f16', true], [2, 64, 'f16'], [1, 300, 'bf16'], [1, 100, 'f32']]
    : [[8, 8192, 'f16', true], [8, 1024, 'f16'], [8, 8192, 'f16'], [8, 8192, 'bf16'], [1, 32768, 'f16'], [8, 32768, 'f16'], [64, 2048, 'f16'],
      [8, 8192, 'f32'], [1, 32768, 'f32']];
  let decodeAnchor;
  for (const [seqs, ctx, dtype, simt] of decodeCases) {
    const blocksPer = Math.ceil(ctx / blockSize), numBlocks = seqs * blocksPer;
    const eb = dtype === 'f32' ? 4 : 2, blockBytes = 2 * kvHeads * blockSize * headDim * eb;
    const pool = dtype === 'f32' ? GpuBuffer.alloc(id, numBlocks * blockBytes) : await randomPool(id, numBlocks * blockBytes);
    if (dtype === 'f32') await pool.write(new Float32Array(pool.bytes / 4).fill(0.25));
    // Each sequence's blocks are every seqs-th block: a table that is not one contiguous run.
    const tables = await uploadInts(id, Array.from({ length: seqs * blocksPer }, (_, i) => (i % blocksPer) * seqs + Math.floor(i / blocksPer)));
    const lens = await uploadInts(id, new Array(seqs).fill(ctx));
    const q = GpuBuffer.alloc(id, seqs * heads * headDim * 4), out = GpuBuffer.alloc(id, seqs * heads * headDim * 4);
    const ws = GpuBuffer.alloc(id, seqs * heads * (headDim + 2) * 4 * Math.ceil(ctx / 256));
    await q.write(new Float32Array(seqs * heads * headDim).fill(0.01));
    const params = { seqs, heads, kvHeads, headDim, width: blocksPer, maxLen: ctx, numBlocks, blockSize, dtype: KV[dtype], simt: simt ? 1 : 0 };
    const ms = await timeOp(id, 'paged_attention_decode', [q, pool, tables, lens, out, ws], params, reps);
    const bytes = seqs * ctx * 2 * kvHeads * headDim * eb;
    const gbps = bytes / ms / 1e6;
    const name = `decode ${dtype} ${simt ? 'simt ' : ''}${seqs}x${ctx} ${heads}/${kvHeads}x${headDim}`;
    if (simt) decodeAnchor = { name, seqs, ctx, ms };
    const anchored = !simt && decodeAnchor && decodeAnchor.seqs === seqs && decodeAnchor.ctx === ctx;
    yield { case: name, ms, gbps, pctOfRead: 100 * gbps / measured.gbps,
      pctOfSheet: sheet ? 100 * gbps / sheet.gbps : undefined, ...(anchored ? { vs: decodeAnchor.name, ratio: decodeAnchor.ms / ms } : {}) };
    for (const b of [pool, tables, lens, q, out, ws]) b.dispose();
  }

  // ---- MLA decode (absorbed, latent cache): every head of a sequence reads its latent rows once ----
  const mlaCases = emulated ? [[1, 40, 2, true], [1, 40, 2]] : [[8, 8192, 16, true], [8, 8192, 16], [1, 32768, 16], [32, 4096, 16], [8, 8192, 128]];
  let mlaAnchor;
  for (const [seqs, ctx, mHeads, simt] of mlaCases) {
    const kvLora = 512, ropeDim = 64, row = kvLora + ropeDim;
    const blocksPer = Math.ceil(ctx / blockSize), numBlocks = seqs * blocksPer;
    const pool = await randomPool(id, numBlocks * blockSize * row * 2);
    const tables = await uploadInts(id, Array.from({ length: numBlocks }, (_, i) => i));
    const lens = await uploadInts(id, new Array(seqs).fill(ctx));
    const q = GpuBuffer.alloc(id, seqs * mHeads * row * 4), out = GpuBuffer.alloc(id, seqs * mHeads * kvLora * 4);
    const ws = GpuBuffer.alloc(id, seqs * mHeads * (kvLora + 2) * 4 * Math.ceil(ctx / 256));
    await q.write(new Float32Array(seqs * mHeads * row).fill(0.01));
    const params = { seqs, heads: mHeads, kvLora, ropeDim, scale: 0.07, width: blocksPer, maxLen: ctx, numBlocks, blockSize, dtype: KV.f16,
      simt: simt ? 1 : 0 };
    const ms = await timeOp(id, 'mla_attention_decode', [q, pool, tables, lens, out, ws], params, reps);
    const gbps = seqs * ctx * row * 2 / ms / 1e6;
    const name = `mla decode f16 ${simt ? 'simt ' : ''}${seqs}x${ctx} ${mHeads}x(${kvLora}+${ropeDim})`;
    if (simt) mlaAnchor = { name, seqs, ctx, mHeads, ms };
    const anchored = !simt && mlaAnchor && mlaAnchor.seqs === seqs && mlaAnchor.ctx === ctx && mlaAnchor.mHeads === mHeads;
    yield { case: name, ms, gbps, pctOfRead: 100 * gbps / measured.gbps, ...(anchored ? { vs: mlaAnchor.name, ratio: mlaAnchor.ms / ms } : {}) };
    for (const b of [pool, tables, lens, q, out, ws]) b.dispose();
  }

  // ---- prefill: one sequence of T new tokens, causal ----
  const tokens = emulated ? 70 : 2048;
  const blocksPer = Math.ceil(tokens / blockSize);
  const q = GpuBuffer.alloc(id, tokens * heads * headDim * 4), out = GpuBuffer.alloc(id, tokens * heads * headDim * 4);
  await q.write(new Float32Array(tokens * heads * headDim).fill(0.01));
  const tables = await uploadInts(id, Array.from({ length: blocksPer }, (_, i) => blocksPer - 1 - i));
  const meta = await uploadInts(id, [0, tokens, 0]);
  // QK^T and PV over the causal triangle: 2 products x 2 flops x head_dim per (query, key) pair seen.
  const flops = 4 * heads * headDim * (tokens * (tokens + 1) / 2);
  let anchorMs;
  for (const [dtype, simt] of [['f16', false], ['bf16', false], ['f16', true], ['f32', true]]) {
    const eb = dtype === 'f32' ? 4 : 2;
    const pool = dtype === 'f32' ? GpuBuffer.alloc(id, blocksPer * 2 * kvHeads * blockSize * headDim * 4)
      : await randomPool(id, blocksPer * 2 * kvHeads * blockSize * headDim * eb);
    if (dtype === 'f32') await pool.write(new Float32Array(pool.bytes / 4).fill(0.25));
    const params = { seqs: 1, rows: tokens, maxTokens: tokens, heads, kvHeads, headDim, width: blocksPer, numBlocks: blocksPer, blockSize,
      dtype: KV[dtype], simt: simt ? 1 : 0 };
    const ms = await timeOp(id, 'paged_attention_prefill', [q, pool, tables, meta, out], params, emulated ? 1 : 10);
    const tflops = flops / ms / 1e9;
    anchorMs ??= ms;
    yield { case: `prefill ${dtype} ${simt ? 'simt' : 'mma'} ${tokens} tokens ${heads}/${kvHeads}x${headDim}`, ms, tflops,
      pctOfPeak: sheet ? 100 * tflops / sheet.bf16 : undefined, pctOfMeasuredMma: measured.mma ? 100 * tflops / measured.mma : undefined,
      vs: 'prefill f16 mma', ratio: anchorMs / ms };
    pool.dispose();
  }
  for (const b of [q, out, tables, meta]) b.dispose();
}
