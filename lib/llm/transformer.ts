/**
 * The native transformer behind LlmEngine (lib/llm/engine.ts): loadTransformer(path) maps the GGUF,
 * reads and checks its configuration (lib/llm/arch.ts) and builds the native model. K/V live in
 * paged pools (createKvPool); one native call per step, steps on one pool run one after another (a
 * promise chain), so a caller may issue the next step without awaiting the previous one. A sequence
 * (createSequence) is a private pool of one block table: there is one forward implementation.
 */
import { native, type NativeCancelToken, type NativeKvPool, type NativeLlmModel } from '../binding.js';
import { InvalidArgumentError, callNative, fromNative } from '../errors.js';
import { NativeResource, withSignal } from '../lifetime.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';
import { configFromGguf, tensorIndexTable } from './arch.js';
import type {
  ChainResult, ChainSampling, EvalOptions, KvDtype, KvPool, KvPoolOptions, LlmEngine, LlmSequence, ModelConfig, StepBatch,
  StepSequence,
} from './engine.js';
import { CHAIN_TOP_K } from './sampling.js';
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

const POOL_KEYS = ['blockSize', 'maxBlocks', 'dtype', 'contextSize'] as const;
const DTYPES: readonly KvDtype[] = ['f32', 'f16'];
const STEP_KEYS = ['signal'] as const;
const CHAIN_KEYS = ['signal', 'sampling'] as const;
const BATCH_KEYS = ['sequences', 'copies'] as const;
const SEQUENCE_KEYS = ['blockTable', 'start', 'tokens', 'logits'] as const;
const LOGITS: readonly StepSequence['logits'][] = ['none', 'last', 'all'];
const LOGITS_CODE = { none: 0, last: 1, all: 2 } as const;
/** The largest block size createKvPool takes (a private sequence pool may use one block of its whole context). */
const MAX_BLOCK_SIZE = 65536;
/** The most positions a pool's sequences may reach (the native bindings' bound). */
const MAX_POSITIONS = 2 ** 24;
/** The most steps one stepChain call chains (the native bindings' bound). */
const MAX_CHAIN = 65536;

/** A step packed for the native call (snapshotted when step() is called, so later edits of the caller's arrays do not leak in). */
export interface PackedStep { tokens: Int32Array; meta: Int32Array; tables: Int32Array; copies: Int32Array; rows: number }

/**
 * @internal Where a transformer's weights and pools live: the CPU's native model (this file) or a
 * GPU's (lib/llm/transformer-gpu.ts). The TS side (validation, packing, sequences, the step chain)
 * is the same for both.
 */
export interface TransformerBackend {
  /** The GPU runtime's device id ('cuda:N' or 'emulated'), undefined on the CPU. */
  readonly gpu: string | undefined;
  /** Device bytes of the weights (0 on the CPU: they are read from the file's mapping). */
  readonly deviceBytes: number;
  /** The native model handle (for tests and info()). */
  readonly handle: { info(): { disposed: boolean; bytes?: number } };
  createPool(blockSize: number, maxBlocks: number, dtype: KvDtype, reserve: number): NativeKvPool;
  step(pool: NativeKvPool, packed: PackedStep, logits: Float32Array, token: NativeCancelToken | undefined): Promise<void>;
  /** KvPool.stepChain's native call. */
  stepChain(pool: NativeKvPool, packed: PackedStep, steps: number, chosen: Int32Array, sampling: ChainSampling | undefined,
    rngOut: Uint32Array | undefined, token: NativeCancelToken | undefined): Promise<void>;
  read(pool: NativeKvPool, ids: Int32Array, out: Uint8Array): Promise<void>;
  write(pool: NativeKvPool, ids: Int32Array, bytes: Uint8Array): Promise<void>;
  prepare(): Promise<void>;
  dispose(): void;
}

class CpuBackend implements TransformerBackend {
  readonly gpu = undefined;
  readonly deviceBytes = 0;
  readonly #model: NativeLlmModel;
  readonly #threads: number;
  constructor(model: NativeLlmModel, threads: number) {
    this.#model = model;
    this.#threads = threads;
  }
  get handle(): NativeLlmModel { return this.#model; }
  createPool(blockSize: number, maxBlocks: number, dtype: KvDtype, reserve: number): NativeKvPool {
    return native().kvPoolCreate(this.#model, blockSize, maxBlocks, dtype, reserve);
  }
  step(pool: NativeKvPool, p: PackedStep, logits: Float32Array, token: NativeCancelToken | undefined): Promise<void> {
    return native().kvPoolStep(this.#model, pool, p.tokens, p.meta, p.tables, p.copies, logits, this.#threads, token);
  }
  stepChain(pool: NativeKvPool, p: PackedStep, steps: number, chosen: Int32Array, sampling: ChainSampling | undefined,
    rngOut: Uint32Array | undefined, token: NativeCancelToken | undefined): Promise<void> {
    return native().kvPoolStepChain(this.#model, pool, p.tokens, p.meta, p.tables, p.copies, steps, chosen,
      sampling?.params ?? null, sampling?.rng ?? null, rngOut ?? null, this.#threads, token);
  }
  read(pool: NativeKvPool, ids: Int32Array, out: Uint8Array): Promise<void> { return native().kvPoolRead(pool, ids, out); }
  write(pool: NativeKvPool, ids: Int32Array, bytes: Uint8Array): Promise<void> { return native().kvPoolWrite(pool, ids, bytes); }
  prepare(): Promise<void> { return native().llmModelPrepare(this.#model, this.#threads); }
  dispose(): void { this.#model.dispose(); }
}

class TransformerKvPool extends NativeResource implements KvPool {
  readonly blockSize: number;
  readonly maxBlocks: number;
  readonly dtype: KvDtype;
  readonly blockBytes: number;
  /** Positions a sequence may reach (KvPoolOptions.contextSize). */
  readonly contextSize: number;
  #engine: Transformer;
  #pool: NativeKvPool;
  #chain: Promise<void> = Promise.resolve();
  constructor(engine: Transformer, pool: NativeKvPool, blockSize: number, maxBlocks: number, dtype: KvDtype, contextSize: number) {
    super();
    this.#engine = engine;
    this.#pool = pool;
    this.contextSize = contextSize;
    this.blockSize = blockSize;
    this.maxBlocks = maxBlocks;
    this.dtype = dtype;
    this.blockBytes = pool.info().blockBytes!;
  }

  get bytes(): number {
    this.checkAlive('KvPool.bytes');
    return this.#pool.info().bytes!;
  }

  get highWaterBytes(): number {
    this.checkAlive('KvPool.highWaterBytes');
    return this.#pool.info().highWaterBytes!;
  }

  step(batch: StepBatch, options?: { signal?: AbortSignal }): Promise<Float32Array> {
    return this.#step('KvPool.step', batch, undefined, options);
  }

  /** @internal See KvPool.stepInto. */
  stepInto(batch: StepBatch, into: Float32Array, options?: { signal?: AbortSignal }): Promise<Float32Array> {
    return this.#step('KvPool.stepInto', batch, into, options);
  }

  // A decode step's hot path: no stack is captured up front (new Error() cost 2-5 us a step); an
  // error raised in the native call still names the awaiting callers through V8's async stack
  // traces, which #enqueue's awaits carry.
  #step(where: string, batch: StepBatch, into: Float32Array | undefined, options?: { signal?: AbortSignal }): Promise<Float32Array> {
    try {
      this.checkAlive(where);
      const o = checkOptions<{ signal?: AbortSignal }>(`${where}(batch, options)`, options, STEP_KEYS);
      const signal = checkSignal(`${where}: options.signal`, o.signal);
      if (into !== undefined && !(into instanceof Float32Array)) throw new InvalidArgumentError(`${where}: into must be a Float32Array, got ${describe(into)}`);
      const packed = this.#pack(where, batch);
      return this.#enqueue(async () => {
        this.checkAlive(where);
        const n = packed.rows * this.#engine.config.vocabSize;
        const logits = into && into.length >= n ? into.subarray(0, n) : new Float32Array(n);
        const backend = this.#engine.backend(where);
        await callNative(() => withSignal(signal, (token) => backend.step(this.#pool, packed, logits, token)));
        return logits;
      });
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** See KvPool.stepChain. */
  stepChain(batch: StepBatch, steps: number, options?: { signal?: AbortSignal; sampling?: ChainSampling }): Promise<ChainResult> {
    const where = 'KvPool.stepChain';
    try {
      this.checkAlive(where);
      const o = checkOptions<{ signal?: AbortSignal; sampling?: ChainSampling }>(`${where}(batch, steps, options)`, options, CHAIN_KEYS);
      const signal = checkSignal(`${where}: options.signal`, o.signal);
      const n = checkInt(`${where}: steps`, steps, 1, MAX_CHAIN);
      const packed = this.#pack(where, batch, n);
      const sampling = o.sampling === undefined ? undefined : this.#chainSampling(where, o.sampling, packed.rows);
      return this.#enqueue(async () => {
        this.checkAlive(where);
        const tokens = new Int32Array(n * packed.rows);
        const rng = sampling ? new Uint32Array(n * packed.rows * 4) : undefined;
        const backend = this.#engine.backend(where);
        await callNative(() => withSignal(signal, (token) => backend.stepChain(this.#pool, packed, n, tokens, sampling, rng, token)));
        return rng ? { tokens, rng } : { tokens };
      });
    } catch (err) {
      return Promise.reject(err);
    }
  }

  // options.sampling checked and copied (each error names the sequence and parameter).
  #chainSampling(where: string, sampling: ChainSampling, seqs: number): ChainSampling {
    const s = checkOptions<ChainSampling>(`${where}: options.sampling`, sampling, ['params', 'rng']);
    if (!(s.params instanceof Float64Array) || s.params.length !== 4 * seqs) {
      throw new InvalidArgumentError(`${where}: options.sampling.params must be a Float64Array of 4 values per sequence (${4 * seqs}), got ${describe(s.params)}`);
    }
    if (!(s.rng instanceof Uint32Array) || s.rng.length !== 4 * seqs) {
      throw new InvalidArgumentError(`${where}: options.sampling.rng must be a Uint32Array of 4 words per sequence (${4 * seqs}), got ${describe(s.rng)}`);
    }
    const vocab = this.#engine.config.vocabSize;
    for (let i = 0; i < seqs; i++) {
      const [t, k, p, minLogit] = s.params.subarray(4 * i, 4 * i + 4) as unknown as [number, number, number, number];
      const at = `${where}: options.sampling.params of sequences[${i}]`;
      if (!Number.isFinite(t)) throw new InvalidArgumentError(`${at}: temperature must be finite, got ${t}`);
      if (t <= 0) continue;
      if (!(Number.isInteger(k) && k >= 1 && k <= CHAIN_TOP_K && k < vocab)) {
        throw new InvalidArgumentError(`${at}: topK must be an integer in [1, ${Math.min(CHAIN_TOP_K, vocab - 1)}], got ${k}`);
      }
      if (!(p > 0 && p <= 1)) throw new InvalidArgumentError(`${at}: topP must be in (0, 1], got ${p}`);
      if (!(minLogit <= 0)) throw new InvalidArgumentError(`${at}: log(minP) must be <= 0 or -Infinity, got ${minLogit}`);
    }
    return { params: s.params.slice(), rng: s.rng.slice() };
  }

  readBlocks(ids: Int32Array): Promise<Uint8Array> {
    const site = new Error();
    const where = 'KvPool.readBlocks(ids)';
    try {
      this.checkAlive(where);
      const copy = this.#ids(where, ids);
      return this.#enqueue(async () => {
        this.checkAlive(where);
        const out = new Uint8Array(copy.length * this.blockBytes);
        await callNative(() => this.#engine.backend(where).read(this.#pool, copy, out), site);
        return out;
      });
    } catch (err) {
      return Promise.reject(err);
    }
  }

  writeBlocks(ids: Int32Array, bytes: Uint8Array): Promise<void> {
    const site = new Error();
    const where = 'KvPool.writeBlocks(ids, bytes)';
    try {
      this.checkAlive(where);
      const copy = this.#ids(where, ids);
      const seen = new Set<number>();
      for (let i = 0; i < copy.length; i++) {
        if (seen.has(copy[i]!)) throw new InvalidArgumentError(`${where}: ids[${i}] repeats block ${copy[i]}`);
        seen.add(copy[i]!);
      }
      if (!(bytes instanceof Uint8Array)) throw new InvalidArgumentError(`${where}: bytes must be a Uint8Array, got ${describe(bytes)}`);
      if (bytes.length !== copy.length * this.blockBytes) {
        throw new InvalidArgumentError(`${where}: bytes must hold ${copy.length} blocks of ${this.blockBytes} bytes (${copy.length * this.blockBytes}), got ${bytes.length}`);
      }
      const data = bytes.slice();
      return this.#enqueue(async () => {
        this.checkAlive(where);
        await callNative(() => this.#engine.backend(where).write(this.#pool, copy, data), site);
      });
    } catch (err) {
      return Promise.reject(err);
    }
  }

  expertCounts(): Float64Array | undefined {
    this.checkAlive('KvPool.expertCounts');
    return this.#pool.info().expertCounts;
  }

  /** @internal For tests: the native pool's allocation state. */
  nativeInfo(): ReturnType<NativeKvPool['info']> {
    return this.#pool.info();
  }

  // Jobs run one at a time in call order: #chain settles (never rejects) when the last one queued
  // ends. Awaits rather than a .then chain, so that V8's async stack traces lead from an error in
  // `run` to whoever awaits the job.
  async #enqueue<T>(run: () => Promise<T>): Promise<T> {
    const turn = this.#chain;
    let done!: () => void;
    this.#chain = new Promise<void>((resolve) => { done = resolve; });
    try {
      await turn;
      return await run();
    } finally {
      done();
    }
  }

  #ids(where: string, ids: Int32Array): Int32Array {
    if (!(ids instanceof Int32Array)) throw new InvalidArgumentError(`${where}: ids must be an Int32Array, got ${describe(ids)}`);
    for (let i = 0; i < ids.length; i++) {
      if (ids[i]! < 0 || ids[i]! >= this.maxBlocks) throw new InvalidArgumentError(`${where}: ids[${i}] = ${ids[i]} is outside [0, ${this.maxBlocks})`);
    }
    return ids.slice();
  }

  // Every check the native side repeats, here first, so each error names the sequence and field.
  // chainSteps: a chain (stepChain) of one-token decodes wanting logits, each writing that many
  // positions from its start on.
  #pack(where: string, batch: StepBatch, chainSteps?: number): PackedStep {
    const steps = chainSteps ?? 1;
    const b = checkOptions<StepBatch>(`${where}(batch)`, batch, BATCH_KEYS);
    if (batch === undefined) throw new InvalidArgumentError(`${where}(batch): batch must be an object, got undefined`);
    const seqs = b.sequences;
    if (!Array.isArray(seqs)) throw new InvalidArgumentError(`${where}: batch.sequences must be an array, got ${describe(seqs)}`);
    const vocab = this.#engine.config.vocabSize, context = this.contextSize;
    const bs = this.blockSize, maxBlocks = this.maxBlocks;
    const meta = new Int32Array(seqs.length * 4);
    let tokenCount = 0, tableCount = 0, rows = 0;
    for (let s = 0; s < seqs.length; s++) {
      const at = `${where}: batch.sequences[${s}]`;
      const q = checkOptions<StepSequence>(at, seqs[s] ?? null, SEQUENCE_KEYS);
      const table = q.blockTable, tokens = q.tokens;
      if (!(table instanceof Int32Array)) throw new InvalidArgumentError(`${at}.blockTable must be an Int32Array, got ${describe(table)}`);
      if (!(tokens instanceof Int32Array)) throw new InvalidArgumentError(`${at}.tokens must be an Int32Array, got ${describe(tokens)}`);
      if (tokens.length === 0) throw new InvalidArgumentError(`${at}.tokens must not be empty`);
      const start = checkInt(`${at}.start`, q.start, 0, context);
      const logits = checkOneOf(`${at}.logits`, q.logits, LOGITS);
      if (chainSteps !== undefined && (tokens.length !== 1 || logits !== 'last')) {
        throw new InvalidArgumentError(`${at}: chained steps take one decode token whose logits are wanted (tokens.length 1, logits 'last'), got ${tokens.length} tokens, logits '${logits}'`);
      }
      for (let i = 0; i < table.length; i++) {
        const id = table[i]!;
        if (id < 0 || id >= maxBlocks) throw new InvalidArgumentError(`${at}.blockTable[${i}]: block id ${id} is outside [0, ${maxBlocks})`);
      }
      const end = start + tokens.length + steps - 1;
      const what = chainSteps !== undefined ? `start + steps = ${end}` : `start + tokens.length = ${end}`;
      if (end > context) throw new InvalidArgumentError(`${at}: ${what} exceeds the pool's context size ${context}`);
      if (end > table.length * bs) {
        throw new InvalidArgumentError(`${at}.blockTable: ${table.length} blocks of ${bs} positions do not cover ${what}`);
      }
      for (let i = 0; i < tokens.length; i++) {
        const t = tokens[i]!;
        if (t < 0 || t >= vocab) throw new InvalidArgumentError(`${at}.tokens[${i}]: token id ${t} is outside the vocabulary [0, ${vocab})`);
      }
      meta[4 * s] = table.length;
      meta[4 * s + 1] = start;
      meta[4 * s + 2] = tokens.length;
      meta[4 * s + 3] = LOGITS_CODE[logits];
      tokenCount += tokens.length;
      tableCount += table.length;
      rows += logits === 'none' ? 0 : logits === 'last' ? 1 : tokens.length;
    }
    // A block written by this step must appear nowhere else in it: another writer or a reader on
    // another thread would race (copy-on-write belongs before the step, in batch.copies). Written
    // entries are few (a block or two per sequence), read ones many: a map of the written ones,
    // then one pass over the rest.
    const written = new Map<number, string>();
    const conflict = (block: number, writer: string, other: string) => new InvalidArgumentError(
      `${where}: ${writer}: block ${block} is written by this step and also used at ${other} (copy it first)`);
    for (let s = 0; s < seqs.length; s++) {
      const q = seqs[s]!, table = q.blockTable, end = q.start + q.tokens.length + steps - 1;
      for (let i = Math.floor(q.start / bs); i < Math.ceil(end / bs); i++) {
        const at = `batch.sequences[${s}].blockTable[${i}]`, w = written.get(table[i]!);
        if (w !== undefined) throw conflict(table[i]!, w, at);
        written.set(table[i]!, at);
      }
    }
    for (let s = 0; s < seqs.length && written.size > 0; s++) {
      const q = seqs[s]!, table = q.blockTable;
      for (let i = 0; i < Math.floor(q.start / bs); i++) {
        const w = written.get(table[i]!);
        if (w !== undefined) throw conflict(table[i]!, w, `batch.sequences[${s}].blockTable[${i}]`);
      }
    }
    const copies = b.copies === undefined ? new Int32Array(0) : b.copies;
    if (!(copies instanceof Int32Array)) throw new InvalidArgumentError(`${where}: batch.copies must be an Int32Array of [src, dst] pairs, got ${describe(copies)}`);
    if (copies.length % 2 !== 0) throw new InvalidArgumentError(`${where}: batch.copies must hold [src, dst] pairs, got ${copies.length} values`);
    for (let i = 0; i < copies.length; i++) {
      if (copies[i]! < 0 || copies[i]! >= maxBlocks) throw new InvalidArgumentError(`${where}: batch.copies[${i}]: block id ${copies[i]} is outside [0, ${maxBlocks})`);
    }
    for (let i = 1; i < copies.length; i += 2) {
      for (let j = 0; j < copies.length; j++) {
        if (j !== i && copies[j] === copies[i]) {
          throw new InvalidArgumentError(`${where}: batch.copies[${i}]: destination block ${copies[i]} is ${j % 2 ? 'the destination of another copy' : 'also a copy source'}`);
        }
      }
    }
    const tokens = new Int32Array(tokenCount), tables = new Int32Array(tableCount);
    let t = 0, u = 0;
    for (const q of seqs as StepSequence[]) {
      tokens.set(q.tokens, t);
      tables.set(q.blockTable, u);
      t += q.tokens.length;
      u += q.blockTable.length;
    }
    return { tokens, meta, tables, copies: copies.slice(), rows };
  }

  protected release(): void {
    this.#pool.dispose();
    this.#engine.forget(this);
  }
}

class TransformerSequence extends NativeResource implements LlmSequence {
  readonly contextSize: number;
  #engine: Transformer;
  #pool: TransformerKvPool;
  #table: Int32Array;
  #length = 0;
  #chain: Promise<unknown> = Promise.resolve();
  #pending = 0;

  constructor(engine: Transformer, pool: TransformerKvPool, contextSize: number) {
    super();
    this.#engine = engine;
    this.#pool = pool;
    this.contextSize = contextSize;
    this.#table = Int32Array.from({ length: pool.maxBlocks }, (_, i) => i);
  }

  get length(): number {
    this.checkAlive('LlmSequence.length');
    return this.#length;
  }

  eval(tokens: readonly number[] | Int32Array, options: EvalOptions = {}): Promise<Float32Array> {
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
        const length = this.#length;
        if (length + ids.length > this.contextSize) {
          throw new InvalidArgumentError(`${where}: ${ids.length} tokens after the ${length} already in the sequence exceed its context size ${this.contextSize}`);
        }
        const logits = await this.#pool.step({
          sequences: [{ blockTable: this.#table, start: length, tokens: ids, logits: allLogits ? 'all' : 'last' }],
        }, { signal });
        this.#length = length + ids.length;
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
    return this.#pool.expertCounts();
  }

  truncate(length: number): void {
    const where = 'LlmSequence.truncate(length)';
    this.checkAlive(where);
    checkInt(where, length, 0);
    if (this.#pending > 0) throw new InvalidArgumentError(`${where}: ${this.#pending} eval(s) on this sequence are still running; await them first`);
    if (length < this.#length) this.#length = length;
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
    this.#pool.dispose();
    this.#engine.forget(this);
  }
}

class Transformer extends NativeResource implements LlmEngine {
  readonly config: ModelConfig;
  readonly file: GgufFile;
  #backend: TransformerBackend;
  #ownsFile: boolean;
  // Live sequences and pools, disposed with the engine so their KV blocks are freed at once, not at GC.
  #resources = new Set<TransformerSequence | TransformerKvPool>();

  constructor(file: GgufFile, config: ModelConfig, backend: TransformerBackend, ownsFile: boolean) {
    super();
    this.file = file;
    this.config = Object.freeze({ ...config });
    this.#backend = backend;
    this.#ownsFile = ownsFile;
  }

  /** The GPU runtime's device id when the weights and pools are in device memory, else undefined. */
  get gpu(): string | undefined {
    return this.#backend.gpu;
  }

  /** Device bytes of the weights (0 on the CPU). */
  get deviceBytes(): number {
    this.checkAlive('LlmEngine.deviceBytes');
    return this.#backend.deviceBytes;
  }

  /**
   * @internal The load's work that needs the pool (q8_0 weights repacked for the VNNI kernels), on
   * the pool; the first step does it otherwise.
   */
  async prepare(): Promise<void> {
    const site = new Error();
    await callNative(() => this.#backend.prepare(), site);
  }

  /** @internal For tests: the native model handle (llmModelCreate's, or the GPU model's). */
  nativeModel(where: string): NativeLlmModel {
    this.checkAlive(where);
    return this.#backend.handle as NativeLlmModel;
  }

  /** @internal */
  backend(where: string): TransformerBackend {
    this.checkAlive(where);
    return this.#backend;
  }

  /**
   * options.kvSpan (@internal, for tests): the block size of the sequence's private pool (default:
   * one block of contextSize positions), so attention reads the cache block by block.
   */
  createSequence(contextSize: number, options?: { kvSpan?: number }): LlmSequence {
    const where = 'LlmEngine.createSequence(contextSize)';
    this.checkAlive(where);
    checkInt(where, contextSize, 1, this.config.contextLength);
    const o = checkOptions<{ kvSpan?: number }>('LlmEngine.createSequence(contextSize, options)', options ?? {}, ['kvSpan']);
    const span = o.kvSpan === undefined ? contextSize : checkInt('LlmEngine.createSequence: options.kvSpan', o.kvSpan, 1, contextSize);
    const blocks = Math.ceil(contextSize / span);
    // The whole cache is allocated at once: a sequence's memory is known when it is created.
    const pool = this.#newPool(span, blocks, 'f32', blocks);
    const seq = new TransformerSequence(this, pool, contextSize);
    this.#resources.delete(pool);
    this.#resources.add(seq);
    return seq;
  }

  createKvPool(options: KvPoolOptions): KvPool {
    const where = 'LlmEngine.createKvPool(options)';
    this.checkAlive(where);
    if (options === undefined) throw new InvalidArgumentError(`${where}: options.maxBlocks is required`);
    const o = checkOptions<KvPoolOptions>(where, options, POOL_KEYS);
    const blockSize = o.blockSize === undefined ? 16 : checkInt(`${where}: options.blockSize`, o.blockSize, 1, MAX_BLOCK_SIZE);
    const maxBlocks = checkInt(`${where}: options.maxBlocks`, o.maxBlocks, 1, 2 ** 31 - 1);
    const dtype = o.dtype === undefined ? 'f32' : checkOneOf(`${where}: options.dtype`, o.dtype, DTYPES);
    const context = o.contextSize === undefined ? this.config.contextLength : checkInt(`${where}: options.contextSize`, o.contextSize, 1, MAX_POSITIONS);
    return this.#newPool(blockSize, maxBlocks, dtype, 0, context);
  }

  #newPool(blockSize: number, maxBlocks: number, dtype: KvDtype, reserve: number, context = this.config.contextLength): TransformerKvPool {
    let pool: TransformerKvPool;
    try {
      pool = new TransformerKvPool(this, this.#backend.createPool(blockSize, maxBlocks, dtype, reserve), blockSize, maxBlocks, dtype,
        context);
    } catch (err) {
      throw fromNative(err, new Error());
    }
    this.#resources.add(pool);
    return pool;
  }

  /** @internal */
  forget(resource: TransformerSequence | TransformerKvPool): void {
    this.#resources.delete(resource);
  }

  protected release(): void {
    for (const r of [...this.#resources]) r.dispose();
    this.#resources.clear();
    this.#backend.dispose();
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

function build(file: GgufFile, options: Parsed, ownsFile: boolean): Transformer {
  const config = configFromGguf(file);
  const table = tensorIndexTable(file, config);
  let model: NativeLlmModel;
  try {
    model = native().llmModelCreate(file.handle('loadTransformer'), { ...config, variant: options.variant }, table);
  } catch (err) {
    throw fromNative(err, new Error());
  }
  return new Transformer(file, config, new CpuBackend(model, options.threads), ownsFile);
}

/**
 * @internal A transformer over another backend (lib/llm/transformer-gpu.ts). ownsFile: dispose()
 * of the engine disposes the file too.
 */
export function transformerWithBackend(file: GgufFile, config: ModelConfig, backend: TransformerBackend, ownsFile: boolean): LlmEngine & {
  readonly gpu: string | undefined; readonly deviceBytes: number;
} {
  return new Transformer(file, config, backend, ownsFile);
}

/** Maps the GGUF at `path` and builds its transformer; dispose() of the engine unmaps the file. */
export async function loadTransformer(path: string, options?: TransformerOptions): Promise<LlmEngine> {
  const parsed = parseOptions('loadTransformer(path, options)', options);
  const file = await read(path);
  let engine: Transformer;
  try {
    engine = build(file, parsed, true);
  } catch (err) {
    file.dispose();
    throw err;
  }
  try {
    await engine.prepare();
  } catch (err) {
    engine.dispose();
    throw err;
  }
  return engine;
}
