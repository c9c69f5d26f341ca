// node bench/loop.js <model> <batch> <threads> <seconds>: runs one session in a loop for a while
// and prints the median run time: a steady load to sample with `perf record` (the bench suites
// interleave ORT and several sessions, which muddies a profile).
import { Session, Tensor } from '../dist/index.js';
import { modelBytes, modelInput } from './graphs/models.js';

const [name = 'mobilenetv2', batchArg = '8', threadsArg = '2', secondsArg = '10'] = process.argv.slice(2);
const batch = Number(batchArg), threads = Number(threadsArg), seconds = Number(secondsArg);
const x = modelInput(name, batch);
const s = await Session.load(modelBytes(name), { threads, device: 'cpu' });
const feed = { [s.inputs[0].name]: new Tensor('float32', x.data, x.dims) };
for (let i = 0; i < 3; i++) await s.run(feed);
const times = [];
const end = performance.now() + seconds * 1000;
while (performance.now() < end) {
  const t0 = performance.now();
  await s.run(feed);
  times.push(performance.now() - t0);
}
times.sort((a, b) => a - b);
console.log(`${name} n${batch} t${threads}: median ${times[times.length >> 1].toFixed(2)} ms over ${times.length} runs`);
s.dispose();
