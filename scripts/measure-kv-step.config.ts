import { defineConfig } from 'vitest/config';

export default defineConfig({ test: { include: ['scripts/measure-kv-step.ts'], testTimeout: 600_000 } });
