// The q8 rule by which GPU ops that write their output quantised (as quant_matmul's activations)
// must have quantised it, applied here to the op's own fp32 output: per block of 32, d = amax / 127
// and q = rint(v * (127 / amax)) in fp32; a block with a NaN or an infinity gets d = NaN and zeros,
// one below 2^-120 is zero. The bytes are compared exactly.
import { expect } from 'vitest';

const f32 = Math.fround;

/** Round half to even, as rintf. */
function rint(v: number): number {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export function checkQuantised(y: Float32Array, scratch: Uint8Array, count: number, what: string): void {
  const q = new Int8Array(scratch.buffer, scratch.byteOffset, count);
  const d = new Float32Array(scratch.buffer.slice(scratch.byteOffset + count, scratch.byteOffset + count + count / 32 * 4));
  for (let b = 0; b < count / 32; b++) {
    const block = y.subarray(b * 32, b * 32 + 32);
    const finite = block.every((v) => Number.isFinite(v));
    const amax = finite ? Math.max(...Array.from(block, Math.abs)) : 0;
    const zero = !finite || amax < 7.52316384526264e-37;
    const id = zero ? 0 : f32(127 / amax);
    if (!finite) expect(d[b], `${what} scale of block ${b}`).toBeNaN();
    else expect(d[b], `${what} scale of block ${b}`).toBe(zero ? 0 : f32(amax / 127));
    for (let i = 0; i < 32; i++) {
      const want = zero ? 0 : rint(f32(block[i]! * id));
      if (q[b * 32 + i] !== want) expect(q[b * 32 + i], `${what} q[${b * 32 + i}] of ${block[i]}`).toBe(want);
    }
  }
}
