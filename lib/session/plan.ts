/**
 * The compiled-plan contract between the TS graph compiler (lib/session/compile.ts) and the native
 * plan executor (native/runtime/plan.{h,cc}, binding native/binding/plan_binding.cc).
 *
 * A plan is built once per set of input shapes: every shape is concrete, every shape-arithmetic
 * value has been evaluated in TS, every weight has been folded and packed at load. Running it is
 * one native call that executes `steps` in order on sonde's pool, checking the cancel flag between
 * steps. The plan is immutable, so concurrent runs are safe; each run gets its own arena.
 *
 * Conventions:
 * - Sizes, dims, strides and offsets are in ELEMENTS of the step's dtype unless a name says bytes.
 * - Strides may be 0 (broadcast) or negative (Slice with a negative step); an offset plus strided
 *   walk is always in bounds (the compiler guarantees it; native checks it at createPlan and
 *   rejects the plan with ERR_SONDE_INTERNAL if not, so a compiler bug cannot write out of bounds).
 * - Tensors are row-major and contiguous in their buffer unless a step takes strides.
 * - `node` names the ONNX node a step came from, for error messages ("node 'Gather_12': index 7 is
 *   out of range [-5, 5)").
 * - bool is one byte (0 or 1), like ONNX and onnxruntime.
 * - GPU plans (native().createGpuPlan, a session on 'cuda') take the same spec without the
 *   CPU-only steps (conv, gemm and spmm on CPU handles, reorder, blocked operands): their convs
 *   and GEMMs are gpuConv / gpuGemm steps on weights the session uploaded to the device at load.
 */
import type {
  NativeConvHandle, NativeGpuBuffer, NativePackedGemm, NativePackedGemmLowp, NativeSparseWeights,
} from '../binding.js';

export type PlanDType = 'float32' | 'int64' | 'int32' | 'bool' | 'uint8' | 'int8';

/** Where a value's bytes live during a run. */
export type PlanBuffer =
  /** run()'s inputs[index]; read-only: no step may write it. */
  | { kind: 'input'; index: number; bytes: number }
  /** run()'s outputs[index]. */
  | { kind: 'output'; index: number; bytes: number }
  /** [offset, offset + bytes) of the run's arena; offset is a multiple of 64. */
  | { kind: 'arena'; offset: number; bytes: number }
  /** Constant data held by the plan (an initializer, a folded value); read-only. */
  | { kind: 'const'; data: Float32Array | BigInt64Array | Int32Array | Uint8Array | Int8Array; bytes: number }
  /**
   * GPU plans only: constant data already in device memory (an initializer the session uploaded once
   * at load, shared by all its plans); read-only.
   */
  | { kind: 'device'; buffer: NativeGpuBuffer; bytes: number };

/** A buffer index (into PlanSpec.buffers) plus an element offset into it. */
export interface PlanRef { buffer: number; offset: number }

export type UnaryKind =
  | 'relu' | 'leakyRelu' /* alpha */ | 'clip' /* min alpha, max beta */ | 'sigmoid' | 'tanh'
  | 'hardSigmoid' /* alpha, beta */ | 'hardSwish' | 'erf' | 'gelu' | 'geluTanh' | 'silu'
  | 'exp' | 'log' | 'sqrt' | 'neg' | 'abs' | 'reciprocal' | 'not' /* bool */ | 'identity';

export type BinaryKind = 'add' | 'sub' | 'mul' | 'div' | 'pow' | 'equal' | 'less' | 'greater' | 'and' | 'or';

export type ReduceKind = 'sum' | 'mean' | 'max' | 'min';

/** GemmActivation codes of native/kernels/gemm/gemm.h, by name. */
export type PlanActivation = 'none' | 'relu' | 'clip' /* [alpha, beta]; ReLU6 = clip(0, 6) */ | 'silu' | 'gelu' | 'geluTanh'
  | 'sigmoid' | 'leakyRelu' /* alpha */ | 'hardSwish';

/**
 * A channel-blocked (NCHW16c) float32 tensor of c channels (the last block padded to 16 lanes,
 * finite there): [n][ceil(c / 16)][pads[0] + h + pads[2]][pads[1] + w + pads[3]][16], zero outside the h x w interior
 * (the border is what a following conv reads as its padding, so it needs no copy). Runs of convs on
 * the direct path keep their activations in it (lib/session/layout.ts). bf16: the elements are bf16
 * (2 bytes), for a value that bf16 direct convs write and only bf16 direct convs read as x.
 */
export interface PlanBlocked { h: number; w: number; pads: [number, number, number, number]; bf16?: boolean }

/** The geometry of a direct sparse KxK convolution step (see the spmm step's `taps`). */
export interface SpmmTaps {
  cIn: number; hp: number; wp: number; kh: number; kw: number; sh: number; dh: number; dw: number; oh: number; ow: number;
  /**
   * Strides folded into the layout: `a` holds each image as cIn x sh x sw phases of ceil(hp / sh) x
   * ceil(wp / sw), phase (ry, rx) the padded image's rows ry, ry + sh, ... and columns rx, rx + sw, ...;
   * a tap (ky, kx) reads phase ((ky*dh) % sh, (kx*dw) % sw) from (oy + floor(ky*dh / sh), floor(kx*dw / sw)).
   * Without it, sw must be 1 and output row oy reads padded row oy*sh + ky*dh.
   */
  phased?: boolean; sw?: number;
}

export type PlanStep = { node: string } & (
  /**
   * y [n, cOut, oh, ow] = conv(x [n, cIn, h, w]) with the handle's folded BN and fused epilogue.
   * Blocked operands (the handle on the direct path only): xBlocked, whose border covers the conv's
   * padding; then y and the residual both blocked (yBlocked, residualBlocked; cOut a multiple of 16)
   * or both NCHW.
   */
  | { op: 'conv'; handle: NativeConvHandle; x: PlanRef; y: PlanRef; residual?: PlanRef; residualBeforeActivation: boolean;
      n: number; h: number; w: number; xBlocked?: PlanBlocked; yBlocked?: PlanBlocked; residualBlocked?: PlanBlocked }
  /**
   * An inverted-residual block fused (native ConvChain, lib/session/chain.ts): y = project(depthwise(
   * expand(x))) (+ residual), each conv with its own epilogue, x [n, cIn, h, w], y and the residual
   * blocked; expand optional. Computed in strips of output rows whose intermediate rows stay in
   * cache; the same results as the two or three conv steps.
   */
  | { op: 'convChain'; expand?: NativeConvHandle; depthwise: NativeConvHandle; project: NativeConvHandle; x: PlanRef;
      y: PlanRef; residual?: PlanRef; residualBeforeActivation: boolean; n: number; h: number; w: number;
      xBlocked: PlanBlocked; yBlocked: PlanBlocked; residualBlocked?: PlanBlocked }
  /** NCHW x [n, c, layout.h, layout.w] to blocked y (toBlocked; border zeroed), or blocked x to NCHW y. */
  | { op: 'reorder'; x: PlanRef; y: PlanRef; n: number; c: number; layout: PlanBlocked; toBlocked: boolean }
  /** c [m, n] = act(a [m, k] . W + bias) (+ residual [m, n]); W packed at load (fp32 or low precision). */
  | { op: 'gemm'; weights: NativePackedGemm | NativePackedGemmLowp; a: PlanRef; c: PlanRef; m: number; k: number; n: number;
      bias?: PlanRef; residual?: PlanRef; residualBeforeActivation: boolean;
      activation: PlanActivation; alpha: number; beta: number }
  /**
   * The gemm step on sparse weights (CSR or BSR, built at load from pruned weights): same operands,
   * epilogue and result; the session chose it for this layer's shape (SessionOptions.sparse).
   * skipWeights (m = 1 only): the layer's packed fp32 weights; a run whose row of A is at most 40%
   * non-zero takes the gemm step's zero-skipping GEMV on them instead of the SpMV, as the gemm step
   * would, so choosing sparse at batch 1 never gives up activation sparsity.
   */
  | { op: 'spmm'; weights: NativeSparseWeights; a: PlanRef; c: PlanRef; m: number; k: number; n: number;
      bias?: PlanRef; residual?: PlanRef; residualBeforeActivation: boolean;
      activation: PlanActivation; alpha: number; beta: number; skipWeights?: NativePackedGemm;
      /**
       * Operand layout (absent: one row-major product, [m*k, k, 1] and [m*n, n, 1]). `batch` products;
       * item b's A[i][kk] is a[b*aStrides[0] + i*aStrides[1] + kk*aStrides[2]], its C[i][j] (and
       * residual) at c[b*cStrides[0] + i*cStrides[1] + j*cStrides[2]]. Both row-major (strides[2] = 1)
       * or both column-major (strides[1] = 1; CSR weights, no skipWeights): a 1x1 conv on NCHW is
       * batch n, m = H*W, aStrides [cIn*m, 1, m], cStrides [cOut*m, 1, m], read and written in place.
       */
      batch?: number; aStrides?: [number, number, number]; cStrides?: [number, number, number];
      /**
       * A direct KxK convolution (column-major c, CSR weights whose k index is (c, ky, kx), k = cIn*kh*kw,
       * m = oh*ow): `a` holds `batch` padded images [cIn, hp, wp] at aStrides[0] apart (aStrides[1..2]
       * unused), and the panel row (c, ky, kx) of output row oy is image row c, oy*sh + ky*dh, read from
       * column kx*dw: the im2col panel without copying it. Output rows are computed whole (stride 1 along them).
       */
      taps?: SpmmTaps }
  /**
   * MatMul of two runtime tensors: for each index i of the (broadcast) batch dims,
   * c[i] [m, n] = a[i] [m, k] . b[i] [k, n]; a/b batch strides (elements) may be 0. c is contiguous.
   * transB: b[i] is stored [n, k] (row-major) instead.
   */
  | { op: 'matmul'; a: PlanRef; b: PlanRef; c: PlanRef; batchDims: number[]; aBatchStrides: number[]; bBatchStrides: number[];
      m: number; k: number; n: number; transB: boolean }
  /** y[i] = f(x[i]) for count elements; dtype float32 except neg/abs (also int64, int32) and not (bool). */
  | { op: 'unary'; kind: UnaryKind; dtype: PlanDType; x: PlanRef; y: PlanRef; count: number; alpha: number; beta: number }
  /**
   * y (contiguous, `dims`) = a op b with a/b read through strides (0 where broadcast). dtype is the
   * inputs' dtype (float32, int64, int32; bool for and/or); equal/less/greater write bool.
   * Integer div truncates toward zero; division by zero is a run error naming the node.
   */
  | { op: 'binary'; kind: BinaryKind; dtype: PlanDType; a: PlanRef; b: PlanRef; y: PlanRef; dims: number[];
      aStrides: number[]; bStrides: number[] }
  /** out (contiguous, dims) = cond ? x : y, each read through strides; elemBytes of x/y/out. */
  | { op: 'where'; cond: PlanRef; x: PlanRef; y: PlanRef; out: PlanRef; dims: number[]; condStrides: number[];
      xStrides: number[]; yStrides: number[]; elemBytes: number }
  /**
   * Strided copy (Transpose, Slice, Expand, Concat/Split parts, Pad interior):
   * for every index j of dims: y[yStrides . j] = x[xStrides . j] (offsets in the refs). elemBytes 1, 2, 4 or 8.
   */
  | { op: 'copy'; x: PlanRef; y: PlanRef; dims: number[]; xStrides: number[]; yStrides: number[]; elemBytes: number }
  /** y[0..count) = value (cast to dtype). */
  | { op: 'fill'; y: PlanRef; dtype: PlanDType; count: number; value: number }
  /**
   * y [outer, nIndices, inner] = data [outer, axisLen, inner] gathered along the middle axis;
   * indices (int64 or int32) may be negative (counted from the end); out of range is a run error.
   */
  | { op: 'gather'; data: PlanRef; indices: PlanRef; indicesDtype: 'int64' | 'int32'; y: PlanRef; outer: number;
      axisLen: number; inner: number; nIndices: number; elemBytes: number }
  /**
   * kind 0 max, 1 average over planes of h x w (NCHW), as pool2d; or, with xBlocked and yBlocked,
   * over blocked x and y (planes = n * c, c a multiple of 16; no dilation).
   */
  | { op: 'pool'; kind: 0 | 1; x: PlanRef; y: PlanRef; planes: number; h: number; w: number;
      kernel: [number, number]; strides: [number, number]; dilations: [number, number];
      pads: [number, number, number, number]; countIncludePad: boolean; xBlocked?: PlanBlocked; yBlocked?: PlanBlocked }
  /** y [planes] = mean of each h x w plane of x; xBlocked: x is blocked (planes = n * c, hw = h * w). */
  | { op: 'globalAveragePool'; x: PlanRef; y: PlanRef; planes: number; hw: number; xBlocked?: PlanBlocked }
  /** Softmax (or log-softmax) of x viewed as [outer, axis, inner] over the middle axis. */
  | { op: 'softmax'; x: PlanRef; y: PlanRef; outer: number; axis: number; inner: number; log: boolean }
  /** Normalises rows of cols: y = (x - mean) / sqrt(var + epsilon) * scale + bias; scale/bias hold cols (or absent). */
  | { op: 'layerNorm'; x: PlanRef; y: PlanRef; scale?: PlanRef; bias?: PlanRef; rows: number; cols: number; epsilon: number }
  /** y [outer, channels, inner] = x * scale[c] + shift[c] (a BatchNormalization that could not be folded). */
  | { op: 'channelAffine'; x: PlanRef; y: PlanRef; scale: PlanRef; shift: PlanRef; outer: number; channels: number; inner: number }
  /** y [outer, inner] = reduce of x [outer, r, inner] over the middle axis (float32; sum/max/min also int64). */
  | { op: 'reduce'; kind: ReduceKind; dtype: PlanDType; x: PlanRef; y: PlanRef; outer: number; r: number; inner: number }
  /** y (int64) [outer, inner] = index of the max of x [outer, r, inner] (first of ties unless selectLastIndex). */
  | { op: 'argmax'; x: PlanRef; y: PlanRef; outer: number; r: number; inner: number; selectLastIndex: boolean }
  /** values [outer, k, inner], indices (int64) = top k of x [outer, r, inner] along the middle axis, sorted. */
  | { op: 'topk'; x: PlanRef; values: PlanRef; indices: PlanRef; outer: number; r: number; inner: number; k: number; largest: boolean }
  /** y = x converted (ONNX Cast: float -> int truncates, -> bool is x != 0). */
  | { op: 'cast'; x: PlanRef; y: PlanRef; from: PlanDType; to: PlanDType; count: number }
  /**
   * y = x padded: inDims, begin/end pads per axis (may be negative = crop, as ONNX Pad allows);
   * mode constant (value), reflect or edge.
   */
  | { op: 'pad'; x: PlanRef; y: PlanRef; dtype: PlanDType; inDims: number[]; begin: number[]; end: number[];
      mode: 'constant' | 'reflect' | 'edge'; value: number }
  /**
   * GPU plans only: y [n, cOut, oh, ow] = act(conv(x [n, cIn, h, w]) + bias) (+ residual) with the
   * weights [cOut, cIn / group, kh, kw] (BN folded; float32, or bf16 bits when bf16) and bias [cOut]
   * in device memory. pads are concrete [top, left, bottom, right].
   */
  | { op: 'gpuConv'; weights: NativeGpuBuffer; bias: NativeGpuBuffer; bf16: boolean; x: PlanRef; y: PlanRef; residual?: PlanRef;
      residualBeforeActivation: boolean; n: number; cIn: number; h: number; w: number; cOut: number; group: number;
      kernel: [number, number]; strides: [number, number]; dilations: [number, number]; pads: [number, number, number, number];
      activation: PlanActivation; alpha: number; beta: number }
  /** GPU plans only: the gemm step with W [k, n] (float32, or bf16 bits when bf16) in device memory. */
  | { op: 'gpuGemm'; weights: NativeGpuBuffer; bf16: boolean; a: PlanRef; c: PlanRef; m: number; k: number; n: number;
      bias?: PlanRef; residual?: PlanRef; residualBeforeActivation: boolean; activation: PlanActivation; alpha: number; beta: number }
);

export interface PlanSpec {
  buffers: PlanBuffer[];
  steps: PlanStep[];
  /** Bytes of scratch each run needs for arena buffers. */
  arenaBytes: number;
  /** Expected byte length of run()'s inputs[i] / outputs[i]. */
  inputBytes: number[];
  outputBytes: number[];
}
