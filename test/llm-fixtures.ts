/**
 * Small random GGUF language models for tests, written with sonde.gguf.write in llama.cpp's own
 * conventions (tensor names, metadata keys, tokenizer arrays), so node-llama-cpp loads the same
 * file and serves as the reference.
 *
 * Kinds:
 * - 'llama':    dense llama with a 'llama' (SentencePiece) vocab: <unk> <s> </s>, the 256 <0xXX>
 *               byte tokens, then scored word pieces.
 * - 'qwen2':    dense qwen2 (q/k/v bias, NeoX RoPE) with a 'gpt2' byte-level BPE vocab (pre 'qwen2'):
 *               the 256 byte symbols, merged tokens, then <|endoftext|> <|im_start|> <|im_end|>.
 * - 'mixtral':  llama with expert_count experts of stacked ffn_{gate,up,down}_exps and a router.
 * - 'qwen2moe': qwen2 layout with routed experts plus a shared expert and its sigmoid gate.
 * - 'deepseek2': multi-head latent attention (FixtureOptions.mla) and DeepSeekMoE (leading dense
 *               layers, routed + ungated shared experts, FixtureOptions.routing), gpt2 vocab.
 *
 * Weights are deterministic (seeded) and scaled by 1/sqrt(fan-in) so activations stay O(1) through
 * the layers and the logits are neither flat nor saturated. Norm weights and biases are f32 (as
 * llama.cpp's converters write them); every matrix (embedding and output included) is `type`.
 */
import { mkdtempSync } from 'node:fs';
import type { Llama } from 'node-llama-cpp';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { typed, write, type GgufTensorType, type GgufWriteTensor } from '../lib/llm/gguf.js';

export type FixtureKind = 'llama' | 'qwen2' | 'mixtral' | 'qwen2moe' | 'deepseek2';

export interface FixtureOptions {
  kind: FixtureKind;
  type?: GgufTensorType;
  embedding?: number;
  layers?: number;
  heads?: number;
  kvHeads?: number;
  feedForward?: number;
  experts?: number;
  expertsUsed?: number;
  expertFeedForward?: number;
  sharedFeedForward?: number;
  contextLength?: number;
  ropeFreqBase?: number;
  /** Linear RoPE scaling factor written as {arch}.rope.scaling.{type,factor} (omitted when 1). */
  ropeScale?: number;
  /** Leave out output.weight (the output projection is then tied to token_embd.weight). */
  tied?: boolean;
  seed?: number;
  /** deepseek2 attention: q LoRA rank (0: attn_q), kv LoRA rank, rope/no-rope key and value head sizes, kv_b form. */
  mla?: { qLoraRank?: number; kvLoraRank?: number; ropeDim?: number; keyNope?: number; valueLength?: number; kvB?: 'joined' | 'split' };
  /** deepseek2 routing; gatingFunc is written as expert_gating_func (1 softmax, 2 sigmoid). */
  routing?: {
    denseLead?: number; sharedCount?: number; gatingFunc?: number; groups?: number; groupsUsed?: number;
    weightsNorm?: boolean; weightsScale?: number; probsBias?: boolean;
  };
  /** Control tokens appended to a gpt2 vocabulary (e.g. R1's '<think>', '</think>'). */
  extraSpecialTokens?: readonly string[];
  /** Tensors to drop or replace, by name, to build malformed files in tests. */
  omit?: readonly string[];
  override?: Readonly<Record<string, Partial<GgufWriteTensor>>>;
  /** Metadata keys to add or replace (undefined values remove the key). */
  metadata?: Readonly<Record<string, unknown>>;
}

export interface FixtureInfo {
  path: string;
  architecture: 'llama' | 'qwen2' | 'qwen2moe' | 'deepseek2';
  vocabSize: number;
  embedding: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  feedForward: number;
  experts: number;
  expertsUsed: number;
  bosId: number | undefined;
  eosId: number;
}

/** A fresh temporary directory for fixture files. */
export function fixtureDir(prefix = 'sonde-llm-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** Deterministic uniform [0, 1) (mulberry32), the generator the graph builder uses too. */
export { rng } from '../bench/graphs/builder.js';
import { rng } from '../bench/graphs/builder.js';

function uniform(rand: () => number, n: number, scale: number, offset = 0): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = offset + (rand() * 2 - 1) * scale;
  return out;
}

// Uniform on [-a, a] has standard deviation a / sqrt(3): a = sqrt(3 / fanIn) gives unit gain.
const gain = (fanIn: number) => Math.sqrt(3 / fanIn);

const SPM_WORDS = [
  '▁the', '▁a', '▁and', '▁of', '▁to', '▁in', '▁is', '▁it', '▁you', '▁that', '▁he', '▁was', '▁for', '▁on',
  '▁are', '▁with', '▁as', '▁I', '▁his', '▁they', '▁be', '▁at', '▁one', '▁have', '▁this', 'ing', 'ed', 'er',
  'ly', 'es', 's', 't', 'e', 'a', 'o', 'n', 'i', 'r', 'h', 'l', '▁', '▁▁', '▁▁▁▁', '.', ',', '!', '?',
  '▁hello', '▁world', '▁日本', '語', '▁😀',
];

/** llama SPM vocabulary: tokens, scores, token types (1 normal, 2 unknown, 3 control, 6 byte). */
export function spmVocab(): { tokens: string[]; scores: number[]; types: number[] } {
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
export function gpt2ByteSymbols(): string[] {
  const keep: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) keep.push(b);
  for (let b = 0xa1; b <= 0xac; b++) keep.push(b);
  for (let b = 0xae; b <= 0xff; b++) keep.push(b);
  const sym = new Array<string>(256);
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
export function bpeVocab(): { tokens: string[]; types: number[]; merges: string[] } {
  const tokens = gpt2ByteSymbols().slice();
  const types = tokens.map(() => 1);
  const seen = new Set(tokens);
  for (const m of BPE_MERGES) {
    const [a, b] = m.split(' ') as [string, string];
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

/** Writes one model and returns what a test needs to know about it. */
export async function writeFixture(path: string, o: FixtureOptions): Promise<FixtureInfo> {
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

  const md: Record<string, unknown> = {
    'general.architecture': arch,
    'general.name': `sonde-fixture-${o.kind}-${type}`,
    'general.file_type': ({ f32: 0, f16: 1, q4_0: 2, q8_0: 7, bf16: 32 } as const)[type],
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
  let vocab: number;
  let bosId: number | undefined;
  let eosId: number;
  if (qwen) {
    const v = bpeVocab();
    for (const t of o.extraSpecialTokens ?? []) {
      v.tokens.push(t);
      v.types.push(3);
    }
    vocab = v.tokens.length;
    eosId = v.tokens.indexOf('<|endoftext|>');
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

  const tensors: GgufWriteTensor[] = [];
  // A matrix of n rows of k: GGUF dims [k, n] (plus the expert count for stacked experts).
  const mat = (name: string, k: number, n: number, scale = gain(k), e = 0) =>
    tensors.push({ name, dims: e ? [k, n, e] : [k, n], type, data: uniform(rand, k * n * (e || 1), scale) });
  const vec = (name: string, n: number, scale: number, offset: number) =>
    tensors.push({ name, dims: [n], type: 'f32', data: uniform(rand, n, scale, offset) });

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
      tensors.push({ name: `${b}.attn_k_b.weight`, dims: [mla.keyNope, r, heads], type, data: uniform(rand, mla.keyNope * r * heads, gain(mla.keyNope)) });
      tensors.push({ name: `${b}.attn_v_b.weight`, dims: [r, mla.valueLength, heads], type, data: uniform(rand, r * mla.valueLength * heads, gain(r)) });
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
    tensors.push({ name: `${b}.ffn_gate_inp.weight`, dims: [d, experts], type: 'f32', data: uniform(rand, d * experts, 2 * gain(d)) });
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
      tensors.push({ name: `${b}.ffn_gate_inp.weight`, dims: [d, experts], type: 'f32', data: uniform(rand, d * experts, 2 * gain(d)) });
      const f = o.kind === 'qwen2moe' ? eff : ff;
      mat(`${b}.ffn_gate_exps.weight`, d, f, gain(d), experts);
      mat(`${b}.ffn_up_exps.weight`, d, f, gain(d), experts);
      mat(`${b}.ffn_down_exps.weight`, f, d, gain(f), experts);
      if (o.kind === 'qwen2moe') {
        tensors.push({ name: `${b}.ffn_gate_inp_shexp.weight`, dims: [d], type: 'f32', data: uniform(rand, d, gain(d)) });
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
  if (!o.tied) mat('output.weight', d, vocab, 2 * gain(d));

  const omit = new Set(o.omit ?? []);
  const out = tensors.filter((t) => !omit.has(t.name)).map((t) => ({ ...t, ...(o.override?.[t.name] ?? {}) }) as GgufWriteTensor);
  await write(path, { metadata: md, tensors: out });
  return {
    path, architecture: arch, vocabSize: vocab, embedding: d, layers, heads, kvHeads, headDim: hd,
    feedForward: ff, experts, expertsUsed: used, bosId, eosId,
  };
}

/** Log-probabilities of every next token after every position, from llama.cpp. */
export async function llamaCppLogProbs(llama: Llama, path: string, tokens: number[], vocab: number,
  options: { threads?: number } = {}): Promise<Float64Array[]> {
  const model = await llama.loadModel({ modelPath: path });
  try {
    const ctx = await model.createContext({
      contextSize: 128, batchSize: 128, ...(options.threads ? { threads: options.threads } : {}), flashAttention: false,
      experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
    } as never);
    try {
      const seq = ctx.getSequence();
      const res = await seq.controlledEvaluate(tokens.map((t) => [t, { generateNext: { probabilities: true } }] as never));
      return tokens.map((_, i) => {
        const probs = res[i]?.next.probabilities;
        if (!probs) throw new Error(`llama.cpp returned no probabilities for position ${i}`);
        const lp = new Float64Array(vocab).fill(Number.NaN);
        for (const [tok, p] of probs) if (p > 0) lp[tok as number] = Math.log(p);
        return lp;
      });
    } finally {
      await ctx.dispose();
    }
  } finally {
    await model.dispose();
  }
}

/** log softmax of one row of logits, in float64. */
export function logSoftmax(row: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  let s = 0;
  for (const v of row) s += Math.exp(v - max);
  const lse = max + Math.log(s);
  return Float64Array.from(row, (v) => v - lse);
}
