// Whole ONNX models in a Session on the GPU (device 'cuda'): the models the CPU `models` suite runs
// (bench/graphs/models.js), at batch 1 and 8, latency (median ms per run, inputs uploaded and
// outputs downloaded in each) and throughput (batch / latency), with the same process's CPU session
// time for reference. Outputs are checked against the CPU session first, so a speed never comes
// from different work. `--emulated` runs a tiny MLP and transformer on the emulator (checks the suite, not speed).
import { Session, Tensor } from '../../dist/index.js';
import { modelBytes, modelInput, relativeDifference, roundingTolerance } from '../graphs/models.js';

async function medianMs(fn, { minRuns, minMs }) {
  await fn();
  const times = [];
  const t0 = performance.now();
  while (times.length < minRuns || performance.now() - t0 < minMs) {
    const s = performance.now();
    await fn();
    times.push(performance.now() - s);
    if (times.length >= 1000) break;
  }
  times.sort((a, b) => a - b);
  return times[times.length >> 1];
}

export async function* sessionCases(env) {
  const { emulated, quick } = env;
  // An explicit 'cuda' reaches the emulator only through this hook (lib/device.ts).
  if (emulated) process.env.SONDE_CUDA_DEVICE = 'emulated';
  const plan = emulated
    ? [['mlp', { sizes: [16, 32, 8] }, [1, 2]], ['transformer', { layers: 1, dModel: 16, heads: 2, tokens: 8, ffn: 32 }, [1]]]
    : [['resnet50', {}, [1, 8]], ['mobilenetv2', {}, [1, 8]], ['transformer', {}, [1, 8]], ['mlp', {}, [1, 8]]];
  const timing = emulated ? { minRuns: 1, minMs: 0 } : quick ? { minRuns: 5, minMs: 300 } : { minRuns: 20, minMs: 2000 };
  const cpuTiming = emulated ? { minRuns: 1, minMs: 0 } : { minRuns: 3, minMs: quick ? 300 : 1000 };
  for (const [name, params, batches] of plan) {
    const bytes = modelBytes(name, params);
    const gpu = await Session.load(bytes, { device: 'cuda' });
    const gpuBf16 = name === 'resnet50' || name === 'transformer' ? await Session.load(bytes, { device: 'cuda', precision: 'bf16' }) : null;
    const cpu = await Session.load(bytes, { device: 'cpu' });
    try {
      for (const b of batches) {
        const x = modelInput(name, b, 7, params);
        const feed = { input: new Tensor('float32', x.data, x.dims) };
        const want = (await cpu.run(feed)).output.data;
        const got = (await gpu.run(feed)).output.data;
        const d = relativeDifference(got, want);
        // Two fp32 implementations each within the rounding model of the reference.
        const bound = 2 * roundingTolerance(name, params);
        if (!(d <= bound)) throw new Error(`${name} n${b}: the GPU session differs from the CPU session by ${d.toExponential(2)} (bound ${bound.toExponential(2)})`);
        const ms = await medianMs(() => gpu.run(feed), timing);
        const cpuMs = await medianMs(() => cpu.run(feed), cpuTiming);
        const label = `${name}${emulated ? ' (tiny)' : ''} n${b}`;
        yield { case: `session ${label}`, ms, perSecond: (1000 * b) / ms, cpuMs, ratio: cpuMs / ms, vs: 'sonde CPU session', deviceMB: gpu.deviceBytes / 2 ** 20 };
        if (gpuBf16) {
          const bms = await medianMs(() => gpuBf16.run(feed), timing);
          yield { case: `session ${label} bf16`, ms: bms, perSecond: (1000 * b) / bms, cpuMs, ratio: cpuMs / bms, fp32Ms: ms, vs: 'sonde CPU session (fp32)' };
        }
      }
    } finally {
      gpu.dispose();
      gpuBf16?.dispose();
      cpu.dispose();
    }
  }
}
