// node bench/bf16-blocked-ab.js [model=resnet50] [threads=1] [batch=1] [seconds=12]
// precision 'bf16' with the values between bf16 direct convs held in bf16 (default) against the same
// plan with them float32 (SONDE_CONV_BLOCKED_BF16=0: each bf16 conv converts its input per run), and
// onnxruntime-node fp32, interleaved run by run in one process. Prints medians and ratios.
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
// The switch is read when the plan is built: the first run.
const load = (env) => withEnv(env, async () => {
  const s = await Session.load(bytes, { threads, device: 'cpu', precision: 'bf16' });
  await s.run(feed);
  return s;
});
const held = await load({});
const converted = await load({ SONDE_CONV_BLOCKED_BF16: '0' });
const ort = await onnxruntime.prepareModel(bytes, { threads, spin: false });
const a = (await held.run(feed)).output.data, b = (await converted.run(feed)).output.data;
for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) throw new Error(`outputs differ at ${i}: ${a[i]} vs ${b[i]}`);
const fns = [() => held.run(feed), () => converted.run(feed), () => ort.run({ input: x })];
const times = await interleave(fns, { seconds });
const [h, c, o] = times.map(median);
const load1 = (await import('node:os')).loadavg()[0].toFixed(1);
console.log(`${name} bf16 n${batch} t${threads}: held ${h.toFixed(2)} ms, converted ${c.toFixed(2)} ms, ort fp32 ${o.toFixed(2)} ms; ` +
  `converted/held ${(c / h).toFixed(3)}, ort/held ${(o / h).toFixed(3)}, ort/converted ${(o / c).toFixed(3)} (${times[0].length} rounds, load ${load1})`);
held.dispose();
converted.dispose();
await ort.release();
