// node bench/bf16-ab.js [model=resnet50] [threads=1] [batch=1] [seconds=12]
// A generated model with precision 'bf16' against the same model in fp32 and onnxruntime-node fp32,
// interleaved run by run in one process (device 'cpu'). Prints median ms, the ratios, and the bf16
// output's largest difference from ORT's relative to ORT's largest magnitude.
import { Session, Tensor } from '../dist/index.js';
import { interleave, median, withEnv } from './ab.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { modelBytes, modelInput } from './graphs/models.js';

const name = process.argv[2] ?? 'resnet50';
const threads = Number(process.argv[3] ?? 1);
const batch = Number(process.argv[4] ?? 1);
const seconds = Number(process.argv[5] ?? 12);
const bytes = modelBytes(name);
const x = modelInput(name, batch);
const feed = { input: new Tensor('float32', x.data, x.dims) };
const fp32 = await Session.load(bytes, { threads, device: 'cpu' });
const bf16 = await Session.load(bytes, { threads, device: 'cpu', precision: 'bf16' });
const ort = await onnxruntime.prepareModel(bytes, { threads, spin: false });
const want = (await ort.run({ input: x })).output.data;
const got = (await bf16.run(feed)).output.data;
let diff = 0, mag = 0;
for (let i = 0; i < want.length; i++) {
  diff = Math.max(diff, Math.abs(got[i] - want[i]));
  mag = Math.max(mag, Math.abs(want[i]));
}
const fns = [() => bf16.run(feed), () => fp32.run(feed), () => ort.run({ input: x })];
const times = await interleave(fns, { seconds });
const [b, f, o] = times.map(median);
const load = (await import('node:os')).loadavg()[0].toFixed(1);
console.log(`${name} n${batch} t${threads}: bf16 ${b.toFixed(2)} ms, fp32 ${f.toFixed(2)} ms, ort fp32 ${o.toFixed(2)} ms; ` +
  `ort/bf16 ${(o / b).toFixed(3)}, fp32/bf16 ${(f / b).toFixed(3)}, ort/fp32 ${(o / f).toFixed(3)}; ` +
  `bf16 max |diff| / max |ort| ${(diff / mag).toExponential(2)} (${times[0].length} rounds, load ${load})`);
bf16.dispose();
fp32.dispose();
await ort.release();
