// The `sonde` command (dist/cli/index.js) run as users run it: a child process, its exit status,
// stdout / stderr, and the files it leaves behind (never a half-written or partial output).
import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { modelPath as digitsPath } from '../models/digits.js';

const require = createRequire(import.meta.url);
const { onnx } = require('onnx-proto');
const cli = fileURLToPath(new URL('../dist/cli/index.js', import.meta.url));

function sonde(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => {
      resolve({ code: err ? (err as { code?: number }).code ?? 1 : 0, stdout, stderr });
    });
  });
}

function withDir(f: (dir: string) => Promise<void>) {
  return async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sonde-cli-'));
    try { await f(dir); } finally { rmSync(dir, { recursive: true, force: true }); }
  };
}

describe('sonde prune', () => {
  it('writes the pruned model and prints the report table', withDir(async (dir) => {
    const out = join(dir, 'digits-90.onnx');
    const r = await sonde(['prune', digitsPath, out, '--sparsity', '0.9']);
    expect(r.stderr).toBe(''); // not a TTY: no progress bar
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^layer\s+op\s+shape\s+weights\s+sparsity\s+norm removed/);
    expect(r.stdout).toMatch(/\/block\/conv1\/Conv\s+Conv\s+16x16x3x3\s+2304\s+90\.0%/);
    expect(r.stdout).toMatch(/kept: first layer kept dense/);
    expect(r.stdout).toMatch(/4 of 5 layers pruned/);
    // The file decodes and the weight conv1 reads has round(0.9 * 2304) zeros.
    const m = onnx.ModelProto.decode(readFileSync(out));
    const wName = m.graph.node.find((n: { name: string }) => n.name === '/block/conv1/Conv').input[1];
    const t = m.graph.initializer.find((x: { name: string }) => x.name === wName);
    const w = new Float32Array(Uint8Array.from(t.rawData).buffer);
    expect(w.length).toBe(2304);
    expect(w.filter((v) => v === 0).length).toBe(Math.round(0.9 * 2304));
    expect(readdirSync(dir)).toEqual(['digits-90.onnx']);
  }));

  it('--json prints the report; --structure block --prune-first-layer --storage sparse are passed through', withDir(async (dir) => {
    const out = join(dir, 'b.onnx');
    const r = await sonde(['prune', digitsPath, out, '--sparsity', '0.5', '--structure', 'block', '--block-size', '8',
      '--prune-first-layer', '--storage', 'sparse', '--exclude', '/head/Gemm', '--json']);
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.layers.map((l: { pruned: boolean }) => l.pruned)).toEqual([true, true, true, true, false]);
    expect(onnx.ModelProto.decode(readFileSync(out)).graph.sparseInitializer.length).toBe(4);
  }));

  it('a failure leaves an existing output untouched and no temporary file; exit status 1 with the message', withDir(async (dir) => {
    const out = join(dir, 'out.onnx');
    writeFileSync(out, 'previous contents');
    for (const args of [['--sparsity', '1'], ['--sparsity', '0.5', '--structure', 'blocks'], ['--sparsity', '0.5', '--include', 'nothing']]) {
      const r = await sonde(['prune', digitsPath, out, ...args]);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr).toMatch(/^sonde: prune: /);
      expect(readFileSync(out, 'utf8')).toBe('previous contents');
      expect(readdirSync(dir)).toEqual(['out.onnx']);
    }
    const bad = join(dir, 'bad.onnx');
    writeFileSync(bad, Uint8Array.of(1, 2, 3, 4, 5));
    const r = await sonde(['prune', bad, out, '--sparsity', '0.5']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not a valid ONNX file/);
    expect(readFileSync(out, 'utf8')).toBe('previous contents');
    const noDir = await sonde(['prune', digitsPath, join(dir, 'missing', 'x.onnx'), '--sparsity', '0.5']);
    expect(noDir.code).toBe(1);
    expect(noDir.stderr).toMatch(/cannot write/);
    expect(readdirSync(dir).sort()).toEqual(['bad.onnx', 'out.onnx']);
  }));

  it('usage errors exit with status 2 and the usage text', async () => {
    for (const args of [['prune', digitsPath], ['prune', digitsPath, 'x.onnx', '--sparsity', 'lots'], ['prune', 'a', 'b', '--frobnicate'], ['unknown']]) {
      const r = await sonde(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/usage: sonde/);
    }
    const help = await sonde(['prune', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/--sparsity S/);
  });
});
