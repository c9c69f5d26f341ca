// ThreadPool::ParallelForHomed, what a plan's steps split by images rely on (native/runtime/
// thread_pool.h): every index of every loop runs exactly once, whether a participant runs its own
// index or takes a late helper's, and an exception in one index comes back to the caller.
import { describe, expect, it } from 'vitest';
import { getThreads, setThreads } from '../dist/index.js';
import { native } from '../dist/binding.js';

describe('homed ParallelFor', () => {
  it('runs every index of every loop exactly once, on 1 to 4 threads and for more or fewer indices than threads', () => {
    const before = getThreads();
    try {
      for (const threads of [1, 2, 3, 4]) {
        setThreads(threads);
        for (const n of [1, 2, 3, 5, 17]) {
          const counts = native().homedProbe(n, 400, -1);
          expect(counts.length).toBe(n * 400);
          expect(counts.every((c) => c === 1), `threads ${threads}, n ${n}`).toBe(true);
        }
      }
    } finally {
      setThreads(before);
    }
  });

  it('an exception in one index reaches the caller, and the pool stays usable', () => {
    expect(() => native().homedProbe(4, 3, 2)).toThrow(/homedProbe: thrown/);
    expect(native().homedProbe(4, 10, -1).every((c) => c === 1)).toBe(true);
    expect(() => native().homedProbe(0, 1, -1)).toThrow(/n in \[1, 4096\]/);
    expect(() => native().homedProbe(4096, 100000, -1)).toThrow(/n \* loops at most 2\^22/);
  });
});
