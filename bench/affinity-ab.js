// node bench/affinity-ab.js [model=resnet50] [batch=1] [threads=2] [rounds=20]
// Pinned against floating pool threads (setThreadAffinity 'on' / 'off'), alternating run by run in
// one process, each sonde run after an onnxruntime-node run of the same model and input (as the
// `models` suite interleaves them, so the pool's threads have slept). Prints the medians and the
// ratio ORT ms / sonde ms of each mode. Models: those of bench/graphs/models.js.
import { Session, Tensor, getThreadAffinity, setThreadAffinity } from '../dist/index.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { modelBytes, modelInput } from './graphs/models.js';

const [name = 'resnet50', batch = '1', threads = '2', rounds = '20'] = process.argv.slice(2);
const bytes = modelBytes(name);
const x = modelInput(name, Number(batch));
const session = await Session.load(bytes, { device: 'cpu', threads: Number(threads) });
const ort = await onnxruntime.prepareModel(bytes, { threads: Number(threads), spin: false });
const feed = { input: new Tensor('float32', x.data, x.dims) };
const before = getThreadAffinity().mode;
for (let i = 0; i < 3; i++) {
  await session.run(feed);
  await ort.run({ input: x });
}
const times = { on: [], off: [], ort: [] };
for (let r = 0; r < Number(rounds); r++) {
  for (const mode of r % 2 ? ['on', 'off'] : ['off', 'on']) {
    setThreadAffinity(mode);
    let t0 = performance.now();
    await ort.run({ input: x });
    times.ort.push(performance.now() - t0);
    t0 = performance.now();
    await session.run(feed);
    times[mode].push(performance.now() - t0);
  }
}
setThreadAffinity(before);
const median = (a) => [...a].sort((p, q) => p - q)[a.length >> 1];
const [on, off, o] = [median(times.on), median(times.off), median(times.ort)];
console.log(`${name} n${batch} t${threads}: pinned ${on.toFixed(3)} ms, floating ${off.toFixed(3)} ms, onnxruntime-node ${o.toFixed(3)} ms; ` +
  `ORT/sonde pinned ${(o / on).toFixed(3)}, floating ${(o / off).toFixed(3)}`);
session.dispose();
await ort.release();
