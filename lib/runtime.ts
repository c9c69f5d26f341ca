/** Process-wide runtime settings (per Node environment: each worker_thread has its own pool). */
import { native } from './binding.js';
import { checkInt, checkOneOf } from './validate.js';

/** Sets the size of sonde's compute pool for this thread's environment (default: one thread per CPU the process may run on). */
export function setThreads(threads: number): void {
  native().setThreads(checkInt('setThreads(threads)', threads, 1, 1024));
}

/** The current size of the compute pool. */
export function getThreads(): number {
  return native().getThreads();
}

/**
 * Whether the compute pool's threads are pinned, one per CPU: 'on' pins them to the CPUs of the
 * process's affinity mask in order (round robin, from an offset that differs between pools), 'off'
 * lets them run on any of those CPUs, and
 * 'auto' (the default; `SONDE_PIN_THREADS` sets the initial mode) pins only while the pool has one
 * thread per allowed CPU and other processes leave the CPUs nearly idle (pinned threads of two
 * busy processes collide on one CPU where floating ones are spread). On virtual machines the guest
 * scheduler can queue a freshly woken helper thread on its waker's busy CPU while another sits
 * idle, and a pinned thread cannot be placed so. Linux only; elsewhere the mode is recorded and
 * nothing is pinned.
 */
export type ThreadAffinity = 'auto' | 'on' | 'off';
const AFFINITY_MODES: readonly ThreadAffinity[] = ['auto', 'on', 'off'];

/** Sets the pool's affinity mode (see ThreadAffinity); applies at once. */
export function setThreadAffinity(mode: ThreadAffinity): void {
  native().setThreadAffinity(checkOneOf('setThreadAffinity(mode)', mode, AFFINITY_MODES));
}

/** What getThreadAffinity() reports. */
export interface ThreadAffinityState {
  mode: ThreadAffinity;
  /** Whether the pool's threads are pinned now. */
  pinned: boolean;
  /** Other processes kept the CPUs busy lately (sampled about every 250 ms): 'auto' does not pin. */
  machineBusy: boolean;
  /** Runs were picked up late by preempted threads lately (the pool's contended window): no pinning. */
  contended: boolean;
  /** The CPUs each of the pool's threads may run on, as the OS reports them (parked threads included). */
  cpus: number[][];
}

/** The pool's affinity mode and state (see ThreadAffinityState). */
export function getThreadAffinity(): ThreadAffinityState {
  return native().getThreadAffinity();
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
