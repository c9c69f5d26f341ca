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
 * Bytes of native memory that addons in this thread have reported to V8 (sonde reports every
 * long-lived allocation, such as packed weights, so that V8's GC sees the pressure).
 */
export function reportedExternalMemory(): number {
  return native().externalMemory();
}
