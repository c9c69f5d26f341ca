// How the JS thread waits for a session's run (SessionOptions.wait, lib/wait.ts): 'poll' keeps the
// event loop polling while the run is in flight, with timers still firing, and stops when it settles
// or when the runs in flight hold every core; 'sleep' never polls; 'auto' polls only short runs that
// leave a core free. Results do not depend on the mode; bad modes are typed errors.
import { availableParallelism } from 'node:os';
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, Session, Tensor, getThreads, kernels, setThreads } from '../dist/index.js';
import { native } from '../dist/binding.js';
import { POLL_FULL_MAX_RUN_MS, POLL_MAX_RUN_MS, fullPollBudget, pollBudget, waitState } from '../dist/wait.js';
import { GraphBuilder } from '../bench/graphs/builder.js';
import { uniform } from './session-ort.js';

const cores = availableParallelism();
const median = (v: number[]) => [...v].sort((p, q) => p - q)[v.length >> 1]!;

/** `links` chained [n, n] MatMuls of x with itself: a run whose length the test chooses. */
function chain(n: number, links: number): { bytes: Uint8Array; x: Tensor } {
  const g = new GraphBuilder('chain', { opset: 17 });
  g.input('x', 'float32', [n, n]);
  let v = 'x';
  for (let i = 0; i < links; i++) [v] = g.node('MatMul', [v, 'x']).map(String) as [string];
  g.output(v);
  return { bytes: g.toBytes(), x: new Tensor('float32', uniform([n, n], 5, -0.1, 0.1).data, [n, n]) };
}

/** Ticks of the poll chain while `p` is in flight, read when it settles (before any later turn). */
async function ticksDuring<T>(p: Promise<T>): Promise<{ value: T; ticks: number }> {
  const before = waitState().ticks;
  const value = await p;
  return { value, ticks: waitState().ticks - before };
}

/** Lets pending setImmediate callbacks run: a stopped chain has then run its last tick. */
const turns = async (n = 3) => { for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r)); };

/**
 * Whether launching `start` began polling: the wait is chosen as the native job starts, inside the
 * call, so the chain's state right after it says so whatever the job's length (a tick landing inside
 * a run of a few microseconds is up to the loop and the machine's load).
 */
async function pollsAtLaunch(start: () => Promise<unknown>): Promise<boolean> {
  await turns();
  expect(waitState().polling).toBe(false);
  const run = start();
  const polling = waitState().polling;
  await run;
  return polling;
}

describe('session wait modes', () => {
  it('pollBudget: sleep never, poll always, auto for short runs that leave a core free and very short ones on every core', () => {
    expect(pollBudget('sleep', 1, 0.05)).toBe(0);
    expect(pollBudget('poll', 1, 50)).toBeGreaterThanOrEqual(100);
    expect(pollBudget('poll', 1, NaN)).toBeGreaterThan(0);
    expect(pollBudget('auto', cores, POLL_FULL_MAX_RUN_MS * 1.5)).toBe(0);
    expect(pollBudget('auto', cores, NaN)).toBe(0);  // a first run on every core: its length unknown
    expect(pollBudget('auto', cores, POLL_FULL_MAX_RUN_MS / 2)).toBeGreaterThan(POLL_FULL_MAX_RUN_MS);
    expect(pollBudget('auto', 1, POLL_MAX_RUN_MS * 1.5)).toBe(0);
    // Polling on while the jobs in flight hold every core: only 'auto', only very short runs.
    expect(fullPollBudget('auto', POLL_FULL_MAX_RUN_MS / 2)).toBeGreaterThan(POLL_FULL_MAX_RUN_MS);
    expect(fullPollBudget('auto', POLL_FULL_MAX_RUN_MS * 1.5)).toBe(0);
    expect(fullPollBudget('auto', NaN)).toBe(0);
    expect(fullPollBudget('poll', POLL_FULL_MAX_RUN_MS / 2)).toBe(0);
    expect(fullPollBudget('sleep', POLL_FULL_MAX_RUN_MS / 2)).toBe(0);
    if (cores > 1) {
      // Twice the expected time and a little more: a run somewhat slower than the last ones is still caught.
      expect(pollBudget('auto', 1, 0.05)).toBeGreaterThan(0.1);
      expect(pollBudget('auto', 1, NaN)).toBeGreaterThan(0);  // the first run, not measured yet
    }
  });

  it.skipIf(cores < 2)("'poll' polls while the run is in flight (timers still fire), then stops; 'sleep' does not poll", async () => {
    // ~50 ms of MatMuls here: long enough that a loaded machine, which may leave the JS thread
    // unscheduled for a few milliseconds (its completion then lands before the timers phase), still
    // runs the loop during it (with 40 links, ~7 ms, the timer once missed the run under CI's load).
    const { bytes, x } = chain(256, 300);
    const polled = await Session.load(bytes, { device: 'cpu', threads: 1, wait: 'poll' });
    const sleeping = await Session.load(bytes, { device: 'cpu', threads: 1, wait: 'sleep' });
    const out = polled.outputs[0]!.name;
    await polled.run({ x });  // measured once: the next run polls for up to twice this long
    await turns();
    expect(waitState().polling).toBe(false);
    let timerAt = Infinity;
    const t0 = performance.now();
    setTimeout(() => { timerAt = performance.now(); }, 1);
    const a = await ticksDuring(polled.run({ x }));
    const settledAt = performance.now();
    // Polling is a chain of setImmediate callbacks, not a busy loop: a 1 ms timer fires during the run.
    expect(settledAt - t0, 'the run was too short to show the timer firing during it').toBeGreaterThan(5);
    expect(timerAt).toBeLessThan(settledAt);
    expect(a.ticks).toBeGreaterThan(10);
    await turns();
    expect(waitState().polling).toBe(false);
    expect(waitState().busyThreads).toBe(0);
    const idle = waitState().ticks;
    await new Promise((r) => setTimeout(r, 20));
    expect(waitState().ticks).toBe(idle);  // nothing polls between runs

    const b = await ticksDuring(sleeping.run({ x }));
    expect(b.ticks).toBe(0);
    // Same plan, same bits, however the JS thread waited.
    expect(Buffer.from((b.value[out]!.data as Float32Array).buffer).equals(Buffer.from((a.value[out]!.data as Float32Array).buffer))).toBe(true);
    polled.dispose();
    sleeping.dispose();
  });

  it.skipIf(cores < 2)("'auto' polls a short run on a pool thread that leaves a core free, a very short one on every core, not a longer one on every core, nor a long one", async () => {
    const small = chain(8, 2);
    const one = await Session.load(small.bytes, { device: 'cpu', threads: 1 });
    const all = await Session.load(small.bytes, { device: 'cpu', threads: cores });
    await one.run({ x: small.x });
    await all.run({ x: small.x });
    await turns();
    // A session's first run (nothing measured yet) polls; so do the short ones after it, as long as
    // they measure under POLL_MAX_RUN_MS, which a loaded machine's wall clock need not grant.
    for (let i = 0; i < 3; i++) {
      const fresh = await Session.load(small.bytes, { device: 'cpu', threads: 1 });
      expect(await pollsAtLaunch(() => fresh.run({ x: small.x }))).toBe(true);
      fresh.dispose();
    }
    // On every core: a first run (its length unknown) does not poll; later ones do once measured
    // under POLL_FULL_MAX_RUN_MS (checked where the machine's wall clock grants it by a margin).
    const freshAll = await Session.load(small.bytes, { device: 'cpu', threads: cores });
    expect(await pollsAtLaunch(() => freshAll.run({ x: small.x }))).toBe(false);
    const times: number[] = [];
    for (let i = 0; i < 20; i++) {
      const t0 = performance.now();
      await freshAll.run({ x: small.x });
      times.push(performance.now() - t0);
    }
    if (Math.max(...times.slice(-10)) < POLL_FULL_MAX_RUN_MS / 2) expect(await pollsAtLaunch(() => freshAll.run({ x: small.x }))).toBe(true);
    freshAll.dispose();
    // A run on every core measured past it (~1 ms here) does not poll.
    const mid = chain(128, 40);
    const midAll = await Session.load(mid.bytes, { device: 'cpu', threads: cores });
    await midAll.run({ x: mid.x });
    await midAll.run({ x: mid.x });
    await turns();
    const tm = performance.now();
    const rm = await ticksDuring(midAll.run({ x: mid.x }));
    expect(performance.now() - tm).toBeGreaterThan(POLL_FULL_MAX_RUN_MS);
    expect(rm.ticks).toBe(0);
    midAll.dispose();

    const long = chain(256, 40);
    const slow = await Session.load(long.bytes, { device: 'cpu', threads: 1 });
    await slow.run({ x: long.x });  // measured: several ms, past POLL_MAX_RUN_MS
    await turns();
    const t0 = performance.now();
    const r = await ticksDuring(slow.run({ x: long.x }));
    expect(performance.now() - t0).toBeGreaterThan(POLL_MAX_RUN_MS * 2);
    expect(r.ticks).toBe(0);
    // With a 'poll' session's run in flight that takes every core, the chain does not start either.
    const greedy = await Session.load(long.bytes, { device: 'cpu', threads: cores, wait: 'poll' });
    expect((await ticksDuring(greedy.run({ x: long.x }))).ticks).toBe(0);
    for (const s of [one, all, slow, greedy]) s.dispose();
  });

  it.skipIf(cores < 2)('kernel calls wait as auto does, by the measured time of their shape (a first call as a run of unknown length)', async () => {
    const a = new Tensor('float32', uniform([16, 256], 8, -1, 1).data, [16, 256]);
    const b = new Tensor('float32', uniform([256, 256], 9, -1, 1).data, [256, 256]);
    const packed = kernels.packGemmWeights(b);
    const sparse = kernels.toSparse(new Tensor('float32', b.data.map((v, i) => (i % 4 ? 0 : v)), [256, 256]));
    const calls: [string, (threads: number) => Promise<unknown>][] = [
      ['gemm', (threads) => kernels.gemm(a, packed, { threads })],
      ['spmm', (threads) => kernels.spmm(a, sparse, { threads })],
      ['relu', (threads) => kernels.relu(a, { threads })],
    ];
    const timed = async (call: () => Promise<unknown>) => { const t0 = performance.now(); await call(); return performance.now() - t0; };
    for (const [name, call] of calls) {
      // On fewer threads than cores: short calls poll (the first, of unknown length, too).
      await call(1);
      await turns();
      const t1: number[] = [];
      for (let i = 0; i < 5; i++) t1.push(await timed(() => call(1)));
      if (median(t1) < POLL_MAX_RUN_MS / 2) {
        for (let i = 0; i < 3; i++) expect([name, await pollsAtLaunch(() => call(1))]).toEqual([name, true]);
      }
      await turns();
      expect([name, waitState().polling, waitState().busyThreads]).toEqual([name, false, 0]);
      // On every core: the first call of a shape does not poll; a shape measured under
      // POLL_FULL_MAX_RUN_MS does.
      expect([name, await pollsAtLaunch(() => call(cores))]).toEqual([name, false]);
      // Enough calls for a slow first one (the estimate's seed; a loaded CI machine can stall it
      // for milliseconds) to weigh less than a percent in the smoothed time (0.8^25).
      const times: number[] = [];
      for (let i = 0; i < 25; i++) times.push(await timed(() => call(cores)));
      await turns();
      const polls = await pollsAtLaunch(() => call(cores));
      // (A call's wall time includes its hand-off and wake-up; the time on the pool that decides is less.)
      if (median(times) < POLL_FULL_MAX_RUN_MS) expect([name, polls]).toEqual([name, true]);
    }
    // A shape measured past the bound on every core does not poll.
    const big = new Tensor('float32', uniform([512, 512], 10, -1, 1).data, [512, 512]);
    const bigPacked = kernels.packGemmWeights(big);
    for (let i = 0; i < 3; i++) await kernels.gemm(big, bigPacked, { threads: cores });
    await turns();
    const t0 = performance.now();
    const r = await ticksDuring(kernels.gemm(big, bigPacked, { threads: cores }));
    expect(performance.now() - t0).toBeGreaterThan(POLL_FULL_MAX_RUN_MS);
    expect(r.ticks).toBe(0);
    bigPacked.dispose();
    packed.dispose();
    sparse.dispose();
  });

  it.skipIf(cores < 2)('the cores held by a worker_thread\'s job count: a poll session does not poll while they and its run hold every core', async () => {
    const { Worker } = await import('node:worker_threads');
    // The worker runs one long job on cores - 1 threads, saying when it has started and ended.
    const body = `const { parentPort, workerData } = require('node:worker_threads');
      (async () => {
        const { Session, Tensor } = await import(workerData.dist);
        const s = await Session.load(workerData.bytes, { device: 'cpu', threads: workerData.threads, wait: 'sleep' });
        const x = new Tensor('float32', workerData.x, [256, 256]);
        parentPort.once('message', async () => {
          const run = s.run({ x });
          parentPort.postMessage('started');
          await run;
          s.dispose();
          parentPort.postMessage('ended');
        });
        parentPort.postMessage('loaded');
      })();`;
    // The job lasts ~300 ms whatever the ISA: its chain's length scaled from one timed run here.
    const probe = chain(256, 8);
    const ps = await Session.load(probe.bytes, { device: 'cpu', threads: cores - 1, wait: 'sleep' });
    await ps.run({ x: probe.x });
    const t0 = performance.now();
    await ps.run({ x: probe.x });
    const probeMs = Math.max(0.05, performance.now() - t0);
    ps.dispose();
    const { bytes, x } = chain(256, Math.min(4000, Math.max(8, Math.ceil((8 * 300) / probeMs))));
    const worker = new Worker(body, { eval: true, workerData: { dist: new URL('../dist/index.js', import.meta.url).href, bytes, x: x.data, threads: cores - 1 } });
    let ended = false;
    const said = (what: string) => new Promise<void>((resolve) => worker.on('message', (m) => { if (m === what) resolve(); }));
    const loaded = said('loaded');
    // Runs of ~0.1 ms: still in flight when the wait is chosen (a job of a few microseconds may have
    // settled by then, and its chain then stops at its first tick).
    const small = chain(64, 20);
    const s = await Session.load(small.bytes, { device: 'cpu', threads: 1, wait: 'poll' });
    await s.run({ x: small.x });
    await loaded;
    await turns();
    const started = said('started');
    void said('ended').then(() => { ended = true; });
    worker.postMessage('go');
    await started;
    // Short runs during the worker's one long job (its threads counted before and
    // after each): none polls.
    let held = 0, ticks = 0;
    while (!ended && held < 200) {
      await turns();  // a chain of an earlier, uncounted run stops before this one starts
      const before = waitState().busyThreads;
      const r = await ticksDuring(s.run({ x: small.x }));
      if (before >= cores - 1 && waitState().busyThreads >= cores - 1) {
        held++;
        ticks += r.ticks;
      }
    }
    await new Promise<void>((resolve) => { if (ended) resolve(); else void said('ended').then(() => resolve()); });
    await worker.terminate();
    expect(held).toBeGreaterThan(5);
    expect(ticks).toBe(0);
    await turns();
    expect(waitState().busyThreads).toBe(0);
    // Without the worker's job the same runs poll again.
    for (let i = 0; i < 5; i++) expect(await pollsAtLaunch(() => s.run({ x: small.x }))).toBe(true);
    s.dispose();
  });

  it('startWaitUs: how long a job has waited for a pool thread, 0 once every job has been taken', async () => {
    // One pool thread: a second job queues behind the first (the signal the poll chain uses to
    // yield its core).
    const before = getThreads();
    setThreads(1);
    try {
      const { bytes, x } = chain(256, 100);  // ~20 ms on one thread
      const s = await Session.load(bytes, { device: 'cpu', threads: 1, wait: 'sleep' });
      await s.run({ x });
      await new Promise((r) => setTimeout(r, 5));
      expect(native().startWaitUs()).toBe(0);
      const first = s.run({ x });
      // The pool thread takes the first job (no job waits then); a slow wake-up under load would
      // otherwise restart the count between the reads below.
      for (const until = performance.now() + 2000; native().startWaitUs() > 0 && performance.now() < until;) {
        await new Promise((r) => setTimeout(r, 0));
      }
      const submitted = performance.now();
      const second = s.run({ x });
      await new Promise((r) => setTimeout(r, 2));
      const waited = [native().startWaitUs()];
      const read0 = performance.now();
      await new Promise((r) => setTimeout(r, 2));
      waited.push(native().startWaitUs());
      const read1 = performance.now();
      await first;
      await second;
      if (waited[1]! > 0) {
        // The second job still waited at the second read, so nothing restarted the count: it ran
        // from the second job's submission and grew by the time between the reads.
        expect(waited[0]).toBeGreaterThanOrEqual((read0 - submitted) * 1000 - 300);
        expect(waited[1]! - waited[0]!).toBeGreaterThan((read1 - read0) * 1000 - 300);
      }
      expect(native().startWaitUs()).toBe(0);
      s.dispose();
    } finally {
      setThreads(before);
    }
  });

  it('bad wait modes are typed errors that name the option and suggest the right value', async () => {
    const { bytes } = chain(4, 1);
    await expect(Session.load(bytes, { wait: 'pol' as never })).rejects.toThrow(InvalidArgumentError);
    await expect(Session.load(bytes, { wait: 'pol' as never })).rejects.toThrow(/options\.wait must be one of 'auto', 'poll', 'sleep', got "pol"; did you mean 'poll'\?/);
    await expect(Session.load(bytes, { wait: 1 as never })).rejects.toThrow(/options\.wait must be one of/);
    await expect(Session.load(bytes, { wiat: 'poll' } as never)).rejects.toThrow(/did you mean 'wait'/);
  });

  it("the process exits on its own after 'poll' runs (no handle is left behind)", async () => {
    const { execFileSync } = await import('node:child_process');
    const script = `import { Session, Tensor } from './dist/index.js';
      import { GraphBuilder } from './bench/graphs/builder.js';
      const g = new GraphBuilder('m', { opset: 17 }); g.input('x', 'float32', [8, 8]);
      const [y] = g.node('MatMul', ['x', 'x']); g.output(String(y));
      const s = await Session.load(g.toBytes(), { device: 'cpu', threads: 1, wait: 'poll' });
      const x = new Tensor('float32', new Float32Array(64).fill(1), [8, 8]);
      for (let i = 0; i < 5; i++) await s.run({ x });
      console.log('done');`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 20_000 });
    expect(out.toString().trim()).toBe('done');
  });
});
