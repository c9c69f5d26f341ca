// The execution model the emulator implements, pinned by hand-derived expectations. On a GPU the
// same expectations are checked against the hardware, which is what lets the emulator stand in for
// it in the other kernel tests.
import { expect, it } from 'vitest';
import { InternalError } from '../../dist/index.js';
import { GpuBuffer, runGpuOp } from '../../dist/cuda/runtime.js';
import { describeGpu } from './targets.js';

function toBf16(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer)[0]!;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
// Small integers and halves are exact in f16: sign, exponent 15 + e, 10-bit mantissa.
function toF16Exact(x: number): number {
  if (x === 0) return 0;
  const sign = x < 0 ? 0x8000 : 0;
  let a = Math.abs(x), e = 0;
  while (a >= 2) { a /= 2; e++; }
  while (a < 1) { a *= 2; e--; }
  return sign | ((e + 15) << 10) | Math.round((a - 1) * 1024);
}

describeGpu('CUDA execution model', (t) => {
  it('warp shuffles with widths, ballot, any and all', async () => {
    const blocks = 2, threads = 64;
    const out = GpuBuffer.alloc(t.id, blocks * threads * 8 * 4);
    await runGpuOp(t.id, 'selftest_warp', [out], { blocks, threads });
    const got = await out.read(new Int32Array(blocks * threads * 8));
    out.dispose();
    for (let tid = 0; tid < blocks * threads; tid++) {
      const lane = tid % 32, warpBase = tid - lane;
      const seg16 = lane & ~15, seg8 = lane & ~7;
      const o = got.subarray(tid * 8, tid * 8 + 8);
      const xor = lane ^ 5;
      expect(o[0], `xor tid ${tid}`).toBe(warpBase + ((xor & ~15) === seg16 ? xor : lane));
      expect(o[1], `down tid ${tid}`).toBe(warpBase + (lane + 3 < seg16 + 16 ? lane + 3 : lane));
      expect(o[2], `up tid ${tid}`).toBe(warpBase + (lane - 2 >= seg8 ? lane - 2 : lane));
      expect(o[3], `idx tid ${tid}`).toBe(warpBase + seg16 + 7);
      // warpBase is even, so tid odd <=> lane odd: bits 1, 3, 5, ...
      expect(o[4]! >>> 0, `ballot tid ${tid}`).toBe(0xaaaaaaaa);
      expect(o[5], `any tid ${tid}`).toBe(warpBase <= 37 && 37 < warpBase + 32 ? 1 : 0);
      expect(o[6], `all tid ${tid}`).toBe(warpBase + 32 <= 64 ? 1 : 0);
      expect(o[7]).toBe(lane);
    }
  });

  it('block barriers with predicates, static and dynamic shared memory', async () => {
    for (const threads of [1, 33, 256]) {
      const blocks = 3;
      const input = new Int32Array(blocks * threads).map((_, i) => (i * 37) % 11 - 3);
      if (threads > 1) input[threads + 1] = 150;  // block 1 has one value > 100
      const inBuf = await GpuBuffer.from(t.id, input);
      const out = GpuBuffer.alloc(t.id, blocks * 4 * 4);
      const dyn = GpuBuffer.alloc(t.id, blocks * threads * 4);
      await runGpuOp(t.id, 'selftest_block', [inBuf, out, dyn], { blocks, threads });
      const got = await out.read(new Int32Array(blocks * 4));
      const gotDyn = await dyn.read(new Int32Array(blocks * threads));
      for (const b of [inBuf, out, dyn]) b.dispose();
      for (let b = 0; b < blocks; b++) {
        const v = input.subarray(b * threads, (b + 1) * threads);
        expect(got[b * 4], `sum, block ${b} of ${threads}`).toBe(v.reduce((s, x) => s + x, 0));
        expect(got[b * 4 + 1]).toBe(v.filter((x) => x > 0).length);
        expect(got[b * 4 + 2]).toBe(v.every((x) => x >= 0) ? 1 : 0);
        expect(got[b * 4 + 3]).toBe(v.some((x) => x > 100) ? 1 : 0);
        for (let i = 0; i < threads; i++) expect(gotDyn[b * threads + i]).toBe(v[threads - 1 - i]);
      }
    }
  });

  for (const [kind, name] of [[0, 'bf16'], [1, 'f16'], [2, 's8']] as const) {
    it(`mma.sync ${name} fragment layouts give A x B`, async () => {
      const k = kind === 2 ? 32 : 16;
      // Distinct small integers per position: a misplaced element changes the product.
      const a = Array.from({ length: 16 * k }, (_, i) => ((i * 7) % 13) - 6);
      const bt = Array.from({ length: 8 * k }, (_, i) => ((i * 5) % 11) - 5);
      const enc = (x: number) => (kind === 0 ? toBf16(x) : toF16Exact(x));
      const aBuf = await GpuBuffer.from(t.id, kind === 2 ? Int8Array.from(a) : Uint16Array.from(a, enc));
      const bBuf = await GpuBuffer.from(t.id, kind === 2 ? Int8Array.from(bt) : Uint16Array.from(bt, enc));
      const dBuf = GpuBuffer.alloc(t.id, 16 * 8 * 4);
      await runGpuOp(t.id, 'selftest_mma', [aBuf, bBuf, dBuf], { kind });
      const d = await dBuf.read(kind === 2 ? new Int32Array(128) : new Float32Array(128));
      for (const b of [aBuf, bBuf, dBuf]) b.dispose();
      for (let i = 0; i < 16; i++) {
        for (let j = 0; j < 8; j++) {
          let s = 0;
          for (let p = 0; p < k; p++) s += a[i * k + p]! * bt[j * k + p]!;
          expect(d[i * 8 + j], `D[${i}][${j}]`).toBe(s);
        }
      }
    });
  }

  it('ldmatrix x4 and x4.trans hand each lane the fragment registers dialect.h documents', async () => {
    const inBuf = await GpuBuffer.from(t.id, Uint16Array.from({ length: 256 }, (_, i) => i));  // value = row * 16 + col
    const outBuf = GpuBuffer.alloc(t.id, 32 * 8 * 4);
    await runGpuOp(t.id, 'selftest_ldmatrix', [inBuf, outBuf], {});
    const got = await outBuf.read(new Uint32Array(256));
    for (const b of [inBuf, outBuf]) b.dispose();
    const at = (row: number, col: number) => row * 16 + col;
    for (let l = 0; l < 32; l++) {
      for (let i = 0; i < 4; i++) {
        // Matrix i: rows (i % 2) * 8.., columns (i >> 1) * 8.. (lanes 8i..8i+7 gave its rows).
        const r0 = (i % 2) * 8, c0 = (i >> 1) * 8;
        const plain = at(r0 + (l >> 2), c0 + 2 * (l % 4)) | (at(r0 + (l >> 2), c0 + 2 * (l % 4) + 1) << 16);
        const trans = at(r0 + 2 * (l % 4), c0 + (l >> 2)) | (at(r0 + 2 * (l % 4) + 1, c0 + (l >> 2)) << 16);
        expect(got[l * 8 + i], `lane ${l} r[${i}]`).toBe(plain >>> 0);
        expect(got[l * 8 + 4 + i], `lane ${l} trans r[${i}]`).toBe(trans >>> 0);
      }
    }
  });

  if (t.emulated) {
    it('reports a stuck barrier, an exited lane in a warp sync and bad launch configurations', async () => {
      const out = GpuBuffer.alloc(t.id, 32 * 4);
      const cases: [number, RegExp][] = [
        [0, /cannot progress.*thread \(0,0,0\) waits at a warp sync.*thread \(1,0,0\) waits at __syncthreads/],
        [1, /thread \(3,0,0\) exited before a warp sync/],
        [2, /invalid configuration: a block of 2048x1x1/],
        [3, /invalid configuration: 1048576 bytes of dynamic shared memory/],
      ];
      for (const [kind, msg] of cases) {
        const err = await runGpuOp(t.id, 'selftest_misuse', [out], { kind }).catch((e: Error) => e);
        expect(err).toBeInstanceOf(InternalError);
        expect((err as Error).message).toMatch(msg);
      }
      // The device stays usable after a failed launch.
      const ok = GpuBuffer.alloc(t.id, 32 * 8 * 4);
      await runGpuOp(t.id, 'selftest_warp', [ok], { blocks: 1, threads: 32 });
      ok.dispose();
      out.dispose();
    });
  }
});
