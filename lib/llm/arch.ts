/**
 * Architectures sonde's transformer runs, read from GGUF metadata in llama.cpp's conventions:
 * configFromGguf() gives the ModelConfig (lib/llm/engine.ts) after checking every tensor the
 * architecture needs for presence, type and shape; tensorIndexTable() gives the native side the
 * tensors in its slot order (native/ops/llm.h: LlmGlobalSlot, LlmLayerSlot).
 *
 * - llama: dense, or Mixtral's layout when `llama.expert_count` > 0 (router ffn_gate_inp, stacked
 *   ffn_{gate,up,down}_exps of feed_forward_length rows per expert; top-k weights renormalised).
 *   RoPE in the normal (adjacent pairs) ordering, as llama.cpp's converter permutes Q/K for it.
 * - qwen2: dense with q/k/v biases; NeoX RoPE.
 * - qwen2moe: qwen2 attention, routed experts of expert_feed_forward_length and a shared expert of
 *   expert_shared_feed_forward_length gated by sigmoid(ffn_gate_inp_shexp . x).
 *
 * - deepseek2 (DeepSeek-V2/V2-Lite/V3/R1): multi-head latent attention (q LoRA when
 *   attention.q_lora_rank > 0, the kv LoRA attn_kv_a_mqa -> latent + rope key part, the key/value
 *   up-projection as attn_kv_b or, when attention.key_length_mla is set, attn_k_b + attn_v_b),
 *   normal-ordering RoPE on rope.dimension_count of each head; leading_dense_block_count dense
 *   layers, then routed experts plus expert_shared_count ungated shared experts, routed by
 *   expert_gating_func (softmax | sigmoid, the optional exp_probs_b bias choosing only), with
 *   expert_weights_norm / expert_weights_scale and group-limited choice (expert_group_count,
 *   expert_group_used_count).
 *
 * Matrices may be f32, f16, bf16, q8_0 or q4_0; norm weights, biases and the shared-expert gate
 * vector must be f32 (as every converter writes them). `output.weight` absent: the output
 * projection is tied to `token_embd.weight`.
 */
import { ModelFormatError } from '../errors.js';
import type { LlmArchitecture, ModelConfig } from './engine.js';
import type { GgufFile, GgufTensor, GgufValue } from './gguf.js';

export const SUPPORTED_ARCHITECTURES: readonly LlmArchitecture[] = ['llama', 'qwen2', 'qwen2moe', 'deepseek2'];

const MATRIX_TYPES = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'];

/** Native slot order (native/ops/llm.h); -1 in the table for an absent tensor. */
export const GLOBAL_SLOTS = ['token_embd.weight', 'output_norm.weight', 'output.weight'] as const;
export const LAYER_SLOTS = [
  'attn_norm.weight', 'attn_q.weight', 'attn_k.weight', 'attn_v.weight', 'attn_q.bias', 'attn_k.bias', 'attn_v.bias',
  'attn_output.weight', 'ffn_norm.weight', 'ffn_gate.weight', 'ffn_up.weight', 'ffn_down.weight',
  'ffn_gate_inp.weight', 'ffn_gate_exps.weight', 'ffn_up_exps.weight', 'ffn_down_exps.weight',
  'ffn_gate_inp_shexp.weight', 'ffn_gate_shexp.weight', 'ffn_up_shexp.weight', 'ffn_down_shexp.weight',
  'attn_q_a.weight', 'attn_q_a_norm.weight', 'attn_q_b.weight', 'attn_kv_a_mqa.weight', 'attn_kv_a_norm.weight',
  'attn_kv_b.weight', 'attn_k_b.weight', 'attn_v_b.weight', 'exp_probs_b.bias',
] as const;

type Kind = 'matrix' | 'f32';
interface Want { name: string; dims: number[]; kind: Kind; optional?: boolean }

function meta(file: GgufFile, key: string): GgufValue | undefined {
  return file.metadata[key];
}

function uint(file: GgufFile, key: string, fallback?: number): number {
  const v = meta(file, key);
  if (v === undefined) {
    if (fallback !== undefined) return fallback;
    throw new ModelFormatError(`GGUF metadata key '${key}' is missing`);
  }
  const n = typeof v === 'bigint' ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) {
    throw new ModelFormatError(`GGUF metadata key '${key}' must be a non-negative integer, got ${String(v)}`);
  }
  return n;
}

function positive(file: GgufFile, key: string, fallback?: number): number {
  const v = meta(file, key);
  if (v === undefined) {
    if (fallback !== undefined) return fallback;
    throw new ModelFormatError(`GGUF metadata key '${key}' is missing`);
  }
  if (typeof v !== 'number' || !(v > 0) || !Number.isFinite(v)) {
    throw new ModelFormatError(`GGUF metadata key '${key}' must be a positive number, got ${String(v)}`);
  }
  return v;
}

/** A dense SwiGLU FFN's tensors of the layer whose names start with `b`. */
function denseFfn(b: string, d: number, ff: number): Want[] {
  return [
    { name: `${b}ffn_gate.weight`, dims: [d, ff], kind: 'matrix' },
    { name: `${b}ffn_up.weight`, dims: [d, ff], kind: 'matrix' },
    { name: `${b}ffn_down.weight`, dims: [ff, d], kind: 'matrix' },
  ];
}

/** The tensors a deepseek2 `config` needs, with their GGUF dims (ne0 first). */
function wantedDeepseek2(c: ModelConfig, hasOutput: boolean): Want[] {
  const m = c.mla!, r = c.routing!;
  const d = c.embeddingLength, h = c.headCount, qk = m.keyNopeLength + m.ropeDim;
  const out: Want[] = [
    { name: 'token_embd.weight', dims: [d, c.vocabSize], kind: 'matrix' },
    { name: 'output_norm.weight', dims: [d], kind: 'f32' },
  ];
  if (hasOutput) out.push({ name: 'output.weight', dims: [d, c.vocabSize], kind: 'matrix' });
  for (let l = 0; l < c.blockCount; l++) {
    const b = `blk.${l}.`;
    out.push({ name: `${b}attn_norm.weight`, dims: [d], kind: 'f32' });
    if (m.qLoraRank > 0) {
      out.push(
        { name: `${b}attn_q_a.weight`, dims: [d, m.qLoraRank], kind: 'matrix' },
        { name: `${b}attn_q_a_norm.weight`, dims: [m.qLoraRank], kind: 'f32' },
        { name: `${b}attn_q_b.weight`, dims: [m.qLoraRank, h * qk], kind: 'matrix' },
      );
    } else {
      out.push({ name: `${b}attn_q.weight`, dims: [d, h * qk], kind: 'matrix' });
    }
    out.push(
      { name: `${b}attn_kv_a_mqa.weight`, dims: [d, m.kvLoraRank + m.ropeDim], kind: 'matrix' },
      { name: `${b}attn_kv_a_norm.weight`, dims: [m.kvLoraRank], kind: 'f32' },
    );
    if (m.kvB === 'split') {
      out.push(
        { name: `${b}attn_k_b.weight`, dims: [m.keyNopeLength, m.kvLoraRank, h], kind: 'matrix' },
        { name: `${b}attn_v_b.weight`, dims: [m.kvLoraRank, m.valueLength, h], kind: 'matrix' },
      );
    } else {
      out.push({ name: `${b}attn_kv_b.weight`, dims: [m.kvLoraRank, h * (m.keyNopeLength + m.valueLength)], kind: 'matrix' });
    }
    out.push(
      { name: `${b}attn_output.weight`, dims: [h * m.valueLength, d], kind: 'matrix' },
      { name: `${b}ffn_norm.weight`, dims: [d], kind: 'f32' },
    );
    if (l < r.leadingDenseBlockCount) {
      out.push(...denseFfn(b, d, c.feedForwardLength));
      continue;
    }
    const e = c.expertCount, eff = c.expertFeedForwardLength, sff = c.sharedExpertFeedForwardLength;
    out.push(
      { name: `${b}ffn_gate_inp.weight`, dims: [d, e], kind: 'matrix' },
      { name: `${b}exp_probs_b.bias`, dims: [e], kind: 'f32', optional: true },
      { name: `${b}ffn_gate_exps.weight`, dims: [d, eff, e], kind: 'matrix' },
      { name: `${b}ffn_up_exps.weight`, dims: [d, eff, e], kind: 'matrix' },
      { name: `${b}ffn_down_exps.weight`, dims: [eff, d, e], kind: 'matrix' },
    );
    if (sff > 0) {
      out.push(
        { name: `${b}ffn_gate_shexp.weight`, dims: [d, sff], kind: 'matrix' },
        { name: `${b}ffn_up_shexp.weight`, dims: [d, sff], kind: 'matrix' },
        { name: `${b}ffn_down_shexp.weight`, dims: [sff, d], kind: 'matrix' },
      );
    }
  }
  return out;
}

/**
 * deepseek2's hyperparameters. Two GGUF forms exist: older files carry one attn_kv_b per layer and
 * attention.key_length/value_length are the per-head query/key and value sizes; newer ones (with
 * attention.key_length_mla) carry attn_k_b/attn_v_b, the MLA sizes under the *_mla keys, and
 * key_length/value_length describe the cached row (kv_lora_rank + rope dims / kv_lora_rank).
 */
function configDeepseek2(file: GgufFile): ModelConfig {
  const k = (key: string) => `deepseek2.${key}`;
  const embd = file.tensor('token_embd.weight')!;
  const embeddingLength = uint(file, k('embedding_length'));
  const headCount = uint(file, k('attention.head_count'));
  if (embeddingLength === 0 || headCount === 0) {
    throw new ModelFormatError(`'${k('embedding_length')}' (${embeddingLength}) and '${k('attention.head_count')}' (${headCount}) must be positive`);
  }
  const kvLoraRank = uint(file, k('attention.kv_lora_rank'));
  const qLoraRank = uint(file, k('attention.q_lora_rank'), 0);
  const ropeDim = uint(file, k('rope.dimension_count'));
  const split = meta(file, k('attention.key_length_mla')) !== undefined;
  const keyLength = split ? uint(file, k('attention.key_length_mla')) : uint(file, k('attention.key_length'));
  const valueLength = split ? uint(file, k('attention.value_length_mla')) : uint(file, k('attention.value_length'));
  if (kvLoraRank === 0) throw new ModelFormatError(`'${k('attention.kv_lora_rank')}' must be positive`);
  if (ropeDim === 0 || ropeDim % 2 !== 0 || keyLength <= ropeDim || valueLength === 0) {
    throw new ModelFormatError(`inconsistent MLA head sizes: key length ${keyLength} must exceed the even rope dimension count ${ropeDim}, value length ${valueLength} must be positive`);
  }
  if (split) {
    const rowKey = uint(file, k('attention.key_length'), kvLoraRank + ropeDim);
    const rowValue = uint(file, k('attention.value_length'), kvLoraRank);
    if (rowKey !== kvLoraRank + ropeDim || rowValue !== kvLoraRank) {
      throw new ModelFormatError(`inconsistent MLA ranks: '${k('attention.key_length')}' = ${rowKey} and '${k('attention.value_length')}' = ${rowValue} must be kv_lora_rank + rope dims = ${kvLoraRank + ropeDim} and kv_lora_rank = ${kvLoraRank}`);
    }
  }
  if (kvLoraRank + ropeDim > 1024) throw new ModelFormatError(`kv_lora_rank + rope dims = ${kvLoraRank + ropeDim} is above 1024`);
  const expertCount = uint(file, k('expert_count'));
  const expertUsedCount = uint(file, k('expert_used_count'));
  if (expertCount === 0 || expertUsedCount === 0 || expertUsedCount > expertCount) {
    throw new ModelFormatError(`'${k('expert_used_count')}' (${expertUsedCount}) must be in [1, '${k('expert_count')}' = ${expertCount}]`);
  }
  const gatingValue = uint(file, k('expert_gating_func'), 0);
  // llama.cpp's llama_expert_gating_func_type: 0 none (V2 files: softmax), 1 softmax, 2 sigmoid.
  if (gatingValue > 2) {
    throw new ModelFormatError(`'${k('expert_gating_func')}' = ${gatingValue} is not a known gating function (0 or 1: softmax, 2: sigmoid)`);
  }
  const groupCount = uint(file, k('expert_group_count'), 0);
  const groupUsedCount = uint(file, k('expert_group_used_count'), 0);
  if (groupCount > 1) {
    if (expertCount % groupCount !== 0) {
      throw new ModelFormatError(`'${k('expert_group_count')}' = ${groupCount} does not divide '${k('expert_count')}' = ${expertCount}`);
    }
    if (groupUsedCount === 0 || groupUsedCount > groupCount) {
      throw new ModelFormatError(`'${k('expert_group_used_count')}' = ${groupUsedCount} must be in [1, ${groupCount}]`);
    }
    if (expertUsedCount > groupUsedCount * (expertCount / groupCount)) {
      throw new ModelFormatError(`${expertUsedCount} experts per token do not fit in ${groupUsedCount} groups of ${expertCount / groupCount}`);
    }
  }
  const scaleValue = meta(file, k('expert_weights_scale'));
  const weightsScale = scaleValue === undefined || scaleValue === 0 ? 1 : positive(file, k('expert_weights_scale'));
  const normValue = meta(file, k('expert_weights_norm'));
  if (normValue !== undefined && typeof normValue !== 'boolean') {
    throw new ModelFormatError(`'${k('expert_weights_norm')}' must be a boolean, got ${String(normValue)}`);
  }
  const sharedCount = uint(file, k('expert_shared_count'));
  const expertFeedForwardLength = uint(file, k('expert_feed_forward_length'));
  const blockCount = uint(file, k('block_count'));
  const leadingDenseBlockCount = uint(file, k('leading_dense_block_count'), 0);
  if (leadingDenseBlockCount > blockCount) {
    throw new ModelFormatError(`'${k('leading_dense_block_count')}' = ${leadingDenseBlockCount} exceeds the ${blockCount} layers`);
  }
  if (expertFeedForwardLength === 0) throw new ModelFormatError(`'${k('expert_feed_forward_length')}' must be positive`);
  const feedForwardLength = uint(file, k('feed_forward_length'), leadingDenseBlockCount > 0 ? undefined : 0);
  if (leadingDenseBlockCount > 0 && feedForwardLength === 0) throw new ModelFormatError(`'${k('feed_forward_length')}' must be positive`);
  const scaling = meta(file, k('rope.scaling.type'));
  if (scaling !== undefined && scaling !== 'none' && scaling !== 'yarn') {
    throw new ModelFormatError(`'${k('rope.scaling.type')}' = '${String(scaling)}' is not supported for deepseek2 (supported: none, yarn)`);
  }
  const contextLength = uint(file, k('context_length'));
  const keyScale = 1 / Math.sqrt(keyLength);
  let ropeScale = 1, attentionScale = keyScale, ropeYarn: ModelConfig['ropeYarn'];
  if (scaling === 'yarn') {
    // llama.cpp's rules (llama_context's YaRN set-up and the deepseek2 graph): the file's
    // yarn_log_multiplier is 0.1 * mscale_all_dim; the rotation's magnitude is rope.scaling.attn_factor
    // (times get_mscale(s) when no multiplier is given), and the scores are scaled by
    // mscale^2 / sqrt(key length) with mscale = (that magnitude) * (1 + 0.1 * mscale_all_dim * ln s).
    const factor = positive(file, k('rope.scaling.factor'));
    const logMul = meta(file, k('rope.scaling.yarn_log_multiplier'));
    if (logMul !== undefined && (typeof logMul !== 'number' || !Number.isFinite(logMul))) {
      throw new ModelFormatError(`'${k('rope.scaling.yarn_log_multiplier')}' must be a number, got ${String(logMul)}`);
    }
    const mscaleAllDim = logMul === undefined ? 0 : logMul / 0.1;
    const ropeAttnFactor = positive(file, k('rope.scaling.attn_factor'), 1);
    const lnS = Math.log(factor);
    const getMscale = (m: number) => (factor <= 1 ? 1 : 0.1 * m * lnS + 1);
    const ropeFactor = (mscaleAllDim !== 0 ? 1 : getMscale(1)) / (1 + 0.1 * lnS) * ropeAttnFactor;
    const mscale = ropeFactor * (1 + 0.1 * lnS) * (1 + 0.1 * mscaleAllDim * lnS);
    ropeScale = factor;
    attentionScale = (mscale * mscale) * keyScale;
    ropeYarn = {
      originalContextLength: uint(file, k('rope.scaling.original_context_length'), contextLength),
      betaFast: positive(file, k('rope.scaling.yarn_beta_fast'), 32),
      betaSlow: positive(file, k('rope.scaling.yarn_beta_slow'), 1),
      magnitude: ropeFactor,
    };
  }
  return {
    architecture: 'deepseek2',
    vocabSize: embd.dims[1]!,
    contextLength,
    embeddingLength,
    blockCount,
    headCount,
    headCountKv: 1,
    headDim: kvLoraRank + ropeDim,
    // Dense layers' FFN; the native side needs a positive size even when every layer is MoE.
    feedForwardLength: feedForwardLength || expertFeedForwardLength,
    rmsEpsilon: positive(file, k('attention.layer_norm_rms_epsilon')),
    ropeFreqBase: positive(file, k('rope.freq_base'), 10000),
    ropeScale,
    ropeNeox: false,
    ...(ropeYarn ? { ropeYarn } : {}),
    expertCount,
    expertUsedCount,
    expertFeedForwardLength,
    sharedExpertFeedForwardLength: sharedCount * expertFeedForwardLength,
    parameterCount: 0,
    activeParameterCount: 0,
    routing: {
      gating: gatingValue === 2 ? 'sigmoid' : 'softmax',
      weightsNorm: normValue === true,
      weightsScale,
      groupCount,
      groupUsedCount,
      leadingDenseBlockCount,
      sharedCount,
    },
    mla: {
      qLoraRank,
      kvLoraRank,
      ropeDim,
      keyNopeLength: keyLength - ropeDim,
      valueLength,
      kvB: split ? 'split' : 'joined',
      attentionScale,
    },
  };
}

/** The tensors `config` needs, with their GGUF dims (ne0 first). */
function wanted(c: ModelConfig, hasOutput: boolean): Want[] {
  if (c.architecture === 'deepseek2') return wantedDeepseek2(c, hasOutput);
  const d = c.embeddingLength, qd = c.headCount * c.headDim, kvd = c.headCountKv * c.headDim;
  const out: Want[] = [
    { name: 'token_embd.weight', dims: [d, c.vocabSize], kind: 'matrix' },
    { name: 'output_norm.weight', dims: [d], kind: 'f32' },
  ];
  if (hasOutput) out.push({ name: 'output.weight', dims: [d, c.vocabSize], kind: 'matrix' });
  const biasOptional = c.architecture === 'llama';
  for (let l = 0; l < c.blockCount; l++) {
    const b = `blk.${l}.`;
    out.push(
      { name: `${b}attn_norm.weight`, dims: [d], kind: 'f32' },
      { name: `${b}attn_q.weight`, dims: [d, qd], kind: 'matrix' },
      { name: `${b}attn_k.weight`, dims: [d, kvd], kind: 'matrix' },
      { name: `${b}attn_v.weight`, dims: [d, kvd], kind: 'matrix' },
      { name: `${b}attn_q.bias`, dims: [qd], kind: 'f32', optional: biasOptional },
      { name: `${b}attn_k.bias`, dims: [kvd], kind: 'f32', optional: biasOptional },
      { name: `${b}attn_v.bias`, dims: [kvd], kind: 'f32', optional: biasOptional },
      { name: `${b}attn_output.weight`, dims: [qd, d], kind: 'matrix' },
      { name: `${b}ffn_norm.weight`, dims: [d], kind: 'f32' },
    );
    if (c.expertCount === 0) {
      out.push(...denseFfn(b, d, c.feedForwardLength));
      continue;
    }
    const e = c.expertCount, eff = c.expertFeedForwardLength;
    out.push(
      { name: `${b}ffn_gate_inp.weight`, dims: [d, e], kind: 'matrix' },
      { name: `${b}ffn_gate_exps.weight`, dims: [d, eff, e], kind: 'matrix' },
      { name: `${b}ffn_up_exps.weight`, dims: [d, eff, e], kind: 'matrix' },
      { name: `${b}ffn_down_exps.weight`, dims: [eff, d, e], kind: 'matrix' },
    );
    if (c.sharedExpertFeedForwardLength > 0) {
      const sff = c.sharedExpertFeedForwardLength;
      out.push(
        { name: `${b}ffn_gate_inp_shexp.weight`, dims: [d], kind: 'f32' },
        { name: `${b}ffn_gate_shexp.weight`, dims: [d, sff], kind: 'matrix' },
        { name: `${b}ffn_up_shexp.weight`, dims: [d, sff], kind: 'matrix' },
        { name: `${b}ffn_down_shexp.weight`, dims: [sff, d], kind: 'matrix' },
      );
    }
  }
  return out;
}

function checkTensor(t: GgufTensor, w: Want): void {
  const same = t.dims.length === w.dims.length && t.dims.every((v, i) => v === w.dims[i]);
  if (!same) {
    throw new ModelFormatError(`tensor '${w.name}' has shape [${t.dims.join(', ')}], the model's configuration needs [${w.dims.join(', ')}]`);
  }
  if (w.kind === 'f32' && t.type !== 'f32') {
    throw new ModelFormatError(`tensor '${w.name}' is of type ${t.type}; norm weights, biases and gate vectors must be f32`);
  }
  if (w.kind === 'matrix' && !MATRIX_TYPES.includes(t.type)) {
    throw new ModelFormatError(`tensor '${w.name}' is of type ${t.type}; sonde reads ${MATRIX_TYPES.join(', ')}`);
  }
}

/**
 * Reads and validates the hyperparameters and tensors of a llama / qwen2 / qwen2moe GGUF.
 * Throws ModelFormatError naming the metadata key or tensor that is missing or wrong, or, for
 * another architecture, which architectures are supported.
 */
export function configFromGguf(file: GgufFile): ModelConfig {
  const archValue = meta(file, 'general.architecture');
  if (typeof archValue !== 'string') throw new ModelFormatError(`GGUF metadata key 'general.architecture' is missing`);
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(archValue)) {
    throw new ModelFormatError(`architecture '${archValue}' is not supported (supported: ${SUPPORTED_ARCHITECTURES.join(', ')})`);
  }
  const arch = archValue as LlmArchitecture;
  const k = (key: string) => `${arch}.${key}`;
  const embd = file.tensor('token_embd.weight');
  if (!embd) throw new ModelFormatError(`tensor 'token_embd.weight' is missing`);
  if (embd.dims.length !== 2) throw new ModelFormatError(`tensor 'token_embd.weight' must be 2-D, has shape [${embd.dims.join(', ')}]`);
  if (arch === 'deepseek2') return finish(file, configDeepseek2(file));
  const embeddingLength = uint(file, k('embedding_length'));
  const headCount = uint(file, k('attention.head_count'));
  const headCountKv = uint(file, k('attention.head_count_kv'), headCount);
  if (headCount === 0 || headCountKv === 0 || headCount % headCountKv !== 0) {
    throw new ModelFormatError(`'${k('attention.head_count')}' (${headCount}) must be a positive multiple of '${k('attention.head_count_kv')}' (${headCountKv})`);
  }
  if (embeddingLength === 0 || embeddingLength % headCount !== 0) {
    throw new ModelFormatError(`'${k('embedding_length')}' (${embeddingLength}) must be a positive multiple of the head count ${headCount}`);
  }
  const headDim = uint(file, k('attention.key_length'), embeddingLength / headCount);
  const valueDim = uint(file, k('attention.value_length'), headDim);
  if (valueDim !== headDim || headDim % 2 !== 0) {
    throw new ModelFormatError(`key/value head sizes ${headDim}/${valueDim} must be equal and even`);
  }
  const ropeDims = uint(file, k('rope.dimension_count'), headDim);
  if (ropeDims !== headDim) {
    throw new ModelFormatError(`'${k('rope.dimension_count')}' = ${ropeDims}: partial RoPE (fewer dimensions than the head size ${headDim}) is not supported`);
  }
  let ropeScale = 1;
  const scalingType = meta(file, k('rope.scaling.type'));
  if (scalingType !== undefined && scalingType !== 'none') {
    if (scalingType !== 'linear') {
      throw new ModelFormatError(`'${k('rope.scaling.type')}' = '${String(scalingType)}' is not supported (supported: none, linear)`);
    }
    ropeScale = positive(file, k('rope.scaling.factor'), 1);
  } else if (meta(file, k('rope.scale_linear')) !== undefined) {
    ropeScale = positive(file, k('rope.scale_linear'));
  }
  const expertCount = uint(file, k('expert_count'), 0);
  const expertUsedCount = uint(file, k('expert_used_count'), 0);
  if (arch === 'qwen2moe' && expertCount === 0) throw new ModelFormatError(`'${k('expert_count')}' is missing or 0 for a qwen2moe model`);
  if (expertCount > 0 && (expertUsedCount === 0 || expertUsedCount > expertCount)) {
    throw new ModelFormatError(`'${k('expert_used_count')}' (${expertUsedCount}) must be in [1, ${expertCount}]`);
  }
  const feedForwardLength = uint(file, k('feed_forward_length'));
  const expertFeedForwardLength = expertCount === 0 ? 0
    : arch === 'qwen2moe' ? uint(file, k('expert_feed_forward_length')) : uint(file, k('expert_feed_forward_length'), feedForwardLength);
  const sharedExpertFeedForwardLength = arch === 'qwen2moe' ? uint(file, k('expert_shared_feed_forward_length'), 0) : 0;

  return finish(file, {
    architecture: arch,
    vocabSize: embd.dims[1]!,
    contextLength: uint(file, k('context_length')),
    embeddingLength,
    blockCount: uint(file, k('block_count')),
    headCount,
    headCountKv,
    headDim,
    feedForwardLength,
    rmsEpsilon: positive(file, k('attention.layer_norm_rms_epsilon')),
    ropeFreqBase: positive(file, k('rope.freq_base'), 10000),
    ropeScale,
    ropeNeox: arch !== 'llama',
    expertCount,
    expertUsedCount,
    expertFeedForwardLength,
    sharedExpertFeedForwardLength,
    parameterCount: 0,
    activeParameterCount: 0,
  });
}

/** Checks common to every architecture, then every tensor `config` needs; counts the parameters. */
function finish(file: GgufFile, config: ModelConfig): ModelConfig {
  const arch = config.architecture;
  const k = (key: string) => `${arch}.${key}`;
  const { expertCount, expertUsedCount, feedForwardLength } = config;
  if (config.blockCount === 0) throw new ModelFormatError(`'${k('block_count')}' must be positive`);
  // Every layer has tensors of its own: a count beyond the file's tensors is corrupt, and listing
  // that many layers' tensors (below) would exhaust the heap before any of them was found missing.
  if (config.blockCount > file.tensors.length) {
    throw new ModelFormatError(`'${k('block_count')}' is ${config.blockCount}, but the file holds only ${file.tensors.length} tensors`);
  }
  if (config.contextLength === 0) throw new ModelFormatError(`'${k('context_length')}' must be positive`);
  if (feedForwardLength === 0 && expertCount === 0) throw new ModelFormatError(`'${k('feed_forward_length')}' must be positive`);
  const vocabKey = meta(file, k('vocab_size'));
  if (vocabKey !== undefined && uint(file, k('vocab_size')) !== config.vocabSize) {
    throw new ModelFormatError(`'${k('vocab_size')}' (${String(vocabKey)}) differs from token_embd.weight's ${config.vocabSize} rows`);
  }
  const tokens = meta(file, 'tokenizer.ggml.tokens');
  if (Array.isArray(tokens) && tokens.length > config.vocabSize) {
    throw new ModelFormatError(`the tokenizer has ${tokens.length} tokens but token_embd.weight only ${config.vocabSize} rows`);
  }

  const hasOutput = file.tensor('output.weight') !== undefined;
  let parameters = 0;
  let inactive = 0;
  for (const w of wanted(config, hasOutput)) {
    const t = file.tensor(w.name);
    if (!t) {
      if (w.optional) continue;
      throw new ModelFormatError(`tensor '${w.name}' is missing (needed by the ${arch} architecture)`);
    }
    checkTensor(t, w);
    parameters += t.elements;
    // A token runs k of the E stacked experts.
    if (w.name.endsWith('_exps.weight')) inactive += (t.elements / expertCount) * (expertCount - expertUsedCount);
  }
  config.parameterCount = Math.max(parameters, file.info.parameterCount);
  config.activeParameterCount = config.parameterCount - inactive;
  return config;
}

/** Tensor indices in the native slot order (native/ops/llm.h), -1 for absent ones. */
export function tensorIndexTable(file: GgufFile, config: ModelConfig): Int32Array {
  const index = new Map<string, number>();
  file.tensors.forEach((t, i) => index.set(t.name, i));
  const table = new Int32Array(GLOBAL_SLOTS.length + config.blockCount * LAYER_SLOTS.length).fill(-1);
  GLOBAL_SLOTS.forEach((name, s) => { table[s] = index.get(name) ?? -1; });
  for (let l = 0; l < config.blockCount; l++) {
    LAYER_SLOTS.forEach((name, s) => {
      table[GLOBAL_SLOTS.length + l * LAYER_SLOTS.length + s] = index.get(`blk.${l}.${name}`) ?? -1;
    });
  }
  return table;
}
