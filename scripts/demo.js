// npm run demo: the embedded default model, a residual CNN trained on scikit-learn's 8x8 digits
// (scripts/train-digits.py), classifies its held-out test split with sonde's Session: accuracy,
// latency at batch 1 and throughput at batch 64, then the same with onnxruntime-node when it is
// installed (a devDependency). Then the embedded default language model (models/fortune-moe.gguf,
// scripts/train-lm.py) generates text with LanguageModel: tokens/s and expert load. Exits non-zero
// if an accuracy is off the one torch recorded or the language model fails.
//
// models/digits-test.bin layout (little-endian; read by models/digits.js):
//   "SDG1" | uint32 n | uint32 height | uint32 width | float32 n*height*width pixels, already scaled
//   as in training | uint8 n labels
import * as sonde from '../dist/index.js';
import { fileURLToPath } from 'node:url';
import { modelPath, readReport, readTestSplit, countCorrect } from '../models/digits.js';

const lmPath = fileURLToPath(new URL('../models/fortune-moe.gguf', import.meta.url));

const THROUGHPUT_BATCH = 64;
// Enough batch-64 runs for a stable rate without holding shared cores for long.
const THROUGHPUT_SECONDS = 1;
const LATENCY_WARMUP = 20;

const report = readReport();
const split = readTestSplit();
const pixelsPerImage = split.height * split.width;
const inputDims = (batch) => [batch, 1, split.height, split.width];

const cpu = sonde.devices().cpu;
console.log(`CPU : ${cpu.model} (${cpu.arch}), ${cpu.cores} cores, SIMD ${cpu.simd}`);
console.log(`model: models/digits.onnx (${Object.entries(report.onnx_ops).map(([op, k]) => `${k} ${op}`).join(', ')}; ` +
  `${report.parameters} parameters), test split ${split.n} images; torch measured ${report.test_correct}/${report.test_size}`);

/** Runs a runtime over the test split; returns its logits for every image and its numbers. */
async function measure(runtime) {
  // Whole split in batches of THROUGHPUT_BATCH; the last one is partial (360 = 5 x 64 + 40), which
  // exercises the dynamic batch axis.
  const logits = new Float32Array(split.n * 10);
  for (let start = 0; start < split.n; start += THROUGHPUT_BATCH) {
    const batch = Math.min(THROUGHPUT_BATCH, split.n - start);
    const out = await runtime.run(split.images.subarray(start * pixelsPerImage, (start + batch) * pixelsPerImage), batch);
    logits.set(out, start * 10);
  }
  const correct = countCorrect(logits, split.labels);

  // Batch 1, one image at a time: per-request latency, and the same predictions again.
  for (let i = 0; i < LATENCY_WARMUP; i++) await runtime.run(split.images.subarray(0, pixelsPerImage), 1);
  const times = [];
  const single = new Float32Array(split.n * 10);
  for (let i = 0; i < split.n; i++) {
    const image = split.images.subarray(i * pixelsPerImage, (i + 1) * pixelsPerImage);
    const t = performance.now();
    const out = await runtime.run(image, 1);
    times.push(performance.now() - t);
    single.set(out, i * 10);
  }
  times.sort((a, b) => a - b);
  const quantile = (q) => times[Math.min(times.length - 1, Math.floor(q * times.length))];
  const correctAtBatch1 = countCorrect(single, split.labels);

  const full = split.images.subarray(0, THROUGHPUT_BATCH * pixelsPerImage);
  await runtime.run(full, THROUGHPUT_BATCH);
  let images = 0;
  const t0 = performance.now();
  while (performance.now() - t0 < THROUGHPUT_SECONDS * 1000) {
    await runtime.run(full, THROUGHPUT_BATCH);
    images += THROUGHPUT_BATCH;
  }
  const perSecond = images / ((performance.now() - t0) / 1000);
  return { logits, correct, correctAtBatch1, p50: quantile(0.5), p99: quantile(0.99), perSecond };
}

function print(name, r) {
  console.log(`${name.padEnd(19)} accuracy ${r.correct}/${split.n} (${(100 * r.correct / split.n).toFixed(2)}%; ` +
    `${r.correctAtBatch1} at batch 1); latency at batch 1 p50 ${r.p50.toFixed(3)} ms, p99 ${r.p99.toFixed(3)} ms; ` +
    `batch ${THROUGHPUT_BATCH}: ${Math.round(r.perSecond)} images/s`);
}

const failures = [];
function checkAccuracy(name, r) {
  // Within one image: another runtime sums in another order, and an image on the edge between two
  // classes may flip; more than that is a wrong result, not rounding.
  for (const [what, got] of [['batched', r.correct], ['batch 1', r.correctAtBatch1]]) {
    if (Math.abs(got - report.test_correct) > 1) {
      failures.push(`${name} (${what}) classified ${got}/${split.n} correctly; torch recorded ${report.test_correct}/${report.test_size} in models/digits.json`);
    }
  }
}

let sondeResult = null;
if (typeof sonde.Session !== 'function') {
  failures.push('this build of sonde exports no Session (dist/index.js): run `npm run build` on a checkout that has lib/session');
} else {
  try {
    const session = await sonde.Session.load(modelPath);
    try {
      const input = session.inputs[0].name;
      const output = session.outputs[0].name;
      sondeResult = await measure({
        run: async (data, batch) => (await session.run({ [input]: new sonde.Tensor('float32', data, inputDims(batch)) }))[output].data,
      });
    } finally {
      session.dispose();
    }
    print('sonde', sondeResult);
    checkAccuracy('sonde', sondeResult);
  } catch (e) {
    // Still run onnxruntime-node below: it tells a broken model from a broken sonde.
    failures.push(`sonde: ${e.name}: ${e.message}`);
  }
}

let ort = null;
try {
  ort = (await import('onnxruntime-node')).default;
} catch (e) {
  console.log(`onnxruntime-node: not installed (${e.code ?? e.message}); the comparison with it is skipped`);
}
if (ort) {
  const session = await ort.InferenceSession.create(modelPath);
  let ortResult;
  try {
    ortResult = await measure({
      run: async (data, batch) => (await session.run({ image: new ort.Tensor('float32', data, inputDims(batch)) })).logits.data,
    });
  } finally {
    await session.release();
  }
  print(`onnxruntime ${ort.env.versions?.node ?? ''}`.trim(), ortResult);
  checkAccuracy('onnxruntime-node', ortResult);
  if (sondeResult) {
    let scale = 0;
    let diff = 0;
    for (let i = 0; i < ortResult.logits.length; i++) {
      scale = Math.max(scale, Math.abs(ortResult.logits[i]));
      diff = Math.max(diff, Math.abs(sondeResult.logits[i] - ortResult.logits[i]));
    }
    console.log(`sonde vs onnxruntime-node: max |logit difference| ${(diff / scale).toExponential(2)} of max |logit|; ` +
      `sonde's speed-up (above 1: sonde is faster): batch 1 p50 latency ${(ortResult.p50 / sondeResult.p50).toFixed(2)}x, ` +
      `batch ${THROUGHPUT_BATCH} throughput ${(sondeResult.perSecond / ortResult.perSecond).toFixed(2)}x`);
  }
}

// The embedded default language model (scripts/train-lm.py): a Mixtral-layout MoE trained on the
// Debian fortunes. A short generation with a fixed seed, streamed; prefill and decode rates apart
// (prefill evaluates the prompt in one batch, decode one token per step), and how the routers
// spread the tokens over the experts.
const LM_PROMPT = 'The meaning of life is';
const LM_TOKENS = 60;
const LM_SEED = 42;

async function languageModel() {
  if (typeof sonde.LanguageModel !== 'function') {
    failures.push('this build of sonde exports no LanguageModel (dist/index.js): run `npm run build`');
    return;
  }
  const model = await sonde.LanguageModel.load(lmPath);
  try {
    const info = model.info;
    console.log(`\nmodel: models/fortune-moe.gguf (${info.architecture}, ${info.blockCount} layers, ${info.expertCount} experts ` +
      `top-${info.expertUsedCount}, ${info.parameterCount} parameters, ${info.activeParameterCount} active per token, ` +
      `${info.quantizationTypes.join('/')}, vocabulary ${info.vocabSize})`);
    // Warm the pages of the mapped weights and the thread pool, so the rates below are the model's.
    // Not with the prompt itself: generate() would reuse the cached prefix and prefill one token.
    await model.logits(model.tokenize('Warm-up text', { addSpecial: false }));
    const countsBefore = model.expertCounts();
    let prompt = model.tokenize(LM_PROMPT);
    const promptTokens = prompt.length;
    process.stdout.write(`\n${LM_PROMPT}`);
    let generated = 0;
    let prefillMs = 0;
    let decodeMs = 0;
    let decoded = 0;
    // A fortune ends with the end-of-text token; the next one starts from BOS alone (its prefill is
    // one token and counts as decode), as the fortune program separates them with '%'.
    for (let fortune = 0; generated < LM_TOKENS; fortune++) {
      if (fortune > 0) process.stdout.write('\n%\n');
      let last = performance.now();
      let first = fortune === 0;
      let n = 0;
      for await (const e of model.generate(prompt, { maxTokens: LM_TOKENS - generated, temperature: 0.8, seed: LM_SEED + fortune })) {
        const now = performance.now();
        if (first) prefillMs = now - last;
        else { decodeMs += now - last; decoded++; }
        first = false;
        last = now;
        process.stdout.write(e.text);
        n++;
      }
      generated += n;
      if (n === 0) break;
      prompt = model.tokenize('');
    }
    process.stdout.write('\n\n');
    if (generated === 0) failures.push('the language model generated no tokens');
    console.log(`sonde: prefill ${promptTokens} tokens in ${prefillMs.toFixed(1)} ms (${Math.round(promptTokens / (prefillMs / 1000))} tokens/s), ` +
      `decode ${decoded} tokens at ${Math.round(decoded / (decodeMs / 1000))} tokens/s (${generated} generated)`);
    const counts = model.expertCounts();
    if (!counts || info.expertCount === 0) {
      failures.push('models/fortune-moe.gguf loaded as a dense model: no expert counts');
      return;
    }
    const E = info.expertCount;
    const total = new Float64Array(E);
    const lines = [];
    for (let l = 0; l < info.blockCount; l++) {
      let sum = 0;
      for (let e = 0; e < E; e++) sum += counts[l * E + e] - countsBefore[l * E + e];
      const shares = [];
      for (let e = 0; e < E; e++) {
        const n = counts[l * E + e] - countsBefore[l * E + e];
        total[e] += n;
        shares.push(`${(100 * n / sum).toFixed(0).padStart(3)}%`);
      }
      lines.push(`  layer ${l}: ${shares.join(' ')}`);
    }
    const all = total.reduce((a, b) => a + b, 0);
    console.log(`expert load (share of routed tokens per expert, ${E} experts, each token to ${info.expertUsedCount}):`);
    for (const line of lines) console.log(line);
    console.log(`  summed : ${Array.from(total, (n) => `${(100 * n / all).toFixed(0).padStart(3)}%`).join(' ')}`);
  } finally {
    model.dispose();
  }
}

try {
  await languageModel();
} catch (e) {
  failures.push(`language model: ${e.name}: ${e.message}`);
}

if (failures.length) {
  for (const f of failures) console.error(`demo failed: ${f}`);
  process.exit(1);
}
