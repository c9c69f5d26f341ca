/**
 * The contract between the language-model front end (lib/llm/language-model.ts: tokenising,
 * sampling, generation loops) and the native transformer (native/ops/llm*, binding
 * native/binding/llm_binding.cc, wrapped by lib/llm/transformer.ts). One native call per eval: a
 * prefill of many tokens or one decode step.
 */
import type { GgufFile } from './gguf.js';

export type LlmArchitecture = 'llama' | 'qwen2' | 'qwen2moe' | 'deepseek2';

/** Hyperparameters read from GGUF metadata (lib/llm/arch.ts), validated against the tensors. */
export interface ModelConfig {
  architecture: LlmArchitecture;
  vocabSize: number;
  contextLength: number;
  embeddingLength: number;
  blockCount: number;
  headCount: number;
  headCountKv: number;
  headDim: number;
  feedForwardLength: number;
  rmsEpsilon: number;
  ropeFreqBase: number;
  /** RoPE scaling factor (1 = none): linear, or YaRN's when ropeYarn is set. */
  ropeScale: number;
  /**
   * YaRN RoPE (deepseek2's rope.scaling.type = yarn): frequencies blended between interpolation
   * and extrapolation over the correction range from the original context length and the beta
   * bounds; the rotation is scaled by `magnitude` (times 1 + 0.1 ln ropeScale, as ggml does).
   */
  ropeYarn?: { originalContextLength: number; betaFast: number; betaSlow: number; magnitude: number };
  /** NeoX ordering (rotate halves) vs normal (rotate adjacent pairs). */
  ropeNeox: boolean;
  /** 0 for dense models. */
  expertCount: number;
  expertUsedCount: number;
  expertFeedForwardLength: number;
  /** qwen2moe's shared expert (0 if none). */
  sharedExpertFeedForwardLength: number;
  /** Parameters in the file, and those one token touches (attention + k of E experts + shared). */
  parameterCount: number;
  activeParameterCount: number;
  /** DeepSeekMoE routing (deepseek2); absent: the architecture's fixed rule. */
  routing?: MoeRoutingConfig;
  /**
   * Multi-head latent attention (deepseek2). headCountKv is then 1 and headDim the cached row per
   * position and layer: kvLoraRank + ropeDim (the latent and the shared rope key part).
   */
  mla?: MlaConfig;
}

export interface MoeRoutingConfig {
  /** expert_gating_func: softmax over all experts (V2) or element-wise sigmoid (V3/R1). */
  gating: 'softmax' | 'sigmoid';
  /** Renormalise the k chosen weights to sum 1 (expert_weights_norm). */
  weightsNorm: boolean;
  /** Multiplies the final weights (expert_weights_scale; 1 = none). */
  weightsScale: number;
  /** Group-limited choice: groupCount groups, the best groupUsedCount kept (groupCount <= 1: none). */
  groupCount: number;
  groupUsedCount: number;
  /** Layers [0, leadingDenseBlockCount) have a dense FFN of feedForwardLength. */
  leadingDenseBlockCount: number;
  /** Shared experts (always run, ungated) of expertFeedForwardLength each. */
  sharedCount: number;
}

export interface MlaConfig {
  /** 0: q projected directly (attn_q, V2-Lite); else attn_q_a -> norm -> attn_q_b. */
  qLoraRank: number;
  kvLoraRank: number;
  /** The rotated part of each query/key head (rope.dimension_count). */
  ropeDim: number;
  /** The unrotated part of each query/key head (key length - ropeDim). */
  keyNopeLength: number;
  /** Each head's value size. */
  valueLength: number;
  /** The key/value up-projection as one attn_kv_b tensor (older GGUFs) or attn_k_b + attn_v_b. */
  kvB: 'joined' | 'split';
  /** Softmax scale of the scores: mscale^2 / sqrt(keyNopeLength + ropeDim) (mscale 1 without YaRN). */
  attentionScale: number;
}

export interface EvalOptions {
  /** Logits for every evaluated position ([n, vocab]) instead of only the last ([vocab]). */
  allLogits?: boolean;
  signal?: AbortSignal;
}

/** One sequence's KV cache and position. Not safe for concurrent evals (they are serialised). */
export interface LlmSequence {
  /** Tokens held in the cache (the next token's position). */
  readonly length: number;
  readonly contextSize: number;
  /** Appends `tokens` at position `length`, runs the model and resolves to their logits. */
  eval(tokens: readonly number[] | Int32Array, options?: EvalOptions): Promise<Float32Array>;
  /**
   * MoE models: tokens routed to each expert, [layer * expertCount + expert], summed over every
   * eval of this sequence (expert load, for metrics). Undefined for dense models.
   */
  expertCounts?(): Float64Array | undefined;
  /** Forgets every cached position >= length (to reuse a common prefix). */
  truncate(length: number): void;
  dispose(): void;
}

export interface LlmEngine {
  readonly config: ModelConfig;
  readonly file: GgufFile;
  /** A fresh sequence whose cache holds up to contextSize tokens (a private pool, one block table). */
  createSequence(contextSize: number): LlmSequence;
  /** A paged KV pool (issue #9) that many sequences share; see KvPool. Disposed with the engine. */
  createKvPool(options: KvPoolOptions): KvPool;
  /**
   * The GPU runtime's device id ('cuda:N' or 'emulated') when the weights and KV pools are in
   * device memory (lib/llm/transformer-gpu.ts); absent or undefined on the CPU.
   */
  readonly gpu?: string | undefined;
  /** Device bytes of the weights (0 or absent on the CPU, which reads them from the file's mapping). */
  readonly deviceBytes?: number;
  dispose(): void;
}

// ---------------------------------------------------------------------------------------------
// Paged KV cache (issue #9). One pool per model holds every sequence's keys and values in blocks
// of `blockSize` positions; a sequence is a block table (block ids in position order). Which
// block belongs to whom, sharing, hashing and eviction are TS decisions (lib/llm/kv/blocks.ts);
// the pool is storage plus the batched forward step that reads and writes it.
// ---------------------------------------------------------------------------------------------

export type KvDtype = 'f32' | 'f16';

export interface KvPoolOptions {
  /** Positions per block (default 16). */
  blockSize?: number;
  /** Hard cap on blocks; native memory grows in chunks as block ids are first used, never beyond. */
  maxBlocks: number;
  /** Storage of K and V (default 'f32'); attention always computes in fp32. */
  dtype?: KvDtype;
  /**
   * Positions a sequence of this pool may reach (default: the model's trained context length).
   * More is allowed, as llama.cpp allows it: RoPE positions past the trained range are out of
   * the model's distribution. At most 2^24.
   */
  contextSize?: number;
}

/** What a step does for one sequence: append `tokens` at positions [start, start + tokens.length). */
export interface StepSequence {
  /** Block ids covering positions [0, start + tokens.length), in position order. */
  blockTable: Int32Array;
  /** Positions already in the cache (the position of tokens[0]). */
  start: number;
  tokens: Int32Array;
  /** Logits rows returned for this sequence: none, the last new token's, or every new token's. */
  logits: 'none' | 'last' | 'all';
}

export interface StepBatch {
  sequences: readonly StepSequence[];
  /**
   * Block copies done before anything else in the step, as [src0, dst0, src1, dst1, ...]
   * (copy-on-write of a shared block that a sequence is about to write into).
   */
  copies?: Int32Array;
}

/** How KvPool.stepChain draws each sequence's tokens (sampling.ts's ChainSampler, per sequence). */
export interface ChainSampling {
  /** [sequence][4]: temperature (<= 0: argmax), topK (1-64, below the vocabulary), topP, log(minP) or -Infinity. */
  params: Float64Array;
  /** [sequence][4]: each sequence's xoshiro128** state, where its draws start (not modified). */
  rng: Uint32Array;
}

export interface ChainResult {
  /** The chosen ids, [step][sequence] (step j's follow position start + j). */
  tokens: Int32Array;
  /** With sampling: [step][sequence][4], each generator's state after that step's draw. */
  rng?: Uint32Array;
}

export interface KvPool {
  readonly blockSize: number;
  readonly maxBlocks: number;
  readonly dtype: KvDtype;
  /** Bytes of one block (K and V of every layer and KV head, blockSize positions). */
  readonly blockBytes: number;
  /** Native bytes held now, and the most ever held (both <= maxBlocks * blockBytes + a chunk's rounding). */
  readonly bytes: number;
  readonly highWaterBytes: number;
  /**
   * One native call: the copies, then every sequence's tokens through the model as one batch of
   * rows (matrix products over all rows; attention per sequence through its block table, causal).
   * Resolves to the requested logits rows, concatenated in sequence order ([rows x vocab]).
   * Steps on one pool run one after another. On abort or error no logits are returned and the
   * positions the step was writing hold unspecified values (the caller treats them as unwritten).
   */
  step(batch: StepBatch, options?: { signal?: AbortSignal }): Promise<Float32Array>;
  /**
   * @internal step() writing the logits into `into` (a view of its first rows x vocab values, which
   * is what resolves) when it holds that many, instead of a new array per step: a step's logits
   * row is vocab floats (0.5 MB at 128k), and a fresh one per decoded token cost 20-60 us of
   * allocation, zeroing and page faults on the development VM. For a caller that owns `into`, never
   * hands it out, and has read the previous step's logits before the next (the scheduler).
   */
  stepInto?(batch: StepBatch, into: Float32Array, options?: { signal?: AbortSignal }): Promise<Float32Array>;
  /**
   * `steps` decode steps of every sequence of `batch` in one native call: each sequence brings one
   * token (logits 'last') and a block table covering start + steps positions; step j feeds it at
   * position start + j, and the token of step j + 1 is chosen from that step's logits and fed back
   * on the device, so the host waits once for the whole chain instead of once per token: the argmax
   * (sampling.ts's: the first maximum), or with `sampling`, the draw of sampling.ts's Sampler.
   * Positions [start, start + steps) are written. Both transformer engines have it (the CPU's
   * chooses on its pool thread: a small model's step costs about what a round trip through the
   * event loop does); an engine without it decodes step by step.
   */
  stepChain?(batch: StepBatch, steps: number, options?: { signal?: AbortSignal; sampling?: ChainSampling }): Promise<ChainResult>;
  /** The raw bytes of blocks (for saving a sequence's state), in the order given. */
  readBlocks(ids: Int32Array): Promise<Uint8Array>;
  /** Writes blocks from bytes that readBlocks gave (same dtype and model shape), in the order given. */
  writeBlocks(ids: Int32Array, bytes: Uint8Array): Promise<void>;
  /**
   * MoE models: tokens routed to each expert by this pool's steps, [layer * expertCount + expert]
   * (expert load, for metrics). Undefined for dense models.
   */
  expertCounts(): Float64Array | undefined;
  dispose(): void;
}

