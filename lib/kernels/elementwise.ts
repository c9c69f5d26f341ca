/**
 * sonde.kernels elementwise family (float32): broadcasting arithmetic, activations, softmax,
 * layer/RMS normalisation, argmax / top-k and float32 <-> float16 / bfloat16 conversion. Every
 * call runs on sonde's thread pool and resolves to new tensors; inputs are not modified.
 */
import { allocOutput } from '../buffers.js';
import { native, type NativeCancelToken, type NativeCastType, type NativeElementwiseVariant } from '../binding.js';
import { InvalidArgumentError, callNative } from '../errors.js';
import { waitKernel } from '../wait.js';
import { withSignal } from '../lifetime.js';
import { Tensor, checkTensor } from '../tensor.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';

/**
 * Which kernels run: 'auto' is the widest SIMD level this CPU allows; 'reference' computes in
 * double and rounds once (slow; what the fast variants are tested against).
 */
export type ElementwiseVariant = NativeElementwiseVariant;
const VARIANTS: readonly ElementwiseVariant[] = ['auto', 'reference', 'scalar', 'avx2', 'avx512'];

export interface ElementwiseOptions {
  /** At most this many pool threads (default: the whole pool; small inputs use one). */
  threads?: number;
  variant?: ElementwiseVariant;
  signal?: AbortSignal;
}
const COMMON = ['threads', 'variant', 'signal'] as const;

interface Common {
  threads: number;
  variant: ElementwiseVariant;
  signal: AbortSignal | undefined;
}

function common(where: string, opts: ElementwiseOptions): Common {
  return {
    threads: opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024),
    variant: checkOneOf(`${where}: options.variant`, opts.variant ?? 'auto', VARIANTS),
    signal: checkSignal(`${where}: options.signal`, opts.signal),
  };
}

/** `key`: the call's kind and sizes, to wait as earlier calls of it measured (waitKernel). */
function run(site: Error, signal: AbortSignal | undefined, threads: number,
  start: (token: NativeCancelToken | undefined) => Promise<void>, key: string): Promise<void> {
  return callNative(() => withSignal(signal, (token) => waitKernel(start(token), threads, `${key} t${threads}`)), site);
}

const fmt = (dims: readonly number[]) => `[${dims.join(', ')}]`;

/** Normalises an axis option (negative counts from the end) for a tensor of `rank` dims. */
function checkAxis(where: string, axis: unknown, rank: number): number {
  if (rank === 0) throw new InvalidArgumentError(`${where}: x is a scalar (dims []); it has no axis to reduce over`);
  const a = checkInt(`${where}: options.axis`, axis, -rank, rank - 1);
  return a < 0 ? a + rank : a;
}

function checkBool(where: string, value: unknown): boolean {
  if (typeof value !== 'boolean') throw new InvalidArgumentError(`${where} must be a boolean, got ${describe(value)}`);
  return value;
}

function checkEpsilon(where: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw new InvalidArgumentError(`${where} must be a finite number >= 0, got ${describe(value)}`);
  }
  return value;
}

const product = (dims: readonly number[]) => dims.reduce((p, d) => p * d, 1);

/** NumPy broadcasting: dims align from the right; a dim of 1 stretches to the other's. */
export function broadcastShapes(where: string, a: readonly number[], b: readonly number[]): number[] {
  const rank = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < rank; i++) {
    const da = a[i - (rank - a.length)] ?? 1;
    const db = b[i - (rank - b.length)] ?? 1;
    if (da !== db && da !== 1 && db !== 1) {
      throw new InvalidArgumentError(
        `${where}: shapes ${fmt(a)} (a) and ${fmt(b)} (b) cannot be broadcast: dimension ${da} of a does not match ` +
          `${db} of b (aligned from the right, at output axis ${i}; sizes must be equal or 1)`,
      );
    }
    out.push(da === 1 ? db : da);
  }
  return out;
}

const BINARY_CODE = { add: 0, sub: 1, mul: 2, div: 3 } as const;

async function binary(name: keyof typeof BINARY_CODE, a: Tensor<'float32'>, b: Tensor<'float32'>, options: ElementwiseOptions | undefined,
  site: Error): Promise<Tensor<'float32'>> {
  const opts = checkOptions<ElementwiseOptions>(name, options, COMMON);
  checkTensor(`${name}(a)`, a, 'float32');
  checkTensor(`${name}(b)`, b, 'float32');
  const dims = broadcastShapes(name, a.dims, b.dims);
  const c = common(name, opts);
  const out = allocOutput(Float32Array, product(dims));
  await run(site, c.signal, c.threads, (token) =>
    native().elementwiseBinary(BINARY_CODE[name], a.data, a.dims, b.data, b.dims, out, c.variant, c.threads, token),
  `${name} ${c.variant} ${a.dims.join('x')} ${b.dims.join('x')}`);
  return new Tensor('float32', out, dims);
}

/** a + b with NumPy broadcasting; resolves to a tensor of the broadcast shape. */
export async function add(a: Tensor<'float32'>, b: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  return binary('add', a, b, options, new Error());
}
/** a - b with NumPy broadcasting. */
export async function sub(a: Tensor<'float32'>, b: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  return binary('sub', a, b, options, new Error());
}
/** a * b with NumPy broadcasting. */
export async function mul(a: Tensor<'float32'>, b: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  return binary('mul', a, b, options, new Error());
}
/** a / b with NumPy broadcasting (IEEE: x/0 is +-Inf, 0/0 NaN). */
export async function div(a: Tensor<'float32'>, b: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  return binary('div', a, b, options, new Error());
}

const UNARY_CODE = { geluErf: 0, geluTanh: 1, silu: 2, sigmoid: 3, tanh: 4, exp: 5, relu: 6 } as const;

async function unary(where: string, op: keyof typeof UNARY_CODE, x: Tensor<'float32'>, opts: ElementwiseOptions,
  site: Error): Promise<Tensor<'float32'>> {
  checkTensor(`${where}(x)`, x, 'float32');
  const c = common(where, opts);
  const out = allocOutput(Float32Array, x.size);
  await run(site, c.signal, c.threads, (token) => native().elementwiseUnary(UNARY_CODE[op], x.data, out, c.variant, c.threads, token),
    `${op} ${c.variant} ${x.size}`);
  return new Tensor('float32', out, x.dims);
}

export type GeluApproximation = 'none' | 'tanh';
export interface GeluOptions extends ElementwiseOptions {
  /** 'none': x/2 (1 + erf(x/sqrt 2)); 'tanh': x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Default 'none'. */
  approximate?: GeluApproximation;
}

/** GELU. Accuracy of the SIMD kernels: see native/kernels/elementwise/elementwise.h. */
export async function gelu(x: Tensor<'float32'>, options?: GeluOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const opts = checkOptions<GeluOptions>('gelu', options, [...COMMON, 'approximate']);
  const approx = checkOneOf('gelu: options.approximate', opts.approximate ?? 'none', ['none', 'tanh'] as const);
  return unary('gelu', approx === 'tanh' ? 'geluTanh' : 'geluErf', x, opts, site);
}
/** x * sigmoid(x) (SiLU / swish). */
export async function silu(x: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  return unary('silu', 'silu', x, checkOptions<ElementwiseOptions>('silu', options, COMMON), site);
}
/** 1 / (1 + exp(-x)). */
export async function sigmoid(x: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  return unary('sigmoid', 'sigmoid', x, checkOptions<ElementwiseOptions>('sigmoid', options, COMMON), site);
}
export async function tanh(x: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  return unary('tanh', 'tanh', x, checkOptions<ElementwiseOptions>('tanh', options, COMMON), site);
}
export async function exp(x: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  return unary('exp', 'exp', x, checkOptions<ElementwiseOptions>('exp', options, COMMON), site);
}
/** max(x, 0); NaN stays NaN. */
export async function relu(x: Tensor<'float32'>, options?: ElementwiseOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  return unary('relu', 'relu', x, checkOptions<ElementwiseOptions>('relu', options, COMMON), site);
}

export interface SoftmaxOptions extends ElementwiseOptions {
  /** Axis to normalise over; negative counts from the end. Default -1. */
  axis?: number;
}

/**
 * exp(x - max) / sum(exp(x - max)) along `axis`. A slice containing NaN, or +Inf, or only -Inf,
 * comes out all NaN (as in PyTorch and ONNX Runtime).
 */
export async function softmax(x: Tensor<'float32'>, options?: SoftmaxOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'softmax';
  const opts = checkOptions<SoftmaxOptions>(where, options, [...COMMON, 'axis']);
  checkTensor(`${where}(x)`, x, 'float32');
  const axis = checkAxis(where, opts.axis ?? -1, x.dims.length);
  const c = common(where, opts);
  const out = allocOutput(Float32Array, x.size);
  await run(site, c.signal, c.threads, (token) => native().softmax(x.data, x.dims, axis, out, c.variant, c.threads, token),
    `softmax ${c.variant} ${x.dims.join('x')} ${axis}`);
  return new Tensor('float32', out, x.dims);
}

export interface LayerNormOptions extends ElementwiseOptions {
  /** Scale, shaped like x's dims from `axis` on. */
  gamma?: Tensor<'float32'>;
  /** Shift, shaped like x's dims from `axis` on. */
  beta?: Tensor<'float32'>;
  /** Added to the variance. Default 1e-5. */
  epsilon?: number;
  /** First normalised axis: x is normalised over dims[axis:] (ONNX LayerNormalization). Default -1. */
  axis?: number;
}

function checkAffine(where: string, t: Tensor<'float32'> | undefined, want: readonly number[], what: string): Float32Array | null {
  if (t === undefined) return null;
  checkTensor(where, t, 'float32');
  if (t.dims.length !== want.length || t.dims.some((d, i) => d !== want[i])) {
    throw new InvalidArgumentError(`${where} must have dims ${fmt(want)} (${what}), got ${fmt(t.dims)}`);
  }
  return t.data;
}

/** (x - mean) / sqrt(var + epsilon) * gamma + beta, mean and variance over dims[axis:]. */
export async function layerNorm(x: Tensor<'float32'>, options?: LayerNormOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'layerNorm';
  const opts = checkOptions<LayerNormOptions>(where, options, [...COMMON, 'gamma', 'beta', 'epsilon', 'axis']);
  checkTensor(`${where}(x)`, x, 'float32');
  const axis = checkAxis(where, opts.axis ?? -1, x.dims.length);
  const normDims = x.dims.slice(axis);
  const what = `x's dims from axis ${axis}`;
  const gamma = checkAffine(`${where}: options.gamma`, opts.gamma, normDims, what);
  const beta = checkAffine(`${where}: options.beta`, opts.beta, normDims, what);
  const epsilon = checkEpsilon(`${where}: options.epsilon`, opts.epsilon ?? 1e-5);
  const c = common(where, opts);
  const n = product(normDims);
  const rows = product(x.dims.slice(0, axis));
  const out = allocOutput(Float32Array, x.size);
  await run(site, c.signal, c.threads, (token) =>
    native().layerNorm(x.data, rows, n, gamma, beta, epsilon, out, c.variant, c.threads, token), `layerNorm ${c.variant} ${rows}x${n}`);
  return new Tensor('float32', out, x.dims);
}

export interface RmsNormOptions extends ElementwiseOptions {
  /** Scale, shaped [dims[-1]]. */
  gamma?: Tensor<'float32'>;
  /** Added to the mean square. Default 1e-6. */
  epsilon?: number;
}

/** x / sqrt(mean(x^2) + epsilon) * gamma over the last axis (as in llama-family models). */
export async function rmsNorm(x: Tensor<'float32'>, options?: RmsNormOptions): Promise<Tensor<'float32'>> {
  const site = new Error();
  const where = 'rmsNorm';
  const opts = checkOptions<RmsNormOptions>(where, options, [...COMMON, 'gamma', 'epsilon']);
  checkTensor(`${where}(x)`, x, 'float32');
  if (x.dims.length === 0) throw new InvalidArgumentError(`${where}: x is a scalar (dims []); it has no last axis to normalise`);
  const n = x.dims[x.dims.length - 1]!;
  const gamma = checkAffine(`${where}: options.gamma`, opts.gamma, [n], "x's last dim");
  const epsilon = checkEpsilon(`${where}: options.epsilon`, opts.epsilon ?? 1e-6);
  const c = common(where, opts);
  const out = allocOutput(Float32Array, x.size);
  await run(site, c.signal, c.threads, (token) =>
    native().rmsNorm(x.data, n === 0 ? 0 : x.size / n, n, gamma, null, epsilon, out, c.variant, c.threads, token),
  `rmsNorm ${c.variant} ${x.size}/${n}`);
  return new Tensor('float32', out, x.dims);
}

export interface ArgmaxOptions {
  /** Axis to reduce; negative counts from the end. Default -1. */
  axis?: number;
  /** Keep the reduced axis as a dim of 1 (default false: it is removed). */
  keepDims?: boolean;
  threads?: number;
  signal?: AbortSignal;
}

/** Index of the largest value along `axis` (first on ties; NaN counts as largest), as int64. */
export async function argmax(x: Tensor<'float32'>, options?: ArgmaxOptions): Promise<Tensor<'int64'>> {
  const site = new Error();
  const where = 'argmax';
  const opts = checkOptions<ArgmaxOptions>(where, options, ['axis', 'keepDims', 'threads', 'signal']);
  checkTensor(`${where}(x)`, x, 'float32');
  const axis = checkAxis(where, opts.axis ?? -1, x.dims.length);
  if (x.dims[axis] === 0) throw new InvalidArgumentError(`${where}: x's axis ${axis} is empty (dims ${fmt(x.dims)}); it has no largest element`);
  const keepDims = checkBool(`${where}: options.keepDims`, opts.keepDims ?? false);
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  const dims = keepDims ? x.dims.map((d, i) => (i === axis ? 1 : d)) : x.dims.filter((_, i) => i !== axis);
  const out = allocOutput(BigInt64Array, product(dims));
  await run(site, signal, threads, (token) => native().argmax(x.data, x.dims, axis, out, threads, token), `argmax ${x.dims.join('x')} ${axis}`);
  return new Tensor('int64', out, dims);
}

export interface TopKOptions {
  /** Axis to select along; negative counts from the end. Default -1. */
  axis?: number;
  /** The k largest (default) or the k smallest. */
  largest?: boolean;
  threads?: number;
  signal?: AbortSignal;
}

/**
 * The k largest (or smallest) values along `axis`, sorted, and their int64 indices. Among equal
 * values the lower index comes first; NaN sorts above +Inf.
 */
export async function topK(x: Tensor<'float32'>, k: number, options?: TopKOptions): Promise<{ values: Tensor<'float32'>; indices: Tensor<'int64'> }> {
  const site = new Error();
  const where = 'topK';
  const opts = checkOptions<TopKOptions>(where, options, ['axis', 'largest', 'threads', 'signal']);
  checkTensor(`${where}(x)`, x, 'float32');
  const axis = checkAxis(where, opts.axis ?? -1, x.dims.length);
  const n = x.dims[axis]!;
  if (n === 0) throw new InvalidArgumentError(`${where}: x's axis ${axis} is empty (dims ${fmt(x.dims)}); there is nothing to select`);
  checkInt(`${where}(k)`, k, 1, n);
  const largest = checkBool(`${where}: options.largest`, opts.largest ?? true);
  const threads = opts.threads === undefined ? 0 : checkInt(`${where}: options.threads`, opts.threads, 1, 1024);
  const signal = checkSignal(`${where}: options.signal`, opts.signal);
  const dims = x.dims.map((d, i) => (i === axis ? k : d));
  const values = allocOutput(Float32Array, product(dims));
  const indices = allocOutput(BigInt64Array, values.length);
  await run(site, signal, threads, (token) => native().topK(x.data, x.dims, axis, k, largest, values, indices, threads, token),
    `topK ${x.dims.join('x')} ${axis} ${k}`);
  return { values: new Tensor('float32', values, dims), indices: new Tensor('int64', indices, dims) };
}

export type CastDType = NativeCastType;
const CAST_DTYPES: readonly CastDType[] = ['float32', 'float16', 'bfloat16'];

/**
 * Converts between float32, float16 and bfloat16 (16-bit types as raw bits in a Uint16Array).
 * Rounds to nearest even; NaN stays NaN, +-Inf stays +-Inf, subnormals are kept, float16 overflow
 * gives +-Inf. Same dtype: a copy.
 */
export async function cast<D extends CastDType>(x: Tensor<CastDType>, dtype: D, options?: ElementwiseOptions): Promise<Tensor<D>> {
  const site = new Error();
  const where = 'cast';
  const opts = checkOptions<ElementwiseOptions>(where, options, COMMON);
  checkTensor(`${where}(x)`, x);
  if (!CAST_DTYPES.includes(x.dtype as CastDType)) {
    throw new InvalidArgumentError(`${where}(x) must have dtype 'float32', 'float16' or 'bfloat16', got '${x.dtype}'`);
  }
  const to = checkOneOf(`${where}(dtype)`, dtype, CAST_DTYPES);
  const c = common(where, opts);
  const out = to === 'float32' ? allocOutput(Float32Array, x.size) : allocOutput(Uint16Array, x.size);
  await run(site, c.signal, c.threads, (token) =>
    native().cast(x.data as Float32Array | Uint16Array, x.dtype as CastDType, out, to, c.variant, c.threads, token),
  `cast ${x.dtype} ${to} ${c.variant} ${x.size}`);
  return new Tensor(to, out as Tensor<D>['data'], x.dims) as Tensor<D>;
}
