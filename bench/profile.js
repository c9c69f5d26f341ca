// node bench/profile.js <resnet50|mobilenetv2|mlp|transformer|digits> [batch=1] [threads=1] [runs=20] [--steps] [--bf16] [--pruned]
// Where a Session's time goes: Session.profile() aggregated by op and kernel (and, with --steps,
// the 25 slowest steps), next to the whole run's median time and onnxruntime-node's on the same
// model and input, timed interleaved in this process (step times are means over the runs).
import { Session, Tensor, prune } from '../dist/index.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { modelBytes, modelInput } from './graphs/models.js';
import { modelPath, readTestSplit } from '../models/digits.js';
import { readFileSync } from 'node:fs';

const args = process.argv.slice(2).filter((a) => !a.startsWith('--'));
const showSteps = process.argv.includes('--steps');
const precision = process.argv.includes('--bf16') ? 'bf16' : 'fp32';
const [name = 'resnet50', batchArg = '1', threadsArg = '1', runsArg = '20'] = args;
const batch = Number(batchArg), threads = Number(threadsArg), runs = Number(runsArg);

let bytes, x, inputName;
if (name === 'digits') {
  bytes = readFileSync(modelPath);
  const split = readTestSplit();
  const px = split.height * split.width;
  x = { data: split.images.slice(0, batch * px), dims: [batch, 1, split.height, split.width] };
  inputName = 'input';
} else {
  bytes = modelBytes(name);
  // --pruned: the sparse suite's models (90% magnitude-pruned per layer, the first conv kept dense).
  if (process.argv.includes('--pruned')) bytes = (await prune(bytes, { sparsity: 0.9, keepFirstLayerDense: name !== 'mlp' })).bytes;
  x = modelInput(name, batch);
  inputName = 'input';
}
const s = await Session.load(bytes, { threads, device: 'cpu', precision });
inputName = s.inputs[0].name;
const feed = { [inputName]: new Tensor('float32', x.data, x.dims) };
const ort = await onnxruntime.prepareModel(bytes, { threads, spin: false });

const median = (t) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)];
// Rounds of ort, sonde run, ort, sonde profiled run: the profiled run follows ORT as the timed run
// does, so its steps see the same cache state (ORT's run evicts sonde's weights and arena).
const sondeT = [], ortT = [], profT = [], sondeCpu = [], ortCpu = [];
// Process CPU time per run (user + system) next to wall time: on a shared, oversubscribed machine a
// run's wall time includes waiting for a core, its CPU time does not. Run with SONDE_SPIN_US=0 so
// that idle pool threads sleep instead of spinning (spinning is CPU time too).
const cpuMs = (c) => (c.user + c.system) / 1e3;
const stepTotals = new Map();
let prof = [];
await s.run(feed);
await ort.run({ [inputName]: x });
for (let r = 0; r < runs; r++) {
  let c0 = process.cpuUsage();
  let t0 = performance.now();
  await ort.run({ [inputName]: x });
  ortT.push(performance.now() - t0);
  ortCpu.push(cpuMs(process.cpuUsage(c0)));
  c0 = process.cpuUsage();
  t0 = performance.now();
  await s.run(feed);
  sondeT.push(performance.now() - t0);
  sondeCpu.push(cpuMs(process.cpuUsage(c0)));
  await ort.run({ [inputName]: x });
  t0 = performance.now();
  const one = await s.profile(feed, { runs: 1 });
  profT.push(performance.now() - t0);
  one.forEach((rec, i) => stepTotals.set(i, (stepTotals.get(i) ?? 0) + rec.ms));
  prof = one;
}
const stepSum = [...stepTotals.values()].reduce((a, b) => a + b, 0);
prof = prof.map((rec, i) => ({ ...rec, ms: stepTotals.get(i) / runs, share: stepTotals.get(i) / stepSum }));
const stepMs = prof.reduce((a, r) => a + r.ms, 0);
const sm = median(sondeT), om = median(ortT);
console.log(`${name} n${batch} t${threads}: sonde ${sm.toFixed(3)} ms (profiled run ${median(profT).toFixed(3)} ms, ` +
  `steps ${stepMs.toFixed(3)} ms in ${prof.length}), ort ${om.toFixed(3)} ms, ratio ${(om / sm).toFixed(2)}; ` +
  `CPU ms sonde ${median(sondeCpu).toFixed(3)} ort ${median(ortCpu).toFixed(3)} ratio ${(median(ortCpu) / median(sondeCpu)).toFixed(2)}`);
const groups = new Map();
for (const r of prof) {
  const key = `${r.op} ${r.kernel}`;
  const g = groups.get(key) ?? { key, ms: 0, share: 0, count: 0 };
  g.ms += r.ms; g.share += r.share; g.count++;
  groups.set(key, g);
}
for (const g of [...groups.values()].sort((a, b) => b.ms - a.ms)) {
  console.log(`  ${g.key.padEnd(52)} x${String(g.count).padEnd(4)} ${g.ms.toFixed(3).padStart(8)} ms ${(100 * g.share).toFixed(1).padStart(5)}%`);
}
if (showSteps) {
  console.log('  slowest steps:');
  for (const r of [...prof].sort((a, b) => b.ms - a.ms).slice(0, 25)) {
    console.log(`    ${r.node.padEnd(28)} ${r.op.padEnd(8)} ${r.kernel.padEnd(40)} ${r.ms.toFixed(4).padStart(8)} ms ${(100 * r.share).toFixed(1).padStart(5)}%`);
  }
}
s.dispose();
await ort.release();
