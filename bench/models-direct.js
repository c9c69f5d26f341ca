// node bench/models-direct.js [model=resnet50] [threads=1] [batch=1]
// A whole generated model with the direct NCHW16c conv path and its blocked runs (auto) against the
// same model with the direct path but no blocked runs (SONDE_CONV_BLOCKED=0 when its plan is built:
// every direct conv copies its input to NCHW16c and gathers its output back), with the direct path
// off (SONDE_CONV_DIRECT=0 at load) and onnxruntime-node, interleaved run by run in one process.
// Prints median ms and the ratios.
import { Session, Tensor } from '../dist/index.js';
import { withEnv } from './ab.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { modelBytes, modelInput } from './graphs/models.js';

const name = process.argv[2] ?? 'resnet50';
const threads = Number(process.argv[3] ?? 1);
const batch = Number(process.argv[4] ?? 1);
const bytes = modelBytes(name);
const x = modelInput(name, batch);
const feed = { input: new Tensor('float32', x.data, x.dims) };
// Each switch is read when its session loads (direct) or builds its plan (blocked): the first run.
const load = (env) => withEnv(env, async () => {
  const s = await Session.load(bytes, { threads });
  await s.run(feed);
  return s;
});
const auto = await load({});
const unblocked = await load({ SONDE_CONV_BLOCKED: '0' });
const off = await load({ SONDE_CONV_DIRECT: '0' });
const ort = await onnxruntime.prepareModel(bytes, { threads });
const fns = [() => auto.run(feed), () => unblocked.run(feed), () => off.run(feed), () => ort.run({ input: x })];
for (const f of fns) await f();
const times = fns.map(() => []);
const start = performance.now();
for (let r = 0; r < 400 && (r < 10 || performance.now() - start < 12000); r++) {
  for (const i of r % 2 ? [3, 2, 1, 0] : [0, 1, 2, 3]) {
    const t0 = performance.now();
    await fns[i]();
    times[i].push(performance.now() - t0);
  }
}
const med = (t) => [...t].sort((a, b) => a - b)[Math.floor(t.length / 2)];
const [a, u, o, r] = times.map(med);
console.log(`${name} n${batch} t${threads}: blocked ${a.toFixed(2)} ms, unblocked ${u.toFixed(2)} ms, direct off ${o.toFixed(2)} ms, ` +
  `ort ${r.toFixed(2)} ms; unblocked/blocked ${(u / a).toFixed(3)}, off/blocked ${(o / a).toFixed(3)}, ` +
  `ort/blocked ${(r / a).toFixed(3)}, ort/unblocked ${(r / u).toFixed(3)}, ort/off ${(r / o).toFixed(3)} (${times[0].length} rounds)`);
for (const s of [auto, unblocked, off]) s.dispose();
await ort.release();
