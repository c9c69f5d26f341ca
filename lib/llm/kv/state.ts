/**
 * Saved KV state (issue #9, item 6): a conversation's cached keys and values, its token ids and its
 * chat messages in one file, so a chat can stop and resume (another process, another day) without
 * recomputing its prompt.
 *
 * Layout (little-endian), every byte covered by the trailing checksum:
 *
 *   0   magic        8 bytes  "SONDEKV\0"
 *   8   version      u32      KV_STATE_VERSION
 *   12  headerBytes  u32      length of the header JSON
 *   16  totalBytes   u64      length of the whole file, checksum included
 *   24  header       JSON     { model, kv, tokenCount, chatBytes } (KvStateHeader)
 *       tokens       i32 x tokenCount
 *       chat         JSON     chatBytes bytes (the chat's messages and options)
 *       blocks       blockBytes x blockCount   (KvPool.readBlocks, in position order)
 *   end-32 sha256    32 bytes over everything before it
 *
 * totalBytes sits before the header so that a truncated file is told apart from a corrupted one
 * before the checksum is even computed. The header is JSON because it is small and its fields
 * will grow; the bulk (tokens, blocks) is binary.
 *
 * The model's identity is a sha256 over the GGUF's metadata (keys, types, values), its tensor
 * table (names, types, dims, offsets, sizes), the total tensor data size and a few bytes sampled
 * from the start, middle and end of every tensor's data. Metadata and table alone do not tell
 * apart two files of one architecture and size with different weights (a fine-tune, another
 * seed); hashing all the data would read gigabytes to save a few megabytes, the samples read a
 * few kilobytes and differ between any two independently trained or perturbed weight sets.
 */
import { createHash } from 'node:crypto';
import { open, readFile, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { InvalidArgumentError, ModelFormatError } from '../../errors.js';
import type { KvDtype } from '../engine.js';
import type { GgufFile, GgufValue } from '../gguf.js';

export const KV_STATE_MAGIC = 'SONDEKV\0';
export const KV_STATE_VERSION = 1;
const PREFIX_BYTES = 24;
const CHECKSUM_BYTES = 32;
const IDENTITY_SAMPLE_BYTES = 64;

/** Which model (and which cache layout) a state belongs to. */
export interface KvStateModel {
  /** Hex sha256 of the model's identity (modelDigest). */
  digest: string;
  /** For messages only: what the file says it was saved with. */
  architecture: string;
  name?: string;
  layers: number;
  kvHeads: number;
  headDim: number;
}

export interface KvStateLayout {
  dtype: KvDtype;
  /** Positions per block. */
  blockSize: number;
  /** Bytes of one block as KvPool.readBlocks gives them. */
  blockBytes: number;
}

export interface KvState {
  model: KvStateModel;
  kv: KvStateLayout;
  /** Token ids whose K/V the blocks hold, in position order. */
  tokens: Int32Array;
  /** ceil(tokens.length / blockSize) blocks of kv.blockBytes, in position order. */
  blocks: Uint8Array;
  /** The chat's messages and options: any JSON value. */
  chat: unknown;
}

interface KvStateHeader {
  model: KvStateModel;
  kv: KvStateLayout & { blockCount: number };
  tokenCount: number;
  chatBytes: number;
}

/** What the reader checks a file against: the model and pool that will use it. */
export interface KvStateExpectation {
  model: Pick<KvStateModel, 'digest' | 'layers' | 'kvHeads' | 'headDim'> & Partial<KvStateModel>;
  kv: KvStateLayout;
}

const DTYPES: readonly KvDtype[] = ['f32', 'f16'];

// ---------------------------------------------------------------------------------------------
// Model identity

/** Canonical text of a metadata value: type-tagged so 1 (uint32) and 1 (float32) differ. */
function canonical(value: GgufValue): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  if (typeof value === 'bigint') return `${value}n`;
  if (typeof value === 'number') return Object.is(value, -0) ? '-0' : String(value);
  if (typeof value === 'string') return JSON.stringify(value);
  return String(value);
}

/**
 * The identity digest (hex sha256) of a mapped GGUF file; see the file comment for what it covers.
 * Reads only the sampled bytes of each tensor, from `file.path` (the mapping has no byte accessor
 * in JS); a file that is gone or has another size than the mapped one is a ModelFormatError.
 */
export async function modelDigest(file: GgufFile): Promise<string> {
  const h = createHash('sha256');
  h.update('sonde-model-identity-v1\0');
  const keys = Object.keys(file.metadata).sort();
  for (const k of keys) h.update(`${JSON.stringify(k)}:${file.metadataTypes[k]}=${canonical(file.metadata[k]!)}\0`);
  let dataBytes = 0;
  for (const t of file.tensors) {
    h.update(`${JSON.stringify(t.name)}:${t.type}:${t.dims.join('x')}@${t.offset}+${t.bytes}\0`);
    dataBytes += t.bytes;
  }
  h.update(`data=${dataBytes}\0`);
  const changed = (why: string, cause?: unknown) => new ModelFormatError(
    `${file.path}: cannot compute the model's identity, the file changed since it was loaded (${why})`, { cause });
  let fd: Awaited<ReturnType<typeof open>>;
  try {
    fd = await open(file.path, 'r');
  } catch (err) {
    throw changed((err as Error).message, err);
  }
  try {
    const size = (await fd.stat()).size;
    if (size !== file.fileSize) throw changed(`${size} bytes, ${file.fileSize} when mapped`);
    const sample = Buffer.alloc(IDENTITY_SAMPLE_BYTES);
    for (const t of file.tensors) {
      const n = Math.min(IDENTITY_SAMPLE_BYTES, t.bytes);
      for (const at of new Set([0, Math.floor((t.bytes - n) / 2), t.bytes - n])) {
        const { bytesRead } = await fd.read(sample, 0, n, file.dataOffset + t.offset + at);
        h.update(sample.subarray(0, bytesRead));
      }
    }
  } finally {
    await fd.close();
  }
  return h.digest('hex');
}

// ---------------------------------------------------------------------------------------------
// Encoding

function blockCountOf(tokens: number, blockSize: number): number {
  return Math.ceil(tokens / blockSize);
}

function checkState(where: string, s: KvState): void {
  const { kv } = s;
  if (!DTYPES.includes(kv.dtype)) throw new InvalidArgumentError(`${where}: kv.dtype must be 'f32' or 'f16', got ${JSON.stringify(kv.dtype)}`);
  for (const [name, v] of [['kv.blockSize', kv.blockSize], ['kv.blockBytes', kv.blockBytes], ['model.layers', s.model.layers],
    ['model.kvHeads', s.model.kvHeads], ['model.headDim', s.model.headDim]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new InvalidArgumentError(`${where}: ${name} must be a positive integer, got ${v}`);
  }
  if (!/^[0-9a-f]{64}$/.test(s.model.digest)) throw new InvalidArgumentError(`${where}: model.digest must be 64 hex digits (a sha256)`);
  if (!(s.tokens instanceof Int32Array)) throw new InvalidArgumentError(`${where}: tokens must be an Int32Array`);
  const want = blockCountOf(s.tokens.length, kv.blockSize) * kv.blockBytes;
  if (!(s.blocks instanceof Uint8Array) || s.blocks.byteLength !== want) {
    throw new InvalidArgumentError(`${where}: blocks must be ${want} bytes (${blockCountOf(s.tokens.length, kv.blockSize)} blocks of ${kv.blockBytes} for ${s.tokens.length} tokens), got ${s.blocks?.byteLength}`);
  }
}

/** The bytes of a state file (see the layout above). */
export function encodeKvState(state: KvState): Uint8Array {
  checkState('encodeKvState', state);
  const chat = Buffer.from(JSON.stringify(state.chat ?? null), 'utf8');
  const header: KvStateHeader = {
    model: { ...state.model },
    kv: { dtype: state.kv.dtype, blockSize: state.kv.blockSize, blockBytes: state.kv.blockBytes, blockCount: blockCountOf(state.tokens.length, state.kv.blockSize) },
    tokenCount: state.tokens.length,
    chatBytes: chat.byteLength,
  };
  const head = Buffer.from(JSON.stringify(header), 'utf8');
  const total = PREFIX_BYTES + head.byteLength + state.tokens.length * 4 + chat.byteLength + state.blocks.byteLength + CHECKSUM_BYTES;
  const out = Buffer.alloc(total);
  out.write(KV_STATE_MAGIC, 0, 'latin1');
  out.writeUInt32LE(KV_STATE_VERSION, 8);
  out.writeUInt32LE(head.byteLength, 12);
  out.writeBigUInt64LE(BigInt(total), 16);
  let at = PREFIX_BYTES;
  at += head.copy(out, at);
  for (let i = 0; i < state.tokens.length; i++, at += 4) out.writeInt32LE(state.tokens[i]!, at);
  at += chat.copy(out, at);
  out.set(state.blocks, at);
  at += state.blocks.byteLength;
  createHash('sha256').update(out.subarray(0, at)).digest().copy(out, at);
  return out;
}

function fail(source: string, what: string): ModelFormatError {
  return new ModelFormatError(`${source}: ${what}`);
}

function isPositiveInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 1;
}

/**
 * Parses and checks a state file's bytes: size, magic, version, checksum, then the header's own
 * consistency, then (when `expect` is given) that it belongs to that model and cache layout.
 * Integrity problems are ModelFormatErrors; a sound file for another model or layout is an
 * InvalidArgumentError. `source` names the file in messages.
 */
export function decodeKvState(bytes: Uint8Array, expect?: KvStateExpectation, source = 'KV state'): KvState {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.byteLength < 8 || buf.toString('latin1', 0, 8) !== KV_STATE_MAGIC) {
    if (buf.byteLength < 8 && Buffer.from(KV_STATE_MAGIC, 'latin1').subarray(0, buf.byteLength).equals(buf)) {
      throw fail(source, `truncated: ${buf.byteLength} bytes, shorter than the ${PREFIX_BYTES}-byte prefix`);
    }
    throw fail(source, `not a sonde KV state file (its first bytes are not the magic "SONDEKV\\0")`);
  }
  if (buf.byteLength < PREFIX_BYTES) throw fail(source, `truncated: ${buf.byteLength} bytes, shorter than the ${PREFIX_BYTES}-byte prefix`);
  const version = buf.readUInt32LE(8);
  if (version !== KV_STATE_VERSION) throw fail(source, `format version ${version}; this sonde reads version ${KV_STATE_VERSION}`);
  const declared = buf.readBigUInt64LE(16);
  if (declared !== BigInt(buf.byteLength)) {
    throw fail(source, declared > BigInt(buf.byteLength)
      ? `truncated: ${buf.byteLength} bytes of the ${declared} its prefix declares`
      : `${buf.byteLength} bytes, ${BigInt(buf.byteLength) - declared} more than the ${declared} its prefix declares`);
  }
  const total = buf.byteLength;
  if (total < PREFIX_BYTES + CHECKSUM_BYTES) throw fail(source, `truncated: ${total} bytes cannot hold a header and a checksum`);
  const body = total - CHECKSUM_BYTES;
  const sum = createHash('sha256').update(buf.subarray(0, body)).digest();
  if (!sum.equals(buf.subarray(body))) throw fail(source, 'checksum mismatch: the file is corrupted (its sha256 does not match its contents)');

  // From here the bytes are what was written; the checks below catch a writer's bug or a
  // hand-made file with a valid checksum.
  const headerBytes = buf.readUInt32LE(12);
  if (PREFIX_BYTES + headerBytes > body) throw fail(source, `header of ${headerBytes} bytes runs past the end of the file`);
  let header: KvStateHeader;
  try {
    header = JSON.parse(buf.toString('utf8', PREFIX_BYTES, PREFIX_BYTES + headerBytes)) as KvStateHeader;
  } catch (e) {
    throw fail(source, `header is not JSON: ${(e as Error).message}`);
  }
  const m = header?.model;
  const kv = header?.kv;
  if (!m || typeof m.digest !== 'string' || typeof m.architecture !== 'string' || !isPositiveInt(m.layers) || !isPositiveInt(m.kvHeads) || !isPositiveInt(m.headDim)) {
    throw fail(source, 'header.model is missing or malformed');
  }
  if (!kv || !DTYPES.includes(kv.dtype) || !isPositiveInt(kv.blockSize) || !isPositiveInt(kv.blockBytes) || !Number.isInteger(kv.blockCount)) {
    throw fail(source, 'header.kv is missing or malformed');
  }
  const tokenCount = header.tokenCount;
  const chatBytes = header.chatBytes;
  if (!Number.isInteger(tokenCount) || tokenCount < 0 || !Number.isInteger(chatBytes) || chatBytes < 0) {
    throw fail(source, 'header.tokenCount or header.chatBytes is malformed');
  }
  if (kv.blockCount !== blockCountOf(tokenCount, kv.blockSize)) {
    throw fail(source, `${kv.blockCount} blocks cannot hold ${tokenCount} tokens in blocks of ${kv.blockSize}`);
  }
  const want = PREFIX_BYTES + headerBytes + tokenCount * 4 + chatBytes + kv.blockCount * kv.blockBytes + CHECKSUM_BYTES;
  if (want !== total) throw fail(source, `its sections add up to ${want} bytes, the file has ${total}`);

  if (expect) {
    const e = expect.model;
    if (m.digest !== e.digest) {
      const saved = `${m.architecture}${m.name ? ` '${m.name}'` : ''}, identity ${m.digest.slice(0, 12)}`;
      const here = `${e.architecture ?? 'this model'}${e.name ? ` '${e.name}'` : ''}, identity ${e.digest.slice(0, 12)}`;
      throw new InvalidArgumentError(`${source}: saved by another model (${saved}); this model is ${here}`);
    }
    if (m.layers !== e.layers || m.kvHeads !== e.kvHeads || m.headDim !== e.headDim) {
      throw new InvalidArgumentError(`${source}: KV shape ${m.layers} layers x ${m.kvHeads} KV heads x ${m.headDim}, this model has ${e.layers} x ${e.kvHeads} x ${e.headDim}`);
    }
    if (kv.dtype !== expect.kv.dtype) throw new InvalidArgumentError(`${source}: KV dtype '${kv.dtype}', this model's pool stores '${expect.kv.dtype}'`);
    if (kv.blockSize !== expect.kv.blockSize) throw new InvalidArgumentError(`${source}: block size ${kv.blockSize}, this model's pool uses ${expect.kv.blockSize}`);
    if (kv.blockBytes !== expect.kv.blockBytes) throw new InvalidArgumentError(`${source}: blocks of ${kv.blockBytes} bytes, this model's pool has ${expect.kv.blockBytes}`);
  }

  let at = PREFIX_BYTES + headerBytes;
  const tokens = new Int32Array(tokenCount);
  for (let i = 0; i < tokenCount; i++, at += 4) tokens[i] = buf.readInt32LE(at);
  let chat: unknown;
  try {
    chat = JSON.parse(buf.toString('utf8', at, at + chatBytes));
  } catch (e) {
    throw fail(source, `chat section is not JSON: ${(e as Error).message}`);
  }
  at += chatBytes;
  const blocks = new Uint8Array(buf.subarray(at, at + kv.blockCount * kv.blockBytes));
  return {
    model: { digest: m.digest, architecture: m.architecture, ...(typeof m.name === 'string' ? { name: m.name } : {}), layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim },
    kv: { dtype: kv.dtype, blockSize: kv.blockSize, blockBytes: kv.blockBytes },
    tokens,
    blocks,
    chat,
  };
}

/**
 * Writes a state file atomically: the bytes go to a temporary file beside `path`, are flushed to
 * disk, and replace `path` in one rename, so a reader sees the old file or the new one, never half.
 */
export async function writeKvState(path: string, state: KvState): Promise<void> {
  if (typeof path !== 'string' || path.length === 0) throw new InvalidArgumentError(`writeKvState(path): path must be a non-empty string`);
  const bytes = encodeKvState(state);
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`);
  const fd = await open(tmp, 'wx');
  try {
    try {
      await fd.writeFile(bytes);
      await fd.sync();
    } finally {
      await fd.close();
    }
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
}

/** Reads and checks a state file (decodeKvState); a missing or unreadable file is an InvalidArgumentError. */
export async function readKvState(path: string, expect?: KvStateExpectation): Promise<KvState> {
  if (typeof path !== 'string' || path.length === 0) throw new InvalidArgumentError(`readKvState(path): path must be a non-empty string`);
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    throw new InvalidArgumentError(`${path}: cannot read the KV state file: ${(err as Error).message}`, { cause: err });
  }
  return decodeKvState(bytes, expect, path);
}
