// The saved-KV-state file format (lib/llm/kv/state.ts): round trips of synthetic blocks at block
// edges, every corrupted byte and every truncation refused with a typed error, foreign models and
// layouts refused, atomic writes, and the model identity digest on generated GGUFs.
import { copyFileSync, existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, ModelFormatError } from '../lib/errors.js';
import { read } from '../lib/llm/gguf.js';
import {
  KV_STATE_VERSION, decodeKvState, encodeKvState, modelDigest, readKvState, writeKvState,
  type KvState, type KvStateExpectation,
} from '../lib/llm/kv/state.js';
import { fixtureDir, rng, writeFixture } from './llm-fixtures.js';

const dir = fixtureDir('sonde-kv-state-');
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const DIGEST = createHash('sha256').update('model A').digest('hex');
const OTHER = createHash('sha256').update('model B').digest('hex');

/** A state of `tokens` tokens with random block bytes: 2 layers x 2 KV heads x 4 dims, K and V. */
function synthetic(tokens: number, blockSize = 4, dtype: 'f32' | 'f16' = 'f32', seed = 7): KvState {
  const rand = rng(seed);
  const blockBytes = 2 * 2 * 2 * 4 * blockSize * (dtype === 'f32' ? 4 : 2);
  const blocks = new Uint8Array(Math.ceil(tokens / blockSize) * blockBytes);
  for (let i = 0; i < blocks.length; i++) blocks[i] = Math.floor(rand() * 256);
  const ids = new Int32Array(tokens);
  for (let i = 0; i < tokens; i++) ids[i] = Math.floor(rand() * 300);
  return {
    model: { digest: DIGEST, architecture: 'llama', name: 'fixture', layers: 2, kvHeads: 2, headDim: 4 },
    kv: { dtype, blockSize, blockBytes },
    tokens: ids,
    blocks,
    chat: { messages: [{ role: 'system', content: 'Be brief. 日本語 😀' }, { role: 'user', content: 'hi' }], options: { contextOverflow: 'error' } },
  };
}

const expectation = (s: KvState): KvStateExpectation => ({ model: { ...s.model }, kv: { ...s.kv } });

function refusal(fn: () => unknown): Error {
  try {
    fn();
  } catch (e) {
    return e as Error;
  }
  throw new Error('expected a refusal, the state was accepted');
}

/** Replaces the header JSON and recomputes sizes and checksum: a well-formed file with a bad header. */
function withHeader(bytes: Uint8Array, edit: (h: Record<string, any>) => void): Uint8Array {
  const buf = Buffer.from(bytes);
  const headLen = buf.readUInt32LE(12);
  const header = JSON.parse(buf.toString('utf8', 24, 24 + headLen));
  edit(header);
  const head = Buffer.from(JSON.stringify(header));
  const rest = buf.subarray(24 + headLen, buf.length - 32);
  const out = Buffer.alloc(24 + head.length + rest.length + 32);
  buf.copy(out, 0, 0, 24);
  out.writeUInt32LE(head.length, 12);
  out.writeBigUInt64LE(BigInt(out.length), 16);
  head.copy(out, 24);
  rest.copy(out, 24 + head.length);
  createHash('sha256').update(out.subarray(0, out.length - 32)).digest().copy(out, out.length - 32);
  return out;
}

describe('KV state encoding', () => {
  it.each([0, 1, 3, 4, 5, 8, 13])('round-trips %i tokens (blocks of 4: below, at and past block edges)', (n) => {
    const s = synthetic(n);
    const back = decodeKvState(encodeKvState(s), expectation(s));
    expect(back.tokens).toEqual(s.tokens);
    expect(back.blocks).toEqual(s.blocks);
    expect(back.blocks.length).toBe(Math.ceil(n / 4) * s.kv.blockBytes);
    expect(back.chat).toEqual(s.chat);
    expect(back.model).toEqual(s.model);
    expect(back.kv).toEqual(s.kv);
  });

  it('round-trips f16 blocks and a block size of 1', () => {
    const s = synthetic(5, 1, 'f16');
    const back = decodeKvState(encodeKvState(s), expectation(s));
    expect(back.blocks).toEqual(s.blocks);
    expect(back.kv).toEqual({ dtype: 'f16', blockSize: 1, blockBytes: s.kv.blockBytes });
  });

  it('starts with the magic and version, and declares its own length', () => {
    const bytes = Buffer.from(encodeKvState(synthetic(6)));
    expect(bytes.toString('latin1', 0, 8)).toBe('SONDEKV\0');
    expect(bytes.readUInt32LE(8)).toBe(KV_STATE_VERSION);
    expect(Number(bytes.readBigUInt64LE(16))).toBe(bytes.length);
    expect(createHash('sha256').update(bytes.subarray(0, bytes.length - 32)).digest()).toEqual(bytes.subarray(bytes.length - 32));
  });

  it('refuses to encode blocks that do not match the token count', () => {
    const s = synthetic(5);
    expect(() => encodeKvState({ ...s, blocks: s.blocks.subarray(1) })).toThrow(InvalidArgumentError);
    expect(() => encodeKvState({ ...s, kv: { ...s.kv, dtype: 'bf16' as never } })).toThrow(/kv.dtype/);
    expect(() => encodeKvState({ ...s, model: { ...s.model, digest: 'abc' } })).toThrow(/model.digest/);
  });
});

describe('KV state refusals: a typed error naming what is wrong', () => {
  const s = synthetic(6);
  const good = encodeKvState(s);

  it('a corrupted byte anywhere in the file', () => {
    for (let i = 0; i < good.length; i++) {
      for (const mask of [0x01, 0x80]) {
        const bad = Uint8Array.from(good);
        bad[i]! ^= mask;
        const err = refusal(() => decodeKvState(bad, expectation(s)));
        expect(err, `byte ${i}`).toBeInstanceOf(ModelFormatError);
        // Outside the fixed prefix, the checksum is what catches it.
        if (i >= 24) expect(err.message, `byte ${i}`).toMatch(/checksum mismatch/);
      }
    }
  });

  it('a file truncated at any length', () => {
    for (let n = 0; n < good.length; n++) {
      const err = refusal(() => decodeKvState(good.subarray(0, n), expectation(s)));
      expect(err, `length ${n}`).toBeInstanceOf(ModelFormatError);
      expect(err.message, `length ${n}`).toMatch(/truncated/);
    }
  });

  it('trailing bytes', () => {
    const longer = new Uint8Array(good.length + 1);
    longer.set(good);
    expect(() => decodeKvState(longer)).toThrow(/1 more than the/);
  });

  it('a wrong magic (a GGUF file) and a wrong version', () => {
    const gguf = Buffer.from(good);
    gguf.write('GGUF', 0, 'latin1');
    expect(() => decodeKvState(gguf)).toThrow(/not a sonde KV state file/);
    const v2 = Buffer.from(good);
    v2.writeUInt32LE(KV_STATE_VERSION + 1, 8);
    expect(() => decodeKvState(v2)).toThrow(new RegExp(`format version ${KV_STATE_VERSION + 1}; this sonde reads version ${KV_STATE_VERSION}`));
  });

  it('another model\'s file, or another shape, dtype, block size or block layout', () => {
    const ex = expectation(s);
    const foreign = refusal(() => decodeKvState(good, { ...ex, model: { ...ex.model, digest: OTHER, name: 'other' } }));
    expect(foreign).toBeInstanceOf(InvalidArgumentError);
    expect(foreign.message).toMatch(/saved by another model \(llama 'fixture', identity [0-9a-f]{12}\); this model is .*'other'/);
    expect(() => decodeKvState(good, { ...ex, model: { ...ex.model, kvHeads: 4 } })).toThrow(/2 layers x 2 KV heads x 4, this model has 2 x 4 x 4/);
    expect(() => decodeKvState(good, { ...ex, kv: { ...ex.kv, dtype: 'f16' } })).toThrow(/KV dtype 'f32', this model's pool stores 'f16'/);
    expect(() => decodeKvState(good, { ...ex, kv: { ...ex.kv, blockSize: 16 } })).toThrow(/block size 4, this model's pool uses 16/);
    expect(() => decodeKvState(good, { ...ex, kv: { ...ex.kv, blockBytes: 64 } })).toThrow(/blocks of 512 bytes, this model's pool has 64/);
    for (const e of [{ ...ex, kv: { ...ex.kv, blockSize: 16 } }, { ...ex, model: { ...ex.model, digest: OTHER } }]) {
      expect(refusal(() => decodeKvState(good, e))).toBeInstanceOf(InvalidArgumentError);
    }
  });

  it('a well-checksummed file whose header does not add up', () => {
    expect(decodeKvState(withHeader(good, () => {})).tokens).toEqual(s.tokens);
    expect(() => decodeKvState(withHeader(good, (h) => { h.kv.blockCount = 1; }))).toThrow(/1 blocks cannot hold 6 tokens/);
    expect(() => decodeKvState(withHeader(good, (h) => { h.tokenCount = 5; }))).toThrow(/sections add up to/);
    expect(() => decodeKvState(withHeader(good, (h) => { delete h.model; }))).toThrow(/header.model/);
    expect(() => decodeKvState(withHeader(good, (h) => { h.kv.dtype = 'q8'; }))).toThrow(/header.kv/);
    for (const edit of [(h: any) => { h.kv.blockCount = 1; }, (h: any) => { delete h.model; }]) {
      expect(refusal(() => decodeKvState(withHeader(good, edit)))).toBeInstanceOf(ModelFormatError);
    }
  });
});

describe('KV state files', () => {
  it('writes atomically: replaces the old file in one rename and leaves no temporary behind', async () => {
    const path = join(dir, 'chat.kv');
    const a = synthetic(9, 4, 'f32', 1);
    const b = synthetic(3, 4, 'f32', 2);
    await writeKvState(path, a);
    expect((await readKvState(path, expectation(a))).tokens).toEqual(a.tokens);
    await writeKvState(path, b);
    const back = await readKvState(path, expectation(b));
    expect(back.tokens).toEqual(b.tokens);
    expect(back.blocks).toEqual(b.blocks);
    expect(readdirSync(dir).filter((f) => f.includes('chat.kv'))).toEqual(['chat.kv']);
  });

  it('a failed write leaves the old file as it was', async () => {
    const path = join(dir, 'keep.kv');
    const a = synthetic(5);
    await writeKvState(path, a);
    const before = readFileSync(path);
    await expect(writeKvState(path, { ...a, blocks: new Uint8Array(3) })).rejects.toThrow(InvalidArgumentError);
    await expect(writeKvState(join(dir, 'no-such-dir', 'x.kv'), a)).rejects.toThrow(/ENOENT/);
    expect(readFileSync(path)).toEqual(before);
    expect(readdirSync(dir).some((f) => f.endsWith('.tmp'))).toBe(false);
  });

  it('reading a missing file or a corrupted one is a typed error', async () => {
    await expect(readKvState(join(dir, 'missing.kv'))).rejects.toThrow(InvalidArgumentError);
    const path = join(dir, 'corrupt.kv');
    const bytes = Buffer.from(encodeKvState(synthetic(7)));
    bytes[bytes.length - 40]! ^= 4;
    writeFileSync(path, bytes);
    const err = await readKvState(path).then(() => undefined, (e: Error) => e);
    expect(err).toBeInstanceOf(ModelFormatError);
    expect(err!.message).toContain(path);
  });
});

describe('model identity digest', () => {
  it('tells apart models of one shape with other weights or metadata, and not copies of a file', async () => {
    const a = join(dir, 'a.gguf');
    const b = join(dir, 'b.gguf');
    const c = join(dir, 'c.gguf');
    const copy = join(dir, 'a-copy.gguf');
    await writeFixture(a, { kind: 'llama', seed: 1 });
    await writeFixture(b, { kind: 'llama', seed: 2 });
    await writeFixture(c, { kind: 'llama', seed: 1, metadata: { 'general.name': 'renamed' } });
    copyFileSync(a, copy);
    const digests: string[] = [];
    for (const p of [a, b, c, copy]) {
      const f = await read(p);
      try {
        digests.push(await modelDigest(f));
      } finally {
        f.dispose();
      }
    }
    for (const d of digests) expect(d).toMatch(/^[0-9a-f]{64}$/);
    expect(new Set(digests.slice(0, 3)).size).toBe(3);
    expect(digests[3]).toBe(digests[0]);
    expect(existsSync(a)).toBe(true);
  });

  it('a model file removed or resized since it was mapped is a ModelFormatError', async () => {
    const p = join(dir, 'moved.gguf');
    await writeFixture(p, { kind: 'llama', seed: 4 });
    const f = await read(p);
    try {
      writeFileSync(p, Buffer.concat([readFileSync(p), Buffer.alloc(1)]));
      await expect(modelDigest(f)).rejects.toThrow(/changed since it was loaded \(\d+ bytes, \d+ when mapped\)/);
      rmSync(p);
      await expect(modelDigest(f)).rejects.toThrow(ModelFormatError);
    } finally {
      f.dispose();
    }
  });

  it('changes when a single weight byte in the middle of a tensor changes', async () => {
    const a = join(dir, 'w.gguf');
    await writeFixture(a, { kind: 'qwen2', seed: 3 });
    const f = await read(a);
    const t = f.tensor('blk.0.attn_q.weight')!;
    const at = f.dataOffset + t.offset + Math.floor((t.bytes - 64) / 2) + 10;
    const before = await modelDigest(f);
    f.dispose();
    const bytes = readFileSync(a);
    bytes[at]! ^= 1;
    const b = join(dir, 'w2.gguf');
    writeFileSync(b, bytes);
    const g = await read(b);
    try {
      expect(await modelDigest(g)).not.toBe(before);
    } finally {
      g.dispose();
    }
  });
});
