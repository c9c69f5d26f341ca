// The packed tarball, installed with --ignore-scripts where no compiler is on PATH, must load the
// prebuilt binary from both import and require. Needs prebuilds/ (npm run prebuildify; .ci/run
// makes it first, and this test makes it if it is missing).
import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, mkdirSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync, renameSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const prebuildDir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
let work: string;
let pkgDir: string;
let bareBin: string;

function run(cmd: string, args: string[], opts: { cwd: string; env?: NodeJS.ProcessEnv }): string {
  return execFileSync(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 300_000 });
}

describe('packed tarball', () => {
  beforeAll(() => {
    // CI runs `npm run prebuildify` first. Locally, a missing or stale prebuild (older than the
    // local build) is replaced by the local build, so the tarball matches lib/ without rebuilding
    // build/ under the feet of the test files running beside this one.
    const local = join(root, 'build', 'Release', 'sonde.node');
    const prebuilt = join(prebuildDir, 'node.napi.glibc.node');
    if (!existsSync(prebuilt) || (existsSync(local) && statSync(local).mtimeMs > statSync(prebuilt).mtimeMs)) {
      if (!existsSync(local)) throw new Error('no prebuild and no local build: run `npm run prebuildify`');
      mkdirSync(prebuildDir, { recursive: true });
      copyFileSync(local, prebuilt);
    }
    work = mkdtempSync(join(tmpdir(), 'sonde-pack-'));
    // --ignore-scripts: `npm test` built dist/ already, and prepack's tsc would rewrite dist/ while
    // the other test files running beside this one import it.
    const tgz = run('npm', ['pack', '--silent', '--ignore-scripts', '--pack-destination', work], { cwd: root }).trim().split('\n').pop()!;
    const app = join(work, 'app');
    mkdirSync(app);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }));
    run('npm', ['install', '--ignore-scripts', '--no-audit', '--no-fund', '--prefer-offline', join(work, tgz)], { cwd: app });
    pkgDir = join(app, 'node_modules', 'sonde');
    // A PATH with node and nothing that could compile.
    bareBin = join(work, 'bin');
    mkdirSync(bareBin);
    symlinkSync(process.execPath, join(bareBin, 'node'));
  }, 600_000);

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  const bareEnv = () => ({ PATH: bareBin, HOME: work });

  it('ships the prebuild and no build folder, and the PATH has no compiler', () => {
    expect(existsSync(join(pkgDir, 'build'))).toBe(false);
    expect(readdirSync(join(pkgDir, 'prebuilds', `${process.platform}-${process.arch}`))).toContain('node.napi.glibc.node');
    for (const tool of ['cc', 'gcc', 'g++', 'c++', 'cmake', 'make', 'nvcc']) {
      expect(existsSync(join(bareBin, tool))).toBe(false);
    }
    expect(() => execFileSync('g++', ['--version'], { env: bareEnv(), stdio: 'ignore' })).toThrow();
  });

  it('loads and computes from import', () => {
    const out = run(join(bareBin, 'node'), ['--input-type=module', '-e', `
      import { kernels, Tensor, devices } from 'sonde';
      const a = new Tensor('float32', new Float32Array([1, 2, 3, 4]), [2, 2]);
      const c = await kernels.gemm(a, a);
      console.log(JSON.stringify({ c: Array.from(c.data), simd: devices().cpu.simd }));`], { cwd: join(pkgDir, '..', '..'), env: bareEnv() });
    const r = JSON.parse(out);
    expect(r.c).toEqual([7, 10, 15, 22]);
  });

  it('loads and computes from require', () => {
    const out = run(join(bareBin, 'node'), ['-e', `
      const { kernels, Tensor } = require('sonde');
      const a = new Tensor('float32', new Float32Array([1, 2, 3, 4]), [2, 2]);
      kernels.gemm(a, a, { activation: 'relu' }).then((c) => console.log(JSON.stringify(Array.from(c.data))));`],
    { cwd: join(pkgDir, '..', '..'), env: bareEnv() });
    expect(JSON.parse(out)).toEqual([7, 10, 15, 22]);
  });

  it('without a loadable binary, the error says what was tried and what to do', () => {
    const pre = join(pkgDir, 'prebuilds');
    renameSync(pre, `${pre}.hidden`);
    try {
      let stderr = '';
      try {
        run(join(bareBin, 'node'), ['--input-type=module', '-e', `import { devices } from 'sonde'; devices();`],
          { cwd: join(pkgDir, '..', '..'), env: bareEnv() });
      } catch (e) {
        stderr = String((e as { stderr?: string }).stderr);
      }
      expect(stderr).toContain('NativeLoadError');
      expect(stderr).toContain('no native binary could be loaded');
      expect(stderr).toContain(join('build', 'Release', 'sonde.node'));
      expect(stderr).toContain('prebuilds');
      expect(stderr).toContain('npm rebuild sonde');
    } finally {
      renameSync(`${pre}.hidden`, pre);
    }
  });
});
