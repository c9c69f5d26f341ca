/**
 * The native transformer behind LlmEngine (lib/llm/engine.ts): loadTransformer(path) maps the GGUF,
 * reads and checks its configuration (lib/llm/arch.ts) and builds the native model; sequences own
 * their KV caches. One native call per eval; evals on one sequence run one after another (a
 * promise chain), so a caller may issue the next eval without awaiting the previous one.
 */
import { native, type NativeLlmModel, type NativeLlmSequence } from '../binding.js';
import { InvalidArgumentError, callNative, fromNative } from '../errors.js';
import { NativeResource, withSignal } from '../lifetime.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';
import { configFromGguf, tensorIndexTable } from './arch.js';
import type { EvalOptions, LlmEngine, LlmSequence, ModelConfig } from './engine.js';
import { read, type GgufFile } from './gguf.js';

export type TransformerVariant = 'auto' | 'scalar' | 'avx2' | 'avx512';

export interface TransformerOptions {
  /** Threads of sonde's pool an eval may use (default: all of them). */
  threads?: number;
  /**
   * Kernel level of every product and of attention (default 'auto', the fastest this CPU runs).
   * For tests and benchmarks; a level this CPU lacks is a DeviceUnavailableError.
   */
  variant?: TransformerVariant;
}

const OPTION_KEYS = ['threads', 'variant'] as const;
const VARIANTS: readonly TransformerVariant[] = ['auto', 'scalar', 'avx2', 'avx512'];
interface Parsed { threads: number; variant: TransformerVariant }
const EVAL_KEYS = ['allLogits', 'signal'] as const;

class TransformerSequence extends NativeResource implements LlmSequence {
  readonly contextSize: number;
  #engine: Transformer;
  #seq: NativeLlmSequence;
  #chain: Promise<unknown> = Promise.resolve();
  #pending = 0;

  constructor(engine: Transformer, seq: NativeLlmSequence, contextSize: number) {
    super();
    this.#engine = engine;
    this.#seq = seq;
    this.contextSize = contextSize;
  }

  get length(): number {
    this.checkAlive('LlmSequence.length');
    return this.#seq.length();
  }

  eval(tokens: readonly number[] | Int32Array, options: EvalOptions = {}): Promise<Float32Array> {
    const site = new Error();
    const where = 'LlmSequence.eval';
    try {
      this.checkAlive(where);
      const o = checkOptions<EvalOptions>(`${where}(tokens, options)`, options, EVAL_KEYS);
      const signal = checkSignal(`${where}: options.signal`, o.signal);
      const allLogits = o.allLogits ?? false;
      if (typeof allLogits !== 'boolean') throw new InvalidArgumentError(`${where}: options.allLogits must be a boolean, got ${describe(allLogits)}`);
      const ids = this.#tokens(where, tokens);
      this.#pending++;
      const run = async () => {
        this.checkAlive(where);
        const length = this.#seq.length();
        if (length + ids.length > this.contextSize) {
          throw new InvalidArgumentError(`${where}: ${ids.length} tokens after the ${length} already in the sequence exceed its context size ${this.contextSize}`);
        }
        const vocab = this.#engine.config.vocabSize;
        const logits = new Float32Array((allLogits ? ids.length : 1) * vocab);
        const model = this.#engine.nativeModel(where);
        await callNative(() => withSignal(signal, (token) =>
          native().llmEval(model, this.#seq, ids, logits, allLogits, this.#engine.threads, token)), site);
        return logits;
      };
      const result = this.#chain.then(run, run).finally(() => { this.#pending--; });
      this.#chain = result.catch(() => undefined);
      return result;
    } catch (err) {
      return Promise.reject(err);
    }
  }

  expertCounts(): Float64Array | undefined {
    this.checkAlive('LlmSequence.expertCounts');
    return this.#seq.info().expertCounts;
  }

  truncate(length: number): void {
    const where = 'LlmSequence.truncate(length)';
    this.checkAlive(where);
    checkInt(where, length, 0);
    if (this.#pending > 0) throw new InvalidArgumentError(`${where}: ${this.#pending} eval(s) on this sequence are still running; await them first`);
    this.#seq.truncate(length);
  }

  #tokens(where: string, tokens: readonly number[] | Int32Array): Int32Array {
    if (!(tokens instanceof Int32Array) && !Array.isArray(tokens)) {
      throw new InvalidArgumentError(`${where}(tokens): tokens must be an array of token ids or an Int32Array, got ${describe(tokens)}`);
    }
    if (tokens.length === 0) throw new InvalidArgumentError(`${where}(tokens): tokens must not be empty`);
    const vocab = this.#engine.config.vocabSize;
    const ids = new Int32Array(tokens.length);
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t >= vocab) {
        throw new InvalidArgumentError(`${where}(tokens): token id ${describe(t)} at index ${i} is outside the vocabulary [0, ${vocab})`);
      }
      ids[i] = t;
    }
    return ids;
  }

  protected release(): void {
    this.#seq.dispose();
    this.#engine.forget(this);
  }
}

class Transformer extends NativeResource implements LlmEngine {
  readonly config: ModelConfig;
  readonly file: GgufFile;
  readonly threads: number;
  #model: NativeLlmModel;
  #ownsFile: boolean;
  // Live sequences, disposed with the engine so their KV caches are freed at once, not at GC.
  #sequences = new Set<TransformerSequence>();

  constructor(file: GgufFile, config: ModelConfig, model: NativeLlmModel, threads: number, ownsFile: boolean) {
    super();
    this.file = file;
    this.config = Object.freeze({ ...config });
    this.#model = model;
    this.threads = threads;
    this.#ownsFile = ownsFile;
  }

  /** @internal */
  nativeModel(where: string): NativeLlmModel {
    this.checkAlive(where);
    return this.#model;
  }

  /**
   * options.kvSpan (@internal, for tests): attention reads the cache this many positions per
   * kernel call, as a paged cache (issue #9) will read it page by page.
   */
  createSequence(contextSize: number, options?: { kvSpan?: number }): LlmSequence {
    const where = 'LlmEngine.createSequence(contextSize)';
    this.checkAlive(where);
    checkInt(where, contextSize, 1, this.config.contextLength);
    const o = checkOptions<{ kvSpan?: number }>('LlmEngine.createSequence(contextSize, options)', options ?? {}, ['kvSpan']);
    const span = o.kvSpan === undefined ? 0 : checkInt('LlmEngine.createSequence: options.kvSpan', o.kvSpan, 1, contextSize);
    let seq: TransformerSequence;
    try {
      seq = new TransformerSequence(this, native().llmSequenceCreate(this.#model, contextSize, span), contextSize);
    } catch (err) {
      throw fromNative(err, new Error());
    }
    this.#sequences.add(seq);
    return seq;
  }

  /** @internal */
  forget(seq: TransformerSequence): void {
    this.#sequences.delete(seq);
  }

  protected release(): void {
    for (const seq of this.#sequences) seq.dispose();
    this.#sequences.clear();
    this.#model.dispose();
    if (this.#ownsFile) this.file.dispose();
  }
}

function parseOptions(where: string, options: TransformerOptions | undefined): Parsed {
  const o = checkOptions<TransformerOptions>(where, options ?? {}, OPTION_KEYS);
  return {
    threads: o.threads === undefined ? 0 : checkInt(`${where}: options.threads`, o.threads, 1, 1024),
    variant: o.variant === undefined ? 'auto' : checkOneOf(`${where}: options.variant`, o.variant, VARIANTS),
  };
}

/** Builds the transformer over an open GGUF file (which stays the caller's to dispose, after the engine). */
export function transformerFromFile(file: GgufFile, options?: TransformerOptions): LlmEngine {
  return build(file, parseOptions('transformerFromFile(file, options)', options), false);
}

function build(file: GgufFile, options: Parsed, ownsFile: boolean): LlmEngine {
  const config = configFromGguf(file);
  const table = tensorIndexTable(file, config);
  let model: NativeLlmModel;
  try {
    model = native().llmModelCreate(file.handle('loadTransformer'), { ...config, variant: options.variant }, table);
  } catch (err) {
    throw fromNative(err, new Error());
  }
  return new Transformer(file, config, model, options.threads, ownsFile);
}

/** Maps the GGUF at `path` and builds its transformer; dispose() of the engine unmaps the file. */
export async function loadTransformer(path: string, options?: TransformerOptions): Promise<LlmEngine> {
  const parsed = parseOptions('loadTransformer(path, options)', options);
  const file = await read(path);
  try {
    return build(file, parsed, true);
  } catch (err) {
    file.dispose();
    throw err;
  }
}
