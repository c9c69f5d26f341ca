// The GPU transformer's fused row ops (kernels/llm/cuda/llm.cu) on their own, against references
// written here: the residual add + RMSNorm (register-cached and looping kernels) and SwiGLU over a
// joined gate/up product, each also writing its output quantised as quant_matmul's activations.
// The quantised bytes are checked exactly against the q8 rule applied here to the op's own fp32
// output (per block of 32: d = amax / 127, q = rint(v * (127 / amax)) in fp32; a block with a NaN
// or an infinity gets d = NaN and zeros, one below 2^-120 is zero).
import { expect, it } from 'vitest';
import { runGpuOp } from '../../dist/cuda/runtime.js';
import { Sampler, argmaxLoop } from '../../lib/llm/sampling.js';
import { randomF32 } from '../helpers.js';
import { checkQuantised } from './q8-rule.js';
import { describeGpu, gpuBuffers } from './targets.js';

const f32 = Math.fround;

describeGpu('GPU transformer row ops', (t) => {
  const { up, alloc } = gpuBuffers(t);

  it('llm_add_rms_norm: x += a, y = rmsnorm(x) * w, and y quantised, on every kernel', async () => {
    // Rows of the register-cached kernel (n % 4 == 0, up to 4 x 256 x 8 float4s per row: one,
    // two, four and eight per thread, a warp only partly in the row) and of the looping one (odd n,
    // longer rows); quantised where n % 32 == 0.
    for (const [rows, n] of [[1, 4096], [2, 96], [3, 8192], [1, 2048], [1, 8224], [2, 100], [2, 33], [1, 1024]] as const) {
      const count = rows * n;
      const x = randomF32(count, n).map((v) => v * 2), a = randomF32(count, n + 1), w = randomF32(n, n + 2);
      if (n === 4096) {  // a block with an infinity, one of zeros, one of tiny values
        x[40] = Infinity;
        for (let i = 64; i < 96; i++) x[i] = a[i] = 0;
        for (let i = 96; i < 128; i++) { x[i] = 1e-39; a[i] = 0; }
      }
      const quantize = n % 32 === 0;
      const [xb, ab, wb, yb, sb] = [await up(x), await up(a), await up(w), alloc(count * 4), alloc(count + Math.ceil(count / 32) * 4)];
      await runGpuOp(t.id, 'llm_add_rms_norm', [xb, ab, wb, yb, sb], { rows, n, eps: 1e-6, quantize: quantize ? 1 : 0 });
      const gx = await xb.read(new Float32Array(count)), gy = await yb.read(new Float32Array(count));
      for (let i = 0; i < count; i++) if (gx[i] !== f32(x[i]! + a[i]!)) expect(gx[i], `x[${i}] of ${rows}x${n}`).toBe(f32(x[i]! + a[i]!));
      for (let r = 0; r < rows; r++) {
        const row = gx.subarray(r * n, (r + 1) * n);
        const scale = 1 / Math.sqrt(row.reduce((s, v) => s + v * v, 0) / n + 1e-6);
        for (let i = 0; i < n; i++) {
          const want = row[i]! * scale * w[i]!, got = gy[r * n + i]!;
          if (!Number.isFinite(scale)) continue;  // the row with an infinity: no finite reference
          if (!(Math.abs(got - want) <= 2e-5 * Math.max(1, Math.abs(want)))) expect(got, `y[${r * n + i}] of ${rows}x${n}`).toBe(want);
        }
      }
      if (quantize) checkQuantised(gy, await sb.read(new Uint8Array(count + count / 32 * 4)), count, `${rows}x${n}`);
    }
  });

  it('llm_silu_mul reads gate and up rows ld apart (a joined gate/up product) and quantises', async () => {
    for (const [rows, n, ld] of [[3, 64, 128], [1, 96, 192], [2, 32, 32]] as const) {
      const joined = randomF32((rows - 1) * ld + 2 * n, rows + n).map((v) => v * 4);
      const count = rows * n;
      const [gb, yb, sb] = [await up(joined), alloc(count * 4), alloc(count + count / 32 * 4)];
      // up is the same buffer from element n on: an offset view is not an op argument, so the
      // test lays the joined rows out with up at column n of each row and passes a second copy
      // shifted by n.
      const upBuf = await up(joined.slice(n));
      await runGpuOp(t.id, 'llm_silu_mul', [gb, upBuf, yb, sb], { rows, n, ld, quantize: 1 });
      const gy = await yb.read(new Float32Array(count));
      for (let r = 0; r < rows; r++) {
        for (let i = 0; i < n; i++) {
          const g = joined[r * ld + i]!, u = joined[r * ld + n + i]!;
          const want = g / (1 + Math.exp(-g)) * u, got = gy[r * n + i]!;
          if (!(Math.abs(got - want) <= 1e-5 * Math.max(1, Math.abs(want)))) expect(got, `y[${r}][${i}] of ld ${ld}`).toBe(want);
        }
      }
      checkQuantised(gy, await sb.read(new Uint8Array(count + count / 32 * 4)), count, `silu ${rows}x${n}/${ld}`);
    }
  });

  it('llm_silu_mul rejects an ld below n and inputs too small for rows ld apart', async () => {
    const b = alloc(64 * 4);
    await expect(runGpuOp(t.id, 'llm_silu_mul', [b, b, b], { rows: 1, n: 32, ld: 16 })).rejects.toThrow(/ld/);
    await expect(runGpuOp(t.id, 'llm_silu_mul', [b, b, b], { rows: 2, n: 32, ld: 64 })).rejects.toThrow(/gate/);
  });

  // The chained steps' chooser on rows built to hit its edges: ties at the k-th value (the lower
  // ids go in, as the TS top-k takes them), ties at the top, -0 beside +0, -Infinity, a row of
  // one id, vocabularies around the block's 1024 threads, k = 1 and 64. Reference: sampling.ts's
  // Sampler (and its argmax) on the same row from the same generator state.
  it('llm_chain_next: the argmax and Sampler.sample\'s draw, and the generator state after it, on tie-laden rows', async () => {
    const settings = [
      { temperature: 0 },
      { temperature: 0.9, topK: 40, topP: 0.95, minP: 0.05 },
      { temperature: 2.5, topK: 64, topP: 1, minP: 0 },
      { temperature: 1, topK: 1, topP: 1, minP: 0 },
      { temperature: 0.7, topK: 9, topP: 0.4, minP: 0.3 },
    ];
    let seed = 3;
    const rnd = () => { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; return seed / 2 ** 32; };
    const rows: Float32Array[] = [];
    for (const vocab of [65, 1000, 1024, 1025, 3001]) {
      // Few distinct values: many ties everywhere, the k-th included.
      rows.push(Float32Array.from({ length: vocab }, () => Math.floor(rnd() * 6) * 0.5));
      // Spread values with a tie at the top, -0 and +0, -Infinity entries.
      const r = Float32Array.from({ length: vocab }, () => (rnd() - 0.5) * 8);
      r[7] = r[vocab - 1] = 9;
      r[3] = -0;
      r[4] = 0;
      for (let i = 10; i < vocab; i += 17) r[i] = -Infinity;
      rows.push(r);
    }
    for (const row of rows) {
      const vocab = row.length;
      for (const o of settings) {
        if (o.topK !== undefined && o.topK >= vocab) continue;
        const host = new Sampler({ ...o, seed: vocab + (o.topK ?? 0) });
        const chain = host.chainSampler(vocab)!;
        const steps = 3;
        const want: number[] = [], wantRng: number[] = [];
        const rng0 = chain.rng.slice();
        for (let j = 0; j < steps; j++) {
          want.push(host.sample(row));
          wantRng.push(...chain.rng);
        }
        // Each step a sequence of its own (the op's sequences are rows), sharing one start state per
        // sequence: run the rows one step at a time, carrying the state through rngOut.
        let rngIn = rng0;
        const got: number[] = [], gotRng: number[] = [];
        for (let j = 0; j < steps; j++) {
          const ints = [await up(Int32Array.of(0)), await up(Int32Array.of(5)), await up(Int32Array.of(5, 1, 0)), await up(Int32Array.of(6))];
          const chosen = alloc(4), rngOut = alloc(16);
          await runGpuOp(t.id, 'llm_chain_next', [await up(row), ...ints, chosen, await up(Float64Array.from(chain.params)), await up(rngIn), rngOut],
            { seqs: 1, vocab, step: 0, sample: 1 });
          got.push((await chosen.read(new Int32Array(1)))[0]!);
          rngIn = await rngOut.read(new Uint32Array(4));
          gotRng.push(...rngIn);
          // The next step's inputs moved on by one position.
          expect(Array.from(await ints[1]!.read(new Int32Array(1)))).toEqual([6]);
          expect(Array.from(await ints[2]!.read(new Int32Array(3)))).toEqual([6, 1, 0]);
          expect(Array.from(await ints[0]!.read(new Int32Array(1)))).toEqual([got[j]]);
        }
        const what = `vocab ${vocab} ${JSON.stringify(o)}`;
        expect(got, what).toEqual(want);
        expect(gotRng, what).toEqual(wantRng);
      }
    }
    // Without parameters: the argmax of every sequence's row, one block each.
    const three = [rows[0]!.subarray(0, 65), rows[1]!.subarray(0, 65), new Float32Array(65).fill(-Infinity)];
    const all = new Float32Array(3 * 65);
    three.forEach((r, i) => all.set(r, i * 65));
    const chosen = alloc(3 * 4);
    await runGpuOp(t.id, 'llm_chain_next', [await up(all), alloc(12), alloc(12), alloc(36), alloc(12), chosen], { seqs: 3, vocab: 65, step: 0 });
    expect(Array.from(await chosen.read(new Int32Array(3)))).toEqual(three.map((r) => argmaxLoop(r)));
  });
});
