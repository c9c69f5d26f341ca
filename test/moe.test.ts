import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { AbortError, InvalidArgumentError, Tensor, devices, getThreads, gguf, kernels, setThreads } from '../dist/index.js';
import { randomF32 } from './helpers.js';

const cpu = devices().cpu;
const levels: kernels.QuantVariant[] = ['scalar', ...(cpu.simd !== 'scalar' ? ['avx2' as const] : []),
  ...(cpu.simd === 'avx512' ? ['avx512' as const] : []),
  ...(cpu.simd === 'avx512' && cpu.features.includes('avx512vnni') ? ['avx512vnni' as const] : [])];
const u = 2 ** -24;
type QType = kernels.QuantType;
const isBlock = (t: QType) => t === 'q8_0' || t === 'q4_0';

// ---------------------------------------------------------------------------------------------
// Independent reference: weights decoded from their bytes by the GGUF spec, dense double-precision
// matmuls per token. Block types follow the precision definition (native/kernels/quant/quant.h):
// the activations are first quantised per block of 32 (dx = amax / 127, q = rint(x * 127 / amax),
// in fp32), and since every decoded weight is exact, a double dot product of the dequantised
// activations with the dequantised weights is that definition's value.

function half(h: number): number {
  const e = (h >> 10) & 31;
  const m = h & 1023;
  const s = h & 0x8000 ? -1 : 1;
  return e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
}

function decode(type: QType, bytes: Uint8Array, count: number): Float64Array {
  const out = new Float64Array(count);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (type === 'f32') for (let i = 0; i < count; i++) out[i] = dv.getFloat32(i * 4, true);
  else if (type === 'f16') for (let i = 0; i < count; i++) out[i] = half(dv.getUint16(i * 2, true));
  else if (type === 'bf16') {
    const f = new DataView(new ArrayBuffer(4));
    for (let i = 0; i < count; i++) { f.setUint32(0, dv.getUint16(i * 2, true) << 16, true); out[i] = f.getFloat32(0, true); }
  } else {
    const size = type === 'q8_0' ? 34 : 18;
    for (let b = 0; b < count / 32; b++) {
      const o = b * size;
      const d = half(dv.getUint16(o, true));
      for (let j = 0; j < 32; j++) {
        const q = type === 'q8_0' ? dv.getInt8(o + 2 + j)
          : (j < 16 ? bytes[o + 2 + j]! & 15 : bytes[o + 2 + j - 16]! >> 4) - 8;
        out[b * 32 + j] = q * d;
      }
    }
  }
  return out;
}

function rne(v: number): number {
  const r = Math.round(v);
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * x quantised and dequantised per block of 32 (block weight types), and what the native result may
 * differ by when its x differs from this one by up to dxin[j] per element: `maybeFlips[j]` when the
 * perturbed x[j] * 127 / amax can round to the other integer, `scaleRel` the relative change of
 * a block's scale (amax moves by at most the largest perturbation in the block).
 */
function actQuant(x: ArrayLike<number>, dxin?: ArrayLike<number>): { xq: Float64Array; dx: Float64Array; maybeFlips: Uint8Array; scaleRel: Float64Array } {
  const xq = new Float64Array(x.length);
  const dx = new Float64Array(x.length);
  const maybeFlips = new Uint8Array(x.length);
  const scaleRel = new Float64Array(x.length);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0, dmax = 0;
    for (let j = 0; j < 32; j++) {
      amax = Math.max(amax, Math.abs(Math.fround(x[b * 32 + j]!)));
      dmax = Math.max(dmax, dxin ? dxin[b * 32 + j]! : 0);
    }
    if (amax < 2 ** -120) continue;
    const id = Math.fround(127 / amax);
    const d = Math.fround(amax / 127);
    const ra = dmax / amax + 4 * u;
    for (let j = 0; j < 32; j++) {
      const v = Math.fround(Math.fround(x[b * 32 + j]!) * id);
      xq[b * 32 + j] = rne(v) * d;
      dx[b * 32 + j] = d;
      scaleRel[b * 32 + j] = ra;
      const dv = ((dxin ? dxin[b * 32 + j]! : 0) * 127) / amax + 1.01 * ra * Math.abs(v) + 2 * u * Math.abs(v);
      if (dxin && Math.abs(Math.abs(v - Math.floor(v)) - 0.5) <= dv) maybeFlips[b * 32 + j] = 1;
    }
  }
  return { xq, dx, maybeFlips, scaleRel };
}

interface RefMat { type: QType; rows: number; cols: number; w: Float64Array }

/**
 * y[r] = x . W[r] by the precision definition, and err[r], a bound on how far the native kernels'
 * value may be when their x is within dxin of this x: the fp32 dot product ((K + 2) u sum |x w|,
 * which also covers the block kernels' (8 nb + 4) u), plus for float types the input error carried
 * through |W|, for block types the possible rounding flips and scale change of the quantised x.
 */
function matvec(m: RefMat, x: ArrayLike<number>, dxin?: ArrayLike<number>): { y: Float64Array; err: Float64Array } {
  const block = isBlock(m.type);
  const q = block ? actQuant(x, dxin) : undefined;
  const xq = q ? q.xq : Float64Array.from(x, (v) => Math.fround(v));
  const y = new Float64Array(m.rows);
  const err = new Float64Array(m.rows);
  for (let r = 0; r < m.rows; r++) {
    let s = 0, e = 0;
    for (let j = 0; j < m.cols; j++) {
      const w = m.w[r * m.cols + j]!;
      const t = xq[j]! * w;
      s += t;
      e += (m.cols + 2) * u * Math.abs(t);
      if (q) e += q.scaleRel[j]! * Math.abs(t) + (q.maybeFlips[j] ? q.dx[j]! * Math.abs(w) * 1.01 : 0);
      else if (dxin) e += dxin[j]! * Math.abs(w);
    }
    y[r] = s;
    err[r] = e;
  }
  return { y, err };
}

interface Layer {
  dModel: number; dFf: number; nExperts: number; k: number;
  scoring: 'softmax' | 'sigmoid'; renormalize: boolean; weightScale: number; bias?: Float32Array;
  router: RefMat; gate: RefMat[]; up: RefMat[]; down: RefMat[];
  shared?: { gate: RefMat; up: RefMat; down: RefMat; gateInput?: RefMat };
  spec: kernels.MoeLayerSpec;
}

function quantized(type: QType, rows: number, cols: number, seed: number, scale = 1, values?: Float32Array): { q: kernels.QuantizedWeights; ref: RefMat } {
  const v = values ?? randomF32(rows * cols, seed).map((a) => a * scale);
  const q = kernels.quantizeWeights(new Tensor('float32', v, [rows, cols]), type);
  return { q, ref: { type, rows, cols, w: decode(type, q.data, rows * cols) } };
}

interface LayerOpts {
  dModel?: number; dFf?: number; nExperts?: number; k?: number; type?: QType; routerType?: QType;
  scoring?: 'softmax' | 'sigmoid'; renormalize?: boolean; weightScale?: number; bias?: Float32Array;
  shared?: 'gated' | 'plain'; sharedFf?: number; routerValues?: Float32Array; seed?: number;
}

function makeLayer(o: LayerOpts = {}): Layer {
  const dModel = o.dModel ?? 64, dFf = o.dFf ?? 96, nExperts = o.nExperts ?? 8, k = o.k ?? 2;
  const type = o.type ?? 'f32';
  const seed = o.seed ?? 7;
  // Scales keep activations O(1) through the layer, so the quantisation steps are representative.
  const router = quantized(o.routerType ?? type, nExperts, dModel, seed, 0.5, o.routerValues);
  const gate = [], up = [], down = [];
  for (let e = 0; e < nExperts; e++) {
    gate.push(quantized(type, dFf, dModel, seed + 100 + e, 0.25));
    up.push(quantized(type, dFf, dModel, seed + 200 + e, 0.25));
    down.push(quantized(type, dModel, dFf, seed + 300 + e, 0.2));
  }
  const layer: Layer = {
    dModel, dFf, nExperts, k, scoring: o.scoring ?? 'softmax', renormalize: o.renormalize ?? true,
    weightScale: o.weightScale ?? 1, bias: o.bias,
    router: router.ref, gate: gate.map((g) => g.ref), up: up.map((g) => g.ref), down: down.map((g) => g.ref),
    spec: {
      router: router.q, k, scoring: o.scoring ?? 'softmax', renormalize: o.renormalize ?? true, weightScale: o.weightScale ?? 1,
      selectionBias: o.bias, gate: gate.map((g) => g.q), up: up.map((g) => g.q), down: down.map((g) => g.q),
    },
  };
  if (o.shared) {
    const sf = o.sharedFf ?? 64;
    const sg = quantized(type, sf, dModel, seed + 400, 0.25);
    const su = quantized(type, sf, dModel, seed + 401, 0.25);
    const sd = quantized(type, dModel, sf, seed + 402, 0.2);
    const gi = o.shared === 'gated' ? quantized(type, 1, dModel, seed + 403, 0.5) : undefined;
    layer.shared = { gate: sg.ref, up: su.ref, down: sd.ref, gateInput: gi?.ref };
    layer.spec.shared = { gate: sg.q, up: su.q, down: sd.q, ...(gi ? { gateInput: gi.q } : {}) };
  }
  return layer;
}

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));
const silu = (v: number) => v * sigmoid(v);

/**
 * Routing of one token by llama.cpp's rules, in double; dw bounds the relative error of the fp32
 * weights: a logit error e moves a softmax or sigmoid score by at most 2 e relative, renormalising
 * doubles that, plus the roundings of expf and the sums.
 */
function route(l: Layer, x: ArrayLike<number>): { ids: number[]; w: number[]; p: number[]; dw: number } {
  const { y: logits, err } = matvec(l.router, x);
  let p: number[];
  if (l.scoring === 'sigmoid') p = Array.from(logits, sigmoid);
  else {
    const mx = Math.max(...logits);
    const ex = Array.from(logits, (v) => Math.exp(v - mx));
    const s = ex.reduce((a, b) => a + b, 0);
    p = ex.map((v) => v / s);
  }
  const key = p.map((v, e) => v + (l.bias ? l.bias[e]! : 0));
  const order = key.map((_, e) => e).sort((a, b) => key[b]! - key[a]! || a - b);
  const ids = order.slice(0, l.k);
  let w = ids.map((e) => p[e]!);
  if (l.renormalize) {
    const s = Math.max(w.reduce((a, b) => a + b, 0), 2 ** -14);
    w = w.map((v) => v / s);
  }
  const dw = 2 * (2 * Math.max(...err) + (l.nExperts + 8) * u);
  return { ids, w: w.map((v) => v * l.weightScale), p, dw };
}

/** One SwiGLU feed-forward and the error bound of each output (see matvec). */
function ffn(gate: RefMat, up: RefMat, down: RefMat, x: ArrayLike<number>): { y: Float64Array; err: Float64Array } {
  const g = matvec(gate, x), uu = matvec(up, x);
  const h = g.y.map((v, i) => silu(v) * uu.y[i]!);
  // |silu'| <= 1.1; the SIMD silu is within (4 + |g|) u relative, and the product rounds once more.
  const dh = h.map((v, i) => 1.1 * Math.abs(uu.y[i]!) * g.err[i]! + Math.abs(silu(g.y[i]!)) * uu.err[i]! +
    (6 + Math.abs(g.y[i]!)) * u * Math.abs(v));
  return matvec(down, h, dh);
}

interface RefResult { y: Float64Array; bound: Float64Array; counts: number[]; dropped: number }

/**
 * The naive per-token MoE, and per output the first-order bound of the native result's error
 * (every step's fp32 rounding, carried forward), times 2 for the second-order terms.
 */
function reference(l: Layer, x: Float32Array, tokens: number, capacityFactor = 0): RefResult {
  const d = l.dModel;
  const y = new Float64Array(tokens * d), bound = new Float64Array(tokens * d);
  const counts = new Array<number>(l.nExperts).fill(0);
  const taken = new Array<number>(l.nExperts).fill(0);
  const cap = capacityFactor > 0 ? Math.ceil((capacityFactor * tokens * l.k) / l.nExperts) : Infinity;
  let dropped = 0;
  const terms = l.k + 3;
  for (let t = 0; t < tokens; t++) {
    const xt = x.subarray(t * d, (t + 1) * d);
    const r = route(l, xt);
    for (let j = 0; j < l.k; j++) {
      const e = r.ids[j]!;
      counts[e]!++;
      if (taken[e]! >= cap) { dropped++; continue; }
      taken[e]!++;
      const o = ffn(l.gate[e]!, l.up[e]!, l.down[e]!, xt);
      const w = r.w[j]!;
      for (let i = 0; i < d; i++) {
        y[t * d + i]! += w * o.y[i]!;
        bound[t * d + i]! += 2 * (Math.abs(w) * o.err[i]! + (r.dw + terms * u) * Math.abs(w * o.y[i]!));
      }
    }
    if (l.shared) {
      const s = l.shared;
      const o = ffn(s.gate, s.up, s.down, xt);
      const gi = s.gateInput ? matvec(s.gateInput, xt) : undefined;
      const g = gi ? sigmoid(gi.y[0]!) : 1;
      const dg = gi ? 0.25 * gi.err[0]! + 3 * u * g : 0;
      for (let i = 0; i < d; i++) {
        y[t * d + i]! += g * o.y[i]!;
        bound[t * d + i]! += 2 * (g * o.err[i]! + (dg + terms * u * g) * Math.abs(o.y[i]!));
      }
    }
  }
  return { y, bound, counts, dropped };
}

function expectMoeClose(got: Float32Array, ref: RefResult, what: string): void {
  for (let i = 0; i < got.length; i++) {
    const err = Math.abs(got[i]! - ref.y[i]!);
    if (!(err <= ref.bound[i]! + 1e-30)) {
      throw new Error(`${what}: y[${i}] = ${got[i]} but reference = ${ref.y[i]} (|err| ${err.toExponential(3)} > bound ${ref.bound[i]!.toExponential(3)})`);
    }
  }
}

async function check(l: Layer, tokens: number, what: string, options: kernels.MoeOptions = {}, seed = 3): Promise<kernels.MoeResult> {
  const x = randomF32(tokens * l.dModel, seed);
  const res = await kernels.moe(new Tensor('float32', x, [tokens, l.dModel]), l.spec, options);
  const ref = reference(l, x, tokens, options.capacityFactor ?? 0);
  expect(res.output.dims).toEqual([tokens, l.dModel]);
  expectMoeClose(res.output.data, ref, what);
  expect(res.expertCounts).toEqual(ref.counts);
  expect(res.dropped).toBe(ref.dropped);
  return res;
}

describe('kernels.moe vs a naive per-token reference', () => {
  for (const type of ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'] as const) {
    it(`${type}: 37 tokens, Mixtral routing (softmax, top-2, renormalised)`, async () => {
      await check(makeLayer({ type }), 37, type);
    });
    it(`${type}: a single token (the k expert GEMVs)`, async () => {
      await check(makeLayer({ type }), 1, type);
    });
  }

  it('k = 1 and k = E', async () => {
    await check(makeLayer({ k: 1 }), 37, 'k=1');
    await check(makeLayer({ k: 8, type: 'q8_0' }), 37, 'k=E');
    await check(makeLayer({ k: 5, nExperts: 5, dFf: 32, renormalize: false }), 3, 'k=E=5');
  });

  it('qwen2moe: no renormalisation, a shared expert with its sigmoid gate', async () => {
    for (const type of ['f32', 'q8_0', 'q4_0'] as const) {
      await check(makeLayer({ type, k: 4, nExperts: 6, renormalize: false, shared: 'gated' }), 37, `${type} shared gated`);
      await check(makeLayer({ type, renormalize: false, shared: 'gated' }), 1, `${type} shared gated, 1 token`);
    }
    await check(makeLayer({ shared: 'plain', sharedFf: 96 }), 13, 'shared, no gate');
  });

  it('sigmoid scoring, with and without renormalisation, weight scale and selection bias', async () => {
    await check(makeLayer({ scoring: 'sigmoid', renormalize: false }), 37, 'sigmoid');
    await check(makeLayer({ scoring: 'sigmoid', renormalize: true, weightScale: 2.5 }), 37, 'sigmoid renorm scaled');
    const bias = Float32Array.from({ length: 8 }, (_, e) => (e === 6 ? 10 : 0));
    const res = await check(makeLayer({ scoring: 'sigmoid', bias, type: 'f16' }), 37, 'sigmoid biased');
    // The bias forces expert 6 into every token's choice.
    expect(res.expertCounts[6]).toBe(37);
  });

  it('all tokens to one expert, experts with no tokens, ties to the lower index', async () => {
    // Router rows 0 except row 3; x > 0 makes expert 3 the first choice of every token and leaves
    // the others tied at logit 0, so the second choice is expert 0.
    const routerValues = new Float32Array(8 * 64);
    routerValues.fill(0.05, 3 * 64, 4 * 64);
    for (const type of ['f32', 'q8_0'] as const) {
      const l = makeLayer({ type, routerValues });
      const x = randomF32(37 * 64, 5).map(Math.abs);
      const res = await kernels.moe(new Tensor('float32', x, [37, 64]), l.spec);
      const ref = reference(l, x, 37);
      expectMoeClose(res.output.data, ref, `${type} one expert`);
      expect(res.expertCounts).toEqual([37, 0, 0, 37, 0, 0, 0, 0]);
      const k1 = makeLayer({ type, routerValues, k: 1 });
      const r1 = await kernels.moe(new Tensor('float32', x, [37, 64]), k1.spec);
      expectMoeClose(r1.output.data, reference(k1, x, 37), `${type} one expert, k=1`);
      expect(r1.expertCounts).toEqual([0, 0, 0, 37, 0, 0, 0, 0]);
    }
  });

  it('capacity overflow drops to the residual, in token order', async () => {
    const routerValues = new Float32Array(8 * 64);
    routerValues.fill(0.05, 3 * 64, 4 * 64);
    const l = makeLayer({ routerValues });
    const x = randomF32(37 * 64, 5).map(Math.abs);
    const xt = new Tensor('float32', x, [37, 64]);
    // capacity = ceil(0.5 * 37 * 2 / 8) = 5 rows per expert: tokens 5.. get nothing.
    const res = await kernels.moe(xt, l.spec, { capacityFactor: 0.5 });
    const ref = reference(l, x, 37, 0.5);
    expectMoeClose(res.output.data, ref, 'capacity');
    expect(res.dropped).toBe(64);
    expect(res.expertCounts).toEqual([37, 0, 0, 37, 0, 0, 0, 0]);
    expect(Array.from(res.output.data.subarray(5 * 64)).every((v) => v === 0)).toBe(true);
    expect(res.output.data.subarray(0, 5 * 64).some((v) => v !== 0)).toBe(true);
    // A capacity that no expert reaches changes nothing.
    const big = await kernels.moe(xt, l.spec, { capacityFactor: 4 });
    expect(big.dropped).toBe(0);
    expect(big.output.data).toEqual((await kernels.moe(xt, l.spec)).output.data);
    // Random routing with a tight capacity.
    await check(makeLayer({ type: 'q4_0' }), 37, 'capacity q4_0', { capacityFactor: 0.75 });
  });

  it('every SIMD variant (and the reference) against the naive reference, on odd sizes', async () => {
    for (const variant of [...levels, 'reference'] as const) {
      for (const type of ['f32', 'f16', 'q8_0', 'q4_0'] as const) {
        const l = makeLayer({ type, dModel: 96, dFf: isBlock(type) ? 160 : 37, nExperts: 7, k: 3, shared: 'gated', sharedFf: isBlock(type) ? 32 : 19 });
        for (const tokens of [1, 2, 37]) await check(l, tokens, `${variant} ${type} tokens=${tokens}`, { variant });
      }
    }
  });

  it('the SIMD variants agree with the scalar variant', async () => {
    const l = makeLayer({ type: 'f32', dModel: 40, dFf: 23, nExperts: 5, k: 2 });
    const x = new Tensor('float32', randomF32(37 * 40, 9), [37, 40]);
    const scalar = await kernels.moe(x, l.spec, { variant: 'scalar' });
    const ref = reference(l, x.data, 37);
    for (const variant of levels) {
      const r = await kernels.moe(x, l.spec, { variant });
      expect(r.expertCounts).toEqual(scalar.expertCounts);
      for (let i = 0; i < r.output.data.length; i++) {
        // Both within the bound of the reference, so within twice the bound of each other.
        expect(Math.abs(r.output.data[i]! - scalar.output.data[i]!)).toBeLessThanOrEqual(2 * ref.bound[i]!);
      }
    }
  });

  it('threads: big groups over all threads and small ones side by side give the reference result', async () => {
    // A skewed router (expert 2 favoured by a selection bias) gives one group above a thread's
    // share of the rows (run alone over every thread) and many small ones (one expert per thread).
    const bias = Float32Array.from({ length: 16 }, (_, e) => (e === 2 ? 1 : 0));
    const l = makeLayer({ type: 'q8_0', nExperts: 16, k: 2, bias, shared: 'gated' });
    const x = randomF32(64 * 64, 11);
    const ref = reference(l, x, 64);
    expect(ref.counts[2]).toBe(64);
    const before = getThreads();
    setThreads(8);
    try {
      for (const threads of [1, 3, 8]) {
        for (const tokens of [64, 1]) {
          const r = await kernels.moe(new Tensor('float32', x.subarray(0, tokens * 64), [tokens, 64]), l.spec, { threads });
          expectMoeClose(r.output.data, tokens === 64 ? ref : reference(l, x.subarray(0, 64), 1), `threads=${threads} tokens=${tokens}`);
        }
      }
    } finally {
      setThreads(before);
    }
  });

  it('mixed weight types in one layer (router f32, gate f16, up q8_0, down q4_0, shared bf16)', async () => {
    const base = makeLayer({ type: 'f16', routerType: 'f32', shared: 'gated' });
    const q8 = makeLayer({ type: 'q8_0', seed: 21 });
    const q4 = makeLayer({ type: 'q4_0', seed: 22 });
    const bf = makeLayer({ type: 'bf16', seed: 23, shared: 'gated' });
    const l: Layer = {
      ...base, up: q8.up, down: q4.down, shared: bf.shared,
      spec: { ...base.spec, up: q8.spec.up, down: q4.spec.down, shared: bf.spec.shared },
    };
    for (const tokens of [1, 37]) await check(l, tokens, `mixed tokens=${tokens}`);
  });

  it('NaN in x: NaN outputs for that token only, valid expert ids, no crash', async () => {
    const l = makeLayer({ type: 'q8_0', shared: 'gated' });
    const x = randomF32(5 * 64, 8);
    x[2 * 64 + 7] = NaN;
    const r = await kernels.moe(new Tensor('float32', x, [5, 64]), l.spec);
    expect(r.expertCounts.reduce((a, b) => a + b, 0)).toBe(5 * 2);
    for (let t = 0; t < 5; t++) {
      const row = r.output.data.subarray(t * 64, (t + 1) * 64);
      expect(row.some((v) => Number.isNaN(v))).toBe(t === 2);
    }
    const route = await kernels.moeRoute(new Tensor('float32', x, [5, 64]), l.spec);
    for (const e of route.experts.data) expect(e >= 0 && e < 8).toBe(true);
    // The other tokens are as without the NaN.
    const clean = x.slice();
    clean[2 * 64 + 7] = 0;
    const ref = reference(l, clean, 5);
    for (const t of [0, 1, 3, 4]) {
      for (let i = 0; i < 64; i++) {
        expect(Math.abs(r.output.data[t * 64 + i]! - ref.y[t * 64 + i]!)).toBeLessThanOrEqual(ref.bound[t * 64 + i]!);
      }
    }
  });

  it('a 1-D x is one token', async () => {
    const l = makeLayer();
    const x = randomF32(64, 4);
    const r = await kernels.moe(new Tensor('float32', x, [64]), l.spec);
    expect(r.output.dims).toEqual([64]);
    expectMoeClose(r.output.data, reference(l, x, 1), '1-D');
  });

  it('reads stacked expert tensors from a mapped GGUF file', async () => {
    for (const type of ['f16', 'q8_0'] as const) {
      const l = makeLayer({ type, nExperts: 4, k: 2, renormalize: false, shared: 'gated' });
      const cat = (qs: readonly kernels.QuantizedWeights[]) => {
        const out = new Uint8Array(qs.reduce((a, q) => a + q.bytes, 0));
        let at = 0;
        for (const q of qs) { out.set(q.data, at); at += q.bytes; }
        return out;
      };
      const s = l.spec;
      const sh = s.shared!;
      const q = (w: kernels.MoeMatrix) => w as kernels.QuantizedWeights;
      const path = join(mkdtempSync(join(tmpdir(), 'sonde-moe-')), 'moe.gguf');
      await gguf.write(path, {
        tensors: [
          { name: 'blk.0.ffn_gate_inp.weight', dims: [64, 4], type, data: q(s.router).data },
          { name: 'blk.0.ffn_gate_exps.weight', dims: [64, 96, 4], type, data: cat(s.gate as kernels.QuantizedWeights[]) },
          { name: 'blk.0.ffn_up_exps.weight', dims: [64, 96, 4], type, data: cat(s.up as kernels.QuantizedWeights[]) },
          { name: 'blk.0.ffn_down_exps.weight', dims: [96, 64, 4], type, data: cat(s.down as kernels.QuantizedWeights[]) },
          { name: 'blk.0.ffn_gate_shexp.weight', dims: [64, 64], type, data: q(sh.gate).data },
          { name: 'blk.0.ffn_up_shexp.weight', dims: [64, 64], type, data: q(sh.up).data },
          { name: 'blk.0.ffn_down_shexp.weight', dims: [64, 64], type, data: q(sh.down).data },
          { name: 'blk.0.ffn_gate_inp_shexp.weight', dims: [64], type, data: q(sh.gateInput!).data },
        ],
      });
      await using f = await gguf.read(path);
      const t = (name: string) => f.tensor(`blk.0.${name}.weight`)!;
      const spec: kernels.MoeLayerSpec = {
        router: t('ffn_gate_inp'), k: 2, renormalize: false, gate: t('ffn_gate_exps'), up: t('ffn_up_exps'), down: t('ffn_down_exps'),
        shared: { gate: t('ffn_gate_shexp'), up: t('ffn_up_shexp'), down: t('ffn_down_shexp'), gateInput: t('ffn_gate_inp_shexp') },
      };
      const x = randomF32(9 * 64, 12);
      const r = await kernels.moe(new Tensor('float32', x, [9, 64]), spec);
      expectMoeClose(r.output.data, reference(l, x, 9), `gguf ${type}`);
    }
  });
});

describe('kernels.moeRoute', () => {
  it('matches the reference routing', async () => {
    for (const scoring of ['softmax', 'sigmoid'] as const) {
      const l = makeLayer({ scoring, k: 3, renormalize: scoring === 'softmax', type: 'q8_0' });
      const x = randomF32(37 * 64, 6);
      const r = await kernels.moeRoute(new Tensor('float32', x, [37, 64]), l.spec);
      expect(r.experts.dims).toEqual([37, 3]);
      expect(r.scores.dims).toEqual([37, 8]);
      const counts = new Array<number>(8).fill(0);
      for (let t = 0; t < 37; t++) {
        const ref = route(l, x.subarray(t * 64, (t + 1) * 64));
        expect(Array.from(r.experts.data.subarray(t * 3, t * 3 + 3))).toEqual(ref.ids);
        for (let j = 0; j < 3; j++) expect(r.weights.data[t * 3 + j]).toBeCloseTo(ref.w[j]!, 5);
        for (let e = 0; e < 8; e++) expect(r.scores.data[t * 8 + e]).toBeCloseTo(ref.p[e]!, 5);
        for (const e of ref.ids) counts[e]!++;
      }
      expect(r.expertCounts).toEqual(counts);
    }
  });
});

describe('kernels.moe: invalid input gives typed errors', () => {
  const l = makeLayer({ nExperts: 4, dFf: 32 });
  const x = new Tensor('float32', randomF32(3 * 64, 1), [3, 64]);
  const cases: [string, () => Promise<unknown>, RegExp][] = [
    ['k = 0', () => kernels.moe(x, { ...l.spec, k: 0 }), /layer\.k/],
    ['k > E', () => kernels.moe(x, { ...l.spec, k: 5 }), /layer\.k/],
    ['x of the wrong width', () => kernels.moe(new Tensor('float32', new Float32Array(3 * 32), [3, 32]), l.spec), /dModel = 32/],
    ['x 3-D', () => kernels.moe(new Tensor('float32', new Float32Array(64), [1, 1, 64]), l.spec), /x\) must be/],
    ['x not a tensor', () => kernels.moe(new Float32Array(64) as unknown as Tensor<'float32'>, l.spec), /x/],
    ['expert count mismatch', () => kernels.moe(x, { ...l.spec, up: (l.spec.up as kernels.QuantizedWeights[]).slice(1) }), /layer\.up holds 3 experts/],
    ['experts of different shapes', () => kernels.moe(x, { ...l.spec, gate: [...(l.spec.gate as kernels.QuantizedWeights[]).slice(1), kernels.quantizeWeights(new Tensor('float32', new Float32Array(16 * 64), [16, 64]), 'f32')] }), /every expert must match/],
    ['down of the wrong shape', () => kernels.moe(x, { ...l.spec, down: l.spec.gate }), /layer\.down/],
    ['no gate', () => kernels.moe(x, { ...l.spec, gate: undefined as unknown as kernels.MoeExperts }), /layer\.gate/],
    ['bad scoring', () => kernels.moe(x, { ...l.spec, scoring: 'softmin' as 'softmax' }), /layer\.scoring/],
    ['weightScale NaN', () => kernels.moe(x, { ...l.spec, weightScale: NaN }), /weightScale/],
    ['selectionBias length', () => kernels.moe(x, { ...l.spec, selectionBias: new Float32Array(3) }), /selectionBias/],
    ['capacityFactor < 0', () => kernels.moe(x, l.spec, { capacityFactor: -1 }), /capacityFactor/],
    ['misspelled option', () => kernels.moe(x, l.spec, { capacityFacter: 1 } as kernels.MoeOptions), /capacityFactor/],
    ['unknown variant', () => kernels.moe(x, l.spec, { variant: 'avx9' as 'avx2' }), /variant/],
    ['threads 0', () => kernels.moe(x, l.spec, { threads: 0 }), /threads/],
    ['shared gate of the wrong shape', () => kernels.moe(x, { ...l.spec, shared: { gate: l.spec.router, up: l.spec.router, down: l.spec.router } }), /layer\.shared\.down/],
  ];
  for (const [name, fn, msg] of cases) {
    it(name, async () => {
      const err = await fn().then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect((err as Error).message).toMatch(msg);
    });
  }

  it('moeRoute: k out of range, bad router', async () => {
    await expect(kernels.moeRoute(x, { router: l.router as never, k: 1 })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(kernels.moeRoute(x, { router: l.spec.router, k: 9 })).rejects.toThrow(/layer\.k/);
  });

  it('an abort while the experts run rejects with AbortError and the kernel stays usable', async () => {
    // 2048 tokens through 8 experts of 512 x 1024 in the exact 'reference' variant: seconds of work,
    // so an abort 20 ms in lands mid-run (cancellation is checked at every task hand-out).
    const big = makeLayer({ dModel: 512, dFf: 1024, nExperts: 8, k: 2 });
    const xs = new Tensor('float32', randomF32(2048 * 512, 2), [2048, 512]);
    const ac = new AbortController();
    // Timed from the abort, not from the call: the first call's setup (fresh pages for the gathered
    // experts and the scratch) is not what is checked, and a loaded machine can stretch it.
    let abortedAt = Infinity;
    setTimeout(() => { abortedAt = performance.now(); ac.abort(); }, 20);
    await expect(kernels.moe(xs, big.spec, { signal: ac.signal, variant: 'reference' })).rejects.toBeInstanceOf(AbortError);
    expect(performance.now() - abortedAt).toBeLessThan(1500);
    await check(l, 3, 'after a mid-run abort');
  });

  it('an aborted signal rejects with AbortError and the kernel stays usable', async () => {
    const ac = new AbortController();
    ac.abort();
    await expect(kernels.moe(x, l.spec, { signal: ac.signal })).rejects.toBeInstanceOf(AbortError);
    await check(l, 3, 'after abort');
  });
});

describe('kernels.moe in worker_threads', () => {
  it('workers compute what the main thread computes from a mapped GGUF; terminating them mid-run is safe', async () => {
    const [d, f, e] = [128, 256, 8];
    const path = join(mkdtempSync(join(tmpdir(), 'sonde-moew-')), 'moe.gguf');
    await gguf.write(path, {
      tensors: [
        { name: 'blk.0.ffn_gate_inp.weight', dims: [d, e], type: 'f32', data: randomF32(d * e, 1) },
        { name: 'blk.0.ffn_gate_exps.weight', dims: [d, f, e], type: 'q8_0', data: randomF32(d * f * e, 2).map((v) => v / 8) },
        { name: 'blk.0.ffn_up_exps.weight', dims: [d, f, e], type: 'q4_0', data: randomF32(d * f * e, 3).map((v) => v / 8) },
        { name: 'blk.0.ffn_down_exps.weight', dims: [f, d, e], type: 'f16', data: randomF32(d * f * e, 4).map((v) => v / 12) },
      ],
    });
    await using file = await gguf.read(path);
    const t = (name: string) => file.tensor(`blk.0.${name}.weight`)!;
    const layer: kernels.MoeLayerSpec = { router: t('ffn_gate_inp'), k: 2, renormalize: true, gate: t('ffn_gate_exps'), up: t('ffn_up_exps'), down: t('ffn_down_exps') };
    const tokens = 19;
    const x = new Tensor('float32', Float32Array.from({ length: tokens * d }, (_, i) => Math.cos(i)), [tokens, d]);
    const want = (await kernels.moe(x, layer)).output.data.reduce((s, v) => s + v, 0);
    const script = new URL('./fixtures/worker-moe.mjs', import.meta.url);
    const run = (repeat: number) => {
      const worker = new Worker(script, { workerData: { path, d, tokens, repeat } });
      const result = new Promise<{ sum: number }>((resolve, reject) => {
        worker.once('message', resolve);
        worker.once('error', reject);
        worker.once('exit', (code) => reject(new Error(`worker exited with ${code}`)));
      });
      return { worker, result };
    };
    const runs = [0, 1].map(() => run(3));
    for (const r of runs) expect((await r.result).sum).toBe(want);
    await Promise.all(runs.map((r) => r.worker.terminate()));
    for (let i = 0; i < 6; i++) {
      const r = run(100000);
      r.result.catch(() => {});
      await new Promise((res) => setTimeout(res, 20 + ((i * 37) % 120)));
      await r.worker.terminate();
    }
    expect((await kernels.moe(x, layer)).output.data.reduce((s, v) => s + v, 0)).toBe(want);
  });
});
