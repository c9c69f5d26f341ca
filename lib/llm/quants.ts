/**
 * Encoders of the GGUF tensor types sonde writes, in plain TypeScript (per-load and file-writing
 * work, not a hot path). They match ggml's reference code bit for bit, so a file written here
 * holds what llama.cpp's own converter would write:
 * - f16: IEEE binary16, round to nearest even, overflow to ±Inf, subnormals kept (FP32_TO_FP16).
 * - bf16: the upper half of the float32, round to nearest even; NaN stays a quiet NaN (ggml's
 *   ggml_compute_fp32_to_bf16).
 * - q8_0 (quantize_row_q8_0_ref): per block of 32, d = amax / 127, id = d ? 1 / d : 0,
 *   q = roundf(x * id) (half away from zero), d stored as f16. All products in float32.
 * - q4_0 (quantize_row_q4_0_ref): per block of 32, max = the value of largest magnitude (the first
 *   one on ties), d = max / -8, id = d ? 1 / d : 0, q = min(15, trunc(x * id + 8.5)), element j < 16
 *   in the low nibble of byte j, element j + 16 in its high nibble, d stored as f16.
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
const fr = Math.fround;

/** float32 value -> IEEE half bits (round to nearest even). */
export function f32ToF16(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const ax = x & 0x7fffffff;
  if (ax > 0x7f800000) return sign | 0x7e00 | ((ax >>> 13) & 0x3ff);  // NaN stays NaN
  if (ax >= 0x477ff000) return sign | 0x7c00;  // rounds to >= 65520: Inf
  if (ax < 0x38800000) {  // below 2^-14: a subnormal half (or zero)
    if (ax < 0x33000000) return sign;  // below 2^-25: rounds to zero
    const e = ax >>> 23;
    const mant = (ax & 0x7fffff) | 0x800000;
    const shift = 126 - e;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  let h = (ax >>> 13) - (112 << 10);
  const rem = ax & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++;  // a carry into the exponent is right
  return sign | h;
}

/** IEEE half bits -> number (exact). */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

/** float32 value -> bfloat16 bits (round to nearest even). */
export function f32ToBf16(value: number): number {
  f32[0] = value;
  const u = u32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16ToF32(b: number): number {
  u32[0] = (b << 16) >>> 0;
  return f32[0]!;
}

/** roundf: nearest, halves away from zero. */
function roundAway(v: number): number {
  return v < 0 ? -Math.floor(-v + 0.5) : Math.floor(v + 0.5);
}

export type EncodableType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_0';

/** Bytes of `elements` values of `type` (a multiple of 32 for the block types). */
export function encodedBytes(type: EncodableType, elements: number): number {
  switch (type) {
    case 'f32': return elements * 4;
    case 'f16': case 'bf16': return elements * 2;
    case 'q8_0': return (elements / 32) * 34;
    case 'q4_0': return (elements / 32) * 18;
  }
}

/** Encodes float32 values (row-major, rows of a multiple of 32 for the block types) as `type`. */
export function encode(type: EncodableType, x: Float32Array): Uint8Array {
  const out = new Uint8Array(encodedBytes(type, x.length));
  const view = new DataView(out.buffer);
  switch (type) {
    case 'f32':
      out.set(new Uint8Array(x.buffer, x.byteOffset, x.byteLength));
      break;
    case 'f16':
      for (let i = 0; i < x.length; i++) view.setUint16(2 * i, f32ToF16(x[i]!), true);
      break;
    case 'bf16':
      for (let i = 0; i < x.length; i++) view.setUint16(2 * i, f32ToBf16(x[i]!), true);
      break;
    case 'q8_0':
      for (let b = 0; b < x.length / 32; b++) {
        const o = b * 34;
        let amax = 0;
        for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]!));
        const d = fr(amax / 127);
        const id = d ? fr(1 / d) : 0;
        view.setUint16(o, f32ToF16(d), true);
        for (let j = 0; j < 32; j++) view.setInt8(o + 2 + j, roundAway(fr(x[b * 32 + j]! * id)));
      }
      break;
    case 'q4_0':
      for (let b = 0; b < x.length / 32; b++) {
        const o = b * 18;
        let amax = 0;
        let max = 0;
        for (let j = 0; j < 32; j++) {
          const v = x[b * 32 + j]!;
          if (amax < Math.abs(v)) { amax = Math.abs(v); max = v; }
        }
        const d = fr(max / -8);
        const id = d ? fr(1 / d) : 0;
        view.setUint16(o, f32ToF16(d), true);
        for (let j = 0; j < 16; j++) {
          // (int8_t)(x0 + 8.5f) truncates toward zero; the sum is in [0, 17).
          const lo = Math.min(15, Math.trunc(fr(fr(x[b * 32 + j]! * id) + 8.5)) | 0);
          const hi = Math.min(15, Math.trunc(fr(fr(x[b * 32 + 16 + j]! * id) + 8.5)) | 0);
          out[o + 2 + j] = lo | (hi << 4);
        }
      }
      break;
  }
  return out;
}

/** Decodes `type` bytes back to float32 (exact: every stored value is a float32). */
export function decode(type: EncodableType, bytes: Uint8Array, elements: number): Float32Array {
  const out = new Float32Array(elements);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (type) {
    case 'f32':
      for (let i = 0; i < elements; i++) out[i] = view.getFloat32(4 * i, true);
      break;
    case 'f16':
      for (let i = 0; i < elements; i++) out[i] = f16ToF32(view.getUint16(2 * i, true));
      break;
    case 'bf16':
      for (let i = 0; i < elements; i++) out[i] = bf16ToF32(view.getUint16(2 * i, true));
      break;
    case 'q8_0':
      for (let b = 0; b < elements / 32; b++) {
        const d = f16ToF32(view.getUint16(b * 34, true));
        for (let j = 0; j < 32; j++) out[b * 32 + j] = d * view.getInt8(b * 34 + 2 + j);
      }
      break;
    case 'q4_0':
      for (let b = 0; b < elements / 32; b++) {
        const d = f16ToF32(view.getUint16(b * 18, true));
        for (let j = 0; j < 16; j++) {
          const q = bytes[b * 18 + 2 + j]!;
          out[b * 32 + j] = d * ((q & 15) - 8);
          out[b * 32 + 16 + j] = d * ((q >> 4) - 8);
        }
      }
      break;
  }
  return out;
}
