import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, getThreads, kernels, setThreads } from '../dist/index.js';
import { expectGemmClose, randomTensor } from './helpers.js';

describe('compute runs off the event loop', () => {
  it('a timer keeps firing during a GEMM of at least 0.5 s', async () => {
    // The reference kernel on one thread is slow enough to take >= 0.5 s at this size.
    let n = 384;
    let elapsed = 0;
    let ticks = 0;
    for (;;) {
      const a = randomTensor([n, n], 1);
      const b = randomTensor([n, n], 2);
      ticks = 0;
      const timer = setInterval(() => ticks++, 5);
      const t0 = performance.now();
      const c = await kernels.gemm(a, b, { variant: 'reference', threads: 1 });
      elapsed = performance.now() - t0;
      clearInterval(timer);
      if (elapsed >= 500) {
        expectGemmClose(c.data.subarray(0, n), a.data.subarray(0, n), b.data, 1, n, n);
        break;
      }
      n = Math.ceil(n * Math.cbrt(600 / Math.max(elapsed, 1)));
    }
    // A blocked loop would fire 0 or 1 times; an idle one ~elapsed/5 times. Ask for a tenth, as
    // a loaded machine delays timers without blocking the loop.
    expect(ticks).toBeGreaterThan(Math.max(5, elapsed / 5 / 10));
  });

  it('the process can exit while idle (no handle keeps it alive)', async () => {
    const { execFileSync } = await import('node:child_process');
    const script = `import { kernels, Tensor } from './dist/index.js';
      const a = new Tensor('float32', new Float32Array(4), [2, 2]);
      await kernels.gemm(a, a); console.log('done');`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 20_000 });
    expect(out.toString().trim()).toBe('done');
  });

  it('SONDE_HANDOFF_PROFILE=1 prints, at exit, the hand-off, run and completion times of every job', async () => {
    const { spawnSync } = await import('node:child_process');
    const script = `import { kernels, Tensor } from './dist/index.js';
      const a = new Tensor('float32', new Float32Array(4), [2, 2]);
      for (let i = 0; i < 25; i++) await kernels.gemm(a, a);
      console.log('done');`;
    const run = (env: Record<string, string>) =>
      spawnSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 20_000, encoding: 'utf8', env: { ...process.env, ...env } });
    const profiled = run({ SONDE_HANDOFF_PROFILE: '1' });
    expect(profiled.stdout.trim(), profiled.stderr).toBe('done');
    // At least the 25 GEMMs (packing the weights may be a job of its own).
    const jobs = /sonde handoff profile: (\d+) jobs/.exec(profiled.stderr);
    expect(jobs, profiled.stderr).not.toBeNull();
    expect(Number(jobs![1])).toBeGreaterThanOrEqual(25);
    for (const what of ['Start -> Execute \\(pool hand-off\\)', 'Execute', 'Execute end -> settled \\(completion\\)',
      'settled -> next Start, none in flight']) {
      expect(profiled.stderr).toMatch(new RegExp(`  ${what} +median +[0-9.]+ us, p90 +[0-9.]+ us, mean +[0-9.]+ us`));
    }
    // Worker threads load the addon too: each environment's jobs go into the one process-wide profile.
    const body = `const { kernels, Tensor } = await import(${JSON.stringify(new URL('../dist/index.js', import.meta.url).href)});
      const a = new Tensor('float32', new Float32Array(4), [2, 2]); for (let i = 0; i < 40; i++) await kernels.gemm(a, a);`;
    const workers = spawnSync(process.execPath, ['--input-type=module', '-e', `
      import { Worker } from 'node:worker_threads';
      const body = ${JSON.stringify(body)};
      const done = (w) => new Promise((ok, fail) => { w.on('exit', ok); w.on('error', fail); });
      await Promise.all([0, 1, 2].map(() => done(new Worker(body, { eval: true, type: 'module' }))));
      console.log('done');`], { timeout: 30_000, encoding: 'utf8', env: { ...process.env, SONDE_HANDOFF_PROFILE: '1' } });
    expect(workers.stdout.trim(), workers.stderr).toBe('done');
    const fromWorkers = /sonde handoff profile: (\d+) jobs/.exec(workers.stderr);
    expect(fromWorkers, workers.stderr).not.toBeNull();
    expect(Number(fromWorkers![1])).toBeGreaterThanOrEqual(120);
    const plain = run({ SONDE_HANDOFF_PROFILE: '' });
    expect(plain.stdout.trim()).toBe('done');
    expect(plain.stderr).not.toContain('handoff');
  });
});

describe('thread pool size', () => {
  it('can be set per process and is used', async () => {
    const before = getThreads();
    try {
      setThreads(3);
      expect(getThreads()).toBe(3);
      const a = randomTensor([64, 64]);
      const b = randomTensor([64, 64], 2);
      expectGemmClose((await kernels.gemm(a, b)).data, a.data, b.data, 64, 64, 64);
      setThreads(1);
      expect(getThreads()).toBe(1);
      expectGemmClose((await kernels.gemm(a, b, { threads: 4 })).data, a.data, b.data, 64, 64, 64);
    } finally {
      setThreads(before);
    }
  });

  it('rejects bad sizes', () => {
    expect(() => setThreads(0)).toThrow(InvalidArgumentError);
    expect(() => setThreads(2.5)).toThrow('setThreads(threads) must be an integer in [1, 1024], got 2.5');
    expect(() => setThreads('4' as never)).toThrow(InvalidArgumentError);
  });

  it('calls back to back, after the workers have gone to sleep, and in bursts all complete (no lost wake-up)', async () => {
    // The pool skips waking a sleeper when a spinning worker will take the task, and workers stop
    // spinning when no job runs: a task missed between the two would hang this test. Sizes on both
    // sides of the one-thread threshold, so some calls split across the pool and some run inline.
    const before = getThreads();
    setThreads(2);
    try {
      const b = randomTensor([64, 64], 5);
      for (let round = 0; round < 6; round++) {
        const as = Array.from({ length: 8 }, (_, i) => randomTensor([1 + ((i * 37 + round) % 80), 64], 200 + 8 * round + i));
        for (const a of as) {
          const c = await kernels.gemm(a, b, { threads: 1 + (round % 2) });
          expectGemmClose(c.data, a.data, b.data, a.dims[0]!, 64, 64);
        }
        const burst = await Promise.all(as.map((a) => kernels.gemm(a, b)));
        burst.forEach((c, i) => expectGemmClose(c.data, as[i]!.data, b.data, as[i]!.dims[0]!, 64, 64));
        // Long enough for every worker to stop spinning and sleep.
        await new Promise((r) => setTimeout(r, 5));
      }
    } finally {
      setThreads(before);
    }
  });

  it('wake-ups reach a worker that can take the task while the pool shrinks and grows (parked workers)', async () => {
    // Sleeping workers are woken most recent first, and a parked worker (above the pool size) is
    // never the one chosen: a wake-up spent on it would leave the task queued with every active
    // worker asleep. Each round parks workers, lets everyone fall asleep, then sends calls that
    // need a wake-up, one by one and in a burst.
    const before = getThreads();
    const b = randomTensor([96, 64], 7);
    try {
      for (const size of [3, 1, 2, 1, 3, 2]) {
        setThreads(size);
        await new Promise((r) => setTimeout(r, 5));
        const as = Array.from({ length: 6 }, (_, i) => randomTensor([1 + ((i * 29 + size) % 70), 96], 300 + 10 * size + i));
        for (const a of as) {
          expectGemmClose((await kernels.gemm(a, b, { threads: 1 })).data, a.data, b.data, a.dims[0]!, 96, 64);
          await new Promise((r) => setTimeout(r, 2));
        }
        const burst = await Promise.all(as.map((a) => kernels.gemm(a, b, { threads: 4 })));
        burst.forEach((c, i) => expectGemmClose(c.data, as[i]!.data, b.data, as[i]!.dims[0]!, 96, 64));
      }
    } finally {
      setThreads(before);
    }
  });

  it('many concurrent calls all complete correctly', async () => {
    const b = randomTensor([50, 40], 3);
    const as = Array.from({ length: 40 }, (_, i) => randomTensor([1 + (i % 7), 50], 100 + i));
    const cs = await Promise.all(as.map((a) => kernels.gemm(a, b)));
    cs.forEach((c, i) => expectGemmClose(c.data, as[i]!.data, b.data, as[i]!.dims[0]!, 50, 40));
  });
});
