// GPU paged attention (decode, MLA decode, prefill) and RoPE against independent references: the
// CPU attention kernel (the kvAttention test entry, scalar variant) run on K/V rows gathered here
// from the host copy of the pool through the block tables, and a scalar RoPE loop written here.
// Shapes walk the tile edges: context 1, block size -1/0/+1, several non-contiguous blocks, split
// lengths that do not divide the context, head sizes 64/128 and odd ones, GQA ratios 1/2/4/8/12.
import { expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, Tensor, kernels } from '../../dist/index.js';
import { native } from '../../dist/binding.js';
import { runGpuOp, type GpuBuffer } from '../../dist/cuda/runtime.js';
import {
  gpuKvStore, gpuMlaAttentionDecode, gpuPagedAttentionDecode, gpuPagedAttentionPrefill, gpuRope, type GpuKvDtype,
} from '../../dist/cuda/attention.js';
import { randomF32 } from '../helpers.js';
import { checkQuantised } from './q8-rule.js';
import { describeGpu, gpuBuffers } from './targets.js';

interface HostPool {
  raw: Float32Array | Uint16Array;  // what the device holds
  wide: Float32Array;               // the same values as float32 (exact)
}

async function makePool(count: number, dtype: GpuKvDtype, seed: number): Promise<HostPool> {
  const x = randomF32(count, seed);
  if (dtype === 'f32') return { raw: x, wide: x };
  const type = dtype === 'f16' ? 'float16' : 'bfloat16';
  const raw = (await kernels.cast(new Tensor('float32', x, [count]), type)).data as Uint16Array;
  const wide = (await kernels.cast(new Tensor(type, raw, [count]), 'float32')).data as Float32Array;
  return { raw, wide };
}

// Distinct block ids for every sequence, scattered over the pool (no two sequences share one).
function scatteredTables(blocksPerSeq: number[], numBlocks: number, seed: number): number[][] {
  const ids = Array.from({ length: numBlocks }, (_, i) => i);
  let s = seed;
  for (let i = ids.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) >>> 0;
    const j = s % (i + 1);
    [ids[i], ids[j]] = [ids[j]!, ids[i]!];
  }
  let next = 0;
  return blocksPerSeq.map((n) => ids.slice(next, (next += n)));
}

interface Geometry {
  layers: number;
  layer: number;
  streams: number;
  blockSize: number;
  row: number;
}

/** Rows [0, n) of stream `stream` through the table, as float32. */
function gather(pool: Float32Array, g: Geometry, table: readonly number[], stream: number, n: number): Float32Array {
  const out = new Float32Array(n * g.row);
  const streamElems = g.blockSize * g.row, blockElems = g.layers * g.streams * streamElems;
  for (let p = 0; p < n; p++) {
    const at = table[Math.floor(p / g.blockSize)]! * blockElems + (g.layer * g.streams + stream) * streamElems + (p % g.blockSize) * g.row;
    out.set(pool.subarray(at, at + g.row), p * g.row);
  }
  return out;
}

/** The CPU kernel's normalised attention of q (scaled in, as the CPU kernel takes scale 1/sqrt(dim)). */
async function cpuAttention(q: Float32Array, k: Float32Array, v: Float32Array, dim: number, n: number, scale: number): Promise<Float32Array> {
  // kvAttention uses 1/sqrt(dim); fold the wanted scale into q.
  const qs = q.map((x) => x * scale * Math.sqrt(dim));
  return native().kvAttention(qs, k, v, dim, n, Math.min(16, n), 'f32', 'scalar');
}

function expectClose(got: Float32Array, want: Float32Array | number[], tol: number, what: string): void {
  for (let i = 0; i < want.length; i++) {
    const w = want[i]!, g = got[i]!;
    if (!(Math.abs(g - w) <= tol * Math.max(1, Math.abs(w)))) expect(g, `${what}[${i}] (want ${w})`).toBe(w);
  }
}

interface DecodeCase {
  dtype: GpuKvDtype;
  heads: number;
  kvHeads: number;
  headDim: number;
  blockSize: number;
  lens: number[];
  splitLen?: number;
  layers?: number;
  simt?: boolean;
  tile?: 32 | 64;
}

// 16-bit KV with head sizes of whole 16-byte chunks runs on tensor cores (heads of a KV group as
// the rows of an mma, 16 per block), the rest on the SIMT kernel.
const DECODE: DecodeCase[] = [
  { dtype: 'f32', heads: 4, kvHeads: 4, headDim: 64, blockSize: 16, lens: [1, 15, 16, 17, 50] },
  { dtype: 'f16', heads: 8, kvHeads: 2, headDim: 128, blockSize: 16, lens: [1, 33, 70], splitLen: 32, layers: 2 },
  { dtype: 'bf16', heads: 8, kvHeads: 1, headDim: 80, blockSize: 8, lens: [7, 9, 40], splitLen: 24 },
  { dtype: 'f32', heads: 2, kvHeads: 1, headDim: 33, blockSize: 5, lens: [1, 4, 5, 6, 23], splitLen: 10 },
  { dtype: 'f16', heads: 16, kvHeads: 2, headDim: 256, blockSize: 16, lens: [20, 3] },
  { dtype: 'f16', heads: 12, kvHeads: 1, headDim: 64, blockSize: 32, lens: [31, 65], splitLen: 64 },
  { dtype: 'f32', heads: 4, kvHeads: 1, headDim: 128, blockSize: 16, lens: [600] },  // automatic split-K (3 splits)
  // Tensor cores: contexts at the 64- and 32-position tile edges, splits that cut tiles, the 2..4
  // stage ring wrapping, keys padded to 32 columns (40, 80), 16-head blocks of a larger group (20:
  // 16 + 4), one head per KV head, value rows split over the warps up to 16 n-tiles each (512).
  { dtype: 'f16', heads: 4, kvHeads: 2, headDim: 64, blockSize: 16, lens: [1, 63, 64, 65, 300] },
  { dtype: 'bf16', heads: 4, kvHeads: 2, headDim: 64, blockSize: 16, lens: [1, 31, 32, 33, 200], tile: 32 },
  { dtype: 'f16', heads: 20, kvHeads: 1, headDim: 80, blockSize: 8, lens: [129, 7], splitLen: 40 },
  { dtype: 'bf16', heads: 3, kvHeads: 3, headDim: 40, blockSize: 5, lens: [97, 2], splitLen: 64, tile: 32 },
  { dtype: 'f16', heads: 4, kvHeads: 1, headDim: 512, blockSize: 16, lens: [70] },
  { dtype: 'f16', heads: 8, kvHeads: 2, headDim: 128, blockSize: 16, lens: [600, 1] },  // automatic splits
  { dtype: 'f16', heads: 8, kvHeads: 2, headDim: 128, blockSize: 16, lens: [70, 5], splitLen: 32, simt: true },
  // SIMT staged through shared memory (rows of whole 16-byte chunks): 32-position tiles cut by
  // the split and the length, the ring wrapping over 13 tiles of a split.
  { dtype: 'f32', heads: 12, kvHeads: 3, headDim: 64, blockSize: 16, lens: [417, 17, 32], splitLen: 416 },
  // One split: the fused form still goes through a partial (its output is quantised there).
  { dtype: 'f16', heads: 4, kvHeads: 1, headDim: 64, blockSize: 16, lens: [5, 20], splitLen: 64 },
  { dtype: 'f32', heads: 4, kvHeads: 2, headDim: 32, blockSize: 8, lens: [9, 3], splitLen: 16 },
];

// The SIMT decode is fp32 throughout. The tensor-core one takes q and the probabilities as two
// 16-bit terms each (hi + the rounding error of hi): 22 significant bits in f16, 16 in bf16, so
// bf16 scores carry errors near 2^-17 of their terms' sizes.
function decodeTolerance(dtype: GpuKvDtype, keyDim: number, simt?: boolean): number {
  const mma = !simt && dtype !== 'f32' && keyDim % 8 === 0;
  return !mma ? 2e-5 : dtype === 'f16' ? 2e-5 : 1e-4;
}

interface PrefillCase {
  dtype: GpuKvDtype;
  heads: number;
  kvHeads: number;
  headDim: number;
  blockSize: number;
  seqs: { start: number; tokens: number }[];
  simt?: boolean;
}

const PREFILL: PrefillCase[] = [
  { dtype: 'f16', heads: 4, kvHeads: 2, headDim: 64, blockSize: 16, seqs: [{ start: 0, tokens: 70 }, { start: 5, tokens: 3 }] },
  { dtype: 'f16', heads: 4, kvHeads: 2, headDim: 64, blockSize: 16, seqs: [{ start: 0, tokens: 70 }, { start: 5, tokens: 3 }], simt: true },
  { dtype: 'bf16', heads: 2, kvHeads: 1, headDim: 128, blockSize: 16, seqs: [{ start: 60, tokens: 5 }, { start: 0, tokens: 1 }] },
  { dtype: 'f16', heads: 8, kvHeads: 1, headDim: 96, blockSize: 7, seqs: [{ start: 3, tokens: 66 }] },
  { dtype: 'f32', heads: 4, kvHeads: 1, headDim: 64, blockSize: 16, seqs: [{ start: 0, tokens: 33 }, { start: 10, tokens: 17 }] },
  { dtype: 'f16', heads: 2, kvHeads: 2, headDim: 40, blockSize: 8, seqs: [{ start: 0, tokens: 17 }, { start: 31, tokens: 2 }] },
  { dtype: 'bf16', heads: 2, kvHeads: 1, headDim: 33, blockSize: 4, seqs: [{ start: 1, tokens: 15 }] },
  // Tensor cores: key tiles wholly before a warp's rows (no causal mask) and the 3-stage ring
  // wrapping (5 key tiles for the last query tile), a query tile cut at 140 rows.
  { dtype: 'f16', heads: 2, kvHeads: 1, headDim: 128, blockSize: 16, seqs: [{ start: 100, tokens: 140 }] },
];

describeGpu('GPU paged attention', (t) => {
  const { up, alloc } = gpuBuffers(t);

  // out also quantised for the q8_0 / q4_0 product that reads it (value widths of whole 32-blocks):
  // the bytes by the q8 rule applied to the run's own out, and out as without it (the same bits
  // where that run had several splits; within an ulp or two where one split divided by its sum
  // itself, since the quantised form always goes through the combine).
  async function expectQuantisedOut(run: (b: { out: GpuBuffer; quantized: GpuBuffer }) => Promise<number>,
    want: Float32Array, seqs: number, heads: number, valueDim: number, what: string): Promise<void> {
    if (valueDim % 32) return;
    const count = seqs * heads * valueDim;
    const out = alloc(count * 4), quantized = alloc(count + count / 32 * 4);
    await run({ out, quantized });
    const got = await out.read(new Float32Array(count));
    for (let i = 0; i < count; i++) {
      if (!(Math.abs(got[i]! - want[i]!) <= 2.5e-7 * Math.abs(want[i]!))) expect(got[i], `${what} quantised run, out[${i}]`).toBe(want[i]);
    }
    checkQuantised(got, await quantized.read(new Uint8Array(count + count / 32 * 4)), count, `${what} quantised out`);
  }

  it('decode matches the CPU attention (GQA, block tables, split-K)', async () => {
    for (const [ci, c] of DECODE.entries()) {
      const layers = c.layers ?? 1, layer = layers - 1, streams = 2 * c.kvHeads;
      const blocksPer = c.lens.map((n) => Math.ceil(n / c.blockSize) + 1);  // a spare block past the end
      const numBlocks = blocksPer.reduce((a, b) => a + b, 0) + 3;
      const g: Geometry = { layers, layer, streams, blockSize: c.blockSize, row: c.headDim };
      const pool = await makePool(numBlocks * layers * streams * c.blockSize * c.headDim, c.dtype, 11 + ci);
      const tables = scatteredTables(blocksPer, numBlocks, 5 + ci);
      const n = c.lens.length;
      const q = randomF32(n * c.heads * c.headDim, 100 + ci);
      const [qb, pb, ob] = [await up(q), await up(pool.raw), alloc(n * c.heads * c.headDim * 4)];
      const scale = 1 / Math.sqrt(c.headDim);
      await gpuPagedAttentionDecode(t.id, { q: qb, pool: pb, out: ob },
        { heads: c.heads, kvHeads: c.kvHeads, headDim: c.headDim, numBlocks, blockSize: c.blockSize, dtype: c.dtype, layers, layer },
        { blockTables: tables, seqLens: c.lens }, { splitLen: c.splitLen, simt: c.simt, tile: c.tile });
      const got = await ob.read(new Float32Array(n * c.heads * c.headDim));
      await expectQuantisedOut((o) => gpuPagedAttentionDecode(t.id, { q: qb, pool: pb, ...o },
        { heads: c.heads, kvHeads: c.kvHeads, headDim: c.headDim, numBlocks, blockSize: c.blockSize, dtype: c.dtype, layers, layer },
        { blockTables: tables, seqLens: c.lens }, { splitLen: c.splitLen, simt: c.simt, tile: c.tile }), got, n, c.heads, c.headDim, `decode case ${ci}`);
      const group = c.heads / c.kvHeads, tol = decodeTolerance(c.dtype, c.headDim, c.simt);
      for (let s = 0; s < n; s++) {
        for (let h = 0; h < c.heads; h++) {
          const kvh = Math.floor(h / group);
          const k = gather(pool.wide, g, tables[s]!, kvh, c.lens[s]!), v = gather(pool.wide, g, tables[s]!, c.kvHeads + kvh, c.lens[s]!);
          const at = (s * c.heads + h) * c.headDim;
          const want = await cpuAttention(q.subarray(at, at + c.headDim), k, v, c.headDim, c.lens[s]!, scale);
          expectClose(got.subarray(at, at + c.headDim), want, tol, `decode case ${ci} seq ${s} head ${h}`);
        }
      }
    }
  });

  it('MLA decode over the latent cache matches the CPU attention with the row as key and value', async () => {
    const cases = [
      { dtype: 'f16' as const, heads: 4, kvLora: 512, ropeDim: 64, blockSize: 16, lens: [1, 17, 40], splitLen: undefined },
      { dtype: 'f32' as const, heads: 16, kvLora: 32, ropeDim: 16, blockSize: 16, lens: [16, 47], splitLen: 16 },
      { dtype: 'bf16' as const, heads: 3, kvLora: 30, ropeDim: 6, blockSize: 3, lens: [10], splitLen: 4 },
      // Tensor cores: one latent read for 16 heads per block (20 = 16 + 4), tile edges, the value as
      // the first kvLora columns of the key tile.
      { dtype: 'bf16' as const, heads: 20, kvLora: 32, ropeDim: 16, blockSize: 16, lens: [65, 1, 33], splitLen: undefined, tile: 32 },
      { dtype: 'f16' as const, heads: 16, kvLora: 512, ropeDim: 64, blockSize: 16, lens: [130], splitLen: 64 },
      { dtype: 'f16' as const, heads: 2, kvLora: 64, ropeDim: 8, blockSize: 7, lens: [64, 129], splitLen: 100, simt: true },
    ];
    for (const [ci, c] of cases.entries()) {
      const row = c.kvLora + c.ropeDim;
      const blocksPer = c.lens.map((n) => Math.ceil(n / c.blockSize));
      const numBlocks = blocksPer.reduce((a, b) => a + b, 0) + 2;
      const g: Geometry = { layers: 1, layer: 0, streams: 1, blockSize: c.blockSize, row };
      const pool = await makePool(numBlocks * c.blockSize * row, c.dtype, 31 + ci);
      const tables = scatteredTables(blocksPer, numBlocks, 9 + ci);
      const n = c.lens.length, scale = 0.0625 + ci * 0.01;
      const q = randomF32(n * c.heads * row, 200 + ci);
      const [qb, pb, ob] = [await up(q), await up(pool.raw), alloc(n * c.heads * c.kvLora * 4)];
      await gpuMlaAttentionDecode(t.id, { q: qb, pool: pb, out: ob },
        { heads: c.heads, kvLora: c.kvLora, ropeDim: c.ropeDim, scale, numBlocks, blockSize: c.blockSize, dtype: c.dtype },
        { blockTables: tables, seqLens: c.lens }, { splitLen: c.splitLen, simt: 'simt' in c ? c.simt : undefined, tile: 'tile' in c ? c.tile : undefined });
      const got = await ob.read(new Float32Array(n * c.heads * c.kvLora));
      await expectQuantisedOut((o) => gpuMlaAttentionDecode(t.id, { q: qb, pool: pb, ...o },
        { heads: c.heads, kvLora: c.kvLora, ropeDim: c.ropeDim, scale, numBlocks, blockSize: c.blockSize, dtype: c.dtype },
        { blockTables: tables, seqLens: c.lens }, { splitLen: c.splitLen, simt: 'simt' in c ? c.simt : undefined, tile: 'tile' in c ? c.tile : undefined }),
      got, n, c.heads, c.kvLora, `mla case ${ci}`);
      const tol = decodeTolerance(c.dtype, row, 'simt' in c ? c.simt : undefined);
      for (let s = 0; s < n; s++) {
        const rows = gather(pool.wide, g, tables[s]!, 0, c.lens[s]!);
        for (let h = 0; h < c.heads; h++) {
          const at = (s * c.heads + h) * row;
          const want = await cpuAttention(q.subarray(at, at + row), rows, rows, row, c.lens[s]!, scale);
          const o = (s * c.heads + h) * c.kvLora;
          expectClose(got.subarray(o, o + c.kvLora), want.subarray(0, c.kvLora), tol, `mla case ${ci} seq ${s} head ${h}`);
        }
      }
    }
  });

  it('causal prefill matches the CPU attention row by row (tensor-core and SIMT kernels)', async () => {
    for (const [ci, c] of PREFILL.entries()) {
      const streams = 2 * c.kvHeads;
      const blocksPer = c.seqs.map((s) => Math.ceil((s.start + s.tokens) / c.blockSize));
      const numBlocks = blocksPer.reduce((a, b) => a + b, 0) + 1;
      const g: Geometry = { layers: 1, layer: 0, streams, blockSize: c.blockSize, row: c.headDim };
      const pool = await makePool(numBlocks * streams * c.blockSize * c.headDim, c.dtype, 41 + ci);
      const tables = scatteredTables(blocksPer, numBlocks, 13 + ci);
      const rows = c.seqs.reduce((a, s) => a + s.tokens, 0);
      const q = randomF32(rows * c.heads * c.headDim, 300 + ci);
      const [qb, pb, ob] = [await up(q), await up(pool.raw), alloc(rows * c.heads * c.headDim * 4)];
      await gpuPagedAttentionPrefill(t.id, { q: qb, pool: pb, out: ob },
        { heads: c.heads, kvHeads: c.kvHeads, headDim: c.headDim, numBlocks, blockSize: c.blockSize, dtype: c.dtype },
        c.seqs.map((s, i) => ({ ...s, blockTable: tables[i]! })), { simt: c.simt ?? false });
      const got = await ob.read(new Float32Array(rows * c.heads * c.headDim));
      // Tensor cores take q and the probabilities in the KV's 16-bit type (fp32 sums): f16 keeps
      // 11 bits, bf16 8; the SIMT kernel is fp32 throughout.
      const mma = !c.simt && c.dtype !== 'f32' && [64, 96, 128].includes(c.headDim);
      const tol = !mma ? 2e-5 : c.dtype === 'f16' ? 4e-3 : 3e-2;
      const group = c.heads / c.kvHeads, scale = 1 / Math.sqrt(c.headDim);
      let row0 = 0;
      for (const [s, seq] of c.seqs.entries()) {
        for (let i = 0; i < seq.tokens; i++) {
          const n = seq.start + i + 1;
          for (let h = 0; h < c.heads; h++) {
            const kvh = Math.floor(h / group);
            const k = gather(pool.wide, g, tables[s]!, kvh, n), v = gather(pool.wide, g, tables[s]!, c.kvHeads + kvh, n);
            const at = ((row0 + i) * c.heads + h) * c.headDim;
            const want = await cpuAttention(q.subarray(at, at + c.headDim), k, v, c.headDim, n, scale);
            expectClose(got.subarray(at, at + c.headDim), want, tol, `prefill case ${ci} seq ${s} row ${i} head ${h}`);
          }
        }
        row0 += seq.tokens;
      }
    }
  });

  it('rope rotates as the CPU does (normal, NeoX, strided partial heads, YaRN)', async () => {
    const positions = new Int32Array([0, 1, 17, 1000, 32767]);
    const pb = await up(positions);
    const cases = [
      { heads: 3, dims: 64, neox: false },
      { heads: 3, dims: 64, neox: true, base: 500000, freqScale: 0.25 },
      { heads: 2, dims: 16, neox: true, headStride: 48, offset: 32, rowStride: 100 },
      { heads: 1, dims: 2, neox: false },
      { heads: 2, dims: 64, neox: false, yarn: { extFactor: 1, corrLow: 10.5, corrHigh: 23.25, magnitude: 1 }, freqScale: 1 / 40 },
    ];
    for (const [ci, c] of cases.entries()) {
      const rows = positions.length, hs = c.headStride ?? c.dims, rs = c.rowStride ?? c.heads * hs, off = c.offset ?? 0;
      const x = randomF32(rows * rs + 7, 400 + ci);
      const xb = await up(x);
      await gpuRope(t.id, xb, pb, { rows, heads: c.heads, dims: c.dims, neox: c.neox, base: c.base, freqScale: c.freqScale,
        headStride: c.headStride, rowStride: c.rowStride, offset: c.offset, yarn: c.yarn });
      const got = await xb.read(new Float32Array(x.length));
      const want = Float64Array.from(x), slack = new Float64Array(x.length);
      const base = c.base ?? 10000, fs = c.freqScale ?? 1, f = Math.fround;
      const thetaScale = f(Math.pow(base, f(-2 / c.dims)));
      const half = c.dims / 2;
      for (let r = 0; r < rows; r++) {
        for (let h = 0; h < c.heads; h++) {
          const at = r * rs + h * hs + off;
          let theta = f(positions[r]! * fs), extrap = f(positions[r]!);
          for (let j = 0; j < half; j++) {
            let ang = theta, mag = 1;
            const a = c.neox ? at + j : at + 2 * j, b = c.neox ? at + j + half : at + 2 * j + 1;
            if (c.yarn) {
              // The blended angle is a sum of two fp32 products: a GPU may fuse one into an FMA,
              // which moves the angle by up to an ulp of its size (large at long positions).
              const interp = f(fs * extrap);
              const y = f(f(j - c.yarn.corrLow) / f(Math.max(0.001, c.yarn.corrHigh - c.yarn.corrLow)));
              const mix = f(f(1 - Math.min(1, Math.max(0, y))) * c.yarn.extFactor);
              ang = f(f(interp * f(1 - mix)) + f(extrap * mix));
              mag = c.yarn.magnitude * (1 + 0.1 * Math.log(1 / fs));
              slack[a] = slack[b] = 2 * 2 ** -23 * Math.abs(ang) * (Math.abs(x[a]!) + Math.abs(x[b]!)) * mag;
            }
            const cs = Math.cos(ang) * mag, sn = Math.sin(ang) * mag;
            want[a] = x[a]! * cs - x[b]! * sn;
            want[b] = x[a]! * sn + x[b]! * cs;
            theta = f(theta * thetaScale);
            extrap = f(extrap * thetaScale);
          }
        }
      }
      for (let i = 0; i < x.length; i++)
        if (!(Math.abs(got[i]! - want[i]!) <= 2e-5 * Math.max(1, Math.abs(want[i]!)) + slack[i]!)) expect(got[i], `rope case ${ci}[${i}]`).toBe(want[i]);
    }
  });

  it('kv_store writes new rows into their blocks in the pool dtype, and nothing else', async () => {
    const cases = [
      { dtype: 'f16' as const, kvHeads: 2, headDim: 24, blockSize: 5, layers: 2, layer: 1, mla: false },
      { dtype: 'bf16' as const, kvHeads: 1, headDim: 8, blockSize: 4, layers: 1, layer: 0, mla: false },
      { dtype: 'f32' as const, kvHeads: 1, headDim: 36, blockSize: 3, layers: 3, layer: 2, mla: true },
    ];
    const seqs = [{ start: 0, tokens: 7 }, { start: 4, tokens: 1 }, { start: 9, tokens: 6 }];
    for (const [ci, c] of cases.entries()) {
      const streams = c.mla ? 1 : 2 * c.kvHeads;
      const blocksPer = seqs.map((q) => Math.ceil((q.start + q.tokens) / c.blockSize));
      const numBlocks = blocksPer.reduce((a, b) => a + b, 0) + 2;
      const tables = scatteredTables(blocksPer, numBlocks, 21 + ci);
      const rows = seqs.reduce((a, q) => a + q.tokens, 0), count = rows * c.kvHeads * c.headDim;
      const k = randomF32(count, 500 + ci), v = randomF32(count, 600 + ci);
      const elems = numBlocks * c.layers * streams * c.blockSize * c.headDim;
      const poolb = await up(c.dtype === 'f32' ? new Float32Array(elems).fill(7) : new Uint16Array(elems).fill(0x4700));
      await gpuKvStore(t.id, { k: await up(k), v: c.mla ? undefined : await up(v), pool: poolb },
        { kvHeads: c.kvHeads, headDim: c.headDim, mla: c.mla, numBlocks, blockSize: c.blockSize, dtype: c.dtype, layers: c.layers, layer: c.layer },
        seqs.map((q, i) => ({ ...q, blockTable: tables[i]! })));
      const got = await poolb.read(c.dtype === 'f32' ? new Float32Array(elems) : new Uint16Array(elems));
      const want = c.dtype === 'f32' ? new Float32Array(elems).fill(7) : new Uint16Array(elems).fill(0x4700);
      const conv = async (x: Float32Array) => c.dtype === 'f32' ? x
        : (await kernels.cast(new Tensor('float32', x, [x.length]), c.dtype === 'f16' ? 'float16' : 'bfloat16')).data as Uint16Array;
      const [kc, vc] = [await conv(k), await conv(v)];
      const streamElems = c.blockSize * c.headDim, blockElems = c.layers * streams * streamElems;
      let row0 = 0;
      for (const [s, q] of seqs.entries()) {
        for (let i = 0; i < q.tokens; i++) {
          const pos = q.start + i, base = tables[s]![Math.floor(pos / c.blockSize)]! * blockElems + c.layer * streams * streamElems + (pos % c.blockSize) * c.headDim;
          for (let h = 0; h < c.kvHeads; h++) {
            const src = ((row0 + i) * c.kvHeads + h) * c.headDim;
            want.set(kc.subarray(src, src + c.headDim), base + h * streamElems);
            if (!c.mla) want.set(vc.subarray(src, src + c.headDim), base + (c.kvHeads + h) * streamElems);
          }
        }
        row0 += q.tokens;
      }
      expect(Array.from(got), `kv_store case ${ci}`).toEqual(Array.from(want));
    }
  });

  it('rejects bad input with typed errors naming the parameter; bad device data never faults', async () => {
    const layout = { heads: 4, kvHeads: 2, headDim: 64, numBlocks: 4, blockSize: 16, dtype: 'f16' as const };
    const poolBytes = 4 * 2 * 2 * 16 * 64 * 2;
    const [qb, pb, ob] = [alloc(4 * 64 * 4), alloc(poolBytes), alloc(4 * 64 * 4)];
    await pb.write(new Uint16Array(poolBytes / 2));
    const bufs = { q: qb, pool: pb, out: ob };
    const decode = (shape: object, seqs: object, options: object = {}) =>
      gpuPagedAttentionDecode(t.id, bufs, { ...layout, ...shape } as never, { blockTables: [[0, 1]], seqLens: [20], ...seqs } as never, options as never);
    await expect(decode({}, { blockTables: [[0, 4]] })).rejects.toThrow(InvalidArgumentError);
    await expect(decode({}, { blockTables: [[0, 4]] })).rejects.toThrow(/blockTables\[0\]\[1\]: block id 4 is outside \[0, 4\)/);
    await expect(decode({}, { blockTables: [[-1, 2]] })).rejects.toThrow(/blockTables\[0\]\[0\]: block id -1/);
    await expect(decode({}, { seqLens: [33] })).rejects.toThrow(/seqLens\[0\] must be an integer in \[1, 32\], got 33/);
    await expect(decode({}, { seqLens: [0] })).rejects.toThrow(/seqLens\[0\] must be an integer in \[1, 32\], got 0/);
    await expect(decode({}, { seqLens: [3, 4] })).rejects.toThrow(/blockTables must be an array of 2 block tables/);
    await expect(decode({ kvHeads: 3 }, {})).rejects.toThrow(/heads \(4\) must be a multiple of kvHeads \(3\)/);
    await expect(decode({ dtype: 'f64' }, {})).rejects.toThrow(/dtype must be one of 'f32', 'f16', 'bf16', got "f64"/);
    await expect(decode({ headDim: 128 }, {})).rejects.toThrow(/gpuPagedAttentionDecode: q holds 1024 bytes, needs 2048/);
    await expect(decode({ numBlocks: 5 }, {})).rejects.toThrow(/pool holds 32768 bytes, needs 40960/);
    await expect(decode({ layer: 1 }, {})).rejects.toThrow(/layer must be an integer in \[0, 0\]/);
    await expect(decode({}, {}, { splitlen: 4 })).rejects.toThrow(/unknown option 'splitlen'; did you mean 'splitLen'/);
    await expect(decode({}, {}, { tile: 48 })).rejects.toThrow(/options\.tile must be 32 or 64, got 48/);
    await expect(decode({}, {}, { simt: 1 })).rejects.toThrow(/options\.simt must be a boolean, got 1/);
    await expect(runGpuOp(t.id, 'paged_attention_decode', [qb, pb, await up(new Int32Array([0, 1])), await up(new Int32Array([20])), ob],
      { seqs: 1, heads: 4, kvHeads: 2, headDim: 64, width: 2, numBlocks: 4, blockSize: 16, dtype: 1, tile: 48 })).rejects.toThrow(/tile must be 32 or 64, got 48/);
    await expect(decode({}, {}, { splitLen: 8, reps: 0 }).then(() => 'ran')).resolves.toBe('ran');
    await expect(gpuPagedAttentionPrefill(t.id, bufs, layout, [{ start: 30, tokens: 3, blockTable: [0, 1] }]))
      .rejects.toThrow(/sequences\[0\]\.blockTable: 2 blocks of 16 positions do not cover start \+ tokens = 33/);
    await expect(gpuPagedAttentionPrefill(t.id, bufs, layout, [{ start: 0, tokens: 0, blockTable: [0] }]))
      .rejects.toThrow(/sequences\[0\]\.tokens must be an integer in \[1/);
    await expect(gpuPagedAttentionPrefill(t.id, bufs, { ...layout, headDim: 300 }, [{ start: 0, tokens: 1, blockTable: [0] }]))
      .rejects.toThrow(/headDim must be an integer in \[1, 256\]/);
    await expect(gpuMlaAttentionDecode(t.id, bufs, { heads: 1, kvLora: 512, ropeDim: 128, scale: 1, numBlocks: 1, blockSize: 1, dtype: 'f32' },
      { blockTables: [[0]], seqLens: [1] })).rejects.toThrow(/kvLora \+ ropeDim must be at most 576, got 640/);
    await expect(gpuRope(t.id, qb, pb, { rows: 1, heads: 1, dims: 3 })).rejects.toThrow(/dims must be even, got 3/);
    await expect(gpuKvStore(t.id, { k: qb, v: qb, pool: pb }, { ...layout, kvHeads: 2 }, [{ start: 0, tokens: 2, blockTable: [7] }]))
      .rejects.toThrow(/gpuKvStore: blockTables\[0\]\[0\]: block id 7 is outside \[0, 4\)/);
    await expect(gpuKvStore(t.id, { k: qb, pool: pb }, { ...layout, kvHeads: 2 }, [{ start: 0, tokens: 2, blockTable: [0] }]))
      .rejects.toThrow(/gpuKvStore: v must be a GpuBuffer, got undefined/);
    await expect(gpuRope(t.id, qb, pb, { rows: 4, heads: 5, dims: 64 })).rejects.toThrow(/gpuRope: x holds 1024 bytes, needs 5120/);
    await expect(gpuPagedAttentionDecode(t.id, { ...bufs, out: alloc(512) }, layout, { blockTables: [[0, 1]], seqLens: [20] }))
      .rejects.toThrow(/gpuPagedAttentionDecode: out holds 512 bytes, needs 1024/);
    await expect(gpuPagedAttentionDecode(t.id, { ...bufs, workspace: alloc(16) }, layout, { blockTables: [[0, 1]], seqLens: [20] }, { splitLen: 8 }))
      .rejects.toThrow(/workspace holds 16 bytes, needs 3168/);
    // Outputs that are also another buffer of the call: written while still read.
    await expect(gpuPagedAttentionDecode(t.id, { ...bufs, out: qb }, layout, { blockTables: [[0, 1]], seqLens: [20] }))
      .rejects.toThrow(/gpuPagedAttentionDecode: out and q are the same buffer; out is written and needs its own/);
    await expect(gpuPagedAttentionDecode(t.id, { ...bufs, quantized: ob }, layout, { blockTables: [[0, 1]], seqLens: [20] }))
      .rejects.toThrow(/gpuPagedAttentionDecode: out and quantized are the same buffer; out is written and needs its own/);
    await expect(gpuPagedAttentionDecode(t.id, { ...bufs, workspace: pb }, layout, { blockTables: [[0, 1]], seqLens: [20] }))
      .rejects.toThrow(/workspace and pool are the same buffer/);
    await expect(gpuPagedAttentionPrefill(t.id, { ...bufs, out: qb }, layout, [{ start: 0, tokens: 1, blockTable: [0] }]))
      .rejects.toThrow(/gpuPagedAttentionPrefill: out and q are the same buffer; out is written and needs its own/);
    await expect(gpuRope(t.id, qb, qb, { rows: 1, heads: 1, dims: 64 }))
      .rejects.toThrow(/gpuRope: x and positions are the same buffer; x is written and needs its own/);
    await expect(gpuKvStore(t.id, { k: pb, v: qb, pool: pb }, { ...layout, kvHeads: 2 }, [{ start: 0, tokens: 2, blockTable: [0] }]))
      .rejects.toThrow(/gpuKvStore: pool and k are the same buffer; pool is written and needs its own/);
    await expect(gpuMlaAttentionDecode(t.id, { q: qb, pool: pb, out: pb },
      { heads: 1, kvLora: 32, ropeDim: 0, scale: 1, numBlocks: 1, blockSize: 16, dtype: 'f16' }, { blockTables: [[0]], seqLens: [1] }))
      .rejects.toThrow(/gpuMlaAttentionDecode: out and pool are the same buffer/);
    await expect(gpuPagedAttentionDecode(t.id, { ...bufs, quantized: alloc(8) }, layout, { blockTables: [[0, 1]], seqLens: [20] }))
      .rejects.toThrow(/gpuPagedAttentionDecode: quantized holds 8 bytes, needs 288/);
    await expect(gpuPagedAttentionDecode(t.id, { q: qb, pool: pb, out: ob, quantized: alloc(1024) },
      { ...layout, heads: 2, kvHeads: 2, headDim: 16 } as never, { blockTables: [[0]], seqLens: [1] }))
      .rejects.toThrow(/buffers.quantized needs a value width that is a multiple of 32, got 16/);
    await expect(gpuPagedAttentionDecode(t.id, bufs, { ...layout, scale: NaN }, { blockTables: [[0, 1]], seqLens: [20] }))
      .rejects.toThrow(/scale must be a finite number, got NaN/);
    await expect(gpuPagedAttentionDecode(t.id, bufs, layout, { blockTables: [[]], seqLens: [1] }))
      .rejects.toThrow(/blockTables\[0\] is empty/);
    await expect(gpuPagedAttentionPrefill(t.id, bufs, layout, [{ start: 0, tokens: 2, blockTable: [0] }]))
      .rejects.toThrow(/gpuPagedAttentionPrefill: q holds 1024 bytes, needs 2048/);
    await expect(gpuPagedAttentionPrefill(t.id, bufs, layout, [{ start: 0, tokens: 1, blockTable: [0] }], { simt: 'yes' as never }))
      .rejects.toThrow(/options\.simt must be a boolean/);
    await expect(gpuMlaAttentionDecode(t.id, bufs, { heads: 2, kvLora: 128, ropeDim: 64, scale: 0.1, numBlocks: 1, blockSize: 16, dtype: 'f32' },
      { blockTables: [[0]], seqLens: [3] })).rejects.toThrow(/gpuMlaAttentionDecode: q holds 1024 bytes, needs 1536/);
    await expect(gpuRope(t.id, qb, alloc(8), { rows: 4, heads: 1, dims: 64 })).rejects.toThrow(/gpuRope: positions holds 8 bytes, needs 16/);
    await expect(gpuKvStore(t.id, { k: qb, v: qb, pool: alloc(64) }, { ...layout, kvHeads: 2 }, [{ start: 0, tokens: 2, blockTable: [0] }]))
      .rejects.toThrow(/gpuKvStore: pool holds 64 bytes, needs 32768/);
    const gone = alloc(64);
    gone.dispose();
    await expect(gpuPagedAttentionDecode(t.id, { ...bufs, q: gone }, { ...layout, heads: 2, kvHeads: 2, headDim: 8 } as never,
      { blockTables: [[0]], seqLens: [1] })).rejects.toThrow(DisposedError);

    // The native op checks sizes again; out-of-range ids and lengths that reach it on the device
    // (bypassing lib/cuda) are skipped or clamped, never read out of bounds.
    const params = { seqs: 1, heads: 4, kvHeads: 2, headDim: 64, width: 2, numBlocks: 4, blockSize: 16, dtype: 1 };
    const tb = await up(new Int32Array([1, 99])), lb = await up(new Int32Array([1000]));
    await expect(runGpuOp(t.id, 'paged_attention_decode', [qb, alloc(16), tb, lb, ob], params)).rejects.toThrow(/pool \(buffer 1\) holds 16 bytes/);
    await expect(runGpuOp(t.id, 'paged_attention_decode', [qb, pb, tb, lb, ob], { ...params, dtype: 3 })).rejects.toThrow(/'dtype'/);
    await expect(runGpuOp(t.id, 'paged_attention_decode', [qb, pb, tb, lb, ob], { ...params, splitLen: 4 }))
      .rejects.toThrow(/workspace \(buffer 5\) holds 0 bytes, 8 splits need/);
    await expect(runGpuOp(t.id, 'paged_attention_decode', [qb, pb, tb, lb, ob], { ...params, quantize: 1 }))
      .rejects.toThrow(/quantised out \(buffer 6\) is missing/);
    await expect(runGpuOp(t.id, 'paged_attention_decode', [qb, pb, tb, lb, ob, alloc(16), alloc(288)], { ...params, quantize: 1 }))
      .rejects.toThrow(/the split results need the workspace \(buffer 5\): 1056 bytes per split/);
    await expect(runGpuOp(t.id, 'paged_attention_decode', [qb, pb, tb, lb, ob, alloc(1056), alloc(16)], { ...params, quantize: 1 }))
      .rejects.toThrow(/quantised out \(buffer 6\) holds 16 bytes/);
    await qb.write(new Float32Array(4 * 64).fill(1));
    await pb.write((await kernels.cast(new Tensor('float32', new Float32Array(poolBytes / 2).fill(0.5), [poolBytes / 2]), 'float16')).data as Uint16Array);
    await runGpuOp(t.id, 'paged_attention_decode', [qb, pb, tb, lb, ob], params);
    // Block 1's 16 positions are attended; block 99 is skipped: every value is 0.5.
    expectClose(await ob.read(new Float32Array(4 * 64)), new Array(4 * 64).fill(0.5), 1e-6, 'clamped decode');
    const mb = await up(new Int32Array([0, 1000, 0]));
    await runGpuOp(t.id, 'paged_attention_prefill', [qb, pb, tb, mb, ob], { ...params, rows: 1, maxTokens: 1 });
  });
});
