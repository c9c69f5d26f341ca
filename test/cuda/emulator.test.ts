// The execution model the emulator implements, pinned by hand-derived expectations. On a GPU the
// same expectations are checked against the hardware, which is what lets the emulator stand in for
// it in the other kernel tests. The Hopper primitives (mbarrier, tensor copies, wgmma) run on the
// emulator and on cc 9.0 GPUs; their expectations come from the PTX ISA's layouts, computed here.
import { expect, it } from 'vitest';
import { InternalError } from '../../dist/index.js';
import { GpuBuffer, gpuDevice, runGpuOp } from '../../dist/cuda/runtime.js';
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

  it('cp.async copies the given bytes and zero-fills the rest of each 16', async () => {
    const src = Uint8Array.from({ length: 512 }, (_, i) => (i * 37) % 251 + 1);
    const srcBuf = await GpuBuffer.from(t.id, src);
    const outBuf = await GpuBuffer.from(t.id, new Uint8Array(512).fill(0xee));
    await runGpuOp(t.id, 'selftest_cp_async', [srcBuf, outBuf], {});
    const got = await outBuf.read(new Uint8Array(512));
    for (const b of [srcBuf, outBuf]) b.dispose();
    for (let l = 0; l < 32; l++) {
      for (let i = 0; i < 16; i++) expect(got[16 * l + i], `lane ${l} byte ${i}`).toBe(i < l % 17 ? src[16 * l + i] : 0);
    }
  });

  // ---- Hopper (sm_90a) ----
  const hopper = () => t.emulated || Number(gpuDevice(t.id).computeCapability) === 9;
  // The 128B / 64B / 32B swizzles: the 16-byte chunk bits 4.. of a shared address XOR its bits 7..
  // (Swizzle<3,4,3>, <2,4,3>, <1,4,3> in the ISA's canonical layouts); span 16 is no swizzle.
  const swizzle = (addr: number, span: number) => (span === 16 ? addr : addr ^ (((addr >> 7) & (span / 16 - 1)) << 4));
  const SWIZZLE_CODE: Record<number, number> = { 16: 0, 128: 1, 64: 2, 32: 3 };

  it('mbarrier phases: a producer and 32 consumers over two slots, parity waits', async () => {
    const out = GpuBuffer.alloc(t.id, 32 * 4);
    if (!hopper()) {
      await expect(runGpuOp(t.id, 'selftest_mbarrier', [out], { rounds: 7 })).rejects.toThrow(/compute capability 9.0/);
      out.dispose();
      return;
    }
    for (const rounds of [0, 1, 7]) {
      await runGpuOp(t.id, 'selftest_mbarrier', [out], { rounds });
      const got = await out.read(new Int32Array(32));
      let total = 0;
      for (let r = 0; r < rounds; r++) total += r * r + 1;
      for (let lane = 0; lane < 32; lane++) expect(got[lane], `rounds ${rounds}, consumer ${lane}`).toBe(total * (lane + 1));
    }
    out.dispose();
  });

  it('tensor copies: boxes swizzled as the ISA lays them out, zero outside the matrix', async () => {
    const rows = 70, cols = 100, ld = 104;
    const src = Uint16Array.from({ length: rows * ld }, (_, i) => ((Math.floor(i / ld) * 131 + (i % ld)) & 0x7fff) + 1);
    const srcBuf = await GpuBuffer.from(t.id, src);
    // [boxRows, boxCols, span, row0, col0]: past the bottom and right edges, before the top and left.
    // Columns are multiples of 8: the copy engine starts a box on a 16-byte boundary of its row.
    const cases: [number, number, number, number, number][] = [
      [40, 64, 128, 50, 56], [16, 64, 128, -3, -8], [9, 32, 64, 5, 80], [11, 16, 32, 66, 88], [5, 24, 16, 1, 8],
      [7, 16, 32, -2, -8], [3, 64, 128, 0, 40],
    ];
    if (hopper()) {
      // Rejected before the launch: on the GPU it would be an illegal instruction, ending the context.
      const out = GpuBuffer.alloc(t.id, 16 * 64 * 2);
      const bad = { rows, cols, ld, boxRows: 16, boxCols: 64, swizzle: 1, row0: 0, col0: 60 };
      await expect(runGpuOp(t.id, 'selftest_tma', [srcBuf, out], bad)).rejects.toThrow(/col0 must be a multiple of 8/);
      out.dispose();
    }
    for (const [boxRows, boxCols, span, row0, col0] of cases) {
      const out = GpuBuffer.alloc(t.id, boxRows * boxCols * 2);
      const params = { rows, cols, ld, boxRows, boxCols, swizzle: SWIZZLE_CODE[span]!, row0, col0 };
      if (!hopper()) {
        await expect(runGpuOp(t.id, 'selftest_tma', [srcBuf, out], params)).rejects.toThrow(/compute capability 9.0/);
        out.dispose();
        break;
      }
      await runGpuOp(t.id, 'selftest_tma', [srcBuf, out], params);
      const got = await out.read(new Uint16Array(boxRows * boxCols));
      out.dispose();
      for (let r = 0; r < boxRows; r++) {
        for (let c = 0; c < boxCols; c++) {
          const gr = row0 + r, gc = col0 + c;
          const want = gr >= 0 && gr < rows && gc >= 0 && gc < cols ? src[gr * ld + gc]! : 0;
          const at = swizzle((r * boxCols + c) * 2, span) / 2;
          expect(got[at], `box ${JSON.stringify(params)} element (${r}, ${c})`).toBe(want);
        }
      }
    }
    srcBuf.dispose();
  });

  // Element (i along M/N, j along K) of a 16-bit operand in a shared image, per the ISA's canonical
  // layouts (T = 8 elements per 16 bytes), then swizzled; `start` is the descriptor's offset.
  interface Operand { mnMajor: boolean; span: number; lbo: number; sbo: number; start: number }
  function byteOf(o: Operand, i: number, j: number): number {
    let off: number;
    if (!o.mnMajor) {
      off = o.span === 16 ? (i % 8) * 16 + Math.floor(i / 8) * o.sbo + (j % 8) * 2 + Math.floor(j / 8) * o.lbo
        : (i % 8) * o.span + Math.floor(i / 8) * o.sbo + j * 2;
    } else {
      off = o.span === 16 ? (i % 8) * 2 + Math.floor(i / 8) * o.sbo + (j % 8) * 16 + Math.floor(j / 8) * o.lbo
        : (i % (o.span / 2)) * 2 + Math.floor(i / (o.span / 2)) * o.lbo + (j % 8) * o.span + Math.floor(j / 8) * o.sbo;
    }
    return swizzle(o.start + off, o.span);
  }

  // [name, kind (0 bf16, 1 f16), A operand, B operand (mnMajor = B stored [k][n], imm-trans-b 1), image bytes]
  const WGMMA_CASES: [string, number, Operand, Operand, number, number][] = [
    // The GEMM's own: A 64 rows x 64 k (128-byte rows) at k step 1 (32 bytes in), B four boxes of
    // 64 k x 64 columns 8 KiB apart at k step 1 (two 8-row groups, 2048 bytes, down).
    ['K-major A, MN-major B, 128B swizzle, k step 1', 0,
      { mnMajor: false, span: 128, lbo: 16, sbo: 1024, start: 32 }, { mnMajor: true, span: 128, lbo: 8192, sbo: 1024, start: 2048 }, 8192, 32768],
    ['K-major A and B, 128B swizzle', 1,
      { mnMajor: false, span: 128, lbo: 16, sbo: 1024, start: 0 }, { mnMajor: false, span: 128, lbo: 16, sbo: 1024, start: 0 }, 8192, 32768],
    ['no swizzle (interleaved core matrices)', 0,
      { mnMajor: false, span: 16, lbo: 128, sbo: 256, start: 0 }, { mnMajor: true, span: 16, lbo: 4096, sbo: 128, start: 0 }, 2048, 8192],
    ['MN-major B, 64B swizzle; A 32B swizzle', 1,
      { mnMajor: false, span: 32, lbo: 16, sbo: 256, start: 0 }, { mnMajor: true, span: 64, lbo: 512, sbo: 4096, start: 0 }, 2048, 8192],
  ];
  for (const [name, kind, ao, bo, aBytes, bBytes] of WGMMA_CASES) {
    it(`wgmma m64n256k16 from descriptors: ${name}`, async () => {
      const enc = (x: number) => (kind === 0 ? toBf16(x) : toF16Exact(x));
      const aVal = (i: number, j: number) => ((i * 7 + j * 3) % 7) - 3;
      const bVal = (j: number, n: number) => ((j * 5 + n * 11) % 7) - 3;
      // The multiplied K columns sit at j0.. of the image's (start offsets step K by 16).
      const aJ0 = ao.mnMajor ? 0 : (ao.start % ao.span) / 2, bJ0 = bo.mnMajor ? (bo.start / bo.sbo) * 8 : (bo.start % bo.span) / 2;
      const aImg = new Uint16Array(aBytes / 2), bImg = new Uint16Array(bBytes / 2);
      for (let i = 0; i < 64; i++) for (let j = 0; j < 16; j++) aImg[byteOf(ao, i, j) / 2] = enc(aVal(i, aJ0 + j));
      for (let n = 0; n < 256; n++) for (let j = 0; j < 16; j++) bImg[byteOf(bo, n, j) / 2] = enc(bVal(bJ0 + j, n));
      const aBuf = await GpuBuffer.from(t.id, aImg), bBuf = await GpuBuffer.from(t.id, bImg);
      const dBuf = GpuBuffer.alloc(t.id, 64 * 256 * 4);
      const params = {
        kind, transB: bo.mnMajor ? 1 : 0, aBytes, bBytes,
        aSwizzle: SWIZZLE_CODE[ao.span]!, aLbo: ao.lbo, aSbo: ao.sbo, aOffset: ao.start,
        bSwizzle: SWIZZLE_CODE[bo.span]!, bLbo: bo.lbo, bSbo: bo.sbo, bOffset: bo.start,
      };
      try {
        if (!hopper()) {
          await expect(runGpuOp(t.id, 'selftest_wgmma', [aBuf, bBuf, dBuf], params)).rejects.toThrow(/compute capability 9.0/);
          return;
        }
        await runGpuOp(t.id, 'selftest_wgmma', [aBuf, bBuf, dBuf], params);
        const d = await dBuf.read(new Float32Array(64 * 256));
        for (let i = 0; i < 64; i++) {
          for (let n = 0; n < 256; n++) {
            let s = 0;
            for (let j = 0; j < 16; j++) s += aVal(i, aJ0 + j) * bVal(bJ0 + j, n);
            if (d[i * 256 + n] !== s) expect(d[i * 256 + n], `D[${i}][${n}]`).toBe(s);
          }
        }
      } finally {
        for (const b of [aBuf, bBuf, dBuf]) b.dispose();
      }
    });
  }

  if (t.emulated) {
    it('reports a stuck barrier, an mbarrier phase that never completes, an exited lane in a warp sync and bad launch configurations', async () => {
      const out = GpuBuffer.alloc(t.id, 32 * 4);
      const cases: [number, RegExp][] = [
        [0, /cannot progress.*thread \(0,0,0\) waits at a warp sync.*thread \(1,0,0\) waits at __syncthreads/],
        [1, /thread \(3,0,0\) exited before a warp sync/],
        [2, /invalid configuration: a block of 2048x1x1/],
        [3, /invalid configuration: 1048576 bytes of dynamic shared memory/],
        [4, /cannot progress.*thread \(0,0,0\) waits for an mbarrier phase/],
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
