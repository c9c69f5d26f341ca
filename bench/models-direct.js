// node bench/models-direct.js [model=resnet50] [threads=1] [batch=1]
// A whole generated model with the direct NCHW16c conv path chosen by its rule (auto) against the
// same model with it off (SONDE_CONV_DIRECT=0 at load) and onnxruntime-node, interleaved run by run
// in one process. Prints median ms and the ratios.
import { Session, Tensor } from '../dist/index.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { modelBytes, modelInput } from './graphs/models.js';

const name = process.argv[2] ?? 'resnet50';
const threads = Number(process.argv[3] ?? 1);
const batch = Number(process.argv[4] ?? 1);
const bytes = modelBytes(name);
const auto = await Session.load(bytes, { threads });
process.env.SONDE_CONV_DIRECT = '0';
const off = await Session.load(bytes, { threads });
delete process.env.SONDE_CONV_DIRECT;
const ort = await onnxruntime.prepareModel(bytes, { threads });
const x = modelInput(name, batch);
const feed = { input: new Tensor('float32', x.data, x.dims) };
const fns = [() => auto.run(feed), () => off.run(feed), () => ort.run({ input: x })];
for (const f of fns) await f();
const times = fns.map(() => []);
const start = performance.now();
for (let r = 0; r < 400 && (r < 10 || performance.now() - start < 8000); r++) {
  for (const i of r % 2 ? [2, 1, 0] : [0, 1, 2]) {
    const t0 = performance.now();
    await fns[i]();
    times[i].push(performance.now() - t0);
  }
}
const med = (t) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)];
const [a, o, r] = times.map(med);
console.log(`${name} n${batch} t${threads}: auto ${a.toFixed(2)} ms, direct off ${o.toFixed(2)} ms, ort ${r.toFixed(2)} ms; ` +
  `off/auto ${(o / a).toFixed(3)}, ort/auto ${(r / a).toFixed(3)}, ort/off ${(r / o).toFixed(3)} (${times[0].length} rounds)`);
await auto.dispose?.();
await off.dispose?.();
await ort.release();
