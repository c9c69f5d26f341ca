// node bench/model-ab.js <base package dir> [model=mobilenetv2] [threads=1] [batch=1] [precision=fp32] [seconds=12]
// A whole generated model on this checkout's build ('new') against another build of sonde ('base': a
// folder holding that build's dist/, build/Release/sonde.node and package.json, with node_modules
// reachable, e.g. a copy of main), both loaded in this process, and onnxruntime-node fp32 as the
// anchor (its pool threads not spinning after a run, as in the bench suites), interleaved run by
// run in every order (ab.js) so the VM's drift falls on all alike.
// Outputs of the two builds are compared first. Prints medians, new/base and ort/new.
// Resolution on the 2-vCPU Xeon VM: two builds with identical conv code read 0.989x at ResNet-50
// batch 8 on two threads (40 s), so changes of 1-2% there need several runs either way; the pruned
// MLP at batch 1 (2000 rounds) resolves ~2%.
// 'digits' runs the demo's CNN on its test images. model@sparsity (e.g. resnet50@0.9) runs the
// model pruned by this checkout's sonde.prune (every layer but ResNet-50's first conv), both builds
// with sparse 'auto', and ORT on the same pruned bytes.
import { readFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import * as here from '../dist/index.js';
import { interleave, median } from './ab.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { modelBytes, modelInput } from './graphs/models.js';
import { modelPath, readTestSplit } from '../models/digits.js';

if (!process.argv[2]) {
  console.error('usage: node bench/model-ab.js <base package dir> [model] [threads] [batch] [precision] [seconds]');
  process.exit(2);
}
const base = await import(pathToFileURL(join(resolve(process.argv[2]), 'dist', 'index.js')).href);
const [name, sparsity] = (process.argv[3] ?? 'mobilenetv2').split('@');
const threads = Number(process.argv[4] ?? 1);
const batch = Number(process.argv[5] ?? 1);
const precision = process.argv[6] ?? 'fp32';
const seconds = Number(process.argv[7] ?? 12);
// 'digits': the demo's CNN (models/digits.onnx) on the first `batch` images of its test split.
const digits = name === 'digits';
const bytes = digits ? readFileSync(modelPath) : sparsity === undefined ? modelBytes(name)
  : (await here.prune(modelBytes(name), { sparsity: Number(sparsity), keepFirstLayerDense: name !== 'mlp' })).bytes;
const x = digits ? digitsInput(batch) : modelInput(name, batch);
const inputName = digits ? 'image' : 'input';
function digitsInput(n) {
  const split = readTestSplit();
  const px = split.height * split.width;
  return { data: split.images.slice(0, n * px), dims: [n, 1, split.height, split.width] };
}
const load = async (lib) => {
  const s = await lib.Session.load(bytes, { threads, device: 'cpu', precision });
  const feed = { [s.inputs[0].name]: new lib.Tensor('float32', x.data, x.dims) };
  return { s, run: () => s.run(feed) };
};
const b = await load(base), n = await load(here);
const ort = await onnxruntime.prepareModel(bytes, { threads, spin: false });
const [ob, on] = [await b.run(), await n.run()].map((o) => Object.values(o)[0].data);
let diff = 0;
for (let i = 0; i < ob.length; i++) diff = Math.max(diff, Math.abs(ob[i] - on[i]));
const fns = [b.run, n.run, () => ort.run({ [inputName]: x })];
const times = await interleave(fns, { seconds });
const [mb, mn, mo] = times.map(median);
console.log(`${name}${sparsity === undefined ? '' : ` pruned ${sparsity}`} ${precision} n${batch} t${threads}: base ${mb.toFixed(3)} ms, new ${mn.toFixed(3)} ms, ort fp32 ${mo.toFixed(3)} ms; ` +
  `new/base time ${(mn / mb).toFixed(3)}, ort/new ${(mo / mn).toFixed(3)}, ort/base ${(mo / mb).toFixed(3)}; ` +
  `max |new - base| ${diff.toExponential(2)} (${times[0].length} rounds, load ${loadavg()[0].toFixed(1)})`);
b.s.dispose();
n.s.dispose();
await ort.release();
