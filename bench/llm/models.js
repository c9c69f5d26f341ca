// Generated GGUF language models, in llama.cpp's own conventions (tensor names, metadata keys,
// tokenizer arrays) so that node-llama-cpp loads the same file: the small fixtures of the tests
// (test/llm-fixtures.ts wraps llmModelSpec) and the benchmark models of the `llm` and `serving`
// suites (llmModelPath), which are too large to commit and are generated on first use into
// bench/.cache/ (gitignored), keyed by a hash of their parameters.
//
// Kinds:
// - 'llama':    dense llama with a 'llama' (SentencePiece) vocab: <unk> <s> </s>, the 256 <0xXX>
//               byte tokens, then scored word pieces.
// - 'qwen2':    dense qwen2 (q/k/v bias, NeoX RoPE) with a 'gpt2' byte-level BPE vocab (pre 'qwen2'):
//               the 256 byte symbols, merged tokens, then <|endoftext|> <|im_start|> <|im_end|>.
// - 'mixtral':  llama with expert_count experts of stacked ffn_{gate,up,down}_exps and a router.
// - 'qwen2moe': qwen2 layout with routed experts plus a shared expert and its sigmoid gate.
// - 'deepseek2': multi-head latent attention (options.mla) and DeepSeekMoE (leading dense layers,
//               routed + ungated shared experts, options.routing), gpt2 vocab.
//
// Weights are deterministic (seeded) and scaled by 1/sqrt(fan-in) so activations stay O(1) through
// the layers and the logits are neither flat nor saturated. Norm weights and biases are f32 (as
// llama.cpp's converters write them); every matrix (embedding and output included) is `type`.
//
// Tensor data is produced when gguf.write reaches the tensor (one tensor in memory at a time: the
// 0.45 B-parameter benchmark model is 1.8 GB as float32), always in tensor order from the one
// random stream, so a file does not depend on which tensors a test omits or overrides.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, renameSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { rng } from '../graphs/builder.js';

function uniform(rand, n, scale, offset = 0) {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = offset + (rand() * 2 - 1) * scale;
  return out;
}

// Uniform on [-a, a] has standard deviation a / sqrt(3): a = sqrt(3 / fanIn) gives unit gain.
const gain = (fanIn) => Math.sqrt(3 / fanIn);

const SPM_WORDS = [
  '▁the', '▁a', '▁and', '▁of', '▁to', '▁in', '▁is', '▁it', '▁you', '▁that', '▁he', '▁was', '▁for', '▁on',
  '▁are', '▁with', '▁as', '▁I', '▁his', '▁they', '▁be', '▁at', '▁one', '▁have', '▁this', 'ing', 'ed', 'er',
  'ly', 'es', 's', 't', 'e', 'a', 'o', 'n', 'i', 'r', 'h', 'l', '▁', '▁▁', '▁▁▁▁', '.', ',', '!', '?',
  '▁hello', '▁world', '▁日本', '語', '▁😀',
];

/** llama SPM vocabulary: tokens, scores, token types (1 normal, 2 unknown, 3 control, 6 byte). */
export function spmVocab() {
  const tokens = ['<unk>', '<s>', '</s>'];
  const scores = [0, 0, 0];
  const types = [2, 3, 3];
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    scores.push(0);
    types.push(6);
  }
  SPM_WORDS.forEach((w, i) => {
    tokens.push(w);
    scores.push(-1 - i * 0.25);
    types.push(1);
  });
  return { tokens, scores, types };
}

/** GPT-2's byte -> printable code point map (bytes that are printable map to themselves). */
export function gpt2ByteSymbols() {
  const keep = [];
  for (let b = 0x21; b <= 0x7e; b++) keep.push(b);
  for (let b = 0xa1; b <= 0xac; b++) keep.push(b);
  for (let b = 0xae; b <= 0xff; b++) keep.push(b);
  const sym = new Array(256);
  for (const b of keep) sym[b] = String.fromCodePoint(b);
  let extra = 0;
  for (let b = 0; b < 256; b++) if (sym[b] === undefined) sym[b] = String.fromCodePoint(256 + extra++);
  return sym;
}

const BPE_MERGES = [
  'Ġ t', 'h e', 'Ġt he', 'i n', 'in g', 'a n', 'an d', 'Ġ a', 'Ġa n', 'Ġan d', 'e r', 'o n', 'r e', 'Ġ s', 'Ġ w',
  'Ġ o', 'Ġ h', 'e s', 'e d', 'o r', 'Ġ i', 'Ġi n', 'Ġ b', 'l l', 'Ġ c', 'Ġ f', 'Ġ m', 'o u', 'Ġ p', 'i s',
  'Ġi s', 'Ġ d', 'l e', 'e l', 'h el', 'hel l', 'hell o', 'Ġ hello', 'Ġ Ġ', 'ĠĠ ĠĠ', 'Ċ Ċ',
];

/** gpt2 byte-level BPE vocabulary: byte symbols, merge results, then special (control) tokens. */
export function bpeVocab() {
  const tokens = gpt2ByteSymbols().slice();
  const types = tokens.map(() => 1);
  const seen = new Set(tokens);
  for (const m of BPE_MERGES) {
    const [a, b] = m.split(' ');
    const t = a + b;
    if (!seen.has(a) || !seen.has(b)) throw new Error(`fixture merge '${m}' uses an unknown token`);
    if (!seen.has(t)) {
      seen.add(t);
      tokens.push(t);
      types.push(1);
    }
  }
  for (const s of ['<|endoftext|>', '<|im_start|>', '<|im_end|>']) {
    tokens.push(s);
    types.push(3);
  }
  return { tokens, types, merges: BPE_MERGES.slice() };
}

/**
 * The metadata and tensors of one model (for gguf.write) and what a caller needs to know about it.
 * `typed` is gguf.typed of the caller's build (lib/ in tests, dist/ in the benchmarks): metadata
 * needs explicit float32 values.
 */
export function llmModelSpec(o, typed) {
  const moe = o.kind === 'mixtral' || o.kind === 'qwen2moe' || o.kind === 'deepseek2';
  const arch = o.kind === 'mixtral' ? 'llama' : o.kind;
  const ds = arch === 'deepseek2';
  const qwen = arch === 'qwen2' || arch === 'qwen2moe' || ds;
  const type = o.type ?? 'f32';
  const d = o.embedding ?? 64;
  const layers = o.layers ?? 2;
  const heads = o.heads ?? 4;
  const kvHeads = o.kvHeads ?? 2;
  const hd = d / heads;
  const ff = o.feedForward ?? 128;
  const experts = moe ? o.experts ?? 4 : 0;
  const used = moe ? o.expertsUsed ?? 2 : 0;
  const eff = o.expertFeedForward ?? 64;
  const sff = o.sharedFeedForward ?? 96;
  const rand = rng(o.seed ?? 1234);

  const md = {
    'general.architecture': arch,
    'general.name': o.name ?? `sonde-fixture-${o.kind}-${type}`,
    'general.file_type': ({ f32: 0, f16: 1, q4_0: 2, q8_0: 7, bf16: 32 })[type],
    [`${arch}.context_length`]: o.contextLength ?? 256,
    [`${arch}.embedding_length`]: d,
    [`${arch}.block_count`]: layers,
    [`${arch}.feed_forward_length`]: ff,
    [`${arch}.attention.head_count`]: heads,
    [`${arch}.attention.head_count_kv`]: kvHeads,
    [`${arch}.attention.layer_norm_rms_epsilon`]: typed('float32', 1e-5),
    [`${arch}.rope.freq_base`]: typed('float32', o.ropeFreqBase ?? 10000),
    [`${arch}.rope.dimension_count`]: hd,
  };
  if ((o.ropeScale ?? 1) !== 1) {
    md[`${arch}.rope.scaling.type`] = 'linear';
    md[`${arch}.rope.scaling.factor`] = typed('float32', o.ropeScale);
  }
  if (moe) {
    md[`${arch}.expert_count`] = experts;
    md[`${arch}.expert_used_count`] = used;
  }
  if (o.kind === 'qwen2moe') {
    md['qwen2moe.expert_feed_forward_length'] = eff;
    md['qwen2moe.expert_shared_feed_forward_length'] = sff;
  }
  const mla = {
    qLoraRank: o.mla?.qLoraRank ?? 0, kvLoraRank: o.mla?.kvLoraRank ?? 32, ropeDim: o.mla?.ropeDim ?? 8,
    keyNope: o.mla?.keyNope ?? 16, valueLength: o.mla?.valueLength ?? 16, kvB: o.mla?.kvB ?? 'split',
  };
  const route = {
    denseLead: o.routing?.denseLead ?? 1, sharedCount: o.routing?.sharedCount ?? 2, gatingFunc: o.routing?.gatingFunc ?? 1,
    groups: o.routing?.groups ?? 0, groupsUsed: o.routing?.groupsUsed ?? 0, weightsNorm: o.routing?.weightsNorm ?? false,
    weightsScale: o.routing?.weightsScale ?? 1, probsBias: o.routing?.probsBias ?? false,
  };
  if (ds) {
    const qk = mla.keyNope + mla.ropeDim;
    Object.assign(md, {
      'deepseek2.rope.dimension_count': mla.ropeDim,
      'deepseek2.attention.q_lora_rank': mla.qLoraRank,
      'deepseek2.attention.kv_lora_rank': mla.kvLoraRank,
      'deepseek2.leading_dense_block_count': route.denseLead,
      'deepseek2.expert_feed_forward_length': eff,
      'deepseek2.expert_shared_count': route.sharedCount,
      'deepseek2.expert_gating_func': route.gatingFunc,
      'deepseek2.expert_weights_norm': route.weightsNorm,
      'deepseek2.expert_weights_scale': typed('float32', route.weightsScale),
    });
    if (route.groups > 0) {
      md['deepseek2.expert_group_count'] = route.groups;
      md['deepseek2.expert_group_used_count'] = route.groupsUsed;
    }
    if (mla.kvB === 'split') {
      // The newer converter's form: the cache row sizes under key/value_length, MQA of one head.
      Object.assign(md, {
        'deepseek2.attention.head_count_kv': 1,
        'deepseek2.attention.key_length': mla.kvLoraRank + mla.ropeDim,
        'deepseek2.attention.value_length': mla.kvLoraRank,
        'deepseek2.attention.key_length_mla': qk,
        'deepseek2.attention.value_length_mla': mla.valueLength,
      });
    } else {
      Object.assign(md, {
        'deepseek2.attention.head_count_kv': heads,
        'deepseek2.attention.key_length': qk,
        'deepseek2.attention.value_length': mla.valueLength,
      });
    }
  }
  let vocab;
  let bosId;
  let eosId;
  let nonWordIds;
  if (qwen) {
    const v = bpeVocab();
    for (const t of o.extraSpecialTokens ?? []) {
      v.tokens.push(t);
      v.types.push(3);
    }
    vocab = v.tokens.length;
    eosId = v.tokens.indexOf('<|endoftext|>');
    nonWordIds = v.types.flatMap((t, i) => (t !== 1 ? [i] : []));
    Object.assign(md, {
      'tokenizer.ggml.model': 'gpt2',
      'tokenizer.ggml.pre': 'qwen2',
      'tokenizer.ggml.tokens': v.tokens,
      'tokenizer.ggml.token_type': v.types,
      'tokenizer.ggml.merges': v.merges,
      'tokenizer.ggml.eos_token_id': eosId,
      'tokenizer.ggml.padding_token_id': eosId,
      'tokenizer.ggml.bos_token_id': eosId,
      'tokenizer.ggml.add_bos_token': false,
    });
  } else {
    const v = spmVocab();
    vocab = v.tokens.length;
    bosId = 1;
    eosId = 2;
    nonWordIds = v.types.flatMap((t, i) => (t !== 1 ? [i] : []));
    Object.assign(md, {
      'tokenizer.ggml.model': 'llama',
      'tokenizer.ggml.tokens': v.tokens,
      'tokenizer.ggml.scores': v.scores,
      'tokenizer.ggml.token_type': v.types,
      'tokenizer.ggml.bos_token_id': 1,
      'tokenizer.ggml.eos_token_id': 2,
      'tokenizer.ggml.unknown_token_id': 0,
      'tokenizer.ggml.add_bos_token': true,
      'tokenizer.ggml.add_eos_token': false,
    });
  }
  for (const [k, v] of Object.entries(o.metadata ?? {})) {
    if (v === undefined) delete md[k];
    else md[k] = v;
  }

  // Each tensor's values come from its generator; generators run strictly in tensor order (see the
  // top of the file), those of tensors nobody asks for (omitted, overridden) in passing.
  const tensors = [];
  const generators = [];
  let drawn = 0;
  const add = (name, dims, tensorType, generate) => {
    const index = generators.length;
    generators.push(generate);
    tensors.push({
      name, dims, type: tensorType,
      data: () => {
        if (drawn > index) throw new Error(`tensor ${name}: its values were drawn already (write each spec once, in order)`);
        while (drawn < index) generators[drawn++]();
        drawn++;
        return generate();
      },
    });
  };
  // A matrix of n rows of k: GGUF dims [k, n] (plus the expert count for stacked experts).
  // o.tensorTypes: a type per tensor name where it differs from o.type (mixed files).
  const mat = (name, k, n, scale = gain(k), e = 0, shape) =>
    add(name, e ? [k, n, e] : [k, n], o.tensorTypes?.[name] ?? type, () => {
      const values = uniform(rand, k * n * (e || 1), scale);
      shape?.(values);
      return values;
    });
  const vec = (name, n, scale, offset) => add(name, [n], 'f32', () => uniform(rand, n, scale, offset));

  mat('token_embd.weight', d, vocab, 1);
  for (let l = 0; l < layers && ds; l++) {
    const b = `blk.${l}`;
    const qk = mla.keyNope + mla.ropeDim, r = mla.kvLoraRank;
    vec(`${b}.attn_norm.weight`, d, 0.2, 1);
    if (mla.qLoraRank > 0) {
      mat(`${b}.attn_q_a.weight`, d, mla.qLoraRank);
      vec(`${b}.attn_q_a_norm.weight`, mla.qLoraRank, 0.2, 1);
      mat(`${b}.attn_q_b.weight`, mla.qLoraRank, heads * qk);
    } else {
      mat(`${b}.attn_q.weight`, d, heads * qk);
    }
    mat(`${b}.attn_kv_a_mqa.weight`, d, r + mla.ropeDim);
    vec(`${b}.attn_kv_a_norm.weight`, r, 0.2, 1);
    if (mla.kvB === 'split') {
      add(`${b}.attn_k_b.weight`, [mla.keyNope, r, heads], type, () => uniform(rand, mla.keyNope * r * heads, gain(mla.keyNope)));
      add(`${b}.attn_v_b.weight`, [r, mla.valueLength, heads], type, () => uniform(rand, r * mla.valueLength * heads, gain(r)));
    } else {
      mat(`${b}.attn_kv_b.weight`, r, heads * (mla.keyNope + mla.valueLength));
    }
    mat(`${b}.attn_output.weight`, heads * mla.valueLength, d);
    vec(`${b}.ffn_norm.weight`, d, 0.2, 1);
    if (l < route.denseLead) {
      mat(`${b}.ffn_gate.weight`, d, ff);
      mat(`${b}.ffn_up.weight`, d, ff);
      mat(`${b}.ffn_down.weight`, ff, d);
      continue;
    }
    add(`${b}.ffn_gate_inp.weight`, [d, experts], 'f32', () => uniform(rand, d * experts, 2 * gain(d)));
    // A bias of the scores' size, so that it changes which experts are chosen.
    if (route.probsBias) vec(`${b}.exp_probs_b.bias`, experts, 0.3, 0);
    mat(`${b}.ffn_gate_exps.weight`, d, eff, gain(d), experts);
    mat(`${b}.ffn_up_exps.weight`, d, eff, gain(d), experts);
    mat(`${b}.ffn_down_exps.weight`, eff, d, gain(eff), experts);
    if (route.sharedCount > 0) {
      const s2 = eff * route.sharedCount;
      mat(`${b}.ffn_gate_shexp.weight`, d, s2);
      mat(`${b}.ffn_up_shexp.weight`, d, s2);
      mat(`${b}.ffn_down_shexp.weight`, s2, d);
    }
  }
  for (let l = 0; l < layers && !ds; l++) {
    const b = `blk.${l}`;
    vec(`${b}.attn_norm.weight`, d, 0.2, 1);
    mat(`${b}.attn_q.weight`, d, heads * hd);
    mat(`${b}.attn_k.weight`, d, kvHeads * hd);
    mat(`${b}.attn_v.weight`, d, kvHeads * hd);
    if (qwen) {
      vec(`${b}.attn_q.bias`, heads * hd, 0.2, 0);
      vec(`${b}.attn_k.bias`, kvHeads * hd, 0.2, 0);
      vec(`${b}.attn_v.bias`, kvHeads * hd, 0.2, 0);
    }
    mat(`${b}.attn_output.weight`, heads * hd, d);
    vec(`${b}.ffn_norm.weight`, d, 0.2, 1);
    if (moe) {
      // The router in f32, as llama.cpp's converters keep it (its scores pick the experts).
      add(`${b}.ffn_gate_inp.weight`, [d, experts], 'f32', () => uniform(rand, d * experts, 2 * gain(d)));
      const f = o.kind === 'qwen2moe' ? eff : ff;
      mat(`${b}.ffn_gate_exps.weight`, d, f, gain(d), experts);
      mat(`${b}.ffn_up_exps.weight`, d, f, gain(d), experts);
      mat(`${b}.ffn_down_exps.weight`, f, d, gain(f), experts);
      if (o.kind === 'qwen2moe') {
        add(`${b}.ffn_gate_inp_shexp.weight`, [d], 'f32', () => uniform(rand, d, gain(d)));
        mat(`${b}.ffn_gate_shexp.weight`, d, sff);
        mat(`${b}.ffn_up_shexp.weight`, d, sff);
        mat(`${b}.ffn_down_shexp.weight`, sff, d);
      }
    } else {
      mat(`${b}.ffn_gate.weight`, d, ff);
      mat(`${b}.ffn_up.weight`, d, ff);
      mat(`${b}.ffn_down.weight`, ff, d);
    }
  }
  vec('output_norm.weight', d, 0.2, 1);
  // wordsOnly: zero output rows for every token but the normal ones (control tokens, EOS among
  // them, and SPM's byte tokens), so their logit is 0 while the largest of the others is well
  // above: greedy decoding neither ends a generation early nor emits half a UTF-8 character (whose
  // text a streaming API holds back), and a benchmark's generations run the length it asks for on
  // both runtimes, one event per token.
  const quiet = o.wordsOnly ? (w) => { for (const id of nonWordIds) w.fill(0, id * d, (id + 1) * d); } : undefined;
  if (!o.tied) mat('output.weight', d, vocab, 2 * gain(d), 0, quiet);
  else if (quiet) throw new Error('wordsOnly needs an output.weight (not tied)');

  const omit = new Set(o.omit ?? []);
  const out = tensors.filter((t) => !omit.has(t.name)).map((t) => ({ ...t, ...(o.override?.[t.name] ?? {}) }));
  return {
    spec: { metadata: md, tensors: out },
    info: {
      architecture: arch, vocabSize: vocab, embedding: d, layers, heads, kvHeads, headDim: hd,
      feedForward: ff, experts, expertsUsed: used, bosId, eosId,
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Benchmark models

// Bump when llmModelSpec changes what it writes for the same parameters, so stale cache files are
// not reused.
const GENERATOR_VERSION = 1;
const CACHE_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '.cache');

/**
 * The models of issues #8, #9 and #10. 'moe': the Mixtral layout of the `llm` suite (hidden 1024,
 * 12 layers, 16 heads, 4 KV heads, 8 experts of FFN 1408, top-2: 0.45 B parameters, 0.13 B active
 * per token). 'dense': the ~50 M dense llama of the `serving` suite. Both with the small SPM vocab
 * of the fixtures (311 tokens: the output projection costs next to nothing, as in the issue's
 * count) and greedy outputs limited to word pieces (wordsOnly, see llmModelSpec). 'deepseek':
 * deepseek2 in DeepSeek-V2-Lite's proportions at about half its width, as issue #10 gives them
 * (V2-Lite: hidden 2048, kv_lora 512, rope 64, nope/value 128, 64 experts of 1408 top-6, 2
 * shared): hidden 1024, 8 layers of which 1
 * dense (FFN 5472), 16 heads, kv_lora_rank 128, rope dims 32, nope and value 64, no q LoRA (as
 * V2-Lite), the split attn_k_b/attn_v_b tensors of current converters, 16 routed experts of 704
 * top-4 in 4 groups of which 2 are used (softmax scores) plus 2 shared: 0.31 B parameters, 0.13 B
 * active per token; gpt2 vocab (297 tokens).
 */
export const LLM_MODELS = {
  moe: { kind: 'mixtral', embedding: 1024, layers: 12, heads: 16, kvHeads: 4, feedForward: 1408, experts: 8, expertsUsed: 2, contextLength: 4096 },
  dense: { kind: 'llama', embedding: 512, layers: 12, heads: 8, kvHeads: 4, feedForward: 2048, contextLength: 4096 },
  deepseek: {
    kind: 'deepseek2', embedding: 1024, layers: 8, heads: 16, feedForward: 5472, experts: 16, expertsUsed: 4, expertFeedForward: 704,
    contextLength: 4096, mla: { qLoraRank: 0, kvLoraRank: 128, ropeDim: 32, keyNope: 64, valueLength: 64, kvB: 'split' },
    routing: { denseLead: 1, sharedCount: 2, gatingFunc: 1, groups: 4, groupsUsed: 2 },
  },
};

/**
 * Path of the benchmark model `name` ('moe' | 'dense' | 'deepseek') in tensor type `type`, generated into
 * bench/.cache/ on first use (`gguf` is the sonde.gguf module whose writer to use).
 */
export async function llmModelPath(gguf, name, type) {
  const base = LLM_MODELS[name];
  if (!base) throw new Error(`unknown language model '${name}' (have ${Object.keys(LLM_MODELS).join(', ')})`);
  const options = { ...base, type, seed: 2024, wordsOnly: true, name: `sonde-bench-${name}-${type}` };
  const key = createHash('sha256').update(JSON.stringify({ options, version: GENERATOR_VERSION })).digest('hex').slice(0, 16);
  const path = join(CACHE_DIR, `llm-${name}-${type}-${key}.gguf`);
  if (!existsSync(path)) {
    mkdirSync(CACHE_DIR, { recursive: true });
    const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
    await gguf.write(tmp, llmModelSpec(options, gguf.typed).spec);
    renameSync(tmp, path);
  }
  return path;
}
