// node bench/wait-ab.js [model=smlp] [threads=1] [rounds=8] [gapMs=0]
// The session option `wait` (README, "Waiting for short runs"): one session per mode ('sleep',
// 'auto', 'poll') on the same model, run one after another in blocks interleaved round by round;
// prints each mode's median wall time per run and the process CPU time per run (the JS thread's
// polling shows there). model: a models-suite name (mlp, mobilenetv2, resnet50, transformer), or
// smlp for the MLP pruned to 90% (its batch-1 run is ~50 us of kernels on one thread). gapMs: a
// pause (setTimeout) before each run, as a service sees between requests: the loop and the pool
// threads have gone to sleep by then.
import * as sonde from '../dist/index.js';
import { Tensor } from '../dist/index.js';
import { modelBytes, modelInput } from './graphs/models.js';

const name = process.argv[2] ?? 'smlp', threads = Number(process.argv[3] ?? 1), rounds = Number(process.argv[4] ?? 8);
const gapMs = Number(process.argv[5] ?? 0);
const pause = () => (gapMs > 0 ? new Promise((r) => setTimeout(r, gapMs)) : undefined);
const base = name === 'smlp' ? 'mlp' : name;
const bytes = name === 'smlp' ? (await sonde.prune(modelBytes('mlp'), { sparsity: 0.9, keepFirstLayerDense: false })).bytes : modelBytes(base);
const x = modelInput(base, 1);
const modes = ['sleep', 'auto', 'poll'];
const sessions = await Promise.all(modes.map((wait) => sonde.Session.load(bytes, { device: 'cpu', threads, wait })));
const feed = { [sessions[0].inputs[0].name]: new Tensor('float32', x.data, x.dims) };
for (const s of sessions) for (let i = 0; i < 50; i++) await s.run(feed);
// Runs per block: about 50 ms of work, so that a block sees the VM's drift alike for every mode.
const t0 = performance.now();
await sessions[0].run(feed);
const perBlock = Math.max(5, Math.round(50 / Math.max(0.01, performance.now() - t0 + gapMs)));
const times = modes.map(() => []), cpu = modes.map(() => 0);
for (let r = 0; r < rounds; r++) {
  for (let k = 0; k < modes.length; k++) {
    const c0 = process.cpuUsage();
    for (let i = 0; i < perBlock; i++) {
      await pause();
      const s0 = performance.now();
      await sessions[k].run(feed);
      times[k].push(performance.now() - s0);
    }
    const c = process.cpuUsage(c0);
    cpu[k] += (c.user + c.system) / 1000;
  }
}
for (const [k, mode] of modes.entries()) {
  const a = times[k].sort((p, q) => p - q);
  console.log(`${name} n1 t${threads}${gapMs ? ` gap ${gapMs} ms` : ''} wait '${mode}': median ${(a[a.length >> 1] * 1000).toFixed(1)} us per run, CPU ${(cpu[k] / a.length * 1000).toFixed(1)} us per run`);
}
for (const s of sessions) s.dispose();
