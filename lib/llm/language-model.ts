/**
 * LanguageModel: a GGUF language model behind an async API (load, generate, complete, logits,
 * tokenize, detokenize, info).
 *
 * Compute runs in the native transformer (one native call per prefill or decode step, off the JS
 * thread); tokenising, sampling (lib/llm/sampling.ts) and stop matching run here, between steps.
 *
 * Concurrency (issue #9): over an engine with a paged KV pool (LlmEngine.createKvPool), calls run
 * through the continuous-batching scheduler of lib/llm/kv/scheduler.ts: concurrent generations
 * share each batched step, a long prompt is prefilled in chunks beside them, and every prompt
 * starts from the longest prefix any earlier request left in the cache (so a prompt that extends
 * a finished one, as the next turn of a chat does, only computes its new tokens). A generation
 * decodes ahead of its consumer; leaving a `for await` loop early (or aborting) ends it at the
 * next step. Sampling and stop matching run here, in the scheduler's per-step callback.
 *
 * An engine without a pool (a custom engine, or a transformer built before the paged pool) gets
 * the single-sequence path: calls are serialised in call order, each holding the model until its
 * iterator finishes, throws or is closed, and the one cache keeps the last call's tokens for reuse.
 */
import { freemem } from 'node:os';
import { native } from '../binding.js';
import { placeWithoutCuda, resolveDevice, type Placement } from '../device.js';
import { AbortError, DeviceUnavailableError, DisposedError, InvalidArgumentError, ModelFormatError } from '../errors.js';
import { NativeResource } from '../lifetime.js';
import { LlmMetrics, type LanguageModelMetricsSnapshot } from '../metrics/llm.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';
import type { GgufFile } from './gguf.js';
import type { KvDtype, KvPool, LlmEngine, LlmSequence, ModelConfig } from './engine.js';
import { Chat, type ChatHost, type ChatOptions, type ChatSequence } from './chat.js';
import { modelDigest, type KvStateModel } from './kv/state.js';
import { Scheduler, type RetainedSequence } from './kv/scheduler.js';
import { SAMPLING_OPTIONS, Sampler, type SamplingOptions } from './sampling.js';
import { Tokenizer, type ChatMessage } from './tokenizer.js';
import { configFromGguf } from './arch.js';
import { read } from './gguf.js';
import { loadTransformer } from './transformer.js';
import { gpuTransformerFromFile, gpuUnsupported } from './transformer-gpu.js';

export type { ChatMessage, LanguageModelMetricsSnapshot };

/** A streaming decoder: text for each token, never splitting a UTF-8 character. */
export interface TokenStreamDecoder {
  push(token: number): string;
  flush(): string;
}

/** What a LanguageModel needs of its tokenizer (lib/llm/tokenizer.ts's Tokenizer provides it). */
export interface LanguageModelTokenizer {
  readonly vocabSize: number;
  readonly bos: number | undefined;
  readonly addBos: boolean;
  encode(text: string, options?: { addSpecial?: boolean; parseSpecial?: boolean }): number[];
  decode(tokens: readonly number[] | Int32Array, options?: { special?: boolean }): string;
  /** The bytes createDecoder() decodes for `token` (empty for control tokens). */
  tokenBytes(token: number): Uint8Array;
  createDecoder(options?: { special?: boolean }): TokenStreamDecoder;
  applyChatTemplate(messages: readonly ChatMessage[], options?: { addGenerationPrompt?: boolean }): string;
  /** Tokens that end a generation (EOS, EOT, <|im_end|>...). */
  isEog(token: number): boolean;
}

export interface LanguageModelLoadOptions {
  /**
   * 'auto' (default), 'cpu', 'cuda' or 'cuda:N'. On a CUDA device the GPU transformer runs the model
   * (weights uploaded once, the KV blocks in device memory); 'auto' takes the first GPU when there
   * is one. A model the GPU path does not run (an architecture or tensor type it lacks) computes on
   * the CPU under 'auto' (LanguageModel.device says why) and is an UnsupportedOperatorError under an
   * explicit CUDA device unless fallback is 'cpu'.
   */
  device?: 'auto' | 'cpu' | 'cuda' | `cuda:${number}`;
  /** What runs work a CUDA device has no kernel for: 'none' (default: an error at load) or 'cpu'. */
  fallback?: 'none' | 'cpu';
  /** Threads of sonde's pool for this model (default: the pool's size). */
  threads?: number;
  /** Tokens one sequence holds (prompt + generated). Default: min(the model's context length, 4096). */
  contextSize?: number;
  /** The paged KV cache shared by every sequence of this model. */
  kvCache?: KvCacheOptions;
  /** Most sequences computed together (default 16); more requests wait. */
  maxConcurrency?: number;
  /** Prompt tokens per batched step, over all prompts being prefilled (default 512). */
  prefillBudget?: number;
  /** Most requests waiting (default: unbounded); one more is a QueueFullError at once. */
  maxQueue?: number;
  /** The `model` label of this model's metrics (default: the file's name and a number). */
  name?: string;
}

export interface KvCacheOptions {
  /**
   * Hard cap on the cache's native memory. Default: a quarter of the free memory (os.freemem())
   * at load. Memory is taken only as blocks are first used, and finished requests' blocks stay
   * cached for prefix reuse until the cap needs them.
   */
  maxBytes?: number;
  /** Storage of K and V (default 'f32'; 'f16' halves the memory, attention computes in fp32). */
  dtype?: KvDtype;
  /** Positions per block (default 16). */
  blockSize?: number;
  /** Reuse cached prompt prefixes across requests (default true). */
  prefixCaching?: boolean;
}

/** The serving options fromEngine() takes (the device and threads belong to the engine). */
export type LanguageModelEngineOptions = Pick<LanguageModelLoadOptions, 'contextSize' | 'kvCache' | 'maxConcurrency' | 'prefillBudget' | 'maxQueue' | 'name'>;

export interface GenerateOptions extends SamplingOptions {
  /** Most tokens to generate (default: until an end-of-generation token or the context is full). */
  maxTokens?: number;
  /**
   * Strings: generation stops when the generated text contains one, which is not emitted. Numbers:
   * token ids that stop generation (not emitted). End-of-generation tokens of the vocabulary always stop.
   */
  stop?: string | number | readonly (string | number)[];
  /** Aborting ends the iterator with AbortError; the model stays usable. */
  signal?: AbortSignal;
  /** For a string prompt: turn the text of control tokens ('<|im_start|>') into those tokens. Default false. */
  parseSpecial?: boolean;
  /**
   * Reasoning models (DeepSeek-R1 style, whose vocabulary has `<think>` and `</think>` tokens):
   * 'show' (default) emits the reasoning with `reasoning: true` on its events, 'hide' leaves it
   * out (the answer alone is emitted; maxTokens still counts every generated token).
   */
  reasoning?: 'show' | 'hide';
}

export interface GeneratedToken {
  token: number;
  /**
   * The text this token adds. Concatenated over a generation it is the generated text: a token's
   * bytes that end in the middle of a UTF-8 character come out with a later token, and an event is
   * held back while its text could be the start of a stop string (the event cut by a stop string
   * carries only the text before it).
   */
  text: string;
  /**
   * True for the tokens of a `<think>…</think>` section (the markers included) of a reasoning
   * model; absent for the answer and for models whose vocabulary has no such markers. A prompt
   * that ends inside a section (R1's template opens `<think>` for the reply) starts in it.
   */
  reasoning?: true;
}

/**
 * Which events of a generation are reasoning: the single tokens whose text is `<think>` and
 * `</think>` (absent from the vocabulary: none is) open and close a section; the state carries
 * over from the prompt.
 */
export class ReasoningSplitter {
  readonly open: number | undefined;
  readonly close: number | undefined;
  #inside: boolean;

  constructor(tokenizer: Pick<LanguageModelTokenizer, 'encode'>, prompt: readonly number[]) {
    const marker = (text: string) => {
      const ids = tokenizer.encode(text, { addSpecial: false, parseSpecial: true });
      return ids.length === 1 ? ids[0] : undefined;
    };
    this.open = marker('<think>');
    this.close = marker('</think>');
    if (this.open === undefined || this.close === undefined) {
      this.open = this.close = undefined;
    }
    this.#inside = this.open !== undefined && prompt.lastIndexOf(this.open) > prompt.lastIndexOf(this.close!);
  }

  /** Marks `e` (events in generation order) and says whether it is reasoning. */
  mark(e: GeneratedToken): boolean {
    if (this.open === undefined) return false;
    if (e.token === this.open) this.#inside = true;
    const reasoning = this.#inside;
    if (e.token === this.close) this.#inside = false;
    if (reasoning) e.reasoning = true;
    return reasoning;
  }
}

export interface LanguageModelInfo {
  architecture: string;
  name?: string;
  parameterCount: number;
  /** Parameters one token runs through (attention, k of E experts, shared expert, embeddings). */
  activeParameterCount: number;
  /** The context length the model was trained with (GGUF metadata). */
  contextLength: number;
  /** Tokens this model's cache holds (LanguageModelLoadOptions.contextSize). */
  contextSize: number;
  vocabSize: number;
  embeddingLength: number;
  blockCount: number;
  headCount: number;
  headCountKv: number;
  /** 0 for dense models. */
  expertCount: number;
  expertUsedCount: number;
  /** ggml types of the weights, by tensor count (e.g. { q8_0: 169, f32: 65 }). */
  tensorTypes: Record<string, number>;
  /** The weight types in use, most bytes first. */
  quantizationTypes: string[];
}

/** LanguageModel.memory(). */
export interface LanguageModelMemory {
  device: Placement['id'];
  weightBytes: number;
  kvCacheBytes: number;
  kvCacheHighWaterBytes: number;
}

const ENGINE_OPTIONS = ['contextSize', 'kvCache', 'maxConcurrency', 'prefillBudget', 'maxQueue', 'name'] as const;
const LOAD_OPTIONS = ['device', 'fallback', 'threads', ...ENGINE_OPTIONS] as const;
const KV_OPTIONS = ['maxBytes', 'dtype', 'blockSize', 'prefixCaching'] as const;
/** Share of os.freemem() the KV cache may take by default. */
const DEFAULT_KV_FRACTION = 0.25;
/** Share of a GPU's free memory (after the weights) the KV cache may take by default. */
const DEFAULT_DEVICE_KV_FRACTION = 0.5;
let modelCount = 0;

/** A generation that continues a chat's retained sequence and hands back the one it leaves. */
interface RetainChain {
  from: RetainedSequence | undefined;
  retained(r: RetainedSequence): void;
}

interface Serving {
  contextSize: number;
  kv: { maxBytes: number; dtype: KvDtype; blockSize: number; prefixCaching: boolean };
  maxConcurrency: number | undefined;
  prefillBudget: number | undefined;
  maxQueue: number | undefined;
  name: string | undefined;
}
const GENERATE_OPTIONS = [...SAMPLING_OPTIONS, 'maxTokens', 'stop', 'signal', 'parseSpecial', 'reasoning'] as const;
const TOKENIZE_OPTIONS = ['addSpecial', 'parseSpecial'] as const;
const DETOKENIZE_OPTIONS = ['special'] as const;
const LOGITS_OPTIONS = ['signal'] as const;
const DEFAULT_CONTEXT = 4096;
const MAX_CONTEXT = 1 << 24;

type Prompt = string | readonly number[] | Int32Array | readonly ChatMessage[];

function checkBool(where: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') throw new InvalidArgumentError(`${where} must be a boolean, got ${describe(value)}`);
  return value;
}

function abortError(signal: AbortSignal): AbortError {
  return new AbortError(undefined, { cause: signal.reason });
}

/**
 * Whether a UTF-8 stream stops inside a character: true whenever a streaming TextDecoder holds
 * bytes back (it holds only valid prefixes, which this counts the same way; for some invalid ones
 * it says true where the decoder has already given U+FFFD, which only delays an event).
 */
class Utf8Tracker {
  #need = 0;

  get open(): boolean {
    return this.#need > 0;
  }

  push(bytes: Uint8Array): void {
    for (const b of bytes) {
      if (this.#need > 0 && (b & 0xc0) === 0x80) this.#need--;
      else if (b >= 0xc2 && b <= 0xdf) this.#need = 1;
      else if (b >= 0xe0 && b <= 0xef) this.#need = 2;
      else if (b >= 0xf0 && b <= 0xf4) this.#need = 3;
      else this.#need = 0;
    }
  }
}

/** The longest suffix of `text` that is a proper prefix of one of `stops` (text that must wait). */
function heldSuffix(text: string, stops: readonly string[]): number {
  let best = 0;
  for (const s of stops) {
    for (let n = Math.min(s.length - 1, text.length); n > best; n--) {
      if (text.endsWith(s.slice(0, n))) { best = n; break; }
    }
  }
  return best;
}

/**
 * The text side of a generation: stop tokens and strings, UTF-8 characters kept whole, and the
 * events ready to emit. accept() takes each sampled token and says whether generation goes on.
 */
class Emitter {
  /** Events ready for the consumer, in order. */
  readonly ready: GeneratedToken[] = [];
  #tokenizer: LanguageModelTokenizer;
  #stopStrings: readonly string[];
  #stopTokens: ReadonlySet<number>;
  #maxTokens: number;
  #decoder: TokenStreamDecoder;
  #utf8 = new Utf8Tracker();
  #pending: GeneratedToken[] = [];
  #pendingText = '';
  #generated = 0;
  #reasoning: ReasoningSplitter;
  #hideReasoning: boolean;

  constructor(tokenizer: LanguageModelTokenizer, stopStrings: readonly string[], stopTokens: ReadonlySet<number>, maxTokens: number,
    reasoning: ReasoningSplitter, hideReasoning: boolean) {
    this.#reasoning = reasoning;
    this.#hideReasoning = hideReasoning;
    this.#tokenizer = tokenizer;
    this.#stopStrings = stopStrings;
    this.#stopTokens = stopTokens;
    this.#maxTokens = maxTokens;
    this.#decoder = tokenizer.createDecoder();
  }

  /** Tokens it may still take (maxTokens less those accepted; Infinity without maxTokens). */
  get remaining(): number {
    return this.#maxTokens - this.#generated;
  }

  /** Takes a sampled token; false when the generation ends here (`full`: the cache has no room for it). */
  accept(token: number, full: boolean): boolean {
    if (this.#stopTokens.has(token) || this.#tokenizer.isEog(token)) return this.#end();
    const text = this.#decoder.push(token);
    this.#utf8.push(this.#tokenizer.tokenBytes(token));
    this.#generated++;
    this.#pending.push({ token, text });
    this.#pendingText += text;
    const stops = this.#stopStrings;
    if (stops.length > 0) {
      let at = -1;
      for (const s of stops) {
        const i = this.#pendingText.indexOf(s);
        if (i >= 0 && (at < 0 || i < at)) at = i;
      }
      if (at >= 0) {
        // Emit what comes before the stop string, cutting the event it starts in.
        let end = 0;
        for (const e of this.#pending) {
          if (end >= at) break;
          const take = Math.min(e.text.length, at - end);
          end += e.text.length;
          this.#release([{ token: e.token, text: e.text.slice(0, take) }]);
        }
        this.#pending = [];
        return false;
      }
    }
    // Release the events whose text cannot be part of a stop string. The newest one waits while
    // the decoder holds the start of a character, so the end-of-stream flush (U+FFFD for an
    // unfinished character) has an event to join.
    const releasable = this.#pendingText.length - (stops.length > 0 ? heldSuffix(this.#pendingText, stops) : 0);
    let end = 0;
    let n = 0;
    while (n < this.#pending.length) {
      const e = this.#pending[n]!;
      if (end + e.text.length > releasable) break;
      if (n === this.#pending.length - 1 && this.#utf8.open) break;
      end += e.text.length;
      n++;
    }
    if (n > 0) {
      this.#release(this.#pending.splice(0, n));
      this.#pendingText = this.#pendingText.slice(end);
    }
    if (this.#generated >= this.#maxTokens || full) return this.#end();
    return true;
  }

  /** The end: held text is final now (a stop string can no longer complete). */
  #end(): false {
    const tail = this.#decoder.flush();
    if (this.#pending.length > 0) {
      this.#pending[this.#pending.length - 1]!.text += tail;
      this.#release(this.#pending);
      this.#pending = [];
    }
    return false;
  }

  #release(events: GeneratedToken[]): void {
    for (const e of events) if (!this.#reasoning.mark(e) || !this.#hideReasoning) this.ready.push(e);
  }
}

export class LanguageModel extends NativeResource {
  readonly info: Readonly<LanguageModelInfo>;
  readonly contextSize: number;
  #placement: Placement = { kind: 'cpu', id: 'cpu' };

  /** Where the model computes, with the reason when options.device did not choose it. */
  get device(): Placement {
    return { ...this.#placement };
  }

  /**
   * Memory the model holds on its device: the weights (on a GPU, uploaded once at load; 0 on the
   * CPU, which reads them from the file's mapping) and the KV cache's blocks now and at most so far.
   */
  memory(): LanguageModelMemory {
    this.checkAlive('LanguageModel.memory');
    return {
      device: this.#placement.id,
      weightBytes: this.#engine.deviceBytes ?? 0,
      kvCacheBytes: this.#pool?.bytes ?? 0,
      kvCacheHighWaterBytes: this.#pool?.highWaterBytes ?? 0,
    };
  }
  #engine: LlmEngine;
  #tokenizer: LanguageModelTokenizer;
  #metrics: LlmMetrics;
  /** The paged path (an engine with a KV pool). */
  #pool: KvPool | undefined;
  #scheduler: Scheduler | undefined;
  /** The single-sequence path (an engine without one). */
  #sequence: LlmSequence | undefined;
  /** The tokens in the sequence's cache, for prefix reuse. */
  #cached: number[] = [];
  #queue: Promise<void> = Promise.resolve();

  private constructor(engine: LlmEngine, tokenizer: LanguageModelTokenizer, serving: Serving) {
    super();
    this.#engine = engine;
    this.#tokenizer = tokenizer;
    this.contextSize = serving.contextSize;
    if (typeof engine.createKvPool === 'function') {
      const pool = LanguageModel.#createPool(engine, serving);
      this.#pool = pool;
      try {
        this.#scheduler = new Scheduler(pool, {
          contextSize: serving.contextSize, vocabSize: engine.config.vocabSize, prefixCaching: serving.kv.prefixCaching,
          ...(serving.maxConcurrency !== undefined ? { maxConcurrency: serving.maxConcurrency } : {}),
          ...(serving.prefillBudget !== undefined ? { prefillBudget: serving.prefillBudget } : {}),
          ...(serving.maxQueue !== undefined ? { maxQueue: serving.maxQueue } : {}),
        });
      } catch (err) {
        pool.dispose();
        throw err;
      }
    } else {
      this.#sequence = engine.createSequence(serving.contextSize);
    }
    this.info = Object.freeze(LanguageModel.#describe(engine.config, engine.file, serving.contextSize));
    modelCount++;
    const maxBytes = serving.kv.maxBytes;
    const scheduler = this.#scheduler;
    const pool = this.#pool;
    this.#metrics = new LlmMetrics(serving.name ?? `${engine.file.info.name ?? 'model'}-${modelCount}`, () => {
      if (!scheduler || !pool || scheduler.disposed) return undefined;
      return {
        running: scheduler.running, waiting: scheduler.waiting, blocks: scheduler.stats(), blockSize: pool.blockSize,
        bytes: pool.bytes, highWaterBytes: pool.highWaterBytes, maxBytes, expertCounts: pool.expertCounts(), experts: engine.config.expertCount,
      };
    });
    if (scheduler) {
      const m = this.#metrics;
      scheduler.observer = {
        stepped: (rows, promptRows, _sequences, seconds) => m.stepped(rows, promptRows, seconds),
        firstToken: (seconds) => m.firstToken(seconds),
        interToken: (seconds) => m.interToken(seconds),
      };
    }
  }

  /** A pool of at most kvCache.maxBytes: its block count from the pool's own block size. */
  static #createPool(engine: LlmEngine, serving: Serving): KvPool {
    const { maxBytes, dtype, blockSize } = serving.kv;
    const c = engine.config;
    // K and V of every layer and KV head for blockSize positions (KvPool.blockBytes).
    const estimate = 2 * c.blockCount * c.headCountKv * c.headDim * blockSize * (dtype === 'f16' ? 2 : 4);
    const blocksFor = (bytes: number) => Math.floor(maxBytes / bytes);
    const tooSmall = (bytes: number) => new InvalidArgumentError(`LanguageModel: kvCache.maxBytes ${maxBytes} is smaller than one KV block of ${blockSize} positions (${bytes} bytes)`);
    // Native memory is taken only as blocks are used, so a pool made only to learn its block
    // size (an engine whose layout differs from the estimate) costs nothing.
    // The pool's positions reach the serving context, past the trained one if asked (#contextSize).
    const contextSize = serving.contextSize;
    let pool = engine.createKvPool!({ maxBlocks: Math.max(1, blocksFor(estimate)), blockSize, dtype, contextSize });
    if (pool.blockBytes !== estimate || blocksFor(estimate) < 1) {
      const bytes = pool.blockBytes;
      pool.dispose();
      if (blocksFor(bytes) < 1) throw tooSmall(bytes);
      pool = engine.createKvPool!({ maxBlocks: blocksFor(bytes), blockSize, dtype, contextSize });
    }
    return pool;
  }

  /**
   * Loads a GGUF language model: maps the file, builds the native transformer (the architectures
   * of lib/llm/arch.ts; on a CUDA device the GPU transformer, see options.device) and the
   * tokenizer from its metadata.
   */
  static async load(path: string, options?: LanguageModelLoadOptions): Promise<LanguageModel> {
    const where = 'LanguageModel.load';
    if (typeof path !== 'string' || path.length === 0) {
      throw new InvalidArgumentError(`${where}: path must be a non-empty string, got ${describe(path)}`);
    }
    const o = checkOptions<LanguageModelLoadOptions>(where, options, LOAD_OPTIONS);
    const device = resolveDevice(o.device ?? 'auto', `${where}: options.device`);
    const fallback = checkOneOf(`${where}: options.fallback`, o.fallback ?? 'none', ['none', 'cpu'] as const);
    const threads = o.threads === undefined ? undefined : checkInt(`${where}: options.threads`, o.threads, 1, 1024);
    if (o.contextSize !== undefined) checkInt(`${where}: options.contextSize`, o.contextSize, 1, MAX_CONTEXT);
    LanguageModel.#serving(where, o, undefined);
    let engine: LlmEngine | undefined;
    let placement: Placement | undefined;
    let gpu: string | undefined;
    if (device.kind === 'cuda') {
      // What the GPU path runs is known from the file's metadata and tensor types: a model it does
      // not run goes through the CPU fallback rules (placeWithoutCuda names what).
      const file = await read(path);
      let unsupported: string[];
      try {
        unsupported = gpuUnsupported(file, configFromGguf(file));
      } catch (err) {
        file.dispose();
        throw err;
      }
      if (unsupported.length === 0) {
        try {
          engine = await gpuTransformerFromFile(file, { device: device.gpu }, true);
        } catch (err) {
          file.dispose();
          throw err;
        }
        placement = { kind: 'cuda', id: `cuda:${device.index}` };
        gpu = device.gpu;
      } else {
        file.dispose();
        placement = placeWithoutCuda(where, o.device, device, unsupported, fallback);
      }
    } else {
      placement = placeWithoutCuda(where, o.device, device, ['the transformer forward pass'], fallback);
    }
    engine ??= await loadTransformer(path, threads === undefined ? {} : { threads });
    try {
      const tokenizer = Tokenizer.fromGguf(engine.file.metadata);
      if (tokenizer.vocabSize !== engine.config.vocabSize) {
        throw new ModelFormatError(`${path}: the tokenizer has ${tokenizer.vocabSize} tokens but the model's embedding has ${engine.config.vocabSize} rows`);
      }
      const model = new LanguageModel(engine, tokenizer, LanguageModel.#serving(where, o, engine.config, gpu));
      model.#placement = placement;
      return model;
    } catch (err) {
      engine.dispose();
      throw err;
    }
  }

  /**
   * A model over an engine and tokenizer that are already loaded. The model owns both from here:
   * dispose() disposes the engine. `load()` is the usual way in; this is for custom engines.
   */
  static fromEngine(engine: LlmEngine, tokenizer: LanguageModelTokenizer, options?: LanguageModelEngineOptions): LanguageModel {
    const where = 'LanguageModel.fromEngine';
    const o = checkOptions<LanguageModelLoadOptions>(where, options, ENGINE_OPTIONS);
    return new LanguageModel(engine, tokenizer, LanguageModel.#serving(where, o, engine.config));
  }

  /** Validates the serving options (each error names its option); with no config, only checks. */
  static #serving(where: string, o: Partial<LanguageModelLoadOptions>, config: ModelConfig | undefined, gpu?: string): Serving {
    const kv = checkOptions<KvCacheOptions>(`${where}: options.kvCache`, o.kvCache, KV_OPTIONS);
    const maxBytes = kv.maxBytes !== undefined ? checkInt(`${where}: options.kvCache.maxBytes`, kv.maxBytes, 1)
      : gpu !== undefined ? LanguageModel.#deviceKvDefault(gpu) : Math.floor(freemem() * DEFAULT_KV_FRACTION);
    const dtype = kv.dtype === undefined ? 'f32' : checkOneOf(`${where}: options.kvCache.dtype`, kv.dtype, ['f32', 'f16'] as const);
    const blockSize = kv.blockSize === undefined ? 16 : checkInt(`${where}: options.kvCache.blockSize`, kv.blockSize, 1, 4096);
    const prefixCaching = checkBool(`${where}: options.kvCache.prefixCaching`, kv.prefixCaching, true);
    const opt = (name: 'maxConcurrency' | 'prefillBudget' | 'maxQueue', min: number) =>
      (o[name] === undefined ? undefined : checkInt(`${where}: options.${name}`, o[name], min));
    if (o.name !== undefined && (typeof o.name !== 'string' || o.name.length === 0)) {
      throw new InvalidArgumentError(`${where}: options.name must be a non-empty string, got ${describe(o.name)}`);
    }
    return {
      contextSize: config ? LanguageModel.#contextSize(where, o.contextSize, config) : 0,
      kv: { maxBytes, dtype, blockSize, prefixCaching },
      maxConcurrency: opt('maxConcurrency', 1), prefillBudget: opt('prefillBudget', 1), maxQueue: opt('maxQueue', 0),
      name: o.name,
    };
  }

  /** The KV cache's default cap on a GPU: a share of the device memory the weights left free. */
  static #deviceKvDefault(gpu: string): number {
    const d = native().gpuDevice(gpu);
    return Math.max(1, Math.floor((d.totalMemory - d.inUse) * DEFAULT_DEVICE_KV_FRACTION));
  }

  static #contextSize(where: string, value: unknown, config: ModelConfig): number {
    if (value === undefined) return Math.max(1, Math.min(config.contextLength, DEFAULT_CONTEXT));
    // Beyond the trained length RoPE positions are out of distribution; llama.cpp allows it too.
    return checkInt(`${where}: options.contextSize`, value, 1, MAX_CONTEXT);
  }

  static #describe(config: ModelConfig, file: GgufFile, contextSize: number): LanguageModelInfo {
    const bytes = file.info.tensorBytes;
    const name = file.info.name;
    return {
      architecture: config.architecture,
      ...(name !== undefined ? { name } : {}),
      parameterCount: config.parameterCount,
      activeParameterCount: config.activeParameterCount,
      contextLength: config.contextLength,
      contextSize,
      vocabSize: config.vocabSize,
      embeddingLength: config.embeddingLength,
      blockCount: config.blockCount,
      headCount: config.headCount,
      headCountKv: config.headCountKv,
      expertCount: config.expertCount,
      expertUsedCount: config.expertUsedCount,
      tensorTypes: { ...file.info.tensorTypes },
      quantizationTypes: Object.keys(bytes).sort((a, b) => bytes[b]! - bytes[a]! || (a < b ? -1 : 1)),
    };
  }

  /** Tokens of `text`; BOS is added as the vocabulary asks unless `addSpecial: false`. */
  tokenize(text: string, options?: { addSpecial?: boolean; parseSpecial?: boolean }): number[] {
    const where = 'LanguageModel.tokenize';
    this.checkAlive(where);
    if (typeof text !== 'string') throw new InvalidArgumentError(`${where}(text) must be a string, got ${describe(text)}`);
    const o = checkOptions<{ addSpecial?: boolean; parseSpecial?: boolean }>(where, options, TOKENIZE_OPTIONS);
    return this.#tokenizer.encode(text, {
      addSpecial: checkBool(`${where}: options.addSpecial`, o.addSpecial, true),
      parseSpecial: checkBool(`${where}: options.parseSpecial`, o.parseSpecial, false),
    });
  }

  /** Text of `tokens`; control tokens render as '' unless `special: true`. */
  detokenize(tokens: readonly number[] | Int32Array, options?: { special?: boolean }): string {
    const where = 'LanguageModel.detokenize';
    this.checkAlive(where);
    const o = checkOptions<{ special?: boolean }>(where, options, DETOKENIZE_OPTIONS);
    this.#checkTokens(where, 'tokens', tokens);
    return this.#tokenizer.decode(tokens, { special: checkBool(`${where}: options.special`, o.special, false) });
  }

  /**
   * Mixture-of-Experts models: how many tokens each expert has been routed, indexed
   * [layer * expertCount + expert], summed over every evaluation this model has run (expert load,
   * for metrics). Undefined for dense models.
   */
  expertCounts(): Float64Array | undefined {
    this.checkAlive('LanguageModel.expertCounts');
    return this.#pool ? this.#pool.expertCounts() : this.#sequence!.expertCounts?.();
  }

  /**
   * This model's serving metrics (latencies in seconds): time to first token, inter-token
   * latency, tokens/s, running and waiting sequences, KV blocks, prefix hits, evictions, expert
   * load. The same figures are in the process-wide registry (sonde.metrics) under the label
   * `model`. Works after dispose (the last figures).
   */
  metrics(): LanguageModelMetricsSnapshot {
    return this.#metrics.snapshot();
  }

  /**
   * Logits at every position of `tokens`, evaluated from an empty cache: a Float32Array of
   * tokens.length rows of vocabSize (row i predicts the token after tokens[i]).
   */
  async logits(tokens: readonly number[] | Int32Array, options?: { signal?: AbortSignal }): Promise<Float32Array> {
    const where = 'LanguageModel.logits';
    this.checkAlive(where);
    const o = checkOptions<{ signal?: AbortSignal }>(where, options, LOGITS_OPTIONS);
    const signal = checkSignal(`${where}: options.signal`, o.signal);
    this.#checkTokens(where, 'tokens', tokens);
    if (tokens.length === 0) throw new InvalidArgumentError(`${where}: tokens must not be empty`);
    this.#checkFits(where, tokens.length);
    if (this.#scheduler) {
      try {
        const r = await this.#scheduler.submit({ tokens: Array.from(tokens), logits: 'all', ...(signal ? { signal } : {}) });
        return r.logits!;
      } catch (err) {
        throw this.#mapError(where, err, signal);
      } finally {
        this.#metrics.requestSettled();
      }
    }
    const release = await this.#acquire(where, signal);
    try {
      this.#truncate(0);
      const out = await this.#eval(where, Array.from(tokens), signal, true);
      return out;
    } finally {
      release();
    }
  }

  /**
   * Generates tokens after a prompt: text (tokenised with BOS as the vocabulary asks), token ids
   * (used as given), or chat messages (rendered with the model's chat template). Ends at an
   * end-of-generation token, a stop string or token, maxTokens, or a full context.
   */
  generate(prompt: Prompt, options?: GenerateOptions): AsyncIterableIterator<GeneratedToken> {
    return this.#generate('LanguageModel.generate', prompt, options, undefined);
  }

  #generate(where: string, prompt: Prompt, options: GenerateOptions | undefined, chain: RetainChain | undefined): AsyncIterableIterator<GeneratedToken> {
    this.checkAlive(where);
    const o = checkOptions<GenerateOptions>(where, options, GENERATE_OPTIONS);
    // The sampler validates (and names) every sampling option; the rest is checked here, so that
    // a bad argument throws at the call rather than at the first next().
    const sampling: SamplingOptions = {};
    for (const k of SAMPLING_OPTIONS) if (o[k] !== undefined) (sampling as Record<string, unknown>)[k] = o[k];
    const sampler = new Sampler(sampling, where);
    const maxTokens = o.maxTokens === undefined ? Infinity : checkInt(`${where}: options.maxTokens`, o.maxTokens, 0);
    const signal = checkSignal(`${where}: options.signal`, o.signal);
    const parseSpecial = checkBool(`${where}: options.parseSpecial`, o.parseSpecial, false);
    const { strings: stopStrings, tokens: stopTokens } = this.#stops(where, o.stop);
    const tokens = this.#promptTokens(where, prompt, parseSpecial);
    if (tokens.length === 0) throw new InvalidArgumentError(`${where}: the prompt has no tokens (the vocabulary adds no BOS; give some text)`);
    this.#checkFits(where, tokens.length);
    const reasoning = checkOneOf(`${where}: options.reasoning`, o.reasoning ?? 'show', ['show', 'hide'] as const);
    const emitter = new Emitter(this.#tokenizer, stopStrings, stopTokens, maxTokens, new ReasoningSplitter(this.#tokenizer, tokens),
      reasoning === 'hide');
    return this.#scheduler
      ? this.#runBatched(where, tokens, sampler, maxTokens, emitter, signal, chain)
      : this.#runSerial(where, tokens, sampler, maxTokens, emitter, signal);
  }

  /** The generated text (what generate() streams, joined). */
  async complete(prompt: Prompt, options?: GenerateOptions): Promise<string> {
    let text = '';
    for await (const t of this.generate(prompt, options)) text += t.text;
    return text;
  }

  /**
   * A conversation (lib/llm/chat.ts): `send(message)` renders the whole conversation with the
   * chat template and computes only the tokens after what the chat's cache already holds; the
   * chat keeps its KV blocks between turns, and chats with the same system prompt share its
   * blocks. `contextOverflow` ('error', the default, or 'drop-oldest') says what happens when
   * the conversation and `replyReserve` outgrow the context. Sampling options, maxTokens and
   * stop given here are the defaults of every send().
   */
  chat(options?: ChatOptions): Chat {
    this.checkAlive('LanguageModel.chat');
    return Chat.create(this.#chatHost('LanguageModel.chat'), options);
  }

  /**
   * A chat saved with chat.save(path): its messages, options and KV blocks, so its next reply
   * computes only the new message. A file of another model (or another KV dtype or block size),
   * a corrupted or a truncated one is refused with a typed error that says which. `options`
   * override the saved chat options.
   */
  async restoreChat(path: string, options?: ChatOptions): Promise<Chat> {
    this.checkAlive('LanguageModel.restoreChat');
    return Chat.restore(this.#chatHost('LanguageModel.restoreChat'), path, options);
  }

  #host: ChatHost | undefined;
  #identity: Promise<KvStateModel> | undefined;

  #chatHost(where: string): ChatHost {
    if (this.#host) return this.#host;
    const scheduler = this.#scheduler;
    const pool = this.#pool;
    if (!scheduler || !pool) {
      throw new InvalidArgumentError(`${where}: chats need an engine with a paged KV pool (LlmEngine.createKvPool); this model's engine has none`);
    }
    const config = this.#engine.config;
    const file = this.#engine.file;
    const identity = () => (this.#identity ??= modelDigest(file).then((digest) => ({
      digest, architecture: config.architecture, ...(file.info.name !== undefined ? { name: file.info.name } : {}),
      layers: config.blockCount, kvHeads: config.headCountKv, headDim: config.headDim,
    }), (err: unknown) => {
      this.#identity = undefined;
      throw err;
    }));
    const sequence = (initial: RetainedSequence | undefined): ChatSequence => {
      let held = initial;
      // What the turn in progress left, adopted only when the chat keeps the turn: a failed or
      // aborted reply leaves the cache as the conversation is, as before the turn.
      let next: RetainedSequence | undefined;
      let open = false;
      let disposed = false;
      return {
        get tokens() { return held?.tokens ?? []; },
        generate: (prompt, options) => {
          open = true;
          return this.#generate('Chat.send', prompt, options, {
            from: held,
            retained: (r) => {
              if (disposed || !open) r.release();
              else next = r;
            },
          });
        },
        settle: (keep) => {
          open = false;
          if (keep && next) {
            held?.release();
            held = next;
          } else {
            next?.release();
          }
          next = undefined;
        },
        snapshot: async () => {
          const tokens = Int32Array.from(held?.tokens ?? []);
          const table = held ? held.blocks.table(tokens.length, pool.blockSize) : new Int32Array(0);
          return { tokens, blocks: table.length > 0 ? await pool.readBlocks(table) : new Uint8Array(0) };
        },
        dispose: () => {
          disposed = true;
          held?.release();
          next?.release();
          held = next = undefined;
        },
      };
    };
    this.#host = {
      contextSize: this.contextSize,
      vocabSize: this.info.vocabSize,
      tokenizer: this.#tokenizer,
      layout: { dtype: pool.dtype, blockSize: pool.blockSize, blockBytes: pool.blockBytes },
      identity,
      retain: () => sequence(undefined),
      restore: async (tokens, blocks) => sequence(await scheduler.restoreRetained(Array.from(tokens), (table) => pool.writeBlocks(table, blocks))),
    };
    return this.#host;
  }

  async *#runBatched(where: string, prompt: number[], sampler: Sampler, maxTokens: number, emitter: Emitter,
    signal: AbortSignal | undefined, chain?: RetainChain): AsyncGenerator<GeneratedToken> {
    if (this.disposed) throw new DisposedError(`${where}: LanguageModel has been disposed`);
    if (signal?.aborted) throw abortError(signal);
    if (maxTokens === 0) return;
    const history = prompt.slice();
    // Ends the request: the caller's abort, or the iterator closed early.
    const ending = new AbortController();
    let wake: (() => void) | undefined;
    let settled = false;
    let failure: unknown;
    const onAbort = () => { ending.abort(signal!.reason); wake?.(); };
    signal?.addEventListener('abort', onAbort, { once: true });
    const accept = (token: number, length: number): boolean => {
      const more = emitter.accept(token, length >= this.contextSize);
      wake?.();
      if (more) history.push(token);
      return more;
    };
    const chainSampler = sampler.chainSampler(this.info.vocabSize);
    const done = this.#scheduler!.submit({
      tokens: prompt, logits: 'last', signal: ending.signal,
      ...(chain ? { retain: true, ...(chain.from ? { continueFrom: chain.from } : {}) } : {}),
      onLogits: (logits, length) => {
        const token = sampler.sample(logits, history);
        return accept(token, length) ? token : undefined;
      },
      // A pool that chains steps on its device may choose the tokens (greedy, or top-k sampling
      // without penalties).
      ...(chainSampler ? { chain: { sampler: chainSampler, onToken: accept, remaining: () => emitter.remaining } } : {}),
    });
    done.then((r) => {
      if (r.retained) chain?.retained(r.retained);
      settled = true;
      wake?.();
    }, (err) => { settled = true; failure = err; wake?.(); });
    try {
      for (;;) {
        if (signal?.aborted) throw abortError(signal);
        if (this.disposed) throw new DisposedError(`${where}: LanguageModel has been disposed`);
        const e = emitter.ready.shift();
        if (e) {
          yield e;
          continue;
        }
        if (settled) {
          if (failure !== undefined) throw this.#mapError(where, failure, signal);
          return;
        }
        await new Promise<void>((r) => { wake = r; });
        wake = undefined;
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      if (!settled) ending.abort();
      this.#metrics.requestSettled();
    }
  }

  /** An error of the scheduler as this call reports it. */
  #mapError(where: string, err: unknown, signal: AbortSignal | undefined): unknown {
    if (signal?.aborted) return abortError(signal);
    if (err instanceof DisposedError) return new DisposedError(`${where}: LanguageModel has been disposed`, { cause: err });
    return err;
  }

  async *#runSerial(where: string, prompt: number[], sampler: Sampler, maxTokens: number, emitter: Emitter,
    signal: AbortSignal | undefined): AsyncGenerator<GeneratedToken> {
    const release = await this.#acquire(where, signal);
    try {
      if (maxTokens === 0) return;
      // Reuse the cached prefix; at least the last prompt token is evaluated, for its logits.
      let common = 0;
      const cached = this.#cached;
      while (common < cached.length && common < prompt.length - 1 && cached[common] === prompt[common]) common++;
      this.#truncate(common);
      let logits = await this.#eval(where, prompt.slice(common), signal, false);
      const history = prompt.slice();
      for (;;) {
        if (signal?.aborted) throw abortError(signal);
        const token = sampler.sample(logits, history);
        const more = emitter.accept(token, this.#cached.length >= this.contextSize);
        for (const e of emitter.ready.splice(0)) {
          // The consumer may abort while handling an event of this batch: stop at once.
          if (signal?.aborted) throw abortError(signal);
          yield e;
        }
        if (!more) return;
        history.push(token);
        logits = await this.#eval(where, [token], signal, false);
      }
    } finally {
      release();
      this.#metrics.requestSettled();
    }
  }

  /** Evaluates `tokens` after the cached ones; keeps #cached in step with the cache, also on failure. */
  async #eval(where: string, tokens: number[], signal: AbortSignal | undefined, allLogits: boolean): Promise<Float32Array> {
    if (this.disposed) throw new DisposedError(`${where}: LanguageModel has been disposed`);
    if (signal?.aborted) throw abortError(signal);
    try {
      const logits = await this.#sequence!.eval(tokens, signal ? { signal, allLogits } : { allLogits });
      this.#cached.push(...tokens);
      return logits;
    } catch (err) {
      // A failed or aborted step may have written part of its tokens to the cache; #cached does
      // not list them, and every call truncates the cache to its reused prefix of #cached first.
      if (signal?.aborted && !(err instanceof AbortError)) throw abortError(signal);
      throw err;
    }
  }

  #truncate(length: number): void {
    this.#sequence!.truncate(length);
    this.#cached.length = length;
  }

  /** Waits for the calls before this one; resolves to the function that lets the next one in. */
  async #acquire(where: string, signal: AbortSignal | undefined): Promise<() => void> {
    let release!: () => void;
    const mine = new Promise<void>((r) => { release = r; });
    const previous = this.#queue;
    this.#queue = previous.then(() => mine);
    if (signal) {
      if (signal.aborted) { previous.then(release); throw abortError(signal); }
      let onAbort!: () => void;
      const aborted = new Promise<never>((_, reject) => {
        onAbort = () => reject(abortError(signal));
        signal.addEventListener('abort', onAbort, { once: true });
      });
      try {
        await Promise.race([previous, aborted]);
      } catch (err) {
        // Our turn is given up: pass it on as soon as it would have come.
        previous.then(release);
        throw err;
      } finally {
        signal.removeEventListener('abort', onAbort);
      }
    } else {
      await previous;
    }
    if (this.disposed) {
      release();
      throw new DisposedError(`${where}: LanguageModel has been disposed`);
    }
    return release;
  }

  #promptTokens(where: string, prompt: unknown, parseSpecial: boolean): number[] {
    if (typeof prompt === 'string') return this.#tokenizer.encode(prompt, { addSpecial: true, parseSpecial });
    if (prompt instanceof Int32Array) {
      this.#checkTokens(where, 'prompt', prompt);
      return Array.from(prompt);
    }
    if (Array.isArray(prompt) && prompt.length > 0 && typeof prompt[0] === 'object' && prompt[0] !== null) {
      prompt.forEach((m, i) => {
        if (m === null || typeof m !== 'object' || typeof (m as ChatMessage).role !== 'string') {
          throw new InvalidArgumentError(`${where}: prompt[${i}] must be a chat message { role, content }, got ${describe(m)}`);
        }
      });
      const text = this.#tokenizer.applyChatTemplate(prompt as ChatMessage[], { addGenerationPrompt: true });
      // Templates usually write the BOS token's text themselves; add it only when they do not.
      const tokens = this.#tokenizer.encode(text, { addSpecial: false, parseSpecial: true });
      const bos = this.#tokenizer.bos;
      if (this.#tokenizer.addBos && bos !== undefined && tokens[0] !== bos) tokens.unshift(bos);
      return tokens;
    }
    if (Array.isArray(prompt)) {
      this.#checkTokens(where, 'prompt', prompt);
      return prompt.slice() as number[];
    }
    throw new InvalidArgumentError(`${where}: prompt must be a string, an array of token ids or an array of chat messages, got ${describe(prompt)}`);
  }

  #stops(where: string, stop: unknown): { strings: string[]; tokens: Set<number> } {
    const strings: string[] = [];
    const tokens = new Set<number>();
    if (stop === undefined) return { strings, tokens };
    const list = Array.isArray(stop) ? stop : [stop];
    list.forEach((s, i) => {
      const name = Array.isArray(stop) ? `options.stop[${i}]` : 'options.stop';
      if (typeof s === 'string') {
        if (s.length === 0) throw new InvalidArgumentError(`${where}: ${name} must not be an empty string`);
        strings.push(s);
      } else if (typeof s === 'number') {
        tokens.add(checkInt(`${where}: ${name}`, s, 0, this.info.vocabSize - 1));
      } else {
        throw new InvalidArgumentError(`${where}: ${name} must be a string or a token id, got ${describe(s)}`);
      }
    });
    return { strings, tokens };
  }

  #checkTokens(where: string, name: string, tokens: unknown): void {
    if (!Array.isArray(tokens) && !(tokens instanceof Int32Array)) {
      throw new InvalidArgumentError(`${where}: ${name} must be an array of token ids, got ${describe(tokens)}`);
    }
    const vocab = this.info.vocabSize;
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t >= vocab) {
        throw new InvalidArgumentError(`${where}: ${name}[${i}] must be a token id in [0, ${vocab - 1}], got ${describe(t)}`);
      }
    }
  }

  #checkFits(where: string, n: number): void {
    if (n > this.contextSize) {
      throw new InvalidArgumentError(`${where}: the prompt is ${n} tokens, longer than the context of ${this.contextSize} tokens (LanguageModelLoadOptions.contextSize)`);
    }
  }

  /**
   * Waiting requests reject and running ones end with DisposedError; native memory is freed once
   * the step (or call) in progress has ended; later calls throw DisposedError.
   */
  protected release(): void {
    this.#metrics.close();
    const scheduler = this.#scheduler;
    if (scheduler) {
      scheduler.dispose();
      void scheduler.whenIdle().then(() => {
        this.#pool!.dispose();
        this.#engine.dispose();
      });
      return;
    }
    const free = () => {
      this.#sequence!.dispose();
      this.#engine.dispose();
    };
    void this.#queue.then(free);
  }
}
