// node bench/runlat-ab.js <base package dir> [ms=3000] [--cases=identity,mlp1,mlp2] [--with-ort]
// Per-run overhead A/B (issue #5): this checkout's Session ('new') against another build of sonde
// ('base': a folder holding that build's dist/ and build/Release/sonde.node, e.g. a copy of main),
// both loaded in this process, each with its own pool, and onnxruntime-node as the anchor. Calls
// alternate in blocks of 50 (base, new, ort, then reversed), the first 5 of each block untimed,
// so that a block finds its pool in its steady state (the other pool's workers asleep) and load
// changes on a shared machine fall on both sides alike. --with-ort puts one ORT call before every
// sonde call instead, as the models suite interleaves them. Prints medians (us) and new/base and
// ort/new ratios.
import { cpus, loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import * as here from '../dist/index.js';
import { permutations } from './ab.js';
import * as onnxruntime from './anchors/onnxruntime.js';
import { GraphBuilder } from './graphs/builder.js';
import { modelBytes, modelInput } from './graphs/models.js';

const args = process.argv.slice(2).filter((a) => !a.startsWith('--'));
if (!args[0]) {
  console.error('usage: node bench/runlat-ab.js <base package dir> [ms] [--cases=identity,mlp1,mlp2] [--with-ort]');
  process.exit(2);
}
const base = await import(pathToFileURL(join(resolve(args[0]), 'dist', 'index.js')).href);
const sliceMs = Number(args[1] ?? 3000);
const withOrt = process.argv.includes('--with-ort');
const cases = (process.argv.find((a) => a.startsWith('--cases='))?.slice(8) ?? 'identity,mlp1,mlp2').split(',');
const BLOCK = 50, SKIP = 5;

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function blocks(fns, ms) {
  const times = fns.map(() => []);
  const end = performance.now() + ms;
  // Rounds cycle through every order of the blocks, whole cycles only: a block right after another
  // build's pays for that pool's threads still spinning, and with the order only reversed each
  // round the middle one always did (the same build on both sides read 1.46x apart at 2 threads).
  const orders = permutations(fns.length);
  for (let r = 0; performance.now() < end || r < orders.length || r % orders.length !== 0; r++) {
    const order = orders[r % orders.length];
    for (const i of order) {
      for (let c = 0; c < BLOCK; c++) {
        if (withOrt && i !== fns.length - 1) await fns[fns.length - 1]();
        const t0 = performance.now();
        await fns[i]();
        if (c >= SKIP) times[i].push(performance.now() - t0);
      }
    }
  }
  return times.map(median);
}

function identityBytes() {
  const g = new GraphBuilder('identity', { opset: 13 });
  g.input('x', 'float32', [1, 16]);
  g.node('Identity', ['x'], {}, ['y']);
  g.output('y', 'float32', [1, 16]);
  return g.toBytes();
}

console.log(`${cpus()[0]?.model} x${cpus().length}, load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}` +
  `${withOrt ? ', one ORT call before each sonde call' : ''}`);
for (const c of cases) {
  const t = c === 'mlp2' ? 2 : 1;
  const bytes = c === 'identity' ? identityBytes() : modelBytes('mlp');
  const x = c === 'identity' ? { data: new Float32Array(16).fill(0.5), dims: [1, 16] } : modelInput('mlp', 1);
  const name = c === 'identity' ? 'x' : 'input';
  const ort = await onnxruntime.prepareModel(bytes, { threads: t, spin: false });
  const sBase = await base.Session.load(bytes, { threads: t });
  const sNew = await here.Session.load(bytes, { threads: t });
  const feedBase = { [name]: new base.Tensor('float32', x.data, x.dims) };
  const feedNew = { [name]: new here.Tensor('float32', x.data, x.dims) };
  const want = (await sBase.run(feedBase))[Object.keys(await sBase.run(feedBase))[0]].data;
  const got = Object.values(await sNew.run(feedNew))[0].data;
  if (want.some((v, i) => v !== got[i])) throw new Error(`${c}: the two builds disagree`);
  const [b, n, o] = await blocks([() => sBase.run(feedBase), () => sNew.run(feedNew), () => ort.run({ [name]: x })], sliceMs);
  console.log(`${c.padEnd(9)} t${t}  base ${(b * 1e3).toFixed(1).padStart(7)} us  new ${(n * 1e3).toFixed(1).padStart(7)} us  ` +
    `ort ${(o * 1e3).toFixed(1).padStart(7)} us  new/base ${(n / b).toFixed(2)}  ort/new ${(o / n).toFixed(2)}  ort/base ${(o / b).toFixed(2)}`);
  sBase.dispose();
  sNew.dispose();
  await ort.release();
}
console.log(`load average after: ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
