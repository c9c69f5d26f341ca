// GPU MoE dispatch against independent references: the CPU MoE (sonde.kernels.moe / moeRoute,
// themselves tested against scalar double loops in test/moe.test.ts), and scalar loops written here
// for the dispatch permutation and the grouped GEMMs. Shapes walk the tile edges: 1 token, group
// sizes 63/64/65 around the 64-row tile, output widths around the 64-column tile, reduction
// lengths below/at/above the 32 (tensor-core) and 16 (SIMT) k steps, odd sizes that take the
// unaligned load path, experts that receive no tokens, k = 1 and k = nExperts.
//
// Every GEMM kernel runs forced ('tensor', 'simt', 'gemv'), and 'auto' where it picks them.
// Tolerances: fp32 products (the 'simt' and 'gemv' kernels) differ from the CPU only in summation
// order, so 3e-5 of the row's largest value. The tensor-core path rounds its
// activations to bf16 (relative 2^-9 per element): x is made bf16-exact here, so only h = silu(g) * u
// is rounded before the down GEMM; 2^-6 of the row's largest value is 8x the error a random-sign
// sum of such roundings reaches, and a wrong fragment layout or a lost tile is O(1) of it.
import { expect, it } from 'vitest';
import { DisposedError, InvalidArgumentError, Tensor, kernels } from '../../dist/index.js';
import { runGpuOp, type GpuBuffer } from '../../dist/cuda/runtime.js';
import {
  gpuMoe, gpuMoeCombine, gpuMoeDispatch, gpuMoeDown, gpuMoeGateUp, gpuMoeRoute, gpuMoeWorkspaceBytes,
  type GpuMoeLayer, type GpuMoeWeightType,
} from '../../dist/cuda/moe.js';
import { randomF32 } from '../helpers.js';
import { describeGpu, gpuBuffers } from './targets.js';

/** Rounds to the nearest bf16 value (ties to even), kept as float32. */
function bf16Exact(a: Float32Array): Float32Array {
  const out = new Float32Array(a.length);
  const u = new Uint32Array(out.buffer);
  const src = new Uint32Array(a.buffer, a.byteOffset, a.length);
  for (let i = 0; i < a.length; i++) u[i] = ((src[i]! + 0x7fff + ((src[i]! >>> 16) & 1)) >>> 16 << 16) >>> 0;
  return out;
}

/** Row-major float32 [rows, cols] as the weight type's bytes (bf16 through the CPU encoder). */
function encode(type: GpuMoeWeightType, data: Float32Array, rows: number, cols: number): kernels.QuantizedWeights {
  return kernels.quantizeWeights(new Tensor('float32', data, [rows, cols]), type);
}

function stack(list: kernels.QuantizedWeights[]): Uint8Array {
  const out = new Uint8Array(list.reduce((s, q) => s + q.data.byteLength, 0));
  let at = 0;
  for (const q of list) {
    out.set(q.data, at);
    at += q.data.byteLength;
  }
  return out;
}

/** max |a - b| per row over the row's largest |b|, checked against rel; names the first failure. */
function expectRowsClose(got: Float32Array, want: Float32Array, rows: number, cols: number, rel: number, what: string): void {
  for (let r = 0; r < rows; r++) {
    let scale = 1e-30;
    for (let c = 0; c < cols; c++) scale = Math.max(scale, Math.abs(want[r * cols + c]!));
    for (let c = 0; c < cols; c++) {
      const g = got[r * cols + c]!, w = want[r * cols + c]!;
      if (!(Math.abs(g - w) <= rel * scale)) expect(g, `${what}: row ${r} col ${c} (row max ${scale})`).toBe(w);
    }
  }
}

interface Case {
  tokens: number;
  nExperts: number;
  k: number;
  dModel: number;
  dFf: number;
  scoring?: 'softmax' | 'sigmoid';
  renormalize?: boolean;
  weightScale?: number;
  bias?: boolean;
  groups?: number;
  groupsUsed?: number;
  capacityFactor?: number;
  /** Every token to experts 0..k-1 (a selection bias of 10): groups at the 64-row tile's edges. */
  skew?: boolean;
}

describeGpu('GPU MoE dispatch', (t) => {
  const buffers = gpuBuffers(t);
  const up = buffers.up;
  // A zero-byte request still gets a buffer of its own (4 bytes), so no two arguments alias.
  const alloc = (bytes: number) => buffers.alloc(Math.max(bytes, 4));

  // A layer's weights on both sides: QuantizedWeights for the CPU, stacked bytes on the device.
  async function layerOf(c: Case, type: GpuMoeWeightType, seed: number) {
    const { nExperts: e, dModel: d, dFf: f } = c;
    const router = randomF32(e * d, seed).map((v) => v * 2);
    const gate = [], upW = [], down = [];
    for (let x = 0; x < e; x++) {
      gate.push(encode(type, randomF32(f * d, seed + 10 + x).map((v) => v * 0.5), f, d));
      upW.push(encode(type, randomF32(f * d, seed + 100 + x).map((v) => v * 0.5), f, d));
      down.push(encode(type, randomF32(d * f, seed + 200 + x).map((v) => v * 0.5), d, f));
    }
    const bias = c.skew ? Float32Array.from({ length: e }, (_, x) => (x < c.k ? 10 : 0))
      : c.bias ? randomF32(e, seed + 7).map((v) => v * 0.05) : undefined;
    const routerQ = encode('f32', router, e, d);
    const cpu = {
      router: routerQ, k: c.k, scoring: c.scoring, renormalize: c.renormalize, weightScale: c.weightScale,
      selectionBias: bias, groups: c.groups, groupsUsed: c.groupsUsed, gate, up: upW, down,
    };
    const gpu: GpuMoeLayer = {
      nExperts: e, k: c.k, dModel: d, dFf: f, weightType: type, scoring: c.scoring, renormalize: c.renormalize,
      weightScale: c.weightScale, groups: c.groups, groupsUsed: c.groupsUsed,
      selectionBias: bias ? await up(bias) : undefined,
      router: await up(routerQ.data), gate: await up(stack(gate)), up: await up(stack(upW)), down: await up(stack(down)),
    };
    return { cpu, gpu };
  }

  const CASES: Case[] = [
    { tokens: 1, nExperts: 4, k: 2, dModel: 24, dFf: 40, renormalize: true },  // decode
    { tokens: 37, nExperts: 8, k: 2, dModel: 40, dFf: 72, renormalize: true },  // Mixtral-like; K tails of 8
    { tokens: 3, nExperts: 8, k: 1, dModel: 16, dFf: 33 },  // k = 1, most experts get nothing
    { tokens: 5, nExperts: 4, k: 4, dModel: 33, dFf: 17, scoring: 'sigmoid' },  // k = E, odd (unaligned) sizes
    { tokens: 65, nExperts: 3, k: 1, dModel: 32, dFf: 64, skew: true },  // one group of 65 rows (tile + 1)
    { tokens: 64, nExperts: 5, k: 2, dModel: 48, dFf: 65, skew: true, weightScale: 2.5 },  // groups of exactly 64
    { tokens: 63, nExperts: 4, k: 1, dModel: 31, dFf: 63, skew: true },  // a group of 63
    { tokens: 21, nExperts: 16, k: 3, dModel: 40, dFf: 24, scoring: 'sigmoid', renormalize: true, bias: true,
      groups: 4, groupsUsed: 2, weightScale: 1.5 },  // DeepSeek-V3-style routing
    { tokens: 2, nExperts: 3, k: 2, dModel: 264, dFf: 40 },  // gate/up K past gemv's 256-wide step
    { tokens: 4, nExperts: 2, k: 1, dModel: 24, dFf: 520 },  // down K of two 256 steps and a tail
  ];

  const KERNELS = [['f32', 'simt'], ['f32', 'gemv'], ['bf16', 'tensor'], ['bf16', 'simt'], ['bf16', 'gemv']] as const;
  for (const [type, kernel] of KERNELS) {
    it(`a whole layer against kernels.moe: ${type} weights, ${kernel} kernel`, async () => {
      let seed = 1;
      for (const c of CASES) {
        seed += 1000;
        // gemv's tile is 8 rows: the cases of a few rows per expert, and 37 tokens (groups of ~9),
        // cover its edges; the emulator takes long over the 64-row groups with it.
        if (kernel === 'gemv' && c.tokens * c.k > 8 * c.nExperts && c.tokens !== 37) continue;
        // bf16 on the SIMT tiles differs from f32 only in how a weight is widened: its 64-row edges.
        if (type === 'bf16' && kernel === 'simt' && !c.skew && c.tokens !== 37) continue;
        const { cpu, gpu } = await layerOf(c, type, seed);
        const x = bf16Exact(randomF32(c.tokens * c.dModel, seed));
        const want = await kernels.moe(new Tensor('float32', x, [c.tokens, c.dModel]), cpu);
        const xb = await up(x), yb = alloc(c.tokens * c.dModel * 4);
        const res = await gpuMoe(t.id, xb, c.tokens, gpu, yb, { kernel });
        const what = `${type} ${kernel} ${JSON.stringify(c)}`;
        expect(res.expertCounts, what).toEqual(want.expertCounts);
        expect(res.dropped).toBe(0);
        const got = await yb.read(new Float32Array(c.tokens * c.dModel));
        expectRowsClose(got, want.output.data as Float32Array, c.tokens, c.dModel, kernel === 'tensor' ? 2 ** -6 : 3e-5, what);
        if (c.tokens === 37) {  // deterministic: a second run is bitwise the same
          await gpuMoe(t.id, xb, c.tokens, gpu, yb, { kernel });
          expect(Array.from(await yb.read(new Float32Array(c.tokens * c.dModel)))).toEqual(Array.from(got));
        }
      }
    });
  }

  it('a bf16 router, the capacity limit, and a reused workspace', async () => {
    const c: Case = { tokens: 40, nExperts: 4, k: 2, dModel: 32, dFf: 40, renormalize: true };
    const { cpu, gpu } = await layerOf(c, 'bf16', 77);
    // The router's values made bf16-exact so that both sides see the same router.
    const router = bf16Exact(new Float32Array(cpu.router.data.slice().buffer));
    cpu.router = encode('f32', router, c.nExperts, c.dModel);
    gpu.router = await up(encode('bf16', router, c.nExperts, c.dModel).data);
    gpu.routerType = 'bf16';
    const x = bf16Exact(randomF32(c.tokens * c.dModel, 78));
    const xt = new Tensor('float32', x, [c.tokens, c.dModel]);
    const xb = await up(x), yb = alloc(c.tokens * c.dModel * 4);
    const workspace = alloc(gpuMoeWorkspaceBytes(c.tokens, c));
    for (const capacityFactor of [0.5, 0]) {
      const want = await kernels.moe(xt, cpu, { capacityFactor });
      for (const kernel of ['auto', 'simt'] as const) {
        const res = await gpuMoe(t.id, xb, c.tokens, gpu, yb, { kernel, capacityFactor, workspace });
        expect(res.expertCounts).toEqual(want.expertCounts);
        expect(res.dropped).toBe(want.dropped);
        if (capacityFactor) expect(res.dropped).toBeGreaterThan(0);
        expectRowsClose(await yb.read(new Float32Array(c.tokens * c.dModel)), want.output.data as Float32Array,
          c.tokens, c.dModel, kernel === 'simt' ? 3e-5 : 2 ** -6, `capacity ${capacityFactor} ${kernel}`);
      }
    }
    // y may be x: it is written after the last read of x, and gives the same bits as apart.
    const inPlace = await up(x);
    await gpuMoe(t.id, inPlace, c.tokens, gpu, inPlace, { workspace });
    await gpuMoe(t.id, xb, c.tokens, gpu, yb, { workspace });
    expect(Array.from(await inPlace.read(new Float32Array(c.tokens * c.dModel)))).toEqual(Array.from(await yb.read(new Float32Array(c.tokens * c.dModel))));
    // No tokens: nothing to compute, the counts are zeros.
    expect((await gpuMoe(t.id, xb, 0, gpu, yb)).expertCounts).toEqual([0, 0, 0, 0]);
  });

  it('routing against kernels.moeRoute: scores, ids, weights', async () => {
    // An identity router makes the CPU's logits exactly x, which the GPU op then routes.
    const cases: (Case & { nan?: boolean })[] = [
      { tokens: 1, nExperts: 1, k: 1, dModel: 1, dFf: 1 },
      { tokens: 5, nExperts: 8, k: 2, dModel: 8, dFf: 1, renormalize: true },
      { tokens: 9, nExperts: 40, k: 40, dModel: 40, dFf: 1, scoring: 'sigmoid', weightScale: 0.5 },  // k = E > 32
      { tokens: 6, nExperts: 70, k: 6, dModel: 70, dFf: 1, bias: true, renormalize: true },
      { tokens: 7, nExperts: 64, k: 6, dModel: 64, dFf: 1, scoring: 'sigmoid', bias: true, groups: 8, groupsUsed: 3, renormalize: true, weightScale: 2.5 },
      { tokens: 3, nExperts: 12, k: 4, dModel: 12, dFf: 1, groups: 12, groupsUsed: 5 },  // single-expert groups
      { tokens: 2, nExperts: 8, k: 3, dModel: 8, dFf: 1, nan: true },  // NaN scores: valid ids, lowest first
    ];
    let seed = 5;
    for (const c of cases) {
      const e = c.nExperts;
      const eye = new Float32Array(e * e);
      for (let i = 0; i < e; i++) eye[i * e + i] = 1;
      const x = randomF32(c.tokens * e, seed += 11).map((v) => v * 4);
      if (c.nan) x[3] = NaN;
      const bias = c.bias ? randomF32(e, seed + 1).map((v) => v * 0.1) : undefined;
      const spec = { k: c.k, scoring: c.scoring, renormalize: c.renormalize, weightScale: c.weightScale, groups: c.groups, groupsUsed: c.groupsUsed };
      const want = await kernels.moeRoute(new Tensor('float32', x, [c.tokens, e]), { ...spec, router: encode('f32', eye, e, e), selectionBias: bias });
      const out = { scores: alloc(c.tokens * e * 4), ids: alloc(c.tokens * c.k * 4), weights: alloc(c.tokens * c.k * 4) };
      await gpuMoeRoute(t.id, await up(x), c.tokens, { ...spec, nExperts: e, selectionBias: bias ? await up(bias) : undefined }, out);
      const what = JSON.stringify(c);
      expect(Array.from(await out.ids.read(new Int32Array(c.tokens * c.k))), what).toEqual(Array.from(want.experts.data as Int32Array));
      const scores = await out.scores.read(new Float32Array(c.tokens * e));
      const weights = await out.weights.read(new Float32Array(c.tokens * c.k));
      const wantScores = want.scores.data as Float32Array, wantWeights = want.weights.data as Float32Array;
      for (let i = 0; i < scores.length; i++) {
        if (Number.isNaN(wantScores[i]!)) expect(scores[i], `${what} score ${i}`).toBeNaN();
        else expect(Math.abs(scores[i]! - wantScores[i]!), `${what} score ${i}`).toBeLessThanOrEqual(1e-6 * Math.abs(wantScores[i]!) + 1e-12);
      }
      for (let i = 0; i < weights.length; i++) {
        if (Number.isNaN(wantWeights[i]!)) expect(weights[i]).toBeNaN();
        else expect(Math.abs(weights[i]! - wantWeights[i]!), `${what} weight ${i}`).toBeLessThanOrEqual(2e-6 * Math.abs(wantWeights[i]!) + 1e-12);
      }
    }
  });

  it('dispatch: counts, offsets and a token-ordered permutation, with and without a capacity', async () => {
    for (const [tokens, e, k, capacity] of [[1, 4, 2, 0], [70, 9, 4, 0], [70, 9, 4, 20], [300, 3, 1, 0], [5, 6, 6, 2]] as const) {
      // Experts 0 and e - 1 get nothing unless every expert must be used (k = e).
      const ids = new Int32Array(tokens * k);
      for (let tk = 0; tk < tokens; tk++) {
        const pool = k === e ? Array.from({ length: e }, (_, i) => i) : Array.from({ length: e - 2 }, (_, i) => i + 1);
        for (let j = 0; j < k; j++) ids[tk * k + j] = pool.splice((tk * 7 + j * 3) % pool.length, 1)[0]!;
      }
      const counts = new Array<number>(e).fill(0);
      for (const id of ids) counts[id]! += 1;
      const cap = capacity || Infinity;
      const offsets = [0];
      for (let x = 0; x < e; x++) offsets.push(offsets[x]! + Math.min(counts[x]!, cap));
      const rowOf = new Int32Array(tokens * k).fill(-1), rowToken: number[] = [], fill = new Array<number>(e).fill(0);
      for (let i = 0; i < ids.length; i++) {
        const x = ids[i]!;
        if (fill[x]! < cap) {
          rowOf[i] = offsets[x]! + fill[x]!++;
          rowToken[rowOf[i]!] = Math.floor(i / k);
        }
      }
      const out = { counts: alloc(e * 4), offsets: alloc((e + 1) * 4), rowOf: alloc(tokens * k * 4), rowToken: alloc(tokens * k * 4) };
      await gpuMoeDispatch(t.id, await up(ids), tokens, e, k, out, { capacity });
      const what = `tokens ${tokens} experts ${e} k ${k} capacity ${capacity}`;
      expect(Array.from(await out.counts.read(new Int32Array(e))), what).toEqual(counts);
      expect(Array.from(await out.offsets.read(new Int32Array(e + 1))), what).toEqual(offsets);
      expect(Array.from(await out.rowOf.read(new Int32Array(tokens * k))), what).toEqual(Array.from(rowOf));
      expect(Array.from((await out.rowToken.read(new Int32Array(tokens * k))).subarray(0, offsets[e]!)), what).toEqual(rowToken);
    }
  });

  it('the grouped GEMMs and the combine step by step against scalar loops', async () => {
    // Groups of 0, 65, 1, 64 and 7 rows (an empty expert, tile edges), rows read in a scrambled order.
    const sizes = [0, 65, 1, 64, 7], e = sizes.length, rows = sizes.reduce((s, v) => s + v, 0);
    const offsets = [0];
    for (const s of sizes) offsets.push(offsets[offsets.length - 1]! + s);
    for (const [d, f] of [[40, 65], [17, 9]] as const) {
      const tokens = 50;
      const x = bf16Exact(randomF32(tokens * d, d));
      const rowToken = Int32Array.from({ length: rows }, (_, r) => (r * 17 + 3) % tokens);
      for (const type of ['f32', 'bf16'] as const) {
        const gate = bf16Exact(randomF32(e * f * d, 2)), upW = bf16Exact(randomF32(e * f * d, 3)), down = bf16Exact(randomF32(e * d * f, 4));
        const layer = {
          nExperts: e, dModel: d, dFf: f, weightType: type,
          gate: await up(encode(type, gate, e * f, d).data), up: await up(encode(type, upW, e * f, d).data), down: await up(encode(type, down, e * d, f).data),
        };
        const h = new Float64Array(rows * f), yo = new Float64Array(rows * d);
        for (let x0 = 0; x0 < e; x0++) {
          for (let r = offsets[x0]!; r < offsets[x0 + 1]!; r++) {
            const xr = rowToken[r]! * d;
            for (let n = 0; n < f; n++) {
              let g = 0, u = 0;
              for (let i = 0; i < d; i++) {
                g += x[xr + i]! * gate[(x0 * f + n) * d + i]!;
                u += x[xr + i]! * upW[(x0 * f + n) * d + i]!;
              }
              h[r * f + n] = g / (1 + Math.exp(-g)) * u;
            }
          }
        }
        const [xb, rtb, offb, hb, yob] = [await up(x), await up(rowToken), await up(Int32Array.from(offsets)), alloc(rows * f * 4), alloc(rows * d * 4)];
        // gemv on the narrow shape only: its 8-row tiles over 137 rows are many blocks for the emulator.
        const kernelsHere = (type === 'bf16' ? ['tensor', 'simt', 'gemv'] as const : ['simt', 'gemv'] as const)
          .filter((k) => k !== 'gemv' || f < 64);
        for (const kernel of kernelsHere) {
          const tol = kernel === 'tensor' ? 2 ** -6 : 3e-5;
          await gpuMoeGateUp(t.id, xb, tokens, rtb, offb, rows, layer, hb, { kernel });
          const hGot = await hb.read(new Float32Array(rows * f));
          // Gate/up see bf16-exact x and weights, so every kernel's products are exact and only the
          // order of the fp32 sums differs (tensor cores may round their partial sums differently).
          expectRowsClose(hGot, Float32Array.from(h), rows, f, 1e-4, `gate_up ${type} ${kernel} ${d}x${f}`);
          // The down GEMM from the GPU's own h, so that only this step's error is measured.
          for (let x0 = 0; x0 < e; x0++)
            for (let r = offsets[x0]!; r < offsets[x0 + 1]!; r++)
              for (let n = 0; n < d; n++) {
                let s = 0;
                for (let i = 0; i < f; i++) s += hGot[r * f + i]! * down[(x0 * d + n) * f + i]!;
                yo[r * d + n] = s;
              }
          await gpuMoeDown(t.id, hb, offb, rows, layer, yob, { kernel });
          const yoGot = await yob.read(new Float32Array(rows * d));
          expectRowsClose(yoGot, Float32Array.from(yo), rows, d, tol, `down ${type} ${kernel} ${d}x${f}`);
          // Combine: 2 slots per token, one of them dropped (-1) for every third token.
          const k = 2, rowOf = Int32Array.from({ length: tokens * k }, (_, i) => (i % 6 === 1 ? -1 : (i * 31) % rows));
          const weights = randomF32(tokens * k, 9);
          const yb = alloc(tokens * d * 4);
          await gpuMoeCombine(t.id, yob, rows, await up(rowOf), await up(weights), tokens, k, d, yb);
          const want = new Float32Array(tokens * d);
          for (let tk = 0; tk < tokens; tk++)
            for (let n = 0; n < d; n++) {
              let s = 0;
              for (let j = 0; j < k; j++) if (rowOf[tk * k + j]! >= 0) s += weights[tk * k + j]! * yoGot[rowOf[tk * k + j]! * d + n]!;
              want[tk * d + n] = s;
            }
          expectRowsClose(await yb.read(new Float32Array(tokens * d)), want, tokens, d, 1e-6, 'combine');
        }
      }
    }
  });

  it('rejects bad input with typed errors naming the parameter', async () => {
    const c: Case = { tokens: 2, nExperts: 4, k: 2, dModel: 8, dFf: 8 };
    const { gpu } = await layerOf(c, 'f32', 3);
    const x = alloc(2 * 8 * 4), y = alloc(2 * 8 * 4), small = alloc(8);
    await expect(gpuMoe(t.id, x, 3, gpu, y)).rejects.toThrow(/gpuMoe: x holds 64 bytes, needs 96/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, k: 5 }, y)).rejects.toThrow(/gpuMoe: k must be/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, k: 0 }, y)).rejects.toThrow(InvalidArgumentError);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, nExperts: 2000 }, y)).rejects.toThrow(/nExperts/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, groups: 3 }, y)).rejects.toThrow(/groups = 3 does not divide the 4 experts/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, groups: 4, groupsUsed: 1 }, y)).rejects.toThrow(/k = 2 experts do not fit in groupsUsed = 1/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, scoring: 'tanh' as 'softmax' }, y)).rejects.toThrow(/scoring/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, weightType: 'f16' as 'f32' }, y)).rejects.toThrow(/weightType/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, routerType: 'q8_0' as 'f32' }, y)).rejects.toThrow(/routerType/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, weightScale: Infinity }, y)).rejects.toThrow(/weightScale/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, renormalize: 1 as unknown as boolean }, y)).rejects.toThrow(/renormalize/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, gate: small }, y)).rejects.toThrow(/layer.gate holds 8 bytes, needs 1024/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, weightType: 'bf16', down: small }, y)).rejects.toThrow(/layer.down holds 8 bytes, needs 512/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, selectionBias: small }, y)).rejects.toThrow(/selectionBias holds 8 bytes, needs 16/);
    await expect(gpuMoe(t.id, x, 2, { ...gpu, router: 'r' as unknown as GpuBuffer }, y)).rejects.toThrow(/layer.router must be a GpuBuffer/);
    await expect(gpuMoe(t.id, x, 2, gpu, y, { capacityFactor: -1 })).rejects.toThrow(/capacityFactor/);
    await expect(gpuMoe(t.id, x, 2, gpu, y, { kernel: 'fast' as 'auto' })).rejects.toThrow(/options.kernel must be one of/);
    await expect(gpuMoe(t.id, x, 2, gpu, y, { kernel: 'tensor' })).rejects.toThrow(/options.kernel 'tensor' needs bf16 weights, got f32/);
    await expect(gpuMoe(t.id, x, 2, gpu, y, { workspace: small })).rejects.toThrow(/options.workspace holds 8 bytes/);
    await expect(gpuMoe(t.id, x, 2, gpu, y, { capacity: 1 } as object)).rejects.toThrow(/unknown option 'capacity'/);
    await expect(gpuMoeDispatch(t.id, small, 2, 4, 2, { counts: small, offsets: small, rowOf: small, rowToken: small }))
      .rejects.toThrow(/gpuMoeDispatch: ids holds 8 bytes, needs 16/);
    await expect(gpuMoeRoute(t.id, small, 1, { nExperts: 4, k: 1 }, { scores: small, ids: small, weights: small }))
      .rejects.toThrow(/gpuMoeRoute: logits holds 8 bytes, needs 16/);
    // A written buffer that is also another argument: rejected before anything runs.
    const big = alloc(gpuMoeWorkspaceBytes(2, c));
    await expect(gpuMoe(t.id, x, 2, gpu, gpu.gate)).rejects.toThrow(/gpuMoe: y and layer.gate are the same buffer; y is written and needs its own/);
    await expect(gpuMoe(t.id, x, 2, gpu, big, { workspace: big })).rejects.toThrow(/gpuMoe: y and options.workspace are the same buffer/);
    await expect(gpuMoe(t.id, x, 2, gpu, y, { workspace: gpu.down })).rejects.toThrow(/options.workspace and layer.down are the same buffer/);
    const b64 = alloc(64), b128 = alloc(128);
    await expect(gpuMoeRoute(t.id, b64, 2, { nExperts: 4, k: 2 }, { scores: b64, ids: alloc(16), weights: alloc(16) }))
      .rejects.toThrow(/gpuMoeRoute: out.scores and logits are the same buffer/);
    await expect(gpuMoeRoute(t.id, b64, 2, { nExperts: 4, k: 2 }, { scores: alloc(32), ids: b64, weights: b64 }))
      .rejects.toThrow(/gpuMoeRoute: out.ids and out.weights are the same buffer/);
    await expect(gpuMoeDispatch(t.id, b64, 4, 4, 2, { counts: alloc(16), offsets: alloc(20), rowOf: b128, rowToken: b128 }))
      .rejects.toThrow(/gpuMoeDispatch: out.rowOf and out.rowToken are the same buffer/);
    await expect(gpuMoeDispatch(t.id, b64, 4, 4, 2, { counts: alloc(16), offsets: alloc(20), rowOf: b64, rowToken: alloc(32) }))
      .rejects.toThrow(/gpuMoeDispatch: out.rowOf and ids are the same buffer/);
    await expect(gpuMoeGateUp(t.id, b128, 2, alloc(16), alloc(20), 4, gpu, b128)).rejects.toThrow(/gpuMoeGateUp: h and x are the same buffer/);
    await expect(gpuMoeDown(t.id, b128, alloc(20), 4, gpu, b128)).rejects.toThrow(/gpuMoeDown: yo and h are the same buffer/);
    await expect(gpuMoeCombine(t.id, b128, 4, alloc(16), alloc(16), 2, 2, 8, b128)).rejects.toThrow(/gpuMoeCombine: y and yo are the same buffer/);
    // The native ops check again when called directly.
    await expect(runGpuOp(t.id, 'moe_route', [small, small, small, small], { tokens: 1, experts: 2, k: 3 })).rejects.toThrow(/'k'/);
    await expect(runGpuOp(t.id, 'moe_route', [small, small, small, small], { tokens: 1, experts: 2, k: 1, groups: 4 })).rejects.toThrow(InvalidArgumentError);
    await expect(runGpuOp(t.id, 'moe_route', [small, small, small, small], { tokens: 1, experts: 3, k: 1, groups: 2 })).rejects.toThrow(/groups must divide experts/);
    await expect(runGpuOp(t.id, 'moe_route', [small, small, small, small], { tokens: 1, experts: 2, k: 1, bias: 1 })).rejects.toThrow(/bias/);
    await expect(runGpuOp(t.id, 'moe_dispatch', [small, small, small, small, small], { tokens: 4, experts: 2, k: 1 })).rejects.toThrow(/ids \(buffer 0\) holds 8 bytes/);
    await expect(runGpuOp(t.id, 'moe_down', [small, small, small, small], { rows: 0, experts: 1, dModel: 1, dFf: 1, weightType: 2 })).rejects.toThrow(/weightType/);
    await expect(runGpuOp(t.id, 'moe_down', [small, small, small, small], { rows: 0, experts: 1, dModel: 1, dFf: 1, kernel: 1 })).rejects.toThrow(/kernel 'tensor' needs bf16 weights/);
    await expect(runGpuOp(t.id, 'moe_down', [small, small, small, small], { rows: 0, experts: 1, dModel: 1, dFf: 1, kernel: 4 })).rejects.toThrow(/'kernel'/);
    await expect(runGpuOp(t.id, 'moe', [x, gpu.router, gpu.gate, gpu.up, gpu.down, y, alloc(16), small],
      { tokens: 2, experts: 4, k: 2, dModel: 8, dFf: 8 })).rejects.toThrow(/workspace \(buffer 7\) holds 8 bytes/);
    const gone = alloc(64);
    gone.dispose();
    await expect(gpuMoe(t.id, gone, 2, gpu, y)).rejects.toThrow(DisposedError);
    await expect(gpuMoeCombine(t.id, small, 0, small, small, 1, 1, 1, gone)).rejects.toThrow(DisposedError);
  });
});
