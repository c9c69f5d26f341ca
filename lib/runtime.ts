/** Process-wide runtime settings (per Node environment: each worker_thread has its own pool). */
import { native } from './binding.js';
import { checkInt } from './validate.js';

/** Sets the size of sonde's compute pool for this thread's environment (default: all cores). */
export function setThreads(threads: number): void {
  native().setThreads(checkInt('setThreads(threads)', threads, 1, 1024));
}

/** The current size of the compute pool. */
export function getThreads(): number {
  return native().getThreads();
}

/** Version of the loaded native addon. */
export function nativeVersion(): string {
  return native().version;
}

/**
 * Bytes of native memory that sonde holds in this thread's environment and has reported to V8 (every
 * long-lived allocation, such as packed weights, models and KV caches, and the output buffers JS
 * holds), so that V8's GC sees the pressure. V8's own external total also counts every ArrayBuffer
 * and falls as collections free them, so it is not this number.
 */
export function reportedExternalMemory(): number {
  return native().nativeMemory();
}
