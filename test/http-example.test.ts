// examples/http-classifier.js (README, "Batching and metrics"): spawned on a free port, it answers
// concurrent /classify requests with the label the model gives each image (checked against a
// session run here on the same images), rejects a bad request with 400, and serves /metrics with
// the documented names and the requests it answered.
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Session, Tensor } from '../dist/index.js';
import { argmaxRow, modelPath, readTestSplit } from '../models/digits.js';

const script = fileURLToPath(new URL('../examples/http-classifier.js', import.meta.url));
let child: ChildProcess;
let base = '';

beforeAll(async () => {
  child = spawn(process.execPath, [script], { env: { ...process.env, PORT: '0' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d) => { err += d; });
  base = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the example did not start in 10 s: ${err}`)), 10_000);
    child.stdout!.on('data', (d: Buffer) => {
      const m = /listening on (http:\/\/\S+)/.exec(String(d));
      if (m) { clearTimeout(timer); resolve(m[1]!); }
    });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`the example exited (${code}): ${err}`)); });
  });
}, 15_000);

afterAll(async () => {
  if (!child || child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
  if (child.exitCode === null) child.kill('SIGKILL');
});

describe('examples/http-classifier.js', () => {
  it('classifies concurrent requests, rejects a bad one with 400, and serves /metrics', { timeout: 15_000 }, async () => {
    const split = readTestSplit();
    const n = 24;
    const images = Array.from({ length: n }, (_, i) => Array.from(split.images.subarray(i * 64, (i + 1) * 64)));
    const answers = await Promise.all(images.map(async (pixels) => {
      const r = await fetch(`${base}/classify`, { method: 'POST', body: JSON.stringify({ pixels }) });
      expect(r.status).toBe(200);
      return (await r.json()) as { label: number; logits: number[] };
    }));
    // The same images through a session here, one batch: the labels must agree.
    const s = await Session.load(modelPath);
    const all = await s.run({ image: new Tensor('float32', split.images.slice(0, n * 64), [n, 1, 8, 8]) });
    s.dispose();
    const logits = all.logits!.data as Float32Array;
    answers.forEach((a, i) => {
      expect(a.label).toBe(argmaxRow(logits, i, 10));
      for (let j = 0; j < 10; j++) expect(Math.abs(a.logits[j]! - logits[i * 10 + j]!)).toBeLessThan(1e-4);
    });

    const bad = await fetch(`${base}/classify`, { method: 'POST', body: JSON.stringify({ pixels: [1, 2, 3] }) });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { code: string }).code).toBe('ERR_SONDE_INVALID_ARGUMENT');

    const m = await fetch(`${base}/metrics`);
    expect(m.status).toBe(200);
    expect(m.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const text = await m.text();
    expect(text).toMatch(new RegExp(`^sonde_requests_total\\{session="digits"\\} ${n}$`, 'm'));
    expect(text).toMatch(new RegExp(`^sonde_request_duration_seconds_count\\{session="digits"\\} ${n}$`, 'm'));
    expect(text).toContain('# TYPE sonde_batch_size histogram');
    expect(text).toMatch(/^sonde_threads \d+$/m);
    // 24 requests sent at once arrive within the 2 ms window of one another: some shared a run.
    const batches = Number(/^sonde_batches_total\{session="digits"\} (\d+)$/m.exec(text)![1]);
    expect(batches).toBeGreaterThan(0);
    expect(batches).toBeLessThan(n);
  });
});
