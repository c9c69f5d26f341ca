/**
 * The contract between the language-model front end (lib/llm/language-model.ts: tokenising,
 * sampling, generation loops) and the native transformer (native/ops/llm*, binding
 * native/binding/llm_binding.cc, wrapped by lib/llm/transformer.ts). One native call per eval: a
 * prefill of many tokens or one decode step.
 */
import type { GgufFile } from './gguf.js';

export type LlmArchitecture = 'llama' | 'qwen2' | 'qwen2moe';

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
  /** Linear RoPE scaling factor (1 = none). */
  ropeScale: number;
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
  /** A fresh sequence whose cache holds up to contextSize tokens. */
  createSequence(contextSize: number): LlmSequence;
  dispose(): void;
}
