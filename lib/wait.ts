/**
 * How the JS thread waits for a native run. A run's completion reaches JS through libuv's async
 * handle; when the event loop has nothing else to do it sleeps in epoll_wait, and waking an idle
 * core from that sleep is slow on virtual machines: on the 2-core Xeon VM a one-thread run of the
 * 90%-pruned MLP at batch 1 took 81 us sleeping and 48 us with the loop kept polling, its kernels
 * ~45 us. While short runs are in flight, a chain of setImmediate callbacks keeps the loop polling
 * with a zero timeout instead, so a completion is picked up as soon as it is signalled. Timers and
 * I/O still run between the polls (the loop is not blocked); the price is the JS thread's core for
 * the length of the run. That core must be free: with every core computing, the polling thread took
 * cycles from the run (the same MLP on two threads of two cores: 39 us sleeping, 71 us polling), so
 * polling stops whenever the jobs in flight hold every core (those of other worker_threads too),
 * whatever a session asked for, except for very short runs (below).
 *
 * A job that no pool thread has taken within START_YIELD_US may have been queued on the polling
 * thread's own core: the kernel placed the woken pool thread there on the Xeon VM after the loop
 * had slept, with the other vCPU idle, and it waited for the poller's time slice to end (a
 * one-thread MLP run after a 1 ms pause took 0.7-1.2 ms, its kernels 50 us). The poll then yields
 * the core to it (a no-op when the thread is on another core). Polling goes on: a job kept waiting
 * longer by other processes' threads is still polled for (giving up at 250 us stopped a 'poll'
 * session's polling for whole runs under CI's load).
 *
 * Runs that take every core poll too under 'auto' when they are very short (POLL_FULL_MAX_RUN_MS):
 * for those the event loop's sleep and wake-up cost as much as the run, and each poll yields the
 * JS thread's core, so the pool threads lose little to the polls (the 90%-pruned MLP at batch 1 on
 * two threads of two cores, blocks alternating in one process: 66 -> 45 us per run back to back,
 * 105 -> 71 with onnxruntime-node's call before each, 106 -> 109 after 1 ms pauses). At batch 32
 * (~0.2 ms a run) polling so lost more to the polls than it saved on the wake-up.
 */
import { availableParallelism } from 'node:os';
import { native } from './binding.js';

/** How a session's runs wait: see SessionOptions.wait. */
export type WaitMode = 'auto' | 'poll' | 'sleep';

/**
 * A job not taken by a pool thread this long after its submission (us) has not found a spinning
 * thread (those take it within 1-2 us): from then on each poll yields the JS thread's core.
 */
export const START_YIELD_US = 5;

/** 'auto' polls for runs measured shorter than this (ms); the wake-up it saves is noise beyond. */
export const POLL_MAX_RUN_MS = 1;
/** ... and for runs that take every core, measured shorter than this (ms). */
export const POLL_FULL_MAX_RUN_MS = 0.15;

const cores = availableParallelism();
/**
 * Pool threads held by the jobs in flight in the whole process: every worker_thread's pool counts,
 * since a worker computing on a core leaves one core fewer for this thread to poll on.
 */
const busyThreads = (): number => native().busyThreads();
/**
 * Polled runs in flight, when the chain gives up on them, and until when it polls while the jobs in
 * flight hold every core (performance.now()).
 */
let polled = 0;
let pollUntil = 0;
let fullUntil = 0;
let chained = false;
/** setImmediate callbacks run so far (tests check that polling starts and stops). */
let ticks = 0;

function tick(): void {
  ticks++;
  const now = performance.now();
  const full = busyThreads() >= cores;
  // At full cores every poll yields (the pool threads' cores are the JS thread's too); otherwise
  // only while a job waits to start.
  if (polled > 0 && (full || native().startWaitUs() > START_YIELD_US)) native().yieldCpu();
  const more = polled > 0 && now < pollUntil && (!full || now < fullUntil);
  if (more) setImmediate(tick);
  else chained = false;
}

/**
 * Tracks a native run (already started: its pool threads are counted) until `run` settles, keeping
 * the event loop polling for at most `pollMs` (0: not at all) while a core is left, or for at most
 * `fullMs` while the jobs in flight hold every core, then calls onSettled with whether it resolved
 * and to what. Adds no step to the caller's await of `run`.
 */
export function trackRun(run: Promise<unknown>, pollMs: number, onSettled?: (ok: boolean, value?: unknown) => void, fullMs = 0): void {
  const poll = pollMs > 0;
  if (poll) {
    polled++;
    const now = performance.now();
    pollUntil = Math.max(pollUntil, now + pollMs);
    if (fullMs > 0) fullUntil = Math.max(fullUntil, now + Math.min(pollMs, fullMs));
    if (!chained && (busyThreads() < cores || now < fullUntil)) {
      chained = true;
      setImmediate(tick);
    }
  }
  if (!poll && !onSettled) return;
  const settled = (ok: boolean, value?: unknown) => {
    if (poll) polled--;
    onSettled?.(ok, value);
  };
  run.then((value) => settled(true, value), () => settled(false));
}

/**
 * How long a session's run should keep the loop polling (ms, 0: sleep), from its mode, the pool
 * threads it runs on and the smoothed time of its recent runs (NaN before the first). Where the run
 * takes every core, what fullPollBudget allows is the whole budget.
 */
export function pollBudget(mode: WaitMode, threads: number, recentMs: number): number {
  if (mode === 'sleep') return 0;
  const expected = Number.isNaN(recentMs) ? POLL_MAX_RUN_MS : recentMs;
  if (mode === 'poll') return Math.max(2 * POLL_MAX_RUN_MS, 2 * expected);
  if (threads >= cores) return fullPollBudget(mode, recentMs);
  if (expected > POLL_MAX_RUN_MS) return 0;
  return 2 * expected + 0.1;
}

/**
 * How long a run may keep the loop polling while the jobs in flight hold every core (ms): only
 * 'auto' runs measured under POLL_FULL_MAX_RUN_MS (not a first run, whose length is unknown).
 */
export function fullPollBudget(mode: WaitMode, recentMs: number): number {
  if (mode !== 'auto' || Number.isNaN(recentMs) || recentMs > POLL_FULL_MAX_RUN_MS) return 0;
  return 2 * recentMs + 0.05;
}

/** Smoothed time on the pool (ms) of recent kernel calls, by the caller's key of their shape. */
const kernelMs = new Map<string, number>();
/** Shapes remembered at most (the oldest forgotten first). */
const KERNEL_KEYS = 256;

/**
 * A kernel call (sonde.kernels.*) on `threads` pool threads (0: the whole pool), tracked as a
 * session's run is: its wait chosen from the smoothed time on the pool of earlier calls of the same
 * `key` (the kernel, its sizes, threads), as 'auto' chooses for a session's runs, so a short call
 * on every core polls too; a key's first call waits as a run of unknown length (polling for up to
 * twice POLL_MAX_RUN_MS while it leaves a core free). Returns `run`.
 */
export function waitKernel<T>(run: Promise<T>, threads: number, key: string): Promise<T> {
  const pool = native().getThreads();
  const used = threads === 0 ? pool : Math.min(threads, pool);
  const recent = kernelMs.get(key) ?? NaN;
  const measure = (ok: boolean) => {
    if (!ok) return;
    // The job this environment settled last is this call's, unless another settled in the same
    // turn (then the estimate is that call's for once).
    const ms = native().lastJobMs();
    kernelMs.delete(key);
    if (kernelMs.size >= KERNEL_KEYS) kernelMs.delete(kernelMs.keys().next().value as string);
    kernelMs.set(key, Number.isNaN(recent) ? ms : 0.8 * recent + 0.2 * ms);
  };
  trackRun(run, pollBudget('auto', used, recent), measure, fullPollBudget('auto', recent));
  return run;
}

/** For tests: the poll chain's state. */
export function waitState(): { ticks: number; polling: boolean; busyThreads: number; cores: number } {
  return { ticks, polling: chained, busyThreads: busyThreads(), cores };
}
