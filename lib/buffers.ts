/**
 * Output allocation. Large outputs come from the native BufferPool (see native/runtime/buffer_pool.h)
 * as external ArrayBuffers, so a steady stream of runs reuses warm memory instead of paying an
 * mmap, page faults and a zero fill per output. Their contents start unspecified: use these only
 * for outputs the native op writes completely.
 */
import { native } from './binding.js';

/** Below this, V8's own allocation is as cheap as the pool's. */
const POOL_MIN_BYTES = 64 * 1024;

type TypedArrayCtor<T> = { new (length: number): T; new (buffer: ArrayBuffer, byteOffset: number, length: number): T; BYTES_PER_ELEMENT: number };

export function allocOutput<T>(ctor: TypedArrayCtor<T>, length: number): T {
  const bytes = length * ctor.BYTES_PER_ELEMENT;
  if (bytes < POOL_MIN_BYTES) return new ctor(length);
  return new ctor(native().allocBuffer(bytes), 0, length);
}
