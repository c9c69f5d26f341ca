// node bench/gpu-llm-ab.js [--device cuda:0] [--layers 16] [--type q8_0] [--kv f16] [--rounds 2] [--windows 7] [--chain 8] 'NAME=V[,NAME=V]' ...
// GPU decode (the `cuda` suite's llama 4096x14336 model, 1 sequence, 512 cached) under several
// settings of the environment switches that native code reads once (SONDE_GPU_*), each in a child
// process of its own over one model file written once, in interleaved rounds (A B C A B C ...) so
// that every setting sees the same device state. Per setting: the median over rounds of the
// median decode window (64 steps through pool.step, as the suite times it), the same windows as
// chains of --chain steps (KvPool.stepChain, generation's path: greedy, and sampled on the
// device), the device time of a
// step (SONDE_GPU_LLM_PROFILE=step: events around the graph's launches), and each as % of the read
// bandwidth measured here. '-' is the setting with nothing changed.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const count = (name, dflt) => {
  const v = Number(opt(name, dflt));
  if (!Number.isInteger(v) || v < 1) {
    console.error(`gpu-llm-ab: --${name} takes a whole number >= 1, got '${opt(name, dflt)}'`);
    process.exit(2);
  }
  return v;
};
const layers = count('layers', 16), type = opt('type', 'q8_0'), kv = opt('kv', 'f16');
const rounds = count('rounds', 2), windows = count('windows', 7), chain = count('chain', 8);
// --device emulated: a tiny model on the emulator, which checks the script and says nothing about speed.
const device = opt('device', 'cuda:0'), emulated = device === 'emulated';
const shape = emulated
  ? { embedding: 64, heads: 4, kvHeads: 2, feedForward: 128, layers: 2, contextLength: 256 }
  : { embedding: 4096, heads: 32, kvHeads: 8, feedForward: 14336, layers, contextLength: 4096 };
const prompt = emulated ? 24 : 512, steps = emulated ? 4 : 64;

if (args[0] === '--child') {
  const { loadGpuTransformer } = await import('../dist/llm/transformer-gpu.js');
  const { decodeRig, decodeWeightBytes } = await import('./cuda/llm.js');
  const engine = await loadGpuTransformer(args[1], { device });
  const weightBytes = decodeWeightBytes(engine);
  const rig = decodeRig(engine, { prompt, steps, dtype: kv });
  await rig.step(0, prompt);
  const times = await rig.decodeWindows(windows);
  const chained = await rig.chainWindows(windows, chain), sampled = await rig.chainWindows(windows, chain, true);
  rig.dispose();
  engine.dispose();
  console.log(JSON.stringify({ ms: times[windows >> 1], min: times[0], max: times[windows - 1], chainMs: chained[windows >> 1],
    sampledMs: sampled[windows >> 1], weightBytes }));
  process.exit(0);
}

const settings = args.filter((a, i) => !a.startsWith('--') && !(i > 0 && args[i - 1].startsWith('--')));
if (!settings.length) settings.push('-');
for (const s of settings) {
  if (s !== '-' && !s.split(',').every((kv) => /^[A-Z_][A-Z0-9_]*=/.test(kv))) {
    console.error(`gpu-llm-ab: a setting is '-' or NAME=VALUE[,NAME=VALUE], got '${s}'`);
    process.exit(2);
  }
}
const { GpuBuffer } = await import('../dist/cuda/runtime.js');
const { timeOp } = await import('./cuda/common.js');
const { writeModel } = await import('./cuda/llm.js');
const n4 = emulated ? 1 << 12 : 1 << 28;  // 4 GiB on a GPU: far beyond any L2
const x = GpuBuffer.alloc(device, n4 * 16, 'the bandwidth probe'), out = GpuBuffer.alloc(device, 4096 * 4);
const readGbps = n4 * 16 / await timeOp(device, 'probe_read', [x, out], { count4: n4 }, emulated ? 1 : 10) / 1e6;
x.dispose();
out.dispose();
console.log(`read bandwidth ${readGbps.toFixed(0)} GB/s; llama ${type} ${shape.embedding}x${shape.feedForward} x ${shape.layers} layers, ${kv} KV, ${rounds} rounds`);
const dir = mkdtempSync(join(tmpdir(), 'sonde-gpu-llm-ab-'));
const path = join(dir, 'model.gguf');
try {
  await writeModel(path, type, shape);
  const results = new Map(settings.map((s) => [s, []]));
  for (let r = 0; r < rounds; r++) {
    for (const s of settings) {
      const env = { ...process.env, SONDE_GPU_LLM_PROFILE: 'step' };
      if (s !== '-') for (const kvp of s.split(',')) env[kvp.slice(0, kvp.indexOf('='))] = kvp.slice(kvp.indexOf('=') + 1);
      const child = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--child', path,
        '--layers', String(layers), '--kv', kv, '--windows', String(windows), '--chain', String(chain), '--device', device], { env, encoding: 'utf8' });
      if (child.status !== 0) {
        console.log(`${s}: failed (${child.status})\n${child.stderr}`);
        continue;
      }
      const res = JSON.parse(child.stdout.trim().split('\n').pop());
      const prof = /decode, \d+ steps: device ([\d.]+) ms, native step ([\d.]+) ms/.exec(child.stderr);
      res.device = prof ? Number(prof[1]) : NaN;
      res.native = prof ? Number(prof[2]) : NaN;
      results.get(s).push(res);
      // The native diagnostics' tables (SONDE_HANDOFF_PROFILE, SONDE_GPU_LLM_PROFILE=1) as printed.
      for (const line of child.stderr.split('\n')) if (/^sonde (handoff|gpu llm) profile|^ +\S/.test(line) && !/decode, \d+ steps: device/.test(line)) console.log(`    ${line}`);
      console.log(`  round ${r} ${s}: step ${res.ms.toFixed(4)} ms (windows ${res.min.toFixed(4)}-${res.max.toFixed(4)}), chained ${res.chainMs.toFixed(4)} ms (sampled ${res.sampledMs.toFixed(4)}), device ${res.device} ms, native ${res.native} ms`);
    }
  }
  const median = (a) => a.slice().sort((p, q) => p - q)[a.length >> 1];
  for (const [s, rs] of results) {
    if (!rs.length) continue;
    const ms = median(rs.map((r) => r.ms)), dev = median(rs.map((r) => r.device)), gb = rs[0].weightBytes / 1e9;
    const cm = median(rs.map((r) => r.chainMs)), sm = median(rs.map((r) => r.sampledMs)), pct = (t) => (100 * gb / t / readGbps * 1e3).toFixed(1);
    console.log(`${s}: step ${ms.toFixed(4)} ms = ${pct(ms)}% of read; chained (${chain} steps) ${cm.toFixed(4)} ms = ${pct(cm)}%, sampled ${sm.toFixed(4)} ms = ${pct(sm)}%; device ${dev.toFixed(4)} ms = ${pct(dev)}%`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
