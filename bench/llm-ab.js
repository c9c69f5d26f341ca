// node bench/llm-ab.js <before-package-dir> [--quick] [--types f16,q8_0] [--threads 1,2] [--tokens N] [--rounds R]
// node bench/llm-ab.js --before-env NAME=VALUE [...]
// Issue 8's decode (batch 1) of the Mixtral-layout benchmark model through two builds of sonde in
// one process: <before-package-dir> holds a copy of another build's dist/ and
// build/Release/sonde.node (e.g. main's), this tree is the other. With --before-env, this tree is
// both, "before" being the model loaded with the environment variable set (one read at load, such
// as SONDE_Q8_REPACK=0); the load times of both are printed too. Greedy generations alternate
// call by call (order flipped every round), so both see the same machine load; prints tokens/s,
// % of the read-bandwidth bound (the `llm` suite's definition: bytes of weights a token reads /
// the `peak` suite's read bandwidth at the same thread count) and the after/before speed ratio.
// Both must generate the same tokens for a block type (the same bits by design); for F16 a changed
// summation order may flip a near tie late in the sequence, which is reported, not an error.
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { llmModelPath } from './llm/models.js';
import * as after from '../dist/index.js';
import { native } from '../dist/binding.js';

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const dir = args.find((a, i) => !a.startsWith('--') && !(i > 0 && args[i - 1].startsWith('--') && args[i - 1] !== '--quick'));
const beforeEnv = opt('before-env', undefined)?.split('=');
if (!dir && !beforeEnv) {
  console.error('usage: node bench/llm-ab.js <before-package-dir> | --before-env NAME=VALUE [--quick] [--types f16,q8_0] [--threads 1,2]');
  process.exit(2);
}
const before = beforeEnv ? after : await import(pathToFileURL(resolve(dir, 'dist', 'index.js')).href);
async function loadBefore(path, options) {
  if (!beforeEnv) return before.LanguageModel.load(path, options);
  process.env[beforeEnv[0]] = beforeEnv.slice(1).join('=');
  try {
    return await before.LanguageModel.load(path, options);
  } finally {
    delete process.env[beforeEnv[0]];
  }
}
const quick = args.includes('--quick');
const types = opt('types', 'f16,q8_0').split(',');
const threads = opt('threads', '1,2').split(',').map(Number);
const tokens = Number(opt('tokens', quick ? 16 : 64));
const rounds = Number(opt('rounds', quick ? 3 : 5));

async function perToken(path) {
  const file = await after.gguf.read(path);
  try {
    const experts = file.info.expertCount ?? 0;
    const used = file.info.expertUsedCount ?? 0;
    let bytes = 0;
    for (const t of file.tensors) {
      if (t.name === 'token_embd.weight') bytes += t.bytes / t.dims[1];
      else if (/_exps\.weight$/.test(t.name)) bytes += (t.bytes * used) / experts;
      else bytes += t.bytes;
    }
    return bytes;
  } finally {
    file.dispose();
  }
}

const prompt = [1, 17, 300, 42, 99, 100, 7, 212, 33, 64, 128, 256, 200, 31, 5, 8];
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
const { readFileSync } = await import('node:fs');
const load = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');

for (const type of types) {
  const path = await llmModelPath(after.gguf, 'moe', type);
  const bytes = await perToken(path);
  for (const t of threads) {
    const bw = await native().readBandwidth(quick ? 128 << 20 : 512 << 20, t);
    const gbps = bw.bytes / bw.seconds / 1e9;
    const bound = (gbps * 1e9) / bytes;
    const loadMs = [];
    const timed = async (load) => {
      const t0 = performance.now();
      const m = await load();
      loadMs.push(performance.now() - t0);
      return m;
    };
    const models = [await timed(() => loadBefore(path, { threads: t, contextSize: 256 })),
      await timed(() => after.LanguageModel.load(path, { threads: t, contextSize: 256 }))];
    const got = [[], []];
    const run = async (i) => {
      const out = [];
      const t0 = performance.now();
      for await (const e of models[i].generate(prompt, { maxTokens: tokens, temperature: 0 })) out.push(e.token);
      const ms = performance.now() - t0;
      got[i] = out;
      return (tokens * 1000) / ms;
    };
    await run(0);
    await run(1);
    const tps = [[], []];
    for (let r = 0; r < rounds; r++) for (const i of r % 2 ? [1, 0] : [0, 1]) tps[i].push(await run(i));
    const [b, a] = tps.map(median);
    let agree = 0;
    while (agree < tokens && got[0][agree] === got[1][agree]) agree++;
    console.log(`${type} decode t${t}: before ${b.toFixed(1)} tok/s (${((100 * b) / bound).toFixed(1)}% of bound), ` +
      `after ${a.toFixed(1)} tok/s (${((100 * a) / bound).toFixed(1)}%), after/before x${(a / b).toFixed(3)}; ` +
      `read bw ${gbps.toFixed(1)} GB/s, bound ${bound.toFixed(1)} tok/s; agree ${agree}/${tokens}; ` +
      `load ms ${loadMs.map((v) => v.toFixed(0)).join(' / ')}; loadavg ${load()}`);
    for (const m of models) m.dispose();
  }
}
process.exit(0);
