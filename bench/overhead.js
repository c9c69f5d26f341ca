// node bench/overhead.js [ms=1500] [--breakdown]
// Per-call overhead of small runs (issue #5), each sonde case timed call by call against
// onnxruntime-node in this process (so the ratio holds on a loaded machine):
//   identity [1,16] t1     a one-Identity graph: the call itself
//   digits n1 t1/t2        models/digits.onnx at batch 1, as scripts/demo.js runs it
//   mlp n1 t1/t2           the 784-1024-1024-10 MLP of the models suite at batch 1
// and the Identity round trip alone (sonde back to back, no ORT call between).
// --breakdown also times the layers of one sonde call separately: an empty native plan (the
// hand-off to the pool and the completion back on the JS thread, nothing else), the Identity plan
// through native().planRun with preallocated outputs (adds the binding's per-call path), and
// Session.run (adds feed checks, plan lookup, output allocation, metrics).
// Medians of per-call times; ratio = ORT / sonde (above 1: sonde is faster).
import { readFileSync } from 'node:fs';
import { Session, Tensor } from '../dist/index.js';
import { native } from '../dist/binding.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { GraphBuilder } from './graphs/builder.js';
import { modelBytes, modelInput } from './graphs/models.js';
import { modelPath as digitsPath, readTestSplit } from '../models/digits.js';

const args = process.argv.slice(2).filter((a) => !a.startsWith('--'));
const sliceMs = Number(args[0] ?? 1500);
const breakdown = process.argv.includes('--breakdown');

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Calls fns in alternating order for about `ms`; returns each one's median call time in ms. */
async function interleaved(fns, ms) {
  for (const f of fns) for (let i = 0; i < 20; i++) await f();
  const times = fns.map(() => []);
  const order = fns.map((_, i) => i);
  const end = performance.now() + ms;
  for (let r = 0; performance.now() < end || r < 20; r++) {
    for (const i of r % 2 ? [...order].reverse() : order) {
      const t0 = performance.now();
      await fns[i]();
      times[i].push(performance.now() - t0);
    }
  }
  return times.map(median);
}

const rows = [];
function report(name, sondeMs, ortMs) {
  const row = { case: name, sondeUs: +(sondeMs * 1e3).toFixed(1), ortUs: ortMs === undefined ? undefined : +(ortMs * 1e3).toFixed(1),
    ratio: ortMs === undefined ? undefined : +(ortMs / sondeMs).toFixed(2) };
  rows.push(row);
  console.log(`${name.padEnd(28)} sonde ${row.sondeUs.toFixed(1).padStart(8)} us` +
    (ortMs === undefined ? '' : `   ort ${row.ortUs.toFixed(1).padStart(8)} us   ratio ${row.ratio.toFixed(2)}`));
}

// Identity: the call itself.
const g = new GraphBuilder('identity', { opset: 13 });
g.input('x', 'float32', [1, 16]);
g.node('Identity', ['x'], {}, ['y']);
g.output('y', 'float32', [1, 16]);
const idBytes = g.toBytes();
const x16 = { data: new Float32Array(16).fill(0.5), dims: [1, 16] };
{
  const ort = await onnxruntime.prepareModel(idBytes, { threads: 1, spin: false });
  const s = await Session.load(idBytes, { threads: 1 });
  const feed = { x: new Tensor('float32', x16.data, x16.dims) };
  const [ortMs, ms] = await interleaved([() => ort.run({ x: x16 }), () => s.run(feed)], sliceMs);
  report('identity [1,16] t1', ms, ortMs);
  const [alone] = await interleaved([() => s.run(feed)], sliceMs / 2);
  report('identity [1,16] t1 alone', alone);
  if (breakdown) {
    const n = native();
    const empty = n.createPlan({ buffers: [], steps: [], inputBytes: [], outputBytes: [], arenaBytes: 0 });
    const idPlan = n.createPlan({
      buffers: [{ kind: 'input', index: 0, bytes: 64 }, { kind: 'output', index: 0, bytes: 64 }],
      steps: [{ op: 'copy', node: 'y', x: { buffer: 0, offset: 0 }, y: { buffer: 1, offset: 0 }, dims: [16], xStrides: [1], yStrides: [1], elemBytes: 4 }],
      inputBytes: [64], outputBytes: [64], arenaBytes: 0,
    });
    const out = new Float32Array(16);
    const [e, p, r] = await interleaved([
      () => n.planRun(empty, [], [], 1),
      () => n.planRun(idPlan, [x16.data], [out], 1),
      () => s.run(feed),
    ], sliceMs);
    report('  empty planRun (hand-off)', e);
    report('  copy planRun (+binding)', p);
    report('  Session.run (+JS side)', r);
    empty.dispose();
    idPlan.dispose();
  }
  s.dispose();
  await ort.release();
}

// digits at batch 1, one image per call as the demo times it.
{
  const bytes = readFileSync(digitsPath);
  const split = readTestSplit();
  const px = split.height * split.width;
  const dims = [1, 1, split.height, split.width];
  for (const t of [1, 2]) {
    const ort = await onnxruntime.prepareModel(bytes, { threads: t, spin: false });
    const s = await Session.load(bytes, { threads: t });
    const inName = s.inputs[0].name;
    let i = 0, j = 0;
    const image = (k) => split.images.subarray((k % split.n) * px, ((k % split.n) + 1) * px);
    const [ortMs, ms] = await interleaved([
      () => ort.run({ [inName]: { data: image(i++), dims } }),
      () => s.run({ [inName]: new Tensor('float32', image(j++), dims) }),
    ], sliceMs);
    report(`digits n1 t${t}`, ms, ortMs);
    s.dispose();
    await ort.release();
  }
}

// The models suite's MLP at batch 1.
{
  const bytes = modelBytes('mlp');
  const x = modelInput('mlp', 1);
  for (const t of [1, 2]) {
    const ort = await onnxruntime.prepareModel(bytes, { threads: t, spin: false });
    const s = await Session.load(bytes, { threads: t });
    const feed = { input: new Tensor('float32', x.data, x.dims) };
    const [ortMs, ms] = await interleaved([() => ort.run({ input: x }), () => s.run(feed)], sliceMs);
    report(`mlp n1 t${t}`, ms, ortMs);
    s.dispose();
    await ort.release();
  }
}

if (process.argv.includes('--json')) console.log(JSON.stringify(rows));
