import { describe, expect, it } from 'vitest';
import { DeviceUnavailableError, InvalidArgumentError, LanguageModel, Session, UnsupportedOperatorError, devices, resolveDevice } from '../dist/index.js';
import { placeWithoutCuda } from '../dist/device.js';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

describe('devices()', () => {
  const d = devices();

  it('reports the CPU with its SIMD level and features', () => {
    expect(d.cpu.kind).toBe('cpu');
    expect(d.cpu.cores).toBeGreaterThanOrEqual(1);
    expect(['scalar', 'avx2', 'avx512']).toContain(d.cpu.simd);
    expect(d.cpu.model.length).toBeGreaterThan(0);
    if (process.arch === 'x64' && process.platform === 'linux') {
      // Cross-check CPUID against the kernel's view of the CPU.
      const flags = /^flags\s*:(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))![1]!.split(/\s+/);
      expect(d.cpu.features.includes('avx2')).toBe(flags.includes('avx2'));
      expect(d.cpu.features.includes('avx512f')).toBe(flags.includes('avx512f'));
      expect(d.cpu.features.includes('avx512bf16')).toBe(flags.includes('avx512_bf16'));
      expect(d.cpu.features.includes('avx512vnni')).toBe(flags.includes('avx512_vnni'));
      const want = flags.includes('avx512f') && flags.includes('avx512bw') && flags.includes('avx512vl') && flags.includes('avx512dq')
        ? 'avx512' : flags.includes('avx2') && flags.includes('fma') ? 'avx2' : 'scalar';
      expect(d.cpu.simdDetected).toBe(want);
      if (!process.env.SONDE_ISA) expect(d.cpu.simd).toBe(want);
    }
  });

  it('reports CUDA devices or the reason there are none', () => {
    expect(typeof d.cuda.compiled).toBe('boolean');
    // CI's pass over the CPU-only twin build (SONDE_NATIVE_BINARY=build/nocuda/sonde.node) says
    // which kind of binary it loaded.
    if (process.env.SONDE_TEST_CUDA_BUILD === '0') {
      expect(d.cuda.compiled).toBe(false);
      expect(d.cuda.devices).toEqual([]);
      expect(d.cuda.reason).toMatch(/built without CUDA/);
      expect(() => resolveDevice('cuda')).toThrow(/built without CUDA/);
    } else if (process.env.SONDE_TEST_CUDA_BUILD === '1') {
      expect(d.cuda.compiled).toBe(true);
    }
    if (d.cuda.devices.length === 0) {
      expect(d.cuda.reason).toMatch(/\w/);
    } else {
      for (const g of d.cuda.devices) {
        expect(g.id).toBe(`cuda:${g.index}`);
        expect(g.totalMemory).toBeGreaterThan(0);
        expect(g.computeCapability).toMatch(/^\d+\.\d+$/);
      }
    }
  });
});

describe('resolveDevice', () => {
  const hasCuda = devices().cuda.devices.length > 0;

  it("resolves 'cpu', and 'auto' to CUDA when present else the CPU", () => {
    expect(resolveDevice('cpu')).toEqual({ kind: 'cpu' });
    expect(resolveDevice('auto')).toEqual(hasCuda ? { kind: 'cuda', index: 0, gpu: 'cuda:0' } : { kind: 'cpu' });
    expect(resolveDevice(undefined)).toEqual(resolveDevice('auto'));
  });

  it.each(['gpu', 'cuda:-1', 'cuda:x', 'CUDA', 'cuda:', '', 'cpu:0'])('rejects %j as malformed', (spec) => {
    expect(() => resolveDevice(spec)).toThrow(InvalidArgumentError);
    expect(() => resolveDevice(spec)).toThrow(/device must be 'auto', 'cpu', 'cuda' or 'cuda:N'/);
  });

  it('rejects non-strings', () => {
    expect(() => resolveDevice(0)).toThrow(/got 0/);
    expect(() => resolveDevice({})).toThrow(InvalidArgumentError);
  });

  it.runIf(!hasCuda)("'cuda' on a machine without a GPU is DeviceUnavailableError with the reason", () => {
    const reason = devices().cuda.reason!;
    expect(() => resolveDevice('cuda')).toThrow(DeviceUnavailableError);
    expect(() => resolveDevice('cuda')).toThrow(reason);
    expect(() => resolveDevice('cuda:0')).toThrow(DeviceUnavailableError);
  });

  it('a CUDA index past the last device is DeviceUnavailableError', () => {
    expect(() => resolveDevice('cuda:99')).toThrow(DeviceUnavailableError);
  });
});

describe('placement of work without CUDA kernels', () => {
  const hasCuda = devices().cuda.devices.length > 0;
  const model = fileURLToPath(new URL('../models/digits.onnx', import.meta.url));

  it("with a GPU: 'auto' and fallback 'cpu' run on the CPU and say why; an explicit device names the operators", () => {
    const gpu = { kind: 'cuda', index: 0, gpu: 'cuda:0' } as const;
    for (const [spec, fallback] of [[undefined, 'none'], ['auto', 'none'], ['cuda', 'cpu'], ['cuda:0', 'cpu']] as const) {
      const p = placeWithoutCuda('Session.load', spec, gpu, ['Conv', 'Relu'], fallback);
      expect(p).toEqual({ kind: 'cpu', id: 'cpu', reason: 'these operators have no CUDA kernel in this version: Conv, Relu' });
    }
    expect(() => placeWithoutCuda('Session.load', 'cuda:0', gpu, ['Conv', 'Relu'], 'none')).toThrow(UnsupportedOperatorError);
    expect(() => placeWithoutCuda('Session.load', 'cuda', gpu, ['Conv', 'Relu'], 'none'))
      .toThrow(/Session.load: options.device 'cuda': these operators have no CUDA kernel in this version: Conv, Relu; use device 'cpu' or 'auto', or fallback: 'cpu'/);
  });

  it('Session.device says where runs compute and why', async () => {
    const auto = await Session.load(model);
    // Sessions run on a GPU when there is one (test/cuda/session.test.ts covers what they compute).
    if (hasCuda) expect(auto.device).toEqual({ kind: 'cuda', id: 'cuda:0' });
    else expect(auto.device).toEqual({ kind: 'cpu', id: 'cpu', reason: expect.stringMatching(/no CUDA device/) });
    auto.dispose();
    const cpu = await Session.load(model, { device: 'cpu' });
    expect(cpu.device).toEqual({ kind: 'cpu', id: 'cpu' });
    cpu.dispose();
    await expect(Session.load(model, { fallback: 'gpu' as 'cpu' })).rejects.toThrow(/options.fallback/);
    if (hasCuda) (await Session.load(model, { device: 'cuda' })).dispose();
    else await expect(Session.load(model, { device: 'cuda' })).rejects.toThrow(DeviceUnavailableError);
  });

  it('LanguageModel.device likewise', async () => {
    const gguf = fileURLToPath(new URL('../models/fortune-moe.gguf', import.meta.url));
    // A q8_0 Mixtral-style model: the GPU transformer runs it (test/cuda/llm.test.ts checks its logits).
    const lm = await LanguageModel.load(gguf);
    if (hasCuda) {
      expect(lm.device).toEqual({ kind: 'cuda', id: 'cuda:0' });
    } else {
      expect(lm.device.kind).toBe('cpu');
      expect(lm.device.reason).toMatch(/no CUDA device/);
    }
    lm.dispose();
    await expect(LanguageModel.load(gguf, { fallback: 'yes' as 'cpu' })).rejects.toThrow(/options.fallback/);
    if (hasCuda) (await LanguageModel.load(gguf, { device: 'cuda' })).dispose();
    else await expect(LanguageModel.load(gguf, { device: 'cuda' })).rejects.toThrow(DeviceUnavailableError);
  });
});

describe('SONDE_CUDA_DEVICE=emulated', () => {
  it("routes an explicit 'cuda' / 'cuda:0' to the CUDA emulator and leaves 'auto' alone", () => {
    const before = process.env['SONDE_CUDA_DEVICE'];
    process.env['SONDE_CUDA_DEVICE'] = 'emulated';
    try {
      expect(resolveDevice('cuda')).toEqual({ kind: 'cuda', index: 0, gpu: 'emulated' });
      expect(resolveDevice('cuda:0')).toEqual({ kind: 'cuda', index: 0, gpu: 'emulated' });
      expect(() => resolveDevice('cuda:1')).toThrow(/SONDE_CUDA_DEVICE=emulated provides cuda:0 only/);
      expect(resolveDevice('auto').kind).toBe(devices().cuda.devices.length > 0 ? 'cuda' : 'cpu');
      expect(resolveDevice('cpu')).toEqual({ kind: 'cpu' });
    } finally {
      if (before === undefined) delete process.env['SONDE_CUDA_DEVICE'];
      else process.env['SONDE_CUDA_DEVICE'] = before;
    }
  });
});
