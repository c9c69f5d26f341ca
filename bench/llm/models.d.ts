// Types of models.js, for test/llm-fixtures.ts (the generators themselves are plain JS).
import type { GgufTensorType, GgufWriteSpec, GgufWriteTensor, typed } from '../../lib/llm/gguf.js';

export type LlmModelKind = 'llama' | 'qwen2' | 'mixtral' | 'qwen2moe' | 'deepseek2';

export interface LlmModelOptions {
  kind: LlmModelKind;
  type?: GgufTensorType;
  /** A type per matrix name where it differs from `type` (a mixed file). */
  tensorTypes?: Record<string, GgufTensorType>;
  /** general.name (default sonde-fixture-<kind>-<type>). */
  name?: string;
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
  /** Zero output rows for all but normal tokens, so greedy decoding emits word pieces only (benchmarks). */
  wordsOnly?: boolean;
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

export interface LlmModelInfo {
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

export function spmVocab(): { tokens: string[]; scores: number[]; types: number[] };
export function gpt2ByteSymbols(): string[];
export function bpeVocab(): { tokens: string[]; types: number[]; merges: string[] };
export function llmModelSpec(o: LlmModelOptions, typedValue: typeof typed): { spec: GgufWriteSpec & { tensors: GgufWriteTensor[] }; info: LlmModelInfo };

export type LlmBenchModel = 'moe' | 'dense' | 'deepseek';
export const LLM_MODELS: Record<LlmBenchModel, LlmModelOptions>;
export function llmModelPath(gguf: { write: (path: string, spec: GgufWriteSpec) => Promise<void>; typed: typeof typed }, name: LlmBenchModel, type: GgufTensorType): Promise<string>;
