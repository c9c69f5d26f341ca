import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 600_000,
    // Native work already uses every core; two test files at a time keeps timings sane on 2 cores.
    maxWorkers: 2,
  },
});
