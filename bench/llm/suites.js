// Language-model suites: `llm` (issues #8 and #10: decode and prefill speed against node-llama-cpp) and
// `serving` (issue #9: prefix reuse, continuous batching, chunked prefill, the KV cap). Both run
// sonde and node-llama-cpp (prebuilt llama.cpp, CPU only, offline) in the same process on the same
// generated GGUF files (bench/llm/models.js), interleaved round by round.
import * as sonde from '../../dist/index.js';
import { LanguageModel, getThreads } from '../../dist/index.js';
import { quantile, readBandwidth } from '../suites.js';
import { llmModelPath } from './models.js';

/** node-llama-cpp's Llama (CPU, prebuilt binary only), one per run. */
async function llamaCpp(ctx) {
  if (!ctx.cache.has('llama')) {
    const { getLlama } = await import('node-llama-cpp');
    ctx.cache.set('llama', await getLlama({ gpu: false, build: 'never', logLevel: 'error' }));
  }
  return ctx.cache.get('llama');
}

/**
 * The ids prompts may use (vocab: below the trailing control tokens), and the bytes of weights one decode step reads (perToken): every attention
 * and norm tensor and the router whole, k of E experts' slices of the stacked expert tensors, one
 * row of the embedding, the output projection whole. KV-cache reads are left out (a few KB at
 * these context lengths).
 */
async function modelFacts(path) {
  const file = await sonde.gguf.read(path);
  try {
    const experts = file.info.expertCount ?? 0;
    const used = file.info.expertUsedCount ?? 0;
    let perToken = 0;
    for (const t of file.tensors) {
      if (t.name === 'token_embd.weight') perToken += t.bytes / t.dims[1];
      else if (/_exps\.weight$/.test(t.name)) perToken += (t.bytes * used) / experts;
      else perToken += t.bytes;
    }
    // Prompts draw from the ids below the vocabulary's trailing control tokens (the gpt2 vocab
    // ends in <|endoftext|> <|im_start|> <|im_end|>; the SPM one in word pieces).
    const types = file.metadata['tokenizer.ggml.token_type'];
    let vocab = types.length;
    while (vocab > 0 && types[vocab - 1] !== 1) vocab--;
    return { perToken, vocab };
  } finally {
    file.dispose();
  }
}

/** Deterministic token ids that are not control tokens (ids 0-2 of the SPM vocab), BOS first. */
function promptTokens(n, seed, vocab) {
  let s = seed >>> 0;
  const out = [1];
  while (out.length < n) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out.push(3 + (s % (vocab - 3)));
  }
  return out;
}

/**
 * Runs each of `fns` (each resolves to the ms it measured itself) once to warm up, then `rounds`
 * times in alternating order (forward, backward, ...) so that neither side always follows the
 * other on this shared machine; resolves to each one's median.
 */
async function interleavedRounds(fns, rounds) {
  for (const f of fns) await f();
  const times = fns.map(() => []);
  const order = fns.map((_, i) => i);
  for (let r = 0; r < rounds; r++) {
    for (const i of r % 2 ? [...order].reverse() : order) times[i].push(await fns[i]());
  }
  return times.map((t) => quantile(t, 0.5));
}

/** How many leading tokens two greedy generations share (a check that both ran the same model). */
function agreement(a, b) {
  let n = 0;
  while (n < a.length && n < b.length && a[n] === b[n]) n++;
  return n;
}

/**
 * Issue #8's speed table: the Mixtral-layout model (0.45 B, 8 experts top-2) in F16 and Q8_0, at 1
 * and 2 threads. Decode: tokens/s of one greedy generation (batch 1) of `decodeTokens` after a
 * 16-token prompt whose prefix both runtimes keep cached, so every timed token is one decode step;
 * GB/s = weight bytes read per token x tokens/s; bound = read bandwidth (the `peak` suite's
 * measurement) / bytes per token; pctBound = tokens/s / bound. Prefill: 512 tokens from an empty
 * cache. ratio = sonde speed / node-llama-cpp speed (above 1, sonde is faster). `agree`: how many
 * leading greedy tokens the two generated alike (all of them means the same model ran on both;
 * fewer is rounding near a tie, not an error: on Q8_0 llama.cpp also rounds the activations to 8
 * bits, and a flipped expert choice in a random 12-layer model moves the logits a lot).
 * --quick: 16 decode tokens, one round; --full: 128 tokens, 5 rounds, 1 to all threads.
 * The same decode and prefill cases then run on issue #10's deepseek2 model ('deepseek2 ...'),
 * followed by its KV-size, MLA prefill form and prefix TTFT cases (deepseekCases).
 */
export async function* llmSuite(ctx) {
  const llama = await llamaCpp(ctx);
  const pool = getThreads();
  // --full: every power of two up to the pool, and the pool itself.
  const threadCounts = ctx.full ? [...new Set([...Array.from({ length: Math.floor(Math.log2(pool)) + 1 }, (_, i) => 2 ** i), pool])]
    : [...new Set([1, Math.min(2, pool)])];
  const types = ['f16', 'q8_0'];
  const decodeTokens = ctx.quick ? 16 : ctx.full ? 128 : 64;
  const rounds = ctx.quick ? 1 : ctx.full ? 5 : 3;
  const prefillTokens = 512;
  // SONDE_BENCH_LLM=moe or =deepseek2 runs one model's cases.
  const only = process.env.SONDE_BENCH_LLM;
  for (const [name, label] of [['moe', 'moe'], ['deepseek', 'deepseek2']]) {
    if (only && only !== label) continue;
    // The prebuilt llama.cpp aborts the process on deepseek2's f16/q8_0 models where its CPU backend
    // takes the AMX build (its AMX buffer type has no kernel for the per-head latent products).
    if (label === 'deepseek2' && sonde.devices().cpu.features.includes('amx_int8')) {
      yield { case: 'deepseek2', note: 'skipped: the prebuilt llama.cpp aborts on deepseek2 f16/q8_0 models on AMX CPUs' };
      continue;
    }
    yield* speedCases(ctx, llama, { name, label, types, threadCounts, decodeTokens, rounds, prefillTokens });
    if (name === 'deepseek') yield* deepseekCases(ctx, llama, { rounds });
  }
}

/** Decode and prefill of one benchmark model against node-llama-cpp (see llmSuite). */
async function* speedCases(ctx, llama, { name, label, types, threadCounts, decodeTokens, rounds, prefillTokens }) {
  for (const type of types) {
    const path = await llmModelPath(sonde.gguf, name, type);
    const { perToken, vocab } = await modelFacts(path);
    const prompt = promptTokens(16, 11, vocab);
    const long = promptTokens(prefillTokens, 12, vocab);
    const lmodel = await llama.loadModel({ modelPath: path });
    for (const t of threadCounts) {
      const model = await LanguageModel.load(path, { threads: t, contextSize: 1024 });
      const lctx = await lmodel.createContext({ contextSize: 1024, batchSize: prefillTokens, threads: t, sequences: 1 });
      const seq = lctx.getSequence();
      const got = { sonde: [], llama: [] };

      const sondeDecode = async () => {
        const tokens = [];
        const t0 = performance.now();
        for await (const e of model.generate(prompt, { maxTokens: decodeTokens, temperature: 0 })) tokens.push(e.token);
        const ms = performance.now() - t0;
        if (tokens.length !== decodeTokens) throw new Error(`sonde generated ${tokens.length} of ${decodeTokens} tokens`);
        got.sonde = tokens;
        return ms;
      };
      const llamaDecode = async () => {
        // As sonde does: keep the prompt but its last token, which is evaluated again for its logits.
        if (seq.nextTokenIndex > 0) await seq.eraseContextTokenRanges([{ start: prompt.length - 1, end: seq.nextTokenIndex }]);
        const rest = seq.nextTokenIndex === 0 ? prompt : prompt.slice(-1);
        const tokens = [];
        const t0 = performance.now();
        for await (const token of seq.evaluate(rest, { temperature: 0 })) {
          tokens.push(token);
          if (tokens.length === decodeTokens) break;
        }
        const ms = performance.now() - t0;
        got.llama = tokens;
        return ms;
      };
      const [ms, lms] = await interleavedRounds([sondeDecode, llamaDecode], rounds);
      const tps = (decodeTokens * 1000) / ms;
      const ltps = (decodeTokens * 1000) / lms;
      const bw = await readBandwidth(ctx, t);
      const bound = (bw * 1e9) / perToken;
      yield { case: `${label} ${type} decode t${t}`, tokPerS: tps, gbps: (perToken * tps) / 1e9, boundTokPerS: bound, pctBound: (100 * tps) / bound,
        llamaTokPerS: ltps, llamaGbps: (perToken * ltps) / 1e9, ratio: tps / ltps, vs: 'node-llama-cpp', agree: `${agreement(got.sonde, got.llama)}/${decodeTokens}` };

      const sondePrefill = async () => {
        const t0 = performance.now();
        await model.logits(long);
        return performance.now() - t0;
      };
      const llamaPrefill = async () => {
        await seq.clearHistory();
        const t0 = performance.now();
        await seq.evaluateWithoutGeneratingNewTokens(long);
        return performance.now() - t0;
      };
      const [pms, lpms] = await interleavedRounds([sondePrefill, llamaPrefill], rounds);
      yield { case: `${label} ${type} prefill ${prefillTokens} t${t}`, ms: pms, tokPerS: (prefillTokens * 1000) / pms, llamaMs: lpms,
        llamaTokPerS: (prefillTokens * 1000) / lpms, ratio: lpms / pms, vs: 'node-llama-cpp' };
      await seq.clearHistory();
      await lctx.dispose();
      model.dispose();
    }
    await lmodel.dispose();
  }
}

/**
 * Issue #10's deepseek2 measurements beyond speed, on the 'deepseek' model:
 * - `kv bytes/token`: the latent cache's bytes per position (KvPool.blockBytes / blockSize) in f16
 *   and f32, against the issue's bound (kv_lora_rank + rope dims) x layers x element size and
 *   against full per-head K/V of the same attention (layers x heads x (k_nope + rope + value)).
 * - `mla prefill N`: prefill (logits of N tokens from an empty cache, in the scheduler's chunks of
 *   at most 512) with MLA pinned absorbed, pinned decompressed (SONDE_MLA_PREFILL at load) and
 *   chosen per step (the default), interleaved; `faster` names the faster pinned form and
 *   autoOverBest is the default's time over the faster one's (about 1 when the choice is right).
 *   `mla chunk 32 after 1024`: the same for the first token of a 32-token suffix of a cached
 *   1024-token prefix.
 * - `ttft 1024-prefix`: time to first token with a cached 1024-token prefix against cold, as the
 *   serving suite measures it for the other models (warmOverCold at most 0.1).
 * Q8_0, 2 threads (or the pool, if smaller).
 */
export async function* deepseekCases(ctx, llama, { rounds }) {
  const { loadTransformer } = await import('../../dist/llm/transformer.js');
  const threads = Math.min(2, getThreads());
  const path = await llmModelPath(sonde.gguf, 'deepseek', 'q8_0');
  const { vocab } = await modelFacts(path);

  const engine = await loadTransformer(path);
  try {
    const c = engine.config, m = c.mla;
    for (const [dtype, elem] of [['f16', 2], ['f32', 4]]) {
      const kvPool = engine.createKvPool({ maxBlocks: 1, blockSize: 16, dtype });
      const perToken = kvPool.blockBytes / kvPool.blockSize;
      kvPool.dispose();
      const bound = (m.kvLoraRank + m.ropeDim) * c.blockCount * elem;
      const full = c.blockCount * c.headCount * (m.keyNopeLength + m.ropeDim + m.valueLength) * elem;
      yield { case: `deepseek2 kv bytes/token ${dtype}`, bytesPerToken: perToken, boundBytes: bound, withinBound: perToken <= bound,
        fullKvBytes: full, latentOverFull: perToken / full };
    }
  } finally {
    engine.dispose();
  }

  const forms = ['absorbed', 'decompressed', undefined];
  const models = [];
  try {
    for (const form of forms) {
      if (form) process.env.SONDE_MLA_PREFILL = form;
      else delete process.env.SONDE_MLA_PREFILL;
      models.push(await LanguageModel.load(path, { threads, contextSize: 2048, kvCache: { maxBytes: 128 << 20 } }));
    }
  } finally {
    delete process.env.SONDE_MLA_PREFILL;
  }
  try {
    for (const n of [16, 64, 256, 1024]) {
      const tokens = promptTokens(n, 40 + n, vocab);
      const runs = models.map((model) => async () => {
        const t0 = performance.now();
        await model.logits(tokens);
        return performance.now() - t0;
      });
      const [abs, dec, auto] = await interleavedRounds(runs, ctx.quick ? 1 : Math.max(3, rounds) + (n <= 64 ? 4 : 0));
      yield { case: `deepseek2 q8_0 mla prefill ${n} t${threads}`, absorbedMs: abs, decompressedMs: dec, autoMs: auto,
        decompressedSpeedup: abs / dec, faster: dec < abs ? 'decompressed' : 'absorbed', autoOverBest: auto / Math.min(abs, dec) };
    }
    // A 32-token chunk after a cached 1024-token prefix (a fresh suffix each call): the time to
    // its first token, the form deciding how the cached prefix is attended.
    const prefix = promptTokens(1024, 77, vocab);
    const firstTokenMs = async (model, tokens) => {
      const t0 = performance.now();
      for await (const e of model.generate(tokens, { maxTokens: 1, temperature: 0 })) break;
      return performance.now() - t0;
    };
    let calls = 0;
    const suffix = () => promptTokens(33, 5000 + calls++, vocab).slice(1);
    for (const model of models) await firstTokenMs(model, [...prefix, ...suffix()]);
    const [abs, dec, auto] = await interleavedRounds(models.map((model) => () => firstTokenMs(model, [...prefix, ...suffix()])),
      ctx.quick ? 1 : Math.max(3, rounds) + 2);
    yield { case: `deepseek2 q8_0 mla chunk 32 after 1024 t${threads}`, absorbedMs: abs, decompressedMs: dec, autoMs: auto,
      decompressedSpeedup: abs / dec, faster: dec < abs ? 'decompressed' : 'absorbed', autoOverBest: auto / Math.min(abs, dec) };
  } finally {
    for (const model of models) model.dispose();
  }

  const model = await servingModel(path, { threads, contextSize: 2048, maxConcurrency: 8, kvCache: { maxBytes: 128 << 20 } });
  const lmodel = await llama.loadModel({ modelPath: path });
  const llamaSide = await llamaServer(lmodel, { threads, sequences: 1, contextSize: 2048 });
  try {
    const ttft = { cold: [], warm: [], llamaCold: [] };
    for (let r = 0; r < (ctx.quick ? 1 : 2); r++) {
      if (model) {
        const s = await prefixRound(sondeServer(model), vocab, r);
        ttft.cold.push(s.cold);
        ttft.warm.push(s.warm);
      }
      const l = await prefixRound(llamaSide, vocab, r);
      ttft.llamaCold.push(l.cold, l.warm);
    }
    const coldMs = model ? quantile(ttft.cold, 0.5) : undefined;
    const warmMs = model ? quantile(ttft.warm, 0.5) : undefined;
    yield { case: `deepseek2 q8_0 ttft 1024-prefix t${threads}`, coldMs, warmMs, warmOverCold: model ? warmMs / coldMs : undefined,
      llamaColdMs: quantile(ttft.llamaCold, 0.5), vs: 'node-llama-cpp', note: model ? undefined : 'sonde: no paged KV pool in this build' };
  } finally {
    await llamaSide.dispose();
    await lmodel.dispose();
    model?.dispose();
  }
}

// ---------------------------------------------------------------------------------------------
// serving

/**
 * The two runtimes behind one interface for the serving cases. generate(tokens, { maxTokens,
 * onToken, stop }) resolves to { start, times, tokens }: the call time and each generated token's
 * arrival time (performance.now()); onToken(count, time) is called per token, and the generation
 * ends early once stop() returns true.
 */
function sondeServer(model) {
  return {
    async generate(tokens, { maxTokens, onToken, stop }) {
      const start = performance.now();
      const times = [];
      const out = [];
      for await (const e of model.generate(tokens, { maxTokens, temperature: 0 })) {
        times.push(performance.now());
        out.push(e.token);
        onToken?.(out.length, times.at(-1));
        if (stop?.()) break;
      }
      return { start, times, tokens: out };
    },
  };
}

/**
 * node-llama-cpp as a server would use it: one context of `sequences` sequences (its batching
 * evaluates the sequences' pending tokens together, up to batchSize per batch), a request takes a
 * free sequence and starts it from an empty cache: node-llama-cpp has no prefix sharing across
 * sequences, so that is what a request after another one gets.
 */
async function llamaServer(lmodel, { threads, sequences, contextSize }) {
  const context = await lmodel.createContext({ contextSize, sequences, threads, batchSize: 512 });
  const free = Array.from({ length: sequences }, () => context.getSequence());
  return {
    async generate(tokens, { maxTokens, onToken, stop }) {
      const seq = free.pop();
      if (!seq) throw new Error(`node-llama-cpp: more concurrent requests than its ${sequences} sequences`);
      try {
        await seq.clearHistory();
        const start = performance.now();
        const times = [];
        const out = [];
        for await (const token of seq.evaluate(tokens, { temperature: 0 })) {
          times.push(performance.now());
          out.push(token);
          onToken?.(out.length, times.at(-1));
          if (out.length >= maxTokens || stop?.()) break;
        }
        return { start, times, tokens: out };
      } finally {
        free.push(seq);
      }
    },
    dispose: () => context.dispose(),
  };
}

/**
 * Time to first token of a request whose 1024-token prefix an earlier, finished request had, with
 * an unrelated request in between (so a cache of the last request alone cannot serve it), against
 * the same request cold (a prefix never seen). Each round uses a fresh prefix.
 */
async function prefixRound(server, vocab, round) {
  const prefix = promptTokens(1024, 1000 + round, vocab);
  const suffix = (seed) => promptTokens(33, seed, vocab).slice(1);
  const first = async (tokens) => {
    const r = await server.generate(tokens, { maxTokens: 1 });
    return r.times[0] - r.start;
  };
  const cold = await first([...prefix, ...suffix(2000 + round)]);
  await server.generate(promptTokens(64, 3000 + round, vocab), { maxTokens: 8 });
  const warm = await first([...prefix, ...suffix(4000 + round)]);
  return { cold, warm };
}

/**
 * Total tokens/s of `n` concurrent greedy generations of `maxTokens` after distinct 16-token
 * prompts (seeds from `seed`: a call never finds its prompts in sonde's prefix cache).
 */
async function concurrentStreams(server, n, maxTokens, vocab, seed) {
  const t0 = performance.now();
  const rs = await Promise.all(Array.from({ length: n }, (_, i) => server.generate(promptTokens(16, seed + i, vocab), { maxTokens })));
  const ms = performance.now() - t0;
  const total = rs.reduce((a, r) => a + r.tokens.length, 0);
  if (total !== n * maxTokens) throw new Error(`${n} streams of ${maxTokens} tokens generated ${total}`);
  return (total * 1000) / ms;
}

/**
 * `running` generations decode; once the first has `warmup` tokens, a `longTokens`-token prompt
 * arrives (and generates 4 tokens). Inter-token gaps of the running generations: steady = those
 * before the arrival (after each stream's first 4 tokens, which overlap the others' prompts);
 * during = those overlapping [arrival, the long request's first token]. The running generations
 * stop 4 tokens after that first token, or `deadlineMs` after the arrival. Prompts come from
 * `seed`, fresh per round, so that the long prompt is never in sonde's prefix cache.
 */
async function arrivalRound(server, running, longTokens, vocab, warmup, deadlineMs, seed) {
  let arrival = Infinity;
  let long;
  let longFirst = Infinity;
  let after = 0;
  const launch = () => {
    arrival = performance.now();
    long = server.generate(promptTokens(longTokens, seed, vocab), { maxTokens: 4, onToken: (k, t) => { if (k === 1) longFirst = t; } });
  };
  const rs = await Promise.all(Array.from({ length: running }, (_, i) => server.generate(promptTokens(16, seed + 1 + i, vocab), {
    maxTokens: 4096,
    onToken: (k, t) => {
      if (i === 0 && k === warmup) launch();
      if (i === 0 && t > longFirst) after++;
    },
    // The deadline bounds a run on a machine too loaded to get through the long prompt.
    stop: () => after >= 4 || performance.now() - arrival > deadlineMs,
  })));
  await long;
  const steady = [];
  const during = [];
  for (const r of rs) {
    for (let k = 4; k < r.times.length; k++) {
      const [a, b] = [r.times[k - 1], r.times[k]];
      if (b <= arrival) steady.push(b - a);
      else if (a < longFirst) during.push(b - a);
    }
  }
  return { steady, during, arrivalToFirst: longFirst - arrival };
}

/**
 * sonde's model for the serving cases, or undefined when this build does not batch concurrent
 * generations: issue #9's load options (kvCache, maxConcurrency) are not known to it, or the
 * engine has no paged KV pool (the model then serves one request after another, and its metrics
 * show no KV blocks).
 */
async function servingModel(path, options) {
  if (typeof LanguageModel.prototype.metrics !== 'function') return undefined;
  const model = await LanguageModel.load(path, options);
  if (model.metrics().kv?.blocks?.total > 0) return model;
  model.dispose();
  return undefined;
}

/**
 * Issue #9's serving measurements on the dense (~50 M) and Mixtral-layout (0.45 B) Q8_0 models, 2
 * threads, sonde and node-llama-cpp in the same run:
 * - `ttft 1024-prefix`: time to first token with a cached 1024-token prefix (warmMs) against cold
 *   (coldMs); warmOverCold should be at most 0.1. llamaColdMs: node-llama-cpp, cold.
 * - `8 streams`: total tokens/s of 8 concurrent greedy generations against one (speedup; at least
 *   2.5 dense, 1.5 MoE), and node-llama-cpp's with 8 sequences (ratio = sonde / node-llama-cpp 8
 *   streams, at least 1.2).
 * - `itl 7 + 1024 arrival`: inter-token latency p99 of 7 running generations while a 1024-token
 *   prompt arrives, against their steady state (p99Ratio, at most 3 with chunked prefill).
 * - `kv pool high-water`: the most bytes sonde's KV pool held over those cases, against
 *   kvCache.maxBytes (it must never exceed it), with the evictions and prefix hit rate.
 * Without the scheduler in this build, the sonde columns are empty and `note` says so: a one-
 * sequence model serving requests one after another would measure something else. The ttft case
 * runs first and touches every weight on both sides, so the later cases start warm.
 * --quick: one round, 16-token streams; --full: 4 rounds, 128-token streams.
 */
export async function* servingSuite(ctx) {
  const llama = await llamaCpp(ctx);
  const threads = Math.min(2, getThreads());
  const missing = 'sonde: continuous batching (issue #9) not in this build';
  const rounds = ctx.quick ? 1 : ctx.full ? 4 : 2;
  const streamTokens = ctx.quick ? 16 : ctx.full ? 128 : 64;
  const contextSize = 2048;
  const deadlineMs = ctx.quick ? 20_000 : 60_000;
  // A cap that every case fits in (at most ~3k positions live, ~24 KB each in f32 for both models),
  // so the high-water mark says how close the pool came to it.
  const maxBytes = 128 << 20;
  for (const name of ['dense', 'moe']) {
    const path = await llmModelPath(sonde.gguf, name, 'q8_0');
    const model = await servingModel(path, { threads, contextSize, maxConcurrency: 8, kvCache: { maxBytes } });
    const note = model ? undefined : missing;
    const lmodel = await llama.loadModel({ modelPath: path });
    const { vocab } = await modelFacts(path);
    const sondeSide = model && sondeServer(model);
    const llamaSide = await llamaServer(lmodel, { threads, sequences: 8, contextSize });
    const label = `${name} q8_0`;
    try {
      // Time to first token, cached prefix against cold.
      const ttft = { cold: [], warm: [], llamaCold: [] };
      for (let r = 0; r < rounds; r++) {
        if (sondeSide) {
          const s = await prefixRound(sondeSide, vocab, r);
          ttft.cold.push(s.cold);
          ttft.warm.push(s.warm);
        }
        const l = await prefixRound(llamaSide, vocab, r);
        ttft.llamaCold.push(l.cold, l.warm);
      }
      const coldMs = sondeSide ? quantile(ttft.cold, 0.5) : undefined;
      const warmMs = sondeSide ? quantile(ttft.warm, 0.5) : undefined;
      yield { case: `${label} ttft 1024-prefix t${threads}`, coldMs, warmMs, warmOverCold: sondeSide ? warmMs / coldMs : undefined,
        llamaColdMs: quantile(ttft.llamaCold, 0.5), vs: 'node-llama-cpp', note };

      // 8 concurrent streams against one, interleaved with node-llama-cpp's.
      let calls = 0;
      const streams = (server, n) => () => concurrentStreams(server, n, streamTokens, vocab, 5000 + 10 * calls++);
      const fns = [streams(llamaSide, 1), streams(llamaSide, 8)];
      if (sondeSide) fns.push(streams(sondeSide, 1), streams(sondeSide, 8));
      const results = fns.map(() => []);
      for (let r = 0; r < rounds; r++) {
        const order = fns.map((_, i) => i);
        for (const i of r % 2 ? order.reverse() : order) results[i].push(await fns[i]());
      }
      const [l1, l8, s1, s8] = [0, 1, 2, 3].map((i) => (results[i] ? quantile(results[i], 0.5) : undefined));
      yield { case: `${label} 8 streams x${streamTokens} t${threads}`, tokPerS: s8, singleTokPerS: s1, speedup: sondeSide ? s8 / s1 : undefined,
        llamaTokPerS: l8, llamaSingleTokPerS: l1, llamaSpeedup: l8 / l1, ratio: sondeSide ? s8 / l8 : undefined, vs: 'node-llama-cpp', note };

      // Inter-token latency of 7 running generations while a long prompt arrives.
      const itl = { steady: [], during: [], wait: [], lsteady: [], lduring: [], lwait: [] };
      for (let r = 0; r < rounds; r++) {
        if (sondeSide) {
          const s = await arrivalRound(sondeSide, 7, 1024, vocab, 16, deadlineMs, 6000 + 100 * r);
          itl.steady.push(...s.steady);
          itl.during.push(...s.during);
          itl.wait.push(s.arrivalToFirst);
        }
        const l = await arrivalRound(llamaSide, 7, 1024, vocab, 16, deadlineMs, 6000 + 100 * r);
        itl.lsteady.push(...l.steady);
        itl.lduring.push(...l.during);
        itl.lwait.push(l.arrivalToFirst);
      }
      const p99 = (xs) => (xs.length ? quantile(xs, 0.99) : undefined);
      yield { case: `${label} itl 7 + 1024 arrival t${threads}`, steadyP99Ms: p99(itl.steady), duringP99Ms: p99(itl.during),
        p99Ratio: sondeSide ? p99(itl.during) / p99(itl.steady) : undefined, longTtftMs: sondeSide ? quantile(itl.wait, 0.5) : undefined,
        llamaSteadyP99Ms: p99(itl.lsteady), llamaDuringP99Ms: p99(itl.lduring), llamaP99Ratio: p99(itl.lduring) / p99(itl.lsteady),
        llamaLongTtftMs: quantile(itl.lwait, 0.5), vs: 'node-llama-cpp', note };

      // The pool's most bytes held over all the cases above, against its cap.
      const kv = model?.metrics().kv;
      yield { case: `${label} kv pool high-water`, highWaterBytes: kv?.highWaterBytes, maxBytes: kv?.maxBytes ?? maxBytes,
        pctOfCap: kv ? (100 * kv.highWaterBytes) / kv.maxBytes : undefined, withinCap: kv ? kv.highWaterBytes <= kv.maxBytes : undefined,
        evictions: model?.metrics().evictions, prefixHitRate: model?.metrics().prefix.hitRate, note };
    } finally {
      await llamaSide.dispose();
      await lmodel.dispose();
      model?.dispose();
    }
  }
}
