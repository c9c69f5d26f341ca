import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { InvalidArgumentError, devices, getThreadAffinity, getThreads, kernels, setThreadAffinity, setThreads } from '../dist/index.js';
import { expectGemmClose, randomTensor } from './helpers.js';

// The kernel's own view of which CPUs this process may use ("0-3,6"), independent of sonde.
function allowedCpus(): number[] {
  const list = /^Cpus_allowed_list:\s*(\S+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]!;
  return list.split(',').flatMap((r) => {
    const [a, b] = r.split('-').map(Number);
    return Array.from({ length: (b ?? a!) - a! + 1 }, (_, i) => a! + i);
  });
}

const linux = process.platform === 'linux';
const cpus = linux ? allowedCpus() : [];

// Pinned workers take the allowed CPUs in order from some offset (each pool of the machine starts
// elsewhere): one CPU each, [[c_k], [c_k+1], ...] round robin from worker 0's.
function rotation(workerCpus: number[][]): number[][] {
  const first = cpus.indexOf(workerCpus[0]![0]!);
  expect(first).toBeGreaterThanOrEqual(0);
  return cpus.map((_, i) => [cpus[(first + i) % cpus.length]!]);
}

// Runs `script` (an ES module body with sonde imported as `s`) in a child process and returns its
// JSON output.
function child(script: string, env: Record<string, string> = {}, prefix: string[] = []): any {
  const args = ['--input-type=module', '-e', `import * as s from './dist/index.js';\n${script}`];
  const [cmd, ...rest] = prefix.length ? [...prefix, process.execPath, ...args] : [process.execPath, ...args];
  const out = execFileSync(cmd!, rest, { env: { ...process.env, ...env }, timeout: 30_000 });
  return JSON.parse(out.toString());
}

describe.runIf(linux)('thread affinity', () => {
  it('pins one worker per allowed CPU by default when the pool spans them all, and floats otherwise', async () => {
    const before = getThreads();
    const mode = getThreadAffinity().mode;
    try {
      setThreadAffinity('auto');
      expect(devices().cpu.cores).toBe(cpus.length);
      expect(availableParallelism()).toBe(cpus.length);
      setThreads(cpus.length);
      let a = getThreadAffinity();
      expect(a.mode).toBe('auto');
      // Other processes busy lately (CI runs two test files at once) or a contended window: 'auto'
      // floats; otherwise it pins.
      if (cpus.length > 1 && !a.machineBusy && !a.contended) {
        expect(a.pinned).toBe(true);
        expect(a.cpus.slice(0, cpus.length)).toEqual(rotation(a.cpus));
      } else {
        expect(a.pinned).toBe(false);
        for (const set of a.cpus) expect(set).toEqual(cpus);
      }
      // Fewer threads than CPUs: the pool does not own the machine, so nothing is pinned, and
      // workers pinned before go back to every allowed CPU.
      setThreads(1);
      a = getThreadAffinity();
      expect(a.pinned).toBe(false);
      for (const set of a.cpus) expect(set).toEqual(cpus);
      // More threads than CPUs: floating too.
      setThreads(cpus.length + 1);
      a = getThreadAffinity();
      expect(a.pinned).toBe(false);
      expect(a.cpus).toHaveLength(cpus.length + 1);
      for (const set of a.cpus) expect(set).toEqual(cpus);
      const x = randomTensor([96, 80]);
      const w = randomTensor([80, 70], 2);
      expectGemmClose((await kernels.gemm(x, w)).data, x.data, w.data, 96, 80, 70);
    } finally {
      setThreads(before);
      setThreadAffinity(mode);
    }
  });

  it("'on' pins round robin at any size, 'off' never pins, and runs stay correct across changes", async () => {
    const before = getThreads();
    const mode = getThreadAffinity().mode;
    const x = randomTensor([200, 300]);
    const w = randomTensor([300, 250], 3);
    try {
      setThreads(cpus.length + 1);
      setThreadAffinity('on');
      let a = getThreadAffinity();
      expect(a.mode).toBe('on');
      expect(a.pinned).toBe(cpus.length > 1);
      if (cpus.length > 1) {
        const r = rotation(a.cpus);
        expect(a.cpus).toEqual([...r, r[0]]);
      }
      // A change while runs are in flight: each run still completes with the right result.
      const runs = Array.from({ length: 6 }, () => kernels.gemm(x, w));
      setThreadAffinity('off');
      a = getThreadAffinity();
      expect(a.mode).toBe('off');
      expect(a.pinned).toBe(false);
      for (const set of a.cpus) expect(set).toEqual(cpus);
      setThreads(cpus.length);
      expect(getThreadAffinity().pinned).toBe(false);
      setThreadAffinity('auto');
      expect(getThreadAffinity().pinned).toBe(cpus.length > 1);
      for (const r of await Promise.all(runs)) expectGemmClose(r.data, x.data, w.data, 200, 300, 250);
      expectGemmClose((await kernels.gemm(x, w)).data, x.data, w.data, 200, 300, 250);
    } finally {
      setThreads(before);
      setThreadAffinity(mode);
    }
  });

  it('rejects bad modes with a typed error and keeps the mode it had', () => {
    const mode = getThreadAffinity().mode;
    expect(() => setThreadAffinity('pinned' as never)).toThrow(InvalidArgumentError);
    expect(() => setThreadAffinity('aut' as never)).toThrow("setThreadAffinity(mode) must be one of 'auto', 'on', 'off', got \"aut\"; did you mean 'auto'?");
    expect(() => setThreadAffinity(undefined as never)).toThrow(InvalidArgumentError);
    expect(() => setThreadAffinity(1 as never)).toThrow(InvalidArgumentError);
    expect(getThreadAffinity().mode).toBe(mode);
  });

  it('SONDE_PIN_THREADS sets the initial mode (anything unknown is auto)', () => {
    const show = 'console.log(JSON.stringify(s.getThreadAffinity()));';
    const off = child(show, { SONDE_PIN_THREADS: 'off' });
    expect(off.mode).toBe('off');
    expect(off.pinned).toBe(false);
    const on = child('s.setThreads(1);' + show, { SONDE_PIN_THREADS: 'on' });
    // One active thread ('on' pins at any size); the pool's other threads are parked, pinned too.
    expect(on.mode).toBe('on');
    expect(on.pinned).toBe(cpus.length > 1);
    if (cpus.length > 1) expect(on.cpus).toEqual(rotation(on.cpus));
    expect(child(show, { SONDE_PIN_THREADS: 'sometimes' }).mode).toBe('auto');
  });

  it.runIf(cpus.length > 1)('pools of different worker_threads start on different CPUs', () => {
    // A fresh process: its main pool is its first, the worker's the second, so the two offsets differ by one.
    const r = child(`s.setThreadAffinity('on');
      import { Worker } from 'node:worker_threads';
      const main = s.getThreadAffinity().cpus;
      const w = new Worker("Promise.all([import('node:worker_threads'), import('${process.cwd()}/dist/index.js')]).then(([wt, s]) => wt.parentPort.postMessage(s.getThreadAffinity().cpus))", { eval: true });
      w.once('message', (cpus) => { console.log(JSON.stringify({ main, worker: cpus })); w.terminate(); });`, { SONDE_PIN_THREADS: 'on' });
    expect(r.main).toEqual(rotation(r.main));
    expect(r.worker).toEqual(rotation(r.worker));
    expect(cpus.indexOf(r.worker[0][0])).toBe((cpus.indexOf(r.main[0][0]) + 1) % cpus.length);
  });

  it.runIf(cpus.length > 1)("'auto' floats while other processes keep the CPUs busy", () => {
    // One CPU-bound process per CPU for ~1 s while this process makes short calls (the pool samples
    // the machine's CPU time from its submissions, every 250 ms at most).
    const r = child(`import { spawn } from 'node:child_process';
      const hogs = Array.from({ length: ${cpus.length} }, () => spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }));
      try {
        const a = new s.Tensor('float32', new Float32Array(64 * 64).fill(0.5), [64, 64]);
        const end = Date.now() + 1200;
        while (Date.now() < end) { await s.kernels.gemm(a, a); await new Promise((r) => setTimeout(r, 5)); }
        console.log(JSON.stringify(s.getThreadAffinity()));
      } finally { for (const h of hogs) h.kill(); }`);
    expect(r.mode).toBe('auto');
    expect(r.machineBusy).toBe(true);
    expect(r.pinned).toBe(false);
    for (const set of r.cpus) expect(set).toEqual(cpus);
  });

  it.runIf(cpus.length > 1 && existsSync('/usr/bin/taskset'))('a process restricted to one CPU sizes its pool to it and pins nothing', () => {
    const r = child('console.log(JSON.stringify({ threads: s.getThreads(), cores: s.devices().cpu.cores, a: s.getThreadAffinity() }));',
      {}, ['/usr/bin/taskset', '-c', String(cpus[1])]);
    expect(r.threads).toBe(1);
    expect(r.cores).toBe(1);
    expect(r.a.pinned).toBe(false);
    expect(r.a.cpus).toEqual([[cpus[1]]]);
  });
});
