import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

function has(cmd: string): boolean {
  try {
    execFileSync(cmd, ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

// .ci/run installs the cross compiler (Debian g++-aarch64-linux-gnu); elsewhere this is skipped.
describe.runIf(has('aarch64-linux-gnu-g++'))('aarch64 build', () => {
  it('compiles and links the scalar path with no x86 code', () => {
    const script = fileURLToPath(new URL('../scripts/check-aarch64.sh', import.meta.url));
    const out = execFileSync('sh', [script], { encoding: 'utf8', timeout: 300_000 });
    expect(out).toMatch(/ARM aarch64/);
    expect(out).toMatch(/aarch64: compiled and linked \d+ files/);
  }, 300_000);
});
